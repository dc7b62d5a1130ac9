//! `pgferry-target`'s command line: its own clap tree (`run`, `audit`, and the migration verbs
//! that talk to the running agent over its admin socket). The `run` and `audit` flags are the
//! ones both agents share ([`pgferry_common::runtime::cli`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::admin::cli_verb;
use pgferry_common::admin::{AdminRequest, RollbackOptions};

use crate::config::TargetRunArgs;
use pgferry_common::runtime::agent::RunOptions;
use pgferry_common::runtime::cli::{
    audit_command, block_on_agent, init_logging, shutdown_signal, AuditCommand, LogArgs,
};

/// pgferry target agent: runs on the new host, offers the source's PostgreSQL locally, and
/// drives the migration.
#[derive(Debug, Parser)]
#[command(name = "pgferry-target", version, about, long_about = None,
    after_help = "Examples:\n  pgferry-target run --connect old-host:7443 --ca certs/ca.pem --cert certs/target.pem \\\n      --key certs/target.key --audit-log target.audit.jsonl --local 127.0.0.1:5433\n  pgferry-target run --config /etc/pgferry/target.toml\n  pgferry-target audit verify target.audit.jsonl --peer source.audit.jsonl\n  pgferry-target preflight --config /etc/pgferry/target.toml")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: tunnel, local endpoints, admin socket and audit log, until SIGTERM or
    /// Ctrl-C.
    Run(Box<TargetRunArgs>),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check both clusters before a migration: prints each check and what to fix; changes
    /// nothing. Talks to the running target agent (`pgferry-target run`).
    Preflight(AdminArgs),
    /// Show the tunnel and migration state of the running target agent.
    Status(AdminArgs),
    /// Clone the source into the new cluster: replication slot, base copy through the tunnel
    /// with progress (the agents' parallel file streams, or pg_basebackup: see run
    /// --copy-method), pg_verifybackup, standby settings, start. Resumes from the persisted
    /// state (the agent copy from its journal); an outage is waited out; before promotion a
    /// failure rolls back (slot dropped, the source's backup session ended).
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

/// Runs the binary; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    init_logging(&cli.log.log_filter);
    let result = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Audit(cmd) => audit_command(cmd),
        Command::Preflight(a) => cli_verb(AdminRequest::Preflight, &a),
        Command::Clone(a) => cli_verb(AdminRequest::Clone, &a),
        Command::Rollback(r) => cli_verb(
            AdminRequest::Rollback(RollbackOptions {
                keep_slot: r.keep_slot,
            }),
            &r.admin,
        ),
        Command::Status(a) => cli_verb(AdminRequest::Status, &a),
        Command::Migrate(m) => crate::admin::cli_migrate(&m),
        Command::Cutover(c) => cli_verb(AdminRequest::Cutover(c.options()), &c.admin),
    };
    result.unwrap_or_else(|e| {
        eprintln!("pgferry-target: error: {e:#}");
        ExitCode::FAILURE
    })
}

fn run(args: TargetRunArgs) -> anyhow::Result<()> {
    let cfg = crate::config::resolve(args)?;
    block_on_agent(crate::run(
        cfg,
        shutdown_signal(),
        RunOptions::default(),
        crate::TargetOptions::default(),
    ))
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
    #[arg(long, default_value_t = crate::migrate::DEFAULT_VERIFY_BUDGET_SECS, value_name = "SECS")]
    pub verify_budget_secs: u64,
    /// Skip the pre-pass: digest whole tables (ordered by primary key) while writes are fenced,
    /// the smallest first within --verify-budget-secs (or all with --all-tables). Longer
    /// downtime; for comparison, or where TID range scans are missing (PostgreSQL < 14).
    #[arg(long)]
    pub verify_at_fence: bool,
    /// How long the pre-pass waits for transactions that were open when it began (their
    /// earlier writes become visible only when they commit) before the cutover gives up,
    /// naming them, with nothing fenced.
    #[arg(long, default_value_t = crate::verify::DEFAULT_PREPASS_WAIT_SECS, value_name = "SECS")]
    pub prepass_wait_secs: u64,
    /// How to fence the source: read-only (default_transaction_read_only, sessions ended), or
    /// stop (read-only until the target is writable, then the source cluster is shut down).
    #[arg(long, default_value = "read-only", value_parser = ["read-only", "stop"])]
    pub fence: String,
    /// Refuse to start while the standby is more than this many bytes behind.
    #[arg(long, default_value_t = crate::migrate::DEFAULT_MAX_LAG)]
    pub max_lag: u64,
    /// Roll back (unfence the source) when the standby has not replayed the fence LSN within
    /// this many seconds.
    #[arg(long, default_value_t = crate::migrate::DEFAULT_REPLAY_TIMEOUT_SECS, value_name = "SECS")]
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

impl CutoverArgs {
    /// What the agent's executor gets.
    pub fn options(&self) -> crate::migrate::CutoverOptions {
        crate::migrate::CutoverOptions {
            tables: self.tables.clone(),
            all_tables: self.all_tables,
            verify_budget_secs: self.verify_budget_secs,
            verify_at_fence: self.verify_at_fence,
            prepass_wait_secs: self.prepass_wait_secs,
            fence: if self.fence == "stop" {
                pgferry_common::control::FenceMode::Stop
            } else {
                pgferry_common::control::FenceMode::ReadOnly
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
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["pgferry-target", "audit", "verify", "x.jsonl"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Verify { .. })
        ));
        let cli = Cli::try_parse_from(["pgferry-target", "rollback", "--keep-slot"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rollback(RollbackArgs {
                keep_slot: true,
                ..
            })
        ));
        // The source's run flags are not the target's.
        assert!(Cli::try_parse_from(["pgferry-target", "run", "--upstream", "x:1"]).is_err());
        assert!(Cli::try_parse_from(["pgferry-target", "run", "--data-dir", "/x"]).is_ok());
    }
}
