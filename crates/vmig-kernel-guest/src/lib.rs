//! `vmig-kernel-guest`: how vmig's tests and benchmarks reach the real kernel's VFIO on a
//! machine without it. A dev-only crate (`publish = false`): `vmig-vfio`'s tests, benchmarks
//! and examples and the root package's tests use it as a dev-dependency; no library depends on
//! it, so none of it is any library's public API.
//!
//! What it owns:
//! - [`Guest`]: Debian's Linux 6.12 (bookworm-backports, through a private apt configuration
//!   that leaves `/etc/apt` alone) booted under QEMU's TCG (q35, an emulated Intel IOMMU,
//!   QEMU's `edu` DMA device, emulated AMD-V for KVM) from an initramfs holding busybox, the
//!   kernel's VFIO, mdev and KVM modules, the kernel's `mtty` sample mdev driver (built here
//!   against the kernel's headers: Debian does not ship it) and a statically linked test
//!   binary of this workspace ([`Guest::build_binary`], which sets `--cfg vmig_in_guest`,
//!   [`IN_GUEST_CFG`]); the packages are fetched, the modules decompressed and mtty built
//!   once per kernel version, and the rig is cached under the workspace's
//!   `target/kernel-vfio-guest/` ([`target_dir`]); a boot may run on another QEMU with
//!   vfio-user servers attached behind PCIe root ports, bound to vfio-pci too ([`Machine`]);
//! - what a program in the guest uses: [`in_guest`], [`report_line`] (the machine-readable
//!   report port), the `edu` device's registers ([`edu`]) and address ([`EDU_BDF_ENV`]), the
//!   addresses of the other devices bound to vfio-pci ([`bound_devices`]), the
//!   mtty mediated devices' UUIDs ([`MTTY_UUIDS_ENV`], [`mtty_uuids`]);
//! - [`differential`]: seeded random sequences of type1 calls, run against the kernel (in the
//!   guest) and against `vmig-dma` (on the host), and the rule that compares the two;
//! - [`bench`](mod@bench): mapping 1 GiB and fetching its dirty bitmap, `vmig-vfio`'s backend against the
//!   bare ioctls, in the guest;
//! - [`NewestQemu`]: QEMU's newest release (Debian sid's, with its vfio-user client), unpacked
//!   under `target/qemu-sid/` and run through sid's own loader ([`newest_qemu`]).
//!
//! What it leaves to others: the VFIO backend under test (`vmig-vfio`), the userspace IOMMU it
//! is compared with (`vmig-dma`), and the tests themselves (their skips: `vmig-test-support`).
//! It prints: what it prints is test output.
//!
//! ```text
//!  host test                          QEMU (TCG, VT-d, edu)                 guest
//!  Guest::prepare ─► debs → kernel 6.12, modules, mtty.ko, busybox (cached under target/)
//!  build_binary ───► cargo --cfg vmig_in_guest, static
//!  boot ───────────► initramfs ─► init: insmod, edu → vfio-pci, mtty mdevs ─► test binary
//!  GuestRun ◄──────── console (ttyS0, ends VMIG-GUEST-EXIT=<code>), report (ttyS1) ◄────┘
//! ```

pub mod bench;
mod cpio;
mod debian;
pub mod differential;
mod guest;
mod kernel;
pub mod newest_qemu;

pub use debian::qemu_system;
pub use guest::{
    BOUND_DEVICES_ENV, EDU_BDF_ENV, EXIT_MARKER, Guest, GuestBinary, GuestRun, IN_GUEST_CFG,
    IN_GUEST_ENV, MTTY_DEVICES, MTTY_TYPE, MTTY_UUIDS_ENV, Machine, PrepareError, REPORT_ENV,
    bound_devices, edu, in_guest, mtty_uuids, report_line, target_dir,
};
pub use newest_qemu::NewestQemu;
