//! Every producer of dirty pages behind one trait, each merged into one guest-physical bitmap
//! per harvest.
//!
//! | source | start | harvest | stop |
//! |---|---|---|---|
//! | [`KvmSource`] (bitmap, clear-log, ring) | enable logging | `CpuDirtyLog::harvest` | disable |
//! | [`VmmSource`] (the VMM's own writes) | forget earlier writes | read-and-clear `vmm_dirty` | — |
//! | [`DeviceSource`] v2 | `DMA_LOGGING_START` | `DMA_LOGGING_REPORT` per mapping | `DMA_LOGGING_STOP` |
//! | [`DeviceSource`] v1 | `DIRTY_PAGES` START | `DIRTY_PAGES` GET_BITMAP per mapping | STOP |
//! | [`DeviceSource`] kernel VFIO | `DMA_LOGGING_START`, else the container's `DIRTY_PAGES` START | its report, or GET_BITMAP per mapping | its stop |
//! | [`MediatorSource`] (seed 002) | trap the mediator's areas | the ranges the mediator marks | map them again |
//!
//! Device bitmaps are by IOVA at the device's page size; they are translated through the DMA
//! mappings to guest-physical 4 KiB pages (a coarser device page dirties all its 4 KiB pages).
//! Pages a server wrote with `DMA_WRITE` messages are added too.

use std::sync::Arc;

use crate::device::MigratableDevice;
use crate::error::{MigrationError, Result, device_error};
use crate::mediator::MediatedDevice;
use vmig_dirty::DirtyBitmap;
use vmig_kvm::{CpuDirtyLog, GuestMemory, PAGE_SIZE, Vm};
use vmig_primitives::{DmaRange, Iova};

/// A producer of dirty guest pages.
pub trait DirtySource: Send {
    /// A name for reports.
    fn name(&self) -> String;
    /// Starts tracking: pages written from now on will be reported.
    fn start(&mut self) -> Result<()>;
    /// OR-merges the pages dirtied since the last harvest (or start) into `into`, by
    /// guest-physical page number, and forgets them; returns how many this source reported.
    fn harvest(&mut self, into: &DirtyBitmap) -> Result<u64>;
    /// Stops tracking.
    fn stop(&mut self) -> Result<()>;
    /// Whether it reports every page it covers at every harvest, whatever was written (type1
    /// for a device without tracking of its own): slowing the vCPUs cannot shrink that.
    fn reports_everything(&self) -> bool {
        false
    }
}

/// KVM's tracking of CPU writes, in whatever mode the VM was built with.
#[derive(Debug)]
pub struct KvmSource(pub Arc<CpuDirtyLog>);

impl DirtySource for KvmSource {
    fn name(&self) -> String {
        format!("cpu (kvm {})", self.0.mode())
    }

    fn start(&mut self) -> Result<()> {
        Ok(self.0.start()?)
    }

    fn harvest(&mut self, into: &DirtyBitmap) -> Result<u64> {
        Ok(self.0.harvest(into)?)
    }

    fn stop(&mut self) -> Result<()> {
        Ok(self.0.stop()?)
    }
}

/// Pages the VMM itself wrote into guest memory (setup, message-based DMA).
#[derive(Debug)]
pub struct VmmSource(pub Arc<GuestMemory>);

impl DirtySource for VmmSource {
    fn name(&self) -> String {
        "vmm".into()
    }

    fn start(&mut self) -> Result<()> {
        // Everything written so far goes in the first pass anyway.
        let _ = self.0.vmm_dirty().harvest();
        Ok(())
    }

    fn harvest(&mut self, into: &DirtyBitmap) -> Result<u64> {
        let snapshot = self.0.vmm_dirty().harvest();
        let count = snapshot.count();
        merge(into, 0, snapshot.words(), snapshot.pages())?;
        Ok(count)
    }

    fn stop(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One DMA mapping: IOVA range and the guest-physical address it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Guest-physical address of `iova`.
    pub gpa: u64,
}

impl Mapping {
    /// Every RAM slot of `memory` as the engine maps it for devices: IOVA = guest-physical
    /// address.
    pub fn guest_ram(memory: &GuestMemory) -> Vec<Self> {
        memory
            .layout()
            .slots
            .iter()
            .map(|s| Self {
                iova: s.gpa,
                size: s.size,
                gpa: s.gpa,
            })
            .collect()
    }
}

/// A device's DMA dirty log, in whichever way the device keeps it ([`crate::device::DirtyLogKind`]).
pub struct DeviceSource {
    name: String,
    device: Arc<dyn MigratableDevice>,
    mappings: Vec<Mapping>,
    page_size: u64,
}

impl std::fmt::Debug for DeviceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSource")
            .field("name", &self.name)
            .field("kind", &self.device.dirty_log_kind())
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

impl DeviceSource {
    /// The log of device `name` over `mappings`.
    pub fn new(name: &str, device: Arc<dyn MigratableDevice>, mappings: Vec<Mapping>) -> Self {
        Self {
            name: name.to_string(),
            device,
            mappings,
            page_size: PAGE_SIZE,
        }
    }
}

impl DirtySource for DeviceSource {
    fn name(&self) -> String {
        format!(
            "device {} ({})",
            self.name,
            self.device.dirty_log_kind().name()
        )
    }

