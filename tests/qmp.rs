//! `vmig run --api` speaks QMP as QEMU documents it: the wire protocol and its errors against a
//! raw socket; a whole migration with its events through vmig's client; and Python's `qemu.qmp`
//! (installed into a virtual environment under `target/`) driving a migration between two
//! `vmig run`s and, with the same script, between two QEMUs, plus `qmp-shell`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmig_kernel_guest::PrepareError;
use vmig_test_support::{require_kvm, skip, wait_until};

const PATIENCE: Duration = Duration::from_secs(60);

fn vmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmig"))
}

/// Processes killed, and a directory removed, at the end of a test.
struct Scene {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Scene {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmig-qmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            children: Vec::new(),
        }
    }

    /// Starts `command`, waiting for the socket `api` it serves.
    fn spawn(&mut self, mut command: Command, api: &Path) {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        wait_until("the QMP socket", PATIENCE, || {
            if UnixStream::connect(api).is_ok() {
                Ok(())
            } else {
                Err(format!("no {}", api.display()))
            }
        });
    }

    /// A `vmig run` source (`--api`) of 64 MiB, returning its QMP socket.
    fn vmig_source(&mut self) -> PathBuf {
        let api = self.dir.join("src.qmp");
        let mut command = vmig();
        command
            .args([
                "run",
                "--mem",
                "64M",
                "--workload",
                "random,rate=2000",
                "--api",
            ])
            .arg(&api);
        self.spawn(command, &api);
        api
    }

    /// A `vmig run --incoming defer` destination, returning its QMP socket.
    fn vmig_destination(&mut self) -> PathBuf {
        let api = self.dir.join("dst.qmp");
        let mut command = vmig();
        command
            .args(["run", "--incoming", "defer", "--mem", "64M", "--api"])
            .arg(&api);
        self.spawn(command, &api);
        api
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A QMP connection at the byte level.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that arrived while a reply was awaited.
    events: std::collections::VecDeque<Value>,
}

impl Raw {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            events: std::collections::VecDeque::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// The next message that is not an event (events are kept for [`Self::next_event`]).
    fn reply(&mut self) -> Value {
        loop {
            let message = self.read();
            if message.get("event").is_none() {
                return message;
            }
            self.events.push_back(message);
        }
    }

    /// The next event, in the order they were sent.
    fn next_event(&mut self) -> Value {
        match self.events.pop_front() {
            Some(event) => event,
            None => self.read(),
        }
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "the server closed the connection");
        assert!(line.ends_with("\r\n"), "QMP lines end in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn call(&mut self, request: Value) -> Value {
        self.send(request.to_string().as_bytes());
        self.reply()
    }

    /// Waits for event `name`, returning it.
    fn event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "no {name} event");
            let message = self.next_event();
            if message["event"] == name {
                return message;
            }
        }
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

