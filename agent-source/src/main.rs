//! `pgferry-source`: flags, then [`pgferry_source::run`] or the audit tools.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pgferry_common::identity::Role;
use pgferry_common::runtime::agent::RunOptions;
use pgferry_common::runtime::cli::{
    audit_command, block_on_agent, init_logging, resolve_config, shutdown_signal, AuditCommand,
    LogArgs, RoleFlags, RunArgs, TunnelArgs,
};

/// pgferry source agent: runs next to the old PostgreSQL and serves the tunnel.
#[derive(Debug, Parser)]
#[command(name = "pgferry-source", version, about, long_about = None,
    after_help = "Examples:\n  pgferry-source run --listen 0.0.0.0:7443 --ca certs/ca.pem --cert certs/source.pem \\\n      --key certs/source.key --audit-log source.audit.jsonl --upstream 127.0.0.1:5432\n  pgferry-source run --config /etc/pgferry/source.toml\n  pgferry-source audit verify source.audit.jsonl --peer target.audit.jsonl")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: tunnel, forwarding, typed requests and audit log, until SIGTERM or Ctrl-C.
    Run(Box<SourceRunArgs>),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log.log_filter);
    let result = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Audit(cmd) => audit_command(cmd),
    };
    result.unwrap_or_else(|e| {
        eprintln!("pgferry-source: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// `run` flags: the tunnel's, then the source's own.
#[derive(Debug, Args)]
struct SourceRunArgs {
    #[command(flatten)]
    tunnel: TunnelArgs,
    /// Address of PostgreSQL for the `postgres` service (host:port or unix:/path; default
    /// 127.0.0.1:5432).
    #[arg(long, value_name = "ENDPOINT")]
    upstream: Option<String>,
    /// PostgreSQL connection string for the migration's typed requests (slots, status, fence,
    /// digests), e.g. "host=127.0.0.1 port=5432 user=postgres dbname=postgres".
    #[arg(long, value_name = "CONNINFO")]
    pg_conninfo: Option<String>,
    /// File with the password for --pg-conninfo (mode 0600; never logged).
    #[arg(long, value_name = "FILE")]
    pg_password_file: Option<PathBuf>,
}

fn run(args: SourceRunArgs) -> anyhow::Result<()> {
    let args = RunArgs {
        tunnel: args.tunnel,
        role: RoleFlags {
            upstream: args.upstream,
            pg_conninfo: args.pg_conninfo,
            pg_password_file: args.pg_password_file,
            ..Default::default()
        },
    };
    let cfg = resolve_config(Role::Source, args)?;
    block_on_agent(pgferry_source::run(
        cfg,
        shutdown_signal(),
        RunOptions::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
        // The migration verbs are the target's: the source does not know them.
        assert!(Cli::try_parse_from(["pgferry-source", "cutover"]).is_err());
        // Nor its run flags.
        assert!(Cli::try_parse_from(["pgferry-source", "run", "--data-dir", "/x"]).is_err());
        assert!(Cli::try_parse_from(["pgferry-source", "run", "--upstream", "unix:/s"]).is_ok());
    }
}
