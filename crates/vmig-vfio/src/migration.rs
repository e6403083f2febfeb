//! A kernel VFIO device's migration as the engine drives it: the v2 state machine in the same
//! steps, and with the same meaning, as `vmig_vfio_user::client::DeviceMigration` gives a vfio-user
//! device, so the engine moves both alike.
//!
//! | step | `MIG_DEVICE_STATE` | data fd |
//! |---|---|---|
//! | `start_precopy` | PRE_COPY (if supported) | opened |
//! | `read_precopy` | — | read until `ENOMSG` (nothing more for now) |
//! | `precopy_info` | — | `VFIO_MIG_GET_PRECOPY_INFO` |
//! | `stop_copy_size` | — (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`) | — |
//! | `quiesce_p2p` | PRE_COPY_P2P or RUNNING_P2P (if P2P) | kept |
//! | `stop` | STOP_COPY | PRE_COPY's fd, or a new one |
//! | `next_stop_copy_chunk` | — | read, until end of file |
//! | `finish_source` | STOP | closed |
//! | `cancel` | RUNNING (else a reset) | closed |
//! | `start_resume` | RESUMING | opened |
//! | `write_chunk` | — | written |
//! | `load` | STOP (the device loads what it was given) | closed |
//! | `start_p2p` | RUNNING_P2P (if P2P) | — |
//! | `run` | RUNNING | — |
//!
//! With several devices the engine walks them through the P2P states together (the uAPI's
//! rule for peer-to-peer DMA, `linux/vfio.h`: "RUNNING_P2P ... all devices must be in this
//! state before any is moved to STOP"): every device quiesces before any stops, and on the
//! destination every device is loaded and in RUNNING_P2P before any runs.

use crate::device::{Device, MigState};
use crate::error::{Result, VfioError};

pub use vfio_ioctls::PrecopyInfo;

/// Bytes read from the data fd at once.
const READ_CHUNK: usize = 1 << 20;

/// Most pre-copy bytes one [`KernelMigration::read_precopy`] takes: a device that keeps
/// producing state is read again at the next pass rather than holding up this one.
pub const MAX_PRECOPY_READ: usize = 64 << 20;

/// The migration of one kernel VFIO device that offers v2 with `STOP_COPY`.
#[derive(Debug, Clone, Copy)]
pub struct KernelMigration<'a> {
    device: &'a Device,
    pre_copy: bool,
    p2p: bool,
}

impl<'a> KernelMigration<'a> {
    /// Drives `device`'s migration; `pre_copy` when it offers `VFIO_MIGRATION_PRE_COPY`, `p2p`
    /// when it offers `VFIO_MIGRATION_P2P`.
    pub fn new(device: &'a Device, pre_copy: bool, p2p: bool) -> Self {
        Self {
            device,
            pre_copy,
            p2p,
        }
    }

    /// The device's migration state.
    pub fn state(&self) -> Result<MigState> {
        self.device.migration_state()
    }

    /// Whether the device has the P2P states.
    pub fn p2p(&self) -> bool {
        self.p2p
    }

    fn set(&self, state: MigState) -> Result<()> {
        let result = self.device.set_migration_state(state).and_then(|()| {
            // The kernel walks the arcs in between, and a driver may stop on an error state.
            let now = self.device.migration_state()?;
            if now == state {
                return Ok(());
            }
            Err(VfioError::Kernel(format!(
                "{}: asked for migration state {state}, the device is in {now}",
                self.device.name()
            )))
        });
        match result {
            Err(e) if self.device.migration_state().ok() == Some(MigState::Error) => {
                // "ERROR ... the device cannot leave except by VFIO_DEVICE_RESET".
                self.reset_after(state, e)
            }
            other => other,
        }
    }

    /// Resets the device after it failed to reach `state` with `error`, when it can.
    fn reset_after(&self, state: MigState, error: VfioError) -> Result<()> {
        if !self.device.can_reset() {
            return Err(error);
        }
        tracing::warn!(
            device = self.device.name(),
            error = %error,
            "the device failed to go to {state}; resetting it"
        );
        if let Err(reset) = self.device.reset() {
            return Err(VfioError::Kernel(format!(
                "{}: it could not go to {state} ({error}), and the reset after that failed too \
                 ({reset})",
                self.device.name()
            )));
        }
        Err(VfioError::ResetAfterFailedStateChange {
            device: self.device.name().to_owned(),
            state: state.to_string(),
            source: Box::new(error),
        })
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

    /// In PRE_COPY: what of the initial state and of the state dirtied since is still to be
    /// read (`VFIO_MIG_GET_PRECOPY_INFO`); `None` for a device without PRE_COPY, or one not in
    /// a PRE_COPY state.
    pub fn precopy_info(&self) -> Result<Option<PrecopyInfo>> {
        if !self.pre_copy
            || !matches!(
                self.device.migration_state()?,
                MigState::PreCopy | MigState::PreCopyP2p
            )
        {
            return Ok(None);
        }
        self.device.precopy_info().map(Some)
    }

    /// The device's estimate of the state it will give in STOP_COPY
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`); `None` when its driver gives none.
    pub fn stop_copy_size(&self) -> Option<u64> {
        self.device.stop_copy_size()
    }

    /// Before any device stops: a device with the P2P states stops initiating peer-to-peer
    /// DMA and answering it with side effects (PRE_COPY → PRE_COPY_P2P, RUNNING → RUNNING_P2P);
    /// others are left as they are.
    pub fn quiesce_p2p(&self) -> Result<()> {
        if !self.p2p {
            return Ok(());
        }
        match self.device.migration_state()? {
            MigState::PreCopy => self.set(MigState::PreCopyP2p),
            MigState::Running => self.set(MigState::RunningP2p),
            _ => Ok(()),
        }
    }

    /// Stops the device: its remaining state is then read with
    /// [`Self::next_stop_copy_chunk`].
    pub fn stop(&self) -> Result<()> {
        self.set(MigState::StopCopy)
    }

    /// The next chunk of the stopped device's state, as it is read from the data fd (at most
    /// 1 MiB); `None` at its end.
    pub fn next_stop_copy_chunk(&self) -> Result<Option<Vec<u8>>> {
        let mut chunk = vec![0u8; READ_CHUNK];
        let n = self.device.read_state(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        chunk.truncate(n);
        Ok(Some(chunk))
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
            Err(e @ VfioError::ResetAfterFailedStateChange { .. }) => Err(e),
            Err(e) => self.reset_after(MigState::Running, e),
            ok => ok,
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

    /// After [`Self::load`], before any device runs: a device with the P2P states goes to
    /// RUNNING_P2P (running, but initiating no peer-to-peer DMA yet).
    pub fn start_p2p(&self) -> Result<()> {
        if self.p2p {
            self.set(MigState::RunningP2p)?;
        }
        Ok(())
    }

    /// Starts the device (after [`Self::load`]).
    pub fn run(&self) -> Result<()> {
        self.set(MigState::Running)
    }
}
