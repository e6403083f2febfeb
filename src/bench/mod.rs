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
    /// What to measure: migrate; or qemu-guest, which writes QEMU's bench guest (a disk
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
    /// Scenarios to run, comma-separated: full, full-random, dirty, converge, or all.
    #[arg(long, value_name = "LIST", default_value = "all")]
    scenario: String,
    /// TCP connections carrying pages.
    #[arg(long, value_name = "N", default_value_t = MigrationParams::default().connections)]
    connections: u16,
    /// Migrate the same scenarios with QEMU: auto (each QEMU found: qemu-system-x86_64 on PATH,
    /// and QEMU's newest release when the tests have prepared it under target/qemu-sid/), on
    /// (as auto, and fail when none is found), off.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    qemu: String,
    /// Compare with this qemu-system-x86_64 instead of the ones found (may be given more than once).
    #[arg(long, value_name = "PATH")]
    qemu_binary: Vec<std::path::PathBuf>,
    /// Runs of each migration (vmig's and QEMU's): their min / median / max are printed.
    #[arg(long, value_name = "N", default_value_t = 3)]
    runs: usize,
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

/// One loopback TCP stream: `send` writes into it (and says how many bytes) while `receive`
/// reads the other end on its own thread; the rate is of the whole, until `receive` is done.
fn loopback_rate(
    send: impl FnOnce(&mut std::net::TcpStream) -> std::io::Result<u64>,
    receive: impl FnOnce(std::net::TcpStream) -> std::io::Result<()> + Send,
) -> Result<f64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || receive(listener.accept()?.0));
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let sent = send(&mut s).map_err(|e| e.to_string())?;
        drop(s);
        reader
            .join()
            .map_err(|_| "reader panicked".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(gbps(sent, start.elapsed()))
    })
}

/// One loopback TCP stream of `bytes`, cache-hot: 1 MiB written again and again, read into
/// 1 MiB.
fn tcp_rate(bytes: u64) -> Result<f64, String> {
    let chunk = vec![7u8; 1 << 20];
    loopback_rate(
        |s| {
            let mut sent = 0;
            while sent < bytes {
                s.write_all(&chunk)?;
                sent += chunk.len() as u64;
            }
            Ok(sent)
        },
        |mut s| {
            let mut buf = vec![0u8; 1 << 20];
            while s.read(&mut buf)? != 0 {}
            Ok(())
        },
    )
}

