//! A device described for a person, as `vmig device probe` prints it: typed, filled by whoever
//! asked the device (the vfio-user client from a server's replies, `vmig_vfio::describe` from
//! the kernel's), and printed by its [`Display`](std::fmt::Display). Both VFIO worlds describe
//! regions, IRQs and migration the same way; what only one of them has (a server's
//! capabilities, a kernel container's IOVA ranges) is in its [`Origin`].

use std::fmt;

use crate::addr::RegionArea;
use crate::uapi::{VFIO_REGION_SUBTYPE_MIGRATION, VFIO_REGION_TYPE_MIGRATION};

/// A device: where it is served from, and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Who serves it, with what only that side reports.
    pub origin: Origin,
    /// The device supports reset.
    pub reset: bool,
    /// The regions that exist, by ascending index.
    pub regions: Vec<RegionDescription>,
    /// The IRQ indices worth listing, by ascending index.
    pub irqs: Vec<IrqDescription>,
    /// The migration interface it offers.
    pub migration: MigrationDescription,
}

/// Where a device is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A vfio-user server.
    VfioUser(VfioUserServer),
    /// A PCI device bound to the kernel's vfio-pci (or a variant driver).
    KernelPci(KernelPciDevice),
}

/// What a vfio-user server negotiated and reports beyond regions and IRQs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUserServer {
    /// The socket it listens on.
    pub socket: String,
    /// The negotiated protocol version (major, minor).
    pub version: (u16, u16),
    /// Descriptors per message.
    pub max_msg_fds: u32,
    /// Largest transfer.
    pub max_data_xfer_size: u64,
    /// Page sizes for DMA.
    pub pgsizes: u64,
    /// Most DMA mappings.
    pub max_dma_maps: u32,
    /// Twin-socket mode offered.
    pub twin_socket: bool,
    /// `REGION_WRITE_MULTI` offered.
    pub write_multiple: bool,
    /// A PCI device.
    pub pci: bool,
    /// Regions the device reports (listed or not).
    pub num_regions: u32,
    /// IRQ indices the device reports.
    pub num_irqs: u32,
    /// v2 DMA logging offered.
    pub dma_logging: bool,
    /// v1 `DIRTY_PAGES` offered, at this page size.
    pub dirty_pages_pgsize: Option<u64>,
}

/// What the kernel reports about a vfio-pci device (or a mediated device that presents itself
/// as PCI) and its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPciDevice {
    /// The device's name (its PCI address, or an mdev's UUID).
    pub name: String,
    /// A mediated device (opened by UUID), not a PCI function.
    pub mdev: bool,
    /// Its vendor and device IDs, when its config space could be read.
    pub ids: Option<(u16, u16)>,
    /// Why the device cannot migrate, when it cannot.
    pub blocker: Option<String>,
    /// Page sizes of the container's IOMMU.
    pub page_sizes: u64,
    /// The IOVA ranges that may be mapped, inclusive (first, last).
    pub iova_ranges: Vec<(u64, u64)>,
    /// Mappings still available, when the kernel says.
    pub dma_avail: Option<u32>,
    /// Type1 dirty tracking: its page size and largest bitmap, when the container has it.
    pub dirty_tracking: Option<(u64, u64)>,
}

/// One region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDescription {
    /// Its index.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Reads allowed.
    pub readable: bool,
    /// Writes allowed.
    pub writable: bool,
    /// A BAR that decodes I/O ports (its config-space register has bit 0 set), not memory.
    pub io: bool,
    /// How it may be mapped.
    pub mmap: Mmap,
    /// Device-specific type and subtype.
    pub region_type: Option<(u32, u32)>,
}

/// How much of a region may be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mmap {
    /// None of it: every access is trapped.
    Trapped,
    /// All of it.
    Whole,
    /// These areas (offset, size).
    Areas(Vec<RegionArea>),
}

/// One IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqDescription {
    /// Its index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
    /// Signalled through an eventfd.
    pub eventfd: bool,
    /// Maskable.
    pub maskable: bool,
}

/// The migration interface a device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationDescription {
    /// None.
    None,
    /// v1: the migration region at this index.
    V1 {
        /// Its index.
        region: u32,
    },
    /// v2 (`MIG_DEVICE_STATE`).
    V2 {
        /// The `MIGRATION` feature's flags.
        flags: u64,
        /// PRE_COPY offered.
        pre_copy: bool,
        /// The device's own DMA logging offered.
        dma_logging: bool,
    },
}

