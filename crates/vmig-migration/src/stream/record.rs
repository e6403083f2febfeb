//! Every record kind, typed: [`Record`] with its one encoder ([`Record::encode`]) and its one
//! decoder ([`Record::decode`]), and the fixed heads of the binary payloads.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use vmig_kvm::{VcpuState, VmConfig};
use vmig_primitives::PageNumber;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{MORE_PARTS, PAGE_BYTES, SPARSE_MAX_WORDS, SPARSE_PAGE, ZERO_PAGE};
use crate::device::{DeviceKind, MigrationProtocol};
use crate::error::{MigrationError, Result};
use crate::machine::{Bar, MappedArea};
use crate::report::Verification;

/// Record kinds, as the `kind` of a record header. The value 0 is no kind: a zeroed header is
/// refused as an unknown kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: the VM's configuration and devices (JSON [`MigrationConfig`]).
    Config = 1,
    /// Destination → source: the configuration is accepted, the destination is ready. Empty.
    Ready = 2,
    /// A batch of pages: pass u32, count u32, count entries u64 (page number | [`ZERO_PAGE`]
    /// or [`SPARSE_PAGE`]), then for each page that is neither ("whole") its digest u64
    /// ([`page_digest`](vmig_primitives::page_digest)), then 4 KiB of data per whole page,
    /// then the sparse section: for each sparse page, in order, its count of non-zero words
    /// u16 (1 to [`SPARSE_MAX_WORDS`]) and that many words (index u16 below 512, increasing;
    /// value u64). The checksum covers all but the whole pages' data, which goes out from guest
    /// memory as the guest runs: each page is checked against its digest, and one that differs
    /// (written while it was sent) is held as torn until the page comes again intact, as the
    /// source's dirty log makes it; a page still torn at the end fails the migration.
    Pages = 3,
    /// End of a pass over memory on this connection: pass u32.
    PassEnd = 4,
    /// Device state: device u32, flags u32 ([`MORE_PARTS`] or 0), then a part of a chunk as
    /// the device produced it.
    DeviceData = 5,
    /// End of a device's state: device u32, bytes u64, XXH3 of all its chunks u64.
    DeviceEnd = 6,
    /// Every vCPU's state (JSON).
    VcpuState = 7,
    /// Page digests: first page u64, count u32, count digests u64.
    Digests = 8,
    /// Source → destination: everything is sent; verify and load. Empty.
    Complete = 9,
    /// Destination → source: verified and loaded; waiting for the commit. Empty.
    Accepted = 10,
    /// Source → destination: resume the VM; the source will never resume. Empty.
    Commit = 11,
    /// Destination → source: the VM runs on the destination. Empty.
    Resumed = 12,
    /// Destination → source: what the checks after resuming found (JSON [`Verification`]).
    Result = 13,
    /// Either way: the migration stops; reason as UTF-8.
    Abort = 14,
    /// Source → destination: all of a device's initial pre-copy state has been sent (its
    /// `initial_bytes` reached 0, or it has no such account): device u32.
    InitialSent = 15,
    /// Destination → source: every device was given all of its initial state; the source may
    /// switch over (QEMU's switchover-ack). Empty.
    SwitchoverAck = 16,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 16] = [
        Kind::Config,
        Kind::Ready,
        Kind::Pages,
        Kind::PassEnd,
        Kind::DeviceData,
        Kind::DeviceEnd,
        Kind::VcpuState,
        Kind::Digests,
        Kind::Complete,
        Kind::Accepted,
        Kind::Commit,
        Kind::Resumed,
        Kind::Result,
        Kind::Abort,
        Kind::InitialSent,
        Kind::SwitchoverAck,
    ];

    /// The kind of a header's `kind` field; `None` for 0 and for values this build does not
    /// know.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == value)
    }

    /// Its name, as errors say it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "Config",
            Kind::Ready => "Ready",
            Kind::Pages => "Pages",
            Kind::PassEnd => "PassEnd",
            Kind::DeviceData => "DeviceData",
            Kind::DeviceEnd => "DeviceEnd",
            Kind::VcpuState => "VcpuState",
            Kind::Digests => "Digests",
            Kind::Complete => "Complete",
            Kind::Accepted => "Accepted",
            Kind::Commit => "Commit",
            Kind::Resumed => "Resumed",
            Kind::Result => "Result",
            Kind::Abort => "Abort",
            Kind::InitialSent => "InitialSent",
            Kind::SwitchoverAck => "SwitchoverAck",
        }
    }
}

