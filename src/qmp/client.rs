//! A QMP client: connects, reads the greeting, negotiates, and runs commands, keeping the
//! events that arrive in between. It drives vmig (`vmig ctl`, `vmig migrate`, `vmig demo`) and
//! QEMU (`vmig bench migrate`) alike.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A negotiated QMP connection.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Value>,
    /// The server's greeting.
    pub greeting: Value,
}

impl QmpClient {
    /// Connects to `path` (retrying until `wait` has passed, for a VM that is still
    /// starting), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, wait: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut client = Self {
            writer: stream.try_clone().map_err(|e| e.to_string())?,
            reader: BufReader::new(stream),
            next_id: 0,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        client.greeting = client.read()?;
        if client.greeting.get("QMP").is_none() {
            return Err(format!(
                "{} greeted with {}: expected a QMP greeting {{\"QMP\": ...}}",
                path.display(),
                client.greeting
            ));
        }
        client.execute("qmp_capabilities", json!({}))?;
        Ok(client)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the QMP server closed the connection".into()),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("the QMP server sent `{}`: {e}", line.trim_end())),
            Err(e) => Err(format!("reading from the QMP server: {e}")),
        }
    }

    /// Sends a command and returns its whole reply (`{"return": ...}` or `{"error": ...}`);
    /// events that arrive first are kept for [`Self::take_events`].
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = format!("vmig-{}", self.next_id);
        let request = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.writer, "{request}").map_err(|e| format!("sending {command}: {e}"))?;
        loop {
            let message = self.read()?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if message.get("id").and_then(Value::as_str) == Some(id.as_str()) {
                return Ok(message);
            } else if message.get("return").is_some() || message.get("error").is_some() {
                return Err(format!(
                    "the reply to {command} carries another id: {message}"
                ));
            }
        }
    }

    /// Like [`Self::call`], turning an error reply into `Err(desc)`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let reply = self.call(command, arguments)?;
        if let Some(err) = reply.get("error") {
            return Err(format!(
                "{command}: {}",
                err.get("desc").and_then(Value::as_str).unwrap_or("error")
            ));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The events received so far, oldest first, removing them.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}
