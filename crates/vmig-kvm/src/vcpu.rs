//! vCPU threads: the `KVM_RUN` loop, pause and resume, and the vCPU state a migration moves.
//!
//! ```text
//!            resume                    kick (signal → immediate_exit = 1)
//!  parked ───────────► running ───────────────────────────────► KVM_RUN returns EINTR
//!    ▲                   │ exits: PIO/MMIO → ExitHandler,              │
//!    │                   │        ring full → CpuDirtyLog              ▼
//!    └──── park ◄─────── KVM_RUN once more with immediate_exit = 1 (completes a pending
//!                        PIO/MMIO without running guest code, so the saved state is whole)
//! ```
//!
//! A pause request is a flag plus a kick: the flag is checked before every `KVM_RUN`, and the
//! kick's handler sets `immediate_exit`, so a vCPU cannot slip back into the guest between the
//! check and the ioctl. [`VcpuHandle::wait_parked`] returns only once the thread has left
//! `KVM_RUN` and released its vCPU fd.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_EXIT_DIRTY_RING_FULL, Msrs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::dirty::CpuDirtyLog;
use crate::error::{KvmError, Result, ioctl_error};
use crate::sys::{self, ArmedKick};

/// What a vCPU thread knows while handling an exit.
pub(crate) struct ExitContext<'a> {
    /// vCPU index.
    pub(crate) vcpu: usize,
    pause: &'a AtomicBool,
}

impl ExitContext<'_> {
    /// Whether the VMM wants this vCPU to pause: a handler that sleeps should cut it short.
    pub(crate) fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }
}

