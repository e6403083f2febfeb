//! PCI config space for a device author, as libvfio-user's `vfu_pci_init` and
//! `vfu_pci_add_capability` give one: describe the function once ([`PciSpec`]: IDs, BARs,
//! INTx, MSI, MSI-X, PCI Express) and the framework serves region 7 and the MSI-X table and
//! PBA in their BAR, and routes the device's interrupts through the function's enables and
//! masks ([`DeviceContext::signal_interrupt`](super::DeviceContext::signal_interrupt)).
//!
//! What it owns ([`PciFunction`], one handle shared by the device and the framework):
//! - the standard type-0 header with per-bit write masks: read-only IDs, the command register,
//!   the status register's write-1-to-clear error bits, the BAR sizing protocol, no expansion
//!   ROM, the interrupt line and pin;
//! - a capability chain from 0x40: PCI Express (version 2, an endpoint; config space is then
//!   4 KiB with an empty extended list), MSI-X, MSI (64-bit, optionally with per-vector masks);
//! - INTx: assertion shown in the status register's Interrupt Status, signalled unless the
//!   command register's Interrupt Disable is set;
//! - the mask / pending rules of MSI and MSI-X: a signal on a masked vector sets its pending
//!   bit, and unmasking a pending vector sends it;
//! - what the host kernel does to the hardware when `SET_IRQS` wires vectors (see
//!   [`PciFunction::vectors_wired`]);
//! - its state as one record ([`PciFunction::save`] / [`PciFunction::load`]), for the
//!   device's migration records.
//!
//! What it leaves to others: the eventfds and `SET_IRQS` masks (`irqs`), the rest of every
//! BAR (the device), and region 7's routing (the server).

#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Refusal;
use super::irqs::Irqs;
use crate::wire::{IRQ_INDEX_INTX, IRQ_INDEX_MSI, IRQ_INDEX_MSIX};

/// Bytes of conventional config space.
pub const CONFIG_SPACE_SIZE: u64 = 256;
/// Bytes of PCI Express config space.
pub const EXPRESS_CONFIG_SPACE_SIZE: u64 = 4096;
/// Bytes of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;

/// Header offsets and bits (PCI Local Bus 3.0, §6.2).
pub mod header {
    /// Vendor ID.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID.
    pub const DEVICE_ID: usize = 0x02;
    /// Command.
    pub const COMMAND: usize = 0x04;
    /// Status.
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Class code (3 bytes: programming interface, subclass, base class).
    pub const CLASS: usize = 0x09;
    /// Cache line size.
    pub const CACHE_LINE: usize = 0x0c;
    /// BAR 0 (BAR n at `BAR0 + 4 * n`).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM base address.
    pub const ROM: usize = 0x30;
    /// Capabilities pointer.
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin.
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Command: I/O space enable.
    pub const COMMAND_IO: u16 = 1 << 0;
    /// Command: memory space enable.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command: bus master enable.
    pub const COMMAND_MASTER: u16 = 1 << 2;
    /// Command: parity error response.
    pub const COMMAND_PARITY: u16 = 1 << 6;
    /// Command: SERR# enable.
    pub const COMMAND_SERR: u16 = 1 << 8;
    /// Command: interrupt disable.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Status: interrupt status.
    pub const STATUS_INTERRUPT: u16 = 1 << 3;
    /// Status: capabilities list.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Status: the error bits, write-1-to-clear (master data parity error, signaled and
    /// received target abort, received master abort, signaled system error, detected parity
    /// error).
    pub const STATUS_ERRORS: u16 = 1 << 8 | 0xf8 << 8;
}

/// Capability IDs and layouts.
pub mod cap {
    /// MSI.
    pub const ID_MSI: u8 = 0x05;
    /// PCI Express.
    pub const ID_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const ID_MSIX: u8 = 0x11;
    /// MSI message control: enable.
    pub const MSI_ENABLE: u16 = 1 << 0;
    /// MSI message control: 64-bit address capable.
    pub const MSI_64BIT: u16 = 1 << 7;
    /// MSI message control: per-vector masking capable.
    pub const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
    /// MSI-X message control: function mask.
    pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
    /// MSI-X message control: enable.
    pub const MSIX_ENABLE: u16 = 1 << 15;
    /// MSI-X vector control: mask.
    pub const MSIX_ENTRY_MASKED: u32 = 1;
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Memory32,
    /// 64-bit memory: takes this BAR and the next.
    Memory64 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// I/O space.
    Io,
}

/// One BAR: its size (a power of two: at least 16 bytes of memory, 4 to 256 of I/O) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Bytes decoded.
    pub size: u64,
    /// Memory or I/O.
    pub kind: BarKind,
}

/// An MSI capability (always 64-bit capable, as QEMU and Linux expect of a new device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiSpec {
    /// Vectors: 1, 2, 4, 8, 16 or 32.
    pub vectors: u32,
    /// Per-vector mask and pending bits.
    pub per_vector_mask: bool,
}

