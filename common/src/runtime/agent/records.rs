//! The tunnel's own audit records: the agent's start (identity and configuration), each
//! session's handshake and end (with the path it ran on), each forwarded stream's end (bytes
//! and digests both ways), and the refusals of peers that did not authenticate. Typed as
//! [`crate::audit::event`] defines them, so `audit verify` reads back exactly what is written.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tracing::{error, info, warn};

use super::{ConnStats, Shared};
use crate::admission::RefusalLimiter;
use crate::audit::event::{
    AgentStarted, AuditEvent, DirectionRecord, HandshakeAccepted, HexHash, IntegrityFailure,
    PathRecord, PeerRecord, ServiceRecord, SessionEnded, StreamClosed, TlsParams, TransportRecord,
};
use crate::audit::AuditLog;
use crate::control::PROTOCOL_VERSION;
use crate::frame::DirectionStats;
use crate::identity::PeerIdentity;
use crate::runtime::config::{AgentConfig, Transport};
use crate::runtime::pump::{Outcome, StreamReport};
use crate::runtime::tls::{self, TlsIdentity};

/// Audit log shared by all tasks. A failure to write is logged; the agent keeps serving.
#[derive(Clone)]
pub(super) struct Audit(pub(super) Arc<Mutex<AuditLog>>);

impl Audit {
    pub(super) fn record(&self, event: &str, details: Value) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.append(event, details) {
            error!("audit log {}: {e}", log.path().display());
        }
    }
    /// Appends a typed record.
    pub(super) fn event<E: AuditEvent>(&self, e: &E) {
        match serde_json::to_value(e) {
            Ok(details) => self.record(E::NAME, details),
            Err(err) => error!("audit record {}: {err}", E::NAME),
        }
    }
    pub(super) fn checkpoint(&self) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.checkpoint() {
            error!("audit log {}: checkpoint failed: {e}", log.path().display());
        }
    }
}

/// `agent_started`: who this agent is (its certificate embedded) and how it is configured.
pub(super) fn record_started(audit: &Audit, cfg: &AgentConfig, identity: &TlsIdentity) {
    let own = &identity.own;
    let transport = match &cfg.transport {
        Transport::Listen(a) => TransportRecord {
            listen: Some(a.to_string()),
            ..Default::default()
        },
        Transport::Connect { addr, server_name } => TransportRecord {
            connect: Some(addr.clone()),
            server_name: Some(server_name.clone()),
            ..Default::default()
        },
    };
    use base64::Engine as _;
    audit.event(&AgentStarted {
        role: own.role.to_string(),
        region: own.region.to_string(),
        migration: own.migration.to_string(),
        fingerprint: own.fingerprint.to_string(),
        certificate: base64::engine::general_purpose::STANDARD.encode(identity.cert.as_ref()),
        not_after: own.not_after.unix_timestamp(),
        version: crate::AGENT_VERSION.to_string(),
        protocol_version: PROTOCOL_VERSION,
        transport,
        allowed_regions: cfg.allowed_regions.to_string(),
        services: cfg
            .services
            .iter()
            .map(|s| ServiceRecord {
                name: s.name.clone(),
                endpoint: s.endpoint.to_string(),
            })
            .collect(),
        compression_level: cfg.compression_level,
        handshake_timeout_secs: cfg.handshake_timeout.as_secs(),
        congestion_control: cfg.congestion_control.to_string(),
        allow_non_loopback_local: cfg.allow_non_loopback_local,
        tls: tls_params(None),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        revocation_list: cfg.revocation_list.is_some(),
    });
}

/// The TLS parameters every tunnel uses (one protocol, suite and group), with the ALPN a
/// session negotiated.
pub(super) fn tls_params(alpn: Option<String>) -> TlsParams {
    TlsParams {
        protocol: tls::TLS_PROTOCOL.into(),
        cipher_suite: tls::TLS_CIPHER_SUITE.into(),
        kx_group: tls::TLS_KX_GROUP.into(),
        alpn,
    }
}

/// `handshake_accepted`: the peer's certificate identity and the TLS parameters.
pub(super) fn record_accepted(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    dialed: bool,
    alpn: Option<String>,
) {
    let remote = conn.remote_address();
    info!(
        "tunnel up with {remote}: peer {} {} (migration {}, certificate {})",
        peer.role, peer.region, peer.migration, peer.fingerprint
    );
    shared.audit.event(&HandshakeAccepted {
        address: remote.to_string(),
        dialed,
        peer: PeerRecord {
            fingerprint: peer.fingerprint.to_string(),
            role: peer.role.to_string(),
            region: peer.region.to_string(),
            migration: peer.migration.to_string(),
            subject: peer.subject.clone(),
            not_after: peer.not_after.unix_timestamp(),
        },
        tls: tls_params(alpn),
    });
}

