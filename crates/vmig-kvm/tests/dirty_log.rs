//! CPU dirty tracking on real KVM, checked with the method of KVM's own `dirty_log_test`
//! (vmm-migration-digest.md §4.2): "every page written in an iteration must be reported (a lost
//! dirty bit fails the test) and every reported page must hold the current iteration".

mod common;

use std::time::Duration;

use common::dirty_log_method;
use vmig_kvm::{DirtyLogMode, KvmError, Vm, VmBuilder, VmConfig, Workload};

/// A count as `f64`, for rates and ratios.
#[expect(
    clippy::cast_precision_loss,
    reason = "test and benchmark counts are far below 2^52, where f64 is exact"
)]
fn float(v: u64) -> f64 {
    v as f64
}

use common::vm_config as config;

fn check_mode(mode: DirtyLogMode, vcpus: usize, workload: &str) {
    let vm = Vm::new(&config(mode, vcpus, workload)).unwrap();
    let report = dirty_log_method(&vm, 8, Duration::from_millis(120), 0x5eed + vcpus as u64);
    let stats = vm.dirty_log().stats();
    eprintln!("{mode} {workload} x{vcpus}: {report:?} {stats:?}");
    assert!(
        report.lost.is_empty(),
        "lost dirty bits (iteration, page): {:?}",
        report.lost
    );
    // The reference's ring tolerances, which a kick-pause brings to every mode: per vCPU, the
    // write in flight at this pause ("dirty_ring_last_page" holding an older value) and the
    // previous pause's in-flight write retiring now with the epoch it had loaded
    // ("dirty_ring_prev_iteration_last_page" holding iteration-1).
    for (iteration, stale) in report.stale_per_iteration.iter().enumerate() {
        assert!(
            *stale <= 2 * vcpus,
            "iteration {}: {stale} reported pages hold an older epoch; at most two writes per vCPU straddle a pause",
            iteration + 1
        );
    }
    assert!(
        report.writes >= 8 * 256,
        "the guest wrote {} pages",
        report.writes
    );
    assert_eq!(stats.ring_overflows, 0);
}

#[test]
fn bitmap_mode_reports_every_page_written() {
    require_kvm!();
    check_mode(DirtyLogMode::Bitmap, 2, "random");
}

#[test]
fn clear_log_mode_reports_every_page_written() {
    require_kvm!();
    check_mode(DirtyLogMode::ClearLog, 2, "random");
}

#[test]
fn ring_mode_reports_every_page_written() {
    require_kvm!();
    check_mode(DirtyLogMode::Ring, 2, "random");
}

#[test]
fn shared_working_set_with_four_vcpus_loses_nothing_in_any_mode() {
    require_kvm!();
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::ClearLog,
        DirtyLogMode::Ring,
    ] {
        check_mode(mode, 4, "hotcold,shared");
    }
}

/// api.rst 8.29: "the vcpu will exit with KVM_EXIT_DIRTY_RING_FULL ... userspace should
/// harvest ... then KVM_RESET_DIRTY_RINGS". A small ring, no reaper, and a paced guest (a port
/// exit every few pages, so KVM sees the soft-full request in time) make the vCPU fill its ring
/// many times; every fill is harvested at the exit and nothing is lost.
#[test]
fn ring_full_exit_harvests_and_reenters_without_losing_a_page() {
    require_kvm!();
    let vm = Vm::new(&VmConfig {
        ring_entries: 1024,
        ..config(DirtyLogMode::Ring, 1, "random,rate=500")
    })
    .unwrap();
    vm.dirty_log().set_reap_interval(None);
    let report = dirty_log_method(&vm, 6, Duration::from_millis(400), 7);
    let stats = vm.dirty_log().stats();
    eprintln!("{report:?} {stats:?}");
    assert!(report.lost.is_empty(), "lost: {:?}", report.lost);
    assert!(stats.ring_full_exits >= 3, "{stats:?}");
    assert_eq!(stats.ring_overflows, 0, "{stats:?}");
    assert!(report.stale_per_iteration.iter().all(|&s| s <= 2));
}

#[test]
fn every_workload_kind_passes_its_own_verify() {
    require_kvm!();
    for (workload, vcpus) in [
        ("sequential", 2),
        ("random,shared", 3),
        ("hotcold,hot=1M", 2),
    ] {
        let vm = Vm::new(&config(DirtyLogMode::Bitmap, vcpus, workload)).unwrap();
        vm.resume().unwrap();
        common::wait_for_writes(&vm, 1000);
        let report = vm.verify(Duration::from_secs(30)).unwrap();
        vm.pause().unwrap();
        assert!(report.passed(), "{workload}: {report:?}");
        assert_eq!(report.pages_checked, vm.layout().ws_pages);
    }
}

