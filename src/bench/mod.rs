//! `vmig bench migrate`: whole-migration figures next to the limits measured in the same run
//! (memcpy and a loopback TCP stream of the same size), and next to QEMU migrating the same
//! scenarios on this machine in the same run.
//!
//! Scenarios, each a source and a destination VM in this process over loopback TCP:
//! - `full`: a guest that wrote one word into every page, then idles (every page has data);
//! - `dirty`: 1 GiB, the guest writes 20 000 random pages/s while two dma-engine devices (one
//!   migration v1, one v2, served by child processes) write 2 500 pages/s each by DMA;
//! - `converge`: the guest writes a 128 MiB working set as fast as it can while the bandwidth
//!   is limited, so only auto-converge lets the migration finish within the downtime limit.
//!
//! `dirty` and `converge` run again with `verify_memory=false`, to show what the digest of
//! every page adds to the downtime.
//!
//! QEMU's guest (see [`qemu`]) has one vCPU and no vfio-user device (Debian's QEMU has no
//! vfio-user client), so in `dirty` it writes the devices' pages itself: 25 000 pages/s, every
//! fifth into the same 512 pages, as the dma-engines' records land in their ring buffers.

mod qemu;
mod tsc;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use vmig_kvm::{Vm, VmConfig, Workload, WorkloadKind, parse_size};
use vmig_migration::report::DEFAULT_DOWNTIME_MS;
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    DeviceSpec, Incoming, Machine, MigrationParams, MigrationReport, Progress, Role,
};

use crate::children::Children;

/// Measure whole migrations against memcpy, loopback TCP and QEMU, all measured in the same run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: migrate; or qemu-guest, which writes QEMU's bench guest (a floppy
    /// image that writes every page of `--mem` RAM, then idles) to `--image`.
    what: String,
    /// Where `qemu-guest` writes the image.
    #[arg(long, value_name = "PATH")]
    image: Option<std::path::PathBuf>,
    /// Guest RAM of the `full` scenario.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    mem: String,
    /// Bandwidth limit of the `converge` scenario, bytes per second.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 128 << 20)]
    converge_bandwidth: u64,
    /// Scenarios to run, comma-separated: full, dirty, converge, or all.
    #[arg(long, value_name = "LIST", default_value = "all")]
    scenario: String,
    /// TCP connections carrying pages.
    #[arg(long, value_name = "N", default_value_t = MigrationParams::default().connections)]
    connections: u16,
    /// Migrate the same scenarios with QEMU: auto (when qemu-system-x86_64 is installed), on, off.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    qemu: String,
}

/// Guest pages per second written by the CPU and by the devices in `dirty`.
const DIRTY_CPU_RATE: u64 = 20_000;
const DIRTY_DMA_RATE: u64 = 5_000;
/// Pages the dma-engines' records land in (their ring buffers).
const DMA_RING_PAGES: u32 = 512;
/// Working set of `converge`, and where QEMU's guest places it.
const CONVERGE_WSS: u64 = 128 << 20;
const CONVERGE_RAM: u64 = 512 << 20;
/// Longest a QEMU migration may take before it is cancelled and reported as not converging.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);

/// `numerator / denominator` as a figure to print.
#[expect(clippy::cast_precision_loss, reason = "a figure to print")]
fn ratio(numerator: u64, denominator: u64) -> f64 {
    numerator as f64 / denominator as f64
}

#[expect(clippy::cast_precision_loss, reason = "a figure to print")]
fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn memcpy_rate(bytes: u64) -> f64 {
    let len = usize::try_from(bytes).expect("a buffer this host can allocate");
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // touch the destination first: reused memory, as a VM's is
    let start = Instant::now();
    dst.copy_from_slice(&src);
    let elapsed = start.elapsed();
    std::hint::black_box(&dst);
    gbps(bytes, elapsed)
}

fn tcp_rate(bytes: u64) -> Result<f64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        while s.read(&mut buf)? != 0 {}
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
        sent += chunk.len() as u64;
    }
    drop(s);
    reader
        .join()
        .map_err(|_| "reader panicked".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(gbps(sent, start.elapsed()))
}

/// Device servers for both sides of a scenario.
struct Devices {
    source: Vec<DeviceSpec>,
    destination: Vec<DeviceSpec>,
    /// Keeps the servers running.
    _servers: Option<Children>,
}

