//! The two-hosts harness's only `unsafe`: creating a TUN device (`TUNSETIFF`), waiting for one
//! to have a packet (`poll`), and moving the calling thread into a network namespace (`setns`).
//! Everything else (reading and writing packets, the namespaces' configuration) goes through
//! `std` and the `ip` command.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags, in a 40-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

/// `IFF_TUN | IFF_NO_PI`: IP packets, without the 4-byte packet-information header.
const TUN_FLAGS: libc::c_short = 0x1001;
const _: () = assert!(libc::IFF_TUN | libc::IFF_NO_PI == 0x1001);

/// Creates the TUN device `name` in the calling thread's network namespace; it lives as long as
/// the returned file, whose every `read` is one packet the kernel sent to it and every `write`
/// one packet the kernel receives from it.
pub fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TUN name {name:?}: expected 1 to {} bytes without NUL",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: TUN_FLAGS,
        _rest: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` through its argument; `request` is
    // that layout (size checked above against libc's), initialized, and borrowed exclusively
    // for the call; the fd is the open /dev/net/tun that `file` owns.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    Ok(file)
}

/// Waits at most `timeout` for `fd` to be readable; `Ok(false)` when it is not (or a signal
/// interrupted the wait).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `poll` is one initialized pollfd, borrowed exclusively for the call, and nfds
    // says one; the fd is open for as long as `fd` borrows it.
    let rc = unsafe { libc::poll(&raw mut poll, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if poll.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(io::Error::other(format!(
            "poll: revents {:#x} on the TUN device",
            poll.revents
        )));
    }
    Ok(rc > 0 && poll.revents & libc::POLLIN != 0)
}

/// Moves the calling thread (only it: the network namespace is per thread) into the network
/// namespace `ns` names (`/run/netns/NAME`); sockets it creates from then on live there.
pub fn enter_netns(ns: &Path) -> io::Result<()> {
    let file = File::open(ns)?;
    // SAFETY: setns takes an fd and a namespace type and touches no memory of ours; the fd is
    // open (`file` owns it) for the call, and CLONE_NEWNET changes only this thread's network
    // namespace, which is what the caller asks for.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setns {}: {e}", ns.display()),
        ));
    }
    Ok(())
}
