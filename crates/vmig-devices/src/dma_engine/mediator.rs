//! The dma-engine's migration mediator (seed 002), for an engine whose DMA nothing tracks
//! ([`super::Options::hidden_dma`]): during a migration the VMM traps the engine's doorbell
//! page, hands each guest write there to [`Mediation::doorbell`] before passing it on, and asks
//! [`Mediation::harvest`] at every harvest which buffers the engine may have written.
//!
//! The rule it follows is the ring's ownership: the engine writes record `seq` into buffer
//! `ring[seq % RING_SIZE]` only while `seq < CONSUMER + RING_SIZE`, and each record it wrote
//! shows in `PRODUCER`. So from the doorbell writes (`CONSUMER`), the ring registers and the
//! engine's `PRODUCER`, the buffers it may write from one harvest to the next are those of
//! records `reported..CONSUMER + RING_SIZE`, where `reported` is the `PRODUCER` of the last
//! harvest: the records written since, and those the guest has granted and the engine not yet
//! written. Every harvest marks them; the last one, with the engine stopped, marks every buffer
//! it still owns. Anything that breaks the rule (the ring was reset or resized, `PRODUCER` went
//! back) marks the whole ring. A doorbell the mediator did not see (one racing with the start
//! of tracking, or one written to BAR0's `CONSUMER` register, which is not trapped) still
//! counts: each harvest also reads `CONSUMER`, and every record the engine wrote since shows in
//! `PRODUCER` whatever the mediator knew of the doorbell.
//!
//! It assumes what a ring driver guarantees: the guest does not rewrite the address of a
//! buffer the engine owns. Like the guest driver ([`super::driver`]) it is written against the
//! small [`Bar0`] and [`GuestRam`] traits; the VMM adapts them and its mediator interface.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmig_primitives::{GuestAddress, PAGE_SIZE};

use super::driver::{self, Bar0, DriverError, GuestRam};
use super::{BAR0_SIZE_WITH_DOORBELL, DOORBELL_PAGE, MAX_RING, RECORD_SIZE, reg};

/// The region the mediator traps: BAR0.
pub const TRAP_REGION: u32 = 0;
/// Where in BAR0 it traps: the doorbell page.
pub const TRAP_OFFSET: u64 = DOORBELL_PAGE;
/// How much it traps: the page.
pub const TRAP_LEN: u64 = PAGE_SIZE;

/// The mediator: it hands out a handle per engine it takes and counts those still open.
#[derive(Debug, Default)]
pub struct Mediator {
    next_handle: AtomicU64,
    open: Arc<AtomicUsize>,
}

impl Mediator {
    /// A mediator with no engine open.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the device behind `regs` if it is a dma-engine with a doorbell page in a BAR0 of
    /// `bar0_size` bytes, and that page is mapped into the guest (`doorbell_mapped`: else every
    /// doorbell write traps anyway, and there is nothing to trap).
    pub fn open(
        &self,
        regs: &dyn Bar0,
        bar0_size: u64,
        doorbell_mapped: bool,
    ) -> Option<Mediation> {
        if bar0_size < BAR0_SIZE_WITH_DOORBELL
            || !doorbell_mapped
            || !driver::is_dma_engine(regs, bar0_size)
        {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Mediation {
            handle: self.next_handle.fetch_add(1, Ordering::Relaxed) + 1,
            open: Arc::clone(&self.open),
            state: Mutex::new(State::default()),
            doorbell_writes: AtomicU64::new(0),
        })
    }

