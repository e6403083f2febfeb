//! What one case of the soak saw ([`Observed`]) and what it means ([`judge`]): the outcome's
//! class, and every way it broke the migration's promises: the VM ran on both sides, a
//! survivor's verify failed or did not run, a process hung or exited with a code other than
//! the one the README documents for that outcome, or the outcome is one the fault cannot
//! explain.
//!
//! The protocol's rules it holds each case to: the destination runs the VM if and only if it
//! received Commit; a source that sent Commit never runs the VM again, and its outcome is
//! "unknown" until Resumed arrives ("completed" once it has, verified only once the Result
//! says so); anything lost before the commit rolls the source back, running as before.

use std::fmt;

use vmig_migration::stream::Kind;

use crate::relay::{Fault, FaultAction};

use super::plan::{Case, FaultPlan, StallEnd, Victim};

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It did not exit within the bound and was killed.
    Hung,
    /// Staging the case failed before it was started.
    NeverStarted,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
            Self::Hung => f.write_str("no exit (hung, killed)"),
            Self::NeverStarted => f.write_str("never started"),
        }
    }
}

/// The source's last `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// `status` (QEMU's names, and "unknown").
    pub status: String,
    /// `x-vmig-committed`.
    pub committed: bool,
    /// `x-vmig-verified`.
    pub verified: bool,
    /// `error-desc`.
    pub error: Option<String>,
}

/// What the source did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSeen {
    /// The fault killed it.
    pub killed: bool,
    /// Its last `query-migrate` once the migration ended (`None` if it never ended there).
    pub report: Option<SourceReport>,
    /// `query-status` after the migration ended.
    pub run_state: Option<String>,
    /// Its `verify:` line on quit: passed or not; `None` without one.
    pub verify: Option<bool>,
    /// It said `quit: the migration's outcome is unknown`.
    pub said_unknown: bool,
    /// How it ended.
    pub exit: Option<Exit>,
}

/// What the destination did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationSeen {
    /// The fault killed it.
    pub killed: bool,
    /// Its `migration arrived ... guest verify passed|FAILED` line: passed or not.
    pub arrived: Option<bool>,
    /// Its `verify:` line on quit.
    pub verify: Option<bool>,
    /// Its `incoming migration failed: ...` line.
    pub failed: Option<String>,
    /// It said `quit before a migration arrived`.
    pub quit_waiting: bool,
    /// It exited before the soak asked it to quit.
    pub exited_by_itself: bool,
    /// `query-status` after the migration ended.
    pub run_state: Option<String>,
    /// How it ended.
    pub exit: Option<Exit>,
}

/// What a device server did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSeen {
    /// Its process name.
    pub name: String,
    /// The fault killed it.
    pub killed: bool,
    /// How it ended (after SIGTERM, unless killed).
    pub exit: Option<Exit>,
}

/// Everything one case saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// What the fault did, when it fired.
    pub fired: Option<String>,
    /// A cancel was acknowledged only after the relay had forwarded Accepted to the source
    /// (so the source may have committed before it saw the cancel).
    pub cancel_after_accepted: bool,
    /// The relay forwarded Commit intact to the destination.
    pub commit_delivered: bool,
    /// The relay forwarded Resumed intact to the source.
    pub resumed_delivered: bool,
    /// The relay forwarded Result intact to the source.
    pub result_delivered: bool,
    /// The source.
    pub source: SourceSeen,
    /// The destination.
    pub destination: DestinationSeen,
    /// The device servers.
    pub devices: Vec<DeviceSeen>,
    /// What went wrong staging the case (a process that did not start, a migration that
    /// never ended).
    pub problems: Vec<String>,
}

/// Where the source ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SourceEnd {
    /// Rolled back: the VM runs there as before (failed or cancelled, never committed).
    RanOn { cancelled: bool },
    /// Handed over: completed.
    HandedOver { verified: bool },
    /// Committed, Resumed never arrived.
    Unknown,
    /// Killed by the fault.
    Killed,
    /// None of those.
    Odd(String),
}

/// Where the destination ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DestinationEnd {
    /// The VM arrived and runs.
    Runs,
    /// Its migration failed and it exited.
    Failed,
    /// It was still waiting for a migration when it quit.
    Waited,
    /// Killed by the fault.
    Killed,
    /// None of those.
    Odd(String),
}

