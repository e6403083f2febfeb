//! One case of the soak, staged for real: fresh processes of this binary (a dma-engine server
//! per device and side, a destination `vmig run --incoming`, a source `vmig run --api`), the
//! relay in this process between them, the migration started over QMP, the fault driven at
//! its point, then every process asked to end and watched until it does; what happened is
//! collected into an [`Observed`] for the verdict. The case's directory holds every log and
//! `soak.log`, the soak's own account with times.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmig_migration::stream::Kind;
use vmig_migration::transport::Uri;

use super::plan::{Case, FaultPlan, Mismatch, StallEnd, Victim};
use super::verdict::{DeviceSeen, Exit, Observed, SourceReport};
use crate::children::Children;
use crate::qmp::QmpClient;
use crate::relay::{Direction, Fault, FaultAction, Relay};

/// `x-vmig-timeout` of every migration, seconds.
const MIGRATION_TIMEOUT_S: u64 = 60;
/// Longest a migration may take to reach a final status (its timeout, with room).
const MIGRATION_BOUND: Duration = Duration::from_secs(MIGRATION_TIMEOUT_S + 60);
/// Longest the destination may take, once the source's migration ended, to run the VM or
/// exit.
const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// A destination that never saw a migration begin is taken as waiting after this long.
const WAITING_GRACE: Duration = Duration::from_secs(2);
/// Longest a VM may take to exit after `quit` (its guest's verify included).
const QUIT_BOUND: Duration = Duration::from_secs(60);
/// Longest `migrate_cancel` may take to end a migration whose stream stalled.
const CANCEL_BOUND: Duration = Duration::from_secs(10);
/// Longest a device server may take to exit after SIGTERM.
const DEVICE_BOUND: Duration = Duration::from_secs(10);
/// How long a process has to open its socket.
const START_BOUND: Duration = Duration::from_secs(30);
/// How often the soak looks.
const POLL: Duration = Duration::from_millis(20);

/// The soak's account of one case, in `soak.log` of its directory, each line with the time
/// since the case began.
pub struct CaseLog {
    file: Mutex<File>,
    start: Instant,
}

impl CaseLog {
    fn create(path: &Path) -> Result<Self, String> {
        Ok(Self {
            file: Mutex::new(File::create(path).map_err(|e| format!("{}: {e}", path.display()))?),
            start: Instant::now(),
        })
    }

    /// Appends `text` (a failed write to the log is not worth failing the case for).
    pub fn line(&self, text: &str) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            file,
            "[{:>8.3} s] {text}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// A case's processes, its directory and its log (shared with the thread that drives the
/// fault).
struct Stage<'c> {
    case: &'c Case,
    children: Mutex<Children>,
    dir: PathBuf,
    log: Arc<CaseLog>,
    /// The device servers' process names.
    devices: Vec<String>,
}

/// The control connections to both VMs, once they run.
#[derive(Default)]
struct Controls {
    source: Option<QmpClient>,
    destination: Option<QmpClient>,
}

/// What the fault driver did.
#[derive(Default)]
struct Driven {
    fired: Option<String>,
    killed: Option<Victim>,
    cancel_after_accepted: bool,
    /// Promises the fault showed broken while it was driven.
    problems: Vec<String>,
}

/// Runs `case`; what it saw, and its processes (all ended) with their directory, which is
/// removed when they are dropped unless kept.
pub fn run(case: &Case) -> Result<(Observed, Children), String> {
    let children = Children::new(&format!("soak-{}", case.index))?;
    let dir = children.dir().to_path_buf();
    let log = Arc::new(CaseLog::create(&dir.join("soak.log"))?);
    log.line(&format!(
        "case {} of seed {}: {case}",
        case.index, case.seed
    ));
    let mut stage = Stage {
        case,
        children: Mutex::new(children),
        dir,
        log,
        devices: Vec::new(),
    };
    let mut controls = Controls::default();
    let mut seen = Observed::default();
    let staged = stage
        .start(&mut controls)
        .and_then(|()| stage.migrate(&mut controls, &mut seen));
    if let Err(problem) = staged {
        stage.log.line(&format!("problem: {problem}"));
        seen.problems.push(problem);
    }
    stage.end(controls, &mut seen);
    Ok((
        seen,
        stage
            .children
            .into_inner()
            .unwrap_or_else(|e| e.into_inner()),
    ))
}

