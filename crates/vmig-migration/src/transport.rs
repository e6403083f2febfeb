//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`, and the connections that carry it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::error::{MigrationError, Result, io_error};

/// A migration address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Uri {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            MigrationError::Invalid(format!(
                "migration address `{s}`: expected tcp:HOST:PORT or unix:PATH"
            ))
        };
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Self::Tcp(rest.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// One connection of a migration.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// UNIX socket.
    Unix(UnixStream),
}

impl Conn {
    /// A second handle on the same connection (reads on one, writes on the other).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    /// Closes both directions, waking any thread blocked on it.
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Closes the reading direction: a thread blocked reading wakes, writes still go out.
    pub fn shutdown_read(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Read),
        };
    }

    /// Who is at the other end, for logs: `tcp:HOST:PORT`, or `unix:` for a local peer.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s
                .peer_addr()
                .map_or_else(|e| format!("tcp:? ({e})"), |a| format!("tcp:{a}")),
            Self::Unix(_) => "unix: (a local process)".into(),
        }
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match self {
            Self::Tcp(s) => s.read_timeout(),
            Self::Unix(s) => s.read_timeout(),
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    fn tune(&self) {
        if let Self::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

impl std::os::fd::AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long one TCP connect attempt of [`connect_unless`] waits before it asks again.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);

/// Opens one connection to `uri` as [`connect`] does, but a TCP connect that gets no answer
/// (a host that drops the SYN) is tried again each second until it is answered or `stop`
/// gives an error, instead of waiting the kernel's two minutes.
pub fn connect_unless(uri: &Uri, stop: &dyn Fn() -> Result<()>) -> Result<Conn> {
    let Uri::Tcp(addr) = uri else {
        return connect(uri);
    };
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
        .map_err(io_error(format!("resolving {uri}")))?
        .collect();
    loop {
        let mut unanswered = false;
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_ATTEMPT) {
                Ok(s) => {
                    let conn = Conn::Tcp(s);
                    conn.tune();
                    return Ok(conn);
                }
                Err(e) => {
                    unanswered |= e.kind() == io::ErrorKind::TimedOut;
                    last = Some(e);
                }
            }
        }
        let Some(e) = last else {
            return Err(MigrationError::Invalid(format!(
                "{uri}: the name resolves to no address"
            )));
        };
        if !unanswered {
            return Err(io_error(format!("connecting to {uri}"))(e));
        }
        stop().map_err(|stopped| match stopped {
            MigrationError::Cancelled(why) => MigrationError::Cancelled(format!(
                "{why}, while connecting to {uri} (no answer yet: {e})"
            )),
            other => other,
        })?;
    }
}

/// Opens one connection to `uri`.
pub fn connect(uri: &Uri) -> Result<Conn> {
    let conn = match uri {
        Uri::Tcp(addr) => {
            Conn::Tcp(TcpStream::connect(addr).map_err(io_error(format!("connecting to {uri}")))?)
        }
        Uri::Unix(path) => {
            Conn::Unix(UnixStream::connect(path).map_err(io_error(format!("connecting to {uri}")))?)
        }
    };
    conn.tune();
    Ok(conn)
}

/// A listening destination.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// UNIX socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `uri`. A UNIX socket path that exists is refused unless it is a socket
    /// nobody listens on (left by a process that died), which is replaced.
    pub fn bind(uri: &Uri) -> Result<Self> {
        match uri {
            Uri::Tcp(addr) => Ok(Self::Tcp(
                TcpListener::bind(addr).map_err(io_error(format!("listening on {uri}")))?,
            )),
            Uri::Unix(path) => {
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        return Err(MigrationError::Invalid(format!(
                            "{uri}: another process listens there"
                        )));
                    }
                    std::fs::remove_file(path)
                        .map_err(io_error(format!("removing the stale socket {uri}")))?;
                }
                let listener =
                    UnixListener::bind(path).map_err(io_error(format!("listening on {uri}")))?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    /// The address a source connects to (with the port the OS chose for `tcp:HOST:0`).
    pub fn uri(&self) -> Result<Uri> {
        match self {
            Self::Tcp(l) => Ok(Uri::Tcp(
                l.local_addr()
                    .map_err(io_error("reading the listening address"))?
                    .to_string(),
            )),
            Self::Unix(_, path) => Ok(Uri::Unix(path.clone())),
        }
    }

    /// Accepts one connection, waiting until `deadline` if given.
    pub fn accept(&self, deadline: Option<Instant>) -> Result<Conn> {
        self.set_nonblocking(deadline.is_some())?;
        loop {
            let accepted = match self {
                Self::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
                Self::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            };
            match accepted {
                Ok(conn) => {
                    match &conn {
                        Conn::Tcp(s) => s.set_nonblocking(false),
                        Conn::Unix(s) => s.set_nonblocking(false),
                    }
                    .map_err(io_error("configuring an accepted connection"))?;
                    conn.tune();
                    return Ok(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(MigrationError::Stream(
                            "the source did not open all its connections in time".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("accepting a migration connection")(e)),
            }
        }
    }

    fn set_nonblocking(&self, on: bool) -> Result<()> {
        match self {
            Self::Tcp(l) => l.set_nonblocking(on),
            Self::Unix(l, _) => l.set_nonblocking(on),
        }
        .map_err(io_error("configuring the listener"))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_bad_ones_say_the_forms() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/m.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:99999",
            "unix:",
            "http://x",
            "rdma:x:1",
        ] {
            let err = bad.parse::<Uri>().unwrap_err().to_string();
            assert!(err.contains("tcp:HOST:PORT or unix:PATH"), "{bad}: {err}");
        }
    }
}
