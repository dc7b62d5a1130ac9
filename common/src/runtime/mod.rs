//! The tokio/quinn driver both agents embed (feature `runtime`): the shared tunnel and what
//! both roles use. Each role's own code is in its crate (`agent-source`, `agent-target`).
//!
//! ```text
//!   agent   the tunnel: handshakes, Hello, peer re-checks, drain; calls the role's RoleDriver
//!           for what it does with a connection
//!     endpoint  QUIC transport settings, server/client configs, keys derived from the agent's key
//!     records   the tunnel's audit records (start, sessions with their path, streams, refusals)
//!   pump    one forwarded connection ⇄ one QUIC stream of frames (compress, verify, deliver)
//!   tls     rustls configs whose verifiers add the identity policy to WebPKI
//!   config  TOML + flags → AgentConfig, validated before any socket is opened
//!   cli     the `run` and `audit` flags, logging, signals: what both binaries' main() use
//!   digest  table digests (whole tables, block ranges), the same code on both sides
//! ```
//!
//! Agents are embeddable: [`agent::run_agent`] takes its configuration, its role and a
//! shutdown future, so tests run them in-process with port 0 and stop them cleanly.

pub mod agent;
pub mod cli;
pub mod config;
pub mod digest;
pub mod pump;
pub mod tls;

pub use agent::{run_agent, RoleDriver, RunOptions};
pub use config::AgentConfig;
