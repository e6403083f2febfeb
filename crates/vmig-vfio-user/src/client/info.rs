//! What the client learns about the device: `DEVICE_GET_INFO`, region info with its
//! capability chain (sparse-mmap areas, region type) and fds, IRQ info, and all of it together
//! as a [`DeviceDescription`] for people.

use std::os::fd::OwnedFd;
use std::path::Path;

use zerocopy::IntoBytes;

use super::{Client, ClientError, DeviceMigration, Protocol, Result, protocol};
use crate::wire::*;
use vmig_primitives::RegionArea;
use vmig_primitives::description::{
    DeviceDescription, IrqDescription, MigrationDescription, Mmap, Origin,
    RegionDescription as Region, VfioUserServer,
};

/// A region as the server describes it.
#[derive(Debug)]
pub struct RegionDescription {
    /// The fixed part.
    pub info: RegionInfo,
    /// Sparse-mmap areas (offset, size) within the region.
    pub sparse_areas: Vec<RegionArea>,
    /// Device-specific type and subtype.
    pub region_type: Option<(u32, u32)>,
    /// The fd to mmap (at `info.offset` + area offset), when the region is mmappable.
    pub fd: Option<OwnedFd>,
}

impl Client {
    /// `DEVICE_GET_INFO`.
    pub fn device_info(&self) -> Result<DeviceInfo> {
        let request = DeviceInfo {
            argsz: 16,
            ..DeviceInfo::default()
        };
        let reply = self.call(Command::DeviceGetInfo, &[request.as_bytes()], &[])?;
        read_struct(&reply.payload).map_or_else(
            || protocol(Command::DeviceGetInfo, "shorter than 16 bytes"),
            Ok,
        )
    }

    /// `DEVICE_GET_REGION_INFO`, asking again with room for the capabilities when the server
    /// says it needs more.
    pub fn region_info(&self, index: u32) -> Result<RegionDescription> {
        let mut argsz = size32::<RegionInfo>();
        for _ in 0..2 {
            let request = RegionInfo {
                argsz,
                index,
                ..RegionInfo::default()
            };
            let mut reply = self.call(Command::DeviceGetRegionInfo, &[request.as_bytes()], &[])?;
            let Some(info) = read_struct::<RegionInfo>(&reply.payload) else {
                return protocol(Command::DeviceGetRegionInfo, "shorter than 32 bytes");
            };
            if info.argsz > argsz {
                if info.argsz > 64 << 10 {
                    return protocol(
                        Command::DeviceGetRegionInfo,
                        format!("argsz {} is absurd", info.argsz),
                    );
                }
                argsz = info.argsz;
                continue;
            }
            let (sparse_areas, region_type) =
                parse_caps(&reply.payload, info.cap_offset).map_err(|why| {
                    ClientError::Protocol {
                        command: Command::DeviceGetRegionInfo,
                        why,
                    }
                })?;
            return Ok(RegionDescription {
                info,
                sparse_areas,
                region_type,
                fd: if reply.fds.is_empty() {
                    None
                } else {
                    Some(reply.fds.remove(0))
                },
            });
        }
        protocol(
            Command::DeviceGetRegionInfo,
            "the server asked for more room twice",
        )
    }

