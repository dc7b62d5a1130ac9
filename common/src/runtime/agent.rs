//! The agent: QUIC endpoint, handshake and policy, control stream, forwarded streams, audit.
//!
//! ```text
//!   run_agent(config, shutdown)
//!     ├─ TlsIdentity::load ── own certificate must pass the policy, or no start
//!     ├─ AuditLog::open ───── agent_started (own certificate embedded)
//!     ├─ QUIC endpoint ────── listen: accept loop │ connect: dial loop with back-off
//!     │    └─ per connection: handshake (refusals audited) → Hello/HelloAck → serve
//!     │          source: accept data streams → connect upstream → pump
//!     │          target: publish the connection for the local listeners
//!     ├─ target: local listeners (TCP / unix) → open data stream → pump
//!     └─ shutdown: stop accepting, drain streams (bounded), close, agent_stopped + checkpoint
//! ```
//!
//! Roles come from certificates, not from who dials: either agent may listen or connect.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use super::admin;
use super::config::{AgentConfig, Endpoint, Service, Transport};
use super::control_stream::{self, ControlClient};
use super::pump::{self, LocalConn, Outcome, PumpOptions, StreamReport};
use super::tls::{self, RefusalSlot, TlsIdentity};
use crate::admission::{HandshakeLimits, PendingHandshakes, RefusalLimiter, Verdict};
use crate::audit::{AuditLog, CheckpointSigner};
use crate::control::{
    self, ControlMessage, Hello, StreamHeader, StreamKind, MAX_CONTROL_MESSAGE, PROTOCOL_VERSION,
};
use crate::frame::{DirectionStats, ResetCode};
use crate::identity::{PeerIdentity, Policy, Role};

/// Most authenticated peer certificates served at once (one is normal). A peer that
/// reconnects replaces its own previous connection first, so it always gets in. Handshakes that
/// have not authenticated yet are bounded apart ([`HandshakeLimits`]) and never count here.
const MAX_PEER_CONNECTIONS: usize = 4;
/// How often aggregated refusals are written ([`RefusalLimiter`] windows close every minute).
const REFUSAL_FLUSH: Duration = Duration::from_secs(5);
/// Longest wait between two dials of an unreachable peer. Short, because the dial is what
/// brings the tunnel back after the peer restarts; one Initial packet every few seconds is
/// nothing on any link.
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(2);
/// Most concurrently forwarded connections per QUIC connection.
const MAX_STREAMS: u32 = 512;
/// Time allowed for the Hello exchange and for a data stream's header.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a local client waits for the tunnel to come up before it is closed.
const TUNNEL_WAIT: Duration = Duration::from_secs(15);
/// Upstream connect timeout.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a live tunnel re-checks its peer against the revocation list and its validity.
const PEER_RECHECK: Duration = Duration::from_secs(2);

/// Embedding options (tests use them; the binaries use the defaults).
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Receives the bound UDP address once the endpoint is up.
    pub ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// Test-only fault injection.
    #[cfg(feature = "test-hooks")]
    pub fault: Option<Arc<pump::FaultInjection>>,
    /// Target: receives the control client of every tunnel that comes up (the migration driver
    /// sends its typed requests through it).
    pub tunnels: Option<tokio::sync::mpsc::UnboundedSender<Arc<ControlClient>>>,
}

/// Audit log shared by all tasks. A failure to write is logged; the agent keeps serving.
#[derive(Clone)]
struct Audit(Arc<Mutex<AuditLog>>);

impl Audit {
    fn record(&self, event: &str, details: Value) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.append(event, details) {
            error!("audit log {}: {e}", log.path().display());
        }
    }
    fn checkpoint(&self) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.checkpoint() {
            error!("audit log {}: checkpoint failed: {e}", log.path().display());
        }
    }
}

/// Counts running forwarded streams so shutdown can drain them.
#[derive(Default)]
struct Activity {
    streams: AtomicUsize,
    idle: Notify,
}

struct StreamGuard(Arc<Activity>);
impl StreamGuard {
    fn new(a: &Arc<Activity>) -> Self {
        a.streams.fetch_add(1, Ordering::SeqCst);
        Self(a.clone())
    }
}
impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

struct Shared {
    cfg: AgentConfig,
    identity: TlsIdentity,
    audit: Audit,
    hello: Hello,
    pump: PumpOptions,
    activity: Arc<Activity>,
    /// Target: the connection local clients are forwarded over.
    current: watch::Sender<Option<PeerConn>>,
    next_session: AtomicU64,
    shutting_down: watch::Sender<bool>,
    tunnels: Option<tokio::sync::mpsc::UnboundedSender<Arc<ControlClient>>>,
    /// The live connection of each authenticated peer certificate (see `serve_connection`: a
    /// reconnecting peer replaces its old connection; at most [`MAX_PEER_CONNECTIONS`]).
    peers: Mutex<std::collections::HashMap<crate::identity::Fingerprint, quinn::Connection>>,
    /// Target: held while a clone, cutover or rollback runs; a second one is refused.
    job: tokio::sync::Mutex<()>,
    /// Refusals of peers that did not authenticate: first one per address in full, then a
    /// summary a minute (a flood must not become an unbounded write load on the audit log).
    refusals: Mutex<RefusalLimiter>,
}

/// One refused or failed handshake, before the rate limit decides how it is written.
struct HandshakeRefusal {
    /// `handshake_refused` (a check refused the peer) or `handshake_failed`.
    event: &'static str,
    /// The check that refused it, or what failed (`timeout`, `tls`, `admission`, …).
    check: String,
    fingerprint: Option<String>,
    reason: String,
}

#[derive(Clone)]
struct PeerConn {
    conn: quinn::Connection,
    peer: Arc<PeerIdentity>,
    /// Data streams carried by this connection (for `session_ended`).
    stats: Arc<ConnStats>,
    /// Target: typed requests to the source agent.
    control: Option<Arc<ControlClient>>,
}

