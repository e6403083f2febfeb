//! `vmig relay`: a relay for the migration stream that injects one fault, so that a network
//! failure can be reproduced at an exact record.
//!
//! It owns the relay's whole life: the fault's syntax ([`Fault`]), listening, one outgoing
//! connection to the target per accepted connection, and the forwarding of both directions
//! record by record. It reads the stream's framing only (the hello, then each record's header
//! and payload, as `vmig_migration::stream` defines them); it checks no checksum and decodes
//! no payload, so what reaches a peer is what the other sent, except for the fault. The
//! migration protocol itself is the engine's.
//!
//! The connections of one migration are grouped by the session their hellos carry; a fault
//! is counted across every connection in its direction, fires once in the relay's life, and
//! acts on every connection of the migration whose record it hit:
//!
//! ```text
//! source ──► relay ──► destination      a connection per source connection
//!   hello (32 bytes, parsed: channel, channels, session) ─────► forwarded
//!   record (24-byte header, payload) ─► the fault's record? ─► forwarded, or
//!        cut-before: not forwarded; every connection of the migration shut down both ways
//!        cut-after:  forwarded whole; then every connection shut down both ways
//!        corrupt:    one bit flipped (the last payload byte's, a Pages record's first, or
//!                    the header checksum's when the payload is empty), forwarded;
//!                    forwarding goes on
//!        stall:      it and everything after it in that direction held, never forwarded;
//!                    the connections stay open (a network that blackholes)
//! ```
//!
//! A connection whose first bytes are not a vmig hello, or a header this relay cannot frame
//! (an unknown kind, a length over the stream's limit), is relayed as plain bytes from there
//! on, so the peer gives its own refusal.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use vmig_migration::stream::{HEADER_SIZE, HELLO_SIZE, Hello, Kind, MAX_RECORD};
use vmig_migration::transport::{self, Conn, Listener, Uri};

/// The forms of `--fault`, as its refusals list them.
const FAULT_FORMS: &str = "none, cut-before:KIND[:N][:DIR], cut-after:KIND[:N][:DIR], \
     corrupt:KIND[:N][:DIR] or stall:KIND[:N][:DIR] (KIND a record kind such as Config, Pages, \
     Commit or Resumed; N counts from 1, default 1; DIR to-destination or to-source, default \
     the kind's own)";
/// How often waiting threads look at the relay's state.
const POLL: Duration = Duration::from_millis(10);
/// Bytes copied at once when relaying unparsed.
const RAW_CHUNK: usize = 64 << 10;

/// Relay migrations from LISTEN to TARGET, injecting one fault into the stream.
///
/// Every connection accepted on LISTEN gets one to TARGET; both directions are forwarded
/// record by record. Prints `relaying LISTEN -> TARGET` once it listens (with the port the
/// system chose for tcp:HOST:0), a line per connection, and `fault: ...` when the fault
/// fires. Runs until SIGTERM or Ctrl-C, or with --once until the first migration's
/// connections have all closed.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Where sources connect: tcp:HOST:PORT (PORT 0: one the system chooses) or unix:PATH.
    listen: String,
    /// The destination (`vmig run --incoming` there): tcp:HOST:PORT or unix:PATH.
    target: String,
    /// none (default), cut-before:KIND[:N][:DIR], cut-after:KIND[:N][:DIR],
    /// corrupt:KIND[:N][:DIR] or stall:KIND[:N][:DIR]: the N-th record of KIND (Config,
    /// Ready, Pages, PassEnd, DeviceData, DeviceEnd, VcpuState, Digests, Complete, Accepted,
    /// Commit, Resumed, Result, Abort, InitialSent, SwitchoverAck; any case) travelling in
    /// direction DIR (to-destination or to-source; default the kind's own, Abort needs one),
    /// counted across all connections, is not delivered and every connection of its migration
    /// closes (cut-before), is delivered and then they close (cut-after), has one bit flipped
    /// (corrupt), or is held with everything after it in that direction (stall).
    #[arg(long, value_name = "SPEC", default_value = "none")]
    fault: String,
    /// Exit once the first migration's connections have all closed.
    #[arg(long)]
    once: bool,
}

pub fn run(args: &RelayArgs) -> Result<ExitCode, String> {
    let fault: Fault = args.fault.parse()?;
    let listen: Uri = args
        .listen
        .parse()
        .map_err(|e: vmig_migration::MigrationError| format!("LISTEN: {e}"))?;
    let target: Uri = args
        .target
        .parse()
        .map_err(|e: vmig_migration::MigrationError| format!("TARGET: {e}"))?;
    let stop = vmig_vfio_user::server::stop_on_termination()
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let relay = Relay::start(&listen, target.clone(), fault, |line| println!("{line}"))?;
    println!("relaying {} -> {target}", relay.uri());
    while !(stop.load(Ordering::Acquire) || args.once && relay.first_migration_over()) {
        std::thread::sleep(POLL);
    }
    if let (
        Fault::At {
            kind, direction, ..
        },
        None,
    ) = (fault, relay.fired())
    {
        println!(
            "stopped; the fault never fired: {} {} record(s) {direction} passed",
            relay.delivered(direction, kind),
            kind.name()
        );
    } else {
        println!("stopped");
    }
    relay.stop();
    Ok(ExitCode::SUCCESS)
}

