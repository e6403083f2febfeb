//! CPU dirty tracking on this machine's KVM, for a 1 GiB guest with 2 vCPUs:
//!
//! 1. the cost of one harvest in each mode while the guest writes 1k, 10k and 100k pages/s
//!    (or as many as nested KVM allows), next to the cost of copying the pages it reported (the
//!    work a migration does with them), measured in the same run;
//! 2. the guest's write rate with tracking on (harvested every 100 ms) against off.
//!
//! `cargo bench -p vmig-kvm --bench dirty_log` (skips, saying why, without `/dev/kvm`).

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use vmig_dirty::DirtyBitmap;
use vmig_kvm::{DirtyLogMode, PAGE_SIZE, Vm, VmConfig, Workload};

const RAM: u64 = 1 << 30;
const MODES: [DirtyLogMode; 3] = [
    DirtyLogMode::Bitmap,
    DirtyLogMode::ClearLog,
    DirtyLogMode::Ring,
];

/// A count as `f64`, for rates and ratios.
#[expect(
    clippy::cast_precision_loss,
    reason = "test and benchmark counts are far below 2^52, where f64 is exact"
)]
fn float(v: u64) -> f64 {
    v as f64
}

/// [`PAGE_SIZE`] as a `usize`, for buffers.
#[expect(clippy::cast_possible_truncation, reason = "4096 fits every usize")]
const PAGE: usize = PAGE_SIZE as usize;

/// A mean page count rounded down to whole pages.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a mean of non-negative page counts, far below usize::MAX"
)]
fn whole_pages(mean: f64) -> usize {
    mean as usize
}

fn vm(mode: DirtyLogMode, rate: Option<u64>) -> Vm {
    let vm = Vm::new(&VmConfig {
        ram: RAM,
        vcpus: 2,
        workload: Workload {
            rate,
            ..Workload::default()
        },
        dirty_log: mode,
        ..VmConfig::default()
    })
    .expect("VM");
    // Allocate the memfd pages first, so the runs measure tracking, not first touch.
    vm.memory().preallocate().unwrap();
    vm
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Time to copy `pages` scattered 4 KiB pages, the work a migration does per reported page.
fn copy_cost(pages: usize, source: &[u8], target: &mut [u8]) -> Duration {
    let count = source.len() / PAGE;
    let start = Instant::now();
    for i in 0..pages {
        let page = (i * 7919) % count * PAGE;
        target[..PAGE].copy_from_slice(&source[page..page + PAGE]);
        std::hint::black_box(&target[..8]);
    }
    start.elapsed()
}

fn harvest_costs() {
    println!("\n== harvest cost, 1 GiB guest, 2 vCPUs, harvest every 100 ms ==");
    println!(
        "{:<10} {:>10} {:>12} {:>14} {:>12} {:>14} {:>12}",
        "mode",
        "rate",
        "achieved/s",
        "pages/harvest",
        "harvest µs*",
        "copy pages µs",
        "harvest/copy"
    );
    let source = vec![1u8; 256 << 20];
    let mut target = vec![0u8; PAGE];
    copy_cost(65536, &source, &mut target);
    for mode in MODES {
        for rate in [1_000u64, 10_000, 100_000] {
            let vm = vm(mode, Some(rate));
            let dirty = DirtyBitmap::new(vm.memory().layout().top_page());
            vm.dirty_log().start().unwrap();
            vm.resume().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            vm.dirty_log().harvest(&dirty).unwrap();
            let _ = dirty.harvest();
            let writes_before = vm.guest_writes().unwrap();
            let start = Instant::now();
            let mut costs = Vec::new();
            let mut pages = Vec::new();
            let reaped_before = vm.dirty_log().stats().reap_nanos;
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(100));
                let t = Instant::now();
                vm.dirty_log().harvest(&dirty).unwrap();
                costs.push(t.elapsed().as_secs_f64() * 1e6);
                pages.push(float(dirty.harvest().count()));
            }
            let achieved =
                float(vm.guest_writes().unwrap() - writes_before) / start.elapsed().as_secs_f64();
            vm.pause().unwrap();
            // Ring modes drain the rings in the background too: charge that time to the
            // harvests, spread evenly.
            let reaped = float(vm.dirty_log().stats().reap_nanos - reaped_before)
                / 1e3
                / float(costs.len() as u64);
            let per_harvest = pages.iter().sum::<f64>() / float(pages.len() as u64);
            let harvest = median(&mut costs) + reaped;
            let copy =
                copy_cost(whole_pages(per_harvest), &source, &mut target).as_secs_f64() * 1e6;
            println!(
                "{:<10} {:>10} {:>12.0} {:>14.0} {:>12.1} {:>14.1} {:>12.2}",
                mode.to_string(),
                rate,
                achieved,
                per_harvest,
                harvest,
                copy,
                harvest / copy.max(0.001)
            );
        }
    }
}

fn write_rates() {
    println!("* ring: median harvest plus the reaper's draining time per 100 ms");
    println!("\n== guest write rate, unlimited, 1 GiB guest, 2 vCPUs, 1.5 s ==");
    println!(
        "{:<10} {:>14} {:>14} {:>8}",
        "mode", "off pages/s", "on pages/s", "on/off"
    );
    for mode in MODES {
        let vm = vm(mode, None);
        let measure = |tracking: bool| {
            if tracking {
                vm.dirty_log().start().unwrap();
            }
            let dirty = DirtyBitmap::new(vm.memory().layout().top_page());
            vm.resume().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let before = vm.guest_writes().unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(1500) {
                std::thread::sleep(Duration::from_millis(100));
                if tracking {
                    vm.dirty_log().harvest(&dirty).unwrap();
                    let _ = dirty.harvest();
                }
            }
            let rate = float(vm.guest_writes().unwrap() - before) / start.elapsed().as_secs_f64();
            vm.pause().unwrap();
            if tracking {
                vm.dirty_log().stop().unwrap();
            }
            rate
        };
        let off = measure(false);
        let on = measure(true);
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>8.2}",
            mode.to_string(),
            off,
            on,
            on / off
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("dirty_log: bench");
        return;
    }
    if let Err(why) = vmig_kvm::kvm_available() {
        println!("skipped: the dirty-log benchmark needs KVM ({why})");
        return;
    }
    harvest_costs();
    write_rates();
}