/// Runs an agent until `shutdown` resolves, then drains and stops.
pub async fn run_agent(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
    opts: RunOptions,
) -> Result<()> {
    let policy_base = Policy {
        migration: "pending".parse().expect("valid placeholder"),
        local_role: cfg.role,
        allowed_regions: cfg.allowed_regions.clone(),
        revoked: crate::identity::RevocationList::empty(),
    };
    let identity = TlsIdentity::load(
        &cfg.ca,
        &cfg.cert,
        &cfg.key,
        cfg.revocation_list.as_deref(),
        policy_base,
    )?;
    let own = identity.own.clone();
    info!(
        "certificate {}: role {}, region {}, migration {}, fingerprint {}",
        cfg.cert.display(),
        own.role,
        own.region,
        own.migration,
        own.fingerprint
    );

    let signer = CheckpointSigner::new(&identity.key_pkcs8, &identity.cert)
        .context("preparing the audit checkpoint signer")?;
    let log = AuditLog::open(&cfg.audit_log, signer)
        .with_context(|| format!("opening audit log {}", cfg.audit_log.display()))?;
    let audit = Audit(Arc::new(Mutex::new(log)));

    // Target: bind local endpoints before anything else, so a port in use fails the start.
    let mut listeners = Vec::new();
    if cfg.role == Role::Target {
        for s in &cfg.services {
            listeners.push((
                s.clone(),
                bind_local(&s.endpoint, cfg.allow_non_loopback_local).await?,
            ));
        }
    }

    let transport_desc = match &cfg.transport {
        Transport::Listen(a) => json!({"listen": a.to_string()}),
        Transport::Connect { addr, server_name } => {
            json!({"connect": addr, "server_name": server_name})
        }
    };
    use base64::Engine as _;
    audit.record(
        "agent_started",
        json!({
            "role": own.role.to_string(),
            "region": own.region.to_string(),
            "migration": own.migration.to_string(),
            "fingerprint": own.fingerprint.to_string(),
            "certificate": base64::engine::general_purpose::STANDARD.encode(identity.cert.as_ref()),
            "not_after": own.not_after.unix_timestamp(),
            "version": crate::AGENT_VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "transport": transport_desc,
            "allowed_regions": cfg.allowed_regions.to_string(),
            "services": cfg.services.iter().map(|s| json!({"name": s.name, "endpoint": s.endpoint.to_string()})).collect::<Vec<_>>(),
            "compression_level": cfg.compression_level,
            "handshake_timeout_secs": cfg.handshake_timeout.as_secs(),
            "congestion_control": cfg.congestion_control.to_string(),
            "allow_non_loopback_local": cfg.allow_non_loopback_local,
            "tls": {"protocol": tls::TLS_PROTOCOL, "cipher_suite": tls::TLS_CIPHER_SUITE, "kx_group": tls::TLS_KX_GROUP},
        }),
    );

    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: crate::AGENT_VERSION.into(),
        migration: own.migration.to_string(),
        role: cfg.role,
        capabilities: vec!["zstd".into(), "blake3".into()],
    };
    let session_base = {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 8];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| anyhow!("system random generator failed"))?;
        // Top bits random, low 20 bits count: ids are unique per run and across runs.
        u64::from_be_bytes(b) & !0xF_FFFF
    };
    let shared = Arc::new(Shared {
        pump: PumpOptions {
            compression_level: cfg.compression_level,
            #[cfg(feature = "test-hooks")]
            fault: opts.fault.clone(),
        },
        cfg,
        identity,
        audit: audit.clone(),
        hello,
        activity: Arc::new(Activity::default()),
        current: watch::channel(None).0,
        next_session: AtomicU64::new(session_base),
        shutting_down: watch::channel(false).0,
        tunnels: opts.tunnels,
        peers: Mutex::new(std::collections::HashMap::new()),
        job: tokio::sync::Mutex::new(()),
        refusals: Mutex::new(RefusalLimiter::new()),
    });

    let endpoint = make_endpoint(&shared)?;
    let local_addr = endpoint.local_addr()?;
    match &shared.cfg.transport {
        Transport::Listen(_) => info!("listening on {local_addr} (udp)"),
        Transport::Connect { addr, .. } => info!("dialing {addr} from {local_addr} (udp)"),
    }
    if let Some(tx) = opts.ready {
        let _ = tx.send(local_addr);
    }

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(t) = &shared.cfg.target {
        let listener = bind_admin(&t.admin_socket)?;
        let sh = shared.clone();
        tasks.spawn(async move { serve_admin(sh, listener).await });
        let sh = shared.clone();
        tasks.spawn(async move { sample_lag(sh).await });
    }
    {
        let sh = shared.clone();
        tasks.spawn(async move { flush_refusals(sh).await });
    }
    for (service, l) in listeners {
        let sh = shared.clone();
        tasks.spawn(async move { serve_local(sh, service, l).await });
    }
    {
        let sh = shared.clone();
        let ep = endpoint.clone();
        match sh.cfg.transport.clone() {
            Transport::Listen(_) => tasks.spawn(async move { accept_loop(sh, ep).await }),
            Transport::Connect { addr, server_name } => {
                tasks.spawn(async move { dial_loop(sh, ep, addr, server_name).await })
            }
        };
    }

    shutdown.await;
    info!(
        "shutting down: no new connections; draining {} forwarded connection(s) for up to {} s",
        shared.activity.streams.load(Ordering::SeqCst),
        shared.cfg.drain_timeout.as_secs()
    );
    let _ = shared.shutting_down.send(true);
    let drained = tokio::time::timeout(shared.cfg.drain_timeout, async {
        loop {
            let notified = shared.activity.idle.notified();
            if shared.activity.streams.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
    })
    .await
    .is_ok();
    let left = shared.activity.streams.load(Ordering::SeqCst);
    if !drained {
        warn!("drain timeout: closing {left} forwarded connection(s) that are still open");
    }
    // Closing the endpoint ends every connection; their tasks then record `session_ended`
    // (with its checkpoint) before `agent_stopped`. Tasks that do not finish promptly are
    // aborted.
    endpoint.close(0u32.into(), b"agent shutting down");
    let joined = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    let left_over = shared
        .refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain();
    write_refusal_summaries(&shared, left_over);
    for s in &shared.cfg.services {
        if let Endpoint::Unix(p) = &s.endpoint {
            if shared.cfg.role == Role::Target {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    audit.record(
        "agent_stopped",
        json!({"drained": drained, "streams_cut": if drained { 0 } else { left }}),
    );
    audit.checkpoint();
    info!("stopped");
    Ok(())
}

fn transport_config(cfg: &AgentConfig) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(Some(cfg.idle_timeout.try_into()?));
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Windows sized for a ~100 ms × 1 Gbit/s path (12.5 MB in flight); quinn's defaults
    // target much smaller links. The send window is kept near that product rather than far
    // above it: data it buffers beyond what the link carries only delays the backpressure
    // that tells the sender the link, not the CPU, is the bound (pump::LevelControl).
    // quinn's default initial RTT (333 ms) puts the first Initial retransmission a second after
    // the first: a dial that races the peer's restart would wait that long. 100 ms is still
    // above any EEA path's RTT.
    t.initial_rtt(Duration::from_millis(100));
    use super::config::CongestionControl as Cc;
    use quinn::congestion as cc;
    match cfg.congestion_control {
        Cc::Bbr => t.congestion_controller_factory(Arc::new(cc::BbrConfig::default())),
        Cc::Cubic => t.congestion_controller_factory(Arc::new(cc::CubicConfig::default())),
        Cc::NewReno => t.congestion_controller_factory(Arc::new(cc::NewRenoConfig::default())),
    };
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(16 << 20);
    Ok(t)
}

fn make_endpoint(shared: &Arc<Shared>) -> Result<quinn::Endpoint> {
    let transport = Arc::new(transport_config(&shared.cfg)?);
    let bind: SocketAddr = match &shared.cfg.transport {
        Transport::Listen(a) => *a,
        Transport::Connect { addr, .. } => {
            let remote = addr
                .to_socket_addrs()
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .with_context(|| format!("{addr} resolves to no address"))?;
            if remote.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            }
        }
    };
    let socket = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("binding UDP {bind} (is another agent running?)"))?;
    {
        // Larger kernel buffers absorb bursts at high bandwidth-delay products.
        let s = socket2::SockRef::from(&socket);
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
    }
    let server = match &shared.cfg.transport {
        Transport::Listen(_) => {
            let mut sc = shared.identity.server_config(&RefusalSlot::new())?;
            sc.transport_config(transport.clone());
            Some(sc)
        }
        Transport::Connect { .. } => None,
    };
    let mut ep_config =
        quinn::EndpointConfig::new(Arc::new(stateless_reset_key(&shared.identity.key_pkcs8)));
    // quinn drops packets whose connection id its generator does not recognise, before any
    // reset: the restarted agent must recognise the ids its previous run handed out.
    let cid_key = connection_id_key(&shared.identity.key_pkcs8);
    ep_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let mut ep = quinn::Endpoint::new(ep_config, server, socket, Arc::new(quinn::TokioRuntime))?;
    if let Transport::Connect { .. } = &shared.cfg.transport {
        let mut cc = shared.identity.client_config(&RefusalSlot::new())?;
        cc.transport_config(transport);
        ep.set_default_client_config(cc);
    }
    Ok(ep)
}

