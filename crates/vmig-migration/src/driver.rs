//! Guest-driver hooks: what plays the guest's driver of a device in vmig's synthetic guests.
//! The engine names no device; the binary and the tests register a [`GuestDriver`] for each
//! kind of device they know (the sample devices' drivers live in `vmig-devices`), and the
//! engine offers every attached device to them in turn.
//!
//! ```text
//!  Machine::attach ── for each device, after its BARs and interrupts are in place:
//!     GuestDriver::bind(DriverContext) ── not mine ──► None (next driver)
//!                                     └── mine: on a source, set the device up ──► BoundDriver
//!     BoundDriver::doorbell ──► the guest's vCPU 0 consumes what the device produces
//!  after the destination resumes:
//!     BoundDriver::check ──► DeviceCheck (whole? lost? the device's own error count)
//! ```

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmig_kvm::GuestMemory;
use vmig_primitives::GuestAddress;

use crate::device::MigratableDevice;
use crate::error::Result;
use crate::machine::{Bar, MappedArea, Role};
use crate::mediator::{Mediator, Mediators};

/// What a driver sees of a device when it is offered one.
pub struct DriverContext<'a> {
    /// The device's index in the machine (its `--device` position).
    pub index: usize,
    /// The device's name in reports.
    pub name: &'a str,
    /// The device: region access that does not go through the guest.
    pub device: &'a dyn MigratableDevice,
    /// Its BARs in the guest.
    pub bars: &'a [Bar],
    /// Its memory mapped into the guest.
    pub mapped: &'a [MappedArea],
    /// Guest RAM.
    pub memory: &'a GuestMemory,
    /// The guest RAM set aside for the device's DMA ([`crate::machine::DEVICE_AREA`] bytes,
    /// outside the guest's working set), or why there is none.
    pub dma_area: std::result::Result<GuestAddress, String>,
    /// Whether the VM boots here (the driver sets the device up) or arrives by migration
    /// (the device's state, set up by the source's driver, arrives with it).
    pub role: Role,
    /// The `rate=N` of the device's `--device` option: how fast the device should produce.
    pub rate: u64,
}

/// A driver the engine offers each attached device to.
pub trait GuestDriver: Send + Sync {
    /// Takes the device if it is one this driver drives (setting it up on a source), `None`
    /// if it is not. An error fails the attach.
    fn bind(&self, ctx: &DriverContext<'_>) -> Result<Option<Box<dyn BoundDriver>>>;
}

/// A driver bound to one device.
pub trait BoundDriver: Send + Sync + fmt::Debug {
    /// The guest's doorbell for the device: where vCPU 0 reads what the device produced and
    /// where it writes what it consumed.
    fn doorbell(&self) -> Option<Doorbell>;
    /// Checks the device and what it wrote into guest memory, after a migration or at any
    /// time.
    fn check(&self, device: &dyn MigratableDevice, memory: &GuestMemory) -> Result<DeviceCheck>;
}

pub use vmig_kvm::guest::Doorbell;

/// The drivers a machine offers its devices to, in order, and the migration mediators
/// ([`crate::mediator`]) it offers them to after; cloning shares them.
#[derive(Clone, Default)]
pub struct GuestDrivers {
    drivers: Vec<Arc<dyn GuestDriver>>,
    mediators: Mediators,
}

impl GuestDrivers {
    /// No drivers and no mediators: devices run without a guest driver.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `driver` after those already there.
    #[must_use]
    pub fn with(mut self, driver: impl GuestDriver + 'static) -> Self {
        self.drivers.push(Arc::new(driver));
        self
    }

    /// Registers `mediator` after those already there.
    #[must_use]
    pub fn mediated_by(mut self, mediator: Arc<dyn Mediator>) -> Self {
        self.mediators.push(mediator);
        self
    }

    /// The mediators.
    pub fn mediators(&self) -> &Mediators {
        &self.mediators
    }

    /// Offers the device to each driver until one binds it.
    pub fn bind(&self, ctx: &DriverContext<'_>) -> Result<Option<Box<dyn BoundDriver>>> {
        for driver in &self.drivers {
            if let Some(bound) = driver.bind(ctx)? {
                return Ok(Some(bound));
            }
        }
        Ok(None)
    }
}

impl fmt::Debug for GuestDrivers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GuestDrivers({} drivers, {} mediators)",
            self.drivers.len(),
            self.mediators.len()
        )
    }
}

/// What a driver's check found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCheck {
    /// The device.
    pub device: String,
    /// Items (records, buffers) the device had produced.
    pub produced: u64,
    /// Items found whole and where they belong.
    pub checked: u64,
    /// What was wrong, if anything.
    pub problems: Vec<String>,
    /// Errors the device itself counted (failed DMA, for a dma-engine).
    pub device_errors: u64,
}

impl DeviceCheck {
    /// No problem found.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.device_errors == 0
    }
}
