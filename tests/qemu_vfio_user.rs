//! vmig's device server under a client vmig did not write: QEMU's own vfio-user client
//! (`-device vfio-user-pci`), from QEMU's newest release (Debian sid's, run through sid's own
//! loader: `vmig_kernel_guest::newest_qemu`), against `vmig device serve` as a user starts it.
//!
//! QEMU (TCG, q35, RAM from a shared memfd as vfio-user needs) realizes the device, its
//! firmware (SeaBIOS) sizes and places the BARs through the server's config space, BAR2 is
//! mapped through the server's sparse area, QEMU finds the MSI-X table and PBA through the
//! config space's capability list, and a guest-physical read of BAR0 goes through QEMU's
//! client to the server and back. The README's minimal device (`examples/doorbell.rs`) is
//! attached beside it, served by the framework in this process.
//!
//! Then the whole way through a guest: QEMU 11 attaches the dma-engine to the kernel-VFIO test
//! guest (Debian's Linux 6.12, emulated VT-d), whose init binds it to vfio-pci, and
//! `crates/vmig-vfio/tests/in_guest_vfio_user.rs` drives it there through the guest kernel's
//! VFIO: registers, the mapped status page, a DMA-mapped ring, MSI-X, a reset.
//!
//! Skips, saying why, where sid's packages (or the guest's) cannot be had (no apt, no network).

#[path = "../crates/vmig-devices/examples/doorbell.rs"]
mod doorbell;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmig::qmp::QmpClient;
use vmig_devices::dma_engine::{self, BAR0_SIZE, DEVICE_ID, STATUS_REGION, STATUS_SIZE, VENDOR_ID};
use vmig_kernel_guest::{Guest, GuestBinary, Machine, NewestQemu};
use vmig_vfio_user::server::{Server, ServerConfig};

#[path = "common/cli.rs"]
mod cli;
use cli::{KillOnDrop, vmig, wait_for};

fn start_qemu(qemu: &NewestQemu, dir: &Path, device_sockets: &[&Path]) -> (KillOnDrop, QmpClient) {
    let qmp = dir.join("qemu.qmp");
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let devices = device_sockets.iter().flat_map(|socket| {
        let device = json!({
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": socket},
        });
        ["-device".to_owned(), device.to_string()]
    });
    let child = qemu
        .command()
        .args([
            "-machine",
            "q35,memory-backend=ram",
            "-accel",
            "tcg",
            "-m",
            "256M",
        ])
        .args(["-object", "memory-backend-memfd,id=ram,size=256M,share=on"])
        .args(["-nodefaults", "-display", "none", "-S"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(devices)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qmp.exists() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "QEMU {} exited ({status}) before its QMP socket appeared: {}",
                qemu.version(),
                std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "QEMU made no QMP socket in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = QmpClient::connect(&qmp, Duration::from_secs(10)).unwrap_or_else(|e| {
        let _ = child.0.wait();
        panic!(
            "QEMU {}'s QMP socket: {e}; QEMU's output: {}",
            qemu.version(),
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
        )
    });
    (child, client)
}

/// Device `vendor:device`'s entry in `query-pci`, once the firmware has placed its `bars`
/// BARs.
fn placed(qmp: &mut QmpClient, (vendor, device): (u16, u16), bars: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let buses = qmp.execute("query-pci", json!({})).unwrap();
        let engine = buses[0]["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["id"]["vendor"] == u64::from(vendor) && d["id"]["device"] == u64::from(device)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {vendor:04x}:{device:04x} on bus 0: {buses}"));
        let placed = engine["regions"].as_array().is_some_and(|r| {
            r.len() == bars
                && r.iter().all(|bar| {
                    bar["address"]
                        .as_u64()
                        .is_some_and(|a| a != 0 && a < u64::from(u32::MAX))
                })
        });
        if placed {
            return engine;
        }
        assert!(
            Instant::now() < deadline,
            "the firmware did not place {vendor:04x}:{device:04x}'s BARs in 60 s: {engine}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hmp(qmp: &mut QmpClient, command: &str) -> String {
    let out = qmp
        .execute("human-monitor-command", json!({"command-line": command}))
        .unwrap();
    out.as_str().unwrap_or_default().to_owned()
}