/// The key behind this agent's stateless reset tokens, derived from its private key, so that
/// the same agent restarted after a crash still owns the tokens it handed out: the first packet
/// the peer sends on the dead connection is answered with a reset the peer can verify, and the
/// peer reconnects at once instead of after the idle timeout (RFC 9000 §10.3; quinn's default
/// key is random per process, so a restarted agent's resets would be ignored). HKDF makes the
/// derivation one-way: nothing about the private key can be learnt from a token.
fn stateless_reset_key(key_pkcs8: &[u8]) -> ring::hmac::Key {
    let prk = agent_key_prk(key_pkcs8);
    let okm = prk
        .expand(&[b"quic-reset"], ring::hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is a valid HKDF output length");
    ring::hmac::Key::from(okm)
}

/// The key that marks this agent's connection ids as its own (quinn's hashed generator), also
/// derived from the agent's key so that it survives a restart; see [`stateless_reset_key`].
fn connection_id_key(key_pkcs8: &[u8]) -> u64 {
    struct Len8;
    impl ring::hkdf::KeyType for Len8 {
        fn len(&self) -> usize {
            8
        }
    }
    let mut out = [0u8; 8];
    agent_key_prk(key_pkcs8)
        .expand(&[b"quic-cid"], Len8)
        .and_then(|okm| okm.fill(&mut out))
        .expect("8 bytes is a valid HKDF output length");
    u64::from_le_bytes(out)
}

fn agent_key_prk(key_pkcs8: &[u8]) -> ring::hkdf::Prk {
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"pgferry agent-key derivations v1")
        .extract(key_pkcs8)
}

/// Gives back a pending-handshake slot when the handshake ends, whichever way.
struct PendingSlot {
    pending: Arc<Mutex<PendingHandshakes>>,
    ip: std::net::IpAddr,
}
impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end(self.ip);
    }
}

/// Accepts peers. Before any work is done for an address it must prove it receives our packets
/// (QUIC Retry: stateless, so replayed or spoofed Initials cost one small packet and no state).
/// A validated address then gets a pending-handshake slot, bounded per address and in all, for
/// at most the handshake timeout; only an authenticated peer leaves that pool.
async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let pending = Arc::new(Mutex::new(PendingHandshakes::new(
        HandshakeLimits::default(),
    )));
    let mut stop = shared.shutting_down.subscribe();
    // Connection tasks are kept so that shutdown waits for them to record `session_ended`.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.changed() => break,
        };
        let remote = incoming.remote_address();
        if !incoming.remote_address_validated() {
            if incoming.may_retry() {
                // Cannot fail: may_retry() said a Retry is allowed for this Incoming.
                let _ = incoming.retry();
            } else {
                // A token we issued did not validate (expired, or replayed from elsewhere).
                incoming.ignore();
            }
            continue;
        }
        let admitted = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_begin(remote.ip());
        if let Err(e) = admitted {
            incoming.refuse();
            note_refusal(
                &shared,
                remote,
                HandshakeRefusal {
                    event: "handshake_failed",
                    check: "admission".into(),
                    fingerprint: None,
                    reason: format!("not admitted: {e}"),
                },
            );
            continue;
        }
        let slot_guard = PendingSlot {
            pending: pending.clone(),
            ip: remote.ip(),
        };
        let sh = shared.clone();
        conns.spawn(async move {
            let slot = RefusalSlot::new();
            let cfg = match sh.identity.server_config(&slot) {
                Ok(mut c) => {
                    if let Ok(t) = transport_config(&sh.cfg) {
                        c.transport_config(Arc::new(t));
                    }
                    c
                }
                Err(e) => {
                    error!("TLS configuration: {e:#}");
                    return;
                }
            };
            let connecting = match incoming.accept_with(Arc::new(cfg)) {
                Ok(c) => c,
                Err(e) => {
                    warn!("connection from {remote} failed: {e}");
                    return;
                }
            };
            let handshake = tokio::time::timeout(sh.cfg.handshake_timeout, connecting).await;
            // Authenticated or not, the handshake is over: its pending slot is free again.
            drop(slot_guard);
            match handshake {
                Ok(Ok(conn)) => serve_connection(sh, conn, false).await,
                Ok(Err(e)) => handshake_failed(&sh, remote, &slot, &e),
                // Dropping `Connecting` closes the connection.
                Err(_) => handshake_timed_out(&sh, remote),
            }
        });
    }
    // The endpoint is closed by `run_agent` after the drain; the connections then end.
    while conns.join_next().await.is_some() {}
}

