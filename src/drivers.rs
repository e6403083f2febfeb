//! The guest drivers and migration mediators `vmig` plugs into the engine: the sample
//! devices' from `vmig-devices`, adapted to the engine's [`GuestDriver`] and [`Mediator`]
//! hooks. (The in-process migration tests include this file too, so that they drive devices
//! exactly as the binary does.)

use std::sync::Arc;

use vmig_devices::dma_engine::{self, driver, mediator};
use vmig_kvm::GuestMemory;
use vmig_migration::device::{DeviceKind, MigratableDevice};
use vmig_migration::driver::{
    BoundDriver, DeviceCheck, Doorbell, DriverContext, GuestDriver, GuestDrivers,
};
use vmig_migration::machine::Role;
use vmig_migration::mediator::{Access, Mediation, Mediator, MediatorContext, PciId, Trap};
use vmig_migration::{MigrationError, Result};
use vmig_primitives::GuestAddress;

// The engine's per-device DMA area holds a dma-engine's ring and buffers.
const _: () = assert!(driver::AREA_BYTES <= vmig_migration::machine::DEVICE_AREA);

/// Every driver and mediator `vmig` knows.
pub fn all() -> GuestDrivers {
    with_mediator(Arc::default())
}

/// Every driver, and `mediator` as the dma-engine's mediator.
pub fn with_mediator(mediator: Arc<DmaEngineMediator>) -> GuestDrivers {
    drivers_only().mediated_by(mediator)
}

/// Every driver, and no mediator.
pub fn drivers_only() -> GuestDrivers {
    GuestDrivers::none().with(DmaEngineDriver)
}

/// A device's BAR0 through the engine's region access.
struct Bar0<'a>(&'a dyn MigratableDevice);

impl driver::Bar0 for Bar0<'_> {
    fn read_reg(&self, offset: u64) -> std::result::Result<u64, driver::AccessError> {
        let mut bytes = [0u8; 8];
        self.0.region_read(0, offset, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn write_reg(&self, offset: u64, value: u64) -> std::result::Result<(), driver::AccessError> {
        Ok(self.0.region_write(0, offset, &value.to_le_bytes())?)
    }
}

/// Guest RAM as the driver reaches it.
struct Ram<'a>(&'a GuestMemory);

impl driver::GuestRam for Ram<'_> {
    fn read(
        &self,
        gpa: GuestAddress,
        buf: &mut [u8],
    ) -> std::result::Result<(), driver::AccessError> {
        Ok(self.0.read(gpa, buf)?)
    }

    fn write(
        &self,
        gpa: GuestAddress,
        data: &[u8],
    ) -> std::result::Result<(), driver::AccessError> {
        Ok(self.0.write(gpa, data)?)
    }
}

/// The dma-engine's driver (`vmig_devices::dma_engine::driver`).
struct DmaEngineDriver;

#[derive(Debug)]
struct BoundDmaEngine {
    name: String,
    ring: driver::Ring,
    doorbell: Option<Doorbell>,
}

impl GuestDriver for DmaEngineDriver {
    fn bind(&self, ctx: &DriverContext<'_>) -> Result<Option<Box<dyn BoundDriver>>> {
        // Never probe real hardware: a read of an unknown register may have side effects.
        if ctx.device.kind() != DeviceKind::VfioUser {
            return Ok(None);
        }
        let Some(bar0) = ctx.bars.iter().find(|b| b.index == 0) else {
            return Ok(None);
        };
        if !driver::is_dma_engine(&Bar0(ctx.device), bar0.size) {
            return Ok(None);
        }
        let area = ctx
            .dma_area
            .clone()
            .map_err(|why| MigrationError::device(ctx.name, why))?;
        let ring = driver::Ring::in_area(area);
        let status_page = ctx
            .mapped
            .iter()
            .find(|area| area.region == dma_engine::STATUS_REGION)
            .map(|area| area.gpa);
        let doorbell_page = mapped_doorbell_page(ctx.mapped, bar0);
        let (producer, consumer) = driver::doorbell(bar0.gpa, status_page, doorbell_page);
        if ctx.role == Role::Source {
            let seed = 0x5eed_0000 + ctx.index as u64;
            driver::start(&Bar0(ctx.device), &Ram(ctx.memory), ring, ctx.rate, seed)
                .map_err(|e| MigrationError::driver(ctx.name, e))?;
        }
        Ok(Some(Box::new(BoundDmaEngine {
            name: ctx.name.to_string(),
            ring,
            doorbell: Some(Doorbell { producer, consumer }),
        })))
    }
}

