//! The framing of records: the 24-byte header with its kind, length, sequence and checksum,
//! written and read on one connection in one direction.

use std::hash::Hasher as _;
use std::io::{self, Read, Write};
use std::time::Duration;

use twox_hash::XxHash3_64;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use std::os::fd::AsFd;

use vmig_kvm::GuestMemory;

use super::record::{PagesHead, Payload, pages_data_mismatch};
use super::{HEADER_SIZE, Kind, MAX_RECORD, PAGE_BYTES, PageEntry, Record, page_digest};
use crate::error::{MigrationError, Result, io_error};
use crate::transport::Conn;

/// A record header as it is on the wire; the checksum covers the first 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RecordHead {
    kind: U16,
    flags: U16,
    length: U32,
    sequence: U64,
    checksum: U64,
}

/// Bytes of the header the checksum covers.
const CHECKED: usize = 16;

/// The checksum of a record: its header's first 16 bytes, then `parts`. A `Pages` record's
/// whole pages are not among them: each is checked against the digest the record carries
/// for it.
fn checksum(header: &[u8], parts: &[&[u8]]) -> u64 {
    let mut h = XxHash3_64::new();
    h.write(&header[..CHECKED]);
    for part in parts {
        h.write(part);
    }
    h.finish()
}

/// The parts of a `Pages` payload, unchecked.
struct PagesParts<'a> {
    /// Pass, count and entries.
    entries: &'a [u8],
    /// The whole pages' digests.
    digests: &'a [u8],
    /// Their data.
    data: &'a [u8],
    sparse: &'a [u8],
}

/// A `Pages` payload split into its parts; `None` unless it holds that much.
fn split_pages(payload: &[u8]) -> Option<PagesParts<'_>> {
    let (entries, rest) = payload.split_at_checked(entries_len(payload)?)?;
    let whole = whole_pages(entries)?;
    let (digests, rest) = rest.split_at_checked(whole.checked_mul(8)?)?;
    let (data, sparse) = rest.split_at_checked(whole.checked_mul(PAGE_BYTES)?)?;
    Some(PagesParts {
        entries,
        digests,
        data,
        sparse,
    })
}

/// How many entries of a `Pages` payload's pass, count and entries have their 4 KiB of data.
fn whole_pages(head: &[u8]) -> Option<usize> {
    let entries = <[PageEntry]>::ref_from_bytes(head.get(8..)?).ok()?;
    Some(entries.iter().filter(|e| e.is_whole()).count())
}

/// Bytes of a `Pages` payload's pass, count and entries, from its count.
fn entries_len(payload: &[u8]) -> Option<usize> {
    let count = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?);
    usize::try_from(count).ok()?.checked_mul(8)?.checked_add(8)
}

/// The refusal of a `Pages` record whose parts are not entries then whole pages.
fn pages_shape() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "a Pages record is written as pass, count and entries; one digest and 4 KiB for each whole page; then its sparse section",
    )
}

/// Whole pages of a `Pages` record whose bytes differ from the digest the record carries for
/// them, by page number: the guest wrote them while they were sent (the source sends them
/// again, as its dirty log has them), or they were damaged on the way.
fn torn(numbers: impl Iterator<Item = u64>, sent: &[u8], arrived: &[u64], out: &mut Vec<u64>) {
    out.clear();
    let sent = <[U64]>::ref_from_bytes(sent).unwrap_or(&[]);
    out.extend(
        numbers
            .zip(sent.iter().zip(arrived))
            .filter(|(_, (sent, arrived))| sent.get() != **arrived)
            .map(|(number, _)| number),
    );
}

/// Writes records on one connection (one direction).
#[derive(Debug)]
pub struct RecordWriter<W: Write> {
    inner: W,
    sequence: u64,
    bytes: u64,
}

