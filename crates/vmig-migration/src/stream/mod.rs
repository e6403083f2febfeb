//! The migration stream: a hello on each connection, then typed, length-prefixed, sequenced and
//! checksummed records. This module owns every byte of the protocol: the hello ([`Hello`]),
//! the record framing ([`RecordWriter`], [`RecordReader`]), every record kind typed with its
//! one encoder and one decoder ([`Record`]), and the receiver's state table ([`Receiver`]).
//!
//! # Wire format
//!
//! ```text
//! hello (32 bytes, each connection, source → destination):
//!   magic "VMIGSTRM" | version u32 | channel u16 | channels u16 | session u64 | reserved u64 (0)
//! record (each direction):
//!   kind u16 | flags u16 (0) | length u32 | sequence u64 | checksum u64 | payload[length]
//! ```
//!
//! All integers are little-endian. `sequence` counts the records of one direction of one
//! connection from 0, so a record lost, repeated or moved is found at once; `checksum` is XXH3
//! over the header's first 16 bytes and the payload, so a flipped bit anywhere is found. In a
//! `Pages` record each page's data enters the checksum as its XXH3 digest: the destination
//! keeps those digests for verification anyway, so it reads each page once for both. A kind
//! of 0 or one this build does not know, a length over [`MAX_RECORD`], a flag, a non-zero
//! reserved field and any record the receiver's state does not expect ([`Receiver`]) are
//! refused. The payload of each kind is told on [`Kind`].
//!
//! # A migration
//!
//! The hello goes on every connection; everything else on the main connection (channel 0),
//! except that the page senders write `Pages` and `PassEnd` on every connection.
//!
//! ```text
//!  source                                                     destination
//!    │ hello {channel, channels, session} ×N connections ───────► │ AwaitingHello
//!    │ Config {VM, devices, verify_memory} ─────────────────────► │ AwaitingConfig: build the VM
//!    │ ◄─────────────────────────────────────────────────── Ready │   devices → RESUMING
//!    │ ┌ pre-copy pass n (repeats until the rest fits the downtime)
//!    │ │ Pages {pass n, entries, data, sparse} on every conn. ──► │ Transferring
//!    │ │ PassEnd {n} on every connection ───────────────────────► │   all connections meet
//!    │ │ DeviceData {device, more, chunk} (pre-copy state) ─────► │   written to the device
//!    │ └ InitialSent {device} once its initial state is all sent ► │
//!    │ ◄──────────────────── SwitchoverAck (every device's InitialSent came; with devices only)
//!    │ pause vCPUs, devices → P2P states → stop-and-copy
//!    │ Pages, PassEnd {final pass} ─────────────────────────────► │ Transferring
//!    │ DeviceData… (streamed as read), DeviceEnd {device, bytes, digest} ► │ DeviceStates
//!    │ VcpuState [every vCPU] ──────────────────────────────────► │ AwaitingComplete
//!    │ Digests {first page, digests} (with verify_memory) ──────► │   compare
//!    │ Complete ────────────────────────────────────────────────► │ verify, load, set vCPUs
//!    │ ◄──────────────────────────────────────────────── Accepted │ AwaitingCommit
//!    │ Commit (the source will never resume) ───────────────────► │ Committed: devices → P2P
//!    │                                                            │   states → run; vCPUs run
//!    │ ◄───────────────────────────────────────────────── Resumed │
//!    │ ◄──────────────────────────────── Result {what the checks found}
//! ```
//!
//! Either side may send `Abort {reason}` on the main connection at any point before the
//! commit; the other side then stops (the source resumes its VM, the destination drops its).
//!
//! # When a message is lost
//!
//! Two rules keep a VM from ever running on both hosts: **the destination runs the VM only
//! once it has read a whole, checksummed `Commit`**, and **the source never runs a vCPU again
//! once it may have delivered one**. Everything else follows from what each side can know
//! when the connection is cut (a peer dies, the network drops, a record arrives damaged and
//! is refused: all three end the connection) just before a given record arrives. A stall
//! ends the same way once the reader's timeout passes (the source waits 60 s for each answer,
//! the destination 120 s for the next record).
//!
//! | lost (not read whole) | the source knows, and does | the destination knows, and does | the VM runs |
//! |---|---|---|---|
//! | a hello, `Config` | no `Ready`: rolls back (its VM never stopped): `failed` | no migration yet; a bad hello is a stray peer, logged, and it waits on | source |
//! | `Ready` | no answer: rolls back: `failed` | the source is gone: drops the VM, resets devices, exits | source |
//! | `Pages`, `PassEnd`, `DeviceData`, `InitialSent` | a send fails or an `Abort` comes: rolls back | the same: drops the VM | source |
//! | `SwitchoverAck` | keeps making passes until it comes or `timeout_s` ends: rolls back | its VM never ran: drops it | source |
//! | final `Pages` … `Complete` | no `Accepted`: rolls back (devices run, vCPUs resume) | drops the VM | source |
//! | `Accepted` | no `Accepted`: rolls back, sends `Abort` | waits in `AwaitingCommit`; the cut (or the `Abort`) drops the VM | source |
//! | `Commit`, damaged | the destination answers `Abort` (it runs nothing): rolls back, `committed` cleared | refuses it: drops the VM | source |
//! | `Commit`, partly written | the write failed, so no whole `Commit` left: rolls back | no whole record: drops the VM | source |
//! | `Commit`, cut | sent it, no `Resumed`: `unknown`, `committed`; stays paused for good | never read it: drops the VM | **nowhere**: paused on the source, which cannot tell this row from the next |
//! | `Resumed` | sent `Commit`, no `Resumed`: `unknown`, `committed`; stays paused | read `Commit`: runs the VM | destination |
//! | `Result` | had `Resumed`: `completed` with `verified` false and the error | runs the VM | destination |
//! | `Abort` (either way) | a cut before the commit: rolls back all the same | a cut before the commit: drops the VM all the same | source |
//!
//! So a lost `Commit` can leave the VM running nowhere, never in two places: the source's
//! report says `unknown` (`committed: true`, the lost connection as `error`), `query-status`
//! says `postmigrate` with `x-vmig-outcome`, `cont` is refused, and `vmig run` exits 3 on
//! `quit` without resuming it. Whoever runs the two hosts tells these rows apart by asking the
//! destination. `tests/lost_messages.rs` cuts the stream at each row through `vmig relay` and
//! checks both sides.
//!
//! # Versioning
//!
//! The hello carries the sender's [`VERSION`]. A receiver accepts exactly its own version and
//! refuses every other, older or newer, before any record is read: there is no compatibility
//! window, so source and destination must run builds that speak the same version. Any change
//! of the bytes on the wire (a field, a kind, a checksum rule) bumps [`VERSION`]; a change that
//! leaves every byte as it was (new JSON fields with defaults excepted) does not.

