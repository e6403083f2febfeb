//! The v1 migration region (seed 000): `struct vfio_device_migration_info` at offset 0, a data
//! section after it, and the rules for `device_state` writes and the save/resume iterations.
//! The rules come first and are pure: which actions a `device_state` write means, and which
//! header field an access names. Then the server's side: accesses of the region's header and
//! data section, and the actions executed against the device, over the record stream of
//! [`super::migration_v2`].
//!
//! ```text
//!  001 ──► 011 ──► 010 ──► 000        live migration (pre-copy, stop-and-copy, done)
//!   │  ◄─── cancel ───┘                011/010 → 001 discards saved data
//!   ├──► 010 ──► 000                   save without pre-copy
//!   ├──► 000 ──► 001                   stop / start
//!   └──► 100 ──► 001                   resume, then run (the data is loaded on leaving 100)
//! ```

use vmig_dma::uapi::device_state::{self, MASK, RESUMING, RUNNING, SAVING};

use super::migration_v2::{MAX_MIGRATION_STREAM, Migration, load_records, push_record};
use super::{Device, Refusal, Server, Session};
use crate::wire::{REGION_SUBTYPE_MIGRATION, REGION_TYPE_MIGRATION};

/// Region index of the migration region (`VFIO_PCI_NUM_REGIONS`, as libvfio-user places it).
pub const MIGRATION_REGION_INDEX: u32 = 9;
/// Offset of the data section in the region: the header page comes first.
pub const DATA_OFFSET: u64 = vmig_primitives::PAGE_SIZE;
/// Bytes of the data section.
pub const DATA_SIZE: u64 = 1 << 20;

/// What a `device_state` write asks the server to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start (true) or stop (false) the device.
    SetRunning(bool),
    /// Forget the saved or received data and start a new stream.
    Discard,
    /// Append one saved record (`last`: the device is stopped).
    Save {
        /// Stop-and-copy record.
        last: bool,
    },
    /// Load the received stream into the device.
    Load,
}

/// The actions of the write of `new` over `old` (both full words; only the low 3 bits matter).
pub fn transition(old: u32, new: u32) -> Result<Vec<Action>, Refusal> {
    use Action::*;
    if device_state::is_error(old) {
        return Err(Refusal::invalid(
            "the device is in the error state (110b): reset it before writing device_state",
        ));
    }
    let (from, to) = (old & MASK, new & MASK);
    if !device_state::is_valid(to) || to == SAVING | RESUMING {
        return Err(Refusal::invalid(format!(
            "device_state {to:03b} is not a state a user may request (101b, 110b and 111b are not)"
        )));
    }
    const STOP: u32 = 0;
    const PRECOPY: u32 = RUNNING | SAVING;
    Ok(match (from, to) {
        _ if from == to => Vec::new(),
        (RUNNING, STOP) => vec![SetRunning(false)],
        (STOP, RUNNING) => vec![SetRunning(true)],
        (RUNNING, PRECOPY) => vec![Discard, Save { last: false }],
        (PRECOPY, SAVING) => vec![SetRunning(false), Save { last: true }],
        (RUNNING, SAVING) => vec![SetRunning(false), Discard, Save { last: true }],
        (STOP, SAVING) => vec![Discard, Save { last: true }],
        (SAVING, STOP) => vec![Discard],
        (PRECOPY, RUNNING) => vec![Discard],
        (SAVING, RUNNING) => vec![Discard, SetRunning(true)],
        (PRECOPY, STOP) => vec![Discard, SetRunning(false)],
        (RUNNING, RESUMING) => vec![SetRunning(false), Discard],
        (STOP, RESUMING) => vec![Discard],
        (RESUMING, RUNNING) => vec![Load, SetRunning(true)],
        (RESUMING, STOP) => vec![Load],
        _ => {
            return Err(Refusal::invalid(format!(
                "device_state {from:03b} -> {to:03b} is not a transition of the migration protocol"
            )));
        }
    })
}

/// A header field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `device_state` (u32 at 0).
    DeviceState,
    /// `reserved` (u32 at 4): reads 0, writes ignored.
    Reserved,
    /// `pending_bytes` (u64 at 8).
    PendingBytes,
    /// `data_offset` (u64 at 16).
    DataOffset,
    /// `data_size` (u64 at 24).
    DataSize,
}

