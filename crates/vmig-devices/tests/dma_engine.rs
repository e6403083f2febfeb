//! The dma-engine served over vfio-user, with a test acting as the guest's driver: records
//! arrive in guest memory in sequence, DMA dirties the pages in the device's log, and a
//! migration (v1 and v2) moves the engine to another server without losing or repeating a
//! record, with the destination's registers reading as the stopped source's did.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::Served;
use vmig_devices::DmaEngine;
use vmig_devices::dma_engine::{self, Migration, reg};
use vmig_test_support::wait_until;
use vmig_vfio_user::client::Client;
use vmig_vfio_user::client::DeviceMigration;

const RAM: u64 = 4 << 20;
const RING_IOVA: u64 = 0x1000;
const BUFFERS_IOVA: u64 = 1 << 20;
const RING: u64 = 32;
const SEED: u64 = 0xfeed;
/// How long a test waits for what takes milliseconds on an idle machine.
const PATIENCE: Duration = Duration::from_secs(30);

fn serve(migration: Migration, ram: &OwnedFd) -> Served {
    let served = common::serve(DmaEngine::new(migration));
    served
        .client
        .dma_map(0, RAM, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    served
}

fn read_reg(client: &Client, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    client.region_read(0, offset, &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn write_reg(client: &Client, offset: u64, value: u64) {
    client
        .region_write(0, offset, &value.to_le_bytes())
        .unwrap();
}

const CONFIG_COMMAND: u64 = 0x04;
const CONFIG_STATUS: u64 = 0x06;
const CONFIG_BAR0: u64 = 0x10;

fn config(client: &Client, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    client
        .region_read(dma_engine::CONFIG_REGION, offset, &mut b)
        .unwrap();
    b
}

fn read16(client: &Client, offset: u64) -> u16 {
    let b = config(client, offset, 2);
    u16::from_le_bytes([b[0], b[1]])
}

fn write32(client: &Client, offset: u64, value: u32) {
    client
        .region_write(dma_engine::CONFIG_REGION, offset, &value.to_le_bytes())
        .unwrap();
}

/// The guest driver: consumes every record the device produced, checking each is the next in
/// sequence and whole; returns how many it consumed.
fn consume(client: &Client, ram: &std::fs::File, next: &mut u64) -> u64 {
    let producer = read_reg(client, reg::PRODUCER);
    let mut consumed = 0;
    while *next < producer {
        let mut buf = [0u8; dma_engine::RECORD_SIZE];
        ram.read_exact_at(&mut buf, BUFFERS_IOVA + (*next % RING) * 4096)
            .unwrap();
        let seq =
            dma_engine::check_record(&buf, SEED).unwrap_or_else(|e| panic!("record {next}: {e}"));
        assert_eq!(seq, *next, "records must arrive in sequence, exactly once");
        *next += 1;
        consumed += 1;
        write_reg(client, reg::CONSUMER, *next);
    }
    consumed
}

/// Consumes records, as the guest's driver would, until more than `records` arrived.
fn consume_more_than(client: &Client, ram: &std::fs::File, next: &mut u64, records: u64) {
    let mut consumed = 0;
    wait_until("records to arrive", PATIENCE, || {
        consumed += consume(client, ram, next);
        if consumed > records {
            Ok(())
        } else {
            Err(format!("{consumed} records consumed"))
        }
    });
}

fn migrate_without_losing_a_record(migration: Migration) {
    let ram_fd = vmig_primitives::memfd("guest-ram", RAM).unwrap();
    let ram = std::fs::File::from(ram_fd.try_clone().unwrap());
    for i in 0..RING {
        ram.write_all_at(&(BUFFERS_IOVA + i * 4096).to_le_bytes(), RING_IOVA + i * 8)
            .unwrap();
    }
    let source = serve(migration, &ram_fd);
    let c = &source.client;
    assert_eq!(read_reg(c, reg::ID), dma_engine::ID);
    match migration {
        Migration::V2 => assert_eq!(c.dma_logging_start(4096, &[]).unwrap(), 4096),
        Migration::V1 => c.dirty_pages_log(true).unwrap(),
    }
    write_reg(c, reg::RING_BASE, RING_IOVA);
    write_reg(c, reg::RING_SIZE, RING);
    write_reg(c, reg::RATE, 3000);
    write_reg(c, reg::SEED, SEED);
    write32(c, CONFIG_COMMAND, 0x6);
    write32(c, CONFIG_BAR0, 0xfe00_0000);
    write_reg(c, reg::CTRL, 1);
    let mut next = 0;
    consume_more_than(c, &ram, &mut next, 50);
    // The device's writes are in its dirty log: every buffer page it wrote.
    let bitmap = match migration {
        Migration::V2 => c.dma_logging_report(0, RAM, 4096).unwrap(),
        Migration::V1 => c.dirty_pages_bitmap(0, RAM, 4096).unwrap(),
    };
    let buffer_page = (BUFFERS_IOVA / 4096) as usize;
    let dirty_buffers = (0..usize::try_from(RING).unwrap())
        .filter(|i| bitmap[(buffer_page + i) / 64] >> ((buffer_page + i) % 64) & 1 == 1)
        .count();
    assert_eq!(
        dirty_buffers,
        usize::try_from(RING).unwrap(),
        "all ring buffers were written and logged"
    );
    // Migrate while the device runs.
    let out = DeviceMigration::detect(c).unwrap().unwrap();
    out.start_precopy().unwrap();
    let mut chunks = out.read_precopy().unwrap();
    consume_more_than(c, &ram, &mut next, 10);
    chunks.extend(out.stop_and_copy().unwrap());
    let frozen: Vec<u64> = (0..0x50).step_by(8).map(|r| read_reg(c, r)).collect();
    let frozen_config = config(c, 0, 0x100);
    std::thread::sleep(Duration::from_millis(50));
    let still: Vec<u64> = (0..0x50).step_by(8).map(|r| read_reg(c, r)).collect();
    assert_eq!(
        frozen, still,
        "a stopped engine writes nothing and its registers stand still"
    );
    out.finish_source().unwrap();
    let destination = serve(migration, &ram_fd);
    let d = &destination.client;
    let into = DeviceMigration::detect(d).unwrap().unwrap();
    assert_eq!(into.protocol().name(), out.protocol().name());
    into.start_resume().unwrap();
    for chunk in &chunks {
        into.write_chunk(chunk).unwrap();
    }
    into.load().unwrap();
    let loaded: Vec<u64> = (0..0x50).step_by(8).map(|r| read_reg(d, r)).collect();
    assert_eq!(
        loaded, frozen,
        "destination registers read as the stopped source's"
    );
    assert_eq!(
        config(d, 0, 0x100),
        frozen_config,
        "destination config space (BAR0, command, interrupt state) reads as the source's"
    );
    into.run().unwrap();
    drop(source);
    consume_more_than(d, &ram, &mut next, 50);
}

#[test]
fn v2_migration_loses_and_repeats_no_record() {
    migrate_without_losing_a_record(Migration::V2);
}

#[test]
fn v1_migration_loses_and_repeats_no_record() {
    migrate_without_losing_a_record(Migration::V1);
}

/// Guest RAM whose ring has four buffers, and its memfd.
fn ram_with_a_ring_of_four() -> (OwnedFd, std::fs::File) {
    let ram_fd = vmig_primitives::memfd("guest-ram", RAM).unwrap();
    let ram = std::fs::File::from(ram_fd.try_clone().unwrap());
    for i in 0..4 {
        ram.write_all_at(&(BUFFERS_IOVA + i * 4096).to_le_bytes(), RING_IOVA + i * 8)
            .unwrap();
    }
    (ram_fd, ram)
}

/// Starts the engine on the ring of four, and waits until it stalls with the ring full.
fn fill_the_ring_of_four(c: &Client) {
    write_reg(c, reg::RING_BASE, RING_IOVA);
    write_reg(c, reg::RING_SIZE, 4);
    write_reg(c, reg::RATE, 5000);
    write_reg(c, reg::SEED, SEED);
    write_reg(c, reg::CTRL, 1);
    wait_until("the engine to stall on a full ring", PATIENCE, || {
        let stalls = read_reg(c, reg::STALLS);
        (stalls > 0)
            .then_some(())
            .ok_or_else(|| format!("{stalls} stalls"))
    });
}

#[test]
fn a_full_ring_stalls_instead_of_overwriting() {
    let (ram_fd, ram) = ram_with_a_ring_of_four();
    let served = serve(Migration::V2, &ram_fd);
    let c = &served.client;
    fill_the_ring_of_four(c);
    assert_eq!(read_reg(c, reg::PRODUCER), 4, "four buffers, none consumed");
    let mut next = 0;
    assert_eq!(consume(c, &ram, &mut next), 4);
    wait_until("consuming to make room", PATIENCE, || {
        let producer = read_reg(c, reg::PRODUCER);
        (producer > 4)
            .then_some(())
            .ok_or_else(|| format!("producer at {producer}"))
    });
    // Bad register writes are refused without effect.
    assert!(
        c.region_write(0, reg::PRODUCER, &9u64.to_le_bytes())
            .is_err()
    );
    assert!(
        c.region_write(0, reg::RING_SIZE, &(1u64 << 40).to_le_bytes())
            .is_err()
    );
    assert!(
        c.region_write(0, reg::CTRL + 4, &1u32.to_le_bytes())
            .is_err()
    );
    assert!(
        c.region_write(0, reg::CONSUMER, &u64::MAX.to_le_bytes())
            .is_err()
    );
}

#[test]
fn config_space_identifies_the_device_and_sizes_bar0() {
    let ram_fd = vmig_primitives::memfd("guest-ram", RAM).unwrap();
    let served = serve(Migration::V2, &ram_fd);
    let c = &served.client;
    let mut id = [0u8; 4];
    c.region_read(dma_engine::CONFIG_REGION, 0, &mut id)
        .unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), dma_engine::VENDOR_ID);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), dma_engine::DEVICE_ID);
    // The size probe: all ones in, the 4 KiB mask out; then a base address sticks.
    c.region_write(dma_engine::CONFIG_REGION, 0x10, &u32::MAX.to_le_bytes())
        .unwrap();
    let mut bar = [0u8; 4];
    c.region_read(dma_engine::CONFIG_REGION, 0x10, &mut bar)
        .unwrap();
    assert_eq!(u32::from_le_bytes(bar), !0xfff);
    c.region_write(
        dma_engine::CONFIG_REGION,
        0x10,
        &0xfe00_0000u32.to_le_bytes(),
    )
    .unwrap();
    c.region_read(dma_engine::CONFIG_REGION, 0x10, &mut bar)
        .unwrap();
    assert_eq!(u32::from_le_bytes(bar), 0xfe00_0000);
    assert_eq!(
        c.region_info(dma_engine::CONFIG_REGION).unwrap().info.size,
        4096,
        "a PCI Express function's config space"
    );
    // BARs 1-5 do not exist: they answer size 0 (as the kernel does), and refuse access.
    assert_eq!(c.region_info(3).unwrap().info.size, 0);
    assert!(c.region_read(3, 0, &mut [0u8; 4]).is_err());
}

