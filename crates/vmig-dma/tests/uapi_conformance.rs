//! Conformance of the raw-ioctl handlers in `vmig_dma::uapi` with the VFIO type1 uAPI.
//!
//! Every request is built the way a kernel user builds it: the `#[repr(C)]` argument structs are
//! serialised with `as_bytes()`, the dirty bitmap lives at a made-up user address resolved
//! through `uapi::UserBuffers`, and every refusal is checked by its errno.
//!
//! References:
//! - `seed000` = `shared/reference/seed000-vfio-migration-kabi.md` (§1 uAPI, §3 semantics,
//!   §5 the numbered test list);
//! - `kernel` = `shared/reference/kernel-vfio-type1-observed.md` (what Linux 6.1 answered;
//!   its errnos are ground truth, except the stale-bits quirk vmig-dma deliberately lacks).

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use vmig_primitives::Iova;

use vmig_dma::uapi::{self, UserBuffers, device_state};
use vmig_dma::uapi::{
    VfioBitmap, VfioDeviceMigrationInfo, VfioInfoCapHeader, VfioIommuType1DirtyBitmap,
    VfioIommuType1DirtyBitmapGet, VfioIommuType1DmaMap, VfioIommuType1DmaUnmap, VfioIommuType1Info,
    VfioIommuType1InfoCapIovaRange, VfioIommuType1InfoCapMigration, VfioIommuType1InfoDmaAvail,
    VfioIovaRange,
};
use vmig_dma::{
    Backing, DmaError, GroupId, GroupKind, Iommu, IommuConfig, IommuType, IovaRange, PIN_PAGES_MAX,
    Prot, UnmapNotifier,
};
use vmig_primitives::HostMemory;
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The minimum IOMMU page size of the default configuration (4 KiB | 2 MiB | 1 GiB).
const PG: u64 = 4096;
/// Where the caller's dirty bitmap sits in its (made-up) address space.
const BITMAP_ADDR: u64 = 0x1000_0000;
/// A user address at which a read-only buffer is placed.
const RO_ADDR: u64 = 0x2000_0000;
/// A valid user address with nothing mapped at it.
const UNMAPPED_ADDR: u64 = 0x3000_0000;
/// A kernel address (x86-64 direct map): fails `access_ok`.
const KERNEL_ADDR: u64 = 0xffff_8880_0000_0000;
/// `DIRTY_BITMAP_SIZE_MAX`: 256 MiB.
const MAX_BITMAP: u64 = 268_435_456;

/// The argsz of GET_BITMAP: header (8) + `vfio_iommu_type1_dirty_bitmap_get` (40).
const GET_ARGSZ: u32 = 48;
/// The argsz of UNMAP + GET_DIRTY_BITMAP: `vfio_iommu_type1_dma_unmap` (24) + `vfio_bitmap` (24).
const UNMAP_BITMAP_ARGSZ: u32 = 48;

const START: u32 = uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_START;
const STOP: u32 = uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP;
const GET: u32 = uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
const UNMAP_GET: u32 = uapi::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
const UNMAP_ALL: u32 = uapi::VFIO_DMA_UNMAP_FLAG_ALL;

/// A type1 v2 IOMMU with the default configuration.
fn v2() -> Iommu {
    Iommu::new(IommuConfig::default()).expect("default IOMMU")
}

/// The configuration of the observed kernel: its two IOVA ranges, type1 v2, 4K|2M|1G pages.
fn kernel_config() -> IommuConfig {
    IommuConfig {
        iova_ranges: vec![
            IovaRange {
                start: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                last: 0x7f_ffff_ffff,
            },
        ],
        ..Default::default()
    }
}

/// Maps `[iova, iova+size)` read/write onto fresh anonymous memory.
fn map(iommu: &Iommu, iova: u64, size: u64) {
    let memory = Arc::new(HostMemory::anonymous(size).expect("anonymous host memory"));
    iommu
        .map(
            Iova(iova),
            size,
            Backing::Memory { memory, offset: 0 },
            Prot::READ_WRITE,
        )
        .unwrap_or_else(|e| panic!("map [{iova:#x}, +{size:#x}): {e}"));
}

/// The errno of a refusal; panics if the call succeeded.
fn errno<T: std::fmt::Debug>(result: Result<T, DmaError>) -> i32 {
    result.expect_err("the call must be refused").errno()
}

/// The bytes of a `VFIO_IOMMU_DIRTY_PAGES` header.
fn dirty_arg(argsz: u32, flags: u32) -> Vec<u8> {
    VfioIommuType1DirtyBitmap { argsz, flags }
        .as_bytes()
        .to_vec()
}

/// `ioctl(VFIO_IOMMU_DIRTY_PAGES)` with a header-only argument and no user memory.
fn dirty_cmd(iommu: &Iommu, argsz: u32, flags: u32) -> Result<(), DmaError> {
    uapi::dirty_pages(iommu, &dirty_arg(argsz, flags), &mut UserBuffers::new())
}

/// START through the ioctl, which must succeed.
fn start(iommu: &Iommu) {
    dirty_cmd(iommu, 8, START).expect("DIRTY_PAGES START");
}

/// STOP through the ioctl, which must succeed.
fn stop(iommu: &Iommu) {
    dirty_cmd(iommu, 8, STOP).expect("DIRTY_PAGES STOP");
}

/// The bytes of a GET_BITMAP request.
fn get_arg(argsz: u32, iova: u64, size: u64, pgsize: u64, bitmap_size: u64, data: u64) -> Vec<u8> {
    let head = VfioIommuType1DirtyBitmap { argsz, flags: GET };
    let get = VfioIommuType1DirtyBitmapGet {
        iova,
        size,
        bitmap: VfioBitmap {
            pgsize,
            size: bitmap_size,
            data,
        },
    };
    [head.as_bytes(), get.as_bytes()].concat()
}

/// A user address space with `len` bytes of `fill` writable at [`BITMAP_ADDR`].
fn user_buffer(len: usize, fill: u8) -> UserBuffers {
    let mut user = UserBuffers::new();
    user.insert(BITMAP_ADDR, vec![fill; len], true);
    user
}

/// The little-endian `u64` words of the user buffer at `addr` (the kernel's `__u64` bitmap on
/// a little-endian host).
fn words_at(user: &UserBuffers, addr: u64) -> Vec<u64> {
    user.get(addr)
        .expect("user buffer")
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("whole words")))
        .collect()
}

/// GET_BITMAP of `[iova, iova+size)` at 4 KiB into a zeroed bitmap of `nwords` words.
fn try_get(iommu: &Iommu, iova: u64, size: u64, nwords: usize) -> Result<Vec<u64>, DmaError> {
    let mut user = user_buffer(nwords * 8, 0);
    let arg = get_arg(GET_ARGSZ, iova, size, PG, nwords as u64 * 8, BITMAP_ADDR);
    uapi::dirty_pages(iommu, &arg, &mut user)?;
    Ok(words_at(&user, BITMAP_ADDR))
}

/// Like [`try_get`], which must succeed.
fn get(iommu: &Iommu, iova: u64, size: u64, nwords: usize) -> Vec<u64> {
    try_get(iommu, iova, size, nwords)
        .unwrap_or_else(|e| panic!("GET_BITMAP [{iova:#x}, +{size:#x}): {e}"))
}

/// GET_BITMAP with an arbitrary bitmap description and user memory.
fn get_raw(
    iommu: &Iommu,
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap_size: u64,
    data: u64,
    user: &mut UserBuffers,
) -> Result<(), DmaError> {
    uapi::dirty_pages(
        iommu,
        &get_arg(GET_ARGSZ, iova, size, pgsize, bitmap_size, data),
        user,
    )
}

/// The bytes of a `VFIO_IOMMU_UNMAP_DMA` request, with a `vfio_bitmap` when given.
fn unmap_arg(argsz: u32, flags: u32, iova: u64, size: u64, bitmap: Option<VfioBitmap>) -> Vec<u8> {
    let mut arg = VfioIommuType1DmaUnmap {
        argsz,
        flags,
        iova,
        size,
    }
    .as_bytes()
    .to_vec();
    if let Some(bitmap) = bitmap {
        arg.extend_from_slice(bitmap.as_bytes());
    }
    arg
}

/// The `size` field of an unmap argument (the bytes unmapped, after a successful call).
fn unmap_size(arg: &[u8]) -> u64 {
    VfioIommuType1DmaUnmap::read_from_prefix(arg)
        .expect("unmap argument")
        .0
        .size
}

/// UNMAP + GET_DIRTY_BITMAP of `[iova, iova+size)` with a zeroed bitmap of `nwords` words;
/// returns the bytes unmapped and the bitmap.
fn try_unmap_bitmap(
    iommu: &Iommu,
    iova: u64,
    size: u64,
    nwords: usize,
) -> Result<(u64, Vec<u64>), DmaError> {
    let mut user = user_buffer(nwords * 8, 0);
    let bitmap = VfioBitmap {
        pgsize: PG,
        size: nwords as u64 * 8,
        data: BITMAP_ADDR,
    };
    let mut arg = unmap_arg(UNMAP_BITMAP_ARGSZ, UNMAP_GET, iova, size, Some(bitmap));
    uapi::unmap_dma(iommu, &mut arg, &mut user)?;
    Ok((unmap_size(&arg), words_at(&user, BITMAP_ADDR)))
}

/// Plain UNMAP (or with other flags) without a bitmap; returns the bytes unmapped.
fn try_unmap_plain(iommu: &Iommu, flags: u32, iova: u64, size: u64) -> Result<u64, DmaError> {
    let mut arg = unmap_arg(24, flags, iova, size, None);
    uapi::unmap_dma(iommu, &mut arg, &mut UserBuffers::new())?;
    Ok(unmap_size(&arg))
}

