//! `vmig soak`: many migrations between fresh processes, each with randomized parameters and
//! a fault at a random point, each judged against the migration's promises.
//!
//! The module owns the command and the run over cases; a case's parameters and fault come
//! from `plan` (drawn from the seed and the case's index, so one case replays alone), its
//! staging from `case`, and its judgement from `verdict`.

mod case;
mod plan;
mod verdict;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use plan::Case;

/// Run randomized migrations with faults, and check each against the migration's promises.
///
/// Each migration runs between fresh processes of this binary (a source `vmig run --api`, a
/// destination `vmig run --incoming`, a dma-engine server per device and side), through a
/// `vmig relay` in this process, with randomized RAM, vCPUs, workload, dirty-log mode,
/// devices, connections, bandwidth and downtime limits, and one fault: none; a source,
/// destination or device server killed; the stream cut, corrupted or stalled at a record;
/// migrate_cancel; or a destination that refuses the configuration. Each is checked: the VM
/// never runs on both sides, the survivor's guest verify passes, every process exits with the
/// code its outcome has, and the outcome is one the fault explains. Prints a line per
/// migration and a summary; exits 0 only with no failure. A failed case keeps its logs and
/// prints the command that replays it alone.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Migrations to run.
    #[arg(long, value_name = "N", default_value_t = 20)]
    count: u64,
    /// The seed every case derives from (default: from the clock; printed either way).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// The index of the first case: with --count 1, replays that case of the soak alone.
    #[arg(long, value_name = "K", default_value_t = 0)]
    first: u64,
    /// Go on after a failed case (by default the soak stops at the first).
    #[arg(long)]
    keep_going: bool,
    /// Keep every case's logs, not only a failed one's.
    #[arg(long)]
    keep_logs: bool,
    /// Print the cases (their parameters and faults) without running them.
    #[arg(long)]
    list: bool,
}

/// The order the summary lists outcomes in.
const OUTCOMES: [&str; 12] = [
    verdict::COMPLETED,
    verdict::COMPLETED_UNVERIFIED,
    verdict::ROLLED_BACK,
    verdict::CANCELLED,
    verdict::REFUSED,
    verdict::HANDED_OVER_UNSURE,
    verdict::STRANDED,
    verdict::SOURCE_KILLED,
    verdict::SOURCE_KILLED_AFTER,
    verdict::DESTINATION_KILLED_AFTER_COMMIT,
    verdict::DESTINATION_KILLED_AFTER,
    verdict::UNEXPLAINED,
];

pub fn run(args: &SoakArgs) -> Result<ExitCode, String> {
    if args.count == 0 {
        return Err("--count 0: expected at least one migration".into());
    }
    let last = args.first.checked_add(args.count).ok_or_else(|| {
        format!(
            "--first {} --count {}: the case indices pass 2^64",
            args.first, args.count
        )
    })?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    if args.list {
        for index in args.first..last {
            println!("[{index}] {}", Case::draw(seed, index));
        }
        return Ok(ExitCode::SUCCESS);
    }
    vmig_kvm::kvm_available().map_err(|e| format!("the soak runs VMs on KVM: {e}"))?;
    println!(
        "soak: {} migration(s) from case {}, seed {seed}",
        args.count, args.first
    );
    let started = Instant::now();
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut ran, mut failed) = (0u64, 0u64);
    for index in args.first..last {
        let case = Case::draw(seed, index);
        let case_started = Instant::now();
        let (verdict, logs) = match case::run(&case) {
            Ok((seen, mut children)) => {
                let verdict = verdict::judge(&case, &seen);
                if args.keep_logs || !verdict.failures.is_empty() {
                    children.keep();
                }
                let logs = children.dir().display().to_string();
                (verdict, logs)
            }
            Err(e) => (
                verdict::Verdict {
                    outcome: verdict::UNEXPLAINED,
                    failures: vec![format!("staging the case: {e}")],
                },
                String::from("(none)"),
            ),
        };
        ran += 1;
        *outcomes.entry(verdict.outcome).or_default() += 1;
        let seconds = case_started.elapsed().as_secs_f64();
        if verdict.failures.is_empty() {
            println!("[{index}] {case} => {} ({seconds:.1} s)", verdict.outcome);
            if args.keep_logs {
                println!("    logs: {logs}");
            }
        } else {
            failed += 1;
            println!(
                "[{index}] {case} => FAILED, {} ({seconds:.1} s)",
                verdict.outcome
            );
            for failure in &verdict.failures {
                println!("    - {failure}");
            }
            println!("    logs: {logs}");
            println!("    replay: vmig soak --seed {seed} --first {index} --count 1");
            if !args.keep_going {
                break;
            }
        }
    }
    let counts: Vec<String> = OUTCOMES
        .iter()
        .filter_map(|o| outcomes.get(o).map(|n| format!("{o} {n}")))
        .collect();
    println!(
        "soak: {ran} migrations, seed {seed}, {failed} failures, outcomes: {} ({:.0} s)",
        counts.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A seed from the clock, for a soak not given one.
fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // The low 64 bits: a seed, not a time.
    u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0)
}
