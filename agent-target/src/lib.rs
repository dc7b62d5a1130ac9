//! `pgferry-target`: the agent on the new host. It serves the shared tunnel
//! ([`pgferry_common::runtime::agent`]) in the target role: local endpoints where `psql`,
//! `pg_basebackup` and the standby's walreceiver connect (each client connection becomes one
//! data stream to the source agent), the admin socket the CLI verbs talk to, and the
//! migration executor that drives the source agent with typed requests.
//!
//! ```text
//!   psql, pg_basebackup, walreceiver ─► local ──── data streams ═══╗
//!   pgferry-target <verb> ─► server (admin socket) ─► migrate ─┐   ║ QUIC tunnel ═► source agent
//!                                       verify (pre-pass) ◄────┤   ║
//!                                       state_store ◄──────────┘   ║
//!                                       control_client ═ control stream ═╝
//! ```
//!
//! # Layout
//! - [`local`]: local endpoints (loopback TCP or 0600 unix sockets) → data streams.
//! - [`server`]: the admin socket: verbs, progress lines, status and preflight; the lag sampler.
//! - [`admin`]: the CLI side of the admin socket and the terminal rendering.
//! - [`control_client`]: typed requests to the source agent over the control stream.
//! - [`migrate`]: the executor of the migration's state machine (clone, catch-up, cutover,
//!   rollback), persisting each phase in [`state_store`] before its side effects.
//! - [`pooler`]: a PgBouncer in front of the old cluster, paused and switched at cutover.
//! - [`verify`]: the block-range pre-pass before the fence and its remainder at the fence.
//! - [`config`]: the `[target]` section and `run` flags, beside the shared tunnel settings.
//! - [`cli`]: this binary's clap tree.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod control_client;
pub mod local;
pub mod migrate;
pub mod pooler;
pub mod server;
pub mod state_store;
pub mod verify;

use std::future::Future;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::sync::watch;
use tracing::warn;

use pgferry_common::identity::Role;
use pgferry_common::runtime::agent::{
    run_agent, ControlStream, PeerConn, RoleDriver, RunOptions, Tunnel,
};
use pgferry_common::runtime::config::{AgentConfig, Endpoint, Service};

use config::{TargetConfig, TargetSettings};
use pgferry_common::runtime::pump;

use control_client::ControlClient;

/// Embedding options of the target role (tests use them; the binary uses the defaults).
#[derive(Debug, Default)]
pub struct TargetOptions {
    /// Receives the control client of every tunnel that comes up (a test drives the source
    /// agent's typed requests through it).
    pub tunnels: Option<tokio::sync::mpsc::UnboundedSender<Arc<ControlClient>>>,
}

/// The target role's state, shared by its tasks.
pub struct Target {
    settings: TargetSettings,
    /// The connection local clients and the migration use, while one is up.
    current: watch::Sender<Option<Link>>,
    /// Held while a clone, cutover or rollback runs; a second one is refused.
    job: tokio::sync::Mutex<()>,
    tunnels: Option<tokio::sync::mpsc::UnboundedSender<Arc<ControlClient>>>,
    /// Bound by `prepare`, served by `start`.
    bound: Mutex<Option<Bound>>,
}

struct Bound {
    listeners: Vec<(Service, local::LocalListener)>,
    admin: tokio::net::UnixListener,
}

/// A tunnel that is up, with its control client.
#[derive(Clone)]
pub(crate) struct Link {
    pc: PeerConn,
    control: Arc<ControlClient>,
}

impl std::ops::Deref for Link {
    type Target = PeerConn;
    fn deref(&self) -> &PeerConn {
        &self.pc
    }
}

/// What the target's tasks get: the shared tunnel and the role's state.
#[derive(Clone)]
pub(crate) struct Cx {
    tunnel: Tunnel,
    target: Arc<Target>,
}

impl Target {
    pub fn new(settings: TargetSettings, opts: TargetOptions) -> Self {
        Target {
            settings,
            current: watch::channel(None).0,
            job: tokio::sync::Mutex::new(()),
            tunnels: opts.tunnels,
            bound: Mutex::new(None),
        }
    }
}