/// UNMAP with an explicit argument, checking the mapping table is untouched when it fails.
fn unmap_refused(iommu: &Iommu, arg: &[u8], user: &mut UserBuffers) -> i32 {
    let before = iommu.mappings();
    let mut arg = arg.to_vec();
    let original = arg.clone();
    let e = errno(uapi::unmap_dma(iommu, &mut arg, user));
    assert_eq!(
        iommu.mappings(),
        before,
        "a refused unmap must unmap nothing"
    );
    assert_eq!(
        arg, original,
        "a refused unmap must not write its argument back"
    );
    e
}

/// A notifier that unpins, for `group`, every page of the range the unmap asks about.
fn unpinning_notifier(
    iommu: &Arc<Iommu>,
    group: GroupId,
    calls: Arc<AtomicUsize>,
) -> UnmapNotifier {
    let weak = Arc::downgrade(iommu);
    Arc::new(move |range: IovaRange| {
        calls.fetch_add(1, Ordering::SeqCst);
        let Some(iommu) = weak.upgrade() else { return };
        unpin_range(&iommu, group, range.start, range.last - range.start + 1);
    })
}

fn unpin_range(iommu: &Iommu, group: GroupId, iova: u64, size: u64) {
    let mut cur = iova;
    let mut left = size / PG;
    while left > 0 {
        let n = left.min(PIN_PAGES_MAX);
        iommu
            .unpin_pages(group, Iova(cur), n)
            .expect("unpin in the notifier");
        cur += n * PG;
        left -= n;
    }
}

/// `ioctl(VFIO_IOMMU_GET_INFO)` with `argsz` in an argument buffer of `buf_len` bytes prefilled
/// with `fill`; returns the result and the buffer.
fn get_info_call(
    iommu: &Iommu,
    argsz: u32,
    buf_len: usize,
    fill: u8,
) -> (Result<(), DmaError>, Vec<u8>) {
    let mut arg = vec![fill; buf_len];
    let n = buf_len.min(8);
    arg[..n].copy_from_slice(
        &VfioIommuType1Info {
            argsz,
            flags: 0,
            ..Default::default()
        }
        .as_bytes()[..n],
    );
    let result = uapi::get_info(iommu, &mut arg);
    (result, arg)
}

fn read_at<T: FromBytes>(buf: &[u8], offset: usize) -> T {
    T::read_from_prefix(&buf[offset..])
        .expect("struct inside the buffer")
        .0
}

// ---------------------------------------------------------------------------------------------
// §5.1 uAPI and layout
// ---------------------------------------------------------------------------------------------

#[test]
fn migration_info_is_32_bytes_with_seed_offsets() {
    // seed000 §5.1 #1: sizeof(vfio_device_migration_info) == 32; offsets 0/4/8/16/24
    assert_eq!(size_of::<VfioDeviceMigrationInfo>(), 32);
    assert_eq!(offset_of!(VfioDeviceMigrationInfo, device_state), 0);
    assert_eq!(offset_of!(VfioDeviceMigrationInfo, reserved), 4);
    assert_eq!(offset_of!(VfioDeviceMigrationInfo, pending_bytes), 8);
    assert_eq!(offset_of!(VfioDeviceMigrationInfo, data_offset), 16);
    assert_eq!(offset_of!(VfioDeviceMigrationInfo, data_size), 24);
}

#[test]
fn ioctl_numbers_and_flag_values_match_the_uapi() {
    // seed000 §5.1 #2 / §1.1: DIRTY_PAGES == 0x3B75, START/STOP/GET = 1/2/4, GET_DIRTY_BITMAP == 1,
    // region type/subtype = 3/1, cap id = 2
    assert_eq!(uapi::VFIO_TYPE, 0x3B);
    assert_eq!(uapi::VFIO_BASE, 100);
    assert_eq!(uapi::VFIO_IOMMU_DIRTY_PAGES, 0x3B75);
    assert_eq!(uapi::VFIO_IOMMU_UNMAP_DMA, 0x3B72);
    assert_eq!(uapi::VFIO_IOMMU_GET_INFO, 0x3B70);
    assert_eq!(uapi::VFIO_DEVICE_RESET, 0x3B6F);
    assert_eq!(uapi::VFIO_IOMMU_MAP_DMA, 0x3B71);
    assert_eq!(START, 1);
    assert_eq!(STOP, 2);
    assert_eq!(GET, 4);
    assert_eq!(UNMAP_GET, 1);
    assert_eq!(UNMAP_ALL, 2);
    assert_eq!(uapi::VFIO_DMA_UNMAP_FLAG_VADDR, 4);
    assert_eq!(uapi::VFIO_REGION_TYPE_MIGRATION, 3);
    assert_eq!(uapi::VFIO_REGION_SUBTYPE_MIGRATION, 1);
    assert_eq!(uapi::VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 2);
    assert_eq!(uapi::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1);
    assert_eq!(uapi::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 3);
    assert_eq!(uapi::VFIO_IOMMU_INFO_PGSIZES, 1);
    assert_eq!(uapi::VFIO_IOMMU_INFO_CAPS, 2);
    assert_eq!(uapi::VFIO_TYPE1_IOMMU, 1);
    assert_eq!(uapi::VFIO_TYPE1V2_IOMMU, 3);
    assert_eq!(device_state::STOP, 0);
    assert_eq!(device_state::RUNNING, 1);
    assert_eq!(device_state::SAVING, 2);
    assert_eq!(device_state::RESUMING, 4);
    assert_eq!(device_state::MASK, 7);
    assert_eq!(device_state::ERROR, 6);
    assert_eq!(vmig_dma::DIRTY_BITMAP_SIZE_MAX, MAX_BITMAP);
}

#[test]
fn upstream_struct_sizes_on_lp64() {
    // seed000 §5.1 #3: sizeof dirty_bitmap 8, dirty_bitmap_get 40, vfio_bitmap 24, dma_unmap 24,
    // info_cap_migration 32
    assert_eq!(size_of::<VfioIommuType1DirtyBitmap>(), 8);
    assert_eq!(offset_of!(VfioIommuType1DirtyBitmap, argsz), 0);
    assert_eq!(offset_of!(VfioIommuType1DirtyBitmap, flags), 4);

    assert_eq!(size_of::<VfioIommuType1DirtyBitmapGet>(), 40);
    assert_eq!(offset_of!(VfioIommuType1DirtyBitmapGet, iova), 0);
    assert_eq!(offset_of!(VfioIommuType1DirtyBitmapGet, size), 8);
    assert_eq!(offset_of!(VfioIommuType1DirtyBitmapGet, bitmap), 16);

    assert_eq!(size_of::<VfioBitmap>(), 24);
    assert_eq!(offset_of!(VfioBitmap, pgsize), 0);
    assert_eq!(offset_of!(VfioBitmap, size), 8);
    assert_eq!(offset_of!(VfioBitmap, data), 16);

    assert_eq!(size_of::<VfioIommuType1DmaUnmap>(), 24);
    assert_eq!(offset_of!(VfioIommuType1DmaUnmap, argsz), 0);
    assert_eq!(offset_of!(VfioIommuType1DmaUnmap, flags), 4);
    assert_eq!(offset_of!(VfioIommuType1DmaUnmap, iova), 8);
    assert_eq!(offset_of!(VfioIommuType1DmaUnmap, size), 16);

    // §1.5: header 0-7, flags 8-11, pad 12-15, pgsize_bitmap 16, max 24; size 32.
    assert_eq!(size_of::<VfioIommuType1InfoCapMigration>(), 32);
    assert_eq!(offset_of!(VfioIommuType1InfoCapMigration, header), 0);
    assert_eq!(offset_of!(VfioIommuType1InfoCapMigration, flags), 8);
    assert_eq!(
        offset_of!(VfioIommuType1InfoCapMigration, pgsize_bitmap),
        16
    );
    assert_eq!(
        offset_of!(VfioIommuType1InfoCapMigration, max_dirty_bitmap_size),
        24
    );

    // The rest of the GET_INFO chain, as the kernel lays it out (offsets 24/56/68 in the log).
    assert_eq!(size_of::<VfioIommuType1Info>(), 24);
    assert_eq!(offset_of!(VfioIommuType1Info, iova_pgsizes), 8);
    assert_eq!(offset_of!(VfioIommuType1Info, cap_offset), 16);
    assert_eq!(size_of::<VfioInfoCapHeader>(), 8);
    assert_eq!(offset_of!(VfioInfoCapHeader, next), 4);
    assert_eq!(size_of::<VfioIommuType1InfoDmaAvail>(), 12);
    assert_eq!(size_of::<VfioIommuType1InfoCapIovaRange>(), 16);
    assert_eq!(size_of::<VfioIovaRange>(), 16);
    assert_eq!(size_of::<VfioIommuType1DmaMap>(), 32);
}

#[test]
fn device_state_valid_truth_table() {
    // seed000 §5.1 #4: VFIO_DEVICE_STATE_VALID over 0..7 matches the §1.2 table; VALID(0x8|4) == 1
    let expected = [true, true, true, true, true, false, false, false];
    for (state, &valid) in expected.iter().enumerate() {
        assert_eq!(
            device_state::is_valid(u32::try_from(state).unwrap()),
            valid,
            "VALID({state:#05b})"
        );
        // Reserved bits are ignored.
        assert_eq!(
            device_state::is_valid(0x8 | u32::try_from(state).unwrap()),
            valid,
            "VALID(0x8|{state})"
        );
        assert_eq!(
            device_state::is_valid(0x8000_0000 | u32::try_from(state).unwrap()),
            valid
        );
    }
    assert!(device_state::is_valid(0x8 | 4));
    // An argument `a|b` gives the parenthesised result.
    assert!(!device_state::is_valid(
        device_state::RESUMING | device_state::RUNNING
    ));
    assert!(device_state::is_valid(
        device_state::RUNNING | device_state::SAVING
    ));
}

