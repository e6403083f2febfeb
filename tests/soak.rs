//! A short `vmig soak` in the default `cargo test`: a few randomized migrations with faults,
//! each between fresh processes and judged by the soak; then one of them replayed alone, which
//! must be the same case; and the soak's refusal of bad arguments.

use vmig_test_support::require_kvm;

#[path = "common/cli.rs"]
mod cli;
use cli::vmig;

/// The CI soak's seed. Its four cases (`vmig soak --seed 31 --count 4 --list` prints them):
/// the stream cut before Ready, a migration with no fault, the source killed in pre-copy and
/// migrate_cancel in pre-copy. Each ends in an outcome the protocol fixes however fast the
/// build migrates: a killed source's destination runs exactly when Commit reached it, and a
/// cancel acknowledged before Accepted must roll back. (A destination killed at a time is no
/// such case: whether it dies before or after Commit depends on the build's speed, and so
/// does what the source must report.)
const SEED: &str = "31";

/// The line `[INDEX] PARAMETERS => OUTCOME (TIME)` of case `index`, up to the outcome.
fn case_line(stdout: &str, index: u64) -> Option<String> {
    stdout
        .lines()
        .find(|line| line.starts_with(&format!("[{index}] ")))
        .and_then(|line| line.split_once(" => "))
        .map(|(case, _)| case.to_string())
}

#[test]
fn a_short_soak_passes_and_a_case_replays_alone() {
    require_kvm!();
    let out = vmig()
        .args(["soak", "--count", "4", "--seed", SEED, "--keep-going"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "soak: 4 migrations, seed {SEED}, 0 failures, outcomes: "
        )),
        "{stdout}"
    );
    for index in 0..4 {
        assert!(
            case_line(&stdout, index).is_some(),
            "case {index}: {stdout}"
        );
    }
    let replay = vmig()
        .args(["soak", "--seed", SEED, "--first", "2", "--count", "1"])
        .output()
        .unwrap();
    let replayed = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{replayed}");
    assert_eq!(case_line(&replayed, 2), case_line(&stdout, 2), "{replayed}");
    assert!(case_line(&replayed, 3).is_none(), "{replayed}");
}

#[test]
fn bad_soak_arguments_are_one_line_saying_what_was_expected() {
    for (args, expected) in [
        (
            &["--count", "0"][..],
            "vmig: error: --count 0: expected at least one migration",
        ),
        (
            &["--first", "18446744073709551615", "--count", "2"][..],
            "vmig: error: --first 18446744073709551615 --count 2: the case indices pass 2^64",
        ),
    ] {
        let out = vmig().arg("soak").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), expected, "{args:?}");
    }
}