const REGION_NAMES: [&str; 9] = [
    "BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA",
];
const IRQ_NAMES: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn areas(areas: &[RegionArea]) -> String {
    let areas: Vec<String> = areas
        .iter()
        .map(|a| format!("[{:#x}, +{:#x})", a.offset, a.len))
        .collect();
    areas.join(" ")
}

fn irq_name(index: u32) -> &'static str {
    usize::try_from(index)
        .ok()
        .and_then(|i| IRQ_NAMES.get(i))
        .unwrap_or(&"other")
}

impl fmt::Display for DeviceDescription {
    /// One line per fact, regions and IRQs indented; each ends with a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::VfioUser(server) => self.fmt_vfio_user(f, server),
            Origin::KernelPci(device) => self.fmt_kernel(f, device),
        }
    }
}

impl DeviceDescription {
    fn fmt_vfio_user(&self, f: &mut fmt::Formatter<'_>, s: &VfioUserServer) -> fmt::Result {
        writeln!(
            f,
            "vfio-user server at {}: protocol {}.{}",
            s.socket, s.version.0, s.version.1
        )?;
        writeln!(
            f,
            "capabilities: max_msg_fds {}, max_data_xfer_size {}, pgsizes {:#x}, max_dma_maps {}, twin_socket {}, write_multiple {}",
            s.max_msg_fds,
            s.max_data_xfer_size,
            s.pgsizes,
            s.max_dma_maps,
            yes(s.twin_socket),
            yes(s.write_multiple)
        )?;
        writeln!(
            f,
            "device:{}{} {} regions, {} IRQ indices",
            if s.pci { " PCI," } else { "" },
            if self.reset { " reset," } else { "" },
            s.num_regions,
            s.num_irqs
        )?;
        for r in &self.regions {
            write!(
                f,
                "  region {}: {} bytes, {}{}{}",
                r.index,
                r.size,
                if r.readable { "r" } else { "-" },
                if r.writable { "w" } else { "-" },
                if r.io { ", I/O ports" } else { "" }
            )?;
            match &r.mmap {
                Mmap::Whole => write!(f, ", mmap")?,
                Mmap::Areas(list) => write!(f, ", mmap areas {}", areas(list))?,
                Mmap::Trapped => write!(f, ", trapped")?,
            }
            if let Some((t, sub)) = r.region_type {
                write!(f, ", type {t}/{sub}")?;
                if (t, sub) == (VFIO_REGION_TYPE_MIGRATION, VFIO_REGION_SUBTYPE_MIGRATION) {
                    write!(f, " (v1 migration region)")?;
                }
            }
            writeln!(f)?;
        }
        for irq in &self.irqs {
            writeln!(
                f,
                "  irq {} ({}): {} vector(s){}{}",
                irq.index,
                irq_name(irq.index),
                irq.count,
                if irq.eventfd { ", eventfd" } else { "" },
                if irq.maskable { ", maskable" } else { "" }
            )?;
        }
        match self.migration {
            MigrationDescription::V2 { pre_copy, .. } => writeln!(
                f,
                "migration: v2 (STOP_COPY{})",
                if pre_copy { ", PRE_COPY" } else { "" }
            )?,
            MigrationDescription::V1 { region } => {
                writeln!(f, "migration: v1 (migration region {region})")?;
            }
            MigrationDescription::None => writeln!(f, "migration: none")?,
        }
        writeln!(
            f,
            "dirty logging: v2 DMA logging {}, v1 DIRTY_PAGES {}",
            yes(s.dma_logging),
            match s.dirty_pages_pgsize {
                Some(pgsize) => format!("yes (pgsize {pgsize})"),
                None => "no".into(),
            }
        )
    }

