//! `vmig run`: one VM with its guest workload and devices (vfio-user or kernel VFIO), reported once a second;
//! a migration source (`--api`) or destination (`--incoming`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use vmig_dirty::DirtyBitmap;
use vmig_kvm::{DirtyLogMode, Vm, VmConfig, Workload, parse_size, snapshot};
use vmig_migration::machine::device_area_bytes;
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{DeviceSpec, Incoming, Machine, Role, Status};

use crate::qmp::{self, Shared, SocketGuard};

/// Run a VM whose guest writes stamped pages, with vfio-user devices; migrate it.
///
/// Prints once a second the pages the guest says it wrote and the pages the CPU dirty tracker
/// reported, then runs the guest's verify (every working-set page checked against the guest's
/// journal) and exits 0 only if it passed. With `--api` it takes commands (`vmig ctl`) and runs
/// until `quit`; with `--incoming` it waits for a migration, then runs the VM that arrived.
/// Exit codes: 0 passed (or migrated away verified), 1 a check failed (the verify, a device's
/// records, a lost device), 2 an error, 3 a migration's outcome is unknown (the commit was
/// sent and the destination never answered: the VM is not resumed here).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM, e.g. 512M or 4G (16M to 256G; default 512M). With --incoming, RAM of this
    /// size is allocated before the migration starts (the source's must match).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// vCPUs (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: usize,
    /// KIND[,rate=PAGES_PER_S][,wss=SIZE][,hot=SIZE][,hot-percent=N][,shared][,seed=N] with KIND
    /// sequential, random or hotcold.
    #[arg(long, value_name = "SPEC", default_value = "random")]
    workload: String,
    /// Before the guest starts, fill its RAM with random bytes (all but the words of the
    /// guest's stamp), so that no page is zero or sparse and a migration moves every byte.
    #[arg(long, conflicts_with_all = ["restore", "incoming"])]
    fill_random: bool,
    /// CPU dirty tracking: bitmap, clear-log, ring or ring-with-bitmap (default bitmap, the
    /// README says why; with --restore, the mode the VM was saved with).
    #[arg(long, value_name = "MODE")]
    dirty_log: Option<String>,
    /// Dirty-ring entries per vCPU, a power of two (ring modes; default 65536).
    #[arg(long, value_name = "N")]
    ring_entries: Option<u32>,
    /// Seconds to run before the verify (default 5; with --api or --incoming: until `quit`).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    duration: Option<String>,
    /// A device: vfio-user,socket=PATH[,rate=RECORDS_PER_S], vfio-pci,host=DDDD:BB:DD.F for
    /// a PCI device bound to vfio-pci, or vfio-mdev,uuid=UUID for a mediated device such as an
    /// mtty port (repeatable, at most 8). Guest RAM is DMA-mapped to it and its BARs appear in
    /// the guest (I/O-port BARs at port 0xc000 + 0x100 per device); a dma-engine is started
    /// with a ring in the top 2 MiB of RAM per device.
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// QMP control socket (QEMU's protocol: `vmig ctl`, `qmp-shell`, `qemu.qmp` drive it).
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Wait for a migration on tcp:HOST:PORT or unix:PATH instead of booting a VM (`defer`:
    /// where QMP's `migrate-incoming` says, once it does).
    #[arg(long, value_name = "URI", conflicts_with_all = ["restore", "save", "workload", "vcpus", "ring_entries"])]
    incoming: Option<String>,
    /// After the verify, save the paused VM (vCPU state and memory) to this file.
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Continue the VM saved in this file instead of booting a new one (its memory size,
    /// vCPUs and workload come from the file).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["mem", "vcpus", "workload", "ring_entries", "devices"])]
    restore: Option<PathBuf>,
}

pub fn run(args: &RunArgs) -> Result<ExitCode, String> {
    let text = |e: vmig_kvm::KvmError| e.to_string();
    let duration: Option<f64> = match &args.duration {
        None if args.api.is_some() || args.incoming.is_some() => None,
        None => Some(5.0),
        Some(d) => Some(
            d.parse()
                .ok()
                .filter(|d: &f64| d.is_finite() && *d >= 0.0 && *d <= 1e6)
                .ok_or_else(|| {
                    format!("--duration `{d}`: expected a number of seconds from 0 to 1000000")
                })?,
        ),
    };
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
    let devices: Vec<DeviceSpec> = args
        .devices
        .iter()
        .map(|d| {
            d.parse()
                .map_err(|e: vmig_migration::MigrationError| format!("--device: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let ram = match &args.mem {
        Some(mem) => Some(parse_size(mem).map_err(|e| format!("--mem: {e}"))?),
        None => None,
    };
    // `--incoming defer` (QEMU's word): listen where `migrate-incoming` says, once it does.
    let deferred = args.incoming.as_deref() == Some("defer");
    if deferred && args.api.is_none() {
        return Err("--incoming defer waits for migrate-incoming: give --api PATH too".into());
    }
    let incoming_uri: Option<Uri> = match &args.incoming {
        Some(_) if deferred => None,
        Some(uri) => Some(uri.parse().map_err(|e| format!("--incoming: {e}"))?),
        None => None,
    };
    let shared = Shared::new(None, args.incoming.is_some(), deferred);
    // A destination answers (`inmigrate`) while it waits; a source's socket appears only once
    // its VM runs, so a client that sees the socket can migrate at once.
    let serve_api = |shared: &Arc<Shared>| match &args.api {
        Some(path) => {
            qmp::serve(path, Arc::clone(shared))?;
            Ok::<_, String>(Some(SocketGuard(path.clone())))
        }
        None => Ok(None),
    };
    let mut _api_guard = if shared.incoming {
        serve_api(&shared)?
    } else {
        None
    };
    let listener = if deferred {
        println!("waiting for migrate-incoming on the QMP socket");
        match shared.wait_for_incoming() {
            Some(listener) => Some(listener),
            None => return Ok(ExitCode::SUCCESS),
        }
    } else {
        match &incoming_uri {
            Some(uri) => Some(Listener::bind(uri).map_err(|e| format!("--incoming: {e}"))?),
            None => None,
        }
    };

    let machine = if let Some(listener) = listener {
        let prepared_memory = match ram {
            Some(ram) => Some(Vm::prepare_memory(ram).map_err(text)?),
            None => None,
        };
        println!(
            "waiting for a migration on {}{}",
            listener.uri().map_err(|e| e.to_string())?,
            prepared_memory.as_ref().map_or(String::new(), |m| format!(
                " ({} MiB of RAM ready)",
                m.layout().ram() >> 20
            ))
        );
        let incoming = Incoming {
            listener,
            prepared_memory,
            devices,
            dirty_log: chosen,
            drivers: crate::drivers::all(),
        };
        // Received on a thread so that `quit` ends a destination that is still waiting (QEMU's
        // does); leaving drops the half-received VM, and the source goes on as after any
        // failure.
        let receiving = {
            let progress = shared.progress.clone();
            std::thread::spawn(move || vmig_migration::receive(incoming, &progress))
        };
        while !receiving.is_finished() {
            if shared.quit.load(Ordering::Acquire) {
                println!("quit before a migration arrived");
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let arrived = receiving
            .join()
            .map_err(|_| "the incoming migration's thread panicked".to_string())?
            .map_err(|e| format!("incoming migration failed: {e}"))?;
        let report = shared.progress.report();
        let v = &arrived.verification;
        println!(
            "migration arrived in {} ms: {} pages compared, {} device state(s) compared, guest verify {} ({} pages), device records {}",
            report.total_ms,
            v.pages_compared,
            v.devices_compared,
            if v.guest_bad_pages == 0 {
                "passed"
            } else {
                "FAILED"
            },
            v.guest_pages_checked,
            if v.device_records.iter().all(|r| r.passed()) {
                "passed"
            } else {
                "FAILED"
            },
        );
        Arc::new(arrived.machine)
    } else {
        let vm = match &args.restore {
            Some(path) => {
                let vm = snapshot::restore(path, chosen).map_err(text)?;
                println!("restored {}: {}", path.display(), describe(&vm)?);
                vm
            }
            None => {
                let ram = ram.unwrap_or(512 << 20);
                let mut workload: Workload = args
                    .workload
                    .parse()
                    .map_err(|e| format!("--workload: {e}"))?;
                if !devices.is_empty() && workload.wss.is_none() {
                    // Keep the guest's writes out of the devices' DMA areas.
                    let layout = vmig_kvm::guest::GuestLayout::new(ram, &workload).map_err(text)?;
                    let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
                    workload.wss = Some(data.saturating_sub(device_area_bytes(devices.len())));
                }
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
        if args.fill_random {
            // Before the devices: their drivers set up rings in RAM as they attach.
            vm.fill_random()
                .map_err(|e| format!("--fill-random: {e}"))?;
        }
        let machine =
            Machine::attach_with_drivers(vm, &devices, Role::Source, &crate::drivers::all())
                .map_err(|e| e.to_string())?;
        machine.vm.resume().map_err(text)?;
        Arc::new(machine)
    };
    *shared.machine.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&machine));
    if !shared.incoming {
        _api_guard = serve_api(&shared)?;
    }
    let vm = &machine.vm;
    let config = vm.config().clone();
    println!(
        "vm: {} MiB, {} vCPU(s), workload {} over {} pages{}, dirty log {}{}",
        config.ram >> 20,
        config.vcpus,
        config.workload.kind,
        vm.layout().ws_pages,
        config
            .workload
            .rate
            .map_or(String::new(), |r| format!(" at {r} pages/s")),
        config.dirty_log,
        machine
            .devices
            .iter()
            .map(|d| format!(", device {} ({})", d.name, d.protocol_name()))
            .collect::<String>()
    );
    // Without a control socket nothing can migrate this VM: the loop tracks dirty pages itself.
    let tracking = args.api.is_none() && !shared.incoming;
    if tracking {
        vm.dirty_log().start().map_err(text)?;
    }
    let dirty = DirtyBitmap::try_new(vm.memory().layout().top_page()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last_writes = vm.guest_writes().map_err(text)?;
    let mut second = 1;
    // Once the source has sent its commit the VM is the destination's: it never runs here
    // again, whatever the migration's end.
    let mut handed_over = false;
    let mut last_status = Status::None;
    while duration.is_none_or(|d| start.elapsed().as_secs_f64() < d)
        && !shared.quit.load(Ordering::Acquire)
    {
        let tick = Duration::from_secs_f64(
            duration.map_or(f64::from(second), |d| f64::from(second).min(d)),
        );
        while start.elapsed() < tick && !shared.quit.load(Ordering::Acquire) {
            std::thread::sleep((tick - start.elapsed()).min(Duration::from_millis(50)));
        }
        second += 1;
        let report = shared.progress.report();
        if !shared.incoming && report.status != last_status && report.status.is_final() {
            print_outcome(&report);
        }
        last_status = report.status;
        if !shared.incoming && report.status.is_final() && report.committed {
            handed_over = true;
            continue;
        }
        if vm.is_paused() {
            continue;
        }
        vm.check_vcpus().map_err(text)?;
        let writes = vm.guest_writes().map_err(text)?;
        if tracking {
            vm.dirty_log().harvest(&dirty).map_err(text)?;
            println!(
                "{:>6.1}s  guest wrote {:>9} pages   tracker reported {:>9} pages",
                start.elapsed().as_secs_f64(),
                writes - last_writes,
                dirty.harvest().count()
            );
        } else {
            println!(
                "{:>6.1}s  guest wrote {:>9} pages   migration {}",
                start.elapsed().as_secs_f64(),
                writes - last_writes,
                report.status.name()
            );
        }
        last_writes = writes;
    }
    if shared.migrating() {
        shared.progress.cancel();
        while shared.migrating() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let report = shared.progress.report();
        handed_over = report.committed;
        print_outcome(&report);
    }
    if handed_over {
        let report = shared.progress.report();
        if report.status == Status::Unknown {
            println!(
                "quit: the migration's outcome is unknown: {}; the VM is not resumed here",
                report
                    .error
                    .as_deref()
                    .unwrap_or("the destination did not answer the commit")
            );
            return Ok(ExitCode::from(OUTCOME_UNKNOWN));
        }
        return Ok(if report.verified {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if vm.is_paused() {
        vm.resume().map_err(text)?;
    }
    let timeout = Duration::from_secs(30 + vm.layout().ws_pages / 20_000);
    let report = vm.verify(timeout).map_err(text)?;
    vm.pause().map_err(text)?;
    if tracking {
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
    }
    let records = machine.check_devices();
    let records_ok = records.iter().all(|r| r.passed());
    for r in &records {
        println!(
            "device {}: {} records produced, {} checked in the ring{}",
            r.device,
            r.produced,
            r.checked,
            if r.passed() {
                String::new()
            } else {
                format!(", FAILED: {}", r.problems.join("; "))
            }
        );
    }
    match report.failure() {
        None => println!(
            "verify: passed, {} pages checked, guest wrote {} pages in all",
            report.pages_checked,
            vm.guest_writes().map_err(text)?
        ),
        Some(why) => println!("verify: FAILED, {why}"),
    }
    if let Some(path) = &args.save {
        snapshot::save(vm, path).map_err(text)?;
        println!("saved {}: {}", path.display(), describe(vm)?);
    }
    Ok(if report.passed() && records_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The exit code of a source whose migration's outcome is unknown (the commit was sent, the
/// destination's answer never came): neither success nor a plain failure.
pub const OUTCOME_UNKNOWN: u8 = 3;

fn print_outcome(report: &vmig_migration::MigrationReport) {
    match report.status {
        Status::Completed => println!(
            "migrated in {} ms (downtime {} ms, {} passes), verified: {}; the VM runs on the destination{}",
            report.total_ms,
            report.downtime_ms,
            report.passes,
            report.verified,
            report
                .error
                .as_deref()
                .map_or(String::new(), |e| format!(" ({e})"))
        ),
        Status::Unknown => println!(
            "migration outcome unknown: {}; the VM is paused here for good",
            report.error.as_deref().unwrap_or("")
        ),
        _ => println!(
            "migration {}: {}; the VM runs here as before",
            report.status.name(),
            report.error.as_deref().unwrap_or("")
        ),
    }
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
