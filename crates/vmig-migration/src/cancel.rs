//! What ends a running migration from outside before its commit: a `migrate_cancel` (or
//! `quit`) and the `timeout_s` deadline. The source checks them between steps, and then ends
//! with an Abort that tells the destination why. When it has not ended half a second after
//! one came, it is blocked on the network (a send into a full socket, a read of an answer
//! that never comes), and a watchdog thread shuts every connection down, as QEMU's
//! `migrate_cancel` shuts its migration channel down. A gate makes the commit and the
//! watchdog exclusive: once the commit passed it the watchdog does nothing, and once the
//! watchdog fired no commit passes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::error::{MigrationError, Result};
use crate::report::Progress;
use crate::transport::Conn;

/// How often the watchdog looks at the cancel flag and the clock.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// How long the watchdog leaves a source that is not blocked to end by itself, which tells
/// the destination why with an Abort, before it shuts the connections down.
const GRACE: Duration = Duration::from_millis(500);

/// The cancel and the deadline of one migration, and the connections they shut down.
pub struct Stopper {
    progress: Progress,
    deadline: Instant,
    timeout_s: u64,
    /// Every device's initial state is sent and the switchover waits for the destination's
    /// ack (said when the migration times out).
    awaiting_ack: AtomicBool,
    gate: Mutex<Gate>,
}

#[derive(Default)]
struct Gate {
    /// Clones of the migration's connections.
    conns: Vec<Conn>,
    committed: bool,
    /// Why the watchdog shut the connections down.
    fired: Option<String>,
}

impl Stopper {
    /// The deadline is `timeout_s` from now.
    pub fn new(progress: Progress, timeout_s: u64) -> Self {
        Self {
            progress,
            deadline: Instant::now() + Duration::from_secs(timeout_s),
            timeout_s,
            awaiting_ack: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
        }
    }

    /// Adds a connection of the migration to those the watchdog shuts down.
    pub fn guard(&self, conn: &Conn) -> Result<()> {
        let clone = conn
            .try_clone()
            .map_err(crate::error::io_error("cloning a connection"))?;
        self.lock().conns.push(clone);
        Ok(())
    }

    /// Says whether the switchover now waits only for the destination's ack.
    pub fn set_awaiting_ack(&self, awaiting: bool) {
        self.awaiting_ack.store(awaiting, Ordering::Relaxed);
    }

    /// Why the migration must stop now, if it must.
    pub fn reason(&self) -> Option<String> {
        if self.progress.cancel_requested() {
            return Some("migrate-cancel".into());
        }
        if Instant::now() > self.deadline {
            let waiting = if self.awaiting_ack.load(Ordering::Relaxed) {
                ", waiting for the destination's SwitchoverAck (every device's initial state \
                 was sent; the destination never acknowledged it)"
            } else {
                ""
            };
            return Some(format!(
                "the migration did not finish within timeout_s={}{waiting}",
                self.timeout_s
            ));
        }
        None
    }

    /// A cancel or the deadline, as the error that ends the migration.
    pub fn check(&self) -> Result<()> {
        self.reason()
            .map_or(Ok(()), |r| Err(MigrationError::Cancelled(r)))
    }

    /// Passes the gate to the commit unless a cancel or the deadline came first.
    pub fn commit(&self) -> Result<()> {
        let mut gate = self.lock();
        self.check()?;
        gate.committed = true;
        Ok(())
    }

    /// The commit certainly did not take effect.
    pub fn uncommit(&self) {
        self.lock().committed = false;
    }

    /// Why the watchdog shut the connections down, if it did.
    pub fn fired(&self) -> Option<String> {
        self.lock().fired.clone()
    }

    /// Watches until `done` is signalled (or dropped), shutting the connections down when a
    /// cancel or the deadline came before the commit and the source did not end within
    /// [`GRACE`] of it.
    pub fn watch(&self, done: &mpsc::Receiver<()>) {
        while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(WATCH_INTERVAL) {
            let Some(reason) = self.reason() else {
                continue;
            };
            if !matches!(
                done.recv_timeout(GRACE),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            let mut gate = self.lock();
            if !gate.committed {
                tracing::debug!(%reason, "shutting the migration's connections down");
                for c in &gate.conns {
                    c.shutdown();
                }
                gate.fired = Some(reason);
            }
            return;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }
}
