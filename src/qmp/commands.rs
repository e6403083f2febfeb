//! The QMP commands vmig answers, by QEMU's names and with QEMU's argument names, and their
//! argument checking (unknown, missing and mistyped arguments are refused as QEMU refuses
//! them).

use std::time::Duration;

use serde_json::{Map, Value, json};
use vmig_kvm::PortOp;
use vmig_kvm::guest::MAX_PORT_OPS;
use vmig_migration::Status;
use vmig_migration::report::MAX_CONNECTIONS;
use vmig_migration::transport::Uri;

use super::names::{self, CAPABILITIES, PARAMETERS};
use super::server::Shared;

/// A QMP error reply: QEMU's class and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, ...
    pub class: &'static str,
    /// What was wrong, and what was expected.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }

    /// The reply, with the request's `id` when it had one.
    pub fn reply(&self, id: Option<Value>) -> Value {
        let mut reply = json!({"error": {"class": self.class, "desc": self.desc}});
        if let (Some(id), Some(map)) = (id, reply.as_object_mut()) {
            map.insert("id".into(), id);
        }
        reply
    }
}

type Handler = fn(&mut Arguments, &Shared) -> Result<Value, QmpError>;

/// Every command after negotiation: its name, the arguments it takes, and what answers it.
/// Arguments are checked against the list before anything is done, so a request with an
/// unexpected one has no effect.
const COMMANDS: &[(&str, &[&str], Handler)] = &[
    ("migrate", &["uri", "channels", "detach", "resume"], migrate),
    ("migrate-incoming", &["uri", "channels"], migrate_incoming),
    ("migrate_cancel", &[], migrate_cancel),
    ("migrate-cancel", &[], migrate_cancel),
    ("migrate-set-parameters", PARAMETERS, set_parameters),
    ("query-migrate-parameters", &[], query_parameters),
    (
        "migrate-set-capabilities",
        &["capabilities"],
        set_capabilities,
    ),
    ("query-migrate-capabilities", &[], query_capabilities),
    ("query-migrate", &[], query_migrate),
    ("query-status", &[], query_status),
    ("stop", &[], stop),
    ("cont", &[], cont),
    ("quit", &[], quit),
    ("query-version", &[], query_version),
    ("query-commands", &[], query_commands),
    (GUEST_PORT_IO, &["ops"], guest_port_io),
    ("x-vmig-query-devices", &[], query_devices),
];

/// vmig's own command (QEMU has none like it, hence the `x-vmig-` prefix of vmig's
/// extensions): the guest does port I/O to its devices' I/O BARs itself.
pub const GUEST_PORT_IO: &str = "x-vmig-guest-port-io";

/// How long vCPU 0 has to take a port script (it does at its next batch boundary, within
/// milliseconds when the VM runs).
const PORT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The syntax of `x-vmig-guest-port-io`'s `ops`, for its errors.
const PORT_OPS_FORM: &str = "expected OP[,OP...] with OP out:PORT:BYTE or in:PORT (numbers in \
     decimal or 0x hex), e.g. out:0xc000:0x76,in:0xc005,in:0xc000";

/// Parses `ops` of `x-vmig-guest-port-io`: `out:PORT:BYTE` and `in:PORT`, comma-separated, at
/// most [`MAX_PORT_OPS`].
pub fn parse_port_ops(text: &str) -> Result<Vec<PortOp>, String> {
    fn number(text: &str, what: &str, max: u64) -> Result<u64, String> {
        let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        value
            .ok()
            .filter(|&v| v <= max)
            .ok_or_else(|| format!("{what} `{text}` is not a number from 0 to {max:#x}"))
    }
    let port = |text: &str| {
        number(text, "port", u64::from(u16::MAX)).map(|p| u16::try_from(p).unwrap_or(u16::MAX))
    };
    if text.trim().is_empty() {
        return Err(format!("ops is empty: {PORT_OPS_FORM}"));
    }
    let mut ops = Vec::new();
    for (n, op) in text.split(',').enumerate() {
        let bad = |why: String| format!("ops: operation {} `{op}`: {why}; {PORT_OPS_FORM}", n + 1);
        let parsed = match op.trim().split(':').collect::<Vec<_>>().as_slice() {
            ["out", p, byte] => PortOp::Out {
                port: port(p).map_err(bad)?,
                value: number(byte, "byte", 0xff)
                    .map(|b| u8::try_from(b).unwrap_or(u8::MAX))
                    .map_err(bad)?,
            },
            ["in", p] => PortOp::In {
                port: port(p).map_err(bad)?,
            },
            _ => return Err(bad("not an operation".into())),
        };
        ops.push(parsed);
    }
    if ops.len() > MAX_PORT_OPS {
        return Err(format!(
            "ops: {} operations: a script holds at most {MAX_PORT_OPS}",
            ops.len()
        ));
    }
    Ok(ops)
}

