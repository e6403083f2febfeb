//! The QMP server of `vmig run --api PATH`: one thread per connection, the greeting, the
//! capabilities negotiation, replies carrying the request's `id`, and the events every
//! negotiated connection receives.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{Machine, MigrationReport, Progress, Status};

use super::commands::{self, QmpError};
use super::framing::{Frame, Framer};
use super::names::{Settings, qmp_status};

/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Parameters and capabilities for the next `migrate`.
    pub(super) settings: Mutex<Settings>,
    /// The running outgoing migration.
    pub(super) migration: Mutex<Option<JoinHandle<()>>>,
    /// A destination started with `--incoming defer`: what `migrate-incoming` set up.
    deferred: Option<(Mutex<Deferred>, Condvar)>,
    events: Mutex<Sender<Value>>,
    clients: Arc<Mutex<Vec<Arc<Connection>>>>,
}

/// One client's connection.
pub(super) struct Connection {
    /// The socket, and whether the client has negotiated: one lock, so that no event can slip
    /// in between the `qmp_capabilities` reply and the moment events start.
    writer: Mutex<(UnixStream, bool)>,
}

impl Connection {
    /// Writes a reply; `negotiates` marks the client negotiated once its reply is out. `false`
    /// when the client is gone or stuck.
    fn reply(&self, message: &Value, negotiates: bool) -> bool {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = writer
            .0
            .write_all(format!("{message}\r\n").as_bytes())
            .is_ok();
        writer.1 |= sent && negotiates;
        sent
    }

    /// Writes an event if the client has negotiated; `false` when it is gone or stuck, and
    /// then its socket is shut down (a half-written event must not be followed by more).
    fn event(&self, event: &Value) -> bool {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if !writer.1 {
            return true;
        }
        let sent = writer
            .0
            .write_all(format!("{event}\r\n").as_bytes())
            .is_ok();
        if !sent {
            let _ = writer.0.shutdown(std::net::Shutdown::Both);
        }
        sent
    }

    fn negotiated(&self) -> bool {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// A deferred destination's `migrate-incoming`.
#[derive(Default)]
struct Deferred {
    /// The listener it bound, until the destination takes it.
    listener: Option<Listener>,
    /// Whether `migrate-incoming` was accepted (it is, once).
    started: bool,
}

/// Which migration events a report change means, remembering what was said before.
#[derive(Debug, Default)]
struct EventState {
    status: &'static str,
    passes: u64,
    stopped_by_migration: bool,
}

impl Shared {
    /// State for a source (`machine` given) or a destination (`deferred`: started with
    /// `--incoming defer`, it listens once `migrate-incoming` says where).
    pub fn new(machine: Option<Arc<Machine>>, incoming: bool, deferred: bool) -> Arc<Self> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let clients = Arc::new(Mutex::new(Vec::new()));
        spawn_broadcaster(receiver, Arc::clone(&clients));
        let shared = Arc::new(Self {
            machine: RwLock::new(machine),
            progress: Progress::default(),
            quit: AtomicBool::new(false),
            incoming,
            settings: Mutex::new(Settings::default()),
            migration: Mutex::new(None),
            deferred: deferred.then(|| (Mutex::new(Deferred::default()), Condvar::new())),
            events: Mutex::new(sender),
            clients,
        });
        let weak = Arc::downgrade(&shared);
        let state = Mutex::new(EventState::default());
        shared
            .progress
            .on_change(Arc::new(move |report: &MigrationReport| {
                if let Some(shared) = weak.upgrade() {
                    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                    shared.migration_events(report, &mut state);
                }
            }));
        shared
    }

    pub(super) fn machine(&self) -> Option<Arc<Machine>> {
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

    /// Sends event `name` with `data` to every negotiated client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let (Some(data), Some(map)) = (data, event.as_object_mut()) {
            map.insert("data".into(), data);
        }
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(event);
    }

    /// QEMU's events for a change of the migration's report: `MIGRATION` when the status QMP
    /// shows changes, `MIGRATION_PASS` for each pass (both only with the `events`
    /// capability, as in QEMU), and `STOP` / `RESUME` when the migration stops or restarts
    /// the VM.
    fn migration_events(&self, report: &MigrationReport, state: &mut EventState) {
        let events = self
            .settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events;
        let status = qmp_status(report.status);
        if status != state.status {
            state.status = status;
            // The source stops the VM as it enters `device`: QEMU's STOP comes first.
            if report.status == Status::Device && !self.incoming {
                state.stopped_by_migration = true;
                self.emit("STOP", None);
            }
            if events {
                self.emit("MIGRATION", Some(json!({ "status": status })));
            }
            let resumed = match report.status {
                Status::Failed | Status::Cancelled => {
                    !self.incoming && state.stopped_by_migration && !report.committed
                }
                Status::Completed => self.incoming,
                _ => false,
            };
            if resumed {
                self.emit("RESUME", None);
            }
            if report.status.is_final() {
                state.stopped_by_migration = false;
            }
        }
        // Passes are the source's (QEMU's destination reports none).
        if report.passes != state.passes {
            state.passes = report.passes;
            if events && report.passes > 0 && !self.incoming {
                self.emit("MIGRATION_PASS", Some(json!({ "pass": report.passes })));
            }
        }
    }

