//! The admin protocol's typed reports (pure: serde types, no I/O). The target agent writes
//! them as JSON on its admin socket; the CLI, the audit log and the tests read the same shape.
//!
//! ```text
//!   pgferry-target cutover ─► admin socket ─► Executor::cutover ─► CutoverReport
//!                         ◄─ {"ok", "phase", "report": CutoverReport} ◄─┘ (and `cutover_report`
//!                                                                         in the audit log)
//! ```

use serde::{Deserialize, Serialize};

use crate::control::{FenceMode, FenceReport, SourceStatus, TableDigest};
use crate::migration::{Lsn, State};
use crate::preflight::{Check, SourceFacts, TargetFacts};

/// One request on the target agent's admin socket: a JSON line
/// `{"verb": "cutover", "options": {…}}`. The wire format of `pgferry-target <verb>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "verb",
    content = "options",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum AdminRequest {
    /// Check both clusters; change nothing.
    Preflight,
    /// Tunnel, migration phase and lag from both ends.
    Status,
    /// Slot, base backup, standby (or resume them).
    Clone,
    /// Fence, drain, verify, promote.
    Cutover(CutoverOptions),
    /// Undo a migration before promotion.
    Rollback(RollbackOptions),
}

impl AdminRequest {
    /// The verb as the CLI names it.
    pub fn verb(&self) -> &'static str {
        match self {
            AdminRequest::Preflight => "preflight",
            AdminRequest::Status => "status",
            AdminRequest::Clone => "clone",
            AdminRequest::Cutover(_) => "cutover",
            AdminRequest::Rollback(_) => "rollback",
        }
    }
}

/// What `rollback` was asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollbackOptions {
    /// Keep the replication slot on the source.
    pub keep_slot: bool,
}

/// One line the agent writes back: progress of a long verb, then exactly one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AdminLine {
    Progress {
        progress: String,
    },
    /// `{"ok": bool, …}`: the verb's own answer (a cutover's carries a [`CutoverReport`]).
    Answer(serde_json::Value),
}

/// Default `--prepass-wait-secs`: how long the pre-pass waits for transactions open when it
/// began.
pub const DEFAULT_PREPASS_WAIT_SECS: u64 = 300;

/// What the operator asked of the cutover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutoverOptions {
    /// Tables to verify (`schema.table`); `None`: every user table that fits the budget.
    pub tables: Option<Vec<String>>,
    /// Verify every user table however long it takes.
    pub all_tables: bool,
    /// The most seconds (estimated) of digests while fenced: the ranges changed since the
    /// pre-pass, or with `verify_at_fence` whole tables (the smallest first). The report names
    /// the tables left out, in capitals.
    pub verify_budget_secs: u64,
    /// No pre-pass: digest whole tables at the fence (the method before block ranges).
    pub verify_at_fence: bool,
    /// Longest wait for transactions open when the pre-pass began.
    pub prepass_wait_secs: u64,
    /// How the source is fenced.
    pub fence: FenceMode,
    /// Roll back when the standby has not replayed the fence LSN within this many seconds.
    pub replay_timeout_secs: u64,
    /// Refuse to start the cutover when the standby is further behind than this (bytes).
    pub max_lag: u64,
    /// Shell command run after the new cluster accepts writes.
    pub on_promoted: Option<String>,
    /// Check lag and list the tables, change nothing.
    pub dry_run: bool,
}

impl Default for CutoverOptions {
    fn default() -> Self {
        Self {
            tables: None,
            all_tables: false,
            verify_budget_secs: DEFAULT_VERIFY_BUDGET_SECS,
            verify_at_fence: false,
            prepass_wait_secs: DEFAULT_PREPASS_WAIT_SECS,
            fence: FenceMode::ReadOnly,
            replay_timeout_secs: DEFAULT_REPLAY_TIMEOUT_SECS,
            max_lag: DEFAULT_MAX_LAG,
            on_promoted: None,
            dry_run: false,
        }
    }
}

