//! The device's access path: DMA reads and writes walked mapping by mapping, host slices for
//! zero-copy access, and the dirty marks a write leaves.

use std::ops::Range;
use std::sync::{Arc, RwLockReadGuard};

use super::table::{MessageMapping, State, Target};
use super::{Iommu, MessageDmaError, Prot, checked_last, host_len};
use crate::error::{DmaError, Result, invalid};
use vmig_primitives::{HostMemory, Iova};

/// A run of host memory that a range of IOVA translates to, valid inside
/// [`Iommu::with_host_slices`].
#[derive(Debug)]
pub struct HostSlice<'a> {
    pub(super) memory: &'a HostMemory,
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) iova: u64,
}

impl HostSlice<'_> {
    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Host address of the first byte, for code that must hand a pointer to another API.
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.as_ptr().wrapping_add(self.offset)
    }
    /// Copies from the slice at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.bounds(offset, buf.len())?;
        self.memory
            .read(self.offset + offset, buf)
            .map_err(|e| DmaError::os("reading host memory", e))
    }
    /// Copies `data` into the slice at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.bounds(offset, data.len())?;
        self.memory
            .write(self.offset + offset, data)
            .map_err(|e| DmaError::os("writing host memory", e))
    }
    pub(super) fn bounds(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => invalid!(
                "[{offset:#x}, +{len:#x}) is outside a slice of {:#x} bytes",
                self.len
            ),
        }
    }
}

/// One mapping's part of an access.
pub(super) enum Piece<'s> {
    /// Host memory the IOMMU reaches itself.
    Host(HostSlice<'s>),
    /// Memory of the owner of a message-backed mapping.
    Message {
        mapping: &'s Arc<MessageMapping>,
        iova: u64,
        len: usize,
    },
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::Host(slice) => slice.len,
            Piece::Message { len, .. } => *len,
        }
    }
}

