//! The raw VFIO calls the rust-vmm crates do not make, and the only `unsafe` code of the crate.
//!
//! `vfio-ioctls` opens containers, groups and devices, maps DMA, and drives the device features
//! (migration v2, DMA logging). It has no type1 dirty tracking (`VFIO_IOMMU_DIRTY_PAGES`,
//! unmap with `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`), does not return how much an unmap
//! removed, does not read the capability chain of `VFIO_IOMMU_GET_INFO`, and swallows the
//! errors of region reads, writes and resets. Those calls are here, each on a request built
//! from the C layouts in [`vmig_dma::uapi`] (checked there against the kernel's structs), and
//! each answer is `Ok` or the errno the kernel gave.
//!
//! Every function is safe to call with any values: container requests go only to a
//! [`ContainerFd`] (a number means something else on another kind of VFIO fd: 17 is
//! `VFIO_DEVICE_FEATURE` on a device), and where a request carries a user pointer (the dirty
//! bitmap) the pointer is built here from a buffer at least as large as the size the request
//! declares, or is one the kernel refuses before writing anywhere ([`UserBitmap`]).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmig_dma::uapi::{
    VFIO_DEVICE_RESET, VFIO_IOMMU_DIRTY_PAGES, VFIO_IOMMU_GET_INFO, VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU, VfioBitmap, VfioIommuType1DirtyBitmap, VfioIommuType1DirtyBitmapGet,
    VfioIommuType1DmaUnmap,
};
use zerocopy::{FromBytes, IntoBytes};

/// An errno from the kernel.
pub type Errno = i32;

/// Where the kernel's VFIO container lives.
pub const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// A file descriptor known to be a VFIO container (opened from [`CONTAINER_PATH`]).
#[derive(Debug, Clone, Copy)]
pub struct ContainerFd<'a>(BorrowedFd<'a>);

impl<'a> ContainerFd<'a> {
    /// The descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'a> {
        self.0
    }
}

/// The descriptor of a `vfio-ioctls` container (which opened it from [`CONTAINER_PATH`]).
pub(crate) fn container_fd(container: &vfio_ioctls::VfioContainer) -> ContainerFd<'_> {
    // SAFETY: the descriptor belongs to `container`, which outlives the borrow.
    ContainerFd(unsafe { BorrowedFd::borrow_raw(container.as_raw_fd()) })
}

/// A container opened without `vfio-ioctls`, for setting it up by hand (a type1 v1 IOMMU, a
/// group attached and detached explicitly).
#[derive(Debug)]
pub struct RawContainer(std::fs::File);

impl RawContainer {
    /// Opens [`CONTAINER_PATH`].
    pub fn open() -> std::io::Result<Self> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTAINER_PATH)
            .map(Self)
    }

    /// Its descriptor.
    pub fn fd(&self) -> ContainerFd<'_> {
        use std::os::fd::AsFd;
        ContainerFd(self.0.as_fd())
    }
}

/// The largest bitmap buffer this module allocates: twice the kernel's maximum
/// (`DIRTY_BITMAP_SIZE_MAX`, 256 MiB), so requests just past the kernel's limit still reach it.
pub const MAX_BITMAP_BUFFER: u64 = 512 << 20;
/// The largest size a `NULL` bitmap may declare: its writes, should the kernel make any, land
/// at `NULL + offset < 4096`, in the page that is never mapped.
pub const MAX_NULL_BITMAP: u64 = vmig_primitives::PAGE_SIZE;

const fn vfio_io(nr: u32) -> u32 {
    (vmig_dma::uapi::VFIO_TYPE << 8) | (vmig_dma::uapi::VFIO_BASE + nr)
}

/// `VFIO_GROUP_GET_STATUS`.
const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
/// `VFIO_GROUP_SET_CONTAINER`.
const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
/// `VFIO_GROUP_UNSET_CONTAINER`.
const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio_io(5);
/// `VFIO_DEVICE_GET_INFO`.
const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
/// `VFIO_DEVICE_FEATURE` (same number as `VFIO_IOMMU_DIRTY_PAGES`, on a device fd).
const VFIO_DEVICE_FEATURE: u32 = vfio_io(17);
/// `VFIO_GROUP_FLAGS_VIABLE`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

/// An address `access_ok` refuses: the start of the kernel half of the address space.
pub const KERNEL_ADDRESS: u64 = 0xffff_8000_0000_0000;

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> Result<libc::c_int, Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

/// The `argsz` of a uAPI request of `bytes` bytes. The structs are a few dozen bytes; a
/// constant that did not fit would fail the build at the assert.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked against u32::MAX just above"
)]
pub const fn argsz_of(bytes: usize) -> u32 {
    assert!(
        bytes <= u32::MAX as usize,
        "a VFIO request's argsz is a u32"
    );
    bytes as u32
}

