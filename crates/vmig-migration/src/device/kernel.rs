//! A device through the kernel's VFIO — a PCI device bound to vfio-pci (or a variant driver),
//! or a mediated device (an mdev, such as the kernel's `mtty` sample) whose parent driver
//! presents it as PCI — in a type1 container of its own with all of a VM's guest RAM mapped for
//! DMA, IOVA = guest-physical address, as a [`MigratableDevice`]. Both are one [`KernelDevice`];
//! what differs is how it is opened ([`KernelDeviceId`]), the kind it reports, and what the
//! container's dirty tracking says of it. This module owns the one `unsafe` call the engine
//! makes, mapping guest RAM the container cannot keep alive by itself.

use std::sync::Arc;
use vmig_primitives::Iova;

use vmig_kvm::GuestMemory;
use vmig_kvm::irq::MsiVector;
use vmig_primitives::uapi::{PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use vmig_primitives::{DmaRange, PAGE_SIZE, RegionArea};
use vmig_vfio::device::IRQ_INFO_EVENTFD;
use vmig_vfio::{Container, Device, KernelMigration, Section, VfioDeviceFd, VfioError};

use super::{
    BarSpace, DeviceKind, DirtyLogKind, InterruptInfo, InterruptKind, MigratableDevice,
    MigrationProtocol, MigrationSteps, OpResult, RegionView, migration_steps,
};

/// Which kernel VFIO device: a PCI function by address, or a mediated device by UUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelDeviceId {
    /// A PCI device bound to vfio-pci or a variant driver: `DDDD:BB:DD.F`.
    Pci(String),
    /// A mediated device: its UUID (`/sys/bus/mdev/devices/UUID`).
    Mdev(String),
}

impl KernelDeviceId {
    /// The PCI address or the UUID, as reports name the device.
    pub fn name(&self) -> &str {
        match self {
            Self::Pci(name) | Self::Mdev(name) => name,
        }
    }

    /// Checks that the device exists as VFIO needs it (a PCI device bound to vfio-pci; an
    /// mdev with an IOMMU group), saying what is missing when it does not.
    pub fn check(&self) -> Result<(), VfioError> {
        match self {
            Self::Pci(bdf) => vmig_vfio::device::check_bound(bdf).map(drop),
            Self::Mdev(uuid) => vmig_vfio::device::check_mdev(uuid).map(drop),
        }
    }
}

/// A kernel VFIO device, its container and the guest RAM mapped into it.
pub struct KernelDevice {
    /// The device; declared first so it closes first and its group leaves the container
    /// before the container unmaps.
    pub device: Device,
    /// The container: guest RAM is mapped here, and its dirty tracking sees the device's DMA.
    pub container: Container,
    /// Whether the device's own DMA logging (`DMA_LOGGING_*`) is its dirty source, checked
    /// once at attach (never for an mdev: its container is).
    pub dma_logging: bool,
    /// How it migrates, or why it cannot, found once at attach.
    migration: Result<MigrationProtocol, String>,
    /// Its vendor and device IDs, read once at open (`None` if config space could not be read).
    ids: Option<(u16, u16)>,
    /// Whether it offers the P2P migration states, found once at attach.
    p2p: bool,
    /// Whether it is a mediated device (opened by UUID).
    mdev: bool,
    /// Keeps guest RAM alive as long as it is mapped: dropped last.
    _memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("device", &self.device)
            .field("dma_logging", &self.dma_logging)
            .finish_non_exhaustive()
    }
}

