//! The peer check: both agents log every forwarded connection with a digest of each direction,
//! so what one agent sent must be what the other received.
//!
//! ```text
//!   log A (e.g. target)                           log B (e.g. source)
//!   stream_closed session 42                      stream_closed session 42
//!     sent.digest      ───────── must equal ─────────► received.digest
//!     received.digest  ◄──────── must equal ────────── sent.digest
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::verify::{StreamSummary, Verified};

/// Outcome of a successful [`compare_peer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerComparison {
    /// Streams present in both logs, `ok` in both, whose figures agree.
    pub compared: usize,
    /// Streams only log A has (refused, in flight when B was cut, or B is incomplete).
    pub only_in_a: usize,
    /// Streams only log B has.
    pub only_in_b: usize,
    /// Streams in both logs where at least one side did not end `ok` (not compared).
    pub not_ok: usize,
}

impl fmt::Display for PeerComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stream(s) agree in both directions; {} not compared (not ok on one side); warnings: {} only in log A, {} only in log B",
            self.compared, self.not_ok, self.only_in_a, self.only_in_b
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
                } = &**m;
                let (from, from_line, to, to_line) = match direction {
                    PeerDirection::AToB => ("A", a_line, "B", b_line),
                    PeerDirection::BToA => ("B", b_line, "A", a_line),
                };
                write!(
                    f,
                    "session {session_id}: data sent by log {from}'s agent (line {from_line}) differs from what log {to}'s agent received (line {to_line}): {field} {sent_value} sent, {received_value} received; sent digest {sent_digest}, received digest {received_digest}"
                )
            }
        }
    }
}

impl std::error::Error for PeerMismatch {}

/// Compares two verified logs from the two ends of a tunnel (A is the first argument).
///
/// For every session present in both with outcome `ok` on both sides, A's `sent` must equal
/// B's `received` and the other way round: digest, raw bytes, wire bytes and chunks. Sessions
/// found in only one log (refused, in flight when a log ended) are counted, not errors. A
/// session id that occurs several times in a log is matched by order of occurrence. The logs
/// must also look like peers: if each names a single role, the roles must differ, and if both
/// name migrations, they must share one.
pub fn compare_peer(a: &Verified, b: &Verified) -> Result<PeerComparison, PeerMismatch> {
    check_agents(a, b)?;
    let (ia, ib) = (index(a), index(b));
    let mut out = PeerComparison::default();
    for (id, list_a) in &ia {
        let Some(list_b) = ib.get(id) else {
            out.only_in_a += list_a.len();
            continue;
        };
        for k in 0..list_a.len().max(list_b.len()) {
            match (list_a.get(k), list_b.get(k)) {
                (Some(sa), Some(sb)) => {
                    if sa.outcome != "ok" || sb.outcome != "ok" {
                        out.not_ok += 1;
                        continue;
                    }
                    compare_direction(sa, sb, PeerDirection::AToB)?;
                    compare_direction(sa, sb, PeerDirection::BToA)?;
                    out.compared += 1;
                }
                (Some(_), None) => out.only_in_a += 1,
                (None, Some(_)) => out.only_in_b += 1,
                (None, None) => {}
            }
        }
    }
    out.only_in_b += ib
        .iter()
        .filter(|(id, _)| !ia.contains_key(*id))
        .map(|(_, l)| l.len())
        .sum::<usize>();
    Ok(out)
}

/// Streams by session id, in log order.
fn index(v: &Verified) -> BTreeMap<&str, Vec<&StreamSummary>> {
    let mut m: BTreeMap<&str, Vec<&StreamSummary>> = BTreeMap::new();
    for s in &v.sessions {
        m.entry(s.session_id.as_str()).or_default().push(s);
    }
    m
}

fn check_agents(a: &Verified, b: &Verified) -> Result<(), PeerMismatch> {
    let roles = |v: &Verified| {
        v.agents
            .iter()
            .map(|x| x.role.clone())
            .collect::<BTreeSet<_>>()
    };
    let (ra, rb) = (roles(a), roles(b));
    if ra.len() == 1 && ra == rb {
        return Err(PeerMismatch::NotPeers {
            reason: format!(
                "both logs were written by a {} agent",
                ra.first().map_or("", String::as_str)
            ),
        });
    }
    let migrations = |v: &Verified| {
        v.agents
            .iter()
            .map(|x| x.migration.clone())
            .collect::<BTreeSet<_>>()
    };
    let (ma, mb) = (migrations(a), migrations(b));
    if !ma.is_empty() && !mb.is_empty() && ma.is_disjoint(&mb) {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        return Err(PeerMismatch::NotPeers {
            reason: format!(
                "log A is for migration {}, log B for migration {}",
                list(&ma),
                list(&mb)
            ),
        });
    }
    Ok(())
}

fn compare_direction(
    a: &StreamSummary,
    b: &StreamSummary,
    direction: PeerDirection,
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
            })))
        }
    }
}
