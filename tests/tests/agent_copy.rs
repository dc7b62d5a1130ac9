//! The pure core of the agent-owned base copy against real PostgreSQL: between
//! `pg_backup_start` and `pg_backup_stop`, the files that PostgreSQL's exclusion rules keep
//! (`pgferry_common::backup::plan` over `pgferry_source::backup::walk`) are copied while writes
//! go on, SHA-256'd as written, with `backup_label` from `pg_backup_stop` and a
//! `backup_manifest` in PostgreSQL's format. `pg_verifybackup` accepts the copy and rejects it
//! after one byte is changed. Started as a standby on the slot, the copy replays to the source's
//! position and its tables equal the source's.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_common::backup::{
    backup_manifest, label_timeline, plan, Disposition, ManifestFile, WalRange,
};
use pgferry_tests::{
    as_postgres, chown_postgres, free_tcp_port, load_sample_data, pg_bin, table_digest,
    table_digest_at, wait_until, ChildGuard, PgCluster, TestDir,
};
use support::audit_events;
use support::migration::{MigrationRig, Writer};

/// Copies `from` to `to`, returning the bytes copied and their SHA-256.
fn copy_hashed(from: &Path, to: &Path) -> Result<(u64, [u8; 32])> {
    let mut src = std::fs::File::open(from).with_context(|| from.display().to_string())?;
    let mut dst = std::fs::File::create(to).with_context(|| to.display().to_string())?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = src.read(&mut buf)?;
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        dst.write_all(&buf[..k])?;
        n += k as u64;
    }
    dst.sync_all()?;
    let mut sum = [0; 32];
    sum.copy_from_slice(ctx.finish().as_ref());
    Ok((n, sum))
}

