//! The kernel's VFIO type1 uAPI: ioctl numbers, flags and structs with the exact C layouts of
//! `include/uapi/linux/vfio.h`, and handlers that take a request as the raw argument bytes and
//! answer as `drivers/vfio/vfio_iommu_type1.c` does: the same `argsz` and flag rules, the same
//! checks in the same order, the same errno.
//!
//! User pointers (the dirty bitmap's `data`) are resolved through [`UserMemory`], which stands
//! for the calling process's address space: an address past [`TASK_SIZE_MAX`] fails `access_ok`
//! (`EINVAL`), an address that is not mapped writable faults (`EFAULT`).
//!
//! Deliberate differences from the kernel, each an improvement no correct caller can observe:
//! - when the range holds a mapping, the bitmap words for the whole range are written (holes
//!   and tail bits read 0), so the kernel's stale bits past a mapping's end never appear and the
//!   caller need not zero the buffer (a range without mappings leaves it untouched, as Linux);
//! - the bitmap pointer is checked after the request but before anything is done, so an unmap
//!   whose bitmap cannot be written fails with `EFAULT` and unmaps nothing (the kernel may have
//!   unmapped part), and a GET that faults loses no dirty bit;
//! - a range may end at the last byte of the 64-bit space (the kernel's GET_BITMAP computes
//!   `iova + size` and refuses it).
//!
//! `VFIO_DMA_UNMAP_FLAG_VADDR` (live update of the process address) is not supported: `EINVAL`.

use vmig_primitives::Iova;
use zerocopy::{FromBytes, IntoBytes};

pub use vmig_primitives::uapi::*;

use vmig_dirty::{bitmap_bytes, words_for, words_to_le_bytes};

use crate::error::{DmaError, Result, invalid};
use crate::iommu::{DirtyRead, Iommu, IommuType, UnmapScope};

/// The calling process's memory, through which user pointers in a request are resolved.
pub trait UserMemory {
    /// The writable bytes `[addr, addr+len)`, or `None` where they are not mapped writable.
    fn writable(&mut self, addr: u64, len: usize) -> Option<&mut [u8]>;
}

/// A [`UserMemory`] made of buffers placed at chosen user addresses.
#[derive(Debug, Default)]
pub struct UserBuffers {
    buffers: Vec<(u64, Vec<u8>, bool)>,
}

impl UserBuffers {
    /// An address space with nothing mapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `bytes` at `addr`, writable or read-only.
    pub fn insert(&mut self, addr: u64, bytes: Vec<u8>, writable: bool) {
        self.buffers.push((addr, bytes, writable));
    }

    /// The buffer placed at `addr`.
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        self.buffers
            .iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, b, _)| &b[..])
    }
}

impl UserMemory for UserBuffers {
    fn writable(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        self.buffers
            .iter_mut()
            .find_map(|(start, bytes, writable)| {
                let offset = usize::try_from(addr.checked_sub(*start)?).ok()?;
                let end = offset.checked_add(len)?;
                (*writable && end <= bytes.len()).then(|| &mut bytes[offset..end])
            })
    }
}

/// `size_of::<T>()` as the `u32` an `argsz` holds.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the uAPI structs are a few dozen bytes"
)]
const fn size32<T>() -> u32 {
    size_of::<T>() as u32
}

/// A length of a bitmap already checked against `DIRTY_BITMAP_SIZE_MAX` (256 MiB), as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked to be at most DIRTY_BITMAP_SIZE_MAX, 256 MiB"
)]
fn bitmap_len(value: u64) -> usize {
    value as usize
}

/// `value` for a `u32` field of a reply, refused (`E2BIG`) when it does not fit.
fn to_u32(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| DmaError::TooBig(format!("{what} ({value}) does not fit a u32 field")))
}

fn fault(what: &str) -> DmaError {
    DmaError::Fault(format!(
        "{what}: the argument is shorter than the structure it must hold"
    ))
}

fn read_struct<T: FromBytes>(arg: &[u8], offset: usize, what: &str) -> Result<T> {
    arg.get(offset..)
        .and_then(|rest| T::read_from_prefix(rest).ok())
        .map(|(value, _)| value)
        .ok_or_else(|| fault(what))
}

fn access_ok(addr: u64, len: u64) -> Result<()> {
    match addr.checked_add(len) {
        Some(end) if end <= TASK_SIZE_MAX => Ok(()),
        _ => invalid!(
            "bitmap [{addr:#x}, +{len:#x}) is not in user space (below {TASK_SIZE_MAX:#x})"
        ),
    }
}