#[test]
fn device_state_is_error_and_set_error_are_parenthesised() {
    // seed000 §5.1 #4: IS_ERROR(6) == 1, IS_ERROR(7) == 0, IS_ERROR(0x8|6) == 1, SET_ERROR(0x8|1) == 0xE
    assert!(device_state::is_error(6));
    assert!(!device_state::is_error(7));
    assert!(device_state::is_error(0x8 | 6));
    for state in [0, 1, 2, 3, 4, 5, 7] {
        assert!(!device_state::is_error(state), "IS_ERROR({state})");
    }
    assert!(device_state::is_error(
        device_state::SAVING | device_state::RESUMING
    ));
    assert_eq!(device_state::set_error(0x8 | 1), 0xE);
    assert_eq!(
        device_state::set_error(device_state::RUNNING),
        device_state::ERROR
    );
    assert_eq!(device_state::set_error(0xffff_fff8), 0xffff_fffe);
    assert!(device_state::is_error(device_state::set_error(0x8 | 3)));
}

// ---------------------------------------------------------------------------------------------
// §5.5 DIRTY_PAGES argument validation
// ---------------------------------------------------------------------------------------------

#[test]
fn dirty_pages_on_type1_v1_container_is_eacces() {
    // seed000 §5.5 #29: container type1 (v1), any flags -> -EACCES
    let iommu = Iommu::new(IommuConfig {
        iommu_type: IommuType::Type1,
        ..Default::default()
    })
    .expect("type1 IOMMU");
    let mut user = user_buffer(8, 0);
    for flags in [START, STOP, GET, 0, 3, 8] {
        assert_eq!(
            errno(dirty_cmd(&iommu, 8, flags)),
            libc::EACCES,
            "flags {flags:#x}"
        );
    }
    let arg = get_arg(GET_ARGSZ, 0, PG, PG, 8, BITMAP_ADDR);
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &arg, &mut user)),
        libc::EACCES
    );
    // Even an argument the kernel would fault on: the v2 check comes first.
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &[], &mut user)),
        libc::EACCES
    );
    assert!(!iommu.is_tracking());
}

#[test]
fn dirty_pages_argsz_7_is_einval() {
    // seed000 §5.5 #30: argsz = 7 -> -EINVAL
    let iommu = v2();
    for flags in [START, STOP, GET] {
        assert_eq!(errno(dirty_cmd(&iommu, 7, flags)), libc::EINVAL);
    }
    assert!(!iommu.is_tracking());
}

#[test]
fn dirty_pages_flags_0_is_einval() {
    // seed000 §5.5 #31: flags = 0 -> -EINVAL
    let iommu = v2();
    assert_eq!(errno(dirty_cmd(&iommu, 8, 0)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 48, 0)), libc::EINVAL);
}

#[test]
fn dirty_pages_unknown_flag_8_is_einval() {
    // seed000 §5.5 #32: flags = 8 -> -EINVAL
    let iommu = v2();
    assert_eq!(errno(dirty_cmd(&iommu, 8, 8)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 8, 8 | START)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 8, 1 << 31)), libc::EINVAL);
    assert!(!iommu.is_tracking());
}

#[test]
fn dirty_pages_multiple_flags_are_einval() {
    // seed000 §5.5 #33: flags = 3, 5, 6 or 7 -> -EINVAL
    let iommu = v2();
    for flags in [3, 5, 6, 7] {
        assert_eq!(
            errno(dirty_cmd(&iommu, 48, flags)),
            libc::EINVAL,
            "flags {flags}"
        );
        assert!(
            !iommu.is_tracking(),
            "flags {flags} must not start tracking"
        );
    }
    start(&iommu);
    for flags in [3, 6, 7] {
        assert_eq!(
            errno(dirty_cmd(&iommu, 48, flags)),
            libc::EINVAL,
            "flags {flags}"
        );
        assert!(iommu.is_tracking(), "flags {flags} must not stop tracking");
    }
}

#[test]
fn dirty_pages_unreadable_argument_is_efault() {
    // seed000 §5.5 #34: arg pointer NULL or unmapped -> -EFAULT (modelled by a too-short argument)
    let iommu = v2();
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &[], &mut user)),
        libc::EFAULT
    );
    assert_eq!(
        errno(uapi::dirty_pages(
            &iommu,
            &dirty_arg(8, START)[..7],
            &mut user
        )),
        libc::EFAULT
    );
    assert!(!iommu.is_tracking());
    // GET whose argsz promises the dirty_bitmap_get but whose memory ends after the header.
    start(&iommu);
    let arg = get_arg(GET_ARGSZ, 0, PG, PG, 8, BITMAP_ADDR);
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &arg[..8], &mut user)),
        libc::EFAULT
    );
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &arg[..47], &mut user)),
        libc::EFAULT
    );
}

#[test]
fn dirty_pages_start_with_argsz_8_succeeds() {
    // seed000 §5.5 #35: START with argsz == 8 (no trailing fields) -> 0 (upstream)
    let iommu = v2();
    uapi::dirty_pages(&iommu, &dirty_arg(8, START), &mut UserBuffers::new()).expect("START");
    assert!(iommu.is_tracking());
    uapi::dirty_pages(&iommu, &dirty_arg(8, STOP), &mut UserBuffers::new()).expect("STOP");
    assert!(!iommu.is_tracking());
}

#[test]
fn get_bitmap_argsz_47_is_einval() {
    // seed000 §5.5 #36: GET with argsz = 47 -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    for argsz in [8, 40, 47] {
        let arg = get_arg(argsz, 0, 4 * PG, PG, 8, BITMAP_ADDR);
        assert_eq!(
            errno(uapi::dirty_pages(&iommu, &arg, &mut user)),
            libc::EINVAL,
            "argsz {argsz}"
        );
    }
    let arg = get_arg(48, 0, 4 * PG, PG, 8, BITMAP_ADDR);
    uapi::dirty_pages(&iommu, &arg, &mut user).expect("argsz 48 is enough");
}

#[test]
fn get_bitmap_while_tracking_off_is_einval() {
    // seed000 §5.5 #37: GET while tracking is off -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    assert_eq!(errno(try_get(&iommu, 0, 4 * PG, 1)), libc::EINVAL);
    start(&iommu);
    get(&iommu, 0, 4 * PG, 1);
    stop(&iommu);
    assert_eq!(errno(try_get(&iommu, 0, 4 * PG, 1)), libc::EINVAL);
}

#[test]
fn get_bitmap_pgsize_0_is_einval() {
    // seed000 §5.5 #38: GET with pgsize = 0 -> -EINVAL (no __ffs(0))
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(&iommu, 0, 4 * PG, 0, 8, BITMAP_ADDR, &mut user)),
        libc::EINVAL
    );
}

#[test]
fn get_bitmap_pgsize_other_than_minimum_is_einval() {
    // seed000 §5.5 #39: GET with pgsize = 2·PG or 3·PG, or PG|2M -> -EINVAL (only PGMIN)
    let iommu = v2();
    map(&iommu, 0, 16 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    for pgsize in [2 * PG, 3 * PG, PG | 0x20_0000, 0x20_0000] {
        assert_eq!(
            errno(get_raw(
                &iommu,
                0,
                16 * PG,
                pgsize,
                8,
                BITMAP_ADDR,
                &mut user
            )),
            libc::EINVAL,
            "pgsize {pgsize:#x}"
        );
    }
}

#[test]
fn get_bitmap_unaligned_iova_is_einval() {
    // seed000 §5.5 #40: GET with iova = PG/2 -> -EINVAL
    let iommu = v2();
    start(&iommu);
    assert_eq!(errno(try_get(&iommu, PG / 2, PG, 1)), libc::EINVAL);
}

#[test]
fn get_bitmap_size_0_is_einval() {
    // seed000 §5.5 #41: GET with size = 0 -> -EINVAL
    let iommu = v2();
    start(&iommu);
    assert_eq!(errno(try_get(&iommu, 0, 0, 1)), libc::EINVAL);
}

#[test]
fn get_bitmap_unaligned_size_is_einval() {
    // seed000 §5.5 #42: GET with size = PG+1 -> -EINVAL
    let iommu = v2();
    start(&iommu);
    assert_eq!(errno(try_get(&iommu, 0, PG + 1, 1)), libc::EINVAL);
}

#[test]
fn get_bitmap_wrapping_range_is_einval() {
    // seed000 §5.5 #43: GET with iova = 2^64-PG and size = 2·PG (wrap) -> -EINVAL
    let iommu = v2();
    start(&iommu);
    assert_eq!(
        errno(try_get(&iommu, 0u64.wrapping_sub(PG), 2 * PG, 1)),
        libc::EINVAL
    );
}

#[test]
fn get_bitmap_size_0_bitmap_is_einval() {
    // seed000 §5.5 #44: GET with bitmap.size = 0 -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(&iommu, 0, 4 * PG, PG, 0, BITMAP_ADDR, &mut user)),
        libc::EINVAL
    );
}

#[test]
fn get_bitmap_one_page_needs_8_bytes() {
    // seed000 §5.5 #45: GET for npages = 1 with bitmap.size = 1 -> -EINVAL (DIRTY_BITMAP_BYTES(1) = 8)
    let iommu = v2();
    map(&iommu, 0, PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    for size in [1, 4, 7] {
        assert_eq!(
            errno(get_raw(&iommu, 0, PG, PG, size, BITMAP_ADDR, &mut user)),
            libc::EINVAL,
            "bitmap.size {size}"
        );
    }
    get_raw(&iommu, 0, PG, PG, 8, BITMAP_ADDR, &mut user).expect("8 bytes hold one page");
}

#[test]
fn get_bitmap_65_pages_need_16_bytes() {
    // seed000 §5.5 #46: GET for npages = 65 with bitmap.size = 8 -> -EINVAL; with 16 -> ok
    let iommu = v2();
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, 0, 65 * PG);
    start(&iommu);
    let mut user = user_buffer(16, 0);
    assert_eq!(
        errno(get_raw(&iommu, 0, 65 * PG, PG, 8, BITMAP_ADDR, &mut user)),
        libc::EINVAL
    );
    get_raw(&iommu, 0, 65 * PG, PG, 16, BITMAP_ADDR, &mut user).expect("16 bytes hold 65 pages");
    assert_eq!(words_at(&user, BITMAP_ADDR), vec![u64::MAX, 1]);
}

