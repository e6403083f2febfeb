//! Where vmig's names meet QEMU's: the migration parameters and capabilities QMP sets
//! ([`Settings`]), and the `query-migrate` answer built from a [`MigrationReport`] and read back
//! into one ([`to_query_migrate`], [`from_query_migrate`]). QEMU's names where QEMU has the
//! concept; vmig's own facts under `x-vmig-` keys.

use serde_json::{Map, Value, json};
use vmig_migration::report::{DeviceStats, SourceStats, Timeline, Verification};
use vmig_migration::{MigrationParams, MigrationReport, Status};

/// `query-migrate`'s `status` for vmig's: QEMU has no "verifying" (the destination checks
/// before it resumes), so that phase stays `device`, as QEMU's is until the destination runs;
/// `x-vmig-phase` tells them apart.
pub fn qmp_status(status: Status) -> &'static str {
    match status {
        Status::Verifying => "device",
        other => other.name(),
    }
}

/// The migration parameters and capabilities a QMP client sets before `migrate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `downtime-limit`, milliseconds.
    pub downtime_ms: u64,
    /// `max-bandwidth`, bytes per second (0: unlimited).
    pub max_bandwidth: u64,
    /// `multifd-channels`: connections when the `multifd` capability is on.
    pub multifd_channels: u16,
    /// `x-vmig-timeout`, seconds.
    pub timeout_s: u64,
    /// `x-vmig-verify-memory`.
    pub verify_memory: bool,
    /// `x-vmig-device-dirty-tracking`.
    pub device_dirty_tracking: bool,
    /// Capability `auto-converge`.
    pub auto_converge: bool,
    /// Capability `multifd`.
    pub multifd: bool,
    /// Capability `events` (QEMU's default is off; vmig's is on, and a client that ignores
    /// events loses nothing).
    pub events: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let p = MigrationParams::default();
        Self {
            downtime_ms: p.downtime_ms,
            max_bandwidth: p.max_bandwidth,
            multifd_channels: 2,
            timeout_s: p.timeout_s,
            verify_memory: p.verify_memory,
            device_dirty_tracking: p.device_dirty_tracking,
            auto_converge: p.auto_converge,
            multifd: false,
            events: true,
        }
    }
}

/// The capabilities vmig has, by QEMU's name.
pub const CAPABILITIES: &[&str] = &["auto-converge", "events", "multifd"];
/// The parameters vmig has, by QEMU's name (vmig's own under `x-vmig-`).
pub const PARAMETERS: &[&str] = &[
    "downtime-limit",
    "max-bandwidth",
    "multifd-channels",
    "x-vmig-timeout",
    "x-vmig-verify-memory",
    "x-vmig-device-dirty-tracking",
];

impl Settings {
    /// The engine's parameters for a migration to `uri`.
    pub fn params(&self, uri: String) -> MigrationParams {
        MigrationParams {
            uri,
            downtime_ms: self.downtime_ms,
            max_bandwidth: self.max_bandwidth,
            connections: if self.multifd {
                self.multifd_channels
            } else {
                1
            },
            timeout_s: self.timeout_s,
            auto_converge: self.auto_converge,
            device_dirty_tracking: self.device_dirty_tracking,
            verify_memory: self.verify_memory,
        }
    }

    /// `query-migrate-parameters`.
    pub fn parameters(&self) -> Value {
        json!({
            "downtime-limit": self.downtime_ms,
            "max-bandwidth": self.max_bandwidth,
            "multifd-channels": self.multifd_channels,
            "x-vmig-timeout": self.timeout_s,
            "x-vmig-verify-memory": self.verify_memory,
            "x-vmig-device-dirty-tracking": self.device_dirty_tracking,
        })
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities(&self) -> Value {
        json!([
            {"capability": "auto-converge", "state": self.auto_converge},
            {"capability": "events", "state": self.events},
            {"capability": "multifd", "state": self.multifd},
        ])
    }

    /// The flag of capability `name`, if vmig has it.
    pub fn capability_mut(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "auto-converge" => Some(&mut self.auto_converge),
            "events" => Some(&mut self.events),
            "multifd" => Some(&mut self.multifd),
            _ => None,
        }
    }
}

