//! CPU dirty tracking: which guest pages the vCPUs wrote, in every mode KVM offers, behind one
//! type. A harvest ORs the pages dirtied since the previous harvest into a `vmig-dirty` bitmap
//! indexed by guest-physical page number, and returns only after KVM has write-protected those
//! pages again, so the caller may read them at once: a write that lands after the read is
//! reported by a later harvest.
//!
//! | mode | KVM interface | harvest |
//! |---|---|---|
//! | `bitmap` | `KVM_GET_DIRTY_LOG` | get (KVM clears and re-protects) |
//! | `clear-log` | `MANUAL_DIRTY_LOG_PROTECT2` + `INITIALLY_SET` | get, then `KVM_CLEAR_DIRTY_LOG` of what was set, in 64-page-aligned chunks |
//! | `ring` | `DIRTY_LOG_RING_ACQ_REL` (else `DIRTY_LOG_RING`) | every vCPU ring (acquire/release on the flags), `KVM_RESET_DIRTY_RINGS`, then publish |
//! | `ring-with-bitmap` | the ring plus `DIRTY_LOG_RING_WITH_BITMAP` (arm64) | as `ring`, then `KVM_GET_DIRTY_LOG` as the very last step (seed 004) |
//!
//! A vCPU whose ring is full exits with `KVM_EXIT_DIRTY_RING_FULL`; its thread calls
//! [`CpuDirtyLog::on_ring_full`], which harvests every ring into a pending bitmap that the next
//! harvest drains, and re-enters.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmig_dirty::DirtyBitmap;

use crate::error::{KvmError, Result, ioctl_error};
use crate::memory::{GuestMemory, SlotLayout};
use crate::sys::{self, DirtyRing};

/// Which KVM interface tracks the pages vCPUs write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG`, which clears as it reads.
    Bitmap,
    /// Manual protect: `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG`.
    ClearLog,
    /// Per-vCPU dirty rings.
    Ring,
    /// Dirty rings backed by a per-slot bitmap (arm64 only).
    RingWithBitmap,
}

impl DirtyLogMode {
    /// Every mode, in the order the command line lists them.
    pub const ALL: [DirtyLogMode; 4] = [
        DirtyLogMode::Bitmap,
        DirtyLogMode::ClearLog,
        DirtyLogMode::Ring,
        DirtyLogMode::RingWithBitmap,
    ];

    /// Whether the mode uses dirty rings.
    pub fn uses_ring(self) -> bool {
        matches!(self, Self::Ring | Self::RingWithBitmap)
    }
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bitmap => "bitmap",
            Self::ClearLog => "clear-log",
            Self::Ring => "ring",
            Self::RingWithBitmap => "ring-with-bitmap",
        })
    }
}

impl FromStr for DirtyLogMode {
    type Err = KvmError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.to_string() == s)
            .ok_or_else(|| {
                KvmError::Invalid(format!(
                    "unknown dirty-log mode `{s}`: expected bitmap, clear-log, ring or ring-with-bitmap"
                ))
            })
    }
}

/// Default pages per `KVM_CLEAR_DIRTY_LOG` call (QEMU's `x-clear-bitmap-shift` 18: 1 GiB).
pub const DEFAULT_CLEAR_CHUNK_PAGES: u64 = 1 << 18;

/// How often the reaper drains the dirty rings while tracking is on.
pub const DEFAULT_REAP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

struct Reaper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Counters of one tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyLogStats {
    /// Harvests run.
    pub harvests: u64,
    /// Pages reported (summed over harvests; a page reported twice counts twice).
    pub pages_reported: u64,
    /// Ring entries harvested.
    pub ring_entries: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub ring_full_exits: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls.
    pub clear_calls: u64,
    /// Rings found completely full, which KVM may have wrapped: every page was reported dirty.
    pub ring_overflows: u64,
    /// Time spent draining rings outside harvests (reaper and ring-full exits), in nanoseconds.
    pub reap_nanos: u64,
}

/// The CPU half of dirty tracking for one VM.
pub struct CpuDirtyLog {
    mode: DirtyLogMode,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    rings: Mutex<Vec<DirtyRing>>,
    /// Pages harvested from rings at ring-full exits, not yet handed to a caller.
    ring_pending: DirtyBitmap,
    clear_chunk_pages: AtomicU64,
    tracking: Mutex<bool>,
    reaper: Mutex<Option<Reaper>>,
    failure: Mutex<Option<Arc<KvmError>>>,
    reap_interval_us: AtomicU64,
    empty_ring_full_exits: AtomicU64,
    ring_overflows: AtomicU64,
    reap_nanos: AtomicU64,
    harvests: AtomicU64,
    pages_reported: AtomicU64,
    ring_entries: AtomicU64,
    ring_full_exits: AtomicU64,
    clear_calls: AtomicU64,
}

