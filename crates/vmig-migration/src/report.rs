//! What a user asks of a migration ([`MigrationParams`]) and what it reports
//! ([`MigrationReport`], the answer to `query-migrate` and `vmig demo --json`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::device::PrecopyPending;
use crate::driver::DeviceCheck;

/// Default downtime limit (QEMU's and Cloud Hypervisor's).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default time a migration may take before it is cancelled.
pub const DEFAULT_TIMEOUT_S: u64 = 600;
/// Most parallel connections.
pub const MAX_CONNECTIONS: u16 = 16;

/// The `migrate` command's arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationParams {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// Longest pause the guest may see, in milliseconds.
    pub downtime_ms: u64,
    /// Bytes per second the migration may use; 0 is unlimited.
    pub max_bandwidth: u64,
    /// Connections carrying pages in parallel (1 to 16).
    pub connections: u16,
    /// Seconds before the migration is cancelled.
    pub timeout_s: u64,
    /// Throttle the vCPUs when the guest dirties memory faster than the link drains it.
    pub auto_converge: bool,
    /// Track the pages devices dirty. Turning this off is for demonstrating that verification
    /// catches the pages a migration loses without it; never for real use.
    pub device_dirty_tracking: bool,
    /// Compare every guest page's digest on both sides before resuming. With a device
    /// attached the source reads all of RAM again with the VM stopped, as a DMA write its
    /// tracking missed shows only in the page (about 75 ms of downtime per GiB on a 2-core
    /// machine); without one it compares the digests taken as pages were sent, then, with the
    /// VM running on the destination, reads RAM again to check that no page changed unreported.
    /// Off, the report's `verified` is false, as memory was not compared.
    pub verify_memory: bool,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            uri: String::new(),
            downtime_ms: DEFAULT_DOWNTIME_MS,
            max_bandwidth: 0,
            connections: 1,
            timeout_s: DEFAULT_TIMEOUT_S,
            auto_converge: true,
            device_dirty_tracking: true,
            verify_memory: true,
        }
    }
}

impl MigrationParams {
    /// An error naming the first parameter out of range.
    pub fn check(&self) -> crate::Result<()> {
        self.uri.parse::<crate::transport::Uri>()?;
        let bad = |what: String| Err(crate::MigrationError::Invalid(what));
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return bad(format!(
                "connections={}: expected 1 to {MAX_CONNECTIONS}",
                self.connections
            ));
        }
        if !(1..=2_000_000).contains(&self.downtime_ms) {
            return bad(format!(
                "downtime_ms={}: expected 1 to 2000000",
                self.downtime_ms
            ));
        }
        if self.timeout_s == 0 {
            return bad("timeout_s=0: expected at least 1 second".into());
        }
        if self.max_bandwidth != 0 && self.max_bandwidth < 1 << 20 {
            return bad(format!(
                "max_bandwidth={}: expected 0 (unlimited) or at least 1 MiB/s (1048576)",
                self.max_bandwidth
            ));
        }
        Ok(())
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// No migration has run.
    #[default]
    None,
    /// Connecting, sending the configuration, starting dirty tracking.
    Setup,
    /// Pre-copy passes.
    Active,
    /// The VM is stopped; the rest is being copied.
    Device,
    /// Everything is sent; the destination verifies.
    Verifying,
    /// The destination runs the VM.
    Completed,
    /// Failed before the commit; the source runs as before.
    Failed,
    /// Cancelled; the source runs as before.
    Cancelled,
    /// The source sent its commit and then lost the destination before it said it resumed:
    /// the VM may run there or nowhere, but never again here (the stream module's table of
    /// lost messages says why).
    Unknown,
}

impl Status {
    /// The name `query-migrate` gives it ("active", "completed", ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Device => "device",
            Self::Verifying => "verifying",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the migration is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Unknown
        )
    }
}

/// RAM figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RamStats {
    /// Guest RAM in bytes.
    pub total: u64,
    /// Bytes of RAM records sent (headers, page numbers and data).
    pub transferred: u64,
    /// Bytes known dirty and not yet sent.
    pub remaining: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages sent with their data.
    pub normal_pages: u64,
    /// Sparse pages: sent as their few non-zero words.
    #[serde(default)]
    pub sparse_pages: u64,
    /// Pages the guest and devices dirtied per second, over the last pass.
    pub dirty_pages_rate: u64,
    /// Throughput of RAM so far, in megabits per second.
    pub mbps: f64,
    /// The bandwidth the convergence decision divides the remaining bytes by, as of the last
    /// pre-copy pass: guest RAM moved (4 KiB a page, however encoded) over the time the passes
    /// took, in megabits per second.
    #[serde(default)]
    pub bandwidth_mbps: f64,
}

