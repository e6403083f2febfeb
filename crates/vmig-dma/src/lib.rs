//! A userspace IOMMU with the exact semantics of the kernel's VFIO type1 driver, including the
//! dirty-page tracking that live migration of devices needs.
//!
//! A device server (for example a vfio-user server) embeds an [`Iommu`] as its DMA layer: the
//! VMM's map and unmap requests go into it, the device's DMA goes through it
//! ([`Iommu::read`], [`Iommu::write`], [`Iommu::with_host_slices`], [`Iommu::pin_pages`]), and
//! so every page a device writes is recorded while tracking is on. The VMM side asks for those
//! pages as the kernel's `VFIO_IOMMU_DIRTY_PAGES` and unmap-with-bitmap deliver them.
//!
//! What it owns:
//! - the mapping table and its type1 rules, for mappings backed by an fd, by host memory, or
//!   by messages to the memory's owner ([`Backing::Message`]: the IOMMU checks and routes the
//!   access, the owner's [`MessageDma`] carries it; no pinning, no dirty bits, since the owner
//!   sees every write): alignment to the minimum page size, no zero sizes,
//!   overlap is `EEXIST`, unmap never splits a mapping, at most 65535 mappings (`ENOSPC`), the
//!   allowed IOVA ranges, and all range arithmetic on inclusive last bytes so that a range may
//!   end at `u64::MAX` (seed 003);
//! - pinning with reference counts and locked-memory accounting, and the pinned-page dirty
//!   scope of seed 000 patch 7 ([`GroupKind`]);
//! - dirty tracking: START / STOP (idempotent, unwound on failure), GET_BITMAP over whole
//!   mappings with holes, read-and-clear or read-only, unmap that returns the bitmap of what it
//!   removed atomically, and the migration capability;
//! - the kernel uAPI in [`uapi`]: the C structs and handlers that decode raw ioctl arguments
//!   with the kernel's `argsz`, flag and errno rules.
//!
//! What it leaves to others: the transport that carries requests (vfio-user, ioctls) and the
//! messages a message-backed access becomes (the vfio-user server's `DMA_READ` / `DMA_WRITE`),
//! the guest-physical meaning of an IOVA, and merging the bits with the CPU's
//! (vmig-migration).
//!
//! ```text
//!  VMM                       Iommu                         device threads
//!  map(iova, size, fd) ───► table (RwLock) ◄── read/write/pin ── DMA
//!  start_dirty_tracking ──► per-mapping DirtyBitmap ◄── marks (1 atomic op per page)
//!  get_dirty_bitmap ◄────── read-and-clear + pinned pages
//!  unmap_with_dirty_bitmap ◄ harvest + remove under the write lock (no DMA in flight)
//! ```
//!
//! Every refusal is a [`DmaError`] whose [`DmaError::errno`] is what the kernel returns and
//! whose message says what was wrong.
//!
//! ```
//! use std::os::fd::AsFd;
//! use vmig_dma::{Backing, DirtyRead, Iommu, IommuConfig, Prot};
//! use vmig_primitives::{Iova, PAGE_BYTES, PAGE_SIZE};
//!
//! let iommu = Iommu::new(IommuConfig::default())?;  // type1 v2, 4K/2M/1G, 65535 mappings
//! let ram = vmig_primitives::memfd("guest-ram", 1 << 30)?; // the VMM shares guest RAM by fd
//! iommu.map(Iova(0), 1 << 30, Backing::Fd { fd: ram.as_fd(), offset: 0 }, Prot::READ_WRITE)?;
//! iommu.start_dirty_tracking()?;
//! iommu.write(Iova(0x1000), b"a packet")?; // device DMA: lands, then marks its page dirty
//! let mut bitmap = vec![0u64; (1 << 30) / PAGE_BYTES / 64];
//! iommu.get_dirty_bitmap(Iova(0), 1 << 30, PAGE_SIZE, &mut bitmap, DirtyRead::Clear)?;
//! assert_eq!(bitmap[0], 0b10); // page 1 is dirty
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod iommu;
pub mod uapi;

pub use error::{DmaError, Result};
pub use iommu::{
    Backing, DEFAULT_DMA_ENTRY_LIMIT, DIRTY_BITMAP_PAGES_MAX, DIRTY_BITMAP_SIZE_MAX, DirtyRead,
    GroupId, GroupKind, HostSlice, Iommu, IommuConfig, IommuInfo, IommuType, IovaRange,
    MappingInfo, MessageDma, MessageDmaError, MigrationCap, PIN_PAGES_MAX, PinnedSegment, Prot,
    UnmapNotifier, UnmapScope, checked_last,
};
