//! `--rtt-ms`: the path cases of issue 16. pgferry and `ssh -L` cross the same emulated WAN
//! path, one at a time, alternating, each under a time limit:
//!
//! ```text
//!  ns a (source)              ns mid                                   ns b (target)
//!  PostgreSQL, sshd,   veth   wan-emulator.py: delay RTT/2 each way,   veth   pg_basebackup,
//!  pgferry-source ×3  ◄────►  random loss; tc tbf RATE on both mid  ◄────►  ssh -L ×3,
//!  (cubic, bbr, newreno)      ends (the bottleneck queue drops)             pgferry-target ×3
//! ```
//!
//! GRO, GSO, TSO and checksum offloads are off on all four veth ends. `ssh -L` runs once with
//! CUBIC and once with BBR: the sender is sshd in `a`, and each tunnel's client binds its own
//! address in `b`, routed in `a` with its own `congctl`. Each pgferry pair runs with its own
//! `--congestion-control` on both agents. The emulator restarts for every measurement, so its
//! counters (forwarded, randomly dropped, not accepted by the rate limiter) belong to one
//! contender; a starved emulator shows there.
//!
//! 1. `pg_basebackup -X stream` through each contender at each `--loss`: time (or "> limit"),
//!    bytes on the link.
//! 2. Fairness on the lossless path: a pgferry stream (BBR, then CUBIC) and an `ssh -L` stream
//!    (CUBIC) of incompressible bytes read at the same time for `--fairness-secs`; each flow's
//!    share.
//! 3. WAL on the lossiest path: a standby through `ssh -L` BBR and one through each of pgferry
//!    cubic (the default) and bbr, each under a write load of 1.5× the link (`--wal-mb-per-s`)
//!    for `--wal-secs`; the lag once a second, its p99, the drain.
//!
//! Writes `path-run.json`, `path-run.md` and `path-run.png` to `--out`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_tests::{
    bin_path, command_output, free_tcp_port, free_udp_port, pg_bin, wait_until, ChildGuard,
    NetnsPair, NetnsPath, PgCluster, TestDir,
};
use serde_json::{json, Value};

use crate::{charts, load_dataset, ssh_tunnel, start_sshd, start_stream_server, Args, Sshd};

/// Namespace prefix of the path run (unique to it; stale ones from a killed run are swept).
const NS_PREFIX: &str = "pgfccpath";

/// The QUIC congestion controllers the agents offer, each run as its own pair of agents.
const QUIC_CCS: [&str; 3] = ["cubic", "bbr", "newreno"];

/// One pgferry pair: its congestion control and its local ports in `b`.
struct Ferry {
    cc: &'static str,
    pg_local: u16,
    stream_local: u16,
    source: ChildGuard,
    _target: ChildGuard,
}

/// One `ssh -L` tunnel whose sender (sshd in `a`) uses `cc` towards `bind` in `b`.
struct SshTunnel {
    cc: &'static str,
    bind: String,
    to_port: u16,
    local: u16,
    child: ChildGuard,
}

/// A contender of the base-backup comparison: its name and local port in `b`.
struct Contender {
    name: String,
    port: u16,
    /// Index into the ssh tunnels when this is `ssh -L` (restarted after a time-out, so that
    /// what its sshd still has queued does not cross the path during the next measurement).
    ssh: Option<usize>,
}

/// The emulator of one measurement in `mid`; its counters are read when it stops.
struct Emulator(ChildGuard);

impl Emulator {
    fn start(net: &NetnsPath, rtt_ms: f64, loss: f64, seed: u64, max_secs: u64) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("wan-emulator.py");
        // Raised priority: the machine has 2 cores shared with PostgreSQL, both tunnel ends
        // and whatever else runs; a starved emulator delays frames beyond the RTT asked for.
        let mut cmd = NetnsPair::command(&net.mid, "nice");
        cmd.args(["-n", "-10", "python3", "-u"])
            .arg(&script)
            .args([&net.mid_a, &net.mid_b])
            .args(["--delay-ms", &format!("{}", rtt_ms / 2.0)])
            .args(["--loss", &format!("{loss}")])
            .args(["--seed", &seed.to_string()])
            .args(["--max-seconds", &max_secs.to_string()]);
        let child = ChildGuard::spawn_quiet("wan-emulator", cmd)?;
        // It prints its first line once both sockets are bound.
        child.wait_for_output("wan-emulator:", Duration::from_secs(20))?;
        Ok(Self(child))
    }

    /// Stops it; its final counters.
    fn stop(mut self) -> Result<Value> {
        self.0.terminate(Duration::from_secs(10))?;
        let out = self.0.output();
        let line = out
            .lines()
            .find(|l| l.contains("forwarded "))
            .with_context(|| format!("the emulator printed no counters:\n{out}"))?;
        // "wan-emulator: forwarded N, dropped M (random loss), K not accepted by the link"
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        let [forwarded, dropped, not_accepted] = nums[..] else {
            bail!("unexpected emulator counters: {line}");
        };
        Ok(json!({"forwarded": forwarded, "dropped_random": dropped,
                  "not_accepted_by_link": not_accepted}))
    }
}