async fn dial_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    addr: String,
    server_name: String,
) {
    let mut backoff = Duration::from_millis(250);
    let mut stop = shared.shutting_down.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        match dial_once(&shared, &endpoint, &addr, &server_name).await {
            // A tunnel was up: the peer is there, come back quickly.
            Ok(()) => backoff = Duration::from_millis(250),
            Err(e) => warn!("connecting to {addr}: {e:#}"),
        }
        info!("reconnecting to {addr} in {} ms", backoff.as_millis());
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_DIAL_BACKOFF);
    }
}

async fn dial_once(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    addr: &str,
    server_name: &str,
) -> Result<()> {
    let remote = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let slot = RefusalSlot::new();
    let mut cc = shared.identity.client_config(&slot)?;
    cc.transport_config(Arc::new(transport_config(&shared.cfg)?));
    let connecting = endpoint.connect_with(cc, remote, server_name)?;
    match tokio::time::timeout(shared.cfg.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => {
            serve_connection(shared.clone(), conn, true).await;
            Ok(())
        }
        Ok(Err(e)) => {
            handshake_failed(shared, remote, &slot, &e);
            Err(anyhow!("handshake failed"))
        }
        Err(_) => Err(anyhow!(
            "no handshake within {} s (peer down or unreachable)",
            shared.cfg.handshake_timeout.as_secs()
        )),
    }
}

/// Reports a failed handshake: our verifier's refusal if it made one, else the classified error.
fn handshake_failed(
    shared: &Shared,
    remote: SocketAddr,
    slot: &RefusalSlot,
    e: &quinn::ConnectionError,
) {
    let refusal = match slot.take() {
        Some(r) => HandshakeRefusal {
            event: "handshake_refused",
            check: r.check.as_str().into(),
            fingerprint: Some(
                r.fingerprint
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |f| f.to_string()),
            ),
            reason: r.reason,
        },
        None => {
            let r = tls::classify_handshake_error(e);
            if r.check == crate::identity::Check::NoCertificate {
                HandshakeRefusal {
                    event: "handshake_refused",
                    check: r.check.as_str().into(),
                    fingerprint: Some("none".into()),
                    reason: r.reason,
                }
            } else {
                HandshakeRefusal {
                    event: "handshake_failed",
                    check: "tls".into(),
                    fingerprint: None,
                    reason: r.reason,
                }
            }
        }
    };
    note_refusal(shared, remote, refusal);
}

fn handshake_timed_out(shared: &Shared, remote: SocketAddr) {
    note_refusal(
        shared,
        remote,
        HandshakeRefusal {
            event: "handshake_failed",
            check: "timeout".into(),
            fingerprint: None,
            reason: format!(
                "no authenticated handshake within {} s",
                shared.cfg.handshake_timeout.as_secs()
            ),
        },
    );
}

/// Logs and audits a refused or failed handshake, through the rate limit: the first from an
/// address in full, the rest counted into that address's next summary.
fn note_refusal(shared: &Shared, remote: SocketAddr, r: HandshakeRefusal) {
    let verdict = shared
        .refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(remote.ip(), &r.check, Instant::now());
    if verdict == Verdict::Counted {
        tracing::debug!("{} from {remote} ({}): {}", r.event, r.check, r.reason);
        return;
    }
    let mut details = json!({"address": remote.to_string(), "check": r.check, "reason": r.reason});
    match &r.fingerprint {
        Some(fp) => {
            warn!(
                "refused peer {remote}: check {}, certificate {fp}: {}",
                r.check, r.reason
            );
            details["fingerprint"] = json!(fp);
        }
        None => warn!("handshake with {remote} failed ({}): {}", r.check, r.reason),
    }
    shared.audit.record(r.event, details);
}

/// Writes the refusal summaries whose window has closed, until the agent stops.
async fn flush_refusals(shared: Arc<Shared>) {
    let mut stop = shared.shutting_down.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REFUSAL_FLUSH) => {}
            _ = stop.changed() => return,
        }
        let due = shared
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due(Instant::now());
        write_refusal_summaries(&shared, due);
    }
}

