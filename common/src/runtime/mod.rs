//! The tokio/quinn driver both agents embed (feature `runtime`).
//!
//! ```text
//!   admin   the target's admin socket (0600) and the CLI verbs that talk to it
//!   cli     flags, `audit verify|report`, logging, signals: what the binaries' main() calls
//!   config  TOML + flags → AgentConfig, validated before any socket is opened
//!   tls     rustls configs whose verifiers add the identity policy to WebPKI
//!   agent   endpoint, handshakes, Hello, forwarded streams, audit records, drain on shutdown
//!   pump    one forwarded connection ⇄ one QUIC stream of frames (compress, verify, deliver)
//!   control_stream  typed requests/responses on the control stream (target asks, source answers)
//!   migrate the executor: performs each step, persisting the state first; rolls back
//!   state_store  the migration state, persisted atomically before each step
//!   pg      typed control requests → fixed SQL on the source; table digests for both sides
//!   fence   the source's fence: pg_hba.conf, read-only, sessions ended; undone byte for byte
//!   verify  the cutover's block-range pre-pass before the fence and its remainder at the fence
//! ```
//!
//! Agents are embeddable: [`agent::run_agent`] takes its configuration and a shutdown future,
//! so tests run them in-process with port 0 and stop them cleanly.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control_stream;
pub mod fence;
pub mod migrate;
pub mod pg;
pub mod pump;
pub mod state_store;
pub mod tls;
pub mod verify;

pub use agent::{run_agent, RunOptions};
pub use config::AgentConfig;
