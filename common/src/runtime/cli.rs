//! Command-line pieces both agent binaries use: the shared `run` flags and their resolution into
//! an [`AgentConfig`] (each role crate resolves its own section beside it), the `audit` subcommands, logging set-up and signal handling. Each binary
//! has its own clap tree (`agent-source/src/main.rs`, `agent-target/src/cli.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use serde::de::DeserializeOwned;

use super::config::{AgentConfig, ConfigFile, Overrides, RoleSection};
use crate::audit::{self, VerifyOptions};
use crate::identity::Role;

/// The `run` flags both agents take: the tunnel, its certificates, its audit log. Each
/// overrides the same setting in the config file. Each binary flattens them into its own
/// `run` flags, beside its role's.
#[derive(Debug, Args, Default, Clone)]
pub struct TunnelArgs {
    /// TOML configuration file (see README "Configuration reference"). Relative paths in it are
    /// resolved against the file's directory.
    #[arg(short, long, env = "PGFERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen for the peer on this UDP address, e.g. 0.0.0.0:7443.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// Dial the peer at this address, e.g. db-new.example:7443.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    /// Name expected in the listening peer's certificate (default: the host of --connect).
    #[arg(long)]
    pub server_name: Option<String>,
    /// CA certificate (PEM) made by `pgferry-certs init`.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This agent's certificate (PEM) made by `pgferry-certs issue`.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Revocation list written by `pgferry-certs revoke`; re-read at every handshake.
    #[arg(long, value_name = "FILE")]
    pub revocation_list: Option<PathBuf>,
    /// Regions (ISO 3166 alpha-2) peers may be in, comma-separated. Default: the 30 EEA countries.
    #[arg(long, value_delimiter = ',', value_name = "CC,CC,…")]
    pub allowed_regions: Option<Vec<String>>,
    /// Audit log file (JSON lines, appended; verify with `audit verify`).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// zstd level for chunks sent by this agent (1–19; default 3).
    #[arg(long, allow_negative_numbers = true)]
    pub compression_level: Option<i32>,
    /// QUIC keep-alive interval in seconds (default 1; also how soon a restarted peer is noticed).
    #[arg(long)]
    pub keep_alive_secs: Option<u64>,
    /// Close the tunnel after this many seconds without traffic from the peer (default 30).
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// On SIGTERM, wait this long for forwarded connections to finish (default 30).
    #[arg(long)]
    pub drain_timeout_secs: Option<u64>,
    /// When the tunnel is lost, hold each forwarded connection this long for the agents to
    /// reconnect and resume it where it stopped (default 300; 0: reset at once).
    #[arg(long)]
    pub resume_grace_secs: Option<u64>,
    /// Abandon a QUIC/TLS handshake that has not authenticated the peer after this many seconds
    /// (default 5; bounds what a peer without a certificate can hold).
    #[arg(long)]
    pub handshake_timeout_secs: Option<u64>,
    /// QUIC congestion control for what this agent sends: cubic (default), bbr or newreno.
    /// bbr is far faster on a lossy path but overfills the bottleneck and crowds out other
    /// traffic (README, Benchmark): use it on a dedicated link.
    #[arg(long, value_name = "bbr|cubic|newreno")]
    pub congestion_control: Option<String>,
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a log's hash chain and signed checkpoints; exit 0, or 1 naming the first bad line.
    Verify {
        /// The audit log to check.
        log: PathBuf,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Render a log for an auditor: who, when, what, where, how. The log is verified first
    /// (and the peer's, with --peer); exit 1 when a log is broken, not signed to its end, or
    /// disagrees with its peer: the first lines of the text say why.
    Report {
        /// The audit log to render.
        log: PathBuf,
        #[command(flatten)]
        check: CheckArgs,
        /// text (for people), json (schema_version 1: verdict, log bindings, transfer
        /// record; docs/audit-report.md), or csv (one row per stream).
        #[arg(long, value_name = "text|json|csv", default_value = "text")]
        format: String,
    },
}

/// What `audit verify` and `audit report` check beyond the log itself.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The other agent's log: both logs must describe the same tunnel sessions and streams
    /// (outside the windows where one agent was down), with the same digests.
    #[arg(long, value_name = "OTHER_LOG")]
    pub peer: Option<PathBuf>,
    /// Also check that the certificates embedded in the logs were issued by this CA.
    #[arg(long, value_name = "CA_PEM")]
    pub ca: Option<PathBuf>,
    /// Accept records after the last checkpoint (a log the agent is still writing; the report
    /// flags them).
    #[arg(long)]
    pub allow_open: bool,
}

/// `--log`, global to every subcommand of both binaries (flattened into their clap trees).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax), e.g. info, debug, pgferry_common=debug.
    #[arg(
        long = "log",
        id = "log_filter",
        global = true,
        env = "PGFERRY_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_filter: String,
}

/// Runs an agent (`pgferry_source::run`, `pgferry_target::run`) on a multi-threaded runtime
/// until it returns.
pub fn block_on_agent(agent: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(agent)
}

/// Logging to stderr with a tracing filter (`--log`, `PGFERRY_LOG`).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Reads `--config` (every section; `S` and `T` are the role sections as in [`ConfigFile`]),
/// or an empty file when none is given.
pub fn load_config<S, T>(tunnel: &TunnelArgs) -> Result<ConfigFile<S, T>>
where
    S: DeserializeOwned + RoleSection,
    T: DeserializeOwned + RoleSection,
{
    match &tunnel.config {
        Some(p) => ConfigFile::load(p),
        None => Ok(ConfigFile::default()),
    }
}

