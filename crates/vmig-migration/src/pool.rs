//! The source's page senders: one thread per connection takes batches of page numbers from a
//! shared queue, reads the pages where they are, marks zero pages, sends sparse ones (a few
//! non-zero words) as their words, and writes `Pages` records with whole pages straight from
//! guest memory; a shared token bucket keeps them under the bandwidth limit. As they send
//! they keep each page's digest ([`SentDigests`]): what the destination holds, unless the
//! page changed without being reported dirty.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmig_kvm::memory::SlotLayout;
use vmig_kvm::{GuestMemory, PAGE_SIZE};
use vmig_primitives::{PageNumber, SparseWords, dense_digest, sparse_digest};
use zerocopy::little_endian::U64;

use crate::error::{MigrationError, Result};
use crate::stream::{PAGE_BYTES, PageEntry, RecordWriter};
use crate::transport::Conn;

/// Pages per `Pages` record.
pub const BATCH_PAGES: usize = 256;

/// A connection's writer, shared by its page sender and the main thread.
pub type SharedWriter = Arc<Mutex<RecordWriter<Conn>>>;

/// Locks a writer.
pub fn lock(writer: &SharedWriter) -> MutexGuard<'_, RecordWriter<Conn>> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters the senders keep.
#[derive(Debug, Default)]
pub struct PageCounters {
    /// Bytes of `Pages` records written.
    pub bytes: AtomicU64,
    /// Zero pages sent.
    pub zero: AtomicU64,
    /// Pages sent with data.
    pub normal: AtomicU64,
    /// Pages sent as their non-zero words.
    pub sparse: AtomicU64,
}

impl PageCounters {
    /// Bytes of guest RAM sent, however each page was encoded.
    pub fn ram_bytes(&self) -> u64 {
        let pages = self.zero.load(Ordering::Relaxed)
            + self.normal.load(Ordering::Relaxed)
            + self.sparse.load(Ordering::Relaxed);
        pages * PAGE_SIZE
    }
}

#[derive(Debug, Default)]
struct Queue {
    batches: VecDeque<(u32, Vec<u64>)>,
    in_flight: usize,
    closed: bool,
    error: Option<String>,
}

/// A token bucket in bytes per second (0: unlimited), 50 ms of burst.
#[derive(Debug)]
struct Limiter {
    /// Bytes per second; 0: unlimited.
    rate: AtomicU64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn take(&self, bytes: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a token bucket in f64: bytes and rates far below 2^52 are exact"
        )]
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = rate as f64 * 0.05;
            state.0 =
                (state.0 + now.duration_since(state.1).as_secs_f64() * rate as f64).min(burst);
            state.1 = now;
            state.0 -= bytes as f64;
            (state.0 < 0.0).then(|| Duration::from_secs_f64(-state.0 / rate as f64))
        };
        if let Some(wait) = wait {
            std::thread::sleep(wait);
        }
    }
}

/// Each page's digest as it was last sent, indexed by page number.
#[derive(Debug)]
pub struct SentDigests {
    digests: Vec<AtomicU64>,
    zero: u64,
}

/// A page not sent yet. A page whose digest happens to be this is read again at the stop,
/// which costs a read and nothing else.
const UNSENT: u64 = u64::MAX;

impl SentDigests {
    fn new(memory: &GuestMemory) -> Self {
        let top = memory.layout().top_page();
        Self {
            digests: (0..top).map(|_| AtomicU64::new(UNSENT)).collect(),
            zero: crate::stream::page_digest(&[0u8; PAGE_BYTES]),
        }
    }

    fn record(&self, page: u64, digest: u64) {
        if let Some(slot) = usize::try_from(page).ok().and_then(|i| self.digests.get(i)) {
            slot.store(digest, Ordering::Relaxed);
        }
    }

