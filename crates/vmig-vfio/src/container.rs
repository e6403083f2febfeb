//! A type1 v2 container: the IOMMU domain the VMM maps guest RAM into and asks for the pages
//! devices dirtied by DMA.
//!
//! The container keeps its own copy of the mapping table (every successful map and unmap goes
//! through it under one lock, so it always equals the kernel's). That table is what hides the
//! kernel's stale-bit quirk (`reference/kernel-vfio-type1-observed.md`: after a read whose
//! range starts a mapping off a 64-page boundary, bits past the mapping's end stay set and
//! come back in later reads): every bitmap is read into a zeroed buffer and then only the bits
//! of pages that are mapped and inside the range asked for are kept.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use vfio_ioctls::{VfioContainer, VfioDeviceFd, VfioOps};
use vmig_dirty::words_for;
use vmig_dma::uapi::{
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VfioBitmap,
    VfioIommuType1DirtyBitmap, VfioIommuType1DirtyBitmapGet, VfioIommuType1DmaUnmap,
};
use vmig_primitives::{GuestAddress, HostMemory, Iova};

use crate::device::Device;
use crate::error::{Result, VfioError};
use crate::info::ContainerInfo;
use crate::mapping::{DmaMap, Section, plan};
use crate::sys::{self, BitmapRequest, ContainerFd, UserBitmap};

pub use crate::sys::CONTAINER_PATH;

/// `argsz` of a GET_BITMAP request: the header and `vfio_iommu_type1_dirty_bitmap_get`.
pub const GET_BITMAP_ARGSZ: u32 = sys::argsz_of(
    size_of::<VfioIommuType1DirtyBitmap>() + size_of::<VfioIommuType1DirtyBitmapGet>(),
);
/// `argsz` of an unmap that returns the dirty bitmap: the request and `vfio_bitmap`.
pub const UNMAP_BITMAP_ARGSZ: u32 =
    sys::argsz_of(size_of::<VfioIommuType1DmaUnmap>() + size_of::<VfioBitmap>());
/// `argsz` of a plain unmap.
pub const UNMAP_ARGSZ: u32 = sys::argsz_of(size_of::<VfioIommuType1DmaUnmap>());

/// A mapping this container made: `[iova, last]`, and the memory it keeps alive.
#[derive(Debug)]
struct Mapping {
    last: u64,
    /// Memory handed over with [`Container::map_memory`], kept mapped while DMA may reach it.
    _memory: Option<Arc<HostMemory>>,
}

#[derive(Debug, Default)]
struct State {
    mappings: BTreeMap<u64, Mapping>,
    tracking: bool,
}

/// A VFIO container with the type1 v2 IOMMU.
pub struct Container {
    inner: Arc<VfioContainer>,
    state: Mutex<State>,
    /// The dirty bitmap's page size, once the migration capability has been read.
    bitmap_page: OnceLock<u64>,
    /// `max_dirty_bitmap_size`, read with the page size.
    max_bitmap_bytes: OnceLock<u64>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("fd", &self.inner.as_raw_fd())
            .field("state", &self.state)
            .finish()
    }
}

/// Whether this machine's kernel offers VFIO at all, and if not, why.
pub fn availability() -> std::result::Result<(), String> {
    if Path::new(CONTAINER_PATH).exists() {
        Ok(())
    } else {
        Err(format!(
            "{CONTAINER_PATH} does not exist: this kernel has no VFIO (load the vfio, \
             vfio_iommu_type1 and vfio-pci modules, and boot with the IOMMU on, e.g. intel_iommu=on)"
        ))
    }
}

