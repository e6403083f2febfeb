//! The real kernel's VFIO on a machine without it (`reference/kernel-vfio-type1-observed.md`,
//! `reference/kernel-mtty-observed.md`): Debian's Linux 6.12 from bookworm-backports boots
//! under QEMU's TCG (q35, an emulated Intel IOMMU, QEMU's `edu` DMA device, `-cpu max` for an
//! emulated AMD-V) from an initramfs that holds busybox, the kernel's modules and a
//! statically linked test binary of this workspace. Its init loads VFIO with the type1
//! IOMMU, the mdev core, vfio-pci, kvm-amd and the kernel's `mtty` sample mdev driver (in
//! dependency order, read from each module's `depends=`), binds edu to vfio-pci
//! ([`EDU_BDF_ENV`]) and any other device a boot asks for ([`Machine`], [`BOUND_DEVICES_ENV`]:
//! a boot may run another QEMU and attach vfio-user servers to it), creates [`MTTY_DEVICES`] one-port mtty devices (type [`MTTY_TYPE`],
//! fresh UUIDs in [`MTTY_UUIDS_ENV`]), runs the binary, prints its exit code on the console
//! and powers off. A boot takes about 6 s (4.5 s of guest time) before the binary's own run.
//!
//! Everything comes from Debian's packages, fetched once into `target/kernel-vfio-guest/`
//! ([`target_dir`]):
//! - the kernel, from bookworm-backports through a private apt configuration under
//!   `apt/` there (its own sources file signed by Debian's archive keyring, lists, cache and
//!   state; `/etc/apt` is never touched, and `apt-get update` needs no root): the newest
//!   `linux-image-6.12.*+deb12-amd64-unsigned` its lists offer, whose `.ko.xz` modules are
//!   decompressed (`xz -dc`) for busybox's `insmod`;
//! - `mtty.ko`, built once per kernel version: `samples/vfio-mdev/mtty.c` out of
//!   `linux-source-6.12`, the kernel's `linux-headers-*` and `linux-kbuild-*` extracted
//!   together and made self-contained (their absolute `/usr/src` and `/usr/lib` references
//!   rewritten into the tree), then `make -C HEADERS M=... CC=gcc-12 modules` with a
//!   `pahole` for module BTF (the machine's, else bookworm's `pahole` package extracted into
//!   the cache, or installed when its libraries are missing and this is root);
//! - `busybox-static`, and `qemu-system-x86` (installed when missing and this is root).
//!
//! What is cached: see the layout in `kernel.rs`. A cached [`Guest::prepare`] takes about
//! 0.1 s and reads no network (unless the private package lists are a week old: it then
//! refreshes them, and goes on with the old ones when the mirror cannot be reached); one that
//! did work prints each step's time (a fresh one: about 20 s, 11 s of it streaming `mtty.c`
//! out of the source tarball).
//!
//! [`Guest::prepare`] tells apart what is truly absent here (no apt, no network, not root for
//! installing QEMU or a missing build tool: [`PrepareError::Unavailable`], the caller skips)
//! from everything else that goes wrong (a damaged package, a bad signature, a kernel
//! without a module it needs, a failing mtty build: [`PrepareError::Failed`], the caller
//! fails).
//!
//! The guest reports on two serial ports: the console (`ttyS0`: kernel messages and the test
//! binary's output, ending in `VMIG-GUEST-EXIT=<code>`) and a report port (`ttyS1`, which the
//! binary finds in `VMIG_GUEST_REPORT`) for machine-readable lines.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::Cpio;
use crate::debian::{Apt, Timings, download, extract, qemu_system, run, which};
use crate::kernel;

