//! The smallest device worth migrating, on vmig's vfio-user server framework: a doorbell.
//!
//! BAR0 (4 KiB, trapped): a write of any u32 to `RING` (0x0) counts one ring in `COUNT` (0x4,
//! read-only) and signals vector 0 of whichever interrupt the driver enabled (MSI-X, MSI or
//! INTx); the MSI-X table and PBA sit at 0x800 and 0xc00, served by the framework. Its state
//! is `COUNT` and its PCI function, saved as one record, so a migration moves both.
//!
//! ```sh
//! cargo run --release --example doorbell -- /tmp/doorbell.sock
//! ```

use std::sync::atomic::AtomicBool;

use vmig_vfio_user::server::*;
use vmig_vfio_user::wire::{IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE};

/// `RING`: a write rings the doorbell.
pub const RING: u64 = 0x0;
/// `COUNT`: rings so far.
pub const COUNT: u64 = 0x4;

/// The device: its one register and its PCI function.
pub struct Doorbell {
    count: u32,
    pci: PciFunction,
    ctx: Option<DeviceContext>,
}

impl Doorbell {
    /// A doorbell that has never rung.
    pub fn new() -> Result<Self, PciSpecError> {
        let mut bars = [None; 6];
        bars[0] = Some(Bar {
            size: 4096,
            kind: BarKind::Memory32,
        });
        let pci = PciFunction::new(PciSpec {
            vendor_id: 0x1234,
            device_id: 0x7a02,
            class: 0xff_0000,
            bars,
            intx: true,
            msi: Some(MsiSpec {
                vectors: 1,
                per_vector_mask: true,
            }),
            msix: Some(MsixSpec {
                vectors: 1,
                table_bar: 0,
                table_offset: 0x800,
                pba_bar: 0,
                pba_offset: 0xc00,
            }),
            express: true,
            ..PciSpec::default()
        })?;
        Ok(Self {
            count: 0,
            pci,
            ctx: None,
        })
    }
}

impl Device for Doorbell {
    fn spec(&self) -> DeviceSpec {
        let bar0 = RegionSpec {
            size: 4096,
            readable: true,
            writable: true,
            ..RegionSpec::default()
        };
        let irq = |flags| IrqSpec { count: 1, flags };
        DeviceSpec {
            // The framework serves region 7 (config space) and the MSI-X table and PBA.
            config_space: Some(self.pci.clone()),
            reset: true,
            regions: vec![bar0],
            irqs: vec![
                irq(IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED), // INTx
                irq(IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE),                       // MSI
                irq(IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE),                       // MSI-X
            ],
            ..DeviceSpec::default()
        }
    }

    fn region_read(&mut self, _index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        let registers = [0u32.to_le_bytes(), self.count.to_le_bytes()].concat();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i);
            *byte = registers.get(at).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn region_write(&mut self, _index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        if offset != RING || data.len() != 4 {
            return Err(Refusal::invalid(
                "the doorbell has one register: a u32 RING at 0",
            ));
        }
        self.count = self.count.wrapping_add(1);
        if let Some(ctx) = &self.ctx {
            ctx.signal_interrupt(0);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Refusal> {
        self.count = 0;
        Ok(())
    }

    fn connect(&mut self, ctx: DeviceContext) {
        self.ctx = Some(ctx);
    }

    fn disconnect(&mut self) {
        self.ctx = None;
    }

    fn migration(&self) -> MigrationSupport {
        MigrationSupport::V2 { pre_copy: false }
    }

    fn save(&mut self, _last: bool) -> Result<Vec<u8>, Refusal> {
        Ok([&self.count.to_le_bytes()[..], &self.pci.save()].concat())
    }

    fn load(&mut self, record: &[u8]) -> Result<(), Refusal> {
        let (count, pci) = record
            .split_first_chunk::<4>()
            .ok_or_else(|| Refusal::invalid("a doorbell record starts with its u32 COUNT"))?;
        self.pci.load(pci)?;
        self.count = u32::from_le_bytes(*count);
        Ok(())
    }
}

#[cfg_attr(
    test,
    allow(dead_code, reason = "the tests use the device, not the program")
)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: doorbell SOCKET_PATH")?;
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    eprintln!("doorbell: serving {path}");
    let server = Server::new(Doorbell::new()?, ServerConfig::default());
    server.run(&listener, &AtomicBool::new(false))?;
    Ok(())
}
