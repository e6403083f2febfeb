//! The shaped link between the two hosts: a userspace emulator of `tc netem`'s `rate`, `delay`
//! and `loss` on both ends of a link, for kernels without netem.
//!
//! Each host has a TUN device. Every packet one host's kernel sends to its TUN is read here,
//! passes the [`Pipe`] of its direction, and is written into the other host's TUN, which hands
//! it to that kernel as received. A pipe is what netem with `rate R delay D loss P` does on the
//! sending side: a packet is dropped at random with probability `P` (a seeded xorshift, so a
//! run can be repeated), waits in a drop-tail queue (one round trip of the rate, at least 2 ms)
//! for the link, which carries it in `size / R`, and arrives `D` after it left. Both directions
//! are shaped alike.
//!
//! Two threads per direction: a reader takes each packet the moment the kernel offers it and
//! decides its fate and arrival time; a writer sleeps until that time and delivers it. The
//! channel between them is bounded: a writer that cannot keep up (CPU, on a busy machine)
//! stops the reader, and the kernel's TCP then waits for it (TCP small queues) rather than
//! the delay line growing without end.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sys;

/// The largest packet a TUN device hands over (an IPv4 packet's length field).
pub const MAX_PACKET: usize = 65_535;
/// How often an idle thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Packets between a direction's reader and writer.
const CHANNEL_PACKETS: usize = 1024;
/// The shortest queue in front of a rate-limited link.
const MIN_QUEUE: Duration = Duration::from_millis(2);

/// What the link does to each packet, in each direction (netem's `rate`, `delay`, `loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// The link's rate in bits per second (IP packets, headers included); `None`: as fast as
    /// the emulator goes.
    pub rate_bits_per_s: Option<u64>,
    /// One-way delay.
    pub delay: Duration,
    /// Packets dropped at random, per million.
    pub loss_ppm: u32,
}

impl Shape {
    /// No rate limit, no delay, no loss: the emulator's own ceiling.
    pub const UNSHAPED: Self = Self {
        rate_bits_per_s: None,
        delay: Duration::ZERO,
        loss_ppm: 0,
    };

    /// The drop-tail queue in front of the link: one round trip at its rate, at least 2 ms.
    pub fn queue_limit(&self) -> Duration {
        (self.delay * 2).max(MIN_QUEUE)
    }
}

impl fmt::Display for Shape {
    #[expect(clippy::cast_precision_loss, reason = "a rate to print")]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate_bits_per_s {
            Some(r) if r >= 1_000_000_000 => write!(f, "{} Gbit/s", r as f64 / 1e9)?,
            Some(r) => write!(f, "{} Mbit/s", r as f64 / 1e6)?,
            None => write!(f, "unlimited")?,
        }
        write!(f, ", {} ms", self.delay.as_secs_f64() * 1000.0)?;
        if self.loss_ppm > 0 {
            write!(f, ", {} % loss", f64::from(self.loss_ppm) / 10_000.0)?;
        }
        Ok(())
    }
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Dropped at random (`loss`).
    Lost,
    /// Dropped because the queue in front of the link was full.
    Overflow,
    /// Delivered to the other side at this time.
    Deliver(Instant),
}

/// One direction of the link: its shape and where the link is in carrying what it took.
#[derive(Debug)]
pub struct Pipe {
    shape: Shape,
    /// When the link has carried everything queued so far.
    free_at: Option<Instant>,
    rng: u64,
}

impl Pipe {
    /// A pipe of `shape` whose random losses follow `seed`.
    pub fn new(shape: Shape, seed: u64) -> Self {
        Self {
            shape,
            free_at: None,
            // xorshift's state must not be 0.
            rng: seed | 1,
        }
    }

    /// The fate of a packet of `bytes` offered at `now` (times offered never decrease).
    pub fn admit(&mut self, now: Instant, bytes: usize) -> Fate {
        if self.shape.loss_ppm > 0
            && self.next_random() % 1_000_000 < u64::from(self.shape.loss_ppm)
        {
            return Fate::Lost;
        }
        let Some(rate) = self.shape.rate_bits_per_s else {
            return Fate::Deliver(now + self.shape.delay);
        };
        let start = self.free_at.map_or(now, |free| free.max(now));
        if start - now > self.shape.queue_limit() {
            return Fate::Overflow;
        }
        let carried = start + transmission(bytes, rate);
        self.free_at = Some(carried);
        Fate::Deliver(carried + self.shape.delay)
    }

