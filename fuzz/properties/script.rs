//! A fuzz input read as a script: numbers and byte strings taken from its front, and zeros
//! once it is used up, so that every input, however short, is a whole script. The properties
//! of the fuzz targets read their inputs through it; each includes this file as `crate::script`.

#![allow(
    dead_code,
    reason = "each property that includes this module uses a part of it"
)]

/// The rest of an input.
pub struct Script<'a> {
    bytes: &'a [u8],
}

impl<'a> Script<'a> {
    /// The script of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Up to `n` bytes from the front (fewer when fewer are left).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// The next byte, 0 when none is left.
    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// The next `N` bytes, zero-padded.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let taken = self.take(N);
        out[..taken.len()].copy_from_slice(taken);
        out
    }

    /// The next little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A number below `n` (0 when `n` is 0), from the next byte when `n` fits one, else from
    /// the next `u32`.
    pub fn below(&mut self, n: usize) -> usize {
        let value = if n <= 256 {
            usize::from(self.byte())
        } else {
            usize::try_from(self.u32()).unwrap_or(usize::MAX)
        };
        value.checked_rem(n).unwrap_or(0)
    }

    /// A yes or no: the low bit of the next byte.
    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// One of `choices` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }
}
