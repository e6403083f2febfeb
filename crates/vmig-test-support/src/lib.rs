//! What the workspace's tests share, and nothing else (a dev-dependency only):
//!
//! - [`skip`]: a test that cannot run here says why. libtest has no "skipped" outcome, so such a
//!   test shows as `ok`; `skip` also appends the reason to a log that `.ci/run` counts and
//!   prints after `cargo test`, so a skip is never silent. The log is `$VMIG_TEST_SKIPS` when
//!   set, else `target/test-skips.log` beside the test binary.
//! - [`require_kvm!`]: returns from the test, through [`skip`], when `/dev/kvm` cannot be opened.
//! - [`wait_until`]: polls a condition up to a generous deadline instead of sleeping a fixed
//!   time and hoping it was long enough (this machine is shared and noisy).
//! - [`two_hosts`]: a source and a destination on two network namespaces joined by a link
//!   shaped in rate, delay and loss, made by the test and removed at its end (its only
//!   `unsafe`, the TUN devices and entering a namespace, is in `two_hosts/sys.rs`).
//!
//! What it leaves to others: reaching the real kernel's VFIO in an emulated guest, the
//! differential run and the in-guest benchmark (`crates/vmig-kernel-guest`, dev-only too). It
//! prints: what it prints is test output.

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod two_hosts;

/// The environment variable naming the skip log.
pub const SKIP_LOG_ENV: &str = "VMIG_TEST_SKIPS";

/// Whether `/dev/kvm` can be opened for reading and writing; `Err` says why not.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Returns from the calling test, recording a skip, when `/dev/kvm` cannot be opened.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(why) = $crate::kvm_available() {
            $crate::skip(format_args!("this test needs KVM ({why})"));
            return;
        }
    };
}

/// The skip log: `$VMIG_TEST_SKIPS`, else `target/test-skips.log` (the test binary lives in
/// `target/<profile>/deps/`).
fn skip_log() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    target
        .join("CACHEDIR.TAG")
        .exists()
        .then(|| target.join("test-skips.log"))
}

/// The running test's name: libtest names each test's thread after it.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => stem,
        })
        .unwrap_or_default();
    match std::thread::current().name() {
        Some(name) if name != "main" => format!("{binary}::{name}"),
        _ => binary,
    }
}

/// Says why the calling test does not run here: prints `skipped: TEST: WHY` and appends the
/// same line to the skip log. The caller returns right after.
pub fn skip(why: impl Display) {
    let line = format!("skipped: {}: {why}", test_name());
    println!("{line}");
    let Some(log) = skip_log() else { return };
    // One write of one line with O_APPEND: lines from tests running at once do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        println!("(could not record the skip in {}: {e})", log.display());
    }
}

/// Polls `probe` every few milliseconds until it returns `Ok`, and returns that value; once
/// `timeout` has passed, panics naming `what` and the last `Err` (the state it saw).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_value_the_probe_gives() {
        let mut calls = 0;
        let value = wait_until("the third call", Duration::from_secs(10), || {
            calls += 1;
            if calls == 3 {
                Ok(calls * 10)
            } else {
                Err(format!("call {calls}"))
            }
        });
        assert_eq!(value, 30);
    }

    #[test]
    #[should_panic(expected = "waited 20ms for nothing; last seen: still nothing")]
    fn wait_until_names_what_it_waited_for_when_time_runs_out() {
        wait_until("nothing", Duration::from_millis(20), || {
            Err::<(), _>("still nothing".into())
        });
    }

    #[test]
    fn a_test_is_named_by_its_binary_and_thread() {
        let name = test_name();
        assert!(
            name.starts_with("vmig_test_support::")
                && name.ends_with("a_test_is_named_by_its_binary_and_thread"),
            "{name}"
        );
    }
}
