//! The applications follow the cutover. With a PgBouncer in front of the old cluster
//! (`[target.pgbouncer]`), 8 clients committing numbered transactions through it see one pause
//! and no error; every commit they were told of is on the new cluster. Without a pooler, the
//! same clients (multi-host connection strings, `target_session_attrs=read-write`, reconnect on
//! error, as drivers do) meet errors at the fence but lose no acknowledged commit. Both runs
//! print the longest gap between two commits beside the write downtime.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgferry_tests::{chown_postgres, free_tcp_port, wait_until, ChildGuard, TestDir};
use support::audit_events;
use support::migration::{number_after, MigrationRig};

const CLIENTS: i32 = 8;
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// How to connect a client: PgBouncer's port, or the source and the new cluster as one
/// multi-host connection string.
#[derive(Clone)]
enum Route {
    PgBouncer { port: u16 },
    MultiHost { ports: [u16; 2], password: String },
}

impl Route {
    async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.user("postgres").connect_timeout(Duration::from_secs(5));
        match self {
            Route::PgBouncer { port } => {
                cfg.host("127.0.0.1").port(*port).dbname("appdb");
            }
            Route::MultiHost { ports, password } => {
                cfg.host("127.0.0.1")
                    .port(ports[0])
                    .host("127.0.0.1")
                    .port(ports[1])
                    .dbname("postgres")
                    .password(password.as_str())
                    .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
            }
        }
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(c)
    }
}

/// `CLIENTS` applications, each committing `(client, n)` into `ferry.ledger` in a loop
/// (simple protocol: PgBouncer's transaction pooling has no named prepared statements). Each
/// records the commits it was told succeeded, with when; an error is counted, and the client
/// reconnects and goes on.
struct Clients {
    commits: Arc<Mutex<Vec<(i32, i32, Instant)>>>,
    errors: Arc<AtomicU64>,
    first_errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(rt: &tokio::runtime::Runtime, route: &Route) -> Result<Clients> {
        let me = Clients {
            commits: Arc::default(),
            errors: Arc::default(),
            first_errors: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let first = rt.block_on(route.connect())?;
            let (commits, errors, first_errors, stop, route) = (
                me.commits.clone(),
                me.errors.clone(),
                me.first_errors.clone(),
                me.stop.clone(),
                route.clone(),
            );
            tasks.push(rt.spawn(async move {
                let (mut c, mut n) = (Some(first), 0);
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let Some(conn) = &c else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        c = route.connect().await.ok();
                        continue;
                    };
                    // About 200 commits a second per client: an application, not a load test.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    n += 1;
                    let sql =
                        format!("INSERT INTO ferry.ledger (client, n) VALUES ({client}, {n})");
                    match conn.simple_query(&sql).await {
                        Ok(_) => commits.lock().unwrap().push((client, n, Instant::now())),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            let mut f = first_errors.lock().unwrap();
                            if f.len() < 5 {
                                let why = e.as_db_error().map(|d| d.message().to_string());
                                f.push(format!(
                                    "client {client}: {}",
                                    why.unwrap_or(e.to_string())
                                ));
                            }
                            drop(f);
                            c = None;
                        }
                    }
                }
            }));
        }
        Ok(Clients { tasks, ..me })
    }

    fn count(&self) -> usize {
        self.commits.lock().unwrap().len()
    }

    /// Waits until `more` commits were added to `from`.
    fn wait_for(&self, from: usize, more: usize) -> Result<()> {
        wait_until(
            &format!("{more} more commits through the clients"),
            Duration::from_secs(60),
            || (self.count() >= from + more).then_some(()),
        )
    }

    /// Stops them: the commits they were told of, the number of errors, the first few
    /// errors, and the longest gap between two commits (any client).
    fn stop(
        self,
        rt: &tokio::runtime::Runtime,
    ) -> (BTreeSet<(i32, i32)>, u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = rt.block_on(t);
        }
        let mut commits = self.commits.lock().unwrap().clone();
        commits.sort_by_key(|c| c.2);
        let gap = commits
            .windows(2)
            .map(|w| w[1].2 - w[0].2)
            .max()
            .unwrap_or_default();
        let acked = commits.iter().map(|c| (c.0, c.1)).collect();
        let first = self.first_errors.lock().unwrap().clone();
        (acked, self.errors.load(Ordering::SeqCst), first, gap)
    }
}

