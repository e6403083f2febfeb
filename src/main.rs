//! `vmig`: the command line of the vmig live-migration engine.
//!
//! `vmig run` starts a VM on `/dev/kvm` with a self-checking guest workload and CPU dirty
//! tracking, prints once a second what the guest wrote and what the tracker reported, and ends
//! with the guest's own verify. `vmig device serve` serves a sample vfio-user device and
//! `vmig device probe` describes any vfio-user server. `vmig run --api` speaks QMP to
//! `vmig ctl` and to QEMU's own tools, `vmig migrate` follows a migration to a `vmig run --incoming`, and `vmig demo`
//! does all of it in one command. `vmig relay` forwards a migration stream and injects one
//! fault into it, and `vmig soak` runs randomized migrations with faults and checks
//! each.

mod bench;
mod children;
mod ctl;
mod demo;
mod device;
mod drivers;
mod relay;
mod run;
mod soak;

// The QMP control protocol is the library part of this package (`src/lib.rs`).
use vmig::qmp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of KVM virtual machines with VFIO and vfio-user devices.
///
/// vmig moves a running VM to another host while its passthrough devices keep doing DMA:
/// device state travels through the VFIO migration interface (v1 region, v2 state machine),
/// and the pages devices dirty are tracked by the IOMMU side and merged with KVM's.
#[derive(Debug, Parser)]
#[command(name = "vmig", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
    Device(device::DeviceArgs),
    Ctl(ctl::CtlArgs),
    Migrate(ctl::MigrateArgs),
    Demo(demo::DemoArgs),
    Bench(bench::BenchArgs),
    Relay(relay::RelayArgs),
    Soak(soak::SoakArgs),
}

/// Library logs (`tracing`) to stderr, filtered by `RUST_LOG` (for example
/// `RUST_LOG=vmig_migration=debug`); only warnings and errors without it.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Device(args) => device::run(&args),
        Command::Ctl(args) => ctl::ctl(&args),
        Command::Migrate(args) => ctl::migrate(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Relay(args) => relay::run(&args),
        Command::Soak(args) => soak::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("vmig: error: {message}");
            ExitCode::from(2)
        }
    }
}
