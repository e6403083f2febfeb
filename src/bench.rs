//! `vmig bench migrate`: whole-migration figures next to the limits measured in the same run
//! (memcpy and a loopback TCP stream of the same size).
//!
//! Scenarios, each a source and a destination VM in this process over loopback TCP:
//! - `full`: a guest that wrote one word into every page, then idles (every page has data);
//! - `converge`: the guest writes a working set as fast as it can while the bandwidth is
//!   limited, so only auto-converge lets the migration finish within the downtime limit.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use vmig_kvm::{Vm, VmConfig, Workload, WorkloadKind, parse_size};
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{Incoming, Machine, MigrationParams, MigrationReport, Progress, Role};

/// Measure whole migrations against memcpy and loopback TCP measured in the same run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: migrate.
    what: String,
    /// Guest RAM of the `full` scenario.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    mem: String,
    /// Bandwidth limit of the `converge` scenario, bytes per second.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 128 << 20)]
    converge_bandwidth: u64,
}

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn memcpy_rate(bytes: u64) -> f64 {
    let src = vec![1u8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
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

fn migrate_once(
    config: &VmConfig,
    params: MigrationParams,
    warm_up: impl FnOnce(&Vm),
) -> Result<MigrationReport, String> {
    let text = |e: vmig_kvm::KvmError| e.to_string();
    let vm = Vm::new(config).map_err(text)?;
    let source = Machine::attach(vm, &[], Role::Source).map_err(|e| e.to_string())?;
    source.vm.resume().map_err(text)?;
    warm_up(&source.vm);
    let prepared = Vm::prepare_memory(config.ram).map_err(text)?;
    let listener = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).map_err(|e| e.to_string())?;
    let uri = listener.uri().map_err(|e| e.to_string())?;
    let incoming = Incoming {
        listener,
        prepared_memory: Some(prepared),
        devices: Vec::new(),
        dirty_log: None,
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

pub fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    if args.what != "migrate" {
        return Err(format!("bench {}: expected migrate", args.what));
    }
    vmig_kvm::kvm_available().map_err(|e| format!("bench migrate runs VMs: {e}"))?;
    let ram = parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    println!("limits, measured now over {} MiB:", ram >> 20);
    let memcpy = memcpy_rate(ram);
    let tcp = tcp_rate(ram)?;
    println!("  memcpy            {memcpy:6.2} GB/s");
    println!("  loopback TCP      {tcp:6.2} GB/s (one stream)");

    // full: one word into every page (a sequential sweep), then idle.
    let layout =
        vmig_kvm::guest::GuestLayout::new(ram, &Workload::default()).map_err(|e| e.to_string())?;
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
    let report = migrate_once(&config, MigrationParams::default(), |vm| {
        while vm.guest_writes().unwrap_or(u64::MAX) < ws_pages {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = vm.set_rate(Some(1));
    })?;
    let rate = report.ram.transferred as f64 / (report.total_ms.max(1) as f64 / 1000.0) / 1e9;
    println!("full ({} MiB, every page written, then idle):", ram >> 20);
    println!(
        "  total {} ms, downtime {} ms, {} passes, {} MiB sent, {:.2} GB/s = {:.2}x loopback TCP, {:.2}x memcpy; verified {}",
        report.total_ms,
        report.downtime_ms,
        report.passes,
        report.ram.transferred >> 20,
        rate,
        rate / tcp,
        rate / memcpy,
        report.verified
    );

    // converge: a 128 MiB working set written flat out under a bandwidth limit.
    let config = VmConfig {
        ram: 512 << 20,
        vcpus: 2,
        workload: Workload {
            kind: WorkloadKind::Random,
            wss: Some(128 << 20),
            ..Workload::default()
        },
        ..VmConfig::default()
    };
    let params = MigrationParams {
        max_bandwidth: args.converge_bandwidth,
        ..MigrationParams::default()
    };
    let report = migrate_once(&config, params, |_| {
        std::thread::sleep(Duration::from_secs(1))
    })?;
    println!(
        "converge (128 MiB working set written flat out, {} MiB/s limit):",
        args.converge_bandwidth >> 20
    );
    println!(
        "  total {} ms, downtime {} ms (limit {} ms), {} passes, throttle {}%, verified {}",
        report.total_ms,
        report.downtime_ms,
        vmig_migration::report::DEFAULT_DOWNTIME_MS,
        report.passes,
        report.throttle_percent,
        report.verified
    );
    Ok(ExitCode::SUCCESS)
}
