//! The VMM side: a client that drives any conformant vfio-user server. It negotiates the
//! version, maps guest memory for DMA, reads region info (with sparse-mmap areas and their fds),
//! wires IRQs to eventfds, accesses regions (split at the server's `max_data_xfer_size`), drives
//! v2 migration and DMA logging and v1 `DIRTY_PAGES`, and serves the server's `DMA_READ` /
//! `DMA_WRITE` from guest memory, recording the pages those writes dirty (they are the client's
//! to track: the server's dirty log never sees them).

use std::collections::BTreeSet;
use std::os::fd::{BorrowedFd, OwnedFd};
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

pub mod migration;

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
    /// The exchange failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
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

type Result<T> = std::result::Result<T, ClientError>;

/// A region as the server describes it.
#[derive(Debug)]
pub struct RegionDescription {
    /// The fixed part.
    pub info: RegionInfo,
    /// Sparse-mmap areas (offset, size) within the region.
    pub sparse_areas: Vec<(u64, u64)>,
    /// Device-specific type and subtype.
    pub region_type: Option<(u32, u32)>,
    /// The fd to mmap (at `info.offset` + area offset), when the region is mmappable.
    pub fd: Option<OwnedFd>,
}

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

/// Bytes per page of the client's record of server DMA writes.
pub const DMA_WRITE_PAGE: u64 = 4096;

