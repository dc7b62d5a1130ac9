//! The cutover's verification outside the window (block-range pre-pass, `docs/verify.md`),
//! with real clusters and agents:
//!
//! - A transaction that wrote rows before the pre-pass and commits during it: the pre-pass
//!   waits for it (and says so), and pgferry's digest of that table counts its rows. Without
//!   the wait the pre-pass would have digested the table without them, and since the commit
//!   touches no page again, the fence would not have digested it again: pgferry's row count
//!   would be short. (Checked: with the wait disabled in the source's SQL, this test fails.)
//! - A row corrupted on the standby's disk (a table nobody writes, so no WAL repairs it): the
//!   cutover refuses at the fence naming the table and its block range, rolls back, and the
//!   source takes writes again.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_tests::{as_postgres, pg_bin, ChildGuard, PgCluster};
use support::migration::MigrationRig;

fn prepare(pg: &PgCluster) -> Result<()> {
    // `fixed`: written once and frozen, never vacuumed again (no WAL touches its pages).
    pg.psql(
        "CREATE TABLE ferry.late (id int PRIMARY KEY, v text NOT NULL);
         CREATE TABLE ferry.fixed (id int PRIMARY KEY, v text NOT NULL)
           WITH (autovacuum_enabled = false);
         INSERT INTO ferry.fixed SELECT g, 'needle-' || lpad(g::text, 6, '0')
           FROM generate_series(1, 20000) g;",
    )?;
    pg.psql("VACUUM (FREEZE, ANALYZE) ferry.fixed").map(|_| ())
}

/// The JSON answer of an admin verb run with `--json` (pretty-printed, after the progress).
fn answer(output: &str) -> Result<serde_json::Value> {
    let start = output
        .rfind("\n{\n")
        .map(|i| i + 1)
        .or_else(|| output.starts_with("{\n").then_some(0))
        .with_context(|| format!("no JSON answer in:\n{output}"))?;
    let mut it = serde_json::Deserializer::from_str(&output[start..]).into_iter();
    it.next()
        .with_context(|| format!("no JSON answer in:\n{output}"))?
        .with_context(|| format!("bad JSON answer in:\n{output}"))
}

/// Runs `write` in a transaction left open on the source, then starts `cutover --json` and
/// returns once its pre-pass says it waits for that transaction (the connection holding it,
/// and the running cutover).
fn cutover_held_by_open_transaction(
    rig: &MigrationRig,
    rt: &tokio::runtime::Runtime,
    write: &str,
) -> Result<(tokio_postgres::Client, ChildGuard)> {
    let open = rt.block_on(rig.pg.connect("127.0.0.1", rig.pg.port))?;
    rt.block_on(open.batch_execute(&format!("BEGIN; {write}")))?;
    let cutover = rig.spawn_cmd("cutover", &["--json"])?;
    cutover
        .wait_for_output(
            "waiting for transactions open since it began",
            Duration::from_secs(120),
        )
        .context("the pre-pass did not wait for the open transaction")?;
    Ok((open, cutover))
}

fn digest_rows(report: &serde_json::Value, table: &str) -> Option<u64> {
    report["digests"]
        .as_array()?
        .iter()
        .find(|d| d["table"] == table)?["rows"]
        .as_u64()
}

