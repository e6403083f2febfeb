//! The stream module's table of lost messages, row by row, as a user meets it: a destination
//! (`vmig run --incoming`), a source (`vmig run --api`) and, between them, `vmig relay` cutting
//! or damaging the stream at one record. Each row checks what both sides report and do: which
//! one runs the VM (never both), the source's `query-migrate` and `query-status`, and how each
//! process ends on `quit` (the source's exit code 3 when the outcome is unknown).
//!
//! The table, from `crates/vmig-migration/src/stream/mod.rs`: "the destination runs the VM
//! only once it has read a whole, checksummed `Commit`, and the source never runs a vCPU again
//! once it may have delivered one".

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use vmig_test_support::{require_kvm, wait_until};

#[path = "common/cli.rs"]
mod cli;
use cli::{ctl, vmig, wait_for};

/// How long a process has to open its socket, or a migration to end.
const PATIENCE: Duration = Duration::from_secs(60);

/// How the source ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceEnd {
    /// `failed`, not committed; its guest runs and verifies on `quit` (exit 0).
    RolledBack,
    /// `unknown`, committed; `postmigrate`, `cont` refused, exit 3 without a verify.
    Unknown,
    /// `completed` without the destination's Result: not verified, exit 1.
    CompletedUnverified,
    /// `cancelled`, not committed; its guest runs and verifies on `quit` (exit 0).
    Cancelled,
}

/// What ends a stalled stream's migration on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Nothing: the relay's fault does.
    Fault,
    /// `migrate_cancel`, once the source's `x-vmig-phase` is this one and a moment more (its
    /// sends or its read of an answer then block on the stalled stream).
    CancelWhen(&'static str),
    /// `x-vmig-timeout`, in seconds.
    Timeout(u64),
}

/// How the destination ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestinationEnd {
    /// It drops the VM and exits on its own, non-zero.
    Fails,
    /// It runs the VM: its guest verifies on `quit` (exit 0).
    Runs,
}

struct Row {
    /// The relay's `--fault`.
    fault: &'static str,
    /// A v2 dma-engine on each side (for the rows of device records).
    device: bool,
    /// The destination's `--mem` when it differs from the source's 32M (a refusal).
    destination_mem: &'static str,
    source: SourceEnd,
    destination: DestinationEnd,
    /// What the source's `error-desc` must say, beyond its row's rule.
    error: &'static str,
    stop: Stop,
}

const fn row(fault: &'static str, source: SourceEnd, destination: DestinationEnd) -> Row {
    Row {
        fault,
        device: false,
        destination_mem: "32M",
        source,
        destination,
        error: "",
        stop: Stop::Fault,
    }
}

use DestinationEnd::{Fails, Runs};
use SourceEnd::{Cancelled, CompletedUnverified, RolledBack, Unknown};

/// Every row of the table, with the record the relay cuts or damages.
const ROWS: &[Row] = &[
    row("cut-before:Config", RolledBack, Fails),
    row("cut-before:Ready", RolledBack, Fails),
    row("cut-before:Pages:2", RolledBack, Fails),
    row("cut-before:PassEnd", RolledBack, Fails),
    Row {
        device: true,
        ..row("cut-before:DeviceData", RolledBack, Fails)
    },
    Row {
        device: true,
        ..row("cut-before:InitialSent", RolledBack, Fails)
    },
    Row {
        device: true,
        ..row("cut-before:SwitchoverAck", RolledBack, Fails)
    },
    Row {
        device: true,
        ..row("cut-before:DeviceEnd", RolledBack, Fails)
    },
    row("cut-before:VcpuState", RolledBack, Fails),
    row("cut-before:Complete", RolledBack, Fails),
    row("cut-before:Accepted", RolledBack, Fails),
    Row {
        error: "fails its checksum",
        ..row("corrupt:Accepted", RolledBack, Fails)
    },
    Row {
        error: "the destination answered the commit with an abort, so it does not run the VM",
        ..row("corrupt:Commit", RolledBack, Fails)
    },
    row("cut-before:Commit", Unknown, Fails),
    row("cut-after:Commit", Unknown, Runs),
    row("cut-before:Resumed", Unknown, Runs),
    row("cut-before:Result", CompletedUnverified, Runs),
    // The destination refuses the Config (another RAM size) and its Abort is lost.
    Row {
        destination_mem: "64M",
        ..row("cut-before:Abort:to-source", RolledBack, Fails)
    },
    // A stream that blackholes (the relay holds it, connections open): a cancel or the
    // timeout still ends the migration at once, with the source blocked in a send or in a
    // read of an answer, not after its 60 s wait for the answer.
    Row {
        stop: Stop::CancelWhen("active"),
        error: "migrate-cancel",
        ..row("stall:Pages:2", Cancelled, Fails)
    },
    Row {
        stop: Stop::CancelWhen("verifying"),
        error: "migrate-cancel",
        ..row("stall:Accepted:to-source", Cancelled, Fails)
    },
    Row {
        stop: Stop::Timeout(5),
        error: "did not finish within timeout_s=5",
        ..row("stall:Accepted:to-source", Cancelled, Fails)
    },
];

