//! The receiving side: accepts the connections of one migration, builds the VM from the
//! source's configuration (into RAM prepared ahead when there is some), attaches the devices
//! in `RESUMING`, applies pages, device state and vCPU state, compares every page's digest and
//! each device's state digest with the source's, and resumes only on the source's commit. It
//! then runs the guest's verify and checks the dma-engines' records, and reports back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use vmig_primitives::{GuestAddress, sparse_digest};
use zerocopy::IntoBytes;

use vmig_dirty::DirtyBitmap;
use vmig_kvm::{DirtyLogMode, GuestMemory, PAGE_SIZE, VcpuState, Vm};

use crate::device::{MigrationSteps, OpResult};
use crate::driver::GuestDrivers;
use crate::error::{MigrationError, Result, device_error, io_error};
use crate::machine::{DeviceSpec, Machine, Role};
use crate::report::{Progress, Status, Verification};
use crate::stream::{
    DeviceData, DeviceEnd, Digests, Hello, Kind, PAGE_BYTES, PageEntry, Receiver, Record,
    RecordReader, RecordWriter, SparseWord, State, StateDigest, page_digest, sparse_words,
};
use crate::transport::{Conn, Listener};

/// How long the source has to open all its connections after the first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest's verify may take after resuming.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages with differing digests listed in a refusal.
const LISTED_PAGES: usize = 8;
/// Largest device state chunk reassembled from parts.
const MAX_DEVICE_CHUNK: usize = 256 << 20;
/// What errors call the main connection.
const MAIN: &str = "from the source (main connection)";
/// Longest silence from the source before the destination gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// What a destination starts with.
#[derive(Debug)]
pub struct Incoming {
    /// Where the source connects.
    pub listener: Listener,
    /// RAM allocated ahead (its size must match the source's VM).
    pub prepared_memory: Option<GuestMemory>,
    /// The devices to attach, in the source's order.
    pub devices: Vec<DeviceSpec>,
    /// CPU dirty tracking of the arriving VM (`None`: the source's mode).
    pub dirty_log: Option<DirtyLogMode>,
    /// The guest drivers its devices are offered to (as on the source).
    pub drivers: GuestDrivers,
}

/// A migration that arrived: the VM runs.
#[derive(Debug)]
pub struct Arrived {
    /// The VM and its devices, running.
    pub machine: Machine,
    /// What the checks found.
    pub verification: Verification,
}

/// Waits for one migration and receives it (see the module doc). On any failure the partial VM
/// is dropped, the devices are reset, and the source is told why.
pub fn receive(incoming: Incoming, progress: &Progress) -> Result<Arrived> {
    let Incoming {
        listener,
        prepared_memory,
        devices,
        dirty_log,
        drivers,
    } = incoming;
    let (main, hello) = accept_migration(&listener)?;
    progress.begin();
    let mut dest = Destination::new(main, &hello, &listener)?;
    let result = dest.receive(prepared_memory, (&devices, &drivers), dirty_log, progress);
    progress.update(|r| {
        r.total_ms = progress.elapsed_ms();
        match &result {
            Ok(_) => r.status = Status::Completed,
            Err(e) => {
                r.status = Status::Failed;
                r.error = Some(e.to_string());
            }
        }
    });
    if let Err(e) = &result {
        tracing::debug!(error = %e, "the migration failed here; telling the source");
        let _ = dest.writer.send(&Record::Abort(e.to_string().into()));
        if let Some(machine) = &dest.machine {
            for d in &machine.devices {
                if let Err(e) = d.device.reset() {
                    tracing::warn!(device = %d.name, error = %e, "the device did not reset after the migration failed");
                }
            }
        }
    }
    for c in &dest.conns {
        c.shutdown();
    }
    result.map(|verification| Arrived {
        machine: dest
            .machine
            .take()
            .expect("a received migration has a machine"),
        verification,
    })
}