fn verifybackup(dir: &Path) -> Result<(bool, String)> {
    let out = as_postgres(None, &pg_bin("pg_verifybackup"))
        .arg("--no-parse-wal")
        .arg(dir)
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn a_copy_by_postgresqls_rules_verifies_and_runs_as_a_standby() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), port)?;
    pg.start()?;
    load_sample_data(&pg, 10)?;
    pg.psql("CREATE UNLOGGED TABLE ferry.scratch AS SELECT g FROM generate_series(1, 10000) g")?;
    pg.psql("SELECT pg_create_physical_replication_slot('agent_copy', true)")?;
    let rt = tokio::runtime::Runtime::new()?;
    let (session, temp) = rt.block_on(async {
        let session = support::unix_client(&pg.root, port).await?;
        // A temporary table held open while the copy runs: its files must stay behind.
        let temp = support::unix_client(&pg.root, port).await?;
        temp.batch_execute("CREATE TEMP TABLE tt AS SELECT g FROM generate_series(1, 1000) g")
            .await?;
        anyhow::Ok((session, temp))
    })?;
    let start: String = rt
        .block_on(session.query_one(
            "SELECT pg_backup_start('pgferry agent copy', true)::text",
            &[],
        ))?
        .get(0);
    // Writes go on during the copy.
    pg.psql("CREATE TABLE ferry.during AS SELECT g FROM generate_series(1, 2000) g")?;
    pg.psql("DELETE FROM ferry.docs WHERE id % 7 = 0")?;

    let found = pgferry_source::backup::walk(&pg.datadir)?;
    let planned = plan(&found);
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy)?;
    let mut files = Vec::new();
    for (f, d) in &planned {
        let to = copy.join(&f.path);
        if f.is_dir || *d == Disposition::CreateEmpty {
            std::fs::create_dir_all(&to)?;
            continue;
        }
        let from = pg.datadir.join(&f.path);
        let modified = std::fs::metadata(&from)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        match copy_hashed(&from, &to) {
            Ok((size, sha256)) => files.push(ManifestFile {
                path: f.path.clone(),
                size,
                modified,
                sha256,
            }),
            // Dropped meanwhile: WAL replay removes it anyway.
            Err(e) if !from.exists() => eprintln!("gone while copying: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    let row = rt.block_on(session.query_one(
        "SELECT labelfile, spcmapfile, lsn::text FROM pg_backup_stop(false)",
        &[],
    ))?;
    let (label, spcmap, end): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert!(spcmap.is_empty(), "no tablespaces here");
    std::fs::write(copy.join("backup_label"), &label)?;
    let sum = ring::digest::digest(&ring::digest::SHA256, label.as_bytes());
    let mut label_sum = [0; 32];
    label_sum.copy_from_slice(sum.as_ref());
    files.insert(
        0,
        ManifestFile {
            path: "backup_label".into(),
            size: label.len() as u64,
            modified: 0,
            sha256: label_sum,
        },
    );
    let wal = WalRange {
        timeline: label_timeline(&label).context("timeline in backup_label")?,
        start: start.parse()?,
        end: end.parse()?,
    };
    std::fs::write(copy.join("backup_manifest"), backup_manifest(&files, wal))?;
    pgferry_tests::command_output(
        std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&copy),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700))?;
    drop(temp);

    // What PostgreSQL's rules leave out is not there.
    assert!(!copy.join("postmaster.pid").exists());
    assert_eq!(std::fs::read_dir(copy.join("pg_wal"))?.count(), 0);
    let rel = |sql: &str| pg.psql(sql);
    let scratch = rel("SELECT pg_relation_filepath('ferry.scratch')")?;
    assert!(
        !copy.join(&scratch).exists(),
        "an unlogged table's main fork was copied"
    );
    assert!(copy.join(format!("{scratch}_init")).exists());
    eprintln!(
        "copied {} files, {} excluded entries",
        files.len(),
        found.len() - planned.len()
    );

    // pg_verifybackup checks every file against the manifest.
    let (ok, text) = verifybackup(&copy)?;
    assert!(ok, "{text}");
    let victim = files
        .iter()
        .find(|f| f.path.starts_with("base/") && f.size > 0)
        .context("a relation file")?;
    let vpath = copy.join(&victim.path);
    let mut bytes = std::fs::read(&vpath)?;
    bytes[0] ^= 1;
    std::fs::write(&vpath, &bytes)?;
    let (ok, text) = verifybackup(&copy)?;
    assert!(!ok && text.contains(&victim.path), "{text}");
    bytes[0] ^= 1;
    std::fs::write(&vpath, &bytes)?;
    chown_postgres(&vpath)?;
    assert!(verifybackup(&copy)?.0);

    // Started as a standby on the slot, it replays to the source's position.
    let new_port = free_tcp_port();
    std::fs::write(copy.join("standby.signal"), "")?;
    let mut auto = std::fs::OpenOptions::new()
        .append(true)
        .open(copy.join("postgresql.auto.conf"))?;
    writeln!(
        auto,
        "port = {new_port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nprimary_conninfo = 'host={} port={port} user=postgres'\nprimary_slot_name = 'agent_copy'",
        dir.path().display(),
        pg.root.display()
    )?;
    drop(auto);
    let ctl = |verb: &str| {
        as_postgres(None, &pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&copy)
            .args(["-l"])
            .arg(dir.join("copy.log"))
            .args(["-w", "-t", "60", verb])
            .output()
    };
    let started = ctl("start")?;
    assert!(
        started.status.success(),
        "{}",
        std::fs::read_to_string(dir.join("copy.log")).unwrap_or_default()
    );
    pg.psql("INSERT INTO ferry.during SELECT g FROM generate_series(2001, 3000) g")?;
    let target_lsn = pg.psql("SELECT pg_current_wal_lsn()")?;
    let replayed = wait_until(
        "the copy to replay the source's position",
        Duration::from_secs(60),
        || {
            let out = as_postgres(None, &pg_bin("psql"))
                .args(["-X", "-A", "-t", "-h"])
                .arg(dir.path())
                .args([
                    "-p",
                    &new_port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                ])
                .arg(format!("SELECT pg_last_wal_replay_lsn() >= '{target_lsn}'"))
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "t").then_some(())
        },
    );
    let result = replayed.and_then(|()| {
        // Written after the copy began, and after it ended.
        for table in ["ferry.orders", "ferry.docs", "ferry.during"] {
            let theirs = table_digest(&pg, table)?;
            let ours = table_digest_at(dir.path(), new_port, table)?;
            anyhow::ensure!(theirs == ours, "{table}: source {theirs:?}, copy {ours:?}");
        }
        Ok(())
    });
    let _ = ctl("stop");
    result
}

