//! The VMM end of the guest's I/O ports: pacing writes with a token bucket, collecting what
//! `verify` finds, and yielding while vCPUs spin in a barrier; every other port, and every
//! access where there is no RAM, goes to the handlers the layer above installs
//! ([`PortHandler`], [`MmioHandler`]).

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
    #[expect(
        clippy::cast_precision_loss,
        reason = "page counts and rates per second are far below 2^52, where f64 is exact"
    )]
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
    /// Pages of the working set.
    pub working_set_pages: u64,
    /// Working-set pages the guest says it checked (the sum of every vCPU's count).
    pub pages_checked: u64,
    /// Pages whose stamp was inconsistent.
    pub bad_count: u64,
    /// The first [`MAX_LISTED_BAD_PAGES`] of them (working-set page numbers).
    pub bad_pages: Vec<u64>,
}

impl VerifyReport {
    /// Whether the guest checked every page of the working set and found each consistent: a
    /// verify that checked fewer pages than that (none, or one vCPU's slice) has not passed.
    pub fn passed(&self) -> bool {
        self.bad_count == 0
            && self.working_set_pages > 0
            && self.pages_checked == self.working_set_pages
    }

    /// What kept the verify from passing, in words; `None` when it passed.
    pub fn failure(&self) -> Option<String> {
        if self.bad_count > 0 {
            Some(format!(
                "{} of {} pages inconsistent (first: {:?})",
                self.bad_count, self.pages_checked, self.bad_pages
            ))
        } else if !self.passed() {
            Some(format!(
                "the guest checked {} of the working set's {} pages",
                self.pages_checked, self.working_set_pages
            ))
        } else {
            None
        }
    }
}

/// What the vCPUs reported of the verify in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VerifyTally {
    pub(crate) pages_checked: u64,
    pub(crate) bad_count: u64,
    pub(crate) bad_pages: Vec<u64>,
}

#[derive(Debug, Default)]
struct VerifyProgress {
    done: Vec<bool>,
    tally: VerifyTally,
}

/// The guest's ports, and the route for its MMIO accesses.
pub(crate) struct GuestPorts {
    pacer: Pacer,
    verify: Mutex<VerifyProgress>,
    verify_changed: Condvar,
    pace_exits: AtomicU64,
    mmio: std::sync::RwLock<Option<Arc<dyn MmioHandler>>>,
    ports: std::sync::RwLock<Option<Arc<dyn PortHandler>>>,
}

/// Where guest accesses to addresses that are not RAM go: the device bus of the layer above.
pub trait MmioHandler: Send + Sync {
    /// A guest read of `data.len()` bytes at guest-physical `addr`: fill `data`.
    fn read(&self, addr: u64, data: &mut [u8]) -> std::result::Result<(), MmioError>;
    /// A guest write of `data` at guest-physical `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), MmioError>;
}

/// Where guest port I/O goes other than the guest's own report ports (`0x510`-`0x513`): the
/// device bus of the layer above, for devices' I/O-port BARs.
pub trait PortHandler: Send + Sync {
    /// A guest `in` of `data.len()` bytes from `port`: fill `data`.
    fn read(&self, port: u16, data: &mut [u8]) -> std::result::Result<(), MmioError>;
    /// A guest `out` of `data` to `port`.
    fn write(&self, port: u16, data: &[u8]) -> std::result::Result<(), MmioError>;
}

