//! The guest: 64-bit long-mode code assembled at run time (iced-x86), the page tables and
//! descriptor table it runs on, and the self-checking workloads it executes.
//!
//! Each vCPU writes pages of a working set, chosen `sequential`ly, at `random` (xorshift64* seeded
//! per vCPU) or `hotcold` (most writes to a small hot set), either in its own slice of the working
//! set or anywhere in it (`shared`, with a per-page try-lock). Every write leaves a stamp:
//!
//! ```text
//! page + 0     MAGIC | working-set page number
//! page + 8     epoch (set by the host: the iteration number of dirty-log tests)
//! page + 16    tag = vcpu << 48 | the vCPU's write count (unique per write)
//! page + 24    checksum of the three words above
//! page + 4088  tag again (a torn copy of the page shows a head and tail that disagree)
//! journal[i]   tag, written last (the guest's own record of the page's latest write)
//! ```
//!
//! The host talks to the guest through a control page the guest polls between batches of writes
//! (the epoch and commands) and the guest reports through I/O ports: a pacing request per batch
//! (the VMM's token bucket sleeps it), each inconsistent page found by `verify`, the end of a
//! verify, and a yield while it spins in a barrier. `verify` stops every vCPU's writes at a
//! barrier in guest memory, has each vCPU check its slice of the working set against the
//! journal, and releases them at a second barrier.

use std::fmt;
use std::str::FromStr;

use iced_x86::code_asm::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::error::{KvmError, Result};
use crate::memory::{GuestMemory, MemoryLayout, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const HUGE_PAGE: u64 = 2 * MIB;

// The system slot (identity-mapped).
const GDT_GPA: u64 = 0x1000;
/// The control page: host → guest.
pub const CONTROL_GPA: u64 = 0x2000;
const VCPU_BLOCKS_GPA: u64 = 0x4000;
const VCPU_BLOCK_SIZE: u64 = 0x100;
const CODE_GPA: u64 = 0x10000;
const CODE_LIMIT: u64 = 0x10000;
const JOURNAL_GPA: u64 = 0x20_0000;
/// Where the working set is mapped in the guest's virtual address space (PML4 slot 1).
const WS_VA: u64 = 0x80_0000_0000;

// Control page words.
const CTL_CMD_SEQ: u64 = 0;
const CTL_CMD: u64 = 8;
const CTL_EPOCH: u64 = 16;
const CTL_BARRIER_A: u64 = 24;
const CTL_BARRIER_B: u64 = 32;
const CTL_VERIFY_GEN: u64 = 40;
const CMD_VERIFY: u64 = 1;
/// Doorbells the guest's driver rings (count, then `MAX_DOORBELLS` pairs of addresses).
const CTL_DOORBELL_COUNT: u64 = 48;
const CTL_DOORBELLS: u64 = 56;
/// Most devices the guest's driver serves.
pub const MAX_DOORBELLS: usize = 8;
/// Guest-physical window where device BARs go: below 4 GiB and above the highest low RAM,
/// identity-mapped: accesses exit to the VMM, except in device areas it maps as memslots.
pub const MMIO_WINDOW_GPA: u64 = 0xe000_0000;
/// Size of [`MMIO_WINDOW_GPA`]'s window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000_0000;

// vCPU block words: written by the guest...
const VB_WRITES: u64 = 0;
const VB_SEEN_SEQ: u64 = 8;
const VB_VERIFY_CHECKED: u64 = 16;
const VB_VERIFY_BAD: u64 = 24;
/// Pages the verify in progress has checked so far.
const VB_VERIFY_PAGES: u64 = 32;
// ...and by the VMM before boot.
const VB_RANGE_LO: u64 = 64;
const VB_RANGE_PAGES: u64 = 72;
const VB_SLICE_LO: u64 = 80;
const VB_SLICE_PAGES: u64 = 88;
const VB_SEED: u64 = 96;
const VB_TAG: u64 = 104;
const VB_HOT_PAGES: u64 = 112;
const VB_SEQ_START: u64 = 120;

/// Guest → VMM: "I am about to write this many pages" (eax); the VMM paces.
pub const PORT_PACE: u16 = 0x510;
/// Guest → VMM: working-set page `eax` failed verification.
pub const PORT_BAD_PAGE: u16 = 0x511;
/// Guest → VMM: this vCPU finished verifying; `eax` = pages it checked (counted page by page,
/// so a verify that skipped pages cannot pass for a complete one).
pub const PORT_VERIFY_DONE: u16 = 0x512;
/// Guest → VMM: spinning in a barrier; let another vCPU thread run.
pub const PORT_YIELD: u16 = 0x513;

/// High bits of stamp word 0.
pub const STAMP_MAGIC: u64 = 0x564d_4947 << 32; // "VMIG"
const CHECKSUM_K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 8;

/// How the guest picks the next page to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadKind {
    /// Page after page, wrapping at the end of the range.
    Sequential,
    /// Uniformly random pages (xorshift64*, seeded per vCPU).
    Random,
    /// `hot_percent` of the writes to the first `hot` bytes of the range, the rest anywhere.
    HotCold,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::HotCold => "hotcold",
        })
    }
}