/// An MSI-X capability with its table and PBA in BARs of the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixSpec {
    /// Vectors (table entries): 1 to 2048.
    pub vectors: u16,
    /// BAR of the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR of the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (8-byte aligned).
    pub pba_offset: u32,
}

/// The function, as the device author describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciSpec {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface (0xBBSSPP).
    pub class: u32,
    /// BARs by index (the slot after a 64-bit BAR stays `None`).
    pub bars: [Option<Bar>; 6],
    /// INTx (pin INTA#).
    pub intx: bool,
    /// MSI.
    pub msi: Option<MsiSpec>,
    /// MSI-X.
    pub msix: Option<MsixSpec>,
    /// A PCI Express endpoint (4 KiB of config space).
    pub express: bool,
}

/// What is wrong with a [`PciSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PCI function: {0}")]
pub struct PciSpecError(String);

/// How the function signals now, as the driver enabled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptMode {
    /// MSI-X enabled.
    Msix,
    /// MSI enabled.
    Msi,
    /// INTx (neither MSI nor MSI-X enabled, INTx present).
    Intx,
    /// Nothing to signal with.
    None,
}

/// Where each capability sits in config space.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    express: Option<usize>,
    msix: Option<usize>,
    msi: Option<usize>,
}

const EXPRESS_CAP_SIZE: usize = 0x3c;
const MSIX_CAP_SIZE: usize = 12;
const STATE_MAGIC: &[u8; 8] = b"VMIGPCI1";

struct State {
    spec: PciSpec,
    layout: Layout,
    config: Vec<u8>,
    /// The bits a write changes.
    writable: Vec<u8>,
    /// The bits a write of 1 clears.
    write_one_clears: Vec<u8>,
    /// Read-only bits the function itself changes (INTx status, MSI pending): state, not
    /// layout.
    live: Vec<u8>,
    /// The config space after reset.
    reset_config: Vec<u8>,
    /// MSI-X table entries: address low, address high, data, vector control.
    msix_table: Vec<[u32; 4]>,
    /// MSI-X pending bits.
    msix_pending: Vec<u64>,
    intx_asserted: bool,
}

/// A PCI function's config space and interrupt state: cheap to clone, every clone the same
/// function. The device keeps one (to signal, read its enables, and save and load it) and
/// hands a clone to the framework in [`DeviceSpec::config_space`](super::DeviceSpec).
#[derive(Clone)]
pub struct PciFunction {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("PciFunction")
            .field("spec", &s.spec)
            .finish_non_exhaustive()
    }
}

fn spec_error(message: impl Into<String>) -> PciSpecError {
    PciSpecError(message.into())
}

/// Checks the BARs; returns each BAR's write mask and read-only type bits, by dword.
fn bar_registers(bars: &[Option<Bar>; 6]) -> Result<[(u32, u32); 6], PciSpecError> {
    let mut registers = [(0u32, 0u32); 6];
    let mut index = 0;
    while index < 6 {
        let Some(bar) = bars[index] else {
            index += 1;
            continue;
        };
        let size = bar.size;
        if !size.is_power_of_two() {
            return Err(spec_error(format!(
                "BAR{index}: size {size:#x} is not a power of two"
            )));
        }
        let address_mask = !(size - 1);
        match bar.kind {
            BarKind::Io => {
                if !(4..=256).contains(&size) {
                    return Err(spec_error(format!(
                        "BAR{index}: an I/O BAR decodes 4 to 256 bytes, not {size}"
                    )));
                }
                registers[index] = (low32(address_mask) & !0x3, 0x1);
            }
            BarKind::Memory32 => {
                if !(16..=1 << 31).contains(&size) {
                    return Err(spec_error(format!(
                        "BAR{index}: a 32-bit memory BAR decodes 16 bytes to 2 GiB, not {size:#x}"
                    )));
                }
                registers[index] = (low32(address_mask) & !0xf, 0x0);
            }
            BarKind::Memory64 { prefetchable } => {
                if size < 16 {
                    return Err(spec_error(format!(
                        "BAR{index}: a memory BAR decodes at least 16 bytes, not {size}"
                    )));
                }
                if index == 5 || bars[index + 1].is_some() {
                    return Err(spec_error(format!(
                        "BAR{index}: a 64-bit BAR takes the next BAR's slot, which must be free"
                    )));
                }
                let kind = 0x4 | if prefetchable { 0x8 } else { 0 };
                registers[index] = (low32(address_mask) & !0xf, kind);
                registers[index + 1] = (high32(address_mask), 0);
                index += 1;
            }
        }
        index += 1;
    }
    Ok(registers)
}

fn low32(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX)
}

fn high32(value: u64) -> u32 {
    u32::try_from(value >> 32).unwrap_or(u32::MAX)
}

