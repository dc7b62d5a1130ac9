//! Forwarding semantics with real agent processes and `[[service]]` tables: half-close in
//! both directions, unix sockets, many concurrent connections, and a failed or reset upstream
//! reaching the client as a closed connection with a log line saying why.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use pgferry_tests::{free_tcp_port, free_udp_port, TestDir};
use support::{audit_events, details, Agent, Certs};

/// Echoes everything until the client's EOF, then sends `BYE\n` and closes: the client can
/// only see `BYE` if its half-close reached us *and* our data still reaches it afterwards.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in l.incoming().take(1000) {
            let Ok(mut c) = conn else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = c.write_all(b"BYE\n");
            });
        }
    });
    port
}

/// Accepts, reads a few bytes, then resets the connection (RST, not FIN).
fn resetting_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in l.incoming().take(100) {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4];
            let _ = c.read_exact(&mut buf);
            let s = socket2::Socket::from(c);
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    port
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    // xorshift: incompressible enough that zstd picks RAW for some chunks, not all.
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                b'a' + (i % 26) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

/// Writes `data`, half-closes, reads to EOF; returns what came back.
fn round_trip<S: Read + Write + Send + TryCloneStream + 'static>(
    mut s: S,
    data: Vec<u8>,
    shutdown: impl FnOnce(&S) + Send + 'static,
) -> Vec<u8> {
    let mut w = s.try_clone_stream();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        shutdown(&w);
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> Self;
}
impl TryCloneStream for TcpStream {
    fn try_clone_stream(&self) -> Self {
        self.try_clone().unwrap()
    }
}
impl TryCloneStream for UnixStream {
    fn try_clone_stream(&self) -> Self {
        self.try_clone().unwrap()
    }
}

fn write_config(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
}

#[test]
fn services_half_close_concurrency_and_upstream_failures() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let echo = echo_server();
    let reset = resetting_server();
    let dead = free_tcp_port(); // nothing listens here
    let (echo_local, dead_local, reset_local) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let sock = dir.join("echo.sock");
    let pg_local = free_tcp_port();
    let udp = free_udp_port();

    let source_cfg = dir.join("source.toml");
    write_config(
        &source_cfg,
        &format!(
            r#"
[network]
listen = "127.0.0.1:{udp}"
[[service]]
name = "echo"
upstream = "127.0.0.1:{echo}"
[[service]]
name = "echo-unix"
upstream = "127.0.0.1:{echo}"
[[service]]
name = "dead"
upstream = "127.0.0.1:{dead}"
[[service]]
name = "reset"
upstream = "127.0.0.1:{reset}"
"#
        ),
    );
    let target_cfg = dir.join("target.toml");
    write_config(
        &target_cfg,
        &format!(
            r#"
[network]
connect = "127.0.0.1:{udp}"
[[service]]
name = "postgres"
local = "127.0.0.1:{pg_local}"
[[service]]
name = "echo"
local = "127.0.0.1:{echo_local}"
[[service]]
name = "echo-unix"
local = "unix:{}"
[[service]]
name = "dead"
local = "127.0.0.1:{dead_local}"
[[service]]
name = "reset"
local = "127.0.0.1:{reset_local}"
"#,
            sock.display()
        ),
    );
    let mut source = Agent::start(
        "source",
        "source",
        dir.path(),
        &certs,
        "source",
        &["--config".into(), source_cfg.to_string_lossy().into()],
    )?;
    let mut target = Agent::start(
        "target",
        "target",
        dir.path(),
        &certs,
        "target",
        &["--config".into(), target_cfg.to_string_lossy().into()],
    )?;
    target.wait_for("tunnel up")?;

    // Half-close through a unix-socket local endpoint: 3 MB out, EOF, all of it back + BYE.
    let data = pattern(1, 3 << 20);
    let back = round_trip(UnixStream::connect(&sock)?, data.clone(), |s| {
        s.shutdown(Shutdown::Write).unwrap()
    });
    assert_eq!(back.len(), data.len() + 4);
    assert!(back[..data.len()] == data[..], "echoed bytes differ");
    assert_eq!(&back[data.len()..], b"BYE\n");
    // The local unix socket is not open to other users.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)?.permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "socket mode {mode:o}");

    // 32 concurrent TCP connections, each with its own data.
    let t = Instant::now();
    let handles: Vec<_> = (0..32u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(100 + i, 256 * 1024 + i as usize * 997);
                let s = TcpStream::connect(("127.0.0.1", echo_local)).unwrap();
                let back = round_trip(s, data.clone(), |s| s.shutdown(Shutdown::Write).unwrap());
                assert_eq!(back.len(), data.len() + 4, "connection {i}");
                assert!(
                    back[..data.len()] == data[..],
                    "connection {i}: bytes differ"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a concurrent connection failed");
    }
    eprintln!("32 concurrent echo connections in {:?}", t.elapsed());

    // Upstream refuses the connection: the client sees a closed connection, both agents say why.
    let mut c = TcpStream::connect(("127.0.0.1", dead_local))?;
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes from a dead upstream"),
        Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "client left hanging"),
    }
    let line = source.wait_for(&format!(
        "connecting to upstream 127.0.0.1:{dead} of service dead"
    ))?;
    assert!(line.to_lowercase().contains("refused"), "{line}");
    target.wait_for("UpstreamConnectFailed")?;

    // Upstream resets mid-connection: the client sees the connection closed, not a hang.
    let mut c = TcpStream::connect(("127.0.0.1", reset_local))?;
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    c.write_all(b"ping")?;
    match c.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes from a resetting upstream"),
        Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "client left hanging"),
    }
    let line = source.wait_for("session")?;
    let _ = line;
    pgferry_tests::wait_until("reset logged", Duration::from_secs(10), || {
        let out = source.child.output();
        out.lines()
            .any(|l| l.contains("(reset) closed with") || l.contains("(reset): "))
            .then_some(())
    })?;

    // Everything is in the audit log, and the logs agree.
    target.stop()?;
    source.stop()?;
    let closed = audit_events(&source.audit, "stream_closed");
    assert!(closed.len() >= 35, "{} stream_closed", closed.len());
    assert!(closed
        .iter()
        .any(|r| details(r)["service"] == "dead" && details(r)["outcome"] != "ok"));
    let (ok, out) = support::audit_verify_peer("source", &source.audit, &target.audit);
    assert!(ok, "{out}");
    Ok(())
}

