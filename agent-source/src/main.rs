//! `pgferry-source`: the agent on the old host, next to PostgreSQL (which keeps listening on
//! loopback only). It accepts forwarded connections from the target agent over one mutually
//! authenticated QUIC connection and connects each to the configured upstream.
//!
//! All logic lives in `pgferry_common::runtime`; this binary only fixes the role.
#![forbid(unsafe_code)]

use clap::{CommandFactory, FromArgMatches, Parser};
use pgferry_common::identity::Role;
use pgferry_common::runtime::cli::{agent_main, AgentCli, TARGET_ONLY_COMMANDS};

/// pgferry source agent: runs next to the old PostgreSQL and serves the tunnel.
#[derive(Parser)]
#[command(name = "pgferry-source", version, about, long_about = None,
    after_help = "Examples:\n  pgferry-source run --listen 0.0.0.0:7443 --ca certs/ca.pem --cert certs/source.pem \\\n      --key certs/source.key --audit-log source.audit.jsonl --upstream 127.0.0.1:5432\n  pgferry-source run --config /etc/pgferry/source.toml\n  pgferry-source audit verify source.audit.jsonl --peer target.audit.jsonl")]
struct Cli {
    #[command(flatten)]
    inner: AgentCli,
}

fn main() -> std::process::ExitCode {
    // The migration verbs (preflight, status, …) belong to pgferry-target: hide them here.
    let mut cmd = Cli::command();
    for name in TARGET_ONLY_COMMANDS {
        cmd = cmd.mut_subcommand(*name, |s| s.hide(true));
    }
    let cli = Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
    agent_main(Role::Source, cli.inner)
}
