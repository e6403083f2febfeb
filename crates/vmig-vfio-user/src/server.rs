//! The device-server framework: a device author implements [`Device`] and gets a vfio-user
//! server with DMA through a `vmig-dma` IOMMU (so every DMA write is dirty-tracked), IRQs through
//! eventfds, the v2 migration state machine with its data stream, and v2 DMA logging and v1
//! `DIRTY_PAGES` over the same IOMMU.
//!
//! One client is served at a time. When it disconnects, the server drops every DMA mapping,
//! IRQ eventfd and dirty log, keeps the device and its migration state, and waits for the next
//! client (vfio-user-spec.rst: the server "must retain device state").
//!
//! Migration data is a stream of records, `[u32 length][bytes]`, one per [`Device::save`]:
//! entering PRE_COPY saves a record while the device runs, entering STOP_COPY saves the final
//! one; a destination in RESUMING collects what is written and, on leaving RESUMING, hands the
//! records to [`Device::load`] in order.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use vmig_dma::{Backing, DirtyRead, Iommu, IommuConfig, Prot, UnmapScope};
use zerocopy::IntoBytes;

use crate::caps::{self, Capabilities};
use crate::endpoint::{DEFAULT_TIMEOUT, Endpoint};
use crate::request::{self, Request};
use crate::transport::Channel;
use crate::v1_region;
use crate::wire::*;
use vmig_dma::uapi::device_state;
use vmig_primitives::mig_state::{MigState, path};

/// A refusal from the device or the framework: the errno of the error reply, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeviceError {
    /// errno.
    pub errno: i32,
    /// What was wrong.
    pub message: String,
}

impl DeviceError {
    /// An `EINVAL` refusal.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            errno: libc::EINVAL,
            message: message.into(),
        }
    }

    /// A refusal with `errno`.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl From<vmig_dma::DmaError> for DeviceError {
    fn from(e: vmig_dma::DmaError) -> Self {
        Self::new(e.errno(), e.to_string())
    }
}

/// A region's mmappable backing: the fd, the fd offset of the region's first byte, and the
/// areas (offset, size) within the region that may be mapped (none listed: all of it).
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file behind the region.
    pub fd: Arc<OwnedFd>,
    /// Offset in the file of the region's first byte.
    pub offset: u64,
    /// Sparse areas; empty means the whole region.
    pub areas: Vec<(u64, u64)>,
}

/// One region of the device.
#[derive(Clone, Debug, Default)]
pub struct RegionSpec {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Reads allowed.
    pub readable: bool,
    /// Writes allowed.
    pub writable: bool,
    /// Mmappable backing.
    pub mmap: Option<RegionMmap>,
    /// Device-specific type and subtype.
    pub region_type: Option<(u32, u32)>,
}

/// One IRQ index.
#[derive(Clone, Copy, Debug, Default)]
pub struct IrqSpec {
    /// Vectors.
    pub count: u32,
    /// `IRQ_INFO_*` flags.
    pub flags: u32,
}

/// What the device is made of.
#[derive(Clone, Debug, Default)]
pub struct DeviceSpec {
    /// A PCI device (region 7 is config space).
    pub pci: bool,
    /// Supports reset.
    pub reset: bool,
    /// Regions by index.
    pub regions: Vec<RegionSpec>,
    /// IRQ indices.
    pub irqs: Vec<IrqSpec>,
}

/// Which migration interface a device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationSupport {
    /// None: `migrate` must be refused.
    None,
    /// v1: the migration region (seed 000) at index 9, which the framework adds and serves.
    V1,
    /// v2 (`DEVICE_FEATURE`), with or without PRE_COPY.
    V2 {
        /// PRE_COPY supported.
        pre_copy: bool,
    },
}

/// DMA and IRQs, as a device reaches them.
#[derive(Clone)]
pub struct DeviceContext {
    dma: Arc<Dma>,
    irqs: Arc<Irqs>,
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext").finish_non_exhaustive()
    }
}

impl DeviceContext {
    /// Reads guest memory at `iova`.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.dma.read(iova, buf)
    }

    /// Writes guest memory at `iova` (recorded as dirty).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.dma.write(iova, data)
    }

    /// Signals vector `vector` of IRQ index `index`, if the client wired it and did not mask it.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> bool {
        self.irqs.trigger(index, vector)
    }
}

/// A device served over vfio-user.
pub trait Device: Send {
    /// Regions and IRQs (asked once per connection).
    fn spec(&self) -> DeviceSpec;
    /// Reads `data.len()` bytes of region `index` at `offset` (inside the region, checked).
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes region `index` at `offset` (inside the region, checked).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Resets the device.
    fn reset(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// A client connected: DMA and IRQs go through `ctx` until [`Device::disconnect`].
    fn connect(&mut self, _ctx: DeviceContext) {}
    /// The client left: stop using the context (the mappings are gone).
    fn disconnect(&mut self) {}
    /// The migration interface offered.
    fn migration(&self) -> MigrationSupport {
        MigrationSupport::None
    }
    /// Stops (false) or restarts (true) the device's own activity, DMA included. When this
    /// returns false, the device makes no change to its state or to guest memory.
    fn set_running(&mut self, _running: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    /// One record of state: `last` is false while running (PRE_COPY), true when stopped.
    fn save(&mut self, _last: bool) -> Result<Vec<u8>, DeviceError> {
        Err(DeviceError::new(
            libc::ENOTSUP,
            "this device cannot save its state",
        ))
    }
    /// Loads one record saved by [`Device::save`] (records arrive in the order they were saved).
    fn load(&mut self, _record: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::new(
            libc::ENOTSUP,
            "this device cannot load state",
        ))
    }
}

/// A flag set by SIGTERM or SIGINT, for [`Server::run`]: the server stops cleanly instead of
/// dying mid-command.
pub fn stop_on_termination() -> std::io::Result<&'static AtomicBool> {
    crate::sys::termination_flag()
}

/// Largest migration stream a destination accepts.
pub const MAX_MIGRATION_STREAM: usize = 1 << 30;