/// Takes the in-flight lock of every message-backed part of an access, shared, while the
/// caller still holds the table's lock: an unmap that removes one of the mappings then waits
/// for the access to end.
fn hold_in_flight(
    parts: &[(Arc<MessageMapping>, u64, Range<usize>)],
) -> Vec<RwLockReadGuard<'_, ()>> {
    parts
        .iter()
        .map(|(mapping, _, _)| mapping.in_flight.read().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// The error of a message-backed access of `len` bytes at `iova` its owner did not carry.
fn by_message_error(iova: u64, len: usize) -> impl FnOnce(MessageDmaError) -> DmaError {
    move |source| DmaError::Message {
        iova,
        len: len as u64,
        source,
    }
}

impl Iommu {
    /// Walks `[iova, iova+len)` mapping by mapping, checking each piece is mapped with
    /// `access`, and calls `f` with its memory; stops at the first refusal.
    pub(super) fn walk<'s>(
        &self,
        state: &'s State,
        iova: u64,
        len: u64,
        access: Prot,
        mut f: impl FnMut(Piece<'s>) -> Result<()>,
    ) -> Result<()> {
        let Some(last) = checked_last(iova, len) else {
            return invalid!(
                "DMA of {len:#x} bytes at {iova:#x}: empty or wrapping past the IOVA space"
            );
        };
        let mut cur = iova;
        loop {
            let m = state.find(cur).ok_or_else(|| {
                DmaError::Invalid(format!("DMA to iova {cur:#x}, which is not mapped"))
            })?;
            if !m.prot.contains(access) {
                return Err(DmaError::Perm(format!(
                    "DMA {access:?} at iova {cur:#x}, mapped {:?}",
                    m.prot
                )));
            }
            let seg_last = m.last().min(last);
            let len = host_len(seg_last - cur + 1);
            f(match &m.target {
                Target::Host { memory, offset } => Piece::Host(HostSlice {
                    memory,
                    offset: offset + host_len(cur - m.iova),
                    len,
                    iova: cur,
                }),
                Target::Message(mapping) => Piece::Message {
                    mapping,
                    iova: cur,
                    len,
                },
            })?;
            if seg_last == last {
                return Ok(());
            }
            cur = seg_last + 1;
        }
    }

    /// Like [`Iommu::walk`], but checks the whole range before calling `f` at all, so an
    /// access is refused whole or done whole.
    pub(super) fn walk_checked<'s>(
        &self,
        state: &'s State,
        iova: u64,
        len: u64,
        access: Prot,
        f: impl FnMut(Piece<'s>) -> Result<()>,
    ) -> Result<()> {
        self.walk(state, iova, len, access, |_| Ok(()))?;
        self.walk(state, iova, len, access, f)
    }

    /// Marks the pages of `[iova, iova+len)` dirty while tracking is on: one atomic operation
    /// per bitmap word, at most one per page.
    pub(super) fn mark_locked(&self, state: &State, iova: u64, len: u64) {
        let last = iova + (len - 1);
        let mut cur = iova;
        while let Some(m) = state.find(cur) {
            let seg_last = m.last().min(last);
            if let Some(bitmap) = &m.dirty {
                let first = (cur - m.iova) >> self.page_shift;
                let end = (seg_last - m.iova) >> self.page_shift;
                let _ = bitmap.set_range(first, end - first + 1);
            }
            if seg_last == last {
                break;
            }
            cur = seg_last + 1;
        }
    }

    /// Device read of guest memory by DMA (`vfio_dma_rw`, read). Never marks pages dirty.
    ///
    /// Host memory is read under the table's read lock; the parts of message-backed mappings
    /// are read after it is released, each mapping held by its in-flight lock, so a slow owner
    /// holds up only an unmap of its own mappings.
    pub fn read(&self, iova: Iova, buf: &mut [u8]) -> Result<()> {
        let iova = iova.raw();
        let state = self.lock_read();
        let mut done = 0;
        let mut by_message: Vec<(Arc<MessageMapping>, u64, Range<usize>)> = Vec::new();
        self.walk_checked(&state, iova, buf.len() as u64, Prot::READ, |piece| {
            let n = piece.len();
            match piece {
                Piece::Host(slice) => slice.read_at(0, &mut buf[done..done + n])?,
                Piece::Message { mapping, iova, .. } => {
                    by_message.push((Arc::clone(mapping), iova, done..done + n));
                }
            }
            done += n;
            Ok(())
        })?;
        let _in_flight = hold_in_flight(&by_message);
        drop(state);
        for (mapping, iova, part) in &by_message {
            mapping
                .owner
                .read(*iova, &mut buf[part.clone()])
                .map_err(by_message_error(*iova, part.len()))?;
        }
        Ok(())
    }

    /// Device write of guest memory by DMA (`vfio_dma_rw`, write): the data lands first, then
    /// its pages are marked dirty, so a harvest never reports a page before the write that
    /// dirtied it. Nothing is written if any part of the range is unmapped or read-only.
    ///
    /// Message-backed parts are written after the table's lock is released, as
    /// [`Iommu::read`] reads them; their owner records those writes itself.
    pub fn write(&self, iova: Iova, data: &[u8]) -> Result<()> {
        let iova = iova.raw();
        let state = self.lock_read();
        let mut done = 0;
        let mut by_message: Vec<(Arc<MessageMapping>, u64, Range<usize>)> = Vec::new();
        self.walk_checked(&state, iova, data.len() as u64, Prot::WRITE, |piece| {
            let n = piece.len();
            match piece {
                Piece::Host(slice) => slice.write_at(0, &data[done..done + n])?,
                Piece::Message { mapping, iova, .. } => {
                    by_message.push((Arc::clone(mapping), iova, done..done + n));
                }
            }
            done += n;
            Ok(())
        })?;
        if state.tracking {
            self.mark_locked(&state, iova, data.len() as u64);
        }
        let _in_flight = hold_in_flight(&by_message);
        drop(state);
        for (mapping, iova, part) in &by_message {
            mapping
                .owner
                .write(*iova, &data[part.clone()])
                .map_err(by_message_error(*iova, part.len()))?;
        }
        Ok(())
    }

    /// Records that the device wrote `[iova, iova+len)` by other means (for example through a
    /// pointer from [`Iommu::with_host_slices`] kept beyond it).
    pub fn mark_dirty(&self, iova: Iova, len: u64) -> Result<()> {
        let iova = iova.raw();
        let state = self.lock_read();
        self.walk(&state, iova, len, Prot::WRITE, |_| Ok(()))?;
        if state.tracking {
            self.mark_locked(&state, iova, len);
        }
        Ok(())
    }

    /// Runs `f` with the host memory of `[iova, iova+len)`, checked for `access`. The mappings
    /// cannot go away while `f` runs (unmap waits), so the slices are valid throughout. When
    /// `access` includes WRITE the range is marked dirty after `f` returns.
    ///
    /// A message-backed mapping in the range has no host memory to hand out (`EFAULT`).
    ///
    /// `f` must not call this IOMMU at all: the table's read lock is held while it runs, and a
    /// second read lock waits behind any map or unmap queued meanwhile, which waits for `f`.
    pub fn with_host_slices<R>(
        &self,
        iova: Iova,
        len: u64,
        access: Prot,
        f: impl FnOnce(&[HostSlice<'_>]) -> R,
    ) -> Result<R> {
        let iova = iova.raw();
        let state = self.lock_read();
        let mut slices = Vec::new();
        self.walk(&state, iova, len, access, |piece| match piece {
            Piece::Host(slice) => {
                slices.push(slice);
                Ok(())
            }
            Piece::Message { iova, len, .. } => Err(DmaError::Fault(format!(
                "[{iova:#x}, +{len:#x}) is mapped by messages to the memory's owner: it has no host memory to hand out"
            ))),
        })?;
        let result = f(&slices);
        if access.contains(Prot::WRITE) && state.tracking {
            self.mark_locked(&state, iova, len);
        }
        Ok(result)
    }
}