/// The outcome classes the summary counts.
pub const COMPLETED: &str = "completed";
/// The source completed but no Result (or a failing one) came.
pub const COMPLETED_UNVERIFIED: &str = "completed unverified";
/// The source runs as before.
pub const ROLLED_BACK: &str = "rolled back";
/// The source runs as before, after `migrate_cancel`.
pub const CANCELLED: &str = "cancelled";
/// The destination refused the configuration; the source runs as before.
pub const REFUSED: &str = "refused";
/// The destination runs; the source committed and never heard back.
pub const HANDED_OVER_UNSURE: &str = "handed over, source unsure";
/// The source committed, the destination never got Commit: the VM runs nowhere (the
/// protocol's safe answer to a lost Commit).
pub const STRANDED: &str = "stranded (Commit lost)";
/// The source was killed before the handover: the VM is gone with it.
pub const SOURCE_KILLED: &str = "source killed, VM lost";
/// The source was killed after the handover; the destination runs.
pub const SOURCE_KILLED_AFTER: &str = "source killed after the handover";
/// The destination was killed after the source committed.
pub const DESTINATION_KILLED_AFTER_COMMIT: &str = "destination killed after Commit";
/// The destination was killed after the source completed.
pub const DESTINATION_KILLED_AFTER: &str = "destination killed after the handover";
/// An outcome no rule names.
pub const UNEXPLAINED: &str = "unexplained";

/// A case's outcome and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The outcome's class.
    pub outcome: &'static str,
    /// Every broken promise; empty when the case passed.
    pub failures: Vec<String>,
}

