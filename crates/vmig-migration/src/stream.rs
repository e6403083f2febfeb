//! The migration stream: a hello on each connection, then typed, length-prefixed, sequenced and
//! checksummed records.
//!
//! ```text
//! hello (32 bytes, each connection, source → destination):
//!   magic "VMIGSTRM" | version u32 | channel u16 | channels u16 | session u64 | reserved u64
//! record (each direction):
//!   kind u16 | flags u16 (0) | length u32 | sequence u64 | checksum u64 | payload[length]
//! ```
//!
//! All integers are little-endian. `sequence` counts the records of one direction of one
//! connection from 0, so a record lost, repeated or moved is found at once; `checksum` is XXH3
//! over the header's first 16 bytes and the payload, so a flipped bit anywhere is found. In a
//! `Pages` record each page's data enters the checksum as its XXH3 digest: the destination
//! keeps those digests for verification anyway, so it reads each page once for both. A
//! version other than [`VERSION`] is refused, as is an unknown kind, a length over
//! [`MAX_RECORD`], a flag, and any record the protocol does not expect where it comes (the
//! callers check that).

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{MigrationError, Result, io_error};

/// Hello magic.
pub const MAGIC: [u8; 8] = *b"VMIGSTRM";
/// The stream version this build speaks (2: `Pages` checksums cover page digests).
pub const VERSION: u32 = 2;
/// Largest record payload.
pub const MAX_RECORD: u32 = 16 << 20;
/// Bytes of a hello.
pub const HELLO_SIZE: usize = 32;
/// Bytes of a record header.
pub const HEADER_SIZE: usize = 24;
/// Bit 63 of a page entry: the page is all zeros and has no data in the record.
pub const ZERO_PAGE: u64 = 1 << 63;

/// The first bytes of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// This connection's index (0 is the main connection).
    pub channel: u16,
    /// Connections in this migration.
    pub channels: u16,
    /// Random number shared by the connections of one migration.
    pub session: u64,
}

impl Hello {
    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_SIZE] {
        let mut b = [0u8; HELLO_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..14].copy_from_slice(&self.channel.to_le_bytes());
        b[14..16].copy_from_slice(&self.channels.to_le_bytes());
        b[16..24].copy_from_slice(&self.session.to_le_bytes());
        b
    }

    /// Parses and checks a hello.
    pub fn decode(b: &[u8; HELLO_SIZE]) -> Result<Self> {
        if b[0..8] != MAGIC {
            return Err(MigrationError::Stream(format!(
                "the peer did not start with the vmig magic \"VMIGSTRM\" (got {:02x?}): not a vmig migration stream",
                &b[0..8]
            )));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(MigrationError::Stream(format!(
                "stream version {version}: this vmig speaks version {VERSION} only"
            )));
        }
        let hello = Self {
            channel: u16::from_le_bytes([b[12], b[13]]),
            channels: u16::from_le_bytes([b[14], b[15]]),
            session: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
        };
        if hello.channels == 0 || hello.channel >= hello.channels || b[24..32] != [0; 8] {
            return Err(MigrationError::Stream(format!(
                "hello of channel {} of {} (reserved {:02x?}): expected a channel below a non-zero count and zero reserved bytes",
                hello.channel,
                hello.channels,
                &b[24..32]
            )));
        }
        Ok(hello)
    }

    /// Reads a hello from `r`.
    pub fn read(r: &mut impl Read) -> Result<Self> {
        let mut b = [0u8; HELLO_SIZE];
        r.read_exact(&mut b)
            .map_err(io_error("reading the connection's hello"))?;
        Self::decode(&b)
    }
}

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: the VM's configuration and devices (JSON).
    Config = 1,
    /// Destination → source: the configuration is accepted, the destination is ready.
    Ready = 2,
    /// A batch of pages: pass u32, count u32, count entries u64 (page number | [`ZERO_PAGE`]),
    /// then 4 KiB of data per non-zero page.
    Pages = 3,
    /// End of a pass over memory on this connection: pass u32.
    PassEnd = 4,
    /// Device state: device u32, then a chunk as the device produced it.
    DeviceData = 5,
    /// End of a device's state: device u32, bytes u64, XXH3 of all its chunks u64.
    DeviceEnd = 6,
    /// Every vCPU's state (JSON).
    VcpuState = 7,
    /// Page digests: first page u64, count u32, count digests u64.
    Digests = 8,
    /// Source → destination: everything is sent; verify and load.
    Complete = 9,
    /// Destination → source: verified and loaded; waiting for the commit.
    Accepted = 10,
    /// Source → destination: resume the VM; the source will never resume.
    Commit = 11,
    /// Destination → source: the VM runs on the destination.
    Resumed = 12,
    /// Destination → source: what the checks after resuming found (JSON).
    Result = 13,
    /// Either way: the migration stops; reason as UTF-8.
    Abort = 14,
}

