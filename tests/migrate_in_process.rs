//! End-to-end migrations in one process: a source VM with two dma-engines (v1 and v2) doing DMA
//! while the guest writes, migrated over a UNIX socket or TCP to a destination VM with its own
//! two device servers; the destination compares every page and device state before resuming,
//! then the guest verifies its memory and the device records are checked.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use vmig_devices::DmaEngine;
use vmig_devices::dma_engine::{self, Migration};
use vmig_kvm::{DirtyLogMode, Vm, VmConfig, Workload};
use vmig_migration::machine::{device_area_bytes, interrupt_vector};
use vmig_migration::report::MigrationReport;
use vmig_migration::transport::{Listener, Uri};
use vmig_migration::{
    Incoming, Machine, MigrationParams, Progress, Role, Status, migrate, receive,
};
use vmig_test_support::{require_kvm, wait_until};

/// The guest drivers, exactly as the `vmig` binary registers them.
#[path = "../src/drivers.rs"]
mod drivers;
use vmig_vfio_user::server::{Device, DeviceContext, MigrationSupport, Refusal};

/// How long a test waits for something that takes milliseconds when the machine is idle.
const PATIENCE: Duration = Duration::from_secs(30);

#[path = "common/device_server.rs"]
mod device_server;
use device_server::DeviceServer;

#[path = "common/progress.rs"]
mod progress;
use progress::wait_for_precopy;

impl DeviceServer {
    fn start(dir: &std::path::Path, name: &str, migration: Migration) -> Self {
        Self::serve(dir, name, DmaEngine::new(migration))
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
        let machine =
            Machine::attach_with_drivers(vm, &specs, Role::Source, &drivers::all()).unwrap();
        machine.vm.resume().unwrap();
        machine
    }

    fn incoming(&self, uri: &Uri, mode: Option<DirtyLogMode>) -> Incoming {
        Incoming {
            listener: Listener::bind(uri).unwrap(),
            prepared_memory: None,
            devices: self.dest_servers.iter().map(|s| s.spec(0)).collect(),
            drivers: drivers::all(),
            dirty_log: mode,
        }
    }
}

