//! The flagship migration: a source of at least 300 MB of mixed data and a writer committing
//! numbered transactions throughout; `pgferry-target migrate --auto-cutover`, with the target
//! agent killed (SIGKILL) during the base backup and `migrate` run again. Asserts, each by the
//! test itself: the target is promoted and writable; the source refuses writes; the target's
//! timeline forked at or after the fence LSN; every table on the target equals the source's
//! (the source has been read-only since the fence); every transaction the writer saw committed
//! is on the target; the report's downtime is measured and under 1 s with every table
//! verified by pgferry; both audit logs verify
//! and agree on every stream's digests. Prints the figures for the release notes.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgferry_tests::{table_digest, table_digest_at, ChildGuard, PgCluster};
use support::audit_verify_peer;
use support::migration::{target_command, MigrationRig, Writer};

const MEGABYTES: u32 = 300;

/// For the release figures, not for CI: `PGFERRY_FLAGSHIP_MB` (a larger source) and
/// `PGFERRY_FLAGSHIP_CUTOVER_ARGS` (e.g. `--verify-at-fence --all-tables`, the method before
/// the pre-pass; the downtime bound then only has to hold for the default method).
fn knobs() -> (u32, Vec<String>) {
    let mb = pgferry_tests::env_or("PGFERRY_FLAGSHIP_MB", MEGABYTES).max(MEGABYTES);
    let args = std::env::var("PGFERRY_FLAGSHIP_CUTOVER_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    (mb, args)
}

type Updater = (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<u64>,
);

/// With `PGFERRY_FLAGSHIP_UPDATES=N`: N single-row updates a second at random rows of
/// `ferry.orders` (the writes that touch the most block ranges), until stopped; errors (the
/// fence) end them.
fn scattered_updates(rt: &tokio::runtime::Runtime, pg: &PgCluster) -> Result<Option<Updater>> {
    let Some(rate) = std::env::var("PGFERRY_FLAGSHIP_UPDATES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|r| *r > 0)
    else {
        return Ok(None);
    };
    let max: i64 = pg.psql("SELECT max(id) FROM ferry.orders")?.parse()?;
    let client = rt.block_on(pg.connect("127.0.0.1", pg.port))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let (mut n, mut x) = (0u64, 0x9E37_79B9_7F4A_7C15u64);
        while !flag.load(std::sync::atomic::Ordering::SeqCst) && n < 10_000_000 {
            tick.tick().await;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = 1 + (x % max as u64) as i64;
            match client
                .execute(
                    "UPDATE ferry.orders SET status = 'updated' WHERE id = $1",
                    &[&id],
                )
                .await
            {
                Ok(_) => n += 1,
                Err(_) => break,
            }
        }
        n
    });
    Ok(Some((stop, task)))
}

