//! The VFIO uAPI both VFIO worlds share, with the exact C layouts of `include/uapi/linux/vfio.h`:
//! the type1 IOMMU's ioctl numbers, flags and structs, the v1 migration region's header and its
//! `device_state` bits (seed 000). The handlers that answer these requests live in vmig-dma; the
//! kernel's own answers come through vmig-vfio.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const fn vfio_io(nr: u32) -> u32 {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}

/// `VFIO_TYPE`, the ioctl type byte `';'`.
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`.
pub const VFIO_BASE: u32 = 100;
/// `VFIO_GET_API_VERSION`.
pub const VFIO_GET_API_VERSION: u32 = vfio_io(0);
/// `VFIO_CHECK_EXTENSION`.
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
/// `VFIO_SET_IOMMU`.
pub const VFIO_SET_IOMMU: u32 = vfio_io(2);
/// `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
/// `VFIO_IOMMU_GET_INFO`.
pub const VFIO_IOMMU_GET_INFO: u32 = vfio_io(12);
/// `VFIO_IOMMU_MAP_DMA`.
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio_io(13);
/// `VFIO_IOMMU_UNMAP_DMA`.
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio_io(14);
/// `VFIO_IOMMU_DIRTY_PAGES`.
pub const VFIO_IOMMU_DIRTY_PAGES: u32 = vfio_io(17);

/// `VFIO_TYPE1_IOMMU`.
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;

/// `VFIO_DMA_MAP_FLAG_READ`.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_DMA_MAP_FLAG_VADDR`.
pub const VFIO_DMA_MAP_FLAG_VADDR: u32 = 1 << 2;
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`.
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// `VFIO_DMA_UNMAP_FLAG_ALL`.
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
/// `VFIO_DMA_UNMAP_FLAG_VADDR`.
pub const VFIO_DMA_UNMAP_FLAG_VADDR: u32 = 1 << 2;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START`.
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_START: u32 = 1 << 0;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`.
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP: u32 = 1 << 1;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`.
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP: u32 = 1 << 2;
/// `VFIO_IOMMU_INFO_PGSIZES`.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
/// `VFIO_IOMMU_INFO_CAPS`.
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: u16 = 2;
/// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`.
pub const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: u16 = 3;
/// `VFIO_REGION_TYPE_MIGRATION` (later `_DEPRECATED`, same value).
pub const VFIO_REGION_TYPE_MIGRATION: u32 = 3;
/// `VFIO_REGION_SUBTYPE_MIGRATION`.
pub const VFIO_REGION_SUBTYPE_MIGRATION: u32 = 1;
/// `VFIO_PCI_INTX_IRQ_INDEX`: a PCI device's legacy interrupt line (vfio-user uses the same
/// index).
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
/// `VFIO_PCI_MSI_IRQ_INDEX`: a PCI device's MSI vectors (vfio-user uses the same index).
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// `VFIO_PCI_MSIX_IRQ_INDEX`: a PCI device's MSI-X vectors.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// `VFIO_PCI_CONFIG_REGION_INDEX`: a PCI device's config space (vfio-user uses the same index).
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// Config-space offset of BAR0's register (`PCI_BASE_ADDRESS_0` of `pci_regs.h`, the uAPI's
/// PCI header); BAR *n*'s is 4 *n* bytes on.
pub const PCI_BASE_ADDRESS_0: u64 = 0x10;
/// Bit 0 of a BAR register: the BAR decodes I/O ports, not memory
/// (`PCI_BASE_ADDRESS_SPACE_IO`).
pub const PCI_BASE_ADDRESS_SPACE_IO: u32 = 0x1;
/// Bits 2:1 of a memory BAR register, `0b10`: a 64-bit BAR, whose upper half is the next
/// register (`PCI_BASE_ADDRESS_MEM_TYPE_64`).
pub const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0x4;
/// `PCI_BASE_ADDRESS_MEM_TYPE_MASK`.
pub const PCI_BASE_ADDRESS_MEM_TYPE_MASK: u32 = 0x6;
/// The PCI command register's offset and its decode-enable bits (`PCI_COMMAND`,
/// `PCI_COMMAND_IO`, `PCI_COMMAND_MEMORY`, `PCI_COMMAND_MASTER`).
pub const PCI_COMMAND: u64 = 0x4;
/// `PCI_COMMAND_IO`: I/O-port BARs decode.
pub const PCI_COMMAND_IO: u16 = 0x1;
/// `PCI_COMMAND_MEMORY`: memory BARs decode.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// `PCI_COMMAND_MASTER`: the device may DMA.
pub const PCI_COMMAND_MASTER: u16 = 0x4;

