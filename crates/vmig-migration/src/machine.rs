//! A VM with its devices attached: the glue between `vmig-kvm` and the devices
//! (`vmig-vfio-user` servers, or PCI devices through the kernel's VFIO with `vmig-vfio`) that a
//! migration moves as one.
//!
//! Attaching a device (in `--device` order, the same on both sides of a migration):
//! 1. connect to its server (guest RAM is offered for message-based DMA as well), or open
//!    the PCI device in a type1 container of its own (its group registered with the VM's KVM
//!    VFIO device); reset the device when it supports reset, so it starts as a booting VM
//!    expects whatever state an earlier user left it in, then enable a PCI device's memory
//!    decoding and bus mastering;
//! 2. DMA-map every RAM slot, IOVA = guest-physical address (a vfio-user server gets the
//!    slot's fd; the kernel pins the VMM's mapping, split and aligned by the seed 003 rules);
//! 3. place BARs 0-5 in the guest's MMIO window, device *i* in the *i*-th 16 MiB slot, each BAR
//!    aligned to its size; the mmappable areas a region offers (sparse-mmap areas, or the whole
//!    region) become guest memslots backed by the device's fd, and the rest traps: guest
//!    accesses there become region reads and writes (a PCI device's MSI-X table and pending
//!    bits always trap);
//! 4. wire its interrupts: each MSI-X vector (else MSI; INTx is not wired), up to
//!    [`MAX_VECTORS`], gets an eventfd that KVM delivers as an MSI to vCPU 0's local APIC
//!    (irqfd), with IDT vector `0x40 + 8 * device + n`; the guest runs with interrupts off,
//!    so they stay pending in the APIC's IRR, which migrates with the vCPU;
//! 5. find the migration protocol (v2 feature, else v1 region; a kernel device needs v2 with
//!    `STOP_COPY`), or why the device blocks migration;
//! 6. offer the device to the registered guest drivers ([`crate::driver`]): the one that takes
//!    it may set it up on a source (in the device area, the top of RAM outside the guest's
//!    working set) and give the guest a doorbell its vCPU 0 serves at every batch; on a
//!    destination all of that arrives with the migration.
//!
//! Steps 1 and 5 are each kind's own ([`UserDevice::attach`], [`KernelDevice::attach`]);
//! the rest is one path over [`MigratableDevice`].

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vmig_kvm::guest::{self, MMIO_WINDOW_GPA};
use vmig_kvm::irq::MsiVector;
use vmig_kvm::{MmioError, MmioHandler, PAGE_SIZE, Vm};
use vmig_primitives::{GuestAddress, RegionArea};
use vmig_vfio::VfioDeviceFd;

use crate::device::{
    InterruptKind, KernelDevice, MigratableDevice, MigrationProtocol, MigrationSteps, RegionView,
    UserDevice,
};
use crate::driver::{BoundDriver, DeviceCheck, DriverContext, GuestDrivers};
use crate::error::{DeviceFailure, InterruptError, MigrationError, Result, device_error};

/// Guest-physical span of each device's BARs.
pub const DEVICE_MMIO_SLOT: u64 = 16 << 20;
/// Most devices a VM takes.
pub const MAX_DEVICES: usize = guest::MAX_DOORBELLS;
/// RAM reserved per device at the top of guest RAM for its DMA (ring and buffers).
pub const DEVICE_AREA: u64 = 2 << 20;
/// The `rate=N` a `--device` has unless told otherwise (records per second, for a dma-engine).
pub const DEFAULT_DMA_RATE: u64 = 1000;

/// A `--device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `vfio-user,socket=PATH[,rate=N]`: a device served over vfio-user.
    VfioUser {
        /// The server's socket.
        socket: PathBuf,
        /// Records per second for a dma-engine.
        dma_rate: u64,
    },
    /// `vfio-pci,host=DDDD:BB:DD.F`: a PCI device of this host bound to vfio-pci (or a
    /// variant driver), through the kernel's VFIO.
    VfioPci {
        /// Its PCI address.
        host: String,
    },
}

impl DeviceSpec {
    /// A vfio-user device at `socket`, a dma-engine writing `dma_rate` records per second.
    pub fn vfio_user(socket: impl Into<PathBuf>, dma_rate: u64) -> Self {
        Self::VfioUser {
            socket: socket.into(),
            dma_rate,
        }
    }
}

const DEVICE_SPEC_FORMS: &str =
    "expected vfio-user,socket=PATH[,rate=RECORDS_PER_S] or vfio-pci,host=DDDD:BB:DD.F";