#[test]
fn get_bitmap_larger_than_max_dirty_bitmap_size_is_einval() {
    // seed000 §5.5 #47: GET with bitmap.size = 256 MiB + 8 -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(
            &iommu,
            0,
            4 * PG,
            PG,
            MAX_BITMAP + 8,
            BITMAP_ADDR,
            &mut user
        )),
        libc::EINVAL
    );
    // The limit itself is accepted: only DIRTY_BITMAP_BYTES(npages) are written.
    get_raw(&iommu, 0, 4 * PG, PG, MAX_BITMAP, BITMAP_ADDR, &mut user).expect("size == max");
}

#[test]
fn get_bitmap_kernel_address_is_einval() {
    // seed000 §5.5 #48: GET with bitmap.data = a kernel address, or a range not access_ok -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(&iommu, 0, 4 * PG, PG, 8, KERNEL_ADDR, &mut user)),
        libc::EINVAL
    );
    assert_eq!(
        errno(get_raw(
            &iommu,
            0,
            4 * PG,
            PG,
            8,
            uapi::TASK_SIZE_MAX,
            &mut user
        )),
        libc::EINVAL
    );
    // Starts in user space but ends past it.
    assert_eq!(
        errno(get_raw(
            &iommu,
            0,
            4 * PG,
            PG,
            16,
            uapi::TASK_SIZE_MAX - 8,
            &mut user
        )),
        libc::EINVAL
    );
}

#[test]
fn get_bitmap_unmapped_or_read_only_user_memory_is_efault() {
    // seed000 §5.5 #49: GET with bitmap.data = a valid user VA that is unmapped or read-only -> -EFAULT
    let iommu = v2();
    map(&iommu, 0, 4 * PG);
    start(&iommu);
    iommu.write(Iova(2 * PG), &[1]).expect("device write");
    let mut user = UserBuffers::new();
    user.insert(RO_ADDR, vec![0; 8], false);
    user.insert(BITMAP_ADDR, vec![0; 4], true); // shorter than the 8 bytes needed
    for data in [UNMAPPED_ADDR, RO_ADDR, BITMAP_ADDR] {
        assert_eq!(
            errno(get_raw(&iommu, 0, 4 * PG, PG, 8, data, &mut user)),
            libc::EFAULT,
            "bitmap at {data:#x}"
        );
    }
    assert_eq!(
        user.get(RO_ADDR),
        Some(&[0u8; 8][..]),
        "a read-only bitmap is not written"
    );
    // The faulting reads consumed nothing: the dirty page is still reported.
    assert_eq!(get(&iommu, 0, 4 * PG, 1), vec![1 << 2]);
}

#[test]
fn get_bitmap_bisecting_a_mapping_is_einval() {
    // seed000 §5.5 #50: map [0, 8PG), then GET [PG, 8PG) -> -EINVAL, and GET [0, 4PG) -> -EINVAL
    let iommu = v2();
    map(&iommu, 0, 8 * PG);
    start(&iommu);
    assert_eq!(errno(try_get(&iommu, PG, 7 * PG, 1)), libc::EINVAL);
    assert_eq!(errno(try_get(&iommu, 0, 4 * PG, 1)), libc::EINVAL);
    get(&iommu, 0, 8 * PG, 1);
}

#[test]
fn get_bitmap_over_range_without_mappings_succeeds_and_leaves_the_bitmap_unchanged() {
    // seed000 §5.5 #51: GET over a range with no mappings at all -> 0, and the bitmap is unchanged
    let iommu = v2();
    map(&iommu, 0x10_0000, 4 * PG);
    start(&iommu);
    let mut user = user_buffer(16, 0xAA);
    get_raw(&iommu, 0x40_0000, 4 * PG, PG, 16, BITMAP_ADDR, &mut user).expect("GET of a hole");
    assert_eq!(user.get(BITMAP_ADDR).expect("bitmap"), &[0xAA; 16]);
    // As in Linux, nothing is copied, so not even a NULL bitmap faults.
    get_raw(&iommu, 0x40_0000, 4 * PG, PG, 16, 0, &mut user).expect("GET of a hole, NULL bitmap");
}

// ---------------------------------------------------------------------------------------------
// §5.6 START/STOP lifecycle
// ---------------------------------------------------------------------------------------------

#[test]
fn dirty_pages_start_twice_returns_0_with_one_set_of_bitmaps() {
    // seed000 §5.6 #52: START, START -> both 0 (idempotent); exactly one set of bitmaps exists
    // The bitmap memory limit leaves room for exactly two 8-byte bitmaps: if the second START had
    // allocated again, the map below could not get its bitmap.
    let iommu = Iommu::new(IommuConfig {
        dirty_bitmap_memory_limit: 16,
        ..Default::default()
    })
    .expect("IOMMU");
    map(&iommu, 0, 4 * PG);
    dirty_cmd(&iommu, 8, START).expect("first START");
    dirty_cmd(&iommu, 8, START).expect("second START");
    assert!(iommu.is_tracking());
    map(&iommu, 0x10_0000, 4 * PG);
    let more = Arc::new(HostMemory::anonymous(PG).expect("memory"));
    let e = iommu
        .map(
            Iova(0x20_0000),
            PG,
            Backing::Memory {
                memory: more,
                offset: 0,
            },
            Prot::READ_WRITE,
        )
        .expect_err("a third bitmap exceeds the limit");
    assert_eq!(e.errno(), libc::ENOMEM);
}

#[test]
fn dirty_pages_stop_is_idempotent() {
    // seed000 §5.6 #53: STOP without START -> 0; START, STOP, STOP -> 0 (no double free)
    let iommu = Iommu::new(IommuConfig {
        dirty_bitmap_memory_limit: 8,
        ..Default::default()
    })
    .expect("IOMMU");
    map(&iommu, 0, 4 * PG);
    dirty_cmd(&iommu, 8, STOP).expect("STOP without START");
    assert!(!iommu.is_tracking());
    dirty_cmd(&iommu, 8, START).expect("START");
    dirty_cmd(&iommu, 8, STOP).expect("STOP");
    dirty_cmd(&iommu, 8, STOP).expect("STOP while stopped");
    assert!(!iommu.is_tracking());
    // The bitmaps were freed exactly once: a new START fits the 8-byte limit again.
    dirty_cmd(&iommu, 8, START).expect("START after STOP, STOP");
    assert!(iommu.is_tracking());
}

// ---------------------------------------------------------------------------------------------
// §5.8 Bit placement across multiple dmas
// ---------------------------------------------------------------------------------------------

#[test]
fn get_bitmap_two_adjacent_dmas_fill_word_0() {
    // seed000 §5.8 #69: A = [0, 10PG), B = [10PG, 16PG), all dirty -> bytes FF FF 00 00 00 00 00 00
    let iommu = v2();
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, 0, 10 * PG);
    map(&iommu, 10 * PG, 6 * PG);
    start(&iommu);
    let mut user = user_buffer(8, 0);
    get_raw(&iommu, 0, 16 * PG, PG, 8, BITMAP_ADDR, &mut user).expect("GET A+B");
    assert_eq!(
        user.get(BITMAP_ADDR),
        Some(&[0xFF, 0xFF, 0, 0, 0, 0, 0, 0][..])
    );
}

#[test]
fn get_bitmap_hole_bits_are_overwritten_not_preserved() {
    // seed000 §5.8 #70: B = [3PG, 10PG) all dirty, GET [0, 10PG): zeroed buffer -> only bits 3-9
    // vmig-dma deliberately overwrites hole bits (uapi.rs "Deliberate differences"), so the user's
    // garbage in bits 0-2 does not survive as it does in the kernel: a prefilled buffer also gives
    // exactly the mapped bits.
    let iommu = v2();
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, 3 * PG, 7 * PG);
    start(&iommu);
    assert_eq!(get(&iommu, 0, 10 * PG, 1), vec![0x3F8]);
    let mut user = user_buffer(8, 0xFF);
    get_raw(&iommu, 0, 10 * PG, PG, 8, BITMAP_ADDR, &mut user).expect("GET hole+B");
    assert_eq!(words_at(&user, BITMAP_ADDR), vec![0x3F8]);
}

#[test]
fn get_bitmap_places_pinned_pages_across_a_hole() {
    // seed000 §5.8 #71: A = [0, 3PG), hole, B = [5PG, 70PG); pin A:1, B:0, B:64 -> bits 1, 5, 69
    let iommu = v2();
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    map(&iommu, 0, 3 * PG);
    map(&iommu, 5 * PG, 65 * PG);
    start(&iommu);
    for iova in [PG, 5 * PG, 69 * PG] {
        iommu
            .pin_pages(group, Iova(iova), 1, Prot::READ_WRITE)
            .expect("pin");
    }
    assert_eq!(
        get(&iommu, 0, 70 * PG, 2),
        vec![(1 << 1) | (1 << 5), 1 << 5]
    );
}

#[test]
fn get_bitmap_covering_two_whole_dmas_succeeds() {
    // seed000 §5.8 #72: a GET covering A and B exactly succeeds under upstream rules (chosen here)
    let iommu = v2();
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, 0, 3 * PG);
    map(&iommu, 3 * PG, 5 * PG);
    start(&iommu);
    assert_eq!(get(&iommu, 0, 8 * PG, 1), vec![0xFF]);
}