/// `cutover --all-tables` (every table verified), then the new cluster's tables are the
/// source's as they were before it (no writer runs; the cutover fences the source, so its
/// tables are read first).
fn cutover_keeps_the_tables(rig: &MigrationRig) -> Result<()> {
    let tables = ["ferry.orders", "ferry.docs"];
    let before: Vec<_> = tables
        .iter()
        .map(|t| table_digest(&rig.pg, t))
        .collect::<Result<_>>()?;
    let (ok, out) = rig.cmd("cutover", &["--all-tables"]);
    assert!(ok, "{out}");
    assert!(!out.contains("NOT VERIFIED"), "{out}");
    for (table, theirs) in tables.iter().zip(before) {
        let ours = table_digest_at(rig.dir.path(), rig.target_port, table)?;
        assert_eq!(theirs, ours, "{table}");
    }
    Ok(())
}

/// `[target] copy_method = "agent"` through the tunnel, with a writer on the source: the clone
/// passes pg_verifybackup, the standby streams, the cutover verifies every table and every
/// committed write is on the new cluster.
#[test]
fn a_migration_with_the_agent_copy() -> Result<()> {
    let rig = MigrationRig::builder(30)
        .prepare(|pg| {
            pg.psql("CREATE TABLE ferry.writes (n int PRIMARY KEY)")
                .map(drop)
        })
        .target_config("copy_method = \"agent\"\ncopy_streams = 4\n")
        .start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let writer = Writer::start(&rt, rig.pg.port, &rig.pg.password, "ferry.writes")?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("agent copy done"), "{out}");
    assert!(out.contains("pg_verifybackup"), "{out}");
    let copies = audit_events(&rig.target.audit, "base_copy");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(writer.count() > 0);
    let (ok, out) = rig.cmd("cutover", &["--all-tables"]);
    let committed = writer.stop(&rt);
    assert!(ok, "{out}");
    assert!(!out.contains("NOT VERIFIED"), "{out}");
    let on_new: Vec<i32> = rt.block_on(async {
        let c = rig.connect_new().await?;
        let rows = c
            .query("SELECT n FROM ferry.writes ORDER BY n", &[])
            .await?;
        anyhow::Ok(rows.iter().map(|r| r.get(0)).collect())
    })?;
    assert_eq!(on_new, committed);
    Ok(())
}

/// The target agent killed (SIGKILL) in the middle of an agent copy: started again, `clone`
/// goes on with the files it lacks (the source's backup session kept running), and the copy
/// still passes pg_verifybackup and runs as a standby whose tables equal the source's.
#[test]
fn an_agent_copy_resumes_after_the_target_is_killed() -> Result<()> {
    let mut rig = MigrationRig::builder(120)
        .target_config("copy_method = \"agent\"\ncopy_streams = 2\n")
        .start()?;
    let mut clone = rig.spawn_cmd("clone", &[])?;
    rig.wait_for_journal_lines(30)?;
    rig.kill_target();
    let at_kill = rig.journal_lines();
    let _ = clone.try_wait();
    eprintln!("target killed with {at_kill} journal line(s)");
    rig.start_target()?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    let resumed = out
        .lines()
        .find(|l| l.contains("resuming the copy"))
        .with_context(|| format!("no resumption:\n{out}"))?;
    eprintln!("{resumed}");
    assert!(out.contains("agent copy done"), "{out}");
    eprintln!(
        "{}",
        out.lines()
            .find(|l| l.contains("agent copy done"))
            .unwrap_or_default()
    );
    // No writes here: the source's tables now are the ones to find after the cutover (which
    // fences the source, so they are read first).
    cutover_keeps_the_tables(&rig)
}