/// A direction of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Source → destination.
    ToDestination,
    /// Destination → source.
    ToSource,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::ToDestination, Direction::ToSource];

    /// Its spelling in a fault spec.
    pub fn spec(self) -> &'static str {
        match self {
            Self::ToDestination => "to-destination",
            Self::ToSource => "to-source",
        }
    }

    /// The direction `kind` travels in; `None` for `Abort`, which goes either way.
    pub fn of(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Config
            | Kind::Pages
            | Kind::PassEnd
            | Kind::DeviceData
            | Kind::InitialSent
            | Kind::DeviceEnd
            | Kind::VcpuState
            | Kind::Digests
            | Kind::Complete
            | Kind::Commit => Some(Self::ToDestination),
            Kind::Ready | Kind::SwitchoverAck | Kind::Accepted | Kind::Resumed | Kind::Result => {
                Some(Self::ToSource)
            }
            Kind::Abort => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::ToDestination => 0,
            Self::ToSource => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ToDestination => "to the destination",
            Self::ToSource => "to the source",
        })
    }
}

/// What the fault does to its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Not delivered; every connection of the migration closes.
    CutBefore,
    /// Delivered whole; then every connection of the migration closes.
    CutAfter,
    /// Delivered with one bit flipped.
    Corrupt,
    /// Held, with everything after it in that direction; connections stay open.
    Stall,
}

impl FaultAction {
    const ALL: [FaultAction; 4] = [
        FaultAction::CutBefore,
        FaultAction::CutAfter,
        FaultAction::Corrupt,
        FaultAction::Stall,
    ];

    /// Its spelling in a fault spec.
    pub fn spec(self) -> &'static str {
        match self {
            Self::CutBefore => "cut-before",
            Self::CutAfter => "cut-after",
            Self::Corrupt => "corrupt",
            Self::Stall => "stall",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::CutBefore => "cut before",
            Self::CutAfter => "cut after",
            Self::Corrupt => "corrupt",
            Self::Stall => "stall at",
        }
    }
}

/// The fault a relay injects: none, or one action on the `nth` record of `kind` travelling
/// in `direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A plain relay.
    None,
    /// One action on one record.
    At {
        /// What happens to it.
        action: FaultAction,
        /// Its kind.
        kind: Kind,
        /// Which one of that kind in that direction, from 1, across all connections.
        nth: u64,
        /// Its direction.
        direction: Direction,
    },
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| format!("--fault `{s}`: {why}; expected {FAULT_FORMS}");
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self::None);
        }
        let mut fields = s.split(':');
        let action_text = fields.next().unwrap_or_default();
        let action = FaultAction::ALL
            .into_iter()
            .find(|a| a.spec().eq_ignore_ascii_case(action_text))
            .ok_or_else(|| bad(format!("unknown fault `{action_text}`")))?;
        let kind_text = fields
            .next()
            .ok_or_else(|| bad("no record kind".to_string()))?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(kind_text))
            .ok_or_else(|| bad(format!("unknown record kind `{kind_text}`")))?;
        let mut nth = None;
        let mut direction = None;
        for field in fields {
            if direction.is_some() {
                return Err(bad(format!("`{field}` after the direction")));
            }
            if let Some(d) = Direction::BOTH
                .into_iter()
                .find(|d| d.spec().eq_ignore_ascii_case(field))
            {
                direction = Some(d);
            } else if nth.is_none() {
                nth = Some(
                    field
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| {
                            bad(format!(
                                "`{field}` is neither a count from 1 nor a direction"
                            ))
                        })?,
                );
            } else {
                return Err(bad(format!("`{field}` is not a direction")));
            }
        }
        let direction = match (Direction::of(kind), direction) {
            (None, None) => {
                return Err(bad(format!(
                    "{} travels both ways: give to-destination or to-source",
                    kind.name()
                )));
            }
            (Some(own), Some(given)) if own != given => {
                return Err(bad(format!(
                    "{} travels {own} only, never {given}",
                    kind.name()
                )));
            }
            (_, Some(given)) => given,
            (Some(own), None) => own,
        };
        Ok(Self::At {
            action,
            kind,
            nth: nth.unwrap_or(1),
            direction,
        })
    }
}

impl fmt::Display for Fault {
    /// The spec that parses back to this fault.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::At {
                action,
                kind,
                nth,
                direction,
            } => write!(
                f,
                "{}:{}:{nth}:{}",
                action.spec(),
                kind.name(),
                direction.spec()
            ),
        }
    }
}

/// Counts of records per direction and kind.
type Counts = HashMap<(Direction, Kind), u64>;

/// What every thread of the relay shares.
struct Shared {
    fault: Fault,
    target: Uri,
    notify: Box<dyn Fn(&str) + Send + Sync>,
    stop: AtomicBool,
    next_connection: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

/// The relay's bookkeeping, under one lock.
#[derive(Default)]
struct State {
    /// Records of each kind read in each direction (what the fault counts).
    seen: Counts,
    /// Records forwarded as they came.
    delivered: Counts,
    /// The fault's record was found (set at once, so that no other record takes it too).
    fault_taken: bool,
    /// What the fault did, once it fired.
    fired: Option<String>,
    /// Every open connection pair.
    pairs: Vec<Arc<Pair>>,
    /// Migrations by session.
    sessions: HashMap<u64, Session>,
    /// The first migration's session, and whether all its connections have closed.
    first: Option<(u64, bool)>,
    /// The threads serving connections.
    threads: Vec<JoinHandle<()>>,
}

/// One migration's connections.
#[derive(Default)]
struct Session {
    /// Its connections still open.
    open: usize,
    /// A cut closed them: any later connection of it is closed at once.
    cut: bool,
    /// Directions a stall holds.
    held: [bool; 2],
}

/// An accepted connection and the one opened to the target for it.
struct Pair {
    id: u64,
    from_source: Conn,
    to_destination: Conn,
    /// Unset until its hello is read; then the session of the migration it belongs to, or
    /// `None` for a connection relayed raw (not a vmig stream).
    session: OnceLock<Option<u64>>,
    closed: AtomicBool,
}

impl Pair {
    /// Shuts both connections both ways, waking every thread blocked on them.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.from_source.shutdown();
        self.to_destination.shutdown();
    }

