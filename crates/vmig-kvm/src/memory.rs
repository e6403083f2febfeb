//! Guest RAM: one memfd per memslot (so a device server can map the same memory by fd), mapped
//! shared into this process, laid out like KVM's own dirty-log test wants it: several slots, one
//! of them not a multiple of 64 pages long, and a hole between two of them.
//!
//! ```text
//!  0                system_size        +L1 (L1 ≡ 3 pages mod 64)      data-b start         top
//!  | slot 0: system | slot 1: data-a   |  hole (≥ 1 MiB; the 32-bit  | slot 2: data-b      |
//!  | code, tables,  |                  |  MMIO hole when RAM is big) |                     |
//!  | journal        |                  |                             |                     |
//! ```
//!
//! Every write the VMM makes through [`GuestMemory::write`] or [`GuestMemory::store_u64`] is
//! recorded in [`GuestMemory::vmm_dirty`]: KVM only sees the guest's own writes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vmig_dirty::DirtyBitmap;
use vmig_primitives::{GuestAddress, HostMemory};
pub use vmig_primitives::{PAGE_SIZE, page_digest};

pub(crate) use vmig_primitives::PAGE_BYTES;

/// A byte offset or length inside a slot's host mapping, as a `usize`: the mapping exists in
/// this process, so whatever lies inside it fits the address space.
#[expect(
    clippy::cast_possible_truncation,
    reason = "bounded by the length of a host mapping, which is a usize"
)]
pub(crate) const fn host_offset(bytes: u64) -> usize {
    bytes as usize
}

use crate::error::{KvmError, Result};
use crate::sys;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Smallest RAM a VM may have.
pub const MIN_RAM: u64 = 16 * MIB;
/// Largest RAM a VM may have (the address space then ends at 4 GiB + 256 GiB).
pub const MAX_RAM: u64 = 256 * GIB;
/// Start of the 32-bit MMIO hole: RAM that does not fit below it continues at 4 GiB.
const LOW_RAM_LIMIT: u64 = 3 * GIB;
const HIGH_RAM_START: u64 = 4 * GIB;
const HUGE_PAGE: u64 = 2 * MIB;

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotRole {
    /// Guest code, page tables, control and status pages, the write journal.
    System,
    /// Pages the workload writes.
    Data,
}

/// One memslot of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotLayout {
    /// KVM slot id.
    pub id: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// What it holds.
    pub role: SlotRole,
}

impl SlotLayout {
    /// First guest page number.
    pub fn first_page(&self) -> u64 {
        self.gpa / PAGE_SIZE
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa <= self.size && len <= self.size - (gpa - self.gpa)
    }
}

/// Where guest RAM lives in the guest-physical address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The slots, by increasing address.
    pub slots: Vec<SlotLayout>,
}

impl MemoryLayout {
    /// Lays out `ram` bytes of which the first `system` bytes are the system slot at address 0;
    /// the rest is split into two data slots around a hole. `system` must be a multiple of
    /// 2 MiB; `ram` a multiple of the page size between [`MIN_RAM`] and [`MAX_RAM`].
    pub fn new(ram: u64, system: u64) -> Result<Self> {
        if !(MIN_RAM..=MAX_RAM).contains(&ram) || !ram.is_multiple_of(PAGE_SIZE) {
            return Err(KvmError::Invalid(format!(
                "guest RAM of {ram} bytes: expected a multiple of 4 KiB from 16 MiB to 256 GiB"
            )));
        }
        if !system.is_multiple_of(HUGE_PAGE)
            || system >= LOW_RAM_LIMIT
            || system.saturating_add(2 * 64 * PAGE_SIZE) > ram
        {
            return Err(KvmError::Invalid(format!(
                "system area of {system:#x} bytes does not leave room for data in {ram:#x} bytes of RAM"
            )));
        }
        let data = ram - system;
        // data-a: about half, at most up to the MMIO hole, cut to 3 pages past a multiple of 64
        // pages so its bitmap ends inside a word.
        let a_room = LOW_RAM_LIMIT.saturating_sub(system + HUGE_PAGE);
        let mut a = (data / 2).min(a_room) / (64 * PAGE_SIZE) * (64 * PAGE_SIZE);
        a = a.saturating_sub(61 * PAGE_SIZE).max(3 * PAGE_SIZE);
        let b = data - a;
        // data-b starts at the same offset within a 2 MiB page as the working-set window reaches
        // it (the window maps data-a then data-b back to back), so the guest maps it with 2 MiB
        // pages.
        let phase = a % HUGE_PAGE;
        let after_a = system + a;
        let low_b = (after_a + MIB).next_multiple_of(HUGE_PAGE) + phase;
        let b_gpa = if low_b + b <= LOW_RAM_LIMIT {
            low_b
        } else {
            HIGH_RAM_START + phase
        };
        Ok(Self {
            slots: vec![
                SlotLayout {
                    id: 0,
                    gpa: 0,
                    size: system,
                    role: SlotRole::System,
                },
                SlotLayout {
                    id: 1,
                    gpa: system,
                    size: a,
                    role: SlotRole::Data,
                },
                SlotLayout {
                    id: 2,
                    gpa: b_gpa,
                    size: b,
                    role: SlotRole::Data,
                },
            ],
        })
    }

