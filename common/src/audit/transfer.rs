//! The transfer record: what an auditor files (GDPR Art. 30(1)(e): to which country, under
//! which safeguards; ISO 27001 A.8.15: who, what, when, from where), built from one agent's
//! log or, better, both. The same model is rendered as text, JSON (schema
//! [`REPORT_SCHEMA_VERSION`]) and CSV (one row per stream).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::event::{
    read, AdminCommand, AgentStarted, AuditEvent, BaseBackupDone, BaseCopyServed,
    ControlRequestAnswered, MigrationStateChanged, PreflightRun, SlotKept, SourceFenced,
    StandbyStarted, StreamIdentified, StreamResumed, TablesVerified,
};
use super::record::events;
use super::verify::{parse_stream_closed, Record};
use crate::admin::{CutoverReport, PrepassReport};

/// [`Volume::kind`] of an agent copy's file streams (from the source's `base_copy_served`).
pub const AGENT_COPY: &str = "agent copy";

/// Version of the JSON report's shape (`schema_version`); raised on any incompatible change.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// One agent of the transfer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Party {
    pub role: String,
    pub fingerprint: String,
    pub country_code: String,
    pub country: String,
    /// The host name the agent recorded at its start (empty when only its peer's log is read).
    pub host: String,
}

/// Bytes moved for one service, database user and database.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Volume {
    pub service: String,
    pub user: String,
    pub database: String,
    /// `replication`, `logical replication`, or `session`.
    pub kind: String,
    pub streams: u64,
    pub source_to_target_raw_bytes: u64,
    pub source_to_target_wire_bytes: u64,
    pub target_to_source_raw_bytes: u64,
    pub target_to_source_wire_bytes: u64,
}

/// One forwarded stream (a CSV row).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StreamRow {
    pub session_id: String,
    pub service: String,
    pub closed_at: String,
    pub duration_ms: u64,
    pub outcome: String,
    pub user: String,
    pub database: String,
    pub application: String,
    pub replication: bool,
    pub source_to_target_raw_bytes: u64,
    pub source_to_target_wire_bytes: u64,
    pub source_to_target_chunks: u64,
    pub source_to_target_blake3: String,
    pub target_to_source_raw_bytes: u64,
    pub target_to_source_wire_bytes: u64,
    pub target_to_source_chunks: u64,
    pub target_to_source_blake3: String,
}

/// One event of the migration, from either log, in time order.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MigrationEvent {
    pub time: String,
    /// The agent whose log has it.
    pub agent: String,
    pub event: String,
    /// What happened, in words.
    pub summary: String,
}

/// How the migration ended, as far as the logs go.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// The last phase recorded (`completed`, `rolled_back`, `catching_up`, …).
    pub phase: String,
    pub promoted: bool,
    pub rolled_back: bool,
    pub fence_lsn: Option<String>,
    pub downtime_ms: Option<u64>,
    pub tables_verified: Vec<String>,
    pub tables_not_verified: Vec<String>,
    pub tables_mismatched: Vec<String>,
}

/// The technical measures in force, from the log (Art. 30(1)(g)).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Safeguards {
    pub tls_protocol: String,
    pub cipher_suite: String,
    pub key_exchange: String,
    pub mutual_certificate_authentication: bool,
    /// SHA-256 of the CA both certificates were checked against (`report --ca`).
    pub ca_fingerprint: Option<String>,
    /// The policy each agent enforced on its peer's country.
    pub allowed_regions: Vec<String>,
    /// Whether the agents re-read a revocation list at every handshake.
    pub revocation_checking: Option<bool>,
    pub chunks: u64,
    /// Every chunk passed its BLAKE3 check (no integrity failure recorded).
    pub every_chunk_verified: bool,
    pub integrity_failures: u64,
    pub signed_checkpoints: u64,
    /// Forwarded connections resumed over a new tunnel after an outage (`stream_resumed`),
    /// and the longest gap, in ms.
    pub resumptions: u64,
    pub longest_resume_gap_ms: u64,
}

