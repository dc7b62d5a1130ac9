//! The target's admin socket: the CLI verbs (`preflight`, `status`, `clone`, `cutover`,
//! `rollback`) arrive as one JSON request per connection; long ones stream their progress
//! lines, then the answer. Also the lag sampler that audits the catch-up.
//!
//! ```text
//!   pgferry-target <verb> ─► admin socket (0600) ─► serve_admin ─┬─ status / preflight (here)
//!                       ◄─ {"progress"}… {"ok", …} ◄──────────────┴─ clone / cutover / rollback
//!                                                                     └─ migrate::Executor
//! ```

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tracing::{info, warn};

use pgferry_common::admin::{
    AdminFailure, AdminLine, AdminRequest, CutoverOptions, Part, PeerStatus, PhaseStatus,
    PreflightReport, StatusReport, TunnelStatus,
};
use pgferry_common::audit::event::{AdminCommand, PreflightRun};
use pgferry_common::control::{Request, Response};
use pgferry_common::migration::State;
use pgferry_common::runtime::config::Endpoint;

use crate::{Cx, Link};

/// The answer of every verb that needs the tunnel while it is down.
const NO_TUNNEL: &str = "no tunnel to the source agent (is pgferry-source running and reachable?)";

pub(crate) fn bind_admin(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
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
pub(crate) async fn serve_admin(cx: Cx, listener: tokio::net::UnixListener) {
    let mut stop = cx.tunnel.shutting_down();
    loop {
        let mut stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!("admin socket: {e}"); continue; }
            },
            _ = stop.changed() => break,
        };
        let sh = cx.clone();
        tokio::spawn(async move {
            let request = crate::admin::read_request(&mut stream).await;
            if let Ok(req) = &request {
                record_operator(&sh, &stream, req);
            }
            let answer = match request {
                Ok(AdminRequest::Clone) => admin_execute(&sh, &mut stream, Job::Clone).await,
                Ok(AdminRequest::Rollback(o)) => {
                    let keep_slot = o.keep_slot;
                    admin_execute(&sh, &mut stream, Job::Rollback { keep_slot }).await
                }
                Ok(AdminRequest::Cutover(o)) => {
                    admin_execute(&sh, &mut stream, Job::Cutover(o)).await
                }
                Ok(AdminRequest::Status) => {
                    let current = sh.target.current.borrow().clone();
                    json!(admin_status(&sh, current).await)
                }
                Ok(AdminRequest::Preflight) => match admin_preflight(&sh).await {
                    Ok(report) => json!(report),
                    Err(failure) => json!(failure),
                },
                Err(e) => json!(AdminFailure::new(format!("{e:#}"))),
            };
            let _ = write_admin_line(&mut stream, &answer).await;
        });
    }
    let _ = std::fs::remove_file(&cx.target.settings.admin_socket);
}

/// Writes who ran a verb that changes something or reads the source (`status` runs every few
/// seconds under `--watch` and changes nothing, so it is not recorded).
fn record_operator(cx: &Cx, stream: &tokio::net::UnixStream, req: &AdminRequest) {
    if matches!(req, AdminRequest::Status) {
        return;
    }
    let Ok(cred) = stream.peer_cred() else {
        warn!("admin socket: no peer credentials for {}", req.verb());
        return;
    };
    let uid = cred.uid();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let options = serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("options").cloned());
    info!("admin: {} by {user} (uid {uid})", req.verb());
    cx.tunnel.audit_event(&AdminCommand {
        verb: req.verb().to_string(),
        uid,
        user,
        pid: cred.pid(),
        options,
    });
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
    Cutover(CutoverOptions),
    Rollback { keep_slot: bool },
}