impl<W: Write> RecordWriter<W> {
    /// A writer whose first record has sequence 0.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            sequence: 0,
            bytes: 0,
        }
    }

    /// Writes `record`, encoded ([`Record`]'s one encoder).
    pub fn send(&mut self, record: &Record<'_>) -> io::Result<()> {
        let Payload {
            head,
            body,
            digests,
            pages,
            tail,
        } = record
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let pages: Vec<&[u8]> = pages.chunks(PAGE_BYTES).collect();
        self.frame(record.kind(), &[&head, body, digests], &pages, tail)
    }

    /// Writes a `Pages` record whose whole pages are `pages` (4 KiB each, guest memory the
    /// guest may be writing: they go to the socket from where they are, with no copy), with
    /// `digests` as the caller took them from the same bytes just before.
    pub fn send_pages(
        &mut self,
        pass: u32,
        entries: &[PageEntry],
        digests: &[U64],
        pages: &[&[u8]],
        sparse: &[u8],
    ) -> io::Result<()> {
        let whole = entries.iter().filter(|e| e.is_whole()).count();
        if whole != pages.len()
            || digests.len() != pages.len()
            || pages.iter().any(|p| p.len() != PAGE_BYTES)
        {
            return Err(pages_shape());
        }
        let head = PagesHead::new(pass, entries.len())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let parts = [head.as_bytes(), entries.as_bytes(), digests.as_bytes()];
        self.frame(Kind::Pages, &parts, pages, sparse)
    }

    /// Writes a record of `kind` whose payload is the concatenation of `parts` (for `Pages`:
    /// the pass, count and entries, then the whole pages' data, then the sparse section if
    /// any, with the pages' digests taken here). [`send`](Self::send) writes typed records;
    /// this writes any bytes, as tests of the framing need.
    pub fn write(&mut self, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
        match (kind, parts) {
            (Kind::Pages, [entries, data, sparse @ ..])
                if entries_len(entries) == Some(entries.len()) && sparse.len() <= 1 =>
            {
                let sparse = sparse.first().copied().unwrap_or_default();
                if !data.len().is_multiple_of(PAGE_BYTES) {
                    return Err(pages_shape());
                }
                let digests: Vec<U64> = data
                    .chunks_exact(PAGE_BYTES)
                    .map(|p| U64::new(page_digest(p)))
                    .collect();
                let pages: Vec<&[u8]> = data.chunks_exact(PAGE_BYTES).collect();
                self.frame(kind, &[entries, digests.as_bytes()], &pages, sparse)
            }
            (Kind::Pages, _) => Err(pages_shape()),
            _ => self.frame(kind, parts, &[], &[]),
        }
    }

    /// Frames `parts`, then `pages` (whole pages, which the checksum leaves to their digests
    /// among `parts`), then `tail`.
    fn frame(
        &mut self,
        kind: Kind,
        parts: &[&[u8]],
        pages: &[&[u8]],
        tail: &[u8],
    ) -> io::Result<()> {
        let total: usize = parts.iter().chain(pages).map(|p| p.len()).sum::<usize>() + tail.len();
        let length = u32::try_from(total)
            .ok()
            .filter(|length| *length <= MAX_RECORD)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("record of {total} bytes exceeds {MAX_RECORD}"),
                )
            })?;
        let mut head = RecordHead {
            kind: (kind as u16).into(),
            flags: 0.into(),
            length: length.into(),
            sequence: self.sequence.into(),
            checksum: 0.into(),
        };
        let mut checked: Vec<&[u8]> = parts.to_vec();
        checked.push(tail);
        head.checksum = checksum(head.as_bytes(), &checked).into();
        let mut slices = Vec::with_capacity(parts.len() + pages.len() + 2);
        slices.push(io::IoSlice::new(head.as_bytes()));
        slices.extend(parts.iter().map(|p| io::IoSlice::new(p)));
        slices.extend(pages.iter().map(|p| io::IoSlice::new(p)));
        slices.push(io::IoSlice::new(tail));
        write_all_vectored(&mut self.inner, &mut slices)?;
        self.sequence += 1;
        self.bytes += (HEADER_SIZE as u64) + u64::from(length);
        Ok(())
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    /// Bytes written so far, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

