//! The first real device vmig migrates: two of the kernel's `mtty` sample mdevs (virtual 16550
//! UARTs, migrated by the kernel through the VFIO v2 uAPI with `STOP_COPY`, `P2P` and
//! `PRE_COPY`), moved between two `vmig` processes inside the emulated guest of
//! `vmig_kernel_guest` (Debian's Linux 6.12 under QEMU's TCG, KVM on emulated AMD-V, four mtty
//! mdevs created by its init: two for each side).
//!
//! In the guest, one source VM (`vmig run --device vfio-mdev,uuid=A --device
//! vfio-mdev,uuid=B --api`) meets four destinations (`vmig run --incoming ... --device
//! vfio-mdev,uuid=C --device vfio-mdev,uuid=D --api`) in turn:
//! 1. `migrate_cancel` during pre-copy: the source runs on, both mttys in `RUNNING`
//!    (`x-vmig-query-devices`) with their UARTs looping bytes back;
//! 2. a relay between the two that damages the first byte of mtty A's state (and mends the
//!    stream's checksums and digest, so only the kernel can tell): the destination's mtty
//!    refuses it when it loads, the migration fails naming that device and why, the source
//!    runs on with both UARTs working;
//! 3. a relay that drops mtty A's stop-copy state (mending count and digest): the destination's
//!    mtty fails RESUMING → STOP, the destination names it and resets it (it is RUNNING when
//!    opened afterwards), and the source runs on;
//! 4. a migration that completes: before it the guest writes a known sequence into each UART
//!    (real `out` instructions, routed from the VM's port exits to the mdev's I/O BAR), after
//!    it the guest on the destination reads back exactly those bytes and the same line status
//!    from mttys C and D, whose FIFOs were empty: only the migrated device state can have
//!    put them there.
//!
//! The same VM is migrated without devices before and after, for the downtime ratio. Skips, saying why,
//! where Debian's packages or QEMU cannot be had; fails on anything else.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmig_kernel_guest::{MTTY_DEVICES, report_line};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/guest_test.rs"]
mod guest_test;
use cli::{KillOnDrop, vmig};

/// The in-guest test this file's host test runs.
const IN_GUEST_TEST: &str = "in_guest_two_mttys_migrate_between_two_vmig_processes";
/// The report lines the in-guest test leaves for the host.
const REPORT: &str = "VMIG-MTTY ";

#[test]
#[cfg_attr(vmig_in_guest, ignore = "boots the guest: runs on the host")]
fn two_mtty_mdevs_migrate_through_the_real_kernel_in_an_emulated_guest() {
    let Some(run) = guest_test::run_in_guest(
        "kernel_mdev_migration",
        IN_GUEST_TEST,
        1024,
        Duration::from_secs(900),
        "vmig-mtty: ",
    ) else {
        return;
    };
    for line in run.report_lines(REPORT) {
        println!("  measured: {line}");
    }
}

// ---- in the guest ----

/// A `vmig` process, killed if the test fails before it ends.
struct Vmig {
    child: Option<Child>,
    api: PathBuf,
    name: &'static str,
}

