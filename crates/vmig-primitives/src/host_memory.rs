//! Host memory that DMA reaches: an `mmap` of a file descriptor (a memfd of guest RAM, shared with
//! the VMM), an anonymous mapping, or a mapping the embedding program already has. This is the
//! only module of the crate with `unsafe` code; everything above it works with offsets that
//! [`HostMemory`] bounds-checks.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// A range of host virtual memory that stays mapped for as long as this value lives.
#[derive(Debug)]
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// Whether `Drop` unmaps it (false for memory borrowed with [`HostMemory::from_raw`]).
    owned: bool,
}

// SAFETY: `HostMemory` is a plain address range; all access goes through methods that copy with
// raw pointers, or hand out a shared slice to read as plain data (`HostMemory::shared`). The
// memory is shared with other parties by design (the guest, the VMM process, other device
// threads), so bytes copied while someone else writes them may mix old and new data, exactly
// as DMA on real hardware; callers that need ordering get it from the IOMMU's locks and the
// dirty bitmap's Release/Acquire.
unsafe impl Send for HostMemory {}
// SAFETY: as above; the one reference into the memory, `HostMemory::shared`, is a shared slice
// read as plain data whatever others write meanwhile.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Maps `len` bytes of `fd` from `offset`, shared (writes reach the file and every other
    /// mapping of it). `offset` must be a multiple of the host page size.
    pub fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: u64, writable: bool) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh mapping chosen by the kernel (NULL hint) cannot alias Rust memory; the
        // fd is valid for the duration of the call because it is borrowed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        Self::from_mmap(ptr, len, writable)
    }

    /// An anonymous, private, zero-filled mapping of `len` bytes whose pages are allocated on
    /// first touch.
    pub fn anonymous(len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh anonymous mapping cannot alias Rust memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::from_mmap(ptr, len, true)
    }

    fn from_mmap(ptr: *mut libc::c_void, len: usize, writable: bool) -> io::Result<Self> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Self {
            ptr,
            len,
            writable,
            owned: true,
        })
    }

    /// Memory the caller already has mapped, for example guest RAM a VMM mapped itself.
    ///
    /// # Safety
    /// `[ptr, ptr+len)` must be mapped readable (and writable if `writable`) for as long as the
    /// returned value and every clone of an `Arc` holding it live, and must not be memory that
    /// Rust code holds references into.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        Self {
            ptr,
            len,
            writable,
            owned: false,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the host mapping allows writes.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The host address of byte `offset`; for handing to code that needs a pointer (a KVM
    /// memslot, an `mmap` peer). Using the pointer is the caller's `unsafe`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "[{offset:#x}, +{len:#x}) is outside host memory of {:#x} bytes",
                    self.len
                ),
            )),
        }
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the source range is inside the mapping (checked) and stays mapped while `self`
        // lives; `buf` is a distinct Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// The `len` bytes from `offset` as a shared slice, without copying them: for hashing guest
    /// memory or handing it to the kernel (`writev`), as the page senders and verification do.
    /// Others may write these bytes while the slice lives (the guest, a device's DMA): a reader
    /// gets whatever they hold when it reads them and must not rely on two reads agreeing. The
    /// stream is built for that: each page carries the digest its sender took, and a page that
    /// arrives different from it is not taken unless it is sent again.
    pub fn shared(&self, offset: usize, len: usize) -> io::Result<&[u8]> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked), which stays mapped while the
        // returned borrow of `self` lives. The bytes may change under the slice, written by
        // the guest or another process through its own mapping of the memfd; the slice is
        // read as plain data (hashed, copied by the kernel) and never used to address memory,
        // so a change gives a mix of old and new bytes, which a digest comparison catches.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// Appends the [`page_digest`](crate::page_digest) of each of the `count` pages from byte
    /// `offset` to `out`, hashing the memory where it is ([`Self::shared`]): copying each page
    /// out first takes as long again as the hash (measured: 1 GiB in 45 ms hashed in place, 90
    /// ms through a 4 KiB buffer). For reading memory whose writers are stopped, as
    /// verification does.
    pub fn page_digests(&self, offset: usize, count: usize, out: &mut Vec<u64>) -> io::Result<()> {
        let page = crate::PAGE_BYTES;
        let len = count
            .checked_mul(page)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page count overflows"))?;
        let bytes = self.shared(offset, len)?;
        out.extend(bytes.chunks_exact(page).map(crate::page_digest));
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: the destination range is inside a writable mapping (checked) that stays mapped
        // while `self` lives, and no Rust reference points into it; `data` cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }
}