fn write_refusal_summaries(shared: &Shared, summaries: Vec<crate::admission::RefusalSummary>) {
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

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity> {
    let certs = conn
        .peer_identity()
        .context("peer presented no certificate")?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().context("peer presented no certificate")?;
    Ok(PeerIdentity::from_der(leaf)?)
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, dialed: bool) {
    let remote = conn.remote_address();
    let peer = match peer_identity(&conn) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            // Cannot happen after our verifier accepted the certificate; refuse anyway.
            error!("peer {remote}: {e:#}");
            conn.close(1u32.into(), b"identity");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .map(|p| String::from_utf8_lossy(&p).into_owned());

    // The Hello exchange: version, migration and role as the peer itself announces them.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, exchange_hello(&shared, &conn, dialed)).await;
    let control = match hello {
        Ok(Ok(c)) => c,
        Ok(Err(e)) if conn.close_reason().is_some() => {
            // The peer went away before completing Hello: not a refusal by us.
            let reason = format!("connection closed before Hello: {e:#}");
            warn!("handshake with {remote} failed: {reason}");
            shared.audit.record(
                "handshake_failed",
                json!({"address": remote.to_string(), "fingerprint": peer.fingerprint.to_string(), "reason": reason}),
            );
            return;
        }
        Ok(Err(e)) => {
            let reason = format!("{e:#}");
            warn!(
                "refused peer {remote}: check hello, certificate {}: {reason}",
                peer.fingerprint
            );
            shared.audit.record(
                "handshake_refused",
                json!({"address": remote.to_string(), "check": "hello", "fingerprint": peer.fingerprint.to_string(), "reason": reason}),
            );
            conn.close(2u32.into(), b"hello refused");
            return;
        }
        Err(_) => {
            warn!(
                "peer {remote}: no Hello within {} s",
                HELLO_TIMEOUT.as_secs()
            );
            conn.close(2u32.into(), b"hello timeout");
            return;
        }
    };

    info!(
        "tunnel up with {remote}: peer {} {} (migration {}, certificate {})",
        peer.role, peer.region, peer.migration, peer.fingerprint
    );
    shared.audit.record(
        "handshake_accepted",
        json!({
            "address": remote.to_string(),
            "dialed": dialed,
            "peer": {
                "fingerprint": peer.fingerprint.to_string(),
                "role": peer.role.to_string(),
                "region": peer.region.to_string(),
                "migration": peer.migration.to_string(),
                "subject": peer.subject,
                "not_after": peer.not_after.unix_timestamp(),
            },
            "tls": {"protocol": tls::TLS_PROTOCOL, "cipher_suite": tls::TLS_CIPHER_SUITE, "kx_group": tls::TLS_KX_GROUP, "alpn": alpn},
        }),
    );
    let started = Instant::now();
    // A peer that reconnects (an agent restarted after a crash, or a path that changed)
    // replaces its old connection at once, rather than when the idle timeout notices; the old
    // one's sessions (a walsender holding the replication slot) end with it. This comes before
    // the count, so an authenticated peer always gets in.
    let (old, live_peers) = {
        let mut peers = shared.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|_, c| c.close_reason().is_none());
        let old = peers.insert(peer.fingerprint, conn.clone());
        (old, peers.len())
    };
    if let Some(old) = old.filter(|o| o.stable_id() != conn.stable_id()) {
        if old.close_reason().is_none() {
            warn!(
                "peer {} reconnected from {remote}: closing its previous connection from {}",
                peer.fingerprint,
                old.remote_address()
            );
            old.close(4u32.into(), b"replaced by a newer connection");
        }
    }
    if live_peers > MAX_PEER_CONNECTIONS {
        let reason =
            format!("{MAX_PEER_CONNECTIONS} other authenticated peer certificates are connected");
        warn!("refusing peer {remote} ({}): {reason}", peer.fingerprint);
        shared.audit.record(
            "handshake_refused",
            json!({"address": remote.to_string(), "check": "peer-limit", "fingerprint": peer.fingerprint.to_string(), "reason": reason}),
        );
        shared
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer.fingerprint);
        conn.close(5u32.into(), b"too many peers");
        return;
    }
    let stats = Arc::new(ConnStats::default());
    // The control stream carries the migration's typed requests: the target asks, the source
    // answers (whichever side dialed and opened the stream).
    let (control_send, control_recv, control_buf) = control;
    let (control_task, control_client) = match shared.cfg.role {
        Role::Source => {
            let sh = shared.clone();
            let task = tokio::spawn(control_stream::serve_requests(
                control_send,
                control_recv,
                control_buf,
                shared.cfg.source_pg.clone(),
                move |event, details| sh.audit.record(event, details),
            ));
            (task, None)
        }
        Role::Target => {
            let client = Arc::new(ControlClient::new(control_send));
            if let Some(tx) = &shared.tunnels {
                let _ = tx.send(client.clone());
            }
            let task = tokio::spawn(control_stream::read_responses(
                client.clone(),
                control_recv,
                control_buf,
            ));
            (task, Some(client))
        }
    };
    let pc = PeerConn {
        conn: conn.clone(),
        peer: peer.clone(),
        stats: stats.clone(),
        control: control_client,
    };
    if shared.cfg.role == Role::Target {
        shared.current.send_replace(Some(pc.clone()));
    }
    let watcher = tokio::spawn(watch_peer(shared.clone(), conn.clone(), peer.clone()));
    let reason = match shared.cfg.role {
        Role::Source => accept_data_streams(&shared, &pc, &stats).await,
        Role::Target => {
            // Any stream the source opens is a protocol violation: we never serve it.
            loop {
                match conn.accept_bi().await {
                    Ok((mut s, mut r)) => {
                        warn!("peer {remote} opened a stream; only the target opens data streams");
                        let _ = s.reset(pump::codes::PROTOCOL.into());
                        let _ = r.stop(pump::codes::PROTOCOL.into());
                    }
                    Err(e) => break e.to_string(),
                }
            }
        }
    };
    if shared.cfg.role == Role::Target {
        shared.current.send_if_modified(|c| match c {
            Some(cur) if cur.conn.stable_id() == conn.stable_id() => {
                *c = None;
                true
            }
            _ => false,
        });
    }
    watcher.abort();
    control_task.abort();
    let qs = conn.stats();
    info!("tunnel with {remote} closed: {reason}");
    shared.audit.record(
        "session_ended",
        json!({
            "address": remote.to_string(),
            "peer_fingerprint": peer.fingerprint.to_string(),
            "reason": reason,
            "duration_ms": started.elapsed().as_millis() as u64,
            "streams": stats.streams.load(Ordering::SeqCst),
            "udp_bytes_sent": qs.udp_tx.bytes,
            "udp_bytes_received": qs.udp_rx.bytes,
        }),
    );
    shared.audit.checkpoint();
}

