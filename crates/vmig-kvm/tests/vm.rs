//! The VM itself: pause and resume, vCPU state save and restore, and the guest's verify.

mod common;

use std::time::Duration;
use vmig_primitives::GuestAddress;

use vmig_kvm::guest::{GuestLayout, Stamp};
use vmig_kvm::{DirtyLogMode, KvmError, PAGE_SIZE, Vm, VmConfig};

fn config(vcpus: usize, workload: &str) -> VmConfig {
    common::vm_config(DirtyLogMode::Bitmap, vcpus, workload)
}

/// "Pausing all vCPUs returns only when every one has left KVM_RUN": once `pause` returns, the
/// guest's write counters stand still, for every vCPU, every time.
#[test]
fn pause_returns_only_when_every_vcpu_has_stopped() {
    require_kvm!();
    let vm = Vm::new(&config(8, "random")).unwrap();
    for round in 0..15 {
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        vm.pause().unwrap();
        let before = vm.guest_writes().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            vm.guest_writes().unwrap(),
            before,
            "round {round}: a vCPU ran while paused"
        );
    }
    vm.check_vcpus().unwrap();
    // vCPU state is only reachable while paused.
    vm.resume().unwrap();
    let err = vm.save_vcpus().unwrap_err();
    assert!(matches!(err, KvmError::Order(_)), "{err:?}");
    vm.pause().unwrap();
    assert_eq!(vm.save_vcpus().unwrap().len(), 8);
}

/// The verify is what later tests rely on to prove nothing was lost: it must find a torn page
/// (head and tail disagree), a lost write (the page holds an older stamp than the journal says)
/// and a page scribbled on, all three and nothing else, having checked every page.
#[test]
fn verify_finds_torn_lost_and_scribbled_pages() {
    require_kvm!();
    // Sequential writers: each vCPU walks its own slice (4096 pages here) page after page, so
    // the pages vCPU 0 wrote last are the ones it comes back to last. Corrupted, they stay so
    // until the verify, which the guest takes up within a batch (64 pages) of resuming.
    let vm = Vm::new(&config(2, "sequential,wss=32M")).unwrap();
    vm.resume().unwrap();
    common::wait_for_writes(&vm, 6000);
    vm.pause().unwrap();
    let layout = vm.layout().clone();
    let memory = vm.memory();
    // Tags are `vcpu << 48 | write count`: vCPU 0's, highest first.
    let mut latest: Vec<(u64, u64)> = (0..layout.ws_pages)
        .map(|i| (memory.load_u64(GuestLayout::journal_gpa(i)).unwrap(), i))
        .filter(|&(tag, _)| tag != 0 && tag >> 48 == 0)
        .collect();
    latest.sort_unstable_by(|a, b| b.cmp(a));
    let [torn, lost, scribbled] = latest[..3]
        .iter()
        .map(|&(_, page)| page)
        .collect::<Vec<_>>()[..]
    else {
        panic!("vCPU 0 wrote fewer than 3 pages: {latest:?}")
    };
    let gpa = |i| layout.ws_page_gpa(i).unwrap();
    // Torn: the tail of the page is from another write.
    memory.store_u64(gpa(torn) + 4088, 0x1234).unwrap();
    // Lost: the page still holds the stamp of an older write (tag one less, checksum redone).
    let old = Stamp::read(memory, &layout, lost).unwrap();
    let tag = old.tag - 1;
    memory.store_u64(gpa(lost) + 16, tag).unwrap();
    memory
        .store_u64(
            gpa(lost) + 24,
            Stamp::expected_checksum(old.head, old.epoch, tag),
        )
        .unwrap();
    memory.store_u64(gpa(lost) + 4088, tag).unwrap();
    // Scribbled: a byte in the head.
    memory
        .write(GuestAddress(gpa(scribbled) + 3), &[0xff])
        .unwrap();
    vm.resume().unwrap();
    let report = vm.verify(Duration::from_secs(30)).unwrap();
    vm.pause().unwrap();
    let mut expected = vec![torn, lost, scribbled];
    expected.sort_unstable();
    let mut found = report.bad_pages.clone();
    found.sort_unstable();
    assert_eq!(found, expected, "torn, lost and scribbled: {report:?}");
    assert_eq!(report.bad_count, 3);
    assert_eq!(report.pages_checked, layout.ws_pages);
    assert!(!report.passed());
}