    /// For `--incoming defer`: waits until `migrate-incoming` has bound a listener, or `quit`.
    pub fn wait_for_incoming(&self) -> Option<Listener> {
        let (deferred, changed) = self.deferred.as_ref()?;
        let mut deferred = deferred.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(listener) = deferred.listener.take() {
                return Some(listener);
            }
            if self.quit.load(Ordering::Acquire) {
                return None;
            }
            deferred = changed
                .wait_timeout(deferred, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// `migrate-incoming`: binds `uri` and hands the listener to a deferred destination, once;
    /// a URI that cannot be bound is refused here, and the destination waits on.
    pub(super) fn start_incoming(&self, uri: Uri) -> Result<(), QmpError> {
        let Some((deferred, changed)) = &self.deferred else {
            return Err(QmpError::generic(if self.incoming {
                "The incoming migration has already been started (vmig run --incoming URI \
                 listens at once; start it with --incoming defer to choose with migrate-incoming)"
            } else {
                "'-incoming' was not specified on the command line: this VM is a source \
                 (vmig run --incoming defer makes a destination that waits for migrate-incoming)"
            }));
        };
        let mut deferred = deferred.lock().unwrap_or_else(|e| e.into_inner());
        if deferred.started {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let listener = Listener::bind(&uri)
            .map_err(|e| QmpError::generic(format!("migrate-incoming {uri}: {e}")))?;
        *deferred = Deferred {
            listener: Some(listener),
            started: true,
        };
        changed.notify_all();
        Ok(())
    }
}

/// Sends each event to every client, in order. The client list is not locked while sending,
/// so connecting and leaving go on; a client that does not read for [`WRITE_TIMEOUT`] is
/// dropped.
fn spawn_broadcaster(events: Receiver<Value>, clients: Arc<Mutex<Vec<Arc<Connection>>>>) {
    std::thread::spawn(move || {
        for event in events {
            let targets = clients.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for client in targets {
                if !client.event(&event) {
                    clients
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|c| !Arc::ptr_eq(c, &client));
                }
            }
        }
    });
}

/// Serves QMP at `path` in a background thread.
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

/// The greeting: QEMU's shape, vmig's version, no optional capability (no out-of-band).
pub(super) fn greeting() -> Value {
    json!({"QMP": {"version": commands::version(), "capabilities": []}})
}

fn serve_client(mut stream: UnixStream, shared: &Shared) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
    let connection = Arc::new(Connection {
        writer: Mutex::new((writer, false)),
    });
    if !connection.reply(&greeting(), false) {
        return;
    }
    shared
        .clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::clone(&connection));
    let mut framer = Framer::default();
    let mut buf = vec![0u8; 64 << 10];
    'connection: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for frame in framer.feed(&buf[..n]) {
            let (reply, negotiates, quits) = match frame {
                Frame::Text(text) => request(&text, connection.negotiated(), shared),
                Frame::Invalid(why) => (QmpError::generic(why).reply(None), false, false),
            };
            let sent = connection.reply(&reply, negotiates);
            // `quit` takes effect once its reply is out, as QEMU's: the process may end at
            // once after it.
            if quits {
                shared.quit.store(true, Ordering::Release);
            }
            if !sent {
                break 'connection;
            }
        }
    }
    let mut clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
    clients.retain(|c| !Arc::ptr_eq(c, &connection));
}

/// One request's reply (`{"return": ...}` or `{"error": ...}`, with the request's `id`) on a
/// connection that has `negotiated` or not, whether it completes the negotiation, and whether
/// it is an accepted `quit` (which takes effect once the reply is out). Public as the `qmp`
/// fuzz target's entry (with a [`Shared`] without a VM, nothing a request does reaches a VM or
/// the network).
pub fn request(text: &[u8], negotiated: bool, shared: &Shared) -> (Value, bool, bool) {
    let value: Value = match serde_json::from_slice(text) {
        Ok(value) => value,
        Err(e) => {
            return (
                QmpError::generic(format!("JSON parse error, {e}")).reply(None),
                false,
                false,
            );
        }
    };
    let Value::Object(mut request) = value else {
        return (
            QmpError::generic("QMP input must be a JSON object").reply(None),
            false,
            false,
        );
    };
    let id = request.remove("id");
    let mut negotiates = false;
    let mut quits = false;
    let result = parse_command(&mut request).and_then(|(name, arguments)| {
        match (name.as_str(), negotiated) {
            ("qmp_capabilities", false) => {
                commands::negotiate(arguments)?;
                negotiates = true;
                Ok(json!({}))
            }
            ("qmp_capabilities", true) => Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            (_, false) => Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )),
            (name, true) => {
                let result = commands::execute(name, arguments, shared);
                quits = name == "quit" && result.is_ok();
                result
            }
        }
    });
    let reply = match result {
        Ok(value) => {
            let mut reply = json!({ "return": value });
            if let (Some(id), Some(map)) = (id, reply.as_object_mut()) {
                map.insert("id".into(), id);
            }
            reply
        }
        Err(e) => e.reply(id),
    };
    (reply, negotiates, quits)
}

/// `execute` and `arguments` out of a request object, refusing any other member.
fn parse_command(
    request: &mut Map<String, Value>,
) -> Result<(String, Map<String, Value>), QmpError> {
    let name = match request.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ));
        }
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
    };
    let arguments = match request.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ));
        }
    };
    if let Some(member) = request.keys().next() {
        return Err(QmpError::generic(format!(
            "QMP input member '{member}' is unexpected"
        )));
    }
    Ok((name, arguments))
}