/// The field an access of `len` bytes at `offset` names: only whole, naturally aligned fields.
pub fn field(offset: u64, len: usize) -> Result<Field, Refusal> {
    Ok(match (offset, len) {
        (0, 4) => Field::DeviceState,
        (4, 4) => Field::Reserved,
        (8, 8) => Field::PendingBytes,
        (16, 8) => Field::DataOffset,
        (24, 8) => Field::DataSize,
        _ => {
            return Err(Refusal::invalid(format!(
                "a {len}-byte access at {offset:#x} of the migration header: only whole fields at their natural width (u32 at 0 and 4, u64 at 8, 16, 24)"
            )));
        }
    })
}

impl<D: Device> Server<D> {
    pub(super) fn is_v1_region(&self, s: &Session, index: u32) -> bool {
        index == MIGRATION_REGION_INDEX
            && s.spec.regions.get(index as usize).is_some_and(|r| {
                r.region_type == Some((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION))
            })
    }

    pub(super) fn v1_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        let mut m = self.migration();
        if offset >= DATA_OFFSET {
            return v1_data(&m, offset, |memory, at| memory.read(at, data));
        }
        let saving = m.v1_state & device_state::SAVING != 0 && !device_state::is_error(m.v1_state);
        let value: u64 = match field(offset, data.len())? {
            Field::DeviceState => u64::from(m.v1_state),
            Field::Reserved => 0,
            Field::PendingBytes => {
                // A read after a prepared chunk acknowledges it (seed000 §2.8's FSM).
                if let Some(size) = m.v1_prepared.take() {
                    m.read_at += section_len(size);
                }
                if saving {
                    (m.stream.len() - m.read_at) as u64
                } else {
                    0
                }
            }
            Field::DataOffset => {
                // seed000 test cases 15 and 24: only while saving or resuming (not in 001b,
                // 000b, nor the error state 110b).
                if !saving && m.v1_state & device_state::MASK != RESUMING {
                    return Err(Refusal::invalid(format!(
                        "data_offset is read only while saving (x1xb) or resuming (100b); device_state is {:03b}",
                        m.v1_state & device_state::MASK
                    )));
                }
                if saving && m.v1_prepared.is_none() {
                    let size = ((m.stream.len() - m.read_at) as u64).min(DATA_SIZE);
                    let chunk = m.stream[m.read_at..m.read_at + size as usize].to_vec();
                    v1_data(&m, DATA_OFFSET, |memory, at| memory.write(at, &chunk))?;
                    m.v1_prepared = Some(size);
                }
                DATA_OFFSET
            }
            Field::DataSize => m.v1_prepared.unwrap_or(0),
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    pub(super) fn v1_write(&self, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        let mut m = self.migration();
        if offset >= DATA_OFFSET {
            return v1_data(&m, offset, |memory, at| memory.write(at, data));
        }
        let field = field(offset, data.len())?;
        let mut word = [0u8; 8];
        word[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(word);
        match field {
            Field::DeviceState => {
                let old = m.v1_state;
                let new = u32::try_from(value).map_err(|_| {
                    Refusal::invalid(format!("device_state {value:#x}: expected a 32-bit value"))
                })?;
                for action in transition(old, new)? {
                    if let Err(e) = self.v1_action(&mut m, action) {
                        m.v1_state = device_state::set_error(old);
                        m.discard();
                        return Err(e);
                    }
                }
                m.v1_state = new;
                Ok(())
            }
            Field::Reserved => Ok(()),
            Field::DataSize => {
                if m.v1_state & device_state::MASK != device_state::RESUMING {
                    return Err(Refusal::invalid(
                        "data_size is written only while resuming (100b)",
                    ));
                }
                if value > DATA_SIZE {
                    return Err(Refusal::invalid(format!(
                        "data_size {value}: the data section holds {}",
                        DATA_SIZE
                    )));
                }
                if m.stream.len() as u64 + value > MAX_MIGRATION_STREAM as u64 {
                    return Err(Refusal::new(
                        libc::ENOSPC,
                        format!("migration data beyond {MAX_MIGRATION_STREAM} bytes"),
                    ));
                }
                let mut chunk = vec![0u8; section_len(value)];
                v1_data(&m, DATA_OFFSET, |memory, at| memory.read(at, &mut chunk))?;
                m.stream.extend_from_slice(&chunk);
                Ok(())
            }
            field => Err(Refusal::invalid(format!("{field:?} is read-only"))),
        }
    }

    fn v1_action(&self, m: &mut Migration, action: Action) -> Result<(), Refusal> {
        let mut device = self.device();
        match action {
            Action::SetRunning(running) => device.set_running(running),
            Action::Discard => {
                m.discard();
                Ok(())
            }
            Action::Save { last } => push_record(&mut m.stream, &device.save(last)?),
            Action::Load => {
                let stream = std::mem::take(&mut m.stream);
                m.discard();
                load_records(&stream, &mut *device)
            }
        }
    }
}

/// An offset or length inside the migration region (its header page and 1 MiB data section),
/// as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked to lie inside the region, DATA_OFFSET + DATA_SIZE bytes"
)]
fn section_len(value: u64) -> usize {
    value as usize
}

