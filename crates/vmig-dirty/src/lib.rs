//! Page-granular dirty bitmaps for live migration.
//!
//! This crate owns the one data structure every dirty-page source in vmig feeds: a bitmap with
//! one bit per page, stored as atomic 64-bit words so that any number of threads can mark pages
//! (device DMA, vCPU exits, the VMM's own writes) while another thread harvests them.
//!
//! What it provides:
//! - [`DirtyBitmap`]: set / test / clear of a page or a range, [`DirtyBitmap::count`],
//!   read-and-clear ([`DirtyBitmap::harvest`], [`DirtyBitmap::harvest_each_run`],
//!   [`DirtyBitmap::harvest_range_into`]) that never loses a bit set concurrently, and iteration
//!   over runs of dirty pages `(first_page, n_pages)`.
//! - OR-merge of a foreign bitmap ([`DirtyBitmap::merge_words`]) in the format of KVM's
//!   `KVM_GET_DIRTY_LOG` and VFIO's dirty bitmaps (bit *i* = page *i*, least significant bit of
//!   word 0 first) at any page offset, including offsets that are not multiples of 64 (the
//!   "unaligned iova shift" of the VFIO type1 thread), and export of any page range in that same
//!   format ([`DirtyBitmap::export_range_into`]).
//! - Conversion between page sizes ([`DirtyBitmap::to_coarser`], [`DirtyBitmap::to_finer`]).
//! - For a caller that owns a bitmap outright (`&mut`, no concurrent marking), the same harvest
//!   and merge with plain loads and stores ([`DirtyBitmap::harvest_each_run_exclusive`],
//!   [`DirtyBitmap::merge_words_exclusive`]): the migration engine's own accumulator merges
//!   KVM's and the IOMMU's bitmaps at memory speed this way.
//!
//! What it leaves to others: where the bits come from (KVM, the IOMMU, devices) and what a page
//! number means (guest-physical or IOVA). There is no I/O and no `unsafe` here.
//!
//! Memory ordering: a writer stores the page's data first and then sets its bit with `Release`;
//! a harvester clears bits with `Acquire` and only then reads the pages. A write that lands after
//! the harvest cleared its bit sets the bit again, so it is reported by the next harvest: bits are
//! never lost, at worst a page is reported twice.
//!
//! Bits past the last page of a bitmap are always zero.

use std::sync::atomic::{AtomicU64, Ordering};

mod runs;

use runs::{ExclusiveTake, PlainWords, SharedPeek, SharedTake, scan_runs};

/// Bits per bitmap word.
pub const WORD_BITS: u64 = 64;

/// Errors of bitmap operations: every one names the range or size that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyError {
    /// A page range does not fit in the bitmap.
    #[error("pages [{first}, {first}+{count}) are outside a bitmap of {pages} pages")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// Number of pages asked for.
        count: u64,
        /// Pages the bitmap holds.
        pages: u64,
    },
    /// A caller's buffer is too short for the bits it should hold or supply.
    #[error(
        "a buffer of {got} words cannot hold {bits} bits starting at bit {offset}: {needed} words needed"
    )]
    ShortBuffer {
        /// Words supplied.
        got: usize,
        /// Words needed.
        needed: u64,
        /// Bits to transfer.
        bits: u64,
        /// Bit offset into the buffer.
        offset: u64,
    },
    /// The bitmap could not be allocated.
    #[error("cannot allocate a dirty bitmap of {pages} pages ({bytes} bytes)")]
    Alloc {
        /// Pages asked for.
        pages: u64,
        /// Bytes that would have been needed.
        bytes: u64,
    },
    /// A page-size conversion asked for a ratio that is not a power of two up to 2^63.
    #[error("page size ratio 2^{shift} is not supported: expected a shift of 1 to 63")]
    BadShift {
        /// The shift asked for.
        shift: u32,
    },
}

/// Number of 64-bit words that hold `bits` bits.
pub const fn words_for(bits: u64) -> u64 {
    bits.div_ceil(WORD_BITS)
}

/// Number of bytes of a bitmap of `pages` pages rounded up to whole 64-bit words: the kernel's
/// `DIRTY_BITMAP_BYTES()` (`ALIGN(npages, 64) / 8`).
pub const fn bitmap_bytes(pages: u64) -> u64 {
    words_for(pages) * 8
}