impl Devices {
    fn none() -> Self {
        Self {
            source: Vec::new(),
            destination: Vec::new(),
            _servers: None,
        }
    }

    /// A dma-engine speaking v1 and one speaking v2 on each side, the source's writing
    /// `pages_per_s` between them.
    fn dma_engines(pages_per_s: u64) -> Result<Self, String> {
        let mut servers = Children::new("bench")?;
        let mut devices = Self::none();
        for side in ["source", "destination"] {
            for protocol in ["v1", "v2"] {
                let socket = servers.dir().join(format!("{side}-{protocol}.sock"));
                servers.spawn_dma_engine(
                    &format!("device-{side}-{protocol}"),
                    &socket,
                    protocol,
                )?;
                servers.wait_for(&socket)?;
                let spec = DeviceSpec::vfio_user(socket, pages_per_s / 2);
                if side == "source" {
                    devices.source.push(spec);
                } else {
                    devices.destination.push(spec);
                }
            }
        }
        devices._servers = Some(servers);
        Ok(devices)
    }
}

fn migrate_once(
    config: &VmConfig,
    devices: &Devices,
    params: MigrationParams,
    warm_up: impl FnOnce(&Vm),
) -> Result<MigrationReport, String> {
    let text = |e: vmig_kvm::KvmError| e.to_string();
    let mut config = config.clone();
    if !devices.source.is_empty() {
        // Keep the guest's writes out of the devices' DMA areas.
        let layout =
            vmig_kvm::guest::GuestLayout::new(config.ram, &config.workload).map_err(text)?;
        let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
        config.workload.wss = Some(data.saturating_sub(
            vmig_migration::machine::device_area_bytes(devices.source.len()),
        ));
    }
    let vm = Vm::new(&config).map_err(text)?;
    let source =
        Machine::attach_with_drivers(vm, &devices.source, Role::Source, &crate::drivers::all())
            .map_err(|e| e.to_string())?;
    source.vm.resume().map_err(text)?;
    warm_up(&source.vm);
    let prepared = Vm::prepare_memory(config.ram).map_err(text)?;
    let listener = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).map_err(|e| e.to_string())?;
    let uri = listener.uri().map_err(|e| e.to_string())?;
    let incoming = Incoming {
        listener,
        prepared_memory: Some(prepared),
        devices: devices.destination.clone(),
        dirty_log: None,
        drivers: crate::drivers::all(),
    };
    let dest = std::thread::spawn(move || vmig_migration::receive(incoming, &Progress::default()));
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..params
    };
    let sent = vmig_migration::migrate(&source, &params, &progress);
    let arrived = dest
        .join()
        .map_err(|_| "destination panicked".to_string())?;
    let report = progress.report();
    sent.map_err(|e| format!("{e}: {report:?}"))?;
    arrived.map_err(|e| e.to_string())?;
    Ok(report)
}

/// Puts data into every working-set page (a word in the middle, where the guest's stamps are
/// not), so that, as in QEMU's guest, no page is zero.
fn fill_working_set(vm: &Vm) {
    let layout = vm.layout();
    for index in 0..layout.ws_pages {
        if let Some(gpa) = layout.ws_page_gpa(index) {
            let _ = vm.memory().store_u64(gpa + 2048, gpa | 1);
        }
    }
}

fn print_vmig(report: &MigrationReport) {
    println!(
        "  vmig  total {:5} ms (setup {} ms), downtime {:4} ms, {:2} passes, {:5} MiB sent, throttle {:2}%, dirty rate {} pages/s, verified {}",
        report.total_ms,
        report.setup_ms,
        report.downtime_ms,
        report.passes,
        report.ram.transferred >> 20,
        report.throttle_percent,
        report.ram.dirty_pages_rate,
        report.verified
    );
}

