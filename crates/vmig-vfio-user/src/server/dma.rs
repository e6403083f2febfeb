//! DMA: the connection's `vmig-dma` IOMMU, which owns every mapping rule for regions mapped
//! with an fd and without one alike. A region mapped without an fd is a
//! [`Backing::Message`] whose accesses this module carries to the client as `DMA_READ` /
//! `DMA_WRITE` messages, split at the transfer size both sides accept. The IOMMU holds the
//! table's read lock while a message is in flight, so an unmap returns only once the DMA in
//! flight is done. Pages written by message are the client's to track (it sees every one):
//! the IOMMU keeps no dirty bits for them, and an unmap-with-bitmap of such a region reports
//! none.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};
use vmig_primitives::Iova;

use vmig_dma::{Backing, Iommu, MessageDma, MessageDmaError, Prot, UnmapScope};
use zerocopy::IntoBytes;

use super::dirty::{bitmap_len, check_bitmap};
use super::{Refusal, Reply, Session, field32};
use crate::endpoint::{DEFAULT_TIMEOUT, Endpoint, EndpointError};
use crate::wire::{Command, DMA_UNMAP_FLAG_ALL, DirtyBitmap, DmaAccess, DmaMap, DmaUnmap, size32};

/// Guest memory as the device reaches it: the IOMMU, whose message-backed mappings go to the
/// client through a [`ClientMemory`].
pub(super) struct Dma {
    pub(super) iommu: Arc<Iommu>,
    pub(super) client: Arc<ClientMemory>,
}

impl Dma {
    /// Reads guest memory at `iova` for the device.
    pub(super) fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        self.iommu.read(Iova(iova), buf).map_err(dma_fault)
    }

    /// Writes guest memory at `iova` for the device (dirty-tracked when fd-backed).
    pub(super) fn write(&self, iova: u64, data: &[u8]) -> Result<(), Refusal> {
        self.iommu.write(Iova(iova), data).map_err(dma_fault)
    }
}

/// A device access the IOMMU refuses is a DMA fault for the device (`EFAULT`), whatever the
/// IOMMU's own errno for the call; one the client did not carry fails with the errno of why.
fn dma_fault(e: vmig_dma::DmaError) -> Refusal {
    match &e {
        vmig_dma::DmaError::Message { source, .. } => {
            Refusal::caused(source.errno, "DMA by message failed", e)
        }
        _ => Refusal::caused(libc::EFAULT, "DMA fault", e),
    }
}

/// Why the client did not carry a message-based DMA.
#[derive(Debug, thiserror::Error)]
pub enum ClientDmaError {
    /// The client is gone.
    #[error("no client")]
    NoClient,
    /// The request got no usable reply.
    #[error("{0:?} to the client failed")]
    Request(Command, #[source] EndpointError),
    /// The client's `DMA_READ` reply carries another number of bytes than asked.
    #[error("DMA_READ returned {got} of {wanted} bytes")]
    ShortRead {
        /// Bytes that came.
        got: usize,
        /// Bytes asked for.
        wanted: usize,
    },
}

impl ClientDmaError {
    fn errno(&self) -> i32 {
        match self {
            Self::NoClient => libc::ENOTCONN,
            Self::Request(_, e) => e.errno(),
            Self::ShortRead { .. } => libc::EIO,
        }
    }
}

impl From<ClientDmaError> for MessageDmaError {
    fn from(e: ClientDmaError) -> Self {
        MessageDmaError::new(e.errno(), e)
    }
}

/// The client's memory, reached by `DMA_READ` / `DMA_WRITE` on the endpoint the server's
/// commands go out on (the twin socket, when negotiated).
#[derive(Debug)]
pub(super) struct ClientMemory {
    pub(super) endpoint: Weak<Endpoint>,
    /// The largest transfer of one message: the replies to our `DMA_READ`s must fit what
    /// this side accepts too.
    pub(super) max_xfer: usize,
}

impl ClientMemory {
    fn endpoint(&self) -> Result<Arc<Endpoint>, ClientDmaError> {
        self.endpoint.upgrade().ok_or(ClientDmaError::NoClient)
    }
}

impl MessageDma for ClientMemory {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), MessageDmaError> {
        let endpoint = self.endpoint()?;
        let mut addr = iova;
        for chunk in buf.chunks_mut(self.max_xfer) {
            let head = DmaAccess {
                addr,
                count: chunk.len() as u64,
            };
            let reply = endpoint
                .request(Command::DmaRead, &[head.as_bytes()], &[], DEFAULT_TIMEOUT)
                .map_err(|e| ClientDmaError::Request(Command::DmaRead, e))?;
            let data = reply.payload.get(size_of::<DmaAccess>()..).unwrap_or(&[]);
            if data.len() != chunk.len() {
                return Err(ClientDmaError::ShortRead {
                    got: data.len(),
                    wanted: chunk.len(),
                }
                .into());
            }
            chunk.copy_from_slice(data);
            addr += chunk.len() as u64;
        }
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), MessageDmaError> {
        let endpoint = self.endpoint()?;
        let mut addr = iova;
        for chunk in data.chunks(self.max_xfer) {
            let head = DmaAccess {
                addr,
                count: chunk.len() as u64,
            };
            endpoint
                .request(
                    Command::DmaWrite,
                    &[head.as_bytes(), chunk],
                    &[],
                    DEFAULT_TIMEOUT,
                )
                .map_err(|e| ClientDmaError::Request(Command::DmaWrite, e))?;
            addr += chunk.len() as u64;
        }
        Ok(())
    }
}

