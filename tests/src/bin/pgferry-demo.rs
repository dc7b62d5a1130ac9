//! `pgferry-demo`: a whole migration on one machine, on an embedded default.
//!
//! Makes a CA and two certificates, starts a source PostgreSQL cluster with sample data on
//! loopback, starts pgferry-source and pgferry-target, runs a query through the tunnel, then
//! `pgferry-target migrate --auto-cutover` while a writer keeps committing on the source:
//! preflight, slot, base backup through the tunnel, standby, catch-up, fence, verify, promote.
//! It checks that every committed write arrived, prints the report and the audit verdict.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgferry_tests::certs::Certs;
use pgferry_tests::{
    bin_path, command_output, free_tcp_port, free_udp_port, load_sample_data, pg_bin, ChildGuard,
    PgCluster, TestDir,
};

const HELP: &str = "\
pgferry-demo: a whole pgferry migration on this machine.

Makes certificates, starts a PostgreSQL 15 source cluster with sample data (as the postgres
user, loopback only), starts pgferry-source and pgferry-target, and migrates the cluster to a
new data directory through the tunnel while a writer keeps committing: clone, catch-up,
verified cutover, promotion. Prints each phase, the write downtime and the audit verdict.

Usage: pgferry-demo [--keep] [--megabytes N]
  --keep          keep the working directory (certificates, logs, clusters) and print its path
  --megabytes N   size of the sample data (default 50)

Needs root (to run PostgreSQL as the postgres user) and PostgreSQL 15 (`.ci/run --setup-only`).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let keep = args.iter().any(|a| a == "--keep");
    let mb = match args.iter().position(|a| a == "--megabytes") {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse::<u32>().ok()) {
            Some(v) if v > 0 => v,
            _ => {
                eprintln!("pgferry-demo: --megabytes needs a positive number");
                return ExitCode::from(2);
            }
        },
        None => 50,
    };
    if keep {
        std::env::set_var("PGFERRY_KEEP_TEST_DIRS", "1");
    }
    match demo(mb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgferry-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, what: &str) {
    println!("\n[{n}/6] {what}");
}

fn secret_file(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{secret}")?;
    Ok(())
}

/// Stops the new cluster when the demo ends.
struct NewCluster(std::path::PathBuf);
impl Drop for NewCluster {
    fn drop(&mut self) {
        if self.0.join("postmaster.pid").exists() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.0)
                .args(["-m", "fast", "-w", "stop"])
                .output();
        }
    }
}

/// The demo's six steps; see the module doc.
fn demo(mb: u32) -> Result<()> {
    ensure!(
        pg_bin("pg_ctl").exists(),
        "PostgreSQL 15 is not installed ({} missing): run `.ci/run --setup-only` first",
        pg_bin("pg_ctl").display()
    );
    let dir = TestDir::new()?;
    println!("pgferry demo in {}", dir.path().display());

    step(1, "certificates (pgferry-certs)");
    let certs = Certs::make_for(&dir.join("certs"), "demo")?;
    for (role, region) in [("source", "DE"), ("target", "FR")] {
        println!("  {role}: region {region}, {}", certs.pem(role).display());
    }

    step(2, &format!("source cluster with ~{mb} MB of sample data"));
    let mut pg = source_cluster(&dir, mb)?;

    step(3, "agents: pgferry-source listens, pgferry-target dials");
    let mut agents = Agents::start(&dir, &certs, &pg)?;

    step(4, "a query through the tunnel");
    query_through_tunnel(agents.local, &pg.password)?;

    step(
        5,
        "pgferry-target migrate --auto-cutover, while a writer commits on the source",
    );
    migrate_while_writing(&pg, &agents)?;

    step(6, "stop the agents (SIGTERM) and verify both audit logs");
    let t_log = agents.stop_and_verify_audit(&dir, &certs)?;
    pg.stop()?;
    if std::env::var_os("PGFERRY_KEEP_TEST_DIRS").is_some() {
        println!(
            "kept: certificates, audit logs and clusters in {}",
            dir.path().display()
        );
        println!(
            "read the audit report: {} audit report {}",
            bin_path("pgferry-target").display(),
            t_log.display()
        );
    }
    Ok(())
}

/// Step 2: the source cluster on loopback, with `mb` MB of sample data and the table the
/// demo's writer fills.
fn source_cluster(dir: &TestDir, mb: u32) -> Result<PgCluster> {
    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), pg_port)?;
    pg.start()?;
    let t = Instant::now();
    load_sample_data(&pg, mb)?;
    pg.psql("CREATE TABLE ferry.demo_writes (n int PRIMARY KEY, at timestamptz DEFAULT now())")?;
    let size = pg.psql("SELECT pg_size_pretty(pg_database_size('postgres'))")?;
    println!(
        "  PostgreSQL on 127.0.0.1:{pg_port} (loopback only), database size {size}, loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(pg)
}