#[test]
fn get_bitmap_large_unaligned_shift_crosses_words() {
    // seed000 §5.8 #73: A = [0, 63PG), B = [63PG, 193PG), all dirty -> bits 0..192 set, 193+ clear
    let iommu = v2();
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, 0, 63 * PG);
    map(&iommu, 63 * PG, 130 * PG);
    start(&iommu);
    let mut user = user_buffer(32, 0x55);
    get_raw(&iommu, 0, 193 * PG, PG, 32, BITMAP_ADDR, &mut user).expect("GET A+B");
    assert_eq!(
        words_at(&user, BITMAP_ADDR),
        vec![u64::MAX, u64::MAX, u64::MAX, 1]
    );
}

// ---------------------------------------------------------------------------------------------
// §5.9 UNMAP_DMA + GET_DIRTY_BITMAP
// ---------------------------------------------------------------------------------------------

/// A type1 v2 IOMMU with A = [0x100000, +8 pages) and B = [0x108000, +4 pages), tracking on.
fn unmap_fixture() -> Iommu {
    let iommu = v2();
    map(&iommu, 0x10_0000, 8 * PG);
    map(&iommu, 0x10_8000, 4 * PG);
    start(&iommu);
    iommu
}

fn bitmap(pgsize: u64, size: u64, data: u64) -> Option<VfioBitmap> {
    Some(VfioBitmap { pgsize, size, data })
}

#[test]
fn unmap_bitmap_with_unmap_all_or_unknown_flags_is_einval() {
    // seed000 §5.9 #74: flags = 2 (unknown in v12) -> -EINVAL; UNMAP_ALL with GET_DIRTY_BITMAP -> -EINVAL
    let iommu = unmap_fixture();
    let mut user = user_buffer(8, 0);
    let b = bitmap(PG, 8, BITMAP_ADDR);
    let arg = unmap_arg(48, UNMAP_GET | UNMAP_ALL, 0, 0, b);
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    let arg = unmap_arg(48, UNMAP_GET | UNMAP_ALL, 0x10_0000, 8 * PG, b);
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    let arg = unmap_arg(
        48,
        UNMAP_GET | uapi::VFIO_DMA_UNMAP_FLAG_VADDR,
        0x10_0000,
        8 * PG,
        b,
    );
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    // Unknown flag bits.
    for flags in [8, UNMAP_GET | 8, 1 << 31] {
        let arg = unmap_arg(48, flags, 0x10_0000, 8 * PG, b);
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "flags {flags:#x}"
        );
    }
    // UNMAP_ALL alone takes iova 0 and size 0.
    let arg = unmap_arg(24, UNMAP_ALL, 0x10_0000, 8 * PG, None);
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bitmap_with_argsz_24_is_einval() {
    // seed000 §5.9 #75: GET_DIRTY_BITMAP with argsz = 24 -> -EINVAL (upstream needs >= 48)
    let iommu = unmap_fixture();
    let mut user = user_buffer(8, 0);
    for argsz in [24, 47] {
        let arg = unmap_arg(
            argsz,
            UNMAP_GET,
            0x10_0000,
            8 * PG,
            bitmap(PG, 8, BITMAP_ADDR),
        );
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "argsz {argsz}"
        );
    }
    // argsz 24 with no vfio_bitmap in memory at all.
    let arg = unmap_arg(24, UNMAP_GET, 0x10_0000, 8 * PG, None);
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bitmap_while_tracking_off_is_einval() {
    // seed000 §5.9 #76: the flag set while tracking is off -> -EINVAL, and nothing is unmapped
    let iommu = unmap_fixture();
    stop(&iommu);
    let mut user = user_buffer(8, 0);
    let arg = unmap_arg(48, UNMAP_GET, 0x10_0000, 8 * PG, bitmap(PG, 8, BITMAP_ADDR));
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bitmap_pgsize_other_than_minimum_is_einval() {
    // seed000 §5.9 #77: bitmap.pgsize != PGMIN -> -EINVAL, and nothing is unmapped
    let iommu = unmap_fixture();
    let mut user = user_buffer(8, 0);
    for pgsize in [2 * PG, 3 * PG, 0, 0x20_0000] {
        let arg = unmap_arg(
            48,
            UNMAP_GET,
            0x10_0000,
            8 * PG,
            bitmap(pgsize, 8, BITMAP_ADDR),
        );
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "pgsize {pgsize:#x}"
        );
    }
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bitmap_too_small_is_einval() {
    // seed000 §5.9 #78: bitmap.size too small -> -EINVAL, and nothing is unmapped
    let iommu = unmap_fixture();
    let mut user = user_buffer(8, 0);
    for size in [0, 1, 4, 7] {
        let arg = unmap_arg(
            48,
            UNMAP_GET,
            0x10_0000,
            8 * PG,
            bitmap(PG, size, BITMAP_ADDR),
        );
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "bitmap.size {size}"
        );
    }
    let arg = unmap_arg(
        48,
        UNMAP_GET,
        0x10_0000,
        8 * PG,
        bitmap(PG, MAX_BITMAP + 8, BITMAP_ADDR),
    );
    assert_eq!(unmap_refused(&iommu, &arg, &mut user), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bisecting_a_dma_is_einval() {
    // seed000 §5.9 #79: unmap bisecting a dma -> -EINVAL
    let iommu = unmap_fixture();
    let mut user = user_buffer(8, 0);
    // Starts inside A; ends inside A; ends inside B.
    for (iova, size) in [
        (0x10_1000, 7 * PG),
        (0x10_0000, 4 * PG),
        (0x10_0000, 10 * PG),
    ] {
        let arg = unmap_arg(48, UNMAP_GET, iova, size, bitmap(PG, 8, BITMAP_ADDR));
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "[{iova:#x}, +{size:#x})"
        );
        // The plain v2 unmap never splits a mapping either.
        let arg = unmap_arg(24, 0, iova, size, None);
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "[{iova:#x}, +{size:#x})"
        );
    }
    assert_eq!(iommu.mapping_count(), 2);
}

#[test]
fn unmap_bitmap_of_pinned_dma_notifies_and_reports_the_pinned_page() {
    // seed000 §5.9 #80: unmap A after pinning page 2: the notifier unpins; size == A.size; bit 2
    // set; a later pin in A -> -EINVAL
    let iommu = Arc::new(v2());
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    iommu
        .set_unmap_notifier(group, unpinning_notifier(&iommu, group, Arc::clone(&calls)))
        .expect("notifier");
    map(&iommu, 0x10_0000, 8 * PG);
    start(&iommu);
    iommu
        .pin_pages(group, Iova(0x10_2000), 1, Prot::READ_WRITE)
        .expect("pin page 2");
    assert_eq!(iommu.locked_pages(), 1);

    let (size, words) = try_unmap_bitmap(&iommu, 0x10_0000, 8 * PG, 1).expect("unmap A");
    assert_eq!(size, 8 * PG);
    assert_eq!(words, vec![1 << 2]);
    assert!(
        calls.load(Ordering::SeqCst) >= 1,
        "the unmap notifier must fire"
    );
    assert_eq!(iommu.mapping_count(), 0);
    assert_eq!(iommu.locked_pages(), 0);
    assert_eq!(
        errno(iommu.pin_pages(group, Iova(0x10_2000), 1, Prot::READ_WRITE)),
        libc::EINVAL
    );
}

#[test]
fn unmap_bitmap_reports_a_pin_that_races_with_the_unmap() {
    // seed000 §5.9 #81: a pin of page 4 racing with the unmap either fails or is reported; a lost
    // dirty page must never occur
    // Deterministic model first: the vendor pins page 4 while the unmap has dropped its lock to
    // notify (the window Alex describes in §3.5); the unmap must retry and report both pages.
    let iommu = Arc::new(v2());
    let group = iommu.attach_group(GroupKind::Mediated, 1);
    let weak = Arc::downgrade(&iommu);
    let raced = Arc::new(AtomicBool::new(false));
    let raced_in = Arc::clone(&raced);
    iommu
        .set_unmap_notifier(
            group,
            Arc::new(move |range: IovaRange| {
                let Some(iommu) = weak.upgrade() else { return };
                unpin_range(&iommu, group, range.start, range.last - range.start + 1);
                if !raced_in.swap(true, Ordering::SeqCst) {
                    iommu
                        .pin_pages(group, Iova(0x10_4000), 1, Prot::READ_WRITE)
                        .expect("a pin racing in while the lock is dropped");
                }
            }),
        )
        .expect("notifier");
    map(&iommu, 0x10_0000, 8 * PG);
    start(&iommu);
    iommu
        .pin_pages(group, Iova(0x10_2000), 1, Prot::READ_WRITE)
        .expect("pin page 2");
    let (size, words) = try_unmap_bitmap(&iommu, 0x10_0000, 8 * PG, 1).expect("unmap A");
    assert!(raced.load(Ordering::SeqCst));
    assert_eq!(size, 8 * PG);
    assert_eq!(words, vec![(1 << 2) | (1 << 4)]);
    assert_eq!(iommu.locked_pages(), 0);

    // Then a real race, a bounded number of times: whenever the pin succeeds, bit 4 is reported.
    for _ in 0..64 {
        let iommu = Arc::new(v2());
        let group = iommu.attach_group(GroupKind::Mediated, 1);
        let calls = Arc::new(AtomicUsize::new(0));
        iommu
            .set_unmap_notifier(group, unpinning_notifier(&iommu, group, calls))
            .expect("notifier");
        map(&iommu, 0x10_0000, 8 * PG);
        start(&iommu);
        let barrier = Barrier::new(2);
        let (pin, unmapped) = std::thread::scope(|s| {
            let pinner = s.spawn(|| {
                barrier.wait();
                iommu
                    .pin_pages(group, Iova(0x10_4000), 1, Prot::READ_WRITE)
                    .map(|_| ())
            });
            barrier.wait();
            let unmapped = try_unmap_bitmap(&iommu, 0x10_0000, 8 * PG, 1).expect("unmap A");
            (pinner.join().expect("pinner thread"), unmapped)
        });
        assert_eq!(unmapped.0, 8 * PG);
        match pin {
            Ok(()) => assert_eq!(
                unmapped.1,
                vec![1 << 4],
                "a successful pin must be reported"
            ),
            Err(e) => {
                assert_eq!(
                    e.errno(),
                    libc::EINVAL,
                    "the pin may only fail because A is gone"
                );
                assert_eq!(unmapped.1, vec![0]);
            }
        }
        assert_eq!(iommu.locked_pages(), 0);
    }
}