impl Scenario {
    /// Starts a destination on a UNIX socket; returns it and the source's parameters for it.
    fn start_destination(
        &self,
        max_bandwidth: u64,
    ) -> (
        JoinHandle<vmig_migration::Result<vmig_migration::Arrived>>,
        MigrationParams,
    ) {
        let uri = Uri::Unix(self.dir.join("m.sock"));
        let incoming = self.incoming(&uri, None);
        let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
        let params = MigrationParams {
            uri: uri.to_string(),
            max_bandwidth,
            ..MigrationParams::default()
        };
        (dest, params)
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
    // Each record's MSI-X reaches vCPU 0's local APIC by irqfd, pending there (interrupts off).
    let vectors = [interrupt_vector(0, 0), interrupt_vector(1, 0)];
    wait_for_interrupts(&source.vm, &vectors);
    assert_status_page_mapped(&source);
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
    // The devices can write all of RAM by DMA: every page was read again with the VM stopped,
    // and there was nothing left to audit after resuming.
    assert_eq!(report.timeline.digest_pages_read, (128 << 20) / 4096);
    assert_eq!(v.pages_audited, 0);
    assert_eq!(v.devices_compared, 2);
    // The switchover waited for the destination's ack that both devices had their initial
    // state (vfio-user devices give no pre-copy account: sent with their first pass).
    let acked = report
        .switchover_ack_ms
        .expect("with devices, the switchover waits for the destination's ack");
    assert!(acked <= report.total_ms - report.downtime_ms, "{report:#?}");
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
    // The destination wired the devices' interrupts again: cleared, they come back.
    let vm = &arrived.machine.vm;
    take_pending_interrupts(vm);
    wait_for_interrupts(vm, &vectors);
    assert_status_page_mapped(&arrived.machine);
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
}

/// The vectors pending at vCPU 0 of a running VM, cleared (paused for the moment it takes).
fn take_pending_interrupts(vm: &Vm) -> Vec<u8> {
    vm.pause().unwrap();
    let pending = vm.take_pending_interrupts(0).unwrap();
    vm.resume().unwrap();
    pending
}

/// Waits until every one of `vectors` has been pending at vCPU 0 (clearing them as it looks).
fn wait_for_interrupts(vm: &Vm, vectors: &[u8]) {
    let mut seen = Vec::new();
    wait_until("every device's MSI-X at vCPU 0", PATIENCE, || {
        seen.extend(take_pending_interrupts(vm));
        if vectors.iter().all(|v| seen.contains(v)) {
            Ok(())
        } else {
            Err(format!("pending {seen:x?}, expected {vectors:x?}"))
        }
    });
}

/// The dma-engine's status page (BAR2, one sparse-mmap area) is a guest memslot: while this
/// watches, the guest consumes more records than the ring holds, so it sees `PRODUCER` move,
/// yet none of its reads of BAR0 or BAR2 trap.
fn assert_status_page_mapped(machine: &Machine) {
    let consumed = |device: &vmig_migration::machine::AttachedDevice| {
        let mut bytes = [0u8; 8];
        (device
            .device
            .region_read(0, dma_engine::reg::CONSUMER, &mut bytes))
        .unwrap();
        u64::from_le_bytes(bytes)
    };
    let before: Vec<u64> = machine.devices.iter().map(consumed).collect();
    for (i, device) in machine.devices.iter().enumerate() {
        assert!(
            device
                .mapped
                .iter()
                .any(|area| area.region == dma_engine::STATUS_REGION && area.len == 4096),
            "{device:?}"
        );
        wait_until("the guest to consume more than a ring", PATIENCE, || {
            let consumer = consumed(device) - before[i];
            if consumer > 256 {
                Ok(())
            } else {
                Err(format!("device {i}: the guest consumed {consumer}"))
            }
        });
        assert_eq!(machine.trapped_reads(i, 0), 0);
        assert_eq!(machine.trapped_reads(i, dma_engine::STATUS_REGION), 0);
    }
}

/// Every CPU dirty-log mode, with a v1 and a v2 device: pre-copy is slowed (64 MiB/s for a
/// 64 MiB guest, a 50 ms downtime limit) so the guest and the devices dirty pages already sent,
/// and the migration must send them again in later passes, from every source, and lose none.
#[test]
fn every_cpu_dirty_log_mode_with_both_device_protocols_over_tcp_and_parallel_connections() {
    require_kvm!();
    let ram: u64 = 64 << 20;
    for (mode, connections) in [
        (DirtyLogMode::Bitmap, 2),
        (DirtyLogMode::ClearLog, 1),
        (DirtyLogMode::Ring, 3),
    ] {
        let scenario = Scenario::new(&format!("mode-{mode}"), &[Migration::V1, Migration::V2]);
        let source = scenario.source(ram, 8000, 3000, mode);
        std::thread::sleep(Duration::from_millis(200));
        let params = MigrationParams {
            connections,
            max_bandwidth: 64 << 20,
            downtime_ms: 50,
            ..MigrationParams::default()
        };
        let uri = Uri::Tcp("127.0.0.1:0".into());
        let (sent, arrived, progress) = run_migration(&scenario, &source, uri, params, Some(mode));
        let report = progress.report();
        sent.unwrap_or_else(|e| panic!("{mode}: {e}\n{report:#?}"));
        let arrived = arrived.unwrap();
        assert!(report.verified, "{mode}: {report:#?}");
        assert_eq!(arrived.machine.vm.config().dirty_log, mode);
        assert_every_source_reported(&report, &mode.to_string());
        assert!(report.passes > 1, "{mode}: {report:#?}");
        assert_pages_were_sent_again(&report, ram);
    }
}

/// The report names four dirty sources, in order — the CPU's (in `cpu_mode`), the VMM's own
/// writes, then one per device (v1's `DIRTY_PAGES`, v2's DMA logging) — and the CPU and every
/// device reported pages.
fn assert_every_source_reported(report: &MigrationReport, cpu_mode: &str) {
    let names: Vec<&str> = report
        .dirty_sources
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names.len(), 4, "CPU, VMM and two devices: {report:#?}");
    assert_eq!(names[0], format!("cpu (kvm {cpu_mode})"));
    assert_eq!(names[1], "vmm");
    assert!(
        names[2].contains("src-0.sock") && names[2].ends_with("(dirty pages)"),
        "v1: {names:?}"
    );
    assert!(
        names[3].contains("src-1.sock") && names[3].ends_with("(dma logging)"),
        "v2: {names:?}"
    );
    for source in [0, 2, 3] {
        assert!(
            report.dirty_sources[source].pages > 0,
            "{}: no pages reported: {report:#?}",
            names[source]
        );
    }
}

