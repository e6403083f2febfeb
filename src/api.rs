//! The control socket of `vmig run --api PATH`: one JSON command per line, QMP-like, and its
//! client.
//!
//! ```text
//! → {"execute": "migrate", "arguments": {"uri": "tcp:10.0.0.2:4444", "downtime_ms": 300}}
//! ← {"return": {}}
//! → {"execute": "query-migrate"}
//! ← {"return": {"status": "active", "total_ms": 812, ...}}
//! → {"execute": "nonsense"}
//! ← {"error": {"class": "CommandNotFound", "desc": "unknown command `nonsense`: expected ..."}}
//! ```
//!
//! Commands: `migrate` {uri, downtime_ms, max_bandwidth, connections, timeout_s,
//! auto_converge, verify_memory}, `query-migrate`, `migrate-cancel`, `query-status`, `stop`,
//! `cont`, `quit`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use vmig_migration::{Machine, MigrationParams, Progress, Status};

/// Longest command line accepted.
const MAX_LINE: usize = 64 << 10;

/// What the control socket acts on.
pub struct Shared {
    /// The VM, once there is one (a destination has none until the migration arrives).
    pub machine: RwLock<Option<Arc<Machine>>>,
    /// The migration's report (outgoing or incoming).
    pub progress: Progress,
    /// Set by `quit`.
    pub quit: AtomicBool,
    /// Whether this VM is a migration destination.
    pub incoming: bool,
    migration: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    /// State for a source (`machine` given) or a destination.
    pub fn new(machine: Option<Arc<Machine>>, incoming: bool) -> Arc<Self> {
        Arc::new(Self {
            machine: RwLock::new(machine),
            progress: Progress::default(),
            quit: AtomicBool::new(false),
            incoming,
            migration: Mutex::new(None),
        })
    }

    fn machine(&self) -> Option<Arc<Machine>> {
        self.machine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a migration is under way.
    pub fn migrating(&self) -> bool {
        let status = self.progress.report().status;
        !status.is_final() && status != Status::None
    }
}

/// Serves the control socket at `path` in a background thread.
pub fn serve(path: &Path, shared: Arc<Shared>) -> Result<(), String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--api {}: another process listens there",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| {
            format!(
                "--api {}: cannot remove the old socket: {e}",
                path.display()
            )
        })?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("--api {}: {e}", path.display()))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || serve_client(stream, &shared));
        }
    });
    Ok(())
}

/// Removes the control socket when dropped.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn serve_client(stream: UnixStream, shared: &Shared) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(u64::MAX);
    let mut line = String::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64 + 1);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE {
            error(
                "GenericError",
                format!("command longer than {MAX_LINE} bytes"),
            )
        } else if line.trim().is_empty() {
            continue;
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(command) => execute(&command, shared),
                Err(e) => error(
                    "GenericError",
                    format!(
                        "not JSON ({e}): expected {{\"execute\": COMMAND, \"arguments\": {{...}}}}"
                    ),
                ),
            }
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
        if line.len() > MAX_LINE {
            return;
        }
    }
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

const COMMANDS: &str = "migrate, query-migrate, migrate-cancel, query-status, stop, cont, quit";

fn execute(command: &Value, shared: &Shared) -> Value {
    let Some(name) = command.get("execute").and_then(Value::as_str) else {
        return error(
            "GenericError",
            "missing \"execute\": expected {\"execute\": COMMAND, \"arguments\": {...}}",
        );
    };
    let arguments = command.get("arguments").cloned().unwrap_or(json!({}));
    let result = match name {
        "migrate" => migrate(arguments, shared),
        "query-migrate" => {
            serde_json::to_value(shared.progress.report()).map_err(|e| e.to_string())
        }
        "migrate-cancel" => {
            shared.progress.cancel();
            Ok(json!({}))
        }
        "query-status" => Ok(status(shared)),
        "stop" | "cont" => pause_or_resume(name == "stop", shared),
        "quit" => {
            shared.quit.store(true, Ordering::Release);
            Ok(json!({}))
        }
        other => {
            return error(
                "CommandNotFound",
                format!("unknown command `{other}`: expected one of {COMMANDS}"),
            );
        }
    };
    match result {
        Ok(value) => json!({ "return": value }),
        Err(desc) => error("GenericError", desc),
    }
}

fn status(shared: &Shared) -> Value {
    let migration = shared.progress.report().status;
    let state = match shared.machine() {
        None => "inmigrate",
        Some(_) if shared.incoming && migration != Status::Completed => "inmigrate",
        Some(_) if !shared.incoming && migration == Status::Completed => "postmigrate",
        Some(m) if m.vm.is_paused() => "paused",
        Some(_) => "running",
    };
    json!({ "status": state, "running": state == "running" })
}

fn pause_or_resume(stop: bool, shared: &Shared) -> Result<Value, String> {
    if shared.migrating() {
        return Err("a migration is under way: cancel it first (migrate-cancel)".into());
    }
    let machine = shared
        .machine()
        .ok_or("no VM yet: this destination waits for a migration")?;
    if !shared.incoming && shared.progress.report().committed {
        return Err(
            "the VM was handed over to the destination (committed); it must not run here again"
                .into(),
        );
    }
    if stop {
        machine.vm.pause()
    } else {
        machine.vm.resume()
    }
    .map_err(|e| e.to_string())?;
    Ok(json!({}))
}

fn migrate(arguments: Value, shared: &Shared) -> Result<Value, String> {
    if shared.incoming {
        return Err("this VM is a migration destination; migrate from the source".into());
    }
    let params: MigrationParams = serde_json::from_value(arguments).map_err(|e| {
        format!("migrate arguments: {e}; expected uri, downtime_ms, max_bandwidth, connections, timeout_s, auto_converge, verify_memory")
    })?;
    params.check().map_err(|e| e.to_string())?;
    let machine = shared
        .machine()
        .ok_or("the VM is still starting: try again once `query-status` says running")?;
    let mut slot = shared.migration.lock().unwrap_or_else(|e| e.into_inner());
    if shared.migrating() || slot.as_ref().is_some_and(|t| !t.is_finished()) {
        return Err("a migration is already under way".into());
    }
    if shared.progress.report().committed {
        return Err("the VM was already handed over to a destination".into());
    }
    // Refused at once, the VM untouched, as QEMU's migration blockers do.
    let blockers = machine.migration_blockers();
    if !blockers.is_empty() {
        return Err(format!("the VM cannot migrate: {}", blockers.join("; ")));
    }
    let progress = shared.progress.clone();
    progress.begin();
    *slot = Some(std::thread::spawn(move || {
        let _ = vmig_migration::migrate(&machine, &params, &progress);
    }));
    Ok(json!({}))
}

/// A client of the control socket.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects to `path`, retrying until `wait` has passed (a VM that is still starting).
    pub fn connect(path: &Path, wait: Duration) -> Result<Self, String> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    let writer = stream.try_clone().map_err(|e| e.to_string())?;
                    return Ok(Self {
                        reader: BufReader::new(stream),
                        writer,
                    });
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(format!("control socket {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends a command and returns its reply (`{"return": ...}` or `{"error": ...}`).
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("sending {command}: {e}"))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("reading the reply to {command}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the VM closed the control socket before replying to {command}"
            ));
        }
        serde_json::from_str(&line).map_err(|e| format!("the reply to {command} is not JSON: {e}"))
    }

    /// Like [`Self::call`], turning an error reply into `Err(desc)`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let reply = self.call(command, arguments)?;
        if let Some(err) = reply.get("error") {
            return Err(err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string());
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}
