//! `pgferry-bench`: pgferry beside direct TCP and `ssh -L`, between two network namespaces
//! joined by a veth pair (the source cluster, `pgferry-source` and `sshd` in one; the target
//! side in the other), first on an unlimited link (the CPU is the bound), then limited with
//! `tc tbf` to 1 Gbit/s (`--fast-rate`) and to 100 Mbit/s (`--rate`). In one run, alternating
//! contenders, `--reps` times each, medians reported:
//!
//! 1. `pg_basebackup -X stream` (plain) of a mixed sample database: time and bytes on the link;
//!    direct TCP (insecure baseline), `ssh -L`, `ssh -C -L`, `--compress=server-zstd` through
//!    `ssh -L`, and pgferry.
//! 2. Raw tunnel throughput, one stream and 8 streams, and CPU seconds per GB (both ends of
//!    the tunnel: the two agents, or ssh and sshd), beside `ssh -L` and direct TCP.
//!
//! Writes `results.json`, `results.md` and PNG charts (`charts.rs`) to `--out`, and checks the
//! goals of issue 16; `--charts-from FILE` redraws the charts of an existing results JSON.
//!
//! `--rtt-ms MS` runs the path cases instead (`path.rs`): an emulated WAN path with delay,
//! random loss and a rate limit, where `ssh -L` (CUBIC and BBR) and pgferry (each QUIC
//! congestion control) copy a base backup, and a fairness check against a TCP flow.
//! Needs root, PostgreSQL 15, OpenSSH and iproute2: `bench/run` installs them and runs this.

mod charts;
mod path;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use pgferry_tests::{
    as_postgres, bin_path, chown_postgres, command_output, free_tcp_port, free_udp_port,
    load_sample_data, pg_bin, ChildGuard, NetnsPair, PgCluster, TestDir,
};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "pgferry-bench",
    about = "pg_basebackup and raw streams through pgferry beside direct TCP and ssh -L, on an \
             unlimited and a rate-limited link between two network namespaces (run as root; \
             `bench/run` installs what it needs)"
)]
struct Args {
    /// Repetitions of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Size of the sample database in MB (mixed text, JSON, numbers, timestamps, ids, bytes).
    #[arg(long, default_value_t = 800)]
    megabytes: u32,
    /// Rate of the limited link in Mbit/s (0: only the unlimited link).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Rate of the fast link in Mbit/s (the seed's 400 GB example: 1 Gbit/s; 0: skip it).
    #[arg(long, default_value_t = 1000)]
    fast_rate: u32,
    /// MiB per raw-stream measurement on the unlimited link.
    #[arg(long, default_value_t = 1024)]
    stream_mb: usize,
    /// MiB per raw-stream measurement on the limited link.
    #[arg(long, default_value_t = 96)]
    limited_stream_mb: usize,
    /// pgferry's zstd level.
    #[arg(long, default_value_t = 3)]
    level: u32,
    /// Seconds of write load for the WAL-lag measurement on the limited link, and on the
    /// lossiest path of the path cases (0: skip it).
    #[arg(long, default_value_t = 60)]
    wal_secs: u64,
    /// WAL the write load aims at, MB/s (default: twice the limited link's capacity; 1.5× the
    /// path's in the path cases).
    #[arg(long)]
    wal_mb_per_s: Option<f64>,
    /// Which contenders to run (comma-separated): direct, ssh, ssh-c, server-zstd, pgferry.
    /// Raw streams and the WAL part run for ssh and pgferry when selected.
    #[arg(long, value_delimiter = ',', default_value = "direct,ssh,ssh-c,server-zstd,pgferry",
          value_parser = ["direct", "ssh", "ssh-c", "server-zstd", "pgferry"])]
    contenders: Vec<String>,
    /// Which links to measure (comma-separated): unlimited, fast (`--fast-rate`), limited
    /// (`--rate`); they run in that order, and the WAL part on the limited link.
    #[arg(long, value_delimiter = ',', default_value = "unlimited,fast,limited",
          value_parser = ["unlimited", "fast", "limited"])]
    links: Vec<String>,
    /// Directory for results.json, results.md and the PNG charts.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only draw the PNG charts of an existing results JSON into its directory, then exit
    /// (no root needed).
    #[arg(long, value_name = "FILE")]
    charts_from: Option<PathBuf>,
    /// Path cases instead of the links above: an emulated WAN path with this round-trip time
    /// (bench/wan-emulator.py in a middle namespace, `--rate` Mbit/s with tc tbf), base backups
    /// through ssh -L (CUBIC, BBR) and pgferry (cubic, bbr, newreno), and a fairness check.
    /// Writes path-run.{json,md,png}.
    #[arg(long, value_name = "MS")]
    rtt_ms: Option<f64>,
    /// Random loss of the path cases, percent per frame each way (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "0.1,1")]
    loss: Vec<f64>,
    /// Path cases: stop a base backup after this many seconds (reported as "> N s").
    #[arg(long, default_value_t = 400)]
    path_timeout_secs: u64,
    /// Path cases: seconds of the fairness check (pgferry and a TCP flow at once; 0: skip).
    #[arg(long, default_value_t = 30)]
    fairness_secs: u64,
    /// (internal) serve streams of mixed data on a loopback port.
    #[arg(long, hide = true)]
    serve_stream: bool,
    /// (internal) with --serve-stream: serve incompressible bytes.
    #[arg(long, hide = true)]
    incompressible: bool,
    /// (internal) read PORT SECS from the stream server for SECS seconds, print the bytes.
    #[arg(long, hide = true, num_args = 2)]
    read_for: Option<Vec<u64>>,
    /// (internal) read PORT BYTES CONNS from the stream server, print MB/s.
    #[arg(long, hide = true, num_args = 3)]
    read_stream: Option<Vec<usize>>,
}

