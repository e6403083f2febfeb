//! `sendmsg` / `recvmsg` with `SCM_RIGHTS`, and the socket queries the server's admission of
//! clients makes (has the peer hung up, who is the peer): the only `unsafe` code of the crate.
//! File descriptors received are owned at once (`OwnedFd`, close-on-exec), so none can leak, and
//! a truncated control message (more fds than room) is reported rather than silently losing fds.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The kernel's limit on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Bytes of `fds` descriptors in a control message, as the `u32` `CMSG_SPACE` / `CMSG_LEN` take.
#[expect(
    clippy::cast_possible_truncation,
    reason = "callers pass at most SCM_MAX_FD (253) descriptors"
)]
fn fd_bytes(fds: usize) -> u32 {
    (fds.min(SCM_MAX_FD) * size_of::<RawFd>()) as u32
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes(fds)) };
    usize::try_from(space).unwrap_or(usize::MAX)
}

/// Sends `bufs` as one stream write with `fds` attached to its first byte; returns the bytes the
/// kernel took (the caller sends any rest without fds).
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bufs: &[&[u8]],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message: at most {SCM_MAX_FD}", fds.len()),
        ));
    }
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_mut_ptr();
    msg.msg_iovlen = iovecs.len() as _;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer has room for one cmsghdr with `fds.len()` fds (CMSG_SPACE),
        // so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside the buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes(fds.len())) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at live iovecs over borrowed buffers and a live control buffer.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    // Negative is -1: the error is in errno.
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// What one `recvmsg` returned.
pub struct Received {
    /// Bytes read into the buffer (0: the peer closed the stream).
    pub bytes: usize,
    /// Descriptors that came with them.
    pub fds: Vec<OwnedFd>,
    /// The peer sent more descriptors than `max_fds`; the kernel closed the rest.
    pub fds_truncated: bool,
}

/// Reads into `buf` and takes ownership of up to `max_fds` descriptors that come with the bytes.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Received> {
    let max_fds = max_fds.clamp(1, SCM_MAX_FD);
    let mut iovec = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; cmsg_space(max_fds).div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(max_fds) as _;
    let received = loop {
        // SAFETY: `msg` describes `buf` (writable, borrowed mutably) and the control buffer.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if let Ok(n) = usize::try_from(n) {
            break n;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of our control buffer with well-formed
    // cmsghdrs; CMSG_FIRSTHDR/NXTHDR stay inside it, and every SCM_RIGHTS payload holds
    // descriptors now owned by this process, which we wrap exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: received,
        fds,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

static TERMINATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, std::sync::atomic::Ordering::Release);
}

/// A flag that SIGTERM and SIGINT set (instead of killing the process), for a server that stops
/// cleanly: it finishes the command in hand, drops the client and returns.
pub fn termination_flag() -> io::Result<&'static std::sync::atomic::AtomicBool> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_terminate as *const () as usize;
        // SAFETY: `sa_mask` is a valid sigset inside `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs the handler above for a terminating signal.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&TERMINATE)
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a valid, borrowed fd; no memory is involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the peer of the stream socket `fd` has hung up (closed or shut down its end), as the
/// kernel knows it now: `poll` with `POLLRDHUP`, without waiting. Data the peer sent before
/// hanging up may still be unread.
pub fn peer_hung_up(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut entry = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: `entry` is one valid pollfd for the duration of the call, on a borrowed fd;
        // a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut entry, 1, 0) };
        if ready >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(entry.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// The process and user of the peer of the UNIX socket `fd` (`SO_PEERCRED`: as they were
/// when it connected).
pub fn peer_credentials(fd: BorrowedFd<'_>) -> io::Result<(libc::pid_t, libc::uid_t)> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: getsockopt writes at most `len` bytes into `credentials`, which is a live ucred
    // of exactly that size; `len` is a live socklen_t it updates.
    let done = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut credentials).cast(),
            &mut len,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((credentials.pid, credentials.uid))
}
