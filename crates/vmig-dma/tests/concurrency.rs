//! Stress tests: many device threads do DMA while the VMM harvests and unmaps. The property is
//! the one migration depends on: a copy that follows the dirty reports ends up identical to
//! the memory, so no dirty bit was ever lost (seed000 #81, digest E24, seed 001 L1088-1095).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};
use vmig_primitives::Iova;

use vmig_dma::{Backing, DirtyRead, GroupKind, Iommu, IommuConfig, Prot};
use vmig_primitives::HostMemory;

const PG: u64 = 4096;

struct Fixture {
    iommu: Arc<Iommu>,
    /// (iova, pages, host memory) of each mapping.
    regions: Vec<(u64, u64, Arc<HostMemory>)>,
}

fn fixture(regions: &[(u64, u64)]) -> Fixture {
    let iommu = Arc::new(Iommu::new(IommuConfig::default()).unwrap());
    let regions = regions
        .iter()
        .map(|&(iova, pages)| {
            let memory = Arc::new(HostMemory::anonymous(pages * PG).unwrap());
            let backing = Backing::Memory {
                memory: Arc::clone(&memory),
                offset: 0,
            };
            iommu
                .map(Iova(iova), pages * PG, backing, Prot::READ_WRITE)
                .unwrap();
            (iova, pages, memory)
        })
        .collect();
    Fixture { iommu, regions }
}

/// Device threads writing 8-byte stamps at random offsets of random regions until `stop`.
fn spawn_writers(
    f: &Fixture,
    threads: u64,
    stop: &Arc<AtomicBool>,
    start: &Arc<Barrier>,
) -> Vec<thread::JoinHandle<u64>> {
    (0..threads)
        .map(|t| {
            let iommu = Arc::clone(&f.iommu);
            let regions: Vec<(u64, u64)> = f.regions.iter().map(|r| (r.0, r.1)).collect();
            let stop = Arc::clone(stop);
            let start = Arc::clone(start);
            thread::spawn(move || {
                start.wait();
                let mut x = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (iova, pages) = regions[usize::try_from(x % regions.len() as u64).unwrap()];
                    let offset = (x >> 8) % (pages * PG - 8);
                    // Writes into a region that was unmapped meanwhile are refused whole.
                    if iommu.write(Iova(iova + offset), &x.to_le_bytes()).is_ok() {
                        writes += 1;
                    }
                }
                writes
            })
        })
        .collect()
}

/// Copies every page whose bit is set in `bitmap` (bit 0 = `iova`) from `memory` to `shadow`.
fn copy_dirty(bitmap: &[u64], pages: u64, memory: &HostMemory, shadow: &mut [u8]) -> u64 {
    let mut copied = 0;
    for page in 0..pages {
        if bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0 {
            let range =
                usize::try_from(page * PG).unwrap()..usize::try_from((page + 1) * PG).unwrap();
            memory.read(range.start, &mut shadow[range]).unwrap();
            copied += 1;
        }
    }
    copied
}

fn contents(memory: &HostMemory) -> Vec<u8> {
    let mut buf = vec![0u8; memory.len()];
    memory.read(0, &mut buf).unwrap();
    buf
}

#[test]
fn a_copy_that_follows_the_dirty_reports_never_misses_a_device_write() {
    // Pre-copy in miniature: the first pass copies everything, later passes copy what the
    // IOMMU reports, the last pass runs after the device stopped. Any lost bit leaves a stale
    // page in the shadow.
    let f = fixture(&[
        (0x10_0000, 64),
        (0x10_0000 + 64 * PG, 37),
        (0x800_0000, 130),
    ]);
    f.iommu.attach_group(GroupKind::Mediated, 1);
    f.iommu.start_dirty_tracking().unwrap();
    let mut shadows: Vec<Vec<u8>> = f.regions.iter().map(|r| contents(&r.2)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(5));
    let writers = spawn_writers(&f, 4, &stop, &start);
    start.wait();
    let deadline = Instant::now() + Duration::from_millis(600);
    let mut passes = 0;
    let mut copied = 0;
    let mut harvest = |shadows: &mut Vec<Vec<u8>>| {
        for ((iova, pages, memory), shadow) in f.regions.iter().zip(shadows.iter_mut()) {
            let mut bitmap = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap()];
            f.iommu
                .get_dirty_bitmap(Iova(*iova), pages * PG, PG, &mut bitmap, DirtyRead::Clear)
                .unwrap();
            copied += copy_dirty(&bitmap, *pages, memory, shadow);
        }
    };
    while Instant::now() < deadline {
        harvest(&mut shadows);
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    harvest(&mut shadows);
    assert!(
        writes > 1000 && passes > 3,
        "too little happened: {writes} writes, {passes} passes"
    );
    for ((iova, _, memory), shadow) in f.regions.iter().zip(&shadows) {
        assert!(
            contents(memory) == *shadow,
            "region {iova:#x}: a device write was never reported"
        );
    }
    assert!(copied > 0);
}

