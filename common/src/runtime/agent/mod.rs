//! The tunnel both agents share: QUIC endpoint, handshake and policy, Hello, peer re-checks,
//! drain, and the audit of sessions and streams. What a role does with a connection is its
//! [`RoleDriver`]'s business (`pgferry-source` and `pgferry-target` each have one); this file
//! never branches on the role.
//!
//! ```text
//!   run_agent(config, role, shutdown)
//!     ├─ TlsIdentity::load ── own certificate must pass the policy, or no start
//!     ├─ AuditLog::open ───── role.prepare (binds what must fail the start) ─ agent_started
//!     ├─ QUIC endpoint ────── listen: accept loop │ connect: dial loop with back-off
//!     │    └─ per connection: handshake (refusals audited) → Hello/HelloAck → role.serve
//!     │          source: answers requests, accepts data streams → upstream → pump
//!     │          target: publishes the connection for its listeners and its migration
//!     ├─ role.start ───────── the role's own tasks (target: local listeners, admin socket)
//!     └─ shutdown: stop accepting, drain streams (bounded), close, role.stopped,
//!                  agent_stopped + checkpoint
//! ```
//!
//! Roles come from certificates, not from who dials: either agent may listen or connect.
//! `endpoint` builds the QUIC endpoint; `records` writes the tunnel's audit records.

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

mod endpoint;
mod records;

use super::config::{AgentConfig, Transport};
use super::pump::{self, PumpOptions, StreamReport};
use super::tls::{self, RefusalSlot, TlsIdentity};
use crate::admission::{HandshakeLimits, PendingHandshakes, RefusalLimiter, Verdict};
use crate::audit::event::{AgentStopped, AuditEvent};
use crate::audit::{AuditLog, CheckpointSigner};
use crate::control::{
    self, ControlMessage, Hello, StreamKind, MAX_CONTROL_MESSAGE, PROTOCOL_VERSION,
};
use crate::identity::{PeerIdentity, Policy, Role};
use endpoint::{make_endpoint, transport_config};
use records::{
    record_accepted, record_closed, record_session_ended, record_started, write_refusal_summaries,
    Audit,
};

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
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
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
}

/// A role's part of the agent. The tunnel calls into it and never branches on the role:
/// `pgferry-source` answers requests and forwards to PostgreSQL, `pgferry-target` offers local
/// endpoints and drives the migration.
pub trait RoleDriver: Send + Sync + Sized + 'static {
    /// The role this driver plays; the agent's certificate must name the same.
    fn role(&self) -> Role;
    /// Binds what must fail the start (local endpoints, an admin socket), after the audit log
    /// is open and before `agent_started` is recorded.
    fn prepare(&mut self, cfg: &AgentConfig) -> impl Future<Output = Result<()>> + Send;
    /// Starts the role's own tasks once the endpoint is up; they end when
    /// [`Tunnel::shutting_down`] says so.
    fn start(self: &Arc<Self>, tunnel: &Tunnel, tasks: &mut tokio::task::JoinSet<()>);
    /// Serves one authenticated connection after Hello, with the control stream; returns why
    /// the connection ended.
    fn serve(
        self: Arc<Self>,
        tunnel: Tunnel,
        conn: PeerConn,
        control: ControlStream,
    ) -> impl Future<Output = String> + Send;
    /// After the drain, before `agent_stopped`: removes what `prepare` made (sockets).
    fn stopped(&self, cfg: &AgentConfig);
}

/// The control stream after Hello: both halves and the bytes already read past the Hello.
pub struct ControlStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub buf: BytesMut,
}

/// The shared tunnel as a role sees it: configuration, audit log, pump options, the stream
/// count the drain waits for, the shutdown signal.
#[derive(Clone)]
pub struct Tunnel(Arc<Shared>);

