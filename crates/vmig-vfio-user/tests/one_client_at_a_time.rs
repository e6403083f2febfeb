//! The server's admission policy over a real listening socket: one client at a time; a
//! connection that arrives meanwhile gets an `EBUSY` error reply to its first message at once
//! and is closed, without disturbing the served client; a first client that never sends
//! `VFIO_USER_VERSION` is dropped after the version timeout; a client that disconnects and
//! connects again is served.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmig_vfio_user::caps::{self, Capabilities};
use vmig_vfio_user::client::{Client, ClientError};
use vmig_vfio_user::server::{Device, Refusal};
use vmig_vfio_user::server::{DeviceSpec, RegionSpec, ServeError, Server, ServerConfig};
use vmig_vfio_user::wire::{Command, Header};
use vmig_vfio_user::{Channel, Message};

/// A device of one 4 KiB region of memory, whose teardown after a client left takes
/// `teardown` (a device that stops its DMA engine, say).
struct Scratch {
    memory: Vec<u8>,
    teardown: Duration,
}

impl Device for Scratch {
    fn disconnect(&mut self) {
        std::thread::sleep(self.teardown);
    }

    fn spec(&self) -> DeviceSpec {
        DeviceSpec {
            regions: vec![RegionSpec {
                size: 4096,
                readable: true,
                writable: true,
                ..RegionSpec::default()
            }],
            ..DeviceSpec::default()
        }
    }

    fn region_read(&mut self, _: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        let start = usize::try_from(offset).unwrap();
        data.copy_from_slice(&self.memory[start..start + data.len()]);
        Ok(())
    }

    fn region_write(&mut self, _: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        let start = usize::try_from(offset).unwrap();
        self.memory[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// `Server::run` on a thread, on a socket of its own, stopped when dropped.
struct Running {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Running {
    fn start(name: &str, config: ServerConfig) -> Self {
        Self::with_teardown(name, config, Duration::ZERO)
    }

    fn with_teardown(name: &str, config: ServerConfig, teardown: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("vmig-one-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(name);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let device = Scratch {
            memory: vec![0; 4096],
            teardown,
        };
        let server = Server::new(device, config);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || server.run(&listener, &stop))
        };
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What `Client::connect` gave and how long it took, waited for at most `patience` (so a
/// client that hangs fails the test instead of hanging it).
fn connect_within(socket: &Path, patience: Duration) -> (Result<Client, ClientError>, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let started = Instant::now();
        let outcome = Client::connect(&socket, None);
        let _ = tx.send((outcome, started.elapsed()));
    });
    rx.recv_timeout(patience).unwrap_or_else(|_| {
        panic!("Client::connect did not return within {patience:?}: it hangs on a busy server")
    })
}

/// Sends a `VFIO_USER_VERSION` on a raw connection and returns the reply, waited for at most
/// `patience`.
fn raw_version(stream: UnixStream, patience: Duration) -> (Channel, Message) {
    stream.set_read_timeout(Some(patience)).unwrap();
    let raw = Channel::new(stream);
    let header = Header {
        msg_id: 7,
        command: Command::Version as u16,
        ..Header::default()
    };
    let payload = caps::encode(caps::MAJOR, caps::MINOR, &Capabilities::default());
    raw.send(header, &[&payload], &[]).unwrap();
    let reply = raw.recv().expect("a reply to VFIO_USER_VERSION in time");
    (raw, reply)
}

/// Reads `stream` to its end, which must come within `patience`: the server closed it.
fn assert_closed_within(mut stream: UnixStream, patience: Duration, who: &str) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(patience)).unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{who}: bytes after the end: {rest:02x?}"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{who}: the server did not close the connection within {patience:?}")
        }
        Err(e) => panic!("{who}: the connection failed instead of closing: {e}"),
    }
    started.elapsed()
}

