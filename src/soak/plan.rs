//! The soak's cases: every parameter of case `index` and its fault, drawn from `(seed, index)`
//! alone with a small deterministic generator, so that one case replays by itself.

use std::fmt;

use vmig_kvm::DirtyLogMode;
use vmig_migration::stream::Kind;

use crate::relay::{Direction, Fault, FaultAction};

/// SplitMix64 (Steele, Lea and Flood): a 64-bit state stepped by a constant and mixed; enough
/// for drawing test parameters, and the same on every machine.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator of case `index` of a soak with `seed`.
    pub fn for_case(seed: u64, index: u64) -> Self {
        let mut mixer = Self(seed);
        let base = mixer.next_u64();
        Self(base ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number from `low` to `high`, both included.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        debug_assert!(low <= high);
        let span = high - low + 1;
        // The modulo's bias is below 2^-50 for the spans drawn here.
        low + self.next_u64() % span
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(1, 100) <= percent
    }

    /// One of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        let last = u64::try_from(items.len() - 1).unwrap_or(0);
        items[usize::try_from(self.range(0, last)).unwrap_or(0)]
    }
}

/// The guest's workload kinds (`vmig run --workload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `sequential`.
    Sequential,
    /// `random`.
    Random,
    /// `hotcold`.
    HotCold,
}

impl WorkloadKind {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::HotCold => "hotcold",
        }
    }
}

/// A dma-engine's migration protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The v1 migration region.
    V1,
    /// The v2 state machine.
    V2,
}

impl Protocol {
    /// Its name on the command line (`vmig device serve --migration`).
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// A process the soak may kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    /// The source `vmig run --api`.
    Source,
    /// The destination `vmig run --incoming`.
    Destination,
    /// The source's device server of this index.
    SourceDevice(usize),
    /// The destination's device server of this index.
    DestinationDevice(usize),
}

impl Victim {
    /// The child process's name (and its log's).
    pub fn process(self) -> String {
        match self {
            Self::Source => "source".into(),
            Self::Destination => "destination".into(),
            Self::SourceDevice(i) => format!("source-device-{i}"),
            Self::DestinationDevice(i) => format!("destination-device-{i}"),
        }
    }
}

/// When a kill or a cancel happens: `delay_ms` after the relay forwarded the `nth` record of
/// `kind` in `direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// The direction the record travels.
    pub direction: Direction,
    /// Its kind.
    pub kind: Kind,
    /// Which one, from 1.
    pub nth: u64,
    /// Milliseconds after it.
    pub delay_ms: u64,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ms after {} #{} {}",
            self.delay_ms,
            self.kind.name(),
            self.nth,
            self.direction
        )
    }
}

/// How a refusing destination differs from its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// It prepared this many MiB of RAM.
    Memory(u64),
    /// It has one device more, speaking this protocol.
    ExtraDevice(Protocol),
}

/// What the soak does once a stall has held its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallEnd {
    /// The relay closes every connection, as a network's connections time out.
    Close,
    /// `migrate_cancel` on the source, which must end the migration however the network
    /// behaves (drawn only for stalls before the commit); the connections close afterwards.
    Cancel,
}

/// The fault of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPlan {
    /// None: the migration must complete, verified.
    None,
    /// SIGKILL a process.
    Kill {
        /// Which.
        victim: Victim,
        /// When.
        trigger: Trigger,
    },
    /// `migrate_cancel` on the source.
    Cancel {
        /// When.
        trigger: Trigger,
    },
    /// The relay's fault; a stall is held `hold_ms`, then ended as `then` says.
    Stream {
        /// The relay's fault.
        fault: Fault,
        /// How long a stall holds.
        hold_ms: u64,
        /// What ends a stall.
        then: StallEnd,
    },
    /// The destination refuses the source's configuration.
    Refusal(Mismatch),
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Kill { victim, trigger } => write!(f, "kill {} {trigger}", victim.process()),
            Self::Cancel { trigger } => write!(f, "migrate_cancel {trigger}"),
            Self::Stream {
                fault:
                    fault @ Fault::At {
                        action: FaultAction::Stall,
                        ..
                    },
                hold_ms,
                then: StallEnd::Close,
            } => write!(f, "{fault}, closed after {hold_ms} ms"),
            Self::Stream {
                fault,
                hold_ms,
                then: StallEnd::Cancel,
            } => write!(f, "{fault}, migrate_cancel after {hold_ms} ms"),
            Self::Stream { fault, .. } => write!(f, "{fault}"),
            Self::Refusal(Mismatch::Memory(mib)) => {
                write!(f, "refusal (the destination prepared {mib} MiB)")
            }
            Self::Refusal(Mismatch::ExtraDevice(p)) => {
                write!(
                    f,
                    "refusal (the destination has an extra {} device)",
                    p.name()
                )
            }
        }
    }
}

