//! The sending side: setup, pre-copy passes until the rest fits the downtime limit,
//! stop-and-copy, verification by the destination, commit, and the rollback that leaves the
//! source running whenever anything fails before the commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmig_dirty::DirtyBitmap;
use vmig_kvm::{PAGE_SIZE, VcpuState, Vm};
use vmig_primitives::PageNumber;
use zerocopy::little_endian::U64;

use crate::cancel::Stopper;
use crate::dirty::{DeviceSource, DirtySource, KvmSource, Mapping, MediatorSource, VmmSource};
use crate::error::{MigrationError, Result, device_error, io_error};
use crate::machine::{DmaTracker, Machine};
use crate::mediator::MediationStats;
use crate::pool::{BATCH_PAGES, PagePool, SentDigests, SharedWriter, lock};
use crate::report::{DeviceStats, MigrationParams, Progress, SourceStats, Status};
use crate::stream::{
    DeviceData, DeviceDescription, DeviceEnd, Digests, Hello, Kind, MAX_RECORD, MigrationConfig,
    Record, RecordReader, RecordWriter, StateDigest,
};
use crate::transport::{self, Conn, Uri};

/// Page digests per `Digests` record.
const DIGESTS_PER_RECORD: usize = 65536;
/// How long the source waits for the destination's answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination's checks after resuming may take.
const RESULT_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's auto-converge: start, step and cap of the throttle, in percent.
const THROTTLE_INITIAL: u64 = 20;
const THROTTLE_STEP: u64 = 10;
const THROTTLE_MAX: u64 = 99;
/// Passes after which the source stops once the rest fits the downtime limit, even while each
/// pass still halves what is left.
const MAX_SHRINKING_PASSES: u32 = 30;
/// A vCPU throttle timeslice (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// How long a pass that could switch over waits for the destination's switchover-ack before
/// making another pass.
const ACK_WAIT: Duration = Duration::from_millis(100);
/// Most state one device may give in stop-and-copy, and in how many chunks; more means it
/// misbehaves.
const MAX_STOP_COPY_STATE: u64 = 16 << 30;
const MAX_STOP_COPY_CHUNKS: u64 = 1 << 20;

pub use crate::stream::page_digest;

/// Runs one migration of `machine` to `params.uri`, reporting into `progress`. On success the
/// VM stays paused here (it runs on the destination); on any failure before the commit the VM
/// and its devices run again here as before and the error is returned. A failure after the
/// commit leaves the VM paused here for good: the report's status is then `Completed` when
/// the destination said it resumed, `Unknown` when it did not (see the stream module's table
/// of lost messages).
pub fn migrate(machine: &Machine, params: &MigrationParams, progress: &Progress) -> Result<()> {
    // A caller that already began the report (the control socket, so that a cancel sent
    // right after `migrate` is not lost) is not reset.
    if progress.report().status != Status::Setup {
        progress.begin();
    }
    let mut resumed = false;
    let outcome = Source::new(machine, params, progress).and_then(|mut s| {
        let outcome = s.run();
        resumed = s.resumed;
        outcome
    });
    progress.update(|r| {
        // A completed migration's total ends at the destination's resume (set then); the
        // checks after it are reported in `verification`.
        if !r.committed {
            r.total_ms = progress.elapsed_ms();
        }
        r.status = match &outcome {
            Ok(()) => Status::Completed,
            // The destination runs the VM; only its checks' answer is missing or bad.
            Err(_) if resumed => Status::Completed,
            Err(_) if r.committed => Status::Unknown,
            Err(MigrationError::Cancelled(_)) => Status::Cancelled,
            Err(_) => Status::Failed,
        };
        // What trapping cost: the counts are final once the sources stopped.
        for (stats, device) in r.devices.iter_mut().zip(&machine.devices) {
            if let (Some(stats), Some(m)) = (stats.mediation.as_mut(), &device.mediation)
                && stats.trapped
            {
                *stats = m.stats();
            }
        }
        if let Err(e) = &outcome {
            r.error = Some(if r.status == Status::Unknown {
                format!(
                    "the commit was sent but the destination never said it resumed ({e}): \
                     the VM may run there, or nowhere; it will not run here again"
                )
            } else {
                e.to_string()
            });
        }
    });
    outcome
}

struct Source<'a> {
    machine: &'a Machine,
    params: &'a MigrationParams,
    progress: &'a Progress,
    writers: Vec<SharedWriter>,
    conns: Vec<Conn>,
    reader: RecordReader<Conn>,
    sources: Vec<Box<dyn DirtySource + 'a>>,
    source_pages: Vec<u64>,
    started_sources: usize,
    devices_saving: bool,
    /// The devices left their running states (for P2P or STOP_COPY): a rollback brings every
    /// one to RUNNING_P2P before any runs.
    devices_quiesced: bool,
    paused: bool,
    /// The commit is being sent or was sent: the VM must never run here again.
    committed: bool,
    /// The destination said it resumed the VM.
    resumed: bool,
    /// The cancel and the deadline, shared with the watchdog that shuts the connections down.
    stopper: Arc<Stopper>,
}

