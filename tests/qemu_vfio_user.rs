//! vmig's device server under a client vmig did not write: QEMU's own vfio-user client
//! (`-device vfio-user-pci`), from QEMU's newest release (Debian sid's, run through sid's own
//! loader: `vmig_kernel_guest::newest_qemu`), against `vmig device serve` as a user starts it.
//!
//! QEMU (TCG, q35, RAM from a shared memfd as vfio-user needs) realizes the device, its
//! firmware (SeaBIOS) sizes and places the BARs through the server's config space, BAR2 is
//! mapped through the server's sparse area, and a guest-physical read of BAR0 goes through
//! QEMU's client to the server and back.
//!
//! Skips, saying why, where sid's packages cannot be had (no apt, no network).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmig::qmp::QmpClient;
use vmig_devices::dma_engine::{self, BAR0_SIZE, DEVICE_ID, STATUS_REGION, STATUS_SIZE, VENDOR_ID};
use vmig_kernel_guest::NewestQemu;

#[path = "common/cli.rs"]
mod cli;
use cli::{KillOnDrop, vmig, wait_for};

fn start_qemu(qemu: &NewestQemu, dir: &Path, device_socket: &Path) -> (KillOnDrop, QmpClient) {
    let qmp = dir.join("qemu.qmp");
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let device = json!({
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": device_socket},
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
        .arg("-device")
        .arg(device.to_string())
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

/// The dma-engine's entry in `query-pci`, once the firmware has placed both its BARs.
fn placed_dma_engine(qmp: &mut QmpClient) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let buses = qmp.execute("query-pci", json!({})).unwrap();
        let engine = buses[0]["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["id"]["vendor"] == u64::from(VENDOR_ID)
                    && d["id"]["device"] == u64::from(DEVICE_ID)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {VENDOR_ID:04x}:{DEVICE_ID:04x} on bus 0: {buses}"));
        let placed = engine["regions"].as_array().is_some_and(|r| {
            r.len() == 2
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
            "the firmware did not place the dma-engine's BARs in 60 s: {engine}"
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

#[test]
fn qemus_own_vfio_user_client_runs_vmigs_dma_engine_on_its_pci_bus() {
    let Some(qemu) = NewestQemu::prepare_or_skip(vmig_test_support::skip) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vmig-qemu-vfio-user-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dma-engine.sock");
    let server = vmig()
        .args(["device", "serve", "--device", "dma-engine", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    wait_for(&socket, Duration::from_secs(10));

    let (mut qemu_process, mut qmp) = start_qemu(&qemu, &dir, &socket);
    qmp.execute("cont", json!({})).unwrap();
    let engine = placed_dma_engine(&mut qmp);
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

    // A guest-physical read of BAR0's ID register travels QEMU's client and the server.
    let bar0 = bars[0].2;
    let id = hmp(&mut qmp, &format!("xp /1gx {bar0:#x}"));
    assert!(
        id.contains(&format!("{:#018x}", dma_engine::ID)),
        "BAR0's ID read through QEMU: {id}"
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
    let _ = std::fs::remove_dir_all(&dir);
}
