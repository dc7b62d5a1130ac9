//! Two "hosts" on one machine: network namespaces `a` and `b` joined by a veth pair.
//!
//! ```text
//!   ns a: lo, veth-a 10.213.N.1/30  ◄── veth ──►  ns b: lo, veth-b 10.213.N.2/30
//! ```

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;

use crate::process::command_output;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces joined by a veth pair; deleted on drop.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    veth_a: String,
    veth_b: String,
}

fn ip(args: &[&str]) -> Result<String> {
    command_output(Command::new("ip").args(args))
}

impl NetnsPair {
    /// Creates the pair, or `Ok(None)` (with the reason on stderr) where namespaces cannot be
    /// made (no privilege, no `ip`).
    pub fn create(prefix: &str) -> Result<Option<Self>> {
        sweep_stale_netns(prefix);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{prefix}{pid}x{n}");
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        // veth names are limited to 15 bytes.
        let short = format!("{:x}", (pid << 4) ^ n);
        let (veth_a, veth_b) = (format!("vfa{short}"), format!("vfb{short}"));
        let subnet = (pid.wrapping_mul(31).wrapping_add(n) % 63) * 4;
        let third = (pid % 250) as u8;
        let addr_a = format!("10.213.{third}.{}", subnet + 1);
        let addr_b = format!("10.213.{third}.{}", subnet + 2);
        if let Err(e) = ip(&["netns", "add", &a]) {
            eprintln!("network namespaces unavailable: {e}");
            return Ok(None);
        }
        let pair = NetnsPair {
            a,
            b,
            addr_a,
            addr_b,
            veth_a,
            veth_b,
        };
        pair.setup()?;
        Ok(Some(pair))
    }

    fn setup(&self) -> Result<()> {
        ip(&["netns", "add", &self.b])?;
        ip(&[
            "link",
            "add",
            &self.veth_a,
            "netns",
            &self.a,
            "type",
            "veth",
            "peer",
            "name",
            &self.veth_b,
            "netns",
            &self.b,
        ])?;
        for (ns, dev, addr) in [
            (&self.a, &self.veth_a, &self.addr_a),
            (&self.b, &self.veth_b, &self.addr_b),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Takes the link down (a cable pulled) or brings it back up.
    pub fn set_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.a, "link", "set", &self.veth_a, state])?;
        ip(&["-n", &self.b, "link", "set", &self.veth_b, state])?;
        Ok(())
    }

    /// Limits both ends of the link to `mbit` Mbit/s with a token bucket.
    pub fn limit_rate(&self, mbit: u32) -> Result<()> {
        for (ns, dev) in [(&self.a, &self.veth_a), (&self.b, &self.veth_b)] {
            command_output(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kbit",
                "latency",
                "50ms",
            ]))?;
        }
        Ok(())
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the other end.
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

/// Deletes namespaces named `<prefix><pid>x…` whose process is gone (a test killed before its
/// `Drop` ran).
pub fn sweep_stale_netns(prefix: &str) {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}
