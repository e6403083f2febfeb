//! What the engine needs of a device, whichever way it is reached: a vfio-user server over its
//! socket, or a PCI device through the kernel's VFIO. Both give trapped region access, reset,
//! the same migration steps ([`DeviceMigrator`], the v2 state machine or v1's region) and a
//! DMA dirty log (see [`crate::dirty::DeviceSource`]).
//!
//! | | vfio-user ([`Client`]) | kernel VFIO ([`KernelDevice`]) |
//! |---|---|---|
//! | region access | `REGION_READ/WRITE` messages | `pread`/`pwrite` on the device fd |
//! | migration | v2 `MIG_DEVICE_STATE` + `MIG_DATA_*`, or v1 region | v2 `MIG_DEVICE_STATE` + data fd |
//! | DMA dirty log | `DMA_LOGGING_*`, or v1 `DIRTY_PAGES` | `DMA_LOGGING_*`, or the container's `DIRTY_PAGES` |

use std::sync::Arc;

use vmig_vfio::KernelMigration;
use vmig_vfio_user::client::{Client, ClientError};
use vmig_vfio_user::client::{DeviceMigration, Protocol};

pub use crate::kernel_device::KernelDevice;

/// A device call's failure, from either transport.
#[derive(Debug, thiserror::Error)]
pub enum DeviceOpError {
    /// The vfio-user server's (or the connection's).
    #[error(transparent)]
    User(#[from] ClientError),
    /// The kernel's.
    #[error(transparent)]
    Kernel(#[from] vmig_vfio::VfioError),
}

type OpResult<T> = std::result::Result<T, DeviceOpError>;

/// A device, however it is reached; cloning shares it.
#[derive(Clone, Debug)]
pub enum DeviceHandle {
    /// Served by a vfio-user server.
    User(Arc<Client>),
    /// Bound to vfio-pci on this host.
    Kernel(Arc<KernelDevice>),
}

impl DeviceHandle {
    /// Reads `buf.len()` bytes at `offset` of region `region`.
    pub fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> OpResult<()> {
        match self {
            Self::User(client) => Ok(client.region_read(region, offset, buf)?),
            Self::Kernel(k) => Ok(k.device.read_region(region, offset, buf)?),
        }
    }

    /// Writes `data` at `offset` of region `region`.
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> OpResult<()> {
        match self {
            Self::User(client) => Ok(client.region_write(region, offset, data)?),
            Self::Kernel(k) => Ok(k.device.write_region(region, offset, data)?),
        }
    }

    /// Resets the device.
    pub fn reset(&self) -> OpResult<()> {
        match self {
            Self::User(client) => Ok(client.reset()?),
            Self::Kernel(k) => Ok(k.device.reset()?),
        }
    }

    /// How it is reached and what it is: "vfio-user", or "vfio-pci VVVV:DDDD" with its PCI
    /// vendor and device IDs.
    pub fn kind(&self) -> String {
        match self {
            Self::User(_) => "vfio-user".into(),
            Self::Kernel(k) => {
                let mut id = [0u8; 4];
                match k.device.read_config(0, &mut id) {
                    Ok(()) => format!(
                        "vfio-pci {:04x}:{:04x}",
                        u16::from_le_bytes([id[0], id[1]]),
                        u16::from_le_bytes([id[2], id[3]])
                    ),
                    Err(_) => "vfio-pci".into(),
                }
            }
        }
    }

    /// The device's migration driver, for a protocol found at attach.
    pub fn migration(&self, protocol: Protocol) -> DeviceMigrator<'_> {
        match self {
            Self::User(client) => {
                DeviceMigrator::User(DeviceMigration::with_protocol(client, protocol))
            }
            Self::Kernel(k) => {
                let pre_copy = matches!(protocol, Protocol::V2 { pre_copy: true });
                DeviceMigrator::Kernel(KernelMigration::new(&k.device, pre_copy))
            }
        }
    }
}

/// One device's migration steps (see `vmig_vfio_user::device_migration` for what each does in
/// each protocol).
#[derive(Debug)]
pub enum DeviceMigrator<'a> {
    /// A vfio-user device.
    User(DeviceMigration<'a>),
    /// A kernel VFIO device (v2).
    Kernel(KernelMigration<'a>),
}

macro_rules! forward {
    ($(#[$doc:meta] $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        impl DeviceMigrator<'_> {
            $(
                #[$doc]
                pub fn $name(&self $(, $arg: $ty)*) -> OpResult<$ret> {
                    match self {
                        Self::User(m) => Ok(m.$name($($arg),*)?),
                        Self::Kernel(m) => Ok(m.$name($($arg),*)?),
                    }
                }
            )*
        }
    };
}

forward! {
    /// Starts saving while the device runs.
    start_precopy() -> ();
    /// The state the device has ready now (pre-copy; more may follow).
    read_precopy() -> Vec<Vec<u8>>;
    /// Stops the device and reads the rest of its state.
    stop_and_copy() -> Vec<Vec<u8>>;
    /// The source is done: the device stays stopped.
    finish_source() -> ();
    /// Abandons a migration: the device runs again.
    cancel() -> ();
    /// Prepares the destination device to receive state.
    start_resume() -> ();
    /// Gives the destination device one chunk, as the source produced it.
    write_chunk(chunk: &[u8]) -> ();
    /// The device loads what it was given and stays stopped.
    load() -> ();
    /// Starts the device (after `load`).
    run() -> ();
}
