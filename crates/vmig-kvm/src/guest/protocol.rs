//! What the guest and the VMM say to each other: the control page (host → guest: command
//! sequence, command, epoch, the verify barriers, the driver's doorbells, the port script),
//! each vCPU's block (its parameters, set before boot, and its counters, kept by the guest) and
//! the I/O ports the guest reports through.
//!
//! The port script is a short list of byte-wide port accesses ([`PortOp`]) that vCPU 0 runs
//! with real `out dx, al` / `in al, dx` instructions at its next batch boundary, after the
//! doorbells: the VMM writes the operations and their count, then bumps `CTL_SCRIPT_SEQ`; vCPU 0,
//! seeing it differ from `CTL_SCRIPT_DONE`, runs them in order, stores each byte an `in` read
//! into its operation's word, and then copies the sequence into `CTL_SCRIPT_DONE`. It has a
//! sequence of its own rather than a `CTL_CMD`: a command is taken by every vCPU, and two
//! commands posted back to back through one word could be read half old, half new by a vCPU
//! that looked in between; the verify's protocol stays as it was.
//!
//! ```text
//!  VMM                                    vCPU 0 (at a batch boundary)
//!  ops[i] = port | kind << 16 | value << 24
//!  count = n, SEQ = s + 1 ──────────────► SEQ != DONE: for each op: out / in (exits to the
//!                                         VMM's port handler), in: byte 4 of ops[i] = al
//!  DONE == s + 1? read byte 4 of ops ◄─── DONE = SEQ
//! ```

use super::layout::{
    CONTROL_GPA, IO_WINDOW_PORT, IO_WINDOW_PORTS, MMIO_WINDOW_GPA, MMIO_WINDOW_SIZE,
    VCPU_BLOCK_SIZE, VCPU_BLOCKS_GPA,
};
use vmig_primitives::GuestAddress;

use crate::error::{KvmError, Result};
use crate::memory::GuestMemory;

// Control page words.
pub(super) const CTL_CMD_SEQ: u64 = 0;
pub(super) const CTL_CMD: u64 = 8;
pub(super) const CTL_EPOCH: u64 = 16;
pub(super) const CTL_BARRIER_A: u64 = 24;
pub(super) const CTL_BARRIER_B: u64 = 32;
pub(super) const CTL_VERIFY_GEN: u64 = 40;
pub(super) const CMD_VERIFY: u64 = 1;
/// Doorbells the guest's driver rings (count, then `MAX_DOORBELLS` pairs of addresses).
pub(super) const CTL_DOORBELL_COUNT: u64 = 48;
pub(super) const CTL_DOORBELLS: u64 = 56;
/// Most devices the guest's driver serves.
pub const MAX_DOORBELLS: usize = 8;
/// The port script: its sequence (VMM), the sequence vCPU 0 last finished (guest), the count
/// of operations and the operations, one word each (see the module doc).
pub(super) const CTL_SCRIPT_SEQ: u64 = 0x100;
pub(super) const CTL_SCRIPT_DONE: u64 = 0x108;
pub(super) const CTL_SCRIPT_COUNT: u64 = 0x110;
pub(super) const CTL_SCRIPT_OPS: u64 = 0x120;
/// Most operations a port script holds.
pub const MAX_PORT_OPS: usize = 64;
/// A script operation's kind (byte 2 of its word): `out dx, al` or `in al, dx`.
pub(super) const SCRIPT_OUT: u8 = 1;
pub(super) const SCRIPT_IN: u8 = 2;
/// Bytes 3 and 4 of an operation's word: the byte an `out` writes, the byte an `in` read.
pub(super) const SCRIPT_VALUE_BYTE: u64 = 3;
pub(super) const SCRIPT_READ_BYTE: u64 = 4;
const _: () = assert!(CTL_SCRIPT_SEQ >= CTL_DOORBELLS + MAX_DOORBELLS as u64 * 16);
const _: () = assert!(CTL_SCRIPT_OPS + MAX_PORT_OPS as u64 * 8 <= 4096);

// vCPU block words: written by the guest...
pub(super) const VB_WRITES: u64 = 0;
pub(super) const VB_SEEN_SEQ: u64 = 8;
pub(super) const VB_VERIFY_CHECKED: u64 = 16;
pub(super) const VB_VERIFY_BAD: u64 = 24;
/// Pages the verify in progress has checked so far.
pub(super) const VB_VERIFY_PAGES: u64 = 32;
// ...and by the VMM before boot.
pub(super) const VB_RANGE_LO: u64 = 64;
pub(super) const VB_RANGE_PAGES: u64 = 72;
pub(super) const VB_SLICE_LO: u64 = 80;
pub(super) const VB_SLICE_PAGES: u64 = 88;
pub(super) const VB_SEED: u64 = 96;
pub(super) const VB_TAG: u64 = 104;
pub(super) const VB_HOT_PAGES: u64 = 112;
pub(super) const VB_SEQ_START: u64 = 120;

/// Guest → VMM: "I am about to write this many pages" (eax); the VMM paces.
pub const PORT_PACE: u16 = 0x510;
/// Guest → VMM: working-set page `eax` failed verification.
pub const PORT_BAD_PAGE: u16 = 0x511;
/// Guest → VMM: this vCPU finished verifying; `eax` = pages it checked (counted page by page,
/// so a verify that skipped pages cannot pass for a complete one).
pub const PORT_VERIFY_DONE: u16 = 0x512;
/// Guest → VMM: spinning in a barrier; let another vCPU thread run.
pub const PORT_YIELD: u16 = 0x513;
// Devices' I/O-port BARs never cover the report ports: the window lies above them.
const _: () = assert!(PORT_PACE < PORT_YIELD && PORT_YIELD < IO_WINDOW_PORT);
const _: () = assert!(IO_WINDOW_PORT.checked_add(IO_WINDOW_PORTS).is_some());

