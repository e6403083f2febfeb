//! `dma-engine`: a device that writes guest memory on its own, like a NIC receiving packets.
//!
//! The driver gives it a ring of buffer addresses; a device thread writes one stamped record
//! into the next buffer at the programmed rate, advances `PRODUCER` and signals MSI-X vector 0.
//! It never overwrites a buffer the driver has not consumed (`PRODUCER - CONSUMER < RING_SIZE`;
//! otherwise it counts a stall and waits). Every record carries its sequence number (the
//! producer index) and a checksum, so a record lost, torn or written twice across a migration
//! shows as a gap, a bad checksum or a repeat in the sequence.
//!
//! BAR0 (4 KiB, trapped; u64 registers, little-endian; reads have no side effects and answer in
//! every state, showing the frozen state when stopped):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x00 | `ID` = "DMAENGN1" | RO |
//! | 0x08 | `CTRL` (bit 0: enable) | RW |
//! | 0x10 | `RING_BASE` (IOVA of `RING_SIZE` u64 buffer addresses) | RW |
//! | 0x18 | `RING_SIZE` (entries, 1 to 65536) | RW |
//! | 0x20 | `PRODUCER` (records written so far) | RO |
//! | 0x28 | `CONSUMER` (records the driver consumed) | RW |
//! | 0x30 | `RATE` (records per second) | RW |
//! | 0x38 | `SEED` (of the records' payload) | RW |
//! | 0x40 | `STALLS` (times the ring was full) | RO |
//! | 0x48 | `DMA_ERRORS` (failed DMA) | RO |
//!
//! BAR2 (4 KiB, read-only, mmappable through one sparse area): the status page, whose word 0
//! mirrors `PRODUCER`, so a driver that maps it polls for new records without an exit (as
//! shadow doorbells do). It is derived state: a restored or reset engine rewrites it.
//!
//! Two [`Options`] make it the device of seed 002 (an SR-IOV VF whose DMA nothing tracks):
//! - **a doorbell page**: BAR0 is 8 KiB, and its second page (mmappable through one sparse
//!   area) holds the doorbell at 0x1000, the `CONSUMER` the guest writes, which the device
//!   reads from there before each record. Mapped into the guest, doorbell writes cause no exit;
//!   trapped (a mediator during migration), a write there is a region write like any other.
//!   `CONSUMER` at 0x28 reads and writes the same value. A value the guest stores that
//!   `CONSUMER` would refuse is ignored (the device keeps the last good one);
//! - **hidden DMA**: the device's DMA writes go straight into guest memory and nothing logs
//!   them: the framework refuses DMA logging and `DIRTY_PAGES` ([`Device::logs_dma`]), so
//!   only its mediator ([`mediator`]) can tell a migration which pages it writes.
//!
//! A record (64 bytes): magic "DMAREC01", sequence, payload (5 words from a xorshift of the
//! seed and the sequence), checksum of the 7 words before it.
//!
//! PCI config space (region 7, served by the framework's [`PciFunction`]): a PCI Express
//! endpoint (4 KiB of config space), vendor 0x1234, device 0x7a01, class 0xff0000 (other);
//! BAR0 and BAR2 are 32-bit memory BARs of 4 KiB. It signals each record on vector 0 of
//! whichever interrupt the driver enabled: MSI-X (1 vector; table at BAR0 + 0x800, PBA at
//! BAR0 + 0xc00), MSI (1 vector, maskable) or INTx, which stays asserted until the driver
//! consumes every record (`CONSUMER` = `PRODUCER`).

pub mod driver;
pub mod mediator;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmig_primitives::HostMemory;
use vmig_vfio_user::server::*;
use vmig_vfio_user::wire::{IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE};

