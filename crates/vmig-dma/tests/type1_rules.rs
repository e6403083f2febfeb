//! Conformance tests of the typed API, one per rule, named after it. The comments quote the
//! rule from `shared/reference/` (seed000 = `seed000-vfio-migration-kabi.md`, digest =
//! `seeds001-004-iommu-kvm-digest.md`).

use std::os::fd::AsFd;
use std::sync::Arc;
use vmig_primitives::Iova;

use vmig_dma::{
    Backing, DirtyRead, DmaError, GroupKind, Iommu, IommuConfig, IommuType, IovaRange, Prot,
    UnmapScope,
};

use vmig_primitives::{HostMemory, memfd};

const PG: u64 = 4096;

fn iommu() -> Iommu {
    Iommu::new(IommuConfig::default()).unwrap()
}

fn iommu_with(f: impl FnOnce(&mut IommuConfig)) -> Iommu {
    let mut config = IommuConfig::default();
    f(&mut config);
    Iommu::new(config).unwrap()
}

fn anon(pages: u64) -> Arc<HostMemory> {
    Arc::new(HostMemory::anonymous(pages * PG).unwrap())
}

/// Maps `pages` pages of fresh anonymous memory read-write at `iova`; returns the memory.
fn map(iommu: &Iommu, iova: u64, pages: u64) -> Arc<HostMemory> {
    let memory = anon(pages);
    iommu
        .map(
            Iova(iova),
            pages * PG,
            Backing::Memory {
                memory: Arc::clone(&memory),
                offset: 0,
            },
            Prot::READ_WRITE,
        )
        .unwrap();
    memory
}

fn try_map(iommu: &Iommu, iova: u64, size: u64) -> Result<(), DmaError> {
    let memory = Arc::new(HostMemory::anonymous(size.clamp(PG, 64 * PG)).unwrap());
    iommu.map(
        Iova(iova),
        size,
        Backing::Memory { memory, offset: 0 },
        Prot::READ_WRITE,
    )
}

fn errno<T: std::fmt::Debug>(r: Result<T, DmaError>) -> i32 {
    r.expect_err("expected a refusal").errno()
}

/// GET_BITMAP at the minimum page size into a fresh buffer.
fn get(iommu: &Iommu, iova: u64, pages: u64) -> Vec<u64> {
    get_mode(iommu, iova, pages, DirtyRead::Clear)
}

fn get_mode(iommu: &Iommu, iova: u64, pages: u64, mode: DirtyRead) -> Vec<u64> {
    let mut bitmap = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap()];
    iommu
        .get_dirty_bitmap(Iova(iova), pages * PG, PG, &mut bitmap, mode)
        .unwrap();
    bitmap
}

fn bits(words: &[u64]) -> Vec<u64> {
    (0..words.len() as u64 * 64)
        .filter(|i| words[(i / 64) as usize] & (1 << (i % 64)) != 0)
        .collect()
}

// ---- map rules ------------------------------------------------------------------------------

#[test]
fn map_of_size_zero_is_einval() {
    // digest B1: MAP size 0 -> -EINVAL
    assert_eq!(errno(try_map(&iommu(), 0, 0)), libc::EINVAL);
}

