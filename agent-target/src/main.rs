//! `pgferry-target`: the agent on the new host. It offers local endpoints (TCP on loopback or a
//! unix socket) where `psql`, `pg_basebackup` and a standby's walreceiver connect; each client
//! connection becomes one data stream over the QUIC connection to the source agent.
//!
//! All logic lives in `pgferry_common::runtime`; this binary only fixes the role.
#![forbid(unsafe_code)]

use clap::Parser;
use pgferry_common::identity::Role;
use pgferry_common::runtime::cli::{agent_main, AgentCli};

/// pgferry target agent: runs on the new host and offers the source's PostgreSQL locally.
#[derive(Parser)]
#[command(name = "pgferry-target", version, about, long_about = None,
    after_help = "Examples:\n  pgferry-target run --connect old-host:7443 --ca certs/ca.pem --cert certs/target.pem \\\n      --key certs/target.key --audit-log target.audit.jsonl --local 127.0.0.1:5433\n  pgferry-target run --config /etc/pgferry/target.toml\n  pgferry-target audit verify target.audit.jsonl --peer source.audit.jsonl\n  pgferry-target preflight --config /etc/pgferry/target.toml")]
struct Cli {
    #[command(flatten)]
    inner: AgentCli,
}

fn main() -> std::process::ExitCode {
    agent_main(Role::Target, Cli::parse().inner)
}