/// What the source tells the destination first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// The VM.
    pub vm: VmConfig,
    /// The devices, in order.
    pub devices: Vec<DeviceDescription>,
    /// Whether digests of every page follow the last pages (`verify_memory`).
    pub verify_memory: bool,
}

/// A device as the source has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// Its name.
    pub name: String,
    /// How its state migrates.
    pub protocol: MigrationProtocol,
    /// Its BARs in the guest: the guest's driver state (doorbell addresses) arrives with RAM
    /// and needs the same layout on the destination.
    pub bars: Vec<Bar>,
    /// Its areas mapped into the guest.
    pub mapped: Vec<MappedArea>,
    /// How it is reached and what it is: a device's state only loads into the same kind of
    /// device.
    pub kind: DeviceKind,
}

/// The head of a `Pages` payload.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub(super) struct PagesHead {
    pass: U32,
    count: U32,
}

impl PagesHead {
    /// The head of a `Pages` record of pass `pass` with `entries` entries.
    pub(super) fn new(pass: u32, entries: usize) -> Result<Self> {
        let count = u32::try_from(entries).map_err(|_| {
            MigrationError::Invalid(format!(
                "a Pages record of {entries} entries: at most {} fit its count",
                u32::MAX
            ))
        })?;
        Ok(Self {
            pass: pass.into(),
            count: count.into(),
        })
    }
}

/// One page of a `Pages` record: its page number, and bit 63 ([`ZERO_PAGE`]) when the page
/// is all zeros and has no data in the record, or bit 62 ([`SPARSE_PAGE`]) when its non-zero
/// words are in the record's sparse section.
#[repr(transparent)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct PageEntry(U64);

impl PageEntry {
    /// The entry of `page`, zero or with data.
    pub fn new(page: PageNumber, zero: bool) -> Self {
        Self(U64::new(if zero { page.0 | ZERO_PAGE } else { page.0 }))
    }

    /// The entry of a sparse `page`.
    pub fn sparse(page: PageNumber) -> Self {
        Self(U64::new(page.0 | SPARSE_PAGE))
    }

    /// The page.
    pub fn page(self) -> PageNumber {
        PageNumber(self.0.get() & !(ZERO_PAGE | SPARSE_PAGE))
    }

    /// Whether the page is all zeros (and has no data in the record).
    pub fn is_zero(self) -> bool {
        self.0.get() & ZERO_PAGE != 0
    }

    /// Whether the page is sparse (its words are in the sparse section).
    pub fn is_sparse(self) -> bool {
        self.0.get() & SPARSE_PAGE != 0
    }

    /// Whether the page's 4 KiB are in the record's data.
    pub fn is_whole(self) -> bool {
        self.0.get() & (ZERO_PAGE | SPARSE_PAGE) == 0
    }
}

/// One non-zero word of a sparse page.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct SparseWord {
    /// Which of the page's 512 words.
    pub index: U16,
    /// Its value.
    pub value: U64,
}

// A word as the stream carries it is the packing `sparse_digest` takes.
const _: () = assert!(size_of::<SparseWord>() == vmig_primitives::SPARSE_WORD_BYTES);

/// Splits a sparse section into each sparse page's words, checking it: as many pages as
/// `pages`, each with 1 to [`SPARSE_MAX_WORDS`] words at increasing indices below 512, and
/// nothing after them.
pub fn sparse_words(section: &[u8], pages: usize) -> Result<Vec<&[SparseWord]>> {
    let bad =
        |why: String| MigrationError::Stream(format!("a Pages record's sparse section {why}"));
    let mut rest = section;
    let mut out = Vec::with_capacity(pages);
    for page in 0..pages {
        let (count, after) = U16::read_from_prefix(rest)
            .map_err(|_| bad(format!("ends before sparse page {page} of {pages}")))?;
        let count = usize::from(count.get());
        if !(1..=SPARSE_MAX_WORDS).contains(&count) {
            return Err(bad(format!(
                "gives sparse page {page} {count} words: expected 1 to {SPARSE_MAX_WORDS}"
            )));
        }
        let (words, after) =
            <[SparseWord]>::ref_from_prefix_with_elems(after, count).map_err(|_| {
                bad(format!(
                    "ends inside the {count} words of sparse page {page}"
                ))
            })?;
        let increasing = words
            .windows(2)
            .all(|w| w[0].index.get() < w[1].index.get());
        if !increasing
            || words
                .last()
                .is_some_and(|w| usize::from(w.index.get()) >= PAGE_BYTES / 8)
        {
            return Err(bad(format!(
                "gives sparse page {page} word indices that are not increasing and below 512"
            )));
        }
        // The words are the page's digest too (`sparse_digest`): only its non-zero ones.
        if words.iter().any(|w| w.value.get() == 0) {
            return Err(bad(format!("gives sparse page {page} a word of value 0")));
        }
        out.push(words);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(bad(format!(
            "has {} bytes after its {pages} sparse pages",
            rest.len()
        )));
    }
    Ok(out)
}