impl Container {
    /// Opens a container. `kvm_device` is the VM's KVM VFIO device (`KVM_DEV_TYPE_VFIO`), which
    /// groups are registered with so KVM knows about non-coherent DMA; `None` outside a VM.
    ///
    /// The IOMMU is set (type1 v2) when the first device is opened: until then only
    /// [`Container::fd`] is of use.
    pub fn open(kvm_device: Option<Arc<VfioDeviceFd>>) -> Result<Self> {
        availability().map_err(VfioError::Unavailable)?;
        let inner = VfioContainer::new(kvm_device)
            .map_err(|e| VfioError::library(format!("opening {CONTAINER_PATH}"), e))?;
        Ok(Self {
            inner: Arc::new(inner),
            state: Mutex::new(State::default()),
            bitmap_page: OnceLock::new(),
            max_bitmap_bytes: OnceLock::new(),
        })
    }

    /// The container's file descriptor (for calls this type does not make; mappings made
    /// through it are not in this container's table, and its bitmaps drop their bits).
    pub fn fd(&self) -> ContainerFd<'_> {
        sys::container_fd(&self.inner)
    }

    /// Opens the PCI device `bdf` (`0000:01:00.0`), which must be bound to vfio-pci or a
    /// vfio-pci variant driver: its group joins this container (the first group sets the
    /// IOMMU to type1 v2).
    pub fn open_device(&self, bdf: &str) -> Result<Device> {
        Device::open(self, bdf)
    }

    /// Opens the mediated device `uuid` (`83b8f4f2-509f-382f-3c1e-e6bfe0fa1001`, created
    /// through its parent's `mdev_supported_types/TYPE/create`): its group, from
    /// `/sys/bus/mdev/devices/UUID/iommu_group`, joins this container, and the device is
    /// asked for by its UUID (`VFIO_GROUP_GET_DEVICE_FD`). An mdev's group is an emulated
    /// one: type1 pins only what the parent driver asks to pin, and its dirty bitmap reports
    /// only those pages.
    pub fn open_mdev(&self, uuid: &str) -> Result<Device> {
        Device::open_mdev(self, uuid)
    }

    pub(crate) fn ops(&self) -> Arc<dyn VfioOps> {
        self.inner.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `VFIO_IOMMU_GET_INFO` with its capability chain.
    pub fn info(&self) -> Result<ContainerInfo> {
        let mut argsz = sys::argsz_of(size_of::<vmig_dma::uapi::VfioIommuType1Info>());
        // The chain could grow between the sizing call and the full one: ask again then.
        for _ in 0..4 {
            let mut buf = vec![0u8; argsz as usize];
            buf[..4].copy_from_slice(&argsz.to_ne_bytes());
            sys::iommu_get_info(self.fd(), &mut buf).map_err(|e| {
                VfioError::ioctl(
                    "VFIO_IOMMU_GET_INFO (a container has an IOMMU only once a device is open)",
                    e,
                )
            })?;
            let need = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if need <= argsz {
                return ContainerInfo::decode(&buf);
            }
            if need > 1 << 20 {
                return Err(VfioError::Kernel(format!(
                    "VFIO_IOMMU_GET_INFO asks for {need} bytes"
                )));
            }
            argsz = need;
        }
        Err(VfioError::Kernel(
            "VFIO_IOMMU_GET_INFO kept asking for a larger buffer".into(),
        ))
    }

    /// Maps `size` bytes of `memory` from `offset` at `iova`, readable and writable by devices;
    /// the container keeps `memory` alive until the mapping is unmapped.
    pub fn map_memory(
        &self,
        iova: Iova,
        memory: &Arc<HostMemory>,
        offset: u64,
        size: u64,
    ) -> Result<()> {
        let iova = iova.raw();
        let end = offset.checked_add(size);
        if end.is_none_or(|end| end > memory.len() as u64) {
            return Err(VfioError::Invalid(format!(
                "map of {size:#x} bytes from offset {offset:#x}: the memory has only {:#x}",
                memory.len()
            )));
        }
        let vaddr = memory.as_ptr() as u64 + offset;
        // SAFETY: `[vaddr, vaddr+size)` is inside `memory` (checked), which the mapping table
        // keeps alive until the IOMMU mapping is gone; `HostMemory` is only accessed through
        // raw copies and atomics, so device writes into it never race a Rust reference.
        unsafe { self.map_locked(&mut self.lock(), iova, size, vaddr, Some(memory.clone())) }
    }

    /// Maps `[vaddr, vaddr+size)` of this process at `iova`, readable and writable by devices.
    ///
    /// # Safety
    /// The memory must stay mapped until the range is unmapped from the container, and must
    /// only be accessed in ways that tolerate a device writing it at any time (raw pointers,
    /// atomics, system calls; no Rust references), as `vfio_ioctls::VfioOps::vfio_dma_map`
    /// requires.
    pub unsafe fn map_raw(&self, iova: Iova, size: u64, vaddr: u64) -> Result<()> {
        let iova = iova.raw();
        // SAFETY: forwarded to the caller.
        unsafe { self.map_locked(&mut self.lock(), iova, size, vaddr, None) }
    }

    /// # Safety
    /// As [`Container::map_raw`].
    unsafe fn map_locked(
        &self,
        state: &mut State,
        iova: u64,
        size: u64,
        vaddr: u64,
        memory: Option<Arc<HostMemory>>,
    ) -> Result<()> {
        let describe = || format!("VFIO_IOMMU_MAP_DMA of [{iova:#x}, +{size:#x}) from {vaddr:#x}");
        let size_usize = usize::try_from(size).map_err(|_| VfioError::Invalid(describe()))?;
        // SAFETY: forwarded to the caller of map_raw, or upheld by map_memory.
        unsafe { self.inner.vfio_dma_map(iova, size_usize, vaddr as *mut u8) }.map_err(|e| {
            let err = VfioError::library(describe(), e);
            VfioError::ioctl(describe(), err.errno())
        })?;
        let last = iova + (size - 1); // the kernel refuses size 0 and wrapping ranges
        state.mappings.insert(
            iova,
            Mapping {
                last,
                _memory: memory,
            },
        );
        Ok(())
    }

    /// Unmaps the whole mappings inside `[iova, iova+size)` and returns how many bytes were
    /// unmapped (0 when there were none). A range that splits a mapping is refused (`EINVAL`).
    /// While dirty tracking is on it is refused too (the kernel would allow it, and the pages
    /// devices dirtied there would be lost): use [`Container::unmap_with_dirty_bitmap`].
    pub fn unmap(&self, iova: Iova, size: u64) -> Result<u64> {
        let iova = iova.raw();
        let mut state = self.lock();
        if state.tracking {
            return Err(VfioError::Invalid(format!(
                "unmap of [{iova:#x}, +{size:#x}) while dirty tracking is on would lose the pages \
                 devices dirtied there: use unmap_with_dirty_bitmap, or stop tracking first"
            )));
        }
        let answer = sys::unmap_dma(self.fd(), UNMAP_ARGSZ, 0, iova, size, None);
        answer.result.map_err(|e| {
            VfioError::ioctl(
                format!("VFIO_IOMMU_UNMAP_DMA of [{iova:#x}, +{size:#x})"),
                e,
            )
        })?;
        remove_mappings(&mut state, iova, size);
        Ok(answer.unmapped)
    }

    /// Maps guest RAM at guest-physical `gpa` backed by `memory` (IOVA = guest-physical
    /// address) by the seed 003 rules ([`plan`]): shrunk to whole IOMMU pages, split when it
    /// does not fit one call, refused when it lies outside the IOMMU's IOVA ranges. On failure
    /// nothing stays mapped. Returns the maps made; the container keeps `memory` alive.
    pub fn map_guest_memory(
        &self,
        gpa: GuestAddress,
        memory: &Arc<HostMemory>,
    ) -> Result<Vec<DmaMap>> {
        let gpa = gpa.raw();
        let section = Section {
            gpa,
            size: memory.len() as u128,
            host_addr: memory.as_ptr() as u64,
        };
        // SAFETY: the section is `memory`, which the mapping table keeps alive, and which is
        // only accessed through raw copies and atomics.
        unsafe { self.map_section(section, Some(memory)) }
    }

    /// As [`Container::map_guest_memory`], for memory this type cannot keep alive (a VMM's
    /// own guest RAM mapping).
    ///
    /// # Safety
    /// As [`Container::map_raw`], for the section's host memory.
    pub unsafe fn map_guest_section(&self, section: Section) -> Result<Vec<DmaMap>> {
        // SAFETY: forwarded to the caller.
        unsafe { self.map_section(section, None) }
    }

    /// # Safety
    /// As [`Container::map_raw`], unless `memory` is the section's memory.
    unsafe fn map_section(
        &self,
        section: Section,
        memory: Option<&Arc<HostMemory>>,
    ) -> Result<Vec<DmaMap>> {
        let info = self.info()?;
        let maps = plan(section, info.min_page_size(), &info.iova_ranges)?;
        let mut state = self.lock();
        for (i, m) in maps.iter().enumerate() {
            // SAFETY: forwarded to the caller.
            let mapped =
                unsafe { self.map_locked(&mut state, m.iova, m.size, m.vaddr, memory.cloned()) };
            if let Err(e) = mapped {
                for done in &maps[..i] {
                    let undone =
                        sys::unmap_dma(self.fd(), UNMAP_ARGSZ, 0, done.iova, done.size, None);
                    // A mapping the kernel kept keeps its memory in the table.
                    if undone.result.is_ok() {
                        remove_mappings(&mut state, done.iova, done.size);
                    }
                }
                return Err(e);
            }
        }
        Ok(maps)
    }

    /// The mappings, as `(iova, last)`.
    pub fn mappings(&self) -> Vec<(u64, u64)> {
        self.lock()
            .mappings
            .iter()
            .map(|(iova, m)| (*iova, m.last))
            .collect()
    }

    /// Starts dirty tracking (`VFIO_IOMMU_DIRTY_PAGES_FLAG_START`).
    pub fn start_dirty_tracking(&self) -> Result<()> {
        let mut state = self.lock();
        sys::dirty_pages_flags(
            self.fd(),
            sys::argsz_of(size_of::<VfioIommuType1DirtyBitmap>()),
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
        )
        .map_err(|e| VfioError::ioctl("VFIO_IOMMU_DIRTY_PAGES START", e))?;
        state.tracking = true;
        Ok(())
    }

    /// Stops dirty tracking.
    pub fn stop_dirty_tracking(&self) -> Result<()> {
        let mut state = self.lock();
        sys::dirty_pages_flags(
            self.fd(),
            sys::argsz_of(size_of::<VfioIommuType1DirtyBitmap>()),
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
        )
        .map_err(|e| VfioError::ioctl("VFIO_IOMMU_DIRTY_PAGES STOP", e))?;
        state.tracking = false;
        Ok(())
    }

    /// Whether dirty tracking is on.
    pub fn is_tracking(&self) -> bool {
        self.lock().tracking
    }

    /// The pages of `[iova, iova+size)` devices dirtied (bit *i* = page `iova + i * page`,
    /// page = the migration capability's page size): only bits of mapped pages, never the
    /// kernel's stale ones. The range must consist of whole mappings (holes are allowed).
    pub fn dirty_bitmap(&self, iova: Iova, size: u64) -> Result<Vec<u64>> {
        let iova = iova.raw();
        let state = self.lock();
        let page = self.bitmap_page_size()?;
        let npages = size / page;
        let bytes = self.check_bitmap_bytes(npages)?;
        let (result, mut bitmap) = sys::dirty_pages_get_bitmap(
            self.fd(),
            GET_BITMAP_ARGSZ,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            BitmapRequest {
                iova,
                size,
                pgsize: page,
                bitmap: UserBitmap::Buffer(bytes),
            },
        );
        result.map_err(|e| {
            VfioError::ioctl(
                format!("VFIO_IOMMU_DIRTY_PAGES GET_BITMAP of [{iova:#x}, +{size:#x})"),
                e,
            )
        })?;
        keep_mapped_bits(&state, iova, page, npages, &mut bitmap);
        Ok(bitmap)
    }

    /// Unmaps the whole mappings inside `[iova, iova+size)` and returns the bytes unmapped
    /// and their dirty pages, read in the same call so no DMA between the two is lost.
    pub fn unmap_with_dirty_bitmap(&self, iova: Iova, size: u64) -> Result<(u64, Vec<u64>)> {
        let iova = iova.raw();
        let mut state = self.lock();
        let page = self.bitmap_page_size()?;
        let npages = size / page;
        let bytes = self.check_bitmap_bytes(npages)?;
        let answer = sys::unmap_dma(
            self.fd(),
            UNMAP_BITMAP_ARGSZ,
            VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            iova,
            size,
            Some((page, UserBitmap::Buffer(bytes))),
        );
        answer.result.map_err(|e| {
            VfioError::ioctl(
                format!("VFIO_IOMMU_UNMAP_DMA with GET_DIRTY_BITMAP of [{iova:#x}, +{size:#x})"),
                e,
            )
        })?;
        let mut bitmap = answer.bitmap;
        keep_mapped_bits(&state, iova, page, npages, &mut bitmap);
        remove_mappings(&mut state, iova, size);
        Ok((answer.unmapped, bitmap))
    }

    /// The bytes of a bitmap of `npages` pages, refused above the kernel's limit before
    /// anything is allocated.
    fn check_bitmap_bytes(&self, npages: u64) -> Result<u64> {
        let bytes = words_for(npages) * 8;
        let max = self
            .max_bitmap_bytes
            .get()
            .copied()
            .unwrap_or(sys::MAX_BITMAP_BUFFER);
        if bytes > max {
            return Err(VfioError::Invalid(format!(
                "a dirty bitmap of {npages} pages needs {bytes} bytes, more than the kernel's \
                 max_dirty_bitmap_size of {max}: ask for a smaller range"
            )));
        }
        Ok(bytes)
    }

    /// The page size of dirty bitmaps (bit *i* is page `iova + i * page`): the smallest the
    /// migration capability offers.
    pub fn bitmap_page_size(&self) -> Result<u64> {
        // The page size never changes once the IOMMU is set.
        if let Some(page) = self.bitmap_page.get() {
            return Ok(*page);
        }
        match self.info()?.migration {
            Some(m) if m.pgsize_bitmap != 0 => Ok(*self
                .bitmap_page
                .get_or_init(|| 1 << m.pgsize_bitmap.trailing_zeros())),
            _ => Err(VfioError::Unavailable(
                "the container has no migration capability: this kernel's type1 IOMMU cannot \
                 track dirty pages"
                    .into(),
            )),
        }
    }
}

