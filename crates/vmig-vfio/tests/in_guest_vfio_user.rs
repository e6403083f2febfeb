//! vmig's dma-engine under QEMU's own vfio-user client, driven through the real kernel's VFIO:
//! `vmig device serve --device dma-engine` runs on the host, QEMU 11 attaches it to the test
//! guest with `-device vfio-user-pci` behind a PCIe root port, the guest's init binds it to
//! vfio-pci, and these tests, inside the guest, drive it as a userspace driver would. So QEMU's
//! client, vmig's server and this crate's kernel-VFIO code meet the real kernel in one run.
//! `tests/qemu_vfio_user.rs` (the root package's) boots the guest with this file built as a
//! static binary (`--cfg vmig_in_guest`); anywhere else libtest lists them as ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
use vmig_devices::dma_engine::driver::{self, AccessError, Bar0, GuestRam, RING_ENTRIES, Ring};
use vmig_devices::dma_engine::{self, DEVICE_ID, STATUS_REGION, VENDOR_ID, reg};
use vmig_kernel_guest::report_line;
use vmig_primitives::{GuestAddress, HostMemory, Iova};
use vmig_vfio::{Container, Device};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Where the ring and its buffers are in the device's IOVA space.
const RING_IOVA: u64 = 0x1000_0000;
/// Records per second the engine is programmed for.
const RATE: u64 = 2000;

fn open_engine() -> (Container, Device) {
    assert!(
        vmig_kernel_guest::in_guest(),
        "runs only inside the test guest (tests/qemu_vfio_user.rs boots it)"
    );
    let bound = vmig_kernel_guest::bound_devices(VENDOR_ID, DEVICE_ID);
    assert_eq!(
        bound.len(),
        1,
        "the guest's init bound one dma-engine to vfio-pci: {bound:?}"
    );
    let container = Container::open(None).expect("container");
    let device = container
        .open_device(&bound[0])
        .expect("the dma-engine bound to vfio-pci");
    // Memory decoding and bus mastering, as a driver enables them.
    assert_eq!(device.set_command_bits(0x6).unwrap() & 0x6, 0x6);
    (container, device)
}

/// BAR0 as a driver reaches it: reads trapped through the device fd (`pread`), writes as one
/// 64-bit store each into the mapped BAR (`writeq`), which QEMU forwards to the server whole.
struct Registers<'a> {
    device: &'a Device,
    mapped: Arc<HostMemory>,
}