/// Which of BARs 0-5 decode I/O ports, from the six BAR registers as config space holds them
/// (24 bytes read at [`PCI_BASE_ADDRESS_0`], little-endian): those with bit 0 set. The upper
/// half of a 64-bit memory BAR is no BAR of its own, so it is never I/O whatever its bits
/// (they are address bits).
pub fn io_bars(registers: &[u8; 24]) -> [bool; 6] {
    let mut io = [false; 6];
    let mut index = 0;
    while index < 6 {
        let at = index * 4;
        let register = u32::from_le_bytes([
            registers[at],
            registers[at + 1],
            registers[at + 2],
            registers[at + 3],
        ]);
        if register & PCI_BASE_ADDRESS_SPACE_IO != 0 {
            io[index] = true;
        } else if register & PCI_BASE_ADDRESS_MEM_TYPE_MASK == PCI_BASE_ADDRESS_MEM_TYPE_64 {
            index += 1;
        }
        index += 1;
    }
    io
}

/// Highest user address plus one on x86-64 (`TASK_SIZE_MAX`): `access_ok` fails above it.
pub const TASK_SIZE_MAX: u64 = 0x0000_7fff_ffff_f000;

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1DmaMap {
    /// Size of the argument.
    pub argsz: u32,
    /// `VFIO_DMA_MAP_FLAG_*`.
    pub flags: u32,
    /// Process virtual address.
    pub vaddr: u64,
    /// IO virtual address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the trailing `data[]`).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1DmaUnmap {
    /// Size of the argument, including a `vfio_bitmap` with GET_DIRTY_BITMAP.
    pub argsz: u32,
    /// `VFIO_DMA_UNMAP_FLAG_*`.
    pub flags: u32,
    /// IO virtual address.
    pub iova: u64,
    /// Size in bytes; on return, the bytes unmapped.
    pub size: u64,
}

/// `struct vfio_bitmap`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioBitmap {
    /// Page size of one bit.
    pub pgsize: u64,
    /// Size of the bitmap in bytes.
    pub size: u64,
    /// User address of the bitmap.
    pub data: u64,
}

/// `struct vfio_iommu_type1_dirty_bitmap` (without the trailing `data[]`).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1DirtyBitmap {
    /// Size of the argument.
    pub argsz: u32,
    /// Exactly one `VFIO_IOMMU_DIRTY_PAGES_FLAG_*`.
    pub flags: u32,
}

/// `struct vfio_iommu_type1_dirty_bitmap_get`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1DirtyBitmapGet {
    /// IO virtual address.
    pub iova: u64,
    /// Size of the IOVA range.
    pub size: u64,
    /// Where the bits go.
    pub bitmap: VfioBitmap,
}