/// Checks the MSI-X table and PBA fit their memory BARs and do not overlap.
fn check_msix(spec: &PciSpec, msix: &MsixSpec) -> Result<(), PciSpecError> {
    if !(1..=2048).contains(&msix.vectors) {
        return Err(spec_error(format!(
            "MSI-X: 1 to 2048 vectors, not {}",
            msix.vectors
        )));
    }
    let table = (msix.table_bar, msix.table_offset, msix_table_size(msix));
    let pba = (msix.pba_bar, msix.pba_offset, msix_pba_size(msix));
    for (what, (bar, offset, size)) in [("table", table), ("PBA", pba)] {
        let Some(Bar {
            size: bar_size,
            kind,
        }) = spec.bars.get(usize::from(bar)).copied().flatten()
        else {
            return Err(spec_error(format!("MSI-X {what}: BAR{bar} does not exist")));
        };
        if kind == BarKind::Io {
            return Err(spec_error(format!(
                "MSI-X {what}: BAR{bar} is an I/O BAR, the {what} must be in memory space"
            )));
        }
        if offset % 8 != 0 || u64::from(offset) + size > bar_size {
            return Err(spec_error(format!(
                "MSI-X {what}: {size} bytes at {offset:#x} must be 8-byte aligned inside BAR{bar}'s {bar_size:#x}"
            )));
        }
    }
    let overlap = msix.table_bar == msix.pba_bar
        && u64::from(msix.table_offset) < u64::from(msix.pba_offset) + pba.2
        && u64::from(msix.pba_offset) < u64::from(msix.table_offset) + table.2;
    if overlap {
        return Err(spec_error("MSI-X: the table and the PBA overlap"));
    }
    Ok(())
}

fn msix_table_size(msix: &MsixSpec) -> u64 {
    u64::from(msix.vectors) * MSIX_ENTRY_SIZE
}

fn msix_pba_size(msix: &MsixSpec) -> u64 {
    u64::from(msix.vectors).div_ceil(64) * 8
}

/// Builds the reset config space and its masks.
struct Builder {
    config: Vec<u8>,
    writable: Vec<u8>,
    write_one_clears: Vec<u8>,
    live: Vec<u8>,
}

impl Builder {
    fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
        bytes[at..at + value.len()].copy_from_slice(value);
    }

    fn u8(&mut self, at: usize, value: u8, writable: u8) {
        self.config[at] = value;
        self.writable[at] = writable;
    }

    fn u16(&mut self, at: usize, value: u16, writable: u16) {
        Self::put(&mut self.config, at, &value.to_le_bytes());
        Self::put(&mut self.writable, at, &writable.to_le_bytes());
    }

    fn u32(&mut self, at: usize, value: u32, writable: u32) {
        Self::put(&mut self.config, at, &value.to_le_bytes());
        Self::put(&mut self.writable, at, &writable.to_le_bytes());
    }

    fn w1c16(&mut self, at: usize, bits: u16) {
        Self::put(&mut self.write_one_clears, at, &bits.to_le_bytes());
    }

    fn live(&mut self, at: usize, bytes: &[u8]) {
        Self::put(&mut self.live, at, bytes);
    }
}

/// Offsets of the MSI capability's registers after message control.
struct MsiRegisters {
    mask: usize,
    pending: usize,
}

fn msi_registers(at: usize) -> MsiRegisters {
    MsiRegisters {
        mask: at + 0x10,
        pending: at + 0x14,
    }
}