#[test]
fn hotcold_concentrates_writes_on_the_hot_set() {
    require_kvm!();
    let count_distinct = |workload: &str| {
        let vm = Vm::new(&config(DirtyLogMode::Bitmap, 1, workload)).unwrap();
        vm.dirty_log().start().unwrap();
        vm.resume().unwrap();
        while vm.guest_writes().unwrap() < 5000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.pause().unwrap();
        let dirty = vmig_dirty::DirtyBitmap::new(vm.memory().layout().top_page());
        vm.dirty_log().harvest(&dirty).unwrap();
        (float(dirty.count()), float(vm.guest_writes().unwrap()))
    };
    let (random_pages, random_writes) = count_distinct("random");
    let (hot_pages, hot_writes) = count_distinct("hotcold,hot=256K,hot-percent=95");
    // Same number of writes (about): hotcold touches far fewer distinct pages.
    assert!(
        hot_pages / hot_writes < 0.5 * random_pages / random_writes,
        "hotcold {hot_pages}/{hot_writes}, random {random_pages}/{random_writes}"
    );
}

#[test]
fn the_guest_is_paced_to_its_rate() {
    require_kvm!();
    let vm = Vm::new(&config(DirtyLogMode::Bitmap, 2, "random,rate=2000")).unwrap();
    let start = std::time::Instant::now();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    vm.pause().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let writes = float(vm.guest_writes().unwrap());
    // The bucket lets through the rate plus a 20 ms burst and one batch per vCPU.
    assert!(
        writes <= 2000.0 * elapsed + 40.0 + 2.0 * 10.0,
        "{writes} writes in {elapsed:.3} s"
    );
    assert!(writes > 0.0);
    let (_, pace_exits) = vm.exit_counts();
    assert!(pace_exits > 0);
    // The rate can be lowered while the guest runs (what auto-converge will do).
    vm.set_rate(Some(500)).unwrap();
    assert_eq!(vm.rate(), Some(500));
    let before = float(vm.guest_writes().unwrap());
    let start = std::time::Instant::now();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    vm.pause().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let writes = float(vm.guest_writes().unwrap()) - before;
    assert!(
        writes <= 500.0 * elapsed + 10.0 + 2.0 * 10.0,
        "{writes} writes in {elapsed:.3} s at 500/s"
    );
    // A guest built without a rate never asks to be paced, and says so.
    let unpaced = Vm::new(&config(DirtyLogMode::Bitmap, 1, "random")).unwrap();
    let err = unpaced.set_rate(Some(100)).unwrap_err();
    assert!(err.to_string().contains("start it with rate=N"), "{err}");
}

#[test]
fn ring_with_bitmap_is_refused_naming_the_capability() {
    require_kvm!();
    let err = Vm::new(&config(DirtyLogMode::RingWithBitmap, 1, "random")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, KvmError::Unsupported(_)), "{err:?}");
    assert!(
        text.contains("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP"),
        "{text}"
    );
}

fn small_memory() -> vmig_kvm::GuestMemory {
    let layout = vmig_kvm::guest::GuestLayout::new(16 << 20, &Workload::default()).unwrap();
    vmig_kvm::GuestMemory::new(&layout.memory).unwrap()
}

