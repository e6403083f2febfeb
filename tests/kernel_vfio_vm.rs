//! A KVM VM with a real passthrough device through the kernel's VFIO: Debian's kernel under
//! QEMU's TCG (emulated VT-d, QEMU's `edu` DMA device, emulated AMD-V so KVM runs there too;
//! see `vmig_kernel_guest`) boots this test and the `vmig` binary, both static, and
//! inside it:
//! - the engine attaches edu to a VM (`DeviceSpec::VfioPci`): guest RAM mapped into its
//!   container, BAR0 mapped into the guest, MSI wired to an irqfd; edu then DMAs through
//!   those mappings into the VM's RAM, the container's dirty tracking (the engine's dirty
//!   source for a device without DMA logging) reports every mapped page, as type1 does for
//!   vfio-pci, and edu's MSI is pending in the vCPU's local APIC;
//! - `vmig run --device vfio-pci,host=BDF --api` runs the VM with edu, `migrate` is refused at
//!   once naming the device (edu cannot migrate: plain vfio-pci has no migration feature), and
//!   the VM runs on and passes its verify.
//!
//! Skips, saying why, where Debian's packages or QEMU cannot be had (no apt, no network, not
//! root); fails on anything else that goes wrong preparing the guest.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmig_primitives::GuestAddress;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/guest_test.rs"]
mod guest_test;
use cli::{ctl, vmig};

use vmig_dirty::DirtyBitmap;
use vmig_kernel_guest::{EDU_BDF_ENV, edu};
use vmig_kvm::{DirtyLogMode, PAGE_SIZE, Vm, VmConfig, Workload};
use vmig_migration::device::{DirtyLogKind, MigratableDevice};
use vmig_migration::dirty::{DeviceSource, DirtySource, Mapping};
use vmig_migration::machine::{MappedArea, device_area_bytes, interrupt_vector};
use vmig_migration::{DeviceSpec, Machine, Role};

/// The in-guest test this file's host test runs.
const IN_GUEST_TEST: &str = "in_guest_a_vm_with_edu_through_kernel_vfio";

#[test]
#[cfg_attr(vmig_in_guest, ignore = "boots the guest: runs on the host")]
fn a_vm_with_a_kernel_vfio_device_in_an_emulated_guest() {
    guest_test::run_in_guest(
        "kernel_vfio_vm",
        IN_GUEST_TEST,
        1024,
        Duration::from_secs(600),
        "vmig-vm: ",
    );
}

