//! The property of the `v1_region` fuzz target, shared with its stable twin
//! (`crates/vmig-vfio-user/tests/v1_region_fuzz.rs`): any sequence of reads and writes of a v1
//! device's migration region (any offset, size and data, `device_state` writes of every
//! value, resets between them), sent as `REGION_READ` / `REGION_WRITE` messages through the
//! server's request handling (`Server::direct_session`), never panics; every access is
//! answered with its data or refused with an errno and a reason; and the rules of the
//! reference hold (seed000-vfio-migration-kabi.md §2 and its test cases 5.2–5.4, numbered
//! here as there), checked against a model of what the client has seen:
//!
//! - only whole header fields at their natural width are accessed (7); `reserved` reads 0
//!   and ignores writes (6); `pending_bytes` and `data_offset` are read-only (8);
//! - `device_state` reads what was last written; a refused write leaves it as it was or in
//!   the error state 110b (10, 14); targets 101b, 110b, 111b and 100b → 011b / 010b are
//!   refused (10, §2.3); the paths the reference requires are accepted (9, 12, §2.3); in the
//!   error state every write of `device_state` and every data-section access is refused
//!   (15), and a reset brings back 001b (15);
//! - `data_offset` is read only while saving or resuming (24), and then it lies in the
//!   mmappable data section, page aligned (19), with `data_offset + data_size` inside the
//!   region; re-reading `data_offset` and `data_size` within one iteration gives the same
//!   values (20), a `data_size` never exceeds the `pending_bytes` it came from, and outside
//!   an iteration `data_size` reads 0 (23);
//! - `pending_bytes` re-read with no `data_offset` between gives the same value (18); the read
//!   that ends an iteration gives the previous count less the chunk's `data_size`, exactly in
//!   stop-and-copy (21, §2.8), and never less in pre-copy; outside saving it reads 0;
//! - `data_size` is written only while resuming, at most the data section's size (§2.7).
//!
//! An input is a script of accesses; `crate::script` reads it.

use vmig_vfio_user::server::migration_v1::{DATA_OFFSET, DATA_SIZE, MIGRATION_REGION_INDEX};
use vmig_vfio_user::server::{
    Device, DeviceSpec, MigrationSupport, Refusal, RegionSpec, Server, ServerConfig,
};
use vmig_vfio_user::wire::{Command, Header, RegionAccess};
use zerocopy::IntoBytes;

use crate::script::Script;

/// The migration region.
const REGION: u32 = MIGRATION_REGION_INDEX;
/// Its size: the header page, then the data section.
const REGION_SIZE: u64 = DATA_OFFSET + DATA_SIZE;
/// Bytes of `struct vfio_device_migration_info`: the data section (and so every
/// `data_offset` in it) comes after them (§2.5).
const HEADER: u64 = 32;
const _: () = assert!(DATA_OFFSET >= HEADER);
/// The device's other region (index 0): plain registers.
const BAR_SIZE: u64 = 4096;
/// `device_state` bits (seed000 §1.2).
const RUNNING: u32 = 1;
const SAVING: u32 = 2;
const RESUMING: u32 = 4;
const MASK: u32 = 7;
const ERROR: u32 = SAVING | RESUMING;

/// The device behind the region: v1 migration, its saved state records of `record_len`
/// bytes, and an internal failure of its next save or stop when `fail` is set.
#[derive(Default)]
pub struct Saver {
    /// Bytes of each record `save` returns.
    pub record_len: usize,
    /// The next `save` or `set_running` fails (once).
    pub fail: bool,
    saves: u8,
}

impl Saver {
    fn failure(&mut self) -> Result<(), Refusal> {
        if std::mem::take(&mut self.fail) {
            return Err(Refusal::new(libc::EIO, "an internal failure of the device"));
        }
        Ok(())
    }
}

impl Device for Saver {
    fn spec(&self) -> DeviceSpec {
        DeviceSpec {
            reset: true,
            regions: vec![RegionSpec {
                size: BAR_SIZE,
                readable: true,
                writable: true,
                ..RegionSpec::default()
            }],
            ..DeviceSpec::default()
        }
    }

    fn region_read(&mut self, _: u32, _: u64, data: &mut [u8]) -> Result<(), Refusal> {
        data.fill(0);
        Ok(())
    }

    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), Refusal> {
        Ok(())
    }

    fn migration(&self) -> MigrationSupport {
        MigrationSupport::V1
    }

    fn set_running(&mut self, _: bool) -> Result<(), Refusal> {
        self.failure()
    }

    fn save(&mut self, _: bool) -> Result<Vec<u8>, Refusal> {
        self.failure()?;
        self.saves = self.saves.wrapping_add(1);
        Ok(vec![self.saves; self.record_len])
    }

    fn load(&mut self, _: &[u8]) -> Result<(), Refusal> {
        Ok(())
    }
}

