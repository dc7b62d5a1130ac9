//! Forwarding on the source: each data stream the target opens names a configured service;
//! the source connects to that service's upstream (PostgreSQL on loopback or a unix socket)
//! and pumps bytes both ways, chunked, compressed and BLAKE3-checked.
//!
//! ```text
//!   target ══ data stream: tag, StreamHeader{session, service} ══► source_stream
//!                                                                     └─ connect upstream ─ pump
//!   target ══ resume stream: tag, ResumeHeader{session, token} ═════► the held pump goes on
//! ```
//!
//! When the tunnel under a stream is lost, its pump holds the upstream connection (nothing read
//! from it) for `resume_grace_secs`; the target resumes it over its next connection with the
//! token both derived from the first connection's TLS keys.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::BytesMut;
use tracing::warn;

use pgferry_common::audit::event::{StreamOpened, StreamRefused};
use pgferry_common::control::{FileHeader, ResumeHeader, StreamHeader, StreamKind};
use pgferry_common::frame::{DirectionStats, ResetCode};
use pgferry_common::identity::Fingerprint;
use pgferry_common::runtime::agent::{resume_token, PeerConn, Tunnel, HELLO_TIMEOUT};
use pgferry_common::runtime::config::Endpoint;
use pgferry_common::runtime::pump::{
    self, BoxFuture, LocalConn, Outcome, Reattach, Resumption, StreamReport, Streams,
};

/// Upstream connect timeout.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Every bidirectional stream after the control stream is a forwarded connection; returns why
/// the connection ended.
pub async fn accept_data_streams(
    tunnel: &Tunnel,
    pc: &PeerConn,
    backup: &crate::backup::SharedBackup,
) -> String {
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
        let backup = backup.clone();
        tokio::spawn(async move {
            let _guard = guard;
            source_stream(tunnel, pc, send, recv, backup).await;
        });
    }
}

async fn source_stream(
    tunnel: Tunnel,
    pc: PeerConn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    backup: crate::backup::SharedBackup,
) {
    let remote = pc.conn.remote_address();
    let mut buf = BytesMut::new();
    let header = tokio::time::timeout(HELLO_TIMEOUT, read_opening(&mut recv, &mut buf)).await;
    let header = match header {
        Ok(Ok(Opening::New(h))) => h,
        Ok(Ok(Opening::File(h))) => {
            return serve_file(&tunnel, &backup, h, pump::Streams { send, recv, buf }).await
        }
        Ok(Ok(Opening::Resume(h))) => {
            return serve_resume(&tunnel, &pc, h, pump::Streams { send, recv, buf }).await
        }
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
    serve_new(&tunnel, &pc, header, pump::Streams { send, recv, buf }).await;
}

/// A new forwarded connection: its service's upstream connected, then pumped (resumable).
async fn serve_new(tunnel: &Tunnel, pc: &PeerConn, header: StreamHeader, streams: pump::Streams) {
    let pump::Streams {
        mut send,
        mut recv,
        buf,
    } = streams;
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
                resumptions: 0,
            };
            tunnel.record_closed(&session, &service.name, &report);
            return;
        }
    };
    let report = match (
        resume_token(&pc.conn, header.session_id),
        tunnel.cfg().resume_grace,
    ) {
        (Some(token), grace) if !grace.is_zero() => {
            let mut held = Holder {
                tunnel: tunnel.clone(),
                session_id: header.session_id,
                service: service.name.clone(),
                token,
                peer: pc.peer.fingerprint,
                peer_run: pc.peer_run,
            };
            pump::pump_resumable(
                local,
                send,
                recv,
                buf,
                tunnel.pump_options(),
                Some(&mut held),
            )
            .await
        }
        _ => pump::pump(local, send, recv, buf, tunnel.pump_options()).await,
    };
    tunnel.record_closed(&session, &service.name, &report);
}