#[test]
fn map_not_aligned_to_the_minimum_page_is_einval() {
    // digest B2: MAP iova/vaddr/size not aligned to min pgsize -> -EINVAL
    let iommu = iommu();
    assert_eq!(errno(try_map(&iommu, PG / 2, PG)), libc::EINVAL);
    assert_eq!(errno(try_map(&iommu, 0, PG + 1)), libc::EINVAL);
    let memory = anon(4);
    let unaligned_backing = Backing::Memory {
        memory,
        offset: 512,
    };
    assert_eq!(
        errno(iommu.map(Iova(0), PG, unaligned_backing, Prot::READ)),
        libc::EINVAL
    );
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn map_that_wraps_past_the_iova_space_is_einval() {
    // digest B3 / T3-9: MAP with iova+size-1 wrapping -> type1 -EINVAL
    assert_eq!(
        errno(try_map(&iommu(), u64::MAX - PG + 1, 2 * PG)),
        libc::EINVAL
    );
}

#[test]
fn map_ending_at_the_last_byte_of_the_64_bit_space_is_accepted() {
    // seed 003 T3-2: (0xffff_ffff_ffff_f000, 0x1000): last = 0xffff_ffff_ffff_ffff, accepted
    let iommu = iommu();
    map(&iommu, u64::MAX - PG + 1, 1);
    assert_eq!(iommu.mappings()[0].iova, 0xffff_ffff_ffff_f000);
    iommu.write(Iova(u64::MAX - 7), &[0xaa; 8]).unwrap();
    // and it unmaps without a 64-bit wrap
    assert_eq!(
        iommu
            .unmap(Iova(u64::MAX - PG + 1), PG, UnmapScope::Range)
            .unwrap(),
        PG
    );
}

#[test]
fn whole_64_bit_space_maps_in_two_calls_and_unmaps_in_two_halves() {
    // seed 003 T3-1 / T3-7: never a map of size 0; two halves of 2^63 each
    let iommu = iommu();
    let half = 1u64 << 63;
    let memory = Arc::new(HostMemory::anonymous(PG).unwrap());
    // The host memory is only one page: the mapping itself is refused as unbacked (EFAULT),
    // which shows the size arithmetic reached the backing check instead of wrapping to 0.
    let r = iommu.map(
        Iova(0),
        half,
        Backing::Memory { memory, offset: 0 },
        Prot::READ,
    );
    assert_eq!(errno(r), libc::EFAULT);
    assert_eq!(iommu.unmap(Iova(0), half, UnmapScope::Range).unwrap(), 0);
    assert_eq!(iommu.unmap(Iova(half), half, UnmapScope::Range).unwrap(), 0);
}

#[test]
fn overlapping_map_is_eexist() {
    // digest B4: MAP overlapping an existing mapping (exact, partial, superset) -> -EEXIST
    let iommu = iommu();
    map(&iommu, 0x10000, 4);
    for (iova, size) in [
        (0x10000, 4 * PG),
        (0xf000, 2 * PG),
        (0x13000, 2 * PG),
        (0, 0x100000),
        (0x11000, PG),
    ] {
        assert_eq!(
            errno(try_map(&iommu, iova, size)),
            libc::EEXIST,
            "{iova:#x}+{size:#x}"
        );
    }
    // adjacent on both sides is fine
    map(&iommu, 0xf000, 1);
    map(&iommu, 0x14000, 1);
    assert_eq!(iommu.mapping_count(), 3);
}

#[test]
fn map_outside_the_allowed_iova_ranges_is_einval() {
    // digest B6: MAP outside the allowed IOVA ranges (type1 iova_list) -> -EINVAL; the ranges
    // are those Linux 6.1 reported with VT-d (kernel-vfio-type1-observed.md)
    let iommu = iommu_with(|c| {
        c.iova_ranges = vec![
            IovaRange {
                start: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                last: 0x7f_ffff_ffff,
            },
        ];
    });
    assert_eq!(errno(try_map(&iommu, 0xfee0_0000, PG)), libc::EINVAL);
    assert_eq!(errno(try_map(&iommu, 0xfedf_f000, 2 * PG)), libc::EINVAL);
    assert_eq!(errno(try_map(&iommu, 0x80_0000_0000, PG)), libc::EINVAL);
    // T3-4: last == max_iova exactly is accepted (inclusive compare)
    try_map(&iommu, 0x7f_ffff_f000, PG).unwrap();
    try_map(&iommu, 0xfedf_f000, PG).unwrap();
    // T3-5: last == max_iova + 1 is refused
    assert_eq!(
        errno(try_map(&iommu, 0x7f_ffff_f000 + PG, PG)),
        libc::EINVAL
    );
}

#[test]
fn the_65536th_map_is_enospc_and_unmapping_one_frees_a_slot() {
    // digest B7: 65536th MAP with default dma_entry_limit -> -ENOSPC; unmapping one frees a slot
    let iommu = iommu();
    let memory = Arc::new(HostMemory::anonymous(PG).unwrap());
    for i in 0..65535u64 {
        let backing = Backing::Memory {
            memory: Arc::clone(&memory),
            offset: 0,
        };
        iommu.map(Iova(i * PG), PG, backing, Prot::READ).unwrap();
    }
    assert_eq!(iommu.info().dma_avail, 0);
    let backing = Backing::Memory {
        memory: Arc::clone(&memory),
        offset: 0,
    };
    assert_eq!(
        errno(iommu.map(Iova(65535 * PG), PG, backing, Prot::READ)),
        libc::ENOSPC
    );
    iommu.unmap(Iova(0), PG, UnmapScope::Range).unwrap();
    let backing = Backing::Memory { memory, offset: 0 };
    iommu
        .map(Iova(65535 * PG), PG, backing, Prot::READ)
        .unwrap();
}

#[test]
fn map_with_neither_read_nor_write_is_einval() {
    // digest B8: MAP with flags neither READ nor WRITE (type1) -> -EINVAL
    let memory = anon(1);
    let r = iommu().map(
        Iova(0),
        PG,
        Backing::Memory { memory, offset: 0 },
        Prot::from_bits(0).unwrap(),
    );
    assert_eq!(errno(r), libc::EINVAL);
    assert_eq!(errno(Prot::from_bits(4)), libc::EINVAL);
}

#[test]
fn map_beyond_its_backing_is_efault_and_maps_nothing() {
    // A mapping must be backed for its whole size (the kernel's pin of an unbacked vaddr faults).
    let iommu = iommu();
    let memory = anon(2);
    let r = iommu.map(
        Iova(0),
        3 * PG,
        Backing::Memory { memory, offset: 0 },
        Prot::READ,
    );
    assert_eq!(errno(r), libc::EFAULT);
    let fd = memfd("short", 2 * PG).unwrap();
    let r = iommu.map(
        Iova(0),
        2 * PG,
        Backing::Fd {
            fd: fd.as_fd(),
            offset: PG,
        },
        Prot::READ,
    );
    assert_eq!(errno(r), libc::EFAULT);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn fd_backed_mapping_shares_memory_with_every_other_mapping_of_the_fd() {
    let iommu = iommu();
    let fd = memfd("guest-ram", 16 * PG).unwrap();
    iommu
        .map(
            Iova(0x100000),
            8 * PG,
            Backing::Fd {
                fd: fd.as_fd(),
                offset: 8 * PG,
            },
            Prot::READ_WRITE,
        )
        .unwrap();
    iommu.write(Iova(0x100000 + 5), b"vmig").unwrap();
    let view = HostMemory::map_fd(fd.as_fd(), 0, 16 * PG, false).unwrap();
    let mut buf = [0u8; 4];
    view.read(8 * usize::try_from(PG).unwrap() + 5, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"vmig");
}

// ---- unmap rules ----------------------------------------------------------------------------

#[test]
fn v2_unmap_bisecting_a_mapping_is_einval_and_unmaps_nothing() {
    // digest B11: v2 UNMAP bisecting a mapping at start or end -> -EINVAL, nothing unmapped
    let iommu = iommu();
    map(&iommu, 0, 8);
    assert_eq!(
        errno(iommu.unmap(Iova(PG), 7 * PG, UnmapScope::Range)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap(Iova(0), 4 * PG, UnmapScope::Range)),
        libc::EINVAL
    );
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn v2_unmap_of_whole_mappings_and_gaps_returns_the_sum() {
    // digest B12: v2 UNMAP covering two whole mappings plus gaps -> success, size = sum
    let iommu = iommu();
    map(&iommu, 0x10000, 2);
    map(&iommu, 0x20000, 3);
    map(&iommu, 0x40000, 1);
    assert_eq!(
        iommu.unmap(Iova(0), 0x30000, UnmapScope::Range).unwrap(),
        5 * PG
    );
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn unmap_of_an_empty_range_returns_zero() {
    // digest B13: v2 UNMAP of an empty range -> success, size 0
    assert_eq!(
        iommu()
            .unmap(Iova(0x1000), 0x1000, UnmapScope::Range)
            .unwrap(),
        0
    );
}

#[test]
fn v1_unmap_starting_inside_a_mapping_unmaps_nothing() {
    // digest B14: v1 UNMAP starting inside a mapping -> success, size 0; covering the first
    // iova -> whole mapping removed
    let iommu = iommu_with(|c| c.iommu_type = IommuType::Type1);
    map(&iommu, 0, 8);
    assert_eq!(iommu.unmap(Iova(PG), PG, UnmapScope::Range).unwrap(), 0);
    assert_eq!(iommu.unmap(Iova(0), PG, UnmapScope::Range).unwrap(), 8 * PG);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn unmap_all_needs_iova_and_size_zero() {
    // digest B15: UNMAP_ALL with iova != 0 or size != 0 -> -EINVAL
    let iommu = iommu();
    map(&iommu, 0, 1);
    map(&iommu, u64::MAX - PG + 1, 1);
    assert_eq!(
        errno(iommu.unmap(Iova(PG), 0, UnmapScope::All)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap(Iova(0), PG, UnmapScope::All)),
        libc::EINVAL
    );
    assert_eq!(iommu.unmap(Iova(0), 0, UnmapScope::All).unwrap(), 2 * PG);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn unmap_of_size_zero_misaligned_or_wrapping_is_einval() {
    // digest 1.2: UNMAP size==0, misaligned, wraps -> -EINVAL
    let iommu = iommu();
    assert_eq!(
        errno(iommu.unmap(Iova(0), 0, UnmapScope::Range)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap(Iova(1), PG, UnmapScope::Range)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap(Iova(0), PG + 1, UnmapScope::Range)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap(Iova(u64::MAX - PG + 1), 2 * PG, UnmapScope::Range)),
        libc::EINVAL
    );
}

// ---- pinning and accounting -----------------------------------------------------------------

#[test]
fn page_pinned_twice_stays_pinned_after_one_unpin() {
    // seed000 #59: pin page 7 twice and unpin once: still pinned, GET shows bit 7 every call;
    // after the second unpin: reported once more, then clear
    let iommu = iommu();
    map(&iommu, 0, 64);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu
        .pin_pages(group, Iova(7 * PG), 1, Prot::WRITE)
        .unwrap();
    iommu
        .pin_pages(group, Iova(7 * PG), 1, Prot::WRITE)
        .unwrap();
    iommu.unpin_pages(group, Iova(7 * PG), 1).unwrap();
    assert_eq!(iommu.locked_pages(), 1);
    assert_eq!(bits(&get(&iommu, 0, 64)), [7]);
    assert_eq!(bits(&get(&iommu, 0, 64)), [7]);
    iommu.unpin_pages(group, Iova(7 * PG), 1).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 64)), [7]);
    assert_eq!(bits(&get(&iommu, 0, 64)), Vec::<u64>::new());
    assert_eq!(iommu.locked_pages(), 0);
}

#[test]
fn unpin_of_a_page_never_pinned_is_a_no_op() {
    // seed000 #60: unpinning never-pinned or more than pinned -> no-op, no underflow
    let iommu = iommu();
    map(&iommu, 0, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.unpin_pages(group, Iova(0), 8).unwrap();
    iommu.pin_pages(group, Iova(0), 1, Prot::READ).unwrap();
    iommu.unpin_pages(group, Iova(0), 1).unwrap();
    iommu.unpin_pages(group, Iova(0), 1).unwrap();
    iommu.unpin_pages(group, Iova(0x100000), 1).unwrap();
    assert_eq!(iommu.locked_pages(), 0);
}

#[test]
fn pin_from_a_group_of_two_devices_is_einval() {
    // seed000 #66: vfio_pin_pages from a device in a 2-device IOMMU group -> -EINVAL, nothing pinned
    let iommu = iommu();
    map(&iommu, 0, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 2);
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0), 1, Prot::READ)),
        libc::EINVAL
    );
    assert_eq!(iommu.locked_pages(), 0);
}

