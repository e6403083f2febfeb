//! Sizes and field offsets of every wire struct against the C layouts in the specification
//! (vfio-user-spec.rst; the v1 structs from vfio-user-spec-v1-migration.rst), as the digest
//! lists them.

use std::mem::{offset_of, size_of};

use vmig_vfio_user::wire::*;

macro_rules! layout {
    ($ty:ty, $size:expr, $($field:ident @ $offset:expr),* $(,)?) => {{
        assert_eq!(size_of::<$ty>(), $size, "size of {}", stringify!($ty));
        $(assert_eq!(offset_of!($ty, $field), $offset, "{}::{}", stringify!($ty), stringify!($field));)*
    }};
}

#[test]
fn header_is_16_bytes_with_msg_size_at_4() {
    // "| 0 | 2 | msg_id | ... | 4 | 4 | msg_size | whole message incl. header |"
    layout!(Header, 16, msg_id @ 0, command @ 2, msg_size @ 4, flags @ 8, error_no @ 12);
    assert_eq!(HEADER_SIZE, 16);
    assert_eq!(
        (FLAG_TYPE_MASK, FLAG_NO_REPLY, FLAG_ERROR),
        (0xf, 0x10, 0x20)
    );
}

#[test]
fn payload_structs_match_the_spec() {
    layout!(Version, 4, major @ 0, minor @ 2);
    // DMA_MAP request (32 B, msg 48 B): argsz @0, flags @4, offset @8, addr @16, size @24.
    layout!(DmaMap, 32, argsz @ 0, flags @ 4, offset @ 8, addr @ 16, size @ 24);
    layout!(DmaUnmap, 24, argsz @ 0, flags @ 4, addr @ 8, size @ 16);
    layout!(DirtyBitmap, 16, pgsize @ 0, size @ 8);
    layout!(DeviceInfo, 16, argsz @ 0, flags @ 4, num_regions @ 8, num_irqs @ 12);
    layout!(RegionInfo, 32, argsz @ 0, flags @ 4, index @ 8, cap_offset @ 12, size @ 16, offset @ 24);
    layout!(CapHeader, 8, id @ 0, version @ 2, next @ 4);
    layout!(SparseMmap, 8, nr_areas @ 0, reserved @ 4);
    layout!(SparseArea, 16, offset @ 0, size @ 8);
    layout!(RegionType, 8, type_ @ 0, subtype @ 4);
    layout!(RegionIoFds, 16, argsz @ 0, flags @ 4, index @ 8, count @ 12);
    layout!(IrqInfo, 16, argsz @ 0, flags @ 4, index @ 8, count @ 12);
    layout!(SetIrqs, 20, argsz @ 0, flags @ 4, index @ 8, start @ 12, count @ 16);
    layout!(RegionAccess, 16, offset @ 0, region @ 8, count @ 12);
    layout!(WriteMultiEntry, 24, offset @ 0, region @ 8, count @ 12, data @ 16);
    // libvfio-user's `struct vfio_user_dma_region_access {u64 addr; u64 count; u8 data[];}`.
    layout!(DmaAccess, 16, addr @ 0, count @ 8);
    layout!(DirtyPages, 8, argsz @ 0, flags @ 4);
    layout!(DirtyBitmapRange, 32, iova @ 0, size @ 8, bitmap @ 16);
    layout!(DeviceFeature, 8, argsz @ 0, flags @ 4);
    layout!(MigDeviceState, 8, device_state @ 0, data_fd @ 4);
    layout!(DmaLoggingControl, 16, page_size @ 0, num_ranges @ 8, reserved @ 12);
    layout!(DmaLoggingRange, 16, iova @ 0, length @ 8);
    layout!(DmaLoggingReport, 24, iova @ 0, length @ 8, page_size @ 16);
    layout!(MigData, 8, argsz @ 0, size @ 4);
}

#[test]
fn command_and_flag_numbers_match_the_spec() {
    for n in 1..=18u16 {
        assert_eq!(Command::from_u16(n).map(|c| c as u16), Some(n));
    }
    assert_eq!(Command::from_u16(0), None);
    assert_eq!(Command::from_u16(19), None);
    assert_eq!(Command::DirtyPages as u16, 14);
    assert_eq!(
        (FEATURE_GET, FEATURE_SET, FEATURE_PROBE),
        (0x10000, 0x20000, 0x40000)
    );
    assert_eq!(
        (
            FEATURE_MIGRATION,
            FEATURE_MIG_DEVICE_STATE,
            FEATURE_DMA_LOGGING_START,
            FEATURE_DMA_LOGGING_STOP,
            FEATURE_DMA_LOGGING_REPORT
        ),
        (1, 2, 6, 7, 8)
    );
    assert_eq!(
        (MIGRATION_STOP_COPY, MIGRATION_P2P, MIGRATION_PRE_COPY),
        (1, 2, 4)
    );
    assert_eq!(
        (DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, DMA_UNMAP_FLAG_ALL),
        (1, 2)
    );
    assert_eq!(
        (
            DIRTY_PAGES_FLAG_START,
            DIRTY_PAGES_FLAG_STOP,
            DIRTY_PAGES_FLAG_GET_BITMAP
        ),
        (1, 2, 4)
    );
    assert_eq!((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION), (3, 1));
    assert_eq!(
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        0x24,
        "the typical SET_IRQS flags"
    );
}