/// A client of an unknown service name never gets anywhere: the source refuses the stream.
#[test]
fn config_errors_name_the_file_and_the_problem() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let cfg = dir.join("bad.toml");
    write_config(&cfg, "[network]\nlisten = \"127.0.0.1:1\"\nkeepalive = 3\n");
    let out = std::process::Command::new(pgferry_tests::bin_path("pgferry-source"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--ca")
        .arg(certs.ca())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("keepalive"), "{err}");
    Ok(())
}

/// The other way round: the target listens and the source dials (a source host that may only
/// make outbound connections), and the source reaches PostgreSQL through its unix socket.
#[test]
fn target_listens_source_dials_and_upstream_is_a_unix_socket() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let pg_port = free_tcp_port();
    let mut pg = pgferry_tests::PgCluster::init(&dir.join("pg"), pg_port)?;
    pg.start()?;
    let socket = pg.root.join(format!(".s.PGSQL.{pg_port}"));
    let udp = free_udp_port();
    let local = free_tcp_port();
    let target = Agent::start(
        "target",
        "target",
        dir.path(),
        &certs,
        "target",
        &[
            "--listen".into(),
            format!("127.0.0.1:{udp}"),
            "--local".into(),
            format!("127.0.0.1:{local}"),
            "--keep-alive-secs".into(),
            "2".into(),
            "--idle-timeout-secs".into(),
            "10".into(),
        ],
    )?;
    target.wait_for("listening on")?;
    let source = Agent::start(
        "source",
        "source",
        dir.path(),
        &certs,
        "source",
        &[
            "--connect".into(),
            format!("127.0.0.1:{udp}"),
            "--server-name".into(),
            "localhost".into(),
            "--upstream".into(),
            format!("unix:{}", socket.display()),
        ],
    )?;
    source.wait_for("tunnel up")?;
    target.wait_for("tunnel up")?;
    // Over the unix socket pg_hba says `trust` for local connections: the tunnel client gets
    // in without a password, which shows the session really arrived through the socket.
    let out = pgferry_tests::command_output(
        std::process::Command::new(pgferry_tests::pg_bin("psql"))
            .args(["-X", "-A", "-t", "-c"])
            .arg(
                "SELECT coalesce(inet_client_addr()::text, 'unix socket'), current_setting('port')",
            )
            .arg(format!(
                "host=127.0.0.1 port={local} user=postgres dbname=postgres"
            )),
    )?;
    assert_eq!(out.trim(), format!("unix socket|{pg_port}"));
    Ok(())
}