/// Serves a request that returns a dirty bitmap through a user pointer, in the kernel's order:
/// `access_ok` and the declared size, then the IOMMU's own checks (page size, range, tracking,
/// no split), then the user memory, then `run` on a word buffer whose bits are copied out.
/// A range without mappings succeeds without touching the user's memory, as in Linux.
fn with_user_bitmap<T: Default>(
    iommu: &Iommu,
    user: &mut dyn UserMemory,
    iova: u64,
    size: u64,
    bitmap: &VfioBitmap,
    run: impl FnOnce(&mut [u64]) -> Result<T>,
) -> Result<T> {
    access_ok(bitmap.data, bitmap.size)?;
    if bitmap.size > crate::iommu::DIRTY_BITMAP_SIZE_MAX {
        return invalid!(
            "bitmap size {} exceeds max_dirty_bitmap_size {}",
            bitmap.size,
            crate::iommu::DIRTY_BITMAP_SIZE_MAX
        );
    }
    if iommu.check_dirty_bitmap_request(Iova(iova), size, bitmap.pgsize, bitmap.size)? == 0 {
        return Ok(T::default());
    }
    // Checked above: pgsize is the minimum page size and the declared size holds the bits.
    let npages = size >> bitmap.pgsize.trailing_zeros();
    let out_bytes = bitmap_len(bitmap_bytes(npages));
    if user.writable(bitmap.data, out_bytes).is_none() {
        return Err(DmaError::Fault(format!(
            "the bitmap at {:#x} ({out_bytes} bytes) is not writable user memory",
            bitmap.data
        )));
    }
    let mut words = vec![0u64; bitmap_len(words_for(npages))];
    let result = run(&mut words)?;
    let out = user
        .writable(bitmap.data, out_bytes)
        .ok_or_else(|| DmaError::Fault("the bitmap became unwritable".into()))?;
    words_to_le_bytes(&words, out);
    Ok(result)
}

/// `ioctl(container, VFIO_IOMMU_DIRTY_PAGES, arg)`: START, STOP or GET_BITMAP.
pub fn dirty_pages(iommu: &Iommu, arg: &[u8], user: &mut dyn UserMemory) -> Result<()> {
    if iommu.config().iommu_type != IommuType::Type1v2 {
        return Err(DmaError::Access(
            "VFIO_IOMMU_DIRTY_PAGES needs a type1 v2 container".into(),
        ));
    }
    let head: VfioIommuType1DirtyBitmap = read_struct(arg, 0, "vfio_iommu_type1_dirty_bitmap")?;
    let minsz = size32::<VfioIommuType1DirtyBitmap>();
    if head.argsz < minsz {
        return invalid!(
            "argsz {} is below the {minsz} bytes of vfio_iommu_type1_dirty_bitmap",
            head.argsz
        );
    }
    let known = VFIO_IOMMU_DIRTY_PAGES_FLAG_START
        | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        | VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
    if head.flags & !known != 0 {
        return invalid!("unknown DIRTY_PAGES flags {:#x}", head.flags & !known);
    }
    if head.flags.count_ones() != 1 {
        return invalid!(
            "DIRTY_PAGES flags {:#x}: exactly one of START, STOP, GET_BITMAP is required",
            head.flags
        );
    }
    match head.flags {
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START => iommu.start_dirty_tracking(),
        VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP => iommu.stop_dirty_tracking(),
        _ => {
            let need = minsz + size32::<VfioIommuType1DirtyBitmapGet>();
            if head.argsz < need {
                return invalid!(
                    "argsz {} is too small for GET_BITMAP: {need} bytes (header and vfio_iommu_type1_dirty_bitmap_get) needed",
                    head.argsz
                );
            }
            let get: VfioIommuType1DirtyBitmapGet =
                read_struct(arg, minsz as usize, "vfio_iommu_type1_dirty_bitmap_get")?;
            with_user_bitmap(iommu, user, get.iova, get.size, &get.bitmap, |words| {
                iommu.get_dirty_bitmap(
                    Iova(get.iova),
                    get.size,
                    get.bitmap.pgsize,
                    words,
                    DirtyRead::Clear,
                )
            })
        }
    }
}

/// `ioctl(container, VFIO_IOMMU_UNMAP_DMA, arg)`; writes the bytes unmapped back into `size`.
pub fn unmap_dma(iommu: &Iommu, arg: &mut [u8], user: &mut dyn UserMemory) -> Result<()> {
    let mut unmap: VfioIommuType1DmaUnmap = read_struct(arg, 0, "vfio_iommu_type1_dma_unmap")?;
    let minsz = size32::<VfioIommuType1DmaUnmap>();
    let known =
        VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR;
    if unmap.argsz < minsz {
        return invalid!(
            "argsz {} is below the {minsz} bytes of vfio_iommu_type1_dma_unmap",
            unmap.argsz
        );
    }
    if unmap.flags & !known != 0 {
        return invalid!("unknown UNMAP_DMA flags {:#x}", unmap.flags & !known);
    }
    let get_bitmap = unmap.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
    if get_bitmap && unmap.flags & (VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR) != 0 {
        return invalid!("GET_DIRTY_BITMAP cannot be combined with ALL or VADDR");
    }
    if unmap.flags & VFIO_DMA_UNMAP_FLAG_VADDR != 0 {
        return invalid!("VFIO_DMA_UNMAP_FLAG_VADDR is not supported by this IOMMU");
    }
    let unmapped = if get_bitmap {
        let need = minsz + size32::<VfioBitmap>();
        if unmap.argsz < need {
            return invalid!(
                "argsz {} is too small for GET_DIRTY_BITMAP: {need} bytes (with vfio_bitmap) needed",
                unmap.argsz
            );
        }
        let bitmap: VfioBitmap = read_struct(arg, minsz as usize, "vfio_bitmap")?;
        with_user_bitmap(iommu, user, unmap.iova, unmap.size, &bitmap, |words| {
            iommu.unmap_with_dirty_bitmap(Iova(unmap.iova), unmap.size, bitmap.pgsize, words)
        })?
    } else if unmap.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        iommu.unmap(Iova(unmap.iova), unmap.size, UnmapScope::All)?
    } else {
        iommu.unmap(Iova(unmap.iova), unmap.size, UnmapScope::Range)?
    };
    unmap.size = unmapped;
    unmap
        .write_to_prefix(arg)
        .map_err(|_| fault("vfio_iommu_type1_dma_unmap"))
}