/// Runs a [`Job`], streaming its progress lines to the admin client.
async fn admin_execute(cx: &Cx, stream: &mut tokio::net::UnixStream, job: Job) -> Value {
    // One migration step at a time: a second clone/cutover/rollback (an impatient retry from
    // another terminal) must not race the first.
    let Ok(_job) = cx.target.job.try_lock() else {
        return json!(AdminFailure::new("another clone, cutover or rollback is running on this agent; wait for it (pgferry-target status shows the phase)"));
    };
    if cx.target.current.borrow().is_none() {
        return json!(AdminFailure::new(NO_TUNNEL));
    }
    let settings = cx.target.settings.clone();
    let local = cx
        .tunnel
        .cfg()
        .services
        .iter()
        .find_map(|s| match &s.endpoint {
            Endpoint::Tcp(a) if s.name == pgferry_common::runtime::config::DEFAULT_SERVICE => a
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?))),
            _ => None,
        });
    let Some(local) = local else {
        return json!(AdminFailure::new(
            "clone needs a TCP local endpoint for the postgres service"
        ));
    };
    let migration = cx.tunnel.own().migration.to_string();
    let store = crate::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sh = cx.clone();
    let work = async move {
        let progress = move |line: String| {
            info!("migration: {line}");
            let _ = tx.send(line);
        };
        let audit = |event: &str, details: Value| sh.tunnel.audit(event, details);
        let control_cx = sh.clone();
        let control = move || -> pgferry_common::runtime::pump::BoxFuture<
            'static,
            anyhow::Result<std::sync::Arc<crate::control_client::ControlClient>>,
        > {
            let cx = control_cx.clone();
            Box::pin(async move { cx.control_client().await })
        };
        let streams_cx = sh.clone();
        let open_stream: crate::migrate::OpenStream = std::sync::Arc::new(move || {
            let cx = streams_cx.clone();
            Box::pin(async move { cx.open_data_stream().await })
        });
        let exec = crate::migrate::Executor {
            control: &control,
            settings: &settings,
            migration: &migration,
            local,
            store,
            audit: &audit,
            progress: &progress,
            outage_grace: sh.tunnel.cfg().resume_grace,
            open_stream,
            pump: sh.tunnel.pump_options(),
        };
        let check = async {
            let report = admin_preflight(&sh)
                .await
                .map_err(|f| anyhow!("preflight: {}", f.error))?;
            for c in report.checks.iter().filter(|c| c.ok && c.warning) {
                progress(format!(
                    "preflight warning: {}: {} (fix: {})",
                    c.name, c.detail, c.fix
                ));
            }
            if report.ok {
                return Ok(());
            }
            let failed: Vec<String> = report
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {} (fix: {})", c.name, c.detail, c.fix))
                .collect();
            Err(anyhow!("preflight failed: {}", failed.join("; ")))
        };
        let r = match &job {
            Job::Clone => exec
                .clone_standby(check)
                .await
                .map(|s| json!({"phase": s.phase()})),
            Job::Cutover(opts) => exec.cutover(opts).await.map(|r| json!(r)),
            Job::Rollback { keep_slot } => exec.rollback_requested(*keep_slot).await,
        };
        let phase = exec.store.load().map(|s| s.phase()).unwrap_or("unknown");
        (r, phase)
    };
    let forward = async {
        while let Some(line) = rx.recv().await {
            let _ = write_admin_line(stream, &json!(AdminLine::Progress { progress: line })).await;
        }
    };
    let ((result, phase), ()) = tokio::join!(work, forward);
    match result {
        Ok(report) => json!({"ok": true, "phase": phase, "report": report}),
        Err(e) => json!(AdminFailure {
            phase: Some(phase.to_string()),
            ..AdminFailure::new(format!("{e:#}"))
        }),
    }
}

/// While the standby catches up, records the lag from both ends in the audit log.
pub(crate) async fn sample_lag(cx: Cx) {
    let settings = cx.target.settings.clone();
    let migration = cx.tunnel.own().migration.to_string();
    let store = crate::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let mut stop = cx.tunnel.shutting_down();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.lag_sample) => {}
            _ = stop.changed() => return,
        }
        let catching_up = matches!(
            store.load(),
            Ok(pgferry_common::migration::State::CatchingUp { .. }
                | pgferry_common::migration::State::Ready { .. })
        );
        if !catching_up {
            continue;
        }
        let current = cx.target.current.borrow().clone();
        let st = admin_status(&cx, current).await;
        let source = st.source_status();
        let (udp_bytes_received, tunnel) = match &st.tunnel {
            TunnelStatus::Up {
                udp_bytes_received, ..
            } => (Some(*udp_bytes_received), "up"),
            TunnelStatus::Down => (None, "down"),
        };
        let replay_lag_ms = source
            .and_then(|s| s.replication.first())
            .and_then(|r| r.replay_lag_ms);
        cx.tunnel.audit(
            "lag_sample",
            json!({
                "lag_bytes": st.lag_bytes,
                "source_lsn": source.map(|s| s.current_lsn),
                "replay_lsn": st.standby().and_then(|n| n.replay_lsn),
                "replay_lag_ms": replay_lag_ms,
                "tunnel": tunnel,
                "udp_bytes_received": udp_bytes_received,
            }),
        );
    }
}