#[test]
fn pin_of_unmapped_or_forbidden_pages_is_refused_and_pins_nothing() {
    // type1 vfio_pin_pages: no dma -> -EINVAL, prot not allowed -> -EPERM, >512 -> -E2BIG,
    // type1 v1 -> -EACCES
    let iommu = iommu();
    map(&iommu, 0, 4);
    let memory = anon(4);
    iommu
        .map(
            Iova(0x10000),
            4 * PG,
            Backing::Memory { memory, offset: 0 },
            Prot::READ,
        )
        .unwrap();
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(2 * PG), 3, Prot::READ)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0x10000), 1, Prot::WRITE)),
        libc::EPERM
    );
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0), 513, Prot::READ)),
        libc::E2BIG
    );
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0), 0, Prot::READ)),
        libc::EINVAL
    );
    assert_eq!(iommu.locked_pages(), 0);
    let v1 = iommu_with(|c| c.iommu_type = IommuType::Type1);
    map(&v1, 0, 1);
    let g = v1.attach_group(GroupKind::Mediated, 1);
    assert_eq!(errno(v1.pin_pages(g, Iova(0), 1, Prot::READ)), libc::EACCES);
}

#[test]
fn pin_beyond_the_locked_memory_limit_is_enomem_and_rolls_back() {
    // digest C1: map beyond RLIMIT_MEMLOCK -> -ENOMEM; partial pins rolled back, counter unchanged
    let iommu = iommu_with(|c| c.locked_pages_limit = Some(4));
    map(&iommu, 0, 2);
    map(&iommu, 2 * PG, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.pin_pages(group, Iova(0), 2, Prot::READ).unwrap();
    // spans both mappings: the first segment (re-pins of pinned pages) is free, the second
    // needs 3 new pages against 2 left
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0), 5, Prot::READ)),
        libc::ENOMEM
    );
    assert_eq!(iommu.locked_pages(), 2);
    iommu.unpin_pages(group, Iova(0), 2).unwrap();
    // the failed call left no reference behind: one unpin brought both pages to zero
    assert_eq!(iommu.locked_pages(), 0);
    iommu.pin_pages(group, Iova(0), 4, Prot::READ).unwrap();
    assert_eq!(iommu.locked_pages(), 4);
}