/// Why an [`MmioHandler`] (or a [`PortHandler`]: `addr` is then the port) could not serve a
/// guest access; the vCPU that made it stops.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Nothing on the bus covers the access.
    #[error("no device is at [{addr:#x}, +{len})")]
    Unclaimed {
        /// The first byte.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The device there failed in a way the guest must not go past.
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
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
            ports: std::sync::RwLock::new(None),
        }
    }

    pub(crate) fn set_ports(&self, handler: Option<Arc<dyn PortHandler>>) {
        *self.ports.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    fn ports(&self) -> Option<Arc<dyn PortHandler>> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).clone()
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
        progress.tally = VerifyTally::default();
    }

    /// Waits until every vCPU reported the end of its verify, or `deadline`; `failed` is polled
    /// for a vCPU that stopped. Returns what they reported.
    pub(crate) fn wait_verify(
        &self,
        deadline: Instant,
        failed: impl Fn() -> Option<Arc<KvmError>>,
    ) -> Result<VerifyTally> {
        let mut progress = self.progress();
        while !progress.done.iter().all(|&d| d) {
            if let Some(why) = failed() {
                return Err(KvmError::VcpuStopped(why));
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
        Ok(progress.tally.clone())
    }

    /// Pacing exits taken so far.
    pub(crate) fn pace_exits(&self) -> u64 {
        self.pace_exits.load(Ordering::Relaxed)
    }
}

/// Whether `port` is one the guest reports through (served here, never by a device).
pub(crate) fn is_report_port(port: u16) -> bool {
    matches!(
        port,
        PORT_PACE | PORT_BAD_PAGE | PORT_VERIFY_DONE | PORT_YIELD
    )
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
                let tally = &mut self.progress().tally;
                tally.bad_count += 1;
                if tally.bad_pages.len() < MAX_LISTED_BAD_PAGES {
                    tally.bad_pages.push(word(data));
                }
            }
            PORT_VERIFY_DONE => {
                let mut progress = self.progress();
                if let Some(done) = progress.done.get_mut(ctx.vcpu) {
                    *done = true;
                    progress.tally.pages_checked += word(data);
                }
                self.verify_changed.notify_all();
            }
            PORT_YIELD => std::thread::sleep(Duration::from_micros(50)),
            _ => {
                let Some(bus) = self.ports() else {
                    return Err(KvmError::Guest(format!(
                        "vCPU {} wrote to I/O port {port:#x}, which has no device",
                        ctx.vcpu
                    )));
                };
                bus.write(port, data).map_err(|source| KvmError::Port {
                    vcpu: ctx.vcpu,
                    port,
                    write: true,
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn io_in(&self, ctx: &ExitContext<'_>, port: u16, data: &mut [u8]) -> Result<()> {
        // The report ports are the guest's to write: reading one is a guest error, as
        // reading a port nothing claims.
        let Some(bus) = self.ports().filter(|_| !is_report_port(port)) else {
            return Err(KvmError::Guest(format!(
                "vCPU {} read I/O port {port:#x}, which has no device",
                ctx.vcpu
            )));
        };
        bus.read(port, data).map_err(|source| KvmError::Port {
            vcpu: ctx.vcpu,
            port,
            write: false,
            source,
        })
    }

    fn mmio_read(&self, ctx: &ExitContext<'_>, addr: u64, data: &mut [u8]) -> Result<()> {
        let Some(bus) = self.mmio() else {
            return Err(KvmError::Guest(format!(
                "vCPU {} read {addr:#x}, which is neither RAM nor a device",
                ctx.vcpu
            )));
        };
        bus.read(addr, data).map_err(|source| KvmError::Mmio {
            vcpu: ctx.vcpu,
            addr,
            write: false,
            source,
        })
    }

    fn mmio_write(&self, ctx: &ExitContext<'_>, addr: u64, data: &[u8]) -> Result<()> {
        let Some(bus) = self.mmio() else {
            return Err(KvmError::Guest(format!(
                "vCPU {} wrote {addr:#x}, which is neither RAM nor a device",
                ctx.vcpu
            )));
        };
        bus.write(addr, data).map_err(|source| KvmError::Mmio {
            vcpu: ctx.vcpu,
            addr,
            write: true,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::VerifyReport;

    fn report(working_set_pages: u64, pages_checked: u64, bad_count: u64) -> VerifyReport {
        VerifyReport {
            working_set_pages,
            pages_checked,
            bad_count,
            bad_pages: Vec::new(),
        }
    }

    #[test]
    fn a_verify_passes_only_when_it_checked_the_whole_working_set_and_found_nothing_bad() {
        assert!(report(2048, 2048, 0).passed());
        assert_eq!(report(2048, 2048, 0).failure(), None);
        for (checked, bad, why) in [
            (0, 0, "the guest checked 0 of the working set's 2048 pages"),
            (
                1024,
                0,
                "the guest checked 1024 of the working set's 2048 pages",
            ),
            (
                2049,
                0,
                "the guest checked 2049 of the working set's 2048 pages",
            ),
            (2048, 1, "1 of 2048 pages inconsistent (first: [])"),
        ] {
            let r = report(2048, checked, bad);
            assert!(!r.passed(), "{r:?}");
            assert_eq!(r.failure().as_deref(), Some(why));
        }
        assert!(
            !report(0, 0, 0).passed(),
            "an empty working set proves nothing"
        );
    }
}
