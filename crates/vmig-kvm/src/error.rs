//! The crate's error type: every refusal says what was wrong and what was expected.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (vmig needs KVM: load the kvm module and make /dev/kvm readable and writable)"
    )]
    NoKvm(io::Error),
    /// A KVM ioctl failed.
    #[error("{call} failed: {source}")]
    Ioctl {
        /// The call, e.g. `KVM_GET_DIRTY_LOG(slot 2)`.
        call: String,
        /// The errno KVM returned.
        source: io::Error,
    },
    /// This kernel lacks a capability the request needs.
    #[error("{0}")]
    Unsupported(String),
    /// A capability or setup step was asked for in the wrong order.
    #[error("{0}")]
    Order(String),
    /// A configuration value is out of range or malformed.
    #[error("{0}")]
    Invalid(String),
    /// A snapshot file is malformed, truncated or corrupted.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A snapshot file could not be opened.
    #[error("snapshot: cannot open {}: {source}", path.display())]
    SnapshotOpen {
        /// The file.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// A snapshot's JSON header could not be encoded.
    #[error("snapshot: {0}")]
    SnapshotEncode(#[source] serde_json::Error),
    /// A snapshot's JSON header could not be decoded.
    #[error("snapshot: header: {0}")]
    SnapshotHeader(#[source] serde_json::Error),
    /// Dirty tracking can no longer vouch for every page (a KVM call failed midway); the pages
    /// already handed over stay valid, but the caller must restart tracking and resend
    /// everything.
    #[error("CPU dirty tracking failed: {0}")]
    DirtyLog(String),
    /// As [`KvmError::DirtyLog`], for a failure with a cause: the harvest that failed returns
    /// it, and so does every later harvest until tracking restarts.
    #[error("CPU dirty tracking failed: {0}")]
    DirtyLogFailed(#[source] Arc<KvmError>),
    /// KVM reports a full dirty ring again and again while the ring holds nothing to harvest.
    #[error(
        "KVM keeps reporting a full dirty ring that holds no entries to harvest: the ring is out of step with KVM"
    )]
    RingOutOfStep,
    /// The guest stopped in a way it never should (triple fault, internal error, unhandled exit).
    #[error("guest failed: {0}")]
    Guest(String),
    /// The handler of a guest MMIO access failed.
    #[error("guest failed: vCPU {vcpu} {} {addr:#x}: {source}", if *.write { "wrote" } else { "read" })]
    Mmio {
        /// The vCPU.
        vcpu: usize,
        /// The guest-physical address.
        addr: u64,
        /// Whether it was a write.
        write: bool,
        /// Why.
        #[source]
        source: crate::ports::MmioError,
    },
    /// The handler of a guest port access failed (no device claims the port, or the device
    /// failed).
    #[error("guest failed: vCPU {vcpu} {} I/O port {port:#x}: {source}", if *.write { "wrote to" } else { "read" })]
    Port {
        /// The vCPU.
        vcpu: usize,
        /// The port.
        port: u16,
        /// Whether it was an `out`.
        write: bool,
        /// Why.
        #[source]
        source: crate::ports::MmioError,
    },
    /// A vCPU thread stopped on an error (its exit handler or `KVM_RUN` failed).
    #[error("guest failed: {0}")]
    VcpuStopped(#[source] Arc<KvmError>),
    /// A dirty bitmap refused a page range or could not be allocated.
    #[error(transparent)]
    Bitmap(#[from] vmig_dirty::DirtyError),
    /// The operation did not complete in time.
    #[error("{0}")]
    Timeout(String),
    /// A KVM list (MSRs, GSI routes) could not be built: more entries than it holds.
    #[error("{context}: {source:?}")]
    List {
        /// Which list, e.g. `MSR list`.
        context: String,
        /// The wrapper's refusal.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// The guest's code could not be assembled.
    #[error("assembling the guest: {0}")]
    Assemble(#[source] iced_x86::IcedError),
    /// An error shared between the call that hit it and a record that later calls report (a
    /// failed dirty-ring reap): it reads as the error itself.
    #[error(transparent)]
    Shared(Arc<KvmError>),
    /// Other I/O (files, memfds, mappings).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Result with [`KvmError`].
pub type Result<T, E = KvmError> = std::result::Result<T, E>;

/// Wraps a failed ioctl with the call's name.
pub(crate) fn ioctl_error(call: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    let call = call.into();
    move |e| KvmError::Ioctl {
        call,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}
