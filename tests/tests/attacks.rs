//! An attacker without a certificate cannot keep the agents apart (issue: six replayed Initials
//! once kept a restarted pair apart for the whole 120 s of the attack). Under each attack, a
//! restart of either agent (kill -9, as a crash) is followed by a reconnect within 5 s, the
//! established tunnel keeps serving queries, and the attack adds a bounded number of records
//! to the audit log.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgferry_tests::{command_output, free_tcp_port, free_udp_port, pg_bin, PgCluster, TestDir};
use support::attack::{self, Attack};
use support::{audit_events, details, Agent, Certs};

/// A source on 127.0.0.1 in front of a real cluster, a target dialing it.
struct Rig {
    dir: TestDir,
    pg: PgCluster,
    certs: Certs,
    other_ca: Certs,
    udp_port: u16,
    local: u16,
    source: Agent,
    target: Agent,
}

impl Rig {
    fn start() -> Result<Rig> {
        let dir = TestDir::new()?;
        let mut pg = PgCluster::init(&dir.join("pg"), free_tcp_port())?;
        pg.start()?;
        let certs = Certs::make(&dir.join("certs"))?;
        let other_ca = Certs::make(&dir.join("other-ca"))?;
        let udp_port = free_udp_port();
        let local = free_tcp_port();
        let source = Self::spawn_source(&dir, &certs, udp_port, pg.port)?;
        source.wait_for("listening on")?;
        let target = Self::spawn_target(&dir, &certs, udp_port, local)?;
        target.wait_for("tunnel up")?;
        Ok(Rig {
            dir,
            pg,
            certs,
            other_ca,
            udp_port,
            local,
            source,
            target,
        })
    }

    fn spawn_source(dir: &TestDir, certs: &Certs, udp: u16, pg_port: u16) -> Result<Agent> {
        Agent::start(
            "source",
            "source",
            dir.path(),
            certs,
            "source",
            &[
                "--listen".into(),
                format!("127.0.0.1:{udp}"),
                "--upstream".into(),
                format!("127.0.0.1:{pg_port}"),
            ],
        )
    }

    fn spawn_target(dir: &TestDir, certs: &Certs, udp: u16, local: u16) -> Result<Agent> {
        Agent::start(
            "target",
            "target",
            dir.path(),
            certs,
            "target",
            &[
                "--connect".into(),
                format!("127.0.0.1:{udp}"),
                "--local".into(),
                format!("127.0.0.1:{local}"),
            ],
        )
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.udp_port).parse().unwrap()
    }

    fn other_cert(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.other_ca.pem("target"), self.other_ca.key("target"))
    }

    /// A query through the tunnel reaches the source cluster.
    fn query(&self) -> Result<()> {
        let out = command_output(
            Command::new(pg_bin("psql"))
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg("SELECT current_setting('port')")
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
                    self.local
                ))
                .env("PGPASSWORD", &self.pg.password),
        )?;
        ensure!(
            out.trim() == self.pg.port.to_string(),
            "query answered {out:?}"
        );
        Ok(())
    }

    /// kill -9 the source, start it again; the time from its "listening on" to the target's
    /// next "tunnel up".
    fn restart_source(&mut self) -> Result<Duration> {
        let before = tunnel_ups(&self.target);
        self.source.child.kill();
        self.source = Self::spawn_source(&self.dir, &self.certs, self.udp_port, self.pg.port)?;
        self.source.wait_for("listening on")?;
        let t0 = Instant::now();
        pgferry_tests::wait_until(
            "the target's tunnel back up",
            Duration::from_secs(60),
            || (tunnel_ups(&self.target) > before).then_some(()),
        )?;
        Ok(t0.elapsed())
    }

    /// kill -9 the target, start it again; the time from its start to its "tunnel up".
    fn restart_target(&mut self) -> Result<Duration> {
        self.target.child.kill();
        let t0 = Instant::now();
        self.target = Self::spawn_target(&self.dir, &self.certs, self.udp_port, self.local)?;
        pgferry_tests::wait_until(
            "the new target's tunnel up",
            Duration::from_secs(60),
            || (tunnel_ups(&self.target) > 0).then_some(()),
        )?;
        Ok(t0.elapsed())
    }

    /// Runs the restarts under `attack` (from `attacker_ip`) and checks the bounds.
    fn survive(mut self, name: &str, attack: Attack, attacker_ip: &str) -> Result<()> {
        // Let the attack take hold, then check the established tunnel still serves.
        std::thread::sleep(Duration::from_secs(2));
        self.query()?;
        let source_gap = self.restart_source()?;
        self.query()?;
        let target_gap = self.restart_target()?;
        self.query()?;
        let sent = attack.sent();
        drop(attack);
        eprintln!(
            "{name}: {sent} sent by the attacker; reconnect after a source restart {:.2} s, after a target restart {:.2} s",
            source_gap.as_secs_f64(),
            target_gap.as_secs_f64()
        );
        ensure!(
            source_gap < Duration::from_secs(5),
            "{name}: target reconnected {source_gap:?} after the source restarted"
        );
        ensure!(
            target_gap < Duration::from_secs(5),
            "{name}: restarted target connected after {target_gap:?}"
        );
        self.target.stop()?;
        self.source.stop()?;
        // Bounded audit load: per run of the source, at most one record in full and one
        // summary per minute for the attacker's address (two runs here, each under a minute;
        // the killed run wrote its first record only).
        let from_attacker: Vec<_> = support::audit_records(&self.source.audit)
            .into_iter()
            .filter(|r| {
                details(r)["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(attacker_ip))
            })
            .collect();
        eprintln!(
            "{name}: {} audit records about {attacker_ip} on the source",
            from_attacker.len()
        );
        ensure!(
            from_attacker.len() <= 4,
            "{name}: {} audit records for the attacker: {from_attacker:#?}",
            from_attacker.len()
        );
        // The legitimate reconnects are all in the log.
        ensure!(audit_events(&self.source.audit, "handshake_accepted").len() >= 3);
        Ok(())
    }
}