#[test]
fn flagship_migration_with_a_writer_and_a_killed_agent() -> Result<()> {
    let t = Instant::now();
    let (megabytes, cutover_args) = knobs();
    let at_fence = cutover_args.iter().any(|a| a == "--verify-at-fence");
    let mut db_mb = 0;
    let mut rig = MigrationRig::start(megabytes, |pg| {
        db_mb = pg
            .psql("SELECT pg_database_size('postgres') / 1048576")?
            .parse()?;
        eprintln!(
            "flagship: source database {db_mb} MB, made and loaded in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        assert!(db_mb >= u64::from(megabytes), "{db_mb} MB");
        pg.psql("CREATE TABLE ferry.writes (n int PRIMARY KEY, at timestamptz DEFAULT now())")
            .map(drop)
    })?;
    let (port, new_port) = (rig.pg.port, rig.target_port);

    let rt = tokio::runtime::Runtime::new()?;
    let writer = Writer::start(&rt, port, &rig.pg.password, "ferry.writes")?;
    let updater = scattered_updates(&rt, &rig.pg)?;
    let socket = rig.socket.clone();
    let migrate = |name: &str| -> Result<ChildGuard> {
        let mut cmd = target_command(
            "migrate",
            &socket,
            &["--auto-cutover", "--max-lag", "2000000", "--json"],
        );
        cmd.args(&cutover_args);
        ChildGuard::spawn(name, cmd)
    };

    // First run: killed (SIGKILL, with its agent) while the agent copy (the default) is
    // copying: files in its journal, not all of them.
    let t_first = Instant::now();
    let mut first = migrate("migrate-1")?;
    rig.wait_for_journal_lines(30)
        .context("no base copy progress")?;
    rig.kill_target();
    let status = first.wait(Duration::from_secs(30))?;
    assert!(!status.success(), "migrate survived its agent");
    eprintln!(
        "flagship: target agent killed {:.1} s into the base backup run",
        t_first.elapsed().as_secs_f64()
    );

    // Second run: resumes the copy (the files complete are kept) and completes.
    rig.start_target()?;
    let t_second = Instant::now();
    let mut second = migrate("migrate-2")?;
    let status = second.wait(Duration::from_secs(900))?;
    let output = second.output();
    assert!(status.success(), "{output}");
    let migrate_secs = t_second.elapsed().as_secs_f64();
    let writes = writer.stop(&rt);
    if let Some((stop, task)) = updater {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let updates = rt.block_on(task)?;
        eprintln!("flagship: {updates} scattered updates committed on ferry.orders");
    }
    let answer: serde_json::Value = output
        .lines()
        .rev()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .with_context(|| format!("no JSON answer in:\n{output}"))?;
    assert_eq!(answer["ok"], true, "{answer}");
    let report = &answer["report"];
    assert_eq!(report["phase"], "completed", "{report}");
    assert!(output.contains("resuming from phase"), "{output}");
    assert!(output.contains("resuming the copy"), "{output}");
    assert!(writes.len() > 100, "{} writes", writes.len());

    // The report: downtime measured and under a second, with every table verified by pgferry
    // (digested per block range before the fence, only the ranges written since at the fence).
    let downtime = report["downtime_ms"].as_u64().context("downtime_ms")?;
    if !at_fence {
        assert!(
            downtime > 0 && downtime < 1_000,
            "downtime {downtime} ms: {report}"
        );
        assert_eq!(report["verification"]["method"], "block_ranges", "{report}");
    }
    let verified = report["tables"].as_array().context("tables")?;
    let skipped = report["tables_skipped"].as_array().context("skipped")?;
    assert!(skipped.is_empty(), "{report}");
    assert_eq!(verified.len(), 4, "{report}");
    assert!(verified.iter().any(|t| t == "ferry.writes"), "{report}");
    let timeline = report["timeline"].as_array().context("timeline")?;
    let phase_ms = |phase: &str| -> Option<u64> {
        timeline
            .iter()
            .rev()
            .filter(|t| t["phase"] == phase)
            .find_map(|t| t["ms"].as_u64())
    };
    assert!(
        phase_ms("slot_created").is_some_and(|ms| ms > 0),
        "{report}"
    );

    // The new cluster is promoted and its timeline began at or after the fence.
    let (pg, dir) = (&rig.pg, rig.dir.path());
    let fence: pgferry_common::migration::Lsn =
        report["fence_lsn"].as_str().context("fence_lsn")?.parse()?;
    let new = rt.block_on(pg.connect("127.0.0.1", new_port))?;
    let in_recovery: bool = rt
        .block_on(new.query_one("SELECT pg_is_in_recovery()", &[]))?
        .get(0);
    assert!(!in_recovery);
    let history: String = rt
        .block_on(new.query_one("SELECT pg_read_file('pg_wal/00000002.history')", &[]))?
        .get(0);
    let switch: pgferry_common::migration::Lsn = history
        .split_whitespace()
        .nth(1)
        .context("timeline history")?
        .parse()?;
    assert!(
        switch >= fence,
        "timeline switch {switch} before fence {fence}"
    );

    // The source refuses writes (fenced since the fence LSN, so its tables are as they were).
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
    // Every table equals the source's, digested by the test (psql COPY … ORDER BY 1).
    let tables = pg.psql(
        "SELECT string_agg(schemaname || '.' || relname, ',' ORDER BY 1) FROM pg_stat_user_tables",
    )?;
    let t_verify = Instant::now();
    for t in tables.split(',') {
        let (src, dst) = (table_digest(pg, t)?, table_digest_at(dir, new_port, t)?);
        assert_eq!(dst, src, "{t}");
    }
    let check_secs = t_verify.elapsed().as_secs_f64();
    // Every transaction the writer saw committed is there (and nothing it did not).
    let on_target: Vec<i32> = rt
        .block_on(new.query("SELECT n FROM ferry.writes ORDER BY n", &[]))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(on_target, writes, "committed writes on the target");
    // Writable.
    rt.block_on(new.batch_execute("INSERT INTO ferry.writes (n) VALUES (-1)"))?;

    eprintln!(
        "flagship: {db_mb} MB, {} writes committed; resumed migrate {migrate_secs:.1} s; \
         write downtime {downtime} ms; pgferry verified {} ({} rows), skipped {}; phases {}; \
         pre-pass {}; at the fence {}; timeline {}; the test's own table check {check_secs:.1} s",
        writes.len(),
        report["tables"],
        report["verified_rows"],
        report["tables_skipped"],
        report["phases"],
        report["prepass"],
        report["verification"]["at_fence"],
        timeline
            .iter()
            .map(|t| format!("{}={}", t["phase"].as_str().unwrap_or("?"), t["ms"]))
            .collect::<Vec<_>>()
            .join(" ")
    );

    rig.stop_new_cluster();
    rig.stop_agents()?;
    // Both logs verify, and agree on every stream's digests in both directions.
    let (ok, text) = audit_verify_peer("source", &rig.source.audit, &rig.target.audit);
    assert!(ok, "{text}");
    let agreed = support::migration::number_after(&text, "peer comparison: OK: ").unwrap_or(0);
    assert!(agreed >= 2, "{text}");
    Ok(())
}
