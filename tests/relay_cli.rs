//! `vmig relay` as other tests and users drive it: the first line names where it listens
//! (the real port for tcp:HOST:0), the fault's line when it fires, `--once`, SIGTERM, and
//! the one-line refusal of a bad spec. A fake source and destination speak the stream's
//! framing (`vmig_migration::stream`), so no VM is needed.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use vmig_migration::stream::{Hello, Kind, RecordReader, RecordWriter};
use vmig_migration::transport::{self, Listener, Uri};
use vmig_test_support::wait_until;

#[path = "common/cli.rs"]
mod cli;
use cli::vmig;

/// A directory of the test, removed at its end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vmig-relay-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vmig relay` started on tcp:127.0.0.1:0, killed if the test ends first.
struct RelayProcess {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl RelayProcess {
    /// Waits for the relay to exit, which it must do with status 0.
    fn expect_clean_exit(&mut self) {
        let status = wait_until("the relay to exit", Duration::from_secs(30), || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| "still running".to_string())
        });
        assert!(status.success(), "{status}");
    }

    fn start(target: &Uri, extra: &[&str]) -> (Self, Uri) {
        let mut child = vmig()
            .args(["relay", "tcp:127.0.0.1:0", &target.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        let listening = first
            .strip_prefix("relaying ")
            .and_then(|rest| rest.trim_end().strip_suffix(&format!(" -> {target}")))
            .unwrap_or_else(|| panic!("the first line: {first:?}"));
        let uri: Uri = listening.parse().unwrap();
        assert!(!listening.ends_with(":0"), "{first}");
        (Self { child, lines }, uri)
    }

    /// The next line that starts with `prefix`.
    fn line_starting(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            assert!(
                self.lines.read_line(&mut line).unwrap() > 0,
                "the relay ended before printing a line starting {prefix:?}"
            );
            if line.starts_with(prefix) {
                return line.trim_end().to_string();
            }
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_relay_prints_its_port_cuts_after_commit_and_exits_once_the_migration_closes() {
    let dir = Dir::new("cut");
    let target = Uri::Unix(dir.0.join("destination.sock"));
    let destination = Listener::bind(&target).unwrap();
    let (mut relay, uri) = RelayProcess::start(&target, &["--fault", "cut-after:commit", "--once"]);
    let mut source = transport::connect(&uri).unwrap();
    let hello = Hello {
        channel: 0,
        channels: 1,
        session: 0x5eed,
    };
    source.write_all(&hello.encode()).unwrap();
    let mut at_destination = destination.accept(None).unwrap();
    at_destination
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(Hello::read(&mut at_destination).unwrap(), hello);
    let mut writer = RecordWriter::new(source.try_clone().unwrap());
    let mut reader = RecordReader::new(at_destination, "at the destination");
    writer.write(Kind::Complete, &[]).unwrap();
    writer.write(Kind::Commit, &[]).unwrap();
    assert_eq!(reader.read().unwrap().kind, Kind::Complete);
    assert_eq!(reader.read().unwrap().kind, Kind::Commit);
    assert_eq!(
        relay.line_starting("fault:"),
        "fault: cut after Commit #1 to the destination"
    );
    let err = reader.read().unwrap_err().to_string();
    assert!(err.contains("the peer closed"), "{err}");
    drop((writer, source, reader));
    // --once: the first migration's connections are all closed, so the relay exits.
    relay.expect_clean_exit();
}

#[test]
fn the_relay_stops_on_sigterm() {
    let dir = Dir::new("term");
    let target = Uri::Unix(dir.0.join("destination.sock"));
    let _destination = Listener::bind(&target).unwrap();
    let (mut relay, _) = RelayProcess::start(&target, &[]);
    let killed = Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    relay.expect_clean_exit();
}

#[test]
fn a_bad_fault_spec_or_address_is_one_line_naming_the_forms() {
    for (args, expected) in [
        (
            [
                "tcp:127.0.0.1:0",
                "unix:/tmp/x.sock",
                "--fault",
                "drop:Commit",
            ],
            "vmig: error: --fault `drop:Commit`: unknown fault `drop`; expected none, cut-before:KIND[:N][:DIR]",
        ),
        (
            [
                "tcp:127.0.0.1:0",
                "unix:/tmp/x.sock",
                "--fault",
                "stall:Abort",
            ],
            "vmig: error: --fault `stall:Abort`: Abort travels both ways: give to-destination or to-source",
        ),
        (
            ["localhost:4444", "unix:/tmp/x.sock", "--fault", "none"],
            "vmig: error: LISTEN: ",
        ),
        (
            ["tcp:127.0.0.1:0", "tcp:nowhere", "--fault", "none"],
            "vmig: error: TARGET: ",
        ),
    ] {
        let out = vmig().arg("relay").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with(expected), "{args:?}: {stderr}");
    }
}
