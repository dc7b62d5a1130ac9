//! The audit records the agents write, one serde struct per event. The writer serialises them
//! (`Audit::event`, runtime) and the verifier, the peer comparison and the report read the same
//! structs back, so what is written and what is checked cannot drift apart.
//!
//! Reading is lenient where it may be and strict where it matters: the fields the verifier
//! checks (identities, session ids, digests, byte counts) are required and typed, so a record
//! without them fails at its line ("missing field details.sent.digest"); descriptive fields
//! default when absent, so logs written by an older agent still verify.
//!
//! Events not listed here (the migration's phases, preflight, lag samples, …) are written as
//! free-form details: chained and signed like every record, checked by no one field by field.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::record::{events, is_hash_hex};

/// A typed audit record: its event name and its details.
pub trait AuditEvent: Serialize + DeserializeOwned {
    /// The record's `event`.
    const NAME: &'static str;
}

/// Reads a record's details as `E`; errors name the field as the log spells it
/// (`missing field details.sent.digest`, `field details.sent.raw_bytes: invalid type…`).
pub fn read<E: DeserializeOwned>(details: &Map<String, Value>) -> Result<E, String> {
    let value = Value::Object(details.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "details".to_string()
        } else {
            format!("details.{path}")
        };
        let msg = e.inner().to_string();
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            format!("missing field {at}.{field}")
        } else if msg.starts_with("must ") {
            format!("field {at} {msg}")
        } else {
            format!("field {at}: {msg}")
        }
    })
}

/// A BLAKE3 or SHA-256 value as the log writes it: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct HexHash(pub String);

impl<'de> Deserialize<'de> for HexHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if is_hash_hex(&s) {
            Ok(HexHash(s))
        } else {
            Err(serde::de::Error::custom("must be 64 lowercase hex digits"))
        }
    }
}

/// TLS parameters of the tunnel (the agent's configuration, or a session's negotiation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsParams {
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub cipher_suite: String,
    #[serde(default)]
    pub kx_group: String,
    /// The negotiated ALPN (sessions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
}

/// How an agent reaches its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A forwarded service as configured on this side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub endpoint: String,
}

/// `agent_started`: the process, its certificate (the key for the checkpoints that follow)
/// and its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStarted {
    pub role: String,
    pub region: String,
    pub migration: String,
    /// SHA-256 of `certificate`.
    pub fingerprint: String,
    /// The agent's certificate, DER in standard base64.
    pub certificate: String,
    pub version: String,
    /// The certificate's end of validity (Unix seconds).
    #[serde(default)]
    pub not_after: i64,
    #[serde(default)]
    pub protocol_version: u32,
    #[serde(default)]
    pub transport: TransportRecord,
    /// The region policy in force, as configured.
    #[serde(default)]
    pub allowed_regions: String,
    #[serde(default)]
    pub services: Vec<ServiceRecord>,
    #[serde(default)]
    pub compression_level: i32,
    #[serde(default)]
    pub handshake_timeout_secs: u64,
    #[serde(default)]
    pub congestion_control: String,
    #[serde(default)]
    pub allow_non_loopback_local: bool,
    #[serde(default)]
    pub tls: TlsParams,
    /// The host's name (for the auditor's transfer record).
    #[serde(default)]
    pub host: String,
    /// A revocation list is configured and re-read at every handshake.
    #[serde(default)]
    pub revocation_list: bool,
}

impl AuditEvent for AgentStarted {
    const NAME: &'static str = events::AGENT_STARTED;
}

/// `agent_stopped`: a clean stop, drained or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStopped {
    pub drained: bool,
    /// Forwarded connections cut at the drain limit.
    #[serde(default)]
    pub streams_cut: u64,
}

impl AuditEvent for AgentStopped {
    const NAME: &'static str = events::AGENT_STOPPED;
}

/// The peer's certificate, as a handshake presented it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub fingerprint: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub migration: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub not_after: i64,
}

/// `handshake_accepted`: a QUIC connection passed the certificate policy and the Hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeAccepted {
    /// The peer's UDP address.
    pub address: String,
    /// This agent dialed (rather than accepted).
    #[serde(default)]
    pub dialed: bool,
    pub peer: PeerRecord,
    #[serde(default)]
    pub tls: TlsParams,
}

impl AuditEvent for HandshakeAccepted {
    const NAME: &'static str = events::HANDSHAKE_ACCEPTED;
}

/// What the path was like over a session (quinn's path statistics at its end).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRecord {
    /// The MTU path-MTU discovery reached.
    pub mtu: u16,
    pub rtt_ms: u64,
    pub min_rtt_ms: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    pub black_holes_detected: u64,
    pub congestion_control: String,
}

/// `session_ended`: a QUIC connection with the peer ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnded {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_fingerprint: Option<String>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub duration_ms: u64,
    /// Data streams the session carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u64>,
    #[serde(default)]
    pub udp_bytes_sent: u64,
    #[serde(default)]
    pub udp_bytes_received: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRecord>,
}