/// `ID` register value.
pub const ID: u64 = u64::from_le_bytes(*b"DMAENGN1");
/// Record magic.
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"DMAREC01");
/// Bytes per record.
pub const RECORD_SIZE: usize = 64;
/// BAR0 size (without a doorbell page).
pub const BAR0_SIZE: u64 = 4096;
/// BAR0 size with a doorbell page.
pub const BAR0_SIZE_WITH_DOORBELL: u64 = 2 * vmig_primitives::PAGE_SIZE;
/// Where in BAR0 the doorbell page is, when there is one.
pub const DOORBELL_PAGE: u64 = vmig_primitives::PAGE_SIZE;
/// Where in BAR0 the MSI-X table and PBA lie.
pub const MSIX_TABLE_OFFSET: u32 = 0x800;
/// Where in BAR0 the MSI-X PBA lies.
pub const MSIX_PBA_OFFSET: u32 = 0xc00;
/// The status page's region (BAR2) and size.
pub const STATUS_REGION: u32 = 2;
/// Bytes of the status page.
pub const STATUS_SIZE: u64 = vmig_primitives::PAGE_SIZE;
/// Register offsets.
pub mod reg {
    /// `ID`.
    pub const ID: u64 = 0x00;
    /// `CTRL`.
    pub const CTRL: u64 = 0x08;
    /// `RING_BASE`.
    pub const RING_BASE: u64 = 0x10;
    /// `RING_SIZE`.
    pub const RING_SIZE: u64 = 0x18;
    /// `PRODUCER`.
    pub const PRODUCER: u64 = 0x20;
    /// `CONSUMER`.
    pub const CONSUMER: u64 = 0x28;
    /// `RATE`.
    pub const RATE: u64 = 0x30;
    /// `SEED`.
    pub const SEED: u64 = 0x38;
    /// `STALLS`.
    pub const STALLS: u64 = 0x40;
    /// `DMA_ERRORS`.
    pub const DMA_ERRORS: u64 = 0x48;
    /// The doorbell (`CONSUMER`, in the doorbell page), when there is one.
    pub const DOORBELL: u64 = super::DOORBELL_PAGE;
}
const MAX_RING: u64 = 65536;
/// PCI vendor id.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device id.
pub const DEVICE_ID: u16 = 0x7a01;
/// Region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"DMAESTA2");

/// The engine's PCI function: BAR2 only when the status page exists.
fn pci_spec(status_page: bool, bar0_size: u64) -> PciSpec {
    let bar = |size| Bar {
        size,
        kind: BarKind::Memory32,
    };
    let mut bars = [None; 6];
    bars[0] = Some(bar(bar0_size));
    bars[STATUS_REGION as usize] = status_page.then_some(bar(STATUS_SIZE));
    PciSpec {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID,
        subsystem_vendor_id: VENDOR_ID,
        subsystem_id: DEVICE_ID,
        revision: 1,
        class: 0xff_0000,
        bars,
        intx: true,
        msi: Some(MsiSpec {
            vectors: 1,
            per_vector_mask: true,
        }),
        msix: Some(MsixSpec {
            vectors: 1,
            table_bar: 0,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: 0,
            pba_offset: MSIX_PBA_OFFSET,
        }),
        express: true,
    }
}

/// The registers, which are the whole device state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    /// `CTRL`.
    pub ctrl: u64,
    /// `RING_BASE`.
    pub ring_base: u64,
    /// `RING_SIZE`.
    pub ring_size: u64,
    /// `PRODUCER`.
    pub producer: u64,
    /// `CONSUMER`.
    pub consumer: u64,
    /// `RATE`.
    pub rate: u64,
    /// `SEED`.
    pub seed: u64,
    /// `STALLS`.
    pub stalls: u64,
    /// `DMA_ERRORS`.
    pub dma_errors: u64,
}

impl Registers {
    const WORDS: usize = 9;

    fn read(&self, offset: u64) -> u64 {
        match offset {
            reg::ID => ID,
            reg::CTRL => self.ctrl,
            reg::RING_BASE => self.ring_base,
            reg::RING_SIZE => self.ring_size,
            reg::PRODUCER => self.producer,
            reg::CONSUMER => self.consumer,
            reg::RATE => self.rate,
            reg::SEED => self.seed,
            reg::STALLS => self.stalls,
            reg::DMA_ERRORS => self.dma_errors,
            reg::DOORBELL => self.consumer,
            _ => 0,
        }
    }

