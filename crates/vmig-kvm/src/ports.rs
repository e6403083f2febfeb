//! The VMM end of the guest's I/O ports: pacing writes with a token bucket, collecting what
//! `verify` finds, and yielding while vCPUs spin in a barrier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{KvmError, Result};
use crate::guest::{PORT_BAD_PAGE, PORT_PACE, PORT_VERIFY_DONE, PORT_YIELD};
use crate::vcpu::{ExitContext, ExitHandler};

/// Bad pages a verify report lists (it counts them all).
pub const MAX_LISTED_BAD_PAGES: usize = 64;

/// A token bucket shared by all vCPUs: `rate` pages per second, bursts of 20 ms. Takers that
/// overdraw it sleep off their debt, so the long-run rate holds however many vCPUs take.
#[derive(Debug)]
struct Pacer {
    rate: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
}

impl Pacer {
    fn take(&self, pages: u64, ctx: &ExitContext<'_>) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let rate = rate as f64;
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *bucket;
            let burst = (rate * 0.02).max(pages as f64);
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst) - pages as f64;
            *bucket = (tokens, now);
            if tokens < 0.0 { -tokens / rate } else { 0.0 }
        };
        // Sleep in short slices so a pause request is not held up by a slow rate.
        let deadline = Instant::now() + Duration::from_secs_f64(wait.min(10.0));
        while !ctx.pause_requested() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(2)));
        }
    }
}

/// What one verify found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Working-set pages checked.
    pub pages_checked: u64,
    /// Pages whose stamp was inconsistent.
    pub bad_count: u64,
    /// The first [`MAX_LISTED_BAD_PAGES`] of them (working-set page numbers).
    pub bad_pages: Vec<u64>,
}

impl VerifyReport {
    /// Whether every page was consistent.
    pub fn passed(&self) -> bool {
        self.bad_count == 0
    }
}

#[derive(Debug, Default)]
struct VerifyProgress {
    done: Vec<bool>,
    bad_count: u64,
    bad_pages: Vec<u64>,
}

/// The guest's ports, and the route for its MMIO accesses.
pub(crate) struct GuestPorts {
    pacer: Pacer,
    verify: Mutex<VerifyProgress>,
    verify_changed: Condvar,
    pace_exits: AtomicU64,
    mmio: std::sync::RwLock<Option<Arc<dyn MmioHandler>>>,
}

/// Where guest accesses to addresses that are not RAM go: the device bus of the layer above.
pub trait MmioHandler: Send + Sync {
    /// A guest read of `data.len()` bytes at guest-physical `addr`: fill `data`.
    fn read(&self, addr: u64, data: &mut [u8]) -> std::result::Result<(), String>;
    /// A guest write of `data` at guest-physical `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), String>;
}

impl std::fmt::Debug for GuestPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestPorts")
            .field("pacer", &self.pacer)
            .field("pace_exits", &self.pace_exits)
            .finish_non_exhaustive()
    }
}

impl GuestPorts {
    pub(crate) fn new(vcpus: usize, rate: Option<u64>) -> Self {
        Self {
            pacer: Pacer {
                rate: AtomicU64::new(rate.unwrap_or(0)),
                bucket: Mutex::new((0.0, Instant::now())),
            },
            verify: Mutex::new(VerifyProgress {
                done: vec![true; vcpus],
                ..VerifyProgress::default()
            }),
            verify_changed: Condvar::new(),
            pace_exits: AtomicU64::new(0),
            mmio: std::sync::RwLock::new(None),
        }
    }