/// A PgBouncer (the distribution's) run as postgres on 127.0.0.1:`port`, transaction
/// pooling, trusting loopback clients, its `[databases]` in `databases.ini` beside it.
fn pgbouncer_config(dir: &Path, port: u16) -> Result<()> {
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n%include {d}/databases.ini\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {d}/userlist.txt\nadmin_users = pgbouncer\n\
             pool_mode = transaction\nmax_client_conn = 100\ndefault_pool_size = 20\n\
             ignore_startup_parameters = extra_float_digits\n",
            d = dir.display()
        ),
    )?;
    std::fs::write(
        dir.join("userlist.txt"),
        "\"postgres\" \"\"\n\"pgbouncer\" \"\"\n",
    )?;
    for f in ["pgbouncer.ini", "userlist.txt"] {
        chown_postgres(&dir.join(f))?;
    }
    Ok(())
}

fn databases_ini(dir: &Path, text: &str) -> Result<PathBuf> {
    let p = dir.join("databases.ini");
    std::fs::write(&p, text)?;
    chown_postgres(&p)?;
    Ok(p)
}

/// Every commit a client was told of is on the new cluster.
fn assert_all_on_new_cluster(
    rt: &tokio::runtime::Runtime,
    rig: &MigrationRig,
    acked: &BTreeSet<(i32, i32)>,
) -> Result<()> {
    let on_new: BTreeSet<(i32, i32)> = rt.block_on(async {
        let c = rig.connect_new().await?;
        let rows = c.query("SELECT client, n FROM ferry.ledger", &[]).await?;
        anyhow::Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })?;
    let lost: Vec<_> = acked.difference(&on_new).collect();
    anyhow::ensure!(
        lost.is_empty(),
        "acknowledged but not on the new cluster: {lost:?}"
    );
    Ok(())
}

fn require_pgbouncer() {
    assert!(
        Path::new(PGBOUNCER).exists(),
        "{PGBOUNCER} is missing: apt-get install pgbouncer (.ci/run does)"
    );
}

/// A migration rig whose target agent switches a PgBouncer (`[target.pgbouncer]`) that is
/// configured, not yet started, in front of the source (`appdb`), with `ferry.ledger` for the
/// clients and a second slot on the source.
struct Bounced {
    rig: MigrationRig,
    pgb: TestDir,
    port: u16,
    ini: PathBuf,
}

impl Bounced {
    fn start() -> Result<Bounced> {
        require_pgbouncer();
        let pgb = TestDir::new()?;
        let port = free_tcp_port();
        pgbouncer_config(pgb.path(), port)?;
        // Parsable now (the agent checks it at start); pointed at the source once its port
        // is known.
        let ini = databases_ini(pgb.path(), "[databases]\nappdb = host=127.0.0.1 port=1\n")?;
        let rig = MigrationRig::builder(20)
            .target_config(&format!(
                "[target.pgbouncer]\nadmin = \"host=127.0.0.1 port={port} user=pgbouncer\"\n\
                 databases_file = \"{}\"\npause_timeout_secs = 10\n",
                ini.display()
            ))
            .start()?;
        let pg = &rig.pg;
        pg.psql("CREATE TABLE ferry.ledger (client int, n int, PRIMARY KEY (client, n))")?;
        // Something else that uses the old cluster: the report must name it.
        pg.psql("SELECT pg_create_physical_replication_slot('reporting_standby')")?;
        let entry = format!(
            "; the application's databases, included by pgbouncer.ini\n[databases]\nappdb = host=127.0.0.1 port={} dbname=postgres user=postgres password='{}' pool_size=20\n",
            pg.port, pg.password
        );
        databases_ini(pgb.path(), &entry)?;
        Ok(Bounced {
            rig,
            pgb,
            port,
            ini,
        })
    }

