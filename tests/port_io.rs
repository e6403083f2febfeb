//! Guest port I/O to a device's I/O-port BAR, end to end. A vfio-user device whose config space
//! marks BAR0 as I/O ports — a loopback 16550-like UART, as the kernel's `mtty` sample is — is
//! placed in the guest's I/O-port window; the guest's own `out`s and `in`s (the port script
//! vCPU 0 runs) reach it as region reads and writes, and the bytes the source's guest left in
//! its FIFO are read back by the destination's guest after a live migration.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vmig_kvm::{DirtyLogMode, PortOp, Vm, VmConfig, Workload};
use vmig_migration::device::BarSpace;
use vmig_migration::machine::{Bar, device_area_bytes};
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    DeviceSpec, Incoming, Machine, MigrationParams, Progress, Role, Status, migrate, receive,
};
use vmig_primitives::GuestAddress;
use vmig_test_support::require_kvm;
use vmig_vfio_user::server::{
    Device, DeviceSpec as ServerSpec, MigrationSupport, Refusal, RegionSpec, Server, ServerConfig,
};

const PATIENCE: Duration = Duration::from_secs(30);

/// UART registers (offsets in BAR0) and LSR bits, as `mtty` has them.
const RX_TX: u16 = 0;
const LSR: u16 = 5;
const SCR: u16 = 7;
const LSR_DATA_READY: u8 = 0x01;
const LSR_EMPTY: u8 = 0x60;
const FIFO: usize = 16;

/// A loopback UART: BAR0 is 8 I/O ports (its config-space register is `0x1`), a byte written
/// to THR goes into a 16-byte FIFO that RX returns, LSR says whether one waits, SCR keeps a
/// byte; it migrates (v2) its FIFO and SCR.
#[derive(Default)]
struct LoopbackUart {
    fifo: Vec<u8>,
    scr: u8,
}

impl LoopbackUart {
    fn config() -> [u8; 256] {
        let mut config = [0u8; 256];
        config[0..4].copy_from_slice(&0x3253_4348u32.to_le_bytes()); // 4348:3253
        config[4] = 0x01; // command: I/O+
        config[0x0b] = 0x07; // class: simple communication controller
        config[0x10] = 0x01; // BAR0: I/O space
        config
    }
}