    /// The connection a direction reads from and the one it writes to.
    fn ends(&self, direction: Direction) -> (&Conn, &Conn) {
        match direction {
            Direction::ToDestination => (&self.from_source, &self.to_destination),
            Direction::ToSource => (&self.to_destination, &self.from_source),
        }
    }
}

/// How a direction of a connection ended.
enum End {
    /// Its reader closed; the writer is half-closed after it.
    Closed,
    /// A read or write failed; the pair is shut.
    Broken,
    /// The fault cut the migration, or the relay stopped.
    Cut,
    /// A stall held it until the pair closed.
    Held,
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    uri: Uri,
    accepting: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and relays every connection to `target` with `fault`, on threads of
    /// its own; `notify` gets each line the relay has to say (a connection, the fault).
    pub fn start(
        listen: &Uri,
        target: Uri,
        fault: Fault,
        notify: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let listener = Listener::bind(listen).map_err(|e| format!("LISTEN: {e}"))?;
        let uri = listener.uri().map_err(|e| e.to_string())?;
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(|e| format!("configuring the listener on {uri}: {e}"))?;
        let shared = Arc::new(Shared {
            fault,
            target,
            notify: Box::new(notify),
            stop: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let accepting = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || shared.accept_all(&listener))
        };
        Ok(Self {
            shared,
            uri,
            accepting: Some(accepting),
        })
    }

    /// Where it listens (with the port the system chose for `tcp:HOST:0`).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Records of `kind` forwarded intact in `direction` so far.
    pub fn delivered(&self, direction: Direction, kind: Kind) -> u64 {
        self.shared
            .lock()
            .delivered
            .get(&(direction, kind))
            .copied()
            .unwrap_or(0)
    }

    /// What the fault did, once it fired.
    pub fn fired(&self) -> Option<String> {
        self.shared.lock().fired.clone()
    }