/// A rollback of a migration whose agent copy was cut (the target agent killed mid-copy) ends
/// the source's backup session: the source is not left in backup mode, holding a PostgreSQL
/// session, until its agent restarts. The slot goes too, as in every rollback.
#[test]
fn a_rollback_ends_the_backup_session_of_a_cut_agent_copy() -> Result<()> {
    let mut rig = MigrationRig::builder(60)
        .target_config("copy_method = \"agent\"\ncopy_streams = 2\n")
        .start()?;
    let in_backup = |pg: &PgCluster| {
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_backup_start%'")
    };
    let mut clone = rig.spawn_cmd("clone", &[])?;
    rig.wait_for_journal_lines(5)?;
    rig.kill_target();
    let _ = clone.try_wait();
    rig.start_target()?;
    assert_eq!(in_backup(&rig.pg)?, "1", "the backup session is held");
    let (ok, out) = rig.cmd("rollback", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ending the base copy's backup session"),
        "{out}"
    );
    wait_until("the backup session to end", Duration::from_secs(10), || {
        (in_backup(&rig.pg).ok()? == "0").then_some(())
    })?;
    assert_eq!(
        rig.pg.psql("SELECT count(*) FROM pg_replication_slots")?,
        "0"
    );
    Ok(())
}

/// A source with a tablespace (a table and its primary key in it), copied by each method into
/// the directory `tablespace_mapping` names: linked as `pg_basebackup` does (no
/// `tablespace_map`), `pg_verifybackup` passes, the cutover verifies the table, and nothing is
/// written into the source's tablespace. Unmapped on this shared host, the tablespace would go
/// to the source's own directory: the preflight says so, and the agent copy refuses before
/// writing a byte there.
#[test]
fn a_source_with_a_tablespace_is_copied_into_the_mapped_directory() -> Result<()> {
    let space = TestDir::new()?;
    for (method, mapped) in [("agent", false), ("agent", true), ("pg_basebackup", true)] {
        let src = space.join(format!("src-{method}-{mapped}"));
        let new = space.join(format!("new-{method}-{mapped}"));
        std::fs::create_dir(&src)?;
        chown_postgres(&src)?;
        if method == "pg_basebackup" {
            // pg_basebackup runs as the cluster's user: its directory is made for it, empty.
            std::fs::create_dir(&new)?;
            chown_postgres(&new)?;
        }
        let mut config = format!("copy_method = \"{method}\"\ncopy_streams = 2\n");
        if mapped {
            config.push_str(&format!(
                "tablespace_mapping = [\"{}={}\"]\n",
                src.display(),
                new.display()
            ));
        }
        let rig = MigrationRig::builder(1)
            .prepare(|pg| {
                pg.psql(&format!("CREATE TABLESPACE extra LOCATION '{}'", src.display()))?;
                pg.psql(
                    "CREATE TABLE ferry.spaced (n int PRIMARY KEY USING INDEX TABLESPACE extra, t text) TABLESPACE extra;
                     INSERT INTO ferry.spaced SELECT g, repeat('x', g % 200) FROM generate_series(1, 50000) g",
                )?;
                // Its free space and visibility maps made now: autovacuum adds no file later.
                pg.psql("VACUUM ferry.spaced")?;
                pg.psql("CHECKPOINT").map(drop)
            })
            .target_config(&config)
            .start()?;
        let before = listing(&src)?;
        assert!(
            before.len() >= 3,
            "the tablespace holds the table: {before:?}"
        );
        // The preflight names the tablespace's directory here, and refuses a non-empty one.
        let (ok, out) = rig.cmd("preflight", &[]);
        let line = out
            .lines()
            .find(|l| l.contains("target_tablespace"))
            .with_context(|| format!("no tablespace check:\n{out}"))?;
        let here = if mapped { &new } else { &src };
        assert!(line.contains(&here.display().to_string()), "{line}");
        assert_eq!(ok, mapped, "{out}");
        let (ok, out) = rig.cmd("clone", &[]);
        assert_eq!(
            listing(&src)?,
            before,
            "{method}: the source's tablespace changed"
        );
        if !mapped {
            assert!(!ok, "{out}");
            // Stopped by the clone's preflight, before the copy (which refuses it too).
            assert!(out.contains("preflight failed: target_tablespace"), "{out}");
            assert!(out.contains("which is not empty"), "{out}");
            assert!(out.contains("tablespace_mapping = ["), "{out}");
            continue;
        }
        assert!(ok, "{method}: {out}");
        assert!(out.contains("pg_verifybackup"), "{out}");
        let oid = rig
            .pg
            .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")?;
        assert_eq!(
            std::fs::read_link(rig.data_dir.join("pg_tblspc").join(oid.trim()))?,
            new,
            "{method}"
        );
        let copied = listing(&new)?;
        assert_eq!(
            copied.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            before.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            "{method}: the same files in the new tablespace"
        );
        assert!(!rig.data_dir.join("tablespace_map").exists());
        let theirs = table_digest(&rig.pg, "ferry.spaced")?;
        let (ok, out) = rig.cmd("cutover", &["--all-tables"]);
        assert!(ok, "{method}: {out}");
        assert!(!out.contains("NOT VERIFIED"), "{out}");
        assert_eq!(
            table_digest_at(rig.dir.path(), rig.target_port, "ferry.spaced")?,
            theirs,
            "{method}"
        );
    }
    Ok(())
}

