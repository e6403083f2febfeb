//! The property of the `qmp` fuzz target, shared with its stable twin (`tests/qmp_fuzz.rs`):
//! any bytes, as what a client sends on the control socket of `vmig run --api`, split into
//! reads anywhere, go through the QMP framer (`Framer::feed`) and the request handling a
//! connection does (`server::request`: JSON, `execute` / `arguments` / `id`, the negotiation,
//! each command's argument checks, `parse_port_ops`) against a control socket without a VM,
//! and never panic:
//!
//! - the framer finds the same frames however the bytes are split into reads (all at once,
//!   byte by byte, in chunks of any size);
//! - every frame gets one reply, one line of valid JSON holding `return` or `error` (and the
//!   request's `id` when it had one, nothing else); an error has QEMU's class and a
//!   description that says something;
//! - before `qmp_capabilities` succeeds, every other command is refused as `CommandNotFound`;
//! - the ops of `x-vmig-guest-port-io`, parsed alone, are refused with the form they must
//!   take, or are at most `MAX_PORT_OPS` operations that read back the same when written out.
//!
//! The first byte of an input says how the rest is read: even, as the client's bytes; odd, as
//! a script that [`build`] turns into requests (known commands with their argument names and
//! values of every JSON type, in any framing), so that inputs reach the commands' checks.
//! Includes `crate::script`.

use serde_json::{Map, Value, json};
use vmig::qmp::commands::parse_port_ops;
use vmig::qmp::framing::{Frame, Framer};
use vmig::qmp::names::{CAPABILITIES, PARAMETERS};
use vmig::qmp::server::{Shared, request};
use vmig_kvm::PortOp;
use vmig_kvm::guest::MAX_PORT_OPS;

use crate::script::Script;

/// Every command vmig answers after the negotiation (the stable twin checks the list against
/// `query-commands`).
pub const COMMANDS: &[&str] = &[
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-cancel",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "query-migrate",
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-version",
    "query-commands",
    "x-vmig-guest-port-io",
    "x-vmig-query-devices",
];

/// What one input did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Frames the framer found.
    pub frames: usize,
    /// Replies with `return`.
    pub returned: usize,
    /// Replies with `error`, by class: `GenericError`, `CommandNotFound`.
    pub errors: [usize; 2],
    /// Whether the connection negotiated.
    pub negotiated: bool,
    /// Port ops parsed (`Some(true)`) or refused (`Some(false)`), when the input had some.
    pub port_ops: Option<bool>,
}

/// Checks one input (the fuzz target's body).
pub fn check(data: &[u8]) -> Outcome {
    match data.split_first() {
        Some((mode, script)) if mode & 1 == 1 => {
            let (bytes, split, ops) = build(script);
            let mut outcome = session(&bytes, split);
            outcome.port_ops = Some(port_ops(&ops));
            outcome
        }
        Some((split, bytes)) => session(bytes, usize::from(*split)),
        None => session(&[], 1),
    }
}

/// The frames of `bytes` fed in reads of `chunk` bytes.
fn frames(bytes: &[u8], chunk: usize) -> Vec<Frame> {
    let mut framer = Framer::default();
    bytes
        .chunks(chunk.max(1))
        .flat_map(|read| framer.feed(read))
        .collect()
}

/// One connection that sends `bytes`, checked: its frames in any split, each frame's reply.
pub fn session(bytes: &[u8], split: usize) -> Outcome {
    let whole = frames(bytes, bytes.len());
    assert_eq!(frames(bytes, 1), whole, "byte by byte");
    assert_eq!(frames(bytes, split), whole, "in reads of {split} bytes");
    let shared = Shared::new(None, false, false);
    let mut outcome = Outcome {
        frames: whole.len(),
        ..Outcome::default()
    };
    for frame in whole {
        let (reply, negotiates, quits) = match &frame {
            Frame::Text(text) => request(text, outcome.negotiated, &shared),
            Frame::Invalid(why) => {
                assert!(!why.trim().is_empty(), "an invalid frame with no reason");
                // What the server sends for it.
                (
                    vmig::qmp::commands::QmpError::generic(why.clone()).reply(None),
                    false,
                    false,
                )
            }
        };
        let request = match &frame {
            Frame::Text(text) => serde_json::from_slice::<Value>(text).ok(),
            Frame::Invalid(_) => None,
        };
        check_reply(&reply, request.as_ref(), outcome.negotiated, &mut outcome);
        // Only an accepted `quit` ends the process, once its reply is out.
        if quits {
            let execute = request.as_ref().and_then(|r| r.get("execute"));
            assert!(
                execute == Some(&Value::from("quit")) && reply.get("return").is_some(),
                "a request that is not an accepted quit would end the process: {reply}"
            );
        }
        if negotiates {
            assert!(!outcome.negotiated, "negotiated twice");
            assert!(
                reply.get("return").is_some(),
                "a refusal negotiated: {reply}"
            );
            outcome.negotiated = true;
        }
    }
    outcome
}