impl std::str::FromStr for DeviceSpec {
    type Err = MigrationError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: String| {
            MigrationError::Invalid(format!("device `{spec}`: {why}; {DEVICE_SPEC_FORMS}"))
        };
        let mut parts = spec.split(',');
        match parts.next() {
            Some("vfio-user") => {}
            Some("vfio-pci") => {
                let mut host = None;
                for part in parts {
                    match part.split_once('=') {
                        Some(("host", bdf)) if !bdf.is_empty() => host = Some(bdf.to_string()),
                        _ => return Err(bad(format!("unknown option `{part}`"))),
                    }
                }
                // sysfs names devices in lower case.
                let host = host
                    .ok_or_else(|| bad("host=DDDD:BB:DD.F is missing".into()))?
                    .to_ascii_lowercase();
                vmig_vfio::device::check_bdf(&host).map_err(|e| bad(e.to_string()))?;
                return Ok(Self::VfioPci { host });
            }
            Some(kind) => return Err(bad(format!("unknown device kind `{kind}`"))),
            None => return Err(bad("empty".into())),
        }
        let mut socket = None;
        let mut dma_rate = DEFAULT_DMA_RATE;
        for part in parts {
            match part.split_once('=') {
                Some(("socket", path)) if !path.is_empty() => socket = Some(PathBuf::from(path)),
                Some(("rate", n)) => {
                    dma_rate = n
                        .parse()
                        .ok()
                        .filter(|&r| r <= 1_000_000)
                        .ok_or_else(|| bad(format!("rate `{n}` is not 0 to 1000000")))?;
                }
                _ => return Err(bad(format!("unknown option `{part}`"))),
            }
        }
        Ok(Self::VfioUser {
            socket: socket.ok_or_else(|| bad("socket=PATH is missing".into()))?,
            dma_rate,
        })
    }
}

/// A BAR placed in guest-physical space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// Region index (0-5).
    pub index: u32,
    /// Guest-physical address.
    pub gpa: GuestAddress,
    /// Bytes.
    pub size: u64,
}

/// Device memory mapped into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedArea {
    /// The device region it is part of.
    pub region: u32,
    /// Where the guest sees it.
    pub gpa: GuestAddress,
    /// Bytes.
    pub len: u64,
}

/// One attached device.
pub struct AttachedDevice {
    /// A name for reports (the socket's file name, or the PCI address).
    pub name: String,
    /// The device.
    pub device: Arc<dyn MigratableDevice>,
    /// Its BARs in the guest.
    pub bars: Vec<Bar>,
    /// Its interrupt vectors wired into the guest (MSI-X or MSI vector n is `interrupts[n]`).
    pub interrupts: Vec<MsiVector>,
    /// Device memory mapped into the guest.
    pub mapped: Vec<MappedArea>,
    /// The guest driver that took it, if one did.
    pub driver: Option<Box<dyn BoundDriver>>,
}

impl std::fmt::Debug for AttachedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedDevice")
            .field("name", &self.name)
            .field("kind", &self.device.kind())
            .field("protocol", &self.protocol())
            .field("bars", &self.bars)
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl AttachedDevice {
    /// The device's migration steps, or why it cannot migrate.
    pub fn migration(&self) -> Result<Box<dyn MigrationSteps + '_>> {
        let blocked = |message: String| MigrationError::device(self.name.clone(), message);
        self.device.migration_protocol().map_err(blocked)?;
        self.device
            .migration()
            .ok_or_else(|| blocked("cannot migrate".into()))
    }

    /// The protocol its state migrates by; `None` when it cannot migrate.
    pub fn protocol(&self) -> Option<MigrationProtocol> {
        self.device.migration_protocol().ok()
    }

    /// "v1", "v2" or "none".
    pub fn protocol_name(&self) -> &'static str {
        self.protocol()
            .as_ref()
            .map_or("none", MigrationProtocol::name)
    }
}

struct BusEntry {
    start: u64,
    size: u64,
    region: u32,
    /// The device's index in the machine.
    device: usize,
    handle: Arc<dyn MigratableDevice>,
    /// Guest reads that trapped here.
    reads: AtomicU64,
}

/// Routes guest MMIO to the device whose BAR holds the address.
struct DeviceBus {
    entries: Vec<BusEntry>,
}

impl DeviceBus {
    fn find(&self, addr: u64, len: usize) -> std::result::Result<(&BusEntry, u64), MmioError> {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        self.entries
            .iter()
            .find(|e| addr >= e.start && (addr - e.start).saturating_add(len64) <= e.size)
            .map(|e| (e, addr - e.start))
            .ok_or(MmioError::Unclaimed { addr, len })
    }
}

