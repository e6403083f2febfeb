//! Dirty pages as the client harvests them: v2 DMA logging, v1 `DIRTY_PAGES` and
//! unmap-with-bitmap from the server, and the record of the pages the server wrote by
//! `DMA_WRITE` (those are the client's to track: the server's dirty log never sees them), kept
//! by the thread that serves the server's `DMA_READ` / `DMA_WRITE` from guest memory.

use std::collections::BTreeSet;
use std::sync::Mutex;
use vmig_primitives::DmaRange;

use zerocopy::IntoBytes;

use super::{Client, ClientError, DmaMemory, Result, field32, protocol};
use crate::caps;
use crate::endpoint::Endpoint;
use crate::transport::Message;
use crate::wire::*;

/// Bytes per page of the client's record of server DMA writes.
pub const DMA_WRITE_PAGE: u64 = vmig_primitives::PAGE_SIZE;

impl Client {
    /// v1 `DMA_UNMAP` with `GET_DIRTY_BITMAP`: unmaps and returns the range's dirty bitmap.
    pub fn dma_unmap_with_bitmap(&self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(size.div_ceil(pgsize.max(1)));
        let unmap = DmaUnmap {
            argsz: size32::<DmaUnmap>()
                + size32::<DirtyBitmap>()
                + field32(Command::DmaUnmap, "the bitmap's size", bytes)?,
            flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            addr: iova,
            size,
        };
        let bitmap = DirtyBitmap {
            pgsize,
            size: bytes,
        };
        let reply = self.call(
            Command::DmaUnmap,
            &[unmap.as_bytes(), bitmap.as_bytes()],
            &[],
        )?;
        words_at(
            &reply.payload,
            size_of::<DmaUnmap>() + size_of::<DirtyBitmap>(),
            bytes,
            Command::DmaUnmap,
        )
    }

    /// v2 `DMA_LOGGING_START`; returns the page size the server chose.
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[DmaRange]) -> Result<u64> {
        let control = DmaLoggingControl {
            page_size,
            num_ranges: field32(Command::DeviceFeature, "the number of ranges", ranges.len())?,
            reserved: 0,
        };
        let mut data = control.as_bytes().to_vec();
        for range in ranges {
            let wire = DmaLoggingRange {
                iova: range.iova.raw(),
                length: range.len,
            };
            data.extend_from_slice(wire.as_bytes());
        }
        let reply = self.feature(FEATURE_DMA_LOGGING_START | FEATURE_SET, &data, data.len())?;
        read_struct::<DmaLoggingControl>(&reply).map_or_else(
            || {
                protocol(
                    Command::DeviceFeature,
                    "DMA_LOGGING_START reply shorter than 16 bytes",
                )
            },
            |c| Ok(c.page_size),
        )
    }

    /// v2 `DMA_LOGGING_STOP`.
    pub fn dma_logging_stop(&self) -> Result<()> {
        let control = DmaLoggingControl::default();
        self.feature(
            FEATURE_DMA_LOGGING_STOP | FEATURE_SET,
            control.as_bytes(),
            16,
        )?;
        Ok(())
    }

    /// v2 `DMA_LOGGING_REPORT`: the read-and-clear bitmap of `[iova, iova+length)`.
    pub fn dma_logging_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(length.div_ceil(page_size.max(1)));
        let report = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let data = self.feature(
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            report.as_bytes(),
            24 + usize::try_from(bytes).map_err(|_| ClientError::TooBig {
                command: Command::DeviceFeature,
                what: "the report's bitmap",
                value: bytes,
            })?,
        )?;
        words_at(
            &data,
            size_of::<DmaLoggingReport>(),
            bytes,
            Command::DeviceFeature,
        )
    }

    /// v1 `DIRTY_PAGES` START (true) or STOP (false).
    pub fn dirty_pages_log(&self, start: bool) -> Result<()> {
        let head = DirtyPages {
            argsz: 8,
            flags: if start {
                DIRTY_PAGES_FLAG_START
            } else {
                DIRTY_PAGES_FLAG_STOP
            },
        };
        self.call(Command::DirtyPages, &[head.as_bytes()], &[])?;
        Ok(())
    }

    /// v1 `DIRTY_PAGES` GET_BITMAP of `[iova, iova+size)` at `pgsize`.
    pub fn dirty_pages_bitmap(&self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(size.div_ceil(pgsize.max(1)));
        let head = DirtyPages {
            argsz: size32::<DirtyPages>()
                + size32::<DirtyBitmapRange>()
                + field32(Command::DirtyPages, "the bitmap's size", bytes)?,
            flags: DIRTY_PAGES_FLAG_GET_BITMAP,
        };
        let range = DirtyBitmapRange {
            iova,
            size,
            bitmap: DirtyBitmap {
                pgsize,
                size: bytes,
            },
        };
        let reply = self.call(
            Command::DirtyPages,
            &[head.as_bytes(), range.as_bytes()],
            &[],
        )?;
        words_at(
            &reply.payload,
            size_of::<DirtyPages>() + size_of::<DirtyBitmapRange>(),
            bytes,
            Command::DirtyPages,
        )
    }

    /// Takes the record of guest pages (IOVA / [`DMA_WRITE_PAGE`]) the server wrote with `DMA_WRITE`.
    pub fn take_dma_written_pages(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dma_written.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }
}

pub(super) fn words_at(
    payload: &[u8],
    at: usize,
    bytes: u64,
    command: Command,
) -> Result<Vec<u64>> {
    let raw = usize::try_from(bytes)
        .ok()
        .and_then(|n| payload.get(at..at.checked_add(n)?));
    let Some(raw) = raw else {
        return protocol(
            command,
            format!("the reply has no room for a {bytes}-byte bitmap"),
        );
    };
    Ok(vmig_dirty::le_bytes_to_words(raw))
}

/// Answers one `DMA_READ` / `DMA_WRITE` of the server from `memory`.
pub(super) fn serve_dma(
    endpoint: &Endpoint,
    memory: Option<&dyn DmaMemory>,
    written: &Mutex<BTreeSet<u64>>,
    message: Message,
) {
    let header = message.header;
    let head = read_struct::<DmaAccess>(&message.payload);
    let result = match (Command::from_u16(header.command), head, memory) {
        (_, _, None) => Err(libc::EINVAL),
        (Some(Command::DmaRead), Some(access), Some(memory)) => {
            match usize::try_from(access.count) {
                // More than this client's max_data_xfer_size: refuse, never answer short.
                Ok(count) if access.count <= caps::DEFAULT_MAX_DATA_XFER_SIZE => {
                    let mut data = vec![0u8; count];
                    memory
                        .read(access.addr, &mut data)
                        .map(|()| [access.as_bytes(), &data].concat())
                }
                _ => Err(libc::EINVAL),
            }
        }
        (Some(Command::DmaWrite), Some(access), Some(memory)) => {
            let data = &message.payload[size_of::<DmaAccess>()..];
            if data.len() as u64 != access.count {
                Err(libc::EINVAL)
            } else {
                memory.write(access.addr, data).map(|()| {
                    if !data.is_empty() {
                        let first = access.addr / DMA_WRITE_PAGE;
                        let last = (access.addr + data.len() as u64 - 1) / DMA_WRITE_PAGE;
                        written
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(first..=last);
                    }
                    access.as_bytes().to_vec()
                })
            }
        }
        _ => Err(libc::EINVAL),
    };
    let _ = match result {
        Ok(payload) => endpoint.reply(&header, &[&payload], &[]),
        Err(errno) => endpoint.reply_error(&header, errno),
    };
}
