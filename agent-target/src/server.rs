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

use pgferry_common::admin::{AdminLine, AdminRequest, CutoverOptions};
use pgferry_common::runtime::config::Endpoint;

use crate::{Cx, Link};

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
            let answer = match crate::admin::read_request(&mut stream).await {
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
                    admin_status(&sh, current).await
                }
                Ok(AdminRequest::Preflight) => admin_preflight(&sh).await,
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            };
            let _ = write_admin_line(&mut stream, &answer).await;
        });
    }
    let _ = std::fs::remove_file(&cx.target.settings.admin_socket);
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
        return json!({"ok": false, "error": "another clone, cutover or rollback is running on this agent; wait for it (pgferry-target status shows the phase)"});
    };
    let Some(pc) = cx.target.current.borrow().clone() else {
        return json!({"ok": false, "error": "no tunnel to the source agent (is pgferry-source running and reachable?)"});
    };
    let control = pc.control.clone();
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
        return json!({"ok": false, "error": "clone needs a TCP local endpoint for the postgres service"});
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
        let exec = crate::migrate::Executor {
            control: &control,
            settings: &settings,
            migration: &migration,
            local,
            store,
            audit: &audit,
            progress: &progress,
        };
        let check = async {
            let v = admin_preflight(&sh).await;
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
        Err(e) => json!({"ok": false, "error": format!("{e:#}"), "phase": phase}),
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
        cx.tunnel.audit(
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
async fn admin_status(cx: &Cx, current: Option<Link>) -> Value {
    let settings = cx.target.settings.clone();
    let migration = cx.tunnel.own().migration.to_string();
    let store = crate::state_store::StateStore::new(settings.state_file.clone(), &migration);
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
    use pgferry_common::migration::State as S;
    let slot = state.ok().and_then(|s| match s {
        S::SlotCreated { slot }
        | S::BaseBackupDone { slot }
        | S::StandbyStarted { slot }
        | S::CatchingUp { slot }
        | S::Ready { slot } => Some(slot),
        _ => None,
    });
    {
        match pc
            .control
            .request(
                pgferry_common::control::Request::Status { slot },
                Duration::from_secs(20),
            )
            .await
        {
            Ok(pgferry_common::control::Response::Status { status }) => {
                out["source"] = json!(status)
            }
            Ok(other) => out["source"] = json!({"error": format!("{other:?}")}),
            Err(e) => out["source"] = json!({"error": format!("{e:#}")}),
        }
    }
    let running = settings
        .data_dir
        .as_ref()
        .is_some_and(|d| d.join("postmaster.pid").exists());
    if running {
        let standby = match crate::migrate::connect_new_cluster(&settings).await {
            Ok(c) => crate::migrate::standby_status(&c).await,
            Err(e) => Err(e),
        };
        match standby {
            Ok(st) => {
                let src = out["source"]["current_lsn"]
                    .as_str()
                    .and_then(|s| s.parse::<pgferry_common::migration::Lsn>().ok());
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

/// `preflight`: the source's facts (by request) and this host's, checked.
async fn admin_preflight(cx: &Cx) -> Value {
    let current = cx.target.current.borrow().clone();
    let Some(pc) = current else {
        return json!({"ok": false, "error": "no tunnel to the source agent (is pgferry-source running and reachable?)"});
    };
    let control = pc.control.clone();
    let t0 = Instant::now();
    let r = control
        .request(
            pgferry_common::control::Request::PreflightFacts,
            Duration::from_secs(60),
        )
        .await;
    let rtt_ms = t0.elapsed().as_millis() as u64;
    let facts = match r {
        Ok(pgferry_common::control::Response::Facts { facts }) => facts,
        Ok(pgferry_common::control::Response::Error { message }) => {
            return json!({"ok": false, "error": format!("the source agent could not gather its facts: {message}")})
        }
        Ok(other) => return json!({"ok": false, "error": format!("unexpected answer {other:?}")}),
        Err(e) => return json!({"ok": false, "error": format!("{e:#}")}),
    };
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let now_ms = (now_ms as u64).saturating_sub(rtt_ms / 2);
    let settings = cx.target.settings.clone();
    let tf = match tokio::task::spawn_blocking(move || {
        crate::admin::target_facts(&settings, now_ms, rtt_ms)
    })
    .await
    {
        Ok(Ok(tf)) => tf,
        Ok(Err(e)) => return json!({"ok": false, "error": format!("{e:#}")}),
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    let checks = pgferry_common::preflight::evaluate(&facts, &tf);
    let ok = checks.iter().all(|c| c.ok);
    cx.tunnel.audit(
        "preflight",
        json!({
            "ok": ok,
            "failed": checks.iter().filter(|c| !c.ok).map(|c| c.name.clone()).collect::<Vec<_>>(),
            "checks": checks.len() as u64,
        }),
    );
    json!({"ok": ok, "checks": checks, "source": facts, "target": tf})
}