impl<'a> Source<'a> {
    fn new(
        machine: &'a Machine,
        params: &'a MigrationParams,
        progress: &'a Progress,
    ) -> Result<Self> {
        params.check()?;
        for d in &machine.devices {
            d.migration()?;
            if params.device_dirty_tracking && d.dma_tracker() == DmaTracker::Nothing {
                return Err(MigrationError::device(
                    d.name.clone(),
                    "nothing tracks the pages it writes by DMA (no DMA logging, no dirty pages \
                     from its IOMMU, and no registered mediator took it), so a migration would \
                     lose them: expected a VMM with the device's mediator (device_dirty_tracking \
                     off migrates it anyway, to show that verification then fails)",
                ));
            }
        }
        for m in machine.devices.iter().filter_map(|d| d.mediation.as_ref()) {
            m.reset_counters();
        }
        if machine.vm.is_paused() {
            return Err(MigrationError::Invalid(
                "the VM is stopped: `cont` it before migrating (a stopped VM's devices cannot start pre-copy)".into(),
            ));
        }
        let uri: Uri = params.uri.parse()?;
        let session = session_id();
        let stopper = Arc::new(Stopper::new(progress.clone(), params.timeout_s));
        let mut conns = Vec::new();
        for channel in 0..params.connections {
            let mut conn = transport::connect_unless(&uri, &|| stopper.check())?;
            stopper.guard(&conn)?;
            let hello = Hello {
                channel,
                channels: params.connections,
                session,
            };
            std::io::Write::write_all(&mut conn, &hello.encode()).map_err(io_error(format!(
                "sending the hello of connection {channel}"
            )))?;
            conns.push(conn);
        }
        let reader = RecordReader::new(
            conns[0]
                .try_clone()
                .map_err(io_error("cloning the main connection"))?,
            "from the destination",
        );
        let writers = conns
            .iter()
            .map(|c| {
                c.try_clone()
                    .map(|c| Arc::new(Mutex::new(RecordWriter::new(c))))
                    .map_err(io_error("cloning a connection"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            machine,
            params,
            progress,
            writers,
            conns,
            reader,
            sources: Vec::new(),
            source_pages: Vec::new(),
            started_sources: 0,
            devices_saving: false,
            devices_quiesced: false,
            paused: false,
            committed: false,
            resumed: false,
            stopper,
        })
    }

    fn run(&mut self) -> Result<()> {
        let stopper = Arc::clone(&self.stopper);
        let mut result = std::thread::scope(|scope| {
            let (done, watching) = std::sync::mpsc::channel();
            scope.spawn(move || stopper.watch(&watching));
            let result = self.run_inner();
            let _ = done.send(());
            result
        });
        if let (Err(_), Some(reason)) = (&result, self.stopper.fired()) {
            // The watchdog shut the connections down under a blocked send or read.
            result = Err(MigrationError::Cancelled(reason));
        } else if let Err(MigrationError::Io { .. } | MigrationError::Stream(_)) = &result {
            // A send that failed because the destination gave up: say why it did.
            if let Some(reason) = self.pending_abort() {
                result = Err(MigrationError::Refused(reason));
            }
        }
        if let Err(e) = &result
            && !self.committed
        {
            let reason = e.to_string();
            tracing::debug!(error = %reason, "the migration failed; rolling the source back");
            let _ = lock(&self.writers[0]).send(&Record::Abort(reason.as_str().into()));
            self.rollback();
        }
        for c in &self.conns {
            c.shutdown();
        }
        result
    }

    /// The destination's Abort, if it sent one.
    fn pending_abort(&mut self) -> Option<String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        loop {
            let mut buf = Vec::new();
            match self.reader.receive(&mut buf) {
                Ok(Record::Abort(reason)) => return Some(reason.into_owned()),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Leaves the source as it was before the migration: devices running, logging off, vCPUs
    /// running. Every step is tried even if an earlier one failed.
    fn rollback(&mut self) {
        if self.devices_saving {
            // Stopped devices come back as they left: all in RUNNING_P2P before any runs.
            if self.devices_quiesced && self.machine.all_p2p() {
                for d in &self.machine.devices {
                    if let Ok(m) = d.migration()
                        && let Err(e) = m.start_p2p()
                    {
                        tracing::warn!(device = %d.name, error = %e, "the device did not return to RUNNING_P2P after the migration failed");
                    }
                }
                self.devices_quiesced = false;
            }
            for d in &self.machine.devices {
                if let Ok(m) = d.migration()
                    && let Err(e) = m.cancel()
                {
                    tracing::warn!(device = %d.name, error = %e, "the device did not return to running after the migration failed");
                }
            }
            self.devices_saving = false;
        }
        for source in self.sources.iter_mut().take(self.started_sources) {
            if let Err(e) = source.stop() {
                tracing::warn!(source = %source.name(), error = %e, "dirty tracking did not stop");
            }
        }
        self.started_sources = 0;
        if self.paused {
            if let Err(e) = self.machine.vm.resume() {
                tracing::warn!(error = %e, "the source's vCPUs did not resume");
            }
            self.paused = false;
        }
    }

    fn check_cancel(&self) -> Result<()> {
        self.stopper.check()
    }

    fn main(&self) -> std::sync::MutexGuard<'_, RecordWriter<Conn>> {
        lock(&self.writers[0])
    }

    fn send(&self, record: &Record<'_>) -> Result<()> {
        self.main()
            .send(record)
            .map_err(io_error(format!("sending a {:?} record", record.kind())))
    }

    fn run_inner(&mut self) -> Result<()> {
        let machine = self.machine;
        let vm = &machine.vm;
        let config = MigrationConfig {
            verify_memory: self.params.verify_memory,
            vm: vm.config().clone(),
            devices: machine
                .devices
                .iter()
                .map(|d| {
                    Ok(DeviceDescription {
                        name: d.name.clone(),
                        protocol: d
                            .device
                            .migration_protocol()
                            .map_err(|why| MigrationError::device(d.name.clone(), why))?,
                        bars: d.bars.clone(),
                        mapped: d.mapped.clone(),
                        kind: d.device.kind(),
                    })
                })
                .collect::<Result<_>>()?,
        };
        self.send(&Record::Config(Box::new(config)))?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(io_error("setting a timeout"))?;
        self.reader.expect(Kind::Ready)?;

        self.sources = self.dirty_sources();
        self.source_pages = vec![0; self.sources.len()];
        for i in 0..self.sources.len() {
            self.sources[i].start()?;
            self.started_sources = i + 1;
        }
        self.devices_saving = true;
        for d in &machine.devices {
            d.migration()?
                .start_precopy()
                .map_err(device_error(&d.name))?;
        }
        let memory = Arc::clone(vm.memory());
        let layout = memory.layout().clone();
        let dirty = DirtyBitmap::try_new(layout.top_page())?;
        for slot in &layout.slots {
            let _ = dirty.set_range(slot.first_page(), slot.pages());
        }
        let total = layout.ram();
        let devices: Vec<DeviceStats> = machine
            .devices
            .iter()
            .map(|d| DeviceStats {
                name: d.name.clone(),
                protocol: d.protocol_name().into(),
                mediation: d.mediation.as_ref().map(|m| MediationStats {
                    trapped: self.params.device_dirty_tracking
                        && d.dma_tracker() == DmaTracker::Mediator,
                    ..m.stats()
                }),
                ..DeviceStats::default()
            })
            .collect();
        let setup_ms = self.progress.elapsed_ms();
        self.progress.update(|r| {
            r.status = Status::Active;
            r.setup_ms = setup_ms;
            r.ram.total = total;
            r.ram.remaining = total;
            r.devices = devices;
        });

        let pool = PagePool::new(&memory, self.writers.len(), self.params.max_bandwidth);
        let throttle = AtomicU64::new(0);
        let stop_throttle = Mutex::new(false);
        let mut device_digests = vec![StateDigest::default(); machine.devices.len()];
        let writers = self.writers.clone();
        std::thread::scope(|scope| -> Result<()> {
            let senders: Vec<_> = writers
                .iter()
                .enumerate()
                .map(|(channel, writer)| {
                    let pool = &pool;
                    let memory = &memory;
                    scope.spawn(move || pool.run_sender(memory, writer, channel))
                })
                .collect();
            let throttler = self.params.auto_converge.then(|| {
                let (throttle, stop) = (&throttle, &stop_throttle);
                scope.spawn(move || throttle_vcpus(vm, throttle, stop))
            });
            let result = self.precopy_and_stop(
                &pool,
                &dirty,
                &throttle,
                &stop_throttle,
                &mut device_digests,
            );
            *stop_throttle.lock().unwrap_or_else(|e| e.into_inner()) = true;
            if let Some(t) = throttler {
                let _ = t.join();
            }
            match &result {
                Ok(()) => pool.close(),
                Err(e) => pool.fail(e.to_string()),
            }
            for s in senders {
                let _ = s.join();
            }
            result
        })?;
        let audit = self.params.verify_memory && !dma_writes_ram(machine);
        self.finish(audit.then_some(&pool.sent))
    }

    fn dirty_sources(&self) -> Vec<Box<dyn DirtySource + 'a>> {
        let vm = &self.machine.vm;
        let mut sources: Vec<Box<dyn DirtySource + 'a>> = vec![
            Box::new(KvmSource(Arc::clone(vm.dirty_log()))),
            Box::new(VmmSource(Arc::clone(vm.memory()))),
        ];
        if self.params.device_dirty_tracking {
            let mappings = Mapping::guest_ram(vm.memory());
            for d in &self.machine.devices {
                let device = Arc::clone(&d.device);
                match (d.dma_tracker(), &d.mediation) {
                    (DmaTracker::Mediator, Some(mediation)) => {
                        sources.push(Box::new(MediatorSource::new(
                            &d.name,
                            vm,
                            device,
                            Arc::clone(mediation),
                            mappings.clone(),
                        )));
                    }
                    (DmaTracker::Nothing, _) => {}
                    _ => sources.push(Box::new(DeviceSource::new(
                        &d.name,
                        device,
                        mappings.clone(),
                    ))),
                }
            }
        }
        sources
    }

    fn harvest(&mut self, into: &DirtyBitmap) -> Result<()> {
        for (i, source) in self.sources.iter_mut().enumerate() {
            self.source_pages[i] += source.harvest(into)?;
        }
        let stats: Vec<SourceStats> = self
            .sources
            .iter()
            .zip(&self.source_pages)
            .map(|(s, &pages)| SourceStats {
                name: s.name(),
                pages,
            })
            .collect();
        self.progress.update(|r| r.dirty_sources = stats);
        Ok(())
    }

    /// Sends the pages of `dirty` (clearing them) as pass `pass`, then ends the pass on every
    /// connection.
    fn send_pass(&self, pool: &PagePool, dirty: &DirtyBitmap, pass: u32, live: bool) -> Result<()> {
        let mut batch = Vec::with_capacity(BATCH_PAGES);
        let mut result = Ok(());
        let mut last_check = Instant::now();
        dirty.harvest_each_run(|first, count| {
            for page in first..first + count {
                if result.is_err() {
                    // Keep the rest dirty for nobody: the migration is failing anyway.
                    return;
                }
                batch.push(page);
                if batch.len() == BATCH_PAGES {
                    result = pool.submit(
                        pass,
                        std::mem::replace(&mut batch, Vec::with_capacity(BATCH_PAGES)),
                    );
                    if live && last_check.elapsed() > Duration::from_millis(50) {
                        last_check = Instant::now();
                        if result.is_ok() {
                            result = self.check_cancel();
                        }
                        self.publish_counters(pool);
                    }
                }
            }
        });
        result?;
        if !batch.is_empty() {
            pool.submit(pass, batch)?;
        }
        pool.wait_idle()?;
        for w in &self.writers {
            lock(w)
                .send(&Record::PassEnd { pass })
                .map_err(io_error("ending a pass"))?;
        }
        self.publish_counters(pool);
        Ok(())
    }

    #[expect(clippy::cast_precision_loss, reason = "a rate for the report")]
    fn publish_counters(&self, pool: &PagePool) {
        let c = &pool.counters;
        let bytes = c.bytes.load(Ordering::Relaxed);
        let elapsed = self.progress.elapsed_ms().max(1);
        self.progress.update(|r| {
            r.ram.transferred = bytes;
            r.ram.zero_pages = c.zero.load(Ordering::Relaxed);
            r.ram.sparse_pages = c.sparse.load(Ordering::Relaxed);
            r.ram.normal_pages = c.normal.load(Ordering::Relaxed);
            r.ram.mbps = bytes as f64 * 8.0 / 1000.0 / elapsed as f64;
        });
    }

    /// Sends device state chunks, split into records that fit.
    fn send_device_chunks(
        &self,
        index: usize,
        chunks: &[Vec<u8>],
        digest: &mut StateDigest,
    ) -> Result<u64> {
        let device = device_number(index)?;
        let part_max = usize::try_from(MAX_RECORD).unwrap_or(usize::MAX) - 8;
        let mut bytes = 0;
        for chunk in chunks {
            let parts: Vec<&[u8]> = if chunk.is_empty() {
                vec![&[][..]]
            } else {
                chunk.chunks(part_max).collect()
            };
            for (i, part) in parts.iter().enumerate() {
                self.send(&Record::DeviceData(DeviceData {
                    device,
                    more: i + 1 < parts.len(),
                    data: part,
                }))?;
            }
            digest.add(chunk);
            bytes += chunk.len() as u64;
        }
        Ok(bytes)
    }

    /// Streams the stopped device `index`'s state to the destination chunk by chunk as it is
    /// read (no whole-state buffer); returns its bytes.
    fn stream_stop_copy(
        &self,
        index: usize,
        device: &crate::machine::AttachedDevice,
        digest: &mut StateDigest,
    ) -> Result<u64> {
        let steps = device.migration()?;
        let (mut bytes, mut chunks) = (0, 0u64);
        while let Some(chunk) = steps
            .next_stop_copy_chunk()
            .map_err(device_error(&device.name))?
        {
            bytes += self.send_device_chunks(index, std::slice::from_ref(&chunk), digest)?;
            chunks += 1;
            // The VM is paused: a cancel or the deadline still ends a device that goes on.
            self.check_cancel()?;
            if bytes > MAX_STOP_COPY_STATE || chunks > MAX_STOP_COPY_CHUNKS {
                return Err(MigrationError::device(
                    device.name.clone(),
                    format!(
                        "its stop-and-copy state goes on past {} GiB or {MAX_STOP_COPY_CHUNKS} chunks",
                        MAX_STOP_COPY_STATE >> 30
                    ),
                ));
            }
        }
        Ok(bytes)
    }

    /// Takes the destination's switchover-ack if it comes within `wait`.
    fn switchover_ack(&mut self, wait: Duration) -> Result<bool> {
        let mut buf = Vec::new();
        match self.reader.read_within(wait, &mut buf)? {
            None => Ok(false),
            Some(kind) => match Record::decode(kind, &buf)? {
                Record::SwitchoverAck => {
                    let at = self.progress.elapsed_ms();
                    self.progress.update(|r| r.switchover_ack_ms = Some(at));
                    tracing::debug!(at_ms = at, "the destination acknowledged the switchover");
                    Ok(true)
                }
                Record::Abort(reason) => Err(MigrationError::Refused(reason.into_owned())),
                record => Err(MigrationError::Stream(format!(
                    "from the destination: a {} record where SwitchoverAck was expected",
                    record.kind().name()
                ))),
            },
        }
    }

    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the convergence estimate is in f64 (bytes far below 2^52, rates positive), \
                  rounded up or down to whole milliseconds and pages for the report"
    )]
    fn precopy_and_stop(
        &mut self,
        pool: &PagePool,
        dirty: &DirtyBitmap,
        throttle: &AtomicU64,
        stop_throttle: &Mutex<bool>,
        device_digests: &mut [StateDigest],
    ) -> Result<()> {
        let machine = self.machine;
        let vm = &machine.vm;
        let downtime = self.params.downtime_ms as f64;
        let mut pass: u32 = 0;
        let mut send_ms = 0f64;
        let mut high_dirty_passes = 0;
        let mut initial_sent = vec![false; machine.devices.len()];
        // Without devices there is no device state to wait for.
        let mut switchover_acked = machine.devices.is_empty();
        let setup_us = self.progress.elapsed_us();
        self.progress.update(|r| r.timeline.setup_us = setup_us);
        loop {
            self.check_cancel()?;
            let pass_start = Instant::now();
            let moved_before = pool.counters.ram_bytes();
            let pages = dirty.count();
            self.send_pass(pool, dirty, pass, true)?;
            let mut device_remaining = 0;
            for (i, d) in machine.devices.iter().enumerate() {
                let steps = d.migration()?;
                let chunks = steps.read_precopy().map_err(device_error(&d.name))?;
                let bytes = self.send_device_chunks(i, &chunks, &mut device_digests[i])?;
                // Read every pass: how much of the initial state is still to come decides the
                // switchover; the stop-copy estimate counts in the expected downtime.
                let pending = steps.precopy_info().map_err(device_error(&d.name))?;
                let estimate = steps.stop_copy_size();
                device_remaining += estimate.unwrap_or(0);
                self.progress.update(|r| {
                    let stats = &mut r.devices[i];
                    stats.precopy_bytes += bytes;
                    stats.precopy_pending = pending;
                    stats.stop_copy_estimate = estimate;
                });
                if !initial_sent[i] && pending.is_none_or(|p| p.initial_bytes == 0) {
                    self.send(&Record::InitialSent {
                        device: device_number(i)?,
                    })?;
                    initial_sent[i] = true;
                }
            }
            let pass_ms = pass_start.elapsed().as_secs_f64() * 1000.0;
            send_ms += pass_ms;
            // RAM moved, not bytes on the wire: zero and sparse pages take few bytes, yet a
            // pass takes time for each page, and the dirty pages left are pages too.
            let pass_bytes = pool.counters.ram_bytes() - moved_before;
            self.harvest(dirty)?;
            let remaining = dirty.count() * PAGE_SIZE;
            let moved = pool.counters.ram_bytes() as f64;
            let bandwidth = moved / send_ms.max(0.001); // bytes of RAM per ms
            let wire = pool.counters.bytes.load(Ordering::Relaxed) as f64 / send_ms.max(0.001);
            let expected =
                remaining as f64 / bandwidth.max(1.0) + device_remaining as f64 / wire.max(1.0);
            let rate = (remaining / PAGE_SIZE) as f64 * 1000.0 / pass_ms.max(0.001);
            pass += 1;
            tracing::debug!(
                pass,
                pass_ms,
                pass_bytes,
                remaining,
                expected_downtime_ms = expected,
                "pre-copy pass done"
            );
            self.progress.update(|r| {
                r.timeline.passes.push(crate::report::PassTime {
                    pages,
                    bytes: pass_bytes,
                    us: crate::report::micros(pass_start.elapsed()),
                });
                r.passes = u64::from(pass);
                r.ram.remaining = remaining;
                r.expected_downtime_ms = expected.ceil() as u64;
                r.ram.bandwidth_mbps = bandwidth * 8.0 / 1000.0;
                r.ram.dirty_pages_rate = rate as u64;
            });
            if !switchover_acked && initial_sent.iter().all(|&sent| sent) {
                let wait = if expected <= downtime {
                    ACK_WAIT
                } else {
                    Duration::ZERO
                };
                switchover_acked = self.switchover_ack(wait)?;
                self.stopper.set_awaiting_ack(!switchover_acked);
            }
            // QEMU's rule stops as soon as the rest fits the limit. A pass that left under half
            // of what it sent is outrunning the guest, and another, shorter still, leaves less
            // for the stop: go on while that holds (the downtime then falls far below the
            // limit for little more total time).
            let outrunning =
                remaining > 0 && remaining * 2 < pass_bytes && pass < MAX_SHRINKING_PASSES;
            if expected <= downtime && switchover_acked && !outrunning {
                break;
            }
            // Auto-converge (QEMU's trigger): the guest dirtied more than half of what the
            // pass sent, twice. Not when a source reports all of RAM at every pass: that is
            // not the guest's doing, and throttling it would only slow it down.
            let throttling_helps = !self.sources.iter().any(|s| s.reports_everything());
            if self.params.auto_converge && throttling_helps && pass > 1 {
                if remaining as f64 > 0.5 * pass_bytes as f64 {
                    high_dirty_passes += 1;
                } else {
                    high_dirty_passes = 0;
                }
                if high_dirty_passes >= 2 {
                    high_dirty_passes = 0;
                    let now = throttle.load(Ordering::Relaxed);
                    let next = if now == 0 {
                        THROTTLE_INITIAL
                    } else {
                        (now + THROTTLE_STEP).min(THROTTLE_MAX)
                    };
                    throttle.store(next, Ordering::Relaxed);
                    self.progress.update(|r| r.throttle_percent = next);
                }
            }
        }

        // Stop-and-copy. Taking the gate waits for a throttle slice to end with the VM running.
        *stop_throttle.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.progress.update(|r| r.status = Status::Device);
        let paused_at = Instant::now();
        self.paused = true;
        vm.pause()?;
        pool.lift_bandwidth_limit();
        self.check_cancel()?;
        // Every device stops initiating peer-to-peer DMA before any stops (the uAPI's rule),
        // then all stop; their state is read after the last pages, as it is sent.
        self.devices_quiesced = true;
        if machine.all_p2p() {
            for d in &machine.devices {
                d.migration()?
                    .quiesce_p2p()
                    .map_err(device_error(&d.name))?;
            }
        }
        for d in &machine.devices {
            d.migration()?.stop().map_err(device_error(&d.name))?;
        }
        let memory = vm.memory();
        let verify = self.params.verify_memory;
        let reread = verify && dma_writes_ram(machine);
        let mut lap = Lap(paused_at);
        let mut times = self.progress.report().timeline;
        times.digest_pages_read = if reread {
            memory.layout().ram() / PAGE_SIZE
        } else {
            0
        };
        std::thread::scope(|scope| -> Result<()> {
            // Nothing writes RAM any more: it is read from here on, beside everything else
            // the stop does.
            let digest_start = Instant::now();
            let digests = reread.then(|| spawn_digest(scope, memory));
            // Both vCPUs and devices are stopped: this harvest is complete.
            self.harvest(dirty)?;
            for source in self.sources.iter_mut() {
                source.stop()?;
            }
            self.started_sources = 0;
            times.stop_us = lap.take();
            self.send_pass(pool, dirty, pass, false)?;
            times.final_pages_us = lap.take();
            for (i, d) in machine.devices.iter().enumerate() {
                let bytes = self.stream_stop_copy(i, d, &mut device_digests[i])?;
                self.progress
                    .update(|r| r.devices[i].stopcopy_bytes += bytes);
                let d = &device_digests[i];
                self.send(&Record::DeviceEnd(DeviceEnd {
                    device: device_number(i)?,
                    bytes: d.bytes(),
                    digest: d.digest(),
                }))?;
            }
            times.device_state_us = lap.take();
            let vcpus: Vec<VcpuState> = vm.save_vcpus()?;
            self.send(&Record::VcpuState(vcpus))?;
            times.vcpu_us = lap.take();
            if let Some(read) = digests {
                // Each chunk goes out as it is done, while the rest are read.
                let mut done = digest_start;
                read.for_each(|(first, list, at)| {
                    done = done.max(at);
                    self.send_digests(first, &list)
                })?;
                times.digest_us = crate::report::micros(done.duration_since(digest_start));
            } else if verify {
                // Every sender is idle: the final pass is sent.
                for slot in &memory.layout().slots {
                    let list = pool.sent.of_slot(memory, slot).map_err(|e| {
                        MigrationError::Invalid(format!("reading guest RAM for its digest: {e}"))
                    })?;
                    self.send_digests(slot.first_page(), &list)?;
                }
            }
            times.digest_wait_us = lap.take();
            Ok(())
        })?;
        self.send(&Record::Complete)?;
        self.progress.update(|r| {
            r.status = Status::Verifying;
            r.ram.remaining = 0;
        });
        self.reader.expect(Kind::Accepted)?;
        times.checks_us = lap.take();
        // The point of no return: from here on the source never resumes, unless it learns
        // for certain that the destination does not run the VM.
        self.stopper.commit()?;
        self.committed = true;
        self.progress.update(|r| r.committed = true);
        if let Err(e) = self.send(&Record::Commit) {
            // Not all of the record reached the socket, so the destination cannot have read
            // a whole Commit: it will not run the VM.
            self.uncommit();
            return Err(e);
        }
        match self.reader.expect(Kind::Resumed) {
            Ok(_) => self.resumed = true,
            // The destination sends Abort only while it has not run the VM: it refused the
            // commit (a damaged record) or gave up before it came.
            Err(MigrationError::Refused(reason)) => {
                self.uncommit();
                return Err(MigrationError::Refused(format!(
                    "the destination answered the commit with an abort, so it does not run the VM: {reason}"
                )));
            }
            // Lost: the destination may or may not have the commit (the report says Unknown).
            Err(e) => return Err(e),
        }
        times.commit_us = lap.take();
        let downtime_ms = crate::report::millis(paused_at.elapsed());
        let total_ms = self.progress.elapsed_ms();
        self.progress.update(|r| {
            r.downtime_ms = downtime_ms;
            r.total_ms = total_ms;
            r.timeline = times;
        });
        self.publish_counters(pool);
        Ok(())
    }

    /// Sends the digests of the pages from `first` on, in records of [`DIGESTS_PER_RECORD`].
    fn send_digests(&self, first: u64, list: &[u64]) -> Result<()> {
        let mut page = first;
        for chunk in list.chunks(DIGESTS_PER_RECORD) {
            let digests: Vec<U64> = chunk.iter().map(|&d| U64::new(d)).collect();
            self.send(&Record::Digests(Digests {
                first: PageNumber(page),
                digests: &digests,
            }))?;
            page += digests.len() as u64;
        }
        Ok(())
    }

    /// The commit certainly did not take effect: the source may roll back after all.
    fn uncommit(&mut self) {
        self.stopper.uncommit();
        self.committed = false;
        self.progress.update(|r| r.committed = false);
    }

    /// After the destination resumed: stops the devices here, audits `sent` against RAM (the
    /// pages not read again at the stop) while the destination's Result comes, and says
    /// whether every check held.
    fn finish(&mut self, sent: Option<&SentDigests>) -> Result<()> {
        for d in &self.machine.devices {
            if let Ok(m) = d.migration()
                && let Err(e) = m.finish_source()
            {
                tracing::warn!(device = %d.name, error = %e, "the device did not stop after the migration");
            }
        }
        self.devices_saving = false;
        self.reader
            .get_ref()
            .set_read_timeout(Some(RESULT_TIMEOUT))
            .map_err(io_error("setting a timeout"))?;
        let memory = self.machine.vm.memory();
        let (result, audit) = std::thread::scope(|scope| {
            let audit =
                sent.map(|sent| scope.spawn(|| digest_all(memory).map(|now| sent.audit(&now))));
            let mut buf = Vec::new();
            let result = match self.reader.expect_record(Kind::Result, &mut buf) {
                Ok(Record::Result(verification)) => Ok(*verification),
                Ok(_) => Err(MigrationError::Stream(
                    "a Result record decoded as another".into(),
                )),
                Err(e) => Err(MigrationError::Verification(format!(
                    "the VM runs on the destination, but the Result of its checks did not arrive: {e}"
                ))),
            };
            let audit = audit.map(|a| {
                a.join()
                    .map_err(|_| MigrationError::Invalid("the audit thread panicked".into()))
            });
            (result, audit)
        });
        let mut verification = result?;
        if let Some(audit) = audit {
            let audit = audit?.map_err(|e: MigrationError| {
                MigrationError::Verification(format!(
                    "the VM runs on the destination, but reading RAM here to audit the pages sent failed: {e}"
                ))
            })?;
            verification.pages_audited = audit.pages;
            verification.pages_changed_unreported = audit.changed;
            if audit.changed > 0 {
                let first: Vec<String> = audit
                    .first_changed
                    .iter()
                    .map(|p| format!("{p:#x}"))
                    .collect();
                verification.problems.push(format!(
                    "{} page(s) changed here after they were last sent with no dirty source reporting it (first: {}): the destination runs with them stale",
                    audit.changed,
                    first.join(", ")
                ));
            }
        }
        let verified = verification.passed();
        let held = if self.params.verify_memory {
            verified
        } else {
            verification.checks_held()
        };
        let mut problems = verification.problems.clone();
        if !held && problems.is_empty() {
            problems.push(format!(
                "{} page digest(s) compared, {} differing; {} bad guest page(s); dma-engine records {}",
                verification.pages_compared,
                verification.pages_differing,
                verification.guest_bad_pages,
                if verification.device_records.iter().all(|r| r.passed()) { "whole" } else { "wrong" }
            ));
        }
        self.progress.update(|r| {
            r.verified = verified;
            r.verification = Some(verification);
        });
        if held {
            Ok(())
        } else {
            Err(MigrationError::Verification(format!(
                "the VM runs on the destination, but the checks found: {}",
                problems.join("; ")
            )))
        }
    }
}