    /// Starts PgBouncer; returns once it takes clients.
    fn start_pgbouncer(&self, rt: &tokio::runtime::Runtime) -> Result<ChildGuard> {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", PGBOUNCER])
            .arg(self.pgb.join("pgbouncer.ini"));
        let child = ChildGuard::spawn("pgbouncer", cmd)?;
        wait_until(
            "PgBouncer to accept clients",
            Duration::from_secs(20),
            || rt.block_on(self.route().connect()).ok(),
        )?;
        Ok(child)
    }

    fn route(&self) -> Route {
        Route::PgBouncer { port: self.port }
    }
}

#[test]
fn pgbouncer_clients_see_a_pause_not_errors() -> Result<()> {
    let b = Bounced::start()?;
    let (rig, pg, pgb_port, ini) = (&b.rig, &b.rig.pg, b.port, &b.ini);
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");

    // 1. PgBouncer's console unreachable: refused before the fence, with the reason.
    let (ok, out) = rig.cmd("cutover", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("PgBouncer") && out.contains("nothing was fenced"),
        "{out}"
    );
    assert!(
        out.contains(&format!("127.0.0.1:{pgb_port}")) || out.contains("admin console"),
        "{out}"
    );
    assert_eq!(
        pg.psql("SELECT current_setting('default_transaction_read_only')")?,
        "off"
    );
    assert_eq!(rig.phase().as_deref(), Some("catching_up"));

    // 2. PgBouncer up; the dry run says what would happen and what stays behind.
    let rt = tokio::runtime::Runtime::new()?;
    let _bouncer = b.start_pgbouncer(&rt)?;
    let route = b.route();
    let (ok, out) = rig.cmd("cutover", &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("would pause appdb"), "{out}");
    assert!(out.contains("replication slot reporting_standby"), "{out}");

    // 3. The cutover with 8 clients committing through PgBouncer.
    let clients = Clients::start(&rt, &route)?;
    clients.wait_for(0, 200)?;
    let (ok, out) = rig.cmd("cutover", &[]);
    assert!(ok, "{out}");
    let after = clients.count();
    clients.wait_for(after, 200)?;
    let (acked, errors, first_errors, gap) = clients.stop(&rt);
    let downtime = number_after(&out, "write downtime").context("downtime in the report")?;
    let held = number_after(&out, "held its clients' queries for").context("held_ms")?;
    eprintln!(
        "PGBOUNCER: {} commits acknowledged, {errors} client error(s), longest gap between commits {} ms, write downtime {downtime} ms, PgBouncer held queries {held} ms",
        acked.len(),
        gap.as_millis()
    );
    assert_eq!(errors, 0, "clients saw errors: {first_errors:?}");
    // The clients' pause is the pooler's hold, which spans the write downtime.
    let gap_ms = gap.as_millis() as u64;
    assert!(
        gap_ms + 200 >= downtime && gap_ms <= held + 2_000 && held <= downtime + 5_000,
        "gap {gap_ms} ms, downtime {downtime} ms, held {held} ms"
    );
    assert!(out.contains("replication slot reporting_standby"), "{out}");

    // Every acknowledged commit is on the new cluster, and the clients wrote there after.
    assert_all_on_new_cluster(&rt, rig, &acked)?;
    // (The 200 commits after the cutover returned went to the new cluster: the old one is
    // fenced read-only.)

    // The databases file points at the new primary, every other parameter kept; the
    // original beside it; no password in the agent's audit log.
    let ini_now = std::fs::read_to_string(ini)?;
    assert!(
        ini_now.contains(&format!(
            "port={} dbname=postgres user=postgres password='{}' pool_size=20",
            rig.target_port, pg.password
        )),
        "{ini_now}"
    );
    assert!(ini.with_file_name("databases.ini.pgferry-orig").exists());
    let audit = std::fs::read_to_string(&rig.target.audit)?;
    assert!(!audit.contains(&pg.password), "a password in the audit log");
    assert_eq!(audit_events(&rig.target.audit, "pooler_switched").len(), 1);
    Ok(())
}

