//! The VMM side of VFIO migration over the kernel's own VFIO, for real passthrough devices (a
//! NIC VF, a GPU, an NVMe controller bound to vfio-pci or a variant driver such as
//! mlx5-vfio-pci): the same interface `vmig-vfio-user` gives for devices served in userspace.
//!
//! What it owns:
//! - [`Container`]: a type1 v2 container: its capability chain ([`ContainerInfo`]: migration
//!   capability, IOVA ranges, DMA mappings available), map and unmap (guest RAM by the seed 003
//!   rules, [`mapping`]), dirty tracking start / stop / get-bitmap and unmap with the bitmap,
//!   with the kernel's stale-bit quirk kept from the caller;
//! - [`Device`]: a PCI device's regions (trapped reads and writes, mmap), config space, its
//!   interrupts through eventfds, reset, migration v2 (`MIG_DEVICE_STATE` with the data fd,
//!   `PRE_COPY`, precopy info) and device DMA logging, and [`Device::migration_blocker`], why a
//!   device cannot migrate;
//! - [`migration`]: a device's v2 migration in the steps the engine takes for every device;
//! - [`sys`]: the calls `vfio-ioctls` lacks, the crate's only `unsafe` code.
//!
//! What it leaves to others: which guest RAM to map and when (the VMM, `vmig-migration`),
//! merging the bitmaps with KVM's, and the migration stream. How its tests reach a real
//! kernel's VFIO (an emulated guest), the differential run against `vmig-dma` and the in-guest
//! benchmark are dev-only, in `crates/vmig-kernel-guest`, not part of this API.
//!
//! ```text
//!  VMM                         Container (type1 v2)              kernel
//!  open_device(bdf) ─────────► group joins, SET_IOMMU ─────────► /dev/vfio/N
//!  map_guest_memory(section) ─► plan (seed 003) ─► MAP_DMA ────► pins, IOMMU PTEs
//!  start_dirty_tracking ──────► DIRTY_PAGES START
//!  dirty_bitmap(iova, size) ◄── zeroed buffer, GET_BITMAP, keep only mapped pages
//!  device.set_migration_state(PreCopy/StopCopy) ─► data fd ─► read_state ─► stream
//! ```

pub mod container;
pub mod device;
mod error;
pub mod info;
pub mod mapping;
pub mod migration;
pub mod sys;

pub use container::{Container, availability};
pub use device::{Device, MigState, MigrationSupport, Region, describe};
pub use error::{Result, VfioError};
pub use info::ContainerInfo;
pub use mapping::{DmaMap, Section};
pub use migration::KernelMigration;
/// The VM's KVM VFIO device that [`Container::open`] registers groups with.
pub use vfio_ioctls::VfioDeviceFd;
