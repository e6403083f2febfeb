//! The benchmark the issue asks for, run inside the test guest: mapping 1 GiB of guest RAM
//! into the container and fetching its dirty bitmap, through the backend ([`Container`])
//! and through the bare ioctls, alternately on the same memory in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};
use vmig_primitives::GuestAddress;
use vmig_primitives::Iova;

use serde::{Deserialize, Serialize};
use vmig_dma::uapi::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
};
use vmig_primitives::{HostMemory, PAGE_SIZE};

use vmig_vfio::container::{Container, GET_BITMAP_ARGSZ, UNMAP_ARGSZ};
use vmig_vfio::sys::{self, BitmapRequest, UserBitmap};
use vmig_vfio::{Result, VfioError};

/// One round's times.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Round {
    /// `Container::map_guest_memory` of the whole memory.
    pub backend_map: Duration,
    /// One `VFIO_IOMMU_MAP_DMA` of the whole memory.
    pub raw_map: Duration,
    /// `Container::dirty_bitmap` of the whole memory.
    pub backend_bitmap: Duration,
    /// One `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP of the whole memory.
    pub raw_bitmap: Duration,
}

fn failed(call: &str) -> impl Fn(i32) -> VfioError + '_ {
    move |errno| VfioError::Ioctl {
        call: call.to_owned(),
        errno,
    }
}

/// Runs `rounds` rounds on `memory` (mapped at IOVA 0), which the container must not have
/// mapped; every mapping is gone when this returns.
pub fn map_and_bitmap(
    container: &Container,
    memory: &Arc<HostMemory>,
    rounds: usize,
) -> Result<Vec<Round>> {
    let size = memory.len() as u64;
    let bytes = vmig_dirty::bitmap_bytes(size / PAGE_SIZE);
    let fd = container.fd();
    let dirty = |flags| sys::dirty_pages_flags(fd, 8, flags).map_err(failed("DIRTY_PAGES"));
    let mut out = Vec::new();
    for _ in 0..rounds {
        let mut round = Round::default();
        let t = Instant::now();
        container.map_guest_memory(GuestAddress(0), memory)?;
        round.backend_map = t.elapsed();
        container.start_dirty_tracking()?;
        let t = Instant::now();
        container.dirty_bitmap(Iova(0), size)?;
        round.backend_bitmap = t.elapsed();
        container.stop_dirty_tracking()?;
        container.unmap(Iova(0), size)?;

        let t = Instant::now();
        // SAFETY: `memory` is borrowed for this whole function and the mapping is removed
        // below, before the function returns, on success and on failure alike; nothing does
        // DMA into it meanwhile.
        let mapped = unsafe {
            sys::map_dma(
                fd,
                VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                0,
                size,
                memory.as_ptr() as u64,
            )
        };
        round.raw_map = t.elapsed();
        let measured = mapped.map_err(failed("MAP_DMA")).and_then(|()| {
            dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_START)?;
            let t = Instant::now();
            let (r, _) = sys::dirty_pages_get_bitmap(
                fd,
                GET_BITMAP_ARGSZ,
                VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                BitmapRequest {
                    iova: 0,
                    size,
                    pgsize: PAGE_SIZE,
                    bitmap: UserBitmap::Buffer(bytes),
                },
            );
            round.raw_bitmap = t.elapsed();
            r.map_err(failed("GET_BITMAP"))
        });
        let _ = dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
        let unmapped = sys::unmap_dma(fd, UNMAP_ARGSZ, 0, 0, size, None);
        measured?;
        unmapped.result.map_err(failed("UNMAP_DMA"))?;
        out.push(round);
    }
    Ok(out)
}