impl RoleDriver for Target {
    fn role(&self) -> Role {
        Role::Target
    }

    /// Binds the local endpoints and the admin socket: a port or socket in use fails the start.
    async fn prepare(&mut self, cfg: &AgentConfig) -> Result<()> {
        let mut listeners = Vec::new();
        for s in &cfg.services {
            listeners.push((
                s.clone(),
                local::bind_local(&s.endpoint, cfg.allow_non_loopback_local).await?,
            ));
        }
        let admin = server::bind_admin(&self.settings.admin_socket)?;
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(Bound { listeners, admin });
        Ok(())
    }

    fn start(self: &Arc<Self>, tunnel: &Tunnel, tasks: &mut tokio::task::JoinSet<()>) {
        let cx = Cx {
            tunnel: tunnel.clone(),
            target: self.clone(),
        };
        let Some(bound) = self.bound.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tasks.spawn(server::serve_admin(cx.clone(), bound.admin));
        tasks.spawn(server::sample_lag(cx.clone()));
        for (service, l) in bound.listeners {
            tasks.spawn(local::serve_local(cx.clone(), service, l));
        }
    }

    async fn serve(
        self: Arc<Self>,
        _tunnel: Tunnel,
        pc: PeerConn,
        control: ControlStream,
    ) -> String {
        let client = Arc::new(ControlClient::new(control.send));
        if let Some(tx) = &self.tunnels {
            let _ = tx.send(client.clone());
        }
        let responses = tokio::spawn(control_client::read_responses(
            client.clone(),
            control.recv,
            control.buf,
        ));
        let conn = pc.conn.clone();
        self.current.send_replace(Some(Link {
            pc,
            control: client.clone(),
        }));
        // Any stream the source opens is a protocol violation: we never serve it.
        let reason = loop {
            match conn.accept_bi().await {
                Ok((mut s, mut r)) => {
                    warn!(
                        "peer {} opened a stream; only the target opens data streams",
                        conn.remote_address()
                    );
                    let _ = s.reset(pump::codes::PROTOCOL.into());
                    let _ = r.stop(pump::codes::PROTOCOL.into());
                }
                Err(e) => break e.to_string(),
            }
        };
        self.current.send_if_modified(|c| match c {
            Some(cur) if cur.conn.stable_id() == conn.stable_id() => {
                *c = None;
                true
            }
            _ => false,
        });
        responses.abort();
        // The aborted reader cannot fail the requests still waiting on this connection.
        client.close();
        reason
    }

    fn stopped(&self, cfg: &AgentConfig) {
        for s in &cfg.services {
            if let Endpoint::Unix(p) = &s.endpoint {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Cx {
    /// The tunnel up now, waiting up to a minute for one.
    async fn link(&self) -> Result<Link> {
        let mut rx = self.target.current.subscribe();
        let link = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            rx.wait_for(|c| c.as_ref().is_some_and(|l| l.conn.close_reason().is_none())),
        )
        .await
        .map_err(|_| {
            control_client::TunnelDown("the tunnel to the source is down (waited 60 s)".into())
        })??
        .clone()
        .expect("checked");
        Ok(link)
    }

    /// The control client of the tunnel up now (waiting up to a minute for one).
    pub(crate) async fn control_client(&self) -> Result<Arc<ControlClient>> {
        Ok(self.link().await?.control)
    }

    /// A new bidirectional stream to the source agent, waiting up to a minute for the tunnel.
    pub(crate) async fn open_data_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let link = self.link().await?;
        let streams = link
            .conn
            .open_bi()
            .await
            .map_err(|e| control_client::TunnelDown(format!("opening a stream: {e}")))?;
        link.stats
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(streams)
    }
}

/// Runs the target agent until `shutdown` resolves, then drains and stops.
pub async fn run(
    cfg: TargetConfig,
    shutdown: impl Future<Output = ()> + Send,
    opts: RunOptions,
    target: TargetOptions,
) -> Result<()> {
    run_agent(
        cfg.tunnel,
        Target::new(cfg.settings, target),
        shutdown,
        opts,
    )
    .await
}