impl PciFunction {
    /// The function described by `spec`, in its reset state.
    pub fn new(spec: PciSpec) -> Result<Self, PciSpecError> {
        let bars = bar_registers(&spec.bars)?;
        if spec.class > 0x00ff_ffff {
            return Err(spec_error(format!(
                "class {:#x}: a class code has 24 bits",
                spec.class
            )));
        }
        if let Some(msi) = spec.msi
            && (!msi.vectors.is_power_of_two() || msi.vectors > 32)
        {
            return Err(spec_error(format!(
                "MSI: 1, 2, 4, 8, 16 or 32 vectors, not {}",
                msi.vectors
            )));
        }
        if let Some(msix) = &spec.msix {
            check_msix(&spec, msix)?;
        }
        let size = if spec.express {
            EXPRESS_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        let size = usize::try_from(size).unwrap_or(4096);
        let mut b = Builder {
            config: vec![0; size],
            writable: vec![0; size],
            write_one_clears: vec![0; size],
            live: vec![0; size],
        };
        use header::*;
        b.u16(VENDOR_ID, spec.vendor_id, 0);
        b.u16(DEVICE_ID, spec.device_id, 0);
        let has_io = spec
            .bars
            .iter()
            .any(|bar| bar.is_some_and(|b| b.kind == BarKind::Io));
        let command_writable = COMMAND_MEMORY
            | COMMAND_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | if has_io { COMMAND_IO } else { 0 }
            | if spec.intx { COMMAND_INTX_DISABLE } else { 0 };
        b.u16(COMMAND, 0, command_writable);
        b.w1c16(STATUS, STATUS_ERRORS);
        b.live(STATUS, &STATUS_INTERRUPT.to_le_bytes());
        b.u8(REVISION, spec.revision, 0);
        Builder::put(&mut b.config, CLASS, &spec.class.to_le_bytes()[..3]);
        b.u8(CACHE_LINE, 0, 0xff);
        for (n, (writable, kind)) in bars.iter().enumerate() {
            b.u32(BAR0 + 4 * n, *kind, *writable);
        }
        b.u16(SUBSYSTEM_VENDOR_ID, spec.subsystem_vendor_id, 0);
        b.u16(SUBSYSTEM_ID, spec.subsystem_id, 0);
        // No expansion ROM: the register is read-only zero, so the size probe reads 0.
        b.u32(ROM, 0, 0);
        b.u8(INTERRUPT_LINE, 0, 0xff);
        b.u8(INTERRUPT_PIN, u8::from(spec.intx), 0);

        let mut layout = Layout::default();
        let mut chain: Vec<(usize, u8)> = Vec::new();
        let mut next = 0x40;
        if spec.express {
            layout.express = Some(next);
            chain.push((next, cap::ID_EXPRESS));
            next += EXPRESS_CAP_SIZE.next_multiple_of(0x10);
        }
        if spec.msix.is_some() {
            layout.msix = Some(next);
            chain.push((next, cap::ID_MSIX));
            next += MSIX_CAP_SIZE.next_multiple_of(0x10);
        }
        if spec.msi.is_some() {
            layout.msi = Some(next);
            chain.push((next, cap::ID_MSI));
        }
        if let Some(&(first, _)) = chain.first() {
            b.u8(CAPABILITIES, u8::try_from(first).unwrap_or(0), 0);
            b.u16(STATUS, STATUS_CAP_LIST, 0);
        }
        for (i, &(at, id)) in chain.iter().enumerate() {
            let next = chain.get(i + 1).map_or(0, |&(n, _)| n);
            b.u8(at, id, 0);
            b.u8(at + 1, u8::try_from(next).unwrap_or(0), 0);
        }
        if let Some(at) = layout.express {
            express_capability(&mut b, at);
        }
        if let (Some(at), Some(msix)) = (layout.msix, &spec.msix) {
            b.u16(
                at + 2,
                msix.vectors - 1,
                cap::MSIX_ENABLE | cap::MSIX_FUNCTION_MASK,
            );
            b.u32(at + 4, msix.table_offset | u32::from(msix.table_bar), 0);
            b.u32(at + 8, msix.pba_offset | u32::from(msix.pba_bar), 0);
        }
        if let (Some(at), Some(msi)) = (layout.msi, &spec.msi) {
            let capable = u16::try_from(msi.vectors.trailing_zeros()).unwrap_or(0) << 1;
            let mask = if msi.per_vector_mask {
                cap::MSI_PER_VECTOR_MASK
            } else {
                0
            };
            b.u16(
                at + 2,
                capable | cap::MSI_64BIT | mask,
                cap::MSI_ENABLE | 0x7 << 4,
            );
            b.u32(at + 4, 0, !0x3);
            b.u32(at + 8, 0, u32::MAX);
            b.u16(at + 0xc, 0, u16::MAX);
            if msi.per_vector_mask {
                let vectors = vector_bits(msi.vectors);
                let regs = msi_registers(at);
                b.u32(regs.mask, 0, vectors);
                b.u32(regs.pending, 0, 0);
                b.live(regs.pending, &vectors.to_le_bytes());
            }
        }
        let entries = spec.msix.map_or(0, |m| usize::from(m.vectors));
        let state = State {
            spec,
            layout,
            reset_config: b.config.clone(),
            config: b.config,
            writable: b.writable,
            write_one_clears: b.write_one_clears,
            live: b.live,
            msix_table: vec![[0, 0, 0, cap::MSIX_ENTRY_MASKED]; entries],
            msix_pending: vec![0; entries.div_ceil(64)],
            intx_asserted: false,
        };
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The function's description.
    pub fn spec(&self) -> PciSpec {
        self.lock().spec
    }

    /// Bytes of config space (region 7's size).
    pub fn config_size(&self) -> u64 {
        self.lock().config.len() as u64
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.lock().u16_at(header::COMMAND)
    }

    /// The address the driver programmed into BAR `index` (a 64-bit BAR's both halves), or
    /// `None` if the BAR does not exist.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let s = self.lock();
        let bar = s.spec.bars.get(index).copied().flatten()?;
        let low = s.u32_at(header::BAR0 + 4 * index);
        Some(match bar.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 => u64::from(low & !0xf),
            BarKind::Memory64 { .. } => {
                u64::from(low & !0xf) | u64::from(s.u32_at(header::BAR0 + 4 * index + 4)) << 32
            }
        })
    }

