//! Decoding of the commands a server receives: every field a client sends is checked against
//! the specification before a device sees it. A refusal carries the errno for the error reply
//! and a message that says what was expected; nothing here panics on any input (the fuzz
//! target feeds it arbitrary messages).

use std::os::fd::OwnedFd;

use super::Refusal;
use crate::caps::{self, Capabilities};
use crate::transport::Message;
use crate::wire::*;

/// Most writes one `REGION_WRITE_MULTI` may carry (QEMU sends at most 200).
pub const MAX_WRITE_MULTI: u64 = 1024;

fn refuse<T>(errno: i32, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(errno, message))
}

/// A decoded command.
#[derive(Debug)]
pub enum Request {
    /// `VFIO_USER_VERSION`.
    Version {
        /// Proposed version.
        version: Version,
        /// Proposed capabilities.
        caps: Capabilities,
    },
    /// `VFIO_USER_DMA_MAP`; `fd` absent for message-based DMA.
    DmaMap {
        /// The mapping.
        map: DmaMap,
        /// The file to map.
        fd: Option<OwnedFd>,
    },
    /// `VFIO_USER_DMA_UNMAP`, with the v1 bitmap request when asked for.
    DmaUnmap {
        /// The unmap.
        unmap: DmaUnmap,
        /// v1 `GET_DIRTY_BITMAP`: page size and bitmap bytes.
        bitmap: Option<DirtyBitmap>,
    },
    /// `VFIO_USER_DEVICE_GET_INFO`.
    GetInfo,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    GetRegionInfo {
        /// Room for the reply payload.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`.
    GetRegionIoFds {
        /// Room for the reply payload.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    GetIrqInfo {
        /// IRQ index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_SET_IRQS`.
    SetIrqs {
        /// The request.
        set: SetIrqs,
        /// `DATA_BOOL`: one byte per vector.
        bools: Vec<u8>,
        /// `DATA_EVENTFD`: one eventfd per vector, or none to de-assign.
        fds: Vec<OwnedFd>,
    },
    /// `VFIO_USER_REGION_READ`.
    RegionRead(RegionAccess),
    /// `VFIO_USER_REGION_WRITE`.
    RegionWrite {
        /// Where.
        access: RegionAccess,
        /// What.
        data: Vec<u8>,
    },
    /// `VFIO_USER_REGION_WRITE_MULTI`.
    RegionWriteMulti(Vec<WriteMultiEntry>),
    /// `VFIO_USER_DEVICE_RESET`.
    Reset,
    /// v1 `VFIO_USER_DIRTY_PAGES`.
    DirtyPages {
        /// Room for the reply payload.
        argsz: u32,
        /// One of `DIRTY_PAGES_FLAG_*`.
        flags: u32,
        /// `GET_BITMAP`'s range.
        range: Option<DirtyBitmapRange>,
    },
    /// `VFIO_USER_DEVICE_FEATURE`.
    Feature {
        /// Room for the reply payload.
        argsz: u32,
        /// Feature index and GET / SET / PROBE.
        flags: u32,
        /// The feature's data.
        data: Vec<u8>,
    },
    /// `VFIO_USER_MIG_DATA_READ`.
    MigDataRead {
        /// Bytes asked for.
        size: u32,
    },
    /// `VFIO_USER_MIG_DATA_WRITE`.
    MigDataWrite(Vec<u8>),
}

fn fixed<T: zerocopy::FromBytes>(payload: &[u8], name: &str) -> Result<T, Refusal> {
    read_struct::<T>(payload).map_or_else(
        || {
            refuse(
                libc::EINVAL,
                format!(
                    "{name}: {} payload bytes, expected at least {}",
                    payload.len(),
                    size_of::<T>()
                ),
            )
        },
        Ok,
    )
}

fn no_fds(fds: &[OwnedFd], name: &str) -> Result<(), Refusal> {
    if fds.is_empty() {
        Ok(())
    } else {
        refuse(
            libc::EINVAL,
            format!("{name} takes no file descriptors; {} came", fds.len()),
        )
    }
}

/// Decodes a command. `max_data_xfer_size` is what this side advertised.
pub fn decode(message: Message, max_data_xfer_size: u64) -> Result<Request, Refusal> {
    let Message {
        header,
        payload,
        mut fds,
    } = message;
    if header.flags & FLAG_TYPE_MASK != FLAG_TYPE_COMMAND {
        return refuse(
            libc::EINVAL,
            format!(
                "message {} (command {}) is not a command (flags {:#x})",
                header.msg_id, header.command, header.flags
            ),
        );
    }
    let Some(command) = Command::from_u16(header.command) else {
        return refuse(libc::ENOSYS, format!("unknown command {}", header.command));
    };
    let p = &payload[..];
    let too_big = |what: &str, count: u64| {
        refuse(
            libc::EINVAL,
            format!("{what} of {count} bytes exceeds max_data_xfer_size {max_data_xfer_size}"),
        )
    };
    let request = match command {
        Command::Version => {
            no_fds(&fds, "VFIO_USER_VERSION")?;
            let (version, caps) = caps::decode(p)
                .map_err(|e| Refusal::new(libc::EINVAL, format!("VFIO_USER_VERSION: {}", e.0)))?;
            Request::Version { version, caps }
        }
        Command::DmaMap => {
            let map: DmaMap = fixed(p, "DMA_MAP")?;
            if (map.argsz as usize) < size_of::<DmaMap>() {
                return refuse(
                    libc::EINVAL,
                    format!("DMA_MAP argsz {}: expected 32", map.argsz),
                );
            }
            if map.flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "DMA_MAP flags {:#x}: only READ (1) and WRITE (2) are defined",
                        map.flags
                    ),
                );
            }
            if fds.len() > 1 {
                return refuse(
                    libc::EINVAL,
                    format!("DMA_MAP takes at most one fd; {} came", fds.len()),
                );
            }
            Request::DmaMap { map, fd: fds.pop() }
        }
        Command::DmaUnmap => {
            no_fds(&fds, "DMA_UNMAP")?;
            let unmap: DmaUnmap = fixed(p, "DMA_UNMAP")?;
            if unmap.flags & !(DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | DMA_UNMAP_FLAG_ALL) != 0 {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "DMA_UNMAP flags {:#x}: only GET_DIRTY_BITMAP (1) and ALL (2) are defined",
                        unmap.flags
                    ),
                );
            }
            let all = unmap.flags & DMA_UNMAP_FLAG_ALL != 0;
            let with_bitmap = unmap.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
            if all && (unmap.addr != 0 || unmap.size != 0 || with_bitmap) {
                return refuse(
                    libc::EINVAL,
                    "DMA_UNMAP ALL takes addr 0, size 0 and no dirty bitmap",
                );
            }
            let bitmap = if with_bitmap {
                Some(fixed::<DirtyBitmap>(
                    &p[size_of::<DmaUnmap>()..],
                    "DMA_UNMAP's dirty bitmap",
                )?)
            } else {
                None
            };
            Request::DmaUnmap { unmap, bitmap }
        }
        Command::DeviceGetInfo => {
            no_fds(&fds, "DEVICE_GET_INFO")?;
            let info: DeviceInfo = fixed(p, "DEVICE_GET_INFO")?;
            if (info.argsz as usize) < size_of::<DeviceInfo>() {
                return refuse(
                    libc::EINVAL,
                    format!("DEVICE_GET_INFO argsz {}: expected at least 16", info.argsz),
                );
            }
            Request::GetInfo
        }
        Command::DeviceGetRegionInfo => {
            no_fds(&fds, "DEVICE_GET_REGION_INFO")?;
            let info: RegionInfo = fixed(p, "DEVICE_GET_REGION_INFO")?;
            if (info.argsz as usize) < size_of::<RegionInfo>() {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "DEVICE_GET_REGION_INFO argsz {}: expected at least 32",
                        info.argsz
                    ),
                );
            }
            Request::GetRegionInfo {
                argsz: info.argsz,
                index: info.index,
            }
        }
        Command::DeviceGetRegionIoFds => {
            no_fds(&fds, "DEVICE_GET_REGION_IO_FDS")?;
            let req: RegionIoFds = fixed(p, "DEVICE_GET_REGION_IO_FDS")?;
            Request::GetRegionIoFds {
                argsz: req.argsz,
                index: req.index,
            }
        }
        Command::DeviceGetIrqInfo => {
            no_fds(&fds, "DEVICE_GET_IRQ_INFO")?;
            let info: IrqInfo = fixed(p, "DEVICE_GET_IRQ_INFO")?;
            Request::GetIrqInfo { index: info.index }
        }
        Command::DeviceSetIrqs => {
            let set: SetIrqs = fixed(p, "DEVICE_SET_IRQS")?;
            let data_type =
                set.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
            let action =
                set.flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
            if !data_type.is_power_of_two() || !action.is_power_of_two() || set.flags & !0x3f != 0 {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "DEVICE_SET_IRQS flags {:#x}: expected exactly one DATA_* and one ACTION_* bit",
                        set.flags
                    ),
                );
            }
            let rest = &p[size_of::<SetIrqs>()..];
            let bools = match data_type {
                IRQ_SET_DATA_BOOL => {
                    if rest.len() != set.count as usize {
                        return refuse(
                            libc::EINVAL,
                            format!(
                                "DEVICE_SET_IRQS DATA_BOOL: {} data bytes for {} vectors",
                                rest.len(),
                                set.count
                            ),
                        );
                    }
                    no_fds(&fds, "DEVICE_SET_IRQS with DATA_BOOL")?;
                    rest.to_vec()
                }
                IRQ_SET_DATA_EVENTFD => {
                    if !fds.is_empty() && fds.len() != set.count as usize {
                        return refuse(
                            libc::EINVAL,
                            format!(
                                "DEVICE_SET_IRQS DATA_EVENTFD: {} fds for {} vectors (send none to de-assign)",
                                fds.len(),
                                set.count
                            ),
                        );
                    }
                    if set.flags & IRQ_SET_ACTION_TRIGGER == 0 {
                        return refuse(
                            libc::EINVAL,
                            "DEVICE_SET_IRQS DATA_EVENTFD goes with ACTION_TRIGGER",
                        );
                    }
                    Vec::new()
                }
                _ => {
                    no_fds(&fds, "DEVICE_SET_IRQS with DATA_NONE")?;
                    Vec::new()
                }
            };
            Request::SetIrqs { set, bools, fds }
        }
        Command::RegionRead => {
            no_fds(&fds, "REGION_READ")?;
            let access: RegionAccess = fixed(p, "REGION_READ")?;
            if u64::from(access.count) > max_data_xfer_size {
                return too_big("REGION_READ", access.count.into());
            }
            Request::RegionRead(access)
        }
        Command::RegionWrite => {
            no_fds(&fds, "REGION_WRITE")?;
            let access: RegionAccess = fixed(p, "REGION_WRITE")?;
            let data = &p[size_of::<RegionAccess>()..];
            if data.len() != access.count as usize {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "REGION_WRITE count {} but {} data bytes",
                        access.count,
                        data.len()
                    ),
                );
            }
            if u64::from(access.count) > max_data_xfer_size {
                return too_big("REGION_WRITE", access.count.into());
            }
            Request::RegionWrite {
                access,
                data: data.to_vec(),
            }
        }
        Command::RegionWriteMulti => {
            no_fds(&fds, "REGION_WRITE_MULTI")?;
            let count: u64 = fixed(p, "REGION_WRITE_MULTI")?;
            let entries = &p[8..];
            if count == 0 || count > MAX_WRITE_MULTI || entries.len() as u64 != count * 24 {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "REGION_WRITE_MULTI of {count} writes with {} bytes: expected 1 to {MAX_WRITE_MULTI} writes of 24 bytes",
                        entries.len()
                    ),
                );
            }
            let mut writes = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for chunk in entries.chunks_exact(24) {
                let entry: WriteMultiEntry = fixed(chunk, "REGION_WRITE_MULTI entry")?;
                if entry.count == 0 || entry.count > 8 {
                    return refuse(
                        libc::EINVAL,
                        format!(
                            "REGION_WRITE_MULTI entry of {} bytes: expected 1 to 8",
                            entry.count
                        ),
                    );
                }
                writes.push(entry);
            }
            Request::RegionWriteMulti(writes)
        }
        Command::DeviceReset => {
            no_fds(&fds, "DEVICE_RESET")?;
            Request::Reset
        }
        Command::DirtyPages => {
            no_fds(&fds, "DIRTY_PAGES")?;
            let head: DirtyPages = fixed(p, "DIRTY_PAGES")?;
            let range = match head.flags {
                DIRTY_PAGES_FLAG_START | DIRTY_PAGES_FLAG_STOP => None,
                DIRTY_PAGES_FLAG_GET_BITMAP => Some(fixed::<DirtyBitmapRange>(
                    &p[size_of::<DirtyPages>()..],
                    "DIRTY_PAGES GET_BITMAP range",
                )?),
                flags => {
                    return refuse(
                        libc::EINVAL,
                        format!(
                            "DIRTY_PAGES flags {flags:#x}: expected exactly one of START (1), STOP (2), GET_BITMAP (4)"
                        ),
                    );
                }
            };
            Request::DirtyPages {
                argsz: head.argsz,
                flags: head.flags,
                range,
            }
        }
        Command::DeviceFeature => {
            no_fds(&fds, "DEVICE_FEATURE")?;
            let head: DeviceFeature = fixed(p, "DEVICE_FEATURE")?;
            let op = head.flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
            if head.flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0
                || op & (FEATURE_GET | FEATURE_SET) == (FEATURE_GET | FEATURE_SET)
                    && op & FEATURE_PROBE == 0
                || op == 0
            {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "DEVICE_FEATURE flags {:#x}: expected a feature index with GET, SET or PROBE (GET and SET only together with PROBE)",
                        head.flags
                    ),
                );
            }
            Request::Feature {
                argsz: head.argsz,
                flags: head.flags,
                data: p[size_of::<DeviceFeature>()..].to_vec(),
            }
        }
        Command::MigDataRead => {
            no_fds(&fds, "MIG_DATA_READ")?;
            let head: MigData = fixed(p, "MIG_DATA_READ")?;
            if u64::from(head.size) > max_data_xfer_size {
                return too_big("MIG_DATA_READ", head.size.into());
            }
            if u64::from(head.argsz) < 8 + u64::from(head.size) {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "MIG_DATA_READ argsz {} has no room for {} bytes (8 + size needed)",
                        head.argsz, head.size
                    ),
                );
            }
            Request::MigDataRead { size: head.size }
        }
        Command::MigDataWrite => {
            no_fds(&fds, "MIG_DATA_WRITE")?;
            let head: MigData = fixed(p, "MIG_DATA_WRITE")?;
            let data = &p[size_of::<MigData>()..];
            if data.len() != head.size as usize {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "MIG_DATA_WRITE size {} but {} data bytes",
                        head.size,
                        data.len()
                    ),
                );
            }
            if u64::from(head.size) > max_data_xfer_size {
                return too_big("MIG_DATA_WRITE", head.size.into());
            }
            Request::MigDataWrite(data.to_vec())
        }
        Command::DmaRead | Command::DmaWrite => {
            return refuse(
                libc::EINVAL,
                format!("{command:?} goes from server to client, not to a server"),
            );
        }
    };
    Ok(request)
}

/// Decodes raw bytes as one message without descriptors: the first 16 bytes are the header
/// (its `msg_size` is ignored: the rest of the bytes are the payload). The fuzz target's entry.
pub fn decode_bytes(bytes: &[u8], max_data_xfer_size: u64) -> Result<Request, Refusal> {
    let Some(header) = read_struct::<Header>(bytes) else {
        return refuse(
            libc::EINVAL,
            format!("{} bytes: a message has a 16-byte header", bytes.len()),
        );
    };
    let payload = bytes[HEADER_SIZE..].to_vec();
    decode(
        Message {
            header,
            payload,
            fds: Vec::new(),
        },
        max_data_xfer_size,
    )
}