/// `query-migrate` for `report`: `{}` before any migration, as QEMU answers.
pub fn to_query_migrate(report: &MigrationReport) -> Value {
    if report.status == Status::None {
        return json!({});
    }
    let ram = &report.ram;
    let vfio: u64 = report
        .devices
        .iter()
        .map(|d| d.precopy_bytes + d.stopcopy_bytes)
        .sum();
    let mut info = json!({
        "status": qmp_status(report.status),
        "total-time": report.total_ms,
        "setup-time": report.setup_ms,
        "downtime": report.downtime_ms,
        "expected-downtime": report.expected_downtime_ms,
        "cpu-throttle-percentage": report.throttle_percent,
        "ram": {
            "transferred": ram.transferred,
            "remaining": ram.remaining,
            "total": ram.total,
            "duplicate": ram.zero_pages,
            "normal": ram.normal_pages,
            "x-vmig-sparse": ram.sparse_pages,
            "normal-bytes": ram.normal_pages * 4096,
            "dirty-pages-rate": ram.dirty_pages_rate,
            "mbps": ram.mbps,
            "x-vmig-bandwidth-mbps": ram.bandwidth_mbps,
            "dirty-sync-count": report.passes,
            "page-size": 4096,
        },
        "vfio": {"transferred": vfio},
        "x-vmig-phase": report.status.name(),
        "x-vmig-verified": report.verified,
        "x-vmig-committed": report.committed,
        "x-vmig-devices": report.devices,
        "x-vmig-dirty-sources": report.dirty_sources,
        "x-vmig-verification": report.verification,
        "x-vmig-switchover-ack-ms": report.switchover_ack_ms,
        "x-vmig-timeline": report.timeline,
    });
    if let (Some(error), Some(map)) = (&report.error, info.as_object_mut()) {
        map.insert("error-desc".into(), json!(error));
    }
    info
}

fn field<'a>(info: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut map = info;
    for key in parents {
        map = map.get(*key)?.as_object()?;
    }
    map.get(*last)
}

