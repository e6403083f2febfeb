//! Migration mediators (seed 002's "mediate ops"): device-specific code for a passed-through
//! device whose DMA no IOMMU and no log of its own tracks. Outside migration the device's BARs
//! stay mapped into the guest; only while a migration runs does the engine trap the part of a
//! BAR its mediator asks for (a ring's doorbell page), so that the mediator sees every guest
//! write there, passes it on to the device, and derives from those writes and the device's
//! registers which pages the device may write by DMA: a dirty source like the others.
//!
//! ```text
//!  Machine::attach, per device after its guest driver: its PCI vendor:device
//!     each registered Mediator in order: serves(id)? ── open(ctx) ── None: the next one
//!                                                           └── Some(handle): it owns the device
//!  migrate, at the start of tracking:
//!     the device logs its own DMA (or the IOMMU tracks it precisely)? ── yes: the handle stays idle
//!     no: the memslots of handle.traps() are removed ── guest accesses there exit:
//!         each write ── handle.write ── PassThrough? ── the device's region write
//!         each harvest ── handle.harvest ── the IOVA ranges the device may have written
//!  completed, failed or cancelled ── the memslots come back: the guest's accesses exit no more
//!  the device goes (its Machine is dropped) ── the handle is dropped: the mediator's release
//! ```
//!
//! The rules are the seed's (S2:L84-119, S2:L294-303): a mediator may serve many devices, the
//! first that accepts a device owns it, with a handle of its own per device (two devices of one
//! vendor:device are told apart by it), release is guaranteed when the device goes, trapping is
//! undone when the migration fails, and trapping is never used where the device or its IOMMU
//! tracks DMA precisely. The mediators themselves live with their devices (`vmig-devices`);
//! the engine names none.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmig_kvm::{GuestMemory, Vm};

use crate::device::MigratableDevice;
use crate::error::{MigrationError, Result};
use crate::machine::{Bar, MappedArea};

/// A PCI function's vendor and device IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
}

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// What a mediator sees of a device it is offered.
pub struct MediatorContext<'a> {
    /// The device's index in the machine (its `--device` position).
    pub index: usize,
    /// The device's name in reports.
    pub name: &'a str,
    /// Its PCI IDs.
    pub id: PciId,
    /// The device: region access that does not go through the guest.
    pub device: &'a dyn MigratableDevice,
    /// Its BARs in the guest.
    pub bars: &'a [Bar],
    /// Its memory mapped into the guest.
    pub mapped: &'a [MappedArea],
}

/// A mediator: registered with the engine for the devices it serves.
pub trait Mediator: Send + Sync {
    /// A name for reports.
    fn name(&self) -> &str;
    /// The devices it serves, by PCI ID; only those are offered to it.
    fn serves(&self) -> &[PciId];
    /// Takes the device (a handle of its own for it) if it mediates this one, `None` if not.
    /// An error fails the attach.
    fn open(&self, ctx: &MediatorContext<'_>) -> Result<Option<Box<dyn Mediation>>>;
}

/// A part of a BAR that a mediator traps during migration: one of the device's mapped areas
/// ([`MappedArea`]), given by its region and its offset in the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trap {
    /// The region (BAR index).
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What happens to a trapped access after the mediator saw it (seed 002's `pt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// It goes on to the device.
    PassThrough,
    /// The mediator handled it; the device does not see it.
    Handled,
}

/// A mediator's handle for one device: dropping it is the mediator's release.
pub trait Mediation: Send + Sync + fmt::Debug {
    /// Tells this handle apart from the mediator's others.
    fn handle(&self) -> u64;
    /// What to trap during migration: each must be one of the device's mapped areas.
    fn traps(&self) -> Vec<Trap>;
    /// Tracking begins: the traps are in place (every guest access there from now on reaches
    /// [`Mediation::write`]).
    fn start(&self, device: &dyn MigratableDevice, memory: &GuestMemory) -> Result<()>;
    /// A guest write into a trap, at `offset` in `region`.
    fn write(&self, device: &dyn MigratableDevice, region: u32, offset: u64, data: &[u8])
    -> Access;
    /// Calls `mark(iova, bytes)` for every range the device may have written by DMA since the
    /// last harvest (or the start) or may write before the next: complete when the device is
    /// stopped.
    fn harvest(
        &self,
        device: &dyn MigratableDevice,
        memory: &GuestMemory,
        mark: &mut dyn FnMut(u64, u64),
    ) -> Result<()>;
    /// Tracking ends; the traps are gone again.
    fn stop(&self);
}

/// The engine's side of one mediated device: the handle, where its traps are in the guest,
/// whether they are engaged, and what trapping cost in this migration.
pub struct MediatedDevice {
    /// The mediator's name.
    pub mediator: String,
    handle: Box<dyn Mediation>,
    /// The traps and their guest-physical addresses.
    traps: Vec<(Trap, u64)>,
    engaged: AtomicBool,
    writes: AtomicU64,
    write_ns: AtomicU64,
}

impl fmt::Debug for MediatedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediatedDevice")
            .field("mediator", &self.mediator)
            .field("handle", &self.handle)
            .field("traps", &self.traps)
            .field("engaged", &self.engaged)
            .finish_non_exhaustive()
    }
}