/// The payload of a `PassEnd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PassEndHead {
    pass: U32,
}

/// The head of a `DeviceData` payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DeviceDataHead {
    device: U32,
    flags: U32,
}

/// The payload of a `DeviceEnd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DeviceEndHead {
    device: U32,
    bytes: U64,
    digest: U64,
}

/// The payload of an `InitialSent`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct InitialSentHead {
    device: U32,
}

/// The head of a `Digests` payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DigestsHead {
    first: U64,
    count: U32,
}

/// A batch of pages of one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pages<'a> {
    /// The pass they belong to.
    pub pass: u32,
    /// The pages, in order.
    pub entries: &'a [PageEntry],
    /// The digest of each entry that is whole (neither zero nor sparse), in the entries' order,
    /// as the sender took it.
    pub digests: &'a [U64],
    /// [`PAGE_SIZE`](vmig_primitives::PAGE_SIZE) bytes for each whole entry, in the entries'
    /// order.
    pub data: &'a [u8],
    /// The sparse section (see [`Kind::Pages`]), checked by the decoder.
    pub sparse: &'a [u8],
}

/// A part of a chunk of a device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceData<'a> {
    /// The device's index in the configuration.
    pub device: u32,
    /// More parts of this chunk follow ([`MORE_PARTS`]).
    pub more: bool,
    /// The bytes.
    pub data: &'a [u8],
}

/// The end of a device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceEnd {
    /// The device's index in the configuration.
    pub device: u32,
    /// Bytes of state sent.
    pub bytes: u64,
    /// The [`StateDigest`](super::StateDigest) of its chunks.
    pub digest: u64,
}

/// Digests of consecutive pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digests<'a> {
    /// The first page.
    pub first: PageNumber,
    /// One digest per page from `first`.
    pub digests: &'a [U64],
}

