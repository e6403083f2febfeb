//! Unit and property tests: every operation against a naive `Vec<bool>` model.

use super::*;
use proptest::prelude::*;
use std::sync::atomic::AtomicBool;

/// A test's page or word count as an index (test sizes are small).
fn us(v: u64) -> usize {
    usize::try_from(v).expect("a test size fits a usize")
}

fn model_runs(model: &[bool]) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < model.len() {
        if model[i] {
            let start = i;
            while i < model.len() && model[i] {
                i += 1;
            }
            runs.push((start as u64, (i - start) as u64));
        } else {
            i += 1;
        }
    }
    runs
}

fn model_words(model: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; us(words_for(model.len() as u64))];
    for (i, _) in model.iter().enumerate().filter(|(_, d)| **d) {
        words[i / 64] |= 1 << (i % 64);
    }
    words
}

fn assert_matches(bitmap: &DirtyBitmap, model: &[bool]) {
    for (page, &dirty) in model.iter().enumerate() {
        assert_eq!(bitmap.test(page as u64).unwrap(), dirty, "page {page}");
    }
    assert_eq!(bitmap.count(), model.iter().filter(|d| **d).count() as u64);
    assert_eq!(bitmap.collect_runs(), model_runs(model));
    assert_eq!(bitmap.snapshot().words(), &model_words(model)[..]);
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64),
    Clear(u64),
    SetRange(u64, u64),
    ClearRange(u64, u64),
    Merge {
        offset: u64,
        words: Vec<u64>,
        nbits: u64,
    },
    Harvest,
    HarvestRange {
        first: u64,
        count: u64,
        out_bit: u64,
    },
}