mod frame;
mod hello;
mod receiver;
mod record;

use std::hash::Hasher as _;

use twox_hash::XxHash3_64;

pub use frame::{RawRecord, RecordReader, RecordWriter};
pub use hello::Hello;
pub use receiver::{Receiver, State};
pub use record::{
    DeviceData, DeviceDescription, DeviceEnd, Digests, Kind, MigrationConfig, PageEntry, Pages,
    Record, SparseWord, sparse_words,
};
pub use vmig_primitives::page_digest;

/// Hello magic.
pub const MAGIC: [u8; 8] = *b"VMIGSTRM";
/// The stream version this build speaks (2: `Pages` checksums cover page digests; 3: a
/// device's kind and protocol travel in Config as typed enums, its mapped areas as objects;
/// 4: `InitialSent` and `SwitchoverAck` hold the switchover until every device's initial
/// pre-copy state is on the destination; 5: sparse pages, sent as their non-zero words; 6:
/// `Pages` carry each whole page's digest, which checks its data in place of the checksum, so
/// that pages go out from guest memory as the guest runs).
pub const VERSION: u32 = 6;
/// Largest record payload.
pub const MAX_RECORD: u32 = 16 << 20;
/// Bytes of a hello.
pub const HELLO_SIZE: usize = 32;
/// Bytes of a record header.
pub const HEADER_SIZE: usize = 24;
/// Bit 63 of a page entry: the page is all zeros and has no data in the record.
pub const ZERO_PAGE: u64 = 1 << 63;
/// Bit 62 of a page entry: the page is sparse, sent as its non-zero words in the record's
/// sparse section.
pub const SPARSE_PAGE: u64 = 1 << 62;
/// Most non-zero words a sparse page has: one with more goes whole (at this many its
/// words take 642 bytes of the page's 4096).
pub use vmig_primitives::SPARSE_MAX_WORDS;
/// Device state records: parts of one chunk carry this flag until the last.
pub const MORE_PARTS: u32 = 1;

// Bytes of a page in a `Pages` record.
pub(crate) use vmig_primitives::PAGE_BYTES;

/// The byte count and XXH3 of a device's state, chunk by chunk (each chunk's length, then its
/// bytes), as the source sends it in `DeviceEnd` and the destination recomputes it.
#[derive(Clone, Default)]
pub struct StateDigest {
    bytes: u64,
    hash: XxHash3_64,
}

impl StateDigest {
    /// Adds one chunk.
    pub fn add(&mut self, chunk: &[u8]) {
        let len = chunk.len() as u64;
        self.bytes += len;
        self.hash.write(&len.to_le_bytes());
        self.hash.write(chunk);
    }

    /// Bytes added so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The digest of the chunks added so far.
    pub fn digest(&self) -> u64 {
        self.hash.finish()
    }
}
