//! The README's minimal device (`examples/doorbell.rs`) does what the README says: the
//! framework serves its PCI config space and MSI-X table, a ring signals the vector the driver
//! enabled, and a v2 migration moves its count and its PCI function to another server.

mod common;
#[path = "../examples/doorbell.rs"]
mod doorbell;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use common::Served;
use doorbell::{COUNT, Doorbell, RING};
use vmig_vfio_user::client::{Client, DeviceMigration};

const CONFIG: u32 = 7;

fn serve() -> Served {
    common::serve(Doorbell::new().unwrap())
}

fn read32(c: &Client, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn write32(c: &Client, region: u32, offset: u64, value: u32) {
    c.region_write(region, offset, &value.to_le_bytes())
        .unwrap();
}

/// Offset of capability `id` in config space.
fn capability(c: &Client, id: u8) -> u64 {
    let mut at = u64::from(read32(c, CONFIG, 0x34) & 0xfc);
    while at != 0 {
        let header = read32(c, CONFIG, at);
        if header & 0xff == u32::from(id) {
            return at;
        }
        at = u64::from(header >> 8 & 0xfc);
    }
    panic!("no capability {id:#x}");
}

#[test]
fn the_doorbell_rings_on_msix_and_migrates_with_its_pci_state() {
    let source = serve();
    let c = &source.client;
    assert_eq!(read32(c, CONFIG, 0), 0x7a02_1234);
    assert_eq!(c.region_info(CONFIG).unwrap().info.size, 4096);
    let msix = capability(c, 0x11);
    assert_eq!(read32(c, CONFIG, msix + 4), 0x800, "table at BAR0 + 0x800");

    // The driver programs the function, enables MSI-X and wires vector 0.
    write32(c, CONFIG, 0x10, 0xfeb0_0000);
    write32(c, CONFIG, 0x04, 0x0006);
    let control = read32(c, CONFIG, msix) >> 16;
    write32(c, CONFIG, msix, (control | 1 << 15) << 16 | 0x11);
    let (mut irq, writer) = std::io::pipe().unwrap();
    let writer = OwnedFd::from(writer);
    c.set_irq_eventfds(2, 0, 1, &[writer.as_fd()]).unwrap();
    write32(c, 0, 0x800, 0xfee0_0000); // the message address, as a driver writes it
    for _ in 0..3 {
        write32(c, 0, RING, 1);
    }
    let mut got = [0u8; 24];
    irq.read_exact(&mut got).unwrap();
    assert_eq!(read32(c, 0, COUNT), 3);
    assert!(c.region_write(0, COUNT, &[0; 4]).is_err());

    // Migrate: the count, BAR0's address, the command register and the table move.
    let out = DeviceMigration::detect(c).unwrap().unwrap();
    let chunks = out.stop_and_copy().unwrap();
    let config: Vec<u32> = (0..0x100)
        .step_by(4)
        .map(|o| read32(c, CONFIG, o))
        .collect();
    out.finish_source().unwrap();
    let destination = serve();
    let d = &destination.client;
    let into = DeviceMigration::detect(d).unwrap().unwrap();
    into.start_resume().unwrap();
    for chunk in &chunks {
        into.write_chunk(chunk).unwrap();
    }
    into.load().unwrap();
    into.run().unwrap();
    assert_eq!(read32(d, 0, COUNT), 3);
    let loaded: Vec<u32> = (0..0x100)
        .step_by(4)
        .map(|o| read32(d, CONFIG, o))
        .collect();
    assert_eq!(loaded, config, "config space reads as the source's did");
    assert_eq!(read32(d, 0, 0x800), 0xfee0_0000, "the MSI-X table moved");
}

#[test]
fn a_record_of_another_device_is_refused_and_changes_nothing() {
    use vmig_vfio_user::server::Device;
    let mut device = Doorbell::new().unwrap();
    device.region_write(0, RING, &[1, 0, 0, 0]).unwrap();
    let record = device.save(true).unwrap();
    let mut other = Doorbell::new().unwrap();
    assert!(other.load(&record[..3]).is_err());
    assert!(other.load(&record[..record.len() - 1]).is_err());
    let mut alien = record.clone();
    alien[4 + 8 + 16 + 2] ^= 1; // the device ID inside the PCI record
    let err = other.load(&alien).unwrap_err();
    assert!(
        err.to_string().contains("not the same device layout"),
        "{err}"
    );
    let mut b = [0u8; 4];
    other.region_read(0, COUNT, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0, "nothing loaded");
    other.load(&record).unwrap();
    other.region_read(0, COUNT, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 1);
}