impl MmioHandler for DeviceBus {
    fn read(&self, addr: u64, data: &mut [u8]) -> std::result::Result<(), MmioError> {
        let (entry, offset) = self.find(addr, data.len())?;
        entry.reads.fetch_add(1, Ordering::Relaxed);
        // A device that fails (its server died) reads as all ones and drops writes, as a PCI
        // device that stopped answering does: the guest goes on. (Its mapped areas keep
        // their last contents.)
        if entry
            .handle
            .region_read(entry.region, offset, data)
            .is_err()
        {
            data.fill(0xff);
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), MmioError> {
        let (entry, offset) = self.find(addr, data.len())?;
        let _ = entry.handle.region_write(entry.region, offset, data);
        Ok(())
    }
}

/// Which side of a migration a machine is on, which decides who programs the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A VM that boots here: the VMM starts its devices.
    Source,
    /// A VM that arrives by migration: device state comes in the stream.
    Destination,
}

/// A VM and its devices.
pub struct Machine {
    /// The VM.
    pub vm: Vm,
    /// Its devices, in `--device` order.
    pub devices: Vec<AttachedDevice>,
    bus: Arc<DeviceBus>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vm", &self.vm)
            .field("devices", &self.devices)
            .finish()
    }
}

/// Bytes of RAM `devices` devices reserve at the top of guest RAM.
pub fn device_area_bytes(devices: usize) -> u64 {
    devices as u64 * DEVICE_AREA
}

/// Guest-physical address of device `index`'s area.
fn device_area_gpa(vm: &Vm, index: usize) -> Result<u64> {
    let layout = vm.layout();
    let top = layout
        .memory
        .data_slots()
        .last()
        .ok_or_else(|| MigrationError::Invalid("the VM has no data RAM".into()))?;
    let offset = (index as u64 + 1) * DEVICE_AREA;
    if offset > top.size {
        return Err(MigrationError::Invalid(format!(
            "the top RAM slot ({} MiB) has no room for the DMA areas of {} devices",
            top.size >> 20,
            index + 1
        )));
    }
    let gpa = top.gpa + top.size - offset;
    // The working set is a prefix of data-a then data-b: it must end below the areas.
    let ws_end = layout
        .ws_page_gpa(layout.ws_pages - 1)
        .map_or(0, |g| g + PAGE_SIZE);
    if ws_end > gpa && ws_end <= top.gpa + top.size {
        return Err(MigrationError::Invalid(format!(
            "the guest's working set reaches {ws_end:#x}, into the DMA area of device {index} at {gpa:#x}: use a working set of at most {} bytes",
            layout.memory.data_slots().map(|s| s.size).sum::<u64>()
                - (index as u64 + 1) * DEVICE_AREA
        )));
    }
    Ok(gpa)
}

impl Machine {
    /// Attaches the devices of `specs` to `vm` (see the module doc) with no guest driver;
    /// `role` says whether the VM boots here.
    pub fn attach(vm: Vm, specs: &[DeviceSpec], role: Role) -> Result<Self> {
        Self::attach_with_drivers(vm, specs, role, &GuestDrivers::none())
    }

    /// As [`Self::attach`], offering every device to `drivers`.
    pub fn attach_with_drivers(
        vm: Vm,
        specs: &[DeviceSpec],
        role: Role,
        drivers: &GuestDrivers,
    ) -> Result<Self> {
        if specs.len() > MAX_DEVICES {
            return Err(MigrationError::Invalid(format!(
                "{} devices: a VM takes at most {MAX_DEVICES}",
                specs.len()
            )));
        }
        let mut devices = Vec::with_capacity(specs.len());
        let mut bus = DeviceBus {
            entries: Vec::new(),
        };
        let mut doorbells = Vec::new();
        let mut kvm_vfio = None;
        for (index, spec) in specs.iter().enumerate() {
            let (name, device) = open_device(&vm, specs, index, &mut kvm_vfio)?;
            let regions = device.bar_regions().map_err(device_error(&name))?;
            let (bars, mapped) = place_bars(&vm, index, &name, &device, &regions, &mut bus)?;
            drop(regions);
            let interrupts = wire_interrupts(&vm, index, device.as_ref()).map_err(|e| {
                MigrationError::Device {
                    device: name.clone(),
                    source: DeviceFailure::Interrupts(e),
                }
            })?;
            let ctx = DriverContext {
                index,
                name: &name,
                device: device.as_ref(),
                bars: &bars,
                mapped: &mapped,
                memory: vm.memory(),
                dma_area: device_area_gpa(&vm, index)
                    .map(GuestAddress)
                    .map_err(|e| e.to_string()),
                role,
                rate: match spec {
                    DeviceSpec::VfioUser { dma_rate, .. } => *dma_rate,
                    DeviceSpec::VfioPci { .. } => DEFAULT_DMA_RATE,
                },
            };
            let driver = drivers.bind(&ctx)?;
            if let Some(bell) = driver.as_ref().and_then(|d| d.doorbell()) {
                doorbells.push(bell);
            }
            tracing::debug!(
                device = %name,
                kind = %device.kind(),
                protocol = device.migration_protocol().as_ref().map_or("none", MigrationProtocol::name),
                bars = bars.len(),
                mapped = mapped.len(),
                vectors = interrupts.len(),
                driver = driver.is_some(),
                "device attached"
            );
            devices.push(AttachedDevice {
                name,
                device,
                bars,
                interrupts,
                mapped,
                driver,
            });
        }
        let bus = Arc::new(bus);
        if !bus.entries.is_empty() {
            vm.set_mmio_handler(Some(Arc::clone(&bus) as _));
        }
        if role == Role::Source {
            guest::set_doorbells(vm.memory(), &doorbells)?;
        }
        Ok(Self { vm, devices, bus })
    }

