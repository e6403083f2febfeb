//! Building a VM in the order KVM requires, and the running VM.
//!
//! ```text
//!  KVM_CREATE_VM, KVM_CREATE_IRQCHIP
//!    └─ [ring]              KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL | DIRTY_LOG_RING)   before any vCPU
//!        └─ [ring+bitmap]   KVM_ENABLE_CAP(DIRTY_LOG_RING_WITH_BITMAP)               before any memslot
//!    └─ [clear-log]         KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, ENABLE|INITIALLY_SET)
//!  memslots (KVM_SET_USER_MEMORY_REGION)
//!  vCPUs (KVM_CREATE_VCPU, CPUID, ring mmap), threads parked
//! ```
//!
//! [`VmBuilder`] exposes the steps so an embedder can drive them, and refuses a step taken out of
//! order with an error that names the order; [`Vm::new`] takes them in order.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_READONLY, KVM_MP_STATE_RUNNABLE, kvm_enable_cap, kvm_lapic_state, kvm_mp_state,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{CpuDirtyLog, DirtyLogMode};
use crate::error::{KvmError, Result, ioctl_error};
use crate::guest::PortOp;
use crate::guest::{self, GuestLayout, GuestProgram, MAX_VCPUS, Workload};
use crate::irq::{IrqRoutes, MsiVector};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::ports::{GuestPorts, MmioHandler, PortHandler, VerifyReport};
use crate::sys::{self, DirtyRing};
use crate::vcpu::{MIGRATED_MSRS, VcpuHandle, VcpuState, restore_state, save_state};
use vmig_primitives::{GuestAddress, HostMemory, PAGE_BYTES};

const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
const KVM_CAP_XSAVE2: u32 = 208;
const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: u32 = 225;
const DIRTY_GFN_BYTES: u32 = 16;
/// KVM keeps this many ring entries in reserve (`KVM_DIRTY_RING_RSVD_ENTRIES`).
const RING_RESERVED_ENTRIES: u32 = 64;
/// Entries of a PML buffer, which KVM also keeps in reserve where the CPU has PML.
const PML_ENTRIES: u32 = 512;
/// Default dirty-ring entries per vCPU (1 MiB of ring): roomy, because the reaper and the
/// ring-full exit are all that keep a fast writer from filling it.
pub const DEFAULT_RING_ENTRIES: u32 = 65536;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything that defines a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// vCPUs (1 to 8).
    pub vcpus: usize,
    /// What the guest runs.
    pub workload: Workload,
    /// CPU dirty tracking mode.
    pub dirty_log: DirtyLogMode,
    /// Dirty-ring entries per vCPU (ring modes).
    pub ring_entries: u32,
}

impl VmConfig {
    /// Refuses a configuration the command line would refuse (RAM size, vCPUs, workload), so
    /// that one arriving in a migration stream meets the same rules; returns its layout. The
    /// dirty-ring size is checked against the kernel's limits when the VM is made.
    pub fn check(&self) -> Result<GuestLayout> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(KvmError::Invalid(format!(
                "{} vCPUs: expected 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        let layout = GuestLayout::new(self.ram, &self.workload)?;
        GuestProgram::new(&layout, &self.workload, self.vcpus)?;
        Ok(layout)
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            ram: 512 << 20,
            vcpus: 1,
            workload: Workload::default(),
            dirty_log: DirtyLogMode::Bitmap,
            ring_entries: DEFAULT_RING_ENTRIES,
        }
    }
}

/// The steps of VM creation, checked for order.
pub struct VmBuilder {
    kvm: Kvm,
    vm: VmFd,
    ring_bytes: Option<u32>,
    ring_with_bitmap: bool,
    manual_protect: bool,
    memory: Option<Arc<GuestMemory>>,
    vcpus: Vec<VcpuFd>,
    rings: Vec<DirtyRing>,
}

impl VmBuilder {
    /// Opens `/dev/kvm`, creates a VM and its in-kernel irqchip.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new()
            .map_err(|e| KvmError::NoKvm(std::io::Error::from_raw_os_error(e.errno())))?;
        let xsave2 = kvm.check_extension_raw(KVM_CAP_XSAVE2.into());
        if xsave2 > 4096 {
            return Err(KvmError::Unsupported(format!(
                "this CPU's XSAVE area is {xsave2} bytes; vmig saves the 4096-byte KVM_GET_XSAVE layout"
            )));
        }
        let vm = kvm.create_vm().map_err(ioctl_error("KVM_CREATE_VM"))?;
        vm.create_irq_chip()
            .map_err(ioctl_error("KVM_CREATE_IRQCHIP"))?;
        Ok(Self {
            kvm,
            vm,
            ring_bytes: None,
            ring_with_bitmap: false,
            manual_protect: false,
            memory: None,
            vcpus: Vec::new(),
            rings: Vec::new(),
        })
    }

