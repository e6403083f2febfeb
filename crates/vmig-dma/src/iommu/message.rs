//! Message-backed mappings: IOVA ranges whose memory the IOMMU cannot map because it lives in
//! another process that shared no fd for it (a vfio-user client that answers `DMA_READ` /
//! `DMA_WRITE`). The IOMMU keeps them in the same table under the same rules as fd-backed
//! mappings; only the last step of an access differs, handed to the [`MessageDma`] the caller
//! supplied when it mapped the range. Dirty tracking does not cover them: the owner of the
//! memory sees every write that reaches it, so it records them itself.

use std::sync::Arc;

/// Carries a device's access to a message-backed mapping to the owner of the memory. The
/// IOMMU calls it without holding its table, so every other request goes on while the owner
/// answers; only an unmap that removes the mapping waits, and returns once the access in flight
/// is done. It must therefore not unmap its own mapping from inside a call.
pub trait MessageDma: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `iova` from the owner.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), MessageDmaError>;
    /// Writes `data` at `iova` into the owner's memory.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), MessageDmaError>;
}

/// Why the owner of a message-backed mapping did not carry an access: the errno to report and
/// the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the memory's owner did not carry the access (errno {errno}): {source}")]
pub struct MessageDmaError {
    /// The errno the access fails with.
    pub errno: i32,
    /// What went wrong on the way.
    #[source]
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

impl MessageDmaError {
    /// A failure with `errno`, caused by `source`.
    pub fn new(errno: i32, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            errno,
            source: Arc::new(source),
        }
    }
}

impl PartialEq for MessageDmaError {
    /// Equal when they carry the same errno and the very same cause.
    fn eq(&self, other: &Self) -> bool {
        self.errno == other.errno
            && std::ptr::addr_eq(Arc::as_ptr(&self.source), Arc::as_ptr(&other.source))
    }
}

impl Eq for MessageDmaError {}