/// What one input did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Accesses answered with data.
    pub answered: usize,
    /// Accesses refused.
    pub refused: usize,
    /// The `device_state` values (low 3 bits) the device was in, a bit for each.
    pub states: u8,
    /// Save chunks read whole (`data_offset`, `data_size`, then the data).
    pub chunks: usize,
    /// Resumes completed after data was written (100b → 001b or 000b).
    pub resumes: usize,
}

/// Where the client is in an iteration of the save loop (seed000 §2.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Latch {
    /// No chunk prepared: `pending_bytes` was read last, or nothing yet.
    Idle,
    /// `data_offset` prepared a chunk at `offset`, of `size` once `data_size` was read,
    /// from a count of `pending` when the client had read one.
    Prepared {
        offset: u64,
        size: Option<u64>,
        pending: Option<u64>,
    },
    /// A transition happened since: the next `pending_bytes` read starts afresh.
    Unknown,
}

/// What the client has seen.
struct Model {
    /// The `device_state` word as last read or written.
    state: u32,
    latch: Latch,
    /// The last `pending_bytes` read, while nothing changed it.
    pending: Option<u64>,
    /// Bytes committed by `data_size` writes since resuming began.
    resumed_bytes: u64,
}

fn is_error(state: u32) -> bool {
    state & MASK == ERROR
}

fn saving(state: u32) -> bool {
    state & SAVING != 0 && !is_error(state)
}

fn resuming(state: u32) -> bool {
    state & MASK == RESUMING
}

/// Transitions the reference requires a driver to accept (§2.3: the diagram's paths and the
/// normative cancel and restart).
fn required(from: u32, to: u32) -> bool {
    const STOP: u32 = 0;
    matches!(
        (from, to),
        (RUNNING, STOP)
            | (RUNNING, SAVING)
            | (SAVING, STOP)
            | (RUNNING, 3)
            | (3, SAVING)
            | (RUNNING, RESUMING)
            | (RESUMING, RUNNING)
            | (3, RUNNING)
            | (SAVING, RUNNING)
            | (STOP, RUNNING)
    )
}

/// A header field an access of `len` bytes at `offset` names, if it names one.
fn field(offset: u64, len: u32) -> Option<u64> {
    matches!((offset, len), (0, 4) | (4, 4) | (8, 8) | (16, 8) | (24, 8)).then_some(offset)
}

/// One input's run.
struct Run<'s, 'a> {
    session: &'s mut vmig_vfio_user::server::DirectSession<'a, Saver>,
    server: &'a Server<Saver>,
    model: Model,
    outcome: Outcome,
    id: u16,
}

impl Run<'_, '_> {
    /// Sends one access of `region` (a write when `write` has the data) and checks the
    /// answer's shape: the echo of the access and `count` bytes of a read, or an errno.
    fn access(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
        write: Option<&[u8]>,
    ) -> Result<Vec<u8>, Refusal> {
        self.id = self.id.wrapping_add(1);
        let command = if write.is_some() {
            Command::RegionWrite
        } else {
            Command::RegionRead
        };
        let header = Header {
            msg_id: self.id,
            command: command as u16,
            ..Header::default()
        };
        let access = RegionAccess {
            offset,
            region,
            count,
        };
        let message = [
            header.as_bytes(),
            access.as_bytes(),
            write.unwrap_or_default(),
        ]
        .concat();
        let answer = self.session.answer(&message);
        match &answer {
            Ok(payload) => {
                self.outcome.answered += 1;
                let echo = access.as_bytes();
                assert_eq!(&payload[..echo.len().min(payload.len())], echo, "the echo");
                let data = if write.is_some() { 0 } else { count };
                assert_eq!(
                    payload.len(),
                    echo.len() + usize::try_from(data).expect("counts fit"),
                    "{command:?} of {count} bytes at {offset:#x} of region {region}"
                );
            }
            Err(refusal) => {
                self.outcome.refused += 1;
                assert!(refusal.errno > 0, "errno {} for {refusal}", refusal.errno);
                assert!(
                    !refusal.message.trim().is_empty(),
                    "a refusal that says nothing"
                );
            }
        }
        answer.map(|payload| payload[size_of::<RegionAccess>()..].to_vec())
    }

