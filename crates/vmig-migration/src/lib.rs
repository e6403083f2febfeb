//! `vmig-migration`: the live-migration engine.
//!
//! It owns the path of a migration from the first page to the destination's resume:
//! - a VM with its devices attached, DMA-mapped and routed ([`machine`]), each behind one
//!   trait, [`device::MigratableDevice`], implemented for a vfio-user server and for a PCI
//!   device through the kernel's VFIO;
//! - the hooks through which a guest driver sets a device up and checks it after a migration
//!   ([`driver`]): the engine names no device; the binary and the tests register drivers;
//! - every dirty-page producer behind [`dirty::DirtySource`]: KVM (every mode), device DMA
//!   logging (v2), `DIRTY_PAGES` (v1, or a kernel device's type1 container), the VMM's own
//!   writes, and the migration mediators ([`mediator`], seed 002) that trap part of a BAR
//!   during migration for a device whose DMA nothing else tracks;
//! - the sending side ([`source`]): pre-copy passes, convergence, auto-converge, stop-and-copy,
//!   commit, and rollback;
//! - the stream ([`stream`]: every record typed, encoded and decoded in one place, with the
//!   receiver's state table and the versioning rule) over one or more connections
//!   ([`transport`]), with page senders in parallel ([`pool`]);
//! - the receiving side ([`destination`]), which refuses a record out of place, and its
//!   verification;
//! - the report ([`report`]).
//!
//! It leaves KVM to `vmig-kvm`, the vfio-user protocol to `vmig-vfio-user`, kernel VFIO to
//! `vmig-vfio`, the sample devices and their drivers to `vmig-devices`, and the command line
//! to the `vmig` binary.
//!
//! ```text
//!  source                                               destination
//!    │ hello ×N connections (session, channel) ─────────────► │
//!    │ Config {VM, devices} ────────────────────────────────► │ build VM, attach devices,
//!    │ ◄──────────────────────────────────────────────── Ready │ devices → RESUMING
//!    │ start dirty tracking (KVM, devices, VMM); devices → pre-copy
//!    │ Pages (pass 0: all RAM) on every connection ─────────► │ write pages, digest each
//!    │ PassEnd 0 on every connection ───────────────────────► │ all connections meet
//!    │ DeviceData (pre-copy) ───────────────────────────────► │ write to device
//!    │ harvest; repeat passes until the rest fits downtime_ms (throttle vCPUs if needed)
//!    │ pause vCPUs; devices → stop-and-copy; final harvest
//!    │ Pages, PassEnd (final) ──────────────────────────────► │
//!    │ DeviceData, DeviceEnd {bytes, digest} ───────────────► │ compare
//!    │ VcpuState, Digests (every page) ─────────────────────► │ compare
//!    │ Complete ────────────────────────────────────────────► │ devices load (STOP), vCPUs set
//!    │ ◄───────────────────────────────────────────── Accepted │      (or Abort: source resumes)
//!    │ Commit (the source will never resume) ───────────────► │ devices run, vCPUs run
//!    │ ◄────────────────────────────────────────────── Resumed │ guest verify, device records
//!    │ ◄────────────────────────────────────── Result {checks} │
//! ```
//!
//! Anything that fails before the source sends Commit (connection lost, a refusal, a device
//! error, the timeout, `migrate-cancel`) ends with an Abort both ways: the source's devices run
//! again, its dirty tracking stops and its vCPUs resume; the destination drops its VM and
//! resets its devices.

mod cancel;
pub mod destination;
pub mod device;
pub mod dirty;
pub mod driver;
mod error;
pub mod machine;
pub mod mediator;
pub mod pool;
pub mod report;
pub mod source;
pub mod stream;
pub mod transport;

pub use destination::{Arrived, Incoming, receive};
pub use error::{DeviceFailure, InterruptError, MigrationError, Result};
pub use machine::{DeviceSpec, Machine, Role};
pub use report::{MigrationParams, MigrationReport, Progress, Status};
pub use source::migrate;