impl Vmig {
    /// `vmig run ARGS --api API`, once its API answers.
    fn start(name: &'static str, args: &[&str]) -> Self {
        let api = PathBuf::from(format!("/tmp/{name}.api"));
        let _ = std::fs::remove_file(&api);
        let log = std::fs::File::create(format!("/tmp/{name}.log")).unwrap();
        let child = vmig()
            .arg("run")
            .args(args)
            .arg("--api")
            .arg(&api)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut vmig = Self {
            child: Some(child),
            api,
            name,
        };
        let end = Instant::now() + Duration::from_secs(120);
        while !vmig.api.exists() {
            if let Some(status) = vmig.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vmig {name} exited ({status}):\n{}", vmig.log());
            }
            assert!(Instant::now() < end, "vmig {name} never opened its API");
            std::thread::sleep(Duration::from_millis(50));
        }
        vmig
    }

    fn log(&self) -> String {
        std::fs::read_to_string(format!("/tmp/{}.log", self.name)).unwrap_or_default()
    }

    /// One QMP command through `vmig ctl`: whether it succeeded, and the reply.
    fn ctl(&self, args: &[&str]) -> (bool, Value) {
        cli::ctl(&self.api, args)
    }

    /// The `return` of a command that must succeed.
    fn ok(&self, args: &[&str]) -> Value {
        let (ok, reply) = self.ctl(args);
        assert!(ok, "{} {args:?}: {reply}\n{}", self.name, self.log());
        reply["return"].clone()
    }

    fn status(&self) -> String {
        self.ok(&["query-status"])["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Each device's v2 migration state.
    fn device_states(&self) -> Vec<String> {
        let devices = self.ok(&["x-vmig-query-devices"]);
        devices
            .as_array()
            .unwrap_or_else(|| panic!("x-vmig-query-devices: {devices}"))
            .iter()
            .map(|d| d["migration-state"].as_str().unwrap_or("none").to_owned())
            .collect()
    }

    /// Waits until `query-migrate`'s `x-vmig-phase` is one of `phases`, and returns it.
    fn wait_migration(&self, phases: &[&str], timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let info = self.ok(&["query-migrate"]);
            if phases.contains(&info["x-vmig-phase"].as_str().unwrap_or_default()) {
                return info;
            }
            assert!(
                Instant::now() < end,
                "{}: the migration never reached {phases:?}: {info}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends the process with `quit` and returns its output and whether it exited 0.
    fn quit(mut self) -> (bool, String) {
        let _ = self.ctl(&["quit"]);
        self.wait()
    }

    /// Waits for the process to end by itself.
    fn wait(&mut self) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!("vmig {} did not end:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.success(), self.log())
    }
}

impl Drop for Vmig {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The 16550 registers of mtty's I/O BAR0 (offsets).
const THR_RBR: u16 = 0;
const LSR: u16 = 5;
/// LSR: data ready (the receive FIFO holds a byte).
const LSR_DATA_READY: u8 = 0x01;

/// Runs `ops` (`out:PORT:BYTE` / `in:PORT`) on the guest's vCPU 0; what the `in`s read.
fn guest_ports(vm: &Vmig, ops: &[String]) -> Vec<u8> {
    let reply = vm.ok(&["x-vmig-guest-port-io", &format!("ops={}", ops.join(","))]);
    reply["read"]
        .as_array()
        .unwrap_or_else(|| panic!("x-vmig-guest-port-io: {reply}"))
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

/// The guest port of register `register` of device `device`'s BAR0.
fn uart_port(vm: &Vmig, device: usize, register: u16) -> u16 {
    let devices = vm.ok(&["x-vmig-query-devices"]);
    let bar = &devices[device]["bars"][0];
    assert_eq!(bar["space"], "io", "mtty's BAR0 is I/O space: {devices}");
    u16::try_from(bar["gpa"].as_u64().unwrap()).unwrap() + register
}

/// The guest writes `bytes` into device `device`'s UART and reads its line status.
fn uart_write(vm: &Vmig, device: usize, bytes: &[u8]) -> u8 {
    let thr = uart_port(vm, device, THR_RBR);
    let lsr = uart_port(vm, device, LSR);
    let mut ops: Vec<String> = bytes.iter().map(|b| format!("out:{thr}:{b}")).collect();
    ops.push(format!("in:{lsr}"));
    guest_ports(vm, &ops)[0]
}

/// The guest reads device `device`'s line status, then `count` bytes from its receive FIFO,
/// then the line status again.
fn uart_read(vm: &Vmig, device: usize, count: usize) -> (u8, Vec<u8>, u8) {
    let rbr = uart_port(vm, device, THR_RBR);
    let lsr = uart_port(vm, device, LSR);
    let mut ops = vec![format!("in:{lsr}")];
    ops.extend((0..count).map(|_| format!("in:{rbr}")));
    ops.push(format!("in:{lsr}"));
    let got = guest_ports(vm, &ops);
    (got[0], got[1..=count].to_vec(), got[count + 1])
}

/// A UART that loops back: what is written is read back, and the FIFO is empty after.
fn assert_uart_loops_back(vm: &Vmig, device: usize, bytes: &[u8]) {
    let lsr = uart_write(vm, device, bytes);
    assert_ne!(lsr & LSR_DATA_READY, 0, "LSR {lsr:#x} after writing");
    let (before, read, after) = uart_read(vm, device, bytes.len());
    assert_eq!(before, lsr);
    assert_eq!(read, bytes, "device {device} looped back other bytes");
    assert_eq!(after & LSR_DATA_READY, 0, "LSR {after:#x}: bytes left over");
}

/// After a migration that did not complete: the source's VM runs, both of its mttys are
/// RUNNING, and both UARTs loop `bytes` back.
fn assert_source_runs_on(source: &Vmig, bytes: &[u8]) {
    assert_eq!(source.status(), "running");
    assert_eq!(source.device_states(), ["RUNNING", "RUNNING"]);
    for device in 0..2 {
        assert_uart_loops_back(source, device, bytes);
    }
}

/// How [`damaging_relay`] damages device 0's state.
#[derive(Clone, Copy)]
enum Damage {
    /// Its first byte flipped (mtty's header check refuses the write).
    FlipFirstByte,
    /// Every chunk after the first (its pre-copy state) dropped: the device gets too little,
    /// and mtty refuses to load it (RESUMING → STOP fails).
    DropAfterFirstChunk,
}

/// `vmig relay` to the destination's `port` holding the destination's `SwitchoverAck`, so
/// that the source stays in pre-copy; the relay (killed when dropped) and its port.
fn ack_holding_relay(port: u16) -> (KillOnDrop, u16) {
    let mut child = vmig()
        .args([
            "relay",
            "tcp:127.0.0.1:0",
            &format!("tcp:127.0.0.1:{port}"),
            "--fault",
            "stall:SwitchoverAck",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first).unwrap();
    // Its later lines (the fault's) must find a reader.
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    // "relaying tcp:127.0.0.1:PORT -> TARGET"
    let listening = first
        .strip_prefix("relaying tcp:127.0.0.1:")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(port, _)| port.parse().ok())
        .unwrap_or_else(|| panic!("the relay's first line: {first:?}"));
    (KillOnDrop(child), listening)
}

/// A relay from the source to the destination that damages device 0's state as `damage`
/// says and mends what would give it away before the device sees it: every record's checksum
/// (it re-frames them) and the device's byte count and state digest in `DeviceEnd`. What comes
/// back from the destination passes as it is. Serves one connection; returns its port.
fn damaging_relay(to: u16, damage: Damage) -> u16 {
    use vmig_migration::stream::{
        DeviceData, DeviceEnd, HELLO_SIZE, Record, RecordReader, RecordWriter, StateDigest,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut source, _) = listener.accept().unwrap();
        let mut dest = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let mut hello = [0u8; HELLO_SIZE];
        source.read_exact(&mut hello).unwrap();
        dest.write_all(&hello).unwrap();
        let (mut back_from, mut back_to) = (dest.try_clone().unwrap(), source.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(std::net::Shutdown::Both);
        });
        let mut reader = RecordReader::new(source, "relay");
        let mut writer = RecordWriter::new(dest.try_clone().unwrap());
        let (mut damaged, mut chunk, mut digest) = (false, Vec::new(), StateDigest::default());
        let mut chunks = 0;
        let mut buf = Vec::new();
        while let Ok(record) = reader.receive(&mut buf) {
            let sent = match record {
                Record::DeviceData(DeviceData { device: 0, .. })
                    if matches!(damage, Damage::DropAfterFirstChunk) && chunks > 0 =>
                {
                    Ok(())
                }
                Record::DeviceData(DeviceData {
                    device: 0,
                    more,
                    data,
                }) => {
                    let mut data = data.to_vec();
                    if matches!(damage, Damage::FlipFirstByte) && !damaged && !data.is_empty() {
                        data[0] ^= 0xff;
                        damaged = true;
                    }
                    chunk.extend_from_slice(&data);
                    if !more {
                        digest.add(&std::mem::take(&mut chunk));
                        chunks += 1;
                    }
                    writer.send(&Record::DeviceData(DeviceData {
                        device: 0,
                        more,
                        data: &data,
                    }))
                }
                Record::DeviceEnd(end @ DeviceEnd { device: 0, .. }) => {
                    writer.send(&Record::DeviceEnd(DeviceEnd {
                        bytes: digest.bytes(),
                        digest: digest.digest(),
                        ..end
                    }))
                }
                record => writer.send(&record),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = dest.shutdown(std::net::Shutdown::Both);
    });
    port
}

/// Milliseconds as a float, for a ratio.
fn millis(ms: u64) -> f64 {
    f64::from(u32::try_from(ms).unwrap_or(u32::MAX))
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// RAM of every VM: small, as everything in the guest runs on one emulated CPU (vmig copies
/// about 1.5 MB/s there while its VM's vCPU competes for the CPU).
const MEM: &str = "16M";

/// The source VM's arguments, with `devices`: a guest that writes 10 pages a second, so that
/// pre-copy converges at the emulated CPU's pace.
fn vm_args(devices: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["--mem", MEM, "--workload", "random,rate=10"]
        .map(String::from)
        .to_vec();
    for uuid in devices {
        args.push("--device".into());
        args.push(format!("vfio-mdev,uuid={uuid}"));
    }
    args
}

/// A destination for `devices`, listening on a free port: it and the port.
fn destination(name: &'static str, devices: &[String]) -> (Vmig, u16) {
    let port = free_port();
    let mut args = vec![
        "--incoming".to_string(),
        format!("tcp:127.0.0.1:{port}"),
        "--mem".into(),
        MEM.into(),
    ];
    for uuid in devices {
        args.push("--device".into());
        args.push(format!("vfio-mdev,uuid={uuid}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmig = Vmig::start(name, &args);
    // Its QMP socket answers before it listens for the migration.
    let end = Instant::now() + Duration::from_secs(60);
    while !vmig.log().contains("waiting for a migration on") {
        assert!(
            Instant::now() < end,
            "{name} never listened:\n{}",
            vmig.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (vmig, port)
}

/// Waits until `vm`'s VM runs (a destination's, a moment after the migration completed).
fn wait_running(vm: &Vmig) {
    let end = Instant::now() + Duration::from_secs(60);
    while vm.status() != "running" {
        assert!(Instant::now() < end, "{} never ran:\n{}", vm.name, vm.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates the VM without devices between two fresh processes; its downtime.
fn migrate_without_devices() -> u64 {
    let plain = vm_args(&[]);
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    let source = Vmig::start("plain-src", &plain);
    let (dest, port) = destination("plain-dst", &[]);
    let info = migrate(&source, port);
    assert_eq!(info["x-vmig-phase"], "completed", "{info}");
    let downtime = info["downtime"].as_u64().unwrap();
    println!(
        "vmig-mtty: without devices: downtime {downtime} ms, total {} ms",
        info["total-time"]
    );
    drop((source.quit(), dest.quit()));
    downtime
}

/// Migrates `source` to `port` and waits for the end; the final `query-migrate`.
fn migrate(source: &Vmig, port: u16) -> Value {
    source.ok(&["migrate", &format!("uri=tcp:127.0.0.1:{port}")]);
    source.wait_migration(
        &["completed", "failed", "cancelled"],
        Duration::from_secs(300),
    )
}

#[test]
#[cfg_attr(
    not(vmig_in_guest),
    ignore = "runs only in the kernel-VFIO guest, which the test above boots"
)]
#[allow(clippy::too_many_lines)]
fn in_guest_two_mttys_migrate_between_two_vmig_processes() {
    assert!(
        vmig_kernel_guest::in_guest(),
        "runs only inside the kernel-VFIO test guest (the test above boots it)"
    );
    let uuids = vmig_kernel_guest::mtty_uuids();
    assert_eq!(uuids.len(), MTTY_DEVICES, "{uuids:?}");
    let (ours, theirs) = uuids.split_at(2);

    // `vmig device probe --vfio-mdev` describes one.
    let probe = vmig()
        .args(["device", "probe", "--vfio-mdev", &ours[0]])
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "{described}");
    assert!(
        described.contains("4348:3253") && described.contains("PRE_COPY"),
        "{described}"
    );
    println!("vmig-mtty: vmig device probe --vfio-mdev {}:", ours[0]);
    for line in described.lines() {
        println!("vmig-mtty:   {line}");
    }

    // The same VM without devices, before and after, for the downtime ratio.
    let mut plain_downtimes = vec![migrate_without_devices()];

    let args = vm_args(ours);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let source = Vmig::start("src", &args);
    assert_eq!(source.device_states(), ["RUNNING", "RUNNING"]);
    // An mdev another process holds: one line naming it and saying why.
    let busy = vmig()
        .args(["device", "probe", "--vfio-mdev", &ours[0]])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&busy.stderr);
    assert!(
        !busy.status.success()
            && why.trim().lines().count() == 1
            && why.contains(&ours[0])
            && why.contains("already open"),
        "{why}"
    );
    println!("vmig-mtty: probing an mdev in use: {}", why.trim());
    for device in 0..2 {
        assert_uart_loops_back(&source, device, b"hello");
    }
    println!("vmig-mtty: both UARTs loop back through the VM's port exits");

    // 1. Cancel during pre-copy: a relay that holds the destination's SwitchoverAck keeps it
    //    there (a bandwidth cap does not: 16 MiB of nearly all zero pages take no time).
    let (dest, port) = destination("cancel-dst", theirs);
    let (_relay, relay_port) = ack_holding_relay(port);
    source.ok(&["migrate", &format!("uri=tcp:127.0.0.1:{relay_port}")]);
    let info = source.wait_migration(&["active"], Duration::from_secs(60));
    assert_eq!(info["status"], "active", "{info}");
    std::thread::sleep(Duration::from_millis(500));
    // In pre-copy, so that RUNNING after the cancel is the rollback's doing.
    assert_eq!(source.device_states(), ["PRE_COPY", "PRE_COPY"]);
    source.ok(&["migrate_cancel"]);
    let info = source.wait_migration(&["cancelled"], Duration::from_secs(60));
    assert_source_runs_on(&source, b"after cancel");
    let mut dest = dest;
    let (dest_ok, dest_log) = dest.wait();
    assert!(
        !dest_ok,
        "the destination discards a cancelled migration:\n{dest_log}"
    );
    println!(
        "vmig-mtty: migrate_cancel during pre-copy ({} bytes of RAM sent): the source runs, both mttys RUNNING, their UARTs loop back",
        info["ram"]["transferred"]
    );

    // 2. Damaged device state: the destination's mtty refuses it.
    let (dest, port) = destination("damaged-dst", theirs);
    let relay = damaging_relay(port, Damage::FlipFirstByte);
    let info = migrate(&source, relay);
    assert_eq!(info["x-vmig-phase"], "failed", "{info}");
    let error = info["error-desc"].as_str().unwrap_or_default().to_owned();
    // mtty checks the header as it is written: "if (migf->data.magic != MTTY_MAGIC || ...)
    // ret = -EFAULT;" (samples/vfio-mdev/mtty.c, mtty_resume_write).
    assert!(
        error.contains("the destination refused")
            && error.contains(&format!("device {}", theirs[0]))
            && error.contains("writing device state")
            && error.contains("Bad address"),
        "the refusal names the device and why: {error}"
    );
    assert_source_runs_on(&source, b"after refusal");
    let mut dest = dest;
    let (dest_ok, dest_log) = dest.wait();
    assert!(
        !dest_ok && dest_log.contains(&format!("device {}", theirs[0])),
        "the destination fails naming its device:\n{dest_log}"
    );
    println!("vmig-mtty: damaged state refused: {error}");
    println!("vmig-mtty: the source runs on, both mttys RUNNING, their UARTs loop back");

    // 3. Too little state: the destination's mtty fails RESUMING → STOP; the destination
    //    names it, resets it (mtty keeps its migration state across closes, so a direct open
    //    afterwards sees what the reset left), and the source runs on.
    let (dest, port) = destination("short-dst", theirs);
    let relay = damaging_relay(port, Damage::DropAfterFirstChunk);
    let info = migrate(&source, relay);
    assert_eq!(info["x-vmig-phase"], "failed", "{info}");
    let error = info["error-desc"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains(&format!("device {}", theirs[0]))
            && error.contains("MIG_DEVICE_STATE to Stop")
            && error.contains("Invalid argument"),
        "the failed state change names the device: {error}"
    );
    let mut dest = dest;
    let (dest_ok, dest_log) = dest.wait();
    assert!(!dest_ok, "{dest_log}");
    let container = vmig_vfio::Container::open(None).unwrap();
    let refused = container.open_mdev(&theirs[0]).unwrap();
    assert_eq!(
        refused.migration_state().unwrap(),
        vmig_vfio::MigState::Running,
        "the destination reset the device whose state change failed"
    );
    drop((refused, container));
    assert_source_runs_on(&source, b"after a short");
    println!("vmig-mtty: too little state: {error}");
    println!(
        "vmig-mtty: the destination reset mtty {} (RUNNING after); the source runs on",
        theirs[0]
    );

    // 4. The migration that completes, with a known sequence in each UART's FIFO.
    let sequences: [&[u8]; 2] = [b"vmig:mtty-0", b"VMIG:MTTY-1!"];
    let mut line_status = Vec::new();
    for (device, bytes) in sequences.iter().enumerate() {
        line_status.push(uart_write(&source, device, bytes));
    }
    let (dest, port) = destination("dst", theirs);
    let info = migrate(&source, port);
    assert_eq!(info["x-vmig-phase"], "completed", "{info}");
    assert_eq!(info["x-vmig-verified"], true, "{info}");
    let downtime = info["downtime"].as_u64().unwrap();
    let devices = info["x-vmig-devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2);
    for d in &devices {
        // "in PRE_COPY, VFIO_MIG_GET_PRECOPY_INFO says initial_bytes 24" (kernel-mtty-observed)
        assert_eq!(d["precopy_bytes"], 24, "{d}");
        assert_eq!(d["precopy_pending"]["initial_bytes"], 0, "{d}");
        assert!(d["stopcopy_bytes"].as_u64().unwrap() > 0, "{d}");
    }
    // "expect the real kernel to report no page dirty for a container holding only mdev
    // groups" (the issue): mtty pins nothing, so its container's tracking reports nothing,
    // and the engine sends no RAM for it.
    let sources = info["x-vmig-dirty-sources"].as_array().unwrap();
    let mdev_sources: Vec<&Value> = sources
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("device ")))
        .collect();
    assert_eq!(mdev_sources.len(), 2, "{sources:?}");
    assert!(mdev_sources.iter().all(|s| s["pages"] == 0), "{sources:?}");
    let acked = info["x-vmig-switchover-ack-ms"].as_u64().unwrap();
    assert!(
        acked <= info["total-time"].as_u64().unwrap() - downtime,
        "the switchover came after the destination's ack: {info}"
    );
    wait_running(&dest);
    assert_eq!(dest.device_states(), ["RUNNING", "RUNNING"]);
    for (device, bytes) in sequences.iter().enumerate() {
        let (before, read, after) = uart_read(&dest, device, bytes.len());
        assert_eq!(
            (before, read.as_slice()),
            (line_status[device], *bytes),
            "mtty {device} on the destination has another line status or other bytes"
        );
        assert_eq!(after & LSR_DATA_READY, 0);
        println!(
            "vmig-mtty: the destination's guest read back {:?} and LSR {before:#04x} from mtty {}",
            String::from_utf8_lossy(&read),
            theirs[device]
        );
    }
    drop(source.quit());
    let (dest_ok, dest_log) = dest.quit();
    assert!(dest_ok, "{dest_log}");

    plain_downtimes.push(migrate_without_devices());
    let plain_downtime = plain_downtimes.iter().sum::<u64>() / 2;
    println!(
        "vmig-mtty: migrated: downtime {downtime} ms ({:.2}x the same VM without devices: {plain_downtimes:?} ms before and after), total {} ms, switchover-ack at {acked} ms",
        millis(downtime) / millis(plain_downtime.max(1)),
        info["total-time"]
    );
    report_line(&format!(
        "{REPORT}{}",
        serde_json::json!({
            "downtime_ms": downtime,
            "downtime_without_devices_ms": plain_downtimes,
            "devices": devices,
        })
    ));
}
