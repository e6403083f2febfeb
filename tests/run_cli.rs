//! `vmig run` as a user runs it: a guest saved by one process continues in another, and every
//! bad input ends with one clear line and a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};

fn vmig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmig"))
        .args(args)
        .output()
        .expect("vmig runs")
}

fn kvm_missing() -> bool {
    match vmig_test_support::kvm_available() {
        Ok(()) => false,
        Err(why) => {
            vmig_test_support::skip(format_args!("this test needs KVM ({why})"));
            true
        }
    }
}

fn line_after<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"));
    line.split_once(": ").unwrap().1
}

/// "A guest stopped in one process continues in a fresh VM in another process at exactly the
/// same instruction, with identical memory, and its self-check passes."
#[test]
fn a_guest_saved_by_one_process_continues_in_another() {
    if kvm_missing() {
        return;
    }
    let dir = tempdir();
    let snap = dir.join("guest.vmig");
    let snap = snap.to_str().unwrap();
    let save = vmig(&[
        "run",
        "--mem",
        "32M",
        "--vcpus",
        "3",
        "--workload",
        "hotcold,shared",
        "--dirty-log",
        "ring",
        "--duration",
        "1",
        "--save",
        snap,
    ]);
    let out = String::from_utf8_lossy(&save.stdout).into_owned();
    assert!(
        save.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&save.stderr)
    );
    let saved = line_after(&out, "saved ");
    for mode in ["bitmap", "clear-log", "ring"] {
        let restore = vmig(&[
            "run",
            "--restore",
            snap,
            "--duration",
            "1",
            "--dirty-log",
            mode,
        ]);
        let out = String::from_utf8_lossy(&restore.stdout).into_owned();
        assert!(
            restore.status.success(),
            "{out}\n{}",
            String::from_utf8_lossy(&restore.stderr)
        );
        assert_eq!(
            line_after(&out, "restored "),
            saved,
            "same instructions, same memory"
        );
        assert!(out.contains("verify: passed"), "{out}");
    }
}

#[test]
fn bad_inputs_end_with_one_clear_line_and_a_nonzero_exit() {
    if kvm_missing() {
        return;
    }
    let dir = tempdir();
    let garbage = dir.join("garbage.vmig");
    std::fs::write(&garbage, b"this is not a snapshot at all").unwrap();
    let truncated = dir.join("truncated.vmig");
    let corrupted = dir.join("corrupted.vmig");
    let good = dir.join("good.vmig");
    let made = vmig(&[
        "run",
        "--mem",
        "16M",
        "--duration",
        "0.2",
        "--save",
        good.to_str().unwrap(),
    ]);
    assert!(made.status.success());
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 5000]).unwrap();
    let mut flipped = bytes.clone();
    let at = bytes.len() - 3000;
    flipped[at] ^= 0x40;
    std::fs::write(&corrupted, &flipped).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--mem", "12Q"],
            "expected a number with an optional K, M, G or T suffix",
        ),
        (vec!["--mem", "8M"], "from 16 MiB to 256 GiB"),
        (
            vec!["--workload", "zigzag"],
            "expected sequential, random or hotcold",
        ),
        (
            vec!["--workload", "random,rate=fast"],
            "expected pages per second",
        ),
        (
            vec!["--workload", "random,wss=1G", "--mem", "64M"],
            "the data RAM of this VM",
        ),
        (
            vec!["--dirty-log", "fancy"],
            "expected bitmap, clear-log, ring or ring-with-bitmap",
        ),
        (
            vec!["--dirty-log", "ring-with-bitmap"],
            "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
        ),
        (
            vec!["--dirty-log", "ring", "--ring-entries", "1000"],
            "power of two",
        ),
        (
            vec!["--ring-entries", "4096"],
            "only applies to --dirty-log ring",
        ),
        (vec!["--vcpus", "9"], "expected 1 to 8"),
        (vec!["--device", "vfio-mdev"], "uuid=UUID is missing"),
        (
            vec!["--device", "vfio-mdev,uuid=83b8f4f2-509f"],
            "mediated device UUID `83b8f4f2-509f`: expected 8-4-4-4-12 hex digits",
        ),
        (
            vec![
                "--device",
                "vfio-mdev,uuid=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001,host=x",
            ],
            "unknown option `host=x`",
        ),
        (
            vec![
                "--device",
                "vfio-mdev,uuid=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
                "--device",
                "vfio-mdev,uuid=83B8F4F2-509F-382F-3C1E-E6BFE0FA1001",
            ],
            "device 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001: given twice",
        ),
        (vec!["--duration", "-1"], "expected a number of seconds"),
        (
            vec!["--restore", "/nonexistent/guest.vmig"],
            "cannot open /nonexistent/guest.vmig",
        ),
        (
            vec!["--restore", garbage.to_str().unwrap()],
            "is not a vmig snapshot",
        ),
        (vec!["--restore", truncated.to_str().unwrap()], "truncated"),
        (vec!["--restore", corrupted.to_str().unwrap()], "corrupted"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run"];
        full.extend(&args);
        if !args.contains(&"--duration") {
            full.extend(["--duration", "0"]);
        }
        let out = vmig(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: more than one line:\n{stderr}"
        );
        assert!(stderr.starts_with("vmig: error: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected `{expected}` in: {stderr}"
        );
    }
}

/// A mediated device that cannot be opened is named in one line: this kernel has no VFIO (this
/// machine), or there is no such mdev, saying where it was looked for and how to create one.
#[test]
fn a_mediated_device_that_cannot_be_opened_is_named_in_one_line() {
    if kvm_missing() {
        return;
    }
    let uuid = "00000000-0000-0000-0000-00000000abcd";
    let out = vmig(&[
        "run",
        "--device",
        &format!("vfio-mdev,uuid={uuid}"),
        "--duration",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("device {uuid}")), "{stderr}");
    let expected = if Path::new("/dev/vfio/vfio").exists() {
        format!("/sys/bus/mdev/devices/{uuid} does not exist")
    } else {
        "this kernel has no VFIO".to_string()
    };
    assert!(
        stderr.contains(&expected),
        "expected `{expected}`: {stderr}"
    );
}

/// With `/dev/kvm` hidden (a private mount namespace with an empty `/dev`), `vmig run` says what
/// it needs in one line.
#[test]
fn a_missing_dev_kvm_is_one_clear_line() {
    let probe = Command::new("unshare").args(["-m", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        vmig_test_support::skip("cannot create a mount namespace (unshare -m) to hide /dev/kvm");
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --duration 0",
        env!("CARGO_BIN_EXE_vmig")
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vmig-run-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Path::new(&dir).is_dir());
    dir
}