fn write_all_vectored(w: &mut impl Write, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl RecordReader<Conn> {
    /// Reads the next record into `buf` if it begins to arrive within `wait`, returning its
    /// kind; `None` when nothing came. A record that has begun is read whole, under the
    /// connection's own read timeout; nothing is lost when nothing came.
    pub fn read_within(&mut self, wait: Duration, buf: &mut Vec<u8>) -> Result<Option<Kind>> {
        let what = || format!("{}: waiting for record {}", self.what, self.sequence);
        let timeout = self.inner.read_timeout().map_err(io_error(what()))?;
        // A zero timeout means "none" to the socket: wait at least a millisecond.
        self.inner
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(io_error(what()))?;
        let mut header = [0u8; HEADER_SIZE];
        let first = loop {
            match self.inner.read(&mut header[..1]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        self.inner
            .set_read_timeout(timeout)
            .map_err(io_error(what()))?;
        match first {
            Ok(0) => Err(io_error(format!(
                "{}: reading record {} (the peer closed)",
                self.what, self.sequence
            ))(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => self.read_rest(1, header, buf, None).map(Some),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io_error(what())(e)),
        }
    }
}

/// A record as read, its payload not decoded.
#[derive(Debug)]
pub struct RawRecord {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Reads a `Pages` record's data (whole pages, in the order of the given page numbers) from
/// the connection into guest RAM, and pushes each page's digest.
type PageLoader<'a, R> = dyn Fn(&mut R, &[u64], &mut Vec<u64>) -> io::Result<()> + 'a;

/// Reads records from one connection (one direction), checking sequence and checksum.
#[derive(Debug)]
pub struct RecordReader<R: Read> {
    inner: R,
    sequence: u64,
    bytes: u64,
    what: String,
    page_digests: Vec<u64>,
    /// The whole pages of the last `Pages` record that arrived different from their digest.
    torn_pages: Vec<u64>,
    /// The pages with data of the last `Pages` record read into guest RAM.
    data_pages: Vec<u64>,
}

impl<R: Read> RecordReader<R> {
    /// A reader expecting sequence 0 first; `what` names the connection in errors.
    pub fn new(inner: R, what: impl Into<String>) -> Self {
        Self {
            inner,
            sequence: 0,
            bytes: 0,
            what: what.into(),
            page_digests: Vec::new(),
            torn_pages: Vec::new(),
            data_pages: Vec::new(),
        }
    }

    /// What the reader's errors call its connection.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Reads the next record into `buf` (reused across calls), returning its kind.
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<Kind> {
        self.read_rest(0, [0u8; HEADER_SIZE], buf, None)
    }

    /// As [`Self::read_into`], with the header's first `have` bytes already in `header`.
    /// With `load`, a `Pages` record's data is not read into `buf` but handed to it.
    fn read_rest(
        &mut self,
        have: usize,
        mut header: [u8; HEADER_SIZE],
        buf: &mut Vec<u8>,
        load: Option<&PageLoader<'_, R>>,
    ) -> Result<Kind> {
        let (head, size) = self.read_head(have, &mut header)?;
        let pages = head.kind.get() == Kind::Pages as u16;
        self.page_digests.clear();
        self.torn_pages.clear();
        if let (true, Some(load)) = (pages, load) {
            self.read_payload(&head, 0, size.min(8), buf)?;
            let prefix = entries_len(buf).unwrap_or(size).min(size);
            self.read_payload(&head, buf.len(), prefix, buf)?;
            let (_, entries, _) = Record::decode_pages_head(buf)?;
            self.data_pages.clear();
            self.data_pages
                .extend(entries.iter().filter(|e| e.is_whole()).map(|e| e.page().0));
            let whole = self.data_pages.len();
            let (digests, data) = whole
                .checked_mul(8)
                .zip(whole.checked_mul(PAGE_BYTES))
                .filter(|&(digests, data)| digests + data <= size - prefix)
                .ok_or_else(|| pages_data_mismatch(whole, size - prefix))?;
            self.read_payload(&head, prefix, prefix + digests, buf)?;
            self.page_digests.clear();
            load(&mut self.inner, &self.data_pages, &mut self.page_digests).map_err(|e| {
                if e.kind() == io::ErrorKind::InvalidInput {
                    self.bad(format!("record {}: {e}", head.sequence.get()))
                } else {
                    io_error(format!(
                        "{}: reading the {} bytes of record {} into guest RAM (the stream is truncated)",
                        self.what,
                        head.length.get(),
                        head.sequence.get()
                    ))(e)
                }
            })?;
            // The sparse section follows the entries and digests in `buf`.
            self.read_payload(&head, prefix + digests, size - data, buf)?;
            let intact = checksum(&header, &[buf]) == head.checksum.get();
            torn(
                self.data_pages.iter().copied(),
                &buf[prefix..prefix + digests],
                &self.page_digests,
                &mut self.torn_pages,
            );
            return self.accept(&head, intact);
        }
        self.read_payload(&head, 0, size, buf)?;
        let intact = if pages {
            self.page_digests.clear();
            split_pages(buf).is_some_and(|parts| {
                let PagesParts {
                    entries,
                    digests,
                    data,
                    sparse,
                } = parts;
                self.page_digests
                    .extend(data.chunks_exact(PAGE_BYTES).map(page_digest));
                let numbers = <[PageEntry]>::ref_from_bytes(&entries[8..])
                    .map(|e| e.iter().filter(|e| e.is_whole()).map(|e| e.page().0))
                    .into_iter()
                    .flatten();
                torn(numbers, digests, &self.page_digests, &mut self.torn_pages);
                checksum(&header, &[entries, digests, sparse]) == head.checksum.get()
            })
        } else {
            checksum(&header, &[buf]) == head.checksum.get()
        };
        self.accept(&head, intact)
    }

    /// Reads the rest of a header and checks its sequence, flags and length; returns it and
    /// the payload's size.
    fn read_head(
        &mut self,
        have: usize,
        header: &mut [u8; HEADER_SIZE],
    ) -> Result<(RecordHead, usize)> {
        self.inner.read_exact(&mut header[have..]).map_err(|e| {
            let what = format!(
                "{}: reading record {} (the peer closed or the stream is truncated)",
                self.what, self.sequence
            );
            io_error(what)(e)
        })?;
        let head = RecordHead::read_from_bytes(&header[..])
            .map_err(|_| MigrationError::Stream(format!("{}: a short header", self.what)))?;
        let flags = head.flags.get();
        let length = head.length.get();
        let sequence = head.sequence.get();
        if sequence != self.sequence {
            return Err(self.bad(format!(
                "record with sequence {sequence} where {} was expected: records were lost, repeated or reordered",
                self.sequence
            )));
        }
        let size = usize::try_from(length)
            .ok()
            .filter(|_| length <= MAX_RECORD);
        let (0, Some(size)) = (flags, size) else {
            return Err(self.bad(format!(
                "record {sequence} has flags {flags:#x} and length {length}: expected flags 0 and at most {MAX_RECORD} bytes"
            )));
        };
        Ok((head, size))
    }

    /// Reads the payload's bytes `from..to` into `buf`, which holds the ones before.
    fn read_payload(
        &mut self,
        head: &RecordHead,
        from: usize,
        to: usize,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        buf.truncate(from);
        buf.resize(to, 0);
        self.inner.read_exact(&mut buf[from..]).map_err(|e| {
            io_error(format!(
                "{}: reading the {} bytes of record {} (the stream is truncated)",
                self.what,
                head.length.get(),
                head.sequence.get()
            ))(e)
        })
    }

    /// A stream error naming the connection.
    fn bad(&self, why: String) -> MigrationError {
        MigrationError::Stream(format!("{}: {why}", self.what))
    }

    /// Takes a record whose payload was read: refuses it if it failed its checksum or has an
    /// unknown kind, else counts it.
    fn accept(&mut self, head: &RecordHead, intact: bool) -> Result<Kind> {
        let (raw_kind, length, sequence) =
            (head.kind.get(), head.length.get(), head.sequence.get());
        if !intact {
            return Err(self.bad(format!(
                "record {sequence} (kind {raw_kind}, {length} bytes) fails its checksum: the stream is corrupted"
            )));
        }
        let kind = Kind::from_u16(raw_kind).ok_or_else(|| {
            self.bad(format!(
                "record {sequence} has unknown kind {raw_kind}: expected 1 to {}",
                Kind::ALL[Kind::ALL.len() - 1] as u16
            ))
        })?;
        self.sequence += 1;
        self.bytes += (HEADER_SIZE as u64) + u64::from(length);
        Ok(kind)
    }

    /// Reads the next record into `buf` and decodes it ([`Record`]'s one decoder).
    pub fn receive<'b>(&mut self, buf: &'b mut Vec<u8>) -> Result<Record<'b>> {
        let kind = self.read_into(buf)?;
        Record::decode(kind, buf)
    }

    /// The digest of each whole page of the last record read as it arrived, when it was
    /// `Pages` (in the order of its data).
    pub fn page_digests(&self) -> &[u64] {
        &self.page_digests
    }

    /// The whole pages of the last `Pages` record read whose bytes differ from the digest the
    /// record carries for them (see [`Kind::Pages`]): not an error by itself, as the guest may
    /// have written them while they were sent; a receiver holds them as torn until the same
    /// page arrives intact.
    pub fn torn_pages(&self) -> &[u64] {
        &self.torn_pages
    }

    /// Reads the next record.
    pub fn read(&mut self) -> Result<RawRecord> {
        let mut payload = Vec::new();
        let kind = self.read_into(&mut payload)?;
        Ok(RawRecord { kind, payload })
    }

    /// Reads the next record, which must be of `kind` (an `Abort` from the peer is reported as
    /// a refusal with the peer's reason).
    /// The payload is returned as it came, not decoded: [`expect_record`](Self::expect_record)
    /// decodes.
    pub fn expect(&mut self, kind: Kind) -> Result<Vec<u8>> {
        let mut payload = Vec::new();
        self.expect_kind(kind, &mut payload)?;
        Ok(payload)
    }

    /// Reads the next record into `buf`, which must be of `kind`, and decodes it (an `Abort`
    /// from the peer is reported as a refusal with the peer's reason).
    pub fn expect_record<'b>(&mut self, kind: Kind, buf: &'b mut Vec<u8>) -> Result<Record<'b>> {
        self.expect_kind(kind, buf)?;
        Record::decode(kind, buf)
    }

    fn expect_kind(&mut self, kind: Kind, buf: &mut Vec<u8>) -> Result<()> {
        let got = self.read_into(buf)?;
        if got == kind {
            return Ok(());
        }
        if got == Kind::Abort
            && let Record::Abort(reason) = Record::decode(got, buf)?
        {
            return Err(MigrationError::Refused(reason.into_owned()));
        }
        Err(MigrationError::Stream(format!(
            "{}: a {got:?} record where {kind:?} was expected",
            self.what
        )))
    }

    /// Bytes read so far, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

impl RecordReader<Conn> {
    /// As [`Self::read_into`], except that a `Pages` record's whole pages go from the
    /// connection straight into `memory` at their addresses, with no copy through `buf`, which
    /// then holds its pass, count and entries, their digests, then its sparse section
    /// ([`Record::decode_pages_head`]). Every page is checked to be guest RAM before any is
    /// read; each page's digest is then taken where it landed ([`Self::page_digests`], and
    /// [`Self::torn_pages`] those that differ from the record's). A record that fails its
    /// checksum leaves its pages written, which a destination can afford, as it discards the
    /// VM when its stream fails.
    pub fn read_into_memory(&mut self, buf: &mut Vec<u8>, memory: &GuestMemory) -> Result<Kind> {
        let load = |conn: &mut Conn, pages: &[u64], digests: &mut Vec<u64>| -> io::Result<()> {
            memory
                .read_pages_from(conn.as_fd(), pages)
                .map_err(|e| match e {
                    vmig_kvm::KvmError::Io(e) => e,
                    // A page outside guest RAM.
                    e => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
                })?;
            for &number in pages {
                let bytes = memory.page_bytes(number).map_err(io::Error::other)?;
                digests.push(page_digest(bytes));
            }
            Ok(())
        };
        self.read_rest(0, [0u8; HEADER_SIZE], buf, Some(&load))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::ZERO_PAGE;
    use vmig_primitives::PageNumber;

    fn stream(records: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new());
        for (kind, payload) in records {
            w.write(*kind, &[payload]).unwrap();
        }
        w.inner
    }

    /// The checksum hashes its parts as one XXH3-64 stream: streams written before the hash
    /// crate changed still read.
    #[test]
    fn the_checksum_is_xxh3_64_of_its_parts_in_order() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (header, rest) = page.split_at(CHECKED);
        let (a, b) = rest.split_at(100);
        assert_eq!(checksum(header, &[a, b]), 0x7135_ffa5_04f1_bc71);
    }

    #[test]
    fn records_round_trip_with_sequence_and_length() {
        let bytes = stream(&[(Kind::Config, b"{}"), (Kind::PassEnd, &[1, 0, 0, 0])]);
        let mut r = RecordReader::new(&bytes[..], "test");
        assert_eq!(r.expect(Kind::Config).unwrap(), b"{}");
        assert_eq!(r.expect(Kind::PassEnd).unwrap(), [1, 0, 0, 0]);
        assert_eq!(r.bytes(), bytes.len() as u64);
    }

    /// How a reader named "t" refuses a stream, as the tests expect it.
    #[derive(Clone, Copy, Debug)]
    enum Refusal {
        /// The stream ends inside (or right at the start of) record `record`'s header.
        ShortHeader { record: u64 },
        /// The stream ends inside the `length` payload bytes of record `record`.
        ShortPayload { record: u64, length: u32 },
        /// A record carries sequence `got` where `expected` was due.
        Sequence { got: u64, expected: u64 },
        /// Record `record`'s header has these flags and this length, one of them out of range.
        FlagsOrLength {
            record: u64,
            flags: u16,
            length: u32,
        },
        /// Record `record` with this kind and length fails its checksum.
        Checksum { record: u64, kind: u16, length: u32 },
    }

    /// Asserts that `err` is exactly `expected`: the I/O error of a cut stream (with its
    /// message and `UnexpectedEof`), or the stream error with its whole message.
    fn assert_refusal(err: &MigrationError, expected: Refusal, context: &str) {
        let stream_says = |why: String| match err {
            MigrationError::Stream(message) => {
                assert_eq!(message, &format!("t: {why}"), "{context}")
            }
            other => panic!("{context}: `{other}` ({other:?}) where {expected:?} was expected"),
        };
        let io_says = |doing: String| match err {
            MigrationError::Io { what, source } => {
                assert_eq!(what, &format!("t: {doing}"), "{context}");
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof, "{context}");
            }
            other => panic!("{context}: `{other}` ({other:?}) where {expected:?} was expected"),
        };
        match expected {
            Refusal::ShortHeader { record } => io_says(format!(
                "reading record {record} (the peer closed or the stream is truncated)"
            )),
            Refusal::ShortPayload { record, length } => io_says(format!(
                "reading the {length} bytes of record {record} (the stream is truncated)"
            )),
            Refusal::Sequence { got, expected } => stream_says(format!(
                "record with sequence {got} where {expected} was expected: records were lost, repeated or reordered"
            )),
            Refusal::FlagsOrLength {
                record,
                flags,
                length,
            } => stream_says(format!(
                "record {record} has flags {flags:#x} and length {length}: expected flags 0 and at most {MAX_RECORD} bytes"
            )),
            Refusal::Checksum {
                record,
                kind,
                length,
            } => stream_says(format!(
                "record {record} (kind {kind}, {length} bytes) fails its checksum: the stream is corrupted"
            )),
        }
    }

    /// The refusal of a stream holding one record (sequence 0, `kind`, `length` payload bytes)
    /// with bit `bit` flipped, by the field the bit lands in: the sequence is checked first,
    /// then flags and length, then the checksum, which covers the kind, the length, the
    /// sequence and the payload. A flipped length bit that makes the record longer than the
    /// stream cuts it short, one that makes it longer than [`MAX_RECORD`] is refused as such,
    /// and one that makes it shorter fails the checksum (over the shorter record).
    fn flipped_bit_refusal(kind: Kind, length: u32, bit: usize) -> Refusal {
        let (kind, record) = (kind as u16, 0);
        match bit {
            0..16 => Refusal::Checksum {
                record,
                kind: kind ^ (1 << bit),
                length,
            },
            16..32 => Refusal::FlagsOrLength {
                record,
                flags: 1 << (bit - 16),
                length,
            },
            32..64 => match length ^ (1 << (bit - 32)) {
                flipped if flipped > MAX_RECORD => Refusal::FlagsOrLength {
                    record,
                    flags: 0,
                    length: flipped,
                },
                flipped if flipped > length => Refusal::ShortPayload {
                    record,
                    length: flipped,
                },
                flipped => Refusal::Checksum {
                    record,
                    kind,
                    length: flipped,
                },
            },
            64..128 => Refusal::Sequence {
                got: 1 << (bit - 64),
                expected: 0,
            },
            _ => Refusal::Checksum {
                record,
                kind,
                length,
            },
        }
    }

    /// Flips each bit of `bits` in `bytes` (one record) in turn and asserts the reader's exact
    /// refusal; returns how many flips gave each class (header cut short never happens).
    fn assert_flips_refused(
        bytes: &mut [u8],
        kind: Kind,
        bits: impl Iterator<Item = usize>,
    ) -> [usize; 4] {
        let length = u32::try_from(bytes.len() - HEADER_SIZE).unwrap();
        let mut classes = [0; 4];
        for bit in bits {
            bytes[bit / 8] ^= 1 << (bit % 8);
            let read = RecordReader::new(&bytes[..], "t").read();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let err = match read {
                Ok(record) => panic!(
                    "bit {bit} flipped unnoticed: read as {:?} of {} bytes",
                    record.kind,
                    record.payload.len()
                ),
                Err(err) => err,
            };
            let expected = flipped_bit_refusal(kind, length, bit);
            assert_refusal(&err, expected, &format!("bit {bit} flipped"));
            classes[match expected {
                Refusal::Checksum { .. } => 0,
                Refusal::Sequence { .. } => 1,
                Refusal::FlagsOrLength { .. } => 2,
                Refusal::ShortPayload { .. } | Refusal::ShortHeader { .. } => 3,
            }] += 1;
        }
        classes
    }

    /// Every single flipped bit of a record is refused with the error of the field it lands
    /// in: a payload, kind or checksum bit fails the checksum, a sequence bit is a sequence
    /// error, a flag bit a flags error, a length bit whichever its new length gives.
    #[test]
    fn every_flipped_bit_is_caught() {
        let mut bytes = stream(&[(Kind::DeviceData, b"device state bytes")]);
        let bits = 0..bytes.len() * 8;
        let classes = assert_flips_refused(&mut bytes, Kind::DeviceData, bits);
        // Checksum: 16 kind, 2 length (18 -> 16, 2), 64 checksum and 144 payload bits;
        // 64 sequence and 16 flag bits; 8 length bits past MAX_RECORD; 22 past the stream.
        assert_eq!(classes, [16 + 2 + 64 + 144, 64, 16 + 8, 22]);
    }

    /// Pass 1, two entries (page 7 with data, page 9 zero), then one page of data.
    fn pages_record() -> (Vec<u8>, Vec<u8>) {
        let mut entries = Vec::new();
        entries.extend_from_slice(&1u32.to_le_bytes());
        entries.extend_from_slice(&2u32.to_le_bytes());
        entries.extend_from_slice(&7u64.to_le_bytes());
        entries.extend_from_slice(&(9 | ZERO_PAGE).to_le_bytes());
        let data: Vec<u8> = (0..PAGE_BYTES)
            .map(|i| i.wrapping_mul(7).to_le_bytes()[0])
            .collect();
        (entries, data)
    }

    /// A `Pages` record's checksum covers all but its pages' data, which each page's digest
    /// checks: every flipped bit of header, entries and digest is refused with the error of the
    /// field it lands in (the checksum for every entry and digest bit), every flipped data bit
    /// leaves the record whole and its page torn, and a writer refuses a `Pages` record that
    /// is not entries then whole pages.
    #[test]
    fn a_pages_record_checks_its_pages_through_their_digests_and_every_flipped_bit_is_caught() {
        let (entries, data) = pages_record();
        let mut w = RecordWriter::new(Vec::new());
        w.write(Kind::Pages, &[&entries, &data]).unwrap();
        let mut bytes = w.inner;
        let digest = page_digest(&data).to_le_bytes();
        let mut r = RecordReader::new(&bytes[..], "t");
        let record = r.read().unwrap();
        assert_eq!(record.payload, [&entries[..], &digest, &data].concat());
        assert_eq!(r.page_digests(), [page_digest(&data)]);
        assert!(r.torn_pages().is_empty());
        let checked = HEADER_SIZE + entries.len() + digest.len();
        let classes = assert_flips_refused(&mut bytes, Kind::Pages, 0..checked * 8);
        // Length 4128 = 0x1020: bits 5 and 12 shorten it (to 4096 and 32).
        let payload_bits = (entries.len() + digest.len()) * 8;
        assert_eq!(classes, [16 + 2 + 64 + payload_bits, 64, 16 + 8, 22]);
        for bit in checked * 8..bytes.len() * 8 {
            bytes[bit / 8] ^= 1 << (bit % 8);
            let mut r = RecordReader::new(&bytes[..], "t");
            let read = r.read();
            assert!(read.is_ok(), "data bit {bit}: {read:?}");
            assert_eq!(r.torn_pages(), [7], "data bit {bit}");
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        // A writer refuses a Pages record that is not entries then whole pages.
        let mut w = RecordWriter::new(Vec::new());
        let refusals = [
            w.write(Kind::Pages, &[&entries, &data[1..]]),
            w.write(Kind::Pages, &[&entries[..16], &data]),
            w.write(Kind::Pages, &[&[&entries[..], &data[..]].concat()]),
            w.send_pages(
                1,
                &[PageEntry::new(PageNumber(7), false)],
                &[],
                &[&data],
                &[],
            ),
        ];
        for err in refusals.map(io::Result::unwrap_err) {
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(
                err.to_string(),
                "a Pages record is written as pass, count and entries; one digest and 4 KiB for each whole page; then its sparse section"
            );
        }
        assert_eq!(w.bytes(), 0);
    }

    /// A stream cut at any byte, inside a header or inside a payload (one byte short of a
    /// whole record included), yields the records before the cut and then the I/O error that
    /// says which record and which part was cut; records lost or repeated are sequence errors.
    #[test]
    fn truncated_reordered_and_repeated_streams_are_refused() {
        let (entries, data) = pages_record();
        let records: [(Kind, Vec<u8>); 4] = [
            (Kind::Config, br#"{"cpus":2}"#.to_vec()),
            (Kind::Ready, Vec::new()),
            (Kind::DeviceData, b"device state bytes".to_vec()),
            (
                Kind::Pages,
                [&entries[..], &page_digest(&data).to_le_bytes(), &data[..]].concat(),
            ),
        ];
        let mut w = RecordWriter::new(Vec::new());
        let mut ends = Vec::new();
        for (kind, payload) in &records {
            match kind {
                Kind::Pages => w.write(*kind, &[&entries, &data]).unwrap(),
                _ => w.write(*kind, &[payload]).unwrap(),
            }
            ends.push(usize::try_from(w.bytes()).unwrap());
        }
        let bytes = w.inner;
        for cut in 0..=bytes.len() {
            let context = format!("cut at {cut} of {}", bytes.len());
            let mut r = RecordReader::new(&bytes[..cut], "t");
            let mut start = 0;
            // Cut after the last record: the next header is missing.
            let mut expected = Refusal::ShortHeader {
                record: records.len() as u64,
            };
            for (record, ((kind, payload), &end)) in (0..).zip(records.iter().zip(&ends)) {
                if cut < end {
                    expected = if cut < start + HEADER_SIZE {
                        Refusal::ShortHeader { record }
                    } else {
                        let length = u32::try_from(payload.len()).unwrap();
                        Refusal::ShortPayload { record, length }
                    };
                    break;
                }
                let got = r
                    .read()
                    .unwrap_or_else(|e| panic!("{context}: record {record}: {e}"));
                assert_eq!((got.kind, &got.payload), (*kind, payload), "{context}");
                start = end;
            }
            assert_refusal(&r.read().unwrap_err(), expected, &context);
        }
        let a = stream(&[(Kind::Config, b"a"), (Kind::Ready, b"")]);
        let first = HEADER_SIZE + 1;
        // The second record alone: sequence 1 where 0 is expected.
        let err = RecordReader::new(&a[first..], "t").read().unwrap_err();
        assert_refusal(
            &err,
            Refusal::Sequence {
                got: 1,
                expected: 0,
            },
            "reordered",
        );
        // The first record twice.
        let mut twice = a[..first].to_vec();
        twice.extend_from_slice(&a[..first]);
        let mut r = RecordReader::new(&twice[..], "t");
        r.read().unwrap();
        let err = r.read().unwrap_err();
        assert_refusal(
            &err,
            Refusal::Sequence {
                got: 0,
                expected: 1,
            },
            "repeated",
        );
    }

    #[test]
    fn unexpected_kind_and_abort_say_what_happened() {
        let bytes = stream(&[(Kind::Ready, b""), (Kind::Abort, b"no room")]);
        let mut r = RecordReader::new(&bytes[..], "main");
        let err = r.expect(Kind::Config).unwrap_err().to_string();
        assert!(err.contains("Ready record where Config"), "{err}");
        let err = r.expect(Kind::Config).unwrap_err().to_string();
        assert!(err.contains("refused") && err.contains("no room"), "{err}");
    }

    #[test]
    fn oversized_and_flagged_records_are_refused() {
        let mut bytes = stream(&[(Kind::Ready, b"")]);
        bytes[4..8].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        let err = RecordReader::new(&bytes[..], "t").read().unwrap_err();
        let oversized = Refusal::FlagsOrLength {
            record: 0,
            flags: 0,
            length: MAX_RECORD + 1,
        };
        assert_refusal(&err, oversized, "a record one byte over the limit");
        let mut bytes = stream(&[(Kind::Ready, b"")]);
        bytes[2] = 1;
        let err = RecordReader::new(&bytes[..], "t").read().unwrap_err();
        let flagged = Refusal::FlagsOrLength {
            record: 0,
            flags: 1,
            length: 0,
        };
        assert_refusal(&err, flagged, "a record with a flag set");
    }

    /// A record whose checksum holds but whose kind is 0 (no kind) or unknown is refused,
    /// saying which kinds there are.
    #[test]
    fn kind_zero_and_unknown_kinds_are_refused_saying_what_is_expected() {
        for raw_kind in [0u16, 17, u16::MAX] {
            let mut head = RecordHead {
                kind: raw_kind.into(),
                flags: 0.into(),
                length: 0.into(),
                sequence: 0.into(),
                checksum: 0.into(),
            };
            head.checksum = checksum(head.as_bytes(), &[]).into();
            let err = RecordReader::new(head.as_bytes(), "t").read().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "migration stream: t: record 0 has unknown kind {raw_kind}: expected 1 to 16"
                )
            );
        }
    }

    /// A `Pages` record whose pages go from the socket straight into guest RAM.
    fn pages_into_memory(
        entries: &[u64],
        data: &[u8],
        damage: impl FnOnce(&mut Vec<u8>),
    ) -> (Result<Kind>, Vec<u8>, GuestMemory, Vec<u64>) {
        let layout = vmig_kvm::memory::MemoryLayout::new(16 << 20, 2 << 20).unwrap();
        let memory = GuestMemory::new(&layout).unwrap();
        let mut head = Vec::new();
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&u32::try_from(entries.len()).unwrap().to_le_bytes());
        for e in entries {
            head.extend_from_slice(&e.to_le_bytes());
        }
        let mut w = RecordWriter::new(Vec::new());
        w.write(Kind::Pages, &[&head, data]).unwrap();
        let mut bytes = w.inner;
        damage(&mut bytes);
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut theirs, &bytes).unwrap();
        drop(theirs);
        let mut r = RecordReader::new(Conn::Unix(ours), "t");
        let mut buf = Vec::new();
        let got = r.read_into_memory(&mut buf, &memory);
        if got.is_ok() {
            assert_eq!(r.page_digests().len(), data.len() / PAGE_BYTES);
        }
        (got, buf, memory, r.torn_pages().to_vec())
    }

    fn page_at(memory: &GuestMemory, page: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; PAGE_BYTES];
        memory
            .read(PageNumber(page).guest_address(), &mut bytes)
            .unwrap();
        bytes
    }

    /// The destination's way of reading pages: their data lands at their pages in guest RAM
    /// (two neighbours and one apart, around a zero page that is not touched), the buffer holds
    /// the pass, count and entries, and the checksum is taken over the pages in RAM, so a bit
    /// flipped on the way is caught. A page outside RAM is refused before anything is read, a
    /// cut record is the truncation it is, and data that is not one page per entry is refused.
    #[test]
    fn a_pages_record_is_read_straight_into_guest_ram_and_checked_there() {
        let (a, b, c) = (0x300u64, 0x301u64, 0x380u64);
        let data: Vec<u8> = [
            crate::stream::record::tests::page(),
            vec![0xab; PAGE_BYTES],
            vec![7; PAGE_BYTES],
        ]
        .concat();
        let entries = [a, b, 0x302 | ZERO_PAGE, c];
        let (kind, buf, memory, torn) = pages_into_memory(&entries, &data, |_| {});
        assert_eq!(kind.unwrap(), Kind::Pages);
        assert!(torn.is_empty());
        let (pass, decoded, rest) = Record::decode_pages_head(&buf).unwrap();
        assert_eq!((pass, decoded.len(), rest.len()), (3, 4, 3 * 8));
        for (page, bytes) in [a, b, c].into_iter().zip(data.chunks(PAGE_BYTES)) {
            assert_eq!(page_at(&memory, page), bytes);
        }
        assert_eq!(page_at(&memory, 0x302), vec![0u8; PAGE_BYTES]);

        // A bit of the last page's data flipped on the way: the record holds, the page is
        // torn. A bit of an entry or a digest: the record fails its checksum.
        let flip = |at: usize| {
            move |bytes: &mut Vec<u8>| {
                let at = if at == 0 { bytes.len() - 100 } else { at };
                bytes[at] ^= 4;
            }
        };
        let (kind, _, memory, torn) = pages_into_memory(&entries, &data, flip(0));
        assert_eq!(kind.unwrap(), Kind::Pages);
        assert_eq!(torn, [c]);
        assert_ne!(page_at(&memory, c), data[2 * PAGE_BYTES..]);
        for at in [HEADER_SIZE + 8, HEADER_SIZE + 8 + 4 * 8 + 9] {
            let err = pages_into_memory(&entries, &data, flip(at))
                .0
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("record 0 (kind 3, 12352 bytes) fails its checksum"),
                "{err}"
            );
        }

        let beyond = [a, 1 << 30];
        let err = pages_into_memory(&beyond, &data[..2 * PAGE_BYTES], |_| {})
            .0
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration stream: t: record 0: page 0x40000000 is beyond guest RAM"
        );

        let cut = |bytes: &mut Vec<u8>| bytes.truncate(bytes.len() - 10);
        let (got, _, memory, _) = pages_into_memory(&entries, &data, cut);
        let err = got.unwrap_err().to_string();
        assert!(
            err.contains(
                "t: reading the 12352 bytes of record 0 into guest RAM (the stream is truncated)"
            ),
            "{err}"
        );
        assert_eq!(
            page_at(&memory, a),
            data[..PAGE_BYTES],
            "the pages before the cut are in"
        );

        let err = pages_into_memory(&[a, b, c], &data[..2 * PAGE_BYTES], |_| {})
            .0
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration stream: a Pages record lists 3 whole pages and carries 8208 bytes after its entries: expected 8 bytes of digest and 4096 bytes of data for each, then its sparse section"
        );
    }
}