/// The tag and header that open a data stream.
async fn read_opening(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<Opening> {
    let tag = pump::read_tag(recv, buf).await?;
    match StreamKind::from_tag(tag) {
        Some(StreamKind::Data) => pump::read_until(recv, buf, 128, StreamHeader::decode)
            .await
            .map(Opening::New),
        Some(StreamKind::Resume) => {
            pump::read_until(recv, buf, ResumeHeader::LEN, ResumeHeader::decode)
                .await
                .map(Opening::Resume)
        }
        Some(StreamKind::File) => {
            pump::read_until(recv, buf, FileHeader::MAX_LEN, FileHeader::decode)
                .await
                .map(Opening::File)
        }
        _ => bail!("stream tag {tag} is not a data stream"),
    }
}

/// A file of the base copy: its bytes, chunked and checked like any stream (only files of the
/// running backup's plan). No audit record per file: each stream is counted, and the copy is
/// recorded as a whole at its stop (`base_copy_served`); a refusal is recorded at once.
async fn serve_file(
    tunnel: &Tunnel,
    backup: &crate::backup::SharedBackup,
    h: FileHeader,
    mut s: pump::Streams,
) {
    match crate::backup::open_file(backup, &h).await {
        Ok(local) => {
            let report = pump::pump(local, s.send, s.recv, s.buf, tunnel.pump_options()).await;
            if report.outcome != Outcome::Ok {
                warn!("base copy file {}: {}", h.path, report.outcome.detail());
            }
            crate::backup::count_stream(backup, &h, Some(&report)).await;
        }
        Err(e) => {
            let msg = format!("{e:#}");
            warn!("refusing base copy file {:?}: {msg}", h.path);
            crate::backup::count_stream(backup, &h, None).await;
            tunnel.audit_event(&StreamRefused {
                session_id: format!("{:016x}", h.backup_id),
                service: "base copy".into(),
                reason: format!("{:?}: {msg}", h.path),
            });
            pump::send_reset(&mut s.send, 0, ResetCode::Refused, &msg).await;
            let _ = s.recv.stop(pump::codes::PROTOCOL.into());
        }
    }
}

/// A stream that continues a held connection: handed to it, or refused (audited).
async fn serve_resume(tunnel: &Tunnel, pc: &PeerConn, h: ResumeHeader, streams: pump::Streams) {
    let session = format!("{:016x}", h.session_id);
    if let Err((msg, mut s)) = tunnel.resume_held(&h, &pc.peer.fingerprint, streams).await {
        warn!(
            "peer {}: refusing to resume: {msg}",
            pc.conn.remote_address()
        );
        tunnel.audit_event(&StreamRefused {
            session_id: session,
            service: String::new(),
            reason: msg.clone(),
        });
        pump::send_reset(&mut s.send, 0, ResetCode::Refused, &msg).await;
        let _ = s.recv.stop(pump::codes::PROTOCOL.into());
    }
}

/// How a data stream opens.
enum Opening {
    New(StreamHeader),
    Resume(ResumeHeader),
    File(FileHeader),
}

/// The source's side of a resumable stream: when its stream is lost, the upstream connection
/// is held until the target resumes it under the same session id and token.
struct Holder {
    tunnel: Tunnel,
    session_id: u64,
    service: String,
    token: [u8; 32],
    peer: Fingerprint,
    peer_run: Option<u64>,
}

impl Reattach for Holder {
    fn reattach(&mut self) -> BoxFuture<'_, Result<Streams, String>> {
        warn!(
            "session {:016x}: tunnel lost; holding the upstream connection for up to {} s",
            self.session_id,
            self.tunnel.cfg().resume_grace.as_secs()
        );
        Box::pin(
            self.tunnel
                .hold(self.session_id, self.token, self.peer, self.peer_run),
        )
    }

    fn resumed(&mut self, r: &Resumption) {
        tracing::info!(
            "session {:016x}: resumed after {} ms ({} frame(s) sent again)",
            self.session_id,
            r.gap_ms,
            r.resent_frames
        );
        self.tunnel.audit_event(&r.record(
            self.session_id,
            &self.service,
            Some(self.peer.to_string()),
        ));
    }
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
