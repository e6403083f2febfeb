//! Verification: the stamp every write leaves in a page ([`Stamp`]) and the rule the guest's
//! `verify` applies to it, the counters each vCPU keeps ([`read_counters`]), and the command
//! that starts a verify ([`post_verify`]).

use super::GuestLayout;
use super::layout::CONTROL_GPA;
use super::protocol::{
    CMD_VERIFY, CTL_CMD, CTL_CMD_SEQ, CTL_VERIFY_GEN, VB_VERIFY_BAD, VB_VERIFY_CHECKED, VB_WRITES,
    vcpu_block_gpa,
};
use crate::error::{KvmError, Result};
use crate::memory::{GuestMemory, PAGE_SIZE};
use vmig_primitives::GuestAddress;

/// High bits of stamp word 0.
pub const STAMP_MAGIC: u64 = 0x564d_4947 << 32; // "VMIG"
pub(super) const CHECKSUM_K: u64 = 0x9e37_79b9_7f4a_7c15;

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
        memory.read(GuestAddress(gpa), &mut head)?;
        memory.read(GuestAddress(gpa + PAGE_SIZE - 8), &mut tail)?;
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

/// Posts a verify command; the guest picks it up at its next batch boundary.
pub fn post_verify(memory: &GuestMemory) -> Result<u64> {
    let generation = memory.load_u64(CONTROL_GPA + CTL_VERIFY_GEN)? + 1;
    memory.store_u64(CONTROL_GPA + CTL_VERIFY_GEN, generation)?;
    memory.store_u64(CONTROL_GPA + CTL_CMD, CMD_VERIFY)?;
    let seq = memory.load_u64(CONTROL_GPA + CTL_CMD_SEQ)? + 1;
    memory.store_u64(CONTROL_GPA + CTL_CMD_SEQ, seq)?;
    Ok(seq)
}
