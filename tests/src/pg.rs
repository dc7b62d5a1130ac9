//! PostgreSQL clusters for tests: initdb into a temp dir as the `postgres` user, a random port,
//! password auth on loopback, sample data, digests of table contents.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::process::command_output;

/// Directory of the PostgreSQL binaries: `PGFERRY_PG_BINDIR`, or PostgreSQL 15's Debian path,
/// or `pg_config --bindir`.
pub fn pg_bindir() -> PathBuf {
    if let Some(d) = std::env::var_os("PGFERRY_PG_BINDIR") {
        return d.into();
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("pg_ctl").exists() {
        return debian;
    }
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or(debian)
}

pub fn pg_bin(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// A temporary directory the `postgres` user can reach (mode 0755, owned by postgres), removed
/// on drop unless `PGFERRY_KEEP_TEST_DIRS` is set.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-test-")
            .tempdir_in("/tmp")?;
        let path = dir.path().to_path_buf();
        chown_postgres(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PGFERRY_KEEP_TEST_DIRS").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping test dir {}", d.keep().display());
            }
        }
    }
}

/// `chown postgres:postgres path`.
pub fn chown_postgres(path: &Path) -> Result<()> {
    command_output(Command::new("chown").arg("postgres:postgres").arg(path)).map(|_| ())
}

/// `psql` as postgres to the cluster whose unix socket is in `socket_dir` on `port`.
fn psql_at(netns: Option<&str>, socket_dir: &Path, port: u16) -> Command {
    let mut c = as_postgres(netns, &pg_bin("psql"));
    c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"]);
    c
}

/// As the postgres user (optionally inside a network namespace).
pub fn as_postgres(netns: Option<&str>, program: &Path) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"]);
            c
        }
        None => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c
        }
    };
    c.arg(program);
    c
}

/// A PostgreSQL cluster in a directory of its own, listening on 127.0.0.1:`port` and a unix
/// socket in that directory. Stopped (immediate mode) on drop.
pub struct PgCluster {
    pub root: PathBuf,
    pub datadir: PathBuf,
    pub port: u16,
    pub host: String,
    /// Password of the `postgres` role (scram-sha-256 over TCP).
    pub password: String,
    netns: Option<String>,
    running: bool,
}

