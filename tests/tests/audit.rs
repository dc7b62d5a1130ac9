//! The audit log against an attacker and an operator's mistakes, with real agents: a second
//! agent started on a running agent's log, a run forged into the source's log with the
//! target's key, and a whole run cut from the end of one log.

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use pgferry_common::audit::{AuditError, AuditLog, CheckpointSigner, CHECKPOINT_DOMAIN};
use pgferry_tests::{bin_path, free_tcp_port, free_udp_port, wait_until, ChildGuard, TestDir};
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Map, Value};
use support::{audit_cli, audit_events, audit_verify_peer, Agent, Certs, Pair, MIGRATION};

/// `run` arguments of a lone agent: the source listens on `port`; the target dials `port`
/// (nobody answers) and offers a local endpoint on `local`.
fn lone_agent_args(role: &str, port: u16, local: u16) -> Vec<String> {
    match role {
        "source" => vec!["--listen".into(), format!("127.0.0.1:{port}")],
        _ => vec![
            "--connect".into(),
            format!("127.0.0.1:{port}"),
            "--local".into(),
            format!("127.0.0.1:{local}"),
        ],
    }
}

/// Regression: a second start of an agent appended `log_resumed` (and, on the source,
/// `agent_started`) to the running agent's log, and the log then failed with "line 8: seq 6,
/// expected 7". Now the second agent exits at once, naming the first one's pid.
#[test]
fn a_second_agent_on_a_running_agents_audit_log_is_refused() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    for role in ["source", "target"] {
        let port = free_udp_port();
        let mut first = Agent::start(
            role,
            role,
            dir.path(),
            &certs,
            role,
            &lone_agent_args(role, port, free_tcp_port()),
        )?;
        wait_until("agent_started", Duration::from_secs(30), || {
            (!audit_events(&first.audit, "agent_started").is_empty()).then_some(())
        })?;

        // The same log; another UDP port and local endpoint (and admin socket), so that the
        // log is the only thing the two agents share.
        let mut cmd = Command::new(bin_path(&format!("pgferry-{role}")));
        cmd.arg("run")
            .args(certs.tls_args(role))
            .arg("--audit-log")
            .arg(&first.audit)
            .args(lone_agent_args(role, free_udp_port(), free_tcp_port()));
        if role == "target" {
            cmd.arg("--admin-socket").arg(dir.join("second.sock"));
        }
        let mut second = ChildGuard::spawn(&format!("second {role}"), cmd)?;
        let status = second.wait(Duration::from_secs(30))?;
        let out = second.output();
        assert!(!status.success(), "{role}: the second agent ran:\n{out}");
        let expected = format!(
            "another pgferry agent is writing this audit log {} (pid {})",
            first.audit.display(),
            first.child.pid()
        );
        assert!(out.contains(&expected), "{role}: {out}");

        // The first agent's log has nothing of the second's, and readers are not locked out.
        assert_eq!(audit_events(&first.audit, "agent_started").len(), 1);
        assert!(audit_events(&first.audit, "log_resumed").is_empty());
        let audit = first.audit.clone();
        let log = audit.as_os_str();
        let (ok, text) = audit_cli(
            role,
            &[OsStr::new("verify"), log, OsStr::new("--allow-open")],
        );
        assert!(ok, "{role}: {text}");
        // A live log's report needs --allow-open: without it, the unsigned tail fails it.
        let (ok, text) = audit_cli(role, &[OsStr::new("report"), log]);
        assert!(!ok, "{role}: {text}");
        assert!(text.contains("Verdict:  FAILED"), "{role}: {text}");
        let (ok, text) = audit_cli(
            role,
            &[OsStr::new("report"), log, OsStr::new("--allow-open")],
        );
        assert!(ok, "{role}: {text}");

        first.stop()?;
        let (ok, text) = audit_cli(
            role,
            &[
                OsStr::new("verify"),
                log,
                OsStr::new("--ca"),
                certs.ca().as_os_str(),
            ],
        );
        assert!(
            ok,
            "{role}: the first agent's log no longer verifies: {text}"
        );
        // Stopped, it no longer holds the log: the next start appends to it.
        let mut again = Agent::start(
            role,
            role,
            dir.path(),
            &certs,
            role,
            &lone_agent_args(role, free_udp_port(), free_tcp_port()),
        )?;
        wait_until("a second agent_started", Duration::from_secs(30), || {
            (audit_events(&again.audit, "agent_started").len() == 2).then_some(())
        })?;
        again.stop()?;
    }
    Ok(())
}

