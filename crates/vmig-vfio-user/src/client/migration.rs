//! One interface over both VFIO migration protocols, for the migration engine: it detects what
//! a device speaks (v2 through `DEVICE_FEATURE` `MIGRATION`, else v1 through a region of type 3
//! subtype 1) and drives pre-copy, stop-and-copy and resume the same way for both. State moves
//! as chunks; a destination receives each chunk as the source produced it (v1 requires "the same
//! transaction size at source", seed000 §2.5).
//!
//! | step | v2 | v1 (`device_state`) |
//! |---|---|---|
//! | `start_precopy` | PRE_COPY (if supported) | 011 |
//! | `read_precopy` | MIG_DATA_READ until short | pending → data_offset → data_size → data, while pending > 0 |
//! | `stop` | STOP_COPY | 010 |
//! | `next_stop_copy_chunk` | one MIG_DATA_READ (empty: the end) | one transaction, while pending > 0 |
//! | `finish_source` | STOP | 000 |
//! | `cancel` | RUNNING | 001 |
//! | `start_resume` | RESUMING | 100 |
//! | `write_chunk` | MIG_DATA_WRITE | data at data_offset, then data_size |
//! | `load` | STOP (loads the data) | 000 (loads the data) |
//! | `run` | RUNNING | 001 |

use vmig_dma::uapi::device_state;

use crate::client::{Client, ClientError};
use crate::wire::{Command, MIGRATION_PRE_COPY, REGION_SUBTYPE_MIGRATION, REGION_TYPE_MIGRATION};
use vmig_primitives::mig_state::MigState;

type Result<T> = std::result::Result<T, ClientError>;

/// The protocol a device speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The migration region at this index.
    V1 {
        /// Region index.
        region: u32,
        /// Bytes from `data_offset` to the region's end.
        region_size: u64,
    },
    /// `DEVICE_FEATURE` migration.
    V2 {
        /// PRE_COPY supported.
        pre_copy: bool,
    },
}

impl Protocol {
    /// "v1" or "v2".
    pub fn name(&self) -> &'static str {
        match self {
            Self::V1 { .. } => "v1",
            Self::V2 { .. } => "v2",
        }
    }
}

/// A device's migration, whatever its protocol.
#[derive(Debug)]
pub struct DeviceMigration<'a> {
    client: &'a Client,
    protocol: Protocol,
}

/// Largest v1 chunk read at once.
const MAX_CHUNK: u64 = 64 << 20;

/// Most chunks one read loop takes before deciding the device is misbehaving.
const MAX_CHUNKS: usize = 1 << 20;

impl<'a> DeviceMigration<'a> {
    /// Finds the protocol `client`'s device speaks; `None` when it cannot migrate.
    pub fn detect(client: &'a Client) -> Result<Option<Self>> {
        if let Some(flags) = client.migration_flags()? {
            let protocol = Protocol::V2 {
                pre_copy: flags & MIGRATION_PRE_COPY != 0,
            };
            return Ok(Some(Self { client, protocol }));
        }
        let regions = client.device_info()?.num_regions;
        for index in 0..regions.min(64) {
            let Ok(region) = client.region_info(index) else {
                continue;
            };
            if region.region_type == Some((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION)) {
                let protocol = Protocol::V1 {
                    region: index,
                    region_size: region.info.size,
                };
                return Ok(Some(Self { client, protocol }));
            }
        }
        Ok(None)
    }

    /// Drives `client`'s device with a protocol found earlier by [`Self::detect`].
    pub fn with_protocol(client: &'a Client, protocol: Protocol) -> Self {
        Self { client, protocol }
    }

    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The device's v2 state (`None` for a v1 device, whose `device_state` bits are no v2
    /// state).
    pub fn v2_state(&self) -> Result<Option<MigState>> {
        match self.protocol {
            Protocol::V2 { .. } => self.client.mig_state().map(Some),
            Protocol::V1 { .. } => Ok(None),
        }
    }

    fn v1_read(&self, region: u32, offset: u64) -> Result<u64> {
        let mut bytes = [0u8; 8];
        let width = if offset < 8 { 4 } else { 8 };
        self.client
            .region_read(region, offset, &mut bytes[..width])?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn v1_set(&self, region: u32, bits: u32) -> Result<()> {
        let current =
            u32::try_from(self.v1_read(region, 0)?).map_err(|_| ClientError::Protocol {
                command: Command::RegionRead,
                why: "device_state is wider than 32 bits".into(),
            })?;
        // Read-modify-write: the reserved bits are preserved (seed000 §2.2).
        let next = (current & !device_state::MASK) | bits;
        self.client.region_write(region, 0, &next.to_le_bytes())
    }

    fn v2_set(&self, state: MigState) -> Result<()> {
        let now = self.client.set_mig_state(state)?;
        if now != state {
            return Err(ClientError::Protocol {
                command: Command::DeviceFeature,
                why: format!("asked for {state}, the device reports {now}"),
            });
        }
        Ok(())
    }

    /// Starts saving while the device runs (a device without PRE_COPY stays running).
    pub fn start_precopy(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { pre_copy: true } => self.v2_set(MigState::PreCopy),
            Protocol::V2 { pre_copy: false } => Ok(()),
            Protocol::V1 { region, .. } => {
                self.v1_set(region, device_state::RUNNING | device_state::SAVING)
            }
        }
    }

