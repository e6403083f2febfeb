//! The property of the `stream` fuzz target, shared with its stable twin
//! (`crates/vmig-migration/tests/stream_fuzz.rs`): any bytes, as one connection of a migration
//! stream read the way the destination reads one (the hello by `Hello::read`, then each record
//! by a `RecordReader` over the bytes, taken by the receiver's state table, `Receiver::step`,
//! and decoded by `Record::decode`), end in records taken and then one clear error, never a
//! panic. On the way:
//!
//! - a hello accepted re-encodes to the bytes it came as, with a channel below its count;
//! - the receiver moves only along its table (`Receiver::next`), to a state `State::ALL` lists,
//!   and a record the table refuses leaves the state as it was;
//! - a record decoded has the kind its header said, and encodes again to what it came as (the
//!   same bytes for binary payloads, the same JSON value for JSON ones);
//! - every error says something (a non-empty message).
//!
//! The first byte of an input says how the rest is read: even, as the connection's bytes as
//! they come; odd, as a script that [`build`] turns into a connection of well-framed records
//! (sequence numbers and checksums right, so that inputs reach the decoders and the state
//! table), corrupted where the script says. Includes `crate::script`.

use vmig_kvm::VmConfig;
use vmig_migration::MigrationError;
use vmig_migration::report::Verification;
use vmig_migration::stream::{
    DeviceData, DeviceEnd, Digests, Hello, Kind, MigrationConfig, PageEntry, Pages, Receiver,
    Record, RecordReader, RecordWriter, State,
};
use vmig_primitives::{PAGE_BYTES, PageNumber};
use zerocopy::little_endian::U64;

use crate::script::Script;

/// How reading an input ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum End {
    /// The hello was refused.
    #[default]
    Hello,
    /// A record's framing was refused (cut short, sequence, flags, length, checksum, kind), or
    /// the bytes ended where the next record begins.
    Framing,
    /// The state table refused a record.
    StateTable,
    /// A record's payload did not decode.
    Decode,
}

/// What one input did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Records taken by the receiver and decoded.
    pub records: usize,
    /// The states the receiver was in, a bit for each by its index in `State::ALL`.
    pub states: u16,
    /// How it ended.
    pub end: End,
}

/// The bit of `state` in [`Outcome::states`].
pub fn state_bit(state: State) -> u16 {
    let index = State::ALL.iter().position(|s| *s == state);
    1 << index.expect("State::ALL lists every state")
}

/// Checks one input (the fuzz target's body).
pub fn check(data: &[u8]) -> Outcome {
    match data.split_first() {
        Some((mode, script)) if mode & 1 == 1 => connection(&build(script)),
        Some((_, bytes)) => connection(bytes),
        None => connection(&[]),
    }
}

/// Asserts that `error` says something.
fn clear(error: &MigrationError) {
    let text = error.to_string();
    assert!(
        !text.trim().is_empty(),
        "an error that says nothing: {error:?}"
    );
}

/// Reads `bytes` as the destination reads one connection, asserting the property.
pub fn connection(bytes: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let mut rest = bytes;
    let hello = match Hello::read(&mut rest) {
        Ok(hello) => hello,
        Err(error) => {
            clear(&error);
            return outcome;
        }
    };
    assert!(
        hello.channel < hello.channels,
        "a hello accepted with channel {} of {}",
        hello.channel,
        hello.channels
    );
    assert_eq!(
        hello.encode()[..],
        bytes[..bytes.len() - rest.len()],
        "an accepted hello re-encodes to its bytes"
    );
    let mut receiver = if hello.channel == 0 {
        let mut receiver = Receiver::new(State::AwaitingHello, "fuzz");
        outcome.states |= state_bit(receiver.state());
        receiver.hello().expect("a first hello is taken");
        receiver
    } else {
        Receiver::new(State::PageConnection, "fuzz")
    };
    outcome.states |= state_bit(receiver.state());
    let mut reader = RecordReader::new(rest, "fuzz");
    let mut payload = Vec::new();
    loop {
        let kind = match reader.read_into(&mut payload) {
            Ok(kind) => kind,
            Err(error) => {
                clear(&error);
                outcome.end = End::Framing;
                return outcome;
            }
        };
        let before = receiver.state();
        match receiver.step(kind) {
            Ok(after) => {
                assert_eq!(
                    Some(after),
                    Receiver::next(before, kind),
                    "{before:?} {kind:?}"
                );
                assert!(State::ALL.contains(&after), "{after:?} is not in the table");
                assert_eq!(receiver.state(), after);
                outcome.states |= state_bit(after);
            }
            Err(error) => {
                assert_eq!(Receiver::next(before, kind), None, "{before:?} {kind:?}");
                assert_eq!(receiver.state(), before, "a refused record moved the state");
                clear(&error);
                outcome.end = End::StateTable;
                return outcome;
            }
        }
        match Record::decode(kind, &payload) {
            Ok(record) => {
                assert_eq!(record.kind(), kind);
                encodes_again(&record, &payload);
                outcome.records += 1;
            }
            Err(error) => {
                clear(&error);
                outcome.end = End::Decode;
                return outcome;
            }
        }
    }
}