/// Asserts that `reply` is one a client can take, for `request` (when it was JSON) on a
/// connection that had `negotiated` or not.
fn check_reply(reply: &Value, request: Option<&Value>, negotiated: bool, outcome: &mut Outcome) {
    let line = reply.to_string();
    assert!(
        !line.contains(['\n', '\r']),
        "a reply must be one line: {line}"
    );
    let again: Value = serde_json::from_str(&line).expect("a reply is valid JSON");
    assert_eq!(&again, reply);
    let Value::Object(members) = reply else {
        panic!("a reply that is not an object: {line}");
    };
    assert!(
        members
            .keys()
            .all(|k| ["return", "error", "id"].contains(&k.as_str())),
        "a reply with another member: {line}"
    );
    let id = request.and_then(|r| r.get("id"));
    assert_eq!(members.get("id"), id, "the id is the request's: {line}");
    match (members.get("return"), members.get("error")) {
        (Some(_), None) => {
            outcome.returned += 1;
            let execute = request.and_then(|r| r.get("execute"));
            if !negotiated {
                assert_eq!(
                    execute,
                    Some(&json!("qmp_capabilities")),
                    "before the negotiation, only qmp_capabilities succeeds: {line}"
                );
            }
        }
        (None, Some(Value::Object(error))) => {
            let class = error.get("class").and_then(Value::as_str);
            let desc = error.get("desc").and_then(Value::as_str);
            assert!(error.len() == 2, "an error with other members: {line}");
            assert!(
                desc.is_some_and(|d| !d.trim().is_empty()),
                "an error that says nothing: {line}"
            );
            match class {
                Some("GenericError") => outcome.errors[0] += 1,
                Some("CommandNotFound") => outcome.errors[1] += 1,
                _ => panic!("an error of no QEMU class: {line}"),
            }
            let execute = request
                .and_then(|r| r.get("execute"))
                .and_then(Value::as_str);
            if let (false, Some(name)) = (negotiated, execute)
                && name != "qmp_capabilities"
                && request.is_some_and(well_formed)
            {
                assert_eq!(class, Some("CommandNotFound"), "{line}");
            }
        }
        _ => panic!("a reply needs one of return and error: {line}"),
    }
}

/// Whether `request` is an object whose only members are a string `execute`, an object
/// `arguments` and an `id` (the requests that reach the negotiation check).
fn well_formed(request: &Value) -> bool {
    request.as_object().is_some_and(|members| {
        members.get("execute").is_some_and(Value::is_string)
            && members.get("arguments").is_none_or(Value::is_object)
            && members
                .keys()
                .all(|k| ["execute", "arguments", "id"].contains(&k.as_str()))
    })
}

/// Checks `parse_port_ops` on `text` alone; whether it parsed.
pub fn port_ops(text: &str) -> bool {
    match parse_port_ops(text) {
        Ok(ops) => {
            assert!(
                (1..=MAX_PORT_OPS).contains(&ops.len()),
                "{} ops from {text:?}",
                ops.len()
            );
            let written: Vec<String> = ops
                .iter()
                .map(|op| match op {
                    PortOp::Out { port, value } => format!("out:{port:#x}:{value:#x}"),
                    PortOp::In { port } => format!("in:{port}"),
                })
                .collect();
            assert_eq!(
                parse_port_ops(&written.join(",")).as_ref(),
                Ok(&ops),
                "{text:?} written out as {written:?}"
            );
            true
        }
        Err(why) => {
            assert!(
                why.contains("expected OP[,OP...]") || why.contains("a script holds at most"),
                "a refusal of {text:?} that does not say the form: {why}"
            );
            false
        }
    }
}

