//! Verification of one log: chain, signatures, per-event schemas; collects what the peer
//! comparison and the report need.

use std::fmt;
use std::io::{BufRead, Read};
use std::path::Path;

use base64::Engine as _;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::event;
use super::record::{
    events, find_float, hash_bytes, normalize_fingerprint, parse_time, record_hash, CertKey,
    Fields, CHECKPOINT_ALGORITHM, GENESIS_PREV, MAX_RECORD_BYTES,
};
use crate::identity::PeerIdentity;

/// What [`verify_reader`] accepts beyond a complete, signed log.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Accept records after the last checkpoint (a live log, or one whose agent crashed). They
    /// are counted in [`Verified::unsigned_tail`].
    pub allow_open: bool,
    /// DER of the migration's CA certificate: every `agent_started` certificate must carry a
    /// signature by this CA's key. Without it, any self-consistent log verifies.
    pub ca_der: Option<Vec<u8>>,
}

/// The first problem found, with its 1-based line (0: the log could not be read at all, or it
/// is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// 1-based line number; 0 when no line is to blame.
    pub line: usize,
    /// What is wrong, for an operator.
    pub reason: String,
}

impl VerifyError {
    fn at(line: usize, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for VerifyError {}

/// One `stream_closed` record: a forwarded connection as this agent saw it. "sent" is what this
/// agent sent into the tunnel, "received" what it took out of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// `details.session_id`, the same on both agents.
    pub session_id: String,
    /// `details.service`.
    pub service: String,
    /// `details.outcome`: `ok`, `integrity_failure`, `peer_reset`, … Only `ok` streams are
    /// compared with the peer.
    pub outcome: String,
    /// `details.detail` (empty if absent): why a stream did not end `ok`.
    pub detail: String,
    /// `details.sent.digest`: BLAKE3 of everything sent, hex.
    pub sent_digest: String,
    /// `details.received.digest`.
    pub received_digest: String,
    /// `details.sent.raw_bytes`: bytes before compression.
    pub sent_raw_bytes: u64,
    /// `details.received.raw_bytes`.
    pub received_raw_bytes: u64,
    /// `details.sent.wire_bytes`: payload bytes on the wire (after compression).
    pub sent_wire_bytes: u64,
    /// `details.received.wire_bytes`.
    pub received_wire_bytes: u64,
    /// `details.sent.chunks`.
    pub sent_chunks: u64,
    /// `details.received.chunks`.
    pub received_chunks: u64,
    /// `details.duration_ms`.
    pub duration_ms: u64,
    /// The record's `time`.
    pub time: String,
    /// 1-based line of the record.
    pub line: usize,
}

/// One `agent_started` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// `details.role`.
    pub role: String,
    /// `details.region`.
    pub region: String,
    /// SHA-256 of the embedded certificate, lowercase hex (`details.fingerprint` must agree).
    pub fingerprint: String,
    /// `details.migration`.
    pub migration: String,
    /// `details.version`.
    pub version: String,
    /// The record's `time`.
    pub time: String,
    /// 1-based line of the record.
    pub line: usize,
}

/// A `log_resumed` record: the agent restarted after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Line of the `log_resumed` record.
    pub line: usize,
    /// Records before it that no checkpoint had signed when the agent stopped (lines
    /// `line - unsigned_records .. line`). They are in the chain and covered by later
    /// checkpoints, but could have been rewritten while the agent was down.
    pub unsigned_records: u64,
}

/// How a run of the agent ended, as far as its log tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The run's `agent_stopped` record: the agent stopped cleanly at this time.
    Stopped {
        /// Line of `agent_stopped`.
        line: usize,
        /// Its time.
        time: OffsetDateTime,
    },
    /// The next run (or a `log_resumed`) follows without an `agent_stopped`: the agent crashed
    /// or was killed some time after this, its last record.
    Crashed {
        /// Line of the run's last record.
        line: usize,
        /// Its time.
        time: OffsetDateTime,
    },
    /// The log ends inside the run without an `agent_stopped`: the agent is still running, or
    /// it crashed and has not been restarted since.
    Open {
        /// Line of the log's last record.
        line: usize,
        /// Its time.
        time: OffsetDateTime,
    },
}

impl RunEnd {
    /// Line of the run's last record (`agent_stopped` for a clean stop).
    pub fn line(&self) -> usize {
        match *self {
            Self::Stopped { line, .. } | Self::Crashed { line, .. } | Self::Open { line, .. } => {
                line
            }
        }
    }
    /// Time of that record.
    pub fn time(&self) -> OffsetDateTime {
        match *self {
            Self::Stopped { time, .. } | Self::Crashed { time, .. } | Self::Open { time, .. } => {
                time
            }
        }
    }
}