/// A word index or word count as `usize`, for one bounded by the length of a word slice in
/// memory: the bitmap's own (checked by `check_range`) or a caller's (checked by
/// `check_buffer`).
#[inline]
#[expect(
    clippy::cast_possible_truncation,
    reason = "bounded by the length of a slice in memory, which is a usize"
)]
const fn word_index(w: u64) -> usize {
    w as usize
}

/// Mask of bits `lo..hi` of a word (`lo < hi <= 64`).
#[inline]
fn bit_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= WORD_BITS);
    let upper = if hi == WORD_BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    upper & (u64::MAX << lo)
}

/// ORs the low `nbits` bits of `bits` into `out` at bit position `pos`.
#[inline]
fn or_bits_at(out: &mut [u64], pos: u64, bits: u64, nbits: u64) {
    if bits == 0 {
        return;
    }
    let idx = (pos / WORD_BITS) as usize;
    let shift = pos % WORD_BITS;
    out[idx] |= bits << shift;
    if shift != 0 && shift + nbits > WORD_BITS {
        out[idx + 1] |= bits >> (WORD_BITS - shift);
    }
}

/// A page-granular dirty bitmap that threads mark concurrently while another thread harvests.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap of `pages` pages. Panics only if the memory cannot be allocated; use
    /// [`DirtyBitmap::try_new`] where the size comes from outside.
    pub fn new(pages: u64) -> Self {
        match Self::try_new(pages) {
            Ok(bitmap) => bitmap,
            Err(e) => panic!("{e}"),
        }
    }

    /// A clean bitmap of `pages` pages, or [`DirtyError::Alloc`] when it cannot be allocated.
    pub fn try_new(pages: u64) -> Result<Self, DirtyError> {
        let alloc_error = DirtyError::Alloc {
            pages,
            bytes: bitmap_bytes(pages),
        };
        let nwords = usize::try_from(words_for(pages)).map_err(|_| alloc_error.clone())?;
        let mut words = Vec::new();
        words.try_reserve_exact(nwords).map_err(|_| alloc_error)?;
        words.resize_with(nwords, || AtomicU64::new(0));
        Ok(Self {
            words: words.into_boxed_slice(),
            pages,
        })
    }

    /// Number of pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of 64-bit words backing the bitmap.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), DirtyError> {
        match first.checked_add(count) {
            Some(end) if end <= self.pages => Ok(()),
            _ => Err(DirtyError::OutOfRange {
                first,
                count,
                pages: self.pages,
            }),
        }
    }

    /// Calls `f(word_index, mask)` for each word overlapping pages `[first, first+count)`.
    /// The range must have been checked.
    #[inline]
    fn for_each_word_mask(first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
        if count == 0 {
            return;
        }
        let last = first + count - 1;
        let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
        for w in first_word..=last_word {
            let lo = if w == first_word {
                first % WORD_BITS
            } else {
                0
            };
            let hi = if w == last_word {
                last % WORD_BITS + 1
            } else {
                WORD_BITS
            };
            f(word_index(w), bit_mask(lo, hi));
        }
    }

    /// Marks one page dirty: one atomic operation.
    #[inline]
    pub fn set(&self, page: u64) -> Result<(), DirtyError> {
        self.check_range(page, 1)?;
        self.words[(page / WORD_BITS) as usize]
            .fetch_or(1 << (page % WORD_BITS), Ordering::Release);
        Ok(())
    }

    /// Whether one page is dirty.
    pub fn test(&self, page: u64) -> Result<bool, DirtyError> {
        self.check_range(page, 1)?;
        let word = self.words[(page / WORD_BITS) as usize].load(Ordering::Acquire);
        Ok(word & (1 << (page % WORD_BITS)) != 0)
    }

    /// Marks one page clean.
    pub fn clear(&self, page: u64) -> Result<(), DirtyError> {
        self.clear_range(page, 1)
    }

    /// Marks pages `[first, first+count)` dirty: one atomic operation per word touched.
    pub fn set_range(&self, first: u64, count: u64) -> Result<(), DirtyError> {
        self.check_range(first, count)?;
        Self::for_each_word_mask(first, count, |w, mask| {
            self.words[w].fetch_or(mask, Ordering::Release);
        });
        Ok(())
    }

    /// Marks pages `[first, first+count)` clean.
    pub fn clear_range(&self, first: u64, count: u64) -> Result<(), DirtyError> {
        self.check_range(first, count)?;
        Self::for_each_word_mask(first, count, |w, mask| {
            self.words[w].fetch_and(!mask, Ordering::AcqRel);
        });
        Ok(())
    }

    /// Whether any page of `[first, first+count)` is dirty.
    pub fn any_in_range(&self, first: u64, count: u64) -> Result<bool, DirtyError> {
        Ok(self.count_range(first, count)? != 0)
    }

    /// Number of dirty pages in `[first, first+count)`.
    pub fn count_range(&self, first: u64, count: u64) -> Result<u64, DirtyError> {
        self.check_range(first, count)?;
        let mut n = 0;
        Self::for_each_word_mask(first, count, |w, mask| {
            n += u64::from((self.words[w].load(Ordering::Acquire) & mask).count_ones());
        });
        Ok(n)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Marks every page clean.
    pub fn clear_all(&mut self) {
        for w in self.words.iter_mut() {
            *w.get_mut() = 0;
        }
    }

    /// Reads and clears the bits of `mask` in one word; skips the atomic read-modify-write
    /// when none of them is set.
    #[inline]
    fn take_masked(word: &AtomicU64, mask: u64) -> u64 {
        if word.load(Ordering::Relaxed) & mask == 0 {
            0
        } else if mask == u64::MAX {
            word.swap(0, Ordering::AcqRel)
        } else {
            word.fetch_and(!mask, Ordering::AcqRel) & mask
        }
    }

    /// Reads and clears the whole bitmap into a snapshot. A bit set while this runs is either
    /// in the snapshot or still set afterwards, never lost.
    pub fn harvest(&self) -> DirtySnapshot {
        DirtySnapshot {
            words: self
                .words
                .iter()
                .map(|w| Self::take_masked(w, u64::MAX))
                .collect(),
            pages: self.pages,
        }
    }

    /// Reads and clears the bitmap word by word, calling `f(first_page, n_pages)` for each run
    /// of dirty pages in ascending order, without materializing a snapshot. A bit set while
    /// this runs is either delivered or still set afterwards, never lost.
    pub fn harvest_each_run(&self, f: impl FnMut(u64, u64)) {
        scan_runs(&mut SharedTake(&self.words), f);
    }

    /// Like [`DirtyBitmap::harvest_each_run`] for a caller that has the bitmap to itself (no
    /// concurrent marking possible): plain loads and stores, no atomic read-modify-write.
    pub fn harvest_each_run_exclusive(&mut self, f: impl FnMut(u64, u64)) {
        scan_runs(&mut ExclusiveTake(&mut self.words), f);
    }

    /// Calls `f(first_page, n_pages)` for each run of dirty pages, without clearing them.
    /// Concurrent changes may or may not be seen.
    pub fn for_each_run(&self, f: impl FnMut(u64, u64)) {
        scan_runs(&mut SharedPeek(&self.words), f);
    }

    /// The runs of dirty pages `(first_page, n_pages)` in ascending order, not clearing them.
    pub fn collect_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        self.for_each_run(|first, n| runs.push((first, n)));
        runs
    }

    /// A copy of the bitmap, not clearing it.
    pub fn snapshot(&self) -> DirtySnapshot {
        DirtySnapshot {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            pages: self.pages,
        }
    }

    fn transfer_range_into(
        &self,
        first: u64,
        count: u64,
        out: &mut [u64],
        out_bit: u64,
        clear: bool,
    ) -> Result<(), DirtyError> {
        self.check_range(first, count)?;
        check_buffer(out.len(), out_bit, count)?;
        Self::for_each_word_mask(first, count, |w, mask| {
            let word = &self.words[w];
            let bits = if clear {
                Self::take_masked(word, mask)
            } else {
                word.load(Ordering::Acquire) & mask
            };
            let lo = u64::from(mask.trailing_zeros());
            let page = w as u64 * WORD_BITS + lo;
            or_bits_at(
                out,
                out_bit + (page - first),
                bits >> lo,
                u64::from(mask.count_ones()),
            );
        });
        Ok(())
    }

    /// ORs the bits of pages `[first, first+count)` into `out`, page `first` landing at bit
    /// `out_bit` (bit *i* of the buffer is bit `i % 64` of word `i / 64`), without clearing.
    /// Bits of `out` outside `[out_bit, out_bit+count)` are left as they are.
    pub fn export_range_into(
        &self,
        first: u64,
        count: u64,
        out: &mut [u64],
        out_bit: u64,
    ) -> Result<(), DirtyError> {
        self.transfer_range_into(first, count, out, out_bit, false)
    }

    /// Like [`DirtyBitmap::export_range_into`], but reads and clears: every bit is either
    /// delivered to `out` or left set for the next harvest, never lost.
    pub fn harvest_range_into(
        &self,
        first: u64,
        count: u64,
        out: &mut [u64],
        out_bit: u64,
    ) -> Result<(), DirtyError> {
        self.transfer_range_into(first, count, out, out_bit, true)
    }

    /// OR-merges a foreign bitmap of `nbits` pages (`words` in the KVM/VFIO layout: bit *i* is
    /// bit `i % 64` of word `i / 64`) into pages `[page_offset, page_offset+nbits)`. The offset
    /// need not be a multiple of 64. Bits of `words` past `nbits` are ignored.
    pub fn merge_words(
        &self,
        page_offset: u64,
        words: &[u64],
        nbits: u64,
    ) -> Result<(), DirtyError> {
        self.check_range(page_offset, nbits)?;
        check_buffer(words.len(), 0, nbits)?;
        let shift = page_offset % WORD_BITS;
        let base = (page_offset / WORD_BITS) as usize;
        let full = (nbits / WORD_BITS) as usize;
        let or = |idx: usize, v: u64| {
            if v != 0 {
                self.words[idx].fetch_or(v, Ordering::Release);
            }
        };
        let emit = |i: usize, w: u64| {
            if shift == 0 {
                or(base + i, w);
            } else {
                or(base + i, w << shift);
                let hi = w >> (WORD_BITS - shift);
                if hi != 0 {
                    or(base + i + 1, hi);
                }
            }
        };
        for (i, &w) in words[..full].iter().enumerate() {
            emit(i, w);
        }
        let rest = nbits % WORD_BITS;
        if rest != 0 {
            emit(full, words[full] & bit_mask(0, rest));
        }
        Ok(())
    }

    /// Like [`DirtyBitmap::merge_words`] for a caller that has the bitmap to itself: plain ORs
    /// that the compiler vectorizes, for merging a harvested KVM or VFIO bitmap into the
    /// migration's own accumulator at memory speed.
    pub fn merge_words_exclusive(
        &mut self,
        page_offset: u64,
        words: &[u64],
        nbits: u64,
    ) -> Result<(), DirtyError> {
        self.check_range(page_offset, nbits)?;
        check_buffer(words.len(), 0, nbits)?;
        if nbits == 0 {
            return Ok(());
        }
        let shift = (page_offset % WORD_BITS) as u32;
        let base = (page_offset / WORD_BITS) as usize;
        let nsrc = word_index(words_for(nbits));
        let rest = nbits % WORD_BITS;
        let tail = if rest == 0 {
            words[nsrc - 1]
        } else {
            words[nsrc - 1] & bit_mask(0, rest)
        };
        let body = &words[..nsrc - 1];
        let dst = &mut self.words[base..];
        if shift == 0 {
            for (d, &w) in dst.iter_mut().zip(body) {
                *d.get_mut() |= w;
            }
            *dst[nsrc - 1].get_mut() |= tail;
            return Ok(());
        }
        // Destination word k takes the high bits of source word k-1 and the low bits of
        // source word k.
        let back = u64::BITS - shift;
        let first = if nsrc == 1 { tail } else { words[0] };
        *dst[0].get_mut() |= first << shift;
        for (d, pair) in dst[1..].iter_mut().zip(body.windows(2)) {
            *d.get_mut() |= (pair[0] >> back) | (pair[1] << shift);
        }
        if nsrc >= 2 {
            *dst[nsrc - 1].get_mut() |= (body[nsrc - 2] >> back) | (tail << shift);
        }
        let spill = tail >> back;
        if spill != 0 {
            *dst[nsrc].get_mut() |= spill;
        }
        Ok(())
    }

    /// Like [`DirtyBitmap::merge_words`] for a bitmap given as bytes (little-endian words, as
    /// carried on a wire). `bytes` may end in a partial word.
    pub fn merge_le_bytes(
        &self,
        page_offset: u64,
        bytes: &[u8],
        nbits: u64,
    ) -> Result<(), DirtyError> {
        if bytes.len() as u64 * 8 < nbits {
            return Err(DirtyError::ShortBuffer {
                got: bytes.len() / 8,
                needed: words_for(nbits),
                bits: nbits,
                offset: 0,
            });
        }
        let words = le_bytes_to_words(bytes);
        self.merge_words(page_offset, &words, nbits)
    }

    /// OR-merges another bitmap of the same page size into this one at `page_offset`.
    pub fn merge_bitmap(&self, page_offset: u64, other: &DirtyBitmap) -> Result<(), DirtyError> {
        let words = other.snapshot();
        self.merge_words(page_offset, &words.words, other.pages)
    }

    /// This bitmap at a page size `2^shift` times larger: a coarse page is dirty when any of its
    /// fine pages is. Coarse page *c* covers fine pages `[c << shift, (c+1) << shift)`.
    pub fn to_coarser(&self, shift: u32) -> Result<DirtyBitmap, DirtyError> {
        check_shift(shift)?;
        let coarse_pages = self.pages.div_ceil(1u64 << shift);
        let coarse = DirtyBitmap::try_new(coarse_pages)?;
        self.for_each_run(|first, count| {
            let (lo, hi) = (first >> shift, (first + count - 1) >> shift);
            let _ = coarse.set_range(lo, hi - lo + 1);
        });
        Ok(coarse)
    }

    /// This bitmap at a page size `2^shift` times smaller: every fine page of a dirty coarse
    /// page is dirty.
    pub fn to_finer(&self, shift: u32) -> Result<DirtyBitmap, DirtyError> {
        check_shift(shift)?;
        let alloc = || DirtyError::Alloc {
            pages: u64::MAX,
            bytes: u64::MAX,
        };
        let fine_pages = self.pages.checked_mul(1u64 << shift).ok_or_else(alloc)?;
        let fine = DirtyBitmap::try_new(fine_pages)?;
        self.for_each_run(|first, count| {
            let _ = fine.set_range(first << shift, count << shift);
        });
        Ok(fine)
    }
}

