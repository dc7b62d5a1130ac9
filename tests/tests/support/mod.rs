//! Shared set-up for the end-to-end tests: certificates made with the real `pgferry-certs`,
//! agents started as real processes, audit-log helpers.
#![allow(dead_code)]

pub mod attack;
pub mod migration;
pub mod probe;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_tests::{bin_path, free_udp_port, ChildGuard, NetnsPair};

#[allow(unused_imports)] // not every test binary names the migration
pub use pgferry_tests::certs::{Certs, MIGRATION};

/// One agent process.
pub struct Agent {
    pub child: ChildGuard,
    pub audit: PathBuf,
    pub name: String,
}

impl Agent {
    /// Starts `pgferry-<role> run` with `args` (certificate flags are added from `cert_name`),
    /// its audit log in `dir/<name>.audit.jsonl`.
    pub fn start(
        role: &str,
        name: &str,
        dir: &Path,
        certs: &Certs,
        cert_name: &str,
        args: &[String],
    ) -> Result<Agent> {
        Self::start_with(role, name, dir, certs, cert_name, args, None)
    }

    /// [`start`](Self::start), inside network namespace `netns` if given.
    pub fn start_with(
        role: &str,
        name: &str,
        dir: &Path,
        certs: &Certs,
        cert_name: &str,
        args: &[String],
        netns: Option<&str>,
    ) -> Result<Agent> {
        let audit = dir.join(format!("{name}.audit.jsonl"));
        let bin = bin_path(&format!("pgferry-{role}"));
        let mut cmd = match netns {
            Some(ns) => NetnsPair::command(ns, bin),
            None => Command::new(bin),
        };
        cmd.arg("run")
            .args(certs.tls_args(cert_name))
            .arg("--audit-log")
            .arg(&audit)
            .args(args)
            // `PGFERRY_TEST_AGENT_LOG` sets the agents' log filter for a measurement (e.g.
            // `info,pgferry_common::runtime::pump=debug` for the compression level's moves).
            .env(
                "PGFERRY_LOG",
                std::env::var("PGFERRY_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            );
        let child = ChildGuard::spawn(name, cmd)?;
        Ok(Agent {
            child,
            audit,
            name: name.to_string(),
        })
    }

    pub fn wait_for(&self, needle: &str) -> Result<String> {
        self.child
            .wait_for_output(needle, Duration::from_secs(30))
            .with_context(|| format!("{} never logged {needle:?}", self.name))
    }

    /// SIGTERM, then asserts a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let status = self.child.terminate(Duration::from_secs(40))?;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM:\n{}",
            self.name,
            self.child.output()
        );
        Ok(())
    }
}

/// A source listening on loopback and a target dialing it, both up.
pub struct Pair {
    pub source: Agent,
    pub target: Agent,
    pub udp_port: u16,
}

impl Pair {
    /// Starts the pair; `source_args`/`target_args` add to the defaults (`--listen`/`--connect`).
    pub fn start(
        dir: &Path,
        certs: &Certs,
        source_args: &[String],
        target_args: &[String],
    ) -> Result<Pair> {
        let udp_port = free_udp_port();
        let mut sargs = vec!["--listen".to_string(), format!("127.0.0.1:{udp_port}")];
        sargs.extend_from_slice(source_args);
        let source = Agent::start("source", "source", dir, certs, "source", &sargs)?;
        source.wait_for("listening on")?;
        let mut targs = vec!["--connect".to_string(), format!("127.0.0.1:{udp_port}")];
        targs.extend_from_slice(target_args);
        let target = Agent::start("target", "target", dir, certs, "target", &targs)?;
        target.wait_for("tunnel up")?;
        source.wait_for("tunnel up")?;
        Ok(Pair {
            source,
            target,
            udp_port,
        })
    }

    /// SIGTERM both (target first, as an operator would after the migration).
    pub fn stop(&mut self) -> Result<()> {
        self.target.stop()?;
        self.source.stop()
    }
}

/// Runs `pgferry-<role> audit ARGS`; returns (success, stdout).
pub fn audit_cli(role: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = run_audit(role, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `pgferry-<role> audit ARGS…` to completion.
fn run_audit(role: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin_path(&format!("pgferry-{role}")))
        .arg("audit")
        .args(args)
        .output()
        .expect("running audit")
}

/// `pgferry-<role> audit ARGS…`: success and its standard output alone (for JSON and CSV).
pub fn audit_stdout(role: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = run_audit(role, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `audit verify LOG --peer PEER_LOG` with `pgferry-<role>`: success and its output.
pub fn audit_verify_peer(role: &str, log: &Path, peer: &Path) -> (bool, String) {
    use std::ffi::OsStr;
    audit_cli(
        role,
        &[
            OsStr::new("verify"),
            log.as_os_str(),
            OsStr::new("--peer"),
            peer.as_os_str(),
        ],
    )
}

/// Parsed records of an audit log.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: the agent may be in the middle of writing the last one.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Records of one event.
pub fn audit_events(path: &Path, event: &str) -> Vec<serde_json::Value> {
    audit_records(path)
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

/// The details object of a record (the audit module nests event fields under `details`).
pub fn details(r: &serde_json::Value) -> &serde_json::Value {
    if r.get("details").is_some() {
        &r["details"]
    } else {
        r
    }
}

/// A connection as postgres through a cluster's unix socket in `dir` (namespaces do not
/// separate unix sockets, so a test reaches clusters in any namespace this way).
pub async fn unix_client(dir: &Path, port: u16) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Bytes under a directory (files only).
pub fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
