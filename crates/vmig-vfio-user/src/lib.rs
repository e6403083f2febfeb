//! `vmig-vfio-user`: the vfio-user protocol, the way a device is served from another process.
//!
//! This crate owns the wire format ([`wire`]: header, commands, payload structs with the C
//! layouts of the specification), the framing of messages on a UNIX stream socket with file
//! descriptors passed by `SCM_RIGHTS` ([`transport`]), and version and capability negotiation
//! ([`caps`]). The client, the device-server framework and migration arrive on top of it.
//!
//! ```text
//!  client (VMM)                                   server (device)
//!     │ VFIO_USER_VERSION {0.x, capabilities} ──────────►│
//!     │◄──────────────── {0.min(x,2), capabilities ⊆ proposed}
//!     │ DMA_MAP (+ fd of guest RAM) ───────────────────►│  mmap, device DMA is tracked
//!     │ DEVICE_GET_INFO / GET_REGION_INFO (+ fds) ─────►│
//!     │ REGION_READ / REGION_WRITE ────────────────────►│  BAR accesses
//!     │◄──────────────────────────── DMA_READ / DMA_WRITE  regions mapped without an fd
//!     │ DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE, DMA_LOGGING_*) ─►│
//!     │ MIG_DATA_READ / MIG_DATA_WRITE ────────────────►│
//! ```

pub mod caps;
pub mod client;
pub mod endpoint;
pub mod server;
mod sys;
pub mod transport;
pub mod wire;

pub use transport::{Channel, Message, TransportError};
