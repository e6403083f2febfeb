//! The guest-physical memory map (the system slot's descriptor table, control page, vCPU
//! blocks, code and journal; the data slots; the MMIO window) and [`GuestLayout`]: where the
//! working set lies in the data slots and which slice of it each vCPU writes and verifies.

use serde::{Deserialize, Serialize};

use super::Workload;
use crate::error::{KvmError, Result};
use crate::memory::{MemoryLayout, PAGE_SIZE};

const MIB: u64 = 1 << 20;
pub(super) const HUGE_PAGE: u64 = 2 * MIB;

// The system slot (identity-mapped).
pub(super) const GDT_GPA: u64 = 0x1000;
/// The control page: host → guest.
pub const CONTROL_GPA: u64 = 0x2000;
pub(super) const VCPU_BLOCKS_GPA: u64 = 0x4000;
pub(super) const VCPU_BLOCK_SIZE: u64 = 0x100;
pub(super) const CODE_GPA: u64 = 0x10000;
pub(super) const CODE_LIMIT: u64 = 0x10000;
pub(super) const JOURNAL_GPA: u64 = 0x20_0000;
/// Where the working set is mapped in the guest's virtual address space (PML4 slot 1).
pub(super) const WS_VA: u64 = 0x80_0000_0000;

/// Guest-physical window where device BARs go: below 4 GiB and above the highest low RAM,
/// identity-mapped: accesses exit to the VMM, except in device areas it maps as memslots.
pub const MMIO_WINDOW_GPA: u64 = 0xe000_0000;
/// Size of [`MMIO_WINDOW_GPA`]'s window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000_0000;

/// First guest I/O port of the window where devices' I/O-port BARs go (as the MMIO window,
/// for BARs with bit 0 set in config space, such as a 16550 UART's): above the legacy PC ports
/// and the guest's report ports (`0x510`-`0x513`), where PCI firmware puts I/O BARs. Port
/// accesses exit to the VMM; nothing there is ever mapped.
pub const IO_WINDOW_PORT: u16 = 0xc000;
/// Ports in [`IO_WINDOW_PORT`]'s window.
pub const IO_WINDOW_PORTS: u16 = 0x1000;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 8;

/// The guest's view of memory: the layout of slots, where the working set and its journal
/// are, and which slice of it each vCPU writes and verifies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLayout {
    /// Slots.
    pub memory: MemoryLayout,
    /// Working-set pages (a prefix of the data pages).
    pub ws_pages: u64,
    pub(super) page_tables_gpa: u64,
    pub(super) page_tables_pages: u64,
}

impl GuestLayout {
    /// Lays out `ram` bytes for `workload`.
    pub fn new(ram: u64, workload: &Workload) -> Result<Self> {
        let pages = ram / PAGE_SIZE;
        let journal = (pages * 8).next_multiple_of(PAGE_SIZE);
        let page_tables_pages = ram.div_ceil(1 << 30) + 16;
        let page_tables_gpa = JOURNAL_GPA + journal;
        let system = (page_tables_gpa + page_tables_pages * PAGE_SIZE).next_multiple_of(HUGE_PAGE);
        let memory = MemoryLayout::new(ram, system)?;
        let data_pages: u64 = memory.data_slots().map(|s| s.pages()).sum();
        let ws_pages = match workload.wss {
            None => data_pages,
            Some(bytes) => {
                let ws = bytes / PAGE_SIZE;
                if ws == 0 || ws > data_pages || bytes % PAGE_SIZE != 0 {
                    return Err(KvmError::Invalid(format!(
                        "working set of {bytes} bytes: expected a multiple of 4 KiB from 4 KiB to {} bytes (the data RAM of this VM)",
                        data_pages * PAGE_SIZE
                    )));
                }
                ws
            }
        };
        Ok(Self {
            memory,
            ws_pages,
            page_tables_gpa,
            page_tables_pages,
        })
    }

    /// Guest-physical address of working-set page `index`.
    pub fn ws_page_gpa(&self, index: u64) -> Option<u64> {
        let mut rest = index;
        for slot in self.memory.data_slots() {
            if rest < slot.pages() {
                return Some(slot.gpa + rest * PAGE_SIZE);
            }
            rest -= slot.pages();
        }
        None
    }

    /// Guest-physical address of the journal entry of working-set page `index`.
    pub fn journal_gpa(index: u64) -> u64 {
        JOURNAL_GPA + index * 8
    }

    /// The range `[lo, lo + pages)` of working-set pages vCPU `vcpu` of `vcpus` verifies (and, when
    /// the working set is not shared, writes).
    pub fn slice(&self, vcpu: usize, vcpus: usize) -> (u64, u64) {
        let vcpus = vcpus.max(1);
        let lo = self.ws_pages * vcpu as u64 / vcpus as u64;
        let hi = self.ws_pages * (vcpu as u64 + 1) / vcpus as u64;
        (lo, hi - lo)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_set_pages_map_into_data_slots_only() {
        let layout = GuestLayout::new(64 << 20, &Workload::default()).unwrap();
        let data: Vec<_> = layout.memory.data_slots().copied().collect();
        assert_eq!(layout.ws_page_gpa(0), Some(data[0].gpa));
        assert_eq!(
            layout.ws_page_gpa(data[0].pages()),
            Some(data[1].gpa),
            "the page after data-a's last is data-b's first"
        );
        assert_eq!(layout.ws_page_gpa(layout.ws_pages), None);
        let slices: u64 = (0..3).map(|v| layout.slice(v, 3).1).sum();
        assert_eq!(slices, layout.ws_pages);
    }
}