/// Default `--replay-timeout-secs`.
pub const DEFAULT_REPLAY_TIMEOUT_SECS: u64 = 120;
/// Default `--max-lag` (bytes).
pub const DEFAULT_MAX_LAG: u64 = 16 * 1024 * 1024;
/// Default `--verify-budget-secs`: the verification happens while writes are fenced, so it is
/// part of the write downtime.
pub const DEFAULT_VERIFY_BUDGET_SECS: u64 = 5;

/// What a cutover did, phase by phase: the answer of `cutover` and the `cutover_report` audit
/// record. Fields a run did not reach are left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CutoverReport {
    /// Milliseconds each step of the cutover took.
    #[serde(default)]
    pub phases: CutoverPhases,
    /// Bytes the standby was behind when the cutover began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes_at_start: Option<u64>,
    /// `--dry-run`: nothing was changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// Tables verified (or, before verification, planned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// Tables NOT verified (over the budget, or not verifiable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables_skipped: Option<Vec<String>>,
    /// The block-range pre-pass before the fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepass: Option<PrepassReport>,
    /// What the fence changed on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_rows: Option<u64>,
    /// The new cluster's digest of each verified table (block-range method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<Vec<TableDigest>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// Write downtime: from the start of the fence to the first write the new cluster took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_promoted_ok: Option<bool>,
    /// `--fence stop`: whether the source was shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_stopped: Option<bool>,
    /// The promoted cluster's connection string (host from `[target] listen_addresses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_primary: Option<String>,
    /// The PgBouncer paused before the fence and switched after promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler: Option<PoolerReport>,
    /// What still points at the old cluster: other slots, standbys, subscriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub still_on_source: Option<crate::control::Dependents>,
    /// Settings the new cluster runs with that differ from its configuration: a restart
    /// after promotion applies them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_needed: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// The migration phase when the cutover ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Every phase of the migration so far, with its step and duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<TimelineStep>>,
}

/// What switching changed, for the report and the audit log (passwords redacted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchedEntry {
    pub database: String,
    pub before: String,
    pub after: String,
}

/// What the pooler saw during a cutover (the report's `pooler`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolerReport {
    /// The PgBouncer databases paused and switched.
    pub databases: Vec<String>,
    /// How long PAUSE took (transactions in flight ending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// From PAUSE done to RESUME: how long PgBouncer held its clients' queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    /// The entries as rewritten (passwords redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switched: Vec<SwitchedEntry>,
    /// Whether the clients were resumed.
    #[serde(default)]
    pub resumed: bool,
}

/// Milliseconds per cutover step (the write downtime is fence + drain + verify + promote).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CutoverPhases {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepass_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_ms: Option<u64>,
}

/// How the tables were verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// `block_ranges` (pre-pass before the fence) or `whole_tables` (`--verify-at-fence`).
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_fence: Option<AtFenceReport>,
}

/// One phase of the migration in the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineStep {
    pub phase: String,
    /// What runs in this phase.
    pub step: String,
    /// When the phase began (ms since the Unix epoch).
    pub at_ms: u64,
    /// How long it lasted; `None` for the current phase.
    pub ms: Option<u64>,
}

/// What the verification pre-pass did, for the report and the audit log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrepassReport {
    pub tables: usize,
    pub ranges: u64,
    pub bytes: u64,
    pub ms: u64,
    /// Table bytes digested per second on both sides together (the speed the fence's
    /// estimate uses).
    pub bytes_per_sec: u64,
    pub rounds: u32,
    /// Ranges digested again by refresh rounds.
    pub refreshed_ranges: u64,
    /// Time spent waiting for transactions open at a round's start.
    pub waited_ms: u64,
    pub start_lsn: String,
    pub wal_records: u64,
}

/// What the verification at the fence did (the block-range method's remainder).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AtFenceReport {
    pub wal_records: u64,
    /// Ranges digested at the fence (touched since their round, or of rewritten tables).
    pub ranges: u64,
    pub bytes: u64,
    pub estimated_ms: u64,
    pub digest_ms: u64,
    /// Digested whole: created, rewritten or truncated since the pre-pass.
    pub tables_whole: Vec<String>,
    /// Dropped since the pre-pass.
    pub tables_dropped: Vec<String>,
}

