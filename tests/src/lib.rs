//! pgferry's end-to-end test kit: real PostgreSQL clusters, real processes, real namespaces.
//!
//! ```text
//!   pg        PgCluster (initdb/pg_ctl as the postgres user), sample data, table digests
//!   process   ChildGuard (captured output, SIGTERM with deadline), workspace binaries
//!   netns     NetnsPair: two network namespaces joined by a veth pair; NetnsPath: a WAN path
//!             through a third namespace
//! ```
//!
//! Waits poll a condition with a deadline ([`wait_until`]); nothing sleeps to synchronise.

pub mod certs;
pub mod netns;
pub mod pg;
pub mod process;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use netns::{sweep_stale_netns, NetnsPair, NetnsPath};
pub use pg::{
    as_postgres, chown_postgres, connect_tcp, load_sample_data, pg_bin, pg_bindir, table_digest,
    table_digest_at, PgCluster, TestDir,
};
pub use process::{bin_path, command_output, ChildGuard};

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn free_port(udp: bool) -> u16 {
    loop {
        let port = if udp {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map(|a| a.port())
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map(|a| a.port())
        }
        .expect("binding a free port");
        let mut g = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A TCP port on 127.0.0.1 nobody listens on now (and that this process never handed out).
pub fn free_tcp_port() -> u16 {
    free_port(false)
}

/// A UDP port on 127.0.0.1 nobody uses now (and that this process never handed out).
pub fn free_udp_port() -> u16 {
    free_port(true)
}

/// The environment variable `name` parsed (a measurement's knob), or `default` when it is
/// unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_names_what_timed_out() {
        let e = wait_until::<()>("the moon", Duration::from_millis(120), || None).unwrap_err();
        assert!(e.to_string().contains("the moon"), "{e}");
        let mut n = 0;
        assert_eq!(
            wait_until("n", Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            })
            .unwrap(),
            3
        );
    }

    #[test]
    fn free_ports_are_unique() {
        let ports: HashSet<u16> = (0..50).map(|_| free_tcp_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