/// Judges what `case` saw.
pub fn judge(case: &Case, seen: &Observed) -> Verdict {
    let mut failures = seen.problems.clone();
    let source = source_end(seen);
    let destination = destination_end(seen);
    let outcome = outcome(case, &source, &destination);
    if let SourceEnd::Odd(why) = &source {
        failures.push(format!("the source: {why}"));
    }
    if let DestinationEnd::Odd(why) = &destination {
        failures.push(format!("the destination: {why}"));
    }
    check_one_vm(seen, &source, &destination, &mut failures);
    check_survivors(seen, &source, &destination, &mut failures);
    check_exits(case, seen, &source, &destination, &mut failures);
    let expected = expected_outcomes(case, seen);
    if outcome != UNEXPLAINED && !expected.contains(&outcome) {
        failures.push(format!(
            "outcome \"{outcome}\" where the fault explains {}",
            expected
                .iter()
                .map(|o| format!("\"{o}\""))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if outcome == UNEXPLAINED && failures.is_empty() {
        failures.push(format!(
            "source {source:?} with destination {destination:?} is no outcome the protocol allows"
        ));
    }
    if let (FaultPlan::Refusal(_), Some(report)) = (&case.fault, &seen.source.report) {
        let error = report.error.as_deref().unwrap_or("");
        if !error.contains("this destination") {
            failures.push(format!(
                "the refusal's error does not say what the destination has: {error:?}"
            ));
        }
    }
    Verdict { outcome, failures }
}

fn source_end(seen: &Observed) -> SourceEnd {
    if seen.source.killed {
        return SourceEnd::Killed;
    }
    let Some(report) = &seen.source.report else {
        return SourceEnd::Odd("its migration never reached a final status".into());
    };
    match (report.status.as_str(), report.committed) {
        ("completed", true) => SourceEnd::HandedOver {
            verified: report.verified,
        },
        ("unknown", true) => SourceEnd::Unknown,
        ("failed", false) => SourceEnd::RanOn { cancelled: false },
        ("cancelled", false) => SourceEnd::RanOn { cancelled: true },
        (status, committed) => SourceEnd::Odd(format!(
            "status \"{status}\" with committed {committed} (after Commit the status is \"unknown\" until Resumed arrives, then \"completed\"; before it \"failed\" or \"cancelled\"){}",
            report
                .error
                .as_deref()
                .map_or(String::new(), |e| format!("; error: {e}"))
        )),
    }
}

fn destination_end(seen: &Observed) -> DestinationEnd {
    let d = &seen.destination;
    if d.killed {
        DestinationEnd::Killed
    } else if d.arrived.is_some() {
        DestinationEnd::Runs
    } else if d.failed.is_some() && d.exited_by_itself {
        DestinationEnd::Failed
    } else if d.quit_waiting {
        DestinationEnd::Waited
    } else {
        DestinationEnd::Odd(format!(
            "neither ran the VM, nor failed and exited, nor quit waiting ({})",
            d.exit
                .map_or("still running".to_string(), |e| e.to_string())
        ))
    }
}

fn outcome(case: &Case, source: &SourceEnd, destination: &DestinationEnd) -> &'static str {
    use DestinationEnd as D;
    use SourceEnd as S;
    match (source, destination) {
        (S::HandedOver { verified: true }, D::Runs) => COMPLETED,
        (S::HandedOver { verified: false }, D::Runs) => COMPLETED_UNVERIFIED,
        (S::RanOn { cancelled: true }, D::Failed | D::Waited | D::Killed) => CANCELLED,
        (S::RanOn { .. }, D::Failed | D::Waited) if matches!(case.fault, FaultPlan::Refusal(_)) => {
            REFUSED
        }
        (S::RanOn { .. }, D::Failed | D::Waited | D::Killed) => ROLLED_BACK,
        (S::Unknown, D::Runs) => HANDED_OVER_UNSURE,
        (S::Unknown, D::Failed | D::Waited) => STRANDED,
        (S::Unknown, D::Killed) => DESTINATION_KILLED_AFTER_COMMIT,
        (S::HandedOver { .. }, D::Killed) => DESTINATION_KILLED_AFTER,
        (S::Killed, D::Runs) => SOURCE_KILLED_AFTER,
        (S::Killed, D::Failed | D::Waited) => SOURCE_KILLED,
        _ => UNEXPLAINED,
    }
}

/// The outcomes the case's fault can explain, given what the relay saw.
fn expected_outcomes(case: &Case, seen: &Observed) -> Vec<&'static str> {
    if seen.fired.is_none() && !matches!(case.fault, FaultPlan::Refusal(_)) {
        return vec![COMPLETED];
    }
    match case.fault {
        FaultPlan::None => vec![COMPLETED],
        FaultPlan::Refusal(_) => vec![REFUSED],
        FaultPlan::Cancel { .. } if seen.cancel_after_accepted => vec![CANCELLED, COMPLETED],
        FaultPlan::Cancel { .. } => vec![CANCELLED],
        FaultPlan::Kill {
            victim: Victim::Source,
            ..
        } => vec![SOURCE_KILLED, SOURCE_KILLED_AFTER],
        FaultPlan::Kill {
            victim: Victim::Destination,
            ..
        } => vec![
            ROLLED_BACK,
            DESTINATION_KILLED_AFTER_COMMIT,
            DESTINATION_KILLED_AFTER,
        ],
        // A device whose server dies fails the migration while its state is still needed;
        // after that the migration completes (and a dead destination device fails the
        // destination's checks of its records).
        FaultPlan::Kill {
            victim: Victim::SourceDevice(_),
            ..
        } => vec![ROLLED_BACK, COMPLETED],
        FaultPlan::Kill {
            victim: Victim::DestinationDevice(_),
            ..
        } => vec![ROLLED_BACK, COMPLETED, COMPLETED_UNVERIFIED],
        FaultPlan::Stream {
            then: StallEnd::Cancel,
            ..
        } => vec![CANCELLED],
        FaultPlan::Stream {
            fault: Fault::At { action, kind, .. },
            ..
        } => stream_outcomes(action, kind),
        FaultPlan::Stream {
            fault: Fault::None, ..
        } => vec![COMPLETED],
    }
}

/// What the protocol gives when `action` hits a record of `kind` (the relay's corrupt always
/// breaks the receiver's checksum, so a corrupted record is a lost one, save a Commit, which
/// the destination answers with an Abort; a stall ends in closed connections too).
fn stream_outcomes(action: FaultAction, kind: Kind) -> Vec<&'static str> {
    let delivered = action == FaultAction::CutAfter;
    match (kind, delivered) {
        // The destination refuses a damaged Commit with an Abort, so the source knows it
        // runs nothing there.
        (Kind::Commit, false) if action == FaultAction::Corrupt => vec![ROLLED_BACK],
        (Kind::Commit, false) => vec![STRANDED],
        (Kind::Commit, true) => vec![HANDED_OVER_UNSURE],
        (Kind::Resumed, false) => vec![HANDED_OVER_UNSURE],
        (Kind::Resumed, true) => vec![COMPLETED_UNVERIFIED],
        (Kind::Result, false) => vec![COMPLETED_UNVERIFIED],
        (Kind::Result, true) => vec![COMPLETED],
        // The source has Accepted and sends Commit into a closed connection: it may not
        // know whether it went out (unknown) or know that it did not (rolled back).
        (Kind::Accepted, true) => vec![STRANDED, ROLLED_BACK],
        _ => vec![ROLLED_BACK],
    }
}

