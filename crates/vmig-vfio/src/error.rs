//! The crate's error: what failed, with the errno where the kernel gave one.

/// A refusal or failure of the kernel's VFIO, or of this crate's own checks.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A VFIO call failed.
    #[error("{call}: {}", std::io::Error::from_raw_os_error(*errno))]
    Ioctl {
        /// The call and what it was asked.
        call: String,
        /// The kernel's errno.
        errno: i32,
    },
    /// `vfio-ioctls` refused or failed.
    #[error("{context}: {source}")]
    Library {
        /// What was being done.
        context: String,
        /// The library's error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// The kernel has no VFIO, or the device is not bound to a VFIO driver.
    #[error("{0}")]
    Unavailable(String),
    /// A request this crate refuses before asking the kernel.
    #[error("{0}")]
    Invalid(String),
    /// Guest RAM that lies outside the IOMMU's IOVA ranges (QEMU answers `-EFAULT`, seed 003).
    #[error("{0}")]
    OutsideIovaRanges(String),
    /// The kernel answered something this crate cannot use.
    #[error("{0}")]
    Kernel(String),
    /// A device failed a change of migration state and was reset (its state is then the reset
    /// state): it could not return to RUNNING when a migration was abandoned, or a failed arc
    /// left it in ERROR, which only a reset leaves (`linux/vfio.h`).
    /// state is the reset state.
    #[error("{device}: it could not go to {state} ({source}), so it was reset")]
    ResetAfterFailedStateChange {
        /// The device.
        device: String,
        /// The state it was asked for.
        state: String,
        /// Why it could not get there.
        #[source]
        source: Box<VfioError>,
    },
    /// Reading or writing a device file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl VfioError {
    /// The errno of a failed call, as the kernel gave it (`EINVAL` for this crate's own
    /// refusals, `EIO` otherwise).
    pub fn errno(&self) -> i32 {
        match self {
            Self::Ioctl { errno, .. } => *errno,
            Self::Library { source, .. } => library_errno(source).unwrap_or(libc::EIO),
            Self::Invalid(_) => libc::EINVAL,
            Self::OutsideIovaRanges(_) => libc::EFAULT,
            Self::Unavailable(_) => libc::ENODEV,
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::Kernel(_) | Self::ResetAfterFailedStateChange { .. } => libc::EIO,
        }
    }

    pub(crate) fn ioctl(call: impl Into<String>, errno: i32) -> Self {
        Self::Ioctl {
            call: call.into(),
            errno,
        }
    }

    pub(crate) fn library(context: impl Into<String>, source: vfio_ioctls::VfioError) -> Self {
        Self::Library {
            context: context.into(),
            source,
        }
    }
}

/// The errno inside a `vfio-ioctls` error, when it carries one.
fn library_errno(e: &vfio_ioctls::VfioError) -> Option<i32> {
    use std::error::Error;
    let mut source: Option<&(dyn Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        if let Some(sys) = s.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(sys.errno());
        }
        source = s.source();
    }
    None
}

/// The crate's result.
pub type Result<T, E = VfioError> = std::result::Result<T, E>;