    /// Engines open now: a handle released (dropped) is no longer counted.
    pub fn open_devices(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// The mediator's handle for one engine; dropping it releases the engine.
#[derive(Debug)]
pub struct Mediation {
    handle: u64,
    open: Arc<AtomicUsize>,
    state: Mutex<State>,
    doorbell_writes: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    tracking: bool,
    /// The highest `CONSUMER` the guest wrote, or the engine had when tracking began.
    consumer: u64,
    /// `PRODUCER` at the last harvest (or the start): records from here on may be in buffers
    /// not yet marked since they were written.
    reported: u64,
}

impl Drop for Mediation {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Mediation {
    /// Tells this handle apart from the mediator's others (1, 2, ...).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracking begins, with the doorbell page already trapped: from here on every doorbell
    /// write reaches [`Mediation::doorbell`], so the engine's `CONSUMER` now is the last one
    /// the guest wrote without the mediator seeing it.
    pub fn start(&self, regs: &dyn Bar0) -> Result<(), DriverError> {
        let consumer = driver::read(regs, reg::CONSUMER)?;
        let producer = driver::read(regs, reg::PRODUCER)?;
        let mut s = self.state();
        s.consumer = consumer;
        s.reported = producer;
        s.tracking = true;
        self.doorbell_writes.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// A guest write into the trapped page at `offset` of BAR0 (the VMM passes it on to the
    /// engine after this): a write of the doorbell grants the engine the buffers up to
    /// `CONSUMER + RING_SIZE`.
    pub fn doorbell(&self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(data) else {
            return;
        };
        if offset != reg::DOORBELL {
            return;
        }
        let value = u64::from_le_bytes(bytes);
        let mut s = self.state();
        if s.tracking {
            self.doorbell_writes.fetch_add(1, Ordering::Relaxed);
            // Only ever more: a lower value the engine refuses grants nothing.
            s.consumer = s.consumer.max(value);
        }
    }

    /// Doorbell writes seen since tracking began.
    pub fn doorbell_writes(&self) -> u64 {
        self.doorbell_writes.load(Ordering::Relaxed)
    }

    /// Calls `mark(iova, bytes)` for each buffer the engine may have written since the last
    /// harvest or may write before the next (see the module doc), reading the ring registers
    /// and `PRODUCER` through `regs` and the ring through `ram` (IOVA = guest-physical
    /// address, as the VMM maps guest RAM).
    pub fn harvest(
        &self,
        regs: &dyn Bar0,
        ram: &dyn GuestRam,
        mark: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DriverError> {
        let ring_base = driver::read(regs, reg::RING_BASE)?;
        let ring_size = driver::read(regs, reg::RING_SIZE)?.min(MAX_RING);
        let producer = driver::read(regs, reg::PRODUCER)?;
        let consumer = driver::read(regs, reg::CONSUMER)?;
        let mut s = self.state();
        // A CONSUMER written where the mediator does not trap (BAR0's 0x28) counts too.
        s.consumer = s.consumer.max(consumer);
        let first = s.reported;
        s.reported = producer;
        if ring_size == 0 {
            // No ring: the engine writes nothing.
            return Ok(());
        }
        let mut table = vec![0u8; usize::try_from(ring_size * 8).unwrap_or(0)];
        ram.read(GuestAddress(ring_base), &mut table)
            .map_err(|source| DriverError::Memory {
                gpa: GuestAddress(ring_base),
                source,
            })?;
        let buffer = |seq: u64| {
            let at = usize::try_from(seq % ring_size * 8).unwrap_or(0);
            table
                .get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes)
        };
        let end = s.consumer.saturating_add(ring_size);
        let window = (producer >= first && end >= first)
            .then(|| end - first)
            .filter(|&len| len < ring_size);
        match window {
            Some(len) => (first..first + len).for_each(|seq| mark(buffer(seq), RECORD_SIZE as u64)),
            // The rule does not hold (reset, resize), or the window spans the ring: all of it.
            None => (0..ring_size).for_each(|seq| mark(buffer(seq), RECORD_SIZE as u64)),
        }
        Ok(())
    }

    /// Tracking ends.
    pub fn stop(&self) {
        self.state().tracking = false;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;
    use crate::dma_engine::driver::AccessError;
    use crate::dma_engine::{BAR0_SIZE, ID};

    /// The engine's registers as plain values.
    #[derive(Default)]
    struct Regs {
        ring_base: u64,
        ring_size: u64,
        producer: u64,
        consumer: u64,
    }

    struct FakeBar0(RefCell<Regs>);

    impl Bar0 for FakeBar0 {
        fn read_reg(&self, offset: u64) -> Result<u64, AccessError> {
            let r = self.0.borrow();
            Ok(match offset {
                reg::ID => ID,
                reg::RING_BASE => r.ring_base,
                reg::RING_SIZE => r.ring_size,
                reg::PRODUCER => r.producer,
                reg::CONSUMER => r.consumer,
                _ => 0,
            })
        }

        fn write_reg(&self, _: u64, _: u64) -> Result<(), AccessError> {
            Ok(())
        }
    }

    /// A ring of 8 entries at 0x1000 whose buffer i is at 0x10000 + i × 4096.
    struct Ring;

    const RING: u64 = 8;

    impl GuestRam for Ring {
        fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), AccessError> {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let entry = (gpa.raw() - 0x1000) / 8 + i as u64;
                chunk.copy_from_slice(&(0x10000 + entry * 4096).to_le_bytes());
            }
            Ok(())
        }

        fn write(&self, _: GuestAddress, _: &[u8]) -> Result<(), AccessError> {
            Ok(())
        }
    }

    fn engine(producer: u64, consumer: u64) -> FakeBar0 {
        FakeBar0(RefCell::new(Regs {
            ring_base: 0x1000,
            ring_size: RING,
            producer,
            consumer,
        }))
    }

    /// A mediation of the engine behind `regs`, tracking.
    fn tracking(regs: &FakeBar0) -> Mediation {
        let m = Mediator::new()
            .open(regs, BAR0_SIZE_WITH_DOORBELL, true)
            .unwrap();
        m.start(regs).unwrap();
        m
    }

    /// The buffer indexes one harvest marks.
    fn harvest(m: &Mediation, regs: &FakeBar0) -> BTreeSet<u64> {
        let mut marked = BTreeSet::new();
        m.harvest(regs, &Ring, &mut |iova, len| {
            assert_eq!(len, RECORD_SIZE as u64);
            marked.insert((iova - 0x10000) / 4096);
        })
        .unwrap();
        marked
    }

    #[test]
    fn it_takes_only_an_engine_with_a_mapped_doorbell_page_and_each_gets_its_own_handle() {
        let mediator = Mediator::new();
        let regs = engine(0, 0);
        assert!(
            mediator.open(&regs, BAR0_SIZE, true).is_none(),
            "no doorbell page"
        );
        assert!(
            mediator
                .open(&regs, BAR0_SIZE_WITH_DOORBELL, false)
                .is_none(),
            "the page is not mapped"
        );
        let a = mediator.open(&regs, BAR0_SIZE_WITH_DOORBELL, true).unwrap();
        let b = mediator.open(&regs, BAR0_SIZE_WITH_DOORBELL, true).unwrap();
        assert_ne!(a.handle(), b.handle());
        assert_eq!(mediator.open_devices(), 2);
        drop(a);
        assert_eq!(mediator.open_devices(), 1, "dropping a handle releases it");
        drop(b);
        assert_eq!(mediator.open_devices(), 0);
    }

    #[test]
    fn each_harvest_marks_the_records_written_since_and_the_buffers_the_guest_granted() {
        let regs = engine(10, 9);
        let m = tracking(&regs);
        // Records 10..17 may come (CONSUMER 9 + 8): buffers 10 % 8 .. 16 % 8.
        assert_eq!(harvest(&m, &regs), BTreeSet::from([2, 3, 4, 5, 6, 7, 0]));
        // The engine wrote 10..12; the guest consumed up to 11 (a trapped doorbell): records
        // 12..18 may still come, and 10, 11 were written since the last harvest.
        regs.0.borrow_mut().producer = 12;
        m.doorbell(reg::DOORBELL, &11u64.to_le_bytes());
        assert_eq!(m.doorbell_writes(), 1);
        assert_eq!(
            harvest(&m, &regs),
            (0..8).collect(),
            "10..19 spans the ring"
        );
        // The guest stops consuming: the engine fills the ring to 19 and stalls.
        regs.0.borrow_mut().producer = 19;
        assert_eq!(
            harvest(&m, &regs),
            BTreeSet::from([4, 5, 6, 7, 0, 1, 2]),
            "records 12..19 were written since"
        );
        assert!(
            harvest(&m, &regs).is_empty(),
            "the ring is full and nothing was written: the engine owns no buffer"
        );
    }

    #[test]
    fn a_doorbell_the_mediator_did_not_see_still_counts_and_a_reset_ring_is_marked_whole() {
        let regs = engine(4, 4);
        let m = tracking(&regs);
        harvest(&m, &regs);
        // CONSUMER written through BAR0's register, not the doorbell page.
        {
            let mut r = regs.0.borrow_mut();
            r.producer = 12;
            r.consumer = 12;
        }
        assert_eq!(harvest(&m, &regs), (0..8).collect());
        // A reset: PRODUCER went back.
        {
            let mut r = regs.0.borrow_mut();
            r.producer = 1;
            r.consumer = 0;
        }
        assert_eq!(harvest(&m, &regs), (0..8).collect());
    }

    #[test]
    fn writes_elsewhere_in_the_page_grant_nothing_and_a_lower_doorbell_takes_nothing_back() {
        let regs = engine(0, 0);
        let m = tracking(&regs);
        m.doorbell(reg::DOORBELL + 8, &100u64.to_le_bytes());
        m.doorbell(reg::DOORBELL, &[1, 2, 3, 4]);
        assert_eq!(m.doorbell_writes(), 0);
        assert_eq!(harvest(&m, &regs), (0..8).collect(), "0..8 spans the ring");
        regs.0.borrow_mut().producer = 2;
        m.doorbell(reg::DOORBELL, &2u64.to_le_bytes());
        m.doorbell(reg::DOORBELL, &1u64.to_le_bytes());
        assert_eq!(harvest(&m, &regs), (0..8).collect(), "records 0..10");
        regs.0.borrow_mut().producer = 9;
        m.doorbell(reg::DOORBELL, &9u64.to_le_bytes());
        assert_eq!(
            harvest(&m, &regs),
            (0..8).collect(),
            "records 2..9 written since, 9..17 granted"
        );
        assert_eq!(
            harvest(&m, &regs),
            BTreeSet::from([1, 2, 3, 4, 5, 6, 7, 0]),
            "records 9..17 granted: every buffer"
        );
    }
}