/// `ioctl(fd, request, value)` for the calls whose argument is a plain integer.
fn ioctl_value(fd: BorrowedFd<'_>, request: u32, value: libc::c_ulong) -> Result<i32, Errno> {
    // SAFETY: the argument is an integer, not a pointer, for every request passed here
    // (SET_IOMMU, DEVICE_RESET); the fd is borrowed, so it stays open during the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::c_ulong::from(request), value) })
}

/// `ioctl(fd, request, buf)` for a request whose argument is `buf` and holds no user
/// pointers. The kernel reads and writes at most `argsz` bytes, the first `u32` of `buf`,
/// which must not exceed `buf.len()`.
fn ioctl_buffer(fd: BorrowedFd<'_>, request: u32, buf: &mut [u8]) -> Result<i32, Errno> {
    let argsz = buf
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(libc::EINVAL)?;
    if argsz > buf.len() {
        return Err(libc::EINVAL);
    }
    // SAFETY: `buf` is a live, exclusively borrowed buffer of at least `argsz` bytes, which is
    // all the kernel touches for these requests; it holds no pointers the kernel follows.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request),
            buf.as_mut_ptr(),
        )
    })
}

/// Where the `data` pointer of a dirty-bitmap request points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserBitmap {
    /// A zeroed buffer of this many bytes, which is also the size the request declares.
    Buffer(u64),
    /// A buffer of `allocated` bytes, while the request declares `declared` bytes
    /// (`declared <= allocated`, so the kernel can never write past it).
    Declared {
        /// Bytes the request's `bitmap.size` says.
        declared: u64,
        /// Bytes really there.
        allocated: u64,
    },
    /// `NULL` with this declared size, at most [`MAX_NULL_BITMAP`] (the kernel answers
    /// `EFAULT` at its first write).
    Null(u64),
    /// [`KERNEL_ADDRESS`] with this declared size (fails `access_ok`: `EINVAL`).
    KernelAddress(u64),
}

impl UserBitmap {
    fn declared(self) -> u64 {
        match self {
            Self::Buffer(n) | Self::Null(n) | Self::KernelAddress(n) => n,
            Self::Declared { declared, .. } => declared,
        }
    }

    /// The buffer to hand over, in whole words, and the pointer to put in the request.
    fn allocate(self) -> Result<(Vec<u64>, u64), Errno> {
        let words = |bytes: u64| {
            if bytes > MAX_BITMAP_BUFFER {
                return Err(libc::EINVAL);
            }
            usize::try_from(bytes.div_ceil(8)).map_err(|_| libc::EINVAL)
        };
        Ok(match self {
            Self::Buffer(n) => {
                let buf = vec![0u64; words(n)?];
                let ptr = buf.as_ptr() as u64;
                (buf, ptr)
            }
            Self::Declared {
                declared,
                allocated,
            } => {
                if declared > allocated {
                    return Err(libc::EINVAL);
                }
                let buf = vec![0u64; words(allocated)?];
                let ptr = buf.as_ptr() as u64;
                (buf, ptr)
            }
            Self::Null(n) if n <= MAX_NULL_BITMAP => (Vec::new(), 0),
            Self::Null(_) => return Err(libc::EINVAL),
            Self::KernelAddress(_) => (Vec::new(), KERNEL_ADDRESS),
        })
    }
}

/// A dirty-bitmap request's range and bitmap description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapRequest {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The bitmap's page size.
    pub pgsize: u64,
    /// The bitmap's memory.
    pub bitmap: UserBitmap,
}

/// `VFIO_IOMMU_GET_INFO` into `buf`, whose first `u32` is `argsz`.
pub fn iommu_get_info(container: ContainerFd<'_>, buf: &mut [u8]) -> Result<(), Errno> {
    ioctl_buffer(container.0, VFIO_IOMMU_GET_INFO, buf).map(drop)
}

/// `VFIO_SET_IOMMU`.
pub fn set_iommu(container: ContainerFd<'_>, iommu_type: u32) -> Result<(), Errno> {
    ioctl_value(container.0, VFIO_SET_IOMMU, iommu_type.into()).map(drop)
}

/// `VFIO_CHECK_EXTENSION`: 1 when the container supports `extension`.
pub fn check_extension(container: ContainerFd<'_>, extension: u32) -> Result<i32, Errno> {
    ioctl_value(
        container.0,
        vmig_dma::uapi::VFIO_CHECK_EXTENSION,
        extension.into(),
    )
}