/// Microseconds between successive calls of [`Lap::take`].
struct Lap(Instant);

impl Lap {
    /// Microseconds since the last take (or the start).
    fn take(&mut self) -> u64 {
        let now = Instant::now();
        crate::report::micros(now - std::mem::replace(&mut self.0, now))
    }
}

/// Whether a write to RAM may come that no dirty source reports, so that verification must
/// read every page again with the VM stopped: whenever a device is attached, as each has all of
/// RAM mapped for DMA (the machine's step 2), and a DMA write its tracking missed shows only in
/// the page itself. Without devices RAM is written by the vCPUs, whose every write KVM's dirty
/// log reports, and by the VMM through [`vmig_kvm::GuestMemory::write`], which marks what it
/// writes; a page's digest as last sent is then what it holds at the stop.
fn dma_writes_ram(machine: &Machine) -> bool {
    !machine.devices.is_empty()
}

/// Pages one digest worker reads at a time: 64 MiB, a few milliseconds of work, so the chunks
/// done can be sent while the rest are read.
const DIGEST_CHUNK_PAGES: u64 = 16384;

/// One chunk of RAM digested: its first page number, its pages' digests, and when it was done.
type DigestChunk = (u64, Vec<u64>, Instant);

/// The digests of all RAM, chunk by chunk as they are done.
struct DigestRead {
    done: std::sync::mpsc::Receiver<Result<DigestChunk>>,
    chunks: usize,
}