    /// The digest `page` was last sent with, or [`UNSENT`].
    fn sent(&self, page: u64) -> u64 {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.digests.get(i))
            .map_or(UNSENT, |d| d.load(Ordering::Relaxed))
    }

    /// The digests of `slot`'s pages as sent; a page never sent is read now. Called once
    /// every sender is idle.
    pub fn of_slot(&self, memory: &GuestMemory, slot: &SlotLayout) -> io::Result<Vec<u64>> {
        (slot.first_page()..slot.first_page() + slot.pages())
            .map(|number| match self.sent(number) {
                UNSENT => Ok(memory
                    .page_digests(number, 1)
                    .map_err(io::Error::other)?
                    .pop()
                    .unwrap_or(UNSENT)),
                sent => Ok(sent),
            })
            .collect()
    }
}

/// What [`SentDigests::audit`] found.
#[derive(Debug, Default)]
pub struct Audit {
    /// Pages read and compared.
    pub pages: u64,
    /// Pages whose digest now differs from the one they were last sent with.
    pub changed: u64,
    /// The first few of them.
    pub first_changed: Vec<u64>,
}

impl SentDigests {
    /// Compares the digests of RAM read now (each slot's first page number and its pages'
    /// digests, as [`digest_all`](crate::source::digest_all) gives them) with the ones its
    /// pages were last sent with. Pages never sent were read at the stop, their digests taken
    /// then: they are not compared.
    pub fn audit(&self, now: &[(u64, Vec<u64>)]) -> Audit {
        let mut audit = Audit::default();
        for (first, digests) in now {
            for (number, &digest) in (*first..).zip(digests) {
                let sent = self.sent(number);
                if sent == UNSENT {
                    continue;
                }
                audit.pages += 1;
                if digest != sent {
                    audit.changed += 1;
                    if audit.first_changed.len() < 8 {
                        audit.first_changed.push(number);
                    }
                }
            }
        }
        audit
    }
}

/// The shared side of the senders.
#[derive(Debug)]
pub struct PagePool {
    queue: Mutex<Queue>,
    changed: Condvar,
    limiter: Limiter,
    /// What was sent.
    pub counters: PageCounters,
    /// The digest of each page as sent.
    pub sent: SentDigests,
    depth: usize,
}

