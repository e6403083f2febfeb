//! Device interrupts into the guest: an eventfd per MSI / MSI-X vector, which KVM turns into an
//! MSI message to a local APIC each time a device signals it (irqfd), without a trip through
//! the VMM. The GSI routing table holds the in-kernel irqchip's own pin routes (PIC and IOAPIC,
//! as KVM sets them by default) followed by one MSI route per vector, GSIs from 24 up.

use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::error::{KvmError, Result, ioctl_error};
use crate::sys;

/// The first GSI after the IOAPIC's 24 pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's irqchip numbers.
const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;
/// Routes KVM takes at most (`KVM_MAX_IRQ_ROUTES`).
const MAX_ROUTES: usize = 4096;

/// The low 32 bits of `v` (an MSI address goes to KVM in two halves).
#[expect(
    clippy::cast_possible_truncation,
    reason = "taking the low half is the point"
)]
fn low_half(v: u64) -> u32 {
    v as u32
}

/// The MSI address of a fixed, physical-destination interrupt to the local APIC `apic_id`.
pub fn msi_address(apic_id: u8) -> u64 {
    0xfee0_0000 | u64::from(apic_id) << 12
}

/// One MSI vector wired into the guest: signal `eventfd` and the guest's local APIC receives
/// the message.
#[derive(Debug)]
pub struct MsiVector {
    /// Its GSI.
    pub gsi: u32,
    /// The vector number in the MSI data (the IDT entry the guest takes it on).
    pub vector: u8,
    eventfd: EventFd,
}

impl MsiVector {
    /// The eventfd to hand to the device.
    pub fn eventfd(&self) -> BorrowedFd<'_> {
        sys::borrow_eventfd(&self.eventfd)
    }

    /// The same eventfd, for interfaces that take `vmm-sys-util`'s type (kernel VFIO's
    /// `SET_IRQS` through `vfio-ioctls`).
    pub fn event_fd(&self) -> &EventFd {
        &self.eventfd
    }
}

/// The VM's GSI routing table.
#[derive(Debug)]
pub struct IrqRoutes {
    routes: Mutex<Vec<kvm_irq_routing_entry>>,
}

fn set_routes(vm: &VmFd, routes: &[kvm_irq_routing_entry]) -> Result<()> {
    let table = KvmIrqRouting::from_entries(routes).map_err(|source| KvmError::List {
        context: "the GSI routing table".into(),
        source,
    })?;
    vm.set_gsi_routing(&table)
        .map_err(ioctl_error("KVM_SET_GSI_ROUTING"))
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

impl Default for IrqRoutes {
    /// KVM's default routes for an in-kernel irqchip: GSIs 0-15 to the PICs and the IOAPIC,
    /// 16-23 to the IOAPIC.
    fn default() -> Self {
        let mut routes = Vec::new();
        for gsi in 0..FIRST_MSI_GSI {
            if gsi < 16 {
                let pic = if gsi < 8 {
                    IRQCHIP_PIC_MASTER
                } else {
                    IRQCHIP_PIC_SLAVE
                };
                routes.push(irqchip_route(gsi, pic, gsi % 8));
            }
            routes.push(irqchip_route(gsi, IRQCHIP_IOAPIC, gsi));
        }
        Self {
            routes: Mutex::new(routes),
        }
    }
}

impl IrqRoutes {
    /// Adds an MSI route delivering `vector` to local APIC `apic_id` and an eventfd that
    /// triggers it.
    pub fn add_msi(&self, vm: &VmFd, apic_id: u8, vector: u8) -> Result<MsiVector> {
        if vector < 16 {
            return Err(KvmError::Invalid(format!(
                "MSI vector {vector}: vectors 0-15 are reserved"
            )));
        }
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.len() >= MAX_ROUTES {
            return Err(KvmError::Invalid(format!(
                "more than {MAX_ROUTES} interrupt routes"
            )));
        }
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(KvmError::Io)?;
        let gsi = routes.last().map_or(FIRST_MSI_GSI, |r| r.gsi + 1);
        let address = msi_address(apic_id);
        routes.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: low_half(address),
                    address_hi: low_half(address >> 32),
                    data: u32::from(vector),
                    ..Default::default()
                },
            },
            ..Default::default()
        });
        let installed = set_routes(vm, &routes).and_then(|()| {
            vm.register_irqfd(&eventfd, gsi)
                .map_err(ioctl_error("KVM_IRQFD"))
        });
        if let Err(e) = installed {
            // Leave KVM's table as it was: no route without its eventfd.
            routes.pop();
            let _ = set_routes(vm, &routes);
            return Err(e);
        }
        Ok(MsiVector {
            gsi,
            vector,
            eventfd,
        })
    }
}