    /// Why the VM cannot migrate: one line per device that cannot, naming it (QEMU's
    /// migration blockers); empty when it can.
    pub fn migration_blockers(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|d| d.migration().err().map(|e| e.to_string()))
            .collect()
    }

    /// Guest reads of device `device`'s region `region` that trapped to the VMM (reads of its
    /// mapped areas do not).
    pub fn trapped_reads(&self, device: usize, region: u32) -> u64 {
        self.bus
            .entries
            .iter()
            .filter(|e| e.region == region && e.device == device)
            .map(|e| e.reads.load(Ordering::Relaxed))
            .sum()
    }

    /// What each device's guest driver finds when it checks its device (devices without a
    /// driver are not checked).
    pub fn check_devices(&self) -> Result<Vec<DeviceCheck>> {
        let mut checks = Vec::new();
        for device in &self.devices {
            let Some(driver) = &device.driver else {
                continue;
            };
            let mut check = driver.check(device.device.as_ref(), self.vm.memory())?;
            check.device.clone_from(&device.name);
            checks.push(check);
        }
        Ok(checks)
    }
}

/// Opens `specs[index]` as its kind does (steps 1 and 5 of the module doc): its name and the
/// device.
fn open_device(
    vm: &Vm,
    specs: &[DeviceSpec],
    index: usize,
    kvm_vfio: &mut Option<Arc<VfioDeviceFd>>,
) -> Result<(String, Arc<dyn MigratableDevice>)> {
    match &specs[index] {
        DeviceSpec::VfioUser { socket, .. } => {
            let name = socket.file_name().map_or_else(
                || socket.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let device = UserDevice::attach(socket, vm.memory()).map_err(device_error(&name))?;
            Ok((name, Arc::new(device)))
        }
        DeviceSpec::VfioPci { host } => {
            let named = |message: String| MigrationError::device(host.clone(), message);
            if specs[..index]
                .iter()
                .any(|s| matches!(s, DeviceSpec::VfioPci { host: h } if h == host))
            {
                return Err(named("given twice".into()));
            }
            vmig_vfio::availability().map_err(named)?;
            vmig_vfio::device::check_bound(host).map_err(device_error(host))?;
            let kvm_vfio = match kvm_vfio {
                Some(fd) => Arc::clone(fd),
                None => {
                    let fd = vm.create_vfio_device().map_err(device_error(host))?;
                    Arc::clone(kvm_vfio.insert(Arc::new(VfioDeviceFd::new_from_kvm(fd))))
                }
            };
            let device =
                KernelDevice::attach(host, vm.memory(), kvm_vfio).map_err(device_error(host))?;
            Ok((host.clone(), Arc::new(device)))
        }
    }
}

/// Places device `index`'s BARs in its slot of the guest's MMIO window, maps what can be
/// mapped and routes the rest to `bus`; returns the BARs and the mapped areas.
fn place_bars(
    vm: &Vm,
    index: usize,
    name: &str,
    handle: &Arc<dyn MigratableDevice>,
    regions: &[RegionView],
    bus: &mut DeviceBus,
) -> Result<(Vec<Bar>, Vec<MappedArea>)> {
    let slot_base = MMIO_WINDOW_GPA + index as u64 * DEVICE_MMIO_SLOT;
    let mut next = slot_base;
    let mut bars = Vec::new();
    let mut mapped = Vec::new();
    for region in regions {
        let size = region.size;
        let align = size.next_power_of_two().max(PAGE_SIZE);
        let gpa = next.next_multiple_of(align);
        if gpa + size > slot_base + DEVICE_MMIO_SLOT {
            return Err(MigrationError::device(
                name.to_string(),
                format!(
                    "BAR{} of {size:#x} bytes does not fit the device's {} MiB of guest MMIO space",
                    region.index,
                    DEVICE_MMIO_SLOT >> 20
                ),
            ));
        }
        next = gpa + size;
        bars.push(Bar {
            index: region.index,
            gpa: GuestAddress(gpa),
            size,
        });
        bus.entries.push(BusEntry {
            start: gpa,
            size,
            region: region.index,
            device: index,
            handle: Arc::clone(handle),
            reads: AtomicU64::new(0),
        });
        let Some((fd, region_offset)) = &region.mmap else {
            continue;
        };
        for &RegionArea { offset, len: bytes } in &region.areas {
            // An area that is not whole pages inside the region, or that cannot be mapped,
            // stays trapped: slower, and still correct.
            let whole_pages = bytes > 0
                && offset.is_multiple_of(PAGE_SIZE)
                && bytes.is_multiple_of(PAGE_SIZE)
                && offset.checked_add(bytes).is_some_and(|end| end <= size);
            let Some(file_offset) = region_offset.checked_add(offset) else {
                continue;
            };
            if !whole_pages
                || vm
                    .map_device_memory(
                        gpa + offset,
                        fd.as_fd(),
                        file_offset,
                        bytes,
                        region.writable,
                    )
                    .is_err()
            {
                continue;
            }
            mapped.push(MappedArea {
                region: region.index,
                gpa: GuestAddress(gpa + offset),
                len: bytes,
            });
        }
    }
    Ok((bars, mapped))
}

/// Vectors wired per device, and the IDT vector of device 0's first.
pub const MAX_VECTORS: u32 = 8;
const FIRST_VECTOR: u8 = 0x40;

/// The IDT vector the guest receives device `device`'s MSI-X / MSI vector `n` on.
///
/// `device` is below [`MAX_DEVICES`] and `n` below [`MAX_VECTORS`], so the vector stays below
/// `0x40 + MAX_DEVICES × 8`; a larger pair is clamped to the last vector.
pub fn interrupt_vector(device: usize, n: u32) -> u8 {
    let offset = u64::try_from(device)
        .unwrap_or(u64::MAX)
        .saturating_mul(u64::from(MAX_VECTORS))
        .saturating_add(u64::from(n));
    u8::try_from(offset)
        .ok()
        .and_then(|o| FIRST_VECTOR.checked_add(o))
        .unwrap_or(u8::MAX)
}

/// Gives the device an irqfd for each of its MSI-X vectors (else MSI vectors), up to
/// [`MAX_VECTORS`].
fn wire_interrupts(
    vm: &Vm,
    index: usize,
    device: &dyn MigratableDevice,
) -> std::result::Result<Vec<MsiVector>, InterruptError> {
    for kind in [InterruptKind::Msix, InterruptKind::Msi] {
        let Some(info) = device.interrupt_info(kind)? else {
            continue;
        };
        let count = info.count.min(MAX_VECTORS);
        if count == 0 || !info.eventfd {
            continue;
        }
        let vectors = (0..count)
            .map(|n| vm.connect_msi(0, interrupt_vector(index, n)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if device.set_interrupts(kind, &vectors)? {
            return Ok(vectors);
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_pci_specs_parse_strictly() {
        let spec: DeviceSpec = "vfio-pci,host=0000:0A:00.1".parse().unwrap();
        assert_eq!(
            spec,
            DeviceSpec::VfioPci {
                host: "0000:0a:00.1".into()
            }
        );
        for (bad, why) in [
            ("vfio-pci", "host=DDDD:BB:DD.F is missing"),
            ("vfio-pci,host=0a:00.1", "expected DOMAIN:BUS:SLOT.FUNCTION"),
            (
                "vfio-pci,host=0000:0a:00.8",
                "expected DOMAIN:BUS:SLOT.FUNCTION",
            ),
            (
                "vfio-pci,host=0000:0a:00.1,rate=5",
                "unknown option `rate=5`",
            ),
            ("virtio,host=x", "unknown device kind `virtio`"),
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(DEVICE_SPEC_FORMS),
                "{bad}: {e}"
            );
        }
    }
}
