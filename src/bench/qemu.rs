//! The same scenarios migrated by QEMU (`qemu-system-x86_64 -accel kvm`, loopback TCP) on this
//! machine in the same run, for comparison: each QEMU [`discover`] finds (the one on `PATH`,
//! and the newest release's rig under the target directory) or the user names.
//!
//! QEMU boots a 512-byte guest from an IDE disk image (SeaBIOS loads it at 0x7c00). Not a
//! floppy: on some nested hosts SeaBIOS's floppy driver waits for an interrupt that never comes.
//! `snapshot=on` lets the source and the destination open the same image. The guest switches
//! to 32-bit protected mode, writes one word into every page from 1 MiB up to the end of RAM
//! (every page holds data, as in vmig's scenarios), reports `R` on the debug console (port
//! 0xe9), and then either idles or writes one word into random pages of a working set: at a
//! pace counted in TSC cycles (the host's TSC rate, which KVM gives the guest), or flat out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use serde_json::{Value, json};

use crate::children::{Children, free_port};
use crate::qmp::QmpClient;

/// The QEMU binary looked for on `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";

/// Where the tests' rig of QEMU's newest release (Debian sid's, `vmig_kernel_guest::newest_qemu`)
/// leaves its launcher, under the target directory this binary was built in.
const NEWEST_QEMU_LAUNCHER: &str = "qemu-sid/qemu-system-x86_64";

/// Where SeaBIOS loads the boot sector.
const LOAD_ADDRESS: u32 = 0x7c00;
/// Offsets in the boot sector: the GDT, its descriptor, and the 32-bit code.
const GDT_OFFSET_U32: u32 = 0x40;
const GDT_OFFSET: usize = GDT_OFFSET_U32 as usize;
const GDT_DESCRIPTOR_OFFSET: usize = 0x58;
const CODE32_OFFSET_U32: u32 = 0x80;
const CODE32_OFFSET: usize = CODE32_OFFSET_U32 as usize;
/// The guest's debug console port, and the byte it sends once every page holds data.
const CONSOLE_PORT: u8 = 0xe9;
const READY: u8 = b'R';
/// First byte of RAM the guest writes (below it: the BIOS, the boot sector, the stack).
const FIRST_WRITTEN: u32 = 1 << 20;
/// The guest addresses RAM without paging, so RAM must end below the PCI hole.
pub const MAX_RAM: u64 = 3 << 30;

/// What the guest does after writing every page.
#[derive(Clone, Copy, Debug)]
pub enum Writes {
    /// Nothing more.
    Idle,
    /// One random page of the working set every `tsc_cycles_per_write`.
    Paced {
        /// Working-set start and length in bytes.
        ws: (u32, u32),
        /// TSC cycles between two writes.
        tsc_cycles_per_write: u32,
        /// Every `.0`-th write goes to one of the first `.1` pages (a power of two) instead, as
        /// a device's DMA into its few ring buffers would.
        device_like: Option<(u32, u32)>,
    },
    /// Random pages of the working set as fast as it can.
    FlatOut {
        /// Working-set start and length in bytes.
        ws: (u32, u32),
    },
}

/// A QEMU migration to measure.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// The guest's writes.
    pub writes: Writes,
    /// Bytes per second; `None` lifts QEMU's default limit.
    pub max_bandwidth: Option<u64>,
    /// The downtime limit, as vmig's.
    pub downtime_ms: u64,
    /// Dirtying time before the migration starts.
    pub warm_up: Duration,
    /// Streams carrying pages: over 1, QEMU's multifd with that many channels, as vmig's
    /// `--connections`.
    pub channels: u16,
}

/// QEMU's `query-migrate` figures once completed.
#[derive(Clone, Debug, Default)]
pub struct QemuReport {
    /// `total-time`.
    pub total_ms: u64,
    /// `downtime`.
    pub downtime_ms: u64,
    /// `setup-time`.
    pub setup_ms: u64,
    /// `ram.dirty-sync-count`: bitmap syncs, one per pass.
    pub passes: u64,
    /// `ram.transferred`.
    pub transferred: u64,
    /// `cpu-throttle-percentage` last seen.
    pub throttle_percent: u64,
    /// `ram.dirty-pages-rate` last seen.
    pub dirty_pages_rate: u64,
}

