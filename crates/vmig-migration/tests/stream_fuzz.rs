//! The `stream` fuzz target's property (`fuzz/properties/stream.rs`) on stable Rust, over
//! [`INPUTS`] seeded random inputs: raw bytes, a valid hello followed by raw bytes, a source's
//! whole migration (framed right) mutated as a fuzzer mutates, and random and mutated scripts
//! of well-framed records. None may panic, and together they must reach every state of the
//! receiver's table and every way of ending, so the property is checked deep in the stream
//! and not only at its first bytes.

#[path = "../../../fuzz/properties/random.rs"]
mod random;
#[path = "../../../fuzz/properties/script.rs"]
mod script;
#[path = "../../../fuzz/properties/stream.rs"]
mod stream;

use random::Random;
use stream::{End, Outcome};
use vmig_migration::stream::{Hello, State};

/// Random inputs run through the property.
const INPUTS: usize = 200_000;
/// Bytes of the hello's part of [`stream::a_source_script`], and the records after it (three
/// bytes each: operation, kind, no parameters).
const SOURCE_HELLO: usize = 11;
const SOURCE_RECORDS: usize = 13;

/// One input of the kind `class` picks.
fn input(random: &mut Random, class: usize, source: &[u8]) -> Vec<u8> {
    match class {
        // Raw bytes as the connection's: mostly refused at the hello.
        0 => {
            let mut bytes = vec![0];
            let len = random.below(96);
            bytes.extend(random.bytes(len));
            bytes
        }
        // A valid hello, then raw bytes: refused at the first record's framing.
        1 => {
            let channels = 1 + u16::from(random.byte() % 4);
            let hello = Hello {
                channel: u16::try_from(random.below(usize::from(channels))).unwrap(),
                channels,
                session: random.next(),
            };
            let mut bytes = vec![0];
            bytes.extend(hello.encode());
            let len = random.below(64);
            bytes.extend(random.bytes(len));
            bytes
        }
        // A source's whole migration, framed, then mutated as bytes (raw mode).
        2 => {
            let mut connection = stream::build(source);
            let rounds = 1 + random.below(3);
            random.mutate(&mut connection, rounds);
            [vec![0], connection].concat()
        }
        // A source's script mutated: records dropped, repeated, swapped, corrupted.
        3 => {
            let mut script = source.to_vec();
            let rounds = random.below(4);
            random.mutate(&mut script, rounds);
            let mut bytes = vec![1];
            bytes.extend(script);
            bytes
        }
        // A source's script with one record's payload replaced by random bytes: refused by
        // its decoder deep in the stream, or (an empty record) taken.
        4 => {
            let mut script = source.to_vec();
            let record = SOURCE_HELLO + 3 * random.below(SOURCE_RECORDS);
            let len = random.below(24);
            script[record] = 5;
            script[record + 2] = u8::try_from(len).unwrap();
            script.splice(record + 3..record + 3, random.bytes(len));
            [vec![1], script].concat()
        }
        // A random script.
        _ => {
            let mut bytes = vec![1];
            let len = random.below(160);
            bytes.extend(random.bytes(len));
            bytes
        }
    }
}

#[test]
fn random_connections_never_panic_and_walk_the_whole_state_table() {
    let source = stream::a_source_script();
    // The source's script itself goes all the way: every record taken, Committed reached.
    let whole = stream::check(&[&[1][..], &source].concat());
    assert_eq!(source.len(), SOURCE_HELLO + 3 * SOURCE_RECORDS);
    assert_eq!(whole.records, SOURCE_RECORDS, "{whole:?}");
    assert_ne!(
        whole.states & stream::state_bit(State::Committed),
        0,
        "{whole:?}"
    );
    assert_eq!(
        whole.end,
        End::Framing,
        "it ends where the bytes do: {whole:?}"
    );

    let mut random = Random::new(0x5eed_0001);
    let mut states = 0u16;
    let mut ends = [0usize; 4];
    let mut records = 0;
    let started = std::time::Instant::now();
    for n in 0..INPUTS {
        let data = input(&mut random, n % 6, &source);
        let outcome: Outcome = std::panic::catch_unwind(|| stream::check(&data))
            .unwrap_or_else(|_| panic!("input {n} panicked: {data:02x?}"));
        states |= outcome.states;
        records += outcome.records;
        ends[match outcome.end {
            End::Hello => 0,
            End::Framing => 1,
            End::StateTable => 2,
            End::Decode => 3,
        }] += 1;
    }
    println!(
        "{INPUTS} inputs in {:.1?}: {records} records taken; ended at the hello {}, framing {}, state table {}, decoding {}",
        started.elapsed(),
        ends[0],
        ends[1],
        ends[2],
        ends[3]
    );
    for state in State::ALL {
        assert_ne!(
            states & stream::state_bit(state),
            0,
            "no input reached {state:?}"
        );
    }
    for (end, count) in ["hello", "framing", "state table", "decoding"]
        .iter()
        .zip(ends)
    {
        assert!(
            count >= INPUTS / 50,
            "only {count} of {INPUTS} inputs ended at the {end}: {ends:?}"
        );
    }
    assert!(records >= INPUTS, "only {records} records taken");
}
