//! The target's local endpoints: `psql`, `pg_basebackup` and the standby's walreceiver connect
//! here (TCP on loopback or a unix socket, 0600); each client connection becomes one data
//! stream to the source agent.
//!
//! ```text
//!   client ─► local endpoint ─► target_stream ══ data stream: tag, StreamHeader ══► source
//!                                   └─ waits (bounded) for the tunnel when it is reconnecting
//! ```
//!
//! The client's first bytes are watched for its PostgreSQL startup message: who connected
//! (user, database, application, replication) goes to the audit log as `stream_identified`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tracing::{info, warn};

use pgferry_common::audit::event::{StreamIdentified, StreamOpened};
use pgferry_common::control::{ResumeHeader, StreamHeader, StreamKind};
use pgferry_common::pgwire::{StartupInfo, StartupSniffer};
use pgferry_common::runtime::agent::resume_token;
use pgferry_common::runtime::config::{Endpoint, Service, DEFAULT_SERVICE};
use pgferry_common::runtime::pump::{
    self, BoxFuture, LocalConn, Outcome, Reattach, Resumption, Streams,
};

use crate::Cx;

/// How long a local client waits for the tunnel to come up before it is closed.
const TUNNEL_WAIT: Duration = Duration::from_secs(15);

/// A bound local endpoint.
pub(crate) enum LocalListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

pub(crate) async fn bind_local(ep: &Endpoint, allow_non_loopback: bool) -> Result<LocalListener> {
    match ep {
        Endpoint::Tcp(a) => {
            let l = tokio::net::TcpListener::bind(a.as_str())
                .await
                .with_context(|| format!("binding local endpoint {a} (is the port in use?)"))?;
            let bound = l.local_addr()?;
            // `localhost` passed the configuration check by name; hold what it resolved to
            // to the same rule.
            if !bound.ip().is_loopback() {
                if !allow_non_loopback {
                    bail!("local endpoint {a} bound {bound}, which is not a loopback address; refusing to expose the old cluster (see --allow-non-loopback-local)");
                }
                warn!("local endpoint {bound} is NOT loopback (--allow-non-loopback-local): whoever reaches it reaches the source cluster as a loopback client");
            }
            info!("local endpoint {bound} (tcp)");
            Ok(LocalListener::Tcp(l))
        }
        Endpoint::Unix(p) => {
            if p.exists() {
                // A stale socket from a killed agent: remove it only if nobody answers on it.
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    bail!("unix socket {} is in use by another process", p.display());
                }
                std::fs::remove_file(p)
                    .with_context(|| format!("removing stale socket {}", p.display()))?;
            }
            let l = tokio::net::UnixListener::bind(p)
                .with_context(|| format!("binding local endpoint unix:{}", p.display()))?;
            // Only this agent's user may connect (connecting needs write permission). Put the
            // socket in a 0700 directory as well to close the window between bind and chmod.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod 600 {}", p.display()))?;
            }
            info!("local endpoint unix:{}", p.display());
            Ok(LocalListener::Unix(l))
        }
    }
}

