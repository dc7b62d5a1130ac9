//! `audit report`: what an auditor asks of one log, as plain text with a stable layout. Who
//! ran (agents and certificates), whom they talked to (handshakes, with TLS parameters), what
//! went through (streams: bytes raw and on the wire, digests, outcome), what went wrong
//! (integrity failures, errors), and what is signed (checkpoints).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

use super::event::{read, AgentStopped, AuditEvent, StreamIdentified};
use super::record::{events, format_time};
use super::transfer::{
    country_name, human_bytes, streams_csv, LogRecords, Transfer, AGENT_COPY, REPORT_SCHEMA_VERSION,
};
use super::verify::{
    parse_stream_closed, verify_records, Record, Tip, Verified, VerifyError, VerifyOptions,
};

/// What `audit report` checks beyond the log itself.
#[derive(Debug, Clone, Default)]
pub struct ReportOptions {
    /// The other agent's log: verified too and compared (same sessions, same bytes, same
    /// digests); its file name is used in the text.
    pub peer: Option<std::path::PathBuf>,
    /// The migration's CA: every `agent_started` certificate must be issued by it.
    pub ca_der: Option<Vec<u8>>,
    /// A log the agent is still writing: records after the last checkpoint are reported
    /// (flagged) instead of failing the report.
    pub allow_open: bool,
    /// Text (default), JSON or CSV.
    pub format: ReportFormat,
}

/// How `audit report` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReportFormat {
    /// For people: verdict, transfer record, migration, then every section.
    #[default]
    Text,
    /// For tools: the verdict, the logs' bindings and the transfer record
    /// (`schema_version` [`REPORT_SCHEMA_VERSION`]).
    Json,
    /// For spreadsheets: one row per stream.
    Csv,
}

/// A rendered report and what makes it fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub text: String,
    /// Why the logs cannot be relied on (empty: everything verified). The text says the same
    /// in its first lines.
    pub problems: Vec<String>,
}

impl Report {
    /// Every log verified, is signed to its end (unless allowed open) and agrees with its peer.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the log at `path` (and, with [`ReportOptions::peer`], the other agent's log and
/// the comparison of both) and renders the report. A log that does not verify at all yields
/// the [`VerifyError`]; a log that verifies but is not signed to its end, or a peer log that is
/// broken or disagrees, yields a report whose first lines say so and whose
/// [`Report::problems`] are not empty.
pub fn render_report(path: &Path, opts: &ReportOptions) -> Result<Report, VerifyError> {
    let ours = Loaded::read(path, opts.ca_der.clone())?;
    let mut problems = Vec::new();
    if let Some(p) = ours.open_tail(opts) {
        problems.push(p);
    }
    let mut peer_lines = Vec::new();
    let mut theirs = None;
    if let Some(peer) = &opts.peer {
        let (lines, loaded) = check_peer(&ours, peer, opts, &mut problems);
        (peer_lines, theirs) = (lines, loaded);
    }
    let mut logs = vec![ours.log_records()];
    logs.extend(theirs.as_ref().map(Loaded::log_records));
    let mut transfer = Transfer::build(&logs);
    transfer.safeguards.ca_fingerprint = opts.ca_der.as_deref().map(super::record::sha256_hex);
    let text = match opts.format {
        ReportFormat::Text => {
            let mut out = String::new();
            let o = &mut out;
            verdict(o, &problems, opts);
            summary(o, path, &ours.v, &ours.tip, &ours.records);
            for l in &peer_lines {
                line(o, l);
            }
            transfer_record(o, &transfer);
            migration(o, &transfer);
            let records = &ours.records;
            agents(o, records, &ours.v);
            handshakes(o, records);
            streams(o, records);
            integrity_failures(o, records);
            errors(o, records);
            tunnel_sessions(o, records);
            checkpoints(o, records);
            event_counts(o, records);
            out
        }
        ReportFormat::Json => {
            let mut bindings = vec![ours.binding()];
            bindings.extend(theirs.as_ref().map(Loaded::binding));
            let doc = serde_json::json!({
                "schema_version": REPORT_SCHEMA_VERSION,
                "ok": problems.is_empty(),
                "problems": problems,
                "logs": bindings,
                "transfer": transfer,
            });
            format!(
                "{}\n",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            )
        }
        ReportFormat::Csv => streams_csv(&transfer.streams),
    };
    Ok(Report { text, problems })
}

/// One verified log and its records.
struct Loaded {
    path: std::path::PathBuf,
    records: Vec<Record>,
    v: Verified,
    tip: Tip,
}

impl Loaded {
    /// Verifies (an unsigned tail allowed: the caller decides) and keeps the records.
    fn read(path: &Path, ca_der: Option<Vec<u8>>) -> Result<Self, VerifyError> {
        let file = std::fs::File::open(path).map_err(|e| VerifyError {
            line: 0,
            reason: format!("cannot open {}: {e}", path.display()),
        })?;
        let vopts = VerifyOptions {
            allow_open: true,
            ca_der,
        };
        let mut records = Vec::new();
        let (v, tip) = verify_records(std::io::BufReader::new(file), &vopts, |r| records.push(r))?;
        Ok(Loaded {
            path: path.to_path_buf(),
            records,
            v,
            tip,
        })
    }

