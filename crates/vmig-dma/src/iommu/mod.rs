//! The IOMMU: the table of IOVA → host memory mappings with the type1 rules, pinning, dirty
//! tracking and the device's DMA path.
//!
//! Locking: one `RwLock` over the mapping table. Map, unmap and START/STOP take it for writing;
//! the DMA path, pinning and GET_BITMAP take it for reading, so devices keep doing DMA while the
//! VMM harvests. Dirty bits are atomic ([`vmig_dirty::DirtyBitmap`]); pin reference counts sit
//! behind a small per-mapping mutex. Because unmap holds the write lock, no DMA can be in flight
//! into a mapping while it is harvested and removed: unmap-with-bitmap is atomic.
//!
//! The table and its rules live in `table`, pinning in `pin`, dirty tracking in `dirty`, and
//! the device's access path in `access`; this file holds the public types and the
//! constructor.

mod access;
mod dirty;
mod message;
mod pin;
mod table;

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmig_dirty::bitmap_bytes;

use crate::error::{Result, invalid};
use vmig_primitives::HostMemory;

pub use access::HostSlice;
pub use message::{MessageDma, MessageDmaError};
pub use pin::PinnedSegment;
use table::{State, Target};

/// Largest number of pages one mapping may have while dirty tracking is on: the kernel's
/// `DIRTY_BITMAP_PAGES_MAX` (`INT_MAX`).
pub const DIRTY_BITMAP_PAGES_MAX: u64 = i32::MAX as u64;
/// Largest dirty bitmap a caller may ask for, in bytes: `DIRTY_BITMAP_BYTES(INT_MAX)` = 256 MiB.
pub const DIRTY_BITMAP_SIZE_MAX: u64 = bitmap_bytes(DIRTY_BITMAP_PAGES_MAX);
/// The type1 default `dma_entry_limit`.
pub const DEFAULT_DMA_ENTRY_LIMIT: u32 = u16::MAX as u32;
/// Most pages one pin call may take (`VFIO_PIN_PAGES_MAX_ENTRIES`).
pub const PIN_PAGES_MAX: u64 = 512;
/// Largest minimum page size (1 TiB): page counts of any IOVA range then fit in 64 bits with
/// room to shift.
const MAX_PAGE_SHIFT: u32 = 40;
/// How many times unmap asks the owners of pinned pages to unpin before giving up with `EBUSY`.
const UNMAP_NOTIFY_ATTEMPTS: u32 = 8;

/// Which type1 ABI the IOMMU speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuType {
    /// `VFIO_TYPE1_IOMMU`: unmap may start inside a mapping (and then unmaps nothing); no dirty
    /// tracking (`EACCES`), no pinning.
    Type1,
    /// `VFIO_TYPE1v2_IOMMU`: unmap never splits a mapping; dirty tracking and pinning.
    Type1v2,
}

/// An inclusive IOVA range `[start, last]`, so that a range may end at `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub last: u64,
}

/// How the IOMMU is set up.
#[derive(Debug, Clone)]
pub struct IommuConfig {
    /// Type1 or type1 v2.
    pub iommu_type: IommuType,
    /// Page sizes the IOMMU maps (`iova_pgsizes`); the lowest bit is the minimum page size,
    /// the alignment of every map and the page size of every dirty bitmap.
    pub pgsize_bitmap: u64,
    /// The IOVA ranges that may be mapped (the address-space limit, the kernel's `iova_list`).
    pub iova_ranges: Vec<IovaRange>,
    /// Most mappings at once (`dma_entry_limit`).
    pub dma_entry_limit: u32,
    /// Most pages pinned at once, `None` for no limit (`RLIMIT_MEMLOCK` in pages).
    pub locked_pages_limit: Option<u64>,
    /// Most bytes of dirty bitmaps the IOMMU may allocate while tracking.
    pub dirty_bitmap_memory_limit: u64,
}

impl Default for IommuConfig {
    /// Type1 v2, 4 KiB / 2 MiB / 1 GiB pages, the whole 64-bit IOVA space, 65535 mappings, no
    /// pin limit.
    fn default() -> Self {
        Self {
            iommu_type: IommuType::Type1v2,
            pgsize_bitmap: 0x4020_1000,
            iova_ranges: vec![IovaRange {
                start: 0,
                last: u64::MAX,
            }],
            dma_entry_limit: DEFAULT_DMA_ENTRY_LIMIT,
            locked_pages_limit: None,
            dirty_bitmap_memory_limit: u64::MAX,
        }
    }
}