pub(crate) async fn serve_local(cx: Cx, service: Service, listener: LocalListener) {
    let mut stop = cx.tunnel.shutting_down();
    loop {
        let (local, peer_desc) = tokio::select! {
            r = async {
                match &listener {
                    LocalListener::Tcp(l) => l.accept().await.map(|(s, a)| (LocalConn::tcp(s), a.to_string())),
                    LocalListener::Unix(l) => l.accept().await.map(|(s, _)| (LocalConn::unix(s), "unix".to_string())),
                }
            } => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accepting on {}: {e}", service.endpoint);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let sh = cx.clone();
        let service = service.clone();
        let guard = cx.tunnel.stream_guard();
        tokio::spawn(async move {
            let _guard = guard;
            target_stream(sh, service, local, peer_desc).await;
        });
    }
}

async fn target_stream(cx: Cx, service: Service, local: LocalConn, client: String) {
    let session_id = cx.tunnel.next_session_id();
    let session = format!("{session_id:016x}");
    // Wait (bounded) for the tunnel: a client arriving during a reconnect is not refused at once.
    let mut rx = cx.target.current.subscribe();
    let pc = match tokio::time::timeout(TUNNEL_WAIT, rx.wait_for(|c| c.is_some())).await {
        Ok(Ok(c)) => c.clone().expect("checked"),
        _ => {
            warn!(
                "session {session}: closing client {client} of {}: tunnel to the source is not connected",
                service.name
            );
            local.abort();
            return;
        }
    };
    let opened = async {
        let (mut send, recv) = pc.conn.open_bi().await?;
        pc.stats.streams.fetch_add(1, Ordering::SeqCst);
        let mut out = BytesMut::new();
        out.extend_from_slice(&[StreamKind::Data as u8]);
        StreamHeader {
            session_id,
            service: service.name.clone(),
        }
        .encode(&mut out);
        send.write_all(&out).await?;
        Ok::<_, anyhow::Error>((send, recv))
    }
    .await;
    let (send, recv) = match opened {
        Ok(s) => s,
        Err(e) => {
            warn!("session {session}: opening a stream for {client}: {e:#}");
            local.abort();
            return;
        }
    };
    cx.tunnel.audit_event(&StreamOpened {
        session_id: session.to_string(),
        service: service.name.clone(),
        upstream: None,
        client: Some(client.to_string()),
        peer_fingerprint: Some(pc.peer.fingerprint.to_string()),
    });
    // Who the client is, from its startup message, recorded while the stream runs.
    let (identified_tx, identified_rx) = tokio::sync::oneshot::channel();
    let local = LocalConn {
        reader: Box::new(SniffReader {
            inner: local.reader,
            sniffer: StartupSniffer::new(),
            tx: Some(identified_tx),
        }),
        ..local
    };
    let identify = async {
        if let Ok(info) = identified_rx.await {
            if !info.unrecognised || service.name == DEFAULT_SERVICE {
                info!("session {session}: {} ({})", info.describe(), service.name);
                cx.tunnel.audit_event(&StreamIdentified {
                    session_id: session.clone(),
                    service: service.name.clone(),
                    postgres: info,
                });
            }
        }
    };
    let token = resume_token(&pc.conn, session_id);
    let mut resumer = token
        .filter(|_| !cx.tunnel.cfg().resume_grace.is_zero())
        .map(|token| Resumer {
            cx: cx.clone(),
            session_id,
            service: service.name.clone(),
            token,
            conn_id: pc.conn.stable_id(),
            peer_run: pc.peer_run,
        });
    let pumped = pump::pump_resumable(
        local,
        send,
        recv,
        BytesMut::new(),
        cx.tunnel.pump_options(),
        resumer.as_mut().map(|r| r as &mut dyn Reattach),
    );
    let (report, ()) = tokio::join!(pumped, identify);
    if let Outcome::PeerReset { code, message } = &report.outcome {
        warn!("session {session}: source reset the connection ({code:?}): {message}");
    }
    cx.tunnel.record_closed(&session, &service.name, &report);
}

/// The target's side of a resumable stream: when its stream is lost, the client's connection
/// is held while the tunnel reconnects, then the stream is resumed over the new connection.
struct Resumer {
    cx: Cx,
    session_id: u64,
    service: String,
    /// From the connection the stream began on.
    token: [u8; 32],
    /// The connection the stream last ran on.
    conn_id: usize,
    /// The source agent's run the stream began with: a restarted source cannot resume it.
    peer_run: Option<u64>,
}

impl Resumer {
    /// A resume stream on the next connection that is not the lost one, until `deadline`.
    async fn reopen(&mut self, deadline: tokio::time::Instant) -> Result<Streams, String> {
        let grace = || "no reconnection within the grace period".to_string();
        let mut rx = self.cx.target.current.subscribe();
        let mut stop = self.cx.tunnel.shutting_down();
        loop {
            let conn_id = self.conn_id;
            let next = tokio::select! {
                r = tokio::time::timeout_at(
                    deadline,
                    rx.wait_for(|c| c.as_ref().is_some_and(|l| l.conn.stable_id() != conn_id)),
                ) => r.map_err(|_| grace())?.map_err(|_| grace())?.clone().ok_or_else(grace)?,
                _ = stop.wait_for(|s| *s) => return Err("this agent is shutting down".into()),
            };
            self.conn_id = next.conn.stable_id();
            if next.peer_run != self.peer_run {
                return Err("the source agent restarted".into());
            }
            let opened = async {
                let (mut send, recv) = next.conn.open_bi().await?;
                let mut out = BytesMut::new();
                out.extend_from_slice(&[StreamKind::Resume as u8]);
                ResumeHeader {
                    session_id: self.session_id,
                    token: self.token,
                }
                .encode(&mut out);
                send.write_all(&out).await?;
                Ok::<_, anyhow::Error>((send, recv))
            };
            match tokio::time::timeout_at(deadline, opened).await {
                Ok(Ok((send, recv))) => {
                    next.stats.streams.fetch_add(1, Ordering::SeqCst);
                    return Ok(Streams {
                        send,
                        recv,
                        buf: BytesMut::new(),
                    });
                }
                Ok(Err(e)) => warn!(
                    "session {:016x}: resuming over the new connection: {e:#}",
                    self.session_id
                ),
                Err(_) => return Err(grace()),
            }
        }
    }
}

impl Reattach for Resumer {
    fn reattach(&mut self) -> BoxFuture<'_, Result<Streams, String>> {
        let grace = self.cx.tunnel.cfg().resume_grace;
        warn!(
            "session {:016x}: tunnel lost; holding the client's connection for up to {} s",
            self.session_id,
            grace.as_secs()
        );
        Box::pin(self.reopen(tokio::time::Instant::now() + grace))
    }

    fn resumed(&mut self, r: &Resumption) {
        info!(
            "session {:016x}: resumed after {} ms ({} frame(s) sent again)",
            self.session_id, r.gap_ms, r.resent_frames
        );
        let peer = self
            .cx
            .target
            .current
            .borrow()
            .as_ref()
            .map(|l| l.peer.fingerprint.to_string());
        self.cx
            .tunnel
            .audit_event(&r.record(self.session_id, &self.service, peer));
    }
}

/// The client's read half, watched until its startup message is known: the bytes pass through
/// unchanged; the sniffer sees at most PostgreSQL's startup-packet bound of them.
struct SniffReader {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    sniffer: StartupSniffer,
    tx: Option<tokio::sync::oneshot::Sender<StartupInfo>>,
}

impl AsyncRead for SniffReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.tx.is_some() && matches!(r, std::task::Poll::Ready(Ok(()))) {
            let fresh = buf.filled()[before..].to_vec();
            if let Some(info) = self.sniffer.feed(&fresh) {
                if let Some(tx) = self.tx.take() {
                    let _ = tx.send(info);
                }
            }
        }
        r
    }
}
