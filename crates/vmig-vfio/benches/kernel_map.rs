//! `cargo bench -p vmig-vfio`: the time to map 1 GiB of guest RAM into a type1 container and
//! to fetch its dirty bitmap, through the backend against the bare ioctls, measured in the
//! same run of the emulated guest (`vmig_kernel_guest`; the guest's CPU is emulated by
//! QEMU's TCG, so absolute times are slow, and only the ratios mean anything).

use std::time::Duration;

use vmig_kernel_guest::bench::Round;
use vmig_kernel_guest::{Guest, GuestBinary};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Some(guest) = Guest::prepare_or_skip(|why| println!("skipped: {why}")) else {
        return;
    };
    let binary = guest
        .build_binary(
            GuestBinary::Example {
                package: "vmig-vfio",
                name: "guest_bench",
            },
            true,
        )
        .expect("static guest benchmark");
    let run = guest
        .boot(&binary, &[], 2048, Duration::from_secs(900))
        .expect("the guest boots");
    let rounds: Vec<Round> = run
        .report_lines("VMIG-BENCH ")
        .map(|l| serde_json::from_str(l).expect("a bench line"))
        .collect();
    if run.exit_code != Some(0) || rounds.is_empty() {
        let tail: Vec<&str> = run.console.lines().rev().take(40).collect();
        panic!(
            "the guest benchmark failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    println!(
        "1 GiB in the emulated guest (Linux type1, VT-d under TCG), {} rounds:",
        rounds.len()
    );
    println!("round  map backend  map raw   ratio   bitmap backend  bitmap raw  ratio");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "{i:>5}  {:>9.1?}  {:>9.1?}  {:>5.2}x  {:>12.1?}  {:>10.1?}  {:>5.2}x",
            r.backend_map,
            r.raw_map,
            r.backend_map.as_secs_f64() / r.raw_map.as_secs_f64(),
            r.backend_bitmap,
            r.raw_bitmap,
            r.backend_bitmap.as_secs_f64() / r.raw_bitmap.as_secs_f64()
        );
    }
    let m = |f: fn(&Round) -> Duration| median(rounds.iter().map(f).collect());
    let (bm, rm, bb, rb) = (
        m(|r| r.backend_map),
        m(|r| r.raw_map),
        m(|r| r.backend_bitmap),
        m(|r| r.raw_bitmap),
    );
    println!(
        "median: map {bm:.1?} vs {rm:.1?} ({:.2}x the raw ioctl), bitmap {bb:.1?} vs {rb:.1?} ({:.2}x)",
        bm.as_secs_f64() / rm.as_secs_f64(),
        bb.as_secs_f64() / rb.as_secs_f64()
    );
}
