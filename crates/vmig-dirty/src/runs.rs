//! Iteration over runs of dirty pages: one scan over a bitmap's words, whatever their access
//! (concurrent read-and-clear, concurrent read, exclusive read-and-clear, plain words), that
//! skips clean memory a block of words at a time and cuts each dirty word into runs
//! `(first_page, n_pages)` with bit scans.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::WORD_BITS;

/// Word access for [`scan_runs`]: `peek` is a cheap look used to skip clean words, `take`
/// delivers a word's bits (and clears them, for a harvest).
pub(crate) trait WordSource {
    fn len(&self) -> usize;
    fn peek(&mut self, i: usize) -> u64;
    fn take(&mut self, i: usize) -> u64;
}

/// Concurrent read-and-clear: the exchange happens only for words that look dirty.
pub(crate) struct SharedTake<'a>(pub(crate) &'a [AtomicU64]);
impl WordSource for SharedTake<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn peek(&mut self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
    #[inline]
    fn take(&mut self, i: usize) -> u64 {
        self.0[i].swap(0, Ordering::AcqRel)
    }
}

/// Concurrent read without clearing.
pub(crate) struct SharedPeek<'a>(pub(crate) &'a [AtomicU64]);
impl WordSource for SharedPeek<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn peek(&mut self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
    #[inline]
    fn take(&mut self, i: usize) -> u64 {
        self.0[i].load(Ordering::Acquire)
    }
}

/// Read-and-clear with exclusive access: plain loads and stores.
pub(crate) struct ExclusiveTake<'a>(pub(crate) &'a mut [AtomicU64]);
impl WordSource for ExclusiveTake<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn peek(&mut self, i: usize) -> u64 {
        *self.0[i].get_mut()
    }
    #[inline]
    fn take(&mut self, i: usize) -> u64 {
        std::mem::take(self.0[i].get_mut())
    }
}

/// Plain words of a snapshot.
pub(crate) struct PlainWords<'a>(pub(crate) &'a [u64]);
impl WordSource for PlainWords<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn peek(&mut self, i: usize) -> u64 {
        self.0[i]
    }
    #[inline]
    fn take(&mut self, i: usize) -> u64 {
        self.0[i]
    }
}

/// Words looked at together when skipping clean memory: one test per block, not per word.
const SCAN_BLOCK: usize = 8;
/// Words scanned per window; the window's index lists live on the stack, as `u16`s.
const SCAN_WINDOW: usize = 4096;
const _: () = assert!(SCAN_WINDOW <= 1 << 16, "window indices are u16");

/// A word's (or block's) index inside a scan window, as the window's index lists hold it.
#[inline]
#[expect(
    clippy::cast_possible_truncation,
    reason = "indices inside a window are below SCAN_WINDOW, which fits a u16 (asserted above)"
)]
fn window_index(j: usize) -> u16 {
    debug_assert!(j < SCAN_WINDOW);
    j as u16
}

/// The run being built while words are scanned in ascending order.
struct RunCutter {
    /// First page of the open run, if one reaches the end of the last word visited.
    open: Option<u64>,
    /// The page just past the last word the open run reached.
    run_end: u64,
}

impl RunCutter {
    /// Feeds word `i`, calling `emit` for every run it completes.
    #[inline]
    fn word(&mut self, i: usize, mut bits: u64, emit: &mut impl FnMut(u64, u64)) {
        let base = i as u64 * WORD_BITS;
        if let Some(start) = self.open {
            // The open run continues only into the very next word, from its bit 0.
            let ones = if base == self.run_end {
                bits.trailing_ones()
            } else {
                0
            };
            if ones == 64 {
                self.run_end = base + WORD_BITS;
                return;
            }
            let end = if ones == 0 {
                self.run_end
            } else {
                base + u64::from(ones)
            };
            emit(start, end - start);
            self.open = None;
            bits &= u64::MAX << ones;
        }
        while bits != 0 {
            let tz = bits.trailing_zeros();
            let ones = (bits >> tz).trailing_ones();
            if tz + ones == 64 {
                self.open = Some(base + u64::from(tz));
                self.run_end = base + WORD_BITS;
                return;
            }
            emit(base + u64::from(tz), u64::from(ones));
            bits &= u64::MAX << (tz + ones);
        }
    }

    fn finish(self, emit: &mut impl FnMut(u64, u64)) {
        if let Some(start) = self.open {
            emit(start, self.run_end - start);
        }
    }
}

/// Calls `emit(first_page, n_pages)` for each run of set bits, in ascending order.
///
/// Dirty pages are sparse and scattered, so a branch per word mispredicts often. The scan works
/// on windows of words in three passes without data-dependent branches until the last: list
/// the blocks of 8 words that hold any bit, list the dirty words of those blocks, then take
/// each listed word and cut its runs with bit scans.
#[inline]
pub(crate) fn scan_runs(src: &mut impl WordSource, mut emit: impl FnMut(u64, u64)) {
    let n = src.len();
    let mut cutter = RunCutter {
        open: None,
        run_end: 0,
    };
    let mut blocks = [0u16; SCAN_WINDOW / SCAN_BLOCK];
    let mut dirty = [0u16; SCAN_WINDOW];
    let mut window = 0;
    while window < n {
        let len = SCAN_WINDOW.min(n - window);
        let full_blocks = len / SCAN_BLOCK;
        let mut nblocks = 0;
        for b in 0..full_blocks {
            let first = window + b * SCAN_BLOCK;
            let mut any = 0;
            for k in 0..SCAN_BLOCK {
                any |= src.peek(first + k);
            }
            blocks[nblocks] = window_index(b);
            nblocks += usize::from(any != 0);
        }
        let mut ndirty = 0;
        for &b in &blocks[..nblocks] {
            for k in 0..SCAN_BLOCK {
                let j = usize::from(b) * SCAN_BLOCK + k;
                dirty[ndirty] = window_index(j);
                ndirty += usize::from(src.peek(window + j) != 0);
            }
        }
        for j in full_blocks * SCAN_BLOCK..len {
            dirty[ndirty] = window_index(j);
            ndirty += usize::from(src.peek(window + j) != 0);
        }
        for &j in &dirty[..ndirty] {
            let i = window + usize::from(j);
            let bits = src.take(i);
            cutter.word(i, bits, &mut emit);
        }
        window += len;
    }
    cutter.finish(&mut emit);
}