/// Waits until the source side sends less than 16 KB per 250 ms twice in a row (what a
/// previous measurement left queued has crossed or been dropped), up to 60 s.
fn wait_link_quiet(net: &NetnsPath) -> Result<()> {
    let mut last = net.tx_bytes_a()?;
    let mut at = Instant::now();
    let mut quiet = 0;
    wait_until("the path to go quiet", Duration::from_secs(60), || {
        if at.elapsed() < Duration::from_millis(250) {
            return None;
        }
        let now = net.tx_bytes_a().ok()?;
        quiet = if now - last < 16_000 { quiet + 1 } else { 0 };
        (last, at) = (now, Instant::now());
        (quiet >= 2).then_some(())
    })
}

/// The 1-minute load average: above the core count, other work shared the machine (and the
/// Python emulator) during the run.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Which TCP congestion control each established connection from `a` to `addr` uses
/// (`ss -ti`), to confirm the per-route `congctl` took.
fn tcp_cc_in_use(net: &NetnsPath, addr: &str) -> Result<Vec<String>> {
    let out = command_output(NetnsPair::command(&net.a, "ss").args([
        "-tinH",
        "state",
        "established",
        "dst",
        addr,
    ]))?;
    Ok(out
        .split_whitespace()
        .filter(|w| ["cubic", "bbr", "reno"].contains(w))
        .map(str::to_string)
        .collect())
}

/// The path cases: builds the path, starts PostgreSQL and every tunnel across it, measures the
/// base backups and the fairness, closes the tunnels, and writes the results.
pub fn run(o: &Args) -> Result<()> {
    let rtt_ms = o
        .rtt_ms
        .context("--rtt-ms is required for the path cases")?;
    let load_at_start = load_average();
    let dir = TestDir::new()?;
    let net = NetnsPath::create(NS_PREFIX)?.context(
        "network namespaces cannot be created here (run as root with iproute2 installed)",
    )?;
    net.offloads_off()
        .context("while turning offloads off (ethtool)")?;
    net.limit_rate(o.rate)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "pgferry-bench path: {rtt_ms} ms RTT, {} Mbit/s (tc tbf), loss {:?} %, {} rep(s), \
         limit {} s per measurement; {cores} cores",
        o.rate, o.loss, o.reps, o.path_timeout_secs
    );
    // The per-route congestion control of sshd's replies to each client address.
    let ssh_ccs = [("cubic", net.addr_b.clone()), ("bbr", net.addr_b2.clone())];
    for (cc, addr) in &ssh_ccs {
        net.route_congctl(addr, cc)?;
    }

    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("pg"), pg_port)?.with_netns(&net.a);
    pg.start()?;
    let (db_bytes, ratio) = load_dataset(&pg, o.megabytes)?;
    let me = std::env::current_exe()?;
    let (server, stream_port) = start_stream_server(Some(net.a.as_str()), &me, true)?;

    // Setup crosses the path too: a lossless emulator while tunnels come up.
    let setup_emulator = Emulator::start(&net, rtt_ms, 0.0, 1, 600)?;
    let ferries = start_ferries(o, &dir, &net, pg_port, stream_port)?;
    let sshd = start_sshd(&dir.join("ssh"), Some(net.a.as_str()), &net.addr_a)?;
    let mut tunnels = start_ssh_tunnels(&sshd, &net.b, &ssh_ccs, [pg_port, stream_port])?;
    let cc_check = check_ssh_congctl(&net, &ssh_ccs)?;
    let ping_rtt = ping_through(&net)?;
    let setup_counters = setup_emulator.stop()?;

    let mut contenders = contenders(&tunnels, &ferries, pg_port);
    let m = Measure {
        o,
        rtt_ms,
        net: &net,
        dir: &dir,
        me: &me,
        sshd: &sshd,
        pg_password: &pg.password,
    };
    // Measurements, then a teardown that runs whatever they returned.
    let measured = (|| -> Result<(Vec<Value>, Vec<Value>, Vec<Value>)> {
        let cases = m.basebackups(&mut contenders, &mut tunnels)?;
        let fairness = m.fairness(&tunnels, &ferries, stream_port)?;
        let wal = m.wal(&contenders, &pg)?;
        Ok((cases, fairness, wal))
    })();
    close_ssh_tunnels(&net, rtt_ms, tunnels, &sshd)?;
    let (cases, fairness, wal) = measured?;

    std::fs::create_dir_all(&o.out)?;
    let mut ferries = ferries;
    let mut sources: Vec<(&str, &mut ChildGuard)> =
        ferries.iter_mut().map(|f| (f.cc, &mut f.source)).collect();
    let tunnel_closed = crate::stop_agents(&mut sources, &o.out, "path-agent-source-")?;
    drop(ferries);
    drop(server);
    pg.stop()?;

    let results = json!({
        "when": command_output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
            .ok().map(|s| s.trim().to_string()),
        "cores": cores,
        "reps": o.reps,
        "zstd_level": o.level,
        "path": {"rtt_ms": rtt_ms, "rate_mbit": o.rate,
                 "tbf": "on both middle ends: burst 256kbit, latency 50ms",
                 "emulator": "bench/wan-emulator.py at nice -10, restarted per measurement",
                 "offloads": "gro, gso, tso, tx and rx checksums off on all four veth ends"},
        "limit_s": o.path_timeout_secs,
        "dataset": {"database_bytes": db_bytes, "zstd3_ratio_of_files": ratio},
        "ssh_congestion_control_check": cc_check,
        "setup_emulator": setup_counters,
        "load_average_1min": {"start": load_at_start, "end": load_average()},
        "ping_rtt": ping_rtt,
        "basebackup": cases,
        "fairness": fairness,
        "wal": wal,
        "tunnel_closed": tunnel_closed,
    });
    write_results(&results, &o.out)
}