impl PgCluster {
    /// `initdb` into `root/data` as the postgres user. `root` is created and owned by postgres.
    pub fn init(root: &Path, port: u16) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        chown_postgres(root)?;
        let password = hex::encode(
            blake3::hash(format!("{port}{:?}", std::time::SystemTime::now()).as_bytes()).as_bytes(),
        )[..24]
            .to_string();
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n"))?;
        chown_postgres(&pwfile)?;
        let datadir = root.join("data");
        command_output(
            as_postgres(None, &pg_bin("initdb"))
                .arg("-D")
                .arg(&datadir)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display())),
        )
        .with_context(|| format!("initdb {}", datadir.display()))?;
        std::fs::remove_file(&pwfile)?;
        let conf = format!(
            "\n# pgferry tests\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 10\n\
             max_replication_slots = 10\nfsync = off\nsynchronous_commit = off\nfull_page_writes = on\n\
             shared_buffers = 128MB\nmax_wal_size = 1GB\nlogging_collector = off\n",
            root.display()
        );
        append(&datadir.join("postgresql.conf"), &conf)?;
        append(
            &datadir.join("pg_hba.conf"),
            "\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
        )?;
        Ok(Self {
            root: root.to_path_buf(),
            datadir,
            port,
            host: "127.0.0.1".into(),
            password,
            netns: None,
            running: false,
        })
    }

    /// Also listens on `addr` and accepts password logins (and replication) from `cidr`: the
    /// benchmark's direct-TCP baseline. Call before [`start`](Self::start).
    pub fn allow_from(&self, addr: &str, cidr: &str) -> Result<()> {
        append(
            &self.datadir.join("postgresql.conf"),
            &format!("listen_addresses = '127.0.0.1,{addr}'\n"),
        )?;
        append(
            &self.datadir.join("pg_hba.conf"),
            &format!(
                "host all all {cidr} scram-sha-256\nhost replication all {cidr} scram-sha-256\n"
            ),
        )
    }

    /// Runs the server (and psql) inside network namespace `ns`.
    pub fn with_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    pub fn start(&mut self) -> Result<()> {
        command_output(
            as_postgres(self.netns.as_deref(), &pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.datadir)
                .args(["-w", "-t", "60", "-l"])
                .arg(self.log_file())
                .arg("start"),
        )
        .with_context(|| {
            format!(
                "starting PostgreSQL in {} (log {}):\n{}",
                self.datadir.display(),
                self.log_file().display(),
                std::fs::read_to_string(self.log_file()).unwrap_or_default()
            )
        })?;
        self.running = true;
        Ok(())
    }

    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        command_output(
            as_postgres(self.netns.as_deref(), &pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.datadir)
                .args(["-w", "-t", "60", "-m", mode, "stop"]),
        )?;
        self.running = false;
        Ok(())
    }

    /// After a completed cutover the old cluster stays fenced (`pg_hba.conf` admits only
    /// pgferry). What an operator does to read it again: the original `pg_hba.conf` back
    /// (`pg_hba.conf.pgferry-orig`), reload; `default_transaction_read_only` stays on.
    pub fn reopen_after_fence(&self) -> Result<()> {
        let hba = self.datadir.join("pg_hba.conf");
        std::fs::rename(self.datadir.join("pg_hba.conf.pgferry-orig"), &hba)
            .with_context(|| format!("putting {} back", hba.display()))?;
        command_output(
            as_postgres(self.netns.as_deref(), &pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.datadir)
                .arg("reload"),
        )?;
        crate::wait_until(
            "the reopened source to take connections",
            std::time::Duration::from_secs(20),
            || self.psql("SELECT 1").ok(),
        )?;
        Ok(())
    }

    fn psql_cmd(&self) -> Command {
        psql_at(self.netns.as_deref(), &self.root, self.port)
    }

    /// Runs SQL over the unix socket as postgres; trimmed stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = command_output(self.psql_cmd().arg("-c").arg(sql))
            .with_context(|| format!("psql on port {}: {sql}", self.port))?;
        Ok(out.trim().to_string())
    }

    /// `host=127.0.0.1 port=… user=postgres password=… dbname=postgres`
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres password={} dbname=postgres",
            self.host, self.port, self.password
        )
    }

    /// A tokio-postgres client to `host:port` (the cluster itself, or a tunnel to it) with
    /// this cluster's password. The connection task is spawned on the current runtime.
    pub async fn connect(&self, host: &str, port: u16) -> Result<tokio_postgres::Client> {
        connect_tcp(host, port, &self.password).await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_mode("immediate");
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Creates schema `ferry` with three tables of mixed, realistically compressible data (text
/// drawn at random from a small vocabulary, JSON, numbers, timestamps, UUIDs, some random bytes;
/// its COPY text compresses about 3x with zstd -3, not the ~20x of pgbench's padded rows) and
/// fills them until the schema takes at least `megabytes` MB.
pub fn load_sample_data(cluster: &PgCluster, megabytes: u32) -> Result<()> {
    cluster.psql(
        "CREATE SCHEMA IF NOT EXISTS ferry;
         CREATE TABLE IF NOT EXISTS ferry.orders (id bigint PRIMARY KEY, ref text NOT NULL,
             amount numeric(12,2) NOT NULL, placed_at timestamptz NOT NULL, status text NOT NULL);
         CREATE TABLE IF NOT EXISTS ferry.events (id bigint PRIMARY KEY, payload jsonb NOT NULL,
             created_at timestamptz NOT NULL);
         CREATE TABLE IF NOT EXISTS ferry.docs (id bigint PRIMARY KEY, body text NOT NULL,
             blob bytea);
         CREATE OR REPLACE FUNCTION ferry.words(n int) RETURNS text LANGUAGE sql VOLATILE AS $$
           SELECT string_agg((ARRAY['ferry','harbour','north','cargo','tide','ledger','invoice',
             'customer','shipment','delayed','berth','crane','manifest','route','weather','pilot',
             'anchor','port','customs','pallet','container','draft','vessel','quay','Rotterdam',
             'Hamburg','Antwerp','Gdansk','Piraeus','Valencia','Genoa','Marseille','the','a','of',
             'to','and','in','arrived','departed','late','early','on','schedule','checked',
             'sealed','loaded','unloaded'])[1 + floor(random() * 48)::int], ' ')
           FROM generate_series(1, n) $$;",
    )?;
    let target = i64::from(megabytes) * 1024 * 1024;
    let batch = 20_000i64;
    let mut next = 1i64;
    for _ in 0..10_000 {
        let size: i64 = cluster
            .psql("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'ferry' AND c.relkind = 'r'")?
            .parse()?;
        if size >= target {
            cluster.psql("ANALYZE ferry.orders; ANALYZE ferry.events; ANALYZE ferry.docs;")?;
            return Ok(());
        }
        let (a, b) = (next, next + batch - 1);
        cluster.psql(&format!(
            "INSERT INTO ferry.orders SELECT g, md5(random()::text)::uuid::text,
                 round((random() * 10000)::numeric, 2),
                 timestamptz '2026-01-01' + random() * interval '300 days',
                 (ARRAY['new','paid','shipped','delivered','returned'])[1 + (random() * 4)::int]
               FROM generate_series({a}, {b}) g;
             INSERT INTO ferry.events SELECT g, jsonb_build_object('type',
                 (ARRAY['login','order','refund','ship','audit'])[1 + g % 5],
                 'user', (random() * 100000)::int,
                 'tags', jsonb_build_array(ferry.words(1), ferry.words(1)),
                 'geo', jsonb_build_object('lat', round((random() * 180 - 90)::numeric, 4),
                                           'lon', round((random() * 360 - 180)::numeric, 4)),
                 'note', ferry.words(6 + (g % 8)::int), 'trace', md5(random()::text)),
                 timestamptz '2026-01-01' + random() * interval '300 days'
               FROM generate_series({a}, {b}) g;
             INSERT INTO ferry.docs SELECT g, ferry.words(20 + (g % 30)::int) || ' ref ' || md5(random()::text),
                 CASE WHEN g % 4 = 0 THEN decode(md5(random()::text) || md5(random()::text), 'hex') END
               FROM generate_series({a}, {b}) g;"
        ))?;
        next += batch;
    }
    bail!("sample data never reached {megabytes} MB")
}

/// Row count and BLAKE3 (hex) of `COPY (SELECT * FROM table ORDER BY 1) TO STDOUT`, hashed as
/// it streams.
pub fn table_digest(cluster: &PgCluster, table: &str) -> Result<(u64, String)> {
    digest_with(cluster.psql_cmd(), table)
}

/// [`table_digest`] of a cluster that is not a [`PgCluster`] (e.g. one pgferry made), reached
/// through its unix socket in `socket_dir`.
pub fn table_digest_at(socket_dir: &Path, port: u16, table: &str) -> Result<(u64, String)> {
    digest_with(psql_at(None, socket_dir, port), table)
}

fn digest_with(mut psql: Command, table: &str) -> Result<(u64, String)> {
    let mut child = psql
        .arg("-c")
        .arg(format!("COPY (SELECT * FROM {table} ORDER BY 1) TO STDOUT"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut hasher = blake3::Hasher::new();
    let mut rows = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        rows += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        hasher.update(&buf[..n]);
    }
    let status = child.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("COPY of {table} failed: {err}");
    }
    Ok((rows, hasher.finalize().to_hex().to_string()))
}

/// A connection as `postgres` with `password` over TCP (its driver task spawned).
pub async fn connect_tcp(host: &str, port: u16, password: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(host)
        .port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(std::time::Duration::from_secs(20))
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {host}:{port}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sample_data_and_digest() -> Result<()> {
        let dir = TestDir::new()?;
        let mut pg = PgCluster::init(&dir.join("pg"), crate::free_tcp_port())?;
        pg.start()?;
        assert_eq!(pg.psql("SELECT 1")?, "1");
        load_sample_data(&pg, 5)?;
        let a = table_digest(&pg, "ferry.events")?;
        let b = table_digest(&pg, "ferry.events")?;
        assert_eq!(a, b);
        assert!(a.0 > 1000);
        pg.psql("UPDATE ferry.events SET created_at = created_at + interval '1 s' WHERE id = 7")?;
        assert_ne!(table_digest(&pg, "ferry.events")?.1, a.1);
        pg.stop()?;
        Ok(())
    }
}
