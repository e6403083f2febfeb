//! v2 migration (`DEVICE_FEATURE` `MIGRATION` and `MIG_DEVICE_STATE`, `MIG_DATA_READ` /
//! `MIG_DATA_WRITE`): the migration state kept across connections, the walk along the
//! next-state table of `vmig_primitives::mig_state` calling the device on each arc, and the
//! record stream both migration versions share.
//!
//! Migration data is a stream of records, `[u32 length][bytes]`, one per [`Device::save`]:
//! entering PRE_COPY saves a record while the device runs, entering STOP_COPY saves the final
//! one; a destination in RESUMING collects what is written and, on leaving RESUMING, hands the
//! records to [`Device::load`] in order.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use zerocopy::IntoBytes;

use super::{Device, Refusal, Reply, Server, check_ops, feature_echo, need_room};
use crate::wire::{
    FEATURE_GET, FEATURE_MIGRATION, FEATURE_PROBE, FEATURE_SET, MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY, MigData, MigDeviceState, read_struct,
};
use vmig_primitives::mig_state::{MigState, path};

/// Largest migration stream a destination accepts.
pub const MAX_MIGRATION_STREAM: usize = 1 << 30;

/// The migration state, kept across connections (it is device state).
#[derive(Debug)]
pub(super) struct Migration {
    /// v2 state.
    pub(super) state: MigState,
    /// Saved records not yet read (source), or bytes written so far (destination).
    pub(super) stream: Vec<u8>,
    pub(super) read_at: usize,
    /// v1: the `device_state` word (reserved bits included).
    pub(super) v1_state: u32,
    /// v1: the size of the chunk `data_offset` prepared, until `pending_bytes` consumes it.
    pub(super) v1_prepared: Option<u64>,
    /// v1: the memfd behind the migration region (the header page, then the data section).
    pub(super) v1_region: Option<(Arc<OwnedFd>, vmig_primitives::HostMemory)>,
}

impl Migration {
    pub(super) fn discard(&mut self) {
        self.stream.clear();
        self.read_at = 0;
        self.v1_prepared = None;
    }
}

impl<D: Device> Server<D> {
    /// `DEVICE_FEATURE` `MIGRATION` and `MIG_DEVICE_STATE` of a v2 device.
    pub(super) fn migration_feature(
        &self,
        argsz: u32,
        flags: u32,
        data: &[u8],
        pre_copy: bool,
    ) -> Result<Reply, Refusal> {
        let feature = flags & crate::wire::FEATURE_MASK;
        let op = flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
        if feature == FEATURE_MIGRATION {
            check_ops(feature, op, FEATURE_GET | FEATURE_PROBE)?;
            if op & FEATURE_PROBE != 0 {
                return feature_echo(flags, &[]);
            }
            let mig_flags = MIGRATION_STOP_COPY | if pre_copy { MIGRATION_PRE_COPY } else { 0 };
            need_room(argsz, 16)?;
            return feature_echo(flags, &mig_flags.to_le_bytes());
        }
        check_ops(feature, op, FEATURE_GET | FEATURE_SET | FEATURE_PROBE)?;
        if op & FEATURE_PROBE != 0 {
            return feature_echo(flags, &[]);
        }
        need_room(argsz, 16)?;
        if op & FEATURE_SET != 0 {
            let wanted: MigDeviceState = read_struct(data)
                .ok_or_else(|| Refusal::invalid("MIG_DEVICE_STATE SET needs 8 bytes of data"))?;
            let target = MigState::from_u32(wanted.device_state).ok_or_else(|| {
                Refusal::invalid(format!(
                    "device state {}: expected 0 to 7",
                    wanted.device_state
                ))
            })?;
            self.set_state(target, pre_copy)?;
        }
        let now = MigDeviceState {
            device_state: self.migration_state() as u32,
            data_fd: u32::MAX,
        };
        feature_echo(flags, now.as_bytes())
    }

