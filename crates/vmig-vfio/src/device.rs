//! A PCI device bound to vfio-pci (or a variant driver such as mlx5-vfio-pci), or a mediated
//! device that presents itself as PCI (an mdev, opened by UUID): its regions
//! (BARs, ROM, config space) read and written through the device fd or mapped, its interrupts
//! through eventfds, reset, and the migration v2 interface (`VFIO_DEVICE_FEATURE_MIGRATION`,
//! `MIG_DEVICE_STATE` with its data fd, `VFIO_MIG_GET_PRECOPY_INFO`) and device DMA logging
//! (`DMA_LOGGING_START/STOP/REPORT`), which `vfio-ioctls` drives.
//!
//! ```text
//!  source                                  destination
//!  RUNNING ─► PRE_COPY (read data fd) ┐
//!             STOP_COPY (read to EOF) ┴──► RESUMING (write data fd)
//!  STOP                                    STOP ─► RUNNING
//! ```

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FLAGS_RESET, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{DmaLoggingRange, PrecopyInfo, VfioDevice, VfioRegionInfoCap};
use vmig_primitives::HostMemory;
use vmig_primitives::description::{
    DeviceDescription, IrqDescription, KernelPciDevice, MigrationDescription, Mmap, Origin,
    RegionDescription,
};
pub use vmig_primitives::mig_state::MigState;
use vmig_primitives::{DmaRange, Iova, RegionArea};
use vmm_sys_util::eventfd::EventFd;

use crate::container::Container;
use crate::error::{Result, VfioError};
use crate::sys;

/// Interrupt index of MSI (`VFIO_PCI_MSI_IRQ_INDEX`).
pub const IRQ_INDEX_MSI: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
/// Interrupt index of MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
pub const IRQ_INDEX_MSIX: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
/// The interrupt index can signal eventfds (`VFIO_IRQ_INFO_EVENTFD`).
pub const IRQ_INFO_EVENTFD: u32 = vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_EVENTFD;

/// Where PCI devices appear in sysfs.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Where mediated devices (mdevs) appear in sysfs, by UUID.
pub const MDEV_DEVICES: &str = "/sys/bus/mdev/devices";

/// One region of a device (a BAR, the ROM, config space, a device-specific region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// `VFIO_PCI_*_REGION_INDEX`.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Bytes (0: the device does not have it).
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// The parts that may be mapped, as `(offset in region, size)`: the sparse-mmap areas, or
    /// the whole region when it is mappable without them; empty when it must be trapped.
    pub mmap_areas: Vec<RegionArea>,
}

impl Region {
    /// Whether the region can be read.
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// Whether the region can be written.
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
}

/// What a device offers for migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationSupport {
    /// `VFIO_MIGRATION_*` flags (`STOP_COPY`, `P2P`, `PRE_COPY`).
    pub flags: u64,
    /// Whether it tracks the pages it writes itself (`DMA_LOGGING_START` probes as supported).
    pub dma_logging: bool,
}

impl MigrationSupport {
    /// Whether the device has an initial copy of its state to send while it runs.
    pub fn pre_copy(&self) -> bool {
        self.flags & u64::from(VFIO_MIGRATION_PRE_COPY) != 0
    }

    /// Whether the device has the peer-to-peer states (`RUNNING_P2P`, and `PRE_COPY_P2P` with
    /// PRE_COPY).
    pub fn p2p(&self) -> bool {
        self.flags & u64::from(VFIO_MIGRATION_P2P) != 0
    }
}

/// A VFIO PCI device: a PCI function bound to vfio-pci, or a mediated device whose parent
/// driver presents it as PCI (`VFIO_DEVICE_FLAGS_PCI`, such as the kernel's `mtty` sample).
///
/// Dropping the last device of a group detaches the group, and the kernel then drops every
/// mapping of a container it was the last group of.
pub struct Device {
    name: String,
    /// A duplicate of the device fd for positioned reads and writes that report errors. It is
    /// declared before `inner` so it is closed first: the group can only leave its container
    /// once no device fd is open.
    file: File,
    inner: VfioDevice,
    /// `VFIO_DEVICE_FLAGS_*`.
    flags: u32,
    /// Whether it is a mediated device that offers v2 migration, found at open: such a device
    /// resets (its migration state back to RUNNING) whether or not it advertises
    /// `VFIO_DEVICE_FLAGS_RESET`.
    migratable_mdev: bool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish()
    }
}

