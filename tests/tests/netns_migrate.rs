//! The whole migration across two "hosts": the source cluster and pgferry-source in one
//! network namespace, pgferry-target and the new cluster in another, joined by a veth pair.
//! Only the QUIC port crosses; a writer commits throughout; every committed write arrives; the
//! cutover fences with `--fence stop`, so the source cluster ends shut down. The new cluster's
//! serving settings (`listen_addresses`, `hba_file`) let an application on the source's host
//! write to it right after the cutover, without a restart.
//! (The test itself reaches both clusters through their unix sockets, which namespaces do not
//! separate.) Skips, saying so, where namespaces cannot be made.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use pgferry_tests::{pg_bin, NetnsPair};
use support::migration::MigrationRig;

#[test]
fn migrate_between_two_network_namespaces() -> Result<()> {
    let Some(net) = NetnsPair::create("pgfmg")? else {
        eprintln!("SKIPPED: network namespaces cannot be created here (see the reason above)");
        return Ok(());
    };
    let (addr_a, addr_b, ns_a) = (net.addr_a.clone(), net.addr_b.clone(), net.a.clone());
    // The new cluster's serving settings: it listens on the target host's address too and
    // admits the source host's address, from the standby's first start on.
    let settings = tempfile::tempdir()?;
    let hba = settings.path().join("pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all {addr_a}/32 scram-sha-256\n"
        ),
    )?;
    let rig = MigrationRig::builder(10)
        .prepare(|pg| {
            pg.psql("CREATE TABLE ferry.writes (n int PRIMARY KEY)")
                .map(drop)
        })
        .target_config(&format!(
            "listen_addresses = \"localhost,{addr_b}\"\nhba_file = \"{}\"\n",
            hba.display()
        ))
        .netns(net)
        .start()?;
    let (pg, dir, port, new_port) = (&rig.pg, &rig.dir, rig.pg.port, rig.target_port);

    let rt = tokio::runtime::Runtime::new()?;
    let committed = Arc::new(Mutex::new(Vec::<i32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (committed, stop) = (committed.clone(), stop.clone());
        let client = rt.block_on(support::unix_client(&pg.root, port))?;
        rt.spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 100_000 {
                n += 1;
                match client
                    .execute("INSERT INTO ferry.writes VALUES ($1)", &[&n])
                    .await
                {
                    Ok(_) => committed.lock().unwrap().push(n),
                    Err(_) => break,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let out = rig
        .command("migrate", &["--auto-cutover", "--fence", "stop"])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    stop.store(true, Ordering::SeqCst);
    rt.block_on(writer)?;
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cutover complete"), "{text}");
    assert!(
        text.contains(&format!(
            "new primary: host={addr_b} port={new_port} dbname=postgres"
        )),
        "{text}"
    );
    // --fence stop: the source cluster was shut down once the target accepted writes.
    assert!(text.contains("the source cluster is shut down"), "{text}");
    assert!(!pg.datadir.join("postmaster.pid").exists());
    assert!(pg.psql("SELECT 1").is_err(), "the source still answers");
    let committed = committed.lock().unwrap().clone();
    assert!(!committed.is_empty());
    let on_target: Vec<i32> = rt.block_on(async {
        let c = support::unix_client(dir.path(), new_port).await?;
        let rows = c
            .query("SELECT n FROM ferry.writes ORDER BY n", &[])
            .await?;
        anyhow::Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
    })?;
    assert_eq!(on_target, committed);
    // An application on another host (the source's namespace) reaches the promoted cluster on
    // the target host's address right after `migrate` returns: no restart, no edit. It writes.
    let probe = NetnsPair::command(&ns_a, pg_bin("psql"))
        .arg(format!(
            "host={addr_b} port={new_port} user=postgres dbname=postgres connect_timeout=3"
        ))
        .args(["-X", "-A", "-t", "-c"])
        .arg("INSERT INTO ferry.writes VALUES (-1) RETURNING pg_is_in_recovery()")
        .env("PGPASSWORD", &pg.password)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&probe.stdout),
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(probe.status.success(), "{said}");
    assert!(said.trim_start().starts_with('f'), "{said}");
    // The operator's pg_hba.conf is the one in force: an address it does not list is refused.
    let other = rt.block_on(async {
        let c = support::unix_client(dir.path(), new_port).await?;
        let rows = c
            .query(
                "SELECT count(*) FROM pg_hba_file_rules WHERE address = $1",
                &[&addr_a],
            )
            .await?;
        anyhow::Ok(rows[0].get::<_, i64>(0))
    })?;
    assert_eq!(
        other, 1,
        "the installed pg_hba.conf names the source host's address"
    );
    Ok(())
}