fn protocol<T>(command: Command, why: impl Into<String>) -> Result<T> {
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
            Endpoint::start(Channel::new(stream)).map_err(|source| ClientError::Connect {
                path: "stream".into(),
                source,
            })?;
        let proposed = Version {
            major: caps::MAJOR,
            minor: caps::MINOR,
        };
        let ours = Capabilities {
            max_msg_fds: Some(crate::transport::DEFAULT_MAX_FDS as u32),
            max_data_xfer_size: Some(caps::DEFAULT_MAX_DATA_XFER_SIZE),
            pgsizes: Some(4096),
            max_dma_maps: Some(caps::DEFAULT_MAX_DMA_MAPS),
            migration: Some(caps::MigrationCap {
                pgsize: 4096,
                max_bitmap_size: Some(256 << 20),
            }),
            twin_socket: twin.then_some(caps::TwinSocket {
                supported: true,
                fd_index: None,
            }),
            ..Capabilities::default()
        };
        let payload = caps::encode(proposed.major, proposed.minor, &ours);
        let mut reply = endpoint.request(Command::Version, &[&payload], &[], DEFAULT_TIMEOUT)?;
        let (version, server) =
            caps::decode(&reply.payload).map_err(|e| ClientError::Protocol {
                command: Command::Version,
                why: e.to_string(),
            })?;
        caps::check_reply(proposed, version).map_err(|e| ClientError::Protocol {
            command: Command::Version,
            why: e.to_string(),
        })?;
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
                    .map_err(|source| ClientError::Connect {
                        path: "twin socket".into(),
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
                        serve_dma(&endpoint, memory.as_deref(), &written, message);
                    }
                })
                .map_err(|source| ClientError::Connect {
                    path: "thread".into(),
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

    /// `DEVICE_GET_INFO`.
    pub fn device_info(&self) -> Result<DeviceInfo> {
        let request = DeviceInfo {
            argsz: 16,
            ..DeviceInfo::default()
        };
        let reply = self.call(Command::DeviceGetInfo, &[request.as_bytes()], &[])?;
        read_struct(&reply.payload).map_or_else(
            || protocol(Command::DeviceGetInfo, "shorter than 16 bytes"),
            Ok,
        )
    }

    /// `DEVICE_GET_REGION_INFO`, asking again with room for the capabilities when the server
    /// says it needs more.
    pub fn region_info(&self, index: u32) -> Result<RegionDescription> {
        let mut argsz = size_of::<RegionInfo>() as u32;
        for _ in 0..2 {
            let request = RegionInfo {
                argsz,
                index,
                ..RegionInfo::default()
            };
            let mut reply = self.call(Command::DeviceGetRegionInfo, &[request.as_bytes()], &[])?;
            let Some(info) = read_struct::<RegionInfo>(&reply.payload) else {
                return protocol(Command::DeviceGetRegionInfo, "shorter than 32 bytes");
            };
            if info.argsz > argsz {
                if info.argsz > 64 << 10 {
                    return protocol(
                        Command::DeviceGetRegionInfo,
                        format!("argsz {} is absurd", info.argsz),
                    );
                }
                argsz = info.argsz;
                continue;
            }
            let (sparse_areas, region_type) =
                parse_caps(&reply.payload, info.cap_offset).map_err(|why| {
                    ClientError::Protocol {
                        command: Command::DeviceGetRegionInfo,
                        why,
                    }
                })?;
            return Ok(RegionDescription {
                info,
                sparse_areas,
                region_type,
                fd: if reply.fds.is_empty() {
                    None
                } else {
                    Some(reply.fds.remove(0))
                },
            });
        }
        protocol(
            Command::DeviceGetRegionInfo,
            "the server asked for more room twice",
        )
    }

    /// `DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let request = IrqInfo {
            argsz: 16,
            index,
            ..IrqInfo::default()
        };
        let reply = self.call(Command::DeviceGetIrqInfo, &[request.as_bytes()], &[])?;
        read_struct(&reply.payload).map_or_else(
            || protocol(Command::DeviceGetIrqInfo, "shorter than 16 bytes"),
            Ok,
        )
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
            argsz: size_of::<SetIrqs>() as u32,
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
            argsz: size_of::<SetIrqs>() as u32,
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
    fn chunk(&self) -> usize {
        let own = (crate::transport::DEFAULT_MAX_MESSAGE - (1 << 16)) as u64;
        self.server.max_data_xfer_size().clamp(1, own) as usize
    }

    /// Reads region `index` at `offset`, in transfers the server accepts.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let chunk = self.chunk();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let access = RegionAccess {
                offset: offset + (i * chunk) as u64,
                region: index,
                count: part.len() as u32,
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
                count: part.len() as u32,
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
            argsz: size_of::<DmaMap>() as u32,
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
            argsz: size_of::<DmaUnmap>() as u32,
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
            argsz: size_of::<DmaUnmap>() as u32,
            flags: DMA_UNMAP_FLAG_ALL,
            addr: 0,
            size: 0,
        };
        self.call(Command::DmaUnmap, &[unmap.as_bytes()], &[])?;
        Ok(())
    }

    /// v1 `DMA_UNMAP` with `GET_DIRTY_BITMAP`: unmaps and returns the range's dirty bitmap.
    pub fn dma_unmap_with_bitmap(&self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(size.div_ceil(pgsize.max(1)));
        let unmap = DmaUnmap {
            argsz: (size_of::<DmaUnmap>() + size_of::<DirtyBitmap>()) as u32 + bytes as u32,
            flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            addr: iova,
            size,
        };
        let bitmap = DirtyBitmap {
            pgsize,
            size: bytes,
        };
        let reply = self.call(
            Command::DmaUnmap,
            &[unmap.as_bytes(), bitmap.as_bytes()],
            &[],
        )?;
        words_at(
            &reply.payload,
            size_of::<DmaUnmap>() + size_of::<DirtyBitmap>(),
            bytes,
            Command::DmaUnmap,
        )
    }

    /// `DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    fn feature(&self, flags: u32, data: &[u8], reply_data: usize) -> Result<Vec<u8>> {
        let head = DeviceFeature {
            argsz: (size_of::<DeviceFeature>() + reply_data.max(data.len())) as u32,
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
        let size = max.min(self.chunk()) as u32;
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
                argsz: 8 + part.len() as u32,
                size: part.len() as u32,
            };
            self.call(Command::MigDataWrite, &[head.as_bytes(), part], &[])?;
        }
        Ok(())
    }

    /// v2 `DMA_LOGGING_START`; returns the page size the server chose.
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<u64> {
        let control = DmaLoggingControl {
            page_size,
            num_ranges: ranges.len() as u32,
            reserved: 0,
        };
        let mut data = control.as_bytes().to_vec();
        for &(iova, length) in ranges {
            data.extend_from_slice(DmaLoggingRange { iova, length }.as_bytes());
        }
        let reply = self.feature(FEATURE_DMA_LOGGING_START | FEATURE_SET, &data, data.len())?;
        read_struct::<DmaLoggingControl>(&reply).map_or_else(
            || {
                protocol(
                    Command::DeviceFeature,
                    "DMA_LOGGING_START reply shorter than 16 bytes",
                )
            },
            |c| Ok(c.page_size),
        )
    }

    /// v2 `DMA_LOGGING_STOP`.
    pub fn dma_logging_stop(&self) -> Result<()> {
        let control = DmaLoggingControl::default();
        self.feature(
            FEATURE_DMA_LOGGING_STOP | FEATURE_SET,
            control.as_bytes(),
            16,
        )?;
        Ok(())
    }

    /// v2 `DMA_LOGGING_REPORT`: the read-and-clear bitmap of `[iova, iova+length)`.
    pub fn dma_logging_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(length.div_ceil(page_size.max(1)));
        let report = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let data = self.feature(
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            report.as_bytes(),
            24 + bytes as usize,
        )?;
        words_at(
            &data,
            size_of::<DmaLoggingReport>(),
            bytes,
            Command::DeviceFeature,
        )
    }

    /// v1 `DIRTY_PAGES` START (true) or STOP (false).
    pub fn dirty_pages_log(&self, start: bool) -> Result<()> {
        let head = DirtyPages {
            argsz: 8,
            flags: if start {
                DIRTY_PAGES_FLAG_START
            } else {
                DIRTY_PAGES_FLAG_STOP
            },
        };
        self.call(Command::DirtyPages, &[head.as_bytes()], &[])?;
        Ok(())
    }

    /// v1 `DIRTY_PAGES` GET_BITMAP of `[iova, iova+size)` at `pgsize`.
    pub fn dirty_pages_bitmap(&self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u64>> {
        let bytes = vmig_dirty::bitmap_bytes(size.div_ceil(pgsize.max(1)));
        let head = DirtyPages {
            argsz: (size_of::<DirtyPages>() + size_of::<DirtyBitmapRange>()) as u32 + bytes as u32,
            flags: DIRTY_PAGES_FLAG_GET_BITMAP,
        };
        let range = DirtyBitmapRange {
            iova,
            size,
            bitmap: DirtyBitmap {
                pgsize,
                size: bytes,
            },
        };
        let reply = self.call(
            Command::DirtyPages,
            &[head.as_bytes(), range.as_bytes()],
            &[],
        )?;
        words_at(
            &reply.payload,
            size_of::<DirtyPages>() + size_of::<DirtyBitmapRange>(),
            bytes,
            Command::DirtyPages,
        )
    }

    /// Takes the record of guest pages (IOVA / 4096) the server wrote with `DMA_WRITE`.
    pub fn take_dma_written_pages(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dma_written.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
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

fn words_at(payload: &[u8], at: usize, bytes: u64, command: Command) -> Result<Vec<u64>> {
    let Some(raw) = payload.get(at..at + bytes as usize) else {
        return protocol(
            command,
            format!("the reply has no room for a {bytes}-byte bitmap"),
        );
    };
    Ok(vmig_dirty::le_bytes_to_words(raw))
}

/// What a region info's capabilities say: sparse areas (offset, size) and the region type.
type RegionCaps = (Vec<(u64, u64)>, Option<(u32, u32)>);

/// Sparse areas and region type from a region info's capability chain, with every offset
/// checked against the payload.
fn parse_caps(payload: &[u8], first: u32) -> std::result::Result<RegionCaps, String> {
    let mut areas = Vec::new();
    let mut region_type = None;
    let mut offset = first as usize;
    let mut hops = 0;
    while offset != 0 {
        hops += 1;
        if hops > 16 {
            return Err("the capability chain loops".into());
        }
        let header: CapHeader = payload.get(offset..).and_then(read_struct).ok_or_else(|| {
            format!(
                "a capability at {offset} is outside the {}-byte reply",
                payload.len()
            )
        })?;
        let body = &payload[offset + size_of::<CapHeader>()..];
        match header.id {
            REGION_INFO_CAP_SPARSE_MMAP => {
                let sparse: SparseMmap =
                    read_struct(body).ok_or("a sparse-mmap capability cut short")?;
                for i in 0..sparse.nr_areas as usize {
                    let at = size_of::<SparseMmap>() + i * size_of::<SparseArea>();
                    let area: SparseArea = body
                        .get(at..)
                        .and_then(read_struct)
                        .ok_or("sparse areas cut short")?;
                    areas.push((area.offset, area.size));
                }
            }
            REGION_INFO_CAP_TYPE => {
                let t: RegionType = read_struct(body).ok_or("a type capability cut short")?;
                region_type = Some((t.type_, t.subtype));
            }
            _ => {}
        }
        offset = header.next as usize;
    }
    Ok((areas, region_type))
}

fn serve_dma(
    endpoint: &Endpoint,
    memory: Option<&dyn DmaMemory>,
    written: &Mutex<BTreeSet<u64>>,
    message: Message,
) {
    let header = message.header;
    let head = read_struct::<DmaAccess>(&message.payload);
    let result = match (Command::from_u16(header.command), head, memory) {
        (_, _, None) => Err(libc::EINVAL),
        (Some(Command::DmaRead), Some(access), Some(memory)) => {
            if access.count > caps::DEFAULT_MAX_DATA_XFER_SIZE {
                // More than this client's max_data_xfer_size: refuse, never answer short.
                Err(libc::EINVAL)
            } else {
                let mut data = vec![0u8; access.count as usize];
                memory
                    .read(access.addr, &mut data)
                    .map(|()| [access.as_bytes(), &data].concat())
            }
        }
        (Some(Command::DmaWrite), Some(access), Some(memory)) => {
            let data = &message.payload[size_of::<DmaAccess>()..];
            if data.len() as u64 != access.count {
                Err(libc::EINVAL)
            } else {
                memory.write(access.addr, data).map(|()| {
                    if !data.is_empty() {
                        let first = access.addr / DMA_WRITE_PAGE;
                        let last = (access.addr + data.len() as u64 - 1) / DMA_WRITE_PAGE;
                        written
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(first..=last);
                    }
                    access.as_bytes().to_vec()
                })
            }
        }
        _ => Err(libc::EINVAL),
    };
    let _ = match result {
        Ok(payload) => endpoint.reply(&header, &[&payload], &[]),
        Err(errno) => endpoint.reply_error(&header, errno),
    };
}