/// What trapping cost a migration, per mediated device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediationStats {
    /// The mediator.
    pub mediator: String,
    /// Its handle for the device.
    pub handle: u64,
    /// Whether it trapped (false: the device or its IOMMU tracks DMA itself).
    pub trapped: bool,
    /// Guest writes that trapped into the mediator (one MMIO exit each).
    pub trapped_writes: u64,
    /// The VMM's mean time handling one of them (the mediator, then the device's region
    /// write), in nanoseconds; the exit itself comes on top.
    pub mean_write_ns: u64,
}

impl MediatedDevice {
    /// Checks that every trap of `handle` is one of `mapped` (in `bars`).
    pub(crate) fn new(
        mediator: &str,
        handle: Box<dyn Mediation>,
        bars: &[Bar],
        mapped: &[MappedArea],
    ) -> std::result::Result<Self, String> {
        let mut traps = Vec::new();
        for trap in handle.traps() {
            let gpa = bars
                .iter()
                .find(|b| b.index == trap.region)
                .and_then(|b| b.gpa.raw().checked_add(trap.offset))
                .filter(|&gpa| {
                    mapped.iter().any(|m| {
                        m.region == trap.region && m.gpa.raw() == gpa && m.len == trap.len
                    })
                })
                .ok_or_else(|| {
                    format!(
                        "mediator {mediator} asks to trap region {} at {:#x} ({:#x} bytes), which is not one of the device's mapped areas",
                        trap.region, trap.offset, trap.len
                    )
                })?;
            traps.push((trap, gpa));
        }
        Ok(Self {
            mediator: mediator.to_string(),
            handle,
            traps,
            engaged: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            write_ns: AtomicU64::new(0),
        })
    }

    /// The handle.
    pub fn handle(&self) -> &dyn Mediation {
        self.handle.as_ref()
    }

    /// Whether the traps are engaged.
    pub fn engaged(&self) -> bool {
        self.engaged.load(Ordering::Acquire)
    }

    /// Guest writes that trapped into the mediator since the last
    /// [`MediatedDevice::reset_counters`].
    pub fn trapped_writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// This migration's stats.
    pub fn stats(&self) -> MediationStats {
        let writes = self.trapped_writes();
        MediationStats {
            mediator: self.mediator.clone(),
            handle: self.handle.handle(),
            trapped: true,
            trapped_writes: writes,
            mean_write_ns: self
                .write_ns
                .load(Ordering::Relaxed)
                .checked_div(writes)
                .unwrap_or(0),
        }
    }

