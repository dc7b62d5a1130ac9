//! The PostgreSQL side of the typed control requests: each
//! [`pgferry_common::control::Request`] maps to fixed statements here, with names passed as
//! parameters or quoted identifiers checked by
//! [`pgferry_common::control::Request::validate`] first. No SQL text ever arrives from the
//! network.
//!
//! Table digests are computed by the same code on both sides
//! ([`pgferry_common::runtime::digest`]). The fence and its undoing are in [`crate::fence`].

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

pub use crate::fence::{fence, unfence};
use pgferry_common::control::{
    DependentSlot, DependentStandby, DependentSubscription, Dependents, OpenTransaction,
    ReplicationRow, Request, Response, SlotRow, SourceStatus,
};
use pgferry_common::migration::Lsn;
use pgferry_common::preflight::SourceFacts;
use pgferry_common::runtime::digest::{block_digests, digest_parallelism, table_digests, Connect};

/// Runs one request against the source cluster; errors become [`Response::Error`]. `connect`
/// opens further connections for digests in parallel (without it they run one by one on
/// `client`).
pub async fn handle_request(
    client: &Client,
    connect: Option<Connect<'_>>,
    request: &Request,
) -> Response {
    if let Err(message) = request.validate() {
        return Response::Error { message };
    }
    let result = match request {
        Request::PreflightFacts => source_facts(client)
            .await
            .map(|facts| Response::Facts { facts }),
        Request::CreateSlot { slot } => {
            create_slot(client, slot)
                .await
                .map(|lsn| Response::SlotCreated {
                    slot: slot.clone(),
                    lsn,
                })
        }
        Request::DropSlot { slot } => drop_slot(client, slot)
            .await
            .map(|()| Response::SlotDropped { slot: slot.clone() }),
        Request::Status { slot } => status(client, slot.as_deref())
            .await
            .map(|status| Response::Status { status }),
        Request::Fence { mode } => {
            fence(client, *mode)
                .await
                .map(|(lsn, report)| Response::Fenced {
                    lsn,
                    report: Some(report),
                })
        }
        Request::Unfence => unfence(client).await.map(|()| Response::Unfenced),
        Request::StopCluster => stop_cluster(client)
            .await
            .map(|()| Response::ClusterStopped),
        Request::TableDigests { tables } => {
            table_digests(client, connect, tables, digest_parallelism())
                .await
                .map(|digests| Response::TableDigests { digests })
        }
        Request::PrepassBegin => prepass_begin(client)
            .await
            .map(|(lsn, xmax)| Response::PrepassBegun { lsn, xmax }),
        Request::PrepassWait { xmax } => prepass_wait(client, *xmax).await,
        Request::BlockDigests { tables } => {
            block_digests(client, connect, tables, digest_parallelism())
                .await
                .map(|tables| Response::BlockDigests { tables })
        }
        Request::Dependents { slot } => dependents(client, slot)
            .await
            .map(|dependents| Response::Dependents { dependents }),
        // The base copy keeps a session of its own: the request loop answers these.
        Request::BackupStart { .. }
        | Request::BackupStop { .. }
        | Request::FileDigests { .. }
        | Request::RangeDigests { .. } => Err(anyhow::anyhow!(
            "a base copy request outside the request loop"
        )),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

fn lsn(text: &str) -> Result<Lsn> {
    text.parse()
        .with_context(|| format!("PostgreSQL returned {text:?} as an LSN"))
}

fn opt_lsn(text: Option<String>) -> Result<Option<Lsn>> {
    text.map(|t| lsn(&t)).transpose()
}

/// Facts for the preflight.
pub async fn source_facts(client: &Client) -> Result<SourceFacts> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4,
                    current_setting('wal_level'),
                    current_setting('max_wal_senders')::int4,
                    (SELECT count(*) FROM pg_stat_replication)::int4,
                    current_setting('max_replication_slots')::int4,
                    (SELECT count(*) FROM pg_replication_slots)::int4,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    (SELECT coalesce(sum(pg_database_size(oid)), 0) FROM pg_database)::int8,
                    pg_is_in_recovery(),
                    (extract(epoch FROM clock_timestamp()) * 1000)::int8",
            &[],
        )
        .await
        .context("reading settings on the source")?;
    // pg_hba_file_rules needs superuser (or an explicit grant); without it the check is skipped.
    let hba = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_hba_file_rules
               WHERE error IS NULL AND type IN ('host', 'hostssl', 'hostnossl')
                 AND 'replication' = ANY (database)
                 AND (address IN ('all', 'samehost')
                      OR (address ~ '^[0-9.]+$' AND netmask IS NOT NULL
                          AND (inet '127.0.0.1' & netmask::inet) = (address::inet & netmask::inet))))",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get::<_, bool>(0));
    Ok(SourceFacts {
        server_version_num: row.get::<_, i32>(0) as u32,
        wal_level: row.get(1),
        max_wal_senders: row.get::<_, i32>(2) as u32,
        wal_senders_used: row.get::<_, i32>(3) as u32,
        max_replication_slots: row.get::<_, i32>(4) as u32,
        replication_slots_used: row.get::<_, i32>(5) as u32,
        replication_role: row.get::<_, Option<bool>>(6).unwrap_or(false),
        hba_replication_from_loopback: hba,
        database_bytes: row.get::<_, i64>(7).max(0) as u64,
        in_recovery: row.get(8),
        now_ms: row.get::<_, i64>(9).max(0) as u64,
        fence: Some(Box::new(crate::fence::fence_facts(client).await)),
        tablespaces: client
            .query(
                "SELECT pg_tablespace_location(oid) FROM pg_tablespace
                  WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1",
                &[],
            )
            .await
            .context("reading pg_tablespace on the source")?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    })
}

