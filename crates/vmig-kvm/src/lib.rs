//! `vmig-kvm`: the VM that vmig migrates, on real `/dev/kvm`.
//!
//! It owns:
//! - guest RAM in memfds over host memory, one per memslot, laid out with an odd-sized slot
//!   and a hole ([`memory`]);
//! - VM creation in the order KVM requires, refusing out-of-order steps ([`VmBuilder`]);
//! - vCPU threads with pause (signal + `immediate_exit`) and resume, and vCPU state save/restore
//!   ([`vcpu`]);
//! - self-checking guest workloads assembled at run time: a 64-bit guest whose writes are
//!   stamped and journaled, with a `verify` that finds any page that was lost or torn
//!   ([`guest`]);
//! - CPU dirty tracking in every KVM mode (bitmap, clear-log, ring, ring with bitmap) behind one
//!   type ([`CpuDirtyLog`]);
//! - device interrupts as MSI irqfds ([`irq`], [`Vm::connect_msi`]) and device memory as
//!   memslots ([`Vm::map_device_memory`]);
//! - snapshots of a paused VM that another process continues ([`snapshot`]).
//!
//! It leaves device models, DMA and the migration stream to the crates above it and never names
//! a device. The guest's report ports (`0x510`-`0x513`: pacing, verify reports, yield) are
//! served here; its MMIO exits, accesses where there is no RAM, are handed to the one
//! [`MmioHandler`] the layer above installs with [`Vm::set_mmio_handler`], and its other port
//! exits (devices' I/O-port BARs, placed in [`guest::IO_WINDOW_PORT`]'s window) to the one
//! [`PortHandler`] it installs with [`Vm::set_port_handler`] (both: the engine's device bus); an
//! access nothing claims stops the vCPU with a message naming it. Interrupts come in through
//! the [`irq::MsiVector`]s it asks for.
//!
//! The guest can also be made to do port I/O itself: [`Vm::run_port_script`] posts a few
//! byte-wide `out`s and `in`s ([`PortOp`]) in the control page, vCPU 0 executes them at its next
//! batch boundary, and the bytes the `in`s read come back (how a test shows that a UART's FIFO
//! crossed a migration: written by the source's guest, read back by the destination's).
//!
//! ```no_run
//! use vmig_kvm::{Vm, VmConfig, DirtyLogMode};
//! use vmig_dirty::DirtyBitmap;
//!
//! let vm = Vm::new(&VmConfig { dirty_log: DirtyLogMode::Ring, ..VmConfig::default() })?;
//! vm.dirty_log().start()?;
//! vm.resume()?;
//! std::thread::sleep(std::time::Duration::from_millis(100));
//! let dirty = DirtyBitmap::new(vm.memory().layout().top_page());
//! vm.dirty_log().harvest(&dirty)?;          // pages dirtied so far, write-protected again
//! let report = vm.verify(std::time::Duration::from_secs(10))?;
//! assert!(report.passed());
//! vm.pause()?;                               // every vCPU out of KVM_RUN
//! vm.dirty_log().harvest(&dirty)?;          // complete: nothing is written while paused
//! # Ok::<(), vmig_kvm::KvmError>(())
//! ```

mod dirty;
mod error;
pub mod guest;
pub mod irq;
pub mod memory;
mod ports;
pub mod snapshot;
mod sys;
pub mod vcpu;
mod vm;

pub use dirty::{CpuDirtyLog, DEFAULT_CLEAR_CHUNK_PAGES, DirtyLogMode, DirtyLogStats};
pub use error::{KvmError, Result};
pub use guest::{PortOp, Workload, WorkloadKind, parse_size};
pub use memory::{GuestMemory, PAGE_SIZE};
pub use ports::{MmioError, MmioHandler, PortHandler, VerifyReport};
pub use vcpu::VcpuState;
pub use vm::{DEFAULT_RING_ENTRIES, Vm, VmBuilder, VmConfig};

/// Whether `/dev/kvm` can be opened; tests that need KVM skip (and say why) when it cannot.
pub fn kvm_available() -> std::result::Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}
