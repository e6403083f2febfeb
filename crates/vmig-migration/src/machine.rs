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
//! 6. a `dma-engine` (its `ID` register says so) gets a driver: on a source the VMM sets up its
//!    ring in the device area (the top of RAM, outside the guest's working set) and starts
//!    it, and the guest's vCPU 0 consumes records through a doorbell at every batch (reading
//!    `PRODUCER` from the mapped status page, BAR2, when there is one, else from BAR0); on a
//!    destination all of that arrives with the migration.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmig_devices::dma_engine::{self, reg};
use vmig_kvm::guest::{self, MMIO_WINDOW_GPA};
use vmig_kvm::irq::MsiVector;
use vmig_kvm::{GuestMemory, MmioHandler, PAGE_SIZE, Vm};
use vmig_vfio::VfioDeviceFd;
use vmig_vfio_user::client::{Client, ClientError, DmaMemory};
use vmig_vfio_user::client::{DeviceMigration, Protocol};
use vmig_vfio_user::wire::{
    DEVICE_FLAGS_RESET, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, IRQ_INDEX_MSI, IRQ_INDEX_MSIX,
    IRQ_INFO_EVENTFD, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};

use crate::device::{DeviceHandle, DeviceMigrator, KernelDevice};
use crate::error::{MigrationError, Result, device_error};

/// Guest-physical span of each device's BARs.
pub const DEVICE_MMIO_SLOT: u64 = 16 << 20;
/// Most devices a VM takes.
pub const MAX_DEVICES: usize = guest::MAX_DOORBELLS;
/// RAM reserved per device at the top of guest RAM for its DMA (ring and buffers).
pub const DEVICE_AREA: u64 = 2 << 20;
/// Entries in a dma-engine's ring (one buffer page each).
pub const DMA_RING_ENTRIES: u64 = 256;
/// Records per second a dma-engine writes unless told otherwise.
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
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

/// Device memory mapped into the guest: (region, guest-physical address, bytes).
pub type MappedArea = (u32, u64, u64);

/// One attached device.
pub struct AttachedDevice {
    /// A name for reports (the socket's file name, or the PCI address).
    pub name: String,
    /// The device.
    pub handle: DeviceHandle,
    /// How its state migrates (`None`: it cannot migrate).
    pub protocol: Option<Protocol>,
    /// Why it cannot migrate ("cannot migrate: ..."), when `protocol` is `None`.
    pub blocker: String,
    /// Its BARs in the guest.
    pub bars: Vec<Bar>,
    /// For a dma-engine: where its ring lives.
    pub dma_ring: Option<DmaRing>,
    /// Its interrupt vectors wired into the guest (MSI-X or MSI vector n is `interrupts[n]`).
    pub interrupts: Vec<MsiVector>,
    /// Device memory mapped into the guest.
    pub mapped: Vec<MappedArea>,
}

impl std::fmt::Debug for AttachedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedDevice")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl AttachedDevice {
    /// The device's migration driver, or why it cannot migrate.
    pub fn migration(&self) -> Result<DeviceMigrator<'_>> {
        let protocol = self.protocol.ok_or_else(|| MigrationError::Device {
            device: self.name.clone(),
            message: self.blocker.clone(),
        })?;
        Ok(self.handle.migration(protocol))
    }

    /// "v1", "v2" or "none".
    pub fn protocol_name(&self) -> &'static str {
        self.protocol.as_ref().map_or("none", Protocol::name)
    }

    /// Whether the device is a `vmig-devices` dma-engine (its BAR0 is big enough and its `ID`
    /// register says so).
    fn is_dma_engine(&self) -> bool {
        // Never probe real hardware: a read of an unknown register may have side effects.
        matches!(self.handle, DeviceHandle::User(_))
            && self
                .bars
                .iter()
                .any(|b| b.index == 0 && b.size >= dma_engine::BAR0_SIZE)
            && self.read_reg(reg::ID).ok() == Some(dma_engine::ID)
    }

    /// Reads a dma-engine register (BAR0) from the device, not through the guest.
    pub fn read_reg(&self, offset: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.handle
            .region_read(0, offset, &mut b)
            .map_err(device_error(&self.name))?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_reg(&self, offset: u64, value: u64) -> Result<()> {
        self.handle
            .region_write(0, offset, &value.to_le_bytes())
            .map_err(device_error(&self.name))
    }
}