    /// Why the log cannot be relied on to its end, if it is not signed to it.
    fn open_tail(&self, opts: &ReportOptions) -> Option<String> {
        (self.v.unsigned_tail > 0 && !opts.allow_open).then(|| {
            format!(
                "{}: the last {} record(s) are not covered by a signed checkpoint: the log was cut, or the agent is still writing it (pass --allow-open for a live log)",
                self.path.display(),
                self.v.unsigned_tail
            )
        })
    }

    fn log_records(&self) -> LogRecords<'_> {
        LogRecords {
            role: self
                .v
                .agents
                .first()
                .map(|a| a.role.clone())
                .unwrap_or_default(),
            records: &self.records,
            checkpoints: self.v.checkpoints as u64,
        }
    }

    /// What ties a report to this file: its size in records, head hash and last checkpoint.
    fn binding(&self) -> Value {
        let last = self
            .records
            .iter()
            .rev()
            .find(|r| r.event == events::CHECKPOINT);
        serde_json::json!({
            "file": self.path.display().to_string(),
            "role": self.v.agents.first().map(|a| a.role.clone()),
            "records": self.v.records,
            "head_hash": self.tip.last_hash,
            "last_checkpoint_line": last.map(|c| c.line),
            "last_checkpoint_signs": last.and_then(|c| c.details.get("signed_hash").cloned()),
            "unsigned_tail": self.v.unsigned_tail,
        })
    }
}

/// Verifies the peer's log and compares both; returns the lines the summary shows for it, and
/// the peer's log when it verified.
fn check_peer(
    ours: &Loaded,
    peer: &Path,
    opts: &ReportOptions,
    problems: &mut Vec<String>,
) -> (Vec<String>, Option<Loaded>) {
    let theirs = match Loaded::read(peer, opts.ca_der.clone()) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("peer log {}: {e}", peer.display()));
            return (
                vec![format!("Peer log: {}: FAILED: {e}", peer.display())],
                None,
            );
        }
    };
    if let Some(p) = theirs.open_tail(opts) {
        problems.push(format!("peer log {p}"));
    }
    let mut lines = vec![format!(
        "Peer log: {}: {} records, {} checkpoint(s), verified",
        peer.display(),
        theirs.v.records,
        theirs.v.checkpoints
    )];
    let (a, b) = (ours.path.display().to_string(), peer.display().to_string());
    match super::compare_peer_named(&ours.v, &a, &theirs.v, &b) {
        Ok(c) => lines.push(format!("Peers:    the two logs agree: {c}")),
        Err(m) => {
            problems.push(format!("the logs disagree: {m}"));
            lines.push(format!("Peers:    DISAGREE: {m}"));
        }
    }
    (lines, Some(theirs))
}