/// Runs `f` on the migration region's memory at region offset `offset`, refusing it in the
/// error state.
fn v1_data<T>(
    m: &Migration,
    offset: u64,
    f: impl FnOnce(&vmig_primitives::HostMemory, usize) -> std::io::Result<T>,
) -> Result<T, Refusal> {
    if device_state::is_error(m.v1_state) {
        return Err(Refusal::invalid(
            "the device is in the error state: reset it",
        ));
    }
    let (_, memory) = m
        .v1_region
        .as_ref()
        .ok_or_else(|| Refusal::invalid("no migration region"))?;
    f(memory, section_len(offset))
        .map_err(|e| Refusal::caused(libc::EINVAL, "the migration region's memory", e))
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;

    #[test]
    fn the_seed_paths_are_accepted() {
        // seed000 §2.3: 001→000, 001→010→000, 001→011→010→000, 001→100→001.
        assert_eq!(transition(1, 0).unwrap(), [SetRunning(false)]);
        assert_eq!(
            transition(1, 2).unwrap(),
            [SetRunning(false), Discard, Save { last: true }]
        );
        assert_eq!(transition(2, 0).unwrap(), [Discard]);
        assert_eq!(transition(1, 3).unwrap(), [Discard, Save { last: false }]);
        assert_eq!(
            transition(3, 2).unwrap(),
            [SetRunning(false), Save { last: true }]
        );
        assert_eq!(transition(1, 4).unwrap(), [SetRunning(false), Discard]);
        assert_eq!(transition(4, 1).unwrap(), [Load, SetRunning(true)]);
        // "MUST accept 011→001 and 010→001 (cancel) and 000→001".
        assert_eq!(transition(3, 1).unwrap(), [Discard]);
        assert_eq!(transition(2, 1).unwrap(), [Discard, SetRunning(true)]);
        assert_eq!(transition(0, 1).unwrap(), [SetRunning(true)]);
        // Reserved bits do not change the meaning.
        assert_eq!(
            transition(0xf000_0001, 0xf000_0000).unwrap(),
            [SetRunning(false)]
        );
    }

    #[test]
    fn invalid_and_error_states_are_refused() {
        // "SHOULD reject with -EINVAL: transitions into 101b, 110b or 111b; 100→011 and 100→010".
        for to in [5, 6, 7] {
            assert!(
                transition(1, to)
                    .unwrap_err()
                    .message
                    .contains("is not a state"),
                "{to:03b}"
            );
        }
        assert!(transition(4, 3).is_err());
        assert!(transition(4, 2).is_err());
        assert!(
            transition(2, 3).is_err(),
            "no way back from stop-and-copy to pre-copy"
        );
        // "While in ERROR, every write of device_state other than via reset fails".
        assert!(transition(6, 1).unwrap_err().message.contains("reset it"));
    }

    #[test]
    fn header_fields_only_at_natural_width() {
        assert_eq!(field(0, 4).unwrap(), Field::DeviceState);
        assert_eq!(field(24, 8).unwrap(), Field::DataSize);
        for (offset, len) in [(0, 8), (0, 2), (2, 4), (8, 4), (12, 4), (32, 8), (9, 8)] {
            assert!(field(offset, len).is_err(), "{offset} {len}");
        }
    }
}