/// Guest memory reached by DMA: regions mapped with an fd through the IOMMU, the others by
/// `DMA_READ` / `DMA_WRITE` messages to the client.
struct Dma {
    iommu: Arc<Iommu>,
    /// Regions mapped without an fd. A message-based DMA holds the read lock until the client
    /// answered, so an unmap (write lock) returns only after the DMA in flight is done.
    message_regions: RwLock<Vec<(u64, u64, u32)>>,
    endpoint: Weak<Endpoint>,
    peer_max_xfer: u64,
}

impl Dma {
    /// Whether `[iova, iova+len)` lies in a message-based region allowing `flag` (`None`: not
    /// in one; the IOMMU's mappings decide).
    fn message_region(regions: &[(u64, u64, u32)], iova: u64, len: u64, flag: u32) -> Option<bool> {
        let region = regions
            .iter()
            .find(|(start, size, _)| iova >= *start && iova - start < *size)?;
        Some(len <= region.1 - (iova - region.0) && region.2 & flag != 0)
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let regions = self
            .message_regions
            .read()
            .unwrap_or_else(|e| e.into_inner());
        match Self::message_region(&regions, iova, buf.len() as u64, DMA_MAP_FLAG_READ) {
            None => self.iommu.read(iova, buf).map_err(dma_fault),
            Some(false) => Err(DeviceError::new(
                libc::EFAULT,
                format!(
                    "DMA read of [{iova:#x}, +{:#x}) is outside a readable mapping",
                    buf.len()
                ),
            )),
            Some(true) => {
                let endpoint = self
                    .endpoint
                    .upgrade()
                    .ok_or_else(|| DeviceError::new(libc::ENOTCONN, "no client"))?;
                let mut done = 0;
                while done < buf.len() {
                    let n = (buf.len() - done).min(self.peer_max_xfer as usize);
                    let head = DmaAccess {
                        addr: iova + done as u64,
                        count: n as u64,
                    };
                    let reply = endpoint
                        .request(Command::DmaRead, &[head.as_bytes()], &[], DEFAULT_TIMEOUT)
                        .map_err(|e| DeviceError::new(e.errno(), e.to_string()))?;
                    let data = reply.payload.get(size_of::<DmaAccess>()..).unwrap_or(&[]);
                    if data.len() != n {
                        return Err(DeviceError::new(
                            libc::EIO,
                            format!("DMA_READ returned {} of {n} bytes", data.len()),
                        ));
                    }
                    buf[done..done + n].copy_from_slice(data);
                    done += n;
                }
                Ok(())
            }
        }
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        let regions = self
            .message_regions
            .read()
            .unwrap_or_else(|e| e.into_inner());
        match Self::message_region(&regions, iova, data.len() as u64, DMA_MAP_FLAG_WRITE) {
            None => self.iommu.write(iova, data).map_err(dma_fault),
            Some(false) => Err(DeviceError::new(
                libc::EFAULT,
                format!(
                    "DMA write of [{iova:#x}, +{:#x}) is outside a writable mapping",
                    data.len()
                ),
            )),
            Some(true) => {
                let endpoint = self
                    .endpoint
                    .upgrade()
                    .ok_or_else(|| DeviceError::new(libc::ENOTCONN, "no client"))?;
                for (i, chunk) in data.chunks(self.peer_max_xfer as usize).enumerate() {
                    let addr = iova + (i as u64) * self.peer_max_xfer;
                    let head = DmaAccess {
                        addr,
                        count: chunk.len() as u64,
                    };
                    endpoint
                        .request(
                            Command::DmaWrite,
                            &[head.as_bytes(), chunk],
                            &[],
                            DEFAULT_TIMEOUT,
                        )
                        .map_err(|e| DeviceError::new(e.errno(), e.to_string()))?;
                }
                Ok(())
            }
        }
    }
}

/// A device access the IOMMU refuses is a DMA fault for the device (`EFAULT`), whatever the
/// IOMMU's own errno for the call.
fn dma_fault(e: vmig_dma::DmaError) -> DeviceError {
    DeviceError::new(libc::EFAULT, format!("DMA fault: {e}"))
}

/// One vector: the eventfd the client wired (if any) and whether it is masked.
type Vector = (Option<std::fs::File>, bool);

/// IRQ eventfds wired by the client, by index and vector.
#[derive(Default)]
struct Irqs {
    vectors: Mutex<Vec<Vec<Vector>>>,
}

