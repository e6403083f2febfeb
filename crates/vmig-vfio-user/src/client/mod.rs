//! The VMM side: a client that drives any conformant vfio-user server. It negotiates the
//! version, maps guest memory for DMA, reads region info (with sparse-mmap areas and their fds),
//! wires IRQs to eventfds, accesses regions (split at the server's `max_data_xfer_size`), drives
//! v2 migration and DMA logging and v1 `DIRTY_PAGES`, and serves the server's `DMA_READ` /
//! `DMA_WRITE` from guest memory, recording the pages those writes dirty (they are the client's
//! to track: the server's dirty log never sees them).
//!
//! This file owns connecting, negotiating, the DMA-serving threads, region and IRQ access,
//! DMA maps and the v2 state commands; `info` owns what the client learns about the device
//! (and [`Client::describe`]), `dirty` the dirty-page harvests and the record of `DMA_WRITE`s,
//! and [`migration`] the one interface over both migration protocols.

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use zerocopy::IntoBytes;

use crate::caps::{self, Capabilities};
use crate::endpoint::{DEFAULT_TIMEOUT, Endpoint, EndpointError};
use crate::transport::{Channel, Message};
use crate::wire::*;
use vmig_primitives::mig_state::MigState;

mod dirty;
mod info;
pub mod migration;

pub use dirty::DMA_WRITE_PAGE;
pub use info::RegionDescription;
pub use migration::{DeviceMigration, Protocol};

/// Guest memory by IOVA, for the server's message-based DMA.
pub trait DmaMemory: Send + Sync {
    /// Reads `buf.len()` bytes at `iova`; an errno when that is not guest memory.
    fn read(&self, iova: u64, buf: &mut [u8]) -> std::result::Result<(), i32>;
    /// Writes `data` at `iova`.
    fn write(&self, iova: u64, data: &[u8]) -> std::result::Result<(), i32>;
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server answered `VFIO_USER_VERSION` with `EBUSY`: it serves another client, and
    /// serves one at a time.
    #[error(
        "vfio-user server {server} is busy: it serves another client (one client at a time); \
         try again once that client has disconnected"
    )]
    Busy {
        /// The server's socket (or what is known of an unnamed one).
        server: String,
    },
    /// The server's `VFIO_USER_VERSION` reply cannot be used.
    #[error("the server's VFIO_USER_VERSION reply cannot be used: {0}")]
    Version(#[source] caps::VersionError),
    /// A thread of the connection did not start.
    #[error("cannot start {what}: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A request this side was asked to send does not fit the message's fields.
    #[error("{command:?}: {what} ({value}) does not fit the message")]
    TooBig {
        /// The command.
        command: Command,
        /// What does not fit.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The server's reply does not follow the protocol.
    #[error("the server's reply to {command:?} is malformed: {why}")]
    Protocol {
        /// The command.
        command: Command,
        /// What was wrong.
        why: String,
    },
}

impl ClientError {
    /// The errno of a server's refusal, if this is one.
    pub fn remote_errno(&self) -> Option<i32> {
        match self {
            Self::Endpoint(EndpointError::Remote { errno, .. }) => Some(*errno),
            _ => None,
        }
    }
}

pub(super) type Result<T> = std::result::Result<T, ClientError>;

/// A connected client.
pub struct Client {
    endpoint: Arc<Endpoint>,
    /// The twin socket's endpoint, in twin-socket mode.
    twin: Option<Arc<Endpoint>>,
    server: Capabilities,
    version: Version,
    dma_written: Arc<Mutex<BTreeSet<u64>>>,
    dma_servers: Vec<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// `value` for a `u32` field of a `command` (`what` it is), refused when it does not fit.
pub(super) fn field32<T: TryInto<u32> + TryInto<u64> + Copy>(
    command: Command,
    what: &'static str,
    value: T,
) -> Result<u32> {
    TryInto::<u32>::try_into(value).map_err(|_| ClientError::TooBig {
        command,
        what,
        value: TryInto::<u64>::try_into(value).unwrap_or(u64::MAX),
    })
}

/// The length of one part of a transfer as its `u32` count.
#[expect(
    clippy::cast_possible_truncation,
    reason = "a part is at most chunk(), within this side's DEFAULT_MAX_MESSAGE (well below 4 GiB)"
)]
fn part32(len: usize) -> u32 {
    len as u32
}

