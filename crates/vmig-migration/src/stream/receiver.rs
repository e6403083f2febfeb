//! The receiver's state table: which record may come in which state, and the state it leads to
//! (the diagram is on [`Record`](super::Record)).

use super::Kind;
use crate::error::{MigrationError, Result};

/// Where the destination is in a migration, as far as the records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// A connection is open; its hello comes first.
    AwaitingHello,
    /// Every connection said hello; the source's configuration comes next.
    AwaitingConfig,
    /// The VM is built and `Ready` answered: pre-copy passes and the final pass.
    Transferring,
    /// The final device states arrive, each closed by its `DeviceEnd`.
    DeviceStates,
    /// The vCPU state arrived; page digests may follow, then `Complete`.
    AwaitingComplete,
    /// Everything is loaded and `Accepted` answered; the commit comes next.
    AwaitingCommit,
    /// The source committed: nothing more comes (the destination answers `Resumed`, `Result`).
    Committed,
    /// A page connection (channel above 0): only pages and pass ends.
    PageConnection,
    /// The source aborted: nothing more comes.
    Aborted,
}

impl State {
    /// Every state.
    pub const ALL: [State; 9] = [
        State::AwaitingHello,
        State::AwaitingConfig,
        State::Transferring,
        State::DeviceStates,
        State::AwaitingComplete,
        State::AwaitingCommit,
        State::Committed,
        State::PageConnection,
        State::Aborted,
    ];
}

use Kind as K;
use State as S;

/// The transitions: in state `.0` a record of kind `.1` leads to state `.2`. Every pair not
/// listed is refused. An `Abort` is taken in every state but the terminal ones and
/// `AwaitingHello` (where no record comes), and leads to `Aborted`.
const TRANSITIONS: &[(State, Kind, State)] = &[
    (S::AwaitingConfig, K::Config, S::Transferring),
    (S::Transferring, K::Pages, S::Transferring),
    (S::Transferring, K::PassEnd, S::Transferring),
    (S::Transferring, K::DeviceData, S::Transferring),
    (S::Transferring, K::InitialSent, S::Transferring),
    (S::Transferring, K::DeviceEnd, S::DeviceStates),
    (S::Transferring, K::VcpuState, S::AwaitingComplete),
    (S::DeviceStates, K::DeviceData, S::DeviceStates),
    (S::DeviceStates, K::DeviceEnd, S::DeviceStates),
    (S::DeviceStates, K::VcpuState, S::AwaitingComplete),
    (S::AwaitingComplete, K::Digests, S::AwaitingComplete),
    (S::AwaitingComplete, K::Complete, S::AwaitingCommit),
    (S::AwaitingCommit, K::Commit, S::Committed),
    (S::PageConnection, K::Pages, S::PageConnection),
    (S::PageConnection, K::PassEnd, S::PageConnection),
    (S::AwaitingConfig, K::Abort, S::Aborted),
    (S::Transferring, K::Abort, S::Aborted),
    (S::DeviceStates, K::Abort, S::Aborted),
    (S::AwaitingComplete, K::Abort, S::Aborted),
    (S::AwaitingCommit, K::Abort, S::Aborted),
    (S::PageConnection, K::Abort, S::Aborted),
];