/// Closes a live tunnel whose peer certificate is revoked or expires while it is up: the
/// handshake checks only the moment of connection, and a migration tunnel can live for days.
/// An unreadable revocation list is logged but does not cut a live tunnel (new handshakes fail
/// closed on it); a listed fingerprint does.
async fn watch_peer(shared: Arc<Shared>, conn: quinn::Connection, peer: Arc<PeerIdentity>) {
    let remote = conn.remote_address();
    let list = shared.cfg.revocation_list.clone();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(PEER_RECHECK) => {}
        }
        let revoked = match &list {
            Some(path) => match crate::identity::RevocationList::load(path) {
                Ok(l) => l
                    .contains(&peer.fingerprint)
                    .then(|| l.note(&peer.fingerprint).unwrap_or("").to_string()),
                Err(e) => {
                    if !warned {
                        warn!("revocation list unreadable, live tunnel with {remote} kept, new peers refused: {e}");
                        warned = true;
                    }
                    None
                }
            },
            None => None,
        };
        let expired = time::OffsetDateTime::now_utc() > peer.not_after;
        let (check, reason) = match (revoked, expired) {
            (Some(note), _) => (
                "revoked",
                format!("peer certificate was revoked while the tunnel was up ({note})"),
            ),
            (None, true) => (
                "validity",
                "peer certificate expired while the tunnel was up".to_string(),
            ),
            (None, false) => continue,
        };
        warn!(
            "closing tunnel with {remote}: check {check}, certificate {}: {reason}",
            peer.fingerprint
        );
        shared.audit.record(
            "peer_cut",
            json!({"address": remote.to_string(), "check": check, "fingerprint": peer.fingerprint.to_string(), "reason": reason}),
        );
        conn.close(3u32.into(), check.as_bytes());
        return;
    }
}

#[derive(Default, Debug)]
struct ConnStats {
    streams: AtomicU64,
}

async fn exchange_hello(
    shared: &Shared,
    conn: &quinn::Connection,
    dialed: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream, BytesMut)> {
    let mut buf = BytesMut::new();
    if dialed {
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut out = BytesMut::new();
        out.extend_from_slice(&[StreamKind::Control as u8]);
        control::encode_message(&ControlMessage::Hello(shared.hello.clone()), &mut out)?;
        send.write_all(&out).await?;
        let answer = pump::read_until(
            &mut recv,
            &mut buf,
            MAX_CONTROL_MESSAGE + 4,
            control::decode_message,
        )
        .await?;
        match answer {
            ControlMessage::HelloAck(h) => {
                shared.hello.check_peer(&h).map_err(|e| anyhow!(e))?;
                Ok((send, recv, buf))
            }
            ControlMessage::Refuse { reason } => bail!("peer refused us: {reason}"),
            other => bail!("unexpected control message {other:?}"),
        }
    } else {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let tag = pump::read_tag(&mut recv, &mut buf).await?;
        if StreamKind::from_tag(tag) != Some(StreamKind::Control) {
            bail!("first stream is not the control stream (tag {tag})");
        }
        let msg = pump::read_until(
            &mut recv,
            &mut buf,
            MAX_CONTROL_MESSAGE + 4,
            control::decode_message,
        )
        .await?;
        let ControlMessage::Hello(h) = msg else {
            bail!("expected Hello, got {msg:?}");
        };
        let mut out = BytesMut::new();
        if let Err(reason) = shared.hello.check_peer(&h) {
            control::encode_message(
                &ControlMessage::Refuse {
                    reason: reason.clone(),
                },
                &mut out,
            )?;
            let _ = send.write_all(&out).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            bail!(reason);
        }
        control::encode_message(&ControlMessage::HelloAck(shared.hello.clone()), &mut out)?;
        send.write_all(&out).await?;
        Ok((send, recv, buf))
    }
}

/// Source side: every bidirectional stream after the control stream is a forwarded connection.
async fn accept_data_streams(
    shared: &Arc<Shared>,
    pc: &PeerConn,
    stats: &Arc<ConnStats>,
) -> String {
    let mut stop = shared.shutting_down.subscribe();
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
        stats.streams.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let pc = pc.clone();
        let guard = StreamGuard::new(&shared.activity);
        tokio::spawn(async move {
            let _guard = guard;
            source_stream(sh, pc, send, recv).await;
        });
    }
}

async fn source_stream(
    shared: Arc<Shared>,
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
    let Some(service) = shared
        .cfg
        .services
        .iter()
        .find(|s| s.name == header.service)
    else {
        let msg = format!(
            "service {:?} is not configured on the source agent",
            header.service
        );
        warn!("session {session}: {msg}");
        shared.audit.record(
            "stream_refused",
            json!({"session_id": session, "service": header.service, "reason": msg}),
        );
        pump::send_reset(&mut send, 0, ResetCode::Refused, &msg).await;
        let _ = recv.stop(pump::codes::PROTOCOL.into());
        return;
    };
    shared.audit.record(
        "stream_opened",
        json!({"session_id": session, "service": service.name, "upstream": service.endpoint.to_string(), "peer_fingerprint": pc.peer.fingerprint.to_string()}),
    );
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
            record_closed(&shared, &session, &service.name, &report);
            return;
        }
    };
    let report = pump::pump(local, send, recv, buf, &shared.pump).await;
    record_closed(&shared, &session, &service.name, &report);
}

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

fn direction_json(d: &DirectionStats) -> Value {
    json!({
        "raw_bytes": d.raw_bytes,
        "wire_bytes": d.wire_bytes,
        "chunks": d.chunks,
        "digest": hex::encode(d.digest()),
    })
}

fn bind_admin(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "admin socket {} is in use: another pgferry-target runs with it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale admin socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    info!("admin socket {}", path.display());
    Ok(l)
}

/// Serves admin connections (one request each) until shutdown.
async fn serve_admin(shared: Arc<Shared>, listener: tokio::net::UnixListener) {
    let mut stop = shared.shutting_down.subscribe();
    loop {
        let mut stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!("admin socket: {e}"); continue; }
            },
            _ = stop.changed() => break,
        };
        let sh = shared.clone();
        tokio::spawn(async move {
            let answer = match admin::read_request(&mut stream).await {
                Ok(req) => match req["verb"].as_str().unwrap_or("") {
                    "clone" => admin_execute(&sh, &mut stream, Job::Clone).await,
                    "rollback" => {
                        let keep_slot = req["options"]["keep_slot"].as_bool().unwrap_or(false);
                        admin_execute(&sh, &mut stream, Job::Rollback { keep_slot }).await
                    }
                    "cutover" => match serde_json::from_value(req["options"].clone()) {
                        Ok(opts) => admin_execute(&sh, &mut stream, Job::Cutover(opts)).await,
                        Err(e) => json!({"ok": false, "error": format!("cutover options: {e}")}),
                    },
                    verb => admin_verb(&sh, verb).await,
                },
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            };
            let _ = write_admin_line(&mut stream, &answer).await;
        });
    }
    if let Some(t) = &shared.cfg.target {
        let _ = std::fs::remove_file(&t.admin_socket);
    }
}

