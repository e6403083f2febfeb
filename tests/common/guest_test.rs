//! The host half of a root-package test that runs inside the kernel-VFIO guest
//! (`vmig_kernel_guest`): boot the guest with this package's test target and the static `vmig`
//! binary beside it, run one in-guest test alone, and check it passed. Included with
//! `#[path = "common/guest_test.rs"] mod guest_test;`.

use std::time::Duration;

use vmig_kernel_guest::{Guest, GuestBinary, GuestRun};

/// Console lines of a failure shown.
const TAIL_LINES: usize = 80;

/// Boots the guest with test target `target` of this package (and `vmig` at `/bin/vmig`),
/// runs its test `in_guest_test` alone, with `memory_mib` of guest RAM, for at most `timeout`;
/// prints each console line that carries `echo` (what follows it), and asserts the test ran
/// and passed with nothing skipped. `None` when the guest cannot run here: the test is
/// skipped, saying why.
pub fn run_in_guest(
    target: &str,
    in_guest_test: &str,
    memory_mib: u32,
    timeout: Duration,
    echo: &str,
) -> Option<GuestRun> {
    let guest = Guest::prepare_or_skip(vmig_test_support::skip)?;
    let build = |binary| guest.build_binary(binary, false).expect("a static build");
    let test = build(GuestBinary::Test {
        package: "vmig",
        name: target,
    });
    let vmig = build(GuestBinary::Bin {
        package: "vmig",
        name: "vmig",
    });
    let run = guest
        .boot_with(
            &test,
            &[("vmig", &vmig)],
            &["--exact", in_guest_test, "--nocapture", "--test-threads=1"],
            memory_mib,
            timeout,
        )
        .expect("the guest boots");
    println!(
        "guest (Linux {}) ran in {:.1} s",
        guest.kernel_release(),
        run.duration.as_secs_f64()
    );
    let console: Vec<&str> = run.console.lines().collect();
    let tail = console[console.len().saturating_sub(TAIL_LINES)..].join("\n");
    // libtest may print a line's start ("test NAME ... ") before the test's own output.
    for line in console.iter().filter_map(|l| l.split_once(echo)) {
        println!("  guest: {}", line.1);
    }
    assert!(!run.timed_out, "the guest timed out; console:\n{tail}");
    assert_eq!(run.exit_code, Some(0), "the in-guest test failed:\n{tail}");
    assert!(
        run.console.contains("test result: ok. 1 passed"),
        "the in-guest test did not run:\n{tail}"
    );
    assert!(!run.console.contains("skipped:"), "{tail}");
    Some(run)
}