impl fmt::Debug for CpuDirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuDirtyLog")
            .field("mode", &self.mode)
            .field("tracking", &self.is_tracking())
            .finish_non_exhaustive()
    }
}

impl CpuDirtyLog {
    /// A tracker over `memory`'s slots, already registered in `vm` with the capabilities `mode`
    /// needs; `rings` are the vCPUs' mapped rings in ring modes.
    pub(crate) fn new(
        mode: DirtyLogMode,
        vm: Arc<VmFd>,
        memory: Arc<GuestMemory>,
        rings: Vec<DirtyRing>,
    ) -> Result<Self> {
        let pages = memory.layout().top_page();
        Ok(Self {
            mode,
            vm,
            memory,
            rings: Mutex::new(rings),
            ring_pending: DirtyBitmap::try_new(pages)?,
            clear_chunk_pages: AtomicU64::new(DEFAULT_CLEAR_CHUNK_PAGES),
            tracking: Mutex::new(false),
            reaper: Mutex::new(None),
            failure: Mutex::new(None),
            reap_interval_us: AtomicU64::new(
                u64::try_from(DEFAULT_REAP_INTERVAL.as_micros()).unwrap_or(u64::MAX),
            ),
            empty_ring_full_exits: AtomicU64::new(0),
            ring_overflows: AtomicU64::new(0),
            reap_nanos: AtomicU64::new(0),
            harvests: AtomicU64::new(0),
            pages_reported: AtomicU64::new(0),
            ring_entries: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            clear_calls: AtomicU64::new(0),
        })
    }

    /// The mode.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Pages per `KVM_CLEAR_DIRTY_LOG` call in `clear-log` mode: a multiple of 64, at least 64.
    pub fn set_clear_chunk_pages(&self, pages: u64) -> Result<()> {
        if pages < 64 || !pages.is_multiple_of(64) || pages > u64::from(u32::MAX) / 2 {
            return Err(KvmError::Invalid(format!(
                "clear chunk of {pages} pages: KVM_CLEAR_DIRTY_LOG needs a multiple of 64 pages"
            )));
        }
        self.clear_chunk_pages.store(pages, Ordering::Relaxed);
        Ok(())
    }

    /// How often the reaper thread drains the rings (ring modes); `None` leaves them to
    /// ring-full exits and harvests alone. Takes effect at the next [`Self::start`].
    pub fn set_reap_interval(&self, interval: Option<std::time::Duration>) {
        let us = interval.map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        self.reap_interval_us.store(us, Ordering::Relaxed);
    }

    /// Whether tracking is on.
    pub fn is_tracking(&self) -> bool {
        *self.tracking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters so far.
    pub fn stats(&self) -> DirtyLogStats {
        DirtyLogStats {
            harvests: self.harvests.load(Ordering::Relaxed),
            pages_reported: self.pages_reported.load(Ordering::Relaxed),
            ring_entries: self.ring_entries.load(Ordering::Relaxed),
            ring_full_exits: self.ring_full_exits.load(Ordering::Relaxed),
            clear_calls: self.clear_calls.load(Ordering::Relaxed),
            ring_overflows: self.ring_overflows.load(Ordering::Relaxed),
            reap_nanos: self.reap_nanos.load(Ordering::Relaxed),
        }
    }

    fn set_slot_logging(&self, on: bool) -> Result<()> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for slot in self.memory.slots() {
            sys::set_memory_slot(
                &self.vm,
                slot.layout.id,
                flags,
                slot.layout.gpa,
                slot.host(),
            )
            .map_err(|source| KvmError::Ioctl {
                call: format!(
                    "KVM_SET_USER_MEMORY_REGION(slot {}, dirty logging {})",
                    slot.layout.id,
                    if on { "on" } else { "off" }
                ),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts tracking: from now on every page a vCPU writes is reported by a later harvest. In
    /// `clear-log` mode the first harvest reports every page (`INITIALLY_SET`). In ring modes a
    /// reaper thread drains the rings every [`DEFAULT_REAP_INTERVAL`] so they stay far from
    /// full. Starting twice is a no-op.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let mut tracking = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
        if *tracking {
            return Ok(());
        }
        // A new tracking period starts from a full pass: an earlier failure no longer matters.
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if self.mode.uses_ring() {
            // Entries left from an earlier tracking period are stale: drop them.
            let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
            self.collect_rings(&mut rings, |_| {})?;
            let _ = self.ring_pending.harvest();
        }
        if let Err(e) = self.set_slot_logging(true) {
            let _ = self.set_slot_logging(false);
            return Err(e);
        }
        if self.mode.uses_ring() && self.reap_interval_us.load(Ordering::Relaxed) != 0 {
            let stop = Arc::new(AtomicBool::new(false));
            let weak = Arc::downgrade(self);
            let interval =
                std::time::Duration::from_micros(self.reap_interval_us.load(Ordering::Relaxed));
            let thread = {
                let stop = Arc::clone(&stop);
                std::thread::Builder::new()
                    .name("dirty-ring-reaper".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            std::thread::park_timeout(interval);
                            if stop.load(Ordering::Acquire) {
                                return;
                            }
                            let Some(log) = weak.upgrade() else { return };
                            // A failure is recorded by `reap` and surfaces at the next harvest.
                            let _ = log.reap();
                        }
                    })?
            };
            *self.reaper.lock().unwrap_or_else(|e| e.into_inner()) = Some(Reaper { stop, thread });
        }
        *tracking = true;
        Ok(())
    }

    fn stop_reaper(&self) {
        let reaper = self.reaper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reaper) = reaper {
            reaper.stop.store(true, Ordering::Release);
            reaper.thread.thread().unpark();
            if reaper.thread.thread().id() != std::thread::current().id() {
                let _ = reaper.thread.join();
            }
        }
    }

