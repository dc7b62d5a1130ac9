//! `pgferry-target migrate` with a writer committing numbered transactions throughout, and the
//! target agent killed with SIGKILL during catch-up: run again, it resumes and completes; every
//! transaction the writer saw committed is on the promoted cluster, the source refuses writes,
//! the tables are equal, and the audit logs verify.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_tests::{table_digest, wait_until};
use support::migration::{number_after, MigrationRig, Writer};
use support::{audit_events, audit_stdout, audit_verify_peer, details};

#[test]
fn migrate_with_a_writer_survives_a_killed_agent() -> Result<()> {
    let mut rig = MigrationRig::start(30, |pg| {
        pg.psql("CREATE TABLE ferry.writes (n int PRIMARY KEY, at timestamptz DEFAULT now())")
            .map(drop)
    })?;
    let (port, target_port) = (rig.pg.port, rig.target_port);

    // The writer: numbered single-row transactions on the source until it is fenced.
    let rt = tokio::runtime::Runtime::new()?;
    let writer = Writer::start(&rt, port, &rig.pg.password, "ferry.writes")?;

    // Clone, then kill the target agent (SIGKILL) while the standby is catching up.
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    wait_until("some writes", Duration::from_secs(20), || {
        (writer.count() > 50).then_some(())
    })?;
    rig.kill_and_restart_target()?;

    // Run migrate again: it resumes from catching_up and cuts over.
    let (ok, out) = rig.cmd("migrate", &["--auto-cutover", "--max-lag", "1000000"]);
    assert!(ok, "{out}");
    assert!(out.contains("cutover complete"), "{out}");
    let committed = writer.stop(&rt);
    assert!(committed.len() > 50, "{} writes", committed.len());

    let pg = &rig.pg;
    // Every committed write is on the new cluster; it is writable; the source is not.
    let on_target: Vec<i32> = rt.block_on(async {
        let new = pg.connect("127.0.0.1", target_port).await?;
        new.batch_execute("INSERT INTO ferry.writes (n) VALUES (-1)")
            .await?;
        let rows = new
            .query("SELECT n FROM ferry.writes WHERE n > 0 ORDER BY n", &[])
            .await?;
        anyhow::Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
    })?;
    assert_eq!(on_target, committed, "committed writes on the target");
    // The old cluster stays fenced: no client gets in. Then, as an operator would to read it,
    // its pg_hba.conf put back: still read-only.
    let err = pg.psql("SELECT 1").unwrap_err();
    assert!(
        format!("{err:#}").contains("pg_hba.conf rejects connection"),
        "{err:#}"
    );
    pg.reopen_after_fence()?;
    let err = pg
        .psql("INSERT INTO ferry.writes (n) VALUES (-2)")
        .unwrap_err();
    assert!(format!("{err:#}").contains("read-only"), "{err:#}");
    // Independently of pgferry: each table equals the source's (at the fence: the source has
    // not changed since).
    for t in ["ferry.orders", "ferry.events", "ferry.docs"] {
        let src = table_digest(pg, t)?;
        let new = rt.block_on(async {
            let c = pg.connect("127.0.0.1", target_port).await?;
            pgferry_common::runtime::digest::table_digest(&c, t).await
        })?;
        assert_eq!((new.rows, new.blake3), src, "{t}");
    }
    let downtime = number_after(&out, "write downtime ").unwrap_or_else(|| panic!("{out}"));
    assert!(downtime < 5_000, "downtime {downtime} ms");
    eprintln!(
        "migrate: {} writes committed, downtime {downtime} ms",
        committed.len()
    );

    rig.stop_new_cluster();
    rig.stop_agents()?;
    // The source's log is closed and verifies; the killed target's log resumed and verifies;
    // both agree on every stream they both recorded.
    let (ok, text) = audit_verify_peer("source", &rig.source.audit, &rig.target.audit);
    assert!(ok, "{text}");
    assert!(text.contains("peer comparison: OK"), "{text}");
    // Who ran each step: the admin socket's peer credentials (this test runs as root).
    let commands: Vec<(String, u64, String)> = audit_events(&rig.target.audit, "admin_command")
        .iter()
        .map(|r| {
            let d = details(r);
            (
                d["verb"].as_str().unwrap_or_default().to_string(),
                d["uid"].as_u64().unwrap_or(u64::MAX),
                d["user"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let uid = u64::from(own_uid());
    for verb in ["clone", "cutover"] {
        assert!(
            commands.iter().any(|(v, u, _)| v == verb && *u == uid),
            "{verb} by uid {uid} in {commands:?}"
        );
    }
    assert!(
        commands.iter().all(|(v, _, _)| v != "status"),
        "status is not recorded: {commands:?}"
    );
    auditor_report(&rig, downtime)?;
    Ok(())
}

/// The auditor's report of this real migration, from both logs: countries, volume per database
/// user, tables, downtime, who ran it; the JSON's figures are the stream records'; one CSV row
/// per stream.
fn auditor_report(rig: &MigrationRig, downtime: u64) -> Result<()> {
    use std::ffi::OsStr;
    let (target, source) = (rig.target.audit.as_os_str(), rig.source.audit.as_os_str());
    let args = |format: &'static str| {
        vec![
            OsStr::new("report"),
            target,
            OsStr::new("--peer"),
            source,
            OsStr::new("--format"),
            OsStr::new(format),
        ]
    };
    let (ok, text) = audit_stdout("target", &args("text"));
    assert!(ok, "{text}");
    for needle in [
        "Verdict:  OK: both logs verified".to_string(),
        "Direction:  Germany (DE) → France (FR)".to_string(),
        "(replication): ".to_string(),
        format!("write downtime {downtime} ms"),
        "Outcome:    PROMOTED".to_string(),
        "tables verified equal: ferry.docs, ferry.events, ferry.orders, ferry.writes".to_string(),
        "tables NOT verified: none".to_string(),
        "[target] cutover run by ".to_string(),
        "[source] request ".to_string(),
        // The agent copy's file streams (the source's record of what left it), and the
        // standby's walreceiver.
        "the agents' file streams (agent copy): ".to_string(),
        "[source] base copy ".to_string(),
        " file(s) to their end, ".to_string(),
        "who       user postgres, application pgferry_standby, replication".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in\n{text}");
    }
    let (ok, json) = audit_stdout("target", &args("json"));
    assert!(ok, "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(doc["schema_version"], 1);
    let closed = audit_events(&rig.target.audit, "stream_closed");
    let received: u64 = closed
        .iter()
        .map(|r| details(r)["received"]["raw_bytes"].as_u64().unwrap_or(0))
        .sum();
    let reported: u64 = doc["transfer"]["streams"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["source_to_target_raw_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(
        reported, received,
        "source → target bytes are the target's stream records"
    );
    // What the source says its file streams sent covers what the target's last run fetched.
    let served = doc["transfer"]["volume"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["kind"] == "agent copy"))
        .with_context(|| format!("no agent copy volume: {}", doc["transfer"]["volume"]))?;
    let fetched = audit_events(&rig.target.audit, "base_copy")
        .last()
        .and_then(|r| details(r)["bytes_fetched_now"].as_u64())
        .context("the target's base_copy record")?;
    let sent = served["source_to_target_raw_bytes"].as_u64().unwrap_or(0);
    assert!(
        fetched > 0 && sent >= fetched,
        "sent {sent}, fetched {fetched}"
    );
    assert!(doc["transfer"]["outcome"]["tables_verified"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));
    let (ok, csv) = audit_stdout("target", &args("csv"));
    assert!(ok, "{csv}");
    assert_eq!(csv.lines().count(), closed.len() + 1, "{csv}");
    Ok(())
}

/// This process's uid, from /proc (the tests link no libc wrapper).
fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("Uid line")
}