/// A record, typed. Binary payloads borrow from the buffer they were read into (or from the
/// sender's buffers); JSON ones are decoded.
///
/// # The receiver's states
///
/// The destination reads the records of the main connection through a [`Receiver`]
/// (its table is [`Receiver::next`]); a record its state does not list is refused, naming the
/// record and the state. Page connections stay in `PageConnection`.
///
/// ```text
///                hello              Config (→ Ready)         DeviceEnd
///  AwaitingHello ─────► AwaitingConfig ─────► Transferring ───────────► DeviceStates
///                                             ⟲ Pages, PassEnd,         ⟲ DeviceData,
///                                               DeviceData, InitialSent   DeviceEnd
///                                                  │ VcpuState               │ VcpuState
///                                                  └────────► AwaitingComplete ◄┘
///                                                             ⟲ Digests
///                                                                  │ Complete (→ Accepted)
///                                                                  ▼
///                                   Committed ◄──────────── AwaitingCommit
///                       (→ Resumed, Result)       Commit
///
///  PageConnection ⟲ Pages, PassEnd
///  any state but Committed ── Abort ──► Aborted
/// ```
///
/// [`Receiver`]: super::Receiver
/// [`Receiver::next`]: super::Receiver::next
#[derive(Debug)]
pub enum Record<'a> {
    /// See [`Kind::Config`].
    Config(Box<MigrationConfig>),
    /// See [`Kind::Ready`].
    Ready,
    /// See [`Kind::Pages`].
    Pages(Pages<'a>),
    /// See [`Kind::PassEnd`].
    PassEnd {
        /// The pass that ended.
        pass: u32,
    },
    /// See [`Kind::DeviceData`].
    DeviceData(DeviceData<'a>),
    /// See [`Kind::DeviceEnd`].
    DeviceEnd(DeviceEnd),
    /// See [`Kind::VcpuState`].
    VcpuState(Vec<VcpuState>),
    /// See [`Kind::Digests`].
    Digests(Digests<'a>),
    /// See [`Kind::Complete`].
    Complete,
    /// See [`Kind::Accepted`].
    Accepted,
    /// See [`Kind::Commit`].
    Commit,
    /// See [`Kind::Resumed`].
    Resumed,
    /// See [`Kind::Result`].
    Result(Box<Verification>),
    /// See [`Kind::Abort`].
    Abort(Cow<'a, str>),
    /// See [`Kind::InitialSent`].
    InitialSent {
        /// The device's index in the configuration.
        device: u32,
    },
    /// See [`Kind::SwitchoverAck`].
    SwitchoverAck,
}

/// A record's payload as the writer frames it: `head`, `body` and `digests` in that order,
/// then, for `Pages`, the pages' data (which the checksum leaves to their digests).
#[derive(Debug)]
pub(super) struct Payload<'r> {
    pub(super) head: Cow<'r, [u8]>,
    pub(super) body: &'r [u8],
    /// A `Pages` record's digests of its whole pages.
    pub(super) digests: &'r [u8],
    pub(super) pages: &'r [u8],
    /// After the pages: a `Pages` record's sparse section.
    pub(super) tail: &'r [u8],
}

/// A JSON payload.
fn json(value: &impl Serialize, what: &'static str) -> Result<Cow<'static, [u8]>> {
    serde_json::to_vec(value)
        .map(Cow::Owned)
        .map_err(|source| MigrationError::Json { what, source })
}

/// What a record of `kind` with a `payload` of `got` bytes lacks or has too many.
fn refuse(kind: Kind, expected: &str, got: usize) -> MigrationError {
    MigrationError::Stream(format!(
        "{} {} record of {got} bytes: expected {expected}",
        super::receiver::article(kind.name()),
        kind.name()
    ))
}

/// The refusal of a `Pages` record whose data is not one page for each of its
/// `with_data` non-zero entries.
pub(super) fn pages_data_mismatch(whole: usize, data: usize) -> MigrationError {
    MigrationError::Stream(format!(
        "a Pages record lists {whole} whole pages and carries {data} bytes after its entries: expected 8 bytes of digest and {PAGE_BYTES} bytes of data for each, then its sparse section"
    ))
}

/// The fixed head `H` at the start of `payload`, and the rest.
fn head<'a, H>(kind: Kind, payload: &'a [u8], layout: &str) -> Result<(&'a H, &'a [u8])>
where
    H: FromBytes + KnownLayout + Immutable + Unaligned,
{
    H::ref_from_prefix(payload).map_err(|_| {
        let expected = format!("at least {} bytes ({layout})", size_of::<H>());
        refuse(kind, &expected, payload.len())
    })
}

/// The fixed payload `H`, nothing more.
fn exactly<'a, H>(kind: Kind, payload: &'a [u8], layout: &str) -> Result<&'a H>
where
    H: FromBytes + KnownLayout + Immutable + Unaligned,
{
    H::ref_from_bytes(payload).map_err(|_| {
        let expected = format!("exactly {} bytes ({layout})", size_of::<H>());
        refuse(kind, &expected, payload.len())
    })
}

fn decode_json<'de, T: Deserialize<'de>>(payload: &'de [u8], what: &'static str) -> Result<T> {
    serde_json::from_slice(payload).map_err(|source| MigrationError::Json { what, source })
}

impl<'a> Record<'a> {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Config(_) => Kind::Config,
            Record::Ready => Kind::Ready,
            Record::Pages(_) => Kind::Pages,
            Record::PassEnd { .. } => Kind::PassEnd,
            Record::DeviceData(_) => Kind::DeviceData,
            Record::DeviceEnd(_) => Kind::DeviceEnd,
            Record::VcpuState(_) => Kind::VcpuState,
            Record::Digests(_) => Kind::Digests,
            Record::Complete => Kind::Complete,
            Record::Accepted => Kind::Accepted,
            Record::Commit => Kind::Commit,
            Record::Resumed => Kind::Resumed,
            Record::Result(_) => Kind::Result,
            Record::Abort(_) => Kind::Abort,
            Record::InitialSent { .. } => Kind::InitialSent,
            Record::SwitchoverAck => Kind::SwitchoverAck,
        }
    }

    /// The record's payload (the one encoder of every kind).
    pub(super) fn encode(&self) -> Result<Payload<'_>> {
        let fixed = |head: &[u8]| Payload {
            head: Cow::Owned(head.to_vec()),
            body: &[],
            digests: &[],
            pages: &[],
            tail: &[],
        };
        let empty = Payload {
            head: Cow::Borrowed(&[]),
            body: &[],
            digests: &[],
            pages: &[],
            tail: &[],
        };
        Ok(match self {
            Record::Config(config) => Payload {
                head: json(config, "the Config record cannot be encoded")?,
                ..empty
            },
            Record::VcpuState(states) => Payload {
                head: json(states, "the VcpuState record cannot be encoded")?,
                ..empty
            },
            Record::Result(verification) => Payload {
                head: json(verification, "the Result record cannot be encoded")?,
                ..empty
            },
            Record::Pages(p) => {
                let head = PagesHead::new(p.pass, p.entries.len())?;
                let whole = p.entries.iter().filter(|e| e.is_whole()).count();
                if p.digests.len() != whole || p.data.len() != whole * PAGE_BYTES {
                    return Err(MigrationError::Invalid(format!(
                        "a Pages record of {whole} whole pages with {} digests and {} bytes of data: expected one digest and {PAGE_BYTES} bytes for each",
                        p.digests.len(),
                        p.data.len()
                    )));
                }
                Payload {
                    head: Cow::Owned(head.as_bytes().to_vec()),
                    body: p.entries.as_bytes(),
                    digests: p.digests.as_bytes(),
                    pages: p.data,
                    tail: p.sparse,
                }
            }
            Record::PassEnd { pass } => fixed(
                PassEndHead {
                    pass: (*pass).into(),
                }
                .as_bytes(),
            ),
            Record::DeviceData(d) => {
                let flags = if d.more { MORE_PARTS } else { 0 };
                let head = DeviceDataHead {
                    device: d.device.into(),
                    flags: flags.into(),
                };
                Payload {
                    body: d.data,
                    ..fixed(head.as_bytes())
                }
            }
            Record::DeviceEnd(e) => fixed(
                DeviceEndHead {
                    device: e.device.into(),
                    bytes: e.bytes.into(),
                    digest: e.digest.into(),
                }
                .as_bytes(),
            ),
            Record::Digests(d) => {
                let count = u32::try_from(d.digests.len()).map_err(|_| {
                    MigrationError::Invalid(format!(
                        "a Digests record of {} digests: at most {} fit its count",
                        d.digests.len(),
                        u32::MAX
                    ))
                })?;
                let head = DigestsHead {
                    first: d.first.0.into(),
                    count: count.into(),
                };
                Payload {
                    body: d.digests.as_bytes(),
                    ..fixed(head.as_bytes())
                }
            }
            Record::Abort(reason) => Payload {
                head: Cow::Borrowed(reason.as_bytes()),
                ..empty
            },
            Record::InitialSent { device } => fixed(
                InitialSentHead {
                    device: (*device).into(),
                }
                .as_bytes(),
            ),
            Record::Ready
            | Record::SwitchoverAck
            | Record::Complete
            | Record::Accepted
            | Record::Commit
            | Record::Resumed => empty,
        })
    }

    /// The pass and entries at the start of a `Pages` payload, and what follows them (the
    /// whole pages' digests, their data and the sparse section, unchecked): [`Self::decode`]'s first step, and all of it for a payload
    /// whose data was read elsewhere (straight into guest RAM).
    pub fn decode_pages_head(payload: &'a [u8]) -> Result<(u32, &'a [PageEntry], &'a [u8])> {
        let kind = Kind::Pages;
        let (h, rest) = head::<PagesHead>(kind, payload, "pass u32, count u32")?;
        let count = usize::try_from(h.count.get()).unwrap_or(usize::MAX);
        let (entries, data) =
            <[PageEntry]>::ref_from_prefix_with_elems(rest, count).map_err(|_| {
                let expected =
                    format!("8 bytes of head and 8 bytes for each of its {count} entries");
                refuse(kind, &expected, payload.len())
            })?;
        Ok((h.pass.get(), entries, data))
    }

    /// Decodes the payload of a record of `kind` (the one decoder of every kind): a payload
    /// that is short, long, or has a reserved bit set is refused, saying what was expected.
    pub fn decode(kind: Kind, payload: &'a [u8]) -> Result<Self> {
        let none = |record: Record<'a>| {
            if payload.is_empty() {
                Ok(record)
            } else {
                Err(refuse(kind, "an empty payload", payload.len()))
            }
        };
        match kind {
            Kind::Config => Ok(Record::Config(Box::new(decode_json(
                payload,
                "the Config record is not a vmig configuration",
            )?))),
            Kind::VcpuState => Ok(Record::VcpuState(decode_json(
                payload,
                "the VcpuState record is not valid vCPU state",
            )?)),
            Kind::Result => Ok(Record::Result(Box::new(decode_json(
                payload,
                "the destination's Result record is not valid JSON",
            )?))),
            Kind::Pages => {
                let (pass, entries, rest) = Self::decode_pages_head(payload)?;
                let whole = entries.iter().filter(|e| e.is_whole()).count();
                let (digests, rest) = <[U64]>::ref_from_prefix_with_elems(rest, whole)
                    .map_err(|_| pages_data_mismatch(whole, rest.len()))?;
                let (data, sparse) = whole
                    .checked_mul(PAGE_BYTES)
                    .and_then(|bytes| rest.split_at_checked(bytes))
                    .ok_or_else(|| pages_data_mismatch(whole, rest.len() + whole * 8))?;
                sparse_words(sparse, entries.iter().filter(|e| e.is_sparse()).count())?;
                Ok(Record::Pages(Pages {
                    pass,
                    entries,
                    digests,
                    data,
                    sparse,
                }))
            }
            Kind::PassEnd => {
                let h = exactly::<PassEndHead>(kind, payload, "pass u32")?;
                Ok(Record::PassEnd { pass: h.pass.get() })
            }
            Kind::DeviceData => {
                let (h, data) = head::<DeviceDataHead>(kind, payload, "device u32, flags u32")?;
                let flags = h.flags.get();
                if flags & !MORE_PARTS != 0 {
                    return Err(MigrationError::Stream(format!(
                        "a DeviceData record with flags {flags:#x}: expected {MORE_PARTS:#x} (more parts) or 0"
                    )));
                }
                Ok(Record::DeviceData(DeviceData {
                    device: h.device.get(),
                    more: flags & MORE_PARTS != 0,
                    data,
                }))
            }
            Kind::DeviceEnd => {
                let h =
                    exactly::<DeviceEndHead>(kind, payload, "device u32, bytes u64, digest u64")?;
                Ok(Record::DeviceEnd(DeviceEnd {
                    device: h.device.get(),
                    bytes: h.bytes.get(),
                    digest: h.digest.get(),
                }))
            }
            Kind::Digests => {
                let (h, rest) = head::<DigestsHead>(kind, payload, "first u64, count u32")?;
                let count = usize::try_from(h.count.get()).unwrap_or(usize::MAX);
                let digests = <[U64]>::ref_from_bytes_with_elems(rest, count).map_err(|_| {
                    let expected =
                        format!("12 bytes of head and 8 bytes for each of its {count} digests");
                    refuse(kind, &expected, payload.len())
                })?;
                Ok(Record::Digests(Digests {
                    first: PageNumber(h.first.get()),
                    digests,
                }))
            }
            Kind::Abort => Ok(Record::Abort(String::from_utf8_lossy(payload))),
            Kind::Ready => none(Record::Ready),
            Kind::Complete => none(Record::Complete),
            Kind::Accepted => none(Record::Accepted),
            Kind::Commit => none(Record::Commit),
            Kind::Resumed => none(Record::Resumed),
            Kind::InitialSent => {
                let h = exactly::<InitialSentHead>(kind, payload, "device u32")?;
                Ok(Record::InitialSent {
                    device: h.device.get(),
                })
            }
            Kind::SwitchoverAck => none(Record::SwitchoverAck),
        }
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
pub(super) mod tests;
