//! Feeds arbitrary bytes, as what a client sends on the control socket of `vmig run --api`,
//! to the QMP framer and the request handling of a control socket without a VM: the property
//! is in `fuzz/properties/qmp.rs`, which `cargo test` also runs (the stable twin,
//! `tests/qmp_fuzz.rs`).
#![no_main]

#[path = "../properties/qmp.rs"]
#[allow(
    dead_code,
    reason = "the target calls `check` only; its stable twin uses the rest"
)]
mod qmp;
#[path = "../properties/script.rs"]
mod script;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qmp::check(data);
});