#[test]
fn direct_clients_lose_no_commit_without_a_pooler() -> Result<()> {
    let rig = MigrationRig::builder(20).start()?;
    let pg = &rig.pg;
    pg.psql("CREATE TABLE ferry.ledger (client int, n int, PRIMARY KEY (client, n))")?;
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    let rt = tokio::runtime::Runtime::new()?;
    // A setting changed on the new cluster that only a restart applies: the dry run says so.
    rt.block_on(async {
        let c = rig.connect_new().await?;
        c.batch_execute("ALTER SYSTEM SET max_connections = 123")
            .await?;
        c.batch_execute("SELECT pg_reload_conf()").await?;
        anyhow::Ok(())
    })?;
    let out = wait_until(
        "pending_restart after the reload",
        Duration::from_secs(10),
        || {
            let (ok, out) = rig.cmd("cutover", &["--dry-run"]);
            (ok && out.contains("needs a restart for: max_connections")).then_some(out)
        },
    )?;
    assert!(out.contains("nothing else uses the old cluster"), "{out}");
    let route = Route::MultiHost {
        ports: [pg.port, rig.target_port],
        password: pg.password.clone(),
    };
    let clients = Clients::start(&rt, &route)?;
    clients.wait_for(0, 200)?;
    let (ok, out) = rig.cmd("cutover", &[]);
    assert!(ok, "{out}");
    let after = clients.count();
    clients.wait_for(after, 200)?;
    let (acked, errors, first_errors, gap) = clients.stop(&rt);
    let downtime = number_after(&out, "write downtime").context("downtime in the report")?;
    eprintln!(
        "NO POOLER: {} commits acknowledged, {errors} client error(s), longest gap between commits {} ms, write downtime {downtime} ms; first errors: {first_errors:?}",
        acked.len(),
        gap.as_millis()
    );
    assert!(out.contains("nothing else uses the old cluster"), "{out}");
    assert_all_on_new_cluster(&rt, &rig, &acked)?;
    Ok(())
}

#[test]
fn pgbouncer_resumes_on_the_old_cluster_when_the_cutover_rolls_back() -> Result<()> {
    let b = Bounced::start()?;
    let (rig, pg) = (&b.rig, &b.rig.pg);
    let (ok, out) = rig.cmd("clone", &[]);
    assert!(ok, "{out}");
    let rt = tokio::runtime::Runtime::new()?;
    let _bouncer = b.start_pgbouncer(&rt)?;
    let clients = Clients::start(&rt, &b.route())?;
    clients.wait_for(0, 200)?;
    // The standby stops replaying: it never reaches the fence LSN, so the cutover fails after
    // the fence and rolls back.
    rt.block_on(async {
        rig.connect_new()
            .await?
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await?;
        anyhow::Ok(())
    })?;
    let (ok, out) = rig.cmd(
        "cutover",
        &[
            "--replay-timeout-secs",
            "2",
            "--verify-at-fence",
            "--max-lag",
            "100000000000",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(out.contains("PgBouncer resumed"), "{out}");
    let after = clients.count();
    clients.wait_for(after, 200)?;
    let (acked, errors, first_errors, gap) = clients.stop(&rt);
    eprintln!(
        "ROLLBACK WITH PGBOUNCER: {} commits acknowledged, {errors} client error(s), longest gap {} ms",
        acked.len(),
        gap.as_millis()
    );
    assert_eq!(errors, 0, "clients saw errors: {first_errors:?}");
    // They went on against the source, which is writable again and has every commit.
    assert_eq!(
        pg.psql("SELECT current_setting('default_transaction_read_only')")?,
        "off"
    );
    let on_source: usize = pg.psql("SELECT count(*) FROM ferry.ledger")?.parse()?;
    assert_eq!(on_source, acked.len());
    // The databases file is untouched.
    assert!(std::fs::read_to_string(&b.ini)?.contains(&format!("port={} ", pg.port)));
    Ok(())
}