/// Seed 004 §4.4 and api.rst: the ring "before any vCPU", WITH_BITMAP "after
/// KVM_CAP_DIRTY_LOG_RING_ACQ_REL" and "before the first KVM_SET_USER_MEMORY_REGION"; manual
/// protect and the ring exclude each other. Each wrong order is refused with the order.
#[test]
fn capabilities_in_the_wrong_order_are_refused_with_the_required_order() {
    require_kvm!();
    let order = |result: Result<(), KvmError>, expected: &str| {
        let err = result.unwrap_err();
        assert!(matches!(err, KvmError::Order(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    };
    // Ring after a vCPU exists.
    let mut b = VmBuilder::new().unwrap();
    b.add_memory(small_memory()).unwrap();
    b.create_vcpus(1).unwrap();
    order(b.enable_dirty_ring(4096), "before the first vCPU");
    // WITH_BITMAP before the ring.
    let mut b = VmBuilder::new().unwrap();
    order(
        b.enable_dirty_ring_with_bitmap(),
        "after KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
    );
    // WITH_BITMAP after a memslot.
    let mut b = VmBuilder::new().unwrap();
    b.enable_dirty_ring(4096).unwrap();
    b.add_memory(small_memory()).unwrap();
    order(
        b.enable_dirty_ring_with_bitmap(),
        "before the first memslot",
    );
    // Ring twice.
    let mut b = VmBuilder::new().unwrap();
    b.enable_dirty_ring(4096).unwrap();
    order(b.enable_dirty_ring(4096), "already enabled");
    // Manual protect with the ring, both ways round.
    let mut b = VmBuilder::new().unwrap();
    b.enable_dirty_ring(4096).unwrap();
    order(
        b.enable_manual_protect(),
        "cannot be combined with the dirty ring",
    );
    let mut b = VmBuilder::new().unwrap();
    b.enable_manual_protect().unwrap();
    order(b.enable_dirty_ring(4096), "exclude each other");
    // Manual protect after a memslot; vCPUs before memory.
    let mut b = VmBuilder::new().unwrap();
    b.add_memory(small_memory()).unwrap();
    order(b.enable_manual_protect(), "before the first memslot");
    let mut b = VmBuilder::new().unwrap();
    order(
        b.create_vcpus(1),
        "register guest memory before creating vCPUs",
    );
}

/// seeds001-004 digest F1/F2: ring sizes that are not a power of two, below a page, or above
/// the maximum are refused with the accepted range.
#[test]
fn bad_ring_sizes_are_refused_with_the_accepted_range() {
    require_kvm!();
    for entries in [0, 100, 256, 512, 1 << 20, 3000] {
        let mut b = VmBuilder::new().unwrap();
        let err = b.enable_dirty_ring(entries).unwrap_err();
        assert!(matches!(err, KvmError::Invalid(_)), "{entries}: {err:?}");
        assert!(
            err.to_string().contains("power of two from 1024 to"),
            "{err}"
        );
    }
}

#[test]
fn harvesting_before_start_or_into_a_short_bitmap_is_refused() {
    require_kvm!();
    let vm = Vm::new(&config(DirtyLogMode::Bitmap, 1, "random")).unwrap();
    let top = vm.memory().layout().top_page();
    let err = vm
        .dirty_log()
        .harvest(&vmig_dirty::DirtyBitmap::new(top))
        .unwrap_err();
    assert!(
        err.to_string().contains("start CPU dirty tracking first"),
        "{err}"
    );
    vm.dirty_log().start().unwrap();
    let err = vm
        .dirty_log()
        .harvest(&vmig_dirty::DirtyBitmap::new(top - 1))
        .unwrap_err();
    assert!(err.to_string().contains("cannot hold"), "{err}");
    vm.dirty_log().stop().unwrap();
    vm.dirty_log().start().unwrap();
}

#[test]
fn the_address_space_reaches_past_64_gib_and_the_top_slot_is_tracked() {
    require_kvm!();
    let vm = Vm::new(&VmConfig {
        ram: 64 << 30,
        ..config(DirtyLogMode::Ring, 1, "random")
    })
    .unwrap();
    let layout = vm.layout().clone();
    let top_slot = *layout.memory.slots.last().unwrap();
    assert!(top_slot.gpa + top_slot.size > 64 << 30);
    vm.dirty_log().start().unwrap();
    vm.resume().unwrap();
    while vm.guest_writes().unwrap() < 2000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().unwrap();
    let dirty = vmig_dirty::DirtyBitmap::new(vm.memory().layout().top_page());
    vm.dirty_log().harvest(&dirty).unwrap();
    let mut in_top_slot = 0;
    dirty.for_each_run(|first, count| {
        for page in first..first + count {
            if page >= top_slot.first_page() {
                in_top_slot += 1;
            }
        }
    });
    assert!(
        in_top_slot > 1000,
        "{in_top_slot} pages reported in the top slot"
    );
    // Every page the guest journaled is consistent (checked on the host: the guest's own
    // verify would scan all 16 million pages).
    let memory = vm.memory();
    let mut checked = 0;
    let mut torn = 0;
    for slot in layout.memory.data_slots() {
        let first_index: u64 = layout
            .memory
            .data_slots()
            .take_while(|s| s.id != slot.id)
            .map(|s| s.pages())
            .sum();
        dirty.for_each_run(|first, count| {
            for page in first..first + count {
                if page < slot.first_page() || page >= slot.first_page() + slot.pages() {
                    continue;
                }
                let index = first_index + page - slot.first_page();
                let journal = memory
                    .load_u64(vmig_kvm::guest::GuestLayout::journal_gpa(index))
                    .unwrap();
                let stamp = vmig_kvm::guest::Stamp::read(memory, &layout, index).unwrap();
                if !stamp.is_consistent(index, journal) {
                    torn += 1;
                }
                checked += 1;
            }
        });
    }
    assert!(checked > 1000);
    // Only the write in flight when the pause kicked the vCPU may be half done.
    assert!(torn <= 1, "{torn} inconsistent pages");
}
