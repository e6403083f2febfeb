//! A PCI device bound to vfio-pci (or a variant driver), in a type1 container of its own with
//! all of a VM's guest RAM mapped for DMA, IOVA = guest-physical address, as a
//! [`MigratableDevice`]. This module owns the one `unsafe` call the engine makes, mapping guest
//! RAM the container cannot keep alive by itself.

use std::sync::Arc;
use vmig_primitives::Iova;

use vmig_kvm::GuestMemory;
use vmig_kvm::irq::MsiVector;
use vmig_primitives::{DmaRange, PAGE_SIZE, RegionArea};
use vmig_vfio::device::IRQ_INFO_EVENTFD;
use vmig_vfio::{Container, Device, KernelMigration, Section, VfioDeviceFd, VfioError};

use super::{
    DeviceKind, DirtyLogKind, InterruptInfo, InterruptKind, MigratableDevice, MigrationProtocol,
    MigrationSteps, OpResult, RegionView, migration_steps,
};

/// `PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER`: BARs decode, and the device may DMA.
const PCI_COMMAND_MEMORY_AND_MASTER: u16 = 0x2 | 0x4;

/// A kernel VFIO device, its container and the guest RAM mapped into it.
pub struct KernelDevice {
    /// The device; declared first so it closes first and its group leaves the container
    /// before the container unmaps.
    pub device: Device,
    /// The container: guest RAM is mapped here, and its dirty tracking sees the device's DMA.
    pub container: Container,
    /// Whether the device logs its own DMA (`DMA_LOGGING_*`), checked once at attach.
    pub dma_logging: bool,
    /// How it migrates, or why it cannot, found once at attach.
    migration: Result<MigrationProtocol, String>,
    /// Its vendor and device IDs, read once at open (`None` if config space could not be read).
    ids: Option<(u16, u16)>,
    /// Whether it offers the P2P migration states, found once at attach.
    p2p: bool,
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
    /// Opens PCI device `bdf` in a new container, its group registered with the VM's KVM VFIO
    /// device `kvm_vfio`, and maps every slot of `memory` into it.
    fn open(
        bdf: &str,
        memory: &Arc<GuestMemory>,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioError> {
        let container = Container::open(Some(kvm_vfio))?;
        let device = container.open_device(bdf)?;
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
        let dma_logging = device.dma_logging_supported();
        let mut id = [0u8; 4];
        let ids = device.read_config(0, &mut id).ok().map(|()| {
            (
                u16::from_le_bytes([id[0], id[1]]),
                u16::from_le_bytes([id[2], id[3]]),
            )
        });
        Ok(Self {
            device,
            container,
            dma_logging,
            migration: Err(String::new()),
            ids,
            p2p: false,
            _memory: Arc::clone(memory),
        })
    }

    /// Opens PCI device `bdf` in a container of its own with every slot of `memory` mapped,
    /// then gives it the start a booting VM expects (a reset when it supports one, memory
    /// decoding and bus mastering on) and finds how it migrates.
    pub fn attach(
        bdf: &str,
        memory: &Arc<GuestMemory>,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioError> {
        let kernel = Self::open(bdf, memory, kvm_vfio)?;
        if kernel.device.can_reset() {
            kernel.device.reset()?;
        }
        kernel
            .device
            .set_command_bits(PCI_COMMAND_MEMORY_AND_MASTER)?;
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
        DeviceKind::VfioPci { ids: self.ids }
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
        let mut regions = Vec::new();
        for r in (0..6).filter_map(|i| device.region(i)) {
            if !(r.readable() || r.writable()) {
                continue;
            }
            let holes: Vec<RegionArea> = msix_pages
                .iter()
                .filter(|(bar, _)| *bar == r.index)
                .map(|&(_, hole)| hole)
                .collect();
            let mmap = match r.mmap_areas.is_empty() {
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
        Ok(match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => self.device.start_dma_logging(page_size, ranges)?,
            DirtyLogKind::DirtyPages => {
                let page = self.container.bitmap_page_size()?;
                self.container.start_dirty_tracking()?;
                page
            }
        })
    }

    fn dirty_log_report(&self, iova: u64, size: u64, page_size: u64) -> OpResult<Vec<u64>> {
        Ok(match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => {
                self.device
                    .report_dma_logging(Iova(iova), size, page_size)?
            }
            DirtyLogKind::DirtyPages => self.container.dirty_bitmap(Iova(iova), size)?,
        })
    }

    fn dirty_log_stop(&self) -> OpResult<()> {
        match self.dirty_log_kind() {
            DirtyLogKind::DmaLogging => self.device.stop_dma_logging()?,
            DirtyLogKind::DirtyPages => self.container.stop_dirty_tracking()?,
        }
        Ok(())
    }

    fn dirty_log_reports_everything(&self) -> bool {
        self.dirty_log_kind() == DirtyLogKind::DirtyPages
    }
}

migration_steps!(
    KernelMigration<'_>,
    fn precopy_info(&self) -> OpResult<Option<super::PrecopyPending>> {
        Ok(KernelMigration::precopy_info(self)?.map(|info| super::PrecopyPending {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
        }))
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
