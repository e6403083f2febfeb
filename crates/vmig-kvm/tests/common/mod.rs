//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vmig_dirty::DirtyBitmap;
use vmig_kvm::guest::Stamp;
use vmig_kvm::{DirtyLogMode, PAGE_SIZE, Vm, VmConfig};

/// Returns early, recording a skip (see `vmig_test_support::skip`), when `/dev/kvm` cannot be
/// opened.
#[macro_export]
macro_rules! require_kvm {
    () => {
        vmig_test_support::require_kvm!()
    };
}

/// A 64 MiB VM of `vcpus` vCPUs running `workload`, its CPU dirty log in `mode`.
pub fn vm_config(mode: DirtyLogMode, vcpus: usize, workload: &str) -> VmConfig {
    VmConfig {
        ram: 64 << 20,
        vcpus,
        workload: workload.parse().unwrap(),
        dirty_log: mode,
        ..VmConfig::default()
    }
}

/// Waits until the running guest has written more than `pages` pages in all.
pub fn wait_for_writes(vm: &Vm, pages: u64) {
    vmig_test_support::wait_until("the guest to write", Duration::from_secs(30), || {
        let writes = vm.guest_writes().unwrap();
        if writes > pages {
            Ok(())
        } else {
            Err(format!("{writes} of {pages} pages written"))
        }
    });
}

/// What the dirty-log method found over all iterations.
#[derive(Debug, Default)]
pub struct MethodReport {
    /// Pages written in an iteration and not reported in it: lost dirty bits.
    pub lost: Vec<(u64, u64)>,
    /// Pages reported in an iteration whose stamp holds an older epoch, per iteration.
    pub stale_per_iteration: Vec<usize>,
    /// Pages reported, summed over iterations.
    pub reported: u64,
    /// Guest writes, summed over iterations.
    pub writes: u64,
}

/// KVM's `dirty_log_test` method: the guest stamps the iteration number (the epoch) into the
/// pages it writes; the host harvests once at a random point while the guest runs and once
/// after pausing it; then every page written in the iteration must have been reported, and
/// every reported page must hold the iteration (except, per vCPU, the write in flight when the
/// pause kicked it, since KVM marks a page before the faulting store retires, and the previous
/// pause's in-flight write, which retires in this iteration with the epoch it had loaded).
pub fn dirty_log_method(vm: &Vm, iterations: u64, interval: Duration, seed: u64) -> MethodReport {
    let mode = vm.config().dirty_log;
    let layout = vm.layout().clone();
    let memory = vm.memory();
    let mut report = MethodReport::default();
    let mut rng = seed | 1;
    vm.dirty_log().start().unwrap();
    for iteration in 1..=iterations {
        vm.set_epoch(iteration).unwrap();
        let writes_before = vm.guest_writes().unwrap();
        let dirty = DirtyBitmap::new(memory.layout().top_page());
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let reap_at = Duration::from_micros(rng % u64::try_from(interval.as_micros()).unwrap());
        let start = Instant::now();
        vm.resume().unwrap();
        std::thread::sleep(reap_at);
        vm.dirty_log().harvest(&dirty).unwrap();
        // At least `interval`, and at least 256 writes (as KVM's test), within reason.
        while start.elapsed() < interval
            || (vm.guest_writes().unwrap() - writes_before < 256
                && start.elapsed() < Duration::from_secs(10))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
        vm.check_vcpus().unwrap();
        vm.dirty_log().harvest(&dirty).unwrap();
        report.writes += vm.guest_writes().unwrap() - writes_before;
        let mut stale = 0;
        for page in 0..layout.ws_pages {
            let gpa = layout.ws_page_gpa(page).unwrap();
            let reported = dirty.test(gpa / PAGE_SIZE).unwrap();
            let stamp = Stamp::read(memory, &layout, page).unwrap();
            assert!(stamp.epoch <= iteration, "page {page} holds a future epoch");
            if reported {
                report.reported += 1;
                let initially_set = mode == DirtyLogMode::ClearLog && iteration == 1;
                if stamp.epoch != iteration && !initially_set {
                    stale += 1;
                }
            } else if stamp.epoch == iteration {
                report.lost.push((iteration, page));
            }
        }
        report.stale_per_iteration.push(stale);
    }
    report
}