    /// xorshift64.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// How long a link of `rate` bits per second takes to carry `bytes`.
fn transmission(bytes: usize, rate: u64) -> Duration {
    let nanos = (bytes as u128) * 8 * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// One direction's counters.
#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    write_errors: AtomicU64,
}

/// What one direction of the link did, counted from its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets the sending host's kernel sent into the link.
    pub packets: u64,
    /// Their bytes (IP packets).
    pub bytes: u64,
    /// Packets dropped at random.
    pub lost: u64,
    /// Packets dropped because the queue was full.
    pub overflowed: u64,
    /// Packets written into the receiving host.
    pub delivered: u64,
    /// Their bytes.
    pub delivered_bytes: u64,
    /// Packets the receiving host's TUN refused.
    pub write_errors: u64,
}

impl DirectionStats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            packets: self.packets - earlier.packets,
            bytes: self.bytes - earlier.bytes,
            lost: self.lost - earlier.lost,
            overflowed: self.overflowed - earlier.overflowed,
            delivered: self.delivered - earlier.delivered,
            delivered_bytes: self.delivered_bytes - earlier.delivered_bytes,
            write_errors: self.write_errors - earlier.write_errors,
        }
    }
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            packets: get(&self.packets),
            bytes: get(&self.bytes),
            lost: get(&self.lost),
            overflowed: get(&self.overflowed),
            delivered: get(&self.delivered),
            delivered_bytes: get(&self.delivered_bytes),
            write_errors: get(&self.write_errors),
        }
    }
}

/// The shape both directions follow, with a generation that tells the readers it changed.
#[derive(Debug)]
struct Shared {
    generation: u64,
    shape: Shape,
}