fn check_shift(shift: u32) -> Result<(), DirtyError> {
    if (1..64).contains(&shift) {
        Ok(())
    } else {
        Err(DirtyError::BadShift { shift })
    }
}

fn check_buffer(len: usize, offset: u64, bits: u64) -> Result<(), DirtyError> {
    let needed = offset.checked_add(bits).map(words_for).unwrap_or(u64::MAX);
    if (len as u64) < needed {
        Err(DirtyError::ShortBuffer {
            got: len,
            needed,
            bits,
            offset,
        })
    } else {
        Ok(())
    }
}

/// Converts little-endian bytes to words; a partial last word is zero-padded.
pub fn le_bytes_to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect()
}

/// Writes words as little-endian bytes into `out`, stopping at whichever ends first.
pub fn words_to_le_bytes(words: &[u64], out: &mut [u8]) {
    for (chunk, word) in out.chunks_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// A point-in-time copy of a bitmap, as returned by a harvest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySnapshot {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySnapshot {
    /// A snapshot over foreign words; bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Result<Self, DirtyError> {
        check_buffer(words.len(), 0, pages)?;
        words.truncate(word_index(words_for(pages)));
        if let Some(last) = words.last_mut() {
            let rest = pages % WORD_BITS;
            if rest != 0 {
                *last &= bit_mask(0, rest);
            }
        }
        Ok(Self { words, pages })
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words, bit *i* = page *i*.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Consumes the snapshot, returning its words.
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Whether a page is dirty (false past the end).
    pub fn test(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / WORD_BITS) as usize] & (1 << (page % WORD_BITS)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Calls `f(first_page, n_pages)` for each run of dirty pages in ascending order.
    pub fn for_each_run(&self, f: impl FnMut(u64, u64)) {
        scan_runs(&mut PlainWords(&self.words), f);
    }

    /// The runs of dirty pages `(first_page, n_pages)` in ascending order.
    pub fn collect_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        self.for_each_run(|first, n| runs.push((first, n)));
        runs
    }

    /// The snapshot as little-endian bytes, a whole number of words.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.words.len() * 8];
        words_to_le_bytes(&self.words, &mut out);
        out
    }
}

#[cfg(test)]
mod tests;
