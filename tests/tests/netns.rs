//! Two "hosts": the source cluster and `pgferry-source` in one network namespace, the target
//! agent in another, joined by a veth pair. From the target's namespace the source's
//! PostgreSQL port is unreachable, yet the tunnel carries sessions to it.

mod support;

use std::process::Command;

use anyhow::Result;
use pgferry_tests::{free_tcp_port, free_udp_port, pg_bin, NetnsPair, PgCluster, TestDir};
use support::{Agent, Certs};

#[test]
fn tunnel_between_two_network_namespaces() -> Result<()> {
    let Some(net) = NetnsPair::create("pgfty")? else {
        eprintln!("SKIPPED: network namespaces cannot be created here (see the reason above)");
        return Ok(());
    };
    let dir = TestDir::new()?;
    let pg_port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), pg_port)?.with_netns(&net.a);
    pg.start()?;
    pg.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g")?;
    let certs = Certs::make(&dir.join("certs"))?;
    let udp = free_udp_port();
    let local = free_tcp_port();
    let source = Agent::start_with(
        "source",
        "source",
        dir.path(),
        &certs,
        "source",
        &[
            "--listen".into(),
            format!("{}:{udp}", net.addr_a),
            "--upstream".into(),
            format!("127.0.0.1:{pg_port}"),
        ],
        Some(&net.a),
    )?;
    source.wait_for("listening on")?;
    let target = Agent::start_with(
        "target",
        "target",
        dir.path(),
        &certs,
        "target",
        &[
            "--connect".into(),
            format!("{}:{udp}", net.addr_a),
            "--server-name".into(),
            "localhost".into(),
            "--local".into(),
            format!("127.0.0.1:{local}"),
            "--keep-alive-secs".into(),
            "1".into(),
            "--idle-timeout-secs".into(),
            "3".into(),
        ],
        Some(&net.b),
    )?;
    target.wait_for("tunnel up")?;

    let psql_in_b = |conninfo: String, sql: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &net.b])
            .arg(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(conninfo)
            .env("PGPASSWORD", &pg.password)
            .env("PGCONNECT_TIMEOUT", "5");
        c.output()
    };

    // Direct: the source's PostgreSQL is not reachable from the target's namespace.
    let direct = psql_in_b(
        format!(
            "host={} port={pg_port} user=postgres dbname=postgres",
            net.addr_a
        ),
        "SELECT 1",
    )?;
    assert!(
        !direct.status.success(),
        "port {pg_port} reachable from the target's namespace"
    );
    let err = String::from_utf8_lossy(&direct.stderr);
    assert!(err.contains("refused") || err.contains("timeout"), "{err}");
    // Nor is the source's loopback (a different namespace's 127.0.0.1).
    let lo = psql_in_b(
        format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"),
        "SELECT 1",
    )?;
    assert!(!lo.status.success());

    // Through the tunnel it works.
    let through = psql_in_b(
        format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"),
        "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t",
    )?;
    let stdout = String::from_utf8_lossy(&through.stdout).trim().to_string();
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    let want = pg.psql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t")?;
    assert_eq!(stdout, want);

    // The only traffic between the namespaces was the QUIC port: the source's log shows the
    // peer at the other namespace's address.
    source.wait_for(&format!("tunnel up with {}:", net.addr_b))?;

    // Pull the cable: the target's idle timeout (3 s, keep-alive 1 s) notices, and once the
    // link is back it redials and the tunnel works again.
    net.set_link(false)?;
    let t = std::time::Instant::now();
    let closed = target
        .child
        .wait_for_output("closed: timed out", std::time::Duration::from_secs(20))?;
    eprintln!("link down noticed after {:?}: {closed}", t.elapsed());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "idle timeout not honoured"
    );
    net.set_link(true)?;
    pgferry_tests::wait_until(
        "the tunnel to come back",
        std::time::Duration::from_secs(60),
        || (target.child.output().matches("tunnel up").count() >= 2).then_some(()),
    )?;
    let again = psql_in_b(
        format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"),
        "SELECT count(*) FROM t",
    )?;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "5000");
    Ok(())
}