    fn fmt_kernel(&self, f: &mut fmt::Formatter<'_>, d: &KernelPciDevice) -> fmt::Result {
        writeln!(
            f,
            "VFIO {} {}{}{}",
            if d.mdev {
                "mediated device (PCI)"
            } else {
                "PCI device"
            },
            d.name,
            d.ids
                .map_or(String::new(), |(v, dev)| format!(", {v:04x}:{dev:04x}")),
            if self.reset { ", reset" } else { "" }
        )?;
        for r in &self.regions {
            let mmap = match &r.mmap {
                Mmap::Trapped => "trapped".to_owned(),
                Mmap::Whole => "mmap".to_owned(),
                Mmap::Areas(list) => format!("mmap areas {}", areas(list)),
            };
            writeln!(
                f,
                "  region {} ({}): {:#x} bytes, {}{}{}, {mmap}",
                r.index,
                usize::try_from(r.index)
                    .ok()
                    .and_then(|i| REGION_NAMES.get(i))
                    .unwrap_or(&"device-specific"),
                r.size,
                if r.readable { "r" } else { "-" },
                if r.writable { "w" } else { "-" },
                if r.io { ", I/O ports" } else { "" }
            )?;
        }
        for irq in &self.irqs {
            writeln!(
                f,
                "  irq {} ({}): {} vector(s)",
                irq.index,
                irq_name(irq.index),
                irq.count
            )?;
        }
        match self.migration {
            MigrationDescription::V2 {
                flags,
                pre_copy: _,
                dma_logging,
            } => {
                let names: Vec<&str> = [(1, "STOP_COPY"), (2, "P2P"), (4, "PRE_COPY")]
                    .into_iter()
                    .filter(|(bit, _)| flags & bit != 0)
                    .map(|(_, name)| name)
                    .collect();
                writeln!(
                    f,
                    "migration: v2 (flags {flags:#x}: {}), device DMA logging {}",
                    names.join(", "),
                    match (dma_logging, d.mdev) {
                        // vmig_migration's KernelDevice: an mdev's dirty source is its container.
                        (true, true) => "offered (unused: an mdev's dirty source is its container)",
                        (true, false) => "yes",
                        (false, _) => "no",
                    }
                )?;
            }
            MigrationDescription::V1 { region } => {
                writeln!(f, "migration: v1 (migration region {region})")?;
            }
            MigrationDescription::None => writeln!(f, "migration: none")?,
        }
        if let Some(why) = &d.blocker {
            writeln!(f, "blocker: {why}")?;
        }
        let ranges: Vec<String> = d
            .iova_ranges
            .iter()
            .map(|(start, last)| format!("[{start:#x}, {last:#x}]"))
            .collect();
        writeln!(
            f,
            "container: type1 v2, page sizes {:#x}, IOVA ranges {}, {} mappings available",
            d.page_sizes,
            if ranges.is_empty() {
                "none given".to_owned()
            } else {
                ranges.join(" ")
            },
            d.dma_avail.map_or("?".into(), |a| a.to_string())
        )?;
        match d.dirty_tracking {
            Some((page, max)) => writeln!(
                f,
                "dirty tracking: type1 (page {page:#x}, bitmaps up to {max} bytes)"
            ),
            None => writeln!(f, "dirty tracking: none (no migration capability)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<RegionDescription> {
        vec![
            RegionDescription {
                index: 0,
                size: 4096,
                readable: true,
                writable: true,
                io: false,
                mmap: Mmap::Trapped,
                region_type: None,
            },
            RegionDescription {
                index: 9,
                size: 0x10_1000,
                readable: true,
                writable: true,
                io: false,
                mmap: Mmap::Areas(vec![RegionArea::new(0x1000, 0x10_0000)]),
                region_type: Some((3, 1)),
            },
        ]
    }

    #[test]
    fn a_vfio_user_server_prints_as_probe_always_did() {
        let d = DeviceDescription {
            origin: Origin::VfioUser(VfioUserServer {
                socket: "/tmp/s".into(),
                version: (0, 2),
                max_msg_fds: 16,
                max_data_xfer_size: 1 << 20,
                pgsizes: 4096,
                max_dma_maps: 65535,
                twin_socket: true,
                write_multiple: false,
                pci: true,
                num_regions: 10,
                num_irqs: 5,
                dma_logging: true,
                dirty_pages_pgsize: Some(4096),
            }),
            reset: true,
            regions: regions(),
            irqs: vec![IrqDescription {
                index: 2,
                count: 1,
                eventfd: true,
                maskable: true,
            }],
            migration: MigrationDescription::V1 { region: 9 },
        };
        assert_eq!(
            d.to_string(),
            "vfio-user server at /tmp/s: protocol 0.2\n\
             capabilities: max_msg_fds 16, max_data_xfer_size 1048576, pgsizes 0x1000, max_dma_maps 65535, twin_socket yes, write_multiple no\n\
             device: PCI, reset, 10 regions, 5 IRQ indices\n  \
             region 0: 4096 bytes, rw, trapped\n  \
             region 9: 1052672 bytes, rw, mmap areas [0x1000, +0x100000), type 3/1 (v1 migration region)\n  \
             irq 2 (MSI-X): 1 vector(s), eventfd, maskable\n\
             migration: v1 (migration region 9)\n\
             dirty logging: v2 DMA logging yes, v1 DIRTY_PAGES yes (pgsize 4096)\n"
        );
    }

    #[test]
    fn a_kernel_device_prints_as_describe_always_did() {
        let d = DeviceDescription {
            origin: Origin::KernelPci(KernelPciDevice {
                name: "0000:00:04.0".into(),
                mdev: false,
                ids: None,
                blocker: Some("VFIO device 0000:00:04.0 cannot migrate".into()),
                page_sizes: 0x4020_1000,
                iova_ranges: vec![(0, 0xfedf_ffff)],
                dma_avail: None,
                dirty_tracking: Some((0x1000, 256 << 20)),
            }),
            reset: false,
            regions: vec![
                RegionDescription {
                    mmap: Mmap::Whole,
                    ..regions().remove(0)
                },
                RegionDescription {
                    index: 1,
                    size: 8,
                    io: true,
                    ..regions().remove(0)
                },
            ],
            irqs: vec![IrqDescription {
                index: 1,
                count: 1,
                eventfd: true,
                maskable: false,
            }],
            migration: MigrationDescription::None,
        };
        assert_eq!(
            d.to_string(),
            "VFIO PCI device 0000:00:04.0\n  \
             region 0 (BAR0): 0x1000 bytes, rw, mmap\n  \
             region 1 (BAR1): 0x8 bytes, rw, I/O ports, trapped\n  \
             irq 1 (MSI): 1 vector(s)\n\
             migration: none\n\
             blocker: VFIO device 0000:00:04.0 cannot migrate\n\
             container: type1 v2, page sizes 0x40201000, IOVA ranges [0x0, 0xfedfffff], ? mappings available\n\
             dirty tracking: type1 (page 0x1000, bitmaps up to 268435456 bytes)\n"
        );
    }

    #[test]
    fn a_mediated_device_says_so_and_shows_its_io_bar() {
        let d = DeviceDescription {
            origin: Origin::KernelPci(KernelPciDevice {
                name: "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into(),
                mdev: true,
                ids: Some((0x4348, 0x3253)),
                blocker: None,
                page_sizes: 0x1000,
                iova_ranges: Vec::new(),
                dma_avail: Some(65535),
                dirty_tracking: Some((0x1000, 256 << 20)),
            }),
            reset: false,
            regions: vec![RegionDescription {
                size: 8,
                io: true,
                ..regions().remove(0)
            }],
            irqs: vec![
                IrqDescription {
                    index: 0,
                    count: 1,
                    eventfd: true,
                    maskable: true,
                },
                IrqDescription {
                    index: 1,
                    count: 1,
                    eventfd: true,
                    maskable: false,
                },
            ],
            migration: MigrationDescription::V2 {
                flags: 0x7,
                pre_copy: true,
                dma_logging: true,
            },
        };
        assert_eq!(
            d.to_string(),
            "VFIO mediated device (PCI) 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001, 4348:3253\n  \
             region 0 (BAR0): 0x8 bytes, rw, I/O ports, trapped\n  \
             irq 0 (INTx): 1 vector(s)\n  \
             irq 1 (MSI): 1 vector(s)\n\
             migration: v2 (flags 0x7: STOP_COPY, P2P, PRE_COPY), device DMA logging offered (unused: an mdev's dirty source is its container)\n\
             container: type1 v2, page sizes 0x1000, IOVA ranges none given, 65535 mappings available\n\
             dirty tracking: type1 (page 0x1000, bitmaps up to 268435456 bytes)\n"
        );
    }
}
