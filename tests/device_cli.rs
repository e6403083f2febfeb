//! `vmig device serve` and `vmig device probe` as a user runs them.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{vmig, wait_for};

#[test]
fn serve_then_probe_in_both_migration_versions_and_stop_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("vmig-device-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (version, hide_dma, expected) in [
        ("v1", false, "migration: v1 (migration region 9)"),
        ("v2", false, "migration: v2 (STOP_COPY, PRE_COPY)"),
        ("v1", true, "migration: v1 (migration region 9)"),
    ] {
        let socket = dir.join(format!("{version}-{hide_dma}.sock"));
        let mut server = vmig()
            .args([
                "device",
                "serve",
                "--socket",
                socket.to_str().unwrap(),
                "--device",
                "dma-engine",
                "--migration",
                version,
            ])
            .args(hide_dma.then_some("--hide-dma"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&socket, Duration::from_secs(10));
        let probe = vmig()
            .args(["device", "probe", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&probe.stdout);
        assert!(
            probe.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&probe.stderr)
        );
        assert!(out.contains(expected), "{out}");
        assert!(
            out.contains("irq 2 (MSI-X): 1 vector(s), eventfd, maskable"),
            "{out}"
        );
        if hide_dma {
            // Seed 002's device: the doorbell page mappable, and no dirty logging of any kind.
            assert!(
                out.contains("region 0: 8192 bytes, rw, mmap areas [0x1000, +0x1000)"),
                "{out}"
            );
            assert!(
                out.contains("dirty logging: v2 DMA logging no, v1 DIRTY_PAGES no"),
                "{out}"
            );
        } else {
            assert!(out.contains("region 0: 4096 bytes, rw, trapped"), "{out}");
            assert!(out.contains("v2 DMA logging yes"), "{out}");
        }
        // A second server on the same socket is refused while the first listens.
        let second = vmig()
            .args(["device", "serve", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!second.status.success());
        assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
        // SAFETY-free SIGTERM through kill(1).
        let killed = Command::new("kill")
            .args(["-TERM", &server.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = server.wait().unwrap();
        assert!(
            status.success(),
            "SIGTERM stops the server cleanly: {status}"
        );
        assert!(!socket.exists(), "the socket is removed");
    }
}

/// The output of `child`, which must exit within `patience`: polled, so a command that hangs
/// is killed and fails the test instead of hanging it.
fn finished_within(mut child: Child, patience: Duration, what: &str) -> Output {
    let deadline = Instant::now() + patience;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {patience:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// One client at a time: while a client is served, `vmig device probe` and `vmig run
/// --device vfio-user` are refused at once (the server answers their VERSION with EBUSY) with
/// one line naming the socket, the served client is undisturbed, the server logs the refusal,
/// and once the client has left the next probe is served.
#[test]
fn a_busy_device_server_refuses_probe_and_run_at_once_with_one_line() {
    let dir = std::env::temp_dir().join(format!("vmig-device-cli-busy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("busy.sock");
    let path = socket.to_str().unwrap();
    let server = vmig()
        .args(["device", "serve", "--socket", path])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&socket, Duration::from_secs(10));
    let first = vmig_vfio_user::client::Client::connect(&socket, None).unwrap();
    let busy =
        format!("vfio-user server {path} is busy: it serves another client (one client at a time)");
    // Well within the 10 s a first client has for its VERSION.
    let patience = Duration::from_secs(5);
    let probe = |what: &str| {
        let child = vmig()
            .args(["device", "probe", "--socket", path])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finished_within(child, patience, what)
    };
    let refused = probe("`vmig device probe` of a busy server");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&busy), "{stderr}");
    if vmig_test_support::kvm_available().is_ok() {
        let run = vmig()
            .args(["run", "--mem", "16M", "--duration", "5"])
            .args(["--device", &format!("vfio-user,socket={path}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run = finished_within(run, patience, "`vmig run --device` of a busy server");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&busy), "{stderr}");
    } else {
        vmig_test_support::skip("`vmig run --device` of a busy server needs KVM");
    }
    // The served client was not disturbed; once it has left, the next probe is served.
    assert!(first.device_info().is_ok());
    first.close();
    let served = probe("`vmig device probe` once the first client left");
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert!(String::from_utf8_lossy(&served.stdout).contains("region 0: 4096 bytes"));
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let log = finished_within(server, Duration::from_secs(10), "the server after SIGTERM");
    assert!(log.status.success());
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(
        log.contains("refused pid ") && log.contains("with EBUSY: busy: served client since"),
        "the server logs the refused peer and since when it serves: {log}"
    );
}

#[test]
fn bad_device_arguments_end_with_one_clear_line() {
    for (args, expected) in [
        (
            vec![
                "device",
                "serve",
                "--socket",
                "/tmp/vmig-x.sock",
                "--device",
                "gpu",
            ],
            "the devices are: dma-engine",
        ),
        (
            vec![
                "device",
                "serve",
                "--socket",
                "/tmp/vmig-x.sock",
                "--migration",
                "v3",
            ],
            "expected v1 or v2",
        ),
        (
            vec!["device", "serve", "--socket", "/nonexistent/dir/x.sock"],
            "cannot listen on /nonexistent/dir/x.sock",
        ),
        (
            vec!["device", "probe", "--socket", "/nonexistent/x.sock"],
            "cannot connect to /nonexistent/x.sock",
        ),
    ] {
        let out = vmig().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn probing_a_kernel_vfio_device_says_what_is_missing() {
    // Without VFIO in this kernel the answer names the missing piece; with it, a malformed
    // address or one that is not a PCI device is refused by name. (The description of a real
    // device is checked against the kernel in crates/vmig-vfio/tests/in_guest.rs.)
    let expected = if std::path::Path::new("/dev/vfio/vfio").exists() {
        vec![
            ("0000:01:00.9", "expected DOMAIN:BUS:SLOT.FUNCTION"),
            ("0000:ff:1f.7", "there is no PCI device 0000:ff:1f.7"),
        ]
    } else {
        vec![(
            "0000:01:00.0",
            "/dev/vfio/vfio does not exist: this kernel has no VFIO",
        )]
    };
    for (address, message) in expected {
        let out = vmig()
            .args(["device", "probe", "--vfio-pci", address])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{address}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(message), "{address}: {stderr}");
    }
    let out = vmig().args(["device", "probe"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vfio-pci"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vfio-mdev"));
}

/// A bad UUID and a mediated device that does not exist are each one line naming it and
/// saying what was expected, whether or not this kernel has VFIO (both are checked before
/// anything is opened). (An mdev in use gets the busy group's line; a real mtty port is
/// described in the kernel-VFIO guest.)
#[test]
fn probing_a_mediated_device_names_a_bad_or_missing_uuid() {
    for (uuid, messages) in [
        (
            "83b8f4f2-509f-382f-3c1e",
            vec![
                "mediated device UUID `83b8f4f2-509f-382f-3c1e`",
                "expected 8-4-4-4-12 hex digits",
            ],
        ),
        (
            "../../../../etc/passwd-aaaaaaaaaaaaaa",
            vec!["expected 8-4-4-4-12 hex digits"],
        ),
        (
            "0000:01:00.0",
            vec![
                "mediated device UUID `0000:01:00.0`",
                "expected 8-4-4-4-12 hex digits",
            ],
        ),
        (
            "00000000-0000-0000-0000-00000000ABCD",
            vec![
                "there is no mediated device 00000000-0000-0000-0000-00000000abcd",
                "/sys/bus/mdev/devices/00000000-0000-0000-0000-00000000abcd does not exist",
                "mdev_supported_types/TYPE/create",
            ],
        ),
    ] {
        let out = vmig()
            .args(["device", "probe", "--vfio-mdev", uuid])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{uuid}");
        assert_eq!(stderr.lines().count(), 1, "{uuid}: {stderr}");
        for message in messages {
            assert!(stderr.contains(message), "{uuid}: {stderr}");
        }
    }
    // One device at a time.
    let out = vmig()
        .args([
            "device",
            "probe",
            "--vfio-pci",
            "0000:01:00.0",
            "--vfio-mdev",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