/// Everything one migration of the soak is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The soak's seed.
    pub seed: u64,
    /// Its index in the soak.
    pub index: u64,
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// The guest's workload.
    pub workload: WorkloadKind,
    /// Pages per second the guest writes.
    pub rate: u64,
    /// CPU dirty tracking.
    pub dirty_log: DirtyLogMode,
    /// The devices, each a dma-engine server per side.
    pub devices: Vec<Protocol>,
    /// Records per second each device writes by DMA.
    pub dma_rate: u64,
    /// Connections (`multifd-channels`, the `multifd` capability on above 1).
    pub channels: u16,
    /// `max-bandwidth` in MiB/s; `None`: unlimited.
    pub max_bandwidth_mib: Option<u64>,
    /// `downtime-limit`, ms.
    pub downtime_ms: u64,
    /// The relay listens on TCP (else on a UNIX socket).
    pub relay_over_tcp: bool,
    /// How long the guest runs before the migration, ms.
    pub warmup_ms: u64,
    /// The fault.
    pub fault: FaultPlan,
}

impl Case {
    /// Case `index` of a soak with `seed`.
    pub fn draw(seed: u64, index: u64) -> Self {
        let mut rng = SplitMix64::for_case(seed, index);
        let ram_mib = 16 * rng.range(1, 8);
        let vcpus = usize::try_from(rng.range(1, 4)).unwrap_or(1);
        let workload = rng.pick(&[
            WorkloadKind::Sequential,
            WorkloadKind::Random,
            WorkloadKind::HotCold,
        ]);
        let dirty_log = rng.pick(&[
            DirtyLogMode::Bitmap,
            DirtyLogMode::ClearLog,
            DirtyLogMode::Ring,
        ]);
        let device_count = rng.range(0, 2);
        let devices: Vec<Protocol> = (0..device_count)
            .map(|_| rng.pick(&[Protocol::V1, Protocol::V2]))
            .collect();
        let dma_rate = rng.range(200, 2000);
        let channels = u16::try_from(rng.range(1, 4)).unwrap_or(1);
        let max_bandwidth_mib = rng.chance(50).then(|| 32 * rng.range(1, 8));
        // The guest dirties at most half of what the bandwidth carries (in 4 KiB pages), so
        // that pre-copy converges with auto-converge's help well within the timeout.
        let pages_per_s = max_bandwidth_mib.map_or(u64::MAX, |mib| mib * 256);
        let rate = rng.range(500, 6000).min(pages_per_s / 2);
        let downtime_ms = rng.pick(&[50, 100, 200, 300, 500]);
        let relay_over_tcp = rng.chance(50);
        let warmup_ms = rng.range(100, 800);
        let fault = draw_fault(&mut rng, ram_mib, &devices, channels);
        Self {
            seed,
            index,
            ram_mib,
            vcpus,
            workload,
            rate,
            dirty_log,
            devices,
            dma_rate,
            channels,
            max_bandwidth_mib,
            downtime_ms,
            relay_over_tcp,
            warmup_ms,
            fault,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MiB, {} vCPU(s), {} {} pages/s, {}, ",
            self.ram_mib,
            self.vcpus,
            self.workload.name(),
            self.rate,
            self.dirty_log
        )?;
        if self.devices.is_empty() {
            f.write_str("no devices, ")?;
        } else {
            let names: Vec<&str> = self.devices.iter().map(|p| p.name()).collect();
            write!(f, "devices {} at {}/s, ", names.join("+"), self.dma_rate)?;
        }
        write!(
            f,
            "{} connection(s), {}, downtime {} ms, relay on {}; fault: {}",
            self.channels,
            self.max_bandwidth_mib
                .map_or("unlimited".to_string(), |mib| format!("{mib} MiB/s")),
            self.downtime_ms,
            if self.relay_over_tcp { "tcp" } else { "unix" },
            self.fault
        )
    }
}