/// A verb that failed (or could not start): `{"ok": false, "error": …}`, with the migration
/// phase when a job ran. Every verb's failure has this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminFailure {
    /// Always `false`.
    pub ok: bool,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl AdminFailure {
    /// A failure with its message.
    pub fn new(error: impl Into<String>) -> Self {
        AdminFailure {
            ok: false,
            error: error.into(),
            phase: None,
        }
    }
}

/// `preflight`'s answer: every check, and the facts they were made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreflightReport {
    /// Every check passed (warnings included).
    pub ok: bool,
    pub checks: Vec<Check>,
    pub source: SourceFacts,
    pub target: TargetFacts,
}

/// A part of `status` that may have failed on its own: its value, or `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Part<T> {
    Ok(T),
    Failed { error: String },
}

impl<T> Part<T> {
    /// The value, if this part did not fail.
    pub fn ok(&self) -> Option<&T> {
        match self {
            Part::Ok(v) => Some(v),
            Part::Failed { .. } => None,
        }
    }
}

/// The migration phase as the state file says, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PhaseStatus {
    Known(State),
    /// `{"phase": "unknown", "error": …}`
    Unknown {
        phase: String,
        error: String,
    },
}

impl PhaseStatus {
    /// The phase's name (`catching_up`, …, or `unknown`).
    pub fn name(&self) -> String {
        match self {
            PhaseStatus::Known(s) => s.phase().to_string(),
            PhaseStatus::Unknown { phase, .. } => phase.clone(),
        }
    }
}

/// The tunnel as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TunnelStatus {
    Up {
        peer: PeerStatus,
        /// Data streams open now.
        streams: u64,
        rtt_ms: u64,
        udp_bytes_received: u64,
        udp_bytes_sent: u64,
    },
    Down,
}

/// The source agent at the other end of the tunnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: String,
    pub role: String,
    pub region: String,
    pub migration: String,
    pub fingerprint: String,
}

/// The standby's side of the lag: received and replayed LSNs, last replayed commit time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandbyStatus {
    pub in_recovery: bool,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// ms since the epoch of the last replayed transaction.
    pub last_replay_ms: Option<u64>,
    pub now_ms: u64,
}

/// `status`'s answer: the tunnel, the migration phase, and the lag from both ends. Parts that
/// could not be asked (no tunnel, no new cluster running) are left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The tunnel is up (the rest could be asked).
    pub ok: bool,
    pub tunnel: TunnelStatus,
    pub migration: PhaseStatus,
    /// Why `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source's LSN, walsenders and slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Part<SourceStatus>>,
    /// The new cluster, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_cluster: Option<Part<StandbyStatus>>,
    /// Source's current LSN minus the standby's replay LSN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// The walsender's replay lag as the source measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms_source: Option<u64>,
}

impl StatusReport {
    /// The source's status, when it answered.
    pub fn source_status(&self) -> Option<&SourceStatus> {
        self.source.as_ref().and_then(Part::ok)
    }

