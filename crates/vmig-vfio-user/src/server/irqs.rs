//! IRQs: the eventfds the client wires to each vector of each IRQ index (`SET_IRQS`), their
//! masks, and the device's trigger. A signal never blocks the device: the eventfds are
//! non-blocking, and a full counter drops the signal.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use zerocopy::IntoBytes;

use super::{IrqSpec, Refusal, Reply, Session};
use crate::wire::{
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, IrqInfo, SetIrqs,
};

/// One vector: the eventfd the client wired (if any) and whether it is masked.
type Vector = (Option<std::fs::File>, bool);

/// IRQ eventfds wired by the client, by index and vector.
#[derive(Default)]
pub(super) struct Irqs {
    vectors: Mutex<Vec<Vec<Vector>>>,
}

impl Irqs {
    pub(super) fn new(spec: &[IrqSpec]) -> Self {
        Self {
            vectors: Mutex::new(
                spec.iter()
                    .map(|s| (0..s.count).map(|_| (None, false)).collect())
                    .collect(),
            ),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Vec<Vector>>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn trigger(&self, index: u32, vector: u32) -> bool {
        use std::io::Write;
        let mut vectors = self.lock();
        match vectors
            .get_mut(index as usize)
            .and_then(|v| v.get_mut(vector as usize))
        {
            Some((Some(fd), false)) => fd.write_all(&1u64.to_ne_bytes()).is_ok(),
            _ => false,
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
    let mut vectors = s.irqs.lock();
    let vectors = &mut vectors[set.index as usize];
    if set.count == 0
        && set.flags & IRQ_SET_DATA_NONE != 0
        && set.flags & IRQ_SET_ACTION_TRIGGER != 0
    {
        // Disable every vector of the index.
        vectors.iter_mut().for_each(|v| *v = (None, false));
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
        if fds.is_empty() {
            vectors[range].iter_mut().for_each(|v| v.0 = None);
        } else {
            for (v, fd) in vectors[range].iter_mut().zip(fds) {
                // A signal must never block the device: a full counter or a pipe drops it.
                crate::sys::set_nonblocking(&fd).map_err(|e| {
                    Refusal::caused(libc::EINVAL, "an IRQ fd cannot be made non-blocking", e)
                })?;
                v.0 = Some(std::fs::File::from(fd));
            }
        }
        return Ok(Reply::empty());
    }
    let selected: Vec<usize> = range
        .clone()
        .filter(|&i| set.flags & IRQ_SET_DATA_BOOL == 0 || bools[i - set.start as usize] != 0)
        .collect();
    for i in selected {
        if set.flags & IRQ_SET_ACTION_MASK != 0 {
            vectors[i].1 = true;
        } else if set.flags & IRQ_SET_ACTION_UNMASK != 0 {
            vectors[i].1 = false;
        } else if let (Some(fd), false) = &mut vectors[i] {
            use std::io::Write;
            let _ = fd.write_all(&1u64.to_ne_bytes());
        }
    }
    Ok(Reply::empty())
}
