//! `vmig-devices`: sample devices served over vfio-user with the `vmig-vfio-user` framework.
//!
//! - [`dma_engine`]: writes stamped records into guest memory on its own at a programmed rate,
//!   like a NIC receiving packets, and migrates its state in v1 or v2.

pub mod dma_engine;

pub use dma_engine::DmaEngine;
