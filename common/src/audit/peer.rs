//! The peer check: both agents log every tunnel session and every forwarded connection, so the
//! two logs must describe the same sessions, and what one agent sent must be what the other
//! received.
//!
//! ```text
//!   log A (e.g. target)                           log B (e.g. source)
//!   handshake_accepted peer = B's certificate ◄─► handshake_accepted peer = A's certificate
//!   stream_closed session 42                      stream_closed session 42
//!     sent.digest      ───────── must equal ─────────► received.digest
//!     received.digest  ◄──────── must equal ────────── sent.digest
//! ```
//!
//! # Present in one log only
//!
//! A record of one log that the other log lacks is an error, unless the other agent could not
//! have recorded it. The records compared, and when each side records them:
//!
//! - a **tunnel session** (`handshake_accepted` … `session_ended`): both agents record
//!   `handshake_accepted`, naming the other's certificate, within moments of each other. Two
//!   sessions match when each names the other's run certificate and their lifetimes overlap
//!   (± [`PEER_CLOCK_SLACK_MS`]); matching is one to one.
//! - a **stream that ended `ok`** (`stream_closed`, outcome `ok`): both ends exchanged their
//!   FINs, so both agents handled it and both record it (`stream_opened` when it began,
//!   `stream_closed` when it ended), under the same `session_id`.
//!
//! The other agent (say B) could not have recorded a record of A's at time `t` (A's clock;
//! the stream's start for a stream) in these windows, all widened by [`PEER_CLOCK_SLACK_MS`]
//! for the clocks of two hosts and the moment between the two agents' records:
//!
//! 1. before B's first `agent_started` (B's agent was not up, or B's log is a newer file);
//! 2. from the last record of a run of B that ended without `agent_stopped` (crash, kill) to
//!    the `agent_started` of B's next run;
//! 3. after B's last record, if B's log does not end with `agent_stopped` (B's agent is still
//!    running, or crashed and was not restarted): only `--allow-open` accepts such a log.
//!
//! Everywhere else B's log says its agent was running, or had stopped cleanly, so a session or
//! an ok stream A has and B lacks fails the comparison: this is what reveals a later run cut
//! from the end of B's log (B ends with `agent_stopped`, A records sessions with B's
//! certificate after it), a run written under a certificate that B's log never started with,
//! and a session or stream B's log omits. Tolerated as well, because the other side may never
//! have seen them: a stream that did not end `ok` (a tunnel that failed before the peer read
//! the stream's header), a stream the other log saw begin but not end (its agent stopped or
//! crashed first), and a session that carried no stream while the other log records a failed
//! handshake with this agent's certificate during it (the listener sent HelloAck, the dialer
//! never got it). Tolerated records are counted in [`PeerComparison`].

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;

use time::{Duration, OffsetDateTime};

use super::record::{format_time, normalize_fingerprint};
use super::verify::{RunEnd, StreamSummary, TunnelSession, Verified};

/// Tolerance when comparing times of the two logs: the clock skew preflight allows between
/// the hosts ([`crate::preflight::MAX_CLOCK_SKEW_MS`], 2 s) plus 3 s between the two agents
/// recording the same event (a stream's FINs cross within a round trip, a Hello exchange
/// within its own round trips).
pub const PEER_CLOCK_SLACK_MS: i64 = crate::preflight::MAX_CLOCK_SKEW_MS as i64 + 3_000;

/// Most one-sided records a [`PeerMismatch::Missing`] lists one by one.
const MISSING_LISTED: usize = 10;

/// Outcome of a successful [`compare_peer`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerComparison {
    /// Name of the first log (its path, for messages).
    pub a_name: String,
    /// Name of the second log.
    pub b_name: String,
    /// Streams present in both logs, `ok` in both, whose figures agree.
    pub compared: usize,
    /// Streams in both logs where at least one side did not end `ok` (not compared).
    pub not_ok: usize,
    /// Streams one log closed that the other saw begin but not end (not compared).
    pub unfinished: usize,
    /// Tunnel sessions present in both logs.
    pub tunnel_sessions: usize,
    /// Records (sessions, streams) only log A has, all in a window where B's agent could not
    /// have recorded them, or that B may never have seen (see the module docs).
    pub only_in_a: usize,
    /// Records only log B has, likewise.
    pub only_in_b: usize,
}