fn main() {
    let args = Args::parse();
    if args.serve_stream {
        let data = if args.incompressible {
            incompressible_payload()
        } else {
            payload()
        };
        let port = stream_server(data);
        println!("port {port}");
        loop {
            std::thread::park();
        }
    }
    if let Some(r) = &args.read_stream {
        match read_streams(r[0] as u16, r[1], r[2]) {
            Ok(mbs) => println!("MBps {mbs}"),
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(1)
            }
        }
        return;
    }
    if let Some(r) = &args.read_for {
        match read_for(r[0] as u16, Duration::from_secs(r[1])) {
            Ok((bytes, per_s)) => println!("bytes {bytes} per_second {per_s}"),
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(1)
            }
        }
        return;
    }
    if let Some(file) = &args.charts_from {
        match charts::render_from(file) {
            Ok(written) => print_charts(&written),
            Err(e) => {
                eprintln!("pgferry-bench: error: {e:#}");
                std::process::exit(1)
            }
        }
        return;
    }
    let result = if args.rtt_ms.is_some() {
        path::run(&args)
    } else {
        run(&args)
    };
    if let Err(e) = result {
        eprintln!("pgferry-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Serves mixed data: each connection first sends the number of bytes it wants (u64 BE).
fn stream_server(data: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let data = std::sync::Arc::new(data);
    std::thread::spawn(move || {
        for c in l.incoming().take(100_000) {
            let Ok(mut c) = c else { continue };
            let data = data.clone();
            std::thread::spawn(move || {
                let mut want = [0u8; 8];
                if c.read_exact(&mut want).is_err() {
                    return;
                }
                let want = (u64::from_be_bytes(want) as usize).min(64 << 30);
                let mut sent = 0;
                while sent < want {
                    let n = data.len().min(want - sent);
                    if c.write_all(&data[..n]).is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    port
}

/// Reads `bytes` in all over `conns` parallel connections; MB/s.
fn read_streams(port: u16, bytes: usize, conns: usize) -> Result<f64> {
    let each = bytes / conns.max(1);
    let t = Instant::now();
    let handles: Vec<_> = (0..conns.max(1))
        .map(|_| {
            std::thread::spawn(move || -> Result<usize> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.write_all(&(each as u64).to_be_bytes())?;
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0usize;
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                ensure!(total == each, "received {total} of {each} bytes");
                Ok(total)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    Ok(total as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// Reads one stream for `secs`; the bytes received, and MB received in each second
/// (comma-separated).
fn read_for(port: u16, secs: Duration) -> Result<(u64, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(&(64u64 << 30).to_be_bytes())?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut total, mut this_second) = (0u64, 0u64);
    let mut per_s = Vec::new();
    let start = Instant::now();
    let mut next = Duration::from_secs(1);
    while start.elapsed() < secs {
        match s.read(&mut buf) {
            Ok(0) => anyhow::bail!("the stream ended after {total} bytes"),
            Ok(n) => {
                total += n as u64;
                this_second += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        if start.elapsed() >= next {
            per_s.push(format!("{:.2}", this_second as f64 / 1e6));
            this_second = 0;
            next += Duration::from_secs(1);
        }
    }
    Ok((total, per_s.join(",")))
}

/// 64 MiB of pseudo-random bytes: what no compressor shrinks (pgferry sends it RAW, so its
/// bytes on the link are about the bytes read, as ssh's are).
fn incompressible_payload() -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::with_capacity(64 << 20);
    while out.len() < 64 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// CPU seconds (user + system) used so far by these processes.
fn cpu_secs(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, sy): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
            Some((u + sy) / tick)
        })
        .sum()
}

/// PIDs of processes whose command name is one of `names`.
fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| names.contains(&c.trim()))
        })
        .collect()
}

/// zstd -3 ratio of the database's own files, cut into 1 MiB chunks as pgferry does.
/// Loads the mixed sample data, checkpoints, and prints its size and the zstd -3 ratio of its
/// files; returns both.
fn load_dataset(pg: &PgCluster, megabytes: u32) -> Result<(u64, f64)> {
    let t = Instant::now();
    load_sample_data(pg, megabytes)?;
    pg.psql("CHECKPOINT")?;
    let db_bytes: u64 = pg.psql("SELECT pg_database_size('postgres')")?.parse()?;
    let ratio = dataset_ratio(&pg.datadir)?;
    println!(
        "dataset: {:.0} MB (loaded in {:.0} s), zstd -3 ratio of its files {ratio:.2}",
        db_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok((db_bytes, ratio))
}

fn dataset_ratio(datadir: &Path) -> Result<f64> {
    let (mut raw, mut packed) = (0usize, 0usize);
    let mut files: Vec<PathBuf> = Vec::new();
    for db in std::fs::read_dir(datadir.join("base"))? {
        for f in std::fs::read_dir(db?.path())? {
            files.push(f?.path());
        }
    }
    files.sort();
    for f in files {
        if raw > 1 << 30 {
            break;
        }
        let data = std::fs::read(&f)?;
        for chunk in data.chunks(1 << 20) {
            raw += chunk.len();
            packed += zstd::bulk::compress(chunk, 3)?.len().min(chunk.len());
        }
    }
    ensure!(packed > 0, "no data files under {}", datadir.display());
    Ok(raw as f64 / packed as f64)
}
/// Mixed data: words from a vocabulary, numbers, timestamps, hex ids, some random bytes.
fn payload() -> Vec<u8> {
    let words = [
        "ferry",
        "harbour",
        "north",
        "cargo",
        "tide",
        "ledger",
        "invoice",
        "customer",
        "shipment",
        "delayed",
        "berth",
        "crane",
        "manifest",
        "route",
        "weather",
        "pilot",
        "anchor",
        "port",
        "customs",
        "pallet",
        "container",
        "draft",
        "vessel",
        "quay",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(64 << 20);
    let mut id = 0u64;
    while out.len() < 64 << 20 {
        id += 1;
        let r = next();
        let _ = write!(
            out,
            "{id}\t{:016x}{:016x}\t{}.{:02}\t2026-{:02}-{:02} {:02}:{:02}:{:02}+00\t{{\"user\": {}, \"tags\": [\"{}\", \"{}\"], \"note\": \"",
            r,
            next(),
            r % 100_000,
            r % 100,
            1 + r % 12,
            1 + r % 28,
            r % 24,
            r % 60,
            (r >> 8) % 60,
            r % 9973,
            words[(r % 24) as usize],
            words[((r >> 5) % 24) as usize]
        );
        for i in 0..(4 + r % 10) {
            out.extend_from_slice(words[((r >> (i * 3)) % 24) as usize].as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(b"\"}\t\\\\x");
        for _ in 0..3 {
            let _ = write!(out, "{:016x}", next());
        }
        out.push(b'\n');
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A command in namespace `ns` (or here).
fn cmd_in(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => NetnsPair::command(ns, program),
        None => Command::new(program),
    }
}

struct Sshd {
    server: ChildGuard,
    port: u16,
    addr: String,
    key: std::path::PathBuf,
}

impl Sshd {
    fn pid(&self) -> u32 {
        self.server.pid()
    }
}

/// sshd on the source side, listening on `addr`. Sessions whose client vanished without a word
/// (its namespace deleted) end after 30 s of unanswered keepalives.
fn start_sshd(dir: &Path, ns: Option<&str>, addr: &str) -> Result<Sshd> {
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    let host_key = dir.join("host_key");
    let key = dir.join("client_key");
    for k in [&host_key, &key] {
        command_output(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k),
        )?;
    }
    let auth = dir.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &auth)?;
    let port = free_tcp_port();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress {addr}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin yes\n\
             PasswordAuthentication no\nUsePAM no\nPidFile {}\nStrictModes no\n\
             ClientAliveInterval 10\nClientAliveCountMax 3\n",
            host_key.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let mut cmd = cmd_in(ns, "/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    let server = ChildGuard::spawn_quiet("sshd", cmd)?;
    server.wait_for_output("Server listening on", Duration::from_secs(10))?;
    Ok(Sshd {
        server,
        port,
        addr: addr.to_string(),
        key,
    })
}

/// `ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:TO_PORT` from the target side.
fn ssh_tunnel(
    sshd: &Sshd,
    ns: Option<&str>,
    to_port: u16,
    compress: bool,
    bind: Option<&str>,
) -> Result<(ChildGuard, u16)> {
    let local = free_tcp_port();
    let mut cmd = cmd_in(ns, "ssh");
    cmd.args([
        "-v",
        "-N",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-i",
    ])
    .arg(&sshd.key);
    if compress {
        cmd.arg("-C");
    }
    if let Some(addr) = bind {
        // The source address picks the route, and with it the congestion control, on the
        // sshd side (see `NetnsPath::route_congctl`).
        cmd.args(["-b", addr]);
    }
    cmd.args([
        "-p",
        &sshd.port.to_string(),
        "-L",
        &format!("127.0.0.1:{local}:127.0.0.1:{to_port}"),
        &format!("root@{}", sshd.addr),
    ]);
    let child = ChildGuard::spawn_quiet("ssh", cmd)?;
    child.wait_for_output("Entering interactive session", Duration::from_secs(15))?;
    Ok((child, local))
}

/// Bytes sent by the source side's veth end (what crossed the link towards the target).
fn link_bytes(net: Option<&pgferry_tests::NetnsPair>) -> u64 {
    let Some(n) = net else { return 0 };
    let out = Command::new("ip")
        .args(["-n", &n.a, "-s", "-j", "link", "show"])
        .output()
        .ok();
    let Some(out) = out else { return 0 };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifname"].as_str().is_some_and(|n| n != "lo"))
        .map(|l| l["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// One contender of the base-backup comparison.
struct Backup {
    key: &'static str,
    name: &'static str,
    host: String,
    port: u16,
    extra: &'static [&'static str],
}

/// One contender of the raw-stream comparison: where to read, and whose CPU to count.
struct Stream {
    key: &'static str,
    name: &'static str,
    port: u16,
    cpu: fn(&Procs) -> Vec<u32>,
}

struct Procs {
    agents: Vec<u32>,
}

/// The link benchmark: sets up both namespaces, PostgreSQL, the agents and sshd, measures every
/// chosen link (then WAL streaming on the limited one), and writes the results.
fn run(o: &Args) -> Result<()> {
    let dir = TestDir::new()?;
    let net = NetnsPair::create("pgfbench")?.context(
        "network namespaces cannot be created here (run as root with iproute2 installed)",
    )?;
    let (ns_a, ns_b) = (Some(net.a.as_str()), Some(net.b.as_str()));
    let addr_a = net.addr_a.clone();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "pgferry-bench: two namespaces, veth; {} repetitions each (medians); {cores} cores; pgferry zstd level {}",
        o.reps, o.level
    );

    // Source side: PostgreSQL (also on the veth address, for the direct-TCP baseline), the
    // stream server, pgferry-source, sshd.
    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("pg"), pg_port)?.with_netns(&net.a);
    pg.allow_from(&addr_a, &format!("{}/32", net.addr_b))?;
    pg.start()?;
    let (db_bytes, ratio) = load_dataset(&pg, o.megabytes)?;
    let me = std::env::current_exe()?;
    let (_server, stream_port) = start_stream_server(ns_a, &me, false)?;
    let sample = payload();
    let stream_ratio = sample.len() as f64 / zstd::bulk::compress(&sample, 3)?.len() as f64;

    let agents = start_agents(o, &dir, &net, pg_port, stream_port)?;
    let procs = Procs {
        agents: vec![agents.source.pid(), agents.target.pid()],
    };

    let sshd = start_sshd(&dir.join("ssh"), ns_a, &addr_a)?;
    let (_ssh_stream, ssh_stream_port) = ssh_tunnel(&sshd, ns_b, stream_port, false, None)?;
    let (_ssh_pg, ssh_pg_port) = ssh_tunnel(&sshd, ns_b, pg_port, false, None)?;
    let (_sshc_pg, sshc_pg_port) = ssh_tunnel(&sshd, ns_b, pg_port, true, None)?;
    let ports = Ports {
        direct_pg: pg_port,
        ssh_pg: ssh_pg_port,
        sshc_pg: sshc_pg_port,
        pgferry_pg: agents.pg_local,
        ssh_stream: ssh_stream_port,
        pgferry_stream: agents.stream_local,
    };
    let (backups, streams) = contenders(o, &addr_a, &ports);

    // Standbys for the WAL-lag part, made now while the link is fast (each with its own slot).
    let wal_part = o.wal_secs > 0 && o.rate > 0 && o.links.iter().any(|l| l == "limited");
    let standbys = if wal_part {
        make_standbys(&dir, &net.b, &backups, &pg.password)?
    } else {
        Vec::new()
    };
    let bench = LinkBench {
        o,
        net: &net,
        dir: &dir,
        me: &me,
        pg_password: &pg.password,
        backups: &backups,
        streams: &streams,
        procs: &procs,
    };
    let mut links = Vec::new();
    for (label, rate, stream_mb) in link_modes(o) {
        links.push(bench.measure(label, rate, stream_mb)?);
    }
    // WAL streaming on the limited link (still limited after the loop above).
    let wal = if wal_part {
        measure_wal(o, &pg, &net.b, &standbys)?
    } else {
        Vec::new()
    };
    // The agents' own output (set PGFERRY_LOG=pgferry_common::runtime::pump=debug to see the
    // compression level decisions), for looking into a run.
    std::fs::create_dir_all(&o.out)?;
    let mut agents = agents;
    let tunnel_closed = stop_agents(
        &mut [
            ("target", &mut agents.target),
            ("source", &mut agents.source),
        ],
        &o.out,
        "agent-",
    )?;
    pg.stop()?;

    let results = json!({
        "when": std::process::Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ").output().ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        "cores": cores,
        "reps": o.reps,
        "zstd_level": o.level,
        "dataset": {"database_bytes": db_bytes, "zstd3_ratio_of_files": ratio, "stream_payload_zstd3_ratio": stream_ratio},
        "links": links,
        "wal": wal,
        "tunnel_closed": tunnel_closed,
    });
    write_results(results, &o.out)
}

/// Stops the agents (SIGTERM: each closes its tunnel and logs what the path was like), writes
/// each one's output to `out`/`<prefix><name>.log`, and returns each one's "tunnel … closed"
/// line (MTU, RTT, loss, datagrams per send and receive), by name.
fn stop_agents(agents: &mut [(&str, &mut ChildGuard)], out: &Path, prefix: &str) -> Result<Value> {
    let mut closed = serde_json::Map::new();
    for (name, agent) in agents.iter_mut() {
        let _ = agent.terminate(Duration::from_secs(15));
        let output = agent.output();
        std::fs::write(out.join(format!("{prefix}{name}.log")), &output)?;
        let mut lines = Vec::new();
        for marker in ["UDP ", "tunnel with "] {
            if let Some(line) = output.lines().rev().find(|l| l.contains(marker)) {
                let at = line.find(marker).unwrap_or(0);
                lines.push(line[at..].to_string());
            }
        }
        if !lines.is_empty() {
            closed.insert(name.to_string(), json!(lines.join("; ")));
        }
    }
    Ok(Value::Object(closed))
}

/// Standbys for the WAL-lag part, on the same tunnels as the base backups of ssh -L and
/// pgferry (when chosen), each with its own slot.
fn make_standbys(
    dir: &TestDir,
    ns_b: &str,
    backups: &[Backup],
    password: &str,
) -> Result<Vec<WalStandby>> {
    let mut standbys = Vec::new();
    for b in backups
        .iter()
        .filter(|b| ["ssh", "pgferry"].contains(&b.key))
    {
        standbys.push(make_standby(dir.path(), ns_b, b.name, b.port, password)?);
    }
    Ok(standbys)
}

/// The WAL-lag part on the limited link: each standby under a write load (`--wal-mb-per-s`,
/// default twice the link's capacity) for `--wal-secs`; then the standbys' slots are dropped.
fn measure_wal(
    o: &Args,
    pg: &PgCluster,
    ns_b: &str,
    standbys: &[WalStandby],
) -> Result<Vec<Value>> {
    let mut wal = Vec::new();
    let rate = o.wal_mb_per_s.unwrap_or(2.0 * f64::from(o.rate) / 8.0);
    println!(
        "\n== WAL streaming at {} Mbit/s, load aiming at {rate:.1} MB/s of WAL for {} s",
        o.rate, o.wal_secs
    );
    for s in standbys {
        wal.push(wal_lag(pg, ns_b, s, rate, o.wal_secs)?);
    }
    for s in standbys {
        let _ = pg.psql(&format!("SELECT pg_drop_replication_slot('{}')", s.slot));
    }
    Ok(wal)
}

/// The stream server (this binary with `--serve-stream`, serving incompressible bytes if
/// asked) in namespace `ns`, and the port it listens on.
fn start_stream_server(
    ns: Option<&str>,
    me: &Path,
    incompressible: bool,
) -> Result<(ChildGuard, u16)> {
    let mut server = cmd_in(ns, me);
    server.arg("--serve-stream");
    if incompressible {
        server.arg("--incompressible");
    }
    let server = ChildGuard::spawn_quiet("stream-server", server)?;
    let stream_port: u16 = server
        .wait_for_output("port ", Duration::from_secs(20))?
        .trim()
        .trim_start_matches("port ")
        .parse()?;
    Ok((server, stream_port))
}

/// The pgferry pair of the link benchmark and its local ports in `b`.
struct Agents {
    source: ChildGuard,
    target: ChildGuard,
    pg_local: u16,
    stream_local: u16,
}

/// pgferry-source in `a` (PostgreSQL and the stream server as services) and pgferry-target in
/// `b`, once the tunnel is up.
fn start_agents(
    o: &Args,
    dir: &TestDir,
    net: &NetnsPair,
    pg_port: u16,
    stream_port: u16,
) -> Result<Agents> {
    let addr_a = &net.addr_a;
    let certs = pgferry_tests::certs::Certs::make_for(&dir.join("certs"), "bench")?;
    let (udp, pg_local, stream_local) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    std::fs::write(
        dir.join("source.toml"),
        format!(
            "[network]\nlisten = \"{addr_a}:{udp}\"\n[[service]]\nname = \"postgres\"\nupstream = \"127.0.0.1:{pg_port}\"\n\
             [[service]]\nname = \"stream\"\nupstream = \"127.0.0.1:{stream_port}\"\n"
        ),
    )?;
    std::fs::write(
        dir.join("target.toml"),
        format!(
            "[network]\nconnect = \"{addr_a}:{udp}\"\nserver_name = \"localhost\"\n[[service]]\nname = \"postgres\"\n\
             local = \"127.0.0.1:{pg_local}\"\n[[service]]\nname = \"stream\"\nlocal = \"127.0.0.1:{stream_local}\"\n"
        ),
    )?;
    let agent = |role: &str, ns: Option<&str>| -> Result<ChildGuard> {
        let mut cmd = cmd_in(ns, bin_path(&format!("pgferry-{role}")));
        cmd.arg("run")
            .arg("--config")
            .arg(dir.join(format!("{role}.toml")))
            .args(certs.tls_args(role))
            .arg("--audit-log")
            .arg(dir.join(format!("{role}.audit.jsonl")))
            .arg("--compression-level")
            .arg(o.level.to_string());
        ChildGuard::spawn_quiet(role, cmd)
    };
    let source = agent("source", Some(net.a.as_str()))?;
    source.wait_for_output("listening on", Duration::from_secs(30))?;
    let target = agent("target", Some(net.b.as_str()))?;
    target.wait_for_output("tunnel up", Duration::from_secs(30))?;
    Ok(Agents {
        source,
        target,
        pg_local,
        stream_local,
    })
}

/// Where each contender listens: PostgreSQL on the veth address (direct TCP), and the local
/// ends in `b` of the ssh tunnels and of pgferry.
struct Ports {
    direct_pg: u16,
    ssh_pg: u16,
    sshc_pg: u16,
    pgferry_pg: u16,
    ssh_stream: u16,
    pgferry_stream: u16,
}

/// The chosen (`--contenders`) contenders of the base backups and of the raw streams. Raw
/// streams compare ssh -L and pgferry (direct TCP is the base-backup baseline).
fn contenders(o: &Args, addr_a: &str, ports: &Ports) -> (Vec<Backup>, Vec<Stream>) {
    let chosen = |key: &str| o.contenders.iter().any(|c| c == key);
    let mut backups = vec![
        Backup {
            key: "direct",
            name: "direct TCP",
            host: addr_a.to_string(),
            port: ports.direct_pg,
            extra: &[],
        },
        Backup {
            key: "ssh",
            name: "ssh -L",
            host: "127.0.0.1".into(),
            port: ports.ssh_pg,
            extra: &[],
        },
        Backup {
            key: "ssh-c",
            name: "ssh -C -L",
            host: "127.0.0.1".into(),
            port: ports.sshc_pg,
            extra: &[],
        },
        Backup {
            key: "server-zstd",
            name: "server-zstd via ssh -L",
            host: "127.0.0.1".into(),
            port: ports.ssh_pg,
            extra: &["--compress=server-zstd"],
        },
        Backup {
            key: "pgferry",
            name: "pgferry",
            host: "127.0.0.1".into(),
            port: ports.pgferry_pg,
            extra: &[],
        },
    ];
    backups.retain(|b| chosen(b.key));
    let mut streams = vec![
        Stream {
            key: "ssh",
            name: "ssh -L",
            port: ports.ssh_stream,
            cpu: |_| pids_named(&["ssh", "sshd", "sshd-session"]),
        },
        Stream {
            key: "pgferry",
            name: "pgferry",
            port: ports.pgferry_stream,
            cpu: |p| p.agents.clone(),
        },
    ];
    streams.retain(|s| chosen(s.key));
    (backups, streams)
}

/// The links to measure (`--links`): label, rate in Mbit/s (0: unlimited), MiB per raw-stream
/// measurement.
fn link_modes(o: &Args) -> Vec<(&'static str, u32, usize)> {
    let mut modes = Vec::new();
    if o.links.iter().any(|l| l == "unlimited") {
        modes.push(("unlimited", 0u32, o.stream_mb));
    }
    if o.fast_rate > 0 && o.links.iter().any(|l| l == "fast") {
        modes.push(("fast", o.fast_rate, (o.stream_mb / 2).max(1)));
    }
    if o.rate > 0 && o.links.iter().any(|l| l == "limited") {
        modes.push(("limited", o.rate, o.limited_stream_mb));
    }
    modes
}

/// What the measurements of one link need.
struct LinkBench<'a> {
    o: &'a Args,
    net: &'a NetnsPair,
    dir: &'a TestDir,
    /// This binary (the stream readers are `--read-stream` runs of it).
    me: &'a Path,
    pg_password: &'a str,
    backups: &'a [Backup],
    streams: &'a [Stream],
    procs: &'a Procs,
}

impl LinkBench<'_> {
    /// One link (`rate` Mbit/s with tc tbf, 0: unlimited): `--reps` rounds of raw streams (1
    /// and 8 at once, `stream_mb` MiB each) and base backups, every contender in turn; the
    /// link's results with medians.
    fn measure(&self, label: &str, rate: u32, stream_mb: usize) -> Result<Value> {
        let (o, backups, streams) = (self.o, self.backups, self.streams);
        if rate > 0 {
            self.net.limit_rate(rate)?;
        }
        let link = if rate > 0 {
            format!("{rate} Mbit/s (tc tbf)")
        } else {
            "unlimited veth".to_string()
        };
        println!("\n== link: {link}");
        let mut bb: Vec<Vec<f64>> = vec![Vec::new(); backups.len()];
        let mut wire: Vec<Vec<f64>> = vec![Vec::new(); backups.len()];
        let mut tp: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 2]; streams.len()];
        let mut cpu: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 2]; streams.len()];
        for r in 0..o.reps {
            for (i, s) in streams.iter().enumerate() {
                for (k, conns) in [1usize, 8].into_iter().enumerate() {
                    let (mbs, per_gb) = self.stream(s, conns, stream_mb << 20, r)?;
                    tp[i][k].push(mbs);
                    cpu[i][k].push(per_gb);
                }
            }
            for (i, b) in backups.iter().enumerate() {
                let (secs, bytes) = self.basebackup(b, &format!("bb-{label}-{i}-{r}"), r)?;
                bb[i].push(secs);
                wire[i].push(bytes);
            }
        }
        let backup_rows: Vec<Value> = backups
            .iter()
            .enumerate()
            .map(|(i, b)| {
                json!({"contender": b.name, "seconds": bb[i], "median_s": median(bb[i].clone()),
                       "link_bytes_median": median(wire[i].clone())})
            })
            .collect();
        let mut stream_rows = Vec::new();
        for (i, s) in streams.iter().enumerate() {
            for (k, conns) in [1usize, 8].into_iter().enumerate() {
                stream_rows.push(
                    json!({"contender": s.name, "streams": conns, "mb_per_s": tp[i][k],
                    "median_mb_per_s": median(tp[i][k].clone()),
                    "cpu_s_per_gb_median": median(cpu[i][k].clone())}),
                );
            }
        }
        Ok(
            json!({"link": link, "label": label, "rate_mbit": rate, "stream_mib": stream_mb,
            "basebackup": backup_rows, "streams": stream_rows}),
        )
    }

    /// `bytes` read through `s` over `conns` connections at once (repetition `r`): MB/s, and
    /// the CPU seconds per GB of both tunnel ends.
    fn stream(&self, s: &Stream, conns: usize, bytes: usize, r: u32) -> Result<(f64, f64)> {
        let pids = (s.cpu)(self.procs);
        let before = cpu_secs(&pids);
        let out = command_output(cmd_in(Some(self.net.b.as_str()), self.me).args([
            "--read-stream",
            &s.port.to_string(),
            &bytes.to_string(),
            &conns.to_string(),
        ]))
        .with_context(|| format!("stream via {}", s.name))?;
        let mbs: f64 = out.trim().trim_start_matches("MBps ").parse()?;
        let used = cpu_secs(&(s.cpu)(self.procs)) - before;
        let per_gb = used / (bytes as f64 / 1e9);
        eprintln!(
            "  rep {r}: {conns} stream(s) via {}: {mbs:.1} MB/s, {per_gb:.2} CPU s/GB",
            s.name
        );
        Ok((mbs, per_gb))
    }

    /// One `pg_basebackup -X stream` through `b` into `name` (removed afterwards), repetition
    /// `r`: seconds, and bytes on the link.
    fn basebackup(&self, b: &Backup, name: &str, r: u32) -> Result<(f64, f64)> {
        let out = self.dir.join(name);
        let before = link_bytes(Some(self.net));
        let t = Instant::now();
        command_output(
            cmd_in(Some(self.net.b.as_str()), pg_bin("pg_basebackup"))
                .args([
                    "-h",
                    &b.host,
                    "-p",
                    &b.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                ])
                .arg(&out)
                .args(["-X", "stream", "-c", "fast", "--no-sync"])
                .args(b.extra)
                .env("PGPASSWORD", self.pg_password),
        )
        .with_context(|| format!("pg_basebackup via {}", b.name))?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = link_bytes(Some(self.net)).saturating_sub(before) as f64;
        eprintln!(
            "  rep {r}: pg_basebackup via {}: {secs:.2} s, {:.0} MB on the link",
            b.name,
            bytes / 1e6
        );
        std::fs::remove_dir_all(&out)?;
        Ok((secs, bytes))
    }
}

/// Checks the targets (issue 16) into `results`, then writes `results.json`, `results.md` and
/// the charts to `out`.
fn write_results(results: Value, out: &Path) -> Result<()> {
    let checks = targets(&results);
    let mut results = results;
    results["targets"] = Value::Array(checks.clone());
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    let md = markdown(&results);
    std::fs::write(out.join("results.md"), &md)?;
    println!("\n{md}");
    println!(
        "written: {} and {}",
        out.join("results.json").display(),
        out.join("results.md").display()
    );
    let written = charts::render(&results, out).with_context(|| {
        format!(
            "results are written, the charts are not (retry with --charts-from {})",
            out.join("results.json").display()
        )
    })?;
    print_charts(&written);
    Ok(())
}

fn print_charts(written: &[PathBuf]) {
    for p in written {
        println!("chart: {}", p.display());
    }
}

fn find<'a>(rows: &'a Value, contender: &str) -> Option<&'a Value> {
    rows.as_array()?
        .iter()
        .find(|r| r["contender"] == contender)
}

/// The goals of issue 16 that this benchmark measures (and those of issue 4 it keeps), each
/// with the measured ratio or figure and a verdict.
fn targets(r: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let link = |label: &str| {
        r["links"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["label"] == label))
    };
    let bb = |l: &Value, c: &str| find(&l["basebackup"], c).and_then(|x| x["median_s"].as_f64());
    let one = |l: &Value, c: &str, field: &str| {
        l["streams"].as_array().and_then(|s| {
            s.iter()
                .find(|x| x["contender"] == c && x["streams"] == 1)
                .and_then(|x| x[field].as_f64())
        })
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let mut check = |what: &str, ratio: Option<f64>, limit: f64, at_most: bool| {
        if let Some(v) = ratio {
            let ok = if at_most { v <= limit } else { v >= limit };
            out.push(
                json!({"target": what, "ratio": (v * 1000.0).round() / 1000.0,
                "limit": limit, "met": ok}),
            );
        }
    };
    if let Some(l) = link("unlimited") {
        check(
            "CPU s per GB through the tunnel, both ends (unlimited link, one stream) ≤ 5",
            one(l, "pgferry", "cpu_s_per_gb_median"),
            5.0,
            true,
        );
        check(
            "unlimited link base backup: pgferry / ssh -L ≤ 1.0",
            ratio(bb(l, "pgferry"), bb(l, "ssh -L")),
            1.0,
            true,
        );
        check(
            "unlimited link raw throughput, one stream: pgferry / ssh -L ≥ 1.0",
            ratio(
                one(l, "pgferry", "median_mb_per_s"),
                one(l, "ssh -L", "median_mb_per_s"),
            ),
            1.0,
            false,
        );
    }
    // The rate-limited links: 1 Gbit/s (issue 16) and 100 Mbit/s (kept from issue 4).
    for (label, limit, kept) in [("fast", 0.5, ""), ("limited", 0.35, " (kept)")] {
        if let Some(l) = link(label) {
            check(
                &format!(
                    "{} base backup: pgferry / ssh -L ≤ {limit}{kept}",
                    l["link"].as_str().unwrap_or(label)
                ),
                ratio(bb(l, "pgferry"), bb(l, "ssh -L")),
                limit,
                true,
            );
        }
    }
    let wal = |c: &str| find(&r["wal"], c).and_then(|x| x["lag_p99_s"].as_f64());
    if let Some(p99) = wal("pgferry") {
        out.push(
            json!({"target": "WAL at twice the limited link: pgferry lag p99 < 5 s (kept)",
            "ratio": p99, "limit": 5.0, "met": p99 < 5.0}),
        );
    }
    out
}

/// The results' `tunnel_closed` lines (what [`stop_agents`] kept) under `heading`, one item
/// each; empty without any.
fn tunnel_lines(r: &Value, heading: &str) -> String {
    let Some(t) = r["tunnel_closed"].as_object().filter(|t| !t.is_empty()) else {
        return String::new();
    };
    let mut s = format!("\n{heading}:\n\n");
    for (name, line) in t {
        s.push_str(&format!("- {name}: {}\n", line.as_str().unwrap_or("?")));
    }
    s
}

/// One row of a WAL table, without the line's end: via, WAL written (MB/s), lag p99 (s), max
/// lag (MB), drain after the load (s).
fn wal_row(x: &Value) -> String {
    format!(
        "| {} | {:.1} | {:.1} | {:.0} | {} |",
        x["contender"].as_str().unwrap_or("?"),
        x["wal_mb_per_s"].as_f64().unwrap_or(0.0),
        x["lag_p99_s"].as_f64().unwrap_or(0.0),
        x["lag_max_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        x["drain_s"]
            .as_f64()
            .map_or("> 300".to_string(), |d| format!("{d:.1}"))
    )
}

fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let d = &r["dataset"];
    s.push_str(&format!(
        "pgferry-bench, {}: {} cores, {} repetitions each (medians), pgferry zstd level {}; \
         database {:.0} MB, zstd -3 ratio of its files {:.2}\n",
        r["when"].as_str().unwrap_or("?"),
        r["cores"],
        r["reps"],
        r["zstd_level"],
        d["database_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        d["zstd3_ratio_of_files"].as_f64().unwrap_or(0.0)
    ));
    for l in r["links"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n### {}\n\n| pg_basebackup -X stream via | time (s) | MB on the link |\n|---|---:|---:|\n",
            l["link"].as_str().unwrap_or("?")
        ));
        for b in l["basebackup"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {:.2} | {:.0} |\n",
                b["contender"].as_str().unwrap_or("?"),
                b["median_s"].as_f64().unwrap_or(0.0),
                b["link_bytes_median"].as_f64().unwrap_or(0.0) / 1e6
            ));
        }
        s.push_str(&format!(
            "\n| raw stream ({} MiB) via | streams | MB/s | CPU s per GB (both ends) |\n|---|---:|---:|---:|\n",
            l["stream_mib"]
        ));
        for t in l["streams"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} |\n",
                t["contender"].as_str().unwrap_or("?"),
                t["streams"],
                t["median_mb_per_s"].as_f64().unwrap_or(0.0),
                t["cpu_s_per_gb_median"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    s.push_str(&tunnel_lines(
        r,
        "The tunnel at the end of the run, as each agent logged it when it stopped",
    ));
    if let Some(w) = r["wal"].as_array().filter(|w| !w.is_empty()) {
        s.push_str("\n### WAL streaming under a write load, limited link\n\n| via | WAL written (MB/s) | lag p99 (s) | max lag (MB) | drain after the load (s) |\n|---|---:|---:|---:|---:|\n");
        for x in w {
            s.push_str(&wal_row(x));
            s.push('\n');
        }
    }
    s.push_str("\n### Targets (ratios of medians from this run)\n\n| target | ratio | met |\n|---|---:|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {:.3} | {} |\n",
            t["target"].as_str().unwrap_or("?"),
            t["ratio"].as_f64().unwrap_or(0.0),
            if t["met"] == true { "yes" } else { "**no**" }
        ));
    }
    s
}