    fn start(&mut self) -> Result<()> {
        let ranges: Vec<DmaRange> = self
            .mappings
            .iter()
            .map(|m| DmaRange::new(Iova(m.iova), m.size))
            .collect();
        let page_size = self
            .device
            .dirty_log_start(PAGE_SIZE, &ranges)
            .map_err(device_error(&self.name))?;
        if !page_size.is_power_of_two() || page_size < PAGE_SIZE {
            let _ = self.stop();
            return Err(MigrationError::device(
                self.name.clone(),
                format!(
                    "dirty tracking at a page size of {page_size}: expected a power of two of at least 4096"
                ),
            ));
        }
        self.page_size = page_size;
        tracing::debug!(device = %self.name, kind = self.device.dirty_log_kind().name(), page_size, "device dirty log started");
        Ok(())
    }

    fn harvest(&mut self, into: &DirtyBitmap) -> Result<u64> {
        let mut count = message_dma_pages(self.device.as_ref(), &self.mappings, into);
        for m in &self.mappings {
            let words = self
                .device
                .dirty_log_report(m.iova, m.size, self.page_size)
                .map_err(device_error(&self.name))?;
            let device_pages = m.size.div_ceil(self.page_size);
            let shift = (self.page_size / PAGE_SIZE).trailing_zeros();
            let first = m.gpa / PAGE_SIZE;
            let pages = m.size / PAGE_SIZE;
            if shift == 0 {
                count += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                merge(into, first, &words, pages)?;
            } else {
                let coarse = vmig_dirty::DirtySnapshot::from_words(words, device_pages)?;
                coarse.for_each_run(|c, n| {
                    let lo = c << shift;
                    let hi = ((c + n) << shift).min(pages);
                    count += hi - lo;
                    let _ = into.set_range(first + lo, hi - lo);
                });
            }
        }
        Ok(count)
    }

    fn stop(&mut self) -> Result<()> {
        self.device
            .dirty_log_stop()
            .map_err(device_error(&self.name))
    }

    fn reports_everything(&self) -> bool {
        self.device.dirty_log_reports_everything()
    }
}

/// The guest page of IOVA `iova` through `mappings`.
fn guest_page(mappings: &[Mapping], iova: u64) -> Option<u64> {
    mappings
        .iter()
        .find(|m| iova >= m.iova && iova - m.iova < m.size)
        .map(|m| (iova - m.iova + m.gpa) / PAGE_SIZE)
}

/// Marks the pages `device` wrote by message rather than by DMA since the last call; returns
/// how many.
fn message_dma_pages(
    device: &dyn MigratableDevice,
    mappings: &[Mapping],
    into: &DirtyBitmap,
) -> u64 {
    let mut count = 0;
    for iova_page in device.take_message_dma_pages() {
        if let Some(page) = iova_page
            .checked_mul(PAGE_SIZE)
            .and_then(|iova| guest_page(mappings, iova))
        {
            count += 1;
            let _ = into.set(page);
        }
    }
    count
}

/// A device's DMA as its migration mediator derives it ([`crate::mediator`]): starting traps
/// the mediator's areas, each harvest marks the ranges it names, stopping (or dropping the
/// source) maps the areas again.
pub struct MediatorSource<'a> {
    name: String,
    vm: &'a Vm,
    device: Arc<dyn MigratableDevice>,
    mediation: Arc<MediatedDevice>,
    mappings: Vec<Mapping>,
    engaged: bool,
}

impl<'a> MediatorSource<'a> {
    /// The mediated DMA of device `name` of `vm`, over `mappings`.
    pub fn new(
        name: &str,
        vm: &'a Vm,
        device: Arc<dyn MigratableDevice>,
        mediation: Arc<MediatedDevice>,
        mappings: Vec<Mapping>,
    ) -> Self {
        Self {
            name: name.to_string(),
            vm,
            device,
            mediation,
            mappings,
            engaged: false,
        }
    }
}

impl DirtySource for MediatorSource<'_> {
    fn name(&self) -> String {
        format!(
            "device {} (mediator {}, handle {})",
            self.name,
            self.mediation.mediator,
            self.mediation.handle().handle()
        )
    }

    fn start(&mut self) -> Result<()> {
        self.mediation
            .engage(self.vm, self.device.as_ref(), &self.name)?;
        self.engaged = true;
        Ok(())
    }

    fn harvest(&mut self, into: &DirtyBitmap) -> Result<u64> {
        let mut count = message_dma_pages(self.device.as_ref(), &self.mappings, into);
        let mut outside = None;
        self.mediation.handle().harvest(
            self.device.as_ref(),
            self.vm.memory(),
            &mut |iova, len| {
                let end = iova.saturating_add(len.max(1));
                let mut page = iova / PAGE_SIZE * PAGE_SIZE;
                while page < end {
                    match guest_page(&self.mappings, page) {
                        Some(gpn) => {
                            count += u64::from(into.set(gpn).is_ok());
                        }
                        None => outside = Some(page),
                    }
                    page = page.saturating_add(PAGE_SIZE);
                }
            },
        )?;
        if let Some(iova) = outside {
            // The device could not write there either (its DMA would fault): nothing to send.
            tracing::debug!(device = %self.name, iova, "the mediator marked an IOVA outside guest RAM");
        }
        Ok(count)
    }

    fn stop(&mut self) -> Result<()> {
        if std::mem::take(&mut self.engaged) {
            self.mediation.release(self.vm, &self.name);
        }
        Ok(())
    }
}

impl Drop for MediatorSource<'_> {
    fn drop(&mut self) {
        // A migration that ended without stopping its sources still maps the areas again.
        let _ = self.stop();
    }
}

fn merge(into: &DirtyBitmap, first: u64, words: &[u64], pages: u64) -> Result<()> {
    into.merge_words(first, words, pages).map_err(|e| {
        MigrationError::Invalid(format!(
            "merging a dirty bitmap of {pages} pages at page {first}: {e}"
        ))
    })
}
