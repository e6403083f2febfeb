//! A kernel VFIO device's migration as the engine drives it: the v2 state machine in the same
//! steps, and with the same meaning, as `vmig_vfio_user::client::DeviceMigration` gives a vfio-user
//! device, so the engine moves both alike.
//!
//! | step | `MIG_DEVICE_STATE` | data fd |
//! |---|---|---|
//! | `start_precopy` | PRE_COPY (if supported) | opened |
//! | `read_precopy` | — | read until `ENOMSG` (nothing more for now) |
//! | `stop_and_copy` | STOP_COPY | PRE_COPY's fd, or a new one; read to end of file |
//! | `finish_source` | STOP | closed |
//! | `cancel` | RUNNING (else a reset) | closed |
//! | `start_resume` | RESUMING | opened |
//! | `write_chunk` | — | written |
//! | `load` | STOP (the device loads what it was given) | closed |
//! | `run` | RUNNING | — |

use crate::device::{Device, MigState};
use crate::error::{Result, VfioError};

/// Bytes read from the data fd at once.
const READ_CHUNK: usize = 1 << 20;

/// Most pre-copy bytes one [`KernelMigration::read_precopy`] takes: a device that keeps
/// producing state is read again at the next pass rather than holding up this one.
pub const MAX_PRECOPY_READ: usize = 64 << 20;

/// Most state a device may hand over in stop-and-copy; more means it misbehaves.
pub const MAX_STOP_COPY_STATE: usize = 16 << 30;

/// The migration of one kernel VFIO device that offers v2 with `STOP_COPY`.
#[derive(Debug, Clone, Copy)]
pub struct KernelMigration<'a> {
    device: &'a Device,
    pre_copy: bool,
}

impl<'a> KernelMigration<'a> {
    /// Drives `device`'s migration; `pre_copy` when it offers `VFIO_MIGRATION_PRE_COPY`.
    pub fn new(device: &'a Device, pre_copy: bool) -> Self {
        Self { device, pre_copy }
    }

    fn set(&self, state: MigState) -> Result<()> {
        self.device.set_migration_state(state)?;
        // The kernel walks the arcs in between, and a driver may stop on an error state.
        let now = self.device.migration_state()?;
        if now != state {
            return Err(VfioError::Kernel(format!(
                "{}: asked for migration state {state}, the device is in {now}",
                self.device.name()
            )));
        }
        Ok(())
    }

    /// Reads the data fd until it has nothing more (end of file, or `ENOMSG` in PRE_COPY) or
    /// `limit` bytes were read.
    fn read(&self, limit: usize) -> Result<Vec<Vec<u8>>> {
        let mut chunks = Vec::new();
        let mut total = 0;
        while total < limit {
            let mut chunk = vec![0u8; READ_CHUNK.min(limit - total)];
            let n = self.device.read_state(&mut chunk)?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            chunk.shrink_to_fit();
            total += n;
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// Starts saving while the device runs (a device without PRE_COPY stays running).
    pub fn start_precopy(&self) -> Result<()> {
        if self.pre_copy {
            self.set(MigState::PreCopy)?;
        }
        Ok(())
    }

    /// The state the device has ready now (pre-copy; more may follow).
    pub fn read_precopy(&self) -> Result<Vec<Vec<u8>>> {
        if !self.pre_copy {
            return Ok(Vec::new());
        }
        self.read(MAX_PRECOPY_READ)
    }

    /// Stops the device and reads the rest of its state.
    pub fn stop_and_copy(&self) -> Result<Vec<Vec<u8>>> {
        self.set(MigState::StopCopy)?;
        let chunks = self.read(MAX_STOP_COPY_STATE)?;
        if chunks.iter().map(Vec::len).sum::<usize>() == MAX_STOP_COPY_STATE
            && self.device.read_state(&mut [0u8; 1])? != 0
        {
            return Err(VfioError::Kernel(format!(
                "{}: the device's state goes on past {} GiB",
                self.device.name(),
                MAX_STOP_COPY_STATE >> 30
            )));
        }
        Ok(chunks)
    }

    /// The source is done: the device stays stopped.
    pub fn finish_source(&self) -> Result<()> {
        self.set(MigState::Stop)
    }

    /// Abandons a migration: the device runs again and saved data is dropped. A device the
    /// kernel cannot bring back to RUNNING (a failed arc leaves it in ERROR, which only a
    /// reset leaves) is reset, and the error says so: its state is then the reset state.
    pub fn cancel(&self) -> Result<()> {
        match self.set(MigState::Running) {
            Ok(()) => Ok(()),
            Err(e) if self.device.can_reset() => {
                tracing::warn!(
                    device = self.device.name(),
                    error = %e,
                    "the device could not return to RUNNING; resetting it"
                );
                self.device.reset()?;
                Err(VfioError::ResetAfterFailedCancel {
                    device: self.device.name().to_owned(),
                    source: Box::new(e),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Prepares the destination device to receive state.
    pub fn start_resume(&self) -> Result<()> {
        self.set(MigState::Resuming)
    }

    /// Gives the destination device one chunk of state, in the order the source read them.
    pub fn write_chunk(&self, chunk: &[u8]) -> Result<()> {
        self.device.write_state(chunk)
    }

    /// The destination has all the state: the device loads it and stays stopped; [`Self::run`]
    /// starts it.
    pub fn load(&self) -> Result<()> {
        self.set(MigState::Stop)
    }

    /// Starts the device (after [`Self::load`]).
    pub fn run(&self) -> Result<()> {
        self.set(MigState::Running)
    }
}
