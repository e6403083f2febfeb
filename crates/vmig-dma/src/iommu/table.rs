//! The mapping table and the type1 rules that guard it: map (alignment, no zero sizes, the
//! IOVA ranges, the backing's size, overlap is `EEXIST`, the entry limit is `ENOSPC`) and unmap
//! (whole mappings only on type1 v2, `UNMAP_ALL`, waiting for pinned pages to be unpinned).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use vmig_dirty::{DirtyBitmap, bitmap_bytes};

use super::{
    Backing, GroupId, GroupKind, Iommu, IommuType, IovaRange, MessageDma, Prot,
    UNMAP_NOTIFY_ATTEMPTS, UnmapNotifier, UnmapScope,
};
use crate::error::{DmaError, Result, invalid};
use vmig_primitives::Iova;
use vmig_primitives::{HostMemory, regular_file_size};

pub(super) struct Mapping {
    pub(super) iova: u64,
    pub(super) size: u64,
    pub(super) prot: Prot,
    /// Where the bytes are.
    pub(super) target: Target,
    /// Pages dirtied since the last read, while tracking is on.
    pub(super) dirty: Option<DirtyBitmap>,
    /// Pin reference counts by page index within the mapping.
    pub(super) pins: Mutex<BTreeMap<u64, u32>>,
}

/// Where a mapping's bytes are.
pub(super) enum Target {
    /// Host memory; `offset` is that of the mapping's first byte in `memory`.
    Host {
        memory: Arc<HostMemory>,
        offset: usize,
    },
    /// The owner of the memory, reached by messages.
    Message(Arc<MessageMapping>),
}

/// A message-backed mapping's owner, and the accesses waiting on it.
pub(super) struct MessageMapping {
    pub(super) owner: Arc<dyn MessageDma>,
    /// Held shared by every access while it waits on the owner (without the table's lock, so
    /// nothing else waits behind a slow owner); an unmap that removed the mapping takes it
    /// exclusively before it returns, so no access to an unmapped range is still in flight.
    pub(super) in_flight: RwLock<()>,
}

impl MessageMapping {
    /// Waits until no access to the mapping is in flight.
    pub(super) fn wait_idle(&self) {
        drop(self.in_flight.write().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Mapping {
    pub(super) fn by_message(&self) -> bool {
        matches!(self.target, Target::Message(_))
    }
    /// The message mapping's owner and accesses, for a message-backed mapping.
    pub(super) fn message(&self) -> Option<Arc<MessageMapping>> {
        match &self.target {
            Target::Message(m) => Some(Arc::clone(m)),
            Target::Host { .. } => None,
        }
    }
    pub(super) fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }
    pub(super) fn pins(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u32>> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Group {
    pub(super) kind: GroupKind,
    pub(super) devices: u32,
    /// Set by the group's first successful pin: from then on only pinned pages are its dirt.
    pub(super) pinned_scope: AtomicBool,
    pub(super) notifier: Option<UnmapNotifier>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) mappings: BTreeMap<u64, Mapping>,
    pub(super) tracking: bool,
    pub(super) groups: BTreeMap<GroupId, Group>,
    pub(super) next_group: u64,
    pub(super) bitmap_bytes: u64,
}

impl State {
    /// The mapping that contains `iova`.
    pub(super) fn find(&self, iova: u64) -> Option<&Mapping> {
        self.mappings
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.last() >= iova)
    }

    /// Start IOVAs of the mappings that overlap `[iova, last]`, ascending.
    pub(super) fn overlapping(&self, iova: u64, last: u64) -> Vec<u64> {
        let first = self.find(iova).map_or(iova, |m| m.iova);
        self.mappings.range(first..=last).map(|(k, _)| *k).collect()
    }

    /// Whether every page of every mapping must be reported dirty: a direct-DMA group is
    /// attached that has never pinned (the pinned-page dirty scope of patch 7 does not hold).
    pub(super) fn all_dirty(&self) -> bool {
        self.groups
            .values()
            .any(|g| g.kind == GroupKind::Direct && !g.pinned_scope.load(Ordering::Acquire))
    }

    /// Refuses a range that starts or ends inside a mapping.
    pub(super) fn check_no_bisect(&self, iova: u64, last: u64, what: &str) -> Result<()> {
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

impl Iommu {
    /// Maps `[iova, iova+size)` to `backing` with rights `prot` (`VFIO_IOMMU_MAP_DMA`).
    pub fn map(&self, iova: Iova, size: u64, backing: Backing<'_>, prot: Prot) -> Result<()> {
        let iova = iova.raw();
        if prot.bits() & Prot::READ_WRITE.bits() == 0 {
            return invalid!("a mapping needs READ or WRITE access, got neither");
        }
        let last = self.check_range("map", iova, size)?;
        let (backing_offset, fd) = match &backing {
            Backing::Fd { fd, offset } => (*offset, Some(*fd)),
            Backing::Memory { offset, .. } => (*offset, None),
            Backing::Message(_) => (0, None),
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
        let target = match backing {
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
                Target::Host {
                    memory: Arc::new(memory),
                    offset: 0,
                }
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
                Target::Host {
                    memory,
                    offset: super::host_len(offset),
                }
            }
            Backing::Message(owner) => Target::Message(Arc::new(MessageMapping {
                owner,
                in_flight: RwLock::new(()),
            })),
        };
        let mut state = self.lock_write();
        self.check_insertable(&state, iova, last)?;
        // The owner of message-backed memory records the writes that reach it.
        let dirty = if state.tracking && matches!(target, Target::Host { .. }) {
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
                target,
                dirty,
                pins: Mutex::new(BTreeMap::new()),
            },
        );
        Ok(())
    }

    pub(super) fn check_insertable(&self, state: &State, iova: u64, last: u64) -> Result<()> {
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
    pub fn unmap(&self, iova: Iova, size: u64, scope: UnmapScope) -> Result<u64> {
        let iova = iova.raw();
        let state = match scope {
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
        Ok(self.remove_mappings(state, victims, |_| {}))
    }

    /// Removes the mappings that start at `victims`, showing each to `each` first; releases
    /// the table, then waits for message accesses still in flight to what it removed. Returns
    /// the bytes removed.
    pub(super) fn remove_mappings(
        &self,
        mut state: RwLockWriteGuard<'_, State>,
        victims: Vec<u64>,
        mut each: impl FnMut(&Mapping),
    ) -> u64 {
        let mut unmapped = 0u64;
        let mut by_message = Vec::new();
        for start in victims {
            if let Some(m) = state.mappings.remove(&start) {
                each(&m);
                self.release(&mut state, &m);
                unmapped = unmapped.saturating_add(m.size);
                by_message.extend(m.message());
            }
        }
        drop(state);
        by_message.iter().for_each(|m| m.wait_idle());
        unmapped
    }

    pub(super) fn release(&self, state: &mut State, m: &Mapping) {
        if let Some(bitmap) = &m.dirty {
            state.bitmap_bytes -= bitmap_bytes(bitmap.pages());
        }
    }

    /// Takes the write lock once no page in `[iova, last]` is pinned, asking the groups' unmap
    /// notifiers to unpin first (the kernel notifies vendor drivers the same way).
    /// `validate` runs under the lock first, so an invalid request never disturbs the pinners.
    pub(super) fn lock_unpinned(
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
}