/// `struct vfio_iommu_type1_info`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1Info {
    /// Size of the argument; on return, the size needed for all capabilities.
    pub argsz: u32,
    /// `VFIO_IOMMU_INFO_*`.
    pub flags: u32,
    /// Supported page sizes.
    pub iova_pgsizes: u64,
    /// Offset of the first capability, 0 if none fit.
    pub cap_offset: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct vfio_info_cap_header`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioInfoCapHeader {
    /// Capability id.
    pub id: u16,
    /// Capability version.
    pub version: u16,
    /// Offset of the next capability from the start of the info struct, 0 at the end.
    pub next: u32,
}

/// `struct vfio_iommu_type1_info_cap_migration`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1InfoCapMigration {
    /// id 2, version 1.
    pub header: VfioInfoCapHeader,
    /// 0.
    pub flags: u32,
    /// Padding the C compiler inserts on x86-64.
    pub pad: u32,
    /// Page sizes dirty bitmaps support (the minimum IOMMU page size only).
    pub pgsize_bitmap: u64,
    /// Largest bitmap in bytes.
    pub max_dirty_bitmap_size: u64,
}

/// `struct vfio_iommu_type1_info_dma_avail`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1InfoDmaAvail {
    /// id 3, version 1.
    pub header: VfioInfoCapHeader,
    /// Mappings still available.
    pub avail: u32,
}

/// `struct vfio_iommu_type1_info_cap_iova_range` (without the trailing ranges).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIommuType1InfoCapIovaRange {
    /// id 1, version 1.
    pub header: VfioInfoCapHeader,
    /// Number of `vfio_iova_range`s that follow.
    pub nr_iovas: u32,
    /// Reserved.
    pub reserved: u32,
}

/// `struct vfio_iova_range`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioIovaRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
}

/// `struct vfio_device_migration_info`: the header of the v1 migration region (seed 000).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VfioDeviceMigrationInfo {
    /// `VFIO_DEVICE_STATE_*` bits; bits 3-31 reserved, preserved by read-modify-write.
    pub device_state: u32,
    /// Reads 0, writes ignored.
    pub reserved: u32,
    /// Bytes the device still has to send.
    pub pending_bytes: u64,
    /// Offset of the data section in the region.
    pub data_offset: u64,
    /// Bytes of data in the section.
    pub data_size: u64,
}

/// The `device_state` bits of the v1 migration region, with the seed's macros as functions
/// (their argument parenthesised, `IS_ERROR`'s precedence bug fixed).
pub mod device_state {
    /// `_STOP`.
    pub const STOP: u32 = 0;
    /// `_RUNNING`.
    pub const RUNNING: u32 = 1 << 0;
    /// `_SAVING`.
    pub const SAVING: u32 = 1 << 1;
    /// `_RESUMING`.
    pub const RESUMING: u32 = 1 << 2;
    /// `_MASK`.
    pub const MASK: u32 = RUNNING | SAVING | RESUMING;
    /// `VFIO_DEVICE_STATE_ERROR`: SAVING | RESUMING.
    pub const ERROR: u32 = SAVING | RESUMING;

    /// `VFIO_DEVICE_STATE_VALID`: with RESUMING set, only RESUMING alone is valid.
    pub const fn is_valid(state: u32) -> bool {
        if state & RESUMING != 0 {
            state & MASK == RESUMING
        } else {
            true
        }
    }

    /// `VFIO_DEVICE_STATE_IS_ERROR`.
    pub const fn is_error(state: u32) -> bool {
        state & MASK == ERROR
    }

    /// `VFIO_DEVICE_STATE_SET_ERROR`: keeps the reserved bits.
    pub const fn set_error(state: u32) -> u32 {
        (state & !MASK) | ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::io_bars;

    fn registers(bars: [u32; 6]) -> [u8; 24] {
        let mut bytes = [0u8; 24];
        for (chunk, bar) in bytes.chunks_exact_mut(4).zip(bars) {
            chunk.copy_from_slice(&bar.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn io_bars_are_those_with_bit_0_set_and_never_a_64_bit_bars_upper_half() {
        // mtty's two-port type: BAR0 and BAR1 are I/O, nothing else exists.
        assert_eq!(
            io_bars(&registers([0x1, 0x1, 0, 0, 0, 0])),
            [true, true, false, false, false, false]
        );
        // A 64-bit memory BAR0 whose upper half has bit 0 set (an address above 4 GiB), an
        // I/O BAR2 at 0xc001, a 32-bit prefetchable BAR3, a 64-bit BAR4.
        assert_eq!(
            io_bars(&registers([
                0xfe00_000c,
                0x0000_0001,
                0x0000_c001,
                0xe000_0008,
                0x0000_0004,
                0xffff_ffff
            ])),
            [false, false, true, false, false, false]
        );
        assert_eq!(io_bars(&[0; 24]), [false; 6]);
    }
}