/// `session_ended`: how long, why, how many streams and UDP bytes; then a signed checkpoint.
pub(super) fn record_session_ended(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    reason: &str,
    started: Instant,
    stats: &ConnStats,
) {
    let remote = conn.remote_address();
    let qs = conn.stats();
    let path = &qs.path;
    // What the path was like: the MTU path-MTU discovery reached (1200 is QUIC's floor; a
    // link that allows more but stays there halves throughput, quinn#1457), RTT and loss; and
    // whether GSO batched datagrams (quinn counts sends; on receive it counts packets, so GRO
    // cannot be seen here: the agent logs at start whether the socket has it).
    let per_send = qs.udp_tx.datagrams as f64 / qs.udp_tx.ios.max(1) as f64;
    info!(
        "tunnel with {remote} closed: {reason} (MTU {} B, RTT {} ms, {} of {} packets lost, {} congestion events, {}; {per_send:.1} datagrams per send (GSO))",
        path.current_mtu,
        path.rtt.as_millis(),
        path.lost_packets,
        path.sent_packets,
        path.congestion_events,
        shared.cfg.congestion_control,
    );
    shared.audit.event(&SessionEnded {
        address: remote.to_string(),
        peer_fingerprint: Some(peer.fingerprint.to_string()),
        reason: reason.to_string(),
        duration_ms: started.elapsed().as_millis() as u64,
        streams: Some(stats.streams.load(Ordering::SeqCst)),
        udp_bytes_sent: qs.udp_tx.bytes,
        udp_bytes_received: qs.udp_rx.bytes,
        path: Some(PathRecord {
            mtu: path.current_mtu,
            rtt_ms: path.rtt.as_millis() as u64,
            min_rtt_ms: path.min_rtt.as_millis() as u64,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            congestion_events: path.congestion_events,
            black_holes_detected: path.black_holes_detected,
            congestion_control: shared.cfg.congestion_control.to_string(),
        }),
    });

    shared.audit.checkpoint();
}

pub(super) fn direction_record(d: &DirectionStats) -> DirectionRecord {
    DirectionRecord {
        raw_bytes: d.raw_bytes,
        wire_bytes: d.wire_bytes,
        chunks: d.chunks,
        digest: HexHash(hex::encode(d.digest())),
    }
}

pub(super) fn record_closed(shared: &Shared, session: &str, service: &str, r: &StreamReport) {
    let duration_ms = r.started.elapsed().as_millis() as u64;
    match &r.outcome {
        Outcome::Ok => info!(
            "session {session} ({service}) closed: sent {} B ({} B on the wire), received {} B ({} B on the wire), {duration_ms} ms",
            r.sent.raw_bytes, r.sent.wire_bytes, r.received.raw_bytes, r.received.wire_bytes
        ),
        Outcome::IntegrityFailure(m) => {
            error!("session {session} ({service}): INTEGRITY FAILURE, stream reset, nothing of the bad chunk delivered: {m}");
            shared.audit.event(&IntegrityFailure {
                session_id: session.to_string(),
                service: service.to_string(),
                reason: m.clone(),
                delivered_chunks: r.received.chunks,
                delivered_bytes: r.received.raw_bytes,
            });
        }
        o => warn!(
            "session {session} ({service}) closed with {}: {}",
            o.label(),
            o.detail()
        ),
    }
    shared.audit.event(&StreamClosed {
        session_id: session.to_string(),
        service: service.to_string(),
        outcome: r.outcome.label().to_string(),
        detail: r.outcome.detail().to_string(),
        duration_ms,
        sent: direction_record(&r.sent),
        received: direction_record(&r.received),
    });
}

pub(super) fn write_refusal_summaries(
    shared: &Shared,
    summaries: Vec<crate::admission::RefusalSummary>,
) {
    for s in summaries {
        let address = s
            .address
            .map_or_else(|| "other addresses".to_string(), |a| a.to_string());
        let reasons: Vec<String> = s.reasons.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        warn!(
            "{} more refused or failed handshakes from {address} in {} s ({})",
            s.count,
            s.span.as_secs(),
            reasons.join(", ")
        );
        shared.audit.record(
            "handshake_refusals_summary",
            json!({
                "address": address,
                "count": s.count,
                "span_ms": s.span.as_millis() as u64,
                "window_secs": RefusalLimiter::WINDOW.as_secs(),
                "reasons": s.reasons,
            }),
        );
    }
}
