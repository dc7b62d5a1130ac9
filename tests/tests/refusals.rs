//! Every certificate check of DESIGN §3 refuses the peer, says why on the agent's log (check,
//! certificate fingerprint, address) and writes it to the audit log; an agent whose own
//! certificate fails the policy does not start.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use pgferry_tests::{bin_path, free_udp_port, TestDir};
use support::{audit_events, details, probe, Agent, Certs, MIGRATION};

/// A probe client (our own QUIC client that presents any certificate) dials a real source
/// agent with each bad certificate in turn.
#[test]
fn source_refuses_each_bad_peer_certificate_with_its_reason() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    // Bad certificates, each failing exactly one check.
    let other = Certs::make(&dir.join("other-ca"))?; // same migration id, another CA
    certs.issue("source2", &["--role", "source", "--region", "NL"])?;
    certs.issue(
        "other-migration",
        &[
            "--role",
            "target",
            "--region",
            "FR",
            "--migration",
            "another-migration",
        ],
    )?;
    certs.issue(
        "us",
        &["--role", "target", "--region", "US", "--allow-non-eea"],
    )?;
    certs.issue("stolen", &["--role", "target", "--region", "FR"])?;
    certs.certs(&[
        "revoke",
        "--cert",
        &certs.pem("stolen").to_string_lossy(),
        "--reason",
        "laptop stolen",
    ])?;
    certs.issue(
        "expired",
        &[
            "--role",
            "target",
            "--region",
            "FR",
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--not-after",
            "2021-01-01T00:00:00Z",
        ],
    )?;

    let port = free_udp_port();
    let source = Agent::start(
        "source",
        "source",
        dir.path(),
        &certs,
        "source",
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--revocation-list".into(),
            certs.revocation_list().to_string_lossy().into(),
        ],
    )?;
    source.wait_for("listening on")?;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Runtime::new()?;

    // The good target certificate passes: the probe itself is not what fails below.
    rt.block_on(probe::dial(
        addr,
        Some((&certs.pem("target"), &certs.key("target"))),
    ))
    .expect("a valid target certificate is accepted");

    // (what, certificate presented: (issuer dir, name), check expected to refuse it)
    type Case<'a> = (&'a str, Option<(&'a Certs, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("no certificate", None, "no-certificate"),
        ("another CA", Some((&other, "target")), "chain"),
        ("same role", Some((&certs, "source2")), "role"),
        (
            "another migration",
            Some((&certs, "other-migration")),
            "migration",
        ),
        ("region US", Some((&certs, "us")), "region"),
        ("revoked", Some((&certs, "stolen")), "revoked"),
        ("expired", Some((&certs, "expired")), "validity"),
    ];
    for (i, (what, cert, check)) in cases.into_iter().enumerate() {
        let files = cert.map(|(c, n)| (c.pem(n), c.key(n)));
        // Each bad peer from an address of its own: refusals from one address after its first
        // are aggregated (see refusals_from_one_address_are_aggregated).
        let from = format!("127.0.0.{}", 20 + i);
        let res = rt.block_on(probe::dial_from(
            format!("{from}:0").parse().unwrap(),
            addr,
            files.as_ref().map(|(p, k)| (p.as_path(), k.as_path())),
        ));
        let told = res.expect_err(&format!("{what}: the agent accepted the peer"));
        let fp = cert.map_or("none".to_string(), |(c, n)| c.fingerprint(n));
        // The operator sees which check, which certificate, which address.
        let line = source.wait_for(&format!("check {check}, certificate {fp}"))?;
        assert!(
            line.contains(&format!("refused peer {from}:")),
            "{what}: {line}"
        );
        // And the audit log has the same.
        let refused = pgferry_tests::wait_until(
            &format!("{what}: handshake_refused in the audit log"),
            Duration::from_secs(10),
            || {
                audit_events(&source.audit, "handshake_refused")
                    .into_iter()
                    .find(|r| details(r)["check"] == check)
            },
        )?;
        let d = details(&refused);
        assert_eq!(d["fingerprint"], fp.as_str(), "{what}: {refused}");
        assert!(
            d["address"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{from}:")),
            "{refused}"
        );
        let reason = d["reason"].as_str().unwrap();
        assert!(!reason.is_empty());
        // The peer, unauthenticated, is told nothing of the policy: not the reason, not our
        // regions, not the revocation note.
        for secret in [
            reason,
            "allowed",
            "laptop stolen",
            "revoked",
            "migration",
            "region",
        ] {
            assert!(
                !told.contains(secret),
                "{what}: the refused peer was told {told:?}"
            );
        }
        eprintln!("{what}: refused: {reason}; the peer was told: {told}");
    }
    let revoked = audit_events(&source.audit, "handshake_refused")
        .into_iter()
        .find(|r| details(r)["check"] == "revoked")
        .unwrap();
    assert!(details(&revoked)["reason"]
        .as_str()
        .unwrap()
        .contains("laptop stolen"));
    // No refused peer ever got a tunnel.
    assert!(!source.child.output().contains("tunnel up"));
    Ok(())
}