/// What the guest does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Page choice.
    pub kind: WorkloadKind,
    /// Pages per second for the whole VM; `None` writes as fast as the vCPUs can.
    pub rate: Option<u64>,
    /// Working-set size in bytes; `None` uses all data RAM.
    pub wss: Option<u64>,
    /// Hot-set size in bytes (`hotcold`); `None` is a sixteenth of the working set.
    pub hot: Option<u64>,
    /// Percentage of `hotcold` writes that go to the hot set.
    pub hot_percent: u8,
    /// All vCPUs write anywhere in the working set (instead of each in its own slice).
    pub shared: bool,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            kind: WorkloadKind::Random,
            rate: None,
            wss: None,
            hot: None,
            hot_percent: 90,
            shared: false,
            seed: 1,
        }
    }
}

impl FromStr for Workload {
    type Err = KvmError;

    /// `KIND[,rate=PAGES_PER_S][,wss=SIZE][,hot=SIZE][,hot-percent=N][,shared][,seed=N]`.
    fn from_str(spec: &str) -> Result<Self> {
        let mut parts = spec.split(',');
        let kind = match parts.next().unwrap_or("") {
            "sequential" => WorkloadKind::Sequential,
            "random" => WorkloadKind::Random,
            "hotcold" => WorkloadKind::HotCold,
            other => {
                return Err(KvmError::Invalid(format!(
                    "unknown workload `{other}`: expected sequential, random or hotcold"
                )));
            }
        };
        let mut workload = Workload {
            kind,
            ..Workload::default()
        };
        for part in parts {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let number = |what: &str| {
                value.parse::<u64>().map_err(|_| {
                    KvmError::Invalid(format!("workload option {key}=`{value}`: expected {what}"))
                })
            };
            match key {
                "rate" => {
                    let rate = number("pages per second (0 = unlimited)")?;
                    workload.rate = (rate != 0).then_some(rate);
                }
                "wss" => workload.wss = Some(parse_size(value)?),
                "hot" => workload.hot = Some(parse_size(value)?),
                "hot-percent" => {
                    let p = number("a percentage from 1 to 99")?;
                    if !(1..=99).contains(&p) {
                        return Err(KvmError::Invalid(format!(
                            "workload option hot-percent={p}: expected a percentage from 1 to 99"
                        )));
                    }
                    workload.hot_percent = p as u8;
                }
                "shared" if value.is_empty() => workload.shared = true,
                "seed" => workload.seed = number("a number")?,
                _ => {
                    return Err(KvmError::Invalid(format!(
                        "unknown workload option `{part}`: expected rate=N, wss=SIZE, hot=SIZE, hot-percent=N, shared or seed=N"
                    )));
                }
            }
        }
        Ok(workload)
    }
}

/// Parses a size such as `4096`, `64K`, `512M`, `512MiB`, `2G`, `1T`.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        KvmError::Invalid(format!(
            "size `{text}`: expected a number with an optional K, M, G or T suffix (powers of 1024), e.g. 512M"
        ))
    };
    let trimmed = text.trim();
    let digits = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &trimmed[digits.len()..];
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}

/// The guest's view of memory: the layout of slots, where the working set and its journal
/// are, and which slice of it each vCPU writes and verifies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLayout {
    /// Slots.
    pub memory: MemoryLayout,
    /// Working-set pages (a prefix of the data pages).
    pub ws_pages: u64,
    page_tables_gpa: u64,
    page_tables_pages: u64,
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