    /// The new cluster's status, when it answered.
    pub fn standby(&self) -> Option<&StandbyStatus> {
        self.new_cluster.as_ref().and_then(Part::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status --json` keeps the shape it had when it was built with `json!` field by field:
    /// the tunnel tagged by `state`, the phase as the state file writes it, failed parts as
    /// `{"error": …}`, absent parts left out.
    #[test]
    fn status_report_shape() {
        let down = StatusReport {
            ok: false,
            tunnel: TunnelStatus::Down,
            migration: PhaseStatus::Known(State::CatchingUp { slot: "s".into() }),
            error: Some("no tunnel".into()),
            source: None,
            new_cluster: Some(Part::Failed {
                error: "refused".into(),
            }),
            lag_bytes: None,
            lag_ms_source: None,
        };
        let v = serde_json::to_value(&down).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ok": false,
                "tunnel": {"state": "down"},
                "migration": {"phase": "catching_up", "slot": "s"},
                "error": "no tunnel",
                "new_cluster": {"error": "refused"},
            })
        );
        assert_eq!(serde_json::from_value::<StatusReport>(v).unwrap(), down);

        let up: StatusReport = serde_json::from_value(serde_json::json!({
            "ok": true,
            "tunnel": {"state": "up", "peer": {"address": "10.0.0.1:7443", "role": "source",
                "region": "DE", "migration": "m1", "fingerprint": "ab"},
                "streams": 2, "rtt_ms": 3, "udp_bytes_received": 10, "udp_bytes_sent": 20},
            "migration": {"phase": "unknown", "error": "state file unreadable"},
            "source": {"current_lsn": "0/3000060", "replication": [], "slot": null, "now_ms": 1},
            "new_cluster": {"in_recovery": true, "receive_lsn": "0/3000060",
                "replay_lsn": "0/3000000", "last_replay_ms": null, "now_ms": 2},
            "lag_bytes": 96,
        }))
        .unwrap();
        assert_eq!(up.migration.name(), "unknown");
        assert_eq!(up.source_status().unwrap().current_lsn, Lsn(0x3000060));
        assert_eq!(up.standby().unwrap().replay_lsn, Some(Lsn(0x3000000)));
        assert!(matches!(up.tunnel, TunnelStatus::Up { streams: 2, .. }));
    }

    #[test]
    fn failures_carry_the_phase_only_when_a_job_ran() {
        let f = AdminFailure::new("no tunnel");
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"ok":false,"error":"no tunnel"}"#
        );
        let f = AdminFailure {
            phase: Some("ready".into()),
            ..f
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"ok":false,"error":"no tunnel","phase":"ready"}"#
        );
    }

    #[test]
    fn admin_requests_on_the_wire() {
        let r = AdminRequest::Rollback(RollbackOptions { keep_slot: true });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"verb":"rollback","options":{"keep_slot":true}}"#);
        assert_eq!(serde_json::from_str::<AdminRequest>(&line).unwrap(), r);
        let s: AdminRequest = serde_json::from_str(r#"{"verb":"status"}"#).unwrap();
        assert_eq!(s, AdminRequest::Status);
        // Options default field by field; unknown verbs and fields are refused.
        let c: AdminRequest =
            serde_json::from_str(r#"{"verb":"cutover","options":{"dry_run":true}}"#).unwrap();
        let AdminRequest::Cutover(o) = c else {
            panic!()
        };
        assert!(o.dry_run && o.max_lag == DEFAULT_MAX_LAG);
        assert!(serde_json::from_str::<AdminRequest>(r#"{"verb":"drop_database"}"#).is_err());
        assert!(serde_json::from_str::<AdminRequest>(
            r#"{"verb":"cutover","options":{"sql":"x"}}"#
        )
        .is_err());
        let p: AdminLine = serde_json::from_str(r#"{"progress":"fencing"}"#).unwrap();
        assert_eq!(
            p,
            AdminLine::Progress {
                progress: "fencing".into()
            }
        );
        let a: AdminLine = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert!(matches!(a, AdminLine::Answer(_)));
    }

    #[test]
    fn a_report_keeps_the_shape_the_cli_and_tests_read() {
        let r = CutoverReport {
            phases: CutoverPhases {
                fence_ms: Some(17),
                ..Default::default()
            },
            downtime_ms: Some(151),
            verification: Some(Verification {
                method: "block_ranges".into(),
                at_fence: Some(AtFenceReport::default()),
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["phases"]["fence_ms"], 17);
        assert!(
            v["phases"].get("drain_ms").is_none(),
            "unreached steps left out"
        );
        assert_eq!(v["downtime_ms"], 151);
        assert_eq!(v["verification"]["method"], "block_ranges");
        assert!(v.get("dry_run").is_none());
        let back: CutoverReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