/// The first lines: whether the logs can be relied on, and why not.
fn verdict(o: &mut String, problems: &[String], opts: &ReportOptions) {
    line(o, "pgferry audit report");
    line(o, "====================");
    if problems.is_empty() {
        let what = match (&opts.peer, &opts.ca_der) {
            (Some(_), Some(_)) => "both logs verified (hash chains, signatures, CA) and agree",
            (Some(_), None) => "both logs verified (hash chains, signatures) and agree",
            (None, Some(_)) => "the log verified (hash chain, signatures, CA)",
            (None, None) => "the log verified (hash chain, signatures)",
        };
        line(o, &format!("Verdict:  OK: {what}"));
    } else {
        line(o, "Verdict:  FAILED: do not rely on this report");
        for p in problems {
            line(o, &format!("          - {p}"));
        }
    }
}

/// The log, its records, period and signatures, and what one log cannot show.
fn summary(o: &mut String, path: &Path, v: &Verified, tip: &Tip, records: &[Record]) {
    line(o, &format!("Log:      {}", path.display()));
    line(
        o,
        &format!("Head:     line {} hash {}", v.records, tip.last_hash),
    );
    let last_checkpoint = records.iter().rev().find(|r| r.event == events::CHECKPOINT);
    line(
        o,
        &match last_checkpoint {
            Some(c) => format!(
                "Ends at:  signed checkpoint at line {} (signs hash {}, by certificate {})",
                c.line,
                s(&c.details, &["signed_hash"]),
                s(&c.details, &["fingerprint"])
            ),
            None => "Ends at:  no signed checkpoint".to_string(),
        },
    );
    line(
        o,
        &format!(
            "Records:  {} (seq 0-{}), {} checkpoint(s); hash chain and checkpoint signatures verified",
            v.records,
            v.records - 1,
            v.checkpoints
        ),
    );
    line(
        o,
        &format!(
            "Period:   {} to {} (UTC)",
            format_time(v.first_time),
            format_time(v.last_time)
        ),
    );
    if v.unsigned_tail == 0 {
        line(
            o,
            "Signed:   every record is covered by a signed checkpoint",
        );
    } else {
        let after = v.last_checkpoint_line.map_or_else(
            || "no checkpoint at all".to_string(),
            |l| format!("the last checkpoint at line {l}"),
        );
        line(
            o,
            &format!(
                "Signed:   WARNING: {} record(s) after {after} are not signed (a live log, or the log was cut)",
                v.unsigned_tail
            ),
        );
    }
    for r in &v.resumes {
        let first = r.line.saturating_sub(r.unsigned_records as usize);
        line(
            o,
            &format!(
                "Resumed:  line {}: the agent restarted after a crash; unsigned tail before resume: {} record(s), lines {}-{}, were unsigned while it was down",
                r.line,
                r.unsigned_records,
                first,
                r.line - 1
            ),
        );
    }
    line(
        o,
        "Not detectable from one log: a cut right after the final checkpoint of an earlier run of the agent (compare with the peer's log).",
    );
}

/// Who ran: each start (role, region, migration, version, certificate, TLS) and stop.
fn agents(o: &mut String, records: &[Record], v: &Verified) {
    section(o, "Agents");
    let mut any = false;
    for r in records.iter().filter(|r| r.event == events::AGENT_STARTED) {
        any = true;
        let d = &r.details;
        line(
            o,
            &format!(
                "  {}  started  role {}  region {}  migration {}  version {}",
                head(r),
                s(d, &["role"]),
                s(d, &["region"]),
                s(d, &["migration"]),
                s(d, &["version"])
            ),
        );
        let fp = v
            .agents
            .iter()
            .find(|a| a.line == r.line)
            .map_or_else(|| "-".to_string(), |a| a.fingerprint.clone());
        line(o, &format!("{PAD}certificate sha256 {fp}"));
        if d.contains_key("tls") {
            line(o, &format!("{PAD}TLS {}", tls(d)));
        }
    }
    for r in records.iter().filter(|r| r.event == events::AGENT_STOPPED) {
        any = true;
        let stop = match read::<AgentStopped>(&r.details) {
            Ok(a) if a.drained => "every forwarded connection drained".to_string(),
            Ok(a) => format!(
                "{} forwarded connection(s) cut at the drain limit",
                a.streams_cut
            ),
            Err(_) => "details not recorded".to_string(),
        };
        line(o, &format!("  {}  stopped  {stop}", head(r)));
    }
    none_if(o, any);
}

