//! Command-line surface shared by `pgferry-source` and `pgferry-target`: the `run` flags, the
//! `audit` subcommands, logging set-up and signal handling. The binaries' `main.rs` only pick
//! their role and call [`agent_main`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use super::agent::{run_agent, RunOptions};
use super::config::{AgentConfig, ConfigFile, Overrides};
use crate::audit::{self, VerifyOptions};
use crate::identity::Role;

/// Flags of `run`. Each overrides the same setting in the config file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
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
    /// Abandon a QUIC/TLS handshake that has not authenticated the peer after this many seconds
    /// (default 5; bounds what a peer without a certificate can hold).
    #[arg(long)]
    pub handshake_timeout_secs: Option<u64>,
    /// QUIC congestion control for what this agent sends: cubic (default), bbr or newreno.
    /// bbr is far faster on a lossy path but overfills the bottleneck and crowds out other
    /// traffic (README, Benchmark): use it on a dedicated link.
    #[arg(long, value_name = "bbr|cubic|newreno")]
    pub congestion_control: Option<String>,
    /// Target only: DANGEROUS. Accept a --local / [[service]] local endpoint that is not loopback
    /// (e.g. 0.0.0.0:5433): anyone who reaches it reaches the OLD cluster, and PostgreSQL sees
    /// them as a loopback client. Written to the audit log.
    #[arg(long)]
    pub allow_non_loopback_local: bool,
    /// Source only: address of PostgreSQL for the `postgres` service (host:port or unix:/path;
    /// default 127.0.0.1:5432).
    #[arg(long, value_name = "ENDPOINT")]
    pub upstream: Option<String>,
    /// Target only: local endpoint clients connect to for the `postgres` service (host:port or
    /// unix:/path; default 127.0.0.1:5433).
    #[arg(long, value_name = "ENDPOINT")]
    pub local: Option<String>,
    /// Source only: PostgreSQL connection string for the migration's typed requests (slots,
    /// status, fence, digests), e.g. "host=127.0.0.1 port=5432 user=postgres dbname=postgres".
    #[arg(long, value_name = "CONNINFO")]
    pub pg_conninfo: Option<String>,
    /// Source only: file with the password for --pg-conninfo (mode 0600; never logged).
    #[arg(long, value_name = "FILE")]
    pub pg_password_file: Option<PathBuf>,
    /// Target only: data directory of the new cluster (empty or absent before the clone).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Target only: PostgreSQL binaries of the new cluster (default /usr/lib/postgresql/15/bin).
    #[arg(long, value_name = "DIR")]
    pub bindir: Option<PathBuf>,
    /// Target only: admin socket for `preflight`, `status`, … (default: pgferry-target.sock
    /// next to the audit log; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a log's hash chain and signed checkpoints; exit 0, or 1 naming the first bad line.
    Verify {
        /// The audit log to check.
        log: PathBuf,
        /// The other agent's log: both logs must describe the same tunnel sessions and streams
        /// (outside the windows where one agent was down), with the same digests.
        #[arg(long, value_name = "OTHER_LOG")]
        peer: Option<PathBuf>,
        /// Also check that the certificates embedded in the log were issued by this CA.
        #[arg(long, value_name = "CA_PEM")]
        ca: Option<PathBuf>,
        /// Accept records after the last checkpoint (a log the agent is still writing).
        #[arg(long)]
        allow_open: bool,
    },
    /// Render a log for an auditor: who, when, what, where, how.
    Report {
        /// The audit log to render (it is verified first).
        log: PathBuf,
    },
}

/// Top-level CLI of an agent binary.
#[derive(Debug, Parser)]
pub struct AgentCli {
    #[command(subcommand)]
    command: AgentCommand,
    /// Log filter (tracing EnvFilter syntax), e.g. info, debug, pgferry_common=debug.
    #[arg(
        long = "log",
        id = "log_filter",
        global = true,
        env = "PGFERRY_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log_filter: String,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Run the agent: tunnel, forwarding and audit log, until SIGTERM or Ctrl-C.
    Run(Box<RunArgs>),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check both clusters before a migration: prints each check and what to fix; changes
    /// nothing. Talks to the running target agent (`pgferry-target run`).
    Preflight(AdminArgs),
    /// Show the tunnel and migration state of the running target agent.
    Status(AdminArgs),
    /// Clone the source into the new cluster: replication slot, pg_basebackup through the
    /// tunnel with progress, pg_verifybackup, standby settings, start. Resumes from the
    /// persisted state; before promotion a failure rolls back (slot dropped).
    Clone(AdminArgs),
    /// Switch over: refuse above --max-lag, fence the source, wait until the standby replayed
    /// the fence LSN, verify tables on both sides, promote, check writable, report the
    /// downtime. Before promotion any failure rolls back (source unfenced).
    Cutover(CutoverArgs),
    /// Stop the migration before promotion: unfence the source, stop the standby, drop the
    /// slot (unless --keep-slot). Refused after promotion (the point of no return).
    Rollback(RollbackArgs),
    /// The whole migration: clone, wait until the standby has caught up (lag ≤ --max-lag),
    /// then cut over (with --auto-cutover, or after the operator confirms on a terminal).
    /// Run it again after an interruption: it resumes from the persisted state.
    Migrate(MigrateArgs),
}

