//! A VM with its devices attached: the glue between `vmig-kvm` and the devices
//! (`vmig-vfio-user` servers, or PCI devices and mediated devices through the kernel's VFIO
//! with `vmig-vfio`) that a migration moves as one.
//!
//! Attaching a device (in `--device` order, the same on both sides of a migration):
//! 1. connect to its server (guest RAM is offered for message-based DMA as well), or open
//!    the PCI device (by address) or the mdev (by UUID; its kind is then
//!    [`DeviceKind::VfioMdev`](crate::device::DeviceKind)) in a type1 container of its own
//!    (its group registered with the VM's KVM VFIO device); reset the device when it supports
//!    reset, so it starts as a booting VM expects whatever state an earlier user left it in,
//!    then enable a kernel device's I/O decoding (when it has I/O BARs), memory decoding and
//!    bus mastering (an mdev's emulated config space may keep bits of its own);
//! 2. DMA-map every RAM slot, IOVA = guest-physical address (a vfio-user server gets the
//!    slot's fd; the kernel pins the VMM's mapping, split and aligned by the seed 003 rules);
//! 3. place BARs 0-5: a memory BAR in the guest's MMIO window, device *i* in the *i*-th 16 MiB
//!    slot, each BAR aligned to its size; the mmappable areas a region offers (sparse-mmap
//!    areas, or the whole region) become guest memslots backed by the device's fd, and the rest
//!    traps: guest accesses there become region reads and writes (a PCI device's MSI-X table
//!    and pending bits always trap). An I/O-port BAR (bit 0 of its config-space register, as a
//!    16550 UART's) goes in the guest's I/O-port window, device *i* at port
//!    `0xc000 + 0x100 × i` ([`DEVICE_IO_SLOT`] ports each), aligned to its size, never mapped:
//!    the guest's `in`s and `out`s there become region reads and writes through the same bus;
//! 4. wire its interrupts: each MSI-X vector (else MSI; INTx is not wired), up to
//!    [`MAX_VECTORS`], gets an eventfd that KVM delivers as an MSI to vCPU 0's local APIC
//!    (irqfd), with IDT vector `0x40 + 8 * device + n`; the guest runs with interrupts off,
//!    so they stay pending in the APIC's IRR, which migrates with the vCPU. A device with
//!    neither (INTx only) runs with its interrupts unwired, and a warning says so;
//! 5. find the migration protocol (v2 feature, else v1 region; a kernel device needs v2 with
//!    `STOP_COPY`), or why the device blocks migration;
//! 6. offer the device to the registered guest drivers ([`crate::driver`]): the one that takes
//!    it may set it up on a source (in the device area, the top of RAM outside the guest's
//!    working set) and give the guest a doorbell its vCPU 0 serves at every batch; on a
//!    destination all of that arrives with the migration;
//! 7. offer it, by its PCI vendor:device, to the registered migration mediators
//!    ([`crate::mediator`]): the first that takes it owns it with a handle of its own, and
//!    may trap some of its mapped areas while a migration runs (on both sides: a VM that
//!    arrived may migrate again).
//!
//! Steps 1 and 5 are each kind's own ([`UserDevice::attach`], [`KernelDevice::attach`]);
//! the rest is one path over [`MigratableDevice`].

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmig_kvm::guest::{self, IO_WINDOW_PORT, IO_WINDOW_PORTS, MMIO_WINDOW_GPA};
use vmig_kvm::irq::MsiVector;
use vmig_kvm::{MmioError, MmioHandler, PAGE_SIZE, PortHandler, PortOp, Vm};
use vmig_primitives::{GuestAddress, RegionArea};
use vmig_vfio::VfioDeviceFd;

use crate::device::{
    BarSpace, DirtyLogKind, InterruptKind, KernelDevice, KernelDeviceId, MigratableDevice,
    MigrationProtocol, MigrationSteps, RegionView, UserDevice,
};
use crate::driver::{BoundDriver, DeviceCheck, DriverContext, GuestDrivers};
use crate::error::{DeviceFailure, InterruptError, MigrationError, Result, device_error};
use crate::mediator::{MediatedDevice, MediatorContext, PciId};

