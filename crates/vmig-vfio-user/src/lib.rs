//! `vmig-vfio-user`: the vfio-user protocol, the way a device is served from another process,
//! with both of its ends.
//!
//! What it owns:
//! - the shared protocol: the wire format ([`wire`]: header, commands, payload structs with the
//!   C layouts of the specification), the framing of messages on a UNIX stream socket with file
//!   descriptors passed by `SCM_RIGHTS` ([`transport`]), one end of a connection carrying
//!   commands both ways with replies routed by `msg_id` ([`endpoint`]), and version and
//!   capability negotiation ([`caps`]);
//! - the VMM side, [`client`]: a client that drives any conformant server (regions, IRQs, DMA
//!   maps, v2 and v1 migration behind one [`client::DeviceMigration`], DMA logging and v1
//!   `DIRTY_PAGES`), serves the server's `DMA_READ` / `DMA_WRITE` from guest memory and
//!   records the pages they dirty, and describes the device for people;
//! - the device side, [`server`]: the [`server::Device`] trait and the framework that serves it
//!   (request decoding, DMA, IRQs, v2 and v1 migration, dirty logging, each in its own file).
//!
//! What it leaves to others: the mapping rules and dirty tracking of DMA (`vmig-dma`'s
//! `Iommu`, which holds the server's mappings whether backed by an fd or by messages), the
//! migration state table (`vmig-primitives`), the devices themselves (`vmig-devices`), and what
//! a migration does with the device state and dirty pages (`vmig-migration`).
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