/// `DMA_MAP`: with an fd, the IOMMU maps the file; without one, the region is reached by
/// messages to the client. The IOMMU's rules decide either way.
pub(super) fn dma_map(s: &Session, map: DmaMap, fd: Option<OwnedFd>) -> Result<Reply, Refusal> {
    let prot = Prot::from_bits(map.flags)?;
    let backing = match &fd {
        Some(fd) => Backing::Fd {
            fd: fd.as_fd(),
            offset: map.offset,
        },
        None => Backing::Message(Arc::clone(&s.dma.client) as Arc<dyn MessageDma>),
    };
    s.dma.iommu.map(Iova(map.addr), map.size, backing, prot)?;
    Ok(Reply::empty())
}

/// `DMA_UNMAP`, with or without the dirty bitmap of what it removes.
pub(super) fn dma_unmap(
    s: &Session,
    unmap: DmaUnmap,
    bitmap: Option<DirtyBitmap>,
) -> Result<Reply, Refusal> {
    let echo = DmaUnmap {
        argsz: size32::<DmaUnmap>(),
        ..unmap
    };
    if unmap.flags & DMA_UNMAP_FLAG_ALL != 0 {
        s.dma.iommu.unmap(Iova(0), 0, UnmapScope::All)?;
        return Ok(Reply::data(echo.as_bytes().to_vec()));
    }
    let Some(b) = bitmap else {
        if s.dma
            .iommu
            .unmap(Iova(unmap.addr), unmap.size, UnmapScope::Range)?
            == 0
        {
            // As libvfio-user: an unmap must name a mapping.
            return Err(Refusal::new(
                libc::ENOENT,
                format!(
                    "DMA_UNMAP [{:#x}, +{:#x}) names no mapping",
                    unmap.addr, unmap.size
                ),
            ));
        }
        return Ok(Reply::data(echo.as_bytes().to_vec()));
    };
    // Checked before anything is removed or allocated.
    let words = check_bitmap(unmap.size, b.pgsize, b.size)?;
    let echo = DmaUnmap {
        argsz: size32::<DmaUnmap>()
            + size32::<DirtyBitmap>()
            + field32(b.size, "the DMA_UNMAP bitmap's size")?,
        ..unmap
    };
    let message_region = s
        .dma
        .iommu
        .mappings()
        .iter()
        .any(|m| m.by_message && m.iova == unmap.addr && m.size == unmap.size);
    let mut out = vec![0u64; words];
    if message_region {
        // Pages written through DMA_WRITE messages are the client's to track: the bitmap is
        // clean, whether or not logging is on.
        s.dma
            .iommu
            .unmap(Iova(unmap.addr), unmap.size, UnmapScope::Range)?;
    } else {
        s.dma
            .iommu
            .unmap_with_dirty_bitmap(Iova(unmap.addr), unmap.size, b.pgsize, &mut out)?;
    }
    Ok(Reply::data(
        [
            echo.as_bytes(),
            b.as_bytes(),
            &out.as_bytes()[..bitmap_len(b.size)],
        ]
        .concat(),
    ))
}