    fn mark(&mut self) {
        self.outcome.states |= 1 << (self.model.state & MASK);
    }

    /// Reads the header field (or not one) of `len` bytes at `offset`; its value if answered.
    fn read_header(&mut self, offset: u64, len: u32) -> Option<u64> {
        let state = self.model.state;
        let answer = self.access(REGION, offset, len, None);
        let Some(field) = field(offset, len) else {
            let refusal = answer.expect_err("a part of a header field read");
            assert_eq!(refusal.errno, libc::EINVAL, "{refusal}");
            return None;
        };
        if field == 16 && !(saving(state) || resuming(state)) {
            let refusal = answer.expect_err("data_offset read neither saving nor resuming");
            assert_eq!(refusal.errno, libc::EINVAL, "{refusal}");
            return None;
        }
        let bytes = answer.unwrap_or_else(|e| panic!("a read of header field {field}: {e}"));
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(&bytes);
        let value = u64::from_le_bytes(word);
        match field {
            0 => assert_eq!(
                value,
                u64::from(state),
                "device_state reads what was written"
            ),
            4 => assert_eq!(value, 0, "reserved reads 0"),
            8 => self.pending_read(value),
            16 => self.data_offset_read(value),
            _ => self.data_size_read(value),
        }
        Some(value)
    }

    fn pending_read(&mut self, value: u64) {
        let state = self.model.state;
        if !saving(state) {
            assert_eq!(value, 0, "pending_bytes outside saving, in {state:03b}");
        } else {
            match (self.model.latch, self.model.pending) {
                (
                    Latch::Prepared {
                        size: Some(size),
                        pending: Some(before),
                        ..
                    },
                    _,
                ) => {
                    let left = before.checked_sub(size).expect("a chunk within its count");
                    if state & MASK == SAVING {
                        assert_eq!(value, left, "stop-and-copy: the count less the chunk");
                    } else {
                        assert!(
                            value >= left,
                            "pre-copy: {value} after {before} less {size}"
                        );
                    }
                }
                (Latch::Idle, Some(before)) => {
                    assert_eq!(value, before, "pending_bytes re-read with no data_offset")
                }
                _ => {}
            }
        }
        self.model.pending = Some(value);
        self.model.latch = Latch::Idle;
    }

    fn data_offset_read(&mut self, value: u64) {
        assert!(
            (DATA_OFFSET..REGION_SIZE).contains(&value),
            "data_offset {value:#x} outside the data section"
        );
        assert_eq!(value % 4096, 0, "an mmappable data_offset is page aligned");
        if resuming(self.model.state) {
            return;
        }
        self.model.latch = match self.model.latch {
            Latch::Prepared { offset, .. } => {
                assert_eq!(value, offset, "data_offset re-read in one iteration");
                self.model.latch
            }
            Latch::Idle => Latch::Prepared {
                offset: value,
                size: None,
                pending: self.model.pending,
            },
            Latch::Unknown => Latch::Prepared {
                offset: value,
                size: None,
                pending: None,
            },
        };
        self.model.pending = None;
    }

    fn data_size_read(&mut self, value: u64) {
        assert!(
            value <= DATA_SIZE,
            "data_size {value:#x} beyond the data section"
        );
        if resuming(self.model.state) || !saving(self.model.state) {
            return;
        }
        match &mut self.model.latch {
            Latch::Prepared {
                size: Some(size), ..
            } => assert_eq!(value, *size, "data_size re-read in one iteration"),
            Latch::Prepared {
                offset,
                size,
                pending,
            } => {
                assert!(
                    *offset + value <= REGION_SIZE,
                    "the chunk leaves the region"
                );
                if let Some(pending) = pending {
                    assert!(
                        value <= *pending,
                        "a chunk of {value} from {pending} pending"
                    );
                }
                *size = Some(value);
            }
            Latch::Idle => assert_eq!(value, 0, "data_size outside an iteration"),
            Latch::Unknown => {}
        }
    }

