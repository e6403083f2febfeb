//! One end of a vfio-user connection carrying traffic both ways: commands this side sends wait
//! for their replies, and commands the peer sends (a client's requests at a server, a server's
//! `DMA_READ` / `DMA_WRITE` at a client) are handed to the owner in order. A reader thread is the
//! only receiver; it routes each reply to the waiting request by `msg_id`, so a device thread can
//! do message-based DMA while the server is in the middle of handling a command.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::transport::{Channel, Message, TransportError};
use crate::wire::{Command, FLAG_ERROR, FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY, Header};

/// How long a request waits for its reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The peer answered with an error reply.
    #[error("{command:?} failed on the peer: {}", std::io::Error::from_raw_os_error(*errno))]
    Remote {
        /// The command.
        command: Command,
        /// The errno of the reply.
        errno: i32,
    },
    /// No reply in time.
    #[error("{0:?} got no reply within the timeout")]
    Timeout(Command),
    /// The connection is gone, for this reason.
    #[error("the connection is closed: {0}")]
    Closed(CloseReason),
    /// The peer's reply names another command than the request it answers; the connection
    /// cannot be trusted further.
    #[error("the reply to {command:?} (id {id}) names command {got}")]
    WrongReply {
        /// The command asked.
        command: Command,
        /// The request's `msg_id`.
        id: u16,
        /// The command the reply names.
        got: u16,
    },
    /// Sending failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl EndpointError {
    /// The errno to report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Remote { errno, .. } => *errno,
            Self::Timeout(_) => libc::ETIMEDOUT,
            Self::Closed(_) | Self::WrongReply { .. } | Self::Transport(_) => libc::ENOTCONN,
        }
    }
}

/// Why a connection closed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloseReason {
    /// The peer closed it between messages: the normal end.
    #[error("the peer closed the connection")]
    PeerClosed,
    /// The owner dropped the receiver of the peer's commands.
    #[error("the owner stopped taking commands")]
    OwnerStopped,
    /// Receiving failed: a socket error or the peer broke the framing.
    #[error(transparent)]
    Broken(Arc<TransportError>),
    /// Not known: the reader ended without saying why.
    #[error("no reason given")]
    Unknown,
}

struct Shared {
    channel: Channel,
    send_lock: Mutex<()>,
    waiters: Mutex<HashMap<u16, Sender<Message>>>,
    closed: Mutex<Option<CloseReason>>,
    next_id: AtomicU16,
}

/// A connection with a reader thread.
pub struct Endpoint {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Starts the reader on `channel`; the peer's commands arrive on the returned receiver, in
    /// order, and it closes when the connection does.
    pub fn start(channel: Channel) -> std::io::Result<(Arc<Self>, Receiver<Message>)> {
        let shared = Arc::new(Shared {
            channel,
            send_lock: Mutex::new(()),
            waiters: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            next_id: AtomicU16::new(1),
        });
        let (commands, receiver) = mpsc::channel();
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vfio-user-reader".into())
                .spawn(move || read_loop(&shared, &commands))?
        };
        Ok((
            Arc::new(Self {
                shared,
                reader: Mutex::new(Some(reader)),
            }),
            receiver,
        ))
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        self.shared.channel.stream()
    }

    /// Why the connection closed, if it has.
    pub fn closed_reason(&self) -> Option<CloseReason> {
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn send(
        &self,
        header: Header,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let _guard = self
            .shared
            .send_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.channel.send(header, payload, fds)
    }

    /// Sends a command and waits for its reply; an error reply becomes [`EndpointError::Remote`].
    pub fn request(
        &self,
        command: Command,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Message, EndpointError> {
        if let Some(why) = self.closed_reason() {
            return Err(EndpointError::Closed(why));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let header = Header {
            msg_id: id,
            command: command as u16,
            flags: FLAG_TYPE_COMMAND,
            ..Header::default()
        };
        let forget = || {
            self.shared
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        };
        // The reader may have closed between the first check and the registration.
        if let Some(why) = self.closed_reason() {
            forget();
            return Err(EndpointError::Closed(why));
        }
        if let Err(e) = self.send(header, payload, fds) {
            forget();
            return Err(e.into());
        }
        let reply = match rx.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                forget();
                return Err(EndpointError::Timeout(command));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(EndpointError::Closed(
                    self.closed_reason().unwrap_or(CloseReason::Unknown),
                ));
            }
        };
        if reply.header.command != command as u16 {
            return Err(EndpointError::WrongReply {
                command,
                id,
                got: reply.header.command,
            });
        }
        if reply.header.is_error() {
            return Err(EndpointError::Remote {
                command,
                // 0 and values that are no errno at all say nothing: EIO.
                errno: match i32::try_from(reply.header.error_no) {
                    Ok(errno) if errno > 0 => errno,
                    _ => libc::EIO,
                },
            });
        }
        Ok(reply)
    }

    /// Replies to `to` with `payload` and `fds` (nothing when it asked for no reply).
    pub fn reply(
        &self,
        to: &Header,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        if to.flags & crate::wire::FLAG_NO_REPLY != 0 {
            return Ok(());
        }
        let header = Header {
            msg_id: to.msg_id,
            command: to.command,
            flags: FLAG_TYPE_REPLY,
            ..Header::default()
        };
        self.send(header, payload, fds)
    }

    /// Replies to `to` with an error, unless it asked for no reply ("each command message
    /// must be replied to ... unless the message sets the No_Reply bit").
    pub fn reply_error(&self, to: &Header, errno: i32) -> Result<(), TransportError> {
        if to.flags & crate::wire::FLAG_NO_REPLY != 0 {
            return Ok(());
        }
        let header = Header {
            msg_id: to.msg_id,
            command: to.command,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error_no: errno.unsigned_abs(),
            ..Header::default()
        };
        self.send(header, &[], &[])
    }

    /// Shuts the connection down; the reader ends, the command receiver closes, and waiting
    /// requests fail.
    pub fn close(&self) {
        let _ = self
            .shared
            .channel
            .stream()
            .shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
        if let Some(reader) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = reader.join();
        }
    }
}

fn read_loop(shared: &Shared, commands: &Sender<Message>) {
    let reason = loop {
        match shared.channel.recv() {
            Ok(message) if message.header.is_reply() => {
                let waiter = shared
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&message.header.msg_id);
                // A reply nobody waits for (its request timed out) is dropped.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(message);
                }
            }
            Ok(message) => {
                if commands.send(message).is_err() {
                    break CloseReason::OwnerStopped;
                }
            }
            Err(TransportError::Closed) => break CloseReason::PeerClosed,
            Err(e) => break CloseReason::Broken(Arc::new(e)),
        }
    };
    *shared.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    // Waiting requests see their channel close.
    shared
        .waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let _ = shared.channel.stream().shutdown(std::net::Shutdown::Both);
}