/// Where a dma-engine's ring and buffers are in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRing {
    /// The ring of buffer addresses.
    pub ring_gpa: u64,
    /// Buffer *i* is at `buffers_gpa + i × 4096`.
    pub buffers_gpa: u64,
    /// Entries.
    pub entries: u64,
}

/// What checking a dma-engine's records after a migration found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCheck {
    /// The device.
    pub device: String,
    /// Records the device had produced.
    pub produced: u64,
    /// Records found whole and recent in the ring.
    pub checked: u64,
    /// What was wrong, if anything.
    pub problems: Vec<String>,
    /// `DMA_ERRORS` of the device.
    pub dma_errors: u64,
}

impl RecordCheck {
    /// No problem found.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.dma_errors == 0
    }
}

struct BusEntry {
    start: u64,
    size: u64,
    region: u32,
    /// The device's index in the machine.
    device: usize,
    handle: DeviceHandle,
    /// Guest reads that trapped here.
    reads: AtomicU64,
}

/// Routes guest MMIO to the device whose BAR holds the address.
struct DeviceBus {
    entries: Vec<BusEntry>,
}

impl DeviceBus {
    fn find(&self, addr: u64, len: usize) -> std::result::Result<(&BusEntry, u64), String> {
        self.entries
            .iter()
            .find(|e| addr >= e.start && addr - e.start + len as u64 <= e.size)
            .map(|e| (e, addr - e.start))
            .ok_or_else(|| "no device BAR there".to_string())
    }
}

impl MmioHandler for DeviceBus {
    fn read(&self, addr: u64, data: &mut [u8]) -> std::result::Result<(), String> {
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

    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), String> {
        let (entry, offset) = self.find(addr, data.len())?;
        let _ = entry.handle.region_write(entry.region, offset, data);
        Ok(())
    }
}

/// Guest RAM by IOVA (= guest-physical address) for a server's message-based DMA; writes are
/// recorded as the VMM's, so migration sees them.
struct GuestDma(Arc<GuestMemory>);

impl DmaMemory for GuestDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> std::result::Result<(), i32> {
        self.0.read(iova, buf).map_err(|_| libc_efault())
    }

    fn write(&self, iova: u64, data: &[u8]) -> std::result::Result<(), i32> {
        self.0.write(iova, data).map_err(|_| libc_efault())
    }
}