/// The arguments of one command, taken one by one; what is left over is refused.
pub struct Arguments(Map<String, Value>);

impl Arguments {
    fn take<T>(
        &mut self,
        key: &str,
        expected: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, QmpError> {
        match self.0.remove(key) {
            None => Ok(None),
            Some(value) => convert(&value).map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{key}', expected: {expected}"
                ))
            }),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        self.take(key, "string", |v| v.as_str().map(String::from))
    }

    fn number(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        self.take(key, "integer", Value::as_u64)
    }

    fn flag(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        self.take(key, "boolean", Value::as_bool)
    }

    fn array(&mut self, key: &str) -> Result<Option<Vec<Value>>, QmpError> {
        self.take(key, "array", |v| v.as_array().cloned())
    }

    /// Refuses any argument not in `allowed`.
    fn check(&self, allowed: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) if allowed.is_empty() => Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected: this command takes no arguments"
            ))),
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected: expected {}",
                allowed.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// `qmp_capabilities`: vmig offers no optional capability (no out-of-band execution).
pub fn negotiate(arguments: Map<String, Value>) -> Result<(), QmpError> {
    let mut arguments = Arguments(arguments);
    arguments.check(&["enable"])?;
    let enable = arguments.array("enable")?.unwrap_or_default();
    match enable.first() {
        Some(capability) => Err(QmpError::generic(format!(
            "Capability '{}' not available: vmig offers none",
            capability.as_str().unwrap_or("?")
        ))),
        None => Ok(()),
    }
}

/// Runs command `name` (after negotiation).
pub fn execute(
    name: &str,
    arguments: Map<String, Value>,
    shared: &Shared,
) -> Result<Value, QmpError> {
    let Some((_, allowed, handler)) = COMMANDS.iter().find(|(n, _, _)| *n == name) else {
        return Err(QmpError::command_not_found(format!(
            "The command {name} has not been found"
        )));
    };
    let mut arguments = Arguments(arguments);
    arguments.check(allowed)?;
    handler(&mut arguments, shared)
}

/// `query-version`'s answer (and the greeting's `version`): vmig's own version number.
pub fn version() -> Value {
    let mut parts = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    let (major, minor, micro) = (next(), next(), next());
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": concat!("vmig ", env!("CARGO_PKG_VERSION")),
    })
}

/// The URI of `migrate` or `migrate-incoming`: `uri`, or QEMU's `channels` form with one
/// `main` channel of transport `socket` (`inet` host and port, or `unix` path).
fn target(arguments: &mut Arguments) -> Result<Uri, QmpError> {
    let uri = arguments.string("uri")?;
    let channels = arguments.array("channels")?;
    let text = match (uri, channels) {
        (Some(uri), None) => uri,
        (None, Some(channels)) => channel_uri(&channels)?,
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "need either 'uri' or 'channels' argument, not both",
            ));
        }
        (None, None) => return Err(QmpError::generic("Parameter 'uri' is missing")),
    };
    text.parse()
        .map_err(|e: vmig_migration::MigrationError| QmpError::generic(e.to_string()))
}