/// Whom they talked to: accepted handshakes (peer, TLS), refusals and failures.
fn handshakes(o: &mut String, records: &[Record]) {
    section(o, "Handshakes");
    let mut any = false;
    for r in records {
        let d = &r.details;
        match r.event.as_str() {
            events::HANDSHAKE_ACCEPTED => {
                line(
                    o,
                    &format!(
                        "  {}  accepted  address {}  peer role {}  region {}  migration {}",
                        head(r),
                        s(d, &["address"]),
                        first_of(d, &[&["peer", "role"], &["role"]]),
                        first_of(d, &[&["peer", "region"], &["region"]]),
                        first_of(d, &[&["peer", "migration"], &["migration"]]),
                    ),
                );
                line(
                    o,
                    &format!(
                        "{PAD}peer certificate {}",
                        first_of(
                            d,
                            &[
                                &["peer", "fingerprint"],
                                &["peer_fingerprint"],
                                &["fingerprint"]
                            ]
                        )
                    ),
                );
                line(o, &format!("{PAD}TLS {}", tls(d)));
            }
            events::HANDSHAKE_REFUSED => {
                line(
                    o,
                    &format!(
                        "  {}  REFUSED   address {}  check {}  peer certificate {}",
                        head(r),
                        s(d, &["address"]),
                        s(d, &["check"]),
                        first_of(
                            d,
                            &[
                                &["fingerprint"],
                                &["peer_fingerprint"],
                                &["peer", "fingerprint"]
                            ]
                        ),
                    ),
                );
                line(o, &format!("{PAD}reason: {}", s(d, &["reason"])));
            }
            events::HANDSHAKE_FAILED => {
                line(
                    o,
                    &format!("  {}  failed    address {}", head(r), s(d, &["address"])),
                );
                line(o, &format!("{PAD}reason: {}", s(d, &["reason"])));
            }
            _ => continue,
        }
        any = true;
    }
    none_if(o, any);
}

/// What went through: each forwarded stream's bytes raw and on the wire, digests and outcome; totals; refused streams.
fn streams(o: &mut String, records: &[Record]) {
    section(o, "Streams");
    let mut totals = [0u64; 4];
    let mut count = 0usize;
    let who = identified(records);
    for r in records.iter().filter(|r| r.event == events::STREAM_CLOSED) {
        let Ok(st) = parse_stream_closed(&r.details) else {
            continue; // cannot happen: verified
        };
        count += 1;
        line(
            o,
            &format!(
                "  {}  session {}  service {}  outcome {}  duration {} ms",
                head(r),
                st.session_id,
                st.service,
                st.outcome,
                st.duration_ms
            ),
        );
        if let Some(w) = who.get(st.session_id.as_str()) {
            line(o, &format!("{PAD}who       {w}"));
        }
        line(
            o,
            &format!(
                "{PAD}sent      {} raw, {} wire ({} of raw), {} chunk(s), blake3 {}",
                bytes(st.sent_raw_bytes),
                bytes(st.sent_wire_bytes),
                percent(st.sent_wire_bytes, st.sent_raw_bytes),
                st.sent_chunks,
                st.sent_digest
            ),
        );
        line(
            o,
            &format!(
                "{PAD}received  {} raw, {} wire ({} of raw), {} chunk(s), blake3 {}",
                bytes(st.received_raw_bytes),
                bytes(st.received_wire_bytes),
                percent(st.received_wire_bytes, st.received_raw_bytes),
                st.received_chunks,
                st.received_digest
            ),
        );
        if !st.detail.is_empty() {
            line(o, &format!("{PAD}detail: {}", st.detail));
        }
        for (t, x) in totals.iter_mut().zip([
            st.sent_raw_bytes,
            st.sent_wire_bytes,
            st.received_raw_bytes,
            st.received_wire_bytes,
        ]) {
            *t = t.saturating_add(x);
        }
    }
    if count == 0 {
        line(o, "  (none)");
    } else {
        line(
            o,
            &format!(
                "  total: {count} stream(s); sent {} raw, {} wire ({}); received {} raw, {} wire ({})",
                bytes(totals[0]),
                bytes(totals[1]),
                percent(totals[1], totals[0]),
                bytes(totals[2]),
                bytes(totals[3]),
                percent(totals[3], totals[2])
            ),
        );
    }
    let mut any = false;
    for r in records.iter().filter(|r| r.event == "stream_refused") {
        if !any {
            line(o, "  refused streams:");
            any = true;
        }
        line(
            o,
            &format!(
                "  {}  session {}  service {}  reason: {}",
                head(r),
                s(&r.details, &["session_id"]),
                s(&r.details, &["service"]),
                s(&r.details, &["reason"])
            ),
        );
    }
}

