//! Migration as a user runs it: `vmig demo`, and `vmig run --api` / `--incoming` driven with
//! `vmig ctl`, with a destination process killed during pre-copy.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use vmig_test_support::{require_kvm, skip, wait_until};

#[path = "common/cli.rs"]
mod cli;
use cli::{ctl, vmig, wait_for};

/// How long a `vmig` process has to open its socket.
const SOCKET_PATIENCE: Duration = Duration::from_secs(30);

struct Kill(Vec<Child>, PathBuf);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn demo_migrates_both_protocols_and_reports_json() {
    require_kvm!();
    let out = vmig()
        .args(["demo", "--mem", "128M", "--rate", "5000", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["status"], "completed");
    assert_eq!(report["verified"], true);
    assert_eq!(report["ram"]["total"], 128 << 20);
    let protocols: Vec<&str> = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["v1", "v2"]);
    for field in [
        "total_ms",
        "setup_ms",
        "downtime_ms",
        "expected_downtime_ms",
        "passes",
    ] {
        assert!(report[field].is_u64(), "{field} in {report}");
    }
    assert_eq!(report["dirty_sources"].as_array().unwrap().len(), 4);
}

#[test]
fn a_killed_destination_process_leaves_the_source_running_and_its_guest_whole() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("vmig-migrate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut children = Kill(Vec::new(), dir.clone());
    let mut device = |name: &str, protocol: &str| {
        let socket = dir.join(name);
        children.0.push(
            vmig()
                .args([
                    "device",
                    "serve",
                    "--device",
                    "dma-engine",
                    "--migration",
                    protocol,
                    "--socket",
                ])
                .arg(&socket)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for(&socket, SOCKET_PATIENCE);
        format!("vfio-user,socket={}", socket.display())
    };
    let (src_dev, dst_dev) = (device("src.sock", "v2"), device("dst.sock", "v2"));
    let (src_api, dst_api) = (dir.join("src.api"), dir.join("dst.api"));
    let target = format!("unix:{}", dir.join("migrate.sock").display());
    let mut destination = vmig()
        .args([
            "run",
            "--mem",
            "128M",
            "--incoming",
            &target,
            "--device",
            &dst_dev,
            "--api",
        ])
        .arg(&dst_api)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let source = vmig()
        .args([
            "run",
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--workload",
            "random,rate=5000",
            "--device",
            &src_dev,
            "--api",
        ])
        .arg(&src_api)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&src_api, SOCKET_PATIENCE);
    wait_for(&dst_api, SOCKET_PATIENCE);
    let (ok, status) = ctl(&dst_api, &["query-status"]);
    assert!(ok && status["return"]["status"] == "inmigrate", "{status}");
    let (ok, reply) = ctl(
        &src_api,
        &["migrate-set-parameters", "max-bandwidth=8388608"],
    );
    assert!(ok, "{reply}");
    let (ok, reply) = ctl(&src_api, &["migrate", &format!("uri={target}")]);
    assert!(ok, "{reply}");
    // Killed while pre-copy is sending pages (128 MiB at 8 MiB/s: 16 s of it).
    wait_until("pre-copy to send pages", Duration::from_secs(30), || {
        let (_, r) = ctl(&src_api, &["query-migrate"]);
        let sending = r["return"]["status"] == "active"
            && r["return"]["ram"]["transferred"].as_u64() > Some(0);
        sending.then_some(()).ok_or_else(|| r.to_string())
    });
    destination.kill().unwrap();
    destination.wait().unwrap();
    let report = wait_until("the migration to fail", Duration::from_secs(30), || {
        let (_, r) = ctl(&src_api, &["query-migrate"]);
        if r["return"]["status"] == "failed" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });
    assert_eq!(report["return"]["x-vmig-committed"], false);
    assert!(
        report["return"]["error-desc"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{report}"
    );
    let (_, status) = ctl(&src_api, &["query-status"]);
    assert_eq!(status["return"]["status"], "running", "{status}");
    // Bad commands are answered, and the VM goes on.
    let (ok, reply) = ctl(&src_api, &["frobnicate"]);
    assert!(
        !ok && reply["error"]["class"] == "CommandNotFound",
        "{reply}"
    );
    let (ok, reply) = ctl(&src_api, &["migrate", "uri=ftp:x"]);
    assert!(
        !ok && reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("tcp:HOST:PORT"),
        "{reply}"
    );
    let (ok, _) = ctl(&src_api, &["quit"]);
    assert!(ok);
    let out = source.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the guest's verify and the device records pass: {stdout}"
    );
    assert!(stdout.contains("verify: passed"), "{stdout}");
    assert!(stdout.contains("the VM runs here as before"), "{stdout}");
}