/// Set to `1` in the guest.
pub const IN_GUEST_ENV: &str = "VMIG_KERNEL_VFIO_GUEST";
/// The `cfg` that [`Guest::build_binary`] sets: tests that run only in the guest are marked
/// `#[cfg_attr(not(vmig_in_guest), ignore = "...")]`, so elsewhere libtest lists them as
/// ignored, with the reason, instead of running them as passes that checked nothing.
pub const IN_GUEST_CFG: &str = "vmig_in_guest";
/// The PCI address of the edu device, bound to vfio-pci, in the guest.
pub const EDU_BDF_ENV: &str = "VMIG_EDU_BDF";
/// The PCI devices the guest's init bound to vfio-pci at a boot's asking
/// ([`Machine::bind_to_vfio_pci`]), comma-separated `vvvv:dddd@DDDD:BB:DD.F` (lowercase hex
/// IDs without `0x`); see [`bound_devices`].
pub const BOUND_DEVICES_ENV: &str = "VMIG_BOUND_DEVICES";
/// The UUIDs of the guest's mtty mediated devices, comma-separated (`uuid1,uuid2,...`):
/// [`MTTY_DEVICES`] one-port devices of type `mtty-1`, created by the guest's init, each in an IOMMU group of
/// its own (`/sys/bus/mdev/devices/UUID/iommu_group`), opened by its UUID.
pub const MTTY_UUIDS_ENV: &str = "VMIG_MTTY_UUIDS";
/// The mdev type of the guest's mtty devices (one 16550 port, an 8-byte I/O BAR0).
pub const MTTY_TYPE: &str = "mtty-1";
/// How many mtty devices the guest's init creates: two for a migration's source and two for
/// its destination (a device's group is open in one VMM at a time).
pub const MTTY_DEVICES: usize = 4;
/// The path of the report port in the guest.
pub const REPORT_ENV: &str = "VMIG_GUEST_REPORT";
/// The console line that carries the test binary's exit code.
pub const EXIT_MARKER: &str = "VMIG-GUEST-EXIT=";

/// The modules the guest loads (with their dependencies, in dependency order): VFIO with the
/// type1 IOMMU, the mdev core, vfio-pci (for edu), KVM on QEMU's emulated AMD-V (so a VMM can
/// run VMs with passthrough devices in the guest), and the kernel's `mtty` sample mdev driver
/// (built by [`Guest::prepare`]).
const MODULES: &[&str] = &[
    "vfio",
    "vfio_iommu_type1",
    "mdev",
    "vfio-pci",
    "kvm-amd",
    kernel::MTTY,
];

/// A program of this workspace to build for the guest.
#[derive(Debug, Clone, Copy)]
pub enum GuestBinary<'a> {
    /// A test target of `package` (`tests/NAME.rs`).
    Test {
        /// The package.
        package: &'a str,
        /// The test target.
        name: &'a str,
    },
    /// An example of `package` (`examples/NAME.rs`).
    Example {
        /// The package.
        package: &'a str,
        /// The example.
        name: &'a str,
    },
    /// A binary of `package`.
    Bin {
        /// The package.
        package: &'a str,
        /// The binary.
        name: &'a str,
    },
}

/// The registers of QEMU's `edu` device (`hw/misc/edu.c`), BAR0, which the guest's tests drive.
pub mod edu {
    /// Identification, `0x010000ed`.
    pub const IDENT: u64 = 0x00;
    /// Reads back the inverse of what was written.
    pub const LIVENESS: u64 = 0x04;
    /// Interrupt status.
    pub const IRQ_STATUS: u64 = 0x24;
    /// Raises an interrupt with the written status bits.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Acknowledges the written status bits.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA byte count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
    /// The device's 4 KiB DMA buffer, as a DMA address.
    pub const BUFFER: u64 = 0x40000;
    /// `DMA_CMD`: start (clear again when the transfer is done).
    pub const CMD_START: u32 = 1;
    /// `DMA_CMD`: direction edu → RAM.
    pub const CMD_TO_RAM: u32 = 2;
    /// `DMA_CMD`: raise an interrupt when done.
    pub const CMD_IRQ: u32 = 4;
    /// The interrupt status bit of a finished DMA.
    pub const DMA_IRQ: u32 = 0x100;
}

/// Whether this process runs inside the test guest.
pub fn in_guest() -> bool {
    std::env::var(IN_GUEST_ENV).as_deref() == Ok("1")
}

/// The UUIDs of the guest's mtty devices ([`MTTY_UUIDS_ENV`]), in creation order; empty
/// outside the guest, or when its init could create none.
pub fn mtty_uuids() -> Vec<String> {
    std::env::var(MTTY_UUIDS_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The addresses of the guest's PCI devices `vendor:device` that its init bound to vfio-pci
/// ([`BOUND_DEVICES_ENV`]), in bus order; empty outside the guest.
pub fn bound_devices(vendor: u16, device: u16) -> Vec<String> {
    let ids = format!("{vendor:04x}:{device:04x}@");
    std::env::var(BOUND_DEVICES_ENV)
        .unwrap_or_default()
        .split(',')
        .filter_map(|d| d.strip_prefix(&ids))
        .map(str::to_owned)
        .collect()
}

/// What a boot runs beyond the standard machine (bookworm's QEMU, q35, VT-d, edu).
#[derive(Debug, Clone, Copy, Default)]
pub struct Machine<'a> {
    /// Another `qemu-system-x86_64` (a [`NewestQemu`](crate::NewestQemu)'s launcher);
    /// `None`: the rig's own.
    pub qemu: Option<&'a Path>,
    /// vfio-user servers to attach with `-device vfio-user-pci` (QEMU 10.1 and newer), each
    /// alone behind a PCIe root port of its own (so the guest kernel can reset it with a
    /// secondary bus reset); guest RAM then comes from a shared memfd backend, as vfio-user
    /// needs.
    pub vfio_user_sockets: &'a [&'a Path],
    /// PCI IDs (vendor, device) the init binds to vfio-pci besides edu
    /// ([`BOUND_DEVICES_ENV`]).
    pub bind_to_vfio_pci: &'a [(u16, u16)],
}