    /// How the function signals now.
    pub fn interrupt_mode(&self) -> InterruptMode {
        self.lock().mode()
    }

    /// Config space as the function's reset left it: command 0, BARs unassigned, MSI and
    /// MSI-X disabled, every MSI-X vector masked, nothing pending, INTx deasserted.
    pub fn reset(&self) {
        let mut s = self.lock();
        let State {
            config,
            reset_config,
            ..
        } = &mut *s;
        config.clone_from(reset_config);
        s.msix_table
            .iter_mut()
            .for_each(|e| *e = [0, 0, 0, cap::MSIX_ENTRY_MASKED]);
        s.msix_pending.iter_mut().for_each(|p| *p = 0);
        s.intx_asserted = false;
    }

    /// Reads config space at `offset` (the caller checked it lies inside).
    pub(super) fn config_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        if let Some(range) = s.config_range(offset, data.len()) {
            data.copy_from_slice(&s.config[range]);
        }
    }

    /// Writes config space at `offset` through the write masks, and then sends what an
    /// enable or unmask released.
    pub(super) fn config_write(&self, offset: u64, data: &[u8], irqs: &Irqs) {
        let mut s = self.lock();
        let Some(range) = s.config_range(offset, data.len()) else {
            return;
        };
        let intx_was_disabled = s.intx_disabled();
        for (at, &byte) in range.zip(data) {
            let writable = s.writable[at];
            let cleared = s.write_one_clears[at] & byte;
            s.config[at] = (s.config[at] & !writable & !cleared) | (byte & writable);
        }
        if intx_was_disabled && !s.intx_disabled() && s.intx_asserted {
            irqs.trigger(IRQ_INDEX_INTX, 0);
        }
        s.send_released(irqs);
    }

    /// The part of region `bar` the framework serves at `offset` for `len` bytes: the MSI-X
    /// table or PBA, if the access lies inside one (an access that straddles one is refused).
    pub(super) fn claims(&self, bar: u32, offset: u64, len: usize) -> Result<bool, Refusal> {
        let s = self.lock();
        let end = offset.saturating_add(len as u64);
        for (what, area) in [("table", s.msix_table_area()), ("PBA", s.msix_pba_area())] {
            let (area_bar, range) = area.unwrap_or((u8::MAX, 0..0));
            if u32::from(area_bar) != bar || end <= range.start || offset >= range.end {
                continue;
            }
            if offset < range.start || end > range.end {
                return Err(Refusal::invalid(format!(
                    "BAR{bar} {offset:#x}+{len}: straddles the MSI-X {what} at {:#x}..{:#x}",
                    range.start, range.end
                )));
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads the MSI-X table or PBA (an access [`PciFunction::claims`] accepted).
    pub(super) fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = s.msix_byte(bar, offset + i as u64).unwrap_or(0);
        }
    }

    /// Writes the MSI-X table (the PBA is read-only) and sends what an unmask released.
    pub(super) fn bar_write(&self, bar: u32, offset: u64, data: &[u8], irqs: &Irqs) {
        let mut s = self.lock();
        if let Some((table_bar, table)) = s.msix_table_area()
            && u32::from(table_bar) == bar
        {
            for (i, &byte) in data.iter().enumerate() {
                let at = offset + i as u64;
                if !table.contains(&at) {
                    continue;
                }
                let within = at - table.start;
                let (entry, word, shift) = entry_word(within);
                let Some(value) = s.msix_table.get_mut(entry).map(|e| &mut e[word]) else {
                    continue;
                };
                let mut bytes = value.to_le_bytes();
                bytes[shift] = byte;
                // Vector control: only the mask bit is defined; the rest is reserved.
                let writable = if word == 3 {
                    cap::MSIX_ENTRY_MASKED
                } else {
                    u32::MAX
                };
                *value = (*value & !writable) | (u32::from_le_bytes(bytes) & writable);
            }
        }
        s.send_released(irqs);
    }

    /// Signals vector `vector` of IRQ index `index` through the function's rules: MSI-X and
    /// MSI only while enabled, a masked vector's signal held as pending; INTx asserted.
    /// Returns whether an eventfd was signalled.
    pub(super) fn signal(&self, index: u32, vector: u32, irqs: &Irqs) -> bool {
        let mut s = self.lock();
        match index {
            IRQ_INDEX_MSIX => s.signal_msix(vector, irqs),
            IRQ_INDEX_MSI => s.signal_msi(vector, irqs),
            IRQ_INDEX_INTX if vector == 0 && s.spec.intx => {
                s.intx_asserted = true;
                let status = s.u16_at(header::STATUS) | header::STATUS_INTERRUPT;
                s.set_u16(header::STATUS, status);
                !s.intx_disabled() && irqs.trigger(IRQ_INDEX_INTX, 0)
            }
            _ => irqs.trigger(index, vector),
        }
    }

    /// Signals `vector` in the mode the driver enabled: MSI-X, else MSI, else INTx.
    pub(super) fn signal_interrupt(&self, vector: u32, irqs: &Irqs) -> bool {
        let index = match self.interrupt_mode() {
            InterruptMode::Msix => IRQ_INDEX_MSIX,
            InterruptMode::Msi => IRQ_INDEX_MSI,
            InterruptMode::Intx => IRQ_INDEX_INTX,
            InterruptMode::None => return false,
        };
        self.signal(
            index,
            if index == IRQ_INDEX_INTX { 0 } else { vector },
            irqs,
        )
    }

    /// Deasserts INTx: Interrupt Status clears, and a signal held by a `SET_IRQS` mask is
    /// withdrawn.
    pub(super) fn deassert_intx(&self, irqs: &Irqs) {
        let mut s = self.lock();
        s.intx_asserted = false;
        let status = s.u16_at(header::STATUS) & !header::STATUS_INTERRUPT;
        s.set_u16(header::STATUS, status);
        irqs.withdraw(IRQ_INDEX_INTX, 0);
    }

    /// What the host kernel does to the hardware when `SET_IRQS` wires (`wired`) or unwires
    /// vectors `range` of MSI or MSI-X: wiring enables the capability and unmasks those
    /// vectors (and sends what they held pending); unwiring masks them. A client that emulates
    /// the table itself (QEMU does) never writes the function's own table, so without this its
    /// vectors would stay masked from reset.
    pub(super) fn vectors_wired(&self, index: u32, range: Range<u32>, wired: bool, irqs: &Irqs) {
        let mut s = self.lock();
        match (index, s.layout.msix, s.layout.msi) {
            (IRQ_INDEX_MSIX, Some(at), _) => {
                if wired {
                    let control = s.u16_at(at + 2) | cap::MSIX_ENABLE;
                    s.set_u16(at + 2, control);
                }
                for v in range {
                    if let Some(entry) = s.msix_table.get_mut(v as usize) {
                        entry[3] = if wired { 0 } else { cap::MSIX_ENTRY_MASKED };
                    }
                }
            }
            (IRQ_INDEX_MSI, _, Some(at)) => {
                let vectors = s.spec.msi.map_or(1, |m| m.vectors);
                let per_vector_mask = s.spec.msi.is_some_and(|m| m.per_vector_mask);
                if wired {
                    let needed = range.end.clamp(1, vectors).next_power_of_two();
                    let enabled = u16::try_from(needed.trailing_zeros()).unwrap_or(0) << 4;
                    let control = (s.u16_at(at + 2) & !(0x7 << 4)) | enabled | cap::MSI_ENABLE;
                    s.set_u16(at + 2, control);
                }
                if per_vector_mask {
                    let regs = msi_registers(at);
                    let bits = range.fold(0u32, |m, v| m | 1u32.checked_shl(v).unwrap_or(0));
                    let mask = s.u32_at(regs.mask);
                    s.set_u32(regs.mask, if wired { mask & !bits } else { mask | bits });
                }
            }
            _ => return,
        }
        s.send_released(irqs);
    }

    /// `SET_IRQS` disabled every vector of `index`: MSI or MSI-X is disabled (the host
    /// kernel frees the vectors) and MSI-X's table masked.
    pub(super) fn index_disabled(&self, index: u32) {
        let mut s = self.lock();
        match (index, s.layout.msix, s.layout.msi) {
            (IRQ_INDEX_MSIX, Some(at), _) => {
                let control = s.u16_at(at + 2) & !cap::MSIX_ENABLE;
                s.set_u16(at + 2, control);
                s.msix_table
                    .iter_mut()
                    .for_each(|e| e[3] |= cap::MSIX_ENTRY_MASKED);
            }
            (IRQ_INDEX_MSI, _, Some(at)) => {
                let control = s.u16_at(at + 2) & !cap::MSI_ENABLE;
                s.set_u16(at + 2, control);
            }
            _ => {}
        }
    }

    /// The function's state as one record: config space, the MSI-X table and PBA, INTx.
    pub fn save(&self) -> Vec<u8> {
        let s = self.lock();
        let mut out = STATE_MAGIC.to_vec();
        out.extend_from_slice(&(s.config.len() as u64).to_le_bytes());
        out.extend_from_slice(&(s.msix_table.len() as u64).to_le_bytes());
        out.extend_from_slice(&s.config);
        for entry in &s.msix_table {
            for word in entry {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        for word in &s.msix_pending {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.push(u8::from(s.intx_asserted));
        out
    }

    /// Bytes of the record [`PciFunction::save`] makes.
    pub fn saved_len(&self) -> usize {
        self.lock().record_len()
    }

    /// Loads a record [`PciFunction::save`] made on a function of the same layout. A record
    /// of another size, or whose read-only bytes (IDs, BAR kinds, capabilities) differ from
    /// this function's, is refused and nothing changes. No signal is sent: what was pending
    /// stays pending.
    pub fn load(&self, record: &[u8]) -> Result<(), Refusal> {
        let mut s = self.lock();
        let expected = s.record_len();
        if record.len() != expected || !record.starts_with(STATE_MAGIC) {
            return Err(Refusal::invalid(format!(
                "a PCI function record of this layout is {expected} bytes starting \"VMIGPCI1\" \
                 ({} bytes of config space, {} MSI-X vectors); got {} bytes",
                s.config.len(),
                s.msix_table.len(),
                record.len()
            )));
        }
        let mut at = STATE_MAGIC.len() + 16;
        let config = &record[at..at + s.config.len()];
        at += s.config.len();
        let differs = (0..config.len()).find(|&i| {
            let fixed = !s.writable[i] & !s.write_one_clears[i] & !s.live[i];
            config[i] & fixed != s.config[i] & fixed
        });
        if let Some(i) = differs {
            return Err(Refusal::invalid(format!(
                "the saved PCI function differs from this one at config offset {i:#x} \
                 (saved {:#04x}, here {:#04x}): not the same device layout",
                config[i], s.config[i]
            )));
        }
        let config = config.to_vec();
        let words = |bytes: &[u8]| -> Vec<u32> {
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let table_bytes = s.msix_table.len() * 16;
        let table: Vec<[u32; 4]> = words(&record[at..at + table_bytes])
            .chunks_exact(4)
            .map(|w| [w[0], w[1], w[2], w[3] & cap::MSIX_ENTRY_MASKED])
            .collect();
        at += table_bytes;
        let pending: Vec<u64> = record[at..at + s.msix_pending.len() * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        at += s.msix_pending.len() * 8;
        let intx_asserted = record[at] != 0;
        s.config = config;
        s.msix_table = table;
        s.msix_pending = pending;
        s.intx_asserted = intx_asserted;
        Ok(())
    }
}

/// The entry, word and byte of the MSI-X table byte `within` bytes into the table.
fn entry_word(within: u64) -> (usize, usize, usize) {
    let entry = usize::try_from(within / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
    let byte = usize::try_from(within % MSIX_ENTRY_SIZE).unwrap_or(0);
    (entry, byte / 4, byte % 4)
}

/// The mask of bits 0..vectors.
fn vector_bits(vectors: u32) -> u32 {
    1u32.checked_shl(vectors).map_or(u32::MAX, |b| b - 1)
}

impl State {
    fn record_len(&self) -> usize {
        STATE_MAGIC.len()
            + 16
            + self.config.len()
            + self.msix_table.len() * 16
            + self.msix_pending.len() * 8
            + 1
    }

    fn config_range(&self, offset: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.config.len()).then_some(start..end)
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.config[at], self.config[at + 1]])
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.config[at],
            self.config[at + 1],
            self.config[at + 2],
            self.config[at + 3],
        ])
    }

    fn set_u16(&mut self, at: usize, value: u16) {
        self.config[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, value: u32) {
        self.config[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn intx_disabled(&self) -> bool {
        self.u16_at(header::COMMAND) & header::COMMAND_INTX_DISABLE != 0
    }

    fn msix_control(&self) -> u16 {
        self.layout.msix.map_or(0, |at| self.u16_at(at + 2))
    }

    fn msi_control(&self) -> u16 {
        self.layout.msi.map_or(0, |at| self.u16_at(at + 2))
    }

    fn mode(&self) -> InterruptMode {
        if self.msix_control() & cap::MSIX_ENABLE != 0 {
            InterruptMode::Msix
        } else if self.msi_control() & cap::MSI_ENABLE != 0 {
            InterruptMode::Msi
        } else if self.spec.intx {
            InterruptMode::Intx
        } else {
            InterruptMode::None
        }
    }

    fn msix_table_area(&self) -> Option<(u8, Range<u64>)> {
        let m = self.spec.msix?;
        let start = u64::from(m.table_offset);
        Some((m.table_bar, start..start + msix_table_size(&m)))
    }

    fn msix_pba_area(&self) -> Option<(u8, Range<u64>)> {
        let m = self.spec.msix?;
        let start = u64::from(m.pba_offset);
        Some((m.pba_bar, start..start + msix_pba_size(&m)))
    }

    fn msix_byte(&self, bar: u32, at: u64) -> Option<u8> {
        if let Some((b, table)) = self.msix_table_area()
            && u32::from(b) == bar
            && table.contains(&at)
        {
            let (entry, word, shift) = entry_word(at - table.start);
            return Some(self.msix_table.get(entry)?[word].to_le_bytes()[shift]);
        }
        let (b, pba) = self.msix_pba_area()?;
        if u32::from(b) != bar || !pba.contains(&at) {
            return None;
        }
        let within = usize::try_from(at - pba.start).ok()?;
        Some(self.msix_pending.get(within / 8)?.to_le_bytes()[within % 8])
    }

    fn msix_masked(&self, vector: usize) -> bool {
        self.msix_control() & cap::MSIX_FUNCTION_MASK != 0
            || self
                .msix_table
                .get(vector)
                .is_none_or(|e| e[3] & cap::MSIX_ENTRY_MASKED != 0)
    }

    /// PCI Local Bus 3.0, §6.8.2.9: while a vector is masked the function sets its pending
    /// bit instead of sending the message.
    fn signal_msix(&mut self, vector: u32, irqs: &Irqs) -> bool {
        let v = vector as usize;
        if self.msix_control() & cap::MSIX_ENABLE == 0 || v >= self.msix_table.len() {
            return false;
        }
        if self.msix_masked(v) {
            self.msix_pending[v / 64] |= 1 << (v % 64);
            return false;
        }
        irqs.trigger(IRQ_INDEX_MSIX, vector)
    }

    fn msi_enabled_vectors(&self) -> u32 {
        let control = self.msi_control();
        let capable = 1u32 << ((control >> 1) & 0x7);
        let enabled = 1u32 << ((control >> 4) & 0x7);
        enabled.min(capable)
    }

    fn signal_msi(&mut self, vector: u32, irqs: &Irqs) -> bool {
        let Some(at) = self.layout.msi else {
            return false;
        };
        if self.msi_control() & cap::MSI_ENABLE == 0 || vector >= self.msi_enabled_vectors() {
            return false;
        }
        if self.spec.msi.is_some_and(|m| m.per_vector_mask) {
            let regs = msi_registers(at);
            let bit = 1u32 << vector;
            if self.u32_at(regs.mask) & bit != 0 {
                let pending = self.u32_at(regs.pending) | bit;
                self.set_u32(regs.pending, pending);
                return false;
            }
        }
        irqs.trigger(IRQ_INDEX_MSI, vector)
    }

    /// Sends every pending vector that is now enabled and unmasked, and clears its pending
    /// bit (§6.8.2.9: "When software unmasks a vector whose associated Pending bit is set,
    /// the function must schedule sending the associated message").
    fn send_released(&mut self, irqs: &Irqs) {
        if self.msix_control() & cap::MSIX_ENABLE != 0 {
            for v in 0..self.msix_table.len() {
                let bit = 1u64 << (v % 64);
                if self.msix_pending[v / 64] & bit != 0 && !self.msix_masked(v) {
                    self.msix_pending[v / 64] &= !bit;
                    irqs.trigger(IRQ_INDEX_MSIX, u32::try_from(v).unwrap_or(u32::MAX));
                }
            }
        }
        if let Some(at) = self.layout.msi
            && self.msi_control() & cap::MSI_ENABLE != 0
        {
            let regs = msi_registers(at);
            let mut pending = self.u32_at(regs.pending);
            let released =
                pending & !self.u32_at(regs.mask) & vector_bits(self.msi_enabled_vectors());
            for v in (0..32).filter(|v| released & 1 << v != 0) {
                pending &= !(1 << v);
                irqs.trigger(IRQ_INDEX_MSI, v);
            }
            self.set_u32(regs.pending, pending);
        }
    }
}

/// A PCI Express capability, version 2, of an endpoint with a x1 2.5 GT/s link.
fn express_capability(b: &mut Builder, at: usize) {
    // Capabilities: version 2, device/port type 0 (PCI Express endpoint).
    b.u16(at + 2, 0x0002, 0);
    // Device capabilities: 128-byte max payload, role-based error reporting.
    b.u32(at + 4, 1 << 15, 0);
    // Device control: the defaults (relaxed ordering, no snoop, 512-byte max read request);
    // bit 15 (initiate FLR) is reserved without FLR capability.
    b.u16(at + 8, 0x2810, 0x7fff);
    // Device status: the error-detected bits are write-1-to-clear.
    b.w1c16(at + 0xa, 0x000f);
    // Link capabilities: 2.5 GT/s, x1.
    b.u32(at + 0xc, 0x0000_0011, 0);
    // Link control: ASPM control, common clock, extended synch.
    b.u16(at + 0x10, 0, 0x00c3);
    // Link status: 2.5 GT/s, x1.
    b.u16(at + 0x12, 0x0011, 0);
    // Link capabilities 2: supported speeds 2.5 GT/s.
    b.u32(at + 0x2c, 0x0000_0002, 0);
    // Link control 2: target link speed 2.5 GT/s.
    b.u16(at + 0x30, 0x0001, 0);
}