/// Guest-physical span of each device's memory BARs.
pub const DEVICE_MMIO_SLOT: u64 = 16 << 20;
/// Guest I/O ports of each device's I/O-port BARs: device *i*'s start at
/// `IO_WINDOW_PORT + i × DEVICE_IO_SLOT` (`0xc000`, `0xc100`, ...).
pub const DEVICE_IO_SLOT: u16 = 0x100;
/// Most devices a VM takes.
pub const MAX_DEVICES: usize = guest::MAX_DOORBELLS;
// Every device's I/O slot lies in the guest's I/O-port window.
const _: () = assert!(MAX_DEVICES * DEVICE_IO_SLOT as usize <= IO_WINDOW_PORTS as usize);
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
    /// `vfio-mdev,uuid=UUID`: a mediated device of this host (`/sys/bus/mdev/devices/UUID`,
    /// such as the kernel's `mtty` sample) that presents itself as PCI, through the kernel's
    /// VFIO.
    VfioMdev {
        /// Its UUID, in lowercase as the kernel names it.
        uuid: String,
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

    /// The kernel VFIO device it names, if it names one.
    pub fn kernel_device(&self) -> Option<KernelDeviceId> {
        match self {
            Self::VfioUser { .. } => None,
            Self::VfioPci { host } => Some(KernelDeviceId::Pci(host.clone())),
            Self::VfioMdev { uuid } => Some(KernelDeviceId::Mdev(uuid.clone())),
        }
    }
}

const DEVICE_SPEC_FORMS: &str = "expected vfio-user,socket=PATH[,rate=RECORDS_PER_S], \
     vfio-pci,host=DDDD:BB:DD.F or vfio-mdev,uuid=UUID";

impl std::str::FromStr for DeviceSpec {
    type Err = MigrationError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: String| {
            MigrationError::Invalid(format!("device `{spec}`: {why}; {DEVICE_SPEC_FORMS}"))
        };
        let mut parts = spec.split(',');
        match parts.next() {
            Some("vfio-user") => {}
            Some(kind @ ("vfio-pci" | "vfio-mdev")) => {
                let (key, form) = match kind {
                    "vfio-pci" => ("host", "host=DDDD:BB:DD.F"),
                    _ => ("uuid", "uuid=UUID"),
                };
                let mut value = None;
                for part in parts {
                    match part.split_once('=') {
                        Some((k, v)) if k == key && !v.is_empty() => value = Some(v.to_string()),
                        _ => return Err(bad(format!("unknown option `{part}`"))),
                    }
                }
                // sysfs names devices in lower case.
                let value = value
                    .ok_or_else(|| bad(format!("{form} is missing")))?
                    .to_ascii_lowercase();
                return if kind == "vfio-pci" {
                    vmig_vfio::device::check_bdf(&value).map_err(|e| bad(e.to_string()))?;
                    Ok(Self::VfioPci { host: value })
                } else {
                    let uuid = vmig_vfio::device::check_mdev_uuid(&value)
                        .map_err(|e| bad(e.to_string()))?;
                    Ok(Self::VfioMdev { uuid })
                };
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

/// A BAR placed in the guest: in guest-physical memory, or (an I/O-port BAR) in its I/O ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// Region index (0-5).
    pub index: u32,
    /// Guest-physical address; for an I/O-port BAR, its first port.
    pub gpa: GuestAddress,
    /// Bytes (ports, for an I/O-port BAR).
    pub size: u64,
    /// Memory or I/O ports. Left out of the stream's Config record for memory, so a record
    /// without it (an older source's) reads as memory.
    #[serde(default, skip_serializing_if = "BarSpace::is_memory")]
    pub space: BarSpace,
}

impl Bar {
    /// Whether guest I/O port `port` is in this BAR (an I/O-port BAR).
    pub fn holds_port(&self, port: u16) -> bool {
        self.space == BarSpace::Io
            && u64::from(port) >= self.gpa.raw()
            && u64::from(port) - self.gpa.raw() < self.size
    }
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
    /// The migration mediator that owns it, if one does ([`crate::mediator`]).
    pub mediation: Option<Arc<MediatedDevice>>,
}

impl std::fmt::Debug for AttachedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedDevice")
            .field("name", &self.name)
            .field("kind", &self.device.kind())
            .field("protocol", &self.protocol())
            .field("bars", &self.bars)
            .field("driver", &self.driver)
            .field("mediation", &self.mediation)
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

    /// What tracks the pages the device writes by DMA during a migration. Its own log (or its
    /// IOMMU's) when that is precise, even when a mediator owns the device: seed 002's rule,
    /// trapping must not be needed where DMA is tracked. Its mediator otherwise, and in place
    /// of a type1 container that reports every page. Nothing when it has neither.
    pub fn dma_tracker(&self) -> DmaTracker {
        let kind = self.device.dirty_log_kind();
        let precise = kind != DirtyLogKind::None && !self.device.dirty_log_reports_everything();
        match &self.mediation {
            _ if precise => DmaTracker::Own,
            Some(_) => DmaTracker::Mediator,
            None if kind != DirtyLogKind::None => DmaTracker::Own,
            None => DmaTracker::Nothing,
        }
    }
}

/// What tracks the pages a device writes by DMA ([`AttachedDevice::dma_tracker`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaTracker {
    /// The device's own DMA log, or its IOMMU's dirty pages.
    Own,
    /// Its migration mediator, trapping during the migration.
    Mediator,
    /// Nothing: a migration would lose what it writes.
    Nothing,
}