impl Stage<'_> {
    fn children(&self) -> MutexGuard<'_, Children> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn incoming(&self) -> Uri {
        Uri::Unix(self.path("incoming.sock"))
    }

    /// Starts the device servers and both VMs, and connects to their control sockets.
    fn start(&mut self, controls: &mut Controls) -> Result<(), String> {
        let case = self.case;
        let mut source_devices = Vec::new();
        let mut destination_devices = Vec::new();
        let mut protocols: Vec<_> = case.devices.iter().map(|p| (p, true)).collect();
        if let FaultPlan::Refusal(Mismatch::ExtraDevice(p)) = &case.fault {
            protocols.push((p, false));
        }
        for (i, (protocol, both)) in protocols.into_iter().enumerate() {
            let sides: &[&str] = if both {
                &["source", "destination"]
            } else {
                &["destination"]
            };
            for side in sides {
                let name = format!("{side}-device-{i}");
                let socket = self.path(&format!("{name}.sock"));
                self.children()
                    .spawn_dma_engine(&name, &socket, protocol.name(), &[])?;
                let list = if *side == "source" {
                    &mut source_devices
                } else {
                    &mut destination_devices
                };
                list.push(socket);
                self.devices.push(name);
            }
        }
        for socket in source_devices.iter().chain(&destination_devices) {
            self.children().wait_for(socket)?;
        }
        let destination_mib = match case.fault {
            FaultPlan::Refusal(Mismatch::Memory(mib)) => mib,
            _ => case.ram_mib,
        };
        let (source_api, destination_api) = (self.path("source.api"), self.path("destination.api"));
        let mut destination = vec![
            "run".to_string(),
            "--incoming".into(),
            self.incoming().to_string(),
            "--mem".into(),
            format!("{destination_mib}M"),
            "--api".into(),
            destination_api.display().to_string(),
        ];
        for socket in &destination_devices {
            destination.extend([
                "--device".into(),
                format!("vfio-user,socket={}", socket.display()),
            ]);
        }
        let mut source = vec![
            "run".to_string(),
            "--mem".into(),
            format!("{}M", case.ram_mib),
            "--vcpus".into(),
            case.vcpus.to_string(),
            "--workload".into(),
            format!("{},rate={}", case.workload.name(), case.rate),
            "--dirty-log".into(),
            case.dirty_log.to_string(),
            "--api".into(),
            source_api.display().to_string(),
        ];
        for socket in &source_devices {
            source.extend([
                "--device".into(),
                format!(
                    "vfio-user,socket={},rate={}",
                    socket.display(),
                    case.dma_rate
                ),
            ]);
        }
        self.children().spawn("destination", &destination)?;
        self.children().spawn("source", &source)?;
        for path in [&source_api, &destination_api, &self.path("incoming.sock")] {
            self.children().wait_for(path)?;
        }
        controls.source = Some(QmpClient::connect(&source_api, START_BOUND)?);
        controls.destination = Some(QmpClient::connect(&destination_api, START_BOUND)?);
        self.log.line("every process started");
        Ok(())
    }

    /// Migrates through the relay with the fault, and waits for both sides to settle.
    fn migrate(&self, controls: &mut Controls, seen: &mut Observed) -> Result<(), String> {
        let case = self.case;
        std::thread::sleep(Duration::from_millis(case.warmup_ms));
        let source = controls
            .source
            .as_mut()
            .ok_or("no source control connection")?;
        source.execute(
            "migrate-set-parameters",
            json!({
                "downtime-limit": case.downtime_ms,
                "max-bandwidth": case.max_bandwidth_mib.map_or(0, |mib| mib << 20),
                "multifd-channels": case.channels,
                "x-vmig-timeout": MIGRATION_TIMEOUT_S,
            }),
        )?;
        source.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": case.channels > 1}]}),
        )?;
        let listen = if case.relay_over_tcp {
            Uri::Tcp("127.0.0.1:0".into())
        } else {
            Uri::Unix(self.path("relay.sock"))
        };
        let relay_fault = match case.fault {
            FaultPlan::Stream { fault, .. } => fault,
            _ => Fault::None,
        };
        let relay = {
            let log = Arc::clone(&self.log);
            Relay::start(&listen, self.incoming(), relay_fault, move |line| {
                log.line(&format!("relay: {line}"));
            })?
        };
        let canceller = match case.fault {
            FaultPlan::Cancel { .. }
            | FaultPlan::Stream {
                then: StallEnd::Cancel,
                ..
            } => Some(QmpClient::connect(
                &self.path("source.api"),
                Duration::ZERO,
            )?),
            _ => None,
        };
        source.execute("migrate", json!({"uri": relay.uri().to_string()}))?;
        self.log.line(&format!("migrate to {}", relay.uri()));
        let over = AtomicBool::new(false);
        let (followed, driven) = std::thread::scope(|scope| {
            let driver = scope.spawn(|| self.drive_fault(&relay, canceller, &over));
            let followed = self.follow(source, seen);
            over.store(true, Ordering::Release);
            (followed, driver.join().unwrap_or_default())
        });
        seen.fired = driven.fired.or_else(|| relay.fired());
        seen.cancel_after_accepted = driven.cancel_after_accepted;
        seen.problems.extend(driven.problems);
        seen.source.killed = driven.killed == Some(Victim::Source);
        seen.destination.killed = driven.killed == Some(Victim::Destination);
        for device in &self.devices {
            seen.devices.push(DeviceSeen {
                name: device.clone(),
                killed: driven.killed.is_some_and(|v| v.process() == *device),
                exit: None,
            });
        }
        followed?;
        self.settle(controls.destination.as_mut(), seen)?;
        seen.commit_delivered = relay.delivered(Direction::ToDestination, Kind::Commit) > 0;
        seen.resumed_delivered = relay.delivered(Direction::ToSource, Kind::Resumed) > 0;
        seen.result_delivered = relay.delivered(Direction::ToSource, Kind::Result) > 0;
        relay.stop();
        seen.source.run_state = self.run_state("source", controls.source.as_mut());
        seen.destination.run_state = self.run_state("destination", controls.destination.as_mut());
        self.log.line(&format!(
            "run states: source {:?}, destination {:?}",
            seen.source.run_state, seen.destination.run_state
        ));
        Ok(())
    }

    /// Polls the source until its migration reaches a final status or the source is gone.
    fn follow(&self, source: &mut QmpClient, seen: &mut Observed) -> Result<(), String> {
        let deadline = Instant::now() + MIGRATION_BOUND;
        let mut last = String::new();
        loop {
            if self.children().exit_status("source").is_some() {
                self.log.line("the source is gone");
                return Ok(());
            }
            let polled = source.execute("query-migrate", json!({}));
            match polled {
                Ok(info) => {
                    let report = source_report(&info);
                    if report.status != last {
                        self.log.line(&format!("source: {}", info));
                        last.clone_from(&report.status);
                    }
                    if matches!(
                        report.status.as_str(),
                        "completed" | "failed" | "cancelled" | "unknown"
                    ) {
                        seen.source.report = Some(report);
                        return Ok(());
                    }
                }
                Err(e) => {
                    // A source killed a moment ago is reaped a moment later.
                    let end = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < end {
                        if self.children().exit_status("source").is_some() {
                            self.log.line("the source is gone");
                            return Ok(());
                        }
                        std::thread::sleep(POLL);
                    }
                    return Err(format!("the source's query-migrate: {e}"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the migration did not end within {} s (status \"{last}\")",
                    MIGRATION_BOUND.as_secs()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Acts the fault out at its point: a kill or a cancel once its trigger's record passed
    /// the relay and its delay elapsed; a stall's connections closed after its hold.
    fn drive_fault(
        &self,
        relay: &Relay,
        canceller: Option<QmpClient>,
        over: &AtomicBool,
    ) -> Driven {
        let mut driven = Driven::default();
        let (trigger, victim) = match self.case.fault {
            FaultPlan::Kill { victim, trigger } => (trigger, Some(victim)),
            FaultPlan::Cancel { trigger } => (trigger, None),
            FaultPlan::Stream {
                fault:
                    Fault::At {
                        action: FaultAction::Stall,
                        ..
                    },
                hold_ms,
                then,
            } => {
                while !over.load(Ordering::Acquire) {
                    if relay.fired().is_some() {
                        std::thread::sleep(Duration::from_millis(hold_ms));
                        if let (StallEnd::Cancel, Some(canceller)) = (then, canceller) {
                            self.cancel_during_stall(canceller, hold_ms, &mut driven);
                        }
                        relay.close_connections();
                        self.log.line(&format!(
                            "closed every connection after {hold_ms} ms of stall"
                        ));
                        break;
                    }
                    std::thread::sleep(POLL);
                }
                return driven;
            }
            _ => return driven,
        };
        loop {
            let step = Instant::now() + POLL;
            if relay.wait_delivered(trigger.direction, trigger.kind, trigger.nth, step) {
                break;
            }
            if over.load(Ordering::Acquire) {
                self.log.line(&format!(
                    "the migration ended before the fault's point ({trigger})"
                ));
                return driven;
            }
        }
        std::thread::sleep(Duration::from_millis(trigger.delay_ms));
        match (victim, canceller) {
            (Some(victim), _) => {
                let name = victim.process();
                if self.children().kill(&name) {
                    let text = format!("fault: killed {name} {trigger}");
                    self.log.line(&text);
                    driven.fired = Some(text);
                    driven.killed = Some(victim);
                } else {
                    self.log
                        .line(&format!("{name} had exited before its kill ({trigger})"));
                }
            }
            (None, Some(mut canceller)) => match canceller.execute("migrate_cancel", json!({})) {
                Ok(_) => {
                    // Known only once the cancel is acknowledged: a source that had not yet
                    // received Accepted then must not commit.
                    driven.cancel_after_accepted =
                        relay.delivered(Direction::ToSource, Kind::Accepted) > 0;
                    let text = format!(
                        "fault: migrate_cancel {trigger}{}",
                        if driven.cancel_after_accepted {
                            " (after Accepted reached the source)"
                        } else {
                            ""
                        }
                    );
                    self.log.line(&text);
                    driven.fired = Some(text);
                }
                Err(e) => self.log.line(&format!("migrate_cancel failed: {e}")),
            },
            (None, None) => {}
        }
        driven
    }

    /// Cancels the stalled migration and waits for the source to end it (the connections
    /// still blackholing), within [`CANCEL_BOUND`].
    fn cancel_during_stall(&self, mut canceller: QmpClient, hold_ms: u64, driven: &mut Driven) {
        if let Err(e) = canceller.execute("migrate_cancel", json!({})) {
            driven
                .problems
                .push(format!("migrate_cancel during the stall: {e}"));
            return;
        }
        self.log
            .line(&format!("migrate_cancel after {hold_ms} ms of stall"));
        let deadline = Instant::now() + CANCEL_BOUND;
        let mut status = String::new();
        while Instant::now() < deadline {
            match canceller.execute("query-migrate", json!({})) {
                Ok(info) => status = source_report(&info).status,
                Err(e) => {
                    status = e;
                    break;
                }
            }
            if matches!(
                status.as_str(),
                "completed" | "failed" | "cancelled" | "unknown"
            ) {
                self.log
                    .line(&format!("the source ended the stalled migration: {status}"));
                return;
            }
            std::thread::sleep(POLL);
        }
        driven.problems.push(format!(
            "migrate_cancel did not end the migration within {} s while its stream stalled (status \"{status}\"); it ended only once the connections closed",
            CANCEL_BOUND.as_secs()
        ));
    }

    /// Waits for the destination to run the VM, exit, or show it never began a migration.
    fn settle(
        &self,
        mut destination: Option<&mut QmpClient>,
        seen: &mut Observed,
    ) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_BOUND;
        let mut idle_since: Option<Instant> = None;
        while !seen.destination.killed {
            if self.children().exit_status("destination").is_some() {
                seen.destination.exited_by_itself = true;
                self.log.line("the destination exited by itself");
                return Ok(());
            }
            if self
                .children()
                .log("destination")
                .contains("migration arrived")
            {
                return Ok(());
            }
            let status = destination.as_deref_mut().and_then(|d| {
                d.execute("query-migrate", json!({}))
                    .ok()
                    .map(|info| info["status"].as_str().unwrap_or("none").to_string())
            });
            if matches!(status.as_deref(), None | Some("none")) {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WAITING_GRACE {
                    self.log.line("the destination never began a migration");
                    return Ok(());
                }
            } else {
                idle_since = None;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the destination neither ran the VM nor exited within {} s of the migration's end",
                    SETTLE_BOUND.as_secs()
                ));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// `query-status` of a VM still running.
    fn run_state(&self, name: &str, client: Option<&mut QmpClient>) -> Option<String> {
        if self.children().exit_status(name).is_some() {
            return None;
        }
        let status = client?.execute("query-status", json!({})).ok()?;
        status["status"].as_str().map(str::to_string)
    }

    /// Quits both VMs and stops the device servers, each within its bound, and reads what
    /// their logs say.
    fn end(&self, controls: Controls, seen: &mut Observed) {
        for (name, client) in [
            ("source", controls.source),
            ("destination", controls.destination),
        ] {
            if let Some(mut client) = client
                && self.children().exit_status(name).is_none()
            {
                self.log.line(&format!("quit {name}"));
                let _ = client.execute("quit", json!({}));
            }
        }
        seen.source.exit = Some(self.wait_exit("source", QUIT_BOUND));
        seen.destination.exit = Some(self.wait_exit("destination", QUIT_BOUND));
        for device in &self.devices {
            self.children().terminate(device);
        }
        let exits: Vec<Exit> = self
            .devices
            .iter()
            .map(|device| self.wait_exit(device, DEVICE_BOUND))
            .collect();
        for (device, exit) in seen.devices.iter_mut().zip(exits) {
            device.exit = Some(exit);
        }
        let source_log = self.children().log("source");
        let line_starting = |log: &str, prefix: &str| {
            log.lines()
                .find(|line| line.starts_with(prefix))
                .map(str::to_string)
        };
        seen.source.verify =
            line_starting(&source_log, "verify: ").map(|line| line.starts_with("verify: passed"));
        seen.source.said_unknown =
            line_starting(&source_log, "quit: the migration's outcome is unknown").is_some();
        let destination_log = self.children().log("destination");
        seen.destination.arrived = line_starting(&destination_log, "migration arrived")
            .map(|line| line.contains("guest verify passed"));
        seen.destination.verify = line_starting(&destination_log, "verify: ")
            .map(|line| line.starts_with("verify: passed"));
        seen.destination.failed = destination_log
            .lines()
            .find_map(|line| line.split_once("incoming migration failed: "))
            .map(|(_, why)| why.to_string());
        seen.destination.quit_waiting =
            line_starting(&destination_log, "quit before a migration arrived").is_some();
        self.log.line(&format!("seen: {seen:?}"));
    }

    /// Waits up to `bound` for child `name` to exit, killing it after that.
    fn wait_exit(&self, name: &str, bound: Duration) -> Exit {
        if !self.children().has(name) {
            return Exit::NeverStarted;
        }
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.children().exit_status(name) {
                let exit = exit_of(status);
                self.log.line(&format!("{name}: {exit}"));
                return exit;
            }
            if Instant::now() > deadline {
                self.children().kill(name);
                self.log.line(&format!(
                    "{name} did not exit within {} s: killed",
                    bound.as_secs()
                ));
                return Exit::Hung;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A status without a code is a signal's on Unix.
fn exit_of(status: ExitStatus) -> Exit {
    status
        .code()
        .map_or_else(|| Exit::Signal(status.signal().unwrap_or(0)), Exit::Code)
}

/// The fields of `query-migrate` the verdict needs, read as they are (a status this build's
/// report type does not know, such as "unknown", included).
fn source_report(info: &Value) -> SourceReport {
    SourceReport {
        status: info["status"].as_str().unwrap_or("none").to_string(),
        committed: info["x-vmig-committed"].as_bool().unwrap_or(false),
        verified: info["x-vmig-verified"].as_bool().unwrap_or(false),
        error: info["error-desc"].as_str().map(str::to_string),
    }
}