/// `vmig device serve --device dma-engine` on a socket in a fresh directory named `name`
/// (with this process's ID), as a user starts it: (directory, socket, server).
fn serve_dma_engine(name: &str, stderr: Stdio) -> (PathBuf, PathBuf, KillOnDrop) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dma-engine.sock");
    let server = vmig()
        .args(["device", "serve", "--device", "dma-engine", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let server = KillOnDrop(server);
    wait_for(&socket, Duration::from_secs(10));
    (dir, socket, server)
}

#[test]
fn qemus_own_vfio_user_client_runs_vmigs_dma_engine_on_its_pci_bus() {
    let Some(qemu) = NewestQemu::prepare_or_skip(vmig_test_support::skip) else {
        return;
    };
    let (dir, socket, mut server) = serve_dma_engine("vmig-qemu-vfio-user", Stdio::piped());

    // The README's minimal device, served by the framework in this process.
    let doorbell_socket = dir.join("doorbell.sock");
    let listener = std::os::unix::net::UnixListener::bind(&doorbell_socket).unwrap();
    let doorbell = Arc::new(Server::new(
        doorbell::Doorbell::new().unwrap(),
        ServerConfig::default(),
    ));
    let stop_doorbell = Arc::new(AtomicBool::new(false));
    let doorbell_thread = {
        let (doorbell, stop) = (Arc::clone(&doorbell), Arc::clone(&stop_doorbell));
        std::thread::spawn(move || doorbell.run(&listener, &stop))
    };

    let (mut qemu_process, mut qmp) = start_qemu(&qemu, &dir, &[&socket, &doorbell_socket]);
    qmp.execute("cont", json!({})).unwrap();
    let engine = placed(&mut qmp, (VENDOR_ID, DEVICE_ID), 2);
    let bell = placed(&mut qmp, (0x1234, 0x7a02), 1);
    // INTx: pin A, as each function's config space says.
    assert_eq!(engine["irq_pin"], 1, "{engine}");
    assert_eq!(bell["irq_pin"], 1, "{bell}");
    let bars: Vec<(u64, u64, u64)> = engine["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["type"], "memory", "{engine}");
            (
                r["bar"].as_u64().unwrap(),
                r["size"].as_u64().unwrap(),
                r["address"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        bars.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(),
        [(0, BAR0_SIZE), (u64::from(STATUS_REGION), STATUS_SIZE)],
        "{engine}"
    );
    // The class the config space says: 0xff, other.
    assert_eq!(engine["class_info"]["class"], 0xff00, "{engine}");

    // BAR2 is mapped from the server's fd (its sparse area), not trapped.
    let tree = hmp(&mut qmp, "info mtree");
    assert!(tree.contains("BAR 2 mmaps[0]"), "{tree}");
    // QEMU found each function's MSI-X capability and lays its own emulation over the table
    // and PBA where the capability puts them: one vector (16 bytes, 8 of PBA) at BAR0 + 0x800
    // and BAR0 + 0xc00, for the dma-engine and the doorbell alike.
    for device in [&engine, &bell] {
        let base = device["regions"][0]["address"].as_u64().unwrap();
        let table = base + u64::from(dma_engine::MSIX_TABLE_OFFSET);
        let pba = base + u64::from(dma_engine::MSIX_PBA_OFFSET);
        for line in [
            format!("{table:016x}-{:016x} (prio 0, i/o): msix-table", table + 15),
            format!("{pba:016x}-{:016x} (prio 1, i/o): VFIO MSIX PBA", pba + 7),
        ] {
            assert!(tree.contains(&line), "{line} in {tree}");
        }
    }

    // A guest-physical read of BAR0's ID register travels QEMU's client and the server.
    let bar0 = bars[0].2;
    let id = hmp(&mut qmp, &format!("xp /1gx {bar0:#x}"));
    assert!(
        id.contains(&format!("{:#018x}", dma_engine::ID)),
        "BAR0's ID read through QEMU: {id}"
    );

    // The doorbell's COUNT (BAR0 + 4) reads through QEMU's client too.
    let count = hmp(
        &mut qmp,
        &format!(
            "xp /1wx {:#x}",
            bell["regions"][0]["address"].as_u64().unwrap() + doorbell::COUNT
        ),
    );
    assert!(
        count.contains(": 0x00000000"),
        "COUNT read through QEMU: {count}"
    );

    let _ = qmp.execute("quit", json!({}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu_process.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU did not quit in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server outlives its client and stops cleanly on SIGTERM.
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the server exited with QEMU"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = server.0.wait().unwrap();
    let mut stderr = String::new();
    use std::io::Read;
    server
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "the server: {status}: {stderr}");
    stop_doorbell.store(true, Ordering::Release);
    doorbell_thread.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_guest_kernels_vfio_drives_the_dma_engine_through_qemus_client() {
    let Some(qemu) = NewestQemu::prepare_or_skip(vmig_test_support::skip) else {
        return;
    };
    let Some(guest) = Guest::prepare_or_skip(vmig_test_support::skip) else {
        return;
    };
    let binary = guest
        .build_binary(
            GuestBinary::Test {
                package: "vmig-vfio",
                name: "in_guest_vfio_user",
            },
            false,
        )
        .expect("static in-guest test binary");
    let (dir, socket, _server) = serve_dma_engine("vmig-qemu-guest", Stdio::null());

    let machine = Machine {
        qemu: Some(qemu.launcher()),
        vfio_user_sockets: &[&socket],
        bind_to_vfio_pci: &[(VENDOR_ID, DEVICE_ID)],
    };
    let run = guest
        .boot_on(
            machine,
            &binary,
            &[],
            &["--test-threads=1"],
            512,
            Duration::from_secs(600),
        )
        .expect("the guest boots under QEMU 11");
    println!(
        "guest (Linux {}) under QEMU {} ran in {:.1} s",
        guest.kernel_release(),
        qemu.version(),
        run.duration.as_secs_f64()
    );
    for line in run.console.lines().filter(|l| l.starts_with("test ")) {
        println!("  guest: {}", line.trim_end());
    }
    let tail: Vec<&str> = run.console.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let tail = tail.join("\n");
    assert_eq!(
        run.exit_code,
        Some(0),
        "in-guest tests failed; console:\n{tail}"
    );
    let expected = include_str!("../crates/vmig-vfio/tests/in_guest_vfio_user.rs")
        .matches("#[test]")
        .count();
    assert!(
        run.console
            .contains(&format!("test result: ok. {expected} passed")),
        "expected {expected} in-guest tests to pass; console:\n{tail}"
    );
    let records = run
        .report_lines("VMIG-QEMU-DMA-ENGINE ")
        .next()
        .unwrap_or_else(|| panic!("the guest reported no records; console:\n{tail}"));
    println!("dma-engine in the guest: {records}");
    let _ = std::fs::remove_dir_all(&dir);
}
