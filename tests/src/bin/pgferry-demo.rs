//! `pgferry-demo`: the tunnel on an embedded default, end to end, on one machine.
//!
//! Makes a CA and two certificates, starts a source PostgreSQL cluster with sample data on
//! loopback, starts pgferry-source and pgferry-target, then runs a query and
//! `pg_basebackup -X stream` (+ `pg_verifybackup`) through the tunnel, stops the agents with
//! SIGTERM and prints what crossed and the verdict of `audit verify --peer`.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgferry_tests::{
    bin_path, command_output, free_tcp_port, free_udp_port, load_sample_data, pg_bin, ChildGuard,
    PgCluster, TestDir,
};

const HELP: &str = "\
pgferry-demo: run the pgferry tunnel end to end on this machine.

Makes certificates, starts a PostgreSQL 15 cluster with ~50 MB of sample data (as the postgres
user, loopback only), starts pgferry-source and pgferry-target, runs a query and
pg_basebackup -X stream through the tunnel, and prints what crossed and the audit verdict.

Usage: pgferry-demo [--keep] [--megabytes N]
  --keep          keep the working directory (certificates, logs, backup) and print its path
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

fn demo(mb: u32) -> Result<()> {
    ensure!(
        pg_bin("pg_ctl").exists(),
        "PostgreSQL 15 is not installed ({} missing): run `.ci/run --setup-only` first",
        pg_bin("pg_ctl").display()
    );
    let dir = TestDir::new()?;
    println!("pgferry demo in {}", dir.path().display());

    step(1, "certificates (pgferry-certs)");
    let certs = dir.join("certs");
    let c = |args: &[&str]| -> Result<String> {
        command_output(
            Command::new(bin_path("pgferry-certs"))
                .args(args)
                .arg("--dir")
                .arg(&certs),
        )
    };
    c(&["init", "--migration", "demo"])?;
    for (role, region) in [("source", "DE"), ("target", "FR")] {
        c(&[
            "issue",
            "--role",
            role,
            "--region",
            region,
            "--name",
            "localhost",
            "--name",
            "127.0.0.1",
        ])?;
        println!(
            "  {role}: region {region}, {}",
            certs.join(format!("{role}.pem")).display()
        );
    }

    step(2, &format!("source cluster with ~{mb} MB of sample data"));
    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), pg_port)?;
    pg.start()?;
    let t = Instant::now();
    load_sample_data(&pg, mb)?;
    let size = pg.psql("SELECT pg_size_pretty(pg_database_size('postgres'))")?;
    println!(
        "  PostgreSQL on 127.0.0.1:{pg_port} (loopback only), database size {size}, loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    step(3, "agents: pgferry-source listens, pgferry-target dials");
    let udp = free_udp_port();
    let local = free_tcp_port();
    let agent = |role: &str, extra: &[String]| -> Result<ChildGuard> {
        let mut cmd = Command::new(bin_path(&format!("pgferry-{role}")));
        cmd.arg("run")
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join(format!("{role}.pem")))
            .arg("--key")
            .arg(certs.join(format!("{role}.key")))
            .arg("--audit-log")
            .arg(dir.join(format!("{role}.audit.jsonl")))
            .args(extra);
        ChildGuard::spawn_quiet(role, cmd)
    };
    let mut source = agent(
        "source",
        &[
            "--listen".into(),
            format!("127.0.0.1:{udp}"),
            "--upstream".into(),
            format!("127.0.0.1:{pg_port}"),
        ],
    )?;
    source.wait_for_output("listening on", Duration::from_secs(30))?;
    let mut target = agent(
        "target",
        &[
            "--connect".into(),
            format!("127.0.0.1:{udp}"),
            "--local".into(),
            format!("127.0.0.1:{local}"),
        ],
    )?;
    let up = target.wait_for_output("tunnel up", Duration::from_secs(30))?;
    println!(
        "  {}",
        up.split_once("tunnel up")
            .map_or(up.as_str(), |(_, r)| r)
            .trim_start_matches(' ')
    );
    println!("  local endpoint on the target: 127.0.0.1:{local}; UDP {udp} is the only port between them");

    step(4, "a query through the tunnel");
    let out = command_output(
        Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-F", " | ", "-c"])
            .arg("SELECT current_setting('server_version'), (SELECT count(*) FROM ferry.orders) AS orders, (SELECT count(*) FROM ferry.events) AS events")
            .arg(format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"))
            .env("PGPASSWORD", &pg.password),
    )?;
    println!("  server version | orders | events: {}", out.trim());

    step(
        5,
        "pg_basebackup -X stream through the tunnel, then pg_verifybackup",
    );
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
                "-D",
            ])
            .arg(&backup)
            .args(["-X", "stream", "-c", "fast", "--no-sync"])
            .env("PGPASSWORD", &pg.password),
    )
    .context("pg_basebackup through the tunnel")?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = dir_size(&backup);
    println!(
        "  {:.1} MB in {secs:.1} s ({:.0} MB/s)",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
    let v = command_output(Command::new(pg_bin("pg_verifybackup")).arg(&backup))?;
    println!("  {}", v.trim());

    step(6, "stop the agents (SIGTERM) and verify both audit logs");
    for (name, child) in [("target", &mut target), ("source", &mut source)] {
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
    let (mut raw, mut wire, mut streams) = (0u64, 0u64, 0u64);
    for line in std::fs::read_to_string(&t_log)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["event"] == "stream_closed" {
            streams += 1;
            for dir in ["sent", "received"] {
                raw += v["details"][dir]["raw_bytes"].as_u64().unwrap_or(0);
                wire += v["details"][dir]["wire_bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    println!(
        "  crossed the tunnel: {streams} streams, {:.1} MB of PostgreSQL traffic as {:.1} MB on the wire (zstd ratio {:.2}), every chunk BLAKE3-verified",
        raw as f64 / 1e6,
        wire as f64 / 1e6,
        raw as f64 / wire.max(1) as f64
    );
    let verdict = Command::new(bin_path("pgferry-target"))
        .arg("audit")
        .arg("verify")
        .arg(&t_log)
        .arg("--peer")
        .arg(&s_log)
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .output()?;
    for l in String::from_utf8_lossy(&verdict.stdout).lines() {
        println!("  {l}");
    }
    ensure!(verdict.status.success(), "audit verification failed");
    println!("\naudit verdict: OK (both logs intact, signed, and in agreement on every stream)");
    pg.stop()?;
    if std::env::var_os("PGFERRY_KEEP_TEST_DIRS").is_some() {
        println!(
            "kept: certificates, audit logs and backup in {}",
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

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