/// One byte-wide port access of a port script ([`crate::Vm::run_port_script`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortOp {
    /// `out dx, al`: writes `value` to `port`.
    Out {
        /// The port.
        port: u16,
        /// The byte written.
        value: u8,
    },
    /// `in al, dx`: reads one byte from `port`.
    In {
        /// The port.
        port: u16,
    },
}

impl PortOp {
    /// The port it accesses.
    pub fn port(self) -> u16 {
        match self {
            Self::Out { port, .. } | Self::In { port } => port,
        }
    }

    /// Its word in the control page (the byte read back is 0 until vCPU 0 runs it).
    fn word(self) -> u64 {
        let (kind, value) = match self {
            Self::Out { value, .. } => (SCRIPT_OUT, value),
            Self::In { .. } => (SCRIPT_IN, 0),
        };
        u64::from(self.port()) | u64::from(kind) << 16 | u64::from(value) << (SCRIPT_VALUE_BYTE * 8)
    }
}

/// Posts `ops` as the next port script; returns its sequence number. Refused when it is too
/// long, when it touches a port the guest reports through, or while the last script posted has
/// not run (a script that timed out runs when vCPU 0 gets to it; only then is another taken).
pub(crate) fn post_port_script(memory: &GuestMemory, ops: &[PortOp]) -> Result<u64> {
    if ops.len() > MAX_PORT_OPS {
        return Err(KvmError::Invalid(format!(
            "a port script of {} operations: expected at most {MAX_PORT_OPS}",
            ops.len()
        )));
    }
    if let Some(op) = ops
        .iter()
        .find(|op| crate::ports::is_report_port(op.port()))
    {
        return Err(KvmError::Invalid(format!(
            "a port script may not touch I/O port {:#x}: ports {PORT_PACE:#x}-{PORT_YIELD:#x} are the guest's own reports to the VMM",
            op.port()
        )));
    }
    let seq = memory.load_u64(CONTROL_GPA + CTL_SCRIPT_SEQ)?;
    let done = memory.load_u64(CONTROL_GPA + CTL_SCRIPT_DONE)?;
    if seq != done {
        return Err(KvmError::Order(format!(
            "port script {seq} has not run yet (vCPU 0 runs it at its next batch boundary): no other is taken until it has"
        )));
    }
    for (i, op) in (0u64..).zip(ops) {
        memory.store_u64(CONTROL_GPA + CTL_SCRIPT_OPS + i * 8, op.word())?;
    }
    memory.store_u64(CONTROL_GPA + CTL_SCRIPT_COUNT, ops.len() as u64)?;
    // The sequence last (release): vCPU 0 never sees it before the operations.
    memory.store_u64(CONTROL_GPA + CTL_SCRIPT_SEQ, seq + 1)?;
    Ok(seq + 1)
}

/// Whether vCPU 0 has finished port script `seq`.
pub(crate) fn port_script_done(memory: &GuestMemory, seq: u64) -> Result<bool> {
    Ok(memory.load_u64(CONTROL_GPA + CTL_SCRIPT_DONE)? == seq)
}

/// The bytes the `in`s of the script `ops` (finished) read, in order.
pub(crate) fn port_script_reads(memory: &GuestMemory, ops: &[PortOp]) -> Result<Vec<u8>> {
    let mut reads = Vec::new();
    for (i, op) in (0u64..).zip(ops) {
        if let PortOp::In { .. } = op {
            let word = memory.load_u64(CONTROL_GPA + CTL_SCRIPT_OPS + i * 8)?;
            reads.push((word >> (SCRIPT_READ_BYTE * 8)).to_le_bytes()[0]);
        }
    }
    Ok(reads)
}

/// Sets the epoch the guest stamps into pages from its next write on.
pub fn set_epoch(memory: &GuestMemory, epoch: u64) -> Result<()> {
    memory.store_u64(CONTROL_GPA + CTL_EPOCH, epoch)
}

/// A doorbell the guest's driver serves: at each batch boundary vCPU 0 reads the `u64` at
/// `producer` and writes it to `consumer` (for the dma-engine: `PRODUCER` into `CONSUMER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbell {
    /// Where the device says how far it got (read by the guest).
    pub producer: GuestAddress,
    /// Where the guest says how far it consumed (written by the guest).
    pub consumer: GuestAddress,
}

/// Gives the guest's driver its doorbells. The addresses must be aligned `u64`s in the MMIO
/// window.
pub fn set_doorbells(memory: &GuestMemory, doorbells: &[Doorbell]) -> Result<()> {
    if doorbells.len() > MAX_DOORBELLS {
        return Err(KvmError::Invalid(format!(
            "{} doorbells: the guest's driver serves at most {MAX_DOORBELLS}",
            doorbells.len()
        )));
    }
    let window = MMIO_WINDOW_GPA..MMIO_WINDOW_GPA + MMIO_WINDOW_SIZE;
    for bell in doorbells {
        for addr in [bell.producer.raw(), bell.consumer.raw()] {
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
    for (i, bell) in (0u64..).zip(doorbells) {
        let at = CONTROL_GPA + CTL_DOORBELLS + i * 16;
        memory.store_u64(at, bell.producer.raw())?;
        memory.store_u64(at + 8, bell.consumer.raw())?;
    }
    memory.store_u64(CONTROL_GPA + CTL_DOORBELL_COUNT, doorbells.len() as u64)
}

pub(super) fn vcpu_block_gpa(vcpu: usize) -> u64 {
    VCPU_BLOCKS_GPA + vcpu as u64 * VCPU_BLOCK_SIZE
}