/// The capabilities in config space: (offset, id), walking the list from 0x34.
fn capabilities(client: &Client) -> Vec<(u64, u8)> {
    let mut found = Vec::new();
    let mut at = u64::from(config(client, 0x34, 1)[0]);
    while at != 0 && found.len() < 48 {
        let word = read16(client, at);
        found.push((at, word.to_le_bytes()[0]));
        at = u64::from(word >> 8);
    }
    found
}

/// Unwires `vector` of IRQ `index`, closes the test's end, and returns every signal the
/// pipe still held.
fn signals_left(
    client: &Client,
    index: u32,
    writer: OwnedFd,
    mut reader: std::io::PipeReader,
) -> usize {
    use std::io::Read;
    client.set_irq_eventfds(index, 0, 1, &[]).unwrap();
    drop(writer);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    rest.len() / 8
}

#[test]
fn interrupts_follow_what_the_driver_enabled_in_config_space() {
    use std::io::Read;
    const MSIX_ENABLE: u16 = 1 << 15;
    let ram_fd = vmig_primitives::memfd("guest-ram", RAM).unwrap();
    let ram = std::fs::File::from(ram_fd.try_clone().unwrap());
    for i in 0..RING {
        ram.write_all_at(&(BUFFERS_IOVA + i * 4096).to_le_bytes(), RING_IOVA + i * 8)
            .unwrap();
    }
    let served = serve(Migration::V2, &ram_fd);
    let c = &served.client;
    let caps = capabilities(c);
    let ids: Vec<u8> = caps.iter().map(|&(_, id)| id).collect();
    assert_eq!(ids, [0x10, 0x11, 0x05], "PCI Express, MSI-X, MSI");
    let msix = caps[1].0;
    let table = u32::from_le_bytes(config(c, msix + 4, 4).try_into().unwrap());
    let pba = u32::from_le_bytes(config(c, msix + 8, 4).try_into().unwrap());
    assert_eq!(
        table,
        dma_engine::MSIX_TABLE_OFFSET,
        "table in BAR0 (BIR 0)"
    );
    assert_eq!(pba, dma_engine::MSIX_PBA_OFFSET, "PBA in BAR0 (BIR 0)");
    write_reg(c, reg::RING_BASE, RING_IOVA);
    write_reg(c, reg::RING_SIZE, RING);
    write_reg(c, reg::SEED, SEED);
    write_reg(c, reg::RATE, 2000);

    // INTx (neither MSI nor MSI-X enabled): asserted with the first record, shown in the
    // status register, automasked, and deasserted once every record is consumed.
    let (mut intx, intx_writer) = std::io::pipe().unwrap();
    let intx_writer = OwnedFd::from(intx_writer);
    c.set_irq_eventfds(0, 0, 1, &[intx_writer.as_fd()]).unwrap();
    write_reg(c, reg::CTRL, 1);
    let mut got = [0u8; 8];
    intx.read_exact(&mut got).unwrap();
    write_reg(c, reg::CTRL, 0);
    assert_ne!(read16(c, CONFIG_STATUS) & 1 << 3, 0, "Interrupt Status");
    let mut next = 0;
    consume(c, &ram, &mut next);
    assert_eq!(read16(c, CONFIG_STATUS) & 1 << 3, 0, "deasserted");
    c.mask_irqs(0, 0, 1, false).unwrap();

    // MSI-X, enabled in config space: a record signalled while entry 0 is masked (through
    // the table in BAR0) sets its pending bit; the unmask sends it, once.
    let control = read16(c, msix + 2);
    c.region_write(
        dma_engine::CONFIG_REGION,
        msix + 2,
        &(control | MSIX_ENABLE).to_le_bytes(),
    )
    .unwrap();
    let (mut msix_irq, msix_writer) = std::io::pipe().unwrap();
    let msix_writer = OwnedFd::from(msix_writer);
    c.set_irq_eventfds(2, 0, 1, &[msix_writer.as_fd()]).unwrap();
    let vector_control = u64::from(table) + 12;
    c.region_write(0, vector_control, &1u32.to_le_bytes())
        .unwrap();
    let produced = read_reg(c, reg::PRODUCER);
    write_reg(c, reg::CTRL, 1);
    wait_until("a record while masked", PATIENCE, || {
        let producer = read_reg(c, reg::PRODUCER);
        (producer > produced)
            .then_some(())
            .ok_or_else(|| format!("producer at {producer}"))
    });
    write_reg(c, reg::CTRL, 0);
    let mut pending = [0u8; 8];
    c.region_read(0, u64::from(pba), &mut pending).unwrap();
    assert_eq!(u64::from_le_bytes(pending), 1, "vector 0 pending");
    c.region_write(0, vector_control, &0u32.to_le_bytes())
        .unwrap();
    msix_irq.read_exact(&mut got).unwrap();
    c.region_read(0, u64::from(pba), &mut pending).unwrap();
    assert_eq!(u64::from_le_bytes(pending), 0, "sent, no longer pending");
    assert_eq!(signals_left(c, 2, msix_writer, msix_irq), 0);
    assert_eq!(
        signals_left(c, 0, intx_writer, intx),
        0,
        "no INTx while MSI-X is on"
    );

    // A reset disables MSI-X and clears the command register.
    c.reset().unwrap();
    assert_eq!(read16(c, msix + 2) & MSIX_ENABLE, 0);
    assert_eq!(read16(c, CONFIG_COMMAND), 0);
}