#[test]
fn unmap_bitmap_of_two_dmas_places_b_at_its_offset() {
    // seed000 §5.9 #82: unmap of A and B together -> B's bits start at (B.iova - unmap.iova)/PG
    let iommu = unmap_fixture();
    iommu.write(Iova(0x10_1000), &[1]).expect("write A page 1");
    iommu
        .write(Iova(0x10_8000 + 3 * PG), &[1])
        .expect("write B page 3");
    let (size, words) = try_unmap_bitmap(&iommu, 0x10_0000, 12 * PG, 1).expect("unmap A+B");
    assert_eq!(size, 12 * PG);
    assert_eq!(words, vec![(1 << 1) | (1 << (8 + 3))]);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn unmap_bitmap_unwritable_is_efault_and_unmaps_nothing() {
    // seed000 §5.9 #83: bitmap.data unwritable but access_ok -> -EFAULT
    // vmig-dma's documented §3.5 choice: the bitmap is checked first, so NOTHING is unmapped and
    // `size` is not written back; the dirty bits stay for the next harvest.
    let iommu = unmap_fixture();
    iommu.write(Iova(0x10_1000), &[1]).expect("write A page 1");
    let mut user = UserBuffers::new();
    user.insert(RO_ADDR, vec![0; 8], false);
    for data in [UNMAPPED_ADDR, RO_ADDR] {
        let arg = unmap_arg(48, UNMAP_GET, 0x10_0000, 12 * PG, bitmap(PG, 8, data));
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EFAULT,
            "bitmap at {data:#x}"
        );
    }
    assert_eq!(iommu.mapping_count(), 2);
    assert_eq!(user.get(RO_ADDR), Some(&[0u8; 8][..]));
    let (size, words) = try_unmap_bitmap(&iommu, 0x10_0000, 12 * PG, 1).expect("unmap A+B");
    assert_eq!(size, 12 * PG);
    assert_eq!(words, vec![1 << 1], "the refused unmaps lost no dirty page");
}

#[test]
fn plain_unmap_while_tracking_succeeds_and_discards_dirty_state() {
    // seed000 §5.9 #84: unmap without the flag while tracking -> succeeds; the dirty state is discarded
    let iommu = unmap_fixture();
    iommu.write(Iova(0x10_1000), &[1]).expect("write A page 1");
    assert_eq!(
        try_unmap_plain(&iommu, 0, 0x10_0000, 8 * PG).expect("plain unmap"),
        8 * PG
    );
    assert_eq!(iommu.mapping_count(), 1);
    map(&iommu, 0x10_0000, 8 * PG);
    assert_eq!(get(&iommu, 0x10_0000, 8 * PG, 1), vec![0]);
}

// ---------------------------------------------------------------------------------------------
// §5.10 GET_INFO capability
// ---------------------------------------------------------------------------------------------

#[test]
fn get_info_with_argsz_24_asks_for_more() {
    // seed000 §5.10 #85: argsz = sizeof(info) -> flags has CAPS, returned argsz > input, cap_offset = 0
    let iommu = v2();
    let (result, arg) = get_info_call(&iommu, 24, 64, 0xEE);
    result.expect("GET_INFO");
    let info: VfioIommuType1Info = read_at(&arg, 0);
    assert_ne!(info.flags & uapi::VFIO_IOMMU_INFO_CAPS, 0);
    assert_ne!(info.flags & uapi::VFIO_IOMMU_INFO_PGSIZES, 0);
    assert!(info.argsz > 24, "argsz {} must grow", info.argsz);
    assert_eq!(info.cap_offset, 0);
    assert_eq!(info.iova_pgsizes, 0x4020_1000);
    assert_eq!(
        &arg[24..],
        &[0xEE; 40],
        "no capability is written past argsz"
    );
}

#[test]
fn get_info_capability_chain_has_migration_dma_avail_and_iova_ranges() {
    // seed000 §5.10 #86: with a large argsz the chain has id 2 v1, pgsize_bitmap == PGMIN,
    // max_dirty_bitmap_size == 268435456, flags == 0
    let iommu = v2();
    map(&iommu, 0x10_0000, PG);
    map(&iommu, 0x20_0000, PG);
    let (result, arg) = get_info_call(&iommu, 4096, 4096, 0);
    result.expect("GET_INFO");
    let info: VfioIommuType1Info = read_at(&arg, 0);
    assert_eq!(info.argsz, 4096, "a large enough argsz is left alone");
    assert_eq!(
        info.flags,
        uapi::VFIO_IOMMU_INFO_PGSIZES | uapi::VFIO_IOMMU_INFO_CAPS
    );
    assert_eq!(info.cap_offset, 24);

    let mig: VfioIommuType1InfoCapMigration = read_at(&arg, 24);
    assert_eq!((mig.header.id, mig.header.version), (2, 1));
    assert_eq!(mig.flags, 0);
    assert_eq!(mig.pgsize_bitmap, PG);
    assert_eq!(mig.pgsize_bitmap.count_ones(), 1);
    assert_eq!(mig.max_dirty_bitmap_size, MAX_BITMAP);
    assert_eq!(mig.header.next, 56);

    let avail: VfioIommuType1InfoDmaAvail = read_at(&arg, 56);
    assert_eq!((avail.header.id, avail.header.version), (3, 1));
    assert_eq!(avail.avail, 65535 - 2);
    assert_eq!(avail.header.next, 68);

    let ranges: VfioIommuType1InfoCapIovaRange = read_at(&arg, 68);
    assert_eq!((ranges.header.id, ranges.header.version), (1, 1));
    assert_eq!(ranges.header.next, 0, "IOVA_RANGE ends the chain");
    assert_eq!(ranges.nr_iovas, 1);
    let range: VfioIovaRange = read_at(&arg, 84);
    assert_eq!((range.start, range.end), (0, u64::MAX));
}

