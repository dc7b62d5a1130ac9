//! `pgferry-target`: flags, then the agent ([`pgferry_target::run`]), the audit tools, or a
//! migration verb sent to the running agent.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    pgferry_target::cli::main(pgferry_target::cli::Cli::parse())
}
