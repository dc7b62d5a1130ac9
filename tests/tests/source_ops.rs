//! The typed control requests against a real source cluster: preflight facts and checks, slot
//! lifecycle, status, read-only fence and unfence, table digests.

use anyhow::Result;
use pgferry_common::control::{FenceMode, Request, Response};
use pgferry_common::preflight::{evaluate, TargetFacts};
use pgferry_common::runtime::pg;
use pgferry_tests::{free_tcp_port, load_sample_data, table_digest, PgCluster, TestDir};

fn target_facts(now_ms: u64) -> TargetFacts {
    TargetFacts {
        major_version: 15,
        data_dir: "/srv/new".into(),
        data_dir_empty: None,
        free_bytes: 100 << 30,
        now_ms,
        round_trip_ms: 2,
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
            &Request::CreateSlot {
                slot: "pgferry_t1".into(),
            },
        )
        .await;
        let Response::SlotCreated { lsn, .. } = r else {
            panic!("{r:?}")
        };
        assert!(lsn.0 > 0);
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
            let d = pg::table_digest(&c, t).await?;
            assert_eq!((d.rows, d.blake3), table_digest(&pgc, t)?, "{t}");
        }
        // Names are validated before any statement.
        let r = pg::handle_request(
            &c,
            &Request::TableDigests {
                tables: vec!["ferry.orders; DROP TABLE ferry.docs".into()],
            },
        )
        .await;
        assert!(matches!(r, Response::Error { .. }), "{r:?}");

        // Fence: another session is ended, new sessions cannot write; unfence restores writes.
        let other = pgc.connect("127.0.0.1", port).await?;
        other.batch_execute("SELECT 1").await?;
        let fence_lsn = pg::fence(&c, FenceMode::ReadOnly).await?;
        assert!(fence_lsn >= lsn);
        assert!(
            other.batch_execute("SELECT 1").await.is_err(),
            "old session survived the fence"
        );
        let fresh = pgc.connect("127.0.0.1", port).await?;
        let err = fresh
            .batch_execute("INSERT INTO ferry.orders VALUES (-1, 'x', 1, now(), 'new')")
            .await
            .unwrap_err();
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains("read-only"), "{err:?}");
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
