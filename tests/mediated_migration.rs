//! Seed 002 end to end: dma-engines whose DMA nothing tracks (a mapped doorbell page, no DMA
//! logging, no `DIRTY_PAGES`) migrate only because their mediator traps the doorbell page
//! during the migration and marks the buffers the device may write. Without the mediator the
//! migration is refused, and forced through it fails verification; outside a migration, and
//! after one fails or is cancelled, the doorbell costs no exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmig_devices::DmaEngine;
use vmig_devices::dma_engine::{self, Migration, Options};
use vmig_kvm::{DirtyLogMode, Vm, VmConfig, Workload};
use vmig_migration::driver::GuestDrivers;
use vmig_migration::machine::device_area_bytes;
use vmig_migration::report::MigrationReport;
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    Arrived, Incoming, Machine, MigrationParams, Progress, Role, Status, migrate, receive,
};
use vmig_test_support::{require_kvm, wait_until};

/// The guest drivers and mediators, exactly as the `vmig` binary registers them.
#[path = "../src/drivers.rs"]
mod drivers;
use drivers::DmaEngineMediator;

#[path = "common/device_server.rs"]
mod device_server;
use device_server::DeviceServer;

#[path = "common/progress.rs"]
mod progress;
use progress::wait_for_precopy;

/// How long a test waits for something that takes milliseconds when the machine is idle.
const PATIENCE: Duration = Duration::from_secs(30);
/// The device's load: records per second.
const DMA_RATE: u64 = 5000;
/// The guest's load: pages written per second.
const GUEST_RATE: u64 = 20_000;
const RAM: u64 = 64 << 20;

/// Device servers for a source and a destination, and the directory of their sockets.
struct Scenario {
    dir: PathBuf,
    source_servers: Vec<DeviceServer>,
    dest_servers: Vec<DeviceServer>,
}

impl Scenario {
    fn new(name: &str, devices: &[Options]) -> Self {
        let dir = std::env::temp_dir().join(format!("vmig-mediated-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let start = |side: &str| {
            devices
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    DeviceServer::serve(
                        &dir,
                        &format!("{side}-{i}.sock"),
                        DmaEngine::with_options(*o),
                    )
                })
                .collect::<Vec<_>>()
        };
        Self {
            source_servers: start("src"),
            dest_servers: start("dst"),
            dir,
        }
    }

    /// A running source VM, its devices offered to `drivers`.
    fn source(&self, drivers: &GuestDrivers) -> Machine {
        let layout = vmig_kvm::guest::GuestLayout::new(RAM, &Workload::default()).unwrap();
        let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
        let config = VmConfig {
            ram: RAM,
            vcpus: 2,
            workload: Workload {
                rate: Some(GUEST_RATE),
                wss: Some(data - device_area_bytes(self.source_servers.len())),
                ..Workload::default()
            },
            dirty_log: DirtyLogMode::Bitmap,
            ..VmConfig::default()
        };
        let specs: Vec<_> = self
            .source_servers
            .iter()
            .map(|s| s.spec(DMA_RATE))
            .collect();
        let machine =
            Machine::attach_with_drivers(Vm::new(&config).unwrap(), &specs, Role::Source, drivers)
                .unwrap();
        machine.vm.resume().unwrap();
        machine
    }

    /// A destination listening in the scenario's directory, with `drivers`, on its thread.
    fn destination(
        &self,
        drivers: &GuestDrivers,
    ) -> (
        Uri,
        std::thread::JoinHandle<vmig_migration::Result<Arrived>>,
    ) {
        let uri = Uri::Unix(self.dir.join("m.sock"));
        let incoming = Incoming {
            listener: Listener::bind(&uri).unwrap(),
            prepared_memory: None,
            devices: self.dest_servers.iter().map(|s| s.spec(0)).collect(),
            drivers: drivers.clone(),
            dirty_log: None,
        };
        (
            uri,
            std::thread::spawn(move || receive(incoming, &Progress::default())),
        )
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.source_servers.clear();
        self.dest_servers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Device `i`'s `CONSUMER`: how far the guest's driver got.
fn consumer(machine: &Machine, i: usize) -> u64 {
    let mut bytes = [0u8; 8];
    machine.devices[i]
        .device
        .region_read(0, dma_engine::reg::CONSUMER, &mut bytes)
        .unwrap();
    u64::from_le_bytes(bytes)
}

/// Where device `i`'s doorbell page is in the guest.
fn doorbell_gpa(machine: &Machine, i: usize) -> u64 {
    let bar0 = machine.devices[i]
        .bars
        .iter()
        .find(|b| b.index == 0)
        .unwrap();
    bar0.gpa.raw() + dma_engine::DOORBELL_PAGE
}

/// While the guest consumes more than a ring-full of records through every device's doorbell,
/// none of its doorbell writes exits: the page is mapped.
fn assert_doorbells_cost_no_exit(machine: &Machine) {
    for i in 0..machine.devices.len() {
        assert_eq!(
            machine.vm.device_memory_trapped(doorbell_gpa(machine, i)),
            Some(false),
            "device {i}'s doorbell page is mapped"
        );
        let exits = machine.trapped_writes(i, 0);
        let start = consumer(machine, i);
        wait_until(
            "the guest to consume a ring-full of records",
            PATIENCE,
            || {
                let now = consumer(machine, i);
                if now > start + 2 * dma_engine::driver::RING_ENTRIES {
                    Ok(())
                } else {
                    Err(format!("CONSUMER {start} -> {now}"))
                }
            },
        );
        assert_eq!(
            machine.trapped_writes(i, 0),
            exits,
            "device {i}: doorbell writes exited outside a migration"
        );
    }
}

/// A migration slow enough that the devices rewrite their buffers after the first pass sent
/// them.
fn throttled() -> MigrationParams {
    MigrationParams {
        max_bandwidth: 32 << 20,
        ..MigrationParams::default()
    }
}

/// Migrates `source` to a destination with `drivers`; while it runs, checks that every
/// doorbell page is trapped.
fn migrate_checking_traps(
    scenario: &Scenario,
    source: &Machine,
    drivers: &GuestDrivers,
    params: MigrationParams,
    trapped: bool,
) -> (
    vmig_migration::Result<()>,
    vmig_migration::Result<Arrived>,
    MigrationReport,
) {
    let (uri, dest) = scenario.destination(drivers);
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..params
    };
    let sent = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            wait_for_precopy(&progress);
            (0..source.devices.len())
                .map(|i| source.vm.device_memory_trapped(doorbell_gpa(source, i)))
                .collect::<Vec<_>>()
        });
        let sent = migrate(source, &params, &progress);
        let seen = watcher.join().unwrap();
        assert!(
            seen.iter().all(|t| *t == Some(trapped)),
            "doorbell pages trapped during the migration: {seen:?}, expected {trapped}"
        );
        sent
    });
    (sent, dest.join().unwrap(), progress.report())
}