/// Every file under `dir` (relative path, size), sorted.
fn listing(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir)?.to_string_lossy().to_string();
                out.push((rel, m.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A measurement, not a check (`cargo test --release --test agent_copy -- --ignored
/// --nocapture`): the same cluster cloned through the tunnel over loopback with each copy
/// method, one after the other in one run; prints the time of the copy phase of each and their
/// ratio. `PGFERRY_COPY_MB` sets the sample size (default 300).
#[test]
#[ignore]
fn measure_copy_methods() -> Result<()> {
    let mb: u32 = pgferry_tests::env_or("PGFERRY_COPY_MB", 300);
    let mut secs = Vec::new();
    // `PGFERRY_COPY_STREAMS` sets the agent copy's streams (default: its own default).
    let agent = match std::env::var("PGFERRY_COPY_STREAMS") {
        Ok(n) => format!("copy_method = \"agent\"\ncopy_streams = {n}\n"),
        Err(_) => "copy_method = \"agent\"\n".to_string(),
    };
    let basebackup = "copy_method = \"pg_basebackup\"\n";
    for (name, config) in [("pg_basebackup", basebackup), ("agent", agent.as_str())] {
        let rig = MigrationRig::builder(mb).target_config(config).start()?;
        let t = std::time::Instant::now();
        let (ok, out) = rig.cmd("clone", &[]);
        assert!(ok, "{out}");
        let copy = support::migration::copy_secs(&out).context("the copy's duration")?;
        eprintln!(
            "COPY {name}: copy {copy:.2} s, whole clone {:.1} s",
            t.elapsed().as_secs_f64()
        );
        secs.push(copy);
    }
    eprintln!(
        "COPY agent / pg_basebackup = {:.2} ({mb} MB sample, loopback, {} cores)",
        secs[1] / secs[0],
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// The source agent killed (SIGKILL) in the middle of an agent copy: its backup session ends
/// with it, and a table already copied changes before the next one starts. The same `clone`
/// goes on: a new backup session, the files that are unchanged on the source (SHA-256 on both
/// sides) kept, the rest fetched again; WAL replay from the new start makes the copy
/// consistent, which the cutover's verification of every table checks.
#[test]
fn an_agent_copy_keeps_unchanged_files_when_the_source_restarts() -> Result<()> {
    let mut rig = MigrationRig::builder(120)
        .target_config("copy_method = \"agent\"\ncopy_streams = 2\n")
        .start()?;
    let source_bytes = rig.source_bytes()?;
    let journal = rig.copy_journal();
    // The table to change: one whose first file is complete on the target before the kill.
    let files = table_files(&rig, &["ferry.orders", "ferry.docs"])?;
    let mut clone = rig.spawn_cmd("clone", &[])?;
    let changed = wait_until(
        "a table's file in the copy's journal",
        Duration::from_secs(120),
        || {
            let j = std::fs::read_to_string(&journal).ok()?;
            files
                .iter()
                .find(|(_, p)| j.contains(&format!("\"path\":\"{p}\"")))
                .map(|(t, _)| t.clone())
        },
    )?;
    assert!(
        support::du(&rig.data_dir) < source_bytes,
        "the copy is not over yet"
    );
    rig.kill_and_restart_source()?;
    // Rows deleted: the table's first file changes.
    rig.pg
        .psql(&format!("DELETE FROM {changed} WHERE id % 5 = 0"))?;
    eprintln!("changed {changed} between the sessions");
    let (text, delta) = clone_after_lost_session(&mut clone)?;
    // The changed file is not among the kept ones.
    let (kept, of) = delta
        .split(", ")
        .find_map(|part| {
            let mut w = part.split_whitespace();
            let kept: u64 = w.next()?.parse().ok()?;
            (w.next()? == "of").then_some(())?;
            let _the = w.next()?;
            Some((kept, w.next()?.parse::<u64>().ok()?))
        })
        .context("kept count")?;
    assert!(kept < of, "{delta}");
    assert!(text.contains("pg_verifybackup"), "{text}");
    cutover_keeps_the_tables(&rig)
}

/// Each of `tables` and its first file on the source (relative to the data directory).
fn table_files(rig: &MigrationRig, tables: &[&str]) -> Result<Vec<(String, String)>> {
    tables
        .iter()
        .map(|t| {
            let path = rig
                .pg
                .psql(&format!("SELECT pg_relation_filepath('{t}')"))?;
            anyhow::Ok((t.to_string(), path))
        })
        .collect()
}

/// Waits for `clone` to succeed; its output, and its line on the lost backup session.
fn clone_after_lost_session(clone: &mut ChildGuard) -> Result<(String, String)> {
    let status = wait_until("the clone to finish", Duration::from_secs(300), || {
        clone.try_wait().ok().flatten()
    })?;
    let text = clone.output();
    assert!(status.success(), "{text}");
    let delta = text
        .lines()
        .find(|l| l.contains("was lost") && l.contains("partly fetched"))
        .with_context(|| format!("no delta:\n{text}"))?
        .to_string();
    eprintln!("{delta}");
    Ok((text, delta))
}

/// The files under `base/` the target has only part of: (path, its length here, the source's).
fn partly_fetched(rig: &MigrationRig) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("base")];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(rig.data_dir.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let path = rel.join(e.file_name());
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) => {
                    let theirs =
                        std::fs::metadata(rig.pg.datadir.join(&path)).map_or(0, |t| t.len());
                    if m.len() > 0 && m.len() < theirs {
                        out.push((path.to_string_lossy().to_string(), m.len(), theirs));
                    }
                }
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// 120 MB of sample data whose hint bits are set and written (`VACUUM (FREEZE)`, `CHECKPOINT`),
/// so that its files change only where a test changes them; the agent copy over 2 streams.
fn settled_rig() -> Result<MigrationRig> {
    MigrationRig::builder(120)
        .prepare(|pg| {
            pg.psql("VACUUM (FREEZE)")
                .and_then(|_| pg.psql("CHECKPOINT"))
                .map(drop)
        })
        .target_config("copy_method = \"agent\"\ncopy_streams = 2\n")
        .start()
}

/// A kill -9 of the source agent loses its backup session; in the new one, a file the target
/// has part of goes on from its end when those bytes still equal the source's, and is fetched
/// again when they do not (one of them is damaged here on the target between the sessions).
#[test]
fn a_partly_fetched_file_goes_on_in_a_new_session_only_if_its_bytes_are_unchanged() -> Result<()> {
    let mut rig = settled_rig()?;
    let source_bytes = rig.source_bytes()?;
    let mut clone = rig.spawn_cmd("clone", &[])?;
    wait_until("half of the copy", Duration::from_secs(120), || {
        (support::du(&rig.data_dir) > source_bytes / 2).then_some(())
    })?;
    rig.kill_source();
    // What the target had received reaches its files within moments.
    let mut last = Vec::new();
    let partial = wait_until("the target's files still", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = partly_fetched(&rig);
        let still = now == last;
        last = now.clone();
        still.then_some(now)
    })?;
    anyhow::ensure!(
        !partial.is_empty(),
        "no file partly fetched at the kill (the test needs one)"
    );
    eprintln!("partly fetched at the kill: {partial:?}");
    // With two, the first one's bytes are damaged here: they no longer equal the source's.
    let damaged = (partial.len() > 1).then(|| partial[0].clone());
    let at = |len: u64| (len / 2).min(8192 + 100);
    if let Some((path, len, _)) = &damaged {
        let mut bytes = std::fs::read(rig.data_dir.join(path))?;
        bytes[at(*len) as usize] ^= 0xff;
        std::fs::write(rig.data_dir.join(path), bytes)?;
    }
    rig.start_source()?;
    let (text, delta) = clone_after_lost_session(&mut clone)?;
    let kept: usize = support::migration::number_before(&delta, " partly fetched")
        .with_context(|| delta.to_string())?;
    assert!(kept >= 1, "{delta}");
    assert!(
        kept <= partial.len() - usize::from(damaged.is_some()),
        "{delta}"
    );
    if let Some((path, len, _)) = &damaged {
        let ours = std::fs::read(rig.data_dir.join(path))?;
        let theirs = std::fs::read(rig.pg.datadir.join(path))?;
        let i = at(*len) as usize;
        assert_eq!(ours[i], theirs[i], "{path}: the damaged byte was kept");
    }
    assert!(text.contains("pg_verifybackup"), "{text}");
    cutover_keeps_the_tables(&rig)
}

/// A table file complete on the target changes in one row while the source agent is down (its
/// backup session lost): the new session fetches again the ranges of the file that differ
/// (BLAKE3 of each MiB on both sides), not the whole file, and the copy is still exact: every
/// table verified at the cutover, `pg_verifybackup` passed.
#[test]
fn a_changed_file_is_fetched_again_only_where_it_changed() -> Result<()> {
    let mut rig = settled_rig()?;
    let journal = rig.copy_journal();
    let tables: Vec<(String, String, u64)> =
        table_files(&rig, &["ferry.orders", "ferry.events", "ferry.docs"])?
            .into_iter()
            .map(|(t, path)| {
                let size = std::fs::metadata(rig.pg.datadir.join(&path))?.len();
                anyhow::Ok((t, path, size))
            })
            .collect::<Result<_>>()?;
    let mut clone = rig.spawn_cmd("clone", &[])?;
    let (table, path, size) = wait_until(
        "a table's file in the copy's journal",
        Duration::from_secs(120),
        || {
            let j = std::fs::read_to_string(&journal).ok()?;
            tables
                .iter()
                .find(|(_, p, _)| j.contains(&format!("\"path\":\"{p}\"")))
                .cloned()
        },
    )?;
    assert!(
        size >= 4 << 20,
        "{table}: {size} bytes (the test needs a few MiB)"
    );
    rig.kill_source();
    rig.pg.psql(&format!(
        "UPDATE {table} SET id = -id WHERE id = 1; CHECKPOINT"
    ))?;
    rig.start_source()?;
    let (text, delta) = clone_after_lost_session(&mut clone)?;
    eprintln!("{table} ({path}, {size} bytes) changed in one row");
    assert!(
        delta.contains(&path),
        "{path} is among the changed files: {delta}"
    );
    let patched: f64 = support::migration::number_before(&delta, " of their")
        .with_context(|| delta.to_string())?;
    let of: f64 = support::migration::number_before(&delta, " MB fetched again")
        .with_context(|| delta.to_string())?;
    assert!(
        of * 1e6 >= size as f64,
        "the table's file is among the patched: {delta}"
    );
    assert!(
        patched <= 8.5,
        "a row (two pages, an index leaf) costs a few MiB ranges, not the file: {delta}"
    );
    assert!(text.contains("pg_verifybackup"), "{text}");
    cutover_keeps_the_tables(&rig)
}

/// The target agent killed while it patches the files that changed in a lost backup session:
/// the journal names them as being patched, so the next run does not take them for verified
/// prefixes; it compares them range by range again (keeping the ranges already patched), and
/// the copy is still exact (every table verified at the cutover, `pg_verifybackup` passed).
#[test]
fn a_kill_during_a_patch_compares_the_patched_files_again() -> Result<()> {
    let mut rig = settled_rig()?;
    let journal = rig.copy_journal();
    let tables = table_files(&rig, &["ferry.orders", "ferry.events", "ferry.docs"])?;
    let mut clone = rig.spawn_cmd("clone", &[])?;
    // Two tables complete on the target, then the source's session is lost and both change on
    // every page: their patches are most of their size, long enough to be cut.
    let complete = wait_until(
        "two tables' files in the copy's journal",
        Duration::from_secs(120),
        || {
            let j = std::fs::read_to_string(&journal).ok()?;
            let done: Vec<String> = tables
                .iter()
                .filter(|(_, p)| j.contains(&format!("\"kind\":\"done\",\"path\":\"{p}\"")))
                .map(|(t, _)| t.clone())
                .collect();
            (done.len() >= 2).then_some(done)
        },
    )?;
    rig.kill_source();
    for t in &complete {
        rig.pg.psql(&format!("DELETE FROM {t} WHERE id % 5 = 0"))?;
    }
    rig.pg.psql("CHECKPOINT")?;
    rig.start_source()?;
    rig.target.wait_for("compared range by range")?;
    // The source agent frozen at once (67 MB cannot cross in the moment it takes): the patches
    // stop wherever they are, and the target is killed in the middle of them.
    let source_pid = rig.source.child.pid().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &source_pid])
            .status()
    };
    signal("-STOP")?;
    rig.kill_target();
    signal("-CONT")?;
    let _ = clone.wait(Duration::from_secs(30));
    // What the kill left: a file named for patching without its done line.
    let text = std::fs::read_to_string(&journal)?;
    let mut patching = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let path = v["path"].as_str().unwrap_or_default().to_string();
        match v["kind"].as_str() {
            Some("patching") => patching.insert(path),
            Some("done") => patching.remove(&path),
            _ => false,
        };
    }
    anyhow::ensure!(
        !patching.is_empty(),
        "the kill came after every patch was done (the test needs one cut):\n{text}"
    );
    eprintln!("being patched at the kill: {patching:?}");
    rig.start_target()?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    let again = out
        .lines()
        .find(|l| l.contains("were being patched when the copy stopped"))
        .with_context(|| format!("the patched files were not compared again:\n{out}"))?;
    eprintln!("{again}");
    // The ranges patched before the kill are kept.
    assert!(again.contains("compared range by range"), "{again}");
    assert!(out.contains("pg_verifybackup"), "{out}");
    cutover_keeps_the_tables(&rig)
}
