//! Feeds arbitrary bytes, as a vfio-user message, to the server's command decoder: it must
//! answer every input with a request or a refusal, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmig_vfio_user::server::request::decode_bytes(data, 1 << 20);
});