/// What else depends on this cluster than the migration's slot and its walsender.
pub async fn dependents(client: &Client, slot: &str) -> Result<Dependents> {
    let slots = client
        .query(
            "SELECT slot_name::text, slot_type, database::text, active
               FROM pg_replication_slots WHERE slot_name <> $1 ORDER BY slot_name",
            &[&slot],
        )
        .await
        .context("reading pg_replication_slots")?
        .iter()
        .map(|r| DependentSlot {
            name: r.get(0),
            slot_type: r.get(1),
            database: r.get(2),
            active: r.get(3),
        })
        .collect();
    let standbys = client
        .query(
            "SELECT coalesce(application_name, ''), client_addr::text, coalesce(state, '')
               FROM pg_stat_replication
              WHERE pid IS DISTINCT FROM
                    (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1)
              ORDER BY pid",
            &[&slot],
        )
        .await
        .context("reading pg_stat_replication")?
        .iter()
        .map(|r| DependentStandby {
            application_name: r.get(0),
            client_addr: r.get(1),
            state: r.get(2),
        })
        .collect();
    let subscriptions = client
        .query(
            "SELECT s.subname::text, d.datname::text, s.subenabled
               FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid
              ORDER BY 2, 1",
            &[],
        )
        .await
        .context("reading pg_subscription")?
        .iter()
        .map(|r| DependentSubscription {
            name: r.get(0),
            database: r.get(1),
            enabled: r.get(2),
        })
        .collect();
    Ok(Dependents {
        slots,
        standbys,
        subscriptions,
    })
}

/// Creates a physical slot that reserves WAL from now on; returns its restart LSN.
pub async fn create_slot(client: &Client, slot: &str) -> Result<Lsn> {
    // An inactive physical slot of that name is ours: created by a run that stopped before
    // recording it, or kept by an earlier rollback. Reuse it (it has reserved WAL since).
    let existing = client
        .query_opt(
            "SELECT restart_lsn::text, active FROM pg_replication_slots
              WHERE slot_name = $1 AND slot_type = 'physical'",
            &[&slot],
        )
        .await
        .with_context(|| format!("looking up replication slot {slot}"))?;
    if let Some(row) = existing {
        let (restart, active): (Option<String>, bool) = (row.get(0), row.get(1));
        match restart {
            Some(lsn_text) if !active => return lsn(&lsn_text),
            _ => bail!(
                "replication slot {slot} already exists and is {}; drop it on the source (SELECT pg_drop_replication_slot('{slot}')) if no standby uses it",
                if active { "in use" } else { "not reserving WAL" }
            ),
        }
    }
    let row = client
        .query_one(
            "SELECT (pg_create_physical_replication_slot($1, true)).lsn::text",
            &[&slot],
        )
        .await
        .with_context(|| format!("creating replication slot {slot}"))?;
    lsn(&row.get::<_, String>(0))
}

/// Drops a slot if it exists (idempotent, so a resumed rollback can repeat it).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .with_context(|| format!("dropping replication slot {slot} (is a standby still using it?)"))?;
    Ok(())
}

/// Current LSN, replication connections and the slot.
pub async fn status(client: &Client, slot: Option<&str>) -> Result<SourceStatus> {
    let head = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text, (extract(epoch FROM clock_timestamp()) * 1000)::int8",
            &[],
        )
        .await?;
    let rows = client
        .query(
            "SELECT coalesce(application_name, ''), coalesce(state, ''),
                    sent_lsn::text, write_lsn::text, flush_lsn::text, replay_lsn::text,
                    (extract(epoch FROM write_lag) * 1000)::int8,
                    (extract(epoch FROM flush_lag) * 1000)::int8,
                    (extract(epoch FROM replay_lag) * 1000)::int8
               FROM pg_stat_replication ORDER BY pid",
            &[],
        )
        .await?;
    let mut replication = Vec::with_capacity(rows.len());
    for r in rows {
        let ms = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
        replication.push(ReplicationRow {
            application_name: r.get(0),
            state: r.get(1),
            sent_lsn: opt_lsn(r.get(2))?,
            write_lsn: opt_lsn(r.get(3))?,
            flush_lsn: opt_lsn(r.get(4))?,
            replay_lsn: opt_lsn(r.get(5))?,
            write_lag_ms: ms(6),
            flush_lag_ms: ms(7),
            replay_lag_ms: ms(8),
        });
    }
    let slot = match slot {
        Some(name) => client
            .query_opt(
                "SELECT slot_name::text, active, restart_lsn::text, wal_status
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?
            .map(|r| -> Result<SlotRow> {
                Ok(SlotRow {
                    name: r.get(0),
                    active: r.get(1),
                    restart_lsn: opt_lsn(r.get(2))?,
                    wal_status: r.get(3),
                })
            })
            .transpose()?,
        None => None,
    };
    Ok(SourceStatus {
        current_lsn: lsn(&head.get::<_, String>(0))?,
        replication,
        slot,
        now_ms: head.get::<_, i64>(1).max(0) as u64,
    })
}