impl Kind {
    fn from_u16(value: u16) -> Option<Self> {
        use Kind::*;
        [
            Config, Ready, Pages, PassEnd, DeviceData, DeviceEnd, VcpuState, Digests, Complete,
            Accepted, Commit, Resumed, Result, Abort,
        ]
        .into_iter()
        .find(|k| *k as u16 == value)
    }
}

/// Bytes of a page in a `Pages` record.
const PAGE_BYTES: usize = 4096;

pub use vmig_primitives::page_digest;

/// The checksum of a `Pages` record: its header, its entries, then each page's digest.
fn pages_checksum(header: &[u8], entries: &[u8], digests: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[..16]);
    h.update(entries);
    for digest in digests {
        h.update(&digest.to_le_bytes());
    }
    h.digest()
}

/// A `Pages` payload split into pass, count and entries, and the pages' data; `None` unless
/// the data is whole pages.
fn split_pages(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let entries = entries_len(payload)?;
    let data = payload.len().checked_sub(entries)?;
    data.is_multiple_of(PAGE_BYTES)
        .then(|| payload.split_at(entries))
}

/// Bytes of a `Pages` payload's pass, count and entries, from its count.
fn entries_len(payload: &[u8]) -> Option<usize> {
    let count = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?) as usize;
    count.checked_mul(8)?.checked_add(8)
}

fn checksum(header: &[u8], payload: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[..16]);
    for part in payload {
        h.update(part);
    }
    h.digest()
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

    /// Writes a record whose payload is the concatenation of `parts` (for `Pages`: the pass,
    /// count and entries, then the pages' data).
    pub fn write(&mut self, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        if length > MAX_RECORD as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("record of {length} bytes exceeds {MAX_RECORD}"),
            ));
        }
        let mut header = [0u8; HEADER_SIZE];
        header[0..2].copy_from_slice(&(kind as u16).to_le_bytes());
        header[4..8].copy_from_slice(&(length as u32).to_le_bytes());
        header[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        let sum = match (kind, parts) {
            (Kind::Pages, [entries, data])
                if entries_len(entries) == Some(entries.len())
                    && data.len().is_multiple_of(PAGE_BYTES) =>
            {
                let digests: Vec<u64> = data.chunks_exact(PAGE_BYTES).map(page_digest).collect();
                pages_checksum(&header, entries, &digests)
            }
            (Kind::Pages, _) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a Pages record is written as two parts: pass, count and entries; then whole pages",
                ));
            }
            _ => checksum(&header, parts),
        };
        header[16..24].copy_from_slice(&sum.to_le_bytes());
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(io::IoSlice::new(&header));
        slices.extend(parts.iter().map(|p| io::IoSlice::new(p)));
        write_all_vectored(&mut self.inner, &mut slices)?;
        self.sequence += 1;
        self.bytes += (HEADER_SIZE + length) as u64;
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

