//! The differential test between the kernel's type1 IOMMU and `vmig-dma`: seeded random
//! sequences of map / unmap / start / stop / get-bitmap / unmap-with-bitmap, run against the
//! kernel (inside the test guest, [`run_on_kernel`]) and against `vmig-dma` (on the host,
//! [`run_on_vmig_dma`]), as the same raw requests. [`compare`] accepts one difference only,
//! the documented quirk: bits the kernel reports for pages that are not mapped (past a
//! mapping's end, in holes) while `vmig-dma` reports them clean. Every errno, every unmapped
//! size and every bit of a mapped page must be equal.

use std::sync::Arc;
use vmig_primitives::Iova;

use serde::{Deserialize, Serialize};
use vmig_dirty::{le_bytes_to_words, words_for};
use vmig_dma::uapi::{
    UserBuffers, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VfioBitmap,
    VfioIommuType1DirtyBitmap, VfioIommuType1DirtyBitmapGet, VfioIommuType1DmaUnmap,
};
use vmig_dma::{Backing, GroupKind, Iommu, IommuConfig, IovaRange, Prot};
use vmig_primitives::HostMemory;
use zerocopy::{FromBytes, IntoBytes};

use vmig_vfio::container::{Container, GET_BITMAP_ARGSZ, UNMAP_ARGSZ, UNMAP_BITMAP_ARGSZ};
use vmig_vfio::sys::{self, BitmapRequest, UserBitmap};

/// IOVAs of ordinary calls fall in `[0, WINDOW)`; a mapping's memory is at `iova % WINDOW` of
/// the backing buffer, so both sides map the same offsets.
pub const WINDOW: u64 = 1 << 20;
/// Bytes of the backing buffer (a mapping of up to `WINDOW` bytes fits from any offset).
pub const BACKING: u64 = 2 * WINDOW;
const PAGE: u64 = vmig_primitives::PAGE_SIZE;
const MAP_READ_WRITE: u32 =
    vmig_dma::uapi::VFIO_DMA_MAP_FLAG_READ | vmig_dma::uapi::VFIO_DMA_MAP_FLAG_WRITE;
/// Where the host places the bitmap buffer in the simulated user address space.
const USER_BITMAP_ADDR: u64 = 0x1000_0000;

/// One call of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// `VFIO_IOMMU_MAP_DMA`, read and write.
    Map {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// `VFIO_IOMMU_UNMAP_DMA`.
    Unmap {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// `VFIO_IOMMU_DIRTY_PAGES` START.
    Start,
    /// `VFIO_IOMMU_DIRTY_PAGES` STOP.
    Stop,
    /// `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP.
    GetBitmap {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Bitmap page size.
        pgsize: u64,
        /// Declared (and allocated) bitmap bytes.
        bitmap_bytes: u64,
    },
    /// `VFIO_IOMMU_UNMAP_DMA` with `GET_DIRTY_BITMAP`.
    UnmapWithBitmap {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Bitmap page size.
        pgsize: u64,
        /// Declared (and allocated) bitmap bytes.
        bitmap_bytes: u64,
    },
}

/// What one side answered to a call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Answer {
    /// 0 for success, else the errno.
    pub errno: i32,
    /// Bytes an unmap says it removed (on success).
    pub unmapped: Option<u64>,
    /// The bitmap words (on success of a bitmap call).
    pub bitmap: Vec<u64>,
}

/// One sequence as the kernel answered it, the line the guest reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRun {
    /// The sequence's seed.
    pub seed: u64,
    /// The container's page sizes.
    pub iova_pgsizes: u64,
    /// The container's IOVA ranges, `(start, last)`.
    pub iova_ranges: Vec<(u64, u64)>,
    /// Answers, one per call.
    pub answers: Vec<Answer>,
}

/// A small deterministic generator (xorshift64*), the same on both sides.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An index below `len`.
    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).expect("below a usize length")
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A range of `[iova, iova+size)` with odd values now and then: misaligned, empty, wrapping,
/// in the reserved MSI hole, past the IOMMU's last IOVA.
fn odd_range(rng: &mut Rng, iova: u64, size: u64) -> (u64, u64) {
    match rng.below(6) {
        0 => (iova + 0x800, size),
        1 => (iova, size + 0x800),
        2 => (iova, 0),
        3 => (0xffff_ffff_ffff_f000, 0x2000),
        4 => (0xfee0_0000, size),
        _ => (0x80_0000_0000, size),
    }
}