/// The kinds of record every migration of this shape sends, each with how many of it there
/// surely are in its direction (a trigger or a fault takes one of them).
fn records(ram_mib: u64, devices: usize, channels: u16) -> Vec<(Kind, u64)> {
    let mut kinds = vec![
        (Kind::Config, 1),
        (Kind::Ready, 1),
        // Pass 0 sends all RAM in records of 256 pages (1 MiB).
        (Kind::Pages, ram_mib),
        (Kind::PassEnd, u64::from(channels)),
        (Kind::VcpuState, 1),
        (Kind::Digests, 1),
        (Kind::Complete, 1),
        (Kind::Accepted, 1),
        (Kind::Commit, 1),
        (Kind::Resumed, 1),
        (Kind::Result, 1),
    ];
    if devices > 0 {
        let devices = u64::try_from(devices).unwrap_or(1);
        kinds.extend([
            (Kind::DeviceData, 1),
            (Kind::InitialSent, devices),
            (Kind::DeviceEnd, devices),
            (Kind::SwitchoverAck, 1),
        ]);
    }
    kinds
}

/// A record of a random kind in a random direction, and which one of its kind.
fn draw_record(
    rng: &mut SplitMix64,
    ram_mib: u64,
    devices: usize,
    channels: u16,
) -> (Direction, Kind, u64) {
    let direction = rng.pick(&Direction::BOTH);
    let kinds: Vec<(Kind, u64)> = records(ram_mib, devices, channels)
        .into_iter()
        .filter(|(kind, _)| Direction::of(*kind) == Some(direction))
        .collect();
    let (kind, count) = rng.pick(&kinds);
    (direction, kind, rng.range(1, count))
}