impl HostMemory {
    /// Reads from `fd` until each of `ranges` (offset, length), in order, is filled, straight
    /// into the mapping: one `readv` for many ranges, and no copy through a buffer. Fails
    /// (with the ranges partly filled) when `fd` ends or fails first.
    pub fn read_exact_from(&self, fd: BorrowedFd<'_>, ranges: &[(usize, usize)]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        for &(offset, len) in ranges {
            self.check(offset, len)?;
        }
        let mut iovecs: Vec<libc::iovec> = ranges
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(offset, len)| libc::iovec {
                // Inside the mapping (checked above); only the kernel writes through it.
                iov_base: self.ptr.as_ptr().wrapping_add(offset).cast(),
                iov_len: len,
            })
            .collect();
        let mut first = 0;
        while first < iovecs.len() {
            let count = (iovecs.len() - first).min(1024);
            // SAFETY: every iovec lies inside this writable mapping, which stays mapped while
            // `self` lives, and no Rust reference points into it: the kernel's copy is the
            // only access, as with `write`.
            let got = unsafe {
                libc::readv(
                    fd.as_raw_fd(),
                    iovecs[first..].as_ptr(),
                    libc::c_int::try_from(count).unwrap_or(1024),
                )
            };
            let mut got = match usize::try_from(got) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => got,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            while got > 0 {
                let iov = &mut iovecs[first];
                let taken = got.min(iov.iov_len);
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(taken).cast();
                iov.iov_len -= taken;
                got -= taken;
                if iov.iov_len == 0 {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Stores `value` at the 8-byte aligned `offset` as one atomic store (release), so a
    /// party reading the word while it runs (a guest polling a device's status) never sees it
    /// torn.
    pub fn store_u64(&self, offset: usize, value: u64) -> io::Result<()> {
        self.check(offset, 8)?;
        if !self.writable || !offset.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the word is inside a writable mapping (checked) that lives as long as `self`,
        // 8-byte aligned (checked; mappings are page-aligned), and only ever accessed by this
        // process through raw copies or atomics, never through references to non-atomic data.
        let word =
            unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) };
        word.store(value, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Loads the 8-byte aligned word at `offset` with one 64-bit load, the counterpart of
    /// [`HostMemory::store_u64`] for a word another party (a guest writing a doorbell) stores
    /// while this runs: an aligned 64-bit load is never torn.
    pub fn load_u64(&self, offset: usize) -> io::Result<u64> {
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: as in `load_u32`: inside the mapping (checked), 8-byte aligned (checked;
        // mappings are page-aligned), mapped while `self` lives; no reference is created.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<u64>()) })
    }
}

impl HostMemory {
    /// Reads the 4-byte aligned word at `offset` with one 32-bit load, as a device register
    /// in a mapped BAR must be read (a copy might split or widen the access).
    pub fn load_u32(&self, offset: usize) -> io::Result<u32> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the word is inside the mapping (checked), 4-byte aligned (checked; mappings
        // are page-aligned) and stays mapped while `self` lives; a volatile read creates no
        // reference.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<u32>()) })
    }

    /// Writes the 4-byte aligned word at `offset` with one 32-bit store.
    pub fn store_u32(&self, offset: usize, value: u32) -> io::Result<()> {
        self.check(offset, 4)?;
        if !self.writable || !offset.is_multiple_of(4) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: as in `load_u32`, and the mapping is writable (checked).
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<u32>(), value) };
        Ok(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.owned && self.len != 0 {
            // SAFETY: the range was returned by our own `mmap` of exactly this length and is no
            // longer reachable once `self` is dropped.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Creates a memfd of `size` bytes (sparse: pages are allocated on first touch), the way guest
/// RAM is shared between a VMM and device servers. It is sealed against shrinking and growing,
/// so a peer that maps it can trust its length (a shrunk file would turn DMA into `SIGBUS`).
pub fn memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let name =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size =
        libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on a valid fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The size of the file behind `fd` if it is a regular file (a memfd is), `None` for other kinds.
pub fn regular_file_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `stat` is a valid out-buffer of the right type; the fd is borrowed and valid.
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialized the buffer.
    let stat = unsafe { stat.assume_init() };
    // A regular file's size is never negative.
    Ok(((stat.st_mode & libc::S_IFMT) == libc::S_IFREG)
        .then(|| u64::try_from(stat.st_size).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_memfds_cannot_shrink_or_grow() {
        let file = std::fs::File::from(memfd("sealed", 1 << 20).unwrap());
        for size in [4096, 2 << 20] {
            let err = file.set_len(size).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({size})");
        }
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    }
}
