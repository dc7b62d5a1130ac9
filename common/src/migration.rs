//! The migration state machine of DESIGN §4, as a pure transition function.
//!
//! ```text
//!   New → Preflighted → SlotCreated → BaseBackupDone → StandbyStarted → CatchingUp → Ready
//!       → Fenced{lsn} → Drained → Verified → Promoted → Completed
//!                                              │
//!        (any failure before Promoted) → RollingBack → RolledBack   (source unfenced, writable)
//! ```
//!
//! [`State::next`] takes the current state and what just happened ([`Event`]) and returns the
//! next state, or a [`TransitionError`] when the event makes no sense there. It performs no I/O:
//! the executor (in the target agent) persists the state it returns *before* performing the
//! next step's side effects, so a run killed at any point resumes from the last persisted state.
//!
//! **Point of no return: `Promoted`.** Before it, every failure leads to `RollingBack` (unfence
//! the source, drop or keep the slot). From `Promoted` on, a failure does not roll back — the
//! target is already writable and the source fenced — it keeps the state, and the executor
//! retries the remaining steps until they complete.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A WAL position (`pg_lsn`), written `X/Y` in hex as PostgreSQL does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error parsing an [`Lsn`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers like 0/3000060")]
pub struct LsnError(String);

impl FromStr for Lsn {
    type Err = LsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the cutover fenced: the source's position at the fence and when (ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub lsn: Lsn,
    /// When the fence began (the write downtime starts here).
    pub at_ms: u64,
    /// `--fence stop`: shut the source cluster down once the target is writable.
    #[serde(default)]
    pub stop_source: bool,
}

/// Where the migration is. Each variant carries what later steps need, so a resumed run has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub enum State {
    New,
    Preflighted,
    SlotCreated {
        slot: String,
    },
    BaseBackupDone {
        slot: String,
    },
    StandbyStarted {
        slot: String,
    },
    CatchingUp {
        slot: String,
    },
    /// Lag is below the cutover threshold.
    Ready {
        slot: String,
    },
    Fenced {
        slot: String,
        fence: Fence,
    },
    /// The target has replayed the fence LSN.
    Drained {
        slot: String,
        fence: Fence,
    },
    Verified {
        slot: String,
        fence: Fence,
        tables: u32,
    },
    /// Point of no return: the target is promoted.
    Promoted {
        slot: String,
        fence: Fence,
        tables: u32,
    },
    Completed {
        fence: Fence,
        tables: u32,
        writable_at_ms: u64,
    },
    /// Undoing a migration that failed (or was cancelled) before promotion.
    RollingBack {
        /// Phase the failure happened in.
        from: String,
        reason: String,
        /// Slot to drop (or keep), if one was created.
        slot: Option<String>,
        /// Whether the source was fenced and must be unfenced.
        fenced: bool,
    },
    RolledBack {
        from: String,
        reason: String,
    },
}

/// What happened: the result of the executor's last step, or an operator's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PreflightPassed,
    SlotCreated {
        slot: String,
    },
    BaseBackupVerified,
    StandbyStarted,
    CatchUpStarted,
    /// Lag measured at or under the threshold.
    CaughtUp,
    Fenced {
        fence: Fence,
    },
    /// The target replayed up to `lsn`.
    Replayed {
        lsn: Lsn,
    },
    TablesVerified {
        tables: u32,
    },
    Promoted,
    /// The target accepted a write at this time (ms since the epoch).
    Writable {
        at_ms: u64,
    },
    /// A step failed.
    Failed {
        reason: String,
    },
    /// The operator asked to roll back (`pgferry-target rollback`).
    RollbackRequested,
    /// Rollback finished: source unfenced, slot handled.
    RollbackDone,
}

/// An event that cannot happen in a state: the executor has a bug or the state file was edited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} is not valid in phase {phase}{hint}")]
pub struct TransitionError {
    pub phase: String,
    pub event: String,
    pub hint: String,
}

