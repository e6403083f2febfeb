//! Feeds arbitrary bytes, as a script of reads and writes of a v1 device's migration region,
//! to the vfio-user server's request handling: the property is in
//! `fuzz/properties/v1_region.rs`, which `cargo test` also runs (the stable twin,
//! `crates/vmig-vfio-user/tests/v1_region_fuzz.rs`).
#![no_main]

#[path = "../properties/script.rs"]
mod script;
#[path = "../properties/v1_region.rs"]
#[allow(
    dead_code,
    reason = "the target calls `check` only; its stable twin uses the rest"
)]
mod v1_region;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    v1_region::check(data);
});