/// One `ssh -L` from `ns_b` per congestion control in `ssh_ccs` and per port in `to_ports`
/// (PostgreSQL, the stream server), each client bound to the address whose route in `a` asks
/// for that congestion control.
fn start_ssh_tunnels(
    sshd: &Sshd,
    ns_b: &str,
    ssh_ccs: &[(&'static str, String)],
    to_ports: [u16; 2],
) -> Result<Vec<SshTunnel>> {
    let mut tunnels = Vec::new();
    for (cc, bind) in ssh_ccs {
        for to_port in to_ports {
            let (child, local) = ssh_tunnel(sshd, Some(ns_b), to_port, false, Some(bind))?;
            tunnels.push(SshTunnel {
                cc,
                bind: bind.clone(),
                to_port,
                local,
                child,
            });
        }
    }
    Ok(tunnels)
}

/// Confirms that sshd's connections towards each client address use the congestion control
/// its route asks for; what `ss -ti` showed, for the results.
fn check_ssh_congctl(net: &NetnsPath, ssh_ccs: &[(&'static str, String)]) -> Result<Vec<Value>> {
    let mut cc_check = Vec::new();
    for (cc, addr) in ssh_ccs {
        let seen = tcp_cc_in_use(net, addr)?;
        println!("ssh -L towards {addr}: route congctl {cc}, connections use {seen:?}");
        if seen.is_empty() || seen.iter().any(|s| s != cc) {
            bail!("the route to {addr} asks for {cc}, but sshd's connections use {seen:?}");
        }
        cc_check.push(json!({"route_congctl": cc, "to": addr, "connections_use": seen}));
    }
    Ok(cc_check)
}

/// The emulator itself, no pgferry involved: ping's RTT summary line through it.
fn ping_through(net: &NetnsPath) -> Result<String> {
    let ping = command_output(NetnsPair::command(&net.b, "ping").args([
        "-c",
        "10",
        "-i",
        "0.2",
        "-q",
        &net.addr_a,
    ]))?;
    let ping_rtt = ping
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or("")
        .to_string();
    println!("ping through the path: {ping_rtt}");
    Ok(ping_rtt)
}

/// The base-backup contenders: the `ssh -L` tunnels to PostgreSQL, then the pgferry pairs.
fn contenders(tunnels: &[SshTunnel], ferries: &[Ferry], pg_port: u16) -> Vec<Contender> {
    let mut contenders: Vec<Contender> = Vec::new();
    for (i, t) in tunnels.iter().enumerate() {
        if t.to_port == pg_port {
            contenders.push(Contender {
                name: format!("ssh -L {}", t.cc.to_uppercase()),
                port: t.local,
                ssh: Some(i),
            });
        }
    }
    for f in ferries {
        contenders.push(Contender {
            name: format!("pgferry {}", f.cc),
            port: f.pg_local,
            ssh: None,
        });
    }
    contenders
}

/// Closes the `ssh -L` tunnels across a lossless emulator: the clients' FINs must cross the
/// path, or sshd's sessions linger after the run. Waits (up to 20 s) for those sessions to end.
fn close_ssh_tunnels(
    net: &NetnsPath,
    rtt_ms: f64,
    tunnels: Vec<SshTunnel>,
    sshd: &Sshd,
) -> Result<()> {
    let teardown = Emulator::start(net, rtt_ms, 0.0, 2, 120)?;
    drop(tunnels);
    let sshd_pid = sshd.pid().to_string();
    let _ = wait_until("sshd's sessions to end", Duration::from_secs(20), || {
        let out = Command::new("pgrep")
            .args(["-P", &sshd_pid])
            .output()
            .ok()?;
        out.stdout.is_empty().then_some(())
    });
    drop(teardown);
    Ok(())
}

/// What every measurement of the path run needs.
struct Measure<'a> {
    o: &'a Args,
    rtt_ms: f64,
    net: &'a NetnsPath,
    dir: &'a TestDir,
    /// This binary (the fairness readers are `--read-for` runs of it).
    me: &'a Path,
    sshd: &'a Sshd,
    pg_password: &'a str,
}

impl Measure<'_> {
    /// `pg_basebackup` through every contender at every `--loss`, `--reps` times, alternating;
    /// one case each for the results.
    fn basebackups(
        &self,
        contenders: &mut [Contender],
        tunnels: &mut [SshTunnel],
    ) -> Result<Vec<Value>> {
        let o = self.o;
        let mut cases = Vec::new();
        let mut seed = 1000;
        for &loss in &o.loss {
            println!(
                "\n== {} ms RTT, {} Mbit/s, {loss}% random loss",
                self.rtt_ms, o.rate
            );
            for r in 0..o.reps {
                for c in contenders.iter() {
                    seed += 1;
                    let tunnel = c.ssh.map(|i| &mut tunnels[i]);
                    cases.push(self.basebackup(c, tunnel, loss, r, seed)?);
                }
                // A restarted ssh tunnel listens on a new local port.
                for c in contenders.iter_mut() {
                    if let Some(i) = c.ssh {
                        c.port = tunnels[i].local;
                    }
                }
            }
        }
        Ok(cases)
    }

    /// One `pg_basebackup -X stream` through contender `c` under its own emulator (`loss`,
    /// `seed`), stopped at the limit; the bytes sent into the path and delivered, and the
    /// emulator's counters. An `ssh -L` contender (`tunnel`) that timed out gets a new tunnel.
    fn basebackup(
        &self,
        c: &Contender,
        tunnel: Option<&mut SshTunnel>,
        loss: f64,
        rep: u32,
        seed: u64,
    ) -> Result<Value> {
        let (o, net) = (self.o, self.net);
        let emulator = Emulator::start(net, self.rtt_ms, loss, seed, o.path_timeout_secs + 300)?;
        wait_link_quiet(net)?;
        let (before, before_rx) = (net.tx_bytes_a()?, net.rx_bytes_b()?);
        let out = self.dir.join(format!("bb-{seed}"));
        let (seconds, error) = self.run_basebackup(c.port, &out)?;
        let link = net.tx_bytes_a()?.saturating_sub(before);
        let delivered = net.rx_bytes_b()?.saturating_sub(before_rx);
        if seconds.is_none() {
            if let Some(old) = tunnel {
                // Its sshd may hold megabytes for the killed session; a new client makes the
                // old connection reset instead of draining into the next.
                old.child.kill();
                let (child, local) = ssh_tunnel(
                    self.sshd,
                    Some(net.b.as_str()),
                    old.to_port,
                    false,
                    Some(&old.bind),
                )?;
                old.child = child;
                // The contender's port changes: `basebackups` patches it after the repetition.
                old.local = local;
            }
        }
        wait_link_quiet(net)?;
        let counters = emulator.stop()?;
        let _ = std::fs::remove_dir_all(&out);
        let shown = match (seconds, &error) {
            (Some(s), _) => format!("{s:.1} s"),
            (None, None) => format!("> {} s", o.path_timeout_secs),
            (None, Some(e)) => format!("failed ({e})"),
        };
        eprintln!(
            "  loss {loss}%, rep {rep}: pg_basebackup via {}: {shown}, {:.1} MB sent into \
             the path, {:.1} MB delivered; emulator {counters}",
            c.name,
            link as f64 / 1e6,
            delivered as f64 / 1e6
        );
        Ok(
            json!({"loss_percent": loss, "rep": rep, "contender": c.name,
            "seconds": seconds, "timed_out": seconds.is_none() && error.is_none(),
            "error": error, "link_bytes": link, "delivered_bytes": delivered,
        "emulator": counters}),
        )
    }

    /// Runs `pg_basebackup` from `port` into `out`, killed (with its WAL receiver) at the
    /// limit: its seconds when it finished, its error when it failed, neither when it timed out.
    fn run_basebackup(&self, port: u16, out: &Path) -> Result<(Option<f64>, Option<String>)> {
        let mut cmd = NetnsPair::command(&self.net.b, pg_bin("pg_basebackup"));
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(out)
            .args(["-X", "stream", "-c", "fast", "--no-sync"])
            .env("PGPASSWORD", self.pg_password)
            // Its own process group: with -X stream it forks a WAL receiver, which must go too
            // when the limit stops it.
            .process_group(0);
        let t = Instant::now();
        let mut bb = ChildGuard::spawn_quiet("pg_basebackup", cmd)?;
        Ok(
            match bb.wait(Duration::from_secs(self.o.path_timeout_secs)) {
                Ok(s) if s.success() => (Some(t.elapsed().as_secs_f64()), None),
                Ok(s) => (None, Some(format!("{s}: {}", bb.output().trim()))),
                Err(_) => {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", bb.pid())])
                        .status();
                    bb.kill();
                    (None, None)
                }
            },
        )
    }

    /// Fairness on the lossless path (unless `--fairness-secs 0`): pgferry BBR, pgferry CUBIC
    /// and, as the reference, kernel TCP BBR (`ssh -L`), each against a CUBIC `ssh -L` stream.
    fn fairness(
        &self,
        tunnels: &[SshTunnel],
        ferries: &[Ferry],
        stream_port: u16,
    ) -> Result<Vec<Value>> {
        let o = self.o;
        let ssh_stream = tunnels
            .iter()
            .find(|t| t.cc == "cubic" && t.to_port == stream_port)
            .context("no CUBIC ssh stream tunnel")?
            .local;
        let mut fairness = Vec::new();
        if o.fairness_secs > 0 {
            println!(
                "\n== fairness: {} ms RTT, {} Mbit/s, no loss, {} s",
                self.rtt_ms, o.rate, o.fairness_secs
            );
            let ssh_bbr_stream = tunnels
                .iter()
                .find(|t| t.cc == "bbr" && t.to_port == stream_port)
                .context("no BBR ssh stream tunnel")?
                .local;
            // Each against a CUBIC ssh -L stream; kernel TCP BBR against it is the reference.
            let mut challengers = Vec::new();
            for cc in ["bbr", "cubic"] {
                let f = ferries
                    .iter()
                    .find(|f| f.cc == cc)
                    .context("no such ferry")?;
                challengers.push((format!("pgferry {cc}"), f.stream_local));
            }
            challengers.push(("ssh -L BBR".to_string(), ssh_bbr_stream));
            for (challenger, port) in challengers {
                fairness.push(self.fairness_run(challenger, port, ssh_stream)?);
            }
        }
        Ok(fairness)
    }

    /// WAL streaming on the lossiest path (`--loss`'s largest): a standby through `ssh -L`
    /// BBR and one through each of pgferry cubic and bbr, made across a lossless path, then each under a write
    /// load aiming at 1.5× the link (or `--wal-mb-per-s`) for `--wal-secs`, lag sampled once a
    /// second. Empty with `--wal-secs 0`.
    fn wal(&self, contenders: &[Contender], pg: &PgCluster) -> Result<Vec<Value>> {
        let (o, net) = (self.o, self.net);
        if o.wal_secs == 0 {
            return Ok(Vec::new());
        }
        let loss = o.loss.iter().copied().fold(0.0, f64::max);
        let rate = o.wal_mb_per_s.unwrap_or(1.5 * f64::from(o.rate) / 8.0);
        println!(
            "\n== WAL streaming: {} ms RTT, {} Mbit/s, {loss}% random loss, load aiming at \
             {rate:.1} MB/s of WAL for {} s",
            self.rtt_ms, o.rate, o.wal_secs
        );
        // One standby at a time, made, measured and its slot dropped before the next: a slot
        // kept during another contender's load would hold that load's WAL (GBs) for a standby
        // that must then catch up across the lossy path before its own measurement.
        let mut wal = Vec::new();
        for (i, name) in ["ssh -L BBR", "pgferry cubic", "pgferry bbr"]
            .into_iter()
            .enumerate()
        {
            let c = contenders
                .iter()
                .find(|c| c.name == name)
                .with_context(|| format!("no contender {name}"))?;
            let setup = Emulator::start(net, self.rtt_ms, 0.0, 11 + i as u64, 1200)?;
            let s = crate::make_standby(self.dir.path(), &net.b, name, c.port, self.pg_password)?;
            setup.stop()?;
            let emulator = Emulator::start(net, self.rtt_ms, loss, 20 + i as u64, 1200)?;
            wait_link_quiet(net)?;
            let measured = crate::wal_lag(pg, &net.b, &s, rate, o.wal_secs);
            let counters = emulator.stop();
            let _ = pg.psql(&format!("SELECT pg_drop_replication_slot('{}')", s.slot));
            let mut row = measured?;
            row["loss_percent"] = json!(loss);
            row["emulator"] = counters?;
            wal.push(row);
        }
        Ok(wal)
    }

    /// One fairness run under its own lossless emulator: `challenger` (its stream at `port`)
    /// and the CUBIC `ssh -L` stream (`ssh_stream`) read at once for `--fairness-secs`; each
    /// flow's bytes, rate and share.
    fn fairness_run(&self, challenger: String, port: u16, ssh_stream: u16) -> Result<Value> {
        let (o, net) = (self.o, self.net);
        let emulator = Emulator::start(net, self.rtt_ms, 0.0, 7, o.fairness_secs + 300)?;
        wait_link_quiet(net)?;
        let (before, before_rx) = (net.tx_bytes_a()?, net.rx_bytes_b()?);
        let flows = [
            (challenger.clone(), port),
            ("ssh -L CUBIC".to_string(), ssh_stream),
        ];
        let rows = self.read_flows(&flows)?;
        let link = net.tx_bytes_a()?.saturating_sub(before);
        let delivered = net.rx_bytes_b()?.saturating_sub(before_rx);
        wait_link_quiet(net)?;
        let counters = emulator.stop()?;
        let total: f64 = rows.iter().map(|r| r.1).sum();
        let flows: Vec<Value> = rows
            .iter()
            .map(|(name, bytes, per_s)| {
                let mbs = bytes / 1e6 / o.fairness_secs as f64;
                eprintln!(
                    "  {name}: {mbs:.2} MB/s, {:.0}% of what both flows received",
                    100.0 * bytes / total
                );
                json!({"flow": name, "bytes": bytes, "mb_per_s": mbs,
                       "share": bytes / total, "mb_per_s_each_second": per_s})
            })
            .collect();
        Ok(json!({"challenger": challenger, "against": "ssh -L CUBIC",
            "seconds": o.fairness_secs, "flows": flows, "link_bytes": link,
            "delivered_bytes": delivered, "emulator": counters}))
    }

    /// Reads every flow (name, port) at once for `--fairness-secs`, each with its own
    /// `--read-for` process in `b`: its bytes, and bytes per second.
    fn read_flows(&self, flows: &[(String, u16)]) -> Result<Vec<(String, f64, Vec<f64>)>> {
        let o = self.o;
        let readers: Vec<ChildGuard> = flows
            .iter()
            .map(|(name, port)| {
                let mut cmd = NetnsPair::command(&self.net.b, self.me);
                cmd.args(["--read-for"])
                    .args([port.to_string(), o.fairness_secs.to_string()]);
                ChildGuard::spawn_quiet(name, cmd)
            })
            .collect::<Result<_>>()?;
        let mut rows = Vec::new();
        for ((name, _), mut reader) in flows.iter().zip(readers) {
            reader.wait(Duration::from_secs(o.fairness_secs + 60))?;
            let line = reader.wait_for_output("bytes ", Duration::from_secs(1))?;
            let mut words = line.split_whitespace();
            let bytes: f64 = words.nth(1).context("bytes")?.parse()?;
            let per_s: Vec<f64> = words
                .nth(1)
                .unwrap_or("")
                .split(',')
                .filter_map(|x| x.parse().ok())
                .collect();
            rows.push((name.clone(), bytes, per_s));
        }
        Ok(rows)
    }
}

/// Three agent pairs (one per QUIC congestion control), each on its own UDP port.
fn start_ferries(
    o: &Args,
    dir: &TestDir,
    net: &NetnsPath,
    pg_port: u16,
    stream_port: u16,
) -> Result<Vec<Ferry>> {
    let certs = pgferry_tests::certs::Certs::make_for(&dir.join("certs"), "bench")?;
    let addr_a = &net.addr_a;
    let mut ferries = Vec::new();
    for cc in QUIC_CCS {
        let (udp, pg_local, stream_local) = (free_udp_port(), free_tcp_port(), free_tcp_port());
        let home = dir.join(format!("ferry-{cc}"));
        std::fs::create_dir_all(&home)?;
        let config = |role: &str| home.join(format!("{role}.toml"));
        std::fs::write(
            config("source"),
            format!(
                "[network]\nlisten = \"{addr_a}:{udp}\"\n[[service]]\nname = \"postgres\"\n\
                 upstream = \"127.0.0.1:{pg_port}\"\n[[service]]\nname = \"stream\"\n\
                 upstream = \"127.0.0.1:{stream_port}\"\n"
            ),
        )?;
        std::fs::write(
            config("target"),
            format!(
                "[network]\nconnect = \"{addr_a}:{udp}\"\nserver_name = \"localhost\"\n\
                 [[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{pg_local}\"\n\
                 [[service]]\nname = \"stream\"\nlocal = \"127.0.0.1:{stream_local}\"\n"
            ),
        )?;
        let agent = |role: &str, ns: &str| -> Result<ChildGuard> {
            let mut cmd = NetnsPair::command(ns, bin_path(&format!("pgferry-{role}")));
            cmd.arg("run")
                .arg("--config")
                .arg(config(role))
                .args(certs.tls_args(role))
                .arg("--audit-log")
                // One directory per pair: the target's admin socket sits beside its audit log.
                .arg(home.join(format!("{role}.audit.jsonl")))
                .arg("--compression-level")
                .arg(o.level.to_string())
                .args(["--congestion-control", cc]);
            ChildGuard::spawn_quiet(&format!("{role}-{cc}"), cmd)
        };
        let source = agent("source", &net.a)?;
        source.wait_for_output("listening on", Duration::from_secs(30))?;
        let target = agent("target", &net.b)?;
        target.wait_for_output("tunnel up", Duration::from_secs(30))?;
        ferries.push(Ferry {
            cc,
            pg_local,
            stream_local,
            source,
            _target: target,
        });
    }
    Ok(ferries)
}

fn write_results(results: &Value, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let json_path = out.join("path-run.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")?;
    let md = markdown(results);
    std::fs::write(out.join("path-run.md"), &md)?;
    println!("\n{md}");
    println!("written: {} and path-run.md", json_path.display());
    let written: Vec<PathBuf> = charts::render(results, out).with_context(|| {
        format!(
            "results are written, the charts are not (retry with --charts-from {})",
            json_path.display()
        )
    })?;
    for p in written {
        println!("chart: {}", p.display());
    }
    Ok(())
}

/// Median seconds of a contender at a loss, `None` if any repetition did not finish.
fn median_secs(r: &Value, loss: f64, contender: &str) -> Option<f64> {
    let mut v: Vec<f64> = Vec::new();
    for c in cases(r, loss, contender) {
        v.push(c["seconds"].as_f64()?);
    }
    (!v.is_empty()).then(|| crate::median(v))
}

fn cases<'a>(r: &'a Value, loss: f64, contender: &'a str) -> impl Iterator<Item = &'a Value> {
    r["basebackup"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |c| c["loss_percent"].as_f64() == Some(loss) && c["contender"] == contender)
}

/// Losses and contenders in the order they ran.
pub fn losses_and_contenders(r: &Value) -> (Vec<f64>, Vec<String>) {
    let (mut losses, mut names) = (Vec::new(), Vec::new());
    for c in r["basebackup"].as_array().into_iter().flatten() {
        if let Some(l) = c["loss_percent"].as_f64() {
            if !losses.contains(&l) {
                losses.push(l);
            }
        }
        if let Some(n) = c["contender"].as_str() {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    (losses, names)
}

/// `path-run.md`: what ran where, then the tables of times, measurements and fairness.
fn markdown(r: &Value) -> String {
    let p = &r["path"];
    let limit = r["limit_s"].as_u64().unwrap_or(0);
    let mut s = format!(
        "pgferry-bench path cases, {}: {} cores (load average over 1 min at the start {}, at the \
         end {}), {} \
         repetition(s), {} ms RTT, {} Mbit/s (tc tbf), random loss each way; database {:.0} MB, \
         zstd -3 ratio of its files {:.2}; each measurement stopped after {limit} s\n",
        r["when"].as_str().unwrap_or("?"),
        r["cores"],
        r["load_average_1min"]["start"],
        r["load_average_1min"]["end"],
        r["reps"],
        p["rtt_ms"],
        p["rate_mbit"],
        r["dataset"]["database_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        r["dataset"]["zstd3_ratio_of_files"].as_f64().unwrap_or(0.0)
    );
    s.push_str(&format!(
        "\nPath check without pgferry: ping {}. ssh -L congestion control per route, as `ss -ti` \
         showed it: {}. The emulator (Python, AF_PACKET) restarts for every measurement; its \
         counters are in the second table (frames, both directions).\n",
        r["ping_rtt"].as_str().unwrap_or("?"),
        r["ssh_congestion_control_check"]
    ));
    s.push_str(&median_table(r, limit));
    s.push_str(&measurements_table(r, limit));
    s.push_str(&fairness_table(r));
    s.push_str(&wal_table(r));
    s.push_str(&crate::tunnel_lines(
        r,
        "Each pgferry pair's tunnel at the end of the run (by congestion control), as its source \
         agent logged it",
    ));
    s
}

/// The WAL part: each standby's lag under the write load on the lossy path.
fn wal_table(r: &Value) -> String {
    let Some(rows) = r["wal"].as_array().filter(|w| !w.is_empty()) else {
        return String::new();
    };
    let mut s = format!(
        "\n### WAL streaming under a write load, {}% random loss\n\n| via | WAL written (MB/s) | \
         lag p99 (s) | max lag (MB) | drain after the load (s) | dropped (random) |\n\
         |---|---:|---:|---:|---:|---:|\n",
        rows[0]["loss_percent"]
    );
    for x in rows {
        s.push_str(&format!(
            "{} {} |\n",
            crate::wal_row(x),
            x["emulator"]["dropped_random"]
        ));
    }
    s
}

/// The base backups' median time per loss and contender, and the best pgferry's against
/// `ssh -L` BBR.
fn median_table(r: &Value, limit: u64) -> String {
    let mut s = String::new();
    let (losses, names) = losses_and_contenders(r);
    let shown = |v: Option<f64>| v.map_or(format!("> {limit} s"), |x| format!("{x:.1} s"));
    s.push_str("\n### pg_basebackup -X stream, time (median)\n\n| loss |");
    for n in &names {
        s.push_str(&format!(" {n} |"));
    }
    s.push_str(" best pgferry / ssh -L BBR |\n|---|");
    for _ in &names {
        s.push_str("---:|");
    }
    s.push_str("---:|\n");
    for &l in &losses {
        s.push_str(&format!("| {l}% |"));
        for n in &names {
            s.push_str(&format!(" {} |", shown(median_secs(r, l, n))));
        }
        let best = names
            .iter()
            .filter(|n| n.starts_with("pgferry"))
            .filter_map(|n| median_secs(r, l, n))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
        let ratio = best
            .zip(median_secs(r, l, "ssh -L BBR"))
            .map_or("–".to_string(), |(a, b)| format!("{:.2}", a / b));
        s.push_str(&format!(" {ratio} |\n"));
    }
    s
}

/// Every base backup in the order run, with the emulator's counters.
fn measurements_table(r: &Value, limit: u64) -> String {
    let mut s = String::new();
    s.push_str(
        "\n### Every measurement (in the order run), with the emulator's counters\n\n\
         | loss | contender | time | MB sent into the path | MB delivered | frames forwarded | \
         dropped (random) | not accepted by the rate limiter |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in r["basebackup"].as_array().into_iter().flatten() {
        let e = &c["emulator"];
        let time = match (c["seconds"].as_f64(), c["error"].as_str()) {
            (Some(x), _) => format!("{x:.1} s"),
            (None, Some(err)) => format!("failed: {err}"),
            (None, None) => format!("> {limit} s"),
        };
        s.push_str(&format!(
            "| {}% | {} | {time} | {:.1} | {:.1} | {} | {} | {} |\n",
            c["loss_percent"],
            c["contender"].as_str().unwrap_or("?"),
            c["link_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            c["delivered_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            e["forwarded"],
            e["dropped_random"],
            e["not_accepted_by_link"]
        ));
    }
    s
}

/// Each fairness run's flows and their shares (nothing when there was no fairness check).
fn fairness_table(r: &Value) -> String {
    let mut s = String::new();
    if let Some(f) = r["fairness"].as_array().filter(|f| !f.is_empty()) {
        s.push_str(
            "\n### Fairness: two flows at once on the lossless path (incompressible bytes)\n\n\
             | run | flow | MB/s | share | MB sent into the path / delivered (both flows) | \
             frames forwarded / not accepted by the rate limiter |\n|---|---|---:|---:|---:|---:|\n",
        );
        for run in f {
            for flow in run["flows"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "| {} vs {}, {} s | {} | {:.2} | {:.0}% | {:.0} / {:.0} | {} / {} |\n",
                    run["challenger"].as_str().unwrap_or("?"),
                    run["against"].as_str().unwrap_or("?"),
                    run["seconds"],
                    flow["flow"].as_str().unwrap_or("?"),
                    flow["mb_per_s"].as_f64().unwrap_or(0.0),
                    100.0 * flow["share"].as_f64().unwrap_or(0.0),
                    run["link_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    run["delivered_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    run["emulator"]["forwarded"],
                    run["emulator"]["not_accepted_by_link"]
                ));
            }
        }
    }
    s
}