#[test]
fn get_info_with_old_abi_argsz_16_succeeds_and_writes_only_16_bytes() {
    // seed000 §1.1 argsz convention: the kernel copies minsz = offsetofend(iova_pgsizes) = 16, so
    // argsz 16 (the pre-capability struct) is valid and only min(argsz, sizeof(info)) bytes are
    // copied back (vfio_iommu_type1_get_info: copy_to_user(arg, &info, minsz)).
    let iommu = v2();
    // Below minsz: EINVAL.
    assert_eq!(errno(get_info_call(&iommu, 15, 24, 0).0), libc::EINVAL);
    // Both cases are checked before asserting, so a failure names every deviation.
    let mut problems = Vec::new();
    // A 24-byte argument whose argsz says 16: bytes 16..24 are not the caller's and must survive.
    let (result, arg) = get_info_call(&iommu, 16, 24, 0xEE);
    match result {
        Err(e) => problems.push(format!("argsz 16 in 24 bytes: {e}")),
        Ok(()) => {
            let info: VfioIommuType1Info = read_at(&arg, 0);
            let flags = uapi::VFIO_IOMMU_INFO_PGSIZES | uapi::VFIO_IOMMU_INFO_CAPS;
            if (info.argsz, info.flags, info.iova_pgsizes) != (100, flags, 0x4020_1000) {
                problems.push(format!("argsz 16 in 24 bytes: wrong header {info:?}"));
            }
            if arg[16..24] != [0xEE; 8] {
                problems.push(format!(
                    "argsz 16 in 24 bytes: bytes 16..24 past argsz were overwritten with {:02x?}",
                    &arg[16..24]
                ));
            }
        }
    }
    // A caller whose whole structure is the 16-byte pre-capability one.
    let (result, arg) = get_info_call(&iommu, 16, 16, 0);
    match result {
        Err(e) => problems.push(format!("argsz 16 in a 16-byte argument: {e}")),
        Ok(()) => {
            let argsz = u32::from_le_bytes(arg[..4].try_into().expect("argsz"));
            if argsz != 100 {
                problems.push(format!(
                    "argsz 16 in a 16-byte argument: argsz {argsz}, expected 100"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn get_info_on_type1_v1_container_still_reports_migration_cap() {
    // seed000 §3.10 GET_INFO: "always emit cap id 2, version 1" (the kernel's
    // vfio_iommu_migration_build_caps() runs for v1 containers too)
    let iommu = Iommu::new(IommuConfig {
        iommu_type: IommuType::Type1,
        ..Default::default()
    })
    .expect("type1 IOMMU");
    let (result, arg) = get_info_call(&iommu, 4096, 4096, 0);
    result.expect("GET_INFO");
    let info: VfioIommuType1Info = read_at(&arg, 0);
    assert_eq!(info.cap_offset, 24);
    let mig: VfioInfoCapHeader = read_at(&arg, 24);
    assert_eq!((mig.id, mig.version), (2, 1), "first capability");
}

// ---------------------------------------------------------------------------------------------
// kernel-vfio-type1-observed.md: what Linux 6.1 answered
// ---------------------------------------------------------------------------------------------

const A: (u64, u64) = (0x10_0000, 3 * PG);
const B: (u64, u64) = (0x10_3000, 5 * PG);
const C: (u64, u64) = (0x20_0000, 2 * PG);
const D: (u64, u64) = (0x100_0000, 32 << 20);
const E: (u64, u64) = (0x50_0000, 4 * PG);

/// The observed container: vfio-pci's non-pinning group attached (every mapped page dirty),
/// A, B, C, D mapped, START, then E mapped while tracking.
fn kernel_scenario() -> Iommu {
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    iommu.attach_group(GroupKind::Direct, 1);
    for (iova, size) in [A, B, C, D] {
        map(&iommu, iova, size);
    }
    start(&iommu);
    map(&iommu, E.0, E.1);
    iommu
}

#[test]
fn kernel_get_info_first_call_asks_for_argsz_116() {
    // kernel: a first GET_INFO with argsz=24 returns flags=0x3 and asks for argsz=116
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    let (result, arg) = get_info_call(&iommu, 24, 24, 0);
    result.expect("GET_INFO");
    let info: VfioIommuType1Info = read_at(&arg, 0);
    assert_eq!(info.flags, 0x3);
    assert_eq!(info.argsz, 116);
    assert_eq!(info.cap_offset, 0);
    assert_eq!(info.iova_pgsizes, 0x4020_1000);
}

#[test]
fn kernel_get_info_full_call_gives_the_observed_chain() {
    // kernel: iova_pgsizes=0x40201000, cap_offset=24; MIGRATION at 24 (flags 0, pgsize 0x1000,
    // max 268435456), DMA_AVAIL at 56 (65535), IOVA_RANGE at 68 ([0, 0xfedfffff], [0xfef00000, 0x7fffffffff])
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    let (result, arg) = get_info_call(&iommu, 116, 116, 0);
    result.expect("GET_INFO");
    let info: VfioIommuType1Info = read_at(&arg, 0);
    assert_eq!(info.argsz, 116);
    assert_eq!(info.flags, 0x3);
    assert_eq!(info.iova_pgsizes, 0x4020_1000);
    assert_eq!(info.cap_offset, 24);
    let mig: VfioIommuType1InfoCapMigration = read_at(&arg, 24);
    assert_eq!(
        (mig.header.id, mig.header.version, mig.header.next),
        (uapi::VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1, 56)
    );
    assert_eq!(
        (mig.flags, mig.pgsize_bitmap, mig.max_dirty_bitmap_size),
        (0, 0x1000, MAX_BITMAP)
    );
    let avail: VfioIommuType1InfoDmaAvail = read_at(&arg, 56);
    assert_eq!(
        (avail.header.id, avail.header.next, avail.avail),
        (uapi::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 68, 65535)
    );
    let ranges: VfioIommuType1InfoCapIovaRange = read_at(&arg, 68);
    assert_eq!(
        (ranges.header.id, ranges.header.next, ranges.nr_iovas),
        (uapi::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 0, 2)
    );
    let r0: VfioIovaRange = read_at(&arg, 84);
    let r1: VfioIovaRange = read_at(&arg, 100);
    assert_eq!((r0.start, r0.end), (0, 0xfedf_ffff));
    assert_eq!((r1.start, r1.end), (0xfef0_0000, 0x7f_ffff_ffff));
}

#[test]
fn kernel_start_twice_and_stop_while_stopped_return_0() {
    // kernel: a second START returns 0; STOP while stopped returns 0
    let iommu = kernel_scenario();
    dirty_cmd(&iommu, 8, START).expect("second START");
    stop(&iommu);
    dirty_cmd(&iommu, 8, STOP).expect("STOP while stopped");
}

#[test]
fn kernel_get_bitmap_b_alone_is_0x1f() {
    // kernel: GET_BITMAP B alone -> 0x1f
    assert_eq!(get(&kernel_scenario(), B.0, B.1, 1), vec![0x1f]);
}

#[test]
fn kernel_get_bitmap_a_alone_is_0x7() {
    // kernel: GET_BITMAP A -> 0x7
    assert_eq!(get(&kernel_scenario(), A.0, A.1, 1), vec![0x7]);
}

#[test]
fn kernel_get_bitmap_a_plus_b_is_0xff() {
    // kernel: A+B (two adjacent mappings, B at bit 3) -> 0xff
    assert_eq!(get(&kernel_scenario(), A.0, A.1 + B.1, 1), vec![0xff]);
}

#[test]
fn kernel_get_bitmap_a_to_c_across_a_hole() {
    // kernel: A..C across a hole (258 pages, 5 u64s) -> word0 bits 0-7, words 1-3 = 0, word4 = 0x3
    let iommu = kernel_scenario();
    let size = C.0 + C.1 - A.0;
    assert_eq!(size / PG, 258);
    assert_eq!(get(&iommu, A.0, size, 5), vec![0xff, 0, 0, 0, 0x3]);
}

#[test]
fn kernel_get_bitmap_unmapped_range_is_all_zero() {
    // kernel: an unmapped range -> success with an all-zero bitmap
    assert_eq!(get(&kernel_scenario(), 0x30_0000, 8 * PG, 1), vec![0]);
}

#[test]
fn kernel_get_bitmap_hole_plus_c_is_0xc() {
    // kernel: "hole+C" (C at bit 2) -> 0xc
    assert_eq!(get(&kernel_scenario(), 0x1f_e000, 4 * PG, 1), vec![0xc]);
}

#[test]
fn kernel_get_bitmap_d_32mib_is_8192_ones() {
    // kernel: 32 MiB D -> all 8192 bits set
    assert_eq!(get(&kernel_scenario(), D.0, D.1, 128), vec![u64::MAX; 128]);
}

#[test]
fn kernel_get_bitmap_e_mapped_while_tracking_is_0xf() {
    // kernel: a mapping added during tracking (E) -> 0xf
    assert_eq!(get(&kernel_scenario(), E.0, E.1, 1), vec![0xf]);
}

#[test]
fn kernel_get_bitmap_repeated_read_still_all_ones() {
    // kernel: a repeated read still returns all ones (vfio-pci: every mapped page always dirty)
    let iommu = kernel_scenario();
    assert_eq!(get(&iommu, D.0, D.1, 128), vec![u64::MAX; 128]);
    assert_eq!(get(&iommu, D.0, D.1, 128), vec![u64::MAX; 128]);
    assert_eq!(get(&iommu, A.0, A.1 + B.1, 1), vec![0xff]);
    assert_eq!(get(&iommu, A.0, A.1 + B.1, 1), vec![0xff]);
}

#[test]
fn kernel_device_write_to_one_page_of_c_reports_both_pages() {
    // kernel: edu DMA of 256 bytes to IOVA 0x201100; GET_BITMAP(C) still returns 0x3 (non-pinned group)
    let iommu = kernel_scenario();
    iommu
        .write(Iova(0x20_1100), &[0x5a; 256])
        .expect("device write");
    assert_eq!(get(&iommu, C.0, C.1, 1), vec![0x3]);
}

#[test]
fn kernel_unmap_with_bitmap_a_plus_b() {
    // kernel: UNMAP_DMA + GET_DIRTY_BITMAP (argsz 48) A+B -> size 0x8000, bits 0-7
    let iommu = kernel_scenario();
    let (size, words) = try_unmap_bitmap(&iommu, A.0, A.1 + B.1, 1).expect("unmap A+B");
    assert_eq!(size, 0x8000);
    assert_eq!(words, vec![0xff]);
    assert_eq!(iommu.mapping_count(), 3);
}

#[test]
fn kernel_unmap_with_bitmap_hole_plus_c() {
    // kernel: UNMAP_DMA + GET_DIRTY_BITMAP hole+C -> size 0x2000, bits 2-3
    let iommu = kernel_scenario();
    let (size, words) = try_unmap_bitmap(&iommu, 0x1f_e000, 4 * PG, 1).expect("unmap hole+C");
    assert_eq!(size, 0x2000);
    assert_eq!(words, vec![0xc]);
    assert_eq!(iommu.mapping_count(), 4);
}

#[test]
fn kernel_unmap_with_bitmap_d_after_stop_and_restart_is_all_ones() {
    // kernel: 32 MiB D after STOP and a new START -> all ones
    let iommu = kernel_scenario();
    stop(&iommu);
    start(&iommu);
    let (size, words) = try_unmap_bitmap(&iommu, D.0, D.1, 128).expect("unmap D");
    assert_eq!(size, D.1);
    assert_eq!(words, vec![u64::MAX; 128]);
}

#[test]
fn kernel_plain_unmap_while_tracking_is_allowed() {
    // kernel: a plain UNMAP (no bitmap) while tracking is allowed
    let iommu = kernel_scenario();
    assert_eq!(
        try_unmap_plain(&iommu, 0, E.0, E.1).expect("plain unmap"),
        E.1
    );
    assert_eq!(iommu.mapping_count(), 4);
}

#[test]
fn kernel_after_stop_get_and_unmap_with_bitmap_are_einval() {
    // kernel: after STOP, GET_BITMAP and UNMAP+GET_DIRTY_BITMAP fail with EINVAL
    let iommu = kernel_scenario();
    stop(&iommu);
    assert_eq!(errno(try_get(&iommu, A.0, A.1, 1)), libc::EINVAL);
    assert_eq!(errno(try_unmap_bitmap(&iommu, A.0, A.1, 1)), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 5);
}

#[test]
fn kernel_type1_v1_start_is_eacces() {
    // kernel: a type1 v1 container (VFIO_TYPE1_IOMMU): DIRTY_PAGES START -> EACCES
    let mut config = kernel_config();
    config.iommu_type = IommuType::Type1;
    let iommu = Iommu::new(config).expect("type1 IOMMU");
    assert_eq!(errno(dirty_cmd(&iommu, 8, START)), libc::EACCES);
}

// kernel "Rejected inputs" table, one test per row.

#[test]
fn kernel_rejects_get_bitmap_while_tracking_stopped() {
    // kernel row: GET_BITMAP while tracking is stopped (before START or after STOP) -> EINVAL
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    iommu.attach_group(GroupKind::Direct, 1);
    map(&iommu, A.0, A.1);
    assert_eq!(errno(try_get(&iommu, A.0, A.1, 1)), libc::EINVAL);
    start(&iommu);
    stop(&iommu);
    assert_eq!(errno(try_get(&iommu, A.0, A.1, 1)), libc::EINVAL);
}

#[test]
fn kernel_rejects_unmap_with_bitmap_while_tracking_stopped() {
    // kernel row: UNMAP+GET_DIRTY_BITMAP while tracking is stopped -> EINVAL
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    map(&iommu, A.0, A.1);
    assert_eq!(errno(try_unmap_bitmap(&iommu, A.0, A.1, 1)), libc::EINVAL);
    start(&iommu);
    stop(&iommu);
    assert_eq!(errno(try_unmap_bitmap(&iommu, A.0, A.1, 1)), libc::EINVAL);
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn kernel_rejects_get_bitmap_pgsize_8192_2m_or_0() {
    // kernel row: GET_BITMAP with pgsize 8192, 2M, or 0 -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(1024, 0);
    for pgsize in [8192, 0x20_0000, 0] {
        assert_eq!(
            errno(get_raw(
                &iommu,
                D.0,
                D.1,
                pgsize,
                1024,
                BITMAP_ADDR,
                &mut user
            )),
            libc::EINVAL,
            "pgsize {pgsize:#x}"
        );
    }
}

#[test]
fn kernel_rejects_get_bitmap_size_4_for_3_pages_or_0() {
    // kernel row: GET_BITMAP bitmap.size 4 bytes for 3 pages (u64 granularity), or size 0 -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    for size in [4, 0] {
        assert_eq!(
            errno(get_raw(&iommu, A.0, A.1, PG, size, BITMAP_ADDR, &mut user)),
            libc::EINVAL,
            "bitmap.size {size}"
        );
    }
}

#[test]
fn kernel_rejects_get_bitmap_258_pages_with_32_bytes() {
    // kernel row: GET_BITMAP 258 pages with a 32-byte bitmap -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(40, 0);
    let size = C.0 + C.1 - A.0;
    assert_eq!(
        errno(get_raw(&iommu, A.0, size, PG, 32, BITMAP_ADDR, &mut user)),
        libc::EINVAL
    );
}

#[test]
fn kernel_rejects_get_bitmap_above_max_dirty_bitmap_size() {
    // kernel row: GET_BITMAP bitmap.size > max_dirty_bitmap_size -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    for size in [MAX_BITMAP + 8, MAX_BITMAP * 2, u64::MAX / 2] {
        assert_eq!(
            errno(get_raw(&iommu, A.0, A.1, PG, size, BITMAP_ADDR, &mut user)),
            libc::EINVAL,
            "bitmap.size {size:#x}"
        );
    }
}

#[test]
fn kernel_rejects_get_bitmap_range_splitting_a_mapping() {
    // kernel row: GET_BITMAP range starts inside a mapping, or ends inside one -> EINVAL
    let iommu = kernel_scenario();
    assert_eq!(
        errno(try_get(&iommu, A.0 + PG, A.1 - PG + B.1, 1)),
        libc::EINVAL
    );
    assert_eq!(errno(try_get(&iommu, A.0, A.1 + B.1 - PG, 1)), libc::EINVAL);
    assert_eq!(errno(try_get(&iommu, D.0 + PG, 16 * PG, 1)), libc::EINVAL);
}

#[test]
fn kernel_rejects_get_bitmap_unaligned_empty_or_overflowing_range() {
    // kernel row: GET_BITMAP iova or size not page-aligned, size 0, iova+size overflows -> EINVAL
    let iommu = kernel_scenario();
    assert_eq!(errno(try_get(&iommu, A.0 + 0x800, A.1, 1)), libc::EINVAL);
    assert_eq!(errno(try_get(&iommu, A.0, A.1 + 0x800, 1)), libc::EINVAL);
    assert_eq!(errno(try_get(&iommu, A.0, 0, 1)), libc::EINVAL);
    assert_eq!(
        errno(try_get(&iommu, u64::MAX - PG + 1, 2 * PG, 1)),
        libc::EINVAL
    );
}

#[test]
fn kernel_rejects_get_bitmap_argsz_without_dirty_bitmap_get() {
    // kernel row: GET_BITMAP argsz too short to hold vfio_iommu_type1_dirty_bitmap_get -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    for argsz in [8, 16, 47] {
        let arg = get_arg(argsz, A.0, A.1, PG, 8, BITMAP_ADDR);
        assert_eq!(
            errno(uapi::dirty_pages(&iommu, &arg, &mut user)),
            libc::EINVAL,
            "argsz {argsz}"
        );
    }
}

#[test]
fn kernel_rejects_get_bitmap_null_data_with_efault() {
    // kernel row: GET_BITMAP bitmap.data = NULL -> EFAULT
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(&iommu, A.0, A.1, PG, 8, 0, &mut user)),
        libc::EFAULT
    );
}

#[test]
fn kernel_rejects_get_bitmap_kernel_address_with_einval() {
    // kernel row: GET_BITMAP bitmap.data = kernel address (fails access_ok) -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    assert_eq!(
        errno(get_raw(&iommu, A.0, A.1, PG, 8, KERNEL_ADDR, &mut user)),
        libc::EINVAL
    );
}

#[test]
fn kernel_rejects_bad_dirty_pages_flags_and_argsz_4() {
    // kernel row: DIRTY_PAGES START|STOP together, flags=0, unknown flag 1<<3, argsz=4 -> EINVAL
    let iommu = Iommu::new(kernel_config()).expect("IOMMU");
    assert_eq!(errno(dirty_cmd(&iommu, 8, START | STOP)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 8, 0)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 8, 1 << 3)), libc::EINVAL);
    assert_eq!(errno(dirty_cmd(&iommu, 4, START)), libc::EINVAL);
    assert!(!iommu.is_tracking());
}