impl AuditEvent for SessionEnded {
    const NAME: &'static str = events::SESSION_ENDED;
}

/// `stream_opened`: a forwarded connection began (both agents write it, same `session_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpened {
    pub session_id: String,
    #[serde(default)]
    pub service: String,
    /// Source: the upstream it was connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Target: the local client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_fingerprint: Option<String>,
}

impl AuditEvent for StreamOpened {
    const NAME: &'static str = events::STREAM_OPENED;
}

/// `stream_resumed`: a forwarded connection whose stream was lost with its tunnel continued
/// over a new one, byte for byte (both agents write it, same `session_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamResumed {
    pub session_id: String,
    #[serde(default)]
    pub service: String,
    /// From the loss to the resumed stream.
    pub gap_ms: u64,
    /// Why the stream was lost.
    #[serde(default)]
    pub cause: String,
    /// Frames sent again (the peer had not acknowledged them) and their bytes on the wire.
    pub resent_frames: u64,
    pub resent_bytes: u64,
    /// The first chunk each side still needed from the other.
    pub peer_expected: u64,
    pub we_expected: u64,
    /// The certificate of the connection it continues on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_fingerprint: Option<String>,
}

impl AuditEvent for StreamResumed {
    const NAME: &'static str = "stream_resumed";
}

/// `stream_identified`: who a forwarded PostgreSQL connection is, from its startup message
/// (target only; user, database, application, replication, never a secret or a query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIdentified {
    pub session_id: String,
    pub service: String,
    pub postgres: crate::pgwire::StartupInfo,
}

impl AuditEvent for StreamIdentified {
    const NAME: &'static str = "stream_identified";
}

/// `admin_command`: a local user ran a verb on the target's admin socket. The user is the
/// socket's peer credentials (the kernel's word, not the client's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCommand {
    /// `preflight`, `clone`, `cutover` or `rollback` (`status` changes nothing and is not
    /// recorded).
    pub verb: String,
    pub uid: u32,
    /// The user name of `uid` on the target host (empty if it has none).
    #[serde(default)]
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The verb's options as given (`cutover`'s tables, budget, fence mode…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
}

impl AuditEvent for AdminCommand {
    const NAME: &'static str = "admin_command";
}

/// `stream_refused`: the source refused a forwarded connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRefused {
    pub session_id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub reason: String,
}

impl AuditEvent for StreamRefused {
    const NAME: &'static str = events::STREAM_REFUSED;
}

/// One direction of a forwarded connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionRecord {
    /// Bytes before compression.
    pub raw_bytes: u64,
    /// Payload bytes on the wire (after compression).
    pub wire_bytes: u64,
    pub chunks: u64,
    /// BLAKE3 of everything in this direction.
    pub digest: HexHash,
}

/// `stream_closed`: a forwarded connection ended; compared with the peer's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamClosed {
    pub session_id: String,
    pub service: String,
    /// `ok`, `integrity_failure`, `peer_reset`, …
    pub outcome: String,
    /// Why it did not end `ok` (empty when it did).
    #[serde(default)]
    pub detail: String,
    pub duration_ms: u64,
    /// What this agent sent into the tunnel.
    pub sent: DirectionRecord,
    /// What this agent took out of the tunnel.
    pub received: DirectionRecord,
}

impl AuditEvent for StreamClosed {
    const NAME: &'static str = events::STREAM_CLOSED;
}

/// `integrity_failure`: a chunk failed its BLAKE3 check; the stream was reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrityFailure {
    pub session_id: String,
    pub service: String,
    pub reason: String,
    /// Verified chunks delivered before the bad one.
    pub delivered_chunks: u64,
    pub delivered_bytes: u64,
}

impl AuditEvent for IntegrityFailure {
    const NAME: &'static str = events::INTEGRITY_FAILURE;
}

/// `log_resumed`: the agent restarted after a crash; records after the last checkpoint are
/// unsigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogResumed {
    pub unsigned_records: u64,
}

impl AuditEvent for LogResumed {
    const NAME: &'static str = events::LOG_RESUMED;
}

/// `handshake_refused` or `handshake_failed` (written in several shapes: per refusal, or a
/// summary of many), read for the certificate it names, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeProblem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// The migration's records: written by the target's executor and admin server and the
// source's request server; read by the transfer record of `audit report`.

/// `migration_state`: the migration moved from one phase to the next (persisted first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStateChanged {
    pub from: String,
    pub to: String,
    /// The state machine's event that moved it, as `migration::Event` serialises.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub event: Value,
}

impl AuditEvent for MigrationStateChanged {
    const NAME: &'static str = "migration_state";
}

/// `preflight`: the checks of both clusters, and which failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightRun {
    pub ok: bool,
    #[serde(default)]
    pub failed: Vec<String>,
    pub checks: u64,
}

impl AuditEvent for PreflightRun {
    const NAME: &'static str = "preflight";
}