/// Chunks that failed their BLAKE3 check.
fn integrity_failures(o: &mut String, records: &[Record]) {
    section(o, "Integrity failures");
    let mut any = false;
    for r in records
        .iter()
        .filter(|r| r.event == events::INTEGRITY_FAILURE)
    {
        any = true;
        line(
            o,
            &format!(
                "  {}  session {}  service {}",
                head(r),
                s(&r.details, &["session_id"]),
                s(&r.details, &["service"])
            ),
        );
        line(o, &format!("{PAD}reason: {}", s(&r.details, &["reason"])));
        line(
            o,
            &format!(
                "{PAD}delivered before it: {} verified chunk(s), {}",
                s(&r.details, &["delivered_chunks"]),
                r.details
                    .get("delivered_bytes")
                    .and_then(Value::as_u64)
                    .map_or("-".to_string(), human_bytes)
            ),
        );
    }
    none_if(o, any);
}

/// Errors worth an auditor's attention.
fn errors(o: &mut String, records: &[Record]) {
    section(o, "Errors");
    let mut any = false;
    for r in records.iter().filter(|r| r.event == events::ERROR) {
        any = true;
        line(o, &format!("  {}  {}", head(r), words(&r.details)));
    }
    none_if(o, any);
}

/// Each QUIC connection's end: duration, streams, reason.
fn tunnel_sessions(o: &mut String, records: &[Record]) {
    section(o, "Tunnel sessions");
    let mut any = false;
    for r in records.iter().filter(|r| r.event == events::SESSION_ENDED) {
        any = true;
        let d = &r.details;
        line(
            o,
            &format!(
                "  {}  ended  address {}  peer certificate {}  duration {} ms  streams {}",
                head(r),
                s(d, &["address"]),
                first_of(d, &[&["peer_fingerprint"], &["peer", "fingerprint"]]),
                s(d, &["duration_ms"]),
                s(d, &["streams"])
            ),
        );
        line(o, &format!("{PAD}reason: {}", s(d, &["reason"])));
    }
    none_if(o, any);
}

/// What is signed: each checkpoint and what it covers.
fn checkpoints(o: &mut String, records: &[Record]) {
    section(o, "Checkpoints");
    let mut any = false;
    for r in records.iter().filter(|r| r.event == events::CHECKPOINT) {
        any = true;
        line(
            o,
            &format!(
                "  {}  signature valid  covers {} record(s)  signer {}",
                head(r),
                s(&r.details, &["records"]),
                s(&r.details, &["fingerprint"])
            ),
        );
    }
    none_if(o, any);
}

/// How many records of each event.
fn event_counts(o: &mut String, records: &[Record]) {
    section(o, "Event counts");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        *counts.entry(r.event.as_str()).or_default() += 1;
    }
    for (event, n) in counts {
        line(o, &format!("  {event:<20} {n}"));
    }
}

/// Who each PostgreSQL stream was (`stream_identified`, target logs), by session id.
fn identified(records: &[Record]) -> BTreeMap<&str, String> {
    records
        .iter()
        .filter(|r| r.event == StreamIdentified::NAME)
        .filter_map(|r| {
            let id = read::<StreamIdentified>(&r.details).ok()?;
            let session = r.details.get("session_id")?.as_str()?;
            Some((session, id.postgres.describe()))
        })
        .collect()
}