/// Where the settings came from, for error context: the config file, or "flags".
pub fn config_origin(tunnel: &TunnelArgs) -> String {
    tunnel
        .config
        .as_ref()
        .map_or_else(|| "flags".to_string(), |p| p.display().to_string())
}

/// The role's flags for the `postgres` service: `--upstream` on the source, `--local` (and
/// `--allow-non-loopback-local`) on the target.
#[derive(Debug, Default, Clone)]
pub struct ServiceFlags {
    /// The `postgres` service's endpoint on this side.
    pub postgres_endpoint: Option<String>,
    /// Target: `--allow-non-loopback-local`.
    pub allow_non_loopback_local: bool,
}

/// Resolves the shared `run` flags and the file's shared sections into an [`AgentConfig`].
pub fn resolve_tunnel(
    role: Role,
    tunnel: TunnelArgs,
    file: ConfigFile,
    service: ServiceFlags,
) -> Result<AgentConfig> {
    let what = config_origin(&tunnel);
    let flags = Overrides {
        ca: tunnel.ca,
        cert: tunnel.cert,
        key: tunnel.key,
        revocation_list: tunnel.revocation_list,
        listen: tunnel.listen,
        connect: tunnel.connect,
        server_name: tunnel.server_name,
        keep_alive_secs: tunnel.keep_alive_secs,
        idle_timeout_secs: tunnel.idle_timeout_secs,
        drain_timeout_secs: tunnel.drain_timeout_secs,
        resume_grace_secs: tunnel.resume_grace_secs,
        handshake_timeout_secs: tunnel.handshake_timeout_secs,
        congestion_control: tunnel.congestion_control,
        allow_non_loopback_local: service.allow_non_loopback_local,
        allowed_regions: tunnel.allowed_regions,
        audit_log: tunnel.audit_log,
        compression_level: tunnel.compression_level,
        postgres_endpoint: service.postgres_endpoint,
    };
    AgentConfig::resolve(role, file, flags).with_context(|| format!("configuration ({what})"))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}

/// `audit verify|report`: the exit code says whether the log (and its peer) verified.
pub fn audit_command(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            log,
            check:
                CheckArgs {
                    peer,
                    ca,
                    allow_open,
                },
        } => {
            let ca_der = match &ca {
                Some(p) => Some(read_pem_cert(p)?),
                None => None,
            };
            let opts = VerifyOptions { allow_open, ca_der };
            let ours = match audit::verify_file(&log, &opts) {
                Ok(v) => v,
                Err(e) => {
                    println!("{}: FAILED: {e}", log.display());
                    return Ok(ExitCode::FAILURE);
                }
            };
            println!(
                "{}: OK: {} records, {} checkpoints, {} streams",
                log.display(),
                ours.records,
                ours.checkpoints,
                ours.sessions.len()
            );
            if let Some(peer_path) = peer {
                let theirs = match audit::verify_file(&peer_path, &opts) {
                    Ok(v) => v,
                    Err(e) => {
                        println!("{}: FAILED: {e}", peer_path.display());
                        return Ok(ExitCode::FAILURE);
                    }
                };
                println!(
                    "{}: OK: {} records, {} checkpoints, {} streams",
                    peer_path.display(),
                    theirs.records,
                    theirs.checkpoints,
                    theirs.sessions.len()
                );
                let (a, b) = (log.display().to_string(), peer_path.display().to_string());
                match audit::compare_peer_named(&ours, &a, &theirs, &b) {
                    Ok(c) => println!("peer comparison: OK: {c}"),
                    Err(m) => {
                        println!("peer comparison: FAILED: {m}");
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report {
            log,
            check:
                CheckArgs {
                    peer,
                    ca,
                    allow_open,
                },
            format,
        } => {
            let format = match format.as_str() {
                "text" => audit::ReportFormat::Text,
                "json" => audit::ReportFormat::Json,
                "csv" => audit::ReportFormat::Csv,
                other => anyhow::bail!("--format {other:?}: use text, json or csv"),
            };
            let opts = audit::ReportOptions {
                peer,
                ca_der: ca.as_deref().map(read_pem_cert).transpose()?,
                allow_open,
                format,
            };
            match audit::render_report(&log, &opts) {
                Ok(report) => {
                    print!("{}", report.text);
                    Ok(if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(e) => {
                    println!("{}: FAILED: {e}", log.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn read_pem_cert(path: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    Ok(der.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(subcommand)]
        audit: AuditCommand,
    }

    #[test]
    fn shared_flags_are_consistent() {
        Probe::command().debug_assert();
        let p = Probe::try_parse_from(["x", "verify", "x.jsonl", "--allow-open"]).unwrap();
        assert!(matches!(
            p.audit,
            AuditCommand::Verify {
                check: CheckArgs {
                    allow_open: true,
                    ..
                },
                ..
            }
        ));
        let p = Probe::try_parse_from([
            "x", "report", "t.jsonl", "--peer", "s.jsonl", "--format", "csv",
        ])
        .unwrap();
        assert!(matches!(
            p.audit,
            AuditCommand::Report { check: CheckArgs { peer: Some(_), .. }, format, .. } if format == "csv"
        ));
    }
}
