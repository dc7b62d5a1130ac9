//! The fence through whole cutovers with real agents:
//!
//! - Writers that reconnect and insist on read-write (`BEGIN READ WRITE`, `SET
//!   default_transaction_read_only = off`, `SET SESSION CHARACTERISTICS AS TRANSACTION READ
//!   WRITE`), as superuser and as an ordinary role, over TCP and over the unix socket, keep
//!   trying through the cutover. Not one row is committed on the source after the fence LSN
//!   (read from the source's own WAL with pg_waldump, independently of pgferry), every row whose
//!   commit returned OK is on the promoted cluster, and every writer was refused with
//!   PostgreSQL's message rather than left hanging.
//! - The target agent killed (SIGKILL) between the fence and promotion, then `rollback`; and
//!   the source agent killed while fenced and started again, then rollback: `pg_hba.conf` and
//!   `postgresql.auto.conf` are byte for byte as before the fence and ordinary clients write
//!   again.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgferry_common::fence::is_fenced;
use pgferry_source::fence::{connect_from_control_addr, copy_path};
use pgferry_tests::{pg_bin, PgCluster};
use support::migration::MigrationRig;

const APP_PASSWORD: &str = "app-pw";
const REFUSED: &str = "pg_hba.conf rejects connection";

/// The ordinary role and the writers' table.
fn prepare(pg: &PgCluster) -> Result<()> {
    pg.psql(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';
         CREATE TABLE ferry.writes (n bigint PRIMARY KEY, writer text NOT NULL,
                                    at timestamptz NOT NULL DEFAULT clock_timestamp());
         GRANT USAGE ON SCHEMA ferry TO app; GRANT SELECT, INSERT ON ferry.writes TO app;"
    ))
    .map(|_| ())
}

