//! `pgferry-quickbench`: first figures for the tunnel beside `ssh -L`, on this machine, in one
//! run (loopback link, so the CPU is the bound). The full benchmark (namespaces, 100 Mbit/s,
//! WAL lag, charts) is `bench/` (issue 4); this one answers "how does the tunnel core compare".
//!
//! Measures, alternating contenders, `--reps` times each (median printed):
//! - raw throughput of one TCP stream of mixed, compressible data (~2.5-3x with zstd -3),
//!   direct / `ssh -L` / pgferry;
//! - `pg_basebackup -X stream` of a sample database, direct / `ssh -L` / pgferry.
//!
//! Needs root, PostgreSQL 15 and OpenSSH (`apt-get install openssh-server openssh-client`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgferry_tests::{
    bin_path, command_output, free_tcp_port, free_udp_port, load_sample_data, pg_bin, ChildGuard,
    PgCluster, TestDir,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "pgferry-quickbench [--reps N] [--megabytes N] [--level N] [--stream-mb N] [--netns [--rate MBIT]]\n\
             Tunnel vs ssh -L: raw stream throughput and pg_basebackup time. Default on loopback;\n\
             --netns puts the source side and the target side in two network namespaces joined by\n\
             a veth pair, optionally limited to --rate Mbit/s (tc tbf)."
        );
        return;
    }
    let get = |name: &str, default: u32| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // Helper modes, run inside a namespace by the benchmark itself.
    if let Some(i) = args.iter().position(|a| a == "--serve-stream") {
        let bytes: usize = args[i + 1].parse().expect("--serve-stream BYTES");
        let port = stream_server(payload(), bytes);
        println!("port {port}");
        loop {
            std::thread::park();
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--read-stream") {
        let (port, bytes): (u16, usize) =
            (args[i + 1].parse().unwrap(), args[i + 2].parse().unwrap());
        match read_all(port, bytes) {
            Ok(mbs) => println!("MBps {mbs}"),
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(1)
            }
        }
        return;
    }
    let opts = Opts {
        reps: get("--reps", 3),
        megabytes: get("--megabytes", 300),
        level: get("--level", 3),
        stream_bytes: get("--stream-mb", 1024) as usize * (1 << 20),
        netns: args.iter().any(|a| a == "--netns"),
        rate: get("--rate", 0),
    };
    if let Err(e) = run(opts) {
        eprintln!("pgferry-quickbench: error: {e:#}");
        std::process::exit(1);
    }
}