/// The stamp the guest leaves in a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Word 0: [`STAMP_MAGIC`] | working-set page number.
    pub head: u64,
    /// Word 1: the epoch when written.
    pub epoch: u64,
    /// Word 2: vcpu << 48 | write count.
    pub tag: u64,
    /// Word 3: checksum of words 0-2.
    pub checksum: u64,
    /// Last word of the page: the tag again.
    pub tail: u64,
}

impl Stamp {
    /// Reads the stamp of working-set page `index`.
    pub fn read(memory: &GuestMemory, layout: &GuestLayout, index: u64) -> Result<Self> {
        let gpa = layout
            .ws_page_gpa(index)
            .ok_or_else(|| KvmError::Invalid(format!("page {index} is outside the working set")))?;
        let mut head = [0u8; 32];
        let mut tail = [0u8; 8];
        memory.read(gpa, &mut head)?;
        memory.read(gpa + PAGE_SIZE - 8, &mut tail)?;
        let word = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(Self {
            head: word(0),
            epoch: word(1),
            tag: word(2),
            checksum: word(3),
            tail: u64::from_le_bytes(tail),
        })
    }

    /// The checksum the guest computes.
    pub fn expected_checksum(head: u64, epoch: u64, tag: u64) -> u64 {
        (head ^ epoch ^ tag).wrapping_mul(CHECKSUM_K)
    }

    /// Whether the page is what the guest's `verify` accepts, given its journal entry.
    pub fn is_consistent(&self, index: u64, journal: u64) -> bool {
        if journal == 0 {
            return self.head == 0 && self.tag == 0 && self.tail == 0;
        }
        self.head == STAMP_MAGIC | index
            && self.tag == journal
            && self.tail == journal
            && self.checksum == Self::expected_checksum(self.head, self.epoch, self.tag)
    }
}

/// What the VMM installs in guest memory and the registers each vCPU starts with.
#[derive(Clone, Debug)]
pub struct GuestProgram {
    layout: GuestLayout,
    workload: Workload,
    vcpus: usize,
}