fn libc_efault() -> i32 {
    14
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
    /// Attaches the devices of `specs` to `vm` (see the module doc); `role` says whether to
    /// start them.
    pub fn attach(vm: Vm, specs: &[DeviceSpec], role: Role) -> Result<Self> {
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
            let mut device = match spec {
                DeviceSpec::VfioUser { socket, .. } => attach_user(&vm, index, socket, &mut bus)?,
                DeviceSpec::VfioPci { host } => {
                    let named = |message: String| MigrationError::Device {
                        device: host.clone(),
                        message,
                    };
                    if specs[..index]
                        .iter()
                        .any(|s| matches!(s, DeviceSpec::VfioPci { host: h } if h == host))
                    {
                        return Err(named("given twice".into()));
                    }
                    vmig_vfio::availability().map_err(named)?;
                    vmig_vfio::device::check_bound(host).map_err(|e| named(e.to_string()))?;
                    let kvm_vfio = match &kvm_vfio {
                        Some(fd) => Arc::clone(fd),
                        None => {
                            let fd = vm.create_vfio_device().map_err(|e| named(e.to_string()))?;
                            Arc::clone(kvm_vfio.insert(Arc::new(VfioDeviceFd::new_from_kvm(fd))))
                        }
                    };
                    attach_kernel(&vm, index, host, kvm_vfio, &mut bus)?
                }
            };
            if device.is_dma_engine() {
                let area = device_area_gpa(&vm, index)?;
                device.dma_ring = Some(DmaRing {
                    ring_gpa: area,
                    buffers_gpa: area + PAGE_SIZE,
                    entries: DMA_RING_ENTRIES,
                });
            }
            if let Some(ring) = device.dma_ring {
                let bar0 = device.bars.iter().find(|b| b.index == 0).map(|b| b.gpa);
                let status_page = device
                    .mapped
                    .iter()
                    .find(|(region, _, _)| *region == dma_engine::STATUS_REGION)
                    .map(|&(_, gpa, _)| gpa);
                if let Some(bar0) = bar0 {
                    let producer = status_page.unwrap_or(bar0 + reg::PRODUCER);
                    doorbells.push((producer, bar0 + reg::CONSUMER));
                }
                if role == Role::Source {
                    let rate = match spec {
                        DeviceSpec::VfioUser { dma_rate, .. } => *dma_rate,
                        DeviceSpec::VfioPci { .. } => DEFAULT_DMA_RATE,
                    };
                    start_dma_engine(&vm, &device, ring, rate, index)?;
                }
            }
            devices.push(device);
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

    /// Checks every dma-engine's ring: each buffer must hold a whole record that is among the
    /// last ring-full the device produced (or nothing, if the device has not reached it). A
    /// record that a migration lost shows as an older record, or as an empty buffer.
    pub fn check_dma_records(&self) -> Result<Vec<RecordCheck>> {
        let mut checks = Vec::new();
        for device in &self.devices {
            let Some(ring) = device.dma_ring else {
                continue;
            };
            let seed = device.read_reg(reg::SEED)?;
            let before = device.read_reg(reg::PRODUCER)?;
            let mut buffers = Vec::with_capacity(ring.entries as usize);
            for i in 0..ring.entries {
                let mut record = [0u8; dma_engine::RECORD_SIZE];
                self.vm
                    .memory()
                    .read(ring.buffers_gpa + i * PAGE_SIZE, &mut record)?;
                buffers.push(record);
            }
            let after = device.read_reg(reg::PRODUCER)?;
            let mut check = RecordCheck {
                device: device.name.clone(),
                produced: after,
                dma_errors: device.read_reg(reg::DMA_ERRORS)?,
                ..RecordCheck::default()
            };
            for (i, record) in buffers.iter().enumerate() {
                let i = i as u64;
                if record.iter().all(|&b| b == 0) {
                    if i < before {
                        check
                            .problems
                            .push(format!("buffer {i} is empty, but the device wrote it"));
                    }
                    continue;
                }
                match dma_engine::check_record(record, seed) {
                    Ok(seq) if seq % ring.entries == i && seq < after && seq + ring.entries >= before => {
                        check.checked += 1;
                    }
                    Ok(seq) => check.problems.push(format!(
                        "buffer {i} holds record {seq}, but records {}..{before} should be there: a record written before the switch-over was lost",
                        before.saturating_sub(ring.entries)
                    )),
                    Err(why) => check.problems.push(format!("buffer {i}: {why}")),
                }
            }
            check.problems.truncate(8);
            checks.push(check);
        }
        Ok(checks)
    }
}

/// A region as BAR placement sees it, from either transport.
struct RegionView<'a> {
    index: u32,
    size: u64,
    /// The fd its mappable areas are mapped from, and the region's offset in it.
    mmap: Option<(BorrowedFd<'a>, u64)>,
    /// Mappable areas, as (offset in the region, bytes).
    areas: Vec<(u64, u64)>,
    writable: bool,
}

/// Places device `index`'s BARs in its slot of the guest's MMIO window, maps what can be
/// mapped and routes the rest to `bus`; returns the BARs and the mapped areas.
fn place_bars(
    vm: &Vm,
    index: usize,
    name: &str,
    handle: &DeviceHandle,
    regions: &[RegionView<'_>],
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
            return Err(MigrationError::Device {
                device: name.to_string(),
                message: format!(
                    "BAR{} of {size:#x} bytes does not fit the device's {} MiB of guest MMIO space",
                    region.index,
                    DEVICE_MMIO_SLOT >> 20
                ),
            });
        }
        next = gpa + size;
        bars.push(Bar {
            index: region.index,
            gpa,
            size,
        });
        bus.entries.push(BusEntry {
            start: gpa,
            size,
            region: region.index,
            device: index,
            handle: handle.clone(),
            reads: AtomicU64::new(0),
        });
        let Some((fd, region_offset)) = region.mmap else {
            continue;
        };
        for &(offset, bytes) in &region.areas {
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
                    .map_device_memory(gpa + offset, fd, file_offset, bytes, region.writable)
                    .is_err()
            {
                continue;
            }
            mapped.push((region.index, gpa + offset, bytes));
        }
    }
    Ok((bars, mapped))
}

