//! Attackers without a valid certificate, for the tests that check they cannot keep the agents
//! apart. Each runs on its own thread and runtime, from a loopback address of its own (another
//! "host"), bounded in time, and stops when dropped.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any attacker runs, whatever the test does.
const MAX_ATTACK: Duration = Duration::from_secs(120);

/// A running attack.
pub struct Attack {
    stop: Arc<AtomicBool>,
    /// Handshakes attempted (flood) or datagrams sent (replay).
    pub sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Attack {
    /// Packets or handshakes so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Full QUIC handshakes from `from` (an IP), `concurrency` at a time, presenting a certificate
/// the agent must refuse (`cert_key`: PEM files, e.g. of another CA), as fast as they go.
pub fn handshake_flood(
    from: &str,
    to: SocketAddr,
    cert_key: (PathBuf, PathBuf),
    concurrency: usize,
) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let bind: SocketAddr = format!("{from}:0").parse().unwrap();
    let (s, n) = (stop.clone(), sent.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut ep = quinn::Endpoint::client(bind).unwrap();
            ep.set_default_client_config(super::probe::client_config(Some((
                &cert_key.0,
                &cert_key.1,
            ))));
            let deadline = Instant::now() + MAX_ATTACK;
            let mut tasks = tokio::task::JoinSet::new();
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                while tasks.len() < concurrency {
                    n.fetch_add(1, Ordering::SeqCst);
                    let ep = ep.clone();
                    tasks.spawn(async move {
                        if let Ok(c) = ep.connect(to, "localhost") {
                            if let Ok(Ok(conn)) =
                                tokio::time::timeout(Duration::from_secs(3), c).await
                            {
                                let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed())
                                    .await;
                            }
                        }
                    });
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), tasks.join_next()).await;
            }
            tasks.abort_all();
            ep.close(0u32.into(), b"");
        });
    });
    Attack {
        stop,
        sent,
        thread: Some(thread),
    }
}

/// Captures the first datagrams a refused client (`cert_key`, e.g. another CA's) sends to `to`
/// through a relay bound at `from`, then replays them from that same address every 100 ms (the
/// issue's attack: six captured Initials replayed at ~72 KB/s). Replaying from the capture
/// address is the strongest form: Retry tokens in the captured packets name that address.
pub fn replay_initials(from: &str, to: SocketAddr, cert_key: (PathBuf, PathBuf)) -> Attack {
    const CAPTURE: usize = 6;
    // client ⇄ relay_in  │  relay_out ⇄ agent
    let relay_in = UdpSocket::bind(format!("{from}:0")).unwrap();
    let relay_out = UdpSocket::bind(format!("{from}:0")).unwrap();
    relay_in
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    relay_out
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let relay_addr = relay_in.local_addr().unwrap();
    let captured = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let relay = {
        let (captured, done) = (captured.clone(), done.clone());
        std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = [0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((n, a)) = relay_in.recv_from(&mut buf) {
                    client = Some(a);
                    let mut c = captured.lock().unwrap();
                    if c.len() < CAPTURE {
                        c.push(buf[..n].to_vec());
                    }
                    let _ = relay_out.send_to(&buf[..n], to);
                }
                if let Ok((n, _)) = relay_out.recv_from(&mut buf) {
                    if let Some(c) = client {
                        let _ = relay_in.send_to(&buf[..n], c);
                    }
                }
            }
            relay_out
        })
    };
    // One refused handshake through the relay.
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let res = rt.block_on(super::probe::dial_from(
            format!("{from}:0").parse().unwrap(),
            relay_addr,
            Some((&cert_key.0, &cert_key.1)),
        ));
        assert!(res.is_err(), "the capture client was accepted");
    }
    done.store(true, Ordering::SeqCst);
    let socket = relay.join().unwrap();
    let packets = captured.lock().unwrap().clone();
    assert!(!packets.is_empty(), "nothing captured");
    eprintln!(
        "captured {} datagrams ({} bytes) of a refused handshake; replaying them every 100 ms",
        packets.len(),
        packets.iter().map(Vec::len).sum::<usize>()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), sent.clone());
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + MAX_ATTACK;
        let mut buf = [0u8; 65536];
        while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
            for p in &packets {
                let _ = socket.send_to(p, to);
                n.fetch_add(1, Ordering::SeqCst);
            }
            // Drain whatever the agent answers (Retry packets), then wait for the next round.
            let until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < until {
                let _ = socket.recv_from(&mut buf);
            }
        }
    });
    Attack {
        stop,
        sent,
        thread: Some(thread),
    }
}
