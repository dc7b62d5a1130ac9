//! The fence against every way around it, on a real cluster (the source agent's fence and
//! unfence called directly): sessions open at the fence (idle, mid-transaction, logical
//! replication), connections still authenticating under the old rules, new connections of every
//! kind (superuser and ordinary role, TCP and unix socket, logical replication), prepared
//! transactions. Physical replication and pgferry's own control route still get in; an enabled
//! subscription makes the fence refuse; preflight names what it found. Unfence
//! puts `pg_hba.conf` and `postgresql.auto.conf` back byte for byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_common::control::FenceMode;
use pgferry_common::fence::{is_fenced, replication_records, ORIGINAL_SUFFIX};
use pgferry_common::preflight::{evaluate, TargetFacts};
use pgferry_source::fence::connect_from_control_addr;
use pgferry_source::pg;
use pgferry_tests::{as_postgres, free_tcp_port, pg_bin, wait_until, PgCluster, TestDir};

const REFUSED: &str = "pg_hba.conf rejects connection";

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

/// A PostgreSQL v3 startup packet for `user` into `postgres`.
fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

fn password_message(password: &str) -> Vec<u8> {
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((password.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(password.as_bytes());
    msg.push(0);
    msg
}

/// The next message from the server, `None` once the connection is closed.
fn read_message(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

/// Every message until the server closes the connection.
fn drain(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    std::iter::from_fn(|| read_message(s)).collect()
}

fn connect_raw(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// A tokio-postgres client as `user` over TCP (`password`) or the unix socket in `socket_dir`.
async fn client(
    pg: &PgCluster,
    user: &str,
    password: &str,
    unix: bool,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    if unix {
        cfg.host_path(&pg.root);
    } else {
        cfg.host("127.0.0.1");
    }
    cfg.port(pg.port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// `psql` as postgres over the unix socket with extra connection parameters (`replication=…`).
fn psql(pg: &PgCluster, params: &str) -> Command {
    let mut c = as_postgres(None, &pg_bin("psql"));
    c.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres {params}",
            pg.root.display(),
            pg.port
        ));
    c
}

/// A logical replication connection (`replication=database`, which runs SQL) kept open, fed
/// statements on its stdin.
fn logical_session(pg: &PgCluster) -> Result<Child> {
    let mut child = psql(pg, "replication=database")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdin = child.stdin.as_mut().context("stdin")?;
    stdin.write_all(b"SELECT 'logical session up';\n")?;
    stdin.flush()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("logical session up") {
        let n = out.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the logical replication session ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    child.stdout = Some(out);
    Ok(child)
}

fn postmaster_children_forked_not_started(pg: &PgCluster) -> usize {
    let pid: i32 = std::fs::read_to_string(pg.datadir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    let own = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<i32>().ok());
            ppid == Some(pid)
                && std::fs::read(format!("/proc/{p}/cmdline")).ok() == Some(own.clone())
        })
        .count()
}

#[test]
fn the_fence_refuses_every_other_client_and_unfence_restores_the_files() -> Result<()> {
    let dir = TestDir::new()?;
    let port = free_tcp_port();
    let mut pg = PgCluster::init(&dir.join("pg"), port)?;
    // `straggler` logs in with a cleartext password, so this test can stop halfway through
    // authentication; prepared transactions are on.
    let hba_path = pg.datadir.join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path)?;
    std::fs::write(
        &hba_path,
        format!("host all straggler 127.0.0.1/32 password\n{hba}"),
    )?;
    {
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.datadir.join("postgresql.conf"))?;
        writeln!(conf, "max_prepared_transactions = 4")?;
    }
    pg.start()?;
    pg.psql(
        "CREATE ROLE app LOGIN PASSWORD 'app-pw'; CREATE ROLE straggler LOGIN PASSWORD 'straggler-pw';
         CREATE TABLE t (n int PRIMARY KEY, who text NOT NULL);
         GRANT SELECT, INSERT ON t TO app, straggler;",
    )?;
    let auto_path = pg.datadir.join("postgresql.auto.conf");
    let (hba_before, auto_before) = (std::fs::read(&hba_path)?, std::fs::read(&auto_path)?);
    let copy = |p: &std::path::Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(ORIGINAL_SUFFIX);
        std::path::PathBuf::from(s)
    };

    let rt = tokio::runtime::Runtime::new()?;
    let pw = pg.password.clone();
    rt.block_on(async {
        // Before the fence: sessions of every kind.
        let idle = client(&pg, "postgres", &pw, false).await?;
        let in_txn = client(&pg, "app", "app-pw", false).await?;
        in_txn
            .batch_execute("BEGIN READ WRITE; INSERT INTO t VALUES (1, 'open transaction')")
            .await?;
        let preparer = client(&pg, "postgres", &pw, true).await?;
        preparer
            .batch_execute("BEGIN; INSERT INTO t VALUES (2, 'prepared'); PREPARE TRANSACTION 'p1'")
            .await?;
        let mut logical = logical_session(&pg)?;
        // Two connections the postmaster forked under the old rules that are not sessions yet:
        // one halfway through authentication, one that has not even sent its startup packet.
        let mut authenticating = connect_raw(port)?;
        authenticating.write_all(&startup_packet("straggler"))?;
        let (tag, body) = read_message(&mut authenticating).context("no auth request")?;
        assert_eq!(
            (tag, &body[..]),
            (b'R', &3u32.to_be_bytes()[..]),
            "cleartext password asked"
        );
        let forked_before = postmaster_children_forked_not_started(&pg);
        let mut silent = connect_raw(port)?;
        wait_until(
            "the postmaster to fork for the silent connection",
            Duration::from_secs(10),
            || (postmaster_children_forked_not_started(&pg) > forked_before).then_some(()),
        )?;

        // The fence, on pgferry's own session. First what preflight says about this source.
        let own = client(&pg, "postgres", &pw, false).await?;
        own.batch_execute("SELECT pg_create_physical_replication_slot('dr_standby')")
            .await?;
        let facts = pg::source_facts(&own).await?;
        let f = facts.fence.clone().context("fence facts")?;
        assert_eq!(f.superuser, Some(true));
        assert!(
            f.files_unwritable.is_none() && f.no_reconnect.is_none(),
            "{f:?}"
        );
        assert_eq!(f.prepared_transactions[0].gid, "p1", "{f:?}");
        assert_eq!(f.replication_slots[0].name, "dr_standby", "{f:?}");
        assert!(f.wal_senders.iter().any(|w| w.database.is_some()), "{f:?}");
        let warned: Vec<String> = evaluate(&facts, &target_facts(facts.now_ms))
            .into_iter()
            .filter(|c| c.ok && c.warning)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            warned,
            ["prepared_transactions", "replication_slots", "wal_senders"],
            "{f:?}"
        );
        own.batch_execute("SELECT pg_drop_replication_slot('dr_standby')")
            .await?;
        // An enabled subscription commits without any client connection: the fence refuses
        // before it changes anything.
        own.batch_execute(
            "CREATE SUBSCRIPTION from_erp CONNECTION 'host=127.0.0.1 port=1 dbname=erp'
               PUBLICATION erp WITH (connect = false);
             ALTER SUBSCRIPTION from_erp ENABLE",
        )
        .await?;
        let e = pg::fence(&own, FenceMode::ReadOnly).await.unwrap_err();
        assert!(format!("{e:#}").contains("from_erp"), "{e:#}");
        assert_eq!(std::fs::read(&hba_path)?, hba_before);
        assert!(!copy(&hba_path).exists());
        own.batch_execute(
            "ALTER SUBSCRIPTION from_erp DISABLE;
             ALTER SUBSCRIPTION from_erp SET (slot_name = NONE);
             DROP SUBSCRIPTION from_erp",
        )
        .await?;
        let (lsn, report) = pg::fence(&own, FenceMode::ReadOnly).await?;
        eprintln!("fenced at {lsn}: {report:?}");
        assert!(report.sessions_ended >= 4, "{report:?}");
        // At least our two; another connection the postmaster forked meanwhile (seen under
        // load: 3) is ended too, which is the point. Both of ours are checked below.
        assert!(report.connecting_ended >= 2, "{report:?}");
        assert!(report.control_rule, "{report:?}");
        assert_eq!(
            report.replication_records as usize,
            replication_records(&hba_before).len(),
            "{report:?}"
        );
        assert!(report.replication_records >= 2, "{report:?}");
        let fenced = std::fs::read(&hba_path)?;
        assert!(is_fenced(&fenced));
        assert_eq!(std::fs::read(copy(&hba_path))?, hba_before);
        assert_eq!(std::fs::read(copy(&auto_path))?, auto_before);
        let rules: i64 = own
            .query_one(
                "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(rules, 0, "PostgreSQL parses the fenced file");

        // Sessions open at the fence are gone; what they had not committed is not.
        assert!(
            idle.batch_execute("SELECT 1").await.is_err(),
            "idle session survived"
        );
        assert!(
            in_txn.batch_execute("COMMIT").await.is_err(),
            "open transaction committed"
        );
        // The connection halfway through authentication was ended before it could finish.
        let _ = authenticating.write_all(&password_message("straggler-pw"));
        let got = drain(&mut authenticating);
        assert!(
            !got.iter()
                .any(|(t, b)| *t == b'Z' || (*t == b'R' && b[..] == [0, 0, 0, 0])),
            "a connection authenticating under the old rules got in: {got:?}"
        );
        // So was the one that had not sent its startup packet yet.
        let _ = silent.write_all(&startup_packet("straggler"));
        let got = drain(&mut silent);
        assert!(
            got.iter().all(|(t, _)| *t == b'E'),
            "the silent connection was answered: {got:?}"
        );
        // The logical replication session (it runs SQL) was ended too.
        {
            let stdin = logical.stdin.as_mut().context("stdin")?;
            let _ = stdin.write_all(b"INSERT INTO t VALUES (3, 'logical');\n");
        }
        drop(logical.stdin.take());
        let out = logical.wait_with_output()?;
        assert!(
            !out.status.success(),
            "the logical session's insert succeeded"
        );

        // New connections of every kind are refused at once, with PostgreSQL's own message.
        for (user, password, unix) in [
            ("postgres", pw.as_str(), false),
            ("postgres", pw.as_str(), true),
            ("app", "app-pw", false),
            ("app", "app-pw", true),
            ("straggler", "straggler-pw", false),
        ] {
            let t = std::time::Instant::now();
            let e = client(&pg, user, password, unix).await.unwrap_err();
            assert!(message(&e).contains(REFUSED), "{user} unix={unix}: {e}");
            assert!(t.elapsed() < Duration::from_secs(5), "refused, not hung");
        }
        let out = psql(&pg, "replication=database")
            .args(["-c", "SELECT 1"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(REFUSED), "{err}");
        // COMMIT PREPARED needs a session: nobody but pgferry has one. The transaction waits.
        let prepared: i64 = own
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await?
            .get(0);
        assert_eq!(prepared, 1);
        // Physical replication (the standby's walreceiver) still connects, and cannot run SQL.
        for host in [pg.root.display().to_string(), "127.0.0.1".to_string()] {
            let out = as_postgres(None, &pg_bin("psql"))
                .env("PGPASSWORD", &pw)
                .args(["-X", "-A", "-t", "-d"])
                .arg(format!(
                    "host={host} port={port} user=postgres replication=true"
                ))
                .args(["-c", "IDENTIFY_SYSTEM"])
                .output()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = as_postgres(None, &pg_bin("psql"))
                .env("PGPASSWORD", &pw)
                .args(["-X", "-A", "-t", "-d"])
                .arg(format!(
                    "host={host} port={port} user=postgres replication=true"
                ))
                .args(["-c", "SELECT 1"])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("physical replication"),
                "{err}"
            );
        }

        // pgferry's own session goes on, and a restarted source agent gets in from its own
        // loopback address, as its role only; nothing was committed since the fence.
        let n: i64 = own.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
        assert_eq!(n, 0);
        let conninfo =
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres password={pw}");
        let control = connect_from_control_addr(&conninfo.parse()?).await?;
        let row = control
            .query_one(
                "SELECT host(inet_client_addr()), current_setting('default_transaction_read_only')",
                &[],
            )
            .await?;
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1)),
            ("127.80.71.70".to_string(), "on".to_string())
        );
        let app_info =
            format!("host=127.0.0.1 port={port} user=app dbname=postgres password=app-pw");
        let e = connect_from_control_addr(&app_info.parse()?)
            .await
            .err()
            .context("app got in")?;
        assert!(format!("{e:#}").contains(REFUSED), "{e:#}");

        // A repeated fence (as after an interruption) keeps the first copies.
        let (again, _) = pg::fence(&control, FenceMode::ReadOnly).await?;
        assert!(again >= lsn);
        assert_eq!(std::fs::read(copy(&hba_path))?, hba_before);
        assert_eq!(std::fs::read(copy(&auto_path))?, auto_before);

        // Unfence, from another session (as a restarted agent would): the files are back byte
        // for byte, the copies gone, and clients write again.
        drop(own);
        pg::unfence(&control).await?;
        assert_eq!(
            std::fs::read(&hba_path)?,
            hba_before,
            "pg_hba.conf restored"
        );
        assert_eq!(
            std::fs::read(&auto_path)?,
            auto_before,
            "postgresql.auto.conf restored"
        );
        assert!(!copy(&hba_path).exists() && !copy(&auto_path).exists());
        let app = client(&pg, "app", "app-pw", false).await?;
        app.batch_execute("INSERT INTO t VALUES (4, 'after unfence')")
            .await?;
        let su = client(&pg, "postgres", &pw, true).await?;
        su.batch_execute("COMMIT PREPARED 'p1'").await?;
        let rows: Vec<i32> = su
            .query("SELECT n FROM t ORDER BY n", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, [2, 4]);
        let ro: String = su
            .query_one("SHOW default_transaction_read_only", &[])
            .await?
            .get(0);
        assert_eq!(ro, "off");
        // Unfencing again changes nothing; an unfenced source is never stopped.
        pg::unfence(&su).await?;
        assert_eq!(std::fs::read(&hba_path)?, hba_before);
        let e = pg::stop_cluster(&su).await.unwrap_err();
        assert!(format!("{e:#}").contains("not fenced"), "{e:#}");
        anyhow::Ok(())
    })?;
    pg.stop()?;
    Ok(())
}
