//! PostgreSQL through a real agent pair: psql, ≥100 MB of COPY each way with content hashed on
//! both sides, concurrent sessions, pg_basebackup + pg_verifybackup, SIGTERM drain, and the
//! audit logs of the run: verified, compared with each other, and tampered with.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::pin::pin;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use pgferry_tests::{
    command_output, free_tcp_port, load_sample_data, pg_bin, table_digest, PgCluster, TestDir,
};
use support::{audit_cli, audit_events, details, Certs, Pair};

const COPY_MIN_BYTES: u64 = 100_000_000;

#[test]
fn postgres_through_the_tunnel_end_to_end() -> Result<()> {
    let dir = TestDir::new()?;
    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), pg_port)?;
    pg.start()?;
    let t = Instant::now();
    load_sample_data(&pg, 130)?;
    eprintln!("sample data loaded in {:.1} s", t.elapsed().as_secs_f64());
    let tables: Vec<String> = pg
        .psql("SELECT format('ferry.%I', tablename) FROM pg_tables WHERE schemaname = 'ferry' ORDER BY 1")?
        .lines()
        .map(str::to_string)
        .collect();
    ensure!(tables.len() >= 3, "sample tables: {tables:?}");

    let certs = Certs::make(&dir.join("certs"))?;
    let local = free_tcp_port();
    let mut pair = Pair::start(
        dir.path(),
        &certs,
        &["--upstream".into(), format!("127.0.0.1:{pg_port}")],
        &["--local".into(), format!("127.0.0.1:{local}")],
    )?;

    // 1. psql through the tunnel reaches the source cluster.
    let out = command_output(
        Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg("SELECT current_setting('port'), count(*) FROM ferry.orders")
            .arg(format!(
                "host=127.0.0.1 port={local} user=postgres dbname=postgres"
            ))
            .env("PGPASSWORD", &pg.password),
    )?;
    let expected_rows = pg.psql("SELECT count(*) FROM ferry.orders")?;
    assert_eq!(out.trim(), format!("{pg_port}|{expected_rows}"));

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // 2. COPY out of the source through the tunnel, streamed straight into COPY into the
        //    source through another tunnelled session: ≥100 MB each way. The bytes are hashed
        //    as they pass; the source's own digest of both tables (computed over a direct
        //    connection) must equal them.
        let reader = pg.connect("127.0.0.1", local).await?;
        let writer = pg.connect("127.0.0.1", local).await?;
        writer.batch_execute("CREATE SCHEMA ferry_in").await?;
        let mut total = 0u64;
        let t = Instant::now();
        for table in &tables {
            let copy = table.replace("ferry.", "ferry_in.");
            writer
                .batch_execute(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
                .await?;
            let mut out = pin!(
                reader
                    .copy_out(&format!(
                        "COPY (SELECT * FROM {table} ORDER BY 1) TO STDOUT"
                    ))
                    .await?
            );
            let mut sink = pin!(writer.copy_in(&format!("COPY {copy} FROM STDIN")).await?);
            let mut hasher = blake3::Hasher::new();
            let mut bytes = 0u64;
            while let Some(chunk) = out.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
                sink.send(chunk).await?;
            }
            let rows = sink.as_mut().finish().await?;
            total += bytes;
            let (src_rows, src_digest) = table_digest(&pg, table)?;
            let (copy_rows, copy_digest) = table_digest(&pg, &copy)?;
            assert_eq!(
                hasher.finalize().to_hex().to_string(),
                src_digest,
                "{table}: bytes received through the tunnel differ from the source's"
            );
            assert_eq!(rows, src_rows, "{table}: rows written through the tunnel");
            assert_eq!(
                (copy_rows, copy_digest),
                (src_rows, src_digest),
                "{table}: the copy written through the tunnel differs"
            );
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "COPY through the tunnel: {:.1} MB each way in {secs:.1} s",
            total as f64 / 1e6
        );
        assert!(
            total >= COPY_MIN_BYTES,
            "only {total} bytes copied; the test needs ≥{COPY_MIN_BYTES}"
        );

        // 3. Concurrent sessions, each checking its own answer.
        let mut tasks = Vec::new();
        for i in 0..16i64 {
            let c = pg.connect("127.0.0.1", local).await?;
            tasks.push(tokio::spawn(async move {
                let row = c
                    .query_one(
                        "SELECT count(*), sum(id) FROM ferry.orders WHERE id % 16 = $1",
                        &[&i],
                    )
                    .await?;
                anyhow::Ok((i, row.get::<_, i64>(0)))
            }));
        }
        let direct = pg.connect("127.0.0.1", pg_port).await?;
        for task in tasks {
            let (i, n) = task.await??;
            let want: i64 = direct
                .query_one(
                    "SELECT count(*) FROM ferry.orders WHERE id % 16 = $1",
                    &[&i],
                )
                .await?
                .get(0);
            assert_eq!(n, want, "session {i}");
        }
        anyhow::Ok(())
    })?;

    // 4. pg_basebackup -X stream through the tunnel, then pg_verifybackup.
    let backup = dir.join("backup");
    let t = Instant::now();
    command_output(
        Command::new(pg_bin("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &local.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&backup)
            .args(["-X", "stream", "-c", "fast", "--no-sync"])
            .env("PGPASSWORD", &pg.password),
    )
    .context("pg_basebackup through the tunnel")?;
    eprintln!(
        "pg_basebackup through the tunnel: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let verified = command_output(Command::new(pg_bin("pg_verifybackup")).arg(&backup))?;
    assert!(verified.contains("successfully verified"), "{verified}");

    // 5. SIGTERM drains: a query running when the target is told to stop completes, then the
    //    agent exits 0.
    let pgr = &pg;
    let drained = rt.block_on(async move {
        let pg = pgr;
        let c = pg.connect("127.0.0.1", local).await?;
        let q = tokio::spawn(async move {
            c.query_one("SELECT 42::int4 FROM pg_sleep(2)", &[])
                .await
                .map(|r| r.get::<_, i32>(0))
        });
        let direct = pg.connect("127.0.0.1", pg_port).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(2)%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await?
                .get(0);
            if n > 0 {
                break;
            }
            ensure!(Instant::now() < deadline, "the slow query never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stop = tokio::task::spawn_blocking(move || {
            let r = pair.target.stop();
            (pair, r)
        });
        let answer = q.await?;
        let (p, stopped) = stop.await?;
        stopped?;
        anyhow::Ok((p, answer))
    })?;
    let (mut pair, answer) = drained;
    assert_eq!(answer?, 42, "the query in flight at SIGTERM completes");
    assert!(pair.target.child.output().contains("SIGTERM"));
    pair.source.stop()?;

    // 6. Audit logs: both verify as closed logs, and agree on every stream.
    let (ok, text) = audit_cli(
        "target",
        &[
            OsStr::new("verify"),
            pair.target.audit.as_os_str(),
            OsStr::new("--peer"),
            pair.source.audit.as_os_str(),
            OsStr::new("--ca"),
            certs.ca().as_os_str(),
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("peer comparison: OK"), "{text}");
    let closed = audit_events(&pair.target.audit, "stream_closed");
    assert!(
        closed.len() >= 20,
        "stream_closed records: {}",
        closed.len()
    );
    // Each agent counted the streams its tunnel carried.
    for log in [&pair.target.audit, &pair.source.audit] {
        let streams: u64 = audit_events(log, "session_ended")
            .iter()
            .map(|r| details(r)["streams"].as_u64().unwrap())
            .sum();
        assert_eq!(streams, closed.len() as u64, "{}", log.display());
        // And what the path was like: the MTU discovery reached (QUIC's floor is 1200 B; on
        // loopback it climbs above it), packets sent, the controller.
        for r in audit_events(log, "session_ended") {
            let path = &details(&r)["path"];
            assert!(path["mtu"].as_u64().is_some_and(|m| m >= 1200), "{path}");
            assert!(
                path["sent_packets"].as_u64().is_some_and(|n| n > 0),
                "{path}"
            );
            assert_eq!(path["congestion_control"], "cubic", "{path}");
        }
    }
    let sent: u64 = closed
        .iter()
        .map(|r| details(r)["received"]["raw_bytes"].as_u64().unwrap())
        .sum();
    let wire: u64 = closed
        .iter()
        .map(|r| details(r)["received"]["wire_bytes"].as_u64().unwrap())
        .sum();
    assert!(sent >= COPY_MIN_BYTES);
    eprintln!(
        "target received {:.1} MB raw as {:.1} MB on the wire (ratio {:.2})",
        sent as f64 / 1e6,
        wire as f64 / 1e6,
        sent as f64 / wire as f64
    );
    let (ok, report) = audit_cli(
        "source",
        &[
            OsStr::new("report"),
            pair.source.audit.as_os_str(),
            OsStr::new("--peer"),
            pair.target.audit.as_os_str(),
            OsStr::new("--ca"),
            certs.ca().as_os_str(),
        ],
    );
    assert!(ok, "{report}");
    assert!(report.contains("postgres"), "{report}");
    assert!(
        report.contains("Verdict:  OK: both logs verified (hash chains, signatures, CA) and agree"),
        "{report}"
    );
    assert!(report.contains("Peers:    the two logs agree"), "{report}");

    // The target's log tells a person's psql session from the base backup and its WAL stream:
    // who connected, from the startup message (never a password or a query).
    let (ok, report) = audit_cli(
        "target",
        &[
            OsStr::new("report"),
            pair.target.audit.as_os_str(),
            OsStr::new("--peer"),
            pair.source.audit.as_os_str(),
        ],
    );
    assert!(ok, "{report}");
    for who in [
        "who       user postgres, database postgres, application psql",
        "who       user postgres, application pg_basebackup, replication",
    ] {
        assert!(report.contains(who), "missing {who:?} in\n{report}");
    }
    let identified = audit_events(&pair.target.audit, "stream_identified");
    assert!(
        identified
            .iter()
            .filter(|r| details(r)["postgres"]["application_name"] == "pg_basebackup")
            .count()
            >= 2,
        "pg_basebackup -X stream opens two replication connections: {identified:?}"
    );
    assert!(!std::fs::read_to_string(&pair.target.audit)?.contains(&pg.password));

    tamper_checks(&pair.target.audit, &dir.join("tampered.jsonl"))?;
    Ok(())
}

/// Editing one record, deleting one, or cutting the tail makes `audit verify` fail and name
/// the line.
fn tamper_checks(log: &Path, scratch: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    let lines: Vec<&str> = text.lines().collect();
    // A stream_closed record somewhere in the middle.
    let k = lines
        .iter()
        .position(|l| l.contains("\"stream_closed\""))
        .context("no stream_closed")?;
    let verify = |content: String| -> (bool, String) {
        std::fs::write(scratch, content).unwrap();
        audit_cli("target", &[OsStr::new("verify"), scratch.as_os_str()])
    };
    let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();

    // Edit: one more byte claimed for the stream.
    let mut edited = lines.clone();
    let changed = edited[k].replacen("\"raw_bytes\":", "\"raw_bytes\":1", 1);
    assert_ne!(changed, edited[k]);
    edited[k] = &changed;
    let (ok, out) = verify(join(&edited));
    assert!(!ok, "edited log verified: {out}");
    assert!(out.contains(&format!("line {}", k + 1)), "{out}");
    // The report refuses it too, the reason on its first line.
    let (ok, out) = audit_cli("target", &[OsStr::new("report"), scratch.as_os_str()]);
    assert!(!ok, "report of an edited log succeeded: {out}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.contains(&format!("FAILED: line {}", k + 1)), "{out}");

    // Delete that record: the next line no longer follows its predecessor.
    let mut deleted = lines.clone();
    deleted.remove(k);
    let (ok, out) = verify(join(&deleted));
    assert!(!ok, "log with a deleted line verified: {out}");
    assert!(out.contains(&format!("line {}", k + 1)), "{out}");

    // Cut the tail: drop the final checkpoint.
    let cut = &lines[..lines.len() - 1];
    let (ok, out) = verify(join(cut));
    assert!(!ok, "cut log verified: {out}");
    assert!(out.contains("line "), "{out}");
    // The report of the cut log exits 1 and says so before anything else.
    let (ok, out) = audit_cli("target", &[OsStr::new("report"), scratch.as_os_str()]);
    assert!(!ok, "report of a cut log succeeded: {out}");
    assert!(
        out.lines().nth(2).unwrap_or_default() == "Verdict:  FAILED: do not rely on this report",
        "{out}"
    );

    // Cut right after the session's checkpoint (agent_stopped and its checkpoint gone).
    let cut = &lines[..lines.len() - 2];
    let (ok, out) = verify(join(cut));
    assert!(!ok, "log cut after a checkpoint verified: {out}");
    assert!(out.contains("agent_stopped"), "{out}");

    // Cut in the middle of the last line.
    let mut partial = join(&lines);
    partial.truncate(partial.len() - 40);
    let (ok, out) = verify(partial);
    assert!(!ok, "half-line log verified: {out}");
    assert!(out.contains(&format!("line {}", lines.len())), "{out}");

    // The untouched log still verifies (the checks above are not vacuous).
    let (ok, out) = verify(join(&lines));
    assert!(ok, "{out}");
    Ok(())
}