    /// `DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let request = IrqInfo {
            argsz: 16,
            index,
            ..IrqInfo::default()
        };
        let reply = self.call(Command::DeviceGetIrqInfo, &[request.as_bytes()], &[])?;
        read_struct(&reply.payload).map_or_else(
            || protocol(Command::DeviceGetIrqInfo, "shorter than 16 bytes"),
            Ok,
        )
    }

    /// Which of BARs 0-5 decode I/O ports, as the device's config space says (region 7 of a
    /// PCI device, BAR register bit 0); all memory when the device is not PCI, has no config
    /// space that holds the BAR registers, or refuses to read them.
    pub fn io_bars(&self) -> Result<[bool; 6]> {
        let info = self.device_info()?;
        let config = vmig_primitives::uapi::VFIO_PCI_CONFIG_REGION_INDEX;
        let end = vmig_primitives::uapi::PCI_BASE_ADDRESS_0 + 24;
        if info.flags & DEVICE_FLAGS_PCI == 0 || info.num_regions <= config {
            return Ok([false; 6]);
        }
        match self.region_info(config) {
            Ok(r) if r.info.size >= end => {}
            Ok(_) => return Ok([false; 6]),
            Err(e) if e.remote_errno().is_some() => return Ok([false; 6]),
            Err(e) => return Err(e),
        }
        let mut registers = [0u8; 24];
        match self.region_read(
            config,
            vmig_primitives::uapi::PCI_BASE_ADDRESS_0,
            &mut registers,
        ) {
            Ok(()) => Ok(vmig_primitives::uapi::io_bars(&registers)),
            Err(e) if e.remote_errno().is_some() => Ok([false; 6]),
            Err(e) => Err(e),
        }
    }

    /// Everything the server says about its device, for people: `socket` names it. Regions
    /// and IRQ indices the server cannot describe are left out (at most 64 and 16 are asked).
    pub fn describe(&self, socket: &Path) -> Result<DeviceDescription> {
        let v = self.version();
        let caps = self.server_caps();
        let info = self.device_info()?;
        let io = self.io_bars()?;
        let regions = (0..info.num_regions.min(64))
            .filter_map(|index| self.region_info(index).ok().map(|r| (index, r)))
            .map(|(index, r)| {
                let f = r.info.flags;
                let mmap = match (f & REGION_INFO_FLAG_MMAP != 0, r.sparse_areas.is_empty()) {
                    (false, _) => Mmap::Trapped,
                    (true, true) => Mmap::Whole,
                    (true, false) => Mmap::Areas(r.sparse_areas),
                };
                Region {
                    index,
                    size: r.info.size,
                    readable: f & REGION_INFO_FLAG_READ != 0,
                    writable: f & REGION_INFO_FLAG_WRITE != 0,
                    io: usize::try_from(index)
                        .ok()
                        .and_then(|i| io.get(i))
                        .is_some_and(|&io| io),
                    mmap,
                    region_type: r.region_type,
                }
            })
            .collect();
        let irqs = (0..info.num_irqs.min(16))
            .filter_map(|index| self.irq_info(index).ok().map(|irq| (index, irq)))
            .map(|(index, irq)| IrqDescription {
                index,
                count: irq.count,
                eventfd: irq.flags & IRQ_INFO_EVENTFD != 0,
                maskable: irq.flags & IRQ_INFO_MASKABLE != 0,
            })
            .collect();
        let migration = match DeviceMigration::detect(self)?.map(|m| m.protocol()) {
            Some(Protocol::V2 { pre_copy }) => MigrationDescription::V2 {
                flags: self.migration_flags()?.unwrap_or(0),
                pre_copy,
                dma_logging: false,
            },
            Some(Protocol::V1 { region, .. }) => MigrationDescription::V1 { region },
            None => MigrationDescription::None,
        };
        let dma_logging = self.probe_feature(FEATURE_DMA_LOGGING_START, FEATURE_SET)?;
        let migration = match migration {
            MigrationDescription::V2 {
                flags, pre_copy, ..
            } => MigrationDescription::V2 {
                flags,
                pre_copy,
                dma_logging,
            },
            other => other,
        };
        Ok(DeviceDescription {
            origin: Origin::VfioUser(VfioUserServer {
                socket: socket.display().to_string(),
                version: (v.major, v.minor),
                max_msg_fds: caps.max_msg_fds(),
                max_data_xfer_size: caps.max_data_xfer_size(),
                pgsizes: caps.pgsizes(),
                max_dma_maps: caps.max_dma_maps(),
                twin_socket: caps.twin_socket(),
                write_multiple: caps.write_multiple(),
                pci: info.flags & DEVICE_FLAGS_PCI != 0,
                num_regions: info.num_regions,
                num_irqs: info.num_irqs,
                dma_logging,
                dirty_pages_pgsize: caps.migration.map(|m| m.pgsize),
            }),
            reset: info.flags & DEVICE_FLAGS_RESET != 0,
            regions,
            irqs,
            migration,
        })
    }
}

/// What a region info's capabilities say: sparse areas (offset, size) and the region type.
type RegionCaps = (Vec<RegionArea>, Option<(u32, u32)>);

/// Sparse areas and region type from a region info's capability chain, with every offset
/// checked against the payload.
fn parse_caps(payload: &[u8], first: u32) -> std::result::Result<RegionCaps, String> {
    let mut areas = Vec::new();
    let mut region_type = None;
    let mut offset = first as usize;
    let mut hops = 0;
    while offset != 0 {
        hops += 1;
        if hops > 16 {
            return Err("the capability chain loops".into());
        }
        let header: CapHeader = payload.get(offset..).and_then(read_struct).ok_or_else(|| {
            format!(
                "a capability at {offset} is outside the {}-byte reply",
                payload.len()
            )
        })?;
        let body = &payload[offset + size_of::<CapHeader>()..];
        match header.id {
            REGION_INFO_CAP_SPARSE_MMAP => {
                let sparse: SparseMmap =
                    read_struct(body).ok_or("a sparse-mmap capability cut short")?;
                for i in 0..sparse.nr_areas as usize {
                    let at = size_of::<SparseMmap>() + i * size_of::<SparseArea>();
                    let area: SparseArea = body
                        .get(at..)
                        .and_then(read_struct)
                        .ok_or("sparse areas cut short")?;
                    areas.push(RegionArea::new(area.offset, area.size));
                }
            }
            REGION_INFO_CAP_TYPE => {
                let t: RegionType = read_struct(body).ok_or("a type capability cut short")?;
                region_type = Some((t.type_, t.subtype));
            }
            _ => {}
        }
        offset = header.next as usize;
    }
    Ok((areas, region_type))
}
