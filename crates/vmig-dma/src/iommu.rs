//! The IOMMU: the table of IOVA → host memory mappings with the type1 rules, pinning, dirty
//! tracking and the device's DMA path.
//!
//! Locking: one `RwLock` over the mapping table. Map, unmap and START/STOP take it for writing;
//! the DMA path, pinning and GET_BITMAP take it for reading, so devices keep doing DMA while the
//! VMM harvests. Dirty bits are atomic ([`vmig_dirty::DirtyBitmap`]); pin reference counts sit
//! behind a small per-mapping mutex. Because unmap holds the write lock, no DMA can be in flight
//! into a mapping while it is harvested and removed: unmap-with-bitmap is atomic.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmig_dirty::{DirtyBitmap, bitmap_bytes, words_for};

use crate::error::{DmaError, Result, invalid};
use vmig_primitives::{HostMemory, regular_file_size};

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
}

/// A run of host memory that a range of IOVA translates to, valid inside
/// [`Iommu::with_host_slices`].
#[derive(Debug)]
pub struct HostSlice<'a> {
    memory: &'a HostMemory,
    offset: usize,
    len: usize,
    iova: u64,
}

impl HostSlice<'_> {
    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Host address of the first byte, for code that must hand a pointer to another API.
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.as_ptr().wrapping_add(self.offset)
    }
    /// Copies from the slice at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.bounds(offset, buf.len())?;
        self.memory
            .read(self.offset + offset, buf)
            .map_err(|e| DmaError::os("reading host memory", e))
    }
    /// Copies `data` into the slice at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.bounds(offset, data.len())?;
        self.memory
            .write(self.offset + offset, data)
            .map_err(|e| DmaError::os("writing host memory", e))
    }
    fn bounds(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => invalid!(
                "[{offset:#x}, +{len:#x}) is outside a slice of {:#x} bytes",
                self.len
            ),
        }
    }
}

/// Pinned pages: host memory that is reported dirty on every bitmap read while pinned, and once
/// more after [`Iommu::unpin_pages`]. The memory itself stays mapped as long as a segment
/// lives, but writes made through it after the unpin are not tracked: unpin only when done.
#[derive(Debug, Clone)]
pub struct PinnedSegment {
    memory: Arc<HostMemory>,
    offset: usize,
    len: usize,
    iova: u64,
}

impl PinnedSegment {
    /// The pinned memory, for reading and writing it.
    pub fn slice(&self) -> HostSlice<'_> {
        HostSlice {
            memory: &self.memory,
            offset: self.offset,
            len: self.len,
            iova: self.iova,
        }
    }
}

struct Mapping {
    iova: u64,
    size: u64,
    prot: Prot,
    memory: Arc<HostMemory>,
    /// Offset of the mapping's first byte in `memory`.
    offset: usize,
    /// Pages dirtied since the last read, while tracking is on.
    dirty: Option<DirtyBitmap>,
    /// Pin reference counts by page index within the mapping.
    pins: Mutex<BTreeMap<u64, u32>>,
}