#[test]
fn a_transaction_open_across_the_prepass_is_waited_for_and_its_rows_verified() -> Result<()> {
    let rig = MigrationRig::start(5, prepare)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");

    // Rows written, not committed, before the cutover (and so before its pre-pass) starts.
    let (open, mut cutover) = cutover_held_by_open_transaction(
        &rig,
        &rt,
        "INSERT INTO ferry.late SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g",
    )?;
    // Nothing fenced while it waits.
    assert!(
        matches!(rig.phase().as_deref(), Some("catching_up" | "ready")),
        "{:?}",
        rig.phase()
    );
    rt.block_on(open.batch_execute("COMMIT"))?;

    let status = cutover.wait(Duration::from_secs(300))?;
    let output = cutover.output();
    assert!(status.success(), "{output}");
    // Standard output alone: progress lines on stderr may land between its lines in `output`.
    let a = answer(&cutover.stdout())?;
    let report = &a["report"];
    assert_eq!(report["verification"]["method"], "block_ranges", "{report}");
    assert!(
        report["tables_skipped"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{report}"
    );
    // pgferry's own digest counted the late rows; the promoted cluster has them.
    assert_eq!(digest_rows(report, "ferry.late"), Some(5000), "{report}");
    let new = rt.block_on(rig.connect_new())?;
    let n: i64 = rt
        .block_on(new.query_one("SELECT count(*) FROM ferry.late", &[]))?
        .get(0);
    assert_eq!(n, 5000);
    eprintln!(
        "open transaction: pre-pass {}; at the fence {}; downtime {} ms",
        report["prepass"], report["verification"]["at_fence"], report["downtime_ms"]
    );
    Ok(())
}

#[test]
fn a_row_corrupted_on_the_standby_fails_the_cutover_which_rolls_back() -> Result<()> {
    let rig = MigrationRig::start(5, prepare)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");

    // The standby writes its pages out and stops; one row of `fixed` is changed on disk.
    let file = {
        let new = rt.block_on(rig.connect_new())?;
        rt.block_on(new.batch_execute("CHECKPOINT"))?;
        let path: String = rt
            .block_on(new.query_one("SELECT pg_relation_filepath('ferry.fixed')", &[]))?
            .get(0);
        rig.data_dir.join(path)
    };
    let pg_ctl = |args: &[&str]| -> Result<()> {
        let out = as_postgres(None, &pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&rig.data_dir)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    pg_ctl(&["-m", "fast", "-w", "stop"])?;
    let mut bytes = std::fs::read(&file)?;
    let at = bytes
        .windows(13)
        .position(|w| w == b"needle-012345")
        .context("row 12345 not found in the standby's file")?;
    bytes[at + 12] = b'6';
    std::fs::write(&file, &bytes)?;
    let log = rig.dir.join("standby-restart.log");
    pg_ctl(&["-l", &log.to_string_lossy(), "-w", "start"])?;

    let (ok, out) = rig.cmd("cutover", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("table contents differ after the fence") && out.contains("ferry.fixed"),
        "{out}"
    );
    // Named with its block range; the other tables were not blamed.
    assert!(out.contains("block range(s) differ"), "{out}");
    assert!(!out.contains("ferry.late ("), "{out}");
    assert_eq!(rig.phase().as_deref(), Some("rolled_back"), "{out}");
    // The auditor sees one verification record, with the mismatch in it.
    let log = std::fs::read_to_string(&rig.target.audit)?;
    let verified: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "tables_verified")
        .collect();
    assert_eq!(verified.len(), 1, "{log}");
    let mismatched = verified[0]["details"]["mismatched"].to_string();
    assert!(mismatched.contains("ferry.fixed"), "{}", verified[0]);
    rig.pg
        .psql("INSERT INTO ferry.late VALUES (-1, 'after rollback')")?;
    assert_eq!(rig.pg.psql("SHOW default_transaction_read_only")?, "off");
    Ok(())
}

/// The source agent killed (SIGKILL) while the pre-pass waits on it: the cutover gives up
/// before the fence, the source's files are as they were and it takes writes, and the next
/// cutover completes.
#[test]
fn the_source_agent_killed_during_the_prepass_fences_nothing_and_the_cutover_runs_again(
) -> Result<()> {
    let mut rig = MigrationRig::start(5, prepare)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    let data = rig.pg.datadir.clone();
    let files = ["pg_hba.conf", "postgresql.auto.conf"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(data.join(f)))
        .collect::<std::io::Result<_>>()?;

    // An open transaction holds the pre-pass in its wait, on the source agent.
    let (open, mut cutover) = cutover_held_by_open_transaction(
        &rig,
        &rt,
        "INSERT INTO ferry.late VALUES (1, 'open across the pre-pass')",
    )?;
    let killed = std::time::Instant::now();
    rig.kill_and_restart_source()?;
    rt.block_on(open.batch_execute("COMMIT"))?;

    // The pre-pass asks one source agent process: it fails even when the restarted agent's
    // tunnel is up before its next request (and would answer that the transaction ended).
    let status = cutover.wait(Duration::from_secs(120))?;
    let output = cutover.output();
    assert!(!status.success(), "{output}");
    assert!(output.contains("nothing was fenced"), "{output}");
    assert!(
        output.contains("tunnel closed before the source agent answered"),
        "{output}"
    );
    // A request on the lost connection fails when it ends, not at its 60 s timeout.
    assert!(
        killed.elapsed() < Duration::from_secs(40),
        "{:?}\n{output}",
        killed.elapsed()
    );
    assert!(
        matches!(rig.phase().as_deref(), Some("catching_up" | "ready")),
        "{:?}\n{output}",
        rig.phase()
    );
    for (f, was) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(data.join(f))?, was, "{f} changed\n{output}");
    }
    assert_eq!(rig.pg.psql("SHOW default_transaction_read_only")?, "off");
    rig.pg
        .psql("INSERT INTO ferry.late VALUES (2, 'after the failed pre-pass')")?;

    // Once the tunnel is back, the cutover runs to the end.
    pgferry_tests::wait_until("the tunnel back", Duration::from_secs(60), || {
        (rig.target.child.output().matches("tunnel up").count() >= 2).then_some(())
    })?;
    let (ok, out) = rig.cmd("cutover", &["--json"]);
    assert!(ok, "{out}");
    let a = answer(&out)?;
    assert_eq!(a["report"]["phase"], "completed", "{out}");
    assert_eq!(digest_rows(&a["report"], "ferry.late"), Some(2), "{out}");
    Ok(())
}