impl Tunnel {
    pub fn cfg(&self) -> &AgentConfig {
        &self.0.cfg
    }
    /// This agent's own certificate identity.
    pub fn own(&self) -> &PeerIdentity {
        &self.0.identity.own
    }
    /// Appends an audit record (a failure to write is logged; the agent keeps serving).
    pub fn audit(&self, event: &str, details: Value) {
        self.0.audit.record(event, details)
    }
    /// Appends a typed audit record ([`crate::audit::event`]).
    pub fn audit_event<E: AuditEvent>(&self, e: &E) {
        self.0.audit.event(e)
    }
    pub fn pump_options(&self) -> &PumpOptions {
        &self.0.pump
    }
    /// Counts a forwarded stream until dropped: shutdown drains these.
    pub fn stream_guard(&self) -> StreamGuard {
        StreamGuard::new(&self.0.activity)
    }
    /// Forwarded streams running now.
    pub fn streams_running(&self) -> usize {
        self.0.activity.streams.load(Ordering::SeqCst)
    }
    /// A new forwarded session's id (unique per run and across runs).
    pub fn next_session_id(&self) -> u64 {
        self.0.next_session.fetch_add(1, Ordering::SeqCst)
    }
    /// Becomes `true` when the agent starts shutting down.
    pub fn shutting_down(&self) -> watch::Receiver<bool> {
        self.0.shutting_down.subscribe()
    }
    /// Logs and audits the end of a forwarded stream.
    pub fn record_closed(&self, session: &str, service: &str, r: &StreamReport) {
        record_closed(&self.0, session, service, r)
    }
    /// Holds a forwarded connection whose stream was lost until the peer resumes it over a new
    /// connection ([`Tunnel::resume_held`]): the new stream, or why not (the grace period
    /// passed, the peer agent restarted, shutdown).
    pub async fn hold(
        &self,
        session_id: u64,
        token: [u8; 32],
        peer: crate::identity::Fingerprint,
        peer_run: Option<u64>,
    ) -> std::result::Result<pump::Streams, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut held = self.0.held.map.lock().unwrap_or_else(|e| e.into_inner());
            held.insert(
                session_id,
                Held {
                    token,
                    peer,
                    peer_run,
                    tx,
                },
            );
        }
        self.0.held.changed.notify_waiters();
        // The peer may have reconnected as a new run before this stream noticed its loss.
        if self.0.held.released_for_new_run(session_id) {
            return Err("the peer agent restarted (a new run of its certificate connected)".into());
        }
        let grace = self.0.cfg.resume_grace;
        let mut stop = self.shutting_down();
        let got = tokio::select! {
            r = tokio::time::timeout(grace, rx) => match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(_)) => Err("the peer agent restarted (another run of its certificate connected)".to_string()),
                Err(_) => Err(format!("no reconnection within the grace period ({} s)", grace.as_secs())),
            },
            _ = stop.wait_for(|s| *s) => Err("this agent is shutting down".to_string()),
        };
        if got.is_err() {
            let mut held = self.0.held.map.lock().unwrap_or_else(|e| e.into_inner());
            if held.get(&session_id).is_some_and(|h| h.tx.is_closed()) {
                held.remove(&session_id);
            }
        }
        got
    }
    /// Hands a resumed stream to the connection held under its session id, once the token and
    /// the peer's certificate match (waiting up to 10 s for the held side to notice its own
    /// loss). On error, says why and gives the streams back (to be refused).
    pub async fn resume_held(
        &self,
        header: &crate::control::ResumeHeader,
        peer: &crate::identity::Fingerprint,
        streams: pump::Streams,
    ) -> std::result::Result<(), (String, pump::Streams)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.0.held.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.0.held.map.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(h) = held.get(&header.session_id) {
                    if !h.admits(header, peer) {
                        return Err((
                            format!(
                                "session {:016x}: not resumable by this connection (token or certificate differs)",
                                header.session_id
                            ),
                            streams,
                        ));
                    }
                    let h = held.remove(&header.session_id).expect("present");
                    return h.tx.send(streams).map_err(|streams| {
                        (
                            format!(
                                "session {:016x}: its grace period just ended",
                                header.session_id
                            ),
                            streams,
                        )
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err((
                    format!(
                        "session {:016x}: no connection held under this id (ended, or its grace period passed)",
                        header.session_id
                    ),
                    streams,
                ));
            }
        }
    }
}

