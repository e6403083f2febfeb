//! `vmig device serve` and `vmig device probe`: serve a sample device over vfio-user, and
//! describe any vfio-user server, a device bound to the kernel's vfio-pci, or a mediated device
//! (mdev) of the kernel's VFIO.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vmig_devices::dma_engine::{self, DmaEngine};
use vmig_vfio_user::client::Client;
use vmig_vfio_user::server::{Server, ServerConfig, stop_on_termination};

/// Serve or inspect vfio-user devices.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(subcommand)]
    command: DeviceCommand,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Serve a device on a UNIX socket until SIGTERM or Ctrl-C.
    Serve {
        /// The socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The device: dma-engine.
        #[arg(long, value_name = "KIND", default_value = "dma-engine")]
        device: String,
        /// The migration protocol it offers: v1 (migration region) or v2 (device features).
        #[arg(long, value_name = "VERSION", default_value = "v2")]
        migration: String,
        /// Put the doorbell (CONSUMER) in a page of BAR0 that the VMM maps into the guest, so
        /// the guest's doorbell writes cause no exit.
        #[arg(long)]
        doorbell_page: bool,
        /// Seed 002's device: a doorbell page, and DMA that nothing tracks (no DMA logging, no
        /// DIRTY_PAGES), so that only its mediator can tell a migration which pages it writes.
        #[arg(long)]
        hide_dma: bool,
    },
    /// Describe a device: a vfio-user server's (--socket), a PCI device bound to vfio-pci
    /// through the kernel's VFIO (--vfio-pci), or a mediated device (--vfio-mdev).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["socket", "vfio_pci", "vfio_mdev"])))]
    Probe {
        /// The server's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The PCI address of a device bound to vfio-pci (or a variant driver).
        #[arg(long, value_name = "DOMAIN:BUS:SLOT.FN")]
        vfio_pci: Option<String>,
        /// The UUID of a mediated device (/sys/bus/mdev/devices/UUID), such as an mtty port.
        #[arg(long, value_name = "UUID")]
        vfio_mdev: Option<String>,
    },
}

pub fn run(args: &DeviceArgs) -> Result<ExitCode, String> {
    match &args.command {
        DeviceCommand::Serve {
            socket,
            device,
            migration,
            doorbell_page,
            hide_dma,
        } => serve(socket, device, migration, *doorbell_page, *hide_dma),
        DeviceCommand::Probe {
            socket: Some(socket),
            ..
        } => probe(socket),
        DeviceCommand::Probe {
            vfio_pci: Some(bdf),
            ..
        } => probe_kernel_device(bdf),
        DeviceCommand::Probe {
            vfio_mdev: Some(uuid),
            ..
        } => probe_mdev(uuid),
        DeviceCommand::Probe { .. } => {
            Err("give --socket PATH, --vfio-pci ADDRESS or --vfio-mdev UUID".into())
        }
    }
}

fn serve(
    socket: &Path,
    device: &str,
    migration: &str,
    doorbell_page: bool,
    hide_dma: bool,
) -> Result<ExitCode, String> {
    if device != "dma-engine" {
        return Err(format!("--device {device}: the devices are: dma-engine"));
    }
    let migration = match migration {
        "v1" => dma_engine::Migration::V1,
        "v2" => dma_engine::Migration::V2,
        other => return Err(format!("--migration {other}: expected v1 or v2")),
    };
    let options = dma_engine::Options {
        migration,
        doorbell_page: doorbell_page || hide_dma,
        logs_dma: !hide_dma,
    };
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(format!(
                "a server is already listening on {}",
                socket.display()
            ));
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("{} exists and cannot be removed: {e}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let stop = stop_on_termination().map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let server = Server::new(DmaEngine::with_options(options), ServerConfig::default());
    println!(
        "serving dma-engine (migration {}{}) on {}; SIGTERM or Ctrl-C stops it",
        if migration == dma_engine::Migration::V1 {
            "v1"
        } else {
            "v2"
        },
        match (options.doorbell_page, options.logs_dma) {
            (_, false) => ", doorbell page, DMA hidden: only its mediator tracks it",
            (true, true) => ", doorbell page",
            (false, true) => "",
        },
        socket.display()
    );
    let result = server.run(&listener, stop);
    let _ = std::fs::remove_file(socket);
    result.map_err(|e| format!("serving {}: {e}", socket.display()))?;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn probe(socket: &Path) -> Result<ExitCode, String> {
    let text = |e: vmig_vfio_user::client::ClientError| e.to_string();
    let client = Client::connect(socket, None).map_err(text)?;
    print!("{}", client.describe(socket).map_err(text)?);
    client.close();
    Ok(ExitCode::SUCCESS)
}

/// Describes a mediated device through the kernel's VFIO. Its UUID is checked (form, then that
/// the mdev exists) before anything is opened, so a bad one is named whatever the kernel has.
fn probe_mdev(uuid: &str) -> Result<ExitCode, String> {
    let text = |e: vmig_vfio::VfioError| e.to_string();
    vmig_vfio::device::check_mdev(uuid).map_err(text)?;
    let container = vmig_vfio::Container::open(None).map_err(text)?;
    let device = container.open_mdev(uuid).map_err(text)?;
    print!(
        "{}",
        vmig_vfio::describe(&container, &device).map_err(text)?
    );
    Ok(ExitCode::SUCCESS)
}

/// Describes a PCI device through the kernel's VFIO.
fn probe_kernel_device(bdf: &str) -> Result<ExitCode, String> {
    let container = vmig_vfio::Container::open(None).map_err(|e| e.to_string())?;
    let device = container.open_device(bdf).map_err(|e| e.to_string())?;
    print!(
        "{}",
        vmig_vfio::describe(&container, &device).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}