fn op_strategy(pages: u64) -> impl Strategy<Value = Op> {
    let range = (0..=pages).prop_flat_map(move |first| (Just(first), 0..=pages - first));
    prop_oneof![
        (0..pages).prop_map(Op::Set),
        (0..pages).prop_map(Op::Clear),
        range.clone().prop_map(|(f, c)| Op::SetRange(f, c)),
        range.clone().prop_map(|(f, c)| Op::ClearRange(f, c)),
        range
            .clone()
            .prop_flat_map(|(offset, nbits)| {
                let n = us(words_for(nbits));
                (
                    Just(offset),
                    proptest::collection::vec(any::<u64>(), n..=n + 1),
                    Just(nbits),
                )
            })
            .prop_map(|(offset, words, nbits)| Op::Merge {
                offset,
                words,
                nbits
            }),
        Just(Op::Harvest),
        (range, 0u64..130).prop_map(|((first, count), out_bit)| Op::HarvestRange {
            first,
            count,
            out_bit
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_operation_matches_the_vec_bool_model(
        (pages, ops) in (1u64..300).prop_flat_map(|p| (Just(p), proptest::collection::vec(op_strategy(p), 1..40)))
    ) {
        let bitmap = DirtyBitmap::new(pages);
        let mut model = vec![false; us(pages)];
        for op in ops {
            match op {
                Op::Set(p) => { bitmap.set(p).unwrap(); model[us(p)] = true; }
                Op::Clear(p) => { bitmap.clear(p).unwrap(); model[us(p)] = false; }
                Op::SetRange(f, c) => {
                    bitmap.set_range(f, c).unwrap();
                    model[us(f)..us(f + c)].fill(true);
                }
                Op::ClearRange(f, c) => {
                    bitmap.clear_range(f, c).unwrap();
                    model[us(f)..us(f + c)].fill(false);
                }
                Op::Merge { offset, words, nbits } => {
                    let mut exclusive = DirtyBitmap::new(pages);
                    exclusive.merge_words_exclusive(offset, &words, nbits).unwrap();
                    let shared = DirtyBitmap::new(pages);
                    shared.merge_words(offset, &words, nbits).unwrap();
                    prop_assert_eq!(exclusive.snapshot(), shared.snapshot());
                    bitmap.merge_words(offset, &words, nbits).unwrap();
                    for i in 0..nbits {
                        if words[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                            model[us(offset + i)] = true;
                        }
                    }
                }
                Op::Harvest => {
                    let snap = bitmap.harvest();
                    prop_assert_eq!(snap.words(), &model_words(&model)[..]);
                    prop_assert_eq!(snap.collect_runs(), model_runs(&model));
                    model.fill(false);
                }
                Op::HarvestRange { first, count, out_bit } => {
                    let mut out = vec![0u64; us(words_for(out_bit + count))];
                    let mut exported = out.clone();
                    bitmap.export_range_into(first, count, &mut exported, out_bit).unwrap();
                    bitmap.harvest_range_into(first, count, &mut out, out_bit).unwrap();
                    prop_assert_eq!(&exported, &out);
                    for i in 0..out_bit + count {
                        let bit = out[(i / 64) as usize] & (1 << (i % 64)) != 0;
                        let expect = i >= out_bit && model[us(first + i - out_bit)];
                        prop_assert_eq!(bit, expect, "out bit {}", i);
                    }
                    model[us(first)..us(first + count)].fill(false);
                }
            }
            assert_matches(&bitmap, &model);
            let (f, c) = (pages / 3, pages / 2);
            let expected = model[us(f)..us(f + c)].iter().filter(|d| **d).count() as u64;
            prop_assert_eq!(bitmap.count_range(f, c).unwrap(), expected);
            prop_assert_eq!(bitmap.any_in_range(f, c).unwrap(), expected != 0);
        }
    }

    #[test]
    fn harvest_runs_yields_the_model_runs_and_clears(
        model in proptest::collection::vec(any::<bool>(), 1..400)
    ) {
        let bitmap = DirtyBitmap::new(model.len() as u64);
        for (i, _) in model.iter().enumerate().filter(|(_, d)| **d) {
            bitmap.set(i as u64).unwrap();
        }
        let mut runs = Vec::new();
        bitmap.harvest_each_run(|first, n| runs.push((first, n)));
        prop_assert_eq!(&runs, &model_runs(&model));
        prop_assert!(bitmap.is_clean());
        let mut exclusive = DirtyBitmap::new(model.len() as u64);
        for (first, n) in &runs {
            exclusive.set_range(*first, *n).unwrap();
        }
        let mut runs_exclusive = Vec::new();
        exclusive.harvest_each_run_exclusive(|first, n| runs_exclusive.push((first, n)));
        prop_assert_eq!(runs_exclusive, runs);
        prop_assert!(exclusive.is_clean());
    }

    #[test]
    fn export_preserves_bits_outside_the_exported_range(
        model in proptest::collection::vec(any::<bool>(), 1..200),
        garbage in any::<u64>(),
        out_bit in 0u64..70,
    ) {
        let bitmap = DirtyBitmap::new(model.len() as u64);
        for (i, _) in model.iter().enumerate().filter(|(_, d)| **d) {
            bitmap.set(i as u64).unwrap();
        }
        let count = model.len() as u64;
        let mut out = vec![garbage; us(words_for(out_bit + count)) + 1];
        bitmap.export_range_into(0, count, &mut out, out_bit).unwrap();
        for i in 0..out.len() as u64 * 64 {
            let bit = out[(i / 64) as usize] & (1 << (i % 64)) != 0;
            let garbage_bit = garbage & (1 << (i % 64)) != 0;
            let expect = if (out_bit..out_bit + count).contains(&i) {
                garbage_bit || model[us(i - out_bit)]
            } else {
                garbage_bit
            };
            prop_assert_eq!(bit, expect);
        }
    }

    #[test]
    fn page_size_conversion_matches_the_model(
        model in proptest::collection::vec(any::<bool>(), 1..300),
        shift in 1u32..5,
    ) {
        let bitmap = DirtyBitmap::new(model.len() as u64);
        for (i, _) in model.iter().enumerate().filter(|(_, d)| **d) {
            bitmap.set(i as u64).unwrap();
        }
        let ratio = 1usize << shift;
        let coarse = bitmap.to_coarser(shift).unwrap();
        let coarse_model: Vec<bool> = model.chunks(ratio).map(|c| c.iter().any(|d| *d)).collect();
        assert_matches(&coarse, &coarse_model);
        let fine = coarse.to_finer(shift).unwrap();
        let fine_model: Vec<bool> = coarse_model.iter().flat_map(|&d| std::iter::repeat_n(d, ratio)).collect();
        assert_matches(&fine, &fine_model);
    }

    #[test]
    fn le_bytes_merge_equals_word_merge(
        bytes in proptest::collection::vec(any::<u8>(), 1..40),
        offset in 0u64..100,
    ) {
        let nbits = bytes.len() as u64 * 8;
        let a = DirtyBitmap::new(offset + nbits);
        let b = DirtyBitmap::new(offset + nbits);
        a.merge_le_bytes(offset, &bytes, nbits).unwrap();
        b.merge_words(offset, &le_bytes_to_words(&bytes), nbits).unwrap();
        prop_assert_eq!(a.snapshot(), b.snapshot());
        let mut round = vec![0u8; bytes.len()];
        words_to_le_bytes(&le_bytes_to_words(&bytes), &mut round);
        prop_assert_eq!(round, bytes);
    }
}

#[test]
fn out_of_range_is_an_error_not_a_panic() {
    let bitmap = DirtyBitmap::new(10);
    assert!(matches!(bitmap.set(10), Err(DirtyError::OutOfRange { .. })));
    assert!(bitmap.set_range(5, 6).is_err());
    assert!(bitmap.set_range(u64::MAX, 2).is_err());
    assert!(bitmap.merge_words(8, &[0xff], 3).is_err());
    assert!(bitmap.merge_words(0, &[], 3).is_err());
    let mut out = [0u64; 1];
    assert!(bitmap.export_range_into(0, 10, &mut out, 60).is_err());
    assert!(bitmap.to_coarser(0).is_err());
    assert!(bitmap.to_coarser(64).is_err());
    assert!(DirtyBitmap::try_new(u64::MAX).is_err());
    assert!(bitmap.set_range(10, 0).is_ok());
}

#[test]
fn seed_example_ten_dirty_pages_are_bytes_ff_03() {
    // Seed 000 [L8692-8700]: 10 dirty pages -> bytes 0xFF 0x03, bit i = page i, LSB first.
    let bitmap = DirtyBitmap::new(16);
    bitmap.set_range(0, 10).unwrap();
    assert_eq!(&bitmap.snapshot().to_le_bytes()[..2], &[0xff, 0x03]);
}

#[test]
fn unaligned_merge_spans_word_boundaries() {
    // The type1 placement: a mapping at bit offset 63 of the requested range.
    let bitmap = DirtyBitmap::new(63 + 130);
    bitmap.set_range(0, 63).unwrap();
    bitmap
        .merge_words(63, &[u64::MAX, u64::MAX, u64::MAX], 130)
        .unwrap();
    assert_eq!(bitmap.collect_runs(), vec![(0, 193)]);
}

/// The harvester's side of [`concurrent_marking_during_harvest_never_loses_a_mark`]: the
/// epoch of the latest mark of each page that a harvest is known to have reported.
struct MarkAudit {
    /// Per page: a harvest reported the page after its marks up to this epoch had set its bit.
    covered: Vec<u64>,
    /// Per page: the epoch of its latest mark complete before this harvest started.
    complete: Vec<u64>,
    reported: Vec<bool>,
    out: Vec<u64>,
}

impl MarkAudit {
    fn new(pages: u64) -> Self {
        Self {
            covered: vec![0; us(pages)],
            complete: vec![0; us(pages)],
            reported: vec![false; us(pages)],
            out: vec![0; us(words_for(pages))],
        }
    }

    /// Harvest `round` (by `harvest_each_run`, `harvest` or `harvest_range_into` in turn),
    /// then the check: a page whose mark of epoch `e` was complete (`done[page] >= e`) before
    /// the harvest started was set before it read the page's word, so this harvest or an
    /// earlier one since that mark reported the page. A harvest that reports a page covers
    /// the epochs of the marks whose tag (`pending`, stored before the bit is set) it can see
    /// afterwards; no harvest covers a mark whose bit was lost.
    fn round(
        &mut self,
        round: u64,
        bitmap: &DirtyBitmap,
        pending: &[AtomicU64],
        done: &[AtomicU64],
    ) {
        for (complete, done) in self.complete.iter_mut().zip(done) {
            *complete = done.load(Ordering::Acquire);
        }
        self.reported.fill(false);
        let pages = bitmap.pages();
        let mut report = |first: u64, count: u64| {
            self.reported[us(first)..us(first + count)].fill(true);
        };
        match round % 3 {
            0 => bitmap.harvest_each_run(&mut report),
            1 => bitmap.harvest().for_each_run(&mut report),
            _ => {
                // Two ranges split inside a word: the masked read-and-clear too.
                let split = pages / 2 + 13;
                self.out.fill(0);
                bitmap
                    .harvest_range_into(0, split, &mut self.out, 0)
                    .unwrap();
                bitmap
                    .harvest_range_into(split, pages - split, &mut self.out, split)
                    .unwrap();
                DirtySnapshot::from_words(self.out.clone(), pages)
                    .unwrap()
                    .for_each_run(&mut report);
            }
        }
        for (page, tag) in pending.iter().enumerate() {
            if self.reported[page] {
                let tag = tag.load(Ordering::Acquire);
                self.covered[page] = self.covered[page].max(tag);
            }
            assert!(
                self.complete[page] <= self.covered[page],
                "harvest {round}: page {page} was marked in epoch {} before the harvest started, \
                 but no harvest since reported it (the latest report covers epoch {}): a mark \
                 was lost",
                self.complete[page],
                self.covered[page]
            );
        }
    }
}

/// Sets its flag when dropped, on a panic too.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// No mark is ever lost while writers mark and a harvester reads and clears concurrently, not
/// just a page's first one (the check of KVM's `dirty_log_test`). Each mark is tagged with the
/// harvester's epoch, which advances before every harvest: a writer records the epoch for the
/// page (`pending`), sets the bit, then records it again (`done`). After each harvest, every
/// page with a mark complete before that harvest started must have been reported by it or by
/// an earlier harvest that came after that mark's bit was set.
#[test]
fn concurrent_marking_during_harvest_never_loses_a_mark() {
    const PAGES: u64 = 1 << 12;
    const WRITERS: u64 = 4;
    const HARVESTS: u64 = 50_000;
    let bitmap = DirtyBitmap::new(PAGES);
    let tags = || -> Vec<AtomicU64> { (0..PAGES).map(|_| AtomicU64::new(0)).collect() };
    let (pending, done) = (tags(), tags());
    let epoch = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let started = std::sync::Barrier::new(us(WRITERS) + 1);
    let mut audit = MarkAudit::new(PAGES);
    let marks: u64 = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (bitmap, pending, done) = (&bitmap, &pending, &done);
                let (epoch, stop, started) = (&epoch, &stop, &started);
                s.spawn(move || {
                    let mut x = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    let mut marks = 0u64;
                    started.wait();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = (x % PAGES) as usize;
                        let e = epoch.load(Ordering::Acquire);
                        pending[page].fetch_max(e, Ordering::Release);
                        bitmap.set(page as u64).unwrap();
                        done[page].fetch_max(e, Ordering::Release);
                        marks += 1;
                    }
                    marks
                })
            })
            .collect();
        {
            // Stops the writers however the harvests end: a failed check cannot hang the test.
            let _stop = SetOnDrop(&stop);
            started.wait();
            for round in 1..=HARVESTS {
                epoch.store(round + 1, Ordering::Release);
                audit.round(round, &bitmap, &pending, &done);
            }
        }
        writers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // Every mark is complete now: the last harvest reports every page not yet reported since.
    audit.round(HARVESTS + 1, &bitmap, &pending, &done);
    assert!(bitmap.is_clean());
    assert!(marks >= HARVESTS, "{marks} marks in {HARVESTS} harvests");
}

#[test]
fn snapshot_from_foreign_words_drops_bits_past_its_pages() {
    let snap = DirtySnapshot::from_words(vec![u64::MAX, u64::MAX, 7], 70).unwrap();
    assert_eq!(snap.words(), &[u64::MAX, 0x3f]);
    assert_eq!(snap.count(), 70);
    assert!(snap.test(69) && !snap.test(70) && !snap.test(u64::MAX));
    assert_eq!(snap.collect_runs(), vec![(0, 70)]);
    assert_eq!(snap.to_le_bytes().len(), 16);
    assert!(DirtySnapshot::from_words(vec![1], 65).is_err());
    let mut bitmap = DirtyBitmap::new(70);
    bitmap.merge_words(0, snap.words(), 70).unwrap();
    assert_eq!(bitmap.count(), 70);
    bitmap.clear_all();
    assert!(bitmap.is_clean());
}
