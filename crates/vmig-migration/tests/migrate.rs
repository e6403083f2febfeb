//! End-to-end migrations in one process: a source VM with two dma-engines (v1 and v2) doing DMA
//! while the guest writes, migrated over a UNIX socket or TCP to a destination VM with its own
//! two device servers; the destination compares every page and device state before resuming,
//! then the guest verifies its memory and the device records are checked.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vmig_devices::DmaEngine;
use vmig_devices::dma_engine::Migration;
use vmig_kvm::{DirtyLogMode, Vm, VmConfig, Workload};
use vmig_migration::machine::device_area_bytes;
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    DeviceSpec, Incoming, Machine, MigrationParams, Progress, Role, Status, migrate, receive,
};
use vmig_vfio_user::server::{Server, ServerConfig};

macro_rules! require_kvm {
    () => {
        if let Err(why) = vmig_kvm::kvm_available() {
            eprintln!("skipped: this test needs KVM ({why})");
            return;
        }
    };
}

struct DeviceServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceServer {
    fn start(dir: &std::path::Path, name: &str, migration: Migration) -> Self {
        let socket = dir.join(name);
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::new(DmaEngine::new(migration), ServerConfig::default());
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let _ = server.run(&listener, &stop);
            })
        };
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    fn spec(&self, rate: u64) -> DeviceSpec {
        DeviceSpec {
            socket: self.socket.clone(),
            dma_rate: rate,
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmig-migrate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn vm_config(ram: u64, devices: usize, rate: u64, dirty_log: DirtyLogMode) -> VmConfig {
    let layout = vmig_kvm::guest::GuestLayout::new(ram, &Workload::default()).unwrap();
    let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
    VmConfig {
        ram,
        vcpus: 2,
        workload: Workload {
            rate: Some(rate),
            wss: Some(data - device_area_bytes(devices)),
            ..Workload::default()
        },
        dirty_log,
        ..VmConfig::default()
    }
}

struct Scenario {
    dir: PathBuf,
    source_servers: Vec<DeviceServer>,
    dest_servers: Vec<DeviceServer>,
}

impl Scenario {
    fn new(name: &str, migrations: &[Migration]) -> Self {
        let dir = temp_dir(name);
        let start = |side: &str| {
            migrations
                .iter()
                .enumerate()
                .map(|(i, m)| DeviceServer::start(&dir, &format!("{side}-{i}.sock"), *m))
                .collect::<Vec<_>>()
        };
        Self {
            source_servers: start("src"),
            dest_servers: start("dst"),
            dir,
        }
    }

    fn source(&self, ram: u64, rate: u64, dma_rate: u64, mode: DirtyLogMode) -> Machine {
        let config = vm_config(ram, self.source_servers.len(), rate, mode);
        let vm = Vm::new(&config).unwrap();
        let specs: Vec<_> = self
            .source_servers
            .iter()
            .map(|s| s.spec(dma_rate))
            .collect();
        let machine = Machine::attach(vm, &specs, Role::Source).unwrap();
        machine.vm.resume().unwrap();
        machine
    }

    fn incoming(&self, uri: &Uri, mode: Option<DirtyLogMode>) -> Incoming {
        Incoming {
            listener: Listener::bind(uri).unwrap(),
            prepared_memory: None,
            devices: self.dest_servers.iter().map(|s| s.spec(0)).collect(),
            dirty_log: mode,
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.source_servers.clear();
        self.dest_servers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_migration(
    scenario: &Scenario,
    source: &Machine,
    uri: Uri,
    params: MigrationParams,
    dest_mode: Option<DirtyLogMode>,
) -> (
    vmig_migration::Result<()>,
    vmig_migration::Result<vmig_migration::Arrived>,
    Progress,
) {
    let incoming = scenario.incoming(&uri, dest_mode);
    let uri = incoming.listener.uri().unwrap();
    let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
    let progress = Progress::default();
    let params = MigrationParams {
        uri: uri.to_string(),
        ..params
    };
    let sent = migrate(source, &params, &progress);
    let arrived = dest.join().unwrap();
    (sent, arrived, progress)
}

#[test]
fn a_guest_and_two_dma_engines_migrate_with_every_page_and_record() {
    require_kvm!();
    let scenario = Scenario::new("basic", &[Migration::V1, Migration::V2]);
    let source = scenario.source(128 << 20, 5000, 2000, DirtyLogMode::Bitmap);
    std::thread::sleep(Duration::from_millis(300));
    let uri = Uri::Unix(scenario.dir.join("migrate.sock"));
    let (sent, arrived, progress) =
        run_migration(&scenario, &source, uri, MigrationParams::default(), None);
    let report = progress.report();
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    let arrived = arrived.unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(report.verified, "{report:#?}");
    let v = report.verification.as_ref().unwrap();
    assert_eq!(v.pages_compared, (128 << 20) / 4096);
    assert_eq!(v.devices_compared, 2);
    assert!(v.guest_pages_checked > 0);
    assert_eq!(v.device_records.len(), 2);
    assert!(
        v.device_records
            .iter()
            .all(|r| r.produced > 0 && r.checked > 0),
        "{v:#?}"
    );
    assert!(
        source.vm.is_paused(),
        "the source stays stopped after the commit"
    );
    assert!(!arrived.machine.vm.is_paused());
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
}