    fn record_failure(&self, why: Arc<KvmError>) {
        tracing::warn!(error = %why, "CPU dirty tracking can no longer vouch for every page");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// Stops tracking. Pages dirtied before the stop and not yet harvested are lost, so the
    /// migration engine harvests first.
    pub fn stop(&self) -> Result<()> {
        let mut tracking = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
        if !*tracking {
            return Ok(());
        }
        self.stop_reaper();
        self.set_slot_logging(false)?;
        *tracking = false;
        let _ = self.ring_pending.harvest();
        Ok(())
    }

    /// ORs every page dirtied since the last harvest into `into` (guest-physical page numbers;
    /// it must cover the VM's top page) and returns how many pages this harvest reported.
    ///
    /// While vCPUs run, a ring harvest sees what KVM has pushed so far (a CPU's PML buffer is
    /// flushed at its next exit); after [`crate::Vm::pause`] a harvest is complete. On error,
    /// keep `into`: it may already hold pages KVM will not report again. The tracker then
    /// refuses further harvests ([`KvmError::DirtyLog`]) until it is stopped and started again.
    pub fn harvest(&self, into: &DirtyBitmap) -> Result<u64> {
        if into.pages() < self.memory.layout().top_page() {
            return Err(KvmError::Invalid(format!(
                "a bitmap of {} pages cannot hold this VM's {} guest pages",
                into.pages(),
                self.memory.layout().top_page()
            )));
        }
        let tracking = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
        if !*tracking {
            return Err(KvmError::Order(
                "harvest before start: start CPU dirty tracking first".into(),
            ));
        }
        if let Some(why) = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(KvmError::DirtyLogFailed(why));
        }
        let result = match self.mode {
            DirtyLogMode::Bitmap => self.harvest_bitmaps(into, false),
            DirtyLogMode::ClearLog => self.harvest_bitmaps(into, true),
            DirtyLogMode::Ring => self.harvest_rings(into),
            DirtyLogMode::RingWithBitmap => {
                // The bitmap catches writes made without a running vCPU; collect it last.
                self.harvest_rings(into)
                    .and_then(|ring| Ok(ring + self.harvest_bitmaps(into, false)?))
            }
        };
        let reported = match result {
            Ok(reported) => reported,
            Err(e) => {
                // Pages may already have been taken from KVM (and are in `into`); later
                // harvests cannot promise completeness until tracking restarts.
                let e = Arc::new(e);
                self.record_failure(Arc::clone(&e));
                return Err(KvmError::DirtyLogFailed(e));
            }
        };
        drop(tracking);
        self.harvests.fetch_add(1, Ordering::Relaxed);
        self.pages_reported.fetch_add(reported, Ordering::Relaxed);
        Ok(reported)
    }

