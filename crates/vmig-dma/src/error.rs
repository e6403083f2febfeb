//! The crate's error type: every refusal carries the errno the kernel's type1 driver returns for
//! it and a message that says what was wrong and what was expected.

/// Result of an IOMMU operation.
pub type Result<T> = std::result::Result<T, DmaError>;

/// A refused IOMMU operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// `EINVAL`: a malformed or out-of-rule request.
    #[error("invalid argument (EINVAL): {0}")]
    Invalid(String),
    /// `EEXIST`: the range overlaps an existing mapping.
    #[error("mapping exists (EEXIST): {0}")]
    Exists(String),
    /// `ENOSPC`: the mapping limit is reached.
    #[error("no space (ENOSPC): {0}")]
    NoSpace(String),
    /// `E2BIG`: a request larger than the IOMMU accepts in one call.
    #[error("too big (E2BIG): {0}")]
    TooBig(String),
    /// `EFAULT`: memory the request points at cannot be accessed.
    #[error("bad address (EFAULT): {0}")]
    Fault(String),
    /// `ENOMEM`: a memory limit or allocation failed.
    #[error("out of memory (ENOMEM): {0}")]
    NoMemory(String),
    /// `ENOMEM`: a dirty bitmap could not be allocated.
    #[error("out of memory (ENOMEM): a dirty bitmap of {pages} pages: {source}")]
    Bitmap {
        /// Pages of the bitmap.
        pages: u64,
        /// Why it could not be made.
        #[source]
        source: vmig_dirty::DirtyError,
    },
    /// `EACCES`: the operation is not available on this kind of container.
    #[error("not available (EACCES): {0}")]
    Access(String),
    /// `EPERM`: the mapping's protection forbids the access.
    #[error("not permitted (EPERM): {0}")]
    Perm(String),
    /// `EBUSY`: a resource is still in use.
    #[error("busy (EBUSY): {0}")]
    Busy(String),
    /// The owner of a message-backed mapping did not carry a device access to it; the errno
    /// is the one it gave.
    #[error("DMA by message to [{iova:#x}, +{len:#x}) failed: {source}")]
    Message {
        /// First IOVA of the part that failed.
        iova: u64,
        /// Its length.
        len: u64,
        /// The owner's failure.
        #[source]
        source: crate::MessageDmaError,
    },
    /// Another errno from the operating system (creating a host mapping).
    #[error("{message} (errno {errno})")]
    Os {
        /// The raw errno.
        errno: i32,
        /// What was being done.
        message: String,
    },
}

impl DmaError {
    /// The errno the kernel returns for this refusal (positive).
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Invalid(_) => libc::EINVAL,
            DmaError::Exists(_) => libc::EEXIST,
            DmaError::NoSpace(_) => libc::ENOSPC,
            DmaError::TooBig(_) => libc::E2BIG,
            DmaError::Fault(_) => libc::EFAULT,
            DmaError::NoMemory(_) | DmaError::Bitmap { .. } => libc::ENOMEM,
            DmaError::Access(_) => libc::EACCES,
            DmaError::Perm(_) => libc::EPERM,
            DmaError::Busy(_) => libc::EBUSY,
            DmaError::Os { errno, .. } => *errno,
            DmaError::Message { source, .. } => source.errno,
        }
    }

    /// Wraps an OS error from `what`.
    pub(crate) fn os(what: impl std::fmt::Display, err: std::io::Error) -> Self {
        DmaError::Os {
            errno: err.raw_os_error().unwrap_or(libc::EIO),
            message: format!("{what}: {err}"),
        }
    }
}

/// Shorthand for `Err(DmaError::Invalid(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::DmaError::Invalid(format!($($arg)*))) };
}
pub(crate) use invalid;