fn bitmap_bytes(rng: &mut Rng, size: u64) -> (u64, u64) {
    let exact = words_for(size / PAGE) * 8;
    let pgsize = match rng.below(20) {
        0 => 8192,
        1 => 0,
        _ => PAGE,
    };
    let bytes = match rng.below(12) {
        0 => 4,
        1 => 0,
        2 => exact.saturating_sub(8),
        3 => exact + 8,
        _ => exact,
    };
    (pgsize, bytes)
}

/// The calls of sequence `seed`, `len` of them.
pub fn sequence(seed: u64, len: usize) -> Vec<Call> {
    let mut rng = Rng::new(seed);
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    let mut calls = Vec::with_capacity(len);
    let grid_pages = WINDOW / PAGE / 4;
    for _ in 0..len {
        let iova = rng.below(grid_pages) * PAGE;
        let size = (1 + rng.below(24)) * PAGE;
        // A range made of whole mappings the generator made (a hole between two allowed).
        let whole = |rng: &mut Rng, mapped: &[(u64, u64)]| -> (u64, u64) {
            if mapped.is_empty() {
                return (iova, size);
            }
            let a = mapped[rng.index(mapped.len())];
            let b = mapped[rng.index(mapped.len())];
            let (lo, hi) = if a.0 <= b.0 { (a, b) } else { (b, a) };
            (
                lo.0,
                hi.0.saturating_add(hi.1).saturating_sub(lo.0).max(lo.1),
            )
        };
        let call = match rng.below(100) {
            0..=29 => {
                if rng.chance(10) {
                    let (iova, size) = odd_range(&mut rng, iova, size);
                    Call::Map { iova, size }
                } else {
                    mapped.push((iova, size));
                    Call::Map { iova, size }
                }
            }
            30..=41 => {
                let (iova, size) = if rng.chance(50) {
                    whole(&mut rng, &mapped)
                } else if rng.chance(20) {
                    odd_range(&mut rng, iova, size)
                } else {
                    (iova, size)
                };
                mapped
                    .retain(|&(i, s)| i < iova || i.saturating_add(s) > iova.saturating_add(size));
                Call::Unmap { iova, size }
            }
            42..=49 => Call::Start,
            50..=53 => Call::Stop,
            54..=84 => {
                let (iova, size) = if rng.chance(70) {
                    whole(&mut rng, &mapped)
                } else if rng.chance(30) {
                    odd_range(&mut rng, iova, size)
                } else {
                    (iova, size)
                };
                let (pgsize, bitmap_bytes) = bitmap_bytes(&mut rng, size);
                Call::GetBitmap {
                    iova,
                    size,
                    pgsize,
                    bitmap_bytes,
                }
            }
            _ => {
                let (iova, size) = if rng.chance(70) {
                    whole(&mut rng, &mapped)
                } else {
                    (iova, size)
                };
                let (pgsize, bitmap_bytes) = bitmap_bytes(&mut rng, size);
                mapped
                    .retain(|&(i, s)| i < iova || i.saturating_add(s) > iova.saturating_add(size));
                Call::UnmapWithBitmap {
                    iova,
                    size,
                    pgsize,
                    bitmap_bytes,
                }
            }
        };
        calls.push(call);
    }
    calls
}

fn answer_of<T>(result: Result<T, i32>) -> Answer {
    Answer {
        errno: result.err().unwrap_or(0),
        ..Answer::default()
    }
}