impl GuestProgram {
    /// A program for `vcpus` vCPUs running `workload` in `layout`.
    pub fn new(layout: &GuestLayout, workload: &Workload, vcpus: usize) -> Result<Self> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(KvmError::Invalid(format!(
                "{vcpus} vCPUs: expected 1 to {MAX_VCPUS}"
            )));
        }
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
        memory.write(GDT_GPA, &words_to_bytes(&gdt))?;
        self.install_page_tables(memory)?;
        let code = self.assemble()?;
        if code.len() as u64 > CODE_LIMIT {
            return Err(KvmError::Invalid("guest code does not fit its area".into()));
        }
        memory.write(CODE_GPA, &code)?;
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
            memory.write(gpa, &words_to_bytes(page))?;
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

    fn assemble(&self) -> Result<Vec<u8>> {
        self.assemble_code()
            .map_err(|e| KvmError::Invalid(format!("assembling the guest: {e}")))
    }

    #[allow(clippy::too_many_lines)]
    fn assemble_code(&self) -> std::result::Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let batch = self.batch();
        let hot_threshold = u64::from(self.workload.hot_percent) * 256 / 100;
        let mut write_loop = a.create_label();
        let mut pick_done = a.create_label();
        let mut batch_end = a.create_label();
        let mut verify = a.create_label();

        // Prologue: r15 = vCPU block (set by the VMM).
        a.mov(rax, qword_ptr(r15 + VB_RANGE_LO))?;
        a.mov(r14, rax)?;
        a.shl(r14, 12)?;
        a.mov(rcx, WS_VA)?;
        a.add(r14, rcx)?; // r14 = VA of the range's first page
        a.mov(r10, rax)?;
        a.shl(r10, 3)?;
        a.mov(rcx, JOURNAL_GPA)?;
        a.add(r10, rcx)?; // r10 = journal of the range
        a.mov(r13, qword_ptr(r15 + VB_RANGE_PAGES))?;
        a.mov(r12, qword_ptr(r15 + VB_SEED))?;
        a.mov(r11, qword_ptr(r15 + VB_WRITES))?;
        a.mov(r8, qword_ptr(r15 + VB_TAG))?;
        a.mov(rbp, qword_ptr(r15 + VB_HOT_PAGES))?;
        a.mov(rbx, qword_ptr(r15 + VB_SEQ_START))?;
        a.mov(r9, batch)?;

        a.set_label(&mut write_loop)?;
        // rax = page index in [0, r13)
        match self.workload.kind {
            WorkloadKind::Sequential => {
                let mut no_wrap = a.create_label();
                a.mov(rax, rbx)?;
                a.inc(rbx)?;
                a.cmp(rbx, r13)?;
                a.jb(no_wrap)?;
                a.xor(ebx, ebx)?;
                a.set_label(&mut no_wrap)?;
                a.cmp(rax, r13)?;
                a.jb(pick_done)?;
                a.xor(eax, eax)?;
            }
            WorkloadKind::Random | WorkloadKind::HotCold => {
                // xorshift64*
                a.mov(rax, r12)?;
                a.shr(rax, 12)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.shl(rax, 25)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.shr(rax, 27)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.mov(rcx, 0x2545_f491_4f6c_dd1du64)?;
                a.imul_2(rax, rcx)?;
                a.mov(rcx, r13)?;
                if self.workload.kind == WorkloadKind::HotCold {
                    let mut cold = a.create_label();
                    a.movzx(edx, al)?;
                    a.cmp(edx, hot_threshold as u32)?;
                    a.jae(cold)?;
                    a.mov(rcx, rbp)?;
                    a.set_label(&mut cold)?;
                }
                a.shr(rax, 32)?;
                a.imul_2(rax, rcx)?;
                a.shr(rax, 32)?;
            }
        }
        a.set_label(&mut pick_done)?;
        if self.workload.shared {
            // Try-lock the page through bit 63 of its journal entry; busy → pick another.
            a.lock().bts(qword_ptr(r10 + rax * 8), 63)?;
            a.jc(write_loop)?;
        }
        a.mov(rsi, rax)?;
        a.shl(rsi, 12)?;
        a.add(rsi, r14)?; // rsi = page VA
        a.mov(rdx, qword_ptr(r15 + VB_RANGE_LO))?;
        a.add(rdx, rax)?;
        a.mov(rcx, STAMP_MAGIC)?;
        a.or(rdx, rcx)?; // rdx = head
        a.mov(qword_ptr(rsi), rdx)?;
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rcx, qword_ptr(rcx + CTL_EPOCH))?; // rcx = epoch
        a.mov(qword_ptr(rsi + 8), rcx)?;
        a.inc(r11)?;
        a.mov(rdi, r11)?;
        a.or(rdi, r8)?; // rdi = tag
        a.mov(qword_ptr(rsi + 16), rdi)?;
        a.xor(rdx, rcx)?;
        a.xor(rdx, rdi)?;
        a.mov(rcx, CHECKSUM_K)?;
        a.imul_2(rdx, rcx)?;
        a.mov(qword_ptr(rsi + 24), rdx)?;
        a.mov(qword_ptr(rsi + (PAGE_SIZE - 8)), rdi)?;
        a.mov(qword_ptr(r10 + rax * 8), rdi)?; // journal; releases the shared try-lock
        a.mov(qword_ptr(r15 + VB_WRITES), r11)?;
        a.dec(r9)?;
        a.jz(batch_end)?;
        a.jmp(write_loop)?;

        a.set_label(&mut batch_end)?;
        a.mov(r9, batch)?;
        // vCPU 0 is the devices' driver: for each doorbell it reads what the device produced
        // and writes it back as consumed (one or two MMIO exits per device and batch: the
        // read does not exit when it hits a mapped status page).
        let mut doorbells_done = a.create_label();
        let mut doorbell = a.create_label();
        a.test(r8, r8)?;
        a.jnz(doorbells_done)?;
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rdi, qword_ptr(rcx + CTL_DOORBELL_COUNT))?;
        a.lea(rsi, qword_ptr(rcx + CTL_DOORBELLS))?;
        a.set_label(&mut doorbell)?;
        a.test(rdi, rdi)?;
        a.jz(doorbells_done)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.mov(rax, qword_ptr(rdx))?;
        a.mov(rdx, qword_ptr(rsi + 8))?;
        a.mov(qword_ptr(rdx), rax)?;
        a.add(rsi, 16)?;
        a.dec(rdi)?;
        a.jmp(doorbell)?;
        a.set_label(&mut doorbells_done)?;
        if self.workload.rate.is_some() {
            a.mov(dx, PORT_PACE as u32)?;
            a.mov(eax, batch as u32)?;
            a.out(dx, eax)?;
        }
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rax, qword_ptr(rcx + CTL_CMD_SEQ))?;
        a.cmp(rax, qword_ptr(r15 + VB_SEEN_SEQ))?;
        a.je(write_loop)?;
        a.mov(qword_ptr(r15 + VB_SEEN_SEQ), rax)?;
        a.mov(rax, qword_ptr(rcx + CTL_CMD))?;
        a.cmp(rax, CMD_VERIFY as i32)?;
        a.je(verify)?;
        a.jmp(write_loop)?;

        // verify: barrier A, check the slice, report, barrier B.
        a.set_label(&mut verify)?;
        // rbp = the barriers' target for this verify: the counters only grow, by one per vCPU
        // per verify, so generation g is complete at vcpus × g.
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rbp, qword_ptr(rcx + CTL_VERIFY_GEN))?;
        a.imul_3(rbp, rbp, self.vcpus as i32)?;
        self.barrier(&mut a, CTL_BARRIER_A)?;
        let mut check_loop = a.create_label();
        let mut written = a.create_label();
        let mut bad = a.create_label();
        let mut next = a.create_label();
        let mut checked = a.create_label();
        a.mov(rcx, qword_ptr(r15 + VB_SLICE_LO))?; // rcx = page index
        a.mov(rdi, qword_ptr(r15 + VB_SLICE_PAGES))?;
        a.add(rdi, rcx)?; // rdi = end
        a.xor(ebx, ebx)?; // rbx = bad pages
        a.mov(qword_ptr(r15 + VB_VERIFY_PAGES), 0)?;
        a.set_label(&mut check_loop)?;
        a.cmp(rcx, rdi)?;
        a.jae(checked)?;
        a.mov(rsi, rcx)?;
        a.shl(rsi, 12)?;
        a.mov(rax, WS_VA)?;
        a.add(rsi, rax)?;
        a.mov(rax, JOURNAL_GPA)?;
        a.mov(rax, qword_ptr(rax + rcx * 8))?; // rax = journal
        a.test(rax, rax)?;
        a.jnz(written)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.or(rdx, qword_ptr(rsi + 16))?;
        a.or(rdx, qword_ptr(rsi + (PAGE_SIZE - 8)))?;
        a.jnz(bad)?;
        a.jmp(next)?;
        a.set_label(&mut written)?;
        a.cmp(qword_ptr(rsi + 16), rax)?;
        a.jne(bad)?;
        a.cmp(qword_ptr(rsi + (PAGE_SIZE - 8)), rax)?;
        a.jne(bad)?;
        a.mov(rdx, STAMP_MAGIC)?;
        a.or(rdx, rcx)?;
        a.cmp(qword_ptr(rsi), rdx)?;
        a.jne(bad)?;
        a.xor(rdx, qword_ptr(rsi + 8))?;
        a.xor(rdx, rax)?;
        a.mov(rax, CHECKSUM_K)?;
        a.imul_2(rdx, rax)?;
        a.cmp(qword_ptr(rsi + 24), rdx)?;
        a.jne(bad)?;
        a.jmp(next)?;
        a.set_label(&mut bad)?;
        a.inc(rbx)?;
        a.mov(eax, ecx)?;
        a.mov(dx, PORT_BAD_PAGE as u32)?;
        a.out(dx, eax)?;
        a.set_label(&mut next)?;
        a.inc(qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.inc(rcx)?;
        a.jmp(check_loop)?;
        a.set_label(&mut checked)?;
        a.mov(rax, qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.add(qword_ptr(r15 + VB_VERIFY_CHECKED), rax)?;
        a.add(qword_ptr(r15 + VB_VERIFY_BAD), rbx)?;
        self.barrier(&mut a, CTL_BARRIER_B)?;
        // Report only once past the second barrier: when the VMM has every report, no vCPU is
        // still inside this verify, so the next one cannot catch a vCPU half way.
        a.mov(rax, qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.mov(dx, PORT_VERIFY_DONE as u32)?;
        a.out(dx, eax)?;
        a.mov(rbx, qword_ptr(r15 + VB_SEQ_START))?; // sequential writers start their slice again
        a.mov(rbp, qword_ptr(r15 + VB_HOT_PAGES))?;
        a.jmp(write_loop)?;

        a.assemble(CODE_GPA)
    }

    /// All vCPUs increment the counter, then spin (yielding to the VMM) until it reaches the
    /// target in rbp.
    fn barrier(&self, a: &mut CodeAssembler, counter: u64) -> std::result::Result<(), IcedError> {
        let mut spin = a.create_label();
        let mut done = a.create_label();
        a.mov(rcx, CONTROL_GPA)?;
        a.lock().inc(qword_ptr(rcx + counter))?;
        a.set_label(&mut spin)?;
        a.cmp(qword_ptr(rcx + counter), rbp)?;
        a.jae(done)?;
        a.mov(dx, PORT_YIELD as u32)?;
        a.out(dx, eax)?;
        a.pause()?;
        a.jmp(spin)?;
        a.set_label(&mut done)?;
        Ok(())
    }
}

/// The verify counters of one vCPU, as the guest keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuCounters {
    /// Pages written.
    pub writes: u64,
    /// Pages checked by verifies so far.
    pub verify_checked: u64,
    /// Pages that failed verifies so far.
    pub verify_bad: u64,
}