/// The running emulator: both directions' threads, which stop when it is dropped.
#[derive(Debug)]
pub struct Link {
    shared: Arc<Mutex<Shared>>,
    counters: [Arc<Counters>; 2],
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    /// Starts forwarding between the TUN devices `a` and `b` (each already in its host), with
    /// `shape` in both directions and random losses following `seed`.
    pub fn start(a: File, b: File, shape: Shape, seed: u64) -> std::io::Result<Self> {
        let (a, b) = (Arc::new(a), Arc::new(b));
        let shared = Arc::new(Mutex::new(Shared {
            generation: 0,
            shape,
        }));
        let counters = [Arc::default(), Arc::default()];
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut link = Self {
            shared,
            counters,
            errors,
            stop,
            threads: Vec::new(),
        };
        for (direction, (from, to)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel(CHANNEL_PACKETS);
            let name = ["a->b", "b->a"][direction];
            let reader = Reader {
                from: Arc::clone(from),
                to_writer: tx,
                shared: Arc::clone(&link.shared),
                counters: Arc::clone(&link.counters[direction]),
                errors: Arc::clone(&link.errors),
                stop: Arc::clone(&link.stop),
                seed: seed ^ (direction as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                name,
            };
            link.threads.push(
                std::thread::Builder::new()
                    .name(format!("link {name} reader"))
                    .spawn(move || reader.run())?,
            );
            let writer = Writer {
                to: Arc::clone(to),
                from_reader: rx,
                counters: Arc::clone(&link.counters[direction]),
                errors: Arc::clone(&link.errors),
                name,
            };
            link.threads.push(
                std::thread::Builder::new()
                    .name(format!("link {name} writer"))
                    .spawn(move || writer.run())?,
            );
        }
        Ok(link)
    }

    /// Shapes both directions with `shape` from the next packet on (queues start empty).
    pub fn set_shape(&self, shape: Shape) {
        let mut shared = lock(&self.shared);
        shared.generation += 1;
        shared.shape = shape;
    }

    /// The shape in force.
    pub fn shape(&self) -> Shape {
        lock(&self.shared).shape
    }

    /// What each direction did so far: `[a to b, b to a]`.
    pub fn stats(&self) -> [DirectionStats; 2] {
        [self.counters[0].snapshot(), self.counters[1].snapshot()]
    }

    /// The errors the forwarding threads met (a thread that meets one reading stops).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Reader {
    from: Arc<File>,
    to_writer: SyncSender<(Instant, Vec<u8>)>,
    shared: Arc<Mutex<Shared>>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    name: &'static str,
}

impl Reader {
    fn run(self) {
        let mut generation = u64::MAX;
        let mut pipe = Pipe::new(Shape::UNSHAPED, self.seed);
        while !self.stop.load(Ordering::Relaxed) {
            match sys::wait_readable(self.from.as_fd(), POLL) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    lock(&self.errors)
                        .push(format!("link {}: waiting for a packet: {e}", self.name));
                    return;
                }
            }
            let mut packet = vec![0; MAX_PACKET];
            let n = match (&*self.from).read(&mut packet) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    lock(&self.errors).push(format!("link {}: reading a packet: {e}", self.name));
                    return;
                }
            };
            let now = Instant::now();
            packet.truncate(n);
            let c = &self.counters;
            c.packets.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(n as u64, Ordering::Relaxed);
            {
                let shared = lock(&self.shared);
                if shared.generation != generation {
                    generation = shared.generation;
                    pipe = Pipe::new(shared.shape, self.seed ^ generation);
                }
            }
            match pipe.admit(now, n) {
                Fate::Lost => {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                }
                Fate::Overflow => {
                    c.overflowed.fetch_add(1, Ordering::Relaxed);
                }
                Fate::Deliver(at) => {
                    if self.to_writer.send((at, packet)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

struct Writer {
    to: Arc<File>,
    from_reader: Receiver<(Instant, Vec<u8>)>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<Vec<String>>>,
    name: &'static str,
}

impl Writer {
    /// Delivers until the reader is gone (it stops first).
    fn run(self) {
        loop {
            let (at, packet) = match self.from_reader.recv_timeout(POLL) {
                Ok(next) => next,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let c = &self.counters;
            // A TUN takes a whole packet per write, or refuses it.
            let written = match (&*self.to).write(&packet) {
                Ok(n) if n == packet.len() => Ok(()),
                Ok(n) => Err(std::io::Error::other(format!("only {n} bytes taken"))),
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {
                    c.delivered.fetch_add(1, Ordering::Relaxed);
                    c.delivered_bytes
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    if c.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        lock(&self.errors).push(format!(
                            "link {}: delivering a packet of {} bytes: {e}",
                            self.name,
                            packet.len()
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn deliver(fate: Fate) -> Instant {
        match fate {
            Fate::Deliver(at) => at,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn a_rate_limited_link_carries_packets_back_to_back_then_adds_the_delay() {
        // 1 Gbit/s: 125 000 bytes take 1 ms.
        let mut pipe = Pipe::new(
            Shape {
                rate_bits_per_s: Some(1_000_000_000),
                delay: 10 * MS,
                loss_ppm: 0,
            },
            1,
        );
        let t0 = Instant::now();
        assert_eq!(deliver(pipe.admit(t0, 125_000)), t0 + 11 * MS);
        // Offered while the first is still on the link: it waits for it.
        assert_eq!(deliver(pipe.admit(t0, 125_000)), t0 + 12 * MS);
        // Offered once the link is idle: only its own time and the delay.
        assert_eq!(
            deliver(pipe.admit(t0 + 50 * MS, 62_500)),
            t0 + 60 * MS + MS / 2
        );
    }

    #[test]
    fn a_full_queue_drops_the_packet_and_keeps_the_link_as_it_was() {
        // 8 Mbit/s: 1000 bytes take 1 ms; the queue holds 2 ms (no delay: the minimum).
        let mut pipe = Pipe::new(
            Shape {
                rate_bits_per_s: Some(8_000_000),
                delay: Duration::ZERO,
                loss_ppm: 0,
            },
            1,
        );
        let t0 = Instant::now();
        for i in 1..=3 {
            assert_eq!(deliver(pipe.admit(t0, 1000)), t0 + i * MS);
        }
        // The link is busy until 3 ms: this one would wait 3 ms.
        assert_eq!(pipe.admit(t0, 1000), Fate::Overflow);
        assert_eq!(deliver(pipe.admit(t0 + MS, 1000)), t0 + 4 * MS);
    }

    #[test]
    fn an_unlimited_link_only_delays() {
        let mut pipe = Pipe::new(
            Shape {
                delay: MS / 2,
                ..Shape::UNSHAPED
            },
            1,
        );
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(deliver(pipe.admit(t0, MAX_PACKET)), t0 + MS / 2);
        }
    }

    #[test]
    fn random_loss_drops_the_share_asked_and_repeats_with_its_seed() {
        let shape = Shape {
            loss_ppm: 10_000,
            ..Shape::UNSHAPED
        };
        let run = |seed| {
            let mut pipe = Pipe::new(shape, seed);
            let t0 = Instant::now();
            (0..200_000)
                .map(|_| pipe.admit(t0, 1500) == Fate::Lost)
                .collect::<Vec<_>>()
        };
        let first = run(7);
        let lost = first.iter().filter(|&&l| l).count();
        // 1 % of 200 000 is 2000, with a standard deviation of about 45.
        assert!((1800..=2200).contains(&lost), "{lost} lost");
        assert_eq!(run(7), first);
        assert_ne!(run(8), first);
    }

    #[test]
    fn shapes_print_as_netem_would_be_asked() {
        let shape = Shape {
            rate_bits_per_s: Some(10_000_000_000),
            delay: MS / 2,
            loss_ppm: 10_000,
        };
        assert_eq!(shape.to_string(), "10 Gbit/s, 0.5 ms, 1 % loss");
        assert_eq!(Shape::UNSHAPED.to_string(), "unlimited, 0 ms");
    }
}
