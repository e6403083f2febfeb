//! What the engine needs of a device, whichever way it is reached: one trait,
//! [`MigratableDevice`], implemented for a vfio-user server over its socket ([`UserDevice`])
//! and for a PCI device or an mdev through the kernel's VFIO ([`KernelDevice`]). A third kind of device is
//! one more implementation of it; nothing else in the engine branches on the kind.
//!
//! | | vfio-user ([`UserDevice`]) | kernel VFIO ([`KernelDevice`]) |
//! |---|---|---|
//! | region access | `REGION_READ/WRITE` messages | `pread`/`pwrite` on the device fd |
//! | interrupts | `SET_IRQS` with eventfds | `VFIO_DEVICE_SET_IRQS` with eventfds |
//! | migration | v2 `MIG_DEVICE_STATE` + `MIG_DATA_*`, or v1 region | v2 `MIG_DEVICE_STATE` + data fd |
//! | DMA dirty log | `DMA_LOGGING_*`, or v1 `DIRTY_PAGES` | `DMA_LOGGING_*`, or the container's `DIRTY_PAGES` |
//!
//! Opening a device (connecting, mapping guest RAM for its DMA, the reset a booting VM expects)
//! is each kind's own constructor; everything after it (placing BARs, wiring interrupts, the
//! migration steps, the dirty log) goes through the trait.

mod kernel;
mod vfio_user;

use std::fmt;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};
use vmig_kvm::irq::MsiVector;
use vmig_primitives::mig_state::MigState;
use vmig_primitives::{DmaRange, RegionArea};

pub use kernel::{KernelDevice, KernelDeviceId};
pub use vfio_user::{AttachError, UserDevice};

/// A device call's failure, from either transport.
#[derive(Debug, thiserror::Error)]
pub enum DeviceOpError {
    /// The vfio-user server's (or the connection's).
    #[error(transparent)]
    User(#[from] vmig_vfio_user::client::ClientError),
    /// The kernel's.
    #[error(transparent)]
    Kernel(#[from] vmig_vfio::VfioError),
    /// The device has no DMA dirty log ([`DirtyLogKind::None`]).
    #[error("the device's DMA is not tracked: it offers neither DMA logging nor DIRTY_PAGES")]
    Untracked,
}

/// The result of a device call.
pub type OpResult<T> = std::result::Result<T, DeviceOpError>;

/// How a device is reached and what it is; it travels in the stream's Config record, and a
/// destination refuses a device of another kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// Served by a vfio-user server.
    VfioUser,
    /// A PCI device of this host bound to vfio-pci, with its vendor and device IDs when its
    /// config space could be read.
    VfioPci {
        /// `(vendor, device)`.
        ids: Option<(u16, u16)>,
    },
    /// A mediated device of this host (an mdev, opened by UUID) that presents itself as PCI,
    /// with the vendor and device IDs its emulated config space gives: the kernel's `mtty`
    /// sample is 4348:3253. Its DMA dirty tracking differs from a vfio-pci device's, so a
    /// destination must not take one for the other.
    VfioMdev {
        /// `(vendor, device)`.
        ids: Option<(u16, u16)>,
    },
}

impl fmt::Display for DeviceKind {
    /// "vfio-user", "vfio-pci VVVV:DDDD" or "vfio-mdev VVVV:DDDD".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, ids) = match self {
            Self::VfioUser => return f.write_str("vfio-user"),
            Self::VfioPci { ids } => ("vfio-pci", ids),
            Self::VfioMdev { ids } => ("vfio-mdev", ids),
        };
        f.write_str(name)?;
        match ids {
            Some((vendor, device)) => write!(f, " {vendor:04x}:{device:04x}"),
            None => Ok(()),
        }
    }
}

/// The VFIO migration protocol a device speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationProtocol {
    /// v1: the migration region (`device_state`, `pending_bytes`, `data_offset`, `data_size`).
    V1,
    /// v2: the `MIG_DEVICE_STATE` state machine, with or without PRE_COPY.
    V2 {
        /// PRE_COPY supported.
        pre_copy: bool,
    },
}

impl MigrationProtocol {
    /// "v1" or "v2".
    pub fn name(&self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 { .. } => "v2",
        }
    }
}

/// How a device reports the pages its DMA wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogKind {
    /// The device logs its own DMA (`DMA_LOGGING_*`).
    DmaLogging,
    /// The IOMMU beneath it does (`DIRTY_PAGES`: v1 vfio-user, or a kernel type1 container).
    DirtyPages,
    /// Nothing does: a vfio-user server that offers neither (seed 002's VF). Only a mediator
    /// ([`crate::mediator`]) can tell which pages it writes.
    None,
}