impl Irqs {
    fn new(spec: &[IrqSpec]) -> Self {
        Self {
            vectors: Mutex::new(
                spec.iter()
                    .map(|s| (0..s.count).map(|_| (None, false)).collect())
                    .collect(),
            ),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<Vector>>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn trigger(&self, index: u32, vector: u32) -> bool {
        use std::io::Write;
        let mut vectors = self.lock();
        match vectors
            .get_mut(index as usize)
            .and_then(|v| v.get_mut(vector as usize))
        {
            Some((Some(fd), false)) => fd.write_all(&1u64.to_ne_bytes()).is_ok(),
            _ => false,
        }
    }
}

/// The migration state, kept across connections (it is device state).
#[derive(Debug)]
struct Migration {
    /// v2 state.
    state: MigState,
    /// Saved records not yet read (source), or bytes written so far (destination).
    stream: Vec<u8>,
    read_at: usize,
    /// v1: the `device_state` word (reserved bits included).
    v1_state: u32,
    /// v1: the size of the chunk `data_offset` prepared, until `pending_bytes` consumes it.
    v1_prepared: Option<u64>,
    /// v1: the memfd behind the migration region (the header page, then the data section).
    v1_region: Option<(Arc<OwnedFd>, vmig_primitives::HostMemory)>,
}

impl Migration {
    fn discard(&mut self) {
        self.stream.clear();
        self.read_at = 0;
        self.v1_prepared = None;
    }
}

/// Server limits and capabilities.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What the server accepts as one transfer.
    pub max_data_xfer_size: u64,
    /// Descriptors accepted with one message.
    pub max_msg_fds: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_data_xfer_size: caps::DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
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
    endpoint: Arc<Endpoint>,
    dma: Arc<Dma>,
    irqs: Arc<Irqs>,
    spec: DeviceSpec,
    /// v2 DMA logging page size, while logging.
    logging: Option<u64>,
}

impl<D: Device> Server<D> {
    /// A server for `device`.
    pub fn new(device: D, config: ServerConfig) -> Self {
        let size = v1_region::DATA_OFFSET + v1_region::DATA_SIZE;
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

    /// The device's spec, with the v1 migration region added at index 9 for a v1 device.
    fn full_spec(&self) -> DeviceSpec {
        let mut spec = self.device().spec();
        let migration = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((fd, _)) = &migration.v1_region {
            let index = v1_region::MIGRATION_REGION_INDEX as usize;
            spec.regions.resize(index, RegionSpec::default());
            spec.regions.push(RegionSpec {
                size: v1_region::DATA_OFFSET + v1_region::DATA_SIZE,
                readable: true,
                writable: true,
                mmap: Some(RegionMmap {
                    fd: Arc::clone(fd),
                    offset: 0,
                    areas: vec![(v1_region::DATA_OFFSET, v1_region::DATA_SIZE)],
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

    /// Accepts clients one after another until `stop` is set.
    pub fn run(&self, listener: &UnixListener, stop: &AtomicBool) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    if let Err(why) = self.serve(stream, stop) {
                        eprintln!("vfio-user server: client dropped: {why}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Serves one client until it disconnects (or breaks the protocol, or `stop` is set).
    pub fn serve(&self, stream: UnixStream, stop: &AtomicBool) -> Result<(), String> {
        let mut channel = Channel::new(stream);
        channel.set_limits(
            self.config.max_data_xfer_size as usize + (1 << 16),
            self.config.max_msg_fds as usize,
        );
        let (endpoint, commands) = Endpoint::start(channel).map_err(|e| e.to_string())?;
        let mut twin_endpoint: Option<Arc<Endpoint>> = None;
        // The first message must be the version.
        let first = commands
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "no VFIO_USER_VERSION within 10 s".to_string())?;
        let header = first.header;
        let client_caps = match request::decode(first, self.config.max_data_xfer_size) {
            Ok(Request::Version {
                version,
                caps: client,
            }) => {
                let offered = Capabilities {
                    max_msg_fds: Some(self.config.max_msg_fds),
                    max_data_xfer_size: Some(self.config.max_data_xfer_size),
                    pgsizes: Some(4096),
                    max_dma_maps: Some(65535),
                    migration: Some(caps::MigrationCap {
                        pgsize: 4096,
                        max_bitmap_size: Some(MAX_BITMAP_BYTES),
                    }),
                    twin_socket: Some(caps::TwinSocket {
                        supported: true,
                        fd_index: Some(0),
                    }),
                    ..Capabilities::default()
                };
                match caps::answer(version, &client, &offered) {
                    Ok((v, answer)) => {
                        let payload = caps::encode(v.major, v.minor, &answer);
                        if answer.twin_socket() {
                            // Server-to-client commands get their own socket; the client's
                            // end travels with the reply.
                            let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
                            endpoint
                                .reply(&header, &[&payload], &[theirs.as_fd()])
                                .map_err(|e| e.to_string())?;
                            let (twin, _commands) =
                                Endpoint::start(Channel::new(ours)).map_err(|e| e.to_string())?;
                            twin_endpoint = Some(twin);
                        } else {
                            endpoint
                                .reply(&header, &[&payload], &[])
                                .map_err(|e| e.to_string())?;
                        }
                        client
                    }
                    Err(e) => {
                        let _ = endpoint.reply_error(&header, libc::EINVAL);
                        return Err(e.to_string());
                    }
                }
            }
            Ok(_) => {
                let _ = endpoint.reply_error(&header, libc::EINVAL);
                return Err(format!(
                    "the first message was command {}, not VFIO_USER_VERSION",
                    header.command
                ));
            }
            Err(e) => {
                let _ = endpoint.reply_error(&header, e.errno);
                return Err(e.message);
            }
        };
        let iommu = Arc::new(Iommu::new(IommuConfig::default()).map_err(|e| e.to_string())?);
        let spec = self.full_spec();
        let session = Session {
            dma: Arc::new(Dma {
                iommu,
                message_regions: RwLock::new(Vec::new()),
                endpoint: Arc::downgrade(twin_endpoint.as_ref().unwrap_or(&endpoint)),
                // The replies to our DMA_READs must fit what this side accepts too.
                peer_max_xfer: client_caps
                    .max_data_xfer_size()
                    .min(self.config.max_data_xfer_size)
                    .max(1),
            }),
            irqs: Arc::new(Irqs::new(&spec.irqs)),
            endpoint,
            spec,
            logging: None,
        };
        self.device().connect(DeviceContext {
            dma: Arc::clone(&session.dma),
            irqs: Arc::clone(&session.irqs),
        });
        let mut session = session;
        let outcome = loop {
            if stop.load(Ordering::Acquire) {
                break Ok(());
            }
            let message = match commands.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    break match session.endpoint.closed_reason() {
                        Some(why) if why.contains("closed the connection") => Ok(()),
                        Some(why) => Err(why),
                        None => Ok(()),
                    };
                }
            };
            let header = message.header;
            let result = request::decode(message, self.config.max_data_xfer_size)
                .map_err(|e| DeviceError::new(e.errno, e.message))
                .and_then(|request| self.handle(&mut session, request));
            let sent = match result {
                Ok(Reply { payload, fds }) => {
                    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    session.endpoint.reply(&header, &[&payload], &fds)
                }
                Err(e) => session.endpoint.reply_error(&header, e.errno),
            };
            if let Err(e) = sent {
                break Err(e.to_string());
            }
        };
        // The client is gone: close both sockets first (a DMA in flight fails at once rather
        // than waiting for its timeout), then the device stops using DMA, then mappings and
        // IRQs go with the session.
        session.endpoint.close();
        if let Some(twin) = twin_endpoint {
            twin.close();
        }
        self.device().disconnect();
        outcome
    }

    fn handle(&self, s: &mut Session, request: Request) -> Result<Reply, DeviceError> {
        match request {
            Request::Version { .. } => Err(DeviceError::invalid(
                "VFIO_USER_VERSION was already negotiated",
            )),
            Request::DmaMap { map, fd } => self.dma_map(s, map, fd),
            Request::DmaUnmap { unmap, bitmap } => self.dma_unmap(s, unmap, bitmap),
            Request::GetInfo => {
                let info = DeviceInfo {
                    argsz: size_of::<DeviceInfo>() as u32,
                    flags: (if s.spec.reset { DEVICE_FLAGS_RESET } else { 0 })
                        | (if s.spec.pci { DEVICE_FLAGS_PCI } else { 0 }),
                    num_regions: s.spec.regions.len() as u32,
                    num_irqs: s.spec.irqs.len() as u32,
                };
                Ok(Reply::data(info.as_bytes().to_vec()))
            }
            Request::GetRegionInfo { argsz, index } => region_info(&s.spec, argsz, index),
            Request::GetRegionIoFds { index, .. } => {
                region(&s.spec, index)?;
                let head = RegionIoFds {
                    argsz: size_of::<RegionIoFds>() as u32,
                    flags: 0,
                    index,
                    count: 0,
                };
                Ok(Reply::data(head.as_bytes().to_vec()))
            }
            Request::GetIrqInfo { index } => {
                let irq = s.spec.irqs.get(index as usize).ok_or_else(|| {
                    DeviceError::invalid(format!(
                        "IRQ index {index}: the device has {}",
                        s.spec.irqs.len()
                    ))
                })?;
                let info = IrqInfo {
                    argsz: 16,
                    flags: irq.flags,
                    index,
                    count: irq.count,
                };
                Ok(Reply::data(info.as_bytes().to_vec()))
            }
            Request::SetIrqs { set, bools, fds } => set_irqs(s, set, &bools, fds),
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
                self.device()
                    .region_read(access.region, access.offset, &mut data)?;
                Ok(Reply::data([access.as_bytes(), &data].concat()))
            }
            Request::RegionWrite { access, data } => {
                let spec = region(&s.spec, access.region)?;
                check_access(spec, access, true)?;
                self.device()
                    .region_write(access.region, access.offset, &data)?;
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
                        self.device().region_write(w.region, w.offset, data)?;
                    }
                }
                Ok(Reply::data((writes.len() as u64).to_le_bytes().to_vec()))
            }
            Request::Reset => {
                if !s.spec.reset {
                    return Err(DeviceError::new(
                        libc::ENOTTY,
                        "the device does not support reset",
                    ));
                }
                self.device().reset()?;
                let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
                // Reset is the way out of ERROR (and out of any migration state).
                m.state = MigState::Running;
                m.v1_state = (m.v1_state & !device_state::MASK) | device_state::RUNNING;
                m.discard();
                Ok(Reply::empty())
            }
            Request::DirtyPages {
                argsz,
                flags,
                range,
            } => dirty_pages(s, argsz, flags, range),
            Request::Feature { argsz, flags, data } => self.feature(s, argsz, flags, &data),
            Request::MigDataRead { size } => {
                let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
                if !m.state.is_saving() {
                    return Err(DeviceError::invalid(format!(
                        "MIG_DATA_READ in {}: only in PRE_COPY or STOP_COPY",
                        m.state
                    )));
                }
                let start = m.read_at;
                let end = (start + size as usize).min(m.stream.len());
                m.read_at = end;
                let n = (end - start) as u32;
                let head = MigData {
                    argsz: 8 + n,
                    size: n,
                };
                let mut payload = Vec::with_capacity(8 + n as usize);
                payload.extend_from_slice(head.as_bytes());
                payload.extend_from_slice(&m.stream[start..end]);
                Ok(Reply::data(payload))
            }
            Request::MigDataWrite(data) => {
                let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
                if m.state != MigState::Resuming {
                    return Err(DeviceError::invalid(format!(
                        "MIG_DATA_WRITE in {}: only in RESUMING",
                        m.state
                    )));
                }
                if m.stream.len() + data.len() > MAX_MIGRATION_STREAM {
                    return Err(DeviceError::new(
                        libc::ENOSPC,
                        format!("migration data beyond {MAX_MIGRATION_STREAM} bytes"),
                    ));
                }
                m.stream.extend_from_slice(&data);
                Ok(Reply::empty())
            }
        }
    }

    fn dma_map(
        &self,
        s: &mut Session,
        map: DmaMap,
        fd: Option<OwnedFd>,
    ) -> Result<Reply, DeviceError> {
        let prot = Prot::from_bits(map.flags)?;
        let end = map
            .addr
            .checked_add(map.size)
            .ok_or_else(|| DeviceError::invalid("DMA_MAP range overflows"))?;
        let overlaps_message = s
            .dma
            .message_regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(a, size, _)| map.addr < a + size && *a < end);
        if overlaps_message {
            return Err(DeviceError::new(
                libc::EEXIST,
                format!(
                    "DMA_MAP [{:#x}, +{:#x}) overlaps a mapping",
                    map.addr, map.size
                ),
            ));
        }
        match fd {
            Some(fd) => s.dma.iommu.map(
                map.addr,
                map.size,
                Backing::Fd {
                    fd: fd.as_fd(),
                    offset: map.offset,
                },
                prot,
            )?,
            None => {
                if map.size == 0 || !map.addr.is_multiple_of(4096) || !map.size.is_multiple_of(4096)
                {
                    return Err(DeviceError::invalid(
                        "DMA_MAP without an fd needs a page-aligned, non-empty range",
                    ));
                }
                if s.dma
                    .iommu
                    .mappings()
                    .iter()
                    .any(|m| map.addr < m.iova + m.size && m.iova < end)
                {
                    return Err(DeviceError::new(
                        libc::EEXIST,
                        format!(
                            "DMA_MAP [{:#x}, +{:#x}) overlaps a mapping",
                            map.addr, map.size
                        ),
                    ));
                }
                let mut regions = s
                    .dma
                    .message_regions
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                if regions.len() + s.dma.iommu.mapping_count() >= usize::from(u16::MAX) {
                    return Err(DeviceError::new(
                        libc::ENOSPC,
                        "65535 DMA mappings, the max_dma_maps offered",
                    ));
                }
                regions.push((map.addr, map.size, map.flags));
            }
        }
        Ok(Reply::empty())
    }

    fn dma_unmap(
        &self,
        s: &mut Session,
        unmap: DmaUnmap,
        bitmap: Option<DirtyBitmap>,
    ) -> Result<Reply, DeviceError> {
        let echo = DmaUnmap {
            argsz: size_of::<DmaUnmap>() as u32,
            ..unmap
        };
        if unmap.flags & DMA_UNMAP_FLAG_ALL != 0 {
            s.dma.iommu.unmap(0, 0, UnmapScope::All)?;
            s.dma
                .message_regions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return Ok(Reply::data(echo.as_bytes().to_vec()));
        }
        // Checked before anything is removed or allocated.
        let bitmap_words = match bitmap {
            Some(b) => Some(check_bitmap(unmap.size, b.pgsize, b.size)?),
            None => None,
        };
        {
            let mut regions = s
                .dma
                .message_regions
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(i) = regions
                .iter()
                .position(|(a, size, _)| *a == unmap.addr && *size == unmap.size)
            {
                regions.remove(i);
                // Pages written through DMA_WRITE messages are the client's to track.
                let (argsz, tail) = match bitmap {
                    Some(b) => (
                        (size_of::<DmaUnmap>() + size_of::<DirtyBitmap>()) as u64 + b.size,
                        [b.as_bytes(), &vec![0u8; b.size as usize]].concat(),
                    ),
                    None => (size_of::<DmaUnmap>() as u64, Vec::new()),
                };
                let echo = DmaUnmap {
                    argsz: argsz as u32,
                    ..unmap
                };
                return Ok(Reply::data([echo.as_bytes(), &tail].concat()));
            }
        }
        match bitmap.zip(bitmap_words) {
            None => {
                if s.dma
                    .iommu
                    .unmap(unmap.addr, unmap.size, UnmapScope::Range)?
                    == 0
                {
                    // As libvfio-user: an unmap must name a mapping.
                    return Err(DeviceError::new(
                        libc::ENOENT,
                        format!(
                            "DMA_UNMAP [{:#x}, +{:#x}) names no mapping",
                            unmap.addr, unmap.size
                        ),
                    ));
                }
                Ok(Reply::data(echo.as_bytes().to_vec()))
            }
            Some((b, words)) => {
                let mut out = vec![0u64; words];
                s.dma
                    .iommu
                    .unmap_with_dirty_bitmap(unmap.addr, unmap.size, b.pgsize, &mut out)?;
                let echo = DmaUnmap {
                    argsz: (size_of::<DmaUnmap>() + size_of::<DirtyBitmap>()) as u32
                        + b.size as u32,
                    ..unmap
                };
                Ok(Reply::data(
                    [
                        echo.as_bytes(),
                        b.as_bytes(),
                        &out.as_bytes()[..b.size as usize],
                    ]
                    .concat(),
                ))
            }
        }
    }

    fn feature(
        &self,
        s: &mut Session,
        argsz: u32,
        flags: u32,
        data: &[u8],
    ) -> Result<Reply, DeviceError> {
        let feature = flags & FEATURE_MASK;
        let op = flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
        let echo = |payload: &[u8]| {
            let head = DeviceFeature {
                argsz: (size_of::<DeviceFeature>() + payload.len()) as u32,
                flags,
            };
            Reply::data([head.as_bytes(), payload].concat())
        };
        let allowed = |permitted: u32| -> Result<(), DeviceError> {
            if op & !permitted != 0 {
                return Err(DeviceError::invalid(format!(
                    "feature {feature} does not support flags {op:#x}"
                )));
            }
            Ok(())
        };
        let migration = self.device().migration();
        let (v2, pre_copy) = match migration {
            MigrationSupport::V2 { pre_copy } => (true, pre_copy),
            _ => (false, false),
        };
        match feature {
            FEATURE_MIGRATION | FEATURE_MIG_DEVICE_STATE if !v2 => Err(DeviceError::new(
                libc::ENOTTY,
                "this device does not support v2 migration",
            )),
            FEATURE_MIGRATION => {
                allowed(FEATURE_GET | FEATURE_PROBE)?;
                if op & FEATURE_PROBE != 0 {
                    return Ok(echo(&[]));
                }
                let mig_flags = MIGRATION_STOP_COPY | if pre_copy { MIGRATION_PRE_COPY } else { 0 };
                need_room(argsz, 16)?;
                Ok(echo(&mig_flags.to_le_bytes()))
            }
            FEATURE_MIG_DEVICE_STATE => {
                allowed(FEATURE_GET | FEATURE_SET | FEATURE_PROBE)?;
                if op & FEATURE_PROBE != 0 {
                    return Ok(echo(&[]));
                }
                need_room(argsz, 16)?;
                if op & FEATURE_SET != 0 {
                    let wanted: MigDeviceState = read_struct(data).ok_or_else(|| {
                        DeviceError::invalid("MIG_DEVICE_STATE SET needs 8 bytes of data")
                    })?;
                    let target = MigState::from_u32(wanted.device_state).ok_or_else(|| {
                        DeviceError::invalid(format!(
                            "device state {}: expected 0 to 7",
                            wanted.device_state
                        ))
                    })?;
                    self.set_state(target, pre_copy)?;
                }
                let now = MigDeviceState {
                    device_state: self.migration_state() as u32,
                    data_fd: u32::MAX,
                };
                Ok(echo(now.as_bytes()))
            }
            FEATURE_DMA_LOGGING_START => {
                allowed(FEATURE_SET | FEATURE_PROBE)?;
                if op & FEATURE_PROBE != 0 {
                    return Ok(echo(&[]));
                }
                let control: DmaLoggingControl = read_struct(data).ok_or_else(|| {
                    DeviceError::invalid("DMA_LOGGING_START needs 16 bytes of control data")
                })?;
                let ranges = &data[size_of::<DmaLoggingControl>()..];
                if ranges.len() as u64 != u64::from(control.num_ranges) * 16 {
                    return Err(DeviceError::invalid(format!(
                        "DMA_LOGGING_START names {} ranges but carries {} bytes of them",
                        control.num_ranges,
                        ranges.len()
                    )));
                }
                if control.page_size == 0 || !control.page_size.is_power_of_two() {
                    return Err(DeviceError::invalid(format!(
                        "page size {}: expected a power of two",
                        control.page_size
                    )));
                }
                if s.logging.is_some() {
                    return Err(DeviceError::new(
                        libc::EBUSY,
                        "DMA logging is already started",
                    ));
                }
                s.dma.iommu.start_dirty_tracking()?;
                let page_size = control.page_size.max(4096);
                s.logging = Some(page_size);
                let answer = DmaLoggingControl {
                    page_size,
                    ..control
                };
                Ok(echo(&[answer.as_bytes(), ranges].concat()))
            }
            FEATURE_DMA_LOGGING_STOP => {
                allowed(FEATURE_SET | FEATURE_PROBE)?;
                if op & FEATURE_PROBE != 0 {
                    return Ok(echo(&[]));
                }
                if s.logging.take().is_none() {
                    return Err(DeviceError::invalid("DMA logging is not started"));
                }
                s.dma.iommu.stop_dirty_tracking()?;
                Ok(echo(data))
            }
            FEATURE_DMA_LOGGING_REPORT => {
                allowed(FEATURE_GET | FEATURE_PROBE)?;
                if op & FEATURE_PROBE != 0 {
                    return Ok(echo(&[]));
                }
                let report: DmaLoggingReport = read_struct(data).ok_or_else(|| {
                    DeviceError::invalid("DMA_LOGGING_REPORT needs 24 bytes of data")
                })?;
                if s.logging.is_none() {
                    return Err(DeviceError::invalid(
                        "DMA_LOGGING_REPORT before DMA_LOGGING_START",
                    ));
                }
                let bitmap = logging_report(&s.dma.iommu, report, argsz)?;
                Ok(echo(&[report.as_bytes(), bitmap.as_bytes()].concat()))
            }
            _ => Err(DeviceError::new(
                libc::ENOTTY,
                format!("feature {feature} is not supported"),
            )),
        }
    }

    /// Walks the arcs to `target`, calling the device on each; a failed arc leaves ERROR.
    fn set_state(&self, target: MigState, pre_copy: bool) -> Result<(), DeviceError> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        let walk = path(m.state, target, pre_copy).map_err(|e| DeviceError::invalid(e.0))?;
        for next in walk {
            if let Err(e) = self.arc(&mut m, next) {
                m.state = MigState::Error;
                m.discard();
                return Err(e);
            }
            m.state = next;
        }
        Ok(())
    }

    fn arc(&self, m: &mut Migration, next: MigState) -> Result<(), DeviceError> {
        let mut device = self.device();
        let record = |m: &mut Migration, last: bool, device: &mut D| -> Result<(), DeviceError> {
            push_record(&mut m.stream, &device.save(last)?)
        };
        match (m.state, next) {
            (MigState::Running, MigState::Stop) => device.set_running(false),
            (MigState::Stop, MigState::Running) => device.set_running(true),
            (MigState::Running, MigState::PreCopy) => {
                m.discard();
                record(m, false, &mut device)
            }
            (MigState::PreCopy, MigState::Running) | (MigState::StopCopy, MigState::Stop) => {
                m.discard();
                Ok(())
            }
            (MigState::PreCopy, MigState::StopCopy) => {
                device.set_running(false)?;
                record(m, true, &mut device)
            }
            (MigState::Stop, MigState::StopCopy) => {
                m.discard();
                record(m, true, &mut device)
            }
            (MigState::Stop, MigState::Resuming) => {
                m.discard();
                Ok(())
            }
            (MigState::Resuming, MigState::Stop) => {
                let stream = std::mem::take(&mut m.stream);
                load_records(&stream, &mut *device)
            }
            (from, to) => Err(DeviceError::invalid(format!(
                "{from} -> {to} is not a direct arc"
            ))),
        }
    }
}

impl<D: Device> Server<D> {
    fn is_v1_region(&self, s: &Session, index: u32) -> bool {
        index == v1_region::MIGRATION_REGION_INDEX
            && s.spec.regions.get(index as usize).is_some_and(|r| {
                r.region_type == Some((REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION))
            })
    }