/// `areas` (offset, bytes) less the page-aligned `holes`.
fn without_holes(areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = areas.to_vec();
    for &(hole, hole_bytes) in holes {
        let hole_end = hole + hole_bytes;
        out = out
            .into_iter()
            .flat_map(|(offset, bytes)| {
                let end = offset + bytes;
                if hole_end <= offset || end <= hole {
                    return vec![(offset, bytes)];
                }
                [(offset, hole.max(offset)), (hole_end.min(end), end)]
                    .into_iter()
                    .filter(|(a, b)| b > a)
                    .map(|(a, b)| (a, b - a))
                    .collect()
            })
            .collect();
    }
    out
}

fn attach_user(
    vm: &Vm,
    index: usize,
    socket: &std::path::Path,
    bus: &mut DeviceBus,
) -> Result<AttachedDevice> {
    let name = socket.file_name().map_or_else(
        || socket.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let memory: Arc<dyn DmaMemory> = Arc::new(GuestDma(Arc::clone(vm.memory())));
    let client = Client::connect(socket, Some(memory)).map_err(|e| MigrationError::Device {
        device: name.clone(),
        message: format!("connecting to {}: {e}", socket.display()),
    })?;
    let client = Arc::new(client);
    let info = client.device_info().map_err(device_error(&name))?;
    // A new VM starts from a device at reset, whatever an earlier VMM (or migration) left it in.
    if info.flags & DEVICE_FLAGS_RESET != 0 {
        client.reset().map_err(device_error(&name))?;
    }
    for slot in vm.memory().slots() {
        client
            .dma_map(
                slot.layout.gpa,
                slot.layout.size,
                DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                Some((slot.fd(), 0)),
            )
            .map_err(device_error(&name))?;
    }
    let mut infos = Vec::new();
    for region in 0..info.num_regions.min(6) {
        let info = client.region_info(region).map_err(device_error(&name))?;
        if info.info.size != 0
            && info.info.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE) != 0
        {
            infos.push((region, info));
        }
    }
    let regions: Vec<RegionView<'_>> = infos
        .iter()
        .map(|(region, info)| RegionView {
            index: *region,
            size: info.info.size,
            // Only a regular file (a memfd) has a size that bounds what the server may map; a
            // mapping past the end of anything else would fail the vCPU's access.
            mmap: info
                .fd
                .as_ref()
                .filter(|fd| {
                    info.info.flags & REGION_INFO_FLAG_MMAP != 0
                        && vmig_primitives::regular_file_size(fd.as_fd()).is_ok_and(|s| s.is_some())
                })
                .map(|fd| (fd.as_fd(), info.info.offset)),
            areas: if info.sparse_areas.is_empty() {
                vec![(0, info.info.size)]
            } else {
                info.sparse_areas.clone()
            },
            writable: info.info.flags & REGION_INFO_FLAG_WRITE != 0,
        })
        .collect();
    let handle = DeviceHandle::User(Arc::clone(&client));
    let (bars, mapped) = place_bars(vm, index, &name, &handle, &regions, bus)?;
    let interrupts = wire_interrupts(vm, index, &client).map_err(|e| MigrationError::Device {
        device: name.clone(),
        message: format!("wiring its interrupts: {e}"),
    })?;
    let protocol = DeviceMigration::detect(&client)
        .map_err(device_error(&name))?
        .map(|m| m.protocol());
    Ok(AttachedDevice {
        name,
        handle,
        protocol,
        blocker: "cannot migrate: the device has no migration support (neither the v2 MIGRATION feature nor a v1 migration region)".into(),
        bars,
        dma_ring: None,
        interrupts,
        mapped,
    })
}

/// `PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER`: BARs decode, and the device may DMA.
const PCI_COMMAND_MEMORY_AND_MASTER: u16 = 0x2 | 0x4;