    fn to_words(self) -> [u64; Self::WORDS] {
        [
            self.ctrl,
            self.ring_base,
            self.ring_size,
            self.producer,
            self.consumer,
            self.rate,
            self.seed,
            self.stalls,
            self.dma_errors,
        ]
    }

    fn from_words(w: &[u64]) -> Self {
        Self {
            ctrl: w[0],
            ring_base: w[1],
            ring_size: w[2],
            producer: w[3],
            consumer: w[4],
            rate: w[5],
            seed: w[6],
            stalls: w[7],
            dma_errors: w[8],
        }
    }
}

/// The record the device writes for sequence `seq` with `seed`.
pub fn record(seed: u64, seq: u64) -> [u64; 8] {
    let mut x = seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut words = [0u64; 8];
    words[0] = RECORD_MAGIC;
    words[1] = seq;
    for w in &mut words[2..7] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    words[7] = checksum(&words[..7]);
    words
}

fn checksum(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(17)
    })
}

/// Checks a record read from a buffer: `Ok(seq)` or what is wrong with it.
pub fn check_record(bytes: &[u8], seed: u64) -> Result<u64, String> {
    if bytes.len() < RECORD_SIZE {
        return Err(format!("{} bytes, a record has {RECORD_SIZE}", bytes.len()));
    }
    let words: Vec<u64> = bytes[..RECORD_SIZE]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    if words[0] != RECORD_MAGIC {
        return Err(format!("magic {:#x}", words[0]));
    }
    if words[..] != record(seed, words[1])[..] {
        return Err(format!(
            "record {} does not match its payload or checksum",
            words[1]
        ));
    }
    Ok(words[1])
}

struct Shared {
    regs: Registers,
    /// Cleared by `set_running(false)`; the worker parks.
    running: bool,
    /// The worker is between records (not holding a DMA in flight).
    idle: bool,
    ctx: Option<DeviceContext>,
    quit: bool,
    /// The status page, then the doorbell page if there is one (absent if the memfd could not
    /// be made).
    pages: Option<HostMemory>,
    doorbell_page: bool,
}

/// Where in the pages' memfd the doorbell is (the page after the status page).
const DOORBELL_WORD: usize = vmig_primitives::PAGE_BYTES;

/// Whether the driver may say it consumed `consumer` records when `producer` were produced
/// into a ring of `ring_size`.
fn consumer_allowed(consumer: u64, producer: u64, ring_size: u64) -> bool {
    consumer <= producer && producer - consumer <= ring_size.max(1)
}

impl Shared {
    /// Mirrors `PRODUCER` into the status page.
    fn publish(&self) {
        if let Some(pages) = &self.pages {
            let _ = pages.store_u64(0, self.regs.producer);
        }
    }

    /// Takes the doorbell the guest wrote into the doorbell page, if it is one `CONSUMER`
    /// accepts (else the last good one stays, and is written back).
    fn take_doorbell(&mut self) {
        let Some(pages) = self.pages.as_ref().filter(|_| self.doorbell_page) else {
            return;
        };
        let at = DOORBELL_WORD;
        match pages.load_u64(at) {
            Ok(value) if value == self.regs.consumer => {}
            Ok(value) if consumer_allowed(value, self.regs.producer, self.regs.ring_size) => {
                self.set_consumer(value);
            }
            _ => {
                let _ = pages.store_u64(at, self.regs.consumer);
            }
        }
    }

    /// `CONSUMER` becomes `value` (allowed), in the register and the doorbell page; INTx
    /// drops when every record is consumed.
    fn set_consumer(&mut self, value: u64) {
        self.regs.consumer = value;
        if self.doorbell_page
            && let Some(pages) = &self.pages
        {
            let _ = pages.store_u64(DOORBELL_WORD, value);
        }
        if value == self.regs.producer
            && let Some(ctx) = &self.ctx
        {
            ctx.deassert_intx();
        }
    }
}