impl Mapping {
    fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }
    fn pins(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u32>> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Group {
    kind: GroupKind,
    devices: u32,
    /// Set by the group's first successful pin: from then on only pinned pages are its dirt.
    pinned_scope: AtomicBool,
    notifier: Option<UnmapNotifier>,
}

#[derive(Default)]
struct State {
    mappings: BTreeMap<u64, Mapping>,
    tracking: bool,
    groups: BTreeMap<GroupId, Group>,
    next_group: u64,
    bitmap_bytes: u64,
}

impl State {
    /// The mapping that contains `iova`.
    fn find(&self, iova: u64) -> Option<&Mapping> {
        self.mappings
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.last() >= iova)
    }

    /// Start IOVAs of the mappings that overlap `[iova, last]`, ascending.
    fn overlapping(&self, iova: u64, last: u64) -> Vec<u64> {
        let first = self.find(iova).map_or(iova, |m| m.iova);
        self.mappings.range(first..=last).map(|(k, _)| *k).collect()
    }

    /// Whether every page of every mapping must be reported dirty: a direct-DMA group is
    /// attached that has never pinned (the pinned-page dirty scope of patch 7 does not hold).
    fn all_dirty(&self) -> bool {
        self.groups
            .values()
            .any(|g| g.kind == GroupKind::Direct && !g.pinned_scope.load(Ordering::Acquire))
    }

    /// Refuses a range that starts or ends inside a mapping.
    fn check_no_bisect(&self, iova: u64, last: u64, what: &str) -> Result<()> {
        if let Some(m) = self.find(iova).filter(|m| m.iova != iova) {
            return invalid!(
                "{what} [{iova:#x}, {last:#x}] starts inside the mapping [{:#x}, {:#x}]: ranges must cover whole mappings",
                m.iova,
                m.last()
            );
        }
        if let Some(m) = self.find(last).filter(|m| m.last() != last) {
            return invalid!(
                "{what} [{iova:#x}, {last:#x}] ends inside the mapping [{:#x}, {:#x}]: ranges must cover whole mappings",
                m.iova,
                m.last()
            );
        }
        Ok(())
    }
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
            .saturating_sub(state.mappings.len() as u32)
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

    fn new_bitmap(&self, state: &State, pages: u64, extra_bytes: u64) -> Result<DirtyBitmap> {
        if pages > DIRTY_BITMAP_PAGES_MAX {
            return invalid!(
                "a mapping of {pages} pages cannot be dirty-tracked: the limit is {DIRTY_BITMAP_PAGES_MAX} pages per mapping"
            );
        }
        let bytes = bitmap_bytes(pages);
        let in_use = state.bitmap_bytes.saturating_add(extra_bytes);
        if in_use.saturating_add(bytes) > self.config.dirty_bitmap_memory_limit {
            return Err(DmaError::NoMemory(format!(
                "a dirty bitmap of {bytes} bytes would exceed the dirty-bitmap memory limit of {} bytes ({in_use} in use)",
                self.config.dirty_bitmap_memory_limit
            )));
        }
        DirtyBitmap::try_new(pages).map_err(|e| DmaError::NoMemory(e.to_string()))
    }

    /// Maps `[iova, iova+size)` to `backing` with rights `prot` (`VFIO_IOMMU_MAP_DMA`).
    pub fn map(&self, iova: u64, size: u64, backing: Backing<'_>, prot: Prot) -> Result<()> {
        if prot.bits() & Prot::READ_WRITE.bits() == 0 {
            return invalid!("a mapping needs READ or WRITE access, got neither");
        }
        let last = self.check_range("map", iova, size)?;
        let (backing_offset, fd) = match &backing {
            Backing::Fd { fd, offset } => (*offset, Some(*fd)),
            Backing::Memory { offset, .. } => (*offset, None),
        };
        self.check_aligned("map", "backing offset", backing_offset)?;
        if !self
            .config
            .iova_ranges
            .iter()
            .any(|r| r.start <= iova && last <= r.last)
        {
            return invalid!(
                "[{iova:#x}, {last:#x}] is not inside one of the IOMMU's IOVA ranges {:?}",
                self.config.iova_ranges
            );
        }
        let backing_end = backing_offset.checked_add(size);
        if let Some(fd) = fd {
            let file_size =
                regular_file_size(fd).map_err(|e| DmaError::os("fstat of the backing fd", e))?;
            if let Some(file_size) = file_size
                && backing_end.is_none_or(|end| end > file_size)
            {
                return Err(DmaError::Fault(format!(
                    "the backing file is {file_size:#x} bytes; the mapping needs [{backing_offset:#x}, +{size:#x})"
                )));
            }
        }
        // Cheap refusals first, under the lock, before creating a host mapping.
        self.check_insertable(&self.lock_read(), iova, last)?;
        let (memory, offset) = match backing {
            Backing::Fd { fd, offset } => {
                let writable = prot.contains(Prot::WRITE);
                let memory = HostMemory::map_fd(fd, offset, size, writable).map_err(|e| {
                    if writable && e.raw_os_error() == Some(libc::EACCES) {
                        DmaError::Perm(format!(
                            "a writable mapping at iova {iova:#x} needs an fd open for writing"
                        ))
                    } else {
                        DmaError::os(format!("mmap of the backing fd for iova {iova:#x}"), e)
                    }
                })?;
                (Arc::new(memory), 0)
            }
            Backing::Memory { memory, offset } => {
                if backing_end.is_none_or(|end| end > memory.len() as u64) {
                    return Err(DmaError::Fault(format!(
                        "the host memory is {:#x} bytes; the mapping needs [{offset:#x}, +{size:#x})",
                        memory.len()
                    )));
                }
                if prot.contains(Prot::WRITE) && !memory.is_writable() {
                    return Err(DmaError::Perm(
                        "a writable mapping needs writable host memory".into(),
                    ));
                }
                (memory, offset as usize)
            }
        };
        let mut state = self.lock_write();
        self.check_insertable(&state, iova, last)?;
        let dirty = if state.tracking {
            let bitmap = self.new_bitmap(&state, size >> self.page_shift, 0)?;
            state.bitmap_bytes += bitmap_bytes(bitmap.pages());
            Some(bitmap)
        } else {
            None
        };
        state.mappings.insert(
            iova,
            Mapping {
                iova,
                size,
                prot,
                memory,
                offset,
                dirty,
                pins: Mutex::new(BTreeMap::new()),
            },
        );
        Ok(())
    }

    fn check_insertable(&self, state: &State, iova: u64, last: u64) -> Result<()> {
        if let Some(m) = state
            .mappings
            .range(..=last)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.last() >= iova)
        {
            return Err(DmaError::Exists(format!(
                "[{iova:#x}, {last:#x}] overlaps the mapping [{:#x}, {:#x}]",
                m.iova,
                m.last()
            )));
        }
        if self.dma_avail(state) == 0 {
            return Err(DmaError::NoSpace(format!(
                "the limit of {} mappings is reached",
                self.config.dma_entry_limit
            )));
        }
        Ok(())
    }

    /// Unmaps whole mappings (`VFIO_IOMMU_UNMAP_DMA`); returns the bytes unmapped. With
    /// [`UnmapScope::All`], `iova` and `size` must be 0. Dirty state of what is unmapped is
    /// discarded: use [`Iommu::unmap_with_dirty_bitmap`] to collect it.
    pub fn unmap(&self, iova: u64, size: u64, scope: UnmapScope) -> Result<u64> {
        let mut state = match scope {
            UnmapScope::All => {
                if iova != 0 || size != 0 {
                    return invalid!(
                        "unmap ALL takes iova 0 and size 0, got iova {iova:#x} size {size:#x}"
                    );
                }
                self.lock_unpinned(0, u64::MAX, |_| Ok(()))?
            }
            UnmapScope::Range => {
                let last = self.check_range("unmap", iova, size)?;
                self.lock_unpinned(iova, last, |state| {
                    if self.config.iommu_type == IommuType::Type1v2 {
                        state.check_no_bisect(iova, last, "unmap")?;
                    }
                    Ok(())
                })?
            }
        };
        let (first, last) = match scope {
            UnmapScope::All => (0, u64::MAX),
            UnmapScope::Range => (iova, iova + (size - 1)),
        };
        let mut victims = state.overlapping(first, last);
        if self.config.iommu_type == IommuType::Type1 {
            // Type1 v1: a request that starts inside a mapping unmaps nothing; a mapping that
            // starts inside the request goes whole, even past its end.
            if victims.first().is_some_and(|&v| v < first) {
                return Ok(0);
            }
        } else {
            victims.retain(|&v| v >= first);
        }
        let mut unmapped = 0u64;
        for start in victims {
            if let Some(m) = state.mappings.remove(&start) {
                self.release(&mut state, &m);
                unmapped = unmapped.saturating_add(m.size);
            }
        }
        Ok(unmapped)
    }

    fn release(&self, state: &mut State, m: &Mapping) {
        if let Some(bitmap) = &m.dirty {
            state.bitmap_bytes -= bitmap_bytes(bitmap.pages());
        }
    }

    /// Takes the write lock once no page in `[iova, last]` is pinned, asking the groups' unmap
    /// notifiers to unpin first (the kernel notifies vendor drivers the same way).
    /// `validate` runs under the lock first, so an invalid request never disturbs the pinners.
    fn lock_unpinned(
        &self,
        iova: u64,
        last: u64,
        validate: impl Fn(&State) -> Result<()>,
    ) -> Result<RwLockWriteGuard<'_, State>> {
        for _ in 0..UNMAP_NOTIFY_ATTEMPTS {
            let state = self.lock_write();
            validate(&state)?;
            let pinned = state
                .overlapping(iova, last)
                .iter()
                .any(|k| !state.mappings[k].pins().is_empty());
            if !pinned {
                return Ok(state);
            }
            let notifiers: Vec<UnmapNotifier> = state
                .groups
                .values()
                .filter_map(|g| g.notifier.clone())
                .collect();
            drop(state);
            if notifiers.is_empty() {
                break;
            }
            for notify in notifiers {
                notify(IovaRange { start: iova, last });
            }
        }
        Err(DmaError::Busy(format!(
            "pages in [{iova:#x}, {last:#x}] are still pinned: their users must unpin before the range is unmapped"
        )))
    }

    /// Starts dirty tracking (`VFIO_IOMMU_DIRTY_PAGES_FLAG_START`). Starting while started
    /// succeeds and changes nothing. On failure nothing is allocated and tracking stays off.
    pub fn start_dirty_tracking(&self) -> Result<()> {
        self.check_v2("dirty page tracking")?;
        let mut state = self.lock_write();
        if state.tracking {
            return Ok(());
        }
        let mut bitmaps = Vec::with_capacity(state.mappings.len());
        let mut bytes = 0u64;
        for m in state.mappings.values() {
            let bitmap = self.new_bitmap(&state, m.size >> self.page_shift, bytes)?;
            for &page in m.pins().keys() {
                let _ = bitmap.set(page);
            }
            bytes += bitmap_bytes(bitmap.pages());
            bitmaps.push(bitmap);
        }
        for (m, bitmap) in state.mappings.values_mut().zip(bitmaps) {
            m.dirty = Some(bitmap);
        }
        state.bitmap_bytes += bytes;
        state.tracking = true;
        Ok(())
    }

    /// Stops dirty tracking and frees the bitmaps (`VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`).
    /// Stopping while stopped succeeds.
    pub fn stop_dirty_tracking(&self) -> Result<()> {
        self.check_v2("dirty page tracking")?;
        let mut state = self.lock_write();
        state.tracking = false;
        for m in state.mappings.values_mut() {
            m.dirty = None;
        }
        state.bitmap_bytes = 0;
        Ok(())
    }

    fn check_v2(&self, what: &str) -> Result<()> {
        if self.config.iommu_type != IommuType::Type1v2 {
            return Err(DmaError::Access(format!(
                "{what} needs a type1 v2 IOMMU (VFIO_TYPE1v2_IOMMU)"
            )));
        }
        Ok(())
    }

    /// Checks a caller's bitmap for `size` bytes of IOVA at `pgsize` pages; returns the number
    /// of pages (the kernel's `verify_bitmap_size`).
    fn check_bitmap(&self, size: u64, pgsize: u64, bitmap_len_bytes: u64) -> Result<u64> {
        if pgsize == 0 || !pgsize.is_power_of_two() {
            return invalid!(
                "bitmap page size {pgsize:#x} is not a power of two; the IOMMU reports at {:#x}",
                self.min_page
            );
        }
        let pages = size >> pgsize.trailing_zeros();
        if pages == 0 {
            return invalid!("the range of {size:#x} bytes holds no page of {pgsize:#x} bytes");
        }
        if bitmap_len_bytes == 0 {
            return invalid!("the bitmap buffer is empty");
        }
        if bitmap_len_bytes > DIRTY_BITMAP_SIZE_MAX {
            return invalid!(
                "a bitmap of {bitmap_len_bytes} bytes exceeds max_dirty_bitmap_size ({DIRTY_BITMAP_SIZE_MAX} bytes)"
            );
        }
        if bitmap_len_bytes < bitmap_bytes(pages) {
            return invalid!(
                "{pages} pages need a bitmap of {} bytes (whole 64-bit words), got {bitmap_len_bytes}",
                bitmap_bytes(pages)
            );
        }
        Ok(pages)
    }

    fn check_pgsize(&self, pgsize: u64) -> Result<()> {
        if pgsize != self.min_page {
            return invalid!(
                "bitmap page size {pgsize:#x}: dirty bitmaps are reported only at the minimum page size {:#x}",
                self.min_page
            );
        }
        Ok(())
    }

    /// Places the dirty bits of mapping `m` into `out` (bit 0 = `base`), reading and clearing
    /// its bitmap when `mode` is [`DirtyRead::Clear`]; pinned pages are always reported.
    fn collect_mapping(
        &self,
        m: &Mapping,
        all_dirty: bool,
        base: u64,
        out: &mut [u64],
        mode: DirtyRead,
    ) {
        let Some(bitmap) = &m.dirty else { return };
        let out_bit = (m.iova - base) >> self.page_shift;
        let pages = bitmap.pages();
        // The pin lock orders this read against unpin, which sets the page's bit as it drops
        // the last reference: a page is either still pinned here or its bit is set.
        let pins = m.pins();
        let result = if all_dirty {
            // Every page is reported; what the bitmap held is consumed all the same.
            if mode == DirtyRead::Clear {
                let _ = bitmap.clear_range(0, pages);
            }
            set_bits(out, out_bit, pages);
            Ok(())
        } else if mode == DirtyRead::Clear {
            bitmap.harvest_range_into(0, pages, out, out_bit)
        } else {
            bitmap.export_range_into(0, pages, out, out_bit)
        };
        debug_assert!(result.is_ok(), "bitmap transfer out of bounds: {result:?}");
        for &page in pins.keys() {
            set_bits(out, out_bit + page, 1);
        }
    }

    /// The checks of a bitmap request that need the lock, in the kernel's order: page size,
    /// range, tracking on, no mapping split. Returns the range's last byte.
    fn check_bitmap_request(
        &self,
        state: &State,
        iova: u64,
        size: u64,
        pgsize: u64,
    ) -> Result<u64> {
        self.check_pgsize(pgsize)?;
        let last = self.check_range("dirty bitmap", iova, size)?;
        if !state.tracking {
            return invalid!("dirty tracking is not started: START before asking for a bitmap");
        }
        state.check_no_bisect(iova, last, "dirty bitmap range")?;
        Ok(last)
    }

    /// Runs every check of a GET_BITMAP or unmap-with-bitmap request for a bitmap of
    /// `bitmap_len_bytes` bytes without doing it, and returns how many mappings the range
    /// covers: a front end that must write the bits to memory it does not own (a user pointer)
    /// checks that memory only after this, as the kernel does.
    pub fn check_dirty_bitmap_request(
        &self,
        iova: u64,
        size: u64,
        pgsize: u64,
        bitmap_len_bytes: u64,
    ) -> Result<usize> {
        self.check_bitmap(size, pgsize, bitmap_len_bytes)?;
        let state = self.lock_read();
        let last = self.check_bitmap_request(&state, iova, size, pgsize)?;
        Ok(state.mappings.range(iova..=last).count())
    }

    /// Reads the dirty pages of `[iova, iova+size)` into `bitmap` (bit *i* = page
    /// `iova + i * pgsize`), `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`. The range must consist of
    /// whole mappings; holes are allowed and read as clean. `pgsize` must be the minimum page
    /// size. The first `DIRTY_BITMAP_BYTES(pages)` bytes of `bitmap` are overwritten (the caller
    /// need not zero them), the rest is left alone.
    pub fn get_dirty_bitmap(
        &self,
        iova: u64,
        size: u64,
        pgsize: u64,
        bitmap: &mut [u64],
        mode: DirtyRead,
    ) -> Result<()> {
        self.check_v2("dirty page tracking")?;
        let pages = self.check_bitmap(size, pgsize, bitmap.len() as u64 * 8)?;
        let state = self.lock_read();
        let last = self.check_bitmap_request(&state, iova, size, pgsize)?;
        let out = &mut bitmap[..words_for(pages) as usize];
        out.fill(0);
        let all_dirty = state.all_dirty();
        for (_, m) in state.mappings.range(iova..=last) {
            self.collect_mapping(m, all_dirty, iova, out, mode);
        }
        Ok(())
    }

    /// Unmaps the whole mappings in `[iova, iova+size)` and returns their dirty pages in
    /// `bitmap` (as [`Iommu::get_dirty_bitmap`]) in one step: no device write between the read
    /// and the unmap can be lost (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`). Returns the bytes
    /// unmapped. Nothing is unmapped when it fails.
    pub fn unmap_with_dirty_bitmap(
        &self,
        iova: u64,
        size: u64,
        pgsize: u64,
        bitmap: &mut [u64],
    ) -> Result<u64> {
        let pages = self.check_bitmap(size, pgsize, bitmap.len() as u64 * 8)?;
        let last = self.check_range("unmap", iova, size)?;
        let mut state = self.lock_unpinned(iova, last, |state| {
            self.check_bitmap_request(state, iova, size, pgsize)
                .map(|_| ())
        })?;
        let out = &mut bitmap[..words_for(pages) as usize];
        out.fill(0);
        let all_dirty = state.all_dirty();
        let victims: Vec<u64> = state.mappings.range(iova..=last).map(|(k, _)| *k).collect();
        let mut unmapped = 0u64;
        for start in victims {
            if let Some(m) = state.mappings.remove(&start) {
                self.collect_mapping(&m, all_dirty, iova, out, DirtyRead::Clear);
                self.release(&mut state, &m);
                unmapped = unmapped.saturating_add(m.size);
            }
        }
        Ok(unmapped)
    }

    /// Attaches a group of `devices` devices that will use this IOMMU.
    pub fn attach_group(&self, kind: GroupKind, devices: u32) -> GroupId {
        let mut state = self.lock_write();
        let id = GroupId(state.next_group);
        state.next_group += 1;
        state.groups.insert(
            id,
            Group {
                kind,
                devices,
                pinned_scope: AtomicBool::new(false),
                notifier: None,
            },
        );
        id
    }

    /// Sets the callback that unmap uses to ask `group` to unpin pages in a range.
    pub fn set_unmap_notifier(&self, group: GroupId, notifier: UnmapNotifier) -> Result<()> {
        let mut state = self.lock_write();
        let g = state
            .groups
            .get_mut(&group)
            .ok_or_else(|| DmaError::Invalid(format!("{group:?} is not attached")))?;
        g.notifier = Some(notifier);
        Ok(())
    }

    /// Detaches a group; the dirty scope is recomputed without it.
    pub fn detach_group(&self, group: GroupId) -> Result<()> {
        self.lock_write()
            .groups
            .remove(&group)
            .map(|_| ())
            .ok_or_else(|| DmaError::Invalid(format!("{group:?} is not attached")))
    }

    /// Pins `npages` pages from `iova` for `group` (`vfio_pin_pages`) and returns their host
    /// memory. A page pinned twice needs two unpins. While pinned a page is reported dirty on
    /// every bitmap read; the group's first pin narrows its dirty scope to what it pins.
    pub fn pin_pages(
        &self,
        group: GroupId,
        iova: u64,
        npages: u64,
        prot: Prot,
    ) -> Result<Vec<PinnedSegment>> {
        self.check_v2("pinning")?;
        if npages == 0 {
            return invalid!("pin of 0 pages");
        }
        if npages > PIN_PAGES_MAX {
            return Err(DmaError::TooBig(format!(
                "pin of {npages} pages: at most {PIN_PAGES_MAX} per call"
            )));
        }
        if prot.bits() & Prot::READ_WRITE.bits() == 0 {
            return invalid!("a pin needs READ or WRITE access, got neither");
        }
        self.check_aligned("pin", "iova", iova)?;
        let size = npages << self.page_shift;
        let last = checked_last(iova, size).map_or_else(
            || invalid!("pin [{iova:#x}, +{size:#x}) wraps past the end of the IOVA space"),
            Ok,
        )?;
        let state = self.lock_read();
        let g = state
            .groups
            .get(&group)
            .ok_or_else(|| DmaError::Invalid(format!("{group:?} is not attached")))?;
        if g.devices != 1 {
            return invalid!(
                "{group:?} has {} devices: only a group of exactly one device may pin (its pins bound the group's DMA)",
                g.devices
            );
        }
        // Validate every page before pinning any.
        let mut page_iova = iova;
        while page_iova <= last {
            let m = state.find(page_iova).ok_or_else(|| {
                DmaError::Invalid(format!("pin: iova {page_iova:#x} is not mapped"))
            })?;
            if !m.prot.contains(prot) {
                return Err(DmaError::Perm(format!(
                    "pin for {prot:?} of iova {page_iova:#x}, mapped {:?}",
                    m.prot
                )));
            }
            match m.last().checked_add(1) {
                Some(next) if next <= last => page_iova = next,
                _ => break,
            }
        }
        let mut segments = Vec::new();
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut cur = iova;
        loop {
            let m = state.find(cur).expect("validated above");
            let seg_last = m.last().min(last);
            let first_page = (cur - m.iova) >> self.page_shift;
            let count = ((seg_last - cur) >> self.page_shift) + 1;
            if let Err(e) = self.pin_in_mapping(m, first_page, count) {
                for (d_iova, d_pages) in done {
                    self.unpin_locked(&state, d_iova, d_pages);
                }
                return Err(e);
            }
            done.push((cur, count));
            segments.push(PinnedSegment {
                memory: Arc::clone(&m.memory),
                offset: m.offset + (cur - m.iova) as usize,
                len: (seg_last - cur + 1) as usize,
                iova: cur,
            });
            if seg_last == last {
                break;
            }
            cur = seg_last + 1;
        }
        g.pinned_scope.store(true, Ordering::Release);
        Ok(segments)
    }

    fn pin_in_mapping(&self, m: &Mapping, first_page: u64, count: u64) -> Result<()> {
        let mut pins = m.pins();
        if (first_page..first_page + count).any(|p| pins.get(&p) == Some(&u32::MAX)) {
            return Err(DmaError::TooBig(format!(
                "a page at iova {:#x} is already pinned {} times",
                m.iova + (first_page << self.page_shift),
                u32::MAX
            )));
        }
        let new_pages = (first_page..first_page + count)
            .filter(|p| !pins.contains_key(p))
            .count() as u64;
        self.charge(new_pages)?;
        for page in first_page..first_page + count {
            *pins.entry(page).or_insert(0) += 1;
            if let Some(bitmap) = &m.dirty {
                let _ = bitmap.set(page);
            }
        }
        Ok(())
    }

    fn charge(&self, pages: u64) -> Result<()> {
        let limit = self.config.locked_pages_limit.unwrap_or(u64::MAX);
        self.locked_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(pages).filter(|&new| new <= limit)
            })
            .map(|_| ())
            .map_err(|cur| {
                DmaError::NoMemory(format!(
                    "pinning {pages} more pages would exceed the locked-memory limit of {limit} pages ({cur} pinned)"
                ))
            })
    }

    /// Drops one pin reference from each of `npages` pages from `iova`. Pages that are not
    /// pinned are skipped (no underflow). A page whose last reference goes is reported dirty
    /// once more.
    pub fn unpin_pages(&self, group: GroupId, iova: u64, npages: u64) -> Result<()> {
        self.check_aligned("unpin", "iova", iova)?;
        if npages == 0 || npages > PIN_PAGES_MAX {
            return invalid!("unpin of {npages} pages: expected 1 to {PIN_PAGES_MAX}");
        }
        let state = self.lock_read();
        if !state.groups.contains_key(&group) {
            return invalid!("{group:?} is not attached");
        }
        self.unpin_locked(&state, iova, npages);
        Ok(())
    }

    fn unpin_locked(&self, state: &State, iova: u64, npages: u64) {
        for i in 0..npages {
            let Some(page_iova) = iova.checked_add(i << self.page_shift) else {
                break;
            };
            let Some(m) = state.find(page_iova) else {
                continue;
            };
            let page = (page_iova - m.iova) >> self.page_shift;
            let mut pins = m.pins();
            if let Some(refs) = pins.get_mut(&page) {
                *refs -= 1;
                if *refs == 0 {
                    pins.remove(&page);
                    if let Some(bitmap) = &m.dirty {
                        let _ = bitmap.set(page);
                    }
                    self.locked_pages.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Walks `[iova, iova+len)` mapping by mapping, checking each piece is mapped with
    /// `access`, and calls `f` with its host memory; stops at the first refusal.
    fn walk<'s>(
        &self,
        state: &'s State,
        iova: u64,
        len: u64,
        access: Prot,
        mut f: impl FnMut(HostSlice<'s>) -> Result<()>,
    ) -> Result<()> {
        let Some(last) = checked_last(iova, len) else {
            return invalid!(
                "DMA of {len:#x} bytes at {iova:#x}: empty or wrapping past the IOVA space"
            );
        };
        let mut cur = iova;
        loop {
            let m = state.find(cur).ok_or_else(|| {
                DmaError::Invalid(format!("DMA to iova {cur:#x}, which is not mapped"))
            })?;
            if !m.prot.contains(access) {
                return Err(DmaError::Perm(format!(
                    "DMA {access:?} at iova {cur:#x}, mapped {:?}",
                    m.prot
                )));
            }
            let seg_last = m.last().min(last);
            f(HostSlice {
                memory: &m.memory,
                offset: m.offset + (cur - m.iova) as usize,
                len: (seg_last - cur + 1) as usize,
                iova: cur,
            })?;
            if seg_last == last {
                return Ok(());
            }
            cur = seg_last + 1;
        }
    }

    /// Like [`Iommu::walk`], but checks the whole range before calling `f` at all, so an
    /// access is refused whole or done whole.
    fn walk_checked<'s>(
        &self,
        state: &'s State,
        iova: u64,
        len: u64,
        access: Prot,
        f: impl FnMut(HostSlice<'s>) -> Result<()>,
    ) -> Result<()> {
        self.walk(state, iova, len, access, |_| Ok(()))?;
        self.walk(state, iova, len, access, f)
    }

    /// Marks the pages of `[iova, iova+len)` dirty while tracking is on: one atomic operation
    /// per bitmap word, at most one per page.
    fn mark_locked(&self, state: &State, iova: u64, len: u64) {
        let last = iova + (len - 1);
        let mut cur = iova;
        while let Some(m) = state.find(cur) {
            let seg_last = m.last().min(last);
            if let Some(bitmap) = &m.dirty {
                let first = (cur - m.iova) >> self.page_shift;
                let end = (seg_last - m.iova) >> self.page_shift;
                let _ = bitmap.set_range(first, end - first + 1);
            }
            if seg_last == last {
                break;
            }
            cur = seg_last + 1;
        }
    }

    /// Device read of guest memory by DMA (`vfio_dma_rw`, read). Never marks pages dirty.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        let state = self.lock_read();
        let mut done = 0;
        self.walk_checked(&state, iova, buf.len() as u64, Prot::READ, |slice| {
            slice.read_at(0, &mut buf[done..done + slice.len])?;
            done += slice.len;
            Ok(())
        })
    }

    /// Device write of guest memory by DMA (`vfio_dma_rw`, write): the data lands first, then
    /// its pages are marked dirty, so a harvest never reports a page before the write that
    /// dirtied it. Nothing is written if any part of the range is unmapped or read-only.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<()> {
        let state = self.lock_read();
        let mut done = 0;
        self.walk_checked(&state, iova, data.len() as u64, Prot::WRITE, |slice| {
            slice.write_at(0, &data[done..done + slice.len])?;
            done += slice.len;
            Ok(())
        })?;
        if state.tracking {
            self.mark_locked(&state, iova, data.len() as u64);
        }
        Ok(())
    }

    /// Records that the device wrote `[iova, iova+len)` by other means (for example through a
    /// pointer from [`Iommu::with_host_slices`] kept beyond it).
    pub fn mark_dirty(&self, iova: u64, len: u64) -> Result<()> {
        let state = self.lock_read();
        self.walk(&state, iova, len, Prot::WRITE, |_| Ok(()))?;
        if state.tracking {
            self.mark_locked(&state, iova, len);
        }
        Ok(())
    }

    /// Runs `f` with the host memory of `[iova, iova+len)`, checked for `access`. The mappings
    /// cannot go away while `f` runs (unmap waits), so the slices are valid throughout. When
    /// `access` includes WRITE the range is marked dirty after `f` returns.
    ///
    /// `f` must not call this IOMMU at all: the table's read lock is held while it runs, and a
    /// second read lock waits behind any map or unmap queued meanwhile, which waits for `f`.
    pub fn with_host_slices<R>(
        &self,
        iova: u64,
        len: u64,
        access: Prot,
        f: impl FnOnce(&[HostSlice<'_>]) -> R,
    ) -> Result<R> {
        let state = self.lock_read();
        let mut slices = Vec::new();
        self.walk(&state, iova, len, access, |slice| {
            slices.push(slice);
            Ok(())
        })?;
        let result = f(&slices);
        if access.contains(Prot::WRITE) && state.tracking {
            self.mark_locked(&state, iova, len);
        }
        Ok(result)
    }
}

/// Sets bits `[first, first+count)` of `out`.
fn set_bits(out: &mut [u64], first: u64, count: u64) {
    let mut bit = first;
    let end = first + count;
    while bit < end {
        let idx = (bit / 64) as usize;
        let lo = bit % 64;
        let n = (64 - lo).min(end - bit);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << lo
        };
        out[idx] |= mask;
        bit += n;
    }
}