/// Reads vCPU `vcpu`'s counters from its block.
pub fn read_counters(memory: &GuestMemory, vcpu: usize) -> Result<VcpuCounters> {
    let block = vcpu_block_gpa(vcpu);
    Ok(VcpuCounters {
        writes: memory.load_u64(block + VB_WRITES)?,
        verify_checked: memory.load_u64(block + VB_VERIFY_CHECKED)?,
        verify_bad: memory.load_u64(block + VB_VERIFY_BAD)?,
    })
}

/// Sets the epoch the guest stamps into pages from its next write on.
pub fn set_epoch(memory: &GuestMemory, epoch: u64) -> Result<()> {
    memory.store_u64(CONTROL_GPA + CTL_EPOCH, epoch)
}

/// Gives the guest's driver its doorbells: at each batch boundary vCPU 0 reads the `u64` at
/// each pair's first guest-physical address and writes it to the second (for the dma-engine:
/// `PRODUCER` into `CONSUMER`). The addresses must lie in the MMIO window.
pub fn set_doorbells(memory: &GuestMemory, doorbells: &[(u64, u64)]) -> Result<()> {
    if doorbells.len() > MAX_DOORBELLS {
        return Err(KvmError::Invalid(format!(
            "{} doorbells: the guest's driver serves at most {MAX_DOORBELLS}",
            doorbells.len()
        )));
    }
    let window = MMIO_WINDOW_GPA..MMIO_WINDOW_GPA + MMIO_WINDOW_SIZE;
    for &(read, write) in doorbells {
        for addr in [read, write] {
            if !window.contains(&addr) || !window.contains(&(addr + 7)) || addr % 8 != 0 {
                return Err(KvmError::Invalid(format!(
                    "doorbell address {addr:#x}: expected an aligned u64 inside the MMIO window {MMIO_WINDOW_GPA:#x}..{:#x}",
                    window.end
                )));
            }
        }
    }
    // Count last, so the guest never follows a pair not yet written.
    memory.store_u64(CONTROL_GPA + CTL_DOORBELL_COUNT, 0)?;
    for (i, &(read, write)) in doorbells.iter().enumerate() {
        let at = CONTROL_GPA + CTL_DOORBELLS + i as u64 * 16;
        memory.store_u64(at, read)?;
        memory.store_u64(at + 8, write)?;
    }
    memory.store_u64(CONTROL_GPA + CTL_DOORBELL_COUNT, doorbells.len() as u64)
}