/// The payload `record` is written with, read back through a writer and a reader.
fn written(record: &Record<'_>) -> Vec<u8> {
    let mut writer = RecordWriter::new(Vec::new());
    writer.send(record).expect("a decoded record encodes");
    let mut reader = RecordReader::new(&writer.get_ref()[..], "again");
    let mut payload = Vec::new();
    let kind = reader
        .read_into(&mut payload)
        .expect("a written record reads back");
    assert_eq!(kind, record.kind());
    payload
}

/// Asserts that `record`, decoded from `payload`, encodes to what it came as.
fn encodes_again(record: &Record<'_>, payload: &[u8]) {
    let again = written(record);
    match record {
        Record::Config(_) | Record::VcpuState(_) | Record::Result(_) => {
            let value = |bytes: &[u8]| -> serde_json::Value {
                serde_json::from_slice(bytes).expect("a decoded JSON record is JSON")
            };
            // What came may have had other spacing or members the record ignores: its
            // encoding, decoded and encoded once more, is the same JSON value.
            let decoded = Record::decode(record.kind(), &again).expect("its encoding decodes");
            assert_eq!(
                value(&written(&decoded)),
                value(&again),
                "{:?}",
                record.kind()
            );
        }
        Record::Abort(reason) => {
            if let Ok(text) = std::str::from_utf8(payload) {
                assert_eq!(text, reason);
                assert_eq!(again, payload);
            }
        }
        _ => assert_eq!(
            again,
            payload,
            "{:?} re-encodes to its bytes",
            record.kind()
        ),
    }
}

/// A connection made from `script`: a hello (its channel, count and session from the script,
/// a byte of it replaced when the script says), then records, each either a typical record
/// of a kind or a kind with payload bytes from the script, all framed right; then the
/// script's corruptions (bits flipped) and its cut.
pub fn build(script: &[u8]) -> Vec<u8> {
    let mut script = Script::new(script);
    let channels = 1 + u16::from(script.byte() % 4);
    let hello = Hello {
        channel: u16::try_from(script.below(usize::from(channels))).unwrap_or(0),
        channels,
        session: script.u64(),
    };
    let mut out = hello.encode().to_vec();
    if script.byte() % 16 == 15 {
        let at = script.below(out.len());
        out[at] = script.byte();
    }
    let mut writer = RecordWriter::new(out);
    let mut flips = Vec::new();
    let mut cut = None;
    // Each record is an operation byte, a kind, and a block of parameters (its length, then
    // its bytes; zeros past its end), so that a script's records stay apart however each
    // reads its parameters.
    while !script.is_empty() {
        let operation = script.byte() % 8;
        if operation >= 6 {
            let at = script.u32();
            match operation {
                6 => flips.push((at, script.byte() % 8)),
                _ => cut = Some(at),
            }
            continue;
        }
        let kind = script.pick(&Kind::ALL);
        let len = usize::from(script.byte());
        let mut parameters = Script::new(script.take(len));
        match operation {
            // Mostly typical records, so that scripts walk the state table.
            0..=4 => typical(&mut writer, kind, &mut parameters),
            _ => {
                let payload = parameters.take(len);
                // A Pages record must be written as entries then whole pages: these bytes,
                // as entries, with no data.
                let _ = match kind {
                    Kind::Pages => writer.write(kind, &[payload, &[]]),
                    _ => writer.write(kind, &[payload]),
                };
            }
        }
    }
    let mut out = writer.get_ref().clone();
    for (at, bit) in flips {
        let len = out.len();
        if let Some(byte) = usize::try_from(at)
            .ok()
            .and_then(|at| out.get_mut(at % len))
        {
            *byte ^= 1 << bit;
        }
    }
    if let Some(at) = cut.and_then(|at| usize::try_from(at).ok()) {
        out.truncate(at % (out.len() + 1));
    }
    out
}