/// Received pages: what each page's digest is now, which pages were ever written, and which
/// are torn (their last copy arrived different from the digest sent with it).
struct Pages<'a> {
    memory: &'a GuestMemory,
    digests: Vec<AtomicU64>,
    written: DirtyBitmap,
    torn: DirtyBitmap,
    /// Page copies that arrived torn, over the whole stream.
    torn_copies: AtomicU64,
    zero_digest: u64,
    bytes: AtomicU64,
    /// The source sends every page's digest at the end (`verify_memory`).
    digests_follow: bool,
}

impl Pages<'_> {
    /// Takes the next record of `reader` into `buf`: a `Pages` record's data straight into
    /// guest memory where pages may come in the receiver's state, then applies it (its kind
    /// is then `None`); any other record is left in `buf` and its kind returned.
    fn receive(
        &self,
        reader: &mut RecordReader<Conn>,
        receiver: &mut Receiver,
        buf: &mut Vec<u8>,
        pass: u32,
    ) -> Result<Option<Kind>> {
        if Receiver::next(receiver.state(), Kind::Pages).is_none() {
            let kind = reader.read_into(buf)?;
            receiver.step(kind)?;
            return Ok(Some(kind));
        }
        let kind = reader.read_into_memory(buf, self.memory)?;
        receiver.step(kind)?;
        if kind != Kind::Pages {
            return Ok(Some(kind));
        }
        let (record_pass, entries, rest) = Record::decode_pages_head(buf)?;
        // The whole pages' digests (which the reader compared) come before the sparse section.
        let section = rest
            .get(reader.page_digests().len() * 8..)
            .unwrap_or_default();
        let sparse = sparse_words(section, entries.iter().filter(|e| e.is_sparse()).count())?;
        self.apply_entries(record_pass, entries, &sparse, reader.page_digests(), pass)?;
        // After the entries, which cleared every page they brought: a page torn now stays so
        // until it comes again intact.
        for &page in reader.torn_pages() {
            let _ = self.torn.set(page);
        }
        self.torn_copies
            .fetch_add(reader.torn_pages().len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(
            (buf.len() + reader.page_digests().len() * PAGE_BYTES) as u64,
            Ordering::Relaxed,
        );
        Ok(None)
    }

    /// Applies a `Pages` record's entries, whose whole pages are in memory already (read
    /// there by [`RecordReader::read_into_memory`], their digests `digests`): zero pages are
    /// written here when the page held data before, and sparse pages from their `sparse`
    /// words (only the words, on a page never written: guest RAM starts zero).
    fn apply_entries(
        &self,
        pass: u32,
        entries: &[PageEntry],
        sparse: &[&[SparseWord]],
        digests: &[u64],
        expected_pass: u32,
    ) -> Result<()> {
        if pass != expected_pass {
            return Err(MigrationError::Stream(format!(
                "pages of pass {pass} arrived during pass {expected_pass}: the stream is reordered"
            )));
        }
        let count = entries.len();
        // The reader computed one digest for each whole page as it arrived, the decoder
        // checked that the sparse section has words for each sparse one.
        let fewer = || {
            MigrationError::Stream(format!(
                "Pages record lists {count} pages but carries data for fewer"
            ))
        };
        let mut digests = digests.iter();
        let mut sparse = sparse.iter();
        for entry in entries {
            let page = entry.page();
            let gpa = page.guest_address();
            let slot = usize::try_from(page.0)
                .ok()
                .and_then(|index| self.digests.get(index))
                .ok_or_else(|| {
                    MigrationError::Stream(format!("page {:#x} is beyond guest RAM", page.0))
                })?;
            let written = self.written.test(page.0).unwrap_or(false);
            let _ = self.torn.clear(page.0);
            let write = |at: GuestAddress, bytes: &[u8]| {
                self.memory
                    .write(at, bytes)
                    .map_err(|source| MigrationError::Memory {
                        what: format!("page {:#x}", page.0),
                        source,
                    })
            };
            let digest = if entry.is_zero() {
                if written {
                    write(gpa, &[0u8; PAGE_BYTES])?;
                }
                self.zero_digest
            } else if entry.is_sparse() {
                let words = sparse.next().ok_or_else(fewer)?;
                if written {
                    let mut bytes = [0u8; PAGE_BYTES];
                    for word in *words {
                        let at = usize::from(word.index.get()) * 8;
                        bytes[at..at + 8].copy_from_slice(&word.value.get().to_le_bytes());
                    }
                    write(gpa, &bytes)?;
                } else {
                    for word in *words {
                        let at = u64::from(word.index.get()) * 8;
                        write(
                            GuestAddress(gpa.raw() + at),
                            &word.value.get().to_le_bytes(),
                        )?;
                    }
                }
                let _ = self.written.set(page.0);
                // The decoder checked they are the page's non-zero words, in order.
                sparse_digest(words.as_bytes())
            } else {
                let _ = self.written.set(page.0);
                *digests.next().ok_or_else(fewer)?
            };
            slot.store(digest, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// All connections end a pass before any goes on with the next.
#[derive(Default)]
struct PassBarrier {
    state: Mutex<(HashMap<u32, usize>, bool)>,
    changed: Condvar,
}

impl PassBarrier {
    fn wait(&self, pass: u32, channels: usize) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.0.entry(pass).or_insert(0) += 1;
        self.changed.notify_all();
        while state.0[&pass] < channels && !state.1 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.1 {
            return Err(MigrationError::Stream(
                "another connection of this migration failed".into(),
            ));
        }
        Ok(())
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.changed.notify_all();
    }
}

struct Destination {
    conns: Vec<Conn>,
    /// The main connection's state.
    receiver: Receiver,
    reader: RecordReader<Conn>,
    writer: RecordWriter<Conn>,
    machine: Option<Machine>,
}

/// Waits for the main connection of a migration: the first whose hello is a valid one of
/// channel 0. Any other peer (a port scan, a health check, a source of another stream
/// version) is logged with why it was refused, told so in an `Abort` when it can read one,
/// and dropped; the destination keeps waiting, its prepared RAM untouched.
fn accept_migration(listener: &Listener) -> Result<(Conn, Hello)> {
    loop {
        let mut conn = listener.accept(None)?;
        match read_main_hello(&mut conn) {
            Ok(hello) => return Ok((conn, hello)),
            Err(why) => refuse_peer(conn, &why),
        }
    }
}

fn read_main_hello(conn: &mut Conn) -> Result<Hello> {
    conn.set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(io_error("setting a timeout"))?;
    let hello = Hello::read(conn)?;
    if hello.channel != 0 {
        return Err(MigrationError::Stream(format!(
            "the first connection says it is channel {} of {}: expected the main channel 0",
            hello.channel, hello.channels
        )));
    }
    Ok(hello)
}

/// Drops a connection that is not (or not yet) part of the migration, saying why.
fn refuse_peer(conn: Conn, why: &MigrationError) {
    let peer = conn.peer();
    tracing::warn!(%peer, error = %why, "refused a connection that is not a migration's; still waiting for one");
    if let Ok(c) = conn.try_clone() {
        let reason = format!("this destination refused the connection: {why}");
        let _ = RecordWriter::new(c).send(&Record::Abort(reason.as_str().into()));
    }
    conn.shutdown();
}

impl Destination {
    fn new(main: Conn, hello: &Hello, listener: &Listener) -> Result<Self> {
        let mut receiver = Receiver::new(State::AwaitingHello, MAIN);
        receiver.hello()?;
        let mut conns = vec![main];
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let channels = usize::from(hello.channels);
        let mut seen = vec![false; channels];
        seen[0] = true;
        let mut extra: Vec<(u16, Conn)> = Vec::new();
        while extra.len() + 1 < channels {
            let mut conn = listener.accept(Some(deadline))?;
            let left = deadline.saturating_duration_since(Instant::now());
            conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(io_error("setting a timeout"))?;
            // A connection that is not one of this migration's is dropped, not fatal: the
            // real ones may still come before the deadline.
            let h = match Hello::read(&mut conn) {
                Ok(h) => h,
                Err(why) => {
                    refuse_peer(conn, &why);
                    continue;
                }
            };
            if h.session != hello.session
                || h.channels != hello.channels
                || seen[usize::from(h.channel)]
            {
                let why = MigrationError::Stream(format!(
                    "a connection of another migration, or a repeated channel {} (session {:#x} of {} channels; this migration is {:#x} of {channels})",
                    h.channel, h.session, h.channels, hello.session
                ));
                refuse_peer(conn, &why);
                continue;
            }
            seen[usize::from(h.channel)] = true;
            extra.push((h.channel, conn));
        }
        extra.sort_by_key(|(c, _)| *c);
        tracing::debug!(
            channels,
            session = hello.session,
            "every connection of the migration said hello"
        );
        conns.extend(extra.into_iter().map(|(_, c)| c));
        for c in &conns {
            c.set_read_timeout(Some(READ_TIMEOUT))
                .map_err(io_error("setting a timeout"))?;
        }
        let reader = RecordReader::new(
            conns[0]
                .try_clone()
                .map_err(io_error("cloning a connection"))?,
            MAIN,
        );
        let writer = RecordWriter::new(
            conns[0]
                .try_clone()
                .map_err(io_error("cloning a connection"))?,
        );
        Ok(Self {
            conns,
            receiver,
            reader,
            writer,
            machine: None,
        })
    }

    fn receive(
        &mut self,
        prepared: Option<GuestMemory>,
        (specs, drivers): (&[DeviceSpec], &GuestDrivers),
        dirty_log: Option<DirtyLogMode>,
        progress: &Progress,
    ) -> Result<Verification> {
        let mut buf = Vec::new();
        let kind = self.reader.read_into(&mut buf)?;
        self.receiver.step(kind)?;
        let config = match Record::decode(kind, &buf)? {
            Record::Config(config) => config,
            // As `expect` had it before the state table.
            Record::Abort(reason) => return Err(MigrationError::Refused(reason.into_owned())),
            record => return Err(unexpected(&record, self.receiver.state())),
        };
        let mut vm_config = config.vm.clone();
        if let Some(mode) = dirty_log {
            vm_config.dirty_log = mode;
        }
        // Checked as the command line checks its own: the record's checksum says it arrived
        // whole, not that its values are sane.
        vm_config.check().map_err(|e| {
            MigrationError::Invalid(format!("the source's Config record is refused: {e}"))
        })?;
        if let Some(memory) = &prepared
            && memory.layout().ram() != vm_config.ram
        {
            return Err(MigrationError::Invalid(format!(
                "the source's VM has {} MiB of RAM; this destination prepared {} MiB (--mem)",
                vm_config.ram >> 20,
                memory.layout().ram() >> 20
            )));
        }
        if specs.len() != config.devices.len() {
            return Err(MigrationError::Invalid(format!(
                "the source's VM has {} device(s) ({}); this destination was given {}",
                config.devices.len(),
                config
                    .devices
                    .iter()
                    .map(|d| format!("{} {}", d.name, d.protocol.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
                specs.len()
            )));
        }
        let vm = Vm::incoming(&vm_config, prepared)?;
        let machine = Machine::attach_with_drivers(vm, specs, Role::Destination, drivers)?;
        for (ours, theirs) in machine.devices.iter().zip(&config.devices) {
            let kind = ours.device.kind();
            if kind != theirs.kind {
                return Err(MigrationError::Invalid(format!(
                    "device {} here is {kind}, the source's {} is {}: its state would not load",
                    ours.name, theirs.name, theirs.kind
                )));
            }
            if ours.protocol_name() != theirs.protocol.name() {
                return Err(MigrationError::Invalid(format!(
                    "device {} here speaks migration {}, the source's {} speaks {}",
                    ours.name,
                    ours.protocol_name(),
                    theirs.name,
                    theirs.protocol.name()
                )));
            }
            if ours.bars != theirs.bars || ours.mapped != theirs.mapped {
                return Err(MigrationError::Invalid(format!(
                    "device {} here has BARs {:?} and mapped areas {:?}; the source's {} has {:?} and {:?}: the guest's driver would find other registers",
                    ours.name, ours.bars, ours.mapped, theirs.name, theirs.bars, theirs.mapped
                )));
            }
        }
        for d in &machine.devices {
            d.migration()?
                .start_resume()
                .map_err(device_error(&d.name))?;
        }
        let machine = self.machine.insert(machine);
        let memory = machine.vm.memory();
        let top = memory.layout().top_page();
        let pages = Pages {
            memory,
            digests: (0..top).map(|_| AtomicU64::new(0)).collect(),
            written: DirtyBitmap::try_new(top)?,
            torn: DirtyBitmap::try_new(top)?,
            torn_copies: AtomicU64::new(0),
            zero_digest: page_digest(&[0u8; PAGE_BYTES]),
            bytes: AtomicU64::new(0),
            digests_follow: config.verify_memory,
        };
        self.writer
            .send(&Record::Ready)
            .map_err(io_error("answering Ready"))?;
        progress.update(|r| {
            r.status = Status::Active;
            r.ram.total = memory.layout().ram();
        });

        let barrier = PassBarrier::default();
        let channels = self.conns.len();
        let done = AtomicBool::new(false);
        let machine = &*machine;
        let (readers, conns) = (&mut self.reader, &self.conns);
        let receiver = &mut self.receiver;
        let writer = &mut self.writer;
        std::thread::scope(|scope| -> Result<Verification> {
            let mut workers = Vec::new();
            for (index, conn) in conns.iter().enumerate().skip(1) {
                let conn = conn.try_clone().map_err(io_error("cloning a connection"))?;
                let (pages, barrier, done) = (&pages, &barrier, &done);
                workers.push(scope.spawn(move || {
                    let result = receive_pages(conn, index, pages, barrier, channels);
                    if result.is_err() && !done.load(Ordering::Acquire) {
                        barrier.abort();
                        for c in conns {
                            c.shutdown_read();
                        }
                    }
                    result
                }));
            }
            let result = main_loop(
                machine, receiver, readers, writer, &pages, &barrier, channels, progress,
            );
            done.store(true, Ordering::Release);
            if result.is_err() {
                barrier.abort();
            }
            // The page connections carry nothing more: wake their readers (the main one stays
            // open for the Abort or the end of the Result).
            for c in conns.iter().skip(1) {
                c.shutdown();
            }
            for w in workers {
                if let Ok(Err(e)) = w.join() {
                    if result.is_err() {
                        continue;
                    }
                    if !done.load(Ordering::Acquire) {
                        return Err(e);
                    }
                }
            }
            result
        })
    }
}

fn receive_pages(
    conn: Conn,
    index: usize,
    pages: &Pages<'_>,
    barrier: &PassBarrier,
    channels: usize,
) -> Result<()> {
    let what = format!("from the source (connection {index})");
    let mut receiver = Receiver::new(State::PageConnection, what.clone());
    let mut reader = RecordReader::new(conn, what);
    let mut buf = Vec::new();
    let mut pass = 0u32;
    loop {
        let Some(kind) = pages.receive(&mut reader, &mut receiver, &mut buf, pass)? else {
            continue;
        };
        match Record::decode(kind, &buf)? {
            Record::PassEnd { pass: ended } => {
                end_pass(ended, pass)?;
                barrier.wait(pass, channels)?;
                pass += 1;
            }
            Record::Abort(reason) => return Err(MigrationError::Refused(reason.into_owned())),
            record => return Err(unexpected(&record, receiver.state())),
        }
    }
}

/// A record the state table let in but the loop has no step for (a table out of step with
/// the loop: a bug, reported as an error all the same).
fn unexpected(record: &Record<'_>, state: State) -> MigrationError {
    MigrationError::Stream(format!(
        "a {:?} record in state {state:?} has no step here",
        record.kind()
    ))
}

fn end_pass(ended: u32, pass: u32) -> Result<()> {
    if ended != pass {
        return Err(MigrationError::Stream(format!(
            "end of pass {ended} during pass {pass}: the stream is reordered"
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_lines)]
#[expect(
    clippy::too_many_arguments,
    reason = "the main connection's receiver, reader and writer, and the shared page state"
)]
fn main_loop(
    machine: &Machine,
    receiver: &mut Receiver,
    reader: &mut RecordReader<Conn>,
    writer: &mut RecordWriter<Conn>,
    pages: &Pages<'_>,
    barrier: &PassBarrier,
    channels: usize,
    progress: &Progress,
) -> Result<Verification> {
    let mut buf = Vec::new();
    let mut pass = 0u32;
    let devices = &machine.devices;
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); devices.len()];
    let mut device_digests = vec![StateDigest::default(); devices.len()];
    let mut device_ended = vec![false; devices.len()];
    let mut initial_sent = vec![false; devices.len()];
    let mut vcpus: Option<Vec<VcpuState>> = None;
    let mut verification = Verification::default();
    let mut differing: Vec<u64> = Vec::new();
    // Pages whose digest arrived, one bit each: a page's digest counts once, so a range sent
    // twice cannot stand in for one never sent.
    let compared = DirtyBitmap::try_new(machine.vm.memory().layout().top_page())?;
    let ram_pages = machine.vm.memory().layout().ram() / PAGE_SIZE;
    let mut last_update = Instant::now();
    loop {
        let state = receiver.state();
        let kind = pages.receive(reader, receiver, &mut buf, pass)?;
        if last_update.elapsed() > Duration::from_millis(100) {
            last_update = Instant::now();
            let bytes = pages.bytes.load(Ordering::Relaxed);
            progress.update(|r| {
                r.ram.transferred = bytes;
                r.passes = u64::from(pass);
            });
        }
        let Some(kind) = kind else {
            continue;
        };
        match Record::decode(kind, &buf)? {
            Record::PassEnd { pass: ended } => {
                end_pass(ended, pass)?;
                barrier.wait(pass, channels)?;
                pass += 1;
            }
            Record::DeviceData(DeviceData {
                device: index,
                more,
                data,
            }) => {
                let index = usize::try_from(index).unwrap_or(usize::MAX);
                let device = devices.get(index).ok_or_else(|| {
                    MigrationError::Stream(format!(
                        "state for device {index}, which does not exist"
                    ))
                })?;
                if device_ended[index] {
                    return Err(MigrationError::Stream(format!(
                        "state for device {} after its end",
                        device.name
                    )));
                }
                if partial[index].len() + data.len() > MAX_DEVICE_CHUNK {
                    return Err(MigrationError::Stream(format!(
                        "a state chunk of device {} over {MAX_DEVICE_CHUNK} bytes",
                        device.name
                    )));
                }
                partial[index].extend_from_slice(data);
                if !more {
                    let chunk = std::mem::take(&mut partial[index]);
                    device
                        .migration()?
                        .write_chunk(&chunk)
                        .map_err(device_error(&device.name))?;
                    device_digests[index].add(&chunk);
                }
            }
            Record::InitialSent { device: index } => {
                let index = usize::try_from(index).unwrap_or(usize::MAX);
                let Some(device) = devices.get(index) else {
                    return Err(MigrationError::Stream(format!(
                        "InitialSent for device {index}, which does not exist"
                    )));
                };
                if std::mem::replace(&mut initial_sent[index], true) {
                    return Err(MigrationError::Stream(format!(
                        "InitialSent for device {} twice",
                        device.name
                    )));
                }
                if !partial[index].is_empty() {
                    return Err(MigrationError::Stream(format!(
                        "InitialSent for device {} in the middle of a chunk of its state",
                        device.name
                    )));
                }
                // Every chunk before it was written to the device: once every device has had
                // all of its initial state, the source may switch over.
                if initial_sent.iter().all(|&sent| sent) {
                    writer
                        .send(&Record::SwitchoverAck)
                        .map_err(io_error("acknowledging the switchover"))?;
                }
            }
            Record::DeviceEnd(DeviceEnd {
                device: index,
                bytes,
                digest,
            }) => {
                let index = usize::try_from(index).unwrap_or(usize::MAX);
                let Some(device) = devices.get(index) else {
                    return Err(MigrationError::Stream(format!(
                        "end of device {index}, which does not exist"
                    )));
                };
                let ours = &device_digests[index];
                if !partial[index].is_empty() || ours.bytes() != bytes || ours.digest() != digest {
                    return Err(MigrationError::Verification(format!(
                        "device {}: {} bytes of state arrived, the source sent {bytes}, or their digests differ",
                        device.name,
                        ours.bytes()
                    )));
                }
                device_ended[index] = true;
                verification.devices_compared += 1;
            }
            Record::VcpuState(states) => vcpus = Some(states),
            Record::Digests(Digests { first, digests }) => {
                let count = u64::try_from(digests.len()).unwrap_or(u64::MAX);
                if first.0.checked_add(count).is_none() {
                    return Err(MigrationError::Stream(format!(
                        "a Digests record of {count} digests from page {:#x} runs past the end of the address space",
                        first.0
                    )));
                }
                for (page, theirs) in (first.0..).zip(digests) {
                    let ours = usize::try_from(page)
                        .ok()
                        .and_then(|index| pages.digests.get(index))
                        .ok_or_else(|| {
                            MigrationError::Stream(format!(
                                "a digest for page {page:#x}, beyond guest RAM"
                            ))
                        })?;
                    // In range: `ours` exists, so `page` is below the top page.
                    if compared.test(page).unwrap_or(false) {
                        return Err(MigrationError::Stream(format!(
                            "a second digest for page {page:#x}: each page's digest is sent once"
                        )));
                    }
                    let _ = compared.set(page);
                    if ours.load(Ordering::Relaxed) != theirs.get() {
                        differing.push(page);
                    }
                }
                verification.pages_compared += digests.len() as u64;
            }
            Record::Complete => {
                let mut problems = Vec::new();
                if let Some(d) = device_ended.iter().position(|e| !e) {
                    problems.push(format!(
                        "the state of device {} did not arrive",
                        devices[d].name
                    ));
                }
                if pages.digests_follow && verification.pages_compared != ram_pages {
                    problems.push(format!(
                        "digests of {} pages arrived for {ram_pages} pages of RAM",
                        verification.pages_compared
                    ));
                }
                verification.pages_torn = pages.torn_copies.load(Ordering::Relaxed);
                let torn = pages.torn.collect_runs();
                if !torn.is_empty() {
                    let count: u64 = torn.iter().map(|&(_, n)| n).sum();
                    let first: Vec<u64> = torn
                        .iter()
                        .flat_map(|&(page, n)| page..page + n)
                        .take(LISTED_PAGES)
                        .collect();
                    problems.push(format!(
                        "{count} page(s) arrived different from the digest sent with them and never came again (written as they were sent with no dirty source reporting it, or damaged on the way), first {first:#x?}"
                    ));
                }
                if !differing.is_empty() {
                    verification.pages_differing = differing.len() as u64;
                    problems.push(format!(
                        "{} page(s) differ from the source's, first {:#x?}",
                        differing.len(),
                        &differing[..differing.len().min(LISTED_PAGES)]
                    ));
                }
                let Some(states) = vcpus.as_deref() else {
                    return Err(MigrationError::Stream(
                        "Complete before the vCPU state".into(),
                    ));
                };
                if !problems.is_empty() {
                    return Err(MigrationError::Verification(problems.join("; ")));
                }
                for d in devices {
                    d.migration()?.load().map_err(device_error(&d.name))?;
                }
                machine.vm.restore_vcpus(states)?;
                progress.update(|r| r.status = Status::Verifying);
                writer
                    .send(&Record::Accepted)
                    .map_err(io_error("answering Accepted"))?;
            }
            Record::Commit => {
                // The source will never resume: from here on the VM lives here whatever
                // fails, and failures are reported, not turned into an abort. Every device is
                // in RUNNING_P2P before any runs (the uAPI's rule for peer-to-peer DMA).
                let steps: [fn(&dyn MigrationSteps) -> OpResult<()>; 2] =
                    [|m| m.start_p2p(), |m| m.run()];
                // The P2P states only when every device has them (the uAPI's guarantee
                // needs every device quiesced).
                let skip = usize::from(!machine.all_p2p());
                for step in steps.into_iter().skip(skip) {
                    for d in devices {
                        if let Err(e) = d
                            .migration()
                            .and_then(|m| step(m.as_ref()).map_err(device_error(&d.name)))
                        {
                            verification
                                .problems
                                .push(format!("starting device {}: {e}", d.name));
                        }
                    }
                }
                // The pages written here were the migration's own: nothing to send again.
                let _ = machine.vm.memory().vmm_dirty().harvest();
                if let Err(e) = machine.vm.resume() {
                    verification.problems.push(format!("resuming the VM: {e}"));
                }
                let _ = writer.send(&Record::Resumed);
                if verification.problems.is_empty() {
                    check_after_resume(machine, &mut verification);
                }
                let _ = writer.send(&Record::Result(Box::new(verification.clone())));
                progress.update(|r| {
                    r.verified = verification.passed();
                    r.verification = Some(verification.clone());
                    r.ram.transferred = pages.bytes.load(Ordering::Relaxed);
                    r.passes = u64::from(pass);
                });
                return Ok(verification);
            }
            // As before the state table: an abort where the commit was awaited is the source's
            // refusal, elsewhere its abandoning the migration.
            Record::Abort(reason) if state == State::AwaitingCommit => {
                return Err(MigrationError::Refused(reason.into_owned()));
            }
            Record::Abort(reason) => {
                return Err(MigrationError::Cancelled(format!(
                    "the source abandoned the migration: {reason}"
                )));
            }
            record => return Err(unexpected(&record, state)),
        }
    }
}

/// The guest's verify and the dma-engines' records, on the running VM.
fn check_after_resume(machine: &Machine, verification: &mut Verification) {
    match machine.vm.verify(VERIFY_TIMEOUT) {
        Ok(report) => {
            verification.guest_pages_checked = report.pages_checked;
            verification.guest_bad_pages = report.bad_count;
            if report.bad_count > 0 {
                verification.problems.push(format!(
                    "the guest's verify found {} bad page(s), first {:?}",
                    report.bad_count,
                    &report.bad_pages[..report.bad_pages.len().min(LISTED_PAGES)]
                ));
            } else if let Some(why) = report.failure() {
                verification
                    .problems
                    .push(format!("the guest's verify is incomplete: {why}"));
            }
        }
        Err(e) => verification
            .problems
            .push(format!("the guest's verify failed: {e}")),
    }
    let checks = machine.check_devices();
    for c in &checks {
        for p in &c.problems {
            verification.problems.push(format!("{}: {p}", c.device));
        }
        if c.device_errors != 0 {
            verification
                .problems
                .push(format!("{}: {} DMA errors", c.device, c.device_errors));
        }
    }
    verification.device_records = checks;
}
