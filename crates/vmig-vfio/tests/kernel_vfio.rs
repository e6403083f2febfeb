//! Boots the real kernel's VFIO (Debian's Linux 6.12 under QEMU's TCG, emulated VT-d, QEMU's
//! edu device, four mtty mediated devices; see `vmig_kernel_guest`) with `tests/in_guest.rs`
//! built as a static binary, checks that every in-guest test passed, prints what the guest
//! reported of the mtty devices, and replays the guest's differential sequences against
//! `vmig-dma` here on the host. Skips, saying why, where
//! Debian's packages or QEMU cannot be had (no apt, no network, not root); fails on anything
//! else that goes wrong.

use std::time::Duration;

use vmig_kernel_guest::differential::{self, KernelRun};
use vmig_kernel_guest::{Guest, GuestBinary};

#[test]
fn the_backend_against_the_real_kernel_in_an_emulated_guest() {
    let Some(guest) = Guest::prepare_or_skip(vmig_test_support::skip) else {
        return;
    };
    let binary = guest
        .build_binary(
            GuestBinary::Test {
                package: "vmig-vfio",
                name: "in_guest",
            },
            false,
        )
        .expect("static in-guest test binary");
    let run = guest
        .boot(
            &binary,
            &["--test-threads=1"],
            768,
            Duration::from_secs(600),
        )
        .expect("the guest boots");
    println!(
        "guest (Linux {}) ran in {:.1} s",
        guest.kernel_release(),
        run.duration.as_secs_f64()
    );
    for line in run.console.lines().filter(|l| l.starts_with("test ")) {
        println!("  guest: {}", line.trim_end());
    }
    let tail: String = run
        .console
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        run.exit_code,
        Some(0),
        "in-guest tests failed; console:\n{tail}"
    );
    // Every test ran (none skipped for a missing device): libtest's summary, and no skip line.
    let sources = include_str!("in_guest.rs");
    let expected = sources.matches("#[test]").count();
    assert!(
        run.console
            .contains(&format!("test result: ok. {expected} passed")),
        "expected {expected} in-guest tests to pass; console:\n{tail}"
    );
    assert!(!run.console.contains("skipped:"), "{tail}");
    if let Some(quirk) = run.report_lines("VMIG-QUIRK ").next() {
        println!("kernel quirk observed: {quirk}");
    }
    for mtty in run.report_lines("VMIG-MTTY ") {
        println!("mtty device: {mtty}");
    }

    // The differential: the kernel's answers against vmig-dma's, call by call.
    let runs: Vec<KernelRun> = run
        .report_lines("VMIG-DIFF ")
        .map(|l| serde_json::from_str(l).expect("a differential line"))
        .collect();
    assert_eq!(runs.len(), 12, "one line per seed");
    let (mut calls_total, mut succeeded, mut failed, mut quirk_bits) = (0, 0, 0, 0);
    for kernel in &runs {
        let calls = differential::sequence(kernel.seed, kernel.answers.len());
        let (ours, before) =
            differential::run_on_vmig_dma(kernel.iova_pgsizes, &kernel.iova_ranges, &calls);
        let c = differential::compare(&calls, &kernel.answers, &ours, &before);
        assert!(
            c.differences.is_empty(),
            "seed {}: the kernel and vmig-dma differ:\n{}",
            kernel.seed,
            c.differences.join("\n")
        );
        calls_total += calls.len();
        succeeded += c.succeeded;
        failed += c.failed;
        quirk_bits += c.quirk_bits;
    }
    println!(
        "differential: {calls_total} calls in {} sequences agree ({succeeded} succeeded, {failed} \
         refused with the same errno); {quirk_bits} stale bits from the kernel's quirk ignored",
        runs.len()
    );
    assert!(
        succeeded > calls_total / 4 && failed > calls_total / 20,
        "too few calls of each kind"
    );
}