/// One loopback TCP stream sending all of `src` and receiving it into `dst` (both memory
/// already touched, far larger than the caches): what moving RAM costs a migration before any
/// framing or checksum, which the cache-hot stream of [`tcp_rate`] does not show.
fn tcp_ram_rate(src: &[u8], dst: &mut [u8]) -> Result<f64, String> {
    loopback_rate(
        |s| {
            for chunk in src.chunks(1 << 20) {
                s.write_all(chunk)?;
            }
            Ok(src.len() as u64)
        },
        |mut s| s.read_exact(dst),
    )
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
                    &[],
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

/// One migration of a fresh VM of `config`: `before_start` may fill its RAM before the guest
/// runs, `warm_up` runs with the guest running, then the migration.
fn migrate_once(
    config: &VmConfig,
    devices: &Devices,
    params: MigrationParams,
    before_start: impl FnOnce(&Vm) -> Result<(), String>,
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
    before_start(&source.vm)?;
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

/// Milliseconds, from microseconds, to print.
#[expect(clippy::cast_precision_loss, reason = "a figure to print")]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Where the time of a migration went (the report's timeline).
fn print_timeline(report: &MigrationReport) {
    let t = &report.timeline;
    let pass = |(i, p): (usize, &vmig_migration::report::PassTime)| {
        format!(
            "{} {:.0} ms ({} pages, {:.2} GB/s)",
            i + 1,
            ms(p.us),
            p.pages,
            ratio(p.bytes, p.us.max(1)) / 1000.0
        )
    };
    let mut passes: Vec<String> = t.passes.iter().enumerate().map(pass).collect();
    if passes.len() > 6 {
        let last = passes.split_off(passes.len() - 2);
        passes.truncate(3);
        passes.push("...".into());
        passes.extend(last);
    }
    println!(
        "        time: setup {:.1} ms; passes: {}",
        ms(t.setup_us),
        passes.join(", ")
    );
    let compared = report
        .verification
        .as_ref()
        .is_some_and(|v| v.pages_compared > 0);
    let digest = if !compared {
        "memory not compared".to_string()
    } else if t.digest_pages_read == 0 {
        "no page read again: the digests taken as pages were sent".to_string()
    } else {
        format!(
            "the digest of {} pages devices can write took {:.1} beside them",
            t.digest_pages_read,
            ms(t.digest_us)
        )
    };
    println!(
        "        stop: pause + harvest {:.1}, final pages {:.1}, device state {:.1}, vCPUs {:.1}, \
         digest wait {:.1} ({digest}), destination's checks {:.1}, commit {:.1} ms",
        ms(t.stop_us),
        ms(t.final_pages_us),
        ms(t.device_state_us),
        ms(t.vcpu_us),
        ms(t.digest_wait_us),
        ms(t.checks_us),
        ms(t.commit_us)
    );
}

/// Min, median and max of `values`, to print.
fn spread(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    match values {
        [] => "none".into(),
        [one] => format!("{one:.2}"),
        _ => format!(
            "{:.2} / {:.2} / {:.2}",
            values[0],
            values[values.len() / 2],
            values[values.len() - 1]
        ),
    }
}

#[expect(clippy::cast_precision_loss, reason = "a figure to print")]
fn float(x: u64) -> f64 {
    x as f64
}

/// Runs `once` `runs` times, printing each report with its timeline; the reports.
fn repeat(
    runs: usize,
    mut once: impl FnMut() -> Result<MigrationReport, String>,
) -> Result<Vec<MigrationReport>, String> {
    (0..runs)
        .map(|_| {
            let report = once()?;
            print_vmig(&report);
            print_timeline(&report);
            Ok(report)
        })
        .collect()
}

/// The min / median / max line of `reports`' total and downtime.
fn print_spread(who: &str, totals: &mut [f64], downtimes: &mut [f64]) {
    println!(
        "  {who} over {} run(s), min / median / max: total {} ms, downtime {} ms",
        totals.len(),
        spread(totals),
        spread(downtimes)
    );
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

/// Migrates `config` with `params` `runs` times, then as often with `verify_memory=false`
/// (what the digest of every page adds to the downtime), each time with fresh devices (a
/// device server serves one VM's migration), and prints both against the downtime limit.
/// Returns the verified reports.
fn migrate_with_and_without_verify(
    runs: usize,
    config: &VmConfig,
    devices: impl Fn() -> Result<Devices, String>,
    params: &MigrationParams,
    warm_up: impl Fn(&Vm),
    goal: &str,
) -> Result<Vec<MigrationReport>, String> {
    let verified = repeat(runs, || {
        migrate_once(config, &devices()?, params.clone(), |_| Ok(()), &warm_up)
    })?;
    let unverified_params = MigrationParams {
        verify_memory: false,
        ..params.clone()
    };
    println!("  without verify_memory:");
    let unverified = repeat(runs, || {
        migrate_once(
            config,
            &devices()?,
            unverified_params.clone(),
            |_| Ok(()),
            &warm_up,
        )
    })?;
    for (what, reports) in [
        ("vmig", &verified),
        ("vmig without verify_memory", &unverified),
    ] {
        let (mut totals, mut downtimes) = totals_and_downtimes(reports);
        print_spread(what, &mut totals, &mut downtimes);
        println!(
            "  {what}: median downtime = {:.2}x the limit of {DEFAULT_DOWNTIME_MS} ms{goal}",
            median(&mut downtimes) / float(DEFAULT_DOWNTIME_MS)
        );
    }
    Ok(verified)
}

fn totals_and_downtimes(reports: &[MigrationReport]) -> (Vec<f64>, Vec<f64>) {
    reports
        .iter()
        .map(|r| (float(r.total_ms), float(r.downtime_ms)))
        .unzip()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs each QEMU's side of a scenario `runs` times and prints it with the ratios of the
/// medians to vmig's.
fn compare_with_qemu(
    qemus: &[qemu::Qemu],
    runs: usize,
    scenario: &qemu::Scenario,
    ours: &[MigrationReport],
    total_goal: &str,
) {
    for q in qemus {
        compare_with_one_qemu(q, runs, scenario, ours, total_goal);
    }
}

fn compare_with_one_qemu(
    q: &qemu::Qemu,
    runs: usize,
    scenario: &qemu::Scenario,
    ours: &[MigrationReport],
    total_goal: &str,
) {
    let label = q.label();
    let mut theirs = Vec::new();
    for _ in 0..runs {
        match qemu::migrate(q, scenario, QEMU_TIMEOUT) {
            Ok(report) => {
                println!(
                    "  {label}  total {:5} ms, downtime {:4} ms, {:2} passes, {:5} MiB sent, throttle {:2}%, dirty rate {} pages/s",
                    report.total_ms,
                    report.downtime_ms,
                    report.passes,
                    report.transferred >> 20,
                    report.throttle_percent,
                    report.dirty_pages_rate
                );
                theirs.push(report);
            }
            Err(e) => println!("  {label}  failed: {e}"),
        }
    }
    if theirs.is_empty() {
        return;
    }
    let (mut their_totals, mut their_downtimes): (Vec<f64>, Vec<f64>) = theirs
        .iter()
        .map(|r| (float(r.total_ms), float(r.downtime_ms)))
        .unzip();
    print_spread(&label, &mut their_totals, &mut their_downtimes);
    let (mut totals, mut downtimes) = totals_and_downtimes(ours);
    let total = median(&mut totals) / median(&mut their_totals).max(1.0);
    let downtime = median(&mut downtimes) / median(&mut their_downtimes).max(1.0);
    println!(
        "  vmig against {label} (medians): total time {total:.2}x its{total_goal}, downtime {downtime:.2}x its"
    );
}

/// `full` and `full-random`: `ram` whose every page holds data (a word the guest wrote, or
/// random bytes the VMM wrote before the guest started), migrated idle; throughput against
/// memcpy and against the loopback stream measured before each run.
fn full(
    args: &BenchArgs,
    params: &MigrationParams,
    ram: u64,
    random: bool,
    memcpy: f64,
) -> Result<Vec<MigrationReport>, String> {
    let layout =
        vmig_kvm::guest::GuestLayout::new(ram, &Workload::default()).map_err(|e| e.to_string())?;
    let ws_pages = layout.ws_pages;
    let config = VmConfig {
        ram,
        vcpus: 2,
        workload: Workload {
            kind: WorkloadKind::Sequential,
            rate: Some(if random { 1 } else { 1_000_000 }),
            ..Workload::default()
        },
        ..VmConfig::default()
    };
    if random {
        println!(
            "full-random ({} MiB of random bytes the VMM wrote before the guest started, idle):",
            ram >> 20
        );
    } else {
        println!("full ({} MiB, every page written, then idle):", ram >> 20);
    }
    // The loopback stream's rate swings by half within minutes on a shared host: each run is
    // judged against the streams measured just before it.
    let len = usize::try_from(ram).map_err(|e| e.to_string())?;
    let (src, mut dst) = (vec![0x5au8; len], vec![1u8; len]);
    let mut tcp_before = Vec::with_capacity(args.runs);
    let mut tcp_ram_before = Vec::with_capacity(args.runs);
    let reports = repeat(args.runs, || {
        let tcp = tcp_rate(ram)?;
        let tcp_ram = tcp_ram_rate(&src, &mut dst)?;
        println!(
            "  loopback TCP      {tcp:6.2} GB/s just before this run ({tcp_ram:.2} GB/s moving RAM to RAM)"
        );
        tcp_before.push(tcp);
        tcp_ram_before.push(tcp_ram);
        migrate_once(
            &config,
            &Devices::none(),
            params.clone(),
            |vm| {
                if random {
                    vm.fill_random()
                        .map_err(|e| format!("filling guest RAM: {e}"))
                } else {
                    Ok(())
                }
            },
            |vm| {
                if random {
                    return;
                }
                while vm.guest_writes().unwrap_or(u64::MAX) < ws_pages {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = vm.set_rate(Some(1));
            },
        )
    })?;
    // Guest RAM moved over the whole migration: sparse and zero pages move in few bytes, and
    // count as the RAM they are (as QEMU's zero pages do for it).
    let mut rates: Vec<f64> = reports
        .iter()
        .map(|r| ratio(r.ram.total, r.total_ms.max(1)) / 1e6)
        .collect();
    let (mut totals, mut downtimes) = totals_and_downtimes(&reports);
    print_spread("vmig", &mut totals, &mut downtimes);
    drop((src, dst));
    // Run by run: each rate against the limit measured just before it.
    let shares_of = |rates: &[f64], limits: &[f64]| -> Vec<f64> {
        rates.iter().zip(limits).map(|(r, l)| r / l).collect()
    };
    let mut shares = shares_of(&rates, &tcp_before);
    let mut ram_shares = shares_of(&rates, &tcp_ram_before);
    let mut bare = shares_of(&tcp_ram_before, &tcp_before);
    println!(
        "  vmig  {} GB/s of RAM moved = {}x the loopback TCP stream measured before each run (goal: 0.8x), median {:.2}x memcpy (min / median / max)",
        spread(&mut rates),
        spread(&mut shares),
        median(&mut rates) / memcpy,
    );
    println!(
        "  vmig  {}x the stream moving RAM to RAM, which itself reaches {}x the loopback TCP stream (min / median / max)",
        spread(&mut ram_shares),
        spread(&mut bare),
    );
    Ok(reports)
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
    if args.runs == 0 {
        return Err("--runs 0: expected at least 1".into());
    }
    vmig_kvm::kvm_available().map_err(|e| format!("bench migrate runs VMs: {e}"))?;
    let ram = parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    let all = ["full", "full-random", "dirty", "converge"];
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => all.to_vec(),
        list => list.split(',').collect(),
    };
    if let Some(bad) = scenarios.iter().find(|s| !all.contains(s)) {
        return Err(format!(
            "--scenario {bad}: expected full, full-random, dirty, converge or all"
        ));
    }
    let qemus = match args.qemu.as_str() {
        "off" if !args.qemu_binary.is_empty() => {
            return Err("--qemu off with --qemu-binary: expected one or the other".into());
        }
        "off" => Vec::new(),
        "auto" | "on" if !args.qemu_binary.is_empty() => args
            .qemu_binary
            .iter()
            .map(|p| qemu::Qemu::probe(p).map_err(|e| format!("--qemu-binary: {e}")))
            .collect::<Result<_, _>>()?,
        mode @ ("auto" | "on") => {
            let (found, absent) = qemu::discover();
            if found.is_empty() && mode == "on" {
                return Err(format!("--qemu on: no QEMU found: {}", absent.join("; ")));
            }
            for why in &absent {
                println!("not comparing with every QEMU: {why}");
            }
            found
        }
        other => return Err(format!("--qemu {other}: expected auto, on or off")),
    };
    if !qemus.is_empty() {
        let names: Vec<String> = qemus.iter().map(qemu::Qemu::label).collect();
        println!("comparing with {}", names.join(" and "));
    }
    let with_qemu = !qemus.is_empty();
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

    if scenarios.iter().any(|s| s.starts_with("full")) {
        println!("limits, measured now over {} MiB:", ram >> 20);
        let memcpy = memcpy_rate(ram);
        let tcp = tcp_rate(ram)?;
        println!("  memcpy            {memcpy:6.2} GB/s");
        println!("  loopback TCP      {tcp:6.2} GB/s (one stream)");
        if scenarios.contains(&"full") {
            let reports = full(args, &params, ram, false, memcpy)?;
            if with_qemu {
                let scenario = qemu::Scenario {
                    ram,
                    writes: qemu::Writes::Idle,
                    max_bandwidth: None,
                    downtime_ms: DEFAULT_DOWNTIME_MS,
                    warm_up: Duration::ZERO,
                    channels: args.connections,
                };
                compare_with_qemu(
                    &qemus,
                    args.runs,
                    &scenario,
                    &reports,
                    " (goal: at most 0.6x)",
                );
            }
        }
        if scenarios.contains(&"full-random") {
            full(args, &params, ram, true, memcpy)?;
            if with_qemu {
                println!(
                    "  qemu  not run: its boot-sector guest cannot fill RAM with random bytes, and QEMU has no way to write guest RAM before the guest starts"
                );
            }
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
        let reports = migrate_with_and_without_verify(
            args.runs,
            &config,
            || Devices::dma_engines(DIRTY_DMA_RATE),
            &params,
            |vm| {
                fill_working_set(vm);
                std::thread::sleep(Duration::from_secs(2))
            },
            " (goal: under 50 ms with verify_memory, 25 ms without)",
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
                channels: args.connections,
            };
            compare_with_qemu(&qemus, args.runs, &scenario, &reports, " (goal: below 1x)");
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
        let reports = migrate_with_and_without_verify(
            args.runs,
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
                channels: args.connections,
            };
            compare_with_qemu(
                &qemus,
                args.runs,
                &scenario,
                &reports,
                " (goal: at most 0.25x)",
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