/// Shuts the fenced source cluster down (fast shutdown: sessions end, a shutdown checkpoint
/// is written) by signalling its postmaster, as `pg_ctl stop -m fast` does, and waits until it
/// has exited. Refused while the source is not fenced. The agent must run on the cluster's host
/// as its OS user or root (it reads `postmaster.pid` in the data directory). The fence stays on
/// disk: started again, the old cluster is still fenced.
pub async fn stop_cluster(client: &Client) -> Result<()> {
    // Fenced means our fence's pg_hba.conf with its original saved beside it, and the
    // server-wide setting it wrote (postgresql.auto.conf) — not a session, role or database
    // setting.
    let read_only: Option<bool> = client
        .query_one(
            "SELECT reset_val = 'on' AND source = 'configuration file'
                    AND sourcefile LIKE '%postgresql.auto.conf'
               FROM pg_settings WHERE name = 'default_transaction_read_only'",
            &[],
        )
        .await
        .context("reading the fence (needs superuser or pg_read_all_settings)")?
        .get(0);
    let hba = crate::fence::fenced_on_disk(client).await?;
    if read_only != Some(true) || !hba {
        bail!(
            "the source is not fenced ({}); refusing to stop it",
            if hba {
                "default_transaction_read_only is not on in postgresql.auto.conf"
            } else {
                "pg_hba.conf is not pgferry's fence"
            }
        );
    }
    let pid = crate::fence::postmaster(client)
        .await
        .context("finding the postmaster (or stop the source yourself: pg_ctl stop -m fast)")?
        .pid;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
        .with_context(|| format!("signalling the postmaster (pid {pid}) to shut down"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while nix::sys::signal::kill(pid, None).is_ok() {
        if std::time::Instant::now() > deadline {
            bail!("the source cluster (postmaster pid {pid}) did not shut down within 120 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}
/// The start of a verification pre-pass: the WAL insert position first, then a new xid
/// (assigned in a transaction rolled back at once). Every transaction that could have written
/// before that position has a smaller xid, and once ours has ended every running xid below it
/// shows in a snapshot's xmin (see [`pgferry_common::verify`]). A snapshot's own xmax is not enough:
/// an xid assigned after the last transaction ended is at or above it, and never listed.
pub async fn prepass_begin(client: &Client) -> Result<(Lsn, u64)> {
    let at = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .context("reading the WAL insert position")?;
    client.batch_execute("BEGIN READ WRITE").await?;
    let xid = client
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .context("assigning the pre-pass's xid");
    client.batch_execute("ROLLBACK").await?;
    Ok((lsn(&at.get::<_, String>(0))?, xid?.get::<_, i64>(0) as u64))
}

/// Whether every transaction with an xid below `xmax` has ended. When they have, writes a
/// WAL marker (committed and flushed at once, like the fence's) so that the standby has a
/// position to reach: everything that ended before it is replayed by then.
pub async fn prepass_wait(client: &Client, xmax: u64) -> Result<Response> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 >= $1,
                    pg_current_wal_insert_lsn()::text",
            &[&(xmax as i64)],
        )
        .await
        .context("reading the current snapshot")?;
    if row.get::<_, bool>(0) {
        let marker = crate::fence::wal_marker(client, "verification pre-pass").await?;
        client.batch_execute("RESET synchronous_commit").await?;
        return Ok(Response::PrepassWaited {
            ended: true,
            lsn: marker,
            open: Vec::new(),
        });
    }
    let open = client
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''),
                    coalesce(extract(epoch FROM now() - xact_start), 0)::int8,
                    coalesce(state, '')
               FROM pg_stat_activity
              WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
             UNION ALL
             SELECT 0, owner::text, '', extract(epoch FROM now() - prepared)::int8,
                    'prepared ' || gid
               FROM pg_prepared_xacts
              ORDER BY 4 DESC LIMIT 5",
            &[],
        )
        .await
        .context("listing open transactions")?
        .iter()
        .map(|r| OpenTransaction {
            pid: r.get(0),
            user: r.get(1),
            application: r.get(2),
            open_secs: r.get::<_, i64>(3).max(0) as u64,
            state: r.get(4),
        })
        .collect();
    Ok(Response::PrepassWaited {
        ended: false,
        lsn: lsn(&row.get::<_, String>(1))?,
        open,
    })
}