/// `migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub cutover: CutoverArgs,
    /// Cut over as soon as the standby has caught up, without asking.
    #[arg(long)]
    pub auto_cutover: bool,
    /// Give up waiting for the catch-up after this many seconds (the standby keeps streaming).
    #[arg(long, default_value_t = 3600)]
    pub catch_up_timeout_secs: u64,
}

/// `rollback` options.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Keep the replication slot on the source (it retains WAL until dropped or reused by the
    /// next migration of the same name). Also `[target] keep_slot_on_rollback = true`.
    #[arg(long)]
    pub keep_slot: bool,
}

/// `cutover` options.
#[derive(Debug, Args)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Verify only these tables (schema.table, comma-separated). Default: every user table.
    #[arg(long, value_delimiter = ',', conflicts_with = "all_tables")]
    pub tables: Option<Vec<String>>,
    /// Verify every table whatever the fence's share costs: no --verify-budget-secs limit.
    #[arg(long)]
    pub all_tables: bool,
    /// Every table is digested per block range before the fence, while writes go on; at the
    /// fence only the ranges written since are digested again. This budget (estimated seconds,
    /// at the speed the pre-pass measured) limits that work; tables whose changed ranges do
    /// not fit are reported NOT VERIFIED. With --verify-at-fence: the budget for whole tables.
    #[arg(long, default_value_t = super::migrate::DEFAULT_VERIFY_BUDGET_SECS, value_name = "SECS")]
    pub verify_budget_secs: u64,
    /// Skip the pre-pass: digest whole tables (ordered by primary key) while writes are fenced,
    /// the smallest first within --verify-budget-secs (or all with --all-tables). Longer
    /// downtime; for comparison, or where TID range scans are missing (PostgreSQL < 14).
    #[arg(long)]
    pub verify_at_fence: bool,
    /// How long the pre-pass waits for transactions that were open when it began (their
    /// earlier writes become visible only when they commit) before the cutover gives up,
    /// naming them, with nothing fenced.
    #[arg(long, default_value_t = super::verify::DEFAULT_PREPASS_WAIT_SECS, value_name = "SECS")]
    pub prepass_wait_secs: u64,
    /// How to fence the source: read-only (default_transaction_read_only, sessions ended), or
    /// stop (read-only until the target is writable, then the source cluster is shut down).
    #[arg(long, default_value = "read-only", value_parser = ["read-only", "stop"])]
    pub fence: String,
    /// Refuse to start while the standby is more than this many bytes behind.
    #[arg(long, default_value_t = super::migrate::DEFAULT_MAX_LAG)]
    pub max_lag: u64,
    /// Roll back (unfence the source) when the standby has not replayed the fence LSN within
    /// this many seconds.
    #[arg(long, default_value_t = super::migrate::DEFAULT_REPLAY_TIMEOUT_SECS, value_name = "SECS")]
    pub replay_timeout_secs: u64,
    /// Shell command to run once the new cluster accepts writes (repoint the application).
    #[arg(long, value_name = "CMD")]
    pub on_promoted: Option<String>,
    /// Check the lag and list the tables; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// How a CLI verb finds the running target agent.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The agent's admin socket.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// The agent's config file (its [target] admin_socket, or the socket next to its audit log).
    #[arg(short, long, env = "PGFERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// `status` only: refresh every 2 s until interrupted.
    #[arg(long)]
    pub watch: bool,
}

/// Subcommands only `pgferry-target` has; `pgferry-source` hides them.
pub const TARGET_ONLY_COMMANDS: &[&str] = &[
    "preflight",
    "status",
    "clone",
    "cutover",
    "rollback",
    "migrate",
];

