//! The device-server framework: a device author implements [`Device`] and gets a vfio-user
//! server with DMA through a `vmig-dma` IOMMU (so every DMA write is dirty-tracked), IRQs through
//! eventfds, the v2 migration state machine with its data stream, the v1 migration region, and
//! v2 DMA logging and v1 `DIRTY_PAGES` over the same IOMMU.
//!
//! One client is served at a time, and a connection that arrives meanwhile is refused at once
//! with `EBUSY` (`admission` has the policy). When the served client disconnects, the server
//! drops every DMA mapping, IRQ eventfd and dirty log, keeps the device and its migration
//! state, and serves the next client (vfio-user-spec.rst: the server "must retain device
//! state").
//!
//! This file owns serving one client: the version negotiation, the command loop and its
//! dispatch, and the region commands; each other concern has its file:
//!
//! | file | owns |
//! |---|---|
//! | `admission` | [`Server::run`]: accepting, which connection is served, refusing the others |
//! | `device` | the [`Device`] trait, its spec and context, the one [`Refusal`] |
//! | `direct` | [`DirectSession`]: a session without a connection, for fuzzing and tests |
//! | [`request`] | decoding and checking every command a client sends |
//! | `dma` | `DMA_MAP` / `DMA_UNMAP` into the IOMMU, message-based DMA to the client |
//! | `irqs` | IRQ info, `SET_IRQS`, the eventfds and masks |
//! | [`pci`] | a device's PCI config space, its capabilities, MSI-X table and interrupt rules |
//! | [`migration_v2`] | `MIGRATION`, `MIG_DEVICE_STATE`, `MIG_DATA_*`, the record stream |
//! | [`migration_v1`] | the v1 migration region: its rules and its accesses |
//! | `dirty` | v2 DMA logging and v1 `DIRTY_PAGES` |

mod admission;
mod device;
mod direct;
mod dirty;
mod dma;
mod irqs;
pub mod migration_v1;
pub mod migration_v2;
pub mod pci;
pub mod request;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmig_dma::{Iommu, IommuConfig};
use zerocopy::IntoBytes;

use crate::caps::{self, Capabilities};
use crate::endpoint::{CloseReason, Endpoint};
use crate::transport::{Channel, Message, TransportError};
use crate::wire::*;
use dma::{ClientMemory, Dma};
use irqs::Irqs;
use migration_v2::Migration;
use request::Request;
use vmig_dma::uapi::device_state;
use vmig_primitives::PAGE_SIZE;
use vmig_primitives::mig_state::MigState;

pub use admission::MAX_REFUSING;
pub use device::{
    Device, DeviceContext, DeviceSpec, IrqSpec, MigrationSupport, Refusal, RegionMmap, RegionSpec,
};
pub use direct::DirectSession;
pub use dirty::MAX_BITMAP_BYTES;
pub use dma::ClientDmaError;
pub use migration_v2::MAX_MIGRATION_STREAM;
pub use pci::{Bar, BarKind, InterruptMode, MsiSpec, MsixSpec, PciFunction, PciSpec, PciSpecError};