fn read_u32(device: &dyn MigratableDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    device.region_read(0, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn write_u32(device: &dyn MigratableDevice, offset: u64, value: u32) {
    device
        .region_write(0, offset, &value.to_le_bytes())
        .unwrap();
}

/// Has edu copy `count` bytes from `src` to `dst` (one of them its buffer) and waits.
fn edu_dma(device: &dyn MigratableDevice, src: u64, dst: u64, count: u32, cmd: u32) {
    write_u32(
        device,
        edu::DMA_SRC,
        u32::try_from(src).expect("edu DMAs below 4 GiB"),
    );
    write_u32(
        device,
        edu::DMA_DST,
        u32::try_from(dst).expect("edu DMAs below 4 GiB"),
    );
    write_u32(device, edu::DMA_COUNT, count);
    write_u32(device, edu::DMA_CMD, edu::CMD_START | cmd);
    let start = Instant::now();
    while read_u32(device, edu::DMA_CMD) & edu::CMD_START != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "edu DMA did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[cfg_attr(
    not(vmig_in_guest),
    ignore = "runs only in the kernel-VFIO guest, which the test above boots"
)]
fn in_guest_a_vm_with_edu_through_kernel_vfio() {
    assert!(
        vmig_kernel_guest::in_guest(),
        "runs only inside the kernel-VFIO test guest (the test above boots it)"
    );
    let bdf = std::env::var(EDU_BDF_ENV).expect("the guest's init exports the edu address");
    assert!(
        Path::new("/dev/kvm").exists(),
        "the guest loads kvm-amd on QEMU's emulated AMD-V"
    );

    // The engine: a VM with edu attached, its top 2 MiB kept out of the guest's working set.
    let ram = 64 << 20;
    let layout = vmig_kvm::guest::GuestLayout::new(ram, &Workload::default()).unwrap();
    let data: u64 = layout.memory.data_slots().map(|s| s.size).sum();
    let config = VmConfig {
        ram,
        vcpus: 1,
        workload: Workload {
            rate: Some(2000),
            wss: Some(data - device_area_bytes(1)),
            ..Workload::default()
        },
        dirty_log: DirtyLogMode::Bitmap,
        ..VmConfig::default()
    };
    let vm = Vm::new(&config).unwrap();
    let spec: DeviceSpec = format!("vfio-pci,host={bdf}").parse().unwrap();
    let machine = Machine::attach(vm, &[spec], Role::Source).expect("edu attaches");
    machine.vm.resume().unwrap();
    let device = &machine.devices[0];
    assert_eq!(device.name, bdf);
    assert_eq!(device.device.kind().to_string(), "vfio-pci 1234:11e8");
    // BAR0 (1 MiB) is placed and mapped into the guest whole; edu has one MSI vector.
    assert_eq!(device.bars.len(), 1, "{:?}", device.bars);
    let bar0 = device.bars[0];
    assert_eq!((bar0.index, bar0.size), (0, 1 << 20));
    assert_eq!(
        device.mapped,
        [MappedArea {
            region: 0,
            gpa: bar0.gpa,
            len: 1 << 20
        }]
    );
    assert_eq!(device.interrupts.len(), 1);
    println!(
        "vmig-vm: edu {bdf}: BAR0 at {:#x} mapped into the guest, 1 MSI vector wired",
        bar0.gpa
    );
    assert_eq!(read_u32(device.device.as_ref(), edu::IDENT), 0x0100_00ed);

    // "A device that cannot migrate its state makes `migrate` refuse at once with a message
    // naming the device" (the issue): plain vfio-pci offers no migration feature.
    assert_eq!(device.protocol(), None);
    let blockers = machine.migration_blockers();
    assert_eq!(blockers.len(), 1);
    assert!(
        blockers[0].contains(&bdf) && blockers[0].contains("no migration support"),
        "{blockers:?}"
    );

    // edu DMAs through the container's mappings of the VM's RAM (IOVA = guest-physical).
    let top = layout.memory.data_slots().last().unwrap();
    let src = top.gpa + top.size - device_area_bytes(1);
    let dst = src + PAGE_SIZE + 0x100;
    let memory = machine.vm.memory();
    let pattern: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    memory.write(GuestAddress(src), &pattern).unwrap();
    // edu has no DMA logging: the container's type1 tracking is its log.
    assert_eq!(device.device.dirty_log_kind(), DirtyLogKind::DirtyPages);
    let mut tracking =
        DeviceSource::new(&bdf, Arc::clone(&device.device), Mapping::guest_ram(memory));
    tracking
        .start()
        .expect("the container's dirty tracking starts");
    let first = DirtyBitmap::try_new(memory.layout().top_page()).unwrap();
    tracking.harvest(&first).unwrap();
    edu_dma(device.device.as_ref(), src, edu::BUFFER, 1024, 0);
    edu_dma(
        device.device.as_ref(),
        edu::BUFFER,
        dst,
        1024,
        edu::CMD_TO_RAM | edu::CMD_IRQ,
    );
    let mut copied = vec![0u8; 1024];
    memory.read(GuestAddress(dst), &mut copied).unwrap();
    assert_eq!(copied, pattern, "edu's DMA reached the VM's RAM");
    let dirty = DirtyBitmap::try_new(memory.layout().top_page()).unwrap();
    let reported = tracking.harvest(&dirty).unwrap();
    tracking.stop().unwrap();
    // "for vfio-pci every mapped page is always reported dirty" (the reference's observation
    // of type1): the page edu wrote among them, and nothing outside guest RAM.
    let mapped_pages: u64 = memory.layout().slots.iter().map(|s| s.pages()).sum();
    assert!(dirty.test(dst / PAGE_SIZE).unwrap());
    assert_eq!(reported, mapped_pages);
    assert_eq!(dirty.count(), mapped_pages);
    println!(
        "vmig-vm: edu DMA'd 1 KiB into the VM's RAM; the container reported all {reported} \
         mapped pages dirty (type1 cannot see what a device without its own logging writes)"
    );

    // The DMA's MSI went through vfio-pci's eventfd and KVM's irqfd to the vCPU's APIC.
    assert_ne!(
        read_u32(device.device.as_ref(), edu::IRQ_STATUS) & edu::DMA_IRQ,
        0
    );
    write_u32(device.device.as_ref(), edu::IRQ_ACK, edu::DMA_IRQ);
    machine.vm.pause().unwrap();
    let pending = machine.vm.take_pending_interrupts(0).unwrap();
    assert!(
        pending.contains(&interrupt_vector(0, 0)),
        "edu's MSI is pending in vCPU 0's IRR: {pending:?}"
    );
    machine.vm.resume().unwrap();
    println!("vmig-vm: edu's MSI is pending in vCPU 0's IRR");
    let verify = machine.vm.verify(Duration::from_secs(60)).unwrap();
    assert!(verify.passed(), "{verify:?}");
    drop((tracking, machine));

    // The command line: `vmig run --device vfio-pci,host=BDF`, and `migrate` refused.
    let api = Path::new("/tmp/vm.api");
    let mut run = vmig()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "random,rate=2000",
            "--device",
            &format!("vfio-pci,host={bdf}"),
            "--api",
        ])
        .arg(api)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !api.exists() {
        if let Some(status) = run.try_wait().unwrap() {
            let out = run.wait_with_output().unwrap();
            panic!(
                "vmig run exited ({status}): {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(Instant::now() < end, "vmig run never opened its API");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let (ok, reply) = ctl(api, &["migrate", "uri=unix:/tmp/nowhere.sock"]);
    let refused_in = started.elapsed();
    let message = reply["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!ok, "{reply}");
    assert!(
        message.contains(&format!("device {bdf}")) && message.contains("cannot migrate"),
        "{reply}"
    );
    println!(
        "vmig-vm: migrate refused in {} ms: {message}",
        refused_in.as_millis()
    );
    let (_, status) = ctl(api, &["query-status"]);
    assert_eq!(status["return"]["status"], "running", "{status}");
    let (_, report) = ctl(api, &["query-migrate"]);
    assert_ne!(report["return"]["status"], "active", "{report}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _) = ctl(api, &["quit"]);
    assert!(ok);
    let out = run.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("verify: passed"), "{stdout}");
    println!("vmig-vm: vmig run with edu ran on after the refusal and passed its verify");
}