/// A standby of the source, made through one contender, for the WAL-lag measurement.
struct WalStandby {
    name: &'static str,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    slot: String,
}

/// Makes a standby through `via_port` (a contender's local end in namespace `ns`) with its own
/// slot, configured to run in `ns` on a unix socket only; not started.
fn make_standby(
    dir: &Path,
    ns: &str,
    name: &'static str,
    via_port: u16,
    password: &str,
) -> Result<WalStandby> {
    let root = dir.join(format!("wal-{}", name.replace([' ', '-'], "")));
    std::fs::create_dir_all(&root)?;
    chown_postgres(&root)?;
    let data = root.join("data");
    let slot = format!("bench_{}", name.replace([' ', '-'], "").to_lowercase());
    command_output(
        as_postgres(Some(ns), &pg_bin("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &via_port.to_string(),
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&data)
            .args([
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-R",
                "-C",
                "-S",
                &slot,
            ])
            .env("PGPASSWORD", password),
    )
    .with_context(|| format!("standby through {name}"))?;
    let port = free_tcp_port();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.auto.conf"))?;
    writeln!(
        conf,
        "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nhot_standby = on\n",
        root.display()
    )?;
    Ok(WalStandby {
        name,
        data,
        socket_dir: root,
        port,
        slot,
    })
}

fn pg_ctl(ns: &str, data: &Path, args: &[&str]) -> Result<String> {
    command_output(
        as_postgres(Some(ns), &pg_bin("pg_ctl"))
            .arg("-D")
            .arg(data)
            .args(["-w", "-t", "120"])
            .args(args),
    )
}

/// Lag in bytes below which a standby counts as caught up: lag in seconds 0, the start of the
/// load, the end of the drain.
const CAUGHT_UP_BYTES: f64 = 64.0 * 1024.0;

/// One batch of the write load: roughly 5 MB of WAL (mixed: words, numbers, JSON, hex ids;
/// zstd ~2.5x).
const WAL_LOAD_BATCH: &str = "INSERT INTO ferry.wal_load (payload, note)
        SELECT jsonb_build_object('user', (random() * 100000)::int, 'n', g,
                 'at', now() + g * interval '1 s', 'trace', md5(random()::text)),
               (ARRAY['ferry','harbour','north','cargo','tide','ledger','invoice','customer',
                      'shipment','delayed','berth','crane'])[1 + (random() * 11)::int] || ' ' ||
               md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) ||
               ' route ' || (random() * 1e6)::int || ' ' || md5(random()::text) || ' weather ' ||
               md5(random()::text)
          FROM generate_series(1, 12000) g";