/// A source that a migration left: running, its doorbell pages mapped again (no exit), its
/// devices producing whole records.
fn assert_healthy_and_untrapped(source: &Machine) {
    assert!(!source.vm.is_paused(), "the source runs again");
    assert_doorbells_cost_no_exit(source);
    for check in source.check_devices() {
        assert!(check.passed() && check.produced > 0, "{check:?}");
    }
    let verify = source.vm.verify(Duration::from_secs(60)).unwrap();
    assert!(verify.passed(), "{verify:?}");
}

#[test]
fn two_mediated_devices_v1_and_v2_migrate_verified_under_load_each_with_its_own_handle() {
    require_kvm!();
    let hidden = [
        Options::hidden_dma(Migration::V1),
        Options::hidden_dma(Migration::V2),
    ];
    let scenario = Scenario::new("verified", &hidden);
    let mediator = Arc::new(DmaEngineMediator::default());
    let drivers = drivers::with_mediator(Arc::clone(&mediator));
    let source = scenario.source(&drivers);
    assert_eq!(mediator.open_devices(), 2, "one handle per device");
    assert_doorbells_cost_no_exit(&source);
    let params = throttled();
    let (sent, arrived, report) =
        migrate_checking_traps(&scenario, &source, &drivers, params, true);
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    let arrived = arrived.unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(report.verified, "{report:#?}");
    let records = &report.verification.as_ref().unwrap().device_records;
    assert!(
        records.len() == 2 && records.iter().all(|r| r.passed() && r.checked > 0),
        "{records:#?}"
    );
    let mediations: Vec<_> = report
        .devices
        .iter()
        .map(|d| d.mediation.clone().expect("the mediator owns every device"))
        .collect();
    assert_ne!(
        mediations[0].handle, mediations[1].handle,
        "{mediations:#?}"
    );
    for (i, m) in mediations.iter().enumerate() {
        assert!(m.trapped && m.trapped_writes > 0, "device {i}: {m:#?}");
        let source_name = format!("(mediator dma-engine, handle {})", m.handle);
        let reported = report
            .dirty_sources
            .iter()
            .find(|s| s.name.ends_with(&source_name))
            .unwrap_or_else(|| panic!("no dirty source {source_name}: {report:#?}"));
        assert!(reported.pages > 0, "{reported:?}");
    }
    eprintln!(
        "mediated: {mediations:#?}, downtime {} ms, total {} ms",
        report.downtime_ms, report.total_ms
    );
    // The source, stopped for good, has its pages mapped again; the destination's devices got
    // handles of their own, and their doorbells cost no exit there.
    for i in 0..2 {
        assert_eq!(
            source.vm.device_memory_trapped(doorbell_gpa(&source, i)),
            Some(false)
        );
    }
    assert_eq!(mediator.open_devices(), 4);
    assert_doorbells_cost_no_exit(&arrived.machine);
    drop(arrived);
    drop(source);
    assert_eq!(
        mediator.open_devices(),
        0,
        "every handle is released when its device goes"
    );
}

