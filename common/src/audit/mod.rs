//! Hash-chained, signed audit log: the writer both agents append to, the verifier behind
//! `audit verify`, the peer comparison behind `audit verify --peer`, and `audit report`.
//!
//! # Record format
//!
//! One JSON object per line, keys sorted, integers only (no floats anywhere; durations in ms):
//!
//! ```text
//! {"details":{…},"event":"stream_closed","hash":"<64 hex>","prev":"<64 hex>","seq":12,"time":"2026-11-24T11:35:22.123Z"}
//! ```
//!
//! - `seq` is 0 on the first line of a file and grows by one per line.
//! - `prev` is the `hash` of the line before (64 zeros on line 1).
//! - `hash` is hex(BLAKE3(canonical JSON of the record without `hash`)), canonical being
//!   `serde_json::to_string` of the value: sorted keys, no whitespace. Each line must *be* its
//!   canonical form (re-serialising the parsed line gives the same bytes), which also rules out
//!   duplicate keys, whose meaning differs between JSON parsers.
//! - `time` is RFC 3339 UTC with milliseconds. It is what the agent's clock said; it is
//!   recorded, not checked for monotonicity (clocks step).
//! - A `checkpoint` record signs the hash of the record before it with the agent's TLS key
//!   (ECDSA P-256/SHA-256 over `b"pgferry-audit-checkpoint-v1\0" ‖ 32 hash bytes`). The public
//!   key is the certificate in the most recent `agent_started` record.
//!
//! ```text
//!  line 1  seq 0  agent_started {certificate, fingerprint, role, region, migration, version}
//!  line 2  seq 1  handshake_accepted            prev = hash(line 1)
//!  line 3  seq 2  stream_closed                 prev = hash(line 2)
//!  line 4  seq 3  checkpoint {signed_hash = hash(line 3), signature, records = 3, …}
//!                     │                                  ▲
//!                     └── ECDSA(agent key) ──────────────┘   the chain makes it cover lines 1-3
//! ```
//!
//! # Layout
//!
//! ```text
//!   record   the format: canonical form, hashing, time, certificate keys
//!   event    one serde struct per record the agents write; the writer and the readers share them
//!   writer   CheckpointSigner and AuditLog (lock, open/verify/resume, append, checkpoint)
//!   verify   verify_reader / verify_file → Verified (agents, runs, tunnel sessions, streams)
//!   peer     compare_peer: the two agents' logs describe the same sessions and the same bytes
//!   report   render_report: the report an auditor reads (text, JSON, CSV), bound to its logs
//!   transfer the transfer record: parties, countries, volume per database user, outcome,
//!            safeguards, migration events; the model behind every format
//! ```
//!
//! # One writer, one signer
//!
//! A log has one writer: [`AuditLog::open`] takes an exclusive flock(2) on `<log>.lock` (which
//! holds the writer's pid) before it reads or writes the log, and holds it for the
//! `AuditLog`'s lifetime; a second agent started on the same log fails at once ("another
//! pgferry agent is writing this audit log … (pid N)") and leaves the log untouched. Readers
//! (`audit verify`, `audit report`) take no lock.
//!
//! A log speaks for one agent, and every record for the certificate whose key signs it:
//! - the first `agent_started` fixes the log's role and migration; a later `agent_started`
//!   with another role or migration fails at its line. A renewed certificate (new key and
//!   fingerprint, same role and migration; the region may change) starts a run like any other;
//! - each `agent_started` must say what its embedded certificate's URI SANs say (role, region,
//!   migration; the fingerprint is that certificate's), and each checkpoint is verified with the
//!   key of the most recent `agent_started`'s certificate;
//! - any record that states its writer's own `role`, `region` or `migration` (top-level in its
//!   details) must agree with that certificate too. The peer's identity, nested under
//!   `details.peer` in `handshake_accepted`, is not the writer's.
//!
//! So the target's key cannot write records that claim to be the source's (nor the other way
//! round): it can only sign runs that say "target", which the source's log refuses.
//!
//! # What verification detects, and what it does not
//!
//! Detected, each naming the first line that reveals it: a modified, inserted, deleted or
//! reordered line (hash, `prev` and `seq` break at that line); a line rewritten together with
//! every hash after it (the next checkpoint's signature no longer matches); a log cut anywhere
//! except just after an `agent_stopped` checkpoint (the last line is not that checkpoint); a
//! checkpoint signed by another key; a record whose role, region or migration its signing
//! certificate contradicts; a second role or migration in one log; with `--ca`, an
//! `agent_started` certificate not issued by the migration's CA.
//!
//! With `--peer` (see the `peer` module for the exact rule): a stream whose digests or byte
//! counts differ between the two logs; a tunnel session or a stream that ended `ok` present in
//! one log only, unless the other agent could not have recorded it (before its log's first
//! `agent_started`, while it was down after a crash, after the last record of a log that does
//! not end with `agent_stopped`). That includes a whole later run cut from the end of a log.
//!
//! Not detectable from one log alone:
//! - A closed log (verified without `--allow-open`) must end with `agent_stopped` and its
//!   checkpoint, so a cut right after a session's checkpoint is detected too. A log that spans
//!   several runs of the agent can still be cut right after an earlier run's final checkpoint
//!   without a trace in that log alone; `--peer` fails if the peer's log recorded a tunnel
//!   session with the missing run (a run that never reached its peer leaves no trace there).
//!   A log that ends open (`--allow-open`) may be cut after any checkpoint: `--peer` tolerates
//!   what the peer recorded after such a log's last record, since its agent may still be
//!   writing it.
//! - The hashes are unkeyed: whoever can write the file can rewrite the records after the last
//!   checkpoint, or remove them, together with their hashes. Only checkpoints (signed) pin the
//!   past. An agent that crashes leaves such an unsigned tail; see `log_resumed` below.
//! - The fields of the final checkpoint record other than the signed hash (its `time`) are only
//!   covered by the next checkpoint.
//! - Without `--ca`, anybody with *some* P-256 key and a certificate that carries pgferry URI
//!   SANs can write a fresh, self-consistent log with that certificate in `agent_started`:
//!   pass the migration's CA to rule that out. Certificate validity periods are not checked (an
//!   old log outlives its certificates).
//! - An agent's own key can rewrite its own log wholesale: the peer's log (`--peer`) is the
//!   check on that.
//!
//! # Durability and crashes
//!
//! [`AuditLog::append`] writes each line with a single `write_all` on a file opened in append
//! mode and does not fsync: a killed agent loses nothing, a power failure may lose the lines since
//! the last checkpoint. [`AuditLog::checkpoint`] fsyncs. When [`AuditLog::open`] finds a log
//! that does not end in a checkpoint (the agent crashed or was killed), it appends a
//! `log_resumed` record with `{"unsigned_records": n}`, n being the number of records after the
//! last checkpoint. Those records stay in the chain, so the next checkpoint covers them, but
//! they were unsigned while the agent was down: [`Verified::resumes`] lists them and the report
//! prints them as "unsigned tail before resume". A log whose last line is incomplete or whose
//! chain is broken is never appended to: open fails with the line number, and the operator moves
//! the file aside (a new file starts a new chain).