impl Drop for Container {
    /// Unmaps everything the table holds before the memory it keeps alive is released: a
    /// device may outlive the container value (its group keeps the kernel's container), and
    /// must not reach memory that is gone.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let fd = sys::container_fd(&self.inner);
        let mut kept = BTreeMap::new();
        for (iova, m) in std::mem::take(&mut state.mappings) {
            let size = m.last - iova + 1;
            if sys::unmap_dma(fd, UNMAP_ARGSZ, 0, iova, size, None)
                .result
                .is_err()
            {
                kept.insert(iova, m);
            }
        }
        // Memory of a mapping the kernel refused to drop must never be released.
        for (_, m) in kept {
            std::mem::forget(m);
        }
    }
}

/// Removes the table's mappings that lie inside `[iova, iova+size)`, as a successful v2
/// unmap did in the kernel.
fn remove_mappings(state: &mut State, iova: u64, size: u64) {
    let Some(last) = size.checked_sub(1).and_then(|s| iova.checked_add(s)) else {
        return;
    };
    let inside: Vec<u64> = state
        .mappings
        .range(iova..=last)
        .filter(|(_, m)| m.last <= last)
        .map(|(k, _)| *k)
        .collect();
    for k in inside {
        state.mappings.remove(&k);
    }
}

/// Clears every bit of `bitmap` that is not a mapped page of the `npages` pages from `iova`:
/// the kernel's stale bits past a mapping's end, in holes, and past the range. Only the gaps
/// between mappings are touched.
fn keep_mapped_bits(state: &State, iova: u64, page: u64, npages: u64, bitmap: &mut [u64]) {
    let all_bits = bitmap.len() as u64 * 64;
    let mut cursor = 0;
    if npages > 0 {
        let last = iova.saturating_add((npages * page).saturating_sub(1));
        // A mapping that starts before `iova` cannot be in a valid request (no splitting).
        for (start, m) in state.mappings.range(iova..=last) {
            let first = (start - iova) / page;
            let end = ((m.last.min(last) - iova) / page + 1).min(npages);
            update_bits(bitmap, cursor, first, |w, mask| *w &= !mask);
            cursor = cursor.max(end);
        }
    }
    update_bits(bitmap, cursor, all_bits, |w, mask| *w &= !mask);
}