/// More pages were sent than the guest has: pages dirtied after they were sent went again.
fn assert_pages_were_sent_again(report: &MigrationReport, ram: u64) {
    let sent = report.ram.normal_pages + report.ram.zero_pages + report.ram.sparse_pages;
    assert!(
        sent > ram / 4096,
        "{} passes sent {sent} pages of {}: {report:#?}",
        report.passes,
        ram / 4096
    );
}

/// A healthy source after a failed migration: running, devices running (records keep coming),
/// no dirty logging, and the guest's verify passes.
fn assert_healthy(source: &Machine) {
    assert!(!source.vm.is_paused(), "the source runs again");
    assert!(
        !source.vm.dirty_log().is_tracking(),
        "dirty logging is stopped"
    );
    let before = source.check_devices();
    assert_eq!(before.len(), source.devices.len(), "one check per device");
    for (i, b) in before.iter().enumerate() {
        let a = wait_until("the device to produce records again", PATIENCE, || {
            let a = source.check_devices().remove(i);
            if a.produced > b.produced {
                Ok(a)
            } else {
                Err(format!("{a:?}"))
            }
        });
        assert_eq!(a.device, b.device);
        assert!(a.passed(), "{a:?}");
    }
    let verify = source.vm.verify(Duration::from_secs(60)).unwrap();
    assert!(verify.passed(), "{verify:?}");
}

/// The negative control and its twin share this scenario: many device records and a guest
/// that barely writes (the devices' pages are what changes), and a first pass slowed so the
/// devices rewrite pages already sent.
fn migrate_while_devices_write(
    name: &str,
    device_dirty_tracking: bool,
) -> (
    Scenario,
    Machine,
    vmig_migration::Result<()>,
    vmig_migration::Result<vmig_migration::Arrived>,
    MigrationReport,
) {
    let scenario = Scenario::new(name, &[Migration::V1, Migration::V2]);
    let source = scenario.source(64 << 20, 200, 20000, DirtyLogMode::Bitmap);
    std::thread::sleep(Duration::from_millis(200));
    let params = MigrationParams {
        device_dirty_tracking,
        max_bandwidth: 64 << 20,
        ..MigrationParams::default()
    };
    let uri = Uri::Unix(scenario.dir.join("m.sock"));
    let (sent, arrived, progress) = run_migration(&scenario, &source, uri, params, None);
    let report = progress.report();
    (scenario, source, sent, arrived, report)
}

#[test]
fn verification_catches_the_pages_lost_without_device_dirty_tracking_and_the_source_goes_on() {
    require_kvm!();
    let (_scenario, source, sent, arrived, report) =
        migrate_while_devices_write("untracked", false);
    let err = sent.unwrap_err().to_string();
    assert!(err.contains("differ"), "{err}");
    let dest_err = arrived.unwrap_err().to_string();
    assert!(
        dest_err.contains("page(s) differ from the source's"),
        "{dest_err}"
    );
    assert_eq!(report.status, Status::Failed);
    assert!(!report.verified && !report.committed);
    assert_eq!(
        report.dirty_sources.len(),
        2,
        "only CPU and VMM tracking: {report:#?}"
    );
    assert_healthy(&source);
}

/// The negative control's positive twin: the same rates and bandwidth with the devices' dirty
/// tracking on verify, so the control fails because the devices' pages went untracked and for
/// no other reason. The pages the devices rewrote after the first pass sent them went again.
#[test]
fn with_device_dirty_tracking_the_same_device_writes_migrate_verified() {
    require_kvm!();
    let (_scenario, _source, sent, arrived, report) = migrate_while_devices_write("tracked", true);
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    arrived.unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(report.verified && report.committed, "{report:#?}");
    assert_every_source_reported(&report, "bitmap");
    assert_pages_were_sent_again(&report, 64 << 20);
}