#[test]
fn locked_pages_return_to_zero_after_unpin_and_unmap() {
    // digest C6: locked_vm returns exactly to its baseline
    let iommu = iommu();
    map(&iommu, 0, 16);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu
        .pin_pages(group, Iova(0), 16, Prot::READ_WRITE)
        .unwrap();
    iommu.pin_pages(group, Iova(4 * PG), 4, Prot::READ).unwrap();
    assert_eq!(iommu.locked_pages(), 16);
    iommu.unpin_pages(group, Iova(0), 16).unwrap();
    iommu.unpin_pages(group, Iova(4 * PG), 4).unwrap();
    assert_eq!(iommu.locked_pages(), 0);
    assert_eq!(
        iommu.unmap(Iova(0), 16 * PG, UnmapScope::Range).unwrap(),
        16 * PG
    );
}

#[test]
fn unmap_of_pinned_pages_asks_the_group_to_unpin_first() {
    // digest B27: unmap of a range with an access pin: access notified, unpins, unmap completes
    let iommu = Arc::new(iommu());
    map(&iommu, 0, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu
        .pin_pages(group, Iova(2 * PG), 1, Prot::WRITE)
        .unwrap();
    let weak = Arc::downgrade(&iommu);
    iommu
        .set_unmap_notifier(
            group,
            Arc::new(move |range: IovaRange| {
                let iommu = weak.upgrade().unwrap();
                for page in (range.start..=range.last)
                    .step_by(usize::try_from(PG).unwrap())
                    .take(8)
                {
                    iommu.unpin_pages(group, Iova(page), 1).unwrap();
                }
            }),
        )
        .unwrap();
    assert_eq!(
        iommu.unmap(Iova(0), 8 * PG, UnmapScope::Range).unwrap(),
        8 * PG
    );
    assert_eq!(iommu.locked_pages(), 0);
}

#[test]
fn unmap_of_pinned_pages_whose_owner_never_unpins_is_ebusy_and_bounded() {
    // digest B27: a stuck access is bounded (no infinite retry)
    let iommu = iommu();
    map(&iommu, 0, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.pin_pages(group, Iova(0), 1, Prot::READ).unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    iommu
        .set_unmap_notifier(
            group,
            Arc::new(move |_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )
        .unwrap();
    assert_eq!(
        errno(iommu.unmap(Iova(0), 8 * PG, UnmapScope::Range)),
        libc::EBUSY
    );
    assert!(calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(iommu.mapping_count(), 1);
}

// ---- dirty tracking: lifecycle --------------------------------------------------------------

#[test]
fn start_and_stop_are_idempotent() {
    // seed000 #52/#53: START, START -> 0; STOP without START -> 0; START, STOP, STOP -> 0
    let iommu = iommu();
    map(&iommu, 0, 4);
    iommu.stop_dirty_tracking().unwrap();
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(0), &[1]).unwrap();
    iommu.start_dirty_tracking().unwrap();
    // the second START kept the one set of bitmaps: the write is still there
    assert_eq!(bits(&get(&iommu, 0, 4)), [0]);
    iommu.stop_dirty_tracking().unwrap();
    iommu.stop_dirty_tracking().unwrap();
    assert!(!iommu.is_tracking());
}

#[test]
fn start_that_cannot_allocate_is_enomem_and_leaves_tracking_off() {
    // seed000 #54: START with an allocation failure at the k-th dma -> -ENOMEM, tracking off,
    // a subsequent GET -> -EINVAL, earlier bitmaps freed
    let iommu = iommu_with(|c| c.dirty_bitmap_memory_limit = 16);
    map(&iommu, 0, 64);
    map(&iommu, 64 * PG, 64);
    map(&iommu, 128 * PG, 64);
    assert_eq!(errno(iommu.start_dirty_tracking()), libc::ENOMEM);
    assert!(!iommu.is_tracking());
    let mut bitmap = [0u64; 1];
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), 64 * PG, PG, &mut bitmap, DirtyRead::Clear)),
        libc::EINVAL
    );
    // the budget was not consumed by the failed START: after one unmap it fits
    iommu
        .unmap(Iova(128 * PG), 64 * PG, UnmapScope::Range)
        .unwrap();
    iommu.start_dirty_tracking().unwrap();
}

#[test]
fn start_with_a_mapping_over_int_max_pages_is_einval() {
    // seed000 #55: START with one dma of (INT_MAX+1)*PG bytes -> -EINVAL, tracking stays off
    let iommu = iommu();
    let size = (i32::MAX as u64 + 1) * PG;
    let memory = Arc::new(HostMemory::anonymous(size).unwrap());
    iommu
        .map(
            Iova(0),
            size,
            Backing::Memory { memory, offset: 0 },
            Prot::READ_WRITE,
        )
        .unwrap();
    assert_eq!(errno(iommu.start_dirty_tracking()), libc::EINVAL);
    assert!(!iommu.is_tracking());
}

#[test]
fn start_stop_start_reports_no_bits_of_the_previous_session() {
    // seed000 #56: START, STOP, START: the bits of the previous session are not reported,
    // except for still-pinned pages
    let iommu = iommu();
    map(&iommu, 0, 16);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(3 * PG), &[1]).unwrap();
    iommu
        .pin_pages(group, Iova(9 * PG), 1, Prot::WRITE)
        .unwrap();
    iommu.stop_dirty_tracking().unwrap();
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(bits(&get(&iommu, 0, 16)), [9]);
}

#[test]
fn tracking_started_after_writes_reports_only_later_writes() {
    // digest E5: enable tracking after prior device writes -> first GET returns only post-enable writes
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.write(Iova(0), &[1]).unwrap();
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(5 * PG), &[1]).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 8)), [5]);
}