/// Seed 002's form: BAR0 of 8 KiB whose second page (one sparse area) holds the doorbell the
/// device reads from there, and DMA that the framework refuses to log.
#[test]
fn the_hidden_dma_engine_takes_its_doorbell_from_the_mapped_page_and_logs_nothing() {
    let (ram_fd, _ram) = ram_with_a_ring_of_four();
    let served = common::serve(DmaEngine::with_options(dma_engine::Options::hidden_dma(
        Migration::V2,
    )));
    let c = &served.client;
    c.dma_map(0, RAM, 3, Some((ram_fd.as_fd(), 0))).unwrap();
    // Neither DMA logging (not even its probe) nor DIRTY_PAGES: ENOTTY.
    let enotty = Some(25);
    assert!(
        !c.probe_feature(
            vmig_vfio_user::wire::FEATURE_DMA_LOGGING_START,
            vmig_vfio_user::wire::FEATURE_SET
        )
        .unwrap()
    );
    let range = vmig_primitives::DmaRange::new(vmig_primitives::Iova(0), RAM);
    let err = c.dma_logging_start(4096, &[range]).unwrap_err();
    assert_eq!(err.remote_errno(), enotty, "{err}");
    let err = c.dirty_pages_log(true).unwrap_err();
    assert_eq!(err.remote_errno(), enotty, "{err}");
    // BAR0: 8 KiB, its second page mappable.
    let bar0 = c.region_info(0).unwrap();
    assert_eq!(bar0.info.size, dma_engine::BAR0_SIZE_WITH_DOORBELL);
    assert_eq!(
        bar0.sparse_areas,
        [vmig_primitives::RegionArea {
            offset: dma_engine::DOORBELL_PAGE,
            len: 4096
        }]
    );
    let page = vmig_primitives::HostMemory::map_fd(
        bar0.fd.as_ref().unwrap().as_fd(),
        bar0.info.offset + dma_engine::DOORBELL_PAGE,
        4096,
        true,
    )
    .unwrap();
    fill_the_ring_of_four(c);
    // A doorbell it must refuse is ignored (and written back); a good one, stored into the
    // mapped page with no message at all, frees the ring.
    page.store_u64(0, 99).unwrap();
    assert_eq!(read_reg(c, reg::CONSUMER), 0);
    assert_eq!(page.load_u64(0).unwrap(), 0);
    page.store_u64(0, 4).unwrap();
    wait_until(
        "the doorbell in the page to free the ring",
        PATIENCE,
        || {
            let producer = read_reg(c, reg::PRODUCER);
            (producer > 4)
                .then_some(())
                .ok_or_else(|| format!("producer at {producer}"))
        },
    );
    assert_eq!(read_reg(c, reg::CONSUMER), 4);
    assert_eq!(
        read_reg(c, reg::DOORBELL),
        4,
        "both offsets read the doorbell"
    );
    // A trapped write of the doorbell is a region write like any other, and lands in the page.
    write_reg(c, reg::DOORBELL, 5);
    assert_eq!(page.load_u64(0).unwrap(), 5);
    assert!(
        c.region_write(0, reg::DOORBELL, &0u64.to_le_bytes())
            .is_err()
    );
}
