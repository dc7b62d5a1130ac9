//! `pgferry-source`: the agent on the old host, next to PostgreSQL (which keeps listening on
//! loopback only). It serves the shared tunnel ([`pgferry_common::runtime::agent`]) in the
//! source role: it answers the target's typed requests with fixed operations on its own
//! PostgreSQL connection, and connects each forwarded stream to the configured upstream.
//!
//! ```text
//!                        ┌─ control stream ─► requests::serve_requests ─► pg / fence ─┐
//!   target ══ QUIC ══ tunnel                                                          ├─► PostgreSQL
//!                        └─ data streams ───► forward::source_stream ─► pump ─────────┘   (loopback)
//! ```
//!
//! # Layout
//! - [`backup`]: the data directory as an agent-owned base copy sees it.
//! - [`config`]: the `[source]` section and `run` flags, beside the shared tunnel settings.
//! - [`forward`]: each data stream → the configured upstream, pumped and verified.
//! - [`requests`]: the control stream's typed requests, one at a time, audited.
//! - [`pg`]: each request's fixed statements (facts, slots, status, stop, pre-pass).
//! - [`fence`]: the fence (pg_hba.conf, read-only, sessions ended) and its exact undoing.
//!
//! The binary (`main.rs`) only parses flags and calls [`run`].
#![forbid(unsafe_code)]

pub mod backup;
pub mod config;
pub mod fence;
pub mod forward;
pub mod pg;
pub mod requests;

use std::future::Future;
use std::sync::Arc;

use anyhow::Result;
use pgferry_common::identity::Role;
use pgferry_common::runtime::agent::{
    run_agent, ControlStream, PeerConn, RoleDriver, RunOptions, Tunnel,
};
use pgferry_common::runtime::config::AgentConfig;

use config::{SourceConfig, SourcePg};

/// The source role: nothing to bind, no tasks of its own; per connection, the request server
/// and the data streams.
#[derive(Debug, Default)]
pub struct Source {
    /// The connection for typed requests (`None`: answered with how to configure it).
    pg: Option<SourcePg>,
    /// The agent-owned base copy running, if any (it outlives a connection).
    backup: backup::SharedBackup,
}

impl RoleDriver for Source {
    fn role(&self) -> Role {
        Role::Source
    }

    async fn prepare(&mut self, _cfg: &AgentConfig) -> Result<()> {
        Ok(())
    }

    fn start(self: &Arc<Self>, _tunnel: &Tunnel, _tasks: &mut tokio::task::JoinSet<()>) {}

    async fn serve(
        self: Arc<Self>,
        tunnel: Tunnel,
        conn: PeerConn,
        control: ControlStream,
    ) -> String {
        let audit = tunnel.clone();
        let requests = tokio::spawn(requests::serve_requests(
            control.send,
            control.recv,
            control.buf,
            self.pg.clone(),
            self.backup.clone(),
            move |event, details| audit.audit(event, details),
        ));
        let reason = forward::accept_data_streams(&tunnel, &conn, &self.backup).await;
        requests.abort();
        reason
    }

    fn stopped(&self, _cfg: &AgentConfig) {}
}

/// Runs the source agent until `shutdown` resolves, then drains and stops.
pub async fn run(
    cfg: SourceConfig,
    shutdown: impl Future<Output = ()> + Send,
    opts: RunOptions,
) -> Result<()> {
    run_agent(
        cfg.tunnel,
        Source {
            pg: cfg.pg,
            backup: Default::default(),
        },
        shutdown,
        opts,
    )
    .await
}
