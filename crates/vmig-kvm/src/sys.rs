//! The KVM calls that `kvm-ioctls` does not wrap, and the raw memory they involve. This is the
//! only module of the crate with `unsafe` code:
//!
//! - `KVM_CLEAR_DIRTY_LOG` and `KVM_RESET_DIRTY_RINGS` (vm ioctls);
//! - the per-vCPU dirty ring, mmapped from the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET` pages, whose
//!   entry flags are read with load-acquire and written with store-release as the API requires;
//! - registering a memslot (the kernel keeps a raw pointer into our mapping);
//! - the kick: a signal handler that sets `kvm_run.immediate_exit` for the vCPU of the thread it
//!   interrupts, so a vCPU told to pause leaves `KVM_RUN` whether the signal lands before or
//!   during the ioctl;
//! - atomic loads and stores of `u64` words in guest memory shared with a running guest;
//! - borrowing an `EventFd`'s descriptor (`vmm-sys-util` offers only the raw fd).

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kvm_bindings::{
    KVM_DIRTY_LOG_PAGE_OFFSET, kvm_clear_dirty_log, kvm_dirty_gfn, kvm_run,
    kvm_userspace_memory_region, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmig_primitives::HostMemory;

/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = ioc(3, 0xc0, size_of::<kvm_clear_dirty_log>());
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = ioc(0, 0xc7, 0);
/// Ring entry flag: the page was dirtied and the entry is ready to harvest.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// Ring entry flag: harvested; `KVM_RESET_DIRTY_RINGS` may recycle it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    (dir << 30 | (size as u64) << 16 | 0xae << 8 | nr) as libc::c_ulong
}

/// `KVM_CLEAR_DIRTY_LOG`: marks clean (and write-protects again) the pages of `slot` whose bits
/// are set in `bitmap`, which covers `num_pages` pages from `first_page`. The caller has checked
/// KVM's rules: `first_page` is a multiple of 64, `num_pages` is too unless the range reaches the
/// slot's end, and `bitmap` holds at least `num_pages` bits.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < u64::from(num_pages) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: the argument is a valid `kvm_clear_dirty_log` whose bitmap pointer covers
    // `num_pages` bits (checked above); KVM only reads the bitmap.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: recycles every ring entry marked reset and write-protects those
/// pages again; returns how many entries it reset.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u64> {
    // SAFETY: an argument-less ioctl on a valid VM fd.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(ret.unsigned_abs()))
}

/// Registers memslot `slot` at `guest_phys_addr` backed by `memory`. KVM keeps the host address:
/// the caller keeps `memory` mapped for as long as the slot exists (the VM deletes its slots with
/// [`delete_memory_slot`] before its memory can be unmapped).
pub fn set_memory_slot(
    vm: &VmFd,
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory: &HostMemory,
) -> io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr,
        memory_size: memory.len() as u64,
        userspace_addr: memory.as_ptr() as u64,
    };
    // SAFETY: the userspace range is a live mapping of exactly `memory_size` bytes that outlives
    // the slot (see above); it is shared memory that KVM and the guest may write at any time,
    // which `HostMemory` is built for (it never hands out references into it).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB area. The VM builder refuses kernels whose XSAVE
/// area is larger (`KVM_CAP_XSAVE2` above 4096), so KVM reads no more than the struct holds.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` is a whole `kvm_xsave` (4096 bytes) and the kernel's XSAVE size is at most
    // that (checked at VM creation), so KVM neither reads past it nor misreads a larger layout.
    unsafe { vcpu.set_xsave(xsave) }
}

/// Deletes memslot `slot` (KVM forgets its host address).
pub fn delete_memory_slot(vm: &VmFd, slot: u32) -> io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; KVM keeps no pointer into our memory.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU's dirty ring: `entries` 16-byte `kvm_dirty_gfn` records mmapped from the vCPU fd, and
/// the index of the next entry to harvest (which only userspace tracks).
#[derive(Debug)]
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    len: u32,
    fetch_index: u32,
}

// SAFETY: the ring is a mapping owned by this value; all access to entries goes through atomics
// on the flags and volatile reads of the payload, and harvesting takes `&mut self`.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu`, `bytes` long (the size given to `KVM_CAP_DIRTY_LOG_RING`).
    pub fn map(vcpu: &VcpuFd, bytes: u32) -> io::Result<Self> {
        let len = bytes as usize / size_of::<kvm_dirty_gfn>();
        if len == 0 || !len.is_power_of_two() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: sysconf has no memory effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size;
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset KVM documents for the
        // ring; it cannot alias Rust memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            entries: NonNull::new(ptr.cast())
                .ok_or_else(|| io::Error::from(io::ErrorKind::Other))?,
            len: u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            fetch_index: 0,
        })
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.len
    }

    /// Harvests entries in order, from the next unharvested one up to the first that is not
    /// dirty: for each, `f(slot, offset)` is called, then the entry is marked reset with a
    /// store-release (the kernel recycles it at the next `KVM_RESET_DIRTY_RINGS`). Returns the
    /// number harvested.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut harvested = 0;
        // At most one lap: entries behind us are marked reset, but a kernel that wraps the ring
        // could mark them dirty again while we walk.
        while harvested < self.len {
            let index = (self.fetch_index & (self.len - 1)) as usize;
            // SAFETY: `index < len`, so the entry lies inside the mapping, which lives as long
            // as `self`. The flags word is 4-byte aligned (entries are 16-byte records) and is
            // only ever accessed atomically by us; the kernel publishes an entry by setting the
            // dirty flag after writing `slot` and `offset` (store-release on its side).
            let entry = unsafe { self.entries.as_ptr().add(index) };
            // SAFETY: as above; `flags` is the first field of the entry.
            let flags = unsafe { AtomicU32::from_ptr(&raw mut (*entry).flags) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return harvested;
            }
            // SAFETY: the entry is published (acquire above), so its payload is stable until we
            // set the reset flag; volatile because the memory is shared with the kernel.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(&raw const (*entry).slot),
                    std::ptr::read_volatile(&raw const (*entry).offset),
                )
            };
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch_index = self.fetch_index.wrapping_add(1);
            harvested += 1;
        }
        harvested
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.len as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: the range is our own mapping of exactly this length, unreachable after drop.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), bytes) };
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler. `const`-initialised, so
    /// reading it from a signal handler never allocates or runs an initialiser.
    static ARMED_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = ARMED_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a thread arms the pointer only while it owns the `VcpuFd` whose `kvm_run`
        // mapping it points to, and disarms it before that fd can be dropped; the handler runs on
        // that same thread, so the mapping is live. A volatile byte store is signal-safe. The
        // store may land while `VcpuFd::run` holds a `&mut kvm_run` across the ioctl: that is
        // the KVM protocol (the kernel reads this byte), the byte is shared memory, and no Rust
        // code reads it through that borrow.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// The signal that kicks vCPU threads out of `KVM_RUN` (`SIGRTMIN + 1`), installed once per