#[test]
fn map_while_tracking_gets_a_bitmap() {
    // seed000 #67: MAP_DMA [64PG, 72PG) while tracking; pin page 65; GET -> bit 1
    let iommu = iommu();
    iommu.start_dirty_tracking().unwrap();
    map(&iommu, 64 * PG, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu
        .pin_pages(group, Iova(65 * PG), 1, Prot::WRITE)
        .unwrap();
    assert_eq!(bits(&get(&iommu, 64 * PG, 8)), [1]);
}

#[test]
fn map_while_tracking_that_cannot_allocate_is_enomem_and_maps_nothing() {
    // seed000 #68: MAP_DMA while tracking, bitmap allocation failing -> -ENOMEM, dma does not exist
    let iommu = iommu_with(|c| c.dirty_bitmap_memory_limit = 8);
    map(&iommu, 0, 64);
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(errno(try_map(&iommu, 64 * PG, PG)), libc::ENOMEM);
    assert_eq!(iommu.mapping_count(), 1);
}

// ---- dirty tracking: content ----------------------------------------------------------------

#[test]
fn pinned_before_start_is_reported_on_every_read() {
    // seed000 #57: pin page 3 before START; GET -> only bit 3; second GET -> bit 3 again
    let iommu = iommu();
    map(&iommu, 0, 64);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu
        .pin_pages(group, Iova(3 * PG), 1, Prot::WRITE)
        .unwrap();
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(bits(&get(&iommu, 0, 64)), [3]);
    assert_eq!(bits(&get(&iommu, 0, 64)), [3]);
}

#[test]
fn pinned_and_unpinned_after_start_is_reported_once() {
    // seed000 #58: pin page 5 after START, unpin, GET -> bit 5; next GET -> clear
    let iommu = iommu();
    map(&iommu, 0, 64);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu
        .pin_pages(group, Iova(5 * PG), 1, Prot::WRITE)
        .unwrap();
    iommu.unpin_pages(group, Iova(5 * PG), 1).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 64)), [5]);
    assert_eq!(bits(&get(&iommu, 0, 64)), Vec::<u64>::new());
}

#[test]
fn dma_write_across_a_page_boundary_marks_both_pages_and_reads_mark_none() {
    // seed000 #61: dma_rw writes 3 bytes at 2PG-1 -> bits 1 and 2; a read sets no bits
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    let mut buf = [0u8; 64];
    iommu.read(Iova(0), &mut buf).unwrap();
    iommu.write(Iova(2 * PG - 1), &[1, 2, 3]).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 8)), [1, 2]);
    iommu.read(Iova(2 * PG - 1), &mut buf[..3]).unwrap();
    assert_eq!(buf[..3], [1, 2, 3]);
}

#[test]
fn direct_group_that_never_pinned_makes_every_mapped_page_dirty() {
    // seed000 #62: IOMMU-backed group that never pinned: mapping [0,16PG) -> every GET returns
    // 16 ones, zero bits beyond
    let iommu = iommu();
    map(&iommu, 0, 16);
    iommu.attach_group(GroupKind::Direct, 1);
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(get(&iommu, 0, 16), [0xffff]);
    assert_eq!(get(&iommu, 0, 16), [0xffff]);
}

#[test]
fn first_pin_of_the_direct_group_narrows_the_dirty_scope() {
    // seed000 #63: after the group's first successful pin GET returns only pinned and
    // unpinned-since-last pages
    let iommu = iommu();
    map(&iommu, 0, 16);
    let group = iommu.attach_group(GroupKind::Direct, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu
        .pin_pages(group, Iova(4 * PG), 2, Prot::WRITE)
        .unwrap();
    assert_eq!(bits(&get(&iommu, 0, 16)), [4, 5]);
}

#[test]
fn second_direct_group_demotes_the_scope_and_detaching_it_promotes_again() {
    // seed000 #64: attach a second IOMMU-backed group that doesn't pin -> all-ones again;
    // detach it -> promoted again
    let iommu = iommu();
    map(&iommu, 0, 16);
    let first = iommu.attach_group(GroupKind::Direct, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu.pin_pages(first, Iova(0), 1, Prot::WRITE).unwrap();
    let second = iommu.attach_group(GroupKind::Direct, 1);
    assert_eq!(get(&iommu, 0, 16), [0xffff]);
    iommu.detach_group(second).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 16)), [0]);
}

#[test]
fn mediated_group_does_not_demote_the_scope() {
    // seed000 #65: attach an mdev group (no IOMMU device) -> scope not demoted (upstream)
    let iommu = iommu();
    map(&iommu, 0, 16);
    iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(get(&iommu, 0, 16), [0]);
}

#[test]
fn get_twice_without_writes_returns_nothing_the_second_time() {
    // digest E11: GET twice without writes in between -> second bitmap all zero
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(PG), &[1]).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 8)), [1]);
    assert_eq!(get(&iommu, 0, 8), [0]);
}

#[test]
fn read_without_clearing_returns_the_same_bits_twice() {
    // digest E12: GET with NO_CLEAR twice -> both return the same bits
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(6 * PG), &[1]).unwrap();
    assert_eq!(bits(&get_mode(&iommu, 0, 8, DirtyRead::Keep)), [6]);
    assert_eq!(bits(&get_mode(&iommu, 0, 8, DirtyRead::Keep)), [6]);
    // digest E13: NO_CLEAR GET -> UNMAP -> the unmap still returns the bits
    let mut bitmap = [0u64; 1];
    iommu
        .unmap_with_dirty_bitmap(Iova(0), 8 * PG, PG, &mut bitmap)
        .unwrap();
    assert_eq!(bits(&bitmap), [6]);
}

#[test]
fn get_covering_several_whole_mappings_succeeds() {
    // seed000 #72: a GET covering A and B exactly succeeds under upstream rules (the rule
    // vmig-dma implements: "whole dmas, clubbing allowed, holes allowed, no bisection")
    let iommu = iommu();
    map(&iommu, 0, 10);
    map(&iommu, 10 * PG, 6);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(9 * PG), &[1]).unwrap();
    iommu.write(Iova(10 * PG), &[1]).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 16)), [9, 10]);
}