/// A record as read.
#[derive(Debug)]
pub struct Record {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Reads records from one connection (one direction), checking sequence and checksum.
#[derive(Debug)]
pub struct RecordReader<R: Read> {
    inner: R,
    sequence: u64,
    bytes: u64,
    what: String,
    page_digests: Vec<u64>,
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
        }
    }

    /// Reads the next record into `buf` (reused across calls), returning its kind and length.
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<Kind> {
        let mut header = [0u8; HEADER_SIZE];
        self.inner.read_exact(&mut header).map_err(|e| {
            let what = format!(
                "{}: reading record {} (the peer closed or the stream is truncated)",
                self.what, self.sequence
            );
            io_error(what)(e)
        })?;
        let raw_kind = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let length = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let sequence = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        let bad = |why: String| MigrationError::Stream(format!("{}: {why}", self.what));
        if sequence != self.sequence {
            return Err(bad(format!(
                "record with sequence {sequence} where {} was expected: records were lost, repeated or reordered",
                self.sequence
            )));
        }
        if flags != 0 || length > MAX_RECORD {
            return Err(bad(format!(
                "record {sequence} has flags {flags:#x} and length {length}: expected flags 0 and at most {MAX_RECORD} bytes"
            )));
        }
        buf.clear();
        buf.resize(length as usize, 0);
        self.inner.read_exact(buf).map_err(|e| {
            io_error(format!(
                "{}: reading the {length} bytes of record {sequence} (the stream is truncated)",
                self.what
            ))(e)
        })?;
        let intact = if raw_kind == Kind::Pages as u16 {
            self.page_digests.clear();
            split_pages(buf).is_some_and(|(entries, data)| {
                self.page_digests
                    .extend(data.chunks_exact(PAGE_BYTES).map(page_digest));
                pages_checksum(&header, entries, &self.page_digests) == sum
            })
        } else {
            checksum(&header, &[buf]) == sum
        };
        if !intact {
            return Err(bad(format!(
                "record {sequence} (kind {raw_kind}, {length} bytes) fails its checksum: the stream is corrupted"
            )));
        }
        let kind = Kind::from_u16(raw_kind)
            .ok_or_else(|| bad(format!("record {sequence} has unknown kind {raw_kind}")))?;
        self.sequence += 1;
        self.bytes += (HEADER_SIZE as u64) + u64::from(length);
        Ok(kind)
    }

    /// The digest of each page of the last record read, when it was `Pages` (in the order of
    /// its data).
    pub fn page_digests(&self) -> &[u64] {
        &self.page_digests
    }

    /// Reads the next record.
    pub fn read(&mut self) -> Result<Record> {
        let mut payload = Vec::new();
        let kind = self.read_into(&mut payload)?;
        Ok(Record { kind, payload })
    }

    /// Reads the next record, which must be of `kind` (an `Abort` from the peer is reported as
    /// a refusal with the peer's reason).
    pub fn expect(&mut self, kind: Kind) -> Result<Vec<u8>> {
        let record = self.read()?;
        if record.kind == kind {
            return Ok(record.payload);
        }
        if record.kind == Kind::Abort {
            return Err(MigrationError::Refused(
                String::from_utf8_lossy(&record.payload).into_owned(),
            ));
        }
        Err(MigrationError::Stream(format!(
            "{}: a {:?} record where {kind:?} was expected",
            self.what, record.kind
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
        self.bytes += chunk.len() as u64;
        self.hash.update(&(chunk.len() as u64).to_le_bytes());
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

/// Reads little-endian integers from a payload, with errors naming the record.
#[derive(Debug)]
pub struct Fields<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// Fields of `data`, a payload of record `what`.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(MigrationError::Stream(format!(
                "{} record is {} bytes short",
                self.what,
                n - self.data.len()
            )));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    /// The next `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().unwrap_or_default(),
        ))
    }

    /// The next `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().unwrap_or_default(),
        ))
    }

    /// The rest.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }

    /// An error unless every byte was read.
    pub fn end(self) -> Result<()> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(MigrationError::Stream(format!(
                "{} record has {} bytes too many",
                self.what,
                self.data.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(records: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new());
        for (kind, payload) in records {
            w.write(*kind, &[payload]).unwrap();
        }
        w.inner
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
        let length = (bytes.len() - HEADER_SIZE) as u32;
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
        let data: Vec<u8> = (0..PAGE_BYTES).map(|i| (i * 7) as u8).collect();
        (entries, data)
    }

    /// A `Pages` record's checksum covers its pages through their digests: every flipped bit
    /// of header, entries and page data is refused with the error of the field it lands in
    /// (the checksum for every entry and data bit), and a writer refuses a `Pages` record that
    /// is not entries then whole pages.
    #[test]
    fn a_pages_record_checks_its_pages_through_their_digests_and_every_flipped_bit_is_caught() {
        let (entries, data) = pages_record();
        let mut w = RecordWriter::new(Vec::new());
        w.write(Kind::Pages, &[&entries, &data]).unwrap();
        let mut bytes = w.inner;
        let mut r = RecordReader::new(&bytes[..], "t");
        let record = r.read().unwrap();
        assert_eq!(record.payload, [entries.clone(), data.clone()].concat());
        assert_eq!(r.page_digests(), [page_digest(&data)]);
        let bits = 0..bytes.len() * 8;
        let classes = assert_flips_refused(&mut bytes, Kind::Pages, bits);
        // Length 4120 = 0x1018: bits 3, 4 and 12 shorten it (to 4112, 4104 and 24).
        let payload_bits = (entries.len() + data.len()) * 8;
        assert_eq!(classes, [16 + 3 + 64 + payload_bits, 64, 16 + 8, 21]);
        // A writer refuses a Pages record that is not entries then whole pages.
        let mut w = RecordWriter::new(Vec::new());
        let refusals = [
            w.write(Kind::Pages, &[&entries, &data[1..]]),
            w.write(Kind::Pages, &[&entries[..16], &data]),
            w.write(Kind::Pages, &[&[&entries[..], &data[..]].concat()]),
        ];
        for err in refusals.map(io::Result::unwrap_err) {
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(
                err.to_string(),
                "a Pages record is written as two parts: pass, count and entries; then whole pages"
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
            (Kind::Pages, [&entries[..], &data[..]].concat()),
        ];
        let mut w = RecordWriter::new(Vec::new());
        let mut ends = Vec::new();
        for (kind, payload) in &records {
            match kind {
                Kind::Pages => w.write(*kind, &[&entries, &data]).unwrap(),
                _ => w.write(*kind, &[payload]).unwrap(),
            }
            ends.push(w.bytes() as usize);
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
                        let length = payload.len() as u32;
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
    fn hellos_check_magic_version_and_channel() {
        let hello = Hello {
            channel: 1,
            channels: 2,
            session: 7,
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let mut b = hello.encode();
        b[0] = b'X';
        assert!(Hello::decode(&b).unwrap_err().to_string().contains("magic"));
        let mut b = hello.encode();
        b[8] = 9;
        assert!(
            Hello::decode(&b)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let bad = Hello {
            channel: 2,
            channels: 2,
            session: 7,
        };
        assert!(Hello::decode(&bad.encode()).is_err());
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
}