impl DirtyLogKind {
    /// "dma logging", "dirty pages" or "none", as reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::DmaLogging => "dma logging",
            Self::DirtyPages => "dirty pages",
            Self::None => "none",
        }
    }
}

/// The address space a BAR decodes: guest-physical memory, or guest I/O ports (its
/// config-space register has bit 0 set). It travels in the stream's Config record, in each
/// [`crate::machine::Bar`]; a record without it (an older source) means memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BarSpace {
    /// A memory BAR: placed in the guest's MMIO window, mappable.
    #[default]
    Memory,
    /// An I/O-port BAR: placed in the guest's I/O-port window, every access trapped.
    Io,
}

impl BarSpace {
    /// Whether this is [`BarSpace::Memory`] (serde leaves the field out then, so a memory
    /// BAR's record is what it always was).
    pub fn is_memory(&self) -> bool {
        *self == Self::Memory
    }

    /// From a BAR's "decodes I/O ports" flag.
    pub fn from_io(io: bool) -> Self {
        if io { Self::Io } else { Self::Memory }
    }
}

/// A region as BAR placement sees it.
#[derive(Debug)]
pub struct RegionView {
    /// Region index (0-5 for BARs).
    pub index: u32,
    /// Bytes.
    pub size: u64,
    /// Memory or I/O ports, as the device's config space says (memory when it has none).
    pub space: BarSpace,
    /// The fd its mappable areas are mapped from, and the region's offset in it.
    pub mmap: Option<(OwnedFd, u64)>,
    /// Mappable areas.
    pub areas: Vec<RegionArea>,
    /// Whether the guest may write it.
    pub writable: bool,
}

/// A device's interrupt kinds: the two the engine wires, in the order it tries them, and
/// INTx, which it only asks about (to say that a device that has nothing else is unwired).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// MSI-X.
    Msix,
    /// MSI.
    Msi,
    /// The legacy interrupt line (INTx): not wired.
    Intx,
}

impl InterruptKind {
    /// The VFIO IRQ index of this kind (the same in the kernel's VFIO and in vfio-user).
    pub fn index(self) -> u32 {
        match self {
            Self::Msix => vmig_primitives::uapi::VFIO_PCI_MSIX_IRQ_INDEX,
            Self::Msi => vmig_primitives::uapi::VFIO_PCI_MSI_IRQ_INDEX,
            Self::Intx => vmig_primitives::uapi::VFIO_PCI_INTX_IRQ_INDEX,
        }
    }
}

/// What a device says of one interrupt kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptInfo {
    /// Vectors.
    pub count: u32,
    /// Whether they can signal eventfds.
    pub eventfd: bool,
}

/// A device the engine can attach, run and migrate (see the module doc).
pub trait MigratableDevice: Send + Sync + fmt::Debug {
    /// How it is reached and what it is.
    fn kind(&self) -> DeviceKind;
    /// Reads `buf.len()` bytes at `offset` of region `region`.
    fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> OpResult<()>;
    /// Writes `data` at `offset` of region `region`.
    fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> OpResult<()>;
    /// Resets the device.
    fn reset(&self) -> OpResult<()>;
    /// Its BARs (regions 0-5) that the guest may access, with what of them can be mapped.
    fn bar_regions(&self) -> OpResult<Vec<RegionView>>;
    /// What it has of interrupt kind `kind`; `None` when it has none of that kind.
    fn interrupt_info(&self, kind: InterruptKind) -> OpResult<Option<InterruptInfo>>;
    /// Connects vectors `0..vectors.len()` of `kind` to `vectors`' eventfds; `false` when the
    /// device refuses (the engine then tries the next kind).
    fn set_interrupts(&self, kind: InterruptKind, vectors: &[MsiVector]) -> OpResult<bool>;
    /// The protocol its state migrates by (found when it was opened), or why it cannot migrate
    /// ("cannot migrate: ...").
    fn migration_protocol(&self) -> std::result::Result<MigrationProtocol, String>;
    /// Its migration steps in that protocol; `None` when it cannot migrate.
    fn migration(&self) -> Option<Box<dyn MigrationSteps + '_>>;
    /// How it reports the pages its DMA wrote.
    fn dirty_log_kind(&self) -> DirtyLogKind;
    /// Starts logging DMA over the IOVA `ranges` (start, bytes) at `page_size` or coarser;
    /// returns the page size of the reports.
    fn dirty_log_start(&self, page_size: u64, ranges: &[DmaRange]) -> OpResult<u64>;
    /// The pages written in `[iova, iova + size)` since the last report, one bit per
    /// `page_size` bytes, and forgets them.
    fn dirty_log_report(&self, iova: u64, size: u64, page_size: u64) -> OpResult<Vec<u64>>;
    /// Stops logging.
    fn dirty_log_stop(&self) -> OpResult<()>;
    /// IOVA pages the device wrote through the VMM rather than by DMA (vfio-user's
    /// `DMA_WRITE` messages) since the last call.
    fn take_message_dma_pages(&self) -> Vec<u64> {
        Vec::new()
    }
    /// Whether the log reports every mapped page at every harvest, whatever was written (the
    /// type1 container of a vfio-pci device: "every mapped page is always reported dirty",
    /// kernel-vfio-type1-observed); auto-converge cannot help such a source.
    fn dirty_log_reports_everything(&self) -> bool {
        false
    }
}