/// Runs a write load of `mb_per_s` MB/s of WAL on the source for `secs` seconds with the
/// standby streaming through its contender; samples the lag every second, then the drain.
fn wal_lag(pg: &PgCluster, ns: &str, s: &WalStandby, mb_per_s: f64, secs: u64) -> Result<Value> {
    pg_ctl(
        ns,
        &s.data,
        &[
            "-l",
            &s.data.with_extension("log").to_string_lossy(),
            "start",
        ],
    )?;
    let probe = LagProbe { pg, ns, s };
    probe.wait_caught_up()?;
    let start_lsn = probe.wal()?;
    let mut samples = LagSamples::starting_now();
    probe.write_load(mb_per_s, secs, start_lsn, &mut samples)?;
    let load_secs = samples.start.elapsed().as_secs_f64();
    let written = probe.wal()? - start_lsn;
    let drain = probe.drain(&mut samples)?;
    pg_ctl(ns, &s.data, &["-m", "immediate", "stop"])?;
    pg.psql("TRUNCATE ferry.wal_load")?;
    let (p99, max_bytes) = samples.p99_and_max(load_secs);
    let samples = samples.samples;
    eprintln!(
        "  WAL via {}: {:.1} MB/s of WAL for {load_secs:.0} s; lag p99 {p99:.1} s, max {:.0} MB; drain {}",
        s.name,
        written / 1e6 / load_secs,
        max_bytes / 1e6,
        drain.map_or("> 300 s".to_string(), |d| format!("{d:.1} s"))
    );
    Ok(
        json!({"contender": s.name, "wal_mb_per_s": written / 1e6 / load_secs, "load_s": load_secs,
        "lag_p99_s": p99, "lag_max_bytes": max_bytes, "drain_s": drain, "samples": samples}),
    )
}

