//! `pgferry-target preflight` against real agents and a real source: every check is printed;
//! a source with `wal_level = minimal` is refused with the setting and the fix named; a
//! non-empty target data directory too; nothing changes on either host.

mod support;

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use pgferry_tests::{bin_path, free_tcp_port, PgCluster, TestDir};
use support::{audit_events, details, Certs, Pair};

fn preflight(socket: &Path, json: bool) -> (bool, String) {
    let mut cmd = Command::new(bin_path("pgferry-target"));
    cmd.arg("preflight").arg("--admin-socket").arg(socket);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("running pgferry-target preflight");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn preflight_reports_every_check_and_refuses_minimal_wal() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("source-pg"), port)?;
    pg.start()?;
    let certs = Certs::make(&dir.join("certs"))?;
    let pwfile = dir.join("pgpass");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pwfile)?;
        writeln!(f, "{}", pg.password)?;
    }
    let socket = dir.join("admin.sock");
    let data_dir = dir.join("new-cluster");
    let mut pair = Pair::start(
        dir.path(),
        &certs,
        &[
            "--upstream".into(),
            format!("127.0.0.1:{port}"),
            "--pg-conninfo".into(),
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            "--pg-password-file".into(),
            pwfile.to_string_lossy().into(),
        ],
        &[
            "--local".into(),
            format!("127.0.0.1:{}", free_tcp_port()),
            "--admin-socket".into(),
            socket.to_string_lossy().into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into(),
        ],
    )?;
    pair.target.wait_for("admin socket")?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket)?.permissions().mode() & 0o777,
        0o600
    );

    // A good pair: every check passes, exit 0.
    let (ok, out) = preflight(&socket, false);
    eprintln!("{out}");
    assert!(ok, "{out}");
    for name in [
        "major_version",
        "wal_level",
        "max_wal_senders",
        "max_replication_slots",
        "replication_role",
        "pg_hba_replication",
        "target_data_dir",
        "free_disk",
        "clock_skew",
    ] {
        assert!(out.contains(name), "{name} missing:\n{out}");
    }
    assert!(out.contains("checks passed"), "{out}");

    // A non-empty target data directory is refused.
    std::fs::create_dir_all(&data_dir)?;
    std::fs::write(data_dir.join("PG_VERSION"), "15\n")?;
    let (ok, out) = preflight(&socket, false);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL  target_data_dir"), "{out}");
    std::fs::remove_dir_all(&data_dir)?;

    // wal_level = minimal on the source: refused with the setting and the fix.
    pg.psql("ALTER SYSTEM SET wal_level = minimal")?;
    pg.psql("ALTER SYSTEM SET max_wal_senders = 0")?;
    pg.stop()?;
    pg.start()?;
    let (ok, out) = preflight(&socket, false);
    assert!(!ok, "{out}");
    eprintln!("{out}");
    let line = out
        .lines()
        .find(|l| l.contains("FAIL  wal_level"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("minimal"), "{line}");
    assert!(out.contains("fix: set wal_level = replica"), "{out}");
    assert!(out.contains("nothing was changed"), "{out}");
    let (_, json) = preflight(&socket, true);
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(v["ok"], false);
    assert_eq!(v["source"]["wal_level"], "minimal");

    // Nothing changed on either host: no slot, no data directory.
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots")?, "0");
    assert!(!data_dir.exists());
    pair.stop()?;
    let runs = audit_events(&pair.target.audit, "preflight");
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert_eq!(details(&runs[0])["ok"], true);
    assert_eq!(details(&runs[2])["failed"][0], "wal_level");
    assert!(!socket.exists(), "admin socket removed at shutdown");
    Ok(())
}