/// Why serving a client ended other than by its leaving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener failed.
    #[error("the listening socket failed: {0}")]
    Listen(#[source] std::io::Error),
    /// The connection's reader thread did not start.
    #[error("cannot start the connection's reader: {0}")]
    Reader(#[source] std::io::Error),
    /// The client sent nothing within the time it has for `VFIO_USER_VERSION`
    /// ([`ServerConfig::version_timeout`]).
    #[error("no VFIO_USER_VERSION within {0:?}")]
    NoVersion(Duration),
    /// The client closed the connection without sending anything.
    #[error("the client left before sending VFIO_USER_VERSION")]
    LeftBeforeVersion,
    /// The client's first message was another command.
    #[error("the first message was command {0}, not VFIO_USER_VERSION")]
    NotVersion(u16),
    /// The client's `VFIO_USER_VERSION` did not decode.
    #[error("the client's VFIO_USER_VERSION is malformed: {0}")]
    MalformedVersion(#[source] Refusal),
    /// No version and capabilities both sides accept.
    #[error("the version negotiation failed: {0}")]
    Negotiation(#[source] caps::VersionError),
    /// The twin socket could not be created.
    #[error("cannot create the twin socket: {0}")]
    TwinSocket(#[source] std::io::Error),
    /// The connection's IOMMU could not be created.
    #[error("cannot create the connection's IOMMU: {0}")]
    Iommu(#[source] vmig_dma::DmaError),
    /// A reply could not be sent.
    #[error("cannot send a reply to the client: {0}")]
    Reply(#[source] TransportError),
    /// The connection broke (the client's leaving is not an error).
    #[error("the connection to the client broke: {0}")]
    Broken(#[source] CloseReason),
}

/// A flag set by SIGTERM or SIGINT, for [`Server::run`]: the server stops cleanly instead of
/// dying mid-command.
pub fn stop_on_termination() -> std::io::Result<&'static AtomicBool> {
    crate::sys::termination_flag()
}

/// Server limits and capabilities.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What the server accepts as one transfer.
    pub max_data_xfer_size: u64,
    /// Descriptors accepted with one message.
    pub max_msg_fds: u32,
    /// How long a client that is to be served has to send `VFIO_USER_VERSION` after it
    /// connected; it is dropped after that (10 s).
    pub version_timeout: Duration,
    /// How long a connection that arrives while another client is served has to send its
    /// first message, which is answered with `EBUSY` (2 s); it is closed unanswered after that.
    pub busy_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_data_xfer_size: caps::DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
            version_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(2),
        }
    }
}

/// Serves one device.
pub struct Server<D: Device> {
    device: Mutex<D>,
    config: ServerConfig,
    migration: Mutex<Migration>,
}

/// State of one connection.
struct Session {
    dma: Arc<Dma>,
    irqs: Arc<Irqs>,
    spec: DeviceSpec,
    /// v2 DMA logging page size, while logging.
    logging: Option<u64>,
}

impl<D: Device> Server<D> {
    /// A server for `device`.
    pub fn new(device: D, config: ServerConfig) -> Self {
        let size = migration_v1::DATA_OFFSET + migration_v1::DATA_SIZE;
        let v1_region = (device.migration() == MigrationSupport::V1)
            .then(|| {
                let fd = vmig_primitives::memfd("vfio-user-migration", size).ok()?;
                let memory = vmig_primitives::HostMemory::map_fd(fd.as_fd(), 0, size, true).ok()?;
                Some((Arc::new(fd), memory))
            })
            .flatten();
        Self {
            device: Mutex::new(device),
            config,
            migration: Mutex::new(Migration {
                state: MigState::Running,
                stream: Vec::new(),
                read_at: 0,
                v1_state: device_state::RUNNING,
                v1_prepared: None,
                v1_region,
            }),
        }
    }

    /// The device's spec, with region 7 sized to its PCI function's config space, and the
    /// v1 migration region added at index 9 for a v1 device.
    fn full_spec(&self) -> DeviceSpec {
        let mut spec = self.device().spec();
        if let Some(pci) = &spec.config_space {
            let index = vmig_primitives::uapi::VFIO_PCI_CONFIG_REGION_INDEX as usize;
            if spec.regions.len() <= index {
                spec.regions.resize(index + 1, RegionSpec::default());
            }
            spec.regions[index] = RegionSpec {
                size: pci.config_size(),
                readable: true,
                writable: true,
                ..RegionSpec::default()
            };
            spec.pci = true;
        }
        let migration = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((fd, _)) = &migration.v1_region {
            let index = migration_v1::MIGRATION_REGION_INDEX as usize;
            spec.regions.resize(index, RegionSpec::default());
            spec.regions.push(RegionSpec {
                size: migration_v1::DATA_OFFSET + migration_v1::DATA_SIZE,
                readable: true,
                writable: true,
                mmap: Some(RegionMmap {
                    fd: Arc::clone(fd),
                    offset: 0,
                    areas: vec![(migration_v1::DATA_OFFSET, migration_v1::DATA_SIZE)],
                }),
                region_type: Some((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION)),
            });
        }
        spec
    }

    /// The device (for tests and for the owner's inspection).
    pub fn device(&self) -> MutexGuard<'_, D> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The v2 migration state.
    pub fn migration_state(&self) -> MigState {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
    }

    fn migration(&self) -> MutexGuard<'_, Migration> {
        self.migration.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Negotiates the version with the client whose first message is `first`; returns the
    /// client's capabilities and, in twin-socket mode, the endpoint of the twin socket.
    fn negotiate(
        &self,
        endpoint: &Endpoint,
        first: crate::Message,
    ) -> Result<(Capabilities, Option<Arc<Endpoint>>), ServeError> {
        let header = first.header;
        let (version, client) = match request::decode(first, self.config.max_data_xfer_size) {
            Ok(Request::Version { version, caps }) => (version, caps),
            Ok(_) => {
                let _ = endpoint.reply_error(&header, libc::EINVAL);
                return Err(ServeError::NotVersion(header.command));
            }
            Err(e) => {
                let _ = endpoint.reply_error(&header, e.errno);
                return Err(ServeError::MalformedVersion(e));
            }
        };
        let offered = Capabilities {
            max_msg_fds: Some(self.config.max_msg_fds),
            max_data_xfer_size: Some(self.config.max_data_xfer_size),
            pgsizes: Some(PAGE_SIZE),
            max_dma_maps: Some(vmig_dma::DEFAULT_DMA_ENTRY_LIMIT),
            // The capability offers DIRTY_PAGES bitmaps: not for a device whose DMA is not
            // tracked.
            migration: self.device().logs_dma().then_some(caps::MigrationCap {
                pgsize: PAGE_SIZE,
                max_bitmap_size: Some(MAX_BITMAP_BYTES),
            }),
            twin_socket: Some(caps::TwinSocket {
                supported: true,
                fd_index: Some(0),
            }),
            ..Capabilities::default()
        };
        let (v, answer) = match caps::answer(version, &client, &offered) {
            Ok(agreed) => agreed,
            Err(e) => {
                let _ = endpoint.reply_error(&header, libc::EINVAL);
                return Err(ServeError::Negotiation(e));
            }
        };
        let payload = caps::encode(v.major, v.minor, &answer);
        if !answer.twin_socket() {
            endpoint
                .reply(&header, &[&payload], &[])
                .map_err(ServeError::Reply)?;
            return Ok((client, None));
        }
        // Server-to-client commands get their own socket; the client's end travels with the
        // reply.
        let (ours, theirs) = UnixStream::pair().map_err(ServeError::TwinSocket)?;
        endpoint
            .reply(&header, &[&payload], &[theirs.as_fd()])
            .map_err(ServeError::Reply)?;
        let (twin, _commands) = Endpoint::start(Channel::new(ours)).map_err(ServeError::Reader)?;
        Ok((client, Some(twin)))
    }

    /// Serves one client until it disconnects (or breaks the protocol, or `stop` is set). It
    /// has [`ServerConfig::version_timeout`] to send `VFIO_USER_VERSION`.
    pub fn serve(&self, stream: UnixStream, stop: &AtomicBool) -> Result<(), ServeError> {
        let (endpoint, commands) = self.start_endpoint(stream)?;
        match first_message(&endpoint, &commands, self.config.version_timeout, stop)? {
            Some(first) => self.serve_from(endpoint, commands, first, stop),
            None => Ok(()),
        }
    }

    /// The endpoint of a new connection, with this server's limits on what it receives.
    fn start_endpoint(
        &self,
        stream: UnixStream,
    ) -> Result<(Arc<Endpoint>, Receiver<Message>), ServeError> {
        let mut channel = Channel::new(stream);
        channel.set_limits(
            usize::try_from(self.config.max_data_xfer_size)
                .unwrap_or(usize::MAX)
                .saturating_add(1 << 16),
            self.config.max_msg_fds as usize,
        );
        Endpoint::start(channel).map_err(ServeError::Reader)
    }

    /// Serves the client of `endpoint`, whose first message (which must be the version) is
    /// `first`, until it disconnects (or breaks the protocol, or `stop` is set).
    fn serve_from(
        &self,
        endpoint: Arc<Endpoint>,
        commands: Receiver<Message>,
        first: Message,
        stop: &AtomicBool,
    ) -> Result<(), ServeError> {
        let (client_caps, twin_endpoint) = self.negotiate(&endpoint, first)?;
        let mut session = self.open_session(ClientMemory {
            endpoint: Arc::downgrade(twin_endpoint.as_ref().unwrap_or(&endpoint)),
            // The replies to our DMA_READs must fit what this side accepts too.
            max_xfer: usize::try_from(
                client_caps
                    .max_data_xfer_size()
                    .min(self.config.max_data_xfer_size)
                    .max(1),
            )
            .unwrap_or(usize::MAX),
        })?;
        let outcome = loop {
            if stop.load(Ordering::Acquire) {
                break Ok(());
            }
            let message = match commands.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    break match endpoint.closed_reason() {
                        None | Some(CloseReason::PeerClosed) => Ok(()),
                        Some(why) => Err(ServeError::Broken(why)),
                    };
                }
            };
            let header = message.header;
            let result = request::decode(message, self.config.max_data_xfer_size)
                .and_then(|request| self.handle(&mut session, request));
            let sent = match result {
                Ok(Reply { payload, fds }) => {
                    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    endpoint.reply(&header, &[&payload], &fds)
                }
                Err(e) => endpoint.reply_error(&header, e.errno),
            };
            if let Err(e) = sent {
                break Err(ServeError::Reply(e));
            }
        };
        // The client is gone: close both sockets first (a DMA in flight fails at once rather
        // than waiting for its timeout), then the device stops using DMA, then mappings and
        // IRQs go with the session.
        endpoint.close();
        if let Some(twin) = twin_endpoint {
            twin.close();
        }
        self.device().disconnect();
        drop(session);
        outcome
    }

    /// A new session whose message-based DMA goes to `client`: a fresh IOMMU, the IRQs of the
    /// device's spec, and the device connected to both.
    fn open_session(&self, client: ClientMemory) -> Result<Session, ServeError> {
        let iommu = Arc::new(Iommu::new(IommuConfig::default()).map_err(ServeError::Iommu)?);
        let spec = self.full_spec();
        let session = Session {
            dma: Arc::new(Dma {
                iommu,
                client: Arc::new(client),
            }),
            irqs: Arc::new(Irqs::new(&spec.irqs)),
            spec,
            logging: None,
        };
        self.device().connect(DeviceContext {
            dma: Arc::clone(&session.dma),
            irqs: Arc::clone(&session.irqs),
            pci: session.spec.config_space.clone(),
        });
        Ok(session)
    }

    fn handle(&self, s: &mut Session, request: Request) -> Result<Reply, Refusal> {
        match request {
            Request::Version { .. } => {
                Err(Refusal::invalid("VFIO_USER_VERSION was already negotiated"))
            }
            Request::DmaMap { map, fd } => dma::dma_map(s, map, fd),
            Request::DmaUnmap { unmap, bitmap } => dma::dma_unmap(s, unmap, bitmap),
            Request::GetInfo => {
                let info = DeviceInfo {
                    argsz: size32::<DeviceInfo>(),
                    flags: (if s.spec.reset { DEVICE_FLAGS_RESET } else { 0 })
                        | (if s.spec.pci { DEVICE_FLAGS_PCI } else { 0 }),
                    num_regions: field32(s.spec.regions.len(), "the number of regions")?,
                    num_irqs: field32(s.spec.irqs.len(), "the number of IRQ indices")?,
                };
                Ok(Reply::data(info.as_bytes().to_vec()))
            }
            Request::GetRegionInfo { argsz, index } => region_info(&s.spec, argsz, index),
            Request::GetRegionIoFds { index, .. } => {
                region(&s.spec, index)?;
                let head = RegionIoFds {
                    argsz: size32::<RegionIoFds>(),
                    flags: 0,
                    index,
                    count: 0,
                };
                Ok(Reply::data(head.as_bytes().to_vec()))
            }
            Request::GetIrqInfo { index } => irqs::irq_info(s, index),
            Request::SetIrqs { set, bools, fds } => irqs::set_irqs(s, set, &bools, fds),
            Request::RegionRead(access) if self.is_v1_region(s, access.region) => {
                check_access(region(&s.spec, access.region)?, access, false)?;
                let mut data = vec![0u8; access.count as usize];
                self.v1_read(access.offset, &mut data)?;
                Ok(Reply::data([access.as_bytes(), &data].concat()))
            }
            Request::RegionWrite { access, data } if self.is_v1_region(s, access.region) => {
                check_access(region(&s.spec, access.region)?, access, true)?;
                self.v1_write(access.offset, &data)?;
                Ok(Reply::data(access.as_bytes().to_vec()))
            }
            Request::RegionRead(access) => {
                let spec = region(&s.spec, access.region)?;
                check_access(spec, access, false)?;
                let mut data = vec![0u8; access.count as usize];
                self.read_region(s, access.region, access.offset, &mut data)?;
                Ok(Reply::data([access.as_bytes(), &data].concat()))
            }
            Request::RegionWrite { access, data } => {
                let spec = region(&s.spec, access.region)?;
                check_access(spec, access, true)?;
                self.write_region(s, access.region, access.offset, &data)?;
                Ok(Reply::data(access.as_bytes().to_vec()))
            }
            Request::RegionWriteMulti(writes) => {
                for w in &writes {
                    let access = RegionAccess {
                        offset: w.offset,
                        region: w.region,
                        count: w.count,
                    };
                    let spec = region(&s.spec, w.region)?;
                    check_access(spec, access, true)?;
                    let data = &w.data[..w.count as usize];
                    if self.is_v1_region(s, w.region) {
                        self.v1_write(w.offset, data)?;
                    } else {
                        self.write_region(s, w.region, w.offset, data)?;
                    }
                }
                Ok(Reply::data((writes.len() as u64).to_le_bytes().to_vec()))
            }
            Request::Reset => {
                if !s.spec.reset {
                    return Err(Refusal::new(
                        libc::ENOTTY,
                        "the device does not support reset",
                    ));
                }
                self.device().reset()?;
                if let Some(pci) = &s.spec.config_space {
                    pci.reset();
                }
                let mut m = self.migration();
                // Reset is the way out of ERROR (and out of any migration state).
                m.state = MigState::Running;
                m.v1_state = (m.v1_state & !device_state::MASK) | device_state::RUNNING;
                m.discard();
                Ok(Reply::empty())
            }
            Request::DirtyPages { .. } if !self.device().logs_dma() => Err(untracked_dma()),
            Request::DirtyPages {
                argsz,
                flags,
                range,
            } => dirty::dirty_pages(s, argsz, flags, range),
            Request::Feature { argsz, flags, data } => self.feature(s, argsz, flags, &data),
            Request::MigDataRead { size } => self.mig_data_read(size),
            Request::MigDataWrite(data) => self.mig_data_write(&data),
        }
    }

    /// Reads a device region: config space and the MSI-X table and PBA from the PCI
    /// function when the device has one, the rest from the device.
    fn read_region(
        &self,
        s: &Session,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), Refusal> {
        if let Some(pci) = &s.spec.config_space {
            if index == vmig_primitives::uapi::VFIO_PCI_CONFIG_REGION_INDEX {
                pci.config_read(offset, data);
                return Ok(());
            }
            if pci.claims(index, offset, data.len())? {
                pci.bar_read(index, offset, data);
                return Ok(());
            }
        }
        self.device().region_read(index, offset, data)
    }

    /// Writes a device region, routed as [`Server::read_region`] routes reads.
    fn write_region(
        &self,
        s: &Session,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Refusal> {
        if let Some(pci) = &s.spec.config_space {
            if index == vmig_primitives::uapi::VFIO_PCI_CONFIG_REGION_INDEX {
                pci.config_write(offset, data, &s.irqs);
                return Ok(());
            }
            if pci.claims(index, offset, data.len())? {
                pci.bar_write(index, offset, data, &s.irqs);
                return Ok(());
            }
        }
        self.device().region_write(index, offset, data)
    }

    /// `DEVICE_FEATURE`: migration features to [`migration_v2`], logging to `dirty`.
    fn feature(
        &self,
        s: &mut Session,
        argsz: u32,
        flags: u32,
        data: &[u8],
    ) -> Result<Reply, Refusal> {
        let feature = flags & FEATURE_MASK;
        let pre_copy = match self.device().migration() {
            MigrationSupport::V2 { pre_copy } => Some(pre_copy),
            _ => None,
        };
        match (feature, pre_copy) {
            (FEATURE_MIGRATION | FEATURE_MIG_DEVICE_STATE, None) => Err(Refusal::new(
                libc::ENOTTY,
                "this device does not support v2 migration",
            )),
            (FEATURE_MIGRATION | FEATURE_MIG_DEVICE_STATE, Some(pre_copy)) => {
                self.migration_feature(argsz, flags, data, pre_copy)
            }
            (
                FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP | FEATURE_DMA_LOGGING_REPORT,
                _,
            ) if !self.device().logs_dma() => Err(untracked_dma()),
            (
                FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP | FEATURE_DMA_LOGGING_REPORT,
                _,
            ) => dirty::logging_feature(s, argsz, flags, data),
            _ => Err(Refusal::new(
                libc::ENOTTY,
                format!("feature {feature} is not supported"),
            )),
        }
    }
}

/// The refusal of DMA logging and `DIRTY_PAGES` for a device whose DMA nothing tracks.
fn untracked_dma() -> Refusal {
    Refusal::new(
        libc::ENOTTY,
        "this device's DMA is not tracked: it offers neither DMA logging nor DIRTY_PAGES",
    )
}

/// The first message of the connection of `endpoint`, waited for at most `patience`; `None`
/// when `stop` is set meanwhile.
fn first_message(
    endpoint: &Endpoint,
    commands: &Receiver<Message>,
    patience: Duration,
    stop: &AtomicBool,
) -> Result<Option<Message>, ServeError> {
    let deadline = Instant::now() + patience;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ServeError::NoVersion(patience));
        }
        match commands.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(first) => return Ok(Some(first)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(match endpoint.closed_reason() {
                    None | Some(CloseReason::PeerClosed) => ServeError::LeftBeforeVersion,
                    Some(why) => ServeError::Broken(why),
                });
            }
        }
    }
}