/// Access rights of a mapping, as the `VFIO_DMA_MAP_FLAG_READ` / `_WRITE` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prot(u32);

impl Prot {
    /// The device may read.
    pub const READ: Prot = Prot(1);
    /// The device may write.
    pub const WRITE: Prot = Prot(2);
    /// Read and write.
    pub const READ_WRITE: Prot = Prot(3);

    /// From the map flag bits (bit 0 read, bit 1 write); other bits are refused.
    pub fn from_bits(bits: u32) -> Result<Prot> {
        if bits & !3 != 0 {
            return invalid!("protection bits {bits:#x}: only READ (1) and WRITE (2) exist");
        }
        Ok(Prot(bits))
    }

    /// The flag bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every right of `other` is in `self`.
    pub fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What a mapping points at.
#[derive(Debug)]
pub enum Backing<'a> {
    /// Bytes `[offset, offset+size)` of a file (a memfd of guest RAM), which the IOMMU maps.
    Fd {
        /// The file.
        fd: BorrowedFd<'a>,
        /// Offset of the mapping's first byte in the file; a multiple of the minimum page size.
        offset: u64,
    },
    /// Bytes `[offset, offset+size)` of host memory the caller already has mapped.
    Memory {
        /// The memory.
        memory: Arc<HostMemory>,
        /// Offset of the mapping's first byte; a multiple of the minimum page size.
        offset: u64,
    },
    /// Memory the IOMMU cannot map, in another process that carries each access itself (a
    /// vfio-user client's `DMA_READ` / `DMA_WRITE`). Mapped under the same rules; not pinnable,
    /// not handed out as host slices, and not dirty-tracked (the owner sees every write).
    Message(Arc<dyn MessageDma>),
}

/// Whether a device that uses the IOMMU can write guest memory without the IOMMU seeing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Does DMA straight into mapped memory (a passthrough device): until it pins pages, every
    /// mapped page is reported dirty while tracking is on.
    Direct,
    /// Reaches memory only through pinning or the IOMMU's read/write helpers (a mediated
    /// device): only what it pins or writes is dirty.
    Mediated,
}

/// Handle of an attached group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(u64);

/// Called with the range an unmap covers (inclusive, so an unmap of everything is
/// `[0, u64::MAX]`) when pages in it are pinned. It must unpin the group's pages in that range
/// before it returns (as a vendor driver's unmap notifier does): the unmap asks a few times and
/// then fails with `EBUSY` rather than wait forever.
pub type UnmapNotifier = Arc<dyn Fn(IovaRange) + Send + Sync>;

/// Whether a dirty-bitmap read clears what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyRead {
    /// Read and clear: each dirty page is reported once (pinned pages every time).
    Clear,
    /// Read only: the next read reports the same pages again.
    Keep,
}

/// Flags of a plain unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmapScope {
    /// Unmap the whole mappings inside `[iova, iova+size)`.
    Range,
    /// `VFIO_DMA_UNMAP_FLAG_ALL`: unmap everything; iova and size must be 0.
    All,
}

/// The migration capability (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`, version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationCap {
    /// Always 0.
    pub flags: u32,
    /// The one page size dirty bitmaps use: the minimum IOMMU page size.
    pub pgsize_bitmap: u64,
    /// Largest bitmap a caller may ask for, in bytes.
    pub max_dirty_bitmap_size: u64,
}

/// What `VFIO_IOMMU_GET_INFO` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported page sizes.
    pub iova_pgsizes: u64,
    /// The migration capability. Linux reports it on type1 v1 containers too, although their
    /// DIRTY_PAGES calls fail with `EACCES`.
    pub migration: MigrationCap,
    /// How many more mappings may be created.
    pub dma_avail: u32,
    /// The IOVA ranges that may be mapped.
    pub iova_ranges: Vec<IovaRange>,
}

/// One mapping, as listed by [`Iommu::mappings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingInfo {
    /// First IOVA.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Access rights.
    pub prot: Prot,
    /// Reached by messages to the memory's owner ([`Backing::Message`]).
    pub by_message: bool,
}

