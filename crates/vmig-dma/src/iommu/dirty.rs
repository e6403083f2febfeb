//! Dirty tracking: START / STOP, GET_BITMAP over whole mappings with holes (read-and-clear or
//! read-only, pinned pages always reported, every page when a direct-DMA group has not pinned),
//! and unmap-with-bitmap, with the kernel's checks in the kernel's order.

use vmig_dirty::{DirtyBitmap, bitmap_bytes, words_for};

use super::table::{Mapping, State};
use super::{
    DIRTY_BITMAP_PAGES_MAX, DIRTY_BITMAP_SIZE_MAX, DirtyRead, Iommu, IommuType, buffer_words,
};
use crate::error::{DmaError, Result, invalid};
use vmig_primitives::Iova;

impl Iommu {
    pub(super) fn new_bitmap(
        &self,
        state: &State,
        pages: u64,
        extra_bytes: u64,
    ) -> Result<DirtyBitmap> {
        if pages > DIRTY_BITMAP_PAGES_MAX {
            return invalid!(
                "a mapping of {pages} pages cannot be dirty-tracked: the limit is {DIRTY_BITMAP_PAGES_MAX} pages per mapping"
            );
        }
        let bytes = bitmap_bytes(pages);
        let in_use = state.bitmap_bytes.saturating_add(extra_bytes);
        if in_use.saturating_add(bytes) > self.config.dirty_bitmap_memory_limit {
            return Err(DmaError::NoMemory(format!(
                "a dirty bitmap of {bytes} bytes would exceed the dirty-bitmap memory limit of {} bytes ({in_use} in use)",
                self.config.dirty_bitmap_memory_limit
            )));
        }
        DirtyBitmap::try_new(pages).map_err(|source| DmaError::Bitmap { pages, source })
    }

    /// Starts dirty tracking (`VFIO_IOMMU_DIRTY_PAGES_FLAG_START`). Starting while started
    /// succeeds and changes nothing. On failure nothing is allocated and tracking stays off.
    pub fn start_dirty_tracking(&self) -> Result<()> {
        self.check_v2("dirty page tracking")?;
        let mut state = self.lock_write();
        if state.tracking {
            return Ok(());
        }
        let mut bitmaps = Vec::with_capacity(state.mappings.len());
        let mut bytes = 0u64;
        for m in state.mappings.values() {
            if m.by_message() {
                // Its owner records the writes that reach it.
                bitmaps.push(None);
                continue;
            }
            let bitmap = self.new_bitmap(&state, m.size >> self.page_shift, bytes)?;
            for &page in m.pins().keys() {
                let _ = bitmap.set(page);
            }
            bytes += bitmap_bytes(bitmap.pages());
            bitmaps.push(Some(bitmap));
        }
        for (m, bitmap) in state.mappings.values_mut().zip(bitmaps) {
            m.dirty = bitmap;
        }
        state.bitmap_bytes += bytes;
        state.tracking = true;
        Ok(())
    }

    /// Stops dirty tracking and frees the bitmaps (`VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`).
    /// Stopping while stopped succeeds.
    pub fn stop_dirty_tracking(&self) -> Result<()> {
        self.check_v2("dirty page tracking")?;
        let mut state = self.lock_write();
        state.tracking = false;
        for m in state.mappings.values_mut() {
            m.dirty = None;
        }
        state.bitmap_bytes = 0;
        Ok(())
    }

    pub(super) fn check_v2(&self, what: &str) -> Result<()> {
        if self.config.iommu_type != IommuType::Type1v2 {
            return Err(DmaError::Access(format!(
                "{what} needs a type1 v2 IOMMU (VFIO_TYPE1v2_IOMMU)"
            )));
        }
        Ok(())
    }

    /// Checks a caller's bitmap for `size` bytes of IOVA at `pgsize` pages; returns the number
    /// of pages (the kernel's `verify_bitmap_size`).
    pub(super) fn check_bitmap(
        &self,
        size: u64,
        pgsize: u64,
        bitmap_len_bytes: u64,
    ) -> Result<u64> {
        if pgsize == 0 || !pgsize.is_power_of_two() {
            return invalid!(
                "bitmap page size {pgsize:#x} is not a power of two; the IOMMU reports at {:#x}",
                self.min_page
            );
        }
        let pages = size >> pgsize.trailing_zeros();
        if pages == 0 {
            return invalid!("the range of {size:#x} bytes holds no page of {pgsize:#x} bytes");
        }
        if bitmap_len_bytes == 0 {
            return invalid!("the bitmap buffer is empty");
        }
        if bitmap_len_bytes > DIRTY_BITMAP_SIZE_MAX {
            return invalid!(
                "a bitmap of {bitmap_len_bytes} bytes exceeds max_dirty_bitmap_size ({DIRTY_BITMAP_SIZE_MAX} bytes)"
            );
        }
        if bitmap_len_bytes < bitmap_bytes(pages) {
            return invalid!(
                "{pages} pages need a bitmap of {} bytes (whole 64-bit words), got {bitmap_len_bytes}",
                bitmap_bytes(pages)
            );
        }
        Ok(pages)
    }

    pub(super) fn check_pgsize(&self, pgsize: u64) -> Result<()> {
        if pgsize != self.min_page {
            return invalid!(
                "bitmap page size {pgsize:#x}: dirty bitmaps are reported only at the minimum page size {:#x}",
                self.min_page
            );
        }
        Ok(())
    }