/// The token that lets the peer resume the stream `session_id` begun on `conn` (see
/// [`crate::control::ResumeHeader`]); `None` if the TLS session cannot export one.
pub fn resume_token(conn: &quinn::Connection, session_id: u64) -> Option<[u8; 32]> {
    let mut token = [0; 32];
    conn.export_keying_material(
        &mut token,
        crate::control::RESUME_TOKEN_LABEL,
        &crate::control::resume_token_context(session_id),
    )
    .ok()?;
    Some(token)
}

/// Forwarded connections held after their stream was lost, by session id.
#[derive(Default)]
struct HeldStreams {
    map: Mutex<std::collections::HashMap<u64, Held>>,
    changed: Notify,
    /// The run each peer certificate last connected with.
    runs: Mutex<std::collections::HashMap<crate::identity::Fingerprint, Option<u64>>>,
}

struct Held {
    token: [u8; 32],
    peer: crate::identity::Fingerprint,
    peer_run: Option<u64>,
    tx: tokio::sync::oneshot::Sender<pump::Streams>,
}

impl Held {
    /// Whether `header` from `peer` may take this held stream: the same certificate and the
    /// token of the connection it began on (compared in constant time).
    fn admits(
        &self,
        header: &crate::control::ResumeHeader,
        peer: &crate::identity::Fingerprint,
    ) -> bool {
        blake3::Hash::from(self.token) == blake3::Hash::from(header.token) && &self.peer == peer
    }
}

impl HeldStreams {
    /// `peer` connected as run `run`: the streams held for another run of it can never be
    /// resumed (the peer agent restarted) and are let go.
    fn peer_connected(&self, peer: crate::identity::Fingerprint, run: Option<u64>) {
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, run);
        self.release_other_runs(&peer, run);
    }

    fn release_other_runs(&self, peer: &crate::identity::Fingerprint, run: Option<u64>) {
        let mut held = self.map.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, h| &h.peer != peer || h.peer_run == run);
    }

    /// After holding `session_id`: if its peer has connected since as another run, lets it go
    /// and says so.
    fn released_for_new_run(&self, session_id: u64) -> bool {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let stale = held
            .get(&session_id)
            .is_some_and(|h| runs.get(&h.peer).is_some_and(|r| *r != h.peer_run));
        if stale {
            held.remove(&session_id);
        }
        stale
    }
}

/// Counts running forwarded streams so shutdown can drain them.
#[derive(Default)]
struct Activity {
    streams: AtomicUsize,
    idle: Notify,
}

/// Held by each forwarded stream: the drain at shutdown waits until none is left.
pub struct StreamGuard(Arc<Activity>);
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
    next_session: AtomicU64,
    shutting_down: watch::Sender<bool>,
    /// Forwarded connections held for the peer to resume them.
    held: HeldStreams,
    /// The live connection of each authenticated peer certificate (see `serve_connection`: a
    /// reconnecting peer replaces its old connection; at most [`MAX_PEER_CONNECTIONS`]).
    peers: Mutex<std::collections::HashMap<crate::identity::Fingerprint, quinn::Connection>>,
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

/// One authenticated connection to the peer agent.
#[derive(Clone)]
pub struct PeerConn {
    pub conn: quinn::Connection,
    pub peer: Arc<PeerIdentity>,
    /// The peer agent's run (random per start, from its Hello): a stream held for a run that
    /// is not the peer's current one can never be resumed.
    pub peer_run: Option<u64>,
    /// Data streams carried by this connection (for `session_ended`).
    pub stats: Arc<ConnStats>,
}