#[test]
fn kernel_rejects_bad_unmap_with_bitmap_requests() {
    // kernel row: UNMAP+GET_DIRTY_BITMAP with pgsize 8192, bitmap.size 4, a range splitting a
    // mapping, combined with FLAG_ALL, or argsz without the vfio_bitmap -> EINVAL
    let iommu = kernel_scenario();
    let mut user = user_buffer(8, 0);
    let ab = A.1 + B.1;
    let cases = [
        (
            "pgsize 8192",
            unmap_arg(48, UNMAP_GET, A.0, ab, bitmap(8192, 8, BITMAP_ADDR)),
        ),
        (
            "bitmap.size 4",
            unmap_arg(48, UNMAP_GET, A.0, ab, bitmap(PG, 4, BITMAP_ADDR)),
        ),
        (
            "splits A",
            unmap_arg(48, UNMAP_GET, A.0 + PG, ab - PG, bitmap(PG, 8, BITMAP_ADDR)),
        ),
        (
            "with FLAG_ALL",
            unmap_arg(48, UNMAP_GET | UNMAP_ALL, 0, 0, bitmap(PG, 8, BITMAP_ADDR)),
        ),
        (
            "argsz 24",
            unmap_arg(24, UNMAP_GET, A.0, ab, bitmap(PG, 8, BITMAP_ADDR)),
        ),
    ];
    for (what, arg) in cases {
        assert_eq!(
            unmap_refused(&iommu, &arg, &mut user),
            libc::EINVAL,
            "{what}"
        );
    }
    assert_eq!(iommu.mapping_count(), 5);
}

#[test]
fn kernel_rejects_dirty_pages_on_type1_v1_with_eacces() {
    // kernel row: DIRTY_PAGES on a type1 v1 container -> EACCES
    let mut config = kernel_config();
    config.iommu_type = IommuType::Type1;
    let iommu = Iommu::new(config).expect("type1 IOMMU");
    map(&iommu, A.0, A.1);
    let mut user = user_buffer(8, 0);
    for flags in [START, STOP] {
        assert_eq!(errno(dirty_cmd(&iommu, 8, flags)), libc::EACCES);
    }
    let arg = get_arg(GET_ARGSZ, A.0, A.1, PG, 8, BITMAP_ADDR);
    assert_eq!(
        errno(uapi::dirty_pages(&iommu, &arg, &mut user)),
        libc::EACCES
    );
}

// ---------------------------------------------------------------------------------------------
// Check order (seed000 §3.10)
// ---------------------------------------------------------------------------------------------

#[test]
fn get_bitmap_einval_checks_take_precedence_over_bitmap_fault() {
    // seed000 §3.10 GET_BITMAP, checks in order: pgsize (8), tracking (10) and bisection (11) are
    // -EINVAL before the copy-out (12) can fault; the kernel never touches a NULL bitmap it
    // refuses for another reason.
    let iommu = v2();
    map(&iommu, 0, 8 * PG);
    let mut user = UserBuffers::new();
    // Tracking off.
    assert_eq!(
        errno(get_raw(&iommu, 0, 8 * PG, PG, 8, 0, &mut user)),
        libc::EINVAL
    );
    start(&iommu);
    // pgsize is not the minimum.
    assert_eq!(
        errno(get_raw(&iommu, 0, 8 * PG, 2 * PG, 8, 0, &mut user)),
        libc::EINVAL
    );
    // The range bisects the mapping.
    assert_eq!(
        errno(get_raw(&iommu, 0, 4 * PG, PG, 8, 0, &mut user)),
        libc::EINVAL
    );
}