impl Bar0 for Registers<'_> {
    fn read_reg(&self, offset: u64) -> Result<u64, AccessError> {
        let mut bytes = [0u8; 8];
        self.device.read_region(0, offset, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn write_reg(&self, offset: u64, value: u64) -> Result<(), AccessError> {
        self.mapped.store_u64(usize::try_from(offset)?, value)?;
        Ok(())
    }
}

/// The ring's memory: this process's pages, DMA-mapped at `iova` (the driver's "guest
/// physical" addresses are the device's IOVAs here).
struct DmaArea {
    memory: Arc<HostMemory>,
    iova: u64,
}

impl DmaArea {
    fn offset(&self, at: GuestAddress) -> Result<usize, AccessError> {
        let offset = at
            .raw()
            .checked_sub(self.iova)
            .ok_or_else(|| format!("{at} is below the DMA area at {:#x}", self.iova))?;
        Ok(usize::try_from(offset)?)
    }
}

impl GuestRam for DmaArea {
    fn read(&self, at: GuestAddress, buf: &mut [u8]) -> Result<(), AccessError> {
        Ok(self.memory.read(self.offset(at)?, buf)?)
    }

    fn write(&self, at: GuestAddress, data: &[u8]) -> Result<(), AccessError> {
        Ok(self.memory.write(self.offset(at)?, data)?)
    }
}

/// Waits until the status page (BAR2, mapped through the server's sparse area) shows at least
/// `records` produced, and returns what it shows.
fn wait_for_records(status: &HostMemory, records: u64) -> u64 {
    let start = Instant::now();
    loop {
        let produced = u64::from(status.load_u32(0).unwrap());
        if produced >= records {
            return produced;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the status page shows {produced} records after 60 s, expected {records}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    not(vmig_in_guest),
    ignore = "runs only in the guest that tests/qemu_vfio_user.rs boots under QEMU 11"
)]
fn records_arrive_whole_and_in_sequence_with_an_msix_interrupt() {
    let (container, engine) = open_engine();
    assert_eq!(engine.pci_ids(), Some((VENDOR_ID, DEVICE_ID)));
    // The guest kernel found the MSI-X capability the framework builds: one vector, the table
    // at BAR0 + 0x800 and the PBA at BAR0 + 0xc00.
    let msix = engine.msix_layout().unwrap().expect("an MSI-X capability");
    assert_eq!(
        (msix.table, msix.pba),
        (
            (0, u64::from(dma_engine::MSIX_TABLE_OFFSET), 16),
            (0, u64::from(dma_engine::MSIX_PBA_OFFSET), 8)
        )
    );
    let regs = Registers {
        device: &engine,
        mapped: engine.map_region(0).expect("BAR0 mappable in the guest"),
    };
    assert_eq!(regs.read_reg(reg::ID).unwrap(), dma_engine::ID);
    assert!(driver::is_dma_engine(&regs, dma_engine::BAR0_SIZE));
    // BAR2: QEMU maps it from the server's fd; the guest maps QEMU's mapping.
    let status = engine
        .map_region(STATUS_REGION)
        .expect("the status page mappable in the guest");
    assert_eq!(
        status.load_u32(0).unwrap(),
        0,
        "a fresh engine produced nothing"
    );

    let memory = Arc::new(HostMemory::anonymous(driver::AREA_BYTES).unwrap());
    container
        .map_memory(Iova(RING_IOVA), &memory, 0, driver::AREA_BYTES)
        .expect("DMA-mapping the ring");
    let area = DmaArea {
        memory,
        iova: RING_IOVA,
    };
    let interrupt = EventFd::new(EFD_NONBLOCK).unwrap();
    engine
        .enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &[&interrupt])
        .expect("MSI-X vector 0 on an eventfd");

    let ring = Ring::in_area(GuestAddress(RING_IOVA));
    let seed = 0x5eed_9e57;
    driver::start(&regs, &area, ring, RATE, seed).expect("the engine takes its ring");
    let first = wait_for_records(&status, 100);
    let check = driver::check_records(&regs, &area, ring).unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
    assert!(check.checked >= first, "{check:?}");
    assert_eq!(check.dma_errors, 0, "{check:?}");
    let start = Instant::now();
    let interrupts = loop {
        if let Ok(n) = interrupt.read() {
            break n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no MSI-X interrupt reached the eventfd"
        );
        std::thread::sleep(Duration::from_millis(5));
    };

    // Consume everything, so the engine goes on around the ring: the second lap overwrites the
    // first in sequence.
    let produced = regs.read_reg(reg::PRODUCER).unwrap();
    regs.write_reg(reg::CONSUMER, produced).unwrap();
    let lapped = wait_for_records(&status, RING_ENTRIES + 50);
    let check = driver::check_records(&regs, &area, ring).unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
    assert_eq!(check.checked, RING_ENTRIES, "{check:?}");
    assert!(
        regs.read_reg(reg::PRODUCER).unwrap() >= lapped,
        "PRODUCER behind the status page"
    );
    regs.write_reg(reg::CTRL, 0).unwrap();
    engine.disable_irq(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    report_line(&format!(
        "VMIG-QEMU-DMA-ENGINE records={} checked={} interrupts={interrupts}",
        check.produced, check.checked
    ));
}

#[test]
#[cfg_attr(
    not(vmig_in_guest),
    ignore = "runs only in the guest that tests/qemu_vfio_user.rs boots under QEMU 11"
)]
fn a_reset_through_the_guest_kernel_reaches_the_server() {
    let (_container, engine) = open_engine();
    // Alone behind its root port, the function can be reset by a secondary bus reset, which
    // QEMU turns into VFIO_USER_DEVICE_RESET.
    assert!(engine.can_reset(), "the guest kernel offers no reset");
    let regs = Registers {
        device: &engine,
        mapped: engine.map_region(0).unwrap(),
    };
    regs.write_reg(reg::RING_SIZE, 16).unwrap();
    regs.write_reg(reg::SEED, 77).unwrap();
    assert_eq!(regs.read_reg(reg::RING_SIZE).unwrap(), 16);
    engine.reset().expect("VFIO_DEVICE_RESET");
    for register in [reg::CTRL, reg::RING_SIZE, reg::SEED, reg::PRODUCER] {
        assert_eq!(
            regs.read_reg(register).unwrap(),
            0,
            "register {register:#x} after the reset"
        );
    }
    assert_eq!(regs.read_reg(reg::ID).unwrap(), dma_engine::ID);
}