/// A userspace IOMMU with the VFIO type1 semantics. Share it between the VMM side (map, unmap,
/// dirty tracking) and device threads (DMA) with an `Arc`.
pub struct Iommu {
    config: IommuConfig,
    min_page: u64,
    page_shift: u32,
    state: RwLock<State>,
    locked_pages: AtomicU64,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field("config", &self.config)
            .field("mappings", &self.mapping_count())
            .field("tracking", &self.is_tracking())
            .finish()
    }
}

/// An offset or length inside a host mapping, as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "bounded by the length of a HostMemory, which is a usize"
)]
fn host_len(value: u64) -> usize {
    value as usize
}

/// A count of bitmap words the caller's buffer holds, as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked against the length of the caller's slice, which is a usize"
)]
fn buffer_words(words: u64) -> usize {
    words as usize
}

/// The last byte of `[start, start+size)`, or `None` when `size` is 0 or the range wraps past
/// `u64::MAX` (a range may end exactly at `u64::MAX`).
pub fn checked_last(start: u64, size: u64) -> Option<u64> {
    size.checked_sub(1).and_then(|s| start.checked_add(s))
}

impl Iommu {
    /// An empty IOMMU.
    pub fn new(config: IommuConfig) -> Result<Self> {
        if config.pgsize_bitmap == 0 {
            return invalid!("pgsize_bitmap is 0: at least one page size is required");
        }
        let page_shift = config.pgsize_bitmap.trailing_zeros();
        if !(12..=MAX_PAGE_SHIFT).contains(&page_shift) {
            return invalid!(
                "minimum page size {:#x}: expected 4 KiB to {:#x}",
                1u64 << page_shift,
                1u64 << MAX_PAGE_SHIFT
            );
        }
        if config.iova_ranges.iter().any(|r| r.last < r.start) {
            return invalid!(
                "an IOVA range ends before it starts: {:?}",
                config.iova_ranges
            );
        }
        Ok(Self {
            min_page: 1 << page_shift,
            page_shift,
            config,
            state: RwLock::new(State::default()),
            locked_pages: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// The minimum page size: the alignment of every map and the page of every dirty bitmap.
    pub fn min_page_size(&self) -> u64 {
        self.min_page
    }

    fn lock_read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// What `VFIO_IOMMU_GET_INFO` reports.
    pub fn info(&self) -> IommuInfo {
        let state = self.lock_read();
        IommuInfo {
            iova_pgsizes: self.config.pgsize_bitmap,
            migration: MigrationCap {
                flags: 0,
                pgsize_bitmap: self.min_page,
                max_dirty_bitmap_size: DIRTY_BITMAP_SIZE_MAX,
            },
            dma_avail: self.dma_avail(&state),
            iova_ranges: self.config.iova_ranges.clone(),
        }
    }

    fn dma_avail(&self, state: &State) -> u32 {
        self.config
            .dma_entry_limit
            .saturating_sub(u32::try_from(state.mappings.len()).unwrap_or(u32::MAX))
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.lock_read().mappings.len()
    }

    /// The mappings, by ascending IOVA.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.lock_read()
            .mappings
            .values()
            .map(|m| MappingInfo {
                iova: m.iova,
                size: m.size,
                prot: m.prot,
                by_message: matches!(m.target, Target::Message(_)),
            })
            .collect()
    }

    /// Pages currently pinned (charged against `locked_pages_limit`).
    pub fn locked_pages(&self) -> u64 {
        self.locked_pages.load(Ordering::Acquire)
    }

    /// Whether dirty tracking is on.
    pub fn is_tracking(&self) -> bool {
        self.lock_read().tracking
    }

    /// Refuses `value` (the `field` of a `what` request) unless it is page aligned.
    fn check_aligned(&self, what: &str, field: &str, value: u64) -> Result<()> {
        if value & (self.min_page - 1) != 0 {
            return invalid!(
                "{what} {field} {value:#x} is not a multiple of the minimum page size {:#x}",
                self.min_page
            );
        }
        Ok(())
    }

    /// Checks `[iova, iova+size)` is non-empty, page aligned and does not wrap; returns its
    /// last byte.
    fn check_range(&self, what: &str, iova: u64, size: u64) -> Result<u64> {
        if size == 0 {
            return invalid!("{what} size is 0");
        }
        self.check_aligned(what, "iova", iova)?;
        self.check_aligned(what, "size", size)?;
        checked_last(iova, size).map_or_else(
            || {
                invalid!(
                    "{what} [{iova:#x}, +{size:#x}) wraps past the end of the 64-bit IOVA space"
                )
            },
            Ok,
        )
    }
}