/// Migrates `config` with `params`, then again with `verify_memory=false` (what the digest of
/// every page adds to the downtime), each time with fresh devices (a device server serves one
/// VM's migration), and prints both against the downtime limit. Returns the verified report.
fn migrate_with_and_without_verify(
    config: &VmConfig,
    devices: impl Fn() -> Result<Devices, String>,
    params: &MigrationParams,
    warm_up: impl Fn(&Vm),
    goal: &str,
) -> Result<MigrationReport, String> {
    let limit = |report: &MigrationReport| ratio(report.downtime_ms, DEFAULT_DOWNTIME_MS);
    let report = migrate_once(config, &devices()?, params.clone(), &warm_up)?;
    print_vmig(&report);
    println!(
        "  vmig  downtime {} ms = {:.2}x the limit of {DEFAULT_DOWNTIME_MS} ms{goal}",
        report.downtime_ms,
        limit(&report)
    );
    let unverified = MigrationParams {
        verify_memory: false,
        ..params.clone()
    };
    let unverified = migrate_once(config, &devices()?, unverified, &warm_up)?;
    println!(
        "  vmig  without verify_memory: total {} ms, downtime {} ms = {:.2}x the limit{goal}",
        unverified.total_ms,
        unverified.downtime_ms,
        limit(&unverified)
    );
    Ok(report)
}

/// Runs QEMU's side of a scenario and prints it with the ratios to vmig's figures.
fn compare_with_qemu(scenario: &qemu::Scenario, ours: &MigrationReport, total_goal: Option<f64>) {
    match qemu::migrate(scenario, QEMU_TIMEOUT) {
        Ok(theirs) => {
            println!(
                "  qemu  total {:5} ms, downtime {:4} ms, {:2} passes, {:5} MiB sent, throttle {:2}%, dirty rate {} pages/s",
                theirs.total_ms,
                theirs.downtime_ms,
                theirs.passes,
                theirs.transferred >> 20,
                theirs.throttle_percent,
                theirs.dirty_pages_rate
            );
            let speedup = ratio(theirs.total_ms, ours.total_ms.max(1));
            let downtime = ratio(ours.downtime_ms, theirs.downtime_ms.max(1));
            println!(
                "  vmig against qemu: total time {speedup:.2}x faster{}, downtime {downtime:.2}x qemu's (goal: below 1x)",
                total_goal.map_or(String::new(), |g| format!(" (goal: {g}x)")),
            );
        }
        Err(e) => println!("  qemu  failed: {e}"),
    }
}