impl Device for LoopbackUart {
    fn spec(&self) -> ServerSpec {
        let mut regions = vec![RegionSpec::default(); 8];
        regions[0] = RegionSpec {
            size: 8,
            readable: true,
            writable: true,
            ..RegionSpec::default()
        };
        regions[7] = RegionSpec {
            size: 256,
            readable: true,
            writable: true,
            ..RegionSpec::default()
        };
        ServerSpec {
            pci: true,
            reset: true,
            regions,
            irqs: Vec::new(),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        match index {
            7 => {
                let at = usize::try_from(offset).unwrap();
                data.copy_from_slice(&Self::config()[at..at + data.len()]);
            }
            0 => {
                data.fill(0);
                data[0] = match u16::try_from(offset).unwrap() {
                    RX_TX if self.fifo.is_empty() => 0,
                    RX_TX => self.fifo.remove(0),
                    LSR if self.fifo.is_empty() => LSR_EMPTY,
                    LSR => LSR_DATA_READY,
                    SCR => self.scr,
                    _ => 0,
                };
            }
            _ => return Err(Refusal::invalid(format!("no region {index}"))),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        match (index, u16::try_from(offset).unwrap()) {
            (0, RX_TX) if self.fifo.len() < FIFO => self.fifo.push(data[0]),
            (0, SCR) => self.scr = data[0],
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Refusal> {
        *self = Self::default();
        Ok(())
    }

    fn migration(&self) -> MigrationSupport {
        MigrationSupport::V2 { pre_copy: false }
    }

    fn save(&mut self, _last: bool) -> Result<Vec<u8>, Refusal> {
        let mut record = vec![self.scr];
        record.extend_from_slice(&self.fifo);
        Ok(record)
    }

    fn load(&mut self, record: &[u8]) -> Result<(), Refusal> {
        let (&scr, fifo) = record
            .split_first()
            .filter(|(_, fifo)| fifo.len() <= FIFO)
            .ok_or_else(|| Refusal::invalid("a UART record is SCR then at most 16 bytes"))?;
        self.scr = scr;
        self.fifo = fifo.to_vec();
        Ok(())
    }
}

struct UartServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UartServer {
    fn start(dir: &Path, name: &str) -> Self {
        let socket = dir.join(name);
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::new(LoopbackUart::default(), ServerConfig::default());
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let _ = server.run(&listener, &stop);
            })
        };
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    fn spec(&self) -> DeviceSpec {
        DeviceSpec::vfio_user(self.socket.clone(), 0)
    }
}

impl Drop for UartServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmig-port-io-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn source(specs: &[DeviceSpec]) -> Machine {
    let ram = 64 << 20;
    let layout = vmig_kvm::guest::GuestLayout::new(ram, &Workload::default()).unwrap();
    let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
    let config = VmConfig {
        ram,
        vcpus: 2,
        workload: Workload {
            rate: Some(5000),
            wss: Some(data - device_area_bytes(specs.len())),
            ..Workload::default()
        },
        dirty_log: DirtyLogMode::Bitmap,
        ..VmConfig::default()
    };
    let machine = Machine::attach(Vm::new(&config).unwrap(), specs, Role::Source).unwrap();
    machine.vm.resume().unwrap();
    machine
}

fn out(port: u16, value: u8) -> PortOp {
    PortOp::Out { port, value }
}

fn read(port: u16) -> PortOp {
    PortOp::In { port }
}

fn write_all(base: u16, text: &[u8]) -> Vec<PortOp> {
    text.iter().map(|&b| out(base + RX_TX, b)).collect()
}

/// "An I/O BAR of a device routes guest port I/O to region reads and writes": each device's
/// I/O BAR is placed at 0xc000 + 0x100 × device, the guest's `out`s and `in`s there reach the
/// right device in order, reads count as trapped, and a port no device holds is refused before
/// the guest sees it (the VM runs on).
#[test]
fn io_bars_sit_in_the_port_window_and_the_guests_port_io_reaches_their_device() {
    require_kvm!();
    let dir = temp_dir("route");
    let uarts = [
        UartServer::start(&dir, "a.sock"),
        UartServer::start(&dir, "b.sock"),
    ];
    let specs: Vec<_> = uarts.iter().map(UartServer::spec).collect();
    let machine = source(&specs);
    for (i, device) in machine.devices.iter().enumerate() {
        assert_eq!(
            device.bars,
            [Bar {
                index: 0,
                gpa: GuestAddress(0xc000 + 0x100 * i as u64),
                size: 8,
                space: BarSpace::Io,
            }],
            "device {i}"
        );
        assert!(device.mapped.is_empty(), "an I/O BAR is never mapped");
    }
    let (a, b) = (0xc000, 0xc100);
    let mut script = write_all(a, b"ab");
    script.extend(write_all(b, b"z"));
    script.extend([
        out(a + SCR, 0x5a),
        read(a + LSR),
        read(a + RX_TX),
        read(b + RX_TX),
        read(a + RX_TX),
        read(a + LSR),
        read(b + LSR),
        read(a + SCR),
        read(b + SCR),
    ]);
    let reads = machine.run_port_script(&script, PATIENCE).unwrap();
    assert_eq!(
        reads,
        [
            LSR_DATA_READY,
            b'a',
            b'z',
            b'b',
            LSR_EMPTY,
            LSR_EMPTY,
            0x5a,
            0
        ]
    );
    assert_eq!(machine.trapped_reads(0, 0), 5);
    assert_eq!(machine.trapped_reads(1, 0), 3);
    for (bad, why) in [
        (
            0xc008,
            "I/O port 0xc008 is in no device's I/O BAR: expected a port of a.sock BAR0 at 0xc000-0xc007, b.sock BAR0 at 0xc100-0xc107",
        ),
        (0x3f8, "I/O port 0x3f8 is in no device's I/O BAR"),
    ] {
        let err = machine
            .run_port_script(&[read(a + LSR), read(bad)], PATIENCE)
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    // Nothing of a refused script ran; the VM and its guest go on.
    assert_eq!(machine.trapped_reads(0, 0), 5);
    machine.vm.check_vcpus().unwrap();
    let verify = machine.vm.verify(PATIENCE).unwrap();
    assert!(verify.passed(), "{verify:?}");
}

/// A VM whose devices have no I/O BAR takes no port script, saying so.
#[test]
fn a_vm_without_io_bars_refuses_a_port_script() {
    require_kvm!();
    let machine = source(&[]);
    let err = machine
        .run_port_script(&[read(0xc000)], PATIENCE)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "I/O port 0xc000 is in no device's I/O BAR: expected a port of an I/O BAR, and this VM's devices have none"
        ),
        "{err}"
    );
}

/// How the in-guest mtty test proves a UART's state moved: before the switchover the source's
/// guest writes a known byte sequence to THR of each port; after resuming on the destination,
/// the destination's guest reads LSR and RX back and finds the bytes, in order, then an empty
/// FIFO.
#[test]
fn a_uarts_fifo_written_by_the_source_guest_is_read_back_by_the_destination_guest() {
    require_kvm!();
    let dir = temp_dir("migrate");
    let src = [
        UartServer::start(&dir, "s0.sock"),
        UartServer::start(&dir, "s1.sock"),
    ];
    let dst = [
        UartServer::start(&dir, "d0.sock"),
        UartServer::start(&dir, "d1.sock"),
    ];
    let specs: Vec<_> = src.iter().map(UartServer::spec).collect();
    let machine = source(&specs);
    let (a, b) = (0xc000, 0xc100);
    let mut script = write_all(a, b"vmig");
    script.extend(write_all(b, b"mtty"));
    script.extend([out(a + SCR, 0xa5), out(b + SCR, 0x5a)]);
    assert!(
        machine
            .run_port_script(&script, PATIENCE)
            .unwrap()
            .is_empty()
    );

    let uri = Uri::Unix(dir.join("m.sock"));
    let incoming = Incoming {
        listener: Listener::bind(&uri).unwrap(),
        prepared_memory: None,
        devices: dst.iter().map(UartServer::spec).collect(),
        drivers: vmig_migration::driver::GuestDrivers::none(),
        dirty_log: None,
    };
    let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..MigrationParams::default()
    };
    let sent = migrate(&machine, &params, &progress);
    let report = progress.report();
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    let arrived = dest.join().unwrap().unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(report.verified, "{report:#?}");
    let target = &arrived.machine;
    assert_eq!(target.devices[1].bars, machine.devices[1].bars);
    drop(machine);

    let mut check = Vec::new();
    for base in [a, b] {
        check.push(read(base + LSR));
        check.extend((0..4).map(|_| read(base + RX_TX)));
        check.extend([read(base + LSR), read(base + SCR)]);
    }
    let reads = target.run_port_script(&check, PATIENCE).unwrap();
    let mut expected = Vec::new();
    for (text, scr) in [(b"vmig", 0xa5), (b"mtty", 0x5a)] {
        expected.push(LSR_DATA_READY);
        expected.extend_from_slice(text);
        expected.extend([LSR_EMPTY, scr]);
    }
    assert_eq!(reads, expected);
    let verify = target.vm.verify(PATIENCE).unwrap();
    assert!(verify.passed(), "{verify:?}");
    drop(arrived);
    let _ = std::fs::remove_dir_all(&dir);
}