/// What a proxy between source and destination does to the main connection's source-to-
/// destination bytes.
#[derive(Clone, Copy)]
enum Fault {
    /// Flips a bit of the byte at this offset.
    FlipAt(u64),
    /// Closes both connections at this offset (the destination died).
    CloseAt(u64),
}

/// Listens on `front`, forwards every connection to `back`, applying `fault` to the first.
fn proxy(front: PathBuf, back: PathBuf, fault: Fault) -> JoinHandle<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let listener = UnixListener::bind(&front).unwrap();
    std::thread::spawn(move || {
        let mut first = true;
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let Ok((client, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            client.set_nonblocking(false).unwrap();
            let Ok(server) = UnixStream::connect(&back) else {
                return;
            };
            let fault = first.then_some(fault);
            first = false;
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let (mut client, mut server) = (client, server);
            std::thread::spawn(move || {
                let mut offset = 0u64;
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let range = offset..offset + n as u64;
                    match fault {
                        Some(Fault::FlipAt(at)) if range.contains(&at) => {
                            buf[usize::try_from(at - offset).unwrap()] ^= 0x10;
                        }
                        Some(Fault::CloseAt(at)) if range.contains(&at) => {
                            let _ = client.shutdown(std::net::Shutdown::Both);
                            let _ = server.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        _ => {}
                    }
                    offset += n as u64;
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    })
}

/// Where the faults land: inside the first pass, which carries at least 8 bytes for each of
/// the guest's 16 384 pages (128 KiB), however few of them hold data (a zero page is its entry,
/// a stamped one its entry and 52 bytes), after a hello and a Config of a few KiB.
fn failed_migration_leaves_a_healthy_source(
    name: &str,
    fault: Fault,
    expect_source: &str,
    expect_dest: &str,
) {
    let scenario = Scenario::new(name, &[Migration::V1, Migration::V2]);
    let source = scenario.source(64 << 20, 5000, 2000, DirtyLogMode::Bitmap);
    std::thread::sleep(Duration::from_millis(200));
    let back = scenario.dir.join("dest.sock");
    let front = scenario.dir.join("proxy.sock");
    let incoming = scenario.incoming(&Uri::Unix(back.clone()), None);
    let _proxy = proxy(front.clone(), back, fault);
    let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
    let progress = Progress::default();
    let params = MigrationParams {
        uri: Uri::Unix(front).to_string(),
        ..MigrationParams::default()
    };
    let err = migrate(&source, &params, &progress)
        .unwrap_err()
        .to_string();
    assert!(err.contains(expect_source), "source: {err}");
    let dest_err = dest.join().unwrap().unwrap_err().to_string();
    assert!(dest_err.contains(expect_dest), "destination: {dest_err}");
    assert_eq!(progress.report().status, Status::Failed);
    assert_healthy(&source);
}

#[test]
fn a_corrupted_stream_is_refused_and_the_source_goes_on() {
    require_kvm!();
    failed_migration_leaves_a_healthy_source(
        "corrupt",
        Fault::FlipAt(64 << 10),
        "corrupted",
        "fails its checksum",
    );
}

#[test]
fn a_destination_that_dies_during_precopy_leaves_the_source_running() {
    require_kvm!();
    failed_migration_leaves_a_healthy_source(
        "dest-dies",
        Fault::CloseAt(96 << 10),
        // The proxy shut the socket down: the source's next write gets EPIPE (a page
        // sender's, or the main thread's when it ends the pass first).
        "Broken pipe",
        "truncated",
    );
}

#[test]
fn cancel_during_precopy_leaves_the_source_running_and_the_destination_discards() {
    require_kvm!();
    let scenario = Scenario::new("cancel", &[Migration::V1, Migration::V2]);
    let source = scenario.source(64 << 20, 5000, 2000, DirtyLogMode::Ring);
    let (dest, params) = scenario.start_destination(8 << 20);
    let progress = Progress::default();
    let canceller = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            wait_for_precopy(&progress);
            progress.cancel();
        })
    };
    let err = migrate(&source, &params, &progress)
        .unwrap_err()
        .to_string();
    canceller.join().unwrap();
    assert!(err.contains("migrate-cancel"), "{err}");
    assert_eq!(progress.report().status, Status::Cancelled);
    let dest_err = dest.join().unwrap().unwrap_err().to_string();
    assert!(dest_err.contains("abandoned"), "{dest_err}");
    assert_healthy(&source);
}

#[test]
fn a_device_server_that_dies_fails_the_migration_and_the_guest_goes_on() {
    require_kvm!();
    let mut scenario = Scenario::new("device-dies", &[Migration::V1, Migration::V2]);
    let source = scenario.source(64 << 20, 5000, 2000, DirtyLogMode::Bitmap);
    let (dest, params) = scenario.start_destination(16 << 20);
    let progress = Progress::default();
    let killed = scenario.source_servers.remove(1);
    let killer = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            wait_for_precopy(&progress);
            drop(killed);
        })
    };
    let err = migrate(&source, &params, &progress)
        .unwrap_err()
        .to_string();
    killer.join().unwrap();
    assert!(err.contains("src-1.sock"), "{err}");
    assert!(dest.join().unwrap().is_err());
    assert!(!source.vm.is_paused());
    assert!(!source.vm.dirty_log().is_tracking());
    let verify = source.vm.verify(Duration::from_secs(60)).unwrap();
    assert!(verify.passed(), "{verify:?}");
}

