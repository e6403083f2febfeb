//! Guest port I/O to a device's I/O-port BAR, end to end. A vfio-user device whose config space
//! marks BAR0 as I/O ports — a loopback 16550-like UART, as the kernel's `mtty` sample is — is
//! placed in the guest's I/O-port window; the guest's own `out`s and `in`s (the port script
//! vCPU 0 runs) reach it as region reads and writes, and the bytes the source's guest left in
//! its FIFO are read back by the destination's guest after a live migration, in one process
//! and across two `vmig run` processes driven by `vmig ctl x-vmig-guest-port-io`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;

#[path = "common/cli.rs"]
mod cli;
use cli::{ctl, vmig, wait_for};
use vmig_kvm::{DirtyLogMode, PortOp, Vm, VmConfig, Workload};
use vmig_migration::device::BarSpace;
use vmig_migration::machine::{Bar, device_area_bytes};
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    DeviceSpec, Incoming, Machine, MigrationParams, Progress, Role, Status, migrate, receive,
};
use vmig_primitives::GuestAddress;
use vmig_test_support::{require_kvm, wait_until};
use vmig_vfio_user::server::{
    Device, DeviceSpec as ServerSpec, IrqSpec, MigrationSupport, Refusal, RegionSpec,
};
use vmig_vfio_user::wire::IRQ_INFO_EVENTFD;

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
/// byte; it migrates (v2) its FIFO and SCR. Like `mtty` it has INTx and one MSI vector, and
/// no MSI-X.
#[derive(Default)]
struct LoopbackUart {
    fifo: Vec<u8>,
    scr: u8,
    /// INTx only: no MSI vector either.
    intx_only: bool,
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
        let one = IrqSpec {
            count: 1,
            flags: IRQ_INFO_EVENTFD,
        };
        ServerSpec {
            pci: true,
            config_space: None,
            reset: true,
            regions,
            irqs: if self.intx_only {
                vec![one]
            } else {
                vec![one, one]
            },
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
        self.fifo.clear();
        self.scr = 0;
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

#[path = "common/device_server.rs"]
mod device_server;
use device_server::DeviceServer;

/// A loopback UART served on `dir/name`.
fn uart_server(dir: &Path, name: &str) -> DeviceServer {
    DeviceServer::serve(dir, name, LoopbackUart::default())
}

/// A UART's `--device` (a UART has no dma-engine rate).
fn uart_spec(server: &DeviceServer) -> DeviceSpec {
    server.spec(0)
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
    let uarts = [uart_server(&dir, "a.sock"), uart_server(&dir, "b.sock")];
    let specs: Vec<_> = uarts.iter().map(uart_spec).collect();
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
        // No MSI-X: its one MSI vector is wired.
        assert_eq!(device.interrupts.len(), 1, "device {i}");
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
    let src = [uart_server(&dir, "s0.sock"), uart_server(&dir, "s1.sock")];
    let dst = [uart_server(&dir, "d0.sock"), uart_server(&dir, "d1.sock")];
    let specs: Vec<_> = src.iter().map(uart_spec).collect();
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
        devices: dst.iter().map(uart_spec).collect(),
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

/// Kills the `vmig` processes a test started, whatever happens to it.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the in-guest mtty test does, with two `vmig run` processes and vfio-user UARTs this
/// test serves: `vmig ctl SRC x-vmig-guest-port-io` has the source's guest write a byte
/// sequence to THR, the VM migrates, and `vmig ctl DST x-vmig-guest-port-io` has the
/// destination's guest read LSR and RX back. Bad `ops` and ports outside every I/O BAR are
/// refused in the reply, and the VM runs on.
#[test]
fn vmig_ctl_has_the_source_guest_write_and_the_destination_guest_read_a_uart() {
    require_kvm!();
    let dir = temp_dir("ctl");
    let uarts = [uart_server(&dir, "src.sock"), uart_server(&dir, "dst.sock")];
    let device = |u: &DeviceServer| format!("vfio-user,socket={}", u.socket.display());
    let (src_api, dst_api) = (dir.join("src.api"), dir.join("dst.api"));
    let target = format!("unix:{}", dir.join("migrate.sock").display());
    let mut children = Children(Vec::new());
    children.0.push(
        vmig()
            .args(["run", "--mem", "64M", "--incoming", &target, "--device"])
            .arg(device(&uarts[1]))
            .arg("--api")
            .arg(&dst_api)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    children.0.push(
        vmig()
            .args([
                "run",
                "--mem",
                "64M",
                "--workload",
                "random,rate=5000",
                "--device",
            ])
            .arg(device(&uarts[0]))
            .arg("--api")
            .arg(&src_api)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&src_api, PATIENCE);
    wait_for(&dst_api, PATIENCE);
    let port_io =
        |api: &Path, ops: &str| ctl(api, &["x-vmig-guest-port-io", &format!("ops={ops}")]);
    let (ok, devices) = ctl(&src_api, &["x-vmig-query-devices"]);
    assert!(ok, "{devices}");
    let device = &devices["return"][0];
    assert_eq!(
        (&device["name"], &device["kind"], &device["protocol"]),
        (&json!("src.sock"), &json!("vfio-user"), &json!("v2")),
        "{devices}"
    );
    assert_eq!(device["migration-state"], "RUNNING", "{devices}");
    assert_eq!(
        device["bars"],
        json!([{"index": 0, "gpa": 0xc000, "size": 8, "space": "io"}]),
        "{devices}"
    );
    let (ok, devices) = ctl(&dst_api, &["x-vmig-query-devices"]);
    assert!(ok && devices["return"] == json!([]), "{devices}");

    let (ok, reply) = port_io(
        &src_api,
        "out:0xc000:0x76,out:0xc000:0x6d,out:0xc000:0x69,out:0xc000:0x67,out:0xc007:165,in:0xc007",
    );
    assert!(ok, "{reply}");
    assert_eq!(reply["return"], json!({"read": [165]}));
    for (ops, why) in [
        ("out:0xc000", "operation 1 `out:0xc000`: not an operation"),
        ("in:0xc000,peek:1", "operation 2 `peek:1`: not an operation"),
        (
            "out:0xc000:0x100",
            "byte `0x100` is not a number from 0 to 0xff",
        ),
        (
            "in:0xc008",
            "I/O port 0xc008 is in no device's I/O BAR: expected a port of src.sock BAR0 at 0xc000-0xc007",
        ),
        ("in:0x512", "I/O port 0x512 is in no device's I/O BAR"),
    ] {
        let (ok, reply) = port_io(&src_api, ops);
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        assert!(!ok && desc.contains(why), "{ops}: {reply}");
    }
    let (ok, reply) = ctl(&src_api, &["x-vmig-guest-port-io"]);
    assert!(
        !ok && reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Parameter 'ops' is missing"),
        "{reply}"
    );
    let (ok, reply) = ctl(
        &src_api,
        &["x-vmig-guest-port-io", "ops=in:0xc005", "timeout=1"],
    );
    assert!(
        !ok && reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'timeout' is unexpected"),
        "{reply}"
    );
    // The destination has no VM until the migration arrives.
    let (ok, reply) = port_io(&dst_api, "in:0xc005");
    assert!(
        !ok && reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("no VM yet"),
        "{reply}"
    );

    let (ok, reply) = ctl(&src_api, &["migrate", &format!("uri={target}")]);
    assert!(ok, "{reply}");
    let report = wait_until("the migration to end", PATIENCE, || {
        let (_, r) = ctl(&src_api, &["query-migrate"]);
        match r["return"]["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => Ok(r),
            _ => Err(r.to_string()),
        }
    });
    assert_eq!(report["return"]["status"], "completed", "{report}");
    assert_eq!(report["return"]["x-vmig-verified"], true, "{report}");
    // The source's guest runs on the destination now, and the source says so.
    let (ok, reply) = port_io(&src_api, "in:0xc005");
    assert!(
        !ok && reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("handed over"),
        "{reply}"
    );
    let reply = wait_until("the destination's VM to run", PATIENCE, || {
        let (ok, r) = port_io(
            &dst_api,
            "in:0xc005,in:0xc000,in:0xc000,in:0xc000,in:0xc000,in:0xc005,in:0xc007",
        );
        if ok { Ok(r) } else { Err(r.to_string()) }
    });
    assert_eq!(
        reply["return"],
        json!({"read": [LSR_DATA_READY, b'v', b'm', b'i', b'g', LSR_EMPTY, 165]})
    );
    let (ok, _) = ctl(&dst_api, &["quit"]);
    assert!(ok);
    let destination = children.0.remove(0);
    let out = destination.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the destination's guest verify passes"
    );
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device with INTx only runs with its interrupts unwired, and `vmig run` warns naming it.
#[test]
fn an_intx_only_device_is_attached_unwired_with_a_warning() {
    require_kvm!();
    let dir = temp_dir("intx");
    let uart = DeviceServer::serve(
        &dir,
        "intx.sock",
        LoopbackUart {
            intx_only: true,
            ..LoopbackUart::default()
        },
    );
    let machine = source(&[uart_spec(&uart)]);
    assert!(machine.devices[0].interrupts.is_empty());
    drop(machine);
    let out = vmig()
        .args(["run", "--mem", "64M", "--duration", "0.2", "--device"])
        .arg(format!("vfio-user,socket={}", uart.socket.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("intx.sock") && stderr.contains("the device's interrupts are not wired"),
        "{stderr}"
    );
    drop(uart);
    let _ = std::fs::remove_dir_all(&dir);
}
