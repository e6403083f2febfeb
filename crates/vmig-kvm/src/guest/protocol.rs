//! What the guest and the VMM say to each other: the control page (host → guest: command
//! sequence, command, epoch, the verify barriers, the driver's doorbells), each vCPU's block
//! (its parameters, set before boot, and its counters, kept by the guest) and the I/O ports the
//! guest reports through.

use super::layout::{
    CONTROL_GPA, MMIO_WINDOW_GPA, MMIO_WINDOW_SIZE, VCPU_BLOCK_SIZE, VCPU_BLOCKS_GPA,
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