/// `base_backup`: the copy is complete and `pg_verifybackup` passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackupDone {
    pub slot: String,
    pub data_dir: String,
    pub duration_ms: u64,
    pub verified: bool,
}

impl AuditEvent for BaseBackupDone {
    const NAME: &'static str = "base_backup";
}

/// `base_copy_served` (source): an agent copy's backup session stopped by the target; what its
/// file streams sent (a file fetched again after a cut counts again: these are the bytes that
/// left the host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseCopyServed {
    pub backup_id: String,
    pub start_lsn: String,
    pub end_lsn: String,
    /// Files of the plan, and those served to their end.
    pub files_planned: u64,
    pub files_served: u64,
    /// File streams served (tries), and file streams refused (a path outside the plan, another
    /// backup's id).
    pub streams: u64,
    pub refused: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub chunks: u64,
}

impl AuditEvent for BaseCopyServed {
    const NAME: &'static str = "base_copy_served";
}

/// `standby_started`: the new cluster runs as a standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyStarted {
    pub data_dir: String,
    pub port: u16,
}

impl AuditEvent for StandbyStarted {
    const NAME: &'static str = "standby_started";
}

/// `slot_kept`: a rollback left the replication slot on the source (`--keep-slot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotKept {
    pub slot: String,
}

impl AuditEvent for SlotKept {
    const NAME: &'static str = "slot_kept";
}

/// `source_fenced`: the source takes no more writes from LSN `lsn` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFenced {
    pub lsn: String,
    /// What the fence changed on the source.
    #[serde(default)]
    pub fence: Option<crate::control::FenceReport>,
}

impl AuditEvent for SourceFenced {
    const NAME: &'static str = "source_fenced";
}

/// `tables_verified`: the tables compared at the fence, once per cutover, whatever the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TablesVerified {
    /// The new cluster's digest of each table verified.
    pub tables: Vec<crate::control::TableDigest>,
    #[serde(default)]
    pub mismatched: Vec<String>,
    #[serde(default)]
    pub not_verified: Vec<String>,
    /// `block_ranges` (pre-pass) or absent (whole tables at the fence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_fence: Option<crate::admin::AtFenceReport>,
}

impl AuditEvent for TablesVerified {
    const NAME: &'static str = "tables_verified";
}

impl AuditEvent for crate::admin::PrepassReport {
    const NAME: &'static str = "verification_prepass";
}

impl AuditEvent for crate::admin::CutoverReport {
    const NAME: &'static str = "cutover_report";
}

/// `control_request`: the source answered one of the target's typed requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequestAnswered {
    pub id: u64,
    /// The request (`fence`, `block_digests`, `drop_slot`, …).
    pub op: String,
    /// The answer's kind (`fenced`, `slot_dropped`, `error`, …).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl AuditEvent for ControlRequestAnswered {
    const NAME: &'static str = "control_request";
}

/// The details of a typed record, for writers that take `(event, details)`.
pub fn details<E: AuditEvent>(e: &E) -> Value {
    serde_json::to_value(e).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn details(v: Value) -> Map<String, Value> {
        let Value::Object(m) = v else { panic!() };
        m
    }

    #[test]
    fn errors_name_the_field_as_the_log_spells_it() {
        let dir = json!({"raw_bytes": 1, "wire_bytes": 1, "chunks": 1, "digest": "a".repeat(64)});
        let ok = json!({"session_id": "s", "service": "postgres", "outcome": "ok",
            "duration_ms": 3, "sent": dir, "received": dir});
        let closed: StreamClosed = read(&details(ok.clone())).unwrap();
        assert_eq!(closed.detail, "");
        assert_eq!(serde_json::to_value(&closed).unwrap()["sent"], dir);

        let mut v = ok.clone();
        v["sent"].as_object_mut().unwrap().remove("digest");
        let e = read::<StreamClosed>(&details(v)).unwrap_err();
        assert_eq!(e, "missing field details.sent.digest");

        let mut v = ok.clone();
        v["received"]["digest"] = json!("ABC");
        let e = read::<StreamClosed>(&details(v)).unwrap_err();
        assert_eq!(
            e,
            "field details.received.digest must be 64 lowercase hex digits"
        );

        let mut v = ok.clone();
        v["sent"]["raw_bytes"] = json!("many");
        let e = read::<StreamClosed>(&details(v)).unwrap_err();
        assert!(
            e.starts_with("field details.sent.raw_bytes: invalid type"),
            "{e}"
        );

        let e = read::<LogResumed>(&Map::new()).unwrap_err();
        assert_eq!(e, "missing field details.unsigned_records");
    }

    #[test]
    fn descriptive_fields_default_for_older_logs() {
        let s: SessionEnded = read(&details(json!({"address": "10.0.0.1:7443"}))).unwrap();
        assert_eq!((s.streams, s.path), (None, None));
        let a: HandshakeAccepted = read(&details(
            json!({"address": "a", "peer": {"fingerprint": "f"}}),
        ))
        .unwrap();
        assert_eq!(a.tls, TlsParams::default());
    }
}
