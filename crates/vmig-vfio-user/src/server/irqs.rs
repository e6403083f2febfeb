//! IRQs: the eventfds the client wires to each vector of each IRQ index (`SET_IRQS`), their
//! masks, and the device's trigger. A signal never blocks the device: the eventfds are
//! non-blocking, and a full counter drops the signal. A signal on a vector the client masked
//! is held and sent when the client unmasks it; an index the device declares
//! `AUTOMASKED` (INTx) masks its vector as it signals, as vfio's INTx does. When the device
//! has a PCI function, wiring and unwiring MSI and MSI-X vectors is passed on to it
//! ([`PciFunction::vectors_wired`]).

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use zerocopy::IntoBytes;

#[cfg(doc)]
use super::PciFunction;
use super::{IrqSpec, Refusal, Reply, Session};
use crate::wire::{
    IRQ_INFO_AUTOMASKED, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, IrqInfo, SetIrqs,
};

/// One vector: the eventfd the client wired (if any), whether the client masked it, and
/// whether a signal arrived while it was masked.
#[derive(Default)]
pub(super) struct Vector {
    fd: Option<std::fs::File>,
    masked: bool,
    pending: bool,
}

impl Vector {
    /// Signals the eventfd, or holds the signal while masked; an automasked vector masks
    /// itself as it signals.
    fn signal(&mut self, automasked: bool) -> bool {
        use std::io::Write;
        if self.masked {
            self.pending = self.fd.is_some();
            return false;
        }
        let Some(fd) = &mut self.fd else {
            return false;
        };
        self.masked = automasked;
        fd.write_all(&1u64.to_ne_bytes()).is_ok()
    }

    /// Masks or unmasks; an unmask sends the signal the mask held.
    fn set_masked(&mut self, masked: bool, automasked: bool) {
        self.masked = masked;
        if !masked && std::mem::take(&mut self.pending) {
            self.signal(automasked);
        }
    }
}

/// IRQ eventfds wired by the client, by index and vector.
#[derive(Default)]
pub(super) struct Irqs {
    vectors: Mutex<Vec<Vec<Vector>>>,
    automasked: Vec<bool>,
}

impl Irqs {
    pub(super) fn new(spec: &[IrqSpec]) -> Self {
        Self {
            vectors: Mutex::new(
                spec.iter()
                    .map(|s| (0..s.count).map(|_| Vector::default()).collect())
                    .collect(),
            ),
            automasked: spec
                .iter()
                .map(|s| s.flags & IRQ_INFO_AUTOMASKED != 0)
                .collect(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Vec<Vector>>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn automasked(&self, index: u32) -> bool {
        self.automasked
            .get(index as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Signals `vector` of `index`: whether its eventfd was written (a masked vector holds
    /// the signal instead).
    pub(super) fn trigger(&self, index: u32, vector: u32) -> bool {
        let automasked = self.automasked(index);
        self.lock()
            .get_mut(index as usize)
            .and_then(|v| v.get_mut(vector as usize))
            .is_some_and(|v| v.signal(automasked))
    }

    /// Drops a signal `vector` of `index` holds (a level interrupt that was deasserted).
    pub(super) fn withdraw(&self, index: u32, vector: u32) {
        if let Some(v) = self
            .lock()
            .get_mut(index as usize)
            .and_then(|v| v.get_mut(vector as usize))
        {
            v.pending = false;
        }
    }
}

/// `DEVICE_GET_IRQ_INFO`.
pub(super) fn irq_info(s: &Session, index: u32) -> Result<Reply, Refusal> {
    let irq = s.spec.irqs.get(index as usize).ok_or_else(|| {
        Refusal::invalid(format!(
            "IRQ index {index}: the device has {}",
            s.spec.irqs.len()
        ))
    })?;
    let info = IrqInfo {
        argsz: 16,
        flags: irq.flags,
        index,
        count: irq.count,
    };
    Ok(Reply::data(info.as_bytes().to_vec()))
}

/// `DEVICE_SET_IRQS`.
pub(super) fn set_irqs(
    s: &mut Session,
    set: SetIrqs,
    bools: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Reply, Refusal> {
    let count = s
        .spec
        .irqs
        .get(set.index as usize)
        .map(|i| i.count)
        .ok_or_else(|| {
            Refusal::invalid(format!(
                "IRQ index {}: the device has {}",
                set.index,
                s.spec.irqs.len()
            ))
        })?;
    let automasked = s.irqs.automasked(set.index);
    let mut guard = s.irqs.lock();
    let vectors = &mut guard[set.index as usize];
    if set.count == 0
        && set.flags & IRQ_SET_DATA_NONE != 0
        && set.flags & IRQ_SET_ACTION_TRIGGER != 0
    {
        // Disable every vector of the index.
        vectors.iter_mut().for_each(|v| *v = Vector::default());
        drop(guard);
        if let Some(pci) = &s.spec.config_space {
            pci.index_disabled(set.index);
        }
        return Ok(Reply::empty());
    }
    let end = set
        .start
        .checked_add(set.count)
        .filter(|&e| e <= count)
        .ok_or_else(|| {
            Refusal::invalid(format!(
                "vectors {}+{} of IRQ index {} with {count}",
                set.start, set.count, set.index
            ))
        })?;
    let range = set.start as usize..end as usize;
    if set.flags & IRQ_SET_DATA_EVENTFD != 0 {
        let wired = !fds.is_empty();
        if wired {
            for (v, fd) in vectors[range.clone()].iter_mut().zip(fds) {
                // A signal must never block the device: a full counter or a pipe drops it.
                crate::sys::set_nonblocking(&fd).map_err(|e| {
                    Refusal::caused(libc::EINVAL, "an IRQ fd cannot be made non-blocking", e)
                })?;
                v.fd = Some(std::fs::File::from(fd));
            }
        } else {
            vectors[range]
                .iter_mut()
                .for_each(|v| *v = Vector::default());
        }
        drop(guard);
        if let Some(pci) = &s.spec.config_space {
            pci.vectors_wired(set.index, set.start..end, wired, &s.irqs);
        }
        return Ok(Reply::empty());
    }
    let selected: Vec<usize> = range
        .clone()
        .filter(|&i| set.flags & IRQ_SET_DATA_BOOL == 0 || bools[i - set.start as usize] != 0)
        .collect();
    for i in selected {
        let v = &mut vectors[i];
        if set.flags & IRQ_SET_ACTION_MASK != 0 {
            v.set_masked(true, automasked);
        } else if set.flags & IRQ_SET_ACTION_UNMASK != 0 {
            v.set_masked(false, automasked);
        } else {
            v.signal(automasked);
        }
    }
    Ok(Reply::empty())
}

#[cfg(test)]
impl Irqs {
    /// Wires `vector` of `index` to a pipe, as `SET_IRQS` wires an eventfd; returns the
    /// read end, which receives 8 bytes per signal.
    pub(super) fn wire_pipe(&self, index: u32, vector: u32) -> std::io::PipeReader {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        crate::sys::set_nonblocking(&reader).expect("a non-blocking pipe");
        self.lock()[index as usize][vector as usize].fd = Some(OwnedFd::from(writer).into());
        reader
    }

    /// Masks or unmasks `vector` of `index` as `SET_IRQS` `ACTION_MASK` / `ACTION_UNMASK`
    /// does (an unmask sends what the mask held).
    pub(super) fn set_masked(&self, index: u32, vector: u32, masked: bool) {
        let automasked = self.automasked(index);
        self.lock()[index as usize][vector as usize].set_masked(masked, automasked);
    }
}