async fn write_admin_line(stream: &mut tokio::net::UnixStream, v: &Value) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

/// A long admin verb, run by the executor.
enum Job {
    Clone,
    Cutover(super::migrate::CutoverOptions),
    Rollback { keep_slot: bool },
}

/// Runs a [`Job`], streaming its progress lines to the admin client.
async fn admin_execute(
    shared: &Arc<Shared>,
    stream: &mut tokio::net::UnixStream,
    job: Job,
) -> Value {
    // One migration step at a time: a second clone/cutover/rollback (an impatient retry from
    // another terminal) must not race the first.
    let Ok(_job) = shared.job.try_lock() else {
        return json!({"ok": false, "error": "another clone, cutover or rollback is running on this agent; wait for it (pgferry-target status shows the phase)"});
    };
    let Some(pc) = shared.current.borrow().clone() else {
        return json!({"ok": false, "error": "no tunnel to the source agent (is pgferry-source running and reachable?)"});
    };
    let Some(control) = pc.control.clone() else {
        return json!({"ok": false, "error": "no control stream"});
    };
    let settings = shared.cfg.target.clone().expect("target settings");
    let local = shared.cfg.services.iter().find_map(|s| match &s.endpoint {
        Endpoint::Tcp(a) if s.name == crate::runtime::config::DEFAULT_SERVICE => a
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?))),
        _ => None,
    });
    let Some(local) = local else {
        return json!({"ok": false, "error": "clone needs a TCP local endpoint for the postgres service"});
    };
    let migration = shared.identity.own.migration.to_string();
    let store = super::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sh = shared.clone();
    let work = async move {
        let progress = move |line: String| {
            info!("migration: {line}");
            let _ = tx.send(line);
        };
        let audit = |event: &str, details: Value| sh.audit.record(event, details);
        let exec = super::migrate::Executor {
            control: &control,
            settings: &settings,
            migration: &migration,
            local,
            store,
            audit: &audit,
            progress: &progress,
        };
        let check = async {
            let v = admin_verb(&sh, "preflight").await;
            if v["ok"] == true {
                Ok(())
            } else if let Some(e) = v["error"].as_str() {
                Err(anyhow!("preflight: {e}"))
            } else {
                let failed: Vec<String> = v["checks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ok"] == false)
                    .map(|c| {
                        format!(
                            "{}: {} (fix: {})",
                            c["name"].as_str().unwrap_or(""),
                            c["detail"].as_str().unwrap_or(""),
                            c["fix"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                Err(anyhow!("preflight failed: {}", failed.join("; ")))
            }
        };
        let r = match &job {
            Job::Clone => exec
                .clone_standby(check)
                .await
                .map(|s| json!({"phase": s.phase()})),
            Job::Cutover(opts) => exec.cutover(opts).await,
            Job::Rollback { keep_slot } => exec.rollback_requested(*keep_slot).await,
        };
        let phase = exec.store.load().map(|s| s.phase()).unwrap_or("unknown");
        (r, phase)
    };
    let forward = async {
        while let Some(line) = rx.recv().await {
            let _ = write_admin_line(stream, &json!({"progress": line})).await;
        }
    };
    let ((result, phase), ()) = tokio::join!(work, forward);
    match result {
        Ok(report) => json!({"ok": true, "phase": phase, "report": report}),
        Err(e) => json!({"ok": false, "error": format!("{e:#}"), "phase": phase}),
    }
}

/// While the standby catches up, records the lag from both ends in the audit log.
async fn sample_lag(shared: Arc<Shared>) {
    let settings = shared.cfg.target.clone().expect("target settings");
    let migration = shared.identity.own.migration.to_string();
    let store = super::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let mut stop = shared.shutting_down.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.lag_sample) => {}
            _ = stop.changed() => return,
        }
        let catching_up = matches!(
            store.load(),
            Ok(crate::migration::State::CatchingUp { .. } | crate::migration::State::Ready { .. })
        );
        if !catching_up {
            continue;
        }
        let current = shared.current.borrow().clone();
        let st = admin_status(&shared, current).await;
        shared.audit.record(
            "lag_sample",
            json!({
                "lag_bytes": st["lag_bytes"],
                "source_lsn": st["source"]["current_lsn"],
                "replay_lsn": st["new_cluster"]["replay_lsn"],
                "replay_lag_ms": st["source"]["replication"][0]["replay_lag_ms"],
                "tunnel": st["tunnel"]["state"],
                "udp_bytes_received": st["tunnel"]["udp_bytes_received"],
            }),
        );
    }
}

/// `status`: tunnel, migration phase, and lag from both ends.
async fn admin_status(shared: &Arc<Shared>, current: Option<PeerConn>) -> Value {
    let settings = shared.cfg.target.clone().expect("target settings");
    let migration = shared.identity.own.migration.to_string();
    let store = super::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let state = store.load();
    let phase = match &state {
        Ok(s) => json!(s),
        Err(e) => json!({"phase": "unknown", "error": format!("{e:#}")}),
    };
    let Some(pc) = current else {
        return json!({"ok": false, "tunnel": {"state": "down"}, "migration": phase, "error": "no tunnel to the source agent (is pgferry-source running and reachable?)"});
    };
    let qs = pc.conn.stats();
    let mut out = json!({
        "ok": true,
        "tunnel": {
            "state": "up",
            "peer": {
                "address": pc.conn.remote_address().to_string(),
                "role": pc.peer.role.to_string(),
                "region": pc.peer.region.to_string(),
                "migration": pc.peer.migration.to_string(),
                "fingerprint": pc.peer.fingerprint.to_string(),
            },
            "streams": pc.stats.streams.load(Ordering::SeqCst),
            "rtt_ms": pc.conn.rtt().as_millis() as u64,
            "udp_bytes_received": qs.udp_rx.bytes,
            "udp_bytes_sent": qs.udp_tx.bytes,
        },
        "migration": phase,
    });
    use crate::migration::State as S;
    let slot = state.ok().and_then(|s| match s {
        S::SlotCreated { slot }
        | S::BaseBackupDone { slot }
        | S::StandbyStarted { slot }
        | S::CatchingUp { slot }
        | S::Ready { slot } => Some(slot),
        _ => None,
    });
    if let Some(control) = &pc.control {
        match control
            .request(
                crate::control::Request::Status { slot },
                Duration::from_secs(20),
            )
            .await
        {
            Ok(crate::control::Response::Status { status }) => out["source"] = json!(status),
            Ok(other) => out["source"] = json!({"error": format!("{other:?}")}),
            Err(e) => out["source"] = json!({"error": format!("{e:#}")}),
        }
    }
    let running = settings
        .data_dir
        .as_ref()
        .is_some_and(|d| d.join("postmaster.pid").exists());
    if running {
        let standby = match super::migrate::connect_new_cluster(&settings).await {
            Ok(c) => super::migrate::standby_status(&c).await,
            Err(e) => Err(e),
        };
        match standby {
            Ok(st) => {
                let src = out["source"]["current_lsn"]
                    .as_str()
                    .and_then(|s| s.parse::<crate::migration::Lsn>().ok());
                if let (Some(src), Some(replay)) = (src, st.replay_lsn) {
                    out["lag_bytes"] = json!(src.0.saturating_sub(replay.0));
                }
                if let Some(ms) = out["source"]["replication"][0]["replay_lag_ms"].as_u64() {
                    out["lag_ms_source"] = json!(ms);
                }
                out["new_cluster"] = json!(st);
            }
            Err(e) => out["new_cluster"] = json!({"error": format!("{e:#}")}),
        }
    }
    out
}