/// One QEMU to compare with: its program and its release.
#[derive(Clone, Debug)]
pub struct Qemu {
    /// `qemu-system-x86_64` or a launcher of one.
    pub program: PathBuf,
    /// `7.2.19`, `11.1.3`: from `--version`.
    pub version: String,
}

impl Qemu {
    /// The QEMU `program` is, by its `--version`.
    pub fn probe(program: &Path) -> Result<Self, String> {
        let out = Command::new(program)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let banner = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{} --version failed: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = banner
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("QEMU emulator version "))
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| {
                format!(
                    "{} --version printed no \"QEMU emulator version\": {}",
                    program.display(),
                    banner.trim()
                )
            })?;
        Ok(Self {
            program: program.to_owned(),
            version: version.to_owned(),
        })
    }

    /// How the bench's lines name it.
    pub fn label(&self) -> String {
        format!("qemu {}", self.version)
    }
}

/// The QEMUs to compare with when none is named: `qemu-system-x86_64` on `PATH` and the newest
/// release's rig next to this build, each when it runs; and why each absent one is absent.
pub fn discover() -> (Vec<Qemu>, Vec<String>) {
    let mut found = Vec::new();
    let mut absent = Vec::new();
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(QEMU))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| format!("no {QEMU} on PATH (Debian's: apt-get install qemu-system-x86)"))
        .and_then(|p| Qemu::probe(&p));
    match on_path {
        Ok(q) => found.push(q),
        Err(why) => absent.push(why),
    }
    let rig = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .map(|dir| dir.join(NEWEST_QEMU_LAUNCHER))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "QEMU's newest release is not prepared next to this build \
             (cargo test --test qemu_vfio_user prepares it under target/qemu-sid/)"
                .to_owned()
        })
        .and_then(|p| Qemu::probe(&p));
    match rig {
        Ok(q) if !found.iter().any(|f| f.version == q.version) => found.push(q),
        Ok(_) => {}
        Err(why) => absent.push(why),
    }
    (found, absent)
}

/// The 512-byte boot sector of the guest.
pub fn boot_sector(ram: u64, writes: Writes) -> Result<Vec<u8>, String> {
    if !(2 * u64::from(FIRST_WRITTEN)..=MAX_RAM).contains(&ram) {
        return Err(format!(
            "the QEMU guest needs 2 MiB to {} MiB of RAM, not {} MiB",
            MAX_RAM >> 20,
            ram >> 20
        ));
    }
    let asm_error = |e: IcedError| format!("assembling the QEMU guest: {e}");
    let mut sector = real_mode_stub().map_err(asm_error)?;
    if sector.len() > GDT_OFFSET {
        return Err(format!(
            "the QEMU guest's real-mode stub is {} bytes, past its GDT at {GDT_OFFSET:#x}",
            sector.len()
        ));
    }
    sector.resize(GDT_OFFSET, 0);
    // Null, flat 4 GiB code (0x08), flat 4 GiB data (0x10).
    for descriptor in [0u64, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff] {
        sector.extend_from_slice(&descriptor.to_le_bytes());
    }
    sector.extend_from_slice(&23u16.to_le_bytes());
    sector.extend_from_slice(&(LOAD_ADDRESS + GDT_OFFSET_U32).to_le_bytes());
    sector.resize(CODE32_OFFSET, 0);
    let ram = u32::try_from(ram)
        .map_err(|_| format!("the QEMU guest's RAM of {ram} bytes is over 4 GiB"))?;
    sector.extend(protected_mode_code(ram, writes).map_err(asm_error)?);
    if sector.len() > 510 {
        return Err(format!(
            "the QEMU guest is {} bytes, more than a boot sector",
            sector.len()
        ));
    }
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    Ok(sector)
}

/// Real mode: A20 on, the GDT loaded, protected mode on, a far jump to the 32-bit code.
fn real_mode_stub() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, LOAD_ADDRESS)?;
    a.in_(al, 0x92)?;
    a.or(al, 2)?;
    a.out(0x92, al)?;
    a.lgdt(ptr(u64::from(LOAD_ADDRESS) + GDT_DESCRIPTOR_OFFSET as u64))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    let mut code = a.assemble(u64::from(LOAD_ADDRESS))?;
    // The boot sector sits below 64 KiB, so the target is a 16-bit offset.
    let target =
        u16::try_from(LOAD_ADDRESS + CODE32_OFFSET_U32).expect("the boot sector is below 64 KiB");
    code.push(0xea); // jmp far 0x08:target
    code.extend_from_slice(&target.to_le_bytes());
    code.extend_from_slice(&0x08u16.to_le_bytes());
    Ok(code)
}