impl KernelDevice {
    /// Opens device `id` in a new container, its group registered with the VM's KVM VFIO
    /// device `kvm_vfio`, and maps every slot of `memory` into it.
    fn open(
        id: &KernelDeviceId,
        memory: &Arc<GuestMemory>,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioError> {
        let container = Container::open(Some(kvm_vfio))?;
        let device = match id {
            KernelDeviceId::Pci(bdf) => container.open_device(bdf)?,
            KernelDeviceId::Mdev(uuid) => container.open_mdev(uuid)?,
        };
        for slot in memory.slots() {
            let section = Section {
                gpa: slot.layout.gpa,
                size: u128::from(slot.layout.size),
                host_addr: slot.host().as_ptr() as u64,
            };
            // SAFETY: the section is exactly the host mapping of this slot, which lives as long
            // as `memory`; the struct keeps `memory` and drops it after the container, which
            // unmaps everything when dropped (on an error here, the container is dropped while
            // the caller still holds `memory`). Guest RAM is only accessed through raw copies
            // and atomics, so device writes into it break no Rust aliasing rule.
            unsafe { container.map_guest_section(section) }?;
        }
        // An mdev's parent driver reaches guest memory only through pins and `vfio_dma_rw`,
        // which the container's type1 tracking records exactly; its own DMA logging, when it
        // offers one, is not needed and may not work: `mtty`'s log ops do nothing, and on a
        // kernel without CONFIG_IOMMUFD_DRIVER (Debian's 6.12) every report of it fails with
        // EOPNOTSUPP (the rig's in-guest tests observed both). So an mdev's dirty source is
        // its container.
        let mdev = matches!(id, KernelDeviceId::Mdev(_));
        let dma_logging = !mdev && device.dma_logging_supported();
        let ids = device.pci_ids();
        Ok(Self {
            device,
            container,
            dma_logging,
            migration: Err(String::new()),
            ids,
            p2p: false,
            mdev,
            _memory: Arc::clone(memory),
        })
    }

    /// Opens device `id` in a container of its own with every slot of `memory` mapped, then
    /// gives it the start a booting VM expects (a reset when it supports one; I/O decoding when
    /// it has I/O-port BARs, memory decoding and bus mastering on) and finds how it migrates.
    ///
    /// An mdev's config space is its parent driver's emulation, which may ignore or refuse
    /// command-register writes (`mtty` keeps `I/O+ Mem- BusMaster-` whatever is written, and
    /// answers the write as done): for an mdev the command bits are asked for and a refusal is
    /// only logged; a vfio-pci device that refuses them fails the attach.
    pub fn attach(
        id: &KernelDeviceId,
        memory: &Arc<GuestMemory>,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioError> {
        let kernel = Self::open(id, memory, kvm_vfio)?;
        if kernel.device.can_reset() {
            kernel.device.reset()?;
        }
        let io = kernel.device.io_bars()?.contains(&true);
        let bits = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | if io { PCI_COMMAND_IO } else { 0 };
        match kernel.device.set_command_bits(bits) {
            Ok(command) if command & bits != bits => tracing::debug!(
                device = id.name(),
                command = format_args!("{command:#06x}"),
                asked = format_args!("{bits:#06x}"),
                "the device keeps command bits of its own"
            ),
            Ok(_) => {}
            Err(e) if kernel.mdev => tracing::debug!(
                device = id.name(),
                error = %e,
                "the mdev's emulated config space refused the command bits"
            ),
            Err(e) => return Err(e),
        }
        let mut kernel = kernel;
        kernel.migration = kernel.find_migration()?;
        Ok(kernel)
    }

    fn find_migration(&mut self) -> Result<Result<MigrationProtocol, String>, VfioError> {
        if let Some(reason) = self.device.migration_blocker_reason() {
            return Ok(Err(reason));
        }
        // Without DMA logging its DMA is tracked by the container, if the container can.
        if !self.dma_logging
            && let Err(e) = self.container.bitmap_page_size()
        {
            return Ok(Err(format!(
                "cannot migrate: it has no DMA logging and its container cannot track dirty pages ({e})"
            )));
        }
        let support = self.device.migration_support()?.ok_or_else(|| {
            VfioError::Kernel("its migration support vanished while it was attached".into())
        })?;
        self.p2p = support.p2p();
        Ok(Ok(MigrationProtocol::V2 {
            pre_copy: support.pre_copy(),
        }))
    }
}

impl MigratableDevice for KernelDevice {
    fn kind(&self) -> DeviceKind {
        if self.mdev {
            DeviceKind::VfioMdev { ids: self.ids }
        } else {
            DeviceKind::VfioPci { ids: self.ids }
        }
    }

    fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> OpResult<()> {
        Ok(self.device.read_region(region, offset, buf)?)
    }

    fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> OpResult<()> {
        Ok(self.device.write_region(region, offset, data)?)
    }

    fn reset(&self) -> OpResult<()> {
        Ok(self.device.reset()?)
    }

    fn bar_regions(&self) -> OpResult<Vec<RegionView>> {
        let device = &self.device;
        // The MSI-X table and pending bits stay trapped (vfio-pci ignores guest accesses
        // there): the host's table holds the vectors `SET_IRQS` programmed.
        let msix = device.msix_layout()?;
        let msix_pages: Vec<(u32, RegionArea)> = msix
            .map(|m| [m.table, m.pba])
            .into_iter()
            .flatten()
            .map(|(bar, offset, bytes)| {
                let first = offset / PAGE_SIZE * PAGE_SIZE;
                let end = (offset + bytes).next_multiple_of(PAGE_SIZE);
                (bar, RegionArea::new(first, end - first))
            })
            .collect();
        let io = device.io_bars()?;
        let mut regions = Vec::new();
        for r in (0..6).filter_map(|i| device.region(i)) {
            // An mdev may describe a BAR it does not have as readable, of size 0 (`mtty` does
            // for BARs 2-5).
            if !(r.readable() || r.writable()) || r.size == 0 {
                continue;
            }
            let space = BarSpace::from_io(
                usize::try_from(r.index)
                    .ok()
                    .and_then(|i| io.get(i))
                    .is_some_and(|&io| io),
            );
            let holes: Vec<RegionArea> = msix_pages
                .iter()
                .filter(|(bar, _)| *bar == r.index)
                .map(|&(_, hole)| hole)
                .collect();
            // An I/O BAR is never mapped: the guest reaches it by port instructions.
            let mmap = match r.mmap_areas.is_empty() || !space.is_memory() {
                true => None,
                false => {
                    let fd = device
                        .fd()
                        .try_clone_to_owned()
                        .map_err(|source| VfioError::Io {
                            context: "duplicating the device fd to map its BARs".into(),
                            source,
                        })?;
                    Some((fd, r.offset))
                }
            };
            regions.push(RegionView {
                index: r.index,
                size: r.size,
                space,
                mmap,
                writable: r.writable(),
                areas: without_holes(&r.mmap_areas, &holes),
            });
        }
        Ok(regions)
    }

    fn interrupt_info(&self, kind: InterruptKind) -> OpResult<Option<InterruptInfo>> {
        Ok(self.device.irq(kind.index()).map(|irq| InterruptInfo {
            count: irq.count,
            eventfd: irq.flags & IRQ_INFO_EVENTFD != 0,
        }))
    }

    fn set_interrupts(&self, kind: InterruptKind, vectors: &[MsiVector]) -> OpResult<bool> {
        let fds: Vec<_> = vectors.iter().map(MsiVector::event_fd).collect();
        // A kernel that refuses this kind leaves the next kind to try.
        Ok(self.device.enable_irq(kind.index(), &fds).is_ok())
    }

    fn migration_protocol(&self) -> Result<MigrationProtocol, String> {
        self.migration.clone()
    }

    fn migration(&self) -> Option<Box<dyn MigrationSteps + '_>> {
        let pre_copy = matches!(self.migration, Ok(MigrationProtocol::V2 { pre_copy: true }));
        self.migration
            .is_ok()
            .then(|| Box::new(KernelMigration::new(&self.device, pre_copy, self.p2p)) as _)
    }

    fn dirty_log_kind(&self) -> DirtyLogKind {
        if self.dma_logging {
            DirtyLogKind::DmaLogging
        } else {
            DirtyLogKind::DirtyPages
        }
    }

    fn dirty_log_start(&self, page_size: u64, ranges: &[DmaRange]) -> OpResult<u64> {
        if self.dma_logging {
            return Ok(self.device.start_dma_logging(page_size, ranges)?);
        }
        let page = self.container.bitmap_page_size()?;
        self.container.start_dirty_tracking()?;
        Ok(page)
    }

    fn dirty_log_report(&self, iova: u64, size: u64, page_size: u64) -> OpResult<Vec<u64>> {
        Ok(if self.dma_logging {
            self.device
                .report_dma_logging(Iova(iova), size, page_size)?
        } else {
            self.container.dirty_bitmap(Iova(iova), size)?
        })
    }

    fn dirty_log_stop(&self) -> OpResult<()> {
        if self.dma_logging {
            self.device.stop_dma_logging()?;
        } else {
            self.container.stop_dirty_tracking()?;
        }
        Ok(())
    }

    /// True for a vfio-pci device tracked by its container: type1 reports every page mapped
    /// through the IOMMU as dirty at every harvest (kernel-vfio-type1-observed). False for an
    /// mdev: its group is an emulated-IOMMU one, which type1 puts in the pinned-page dirty
    /// scope from the start, so the container reports only the pages the parent driver pinned
    /// (or wrote with `vfio_dma_rw`) — seed 000, patch 7 (`reference/seed000-vfio-migration-
    /// kabi.md` §3.6-3.7: "an mdev group can dirty memory only via pin or `dma_rw`, so it never
    /// forces all-dirty"; upstream sets its scope at attach). `mtty` pins nothing, so a
    /// container holding only its group reports no page; the engine then takes that answer
    /// instead of resending all RAM every pass. (An mdev's dirty source is always its
    /// container, see `open`; a vfio-pci device with its own DMA logging reports what it
    /// logged.)
    fn dirty_log_reports_everything(&self) -> bool {
        !self.mdev && self.dirty_log_kind() == DirtyLogKind::DirtyPages
    }
}

migration_steps!(
    KernelMigration<'_>,
    fn precopy_info(&self) -> OpResult<Option<super::PrecopyPending>> {
        Ok(
            KernelMigration::precopy_info(self)?.map(|info| super::PrecopyPending {
                initial_bytes: info.initial_bytes,
                dirty_bytes: info.dirty_bytes,
            }),
        )
    },
    fn stop_copy_size(&self) -> Option<u64> {
        KernelMigration::stop_copy_size(self)
    },
    fn p2p(&self) -> bool {
        KernelMigration::p2p(self)
    },
    fn quiesce_p2p(&self) -> OpResult<()> {
        Ok(KernelMigration::quiesce_p2p(self)?)
    },
    fn start_p2p(&self) -> OpResult<()> {
        Ok(KernelMigration::start_p2p(self)?)
    },
    fn state(&self) -> OpResult<Option<vmig_primitives::mig_state::MigState>> {
        Ok(Some(KernelMigration::state(self)?))
    },
);

/// `areas` less the page-aligned `holes`.
fn without_holes(areas: &[RegionArea], holes: &[RegionArea]) -> Vec<RegionArea> {
    let mut out = areas.to_vec();
    for hole in holes {
        let (hole_start, hole_end) = (hole.offset, hole.offset + hole.len);
        out = out
            .into_iter()
            .flat_map(|area| {
                let (start, end) = (area.offset, area.offset + area.len);
                if hole_end <= start || end <= hole_start {
                    return vec![area];
                }
                [(start, hole_start.max(start)), (hole_end.min(end), end)]
                    .into_iter()
                    .filter(|(a, b)| b > a)
                    .map(|(a, b)| RegionArea::new(a, b - a))
                    .collect()
            })
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(offset, len)` pairs as areas.
    fn areas(pairs: &[(u64, u64)]) -> Vec<RegionArea> {
        pairs.iter().map(|&(o, l)| RegionArea::new(o, l)).collect()
    }

    #[test]
    fn msix_pages_are_cut_out_of_mappable_areas() {
        // A 64 KiB BAR mappable whole, its MSI-X table in the page at 0x2000.
        assert_eq!(
            without_holes(&areas(&[(0, 0x10000)]), &areas(&[(0x2000, 0x1000)])),
            areas(&[(0, 0x2000), (0x3000, 0xd000)])
        );
        // Holes at either end, one covering an area, one outside every area.
        assert_eq!(
            without_holes(
                &areas(&[(0, 0x2000), (0x4000, 0x1000), (0x8000, 0x2000)]),
                &areas(&[
                    (0, 0x1000),
                    (0x4000, 0x1000),
                    (0x9000, 0x1000),
                    (0x20000, 0x1000)
                ])
            ),
            areas(&[(0x1000, 0x1000), (0x8000, 0x1000)])
        );
        assert_eq!(
            without_holes(&areas(&[(0, 0x1000)]), &[]),
            areas(&[(0, 0x1000)])
        );
    }
}