pub mod event;
mod peer;
mod record;
mod report;
mod transfer;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use peer::{
    compare_peer, compare_peer_named, MissingKind, MissingRecord, PeerComparison, PeerDirection,
    PeerMismatch, StreamMismatch, PEER_CLOCK_SLACK_MS,
};
pub use record::{events, CHECKPOINT_ALGORITHM, CHECKPOINT_DOMAIN};
pub use report::{render_report, Report, ReportFormat, ReportOptions};
pub use transfer::{
    country_name, human_bytes, streams_csv, MigrationEvent, Outcome, Party, Safeguards, StreamRow,
    Transfer, Volume, REPORT_SCHEMA_VERSION,
};
pub use verify::{
    verify_file, verify_reader, AgentInfo, HandshakeFailure, Resume, Run, RunEnd, StreamSeen,
    StreamSummary, TunnelSession, Verified, VerifyError, VerifyOptions,
};
pub use writer::{AuditLog, CheckpointSigner};

use std::path::PathBuf;

fn holder_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"))
}

/// Errors from writing an audit log. Verification failures are [`VerifyError`]s.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading, writing or syncing the log file failed.
    #[error("audit log {path}: {action}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another process holds the log's lock: two writers would interleave their sequence
    /// numbers and break the chain. Nothing was read from or written to the log.
    #[error("another pgferry agent is writing this audit log {path} ({holder}); stop it, or give this agent its own --audit-log", holder = holder_text(*.pid))]
    Locked {
        /// The log file.
        path: PathBuf,
        /// The holder's process id as its lock file records it (`None`: unreadable, or the
        /// holder has not written it yet).
        pid: Option<u32>,
    },
    /// The existing log was written by an agent of another role or migration: one log has one
    /// writer, and a checkpoint signed with this agent's key would make the log fail
    /// verification. Nothing was written.
    #[error("audit log {path} belongs to the {log_writer} (agent_started at line {line}), but this agent's certificate is for the {ours}: give each agent its own log")]
    WrongLog {
        /// The log file.
        path: PathBuf,
        /// Role and migration the log's `agent_started` records name ("source agent of
        /// migration m1").
        log_writer: String,
        /// Line of the log's first `agent_started`.
        line: usize,
        /// Role and migration of the signer's certificate ("target of migration m1").
        ours: String,
    },
    /// The existing log does not verify; appending would extend a broken chain.
    #[error("existing audit log {path} does not verify, refusing to append to it: {source} (move the file aside to start a new log)")]
    Broken {
        /// The log file.
        path: PathBuf,
        /// Where and why verification failed.
        source: VerifyError,
    },
    /// The checkpoint key is not a PKCS#8 ECDSA P-256 key.
    #[error("checkpoint signing key: not a PKCS#8 ECDSA P-256 key ({0})")]
    Key(String),
    /// The signer's certificate cannot be used to verify checkpoints.
    #[error("checkpoint certificate: {0}")]
    Certificate(String),
    /// The signing key does not belong to the certificate.
    #[error("checkpoint signing key does not match the certificate's public key")]
    KeyMismatch,
    /// Signing failed (the system random generator failed).
    #[error("signing the checkpoint failed")]
    Signing,
    /// The details would make the record unverifiable.
    #[error("audit record {event}: {reason}")]
    InvalidDetails {
        /// Event name.
        event: String,
        /// What is wrong.
        reason: String,
    },
    /// `checkpoint` and `log_resumed` records are written by the log itself.
    #[error("audit event {0:?} is written by the audit log itself and cannot be appended")]
    ReservedEvent(String),
    /// A record names a role, region or migration other than the signer's certificate's.
    #[error("audit record {event}: details.{field} is {value:?}, but the signing certificate says {certificate:?}")]
    IdentityMismatch {
        /// Event name.
        event: String,
        /// `role`, `region` or `migration`.
        field: &'static str,
        /// What the record says.
        value: String,
        /// What the certificate's URI SAN says.
        certificate: String,
    },
    /// An `agent_started` record names a certificate other than the checkpoint signer's.
    #[error("agent_started names a certificate other than the one checkpoints are signed with")]
    CertificateMismatch,
    /// A checkpoint cannot be verified unless `agent_started` announced the signer's certificate.
    #[error("checkpoint before an agent_started record announcing the signing certificate")]
    NoAgentStarted,
    /// An earlier write failed part-way; the file may end in a partial line.
    #[error("audit log {0}: an earlier write failed, the log may end in a partial line; restart the agent (open will name the line)")]
    Poisoned(PathBuf),
}