impl PagePool {
    /// A pool for `senders` threads sending `memory` under `max_bandwidth` bytes per second
    /// (0: unlimited).
    pub fn new(memory: &GuestMemory, senders: usize, max_bandwidth: u64) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            limiter: Limiter {
                rate: AtomicU64::new(max_bandwidth),
                state: Mutex::new((0.0, Instant::now())),
            },
            counters: PageCounters::default(),
            sent: SentDigests::new(memory),
            depth: senders * 4,
        }
    }

    /// Lifts the bandwidth limit: in stop-and-copy the guest waits for every byte, so the pages
    /// go as fast as the link takes them (as QEMU's completion does).
    pub fn lift_bandwidth_limit(&self) {
        self.limiter.rate.store(0, Ordering::Relaxed);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(queue: &Queue) -> Result<()> {
        match &queue.error {
            Some(why) => Err(MigrationError::Stream(why.clone())),
            None => Ok(()),
        }
    }

    /// Queues a batch of pass `pass`, waiting while the queue is full; fails once a sender
    /// failed.
    pub fn submit(&self, pass: u32, pages: Vec<u64>) -> Result<()> {
        let mut queue = self.queue();
        while queue.batches.len() >= self.depth && queue.error.is_none() {
            queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        Self::failed(&queue)?;
        queue.batches.push_back((pass, pages));
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until every queued batch is written.
    pub fn wait_idle(&self) -> Result<()> {
        let mut queue = self.queue();
        while (!queue.batches.is_empty() || queue.in_flight > 0) && queue.error.is_none() {
            queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        Self::failed(&queue)
    }

    /// Stops the senders once the queue is empty.
    pub fn close(&self) {
        self.queue().closed = true;
        self.changed.notify_all();
    }

    /// Makes every waiter fail with `why` (a sender failed, or the migration is abandoned).
    pub fn fail(&self, why: String) {
        let mut queue = self.queue();
        queue.error.get_or_insert(why);
        queue.closed = true;
        self.changed.notify_all();
    }

    /// A sender thread's body: writes batches to `writer` until the pool closes.
    pub fn run_sender(&self, memory: &GuestMemory, writer: &SharedWriter, channel: usize) {
        let mut batch = Batch {
            entries: Vec::with_capacity(BATCH_PAGES),
            digests: Vec::with_capacity(BATCH_PAGES),
            sparse: Vec::new(),
        };
        loop {
            let (pass, pages) = {
                let mut queue = self.queue();
                loop {
                    if queue.error.is_some() {
                        return;
                    }
                    if let Some(batch) = queue.batches.pop_front() {
                        queue.in_flight += 1;
                        self.changed.notify_all();
                        break batch;
                    }
                    if queue.closed {
                        return;
                    }
                    queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            };
            let result = self.send_batch(memory, writer, pass, &pages, &mut batch);
            let mut queue = self.queue();
            queue.in_flight -= 1;
            if let Err(e) = result {
                queue
                    .error
                    .get_or_insert(format!("sending pages on connection {channel}: {e}"));
            }
            self.changed.notify_all();
        }
    }

    fn send_batch(
        &self,
        memory: &GuestMemory,
        writer: &SharedWriter,
        pass: u32,
        pages: &[u64],
        batch: &mut Batch,
    ) -> io::Result<()> {
        let Batch {
            entries,
            digests,
            sparse,
        } = batch;
        entries.clear();
        digests.clear();
        sparse.clear();
        let mut whole: Vec<&[u8]> = Vec::with_capacity(pages.len());
        let (mut zero, mut sparse_pages) = (0u64, 0u64);
        for &page in pages {
            let number = PageNumber(page);
            // The page where it is: classified, digested and then sent from there, with no
            // copy. The guest may write it meanwhile; the receiver then finds it differs from
            // its digest and holds it as torn until it comes again, as the dirty log has it.
            let bytes = memory.page_bytes(page).map_err(io::Error::other)?;
            let entry = match SparseWords::of(bytes) {
                Some(words) if words.count() == 0 => {
                    zero += 1;
                    self.sent.record(page, self.sent.zero);
                    PageEntry::new(number, true)
                }
                Some(words) => {
                    sparse_pages += 1;
                    append_sparse(sparse, &words);
                    self.sent.record(page, sparse_digest(words.packed()));
                    PageEntry::sparse(number)
                }
                None => {
                    let digest = dense_digest(bytes);
                    digests.push(U64::new(digest));
                    self.sent.record(page, digest);
                    whole.push(bytes);
                    PageEntry::new(number, false)
                }
            };
            entries.push(entry);
        }
        let bytes = (8 + entries.len() * 8 + whole.len() * (8 + PAGE_BYTES) + sparse.len()) as u64;
        self.limiter.take(bytes);
        lock(writer).send_pages(pass, entries, digests, &whole, sparse)?;
        let c = &self.counters;
        c.bytes
            .fetch_add(bytes + crate::stream::HEADER_SIZE as u64, Ordering::Relaxed);
        c.zero.fetch_add(zero, Ordering::Relaxed);
        c.sparse.fetch_add(sparse_pages, Ordering::Relaxed);
        c.normal
            .fetch_add(pages.len() as u64 - zero - sparse_pages, Ordering::Relaxed);
        Ok(())
    }
}

/// A sender's buffers for one `Pages` record, reused.
struct Batch {
    entries: Vec<PageEntry>,
    /// The digest of each whole page, in order, as the record carries it.
    digests: Vec<U64>,
    sparse: Vec<u8>,
}

/// Appends a sparse page's `words` to a `Pages` record's sparse section.
fn append_sparse(section: &mut Vec<u8>, words: &SparseWords) {
    section.extend_from_slice(
        &u16::try_from(words.count())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    section.extend_from_slice(words.packed());
}