impl BoundDriver for BoundDmaEngine {
    fn doorbell(&self) -> Option<Doorbell> {
        self.doorbell
    }

    fn check(&self, device: &dyn MigratableDevice, memory: &GuestMemory) -> Result<DeviceCheck> {
        let check = driver::check_records(&Bar0(device), &Ram(memory), self.ring)
            .map_err(|e| MigrationError::driver(self.name.clone(), e))?;
        Ok(DeviceCheck {
            device: self.name.clone(),
            produced: check.produced,
            checked: check.checked,
            problems: check.problems,
            device_errors: check.dma_errors,
        })
    }
}

/// Where a dma-engine's doorbell page is mapped into the guest, if it has one and it is.
fn mapped_doorbell_page(
    mapped: &[vmig_migration::machine::MappedArea],
    bar0: &vmig_migration::machine::Bar,
) -> Option<GuestAddress> {
    let gpa = GuestAddress(bar0.gpa.raw() + dma_engine::DOORBELL_PAGE);
    (bar0.size >= dma_engine::BAR0_SIZE_WITH_DOORBELL)
        .then_some(gpa)
        .filter(|gpa| mapped.iter().any(|m| m.region == 0 && m.gpa == *gpa))
}

/// The dma-engine's migration mediator (`vmig_devices::dma_engine::mediator`).
#[derive(Debug, Default)]
pub struct DmaEngineMediator(mediator::Mediator);

impl DmaEngineMediator {
    /// Engines it holds open.
    #[allow(
        dead_code,
        reason = "the in-process tests count the handles; the binary does not"
    )]
    pub fn open_devices(&self) -> usize {
        self.0.open_devices()
    }
}

const DMA_ENGINE_ID: [PciId; 1] = [PciId {
    vendor: dma_engine::VENDOR_ID,
    device: dma_engine::DEVICE_ID,
}];

impl Mediator for DmaEngineMediator {
    fn name(&self) -> &str {
        "dma-engine"
    }

    fn serves(&self) -> &[PciId] {
        &DMA_ENGINE_ID
    }

    fn open(&self, ctx: &MediatorContext<'_>) -> Result<Option<Box<dyn Mediation>>> {
        // Never probe real hardware: a read of an unknown register may have side effects.
        if ctx.device.kind() != DeviceKind::VfioUser {
            return Ok(None);
        }
        let Some(bar0) = ctx.bars.iter().find(|b| b.index == 0) else {
            return Ok(None);
        };
        let mapped = mapped_doorbell_page(ctx.mapped, bar0).is_some();
        Ok(self
            .0
            .open(&Bar0(ctx.device), bar0.size, mapped)
            .map(|mediation| {
                Box::new(MediatedDmaEngine {
                    name: ctx.name.to_string(),
                    mediation,
                }) as _
            }))
    }
}

/// The mediator's handle for one dma-engine.
#[derive(Debug)]
struct MediatedDmaEngine {
    name: String,
    mediation: mediator::Mediation,
}

impl Mediation for MediatedDmaEngine {
    fn handle(&self) -> u64 {
        self.mediation.handle()
    }

    fn traps(&self) -> Vec<Trap> {
        vec![Trap {
            region: mediator::TRAP_REGION,
            offset: mediator::TRAP_OFFSET,
            len: mediator::TRAP_LEN,
        }]
    }

    fn start(&self, device: &dyn MigratableDevice, _memory: &GuestMemory) -> Result<()> {
        self.mediation
            .start(&Bar0(device))
            .map_err(|e| MigrationError::driver(self.name.clone(), e))
    }

    fn write(
        &self,
        _device: &dyn MigratableDevice,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Access {
        if region == mediator::TRAP_REGION {
            self.mediation.doorbell(offset, data);
        }
        Access::PassThrough
    }

    fn harvest(
        &self,
        device: &dyn MigratableDevice,
        memory: &GuestMemory,
        mark: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.mediation
            .harvest(&Bar0(device), &Ram(memory), mark)
            .map_err(|e| MigrationError::driver(self.name.clone(), e))
    }

    fn stop(&self) {
        self.mediation.stop();
    }
}