/// What a boot needs: QEMU, the kernel and its modules, busybox.
#[derive(Debug, Clone)]
pub struct Guest {
    qemu: PathBuf,
    /// `uname -r` of the kernel.
    release: String,
    kernel: PathBuf,
    /// The modules and their dependencies, in load order: (name, uncompressed file).
    modules: Vec<(String, PathBuf)>,
    busybox: PathBuf,
    work: PathBuf,
}

/// What one boot produced.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Everything the console printed.
    pub console: String,
    /// Everything the binary wrote to the report port.
    pub report: String,
    /// The binary's exit code, `None` when the console never printed it (the guest crashed or
    /// timed out).
    pub exit_code: Option<i32>,
    /// Whether the guest was killed at the timeout.
    pub timed_out: bool,
    /// Wall time of the boot.
    pub duration: Duration,
}

impl GuestRun {
    /// The report lines that start with `prefix`, without it.
    pub fn report_lines<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.report
            .lines()
            .filter_map(move |l| l.trim_end_matches('\r').strip_prefix(prefix))
    }
}

/// Why [`Guest::prepare`] gave no guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareError {
    /// What the guest needs is absent here (no apt, no network, QEMU missing and not root):
    /// tests skip, saying this.
    Unavailable(String),
    /// Something that is here went wrong: tests fail, saying this.
    Failed(String),
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) | Self::Failed(why) => f.write_str(why),
        }
    }
}

impl From<String> for PrepareError {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

impl From<&str> for PrepareError {
    fn from(why: &str) -> Self {
        Self::Failed(why.to_owned())
    }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

impl Guest {
    /// Finds or fetches QEMU, the kernel, its modules (`mtty` built) and busybox: `Err` says
    /// why the guest cannot run here, and whether that is because something is absent or
    /// because something failed. A preparation that had work to do prints how long each step
    /// took.
    pub fn prepare() -> Result<Self, PrepareError> {
        let work = target_dir().join("kernel-vfio-guest");
        let debs = work.join("debs");
        std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
        if which("apt-get").is_none() || which("dpkg-deb").is_none() {
            return Err(PrepareError::Unavailable(
                "apt-get and dpkg-deb are needed to fetch Debian's kernel".into(),
            ));
        }
        let qemu = qemu_system()?;
        let mut timings = Timings::default();
        let kernel = kernel::prepare(&work, MODULES, &mut timings)?;
        let busybox_root = work.join("busybox-static");
        if !busybox_root.join(".extracted").exists() {
            let deb = download(&Apt::System, "busybox-static", &debs, &mut timings)?;
            extract(&[deb], &busybox_root, &mut timings, |_| Ok(()))?;
        }
        let busybox = busybox_root.join("bin/busybox");
        if !busybox.is_file() {
            return Err(format!("{} is missing", busybox.display()).into());
        }
        if !timings.is_empty() {
            print!(
                "{}",
                timings.render(&format!(
                    "kernel-VFIO guest rig (Linux {}) prepared",
                    kernel.release
                ))
            );
        }
        Ok(Self {
            qemu,
            release: kernel.release,
            kernel: kernel.vmlinuz,
            modules: kernel.modules,
            busybox,
            work,
        })
    }

    /// The guest kernel's release (`uname -r`), e.g. `6.12.95+deb12-amd64`.
    pub fn kernel_release(&self) -> &str {
        &self.release
    }

    /// As [`Guest::prepare`], for a test: what is absent here goes to `skip` (with why) and
    /// gives `None`, so the caller returns; any other failure panics, failing the test.
    pub fn prepare_or_skip(skip: impl FnOnce(String)) -> Option<Self> {
        match Self::prepare() {
            Ok(guest) => Some(guest),
            Err(PrepareError::Unavailable(why)) => {
                skip(format!("the kernel-VFIO guest cannot run here: {why}"));
                None
            }
            Err(PrepareError::Failed(why)) => panic!("preparing the kernel-VFIO guest: {why}"),
        }
    }