/// The two agents and where the target side reaches things. (Fields drop in order: the
/// agents, then the new cluster is stopped.)
struct Agents {
    target: ChildGuard,
    source: ChildGuard,
    _new_cluster: NewCluster,
    /// The tunnel's local end on the target side.
    local: u16,
    /// The new cluster's port.
    new_port: u16,
    /// pgferry-target's admin socket.
    socket: PathBuf,
}

impl Agents {
    /// Step 3: pgferry-source (listening on loopback UDP, PostgreSQL as its upstream) and
    /// pgferry-target (dialling it, with the new cluster's settings in `target.toml`), once the
    /// tunnel is up.
    fn start(dir: &TestDir, certs: &Certs, pg: &PgCluster) -> Result<Self> {
        let pg_port = pg.port;
        let (udp, local, new_port) = (free_udp_port(), free_tcp_port(), free_tcp_port());
        let pw = dir.join("pgpass");
        secret_file(&pw, &pg.password)?;
        let new_data = dir.join("new-cluster/data");
        let socket = dir.join("target.sock");
        std::fs::write(
            dir.join("target.toml"),
            format!(
                "[network]\nconnect = \"127.0.0.1:{udp}\"\n\
                 [[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{local}\"\n\
                 [target]\ndata_dir = \"{}\"\nport = {new_port}\nsocket_dir = \"{}\"\nos_user = \"postgres\"\n\
                 replication_password_file = \"{}\"\nadmin_socket = \"{}\"\nlag_sample_secs = 2\n",
                new_data.display(),
                dir.path().display(),
                pw.display(),
                socket.display()
            ),
        )?;
        let new_cluster = NewCluster(new_data.clone());
        let agent = |role: &str, extra: &[String]| -> Result<ChildGuard> {
            let mut cmd = Command::new(bin_path(&format!("pgferry-{role}")));
            cmd.arg("run")
                .args(certs.tls_args(role))
                .arg("--audit-log")
                .arg(dir.join(format!("{role}.audit.jsonl")))
                .args(extra);
            ChildGuard::spawn_quiet(role, cmd)
        };
        let source = agent(
            "source",
            &[
                "--listen".into(),
                format!("127.0.0.1:{udp}"),
                "--upstream".into(),
                format!("127.0.0.1:{pg_port}"),
                "--pg-conninfo".into(),
                format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"),
                "--pg-password-file".into(),
                pw.to_string_lossy().into(),
            ],
        )?;
        source.wait_for_output("listening on", Duration::from_secs(30))?;
        let target = agent(
            "target",
            &[
                "--config".into(),
                dir.join("target.toml").to_string_lossy().into(),
            ],
        )?;
        let up = target.wait_for_output("tunnel up", Duration::from_secs(30))?;
        println!(
            "  {}",
            up.split_once("tunnel up")
                .map_or(up.as_str(), |(_, r)| r)
                .trim_start()
        );
        println!("  local endpoint on the target: 127.0.0.1:{local}; UDP {udp} is the only port between them");
        Ok(Self {
            target,
            source,
            _new_cluster: new_cluster,
            local,
            new_port,
            socket,
        })
    }

    /// Step 6: stops both agents (SIGTERM; each must exit cleanly), sums what crossed the
    /// tunnel, and has `pgferry-target audit verify` check both audit logs against each other.
    /// Returns the target's audit log.
    fn stop_and_verify_audit(&mut self, dir: &TestDir, certs: &Certs) -> Result<PathBuf> {
        for (name, child) in [("target", &mut self.target), ("source", &mut self.source)] {
            let status = child.terminate(Duration::from_secs(40))?;
            ensure!(
                status.success(),
                "{name} agent exited with {status}:\n{}",
                child.output()
            );
        }
        let (t_log, s_log) = (
            dir.join("target.audit.jsonl"),
            dir.join("source.audit.jsonl"),
        );
        print_tunnel_traffic(&t_log)?;
        let verdict = Command::new(bin_path("pgferry-target"))
            .arg("audit")
            .arg("verify")
            .arg(&t_log)
            .arg("--peer")
            .arg(&s_log)
            .arg("--ca")
            .arg(certs.ca())
            .output()?;
        for l in String::from_utf8_lossy(&verdict.stdout).lines() {
            println!("  {l}");
        }
        ensure!(verdict.status.success(), "audit verification failed");
        println!(
            "\naudit verdict: OK (both logs intact, signed, and in agreement on every stream)"
        );
        Ok(t_log)
    }
}