/// The VM runs on one side at most, and the destination runs it exactly when Commit reached
/// it.
fn check_one_vm(
    seen: &Observed,
    source: &SourceEnd,
    destination: &DestinationEnd,
    failures: &mut Vec<String>,
) {
    let source_ran =
        seen.source.verify.is_some() || seen.source.run_state.as_deref() == Some("running");
    if source_ran && *destination == DestinationEnd::Runs {
        failures.push(format!(
            "the VM ran on both sides: the destination runs the arrived VM and the source {}",
            if seen.source.verify.is_some() {
                "resumed its guest to verify it on quit"
            } else {
                "says running"
            }
        ));
    }
    // Even with the destination gone, a committed source that runs again rewinds a guest that
    // already ran there.
    let committed = seen.source.report.as_ref().is_some_and(|r| r.committed);
    if committed && seen.source.verify.is_some() && *destination != DestinationEnd::Runs {
        failures.push(
            "the source resumed its guest (to verify it on quit) after sending Commit".into(),
        );
    }
    if *destination == DestinationEnd::Runs && !seen.commit_delivered {
        failures.push("the destination runs the VM without having received Commit".into());
    }
    if seen.commit_delivered
        && matches!(destination, DestinationEnd::Failed | DestinationEnd::Waited)
    {
        failures.push("the destination received Commit but does not run the VM".into());
    }
    if seen.commit_delivered && matches!(source, SourceEnd::RanOn { .. }) {
        failures.push("the source rolled back although its Commit reached the destination".into());
    }
    match source {
        SourceEnd::HandedOver { .. } if !seen.resumed_delivered => {
            failures.push("the source completed without receiving Resumed".into());
        }
        SourceEnd::HandedOver { verified: true } if !seen.result_delivered => {
            failures.push("the source says verified without receiving the Result".into());
        }
        SourceEnd::Unknown if seen.resumed_delivered => {
            failures.push("the source received Resumed but says the outcome is unknown".into());
        }
        _ => {}
    }
}

/// Whoever runs the VM at the end verified it, and it passed.
fn check_survivors(
    seen: &Observed,
    source: &SourceEnd,
    destination: &DestinationEnd,
    failures: &mut Vec<String>,
) {
    match (source, seen.source.verify) {
        (SourceEnd::RanOn { .. }, Some(true)) | (SourceEnd::Killed | SourceEnd::Odd(_), _) => {}
        (SourceEnd::RanOn { .. }, Some(false)) => {
            failures.push("the source's guest verify FAILED after the rollback".into());
        }
        (SourceEnd::RanOn { .. }, None) => {
            failures.push("the source runs the VM but printed no verify: line on quit".into());
        }
        (SourceEnd::Unknown, verify) => {
            if verify.is_some() {
                failures.push(
                    "the source's outcome is unknown, yet it resumed its guest to verify it".into(),
                );
            }
            if !seen.source.said_unknown && seen.source.exit != Some(Exit::Hung) {
                failures.push(
                    "the source's outcome is unknown but quit did not say `quit: the migration's outcome is unknown`"
                        .into(),
                );
            }
        }
        (SourceEnd::HandedOver { .. }, Some(_)) => {
            failures.push("the source handed its VM over, yet it verified its guest".into());
        }
        (SourceEnd::HandedOver { .. }, None) => {}
    }
    // A source that sent Commit never runs a vCPU again.
    if matches!(source, SourceEnd::Unknown | SourceEnd::HandedOver { .. })
        && seen.source.run_state.as_deref() == Some("running")
    {
        failures.push("the source sent Commit, yet it says running".into());
    }
    if *destination == DestinationEnd::Runs {
        let d = &seen.destination;
        if d.arrived == Some(false) {
            failures
                .push("the destination's guest verify FAILED when the migration arrived".into());
        }
        match d.verify {
            Some(true) => {}
            Some(false) => failures.push("the destination's guest verify FAILED on quit".into()),
            None => failures
                .push("the destination runs the VM but printed no verify: line on quit".into()),
        }
    }
}