/// One run of the agent: from an `agent_started` to the last record before the next run's
/// first (`log_resumed` or `agent_started`), or to the end of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Line of the run's `agent_started`.
    pub line: usize,
    /// Its time.
    pub start: OffsetDateTime,
    /// The run's certificate (SHA-256, lowercase hex).
    pub fingerprint: String,
    /// How the run ended.
    pub end: RunEnd,
}

/// A QUIC connection with the peer as this log records it: `handshake_accepted`, then
/// `session_ended` with the same address (and peer fingerprint, when the record names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSession {
    /// Line of `handshake_accepted`.
    pub line: usize,
    /// Its time.
    pub start: OffsetDateTime,
    /// `details.address`: the peer's UDP address.
    pub address: String,
    /// `details.peer.fingerprint`, in the log's form (lowercase hex).
    pub peer_fingerprint: String,
    /// This agent's certificate at the time: that of the run's `agent_started`.
    pub own_fingerprint: String,
    /// Index of the run in [`Verified::runs`].
    pub run: usize,
    /// Line and time of `session_ended`; `None` if the run ended first (crash, or still open).
    pub end: Option<(usize, OffsetDateTime)>,
    /// `details.streams` of `session_ended`: data streams the connection carried.
    pub streams: Option<u64>,
}

/// A handshake that did not complete on this side although the peer may have accepted it
/// (`handshake_failed` or `handshake_refused` naming the peer's certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeFailure {
    /// Line of the record.
    pub line: usize,
    /// Its time.
    pub time: OffsetDateTime,
    /// `details.fingerprint`, in the log's form.
    pub fingerprint: String,
}

/// A forwarded connection this agent saw begin (`stream_opened`, or `stream_refused` by the
/// source), whether or not it recorded its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSeen {
    /// `details.session_id`.
    pub session_id: String,
    /// Line of the record.
    pub line: usize,
    /// Its time.
    pub time: OffsetDateTime,
}

/// A log that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Number of records (lines).
    pub records: usize,
    /// Number of checkpoints, all with valid signatures.
    pub checkpoints: usize,
    /// Every `stream_closed` record, in log order.
    pub sessions: Vec<StreamSummary>,
    /// `time` of the first record.
    pub first_time: OffsetDateTime,
    /// `time` of the last record.
    pub last_time: OffsetDateTime,
    /// Every `agent_started` record, in log order.
    pub agents: Vec<AgentInfo>,
    /// Records after the last checkpoint (non-zero only with [`VerifyOptions::allow_open`]).
    pub unsigned_tail: usize,
    /// Line of the last checkpoint.
    pub last_checkpoint_line: Option<usize>,
    /// Restarts after a crash (unsigned tail before resume).
    pub resumes: Vec<Resume>,
    /// Number of `integrity_failure` records.
    pub integrity_failures: usize,
    /// The agent's runs, in log order (one per `agent_started`).
    pub runs: Vec<Run>,
    /// Every QUIC connection with the peer (`handshake_accepted`), in log order.
    pub tunnel_sessions: Vec<TunnelSession>,
    /// Handshakes that failed here and name the peer's certificate.
    pub handshake_failures: Vec<HandshakeFailure>,
    /// Every `stream_opened` and `stream_refused`, in log order.
    pub streams_seen: Vec<StreamSeen>,
}

/// Verifies a whole log read from `r`; the first problem is returned with its line.
pub fn verify_reader(r: impl BufRead, opts: &VerifyOptions) -> Result<Verified, VerifyError> {
    verify_records(r, opts, |_| ()).map(|(v, _)| v)
}

/// [`verify_reader`] on a file; a file that cannot be opened or read is reported as line 0.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<Verified, VerifyError> {
    let file = std::fs::File::open(path)
        .map_err(|e| VerifyError::at(0, format!("cannot open {}: {e}", path.display())))?;
    verify_reader(std::io::BufReader::new(file), opts)
}

/// A line that parsed and continues the chain, before its event is interpreted.
struct ParsedLine {
    seq: u64,
    hash: String,
    time_text: String,
    time: OffsetDateTime,
    event: String,
    details: Map<String, Value>,
}

/// A record that passed every check.
#[derive(Debug)]
pub(crate) struct Record {
    pub line: usize,
    pub time: String,
    pub event: String,
    pub details: Map<String, Value>,
}

