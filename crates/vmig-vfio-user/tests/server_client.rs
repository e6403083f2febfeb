//! The server framework and the client against each other, over real UNIX sockets, with a test
//! device: regions (trapped and sparse-mmapped), IRQs, DMA through fds and through messages,
//! v2 migration and DMA logging, v1 `DIRTY_PAGES`, disconnects, and malformed input.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmig_primitives::mig_state::MigState;
use vmig_primitives::{DmaRange, Iova, RegionArea};
use vmig_vfio_user::client::{Client, DmaMemory};
use vmig_vfio_user::server::*;
use vmig_vfio_user::wire::*;

const BAR0: u32 = 0;
const BAR1: u32 = 1;
const BIG: u32 = 2;
const BIG_SIZE: u64 = 1 << 20;

/// A device whose BAR0 is 4 KiB of registers. Writing 0x100 makes it DMA `len` (at 0x110)
/// bytes of the byte at 0x118 to the IOVA at 0x108; writing 0x120 raises MSI-X vector 1.
struct TestDevice {
    bar0: Vec<u8>,
    big: Vec<u8>,
    bar1: Arc<OwnedFd>,
    ctx: Option<DeviceContext>,
    running: bool,
    saves: u32,
    v1: bool,
}

impl TestDevice {
    fn new() -> Self {
        Self {
            bar0: vec![0; 4096],
            big: vec![0; usize::try_from(BIG_SIZE).unwrap()],
            bar1: Arc::new(vmig_primitives::memfd("bar1", 16384).unwrap()),
            ctx: None,
            running: true,
            saves: 0,
            v1: false,
        }
    }

    fn v1() -> Self {
        Self {
            v1: true,
            ..Self::new()
        }
    }

    fn reg(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.bar0[offset..offset + 8].try_into().unwrap())
    }
}