/// Every process exited, with the code the README gives for its outcome.
fn check_exits(
    case: &Case,
    seen: &Observed,
    source: &SourceEnd,
    destination: &DestinationEnd,
    failures: &mut Vec<String>,
) {
    // A VM whose device server the fault killed reports the device's loss beside its verify.
    let lost_device = |source_side: bool| {
        seen.fired.is_some()
            && match case.fault {
                FaultPlan::Kill {
                    victim: Victim::SourceDevice(_),
                    ..
                } => source_side,
                FaultPlan::Kill {
                    victim: Victim::DestinationDevice(_),
                    ..
                } => !source_side,
                _ => false,
            }
    };
    let source_code = match source {
        SourceEnd::RanOn { .. } if lost_device(true) => Some(1),
        SourceEnd::RanOn { .. } => Some(0),
        SourceEnd::HandedOver { verified: true } => Some(0),
        SourceEnd::HandedOver { verified: false } => Some(1),
        SourceEnd::Unknown => Some(3),
        SourceEnd::Killed | SourceEnd::Odd(_) => None,
    };
    check_exit("the source", seen.source.exit, source_code, failures);
    let destination_code = match destination {
        DestinationEnd::Runs if lost_device(false) => Some(1),
        DestinationEnd::Runs | DestinationEnd::Waited => Some(0),
        DestinationEnd::Failed => Some(2),
        DestinationEnd::Killed | DestinationEnd::Odd(_) => None,
    };
    check_exit(
        "the destination",
        seen.destination.exit,
        destination_code,
        failures,
    );
    for device in &seen.devices {
        if !device.killed {
            check_exit(&device.name, device.exit, Some(0), failures);
        }
    }
}