    /// One past the highest guest page number.
    pub fn top_page(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.first_page() + s.pages())
            .max()
            .unwrap_or(0)
    }

    /// Total RAM in bytes.
    pub fn ram(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    /// The data slots, in the order the working set uses them.
    pub fn data_slots(&self) -> impl Iterator<Item = &SlotLayout> {
        self.slots.iter().filter(|s| s.role == SlotRole::Data)
    }
}

/// One slot's memory.
#[derive(Debug)]
pub struct Slot {
    /// Where it is.
    pub layout: SlotLayout,
    fd: OwnedFd,
    host: HostMemory,
}

impl Slot {
    /// The memfd behind the slot (offset 0 is the slot's first byte).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The host mapping.
    pub fn host(&self) -> &HostMemory {
        &self.host
    }
}

/// Guest RAM of one VM.
#[derive(Debug)]
pub struct GuestMemory {
    layout: MemoryLayout,
    slots: Vec<Slot>,
    vmm_dirty: DirtyBitmap,
}

impl GuestMemory {
    /// Creates the memfds of `layout` (sparse: pages are allocated on first touch) and maps them.
    pub fn new(layout: &MemoryLayout) -> Result<Self> {
        let mut slots = Vec::with_capacity(layout.slots.len());
        for slot in &layout.slots {
            let fd = vmig_primitives::memfd(&format!("vmig-ram-slot{}", slot.id), slot.size)?;
            let host = HostMemory::map_fd(fd.as_fd(), 0, slot.size, true)?;
            slots.push(Slot {
                layout: *slot,
                fd,
                host,
            });
        }
        Ok(Self {
            layout: layout.clone(),
            slots,
            vmm_dirty: DirtyBitmap::try_new(layout.top_page())?,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Pages the VMM wrote since this bitmap was last harvested (guest-physical page numbers).
    pub fn vmm_dirty(&self) -> &DirtyBitmap {
        &self.vmm_dirty
    }

    fn locate(&self, gpa: u64, len: u64) -> Result<(&Slot, usize)> {
        self.slots
            .iter()
            .find(|s| s.layout.contains(gpa, len))
            .map(|s| (s, host_offset(gpa - s.layout.gpa)))
            .ok_or_else(|| {
                KvmError::Invalid(format!(
                    "guest range [{gpa:#x}, +{len:#x}) is not inside one RAM slot"
                ))
            })
    }

    /// Copies guest memory at `gpa` into `buf`; the range must lie in one slot.
    pub fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<()> {
        let gpa = gpa.raw();
        let (slot, offset) = self.locate(gpa, buf.len() as u64)?;
        Ok(slot.host.read(offset, buf)?)
    }

    /// The [`page_digest`] of each of `count` pages from page number `first` (all in one
    /// slot), read where they are, in page order: for verification, with the vCPUs and
    /// devices stopped.
    pub fn page_digests(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        let range = first
            .checked_mul(PAGE_SIZE)
            .zip(count.checked_mul(PAGE_SIZE))
            .ok_or_else(|| {
                KvmError::Invalid(format!("pages [{first:#x}, +{count:#x}) overflow"))
            })?;
        let (slot, offset) = self.locate(range.0, range.1)?;
        let count = usize::try_from(count)
            .map_err(|_| KvmError::Invalid(format!("{count} pages do not fit in memory")))?;
        let mut out = Vec::new();
        slot.host.page_digests(offset, count, &mut out)?;
        Ok(out)
    }

    /// The 4 KiB of guest page `page`, where they are, without a copy: the vCPUs and devices
    /// may write them meanwhile (see [`HostMemory::shared`]).
    pub fn page_bytes(&self, page: u64) -> Result<&[u8]> {
        let gpa = page
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| KvmError::Invalid(format!("page {page:#x} is beyond guest RAM")))?;
        let (slot, offset) = self.locate(gpa, PAGE_SIZE)?;
        Ok(slot.host.shared(offset, PAGE_BYTES)?)
    }

    /// Copies `data` into guest memory at `gpa` and records the pages as written by the VMM.
    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<()> {
        let gpa = gpa.raw();
        let (slot, offset) = self.locate(gpa, data.len() as u64)?;
        slot.host.write(offset, data)?;
        self.mark_vmm_dirty(gpa, data.len() as u64);
        Ok(())
    }

    /// Reads whole pages from `fd` straight into guest memory, in the order of `pages` (page
    /// numbers), and records them as written by the VMM: how a destination loads a record's
    /// pages without copying them through a buffer. Every page is checked to be guest RAM
    /// before anything is read; a failure midway leaves the pages before it written.
    pub fn read_pages_from(&self, fd: BorrowedFd<'_>, pages: &[u64]) -> Result<()> {
        // Runs of pages in one slot, each a list of (offset, length) with neighbours merged.
        let mut runs: Vec<(&Slot, Vec<(usize, usize)>)> = Vec::new();
        for &page in pages {
            let gpa = page
                .checked_mul(PAGE_SIZE)
                .ok_or_else(|| KvmError::Invalid(format!("page {page:#x} is beyond guest RAM")))?;
            let (slot, offset) = self
                .locate(gpa, PAGE_SIZE)
                .map_err(|_| KvmError::Invalid(format!("page {page:#x} is beyond guest RAM")))?;
            match runs.last_mut() {
                Some((last, ranges)) if std::ptr::eq(*last, slot) => match ranges.last_mut() {
                    Some((start, len)) if *start + *len == offset => *len += PAGE_BYTES,
                    _ => ranges.push((offset, PAGE_BYTES)),
                },
                _ => runs.push((slot, vec![(offset, PAGE_BYTES)])),
            }
        }
        for (slot, ranges) in &runs {
            slot.host.read_exact_from(fd, ranges)?;
        }
        for &page in pages {
            self.mark_vmm_dirty(page * PAGE_SIZE, PAGE_SIZE);
        }
        Ok(())
    }

    fn mark_vmm_dirty(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = (gpa + len - 1) / PAGE_SIZE;
        // In range: `locate` checked the bytes lie in a slot below `top_page`.
        let _ = self.vmm_dirty.set_range(first, last - first + 1);
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU64> {
        let (slot, offset) = self.locate(gpa, 8)?;
        sys::atomic_u64(&slot.host, offset).ok_or_else(|| {
            KvmError::Invalid(format!("guest word at {gpa:#x} is not 8-byte aligned"))
        })
    }

    /// Loads the aligned `u64` at `gpa` (acquire), as the guest may be writing it.
    pub fn load_u64(&self, gpa: u64) -> Result<u64> {
        Ok(self.atomic(gpa)?.load(Ordering::Acquire))
    }

    /// Stores the aligned `u64` at `gpa` (release) and records the page as written by the VMM.
    pub fn store_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.atomic(gpa)?.store(value, Ordering::Release);
        self.mark_vmm_dirty(gpa, 8);
        Ok(())
    }

    /// Allocates every page of guest RAM now and maps it into this process (contents
    /// unchanged), instead of on first touch: first touch of fresh memory is several times
    /// slower than writing memory already there.
    pub fn preallocate(&self) -> Result<()> {
        for slot in &self.slots {
            sys::preallocate(slot.fd(), slot.layout.size)?;
            sys::populate(&slot.host)?;
        }
        Ok(())
    }

    /// A digest of every page, in page order: equal memory gives equal digests in any process.
    pub fn digest(&self) -> Result<u64> {
        let mut digest = DIGEST_SEED;
        for slot in &self.slots {
            let first = slot.layout.first_page();
            let pages = self.page_digests(first, slot.layout.pages())?;
            for (number, page) in (first..).zip(pages) {
                digest = mix(digest ^ number);
                digest = mix(digest ^ page);
            }
        }
        Ok(digest)
    }
}

const DIGEST_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_an_odd_slot_and_a_hole_at_every_size() {
        for ram in [
            MIN_RAM,
            64 * MIB,
            512 * MIB,
            3 * GIB,
            8 * GIB,
            64 * GIB,
            MAX_RAM,
        ] {
            let layout = MemoryLayout::new(ram, 4 * MIB).unwrap();
            assert_eq!(layout.ram(), ram);
            let [sys, a, b] = layout.slots[..] else {
                panic!("three slots")
            };
            assert_eq!(sys.gpa, 0);
            assert_eq!(a.gpa, sys.size);
            assert_eq!(a.pages() % 64, 3, "data-a ends inside a bitmap word");
            assert!(b.gpa >= a.gpa + a.size + MIB, "a hole of at least 1 MiB");
            assert_eq!(b.gpa % HUGE_PAGE, a.size % HUGE_PAGE, "window phase");
            assert!(a.gpa + a.size <= LOW_RAM_LIMIT);
            assert!(b.gpa + b.size <= LOW_RAM_LIMIT || b.gpa >= HIGH_RAM_START);
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_the_range() {
        for ram in [0, MIN_RAM - PAGE_SIZE, MAX_RAM + PAGE_SIZE, MIN_RAM + 1] {
            let err = MemoryLayout::new(ram, 4 * MIB).unwrap_err().to_string();
            assert!(err.contains("16 MiB to 256 GiB"), "{err}");
        }
    }

    #[test]
    fn digest_sees_one_bit() {
        let mut page = vec![0u8; PAGE_BYTES];
        let a = page_digest(&page);
        page[4095] = 1;
        assert_ne!(a, page_digest(&page));
    }
}