    /// Places the dirty bits of mapping `m` into `out` (bit 0 = `base`), reading and clearing
    /// its bitmap when `mode` is [`DirtyRead::Clear`]; pinned pages are always reported.
    pub(super) fn collect_mapping(
        &self,
        m: &Mapping,
        all_dirty: bool,
        base: u64,
        out: &mut [u64],
        mode: DirtyRead,
    ) {
        let Some(bitmap) = &m.dirty else { return };
        let out_bit = (m.iova - base) >> self.page_shift;
        let pages = bitmap.pages();
        // The pin lock orders this read against unpin, which sets the page's bit as it drops
        // the last reference: a page is either still pinned here or its bit is set.
        let pins = m.pins();
        let result = if all_dirty {
            // Every page is reported; what the bitmap held is consumed all the same.
            if mode == DirtyRead::Clear {
                let _ = bitmap.clear_range(0, pages);
            }
            set_bits(out, out_bit, pages);
            Ok(())
        } else if mode == DirtyRead::Clear {
            bitmap.harvest_range_into(0, pages, out, out_bit)
        } else {
            bitmap.export_range_into(0, pages, out, out_bit)
        };
        debug_assert!(result.is_ok(), "bitmap transfer out of bounds: {result:?}");
        for &page in pins.keys() {
            set_bits(out, out_bit + page, 1);
        }
    }

    /// The checks of a bitmap request that need the lock, in the kernel's order: page size,
    /// range, tracking on, no mapping split. Returns the range's last byte.
    pub(super) fn check_bitmap_request(
        &self,
        state: &State,
        iova: u64,
        size: u64,
        pgsize: u64,
    ) -> Result<u64> {
        self.check_pgsize(pgsize)?;
        let last = self.check_range("dirty bitmap", iova, size)?;
        if !state.tracking {
            return invalid!("dirty tracking is not started: START before asking for a bitmap");
        }
        state.check_no_bisect(iova, last, "dirty bitmap range")?;
        Ok(last)
    }

    /// Runs every check of a GET_BITMAP or unmap-with-bitmap request for a bitmap of
    /// `bitmap_len_bytes` bytes without doing it, and returns how many mappings the range
    /// covers: a front end that must write the bits to memory it does not own (a user pointer)
    /// checks that memory only after this, as the kernel does.
    pub fn check_dirty_bitmap_request(
        &self,
        iova: Iova,
        size: u64,
        pgsize: u64,
        bitmap_len_bytes: u64,
    ) -> Result<usize> {
        let iova = iova.raw();
        self.check_bitmap(size, pgsize, bitmap_len_bytes)?;
        let state = self.lock_read();
        let last = self.check_bitmap_request(&state, iova, size, pgsize)?;
        Ok(state.mappings.range(iova..=last).count())
    }

    /// Reads the dirty pages of `[iova, iova+size)` into `bitmap` (bit *i* = page
    /// `iova + i * pgsize`), `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`. The range must consist of
    /// whole mappings; holes are allowed and read as clean. `pgsize` must be the minimum page
    /// size. The first `DIRTY_BITMAP_BYTES(pages)` bytes of `bitmap` are overwritten (the caller
    /// need not zero them), the rest is left alone.
    pub fn get_dirty_bitmap(
        &self,
        iova: Iova,
        size: u64,
        pgsize: u64,
        bitmap: &mut [u64],
        mode: DirtyRead,
    ) -> Result<()> {
        let iova = iova.raw();
        self.check_v2("dirty page tracking")?;
        let pages = self.check_bitmap(size, pgsize, bitmap.len() as u64 * 8)?;
        let state = self.lock_read();
        let last = self.check_bitmap_request(&state, iova, size, pgsize)?;
        let out = &mut bitmap[..buffer_words(words_for(pages))];
        out.fill(0);
        let all_dirty = state.all_dirty();
        for (_, m) in state.mappings.range(iova..=last) {
            self.collect_mapping(m, all_dirty, iova, out, mode);
        }
        Ok(())
    }

    /// Unmaps the whole mappings in `[iova, iova+size)` and returns their dirty pages in
    /// `bitmap` (as [`Iommu::get_dirty_bitmap`]) in one step: no device write between the read
    /// and the unmap can be lost (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`). Returns the bytes
    /// unmapped. Nothing is unmapped when it fails.
    pub fn unmap_with_dirty_bitmap(
        &self,
        iova: Iova,
        size: u64,
        pgsize: u64,
        bitmap: &mut [u64],
    ) -> Result<u64> {
        let iova = iova.raw();
        let pages = self.check_bitmap(size, pgsize, bitmap.len() as u64 * 8)?;
        let last = self.check_range("unmap", iova, size)?;
        let state = self.lock_unpinned(iova, last, |state| {
            self.check_bitmap_request(state, iova, size, pgsize)
                .map(|_| ())
        })?;
        let out = &mut bitmap[..buffer_words(words_for(pages))];
        out.fill(0);
        let all_dirty = state.all_dirty();
        let victims: Vec<u64> = state.mappings.range(iova..=last).map(|(k, _)| *k).collect();
        Ok(self.remove_mappings(state, victims, |m| {
            self.collect_mapping(m, all_dirty, iova, out, DirtyRead::Clear);
        }))
    }
}

/// Sets bits `[first, first+count)` of `out`.
fn set_bits(out: &mut [u64], first: u64, count: u64) {
    let mut bit = first;
    let end = first + count;
    while bit < end {
        let idx = (bit / 64) as usize;
        let lo = bit % 64;
        let n = (64 - lo).min(end - bit);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << lo
        };
        out[idx] |= mask;
        bit += n;
    }
}
