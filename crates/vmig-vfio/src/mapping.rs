//! Guest RAM sections → DMA maps, IOVA = guest-physical address, with the arithmetic rules of
//! seed 003 (QEMU's `vfio_listener_region_add` overflow): ends are 128-bit (a section may end
//! at the top of the 64-bit space, and a section of 2^64 bytes exists), a section is shrunk
//! inward to whole IOMMU pages and skipped when nothing is left, range checks use the
//! inclusive last byte, and a size that does not fit 64 bits is split, never truncated to 0.

use vmig_dma::IovaRange;

use crate::error::{Result, VfioError};

/// A piece of guest RAM to make reachable by DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// Guest-physical address of the first byte (the IOVA it gets).
    pub gpa: u64,
    /// Bytes; more than 2^64 is refused.
    pub size: u128,
    /// Host address of the first byte.
    pub host_addr: u64,
}

/// One `VFIO_IOMMU_MAP_DMA` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// First IOVA.
    pub iova: u64,
    /// Bytes (a multiple of the page size, never 0).
    pub size: u64,
    /// Host address of the first byte.
    pub vaddr: u64,
}

impl DmaMap {
    /// The inclusive last IOVA.
    pub fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }
}

/// The maps that make `section` reachable by DMA on an IOMMU with pages of `page_size` bytes
/// (a power of two) and the allowed IOVA `ranges` (empty: no limit): none when the section
/// holds no whole page, two when its size does not fit 64 bits. A section outside the ranges
/// is refused with the message QEMU gives.
pub fn plan(section: Section, page_size: u64, ranges: &[IovaRange]) -> Result<Vec<DmaMap>> {
    if !page_size.is_power_of_two() {
        return Err(VfioError::Invalid(format!(
            "IOMMU page size {page_size:#x} is not a power of two"
        )));
    }
    let page = u128::from(page_size);
    let start = u128::from(section.gpa);
    let end = start.checked_add(section.size).ok_or_else(|| {
        VfioError::Invalid(format!(
            "guest RAM section at {:#x}: its size {:#x} overflows",
            section.gpa, section.size
        ))
    })?;
    let iova = start.div_ceil(page) * page;
    let end = end / page * page;
    if iova >= end {
        return Ok(Vec::new()); // T3-3: shrinks to nothing
    }
    // Rule 1-2: the inclusive last byte, only once start < end is known.
    let last = end - 1;
    let past_64_bits = || {
        VfioError::Invalid(format!(
            "guest RAM section at {:#x} of {:#x} bytes ends past the 64-bit address space",
            section.gpa, section.size
        ))
    };
    if section.size > 1u128 << 64 {
        return Err(past_64_bits());
    }
    // `iova <= last`, so both fit 64 bits once `last` does.
    let (Ok(iova), Ok(last)) = (u64::try_from(iova), u64::try_from(last)) else {
        return Err(past_64_bits());
    };
    let fit = |bytes: u128| u64::try_from(bytes).map_err(|_| past_64_bits());
    // Rule 4: inclusive compare, inside one allowed range.
    if !ranges.is_empty() && !ranges.iter().any(|r| iova >= r.start && last <= r.last) {
        return Err(VfioError::OutsideIovaRanges(format!(
            "vfio: IOMMU container can't map guest IOVA region {iova:#x}..{last:#x}: it is not inside one of the IOMMU's IOVA ranges ({})",
            describe(ranges)
        )));
    }
    let size = end - u128::from(iova);
    // Rule 3: a size that does not fit 64 bits is split in two page-aligned halves.
    let pieces = if size > u128::from(u64::MAX) {
        let half = (size / 2) / page * page;
        // `size` is at most 2^64 (it ends at `last + 1`), so each half fits.
        vec![(iova, fit(half)?), (iova + fit(half)?, fit(size - half)?)]
    } else {
        vec![(iova, fit(size)?)]
    };
    pieces
        .into_iter()
        .map(|(iova, size)| {
            let vaddr = section
                .host_addr
                .checked_add(iova - section.gpa)
                .ok_or_else(|| {
                    VfioError::Invalid(format!(
                        "guest RAM section at {:#x}: host address {:#x} + {:#x} overflows",
                        section.gpa,
                        section.host_addr,
                        iova - section.gpa
                    ))
                })?;
            Ok(DmaMap { iova, size, vaddr })
        })
        .collect()
}