    pub(crate) fn set_mmio(&self, handler: Option<Arc<dyn MmioHandler>>) {
        *self.mmio.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    fn mmio(&self) -> Option<Arc<dyn MmioHandler>> {
        self.mmio.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn progress(&self) -> MutexGuard<'_, VerifyProgress> {
        self.verify.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_rate(&self, rate: Option<u64>) {
        self.pacer.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn rate(&self) -> Option<u64> {
        Some(self.pacer.rate.load(Ordering::Relaxed)).filter(|&r| r != 0)
    }

    /// Forgets the last verify; call before posting a new one.
    pub(crate) fn begin_verify(&self) {
        let mut progress = self.progress();
        progress.done.iter_mut().for_each(|d| *d = false);
        progress.bad_count = 0;
        progress.bad_pages.clear();
    }

    /// Waits until every vCPU reported the end of its verify, or `deadline`; `failed` is polled
    /// for a vCPU that stopped. Returns the bad pages.
    pub(crate) fn wait_verify(
        &self,
        deadline: Instant,
        failed: impl Fn() -> Option<String>,
    ) -> Result<(u64, Vec<u64>)> {
        let mut progress = self.progress();
        while !progress.done.iter().all(|&d| d) {
            if let Some(why) = failed() {
                return Err(KvmError::Guest(why));
            }
            let now = Instant::now();
            if now >= deadline {
                let pending: Vec<usize> = (0..progress.done.len())
                    .filter(|&v| !progress.done[v])
                    .collect();
                return Err(KvmError::Timeout(format!(
                    "verify did not finish in time; vCPUs {pending:?} had not reported"
                )));
            }
            progress = self
                .verify_changed
                .wait_timeout(progress, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok((progress.bad_count, progress.bad_pages.clone()))
    }

    /// Pacing exits taken so far.
    pub(crate) fn pace_exits(&self) -> u64 {
        self.pace_exits.load(Ordering::Relaxed)
    }
}

fn word(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl ExitHandler for GuestPorts {
    fn io_out(&self, ctx: &ExitContext<'_>, port: u16, data: &[u8]) -> Result<()> {
        match port {
            PORT_PACE => {
                self.pace_exits.fetch_add(1, Ordering::Relaxed);
                self.pacer.take(word(data), ctx);
            }
            PORT_BAD_PAGE => {
                let mut progress = self.progress();
                progress.bad_count += 1;
                if progress.bad_pages.len() < MAX_LISTED_BAD_PAGES {
                    progress.bad_pages.push(word(data));
                }
            }
            PORT_VERIFY_DONE => {
                let mut progress = self.progress();
                if let Some(done) = progress.done.get_mut(ctx.vcpu) {
                    *done = true;
                }
                self.verify_changed.notify_all();
            }
            PORT_YIELD => std::thread::sleep(Duration::from_micros(50)),
            _ => {
                return Err(KvmError::Guest(format!(
                    "vCPU {} wrote to I/O port {port:#x}, which has no device",
                    ctx.vcpu
                )));
            }
        }
        Ok(())
    }

    fn io_in(&self, ctx: &ExitContext<'_>, port: u16, _data: &mut [u8]) -> Result<()> {
        Err(KvmError::Guest(format!(
            "vCPU {} read I/O port {port:#x}, which has no device",
            ctx.vcpu
        )))
    }

    fn mmio_read(&self, ctx: &ExitContext<'_>, addr: u64, data: &mut [u8]) -> Result<()> {
        let Some(bus) = self.mmio() else {
            return Err(KvmError::Guest(format!(
                "vCPU {} read {addr:#x}, which is neither RAM nor a device",
                ctx.vcpu
            )));
        };
        bus.read(addr, data)
            .map_err(|why| KvmError::Guest(format!("vCPU {} read {addr:#x}: {why}", ctx.vcpu)))
    }

    fn mmio_write(&self, ctx: &ExitContext<'_>, addr: u64, data: &[u8]) -> Result<()> {
        let Some(bus) = self.mmio() else {
            return Err(KvmError::Guest(format!(
                "vCPU {} wrote {addr:#x}, which is neither RAM nor a device",
                ctx.vcpu
            )));
        };
        bus.write(addr, data)
            .map_err(|why| KvmError::Guest(format!("vCPU {} wrote {addr:#x}: {why}", ctx.vcpu)))
    }
}