struct BusEntry {
    /// Which of the guest's spaces the BAR is in: guest-physical memory or I/O ports.
    space: BarSpace,
    start: u64,
    size: u64,
    region: u32,
    /// The device's index in the machine.
    device: usize,
    handle: Arc<dyn MigratableDevice>,
    /// The device's mediator, which takes the writes into its traps while they are engaged.
    mediation: Option<Arc<MediatedDevice>>,
    /// Guest reads that trapped here.
    reads: AtomicU64,
    /// Guest writes that trapped here.
    writes: AtomicU64,
}

/// Routes guest MMIO and port I/O to the device whose BAR holds the address or port: one bus
/// for both spaces, each entry saying which it is in.
struct DeviceBus {
    entries: Vec<BusEntry>,
}

impl DeviceBus {
    fn find(
        &self,
        space: BarSpace,
        addr: u64,
        len: usize,
    ) -> std::result::Result<(&BusEntry, u64), MmioError> {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        self.entries
            .iter()
            .find(|e| {
                e.space == space
                    && addr >= e.start
                    && (addr - e.start).saturating_add(len64) <= e.size
            })
            .map(|e| (e, addr - e.start))
            .ok_or(MmioError::Unclaimed { addr, len })
    }

    fn read(
        &self,
        space: BarSpace,
        addr: u64,
        data: &mut [u8],
    ) -> std::result::Result<(), MmioError> {
        let (entry, offset) = self.find(space, addr, data.len())?;
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

    fn write(&self, space: BarSpace, addr: u64, data: &[u8]) -> std::result::Result<(), MmioError> {
        let (entry, offset) = self.find(space, addr, data.len())?;
        entry.writes.fetch_add(1, Ordering::Relaxed);
        let mediated = entry
            .mediation
            .as_ref()
            .is_some_and(|m| m.trapped_write(entry.handle.as_ref(), entry.region, offset, data));
        if !mediated {
            let _ = entry.handle.region_write(entry.region, offset, data);
        }
        Ok(())
    }
}

impl MmioHandler for DeviceBus {
    fn read(&self, addr: u64, data: &mut [u8]) -> std::result::Result<(), MmioError> {
        DeviceBus::read(self, BarSpace::Memory, addr, data)
    }

    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), MmioError> {
        DeviceBus::write(self, BarSpace::Memory, addr, data)
    }
}

impl PortHandler for DeviceBus {
    fn read(&self, port: u16, data: &mut [u8]) -> std::result::Result<(), MmioError> {
        DeviceBus::read(self, BarSpace::Io, u64::from(port), data)
    }