/// The DER of a PEM certificate file.
fn cert_der(path: &Path) -> Result<Vec<u8>> {
    Ok(rustls::pki_types::CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_vec())
}

/// The PKCS#8 DER of a PEM key file.
fn key_der(path: &Path) -> Result<Vec<u8>> {
    Ok(rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?
        .secret_pkcs8_der()
        .to_vec())
}

/// Appends records to a log as anyone who can write the file and holds `key` can: the hash
/// chain is unkeyed, and the checkpoint at the end is a valid signature by `key` naming the
/// certificate `cert`.
struct Forger {
    lines: Vec<String>,
}

impl Forger {
    fn new(log: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(log)?;
        Ok(Self {
            lines: text.lines().map(str::to_string).collect(),
        })
    }

    fn last_hash(&self) -> String {
        let last: Value = serde_json::from_str(self.lines.last().expect("a log")).unwrap();
        last["hash"].as_str().unwrap().to_string()
    }

    fn push(&mut self, event: &str, details: Value) {
        let mut m = Map::new();
        m.insert("details".into(), details);
        m.insert("event".into(), event.into());
        m.insert("prev".into(), self.last_hash().into());
        m.insert("seq".into(), self.lines.len().into());
        m.insert("time".into(), "2026-12-01T12:00:00.000Z".into());
        // Canonical JSON (sorted keys, no whitespace), as the log hashes it.
        let hash = blake3::hash(Value::Object(m.clone()).to_string().as_bytes())
            .to_hex()
            .to_string();
        m.insert("hash".into(), hash.into());
        self.lines.push(Value::Object(m).to_string());
    }

    fn checkpoint(&mut self, key: &[u8], cert: &[u8]) {
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            key,
            &rng,
        )
        .unwrap();
        let signed = self.last_hash();
        let mut message = CHECKPOINT_DOMAIN.to_vec();
        message.extend_from_slice(&hex::decode(&signed).unwrap());
        let signature = pair.sign(&rng, &message).unwrap();
        let details = json!({
            "algorithm": "ecdsa-p256-sha256",
            "fingerprint": pgferry_common::identity::Fingerprint::of_der(cert).to_string(),
            "records": self.lines.len(),
            "signed_hash": signed,
            "signature": base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        });
        self.push("checkpoint", details);
    }

    fn write(&self, path: &Path) -> Result<()> {
        Ok(std::fs::write(path, self.lines.join("\n") + "\n")?)
    }
}

/// Runs `pgferry-source audit verify LOG ARGS…`.
fn verify(log: &Path, args: &[&OsStr]) -> (bool, String) {
    let mut all = vec![OsStr::new("verify"), log.as_os_str()];
    all.extend_from_slice(args);
    audit_cli("source", &all)
}

