//! Benchmarks of the dirty bitmap against the physical limits measured in the same run:
//! - harvest (read-and-clear + iteration of runs) of 1 TiB of guest memory at 4 KiB pages
//!   (32 MiB of bitmap) with 0.1 % of pages dirty, next to a plain sequential read of 32 MiB;
//! - OR-merge of a foreign bitmap at an unaligned page offset, next to `memcpy` of as many bytes.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vmig_dirty::DirtyBitmap;

const TIB_PAGES: u64 = 1 << 28; // 1 TiB / 4 KiB
const BITMAP_BYTES: usize = (TIB_PAGES / 8) as usize; // 32 MiB

/// Pages spread over the bitmap: 0.1 % of all, in pseudo-random positions.
fn sparse_pages(pages: u64, per_mille: u64) -> Vec<u64> {
    let n = pages * per_mille / 1000;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        })
        .collect()
}

/// Benchmarks harvesting 0.1 % of 1 TiB dirty, as `run_pages`-page runs at random places
/// (1: every dirty page isolated, the worst case for run iteration).
fn harvest(c: &mut Criterion) {
    harvest_case(c, 1);
    harvest_case(c, 16);
}

fn harvest_case(c: &mut Criterion, run_pages: u64) {
    let mut group = c.benchmark_group(format!("harvest_1tib_0.1pct_runs_of_{run_pages}"));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(BITMAP_BYTES as u64));
    let dirty: Vec<u64> = sparse_pages(TIB_PAGES - run_pages, 1)
        .into_iter()
        .step_by(usize::try_from(run_pages).expect("a run length fits a usize"))
        .collect();
    let bitmap = DirtyBitmap::new(TIB_PAGES);
    let mut plain = vec![0u64; BITMAP_BYTES / 8];
    for &p in &dirty {
        for q in p..p + run_pages {
            plain[(q / 64) as usize] |= 1 << (q % 64);
        }
    }
    group.bench_function("sequential_read_32mib", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &w in black_box(&plain).iter() {
                acc = acc.wrapping_add(w);
            }
            black_box(acc)
        })
    });
    group.bench_function("harvest_runs", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for &p in &dirty {
                    bitmap.set_range(p, run_pages).unwrap();
                }
                let start = Instant::now();
                let mut pages = 0u64;
                bitmap.harvest_each_run(|_, n| pages += n);
                total += start.elapsed();
                black_box(pages);
            }
            total
        })
    });
    let mut exclusive = DirtyBitmap::new(TIB_PAGES);
    group.bench_function("harvest_runs_exclusive", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for &p in &dirty {
                    exclusive.set_range(p, run_pages).unwrap();
                }
                let start = Instant::now();
                let mut pages = 0u64;
                exclusive.harvest_each_run_exclusive(|_, n| pages += n);
                total += start.elapsed();
                black_box(pages);
            }
            total
        })
    });
    group.finish();
}

fn merge(c: &mut Criterion) {
    let mut group = c.benchmark_group("merge_unaligned");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    for (name, per_mille) in [("dense_50pct", 500), ("sparse_1pct", 10)] {
        let words_n = 512 * 1024; // 4 MiB of foreign bitmap: 128 GiB of guest memory at 4 KiB
        let bytes = words_n * 8;
        let nbits = words_n as u64 * 64;
        let mut foreign = vec![0u64; words_n];
        for p in sparse_pages(nbits, per_mille) {
            foreign[(p / 64) as usize] |= 1 << (p % 64);
        }
        let target = DirtyBitmap::new(nbits + 64);
        let mut exclusive = DirtyBitmap::new(nbits + 64);
        let src = vec![0x5au8; bytes];
        let mut dst = vec![0u8; bytes];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::new("memcpy", name), &(), |b, _| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        group.bench_with_input(
            BenchmarkId::new("merge_words_offset_37", name),
            &(),
            |b, _| b.iter(|| target.merge_words(37, black_box(&foreign), nbits).unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("merge_words_exclusive_offset_37", name),
            &(),
            |b, _| {
                b.iter(|| {
                    exclusive
                        .merge_words_exclusive(37, black_box(&foreign), nbits)
                        .unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, harvest, merge);
criterion_main!(benches);
