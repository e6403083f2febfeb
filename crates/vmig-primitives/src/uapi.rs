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
/// `VFIO_PCI_MSI_IRQ_INDEX`: a PCI device's MSI vectors (vfio-user uses the same index).
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// `VFIO_PCI_MSIX_IRQ_INDEX`: a PCI device's MSI-X vectors.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

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
