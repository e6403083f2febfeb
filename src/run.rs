//! `vmig run`: one VM, its guest workload and CPU dirty tracking, reported once a second.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use vmig_dirty::DirtyBitmap;
use vmig_kvm::{DirtyLogMode, Vm, VmConfig, Workload, parse_size, snapshot};

/// Run a VM whose guest writes stamped pages, tracking the pages it dirties.
///
/// Prints once a second the pages the guest says it wrote and the pages the CPU dirty tracker
/// reported, then runs the guest's verify (every working-set page checked against the guest's
/// journal) and exits 0 only if it passed.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM, e.g. 512M or 4G (16M to 256G).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// vCPUs (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: usize,
    /// KIND[,rate=PAGES_PER_S][,wss=SIZE][,hot=SIZE][,hot-percent=N][,shared][,seed=N] with KIND
    /// sequential, random or hotcold.
    #[arg(long, value_name = "SPEC", default_value = "random")]
    workload: String,
    /// CPU dirty tracking: bitmap, clear-log, ring or ring-with-bitmap (default bitmap, the
    /// README says why; with --restore, the mode the VM was saved with).
    #[arg(long, value_name = "MODE")]
    dirty_log: Option<String>,
    /// Dirty-ring entries per vCPU, a power of two (ring modes; default 65536).
    #[arg(long, value_name = "N")]
    ring_entries: Option<u32>,
    /// Seconds to run before the verify.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "5",
        allow_hyphen_values = true
    )]
    duration: String,
    /// After the verify, save the paused VM (vCPU state and memory) to this file.
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Continue the VM saved in this file instead of booting a new one (its memory size,
    /// vCPUs and workload come from the file).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["mem", "vcpus", "workload", "ring_entries"])]
    restore: Option<PathBuf>,
}

pub fn run(args: &RunArgs) -> Result<ExitCode, String> {
    let text = |e: vmig_kvm::KvmError| e.to_string();
    let duration: f64 = args
        .duration
        .parse()
        .ok()
        .filter(|d: &f64| d.is_finite() && *d >= 0.0 && *d <= 1e6)
        .ok_or_else(|| {
            format!(
                "--duration `{}`: expected a number of seconds from 0 to 1000000",
                args.duration
            )
        })?;
    let chosen: Option<DirtyLogMode> = match &args.dirty_log {
        Some(mode) => Some(mode.parse().map_err(text)?),
        None => None,
    };
    let mode = chosen.unwrap_or(DirtyLogMode::Bitmap);
    if args.ring_entries.is_some() && !mode.uses_ring() {
        return Err(format!(
            "--ring-entries only applies to --dirty-log ring or ring-with-bitmap, not {mode}"
        ));
    }
    let vm = match &args.restore {
        Some(path) => {
            let vm = snapshot::restore(path, chosen).map_err(text)?;
            println!("restored {}: {}", path.display(), describe(&vm)?);
            vm
        }
        None => {
            let ram = parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
            let workload: Workload = args
                .workload
                .parse()
                .map_err(|e| format!("--workload: {e}"))?;
            Vm::new(&VmConfig {
                ram,
                vcpus: args.vcpus,
                workload,
                dirty_log: mode,
                ring_entries: args.ring_entries.unwrap_or(vmig_kvm::DEFAULT_RING_ENTRIES),
            })
            .map_err(text)?
        }
    };
    let config = vm.config().clone();
    println!(
        "vm: {} MiB, {} vCPU(s), workload {} over {} pages{}, dirty log {}",
        config.ram >> 20,
        config.vcpus,
        config.workload.kind,
        vm.layout().ws_pages,
        config
            .workload
            .rate
            .map_or(String::new(), |r| format!(" at {r} pages/s")),
        config.dirty_log
    );
    vm.dirty_log().start().map_err(text)?;
    vm.resume().map_err(text)?;
    let dirty = DirtyBitmap::try_new(vm.memory().layout().top_page()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last_writes = vm.guest_writes().map_err(text)?;
    let mut second = 1;
    while start.elapsed().as_secs_f64() < duration {
        let tick = Duration::from_secs_f64((second as f64).min(duration));
        if let Some(wait) = tick.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        vm.check_vcpus().map_err(text)?;
        vm.dirty_log().harvest(&dirty).map_err(text)?;
        let reported = dirty.harvest().count();
        let writes = vm.guest_writes().map_err(text)?;
        println!(
            "{:>6.1}s  guest wrote {:>9} pages   tracker reported {:>9} pages",
            start.elapsed().as_secs_f64(),
            writes - last_writes,
            reported
        );
        last_writes = writes;
        second += 1;
    }
    let timeout = Duration::from_secs(30 + vm.layout().ws_pages / 20_000);
    let report = vm.verify(timeout).map_err(text)?;
    vm.pause().map_err(text)?;
    let stats = vm.dirty_log().stats();
    println!(
        "tracker: {} harvests, {} pages reported{}",
        stats.harvests,
        stats.pages_reported,
        if config.dirty_log.uses_ring() {
            format!(
                ", {} ring entries, {} ring-full exits, {} overflows",
                stats.ring_entries, stats.ring_full_exits, stats.ring_overflows
            )
        } else if config.dirty_log == DirtyLogMode::ClearLog {
            format!(", {} KVM_CLEAR_DIRTY_LOG calls", stats.clear_calls)
        } else {
            String::new()
        }
    );
    if report.passed() {
        println!(
            "verify: passed, {} pages checked, guest wrote {} pages in all",
            report.pages_checked,
            vm.guest_writes().map_err(text)?
        );
    } else {
        println!(
            "verify: FAILED, {} of {} pages inconsistent (first: {:?})",
            report.bad_count, report.pages_checked, report.bad_pages
        );
    }
    if let Some(path) = &args.save {
        snapshot::save(&vm, path).map_err(text)?;
        println!("saved {}: {}", path.display(), describe(&vm)?);
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Where each vCPU stands and a digest of memory: the same line before a save and after the
/// restore shows the guest continues at the same instruction with the same memory.
fn describe(vm: &Vm) -> Result<String, String> {
    let states = vm.save_vcpus().map_err(|e| e.to_string())?;
    let rips: Vec<String> = states
        .iter()
        .enumerate()
        .map(|(i, s)| format!("vcpu{i} rip={:#x}", s.regs.rip))
        .collect();
    let digest = vm.memory().digest().map_err(|e| e.to_string())?;
    Ok(format!("{} memory-digest={digest:#018x}", rips.join(" ")))
}
