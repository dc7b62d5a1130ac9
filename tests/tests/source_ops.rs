//! The typed control requests against a real source cluster: preflight facts and checks, slot
//! lifecycle, status, read-only fence and unfence, table digests.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_common::control::{FenceMode, Request, Response};
use pgferry_common::preflight::{evaluate, TargetFacts};
use pgferry_common::runtime::cli::TunnelArgs;
use pgferry_common::runtime::digest;
use pgferry_common::runtime::RunOptions;
use pgferry_source::config::SourceRunArgs;
use pgferry_source::pg;
use pgferry_target::config::TargetRunArgs;
use pgferry_tests::free_udp_port;
use pgferry_tests::{free_tcp_port, load_sample_data, table_digest, PgCluster, TestDir};
use support::{audit_events, details, Certs};

fn target_facts(now_ms: u64) -> TargetFacts {
    TargetFacts {
        major_version: 15,
        data_dir: "/srv/new".into(),
        data_dir_empty: None,
        free_bytes: 100 << 30,
        now_ms,
        round_trip_ms: 2,
        listen_addresses: None,
        tablespaces: Vec::new(),
    }
}

#[test]
fn typed_requests_on_a_real_source() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pgc = PgCluster::init(&dir.join("pg"), port)?;
    pgc.start()?;
    load_sample_data(&pgc, 5)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let c = pgc.connect("127.0.0.1", port).await?;

        // Preflight: a well-configured source passes every check.
        let facts = pg::source_facts(&c).await?;
        assert_eq!(facts.server_version_num / 10_000, 15);
        assert_eq!(facts.wal_level, "replica");
        assert!(facts.replication_role);
        assert_eq!(facts.hba_replication_from_loopback, Some(true));
        assert!(!facts.in_recovery);
        assert!(facts.database_bytes > 5 << 20);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let checks = evaluate(&facts, &target_facts(now));
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");

        // Slot lifecycle (drop is idempotent so a resumed rollback can repeat it).
        let r = pg::handle_request(
            &c,
            None,
            &Request::CreateSlot {
                slot: "pgferry_t1".into(),
            },
        )
        .await;
        let Response::SlotCreated { lsn, .. } = r else {
            panic!("{r:?}")
        };
        assert!(lsn.0 > 0);
        // Asked again (a resumed run, or a slot kept by a rollback): the same slot is reused.
        assert_eq!(pg::create_slot(&c, "pgferry_t1").await?, lsn);
        let st = pg::status(&c, Some("pgferry_t1")).await?;
        let slot = st.slot.expect("slot listed");
        assert!(!slot.active);
        assert_eq!(slot.restart_lsn, Some(lsn));
        assert!(st.current_lsn >= lsn);
        pg::drop_slot(&c, "pgferry_t1").await?;
        pg::drop_slot(&c, "pgferry_t1").await?;
        assert!(pg::status(&c, Some("pgferry_t1")).await?.slot.is_none());

        // Digests agree with the test kit's independent computation (psql COPY … ORDER BY 1).
        for t in ["ferry.orders", "ferry.events", "ferry.docs"] {
            let d = digest::table_digest(&c, t).await?;
            assert_eq!((d.rows, d.blake3), table_digest(&pgc, t)?, "{t}");
        }
        // In parallel on several connections: the same digests, in the order asked.
        let tables: Vec<String> = ["ferry.docs", "ferry.orders", "ferry.events", "ferry.orders"]
            .map(String::from)
            .to_vec();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let connect = || -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<tokio_postgres::Client>> + Send>,
        > {
            opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let pw = pgc.password.clone();
            Box::pin(async move { pgferry_tests::connect_tcp("127.0.0.1", port, &pw).await })
        };
        let parallel = digest::table_digests(&c, Some(&connect), &tables, 3).await?;
        assert_eq!(opened.into_inner(), 2, "two more connections");
        for (d, t) in parallel.iter().zip(&tables) {
            assert_eq!(&d.table, t);
            assert_eq!((d.rows, d.blake3.clone()), table_digest(&pgc, t)?, "{t}");
        }
        // Names are validated before any statement.
        let r = pg::handle_request(
            &c,
            None,
            &Request::TableDigests {
                tables: vec!["ferry.orders; DROP TABLE ferry.docs".into()],
            },
        )
        .await;
        assert!(matches!(r, Response::Error { .. }), "{r:?}");

        // Fence: another session is ended, new sessions are refused; unfence restores writes.
        // (tests/tests/fence.rs tries every way around the fence.)
        let other = pgc.connect("127.0.0.1", port).await?;
        other.batch_execute("SELECT 1").await?;
        // An unfenced source is never stopped, even when this session is read-only.
        c.batch_execute("SET default_transaction_read_only = on")
            .await?;
        let err = pg::stop_cluster(&c).await.unwrap_err();
        assert!(format!("{err:#}").contains("not fenced"), "{err:#}");
        c.batch_execute("RESET default_transaction_read_only")
            .await?;
        let (fence_lsn, report) = pg::fence(&c, FenceMode::ReadOnly).await?;
        assert!(fence_lsn >= lsn);
        assert!(report.sessions_ended >= 1, "{report:?}");
        assert!(
            other.batch_execute("SELECT 1").await.is_err(),
            "old session survived the fence"
        );
        let err = pgc.connect("127.0.0.1", port).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("pg_hba.conf rejects connection"),
            "{err:#}"
        );
        pg::unfence(&c).await?;
        let fresh = pgc.connect("127.0.0.1", port).await?;
        fresh
            .batch_execute("INSERT INTO ferry.orders VALUES (-1, 'x', 1, now(), 'new')")
            .await?;
        anyhow::Ok(())
    })?;

    // Preflight refuses wal_level = minimal, naming the setting and the fix.
    pgc.psql("ALTER SYSTEM SET wal_level = minimal")?;
    pgc.psql("ALTER SYSTEM SET max_wal_senders = 0")?;
    pgc.stop()?;
    pgc.start()?;
    rt.block_on(async {
        let c = pgc.connect("127.0.0.1", port).await?;
        let facts = pg::source_facts(&c).await?;
        let failed: Vec<_> = evaluate(&facts, &target_facts(facts.now_ms))
            .into_iter()
            .filter(|c| !c.ok)
            .collect();
        let wal = failed
            .iter()
            .find(|c| c.name == "wal_level")
            .expect("wal_level fails");
        assert!(wal.detail.contains("minimal"), "{wal:?}");
        assert!(wal.fix.contains("wal_level = replica"), "{wal:?}");
        assert!(failed.iter().any(|c| c.name == "max_wal_senders"));
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The base copy serves only the files of its own plan. A target (compromised, or a second
/// copy with its certificate) that names anything else, a path out of the data directory, a
/// file PostgreSQL's rules leave out, or another backup's id, gets a refusal and no byte.
#[test]
fn the_base_copy_serves_only_the_files_of_its_plan() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pgc = PgCluster::init(&dir.join("pg"), port)?;
    pgc.start()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let c = pgc.connect("127.0.0.1", port).await?;
        let shared = pgferry_source::backup::SharedBackup::default();
        let plan = pgferry_source::backup::start(
            &shared,
            &c,
            pgc.connect("127.0.0.1", port),
            "pgferry plan test",
        )
        .await?;
        let planned = |p: &str| plan.entries.iter().any(|e| e.path == p && !e.dir);
        let whole = |id: u64, path: &str| pgferry_common::control::FileHeader {
            backup_id: id,
            offset: 0,
            end: pgferry_common::control::FileHeader::TO_THE_END,
            path: path.to_string(),
        };
        assert!(planned("PG_VERSION") && planned("global/pg_control"));
        let outside = [
            "../../../../../../etc/passwd",
            "/etc/passwd",
            "base/../../pg/postmaster.pid",
            "postmaster.pid",
            "postmaster.opts",
            "pg_wal",
            "./PG_VERSION",
            "PG_VERSION/",
        ];
        for path in outside {
            assert!(!planned(path), "{path} is in the plan");
            let e = pgferry_source::backup::open_file(&shared, &whole(plan.id, path))
                .await
                .err()
                .with_context(|| format!("{path} was served"))?;
            assert!(
                format!("{e:#}").contains("is not a file of base copy"),
                "{e:#}"
            );
            let e = pgferry_source::backup::digests(&shared, plan.id, &[path.to_string()], &[])
                .await
                .err()
                .with_context(|| format!("{path} was digested"))?;
            assert!(
                format!("{e:#}").contains("is not a file of base copy"),
                "{e:#}"
            );
            let e = pgferry_source::backup::range_digests(&shared, plan.id, path)
                .await
                .err()
                .with_context(|| format!("{path} was digested by range"))?;
            assert!(
                format!("{e:#}").contains("is not a file of base copy"),
                "{e:#}"
            );
        }
        // A range is served alone, and range digests are the BLAKE3 of the file's ranges.
        let catalog = plan
            .entries
            .iter()
            .filter(|e| !e.dir && e.path.starts_with("base/"))
            .max_by_key(|e| e.size)
            .context("a catalog file")?;
        let bytes = std::fs::read(pgc.datadir.join(&catalog.path))?;
        let (size, range, sums) =
            pgferry_source::backup::range_digests(&shared, plan.id, &catalog.path).await?;
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(range, pgferry_common::control::MIN_FILE_RANGE);
        let want: Vec<String> = bytes
            .chunks(range as usize)
            .map(|c| blake3::hash(c).to_hex().to_string())
            .collect();
        assert_eq!(sums, want);
        let mut h = whole(plan.id, &catalog.path);
        (h.offset, h.end) = (8192, 3 * 8192);
        let mut served = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(
            &mut pgferry_source::backup::open_file(&shared, &h).await?.reader,
            &mut served,
        )
        .await?;
        assert_eq!(served, bytes[8192..3 * 8192], "{}", catalog.path);
        // One bad path refuses the whole request, not just its own answer.
        assert!(pgferry_source::backup::digests(
            &shared,
            plan.id,
            &["PG_VERSION".into(), "/etc/shadow".into()],
            &[],
        )
        .await
        .is_err());
        // Another backup's id: nothing, even for a planned file.
        let e = pgferry_source::backup::open_file(&shared, &whole(plan.id ^ 1, "PG_VERSION"))
            .await
            .err()
            .context("served under another id")?;
        assert!(format!("{e:#}").contains("no base copy"), "{e:#}");
        // The plan's own files are served, and digested (whole, or a prefix).
        assert!(
            pgferry_source::backup::open_file(&shared, &whole(plan.id, "PG_VERSION"))
                .await
                .is_ok()
        );
        let d = pgferry_source::backup::digests(
            &shared,
            plan.id,
            &["PG_VERSION".into(), "PG_VERSION".into()],
            &[u64::MAX, 1],
        )
        .await?;
        assert_eq!((d[0].size, d[1].size), (3, 1), "{d:?}");
        assert_ne!(d[0].sha256, d[1].sha256);
        // A stop asked again (its answer lost to an outage) gets the same answer (a second
        // pg_backup_stop would fail: no backup in progress), and the stopped copy serves
        // nothing more.
        let (first, record) = pgferry_source::backup::stop(&shared, plan.id).await?;
        let (again, none) = pgferry_source::backup::stop(&shared, plan.id).await?;
        assert_eq!(first, again);
        // One audit record of what the copy sent, at the first stop: the refused paths are in
        // it (the served streams go through the tunnel, not these direct calls).
        let record = record.context("the audit record")?;
        assert!(none.is_none());
        assert_eq!(
            record.files_planned,
            plan.entries.iter().filter(|e| !e.dir).count() as u64
        );
        assert!(first.0.contains("START WAL LOCATION"), "{}", first.0);
        for e in [
            pgferry_source::backup::open_file(&shared, &whole(plan.id, "PG_VERSION"))
                .await
                .err(),
            pgferry_source::backup::digests(&shared, plan.id, &["PG_VERSION".into()], &[])
                .await
                .err(),
        ] {
            let e = e.context("served after the stop")?;
            assert!(format!("{e:#}").contains("no base copy"), "{e:#}");
        }
        // The same label after the stop is a new backup.
        let next = pgferry_source::backup::start(
            &shared,
            &c,
            pgc.connect("127.0.0.1", port),
            "pgferry plan test",
        )
        .await?;
        assert_ne!(next.id, plan.id);
        pgferry_source::backup::stop(&shared, next.id).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The same requests sent by a target agent over the tunnel's control stream and answered by
/// the source agent on its own PostgreSQL connection; each is audited on the source.
#[test]
fn requests_cross_the_tunnel_and_are_audited() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pgc = PgCluster::init(&dir.join("pg"), port)?;
    pgc.start()?;
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
        writeln!(f, "{}", pgc.password)?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let udp = free_udp_port();
        let source_audit = dir.join("source.audit.jsonl");
        let source_cfg = pgferry_source::config::resolve(SourceRunArgs {
            tunnel: TunnelArgs {
                listen: Some(format!("127.0.0.1:{udp}")),
                ca: Some(certs.ca()),
                cert: Some(certs.pem("source")),
                key: Some(certs.key("source")),
                audit_log: Some(source_audit.clone()),
                ..Default::default()
            },
            upstream: Some(format!("127.0.0.1:{port}")),
            pg_conninfo: Some(format!(
                "host=127.0.0.1 port={port} user=postgres dbname=postgres"
            )),
            pg_password_file: Some(pwfile.clone()),
        })?;
        let target_cfg = pgferry_target::config::resolve(TargetRunArgs {
            tunnel: TunnelArgs {
                connect: Some(format!("127.0.0.1:{udp}")),
                ca: Some(certs.ca()),
                cert: Some(certs.pem("target")),
                key: Some(certs.key("target")),
                audit_log: Some(dir.join("target.audit.jsonl")),
                ..Default::default()
            },
            local: Some(format!("127.0.0.1:{}", free_tcp_port())),
            ..Default::default()
        })?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let source = tokio::spawn(pgferry_source::run(
            source_cfg,
            stopped(stop_rx.clone()),
            RunOptions {
                ready: Some(ready_tx),
                ..Default::default()
            },
        ));
        ready_rx.await.context("source did not come up")?;
        let (tunnels_tx, mut tunnels_rx) = tokio::sync::mpsc::unbounded_channel();
        let target = tokio::spawn(pgferry_target::run(
            target_cfg,
            stopped(stop_rx.clone()),
            RunOptions::default(),
            pgferry_target::TargetOptions {
                tunnels: Some(tunnels_tx),
            },
        ));
        let control = tokio::time::timeout(Duration::from_secs(20), tunnels_rx.recv())
            .await?
            .context("no tunnel")?;
        let t = Duration::from_secs(20);

        let r = control.request(Request::PreflightFacts, t).await?;
        let Response::Facts { facts } = r else {
            panic!("{r:?}")
        };
        assert_eq!(facts.wal_level, "replica");
        let r = control
            .request(
                Request::CreateSlot {
                    slot: "pgferry_tunnel".into(),
                },
                t,
            )
            .await?;
        assert!(matches!(r, Response::SlotCreated { .. }), "{r:?}");
        let r = control
            .request(
                Request::Status {
                    slot: Some("pgferry_tunnel".into()),
                },
                t,
            )
            .await?;
        let Response::Status { status } = r else {
            panic!("{r:?}")
        };
        assert_eq!(status.slot.unwrap().name, "pgferry_tunnel");
        let r = control
            .request(
                Request::DropSlot {
                    slot: "pgferry_tunnel".into(),
                },
                t,
            )
            .await?;
        assert!(matches!(r, Response::SlotDropped { .. }), "{r:?}");
        // A bad name never leaves the target.
        assert!(control
            .request(
                Request::DropSlot {
                    slot: "X; --".into()
                },
                t
            )
            .await
            .is_err());
        // A failing request is an answer, not a broken tunnel.
        let r = control
            .request(
                Request::TableDigests {
                    tables: vec!["public.missing".into()],
                },
                t,
            )
            .await?;
        let Response::Error { message } = r else {
            panic!("{r:?}")
        };
        assert!(message.contains("missing"), "{message}");
        let r = control.request(Request::Status { slot: None }, t).await?;
        assert!(matches!(r, Response::Status { .. }), "{r:?}");

        stop_tx.send(true)?;
        tokio::time::timeout(Duration::from_secs(40), target).await???;
        tokio::time::timeout(Duration::from_secs(40), source).await???;
        let requests = audit_events(&source_audit, "control_request");
        let ops: Vec<_> = requests
            .iter()
            .map(|r| details(r)["op"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            ops,
            [
                "preflight_facts",
                "create_slot",
                "status",
                "drop_slot",
                "table_digests",
                "status"
            ]
        );
        assert_eq!(details(&requests[4])["result"], "error");
        // The password never reaches the audit log.
        assert!(!std::fs::read_to_string(&source_audit)?.contains(&pgc.password));
        anyhow::Ok(())
    })?;
    Ok(())
}