fn attach_kernel(
    vm: &Vm,
    index: usize,
    host: &str,
    kvm_vfio: Arc<VfioDeviceFd>,
    bus: &mut DeviceBus,
) -> Result<AttachedDevice> {
    let name = host.to_string();
    let kernel = KernelDevice::open(host, vm.memory(), kvm_vfio).map_err(device_error(&name))?;
    let kernel = Arc::new(kernel);
    let device = &kernel.device;
    if device.can_reset() {
        device.reset().map_err(device_error(&name))?;
    }
    device
        .set_command_bits(PCI_COMMAND_MEMORY_AND_MASTER)
        .map_err(device_error(&name))?;
    // The MSI-X table and pending bits stay trapped (vfio-pci ignores guest accesses there):
    // the host's table holds the vectors `SET_IRQS` programmed.
    let msix = device.msix_layout().map_err(device_error(&name))?;
    let msix_pages: Vec<(u32, u64, u64)> = msix
        .map(|m| [m.table, m.pba])
        .into_iter()
        .flatten()
        .map(|(bar, offset, bytes)| {
            let first = offset / PAGE_SIZE * PAGE_SIZE;
            (
                bar,
                first,
                (offset + bytes).next_multiple_of(PAGE_SIZE) - first,
            )
        })
        .collect();
    let regions: Vec<RegionView<'_>> = (0..6)
        .filter_map(|i| device.region(i))
        .filter(|r| r.readable() || r.writable())
        .map(|r| {
            let holes: Vec<(u64, u64)> = msix_pages
                .iter()
                .filter(|(bar, _, _)| *bar == r.index)
                .map(|&(_, offset, bytes)| (offset, bytes))
                .collect();
            RegionView {
                index: r.index,
                size: r.size,
                mmap: (!r.mmap_areas.is_empty()).then(|| (device.fd(), r.offset)),
                writable: r.writable(),
                areas: without_holes(&r.mmap_areas, &holes),
            }
        })
        .collect();
    let handle = DeviceHandle::Kernel(Arc::clone(&kernel));
    let (bars, mapped) = place_bars(vm, index, &name, &handle, &regions, bus)?;
    drop(regions);
    let interrupts =
        wire_kernel_interrupts(vm, index, &kernel).map_err(|e| MigrationError::Device {
            device: name.clone(),
            message: format!("wiring its interrupts: {e}"),
        })?;
    let mut blocker = device.migration_blocker_reason();
    // Without DMA logging its DMA is tracked by the container, if the container can.
    if blocker.is_none()
        && !kernel.dma_logging
        && let Err(e) = kernel.container.bitmap_page_size()
    {
        blocker = Some(format!(
            "cannot migrate: it has no DMA logging and its container cannot track dirty pages ({e})"
        ));
    }
    let protocol = match &blocker {
        None => {
            let support = device
                .migration_support()
                .map_err(device_error(&name))?
                .ok_or_else(|| MigrationError::Device {
                    device: name.clone(),
                    message: "its migration support vanished while it was attached".into(),
                })?;
            Some(Protocol::V2 {
                pre_copy: support.pre_copy(),
            })
        }
        Some(_) => None,
    };
    Ok(AttachedDevice {
        name,
        handle,
        protocol,
        blocker: blocker.unwrap_or_default(),
        bars,
        dma_ring: None,
        interrupts,
        mapped,
    })
}

/// Vectors wired per device, and the IDT vector of device 0's first.
pub const MAX_VECTORS: u32 = 8;
const FIRST_VECTOR: u8 = 0x40;

/// The IDT vector the guest receives device `device`'s MSI-X / MSI vector `n` on.
pub fn interrupt_vector(device: usize, n: u32) -> u8 {
    FIRST_VECTOR + (device as u32 * MAX_VECTORS + n) as u8
}