/// Regression (issue 11): a run appended to the source's log with `role: "source"` in every
/// record, but the target's certificate in its `agent_started` and its checkpoint signed with
/// the target's key, passed `audit verify --ca` and `--peer`.
#[test]
fn a_run_forged_into_the_source_log_with_the_target_key_fails_verify() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let mut pair = Pair::start(
        dir.path(),
        &certs,
        &[],
        &["--local".into(), format!("127.0.0.1:{}", free_tcp_port())],
    )?;
    pair.stop()?;
    let (source_log, target_log) = (pair.source.audit.clone(), pair.target.audit.clone());
    let ca = certs.ca();
    let (ok, text) = verify(
        &source_log,
        &[
            OsStr::new("--ca"),
            ca.as_os_str(),
            OsStr::new("--peer"),
            target_log.as_os_str(),
        ],
    );
    assert!(ok, "the genuine logs: {text}");

    let (target_cert, target_key) = (
        cert_der(&certs.pem("target"))?,
        key_der(&certs.key("target"))?,
    );
    let target_fp = certs.fingerprint("target");
    let mut forger = Forger::new(&source_log)?;
    let first_forged_line = forger.lines.len() + 1;
    forger.push(
        "agent_started",
        json!({
            "role": "source", "region": "DE", "migration": MIGRATION,
            "certificate": base64::engine::general_purpose::STANDARD.encode(&target_cert),
            "fingerprint": target_fp, "version": "0.1.0",
        }),
    );
    forger.push(
        "stream_closed",
        json!({"session_id": "00000000deadbeef", "service": "postgres", "outcome": "ok", "duration_ms": 10,
               "sent": {"raw_bytes": 0, "wire_bytes": 0, "chunks": 0, "digest": "00".repeat(32)},
               "received": {"raw_bytes": 0, "wire_bytes": 0, "chunks": 0, "digest": "00".repeat(32)}}),
    );
    forger.push("agent_stopped", json!({"drained": true, "streams_cut": 0}));
    forger.checkpoint(&target_key, &target_cert);
    let forged = dir.join("forged-source.audit.jsonl");
    forger.write(&forged)?;

    let expected = format!(
        "line {first_forged_line}: details.role is \"source\", but the certificate in details.certificate ({target_fp}) is issued for role \"target\""
    );
    for args in [vec![], vec![OsStr::new("--ca"), ca.as_os_str()]] {
        let (ok, text) = verify(&forged, &args);
        eprintln!("audit verify {args:?} of the forged log:\n{text}");
        assert!(!ok, "the forged log verified with {args:?}: {text}");
        assert!(text.contains(&expected), "{args:?}: {text}");
    }
    let (ok, text) = verify(&forged, &[OsStr::new("--peer"), target_log.as_os_str()]);
    assert!(!ok && text.contains(&expected), "{text}");

    // The library will not write it either: the target's key cannot open the source's log.
    let copy = dir.join("copy-source.audit.jsonl");
    std::fs::copy(&source_log, &copy)?;
    let before = std::fs::read(&copy)?;
    let signer = CheckpointSigner::new(&target_key, &target_cert)?;
    match AuditLog::open(&copy, signer) {
        Err(e @ AuditError::WrongLog { .. }) => {
            assert!(e.to_string().contains("belongs to the source agent"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&copy)?, before, "nothing written");
    Ok(())
}

/// `verify` of one log cannot see a whole later run cut from its end (it ends with an
/// `agent_stopped` checkpoint, like a complete log), but the peer's log recorded that run's
/// tunnel session: `--peer` fails and names it.
#[test]
fn a_log_without_a_run_its_peer_recorded_fails_peer() -> Result<()> {
    let dir = TestDir::new()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let local = || {
        vec![
            "--local".to_string(),
            format!("127.0.0.1:{}", free_tcp_port()),
        ]
    };
    let mut first = Pair::start(dir.path(), &certs, &[], &local())?;
    first.stop()?;
    let target_log: PathBuf = first.target.audit.clone();
    let run_one_lines = std::fs::read_to_string(&target_log)?.lines().count();
    // Well apart (more than the comparison's clock slack), as restarts usually are.
    std::thread::sleep(Duration::from_secs(6));
    let mut second = Pair::start(dir.path(), &certs, &[], &local())?;
    second.stop()?;
    let source_log = second.source.audit.clone();
    let (ok, text) = audit_verify_peer("source", &source_log, &target_log);
    eprintln!("audit verify --peer of both complete logs:\n{text}");
    assert!(ok, "both complete logs: {text}");
    assert!(text.contains("2 tunnel session(s) in both logs"), "{text}");

    // The target's second run cut off after run 1's final checkpoint.
    let text = std::fs::read_to_string(&target_log)?;
    let cut: String = text
        .lines()
        .take(run_one_lines)
        .map(|l| format!("{l}\n"))
        .collect();
    let cut_log = dir.join("target-cut.audit.jsonl");
    std::fs::write(&cut_log, cut)?;
    let (ok, text) = audit_cli("target", &[OsStr::new("verify"), cut_log.as_os_str()]);
    assert!(ok, "one log alone cannot tell (documented): {text}");

    let (ok, text) = audit_verify_peer("source", &source_log, &cut_log);
    eprintln!("audit verify --peer with the cut log:\n{text}");
    assert!(!ok, "--peer passed: {text}");
    let source_sessions = audit_events(&source_log, "handshake_accepted");
    assert_eq!(source_sessions.len(), 2);
    let records = support::audit_records(&source_log);
    let line = 1 + records
        .iter()
        .rposition(|r| r["event"] == "handshake_accepted")
        .unwrap();
    for needle in [
        "peer comparison: FAILED: the logs do not describe the same sessions".to_string(),
        format!("{} line {line} (", source_log.display()),
        format!(
            "tunnel session with certificate {}, not in {}",
            certs.fingerprint("target"),
            cut_log.display()
        ),
        format!("a later run of {}'s agent is missing", cut_log.display()),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in\n{text}");
    }
    // Whichever log is named first.
    let (ok, text) = audit_verify_peer("target", &cut_log, &source_log);
    assert!(!ok && text.contains("a later run of"), "{text}");
    Ok(())
}