/// The server at the other end of `stream`, for a message: its socket's path, when it has one.
fn server_name(stream: &UnixStream) -> String {
    match stream.peer_addr() {
        Ok(address) => match address.as_pathname() {
            Some(path) => path.display().to_string(),
            None => "at an unnamed socket".into(),
        },
        Err(_) => "at an unknown socket".into(),
    }
}

pub(super) fn protocol<T>(command: Command, why: impl Into<String>) -> Result<T> {
    Err(ClientError::Protocol {
        command,
        why: why.into(),
    })
}

impl Client {
    /// Connects to the server at `path` and negotiates; `memory` serves message-based DMA.
    pub fn connect(path: &Path, memory: Option<Arc<dyn DmaMemory>>) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::over(stream, memory)
    }

    /// Negotiates over an already connected stream, asking for twin-socket mode.
    pub fn over(stream: UnixStream, memory: Option<Arc<dyn DmaMemory>>) -> Result<Self> {
        Self::negotiate(stream, memory, true)
    }

    /// Negotiates over an already connected stream; `twin` asks for a separate socket for the
    /// server's `DMA_READ` / `DMA_WRITE` (used only if the server agrees).
    pub fn negotiate(
        stream: UnixStream,
        memory: Option<Arc<dyn DmaMemory>>,
        twin: bool,
    ) -> Result<Self> {
        let (endpoint, commands) =
            Endpoint::start(Channel::new(stream)).map_err(|source| ClientError::Thread {
                what: "the connection's reader",
                source,
            })?;
        let proposed = Version {
            major: caps::MAJOR,
            minor: caps::MINOR,
        };
        let ours = Capabilities {
            max_msg_fds: Some(u32::try_from(crate::transport::DEFAULT_MAX_FDS).unwrap_or(u32::MAX)),
            max_data_xfer_size: Some(caps::DEFAULT_MAX_DATA_XFER_SIZE),
            pgsizes: Some(vmig_primitives::PAGE_SIZE),
            max_dma_maps: Some(caps::DEFAULT_MAX_DMA_MAPS),
            migration: Some(caps::MigrationCap {
                pgsize: vmig_primitives::PAGE_SIZE,
                max_bitmap_size: Some(256 << 20),
            }),
            twin_socket: twin.then_some(caps::TwinSocket {
                supported: true,
                fd_index: None,
            }),
            ..Capabilities::default()
        };
        let payload = caps::encode(proposed.major, proposed.minor, &ours);
        let mut reply = endpoint
            .request(Command::Version, &[&payload], &[], DEFAULT_TIMEOUT)
            .map_err(|e| match e {
                EndpointError::Remote {
                    errno: libc::EBUSY, ..
                } => ClientError::Busy {
                    server: server_name(endpoint.stream()),
                },
                other => other.into(),
            })?;
        let (version, server) = caps::decode(&reply.payload).map_err(ClientError::Version)?;
        caps::check_reply(proposed, version).map_err(ClientError::Version)?;
        // Twin-socket mode: the server's commands come on the socket it passed.
        let mut twin_endpoint = None;
        let receivers = match server.twin_socket.filter(|t| t.supported) {
            Some(t) => {
                let index = t.fd_index.unwrap_or(0) as usize;
                if index >= reply.fds.len() {
                    return protocol(
                        Command::Version,
                        format!("twin socket fd_index {index} with {} fds", reply.fds.len()),
                    );
                }
                let fd = reply.fds.swap_remove(index);
                let (twin, twin_commands) = Endpoint::start(Channel::new(UnixStream::from(fd)))
                    .map_err(|source| ClientError::Thread {
                        what: "the twin socket's reader",
                        source,
                    })?;
                twin_endpoint = Some(twin);
                // A command on the main socket is still answered.
                vec![
                    (Arc::downgrade(&endpoint), commands),
                    (
                        Arc::downgrade(twin_endpoint.as_ref().unwrap_or(&endpoint)),
                        twin_commands,
                    ),
                ]
            }
            None => vec![(Arc::downgrade(&endpoint), commands)],
        };
        let dma_written = Arc::new(Mutex::new(BTreeSet::new()));
        let memory: Option<Arc<dyn DmaMemory>> = memory;
        let mut dma_servers = Vec::new();
        for (endpoint, commands) in receivers {
            let written = Arc::clone(&dma_written);
            let memory = memory.clone();
            let thread = std::thread::Builder::new()
                .name("vfio-user-client-dma".into())
                .spawn(move || {
                    for message in commands {
                        let Some(endpoint) = endpoint.upgrade() else {
                            return;
                        };
                        dirty::serve_dma(&endpoint, memory.as_deref(), &written, message);
                    }
                })
                .map_err(|source| ClientError::Thread {
                    what: "the server of DMA_READ / DMA_WRITE",
                    source,
                })?;
            dma_servers.push(thread);
        }
        Ok(Self {
            endpoint,
            twin: twin_endpoint,
            server,
            version,
            dma_written,
            dma_servers,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The server's capabilities (absent fields take the spec's defaults through the getters).
    pub fn server_caps(&self) -> &Capabilities {
        &self.server
    }

    /// The negotiated version.
    pub fn version(&self) -> Version {
        self.version
    }

    fn call(&self, command: Command, payload: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<Message> {
        Ok(self.endpoint.request(command, payload, fds, self.timeout)?)
    }

    /// Wires vectors `start..` of IRQ `index` to `eventfds` (empty: de-assign `count` vectors).
    pub fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        count: u32,
        eventfds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let set = SetIrqs {
            argsz: size32::<SetIrqs>(),
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
        };
        self.call(Command::DeviceSetIrqs, &[set.as_bytes()], eventfds)?;
        Ok(())
    }

    /// Masks or unmasks vectors of IRQ `index`.
    pub fn mask_irqs(&self, index: u32, start: u32, count: u32, mask: bool) -> Result<()> {
        let set = SetIrqs {
            argsz: size32::<SetIrqs>(),
            flags: IRQ_SET_DATA_NONE
                | if mask {
                    IRQ_SET_ACTION_MASK
                } else {
                    IRQ_SET_ACTION_UNMASK
                },
            index,
            start,
            count,
        };
        self.call(Command::DeviceSetIrqs, &[set.as_bytes()], &[])?;
        Ok(())
    }

    /// Bytes per transfer: what the server accepts, within what this side receives.
    pub(crate) fn chunk(&self) -> usize {
        let own = crate::transport::DEFAULT_MAX_MESSAGE - (1 << 16);
        usize::try_from(self.server.max_data_xfer_size())
            .unwrap_or(usize::MAX)
            .clamp(1, own)
    }

    /// Reads region `index` at `offset`, in transfers the server accepts.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let chunk = self.chunk();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let access = RegionAccess {
                offset: offset + (i * chunk) as u64,
                region: index,
                count: part32(part.len()),
            };
            let reply = self.call(Command::RegionRead, &[access.as_bytes()], &[])?;
            let data = reply
                .payload
                .get(size_of::<RegionAccess>()..)
                .unwrap_or(&[]);
            if data.len() != part.len() {
                return protocol(
                    Command::RegionRead,
                    format!("{} bytes for a read of {}", data.len(), part.len()),
                );
            }
            part.copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes region `index` at `offset`, in transfers the server accepts.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let chunk = self.chunk();
        for (i, part) in data.chunks(chunk).enumerate() {
            let access = RegionAccess {
                offset: offset + (i * chunk) as u64,
                region: index,
                count: part32(part.len()),
            };
            self.call(Command::RegionWrite, &[access.as_bytes(), part], &[])?;
        }
        Ok(())
    }

    /// `DMA_MAP` of `[iova, iova+size)`: with `fd` (and its offset) the server maps the memory;
    /// without, it uses `DMA_READ` / `DMA_WRITE` messages.
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        flags: u32,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<()> {
        let map = DmaMap {
            argsz: size32::<DmaMap>(),
            flags,
            offset: fd.map_or(0, |(_, offset)| offset),
            addr: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|(fd, _)| *fd).collect();
        self.call(Command::DmaMap, &[map.as_bytes()], &fds)?;
        Ok(())
    }

    /// `DMA_UNMAP` of exactly one earlier mapping.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let unmap = DmaUnmap {
            argsz: size32::<DmaUnmap>(),
            flags: 0,
            addr: iova,
            size,
        };
        self.call(Command::DmaUnmap, &[unmap.as_bytes()], &[])?;
        Ok(())
    }

    /// `DMA_UNMAP` of every mapping.
    pub fn dma_unmap_all(&self) -> Result<()> {
        let unmap = DmaUnmap {
            argsz: size32::<DmaUnmap>(),
            flags: DMA_UNMAP_FLAG_ALL,
            addr: 0,
            size: 0,
        };
        self.call(Command::DmaUnmap, &[unmap.as_bytes()], &[])?;
        Ok(())
    }

    /// `DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    fn feature(&self, flags: u32, data: &[u8], reply_data: usize) -> Result<Vec<u8>> {
        let head = DeviceFeature {
            argsz: field32(
                Command::DeviceFeature,
                "the feature's size",
                size_of::<DeviceFeature>() + reply_data.max(data.len()),
            )?,
            flags,
        };
        let reply = self.call(Command::DeviceFeature, &[head.as_bytes(), data], &[])?;
        Ok(reply
            .payload
            .get(size_of::<DeviceFeature>()..)
            .unwrap_or(&[])
            .to_vec())
    }

    /// The v2 migration flags (`STOP_COPY`, `PRE_COPY`), or `None` when the device has no v2
    /// migration.
    pub fn migration_flags(&self) -> Result<Option<u64>> {
        match self.feature(FEATURE_MIGRATION | FEATURE_GET, &[], 8) {
            Ok(data) => match read_struct::<u64>(&data) {
                Some(flags) => Ok(Some(flags)),
                None => protocol(
                    Command::DeviceFeature,
                    "MIGRATION data shorter than 8 bytes",
                ),
            },
            Err(e) if e.remote_errno().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the server supports a feature (`PROBE`).
    pub fn probe_feature(&self, feature: u32, op: u32) -> Result<bool> {
        match self.feature(feature | op | FEATURE_PROBE, &[], 0) {
            Ok(_) => Ok(true),
            Err(e) if e.remote_errno().is_some() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The device's v2 migration state.
    pub fn mig_state(&self) -> Result<MigState> {
        let data = self.feature(FEATURE_MIG_DEVICE_STATE | FEATURE_GET, &[], 8)?;
        state_from(&data)
    }

    /// Moves the device to `state`; returns the state it reports after.
    pub fn set_mig_state(&self, state: MigState) -> Result<MigState> {
        let request = MigDeviceState {
            device_state: state as u32,
            data_fd: u32::MAX,
        };
        let data = self.feature(
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            request.as_bytes(),
            8,
        )?;
        state_from(&data)
    }

    /// One `MIG_DATA_READ` of up to `max` bytes (fewer: the end of what the device has now).
    pub fn mig_data_read(&self, max: usize) -> Result<Vec<u8>> {
        let size = part32(max.min(self.chunk()));
        let head = MigData {
            argsz: 8 + size,
            size,
        };
        let reply = self.call(Command::MigDataRead, &[head.as_bytes()], &[])?;
        let Some(got) = read_struct::<MigData>(&reply.payload) else {
            return protocol(Command::MigDataRead, "shorter than 8 bytes");
        };
        // libvfio-user pads its reply: trust `size`, not the message length.
        match reply.payload.get(8..8 + got.size as usize) {
            Some(data) if got.size <= size => Ok(data.to_vec()),
            _ => protocol(
                Command::MigDataRead,
                format!("size {} for a read of {size}", got.size),
            ),
        }
    }

    /// Reads the device's migration data until the end of what it has now.
    pub fn mig_data_read_all(&self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let chunk = self.chunk();
            let part = self.mig_data_read(chunk)?;
            let done = part.len() < chunk;
            all.extend_from_slice(&part);
            if done {
                return Ok(all);
            }
        }
    }

    /// Writes migration data to a device in RESUMING.
    pub fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        for part in data.chunks(self.chunk()) {
            let head = MigData {
                argsz: 8 + part32(part.len()),
                size: part32(part.len()),
            };
            self.call(Command::MigDataWrite, &[head.as_bytes(), part], &[])?;
        }
        Ok(())
    }

    /// Closes the connection.
    pub fn close(mut self) {
        self.shutdown();
    }

    /// Whether the server's DMA commands come on a twin socket.
    pub fn twin_socket(&self) -> bool {
        self.twin.is_some()
    }

    fn shutdown(&mut self) {
        self.endpoint.close();
        if let Some(twin) = &self.twin {
            twin.close();
        }
        for thread in self.dma_servers.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn state_from(data: &[u8]) -> Result<MigState> {
    let Some(state) = read_struct::<MigDeviceState>(data) else {
        return protocol(
            Command::DeviceFeature,
            "MIG_DEVICE_STATE data shorter than 8 bytes",
        );
    };
    MigState::from_u32(state.device_state).map_or_else(
        || {
            protocol(
                Command::DeviceFeature,
                format!("device state {}", state.device_state),
            )
        },
        Ok,
    )
}
