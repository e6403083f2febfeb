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
//!    │ │ Pages {pass n, entries, data} on every connection ─────► │ Transferring
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

use xxhash_rust::xxh3::Xxh3;

pub use frame::{RawRecord, RecordReader, RecordWriter};
pub use hello::Hello;
pub use receiver::{Receiver, State};
pub use record::{
    DeviceData, DeviceDescription, DeviceEnd, Digests, Kind, MigrationConfig, PageEntry, Pages,
    Record,
};
pub use vmig_primitives::page_digest;

/// Hello magic.
pub const MAGIC: [u8; 8] = *b"VMIGSTRM";
/// The stream version this build speaks (2: `Pages` checksums cover page digests; 3: a
/// device's kind and protocol travel in Config as typed enums, its mapped areas as objects;
/// 4: `InitialSent` and `SwitchoverAck` hold the switchover until every device's initial
/// pre-copy state is on the destination).
pub const VERSION: u32 = 4;
/// Largest record payload.
pub const MAX_RECORD: u32 = 16 << 20;
/// Bytes of a hello.
pub const HELLO_SIZE: usize = 32;
/// Bytes of a record header.
pub const HEADER_SIZE: usize = 24;
/// Bit 63 of a page entry: the page is all zeros and has no data in the record.
pub const ZERO_PAGE: u64 = 1 << 63;
/// Device state records: parts of one chunk carry this flag until the last.
pub const MORE_PARTS: u32 = 1;

// Bytes of a page in a `Pages` record.
pub(crate) use vmig_primitives::PAGE_BYTES;

/// The byte count and XXH3 of a device's state, chunk by chunk (each chunk's length, then its
/// bytes), as the source sends it in `DeviceEnd` and the destination recomputes it.
#[derive(Clone, Default)]
pub struct StateDigest {
    bytes: u64,
    hash: Xxh3,
}

impl StateDigest {
    /// Adds one chunk.
    pub fn add(&mut self, chunk: &[u8]) {
        let len = chunk.len() as u64;
        self.bytes += len;
        self.hash.update(&len.to_le_bytes());
        self.hash.update(chunk);
    }

    /// Bytes added so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The digest of the chunks added so far.
    pub fn digest(&self) -> u64 {
        self.hash.digest()
    }
}