/// Where the chain ends: what the writer needs to continue it.
#[derive(Debug)]
pub(crate) struct Tip {
    pub next_seq: u64,
    pub last_hash: String,
    /// Records after the last checkpoint.
    pub since_checkpoint: u64,
    pub last_checkpoint_seq: Option<u64>,
    /// The certificate of the most recent `agent_started`.
    pub current_cert: Option<CertKey>,
    /// Role and migration of the log's writer, from its first `agent_started`.
    pub identity: Option<LogIdentity>,
}

/// The one role and the one migration of a log, fixed by its first `agent_started`.
#[derive(Debug, Clone)]
pub(crate) struct LogIdentity {
    pub role: String,
    pub migration: String,
    /// Line of the first `agent_started`.
    pub line: usize,
}

/// Verifies and hands every record to `visit` (the report keeps them; verify drops them).
pub(crate) fn verify_records(
    mut r: impl BufRead,
    opts: &VerifyOptions,
    mut visit: impl FnMut(Record),
) -> Result<(Verified, Tip), VerifyError> {
    let mut v = Verifier::new(opts)?;
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let n = (&mut r)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| VerifyError::at(0, format!("read error after line {line}: {e}")))?;
        if n == 0 {
            break;
        }
        line += 1;
        if buf.last() != Some(&b'\n') {
            return Err(VerifyError::at(
                line,
                if buf.len() > MAX_RECORD_BYTES {
                    format!("line longer than {MAX_RECORD_BYTES} bytes")
                } else {
                    "incomplete last line (no newline at the end): the log was cut in the middle of a write".into()
                },
            ));
        }
        buf.pop();
        visit(v.feed(line, &buf)?);
    }
    v.finish()
}

/// The chain state between lines.
struct Verifier {
    allow_open: bool,
    ca: Option<Vec<u8>>,
    next_seq: u64,
    last_hash: String,
    since_checkpoint: u64,
    last_checkpoint: Option<(usize, u64)>,
    /// Most recent `agent_started` certificate and its line.
    current_cert: Option<(CertKey, usize)>,
    first_time: Option<OffsetDateTime>,
    last_time: Option<OffsetDateTime>,
    checkpoints: usize,
    sessions: Vec<StreamSummary>,
    agents: Vec<AgentInfo>,
    resumes: Vec<Resume>,
    integrity_failures: usize,
    /// Event of the previous record (what a checkpoint signs).
    prev_event: String,
    /// Whether the last checkpoint so far signs an `agent_stopped` record.
    closed_by_stop: bool,
    /// Role and migration of the log, from its first `agent_started`.
    identity: Option<LogIdentity>,
    /// What the most recent `agent_started` certificate says about its holder.
    signer: Option<CertIdentity>,
    /// Records before the first `agent_started` that name a role, region or migration: held to
    /// the certificate of that `agent_started` (its key signs the checkpoint covering them).
    unbound: Vec<SelfDescription>,
    runs: Vec<Run>,
    /// The current run's last record and whether it was `agent_stopped`.
    run_last: Option<(usize, OffsetDateTime)>,
    run_stopped: Option<(usize, OffsetDateTime)>,
    /// Whether records since the last run began belong to it (false after a `log_resumed`).
    in_run: bool,
    tunnel_sessions: Vec<TunnelSession>,
    handshake_failures: Vec<HandshakeFailure>,
    streams_seen: Vec<StreamSeen>,
}

/// The identity URI SANs of an `agent_started` certificate.
#[derive(Debug, Clone)]
struct CertIdentity {
    role: String,
    region: String,
    migration: String,
    fingerprint: String,
    line: usize,
}

/// The `role`, `region` and `migration` a record's details state about its writer.
#[derive(Debug)]
struct SelfDescription {
    line: usize,
    event: String,
    fields: Vec<(&'static str, String)>,
}

/// Top-level `details.role`, `details.region`, `details.migration` strings: what a record says
/// about the agent that wrote it (`agent_started` does; `handshake_accepted` names the peer's
/// under `details.peer`, which is not the writer's).
pub(crate) fn self_description(details: &Map<String, Value>) -> Vec<(&'static str, String)> {
    ["role", "region", "migration"]
        .into_iter()
        .filter_map(|k| Some((k, details.get(k)?.as_str()?.to_string())))
        .collect()
}

const RECORD_KEYS: [&str; 6] = ["details", "event", "hash", "prev", "seq", "time"];

impl Verifier {
    fn new(opts: &VerifyOptions) -> Result<Self, VerifyError> {
        if let Some(ca) = &opts.ca_der {
            x509_parser::parse_x509_certificate(ca).map_err(|e| {
                VerifyError::at(0, format!("the CA certificate cannot be parsed: {e}"))
            })?;
        }
        Ok(Self {
            allow_open: opts.allow_open,
            ca: opts.ca_der.clone(),
            next_seq: 0,
            last_hash: GENESIS_PREV.to_string(),
            since_checkpoint: 0,
            last_checkpoint: None,
            current_cert: None,
            first_time: None,
            last_time: None,
            checkpoints: 0,
            sessions: Vec::new(),
            agents: Vec::new(),
            resumes: Vec::new(),
            integrity_failures: 0,
            prev_event: String::new(),
            closed_by_stop: false,
            identity: None,
            signer: None,
            unbound: Vec::new(),
            runs: Vec::new(),
            run_last: None,
            run_stopped: None,
            in_run: false,
            tunnel_sessions: Vec::new(),
            handshake_failures: Vec::new(),
            streams_seen: Vec::new(),
        })
    }