/// Runs an agent binary for `role`; returns the process exit code.
pub fn agent_main(role: Role, cli: AgentCli) -> ExitCode {
    init_logging(&cli.log_filter);
    let result = match cli.command {
        AgentCommand::Run(args) => run(role, *args).map(|()| ExitCode::SUCCESS),
        AgentCommand::Audit(cmd) => audit_command(cmd),
        AgentCommand::Preflight(_)
        | AgentCommand::Status(_)
        | AgentCommand::Clone(_)
        | AgentCommand::Cutover(_)
        | AgentCommand::Rollback(_)
        | AgentCommand::Migrate(_)
            if role == Role::Source =>
        {
            Err(anyhow::anyhow!(
                "this is a pgferry-target command; run it on the new host"
            ))
        }
        AgentCommand::Preflight(a) => super::admin::cli_verb("preflight", &a, Value::Null),
        AgentCommand::Clone(a) => super::admin::cli_verb("clone", &a, Value::Null),
        AgentCommand::Rollback(r) => super::admin::cli_verb(
            "rollback",
            &r.admin,
            serde_json::json!({"keep_slot": r.keep_slot}),
        ),
        AgentCommand::Status(a) => super::admin::cli_verb("status", &a, Value::Null),
        AgentCommand::Migrate(m) => super::admin::cli_migrate(&m),
        AgentCommand::Cutover(c) => super::admin::cli_verb(
            "cutover",
            &c.admin,
            serde_json::to_value(c.options()).unwrap_or_default(),
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgferry-{role}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Resolves `run` flags and the config file into an [`AgentConfig`].
pub fn resolve_config(role: Role, args: RunArgs) -> Result<AgentConfig> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let postgres_endpoint = match role {
        Role::Source => {
            if args.local.is_some() {
                anyhow::bail!("--local is a target option; the source takes --upstream");
            }
            args.upstream
        }
        Role::Target => {
            if args.upstream.is_some() {
                anyhow::bail!("--upstream is a source option; the target takes --local");
            }
            args.local
        }
    };
    let flags = Overrides {
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        revocation_list: args.revocation_list,
        listen: args.listen,
        connect: args.connect,
        server_name: args.server_name,
        keep_alive_secs: args.keep_alive_secs,
        idle_timeout_secs: args.idle_timeout_secs,
        drain_timeout_secs: args.drain_timeout_secs,
        handshake_timeout_secs: args.handshake_timeout_secs,
        congestion_control: args.congestion_control,
        allow_non_loopback_local: args.allow_non_loopback_local,
        allowed_regions: args.allowed_regions,
        audit_log: args.audit_log,
        compression_level: args.compression_level,
        postgres_endpoint,
        pg_conninfo: args.pg_conninfo,
        pg_password_file: args.pg_password_file,
        data_dir: args.data_dir,
        bindir: args.bindir,
        admin_socket: args.admin_socket,
    };
    let what = args
        .config
        .as_ref()
        .map_or_else(|| "flags".to_string(), |p| p.display().to_string());
    AgentConfig::resolve(role, file, flags).with_context(|| format!("configuration ({what})"))
}

fn run(role: Role, args: RunArgs) -> Result<()> {
    let cfg = resolve_config(role, args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_agent(cfg, shutdown_signal(), RunOptions::default()))
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

fn audit_command(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            log,
            peer,
            ca,
            allow_open,
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
        AuditCommand::Report { log } => match audit::render_report(&log) {
            Ok(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{}: FAILED: {e}", log.display());
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

fn read_pem_cert(path: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    Ok(der.to_vec())
}

impl CutoverArgs {
    /// What the agent's executor gets.
    pub fn options(&self) -> super::migrate::CutoverOptions {
        super::migrate::CutoverOptions {
            tables: self.tables.clone(),
            all_tables: self.all_tables,
            verify_budget_secs: self.verify_budget_secs,
            verify_at_fence: self.verify_at_fence,
            prepass_wait_secs: self.prepass_wait_secs,
            fence: if self.fence == "stop" {
                crate::control::FenceMode::Stop
            } else {
                crate::control::FenceMode::ReadOnly
            },
            max_lag: self.max_lag,
            replay_timeout_secs: self.replay_timeout_secs,
            on_promoted: self.on_promoted.clone(),
            dry_run: self.dry_run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        AgentCli::command().debug_assert();
        let cli =
            AgentCli::try_parse_from(["pgferry-target", "audit", "verify", "x.jsonl"]).unwrap();
        assert!(matches!(
            cli.command,
            AgentCommand::Audit(AuditCommand::Verify { .. })
        ));
    }
}
