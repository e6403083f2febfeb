//! Pinning: groups and their kind, pin and unpin with reference counts, locked-memory
//! accounting, and the pinned-page dirty scope of seed 000 patch 7.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::table::{Group, Mapping, State, Target};
use super::{
    GroupId, GroupKind, HostSlice, Iommu, PIN_PAGES_MAX, Prot, UnmapNotifier, checked_last,
    host_len,
};
use crate::error::{DmaError, Result, invalid};
use vmig_primitives::HostMemory;
use vmig_primitives::Iova;

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

impl Iommu {
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
        iova: Iova,
        npages: u64,
        prot: Prot,
    ) -> Result<Vec<PinnedSegment>> {
        let iova = iova.raw();
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
            if m.by_message() {
                return invalid!(
                    "pin: iova {page_iova:#x} is mapped by messages to the memory's owner: there is no host page to pin"
                );
            }
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
            let Some((m, Target::Host { memory, offset })) =
                state.find(cur).map(|m| (m, &m.target))
            else {
                unreachable!("validated above: every page is in a host-backed mapping")
            };
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
                memory: Arc::clone(memory),
                offset: offset + host_len(cur - m.iova),
                len: host_len(seg_last - cur + 1),
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

    pub(super) fn pin_in_mapping(&self, m: &Mapping, first_page: u64, count: u64) -> Result<()> {
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

    pub(super) fn charge(&self, pages: u64) -> Result<()> {
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
    pub fn unpin_pages(&self, group: GroupId, iova: Iova, npages: u64) -> Result<()> {
        let iova = iova.raw();
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

    pub(super) fn unpin_locked(&self, state: &State, iova: u64, npages: u64) {
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
}
