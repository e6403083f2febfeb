//! `vmig demo`: a whole live migration on this machine in one command.
//!
//! It starts, as child processes of this binary, a dma-engine device server per device and side
//! (one speaking migration v1, one v2), a destination `vmig run --incoming` with its RAM ready,
//! and a source `vmig run` whose guest writes random pages while both devices DMA into its
//! memory; lets the guest run a moment; migrates over loopback TCP with a progress bar; and
//! prints the summary. Everything lives in a temporary directory removed at the end; the
//! children's output goes to log files there, shown if something fails.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use vmig_migration::Status;

use crate::children::{Children, free_port};
use crate::ctl::{follow_migration, print_summary};
use crate::qmp::QmpClient;

/// Migrate a running VM with two DMA-ing vfio-user devices over loopback TCP and verify it.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Device migration protocols: v1 (migration region and DIRTY_PAGES), v2 (state machine and
    /// DMA logging) or both (one device of each).
    #[arg(long, value_name = "v1|v2|both", default_value = "both")]
    migration: String,
    /// CPU dirty tracking: bitmap, clear-log or ring.
    #[arg(long, value_name = "MODE", default_value = "bitmap")]
    dirty_log: String,
    /// Guest RAM of both VMs.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// Pages per second the guest writes (0: as fast as it can).
    #[arg(long, value_name = "PAGES_PER_S", default_value_t = 20_000)]
    rate: u64,
    /// Records (pages) per second each device writes by DMA.
    #[arg(long, value_name = "N", default_value_t = 2_000)]
    dma_rate: u64,
    /// Longest pause the guest may see, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = vmig_migration::report::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Devices that hide their DMA (seed 002: a mapped doorbell page, no DMA logging, no
    /// DIRTY_PAGES), so that their mediator traps the doorbell during the migration and marks
    /// the buffers they may write.
    #[arg(long)]
    hide_dma: bool,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &DemoArgs) -> Result<ExitCode, String> {
    vmig_kvm::kvm_available().map_err(|e| format!("the demo runs VMs on KVM: {e}"))?;
    let protocols: &[&str] = match args.migration.as_str() {
        "v1" => &["v1"],
        "v2" => &["v2"],
        "both" => &["v1", "v2"],
        other => return Err(format!("--migration {other}: expected v1, v2 or both")),
    };
    let serve_options: &[&str] = if args.hide_dma { &["--hide-dma"] } else { &[] };
    let mode: vmig_kvm::DirtyLogMode = args
        .dirty_log
        .parse()
        .map_err(|e: vmig_kvm::KvmError| e.to_string())?;
    vmig_kvm::parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    let mut children = Children::new("demo")?;
    let dir = children.dir().to_path_buf();
    let path = |name: &str| dir.join(name).display().to_string();
    let mut source_devices = Vec::new();
    let mut dest_devices = Vec::new();
    for side in ["src", "dst"] {
        for protocol in protocols {
            let socket = path(&format!("{side}-dma-{protocol}.sock"));
            children.spawn_dma_engine(
                &format!("device-{side}-{protocol}"),
                Path::new(&socket),
                protocol,
                serve_options,
            )?;
            let list = if side == "src" {
                &mut source_devices
            } else {
                &mut dest_devices
            };
            list.push(socket);
        }
    }
    for socket in source_devices.iter().chain(&dest_devices) {
        children.wait_for(Path::new(socket))?;
    }
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let (src_api, dst_api) = (path("source.api"), path("destination.api"));
    let mut dest_args: Vec<String> = [
        "run",
        "--incoming",
        &uri,
        "--mem",
        &args.mem,
        "--api",
        &dst_api,
        "--dirty-log",
        &mode.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for d in &dest_devices {
        dest_args.extend(["--device".into(), format!("vfio-user,socket={d}")]);
    }
    children.spawn("destination", &dest_args)?;
    let workload = format!("random,rate={}", args.rate);
    let mut source_args: Vec<String> = [
        "run",
        "--mem",
        &args.mem,
        "--vcpus",
        "2",
        "--workload",
        &workload,
        "--api",
        &src_api,
        "--dirty-log",
        &mode.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for d in &source_devices {
        source_args.extend([
            "--device".into(),
            format!("vfio-user,socket={d},rate={}", args.dma_rate),
        ]);
    }
    children.spawn("source", &source_args)?;
    children.wait_for(Path::new(&src_api))?;
    children.wait_for(Path::new(&dst_api))?;
    let mut source = QmpClient::connect(Path::new(&src_api), Duration::from_secs(10))?;
    let mut destination = QmpClient::connect(Path::new(&dst_api), Duration::from_secs(10))?;
    if !args.json {
        println!(
            "source: {} RAM, 2 vCPUs writing {} random pages/s; devices {} each writing {} pages/s by DMA{}; migrating to {uri}",
            args.mem,
            args.rate,
            protocols.join(" + "),
            args.dma_rate,
            if args.hide_dma {
                " that no IOMMU tracks (their mediator traps the doorbell)"
            } else {
                ""
            }
        );
    }
    // Let the guest and the devices dirty memory for a moment first.
    std::thread::sleep(Duration::from_secs(1));
    children.check_alive()?;
    let report = follow_migration(
        &mut source,
        &uri,
        json!({"downtime-limit": args.downtime_ms}),
    );
    let _ = source.execute("quit", json!({}));
    let _ = destination.execute("quit", json!({}));
    let report = match report {
        Ok(r) => r,
        Err(e) => return Err(format!("{e}\n{}", children.logs())),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_summary(&report);
    }
    let ok = report.status == Status::Completed && report.verified;
    if !ok && !args.json {
        eprintln!("{}", children.logs());
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
