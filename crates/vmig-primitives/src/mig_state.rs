//! The v2 device migration state machine (`enum vfio_device_mig_state`), shared by vfio-user and
//! the kernel's VFIO: the direct arcs a device implements, and the walk a requested state takes
//! through them, as a next-state table.
//!
//! ```text
//!            ┌──────────── RUNNING ◄──────────┐
//!            │  ▲             │               │
//!            ▼  │             ▼               │
//!   RESUMING ◄── STOP ──► STOP_COPY        PRE_COPY ──► STOP_COPY
//!        └───────►▲ ◄─────────┘
//! ```
//!
//! Direct arcs (vfio-user-spec.rst, "Direct State Transitions"): RUNNING→STOP, STOP_COPY→STOP,
//! RESUMING→STOP, PRE_COPY→RUNNING, STOP→RUNNING, RUNNING→PRE_COPY, STOP→STOP_COPY,
//! PRE_COPY→STOP_COPY, STOP→RESUMING. Any other request is "the shortest path" whose interior
//! states are not in the saving group (PRE_COPY, STOP_COPY); STOP_COPY→PRE_COPY is refused, as
//! are ERROR and the P2P states as targets. Without PRE_COPY support its arcs do not exist.

use std::fmt;

/// `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum MigState {
    /// The device failed; only a reset leaves this state.
    Error = 0,
    /// Stopped: no internal or external state changes.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, and its state can be read out.
    StopCopy = 3,
    /// Stopped, loading a new state.
    Resuming = 4,
    /// Not used in vfio-user.
    RunningP2p = 5,
    /// Running, and its state can be read out while it changes.
    PreCopy = 6,
    /// Not used in vfio-user.
    PreCopyP2p = 7,
}

impl MigState {
    /// The state for a wire value.
    pub fn from_u32(value: u32) -> Option<Self> {
        use MigState::*;
        Some(match value {
            0 => Error,
            1 => Stop,
            2 => Running,
            3 => StopCopy,
            4 => Resuming,
            5 => RunningP2p,
            6 => PreCopy,
            7 => PreCopyP2p,
            _ => return None,
        })
    }

    /// Whether the device's state can be read in this state.
    pub fn is_saving(self) -> bool {
        matches!(self, Self::PreCopy | Self::StopCopy)
    }

    /// Whether the device runs (and may do DMA) in this state.
    pub fn is_running(self) -> bool {
        matches!(self, Self::Running | Self::PreCopy)
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Error => "ERROR",
            Self::Stop => "STOP",
            Self::Running => "RUNNING",
            Self::StopCopy => "STOP_COPY",
            Self::Resuming => "RESUMING",
            Self::RunningP2p => "RUNNING_P2P",
            Self::PreCopy => "PRE_COPY",
            Self::PreCopyP2p => "PRE_COPY_P2P",
        })
    }
}

/// `NEXT_STATE[from][to]`: the first direct arc a device in `from` takes towards `to`, for a
/// device with PRE_COPY and without the P2P states; [`MigState::Error`] where no walk exists.
/// Rows and columns are the uAPI values (0..=7). It is the kernel's `vfio_mig_get_next_state`
/// table with the P2P states removed, and libvfio-user's `next_state` in `lib/migration.c`:
/// every walk follows the direct arcs of vfio-user-spec.rst ("Direct State Transitions") and no
/// saving state (PRE_COPY, STOP_COPY) lies inside one.
pub const NEXT_STATE: [[MigState; 8]; 8] = {
    use MigState::{
        Error as E, PreCopy as P, Resuming as R, Running as G, Stop as S, StopCopy as C,
    };
    [
        //  to: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P
        /* ERROR */
        [E, E, E, E, E, E, E, E],
        /* STOP */ [E, S, G, C, R, E, G, E],
        /* RUNNING */ [E, S, G, S, S, E, P, E],
        /* STOP_COPY */ [E, S, S, C, S, E, E, E],
        /* RESUMING */ [E, S, S, S, R, E, S, E],
        /* RUNNING_P2P */ [E, E, E, E, E, E, E, E],
        /* PRE_COPY */ [E, G, G, C, G, E, P, E],
        /* PRE_COPY_P2P */ [E, E, E, E, E, E, E, E],
    ]
};

/// A state change the machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArcError(pub String);