/// A paused guest, saved and restored into a fresh VM, continues at the same instruction with
/// the same registers and memory, and its verify passes.
#[test]
fn vcpu_state_and_memory_survive_a_restore_into_a_fresh_vm() {
    require_kvm!();
    let source = Vm::new(&config(2, "hotcold,shared")).unwrap();
    source.resume().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    source.pause().unwrap();
    let states = source.save_vcpus().unwrap();
    let digest = source.memory().digest().unwrap();
    let writes = source.guest_writes().unwrap();
    let copy = |into: &vmig_kvm::GuestMemory| -> vmig_kvm::Result<()> {
        let mut page = vec![0u8; usize::try_from(PAGE_SIZE).unwrap()];
        for slot in source.memory().slots() {
            for i in 0..slot.layout.pages() {
                source
                    .memory()
                    .read(GuestAddress(slot.layout.gpa + i * PAGE_SIZE), &mut page)?;
                if page.iter().any(|&b| b != 0) {
                    into.write(GuestAddress(slot.layout.gpa + i * PAGE_SIZE), &page)?;
                }
            }
        }
        Ok(())
    };
    let target = Vm::restore(source.config(), &states, copy).unwrap();
    assert_eq!(target.memory().digest().unwrap(), digest);
    let restored = target.save_vcpus().unwrap();
    for (a, b) in states.iter().zip(&restored) {
        assert_eq!(a.regs.rip, b.regs.rip);
        assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs));
        assert_eq!(format!("{:?}", a.sregs), format!("{:?}", b.sregs));
        assert_eq!(a.xcrs.xcrs[0].value, b.xcrs.xcrs[0].value);
        assert_eq!(a.xsave.region, b.xsave.region);
        assert_eq!(a.lapic.regs, b.lapic.regs);
    }
    drop(source);
    target.resume().unwrap();
    // The restored guest keeps writing.
    common::wait_for_writes(&target, writes);
    let report = target.verify(Duration::from_secs(30)).unwrap();
    assert!(report.passed(), "{report:?}");
}

#[test]
fn a_restore_with_the_wrong_number_of_vcpu_states_is_refused() {
    require_kvm!();
    let vm = Vm::new(&config(1, "random")).unwrap();
    let states = vm.save_vcpus().unwrap();
    let err = Vm::restore(&config(2, "random"), &states, |_| Ok(())).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 vCPU states for a VM of 2 vCPUs"),
        "{err}"
    );
}

#[test]
fn bad_configurations_are_refused_with_what_is_expected() {
    require_kvm!();
    for (cfg, expected) in [
        (
            VmConfig {
                vcpus: 0,
                ..config(1, "random")
            },
            "expected 1 to 8",
        ),
        (
            VmConfig {
                vcpus: 9,
                ..config(1, "random")
            },
            "expected 1 to 8",
        ),
        (
            VmConfig {
                ram: 8 << 20,
                ..config(1, "random")
            },
            "from 16 MiB to 256 GiB",
        ),
        (config(1, "random,wss=1G"), "the data RAM of this VM"),
        (config(2, "random,wss=4K"), "its own slice"),
    ] {
        let err = Vm::new(&cfg).unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}

/// Verifies back to back, with more vCPU threads than host cores: each must start only after
/// every vCPU left the previous one.
#[test]
fn verifies_back_to_back_with_eight_vcpus_all_pass() {
    require_kvm!();
    let vm = Vm::new(&config(8, "random,shared")).unwrap();
    vm.resume().unwrap();
    for round in 0..5 {
        let report = vm.verify(Duration::from_secs(30)).unwrap();
        assert!(report.passed(), "round {round}: {report:?}");
    }
    vm.pause().unwrap();
    vm.check_vcpus().unwrap();
}