/// One device's state transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device.
    pub name: String,
    /// "v1", "v2".
    pub protocol: String,
    /// Bytes of state sent while the VM ran.
    pub precopy_bytes: u64,
    /// Bytes of state sent while it was stopped.
    pub stopcopy_bytes: u64,
    /// What the device said, at the last pre-copy pass, was still to be read of its initial
    /// and of its dirtied state (`VFIO_MIG_GET_PRECOPY_INFO`), when it says.
    #[serde(default)]
    pub precopy_pending: Option<PrecopyPending>,
    /// The device's estimate, at the last pre-copy pass, of its stop-and-copy bytes
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`), when it gives one; counted in the expected
    /// downtime.
    #[serde(default)]
    pub stop_copy_estimate: Option<u64>,
    /// Its migration mediator, when one owns it: whether it trapped, and what that cost.
    #[serde(default)]
    pub mediation: Option<crate::mediator::MediationStats>,
}

/// Pages one dirty source reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    /// The source.
    pub name: String,
    /// Pages it reported dirty (summed over harvests).
    pub pages: u64,
}

/// What the destination checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Pages whose digests were compared before resuming.
    pub pages_compared: u64,
    /// Pages whose digests differed (the first few listed in `problems`).
    pub pages_differing: u64,
    /// Pages the source read again after the destination resumed, to compare with the digests
    /// they were last sent with (the pages not read again at the stop: see `verify_memory`).
    #[serde(default)]
    pub pages_audited: u64,
    /// Of those, pages that had changed with no dirty source reporting it: the destination
    /// runs with them stale (the first few listed in `problems`).
    #[serde(default)]
    pub pages_changed_unreported: u64,
    /// Page copies that arrived different from the digest sent with them (the guest wrote the
    /// page while it was sent), each taken only when the page came again intact.
    #[serde(default)]
    pub pages_torn: u64,
    /// Devices whose state digests were compared.
    pub devices_compared: u64,
    /// Working-set pages the guest's own verify checked after resuming.
    pub guest_pages_checked: u64,
    /// Pages the guest's verify found bad.
    pub guest_bad_pages: u64,
    /// The dma-engines' records.
    pub device_records: Vec<DeviceCheck>,
    /// Everything that was wrong.
    pub problems: Vec<String>,
}

impl Verification {
    /// All checks held, the comparison of every page's digest included.
    pub fn passed(&self) -> bool {
        self.pages_compared > 0 && self.checks_held()
    }

    /// Every check that ran held (pages are not compared with `verify_memory=false`).
    pub fn checks_held(&self) -> bool {
        self.problems.is_empty()
            && self.pages_differing == 0
            && self.pages_changed_unreported == 0
            && self.guest_bad_pages == 0
            && self.device_records.iter().all(DeviceCheck::passed)
    }
}

/// One pre-copy pass: what it sent and how long it took.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassTime {
    /// Pages sent (with data or as zero markers).
    pub pages: u64,
    /// Bytes of guest RAM it moved (4 KiB a page, however the page was encoded).
    pub bytes: u64,
    /// Microseconds, its devices' pre-copy data included.
    pub us: u64,
}

/// Where a migration's time went, as the source saw it, in microseconds. The steps of the stop
/// follow each other; the digest of the pages read again (`verify_memory` with devices) runs
/// beside the final pages, device and vCPU states, and `digest_wait_us` is what was left of it
/// after them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// From `migrate` to the first pass: connections, Config, the destination's Ready, dirty
    /// tracking and devices' pre-copy started.
    pub setup_us: u64,
    /// Each pre-copy pass.
    pub passes: Vec<PassTime>,
    /// Pausing the vCPUs, stopping the devices and the last harvest.
    pub stop_us: u64,
    /// The final pass's pages.
    pub final_pages_us: u64,
    /// The devices' stop-and-copy state.
    pub device_state_us: u64,
    /// Saving and sending the vCPU state.
    pub vcpu_us: u64,
    /// Reading pages again for their digests (`verify_memory`), on its own threads beside the
    /// three steps before.
    pub digest_us: u64,
    /// Pages read again for their digests: all of RAM when a device can write it by DMA,
    /// else none (each page's digest is the one taken as it was last sent).
    #[serde(default)]
    pub digest_pages_read: u64,
    /// Waiting for the digest after them, and sending its records.
    pub digest_wait_us: u64,
    /// From `Complete` to `Accepted`: the destination's comparisons and loads.
    pub checks_us: u64,
    /// From `Commit` to `Resumed`: the destination starting devices and vCPUs.
    pub commit_us: u64,
}

/// Whole microseconds of `elapsed` (saturating).
pub fn micros(elapsed: std::time::Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// The `query-migrate` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Where it is.
    pub status: Status,
    /// Milliseconds since `migrate`; once over, until the destination resumed (or the failure).
    pub total_ms: u64,
    /// Milliseconds from `migrate` to the first page.
    pub setup_ms: u64,
    /// Milliseconds the guest was stopped (from the source's pause to the destination's
    /// resume, as the source saw it).
    pub downtime_ms: u64,
    /// Downtime expected if the migration stopped now.
    pub expected_downtime_ms: u64,
    /// Passes over memory (the first full one included).
    pub passes: u64,
    /// Milliseconds from `migrate` to the destination's switchover-ack (every device was given
    /// its initial pre-copy state); `None` without devices, or before it came.
    #[serde(default)]
    pub switchover_ack_ms: Option<u64>,
    /// RAM.
    pub ram: RamStats,
    /// Devices.
    pub devices: Vec<DeviceStats>,
    /// Dirty sources.
    pub dirty_sources: Vec<SourceStats>,
    /// vCPU throttle of auto-converge, in percent.
    pub throttle_percent: u64,
    /// True only when the destination found every page and device state equal before
    /// resuming, and the guest's verify and the device records passed after.
    pub verified: bool,
    /// What the destination checked.
    pub verification: Option<Verification>,
    /// Whether the source handed the VM over: it sent its commit and will never resume the VM
    /// (cleared again only when the destination answers the commit with an abort, which says
    /// it did not run the VM).
    pub committed: bool,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Where the time went.
    #[serde(default)]
    pub timeline: Timeline,
}

/// The live report of one migration, shared between the engine and whoever queries it, plus
/// the cancel request.
#[derive(Debug, Clone)]
pub struct Progress {
    inner: Arc<ProgressInner>,
}

/// Called with the report after every change of its status or pass count (QMP's `MIGRATION`
/// and `MIGRATION_PASS` events come from here). It runs on the migration's thread: it should
/// hand the report on, not block.
pub type ProgressListener = Arc<dyn Fn(&MigrationReport) + Send + Sync>;

struct ProgressInner {
    report: Mutex<MigrationReport>,
    started: Mutex<Option<Instant>>,
    cancel: AtomicBool,
    listeners: Mutex<Vec<ProgressListener>>,
}

impl std::fmt::Debug for ProgressInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressInner")
            .field("report", &self.report)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            inner: Arc::new(ProgressInner {
                report: Mutex::new(MigrationReport::default()),
                started: Mutex::new(None),
                cancel: AtomicBool::new(false),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl Progress {
    /// The report as of now.
    pub fn report(&self) -> MigrationReport {
        let mut report = self.lock().clone();
        if !report.status.is_final()
            && !report.committed
            && let Some(started) = *self.inner.started.lock().unwrap_or_else(|e| e.into_inner())
        {
            report.total_ms = millis(started.elapsed());
        }
        report
    }

    /// Edits the report; a change of status or pass count goes to the listeners.
    pub fn update(&self, f: impl FnOnce(&mut MigrationReport)) {
        let changed = {
            let mut report = self.lock();
            let before = (report.status, report.passes);
            f(&mut report);
            (before != (report.status, report.passes)).then(|| report.clone())
        };
        if let Some(report) = changed {
            self.notify(&report);
        }
    }

    /// Adds a listener for changes of status and pass count.
    pub fn on_change(&self, listener: ProgressListener) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
    }

    fn notify(&self, report: &MigrationReport) {
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for listener in listeners {
            listener(report);
        }
    }

    fn lock(&self) -> MutexGuard<'_, MigrationReport> {
        self.inner.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resets for a new migration starting now.
    pub fn begin(&self) {
        *self.inner.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.inner.cancel.store(false, Ordering::Release);
        self.update(|r| {
            *r = MigrationReport {
                status: Status::Setup,
                ..MigrationReport::default()
            }
        });
    }

    /// Asks the running migration to stop (before it commits).
    pub fn cancel(&self) {
        self.inner.cancel.store(true, Ordering::Release);
    }

    /// Whether a cancel was asked.
    pub fn cancel_requested(&self) -> bool {
        self.inner.cancel.load(Ordering::Acquire)
    }

    /// Microseconds since [`Self::begin`].
    pub fn elapsed_us(&self) -> u64 {
        self.inner
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(0, |s| micros(s.elapsed()))
    }

    /// Milliseconds since [`Self::begin`].
    pub fn elapsed_ms(&self) -> u64 {
        self.elapsed_us() / 1000
    }
}

/// Whole milliseconds of `elapsed` (saturating: 2^64 ms is 584 million years).
pub fn millis(elapsed: std::time::Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_hear_every_change_of_status_and_pass_count_and_nothing_else() {
        let progress = Progress::default();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&heard);
        progress.on_change(Arc::new(move |r: &MigrationReport| {
            sink.lock().unwrap().push((r.status, r.passes));
        }));
        progress.begin();
        progress.update(|r| r.ram.transferred = 5);
        progress.update(|r| r.status = Status::Active);
        progress.update(|r| r.passes = 1);
        progress.update(|r| r.passes = 1);
        progress.update(|r| r.status = Status::Completed);
        assert_eq!(
            *heard.lock().unwrap(),
            [
                (Status::Setup, 0),
                (Status::Active, 0),
                (Status::Active, 1),
                (Status::Completed, 1)
            ]
        );
    }

    #[test]
    fn status_names_are_the_reported_ones() {
        use Status::*;
        for status in [
            None, Setup, Active, Device, Verifying, Completed, Failed, Cancelled, Unknown,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.name());
        }
    }
}