    /// `MIG_DATA_READ`: the next bytes of the saved stream, in PRE_COPY or STOP_COPY.
    pub(super) fn mig_data_read(&self, size: u32) -> Result<Reply, Refusal> {
        let mut m = self.migration();
        if !m.state.is_saving() {
            return Err(Refusal::invalid(format!(
                "MIG_DATA_READ in {}: only in PRE_COPY or STOP_COPY",
                m.state
            )));
        }
        let start = m.read_at;
        let n = size.min(u32::try_from(m.stream.len() - start).unwrap_or(u32::MAX));
        let end = start + n as usize;
        m.read_at = end;
        let head = MigData {
            argsz: 8 + n,
            size: n,
        };
        let mut payload = Vec::with_capacity(8 + n as usize);
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(&m.stream[start..end]);
        Ok(Reply::data(payload))
    }

    /// `MIG_DATA_WRITE`: more of the stream a destination in RESUMING receives.
    pub(super) fn mig_data_write(&self, data: &[u8]) -> Result<Reply, Refusal> {
        let mut m = self.migration();
        if m.state != MigState::Resuming {
            return Err(Refusal::invalid(format!(
                "MIG_DATA_WRITE in {}: only in RESUMING",
                m.state
            )));
        }
        if m.stream.len() + data.len() > MAX_MIGRATION_STREAM {
            return Err(Refusal::new(
                libc::ENOSPC,
                format!("migration data beyond {MAX_MIGRATION_STREAM} bytes"),
            ));
        }
        m.stream.extend_from_slice(data);
        Ok(Reply::empty())
    }

    /// Walks the arcs to `target`, calling the device on each; a failed arc leaves ERROR.
    fn set_state(&self, target: MigState, pre_copy: bool) -> Result<(), Refusal> {
        let mut m = self.migration();
        let walk = path(m.state, target, pre_copy).map_err(|e| Refusal::invalid(e.0))?;
        for next in walk {
            if let Err(e) = self.arc(&mut m, next) {
                m.state = MigState::Error;
                m.discard();
                return Err(e);
            }
            m.state = next;
        }
        Ok(())
    }

    fn arc(&self, m: &mut Migration, next: MigState) -> Result<(), Refusal> {
        let mut device = self.device();
        let record = |m: &mut Migration, last: bool, device: &mut D| -> Result<(), Refusal> {
            push_record(&mut m.stream, &device.save(last)?)
        };
        match (m.state, next) {
            (MigState::Running, MigState::Stop) => device.set_running(false),
            (MigState::Stop, MigState::Running) => device.set_running(true),
            (MigState::Running, MigState::PreCopy) => {
                m.discard();
                record(m, false, &mut device)
            }
            (MigState::PreCopy, MigState::Running) | (MigState::StopCopy, MigState::Stop) => {
                m.discard();
                Ok(())
            }
            (MigState::PreCopy, MigState::StopCopy) => {
                device.set_running(false)?;
                record(m, true, &mut device)
            }
            (MigState::Stop, MigState::StopCopy) => {
                m.discard();
                record(m, true, &mut device)
            }
            (MigState::Stop, MigState::Resuming) => {
                m.discard();
                Ok(())
            }
            (MigState::Resuming, MigState::Stop) => {
                let stream = std::mem::take(&mut m.stream);
                load_records(&stream, &mut *device)
            }
            (from, to) => Err(Refusal::invalid(format!(
                "{from} -> {to} is not a direct arc"
            ))),
        }
    }
}

/// Appends one `[u32 length][bytes]` record.
pub(super) fn push_record(stream: &mut Vec<u8>, bytes: &[u8]) -> Result<(), Refusal> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| Refusal::new(libc::E2BIG, "a state record over 4 GiB"))?;
    stream.extend_from_slice(&len.to_le_bytes());
    stream.extend_from_slice(bytes);
    Ok(())
}

/// Hands each record of `stream` to the device, in order.
pub(super) fn load_records<D: Device + ?Sized>(
    stream: &[u8],
    device: &mut D,
) -> Result<(), Refusal> {
    let mut at = 0;
    while at < stream.len() {
        let Some(len) = stream.get(at..at + 4) else {
            return Err(Refusal::invalid(
                "the migration data ends inside a record header",
            ));
        };
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let Some(body) = stream.get(at + 4..at + 4 + len) else {
            return Err(Refusal::invalid(format!(
                "the migration data ends inside a {len}-byte record"
            )));
        };
        device.load(body)?;
        at += 4 + len;
    }
    Ok(())
}