impl DigestRead {
    /// Hands each chunk to `each` as it is done, in no particular order; fails if a worker
    /// failed, or stopped before all chunks were done (a panic), so that no page goes
    /// unchecked unnoticed.
    fn for_each(self, mut each: impl FnMut(DigestChunk) -> Result<()>) -> Result<()> {
        let mut got = 0;
        for chunk in self.done {
            each(chunk?)?;
            got += 1;
        }
        if got < self.chunks {
            return Err(MigrationError::Invalid(format!(
                "a thread reading RAM for its digests stopped with {} of {} chunks unread",
                self.chunks - got,
                self.chunks
            )));
        }
        Ok(())
    }
}

/// Threads reading RAM for its digests at most: memory bandwidth, not the hash, is the limit
/// (two cores read 1 GiB in about 35 ms where one takes 50), and far fewer cores than a large
/// host has reach it.
const MAX_DIGEST_THREADS: usize = 16;

/// Starts digesting every page of RAM, chunk by chunk, on one thread per core, up to
/// [`MAX_DIGEST_THREADS`]. After a failure the workers stop.
fn spawn_digest<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    memory: &'scope vmig_kvm::GuestMemory,
) -> DigestRead {
    let chunks: Vec<(u64, u64)> = memory
        .layout()
        .slots
        .iter()
        .flat_map(|slot| {
            let (first, pages) = (slot.first_page(), slot.pages());
            (0..pages.div_ceil(DIGEST_CHUNK_PAGES)).map(move |i| {
                let from = i * DIGEST_CHUNK_PAGES;
                (first + from, DIGEST_CHUNK_PAGES.min(pages - from))
            })
        })
        .collect();
    let chunks = Arc::new(chunks);
    let next = Arc::new(AtomicU64::new(0));
    let threads = std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .min(MAX_DIGEST_THREADS);
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..threads.min(chunks.len()) {
        let (chunks, next, tx) = (Arc::clone(&chunks), Arc::clone(&next), tx.clone());
        scope.spawn(move || {
            while let Some(&(first, count)) = usize::try_from(next.fetch_add(1, Ordering::Relaxed))
                .ok()
                .and_then(|i| chunks.get(i))
            {
                let chunk = memory
                    .page_digests(first, count)
                    .map(|list| (first, list, Instant::now()))
                    .map_err(MigrationError::from);
                let failed = chunk.is_err();
                if tx.send(chunk).is_err() || failed {
                    return;
                }
            }
        });
    }
    DigestRead {
        done: rx,
        chunks: chunks.len(),
    }
}

