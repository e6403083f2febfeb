//! A device served over vfio-user, as a [`MigratableDevice`]: the engine's side of the
//! `vmig_vfio_user` client, with guest RAM offered to the server for DMA by fd and by message.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use vmig_primitives::GuestAddress;
use vmig_primitives::{DmaRange, RegionArea};

use vmig_kvm::GuestMemory;
use vmig_kvm::irq::MsiVector;
use vmig_vfio_user::client::{Client, ClientError, DmaMemory};
use vmig_vfio_user::client::{DeviceMigration, Protocol};
use vmig_vfio_user::wire::{
    DEVICE_FLAGS_RESET, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, FEATURE_DMA_LOGGING_START,
    FEATURE_SET, IRQ_INFO_EVENTFD, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};

use super::{
    BarSpace, DeviceKind, DeviceOpError, DirtyLogKind, InterruptInfo, InterruptKind,
    MigratableDevice, MigrationProtocol, MigrationSteps, OpResult, RegionView, migration_steps,
};

/// `EFAULT`: the errno a DMA message outside guest RAM gets.
const EFAULT: i32 = 14;

/// A vfio-user device: the connection to its server and the protocol it migrates by.
#[derive(Debug)]
pub struct UserDevice {
    client: Client,
    protocol: Option<Protocol>,
    /// The server offers DMA logging (probed at attach).
    dma_logging: bool,
    /// The server offers `DIRTY_PAGES` over its IOMMU (the version's `migration` capability).
    dirty_pages: bool,
}

/// Guest RAM by IOVA for a server's message-based DMA (the engine maps guest RAM with IOVA =
/// guest-physical address, so an IOVA here is one); writes are recorded as the VMM's, so
/// migration sees them.
struct GuestDma(Arc<GuestMemory>);

impl DmaMemory for GuestDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.0.read(GuestAddress(iova), buf).map_err(|_| EFAULT)
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), i32> {
        self.0.write(GuestAddress(iova), data).map_err(|_| EFAULT)
    }
}

impl UserDevice {
    /// Connects to the server at `socket`, resets the device when it supports reset (a new VM
    /// starts from a device at reset, whatever an earlier VMM or migration left it in), maps
    /// every slot of `memory` for its DMA (by fd, and by message for what it cannot map), and
    /// finds its migration protocol.
    pub fn attach(socket: &Path, memory: &Arc<GuestMemory>) -> Result<Self, AttachError> {
        let dma: Arc<dyn DmaMemory> = Arc::new(GuestDma(Arc::clone(memory)));
        let client = Client::connect(socket, Some(dma)).map_err(|source| match source {
            ClientError::Busy { .. } => AttachError::Busy(source),
            source => AttachError::Connect {
                socket: socket.display().to_string(),
                source,
            },
        })?;
        let info = client.device_info()?;
        if info.flags & DEVICE_FLAGS_RESET != 0 {
            client.reset()?;
        }
        for slot in memory.slots() {
            client.dma_map(
                slot.layout.gpa,
                slot.layout.size,
                DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                Some((slot.fd(), 0)),
            )?;
        }
        let protocol = DeviceMigration::detect(&client)?.map(|m| m.protocol());
        let dma_logging = client.probe_feature(FEATURE_DMA_LOGGING_START, FEATURE_SET)?;
        let dirty_pages = client.server_caps().migration.is_some();
        Ok(Self {
            client,
            protocol,
            dma_logging,
            dirty_pages,
        })
    }

    /// The client, for what only vfio-user has.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Why a vfio-user device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Nothing answered at the socket, or it did not speak vfio-user.
    #[error("connecting to {socket}: {source}")]
    Connect {
        /// The server's socket.
        socket: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The server serves another client (its message names the socket).
    #[error(transparent)]
    Busy(ClientError),
    /// A request of the setup failed.
    #[error(transparent)]
    Request(#[from] ClientError),
}

impl MigratableDevice for UserDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::VfioUser
    }

    fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> OpResult<()> {
        Ok(self.client.region_read(region, offset, buf)?)
    }

    fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> OpResult<()> {
        Ok(self.client.region_write(region, offset, data)?)
    }

    fn reset(&self) -> OpResult<()> {
        Ok(self.client.reset()?)
    }

