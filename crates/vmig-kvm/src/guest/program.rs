//! What the VMM installs in guest memory before boot ([`GuestProgram::install`]: the descriptor
//! table, the page tables, the code and each vCPU's parameters) and the registers each vCPU
//! boots with.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vmig_primitives::GuestAddress;

use super::layout::{
    CODE_GPA, CODE_LIMIT, GDT_GPA, MAX_VCPUS, MMIO_WINDOW_GPA, MMIO_WINDOW_SIZE, WS_VA,
};
use super::page_tables::PageTables;
use super::protocol::*;
use super::verify::CHECKSUM_K;
use super::{GuestLayout, Workload};
use crate::error::{KvmError, Result};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// What the VMM installs in guest memory and the registers each vCPU starts with.
#[derive(Clone, Debug)]
pub struct GuestProgram {
    pub(super) layout: GuestLayout,
    pub(super) workload: Workload,
    pub(super) vcpus: usize,
}

impl GuestProgram {
    /// A program for `vcpus` vCPUs running `workload` in `layout`.
    pub fn new(layout: &GuestLayout, workload: &Workload, vcpus: usize) -> Result<Self> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(KvmError::Invalid(format!(
                "{vcpus} vCPUs: expected 1 to {MAX_VCPUS}"
            )));
        }
        workload.check()?;
        if !workload.shared && layout.ws_pages < vcpus as u64 {
            return Err(KvmError::Invalid(format!(
                "a working set of {} page(s) cannot give each of {vcpus} vCPUs its own slice: use a larger wss, or shared",
                layout.ws_pages
            )));
        }
        Ok(Self {
            layout: layout.clone(),
            workload: workload.clone(),
            vcpus,
        })
    }

    /// Pages written between two pacing requests (and between two looks at the control page).
    pub fn batch(&self) -> u64 {
        match self.workload.rate {
            Some(rate) => (rate / (100 * self.vcpus as u64)).clamp(1, 64),
            None => 64,
        }
    }

    /// Writes the descriptor table, page tables, code and per-vCPU parameters into `memory`.
    pub fn install(&self, memory: &GuestMemory) -> Result<()> {
        // GDT: null, 64-bit code (0x08), data (0x10).
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        memory.write(GuestAddress(GDT_GPA), &words_to_bytes(&gdt))?;
        self.install_page_tables(memory)?;
        let code = self.assemble()?;
        if code.len() as u64 > CODE_LIMIT {
            return Err(KvmError::Invalid("guest code does not fit its area".into()));
        }
        memory.write(GuestAddress(CODE_GPA), &code)?;
        let hot_total = match self.workload.hot {
            Some(bytes) => (bytes / PAGE_SIZE).clamp(1, self.layout.ws_pages),
            None => (self.layout.ws_pages / 16).max(1),
        };
        for vcpu in 0..self.vcpus {
            let (slice_lo, slice_pages) = self.layout.slice(vcpu, self.vcpus);
            let (range_lo, range_pages) = if self.workload.shared {
                (0, self.layout.ws_pages)
            } else {
                (slice_lo, slice_pages)
            };
            let hot = if self.workload.shared {
                hot_total
            } else {
                (hot_total / self.vcpus as u64).max(1)
            };
            let block = vcpu_block_gpa(vcpu);
            let seed =
                splitmix(self.workload.seed ^ (vcpu as u64 + 1).wrapping_mul(CHECKSUM_K)) | 1;
            for (offset, value) in [
                (VB_RANGE_LO, range_lo),
                (VB_RANGE_PAGES, range_pages),
                (VB_SLICE_LO, slice_lo),
                (VB_SLICE_PAGES, slice_pages),
                (VB_SEED, seed),
                (VB_TAG, (vcpu as u64) << 48),
                (VB_HOT_PAGES, hot.min(range_pages)),
                (VB_SEQ_START, slice_lo - range_lo),
            ] {
                memory.store_u64(block + offset, value)?;
            }
        }
        Ok(())
    }

    fn install_page_tables(&self, memory: &GuestMemory) -> Result<()> {
        let mut tables =
            PageTables::new(self.layout.page_tables_gpa, self.layout.page_tables_pages);
        let system = self.layout.memory.slots[0];
        tables.map(0, 0, system.size)?;
        tables.map(MMIO_WINDOW_GPA, MMIO_WINDOW_GPA, MMIO_WINDOW_SIZE)?;
        let mut va = WS_VA;
        for slot in self.layout.memory.data_slots() {
            tables.map(va, slot.gpa, slot.size)?;
            va += slot.size;
        }
        for (gpa, page) in tables.pages() {
            memory.write(GuestAddress(gpa), &words_to_bytes(page))?;
        }
        Ok(())
    }

    /// The registers vCPU `vcpu` boots with.
    pub fn boot_regs(&self, vcpu: usize) -> kvm_regs {
        kvm_regs {
            rip: CODE_GPA,
            rflags: 0x2,
            r15: vcpu_block_gpa(vcpu),
            ..Default::default()
        }
    }

    /// Long mode with paging on, starting from the vCPU's reset state `base`.
    pub fn boot_sregs(&self, base: &kvm_sregs) -> kvm_sregs {
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        let mut sregs = *base;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: 0,
            limit: 0x67,
            selector: 0x18,
            type_: 0xb,
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = 23;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = self.layout.page_tables_gpa;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
        sregs.efer = 0x500 | 0x1; // LMA, LME, SCE
        sregs
    }
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    let mut bytes = vec![0u8; words.len() * 8];
    vmig_dirty::words_to_le_bytes(words, &mut bytes);
    bytes
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