    /// Builds `binary` statically for the guest (a separate target directory,
    /// so the host's build is untouched), with the release profile when `release`, and
    /// returns its path.
    pub fn build_binary(&self, binary: GuestBinary, release: bool) -> Result<PathBuf, String> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = self.work.join("target");
        let (command, kind, package, name) = match binary {
            GuestBinary::Test { package, name } => ("test", "--test", package, name),
            GuestBinary::Example { package, name } => ("build", "--example", package, name),
            GuestBinary::Bin { package, name } => ("build", "--bin", package, name),
        };
        let out = run(Command::new(cargo)
            .args([command, "--message-format=json", "-p", package, kind, name])
            .args((command == "test").then_some("--no-run"))
            .args(["--target", "x86_64-unknown-linux-gnu"])
            .args(release.then_some("--release"))
            .env("CARGO_TARGET_DIR", &target_dir)
            .env(
                "RUSTFLAGS",
                format!("-C target-feature=+crt-static --cfg {IN_GUEST_CFG}"),
            )
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .current_dir(env!("CARGO_MANIFEST_DIR")))?;
        out.lines()
            .filter(|l| l.contains("\"executable\":\"") && l.contains("compiler-artifact"))
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["target"]["name"] == name)
                    .then(|| v["executable"].as_str().map(PathBuf::from))
                    .flatten()
            })
            .next_back()
            .ok_or_else(|| format!("cargo built no executable for {kind} {name}"))
    }

    /// Boots the guest with `binary` run as `binary args...`, with `memory_mib` of RAM, and
    /// waits at most `timeout` for it.
    pub fn boot(
        &self,
        binary: &Path,
        args: &[&str],
        memory_mib: u32,
        timeout: Duration,
    ) -> Result<GuestRun, String> {
        self.boot_with(binary, &[], args, memory_mib, timeout)
    }

    /// As [`Guest::boot`], with `programs` (name, host path) in the guest's `/bin` too.
    pub fn boot_with(
        &self,
        binary: &Path,
        programs: &[(&str, &Path)],
        args: &[&str],
        memory_mib: u32,
        timeout: Duration,
    ) -> Result<GuestRun, String> {
        self.boot_on(
            Machine::default(),
            binary,
            programs,
            args,
            memory_mib,
            timeout,
        )
    }

    /// As [`Guest::boot_with`], on `machine`.
    pub fn boot_on(
        &self,
        machine: Machine<'_>,
        binary: &Path,
        programs: &[(&str, &Path)],
        args: &[&str],
        memory_mib: u32,
        timeout: Duration,
    ) -> Result<GuestRun, String> {
        static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let boot = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let run_dir = self.work.join(format!("run-{}-{boot}", std::process::id()));
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
        let initramfs = run_dir.join("initramfs.cpio");
        std::fs::write(
            &initramfs,
            self.initramfs(binary, programs, args, machine.bind_to_vfio_pci)?,
        )
        .map_err(|e| format!("{}: {e}", initramfs.display()))?;
        let console = run_dir.join("console.log");
        let report = run_dir.join("report.log");
        let qemu_log = run_dir.join("qemu.log");
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&report);
        // QEMU's own messages go to a file: a pipe nobody reads while it runs could fill up.
        let stderr =
            std::fs::File::create(&qemu_log).map_err(|e| format!("{}: {e}", qemu_log.display()))?;
        let qemu = machine.qemu.unwrap_or(&self.qemu);
        let mut command = Command::new(qemu);
        command.args(["-accel", "tcg", "-cpu", "max", "-machine"]);
        if machine.vfio_user_sockets.is_empty() {
            command.arg("q35,kernel-irqchip=split");
        } else {
            command
                .arg("q35,kernel-irqchip=split,memory-backend=ram")
                .arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=ram,size={memory_mib}M,share=on"
                ));
        }
        let start = Instant::now();
        let mut child = command
            .args(["-m", &memory_mib.to_string(), "-smp", "1"])
            .args([
                "-device",
                "intel-iommu,intremap=on,caching-mode=on",
                "-device",
                "edu",
            ])
            .args(
                (1..)
                    .zip(machine.vfio_user_sockets)
                    .flat_map(|(n, socket)| {
                        let port = format!("vmig-port{n}");
                        let device = serde_json::json!({
                            "driver": "vfio-user-pci",
                            "bus": port,
                            "socket": {"type": "unix", "path": socket},
                        });
                        [
                            "-device".to_owned(),
                            format!("pcie-root-port,id={port},chassis={n}"),
                            "-device".to_owned(),
                            device.to_string(),
                        ]
                    }),
            )
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-nic",
                "none",
                "-monitor",
                "none",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", report.display()))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args([
                "-append",
                "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=4",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", qemu.display()))?;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(status);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let duration = start.elapsed();
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let report = std::fs::read_to_string(&report).unwrap_or_default();
        let stderr = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        if status.is_some_and(|s| !s.success()) {
            return Err(format!("QEMU failed: {}", stderr.trim()));
        }
        let exit_code = console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(EXIT_MARKER))
            .filter_map(|c| c.trim().parse().ok())
            .next_back();
        let _ = std::fs::remove_dir_all(&run_dir);
        Ok(GuestRun {
            console,
            report,
            exit_code,
            timed_out: status.is_none(),
            duration,
        })
    }

    /// The initramfs (newc cpio): busybox, the modules, the binary and the init script.
    fn initramfs(
        &self,
        binary: &Path,
        programs: &[(&str, &Path)],
        args: &[&str],
        bind_to_vfio_pci: &[(u16, u16)],
    ) -> Result<Vec<u8>, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let modules = &self.modules;
        let mut insmod = String::new();
        for (name, _) in modules {
            insmod.push_str(&format!(
                "insmod /lib/modules/{name}.ko || echo \"insmod {name} failed\"\n"
            ));
        }
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "")))
            .collect();
        let mut bind = String::new();
        for (vendor, device) in bind_to_vfio_pci {
            bind.push_str(&format!(
                "  0x{vendor:04x}:0x{device:04x}) \
                 BOUND=${{BOUND:+$BOUND,}}{vendor:04x}:{device:04x}@${{d##*/}}; \
                 echo vfio-pci > $d/driver_override; echo ${{d##*/}} > /sys/bus/pci/drivers_probe;;\n"
            ));
        }
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t devtmpfs dev /dev\n\
             ifconfig lo 127.0.0.1 up\n\
             {insmod}\
             BOUND=\n\
             for d in /sys/bus/pci/devices/*; do\n\
               case \"$(cat $d/vendor):$(cat $d/device)\" in\n\
               0x1234:0x11e8) EDU=${{d##*/}}; echo vfio-pci > $d/driver_override; \
             echo $EDU > /sys/bus/pci/drivers_probe;;\n\
             {bind}\
               esac\n\
             done\n\
             T=/sys/class/mdev_bus/mtty/mdev_supported_types/{MTTY_TYPE}\n\
             echo \"{MTTY_TYPE} available_instances: $(cat $T/available_instances 2>/dev/null)\"\n\
             MTTY=\n\
             for i in {counts}; do\n\
               U=$(cat /proc/sys/kernel/random/uuid)\n\
               if echo $U > $T/create; then MTTY=${{MTTY:+$MTTY,}}$U; \
               else echo \"creating mtty device $U failed\"; fi\n\
             done\n\
             stty -F /dev/ttyS1 raw -echo 2>/dev/null\n\
             export {IN_GUEST_ENV}=1 {EDU_BDF_ENV}=$EDU {MTTY_UUIDS_ENV}=$MTTY \
             {BOUND_DEVICES_ENV}=$BOUND \
             {REPORT_ENV}=/dev/ttyS1 RUST_BACKTRACE=1\n\
             /bin/vmig-guest-test {args}\n\
             echo \"{EXIT_MARKER}$?\"\n\
             poweroff -f\n",
            args = quoted.join(" "),
            counts = (1..=MTTY_DEVICES)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
        let mut cpio = Cpio::default();
        for dir in ["bin", "proc", "sys", "dev", "tmp", "lib", "lib/modules"] {
            cpio.dir(dir);
        }
        cpio.file("bin/busybox", &read(&self.busybox)?, 0o755);
        cpio.file("bin/vmig-guest-test", &read(binary)?, 0o755);
        for (name, path) in programs {
            if name.contains('/') || name.is_empty() {
                return Err(format!("program name `{name}`: expected a file name"));
            }
            cpio.file(&format!("bin/{name}"), &read(path)?, 0o755);
        }
        for (name, path) in modules {
            cpio.file(&format!("lib/modules/{name}.ko"), &read(path)?, 0o644);
        }
        cpio.file("init", init.as_bytes(), 0o755);
        Ok(cpio.finish())
    }
}
/// Writes one line to the report port (in the guest), or to stdout elsewhere.
pub fn report_line(line: &str) {
    match std::env::var(REPORT_ENV) {
        Ok(path) => {
            if let Ok(mut port) = std::fs::OpenOptions::new().write(true).open(path) {
                let _ = writeln!(port, "{line}");
                return;
            }
            println!("{line}");
        }
        Err(_) => println!("{line}"),
    }
}
