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
    bin_path, command_output, free_tcp_port, free_udp_port, load_sample_data, pg_bin, wait_until,
    ChildGuard, PgCluster, TestDir,
};

const STREAM_BYTES: usize = 1 << 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("pgferry-quickbench [--reps N] [--megabytes N] [--level N]: tunnel vs ssh -L on loopback (see source docs)");
        return;
    }
    let get = |name: &str, default: u32| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if let Err(e) = run(get("--reps", 3), get("--megabytes", 300), get("--level", 3)) {
        eprintln!("pgferry-quickbench: error: {e:#}");
        std::process::exit(1);
    }
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

fn stream_server(data: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().take(1000) {
            let Ok(mut c) = c else { continue };
            let data = data.clone();
            std::thread::spawn(move || {
                let mut sent = 0;
                while sent < STREAM_BYTES {
                    let n = data.len().min(STREAM_BYTES - sent);
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

fn read_all(port: u16) -> Result<f64> {
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
        total == STREAM_BYTES,
        "received {total} of {STREAM_BYTES} bytes"
    );
    Ok(total as f64 / 1e6 / t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Sshd {
    _server: ChildGuard,
    port: u16,
    key: std::path::PathBuf,
}

fn start_sshd(dir: &Path) -> Result<Sshd> {
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
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nPidFile {}\nStrictModes no\n",
            host_key.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    let server = ChildGuard::spawn_quiet("sshd", cmd)?;
    wait_until("sshd to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    Ok(Sshd {
        _server: server,
        port,
        key,
    })
}

fn ssh_tunnel(sshd: &Sshd, to_port: u16) -> Result<(ChildGuard, u16)> {
    let local = free_tcp_port();
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-N",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-i",
    ])
    .arg(&sshd.key)
    .args([
        "-p",
        &sshd.port.to_string(),
        "-L",
        &format!("127.0.0.1:{local}:127.0.0.1:{to_port}"),
        "root@127.0.0.1",
    ]);
    let child = ChildGuard::spawn_quiet("ssh", cmd)?;
    wait_until("ssh -L to listen", Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", local)).ok()
    })?;
    Ok((child, local))
}

fn run(reps: u32, megabytes: u32, level: u32) -> Result<()> {
    let dir = TestDir::new()?;
    println!("pgferry quickbench: loopback, {reps} repetitions each, medians, pgferry zstd level {level}");
    let data = payload();
    let ratio = data.len() as f64 / zstd::bulk::compress(&data, 3)?.len() as f64;
    println!("payload: mixed text/JSON/numbers/hex, zstd -3 ratio {ratio:.2}");
    let stream_port = stream_server(data);

    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("pg"), pg_port)?;
    pg.start()?;
    load_sample_data(&pg, megabytes)?;
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
        format!("[network]\nlisten = \"127.0.0.1:{udp}\"\n[[service]]\nname = \"postgres\"\nupstream = \"127.0.0.1:{pg_port}\"\n[[service]]\nname = \"stream\"\nupstream = \"127.0.0.1:{stream_port}\"\n"),
    )?;
    std::fs::write(
        dir.join("target.toml"),
        format!("[network]\nconnect = \"127.0.0.1:{udp}\"\nserver_name = \"localhost\"\n[[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{pg_local}\"\n[[service]]\nname = \"stream\"\nlocal = \"127.0.0.1:{stream_local}\"\n"),
    )?;
    let agent = |role: &str| -> Result<ChildGuard> {
        let mut cmd = Command::new(bin_path(&format!("pgferry-{role}")));
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
            .arg(level.to_string());
        ChildGuard::spawn_quiet(role, cmd)
    };
    let source = agent("source")?;
    source.wait_for_output("listening on", Duration::from_secs(30))?;
    let target = agent("target")?;
    target.wait_for_output("tunnel up", Duration::from_secs(30))?;

    let sshd = start_sshd(&dir.join("ssh").tap_mkdir()?)?;
    let (_ssh_stream, ssh_stream_port) = ssh_tunnel(&sshd, stream_port)?;
    let (_ssh_pg, ssh_pg_port) = ssh_tunnel(&sshd, pg_port)?;

    // 1. Raw throughput, one stream.
    let mut tp: [Vec<f64>; 3] = Default::default();
    for _ in 0..reps {
        for (i, port) in [stream_port, ssh_stream_port, stream_local]
            .into_iter()
            .enumerate()
        {
            tp[i].push(read_all(port).with_context(|| format!("stream via port {port}"))?);
        }
    }
    // 2. pg_basebackup.
    let mut bb: [Vec<f64>; 3] = Default::default();
    for r in 0..reps {
        for (i, port) in [pg_port, ssh_pg_port, pg_local].into_iter().enumerate() {
            let out = dir.join(format!("bb-{i}-{r}"));
            let t = Instant::now();
            command_output(
                Command::new(pg_bin("pg_basebackup"))
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
            )?;
            bb[i].push(t.elapsed().as_secs_f64());
            std::fs::remove_dir_all(&out)?;
        }
    }
    let names = ["direct TCP", "ssh -L", "pgferry"];
    println!(
        "\n| contender | raw stream MB/s (1 GiB, 1 stream) | pg_basebackup -X stream of {db} (s) |"
    );
    println!("|---|---|---|");
    for i in 0..3 {
        println!(
            "| {} | {:.0} | {:.2} |",
            names[i],
            median(tp[i].clone()),
            median(bb[i].clone())
        );
    }
    println!(
        "\npgferry / ssh -L: throughput {:.2}x, pg_basebackup time {:.2}x",
        median(tp[2].clone()) / median(tp[1].clone()),
        median(bb[2].clone()) / median(bb[1].clone())
    );
    drop(target);
    drop(source);
    pg.stop()?;
    Ok(())
}

trait TapMkdir: Sized {
    fn tap_mkdir(self) -> Result<Self>;
}
impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Result<Self> {
        std::fs::create_dir_all(&self)?;
        Ok(self)
    }
}