impl Device for TestDevice {
    fn spec(&self) -> DeviceSpec {
        DeviceSpec {
            pci: true,
            config_space: None,
            reset: true,
            regions: vec![
                RegionSpec {
                    size: 4096,
                    readable: true,
                    writable: true,
                    ..RegionSpec::default()
                },
                RegionSpec {
                    size: 16384,
                    readable: true,
                    writable: true,
                    mmap: Some(RegionMmap {
                        fd: Arc::clone(&self.bar1),
                        offset: 0,
                        areas: vec![(0, 0x1000), (0x2000, 0x1000)],
                    }),
                    region_type: None,
                },
                RegionSpec {
                    size: BIG_SIZE,
                    readable: true,
                    writable: true,
                    ..RegionSpec::default()
                },
            ],
            irqs: vec![
                IrqSpec {
                    count: 1,
                    flags: IRQ_INFO_EVENTFD,
                },
                IrqSpec::default(),
                IrqSpec {
                    count: 4,
                    flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
                },
            ],
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        let source = if index == BIG { &self.big } else { &self.bar0 };
        data.copy_from_slice(
            &source
                [usize::try_from(offset).unwrap()..usize::try_from(offset).unwrap() + data.len()],
        );
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        if !self.running {
            return Err(Refusal::new(libc::EBUSY, "stopped"));
        }
        let target = if index == BIG {
            &mut self.big
        } else {
            &mut self.bar0
        };
        target[usize::try_from(offset).unwrap()..usize::try_from(offset).unwrap() + data.len()]
            .copy_from_slice(data);
        if index == BAR0 && offset == 0x100 {
            let ctx = self
                .ctx
                .as_ref()
                .ok_or_else(|| Refusal::invalid("no client"))?;
            let payload = vec![self.bar0[0x118]; usize::try_from(self.reg(0x110)).unwrap()];
            ctx.dma_write(self.reg(0x108), &payload)?;
        }
        if index == BAR0 && offset == 0x120 {
            self.ctx.as_ref().map(|c| c.trigger_irq(2, 1));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Refusal> {
        self.running = true;
        Ok(())
    }

    fn connect(&mut self, ctx: DeviceContext) {
        self.ctx = Some(ctx);
    }

    fn disconnect(&mut self) {
        self.ctx = None;
    }

    fn migration(&self) -> MigrationSupport {
        if self.v1 {
            MigrationSupport::V1
        } else {
            MigrationSupport::V2 { pre_copy: true }
        }
    }

    fn set_running(&mut self, running: bool) -> Result<(), Refusal> {
        self.running = running;
        Ok(())
    }

    fn save(&mut self, _last: bool) -> Result<Vec<u8>, Refusal> {
        self.saves += 1;
        Ok(self.bar0.clone())
    }

    fn load(&mut self, record: &[u8]) -> Result<(), Refusal> {
        if record.len() != 4096 {
            return Err(Refusal::invalid(format!(
                "a record of {} bytes",
                record.len()
            )));
        }
        self.bar0.copy_from_slice(record);
        Ok(())
    }
}

/// Guest memory for message-based DMA: 1 MiB at IOVA 0x4000_0000.
struct Memory(Mutex<Vec<u8>>);

const MSG_IOVA: u64 = 0x4000_0000;

impl DmaMemory for Memory {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.0.lock().unwrap();
        let at = usize::try_from(iova.checked_sub(MSG_IOVA).ok_or(libc::EFAULT)?).unwrap();
        buf.copy_from_slice(m.get(at..at + buf.len()).ok_or(libc::EFAULT)?);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.0.lock().unwrap();
        let at = usize::try_from(iova.checked_sub(MSG_IOVA).ok_or(libc::EFAULT)?).unwrap();
        m.get_mut(at..at + data.len())
            .ok_or(libc::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

struct Harness {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Harness {
    fn with(server: Arc<Server<TestDevice>>) -> (Self, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let server = Arc::clone(&server);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || server.serve(b, &stop))
        };
        (
            Self {
                stop,
                thread: Some(thread),
            },
            a,
        )
    }

    fn new(config: ServerConfig) -> (Self, Client, Arc<Memory>) {
        Self::of(TestDevice::new(), config)
    }

    fn of(device: TestDevice, config: ServerConfig) -> (Self, Client, Arc<Memory>) {
        let (h, stream) = Self::with(Arc::new(Server::new(device, config)));
        let memory = Arc::new(Memory(Mutex::new(vec![0; 1 << 20])));
        let client = Client::over(stream, Some(memory.clone() as Arc<dyn DmaMemory>)).unwrap();
        (h, client, memory)
    }

    fn finish(mut self) -> Result<(), ServeError> {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// An error and its causes, one after another.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

fn write_reg(client: &Client, offset: u64, value: u64) {
    client
        .region_write(BAR0, offset, &value.to_le_bytes())
        .unwrap();
}

#[test]
fn negotiation_info_regions_and_irqs() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    assert_eq!(client.version().major, 0);
    assert_eq!(client.server_caps().max_msg_fds(), 16);
    let info = client.device_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs), (3, 3));
    assert_eq!(info.flags, DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI);
    let bar1 = client.region_info(BAR1).unwrap();
    assert_eq!(bar1.info.size, 16384);
    assert_eq!(
        bar1.info.flags & REGION_INFO_FLAG_MMAP,
        REGION_INFO_FLAG_MMAP
    );
    assert_eq!(
        bar1.sparse_areas,
        [RegionArea::new(0, 0x1000), RegionArea::new(0x2000, 0x1000)]
    );
    let fd = bar1.fd.expect("the mmappable region's fd");
    // The fd is the device's memory: what the client writes, the device file holds.
    let mut file = std::fs::File::from(fd);
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(0x2000)).unwrap();
    file.write_all(b"through the fd").unwrap();
    let bar0 = client.region_info(BAR0).unwrap();
    assert!(bar0.fd.is_none() && bar0.sparse_areas.is_empty());
    let msix = client.irq_info(2).unwrap();
    assert_eq!(msix.count, 4);
    assert_eq!(
        client.region_info(9).unwrap_err().remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        client.irq_info(7).unwrap_err().remote_errno(),
        Some(libc::EINVAL)
    );
}

#[test]
fn region_accesses_are_split_at_the_transfer_limit_and_checked() {
    let (_h, client, _) = Harness::new(ServerConfig {
        max_data_xfer_size: 64 << 10,
        ..ServerConfig::default()
    });
    let data: Vec<u8> = (0..BIG_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    client.region_write(BIG, 0, &data).unwrap();
    let mut back = vec![0u8; usize::try_from(BIG_SIZE).unwrap()];
    client.region_read(BIG, 0, &mut back).unwrap();
    assert_eq!(back, data);
    // Outside the region, unknown region, zero-sized: refused, and the server goes on.
    let mut four = [0u8; 4];
    assert_eq!(
        client
            .region_read(BAR0, 4094, &mut four)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        client
            .region_read(5, 0, &mut four)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        client
            .region_write(BAR0, u64::MAX - 1, &four)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    client.region_read(BAR0, 0, &mut four).unwrap();
}

#[test]
fn device_dma_through_an_fd_is_logged_and_reported() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    let ram = vmig_primitives::memfd("ram", 2 << 20).unwrap();
    client
        .dma_map(0, 1 << 20, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    client
        .dma_map(1 << 20, 1 << 20, 3, Some((ram.as_fd(), 1 << 20)))
        .unwrap();
    assert_eq!(
        client
            .dma_logging_start(4096, &[DmaRange::new(Iova(0), 2 << 20)])
            .unwrap(),
        4096
    );
    // The device writes 100 bytes of 0xab at 0x3000 and 10 at 0x100000 + 0x5000.
    for (iova, len) in [(0x3000u64, 100u64), (0x10_5000, 10)] {
        write_reg(&client, 0x108, iova);
        write_reg(&client, 0x110, len);
        client.region_write(BAR0, 0x118, &[0xab]).unwrap();
        write_reg(&client, 0x100, 1);
    }
    let mut check = [0u8; 100];
    let file = std::fs::File::from(ram.try_clone().unwrap());
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut check, 0x3000).unwrap();
    assert_eq!(check, [0xab; 100], "the write landed in guest memory");
    // One report over both whole mappings (another implementation answers empty there).
    let bitmap = client.dma_logging_report(0, 2 << 20, 4096).unwrap();
    let dirty: Vec<u64> = (0..512)
        .filter(|&p| bitmap[p / 64] >> (p % 64) & 1 == 1)
        .map(|p| p as u64)
        .collect();
    assert_eq!(dirty, [3, 256 + 5]);
    // Read-and-clear; a coarser page size works too.
    assert!(
        client
            .dma_logging_report(0, 2 << 20, 4096)
            .unwrap()
            .iter()
            .all(|&w| w == 0)
    );
    write_reg(&client, 0x100, 1);
    let coarse = client.dma_logging_report(0, 2 << 20, 1 << 16).unwrap();
    assert_eq!(coarse[0], 1 << (0x10_5000 >> 16));
    client.dma_logging_stop().unwrap();
    assert_eq!(
        client
            .dma_logging_report(0, 1 << 20, 4096)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
}

#[test]
fn logging_refuses_a_second_start_and_reports_it_cannot_size() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    let ram = vmig_primitives::memfd("ram", 1 << 20).unwrap();
    client
        .dma_map(0, 1 << 20, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    client.dma_logging_start(4096, &[]).unwrap();
    assert_eq!(
        client
            .dma_logging_start(4096, &[])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EBUSY)
    );
    // Page sizes that are not a power of two, or below 4 KiB, and ranges not aligned to them.
    for (iova, length, page_size) in [
        (0, 1 << 20, 3000),
        (0, 1 << 20, 2048),
        (0x800, 1 << 20, 4096),
        (0, 0, 4096),
    ] {
        let err = client
            .dma_logging_report(iova, length, page_size)
            .unwrap_err();
        assert_eq!(
            err.remote_errno(),
            Some(libc::EINVAL),
            "{iova:#x}+{length:#x} at {page_size}"
        );
    }
}

#[test]
fn message_based_dma_reaches_client_memory_and_the_client_records_it() {
    let (_h, client, memory) = Harness::new(ServerConfig {
        max_data_xfer_size: 4096,
        ..ServerConfig::default()
    });
    client.dma_map(MSG_IOVA, 1 << 20, 3, None).unwrap();
    write_reg(&client, 0x108, MSG_IOVA + 0x1ff0);
    write_reg(&client, 0x110, 10_000);
    client.region_write(BAR0, 0x118, &[0x5a]).unwrap();
    write_reg(&client, 0x100, 1);
    let m = memory.0.lock().unwrap();
    assert!(m[0x1ff0..0x1ff0 + 10_000].iter().all(|&b| b == 0x5a));
    assert_eq!(m[0x1fef], 0);
    drop(m);
    let pages = client.take_dma_written_pages();
    let first = MSG_IOVA / 4096 + 1;
    // [0x1ff0, 0x1ff0 + 10000) spans pages 1 to 4 of the region.
    assert_eq!(
        pages,
        (first..=first + 3).collect::<Vec<_>>(),
        "pages the server wrote by message"
    );
    // Outside the mapping: the DMA fails and the register write reports it.
    write_reg(&client, 0x108, MSG_IOVA + (1 << 20) - 4);
    assert_eq!(
        client
            .region_write(BAR0, 0x100, &[1; 8])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EFAULT)
    );
    client.dma_unmap(MSG_IOVA, 1 << 20).unwrap();
    assert_eq!(
        client
            .dma_unmap(MSG_IOVA, 1 << 20)
            .unwrap_err()
            .remote_errno(),
        Some(libc::ENOENT)
    );
}

#[test]
fn irqs_signal_wired_eventfds_unless_masked() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    // SAFETY-free eventfd: a pipe stands in (the server writes 8 bytes to whatever fd it got).
    let (mut reader, writer) = std::io::pipe().unwrap();
    let writer = OwnedFd::from(writer);
    client.set_irq_eventfds(2, 1, 1, &[writer.as_fd()]).unwrap();
    write_reg(&client, 0x120, 1);
    let mut got = [0u8; 8];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(u64::from_ne_bytes(got), 1);
    // A signal while masked is held, and sent by the unmask (as a masked MSI-X vector's
    // pending bit is, PCI Local Bus 3.0 §6.8.2.9).
    client.mask_irqs(2, 1, 1, true).unwrap();
    write_reg(&client, 0x120, 1);
    client.mask_irqs(2, 1, 1, false).unwrap();
    reader.read_exact(&mut got).unwrap();
    write_reg(&client, 0x120, 1);
    reader.read_exact(&mut got).unwrap();
    drop(writer);
    // No more signals: the held one was sent once, and an unwired vector sends nothing.
    client.set_irq_eventfds(2, 1, 1, &[]).unwrap();
    write_reg(&client, 0x120, 1);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(
        client
            .set_irq_eventfds(2, 3, 2, &[])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
}

#[test]
fn v2_migration_moves_device_state_between_two_servers() {
    let (src_h, src, _) = Harness::new(ServerConfig {
        max_data_xfer_size: 1000,
        ..ServerConfig::default()
    });
    let (dst_h, dst, _) = Harness::new(ServerConfig::default());
    let flags = src.migration_flags().unwrap().unwrap();
    assert_eq!(flags, MIGRATION_STOP_COPY | MIGRATION_PRE_COPY);
    assert!(
        src.probe_feature(FEATURE_MIG_DEVICE_STATE, FEATURE_SET)
            .unwrap()
    );
    src.region_write(BAR0, 0x800, b"state before pre-copy")
        .unwrap();
    assert_eq!(
        src.set_mig_state(MigState::PreCopy).unwrap(),
        MigState::PreCopy
    );
    let mut stream = src.mig_data_read_all().unwrap();
    src.region_write(BAR0, 0x800, b"state after pre-copy!")
        .unwrap();
    assert_eq!(
        src.set_mig_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    stream.extend(src.mig_data_read_all().unwrap());
    // STOP_COPY -> PRE_COPY is refused and changes nothing.
    assert_eq!(
        src.set_mig_state(MigState::PreCopy)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(src.mig_state().unwrap(), MigState::StopCopy);
    // Register reads answer in STOP_COPY and show the frozen state.
    let mut frozen = [0u8; 21];
    src.region_read(BAR0, 0x800, &mut frozen).unwrap();
    assert_eq!(&frozen, b"state after pre-copy!");
    // The destination: RUNNING -> RESUMING walks through STOP.
    assert_eq!(
        dst.set_mig_state(MigState::Resuming).unwrap(),
        MigState::Resuming
    );
    assert_eq!(
        dst.mig_data_read(16).unwrap_err().remote_errno(),
        Some(libc::EINVAL)
    );
    dst.mig_data_write(&stream).unwrap();
    assert_eq!(
        dst.set_mig_state(MigState::Running).unwrap(),
        MigState::Running
    );
    let mut moved = [0u8; 21];
    dst.region_read(BAR0, 0x800, &mut moved).unwrap();
    assert_eq!(&moved, b"state after pre-copy!");
    assert_eq!(src.set_mig_state(MigState::Stop).unwrap(), MigState::Stop);
    drop((src, dst));
    assert!(src_h.finish().is_ok());
    assert!(dst_h.finish().is_ok());
}

#[test]
fn a_broken_stream_fails_resuming_into_error_and_reset_recovers() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    client.set_mig_state(MigState::Resuming).unwrap();
    client.mig_data_write(&[0x10, 0, 0, 0, 1, 2, 3]).unwrap();
    assert_eq!(
        client
            .set_mig_state(MigState::Stop)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(client.mig_state().unwrap(), MigState::Error);
    assert_eq!(
        client
            .set_mig_state(MigState::Running)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    client.reset().unwrap();
    assert_eq!(client.mig_state().unwrap(), MigState::Running);
}

#[test]
fn v1_dirty_pages_and_unmap_with_bitmap() {
    let (_h, client, _) = Harness::new(ServerConfig::default());
    let ram = vmig_primitives::memfd("ram", 1 << 20).unwrap();
    client
        .dma_map(0, 1 << 20, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    client.dirty_pages_log(true).unwrap();
    write_reg(&client, 0x108, 0x7000);
    write_reg(&client, 0x110, 1);
    write_reg(&client, 0x100, 1);
    let bitmap = client.dirty_pages_bitmap(0, 1 << 20, 4096).unwrap();
    assert_eq!(bitmap[0], 1 << 7);
    assert_eq!(
        client.dirty_pages_bitmap(0, 1 << 20, 4096).unwrap()[0],
        0,
        "read and clear"
    );
    write_reg(&client, 0x108, 0x9000);
    write_reg(&client, 0x100, 1);
    let bitmap = client.dma_unmap_with_bitmap(0, 1 << 20, 4096).unwrap();
    assert_eq!(bitmap[0], 1 << 9);
    // Unmapped: the device's DMA now fails.
    assert_eq!(
        client
            .region_write(BAR0, 0x100, &[1; 8])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EFAULT)
    );
    client.dirty_pages_log(false).unwrap();
}

#[test]
fn a_disconnect_drops_mappings_and_keeps_device_state() {
    let server = Arc::new(Server::new(TestDevice::new(), ServerConfig::default()));
    let dir = std::env::temp_dir().join(format!("vmig-vfio-user-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("reconnect.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let server = Arc::clone(&server);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || server.run(&listener, &stop))
    };
    let ram = vmig_primitives::memfd("ram", 1 << 20).unwrap();
    let first = Client::connect(&path, None).unwrap();
    first
        .dma_map(0, 1 << 20, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    first.region_write(BAR0, 0x800, b"kept").unwrap();
    first.set_mig_state(MigState::Stop).unwrap();
    first.close();
    // A raw peer that sends garbage (a header whose msg_size 3 is shorter than the header) is
    // dropped without a reply: the server closes the connection, and then goes on.
    {
        use std::io::Write;
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(&[1, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let mut reply = Vec::new();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match raw.read_to_end(&mut reply) {
            Ok(_) => assert!(reply.is_empty(), "a reply to broken framing: {reply:02x?}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server did not close the garbage peer's connection within 5 s: {e}")
            }
            Err(e) => panic!("the garbage peer's connection failed instead of closing: {e}"),
        }
    }
    let second = Client::connect(&path, None).unwrap();
    let mut kept = [0u8; 4];
    second.region_read(BAR0, 0x800, &mut kept).unwrap();
    assert_eq!(&kept, b"kept", "device state survives the disconnect");
    assert_eq!(
        second.mig_state().unwrap(),
        MigState::Stop,
        "so does the migration state"
    );
    second.set_mig_state(MigState::Running).unwrap();
    write_reg(&second, 0x108, 0x1000);
    write_reg(&second, 0x110, 1);
    assert_eq!(
        second
            .region_write(BAR0, 0x100, &[1; 8])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EFAULT),
        "the first client's mappings are gone"
    );
    second.close();
    stop.store(true, std::sync::atomic::Ordering::Release);
    runner.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// A peer that speaks raw messages: what a buggy or hostile client sends gets an error reply
/// with the right errno, and the server goes on serving; broken framing ends the connection.
#[test]
fn raw_malformed_requests_get_error_replies_and_the_server_goes_on() {
    use vmig_vfio_user::Channel;
    use vmig_vfio_user::caps;
    use zerocopy::IntoBytes;
    let (h, stream) = Harness::with(Arc::new(Server::new(
        TestDevice::new(),
        ServerConfig::default(),
    )));
    let raw = Channel::new(stream);
    let mut id = 0u16;
    let mut ask =
        |command: u16, flags: u32, payload: &[&[u8]], fds: &[std::os::fd::BorrowedFd<'_>]| {
            id += 1;
            let header = Header {
                msg_id: id,
                command,
                flags,
                ..Header::default()
            };
            raw.send(header, payload, fds).unwrap();
            let reply = raw.recv().unwrap();
            assert_eq!((reply.header.msg_id, reply.header.command), (id, command));
            assert!(reply.header.is_reply());
            reply
        };
    let version = caps::encode(0, 2, &caps::Capabilities::default());
    assert!(!ask(1, 0, &[&version], &[]).header.is_error());
    let errno = |m: vmig_vfio_user::Message| {
        m.header
            .is_error()
            .then_some(i32::try_from(m.header.error_no).unwrap())
    };
    // Unknown command; a second VERSION. (A stray reply is dropped: nobody waits for it.)
    assert_eq!(errno(ask(77, 0, &[], &[])), Some(libc::ENOSYS));
    assert_eq!(errno(ask(1, 0, &[&version], &[])), Some(libc::EINVAL));
    // DMA_MAP with two fds; GET_INFO with a file descriptor it does not take.
    let ram = vmig_primitives::memfd("ram", 1 << 20).unwrap();
    let map = DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        addr: 0,
        size: 1 << 20,
    };
    assert_eq!(
        errno(ask(2, 0, &[map.as_bytes()], &[ram.as_fd(), ram.as_fd()])),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(ask(
            4,
            0,
            &[DeviceInfo {
                argsz: 16,
                ..Default::default()
            }
            .as_bytes()],
            &[ram.as_fd()]
        )),
        Some(libc::EINVAL)
    );
    // A logging report whose bitmap size does not match its range: EINVAL.
    assert_eq!(errno(ask(2, 0, &[map.as_bytes()], &[ram.as_fd()])), None);
    let start = DmaLoggingControl {
        page_size: 4096,
        num_ranges: 0,
        reserved: 0,
    };
    let head = DeviceFeature {
        argsz: 24,
        flags: FEATURE_DMA_LOGGING_START | FEATURE_SET,
    };
    assert_eq!(
        errno(ask(16, 0, &[head.as_bytes(), start.as_bytes()], &[])),
        None
    );
    let report = DmaLoggingReport {
        iova: 0,
        length: 1 << 20,
        page_size: 4096,
    };
    // "argsz must be >= 8 + 24 + bitmap bytes": a bitmap that does not fit is EINVAL.
    let head = DeviceFeature {
        argsz: 8 + 24 + 16,
        flags: FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
    };
    assert_eq!(
        errno(ask(16, 0, &[head.as_bytes(), report.as_bytes()], &[])),
        Some(libc::EINVAL)
    );
    // Absurd sizes are refused before anything is allocated.
    let huge = DmaLoggingReport {
        iova: 0,
        length: 1 << 60,
        page_size: 1 << 40,
    };
    let head = DeviceFeature {
        argsz: 8 + 24 + 8192,
        flags: FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
    };
    assert_eq!(
        errno(ask(16, 0, &[head.as_bytes(), huge.as_bytes()], &[])),
        Some(libc::EINVAL)
    );
    let unmap = DmaUnmap {
        argsz: 40,
        flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        addr: 0,
        size: 1 << 62,
    };
    let bitmap = DirtyBitmap {
        pgsize: 4096,
        size: (1u64 << 62) / 4096 / 8,
    };
    assert_eq!(
        errno(ask(3, 0, &[unmap.as_bytes(), bitmap.as_bytes()], &[])),
        Some(libc::EINVAL)
    );
    // A failing command sent with NO_REPLY gets no reply: the next reply is the next command's.
    raw.send(
        Header {
            msg_id: 500,
            command: 77,
            flags: FLAG_NO_REPLY,
            ..Header::default()
        },
        &[],
        &[],
    )
    .unwrap();
    let head = DeviceFeature {
        argsz: 8 + 24 + 32,
        flags: FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
    };
    let good = ask(16, 0, &[head.as_bytes(), report.as_bytes()], &[]);
    assert_eq!(good.payload.len(), 8 + 24 + 32);
    // Migration data in the wrong state; a SET with a state that does not exist.
    assert_eq!(
        errno(ask(
            17,
            0,
            &[MigData {
                argsz: 24,
                size: 16
            }
            .as_bytes()],
            &[]
        )),
        Some(libc::EINVAL)
    );
    let set = DeviceFeature {
        argsz: 16,
        flags: FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
    };
    let state = MigDeviceState {
        device_state: 42,
        data_fd: u32::MAX,
    };
    assert_eq!(
        errno(ask(16, 0, &[set.as_bytes(), state.as_bytes()], &[])),
        Some(libc::EINVAL)
    );
    // Still serving.
    assert_eq!(
        errno(ask(
            4,
            0,
            &[DeviceInfo {
                argsz: 16,
                ..Default::default()
            }
            .as_bytes()],
            &[]
        )),
        None
    );
    // A header whose msg_size lies ends the connection; the server says why.
    use std::io::Write;
    let lie = Header {
        msg_id: 99,
        command: 4,
        msg_size: 8,
        ..Header::default()
    };
    raw.stream().write_all(lie.as_bytes()).unwrap();
    assert!(matches!(
        raw.recv(),
        Err(vmig_vfio_user::TransportError::Closed)
    ));
    let err = h.finish().unwrap_err();
    let why = chain(&err);
    assert!(why.contains("smaller than the 16-byte header"), "{why}");
}

/// The same migration, driven through the one interface, for a v1 and a v2 device.
#[test]
fn device_migration_moves_state_in_both_protocols() {
    use vmig_vfio_user::client::{DeviceMigration, Protocol};
    for v1 in [true, false] {
        let make = || {
            if v1 {
                TestDevice::v1()
            } else {
                TestDevice::new()
            }
        };
        let config = ServerConfig {
            max_data_xfer_size: 1500,
            ..ServerConfig::default()
        };
        let (_src_h, src, _) = Harness::of(make(), config.clone());
        let (_dst_h, dst, _) = Harness::of(make(), config);
        let source = DeviceMigration::detect(&src).unwrap().expect("migratable");
        let target = DeviceMigration::detect(&dst).unwrap().expect("migratable");
        match source.protocol() {
            Protocol::V1 { region, .. } => assert!(v1 && region == 9),
            Protocol::V2 { pre_copy } => assert!(!v1 && pre_copy),
        }
        src.region_write(BAR0, 0x400, b"first").unwrap();
        source.start_precopy().unwrap();
        let mut chunks = source.read_precopy().unwrap();
        src.region_write(BAR0, 0x400, b"final").unwrap();
        chunks.extend(source.stop_and_copy().unwrap());
        assert!(!chunks.is_empty());
        source.finish_source().unwrap();
        target.start_resume().unwrap();
        for chunk in &chunks {
            target.write_chunk(chunk).unwrap();
        }
        target.finish_resume().unwrap();
        let mut got = [0u8; 5];
        dst.region_read(BAR0, 0x400, &mut got).unwrap();
        assert_eq!(&got, b"final", "v1 {v1}");
        // The source can be resumed after a cancel.
        source.cancel().unwrap();
        src.region_write(BAR0, 0x400, b"again").unwrap();
    }
}

/// seed000 §2: native-width header access, the invalid states, reserved bits kept, data_size
/// only while resuming, and a rejected stream leaving the error state until reset.
#[test]
fn the_v1_region_follows_the_seed_rules() {
    let (_h, client, _) = Harness::of(TestDevice::v1(), ServerConfig::default());
    let region = client.region_info(9).unwrap();
    assert_eq!(
        region.region_type,
        Some((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION))
    );
    assert_eq!(
        region.sparse_areas,
        [RegionArea::new(4096, 1 << 20)],
        "the data section is mmappable"
    );
    assert!(region.fd.is_some());
    assert!(
        client.migration_flags().unwrap().is_none(),
        "a v1 device offers no v2 feature"
    );
    let read32 = |offset| {
        let mut b = [0u8; 4];
        client
            .region_read(9, offset, &mut b)
            .map(|()| u32::from_le_bytes(b))
    };
    assert_eq!(read32(0).unwrap(), 1, "the default state is _RUNNING");
    let mut two = [0u8; 2];
    assert_eq!(
        client
            .region_read(9, 0, &mut two)
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        client
            .region_read(9, 12, &mut [0u8; 4])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    // Reserved bits are kept; 110b (error) and 101b are refused and change nothing.
    client
        .region_write(9, 0, &0x8000_0001u32.to_le_bytes())
        .unwrap();
    assert_eq!(read32(0).unwrap(), 0x8000_0001);
    for bad in [0x8000_0006u32, 0x8000_0005] {
        assert_eq!(
            client
                .region_write(9, 0, &bad.to_le_bytes())
                .unwrap_err()
                .remote_errno(),
            Some(libc::EINVAL)
        );
        assert_eq!(read32(0).unwrap(), 0x8000_0001);
    }
    assert_eq!(
        client
            .region_write(9, 24, &8u64.to_le_bytes())
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    // A stream the device rejects: the 100 -> 001 write fails and the state reads ERROR.
    client
        .region_write(9, 0, &0x8000_0004u32.to_le_bytes())
        .unwrap();
    client.region_write(9, 4096, &[9, 0, 0, 0, 1, 2]).unwrap();
    client.region_write(9, 24, &6u64.to_le_bytes()).unwrap();
    assert_eq!(
        client
            .region_write(9, 0, &0x8000_0001u32.to_le_bytes())
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        read32(0).unwrap(),
        0x8000_0006,
        "the error state, reserved bits kept"
    );
    assert_eq!(
        client
            .region_write(9, 0, &1u32.to_le_bytes())
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        client
            .region_read(9, 4096, &mut [0u8; 8])
            .unwrap_err()
            .remote_errno(),
        Some(libc::EINVAL)
    );
    client.reset().unwrap();
    assert_eq!(read32(0).unwrap() & 7, 1);
}

/// seed000 test cases 24 and 15: `data_offset` is read only while saving or resuming; in
/// 001b, 000b and the error state it is refused (the `v1_region` fuzz property found it
/// answered in every state).
#[test]
fn data_offset_is_read_only_while_saving_or_resuming() {
    let (_h, client, _) = Harness::of(TestDevice::v1(), ServerConfig::default());
    let set = |state: u32| client.region_write(9, 0, &state.to_le_bytes());
    let data_offset = || {
        let mut b = [0u8; 8];
        client
            .region_read(9, 16, &mut b)
            .map(|()| u64::from_le_bytes(b))
            .map_err(|e| e.remote_errno())
    };
    assert_eq!(data_offset(), Err(Some(libc::EINVAL)), "in 001b");
    set(0).unwrap();
    assert_eq!(data_offset(), Err(Some(libc::EINVAL)), "in 000b");
    set(4).unwrap();
    assert_eq!(data_offset(), Ok(4096), "in 100b");
    set(1).unwrap();
    set(3).unwrap();
    assert_eq!(data_offset(), Ok(4096), "in 011b");
    set(2).unwrap();
    assert_eq!(data_offset(), Ok(4096), "in 010b");
    set(1).unwrap();
    // The error state: a stream the device rejects fails 100b -> 001b.
    set(4).unwrap();
    client.region_write(9, 4096, &[9, 0, 0, 0, 1, 2]).unwrap();
    client.region_write(9, 24, &6u64.to_le_bytes()).unwrap();
    set(1).unwrap_err();
    assert_eq!(data_offset(), Err(Some(libc::EINVAL)), "in the error state");
    client.reset().unwrap();
    assert_eq!(
        data_offset(),
        Err(Some(libc::EINVAL)),
        "in 001b after the reset"
    );
}

/// Message-based DMA with and without a twin socket: the same bytes arrive either way.
#[test]
fn message_based_dma_works_with_and_without_a_twin_socket() {
    for twin in [false, true] {
        let (_h, stream) = Harness::with(Arc::new(Server::new(
            TestDevice::new(),
            ServerConfig::default(),
        )));
        let memory = Arc::new(Memory(Mutex::new(vec![0; 1 << 20])));
        let client =
            Client::negotiate(stream, Some(memory.clone() as Arc<dyn DmaMemory>), twin).unwrap();
        assert_eq!(client.twin_socket(), twin);
        assert_eq!(
            client.server_caps().twin_socket(),
            twin,
            "offered only when asked for"
        );
        client.dma_map(MSG_IOVA, 1 << 20, 3, None).unwrap();
        write_reg(&client, 0x108, MSG_IOVA + 64);
        write_reg(&client, 0x110, 3000);
        client.region_write(BAR0, 0x118, &[0x77]).unwrap();
        write_reg(&client, 0x100, 1);
        let m = memory.0.lock().unwrap();
        assert!(m[64..3064].iter().all(|&b| b == 0x77), "twin {twin}");
        drop(m);
        assert_eq!(client.take_dma_written_pages().len(), 1);
    }
}
