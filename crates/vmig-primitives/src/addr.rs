//! The page size and the address spaces vmig moves pages between, as newtypes so that a
//! guest-physical address, an IOVA and a page number cannot be mixed up across crates.

use std::fmt;

/// The page size of guest memory, of dirty bitmaps and of the migration stream (x86-64's 4 KiB).
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();
/// [`PAGE_SIZE`] as a buffer length.
pub const PAGE_BYTES: usize = 1 << PAGE_SHIFT;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $show:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// The address `bytes` further on, or `None` past the end of the 64-bit space.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// The page this address is in.
            pub const fn page(self) -> PageNumber {
                PageNumber(self.0 >> PAGE_SHIFT)
            }

            /// Whether the address is at the start of a page.
            pub const fn is_page_aligned(self) -> bool {
                self.0 % PAGE_SIZE == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($show, " {:#x}"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(
    /// A guest-physical address.
    GuestAddress,
    "guest address"
);
address!(
    /// An I/O virtual address: what a device puts on the bus, translated by an IOMMU. vmig maps
    /// guest RAM with IOVA = guest-physical address, but the two stay distinct types.
    Iova,
    "IOVA"
);

/// A page number in some address space (an address divided by [`PAGE_SIZE`]); dirty bitmaps are
/// indexed by it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageNumber(pub u64);

impl PageNumber {
    /// The guest-physical address of the page's first byte.
    pub const fn guest_address(self) -> GuestAddress {
        GuestAddress(self.0 << PAGE_SHIFT)
    }
}

impl fmt::Display for PageNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A range of guest-physical memory: `len` bytes from `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestRange {
    /// The first byte.
    pub start: GuestAddress,
    /// Its length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// `len` bytes from `start`.
    pub const fn new(start: GuestAddress, len: u64) -> Self {
        Self { start, len }
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: GuestAddress) -> bool {
        addr.0 >= self.start.0 && addr.0 - self.start.0 < self.len
    }

    /// The number of pages the range covers, counting partial pages at either end.
    pub const fn pages(&self) -> u64 {
        if self.len == 0 {
            return 0;
        }
        let first = self.start.0 >> PAGE_SHIFT;
        let last = (self.start.0 + (self.len - 1)) >> PAGE_SHIFT;
        last - first + 1
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest [{:#x}, +{:#x})", self.start.0, self.len)
    }
}

/// A range of IOVA space a device may DMA into: `len` bytes from `iova` (what DMA logging
/// tracks, one per mapping).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmaRange {
    /// The first byte.
    pub iova: Iova,
    /// Its length in bytes.
    pub len: u64,
}

impl DmaRange {
    /// `len` bytes from `iova`.
    pub const fn new(iova: Iova, len: u64) -> Self {
        Self { iova, len }
    }
}

/// An area of a device region: `len` bytes from `offset` in the region (a sparse-mmap area, a
/// hole cut out of one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionArea {
    /// Its offset in the region.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl RegionArea {
    /// `len` bytes from `offset`.
    pub const fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }
}

/// The 64-bit digest of a page or any buffer (XXH3): what the stream's checksums, snapshots and
/// verification compare. It detects corruption; it is not cryptographic. A page (4096 bytes)
/// that is sparse, with at most [`SPARSE_MAX_WORDS`] non-zero 8-byte words, is digested by those
/// words ([`sparse_digest`]), so that a page sent as its words is digested as fast as it is
/// sent, on both sides; any other page or buffer by its bytes.
pub fn page_digest(bytes: &[u8]) -> u64 {
    match SparseWords::of(bytes) {
        Some(words) => sparse_digest(words.packed()),
        None => dense_digest(bytes),
    }
}

/// The digest [`page_digest`] gives a buffer that is not a sparse page, for a caller that
/// already knows it is not (and need not look for its words again).
pub fn dense_digest(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// Most non-zero 8-byte words a sparse page has.
pub const SPARSE_MAX_WORDS: usize = 64;
/// Bytes of one word of a sparse page as the stream carries it and [`sparse_digest`] takes it:
/// its index among the page's 512 words (u16), then its value (u64), little-endian.
pub const SPARSE_WORD_BYTES: usize = 10;

/// Seeds the digest of a sparse page's words, apart from the digest of any bytes.
const SPARSE_SEED: u64 = 0x5350_4152_5345_0001;

/// The digest of a sparse page from its non-zero words, packed as [`SPARSE_WORD_BYTES`] each at
/// increasing indices: what [`page_digest`] gives for that page.
pub fn sparse_digest(packed: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot_with_seed(SPARSE_SEED, packed)
}

/// A sparse page's non-zero words, packed.
#[derive(Clone, Debug)]
pub struct SparseWords {
    count: usize,
    packed: [u8; SPARSE_MAX_WORDS * SPARSE_WORD_BYTES],
}

impl SparseWords {
    /// The words of `page` if it is a page (4096 bytes) with at most [`SPARSE_MAX_WORDS`]
    /// non-zero words (none: a zero page); `None` otherwise. Zero 64-byte blocks, most of a
    /// sparse page, are skipped whole, and a page with more words is given up on at the first
    /// word too many.
    pub fn of(page: &[u8]) -> Option<Self> {
        if page.len() != PAGE_BYTES {
            return None;
        }
        let mut words = Self {
            count: 0,
            packed: [0; SPARSE_MAX_WORDS * SPARSE_WORD_BYTES],
        };
        for (block, bytes) in page.chunks_exact(64).enumerate() {
            let mut values = [0u64; 8];
            for (value, word) in values.iter_mut().zip(bytes.chunks_exact(8)) {
                *value = u64::from_le_bytes(word.try_into().ok()?);
            }
            if values.iter().fold(0, |any, v| any | v) == 0 {
                continue;
            }
            for (i, value) in values.iter().enumerate() {
                if *value == 0 {
                    continue;
                }
                if words.count == SPARSE_MAX_WORDS {
                    return None;
                }
                let at = words.count * SPARSE_WORD_BYTES;
                let index = u16::try_from(block * 8 + i).ok()?;
                words.packed[at..at + 2].copy_from_slice(&index.to_le_bytes());
                words.packed[at + 2..at + SPARSE_WORD_BYTES].copy_from_slice(&value.to_le_bytes());
                words.count += 1;
            }
        }
        Some(words)
    }

    /// How many (0: a zero page).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The words, packed as [`SPARSE_WORD_BYTES`] each.
    pub fn packed(&self) -> &[u8] {
        &self.packed[..self.count * SPARSE_WORD_BYTES]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams and snapshots carry these digests, so the hash must stay XXH3-64 exactly: the
    /// values of the reference implementation (xxHash 0.8), whichever crate computes them.
    #[test]
    fn digests_are_the_reference_xxh3_64() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(dense_digest(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(dense_digest(&page), 0x7135_ffa5_04f1_bc71);
        assert_eq!(sparse_digest(&page[..30]), 0x1eb8_7010_f796_c4d5);
    }

    #[test]
    fn pages_of_a_range_count_partial_pages() {
        assert_eq!(GuestRange::new(GuestAddress(0), 0).pages(), 0);
        assert_eq!(GuestRange::new(GuestAddress(0), 1).pages(), 1);
        assert_eq!(GuestRange::new(GuestAddress(4095), 2).pages(), 2);
        assert_eq!(GuestRange::new(GuestAddress(4096), 8192).pages(), 2);
        assert!(GuestRange::new(GuestAddress(4096), 4096).contains(GuestAddress(8191)));
        assert!(!GuestRange::new(GuestAddress(4096), 4096).contains(GuestAddress(8192)));
    }

    #[test]
    fn addresses_know_their_page() {
        assert_eq!(GuestAddress(0x3fff).page(), PageNumber(3));
        assert_eq!(PageNumber(3).guest_address(), GuestAddress(0x3000));
        assert!(Iova(0x2000).is_page_aligned());
        assert_eq!(GuestAddress(u64::MAX).checked_add(1), None);
        assert_eq!(GuestAddress(1).to_string(), "guest address 0x1");
    }

    #[test]
    fn digests_tell_pages_apart() {
        let mut page = [0u8; PAGE_BYTES];
        let a = page_digest(&page);
        page[4095] = 1;
        assert_ne!(a, page_digest(&page));
    }

    /// A page of at most 64 non-zero words is digested by its words, the same whether they
    /// come from the page or from the stream; one word more and it is digested by its bytes;
    /// every single changed bit changes the digest either way.
    #[test]
    fn sparse_pages_are_digested_by_their_words() {
        let mut page = [0u8; PAGE_BYTES];
        for i in 0..SPARSE_MAX_WORDS {
            page[i * 64 + 3] = u8::try_from(i + 1).unwrap();
        }
        let words = SparseWords::of(&page).unwrap();
        assert_eq!(words.count(), SPARSE_MAX_WORDS);
        assert_eq!(
            &words.packed()[..SPARSE_WORD_BYTES],
            &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(page_digest(&page), sparse_digest(words.packed()));
        let sparse = page_digest(&page);
        for bit in [0, 7, 8 * 64 + 3 * 8, 8 * PAGE_BYTES - 1] {
            let mut other = page;
            other[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(page_digest(&other), sparse, "bit {bit}");
        }
        page[4095] = 9;
        assert!(SparseWords::of(&page).is_none());
        assert_eq!(page_digest(&page), dense_digest(&page));
        assert_eq!(SparseWords::of(&[0u8; PAGE_BYTES]).unwrap().count(), 0);
        assert!(SparseWords::of(&[1u8; 100]).is_none());
    }
}
