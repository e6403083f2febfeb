//! The seeded generator of the fuzz targets' stable twins: xorshift64, so that a run of
//! `cargo test` is the same run every time and a failure names the input that caused it.

#![allow(
    dead_code,
    reason = "each stable twin that includes this module uses a part of it"
)]

/// A xorshift64 generator.
pub struct Random(u64);

impl Random {
    /// A generator from `seed` (0 is replaced: xorshift stays at 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        usize::try_from(self.next().checked_rem(n).unwrap_or(0)).unwrap_or(0)
    }

    /// The low byte of the next number.
    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// Whether an event of probability 1 in `n` happens.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// Mutates `bytes` as a fuzzer does, `rounds` times: flips a bit, sets a byte, cuts the
    /// end, inserts random bytes, or copies a run from one place to another.
    pub fn mutate(&mut self, bytes: &mut Vec<u8>, rounds: usize) {
        for _ in 0..rounds {
            let at = self.below(bytes.len().max(1));
            match self.below(6) {
                0 if !bytes.is_empty() => bytes[at] ^= 1 << self.below(8),
                1 if !bytes.is_empty() => bytes[at] = self.byte(),
                2 => bytes.truncate(at),
                3 => {
                    let len = self.below(16);
                    let insert = self.bytes(len);
                    let at = at.min(bytes.len());
                    bytes.splice(at..at, insert);
                }
                4 if !bytes.is_empty() => {
                    let len = self.below(32).min(bytes.len() - at);
                    let run = bytes[at..at + len].to_vec();
                    let to = self.below(bytes.len());
                    let end = (to + len).min(bytes.len());
                    bytes[to..end].copy_from_slice(&run[..end - to]);
                }
                _ if !bytes.is_empty() => bytes[at] = 0,
                _ => bytes.push(self.byte()),
            }
        }
    }
}