    /// Waits until `n` records of `kind` have been forwarded intact in `direction`, or until
    /// `deadline`; whether they were.
    pub fn wait_delivered(
        &self,
        direction: Direction,
        kind: Kind,
        n: u64,
        deadline: Instant,
    ) -> bool {
        let mut state = self.shared.lock();
        loop {
            if state
                .delivered
                .get(&(direction, kind))
                .copied()
                .unwrap_or(0)
                >= n
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether every connection of the first migration seen has closed.
    pub fn first_migration_over(&self) -> bool {
        self.shared.lock().first.is_some_and(|(_, over)| over)
    }

    /// Shuts every open connection both ways now, as a network whose connections time out
    /// (a stalled migration's included); new connections are still relayed.
    pub fn close_connections(&self) {
        for pair in &self.shared.lock().pairs {
            pair.close();
        }
    }

    /// Stops accepting, closes every connection and waits for the relay's threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
        self.close_connections();
        let threads = std::mem::take(&mut self.shared.lock().threads);
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn say(&self, line: String) {
        (self.notify)(&line);
    }

    fn accept_all(self: &Arc<Self>, listener: &Listener) {
        while !self.stop.load(Ordering::Acquire) {
            let accepted = match listener {
                Listener::Tcp(l) => l.accept().map(|(s, peer)| (Conn::Tcp(s), peer.to_string())),
                Listener::Unix(l, _) => l
                    .accept()
                    .map(|(s, _)| (Conn::Unix(s), "a local socket".to_string())),
            };
            match accepted {
                Ok((conn, peer)) => {
                    // Connected here, in the order the source connected: the destination
                    // takes its connections in that order (the main channel first).
                    let Some(pair) = self.pair(conn, &peer) else {
                        continue;
                    };
                    let shared = Arc::clone(self);
                    let thread = std::thread::spawn(move || shared.serve(&pair, &peer));
                    let mut state = self.lock();
                    state.threads.retain(|t| !t.is_finished());
                    state.threads.push(thread);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    std::thread::sleep(POLL);
                }
                Err(e) => {
                    self.say(format!("accepting a connection: {e}"));
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// The pair of an accepted connection and a new one to the target; `None` (said, and
    /// the accepted one closed) when the target cannot be reached.
    fn pair(&self, accepted: Conn, peer: &str) -> Option<Arc<Pair>> {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let configured = match &accepted {
            Conn::Tcp(s) => s.set_nonblocking(false).and_then(|()| s.set_nodelay(true)),
            Conn::Unix(s) => s.set_nonblocking(false),
        };
        if let Err(e) = configured {
            self.say(format!("connection {id} from {peer}: configuring it: {e}"));
            return None;
        }
        let outgoing = match transport::connect(&self.target) {
            Ok(conn) => conn,
            Err(e) => {
                self.say(format!("connection {id} from {peer}: {e}; closed"));
                accepted.shutdown();
                return None;
            }
        };
        let pair = Arc::new(Pair {
            id,
            from_source: accepted,
            to_destination: outgoing,
            session: OnceLock::new(),
            closed: AtomicBool::new(false),
        });
        self.lock().pairs.push(Arc::clone(&pair));
        Some(pair)
    }

    /// Serves one pair of connections to its end.
    fn serve(self: &Arc<Self>, pair: &Arc<Pair>, peer: &str) {
        let id = pair.id;
        let to_source = {
            let (shared, pair) = (Arc::clone(self), Arc::clone(pair));
            std::thread::spawn(move || {
                shared.forward(&pair, Direction::ToSource, "the destination")
            })
        };
        let to_destination_records = self.forward(pair, Direction::ToDestination, peer);
        let to_source_records = to_source.join().unwrap_or(0);
        pair.close();
        let mut state = self.lock();
        state.pairs.retain(|p| p.id != id);
        if let Some(Some(session)) = pair.session.get()
            && let Some(s) = state.sessions.get_mut(session)
        {
            s.open = s.open.saturating_sub(1);
            let over = s.open == 0;
            if let Some((first, done)) = &mut state.first
                && first == session
                && over
            {
                *done = true;
            }
        }
        drop(state);
        self.changed.notify_all();
        self.say(format!(
            "connection {id}: closed ({to_destination_records} records to the destination, {to_source_records} to the source)"
        ));
    }

    /// Forwards one direction of `pair` until it ends; the records forwarded.
    fn forward(&self, pair: &Pair, direction: Direction, peer: &str) -> u64 {
        let (from, to) = pair.ends(direction);
        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
            pair.close();
            return 0;
        };
        let mut records = 0;
        match self.forward_stream(pair, direction, peer, &mut from, &mut to, &mut records) {
            End::Closed => {
                // The reader's peer closed: pass that on, as the network would.
                shutdown_write(&to);
                // A stall holds the other direction: nothing can move any more.
                let other = match direction {
                    Direction::ToDestination => Direction::ToSource,
                    Direction::ToSource => Direction::ToDestination,
                };
                if self.holds(pair, other) {
                    pair.close();
                }
            }
            End::Broken => pair.close(),
            End::Cut | End::Held => {}
        }
        records
    }

    fn forward_stream(
        &self,
        pair: &Pair,
        direction: Direction,
        peer: &str,
        from: &mut Conn,
        to: &mut Conn,
        records: &mut u64,
    ) -> End {
        if direction == Direction::ToDestination {
            let mut hello = [0u8; HELLO_SIZE];
            let got = match fill(from, &mut hello) {
                Ok(got) => got,
                Err(_) => return self.broken(pair),
            };
            if got < HELLO_SIZE {
                let _ = pair.session.set(None);
                return match to.write_all(&hello[..got]) {
                    Ok(()) => End::Closed,
                    Err(_) => self.broken(pair),
                };
            }
            match Hello::decode(&hello) {
                Ok(h) => {
                    if !self.join_session(pair, &h, peer) {
                        pair.close();
                        return End::Cut;
                    }
                }
                Err(e) => {
                    let _ = pair.session.set(None);
                    self.say(format!(
                        "connection {} from {peer}: {e}; relaying its bytes unparsed",
                        pair.id
                    ));
                }
            }
            if to.write_all(&hello).is_err() {
                return self.broken(pair);
            }
            if pair.session.get() == Some(&None) {
                return self.copy_raw(pair, from, to);
            }
        }
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; HEADER_SIZE];
            let got = match fill(from, &mut header) {
                Ok(got) => got,
                Err(_) => return self.broken(pair),
            };
            if got == 0 {
                return End::Closed;
            }
            // Destination → source: nothing comes before the source's hello in a vmig stream.
            let session = match pair.session.get() {
                Some(Some(session)) => *session,
                _ => {
                    return match to.write_all(&header[..got]) {
                        Ok(()) => self.copy_raw(pair, from, to),
                        Err(_) => self.broken(pair),
                    };
                }
            };
            if got < HEADER_SIZE {
                // Truncated: the receiver says so.
                return match to.write_all(&header[..got]) {
                    Ok(()) => End::Closed,
                    Err(_) => self.broken(pair),
                };
            }
            let raw_kind = u16::from_le_bytes([header[0], header[1]]);
            let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let (Some(kind), Some(size)) = (
                Kind::from_u16(raw_kind),
                usize::try_from(length)
                    .ok()
                    .filter(|_| length <= MAX_RECORD),
            ) else {
                self.say(format!(
                    "connection {}: a record header {direction} with kind {raw_kind} and length {length}, which this relay cannot frame (expected kinds 1 to {} and at most {MAX_RECORD} bytes); relaying the rest unparsed",
                    pair.id,
                    Kind::ALL.len()
                ));
                return match to.write_all(&header) {
                    Ok(()) => self.copy_raw(pair, from, to),
                    Err(_) => self.broken(pair),
                };
            };
            payload.resize(size, 0);
            let got = match fill(from, &mut payload) {
                Ok(got) => got,
                Err(_) => return self.broken(pair),
            };
            if got < size {
                return match to
                    .write_all(&header)
                    .and_then(|()| to.write_all(&payload[..got]))
                {
                    Ok(()) => End::Closed,
                    Err(_) => self.broken(pair),
                };
            }
            let taken = {
                let mut state = self.lock();
                match state.sessions.get(&session) {
                    Some(s) if s.cut => {
                        drop(state);
                        pair.close();
                        return End::Cut;
                    }
                    Some(s) if s.held[direction.index()] => {
                        drop(state);
                        return self.hold(pair);
                    }
                    _ => {}
                }
                self.count(&mut state, direction, kind)
            };
            let Some((action, nth)) = taken else {
                if !self.deliver(to, &header, &payload, direction, kind) {
                    return self.broken(pair);
                }
                *records += 1;
                continue;
            };
            let fault = |detail: &str| {
                format!(
                    "fault: {} {} #{nth} {direction}{detail}",
                    action.verb(),
                    kind.name()
                )
            };
            match action {
                FaultAction::CutBefore => {
                    self.cut(session);
                    self.fire(fault(""));
                    return End::Cut;
                }
                FaultAction::CutAfter => {
                    // Marked first: no answer to this record gets through before the close.
                    self.lock().sessions.entry(session).or_default().cut = true;
                    if !self.deliver(to, &header, &payload, direction, kind) {
                        return self.broken(pair);
                    }
                    *records += 1;
                    self.fire(fault(""));
                    self.cut(session);
                    return End::Cut;
                }
                FaultAction::Corrupt => {
                    let detail = flip_one_bit(&mut header, &mut payload);
                    if to
                        .write_all(&header)
                        .and_then(|()| to.write_all(&payload))
                        .is_err()
                    {
                        return self.broken(pair);
                    }
                    *records += 1;
                    self.fire(fault(&format!(": {detail}")));
                }
                FaultAction::Stall => {
                    self.fire(fault(": it and everything after it held"));
                    if let Some(s) = self.lock().sessions.get_mut(&session) {
                        s.held[direction.index()] = true;
                    }
                    return self.hold(pair);
                }
            }
        }
    }

    /// Writes a record whole and counts it delivered; false when the write failed.
    fn deliver(
        &self,
        to: &mut Conn,
        header: &[u8],
        payload: &[u8],
        direction: Direction,
        kind: Kind,
    ) -> bool {
        let written = to
            .write_all(header)
            .and_then(|()| to.write_all(payload))
            .and_then(|()| to.flush());
        if written.is_err() {
            return false;
        }
        *self.lock().delivered.entry((direction, kind)).or_insert(0) += 1;
        self.changed.notify_all();
        true
    }

    /// Counts a record read; when the fault takes it, its action and the record's number.
    fn count(
        &self,
        state: &mut State,
        direction: Direction,
        kind: Kind,
    ) -> Option<(FaultAction, u64)> {
        let seen = state.seen.entry((direction, kind)).or_insert(0);
        *seen += 1;
        match self.fault {
            Fault::At {
                action,
                kind: k,
                nth,
                direction: d,
            } if k == kind && d == direction && *seen == nth && !state.fault_taken => {
                state.fault_taken = true;
                Some((action, nth))
            }
            _ => None,
        }
    }

    fn fire(&self, line: String) {
        self.say(line.clone());
        self.lock().fired = Some(line);
        self.changed.notify_all();
    }

    /// Adds `pair` to its migration; false when that migration was cut.
    fn join_session(&self, pair: &Pair, hello: &Hello, peer: &str) -> bool {
        let mut state = self.lock();
        let _ = pair.session.set(Some(hello.session));
        if state.first.is_none() {
            state.first = Some((hello.session, false));
        }
        let session = state.sessions.entry(hello.session).or_default();
        session.open += 1;
        let cut = session.cut;
        drop(state);
        self.say(format!(
            "connection {} from {peer}: channel {} of {}, session {:#018x}{}",
            pair.id,
            hello.channel,
            hello.channels,
            hello.session,
            if cut {
                "; its migration was cut: closed"
            } else {
                ""
            }
        ));
        !cut
    }

    /// Closes every connection of `session`, and any that comes later; no record of it is
    /// forwarded after its cut is marked.
    fn cut(&self, session: u64) {
        let mut state = self.lock();
        state.sessions.entry(session).or_default().cut = true;
        for pair in &state.pairs {
            if pair.session.get() == Some(&Some(session)) {
                pair.close();
            }
        }
    }

    /// Whether a stall holds `direction` of `pair`'s migration.
    fn holds(&self, pair: &Pair, direction: Direction) -> bool {
        let Some(Some(session)) = pair.session.get() else {
            return false;
        };
        self.lock()
            .sessions
            .get(session)
            .is_some_and(|s| s.held[direction.index()])
    }

    /// Reads nothing more until the pair is closed (by its other direction's end, a cut,
    /// [`Relay::close_connections`] or the relay's stop).
    fn hold(&self, pair: &Pair) -> End {
        while !pair.closed.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(POLL);
        }
        End::Held
    }

    fn broken(&self, pair: &Pair) -> End {
        pair.close();
        if self.stop.load(Ordering::Acquire) || pair.closed.load(Ordering::Acquire) {
            End::Cut
        } else {
            End::Broken
        }
    }

    /// Copies bytes as they come until the reader closes.
    fn copy_raw(&self, pair: &Pair, from: &mut Conn, to: &mut Conn) -> End {
        let mut buf = vec![0u8; RAW_CHUNK];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return End::Closed,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return self.broken(pair);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.broken(pair),
            }
        }
    }
}

