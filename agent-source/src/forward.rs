//! Forwarding on the source: each data stream the target opens names a configured service;
//! the source connects to that service's upstream (PostgreSQL on loopback or a unix socket)
//! and pumps bytes both ways, chunked, compressed and BLAKE3-checked.
//!
//! ```text
//!   target ══ data stream: tag, StreamHeader{session, service} ══► source_stream
//!                                                                     └─ connect upstream ─ pump
//! ```

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::BytesMut;
use tracing::warn;

use pgferry_common::audit::event::{StreamOpened, StreamRefused};
use pgferry_common::control::{StreamHeader, StreamKind};
use pgferry_common::frame::{DirectionStats, ResetCode};
use pgferry_common::runtime::agent::{PeerConn, Tunnel, HELLO_TIMEOUT};
use pgferry_common::runtime::config::Endpoint;
use pgferry_common::runtime::pump::{self, LocalConn, Outcome, StreamReport};

/// Upstream connect timeout.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Every bidirectional stream after the control stream is a forwarded connection; returns why
/// the connection ended.
pub async fn accept_data_streams(tunnel: &Tunnel, pc: &PeerConn) -> String {
    let mut stop = tunnel.shutting_down();
    loop {
        let (send, recv) = tokio::select! {
            s = pc.conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => return e.to_string(),
            },
            _ = stop.changed() => {
                // Stop taking new streams; running ones drain, then the endpoint closes.
                return pc.conn.closed().await.to_string();
            }
        };
        pc.stats.streams.fetch_add(1, Ordering::SeqCst);
        let tunnel = tunnel.clone();
        let pc = pc.clone();
        let guard = tunnel.stream_guard();
        tokio::spawn(async move {
            let _guard = guard;
            source_stream(tunnel, pc, send, recv).await;
        });
    }
}

async fn source_stream(
    tunnel: Tunnel,
    pc: PeerConn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let remote = pc.conn.remote_address();
    let mut buf = BytesMut::new();
    let header = tokio::time::timeout(HELLO_TIMEOUT, async {
        let tag = pump::read_tag(&mut recv, &mut buf).await?;
        if StreamKind::from_tag(tag) != Some(StreamKind::Data) {
            bail!("stream tag {tag} is not a data stream");
        }
        pump::read_until(&mut recv, &mut buf, 128, StreamHeader::decode).await
    })
    .await;
    let header = match header {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            warn!("peer {remote}: bad data stream: {e:#}");
            let _ = send.reset(pump::codes::PROTOCOL.into());
            let _ = recv.stop(pump::codes::PROTOCOL.into());
            return;
        }
        Err(_) => {
            let _ = send.reset(pump::codes::PROTOCOL.into());
            let _ = recv.stop(pump::codes::PROTOCOL.into());
            return;
        }
    };
    let session = format!("{:016x}", header.session_id);
    let Some(service) = tunnel
        .cfg()
        .services
        .iter()
        .find(|s| s.name == header.service)
    else {
        let msg = format!(
            "service {:?} is not configured on the source agent",
            header.service
        );
        warn!("session {session}: {msg}");
        tunnel.audit_event(&StreamRefused {
            session_id: session.to_string(),
            service: header.service.clone(),
            reason: msg.clone(),
        });
        pump::send_reset(&mut send, 0, ResetCode::Refused, &msg).await;
        let _ = recv.stop(pump::codes::PROTOCOL.into());
        return;
    };
    tunnel.audit_event(&StreamOpened {
        session_id: session.to_string(),
        service: service.name.clone(),
        upstream: Some(service.endpoint.to_string()),
        client: None,
        peer_fingerprint: Some(pc.peer.fingerprint.to_string()),
    });
    let local = match connect_upstream(&service.endpoint).await {
        Ok(l) => l,
        Err(e) => {
            let msg = format!(
                "connecting to upstream {} of service {}: {e:#}",
                service.endpoint, service.name
            );
            warn!("session {session}: {msg}");
            pump::send_reset(&mut send, 0, ResetCode::UpstreamConnectFailed, &msg).await;
            let _ = recv.stop(pump::codes::LOCAL.into());
            let report = StreamReport {
                outcome: Outcome::LocalError(msg),
                sent: DirectionStats::default(),
                received: DirectionStats::default(),
                started: Instant::now(),
            };
            tunnel.record_closed(&session, &service.name, &report);
            return;
        }
    };
    let report = pump::pump(local, send, recv, buf, tunnel.pump_options()).await;
    tunnel.record_closed(&session, &service.name, &report);
}

/// Connects to the configured upstream (PostgreSQL on loopback or a unix socket).
async fn connect_upstream(ep: &Endpoint) -> Result<LocalConn> {
    let fut = async {
        Ok::<_, anyhow::Error>(match ep {
            Endpoint::Tcp(a) => LocalConn::tcp(tokio::net::TcpStream::connect(a.as_str()).await?),
            Endpoint::Unix(p) => LocalConn::unix(tokio::net::UnixStream::connect(p).await?),
        })
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("timed out after {} s", UPSTREAM_TIMEOUT.as_secs()))?
}