/// A dma-engine whose status page (BAR2) is gone: another device layout.
struct WithoutStatusPage(DmaEngine);

impl Device for WithoutStatusPage {
    fn spec(&self) -> vmig_vfio_user::server::DeviceSpec {
        let mut spec = self.0.spec();
        spec.regions[dma_engine::STATUS_REGION as usize] = Default::default();
        spec
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        self.0.region_read(index, offset, data)
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        self.0.region_write(index, offset, data)
    }
    fn reset(&mut self) -> Result<(), Refusal> {
        self.0.reset()
    }
    fn connect(&mut self, ctx: DeviceContext) {
        self.0.connect(ctx)
    }
    fn disconnect(&mut self) {
        self.0.disconnect()
    }
    fn migration(&self) -> MigrationSupport {
        self.0.migration()
    }
    fn set_running(&mut self, running: bool) -> Result<(), Refusal> {
        self.0.set_running(running)
    }
    fn save(&mut self, last: bool) -> Result<Vec<u8>, Refusal> {
        self.0.save(last)
    }
    fn load(&mut self, record: &[u8]) -> Result<(), Refusal> {
        self.0.load(record)
    }
}

#[test]
fn a_destination_device_with_another_bar_layout_is_refused_and_the_source_goes_on() {
    require_kvm!();
    let mut scenario = Scenario::new("layout", &[Migration::V2]);
    // The guest's driver polls the source device's status page; the destination's has none.
    scenario.dest_servers = vec![DeviceServer::serve(
        &scenario.dir,
        "dst-other.sock",
        WithoutStatusPage(DmaEngine::new(Migration::V2)),
    )];
    let source = scenario.source(64 << 20, 5000, 2000, DirtyLogMode::Bitmap);
    let (dest, params) = scenario.start_destination(0);
    let progress = Progress::default();
    let err = migrate(&source, &params, &progress)
        .unwrap_err()
        .to_string();
    let dest_err = dest.join().unwrap().unwrap_err().to_string();
    assert!(dest_err.contains("mapped areas"), "{dest_err}");
    assert!(err.contains("mapped areas"), "{err}");
    assert_healthy(&source);
}

/// The guest-physical address of the last page of RAM.
fn last_ram_page(vm: &Vm) -> u64 {
    let top = vm.layout().memory.data_slots().last().unwrap();
    top.gpa + top.size - vmig_kvm::PAGE_SIZE
}

