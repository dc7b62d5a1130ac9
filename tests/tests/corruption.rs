//! A chunk corrupted between decoding and verification (TLS would drop a corrupted packet, so
//! the fault is injected inside the receiving agent through the library-only test hook): the
//! stream is reset, not one byte of the bad chunk reaches the client, the audit log records
//! it, and other streams on the same QUIC connection keep working.
//!
//! Both agents run in-process here (the hook cannot be reached from the binaries), over real
//! QUIC on loopback, with the same `run_agent` the binaries call.

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgferry_common::runtime::cli::TunnelArgs;
use pgferry_common::runtime::pump::FaultInjection;
use pgferry_common::runtime::RunOptions;
use pgferry_source::config::SourceRunArgs;
use pgferry_target::config::TargetRunArgs;
use pgferry_tests::{free_tcp_port, free_udp_port, TestDir};
use support::{audit_events, details, Certs};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const MARKER: &[u8] = b"\x00CORRUPT-ME-PLEASE\x00";
const PREFIX: usize = 300 * 1024;

/// Upstream test service. First line from the client picks the mode:
/// `ECHO` echoes until EOF; `CORRUPT` sends PREFIX bytes, waits for `GOT`, then sends a write
/// that starts with MARKER (so MARKER lands in the first chunk after the prefix) and more.
async fn upstream(listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            match line.trim() {
                "ECHO" => {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
                "CORRUPT" => {
                    let _ = w.write_all(&prefix_bytes()).await;
                    let mut got = String::new();
                    let _ = r.read_line(&mut got).await;
                    let mut tail = MARKER.to_vec();
                    tail.extend_from_slice(&[b'z'; 64 * 1024]);
                    let _ = w.write_all(&tail).await;
                    let _ = w.write_all(&vec![b'y'; 512 * 1024]).await;
                    let _ = w.shutdown().await;
                }
                _ => {}
            }
        });
    }
}

fn prefix_bytes() -> Vec<u8> {
    (0..PREFIX).map(|i| b"pgferry "[i % 8]).collect()
}

async fn echo_once(port: u16, payload: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"ECHO\n").await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await??;
    ensure!(
        back == payload,
        "echo returned {} bytes, wanted {}",
        back.len(),
        payload.len()
    );
    Ok(())
}

#[test]
fn corrupted_chunk_resets_only_its_stream_and_delivers_nothing_of_it() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let up = TcpListener::bind("127.0.0.1:0").await?;
        let up_port = up.local_addr()?.port();
        tokio::spawn(upstream(up));
        let local = free_tcp_port();
        let udp = free_udp_port();
        let cfg_path = |name: &str, body: String| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let source_cfg = pgferry_source::config::resolve(SourceRunArgs {
 tunnel: TunnelArgs {
                    config: Some(cfg_path(
                        "source.toml",
                        format!("[[service]]\nname = \"blob\"\nupstream = \"127.0.0.1:{up_port}\"\n"),
                    )),
                    listen: Some(format!("127.0.0.1:{udp}")),
                    ca: Some(certs.ca()),
                    cert: Some(certs.pem("source")),
                    key: Some(certs.key("source")),
                    audit_log: Some(dir.join("source.audit.jsonl")),
                    ..Default::default()
                },

                    ..Default::default()
 })?;
        let target_audit = dir.join("target.audit.jsonl");
        let target_cfg = pgferry_target::config::resolve(TargetRunArgs {
 tunnel: TunnelArgs {
                    config: Some(cfg_path(
                        "target.toml",
                        format!("[[service]]\nname = \"blob\"\nlocal = \"127.0.0.1:{local}\"\n[[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{}\"\n", free_tcp_port()),
                    )),
                    connect: Some(format!("127.0.0.1:{udp}")),
                    ca: Some(certs.ca()),
                    cert: Some(certs.pem("target")),
                    key: Some(certs.key("target")),
                    audit_log: Some(target_audit.clone()),
                    ..Default::default()
                },

                    ..Default::default()
 })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let source = tokio::spawn(pgferry_source::run(
            source_cfg,
            stopped(stop_rx.clone()),
            RunOptions {
                ready: Some(ready_tx),
                ..Default::default()
            },
        ));
        ready_rx.await.context("source agent did not come up")?;
        let fault = Arc::new(FaultInjection::corrupt_chunk_containing(MARKER));
        let target = tokio::spawn(pgferry_target::run(
            target_cfg,
            stopped(stop_rx.clone()),
            RunOptions {
                fault: Some(fault.clone()),
                ..Default::default()
            },
            pgferry_target::TargetOptions::default(),
        ));

        // A stream opened before the corruption, kept open across it.
        let mut before = {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                match TcpStream::connect(("127.0.0.1", local)).await {
                    Ok(s) => break s,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => return Err(e).context("target's local endpoint never opened"),
                }
            }
        };
        before.write_all(b"ECHO\nfirst half ").await?;
        echo_once(local, b"warm-up").await?;

        // The corrupted stream.
        let mut s = TcpStream::connect(("127.0.0.1", local)).await?;
        s.write_all(b"CORRUPT\n").await?;
        let mut got = vec![0u8; PREFIX];
        s.read_exact(&mut got).await?;
        assert_eq!(got, prefix_bytes());
        s.write_all(b"GOT\n").await?;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
            .await
            .context("the corrupted stream was left hanging")?;
        assert!(
            rest.is_empty(),
            "{} bytes delivered after the prefix (first: {:?})",
            rest.len(),
            &rest[..rest.len().min(32)]
        );
        eprintln!("client saw the stream end with {end:?}");
        assert!(fault.fired(), "the fault hook never fired");

        // Other streams on the same connection keep working: the one opened before…
        before.write_all(b"second half").await?;
        before.shutdown().await?;
        let mut back = Vec::new();
        before.read_to_end(&mut back).await?;
        assert_eq!(back, b"first half second half");
        // …and new ones.
        echo_once(local, &vec![7u8; 1 << 20]).await?;

        // The audit log names the failure.
        let failure = pgferry_tests::wait_until(
            "integrity_failure in the target's audit log",
            Duration::from_secs(10),
            || audit_events(&target_audit, "integrity_failure").into_iter().next(),
        )?;
        assert_eq!(details(&failure)["service"], "blob");
        let closed = audit_events(&target_audit, "stream_closed");
        assert!(closed
            .iter()
            .any(|r| details(r)["outcome"] == "integrity_failure"));

        stop_tx.send(true)?;
        tokio::time::timeout(Duration::from_secs(40), target).await???;
        tokio::time::timeout(Duration::from_secs(40), source).await???;
        anyhow::Ok(())
    })?;
    // One QUIC connection carried all of it: one accepted handshake on the source.
    let accepted = audit_events(&dir.join("source.audit.jsonl"), "handshake_accepted");
    assert_eq!(accepted.len(), 1);
    Ok(())
}
