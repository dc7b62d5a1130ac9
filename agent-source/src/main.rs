//! `pgferry-source`: flags, then [`pgferry_source::run`] or the audit tools.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgferry_common::identity::Role;
use pgferry_common::runtime::agent::RunOptions;
use pgferry_common::runtime::cli::{
    audit_command, init_logging, resolve_config, shutdown_signal, AuditCommand, RunArgs,
};

/// pgferry source agent: runs next to the old PostgreSQL and serves the tunnel.
#[derive(Debug, Parser)]
#[command(name = "pgferry-source", version, about, long_about = None,
    after_help = "Examples:\n  pgferry-source run --listen 0.0.0.0:7443 --ca certs/ca.pem --cert certs/source.pem \\\n      --key certs/source.key --audit-log source.audit.jsonl --upstream 127.0.0.1:5432\n  pgferry-source run --config /etc/pgferry/source.toml\n  pgferry-source audit verify source.audit.jsonl --peer target.audit.jsonl")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
enum Command {
    /// Run the agent: tunnel, forwarding, typed requests and audit log, until SIGTERM or Ctrl-C.
    Run(Box<RunArgs>),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_filter);
    let result = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Audit(cmd) => audit_command(cmd),
    };
    result.unwrap_or_else(|e| {
        eprintln!("pgferry-source: error: {e:#}");
        ExitCode::FAILURE
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = resolve_config(Role::Source, args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(pgferry_source::run(
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
    }
}