    fn write(&self, port: u16, data: &[u8]) -> std::result::Result<(), MmioError> {
        DeviceBus::write(self, BarSpace::Io, u64::from(port), data)
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
        // A kernel device opens once: its group is held by the first open.
        for (index, spec) in specs.iter().enumerate() {
            if let Some(id) = spec.kernel_device()
                && specs[..index]
                    .iter()
                    .any(|s| s.kernel_device().as_ref() == Some(&id))
            {
                return Err(MigrationError::device(id.name(), "given twice"));
            }
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
            let interrupts = wire_interrupts(&vm, index, &name, device.as_ref()).map_err(|e| {
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
                    DeviceSpec::VfioPci { .. } | DeviceSpec::VfioMdev { .. } => DEFAULT_DMA_RATE,
                },
            };
            let driver = drivers.bind(&ctx)?;
            if let Some(bell) = driver.as_ref().and_then(|d| d.doorbell()) {
                doorbells.push(bell);
            }
            let mediation = open_mediation(drivers, index, &name, &device, &bars, &mapped)?;
            for entry in bus.entries.iter_mut().filter(|e| e.device == index) {
                entry.mediation.clone_from(&mediation);
            }
            tracing::debug!(
                device = %name,
                kind = %device.kind(),
                protocol = device.migration_protocol().as_ref().map_or("none", MigrationProtocol::name),
                bars = bars.len(),
                mapped = mapped.len(),
                vectors = interrupts.len(),
                driver = driver.is_some(),
                mediator = mediation.as_ref().map(|m| m.mediator.as_str()),
                "device attached"
            );
            devices.push(AttachedDevice {
                name,
                device,
                bars,
                interrupts,
                mapped,
                driver,
                mediation,
            });
        }
        let bus = Arc::new(bus);
        if bus.entries.iter().any(|e| e.space == BarSpace::Memory) {
            vm.set_mmio_handler(Some(Arc::clone(&bus) as _));
        }
        if bus.entries.iter().any(|e| e.space == BarSpace::Io) {
            vm.set_port_handler(Some(Arc::clone(&bus) as _));
        }
        if role == Role::Source {
            guest::set_doorbells(vm.memory(), &doorbells)?;
        }
        Ok(Self { vm, devices, bus })
    }

    /// Whether every device has the P2P migration states (false without devices): only then
    /// does a migration walk them through those states.
    pub fn all_p2p(&self) -> bool {
        !self.devices.is_empty()
            && self
                .devices
                .iter()
                .all(|d| d.migration().is_ok_and(|m| m.p2p()))
    }