/// process without `SA_RESTART`.
pub fn kick_signal() -> io::Result<libc::c_int> {
    static SIGNAL: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let result = SIGNAL.get_or_init(|| {
        let signal = libc::SIGRTMIN() + 1;
        // SAFETY: a zeroed `sigaction` is a valid starting value; we fill in the handler, flags
        // and an empty mask before passing it to the kernel.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = kick_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `sa_mask` is a valid sigset inside `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that only performs a volatile store (see `kick_handler`).
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL));
        }
        Ok(signal)
    });
    result.map_err(io::Error::from_raw_os_error)
}

/// While alive, the kick signal is held pending on the current thread (delivered when it
/// drops): for calls that a signal would interrupt midway, such as `KVM_RESET_DIRTY_RINGS`.
pub struct KickSignalBlocked {
    old: libc::sigset_t,
}

impl KickSignalBlocked {
    /// Blocks the kick signal on the current thread.
    pub fn new() -> io::Result<Self> {
        let signal = kick_signal()?;
        // SAFETY: zeroed sigsets are valid values that sigemptyset/pthread_sigmask overwrite.
        let (mut set, mut old): (libc::sigset_t, libc::sigset_t) = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `old` are valid sigsets owned by this frame.
        let ret = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old)
        };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        Ok(Self { old })
    }
}

impl Drop for KickSignalBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on the same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Sends the kick signal to `thread`.
pub fn kick_thread(thread: libc::pthread_t) -> io::Result<()> {
    let signal = kick_signal()?;
    // SAFETY: `thread` is a live thread of this process (its `JoinHandle` is held by the caller)
    // and the signal has a handler, so delivery cannot terminate the process.
    let ret = unsafe { libc::pthread_kill(thread, signal) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// While alive, kicks of the current thread set `immediate_exit` of `vcpu`. The guard borrows
/// the `VcpuFd` pointer only; the thread must keep the fd alive until the guard drops.
pub struct ArmedKick {
    run: *mut kvm_run,
}

impl ArmedKick {
    /// Arms the current thread for `vcpu`.
    pub fn arm(vcpu: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        ARMED_RUN.with(|cell| cell.set(run));
        Self { run }
    }

    /// Sets or clears `immediate_exit` (a byte the kick handler may also set).
    pub fn set_immediate_exit(&self, value: bool) {
        // SAFETY: `run` points into the live `kvm_run` mapping of the vCPU this thread owns
        // (see `arm`); volatile, because the signal handler writes the same byte.
        unsafe { std::ptr::write_volatile(&raw mut (*self.run).immediate_exit, u8::from(value)) };
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}

impl Drop for ArmedKick {
    fn drop(&mut self) {
        ARMED_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Allocates every page of the file behind `fd` up to `len` bytes now (`fallocate`), so first
/// touches later find the memory there; contents are unchanged.
pub fn preallocate(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a plain syscall on a borrowed, valid fd; it touches no memory of ours.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Populates the page tables of `memory` for writing (`MADV_POPULATE_WRITE`, Linux 5.14), so
/// the first writes into it take no faults; older kernels answer `EINVAL`, which is ignored
/// (the memory then faults in on first touch, as before).
pub fn populate(memory: &HostMemory) -> io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: the range is exactly our own live mapping; populating changes no contents.
    let rc = unsafe { libc::madvise(memory.as_ptr().cast(), memory.len(), MADV_POPULATE_WRITE) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Ok(())
}

/// The `u64` at byte `offset` of `memory`, as an atomic shared with the guest. `offset` must be
/// 8-byte aligned and inside the mapping; otherwise `None`.
pub fn atomic_u64(memory: &HostMemory, offset: usize) -> Option<&AtomicU64> {
    if !offset.is_multiple_of(8) || offset.checked_add(8)? > memory.len() {
        return None;
    }
    // SAFETY: the word is inside the mapping (checked), aligned (checked, and mmap is
    // page-aligned), and the mapping lives as long as the borrow of `memory`. Guest memory is
    // only accessed by this process through atomics or raw copies, never through references to
    // non-atomic data, and the guest's own accesses are outside Rust's memory model.
    Some(unsafe { AtomicU64::from_ptr(memory.as_ptr().add(offset).cast()) })
}

/// The descriptor of `eventfd`, borrowed for as long as `eventfd` lives.
pub fn borrow_eventfd(eventfd: &vmm_sys_util::eventfd::EventFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the EventFd owns the descriptor and closes it only when dropped, which the
    // returned borrow's lifetime rules out.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}