/// `VFIO_GET_API_VERSION`.
pub fn api_version(container: ContainerFd<'_>) -> Result<i32, Errno> {
    ioctl_value(container.0, vmig_dma::uapi::VFIO_GET_API_VERSION, 0)
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags.
pub fn group_status(group: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&8u32.to_ne_bytes());
    ioctl_buffer(group, VFIO_GROUP_GET_STATUS, &mut buf)?;
    Ok(u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]))
}

/// `VFIO_GROUP_SET_CONTAINER`.
pub fn group_set_container(group: BorrowedFd<'_>, container: ContainerFd<'_>) -> Result<(), Errno> {
    let container_fd: RawFd = container.0.as_raw_fd();
    // SAFETY: the argument points at a live `int` the kernel only reads.
    check(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            libc::c_ulong::from(VFIO_GROUP_SET_CONTAINER),
            &container_fd as *const RawFd,
        )
    })
    .map(drop)
}

/// `VFIO_GROUP_UNSET_CONTAINER`.
pub fn group_unset_container(group: BorrowedFd<'_>) -> Result<(), Errno> {
    ioctl_value(group, VFIO_GROUP_UNSET_CONTAINER, 0).map(drop)
}

/// `VFIO_IOMMU_DIRTY_PAGES` with only the header (`START`, `STOP`, or any flags a test wants
/// refused). The request is followed by a zeroed range, so a `GET_BITMAP` flag sent this way
/// points the kernel at `NULL`, which it refuses.
pub fn dirty_pages_flags(container: ContainerFd<'_>, argsz: u32, flags: u32) -> Result<(), Errno> {
    let mut buf =
        [0u8; size_of::<VfioIommuType1DirtyBitmap>() + size_of::<VfioIommuType1DirtyBitmapGet>()];
    VfioIommuType1DirtyBitmap { argsz, flags }
        .write_to_prefix(&mut buf[..])
        .map_err(|_| libc::EINVAL)?;
    // SAFETY: `buf` holds the header and a zeroed range (bitmap data NULL); the kernel reads at
    // most those 48 bytes for DIRTY_PAGES and writes nothing back into the request.
    check(unsafe {
        libc::ioctl(
            container.0.as_raw_fd(),
            libc::c_ulong::from(VFIO_IOMMU_DIRTY_PAGES),
            buf.as_mut_ptr(),
        )
    })
    .map(drop)
}

/// `VFIO_IOMMU_DIRTY_PAGES` with `GET_BITMAP` (and any extra `flags`): the kernel's answer and
/// the bitmap buffer as the kernel left it. `argsz` is what the request declares.
pub fn dirty_pages_get_bitmap(
    container: ContainerFd<'_>,
    argsz: u32,
    flags: u32,
    request: BitmapRequest,
) -> (Result<(), Errno>, Vec<u64>) {
    let (mut bitmap, data) = match request.bitmap.allocate() {
        Ok(b) => b,
        Err(e) => return (Err(e), Vec::new()),
    };
    let head = VfioIommuType1DirtyBitmap { argsz, flags };
    let get = VfioIommuType1DirtyBitmapGet {
        iova: request.iova,
        size: request.size,
        bitmap: VfioBitmap {
            pgsize: request.pgsize,
            size: request.bitmap.declared(),
            data,
        },
    };
    let mut buf = Vec::with_capacity(48);
    buf.extend_from_slice(head.as_bytes());
    buf.extend_from_slice(get.as_bytes());
    // SAFETY: the kernel reads at most the 48 request bytes in `buf` and writes only through
    // `bitmap.data`, which is NULL, a kernel address (both refused before any write), or
    // `bitmap`, a live buffer of at least the declared `bitmap.size` bytes that nothing else
    // references during the call.
    let ret = check(unsafe {
        libc::ioctl(
            container.0.as_raw_fd(),
            libc::c_ulong::from(VFIO_IOMMU_DIRTY_PAGES),
            buf.as_mut_ptr(),
        )
    });
    bitmap.shrink_to_fit();
    (ret.map(drop), bitmap)
}

/// The answer to an unmap: the kernel's result, the bytes it unmapped (meaningful on success;
/// on failure Linux 6.1 leaves the requested size there), and the bitmap buffer when one was
/// asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmapAnswer {
    /// `Ok` or the errno.
    pub result: Result<(), Errno>,
    /// The request's `size` after the call.
    pub unmapped: u64,
    /// The bitmap as the kernel left it (empty without `GET_DIRTY_BITMAP`).
    pub bitmap: Vec<u64>,
}