/// The reply to a `DEVICE_FEATURE`: its header with `argsz` for `payload`, then `payload`.
fn feature_echo(flags: u32, payload: &[u8]) -> Result<Reply, Refusal> {
    let head = DeviceFeature {
        argsz: field32(
            size_of::<DeviceFeature>() + payload.len(),
            "a DEVICE_FEATURE reply",
        )?,
        flags,
    };
    Ok(Reply::data([head.as_bytes(), payload].concat()))
}

/// `value` for a `u32` field of a reply (`what` it is), refused with `E2BIG` when it does not
/// fit.
fn field32<T: TryInto<u32> + Copy + std::fmt::Display>(
    value: T,
    what: &str,
) -> Result<u32, Refusal> {
    value.try_into().map_err(|_| {
        Refusal::new(
            libc::E2BIG,
            format!("{what} ({value}) does not fit the reply's 32-bit field"),
        )
    })
}

/// Refuses operations (`GET`, `SET`, `PROBE` bits in `op`) that `feature` does not permit.
fn check_ops(feature: u32, op: u32, permitted: u32) -> Result<(), Refusal> {
    if op & !permitted != 0 {
        return Err(Refusal::invalid(format!(
            "feature {feature} does not support flags {op:#x}"
        )));
    }
    Ok(())
}