/// What may come in `state`, as errors say it ("Pages, PassEnd or Abort").
fn expected(state: State) -> String {
    if state == State::AwaitingHello {
        return "Hello".into();
    }
    let kinds: Vec<&str> = TRANSITIONS
        .iter()
        .filter(|(from, _, _)| *from == state)
        .map(|(_, kind, _)| kind.name())
        .collect();
    match kinds.as_slice() {
        [] => "nothing more".into(),
        [one] => (*one).into(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// "a" or "an", before `word`.
pub(super) fn article(word: &str) -> &'static str {
    if word.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}

/// The refusal of a record named `record` in `state`.
pub(super) fn refusal(state: State, record: &str) -> String {
    format!(
        "{} {record} record cannot come in state {state:?}; expected {}",
        article(record),
        expected(state)
    )
}

/// The receiving side of one connection: its state, moved by the table.
#[derive(Debug)]
pub struct Receiver {
    state: State,
    what: String,
}

impl Receiver {
    /// A receiver in `state`; `what` names the connection in errors.
    pub fn new(state: State, what: impl Into<String>) -> Self {
        Self {
            state,
            what: what.into(),
        }
    }

    /// The state it is in.
    pub fn state(&self) -> State {
        self.state
    }

    /// The state a record of `kind` leads to from `state`, or `None` if it cannot come there.
    pub fn next(state: State, kind: Kind) -> Option<State> {
        TRANSITIONS
            .iter()
            .find(|(from, k, _)| *from == state && *k == kind)
            .map(|(_, _, to)| *to)
    }

    /// The connection's hello was read: the records begin.
    pub fn hello(&mut self) -> Result<()> {
        if self.state != State::AwaitingHello {
            return Err(MigrationError::Stream(format!(
                "{}: a hello in state {:?}; expected {}",
                self.what,
                self.state,
                expected(self.state)
            )));
        }
        self.state = State::AwaitingConfig;
        Ok(())
    }

    /// Takes a record of `kind`: moves to the state the table gives, or refuses the record
    /// naming it and the state.
    pub fn step(&mut self, kind: Kind) -> Result<State> {
        let Some(next) = Self::next(self.state, kind) else {
            return Err(MigrationError::Stream(format!(
                "{}: {}",
                self.what,
                refusal(self.state, kind.name())
            )));
        };
        tracing::trace!(connection = %self.what, ?kind, from = ?self.state, to = ?next, "record");
        self.state = next;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use zerocopy::little_endian::U64;

    use super::*;
    use crate::stream::record::tests::{one_of_each, page};
    use crate::stream::{Hello, PageEntry, RecordReader, RecordWriter};
    use vmig_primitives::PageNumber;

    /// The records a source sends, in its order, are taken: with devices and without, with
    /// page digests and without, each connection ending where it should.
    #[test]
    fn a_sources_records_are_taken_in_its_order() {
        use Kind::*;
        let with_devices = [
            Config, Pages, PassEnd, DeviceData, Pages, PassEnd, DeviceData, DeviceData, DeviceEnd,
            DeviceData, DeviceEnd, VcpuState, Digests, Digests, Complete, Commit,
        ];
        let without = [Config, Pages, PassEnd, PassEnd, VcpuState, Complete, Commit];
        for records in [&with_devices[..], &without[..]] {
            let mut r = Receiver::new(State::AwaitingHello, "t");
            r.hello().unwrap();
            for kind in records {
                r.step(*kind).unwrap();
            }
            assert_eq!(r.state(), State::Committed);
        }
        let mut pages = Receiver::new(State::PageConnection, "t");
        for kind in [Pages, PassEnd, Pages, PassEnd, Abort] {
            pages.step(kind).unwrap();
        }
        assert_eq!(pages.state(), State::Aborted);
    }

    /// Every record kind, sent in every state where it does not belong, is refused with an
    /// error naming the record and the state and saying what the state expects.
    #[test]
    fn every_record_out_of_its_states_is_refused_naming_record_and_state() {
        let data = page();
        let entries = [PageEntry::new(PageNumber(1), false)];
        let digests = [U64::new(1)];
        let mut refused = 0;
        for state in State::ALL {
            for record in one_of_each(&data, &entries, &digests, &digests) {
                let kind = record.kind();
                if Receiver::next(state, kind).is_some() {
                    continue;
                }
                let mut w = RecordWriter::new(Vec::new());
                w.send(&record).unwrap();
                // A second record, so that a hello's 32 bytes can be read in AwaitingHello.
                w.send(&record).unwrap();
                let bytes = w.get_ref().clone();
                let expected = format!(
                    "{} {kind:?} record cannot come in state {state:?}; expected",
                    article(kind.name())
                );
                let err = if state == State::AwaitingHello {
                    Hello::read(&mut &bytes[..]).unwrap_err()
                } else {
                    let mut reader = RecordReader::new(&bytes[..], "t");
                    let mut buf = Vec::new();
                    let got = reader.read_into(&mut buf).unwrap();
                    Receiver::new(state, "t").step(got).unwrap_err()
                };
                let err = err.to_string();
                assert!(err.contains(&expected), "{state:?} {kind:?}: {err}");
                refused += 1;
            }
        }
        // 9 states × 16 kinds, less the transitions.
        assert_eq!(refused, 9 * Kind::ALL.len() - TRANSITIONS.len());
    }

    #[test]
    fn refusals_say_what_the_state_expects() {
        let cases = [
            (
                State::AwaitingHello,
                Kind::Pages,
                "a Pages record cannot come in state AwaitingHello; expected Hello",
            ),
            (
                State::AwaitingConfig,
                Kind::Pages,
                "a Pages record cannot come in state AwaitingConfig; expected Config or Abort",
            ),
            (
                State::Transferring,
                Kind::Complete,
                "a Complete record cannot come in state Transferring; expected Pages, PassEnd, DeviceData, InitialSent, DeviceEnd, VcpuState or Abort",
            ),
            (
                State::PageConnection,
                Kind::Config,
                "a Config record cannot come in state PageConnection; expected Pages, PassEnd or Abort",
            ),
            (
                State::Committed,
                Kind::Abort,
                "an Abort record cannot come in state Committed; expected nothing more",
            ),
        ];
        for (state, kind, message) in cases {
            assert_eq!(refusal(state, kind.name()), message);
        }
        let err = Receiver::new(State::AwaitingConfig, "main")
            .step(Kind::Ready)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration stream: main: a Ready record cannot come in state AwaitingConfig; expected Config or Abort"
        );
        let mut r = Receiver::new(State::Transferring, "main");
        assert!(
            r.hello()
                .unwrap_err()
                .to_string()
                .contains("a hello in state Transferring")
        );
    }
}
