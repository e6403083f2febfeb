//! What a type1 container says about itself (`VFIO_IOMMU_GET_INFO` and its capability chain),
//! decoded from the kernel's bytes without trusting them: a chain that loops, points outside
//! the answer or holds a truncated capability is an error, not a crash.

use vmig_dma::uapi::{
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VfioInfoCapHeader,
    VfioIommuType1Info, VfioIommuType1InfoCapIovaRange, VfioIommuType1InfoCapMigration,
    VfioIommuType1InfoDmaAvail, VfioIovaRange,
};
use vmig_dma::{IovaRange, MigrationCap};
use zerocopy::FromBytes;

use crate::error::{Result, VfioError};

/// The container's IOMMU, as `VFIO_IOMMU_GET_INFO` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// `flags` of the answer (`PGSIZES`, `CAPS`).
    pub flags: u32,
    /// Page sizes the IOMMU maps; the lowest is the alignment of every map.
    pub iova_pgsizes: u64,
    /// The migration capability (type1 dirty tracking), absent on kernels before 5.8.
    pub migration: Option<MigrationCap>,
    /// How many more mappings may be created, when the kernel says.
    pub dma_avail: Option<u32>,
    /// The IOVA ranges that may be mapped; empty when the kernel does not say (no limit).
    pub iova_ranges: Vec<IovaRange>,
}

impl ContainerInfo {
    /// The smallest page the IOMMU maps: the granularity of maps and dirty bitmaps.
    pub fn min_page_size(&self) -> u64 {
        match self.migration {
            Some(m) if m.pgsize_bitmap != 0 => 1 << m.pgsize_bitmap.trailing_zeros(),
            _ if self.iova_pgsizes != 0 => 1 << self.iova_pgsizes.trailing_zeros(),
            _ => vmig_primitives::PAGE_SIZE,
        }
    }

    /// Decodes a full answer (header and capability chain).
    pub fn decode(answer: &[u8]) -> Result<Self> {
        let bad = |why: String| VfioError::Kernel(format!("VFIO_IOMMU_GET_INFO answer: {why}"));
        let (head, _) = VfioIommuType1Info::read_from_prefix(answer)
            .map_err(|_| bad(format!("{} bytes, shorter than its header", answer.len())))?;
        let mut info = ContainerInfo {
            flags: head.flags,
            iova_pgsizes: if head.flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
                head.iova_pgsizes
            } else {
                0
            },
            migration: None,
            dma_avail: None,
            iova_ranges: Vec::new(),
        };
        if head.flags & VFIO_IOMMU_INFO_CAPS == 0 {
            return Ok(info);
        }
        let header_len = size_of::<VfioIommuType1Info>();
        let mut offset = head.cap_offset as usize;
        // Each capability must lie after the previous one, so the walk ends.
        let mut floor = header_len;
        while offset != 0 {
            if offset < floor {
                return Err(bad(format!(
                    "capability at {offset} is not after the header and the previous capability (>= {floor})"
                )));
            }
            let rest = answer.get(offset..).unwrap_or_default();
            let (cap, _) = VfioInfoCapHeader::read_from_prefix(rest)
                .map_err(|_| bad(format!("capability at {offset} runs past the answer")))?;
            let truncated = || bad(format!("capability {} at {offset} is truncated", cap.id));
            match cap.id {
                VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION => {
                    let (m, _) = VfioIommuType1InfoCapMigration::read_from_prefix(rest)
                        .map_err(|_| truncated())?;
                    info.migration = Some(MigrationCap {
                        flags: m.flags,
                        pgsize_bitmap: m.pgsize_bitmap,
                        max_dirty_bitmap_size: m.max_dirty_bitmap_size,
                    });
                }
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                    let (d, _) = VfioIommuType1InfoDmaAvail::read_from_prefix(rest)
                        .map_err(|_| truncated())?;
                    info.dma_avail = Some(d.avail);
                }
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let (r, ranges) = VfioIommuType1InfoCapIovaRange::read_from_prefix(rest)
                        .map_err(|_| truncated())?;
                    // The ranges may follow unaligned (Linux 6.1 puts this capability at offset 68;
                    // 6.12 pads every capability to 8 bytes and puts it at 72).
                    let ranges = (0..r.nr_iovas as usize)
                        .map(|i| {
                            ranges
                                .get(i * size_of::<VfioIovaRange>()..)
                                .and_then(|b| VfioIovaRange::read_from_prefix(b).ok())
                                .map(|(r, _)| r)
                                .ok_or_else(truncated)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    for r in ranges {
                        if r.start > r.end {
                            return Err(bad(format!(
                                "IOVA range [{:#x}, {:#x}] ends before it starts",
                                r.start, r.end
                            )));
                        }
                        info.iova_ranges.push(IovaRange {
                            start: r.start,
                            last: r.end,
                        });
                    }
                }
                _ => {} // capabilities this crate does not use (nesting, ...)
            }
            floor = offset + size_of::<VfioInfoCapHeader>();
            offset = cap.next as usize;
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmig_dma::{Iommu, IommuConfig};

    fn answer_of(iommu: &Iommu) -> Vec<u8> {
        let mut buf = vec![0u8; 24];
        buf[..4].copy_from_slice(&24u32.to_ne_bytes());
        vmig_dma::uapi::get_info(iommu, &mut buf).unwrap();
        let need = u32::from_ne_bytes(buf[..4].try_into().unwrap());
        let mut buf = vec![0u8; need as usize];
        buf[..4].copy_from_slice(&need.to_ne_bytes());
        vmig_dma::uapi::get_info(iommu, &mut buf).unwrap();
        buf
    }

    #[test]
    fn decodes_the_chain_linux_6_1_lays_out() {
        // kernel-vfio-type1-observed.md: "MIGRATION (id 2, v1) at 24 ... DMA_AVAIL (id 3) at
        // 56: avail=65535, then IOVA_RANGE (id 1) at 68" (vmig-dma answers in that order).
        let iommu = Iommu::new(IommuConfig {
            iova_ranges: vec![
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff,
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: 0x7f_ffff_ffff,
                },
            ],
            ..IommuConfig::default()
        })
        .unwrap();
        let info = ContainerInfo::decode(&answer_of(&iommu)).unwrap();
        assert_eq!(info.iova_pgsizes, 0x4020_1000);
        assert_eq!(info.min_page_size(), 4096);
        let m = info.migration.unwrap();
        assert_eq!((m.pgsize_bitmap, m.flags), (0x1000, 0));
        assert_eq!(info.dma_avail, Some(65535));
        assert_eq!(info.iova_ranges.len(), 2);
        assert_eq!(info.iova_ranges[1].last, 0x7f_ffff_ffff);
    }

    #[test]
    fn a_chain_that_loops_or_runs_past_the_answer_is_refused() {
        let iommu = Iommu::new(IommuConfig::default()).unwrap();
        let good = answer_of(&iommu);
        // The first capability points back at itself.
        let mut looped = good.clone();
        let first = u32::from_ne_bytes(looped[16..20].try_into().unwrap());
        let at = first as usize;
        looped[at + 4..at + 8].copy_from_slice(&first.to_ne_bytes());
        let err = ContainerInfo::decode(&looped).unwrap_err().to_string();
        assert!(err.contains("not after"), "{err}");
        // Cut in the middle of the last capability.
        let err = ContainerInfo::decode(&good[..good.len() - 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated") || err.contains("past"), "{err}");
        // A cap_offset inside the header.
        let mut inside = good;
        inside[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert!(ContainerInfo::decode(&inside).is_err());
    }
}