    fn bar_regions(&self) -> OpResult<Vec<RegionView>> {
        let info = self.client.device_info()?;
        let io = self.client.io_bars()?;
        let mut regions = Vec::new();
        for region in 0..info.num_regions.min(6) {
            let info = self.client.region_info(region)?;
            if info.info.size == 0
                || info.info.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE) == 0
            {
                continue;
            }
            // Only a regular file (a memfd) has a size that bounds what the server may map; a
            // mapping past the end of anything else would fail the vCPU's access.
            let mappable = info.info.flags & REGION_INFO_FLAG_MMAP != 0;
            let mmap = info
                .fd
                .filter(|fd| {
                    mappable
                        && vmig_primitives::regular_file_size(fd.as_fd()).is_ok_and(|s| s.is_some())
                })
                .map(|fd| (fd, info.info.offset));
            let space = BarSpace::from_io(
                usize::try_from(region)
                    .ok()
                    .and_then(|i| io.get(i))
                    .is_some_and(|&io| io),
            );
            regions.push(RegionView {
                index: region,
                size: info.info.size,
                space,
                // An I/O BAR is never mapped: the guest reaches it by port instructions.
                mmap: mmap.filter(|_| space.is_memory()),
                areas: if info.sparse_areas.is_empty() {
                    vec![RegionArea::new(0, info.info.size)]
                } else {
                    info.sparse_areas
                },
                writable: info.info.flags & REGION_INFO_FLAG_WRITE != 0,
            });
        }
        Ok(regions)
    }

    fn interrupt_info(&self, kind: InterruptKind) -> OpResult<Option<InterruptInfo>> {
        // A server without this IRQ index answers with an error reply (an errno); anything
        // else means the connection failed.
        match self.client.irq_info(kind.index()) {
            Ok(info) => Ok(Some(InterruptInfo {
                count: info.count,
                eventfd: info.flags & IRQ_INFO_EVENTFD != 0,
            })),
            Err(e) if e.remote_errno().is_some() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn set_interrupts(&self, kind: InterruptKind, vectors: &[MsiVector]) -> OpResult<bool> {
        let fds: Vec<_> = vectors.iter().map(MsiVector::eventfd).collect();
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        match self.client.set_irq_eventfds(kind.index(), 0, count, &fds) {
            Ok(()) => Ok(true),
            Err(e) if e.remote_errno().is_some() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn migration_protocol(&self) -> Result<MigrationProtocol, String> {
        match self.protocol {
            Some(Protocol::V1 { .. }) => Ok(MigrationProtocol::V1),
            Some(Protocol::V2 { pre_copy }) => Ok(MigrationProtocol::V2 { pre_copy }),
            None => Err("cannot migrate: the device has no migration support (neither the v2 MIGRATION feature nor a v1 migration region)".into()),
        }
    }

    fn migration(&self) -> Option<Box<dyn MigrationSteps + '_>> {
        let protocol = self.protocol?;
        Some(Box::new(DeviceMigration::with_protocol(
            &self.client,
            protocol,
        )))
    }

    /// v2 DMA logging when the server offers it; else `DIRTY_PAGES` over the server's IOMMU
    /// (v1's, or a v2 server's without DMA logging) when its version reply offered the
    /// `migration` capability; else nothing.
    fn dirty_log_kind(&self) -> DirtyLogKind {
        let v2 = matches!(self.protocol, Some(Protocol::V2 { .. }));
        if v2 && self.dma_logging {
            DirtyLogKind::DmaLogging
        } else if self.dirty_pages {
            DirtyLogKind::DirtyPages
        } else {
            DirtyLogKind::None
        }
    }

    fn dirty_log_start(&self, page_size: u64, ranges: &[DmaRange]) -> OpResult<u64> {
        let page_size = match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => self.client.dma_logging_start(page_size, ranges)?,
            DirtyLogKind::DirtyPages => {
                self.client.dirty_pages_log(true)?;
                page_size
            }
            DirtyLogKind::None => return Err(DeviceOpError::Untracked),
        };
        // Pages written by message before tracking started are not dirty.
        let _ = self.client.take_dma_written_pages();
        Ok(page_size)
    }

    fn dirty_log_report(&self, iova: u64, size: u64, page_size: u64) -> OpResult<Vec<u64>> {
        Ok(match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => self.client.dma_logging_report(iova, size, page_size)?,
            DirtyLogKind::DirtyPages => self.client.dirty_pages_bitmap(iova, size, page_size)?,
            DirtyLogKind::None => return Err(DeviceOpError::Untracked),
        })
    }

    fn dirty_log_stop(&self) -> OpResult<()> {
        match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => self.client.dma_logging_stop()?,
            DirtyLogKind::DirtyPages => self.client.dirty_pages_log(false)?,
            DirtyLogKind::None => {}
        }
        Ok(())
    }

    fn take_message_dma_pages(&self) -> Vec<u64> {
        self.client.take_dma_written_pages()
    }
}

migration_steps!(
    DeviceMigration<'_>,
    fn state(&self) -> OpResult<Option<vmig_primitives::mig_state::MigState>> {
        Ok(DeviceMigration::v2_state(self)?)
    },
);
