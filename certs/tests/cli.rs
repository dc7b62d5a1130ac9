//! pgferry-certs as an operator runs it: the real binary in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use pgferry_common::identity::{Fingerprint, PeerIdentity, RevocationList, Role};

fn certs(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgferry-certs"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("running pgferry-certs")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    p.contents
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_inspect_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&certs(dir, &["init", "--migration", "eu-move"]));
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    ok(&certs(
        dir,
        &[
            "issue",
            "--role",
            "source",
            "--region",
            "de",
            "--name",
            "db-old.example",
            "--name",
            "10.0.0.5",
        ],
    ));
    assert_eq!(mode(&dir.join("source.key")), 0o600);
    let leaf = der(&dir.join("source.pem"));
    let id = PeerIdentity::from_der(&leaf).unwrap();
    assert_eq!(id.role, Role::Source);
    assert_eq!(id.region.as_str(), "DE");
    assert_eq!(id.migration.as_str(), "eu-move");
    assert_eq!(id.names, vec!["db-old.example", "10.0.0.5"]);
    let days = (id.not_after - id.not_before).whole_days();
    assert!((29..=31).contains(&days), "{days} days");

    // The leaf is signed by the CA.
    let ca = der(&dir.join("ca.pem"));
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca).unwrap();
    let (_, leaf_cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    leaf_cert
        .verify_signature(Some(ca_cert.public_key()))
        .unwrap();

    let out = ok(&Command::new(env!("CARGO_BIN_EXE_pgferry-certs"))
        .args(["inspect"])
        .arg(dir.join("source.pem"))
        .output()
        .unwrap());
    for want in [
        "role         source",
        "region       DE (EEA)",
        "migration    eu-move",
        "(valid)",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    assert!(
        out.contains(&Fingerprint::of_der(&leaf).to_string()),
        "{out}"
    );
    let json = ok(&Command::new(env!("CARGO_BIN_EXE_pgferry-certs"))
        .args(["inspect", "--json"])
        .arg(dir.join("source.pem"))
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["role"], "source");
    assert_eq!(v["eea"], true);
}

#[test]
fn regions_outside_the_eea_need_a_flag_and_bad_codes_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&certs(dir, &["init", "--migration", "m"]));
    let o = certs(
        dir,
        &["issue", "--role", "target", "--region", "US", "--name", "h"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-non-eea"));
    assert!(
        !dir.join("target.pem").exists(),
        "nothing written on refusal"
    );
    let o = certs(
        dir,
        &[
            "issue",
            "--role",
            "target",
            "--region",
            "US",
            "--name",
            "h",
            "--allow-non-eea",
        ],
    );
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
    let o = certs(
        dir,
        &[
            "issue", "--role", "target", "--region", "XX", "--name", "h", "--out", "x",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ISO 3166"));
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&certs(dir, &["init", "--migration", "m"]));
    let before = std::fs::read(dir.join("ca.key")).unwrap();
    let o = certs(dir, &["init", "--migration", "m"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    ok(&certs(dir, &["init", "--migration", "m", "--force"]));
    assert_ne!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn revoke_by_file_or_fingerprint_is_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&certs(dir, &["init", "--migration", "m"]));
    ok(&certs(
        dir,
        &["issue", "--role", "target", "--region", "FR", "--name", "h"],
    ));
    let fp = Fingerprint::of_der(&der(&dir.join("target.pem")));
    ok(&certs(
        dir,
        &[
            "revoke",
            "--cert",
            &dir.join("target.pem").to_string_lossy(),
            "--reason",
            "lost",
        ],
    ));
    let out = ok(&certs(dir, &["revoke", &fp.colon_hex()]));
    assert!(out.contains("already revoked"), "{out}");
    let list = RevocationList::load(&dir.join("revoked.txt")).unwrap();
    assert!(list.contains(&fp));
    assert_eq!(list.len(), 1);
    assert!(list.note(&fp).unwrap().contains("lost"));
}

#[test]
fn validity_can_be_set_and_inspect_reports_expiry() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&certs(dir, &["init", "--migration", "m"]));
    ok(&certs(
        dir,
        &[
            "issue",
            "--role",
            "source",
            "--region",
            "NO",
            "--name",
            "h",
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--not-after",
            "2021-01-01T00:00:00Z",
        ],
    ));
    let out = ok(&Command::new(env!("CARGO_BIN_EXE_pgferry-certs"))
        .arg("inspect")
        .arg(dir.join("source.pem"))
        .output()
        .unwrap());
    assert!(out.contains("(expired)"), "{out}");
    // An organisation-wide CA can issue for a named migration.
    ok(&certs(
        dir,
        &[
            "issue",
            "--role",
            "target",
            "--region",
            "IS",
            "--name",
            "h",
            "--migration",
            "other",
        ],
    ));
    let id = PeerIdentity::from_der(&der(&dir.join("target.pem"))).unwrap();
    assert_eq!(id.migration.as_str(), "other");
}