/// Indentation of a record's continuation lines: under its time stamp.
const PAD: &str = "             ";

fn line(o: &mut String, text: &str) {
    o.push_str(text);
    o.push('\n');
}

fn section(o: &mut String, title: &str) {
    let _ = write!(o, "\n{title}\n");
}

fn none_if(o: &mut String, any: bool) {
    if !any {
        line(o, "  (none)");
    }
}

/// `line 12    2026-11-24T11:35:22.123Z`.
fn head(r: &Record) -> String {
    format!("line {:<5} {}", r.line, r.time)
}

/// A detail by path, as text: strings bare, other values as JSON, `-` when absent.
fn s(d: &Map<String, Value>, path: &[&str]) -> String {
    lookup(d, path).map_or_else(|| "-".to_string(), text)
}

fn first_of(d: &Map<String, Value>, paths: &[&[&str]]) -> String {
    paths
        .iter()
        .find_map(|p| lookup(d, p))
        .map_or_else(|| "-".to_string(), text)
}

fn lookup<'a>(d: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = d.get(*first)?;
    for key in rest {
        v = v.as_object()?.get(*key)?;
    }
    (!v.is_null()).then_some(v)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A byte count for people, exact beside it when rounded: `83.00 MB (83000000 B)`.
fn bytes(n: u64) -> String {
    if n < 1000 {
        format!("{n} B")
    } else {
        format!("{} ({n} B)", human_bytes(n))
    }
}