    /// One v1 transaction: `None` when `pending_bytes` is 0.
    fn v1_chunk(&self, region: u32, region_size: u64) -> Result<Option<Vec<u8>>> {
        if self.v1_read(region, 8)? == 0 {
            return Ok(None);
        }
        let offset = self.v1_read(region, 16)?;
        let size = self.v1_read(region, 24)?;
        if offset < 32 || offset.checked_add(size).is_none_or(|end| end > region_size) || size == 0
        {
            return Err(ClientError::Protocol {
                command: Command::RegionRead,
                why: format!(
                    "data_offset {offset:#x} and data_size {size:#x} do not fit the {region_size:#x}-byte region"
                ),
            });
        }
        if size > MAX_CHUNK {
            return Err(ClientError::Protocol {
                command: Command::RegionRead,
                why: format!("data_size {size:#x}: at most {MAX_CHUNK:#x} is read at once"),
            });
        }
        let mut chunk = vec![0u8; usize::try_from(size).unwrap_or(0)];
        self.client.region_read(region, offset, &mut chunk)?;
        Ok(Some(chunk))
    }

    fn v1_drain(&self, region: u32, region_size: u64) -> Result<Vec<Vec<u8>>> {
        let mut chunks = Vec::new();
        while let Some(chunk) = self.v1_chunk(region, region_size)? {
            if chunks.len() >= MAX_CHUNKS {
                return Err(ClientError::Protocol {
                    command: Command::RegionRead,
                    why: "pending_bytes never reaches 0".into(),
                });
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// The state the device has ready now (pre-copy; more may follow).
    pub fn read_precopy(&self) -> Result<Vec<Vec<u8>>> {
        match self.protocol {
            Protocol::V2 { pre_copy: true } => Ok(vec![self.client.mig_data_read_all()?]),
            Protocol::V2 { pre_copy: false } => Ok(Vec::new()),
            Protocol::V1 {
                region,
                region_size,
            } => self.v1_drain(region, region_size),
        }
    }

    /// Stops the device: its remaining state is then read with
    /// [`Self::next_stop_copy_chunk`].
    pub fn stop(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::StopCopy),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::SAVING),
        }
    }

    /// The next chunk of the stopped device's state, as the device produces it (v2: one
    /// `MIG_DATA_READ`; v1: one `pending_bytes` → `data_offset` → `data_size` → data
    /// transaction, which the destination must get whole); `None` at its end.
    pub fn next_stop_copy_chunk(&self) -> Result<Option<Vec<u8>>> {
        match self.protocol {
            Protocol::V2 { .. } => {
                let part = self.client.mig_data_read(self.client.chunk())?;
                Ok((!part.is_empty()).then_some(part))
            }
            Protocol::V1 {
                region,
                region_size,
            } => self.v1_chunk(region, region_size),
        }
    }

    /// Stops the device and reads the rest of its state at once (the engine streams it with
    /// [`Self::stop`] and [`Self::next_stop_copy_chunk`]).
    pub fn stop_and_copy(&self) -> Result<Vec<Vec<u8>>> {
        self.stop()?;
        let mut chunks = Vec::new();
        while let Some(chunk) = self.next_stop_copy_chunk()? {
            if chunks.len() >= MAX_CHUNKS {
                return Err(ClientError::Protocol {
                    command: Command::MigDataRead,
                    why: "the device's state never ends".into(),
                });
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// The source is done: the device stays stopped.
    pub fn finish_source(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::Stop),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::STOP),
        }
    }

    /// Abandons a migration: the device runs again and saved data is dropped.
    pub fn cancel(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::Running),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::RUNNING),
        }
    }

    /// Prepares the destination device to receive state.
    pub fn start_resume(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::Resuming),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::RESUMING),
        }
    }

    /// Gives the destination device one chunk, as the source produced it.
    pub fn write_chunk(&self, chunk: &[u8]) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.client.mig_data_write(chunk),
            Protocol::V1 {
                region,
                region_size,
            } => {
                let offset = self.v1_read(region, 16)?;
                if offset < 32
                    || offset
                        .checked_add(chunk.len() as u64)
                        .is_none_or(|end| end > region_size)
                {
                    return Err(ClientError::Protocol {
                        command: Command::RegionWrite,
                        why: format!(
                            "a {}-byte chunk does not fit the data section at {offset:#x}",
                            chunk.len()
                        ),
                    });
                }
                self.client.region_write(region, offset, chunk)?;
                self.client
                    .region_write(region, 24, &(chunk.len() as u64).to_le_bytes())
            }
        }
    }

    /// The destination has all the state: the device loads it and stays stopped (so the VMM
    /// can verify everything before anything runs); [`Self::run`] starts it.
    pub fn load(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::Stop),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::STOP),
        }
    }

    /// Starts the device (after [`Self::load`]).
    pub fn run(&self) -> Result<()> {
        match self.protocol {
            Protocol::V2 { .. } => self.v2_set(MigState::Running),
            Protocol::V1 { region, .. } => self.v1_set(region, device_state::RUNNING),
        }
    }

    /// [`Self::load`] then [`Self::run`].
    pub fn finish_resume(&self) -> Result<()> {
        self.load()?;
        self.run()
    }
}