/// Runs `calls` against the kernel, as raw requests on `container`'s fd (which must have a
/// device open and no mappings; its own mapping table is not used), mapping from `backing`
/// ([`BACKING`] bytes); unmaps everything afterwards.
pub fn run_on_kernel(
    container: &Container,
    backing: &Arc<HostMemory>,
    calls: &[Call],
) -> Vec<Answer> {
    let fd = container.fd();
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls {
        let answer = match *call {
            Call::Map { iova, size } => {
                let offset = iova % WINDOW;
                if offset
                    .checked_add(size)
                    .is_none_or(|end| end > backing.len() as u64)
                {
                    // Never generated: the memory would not lie inside `backing`.
                    Answer {
                        errno: -1,
                        ..Answer::default()
                    }
                } else {
                    let vaddr = backing.as_ptr() as u64 + offset;
                    // SAFETY: `[vaddr, vaddr+size)` lies inside `backing` (checked), which the
                    // caller keeps alive until this function has unmapped everything; no
                    // device does DMA during the run.
                    answer_of(unsafe { sys::map_dma(fd, MAP_READ_WRITE, iova, size, vaddr) })
                }
            }
            Call::Unmap { iova, size } => {
                let a = sys::unmap_dma(fd, UNMAP_ARGSZ, 0, iova, size, None);
                Answer {
                    errno: a.result.err().unwrap_or(0),
                    unmapped: a.result.is_ok().then_some(a.unmapped),
                    bitmap: Vec::new(),
                }
            }
            Call::Start => answer_of(sys::dirty_pages_flags(
                fd,
                sys::argsz_of(size_of::<VfioIommuType1DirtyBitmap>()),
                VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            )),
            Call::Stop => answer_of(sys::dirty_pages_flags(
                fd,
                sys::argsz_of(size_of::<VfioIommuType1DirtyBitmap>()),
                VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
            )),
            Call::GetBitmap {
                iova,
                size,
                pgsize,
                bitmap_bytes,
            } => {
                let (result, bitmap) = sys::dirty_pages_get_bitmap(
                    fd,
                    GET_BITMAP_ARGSZ,
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                    BitmapRequest {
                        iova,
                        size,
                        pgsize,
                        bitmap: UserBitmap::Buffer(bitmap_bytes),
                    },
                );
                Answer {
                    errno: result.err().unwrap_or(0),
                    unmapped: None,
                    bitmap: if result.is_ok() { bitmap } else { Vec::new() },
                }
            }
            Call::UnmapWithBitmap {
                iova,
                size,
                pgsize,
                bitmap_bytes,
            } => {
                let a = sys::unmap_dma(
                    fd,
                    UNMAP_BITMAP_ARGSZ,
                    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                    iova,
                    size,
                    Some((pgsize, UserBitmap::Buffer(bitmap_bytes))),
                );
                Answer {
                    errno: a.result.err().unwrap_or(0),
                    unmapped: a.result.is_ok().then_some(a.unmapped),
                    bitmap: if a.result.is_ok() {
                        a.bitmap
                    } else {
                        Vec::new()
                    },
                }
            }
        };
        answers.push(answer);
    }
    let _ = sys::dirty_pages_flags(fd, 8, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
    // Every IOVA the kernel accepts lies below 2^63: this removes all the run mapped.
    let _ = sys::unmap_dma(fd, UNMAP_ARGSZ, 0, 0, 1 << 63, None);
    answers
}

/// `vmig-dma`'s answers to `calls`, on an IOMMU configured as the kernel's container was, with
/// one passthrough group attached; and, per call, the mappings `(iova, last)` before it.
pub fn run_on_vmig_dma(
    iova_pgsizes: u64,
    iova_ranges: &[(u64, u64)],
    calls: &[Call],
) -> (Vec<Answer>, Vec<Vec<(u64, u64)>>) {
    let iommu = Iommu::new(IommuConfig {
        pgsize_bitmap: iova_pgsizes,
        iova_ranges: iova_ranges
            .iter()
            .map(|&(start, last)| IovaRange { start, last })
            .collect(),
        ..IommuConfig::default()
    })
    .expect("the kernel's page sizes and ranges make a valid vmig-dma configuration");
    iommu.attach_group(GroupKind::Direct, 1);
    let backing = Arc::new(HostMemory::anonymous(BACKING).expect("anonymous memory"));
    let mut answers = Vec::new();
    let mut before = Vec::new();
    for call in calls {
        before.push(
            iommu
                .mappings()
                .iter()
                .map(|m| (m.iova, m.iova + (m.size - 1)))
                .collect(),
        );
        let answer = match *call {
            Call::Map { iova, size } => answer_of(
                iommu
                    .map(
                        Iova(iova),
                        size,
                        Backing::Memory {
                            memory: backing.clone(),
                            offset: iova % WINDOW,
                        },
                        Prot::READ_WRITE,
                    )
                    .map_err(|e| e.errno()),
            ),
            Call::Unmap { iova, size } => {
                let mut arg = VfioIommuType1DmaUnmap {
                    argsz: UNMAP_ARGSZ,
                    flags: 0,
                    iova,
                    size,
                }
                .as_bytes()
                .to_vec();
                let r = vmig_dma::uapi::unmap_dma(&iommu, &mut arg, &mut UserBuffers::new());
                let unmapped = VfioIommuType1DmaUnmap::read_from_prefix(&arg[..])
                    .map(|(u, _)| u.size)
                    .unwrap_or(0);
                Answer {
                    errno: r.as_ref().err().map_or(0, |e| e.errno()),
                    unmapped: r.is_ok().then_some(unmapped),
                    bitmap: Vec::new(),
                }
            }
            Call::Start | Call::Stop => {
                let flags = if *call == Call::Start {
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_START
                } else {
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
                };
                let arg = VfioIommuType1DirtyBitmap { argsz: 8, flags };
                answer_of(
                    vmig_dma::uapi::dirty_pages(&iommu, arg.as_bytes(), &mut UserBuffers::new())
                        .map_err(|e| e.errno()),
                )
            }
            Call::GetBitmap {
                iova,
                size,
                pgsize,
                bitmap_bytes,
            } => {
                let mut arg = VfioIommuType1DirtyBitmap {
                    argsz: GET_BITMAP_ARGSZ,
                    flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                }
                .as_bytes()
                .to_vec();
                arg.extend_from_slice(
                    VfioIommuType1DirtyBitmapGet {
                        iova,
                        size,
                        bitmap: VfioBitmap {
                            pgsize,
                            size: bitmap_bytes,
                            data: USER_BITMAP_ADDR,
                        },
                    }
                    .as_bytes(),
                );
                let mut user = user_bitmap(bitmap_bytes);
                let r = vmig_dma::uapi::dirty_pages(&iommu, &arg, &mut user);
                bitmap_answer(r.map(|_| None), &user)
            }
            Call::UnmapWithBitmap {
                iova,
                size,
                pgsize,
                bitmap_bytes,
            } => {
                let mut arg = VfioIommuType1DmaUnmap {
                    argsz: UNMAP_BITMAP_ARGSZ,
                    flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                    iova,
                    size,
                }
                .as_bytes()
                .to_vec();
                arg.extend_from_slice(
                    VfioBitmap {
                        pgsize,
                        size: bitmap_bytes,
                        data: USER_BITMAP_ADDR,
                    }
                    .as_bytes(),
                );
                let mut user = user_bitmap(bitmap_bytes);
                let r = vmig_dma::uapi::unmap_dma(&iommu, &mut arg, &mut user);
                let unmapped = VfioIommuType1DmaUnmap::read_from_prefix(&arg[..])
                    .map(|(u, _)| u.size)
                    .unwrap_or(0);
                bitmap_answer(r.map(|_| Some(unmapped)), &user)
            }
        };
        answers.push(answer);
    }
    (answers, before)
}

fn user_bitmap(bytes: u64) -> UserBuffers {
    let mut user = UserBuffers::new();
    // The kernel side allocates whole words; so does this one.
    user.insert(
        USER_BITMAP_ADDR,
        vec![0u8; usize::try_from(bytes.div_ceil(8) * 8).expect("a sequence's bitmap fits memory")],
        true,
    );
    user
}

fn bitmap_answer(result: vmig_dma::Result<Option<u64>>, user: &UserBuffers) -> Answer {
    match result {
        Ok(unmapped) => Answer {
            errno: 0,
            unmapped,
            bitmap: le_bytes_to_words(user.get(USER_BITMAP_ADDR).unwrap_or_default()),
        },
        Err(e) => Answer {
            errno: e.errno(),
            ..Answer::default()
        },
    }
}

/// What a comparison found.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Differences other than the quirk, one line each.
    pub differences: Vec<String>,
    /// Bits the kernel set for pages that were not mapped (the documented quirk).
    pub quirk_bits: u64,
    /// Calls that succeeded on both sides.
    pub succeeded: usize,
    /// Calls that failed on both sides with the same errno.
    pub failed: usize,
}