/// The dialing side checks the listener's certificate with the same policy: a target refuses
/// a source whose certificate is outside the EEA.
#[test]
fn target_refuses_a_source_outside_the_allowed_regions() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    certs.issue(
        "source-us",
        &["--role", "source", "--region", "US", "--allow-non-eea"],
    )?;
    let port = free_udp_port();
    // This source allows US for itself (its operator widened its policy)...
    let source = Agent::start(
        "source",
        "source",
        dir.path(),
        &certs,
        "source-us",
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--allowed-regions".into(),
            "US,FR,DE".into(),
        ],
    )?;
    source.wait_for("listening on")?;
    // ...the target keeps the default EEA policy and refuses it.
    let target = Agent::start(
        "target",
        "target",
        dir.path(),
        &certs,
        "target",
        &[
            "--connect".into(),
            format!("127.0.0.1:{port}"),
            "--local".into(),
            format!("127.0.0.1:{}", pgferry_tests::free_tcp_port()),
        ],
    )?;
    let fp = certs.fingerprint("source-us");
    let line = target.wait_for(&format!("check region, certificate {fp}"))?;
    assert!(
        line.contains(&format!("refused peer 127.0.0.1:{port}")),
        "{line}"
    );
    assert!(line.contains("US"), "{line}");
    let refused = pgferry_tests::wait_until("audit record", Duration::from_secs(10), || {
        audit_events(&target.audit, "handshake_refused")
            .into_iter()
            .next()
    })?;
    assert_eq!(details(&refused)["check"], "region");
    assert_eq!(details(&refused)["fingerprint"], fp.as_str());
    assert!(!target.child.output().contains("tunnel up"));
    Ok(())
}

/// An agent whose own certificate fails the policy exits at once with the reason.
#[test]
fn agent_with_a_bad_own_certificate_refuses_to_start() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    certs.issue(
        "src-expired",
        &[
            "--role",
            "source",
            "--region",
            "DE",
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--not-after",
            "2021-01-01T00:00:00Z",
        ],
    )?;
    certs.issue(
        "src-us",
        &["--role", "source", "--region", "US", "--allow-non-eea"],
    )?;
    let cases = [
        ("src-expired", "expired"),
        ("src-us", "region US"),
        // The target's certificate on the source agent.
        ("target", "role target"),
    ];
    for (name, expect) in cases {
        let out = Command::new(bin_path("pgferry-source"))
            .arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_udp_port()))
            .arg("--ca")
            .arg(certs.ca())
            .arg("--cert")
            .arg(certs.pem(name))
            .arg("--key")
            .arg(certs.key(name))
            .arg("--audit-log")
            .arg(dir.join(format!("{name}.audit.jsonl")))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: agent started:\n{stderr}");
        assert!(stderr.contains("own certificate"), "{name}: {stderr}");
        assert!(stderr.contains(expect), "{name}: {stderr}");
        assert!(stderr.contains(&certs.fingerprint(name)) || stderr.contains(name));
    }
    // A key that is readable by others is refused too.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certs.key("source"), std::fs::Permissions::from_mode(0o644))?;
    let out = Command::new(bin_path("pgferry-source"))
        .args(["run", "--listen", "127.0.0.1:0", "--ca"])
        .arg(certs.ca())
        .arg("--cert")
        .arg(certs.pem("source"))
        .arg("--key")
        .arg(certs.key("source"))
        .arg("--audit-log")
        .arg(dir.join("perm.audit.jsonl"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    let _ = MIGRATION;
    Ok(())
}

/// Revoking a certificate cuts a tunnel that is already up (a migration tunnel can live for
/// days), and the peer's reconnection attempts are refused.
#[test]
fn revoking_a_connected_peer_cuts_its_tunnel() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    // An empty revocation list to start with.
    std::fs::write(certs.revocation_list(), "")?;
    let list = certs.revocation_list().to_string_lossy().to_string();
    let mut pair = support::Pair::start(
        dir.path(),
        &certs,
        &["--revocation-list".into(), list.clone()],
        &[
            "--local".into(),
            format!("127.0.0.1:{}", pgferry_tests::free_tcp_port()),
        ],
    )?;
    certs.certs(&[
        "revoke",
        "--cert",
        &certs.pem("target").to_string_lossy(),
        "--reason",
        "key leaked",
    ])?;
    let fp = certs.fingerprint("target");
    let line = pair.source.wait_for("closing tunnel with 127.0.0.1:")?;
    assert!(
        line.contains(&format!("check revoked, certificate {fp}")),
        "{line}"
    );
    assert!(line.contains("key leaked"), "{line}");
    // The target notices and redials; the source refuses it from now on.
    pair.source.wait_for(&format!(
        "check revoked, certificate {fp}: peer certificate is on the revocation list"
    ))?;
    let cut = audit_events(&pair.source.audit, "peer_cut");
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(details(&cut[0])["fingerprint"], fp.as_str());
    pair.stop()?;
    Ok(())
}