/// The processes of one row, killed when dropped, and its directory.
struct Hosts {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Hosts {
    fn spawn(&mut self, args: &[&str], socket: Option<&Path>) -> usize {
        let child = vmig()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.children.push(child);
        if let Some(socket) = socket {
            wait_for(socket, PATIENCE);
        }
        self.children.len() - 1
    }

    fn device(&mut self, name: &str) -> String {
        let socket = self.dir.join(name);
        let path = socket.display().to_string();
        self.spawn(
            &[
                "device",
                "serve",
                "--device",
                "dma-engine",
                "--migration",
                "v2",
                "--socket",
                &path,
            ],
            Some(&socket),
        );
        format!("vfio-user,socket={path},rate=2000")
    }

    /// Waits at most [`PATIENCE`] for child `index` to exit; its status and output.
    fn end(&mut self, index: usize) -> (ExitStatus, String) {
        let child = &mut self.children[index];
        let status = wait_until("a vmig process to exit", PATIENCE, || {
            child
                .try_wait()
                .unwrap()
                .ok_or_else(|| "still running".to_string())
        });
        let mut out = String::new();
        let _ = child.stdout.take().unwrap().read_to_string(&mut out);
        let _ = child.stderr.take().unwrap().read_to_string(&mut out);
        (status, out)
    }
}

/// Runs `row`; every expectation that fails panics with both sides' output.
fn run_row(index: usize, row: &Row) {
    let dir = std::env::temp_dir().join(format!("vmig-lost-{}-{index}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut hosts = Hosts {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let (src_api, dst_api) = (dir.join("src.api"), dir.join("dst.api"));
    let (dst_sock, relay_sock) = (dir.join("dst.sock"), dir.join("relay.sock"));
    let devices = |hosts: &mut Hosts, side: &str| -> Vec<String> {
        if row.device {
            vec!["--device".into(), hosts.device(&format!("{side}-dev.sock"))]
        } else {
            Vec::new()
        }
    };
    let dst_devices = devices(&mut hosts, "dst");
    let src_devices = devices(&mut hosts, "src");
    let target = format!("unix:{}", dst_sock.display());
    let mut args = vec![
        "run".to_string(),
        "--mem".into(),
        row.destination_mem.into(),
        "--incoming".into(),
        target.clone(),
        "--api".into(),
        dst_api.display().to_string(),
    ];
    args.extend(dst_devices);
    let destination = hosts.spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&dst_api),
    );
    let front = format!("unix:{}", relay_sock.display());
    let relay = hosts.spawn(
        &["relay", &front, &target, "--fault", row.fault],
        Some(&relay_sock),
    );
    let mut args = vec![
        "run".to_string(),
        "--mem".into(),
        "32M".into(),
        "--workload".into(),
        "random,rate=2000".into(),
        "--api".into(),
        src_api.display().to_string(),
    ];
    args.extend(src_devices);
    let source = hosts.spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&src_api),
    );
    if let Stop::Timeout(seconds) = row.stop {
        let (ok, reply) = ctl(
            &src_api,
            &[
                "migrate-set-parameters",
                &format!("x-vmig-timeout={seconds}"),
            ],
        );
        assert!(ok, "{}: {reply}", row.fault);
    }
    let (ok, reply) = ctl(&src_api, &["migrate", &format!("uri={front}")]);
    assert!(ok, "{}: {reply}", row.fault);
    if let Stop::CancelWhen(phase) = row.stop {
        wait_until("the source to reach its phase", PATIENCE, || {
            let (_, r) = ctl(&src_api, &["query-migrate"]);
            (r["return"]["x-vmig-phase"] == phase)
                .then_some(())
                .ok_or_else(|| r.to_string())
        });
        std::thread::sleep(Duration::from_millis(300));
        let (ok, reply) = ctl(&src_api, &["migrate_cancel"]);
        assert!(ok, "{}: {reply}", row.fault);
    }
    let report = wait_until("the migration to end", PATIENCE, || {
        let (_, r) = ctl(&src_api, &["query-migrate"]);
        let status = r["return"]["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled", "unknown"].contains(&status.as_str()) {
            Ok(r["return"].clone())
        } else {
            Err(r.to_string())
        }
    });
    let what = format!("{}: {report}", row.fault);
    assert!(
        report["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains(row.error)),
        "{what}"
    );
    let (_, status) = ctl(&src_api, &["query-status"]);
    let status = &status["return"];
    match row.source {
        RolledBack | Cancelled => {
            let expected = if row.source == Cancelled {
                "cancelled"
            } else {
                "failed"
            };
            assert_eq!(report["status"], expected, "{what}");
            assert_eq!(report["x-vmig-committed"], false, "{what}");
            assert_eq!(status["status"], "running", "{what}: {status}");
        }
        Unknown => {
            assert_eq!(report["status"], "unknown", "{what}");
            assert_eq!(report["x-vmig-committed"], true, "{what}");
            let error = report["error-desc"].as_str().unwrap_or("");
            assert!(error.contains("never said it resumed"), "{what}");
            assert_eq!(status["status"], "postmigrate", "{what}: {status}");
            assert!(
                status["x-vmig-outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("unknown: ")),
                "{what}: {status}"
            );
            let (ok, reply) = ctl(&src_api, &["cont"]);
            assert!(!ok, "cont must be refused: {what}: {reply}");
        }
        CompletedUnverified => {
            assert_eq!(report["status"], "completed", "{what}");
            assert_eq!(report["x-vmig-verified"], false, "{what}");
            let error = report["error-desc"].as_str().unwrap_or("");
            assert!(
                error.contains("Result of its checks did not arrive"),
                "{what}"
            );
            assert_eq!(status["status"], "postmigrate", "{what}: {status}");
        }
    }
    // A stall holds the stream until the relay ends (as a blackhole until the destination's
    // read times out).
    let relayed = if row.stop == Stop::Fault {
        None
    } else {
        let _ = hosts.children[relay].kill();
        Some(hosts.end(relay).1)
    };
    // The destination: it runs the VM, or it has dropped it and ends by itself.
    let destination_out = match row.destination {
        Fails => {
            let (code, out) = hosts.end(destination);
            assert!(!code.success(), "{what}\ndestination: {out}");
            assert!(out.contains("incoming migration failed"), "{what}\n{out}");
            out
        }
        Runs => {
            wait_until("the destination to run the VM", PATIENCE, || {
                let (_, s) = ctl(&dst_api, &["query-status"]);
                (s["return"]["status"] == "running")
                    .then_some(())
                    .ok_or_else(|| s.to_string())
            });
            let (ok, _) = ctl(&dst_api, &["quit"]);
            assert!(ok);
            let (code, out) = hosts.end(destination);
            assert!(code.success(), "{what}\ndestination: {out}");
            assert!(out.contains("migration arrived"), "{what}\n{out}");
            assert!(out.contains("verify: passed"), "{what}\n{out}");
            out
        }
    };
    let (ok, _) = ctl(&src_api, &["quit"]);
    assert!(ok);
    let (code, out) = hosts.end(source);
    let both = format!("{what}\nsource:\n{out}\ndestination:\n{destination_out}");
    match row.source {
        RolledBack | Cancelled => {
            assert!(code.success(), "{both}");
            assert!(out.contains("the VM runs here as before"), "{both}");
            assert!(out.contains("verify: passed"), "{both}");
        }
        Unknown => {
            assert_eq!(code.code(), Some(3), "{both}");
            assert!(
                out.contains("quit: the migration's outcome is unknown"),
                "{both}"
            );
            assert!(!out.contains("verify:"), "the guest must not run: {both}");
        }
        CompletedUnverified => {
            assert_eq!(code.code(), Some(1), "{both}");
            assert!(!out.contains("verify:"), "the guest must not run: {both}");
        }
    }
    // Never both: a source that ran its guest again had no destination running it.
    assert!(
        !(out.contains("verify:") && destination_out.contains("migration arrived")),
        "the VM ran on both hosts: {both}"
    );
    // And the row is the one the table names: the relay's fault fired.
    let relayed = relayed.unwrap_or_else(|| {
        let _ = hosts.children[relay].kill();
        hosts.end(relay).1
    });
    assert!(
        relayed.contains("fault: "),
        "{both}
relay:
{relayed}"
    );
    println!(
        "{:<28} source {} (exit {}), destination {}",
        row.fault,
        report["status"],
        code.code().unwrap_or(-1),
        match row.destination {
            Fails => "dropped the VM",
            Runs => "runs the VM",
        }
    );
}

#[test]
fn every_row_of_the_lost_message_table_ends_as_the_table_says() {
    require_kvm!();
    // Three rows at a time: each is a few processes that mostly wait.
    let rows: Vec<(usize, &Row)> = ROWS.iter().enumerate().collect();
    for batch in rows.chunks(3) {
        std::thread::scope(|scope| {
            let runs: Vec<_> = batch
                .iter()
                .map(|&(index, row)| (row.fault, scope.spawn(move || run_row(index, row))))
                .collect();
            let failed: Vec<&str> = runs
                .into_iter()
                .filter_map(|(fault, run)| run.join().is_err().then_some(fault))
                .collect();
            assert!(failed.is_empty(), "rows that failed: {failed:?}");
        });
    }
}