struct Inner {
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which migration protocol the engine offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// The v1 migration region.
    V1,
    /// v2 with PRE_COPY.
    V2,
}

/// How a dma-engine presents itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// The migration protocol it offers.
    pub migration: Migration,
    /// `CONSUMER` in a mappable doorbell page of BAR0 (see the module doc).
    pub doorbell_page: bool,
    /// Its DMA is tracked (DMA logging, `DIRTY_PAGES`); false hides it.
    pub logs_dma: bool,
}

impl Options {
    /// The plain engine: doorbell in the trapped registers, DMA tracked.
    pub fn new(migration: Migration) -> Self {
        Self {
            migration,
            doorbell_page: false,
            logs_dma: true,
        }
    }

    /// Seed 002's device: a mappable doorbell page and DMA that nothing tracks.
    pub fn hidden_dma(migration: Migration) -> Self {
        Self {
            migration,
            doorbell_page: true,
            logs_dma: false,
        }
    }
}

/// The device.
pub struct DmaEngine {
    inner: Arc<Inner>,
    pci: PciFunction,
    worker: Option<JoinHandle<()>>,
    options: Options,
    /// The status page at 0, the doorbell page after it (if any).
    pages_fd: Option<Arc<std::os::fd::OwnedFd>>,
}

impl DmaEngine {
    /// A stopped engine (CTRL 0) offering `migration`.
    pub fn new(migration: Migration) -> Self {
        Self::with_options(Options::new(migration))
    }

    /// A stopped engine (CTRL 0) as `options` say.
    pub fn with_options(options: Options) -> Self {
        let pages_len = if options.doorbell_page {
            STATUS_SIZE + vmig_primitives::PAGE_SIZE
        } else {
            STATUS_SIZE
        };
        // The pages are offered only with their mapping: both or neither.
        let (pages_fd, pages) = vmig_primitives::memfd("dma-engine-pages", pages_len)
            .and_then(|fd| {
                use std::os::fd::AsFd;
                let pages = HostMemory::map_fd(fd.as_fd(), 0, pages_len, true)?;
                Ok((fd, pages))
            })
            .map_or((None, None), |(fd, pages)| (Some(fd), Some(pages)));
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared {
                regs: Registers::default(),
                running: true,
                idle: true,
                ctx: None,
                quit: false,
                pages,
                doorbell_page: options.doorbell_page,
            }),
            changed: Condvar::new(),
        });
        let worker = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("dma-engine".into())
                .spawn(move || work(&inner))
                .ok()
        };
        #[expect(
            clippy::expect_used,
            reason = "the spec is a constant that PciFunction's tests accept"
        )]
        let pci = PciFunction::new(pci_spec(pages_fd.is_some(), options.bar0_size()))
            .expect("a valid PCI spec");
        Self {
            inner,
            pci,
            worker,
            options,
            pages_fd: pages_fd.map(Arc::new),
        }
    }

    /// The registers now.
    pub fn registers(&self) -> Registers {
        let mut s = self.inner.lock();
        s.take_doorbell();
        s.regs
    }
}