/// What of a device's pre-copy state is still to be read (`VFIO_MIG_GET_PRECOPY_INFO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyPending {
    /// Bytes of the initial state not yet read: the destination needs all of it before the
    /// switchover (QEMU's switchover-ack).
    pub initial_bytes: u64,
    /// Bytes of state dirtied since pre-copy began, not yet read.
    pub dirty_bytes: u64,
}

/// One device's migration steps, the same for every protocol (see
/// `vmig_vfio_user::client::DeviceMigration` and `vmig_vfio::KernelMigration` for what each
/// does in v1, v2 and the kernel's v2). The defaults are those of a device that offers no
/// pre-copy accounting, no stop-copy estimate and no P2P states.
pub trait MigrationSteps {
    /// Starts saving while the device runs.
    fn start_precopy(&self) -> OpResult<()>;
    /// The state the device has ready now (pre-copy; more may follow).
    fn read_precopy(&self) -> OpResult<Vec<Vec<u8>>>;
    /// In pre-copy: what is still to be read; `None` when the device does not say.
    fn precopy_info(&self) -> OpResult<Option<PrecopyPending>> {
        Ok(None)
    }
    /// The device's estimate of the bytes it will give in stop-and-copy; `None` when it has
    /// none.
    fn stop_copy_size(&self) -> Option<u64> {
        None
    }
    /// Whether it has the P2P states ([`Self::quiesce_p2p`], [`Self::start_p2p`] act).
    fn p2p(&self) -> bool {
        false
    }
    /// Before any device of the VM stops: stop initiating peer-to-peer DMA.
    fn quiesce_p2p(&self) -> OpResult<()> {
        Ok(())
    }
    /// Stops the device; the rest of its state is then read with
    /// [`Self::next_stop_copy_chunk`].
    fn stop(&self) -> OpResult<()>;
    /// The next chunk of the stopped device's state, as it is read; `None` at its end.
    fn next_stop_copy_chunk(&self) -> OpResult<Option<Vec<u8>>>;
    /// The source is done: the device stays stopped.
    fn finish_source(&self) -> OpResult<()>;
    /// Abandons a migration: the device runs again.
    fn cancel(&self) -> OpResult<()>;
    /// Prepares the destination device to receive state.
    fn start_resume(&self) -> OpResult<()>;
    /// Gives the destination device one chunk, as the source produced it.
    fn write_chunk(&self, chunk: &[u8]) -> OpResult<()>;
    /// The device loads what it was given and stays stopped.
    fn load(&self) -> OpResult<()>;
    /// After every device of the VM loaded, before any runs: run without initiating
    /// peer-to-peer DMA.
    fn start_p2p(&self) -> OpResult<()> {
        Ok(())
    }
    /// Starts the device (after `load`).
    fn run(&self) -> OpResult<()>;
    /// The device's v2 migration state, when it has one to tell.
    fn state(&self) -> OpResult<Option<MigState>> {
        Ok(None)
    }
}

/// Implements [`MigrationSteps`] for a protocol driver whose methods have the same names and
/// return its own error type; `$extra` are further trait methods the driver overrides.
macro_rules! migration_steps {
    ($driver:ty $(, $extra:item)* $(,)?) => {
        impl $crate::device::MigrationSteps for $driver {
            fn start_precopy(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::start_precopy(self)?)
            }
            fn read_precopy(&self) -> $crate::device::OpResult<Vec<Vec<u8>>> {
                Ok(<$driver>::read_precopy(self)?)
            }
            fn stop(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::stop(self)?)
            }
            fn next_stop_copy_chunk(&self) -> $crate::device::OpResult<Option<Vec<u8>>> {
                Ok(<$driver>::next_stop_copy_chunk(self)?)
            }
            fn finish_source(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::finish_source(self)?)
            }
            fn cancel(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::cancel(self)?)
            }
            fn start_resume(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::start_resume(self)?)
            }
            fn write_chunk(&self, chunk: &[u8]) -> $crate::device::OpResult<()> {
                Ok(<$driver>::write_chunk(self, chunk)?)
            }
            fn load(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::load(self)?)
            }
            fn run(&self) -> $crate::device::OpResult<()> {
                Ok(<$driver>::run(self)?)
            }
            $($extra)*
        }
    };
}
use migration_steps;