/// Free-form details as `key: value; …` (strings unquoted, nested values compact).
fn words(d: &Map<String, Value>) -> String {
    d.iter()
        .map(|(k, v)| match v {
            Value::String(t) => format!("{k}: {t}"),
            other => format!("{k}: {other}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn tls(d: &Map<String, Value>) -> String {
    let alpn = match d
        .get("tls")
        .and_then(|t| t.get("alpn"))
        .and_then(Value::as_str)
    {
        Some(a) => format!(", ALPN {a}"),
        None => String::new(),
    };
    format!(
        "protocol {}, cipher suite {}, key exchange {}{alpn}",
        s(d, &["tls", "protocol"]),
        s(d, &["tls", "cipher_suite"]),
        s(d, &["tls", "kx_group"]),
    )
}

/// `wire` as a percentage of `raw` with one decimal, in integer arithmetic (the log holds no
/// floats, and neither does its report).
pub(crate) fn percent(wire: u64, raw: u64) -> String {
    if raw == 0 {
        return "n/a".to_string();
    }
    let per_mille = (u128::from(wire) * 1000 + u128::from(raw) / 2) / u128::from(raw);
    format!("{}.{} %", per_mille / 10, per_mille % 10)
}

/// The transfer record: what moved from which country to which, when, how much, under which
/// safeguards, and how the migration ended.
fn transfer_record(o: &mut String, t: &Transfer) {
    section(o, "Transfer record");
    line(o, &format!("  Migration:  {}", t.migration));
    for p in &t.parties {
        let host = if p.host.is_empty() {
            String::new()
        } else {
            format!(", host {}", p.host)
        };
        line(
            o,
            &format!(
                "  {:<10}  {} ({}){host}, certificate sha256 {}",
                format!("{}:", capitalise(&p.role)),
                p.country,
                p.country_code,
                p.fingerprint
            ),
        );
    }
    line(
        o,
        &format!("  Period:     {} to {} (UTC)", t.period_from, t.period_to),
    );
    let from = t.parties.iter().find(|p| p.role == "source");
    let to = t.parties.iter().find(|p| p.role == "target");
    if let (Some(f), Some(g)) = (from, to) {
        line(
            o,
            &format!(
                "  Direction:  {} ({}) → {} ({})",
                f.country,
                f.country_code,
                country_name(&g.country_code),
                g.country_code
            ),
        );
    }
    line(o, "  Volume (source → target, raw / on the wire; back):");
    if t.volume.is_empty() {
        line(o, "    (no streams)");
    }
    for v in &t.volume {
        let who = match (v.user.as_str(), v.database.as_str()) {
            _ if v.kind == AGENT_COPY => "the agents' file streams".to_string(),
            ("", _) => "client not identified".to_string(),
            (u, "") => format!("user {u}"),
            (u, d) => format!("user {u}, database {d}"),
        };
        line(
            o,
            &format!(
                "    {} {} ({}): {} stream(s), {} / {}; back {} / {}",
                v.service,
                who,
                v.kind,
                v.streams,
                human_bytes(v.source_to_target_raw_bytes),
                human_bytes(v.source_to_target_wire_bytes),
                human_bytes(v.target_to_source_raw_bytes),
                human_bytes(v.target_to_source_wire_bytes)
            ),
        );
    }
    line(
        o,
        &format!(
            "  Refusals:   {} handshake(s) refused, {} stream(s) refused",
            t.handshakes_refused, t.streams_refused
        ),
    );
    outcome(o, t);
    safeguards(o, t);
}

/// How the migration ended: phase, fence LSN, tables, downtime.
fn outcome(o: &mut String, t: &Transfer) {
    let m = &t.outcome;
    if m.phase.is_empty() {
        line(o, "  Outcome:    no migration recorded in these logs");
        return;
    }
    let state = if m.promoted {
        "PROMOTED: the new cluster took over"
    } else if m.rolled_back {
        "ROLLED BACK: the source stays the primary"
    } else {
        "in progress"
    };
    line(
        o,
        &format!("  Outcome:    {state} (last phase {})", m.phase),
    );
    if let Some(lsn) = &m.fence_lsn {
        line(o, &format!("              fence LSN {lsn}"));
    }
    if let Some(ms) = m.downtime_ms {
        line(o, &format!("              write downtime {ms} ms"));
    }
    let names = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    line(
        o,
        &format!(
            "              tables verified equal: {}",
            names(&m.tables_verified)
        ),
    );
    line(
        o,
        &format!(
            "              tables NOT verified: {}",
            names(&m.tables_not_verified)
        ),
    );
    if !m.tables_mismatched.is_empty() {
        line(
            o,
            &format!(
                "              tables DIFFERING: {}",
                names(&m.tables_mismatched)
            ),
        );
    }
}

/// The measures in force, in words an auditor can quote.
fn safeguards(o: &mut String, t: &Transfer) {
    let s = &t.safeguards;
    let revocation = match s.revocation_checking {
        Some(true) => "a revocation list re-read at every handshake",
        Some(false) => "no revocation list configured",
        None => "revocation checking not recorded",
    };
    let resumed = if s.resumptions > 0 {
        format!(
            "; {} time(s) a forwarded connection outlived a lost tunnel and was resumed where it stopped (longest gap {:.1} s), its bytes checked end to end as any other",
            s.resumptions,
            s.longest_resume_gap_ms as f64 / 1000.0
        )
    } else {
        String::new()
    };
    let chunks = if s.every_chunk_verified {
        format!("all {} chunks verified{resumed}", s.chunks)
    } else {
        format!(
            "{} INTEGRITY FAILURE(S) (the streams were reset)",
            s.integrity_failures
        )
    };
    let ca = match &s.ca_fingerprint {
        Some(fp) => format!("the migration's private CA (sha256 {fp}, checked)"),
        None => "the migration's private CA (pass --ca to check it)".to_string(),
    };
    line(
        o,
        &format!(
            "  Safeguards: {} with {} and {}; mutual certificate authentication from {ca}; \
             region policy ({}); {revocation}; every chunk carries a BLAKE3 digest checked before delivery ({chunks}); \
             the logs are hash-chained and signed ({} signed checkpoint(s)).",
            or_unknown(&s.tls_protocol),
            or_unknown(&s.cipher_suite),
            or_unknown(&s.key_exchange),
            s.allowed_regions.join("; "),
            s.signed_checkpoints
        ),
    );
}

/// Every migration event of both logs, in time order.
fn migration(o: &mut String, t: &Transfer) {
    section(o, "Migration");
    if t.migration_events.is_empty() {
        line(o, "  (none)");
    }
    for e in &t.migration_events {
        line(o, &format!("  {}  [{}] {}", e.time, e.agent, e.summary));
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(not recorded)"
    } else {
        s
    }
}