impl fmt::Display for PeerComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tunnel session(s) in both logs; {} stream(s) agree in both directions; not compared: {} not ok on one side, {} whose end only one side recorded; tolerated in one log only (the other agent was down or never saw them): {} in {}, {} in {}",
            self.tunnel_sessions,
            self.compared,
            self.not_ok,
            self.unfinished,
            self.only_in_a,
            self.a_name,
            self.only_in_b,
            self.b_name
        )
    }
}

/// Which way the data flowed in a mismatching stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDirection {
    /// Sent by log A's agent, received by log B's.
    AToB,
    /// Sent by log B's agent, received by log A's.
    BToA,
}

/// The first disagreement between two logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMismatch {
    /// The logs cannot be from the two ends of one tunnel.
    NotPeers {
        /// Why not.
        reason: String,
    },
    /// One direction of one stream differs.
    Stream(Box<StreamMismatch>),
    /// Sessions or streams that one log has and the other lacks, outside every window in
    /// which the other agent could not have recorded them.
    Missing(Vec<MissingRecord>),
}

/// The figures of a stream direction on which two logs disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMismatch {
    /// The session.
    pub session_id: String,
    /// Which direction.
    pub direction: PeerDirection,
    /// The first figure that differs: `digest`, `raw_bytes`, `wire_bytes` or `chunks`.
    pub field: &'static str,
    /// That figure on the sending side.
    pub sent_value: String,
    /// That figure on the receiving side.
    pub received_value: String,
    /// The sender's digest of the direction.
    pub sent_digest: String,
    /// The receiver's digest of the direction.
    pub received_digest: String,
    /// Line of the `stream_closed` record in log A.
    pub a_line: usize,
    /// Line of the `stream_closed` record in log B.
    pub b_line: usize,
    /// Name of log A.
    pub a_name: String,
    /// Name of log B.
    pub b_name: String,
}

/// What a one-sided record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingKind {
    /// A tunnel session (`handshake_accepted`) with the peer certificate named.
    TunnelSession {
        /// The certificate the present log's agent saw on the other end.
        peer_fingerprint: String,
    },
    /// A stream that ended `ok`.
    Stream {
        /// Its `session_id`.
        session_id: String,
        /// Its service.
        service: String,
    },
}

/// A record present in one log only, where the other log should have one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingRecord {
    /// Name of the log that has the record.
    pub present_in: String,
    /// Its line there.
    pub line: usize,
    /// Its time there (for a stream: when it began).
    pub time: OffsetDateTime,
    /// Line of the `agent_started` of the run it belongs to, in the log that has it.
    pub run_line: Option<usize>,
    /// Name of the log that lacks it.
    pub missing_from: String,
    /// What it is.
    pub kind: MissingKind,
    /// What the other log says its agent was doing at the time.
    pub why: String,
}

impl fmt::Display for MissingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            MissingKind::TunnelSession { peer_fingerprint } => {
                format!("tunnel session with certificate {peer_fingerprint}")
            }
            MissingKind::Stream {
                session_id,
                service,
            } => format!("stream {session_id} ({service}, ended ok)"),
        };
        let run = self
            .run_line
            .map_or_else(String::new, |l| format!(", run started at line {l}"));
        write!(
            f,
            "{} line {} ({}{run}): {what}, not in {}: {}",
            self.present_in,
            self.line,
            format_time(self.time),
            self.missing_from,
            self.why
        )
    }
}