fn channel_uri(channels: &[Value]) -> Result<String, QmpError> {
    let [channel] = channels else {
        return Err(QmpError::generic(format!(
            "{} channels: expected one, of channel-type 'main'",
            channels.len()
        )));
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(String::from);
    if text(channel, "channel-type").as_deref() != Some("main") {
        return Err(QmpError::generic(
            "expected a channel of channel-type 'main'",
        ));
    }
    let addr = channel.get("addr").cloned().unwrap_or(Value::Null);
    match (
        text(&addr, "transport").as_deref(),
        text(&addr, "type").as_deref(),
    ) {
        (Some("socket"), Some("inet")) => match (text(&addr, "host"), text(&addr, "port")) {
            (Some(host), Some(port)) => Ok(format!("tcp:{host}:{port}")),
            _ => Err(QmpError::generic("an inet address needs 'host' and 'port'")),
        },
        (Some("socket"), Some("unix")) => text(&addr, "path")
            .map(|path| format!("unix:{path}"))
            .ok_or_else(|| QmpError::generic("a unix address needs 'path'")),
        _ => Err(QmpError::generic(
            "channel address: expected transport 'socket' of type 'inet' or 'unix'",
        )),
    }
}

fn migrate(arguments: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    let uri = target(arguments)?;
    let _detach = arguments.flag("detach")?;
    if arguments.flag("resume")? == Some(true) {
        return Err(QmpError::generic(
            "resume: vmig has no postcopy, so there is no paused migration to resume",
        ));
    }
    if shared.incoming {
        return Err(QmpError::generic(
            "this VM is a migration destination; migrate from the source",
        ));
    }
    // The settings lock is released before the migration starts: the progress listener takes it.
    let params = shared
        .settings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .params(uri.to_string());
    params
        .check()
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let machine = shared.machine().ok_or_else(|| {
        QmpError::generic("the VM is still starting: try again once query-status says running")
    })?;
    let mut slot = shared.migration.lock().unwrap_or_else(|e| e.into_inner());
    if shared.migrating() || slot.as_ref().is_some_and(|t| !t.is_finished()) {
        return Err(QmpError::generic("There's a migration process in progress"));
    }
    if shared.progress.report().committed {
        return Err(QmpError::generic(
            "the VM was already handed over to a destination",
        ));
    }
    // Refused at once, the VM untouched, as QEMU's migration blockers do.
    let blockers = machine.migration_blockers();
    if !blockers.is_empty() {
        return Err(QmpError::generic(format!(
            "the VM cannot migrate: {}",
            blockers.join("; ")
        )));
    }
    let progress = shared.progress.clone();
    progress.begin();
    *slot = Some(std::thread::spawn(move || {
        let _ = vmig_migration::migrate(&machine, &params, &progress);
    }));
    Ok(json!({}))
}

fn migrate_incoming(arguments: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    let uri = target(arguments)?;
    shared.start_incoming(uri)?;
    Ok(json!({}))
}

fn migrate_cancel(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    shared.progress.cancel();
    Ok(json!({}))
}

fn refuse_while_migrating(shared: &Shared) -> Result<(), QmpError> {
    if shared.migrating() {
        return Err(QmpError::generic(
            "There's a migration process in progress: vmig applies parameters and \
             capabilities when a migration starts",
        ));
    }
    Ok(())
}

fn set_parameters(arguments: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    refuse_while_migrating(shared)?;
    // Edited under the lock: two clients setting parameters at once lose neither's.
    let mut settings = shared.settings.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = settings.clone();
    if let Some(ms) = arguments.number("downtime-limit")? {
        next.downtime_ms = ms;
    }
    if let Some(bytes) = arguments.number("max-bandwidth")? {
        next.max_bandwidth = bytes;
    }
    if let Some(channels) = arguments.number("multifd-channels")? {
        next.multifd_channels = u16::try_from(channels)
            .ok()
            .filter(|c| (1..=MAX_CONNECTIONS).contains(c))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "multifd-channels {channels}: expected 1 to {MAX_CONNECTIONS}"
                ))
            })?;
    }
    if let Some(seconds) = arguments.number("x-vmig-timeout")? {
        next.timeout_s = seconds;
    }
    if let Some(on) = arguments.flag("x-vmig-verify-memory")? {
        next.verify_memory = on;
    }
    if let Some(on) = arguments.flag("x-vmig-device-dirty-tracking")? {
        next.device_dirty_tracking = on;
    }
    // The engine's own check, so that a bad value is refused here and not at `migrate`.
    next.params("unix:/check".into())
        .check()
        .map_err(|e| QmpError::generic(e.to_string()))?;
    *settings = next;
    Ok(json!({}))
}