/// A source without devices whose guest writes every page but the last MiB of RAM; `touch`
/// runs while it migrates, once the first pass is over, and gets the source's RAM.
fn migrate_without_devices(
    name: &str,
    touch: impl FnOnce(&vmig_kvm::GuestMemory, u64) + Send,
) -> (
    vmig_migration::Result<()>,
    vmig_migration::Result<vmig_migration::Arrived>,
    MigrationReport,
) {
    let scenario = Scenario::new(name, &[]);
    let mut config = vm_config(64 << 20, 0, 20000, DirtyLogMode::Bitmap);
    let wss = config.workload.wss.unwrap() - (1 << 20);
    config.workload.wss = Some(wss);
    let source = Machine::attach(Vm::new(&config).unwrap(), &[], Role::Source).unwrap();
    source.vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let untouched = last_ram_page(&source.vm);
    let params = MigrationParams {
        // Slow enough that the first pass takes about 2 s and more passes follow.
        max_bandwidth: 32 << 20,
        ..MigrationParams::default()
    };
    let uri = Uri::Unix(scenario.dir.join("m.sock"));
    let progress = Progress::default();
    let (sent, arrived) = std::thread::scope(|scope| {
        let (progress, memory) = (&progress, source.vm.memory());
        scope.spawn(move || {
            wait_until("the first pass", PATIENCE, || {
                (progress.report().passes >= 1)
                    .then_some(())
                    .ok_or_else(|| "no pass yet".to_string())
            });
            touch(memory, untouched);
        });
        let incoming = scenario.incoming(&uri, None);
        let uri = incoming.listener.uri().unwrap();
        let dest = scope.spawn(move || receive(incoming, &Progress::default()));
        let params = MigrationParams {
            uri: uri.to_string(),
            ..params
        };
        (migrate(&source, &params, progress), dest.join().unwrap())
    });
    (sent, arrived, progress.report())
}

/// Without devices only the vCPUs and the VMM write RAM, and their writes are reported: the
/// stop reads no page again (`verify_memory` compares the digests the pages were sent with),
/// and with the VM running on the destination the source reads every page again to audit
/// them. A page the VMM writes as it should (marking it) goes again and passes both.
#[test]
fn without_devices_the_stop_reads_no_page_and_every_page_is_audited_after_resuming() {
    require_kvm!();
    let (sent, arrived, report) = migrate_without_devices("audit", |memory, gpa| {
        memory
            .write(vmig_primitives::GuestAddress(gpa), b"marked as written")
            .unwrap();
    });
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    let arrived = arrived.unwrap();
    assert!(report.verified && report.committed, "{report:#?}");
    assert_eq!(report.timeline.digest_pages_read, 0, "{report:#?}");
    let v = report.verification.as_ref().unwrap();
    assert_eq!(v.pages_compared, (64 << 20) / 4096);
    assert_eq!(v.pages_audited, (64 << 20) / 4096);
    assert_eq!(v.pages_changed_unreported, 0);
    let mut page = [0u8; 17];
    let vm = &arrived.machine.vm;
    let gpa = vmig_primitives::GuestAddress(last_ram_page(vm));
    vm.memory().read(gpa, &mut page).unwrap();
    assert_eq!(&page, b"marked as written");
}

/// The negative control of the audit: a page changed behind every dirty source after it was
/// sent (written through the raw mapping, as a write KVM's log missed would be) passes the
/// comparison before resuming, which uses the digests the pages were sent with, and is caught
/// by the audit after it: the migration fails verification, naming the page.
#[test]
fn a_page_changed_behind_every_dirty_source_is_caught_by_the_audit_after_resuming() {
    require_kvm!();
    let changed = std::sync::Mutex::new(0u64);
    let (sent, arrived, report) = migrate_without_devices("unreported", |memory, gpa| {
        let slot = memory
            .slots()
            .iter()
            .find(|s| s.layout.gpa <= gpa && gpa < s.layout.gpa + s.layout.size)
            .unwrap();
        let offset = usize::try_from(gpa - slot.layout.gpa).unwrap();
        slot.host().write(offset, b"behind the dirty log").unwrap();
        *changed.lock().unwrap() = gpa / vmig_kvm::PAGE_SIZE;
    });
    let err = sent.unwrap_err().to_string();
    let page = *changed.lock().unwrap();
    assert!(
        err.contains(&format!(
            "1 page(s) changed here after they were last sent with no dirty source reporting it (first: {page:#x})"
        )),
        "{err}"
    );
    arrived.unwrap();
    assert!(report.committed && !report.verified, "{report:#?}");
    let v = report.verification.as_ref().unwrap();
    assert_eq!(
        v.pages_differing, 0,
        "the comparison before resuming cannot see it"
    );
    assert_eq!(v.pages_changed_unreported, 1);
}