    fn v1_read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if offset >= v1_region::DATA_OFFSET {
            return v1_data(&m, offset, |memory, at| memory.read(at, data));
        }
        let saving = m.v1_state & device_state::SAVING != 0 && !device_state::is_error(m.v1_state);
        let value: u64 = match v1_region::field(offset, data.len())? {
            v1_region::Field::DeviceState => u64::from(m.v1_state),
            v1_region::Field::Reserved => 0,
            v1_region::Field::PendingBytes => {
                // A read after a prepared chunk acknowledges it (seed000 §2.8's FSM).
                if let Some(size) = m.v1_prepared.take() {
                    m.read_at += size as usize;
                }
                if saving {
                    (m.stream.len() - m.read_at) as u64
                } else {
                    0
                }
            }
            v1_region::Field::DataOffset => {
                if saving && m.v1_prepared.is_none() {
                    let size = ((m.stream.len() - m.read_at) as u64).min(v1_region::DATA_SIZE);
                    let chunk = m.stream[m.read_at..m.read_at + size as usize].to_vec();
                    v1_data(&m, v1_region::DATA_OFFSET, |memory, at| {
                        memory.write(at, &chunk)
                    })?;
                    m.v1_prepared = Some(size);
                }
                v1_region::DATA_OFFSET
            }
            v1_region::Field::DataSize => m.v1_prepared.unwrap_or(0),
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn v1_write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if offset >= v1_region::DATA_OFFSET {
            return v1_data(&m, offset, |memory, at| memory.write(at, data));
        }
        let field = v1_region::field(offset, data.len())?;
        let mut word = [0u8; 8];
        word[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(word);
        match field {
            v1_region::Field::DeviceState => {
                let old = m.v1_state;
                let new = value as u32;
                for action in v1_region::transition(old, new)? {
                    if let Err(e) = self.v1_action(&mut m, action) {
                        m.v1_state = device_state::set_error(old);
                        m.discard();
                        return Err(e);
                    }
                }
                m.v1_state = new;
                Ok(())
            }
            v1_region::Field::Reserved => Ok(()),
            v1_region::Field::DataSize => {
                if m.v1_state & device_state::MASK != device_state::RESUMING {
                    return Err(DeviceError::invalid(
                        "data_size is written only while resuming (100b)",
                    ));
                }
                if value > v1_region::DATA_SIZE {
                    return Err(DeviceError::invalid(format!(
                        "data_size {value}: the data section holds {}",
                        v1_region::DATA_SIZE
                    )));
                }
                if m.stream.len() as u64 + value > MAX_MIGRATION_STREAM as u64 {
                    return Err(DeviceError::new(
                        libc::ENOSPC,
                        format!("migration data beyond {MAX_MIGRATION_STREAM} bytes"),
                    ));
                }
                let mut chunk = vec![0u8; value as usize];
                v1_data(&m, v1_region::DATA_OFFSET, |memory, at| {
                    memory.read(at, &mut chunk)
                })?;
                m.stream.extend_from_slice(&chunk);
                Ok(())
            }
            field => Err(DeviceError::invalid(format!("{field:?} is read-only"))),
        }
    }

    fn v1_action(&self, m: &mut Migration, action: v1_region::Action) -> Result<(), DeviceError> {
        let mut device = self.device();
        match action {
            v1_region::Action::SetRunning(running) => device.set_running(running),
            v1_region::Action::Discard => {
                m.discard();
                Ok(())
            }
            v1_region::Action::Save { last } => push_record(&mut m.stream, &device.save(last)?),
            v1_region::Action::Load => {
                let stream = std::mem::take(&mut m.stream);
                m.discard();
                load_records(&stream, &mut *device)
            }
        }
    }
}

/// Runs `f` on the migration region's memory at region offset `offset`, refusing it in the
/// error state.
fn v1_data<T>(
    m: &Migration,
    offset: u64,
    f: impl FnOnce(&vmig_primitives::HostMemory, usize) -> std::io::Result<T>,
) -> Result<T, DeviceError> {
    if device_state::is_error(m.v1_state) {
        return Err(DeviceError::invalid(
            "the device is in the error state: reset it",
        ));
    }
    let (_, memory) = m
        .v1_region
        .as_ref()
        .ok_or_else(|| DeviceError::invalid("no migration region"))?;
    f(memory, offset as usize).map_err(|e| DeviceError::invalid(e.to_string()))
}

/// Appends one `[u32 length][bytes]` record.
fn push_record(stream: &mut Vec<u8>, bytes: &[u8]) -> Result<(), DeviceError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| DeviceError::new(libc::E2BIG, "a state record over 4 GiB"))?;
    stream.extend_from_slice(&len.to_le_bytes());
    stream.extend_from_slice(bytes);
    Ok(())
}

/// Hands each record of `stream` to the device, in order.
fn load_records<D: Device + ?Sized>(stream: &[u8], device: &mut D) -> Result<(), DeviceError> {
    let mut at = 0;
    while at < stream.len() {
        let Some(len) = stream.get(at..at + 4) else {
            return Err(DeviceError::invalid(
                "the migration data ends inside a record header",
            ));
        };
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let Some(body) = stream.get(at + 4..at + 4 + len) else {
            return Err(DeviceError::invalid(format!(
                "the migration data ends inside a {len}-byte record"
            )));
        };
        device.load(body)?;
        at += 4 + len;
    }
    Ok(())
}

/// A successful reply's payload and descriptors.
struct Reply {
    payload: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl Reply {
    fn empty() -> Self {
        Self {
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn data(payload: Vec<u8>) -> Self {
        Self {
            payload,
            fds: Vec::new(),
        }
    }
}

fn need_room(argsz: u32, needed: u32) -> Result<(), DeviceError> {
    if argsz < needed {
        return Err(DeviceError::invalid(format!(
            "argsz {argsz} has no room for the {needed}-byte reply"
        )));
    }
    Ok(())
}

fn region(spec: &DeviceSpec, index: u32) -> Result<&RegionSpec, DeviceError> {
    spec.regions
        .get(index as usize)
        .filter(|r| r.size > 0)
        .ok_or_else(|| DeviceError::invalid(format!("region {index} does not exist")))
}

fn check_access(spec: &RegionSpec, access: RegionAccess, write: bool) -> Result<(), DeviceError> {
    let end = access.offset.checked_add(u64::from(access.count));
    if end.is_none_or(|e| e > spec.size) {
        return Err(DeviceError::invalid(format!(
            "[{:#x}, +{:#x}) is outside region {} of {:#x} bytes",
            access.offset, access.count, access.region, spec.size
        )));
    }
    if (write && !spec.writable) || (!write && !spec.readable) {
        return Err(DeviceError::invalid(format!(
            "region {} cannot be {}",
            access.region,
            if write { "written" } else { "read" }
        )));
    }
    Ok(())
}

fn region_info(spec: &DeviceSpec, argsz: u32, index: u32) -> Result<Reply, DeviceError> {
    // A region the device lacks (an unused BAR) answers size 0, as the kernel and
    // libvfio-user do; only an index past the count is an error.
    let r = spec.regions.get(index as usize).ok_or_else(|| {
        DeviceError::invalid(format!(
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
                nr_areas: mmap.areas.len() as u32,
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
            (offset + cap.len()) as u32
        } else {
            0
        };
        cap[4..8].copy_from_slice(&next.to_le_bytes());
        offset += cap.len();
        tail.extend_from_slice(&cap);
    }
    let needed = (base + tail.len()) as u32;
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
    if !tail.is_empty() {
        flags |= REGION_INFO_FLAG_CAPS;
    }
    let fits = argsz >= needed;
    let info = RegionInfo {
        argsz: needed,
        flags,
        index,
        cap_offset: if fits && !tail.is_empty() {
            base as u32
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

fn set_irqs(
    s: &mut Session,
    set: SetIrqs,
    bools: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Reply, DeviceError> {
    let count = s
        .spec
        .irqs
        .get(set.index as usize)
        .map(|i| i.count)
        .ok_or_else(|| {
            DeviceError::invalid(format!(
                "IRQ index {}: the device has {}",
                set.index,
                s.spec.irqs.len()
            ))
        })?;
    let mut vectors = s.irqs.lock();
    let vectors = &mut vectors[set.index as usize];
    if set.count == 0
        && set.flags & IRQ_SET_DATA_NONE != 0
        && set.flags & IRQ_SET_ACTION_TRIGGER != 0
    {
        // Disable every vector of the index.
        vectors.iter_mut().for_each(|v| *v = (None, false));
        return Ok(Reply::empty());
    }
    let end = set
        .start
        .checked_add(set.count)
        .filter(|&e| e <= count)
        .ok_or_else(|| {
            DeviceError::invalid(format!(
                "vectors {}+{} of IRQ index {} with {count}",
                set.start, set.count, set.index
            ))
        })?;
    let range = set.start as usize..end as usize;
    if set.flags & IRQ_SET_DATA_EVENTFD != 0 {
        if fds.is_empty() {
            vectors[range].iter_mut().for_each(|v| v.0 = None);
        } else {
            for (v, fd) in vectors[range].iter_mut().zip(fds) {
                // A signal must never block the device: a full counter or a pipe drops it.
                crate::sys::set_nonblocking(&fd)
                    .map_err(|e| DeviceError::invalid(format!("an IRQ fd: {e}")))?;
                v.0 = Some(std::fs::File::from(fd));
            }
        }
        return Ok(Reply::empty());
    }
    let selected: Vec<usize> = range
        .clone()
        .filter(|&i| set.flags & IRQ_SET_DATA_BOOL == 0 || bools[i - set.start as usize] != 0)
        .collect();
    for i in selected {
        if set.flags & IRQ_SET_ACTION_MASK != 0 {
            vectors[i].1 = true;
        } else if set.flags & IRQ_SET_ACTION_UNMASK != 0 {
            vectors[i].1 = false;
        } else if let (Some(fd), false) = &mut vectors[i] {
            use std::io::Write;
            let _ = fd.write_all(&1u64.to_ne_bytes());
        }
    }
    Ok(Reply::empty())
}

/// Words of a bitmap of `size` bytes at `pgsize`, checked against the bytes the client sized.
fn check_bitmap(size: u64, pgsize: u64, bitmap_bytes: u64) -> Result<usize, DeviceError> {
    if pgsize == 0 || !pgsize.is_power_of_two() {
        return Err(DeviceError::invalid(format!(
            "bitmap page size {pgsize}: expected a power of two"
        )));
    }
    let pages = size.div_ceil(pgsize);
    let needed = vmig_dirty::bitmap_bytes(pages);
    if bitmap_bytes != needed {
        return Err(DeviceError::invalid(format!(
            "a bitmap of {bitmap_bytes} bytes for {pages} pages: expected {needed}"
        )));
    }
    if needed > MAX_BITMAP_BYTES {
        return Err(DeviceError::invalid(format!(
            "a bitmap of {needed} bytes: at most {MAX_BITMAP_BYTES} (the max_bitmap_size offered)"
        )));
    }
    Ok(vmig_dirty::words_for(pages) as usize)
}

/// The largest dirty bitmap the server builds (what it offers as `max_bitmap_size`).
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

fn dirty_pages(
    s: &mut Session,
    argsz: u32,
    flags: u32,
    range: Option<DirtyBitmapRange>,
) -> Result<Reply, DeviceError> {
    match (flags, range) {
        // START and STOP replies carry no payload (v1 spec).
        (DIRTY_PAGES_FLAG_START, _) => {
            s.dma.iommu.start_dirty_tracking()?;
            Ok(Reply::empty())
        }
        (DIRTY_PAGES_FLAG_STOP, _) => {
            s.dma.iommu.stop_dirty_tracking()?;
            Ok(Reply::empty())
        }
        (_, Some(r)) => {
            let words = check_bitmap(r.size, r.bitmap.pgsize, r.bitmap.size)?;
            let needed =
                (size_of::<DirtyPages>() + size_of::<DirtyBitmapRange>()) as u64 + r.bitmap.size;
            if u64::from(argsz) < needed {
                return Err(DeviceError::invalid(format!(
                    "DIRTY_PAGES argsz {argsz}: the reply needs {needed}"
                )));
            }
            let mut out = vec![0u64; words];
            s.dma.iommu.get_dirty_bitmap(
                r.iova,
                r.size,
                r.bitmap.pgsize,
                &mut out,
                DirtyRead::Clear,
            )?;
            let head = DirtyPages {
                argsz: needed as u32,
                flags,
            };
            Ok(Reply::data(
                [
                    head.as_bytes(),
                    r.as_bytes(),
                    &out.as_bytes()[..r.bitmap.size as usize],
                ]
                .concat(),
            ))
        }
        _ => Err(DeviceError::invalid(
            "DIRTY_PAGES GET_BITMAP without a range",
        )),
    }
}

/// The read-and-clear bitmap of `report`'s range at its page size.
fn logging_report(
    iommu: &Iommu,
    report: DmaLoggingReport,
    argsz: u32,
) -> Result<Vec<u64>, DeviceError> {
    let DmaLoggingReport {
        iova,
        length,
        page_size,
    } = report;
    if page_size < 4096 || !page_size.is_power_of_two() {
        return Err(DeviceError::invalid(format!(
            "report page size {page_size}: expected a power of two of at least 4096"
        )));
    }
    if length == 0 || iova % page_size != 0 || length % page_size != 0 {
        return Err(DeviceError::invalid(format!(
            "report range [{iova:#x}, +{length:#x}) must be non-empty and aligned to its page size {page_size:#x}"
        )));
    }
    let pages = length / page_size;
    let bitmap_bytes = vmig_dirty::bitmap_bytes(pages);
    let needed = (size_of::<DeviceFeature>() + size_of::<DmaLoggingReport>()) as u64 + bitmap_bytes;
    if u64::from(argsz) < needed {
        return Err(DeviceError::invalid(format!(
            "DMA_LOGGING_REPORT argsz {argsz}: a report of {pages} pages needs {needed} (8 + 24 + {bitmap_bytes})"
        )));
    }
    let fine_pages = length / 4096;
    if vmig_dirty::bitmap_bytes(fine_pages) > MAX_BITMAP_BYTES {
        return Err(DeviceError::invalid(format!(
            "a report over {length:#x} bytes: at most {} GiB at a time",
            (MAX_BITMAP_BYTES * 8 * 4096) >> 30
        )));
    }
    let mut fine = vec![0u64; vmig_dirty::words_for(fine_pages) as usize];
    iommu.get_dirty_bitmap(iova, length, 4096, &mut fine, DirtyRead::Clear)?;
    if page_size == 4096 {
        return Ok(fine);
    }
    let shift = page_size.trailing_zeros() - 12;
    let bitmap = vmig_dirty::DirtyBitmap::try_new(fine_pages)
        .map_err(|e| DeviceError::invalid(e.to_string()))?;
    bitmap
        .merge_words(0, &fine, fine_pages)
        .map_err(|e| DeviceError::invalid(e.to_string()))?;
    let coarse = bitmap
        .to_coarser(shift)
        .map_err(|e| DeviceError::invalid(e.to_string()))?;
    Ok(coarse.snapshot().into_words())
}