    fn harvest_bitmaps(&self, into: &DirtyBitmap, clear: bool) -> Result<u64> {
        let mut reported = 0;
        for slot in self.memory.slots() {
            let layout = slot.layout;
            let words = self
                .vm
                .get_dirty_log(layout.id, crate::memory::host_offset(layout.size))
                .map_err(ioctl_error(format!(
                    "KVM_GET_DIRTY_LOG(slot {})",
                    layout.id
                )))?;
            // KVM has either cleared these bits (bitmap) or will clear some of them before an
            // error (clear-log): hand them over whatever happens next.
            let cleared = if clear {
                self.clear_log(&layout, &words)
            } else {
                Ok(())
            };
            reported += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            into.merge_words(layout.first_page(), &words, layout.pages())?;
            cleared?;
        }
        Ok(reported)
    }

    /// `KVM_CLEAR_DIRTY_LOG` of exactly the bits in `words`, one call per [`clear_chunks`] entry.
    fn clear_log(&self, layout: &SlotLayout, words: &[u64]) -> Result<()> {
        for (word_range, first_page, num_pages) in clear_chunks(
            words,
            layout.pages(),
            self.clear_chunk_pages.load(Ordering::Relaxed),
        ) {
            sys::clear_dirty_log(
                &self.vm,
                layout.id,
                first_page,
                num_pages,
                &words[word_range],
            )
            .map_err(|source| KvmError::Ioctl {
                call: format!(
                    "KVM_CLEAR_DIRTY_LOG(slot {}, pages {first_page}+{num_pages})",
                    layout.id
                ),
                source,
            })?;
            self.clear_calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Harvests every ring, resets them in KVM, and only then hands the pages over (with the
    /// pending ones from ring-full exits).
    fn harvest_rings(&self, into: &DirtyBitmap) -> Result<u64> {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages = Vec::new();
        if let Err(e) = self.collect_rings(&mut rings, |page| pages.push(page)) {
            // Entries already marked reset are not reported again: keep them for the next
            // harvest rather than lose them.
            for page in pages {
                let _ = self.ring_pending.set(page);
            }
            return Err(e);
        }
        let mut runs = Vec::new();
        self.ring_pending
            .harvest_each_run(|first, count| runs.push((first, count)));
        drop(rings);
        let mut reported = pages.len() as u64;
        for page in pages {
            into.set(page)?;
        }
        for (first, count) in runs {
            reported += count;
            into.set_range(first, count)?;
        }
        Ok(reported)
    }

    /// Drains every ring, translating entries to guest page numbers for `sink`, then calls
    /// `KVM_RESET_DIRTY_RINGS` and checks it reset exactly what was harvested. Returns the
    /// number of entries harvested.
    ///
    /// A ring found completely full may have been wrapped by KVM (seen on nested `kvm_pvm`,
    /// which does not always stop a vCPU at the ring's soft limit): entries may have been
    /// overwritten, so every guest page is reported dirty through the pending bitmap.
    fn collect_rings(&self, rings: &mut [DirtyRing], mut sink: impl FnMut(u64)) -> Result<u64> {
        let slots: Vec<SlotLayout> = self.memory.slots().iter().map(|s| s.layout).collect();
        let mut harvested = 0u64;
        let mut bad = None;
        for ring in rings.iter_mut() {
            let count = ring.harvest(|slot, offset| {
                match slots
                    .iter()
                    .find(|s| s.id == slot & 0xffff && slot >> 16 == 0)
                {
                    Some(s) if offset < s.pages() => sink(s.first_page() + offset),
                    _ => bad = Some((slot, offset)),
                }
            });
            if count >= ring.entries() {
                self.ring_overflows.fetch_add(1, Ordering::Relaxed);
                let _ = self.ring_pending.set_range(0, self.ring_pending.pages());
            }
            harvested += u64::from(count);
        }
        if harvested == 0 {
            return Ok(0);
        }
        self.ring_entries.fetch_add(harvested, Ordering::Relaxed);
        let reset = sys::reset_dirty_rings(&self.vm).map_err(|source| KvmError::Ioctl {
            call: "KVM_RESET_DIRTY_RINGS".into(),
            source,
        })?;
        if let Some((slot, offset)) = bad {
            return Err(KvmError::DirtyLog(format!(
                "a dirty ring entry names slot {slot:#x} page {offset}, which is not guest RAM"
            )));
        }
        if reset != harvested {
            return Err(KvmError::DirtyLog(format!(
                "KVM_RESET_DIRTY_RINGS reset {reset} entries where {harvested} were harvested: the kernel wrote past the end of a ring and it is out of step (use a larger ring, keep the reaper on, or use bitmap / clear-log)"
            )));
        }
        Ok(harvested)
    }

    /// Called by a vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`: harvests every ring into the
    /// pending bitmap and resets them, so the vCPU can re-enter.
    pub fn on_ring_full(&self) -> Result<()> {
        self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        // A kick arriving during KVM_RESET_DIRTY_RINGS would make it stop midway with EINTR;
        // hold kicks until the reap is done (the kick still takes effect right after).
        let reaped = {
            let _held = sys::KickSignalBlocked::new()?;
            self.reap()?
        };
        if reaped > 0 {
            self.empty_ring_full_exits.store(0, Ordering::Relaxed);
            return Ok(());
        }
        // Another thread may just have drained the ring; a long run of exits with nothing to
        // harvest means KVM's indices and ours disagree, and the vCPU would spin forever.
        if self.empty_ring_full_exits.fetch_add(1, Ordering::Relaxed) > 10_000 {
            let e = Arc::new(KvmError::RingOutOfStep);
            self.record_failure(Arc::clone(&e));
            return Err(KvmError::DirtyLogFailed(e));
        }
        std::thread::yield_now();
        Ok(())
    }

    /// Drains every ring into the pending bitmap (the next harvest hands it over); returns the
    /// entries harvested.
    fn reap(&self) -> Result<u64> {
        let started = std::time::Instant::now();
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages = Vec::new();
        // Publish to the pending bitmap under the ring lock, so a concurrent harvest either
        // sees these pages or leaves them for the next one; never half.
        let result = self.collect_rings(&mut rings, |page| pages.push(page));
        for page in pages {
            let _ = self.ring_pending.set(page);
        }
        drop(rings);
        let result = result.map_err(|e| {
            // The pending pages may not have been re-protected: no later harvest may vouch
            // for completeness.
            let e = Arc::new(e);
            self.record_failure(Arc::clone(&e));
            KvmError::Shared(e)
        });
        self.reap_nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }
}

impl Drop for CpuDirtyLog {
    fn drop(&mut self) {
        self.stop_reaper();
    }
}

/// The `KVM_CLEAR_DIRTY_LOG` calls that clear exactly the bits of `words` (a slot of `pages`
/// pages): one per run of non-zero words, cut every `chunk_pages`. Each is (the words it
/// passes, first page, page count); every first page is a multiple of 64 and every count is too
/// unless the call ends at the slot's end, as KVM requires (api.rst 4.117).
fn clear_chunks(
    words: &[u64],
    pages: u64,
    chunk_pages: u64,
) -> Vec<(std::ops::Range<usize>, u64, u32)> {
    let chunk_words = (chunk_pages / 64).max(1) as usize;
    let mut calls = Vec::new();
    let mut word = 0;
    while word < words.len() {
        if words[word] == 0 {
            word += 1;
            continue;
        }
        let start = word;
        while word < words.len() && words[word] != 0 && word - start < chunk_words {
            word += 1;
        }
        let first_page = start as u64 * 64;
        let num_pages = (word as u64 * 64).min(pages) - first_page;
        let num_pages = u32::try_from(num_pages)
            .expect("a memslot has fewer than 2^32 pages (guest RAM is at most 256 GiB)");
        calls.push((start..word, first_page, num_pages));
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_chunks_follow_kvms_alignment_rules_and_cover_every_bit() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for round in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pages = 1 + seed % 3000;
            let mut words = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap()];
            for (i, w) in words.iter_mut().enumerate() {
                let r = seed.rotate_left(u32::try_from(i).unwrap() * 7);
                *w = if r.is_multiple_of(3) { 0 } else { r };
            }
            if !pages.is_multiple_of(64) {
                *words.last_mut().unwrap() &= (1 << (pages % 64)) - 1;
            }
            let chunk = 64 * (1 + round % 5);
            let mut covered = vec![0u64; words.len()];
            for (range, first, count) in clear_chunks(&words, pages, chunk) {
                assert_eq!(first % 64, 0);
                assert!(u64::from(count) % 64 == 0 || first + u64::from(count) == pages);
                assert!(u64::from(count) <= chunk);
                assert_eq!(range.start as u64 * 64, first);
                for w in range {
                    covered[w] = words[w];
                }
            }
            assert_eq!(covered, words, "round {round}");
        }
    }

    #[test]
    fn modes_parse_and_print_the_same_names() {
        for mode in DirtyLogMode::ALL {
            assert_eq!(mode.to_string().parse::<DirtyLogMode>().unwrap(), mode);
        }
        let err = "fast".parse::<DirtyLogMode>().unwrap_err().to_string();
        assert!(
            err.contains("expected bitmap, clear-log, ring or ring-with-bitmap"),
            "{err}"
        );
    }
}
