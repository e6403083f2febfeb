//! The primitives every vmig crate shares, at the bottom of the workspace so that the crates
//! above depend on it instead of on each other.
//!
//! What it owns:
//! - [`host_memory`]: host virtual memory that stays mapped while a value lives (an `mmap` of a
//!   memfd of guest RAM, an anonymous mapping, or one borrowed from the caller), and the sealed
//!   memfds guest RAM is shared through; the crate's only `unsafe` code;
//! - [`addr`]: the page size, the address newtypes ([`GuestAddress`], [`Iova`], [`PageNumber`],
//!   [`GuestRange`]) and the one page digest;
//! - [`uapi`]: the VFIO uAPI both VFIO worlds share (type1's structs and flags, the v1 migration
//!   region and its `device_state` bits);
//! - [`mig_state`]: the v2 `MigState` and its next-state table;
//! - [`description`]: a device described for people ([`DeviceDescription`]), which the
//!   vfio-user client and the kernel VFIO side both fill and the binary prints.
//!
//! What it leaves to others: every rule about mappings (vmig-dma), every transport (vfio-user,
//! ioctls), and what the memory holds.

pub mod addr;
pub mod description;
pub mod host_memory;
pub mod mig_state;
pub mod uapi;

pub use addr::{
    DmaRange, GuestAddress, GuestRange, Iova, PAGE_BYTES, PAGE_SHIFT, PAGE_SIZE, PageNumber,
    RegionArea, SPARSE_MAX_WORDS, SPARSE_WORD_BYTES, SparseWords, dense_digest, page_digest,
    sparse_digest,
};
pub use description::DeviceDescription;
pub use host_memory::{HostMemory, memfd, regular_file_size};
pub use mig_state::{ArcError, MigState};