/// The arcs, in order, that take a device from `from` to `to` (empty when they are equal):
/// [`NEXT_STATE`] followed one hop at a time. Without PRE_COPY support its arcs do not exist, and
/// since no walk passes through PRE_COPY, that only removes it as an end.
pub fn path(from: MigState, to: MigState, pre_copy: bool) -> Result<Vec<MigState>, ArcError> {
    let usable = |s: MigState| {
        matches!(
            s,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming
        ) || (pre_copy && s == MigState::PreCopy)
    };
    if from == MigState::Error {
        return Err(ArcError(
            "the device is in ERROR: reset it (VFIO_USER_DEVICE_RESET) before any other state"
                .into(),
        ));
    }
    if !usable(to) {
        return Err(ArcError(format!(
            "{to} cannot be requested{}",
            match to {
                MigState::Error => ": a device only enters ERROR by failing",
                MigState::PreCopy => ": this device does not support PRE_COPY",
                _ => ": P2P states are not used in vfio-user",
            }
        )));
    }
    if !usable(from) {
        return Err(ArcError(format!(
            "the device is in {from}, which it cannot be in"
        )));
    }
    if from == MigState::StopCopy && to == MigState::PreCopy {
        return Err(ArcError("STOP_COPY -> PRE_COPY is not allowed".into()));
    }
    let mut walk = Vec::new();
    let mut at = from;
    while at != to {
        at = NEXT_STATE[at as usize][to as usize];
        // The table has no cycle and no walk longer than three arcs; this bound only keeps a
        // wrong table from looping.
        if at == MigState::Error || walk.len() == NEXT_STATE.len() {
            return Err(ArcError(format!("no path from {from} to {to}")));
        }
        walk.push(at);
    }
    Ok(walk)
}

#[cfg(test)]
mod tests {
    use super::MigState::*;
    use super::*;

    /// The direct arcs of vfio-user-spec.rst ("Direct State Transitions").
    const DIRECT_ARCS: [(MigState, MigState); 9] = [
        (Running, Stop),
        (StopCopy, Stop),
        (Resuming, Stop),
        (PreCopy, Running),
        (Stop, Running),
        (Running, PreCopy),
        (Stop, StopCopy),
        (PreCopy, StopCopy),
        (Stop, Resuming),
    ];

    /// Every walk for a device with PRE_COPY and without P2P, as the kernel's
    /// `vfio_mig_get_next_state` table (drivers/vfio/vfio_main.c) steps it, skipping the
    /// unsupported P2P states.
    #[test]
    fn walks_match_the_kernels_table() {
        let expected: [(MigState, MigState, &[MigState]); 20] = [
            (Stop, Running, &[Running]),
            (Stop, PreCopy, &[Running, PreCopy]),
            (Stop, StopCopy, &[StopCopy]),
            (Stop, Resuming, &[Resuming]),
            (Running, Stop, &[Stop]),
            (Running, PreCopy, &[PreCopy]),
            (Running, StopCopy, &[Stop, StopCopy]),
            (Running, Resuming, &[Stop, Resuming]),
            (PreCopy, Running, &[Running]),
            (PreCopy, Stop, &[Running, Stop]),
            (PreCopy, StopCopy, &[StopCopy]),
            (PreCopy, Resuming, &[Running, Stop, Resuming]),
            (StopCopy, Stop, &[Stop]),
            (StopCopy, Running, &[Stop, Running]),
            (StopCopy, Resuming, &[Stop, Resuming]),
            (Resuming, Stop, &[Stop]),
            (Resuming, Running, &[Stop, Running]),
            (Resuming, StopCopy, &[Stop, StopCopy]),
            (Resuming, PreCopy, &[Stop, Running, PreCopy]),
            (Running, Running, &[]),
        ];
        for (from, to, walk) in expected {
            assert_eq!(path(from, to, true).unwrap(), walk, "{from} -> {to}");
        }
    }

    #[test]
    fn forbidden_requests_are_refused_with_the_reason() {
        let refused = |from, to, pre_copy, expected: &str| {
            let err = path(from, to, pre_copy).unwrap_err().to_string();
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        };
        refused(
            StopCopy,
            PreCopy,
            true,
            "STOP_COPY -> PRE_COPY is not allowed",
        );
        refused(Running, Error, true, "only enters ERROR by failing");
        refused(Running, RunningP2p, true, "P2P states");
        refused(Stop, PreCopyP2p, true, "P2P states");
        refused(Error, Running, true, "reset it");
        refused(Running, PreCopy, false, "does not support PRE_COPY");
    }

    #[test]
    fn without_pre_copy_its_arcs_do_not_exist() {
        assert_eq!(path(Running, StopCopy, false).unwrap(), [Stop, StopCopy]);
        assert_eq!(path(Resuming, Running, false).unwrap(), [Stop, Running]);
    }

    #[test]
    fn every_walk_uses_direct_arcs_and_no_saving_state_inside() {
        let states = [Stop, Running, StopCopy, Resuming, PreCopy];
        for from in states {
            for to in states {
                let Ok(walk) = path(from, to, true) else {
                    continue;
                };
                let mut at = from;
                for (i, &next) in walk.iter().enumerate() {
                    assert!(DIRECT_ARCS.contains(&(at, next)), "{at} -> {next}");
                    if i + 1 < walk.len() {
                        assert!(!next.is_saving(), "{from} -> {to} passes through {next}");
                    }
                    at = next;
                }
                assert_eq!(at, to);
            }
        }
    }
}