/// Runs an agent until `shutdown` resolves, then drains and stops.
pub async fn run_agent<R: RoleDriver>(
    cfg: AgentConfig,
    mut role: R,
    shutdown: impl Future<Output = ()> + Send,
    opts: RunOptions,
) -> Result<()> {
    // Poll the shutdown future once before anything else: the signal handler it installs
    // (`cli::shutdown_signal`) is then in place before `agent_started` is recorded, so a
    // SIGTERM that follows at once stops the agent cleanly instead of killing it.
    let mut shutdown = std::pin::pin!(shutdown);
    let stop_requested =
        std::future::poll_fn(|cx| std::task::Poll::Ready(shutdown.as_mut().poll(cx).is_ready()))
            .await;
    if role.role() != cfg.role {
        bail!(
            "this is the {} agent, but its configuration is for the {} role",
            role.role(),
            cfg.role
        );
    }
    let identity = load_identity(&cfg)?;
    let signer = CheckpointSigner::new(&identity.key_pkcs8, &identity.cert)
        .context("preparing the audit checkpoint signer")?;
    let log = AuditLog::open(&cfg.audit_log, signer)
        .with_context(|| format!("opening audit log {}", cfg.audit_log.display()))?;
    let audit = Audit(Arc::new(Mutex::new(log)));
    // What the role binds (local endpoints, admin socket) comes first, so that a port in use
    // fails the start.
    role.prepare(&cfg).await?;
    let role = Arc::new(role);
    record_started(&audit, &cfg, &identity);

    let session_base = session_base()?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: crate::AGENT_VERSION.into(),
        migration: identity.own.migration.to_string(),
        role: cfg.role,
        capabilities: vec![
            "zstd".into(),
            "blake3".into(),
            format!("{RUN_CAPABILITY}{session_base:016x}"),
        ],
    };
    let shared = Arc::new(Shared {
        pump: PumpOptions {
            compression_level: cfg.compression_level,
            level_control: crate::level::SharedLevel::new(cfg.compression_level),
            #[cfg(feature = "test-hooks")]
            fault: opts.fault.clone(),
        },
        cfg,
        identity,
        audit: audit.clone(),
        hello,
        activity: Arc::new(Activity::default()),
        next_session: AtomicU64::new(session_base),
        shutting_down: watch::channel(false).0,
        held: HeldStreams::default(),
        peers: Mutex::new(std::collections::HashMap::new()),
        refusals: Mutex::new(RefusalLimiter::new()),
    });
    let tunnel = Tunnel(shared.clone());

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
    role.start(&tunnel, &mut tasks);
    {
        let sh = shared.clone();
        tasks.spawn(async move { flush_refusals(sh).await });
    }
    {
        let sh = shared.clone();
        let ep = endpoint.clone();
        let role = role.clone();
        match sh.cfg.transport.clone() {
            Transport::Listen(_) => tasks.spawn(async move { accept_loop(sh, role, ep).await }),
            Transport::Connect { addr, server_name } => {
                tasks.spawn(async move { dial_loop(sh, role, ep, addr, server_name).await })
            }
        };
    }

    if !stop_requested {
        shutdown.await;
    }
    drain_and_stop(&shared, &endpoint, tasks, role.as_ref()).await;
    Ok(())
}

/// The agent's own certificate, which must pass the same policy as a peer's, or no start.
fn load_identity(cfg: &AgentConfig) -> Result<TlsIdentity> {
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
    let own = &identity.own;
    info!(
        "certificate {}: role {}, region {}, migration {}, fingerprint {}",
        cfg.cert.display(),
        own.role,
        own.region,
        own.migration,
        own.fingerprint
    );
    Ok(identity)
}

/// The first forwarded session id of this run: top bits random, low 20 bits count, so ids
/// are unique per run and across runs.
fn session_base() -> Result<u64> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow!("system random generator failed"))?;
    Ok(u64::from_be_bytes(b) & !0xF_FFFF)
}

