//! Two "hosts" on one machine: network namespaces `a` and `b` joined by a veth pair
//! ([`NetnsPair`]), or by a path through a third namespace that emulates a WAN ([`NetnsPath`]).
//!
//! ```text
//!   NetnsPair   ns a: veth-a 10.213.N.1/30  ◄── veth ──►  ns b: veth-b 10.213.N.2/30
//!
//!   NetnsPath   ns a: veth-a 10.214.N.1/24 ◄─veth─► ns mid: mid-a ═ (program) ═ mid-b ◄─veth─►
//!               ns b: veth-b 10.214.N.2/24 (and .3)
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

/// What `dev` in `ns` sends, limited to `mbit` Mbit/s by `tc tbf` (a full queue drops, as a
/// router's does).
fn token_bucket(ns: &str, dev: &str, mbit: u32) -> Result<()> {
    // 256 kbit (32 KB) up to 256 Mbit/s, then 1 ms worth of the rate (125 KB at 1 Gbit/s): a
    // bucket shorter than a GSO burst throttles a fast link below its rate.
    let burst = format!("{}kbit", mbit.max(256));
    command_output(NetnsPair::command(ns, "tc").args([
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst,
        "latency",
        "50ms",
    ]))
    .map(drop)
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
            token_bucket(ns, dev, mbit)?;
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

/// Three namespaces in a line, `a ── mid ── b`: `mid` owns one end of each veth pair and no
/// addresses, so nothing passes until a program joins `mid_a` and `mid_b` (the bench's
/// `wan-emulator.py`, which delays and drops frames at layer 2). `a` and `b` share one /24, as
/// two hosts behind one bridge; `b` has a second address, `addr_b2`, so that two TCP flows
/// from `b` can get different routes (and congestion controls) in `a`. Deleted on drop.
pub struct NetnsPath {
    pub a: String,
    pub mid: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    pub addr_b2: String,
    /// `a`'s end, `mid`'s end towards `a`, `mid`'s end towards `b`, `b`'s end.
    pub veth_a: String,
    pub mid_a: String,
    pub mid_b: String,
    pub veth_b: String,
}

impl NetnsPath {
    /// Creates the three namespaces and both veth pairs, all up, or `Ok(None)` (with the reason
    /// on stderr) where namespaces cannot be made.
    pub fn create(prefix: &str) -> Result<Option<Self>> {
        sweep_stale_netns(prefix);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{prefix}{pid}x{n}");
        // veth names are limited to 15 bytes.
        let short = format!("{:x}", (pid << 4) ^ n);
        let net = format!(
            "10.214.{}",
            (pid.wrapping_mul(7).wrapping_add(n) % 250) as u8
        );
        if let Err(e) = ip(&["netns", "add", &format!("{tag}a")]) {
            eprintln!("network namespaces unavailable: {e}");
            return Ok(None);
        }
        let path = NetnsPath {
            a: format!("{tag}a"),
            mid: format!("{tag}m"),
            b: format!("{tag}b"),
            addr_a: format!("{net}.1"),
            addr_b: format!("{net}.2"),
            addr_b2: format!("{net}.3"),
            veth_a: format!("vpa{short}"),
            mid_a: format!("vpx{short}"),
            mid_b: format!("vpy{short}"),
            veth_b: format!("vpb{short}"),
        };
        path.setup()?;
        Ok(Some(path))
    }

    fn setup(&self) -> Result<()> {
        ip(&["netns", "add", &self.mid])?;
        ip(&["netns", "add", &self.b])?;
        for (ns, dev, mid_dev) in [
            (&self.a, &self.veth_a, &self.mid_a),
            (&self.b, &self.veth_b, &self.mid_b),
        ] {
            ip(&[
                "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", mid_dev, "netns",
                &self.mid,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &self.mid, "link", "set", mid_dev, "up"])?;
        }
        ip(&[
            "-n",
            &self.a,
            "addr",
            "add",
            &format!("{}/24", self.addr_a),
            "dev",
            &self.veth_a,
        ])?;
        for addr in [&self.addr_b, &self.addr_b2] {
            ip(&[
                "-n",
                &self.b,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &self.veth_b,
            ])?;
        }
        Ok(())
    }

    /// The four veth ends, each with its namespace.
    fn ends(&self) -> [(&str, &str); 4] {
        [
            (&self.a, &self.veth_a),
            (&self.mid, &self.mid_a),
            (&self.mid, &self.mid_b),
            (&self.b, &self.veth_b),
        ]
    }

    /// Turns GRO, GSO, TSO and checksum offloads off on all four ends (`ethtool -K`), so that
    /// every frame the middle program sees is a real packet of at most the MTU, with its
    /// checksum filled in.
    pub fn offloads_off(&self) -> Result<()> {
        for (ns, dev) in self.ends() {
            command_output(NetnsPair::command(ns, "ethtool").args([
                "-K", dev, "gro", "off", "gso", "off", "tso", "off", "tx", "off", "rx", "off",
            ]))?;
        }
        Ok(())
    }

    /// Limits what `mid` sends on each side to `mbit` Mbit/s with a token bucket (the
    /// bottleneck sits after the delay, as a router's queue does; a full queue drops).
    pub fn limit_rate(&self, mbit: u32) -> Result<()> {
        for dev in [&self.mid_a, &self.mid_b] {
            token_bucket(&self.mid, dev, mbit)?;
        }
        Ok(())
    }

    /// In `a`, routes `to` (an address of `b`) with TCP congestion control `algo` (`cubic`,
    /// `bbr`, …): the per-route `congctl`, since `net.ipv4.tcp_congestion_control` may not be
    /// writable in a namespace.
    pub fn route_congctl(&self, to: &str, algo: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.a,
            "route",
            "replace",
            &format!("{to}/32"),
            "dev",
            &self.veth_a,
            "congctl",
            algo,
        ])?;
        Ok(())
    }

    /// Bytes `a` has sent into the path towards `b` (counted before the delay, the loss and
    /// the rate limiter).
    pub fn tx_bytes_a(&self) -> Result<u64> {
        read_counter(&self.a, &self.veth_a, "tx_bytes")
    }

    /// Bytes `b` has received from the path (what crossed it).
    pub fn rx_bytes_b(&self) -> Result<u64> {
        read_counter(&self.b, &self.veth_b, "rx_bytes")
    }
}

fn read_counter(ns: &str, dev: &str, counter: &str) -> Result<u64> {
    let s = command_output(
        NetnsPair::command(ns, "cat").arg(format!("/sys/class/net/{dev}/statistics/{counter}")),
    )?;
    Ok(s.trim().parse()?)
}

impl Drop for NetnsPath {
    fn drop(&mut self) {
        for ns in [&self.a, &self.mid, &self.b] {
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