fn protected_mode_code(ram: u32, writes: Writes) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.mov(ax, 0x10)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(esp, LOAD_ADDRESS)?;
    // One non-zero word into every page.
    let mut fill = a.create_label();
    a.mov(edi, FIRST_WRITTEN)?;
    a.set_label(&mut fill)?;
    a.lea(eax, ptr(edi + 1))?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(edi, 4096)?;
    a.cmp(edi, ram)?;
    a.jb(fill)?;
    a.mov(al, u32::from(READY))?;
    a.out(u32::from(CONSOLE_PORT), al)?;
    let (ws, pace) = match writes {
        Writes::Idle => {
            let mut idle = a.create_label();
            a.set_label(&mut idle)?;
            a.hlt()?;
            a.jmp(idle)?;
            return a.assemble(u64::from(LOAD_ADDRESS) + CODE32_OFFSET as u64);
        }
        Writes::Paced {
            ws,
            tsc_cycles_per_write,
            device_like,
        } => (ws, Some((tsc_cycles_per_write, device_like))),
        Writes::FlatOut { ws } => (ws, None),
    };
    let mut write = a.create_label();
    a.mov(ebx, 0x2545_f491u32)?; // xorshift32 state
    a.xor(edi, edi)?; // writes since the last device-like one
    a.rdtsc()?;
    a.mov(esi, eax)?; // esi = the last write's slot in TSC cycles
    a.set_label(&mut write)?;
    a.mov(eax, ebx)?;
    a.shl(eax, 13)?;
    a.xor(ebx, eax)?;
    a.mov(eax, ebx)?;
    a.shr(eax, 17)?;
    a.xor(ebx, eax)?;
    a.mov(eax, ebx)?;
    a.shl(eax, 5)?;
    a.xor(ebx, eax)?;
    let mut store = a.create_label();
    if let Some((_, Some((every, pages)))) = pace {
        let mut random = a.create_label();
        a.inc(edi)?;
        a.cmp(edi, every)?;
        a.jb(random)?;
        a.xor(edi, edi)?;
        a.mov(edx, ebx)?;
        a.and(edx, pages.next_power_of_two() - 1)?;
        a.jmp(store)?;
        a.set_label(&mut random)?;
    }
    a.mov(eax, ebx)?;
    a.xor(edx, edx)?;
    a.mov(ecx, ws.1 / 4096)?;
    a.div(ecx)?;
    a.set_label(&mut store)?;
    a.shl(edx, 12)?;
    a.add(dword_ptr(edx + ws.0 + 8), 1)?;
    if let Some((period, _)) = pace {
        let (mut spin, mut on_time) = (a.create_label(), a.create_label());
        a.set_label(&mut spin)?;
        a.rdtsc()?;
        a.mov(edx, eax)?;
        a.sub(edx, esi)?;
        a.cmp(edx, period)?;
        a.jb(spin)?;
        // Far behind (the VM was paused): start the schedule again from now.
        a.cmp(edx, period.saturating_mul(64))?;
        a.jb(on_time)?;
        a.mov(esi, eax)?;
        a.jmp(write)?;
        a.set_label(&mut on_time)?;
        a.add(esi, period)?;
    }
    a.jmp(write)?;
    a.assemble(u64::from(LOAD_ADDRESS) + CODE32_OFFSET as u64)
}