const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_second_client_is_refused_with_ebusy_at_once_and_the_first_is_served_on() {
    let server = Running::start("busy.sock", ServerConfig::default());
    let first = Client::connect(&server.socket, None).unwrap();
    first.region_write(0, 16, b"first").unwrap();

    // The vmig client: a one-line error naming the socket and the policy, well within the
    // time a first client has for its VERSION.
    let (refused, took) = connect_within(&server.socket, VERSION_TIMEOUT);
    let error = refused.expect_err("a second client while the first is served");
    assert!(
        matches!(&error, ClientError::Busy { server: s } if Path::new(s) == server.socket),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains(&format!(
            "vfio-user server {} is busy: it serves another client (one client at a time)",
            server.socket.display()
        )) && !text.contains('\n'),
        "{text}"
    );
    assert!(
        took < VERSION_TIMEOUT / 4,
        "refused in {took:?}: not at once"
    );

    // On the wire: the reply to VERSION is the spec's error reply (the header alone, with the
    // error flag and errno EBUSY), and then the server closes the connection.
    let started = Instant::now();
    let (raw, reply) = raw_version(
        UnixStream::connect(&server.socket).unwrap(),
        VERSION_TIMEOUT,
    );
    assert!(
        reply.header.is_reply() && reply.header.is_error(),
        "{reply:?}"
    );
    assert_eq!(
        (
            reply.header.msg_id,
            reply.header.command,
            reply.header.error_no
        ),
        (
            7,
            Command::Version as u16,
            u32::try_from(libc::EBUSY).unwrap()
        )
    );
    assert!(
        reply.payload.is_empty(),
        "an error reply is the header alone"
    );
    assert_closed_within(
        raw.stream().try_clone().unwrap(),
        VERSION_TIMEOUT,
        "the refused peer",
    );
    assert!(
        started.elapsed() < VERSION_TIMEOUT / 4,
        "{:?}",
        started.elapsed()
    );

    // The first client was not disturbed, idle as it was meanwhile.
    let mut kept = [0u8; 5];
    first.region_read(0, 16, &mut kept).unwrap();
    assert_eq!(&kept, b"first");
    first.region_write(0, 16, b"again").unwrap();

    // Once it has left, the next client is served, and sees the device as it was left.
    first.close();
    let (third, _) = connect_within(&server.socket, VERSION_TIMEOUT);
    let third = third.expect("the next client once the first has left");
    third.region_read(0, 16, &mut kept).unwrap();
    assert_eq!(&kept, b"again");
    third.close();
    server.stop().unwrap();
}

#[test]
fn a_client_that_disconnects_and_connects_again_at_once_is_served_every_time() {
    // The server's teardown of each client takes a while: the next connection arrives while
    // it runs, and must wait for it rather than be refused.
    let server = Running::with_teardown(
        "again.sock",
        ServerConfig::default(),
        Duration::from_millis(100),
    );
    for round in 0..10u8 {
        let client =
            Client::connect(&server.socket, None).unwrap_or_else(|e| panic!("round {round}: {e}"));
        client.region_write(0, 0, &[round]).unwrap();
        client.close();
    }
    let client = Client::connect(&server.socket, None).unwrap();
    let mut last = [0u8];
    client.region_read(0, 0, &mut last).unwrap();
    assert_eq!(last, [9]);
    client.close();
    server.stop().unwrap();
}

#[test]
fn a_busy_connection_that_sends_nothing_is_closed_after_the_busy_timeout() {
    let busy_timeout = Duration::from_millis(300);
    let server = Running::start(
        "silent.sock",
        ServerConfig {
            busy_timeout,
            ..ServerConfig::default()
        },
    );
    let first = Client::connect(&server.socket, None).unwrap();
    let silent = UnixStream::connect(&server.socket).unwrap();
    let took = assert_closed_within(silent, VERSION_TIMEOUT, "the silent peer");
    assert!(
        took >= busy_timeout / 2 && took < VERSION_TIMEOUT / 4,
        "closed after {took:?}, with a busy timeout of {busy_timeout:?}"
    );
    first.region_write(0, 0, b"on").unwrap();
    first.close();
    server.stop().unwrap();
}

#[test]
fn a_first_client_without_version_holds_the_server_until_its_timeout_only() {
    let version_timeout = Duration::from_millis(800);
    let server = Running::start(
        "mute.sock",
        ServerConfig {
            version_timeout,
            ..ServerConfig::default()
        },
    );
    let started = Instant::now();
    let mute = UnixStream::connect(&server.socket).unwrap();
    // While it holds the server, another client is refused (at once, not after the timeout).
    let (refused, took) = connect_within(&server.socket, VERSION_TIMEOUT);
    assert!(
        matches!(refused, Err(ClientError::Busy { .. })),
        "{refused:?}"
    );
    assert!(took < version_timeout, "refused after {took:?}");
    // Then it is dropped when its time is up, and the next client is served.
    assert_closed_within(mute, VERSION_TIMEOUT, "the client that sent no VERSION");
    assert!(
        started.elapsed() >= version_timeout,
        "dropped after {:?}, before its {version_timeout:?}",
        started.elapsed()
    );
    let (next, _) = connect_within(&server.socket, VERSION_TIMEOUT);
    next.expect("served once the mute client was dropped")
        .close();
    server.stop().unwrap();
}

#[test]
fn a_flood_of_connections_while_busy_is_bounded_and_leaves_the_served_client_alone() {
    let server = Running::start("flood.sock", ServerConfig::default());
    let first = Client::connect(&server.socket, None).unwrap();
    // Twice as many silent connections as refusals may run at once: each is closed (after the
    // busy timeout, or at once beyond the bound), none is served.
    let flood: Vec<UnixStream> = (0..2 * vmig_vfio_user::server::MAX_REFUSING)
        .map(|_| UnixStream::connect(&server.socket).unwrap())
        .collect();
    first.region_write(0, 8, b"steady").unwrap();
    for (i, stream) in flood.into_iter().enumerate() {
        assert_closed_within(stream, VERSION_TIMEOUT, &format!("flood connection {i}"));
    }
    let mut kept = [0u8; 6];
    first.region_read(0, 8, &mut kept).unwrap();
    assert_eq!(&kept, b"steady");
    first.close();
    server.stop().unwrap();
}
