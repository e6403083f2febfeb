//! Feeds arbitrary bytes, as one connection of a migration stream, to the destination's
//! reading of it (hello, record framing, the receiver's state table, the record decoder): the
//! property is in `fuzz/properties/stream.rs`, which `cargo test` also runs (the stable twin,
//! `crates/vmig-migration/tests/stream_fuzz.rs`).
#![no_main]

#[path = "../properties/script.rs"]
mod script;
#[path = "../properties/stream.rs"]
#[allow(
    dead_code,
    reason = "the target calls `check` only; its stable twin uses the rest"
)]
mod stream;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stream::check(data);
});