/// Posts a verify command; the guest picks it up at its next batch boundary.
pub fn post_verify(memory: &GuestMemory) -> Result<u64> {
    let generation = memory.load_u64(CONTROL_GPA + CTL_VERIFY_GEN)? + 1;
    memory.store_u64(CONTROL_GPA + CTL_VERIFY_GEN, generation)?;
    memory.store_u64(CONTROL_GPA + CTL_CMD, CMD_VERIFY)?;
    let seq = memory.load_u64(CONTROL_GPA + CTL_CMD_SEQ)? + 1;
    memory.store_u64(CONTROL_GPA + CTL_CMD_SEQ, seq)?;
    Ok(seq)
}

fn vcpu_block_gpa(vcpu: usize) -> u64 {
    VCPU_BLOCKS_GPA + vcpu as u64 * VCPU_BLOCK_SIZE
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

/// x86-64 4-level page tables built in host memory, then copied into the guest.
struct PageTables {
    base: u64,
    capacity: u64,
    pages: Vec<[u64; 512]>,
}

const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

impl PageTables {
    fn new(base: u64, capacity: u64) -> Self {
        Self {
            base,
            capacity,
            pages: vec![[0; 512]],
        }
    }

    fn pages(&self) -> impl Iterator<Item = (u64, &[u64; 512])> {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, page)| (self.base + i as u64 * PAGE_SIZE, page))
    }

    /// The table that entry `index` of table `table` points to, created if absent.
    fn child(&mut self, table: usize, index: usize) -> Result<usize> {
        let entry = self.pages[table][index];
        if entry & 1 != 0 {
            return Ok(((entry & !0xfff) - self.base) as usize / PAGE_SIZE as usize);
        }
        if self.pages.len() as u64 >= self.capacity {
            return Err(KvmError::Invalid(
                "guest page tables do not fit their area".into(),
            ));
        }
        self.pages.push([0; 512]);
        let child = self.pages.len() - 1;
        self.pages[table][index] = (self.base + child as u64 * PAGE_SIZE) | PTE_PRESENT_RW;
        Ok(child)
    }

    /// Maps `[va, va + len)` to `[pa, pa + len)` with 2 MiB pages where both are aligned.
    fn map(&mut self, mut va: u64, mut pa: u64, len: u64) -> Result<()> {
        let end = va + len;
        while va < end {
            let pdpt = self.child(0, (va >> 39) as usize & 511)?;
            let pd = self.child(pdpt, (va >> 30) as usize & 511)?;
            let pd_index = (va >> 21) as usize & 511;
            if va.is_multiple_of(HUGE_PAGE) && pa.is_multiple_of(HUGE_PAGE) && end - va >= HUGE_PAGE
            {
                self.pages[pd][pd_index] = pa | PTE_PRESENT_RW | PTE_HUGE;
                va += HUGE_PAGE;
                pa += HUGE_PAGE;
            } else {
                let pt = self.child(pd, pd_index)?;
                self.pages[pt][(va >> 12) as usize & 511] = pa | PTE_PRESENT_RW;
                va += PAGE_SIZE;
                pa += PAGE_SIZE;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_specs_parse_and_bad_ones_say_what_is_expected() {
        let w: Workload = "hotcold,rate=1000,wss=64M,hot=4M,shared,seed=9"
            .parse()
            .unwrap();
        assert_eq!(w.kind, WorkloadKind::HotCold);
        assert_eq!(w.rate, Some(1000));
        assert_eq!(w.wss, Some(64 << 20));
        assert_eq!(w.hot, Some(4 << 20));
        assert!(w.shared);
        assert_eq!(w.seed, 9);
        assert_eq!("random,rate=0".parse::<Workload>().unwrap().rate, None);
        for (spec, expected) in [
            ("zigzag", "expected sequential, random or hotcold"),
            ("random,rate=fast", "expected pages per second"),
            (
                "random,wss=12Q",
                "expected a number with an optional K, M, G or T",
            ),
            ("random,colour=red", "unknown workload option"),
            ("hotcold,hot-percent=100", "from 1 to 99"),
        ] {
            let err = spec.parse::<Workload>().unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64g").unwrap(), 64 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

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

    #[test]
    fn page_tables_use_huge_pages_where_aligned() {
        let layout = GuestLayout::new(64 << 30, &Workload::default()).unwrap();
        let program = GuestProgram::new(&layout, &Workload::default(), 1).unwrap();
        let mut tables = PageTables::new(layout.page_tables_gpa, layout.page_tables_pages);
        tables.map(0, 0, layout.memory.slots[0].size).unwrap();
        let mut va = WS_VA;
        for slot in layout.memory.data_slots() {
            tables.map(va, slot.gpa, slot.size).unwrap();
            va += slot.size;
        }
        assert!(
            tables.pages.len() < 100,
            "{} table pages",
            tables.pages.len()
        );
        assert!(program.assemble().unwrap().len() < 2048);
    }
}