#[derive(Debug, Clone, Copy)]
enum Insist {
    /// `BEGIN READ WRITE; INSERT; COMMIT` (what a driver does after `setReadOnly(false)`).
    BeginReadWrite,
    /// `SET default_transaction_read_only = off` after each connect, then autocommit inserts.
    SetReadOnlyOff,
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE` after each connect.
    SessionReadWrite,
}

#[derive(Debug, Clone)]
struct WriterSpec {
    name: String,
    user: &'static str,
    password: String,
    unix: bool,
    insist: Insist,
}

/// What one writer saw.
#[derive(Debug, Default)]
struct WriterLog {
    /// Sequence numbers whose commit returned OK.
    committed: Vec<i64>,
    /// Error messages, each once, with when it was first seen.
    errors: Vec<(String, Instant)>,
    /// When the writer last tried anything.
    last_attempt: Option<Instant>,
}

impl WriterLog {
    fn error(&mut self, e: &tokio_postgres::Error) {
        let m = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        let m = if m.contains(REFUSED) {
            REFUSED.to_string()
        } else {
            m
        };
        if !self.errors.iter().any(|(seen, _)| *seen == m) {
            self.errors.push((m, Instant::now()));
        }
    }
}

async fn writer_connect(
    pg_root: &std::path::Path,
    port: u16,
    spec: &WriterSpec,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    if spec.unix {
        cfg.host_path(pg_root);
    } else {
        cfg.host("127.0.0.1");
    }
    cfg.port(port)
        .user(spec.user)
        .password(&spec.password)
        .dbname("postgres")
        .application_name(&spec.name)
        .connect_timeout(Duration::from_secs(5));
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match spec.insist {
        Insist::BeginReadWrite => {}
        Insist::SetReadOnlyOff => {
            c.batch_execute("SET default_transaction_read_only = off")
                .await?
        }
        Insist::SessionReadWrite => {
            c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
                .await?
        }
    }
    Ok(c)
}

/// Inserts numbered rows until stopped, reconnecting (and insisting again) after every error.
async fn insist(
    pg_root: std::path::PathBuf,
    port: u16,
    spec: WriterSpec,
    seq: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let sql = "INSERT INTO ferry.writes (n, writer) VALUES ($1, $2)";
    while !stop.load(Ordering::SeqCst) {
        log.lock().unwrap().last_attempt = Some(Instant::now());
        let c = match &client {
            Some(c) => c,
            None => match writer_connect(&pg_root, port, &spec).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    log.lock().unwrap().error(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let n = seq.fetch_add(1, Ordering::SeqCst);
        let r = match spec.insist {
            Insist::BeginReadWrite => {
                async {
                    c.batch_execute("BEGIN READ WRITE").await?;
                    c.execute(sql, &[&n, &spec.name]).await?;
                    c.batch_execute("COMMIT").await
                }
                .await
            }
            _ => c.execute(sql, &[&n, &spec.name]).await.map(|_| ()),
        };
        match r {
            Ok(()) => log.lock().unwrap().committed.push(n),
            Err(e) => {
                log.lock().unwrap().error(&e);
                client = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Transactions that inserted into the table with file node `rel` (`spc/db/node`) and whose
/// commit record lies at or after `fence`, read from the WAL in `pg_wal` from `start` on.
fn commits_after(pg_wal: &std::path::Path, start: &str, fence: u64, rel: &str) -> Result<usize> {
    let out = std::process::Command::new(pg_bin("pg_waldump"))
        .arg("-p")
        .arg(pg_wal)
        .args(["-s", start])
        .output()?;
    // pg_waldump ends with an error at the end of the WAL written so far; the records are out.
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        Some(rest.trim_start().split([',', ' ']).next()?.to_string())
    };
    let mut inserting = BTreeSet::new();
    let mut committed_after = 0;
    let mut records = 0;
    for line in text.lines() {
        records += 1;
        let (Some(tx), Some(lsn)) = (field(line, "tx:"), field(line, "lsn:")) else {
            continue;
        };
        let lsn: pgferry_common::migration::Lsn = lsn.parse()?;
        if line.starts_with("rmgr: Heap ")
            && line.contains("desc: INSERT")
            && line.contains(&format!("rel {rel} "))
        {
            inserting.insert(tx);
        } else if line.starts_with("rmgr: Transaction")
            && line.contains("desc: COMMIT")
            && lsn.0 >= fence
            && inserting.contains(&tx)
        {
            committed_after += 1;
        }
    }
    anyhow::ensure!(
        records > 10 && !inserting.is_empty(),
        "pg_waldump read too little ({records} records, {} inserting transactions): {}",
        inserting.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(committed_after)
}

fn lsn_after(text: &str, label: &str) -> Option<String> {
    Some(
        text.split(label)
            .nth(1)?
            .split_whitespace()
            .next()?
            .trim_end_matches([':', ';', ','])
            .to_string(),
    )
}

#[test]
fn insistent_writers_commit_nothing_after_the_fence() -> Result<()> {
    let rig = MigrationRig::start(10, prepare)?;
    let pg = &rig.pg;
    let rel = pg.psql(
        "SELECT (SELECT dattablespace FROM pg_database WHERE datname = current_database())
                || '/' || (SELECT oid FROM pg_database WHERE datname = current_database())
                || '/' || pg_relation_filenode('ferry.writes')",
    )?;

    // Twelve writers: each way of insisting, as superuser and as `app`, over TCP and unix.
    let rt = tokio::runtime::Runtime::new()?;
    let (seq, stop) = (
        Arc::new(AtomicI64::new(1)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut writers = Vec::new();
    for insist_how in [
        Insist::BeginReadWrite,
        Insist::SetReadOnlyOff,
        Insist::SessionReadWrite,
    ] {
        for (user, password) in [
            ("postgres", pg.password.clone()),
            ("app", APP_PASSWORD.into()),
        ] {
            for unix in [false, true] {
                let spec = WriterSpec {
                    name: format!(
                        "{insist_how:?}/{user}/{}",
                        if unix { "unix" } else { "tcp" }
                    ),
                    user,
                    password: password.clone(),
                    unix,
                    insist: insist_how,
                };
                let log = Arc::new(Mutex::new(WriterLog::default()));
                let task = rt.spawn(insist(
                    pg.root.clone(),
                    pg.port,
                    spec.clone(),
                    seq.clone(),
                    stop.clone(),
                    log.clone(),
                ));
                writers.push((spec, log, task));
            }
        }
    }
    let committed = |writers: &[(WriterSpec, Arc<Mutex<WriterLog>>, _)]| -> usize {
        writers
            .iter()
            .map(|(_, l, _)| l.lock().unwrap().committed.len())
            .sum()
    };

    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    pgferry_tests::wait_until("writes from every writer", Duration::from_secs(60), || {
        writers
            .iter()
            .all(|(_, l, _)| l.lock().unwrap().committed.len() > 5)
            .then_some(())
    })?;
    let start_lsn = pg.psql("SELECT pg_current_wal_lsn()")?;
    let before_cutover = committed(&writers);

    // The writers' table is left out of pgferry's verification on purpose (as a table over
    // the verification budget would be): what is measured is the fence, not the verification
    // catching a leak. The test compares that table on both sides itself.
    let (cut_ok, out) = rig.cmd(
        "cutover",
        &[
            "--tables",
            "ferry.orders,ferry.events,ferry.docs",
            "--max-lag",
            "100000000",
        ],
    );
    let fenced_at = Instant::now();
    // The writers keep insisting against the fenced source for a while.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for (spec, _, task) in writers.iter_mut() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .with_context(|| format!("writer {} hung", spec.name))??;
        }
        anyhow::Ok(())
    })?;

    // From the source's WAL, independently of pgferry: how many rows were committed on the
    // source at or after the fence LSN.
    let fence_lsn = lsn_after(&out, "source fenced at LSN ")
        .with_context(|| format!("no fence LSN in the cutover's output:\n{out}"))?;
    let fence: pgferry_common::migration::Lsn = fence_lsn.parse()?;
    let after = commits_after(&pg.datadir.join("pg_wal"), &start_lsn, fence.0, &rel)?;
    eprintln!("rows committed after the fence: {after} (fence LSN {fence_lsn})");
    assert_eq!(after, 0, "rows committed on the source after the fence");
    assert!(cut_ok, "{out}");
    assert!(out.contains("cutover complete"), "{out}");

    // Every commit that returned OK is on the promoted cluster; the source (read the way a
    // restarted source agent would, from pgferry's own address) holds exactly the same rows.
    let ok_rows: BTreeSet<i64> = writers
        .iter()
        .flat_map(|(_, l, _)| l.lock().unwrap().committed.clone())
        .collect();
    let (on_target, on_source) = rt.block_on(async {
        let rows = |c: tokio_postgres::Client| async move {
            let r = c.query("SELECT n FROM ferry.writes", &[]).await?;
            anyhow::Ok(
                r.iter()
                    .map(|r| r.get::<_, i64>(0))
                    .collect::<BTreeSet<i64>>(),
            )
        };
        let target = rows(rig.connect_new().await?).await?;
        let source = rows(connect_from_control_addr(&pg.conninfo().parse()?).await?).await?;
        anyhow::Ok((target, source))
    })?;
    let missing: Vec<&i64> = ok_rows.difference(&on_target).collect();
    assert!(
        missing.is_empty(),
        "committed on the source, missing on the target: {missing:?}"
    );
    assert_eq!(on_source, on_target, "source and target rows");

    // Each writer was refused at once with PostgreSQL's message during the fence, kept trying
    // after it (no hang), and committed before it.
    for (spec, log, _) in &writers {
        let l = log.lock().unwrap();
        assert!(
            l.errors.iter().any(|(m, _)| m == REFUSED),
            "{}: never refused by pg_hba.conf: {:?}",
            spec.name,
            l.errors
        );
        assert!(
            l.last_attempt.is_some_and(|t| t > fenced_at),
            "{}: stopped trying",
            spec.name
        );
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, l, _) in &writers {
        for (m, _) in &l.lock().unwrap().errors {
            *seen.entry(m.clone()).or_insert(0) += 1;
        }
    }
    eprintln!(
        "insistent writers: {} commits OK ({before_cutover} before the cutover began), all on the target; errors the writers saw (how many writers): {seen:#?}",
        ok_rows.len()
    );
    Ok(())
}

/// The source's fence files and what they hold before the fence.
struct SourceFiles {
    hba: std::path::PathBuf,
    auto: std::path::PathBuf,
    hba_bytes: Vec<u8>,
    auto_bytes: Vec<u8>,
    modes: (u32, u32),
}

impl SourceFiles {
    fn read(pg: &PgCluster) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let (hba, auto) = (
            pg.datadir.join("pg_hba.conf"),
            pg.datadir.join("postgresql.auto.conf"),
        );
        Ok(Self {
            hba_bytes: std::fs::read(&hba)?,
            auto_bytes: std::fs::read(&auto)?,
            modes: (
                std::fs::metadata(&hba)?.mode(),
                std::fs::metadata(&auto)?.mode(),
            ),
            hba,
            auto,
        })
    }

    fn assert_fenced(&self) -> Result<()> {
        assert!(
            is_fenced(&std::fs::read(&self.hba)?),
            "pg_hba.conf is fenced"
        );
        assert_eq!(std::fs::read(copy_path(&self.hba))?, self.hba_bytes);
        assert_eq!(std::fs::read(copy_path(&self.auto))?, self.auto_bytes);
        Ok(())
    }

    /// Byte for byte as before, same modes, no copies left.
    fn assert_restored(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::read(&self.hba)?,
            self.hba_bytes,
            "pg_hba.conf restored"
        );
        assert_eq!(
            std::fs::read(&self.auto)?,
            self.auto_bytes,
            "postgresql.auto.conf restored"
        );
        assert_eq!(
            (
                std::fs::metadata(&self.hba)?.mode(),
                std::fs::metadata(&self.auto)?.mode()
            ),
            self.modes
        );
        assert!(!copy_path(&self.hba).exists() && !copy_path(&self.auto).exists());
        Ok(())
    }
}

/// An ordinary client writes on the source again: `app` over TCP, postgres over the socket.
fn assert_source_writable(rig: &MigrationRig, rt: &tokio::runtime::Runtime, n: i64) -> Result<()> {
    rt.block_on(async {
        let (app, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(rig.pg.port)
            .user("app")
            .password(APP_PASSWORD)
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        app.execute(
            "INSERT INTO ferry.writes (n, writer) VALUES ($1, 'after rollback')",
            &[&n],
        )
        .await?;
        anyhow::Ok(())
    })?;
    rig.pg.psql(&format!(
        "INSERT INTO ferry.writes (n, writer) VALUES ({}, 'after rollback, unix')",
        n + 1
    ))?;
    assert_eq!(rig.pg.psql("SHOW default_transaction_read_only")?, "off");
    Ok(())
}

/// Clones, holds the standby's replay so the cutover waits between the fence and promotion,
/// starts `cutover` in the background and returns once the source is fenced.
fn cutover_stuck_after_the_fence(
    rig: &MigrationRig,
    rt: &tokio::runtime::Runtime,
    replay_timeout: &str,
) -> Result<pgferry_tests::ChildGuard> {
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    rt.block_on(async {
        rig.connect_new()
            .await?
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await?;
        anyhow::Ok(())
    })?;
    // Whole-table digests at the fence: the block-range pre-pass would wait for the paused
    // standby to replay its marker and never reach the fence.
    let cutover = rig.spawn_cmd(
        "cutover",
        &["--replay-timeout-secs", replay_timeout, "--verify-at-fence"],
    )?;
    rig.wait_for_phase("fenced", Duration::from_secs(60))?;
    Ok(cutover)
}

#[test]
fn a_killed_target_agent_then_rollback_restores_the_source_byte_for_byte() -> Result<()> {
    let mut rig = MigrationRig::start(5, prepare)?;
    let rt = tokio::runtime::Runtime::new()?;
    let files = SourceFiles::read(&rig.pg)?;
    let mut cutover = cutover_stuck_after_the_fence(&rig, &rt, "600")?;
    files.assert_fenced()?;
    let err = rig.pg.psql("SELECT 1").unwrap_err();
    assert!(format!("{err:#}").contains(REFUSED), "{err:#}");

    // Killed between the fence and promotion; started again; rollback.
    rig.kill_and_restart_target()?;
    cutover.wait(Duration::from_secs(30))?;
    assert_eq!(rig.phase().as_deref(), Some("fenced"));
    let (ok, out) = rig.cmd("rollback", &[]);
    assert!(ok, "{out}");
    assert_eq!(rig.phase().as_deref(), Some("rolled_back"), "{out}");
    files.assert_restored()?;
    assert_source_writable(&rig, &rt, -10)?;
    Ok(())
}

#[test]
fn a_killed_source_agent_restarted_then_rollback_restores_the_source_byte_for_byte() -> Result<()> {
    let mut rig = MigrationRig::start(5, prepare)?;
    let rt = tokio::runtime::Runtime::new()?;
    let files = SourceFiles::read(&rig.pg)?;
    let mut cutover = cutover_stuck_after_the_fence(&rig, &rt, "15")?;
    files.assert_fenced()?;

    // Killed while fenced, started again: its new control connection is refused on the
    // ordinary route and comes in from pgferry's own address.
    rig.kill_and_restart_source()?;
    // The target notices the old tunnel is dead at its idle timeout, then dials again.
    rig.source
        .child
        .wait_for_output("tunnel up", Duration::from_secs(120))?;
    // The cutover gives up at its replay timeout and rolls back; if the unfence could not reach
    // the new source agent then, `rollback` finishes it.
    let status = cutover.wait(Duration::from_secs(120))?;
    assert!(!status.success(), "{}", cutover.output());
    if rig.phase().as_deref() != Some("rolled_back") {
        let (ok, out) = rig.cmd("rollback", &[]);
        assert!(ok, "{out}");
    }
    assert_eq!(rig.phase().as_deref(), Some("rolled_back"));
    rig.source
        .wait_for("control connection from 127.80.71.70")
        .context("the restarted source agent reconnected from pgferry's address")?;
    files.assert_restored()?;
    assert_source_writable(&rig, &rt, -20)?;
    Ok(())
}