/// Per-page digests of all RAM, read now: each chunk's first page number and its pages'
/// digests, in no particular order.
pub fn digest_all(memory: &vmig_kvm::GuestMemory) -> Result<Vec<(u64, Vec<u64>)>> {
    std::thread::scope(|scope| {
        let mut all = Vec::new();
        spawn_digest(scope, memory).for_each(|(first, list, _)| {
            all.push((first, list));
            Ok(())
        })?;
        Ok(all)
    })
}

/// Auto-converge's vCPU throttle: in each 10 ms slice the vCPUs are paused for `percent` of it.
/// A slice's pause holds `stopped`, so whoever sets it knows the VM was left running.
fn throttle_vcpus(vm: &Vm, percent: &AtomicU64, stopped: &Mutex<bool>) {
    loop {
        let p = percent.load(Ordering::Relaxed).min(THROTTLE_MAX);
        std::thread::sleep(THROTTLE_SLICE * (100 - p as u32) / 100);
        let gate = stopped.lock().unwrap_or_else(|e| e.into_inner());
        if *gate {
            return;
        }
        if p == 0 {
            continue;
        }
        if vm.pause().is_err() {
            return;
        }
        std::thread::sleep(THROTTLE_SLICE * p as u32 / 100);
        // A resume that fails (a vCPU stopped on its own) is retried; the migration's own
        // checks then find the failed vCPU.
        let mut tries = 0;
        while vm.resume().is_err() && tries < 100 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(gate);
    }
}

/// A device's index as records carry it.
fn device_number(index: usize) -> Result<u32> {
    u32::try_from(index).map_err(|_| {
        MigrationError::Invalid(format!(
            "device {index}: a stream carries at most {} devices",
            u32::MAX
        ))
    })
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        // The low 64 bits of the nanoseconds: a seed, not a time.
        .map_or(0, |d| {
            u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
        });
    page_digest(&[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat())
}