    /// Why the VM cannot migrate: one line per device that cannot, naming it (QEMU's
    /// migration blockers); empty when it can.
    pub fn migration_blockers(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|d| d.migration().err().map(|e| e.to_string()))
            .collect()
    }

    /// Has the running guest's vCPU 0 execute `ops` (see [`Vm::run_port_script`]) and returns
    /// what its `in`s read: every port must lie in an I/O-port BAR of a device of this VM, so
    /// the accesses become that device's region reads and writes (a port no device holds is
    /// refused here, before the guest sees it, rather than stopping vCPU 0).
    pub fn run_port_script(&self, ops: &[PortOp], timeout: Duration) -> Result<Vec<u8>> {
        let bars: Vec<(&str, &Bar)> = self
            .devices
            .iter()
            .flat_map(|d| d.bars.iter().map(move |b| (d.name.as_str(), b)))
            .filter(|(_, b)| b.space == BarSpace::Io)
            .collect();
        if let Some(op) = ops
            .iter()
            .find(|op| !bars.iter().any(|(_, b)| b.holds_port(op.port())))
        {
            let held: Vec<String> = bars
                .iter()
                .map(|(name, b)| {
                    format!(
                        "{name} BAR{} at {:#x}-{:#x}",
                        b.index,
                        b.gpa.raw(),
                        b.gpa.raw() + b.size - 1
                    )
                })
                .collect();
            return Err(MigrationError::Invalid(format!(
                "I/O port {:#x} is in no device's I/O BAR: expected a port of {}",
                op.port(),
                if held.is_empty() {
                    "an I/O BAR, and this VM's devices have none".to_string()
                } else {
                    held.join(", ")
                }
            )));
        }
        Ok(self.vm.run_port_script(ops, timeout)?)
    }

    /// Guest reads of device `device`'s region `region` that trapped to the VMM (reads of its
    /// mapped areas do not; port reads of an I/O BAR always trap and count).
    pub fn trapped_reads(&self, device: usize, region: u32) -> u64 {
        self.trapped(device, region, |e| &e.reads)
    }

    /// Guest writes of device `device`'s region `region` that trapped to the VMM (writes into
    /// its mapped areas do not, unless a mediator traps them during a migration).
    pub fn trapped_writes(&self, device: usize, region: u32) -> u64 {
        self.trapped(device, region, |e| &e.writes)
    }

    /// The sum of one counter of device `device`'s region `region`'s bus entries.
    fn trapped(&self, device: usize, region: u32, counter: fn(&BusEntry) -> &AtomicU64) -> u64 {
        self.bus
            .entries
            .iter()
            .filter(|e| e.region == region && e.device == device)
            .map(|e| counter(e).load(Ordering::Relaxed))
            .sum()
    }

    /// What each device's guest driver finds when it checks its device (devices without a
    /// driver are not checked). A device that cannot be checked (its server died, its
    /// registers do not answer) is reported lost in its check's problems; the others are
    /// checked all the same.
    pub fn check_devices(&self) -> Vec<DeviceCheck> {
        let mut checks = Vec::new();
        for device in &self.devices {
            let Some(driver) = &device.driver else {
                continue;
            };
            let mut check = driver
                .check(device.device.as_ref(), self.vm.memory())
                .unwrap_or_else(|e| DeviceCheck {
                    problems: vec![format!("lost: it could not be checked ({e})")],
                    ..DeviceCheck::default()
                });
            check.device.clone_from(&device.name);
            checks.push(check);
        }
        checks
    }
}

/// Offers device `index` to the registered mediators by its PCI IDs (a device without PCI
/// config space is offered to none); the first that takes it owns it.
fn open_mediation(
    drivers: &GuestDrivers,
    index: usize,
    name: &str,
    device: &Arc<dyn MigratableDevice>,
    bars: &[Bar],
    mapped: &[MappedArea],
) -> Result<Option<Arc<MediatedDevice>>> {
    if drivers.mediators().is_empty() {
        return Ok(None);
    }
    let mut ids = [0u8; 4];
    if device
        .region_read(
            vmig_primitives::uapi::VFIO_PCI_CONFIG_REGION_INDEX,
            0,
            &mut ids,
        )
        .is_err()
    {
        return Ok(None);
    }
    let id = PciId {
        vendor: u16::from_le_bytes([ids[0], ids[1]]),
        device: u16::from_le_bytes([ids[2], ids[3]]),
    };
    let ctx = MediatorContext {
        index,
        name,
        id,
        device: device.as_ref(),
        bars,
        mapped,
    };
    let Some((mediator, handle)) = drivers.mediators().open(&ctx)? else {
        return Ok(None);
    };
    MediatedDevice::new(&mediator, handle, bars, mapped)
        .map(|m| Some(Arc::new(m)))
        .map_err(|why| MigrationError::device(name.to_string(), why))
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
        spec @ (DeviceSpec::VfioPci { .. } | DeviceSpec::VfioMdev { .. }) => {
            let id = spec
                .kernel_device()
                .ok_or_else(|| MigrationError::Invalid("not a kernel VFIO device".into()))?;
            let name = id.name().to_string();
            let named = |message: String| MigrationError::device(name.clone(), message);
            vmig_vfio::availability().map_err(named)?;
            id.check().map_err(device_error(&name))?;
            let kvm_vfio = match kvm_vfio {
                Some(fd) => Arc::clone(fd),
                None => {
                    let fd = vm.create_vfio_device().map_err(device_error(&name))?;
                    Arc::clone(kvm_vfio.insert(Arc::new(VfioDeviceFd::new_from_kvm(fd))))
                }
            };
            let device =
                KernelDevice::attach(&id, vm.memory(), kvm_vfio).map_err(device_error(&name))?;
            Ok((name, Arc::new(device)))
        }
    }
}

