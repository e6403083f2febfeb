//! Unit and property tests: every operation against a naive `Vec<bool>` model.

use super::*;
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

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
    let mut words = vec![0u64; words_for(model.len() as u64) as usize];
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
                let n = words_for(nbits) as usize;
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
        let mut model = vec![false; pages as usize];
        for op in ops {
            match op {
                Op::Set(p) => { bitmap.set(p).unwrap(); model[p as usize] = true; }
                Op::Clear(p) => { bitmap.clear(p).unwrap(); model[p as usize] = false; }
                Op::SetRange(f, c) => {
                    bitmap.set_range(f, c).unwrap();
                    model[f as usize..(f + c) as usize].fill(true);
                }
                Op::ClearRange(f, c) => {
                    bitmap.clear_range(f, c).unwrap();
                    model[f as usize..(f + c) as usize].fill(false);
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
                            model[(offset + i) as usize] = true;
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
                    let mut out = vec![0u64; words_for(out_bit + count) as usize];
                    let mut exported = out.clone();
                    bitmap.export_range_into(first, count, &mut exported, out_bit).unwrap();
                    bitmap.harvest_range_into(first, count, &mut out, out_bit).unwrap();
                    prop_assert_eq!(&exported, &out);
                    for i in 0..out_bit + count {
                        let bit = out[(i / 64) as usize] & (1 << (i % 64)) != 0;
                        let expect = i >= out_bit && model[(first + i - out_bit) as usize];
                        prop_assert_eq!(bit, expect, "out bit {}", i);
                    }
                    model[first as usize..(first + count) as usize].fill(false);
                }
            }
            assert_matches(&bitmap, &model);
            let (f, c) = (pages / 3, pages / 2);
            let expected = model[f as usize..(f + c) as usize].iter().filter(|d| **d).count() as u64;
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
        let mut out = vec![garbage; words_for(out_bit + count) as usize + 1];
        bitmap.export_range_into(0, count, &mut out, out_bit).unwrap();
        for i in 0..out.len() as u64 * 64 {
            let bit = out[(i / 64) as usize] & (1 << (i % 64)) != 0;
            let garbage_bit = garbage & (1 << (i % 64)) != 0;
            let expect = if (out_bit..out_bit + count).contains(&i) {
                garbage_bit || model[(i - out_bit) as usize]
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

#[test]
fn concurrent_marking_during_harvest_never_loses_a_bit() {
    const PAGES: u64 = 1 << 14;
    const WRITERS: u64 = 4;
    const ROUNDS: u64 = 20_000;
    let bitmap = Arc::new(DirtyBitmap::new(PAGES));
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer marks pages and counts how often it marked each page; the harvester counts
    // how often it saw each page. A page marked k times is seen at least once if k > 0 and
    // the last mark is seen after the last harvest.
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let bitmap = Arc::clone(&bitmap);
            std::thread::spawn(move || {
                let mut marked = vec![false; PAGES as usize];
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % PAGES;
                    bitmap.set(page).unwrap();
                    marked[page as usize] = true;
                }
                marked
            })
        })
        .collect();
    let harvester = {
        let bitmap = Arc::clone(&bitmap);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = vec![false; PAGES as usize];
            while !stop.load(Ordering::Acquire) {
                bitmap.harvest_each_run(|first, count| {
                    seen[first as usize..(first + count) as usize].fill(true);
                });
            }
            seen
        })
    };
    let marked: Vec<Vec<bool>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Release);
    let mut seen = harvester.join().unwrap();
    bitmap.harvest_each_run(|first, count| {
        seen[first as usize..(first + count) as usize].fill(true);
    });
    for page in 0..PAGES as usize {
        if marked.iter().any(|m| m[page]) {
            assert!(seen[page], "page {page} was marked but never harvested");
        }
    }
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