fn qemu_command(qemu: &Qemu, dir: &Path, side: &str, ram: u64, image: &Path) -> (Command, PathBuf) {
    let qmp = dir.join(format!("qemu-{side}.qmp"));
    let console = dir.join(format!("qemu-{side}.console"));
    let mut command = Command::new(&qemu.program);
    command
        .args(["-accel", "kvm", "-smp", "1", "-m"])
        .arg(format!("{}M", ram >> 20))
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide,snapshot=on",
            image.display()
        ))
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .arg("-device")
        .arg(format!(
            "isa-debugcon,iobase={CONSOLE_PORT:#x},chardev=console"
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    (command, qmp)
}

fn number(value: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Migrates a QEMU guest doing `scenario` to a second QEMU over loopback TCP. The destination
/// allocates its RAM up front (`-mem-prealloc`), as vmig's does.
pub fn migrate(qemu: &Qemu, scenario: &Scenario, timeout: Duration) -> Result<QemuReport, String> {
    let mut children = Children::new("bench-qemu")?;
    let dir = children.dir().to_path_buf();
    let image = dir.join("guest.img");
    std::fs::write(&image, boot_sector(scenario.ram, scenario.writes)?)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let (command, source_qmp) = qemu_command(qemu, &dir, "source", scenario.ram, &image);
    children.spawn_command("qemu-source", command)?;
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let multifd = scenario.channels > 1;
    let (mut command, dest_qmp) = qemu_command(qemu, &dir, "destination", scenario.ram, &image);
    // multifd must be on at the destination before it listens: `defer`, then set, then listen.
    command
        .arg("-mem-prealloc")
        .arg("-incoming")
        .arg(if multifd { "defer" } else { uri.as_str() });
    children.spawn_command("qemu-destination", command)?;
    children.wait_for(&source_qmp)?;
    children.wait_for(&dest_qmp)?;
    let mut source = QmpClient::connect(&source_qmp, Duration::from_secs(5))?;
    let mut destination = QmpClient::connect(&dest_qmp, Duration::from_secs(5))?;
    if multifd {
        for side in [&mut source, &mut destination] {
            side.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
            )?;
            side.execute(
                "migrate-set-parameters",
                json!({"multifd-channels": scenario.channels}),
            )?;
        }
        destination.execute("migrate-incoming", json!({ "uri": uri }))?;
    }
    let console = dir.join("qemu-source.console");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read(&console).unwrap_or_default().contains(&READY) {
        children.check_alive()?;
        if Instant::now() > deadline {
            return Err("the QEMU guest did not finish writing its pages in 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(scenario.warm_up);
    source.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    )?;
    source.execute(
        "migrate-set-parameters",
        json!({
            "downtime-limit": scenario.downtime_ms,
            // QEMU 7.2 limits to 128 MiB/s unless told otherwise.
            "max-bandwidth": scenario.max_bandwidth.unwrap_or(1 << 40),
        }),
    )?;
    source.execute("migrate", json!({ "uri": uri }))?;
    let end = Instant::now() + timeout;
    let mut report = QemuReport::default();
    loop {
        let info = source.execute("query-migrate", json!({}))?;
        report.throttle_percent = report
            .throttle_percent
            .max(number(&info, &["cpu-throttle-percentage"]));
        let rate = number(&info, &["ram", "dirty-pages-rate"]);
        if rate > 0 {
            report.dirty_pages_rate = rate;
        }
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => {
                report.total_ms = number(&info, &["total-time"]);
                report.downtime_ms = number(&info, &["downtime"]);
                report.setup_ms = number(&info, &["setup-time"]);
                report.passes = number(&info, &["ram", "dirty-sync-count"]);
                report.transferred = number(&info, &["ram", "transferred"]);
                break;
            }
            "failed" | "cancelled" => {
                return Err(format!(
                    "QEMU's migration {}: {}\n{}",
                    info["status"],
                    info.get("error-desc").unwrap_or(&Value::Null),
                    children.logs()
                ));
            }
            _ if Instant::now() > end => {
                let _ = source.execute("migrate_cancel", json!({}));
                return Err(format!(
                    "QEMU's migration did not complete in {} s",
                    timeout.as_secs()
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = destination.execute("query-status", json!({}))?;
        if status["status"] == "running" {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU's destination is {status} after the migration"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = source.execute("quit", json!({}));
    let _ = destination.execute("quit", json!({}));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_fits_and_ends_with_the_signature() {
        for writes in [
            Writes::Idle,
            Writes::Paced {
                ws: (1 << 20, 64 << 20),
                tsc_cycles_per_write: 100_000,
                device_like: None,
            },
            Writes::Paced {
                ws: (1 << 20, 64 << 20),
                tsc_cycles_per_write: 100_000,
                device_like: Some((5, 512)),
            },
            Writes::FlatOut {
                ws: (16 << 20, 128 << 20),
            },
        ] {
            let sector = boot_sector(1 << 30, writes).unwrap();
            assert_eq!(sector.len(), 512);
            assert_eq!(&sector[510..], &[0x55, 0xaa]);
        }
        assert!(boot_sector(4 << 30, Writes::Idle).is_err());
    }
}