#[test]
fn unmap_with_bitmap_during_dma_loses_no_write() {
    // digest E24: unmap-with-dirty while a device writes: no write between the last harvest
    // and the unmap is lost. Each region gets a pre-copy pass (read-and-clear, copy), then the
    // unmap returns what was dirtied since; the copy must end up equal to the memory.
    let f = fixture(&[(0, 256), (256 * PG, 256), (512 * PG, 256), (768 * PG, 256)]);
    f.iommu.start_dirty_tracking().unwrap();
    let mut shadows: Vec<Vec<u8>> = f.regions.iter().map(|r| contents(&r.2)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(4));
    let writers = spawn_writers(&f, 3, &stop, &start);
    start.wait();
    thread::sleep(Duration::from_millis(50));
    for ((iova, pages, memory), shadow) in f.regions.iter().zip(shadows.iter_mut()) {
        let mut bitmap = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap()];
        f.iommu
            .get_dirty_bitmap(Iova(*iova), pages * PG, PG, &mut bitmap, DirtyRead::Clear)
            .unwrap();
        copy_dirty(&bitmap, *pages, memory, shadow);
        let unmapped = f
            .iommu
            .unmap_with_dirty_bitmap(Iova(*iova), pages * PG, PG, &mut bitmap)
            .unwrap();
        assert_eq!(unmapped, pages * PG);
        // After the unmap no device write can reach the memory: this copy is final.
        copy_dirty(&bitmap, *pages, memory, shadow);
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 100, "too little happened: {writes} writes");
    for ((iova, _, memory), shadow) in f.regions.iter().zip(&shadows) {
        assert!(
            contents(memory) == *shadow,
            "region {iova:#x}: a write before the unmap was lost"
        );
    }
}

#[test]
fn parallel_reads_report_each_dirty_page_to_exactly_one_reader() {
    // seed000 #89: parallel GETs from two threads: each dirty page is reported to exactly one
    // of the two callers, unless it is still pinned (then both).
    const PAGES: u64 = 4096;
    let f = fixture(&[(0, PAGES)]);
    let group = f.iommu.attach_group(GroupKind::Mediated, 1);
    f.iommu.start_dirty_tracking().unwrap();
    for page in (0..PAGES).step_by(3) {
        f.iommu.write(Iova(page * PG), &[1]).unwrap();
    }
    f.iommu
        .pin_pages(group, Iova(7 * PG), 1, Prot::WRITE)
        .unwrap();
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let start = Arc::new(Barrier::new(2));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let iommu = Arc::clone(&f.iommu);
            let counts = Arc::clone(&counts);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                for _ in 0..20 {
                    let mut bitmap = vec![0u64; (PAGES / 64) as usize];
                    iommu
                        .get_dirty_bitmap(Iova(0), PAGES * PG, PG, &mut bitmap, DirtyRead::Clear)
                        .unwrap();
                    for page in 0..PAGES {
                        if bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0 {
                            counts[usize::try_from(page).unwrap()].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    for page in 0..PAGES {
        let n = counts[usize::try_from(page).unwrap()].load(Ordering::Relaxed);
        let expected = match page {
            7 => 40,
            p if p % 3 == 0 => 1,
            _ => 0,
        };
        assert_eq!(n, expected, "page {page}");
    }
}