fn query_parameters(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    Ok(shared
        .settings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .parameters())
}

fn set_capabilities(arguments: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    refuse_while_migrating(shared)?;
    let list = arguments
        .array("capabilities")?
        .ok_or_else(|| QmpError::generic("Parameter 'capabilities' is missing"))?;
    let mut settings = shared.settings.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = settings.clone();
    for entry in &list {
        let name = entry.get("capability").and_then(Value::as_str);
        let state = entry.get("state").and_then(Value::as_bool);
        let (Some(name), Some(state)) = (name, state) else {
            return Err(QmpError::generic(format!(
                "capability {entry}: expected {{\"capability\": NAME, \"state\": BOOL}}"
            )));
        };
        let flag = next.capability_mut(name).ok_or_else(|| {
            QmpError::generic(format!(
                "Capability '{name}' is not supported by vmig: it has {}",
                CAPABILITIES.join(", ")
            ))
        })?;
        *flag = state;
    }
    *settings = next;
    Ok(json!({}))
}

fn query_capabilities(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    Ok(shared
        .settings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .capabilities())
}

fn query_migrate(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    Ok(names::to_query_migrate(&shared.progress.report()))
}

/// `query-status`: QEMU's run states. A source whose migration committed is `postmigrate`
/// (its VM never runs again); when the commit's outcome is unknown, `x-vmig-outcome` says so.
fn query_status(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    let report = shared.progress.report();
    let migration = report.status;
    let handed_over = !shared.incoming && report.committed && migration.is_final();
    let state = match shared.machine() {
        // The VM that arrived runs from the moment the migration completed, a moment before
        // `vmig run` takes it over.
        None if shared.incoming && migration == Status::Completed => "running",
        None => "inmigrate",
        Some(_) if shared.incoming && migration != Status::Completed => "inmigrate",
        Some(_) if handed_over => "postmigrate",
        Some(m) if m.vm.is_paused() => "paused",
        Some(_) => "running",
    };
    let mut answer = json!({ "status": state, "running": state == "running", "singlestep": false });
    if handed_over
        && migration == Status::Unknown
        && let Some(map) = answer.as_object_mut()
    {
        map.insert(
            "x-vmig-outcome".into(),
            json!(format!(
                "unknown: {}",
                report
                    .error
                    .as_deref()
                    .unwrap_or("the destination did not answer the commit")
            )),
        );
    }
    Ok(answer)
}

fn pause_or_resume(stop: bool, shared: &Shared) -> Result<Value, QmpError> {
    if shared.migrating() {
        return Err(QmpError::generic(
            "a migration is under way: cancel it first (migrate_cancel)",
        ));
    }
    let machine = shared
        .machine()
        .ok_or_else(|| QmpError::generic("no VM yet: this destination waits for a migration"))?;
    if !shared.incoming && shared.progress.report().committed {
        return Err(QmpError::generic(
            "the VM was handed over to the destination (committed); it must not run here again",
        ));
    }
    let was_paused = machine.vm.is_paused();
    if stop {
        machine.vm.pause()
    } else {
        machine.vm.resume()
    }
    .map_err(|e| QmpError::generic(e.to_string()))?;
    if was_paused != stop {
        shared.emit(if stop { "STOP" } else { "RESUME" }, None);
    }
    Ok(json!({}))
}

fn stop(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    pause_or_resume(true, shared)
}

fn cont(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    pause_or_resume(false, shared)
}

/// `quit`: the server sets [`Shared::quit`] once this reply is out.
fn quit(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    shared.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    Ok(json!({}))
}