#[test]
fn without_verify_memory_the_migration_completes_unverified_and_the_other_checks_run() {
    require_kvm!();
    let scenario = Scenario::new("no-verify", &[Migration::V2]);
    let source = scenario.source(64 << 20, 5000, 2000, DirtyLogMode::Bitmap);
    std::thread::sleep(Duration::from_millis(200));
    let params = MigrationParams {
        verify_memory: false,
        ..MigrationParams::default()
    };
    let uri = Uri::Unix(scenario.dir.join("m.sock"));
    let (sent, arrived, progress) = run_migration(&scenario, &source, uri, params, None);
    let report = progress.report();
    sent.unwrap_or_else(|e| panic!("source: {e}\n{report:#?}"));
    arrived.unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(!report.verified, "memory was not compared: {report:#?}");
    let v = report.verification.as_ref().unwrap();
    assert_eq!(v.pages_compared, 0);
    assert!(v.checks_held(), "{v:#?}");
    assert!(v.guest_pages_checked > 0 && v.device_records.iter().all(|r| r.checked > 0));
}

/// The first record a peer of `socket` reads back after sending `bytes`.
fn answer_to(socket: &std::path::Path, bytes: &[u8]) -> String {
    use std::io::Write;
    use vmig_migration::stream::{Record, RecordReader};
    let mut peer = std::os::unix::net::UnixStream::connect(socket).unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = peer.write_all(bytes);
    let mut reader = RecordReader::new(peer, "from the destination");
    let mut buf = Vec::new();
    match reader.receive(&mut buf) {
        Ok(Record::Abort(reason)) => reason.into_owned(),
        other => panic!("expected an Abort, got {other:?}"),
    }
}