struct Opts {
    reps: u32,
    megabytes: u32,
    level: u32,
    stream_bytes: usize,
    netns: bool,
    rate: u32,
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

fn stream_server(data: Vec<u8>, stream_bytes: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().take(1000) {
            let Ok(mut c) = c else { continue };
            let data = data.clone();
            std::thread::spawn(move || {
                let mut sent = 0;
                while sent < stream_bytes {
                    let n = data.len().min(stream_bytes - sent);
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

fn read_all(port: u16, stream_bytes: usize) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    ensure!(
        total == stream_bytes,
        "received {total} of {stream_bytes} bytes"
    );
    Ok(total as f64 / 1e6 / t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A command in namespace `ns` (or here).
fn cmd_in(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

struct Sshd {
    _server: ChildGuard,
    port: u16,
    addr: String,
    key: std::path::PathBuf,
}

/// sshd on the source side, listening on `addr`.
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
             PasswordAuthentication no\nUsePAM no\nPidFile {}\nStrictModes no\n",
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
        _server: server,
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

fn run(o: Opts) -> Result<()> {
    let dir = TestDir::new()?;
    let net = if o.netns {
        let n = pgferry_tests::NetnsPair::create("pgfqb")?
            .context("network namespaces cannot be created here")?;
        if o.rate > 0 {
            n.limit_rate(o.rate)?;
        }
        Some(n)
    } else {
        None
    };
    let (ns_a, ns_b) = match &net {
        Some(n) => (Some(n.a.as_str()), Some(n.b.as_str())),
        None => (None, None),
    };
    let addr_a = net
        .as_ref()
        .map_or("127.0.0.1".to_string(), |n| n.addr_a.clone());
    let link = match (&net, o.rate) {
        (None, _) => "loopback".to_string(),
        (Some(_), 0) => "two namespaces, veth, unlimited".to_string(),
        (Some(_), r) => format!("two namespaces, veth limited to {r} Mbit/s"),
    };
    println!(
        "pgferry quickbench: {link}; {} repetitions each (medians); pgferry zstd level {}",
        o.reps, o.level
    );
    let data = payload();
    let ratio = data.len() as f64 / zstd::bulk::compress(&data, 3)?.len() as f64;
    println!("stream payload: mixed text/JSON/numbers/hex, zstd -3 ratio {ratio:.2}");
    let me = std::env::current_exe()?;
    let mut server = cmd_in(ns_a, &me);
    server.args(["--serve-stream", &o.stream_bytes.to_string()]);
    let server = ChildGuard::spawn_quiet("stream-server", server)?;
    let stream_port: u16 = server
        .wait_for_output("port ", Duration::from_secs(20))?
        .trim()
        .trim_start_matches("port ")
        .parse()?;

    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("pg"), pg_port)?;
    if let Some(a) = ns_a {
        pg = pg.with_netns(a);
    }
    pg.start()?;
    load_sample_data(&pg, o.megabytes)?;
    let db = pg.psql("SELECT pg_size_pretty(pg_database_size('postgres'))")?;

    // pgferry: two services (the stream server and PostgreSQL).
    let certs = dir.join("certs");
    let c = |a: &[&str]| {
        command_output(
            Command::new(bin_path("pgferry-certs"))
                .args(a)
                .arg("--dir")
                .arg(&certs),
        )
    };
    c(&["init", "--migration", "bench"])?;
    c(&[
        "issue",
        "--role",
        "source",
        "--region",
        "DE",
        "--name",
        "localhost",
    ])?;
    c(&[
        "issue",
        "--role",
        "target",
        "--region",
        "FR",
        "--name",
        "localhost",
    ])?;
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
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join(format!("{role}.pem")))
            .arg("--key")
            .arg(certs.join(format!("{role}.key")))
            .arg("--audit-log")
            .arg(dir.join(format!("{role}.audit.jsonl")))
            .arg("--compression-level")
            .arg(o.level.to_string());
        ChildGuard::spawn_quiet(role, cmd)
    };
    let source = agent("source", ns_a)?;
    source.wait_for_output("listening on", Duration::from_secs(30))?;
    let target = agent("target", ns_b)?;
    target.wait_for_output("tunnel up", Duration::from_secs(30))?;

    let sshd = start_sshd(&dir.join("ssh"), ns_a, &addr_a)?;
    let (_ssh_stream, ssh_stream_port) = ssh_tunnel(&sshd, ns_b, stream_port, false)?;
    let (_ssh_pg, ssh_pg_port) = ssh_tunnel(&sshd, ns_b, pg_port, false)?;
    let (_sshc_pg, sshc_pg_port) = ssh_tunnel(&sshd, ns_b, pg_port, true)?;

    // Contenders reachable from the target side. Direct TCP exists only on loopback: in the
    // namespaces PostgreSQL listens on the source's loopback, as in production.
    let mut stream_contenders = vec![("ssh -L", ssh_stream_port), ("pgferry", stream_local)];
    let mut bb_contenders = vec![
        ("ssh -L", ssh_pg_port),
        ("ssh -C -L", sshc_pg_port),
        ("pgferry", pg_local),
    ];
    if net.is_none() {
        stream_contenders.insert(0, ("direct TCP", stream_port));
        bb_contenders.insert(0, ("direct TCP", pg_port));
    }
    let read_stream = |port: u16| -> Result<f64> {
        let out = command_output(cmd_in(ns_b, &me).args([
            "--read-stream",
            &port.to_string(),
            &o.stream_bytes.to_string(),
        ]))?;
        Ok(out.trim().trim_start_matches("MBps ").parse()?)
    };
    let mut tp = vec![Vec::new(); stream_contenders.len()];
    let mut bb = vec![Vec::new(); bb_contenders.len()];
    let mut wire = vec![0u64; bb_contenders.len()];
    for r in 0..o.reps {
        for (i, (name, port)) in stream_contenders.iter().enumerate() {
            let mbs = read_stream(*port).with_context(|| format!("stream via {name}"))?;
            eprintln!("  rep {r}: stream via {name}: {mbs:.1} MB/s");
            tp[i].push(mbs);
        }
        for (i, (name, port)) in bb_contenders.iter().enumerate() {
            let out = dir.join(format!("bb-{i}-{r}"));
            let before = link_bytes(net.as_ref());
            let t = Instant::now();
            command_output(
                cmd_in(ns_b, pg_bin("pg_basebackup"))
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "-D",
                    ])
                    .arg(&out)
                    .args(["-X", "stream", "-c", "fast", "--no-sync"])
                    .env("PGPASSWORD", &pg.password),
            )
            .with_context(|| format!("pg_basebackup via {name}"))?;
            let secs = t.elapsed().as_secs_f64();
            wire[i] = link_bytes(net.as_ref()).saturating_sub(before);
            eprintln!("  rep {r}: pg_basebackup via {name}: {secs:.2} s");
            bb[i].push(secs);
            std::fs::remove_dir_all(&out)?;
        }
    }
    println!(
        "\n| contender | raw stream, 1 connection ({} MiB): MB/s |",
        o.stream_bytes >> 20
    );
    println!("|---|---|");
    for (i, (name, _)) in stream_contenders.iter().enumerate() {
        println!("| {name} | {:.1} |", median(tp[i].clone()));
    }
    println!("\n| contender | pg_basebackup -X stream of {db}: s | bytes on the link |");
    println!("|---|---|---|");
    for (i, (name, _)) in bb_contenders.iter().enumerate() {
        let w = if net.is_some() {
            format!("{:.1} MB", wire[i] as f64 / 1e6)
        } else {
            "-".into()
        };
        println!("| {name} | {:.2} | {w} |", median(bb[i].clone()));
    }
    let pos = |v: &[(&str, u16)], n: &str| v.iter().position(|(x, _)| *x == n).unwrap();
    let (ts, tf) = (
        pos(&stream_contenders, "ssh -L"),
        pos(&stream_contenders, "pgferry"),
    );
    let (bs, bf) = (
        pos(&bb_contenders, "ssh -L"),
        pos(&bb_contenders, "pgferry"),
    );
    println!(
        "\npgferry vs ssh -L: stream throughput {:.2}x, pg_basebackup time {:.2}x",
        median(tp[tf].clone()) / median(tp[ts].clone()),
        median(bb[bf].clone()) / median(bb[bs].clone())
    );
    drop(target);
    drop(source);
    pg.stop()?;
    Ok(())
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
