//! The inside of `cargo bench -p vmig-vfio` (`benches/kernel_map.rs`): runs in the kernel-VFIO
//! test guest, maps 1 GiB through the backend and through the bare ioctl, fetches its bitmap
//! both ways, and reports each round on the guest's report port.

use std::sync::Arc;

use vmig_kernel_guest::EDU_BDF_ENV;
use vmig_primitives::HostMemory;
use vmig_vfio::Container;

fn main() -> std::process::ExitCode {
    if !vmig_kernel_guest::in_guest() {
        eprintln!("guest_bench runs inside the kernel-VFIO test guest: cargo bench -p vmig-vfio");
        return std::process::ExitCode::from(2);
    }
    let bdf = std::env::var(EDU_BDF_ENV).expect("the guest's init exports the edu address");
    let container = Container::open(None).expect("container");
    let _edu = container.open_device(&bdf).expect("edu bound to vfio-pci");
    let ram = Arc::new(HostMemory::anonymous(1 << 30).expect("1 GiB"));
    // Touch every page once, so both paths pin resident memory and first-touch cost is out.
    let page = usize::try_from(vmig_primitives::PAGE_SIZE).expect("a page fits a usize");
    for offset in (0..1usize << 30).step_by(page) {
        ram.store_u64(offset, 1).expect("in range");
    }
    for round in vmig_kernel_guest::bench::map_and_bitmap(&container, &ram, 9).expect("benchmark") {
        vmig_kernel_guest::report_line(&format!(
            "VMIG-BENCH {}",
            serde_json::to_string(&round).expect("a round serializes")
        ));
    }
    std::process::ExitCode::SUCCESS
}