/// The kernel's mappings as its own answers say, `iova → last`: a map that succeeded adds
/// one, an unmap that succeeded removes the mappings inside its range.
#[derive(Debug, Default)]
struct KernelModel(std::collections::BTreeMap<u64, u64>);

impl KernelModel {
    fn apply(&mut self, call: &Call) -> Option<u64> {
        match *call {
            Call::Map { iova, size } => {
                self.0.insert(iova, iova + (size - 1));
                None
            }
            Call::Unmap { iova, size } | Call::UnmapWithBitmap { iova, size, .. } => {
                let last = iova.checked_add(size.checked_sub(1)?)?;
                let inside: Vec<(u64, u64)> = self
                    .0
                    .range(iova..=last)
                    .filter(|(_, l)| **l <= last)
                    .map(|(i, l)| (*i, *l))
                    .collect();
                let mut bytes = 0;
                for (i, l) in inside {
                    self.0.remove(&i);
                    bytes += l - i + 1;
                }
                Some(bytes)
            }
            _ => None,
        }
    }
}

/// Compares the kernel's answers with `vmig-dma`'s, call by call. Beyond equal errnos,
/// unmapped sizes and bits of mapped pages, both sides must hold the same mappings at every
/// call (the kernel's from its own answers), and a bit the kernel sets for a page that is not
/// mapped is accepted only in the quirk's shape: within 64 pages after the end of a mapping
/// of the range.
pub fn compare(
    calls: &[Call],
    kernel: &[Answer],
    ours: &[Answer],
    mappings_before: &[Vec<(u64, u64)>],
) -> Comparison {
    let mut c = Comparison::default();
    if kernel.len() != calls.len()
        || ours.len() != calls.len()
        || mappings_before.len() != calls.len()
    {
        c.differences.push(format!(
            "{} calls, but {} kernel answers, {} vmig-dma answers, {} mapping lists",
            calls.len(),
            kernel.len(),
            ours.len(),
            mappings_before.len()
        ));
        return c;
    }
    let mut model = KernelModel::default();
    for (i, call) in calls.iter().enumerate() {
        let (k, o) = (&kernel[i], &ours[i]);
        let mut differ = |what: String| c.differences.push(format!("call {i} {call:?}: {what}"));
        let kernel_mappings: Vec<(u64, u64)> = model.0.iter().map(|(a, b)| (*a, *b)).collect();
        if kernel_mappings != mappings_before[i] {
            differ(format!(
                "before it, the kernel held mappings {kernel_mappings:x?}, vmig-dma {:x?}",
                mappings_before[i]
            ));
            return c;
        }
        if k.errno != o.errno {
            differ(format!(
                "kernel errno {}, vmig-dma errno {}",
                k.errno, o.errno
            ));
            continue;
        }
        if k.errno != 0 {
            c.failed += 1;
            continue;
        }
        c.succeeded += 1;
        let removed = model.apply(call);
        if k.unmapped != o.unmapped || (k.unmapped.is_some() && k.unmapped != removed) {
            differ(format!(
                "kernel unmapped {:?}, vmig-dma unmapped {:?}, the mappings inside were {removed:?} bytes",
                k.unmapped, o.unmapped
            ));
        }
        let (iova, size, pgsize) = match *call {
            Call::GetBitmap {
                iova, size, pgsize, ..
            }
            | Call::UnmapWithBitmap {
                iova, size, pgsize, ..
            } if pgsize != 0 => (iova, size, pgsize),
            _ => continue,
        };
        let npages = size / pgsize;
        let words = usize::try_from(words_for(npages)).expect("a sequence's bitmap fits memory");
        let mut mask = vec![0u64; words];
        // Pages where the quirk may leave a stale bit: up to 63 after a mapping's end.
        let mut stale_window = vec![0u64; words];
        // The quirk's bits may also lie past the range's last page, in its last word.
        let set = |bits: &mut [u64], from: u64, to: u64| {
            for page in from..to.min(words as u64 * 64) {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        };
        for &(start, last) in &kernel_mappings {
            if start >= iova && last <= iova + (size - 1) {
                let (first, end) = ((start - iova) / pgsize, (last - iova) / pgsize + 1);
                set(&mut mask, first, end);
                set(&mut stale_window, end, end + 63);
            }
        }
        let longest = k.bitmap.len().max(o.bitmap.len()).max(words);
        for w in 0..longest {
            let kw = k.bitmap.get(w).copied().unwrap_or(0);
            let ow = o.bitmap.get(w).copied().unwrap_or(0);
            let mapped = mask.get(w).copied().unwrap_or(0);
            let window = stale_window.get(w).copied().unwrap_or(0);
            if kw & mapped != ow & mapped {
                differ(format!(
                    "bitmap word {w}: kernel {kw:#x}, vmig-dma {ow:#x} on mapped pages {mapped:#x}"
                ));
            }
            if ow & !mapped != 0 {
                differ(format!(
                    "bitmap word {w}: vmig-dma set {:#x} outside the mapped pages",
                    ow & !mapped
                ));
            }
            let extra = kw & !mapped;
            if extra & !window != 0 {
                differ(format!(
                    "bitmap word {w}: the kernel set {:#x}, not within 64 pages after a mapping's end",
                    extra & !window
                ));
            }
            c.quirk_bits += u64::from(extra.count_ones());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_deterministic_and_exercise_every_call() {
        assert_eq!(sequence(7, 300), sequence(7, 300));
        assert_ne!(sequence(7, 300), sequence(8, 300));
        let calls = sequence(1, 2000);
        let count = |f: fn(&Call) -> bool| calls.iter().filter(|c| f(c)).count();
        assert!(count(|c| matches!(c, Call::Map { .. })) > 400);
        assert!(count(|c| matches!(c, Call::GetBitmap { .. })) > 400);
        assert!(count(|c| matches!(c, Call::UnmapWithBitmap { .. })) > 200);
        assert!(count(|c| matches!(c, Call::Start)) > 100);
    }

    #[test]
    fn vmig_dma_against_itself_agrees_and_the_comparison_catches_a_lost_bit() {
        let ranges = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];
        let calls = sequence(3, 400);
        let (ours, before) = run_on_vmig_dma(0x4020_1000, &ranges, &calls);
        let same = compare(&calls, &ours, &ours, &before);
        assert!(same.differences.is_empty(), "{:?}", same.differences);
        assert!(same.succeeded > 50 && same.failed > 20, "{same:?}");
        // A kernel that loses a dirty bit of a mapped page is caught; one that sets a bit past
        // a mapping's end (the quirk) is not.
        // With a passthrough group every mapped page reads dirty, so a clear bit in a
        // successful read is a page that is not mapped.
        let i = calls
            .iter()
            .zip(&ours)
            .position(|(c, a)| {
                matches!(c, Call::GetBitmap { .. })
                    && a.errno == 0
                    && a.bitmap
                        .first()
                        .is_some_and(|w| w & 1 == 1 && *w != u64::MAX)
            })
            .expect("a successful read with a mapped first page and an unmapped one");
        let mut kernel = ours.clone();
        kernel[i].bitmap[0] &= !1;
        let lost = compare(&calls, &kernel, &ours, &before);
        assert_eq!(lost.differences.len(), 1, "{:?}", lost.differences);
        // A stale bit right after the first mapped run (the quirk's shape) is accepted...
        let w = ours[i].bitmap[0];
        kernel[i].bitmap[0] = w | (1 << (!w).trailing_zeros());
        let quirk = compare(&calls, &kernel, &ours, &before);
        assert!(
            quirk.differences.is_empty() && quirk.quirk_bits == 1,
            "{quirk:?}"
        );
    }
}