#[test]
fn stray_peers_are_refused_and_the_prepared_destination_takes_the_next_migration() {
    require_kvm!();
    let scenario = Scenario::new("stray", &[]);
    let source = scenario.source(32 << 20, 2000, 0, DirtyLogMode::Bitmap);
    let socket = scenario.dir.join("m.sock");
    let incoming = Incoming {
        prepared_memory: Some(Vm::prepare_memory(32 << 20).unwrap()),
        ..scenario.incoming(&Uri::Unix(socket.clone()), None)
    };
    let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
    // A health check that speaks HTTP, a scanner that connects and leaves, a hello of another
    // stream version, a hello of a page connection where the main one belongs.
    let http = answer_to(&socket, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n......");
    assert!(
        http.starts_with("this destination refused the connection: ") && http.contains("magic"),
        "{http}"
    );
    drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    let mut other_version = vmig_migration::stream::Hello {
        channel: 0,
        channels: 1,
        session: 1,
    }
    .encode();
    other_version[8] = other_version[8].wrapping_add(1);
    let version = answer_to(&socket, &other_version);
    assert!(version.contains("this vmig speaks version"), "{version}");
    let page_channel = vmig_migration::stream::Hello {
        channel: 1,
        channels: 2,
        session: 1,
    }
    .encode();
    let channel = answer_to(&socket, &page_channel);
    assert!(channel.contains("expected the main channel 0"), "{channel}");
    // The real migration after them all.
    let progress = Progress::default();
    let params = MigrationParams {
        uri: Uri::Unix(socket).to_string(),
        ..MigrationParams::default()
    };
    migrate(&source, &params, &progress).unwrap_or_else(|e| panic!("{e}"));
    let arrived = dest.join().unwrap().unwrap();
    assert!(arrived.verification.passed(), "{:#?}", arrived.verification);
}

#[test]
fn a_config_record_with_a_value_the_command_line_refuses_is_refused() {
    require_kvm!();
    let scenario = Scenario::new("bad-config", &[]);
    let mut config = vm_config(32 << 20, 0, 1000, DirtyLogMode::Bitmap);
    config.workload.hot_percent = 200;
    // A whole, checksummed record: only its value is wrong.
    let (err, answer) = destination_refusal(&scenario, config, &[]);
    let expected = "the source's Config record is refused: workload option hot-percent=200: \
                    expected a percentage from 1 to 99";
    assert!(
        answer.as_deref().unwrap_or_default().contains(expected),
        "{answer:?}"
    );
    assert!(err.contains(expected), "{err}");
}

#[test]
fn a_page_digest_sent_twice_is_refused_so_no_range_can_stand_in_for_another() {
    use vmig_migration::stream::{Digests, Record};
    use vmig_primitives::PageNumber;
    use zerocopy::little_endian::U64;
    require_kvm!();
    let scenario = Scenario::new("twice", &[]);
    // Whole, checksummed records: the same four pages' digests twice, as a source that sent
    // one range twice and another never would.
    let digests = [U64::new(0); 4];
    let once = || {
        Record::Digests(Digests {
            first: PageNumber(0x10),
            digests: &digests,
        })
    };
    let vm = vm_config(32 << 20, 0, 1000, DirtyLogMode::Bitmap);
    let (err, _) = destination_refusal(
        &scenario,
        vm,
        &[Record::VcpuState(Vec::new()), once(), once()],
    );
    assert!(
        err.contains("a second digest for page 0x10: each page's digest is sent once"),
        "{err}"
    );
}

/// A source's stream, record by record, to a destination: a hello and a Config of `vm` without
/// devices, then `records`. Returns the destination's error and the Abort it answered with.
fn destination_refusal(
    scenario: &Scenario,
    vm: VmConfig,
    records: &[vmig_migration::stream::Record<'_>],
) -> (String, Option<String>) {
    use vmig_migration::stream::{Hello, MigrationConfig, Record, RecordReader, RecordWriter};
    let socket = scenario.dir.join("m.sock");
    let incoming = scenario.incoming(&Uri::Unix(socket.clone()), None);
    let dest = std::thread::spawn(move || receive(incoming, &Progress::default()));
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(
        &mut stream,
        &Hello {
            channel: 0,
            channels: 1,
            session: 11,
        }
        .encode(),
    )
    .unwrap();
    let mut writer = RecordWriter::new(stream.try_clone().unwrap());
    writer
        .send(&Record::Config(Box::new(MigrationConfig {
            vm,
            devices: Vec::new(),
            verify_memory: false,
        })))
        .unwrap();
    for record in records {
        // A destination that refused already may have closed: it says why below.
        let _ = writer.send(record);
    }
    let err = dest.join().unwrap().unwrap_err().to_string();
    let mut reader = RecordReader::new(stream, "from the destination");
    let mut buf = Vec::new();
    let answer = loop {
        match reader.receive(&mut buf) {
            Ok(Record::Abort(reason)) => break Some(reason.into_owned()),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    (err, answer)
}

/// The stream's rule for pages sent from guest memory as the guest runs (`Kind::Pages`): a
/// page whose bytes arrive different from the digest sent with them is held as torn, and the
/// migration is refused at its end if the page never came again intact, `verify_memory` or
/// not; sent again intact, it is taken.
#[test]
fn a_page_that_arrives_unlike_its_digest_is_refused_unless_it_comes_again_intact() {
    use vmig_migration::stream::{PageEntry, Pages, Record, page_digest};
    use vmig_primitives::PageNumber;
    use zerocopy::little_endian::U64;
    require_kvm!();
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
    let entries = [PageEntry::new(PageNumber(0x10), false)];
    let (intact, torn) = (
        [U64::new(page_digest(&page))],
        [U64::new(!page_digest(&page))],
    );
    let pages = |pass, digests| {
        Record::Pages(Pages {
            pass,
            entries: &entries,
            digests,
            data: &page,
            sparse: &[],
        })
    };
    let refusal = "1 page(s) arrived different from the digest sent with them and never came again";

    let vm = || vm_config(32 << 20, 0, 1000, DirtyLogMode::Bitmap);
    let scenario = Scenario::new("torn", &[]);
    let (err, _) = destination_refusal(
        &scenario,
        vm(),
        &[
            pages(0, &torn),
            Record::VcpuState(Vec::new()),
            Record::Complete,
        ],
    );
    assert!(err.contains(refusal) && err.contains("0x10"), "{err}");

    // Sent again intact in the next pass, the page is taken: the stream gets past the pages
    // (and this one then stops at its missing vCPUs).
    let scenario = Scenario::new("torn-again", &[]);
    let (err, _) = destination_refusal(
        &scenario,
        vm(),
        &[
            pages(0, &torn),
            Record::PassEnd { pass: 0 },
            pages(1, &intact),
            Record::VcpuState(Vec::new()),
            Record::Complete,
        ],
    );
    assert!(!err.contains(refusal), "{err}");
    assert!(err.contains("vCPU"), "{err}");
}
