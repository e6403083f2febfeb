//! Dirty logging over the connection's IOMMU: v2 DMA logging (`DEVICE_FEATURE`
//! `DMA_LOGGING_START` / `STOP` / `REPORT`, any power-of-two page size folded from the IOMMU's
//! 4 KiB bits) and v1 `DIRTY_PAGES` (START / STOP / GET_BITMAP), with every bitmap size
//! checked against what the client sized and what the server offered.

use vmig_dma::{DirtyRead, Iommu};
use vmig_primitives::Iova;
use zerocopy::IntoBytes;

use super::{Refusal, Reply, Session, check_ops, feature_echo, field32};
use crate::wire::{
    DIRTY_PAGES_FLAG_START, DIRTY_PAGES_FLAG_STOP, DeviceFeature, DirtyBitmapRange, DirtyPages,
    DmaLoggingControl, DmaLoggingReport, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_GET, FEATURE_PROBE, FEATURE_SET, read_struct,
};
use vmig_primitives::{PAGE_SHIFT, PAGE_SIZE};

/// `DEVICE_FEATURE` `DMA_LOGGING_START`, `STOP` and `REPORT`.
pub(super) fn logging_feature(
    s: &mut Session,
    argsz: u32,
    flags: u32,
    data: &[u8],
) -> Result<Reply, Refusal> {
    let feature = flags & crate::wire::FEATURE_MASK;
    let op = flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
    match feature {
        FEATURE_DMA_LOGGING_START => {
            check_ops(feature, op, FEATURE_SET | FEATURE_PROBE)?;
            if op & FEATURE_PROBE != 0 {
                return feature_echo(flags, &[]);
            }
            let control: DmaLoggingControl = read_struct(data).ok_or_else(|| {
                Refusal::invalid("DMA_LOGGING_START needs 16 bytes of control data")
            })?;
            let ranges = &data[size_of::<DmaLoggingControl>()..];
            if ranges.len() as u64 != u64::from(control.num_ranges) * 16 {
                return Err(Refusal::invalid(format!(
                    "DMA_LOGGING_START names {} ranges but carries {} bytes of them",
                    control.num_ranges,
                    ranges.len()
                )));
            }
            if control.page_size == 0 || !control.page_size.is_power_of_two() {
                return Err(Refusal::invalid(format!(
                    "page size {}: expected a power of two",
                    control.page_size
                )));
            }
            if s.logging.is_some() {
                return Err(Refusal::new(libc::EBUSY, "DMA logging is already started"));
            }
            s.dma.iommu.start_dirty_tracking()?;
            let page_size = control.page_size.max(PAGE_SIZE);
            s.logging = Some(page_size);
            let answer = DmaLoggingControl {
                page_size,
                ..control
            };
            feature_echo(flags, &[answer.as_bytes(), ranges].concat())
        }
        FEATURE_DMA_LOGGING_REPORT => {
            check_ops(feature, op, FEATURE_GET | FEATURE_PROBE)?;
            if op & FEATURE_PROBE != 0 {
                return feature_echo(flags, &[]);
            }
            let report: DmaLoggingReport = read_struct(data)
                .ok_or_else(|| Refusal::invalid("DMA_LOGGING_REPORT needs 24 bytes of data"))?;
            if s.logging.is_none() {
                return Err(Refusal::invalid(
                    "DMA_LOGGING_REPORT before DMA_LOGGING_START",
                ));
            }
            let bitmap = logging_report(&s.dma.iommu, report, argsz)?;
            feature_echo(flags, &[report.as_bytes(), bitmap.as_bytes()].concat())
        }
        // DMA_LOGGING_STOP.
        _ => {
            check_ops(feature, op, FEATURE_SET | FEATURE_PROBE)?;
            if op & FEATURE_PROBE != 0 {
                return feature_echo(flags, &[]);
            }
            if s.logging.take().is_none() {
                return Err(Refusal::invalid("DMA logging is not started"));
            }
            s.dma.iommu.stop_dirty_tracking()?;
            feature_echo(flags, data)
        }
    }
}

/// Words of a bitmap of `size` bytes at `pgsize`, checked against the bytes the client sized.
pub(super) fn check_bitmap(size: u64, pgsize: u64, bitmap_bytes: u64) -> Result<usize, Refusal> {
    if pgsize == 0 || !pgsize.is_power_of_two() {
        return Err(Refusal::invalid(format!(
            "bitmap page size {pgsize}: expected a power of two"
        )));
    }
    let pages = size.div_ceil(pgsize);
    let needed = vmig_dirty::bitmap_bytes(pages);
    if bitmap_bytes != needed {
        return Err(Refusal::invalid(format!(
            "a bitmap of {bitmap_bytes} bytes for {pages} pages: expected {needed}"
        )));
    }
    if needed > MAX_BITMAP_BYTES {
        return Err(Refusal::invalid(format!(
            "a bitmap of {needed} bytes: at most {MAX_BITMAP_BYTES} (the max_bitmap_size offered)"
        )));
    }
    Ok(bitmap_len(vmig_dirty::words_for(pages)))
}