/// Step 4: a query through the tunnel's local end at `local`.
fn query_through_tunnel(local: u16, password: &str) -> Result<()> {
    let out = command_output(
        Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-F", " | ", "-c"])
            .arg("SELECT current_setting('server_version'), (SELECT count(*) FROM ferry.orders) AS orders, (SELECT count(*) FROM ferry.events) AS events")
            .arg(format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"))
            .env("PGPASSWORD", password),
    )?;
    println!("  server version | orders | events: {}", out.trim());
    Ok(())
}

/// Step 5: `pgferry-target migrate --auto-cutover` while a writer commits on the source; then
/// checks that every committed write is on the new cluster, which takes writes, and that the
/// fenced source refuses them.
fn migrate_while_writing(pg: &PgCluster, agents: &Agents) -> Result<()> {
    let new_port = agents.new_port;
    let rt = tokio::runtime::Runtime::new()?;
    let writer = Writer::start(&rt, pg)?;
    let status = Command::new(bin_path("pgferry-target"))
        .args(["migrate", "--auto-cutover", "--admin-socket"])
        .arg(&agents.socket)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()?;
    let committed = writer.stop(&rt)?;
    ensure!(status.success(), "the migration failed (see above)");
    let arrived: i64 = rt.block_on(async {
        let new = pg.connect("127.0.0.1", new_port).await?;
        let n: i64 = new
            .query_one(
                "SELECT count(*) FROM ferry.demo_writes WHERE n = ANY($1)",
                &[&committed],
            )
            .await?
            .get(0);
        new.batch_execute("INSERT INTO ferry.demo_writes (n) VALUES (-1)")
            .await
            .context("writing to the new cluster")?;
        anyhow::Ok(n)
    })?;
    ensure!(
        arrived as usize == committed.len(),
        "only {arrived} of the {} committed writes are on the new cluster",
        committed.len()
    );
    println!(
        "  the writer committed {} transactions on the source before the fence; all {} are on the new cluster (127.0.0.1:{new_port}), which accepts writes",
        committed.len(),
        arrived
    );
    let refused = pg
        .psql("INSERT INTO ferry.demo_writes (n) VALUES (-2)")
        .is_err();
    ensure!(refused, "the source still accepts writes");
    println!("  the source is fenced: it refuses writes");
    Ok(())
}

/// A client committing numbered rows on the source every 2 ms until stopped or fenced.
struct Writer {
    committed: Arc<Mutex<Vec<i32>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Connects to the source and starts writing on `rt`.
    fn start(rt: &tokio::runtime::Runtime, pg: &PgCluster) -> Result<Self> {
        let committed = Arc::new(Mutex::new(Vec::<i32>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (committed, stop) = (committed.clone(), stop.clone());
            let client = rt.block_on(pg.connect("127.0.0.1", pg.port))?;
            rt.spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 1_000_000 {
                    n += 1;
                    match client
                        .execute("INSERT INTO ferry.demo_writes (n) VALUES ($1)", &[&n])
                        .await
                    {
                        Ok(_) => committed.lock().unwrap().push(n),
                        // Fenced: the source takes no more writes (and ended this session).
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        Ok(Self {
            committed,
            stop,
            task,
        })
    }

    /// Stops it; the rows it committed.
    fn stop(self, rt: &tokio::runtime::Runtime) -> Result<Vec<i32>> {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(self.task)?;
        let committed = self.committed.lock().unwrap().clone();
        Ok(committed)
    }
}

/// Prints what crossed the tunnel, from the `stream_closed` events of the target's audit log.
fn print_tunnel_traffic(t_log: &Path) -> Result<()> {
    let (mut raw, mut wire, mut streams) = (0u64, 0u64, 0u64);
    for line in std::fs::read_to_string(t_log)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["event"] == "stream_closed" {
            streams += 1;
            for d in ["sent", "received"] {
                raw += v["details"][d]["raw_bytes"].as_u64().unwrap_or(0);
                wire += v["details"][d]["wire_bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    println!(
        "  crossed the tunnel: {streams} streams, {:.1} MB of PostgreSQL traffic as {:.1} MB on the wire (zstd ratio {:.2}), every chunk BLAKE3-verified",
        raw as f64 / 1e6,
        wire as f64 / 1e6,
        raw as f64 / wire.max(1) as f64
    );
    Ok(())
}