    /// Checks one line (syntax, chain, its event's schema and claims) and takes what the peer
    /// comparison and the report need from it.
    fn feed(&mut self, line: usize, bytes: &[u8]) -> Result<Record, VerifyError> {
        let r = self.parse_line(line, bytes)?;
        if r.event == events::AGENT_STARTED || r.event == events::LOG_RESUMED {
            // A new process: whatever the previous run wrote last is where it ended.
            self.end_run(false);
        }
        self.interpret(line, r.seq, &r)?;
        if r.event != events::AGENT_STARTED && r.event != events::CHECKPOINT {
            self.check_writer_claims(line, &r.event, &r.details)?;
        }
        self.advance(line, r.seq, &r.event, r.hash, r.time);
        Ok(Record {
            line,
            time: r.time_text,
            event: r.event,
            details: r.details,
        })
    }

    /// One line as a record: UTF-8, canonical JSON without floats, the six fields, `seq` and
    /// `prev` continuing the chain, `hash` matching.
    fn parse_line(&self, line: usize, bytes: &[u8]) -> Result<ParsedLine, VerifyError> {
        let err = |reason: String| VerifyError::at(line, reason);
        let text = std::str::from_utf8(bytes).map_err(|_| err("not valid UTF-8".into()))?;
        if text.is_empty() {
            return Err(err("empty line".into()));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            let msg = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(m, _)| m);
            err(format!("invalid JSON at column {}: {msg}", e.column()))
        })?;
        if let Some(at) = find_float(&value) {
            return Err(err(format!(
                "the number at {at} is not an integer (the log never contains floats)"
            )));
        }
        let canonical = value.to_string();
        if canonical != text {
            return Err(err(
                "not in canonical form (sorted keys, no whitespace, no duplicate keys): the line was edited".into(),
            ));
        }
        let Value::Object(mut map) = value else {
            return Err(err("not a JSON object".into()));
        };
        for key in RECORD_KEYS {
            if !map.contains_key(key) {
                return Err(err(format!("missing field {key}")));
            }
        }
        if let Some(extra) = map.keys().find(|k| !RECORD_KEYS.contains(&k.as_str())) {
            return Err(err(format!("unexpected field {extra}")));
        }
        let top = Fields::new(&map, "");
        let seq = top.u64("seq").map_err(err)?;
        let prev = top.hash_hex("prev").map_err(err)?;
        let hash = top.hash_hex("hash").map_err(err)?.to_string();
        let time_text = top.str("time").map_err(err)?.to_string();
        let time = parse_time(&time_text).ok_or_else(|| {
            err(format!(
                "field time {time_text:?} is not RFC 3339 UTC with milliseconds"
            ))
        })?;
        let event = top.str("event").map_err(err)?.to_string();
        if event.is_empty() {
            return Err(err("field event is empty".into()));
        }
        top.object("details").map_err(err)?;
        self.check_chain(line, seq, prev)?;
        map.remove("hash");
        if record_hash(&map) != hash {
            return Err(err("hash mismatch (record was modified)".into()));
        }
        let Some(Value::Object(details)) = map.remove("details") else {
            return Err(err("field details must be an object".into()));
        };
        Ok(ParsedLine {
            seq,
            hash,
            time_text,
            time,
            event,
            details,
        })
    }

    /// `seq` and `prev` continue the chain.
    fn check_chain(&self, line: usize, seq: u64, prev: &str) -> Result<(), VerifyError> {
        if seq != self.next_seq {
            return Err(VerifyError::at(
                line,
                format!(
                    "seq {seq}, expected {} (a line was deleted, inserted or moved)",
                    self.next_seq
                ),
            ));
        }
        if prev != self.last_hash {
            return Err(VerifyError::at(
                line,
                if line == 1 {
                    "prev of the first record must be 64 zeros (the start of the log is missing)"
                        .into()
                } else {
                    format!(
                        "prev does not match the hash of line {} (a line was deleted, inserted or moved)",
                        line - 1
                    )
                },
            ));
        }
        Ok(())
    }

    /// What each event the verifier knows means: runs, checkpoints, resumes, streams, tunnel
    /// sessions, refusals.
    fn interpret(&mut self, line: usize, seq: u64, r: &ParsedLine) -> Result<(), VerifyError> {
        let err = |reason: String| VerifyError::at(line, reason);
        let (details, time) = (&r.details, r.time);
        match r.event.as_str() {
            events::AGENT_STARTED => self.agent_started(line, &r.time_text, time, details)?,
            events::CHECKPOINT => self.checkpoint(line, seq, details)?,
            events::LOG_RESUMED => {
                let unsigned = parse_log_resumed(details).map_err(err)?;
                if unsigned != self.since_checkpoint {
                    return Err(err(format!(
                        "log_resumed counts {unsigned} unsigned records, but {} records follow the last checkpoint",
                        self.since_checkpoint
                    )));
                }
                self.resumes.push(Resume {
                    line,
                    unsigned_records: unsigned,
                });
            }
            events::STREAM_CLOSED => {
                let mut s = parse_stream_closed(details).map_err(err)?;
                s.line = line;
                s.time.clone_from(&r.time_text);
                self.sessions.push(s);
            }
            events::INTEGRITY_FAILURE => self.integrity_failures += 1,
            events::HANDSHAKE_ACCEPTED => {
                let accepted: event::HandshakeAccepted = event::read(details).map_err(err)?;
                self.handshake_accepted(line, time, accepted);
            }
            events::SESSION_ENDED => {
                let ended: event::SessionEnded = event::read(details).map_err(err)?;
                self.session_ended(line, time, &ended);
            }
            events::HANDSHAKE_FAILED | events::HANDSHAKE_REFUSED => {
                let problem: event::HandshakeProblem = event::read(details).unwrap_or_default();
                let named = problem
                    .fingerprint
                    .map(|f| normalize_fingerprint(&f))
                    .filter(|f| super::record::is_hash_hex(f));
                if let Some(fingerprint) = named {
                    self.handshake_failures.push(HandshakeFailure {
                        line,
                        time,
                        fingerprint,
                    });
                }
            }
            events::STREAM_OPENED | events::STREAM_REFUSED => {
                let session_id = stream_session_id(&r.event, details).map_err(err)?;
                self.streams_seen.push(StreamSeen {
                    session_id,
                    line,
                    time,
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// A tunnel session of the current run begins.
    fn handshake_accepted(
        &mut self,
        line: usize,
        start: OffsetDateTime,
        accepted: event::HandshakeAccepted,
    ) {
        if !self.in_run {
            return;
        }
        let run = self.runs.len() - 1;
        self.tunnel_sessions.push(TunnelSession {
            line,
            start,
            address: accepted.address,
            peer_fingerprint: normalize_fingerprint(&accepted.peer.fingerprint),
            own_fingerprint: self.runs[run].fingerprint.clone(),
            run,
            end: None,
            streams: None,
        });
    }

    /// A record that names its writer's role, region or migration must agree with the signing
    /// certificate (checked when the signer is known, else kept until it is).
    fn check_writer_claims(
        &mut self,
        line: usize,
        event: &str,
        details: &Map<String, Value>,
    ) -> Result<(), VerifyError> {
        let fields = self_description(details);
        if fields.is_empty() {
            return Ok(());
        }
        let d = SelfDescription {
            line,
            event: event.to_string(),
            fields,
        };
        match &self.signer {
            Some(signer) => check_self_description(&d, signer)?,
            None => self.unbound.push(d),
        }
        Ok(())
    }

    /// Moves the chain past this record.
    fn advance(&mut self, line: usize, seq: u64, event: &str, hash: String, time: OffsetDateTime) {
        if self.in_run {
            self.run_last = Some((line, time));
            if event == events::AGENT_STOPPED {
                self.run_stopped = Some((line, time));
            }
        }
        if event == events::CHECKPOINT {
            self.closed_by_stop = self.prev_event == events::AGENT_STOPPED;
            self.since_checkpoint = 0;
            self.last_checkpoint = Some((line, seq));
        } else {
            self.since_checkpoint += 1;
        }
        self.next_seq += 1;
        self.prev_event = event.to_string();
        self.last_hash = hash;
        self.first_time.get_or_insert(time);
        self.last_time = Some(time);
    }

    fn agent_started(
        &mut self,
        line: usize,
        time: &str,
        at: OffsetDateTime,
        details: &Map<String, Value>,
    ) -> Result<(), VerifyError> {
        let err = |reason: String| VerifyError::at(line, reason);
        let a = parse_agent_started(details).map_err(err)?;
        // One writer per log: its first agent_started fixes the role and the migration, and a
        // certificate renewal (new fingerprint, same role and migration) is the only change.
        match &self.identity {
            None => {
                self.identity = Some(LogIdentity {
                    role: a.role.clone(),
                    migration: a.migration.clone(),
                    line,
                })
            }
            Some(id) => {
                if a.role != id.role {
                    return Err(err(format!(
                        "agent_started for role {}, but this log belongs to the {} agent (agent_started at line {}): a log has one writer, so one role",
                        a.role, id.role, id.line
                    )));
                }
                if a.migration != id.migration {
                    return Err(err(format!(
                        "agent_started for migration {}, but this log belongs to migration {} (agent_started at line {}): a log has one migration",
                        a.migration, id.migration, id.line
                    )));
                }
            }
        }
        let signer = CertIdentity {
            role: a.role.clone(),
            region: a.region.clone(),
            migration: a.migration.clone(),
            fingerprint: a.cert.fingerprint.clone(),
            line,
        };
        for d in std::mem::take(&mut self.unbound) {
            check_self_description(&d, &signer)?;
        }
        self.signer = Some(signer);
        self.runs.push(Run {
            line,
            start: at,
            fingerprint: a.cert.fingerprint.clone(),
            end: RunEnd::Open { line, time: at },
        });
        self.in_run = true;
        if let Some(ca_der) = &self.ca {
            // Both parsed before: `new` checked the CA, `parse_agent_started` the certificate.
            let parsed = x509_parser::parse_x509_certificate(ca_der).and_then(|(_, ca)| {
                x509_parser::parse_x509_certificate(&a.cert.der).map(|(_, c)| (ca, c))
            });
            let signed =
                parsed.is_ok_and(|(ca, cert)| cert.verify_signature(Some(ca.public_key())).is_ok());
            if !signed {
                return Err(VerifyError::at(
                    line,
                    format!(
                        "the agent's certificate {} is not signed by the given CA",
                        a.cert.fingerprint
                    ),
                ));
            }
        }
        self.agents.push(AgentInfo {
            role: a.role,
            region: a.region,
            fingerprint: a.cert.fingerprint.clone(),
            migration: a.migration,
            version: a.version,
            time: time.to_string(),
            line,
        });
        self.current_cert = Some((a.cert, line));
        Ok(())
    }

    fn checkpoint(
        &mut self,
        line: usize,
        seq: u64,
        details: &Map<String, Value>,
    ) -> Result<(), VerifyError> {
        let err = |reason: String| VerifyError::at(line, reason);
        let c = parse_checkpoint(details).map_err(err)?;
        if c.signed_hash != self.last_hash {
            return Err(err(
                "checkpoint signed_hash is not the hash of the record before it".into(),
            ));
        }
        if c.records != seq {
            return Err(err(format!(
                "checkpoint claims to cover {} records, but {seq} records precede it",
                c.records
            )));
        }
        let Some((cert, cert_line)) = &self.current_cert else {
            return Err(err(
                "checkpoint without a preceding agent_started certificate to verify it with".into(),
            ));
        };
        if normalize_fingerprint(&c.fingerprint) != cert.fingerprint {
            return Err(err(format!(
                "checkpoint fingerprint {} is not that of the certificate in the agent_started at line {cert_line} ({})",
                c.fingerprint, cert.fingerprint
            )));
        }
        let signed = hash_bytes(&c.signed_hash).expect("checked as 64 hex digits");
        if !cert.verify(&signed, &c.signature) {
            return Err(err(format!(
                "checkpoint signature invalid (not made with the key of the certificate in the agent_started at line {cert_line})"
            )));
        }
        self.checkpoints += 1;
        Ok(())
    }

    /// Closes the current run: `Stopped` if it wrote `agent_stopped`, else `Crashed` (another
    /// process follows) or `Open` (the log ends here).
    fn end_run(&mut self, log_ends: bool) {
        if !self.in_run {
            return;
        }
        self.in_run = false;
        let (Some(run), Some((line, time))) = (self.runs.last_mut(), self.run_last.take()) else {
            return;
        };
        run.end = match (self.run_stopped.take(), log_ends) {
            (Some((line, time)), _) => RunEnd::Stopped { line, time },
            (None, false) => RunEnd::Crashed { line, time },
            (None, true) => RunEnd::Open { line, time },
        };
    }

    /// Pairs a `session_ended` with the earliest open session of this run to the same address.
    fn session_ended(&mut self, line: usize, time: OffsetDateTime, ended: &event::SessionEnded) {
        let Some(run) = self.in_run.then(|| self.runs.len() - 1) else {
            return;
        };
        let peer = ended.peer_fingerprint.as_deref().map(normalize_fingerprint);
        if let Some(s) = self.tunnel_sessions.iter_mut().find(|s| {
            s.run == run
                && s.end.is_none()
                && s.address == ended.address
                && peer.as_ref().is_none_or(|p| *p == s.peer_fingerprint)
        }) {
            s.end = Some((line, time));
            s.streams = ended.streams;
        }
    }

    fn finish(mut self) -> Result<(Verified, Tip), VerifyError> {
        self.end_run(true);
        let (Some(first_time), Some(last_time)) = (self.first_time, self.last_time) else {
            return Err(VerifyError::at(0, "the log is empty (no records)"));
        };
        let records = self.next_seq as usize;
        let tail = self.since_checkpoint as usize;
        if tail > 0 && !self.allow_open {
            let how =
                "the log was cut or the agent is still running (use --allow-open for a live log)";
            let (records, are) = if tail == 1 {
                ("1 record".to_string(), "is")
            } else {
                (format!("{tail} records"), "are")
            };
            return Err(match self.last_checkpoint {
                Some((cp_line, _)) => VerifyError::at(
                    cp_line + 1,
                    format!(
                        "{records} after the last checkpoint at line {cp_line} {are} not signed: {how}"
                    ),
                ),
                None => VerifyError::at(
                    1,
                    format!("{records} {are} not signed (the log has no checkpoint): {how}"),
                ),
            });
        }
        if !self.allow_open && !self.closed_by_stop {
            // A closed log ends with the checkpoint after `agent_stopped`. Anything else was
            // cut (possibly right after an earlier checkpoint, which the chain alone cannot
            // reveal) or is still being written.
            let line = self.last_checkpoint.map_or(records, |(l, _)| l);
            return Err(VerifyError::at(
                line,
                format!(
                    "the log ends with a checkpoint that does not follow agent_stopped: it was cut after line {line}, or the agent is still running or crashed (use --allow-open for a live log)"
                ),
            ));
        }
        let verified = Verified {
            records,
            checkpoints: self.checkpoints,
            sessions: self.sessions,
            first_time,
            last_time,
            agents: self.agents,
            unsigned_tail: tail,
            last_checkpoint_line: self.last_checkpoint.map(|(l, _)| l),
            resumes: self.resumes,
            integrity_failures: self.integrity_failures,
            runs: self.runs,
            tunnel_sessions: self.tunnel_sessions,
            handshake_failures: self.handshake_failures,
            streams_seen: self.streams_seen,
        };
        let tip = Tip {
            next_seq: self.next_seq,
            last_hash: self.last_hash,
            since_checkpoint: self.since_checkpoint,
            last_checkpoint_seq: self.last_checkpoint.map(|(_, s)| s),
            current_cert: self.current_cert.map(|(c, _)| c),
            identity: self.identity,
        };
        Ok((verified, tip))
    }
}

/// Checks the details of the events the verifier interprets; the writer runs the same checks so
/// that it can never write a record the verifier rejects.
pub(crate) fn check_event_details(name: &str, details: &Map<String, Value>) -> Result<(), String> {
    match name {
        events::AGENT_STARTED => parse_agent_started(details).map(drop),
        events::STREAM_CLOSED => parse_stream_closed(details).map(drop),
        events::CHECKPOINT => parse_checkpoint(details).map(drop),
        events::LOG_RESUMED => parse_log_resumed(details).map(drop),
        events::HANDSHAKE_ACCEPTED => event::read::<event::HandshakeAccepted>(details).map(drop),
        events::SESSION_ENDED => event::read::<event::SessionEnded>(details).map(drop),
        events::STREAM_OPENED | events::STREAM_REFUSED => {
            stream_session_id(name, details).map(drop)
        }
        _ => Ok(()),
    }
}

pub(crate) struct AgentStarted {
    pub cert: CertKey,
    pub role: String,
    pub region: String,
    pub migration: String,
    pub version: String,
}

pub(crate) fn parse_agent_started(details: &Map<String, Value>) -> Result<AgentStarted, String> {
    let e: event::AgentStarted = event::read(details)?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(&e.certificate)
        .map_err(|_| "field details.certificate is not base64".to_string())?;
    let cert = CertKey::parse(&der).map_err(|e| format!("details.certificate: {e}"))?;
    if normalize_fingerprint(&e.fingerprint) != cert.fingerprint {
        return Err(format!(
            "details.fingerprint {} is not the SHA-256 of details.certificate ({})",
            e.fingerprint, cert.fingerprint
        ));
    }
    let started = AgentStarted {
        role: e.role,
        region: e.region,
        migration: e.migration,
        version: e.version,
        cert,
    };
    // The record speaks for the certificate whose key signs the checkpoints after it, so it
    // must say what that certificate says: otherwise one agent's key could write a run that
    // claims to be the other agent's.
    let id = PeerIdentity::from_der(&started.cert.der).map_err(|e| {
        format!(
            "the certificate in details.certificate ({}) is not a pgferry agent certificate: {e}",
            started.cert.fingerprint
        )
    })?;
    for (field, claimed, certified) in [
        ("role", &started.role, id.role.as_str()),
        ("region", &started.region, id.region.as_str()),
        ("migration", &started.migration, id.migration.as_str()),
    ] {
        if claimed != certified {
            return Err(format!(
                "details.{field} is {claimed:?}, but the certificate in details.certificate ({}) is issued for {field} {certified:?}: a record must match the certificate that signs it",
                started.cert.fingerprint
            ));
        }
    }
    Ok(started)
}

/// The writer's identity as an `agent_started` certificate states it, for the writer's checks.
pub(crate) fn certificate_identity(der: &[u8]) -> Option<(String, String, String)> {
    let id = PeerIdentity::from_der(der).ok()?;
    Some((
        id.role.as_str().to_string(),
        id.region.as_str().to_string(),
        id.migration.as_str().to_string(),
    ))
}

fn check_self_description(d: &SelfDescription, signer: &CertIdentity) -> Result<(), VerifyError> {
    for (field, value) in &d.fields {
        let certified = match *field {
            "role" => &signer.role,
            "region" => &signer.region,
            _ => &signer.migration,
        };
        if value != certified {
            return Err(VerifyError::at(
                d.line,
                format!(
                    "{} names {field} {value:?}, but the certificate {} (agent_started at line {}) whose key signs it is issued for {field} {certified:?}",
                    d.event, signer.fingerprint, signer.line
                ),
            ));
        }
    }
    Ok(())
}

/// The `session_id` of a `stream_opened` or `stream_refused`.
fn stream_session_id(name: &str, details: &Map<String, Value>) -> Result<String, String> {
    if name == events::STREAM_REFUSED {
        event::read::<event::StreamRefused>(details).map(|e| e.session_id)
    } else {
        event::read::<event::StreamOpened>(details).map(|e| e.session_id)
    }
}

pub(crate) fn parse_stream_closed(details: &Map<String, Value>) -> Result<StreamSummary, String> {
    let e: event::StreamClosed = event::read(details)?;
    Ok(StreamSummary {
        session_id: e.session_id,
        service: e.service,
        outcome: e.outcome,
        detail: e.detail,
        sent_digest: e.sent.digest.0,
        received_digest: e.received.digest.0,
        sent_raw_bytes: e.sent.raw_bytes,
        received_raw_bytes: e.received.raw_bytes,
        sent_wire_bytes: e.sent.wire_bytes,
        received_wire_bytes: e.received.wire_bytes,
        sent_chunks: e.sent.chunks,
        received_chunks: e.received.chunks,
        duration_ms: e.duration_ms,
        time: String::new(),
        line: 0,
    })
}

pub(crate) struct Checkpoint {
    pub signed_hash: String,
    pub signature: Vec<u8>,
    pub fingerprint: String,
    pub records: u64,
}

pub(crate) fn parse_checkpoint(details: &Map<String, Value>) -> Result<Checkpoint, String> {
    const KEYS: [&str; 5] = [
        "algorithm",
        "fingerprint",
        "records",
        "signature",
        "signed_hash",
    ];
    // Strict: the checkpoint's own fields are only covered by the next checkpoint, so leave no
    // room for extra content in the last one.
    if let Some(extra) = details.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unexpected field details.{extra} in a checkpoint"));
    }
    let f = Fields::new(details, "details.");
    let algorithm = f.str("algorithm")?;
    if algorithm != CHECKPOINT_ALGORITHM {
        return Err(format!(
            "checkpoint algorithm {algorithm:?} is not {CHECKPOINT_ALGORITHM:?}"
        ));
    }
    Ok(Checkpoint {
        signed_hash: f.hash_hex("signed_hash")?.to_string(),
        signature: base64::engine::general_purpose::STANDARD
            .decode(f.str("signature")?)
            .map_err(|_| "field details.signature is not base64".to_string())?,
        fingerprint: f.str("fingerprint")?.to_string(),
        records: f.u64("records")?,
    })
}

fn parse_log_resumed(details: &Map<String, Value>) -> Result<u64, String> {
    event::read::<event::LogResumed>(details).map(|e| e.unsigned_records)
}