/// Gives the device an irqfd for each of its MSI-X vectors (else MSI vectors), up to
/// [`MAX_VECTORS`].
fn wire_interrupts(vm: &Vm, device: usize, client: &Client) -> Result<Vec<MsiVector>> {
    let transport = |e: ClientError| MigrationError::Invalid(e.to_string());
    for index in [IRQ_INDEX_MSIX, IRQ_INDEX_MSI] {
        // A server without this IRQ index answers with an error reply (an errno); anything
        // else means the connection failed.
        let info = match client.irq_info(index) {
            Ok(info) => info,
            Err(e) if e.remote_errno().is_some() => continue,
            Err(e) => return Err(transport(e)),
        };
        let count = info.count.min(MAX_VECTORS);
        if count == 0 || info.flags & IRQ_INFO_EVENTFD == 0 {
            continue;
        }
        let vectors = (0..count)
            .map(|n| Ok(vm.connect_msi(0, interrupt_vector(device, n))?))
            .collect::<Result<Vec<_>>>()?;
        let fds: Vec<_> = vectors.iter().map(MsiVector::eventfd).collect();
        match client.set_irq_eventfds(index, 0, count, &fds) {
            Ok(()) => return Ok(vectors),
            Err(e) if e.remote_errno().is_some() => continue,
            Err(e) => return Err(transport(e)),
        }
    }
    Ok(Vec::new())
}

/// As [`wire_interrupts`], for a kernel VFIO device: `VFIO_DEVICE_SET_IRQS` with the
/// irqfds' eventfds.
fn wire_kernel_interrupts(vm: &Vm, device: usize, kernel: &KernelDevice) -> Result<Vec<MsiVector>> {
    use vmig_vfio::device::{
        IRQ_INDEX_MSI as MSI, IRQ_INDEX_MSIX as MSIX, IRQ_INFO_EVENTFD as EVENTFD,
    };
    for index in [MSIX, MSI] {
        let Some(irq) = kernel.device.irq(index) else {
            continue;
        };
        let count = irq.count.min(MAX_VECTORS);
        if count == 0 || irq.flags & EVENTFD == 0 {
            continue;
        }
        let vectors = (0..count)
            .map(|n| Ok(vm.connect_msi(0, interrupt_vector(device, n))?))
            .collect::<Result<Vec<_>>>()?;
        let fds: Vec<_> = vectors.iter().map(MsiVector::event_fd).collect();
        if kernel.device.enable_irq(index, &fds).is_ok() {
            return Ok(vectors);
        }
    }
    Ok(Vec::new())
}

/// The driver's setup of a dma-engine on a booting VM: the ring of buffer addresses in guest
/// memory, then the registers, then enable.
fn start_dma_engine(
    vm: &Vm,
    device: &AttachedDevice,
    ring: DmaRing,
    rate: u64,
    index: usize,
) -> Result<()> {
    let mut table = Vec::with_capacity(ring.entries as usize * 8);
    for i in 0..ring.entries {
        table.extend_from_slice(&(ring.buffers_gpa + i * PAGE_SIZE).to_le_bytes());
    }
    vm.memory().write(ring.ring_gpa, &table)?;
    device.write_reg(reg::CTRL, 0)?;
    device.write_reg(reg::RING_BASE, ring.ring_gpa)?;
    device.write_reg(reg::RING_SIZE, ring.entries)?;
    device.write_reg(reg::SEED, 0x5eed_0000 + index as u64)?;
    device.write_reg(reg::RATE, rate)?;
    device.write_reg(reg::CTRL, 1)?;
    // A device that refuses the setup shows it in its registers.
    std::thread::sleep(Duration::from_millis(1));
    if device.read_reg(reg::RING_SIZE)? != ring.entries {
        return Err(MigrationError::Device {
            device: device.name.clone(),
            message: "the dma-engine did not take its ring size".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_pages_are_cut_out_of_mappable_areas() {
        // A 64 KiB BAR mappable whole, its MSI-X table in the page at 0x2000.
        assert_eq!(
            without_holes(&[(0, 0x10000)], &[(0x2000, 0x1000)]),
            [(0, 0x2000), (0x3000, 0xd000)]
        );
        // Holes at either end, one covering an area, one outside every area.
        assert_eq!(
            without_holes(
                &[(0, 0x2000), (0x4000, 0x1000), (0x8000, 0x2000)],
                &[
                    (0, 0x1000),
                    (0x4000, 0x1000),
                    (0x9000, 0x1000),
                    (0x20000, 0x1000)
                ]
            ),
            [(0x1000, 0x1000), (0x8000, 0x1000)]
        );
        assert_eq!(without_holes(&[(0, 0x1000)], &[]), [(0, 0x1000)]);
    }

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