/// `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova+size)` with `flags`; with `bitmap`, the request
/// carries a `vfio_bitmap` (put `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP` in `flags` to use it).
pub fn unmap_dma(
    container: ContainerFd<'_>,
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
    bitmap: Option<(u64, UserBitmap)>,
) -> UnmapAnswer {
    let (words, data, pgsize, declared) = match bitmap {
        Some((pgsize, user)) => match user.allocate() {
            Ok((words, data)) => (words, data, pgsize, user.declared()),
            Err(e) => {
                return UnmapAnswer {
                    result: Err(e),
                    unmapped: 0,
                    bitmap: Vec::new(),
                };
            }
        },
        None => (Vec::new(), 0, 0, 0),
    };
    let unmap = VfioIommuType1DmaUnmap {
        argsz,
        flags,
        iova,
        size,
    };
    let mut buf = Vec::with_capacity(48);
    buf.extend_from_slice(unmap.as_bytes());
    buf.extend_from_slice(
        VfioBitmap {
            pgsize,
            size: declared,
            data,
        }
        .as_bytes(),
    );
    // SAFETY: the kernel reads at most the 48 request bytes in `buf`, writes the unmapped size
    // back into its first 24, and writes a bitmap only through `data`, which is NULL (no
    // bitmap, or refused), a kernel address (refused), or `words`, a live buffer of at least
    // the declared size that nothing else references during the call.
    let ret = check(unsafe {
        libc::ioctl(
            container.0.as_raw_fd(),
            libc::c_ulong::from(VFIO_IOMMU_UNMAP_DMA),
            buf.as_mut_ptr(),
        )
    });
    let unmapped = VfioIommuType1DmaUnmap::read_from_prefix(&buf[..])
        .map(|(u, _)| u.size)
        .unwrap_or(0);
    UnmapAnswer {
        result: ret.map(drop),
        unmapped,
        bitmap: words,
    }
}

/// `VFIO_IOMMU_MAP_DMA` of `[iova, iova+size)` to `vaddr` with `flags`, exactly as given (the
/// backend maps through `vfio-ioctls`; this is for sending the kernel any request a test wants).
/// A mapping made here is not in any [`crate::Container`]'s table, so the container's bitmaps
/// drop its bits.
///
/// # Safety
/// When the kernel accepts the request, `[vaddr, vaddr+size)` must be memory of this process
/// that stays mapped until the range is unmapped and is only accessed in ways that tolerate a
/// device writing it at any time (raw pointers, atomics, system calls).
pub unsafe fn map_dma(
    container: ContainerFd<'_>,
    flags: u32,
    iova: u64,
    size: u64,
    vaddr: u64,
) -> Result<(), Errno> {
    let mut map = vmig_dma::uapi::VfioIommuType1DmaMap {
        argsz: argsz_of(size_of::<vmig_dma::uapi::VfioIommuType1DmaMap>()),
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: the request is a live struct the kernel only reads; what it maps is the
    // caller's promise.
    check(unsafe {
        libc::ioctl(
            container.0.as_raw_fd(),
            libc::c_ulong::from(vmig_dma::uapi::VFIO_IOMMU_MAP_DMA),
            map.as_mut_bytes().as_mut_ptr(),
        )
    })
    .map(drop)
}

/// `VFIO_DEVICE_GET_INFO`: the device's flags (`VFIO_DEVICE_FLAGS_*`).
pub(crate) fn device_flags(device: BorrowedFd<'_>) -> Result<u32, Errno> {
    // struct vfio_device_info: argsz, flags, num_regions, num_irqs, cap_offset, pad.
    let mut buf = [0u8; 24];
    buf[..4].copy_from_slice(&24u32.to_ne_bytes());
    ioctl_buffer(device, VFIO_DEVICE_GET_INFO, &mut buf)?;
    Ok(u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]))
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: BorrowedFd<'_>) -> Result<(), Errno> {
    ioctl_value(device, VFIO_DEVICE_RESET, 0).map(drop)
}

/// `VFIO_DEVICE_FEATURE` with `PROBE` and `access` (`VFIO_DEVICE_FEATURE_GET` or `_SET`) for
/// `feature`: `Ok` when the device has it.
pub(crate) fn device_feature_probe(
    device: BorrowedFd<'_>,
    feature: u32,
    access: u32,
) -> Result<(), Errno> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&8u32.to_ne_bytes());
    let flags = feature | access | vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_PROBE;
    buf[4..].copy_from_slice(&flags.to_ne_bytes());
    ioctl_buffer(device, VFIO_DEVICE_FEATURE, &mut buf).map(drop)
}

/// A new descriptor for the file behind `fd` (so reads and writes of a device's regions can
/// go through `std`'s positioned I/O, which reports every error).
pub(crate) fn duplicate(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches no memory; a bad `fd` is
    // refused with EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether this process runs as root (may install packages).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}