/// `x-vmig-guest-port-io ops=...`: the running guest's vCPU 0 does `ops` with real `out` and
/// `in` instructions, each port inside an I/O BAR of a device of this VM; the reply lists the
/// bytes the `in`s read, in order (`{"read": [1, 118]}`).
fn guest_port_io(arguments: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    let text = arguments
        .string("ops")?
        .ok_or_else(|| QmpError::generic(format!("Parameter 'ops' is missing: {PORT_OPS_FORM}")))?;
    let ops = parse_port_ops(&text).map_err(QmpError::generic)?;
    let machine = shared
        .machine()
        .ok_or_else(|| QmpError::generic("no VM yet: this destination waits for a migration"))?;
    if !shared.incoming && shared.progress.report().committed {
        return Err(QmpError::generic(
            "the VM was handed over to the destination (committed): its guest runs there",
        ));
    }
    // The script lives in guest RAM until vCPU 0 has run it: held against `migrate` (which
    // takes this lock to start), so that no script crosses to the destination half done.
    let slot = shared.migration.lock().unwrap_or_else(|e| e.into_inner());
    if shared.migrating() || slot.as_ref().is_some_and(|t| !t.is_finished()) {
        return Err(QmpError::generic(
            "a migration is under way: the guest's port I/O would cross it (after it, or \
             after migrate_cancel, try again)",
        ));
    }
    let read = machine
        .run_port_script(&ops, PORT_SCRIPT_TIMEOUT)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    drop(slot);
    Ok(json!({ "read": read }))
}

/// `x-vmig-query-devices`: each device of the VM, in `--device` order: its name, kind,
/// migration protocol (or why it cannot migrate), v2 migration state when it has one to
/// tell, and its BARs in the guest.
fn query_devices(_: &mut Arguments, shared: &Shared) -> Result<Value, QmpError> {
    let Some(machine) = shared.machine() else {
        return Ok(json!([]));
    };
    let devices = machine.devices.iter().map(|d| {
        let (protocol, state) = match d.migration() {
            Ok(steps) => (
                json!(d.protocol_name()),
                match steps.state() {
                    Ok(state) => json!(state.map(|s| s.to_string())),
                    Err(e) => json!({ "error": e.to_string() }),
                },
            ),
            Err(why) => (json!({ "blocked": why.to_string() }), Value::Null),
        };
        json!({
            "name": d.name,
            "kind": d.device.kind().to_string(),
            "protocol": protocol,
            "migration-state": state,
            "bars": d.bars,
        })
    });
    Ok(Value::Array(devices.collect()))
}

fn query_version(_: &mut Arguments, _: &Shared) -> Result<Value, QmpError> {
    Ok(version())
}

fn query_commands(_: &mut Arguments, _: &Shared) -> Result<Value, QmpError> {
    let mut names: Vec<&str> = COMMANDS.iter().map(|(n, _, _)| *n).collect();
    names.push("qmp_capabilities");
    Ok(Value::Array(
        names.into_iter().map(|n| json!({ "name": n })).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ops_parse_strictly() {
        assert_eq!(
            parse_port_ops("out:0xc000:0x76, out:49152:109,in:0xC005,in:0xc000").unwrap(),
            [
                PortOp::Out {
                    port: 0xc000,
                    value: 0x76
                },
                PortOp::Out {
                    port: 0xc000,
                    value: 109
                },
                PortOp::In { port: 0xc005 },
                PortOp::In { port: 0xc000 },
            ]
        );
        for (bad, why) in [
            ("", "ops is empty"),
            ("in:0xc000,", "operation 2 ``: not an operation"),
            ("read:0xc000", "operation 1 `read:0xc000`: not an operation"),
            ("out:0xc000", "operation 1 `out:0xc000`: not an operation"),
            ("in:0xc000:1", "not an operation"),
            (
                "in:0x10000",
                "port `0x10000` is not a number from 0 to 0xffff",
            ),
            (
                "out:0xc000:256",
                "byte `256` is not a number from 0 to 0xff",
            ),
            ("out:0xc000:-1", "byte `-1` is not a number"),
            ("in:port", "port `port` is not a number"),
            ("in:0x", "port `0x` is not a number"),
        ] {
            let err = parse_port_ops(bad).unwrap_err();
            assert!(
                err.contains(why) && err.contains(PORT_OPS_FORM),
                "{bad}: {err}"
            );
        }
        let long = vec!["in:0xc005"; MAX_PORT_OPS + 1].join(",");
        assert!(
            parse_port_ops(&long)
                .unwrap_err()
                .contains("65 operations: a script holds at most 64")
        );
    }
}