/// `status`: tunnel, migration phase, and lag from both ends.
async fn admin_status(cx: &Cx, current: Option<Link>) -> StatusReport {
    let settings = cx.target.settings.clone();
    let migration = cx.tunnel.own().migration.to_string();
    let store = crate::state_store::StateStore::new(settings.state_file.clone(), &migration);
    let state = store.load();
    let phase = match &state {
        Ok(s) => PhaseStatus::Known(s.clone()),
        Err(e) => PhaseStatus::Unknown {
            phase: "unknown".into(),
            error: format!("{e:#}"),
        },
    };
    let Some(pc) = current else {
        return StatusReport {
            ok: false,
            tunnel: TunnelStatus::Down,
            migration: phase,
            error: Some(NO_TUNNEL.into()),
            source: None,
            new_cluster: None,
            lag_bytes: None,
            lag_ms_source: None,
        };
    };
    let slot = state.ok().and_then(|s| match s {
        State::SlotCreated { slot }
        | State::BaseBackupDone { slot }
        | State::StandbyStarted { slot }
        | State::CatchingUp { slot }
        | State::Ready { slot } => Some(slot),
        _ => None,
    });
    let source = match pc
        .control
        .request(Request::Status { slot }, Duration::from_secs(20))
        .await
    {
        Ok(Response::Status { status }) => Part::Ok(status),
        Ok(other) => Part::Failed {
            error: format!("{other:?}"),
        },
        Err(e) => Part::Failed {
            error: format!("{e:#}"),
        },
    };
    let mut report = StatusReport {
        ok: true,
        tunnel: tunnel_status(&pc),
        migration: phase,
        error: None,
        source: Some(source),
        new_cluster: None,
        lag_bytes: None,
        lag_ms_source: None,
    };
    let running = settings
        .data_dir
        .as_ref()
        .is_some_and(|d| d.join("postmaster.pid").exists());
    if running {
        let standby = match crate::migrate::connect_new_cluster(&settings).await {
            Ok(c) => crate::migrate::standby_status(&c).await,
            Err(e) => Err(e),
        };
        report.new_cluster = Some(match standby {
            Ok(st) => Part::Ok(st),
            Err(e) => Part::Failed {
                error: format!("{e:#}"),
            },
        });
        if let (Some(src), Some(st)) = (report.source_status(), report.standby()) {
            let lag_bytes = st
                .replay_lsn
                .map(|replay| src.current_lsn.0.saturating_sub(replay.0));
            let lag_ms = src.replication.first().and_then(|r| r.replay_lag_ms);
            (report.lag_bytes, report.lag_ms_source) = (lag_bytes, lag_ms);
        }
    }
    report
}

/// The tunnel that is up: its peer, streams, round trip and UDP volume.
fn tunnel_status(pc: &Link) -> TunnelStatus {
    let qs = pc.conn.stats();
    TunnelStatus::Up {
        peer: PeerStatus {
            address: pc.conn.remote_address().to_string(),
            role: pc.peer.role.to_string(),
            region: pc.peer.region.to_string(),
            migration: pc.peer.migration.to_string(),
            fingerprint: pc.peer.fingerprint.to_string(),
        },
        streams: pc.stats.streams.load(Ordering::SeqCst),
        rtt_ms: pc.conn.rtt().as_millis() as u64,
        udp_bytes_received: qs.udp_rx.bytes,
        udp_bytes_sent: qs.udp_tx.bytes,
    }
}

/// `preflight`: the source's facts (by request) and this host's, checked.
async fn admin_preflight(cx: &Cx) -> Result<PreflightReport, AdminFailure> {
    let current = cx.target.current.borrow().clone();
    let pc = current.ok_or_else(|| AdminFailure::new(NO_TUNNEL))?;
    let control = pc.control.clone();
    let t0 = Instant::now();
    let r = control
        .request(Request::PreflightFacts, Duration::from_secs(60))
        .await;
    let rtt_ms = t0.elapsed().as_millis() as u64;
    let facts = match r {
        Ok(Response::Facts { facts }) => facts,
        Ok(Response::Error { message }) => {
            return Err(AdminFailure::new(format!(
                "the source agent could not gather its facts: {message}"
            )))
        }
        Ok(other) => return Err(AdminFailure::new(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(AdminFailure::new(format!("{e:#}"))),
    };
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let now_ms = (now_ms as u64).saturating_sub(rtt_ms / 2);
    let settings = cx.target.settings.clone();
    let spaces = facts.tablespaces.clone();
    let tf = tokio::task::spawn_blocking(move || {
        crate::admin::target_facts(&settings, &spaces, now_ms, rtt_ms)
    })
    .await
    .map_err(|e| AdminFailure::new(e.to_string()))?
    .map_err(|e| AdminFailure::new(format!("{e:#}")))?;
    let checks = pgferry_common::preflight::evaluate(&facts, &tf);
    let ok = checks.iter().all(|c| c.ok);
    cx.tunnel.audit_event(&PreflightRun {
        ok,
        failed: checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect(),
        checks: checks.len() as u64,
    });
    Ok(PreflightReport {
        ok,
        checks,
        source: facts,
        target: tf,
    })
}