impl fmt::Display for PeerMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPeers { reason } => write!(
                f,
                "the logs are not from the two ends of one tunnel: {reason}"
            ),
            Self::Stream(m) => {
                let StreamMismatch {
                    session_id,
                    direction,
                    field,
                    sent_value,
                    received_value,
                    sent_digest,
                    received_digest,
                    a_line,
                    b_line,
                    a_name,
                    b_name,
                } = &**m;
                let (from, from_line, to, to_line) = match direction {
                    PeerDirection::AToB => (a_name, a_line, b_name, b_line),
                    PeerDirection::BToA => (b_name, b_line, a_name, a_line),
                };
                write!(
                    f,
                    "session {session_id}: data sent by {from}'s agent (line {from_line}) differs from what {to}'s agent received (line {to_line}): {field} {sent_value} sent, {received_value} received; sent digest {sent_digest}, received digest {received_digest}"
                )
            }
            Self::Missing(items) => {
                write!(
                    f,
                    "the logs do not describe the same sessions: {} record(s) in one log only, where the other agent was running (or had stopped cleanly) and would have recorded them",
                    items.len()
                )?;
                for m in items.iter().take(MISSING_LISTED) {
                    write!(f, "\n  {m}")?;
                }
                if items.len() > MISSING_LISTED {
                    write!(f, "\n  … and {} more", items.len() - MISSING_LISTED)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for PeerMismatch {}

/// [`compare_peer_named`] with the logs called "log A" and "log B".
pub fn compare_peer(a: &Verified, b: &Verified) -> Result<PeerComparison, PeerMismatch> {
    compare_peer_named(a, "log A", b, "log B")
}

/// Compares two verified logs from the two ends of a tunnel; `a_name` and `b_name` (their
/// paths) name them in messages.
///
/// The logs must look like peers: different roles, the same migration. For every stream
/// present in both with outcome `ok` on both sides, A's `sent` must equal B's `received` and
/// the other way round: digest, raw bytes, wire bytes and chunks (a `session_id` that occurs
/// several times in a log is matched by order of occurrence). Then both logs must describe
/// the same tunnel sessions and `ok` streams, except where the other agent could not have
/// recorded them: the rule is in the module docs.
pub fn compare_peer_named(
    a: &Verified,
    a_name: &str,
    b: &Verified,
    b_name: &str,
) -> Result<PeerComparison, PeerMismatch> {
    let names = Names {
        a: a_name,
        b: b_name,
    };
    check_agents(a, b, &names)?;
    let mut out = PeerComparison {
        a_name: a_name.to_string(),
        b_name: b_name.to_string(),
        ..PeerComparison::default()
    };
    let mut missing = Vec::new();
    compare_streams(a, b, &names, &mut out, &mut missing)?;
    compare_tunnel_sessions(a, b, &names, &mut out, &mut missing);
    if missing.is_empty() {
        Ok(out)
    } else {
        missing.sort_by_key(|m| m.time);
        Err(PeerMismatch::Missing(missing))
    }
}

struct Names<'a> {
    a: &'a str,
    b: &'a str,
}

/// Streams by session id, in log order.
fn index(v: &Verified) -> BTreeMap<&str, Vec<&StreamSummary>> {
    let mut m: BTreeMap<&str, Vec<&StreamSummary>> = BTreeMap::new();
    for s in &v.sessions {
        m.entry(s.session_id.as_str()).or_default().push(s);
    }
    m
}

fn compare_streams(
    a: &Verified,
    b: &Verified,
    names: &Names<'_>,
    out: &mut PeerComparison,
    missing: &mut Vec<MissingRecord>,
) -> Result<(), PeerMismatch> {
    let (ia, ib) = (index(a), index(b));
    for (id, list_a) in &ia {
        let list_b = ib.get(id).map_or(&[][..], Vec::as_slice);
        for (sa, sb) in list_a.iter().zip(list_b) {
            if sa.outcome != "ok" || sb.outcome != "ok" {
                out.not_ok += 1;
                continue;
            }
            compare_direction(sa, sb, PeerDirection::AToB, names)?;
            compare_direction(sa, sb, PeerDirection::BToA, names)?;
            out.compared += 1;
        }
    }
    // Closed in one log only (including extra occurrences of an id).
    for (this, this_name, this_index, other, other_name, other_index, count) in [
        (a, names.a, &ia, b, names.b, &ib, &mut out.only_in_a),
        (b, names.b, &ib, a, names.a, &ia, &mut out.only_in_b),
    ] {
        let seen: BTreeSet<&str> = other
            .streams_seen
            .iter()
            .map(|s| s.session_id.as_str())
            .collect();
        for (id, list) in this_index {
            let closed_there = other_index.get(id).map_or(0, Vec::len);
            for s in list.iter().skip(closed_there) {
                if seen.contains(id) {
                    // The other agent saw it begin; it stopped or crashed before the end.
                    out.unfinished += 1;
                    continue;
                }
                let begun = stream_start(s);
                // Not ok: it may never have reached the other agent.
                if s.outcome != "ok" || could_not_record(other, begun) {
                    *count += 1;
                    continue;
                }
                missing.push(MissingRecord {
                    present_in: this_name.to_string(),
                    line: s.line,
                    time: begun,
                    run_line: run_of(this, s.line),
                    missing_from: other_name.to_string(),
                    kind: MissingKind::Stream {
                        session_id: s.session_id.clone(),
                        service: s.service.clone(),
                    },
                    why: what_other_did(other, other_name, begun, None),
                });
            }
        }
    }
    Ok(())
}

/// When a stream began, on its own log's clock.
fn stream_start(s: &StreamSummary) -> OffsetDateTime {
    let closed = super::record::parse_time(&s.time).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    closed - Duration::milliseconds(i64::try_from(s.duration_ms).unwrap_or(i64::MAX / 2))
}

/// The `agent_started` line of the run that contains `line`.
fn run_of(v: &Verified, line: usize) -> Option<usize> {
    v.runs.iter().rev().find(|r| r.line <= line).map(|r| r.line)
}

fn slack() -> Duration {
    Duration::milliseconds(PEER_CLOCK_SLACK_MS)
}

/// Whether `v`'s agent could not have recorded something that happened at `t` (the other
/// log's clock): the windows of the module docs.
fn could_not_record(v: &Verified, t: OffsetDateTime) -> bool {
    let Some(first) = v.runs.first() else {
        // No agent_started at all: nothing in this log speaks for a running agent.
        return true;
    };
    if t < first.start + slack() {
        return true;
    }
    v.runs.iter().enumerate().any(|(k, run)| match run.end {
        // Down from its last record until the next run started (never, if none did).
        RunEnd::Crashed { time, .. } => {
            let back = v.runs.get(k + 1).map(|r| r.start + slack());
            t >= time - slack() && back.is_none_or(|b| t <= b)
        }
        RunEnd::Open { time, .. } => t >= time - slack(),
        RunEnd::Stopped { .. } => false,
    })
}

/// Why `v` should have recorded something at `t`, in words: where `t` falls among its runs.
fn what_other_did(
    v: &Verified,
    name: &str,
    t: OffsetDateTime,
    certificate: Option<&str>,
) -> String {
    if let Some(fp) = certificate {
        if !v.runs.iter().any(|r| r.fingerprint == fp) {
            return format!(
                "no run of {name}'s agent used that certificate (its agent_started records never name it)"
            );
        }
    }
    // Where `t` falls, taken literally (the windows, slack included, were ruled out before).
    let last = v.runs.len().saturating_sub(1);
    for (k, run) in v.runs.iter().enumerate() {
        let end = run.end.time();
        if t <= end {
            return if t >= run.start {
                format!(
                    "{name}'s agent was running then (run started at line {}) and has no record of it",
                    run.line
                )
            } else if let Some(prev) = k.checked_sub(1).map(|p| &v.runs[p]) {
                // Between the previous run's clean stop and this run's start.
                format!(
                    "{name}'s agent was stopped then: its run from line {} ended with agent_stopped at line {} ({}), the next started at line {} ({})",
                    prev.line,
                    prev.end.line(),
                    format_time(prev.end.time()),
                    run.line,
                    format_time(run.start)
                )
            } else {
                format!("{name}'s agent had not started yet")
            };
        }
        if k == last {
            return format!(
                "{name} ends with its agent stopped at line {} ({}): a later run of {name}'s agent is missing (was the log cut after that run's final checkpoint?)",
                run.end.line(),
                format_time(end)
            );
        }
    }
    format!("{name} has no run")
}

/// The session's lifetime on its own log's clock; `None` as the end: still open when the log
/// was read.
fn lifetime(v: &Verified, s: &TunnelSession) -> (OffsetDateTime, Option<OffsetDateTime>) {
    let end = match s.end {
        Some((_, t)) => Some(t),
        None => match v.runs.get(s.run).map(|r| r.end) {
            Some(RunEnd::Open { .. }) | None => None,
            Some(end) => Some(end.time()),
        },
    };
    (s.start, end)
}

fn overlaps(
    (a0, a1): (OffsetDateTime, Option<OffsetDateTime>),
    (b0, b1): (OffsetDateTime, Option<OffsetDateTime>),
) -> bool {
    let a_before_b_ends = b1.is_none_or(|b1| a0 <= b1 + slack());
    let b_before_a_ends = a1.is_none_or(|a1| b0 <= a1 + slack());
    a_before_b_ends && b_before_a_ends
}

fn compare_tunnel_sessions(
    a: &Verified,
    b: &Verified,
    names: &Names<'_>,
    out: &mut PeerComparison,
    missing: &mut Vec<MissingRecord>,
) {
    // One to one, greedily in A's order: each of A's sessions takes the unmatched B session
    // between the same two certificates whose lifetime overlaps and whose start is closest.
    let mut b_taken = vec![false; b.tunnel_sessions.len()];
    let mut a_matched = vec![false; a.tunnel_sessions.len()];
    for (i, sa) in a.tunnel_sessions.iter().enumerate() {
        let la = lifetime(a, sa);
        let best = b
            .tunnel_sessions
            .iter()
            .enumerate()
            .filter(|(j, sb)| {
                !b_taken[*j]
                    && sb.own_fingerprint == sa.peer_fingerprint
                    && sb.peer_fingerprint == sa.own_fingerprint
                    && overlaps(la, lifetime(b, sb))
            })
            .min_by_key(|(_, sb)| (sb.start - sa.start).abs());
        if let Some((j, _)) = best {
            b_taken[j] = true;
            a_matched[i] = true;
            out.tunnel_sessions += 1;
        }
    }
    for (this, this_name, matched, other, other_name, count) in [
        (a, names.a, a_matched, b, names.b, &mut out.only_in_a),
        (b, names.b, b_taken, a, names.a, &mut out.only_in_b),
    ] {
        for (s, _) in this.tunnel_sessions.iter().zip(matched).filter(|(_, m)| !m) {
            if could_not_record(other, s.start) || failed_there(this, s, other) {
                *count += 1;
                continue;
            }
            missing.push(MissingRecord {
                present_in: this_name.to_string(),
                line: s.line,
                time: s.start,
                run_line: this.runs.get(s.run).map(|r| r.line),
                missing_from: other_name.to_string(),
                kind: MissingKind::TunnelSession {
                    peer_fingerprint: s.peer_fingerprint.clone(),
                },
                why: what_other_did(other, other_name, s.start, Some(&s.peer_fingerprint)),
            });
        }
    }
}

/// A session without streams that the other agent recorded as a failed handshake with this
/// agent's certificate while it lasted here: the listener accepted (it sent HelloAck), the
/// dialer never completed the Hello exchange.
fn failed_there(this: &Verified, s: &TunnelSession, other: &Verified) -> bool {
    if s.streams != Some(0) {
        return false;
    }
    let (start, end) = lifetime(this, s);
    other.handshake_failures.iter().any(|f| {
        f.fingerprint == s.own_fingerprint
            && f.time + slack() >= start
            && end.is_none_or(|e| f.time <= e + slack())
    })
}

fn check_agents(a: &Verified, b: &Verified, names: &Names<'_>) -> Result<(), PeerMismatch> {
    // `verify` holds each log to one role and one migration.
    let role = |v: &Verified| v.agents.first().map(|x| x.role.clone());
    if let (Some(ra), Some(rb)) = (role(a), role(b)) {
        if ra == rb {
            return Err(PeerMismatch::NotPeers {
                reason: format!(
                    "both logs were written by a {ra} agent ({} and {})",
                    names.a, names.b
                ),
            });
        }
    }
    let migration = |v: &Verified| v.agents.first().map(|x| x.migration.clone());
    if let (Some(ma), Some(mb)) = (migration(a), migration(b)) {
        if ma != mb {
            return Err(PeerMismatch::NotPeers {
                reason: format!(
                    "{} is for migration {ma}, {} for migration {mb}",
                    names.a, names.b
                ),
            });
        }
    }
    check_certificates(a, names.a, b, names.b)?;
    check_certificates(b, names.b, a, names.a)
}

/// The other log must be written by an agent this log talked to: when this log has tunnel
/// sessions, at least one names a certificate that signed the other log. Otherwise a log of
/// another agent of the same migration (a second target, say), started after every session
/// here, would pass: each session excused as "the other agent was not running yet".
fn check_certificates(
    this: &Verified,
    this_name: &str,
    other: &Verified,
    other_name: &str,
) -> Result<(), PeerMismatch> {
    if this.tunnel_sessions.is_empty() || other.agents.is_empty() {
        return Ok(());
    }
    let writers: Vec<String> = other
        .agents
        .iter()
        .map(|a| normalize_fingerprint(&a.fingerprint))
        .collect();
    if this
        .tunnel_sessions
        .iter()
        .any(|s| writers.contains(&s.peer_fingerprint))
    {
        return Ok(());
    }
    let mut talked: Vec<&str> = this
        .tunnel_sessions
        .iter()
        .map(|s| s.peer_fingerprint.as_str())
        .collect();
    talked.sort_unstable();
    talked.dedup();
    Err(PeerMismatch::NotPeers {
        reason: format!(
            "{other_name} was written by certificate(s) {}, but every tunnel session in {this_name} was with {}: not the agent this log talked to",
            writers.join(", "),
            talked.join(", ")
        ),
    })
}

fn compare_direction(
    a: &StreamSummary,
    b: &StreamSummary,
    direction: PeerDirection,
    names: &Names<'_>,
) -> Result<(), PeerMismatch> {
    let (from, to) = match direction {
        PeerDirection::AToB => (a, b),
        PeerDirection::BToA => (b, a),
    };
    let figures: [(&'static str, String, String); 4] = [
        (
            "digest",
            from.sent_digest.clone(),
            to.received_digest.clone(),
        ),
        (
            "raw_bytes",
            from.sent_raw_bytes.to_string(),
            to.received_raw_bytes.to_string(),
        ),
        (
            "wire_bytes",
            from.sent_wire_bytes.to_string(),
            to.received_wire_bytes.to_string(),
        ),
        (
            "chunks",
            from.sent_chunks.to_string(),
            to.received_chunks.to_string(),
        ),
    ];
    match figures.into_iter().find(|(_, s, r)| s != r) {
        None => Ok(()),
        Some((field, sent_value, received_value)) => {
            Err(PeerMismatch::Stream(Box::new(StreamMismatch {
                session_id: a.session_id.clone(),
                direction,
                field,
                sent_value,
                received_value,
                sent_digest: from.sent_digest.clone(),
                received_digest: to.received_digest.clone(),
                a_line: a.line,
                b_line: b.line,
                a_name: names.a.to_string(),
                b_name: names.b.to_string(),
            })))
        }
    }
}