#[test]
fn bits_land_at_the_mapping_offset_across_a_hole() {
    // seed000 #71: A=[0,3PG), hole, B=[5PG,70PG); dirty A:1, B:0, B:64; GET [0,70PG) with 16
    // bytes -> bits 1, 5, 69; hole bits 0
    let iommu = iommu();
    map(&iommu, 0, 3);
    map(&iommu, 5 * PG, 65);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    for iova in [PG, 5 * PG, 69 * PG] {
        iommu.pin_pages(group, Iova(iova), 1, Prot::WRITE).unwrap();
    }
    assert_eq!(bits(&get(&iommu, 0, 70)), [1, 5, 69]);
}

#[test]
fn get_bisecting_a_mapping_is_einval() {
    // seed000 #50: map [0,8PG); GET [PG,8PG) -> -EINVAL; GET [0,4PG) -> -EINVAL
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    let mut bitmap = [0u64; 1];
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(PG), 7 * PG, PG, &mut bitmap, DirtyRead::Clear)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), 4 * PG, PG, &mut bitmap, DirtyRead::Clear)),
        libc::EINVAL
    );
}

#[test]
fn get_at_a_page_size_other_than_the_minimum_is_einval() {
    // seed000 #38/#39: pgsize 0, 2PG, 3PG, PG|2M -> -EINVAL (only PGMIN)
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    let mut bitmap = [0u64; 1];
    for pgsize in [0, 2 * PG, 3 * PG, PG | 0x20_0000, 0x20_0000] {
        let r = iommu.get_dirty_bitmap(Iova(0), 8 * PG, pgsize, &mut bitmap, DirtyRead::Clear);
        assert_eq!(errno(r), libc::EINVAL, "pgsize {pgsize:#x}");
    }
}

#[test]
fn get_with_a_too_small_or_too_large_bitmap_is_einval() {
    // seed000 #44-#47: bitmap size 0; 65 pages with 8 bytes; > 256 MiB -> -EINVAL; 16 bytes ok
    let iommu = iommu();
    map(&iommu, 0, 65);
    iommu.start_dirty_tracking().unwrap();
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), 65 * PG, PG, &mut [], DirtyRead::Clear)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), 65 * PG, PG, &mut [0; 1], DirtyRead::Clear)),
        libc::EINVAL
    );
    iommu
        .get_dirty_bitmap(Iova(0), 65 * PG, PG, &mut [0; 2], DirtyRead::Clear)
        .unwrap();
    let mut huge = vec![0u64; usize::try_from(vmig_dma::DIRTY_BITMAP_SIZE_MAX / 8 + 1).unwrap()];
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), 65 * PG, PG, &mut huge, DirtyRead::Clear)),
        libc::EINVAL
    );
}

#[test]
fn bitmap_words_past_the_range_are_left_alone() {
    // The first DIRTY_BITMAP_BYTES(npages) bytes are written, nothing past them.
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    let mut bitmap = [u64::MAX; 3];
    iommu
        .get_dirty_bitmap(Iova(0), 8 * PG, PG, &mut bitmap, DirtyRead::Clear)
        .unwrap();
    assert_eq!(bitmap, [0, u64::MAX, u64::MAX]);
}

// ---- unmap with dirty bitmap ----------------------------------------------------------------

#[test]
fn unmap_with_bitmap_while_tracking_is_off_is_einval_and_unmaps_nothing() {
    // seed000 #76: flag set while tracking is off -> -EINVAL, nothing unmapped
    let iommu = iommu();
    map(&iommu, 0, 8);
    let mut bitmap = [0u64; 1];
    assert_eq!(
        errno(iommu.unmap_with_dirty_bitmap(Iova(0), 8 * PG, PG, &mut bitmap)),
        libc::EINVAL
    );
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn unmap_with_bitmap_refusals_unmap_nothing() {
    // seed000 #77-#79: pgsize != PGMIN, bitmap too small, bisecting -> -EINVAL, nothing unmapped
    let iommu = iommu();
    map(&iommu, 0, 8);
    map(&iommu, 8 * PG, 64);
    iommu.start_dirty_tracking().unwrap();
    let mut one = [0u64; 1];
    assert_eq!(
        errno(iommu.unmap_with_dirty_bitmap(Iova(0), 8 * PG, 2 * PG, &mut one)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap_with_dirty_bitmap(Iova(0), 72 * PG, PG, &mut one)),
        libc::EINVAL
    );
    assert_eq!(
        errno(iommu.unmap_with_dirty_bitmap(Iova(0), 4 * PG, PG, &mut one)),
        libc::EINVAL
    );
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_with_bitmap_places_each_mapping_relative_to_the_unmap_iova() {
    // seed000 #82: unmap of A and B together -> bits for B start at (B.iova - unmap.iova)/PG
    let iommu = iommu();
    map(&iommu, 0x10000, 3);
    map(&iommu, 0x10000 + 3 * PG, 5);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(0x10000 + PG), &[1]).unwrap();
    iommu.write(Iova(0x10000 + 7 * PG), &[1]).unwrap();
    let mut bitmap = [0u64; 1];
    assert_eq!(
        iommu
            .unmap_with_dirty_bitmap(Iova(0x10000), 8 * PG, PG, &mut bitmap)
            .unwrap(),
        8 * PG
    );
    assert_eq!(bits(&bitmap), [1, 7]);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn plain_unmap_while_tracking_discards_the_dirty_state() {
    // seed000 #84: unmap without the flag while tracking -> succeeds; dirty state discarded
    let iommu = iommu();
    map(&iommu, 0, 8);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(0), &[1]).unwrap();
    assert_eq!(
        iommu.unmap(Iova(0), 8 * PG, UnmapScope::Range).unwrap(),
        8 * PG
    );
    map(&iommu, 0, 8);
    assert_eq!(get(&iommu, 0, 8), [0]);
}

#[test]
fn unmap_with_bitmap_of_pinned_pages_reports_them_after_the_notifier_unpins() {
    // seed000 #80: unmap exactly A after pinning page 2: the notifier fires, the vendor unpins,
    // size == A.size, bit 2 set, a later pin in A -> -EINVAL
    let iommu = Arc::new(iommu());
    map(&iommu, 0, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu
        .pin_pages(group, Iova(2 * PG), 1, Prot::WRITE)
        .unwrap();
    let weak = Arc::downgrade(&iommu);
    iommu
        .set_unmap_notifier(
            group,
            Arc::new(move |_| {
                weak.upgrade()
                    .unwrap()
                    .unpin_pages(group, Iova(2 * PG), 1)
                    .unwrap();
            }),
        )
        .unwrap();
    let mut bitmap = [0u64; 1];
    assert_eq!(
        iommu
            .unmap_with_dirty_bitmap(Iova(0), 8 * PG, PG, &mut bitmap)
            .unwrap(),
        8 * PG
    );
    assert_eq!(bits(&bitmap), [2]);
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(2 * PG), 1, Prot::WRITE)),
        libc::EINVAL
    );
}

