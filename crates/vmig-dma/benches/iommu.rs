//! Benchmarks of the userspace IOMMU:
//! - map then unmap of N single-page mappings, N = 4096 and 65535: the time per mapping must
//!   grow like log N (the table is a B-tree), not like N;
//! - GET_BITMAP over 1 GiB of mappings (one mapping, and 512 mappings of 2 MiB);
//! - the DMA path's marking: `mark_dirty` of one page next to one bare `fetch_or`, and a
//!   64-byte `write` with tracking off and on.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmig_primitives::Iova;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vmig_dma::{Backing, DirtyRead, Iommu, IommuConfig, Prot, UnmapScope};
use vmig_primitives::HostMemory;

const PG: u64 = 4096;
const GIB: u64 = 1 << 30;

fn map_unmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("map_then_unmap");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let memory = Arc::new(HostMemory::anonymous(PG).unwrap());
    for n in [4096u64, 65535] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let iommu = Iommu::new(IommuConfig::default()).unwrap();
                    let start = Instant::now();
                    // Every other page, so no two mappings are adjacent.
                    for i in 0..n {
                        let backing = Backing::Memory {
                            memory: Arc::clone(&memory),
                            offset: 0,
                        };
                        iommu
                            .map(Iova(i * 2 * PG), PG, backing, Prot::READ_WRITE)
                            .unwrap();
                    }
                    for i in 0..n {
                        iommu
                            .unmap(Iova(i * 2 * PG), PG, UnmapScope::Range)
                            .unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

fn get_bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_bitmap_1gib");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    let memory = Arc::new(HostMemory::anonymous(GIB).unwrap());
    for mappings in [1u64, 512] {
        let iommu = Iommu::new(IommuConfig::default()).unwrap();
        let size = GIB / mappings;
        for i in 0..mappings {
            let backing = Backing::Memory {
                memory: Arc::clone(&memory),
                offset: i * size,
            };
            iommu
                .map(Iova(i * size), size, backing, Prot::READ_WRITE)
                .unwrap();
        }
        iommu.start_dirty_tracking().unwrap();
        let pages = GIB / PG;
        let mut bitmap = vec![0u64; (pages / 64) as usize];
        group.bench_with_input(BenchmarkId::new("mappings", mappings), &(), |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // 1 % of the pages dirty
                    for page in (0..pages).step_by(100) {
                        iommu.mark_dirty(Iova(page * PG), 1).unwrap();
                    }
                    let start = Instant::now();
                    iommu
                        .get_dirty_bitmap(Iova(0), GIB, PG, &mut bitmap, DirtyRead::Clear)
                        .unwrap();
                    total += start.elapsed();
                    black_box(&bitmap);
                }
                total
            })
        });
    }
    group.finish();
}

fn dma_marking(c: &mut Criterion) {
    let mut group = c.benchmark_group("dma_path");
    let memory = Arc::new(HostMemory::anonymous(64 * PG).unwrap());
    let iommu = Iommu::new(IommuConfig::default()).unwrap();
    let backing = Backing::Memory { memory, offset: 0 };
    iommu
        .map(Iova(0x10_0000), 64 * PG, backing, Prot::READ_WRITE)
        .unwrap();
    let word = AtomicU64::new(0);
    group.bench_function("bare_fetch_or", |b| {
        b.iter(|| word.fetch_or(black_box(1 << 5), Ordering::Release))
    });
    let data = [0x5au8; 64];
    group.bench_function("write_64b_tracking_off", |b| {
        b.iter(|| {
            iommu
                .write(black_box(Iova(0x10_0000 + 5 * PG)), &data)
                .unwrap()
        })
    });
    iommu.start_dirty_tracking().unwrap();
    group.bench_function("mark_dirty_1_page", |b| {
        b.iter(|| {
            iommu
                .mark_dirty(black_box(Iova(0x10_0000 + 5 * PG)), 1)
                .unwrap()
        })
    });
    group.bench_function("write_64b_tracking_on", |b| {
        b.iter(|| {
            iommu
                .write(black_box(Iova(0x10_0000 + 5 * PG)), &data)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, map_unmap, get_bitmap, dma_marking);
criterion_main!(benches);