/// The transfer, as the logs show it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Transfer {
    pub migration: String,
    pub parties: Vec<Party>,
    pub period_from: String,
    pub period_to: String,
    pub volume: Vec<Volume>,
    pub handshakes_refused: u64,
    pub streams_refused: u64,
    pub outcome: Outcome,
    pub safeguards: Safeguards,
    pub migration_events: Vec<MigrationEvent>,
    pub streams: Vec<StreamRow>,
}

/// One verified log's records, with the role of the agent that wrote it.
pub(crate) struct LogRecords<'a> {
    pub role: String,
    pub records: &'a [Record],
    pub checkpoints: u64,
}

impl Transfer {
    /// Builds the record from the logs given (one or both agents').
    pub(crate) fn build(logs: &[LogRecords<'_>]) -> Transfer {
        let mut t = Transfer::default();
        for log in logs {
            t.add_parties(log);
            t.safeguards.signed_checkpoints += log.checkpoints;
        }
        t.add_peers_seen(logs);
        // Streams: the target's view (it knows who each client was) when its log is given.
        let streams_log = logs
            .iter()
            .find(|l| l.role == "target")
            .or_else(|| logs.first());
        if let Some(log) = streams_log {
            t.add_streams(log);
        }
        for log in logs {
            t.add_migration_events(log);
        }
        t.migration_events.sort_by(|a, b| a.time.cmp(&b.time));
        let times = logs.iter().flat_map(|l| l.records.iter().map(|r| &r.time));
        t.period_from = times.clone().min().cloned().unwrap_or_default();
        t.period_to = times.max().cloned().unwrap_or_default();
        t
    }

    /// Each log's writer, from its (last) `agent_started`, and the measures it ran with.
    fn add_parties(&mut self, log: &LogRecords<'_>) {
        let started = log
            .records
            .iter()
            .rev()
            .find(|r| r.event == events::AGENT_STARTED);
        let Some(a) = started.and_then(|r| read::<AgentStarted>(&r.details).ok()) else {
            return;
        };
        self.migration.clone_from(&a.migration);
        self.parties
            .push(party(&a.role, &a.fingerprint, &a.region, &a.host));
        let s = &mut self.safeguards;
        s.tls_protocol = a.tls.protocol.clone();
        s.cipher_suite = a.tls.cipher_suite.clone();
        s.key_exchange = a.tls.kx_group.clone();
        s.mutual_certificate_authentication = true;
        let policy = format!("{} allows {}", a.role, region_policy(&a.allowed_regions));
        if !s.allowed_regions.contains(&policy) {
            s.allowed_regions.push(policy);
        }
        s.revocation_checking = Some(s.revocation_checking.unwrap_or(true) && a.revocation_list);
    }

    /// A peer whose log is not given: as its certificate was presented in a handshake.
    fn add_peers_seen(&mut self, logs: &[LogRecords<'_>]) {
        for log in logs {
            for r in log
                .records
                .iter()
                .filter(|r| r.event == events::HANDSHAKE_ACCEPTED)
            {
                let Ok(h) = read::<super::event::HandshakeAccepted>(&r.details) else {
                    continue;
                };
                let fp = super::record::normalize_fingerprint(&h.peer.fingerprint);
                if !self
                    .parties
                    .iter()
                    .any(|p| super::record::normalize_fingerprint(&p.fingerprint) == fp)
                {
                    self.parties
                        .push(party(&h.peer.role, &h.peer.fingerprint, &h.peer.region, ""));
                }
            }
            self.handshakes_refused += log
                .records
                .iter()
                .filter(|r| r.event == events::HANDSHAKE_REFUSED)
                .map(|r| r.details.get("count").and_then(Value::as_u64).unwrap_or(1))
                .sum::<u64>();
        }
    }

    /// Every stream with its client, and the volume per service, user and database.
    fn add_streams(&mut self, log: &LogRecords<'_>) {
        let who: BTreeMap<String, StreamIdentified> = log
            .records
            .iter()
            .filter(|r| r.event == StreamIdentified::NAME)
            .filter_map(|r| read::<StreamIdentified>(&r.details).ok())
            .map(|i| (i.session_id.clone(), i))
            .collect();
        let target_view = log.role == "target";
        for r in log.records {
            if r.event == events::STREAM_REFUSED {
                self.streams_refused += 1;
            }
            if r.event == events::INTEGRITY_FAILURE {
                self.safeguards.integrity_failures += 1;
            }
            if r.event == StreamResumed::NAME {
                if let Ok(e) = read::<StreamResumed>(&r.details) {
                    self.safeguards.resumptions += 1;
                    self.safeguards.longest_resume_gap_ms =
                        self.safeguards.longest_resume_gap_ms.max(e.gap_ms);
                }
            }
            if r.event != events::STREAM_CLOSED {
                continue;
            }
            let Ok(st) = parse_stream_closed(&r.details) else {
                continue;
            };
            let pg = who.get(&st.session_id).map(|i| &i.postgres);
            // The target receives what the source sends.
            let (down, up) = if target_view {
                (
                    (
                        st.received_raw_bytes,
                        st.received_wire_bytes,
                        st.received_chunks,
                        &st.received_digest,
                    ),
                    (
                        st.sent_raw_bytes,
                        st.sent_wire_bytes,
                        st.sent_chunks,
                        &st.sent_digest,
                    ),
                )
            } else {
                (
                    (
                        st.sent_raw_bytes,
                        st.sent_wire_bytes,
                        st.sent_chunks,
                        &st.sent_digest,
                    ),
                    (
                        st.received_raw_bytes,
                        st.received_wire_bytes,
                        st.received_chunks,
                        &st.received_digest,
                    ),
                )
            };
            let row = StreamRow {
                session_id: st.session_id.clone(),
                service: st.service.clone(),
                closed_at: r.time.clone(),
                duration_ms: st.duration_ms,
                outcome: st.outcome.clone(),
                user: pg.and_then(|p| p.user.clone()).unwrap_or_default(),
                database: pg.and_then(|p| p.database.clone()).unwrap_or_default(),
                application: pg
                    .and_then(|p| p.application_name.clone())
                    .unwrap_or_default(),
                replication: pg.is_some_and(|p| p.is_replication()),
                source_to_target_raw_bytes: down.0,
                source_to_target_wire_bytes: down.1,
                source_to_target_chunks: down.2,
                source_to_target_blake3: down.3.clone(),
                target_to_source_raw_bytes: up.0,
                target_to_source_wire_bytes: up.1,
                target_to_source_chunks: up.2,
                target_to_source_blake3: up.3.clone(),
            };
            self.safeguards.chunks += down.2 + up.2;
            let kind = match pg.and_then(|p| p.replication.as_deref()) {
                Some("database") => "logical replication",
                _ if row.replication => "replication",
                _ => "session",
            };
            self.add_volume(&row, kind);
            self.streams.push(row);
        }
        self.safeguards.every_chunk_verified = self.safeguards.integrity_failures == 0;
    }

    fn add_volume(&mut self, row: &StreamRow, kind: &str) {
        let at = self.volume.iter().position(|v| {
            v.service == row.service
                && v.user == row.user
                && v.database == row.database
                && v.kind == kind
        });
        let v = match at {
            Some(i) => &mut self.volume[i],
            None => {
                self.volume.push(Volume {
                    service: row.service.clone(),
                    user: row.user.clone(),
                    database: row.database.clone(),
                    kind: kind.to_string(),
                    ..Volume::default()
                });
                self.volume.last_mut().expect("just pushed")
            }
        };
        v.streams += 1;
        v.source_to_target_raw_bytes += row.source_to_target_raw_bytes;
        v.source_to_target_wire_bytes += row.source_to_target_wire_bytes;
        v.target_to_source_raw_bytes += row.target_to_source_raw_bytes;
        v.target_to_source_wire_bytes += row.target_to_source_wire_bytes;
    }

    /// The migration's own records (and the source's typed requests), and its outcome.
    fn add_migration_events(&mut self, log: &LogRecords<'_>) {
        for r in log.records {
            let Some(summary) = self.migration_summary(r) else {
                continue;
            };
            self.migration_events.push(MigrationEvent {
                time: r.time.clone(),
                agent: log.role.clone(),
                event: r.event.clone(),
                summary,
            });
        }
    }

    /// Words for one migration record; records the outcome on the way. `None`: not a
    /// migration record (or one this version cannot read).
    fn migration_summary(&mut self, r: &Record) -> Option<String> {
        let d = &r.details;
        let o = &mut self.outcome;
        Some(match r.event.as_str() {
            AdminCommand::NAME => {
                let c = read::<AdminCommand>(d).ok()?;
                format!("{} run by {} (uid {})", c.verb, or_dash(&c.user), c.uid)
            }
            MigrationStateChanged::NAME => {
                let m = read::<MigrationStateChanged>(d).ok()?;
                o.promoted |= m.to == "promoted" || m.to == "completed";
                o.rolled_back |= m.to == "rolled_back";
                o.phase.clone_from(&m.to);
                format!("phase {} → {}", m.from, m.to)
            }
            PreflightRun::NAME => {
                let p = read::<PreflightRun>(d).ok()?;
                match p.ok {
                    true => format!("preflight passed ({} checks)", p.checks),
                    false => format!(
                        "preflight FAILED ({} checks): {}",
                        p.checks,
                        p.failed.join(", ")
                    ),
                }
            }
            BaseBackupDone::NAME => {
                let b = read::<BaseBackupDone>(d).ok()?;
                format!(
                    "base backup copied{} in {} ms",
                    if b.verified {
                        " and checked by pg_verifybackup"
                    } else {
                        ""
                    },
                    b.duration_ms
                )
            }
            BaseCopyServed::NAME => {
                let b = read::<BaseCopyServed>(d).ok()?;
                self.volume.push(Volume {
                    service: format!("base copy {}", b.backup_id),
                    kind: AGENT_COPY.into(),
                    streams: b.streams,
                    source_to_target_raw_bytes: b.raw_bytes,
                    source_to_target_wire_bytes: b.wire_bytes,
                    ..Volume::default()
                });
                format!(
                    "base copy {} served: {} of {} file(s) to their end, {} raw bytes / {} on the wire in {} file stream(s), {} refused; backup {}..{}",
                    b.backup_id,
                    b.files_served,
                    b.files_planned,
                    b.raw_bytes,
                    b.wire_bytes,
                    b.streams,
                    b.refused,
                    b.start_lsn,
                    b.end_lsn
                )
            }
            StandbyStarted::NAME => "standby started".into(),
            SourceFenced::NAME => {
                let f = read::<SourceFenced>(d).ok()?;
                let summary = format!("source fenced at LSN {}", f.lsn);
                o.fence_lsn = Some(f.lsn);
                summary
            }
            PrepassReport::NAME => "verification pre-pass before the fence".into(),
            TablesVerified::NAME => {
                let t = read::<TablesVerified>(d).ok()?;
                o.tables_verified = t.tables.into_iter().map(|t| t.table).collect();
                o.tables_not_verified = t.not_verified;
                o.tables_mismatched = t.mismatched;
                format!(
                    "{} table(s) verified equal, {} NOT verified, {} differing",
                    o.tables_verified.len(),
                    o.tables_not_verified.len(),
                    o.tables_mismatched.len()
                )
            }
            CutoverReport::NAME => {
                let c = read::<CutoverReport>(d).ok()?;
                o.downtime_ms = c.downtime_ms;
                match c.downtime_ms {
                    Some(ms) => format!("cutover report: write downtime {ms} ms"),
                    None => "cutover report".into(),
                }
            }
            SlotKept::NAME => format!("replication slot {} kept", read::<SlotKept>(d).ok()?.slot),
            ControlRequestAnswered::NAME => {
                let c = read::<ControlRequestAnswered>(d).ok()?;
                // Status polls (every 200 ms while waiting) say nothing an auditor needs.
                if c.op == "status" {
                    return None;
                }
                match c.message {
                    Some(m) => format!("request {}: {} ({m})", c.op, c.result),
                    None => format!("request {}: {}", c.op, c.result),
                }
            }
            _ => return None,
        })
    }
}

fn party(role: &str, fingerprint: &str, region: &str, host: &str) -> Party {
    Party {
        role: role.to_string(),
        fingerprint: fingerprint.to_string(),
        country_code: region.to_string(),
        country: country_name(region).to_string(),
        host: host.to_string(),
    }
}

/// A region policy as configured (comma-separated codes), the EEA named as such.
fn region_policy(codes: &str) -> String {
    use crate::identity::{RegionSet, EEA_DESCRIPTION};
    if codes.parse::<RegionSet>().is_ok_and(|r| r.is_eea()) {
        return EEA_DESCRIPTION.to_string();
    }
    let mut set: Vec<&str> = codes
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    set.sort_unstable();
    if set.is_empty() {
        "(not recorded)".to_string()
    } else {
        set.join(", ")
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The English short name of an ISO 3166-1 alpha-2 code (the EEA, its neighbours and the
/// largest hosting countries; other codes are shown as they are).
pub fn country_name(code: &str) -> &str {
    const NAMES: &[(&str, &str)] = &[
        ("AT", "Austria"),
        ("BE", "Belgium"),
        ("BG", "Bulgaria"),
        ("HR", "Croatia"),
        ("CY", "Cyprus"),
        ("CZ", "Czechia"),
        ("DK", "Denmark"),
        ("EE", "Estonia"),
        ("FI", "Finland"),
        ("FR", "France"),
        ("DE", "Germany"),
        ("GR", "Greece"),
        ("HU", "Hungary"),
        ("IE", "Ireland"),
        ("IT", "Italy"),
        ("LV", "Latvia"),
        ("LT", "Lithuania"),
        ("LU", "Luxembourg"),
        ("MT", "Malta"),
        ("NL", "Netherlands"),
        ("PL", "Poland"),
        ("PT", "Portugal"),
        ("RO", "Romania"),
        ("SK", "Slovakia"),
        ("SI", "Slovenia"),
        ("ES", "Spain"),
        ("SE", "Sweden"),
        ("IS", "Iceland"),
        ("LI", "Liechtenstein"),
        ("NO", "Norway"),
        ("CH", "Switzerland"),
        ("GB", "United Kingdom"),
        ("US", "United States"),
        ("CA", "Canada"),
        ("JP", "Japan"),
        ("AU", "Australia"),
        ("IN", "India"),
        ("SG", "Singapore"),
        ("BR", "Brazil"),
        ("CN", "China"),
        ("KR", "South Korea"),
        ("IL", "Israel"),
        ("NZ", "New Zealand"),
        ("UA", "Ukraine"),
        ("RS", "Serbia"),
        ("TR", "Turkey"),
    ];
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(code, |(_, n)| n)
}

/// Bytes for people: `1.23 GB` (decimal units), exact below 1 kB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

/// The streams as CSV (RFC 4180: a header, one row per stream, quoted where needed).
pub fn streams_csv(rows: &[StreamRow]) -> String {
    let mut out = String::new();
    let columns = column_order();
    out.push_str(&columns.join(","));
    out.push_str("\r\n");
    for r in rows {
        let v = serde_json::to_value(r).unwrap_or_default();
        let cells: Vec<String> = columns
            .iter()
            .map(|k| csv_cell(v.get(*k).unwrap_or(&Value::Null)))
            .collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

fn column_order() -> Vec<&'static str> {
    vec![
        "session_id",
        "service",
        "closed_at",
        "duration_ms",
        "outcome",
        "user",
        "database",
        "application",
        "replication",
        "source_to_target_raw_bytes",
        "source_to_target_wire_bytes",
        "source_to_target_chunks",
        "source_to_target_blake3",
        "target_to_source_raw_bytes",
        "target_to_source_wire_bytes",
        "target_to_source_chunks",
        "target_to_source_blake3",
    ]
}

fn csv_cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    // A leading = + - @ would be a formula in a spreadsheet: quote and prefix it.
    let s = if s.starts_with(['=', '+', '-', '@']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) || s.starts_with('\'') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}