/// Places device `index`'s memory BARs in its slot of the guest's MMIO window and its I/O-port
/// BARs in its slot of the guest's I/O-port window, maps what can be mapped and routes the rest
/// to `bus`; returns the BARs and the mapped areas.
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
    let io_base = u64::from(IO_WINDOW_PORT) + index as u64 * u64::from(DEVICE_IO_SLOT);
    let mut next_io = io_base;
    let mut bars = Vec::new();
    let mut mapped = Vec::new();
    for region in regions {
        let size = region.size;
        if region.space == BarSpace::Io {
            // A size from the device is untrusted: one past the slot is refused before any
            // arithmetic on it.
            let io_end = io_base + u64::from(DEVICE_IO_SLOT);
            let port = (size <= u64::from(DEVICE_IO_SLOT))
                .then(|| next_io.next_multiple_of(size.next_power_of_two()))
                .filter(|port| port + size <= io_end);
            let Some(port) = port else {
                return Err(MigrationError::device(
                    name.to_string(),
                    format!(
                        "I/O BAR{} of {size:#x} ports does not fit the device's {DEVICE_IO_SLOT:#x} guest I/O ports",
                        region.index
                    ),
                ));
            };
            next_io = port + size;
            bars.push(Bar {
                index: region.index,
                gpa: GuestAddress(port),
                size,
                space: BarSpace::Io,
            });
            bus.entries.push(BusEntry {
                space: BarSpace::Io,
                start: port,
                size,
                region: region.index,
                device: index,
                handle: Arc::clone(handle),
                mediation: None,
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
            });
            continue;
        }
        let slot_end = slot_base + DEVICE_MMIO_SLOT;
        let gpa = (size <= DEVICE_MMIO_SLOT)
            .then(|| next.next_multiple_of(size.next_power_of_two().max(PAGE_SIZE)))
            .filter(|gpa| gpa + size <= slot_end);
        let Some(gpa) = gpa else {
            return Err(MigrationError::device(
                name.to_string(),
                format!(
                    "BAR{} of {size:#x} bytes does not fit the device's {} MiB of guest MMIO space",
                    region.index,
                    DEVICE_MMIO_SLOT >> 20
                ),
            ));
        };
        next = gpa + size;
        bars.push(Bar {
            index: region.index,
            gpa: GuestAddress(gpa),
            size,
            space: BarSpace::Memory,
        });
        bus.entries.push(BusEntry {
            space: BarSpace::Memory,
            start: gpa,
            size,
            region: region.index,
            device: index,
            handle: Arc::clone(handle),
            mediation: None,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
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
/// [`MAX_VECTORS`]. A device that takes neither (INTx only: that needs an irqfd with a
/// resample fd and an IOAPIC route, which the guest, running with interrupts off, has no use
/// for) runs unwired, with a warning.
fn wire_interrupts(
    vm: &Vm,
    index: usize,
    name: &str,
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
    if device
        .interrupt_info(InterruptKind::Intx)?
        .is_some_and(|i| i.count > 0)
    {
        tracing::warn!(
            device = name,
            "the device's interrupts are not wired: it offers neither MSI-X nor MSI that takes eventfds, only INTx, which vmig does not wire"
        );
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

    #[test]
    fn vfio_mdev_specs_parse_strictly() {
        let spec: DeviceSpec = "vfio-mdev,uuid=83B8F4F2-509F-382F-3C1E-E6BFE0FA1001"
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            DeviceSpec::VfioMdev {
                uuid: "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into()
            }
        );
        assert_eq!(
            spec.kernel_device(),
            Some(KernelDeviceId::Mdev(
                "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into()
            ))
        );
        for (bad, why) in [
            ("vfio-mdev", "uuid=UUID is missing"),
            ("vfio-mdev,uuid=", "unknown option `uuid=`"),
            (
                "vfio-mdev,uuid=83b8f4f2-509f-382f-3c1e",
                "mediated device UUID `83b8f4f2-509f-382f-3c1e`: expected 8-4-4-4-12 hex digits",
            ),
            (
                "vfio-mdev,uuid=../../../../etc/passwd-aaaaaaaaaaaaaa",
                "expected 8-4-4-4-12 hex digits",
            ),
            (
                "vfio-mdev,host=0000:0a:00.1",
                "unknown option `host=0000:0a:00.1`",
            ),
            (
                "vfio-mdev,uuid=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001,rate=5",
                "unknown option `rate=5`",
            ),
            (
                "vfio-pci,uuid=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
                "unknown option `uuid=",
            ),
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(DEVICE_SPEC_FORMS),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_bar_says_its_space_and_a_memory_bar_travels_as_it_always_did() {
        let memory = Bar {
            index: 2,
            gpa: GuestAddress(0xe000_0000),
            size: 0x1000,
            space: BarSpace::Memory,
        };
        let text = serde_json::to_string(&memory).unwrap();
        assert_eq!(text, r#"{"index":2,"gpa":3758096384,"size":4096}"#);
        assert_eq!(serde_json::from_str::<Bar>(&text).unwrap(), memory);
        let io = Bar {
            index: 0,
            gpa: GuestAddress(0xc000),
            size: 8,
            space: BarSpace::Io,
        };
        let text = serde_json::to_string(&io).unwrap();
        assert_eq!(text, r#"{"index":0,"gpa":49152,"size":8,"space":"io"}"#);
        assert_eq!(serde_json::from_str::<Bar>(&text).unwrap(), io);
        // A destination compares BARs: the same place in the other space is another BAR.
        assert_ne!(
            Bar {
                space: BarSpace::Memory,
                ..io
            },
            io
        );
        assert!(io.holds_port(0xc000) && io.holds_port(0xc007));
        assert!(!io.holds_port(0xc008) && !io.holds_port(0xbfff));
        assert!(!memory.holds_port(0));
    }

    #[test]
    fn an_mdev_is_a_kind_of_its_own() {
        use crate::device::DeviceKind;
        let mtty = DeviceKind::VfioMdev {
            ids: Some((0x4348, 0x3253)),
        };
        assert_eq!(mtty.to_string(), "vfio-mdev 4348:3253");
        assert_eq!(DeviceKind::VfioMdev { ids: None }.to_string(), "vfio-mdev");
        let text = serde_json::to_string(&mtty).unwrap();
        assert_eq!(text, r#"{"vfio-mdev":{"ids":[17224,12883]}}"#);
        assert_eq!(serde_json::from_str::<DeviceKind>(&text).unwrap(), mtty);
        // The destination compares kinds: the same IDs through vfio-pci are another device.
        assert_ne!(
            DeviceKind::VfioPci {
                ids: Some((0x4348, 0x3253))
            },
            mtty
        );
    }

    /// One region access: region, offset, bytes, whether a write.
    type Access = (u32, u64, Vec<u8>, bool);

    /// A device that records region accesses and answers reads with the region's index.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<Access>>);

    impl MigratableDevice for Recorder {
        fn kind(&self) -> crate::device::DeviceKind {
            crate::device::DeviceKind::VfioUser
        }
        fn region_read(
            &self,
            region: u32,
            offset: u64,
            buf: &mut [u8],
        ) -> crate::device::OpResult<()> {
            buf.fill(u8::try_from(region).unwrap() + 0xa0);
            self.0
                .lock()
                .unwrap()
                .push((region, offset, buf.to_vec(), false));
            Ok(())
        }
        fn region_write(
            &self,
            region: u32,
            offset: u64,
            data: &[u8],
        ) -> crate::device::OpResult<()> {
            self.0
                .lock()
                .unwrap()
                .push((region, offset, data.to_vec(), true));
            Ok(())
        }
        fn reset(&self) -> crate::device::OpResult<()> {
            Ok(())
        }
        fn bar_regions(&self) -> crate::device::OpResult<Vec<RegionView>> {
            Ok(Vec::new())
        }
        fn interrupt_info(
            &self,
            _: InterruptKind,
        ) -> crate::device::OpResult<Option<crate::device::InterruptInfo>> {
            Ok(None)
        }
        fn set_interrupts(
            &self,
            _: InterruptKind,
            _: &[MsiVector],
        ) -> crate::device::OpResult<bool> {
            Ok(false)
        }
        fn migration_protocol(&self) -> std::result::Result<MigrationProtocol, String> {
            Err("cannot migrate".into())
        }
        fn migration(&self) -> Option<Box<dyn MigrationSteps + '_>> {
            None
        }
        fn dirty_log_kind(&self) -> crate::device::DirtyLogKind {
            crate::device::DirtyLogKind::DmaLogging
        }
        fn dirty_log_start(
            &self,
            page_size: u64,
            _: &[vmig_primitives::DmaRange],
        ) -> crate::device::OpResult<u64> {
            Ok(page_size)
        }
        fn dirty_log_report(&self, _: u64, _: u64, _: u64) -> crate::device::OpResult<Vec<u64>> {
            Ok(Vec::new())
        }
        fn dirty_log_stop(&self) -> crate::device::OpResult<()> {
            Ok(())
        }
    }

    /// "One bus serves both spaces": a port access reaches the I/O BAR that holds the port as
    /// a region access at the port's offset, an MMIO access at the same number does not, and
    /// what no BAR of that space holds is unclaimed.
    #[test]
    fn the_device_bus_routes_ports_to_io_bars_and_addresses_to_memory_bars() {
        let device = Arc::new(Recorder::default());
        let entry = |space, start, size, region| BusEntry {
            space,
            start,
            size,
            region,
            device: 0,
            handle: Arc::clone(&device) as Arc<dyn MigratableDevice>,
            mediation: None,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        };
        let bus = DeviceBus {
            entries: vec![
                entry(BarSpace::Io, 0xc000, 8, 0),
                entry(BarSpace::Io, 0xc008, 8, 1),
                entry(BarSpace::Memory, 0xc000, 0x1000, 2),
            ],
        };
        let ports: &dyn PortHandler = &bus;
        let mmio: &dyn MmioHandler = &bus;
        ports.write(0xc000, b"v").unwrap();
        ports.write(0xc00f, b"m").unwrap();
        let mut byte = [0u8];
        ports.read(0xc005, &mut byte).unwrap();
        assert_eq!(byte, [0xa0]);
        ports.read(0xc009, &mut byte).unwrap();
        assert_eq!(byte, [0xa1]);
        let mut word = [0u8; 4];
        mmio.read(0xc004, &mut word).unwrap();
        assert_eq!(word, [0xa2; 4]);
        assert_eq!(
            *device.0.lock().unwrap(),
            [
                (0, 0, b"v".to_vec(), true),
                (1, 7, b"m".to_vec(), true),
                (0, 5, vec![0xa0], false),
                (1, 1, vec![0xa1], false),
                (2, 4, vec![0xa2; 4], false),
            ]
        );
        // Reads of both spaces count as trapped reads of their region.
        assert_eq!(
            bus.entries
                .iter()
                .map(|e| e.reads.load(Ordering::Relaxed))
                .collect::<Vec<_>>(),
            [1, 1, 1]
        );
        for (port, len) in [(0xc010u16, 1usize), (0xbfff, 1), (0xc006, 4)] {
            let err = ports.read(port, &mut vec![0; len]).unwrap_err();
            assert!(
                matches!(err, MmioError::Unclaimed { addr, .. } if addr == u64::from(port)),
                "{port:#x}: {err}"
            );
        }
        // The memory BAR at 0xc000-0xcfff answers no port there (0xc010 above), and the I/O
        // BARs answer no address (0xc004 above went to the memory BAR).
        let err = mmio.write(0xd000, b"x").unwrap_err();
        assert!(
            matches!(
                err,
                MmioError::Unclaimed {
                    addr: 0xd000,
                    len: 1
                }
            ),
            "{err}"
        );
    }
}