fn describe(ranges: &[IovaRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("[{:#x}, {:#x}]", r.start, r.last))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = vmig_primitives::PAGE_SIZE;
    const TWO_64: u128 = 1 << 64;

    fn section(gpa: u64, size: u128) -> Section {
        Section {
            gpa,
            size,
            host_addr: 0x7f00_0000_0000,
        }
    }

    fn whole_space() -> Vec<IovaRange> {
        vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }]
    }

    #[test]
    fn t3_1_a_section_of_2_pow_64_bytes_becomes_two_maps_never_a_map_of_size_0() {
        // "(0, 2^64) ... either two maps (2^63 each ...) or a clean rejection; never a map of size 0"
        let maps = plan(section(0, TWO_64), PAGE, &whole_space()).unwrap();
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[0].iova, maps[0].size), (0, 1 << 63));
        assert_eq!((maps[1].iova, maps[1].size), (1 << 63, 1 << 63));
        assert_eq!(maps[1].last(), u64::MAX);
        assert_eq!(maps[1].vaddr, 0x7f00_0000_0000u64.wrapping_add(1 << 63));
    }

    #[test]
    fn t3_2_the_last_page_of_the_64_bit_space_maps_with_size_0x1000() {
        let maps = plan(section(0xffff_ffff_ffff_f000, 0x1000), PAGE, &whole_space()).unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!((maps[0].size, maps[0].last()), (0x1000, u64::MAX));
    }

    #[test]
    fn t3_3_a_section_without_a_whole_page_is_skipped() {
        assert!(
            plan(section(0x1000, 0x800), PAGE, &whole_space())
                .unwrap()
                .is_empty()
        );
        // Shrunk inward on both sides.
        let maps = plan(section(0x800, 0x3000), PAGE, &whole_space()).unwrap();
        assert_eq!((maps[0].iova, maps[0].size), (0x1000, 0x2000));
        assert_eq!(maps[0].vaddr, 0x7f00_0000_0800);
    }

    #[test]
    fn t3_4_to_6_range_checks_use_the_inclusive_last_byte() {
        let max = 0x7f_ffff_ffff;
        let ranges = [IovaRange {
            start: 0x1000,
            last: max,
        }];
        // T3-4: last == max_iova exactly is accepted.
        assert!(plan(section(max + 1 - 0x2000, 0x2000), PAGE, &ranges).is_ok());
        // T3-5: last == max_iova + 1 is refused with QEMU's message.
        let err = plan(section(max + 1 - 0x1000, 0x2000), PAGE, &ranges).unwrap_err();
        assert!(
            err.to_string().contains("can't map guest IOVA region"),
            "{err}"
        );
        // T3-6: iova < min_iova.
        assert!(plan(section(0, 0x2000), PAGE, &ranges).is_err());
        // The top of the 64-bit space against the kernel's 39-bit ranges: refused, not wrapped.
        assert!(plan(section(0xffff_ffff_ffff_f000, 0x1000), PAGE, &ranges).is_err());
    }

    #[test]
    fn a_section_across_a_reserved_hole_is_refused() {
        // Linux 6.1 under QEMU q35: [0, 0xfedfffff] and [0xfef00000, 0x7fffffffff].
        let ranges = [
            IovaRange {
                start: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                last: 0x7f_ffff_ffff,
            },
        ];
        assert!(plan(section(0xfe00_0000, 0x0400_0000), PAGE, &ranges).is_err());
        assert!(plan(section(0, 0x8000_0000), PAGE, &ranges).is_ok());
    }
}