    /// Whether a guest access at `offset` of `region`, `len` bytes, falls in a trap.
    fn covers(&self, region: u32, offset: u64, len: usize) -> bool {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        self.traps.iter().any(|(t, _)| {
            t.region == region
                && offset >= t.offset
                && (offset - t.offset).saturating_add(len) <= t.len
        })
    }

    /// A guest write that exited at `offset` of `region`: the mediator's when it falls in an
    /// engaged trap (`true`), else not handled here (`false`).
    pub(crate) fn trapped_write(
        &self,
        device: &dyn MigratableDevice,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> bool {
        if !self.engaged() || !self.covers(region, offset, data.len()) {
            return false;
        }
        let started = Instant::now();
        if self.handle.write(device, region, offset, data) == Access::PassThrough {
            // As any trapped write of a device that stopped answering: dropped.
            let _ = device.region_write(region, offset, data);
        }
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_ns.fetch_add(ns, Ordering::Relaxed);
        true
    }

    /// A migration begins: what trapping costs is counted from zero.
    pub(crate) fn reset_counters(&self) {
        self.writes.store(0, Ordering::Relaxed);
        self.write_ns.store(0, Ordering::Relaxed);
    }

    /// Traps: from now on guest writes in the traps reach the mediator (then the device),
    /// then the memslots go, then the mediator starts. On failure nothing stays trapped.
    pub(crate) fn engage(&self, vm: &Vm, device: &dyn MigratableDevice, name: &str) -> Result<()> {
        self.engaged.store(true, Ordering::Release);
        for (i, (_, gpa)) in self.traps.iter().enumerate() {
            if let Err(e) = vm.set_device_memory_trapped(*gpa, true) {
                self.map_again(vm, i, name);
                return Err(MigrationError::device(
                    name.to_string(),
                    format!("trapping {gpa:#x} for mediator {}: {e}", self.mediator),
                ));
            }
        }
        if let Err(e) = self.handle.start(device, vm.memory()) {
            self.map_again(vm, self.traps.len(), name);
            return Err(e);
        }
        tracing::debug!(device = %name, mediator = %self.mediator, traps = self.traps.len(), "mediator trapping");
        Ok(())
    }

    /// Ends the trapping: the mediator stops, the memslots come back.
    pub(crate) fn release(&self, vm: &Vm, name: &str) {
        self.handle.stop();
        self.map_again(vm, self.traps.len(), name);
        tracing::debug!(device = %name, mediator = %self.mediator, writes = self.trapped_writes(), "mediator trapping ended");
    }

    /// Maps the first `count` traps again and disengages.
    fn map_again(&self, vm: &Vm, count: usize, name: &str) {
        for (_, gpa) in &self.traps[..count] {
            if let Err(e) = vm.set_device_memory_trapped(*gpa, false) {
                // The area stays trapped: slower, still correct (writes go to the device).
                tracing::warn!(device = %name, gpa, error = %e, "a trapped area could not be mapped again");
            }
        }
        self.engaged.store(false, Ordering::Release);
    }
}

/// Mediators in registration order; cloning shares them.
#[derive(Clone, Default)]
pub struct Mediators(Vec<Arc<dyn Mediator>>);

impl Mediators {
    /// Adds `mediator` after those already there.
    pub fn push(&mut self, mediator: Arc<dyn Mediator>) {
        self.0.push(mediator);
    }

    /// Offers the device to each mediator that serves its ID until one takes it.
    pub(crate) fn open(
        &self,
        ctx: &MediatorContext<'_>,
    ) -> Result<Option<(String, Box<dyn Mediation>)>> {
        for mediator in &self.0 {
            if !mediator.serves().contains(&ctx.id) {
                continue;
            }
            if let Some(handle) = mediator.open(ctx)? {
                return Ok(Some((mediator.name().to_string(), handle)));
            }
        }
        Ok(None)
    }

    /// How many are registered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
