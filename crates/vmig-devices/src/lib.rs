//! `vmig-devices`: sample devices served over vfio-user with the `vmig-vfio-user` framework,
//! and, next to each, what the VMM side needs to know about it.
//!
//! - [`dma_engine`]: writes stamped records into guest memory on its own at a programmed rate,
//!   like a NIC receiving packets, and migrates its state in v1 or v2; its guest driver
//!   ([`dma_engine::driver`]: ring setup, the guest's doorbell, the check of every record after
//!   a migration) is written against two small traits, so that the migration engine never
//!   names the device: the `vmig` binary and the tests plug the driver into the engine. In
//!   its seed 002 form (a mappable doorbell page, DMA that nothing tracks) its migration
//!   mediator ([`dma_engine::mediator`]) tells a migration which buffers it writes, from the
//!   doorbell writes the VMM traps during the migration.
//!
//! It leaves the protocol to `vmig-vfio-user`, DMA rules to `vmig-dma`, and everything about a
//! VM or a migration to the crates above it.

pub mod dma_engine;

pub use dma_engine::DmaEngine;
