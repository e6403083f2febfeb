//! The `v1_region` fuzz target's property (`fuzz/properties/v1_region.rs`) on stable Rust,
//! over [`INPUTS`] seeded random inputs: random scripts of region accesses, and the paths of
//! the reference (live migration with save iterations, save without pre-copy, cancel,
//! resume with chunks, internal failures and resets) with accesses of every kind mixed in
//! and mutated as a fuzzer mutates. None may panic or break a rule of the reference, and
//! together they must reach every state a device can be in (the error state included),
//! whole save chunks and completed resumes.

#[path = "../../../fuzz/properties/random.rs"]
mod random;
#[path = "../../../fuzz/properties/script.rs"]
mod script;
#[path = "../../../fuzz/properties/v1_region.rs"]
mod v1_region;

use random::Random;

/// Random inputs run through the property.
const INPUTS: usize = 60_000;

/// Script pieces, as `v1_region::check` reads them.
fn to_state(state: u8) -> Vec<u8> {
    vec![2, state]
}
const SAVE_ITERATION: u8 = 7;
const RESET: [u8; 2] = [10, 0];
const FAIL_NEXT: [u8; 2] = [10, 1];

/// A path of the reference, with noise: a random access now and then.
fn path(random: &mut Random) -> Vec<u8> {
    // The device's record size: none, small, a page (the first byte of a script).
    let mut script = vec![random.byte() % 4];
    let push = |script: &mut Vec<u8>, piece: &[u8], random: &mut Random| {
        script.extend_from_slice(piece);
        if random.one_in(4) {
            // A header read, a data access, or a device_state write of any value.
            let noise = random.below(3);
            script.push([0, 6, 4][noise]);
            script.extend(random.bytes(8));
        }
    };
    let iterations = |random: &mut Random| vec![SAVE_ITERATION; 1 + random.below(3)];
    match random.below(5) {
        // Live migration: 001 → 011 → 010 → 000, then run again.
        0 => {
            push(&mut script, &to_state(3), random);
            push(&mut script, &iterations(random), random);
            push(&mut script, &to_state(2), random);
            push(&mut script, &iterations(random), random);
            push(&mut script, &to_state(0), random);
            push(&mut script, &to_state(1), random);
        }
        // Save without pre-copy; or cancelled.
        1 => {
            push(&mut script, &to_state(2), random);
            push(&mut script, &iterations(random), random);
            push(
                &mut script,
                &to_state(if random.one_in(2) { 0 } else { 1 }),
                random,
            );
        }
        // Resume: 001 → 100, chunks (data_offset, data, data_size), → 001.
        2 => {
            push(&mut script, &to_state(4), random);
            for _ in 0..1 + random.below(2) {
                // A chunk as a source's server frames its records: a u32 length, the bytes.
                let len = random.below(40);
                let record = [
                    u32::try_from(len).unwrap().to_le_bytes().to_vec(),
                    random.bytes(len),
                ]
                .concat();
                let chunk = [vec![9, u8::try_from(record.len()).unwrap()], record].concat();
                push(&mut script, &chunk, random);
            }
            push(&mut script, &to_state(1), random);
        }
        // An internal failure on the way, then a reset.
        3 => {
            push(&mut script, &FAIL_NEXT, random);
            push(
                &mut script,
                &to_state([0, 2, 3, 4][random.below(4)]),
                random,
            );
            push(&mut script, &to_state(1), random);
            push(&mut script, &RESET, random);
            push(&mut script, &to_state(3), random);
            push(&mut script, &iterations(random), random);
        }
        // Anything.
        _ => {
            let len = random.below(96);
            script.extend(random.bytes(len));
        }
    }
    script
}

#[test]
fn random_region_accesses_never_panic_and_keep_the_references_rules() {
    let mut random = Random::new(0x5eed_0003);
    let (mut answered, mut refused, mut states, mut chunks, mut resumes) = (0, 0, 0u8, 0, 0);
    let started = std::time::Instant::now();
    for n in 0..INPUTS {
        let mut data = path(&mut random);
        if random.one_in(3) {
            let rounds = 1 + random.below(3);
            random.mutate(&mut data, rounds);
        }
        let outcome = std::panic::catch_unwind(|| v1_region::check(&data))
            .unwrap_or_else(|_| panic!("input {n} panicked: {data:?}"));
        answered += outcome.answered;
        refused += outcome.refused;
        states |= outcome.states;
        chunks += outcome.chunks;
        resumes += outcome.resumes;
    }
    println!(
        "{INPUTS} inputs in {:.1?}: {answered} accesses answered, {refused} refused; states \
         {states:08b}; {chunks} save chunks read whole; {resumes} resumes with data",
        started.elapsed()
    );
    for state in [0, 1, 2, 3, 4, 6] {
        assert_ne!(states & (1 << state), 0, "no input reached {state:03b}");
    }
    assert_eq!(states & 0b1010_0000, 0, "101b and 111b are no states");
    assert!(chunks >= INPUTS / 10, "only {chunks} save chunks");
    assert!(resumes >= INPUTS / 100, "only {resumes} resumes");
    assert!(
        refused >= INPUTS && answered >= INPUTS,
        "{answered} answered, {refused} refused"
    );
}