// ---- the migration capability ----------------------------------------------------------------

#[test]
fn migration_capability_reports_the_minimum_page_and_256_mib() {
    // seed000 #86: pgsize_bitmap == PGMIN (exactly one bit), max_dirty_bitmap_size == 268435456,
    // flags == 0
    let cap = iommu().info().migration;
    assert_eq!(cap.pgsize_bitmap, PG);
    assert_eq!(cap.max_dirty_bitmap_size, 268_435_456);
    assert_eq!(cap.flags, 0);
}

#[test]
fn dirty_tracking_on_a_type1_v1_iommu_is_eacces() {
    // seed000 #29: container type1 (v1), any flags -> -EACCES
    let iommu = iommu_with(|c| c.iommu_type = IommuType::Type1);
    assert_eq!(errno(iommu.start_dirty_tracking()), libc::EACCES);
    assert_eq!(errno(iommu.stop_dirty_tracking()), libc::EACCES);
    assert_eq!(
        errno(iommu.get_dirty_bitmap(Iova(0), PG, PG, &mut [0], DirtyRead::Clear)),
        libc::EACCES
    );
}

// ---- the device's DMA path ------------------------------------------------------------------

#[test]
fn dma_to_unmapped_iova_is_einval_and_to_read_only_is_eperm_and_writes_nothing() {
    // vfio_dma_rw: no dma -> -EINVAL; write to a mapping without WRITE -> -EPERM
    let iommu = iommu();
    let rw = map(&iommu, 0, 1);
    let ro = anon(1);
    iommu
        .map(
            Iova(PG),
            PG,
            Backing::Memory {
                memory: Arc::clone(&ro),
                offset: 0,
            },
            Prot::READ,
        )
        .unwrap();
    assert_eq!(errno(iommu.write(Iova(2 * PG), &[1])), libc::EINVAL);
    assert_eq!(errno(iommu.write(Iova(PG - 2), &[7; 4])), libc::EPERM);
    let mut buf = [0u8; 2];
    rw.read(usize::try_from(PG).unwrap() - 2, &mut buf).unwrap();
    assert_eq!(buf, [0, 0], "a refused write must not land partly");
    assert_eq!(errno(iommu.write(Iova(0), &[])), libc::EINVAL);
    assert_eq!(errno(iommu.read(Iova(u64::MAX), &mut [0; 2])), libc::EINVAL);
}

#[test]
fn dma_write_spanning_two_adjacent_mappings_lands_in_both() {
    let iommu = iommu();
    let a = map(&iommu, 0, 1);
    let b = map(&iommu, PG, 1);
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(PG - 2), &[1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 2];
    a.read(usize::try_from(PG).unwrap() - 2, &mut buf).unwrap();
    assert_eq!(buf, [1, 2]);
    b.read(0, &mut buf).unwrap();
    assert_eq!(buf, [3, 4]);
    assert_eq!(bits(&get(&iommu, 0, 2)), [0, 1]);
}

#[test]
fn host_slices_written_by_the_device_are_marked_dirty() {
    let iommu = iommu();
    map(&iommu, 0, 4);
    iommu.start_dirty_tracking().unwrap();
    iommu
        .with_host_slices(Iova(PG), 2 * PG, Prot::WRITE, |slices| {
            assert_eq!(slices.len(), 1);
            slices[0]
                .write_at(usize::try_from(PG).unwrap(), b"ring")
                .unwrap();
        })
        .unwrap();
    assert_eq!(bits(&get(&iommu, 0, 4)), [1, 2]);
    iommu.mark_dirty(Iova(3 * PG), 1).unwrap();
    assert_eq!(bits(&get(&iommu, 0, 4)), [3]);
    let mut buf = [0u8; 4];
    iommu.read(Iova(2 * PG), &mut buf).unwrap();
    assert_eq!(&buf, b"ring");
}

// ---- memory safety of remapping and teardown --------------------------------------------------