/// A successful reply's payload and descriptors.
pub(super) struct Reply {
    payload: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl Reply {
    pub(super) fn empty() -> Self {
        Self {
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }

    pub(super) fn data(payload: Vec<u8>) -> Self {
        Self {
            payload,
            fds: Vec::new(),
        }
    }
}

pub(super) fn need_room(argsz: u32, needed: u32) -> Result<(), Refusal> {
    if argsz < needed {
        return Err(Refusal::invalid(format!(
            "argsz {argsz} has no room for the {needed}-byte reply"
        )));
    }
    Ok(())
}

fn region(spec: &DeviceSpec, index: u32) -> Result<&RegionSpec, Refusal> {
    spec.regions
        .get(index as usize)
        .filter(|r| r.size > 0)
        .ok_or_else(|| Refusal::invalid(format!("region {index} does not exist")))
}

fn check_access(spec: &RegionSpec, access: RegionAccess, write: bool) -> Result<(), Refusal> {
    let end = access.offset.checked_add(u64::from(access.count));
    if end.is_none_or(|e| e > spec.size) {
        return Err(Refusal::invalid(format!(
            "[{:#x}, +{:#x}) is outside region {} of {:#x} bytes",
            access.offset, access.count, access.region, spec.size
        )));
    }
    if (write && !spec.writable) || (!write && !spec.readable) {
        return Err(Refusal::invalid(format!(
            "region {} cannot be {}",
            access.region,
            if write { "written" } else { "read" }
        )));
    }
    Ok(())
}

fn region_info(spec: &DeviceSpec, argsz: u32, index: u32) -> Result<Reply, Refusal> {
    // A region the device lacks (an unused BAR) answers size 0, as the kernel and
    // libvfio-user do; only an index past the count is an error.
    let r = spec.regions.get(index as usize).ok_or_else(|| {
        Refusal::invalid(format!(
            "region {index}: the device has {}",
            spec.regions.len()
        ))
    })?;
    let mut caps = Vec::new();
    let base = size_of::<RegionInfo>();
    if let Some((type_, subtype)) = r.region_type {
        let header = CapHeader {
            id: REGION_INFO_CAP_TYPE,
            version: 1,
            next: 0,
        };
        caps.push([header.as_bytes(), RegionType { type_, subtype }.as_bytes()].concat());
    }
    if let Some(mmap) = r.mmap.as_ref().filter(|m| !m.areas.is_empty()) {
        let header = CapHeader {
            id: REGION_INFO_CAP_SPARSE_MMAP,
            version: 1,
            next: 0,
        };
        let mut cap = [
            header.as_bytes(),
            SparseMmap {
                nr_areas: field32(mmap.areas.len(), "the number of sparse areas")?,
                reserved: 0,
            }
            .as_bytes(),
        ]
        .concat();
        for &(offset, size) in &mmap.areas {
            cap.extend_from_slice(SparseArea { offset, size }.as_bytes());
        }
        caps.push(cap);
    }
    // Chain the capabilities: each `next` is its successor's offset from the info's start.
    let mut tail = Vec::new();
    let mut offset = base;
    let count = caps.len();
    for (i, mut cap) in caps.into_iter().enumerate() {
        let next = if i + 1 < count {
            field32(offset + cap.len(), "a capability offset")?
        } else {
            0
        };
        cap[4..8].copy_from_slice(&next.to_le_bytes());
        offset += cap.len();
        tail.extend_from_slice(&cap);
    }
    let needed = field32(base + tail.len(), "the region info's size")?;
    let mut flags = (if r.readable { REGION_INFO_FLAG_READ } else { 0 })
        | (if r.writable {
            REGION_INFO_FLAG_WRITE
        } else {
            0
        })
        | (if r.mmap.is_some() {
            REGION_INFO_FLAG_MMAP
        } else {
            0
        });
    let fits = argsz >= needed;
    // The spec: "VFIO_REGION_INFO_FLAG_CAPS indicates additional capabilities found in the
    // reply". A reply too short for them says only, by its argsz, how much room they need
    // (as libvfio-user answers); the kernel's vfio-pci sets the flag with cap_offset 0
    // instead, which QEMU's vfio-user client refuses ("failed to get region 2 info").
    if fits && !tail.is_empty() {
        flags |= REGION_INFO_FLAG_CAPS;
    }
    let info = RegionInfo {
        argsz: needed,
        flags,
        index,
        cap_offset: if fits && !tail.is_empty() {
            field32(base, "the capability offset")?
        } else {
            0
        },
        size: r.size,
        offset: r.mmap.as_ref().map_or(0, |m| m.offset),
    };
    if !fits {
        // The client retries with room for the capabilities; the fd comes with that reply.
        return Ok(Reply::data(info.as_bytes().to_vec()));
    }
    Ok(Reply {
        payload: [info.as_bytes(), &tail].concat(),
        fds: r.mmap.iter().map(|m| Arc::clone(&m.fd)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BAR with a sparse-mmap capability, as the dma-engine's BAR0 has one for its doorbell
    /// page.
    fn spec_with_sparse_bar() -> DeviceSpec {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        DeviceSpec {
            pci: true,
            config_space: None,
            reset: true,
            regions: vec![RegionSpec {
                size: 0x4000,
                readable: true,
                writable: true,
                mmap: Some(RegionMmap {
                    fd: Arc::new(fd),
                    offset: 0,
                    areas: vec![(0x1000, 0x1000)],
                }),
                region_type: None,
            }],
            irqs: Vec::new(),
        }
    }

    /// vfio-user spec, `VFIO_USER_DEVICE_GET_REGION_INFO`: "``VFIO_REGION_INFO_FLAG_CAPS``
    /// indicates additional capabilities found in the reply", and "[argsz] may be larger than
    /// the requested maximum size: in that case, the full payload is not included in the reply,
    /// but the ``argsz`` field in the reply indicates the needed size". QEMU 11's client
    /// refuses a CAPS flag whose cap_offset lies outside the reply.
    #[test]
    fn a_reply_too_short_for_the_capabilities_says_their_size_without_the_caps_flag() {
        let spec = spec_with_sparse_bar();
        let short = region_info(&spec, size32::<RegionInfo>(), 0).unwrap();
        let info = read_struct::<RegionInfo>(&short.payload).unwrap();
        let needed = size32::<RegionInfo>() + 8 + 8 + 16;
        assert_eq!(info.argsz, needed);
        assert_eq!(info.flags & REGION_INFO_FLAG_CAPS, 0, "{info:?}");
        assert_eq!(info.cap_offset, 0);
        assert_eq!(info.flags & REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_MMAP);
        assert_eq!((info.size, short.payload.len()), (0x4000, 32));
        assert!(short.fds.is_empty(), "the fd comes with the full reply");

        let full = region_info(&spec, needed, 0).unwrap();
        let info = read_struct::<RegionInfo>(&full.payload).unwrap();
        assert_eq!(info.flags & REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_CAPS);
        assert_eq!(
            (info.argsz, info.cap_offset, full.payload.len()),
            (needed, 32, needed as usize)
        );
        let cap = read_struct::<CapHeader>(&full.payload[32..]).unwrap();
        assert_eq!((cap.id, cap.next), (REGION_INFO_CAP_SPARSE_MMAP, 0));
        assert_eq!(full.fds.len(), 1);
    }
}