impl State {
    /// The phase name (`catching_up`, …) as persisted and shown to the operator.
    pub fn phase(&self) -> &'static str {
        match self {
            State::New => "new",
            State::Preflighted => "preflighted",
            State::SlotCreated { .. } => "slot_created",
            State::BaseBackupDone { .. } => "base_backup_done",
            State::StandbyStarted { .. } => "standby_started",
            State::CatchingUp { .. } => "catching_up",
            State::Ready { .. } => "ready",
            State::Fenced { .. } => "fenced",
            State::Drained { .. } => "drained",
            State::Verified { .. } => "verified",
            State::Promoted { .. } => "promoted",
            State::Completed { .. } => "completed",
            State::RollingBack { .. } => "rolling_back",
            State::RolledBack { .. } => "rolled_back",
        }
    }

    /// Whether a failure here still rolls back (everything before `Promoted`).
    pub fn can_roll_back(&self) -> bool {
        !matches!(
            self,
            State::Promoted { .. }
                | State::Completed { .. }
                | State::RollingBack { .. }
                | State::RolledBack { .. }
        )
    }

    /// Whether the migration is over (successfully or rolled back).
    pub fn is_final(&self) -> bool {
        matches!(self, State::Completed { .. } | State::RolledBack { .. })
    }

    fn slot(&self) -> Option<&str> {
        match self {
            State::SlotCreated { slot }
            | State::BaseBackupDone { slot }
            | State::StandbyStarted { slot }
            | State::CatchingUp { slot }
            | State::Ready { slot }
            | State::Fenced { slot, .. }
            | State::Drained { slot, .. }
            | State::Verified { slot, .. }
            | State::Promoted { slot, .. } => Some(slot),
            _ => None,
        }
    }

    fn fenced(&self) -> bool {
        matches!(
            self,
            State::Fenced { .. } | State::Drained { .. } | State::Verified { .. }
        )
    }

    /// The transition function. Pure: no I/O, no clock.
    pub fn next(self, event: Event) -> Result<State, TransitionError> {
        use Event as E;
        use State as S;
        let invalid = |state: &S, event: &E, hint: &str| TransitionError {
            phase: state.phase().to_string(),
            event: event_name(event).to_string(),
            hint: hint.to_string(),
        };
        // Failures and rollback requests: before the point of no return they roll back.
        match (&self, &event) {
            (s, E::Failed { reason }) if s.can_roll_back() => {
                return Ok(S::RollingBack {
                    from: s.phase().to_string(),
                    reason: reason.clone(),
                    slot: s.slot().map(str::to_string),
                    fenced: s.fenced(),
                })
            }
            (s, E::RollbackRequested) if s.can_roll_back() => {
                return Ok(S::RollingBack {
                    from: s.phase().to_string(),
                    reason: "rollback requested by the operator".into(),
                    slot: s.slot().map(str::to_string),
                    fenced: s.fenced(),
                })
            }
            (S::Promoted { .. } | S::Completed { .. }, E::RollbackRequested) => {
                return Err(invalid(
                    &self,
                    &event,
                    ": the target is promoted (point of no return); rolling back is no longer possible",
                ))
            }
            // After promotion a failed step is retried: the state stays.
            (S::Promoted { .. }, E::Failed { .. }) => return Ok(self),
            // A failing rollback is retried too.
            (S::RollingBack { .. }, E::Failed { .. }) => return Ok(self),
            _ => {}
        }
        Ok(match (self, event) {
            (S::New, E::PreflightPassed) => S::Preflighted,
            (S::Preflighted, E::SlotCreated { slot }) => S::SlotCreated { slot },
            (S::SlotCreated { slot }, E::BaseBackupVerified) => S::BaseBackupDone { slot },
            (S::BaseBackupDone { slot }, E::StandbyStarted) => S::StandbyStarted { slot },
            (S::StandbyStarted { slot }, E::CatchUpStarted) => S::CatchingUp { slot },
            (S::CatchingUp { slot }, E::CaughtUp) => S::Ready { slot },
            // Lag can grow again before the cutover starts.
            (S::Ready { slot }, E::CatchUpStarted) => S::CatchingUp { slot },
            (S::Ready { slot }, E::Fenced { fence }) => S::Fenced { slot, fence },
            (S::Fenced { slot, fence }, E::Replayed { lsn }) => {
                if lsn >= fence.lsn {
                    S::Drained { slot, fence }
                } else {
                    S::Fenced { slot, fence }
                }
            }
            (S::Drained { slot, fence }, E::TablesVerified { tables }) => S::Verified {
                slot,
                fence,
                tables,
            },
            (
                S::Verified {
                    slot,
                    fence,
                    tables,
                },
                E::Promoted,
            ) => S::Promoted {
                slot,
                fence,
                tables,
            },
            (S::Promoted { fence, tables, .. }, E::Writable { at_ms }) => S::Completed {
                fence,
                tables,
                writable_at_ms: at_ms,
            },
            (S::RollingBack { from, reason, .. }, E::RollbackDone) => {
                S::RolledBack { from, reason }
            }
            (state, event) => {
                let hint = if state.is_final() {
                    ": the migration is over"
                } else {
                    ""
                };
                return Err(invalid(&state, &event, hint));
            }
        })
    }

    /// Write downtime of a completed migration: from the fence to the first accepted write.
    pub fn downtime_ms(&self) -> Option<u64> {
        match self {
            State::Completed {
                fence,
                writable_at_ms,
                ..
            } => Some(writable_at_ms.saturating_sub(fence.at_ms)),
            _ => None,
        }
    }
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::PreflightPassed => "preflight_passed",
        Event::SlotCreated { .. } => "slot_created",
        Event::BaseBackupVerified => "base_backup_verified",
        Event::StandbyStarted => "standby_started",
        Event::CatchUpStarted => "catch_up_started",
        Event::CaughtUp => "caught_up",
        Event::Fenced { .. } => "fenced",
        Event::Replayed { .. } => "replayed",
        Event::TablesVerified { .. } => "tables_verified",
        Event::Promoted => "promoted",
        Event::Writable { .. } => "writable",
        Event::Failed { .. } => "failed",
        Event::RollbackRequested => "rollback_requested",
        Event::RollbackDone => "rollback_done",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fence(lsn: u64) -> Fence {
        Fence {
            lsn: Lsn(lsn),
            at_ms: 1_000,
            stop_source: false,
        }
    }

    fn happy_path() -> Vec<Event> {
        vec![
            Event::PreflightPassed,
            Event::SlotCreated {
                slot: "pgferry_m1".into(),
            },
            Event::BaseBackupVerified,
            Event::StandbyStarted,
            Event::CatchUpStarted,
            Event::CaughtUp,
            Event::Fenced { fence: fence(500) },
            Event::Replayed { lsn: Lsn(400) },
            Event::Replayed { lsn: Lsn(500) },
            Event::TablesVerified { tables: 3 },
            Event::Promoted,
            Event::Writable { at_ms: 3_500 },
        ]
    }

    #[test]
    fn happy_path_completes_and_measures_downtime() {
        let mut s = State::New;
        let mut phases = vec![];
        for e in happy_path() {
            s = s.next(e).unwrap();
            phases.push(s.phase());
        }
        assert_eq!(
            phases,
            [
                "preflighted",
                "slot_created",
                "base_backup_done",
                "standby_started",
                "catching_up",
                "ready",
                "fenced",
                "fenced",
                "drained",
                "verified",
                "promoted",
                "completed"
            ]
        );
        assert_eq!(s.downtime_ms(), Some(2_500));
        assert!(s.is_final());
    }

    #[test]
    fn failure_before_promotion_rolls_back_with_what_to_undo() {
        let mut s = State::New;
        for e in happy_path().into_iter().take(8) {
            s = s.next(e).unwrap();
        }
        assert_eq!(s.phase(), "fenced");
        let s = s
            .next(Event::Failed {
                reason: "target stopped".into(),
            })
            .unwrap();
        assert_eq!(
            s,
            State::RollingBack {
                from: "fenced".into(),
                reason: "target stopped".into(),
                slot: Some("pgferry_m1".into()),
                fenced: true,
            }
        );
        // A failing rollback step is retried, then it completes.
        let s = s.next(Event::Failed { reason: "x".into() }).unwrap();
        let s = s.next(Event::RollbackDone).unwrap();
        assert_eq!(s.phase(), "rolled_back");
        assert!(s.is_final());
    }

    #[test]
    fn after_promotion_failures_do_not_roll_back() {
        let mut s = State::New;
        for e in happy_path().into_iter().take(11) {
            s = s.next(e).unwrap();
        }
        assert_eq!(s.phase(), "promoted");
        assert!(!s.can_roll_back());
        let same = s
            .clone()
            .next(Event::Failed {
                reason: "hook failed".into(),
            })
            .unwrap();
        assert_eq!(same, s);
        let err = s.next(Event::RollbackRequested).unwrap_err();
        assert!(err.to_string().contains("point of no return"), "{err}");
    }

    #[test]
    fn out_of_order_events_are_refused() {
        let err = State::New.next(Event::Promoted).unwrap_err();
        assert_eq!(err.phase, "new");
        assert_eq!(err.event, "promoted");
        let done = State::RolledBack {
            from: "new".into(),
            reason: "r".into(),
        };
        assert!(done
            .next(Event::PreflightPassed)
            .unwrap_err()
            .to_string()
            .contains("over"));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = State::New;
        for e in happy_path() {
            s = s.next(e).unwrap();
            let text = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s, "{text}");
        }
        let text = serde_json::to_string(&State::Fenced {
            slot: "s".into(),
            fence: fence(0x1_0000_0060),
        })
        .unwrap();
        assert!(text.contains("\"1/60\""), "{text}");
    }

    #[test]
    fn lsn_parses_and_prints_like_postgres() {
        for s in ["0/0", "0/3000060", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert!("0/3000060".parse::<Lsn>().unwrap() < "1/0".parse().unwrap());
        for bad in ["", "0", "/1", "1/", "x/1", "1/2/3", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::PreflightPassed),
            Just(Event::SlotCreated { slot: "s".into() }),
            Just(Event::BaseBackupVerified),
            Just(Event::StandbyStarted),
            Just(Event::CatchUpStarted),
            Just(Event::CaughtUp),
            (0u64..1000).prop_map(|l| Event::Fenced { fence: fence(l) }),
            (0u64..1000).prop_map(|l| Event::Replayed { lsn: Lsn(l) }),
            Just(Event::TablesVerified { tables: 1 }),
            Just(Event::Promoted),
            Just(Event::Writable { at_ms: 2_000 }),
            Just(Event::Failed { reason: "f".into() }),
            Just(Event::RollbackRequested),
            Just(Event::RollbackDone),
        ]
    }

    proptest! {
        /// Whatever happens: once promoted, never rolled back; rolled back only from before
        /// promotion; drained only when the replayed LSN reached the fence; errors leave the
        /// state unchanged (the executor keeps the persisted one).
        #[test]
        fn invariants_hold_for_any_event_sequence(events in prop::collection::vec(any_event(), 0..60)) {
            let mut s = State::New;
            let mut promoted = false;
            for e in events {
                let before = s.clone();
                match s.clone().next(e.clone()) {
                    Ok(n) => s = n,
                    Err(_) => { prop_assert_eq!(&s, &before); continue; }
                }
                if let (State::Fenced { fence, .. }, Event::Replayed { lsn }) = (&before, &e) {
                    prop_assert_eq!(s.phase() == "drained", *lsn >= fence.lsn);
                }
                if matches!(s, State::Promoted { .. }) { promoted = true; }
                if promoted {
                    prop_assert!(matches!(s, State::Promoted { .. } | State::Completed { .. }), "{:?}", s);
                }
            }
        }
    }
}