pub fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    if args.what == "qemu-guest" {
        let image = args
            .image
            .as_ref()
            .ok_or("bench qemu-guest writes the image to --image PATH: give it")?;
        let ram = parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
        let sector = qemu::boot_sector(ram, qemu::Writes::Idle)?;
        std::fs::write(image, sector).map_err(|e| format!("{}: {e}", image.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.what != "migrate" {
        return Err(format!(
            "bench {}: expected migrate or qemu-guest",
            args.what
        ));
    }
    vmig_kvm::kvm_available().map_err(|e| format!("bench migrate runs VMs: {e}"))?;
    let ram = parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    let all = ["full", "dirty", "converge"];
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => all.to_vec(),
        list => list.split(',').collect(),
    };
    if let Some(bad) = scenarios.iter().find(|s| !all.contains(s)) {
        return Err(format!(
            "--scenario {bad}: expected full, dirty, converge or all"
        ));
    }
    let with_qemu = match args.qemu.as_str() {
        "off" => false,
        "on" => {
            qemu::available()?;
            true
        }
        "auto" => match qemu::available() {
            Ok(()) => true,
            Err(why) => {
                println!("not comparing with QEMU: {why}");
                false
            }
        },
        other => return Err(format!("--qemu {other}: expected auto, on or off")),
    };
    let tsc_hz = tsc::cycles_per_second();
    let params = MigrationParams {
        connections: args.connections,
        ..MigrationParams::default()
    };
    MigrationParams {
        uri: "tcp:127.0.0.1:0".into(),
        ..params.clone()
    }
    .check()
    .map_err(|e| format!("--connections: {e}"))?;

    if scenarios.contains(&"full") {
        println!("limits, measured now over {} MiB:", ram >> 20);
        let memcpy = memcpy_rate(ram);
        let tcp = tcp_rate(ram)?;
        println!("  memcpy            {memcpy:6.2} GB/s");
        println!("  loopback TCP      {tcp:6.2} GB/s (one stream)");
        // One word into every page (a sequential sweep), then idle.
        let layout = vmig_kvm::guest::GuestLayout::new(ram, &Workload::default())
            .map_err(|e| e.to_string())?;
        let ws_pages = layout.ws_pages;
        let config = VmConfig {
            ram,
            vcpus: 2,
            workload: Workload {
                kind: WorkloadKind::Sequential,
                rate: Some(1_000_000),
                ..Workload::default()
            },
            ..VmConfig::default()
        };
        let report = migrate_once(&config, &Devices::none(), params.clone(), |vm| {
            while vm.guest_writes().unwrap_or(u64::MAX) < ws_pages {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = vm.set_rate(Some(1));
        })?;
        let rate = ratio(report.ram.transferred, report.total_ms.max(1)) / 1e6;
        println!("full ({} MiB, every page written, then idle):", ram >> 20);
        print_vmig(&report);
        println!(
            "  vmig  {rate:.2} GB/s = {:.2}x loopback TCP (goal: 0.7x), {:.2}x memcpy",
            rate / tcp,
            rate / memcpy,
        );
        if with_qemu {
            let scenario = qemu::Scenario {
                ram,
                writes: qemu::Writes::Idle,
                max_bandwidth: None,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                warm_up: Duration::ZERO,
            };
            compare_with_qemu(&scenario, &report, Some(3.0));
        }
    }

    if scenarios.contains(&"dirty") {
        let ram = 1 << 30;
        let config = VmConfig {
            ram,
            vcpus: 2,
            workload: Workload {
                kind: WorkloadKind::Random,
                rate: Some(DIRTY_CPU_RATE),
                ..Workload::default()
            },
            ..VmConfig::default()
        };
        println!(
            "dirty ({} MiB, guest {DIRTY_CPU_RATE} random pages/s, devices v1 + v2 {DIRTY_DMA_RATE} pages/s by DMA):",
            ram >> 20
        );
        let report = migrate_with_and_without_verify(
            &config,
            || Devices::dma_engines(DIRTY_DMA_RATE),
            &params,
            |vm| {
                fill_working_set(vm);
                std::thread::sleep(Duration::from_secs(2))
            },
            " (goal: under 50 ms)",
        )?;
        if with_qemu {
            let pages_per_s = DIRTY_CPU_RATE + DIRTY_DMA_RATE;
            let scenario = qemu::Scenario {
                ram,
                writes: qemu::Writes::Paced {
                    ws: (
                        1 << 20,
                        u32::try_from(ram - (1 << 20))
                            .map_err(|_| "the QEMU guest takes under 4 GiB")?,
                    ),
                    tsc_cycles_per_write: u32::try_from(tsc_hz / pages_per_s).unwrap_or(u32::MAX),
                    device_like: Some((
                        u32::try_from(pages_per_s / DIRTY_DMA_RATE).unwrap_or(u32::MAX),
                        DMA_RING_PAGES,
                    )),
                },
                max_bandwidth: None,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                warm_up: Duration::from_secs(2),
            };
            compare_with_qemu(&scenario, &report, None);
        }
    }

    if scenarios.contains(&"converge") {
        let config = VmConfig {
            ram: CONVERGE_RAM,
            vcpus: 1,
            workload: Workload {
                kind: WorkloadKind::Random,
                wss: Some(CONVERGE_WSS),
                ..Workload::default()
            },
            ..VmConfig::default()
        };
        let params = MigrationParams {
            max_bandwidth: args.converge_bandwidth,
            ..params.clone()
        };
        println!(
            "converge ({} MiB working set written flat out by one vCPU, {} MiB/s limit):",
            CONVERGE_WSS >> 20,
            args.converge_bandwidth >> 20
        );
        let report = migrate_with_and_without_verify(
            &config,
            || Ok(Devices::none()),
            &params,
            |_| std::thread::sleep(Duration::from_secs(1)),
            "",
        )?;
        if with_qemu {
            let scenario = qemu::Scenario {
                ram: CONVERGE_RAM,
                writes: qemu::Writes::FlatOut {
                    ws: (16 << 20, u32::try_from(CONVERGE_WSS).unwrap_or(u32::MAX)),
                },
                max_bandwidth: Some(args.converge_bandwidth),
                downtime_ms: DEFAULT_DOWNTIME_MS,
                warm_up: Duration::from_secs(1),
            };
            compare_with_qemu(&scenario, &report, None);
        }
    }
    Ok(ExitCode::SUCCESS)
}