#[test]
fn writable_map_of_read_only_memory_is_eperm() {
    // digest B9: MAP WRITEABLE on read-only user memory -> -EPERM
    let iommu = iommu();
    let fd = memfd("ro", 4 * PG).unwrap();
    let read_only = Arc::new(HostMemory::map_fd(fd.as_fd(), 0, 4 * PG, false).unwrap());
    let backing = Backing::Memory {
        memory: Arc::clone(&read_only),
        offset: 0,
    };
    assert_eq!(
        errno(iommu.map(Iova(0), 4 * PG, backing, Prot::READ_WRITE)),
        libc::EPERM
    );
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let ro_fd = std::fs::File::open(path).unwrap();
    let r = iommu.map(
        Iova(0),
        4 * PG,
        Backing::Fd {
            fd: ro_fd.as_fd(),
            offset: 0,
        },
        Prot::READ_WRITE,
    );
    assert_eq!(errno(r), libc::EPERM);
    // read-only is fine
    iommu
        .map(
            Iova(0),
            4 * PG,
            Backing::Fd {
                fd: ro_fd.as_fd(),
                offset: 0,
            },
            Prot::READ,
        )
        .unwrap();
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn unmap_across_a_page_table_level_boundary_then_remap_succeeds() {
    // digest B22: unmap 1024x4K at pfn 0x3fe00..0x401ff (crosses a level-2 boundary), then
    // remap -> all entries cleared, remap OK, no "already set"
    let iommu = iommu();
    let memory = anon(1);
    for pfn in 0x3fe00..0x40200u64 {
        let backing = Backing::Memory {
            memory: Arc::clone(&memory),
            offset: 0,
        };
        iommu
            .map(Iova(pfn * PG), PG, backing, Prot::READ_WRITE)
            .unwrap();
    }
    assert_eq!(
        iommu
            .unmap(Iova(0x3fe00 * PG), 1024 * PG, UnmapScope::Range)
            .unwrap(),
        1024 * PG
    );
    assert_eq!(iommu.mapping_count(), 0);
    let backing = Backing::Memory { memory, offset: 0 };
    iommu
        .map(Iova(0x3fe00 * PG), PG, backing, Prot::READ_WRITE)
        .unwrap();
}

#[test]
fn remapping_an_iova_to_new_memory_never_reaches_the_old_pages() {
    // digest B23: fixed-IOVA reuse: MAP -> DMA -> UNMAP -> new memory -> MAP same IOVA: no DMA
    // reaches the previous iteration's pages
    let iommu = iommu();
    let mut previous: Option<Arc<HostMemory>> = None;
    for round in 0..200u8 {
        let memory = map(&iommu, 0x4000_0000, 2);
        iommu
            .write(Iova(0x4000_0000 + PG - 1), &[round, round])
            .unwrap();
        if let Some(old) = &previous {
            let mut buf = [0u8; 2];
            old.read(usize::try_from(PG).unwrap() - 1, &mut buf)
                .unwrap();
            assert_eq!(buf, [round - 1; 2], "round {round} reached the old memory");
        }
        iommu
            .unmap(Iova(0x4000_0000), 2 * PG, UnmapScope::Range)
            .unwrap();
        previous = Some(memory);
    }
}

#[test]
fn bitmap_reads_while_groups_attach_and_detach_do_not_deadlock() {
    // seed000 #90: GET concurrent with attach/detach of a group: no stale scope, no deadlock
    let iommu = Arc::new(iommu());
    map(&iommu, 0, 64);
    iommu.start_dirty_tracking().unwrap();
    let churn = {
        let iommu = Arc::clone(&iommu);
        std::thread::spawn(move || {
            for _ in 0..2000 {
                let g = iommu.attach_group(GroupKind::Direct, 1);
                iommu.detach_group(g).unwrap();
            }
        })
    };
    for _ in 0..2000 {
        let words = get(&iommu, 0, 64);
        // Either the direct group was attached (all dirty) or not (nothing written): never a mix.
        assert!(words == [0] || words == [u64::MAX], "{words:x?}");
    }
    churn.join().unwrap();
    assert_eq!(get(&iommu, 0, 64), [0]);
}

#[test]
fn dropping_the_iommu_releases_every_mapping_and_pin() {
    // seed000 #91/#92: container release while tracking, with pinned pages: everything freed
    let iommu = iommu();
    let memory = map(&iommu, 0, 16);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    let pinned = iommu.pin_pages(group, Iova(0), 4, Prot::WRITE).unwrap();
    drop(pinned);
    assert_eq!(Arc::strong_count(&memory), 2);
    drop(iommu);
    assert_eq!(Arc::strong_count(&memory), 1);
}

#[test]
fn device_writes_through_pinned_pages_are_reported_while_pinned() {
    // seed000 §3.1: pinned pages are dirty for as long as they are pinned
    let iommu = iommu();
    let memory = map(&iommu, 0x10000, 8);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu.start_dirty_tracking().unwrap();
    let pinned = iommu
        .pin_pages(group, Iova(0x10000 + 2 * PG), 2, Prot::WRITE)
        .unwrap();
    assert_eq!(
        (
            pinned.len(),
            pinned[0].slice().iova(),
            pinned[0].slice().len()
        ),
        (1, 0x10000 + 2 * PG, 2 * usize::try_from(PG).unwrap())
    );
    pinned[0]
        .slice()
        .write_at(usize::try_from(PG).unwrap() + 8, b"dma")
        .unwrap();
    let mut buf = [0u8; 3];
    memory
        .read(3 * usize::try_from(PG).unwrap() + 8, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"dma");
    assert_eq!(bits(&get(&iommu, 0x10000, 8)), [2, 3]);
    assert_eq!(bits(&get(&iommu, 0x10000, 8)), [2, 3]);
    iommu.unpin_pages(group, Iova(0x10000 + 2 * PG), 2).unwrap();
    assert_eq!(bits(&get(&iommu, 0x10000, 8)), [2, 3]);
    assert_eq!(get(&iommu, 0x10000, 8), [0]);
}

#[test]
fn unmap_all_of_pinned_pages_notifies_the_whole_space_without_overflow() {
    // seed 003: never a 64-bit size for the whole space; the notifier gets [0, u64::MAX]
    let iommu = Arc::new(iommu());
    map(&iommu, 0, 4);
    map(&iommu, u64::MAX - PG + 1, 1);
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    iommu
        .pin_pages(group, Iova(u64::MAX - PG + 1), 1, Prot::READ)
        .unwrap();
    let weak = Arc::downgrade(&iommu);
    iommu
        .set_unmap_notifier(
            group,
            Arc::new(move |range: IovaRange| {
                assert_eq!((range.start, range.last), (0, u64::MAX));
                let iommu = weak.upgrade().unwrap();
                iommu
                    .unpin_pages(group, Iova(u64::MAX - PG + 1), 1)
                    .unwrap();
            }),
        )
        .unwrap();
    assert_eq!(iommu.unmap(Iova(0), 0, UnmapScope::All).unwrap(), 5 * PG);
    assert_eq!(iommu.locked_pages(), 0);
}

#[test]
fn page_sizes_outside_4k_to_1t_are_refused() {
    for pgsize_bitmap in [0, 0x800, 1 << 41] {
        let r = Iommu::new(IommuConfig {
            pgsize_bitmap,
            ..Default::default()
        });
        assert_eq!(errno(r), libc::EINVAL, "{pgsize_bitmap:#x}");
    }
}
