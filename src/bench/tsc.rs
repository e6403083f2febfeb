//! The host's time-stamp counter rate, which KVM gives its guests unscaled: QEMU's bench guest
//! paces its writes in TSC cycles.

use std::time::{Duration, Instant};

fn read_tsc() -> u64 {
    // SAFETY: RDTSC reads a counter every x86-64 CPU has; it touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// TSC cycles per second, measured over 100 ms.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "a positive rate far below 2^52, rounded down"
)]
pub fn cycles_per_second() -> u64 {
    let (start, first) = (Instant::now(), read_tsc());
    std::thread::sleep(Duration::from_millis(100));
    let cycles = read_tsc().wrapping_sub(first);
    (cycles as f64 / start.elapsed().as_secs_f64()) as u64
}
