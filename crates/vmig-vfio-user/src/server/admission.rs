//! Admission of clients: which connection is served, and how the others are refused.
//!
//! The policy is one client at a time, and nobody waits:
//!
//! - [`Server::run`] keeps accepting for as long as it runs, each connection on a short-lived
//!   thread of its own, so a client being served never holds up the accepting.
//! - A connection that arrives while no client is served becomes the served client. It has
//!   [`ServerConfig::version_timeout`] (10 s) to send `VFIO_USER_VERSION`, or it is dropped.
//! - A connection that arrives while a client is served is refused at once: its first message
//!   (which it has [`ServerConfig::busy_timeout`] to send) is answered with an error reply of
//!   errno `EBUSY` (a header with the error flag and the errno, nothing else, as the spec has
//!   every error reply), and the connection is closed. The served client sees none of it. The
//!   refusal is logged with the refused peer's process and since when the served client is.
//! - A client that connected and negotiated keeps the server however long it is idle: a VMM's
//!   client is legitimately quiet for long stretches (QEMU's between migrations).
//! - A connection that arrives just as the served client leaves (that client's socket has hung
//!   up, its teardown is still running) waits for the teardown and is then served, so a client
//!   that disconnects and then connects again, or a next client started after the first one
//!   exited, is never refused.
//! - At most [`MAX_REFUSING`] refusals run at once; a connection beyond them is closed unread,
//!   so a flood of connections costs a bounded number of threads and descriptors.
//!
//! [`ServerConfig::version_timeout`]: super::ServerConfig::version_timeout
//! [`ServerConfig::busy_timeout`]: super::ServerConfig::busy_timeout

use std::error::Error;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Scope;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Device, ServeError, Server, first_message};
use crate::sys;

/// Connections refused at the same time; a connection beyond them is closed unread.
pub const MAX_REFUSING: usize = 16;

/// How long a connection that met a served client which has just hung up waits for that
/// client's teardown before it is refused after all.
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(5);

/// How long the accepting pauses when the listener has nothing to accept, or when the process
/// is out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);

impl<D: Device> Server<D> {
    /// Accepts clients until `stop` is set, and serves one at a time: a connection that arrives
    /// while a client is served is answered with `EBUSY` and closed at once (the policy is in
    /// the doc of this file). When the listener fails, accepting ends and `run` returns that
    /// error once the client being served has left.
    pub fn run(&self, listener: &UnixListener, stop: &AtomicBool) -> Result<(), ServeError> {
        listener.set_nonblocking(true).map_err(ServeError::Listen)?;
        let gate = Gate::default();
        std::thread::scope(|scope| {
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => self.admit(scope, &gate, stream, stop),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_PAUSE),
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        tracing::warn!(
                            error = &e as &dyn Error,
                            "vfio-user server: out of file descriptors; the next connection waits"
                        );
                        std::thread::sleep(ACCEPT_PAUSE);
                    }
                    Err(e) => return Err(ServeError::Listen(e)),
                }
            }
            Ok(())
        })
    }

    /// Serves `stream` on a thread of its own when no client is served, or refuses it on one.
    fn admit<'scope>(
        &'scope self,
        scope: &'scope Scope<'scope, '_>,
        gate: &'scope Gate,
        stream: UnixStream,
        stop: &'scope AtomicBool,
    ) {
        let peer = Peer::of(&stream);
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!(%peer, error = &e as &dyn Error, "vfio-user server: cannot use a connection; closed it");
            return;
        }
        let started = if let Some(held) = gate.claim(&stream) {
            std::thread::Builder::new()
                .name("vfio-user-client".into())
                .spawn_scoped(scope, move || {
                    tracing::info!(%peer, "vfio-user server: serving a client");
                    log_end(peer, self.serve(stream, stop));
                    drop(held);
                })
        } else if let Some(refusing) = gate.start_refusal() {
            std::thread::Builder::new()
                .name("vfio-user-refusal".into())
                .spawn_scoped(scope, move || {
                    self.refuse(gate, stream, peer, stop);
                    drop(refusing);
                })
        } else {
            tracing::warn!(
                %peer,
                "vfio-user server: busy, and {MAX_REFUSING} connections are being refused already; closed this one unread"
            );
            return;
        };
        if let Err(e) = started {
            tracing::warn!(%peer, error = &e as &dyn Error, "vfio-user server: cannot start a thread for a connection; closed it");
        }
    }

    /// A connection that arrived while a client was served: its first message is answered
    /// with `EBUSY`, unless the served client has left meanwhile, when this one is served.
    fn refuse(&self, gate: &Gate, stream: UnixStream, peer: Peer, stop: &AtomicBool) {
        let (endpoint, commands) = match self.start_endpoint(stream) {
            Ok(started) => started,
            Err(e) => {
                tracing::warn!(%peer, error = &e as &dyn Error, "vfio-user server: cannot refuse a connection; closed it");
                return;
            }
        };
        let first = match first_message(&endpoint, &commands, self.config.busy_timeout, stop) {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(
                    %peer,
                    error = &e as &dyn Error,
                    "vfio-user server: busy; a connection that arrived meanwhile sent no message, closed it"
                );
                return;
            }
        };
        match gate.take_turn(endpoint.stream()) {
            Turn::Served(held) => {
                tracing::info!(%peer, "vfio-user server: the client before has left; serving a client");
                log_end(peer, self.serve_from(endpoint, commands, first, stop));
                drop(held);
            }
            Turn::Busy { since } => {
                let sent = endpoint.reply_error(&first.header, libc::EBUSY);
                endpoint.close();
                let served_for = SystemTime::now()
                    .duration_since(since)
                    .unwrap_or_default()
                    .as_secs_f64();
                let answered = if sent.is_ok() {
                    ""
                } else {
                    " (the reply could not be sent)"
                };
                tracing::warn!(
                    "vfio-user server: refused {peer} with EBUSY{answered}: busy: served client since {} (for {served_for:.1} s); one client at a time",
                    utc(since),
                );
            }
        }
    }
}