/// A size of a bitmap (bytes or words) checked to be at most [`MAX_BITMAP_BYTES`], as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked to be at most MAX_BITMAP_BYTES, 256 MiB"
)]
pub(super) fn bitmap_len(value: u64) -> usize {
    value as usize
}

/// The largest dirty bitmap the server builds (what it offers as `max_bitmap_size`).
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// `DIRTY_PAGES` (v1): START, STOP, or GET_BITMAP of a range.
pub(super) fn dirty_pages(
    s: &mut Session,
    argsz: u32,
    flags: u32,
    range: Option<DirtyBitmapRange>,
) -> Result<Reply, Refusal> {
    match (flags, range) {
        // START and STOP replies carry no payload (v1 spec).
        (DIRTY_PAGES_FLAG_START, _) => {
            s.dma.iommu.start_dirty_tracking()?;
            Ok(Reply::empty())
        }
        (DIRTY_PAGES_FLAG_STOP, _) => {
            s.dma.iommu.stop_dirty_tracking()?;
            Ok(Reply::empty())
        }
        (_, Some(r)) => {
            let words = check_bitmap(r.size, r.bitmap.pgsize, r.bitmap.size)?;
            let needed =
                (size_of::<DirtyPages>() + size_of::<DirtyBitmapRange>()) as u64 + r.bitmap.size;
            if u64::from(argsz) < needed {
                return Err(Refusal::invalid(format!(
                    "DIRTY_PAGES argsz {argsz}: the reply needs {needed}"
                )));
            }
            let mut out = vec![0u64; words];
            s.dma.iommu.get_dirty_bitmap(
                Iova(r.iova),
                r.size,
                r.bitmap.pgsize,
                &mut out,
                DirtyRead::Clear,
            )?;
            let head = DirtyPages {
                argsz: field32(needed, "the DIRTY_PAGES reply's size")?,
                flags,
            };
            Ok(Reply::data(
                [
                    head.as_bytes(),
                    r.as_bytes(),
                    &out.as_bytes()[..bitmap_len(r.bitmap.size)],
                ]
                .concat(),
            ))
        }
        _ => Err(Refusal::invalid("DIRTY_PAGES GET_BITMAP without a range")),
    }
}

/// The read-and-clear bitmap of `report`'s range at its page size.
fn logging_report(
    iommu: &Iommu,
    report: DmaLoggingReport,
    argsz: u32,
) -> Result<Vec<u64>, Refusal> {
    let DmaLoggingReport {
        iova,
        length,
        page_size,
    } = report;
    if page_size < PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(Refusal::invalid(format!(
            "report page size {page_size}: expected a power of two of at least {PAGE_SIZE}"
        )));
    }
    if length == 0 || iova % page_size != 0 || length % page_size != 0 {
        return Err(Refusal::invalid(format!(
            "report range [{iova:#x}, +{length:#x}) must be non-empty and aligned to its page size {page_size:#x}"
        )));
    }
    let pages = length / page_size;
    let bitmap_bytes = vmig_dirty::bitmap_bytes(pages);
    let needed = (size_of::<DeviceFeature>() + size_of::<DmaLoggingReport>()) as u64 + bitmap_bytes;
    if u64::from(argsz) < needed {
        return Err(Refusal::invalid(format!(
            "DMA_LOGGING_REPORT argsz {argsz}: a report of {pages} pages needs {needed} (8 + 24 + {bitmap_bytes})"
        )));
    }
    let fine_pages = length / PAGE_SIZE;
    if vmig_dirty::bitmap_bytes(fine_pages) > MAX_BITMAP_BYTES {
        return Err(Refusal::invalid(format!(
            "a report over {length:#x} bytes: at most {} GiB at a time",
            (MAX_BITMAP_BYTES * 8 * PAGE_SIZE) >> 30
        )));
    }
    let mut fine = vec![0u64; bitmap_len(vmig_dirty::words_for(fine_pages))];
    iommu.get_dirty_bitmap(Iova(iova), length, PAGE_SIZE, &mut fine, DirtyRead::Clear)?;
    if page_size == PAGE_SIZE {
        return Ok(fine);
    }
    let shift = page_size.trailing_zeros() - PAGE_SHIFT;
    let bitmap = vmig_dirty::DirtyBitmap::try_new(fine_pages)
        .map_err(|e| Refusal::caused(libc::EINVAL, "folding the report to its page size", e))?;
    bitmap
        .merge_words(0, &fine, fine_pages)
        .map_err(|e| Refusal::caused(libc::EINVAL, "folding the report to its page size", e))?;
    let coarse = bitmap
        .to_coarser(shift)
        .map_err(|e| Refusal::caused(libc::EINVAL, "folding the report to its page size", e))?;
    Ok(coarse.snapshot().into_words())
}