/// `ioctl(container, VFIO_IOMMU_GET_INFO, arg)`: page sizes and, when `argsz` leaves room, the
/// capability chain (migration, DMA mappings available, IOVA ranges, in the order Linux 6.1
/// lays them out); otherwise `argsz` is raised to the size needed.
pub fn get_info(iommu: &Iommu, arg: &mut [u8]) -> Result<()> {
    // Callers of the pre-capability ABI pass only the first 16 bytes (up to `iova_pgsizes`).
    let minsz = std::mem::offset_of!(VfioIommuType1Info, cap_offset);
    let mut head = [0u8; size_of::<VfioIommuType1Info>()];
    head[..minsz].copy_from_slice(
        arg.get(..minsz)
            .ok_or_else(|| fault("vfio_iommu_type1_info"))?,
    );
    let mut info =
        VfioIommuType1Info::read_from_bytes(&head).map_err(|_| fault("vfio_iommu_type1_info"))?;
    if (info.argsz as usize) < minsz {
        return invalid!(
            "argsz {} is below the {minsz} bytes of vfio_iommu_type1_info",
            info.argsz
        );
    }
    // What is copied back: as much of the struct as the caller declared.
    let copy_len = (info.argsz as usize).min(size_of::<VfioIommuType1Info>());
    let summary = iommu.info();
    let header_len = size_of::<VfioIommuType1Info>();
    let mut caps = Vec::new();
    let push_cap = |caps: &mut Vec<u8>, bytes: &[u8]| {
        let offset = header_len + caps.len();
        caps.extend_from_slice(bytes);
        offset
    };
    let mut offsets = Vec::new();
    let m = summary.migration;
    {
        let cap = VfioIommuType1InfoCapMigration {
            header: VfioInfoCapHeader {
                id: VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
                version: 1,
                next: 0,
            },
            flags: m.flags,
            pad: 0,
            pgsize_bitmap: m.pgsize_bitmap,
            max_dirty_bitmap_size: m.max_dirty_bitmap_size,
        };
        offsets.push(push_cap(&mut caps, cap.as_bytes()));
    }
    let avail = VfioIommuType1InfoDmaAvail {
        header: VfioInfoCapHeader {
            id: VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
            version: 1,
            next: 0,
        },
        avail: summary.dma_avail,
    };
    offsets.push(push_cap(&mut caps, avail.as_bytes()));
    let mut ranges = VfioIommuType1InfoCapIovaRange {
        header: VfioInfoCapHeader {
            id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
            version: 1,
            next: 0,
        },
        nr_iovas: to_u32(summary.iova_ranges.len(), "the number of IOVA ranges")?,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    for r in &summary.iova_ranges {
        ranges.extend_from_slice(
            VfioIovaRange {
                start: r.start,
                end: r.last,
            }
            .as_bytes(),
        );
    }
    offsets.push(push_cap(&mut caps, &ranges));
    // Chain the headers: each `next` is the absolute offset of the following capability.
    for pair in offsets.windows(2) {
        let next_field = pair[0] - header_len + std::mem::offset_of!(VfioInfoCapHeader, next);
        caps[next_field..next_field + 4]
            .copy_from_slice(&to_u32(pair[1], "a capability offset")?.to_le_bytes());
    }
    info.flags = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
    info.iova_pgsizes = summary.iova_pgsizes;
    info.cap_offset = 0;
    let needed = to_u32(header_len + caps.len(), "the size of the info")?;
    if info.argsz < needed {
        info.argsz = needed;
    } else {
        let dest = arg
            .get_mut(header_len..header_len + caps.len())
            .ok_or_else(|| fault("vfio_iommu_type1_info capabilities"))?;
        dest.copy_from_slice(&caps);
        info.cap_offset = to_u32(header_len, "the capability offset")?;
    }
    arg.get_mut(..copy_len)
        .ok_or_else(|| fault("vfio_iommu_type1_info"))?
        .copy_from_slice(&info.as_bytes()[..copy_len]);
    Ok(())
}
