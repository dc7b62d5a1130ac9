//! `pgferry-source`: flags, then [`pgferry_source::run`] or the audit tools.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgferry_common::runtime::agent::RunOptions;
use pgferry_common::runtime::cli::{
    audit_command, block_on_agent, init_logging, shutdown_signal, AuditCommand, LogArgs,
};
use pgferry_source::config::SourceRunArgs;

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

fn run(args: SourceRunArgs) -> anyhow::Result<()> {
    let cfg = pgferry_source::config::resolve(args)?;
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