/// Sets bits `[first, end)` of `words`, a word at a time.
#[cfg(test)]
fn set_bits(words: &mut [u64], first: u64, end: u64) {
    update_bits(words, first, end, |w, mask| *w |= mask);
}

/// Applies `apply(word, mask)` to the words holding bits `[first, end)`, with the mask of the
/// bits in range.
fn update_bits(words: &mut [u64], first: u64, end: u64, apply: impl Fn(&mut u64, u64)) {
    let mut bit = first;
    while bit < end {
        let Some(word) = words.get_mut((bit / 64) as usize) else {
            return;
        };
        let offset = bit % 64;
        let count = (64 - offset).min(end - bit);
        apply(word, (u64::MAX >> (64 - count)) << offset);
        bit += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmig_primitives::PAGE_SIZE;

    #[test]
    fn set_bits_fills_partial_and_whole_words() {
        let mut w = [0u64; 3];
        set_bits(&mut w, 3, 8);
        assert_eq!(w, [0xf8, 0, 0]);
        set_bits(&mut w, 60, 130);
        assert_eq!(w, [0xf000_0000_0000_00f8, u64::MAX, 0x3]);
        set_bits(&mut w, 190, 400); // past the end: stops at the last word
        assert_eq!(w[2], 0xc000_0000_0000_0003);
    }

    #[test]
    fn only_bits_of_mapped_pages_survive() {
        let mut state = State::default();
        for (iova, pages) in [(0x10_0000u64, 3u64), (0x10_3000, 5), (0x20_0000, 2)] {
            state.mappings.insert(
                iova,
                Mapping {
                    last: iova + pages * PAGE_SIZE - 1,
                    _memory: None,
                },
            );
        }
        // The kernel's answer for A..C with stale bits past B and in the hole (observed 0x7ff).
        let mut bitmap = vec![0x7ff, 0x10, 0, 0, 0xff];
        keep_mapped_bits(&state, 0x10_0000, PAGE_SIZE, 258, &mut bitmap);
        assert_eq!(bitmap, [0xff, 0, 0, 0, 0x3]);
        // F alone after G+F (observed 0xff for 5 pages).
        let mut bitmap = vec![0xff];
        keep_mapped_bits(&state, 0x10_3000, PAGE_SIZE, 5, &mut bitmap);
        assert_eq!(bitmap, [0x1f]);
        // A range with no mapping keeps nothing.
        let mut bitmap = vec![u64::MAX; 2];
        keep_mapped_bits(&state, 0x40_0000, PAGE_SIZE, 100, &mut bitmap);
        assert_eq!(bitmap, [0, 0]);
    }
}