/// A flood of refused handshakes from one address is not an unbounded write load: the first
/// refusal is written in full, the rest are counted into one summary record (issue: 1,552
/// refused handshakes once added 1,552 audit records in 68 s).
#[test]
fn refusals_from_one_address_are_aggregated() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let other = Certs::make(&dir.join("other-ca"))?;
    let port = free_udp_port();
    let mut source = Agent::start(
        "source",
        "source",
        dir.path(),
        &certs,
        "source",
        &["--listen".into(), format!("127.0.0.1:{port}")],
    )?;
    source.wait_for("listening on")?;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Runtime::new()?;
    const N: u64 = 40;
    for _ in 0..N {
        let res = rt.block_on(probe::dial_from(
            "127.0.0.5:0".parse().unwrap(),
            addr,
            Some((&other.pem("target"), &other.key("target"))),
        ));
        assert!(res.is_err(), "a certificate of another CA was accepted");
    }
    // Another address still gets its own full record.
    let res = rt.block_on(probe::dial_from("127.0.0.6:0".parse().unwrap(), addr, None));
    assert!(res.is_err());
    source.wait_for("refused peer 127.0.0.6")?;
    source.stop()?;

    let from = |r: &serde_json::Value, ip: &str| {
        details(r)["address"]
            .as_str()
            .is_some_and(|a| a == ip || a.starts_with(&format!("{ip}:")))
    };
    let full: Vec<_> = audit_events(&source.audit, "handshake_refused")
        .into_iter()
        .filter(|r| from(r, "127.0.0.5"))
        .collect();
    assert_eq!(full.len(), 1, "one refusal in full: {full:?}");
    assert_eq!(details(&full[0])["check"], "chain");
    let summaries: Vec<_> = audit_events(&source.audit, "handshake_refusals_summary")
        .into_iter()
        .filter(|r| from(r, "127.0.0.5"))
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(details(&summaries[0])["count"], N - 1, "{summaries:?}");
    assert_eq!(details(&summaries[0])["reasons"]["chain"], N - 1);
    assert_eq!(
        audit_events(&source.audit, "handshake_refused")
            .into_iter()
            .filter(|r| from(r, "127.0.0.6"))
            .count(),
        1
    );
    // The operator's log is bounded the same way.
    let out = source.child.output();
    assert_eq!(out.matches("refused peer 127.0.0.5").count(), 1, "{out}");
    assert!(
        out.contains(&format!(
            "{} more refused or failed handshakes from 127.0.0.5",
            N - 1
        )),
        "{out}"
    );
    let (ok, text) = support::audit_cli(
        "source",
        &[std::ffi::OsStr::new("verify"), source.audit.as_os_str()],
    );
    assert!(ok, "{text}");
    Ok(())
}

/// A local endpoint that is not loopback would open the OLD cluster to the network (PostgreSQL
/// sees the tunnel's loopback address, so its loopback `trust` rules apply): refused at start
/// with the reason and the flag that allows it; with the flag, the choice is audited.
#[test]
fn non_loopback_local_endpoint_is_refused_unless_explicitly_allowed() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let local = pgferry_tests::free_tcp_port();
    let run = |extra: &[&str]| {
        Command::new(bin_path("pgferry-target"))
            .arg("run")
            .arg("--connect")
            .arg(format!("127.0.0.1:{}", free_udp_port()))
            .arg("--ca")
            .arg(certs.ca())
            .arg("--cert")
            .arg(certs.pem("target"))
            .arg("--key")
            .arg(certs.key("target"))
            .arg("--audit-log")
            .arg(dir.join("target.audit.jsonl"))
            .arg("--local")
            .arg(format!("0.0.0.0:{local}"))
            .args(extra)
            .output()
    };
    let out = run(&[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "target started:\n{stderr}");
    assert!(stderr.contains(&format!("0.0.0.0:{local}")), "{stderr}");
    assert!(stderr.contains("--allow-non-loopback-local"), "{stderr}");
    // Refused before anything was written or bound.
    assert!(!dir.join("target.audit.jsonl").exists());
    assert!(std::net::TcpListener::bind(("0.0.0.0", local)).is_ok());

    let mut target = Agent::start(
        "target",
        "target",
        dir.path(),
        &certs,
        "target",
        &[
            "--connect".into(),
            format!("127.0.0.1:{}", free_udp_port()),
            "--local".into(),
            format!("0.0.0.0:{local}"),
            "--allow-non-loopback-local".into(),
        ],
    )?;
    target.wait_for("is NOT loopback")?;
    let started = pgferry_tests::wait_until("agent_started", Duration::from_secs(10), || {
        audit_events(&target.audit, "agent_started")
            .into_iter()
            .next()
    })?;
    assert_eq!(details(&started)["allow_non_loopback_local"], true);
    target.stop()?;
    Ok(())
}
