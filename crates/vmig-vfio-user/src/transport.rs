//! Framing of vfio-user messages on a UNIX stream socket: a 16-byte header whose `msg_size`
//! covers the whole message, the payload, and file descriptors passed with `SCM_RIGHTS` on the
//! same send. Everything received is checked before it is trusted: a header that lies about its
//! size, a payload cut short, too many descriptors. After such an error the stream is out of
//! step and the connection must be dropped; the error says why.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use zerocopy::IntoBytes;

use crate::sys;
use crate::wire::{HEADER_SIZE, Header};

/// Largest message accepted by default: 1 MiB of data (the default `max_data_xfer_size`) is far
/// below it, and so is a DMA logging report over 64 GiB at 4 KiB pages (2 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;
/// Descriptors accepted with one message by default (what vmig advertises as `max_msg_fds`).
pub const DEFAULT_MAX_FDS: usize = 16;

/// Why a message could not be received or sent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection between messages.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer broke the framing; the connection cannot continue.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// One message: header, payload (`msg_size - 16` bytes) and descriptors.
#[derive(Debug)]
pub struct Message {
    /// The header as received (`msg_size` matches the payload).
    pub header: Header,
    /// Everything after the header.
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// A vfio-user connection.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    max_message: usize,
    max_fds: usize,
}

impl Channel {
    /// Wraps a connected stream with the default limits.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            max_message: DEFAULT_MAX_MESSAGE,
            max_fds: DEFAULT_MAX_FDS,
        }
    }

    /// Sets the largest message and the most descriptors per message accepted.
    pub fn set_limits(&mut self, max_message: usize, max_fds: usize) {
        self.max_message = max_message.max(HEADER_SIZE);
        self.max_fds = max_fds.min(sys::SCM_MAX_FD);
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `header` (its `msg_size` is set here) with the concatenation of `payload` and the
    /// descriptors `fds`.
    pub fn send(
        &self,
        mut header: Header,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let total = HEADER_SIZE + payload.iter().map(|p| p.len()).sum::<usize>();
        header.msg_size = u32::try_from(total).map_err(|_| {
            TransportError::Malformed(format!(
                "a message of {total} bytes exceeds the 4 GiB msg_size"
            ))
        })?;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(payload.len() + 1);
        parts.push(header.as_bytes());
        parts.extend(payload.iter().copied().filter(|p| !p.is_empty()));
        let mut sent = sys::send_with_fds(self.stream.as_fd(), &parts, fds)?;
        // A stream socket may take part of a large message: send the rest without descriptors.
        let mut skip = sent;
        while sent < total {
            let mut rest: Vec<&[u8]> = Vec::new();
            for part in &parts {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    rest.push(&part[skip..]);
                    skip = 0;
                }
            }
            let n = sys::send_with_fds(self.stream.as_fd(), &rest, &[])?;
            if n == 0 {
                return Err(TransportError::Io(io::ErrorKind::WriteZero.into()));
            }
            sent += n;
            skip = n;
            parts = rest;
        }
        Ok(())
    }

    /// Receives one whole message.
    pub fn recv(&self) -> Result<Message, TransportError> {
        let mut fds = Vec::new();
        let mut head = [0u8; HEADER_SIZE];
        if !self.fill(&mut head, &mut fds, true)? {
            return Err(TransportError::Closed);
        }
        let Some(header) = crate::wire::read_struct::<Header>(&head) else {
            return Err(TransportError::Malformed("short header".into()));
        };
        let size = header.msg_size as usize;
        if size < HEADER_SIZE {
            return Err(TransportError::Malformed(format!(
                "msg_size {size} is smaller than the {HEADER_SIZE}-byte header (command {}, id {})",
                header.command, header.msg_id
            )));
        }
        if size > self.max_message {
            return Err(TransportError::Malformed(format!(
                "msg_size {size} exceeds the {} bytes this side accepts (command {}, id {})",
                self.max_message, header.command, header.msg_id
            )));
        }
        let mut payload = vec![0u8; size - HEADER_SIZE];
        self.fill(&mut payload, &mut fds, false)?;
        if fds.len() > self.max_fds {
            return Err(TransportError::Malformed(format!(
                "{} file descriptors came with one message: more file descriptors than the {} accepted",
                fds.len(),
                self.max_fds
            )));
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }

    /// Fills `buf` completely, collecting descriptors. Returns false on a clean end of stream
    /// before the first byte when `eof_ok`.
    fn fill(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        eof_ok: bool,
    ) -> Result<bool, TransportError> {
        let mut filled = 0;
        while filled < buf.len() {
            let room = self.max_fds.saturating_sub(fds.len()) + 1;
            let got = sys::recv_with_fds(self.stream.as_fd(), &mut buf[filled..], room)?;
            fds.extend(got.fds);
            if got.fds_truncated {
                return Err(TransportError::Malformed(format!(
                    "more file descriptors than the {} accepted with one message",
                    self.max_fds
                )));
            }
            if got.bytes == 0 {
                if filled == 0 && eof_ok {
                    return Ok(false);
                }
                return Err(TransportError::Malformed(format!(
                    "the stream ended {} bytes into a {}-byte read",
                    filled,
                    buf.len()
                )));
            }
            filled += got.bytes;
        }
        Ok(true)
    }
}