fn draw_fault(
    rng: &mut SplitMix64,
    ram_mib: u64,
    devices: &[Protocol],
    channels: u16,
) -> FaultPlan {
    let n = devices.len();
    let trigger = |rng: &mut SplitMix64| {
        // Most of a migration's time is pre-copy: half the triggers fall in it.
        let (direction, kind, nth) = if rng.chance(50) {
            (Direction::ToDestination, Kind::Pages, rng.range(1, ram_mib))
        } else {
            draw_record(rng, ram_mib, n, channels)
        };
        Trigger {
            direction,
            kind,
            nth,
            delay_ms: rng.range(0, 100),
        }
    };
    let roll = rng.range(1, 100);
    match roll {
        1..=10 => FaultPlan::None,
        11..=22 => FaultPlan::Kill {
            victim: Victim::Source,
            trigger: trigger(rng),
        },
        23..=34 => FaultPlan::Kill {
            victim: Victim::Destination,
            trigger: trigger(rng),
        },
        35..=44 if n > 0 => {
            let index =
                usize::try_from(rng.range(0, u64::try_from(n - 1).unwrap_or(0))).unwrap_or(0);
            let victim = if rng.chance(50) {
                Victim::SourceDevice(index)
            } else {
                Victim::DestinationDevice(index)
            };
            FaultPlan::Kill {
                victim,
                trigger: trigger(rng),
            }
        }
        45..=54 => FaultPlan::Cancel {
            trigger: trigger(rng),
        },
        55..=62 => FaultPlan::Refusal(if rng.chance(50) {
            let other = if ram_mib == 16 { 32 } else { ram_mib - 16 };
            Mismatch::Memory(other)
        } else {
            Mismatch::ExtraDevice(rng.pick(&[Protocol::V1, Protocol::V2]))
        }),
        _ => {
            let action = rng.pick(&[
                FaultAction::CutBefore,
                FaultAction::CutAfter,
                FaultAction::Corrupt,
                FaultAction::Stall,
            ]);
            let (direction, kind, nth) = draw_record(rng, ram_mib, n, channels);
            let hold_ms = rng.range(500, 3000);
            // Cancelling is the source's to do only before it commits.
            let before_commit = !matches!(kind, Kind::Commit | Kind::Resumed | Kind::Result);
            let then = if action == FaultAction::Stall && before_commit && rng.chance(50) {
                StallEnd::Cancel
            } else {
                StallEnd::Close
            };
            FaultPlan::Stream {
                fault: Fault::At {
                    action,
                    kind,
                    nth,
                    direction,
                },
                hold_ms,
                then,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_depends_on_its_seed_and_index_only() {
        assert_eq!(Case::draw(7, 3), Case::draw(7, 3));
        let cases: Vec<Case> = (0..50).map(|i| Case::draw(7, i)).collect();
        assert_ne!(cases[0], cases[1]);
        assert_ne!(Case::draw(7, 3), Case::draw(8, 3));
        // Drawing case 40 alone gives what the soak drew in turn.
        assert_eq!(Case::draw(7, 40), cases[40]);
    }

    #[test]
    fn parameters_stay_in_their_ranges_and_every_fault_class_is_drawn() {
        let mut classes = std::collections::BTreeSet::new();
        for index in 0..2000 {
            let case = Case::draw(42, index);
            assert!((16..=128).contains(&case.ram_mib) && case.ram_mib.is_multiple_of(16));
            assert!((1..=4).contains(&case.vcpus));
            assert!((1..=4).contains(&case.channels));
            assert!(case.devices.len() <= 2);
            if let Some(mib) = case.max_bandwidth_mib {
                assert!(case.rate <= mib * 256 / 2, "{case}");
            }
            let class = match case.fault {
                FaultPlan::None => "none".to_string(),
                FaultPlan::Kill { victim, trigger } => {
                    if let Victim::SourceDevice(i) | Victim::DestinationDevice(i) = victim {
                        assert!(i < case.devices.len());
                    }
                    check_record(&case, trigger.direction, trigger.kind, trigger.nth);
                    format!(
                        "kill {}",
                        victim.process().trim_end_matches(char::is_numeric)
                    )
                }
                FaultPlan::Cancel { trigger } => {
                    check_record(&case, trigger.direction, trigger.kind, trigger.nth);
                    "cancel".into()
                }
                FaultPlan::Stream {
                    fault:
                        Fault::At {
                            action,
                            kind,
                            nth,
                            direction,
                        },
                    ..
                } => {
                    check_record(&case, direction, kind, nth);
                    match case.fault {
                        FaultPlan::Stream {
                            then: StallEnd::Cancel,
                            ..
                        } => {
                            assert_eq!(action, FaultAction::Stall, "{case}");
                            assert!(!matches!(kind, Kind::Commit | Kind::Resumed | Kind::Result));
                            "stall, then cancel".to_string()
                        }
                        _ => action.spec().to_string(),
                    }
                }
                FaultPlan::Stream { .. } => panic!("a stream fault without a record: {case}"),
                FaultPlan::Refusal(_) => "refusal".into(),
            };
            classes.insert(class);
        }
        let expected = [
            "cancel",
            "corrupt",
            "cut-after",
            "cut-before",
            "kill destination",
            "kill destination-device-",
            "kill source",
            "kill source-device-",
            "none",
            "refusal",
            "stall",
            "stall, then cancel",
        ];
        assert_eq!(classes.into_iter().collect::<Vec<_>>(), expected);
    }

    /// The record is one this case's migration sends, in the direction it travels.
    fn check_record(case: &Case, direction: Direction, kind: Kind, nth: u64) {
        assert_eq!(Direction::of(kind), Some(direction), "{case}");
        let (_, count) = records(case.ram_mib, case.devices.len(), case.channels)
            .into_iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or_else(|| panic!("{kind:?} in {case}"));
        assert!((1..=count).contains(&nth), "{case}");
    }

    #[test]
    fn splitmix_matches_its_reference_sequence() {
        // The first outputs for state 0, from the algorithm's reference implementation.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    }
}