fn tunnel_ups(agent: &Agent) -> usize {
    agent.child.output().matches("tunnel up").count()
}

#[test]
fn replayed_initials_do_not_keep_a_restarted_pair_apart() -> Result<()> {
    let rig = Rig::start()?;
    let attack = attack::replay_initials("127.0.0.2", rig.addr(), rig.other_cert());
    rig.survive("replayed Initials", attack, "127.0.0.2")
}

#[test]
fn a_bad_certificate_handshake_flood_does_not_keep_a_restarted_pair_apart() -> Result<()> {
    let rig = Rig::start()?;
    let attack = attack::handshake_flood("127.0.0.3", rig.addr(), rig.other_cert(), 16);
    rig.survive("bad-certificate flood", attack, "127.0.0.3")
}

/// A crashed source is noticed as soon as it is back, not after the idle timeout (issue: the
/// target reconnected 35.5 s after a kill -9 although the source was back after 1 s, and a COPY
/// in flight hung all that time). The restarted source recognises the connection ids its
/// previous run handed out and answers with a stateless reset keyed from its own key.
#[test]
fn source_killed_during_a_copy_is_noticed_within_2_s_of_its_restart() -> Result<()> {
    use futures_util::StreamExt;
    let mut rig = Rig::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(rig.pg.connect("127.0.0.1", rig.local))?;
    let mut copy = Box::pin(rt.block_on(client.copy_out(
        "COPY (SELECT g, repeat('x', 500) FROM generate_series(1, 100000000) g) TO STDOUT",
    ))?);
    let mut received = 0usize;
    while received < 10 << 20 {
        let chunk = rt.block_on(copy.next()).context("COPY ended early")??;
        received += chunk.len();
    }
    let before = tunnel_ups(&rig.target);
    let killed = Instant::now();
    rig.source.child.kill();
    rig.source = Rig::spawn_source(&rig.dir, &rig.certs, rig.udp_port, rig.pg.port)?;
    rig.source.wait_for("listening on")?;
    let restarted = Instant::now();
    // The COPY in flight ends with an error instead of hanging.
    let end = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match copy.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Ok(()),
                }
            }
        })
        .await
    });
    let copy_ended = killed.elapsed();
    ensure!(
        matches!(end, Ok(Err(_))),
        "the COPY through the crashed source did not fail: {end:?}"
    );
    pgferry_tests::wait_until(
        "the target's tunnel back up",
        Duration::from_secs(60),
        || (tunnel_ups(&rig.target) > before).then_some(()),
    )?;
    let gap = restarted.elapsed();
    eprintln!(
        "source kill -9 during a COPY ({} MB received): restart took {:.2} s, the COPY failed {:.2} s after the kill, tunnel back {:.2} s after the restart",
        received >> 20,
        (restarted - killed).as_secs_f64(),
        copy_ended.as_secs_f64(),
        gap.as_secs_f64()
    );
    ensure!(
        gap <= Duration::from_secs(2),
        "the target reconnected {gap:?} after the source's restart"
    );
    rig.query()?;
    drop(copy);
    drop(client);
    rig.target.stop()?;
    rig.source.stop()?;
    Ok(())
}