/// Shutdown: no new connections; forwarded streams drain (bounded by the drain timeout);
/// the endpoint closes, so every connection records `session_ended` (with its checkpoint)
/// before `agent_stopped`.
async fn drain_and_stop<R: RoleDriver>(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    mut tasks: tokio::task::JoinSet<()>,
    role: &R,
) {
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
    // Tasks that do not finish promptly once the endpoint is closed are aborted.
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
    write_refusal_summaries(shared, left_over);
    role.stopped(&shared.cfg);
    shared.audit.event(&AgentStopped {
        drained,
        streams_cut: if drained { 0 } else { left as u64 },
    });
    shared.audit.checkpoint();
    info!("stopped");
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
async fn accept_loop<R: RoleDriver>(shared: Arc<Shared>, role: Arc<R>, endpoint: quinn::Endpoint) {
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
        let role = role.clone();
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
                Ok(Ok(conn)) => serve_connection(sh, role, conn, false).await,
                Ok(Err(e)) => handshake_failed(&sh, remote, &slot, &e),
                // Dropping `Connecting` closes the connection.
                Err(_) => handshake_timed_out(&sh, remote),
            }
        });
    }
    // The endpoint is closed by `run_agent` after the drain; the connections then end.
    while conns.join_next().await.is_some() {}
}