impl Options {
    /// Bytes of BAR0.
    pub fn bar0_size(&self) -> u64 {
        if self.doorbell_page {
            BAR0_SIZE_WITH_DOORBELL
        } else {
            BAR0_SIZE
        }
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.inner.lock().quit = true;
        self.inner.changed.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The device thread: one record per tick while enabled, running, connected and the ring has
/// room.
fn work(inner: &Inner) {
    let mut next = Instant::now();
    loop {
        let regs = {
            let mut s = inner.lock();
            loop {
                if s.quit {
                    return;
                }
                let ready = s.running
                    && s.ctx.is_some()
                    && s.regs.ctrl & 1 != 0
                    && s.regs.rate > 0
                    && s.regs.ring_size > 0;
                if ready {
                    break;
                }
                s.idle = true;
                inner.changed.notify_all();
                s = inner.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                next = Instant::now();
            }
            s.idle = false;
            s.regs
        };
        let rate = u32::try_from(regs.rate.min(10_000_000)).unwrap_or(10_000_000);
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let now = Instant::now();
        if next > now {
            // Sleep without holding the lock; a stop request is answered after this record.
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            if Instant::now() < next {
                inner.lock().idle = true;
                inner.changed.notify_all();
                continue;
            }
        }
        next += period;
        if next + Duration::from_millis(100) < Instant::now() {
            next = Instant::now(); // do not burst after a long pause
        }
        let mut s = inner.lock();
        // The context of now, not of before the sleep: the client may have changed.
        let Some(ctx) = s.ctx.clone() else {
            s.idle = true;
            inner.changed.notify_all();
            continue;
        };
        if !s.running || s.quit || s.regs.ctrl & 1 == 0 || s.regs.ring_size == 0 {
            s.idle = true;
            inner.changed.notify_all();
            continue;
        }
        s.take_doorbell();
        if s.regs.producer.wrapping_sub(s.regs.consumer) >= s.regs.ring_size {
            s.regs.stalls = s.regs.stalls.wrapping_add(1);
            s.idle = true;
            inner.changed.notify_all();
            continue;
        }
        // The DMA happens with the state locked: a stop waits for the record to be whole.
        let index = s.regs.producer % s.regs.ring_size;
        let mut address = [0u8; 8];
        let written = ctx
            .dma_read(s.regs.ring_base.wrapping_add(index * 8), &mut address)
            .and_then(|()| {
                let words = record(s.regs.seed, s.regs.producer);
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                ctx.dma_write(u64::from_le_bytes(address), &bytes)
            });
        match written {
            Ok(()) => {
                s.regs.producer = s.regs.producer.wrapping_add(1);
                s.publish();
                ctx.signal_interrupt(0);
            }
            Err(_) => s.regs.dma_errors = s.regs.dma_errors.wrapping_add(1),
        }
        s.idle = true;
        inner.changed.notify_all();
    }
}

impl Device for DmaEngine {
    fn spec(&self) -> DeviceSpec {
        DeviceSpec {
            pci: true,
            config_space: Some(self.pci.clone()),
            reset: true,
            regions: (0..=CONFIG_REGION)
                .map(|index| {
                    let size = match index {
                        0 => self.options.bar0_size(),
                        STATUS_REGION if self.pages_fd.is_some() => STATUS_SIZE,
                        CONFIG_REGION => self.pci.config_size(),
                        _ => 0,
                    };
                    // The status page is at file offset 0; BAR0's doorbell page after it, so
                    // BAR0's offsets are the file's.
                    let mapped_area = match index {
                        STATUS_REGION => Some((0, STATUS_SIZE)),
                        0 if self.options.doorbell_page => {
                            Some((DOORBELL_PAGE, vmig_primitives::PAGE_SIZE))
                        }
                        _ => None,
                    };
                    RegionSpec {
                        size,
                        readable: size > 0,
                        writable: size > 0 && index != STATUS_REGION,
                        mmap: self.pages_fd.as_ref().zip(mapped_area).map(|(fd, area)| {
                            RegionMmap {
                                fd: Arc::clone(fd),
                                offset: 0,
                                areas: vec![area],
                            }
                        }),
                        ..RegionSpec::default()
                    }
                })
                .collect(),
            irqs: vec![
                IrqSpec {
                    count: 1,
                    flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                },
                IrqSpec {
                    count: 1,
                    flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
                },
                IrqSpec {
                    count: 1,
                    flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
                },
            ],
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        if index == STATUS_REGION {
            let producer = self.inner.lock().regs.producer.to_le_bytes();
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = usize::try_from(offset)
                    .ok()
                    .and_then(|at| producer.get(at.checked_add(i)?))
                    .copied()
                    .unwrap_or(0);
            }
            return Ok(());
        }
        if index != 0 {
            return Err(Refusal::invalid(format!(
                "region {index}: the dma-engine has BAR0, BAR2 and config space"
            )));
        }
        let regs = self.registers();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = regs.read(at & !7).to_le_bytes()[(at & 7) as usize];
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        if index != 0 || !offset.is_multiple_of(8) || data.len() != 8 {
            return Err(Refusal::invalid(
                "dma-engine registers are written as aligned u64s",
            ));
        }
        let value = u64::from_le_bytes(data.try_into().unwrap_or_default());
        let mut s = self.inner.lock();
        s.take_doorbell();
        let doorbell = self.options.doorbell_page && offset == reg::DOORBELL;
        let offset = if doorbell { reg::CONSUMER } else { offset };
        let r = &mut s.regs;
        match offset {
            reg::CTRL => r.ctrl = value & 1,
            reg::RING_BASE => r.ring_base = value,
            reg::RING_SIZE if value <= MAX_RING => r.ring_size = value,
            reg::RING_SIZE => {
                return Err(Refusal::invalid(format!(
                    "RING_SIZE {value}: at most {MAX_RING}"
                )));
            }
            reg::CONSUMER if consumer_allowed(value, r.producer, r.ring_size) => {
                s.set_consumer(value);
            }
            reg::CONSUMER => {
                return Err(Refusal::invalid(format!(
                    "CONSUMER {value} with PRODUCER {}",
                    r.producer
                )));
            }
            reg::RATE => r.rate = value,
            reg::SEED => r.seed = value,
            _ => {
                return Err(Refusal::invalid(format!(
                    "register {offset:#x} is read-only or does not exist"
                )));
            }
        }
        drop(s);
        self.inner.changed.notify_all();
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Refusal> {
        let mut s = self.inner.lock();
        s.regs = Registers::default();
        s.running = true;
        s.publish();
        s.set_consumer(0);
        drop(s);
        self.inner.changed.notify_all();
        Ok(())
    }

    fn connect(&mut self, ctx: DeviceContext) {
        self.inner.lock().ctx = Some(ctx);
        self.inner.changed.notify_all();
    }

    fn disconnect(&mut self) {
        self.inner.lock().ctx = None;
        self.inner.changed.notify_all();
    }

    fn migration(&self) -> MigrationSupport {
        match self.options.migration {
            Migration::V1 => MigrationSupport::V1,
            Migration::V2 => MigrationSupport::V2 { pre_copy: true },
        }
    }

    fn set_running(&mut self, running: bool) -> Result<(), Refusal> {
        let mut s = self.inner.lock();
        s.running = running;
        self.inner.changed.notify_all();
        if !running {
            // Wait for the record in progress: no DMA after this returns.
            while !s.idle {
                s = self
                    .inner
                    .changed
                    .wait(s)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        Ok(())
    }

    fn logs_dma(&self) -> bool {
        self.options.logs_dma
    }

    fn save(&mut self, _last: bool) -> Result<Vec<u8>, Refusal> {
        let mut s = self.inner.lock();
        s.take_doorbell();
        let mut out = STATE_MAGIC.to_le_bytes().to_vec();
        for w in s.regs.to_words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.pci.save());
        Ok(out)
    }

    fn load(&mut self, record: &[u8]) -> Result<(), Refusal> {
        let registers_end = 8 * (Registers::WORDS + 1);
        let expected = registers_end + self.pci.saved_len();
        if record.len() != expected || record[..8] != STATE_MAGIC.to_le_bytes() {
            return Err(Refusal::invalid(format!(
                "a dma-engine state record is {expected} bytes starting \"DMAESTA2\" (the \
                 registers, then the PCI function); got {} bytes",
                record.len()
            )));
        }
        let words: Vec<u64> = record[8..registers_end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let regs = Registers::from_words(&words);
        if regs.ring_size > MAX_RING || regs.consumer > regs.producer {
            return Err(Refusal::invalid("the dma-engine state is inconsistent"));
        }
        self.pci.load(&record[registers_end..])?;
        let mut s = self.inner.lock();
        s.regs = regs;
        s.publish();
        s.set_consumer(regs.consumer);
        Ok(())
    }
}