#[test]
fn without_its_mediator_the_hidden_device_is_refused_and_forced_through_fails_verification() {
    require_kvm!();
    let scenario = Scenario::new("unmediated", &[Options::hidden_dma(Migration::V2)]);
    let drivers = drivers::drivers_only();
    let source = scenario.source(&drivers);
    let progress = Progress::default();
    let params = MigrationParams {
        uri: Uri::Unix(scenario.dir.join("nobody.sock")).to_string(),
        ..MigrationParams::default()
    };
    let err = migrate(&source, &params, &progress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nothing tracks the pages it writes by DMA") && err.contains("mediator"),
        "{err}"
    );
    assert_eq!(progress.report().status, Status::Failed);
    // Forced through without tracking the device, the pages it rewrote after they were sent
    // differ on the destination: the mediator is what catches them.
    let params = MigrationParams {
        device_dirty_tracking: false,
        ..throttled()
    };
    let (sent, arrived, report) =
        migrate_checking_traps(&scenario, &source, &drivers, params, false);
    let err = sent.unwrap_err().to_string();
    assert!(err.contains("differ"), "{err}");
    assert!(arrived.is_err());
    assert!(!report.verified && !report.committed, "{report:#?}");
    assert_eq!(report.devices[0].mediation, None);
    assert_healthy_and_untrapped(&source);
}

#[test]
fn a_failed_and_a_cancelled_migration_map_the_doorbell_again_and_the_device_runs() {
    require_kvm!();
    let mut scenario = Scenario::new("rollback", &[Options::hidden_dma(Migration::V2)]);
    let mediator = Arc::new(DmaEngineMediator::default());
    let drivers = drivers::with_mediator(Arc::clone(&mediator));
    let source = scenario.source(&drivers);
    let slow = MigrationParams {
        max_bandwidth: 8 << 20,
        ..MigrationParams::default()
    };

    // Cancelled during pre-copy.
    let (uri, dest) = scenario.destination(&drivers);
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..slow.clone()
    };
    let err = std::thread::scope(|scope| {
        scope.spawn(|| {
            wait_for_precopy(&progress);
            assert_eq!(
                source.vm.device_memory_trapped(doorbell_gpa(&source, 0)),
                Some(true)
            );
            progress.cancel();
        });
        migrate(&source, &params, &progress)
            .unwrap_err()
            .to_string()
    });
    assert!(err.contains("migrate-cancel"), "{err}");
    assert_eq!(progress.report().status, Status::Cancelled);
    let stats = progress.report().devices[0].mediation.clone().unwrap();
    assert!(stats.trapped && stats.trapped_writes > 0, "{stats:#?}");
    assert!(dest.join().unwrap().is_err());
    assert_healthy_and_untrapped(&source);

    // Failed: the destination's device server dies during pre-copy, so the destination
    // cannot take the device's state and aborts.
    let (uri, dest) = scenario.destination(&drivers);
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..slow
    };
    let err = std::thread::scope(|scope| {
        scope.spawn(|| {
            wait_for_precopy(&progress);
            scenario.dest_servers.clear();
        });
        migrate(&source, &params, &progress)
            .unwrap_err()
            .to_string()
    });
    assert_eq!(progress.report().status, Status::Failed, "{err}");
    assert!(dest.join().unwrap().is_err());
    assert_healthy_and_untrapped(&source);
    assert_eq!(
        mediator.open_devices(),
        1,
        "the destinations' handles went with them"
    );
}

#[test]
fn a_device_that_logs_its_own_dma_is_never_trapped_even_with_a_mediator() {
    require_kvm!();
    let logged = Options {
        doorbell_page: true,
        ..Options::new(Migration::V2)
    };
    let scenario = Scenario::new("logged", &[logged]);
    let drivers = drivers::all();
    let source = scenario.source(&drivers);
    let params = throttled();
    let (sent, arrived, report) =
        migrate_checking_traps(&scenario, &source, &drivers, params, false);
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    arrived.unwrap();
    assert!(report.verified, "{report:#?}");
    let m = report.devices[0]
        .mediation
        .clone()
        .expect("the mediator owns it");
    assert!(!m.trapped && m.trapped_writes == 0, "{m:#?}");
    assert!(
        report
            .dirty_sources
            .iter()
            .any(|s| s.name.ends_with("(dma logging)") && s.pages > 0),
        "{report:#?}"
    );
    assert_eq!(source.trapped_writes(0, 0), 0);
}