/// Reads a `query-migrate` answer (vmig's, with its `x-vmig-` keys) back into a report.
pub fn from_query_migrate(info: &Value) -> Result<MigrationReport, String> {
    let Some(info) = info.as_object() else {
        return Err(format!("query-migrate answered {info}: expected an object"));
    };
    if info.is_empty() {
        return Ok(MigrationReport::default());
    }
    let number = |path: &[&str]| field(info, path).and_then(Value::as_u64).unwrap_or(0);
    let flag = |key: &str| {
        field(info, &[key])
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let list = |key: &str| field(info, &[key]).cloned().unwrap_or(Value::Null);
    let phase = field(info, &["x-vmig-phase"])
        .or_else(|| field(info, &["status"]))
        .cloned()
        .unwrap_or(Value::Null);
    let status: Status = serde_json::from_value(phase.clone())
        .map_err(|e| format!("query-migrate status {phase}: {e}"))?;
    let devices: Vec<DeviceStats> =
        serde_json::from_value(list("x-vmig-devices")).unwrap_or_default();
    let dirty_sources: Vec<SourceStats> =
        serde_json::from_value(list("x-vmig-dirty-sources")).unwrap_or_default();
    let verification: Option<Verification> =
        serde_json::from_value(list("x-vmig-verification")).unwrap_or_default();
    let timeline: Timeline = serde_json::from_value(list("x-vmig-timeline")).unwrap_or_default();
    let mut report = MigrationReport {
        status,
        total_ms: number(&["total-time"]),
        setup_ms: number(&["setup-time"]),
        downtime_ms: number(&["downtime"]),
        expected_downtime_ms: number(&["expected-downtime"]),
        passes: number(&["ram", "dirty-sync-count"]),
        devices,
        dirty_sources,
        throttle_percent: number(&["cpu-throttle-percentage"]),
        verified: flag("x-vmig-verified"),
        verification,
        committed: flag("x-vmig-committed"),
        switchover_ack_ms: field(info, &["x-vmig-switchover-ack-ms"]).and_then(Value::as_u64),
        timeline,
        error: field(info, &["error-desc"])
            .and_then(Value::as_str)
            .map(String::from),
        ..MigrationReport::default()
    };
    report.ram.transferred = number(&["ram", "transferred"]);
    report.ram.remaining = number(&["ram", "remaining"]);
    report.ram.total = number(&["ram", "total"]);
    report.ram.zero_pages = number(&["ram", "duplicate"]);
    report.ram.normal_pages = number(&["ram", "normal"]);
    report.ram.sparse_pages = number(&["ram", "x-vmig-sparse"]);
    report.ram.dirty_pages_rate = number(&["ram", "dirty-pages-rate"]);
    report.ram.mbps = field(info, &["ram", "mbps"])
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    report.ram.bandwidth_mbps = field(info, &["ram", "x-vmig-bandwidth-mbps"])
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmig_migration::report::{DeviceStats, RamStats, SourceStats};

    #[test]
    fn a_report_survives_query_migrate_and_back() {
        let report = MigrationReport {
            status: Status::Verifying,
            total_ms: 812,
            setup_ms: 12,
            downtime_ms: 40,
            expected_downtime_ms: 35,
            passes: 3,
            switchover_ack_ms: Some(80),
            ram: RamStats {
                total: 64 << 20,
                transferred: 5 << 20,
                remaining: 4096,
                zero_pages: 15000,
                normal_pages: 1384,
                sparse_pages: 250,
                dirty_pages_rate: 900,
                mbps: 812.5,
                bandwidth_mbps: 930.25,
            },
            devices: vec![DeviceStats {
                name: "src.sock".into(),
                protocol: "v2".into(),
                precopy_bytes: 92,
                stopcopy_bytes: 100,
                precopy_pending: Some(vmig_migration::device::PrecopyPending {
                    initial_bytes: 0,
                    dirty_bytes: 24,
                }),
                stop_copy_estimate: Some(120),
                mediation: Some(vmig_migration::mediator::MediationStats {
                    mediator: "dma-engine".into(),
                    handle: 2,
                    trapped: true,
                    trapped_writes: 31,
                    mean_write_ns: 170_000,
                }),
            }],
            dirty_sources: vec![SourceStats {
                name: "vmm".into(),
                pages: 7,
            }],
            throttle_percent: 20,
            verified: false,
            verification: None,
            committed: true,
            error: Some("lost".into()),
            timeline: Timeline {
                setup_us: 12_400,
                passes: vec![vmig_migration::report::PassTime {
                    pages: 16384,
                    bytes: 5 << 20,
                    us: 300_000,
                }],
                stop_us: 900,
                final_pages_us: 1200,
                device_state_us: 300,
                vcpu_us: 100,
                digest_us: 4000,
                digest_pages_read: 262_144,
                digest_wait_us: 2500,
                checks_us: 800,
                commit_us: 400,
            },
        };
        let info = to_query_migrate(&report);
        assert_eq!(info["status"], "device");
        assert_eq!(info["x-vmig-phase"], "verifying");
        assert_eq!(info["ram"]["duplicate"], 15000);
        assert_eq!(info["ram"]["dirty-sync-count"], 3);
        assert_eq!(info["vfio"]["transferred"], 192);
        assert_eq!(info["error-desc"], "lost");
        assert_eq!(from_query_migrate(&info).unwrap(), report);
        assert_eq!(to_query_migrate(&MigrationReport::default()), json!({}));
        assert_eq!(
            from_query_migrate(&json!({})).unwrap(),
            MigrationReport::default()
        );
        assert!(from_query_migrate(&json!([])).is_err());
    }

    #[test]
    fn connections_follow_multifd_as_in_qemu() {
        let mut settings = Settings::default();
        assert_eq!(settings.params("unix:x".into()).connections, 1);
        *settings.capability_mut("multifd").unwrap() = true;
        settings.multifd_channels = 3;
        assert_eq!(settings.params("unix:x".into()).connections, 3);
        assert!(settings.capability_mut("xbzrle").is_none());
    }
}