fn check_exit(who: &str, exit: Option<Exit>, expected: Option<i32>, failures: &mut Vec<String>) {
    match (exit, expected) {
        // The staging problem says why.
        (Some(Exit::NeverStarted), _) => {}
        (Some(Exit::Hung), _) => failures.push(format!("{who} did not exit within its bound")),
        (Some(Exit::Code(code)), Some(want)) if code != want => failures.push(format!(
            "{who} exited with code {code} where its outcome's is {want}"
        )),
        (Some(Exit::Signal(signal)), Some(want)) => failures.push(format!(
            "{who} died of signal {signal} where its outcome's exit code is {want}"
        )),
        (None, Some(_)) => failures.push(format!("{who} never exited")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Direction;
    use crate::soak::plan::{Mismatch, Trigger};

    fn case(fault: FaultPlan) -> Case {
        Case {
            fault,
            ..Case::draw(1, 0)
        }
    }

    fn stream(action: FaultAction, kind: Kind) -> FaultPlan {
        FaultPlan::Stream {
            fault: Fault::At {
                action,
                kind,
                nth: 1,
                direction: Direction::of(kind).unwrap_or(Direction::ToSource),
            },
            hold_ms: 1000,
            then: StallEnd::Close,
        }
    }

    fn report(status: &str, committed: bool, verified: bool) -> Option<SourceReport> {
        Some(SourceReport {
            status: status.into(),
            committed,
            verified,
            error: None,
        })
    }

    /// A migration that completed: the destination runs and verified; the source handed over.
    fn completed() -> Observed {
        Observed {
            commit_delivered: true,
            resumed_delivered: true,
            result_delivered: true,
            source: SourceSeen {
                report: report("completed", true, true),
                run_state: Some("postmigrate".into()),
                exit: Some(Exit::Code(0)),
                ..SourceSeen::default()
            },
            destination: DestinationSeen {
                arrived: Some(true),
                verify: Some(true),
                run_state: Some("running".into()),
                exit: Some(Exit::Code(0)),
                ..DestinationSeen::default()
            },
            ..Observed::default()
        }
    }

    /// A migration rolled back: the source verified on quit, the destination failed.
    fn rolled_back() -> Observed {
        Observed {
            source: SourceSeen {
                report: report("failed", false, false),
                run_state: Some("running".into()),
                verify: Some(true),
                exit: Some(Exit::Code(0)),
                ..SourceSeen::default()
            },
            destination: DestinationSeen {
                failed: Some("the peer closed".into()),
                exited_by_itself: true,
                exit: Some(Exit::Code(2)),
                ..DestinationSeen::default()
            },
            ..Observed::default()
        }
    }

    #[test]
    fn a_clean_migration_passes_as_completed() {
        let verdict = judge(&case(FaultPlan::None), &completed());
        assert_eq!(verdict.outcome, COMPLETED);
        assert_eq!(verdict.failures, Vec::<String>::new());
    }

    #[test]
    fn cut_after_commit_is_the_source_unsure_with_exit_3_and_no_verify() {
        let fault = stream(FaultAction::CutAfter, Kind::Commit);
        let mut seen = completed();
        seen.fired = Some("fault: cut after Commit #1 to the destination".into());
        seen.resumed_delivered = false;
        seen.result_delivered = false;
        seen.source = SourceSeen {
            report: report("unknown", true, false),
            run_state: Some("paused".into()),
            said_unknown: true,
            exit: Some(Exit::Code(3)),
            ..SourceSeen::default()
        };
        let verdict = judge(&case(fault), &seen);
        assert_eq!(verdict.outcome, HANDED_OVER_UNSURE);
        assert_eq!(verdict.failures, Vec::<String>::new());
        // The old behaviour: the source says failed and resumes its guest to verify it.
        seen.source = SourceSeen {
            report: report("failed", true, false),
            run_state: Some("running".into()),
            verify: Some(true),
            exit: Some(Exit::Code(0)),
            ..SourceSeen::default()
        };
        let verdict = judge(&case(fault), &seen);
        let text = verdict.failures.join("\n");
        assert!(text.contains("the VM ran on both sides"), "{text}");
        assert!(
            text.contains("status \"failed\" with committed true"),
            "{text}"
        );
    }

    #[test]
    fn a_lost_commit_strands_the_vm_and_that_is_no_failure() {
        let mut seen = rolled_back();
        seen.fired = Some("fault: cut before Commit #1 to the destination".into());
        seen.source = SourceSeen {
            report: report("unknown", true, false),
            said_unknown: true,
            exit: Some(Exit::Code(3)),
            ..SourceSeen::default()
        };
        let verdict = judge(&case(stream(FaultAction::CutBefore, Kind::Commit)), &seen);
        assert_eq!(verdict.outcome, STRANDED);
        assert_eq!(verdict.failures, Vec::<String>::new());
        // The same end from a fault before the commit is unexplained by it.
        let verdict = judge(&case(stream(FaultAction::CutBefore, Kind::Pages)), &seen);
        assert_eq!(verdict.failures.len(), 1, "{:?}", verdict.failures);
        assert!(verdict.failures[0].contains("\"rolled back\""));
        // Stranded is safe only while the source keeps its vCPUs stopped.
        seen.source.run_state = Some("running".into());
        let verdict = judge(&case(stream(FaultAction::CutBefore, Kind::Commit)), &seen);
        assert_eq!(
            verdict.failures,
            ["the source sent Commit, yet it says running"]
        );
    }

    #[test]
    fn a_rollback_needs_the_sources_verify_to_pass_and_exit_0() {
        let mut seen = rolled_back();
        seen.fired = Some("fault: corrupt Pages #3 to the destination".into());
        let fault = case(stream(FaultAction::Corrupt, Kind::Pages));
        assert_eq!(judge(&fault, &seen).outcome, ROLLED_BACK);
        assert!(judge(&fault, &seen).failures.is_empty());
        seen.source.verify = Some(false);
        seen.source.exit = Some(Exit::Code(1));
        let text = judge(&fault, &seen).failures.join("\n");
        assert!(text.contains("verify FAILED after the rollback"), "{text}");
        assert!(
            text.contains("exited with code 1 where its outcome's is 0"),
            "{text}"
        );
        seen.source.verify = None;
        seen.source.exit = Some(Exit::Code(2));
        let text = judge(&fault, &seen).failures.join("\n");
        assert!(text.contains("printed no verify: line"), "{text}");
    }

    #[test]
    fn a_dead_source_device_still_needs_the_verify_line_and_exit_1() {
        let trigger = Trigger {
            direction: Direction::ToDestination,
            kind: Kind::Pages,
            nth: 2,
            delay_ms: 0,
        };
        let fault = case(FaultPlan::Kill {
            victim: Victim::SourceDevice(0),
            trigger,
        });
        let mut seen = rolled_back();
        seen.fired = Some("killed source-device-0".into());
        seen.source.exit = Some(Exit::Code(1));
        assert!(judge(&fault, &seen).failures.is_empty());
        seen.source.verify = None;
        seen.source.exit = Some(Exit::Code(2));
        let text = judge(&fault, &seen).failures.join("\n");
        assert!(text.contains("printed no verify: line"), "{text}");
        assert!(text.contains("code 2 where its outcome's is 1"), "{text}");
    }

    #[test]
    fn a_refusal_must_roll_back_and_name_what_differs() {
        let fault = case(FaultPlan::Refusal(Mismatch::Memory(32)));
        let mut seen = rolled_back();
        seen.source.report.as_mut().unwrap().error = Some(
            "the destination refused: the source's VM has 16 MiB of RAM; this destination prepared 32 MiB (--mem)"
                .into(),
        );
        let verdict = judge(&fault, &seen);
        assert_eq!(verdict.outcome, REFUSED);
        assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
        let verdict = judge(&fault, &completed());
        assert!(!verdict.failures.is_empty());
    }

    #[test]
    fn hangs_and_lost_results_are_failures_unless_the_fault_explains_them() {
        let mut seen = completed();
        seen.destination.exit = Some(Exit::Hung);
        let text = judge(&case(FaultPlan::None), &seen).failures.join("\n");
        assert!(
            text.contains("the destination did not exit within its bound"),
            "{text}"
        );
        let mut seen = completed();
        seen.result_delivered = false;
        seen.source.report = report("completed", true, false);
        seen.source.exit = Some(Exit::Code(1));
        let verdict = judge(&case(FaultPlan::None), &seen);
        assert_eq!(verdict.outcome, COMPLETED_UNVERIFIED);
        assert!(!verdict.failures.is_empty());
        seen.fired = Some("fault: cut before Result #1 to the source".into());
        let verdict = judge(&case(stream(FaultAction::CutBefore, Kind::Result)), &seen);
        assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
    }

    #[test]
    fn a_committed_source_never_runs_again_even_when_the_destination_died() {
        let trigger = Trigger {
            direction: Direction::ToSource,
            kind: Kind::Resumed,
            nth: 1,
            delay_ms: 0,
        };
        let fault = case(FaultPlan::Kill {
            victim: Victim::Destination,
            trigger,
        });
        let mut seen = completed();
        seen.fired = Some("fault: killed destination".into());
        seen.result_delivered = false;
        seen.destination = DestinationSeen {
            killed: true,
            exit: Some(Exit::Signal(9)),
            ..DestinationSeen::default()
        };
        seen.source.report = report("completed", true, false);
        seen.source.exit = Some(Exit::Code(1));
        let verdict = judge(&fault, &seen);
        assert_eq!(verdict.outcome, DESTINATION_KILLED_AFTER);
        assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
        // The old behaviour: failed after the commit, and the guest resumed here.
        seen.source.report = report("failed", true, false);
        seen.source.verify = Some(true);
        seen.source.exit = Some(Exit::Code(0));
        let text = judge(&fault, &seen).failures.join("\n");
        assert!(
            text.contains("resumed its guest (to verify it on quit) after sending Commit"),
            "{text}"
        );
    }

    #[test]
    fn a_fault_that_never_fired_must_leave_a_completed_migration() {
        let fault = case(stream(FaultAction::Stall, Kind::Pages));
        assert!(judge(&fault, &completed()).failures.is_empty());
        assert!(!judge(&fault, &rolled_back()).failures.is_empty());
    }
}
