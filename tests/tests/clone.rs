//! `pgferry-target clone` end to end: slot, pg_basebackup through the tunnel, pg_verifybackup,
//! standby started and streaming from the source through the tunnel. A clone that fails
//! before promotion rolls back and leaves no slot on the source.

mod support;

use std::time::Duration;

use anyhow::Result;
use pgferry_tests::wait_until;
use support::migration::{write_secret_file, MigrationRig};
use support::{audit_events, details};

#[test]
fn clone_builds_a_streaming_standby_and_failures_roll_back() -> Result<()> {
    let mut rig = MigrationRig::builder(20)
        .replication_password("wrong password")
        .target_config("replication_user = \"postgres\"\ncopy_method = \"pg_basebackup\"\n")
        .start()?;
    let (pg, dir) = (&rig.pg, rig.dir.path());
    let (data_dir, state_file) = (&rig.data_dir, &rig.state_file);
    let target_port = rig.target_port;

    // 1. A wrong replication password: pg_basebackup fails, the clone rolls back, no slot stays.
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("pg_basebackup failed"), "{out}");
    assert!(out.contains("rolled_back"), "{out}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots")?, "0");
    let state = std::fs::read_to_string(state_file)?;
    assert!(state.contains("rolled_back"), "{state}");
    // A finished (rolled back) migration is not silently restarted.
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(!ok && out.contains("move the file aside"), "{out}");

    // 2. Fixed: the clone runs through and leaves a standby streaming through the tunnel.
    write_secret_file(&rig.repl_pw, &pg.password)?;
    std::fs::rename(state_file, dir.join("old.state.json"))?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("pg_verifybackup"), "{out}");
    assert!(out.contains("catching_up"), "{out}");
    assert!(std::fs::read_to_string(state_file)?.contains("catching_up"));

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let standby = pg.connect("127.0.0.1", target_port).await?;
        let rec: bool = standby
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        assert!(rec, "the clone is a standby");
        // A write on the source reaches the standby through the tunnel.
        pg.psql("CREATE TABLE ferry.after_clone AS SELECT 42 AS answer")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = standby
                .query_opt("SELECT answer FROM ferry.after_clone", &[])
                .await;
            if let Ok(Some(row)) = r {
                assert_eq!(row.get::<_, i32>(0), 42);
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the write never reached the standby"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })?;
    // The slot is in use, by a walsender whose client is the source agent (the tunnel).
    let slot = wait_until("the slot to be active", Duration::from_secs(30), || {
        let v = pg
            .psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgferry_test_migration'")
            .ok()?;
        (v == "t").then_some(v)
    })?;
    assert_eq!(slot, "t");
    // status: the phase, both ends of the replication, the lag.
    let out = rig.command("status", &["--json"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["migration"]["phase"], "catching_up", "{v:#}");
    assert_eq!(v["new_cluster"]["in_recovery"], true, "{v:#}");
    assert_eq!(v["source"]["slot"]["active"], true, "{v:#}");
    assert!(v["lag_bytes"].is_u64(), "{v:#}");
    assert!(
        !v["source"]["replication"].as_array().unwrap().is_empty(),
        "{v:#}"
    );
    let text = rig.command("status", &[]).output()?;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    eprintln!("{text}");
    assert!(text.contains("phase      catching_up"), "{text}");

    // While catching up, the lag is sampled into the audit log.
    let sample = wait_until(
        "a lag sample in the audit log",
        Duration::from_secs(20),
        || {
            audit_events(&rig.target.audit, "lag_sample")
                .into_iter()
                .next()
        },
    )?;
    assert!(details(&sample)["lag_bytes"].is_u64(), "{sample}");

    // cutover --dry-run changes nothing.
    let cutover = |args: &[&str]| rig.cmd("cutover", args);
    let (ok, out) = cutover(&["--dry-run"]);
    assert!(ok && out.contains("dry run"), "{out}");
    assert_eq!(
        pg.psql("SELECT current_setting('default_transaction_read_only')")?,
        "off"
    );

    // A table the new cluster does not have is refused before anything changes.
    let (ok, out) = cutover(&["--tables", "ferry.no_such_table"]);
    assert!(!ok, "{out}");
    assert!(out.contains("no_such_table"), "{out}");
    assert!(!out.contains("rolled back"), "{out}");
    assert!(std::fs::read_to_string(state_file)?.contains("catching_up"));

    // A failure after the fence and before promotion (the standby stops replaying, so it never
    // reaches the fence LSN) rolls back: the source is writable again, the slot is gone, the
    // state says rolled back.
    rt.block_on(async {
        let standby = pg.connect("127.0.0.1", target_port).await?;
        standby
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await?;
        anyhow::Ok(())
    })?;
    // The block-range pre-pass refuses a paused standby at once, before fencing.
    let t = std::time::Instant::now();
    let (ok, out) = cutover(&[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("replay is paused") && out.contains("nothing was fenced"),
        "{out}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "{out}");
    assert_eq!(
        pg.psql("SELECT current_setting('default_transaction_read_only')")?,
        "off"
    );
    // Whole-table digests at the fence instead, to fail after the fence.
    let (ok, out) = cutover(&["--replay-timeout-secs", "2", "--verify-at-fence"]);
    assert!(!ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(out.contains("did not replay the fence LSN"), "{out}");
    assert_eq!(
        pg.psql("SELECT current_setting('default_transaction_read_only')")?,
        "off"
    );
    pg.psql("INSERT INTO ferry.after_clone VALUES (2)")?;
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots")?, "0");
    assert!(std::fs::read_to_string(state_file)?.contains("rolled_back"));
    // Start over: stop the standby, clear its directory, set the state aside, clone again.
    rig.stop_new_cluster();
    std::fs::remove_dir_all(data_dir)?;
    std::fs::rename(state_file, dir.join("old2.state.json"))?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");

    // `rollback` before promotion: standby stopped, slot dropped, state rolled back.
    // With --keep-slot the slot stays (inactive), and the next clone reuses it.
    let out = rig.command("rollback", &["--keep-slot"]).output()?;
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stopping the standby"), "{text}");
    assert!(text.contains("keeping replication slot"), "{text}");
    assert!(!data_dir.join("postmaster.pid").exists());
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE NOT active")?,
        "1"
    );
    assert!(std::fs::read_to_string(state_file)?.contains("rolled_back"));
    std::fs::remove_dir_all(data_dir)?;
    std::fs::rename(state_file, dir.join("old3.state.json"))?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");

    // The cutover: fence, drain, verify, promote, writable, hook, slot dropped.
    let hook = dir.join("promoted.flag");
    let (ok, out) = cutover(&[
        "--on-promoted",
        &format!(
            "echo \"$PGFERRY_NEW_PORT $PGFERRY_NEW_HOST $PGFERRY_FENCE_LSN $PGFERRY_MIGRATION\" > {}",
            hook.display()
        ),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("cutover complete"), "{out}");
    let downtime: u64 = out
        .split("write downtime ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(downtime < 5_000, "downtime {downtime} ms");
    // The hook learns where the new primary is and the fence LSN.
    let hook_env = std::fs::read_to_string(&hook)?;
    let hook_env: Vec<&str> = hook_env.split_whitespace().collect();
    assert_eq!(hook_env.len(), 4, "{hook_env:?}");
    assert_eq!(hook_env[0], target_port.to_string());
    assert_eq!(hook_env[1], "localhost", "loopback-only by default");
    assert!(
        hook_env[2]
            .parse::<pgferry_common::migration::Lsn>()
            .is_ok(),
        "{hook_env:?}"
    );
    assert!(!hook_env[3].is_empty());
    // The report ends with where applications go now.
    assert!(
        out.contains(&format!(
            "new primary: host=localhost port={target_port} dbname=postgres"
        )),
        "{out}"
    );
    assert!(std::fs::read_to_string(state_file)?.contains("completed"));
    // After promotion there is no way back.
    let out = rig.command("rollback", &[]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("phase completed"), "{text}");
    // The source refuses writes; the new cluster takes them; contents are equal.
    // The old cluster stays fenced: no client gets in. Then, as an operator would to read it,
    // its pg_hba.conf put back: still read-only.
    let err = pg.psql("SELECT 1").unwrap_err();
    assert!(
        format!("{err:#}").contains("pg_hba.conf rejects connection"),
        "{err:#}"
    );
    pg.reopen_after_fence()?;
    let err = pg
        .psql("INSERT INTO ferry.after_clone VALUES (1)")
        .unwrap_err();
    assert!(format!("{err:#}").contains("read-only"), "{err:#}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots")?, "0");
    rt.block_on(async {
        let new = pg.connect("127.0.0.1", target_port).await?;
        let rec: bool = new
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        assert!(!rec, "promoted");
        new.batch_execute("INSERT INTO ferry.after_clone VALUES (7)")
            .await?;
        for t in ["ferry.orders", "ferry.events", "ferry.docs"] {
            let a = pgferry_common::runtime::digest::table_digest(&new, t).await?;
            assert_eq!(
                (a.rows, a.blake3.clone()),
                pgferry_tests::table_digest(pg, t)?,
                "{t}"
            );
        }
        anyhow::Ok(())
    })?;

    rig.stop_new_cluster();
    rig.target.stop()?;
    let states: Vec<_> = audit_events(&rig.target.audit, "migration_state")
        .iter()
        .map(|r| details(r)["to"].as_str().unwrap().to_string())
        .collect();
    assert!(
        states.ends_with(&[
            "preflighted".into(),
            "slot_created".into(),
            "base_backup_done".into(),
            "standby_started".into(),
            "catching_up".into(),
            "ready".into(),
            "fenced".into(),
            "drained".into(),
            "verified".into(),
            "promoted".into(),
            "completed".into(),
        ]),
        "{states:?}"
    );
    let report = audit_events(&rig.target.audit, "cutover_report");
    assert_eq!(details(&report[0])["downtime_ms"], downtime);
    assert!(states.contains(&"rolled_back".to_string()), "{states:?}");
    Ok(())
}