/// The source and one running standby, for measuring how far the standby is behind.
struct LagProbe<'a> {
    pg: &'a PgCluster,
    ns: &'a str,
    s: &'a WalStandby,
}

impl LagProbe<'_> {
    /// The standby's lag. Bytes: the source's insert position minus what the standby replayed
    /// (its slot). Seconds: on the standby, now minus the commit time of the last replayed
    /// transaction (every load batch commits), 0 once nothing is left to replay.
    fn lag(&self) -> Result<(f64, f64)> {
        let (pg, s) = (self.pg, self.s);
        let b: f64 = pg
            .psql(&format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(r.replay_lsn, s.restart_lsn))
                   FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = '{}'",
                s.slot
            ))?
            .parse()?;
        let t: f64 = if b < CAUGHT_UP_BYTES {
            0.0
        } else {
            command_output(
                as_postgres(Some(self.ns), &pg_bin("psql"))
                    .args(["-X", "-A", "-t", "-q", "-h"])
                    .arg(&s.socket_dir)
                    .args(["-p", &s.port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
                    .arg("SELECT coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)"),
            )?
            .trim()
            .parse()
            .unwrap_or(0.0)
        };
        Ok((b, t))
    }

    /// The source's WAL insert position, in bytes.
    fn wal(&self) -> Result<f64> {
        Ok(self
            .pg
            .psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")?
            .parse()?)
    }

    /// A fresh commit, then waits (up to 120 s) until the standby streams and has replayed it:
    /// its last replayed commit is then seconds old, not the source's last write before it
    /// went idle (a first run reported a p99 of 1090 s for ssh -L from that one stale sample).
    fn wait_caught_up(&self) -> Result<()> {
        let pg = self.pg;
        pg.psql("CREATE TABLE IF NOT EXISTS ferry.wal_load (id bigserial PRIMARY KEY, payload jsonb, note text)")?;
        pg.psql("INSERT INTO ferry.wal_load (note) VALUES ('start')")?;
        let t = Instant::now();
        while self.lag()?.0 >= CAUGHT_UP_BYTES {
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "standby via {} never caught up",
                self.s.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// The write load: for `secs` seconds, a [`WAL_LOAD_BATCH`] whenever the WAL written
    /// since `start_lsn` is behind the schedule (`mb_per_s` since the start), sampling the lag
    /// once a second.
    fn write_load(
        &self,
        mb_per_s: f64,
        secs: u64,
        start_lsn: f64,
        samples: &mut LagSamples,
    ) -> Result<()> {
        while samples.start.elapsed() < Duration::from_secs(secs) {
            let el = samples.start.elapsed();
            if samples.is_due(el) {
                let (b, t) = self.lag()?;
                samples.record(el, b, t);
            }
            let written = self.wal()? - start_lsn;
            if written < mb_per_s * 1e6 * el.as_secs_f64() {
                self.pg.psql(WAL_LOAD_BATCH)?;
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The drain: how long until the standby has replayed everything (`None`: not within
    /// 300 s), still sampling the lag once a second.
    fn drain(&self, samples: &mut LagSamples) -> Result<Option<f64>> {
        let stop = Instant::now();
        while stop.elapsed() < Duration::from_secs(300) {
            let el = samples.start.elapsed();
            let (b, t) = self.lag()?;
            if samples.is_due(el) {
                samples.record(el, b, t);
            }
            if b < CAUGHT_UP_BYTES {
                return Ok(Some(stop.elapsed().as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(None)
    }
}

/// Lag samples, one a second from the start of the write load through the drain.
struct LagSamples {
    start: Instant,
    next: Duration,
    samples: Vec<Value>,
}

impl LagSamples {
    fn starting_now() -> Self {
        Self {
            start: Instant::now(),
            next: Duration::ZERO,
            samples: Vec::new(),
        }
    }

    /// Whether a sample is due `el` after the start.
    fn is_due(&self, el: Duration) -> bool {
        el >= self.next
    }

    /// Records lag `b` bytes and `t` seconds at `el` after the start; the next is due a second
    /// later.
    fn record(&mut self, el: Duration, b: f64, t: f64) {
        self.samples
            .push(json!({"t": el.as_secs_f64(), "lag_bytes": b, "lag_s": t}));
        self.next += Duration::from_secs(1);
    }

    /// The 99th percentile of the lag in seconds during the load (the first `load_secs`), and
    /// the largest lag in bytes of any sample.
    fn p99_and_max(&self, load_secs: f64) -> (f64, f64) {
        let during: Vec<f64> = self
            .samples
            .iter()
            .filter(|x| x["t"].as_f64().unwrap_or(0.0) <= load_secs)
            .map(|x| x["lag_s"].as_f64().unwrap_or(0.0))
            .collect();
        let mut sorted = during.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p99 = sorted
            .get(((sorted.len() as f64) * 0.99).ceil() as usize - 1)
            .copied()
            .unwrap_or(0.0);
        let max_bytes = self
            .samples
            .iter()
            .filter_map(|x| x["lag_bytes"].as_f64())
            .fold(0.0, f64::max);
        (p99, max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets recomputed from the committed run's results are the ones that run wrote.
    #[test]
    fn targets_of_the_committed_run_are_reproduced() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/results.json");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(Value::Array(targets(&r)), r["targets"]);
        assert!(markdown(&r).contains("The tunnel at the end of the run"));
    }
}