    /// Writes the header field (or not one) of `len` bytes at `offset`.
    fn write_header(&mut self, offset: u64, len: u32, value: u64) {
        if field(offset, len) == Some(0) {
            return self.write_state(u32::try_from(value & 0xffff_ffff).expect("masked"));
        }
        let state = self.model.state;
        let data = value.to_le_bytes();
        let data = &data[..usize::try_from(len.min(8)).expect("small")];
        let data: Vec<u8> = data
            .iter()
            .copied()
            .chain(std::iter::repeat(0))
            .take(usize::try_from(len).expect("small"))
            .collect();
        let answer = self.access(REGION, offset, len, Some(&data));
        match field(offset, len) {
            Some(4) => {
                answer.expect("a write of reserved is ignored");
            }
            Some(24) if resuming(state) && value <= DATA_SIZE => match answer {
                Ok(_) => self.model.resumed_bytes += value,
                Err(refusal) => assert_eq!(refusal.errno, libc::ENOSPC, "{refusal}"),
            },
            _ => {
                let refusal = answer.expect_err("a header write the reference refuses");
                assert_eq!(refusal.errno, libc::EINVAL, "{refusal}");
            }
        }
    }

    /// Writes `device_state` = `new`.
    fn write_state(&mut self, new: u32) {
        let old = self.model.state;
        let (from, to) = (old & MASK, new & MASK);
        let armed = self.server.device().fail;
        let answer = self.access(REGION, 0, 4, Some(&new.to_le_bytes()));
        let must_refuse =
            is_error(old) || matches!(to, 5..=7) || (from == RESUMING && matches!(to, 2 | 3));
        let must_accept =
            required(from, to) && !armed && !(from == RESUMING && self.model.resumed_bytes > 0);
        match answer {
            Ok(_) => {
                assert!(!must_refuse, "{old:03b} -> {new:03b} was accepted");
                self.model.state = new;
                if from != to {
                    self.model.latch = Latch::Unknown;
                    self.model.pending = None;
                    if from == RESUMING && self.model.resumed_bytes > 0 {
                        self.outcome.resumes += 1;
                    }
                    self.model.resumed_bytes = 0;
                }
            }
            Err(refusal) => {
                assert!(
                    !must_accept,
                    "{old:03b} -> {new:03b} was refused: {refusal}"
                );
                if must_refuse {
                    assert_eq!(refusal.errno, libc::EINVAL, "{refusal}");
                }
                // Read back: the previous state, or the error state after an internal failure.
                let now = self.read_state();
                let failed = (old & !MASK) | ERROR;
                if must_refuse {
                    assert_eq!(now, old, "a refused {old:03b} -> {new:03b} moved the state");
                } else {
                    assert!(
                        now == old || now == failed,
                        "{old:03b} -> {new:03b} left {now:03b}"
                    );
                }
                if now != old {
                    self.model.latch = Latch::Unknown;
                    self.model.pending = None;
                }
            }
        }
        self.mark();
    }

    /// Reads `device_state`, whatever the model says, and takes it as the model's.
    fn read_state(&mut self) -> u32 {
        let bytes = self
            .access(REGION, 0, 4, None)
            .expect("device_state can always be read");
        let state = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        self.model.state = state;
        state
    }

    /// An access of the data section, `len` bytes at `at` from its start.
    fn data_access(&mut self, at: u64, len: u32, write: bool, fill: u8) {
        let offset = DATA_OFFSET + at % DATA_SIZE;
        let len = len.min(u32::try_from(REGION_SIZE - offset).expect("within 1 MiB"));
        let data = vec![fill; usize::try_from(len).expect("small")];
        let answer = self.access(REGION, offset, len, write.then_some(&data[..]));
        if is_error(self.model.state) {
            answer.expect_err("a data-section access in the error state");
        } else {
            answer.expect("a data-section access inside the region");
        }
    }

    /// One iteration of the save loop as a client does it: pending, data_offset, data_size,
    /// the data, pending.
    fn save_iteration(&mut self) {
        if self.read_header(8, 8).is_none_or(|pending| pending == 0) {
            return;
        }
        let Some(offset) = self.read_header(16, 8) else {
            return;
        };
        let Some(size) = self.read_header(24, 8) else {
            return;
        };
        let count = u32::try_from(size).expect("data_size within 1 MiB");
        self.access(REGION, offset, count, None)
            .expect("the chunk data_offset and data_size name");
        self.outcome.chunks += 1;
        self.read_header(8, 8);
    }

    /// One chunk of the resume loop: data_offset, the data, data_size.
    fn resume_chunk(&mut self, chunk: &[u8]) {
        let Some(offset) = self.read_header(16, 8) else {
            return;
        };
        let count = u32::try_from(chunk.len()).expect("a short chunk");
        let answer = self.access(REGION, offset, count, Some(chunk));
        if answer.is_ok() {
            self.write_header(24, 8, u64::from(count));
        }
    }

