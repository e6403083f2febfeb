//! The `qmp` fuzz target's property (`fuzz/properties/qmp.rs`) on stable Rust, over
//! [`INPUTS`] seeded random inputs: raw bytes, a conversation (negotiation, then requests)
//! mutated as a fuzzer mutates, and scripts of requests with the commands' own argument names
//! and values of every JSON type. None may panic, and together they must reach both error
//! classes, successful commands after the negotiation, and both outcomes of the port-ops
//! parser, so that the property is checked in the commands and not only in the framer.

#[path = "../fuzz/properties/qmp.rs"]
mod qmp;
#[path = "../fuzz/properties/random.rs"]
mod random;
#[path = "../fuzz/properties/script.rs"]
mod script;

use random::Random;
use serde_json::json;
use vmig::qmp::server::{Shared, request};

/// Random inputs run through the property.
const INPUTS: usize = 50_000;

/// A client's whole conversation: the negotiation, then one request of each command.
fn conversation() -> Vec<u8> {
    let mut bytes = br#"{"execute": "qmp_capabilities"}"#.to_vec();
    for (n, command) in qmp::COMMANDS.iter().enumerate() {
        let arguments = match *command {
            "migrate" | "migrate-incoming" => json!({"uri": "unix:/nonexistent/vmig"}),
            "migrate-set-parameters" => json!({"downtime-limit": 300, "multifd-channels": 2}),
            "migrate-set-capabilities" => {
                json!({"capabilities": [{"capability": "events", "state": true}]})
            }
            "x-vmig-guest-port-io" => json!({"ops": "out:0xc000:0x76,in:0xc005"}),
            _ => json!({}),
        };
        let line = json!({"execute": command, "arguments": arguments, "id": n});
        bytes.extend(format!("\r\n{line}").into_bytes());
    }
    bytes
}

#[test]
fn the_command_list_is_every_command_vmig_answers() {
    let shared = Shared::new(None, false, false);
    let (_, negotiates, _) = request(br#"{"execute": "qmp_capabilities"}"#, false, &shared);
    assert!(negotiates);
    let (reply, _, _) = request(br#"{"execute": "query-commands"}"#, true, &shared);
    let mut answered: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    answered.sort_unstable();
    let mut listed = qmp::COMMANDS.to_vec();
    listed.push("qmp_capabilities");
    listed.sort_unstable();
    assert_eq!(
        answered, listed,
        "fuzz/properties/qmp.rs lists the commands"
    );
}

#[test]
fn random_requests_never_panic_and_every_reply_is_return_or_error() {
    let whole = qmp::session(&conversation(), 7);
    assert!(whole.negotiated, "{whole:?}");
    assert_eq!(whole.frames, 1 + qmp::COMMANDS.len(), "{whole:?}");
    assert!(
        whole.returned >= 10,
        "most commands answer without a VM: {whole:?}"
    );

    let conversation = conversation();
    let mut random = Random::new(0x5eed_0002);
    let (mut frames, mut returned, mut errors) = (0, 0, [0usize; 2]);
    let (mut negotiated, mut ops_parsed, mut ops_refused) = (0, 0, 0);
    let started = std::time::Instant::now();
    for n in 0..INPUTS {
        let data = match n % 4 {
            // Raw bytes, JSON-ish and not.
            0 => {
                let len = random.below(80);
                let mut bytes = vec![random.byte() & !1];
                for _ in 0..len {
                    let alphabet = b"{}[]\":, \n\\ab0x\xff\x04execute";
                    bytes.push(if random.one_in(3) {
                        random.byte()
                    } else {
                        alphabet[random.below(alphabet.len())]
                    });
                }
                bytes
            }
            // The conversation, mutated.
            1 => {
                let mut bytes = conversation.clone();
                let rounds = random.below(6);
                random.mutate(&mut bytes, rounds);
                [vec![random.byte() & !1], bytes].concat()
            }
            // A script of requests.
            _ => {
                let len = random.below(200);
                [vec![1], random.bytes(len)].concat()
            }
        };
        let outcome = std::panic::catch_unwind(|| qmp::check(&data))
            .unwrap_or_else(|_| panic!("input {n} panicked: {:?}", String::from_utf8_lossy(&data)));
        frames += outcome.frames;
        returned += outcome.returned;
        errors[0] += outcome.errors[0];
        errors[1] += outcome.errors[1];
        negotiated += usize::from(outcome.negotiated);
        match outcome.port_ops {
            Some(true) => ops_parsed += 1,
            Some(false) => ops_refused += 1,
            None => {}
        }
    }
    println!(
        "{INPUTS} inputs in {:.1?}: {frames} frames; {returned} returns, {} GenericError, {} \
         CommandNotFound; {negotiated} negotiated; port ops parsed {ops_parsed}, refused {ops_refused}",
        started.elapsed(),
        errors[0],
        errors[1]
    );
    for (what, count) in [
        ("returns", returned),
        ("GenericErrors", errors[0]),
        ("CommandNotFounds", errors[1]),
        ("negotiated connections", negotiated),
        ("port ops parsed", ops_parsed),
        ("port ops refused", ops_refused),
    ] {
        assert!(
            count >= INPUTS / 100,
            "only {count} {what} in {INPUTS} inputs"
        );
    }
}