    /// Whether this kernel offers `cap` (a `KVM_CAP_*` number) on this VM; returns its value.
    pub fn check_extension(&self, cap: u32) -> i32 {
        self.vm.check_extension_raw(cap.into())
    }

    /// Enables per-vCPU dirty rings of `entries` entries (a power of two): with
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where offered, else `KVM_CAP_DIRTY_LOG_RING`. Must come
    /// after VM creation and before any vCPU.
    pub fn enable_dirty_ring(&mut self, entries: u32) -> Result<()> {
        if !self.vcpus.is_empty() {
            return Err(KvmError::Order(format!(
                "KVM_CAP_DIRTY_LOG_RING must be enabled after KVM_CREATE_VM and before the first vCPU; this VM already has {} vCPU(s)",
                self.vcpus.len()
            )));
        }
        if self.ring_bytes.is_some() {
            return Err(KvmError::Order(
                "the dirty ring is already enabled; KVM enables it once per VM".into(),
            ));
        }
        if self.manual_protect {
            return Err(KvmError::Order(
                "the dirty ring and manual dirty-log protect (clear-log) exclude each other: INITIALLY_SET assumes pages that are not write-protected"
                    .into(),
            ));
        }
        let (cap, name) = if self.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 {
            (
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            )
        } else {
            (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING")
        };
        let max_bytes = self.check_extension(cap);
        if max_bytes <= 0 {
            return Err(KvmError::Unsupported(
                "this kernel offers neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor KVM_CAP_DIRTY_LOG_RING; use --dirty-log bitmap or clear-log".into(),
            ));
        }
        let max_entries = max_bytes.unsigned_abs() / DIRTY_GFN_BYTES;
        // KVM keeps 64 entries in reserve plus, on hosts with PML, the 512 of a PML buffer; a
        // ring must be larger than that.
        let min_entries = (RING_RESERVED_ENTRIES + PML_ENTRIES).next_power_of_two();
        if !entries.is_power_of_two() || !(min_entries..=max_entries).contains(&entries) {
            return Err(KvmError::Invalid(format!(
                "{entries} dirty-ring entries: expected a power of two from {min_entries} to {max_entries} (KVM reserves {RING_RESERVED_ENTRIES} entries, plus {PML_ENTRIES} on hosts with PML)"
            )));
        }
        let bytes = entries * DIRTY_GFN_BYTES;
        let arg = kvm_enable_cap {
            cap,
            args: [u64::from(bytes), 0, 0, 0],
            ..Default::default()
        };
        self.vm.enable_cap(&arg).map_err(ioctl_error(format!(
            "KVM_ENABLE_CAP({name}, {bytes} bytes)"
        )))?;
        self.ring_bytes = Some(bytes);
        Ok(())
    }

    /// Enables `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`: after the ring, before any memslot.
    pub fn enable_dirty_ring_with_bitmap(&mut self) -> Result<()> {
        if self.ring_bytes.is_none() {
            return Err(KvmError::Order(
                "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP can only be enabled after KVM_CAP_DIRTY_LOG_RING_ACQ_REL".into(),
            ));
        }
        if self.memory.is_some() {
            return Err(KvmError::Order(
                "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP must be enabled before the first memslot (seed 004: a slot created earlier has no bitmap)".into(),
            ));
        }
        if self.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) <= 0 {
            return Err(KvmError::Unsupported(
                "this kernel does not offer KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (it is arm64's, for writes made without a running vCPU); use --dirty-log ring".into(),
            ));
        }
        let arg = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
            ..Default::default()
        };
        self.vm.enable_cap(&arg).map_err(ioctl_error(
            "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)",
        ))?;
        self.ring_with_bitmap = true;
        Ok(())
    }

    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET`: before any memslot, and
    /// not with the dirty ring.
    pub fn enable_manual_protect(&mut self) -> Result<()> {
        if self.ring_bytes.is_some() {
            return Err(KvmError::Order(
                "manual dirty-log protect (clear-log) cannot be combined with the dirty ring"
                    .into(),
            ));
        }
        if self.memory.is_some() {
            return Err(KvmError::Order(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 must be enabled before the first memslot".into(),
            ));
        }
        let offered = self.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        if offered < 0 || offered.unsigned_abs() & wanted != wanted {
            return Err(KvmError::Unsupported(
                "this kernel does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET; use --dirty-log bitmap".into(),
            ));
        }
        let arg = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(wanted), 0, 0, 0],
            ..Default::default()
        };
        self.vm.enable_cap(&arg).map_err(ioctl_error(
            "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
        ))?;
        self.manual_protect = true;
        Ok(())
    }

    /// Registers every slot of `memory` (dirty logging off until tracking starts).
    pub fn add_memory(&mut self, memory: GuestMemory) -> Result<Arc<GuestMemory>> {
        if self.memory.is_some() {
            return Err(KvmError::Order("guest memory is already registered".into()));
        }
        for slot in memory.slots() {
            sys::set_memory_slot(&self.vm, slot.layout.id, 0, slot.layout.gpa, slot.host())
                .map_err(|source| KvmError::Ioctl {
                    call: format!(
                        "KVM_SET_USER_MEMORY_REGION(slot {} at {:#x}, {} bytes)",
                        slot.layout.id, slot.layout.gpa, slot.layout.size
                    ),
                    source,
                })?;
        }
        let memory = Arc::new(memory);
        self.memory = Some(Arc::clone(&memory));
        Ok(memory)
    }

    /// Creates `count` vCPUs with the host's supported CPUID, and maps their rings.
    pub fn create_vcpus(&mut self, count: usize) -> Result<()> {
        if self.memory.is_none() {
            return Err(KvmError::Order(
                "register guest memory before creating vCPUs".into(),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&(self.vcpus.len() + count)) {
            return Err(KvmError::Invalid(format!(
                "{count} vCPUs: expected 1 to {MAX_VCPUS}"
            )));
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_error("KVM_GET_SUPPORTED_CPUID"))?;
        for _ in 0..count {
            let index = self.vcpus.len();
            let apic_id = u32::try_from(index).expect("at most MAX_VCPUS vCPUs (checked above)");
            let fd = self
                .vm
                .create_vcpu(index as u64)
                .map_err(ioctl_error(format!("KVM_CREATE_VCPU({index})")))?;
            let mut cpuid = cpuid.clone();
            for entry in cpuid.as_mut_slice() {
                if entry.function == 1 {
                    // Initial APIC id in EBX[31:24].
                    entry.ebx = (entry.ebx & 0x00ff_ffff) | (apic_id << 24);
                }
            }
            fd.set_cpuid2(&cpuid)
                .map_err(ioctl_error(format!("KVM_SET_CPUID2 (vCPU {index})")))?;
            if let Some(bytes) = self.ring_bytes {
                self.rings.push(
                    DirtyRing::map(&fd, bytes).map_err(|source| KvmError::Ioctl {
                        call: format!("mmap of the dirty ring of vCPU {index}"),
                        source,
                    })?,
                );
            }
            self.vcpus.push(fd);
        }
        Ok(())
    }

    fn msrs_to_migrate(&self) -> Result<Vec<u32>> {
        let listed = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl_error("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(MIGRATED_MSRS
            .into_iter()
            .filter(|m| listed.as_slice().contains(m))
            .collect())
    }
}

/// A running (or paused) VM with the self-checking guest.
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    dirty: Arc<CpuDirtyLog>,
    ports: Arc<GuestPorts>,
    memory: Arc<GuestMemory>,
    config: VmConfig,
    layout: GuestLayout,
    msrs: Vec<u32>,
    paused: std::sync::Mutex<bool>,
    irq_routes: IrqRoutes,
    /// Device memory mapped into the guest.
    device_slots: std::sync::Mutex<Vec<DeviceSlot>>,
    /// Held while a port script is posted and awaited: one at a time.
    port_script: std::sync::Mutex<()>,
    _vm: Arc<VmFd>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM of `config` with the guest program installed, paused before its first
    /// instruction.
    pub fn new(config: &VmConfig) -> Result<Self> {
        Self::create(config, |vm, memory, layout| {
            let program = GuestProgram::new(layout, &config.workload, config.vcpus)?;
            program.install(memory)?;
            for (index, handle) in vm.vcpus.iter().enumerate() {
                handle.with_fd(|fd| {
                    let base = fd.get_sregs().map_err(ioctl_error("KVM_GET_SREGS"))?;
                    fd.set_sregs(&program.boot_sregs(&base))
                        .map_err(ioctl_error("KVM_SET_SREGS"))?;
                    fd.set_regs(&program.boot_regs(index))
                        .map_err(ioctl_error("KVM_SET_REGS"))?;
                    // Application processors would otherwise wait for INIT/SIPI.
                    fd.set_mp_state(kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    })
                    .map_err(ioctl_error("KVM_SET_MP_STATE"))?;
                    // A local APIC leaves reset software-disabled and then drops fixed
                    // interrupts; a device's MSIs must stay pending for the guest.
                    let mut lapic = fd.get_lapic().map_err(ioctl_error("KVM_GET_LAPIC"))?;
                    let svr = lapic_register(&lapic, APIC_SPURIOUS_VECTOR) | APIC_SOFTWARE_ENABLE;
                    set_lapic_register(&mut lapic, APIC_SPURIOUS_VECTOR, svr);
                    fd.set_lapic(&lapic).map_err(ioctl_error("KVM_SET_LAPIC"))
                })?;
            }
            Ok(())
        })
    }

    /// Creates the VM of `config` with empty memory and vCPUs at reset, paused: a migration
    /// destination fills the memory, then gives the vCPUs their state with
    /// [`Vm::restore_vcpus`].
    ///
    /// `memory`, when given, is RAM prepared ahead (see [`Vm::prepare_memory`]); it must have
    /// the layout `config` gives.
    pub fn incoming(config: &VmConfig, memory: Option<GuestMemory>) -> Result<Self> {
        Self::create_with(config, memory, |_, _, _| Ok(()))
    }

    /// Guest RAM for a VM of `ram` bytes, allocated now (a destination does this before a
    /// migration starts, as first touch of fresh memory is slow).
    pub fn prepare_memory(ram: u64) -> Result<GuestMemory> {
        let layout = GuestLayout::new(ram, &Workload::default())?;
        let memory = GuestMemory::new(&layout.memory)?;
        memory.preallocate()?;
        Ok(memory)
    }

    /// Fills every data page with pseudo-random bytes (xorshift64), so that no page is zero
    /// and none compresses: all but the words of the guest's stamp (its first four and its
    /// last), which stay zero as in a page the guest never wrote, so its verify still holds.
    /// The VMM's writes are marked dirty like any other.
    pub fn fill_random(&self) -> Result<()> {
        let mut chunk = vec![0u8; 1 << 20];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for slot in self.layout().memory.data_slots() {
            let mut gpa = slot.gpa;
            while gpa < slot.gpa + slot.size {
                let len = usize::try_from((slot.gpa + slot.size - gpa).min(chunk.len() as u64))
                    .unwrap_or(chunk.len());
                for word in chunk[..len].chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    word.copy_from_slice(&x.to_le_bytes());
                }
                for page in chunk[..len].chunks_exact_mut(PAGE_BYTES) {
                    page[..32].fill(0);
                    page[PAGE_BYTES - 8..].fill(0);
                }
                self.memory().write(GuestAddress(gpa), &chunk[..len])?;
                gpa += len as u64;
            }
        }
        Ok(())
    }

    /// Loads each vCPU's saved state; the VM must be paused.
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.vcpus.len() {
            return Err(KvmError::Snapshot(format!(
                "{} vCPU states for a VM of {} vCPUs",
                states.len(),
                self.vcpus.len()
            )));
        }
        if !self.is_paused() {
            return Err(KvmError::Order(
                "vCPU state is loaded into a paused VM: pause it first".into(),
            ));
        }
        for (handle, state) in self.vcpus.iter().zip(states) {
            handle.with_fd(|fd| restore_state(fd, handle.index, state))?;
        }
        Ok(())
    }

    /// Routes guest accesses to non-RAM addresses (device BARs) to `handler`; `None` makes them
    /// guest errors again.
    pub fn set_mmio_handler(&self, handler: Option<Arc<dyn MmioHandler>>) {
        self.ports.set_mmio(handler);
    }

    /// Routes guest port I/O other than the guest's own report ports (devices' I/O-port BARs)
    /// to `handler`; `None` makes it a guest error again.
    pub fn set_port_handler(&self, handler: Option<Arc<dyn PortHandler>>) {
        self.ports.set_ports(handler);
    }

    /// Creates the VM of `config` and loads `memory_loader`'s contents and `vcpus`' state into it:
    /// the guest continues where it stopped. It starts paused.
    pub fn restore(
        config: &VmConfig,
        vcpus: &[VcpuState],
        memory_loader: impl FnOnce(&GuestMemory) -> Result<()>,
    ) -> Result<Self> {
        if vcpus.len() != config.vcpus {
            return Err(KvmError::Snapshot(format!(
                "{} vCPU states for a VM of {} vCPUs",
                vcpus.len(),
                config.vcpus
            )));
        }
        Self::create(config, |vm, memory, _| {
            memory_loader(memory)?;
            vm.restore_vcpus(vcpus)
        })
    }

    fn create(
        config: &VmConfig,
        load: impl FnOnce(&Vm, &GuestMemory, &GuestLayout) -> Result<()>,
    ) -> Result<Self> {
        Self::create_with(config, None, load)
    }

    fn create_with(
        config: &VmConfig,
        prepared: Option<GuestMemory>,
        load: impl FnOnce(&Vm, &GuestMemory, &GuestLayout) -> Result<()>,
    ) -> Result<Self> {
        let layout = config.check()?;
        let mut builder = VmBuilder::new()?;
        match config.dirty_log {
            DirtyLogMode::Bitmap => {}
            DirtyLogMode::ClearLog => builder.enable_manual_protect()?,
            DirtyLogMode::Ring => builder.enable_dirty_ring(config.ring_entries)?,
            DirtyLogMode::RingWithBitmap => {
                builder.enable_dirty_ring(config.ring_entries)?;
                builder.enable_dirty_ring_with_bitmap()?;
            }
        }
        let memory = match prepared {
            None => GuestMemory::new(&layout.memory)?,
            Some(memory) if *memory.layout() == layout.memory => memory,
            Some(memory) => {
                return Err(KvmError::Invalid(format!(
                    "the prepared RAM ({} bytes) does not have the layout of a {}-byte VM",
                    memory.layout().ram(),
                    config.ram
                )));
            }
        };
        let memory = builder.add_memory(memory)?;
        builder.create_vcpus(config.vcpus)?;
        let msrs = builder.msrs_to_migrate()?;
        let VmBuilder {
            vm, vcpus, rings, ..
        } = builder;
        let vm = Arc::new(vm);
        let dirty = Arc::new(CpuDirtyLog::new(
            config.dirty_log,
            Arc::clone(&vm),
            Arc::clone(&memory),
            rings,
        )?);
        let ports = Arc::new(GuestPorts::new(config.vcpus, config.workload.rate));
        let mut handles = Vec::with_capacity(vcpus.len());
        for (index, fd) in vcpus.into_iter().enumerate() {
            handles.push(VcpuHandle::spawn(
                index,
                fd,
                Arc::clone(&ports) as _,
                Arc::clone(&dirty),
            )?);
        }
        let vm = Vm {
            vcpus: handles,
            dirty,
            ports,
            memory: Arc::clone(&memory),
            config: config.clone(),
            layout: layout.clone(),
            msrs,
            paused: std::sync::Mutex::new(true),
            irq_routes: IrqRoutes::default(),
            device_slots: std::sync::Mutex::new(Vec::new()),
            port_script: std::sync::Mutex::new(()),
            _vm: vm,
        };
        load(&vm, &memory, &layout)?;
        Ok(vm)
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where the guest's memory and working set are.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// CPU dirty tracking.
    pub fn dirty_log(&self) -> &Arc<CpuDirtyLog> {
        &self.dirty
    }

    /// Lets every vCPU run.
    pub fn resume(&self) -> Result<()> {
        self.check_vcpus()?;
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        *paused = false;
        Ok(())
    }

    /// Stops every vCPU; returns once every one has left `KVM_RUN` and completed any pending
    /// port or MMIO access, so its state can be saved and no guest write is in flight.
    pub fn pause(&self) -> Result<()> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        for vcpu in &self.vcpus {
            vcpu.request_pause()?;
        }
        for vcpu in &self.vcpus {
            vcpu.wait_parked(PAUSE_TIMEOUT)?;
        }
        *paused = true;
        Ok(())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An error if a vCPU stopped on its own (triple fault, unexpected exit, failed handler).
    pub fn check_vcpus(&self) -> Result<()> {
        match self.vcpus.iter().find_map(VcpuHandle::failure) {
            Some(why) => Err(KvmError::VcpuStopped(why)),
            None => Ok(()),
        }
    }

    /// Pages the guest says it wrote, summed over vCPUs.
    pub fn guest_writes(&self) -> Result<u64> {
        (0..self.config.vcpus)
            .map(|v| guest::read_counters(&self.memory, v).map(|c| c.writes))
            .sum()
    }

    /// Exits handled by all vCPU threads so far, and how many of them were pacing requests.
    pub fn exit_counts(&self) -> (u64, u64) {
        (
            self.vcpus.iter().map(VcpuHandle::exits).sum(),
            self.ports.pace_exits(),
        )
    }

    /// Sets the epoch the guest stamps from its next write on.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        guest::set_epoch(&self.memory, epoch)
    }

    /// Changes the guest's write rate (pages per second for the whole VM; `None`: unlimited).
    /// Only a guest built with a rate paces itself: one built unlimited never asks.
    pub fn set_rate(&self, rate: Option<u64>) -> Result<()> {
        if self.config.workload.rate.is_none() && rate.is_some() {
            return Err(KvmError::Invalid(
                "this guest was built without a rate and never asks to be paced; start it with rate=N".into(),
            ));
        }
        self.ports.set_rate(rate);
        Ok(())
    }

    /// The current write rate.
    pub fn rate(&self) -> Option<u64> {
        self.ports.rate()
    }

    /// Has the running guest check every working-set page against its journal; returns what
    /// it found. The VM must be running.
    pub fn verify(&self, timeout: Duration) -> Result<VerifyReport> {
        if self.is_paused() {
            return Err(KvmError::Order(
                "verify runs in the guest: resume the VM first".into(),
            ));
        }
        self.ports.begin_verify();
        guest::post_verify(&self.memory)?;
        let tally = self.ports.wait_verify(Instant::now() + timeout, || {
            self.vcpus.iter().find_map(VcpuHandle::failure)
        })?;
        Ok(VerifyReport {
            working_set_pages: self.layout.ws_pages,
            pages_checked: tally.pages_checked,
            bad_count: tally.bad_count,
            bad_pages: tally.bad_pages,
        })
    }

    /// Has the running guest's vCPU 0 execute `ops` (at most [`guest::MAX_PORT_OPS`]) with
    /// real `out dx, al` / `in al, dx` instructions at its next batch boundary, and returns the
    /// bytes its `in`s read, in order. The accesses exit to the VM's port handler
    /// ([`Vm::set_port_handler`]) as any guest port access does: a port nothing claims stops
    /// vCPU 0, and this fails saying so. The VM must be running; the write loop, its pacing,
    /// the doorbells and verify go on undisturbed, and the other vCPUs never look at it.
    ///
    /// Fails on a timeout (the script then still runs when vCPU 0 gets to it, and no other is
    /// taken until it has) and when a vCPU stopped.
    pub fn run_port_script(&self, ops: &[PortOp], timeout: Duration) -> Result<Vec<u8>> {
        if self.is_paused() {
            return Err(KvmError::Order(
                "a port script runs in the guest: resume the VM first".into(),
            ));
        }
        let _one = self.port_script.lock().unwrap_or_else(|e| e.into_inner());
        self.check_vcpus()?;
        let seq = guest::post_port_script(&self.memory, ops)?;
        let deadline = Instant::now() + timeout;
        loop {
            if guest::port_script_done(&self.memory, seq)? {
                return guest::port_script_reads(&self.memory, ops);
            }
            self.check_vcpus()?;
            if Instant::now() >= deadline {
                return Err(KvmError::Timeout(format!(
                    "vCPU 0 did not run port script {seq} within {timeout:?}{}; it runs when vCPU 0 next reaches a batch boundary",
                    if self.is_paused() {
                        " (the VM was paused meanwhile)"
                    } else {
                        ""
                    }
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Saves every vCPU's state; the VM must be paused and every vCPU healthy.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>> {
        self.check_vcpus()?;
        self.vcpus
            .iter()
            .map(|v| v.with_fd(|fd| save_state(fd, v.index, &self.msrs)))
            .collect()
    }

    /// Wires an MSI with `vector` to vCPU `vcpu`'s local APIC: signalling the returned vector's
    /// eventfd (a device's interrupt) makes it pending there.
    pub fn connect_msi(&self, vcpu: usize, vector: u8) -> Result<MsiVector> {
        let apic_id = u8::try_from(vcpu)
            .ok()
            .filter(|_| vcpu < self.vcpus.len())
            .ok_or_else(|| KvmError::Invalid(format!("no vCPU {vcpu}")))?;
        self.irq_routes.add_msi(&self._vm, apic_id, vector)
    }

    /// Creates the VM's KVM VFIO pseudo-device (`KVM_DEV_TYPE_VFIO`; at most one per VM), with
    /// which the VFIO groups of the VM's passthrough devices are registered, so KVM knows of
    /// their (possibly non-coherent) DMA, as QEMU does for every VFIO device.
    pub fn create_vfio_device(&self) -> Result<kvm_ioctls::DeviceFd> {
        let mut device = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        self._vm
            .create_device(&mut device)
            .map_err(ioctl_error("KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO)"))
    }

    /// Maps `size` bytes of `fd` from `offset` (a device region's mmappable area) into the
    /// guest at `gpa`: guest accesses there reach the device's memory without an exit. The range
    /// must lie outside RAM and be page-aligned; `writable` false makes guest writes exits
    /// (a read-only memslot).
    pub fn map_device_memory(
        &self,
        gpa: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        writable: bool,
    ) -> Result<()> {
        let aligned = [gpa, offset, size].iter().all(|v| v % PAGE_SIZE == 0) && size > 0;
        let ram =
            self.layout.memory.slots.iter().any(|s| {
                gpa < s.gpa + s.size && gpa.checked_add(size).is_none_or(|end| s.gpa < end)
            });
        if !aligned || ram {
            return Err(KvmError::Invalid(format!(
                "device memory of {size:#x} bytes at {gpa:#x} (file offset {offset:#x}): expected whole pages outside RAM"
            )));
        }
        // A file shorter than the area would fail the vCPU's access (EFAULT from KVM_RUN). A
        // device fd (kernel VFIO: an anonymous inode, no size) checks its own offsets.
        let file_len = vmig_primitives::regular_file_size(fd)?;
        if let Some(file_len) = file_len
            && offset.checked_add(size).is_none_or(|end| end > file_len)
        {
            return Err(KvmError::Invalid(format!(
                "device memory at file offset {offset:#x}, {size:#x} bytes: the file is shorter"
            )));
        }
        let host = HostMemory::map_fd(fd, offset, size, writable)?;
        let mut slots = self.device_slots.lock().unwrap_or_else(|e| e.into_inner());
        let id = u32::try_from(slots.len())
            .ok()
            .and_then(|n| FIRST_DEVICE_SLOT.checked_add(n))
            .ok_or_else(|| {
                KvmError::Invalid(format!(
                    "{} device memory slots: no memslot id is left",
                    slots.len()
                ))
            })?;
        let flags = if writable { 0 } else { KVM_MEM_READONLY };
        sys::set_memory_slot(&self._vm, id, flags, gpa, &host).map_err(|source| {
            KvmError::Ioctl {
                call: format!(
                    "KVM_SET_USER_MEMORY_REGION(device slot {id} at {gpa:#x}, {size} bytes)"
                ),
                source,
            }
        })?;
        slots.push(DeviceSlot {
            id,
            gpa,
            flags,
            host,
            trapped: false,
        });
        Ok(())
    }

    /// Takes the device memory mapped at `gpa` (by [`Vm::map_device_memory`]) out of the guest
    /// (`trapped` true), so that guest accesses there exit to the MMIO handler, or puts it
    /// back (false). The mapping itself stays: the device's memory keeps what the guest wrote.
    /// When this returns, no vCPU reaches the memory through the old memslot any more (KVM
    /// waits for its readers), so every later access is seen by the handler.
    pub fn set_device_memory_trapped(&self, gpa: u64, trapped: bool) -> Result<()> {
        let mut slots = self.device_slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .iter_mut()
            .find(|s| s.gpa == gpa)
            .ok_or_else(|| KvmError::Invalid(format!("no device memory is mapped at {gpa:#x}")))?;
        if slot.trapped == trapped {
            return Ok(());
        }
        let call = |what: &str| {
            format!(
                "KVM_SET_USER_MEMORY_REGION({what} device slot {} at {gpa:#x})",
                slot.id
            )
        };
        if trapped {
            sys::delete_memory_slot(&self._vm, slot.id).map_err(|source| KvmError::Ioctl {
                call: call("deleting"),
                source,
            })?;
        } else {
            sys::set_memory_slot(&self._vm, slot.id, slot.flags, gpa, &slot.host).map_err(
                |source| KvmError::Ioctl {
                    call: call("restoring"),
                    source,
                },
            )?;
        }
        slot.trapped = trapped;
        Ok(())
    }

    /// Whether the device memory at `gpa` is trapped ([`Vm::set_device_memory_trapped`]);
    /// `None` when none is mapped there.
    pub fn device_memory_trapped(&self, gpa: u64) -> Option<bool> {
        let slots = self.device_slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.iter().find(|s| s.gpa == gpa).map(|s| s.trapped)
    }

    /// The interrupt vectors pending at vCPU `vcpu`'s local APIC (its IRR), which are then
    /// cleared. The guest runs with interrupts off, so what devices signal accumulates there.
    /// The VM must be paused (by whoever owns its pauses: a migration may be one).
    pub fn take_pending_interrupts(&self, vcpu: usize) -> Result<Vec<u8>> {
        self.with_vcpu(vcpu, |fd| {
            let mut lapic = fd.get_lapic().map_err(ioctl_error("KVM_GET_LAPIC"))?;
            let mut pending = Vec::new();
            for word in 0..8u32 {
                let offset = APIC_IRR + word as usize * 0x10;
                let bits = lapic_register(&lapic, offset);
                pending.extend(
                    (0..32)
                        .filter(|b| bits >> b & 1 == 1)
                        .filter_map(|b| u8::try_from(word * 32 + b).ok()),
                );
                set_lapic_register(&mut lapic, offset, 0);
            }
            fd.set_lapic(&lapic).map_err(ioctl_error("KVM_SET_LAPIC"))?;
            Ok(pending)
        })
    }

    /// Runs `f` on vCPU `index`'s fd while the VM is paused (for tests and diagnostics).
    pub fn with_vcpu<T>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> Result<T>) -> Result<T> {
        self.vcpus
            .get(index)
            .ok_or_else(|| KvmError::Invalid(format!("no vCPU {index}")))?
            .with_fd(f)
    }
}

/// Memslot ids of device memory start here, after RAM's.
const FIRST_DEVICE_SLOT: u32 = 64;

/// Device memory mapped into the guest: its memslot and the mapping behind it.
struct DeviceSlot {
    id: u32,
    gpa: u64,
    /// The memslot's flags (read-only or not), to restore it as it was.
    flags: u32,
    host: HostMemory,
    /// Its memslot is deleted for now: guest accesses exit.
    trapped: bool,
}

/// Local APIC register offsets (Intel SDM vol. 3, table 11-1) and the spurious-vector
/// register's software-enable bit.
const APIC_SPURIOUS_VECTOR: usize = 0xf0;
const APIC_IRR: usize = 0x200;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;

fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_ne_bytes()[0]);
    u32::from_le_bytes(bytes)
}

fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = i8::from_ne_bytes([byte]);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Join the vCPU threads, stop the reaper, and delete the memslots before the memory
        // they point into can be unmapped.
        self.vcpus.clear();
        let _ = self.dirty.stop();
        for slot in self.memory.slots() {
            let _ = sys::delete_memory_slot(&self._vm, slot.layout.id);
        }
        for slot in self
            .device_slots
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| !s.trapped)
        {
            let _ = sys::delete_memory_slot(&self._vm, slot.id);
        }
    }
}
