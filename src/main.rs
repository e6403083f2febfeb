//! `vmig`: the command line of the vmig live-migration engine.
//!
//! The commands that run VMs, serve devices and migrate (`run`, `device serve`, `migrate`,
//! `ctl`, `demo`, `bench`) arrive with the crates that implement them; today the binary
//! describes itself and the libraries it is built from.

use clap::Parser;

/// Live migration of KVM virtual machines with VFIO and vfio-user devices.
///
/// vmig moves a running VM to another host while its passthrough devices keep doing DMA:
/// device state travels through the VFIO migration interface (v1 region, v2 state machine),
/// and the pages devices dirty are tracked by the IOMMU side and merged with KVM's.
#[derive(Debug, Parser)]
#[command(name = "vmig", version, about, long_about)]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
    println!(
        "vmig {}: no command yet. The libraries vmig-dirty (dirty bitmaps) and vmig-dma (a userspace\n\
         VFIO type1 IOMMU with dirty tracking) are ready to embed; `vmig --help` lists the commands\n\
         as they arrive.",
        env!("CARGO_PKG_VERSION")
    );
}
