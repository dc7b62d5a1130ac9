//! # pgferry-common
//!
//! The heart of pgferry that both agents share. Everything at the top level is **sans-IO**:
//! pure functions and state over bytes, with no sockets and no async runtime, so it can be tested
//! exhaustively and fuzzed. The `runtime` feature adds the tokio/quinn driver that both agents
//! embed; without the feature this crate does not even depend on tokio or quinn, which keeps the
//! split honest (`cargo check -p pgferry-common` builds only the pure part).
//!
//! # Layout
//!
//! ```text
//!   admin     the admin protocol's typed reports (cutover, pre-pass, verification at the fence)
//!   admission what a peer that has not authenticated may hold (pending handshakes); refusal rate limit
//!   frame     bytes ⇄ Frame (DATA/FIN/ACK/RESET), chunk compression (zstd/RAW) and BLAKE3 checks
//!   control   control-stream messages (Hello, refusals), length-prefixed and versioned
//!   identity  certificate ⇄ PeerIdentity (migration, role, region), region and revocation policy
//!   audit     hash-chained JSON-lines audit log, signed checkpoints, verification and report
//!   backup    what an agent-owned base copy copies (PostgreSQL's exclusions), its backup_manifest
//!   migration the migration state machine (DESIGN §4): a pure transition function, LSNs
//!   preflight source/target facts → checks with what to fix (pure)
//!   level     the sender's zstd level control (goodput per window, probes; time as input)
//!   pgwire    who a forwarded PostgreSQL connection is, from its startup message
//!   fence     the fenced pg_hba.conf, what to save and restore, which processes are connecting
//!   verify    block-range digests, pg_waldump lines → ranges changed since their digest
//!   runtime   (feature "runtime") the tunnel both agents share (endpoint, handshake and policy,
//!             pump, TLS, config, table digests); each role's code lives in its own crate
//!
//!   TCP client ─► target agent ══ QUIC data stream: StreamHeader, then Frames ══► source agent ─► PostgreSQL
//!                     │                                                             │
//!                     └──────────── control stream: Hello / HelloAck ───────────────┘
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod audit;
pub mod backup;
pub mod control;
pub mod fence;
pub mod frame;
pub mod identity;
pub mod level;
pub mod migration;
pub mod pgwire;
pub mod preflight;
pub mod verify;

#[cfg(feature = "runtime")]
pub mod runtime;

/// This build's version, sent in `Hello` and recorded in the audit log.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
