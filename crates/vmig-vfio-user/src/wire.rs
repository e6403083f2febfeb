//! The vfio-user wire format: the 16-byte header, command numbers, flags, and every fixed-size
//! payload struct with the C layout of the specification (`vfio-user-spec.rst`; command 14 and
//! `GET_DIRTY_BITMAP` from the v1 version, `vfio-user-spec-v1-migration.rst`). All integers are
//! little-endian (the host order of every platform vmig runs on); structs are packed with no
//! padding, which the `zerocopy` derives check at compile time and `tests/wire_layout.rs` checks
//! against the spec's offsets.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Header size in bytes.
pub const HEADER_SIZE: usize = 16;

/// Every message starts with this.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    /// Chosen by the sender of a command, echoed in the reply.
    pub msg_id: u16,
    /// [`Command`] number, echoed in the reply.
    pub command: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// Type (bits 0-3), [`FLAG_NO_REPLY`], [`FLAG_ERROR`].
    pub flags: u32,
    /// The errno of an error reply.
    pub error_no: u32,
}

/// Message type field of [`Header::flags`].
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Type: command.
pub const FLAG_TYPE_COMMAND: u32 = 0;
/// Type: reply.
pub const FLAG_TYPE_REPLY: u32 = 1;
/// The sender of a command wants no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// The reply reports an error in `error_no`.
pub const FLAG_ERROR: u32 = 1 << 5;

impl Header {
    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// Command numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation; the first message.
    Version = 1,
    /// Map a DMA region (with an fd, or message-based).
    DmaMap = 2,
    /// Unmap a DMA region (v1: optionally returning its dirty bitmap).
    DmaUnmap = 3,
    /// Device flags, region and IRQ counts.
    DeviceGetInfo = 4,
    /// One region's info and capabilities (sparse mmap areas), with its fds.
    DeviceGetRegionInfo = 5,
    /// A region's ioeventfds.
    DeviceGetRegionIoFds = 6,
    /// One IRQ index's info.
    DeviceGetIrqInfo = 7,
    /// Wire IRQs to eventfds, mask, unmask, trigger.
    DeviceSetIrqs = 8,
    /// Read a region.
    RegionRead = 9,
    /// Write a region.
    RegionWrite = 10,
    /// Server to client: read guest memory.
    DmaRead = 11,
    /// Server to client: write guest memory.
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// v1 dirty page tracking (START / STOP / GET_BITMAP).
    DirtyPages = 14,
    /// Several small region writes in one message.
    RegionWriteMulti = 15,
    /// v2 device features (migration, device state, DMA logging).
    DeviceFeature = 16,
    /// v2 migration data from the device.
    MigDataRead = 17,
    /// v2 migration data to the device.
    MigDataWrite = 18,
}

impl Command {
    /// The command for a wire number.
    pub fn from_u16(value: u16) -> Option<Self> {
        use Command::*;
        Some(match value {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// `VFIO_USER_VERSION` payload, followed by NUL-terminated JSON.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Version {
    /// Major version (0).
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

/// `VFIO_USER_DMA_MAP`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaMap {
    /// 32.
    pub argsz: u32,
    /// [`DMA_MAP_FLAG_READ`] | [`DMA_MAP_FLAG_WRITE`].
    pub flags: u32,
    /// Offset into the fd that comes with the message.
    pub offset: u64,
    /// IOVA.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// The device may read the region.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// The device may write the region.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// `VFIO_USER_DMA_UNMAP` (echoed in the reply).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaUnmap {
    /// 24 (40 with a v1 bitmap request).
    pub argsz: u32,
    /// [`DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`] (v1), [`DMA_UNMAP_FLAG_ALL`].
    pub flags: u32,
    /// IOVA.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// v1: a [`DirtyBitmap`] follows the request and the bitmap follows it in the reply.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// Unmap every region (`addr` and `size` 0).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// v1 `struct vfio_user_bitmap`: the page size and byte size of a dirty bitmap.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DirtyBitmap {
    /// Bytes per bit.
    pub pgsize: u64,
    /// Bytes of bitmap.
    pub size: u64,
}

/// `VFIO_USER_DEVICE_GET_INFO`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DeviceInfo {
    /// 16.
    pub argsz: u32,
    /// [`DEVICE_FLAGS_RESET`] | [`DEVICE_FLAGS_PCI`].
    pub flags: u32,
    /// Regions.
    pub num_regions: u32,
    /// IRQ indices.
    pub num_irqs: u32,
}

/// The device supports reset.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// The device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `struct vfio_region_info`, `VFIO_USER_DEVICE_GET_REGION_INFO` (capabilities follow).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionInfo {
    /// Request: room for the reply; reply: size needed.
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this struct (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to pass to `mmap` of the region's fd.
    pub offset: u64,
}

/// The region can be read.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// The region can be written.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// The region (or its sparse areas) can be mmapped through the fd of the reply.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Capabilities follow.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

/// Capability header inside a region info.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct CapHeader {
    /// Capability id.
    pub id: u16,
    /// Capability version.
    pub version: u16,
    /// Offset of the next capability from the region info's start (0: last).
    pub next: u32,
}

/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// `VFIO_REGION_INFO_CAP_TYPE`.
pub const REGION_INFO_CAP_TYPE: u16 = 2;

/// Body of the sparse-mmap capability: `nr_areas` [`SparseArea`]s follow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SparseMmap {
    /// Areas.
    pub nr_areas: u32,
    /// 0.
    pub reserved: u32,
}

/// One mmappable area of a region.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SparseArea {
    /// Offset within the region.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
}

/// Body of the type capability.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionType {
    /// Region type (3: the v1 migration region).
    pub type_: u32,
    /// Subtype (1 for the migration region).
    pub subtype: u32,
}