/// Where the vCPU loop hands the exits the guest causes on purpose, port and MMIO accesses.
/// Internal: its one implementation is the VM's own port block (`ports::GuestPorts`), which
/// serves the guest workload's ports and passes MMIO on to the [`crate::MmioHandler`] the layer
/// above installs. Devices never implement it.
pub(crate) trait ExitHandler: Send + Sync {
    /// `out` to `port`.
    fn io_out(&self, ctx: &ExitContext<'_>, port: u16, data: &[u8]) -> Result<()>;
    /// `in` from `port`: fill `data`.
    fn io_in(&self, ctx: &ExitContext<'_>, port: u16, data: &mut [u8]) -> Result<()>;
    /// A read of guest-physical `addr` where there is no RAM.
    fn mmio_read(&self, ctx: &ExitContext<'_>, addr: u64, data: &mut [u8]) -> Result<()>;
    /// A write of guest-physical `addr` where there is no RAM.
    fn mmio_write(&self, ctx: &ExitContext<'_>, addr: u64, data: &[u8]) -> Result<()>;
}

/// The MSRs a 64-bit guest needs carried over (those this kernel lists are saved).
pub const MIGRATED_MSRS: [u32; 14] = [
    0x10,        // TSC
    0x3b,        // TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Everything KVM holds about one vCPU that a fresh VM needs to continue it at the same
/// instruction.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Model-specific registers: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

/// Reads the state of `fd` (which must not be in `KVM_RUN`).
pub(crate) fn save_state(fd: &VcpuFd, index: usize, msr_indices: &[u32]) -> Result<VcpuState> {
    let what = |call: &str| format!("{call} (vCPU {index})");
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| KvmError::List {
        context: "MSR list".into(),
        source,
    })?;
    let read = fd
        .get_msrs(&mut msrs)
        .map_err(ioctl_error(what("KVM_GET_MSRS")))?;
    if read != entries.len() {
        return Err(KvmError::Unsupported(format!(
            "KVM_GET_MSRS read {read} of {} MSRs (stopped at {:#x})",
            entries.len(),
            msr_indices.get(read).copied().unwrap_or(0)
        )));
    }
    Ok(VcpuState {
        regs: fd.get_regs().map_err(ioctl_error(what("KVM_GET_REGS")))?,
        sregs: fd.get_sregs().map_err(ioctl_error(what("KVM_GET_SREGS")))?,
        xsave: fd.get_xsave().map_err(ioctl_error(what("KVM_GET_XSAVE")))?,
        xcrs: fd.get_xcrs().map_err(ioctl_error(what("KVM_GET_XCRS")))?,
        msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        lapic: fd.get_lapic().map_err(ioctl_error(what("KVM_GET_LAPIC")))?,
        events: fd
            .get_vcpu_events()
            .map_err(ioctl_error(what("KVM_GET_VCPU_EVENTS")))?,
        mp_state: fd
            .get_mp_state()
            .map_err(ioctl_error(what("KVM_GET_MP_STATE")))?,
    })
}

/// Loads `state` into `fd`, in the order KVM needs: sregs (APIC base, modes) before the LAPIC and
/// MSRs, events last.
pub(crate) fn restore_state(fd: &VcpuFd, index: usize, state: &VcpuState) -> Result<()> {
    let what = |call: &str| format!("{call} (vCPU {index})");
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl_error(what("KVM_SET_MP_STATE")))?;
    fd.set_sregs(&state.sregs)
        .map_err(ioctl_error(what("KVM_SET_SREGS")))?;
    fd.set_regs(&state.regs)
        .map_err(ioctl_error(what("KVM_SET_REGS")))?;
    sys::set_xsave(fd, &state.xsave).map_err(ioctl_error(what("KVM_SET_XSAVE")))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(ioctl_error(what("KVM_SET_XCRS")))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|source| KvmError::List {
        context: "snapshot: MSR list".into(),
        source,
    })?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(ioctl_error(what("KVM_SET_MSRS")))?;
    if written != entries.len() {
        return Err(KvmError::Snapshot(format!(
            "KVM_SET_MSRS (vCPU {index}) refused MSR {:#x}",
            entries[written].index
        )));
    }
    fd.set_lapic(&state.lapic)
        .map_err(ioctl_error(what("KVM_SET_LAPIC")))?;
    fd.set_vcpu_events(&state.events)
        .map_err(ioctl_error(what("KVM_SET_VCPU_EVENTS")))?;
    Ok(())
}

#[derive(Debug, Default)]
struct ControlState {
    parked: bool,
    quit: bool,
    failure: Option<Arc<KvmError>>,
}

/// Shared between a vCPU thread and the VMM.
#[derive(Debug, Default)]
pub(crate) struct VcpuControl {
    pause: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
    exits: AtomicU64,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread until resumed or told to quit; returns whether to quit.
    fn park(&self) -> bool {
        let mut state = self.lock();
        state.parked = true;
        self.changed.notify_all();
        while self.pause.load(Ordering::Acquire) && !state.quit {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked = false;
        state.quit
    }

    /// Records why the vCPU stopped and parks until told to quit.
    fn fail(&self, why: KvmError) {
        tracing::warn!(error = %why, "a vCPU thread stopped");
        let mut state = self.lock();
        state.failure.get_or_insert_with(|| Arc::new(why));
        state.parked = true;
        self.changed.notify_all();
        while !state.quit {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One vCPU: its fd (held by its thread while it runs) and its thread.
pub(crate) struct VcpuHandle {
    pub(crate) index: usize,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread of vCPU `index`, parked.
    pub(crate) fn spawn(
        index: usize,
        fd: VcpuFd,
        handler: Arc<dyn ExitHandler>,
        dirty: Arc<CpuDirtyLog>,
    ) -> Result<Self> {
        sys::kick_signal()?;
        let fd = Arc::new(Mutex::new(fd));
        let control = Arc::new(VcpuControl::default());
        control.pause.store(true, Ordering::Release);
        let thread = {
            let fd = Arc::clone(&fd);
            let control = Arc::clone(&control);
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_vcpu(index, &fd, &control, &*handler, &dirty))?
        };
        let handle = Self {
            index,
            fd,
            control,
            thread: Some(thread),
        };
        handle.wait_parked(Duration::from_secs(5))?;
        Ok(handle)
    }

    /// Asks the vCPU to leave `KVM_RUN` and park; see [`Self::wait_parked`].
    pub(crate) fn request_pause(&self) -> Result<()> {
        self.control.pause.store(true, Ordering::SeqCst);
        self.kick()
    }

    fn kick(&self) -> Result<()> {
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            if !thread.is_finished() {
                sys::kick_thread(thread.as_pthread_t())?;
            }
        }
        Ok(())
    }

    /// Waits until the vCPU is parked (or stopped by a failure), kicking it again every 10 ms.
    pub(crate) fn wait_parked(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.control.lock();
        while !state.parked {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                return Err(KvmError::Guest(format!(
                    "the thread of vCPU {} ended unexpectedly (it panicked)",
                    self.index
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KvmError::Timeout(format!(
                    "vCPU {} did not leave KVM_RUN within {timeout:?}",
                    self.index
                )));
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            state = self
                .control
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if !state.parked {
                drop(state);
                self.kick()?;
                state = self.control.lock();
            }
        }
        Ok(())
    }

    /// Lets a parked vCPU run again.
    pub(crate) fn resume(&self) {
        let _state = self.control.lock();
        self.control.pause.store(false, Ordering::SeqCst);
        self.control.changed.notify_all();
    }

    /// Why the vCPU stopped, if it failed.
    pub(crate) fn failure(&self) -> Option<Arc<KvmError>> {
        self.control.lock().failure.clone()
    }

    /// Exits handled so far.
    pub(crate) fn exits(&self) -> u64 {
        self.control.exits.load(Ordering::Relaxed)
    }

    /// Runs `f` on the vCPU fd; the vCPU must be parked.
    pub(crate) fn with_fd<T>(&self, f: impl FnOnce(&VcpuFd) -> Result<T>) -> Result<T> {
        let state = self.control.lock();
        if !state.parked || !self.control.pause.load(Ordering::Acquire) {
            return Err(KvmError::Order(format!(
                "vCPU {} is running: pause the VM before reading or writing vCPU state",
                self.index
            )));
        }
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&fd);
        drop(state);
        result
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        {
            let mut state = self.control.lock();
            state.quit = true;
            self.control.pause.store(true, Ordering::SeqCst);
            self.control.changed.notify_all();
        }
        let _ = self.kick();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_vcpu(
    index: usize,
    fd: &Mutex<VcpuFd>,
    control: &VcpuControl,
    handler: &dyn ExitHandler,
    dirty: &CpuDirtyLog,
) {
    let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
    let kick = ArmedKick::arm(&mut guard);
    let ctx = ExitContext {
        vcpu: index,
        pause: &control.pause,
    };
    loop {
        // Clear before checking the flag: a kick after the check sets it again, and then
        // KVM_RUN returns at once.
        kick.set_immediate_exit(false);
        if control.pause.load(Ordering::SeqCst) {
            // Complete a pending port or MMIO access without running guest code; an access
            // that needs more than one round trip exits again and is handled here.
            let mut completed = Ok(());
            for _ in 0..16 {
                kick.set_immediate_exit(true);
                match guard.run() {
                    Err(e) if e.errno() == libc::EINTR => break,
                    Ok(VcpuExit::Intr) => break,
                    Ok(exit) => {
                        completed = handle_exit(index, exit, &ctx, handler, dirty);
                        if completed.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        completed = Err(KvmError::Ioctl {
                            call: format!("KVM_RUN with immediate_exit (vCPU {index})"),
                            source: std::io::Error::from_raw_os_error(e.errno()),
                        });
                        break;
                    }
                }
            }
            kick.set_immediate_exit(false);
            drop(guard);
            if let Err(e) = completed {
                control.fail(e);
                return;
            }
            if control.park() {
                return;
            }
            guard = fd.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let outcome = match guard.run() {
            Ok(VcpuExit::Shutdown) => Err(KvmError::Guest(format!(
                "vCPU {index} shut down (triple fault) at rip {:#x}",
                rip_of(&guard)
            ))),
            Ok(exit) => {
                control.exits.fetch_add(1, Ordering::Relaxed);
                handle_exit(index, exit, &ctx, handler, dirty)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(KvmError::Ioctl {
                call: format!("KVM_RUN (vCPU {index})"),
                source: std::io::Error::from_raw_os_error(e.errno()),
            }),
        };
        if let Err(e) = outcome {
            drop(guard);
            control.fail(e);
            return;
        }
    }
}

fn handle_exit(
    index: usize,
    exit: VcpuExit<'_>,
    ctx: &ExitContext<'_>,
    handler: &dyn ExitHandler,
    dirty: &CpuDirtyLog,
) -> Result<()> {
    match exit {
        VcpuExit::IoOut(port, data) => handler.io_out(ctx, port, data),
        VcpuExit::IoIn(port, data) => handler.io_in(ctx, port, data),
        VcpuExit::MmioRead(addr, data) => handler.mmio_read(ctx, addr, data),
        VcpuExit::MmioWrite(addr, data) => handler.mmio_write(ctx, addr, data),
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => dirty.on_ring_full(),
        VcpuExit::Intr => Ok(()),
        other => Err(KvmError::Guest(format!(
            "vCPU {index} stopped with an unexpected exit: {other:?}"
        ))),
    }
}

fn rip_of(fd: &VcpuFd) -> u64 {
    fd.get_regs().map(|r| r.rip).unwrap_or(0)
}
