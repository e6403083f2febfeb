//! The workload a guest runs: how it picks pages ([`WorkloadKind`]), its rate, working set and
//! hot set ([`Workload`]), parsed from the `--workload` spec, and sizes such as `512M`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{KvmError, Result};

/// How the guest picks the next page to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadKind {
    /// Page after page, wrapping at the end of the range.
    Sequential,
    /// Uniformly random pages (xorshift64*, seeded per vCPU).
    Random,
    /// `hot_percent` of the writes to the first `hot` bytes of the range, the rest anywhere.
    HotCold,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::HotCold => "hotcold",
        })
    }
}

/// What the guest does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Page choice.
    pub kind: WorkloadKind,
    /// Pages per second for the whole VM; `None` writes as fast as the vCPUs can.
    pub rate: Option<u64>,
    /// Working-set size in bytes; `None` uses all data RAM.
    pub wss: Option<u64>,
    /// Hot-set size in bytes (`hotcold`); `None` is a sixteenth of the working set.
    pub hot: Option<u64>,
    /// Percentage of `hotcold` writes that go to the hot set.
    pub hot_percent: u8,
    /// All vCPUs write anywhere in the working set (instead of each in its own slice).
    pub shared: bool,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            kind: WorkloadKind::Random,
            rate: None,
            wss: None,
            hot: None,
            hot_percent: 90,
            shared: false,
            seed: 1,
        }
    }
}

impl FromStr for Workload {
    type Err = KvmError;

    /// `KIND[,rate=PAGES_PER_S][,wss=SIZE][,hot=SIZE][,hot-percent=N][,shared][,seed=N]`.
    fn from_str(spec: &str) -> Result<Self> {
        let mut parts = spec.split(',');
        let kind = match parts.next().unwrap_or("") {
            "sequential" => WorkloadKind::Sequential,
            "random" => WorkloadKind::Random,
            "hotcold" => WorkloadKind::HotCold,
            other => {
                return Err(KvmError::Invalid(format!(
                    "unknown workload `{other}`: expected sequential, random or hotcold"
                )));
            }
        };
        let mut workload = Workload {
            kind,
            ..Workload::default()
        };
        for part in parts {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let number = |what: &str| {
                value.parse::<u64>().map_err(|_| {
                    KvmError::Invalid(format!("workload option {key}=`{value}`: expected {what}"))
                })
            };
            match key {
                "rate" => {
                    let rate = number("pages per second (0 = unlimited)")?;
                    workload.rate = (rate != 0).then_some(rate);
                }
                "wss" => workload.wss = Some(parse_size(value)?),
                "hot" => workload.hot = Some(parse_size(value)?),
                "hot-percent" => {
                    let p = number("a percentage from 1 to 99")?;
                    workload.hot_percent = u8::try_from(p).map_err(|_| hot_percent_error(p))?;
                    workload.check_hot_percent()?;
                }
                "shared" if value.is_empty() => workload.shared = true,
                "seed" => workload.seed = number("a number")?,
                _ => {
                    return Err(KvmError::Invalid(format!(
                        "unknown workload option `{part}`: expected rate=N, wss=SIZE, hot=SIZE, hot-percent=N, shared or seed=N"
                    )));
                }
            }
        }
        workload.check()?;
        Ok(workload)
    }
}

impl Workload {
    /// Refuses what the `--workload` spec would refuse: the same rules hold for a workload
    /// that arrives in a migration stream.
    pub fn check(&self) -> Result<()> {
        self.check_hot_percent()?;
        if self.hot == Some(0) {
            return Err(KvmError::Invalid(
                "workload hot set of 0 bytes: expected at least one page (4096 bytes)".into(),
            ));
        }
        Ok(())
    }

    fn check_hot_percent(&self) -> Result<()> {
        if (1..=99).contains(&self.hot_percent) {
            Ok(())
        } else {
            Err(hot_percent_error(u64::from(self.hot_percent)))
        }
    }
}

fn hot_percent_error(percent: u64) -> KvmError {
    KvmError::Invalid(format!(
        "workload option hot-percent={percent}: expected a percentage from 1 to 99"
    ))
}

/// Parses a size such as `4096`, `64K`, `512M`, `512MiB`, `2G`, `1T`.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        KvmError::Invalid(format!(
            "size `{text}`: expected a number with an optional K, M, G or T suffix (powers of 1024), e.g. 512M"
        ))
    };
    let trimmed = text.trim();
    let digits = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &trimmed[digits.len()..];
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_specs_parse_and_bad_ones_say_what_is_expected() {
        let w: Workload = "hotcold,rate=1000,wss=64M,hot=4M,shared,seed=9"
            .parse()
            .unwrap();
        assert_eq!(w.kind, WorkloadKind::HotCold);
        assert_eq!(w.rate, Some(1000));
        assert_eq!(w.wss, Some(64 << 20));
        assert_eq!(w.hot, Some(4 << 20));
        assert!(w.shared);
        assert_eq!(w.seed, 9);
        assert_eq!("random,rate=0".parse::<Workload>().unwrap().rate, None);
        for (spec, expected) in [
            ("zigzag", "expected sequential, random or hotcold"),
            ("random,rate=fast", "expected pages per second"),
            (
                "random,wss=12Q",
                "expected a number with an optional K, M, G or T",
            ),
            ("random,colour=red", "unknown workload option"),
            ("hotcold,hot-percent=100", "from 1 to 99"),
        ] {
            let err = spec.parse::<Workload>().unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64g").unwrap(), 64 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