/// Writes a record of `kind` as a source would send it, its numbers from `script`.
fn typical(writer: &mut RecordWriter<Vec<u8>>, kind: Kind, script: &mut Script<'_>) {
    let data: Vec<u8> = (0..PAGE_BYTES).map(|i| i.to_le_bytes()[0]).collect();
    let send = |writer: &mut RecordWriter<Vec<u8>>, record: Record<'_>| {
        writer.send(&record).expect("a typical record encodes");
    };
    match kind {
        Kind::Config => {
            let config = MigrationConfig {
                vm: VmConfig::default(),
                devices: Vec::new(),
                verify_memory: script.flag(),
            };
            let record = Record::Config(Box::new(config));
            if script.byte() % 4 == 3 {
                // Its JSON with one byte replaced.
                let mut payload = written(&record);
                let at = script.below(payload.len());
                payload[at] = script.byte();
                let _ = writer.write(kind, &[&payload]);
            } else {
                send(writer, record);
            }
        }
        Kind::Pages => {
            let count = script.below(4);
            let entries: Vec<PageEntry> = (0..count)
                .map(|_| {
                    let page = PageNumber(u64::from(script.u16()));
                    match script.byte() % 3 {
                        0 => PageEntry::new(page, true),
                        1 => PageEntry::sparse(page),
                        _ => PageEntry::new(page, false),
                    }
                })
                .collect();
            let pages = entries.iter().filter(|e| e.is_whole()).count();
            // Each whole page's digest, or one it does not have: a page torn on the way.
            let digests: Vec<U64> = (0..pages)
                .map(|_| {
                    let digest = vmig_primitives::page_digest(&data);
                    U64::new(if script.flag() { digest } else { !digest })
                })
                .collect();
            let data = data.repeat(pages);
            // One word for each sparse page: count 1, index below 512, a value.
            let mut sparse = Vec::new();
            for _ in entries.iter().filter(|e| e.is_sparse()) {
                sparse.extend_from_slice(&1u16.to_le_bytes());
                sparse.extend_from_slice(&(script.u16() % 512).to_le_bytes());
                sparse.extend_from_slice(&u64::from(script.u16()).to_le_bytes());
            }
            let pass = u32::from(script.byte() % 4);
            send(
                writer,
                Record::Pages(Pages {
                    pass,
                    entries: &entries,
                    digests: &digests,
                    data: &data,
                    sparse: &sparse,
                }),
            );
        }
        Kind::PassEnd => send(
            writer,
            Record::PassEnd {
                pass: u32::from(script.byte() % 4),
            },
        ),
        Kind::DeviceData => {
            let len = script.below(32);
            let device = u32::from(script.byte() % 3);
            let more = script.flag();
            let part = script.take(len).to_vec();
            send(
                writer,
                Record::DeviceData(DeviceData {
                    device,
                    more,
                    data: &part,
                }),
            );
        }
        Kind::DeviceEnd => send(
            writer,
            Record::DeviceEnd(DeviceEnd {
                device: u32::from(script.byte() % 3),
                bytes: u64::from(script.u16()),
                digest: script.u64(),
            }),
        ),
        Kind::VcpuState => send(writer, Record::VcpuState(Vec::new())),
        Kind::Digests => {
            let digests: Vec<U64> = (0..script.below(4))
                .map(|_| U64::new(script.u64()))
                .collect();
            let first = PageNumber(u64::from(script.u16()));
            send(
                writer,
                Record::Digests(Digests {
                    first,
                    digests: &digests,
                }),
            );
        }
        Kind::Result => send(writer, Record::Result(Box::<Verification>::default())),
        Kind::Abort => {
            let len = script.below(24);
            let reason = String::from_utf8_lossy(script.take(len)).into_owned();
            send(writer, Record::Abort(reason.into()));
        }
        Kind::InitialSent => send(
            writer,
            Record::InitialSent {
                device: u32::from(script.byte() % 3),
            },
        ),
        Kind::Ready => send(writer, Record::Ready),
        Kind::Complete => send(writer, Record::Complete),
        Kind::Accepted => send(writer, Record::Accepted),
        Kind::Commit => send(writer, Record::Commit),
        Kind::Resumed => send(writer, Record::Resumed),
        Kind::SwitchoverAck => send(writer, Record::SwitchoverAck),
    }
}

/// The script of a source's whole migration on the main connection, as [`build`] reads it:
/// the hello of channel 0 of 1, then Config, pages and pass ends, device state, vCPU state,
/// digests, Complete and Commit, each a typical record with all-zero parameters. The stable
/// twin mutates it.
pub fn a_source_script() -> Vec<u8> {
    // One channel, channel 0, a session, the hello left whole.
    let mut script = vec![0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0];
    for kind in [
        Kind::Config,
        Kind::Pages,
        Kind::PassEnd,
        Kind::DeviceData,
        Kind::InitialSent,
        Kind::Pages,
        Kind::PassEnd,
        Kind::DeviceData,
        Kind::DeviceEnd,
        Kind::VcpuState,
        Kind::Digests,
        Kind::Complete,
        Kind::Commit,
    ] {
        let index = Kind::ALL.iter().position(|k| *k == kind).expect("a kind");
        // A typical record (operation 0) of this kind, with no parameter bytes.
        script.extend([0, u8::try_from(index).expect("16 kinds"), 0]);
    }
    script
}