/// Argument names the commands take, and one they do not.
fn argument_names() -> Vec<&'static str> {
    let mut names = vec![
        "uri",
        "channels",
        "detach",
        "resume",
        "capabilities",
        "ops",
        "enable",
        "x-no-such-argument",
    ];
    names.extend(PARAMETERS);
    names
}

/// Ops for `x-vmig-guest-port-io` from `script`: valid operations, with a piece of one
/// replaced now and then.
fn ops_text(script: &mut Script<'_>) -> String {
    let count = script.below(MAX_PORT_OPS + 3);
    let mut ops: Vec<String> = (0..count)
        .map(|_| match script.byte() % 3 {
            0 => format!("out:{:#x}:{}", script.u16(), script.byte()),
            1 => format!("in:{}", script.u16()),
            _ => {
                let pieces = ["out", "in", "0x", ":", "", " ", "0xc000", "256", "-1", "x"];
                (0..script.below(4)).map(|_| script.pick(&pieces)).collect()
            }
        })
        .collect();
    if script.byte() % 8 == 7 {
        ops.push(String::new());
    }
    ops.join(",")
}

/// A JSON value from `script`: one of every type, the arguments' likely values among them.
fn value(script: &mut Script<'_>, depth: usize) -> Value {
    match script.byte() % 12 {
        0 => Value::Null,
        1 => json!(script.flag()),
        2 => json!(script.u64()),
        3 => json!(-i64::from(script.u16())),
        4 => json!(f64::from(script.u16()) / 4.0),
        5 => json!(script.pick(&["tcp:127.0.0.1:1", "unix:/nonexistent/vmig", "x:y", ""])),
        6 => json!(ops_text(script)),
        7 => json!(String::from_utf8_lossy(script.take(12))),
        8 => json!([{"capability": script.pick(CAPABILITIES), "state": script.flag()}]),
        9 => {
            json!([{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/nonexistent/vmig"}}])
        }
        10 if depth < 3 => Value::Array(
            (0..script.below(3))
                .map(|_| value(script, depth + 1))
                .collect(),
        ),
        _ if depth < 3 => {
            let mut members = Map::new();
            for _ in 0..script.below(3) {
                members.insert(
                    script.pick(&argument_names()).into(),
                    value(script, depth + 1),
                );
            }
            Value::Object(members)
        }
        _ => json!(script.u16()),
    }
}

/// A client's bytes from `script`: requests (the negotiation, known commands, their
/// arguments, ids, members that do not belong), each written out as JSON or broken, with
/// whitespace or none between them; the size of the reads to split them into; and a text of
/// port ops checked alone.
pub fn build(script: &[u8]) -> (Vec<u8>, usize, String) {
    let mut script = Script::new(script);
    let split = 1 + script.below(64);
    let ops = ops_text(&mut script);
    let mut bytes = Vec::new();
    let names = argument_names();
    while !script.is_empty() {
        let mut request = Map::new();
        let execute = match script.byte() % 8 {
            0 => json!("qmp_capabilities"),
            1 => value(&mut script, 2),
            _ => json!(script.pick(COMMANDS)),
        };
        if script.byte() % 16 != 15 {
            request.insert("execute".into(), execute);
        }
        if script.flag() {
            let mut arguments = Map::new();
            for _ in 0..script.below(4) {
                arguments.insert(script.pick(&names).into(), value(&mut script, 1));
            }
            request.insert("arguments".into(), Value::Object(arguments));
        }
        if script.byte().is_multiple_of(4) {
            request.insert("id".into(), value(&mut script, 2));
        }
        if script.byte() % 16 == 15 {
            request.insert("unexpected".into(), json!(1));
        }
        let mut text = Value::Object(request).to_string().into_bytes();
        match script.byte() % 16 {
            // Cut short, a byte replaced, or a stray token before it.
            13 => text.truncate(script.below(text.len() + 1)),
            14 => {
                let at = script.below(text.len());
                text[at] = script.byte();
            }
            15 => bytes.extend_from_slice(b"42 "),
            _ => {}
        }
        bytes.extend(text);
        bytes.extend_from_slice(script.pick(&[&b""[..], b"\n", b"\r\n", b" \t "]));
    }
    (bytes, split, ops)
}