async fn admin_verb(shared: &Arc<Shared>, verb: &str) -> Value {
    let current = shared.current.borrow().clone();
    match verb {
        "status" => admin_status(shared, current).await,
        "preflight" => {
            let Some(pc) = current else {
                return json!({"ok": false, "error": "no tunnel to the source agent (is pgferry-source running and reachable?)"});
            };
            let Some(control) = pc.control.clone() else {
                return json!({"ok": false, "error": "no control stream"});
            };
            let t0 = Instant::now();
            let r = control
                .request(
                    crate::control::Request::PreflightFacts,
                    Duration::from_secs(60),
                )
                .await;
            let rtt_ms = t0.elapsed().as_millis() as u64;
            let facts = match r {
                Ok(crate::control::Response::Facts { facts }) => facts,
                Ok(crate::control::Response::Error { message }) => {
                    return json!({"ok": false, "error": format!("the source agent could not gather its facts: {message}")})
                }
                Ok(other) => {
                    return json!({"ok": false, "error": format!("unexpected answer {other:?}")})
                }
                Err(e) => return json!({"ok": false, "error": format!("{e:#}")}),
            };
            let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            let now_ms = (now_ms as u64).saturating_sub(rtt_ms / 2);
            let settings = shared.cfg.target.clone().expect("target settings");
            let tf = match tokio::task::spawn_blocking(move || {
                admin::target_facts(&settings, now_ms, rtt_ms)
            })
            .await
            {
                Ok(Ok(tf)) => tf,
                Ok(Err(e)) => return json!({"ok": false, "error": format!("{e:#}")}),
                Err(e) => return json!({"ok": false, "error": e.to_string()}),
            };
            let checks = crate::preflight::evaluate(&facts, &tf);
            let ok = checks.iter().all(|c| c.ok);
            shared.audit.record(
                "preflight",
                json!({
                    "ok": ok,
                    "failed": checks.iter().filter(|c| !c.ok).map(|c| c.name.clone()).collect::<Vec<_>>(),
                    "checks": checks.len() as u64,
                }),
            );
            json!({"ok": ok, "checks": checks, "source": facts, "target": tf})
        }
        other => {
            json!({"ok": false, "error": format!("unknown verb {other:?}; known: {}", admin::VERBS.join(", "))})
        }
    }
}

fn record_closed(shared: &Shared, session: &str, service: &str, r: &StreamReport) {
    let duration_ms = r.started.elapsed().as_millis() as u64;
    match &r.outcome {
        Outcome::Ok => info!(
            "session {session} ({service}) closed: sent {} B ({} B on the wire), received {} B ({} B on the wire), {duration_ms} ms",
            r.sent.raw_bytes, r.sent.wire_bytes, r.received.raw_bytes, r.received.wire_bytes
        ),
        Outcome::IntegrityFailure(m) => {
            error!("session {session} ({service}): INTEGRITY FAILURE, stream reset, nothing of the bad chunk delivered: {m}");
            shared.audit.record(
                "integrity_failure",
                json!({"session_id": session, "service": service, "reason": m, "delivered_chunks": r.received.chunks, "delivered_bytes": r.received.raw_bytes}),
            );
        }
        o => warn!(
            "session {session} ({service}) closed with {}: {}",
            o.label(),
            o.detail()
        ),
    }
    shared.audit.record(
        "stream_closed",
        json!({
            "session_id": session,
            "service": service,
            "outcome": r.outcome.label(),
            "detail": r.outcome.detail(),
            "duration_ms": duration_ms,
            "sent": direction_json(&r.sent),
            "received": direction_json(&r.received),
        }),
    );
}

enum LocalListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn bind_local(ep: &Endpoint, allow_non_loopback: bool) -> Result<LocalListener> {
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

async fn serve_local(shared: Arc<Shared>, service: Service, listener: LocalListener) {
    let mut stop = shared.shutting_down.subscribe();
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
        let sh = shared.clone();
        let service = service.clone();
        let guard = StreamGuard::new(&shared.activity);
        tokio::spawn(async move {
            let _guard = guard;
            target_stream(sh, service, local, peer_desc).await;
        });
    }
}

async fn target_stream(shared: Arc<Shared>, service: Service, local: LocalConn, client: String) {
    let session_id = shared.next_session.fetch_add(1, Ordering::SeqCst);
    let session = format!("{session_id:016x}");
    // Wait (bounded) for the tunnel: a client arriving during a reconnect is not refused at once.
    let mut rx = shared.current.subscribe();
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
    shared.audit.record(
        "stream_opened",
        json!({"session_id": session, "service": service.name, "client": client, "peer_fingerprint": pc.peer.fingerprint.to_string()}),
    );
    let report = pump::pump(local, send, recv, BytesMut::new(), &shared.pump).await;
    if let Outcome::PeerReset { code, message } = &report.outcome {
        warn!("session {session}: source reset the connection ({code:?}): {message}");
    }
    record_closed(&shared, &session, &service.name, &report);
}
