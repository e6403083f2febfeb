//! What a device author implements: the [`Device`] trait, the [`DeviceSpec`] of regions and
//! IRQs it is made of, the [`DeviceContext`] through which it does DMA and raises IRQs, and the
//! one error every refusal takes, [`Refusal`]: the errno of the error reply and what was wrong.
//! The decoder of client requests refuses with it too, so a malformed request and a device's
//! "no" reach the client the same way.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::dma::Dma;
use super::irqs::Irqs;
use super::pci::PciFunction;

/// A refusal by the device or the framework: the errno of the error reply, what was wrong,
/// and the cause when another layer refused first (shown after the message, and as the
/// error's source).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// errno of the error reply.
    pub errno: i32,
    /// What was wrong and what was expected.
    pub message: String,
    /// The refusal of the layer below, if any.
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match &self.source {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Refusal {
    /// An `EINVAL` refusal.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// A refusal with `errno`.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
            source: None,
        }
    }

    /// A refusal with `errno` because of `source`.
    pub fn caused(
        errno: i32,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            errno,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl PartialEq for Refusal {
    /// The same errno and message (the cause is not compared).
    fn eq(&self, other: &Self) -> bool {
        self.errno == other.errno && self.message == other.message
    }
}

impl Eq for Refusal {}

impl From<vmig_dma::DmaError> for Refusal {
    /// The IOMMU's refusal of a client's request, with the IOMMU's errno.
    fn from(e: vmig_dma::DmaError) -> Self {
        Self::caused(e.errno(), "the IOMMU refused the request", e)
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
    /// The PCI function whose config space the framework serves as region 7, with its MSI-X
    /// table and PBA in their BAR; the device sees none of those accesses. `None`: the
    /// device serves region 7 itself.
    pub config_space: Option<PciFunction>,
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
    pub(super) dma: Arc<Dma>,
    pub(super) irqs: Arc<Irqs>,
    pub(super) pci: Option<PciFunction>,
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext").finish_non_exhaustive()
    }
}

impl DeviceContext {
    /// Reads guest memory at `iova`.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        self.dma.read(iova, buf)
    }

    /// Writes guest memory at `iova` (recorded as dirty).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), Refusal> {
        self.dma.write(iova, data)
    }

    /// Signals vector `vector` of IRQ index `index`, if the client wired it and did not mask
    /// it (a masked vector holds the signal until it is unmasked). With a PCI function, MSI
    /// and MSI-X signal only while enabled, and a vector masked in the function is held as
    /// pending there; INTx is asserted until [`DeviceContext::deassert_intx`].
    pub fn trigger_irq(&self, index: u32, vector: u32) -> bool {
        match &self.pci {
            Some(pci) => pci.signal(index, vector, &self.irqs),
            None => self.irqs.trigger(index, vector),
        }
    }

    /// Signals `vector` the way the driver set the PCI function up: MSI-X if enabled, else
    /// MSI, else INTx (asserted until [`DeviceContext::deassert_intx`]). Without a PCI
    /// function: MSI-X vector `vector`.
    pub fn signal_interrupt(&self, vector: u32) -> bool {
        match &self.pci {
            Some(pci) => pci.signal_interrupt(vector, &self.irqs),
            None => self.irqs.trigger(crate::wire::IRQ_INDEX_MSIX, vector),
        }
    }

    /// Deasserts INTx (the condition the device raised it for is gone).
    pub fn deassert_intx(&self) {
        if let Some(pci) = &self.pci {
            pci.deassert_intx(&self.irqs);
        }
    }
}

/// A device served over vfio-user.
pub trait Device: Send {
    /// Regions and IRQs (asked once per connection).
    fn spec(&self) -> DeviceSpec;
    /// Reads `data.len()` bytes of region `index` at `offset` (inside the region, checked).
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal>;
    /// Writes region `index` at `offset` (inside the region, checked).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal>;
    /// Resets the device.
    fn reset(&mut self) -> Result<(), Refusal> {
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
    /// Whether the framework tracks the device's DMA for the client: v2 DMA logging and v1
    /// `DIRTY_PAGES` over the connection's IOMMU. False for a device whose DMA nothing tracks
    /// (seed 002's SR-IOV VF, "There's still no IOMMU Dirty bit available"): both are then
    /// refused with `ENOTTY` (a `PROBE` of DMA logging too), so a client learns that only a
    /// mediator can tell which pages the device writes.
    fn logs_dma(&self) -> bool {
        true
    }
    /// Stops (false) or restarts (true) the device's own activity, DMA included. When this
    /// returns false, the device makes no change to its state or to guest memory.
    fn set_running(&mut self, _running: bool) -> Result<(), Refusal> {
        Ok(())
    }
    /// One record of state: `last` is false while running (PRE_COPY), true when stopped.
    fn save(&mut self, _last: bool) -> Result<Vec<u8>, Refusal> {
        Err(Refusal::new(
            libc::ENOTSUP,
            "this device cannot save its state",
        ))
    }
    /// Loads one record saved by [`Device::save`] (records arrive in the order they were saved).
    fn load(&mut self, _record: &[u8]) -> Result<(), Refusal> {
        Err(Refusal::new(libc::ENOTSUP, "this device cannot load state"))
    }
}