/// Closes the writing direction of `conn`: its peer reads the end of the stream.
fn shutdown_write(conn: &Conn) {
    let _ = match conn {
        Conn::Tcp(s) => s.shutdown(Shutdown::Write),
        Conn::Unix(s) => s.shutdown(Shutdown::Write),
    };
}

/// Reads until `buf` is full or the peer closes; the bytes read.
fn fill(from: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match from.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Flips bit 0 of the payload's last byte (of a `Pages` record, its first: the last may be a
/// whole page's, which its digest checks, not the checksum, and which arrives torn), or, for
/// an empty payload, of the header's checksum (every other header field is checked before
/// the checksum, and a flip there would be refused as something other than corruption); says
/// which.
fn flip_one_bit(header: &mut [u8; HEADER_SIZE], payload: &mut [u8]) -> String {
    let pages = u16::from_le_bytes([header[0], header[1]]) == Kind::Pages as u16;
    let at = if pages {
        0
    } else {
        payload.len().wrapping_sub(1)
    };
    match payload.get_mut(at) {
        Some(byte) => {
            *byte ^= 1;
            format!("bit 0 of payload byte {at} of {} flipped", payload.len())
        }
        None => {
            header[16] ^= 1;
            "bit 0 of its header's checksum flipped (its payload is empty)".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmig_migration::stream::{RecordReader, RecordWriter};

    #[test]
    fn fault_specs_parse_with_their_defaults_in_any_case() {
        assert_eq!("none".parse::<Fault>().unwrap(), Fault::None);
        assert_eq!("NONE".parse::<Fault>().unwrap(), Fault::None);
        assert_eq!(
            "cut-after:Commit".parse::<Fault>().unwrap(),
            Fault::At {
                action: FaultAction::CutAfter,
                kind: Kind::Commit,
                nth: 1,
                direction: Direction::ToDestination
            }
        );
        assert_eq!(
            "Cut-Before:accepted:2".parse::<Fault>().unwrap(),
            Fault::At {
                action: FaultAction::CutBefore,
                kind: Kind::Accepted,
                nth: 2,
                direction: Direction::ToSource
            }
        );
        assert_eq!(
            "corrupt:PAGES:7:to-destination".parse::<Fault>().unwrap(),
            Fault::At {
                action: FaultAction::Corrupt,
                kind: Kind::Pages,
                nth: 7,
                direction: Direction::ToDestination
            }
        );
        assert_eq!(
            "stall:abort:to-source".parse::<Fault>().unwrap(),
            Fault::At {
                action: FaultAction::Stall,
                kind: Kind::Abort,
                nth: 1,
                direction: Direction::ToSource
            }
        );
        // Every kind has a direction or asks for one, and a spec prints back as it parses.
        for kind in Kind::ALL {
            for action in FaultAction::ALL {
                let direction = Direction::of(kind).unwrap_or(Direction::ToSource);
                let fault = Fault::At {
                    action,
                    kind,
                    nth: 3,
                    direction,
                };
                assert_eq!(fault.to_string().parse::<Fault>().unwrap(), fault);
            }
        }
    }

    #[test]
    fn bad_fault_specs_say_why_and_list_the_forms() {
        for (spec, why) in [
            ("", "unknown fault ``"),
            ("drop:Commit", "unknown fault `drop`"),
            ("cut-after", "no record kind"),
            ("cut-after:Comit", "unknown record kind `Comit`"),
            ("cut-after:Commit:0", "neither a count from 1"),
            ("cut-after:Commit:x", "neither a count from 1"),
            ("cut-after:Commit:1:2", "`2` is not a direction"),
            (
                "cut-after:Commit:to-destination:1",
                "`1` after the direction",
            ),
            ("stall:Abort", "Abort travels both ways"),
            (
                "corrupt:Commit:to-source",
                "Commit travels to the destination only, never to the source",
            ),
            (
                "corrupt:Ready:1:to-destination",
                "Ready travels to the source only",
            ),
        ] {
            let err = spec.parse::<Fault>().unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
            assert!(
                err.contains("expected none, cut-before:KIND"),
                "{spec}: {err}"
            );
            assert!(!err.contains('\n'), "{spec}: {err}");
        }
    }

    /// A relay between a fake source and a fake destination in a directory of the test.
    struct Rig {
        dir: std::path::PathBuf,
        destination: Listener,
        relay: Relay,
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl Rig {
        fn new(name: &str, fault: &str) -> Self {
            Self::with_notify(name, fault, |_| {})
        }

        /// A rig whose relay also calls `also` with each line it says.
        fn with_notify(
            name: &str,
            fault: &str,
            also: impl Fn(&str) + Send + Sync + 'static,
        ) -> Self {
            let dir =
                std::env::temp_dir().join(format!("vmig-relay-test-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let target = Uri::Unix(dir.join("destination.sock"));
            let destination = Listener::bind(&target).unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            let relay = {
                let lines = Arc::clone(&lines);
                Relay::start(
                    &"tcp:127.0.0.1:0".parse().unwrap(),
                    target,
                    fault.parse().unwrap(),
                    move |line| {
                        lines.lock().unwrap().push(line.to_string());
                        also(line);
                    },
                )
                .unwrap()
            };
            Self {
                dir,
                destination,
                relay,
                lines,
            }
        }

        /// A source connection (with its hello sent) and the destination's end of it.
        fn connect(
            &self,
            channel: u16,
            channels: u16,
            session: u64,
        ) -> (RecordWriter<Conn>, RecordReader<Conn>, Conn, Conn) {
            let mut source = transport::connect(self.relay.uri()).unwrap();
            source
                .write_all(
                    &Hello {
                        channel,
                        channels,
                        session,
                    }
                    .encode(),
                )
                .unwrap();
            let mut destination = self.destination.accept(None).unwrap();
            let timeout = Some(Duration::from_secs(30));
            destination.set_read_timeout(timeout).unwrap();
            source.set_read_timeout(timeout).unwrap();
            let hello = Hello::read(&mut destination).unwrap();
            assert_eq!((hello.channel, hello.session), (channel, session));
            (
                RecordWriter::new(source.try_clone().unwrap()),
                RecordReader::new(destination.try_clone().unwrap(), "at the destination"),
                source,
                destination,
            )
        }

        fn fired(&self) -> String {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.relay.fired().is_none() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            self.relay.fired().unwrap_or_default()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Whether `conn` is closed for reading: the next read sees the end of the stream or a
    /// reset, not data and not its read timeout.
    fn closed(conn: &mut Conn) -> bool {
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }

    fn send(w: &mut RecordWriter<Conn>, kind: Kind, payload: &[u8]) {
        w.write(kind, &[payload]).unwrap();
    }

    #[test]
    fn a_plain_relay_forwards_every_record_both_ways_and_passes_the_close_on() {
        let rig = Rig::new("plain", "none");
        let (mut to_destination, mut at_destination, source, destination) = rig.connect(0, 1, 7);
        let mut from_destination = RecordWriter::new(destination.try_clone().unwrap());
        let mut at_source = RecordReader::new(source.try_clone().unwrap(), "at the source");
        send(&mut to_destination, Kind::Config, b"{\"vm\": 1}");
        assert_eq!(at_destination.read().unwrap().payload, b"{\"vm\": 1}");
        send(&mut from_destination, Kind::Ready, b"");
        assert_eq!(at_source.read().unwrap().kind, Kind::Ready);
        send(&mut to_destination, Kind::Complete, b"");
        assert_eq!(at_destination.read().unwrap().kind, Kind::Complete);
        assert_eq!(
            rig.relay.delivered(Direction::ToDestination, Kind::Config),
            1
        );
        assert_eq!(rig.relay.delivered(Direction::ToSource, Kind::Ready), 1);
        assert_eq!(rig.relay.fired(), None);
        // The source leaves: the destination sees the end of the stream, and back.
        source.shutdown();
        let mut destination = destination;
        assert!(closed(&mut destination));
        destination.shutdown();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rig.relay.first_migration_over() {
            assert!(Instant::now() < deadline, "the relay never saw the close");
            std::thread::sleep(POLL);
        }
    }

    #[test]
    fn cut_before_drops_its_record_and_closes_every_connection_of_the_migration() {
        let rig = Rig::new("cut-before", "cut-before:Commit");
        let (mut main, mut at_destination, mut source, mut destination) = rig.connect(0, 2, 9);
        let (_, _, mut second_source, mut second_destination) = rig.connect(1, 2, 9);
        send(&mut main, Kind::Complete, b"");
        assert_eq!(at_destination.read().unwrap().kind, Kind::Complete);
        send(&mut main, Kind::Commit, b"");
        assert_eq!(
            rig.fired(),
            "fault: cut before Commit #1 to the destination"
        );
        // Not delivered: the destination reads the end of the stream where Commit was.
        let err = at_destination.read().unwrap_err().to_string();
        assert!(err.contains("the peer closed"), "{err}");
        for conn in [
            &mut source,
            &mut destination,
            &mut second_source,
            &mut second_destination,
        ] {
            assert!(closed(conn));
        }
        assert_eq!(
            rig.relay.delivered(Direction::ToDestination, Kind::Commit),
            0
        );
        // A late connection of the cut migration is closed at once; another migration's is
        // relayed.
        let mut late = transport::connect(rig.relay.uri()).unwrap();
        late.write_all(
            &Hello {
                channel: 1,
                channels: 2,
                session: 9,
            }
            .encode(),
        )
        .unwrap();
        let mut late_destination = rig.destination.accept(None).unwrap();
        assert!(closed(&mut late_destination));
        let (mut other, mut at_other, _, _) = rig.connect(0, 1, 10);
        send(&mut other, Kind::Commit, b"");
        assert_eq!(at_other.read().unwrap().kind, Kind::Commit);
    }

    #[test]
    fn cut_after_delivers_its_record_then_closes_both_ways() {
        let rig = Rig::new("cut-after", "cut-after:Commit");
        let (mut main, mut at_destination, mut source, _destination) = rig.connect(0, 1, 11);
        send(&mut main, Kind::Commit, b"");
        assert_eq!(at_destination.read().unwrap().kind, Kind::Commit);
        assert_eq!(rig.fired(), "fault: cut after Commit #1 to the destination");
        let err = at_destination.read().unwrap_err().to_string();
        assert!(err.contains("the peer closed"), "{err}");
        assert!(closed(&mut source));
        assert_eq!(
            rig.relay.delivered(Direction::ToDestination, Kind::Commit),
            1
        );
    }

    #[test]
    fn cut_after_lets_no_answer_to_its_record_through() {
        // The relay announces the fault between delivering the record and closing; a slow
        // announcement gives the destination all the time it needs to answer.
        let rig = Rig::with_notify("cut-answer", "cut-after:Complete", |line| {
            if line.starts_with("fault:") {
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let (mut main, mut at_destination, source, destination) = rig.connect(0, 1, 15);
        send(&mut main, Kind::Complete, b"");
        assert_eq!(at_destination.read().unwrap().kind, Kind::Complete);
        let mut back = RecordWriter::new(destination.try_clone().unwrap());
        // The answer may find the connection already closed.
        let _ = back.write(Kind::Accepted, &[]);
        let mut at_source = RecordReader::new(source, "at the source");
        let err = at_source.read().unwrap_err().to_string();
        assert!(err.contains("the peer closed"), "{err}");
        assert_eq!(rig.relay.delivered(Direction::ToSource, Kind::Accepted), 0);
    }

    #[test]
    fn a_fault_counts_its_kind_across_every_connection() {
        let rig = Rig::new("count", "cut-after:PassEnd:2");
        let (mut first, mut at_first, _, _) = rig.connect(0, 2, 12);
        let (mut second, mut at_second, _, _) = rig.connect(1, 2, 12);
        send(&mut first, Kind::PassEnd, &[0, 0, 0, 0]);
        assert_eq!(at_first.read().unwrap().kind, Kind::PassEnd);
        assert_eq!(rig.relay.fired(), None);
        send(&mut second, Kind::PassEnd, &[0, 0, 0, 0]);
        assert_eq!(at_second.read().unwrap().kind, Kind::PassEnd);
        assert_eq!(
            rig.fired(),
            "fault: cut after PassEnd #2 to the destination"
        );
        assert!(at_first.read().is_err());
    }

    #[test]
    fn corrupt_flips_one_bit_the_checksum_finds_and_forwarding_goes_on() {
        // A Pages record of one whole page: its flip lands in the pass, which the checksum
        // covers, not in the page, which only its digest does.
        let page = [7u8; 4096];
        let entries = [
            [1u32.to_le_bytes(), 1u32.to_le_bytes()].concat(),
            5u64.to_le_bytes().to_vec(),
        ]
        .concat();
        for (kind, payload) in [
            (Kind::Config, &b"{\"a\": 1}"[..]),
            (Kind::Complete, b""),
            (Kind::Pages, &entries[..]),
        ] {
            let rig = Rig::new("corrupt", &format!("corrupt:{}", kind.name()));
            let (mut main, mut at_destination, source, destination) = rig.connect(0, 1, 13);
            if kind == Kind::Pages {
                main.write(kind, &[payload, &page]).unwrap();
            } else {
                send(&mut main, kind, payload);
            }
            let err = at_destination.read().unwrap_err().to_string();
            assert!(err.contains("fails its checksum"), "{kind:?}: {err}");
            let fired = rig.fired();
            assert!(
                fired.starts_with(&format!(
                    "fault: corrupt {} #1 to the destination: bit 0 of",
                    kind.name()
                )),
                "{fired}"
            );
            // The records after it still come, both ways.
            send(&mut main, Kind::VcpuState, b"[]");
            let mut header = [0u8; HEADER_SIZE];
            let mut destination = destination;
            destination.read_exact(&mut header).unwrap();
            assert_eq!(
                u16::from_le_bytes([header[0], header[1]]),
                Kind::VcpuState as u16
            );
            let mut back = RecordWriter::new(destination.try_clone().unwrap());
            send(&mut back, Kind::Accepted, b"");
            let mut at_source = RecordReader::new(source, "at the source");
            assert_eq!(at_source.read().unwrap().kind, Kind::Accepted);
        }
    }

    #[test]
    fn stall_holds_its_record_and_the_rest_of_its_direction_with_connections_open() {
        let rig = Rig::new("stall", "stall:Pages:2");
        let (mut main, mut at_destination, source, destination) = rig.connect(0, 1, 14);
        let pages = |pass: u32| [pass.to_le_bytes(), 0u32.to_le_bytes()].concat();
        main.write(Kind::Pages, &[&pages(0), &[]]).unwrap();
        assert_eq!(at_destination.read().unwrap().kind, Kind::Pages);
        main.write(Kind::Pages, &[&pages(0), &[]]).unwrap();
        assert_eq!(
            rig.fired(),
            "fault: stall at Pages #2 to the destination: it and everything after it held"
        );
        send(&mut main, Kind::PassEnd, &[0, 0, 0, 0]);
        // Nothing more arrives, and the connection stays open: the read times out.
        let mut destination = destination;
        destination
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let err = destination.read(&mut byte).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert_eq!(
            rig.relay.delivered(Direction::ToDestination, Kind::Pages),
            1
        );
        // The other direction still flows.
        let mut back = RecordWriter::new(destination.try_clone().unwrap());
        send(&mut back, Kind::SwitchoverAck, b"");
        let mut at_source = RecordReader::new(source.try_clone().unwrap(), "at the source");
        assert_eq!(at_source.read().unwrap().kind, Kind::SwitchoverAck);
        // Until the relay closes its connections, as a network timing out would.
        rig.relay.close_connections();
        let mut source = source;
        assert!(closed(&mut source));
    }

    #[test]
    fn a_peer_that_sends_no_hello_is_relayed_unparsed() {
        let rig = Rig::new("stray", "cut-before:Config");
        let mut stray = transport::connect(rig.relay.uri()).unwrap();
        let garbage = b"GET / HTTP/1.0\r\n\r\n and some more bytes to fill a hello";
        stray.write_all(garbage).unwrap();
        shutdown_write(&stray);
        let mut destination = rig.destination.accept(None).unwrap();
        let mut got = Vec::new();
        destination.read_to_end(&mut got).unwrap();
        assert_eq!(got, garbage);
        let lines = rig.lines.lock().unwrap().join("\n");
        assert!(lines.contains("vmig magic"), "{lines}");
        assert!(lines.contains("relaying its bytes unparsed"), "{lines}");
        assert_eq!(rig.relay.fired(), None);
    }
}