async fn dial_loop<R: RoleDriver>(
    shared: Arc<Shared>,
    role: Arc<R>,
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
        match dial_once(&shared, &role, &endpoint, &addr, &server_name).await {
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

async fn dial_once<R: RoleDriver>(
    shared: &Arc<Shared>,
    role: &Arc<R>,
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
            serve_connection(shared.clone(), role.clone(), conn, true).await;
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

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity> {
    let certs = conn
        .peer_identity()
        .context("peer presented no certificate")?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().context("peer presented no certificate")?;
    Ok(PeerIdentity::from_der(leaf)?)
}

async fn serve_connection<R: RoleDriver>(
    shared: Arc<Shared>,
    role: Arc<R>,
    conn: quinn::Connection,
    dialed: bool,
) {
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

    let Some((control, peer_run)) = hello_or_refuse(&shared, &conn, &peer, dialed).await else {
        return;
    };
    record_accepted(&shared, &conn, &peer, dialed, alpn);
    let started = Instant::now();
    if !admit_peer(&shared, &conn, &peer) {
        return;
    }
    let stats = Arc::new(ConnStats::default());
    let (send, recv, buf) = control;
    // Streams held for an earlier run of this peer will never be resumed: let them go now (and
    // any held later, see `Tunnel::hold`).
    shared.held.peer_connected(peer.fingerprint, peer_run);
    let pc = PeerConn {
        conn: conn.clone(),
        peer: peer.clone(),
        peer_run,
        stats: stats.clone(),
    };
    let watcher = tokio::spawn(watch_peer(shared.clone(), conn.clone(), peer.clone()));
    // The role serves the connection: the control stream's typed requests (the target asks,
    // the source answers, whichever side dialed) and the data streams.
    let reason = role
        .serve(
            Tunnel(shared.clone()),
            pc,
            ControlStream { send, recv, buf },
        )
        .await;
    watcher.abort();
    record_session_ended(&shared, &conn, &peer, &reason, started, &stats);
}

/// The Hello exchange (version, migration and role as the peer itself announces them), with a
/// time limit; a failure or refusal is logged and audited, and the connection closed.
async fn hello_or_refuse(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    dialed: bool,
) -> Option<(ControlHalves, Option<u64>)> {
    let remote = conn.remote_address();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, exchange_hello(shared, conn, dialed)).await;
    match hello {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) if conn.close_reason().is_some() => {
            // The peer went away before completing Hello: not a refusal by us.
            let reason = format!("connection closed before Hello: {e:#}");
            warn!("handshake with {remote} failed: {reason}");
            shared.audit.record(
                "handshake_failed",
                json!({"address": remote.to_string(), "fingerprint": peer.fingerprint.to_string(), "reason": reason}),
            );
            None
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
            None
        }
        Err(_) => {
            warn!(
                "peer {remote}: no Hello within {} s",
                HELLO_TIMEOUT.as_secs()
            );
            conn.close(2u32.into(), b"hello timeout");
            None
        }
    }
}

/// A peer that reconnects (an agent restarted after a crash, or a path that changed) replaces
/// its old connection at once, rather than when the idle timeout notices; the old one's
/// sessions (a walsender holding the replication slot) end with it. This comes before the
/// count, so an authenticated peer always gets in. `false`: refused (too many peers).
fn admit_peer(shared: &Shared, conn: &quinn::Connection, peer: &PeerIdentity) -> bool {
    let remote = conn.remote_address();
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
        return false;
    }
    true
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

/// What the tunnel counts per connection.
#[derive(Default, Debug)]
pub struct ConnStats {
    /// Data streams opened or accepted on it.
    pub streams: AtomicU64,
}

/// The control stream's halves and the bytes read past the Hello.
type ControlHalves = (quinn::SendStream, quinn::RecvStream, BytesMut);

/// Capability prefix of the sender's run id in [`Hello::capabilities`].
const RUN_CAPABILITY: &str = "run:";

/// The run id a peer's Hello announces.
fn peer_run(h: &Hello) -> Option<u64> {
    h.capabilities
        .iter()
        .find_map(|c| c.strip_prefix(RUN_CAPABILITY))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
}

async fn exchange_hello(
    shared: &Shared,
    conn: &quinn::Connection,
    dialed: bool,
) -> Result<(ControlHalves, Option<u64>)> {
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
                Ok(((send, recv, buf), peer_run(&h)))
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
        Ok(((send, recv, buf), peer_run(&h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ResumeHeader;
    use crate::identity::Fingerprint;

    fn held(token: [u8; 32], peer: u8, run: u64) -> Held {
        Held {
            token,
            peer: Fingerprint([peer; 32]),
            peer_run: Some(run),
            tx: tokio::sync::oneshot::channel().0,
        }
    }

    #[test]
    fn a_held_stream_admits_only_its_token_and_certificate() {
        let h = held([7; 32], 1, 9);
        let mut header = ResumeHeader {
            session_id: 42,
            token: [7; 32],
        };
        assert!(h.admits(&header, &Fingerprint([1; 32])));
        // Another certificate (another agent of the same migration), right token.
        assert!(!h.admits(&header, &Fingerprint([2; 32])));
        // Right certificate (a second copy of the agent), any other token.
        for i in 0..32 {
            header.token = [7; 32];
            header.token[i] ^= 1;
            assert!(!h.admits(&header, &Fingerprint([1; 32])));
        }
    }

    #[test]
    fn a_restarted_peer_releases_only_its_own_held_streams() {
        let streams = HeldStreams::default();
        {
            let mut m = streams.map.lock().unwrap();
            m.insert(1, held([0; 32], 1, 100));
            m.insert(2, held([0; 32], 1, 100));
            m.insert(3, held([0; 32], 2, 100));
        }
        // The same run reconnects: nothing is released.
        streams.release_other_runs(&Fingerprint([1; 32]), Some(100));
        assert_eq!(streams.map.lock().unwrap().len(), 3);
        // Peer 1 restarted: its streams go, peer 2's stay.
        streams.release_other_runs(&Fingerprint([1; 32]), Some(101));
        let left: Vec<u64> = streams.map.lock().unwrap().keys().copied().collect();
        assert_eq!(left, [3]);
        // A stream of the old run held after the new run connected is let go at once.
        streams.peer_connected(Fingerprint([1; 32]), Some(101));
        streams.map.lock().unwrap().insert(4, held([0; 32], 1, 100));
        assert!(streams.released_for_new_run(4));
        streams.map.lock().unwrap().insert(5, held([0; 32], 1, 101));
        assert!(!streams.released_for_new_run(5));
        assert!(
            !streams.released_for_new_run(3),
            "peer 2 has not reconnected"
        );
    }

    #[test]
    fn the_run_id_is_read_from_the_hello() {
        let mut h = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "x".into(),
            migration: "m".into(),
            role: crate::identity::Role::Target,
            capabilities: vec!["zstd".into(), format!("{RUN_CAPABILITY}00000000000abc00")],
        };
        assert_eq!(peer_run(&h), Some(0xabc00));
        h.capabilities = vec!["zstd".into()];
        assert_eq!(peer_run(&h), None);
    }
}