/// "The greeting", "capabilities negotiation", "id", the error classes and the framing
/// (QEMU's docs/interop/qmp-spec.rst): every rule against a raw socket, and the connection
/// stays usable after each bad input.
#[test]
fn the_wire_protocol_is_qmp_and_bad_input_gets_qmps_errors() {
    require_kvm!();
    let mut scene = Scene::new("wire");
    let api = scene.vmig_source();
    let mut qmp = Raw::connect(&api);
    let greeting = qmp.read();
    let version = &greeting["QMP"]["version"];
    assert!(version["qemu"]["major"].is_u64() && version["qemu"]["minor"].is_u64());
    assert!(version["qemu"]["micro"].is_u64(), "{greeting}");
    assert!(version["package"].as_str().unwrap().starts_with("vmig "));
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    // Nothing before negotiation; the id comes back with the refusal.
    let reply = qmp.call(json!({"execute": "query-status", "id": {"n": 1}}));
    let mut expected = error(
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );
    expected["id"] = json!({"n": 1});
    assert_eq!(reply, expected);
    assert_eq!(
        qmp.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
        error(
            "GenericError",
            "Capability 'oob' not available: vmig offers none"
        )
    );
    assert_eq!(
        qmp.call(json!({"execute": "qmp_capabilities", "id": 7})),
        json!({"return": {}, "id": 7})
    );
    assert_eq!(
        qmp.call(json!({"execute": "qmp_capabilities"})),
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    // Two requests in one write, no newline between or after them.
    qmp.send(br#"{"execute":"query-status","id":"a"}{"execute":"query-version","id":"b"}"#);
    let status = qmp.reply();
    assert_eq!(status["id"], "a");
    assert_eq!(status["return"]["status"], "running");
    assert_eq!(status["return"]["running"], true);
    let version = qmp.reply();
    assert_eq!(
        (&version["id"], &version["return"]),
        (&json!("b"), &greeting["QMP"]["version"])
    );
    // Malformed requests, each answered as QEMU answers it.
    for (input, class, desc) in [
        (&b"[1, 2]"[..], "GenericError", "QMP input must be a JSON object"),
        (b"42 ", "GenericError", "JSON parse error, stray `42`: QMP input must be a JSON object"),
        (b"{\"arguments\": {}}", "GenericError", "QMP input lacks member 'execute'"),
        (b"{\"execute\": 1}", "GenericError", "QMP input member 'execute' must be a string"),
        (b"{\"execute\": \"stop\", \"arguments\": []}", "GenericError", "QMP input member 'arguments' must be an object"),
        (b"{\"execute\": \"stop\", \"extra\": 1}", "GenericError", "QMP input member 'extra' is unexpected"),
        (b"{\"execute\": \"frobnicate\"}", "CommandNotFound", "The command frobnicate has not been found"),
        (b"{\"execute\": \"stop\", \"arguments\": {\"now\": true}}", "GenericError", "Parameter 'now' is unexpected: this command takes no arguments"),
        (b"{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"downtime-limit\": \"soon\"}}", "GenericError", "Invalid parameter type for 'downtime-limit', expected: integer"),
        (b"{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"xbzrle-cache-size\": 1}}", "GenericError", "Parameter 'xbzrle-cache-size' is unexpected: expected downtime-limit, max-bandwidth, multifd-channels, x-vmig-timeout, x-vmig-verify-memory, x-vmig-device-dirty-tracking"),
        (b"{\"execute\": \"migrate-set-capabilities\", \"arguments\": {\"capabilities\": [{\"capability\": \"xbzrle\", \"state\": true}]}}", "GenericError", "Capability 'xbzrle' is not supported by vmig: it has auto-converge, events, multifd"),
        (b"{\"execute\": \"migrate\", \"arguments\": {}}", "GenericError", "Parameter 'uri' is missing"),
        (b"{\"execute\": \"migrate-incoming\", \"arguments\": {\"uri\": \"unix:/x\"}}", "GenericError", "'-incoming' was not specified on the command line: this VM is a source (vmig run --incoming defer makes a destination that waits for migrate-incoming)"),
    ] {
        qmp.send(input);
        assert_eq!(qmp.reply(), error(class, desc), "{}", String::from_utf8_lossy(input));
    }
    // Not JSON, not UTF-8, too large: an error, and the connection goes on.
    for input in [&b"{\"execute\": }"[..], b"{\"execute\": \"\xc3\x28\"}"] {
        qmp.send(input);
        let reply = qmp.reply();
        assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
        let desc = reply["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("JSON parse error, "), "{reply}");
    }
    let mut huge = b"{\"execute\": \"".to_vec();
    huge.resize(2 << 20, b'x');
    huge.extend(b"\"}\n");
    qmp.send(&huge);
    assert_eq!(
        qmp.reply(),
        error(
            "GenericError",
            "JSON parse error, a message longer than 1048576 bytes"
        )
    );
    // QMP's way back to a known-good state: a 0xFF byte drops what is pending.
    qmp.send(b"{\"execute\": \"query-st\xff");
    assert_eq!(
        qmp.reply(),
        error(
            "GenericError",
            "JSON parse error, byte 0xff: the input so far was dropped"
        )
    );
    assert_eq!(
        qmp.call(json!({"execute": "query-status", "id": 9}))["id"],
        9
    );
    assert_eq!(
        qmp.call(
            json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 0}})
        ),
        error("GenericError", "multifd-channels 0: expected 1 to 16")
    );
    // Parameters and capabilities, with QEMU's names, read back.
    assert_eq!(
        qmp.call(json!({"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 50, "max-bandwidth": 1 << 30, "multifd-channels": 3, "x-vmig-verify-memory": false}})),
        json!({"return": {}})
    );
    let params = qmp.call(json!({"execute": "query-migrate-parameters"}));
    assert_eq!(
        params["return"],
        json!({"downtime-limit": 50, "max-bandwidth": 1 << 30, "multifd-channels": 3, "x-vmig-timeout": 600, "x-vmig-verify-memory": false, "x-vmig-device-dirty-tracking": true})
    );
    qmp.call(json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "multifd", "state": true}, {"capability": "auto-converge", "state": false}]}}));
    assert_eq!(
        qmp.call(json!({"execute": "query-migrate-capabilities"}))["return"],
        json!([
            {"capability": "auto-converge", "state": false},
            {"capability": "events", "state": true},
            {"capability": "multifd", "state": true},
        ])
    );
    assert_eq!(
        qmp.call(json!({"execute": "query-migrate"})),
        json!({"return": {}})
    );
    let commands = qmp.call(json!({"execute": "query-commands"}));
    let names: Vec<&str> = commands["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in [
        "migrate",
        "migrate-incoming",
        "migrate_cancel",
        "migrate-cancel",
        "query-migrate",
        "query-status",
        "stop",
        "cont",
        "quit",
        "qmp_capabilities",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    // stop and cont, with their events; a second client sees them too.
    let mut other = Raw::connect(&api);
    other.read();
    other.call(json!({"execute": "qmp_capabilities"}));
    assert_eq!(qmp.call(json!({"execute": "stop"})), json!({"return": {}}));
    assert!(
        other.event("STOP")["timestamp"]["seconds"]
            .as_u64()
            .unwrap()
            > 1_700_000_000
    );
    assert_eq!(
        qmp.call(json!({"execute": "query-status"}))["return"]["status"],
        "paused"
    );
    qmp.call(json!({"execute": "cont"}));
    other.event("RESUME");
    assert_eq!(qmp.call(json!({"execute": "quit"})), json!({"return": {}}));
    assert_eq!(
        other.event("SHUTDOWN")["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
}

/// A migration driven over QMP between a source and a `--incoming defer` destination: the
/// events QEMU sends (`MIGRATION` for every status, `MIGRATION_PASS`, `STOP`; `RESUME` on
/// the destination) and `query-migrate` with QEMU's field names and vmig's under `x-vmig-`.
#[test]
fn a_migration_over_qmp_sends_qemus_events_and_reports_qemus_fields() {
    require_kvm!();
    let mut scene = Scene::new("events");
    let src = scene.vmig_source();
    let dst = scene.vmig_destination();
    let (mut source, mut destination) = (Raw::connect(&src), Raw::connect(&dst));
    for qmp in [&mut source, &mut destination] {
        qmp.read();
        qmp.call(json!({"execute": "qmp_capabilities"}));
    }
    assert_eq!(
        destination.call(json!({"execute": "query-status"}))["return"]["status"],
        "inmigrate"
    );
    let uri = format!("unix:{}", scene.dir.join("m.sock").display());
    let channel = json!([{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": scene.dir.join("m.sock")}}]);
    assert_eq!(
        destination
            .call(json!({"execute": "migrate-incoming", "arguments": {"channels": channel}})),
        json!({"return": {}})
    );
    assert_eq!(
        destination.call(json!({"execute": "migrate-incoming", "arguments": {"uri": uri}})),
        error(
            "GenericError",
            "The incoming migration has already been started"
        )
    );
    let path = scene.dir.join("m.sock");
    wait_until("the destination to listen", PATIENCE, || {
        path.exists()
            .then_some(())
            .ok_or_else(|| "no socket".to_string())
    });
    source.call(json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 64 << 20, "downtime-limit": 50}}));
    assert_eq!(
        source.call(json!({"execute": "migrate", "arguments": {"uri": uri}, "id": "m"})),
        json!({"return": {}, "id": "m"})
    );
    let mut statuses = Vec::new();
    let (mut passes, mut stopped) = (0, false);
    let deadline = Instant::now() + PATIENCE;
    while statuses.last() != Some(&"completed".to_string()) {
        assert!(Instant::now() < deadline, "{statuses:?}");
        let event = source.next_event();
        match event["event"].as_str().unwrap() {
            "MIGRATION" => statuses.push(event["data"]["status"].as_str().unwrap().to_string()),
            "MIGRATION_PASS" => {
                passes += 1;
                assert_eq!(event["data"]["pass"], passes);
            }
            "STOP" => stopped = true,
            other => panic!("{other} during the migration: {event}"),
        }
    }
    assert_eq!(statuses, ["setup", "active", "device", "completed"]);
    assert!(passes >= 1 && stopped, "{passes} passes");
    let info = source.call(json!({"execute": "query-migrate"}))["return"].clone();
    assert_eq!(info["status"], "completed");
    assert_eq!(info["ram"]["total"], 64 << 20);
    assert_eq!(info["ram"]["dirty-sync-count"], passes);
    for key in ["total-time", "downtime", "setup-time", "expected-downtime"] {
        assert!(info[key].is_u64(), "{key}: {info}");
    }
    for key in [
        "transferred",
        "remaining",
        "duplicate",
        "normal",
        "dirty-pages-rate",
    ] {
        assert!(info["ram"][key].is_u64(), "{key}: {info}");
    }
    assert_eq!(
        (&info["x-vmig-verified"], &info["x-vmig-committed"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(info["x-vmig-dirty-sources"].as_array().unwrap().len(), 2);
    assert!(info["vfio"]["transferred"].is_u64());
    destination.event("RESUME");
    assert_eq!(
        destination.call(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
    assert_eq!(
        source.call(json!({"execute": "query-status"}))["return"]["status"],
        "postmigrate"
    );
    assert_eq!(
        source.call(json!({"execute": "cont"})),
        error(
            "GenericError",
            "the VM was handed over to the destination (committed); it must not run here again"
        )
    );
    for qmp in [&mut source, &mut destination] {
        qmp.call(json!({"execute": "quit"}));
    }
}

/// Why the Python side cannot run here, when it cannot.
enum Missing {
    Skip(String),
}

fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{command:?} failed ({}): {text}", out.status))
    }
}

/// A virtual environment under `target/` with `qemu.qmp` from PyPI, made once: its `bin/`.
fn qemu_qmp_environment() -> Result<PathBuf, Missing> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-qmp-venv");
    let bin = venv.join("bin");
    if bin.join("qmp-shell").is_file() {
        return Ok(bin);
    }
    if run(Command::new("python3").arg("--version")).is_err() {
        return Err(Missing::Skip("python3 is not installed".into()));
    }
    if let Err(why) = run(Command::new("python3").arg("-m").arg("venv").arg(&venv)) {
        if why.contains("ensurepip") || why.contains("No module named venv") {
            return Err(Missing::Skip(format!(
                "python3 has no venv module (apt-get install python3-venv): {why}"
            )));
        }
        panic!("creating the virtual environment: {why}");
    }
    let install = run(Command::new(bin.join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "qemu.qmp",
    ]));
    if let Err(why) = install {
        let _ = std::fs::remove_dir_all(&venv);
        let offline = [
            "Read timed out",
            "ReadTimeoutError",
            "Could not find a version",
            "Failed to establish",
            "Temporary failure",
            "Network is unreachable",
            "No matching distribution",
            "ConnectTimeout",
            "Max retries",
        ];
        if offline.iter().any(|m| why.contains(m)) {
            return Err(Missing::Skip(format!("PyPI cannot be reached: {why}")));
        }
        panic!("pip install qemu.qmp: {why}");
    }
    Ok(bin)
}

/// The script's one JSON line.
fn migrate_with_script(python: &Path, socket: &Path, uri: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/migrate.py");
    let out = run(Command::new(python).arg(&script).arg(socket).arg(uri))
        .unwrap_or_else(|why| panic!("{why}"));
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report from the script: {out}"));
    serde_json::from_str(line).unwrap()
}

/// "Drive vmig's migrations with the tools people already use for QEMU": `qemu.qmp`'s
/// `QMPClient` runs one script that negotiates, sets capabilities and parameters, migrates and
/// waits for the `MIGRATION` event `completed`, first against vmig, then unchanged against
/// QEMU migrating `vmig bench migrate`'s guest; `qmp-shell` runs a command against vmig.
#[test]
fn qemu_qmp_drives_vmig_and_qemu_with_the_same_script() {
    require_kvm!();
    let bin = match qemu_qmp_environment() {
        Ok(bin) => bin,
        Err(Missing::Skip(why)) => return skip(why),
    };
    let python = bin.join("python");
    let mut scene = Scene::new("python");
    let src = scene.vmig_source();
    let dst = scene.vmig_destination();
    let incoming = scene.dir.join("m.sock");
    let mut ctl = vmig();
    let out = ctl
        .arg("ctl")
        .arg(&dst)
        .args([
            "migrate-incoming",
            &format!("uri=unix:{}", incoming.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until("the destination to listen", PATIENCE, || {
        incoming
            .exists()
            .then_some(())
            .ok_or_else(|| "no socket".to_string())
    });
    let report = migrate_with_script(&python, &src, &format!("unix:{}", incoming.display()));
    println!("qemu.qmp against vmig: {report}");
    assert_eq!(
        report["statuses"],
        json!(["setup", "active", "device", "completed"]),
        "{report}"
    );
    assert!(
        report["passes"].as_u64() > Some(0) && report["stopped"] == true,
        "{report}"
    );
    assert_eq!(report["query-migrate"]["status"], "completed");
    assert_eq!(report["query-migrate"]["x-vmig-verified"], true, "{report}");
    assert!(
        report["vmig-extras"].as_array().unwrap().len() >= 5,
        "{report}"
    );

    // qmp-shell, as a person would use it, on the destination that now runs the VM.
    let mut shell = Command::new(bin.join("qmp-shell"))
        .arg(&dst)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-status\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"status\": \"running\""),
        "qmp-shell: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same script, unchanged, against QEMU.
    let qemu = match vmig_kernel_guest::qemu_system() {
        Ok(qemu) => qemu,
        Err(PrepareError::Unavailable(why)) => return skip(format!("the QEMU half: {why}")),
        Err(PrepareError::Failed(why)) => panic!("installing QEMU: {why}"),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // `vmig bench migrate`'s QEMU guest: it writes every page of its RAM, then idles.
    let dir = scene.dir.clone();
    let image = dir.join("guest.img");
    let out = vmig()
        .args(["bench", "qemu-guest", "--mem", "64M", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qemu_side = |side: &str| {
        let qmp = dir.join(format!("qemu-{side}.qmp"));
        let mut command = Command::new(&qemu);
        command
            .args([
                "-accel",
                "kvm",
                "-m",
                "64M",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-drive",
            ])
            .arg(format!(
                "file={},format=raw,if=ide,snapshot=on",
                image.display()
            ))
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={}",
                dir.join(format!("qemu-{side}.console")).display()
            ))
            .args(["-device", "isa-debugcon,iobase=0xe9,chardev=console"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if side == "destination" {
            command
                .arg("-incoming")
                .arg(format!("tcp:127.0.0.1:{port}"));
        }
        (command, qmp)
    };
    let (command, dest_qmp) = qemu_side("destination");
    scene.spawn(command, &dest_qmp);
    let (command, source_qmp) = qemu_side("source");
    scene.spawn(command, &source_qmp);
    // The guest says `R` on its debug console once every page holds data.
    let console = dir.join("qemu-source.console");
    wait_until("QEMU's guest to write its pages", PATIENCE, || {
        let said = std::fs::read(&console).unwrap_or_default();
        said.contains(&b'R')
            .then_some(())
            .ok_or_else(|| format!("console: {said:?}"))
    });
    let report = migrate_with_script(&python, &source_qmp, &format!("tcp:127.0.0.1:{port}"));
    println!("the same script against QEMU: {report}");
    assert_eq!(report["query-migrate"]["status"], "completed", "{report}");
    assert_eq!(
        report["statuses"].as_array().unwrap().last(),
        Some(&json!("completed")),
        "{report}"
    );
    assert_eq!(
        report["vmig-extras"],
        json!([]),
        "QEMU has no x-vmig- keys: {report}"
    );
    // The guest had written its pages by then: QEMU sent them with their data.
    let normal = report["query-migrate"]["ram"]["normal"].as_u64();
    assert!(normal > Some(10_000), "{report}");
    for qmp in [&src, &dst] {
        let _ = vmig().arg("ctl").arg(qmp).arg("quit").output();
    }
}

/// `quit` on a destination still waiting for its migration ends it, as QEMU's `quit` does,
/// with the `SHUTDOWN` event first; both `--incoming URI` and `--incoming defer`.
#[test]
fn quit_ends_a_destination_that_is_still_waiting() {
    require_kvm!();
    let mut scene = Scene::new("quit");
    for incoming in [
        format!("unix:{}", scene.dir.join("m.sock").display()),
        "defer".to_string(),
    ] {
        let api = scene.dir.join(format!("dst-{}.qmp", scene.children.len()));
        let mut command = vmig();
        command
            .args(["run", "--incoming", &incoming, "--mem", "32M", "--api"])
            .arg(&api);
        scene.spawn(command, &api);
        let mut qmp = Raw::connect(&api);
        qmp.read();
        qmp.call(json!({"execute": "qmp_capabilities"}));
        assert_eq!(qmp.call(json!({"execute": "quit"})), json!({"return": {}}));
        qmp.event("SHUTDOWN");
        let child = scene.children.last_mut().unwrap();
        let status = wait_until("the destination to exit", PATIENCE, || {
            child
                .try_wait()
                .unwrap()
                .ok_or_else(|| format!("--incoming {incoming} still runs"))
        });
        assert!(status.success(), "--incoming {incoming}: {status}");
    }
}