/// Logs how serving a client ended.
fn log_end(peer: Peer, outcome: Result<(), ServeError>) {
    match outcome {
        Ok(()) => tracing::info!(%peer, "vfio-user server: the client left"),
        Err(why @ ServeError::LeftBeforeVersion) => {
            tracing::info!(%peer, "vfio-user server: {why}");
        }
        Err(why) => tracing::warn!(
            %peer,
            error = &why as &dyn Error,
            "vfio-user server: client dropped"
        ),
    }
}

/// The peer of a connection as the log names it: its process and user.
#[derive(Clone, Copy)]
struct Peer(Option<(libc::pid_t, libc::uid_t)>);

impl Peer {
    fn of(stream: &UnixStream) -> Self {
        Self(sys::peer_credentials(stream.as_fd()).ok())
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((pid, uid)) => write!(f, "pid {pid} (uid {uid})"),
            None => f.write_str("an unknown process"),
        }
    }
}

/// Who holds the server, shared by the threads of the connections.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    /// Signalled when the served client's turn ends.
    released: Condvar,
}

#[derive(Default)]
struct GateState {
    served: Option<Occupant>,
    refusing: usize,
}

/// The client being served.
struct Occupant {
    since: SystemTime,
    /// A second descriptor of its socket, to see whether it has hung up (none if the process
    /// had no descriptor to spare: it then counts as present until its turn ends).
    socket: Option<UnixStream>,
}

impl Occupant {
    fn of(stream: &UnixStream) -> Self {
        Self {
            since: SystemTime::now(),
            socket: stream.try_clone().ok(),
        }
    }

    fn has_hung_up(&self) -> bool {
        self.socket
            .as_ref()
            .is_some_and(|s| sys::peer_hung_up(s.as_fd()).unwrap_or(false))
    }
}

/// What a connection that arrived while a client was served gets once it has spoken.
enum Turn<'a> {
    /// The served client has left: this connection is served now.
    Served(Held<'a>),
    /// Another client is served, since then.
    Busy { since: SystemTime },
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `stream` the served client, if none is.
    fn claim(&self, stream: &UnixStream) -> Option<Held<'_>> {
        let mut state = self.lock();
        if state.served.is_some() {
            return None;
        }
        state.served = Some(Occupant::of(stream));
        Some(Held { gate: self })
    }

    /// Counts one more refusal in progress, unless [`MAX_REFUSING`] are.
    fn start_refusal(&self) -> Option<Refusing<'_>> {
        let mut state = self.lock();
        if state.refusing >= MAX_REFUSING {
            return None;
        }
        state.refusing += 1;
        Some(Refusing { gate: self })
    }

    /// The turn of `stream`, which arrived while a client was served: served if that client
    /// has left by now (waiting for its teardown if it has hung up), refused otherwise.
    fn take_turn(&self, stream: &UnixStream) -> Turn<'_> {
        let deadline = Instant::now() + TEARDOWN_PATIENCE;
        let mut state = self.lock();
        loop {
            let occupant = state.served.as_ref().map(|o| (o.since, o.has_hung_up()));
            let Some((since, hung_up)) = occupant else {
                state.served = Some(Occupant::of(stream));
                return Turn::Served(Held { gate: self });
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !hung_up || left.is_zero() {
                return Turn::Busy { since };
            }
            state = self
                .released
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The served client's turn; it ends when this is dropped.
struct Held<'a> {
    gate: &'a Gate,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gate.lock().served = None;
        self.gate.released.notify_all();
    }
}

/// One refusal in progress; counted until this is dropped.
struct Refusing<'a> {
    gate: &'a Gate,
}

impl Drop for Refusing<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.refusing = state.refusing.saturating_sub(1);
    }
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ` in UTC, for the log (a time before 1970 shows as 1970).
fn utc(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's `civil_from_days`, for days >= 0):
    // years of 400 (eras) start on 0000-03-01, so the leap day ends each year of the era.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_dates_across_leap_days_and_centuries() {
        for (seconds, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_210_096, "2024-02-29T12:34:56Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(utc(UNIX_EPOCH + Duration::from_secs(seconds)), text);
        }
        assert_eq!(
            utc(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn the_gate_serves_one_refuses_while_held_and_serves_after_a_hang_up() {
        let gate = Gate::default();
        let (first, first_peer) = UnixStream::pair().unwrap();
        let (second, _second_peer) = UnixStream::pair().unwrap();
        let held = gate.claim(&first).expect("nobody is served");
        assert!(gate.claim(&second).is_none(), "one client at a time");
        assert!(
            matches!(gate.take_turn(&second), Turn::Busy { .. }),
            "the served client is present: refused"
        );
        // The served client hangs up; its turn ends a little later (its teardown).
        drop(first_peer);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                drop(held);
            });
            assert!(
                matches!(gate.take_turn(&second), Turn::Served(_)),
                "a connection that meets a client which has hung up waits for its teardown"
            );
        });
    }

    #[test]
    fn refusals_in_progress_are_bounded() {
        let gate = Gate::default();
        let refusing: Vec<_> = (0..MAX_REFUSING)
            .map(|_| gate.start_refusal().expect("below the bound"))
            .collect();
        assert!(gate.start_refusal().is_none(), "the bound is reached");
        drop(refusing);
        assert!(gate.start_refusal().is_some(), "the count goes down again");
    }
}