    fn reset(&mut self) {
        self.id = self.id.wrapping_add(1);
        let header = Header {
            msg_id: self.id,
            command: Command::DeviceReset as u16,
            ..Header::default()
        };
        self.session
            .answer(header.as_bytes())
            .expect("a device that supports reset resets");
        assert_eq!(
            self.read_state() & MASK,
            RUNNING,
            "a reset brings back 001b"
        );
        self.model.latch = Latch::Idle;
        self.model.pending = None;
        self.model.resumed_bytes = 0;
        self.mark();
    }

    /// An access anywhere, of any region, that the checks of the other accesses do not
    /// model: outside the migration region's bounds, or of another region.
    fn stray_access(&mut self, region: u32, offset: u64, count: u32, write: bool) {
        let inside = |size: u64| {
            offset
                .checked_add(u64::from(count))
                .is_some_and(|e| e <= size)
        };
        if region == REGION && inside(REGION_SIZE) && offset < DATA_OFFSET {
            // The header, which the other accesses model.
            return;
        }
        let len = usize::try_from(count.min(256)).expect("small");
        let data = vec![0x5a; len];
        let answer = self.access(region, offset, count, write.then_some(&data[..]));
        let fits = !write || len == usize::try_from(count).expect("small");
        match region {
            0 if inside(BAR_SIZE) && fits => {
                answer.expect("an access inside the device's region");
            }
            REGION if inside(REGION_SIZE) && fits => {}
            _ => {
                answer.expect_err("an access outside every region");
            }
        }
    }
}

/// Offsets of the header worth trying: each field, parts of them, past them.
const OFFSETS: [u64; 10] = [0, 4, 8, 16, 24, 2, 9, 12, 32, 4095];
/// Access sizes worth trying.
const SIZES: [u32; 6] = [4, 8, 1, 2, 3, 16];
/// Record sizes of the device: none, small, a page, more than the data section holds.
const RECORD_LENS: [usize; 5] = [0, 1, 100, 4096, DATA_SIZE_USIZE + 5];
const DATA_SIZE_USIZE: usize = 1 << 20;

/// Checks one input (the fuzz target's body).
pub fn check(data: &[u8]) -> Outcome {
    assert_eq!(u64::try_from(DATA_SIZE_USIZE).ok(), Some(DATA_SIZE));
    let mut script = Script::new(data);
    let server = Server::new(
        Saver {
            record_len: script.pick(&RECORD_LENS[..4]),
            ..Saver::default()
        },
        ServerConfig::default(),
    );
    let mut session = server.direct_session().expect("a session opens");
    let mut run = Run {
        session: &mut session,
        server: &server,
        model: Model {
            state: RUNNING,
            latch: Latch::Idle,
            pending: None,
            resumed_bytes: 0,
        },
        outcome: Outcome::default(),
        id: 0,
    };
    assert_eq!(run.read_state(), RUNNING, "a new device runs (001b)");
    run.mark();
    while !script.is_empty() {
        match script.byte() % 12 {
            0 | 1 => {
                let (offset, len) = (script.pick(&OFFSETS), script.pick(&SIZES));
                run.read_header(offset, len);
            }
            // device_state: one of the eight states with the reserved bits as they are, or
            // any value at all.
            2 | 3 => {
                let state = u32::from(script.byte() % 8) | (run.model.state & !MASK);
                run.write_state(state);
            }
            4 => run.write_state(script.u32()),
            5 => {
                let (offset, len) = (script.pick(&OFFSETS), script.pick(&SIZES));
                run.write_header(offset, len, script.u64());
            }
            6 => {
                let (at, len, write) = (script.u32(), script.u16(), script.flag());
                let fill = script.byte();
                run.data_access(u64::from(at), u32::from(len), write, fill);
            }
            7 | 8 => run.save_iteration(),
            9 => {
                let len = script.below(48);
                let chunk = script.take(len).to_vec();
                run.resume_chunk(&chunk);
            }
            10 => match script.byte() % 4 {
                0 => run.reset(),
                1 => server.device().fail = true,
                2 => server.device().record_len = script.pick(&RECORD_LENS),
                _ => {
                    let (region, offset) = (script.u16() % 12, script.u64());
                    let (count, write) = (script.u32() % (2 << 20), script.flag());
                    run.stray_access(u32::from(region), offset, count, write);
                }
            },
            _ => {
                let offset = REGION_SIZE - u64::from(script.u16() % 64);
                run.stray_access(REGION, offset, u32::from(script.byte()), false);
            }
        }
    }
    run.outcome
}