/// Checks the form `DDDD:BB:DD.F` (hex) so a name can never walk out of sysfs.
pub fn check_bdf(bdf: &str) -> Result<()> {
    let b = bdf.as_bytes();
    let hex_at = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_hexdigit);
    if b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex_at(0..4)
        && hex_at(5..7)
        && hex_at(8..10)
        && (b'0'..=b'7').contains(&b[11])
    {
        return Ok(());
    }
    Err(VfioError::Invalid(format!(
        "PCI address `{bdf}`: expected DOMAIN:BUS:SLOT.FUNCTION in hex, e.g. 0000:01:00.0"
    )))
}

/// Checks the form of a mediated device's UUID (8-4-4-4-12 hex digits) so a name can never
/// walk out of sysfs; returns it in lowercase, as the kernel names the device.
pub fn check_mdev_uuid(uuid: &str) -> Result<String> {
    let b = uuid.as_bytes();
    let form = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if form {
        return Ok(uuid.to_ascii_lowercase());
    }
    Err(VfioError::Invalid(format!(
        "mediated device UUID `{uuid}`: expected 8-4-4-4-12 hex digits, e.g. \
         83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    )))
}

/// Checks that the mediated device `uuid` exists and has an IOMMU group, saying how to
/// create it when it does not; returns its sysfs path.
pub fn check_mdev(uuid: &str) -> Result<PathBuf> {
    let uuid = check_mdev_uuid(uuid)?;
    let path = PathBuf::from(MDEV_DEVICES).join(&uuid);
    if !path.exists() {
        return Err(VfioError::Unavailable(format!(
            "there is no mediated device {uuid} ({} does not exist): create it with `echo \
             {uuid} > /sys/class/mdev_bus/PARENT/mdev_supported_types/TYPE/create`",
            path.display()
        )));
    }
    if std::fs::read_link(path.join("iommu_group")).is_err() {
        return Err(VfioError::Unavailable(format!(
            "mediated device {uuid} has no IOMMU group ({}/iommu_group is missing): its \
             parent driver did not register it with VFIO",
            path.display()
        )));
    }
    Ok(path)
}

/// Checks that PCI device `bdf` exists and is bound to vfio-pci or a variant driver, saying
/// how to bind it when it is not; returns its sysfs path.
pub fn check_bound(bdf: &str) -> Result<PathBuf> {
    check_bdf(bdf)?;
    let path = PathBuf::from(PCI_DEVICES).join(bdf);
    if !path.exists() {
        return Err(VfioError::Unavailable(format!(
            "there is no PCI device {bdf} ({} does not exist)",
            path.display()
        )));
    }
    let driver = std::fs::read_link(path.join("driver"))
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    if !driver.as_deref().is_some_and(|d| d.contains("vfio")) {
        return Err(VfioError::Unavailable(format!(
            "{bdf} is bound to {}, not to vfio-pci: \
             `echo vfio-pci > {p}/driver_override; echo {bdf} > {p}/driver/unbind; \
             echo {bdf} > /sys/bus/pci/drivers_probe`",
            driver.as_deref().unwrap_or("no driver"),
            p = path.display()
        )));
    }
    Ok(path)
}

/// Where a device's MSI-X table and pending-bit array are (from its MSI-X capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// The table: (BAR, offset, bytes).
    pub table: (u32, u64, u64),
    /// The pending-bit array: (BAR, offset, bytes).
    pub pba: (u32, u64, u64),
}

impl Device {
    pub(crate) fn open(container: &Container, bdf: &str) -> Result<Self> {
        let path = check_bound(bdf)?;
        Self::open_sysfs(container, bdf, &path)
    }

    pub(crate) fn open_mdev(container: &Container, uuid: &str) -> Result<Self> {
        let path = check_mdev(uuid)?;
        let uuid = check_mdev_uuid(uuid)?;
        let mut device = Self::open_sysfs(container, &uuid, &path)?;
        device.migratable_mdev = matches!(device.inner.query_migration_support(), Ok(Some(_)));
        Ok(device)
    }

    /// Opens the device at sysfs `path`: its `iommu_group` link names the group, and the
    /// directory's name (`name`: a PCI address or an mdev UUID) is the name
    /// `VFIO_GROUP_GET_DEVICE_FD` takes.
    fn open_sysfs(container: &Container, name: &str, path: &Path) -> Result<Self> {
        let inner = VfioDevice::new(path, container.ops(), false).map_err(|e| match &e {
            vfio_ioctls::VfioError::OpenGroup(io, group)
                if io.raw_os_error() == Some(libc::EBUSY) =>
            {
                VfioError::Unavailable(format!(
                    "{name}: its IOMMU group /dev/vfio/{group} is already open (by another \
                     VMM or migration destination on this host, or by another device of the \
                     same group in this VM: each device gets a container of its own)"
                ))
            }
            _ => VfioError::library(format!("opening VFIO device {name}"), e),
        })?;
        let file =
            File::from(
                sys::duplicate(inner.as_raw_fd()).map_err(|source| VfioError::Io {
                    context: format!("duplicating the fd of {name}"),
                    source,
                })?,
            );
        let flags = sys::device_flags(file.as_fd())
            .map_err(|e| VfioError::ioctl(format!("{name}: VFIO_DEVICE_GET_INFO"), e))?;
        Ok(Self {
            name: name.to_owned(),
            inner,
            flags,
            migratable_mdev: false,
            file,
        })
    }

    /// The PCI address (or mediated device UUID) it was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device fd (regions are mapped from it at their offsets).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The library's device, for calls this type does not wrap.
    pub fn vfio_device(&self) -> &VfioDevice {
        &self.inner
    }

    /// Region `index`, or `None` when the device does not have it.
    pub fn region(&self, index: u32) -> Option<Region> {
        let size = self.inner.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.inner.get_region_flags(index);
        let mut mmap_areas = Vec::new();
        if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            let mut sparse = None;
            for cap in self.inner.get_region_caps(index) {
                if let VfioRegionInfoCap::SparseMmap(s) = cap {
                    sparse = Some(
                        s.areas
                            .iter()
                            .map(|a| RegionArea::new(a.offset, a.size))
                            .collect(),
                    );
                }
            }
            mmap_areas = sparse.unwrap_or_else(|| vec![RegionArea::new(0, size)]);
        }
        Some(Region {
            index,
            flags,
            size,
            offset: self.inner.get_region_offset(index),
            mmap_areas,
        })
    }

    fn region_span(&self, index: u32, offset: u64, len: usize, write: bool) -> Result<u64> {
        let region = self.region(index).ok_or_else(|| {
            VfioError::Invalid(format!("{}: there is no region {index}", self.name))
        })?;
        let allowed = if write {
            region.writable()
        } else {
            region.readable()
        };
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= region.size);
        if !allowed || !fits {
            return Err(VfioError::Invalid(format!(
                "{}: {} of {len} bytes at {offset:#x} of region {index} ({:#x} bytes, flags {:#x})",
                self.name,
                if write { "write" } else { "read" },
                region.size,
                region.flags
            )));
        }
        Ok(region.offset + offset)
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (a trapped access: the driver
    /// does it with accesses of that width).
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.region_span(index, offset, buf.len(), false)?;
        self.file
            .read_exact_at(buf, at)
            .map_err(|source| VfioError::Io {
                context: format!("{}: read of region {index} at {offset:#x}", self.name),
                source,
            })
    }

    /// Writes `data` at `offset` of region `index`.
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.region_span(index, offset, data.len(), true)?;
        self.file
            .write_all_at(data, at)
            .map_err(|source| VfioError::Io {
                context: format!("{}: write of region {index} at {offset:#x}", self.name),
                source,
            })
    }

    /// Reads a 32-bit register of region `index`.
    pub fn read_u32(&self, index: u32, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_region(index, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a 32-bit register of region `index`.
    pub fn write_u32(&self, index: u32, offset: u64, value: u32) -> Result<()> {
        self.write_region(index, offset, &value.to_le_bytes())
    }

    /// Reads config space.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_region(VFIO_PCI_CONFIG_REGION_INDEX, offset, buf)
    }

    /// Its vendor and device IDs from config space; `None` if that cannot be read.
    pub fn pci_ids(&self) -> Option<(u16, u16)> {
        let mut id = [0u8; 4];
        self.read_config(0, &mut id).ok().map(|()| {
            (
                u16::from_le_bytes([id[0], id[1]]),
                u16::from_le_bytes([id[2], id[3]]),
            )
        })
    }

    /// Writes config space.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_region(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)
    }

    /// Sets bits of the PCI command register (`PCI_COMMAND_MEMORY` 0x2, `_MASTER` 0x4) and
    /// returns the new value.
    pub fn set_command_bits(&self, bits: u16) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_config(4, &mut b)?;
        let command = u16::from_le_bytes(b) | bits;
        self.write_config(4, &command.to_le_bytes())?;
        self.read_config(4, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Which of BARs 0-5 decode I/O ports (their config-space register has bit 0 set, as a
    /// 16550 UART's such as the `mtty` sample's), from config space as the device's driver
    /// presents it.
    pub fn io_bars(&self) -> Result<[bool; 6]> {
        let mut registers = [0u8; 24];
        self.read_config(vmig_primitives::uapi::PCI_BASE_ADDRESS_0, &mut registers)?;
        Ok(vmig_primitives::uapi::io_bars(&registers))
    }

    /// Where the MSI-X table and pending-bit array are, or `None` without an MSI-X
    /// capability. A guest must not reach them through a mapping: vfio-pci programs the table
    /// for the interrupts it was given, and lets a mapping through (`MSIX_MAPPABLE`).
    pub fn msix_layout(&self) -> Result<Option<MsixLayout>> {
        let read = |offset: u64, bytes: usize| -> Result<u32> {
            let mut b = [0u8; 4];
            self.read_config(offset, &mut b[..bytes])?;
            Ok(u32::from_le_bytes(b))
        };
        const STATUS_CAP_LIST: u32 = 0x10;
        const CAP_ID_MSIX: u32 = 0x11;
        if read(0x06, 2)? & STATUS_CAP_LIST == 0 {
            return Ok(None);
        }
        let mut cap = u64::from(read(0x34, 1)? & 0xfc);
        // At most 48 capabilities fit the 192 bytes after the header: a longer chain loops.
        for _ in 0..48 {
            if cap < 0x40 {
                return Ok(None);
            }
            let header = read(cap, 2)?;
            if header & 0xff == CAP_ID_MSIX {
                let control = read(cap + 2, 2)?;
                let entries = u64::from(control & 0x7ff) + 1;
                let table = read(cap + 4, 4)?;
                let pba = read(cap + 8, 4)?;
                return Ok(Some(MsixLayout {
                    table: (table & 7, u64::from(table & !7), entries * 16),
                    pba: (pba & 7, u64::from(pba & !7), entries.div_ceil(64) * 8),
                }));
            }
            cap = u64::from((header >> 8) & 0xfc);
        }
        Ok(None)
    }

    /// Maps the whole of region `index`, which must be mappable without sparse areas.
    pub fn map_region(&self, index: u32) -> Result<Arc<HostMemory>> {
        let region = self.region(index).ok_or_else(|| {
            VfioError::Invalid(format!("{}: there is no region {index}", self.name))
        })?;
        if region.mmap_areas != [RegionArea::new(0, region.size)] {
            return Err(VfioError::Invalid(format!(
                "{}: region {index} is not mappable as a whole (areas {:?})",
                self.name, region.mmap_areas
            )));
        }
        HostMemory::map_fd(self.fd(), region.offset, region.size, region.writable())
            .map(Arc::new)
            .map_err(|source| VfioError::Io {
                context: format!("{}: mmap of region {index}", self.name),
                source,
            })
    }

    /// Interrupt index `index` (`VFIO_PCI_INTX/MSI/MSIX_IRQ_INDEX`): its flags and vector count.
    pub fn irq(&self, index: u32) -> Option<vfio_ioctls::VfioIrq> {
        self.inner.get_irq_info(index).copied()
    }

    /// Signals `eventfds[n]` when vector `n` of interrupt index `index` fires.
    pub fn enable_irq(&self, index: u32, eventfds: &[&EventFd]) -> Result<()> {
        self.inner
            .enable_irq(index, eventfds.to_vec())
            .map_err(|e| {
                VfioError::library(
                    format!(
                        "{}: enabling {} vectors of interrupt index {index}",
                        self.name,
                        eventfds.len()
                    ),
                    e,
                )
            })
    }

    /// Stops signalling interrupt index `index`.
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        self.inner.disable_irq(index).map_err(|e| {
            VfioError::library(
                format!("{}: disabling interrupt index {index}", self.name),
                e,
            )
        })
    }

    /// Whether the device can be reset: it says so (`VFIO_DEVICE_FLAGS_RESET`, which vfio-pci
    /// sets exactly when the kernel can reset the function), or it is a mediated device that
    /// offers v2 migration, whose state machine the uAPI leaves through `VFIO_DEVICE_RESET`
    /// (from ERROR, "the device cannot leave except by VFIO_DEVICE_RESET"; a reset puts any
    /// state back to RUNNING). The kernel's `mtty` sample is such an mdev: it serves the reset
    /// and does not advertise it.
    pub fn can_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0 || self.migratable_mdev
    }

    /// `VFIO_DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        if !self.can_reset() {
            return Err(VfioError::Invalid(format!(
                "{} offers no reset (VFIO_DEVICE_FLAGS_RESET is clear)",
                self.name
            )));
        }
        sys::device_reset(self.fd())
            .map_err(|e| VfioError::ioctl(format!("{}: VFIO_DEVICE_RESET", self.name), e))
    }

    /// What the device offers for migration: `None` when it cannot migrate its state (plain
    /// vfio-pci without a variant driver answers `ENOTTY`).
    pub fn migration_support(&self) -> Result<Option<MigrationSupport>> {
        let flags = self.inner.query_migration_support().map_err(|e| {
            VfioError::library(format!("{}: VFIO_DEVICE_FEATURE_MIGRATION", self.name), e)
        })?;
        Ok(flags.map(|flags| MigrationSupport {
            flags,
            dma_logging: self.dma_logging_supported(),
        }))
    }

    /// Why this device blocks a live migration, naming it, or `None` when it can migrate (v2
    /// with `STOP_COPY`).
    pub fn migration_blocker(&self) -> Option<String> {
        self.migration_blocker_reason()
            .map(|why| format!("VFIO device {} {why}", self.name))
    }

    /// As [`Device::migration_blocker`], without the device's name ("cannot migrate: ...").
    pub fn migration_blocker_reason(&self) -> Option<String> {
        match self.migration_support() {
            Ok(Some(s)) if s.flags & u64::from(VFIO_MIGRATION_STOP_COPY) != 0 => None,
            Ok(Some(s)) => Some(format!(
                "cannot migrate: its migration flags {:#x} lack STOP_COPY",
                s.flags
            )),
            Ok(None) => Some(
                "cannot migrate: its driver has no migration support \
                 (VFIO_DEVICE_FEATURE_MIGRATION is not offered; bind it to a variant driver \
                 such as mlx5-vfio-pci)"
                    .into(),
            ),
            Err(e) => Some(format!("cannot migrate: {e}")),
        }
    }

    /// Whether the device logs its own DMA writes (`DMA_LOGGING_START` probes as supported).
    pub fn dma_logging_supported(&self) -> bool {
        sys::device_feature_probe(
            self.fd(),
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        )
        .is_ok()
    }

    /// Probes `VFIO_DEVICE_FEATURE_MIGRATION` for GET: `Ok` or the kernel's errno.
    pub fn probe_migration_feature(&self) -> std::result::Result<(), i32> {
        sys::device_feature_probe(
            self.fd(),
            VFIO_DEVICE_FEATURE_MIGRATION,
            VFIO_DEVICE_FEATURE_GET,
        )
    }

    /// Moves the device to `state` (the kernel walks the arcs in between); entering PRE_COPY,
    /// STOP_COPY or RESUMING opens the data fd that [`Device::read_state`] and
    /// [`Device::write_state`] use.
    pub fn set_migration_state(&self, state: MigState) -> Result<()> {
        self.inner.set_migration_state(state as u32).map_err(|e| {
            VfioError::library(format!("{}: MIG_DEVICE_STATE to {state:?}", self.name), e)
        })
    }

    /// The device's migration state.
    pub fn migration_state(&self) -> Result<MigState> {
        let raw = self.inner.get_migration_state().map_err(|e| {
            VfioError::library(format!("{}: reading MIG_DEVICE_STATE", self.name), e)
        })?;
        MigState::from_u32(raw).ok_or_else(|| {
            VfioError::Kernel(format!("{}: unknown migration state {raw}", self.name))
        })
    }

    /// In PRE_COPY: how much of the initial state and of state dirtied since is still to read.
    pub fn precopy_info(&self) -> Result<PrecopyInfo> {
        self.inner
            .mig_get_precopy_info()
            .map_err(|e| VfioError::library(format!("{}: VFIO_MIG_GET_PRECOPY_INFO", self.name), e))
    }

    /// The driver's estimate of the bytes STOP_COPY will give
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`); `None` when it gives none.
    pub fn stop_copy_size(&self) -> Option<u64> {
        match self.inner.get_mig_data_size() {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::debug!(device = %self.name, error = %e, "no MIG_DATA_SIZE estimate");
                None
            }
        }
    }

    /// Reads the next chunk of state from the data fd: `Ok(0)` at the end of what is there
    /// now (end of file in STOP_COPY; `ENOMSG` in PRE_COPY).
    pub fn read_state(&self, buf: &mut [u8]) -> Result<usize> {
        match self.inner.read_migration_data(buf) {
            Ok(n) => Ok(n),
            Err(vfio_ioctls::VfioError::VfioMigrationDataIo(e))
                if e.raw_os_error() == Some(libc::ENOMSG) =>
            {
                Ok(0)
            }
            Err(e) => Err(VfioError::library(
                format!("{}: reading device state", self.name),
                e,
            )),
        }
    }

    /// In STOP_COPY: all the remaining state.
    pub fn read_state_to_end(&self) -> Result<Vec<u8>> {
        self.inner.read_migration_data_to_end().map_err(|e| {
            VfioError::library(format!("{}: reading the final device state", self.name), e)
        })
    }

    /// In RESUMING: hands `data` to the device.
    pub fn write_state(&self, data: &[u8]) -> Result<()> {
        self.inner
            .write_migration_data(data)
            .map_err(|e| VfioError::library(format!("{}: writing device state", self.name), e))
    }

    /// Starts the device's own DMA logging of `ranges` at `page_size` granularity; returns the
    /// page size the device chose.
    pub fn start_dma_logging(&self, page_size: u64, ranges: &[DmaRange]) -> Result<u64> {
        let ranges: Vec<DmaLoggingRange> = ranges
            .iter()
            .map(|r| DmaLoggingRange {
                iova: r.iova.raw(),
                length: r.len,
            })
            .collect();
        self.inner
            .start_dma_logging(page_size, &ranges)
            .map_err(|e| VfioError::library(format!("{}: DMA_LOGGING_START", self.name), e))
    }

    /// The pages of `[iova, iova+length)` the device wrote since the last report.
    pub fn report_dma_logging(&self, iova: Iova, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let iova = iova.raw();
        self.inner
            .report_dma_logging(DmaLoggingRange { iova, length }, page_size)
            .map_err(|e| VfioError::library(format!("{}: DMA_LOGGING_REPORT", self.name), e))
    }

    /// Stops the device's DMA logging.
    pub fn stop_dma_logging(&self) -> Result<()> {
        self.inner
            .stop_dma_logging()
            .map_err(|e| VfioError::library(format!("{}: DMA_LOGGING_STOP", self.name), e))
    }
}

/// A description of `device` and its `container` for people: regions, interrupts, what it
/// offers for migration and dirty tracking, and why it cannot migrate when it cannot. Its
/// `Display` is what `vmig device probe --vfio-pci` prints.
pub fn describe(container: &Container, device: &Device) -> Result<DeviceDescription> {
    let io = device.io_bars().unwrap_or_default();
    let regions = (0..16)
        .filter_map(|index| {
            let r = device.region(index)?;
            let mmap = if r.mmap_areas.is_empty() {
                Mmap::Trapped
            } else if r.mmap_areas == [RegionArea::new(0, r.size)] {
                Mmap::Whole
            } else {
                Mmap::Areas(r.mmap_areas.clone())
            };
            Some(RegionDescription {
                index,
                size: r.size,
                readable: r.readable(),
                writable: r.writable(),
                io: usize::try_from(index)
                    .ok()
                    .and_then(|i| io.get(i))
                    .is_some_and(|&io| io),
                mmap,
                region_type: None,
            })
        })
        .collect();
    let irqs = (0..8)
        .filter_map(|index| {
            let irq = device.irq(index).filter(|i| i.count > 0)?;
            Some(IrqDescription {
                index,
                count: irq.count,
                eventfd: irq.flags & IRQ_INFO_EVENTFD != 0,
                maskable: irq.flags & vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_MASKABLE != 0,
            })
        })
        .collect();
    let migration = match device.migration_support()? {
        Some(m) => MigrationDescription::V2 {
            flags: m.flags,
            pre_copy: m.pre_copy(),
            dma_logging: m.dma_logging,
        },
        None => MigrationDescription::None,
    };
    let info = container.info()?;
    Ok(DeviceDescription {
        origin: Origin::KernelPci(KernelPciDevice {
            name: device.name().to_owned(),
            mdev: check_mdev_uuid(device.name()).is_ok(),
            ids: device.pci_ids(),
            blocker: device.migration_blocker(),
            page_sizes: info.iova_pgsizes,
            iova_ranges: info.iova_ranges.iter().map(|r| (r.start, r.last)).collect(),
            dma_avail: info.dma_avail,
            dirty_tracking: info
                .migration
                .map(|m| (m.pgsize_bitmap, m.max_dirty_bitmap_size)),
        }),
        reset: device.can_reset(),
        regions,
        irqs,
        migration,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdev_uuids_are_checked_before_they_touch_sysfs() {
        assert_eq!(
            check_mdev_uuid("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001").unwrap(),
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
        );
        // The kernel names the device in lowercase whatever case created it.
        assert_eq!(
            check_mdev_uuid("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001").unwrap(),
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
        );
        for bad in [
            "",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001/..",
            "../../../../etc/passwd-aaaaaaaaaaaaaa",
            "83b8f4f2-509f-382f-3c1e_e6bfe0fa1001",
            "g3b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            "0000:01:00.0",
        ] {
            let err = check_mdev_uuid(bad).unwrap_err().to_string();
            assert!(
                err.contains("expected 8-4-4-4-12 hex digits"),
                "{bad}: {err}"
            );
        }
        // A well-formed UUID of no device says how to create one.
        let err = check_mdev("00000000-0000-0000-0000-000000000000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mdev_supported_types/TYPE/create"), "{err}");
    }

    #[test]
    fn pci_addresses_are_checked_before_they_touch_sysfs() {
        assert!(check_bdf("0000:01:00.0").is_ok());
        assert!(check_bdf("abcd:ef:1f.7").is_ok());
        for bad in [
            "",
            "01:00.0",
            "0000:01:00.8",
            "../../../etc",
            "0000:01:00.0/..",
            "0000:0g:00.0",
        ] {
            let err = check_bdf(bad).unwrap_err().to_string();
            assert!(
                err.contains("expected DOMAIN:BUS:SLOT.FUNCTION"),
                "{bad}: {err}"
            );
        }
    }
}