#[test]
fn bad_device_and_incoming_arguments_give_one_line() {
    for (args, expected) in [
        (
            vec!["--device", "virtio,socket=x"],
            "unknown device kind `virtio`",
        ),
        (vec!["--device", "vfio-user"], "socket=PATH is missing"),
        (vec!["--device", "vfio-pci"], "host=DDDD:BB:DD.F is missing"),
        (
            vec!["--device", "vfio-pci,host=01:00.0"],
            "PCI address `01:00.0`: expected DOMAIN:BUS:SLOT.FUNCTION",
        ),
        (
            vec!["--device", "vfio-user,socket=/nonexistent/x.sock"],
            "connecting to /nonexistent/x.sock",
        ),
        (
            vec!["--incoming", "carrier-pigeon:1"],
            "tcp:HOST:PORT or unix:PATH",
        ),
    ] {
        // The device is connected once the VM exists, and that needs KVM.
        if args[1].contains("nonexistent")
            && let Err(why) = vmig_test_support::kvm_available()
        {
            skip(format_args!("the case {args:?} needs KVM ({why})"));
            continue;
        }
        let out = vmig()
            .arg("run")
            .args(&args)
            .args(["--duration", "0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn a_kernel_vfio_device_that_cannot_be_opened_is_named_in_one_line() {
    require_kvm!();
    // No such device here: either this kernel has no VFIO at all (this machine), or the
    // address names nothing; which one, the container's device node tells.
    let vfio = Path::new("/dev/vfio/vfio").exists();
    let out = vmig()
        .args([
            "run",
            "--device",
            "vfio-pci,host=0000:ff:1f.7",
            "--duration",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("device 0000:ff:1f.7"), "{stderr}");
    let expected = if vfio {
        "there is no PCI device 0000:ff:1f.7"
    } else {
        "this kernel has no VFIO"
    };
    assert!(stderr.contains(expected), "expected `{expected}`: {stderr}");
}

#[test]
fn a_dead_device_server_is_reported_beside_the_verify_that_still_runs() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("vmig-dead-device-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut children = Kill(Vec::new(), dir.clone());
    let socket = dir.join("dev.sock");
    children.0.push(
        vmig()
            .args(["device", "serve", "--device", "dma-engine", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket, SOCKET_PATIENCE);
    let api = dir.join("vm.api");
    let source = vmig()
        .args(["run", "--mem", "32M", "--workload", "random,rate=2000"])
        .arg("--device")
        .arg(format!("vfio-user,socket={},rate=2000", socket.display()))
        .arg("--api")
        .arg(&api)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&api, SOCKET_PATIENCE);
    let mut server = children.0.remove(0);
    server.kill().unwrap();
    server.wait().unwrap();
    // The guest carries on without its device.
    std::thread::sleep(Duration::from_millis(300));
    let (_, status) = ctl(&api, &["query-status"]);
    assert_eq!(status["return"]["status"], "running", "{status}");
    let (ok, _) = ctl(&api, &["quit"]);
    assert!(ok);
    let out = source.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("verify: passed"), "{stdout}");
    assert!(
        stdout.contains("device dev.sock: 0 records produced, 0 checked in the ring, FAILED: lost: it could not be checked"),
        "{stdout}"
    );
}