/// `VFIO_REGION_TYPE_MIGRATION` (v1).
pub const REGION_TYPE_MIGRATION: u32 = 3;
/// `VFIO_REGION_SUBTYPE_MIGRATION` (v1).
pub const REGION_SUBTYPE_MIGRATION: u32 = 1;

/// `VFIO_USER_DEVICE_GET_REGION_IO_FDS` request and reply head (entries follow in the reply).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionIoFds {
    /// Room / size needed.
    pub argsz: u32,
    /// 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Entries.
    pub count: u32,
}

/// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct IrqInfo {
    /// 16.
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index (0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ).
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

/// The IRQ can signal an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// The IRQ can be masked.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// The IRQ masks itself when it fires.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// The vector count cannot change.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// IRQ index of INTx.
pub const IRQ_INDEX_INTX: u32 = 0;
/// IRQ index of MSI.
pub const IRQ_INDEX_MSI: u32 = vmig_primitives::uapi::VFIO_PCI_MSI_IRQ_INDEX;
/// IRQ index of MSI-X.
pub const IRQ_INDEX_MSIX: u32 = vmig_primitives::uapi::VFIO_PCI_MSIX_IRQ_INDEX;
/// IRQ index of the error interrupt.
pub const IRQ_INDEX_ERR: u32 = 3;
/// IRQ index of the request interrupt.
pub const IRQ_INDEX_REQ: u32 = 4;

/// `VFIO_USER_DEVICE_SET_IRQS` (data follows: bools, or fds in the ancillary data).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SetIrqs {
    /// 20 plus data.
    pub argsz: u32,
    /// One `IRQ_SET_DATA_*` and one `IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
}

/// No data.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// One byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// One eventfd per vector (none: de-assign).
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// Mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// Unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// Trigger (or, with eventfds, wire).
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `VFIO_USER_REGION_READ` / `_WRITE` head (data follows).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}

/// One write of `VFIO_USER_REGION_WRITE_MULTI`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct WriteMultiEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes (at most 8).
    pub count: u32,
    /// The bytes.
    pub data: [u8; 8],
}

/// `VFIO_USER_DMA_READ` / `_WRITE` head (data follows), as libvfio-user sends it (`count` u64).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaAccess {
    /// IOVA.
    pub addr: u64,
    /// Bytes.
    pub count: u64,
}

/// v1 `VFIO_USER_DIRTY_PAGES` head.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DirtyPages {
    /// Size of the request (or of the reply's room).
    pub argsz: u32,
    /// One of `DIRTY_PAGES_FLAG_*`.
    pub flags: u32,
}

/// Start logging.
pub const DIRTY_PAGES_FLAG_START: u32 = 1 << 0;
/// Stop logging.
pub const DIRTY_PAGES_FLAG_STOP: u32 = 1 << 1;
/// Read and clear the bitmap of a range: a [`DirtyBitmapRange`] follows.
pub const DIRTY_PAGES_FLAG_GET_BITMAP: u32 = 1 << 2;

/// v1 `struct vfio_user_bitmap_range`: the range of a `GET_BITMAP`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DirtyBitmapRange {
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The bitmap's page size and byte size.
    pub bitmap: DirtyBitmap,
}

/// `VFIO_USER_DEVICE_FEATURE` head (feature data follows).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DeviceFeature {
    /// Request: room for the reply; reply: its size.
    pub argsz: u32,
    /// Feature index (bits 0-15) | `FEATURE_GET` / `_SET` / `_PROBE`.
    pub flags: u32,
}

/// Feature index bits of [`DeviceFeature::flags`].
pub const FEATURE_MASK: u32 = 0xffff;
/// Get the feature's data.
pub const FEATURE_GET: u32 = 1 << 16;
/// Set the feature's data.
pub const FEATURE_SET: u32 = 1 << 17;
/// Ask whether GET / SET are supported.
pub const FEATURE_PROBE: u32 = 1 << 18;

/// `VFIO_DEVICE_FEATURE_MIGRATION`.
pub const FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;

/// `VFIO_MIGRATION_STOP_COPY`.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`.
pub const MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Data of `MIG_DEVICE_STATE`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MigDeviceState {
    /// `enum vfio_device_mig_state`.
    pub device_state: u32,
    /// Unused in vfio-user (-1).
    pub data_fd: u32,
}

/// Data head of `DMA_LOGGING_START` / `STOP` (`num_ranges` [`DmaLoggingRange`]s follow).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaLoggingControl {
    /// Bytes per dirty bit (the server may answer with its own).
    pub page_size: u64,
    /// Ranges (0: everything mapped).
    pub num_ranges: u32,
    /// 0.
    pub reserved: u32,
}

/// One range of a DMA logging control.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaLoggingRange {
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
}

/// Data head of `DMA_LOGGING_REPORT` (the bitmap follows in the reply).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaLoggingReport {
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Bytes per bit (a power of two).
    pub page_size: u64,
}

/// `VFIO_USER_MIG_DATA_READ` / `_WRITE` head (data follows).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MigData {
    /// Request (read): room for the reply; reply: its size.
    pub argsz: u32,
    /// Bytes asked for, returned, or written.
    pub size: u32,
}

/// `size_of::<T>()` as the `u32` an `argsz` holds.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the wire structs are a few dozen bytes"
)]
pub const fn size32<T>() -> u32 {
    size_of::<T>() as u32
}

/// Reads a `T` from the start of `bytes`, or `None` if it is too short.
pub fn read_struct<T: FromBytes>(bytes: &[u8]) -> Option<T> {
    T::read_from_prefix(bytes).ok().map(|(value, _)| value)
}
