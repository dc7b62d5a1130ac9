//! Pieces the whole-migration tests share: secret files, the new cluster's stop guard, the
//! admin verbs, a writer that commits numbered transactions on the source, and a
//! [`MigrationRig`] (source cluster, certificates, both agents) to start from.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use pgferry_tests::{
    bin_path, connect_tcp, free_tcp_port, free_udp_port, load_sample_data, pg_bin, wait_until,
    ChildGuard, PgCluster, TestDir,
};

use super::{Agent, Certs};

/// Writes `secret` as the first line of a file with mode 0600 (replacing it).
pub fn write_secret_file(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{secret}")?;
    Ok(())
}

/// Stops (immediate mode) the cluster pgferry started in this data directory, on drop.
pub struct ClusterStopGuard(pub PathBuf);

impl Drop for ClusterStopGuard {
    fn drop(&mut self) {
        if self.0.join("postmaster.pid").exists() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.0)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// Runs `pgferry-target <verb> --admin-socket <socket> <extra>`: success and stdout+stderr.
pub fn target_cmd(verb: &str, socket: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(bin_path("pgferry-target"))
        .arg(verb)
        .arg("--admin-socket")
        .arg(socket)
        .args(extra)
        .output()
        .expect("running pgferry-target");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.success(), text)
}

/// An application on the source: single-row numbered transactions into `table (n int)`,
/// recording which commits succeeded; after a failure (fenced) it reconnects and keeps
/// trying, as an application would, until stopped.
pub struct Writer {
    committed: Arc<Mutex<Vec<i32>>>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        port: u16,
        password: &str,
        table: &str,
    ) -> Result<Writer> {
        let committed = Arc::new(Mutex::new(Vec::<i32>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client = rt.block_on(connect_tcp("127.0.0.1", port, password))?;
        let (c2, s2, pw) = (committed.clone(), stop.clone(), password.to_string());
        let sql = format!("INSERT INTO {table} (n) VALUES ($1)");
        let task = rt.spawn(async move {
            let (mut client, mut n, mut failures) = (client, 0, 0);
            while !s2.load(Ordering::SeqCst) && n < 1_000_000 && failures < 3_000 {
                n += 1;
                match client.execute(sql.as_str(), &[&n]).await {
                    Ok(_) => c2.lock().unwrap().push(n),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if let Ok(c) = connect_tcp("127.0.0.1", port, &pw).await {
                            client = c;
                        }
                    }
                }
            }
        });
        Ok(Writer {
            committed,
            stop,
            task: Some(task),
        })
    }

    /// How many commits succeeded so far.
    pub fn count(&self) -> usize {
        self.committed.lock().unwrap().len()
    }

    /// Stops the writer; the numbers whose commit succeeded, in order.
    pub fn stop(mut self, rt: &tokio::runtime::Runtime) -> Vec<i32> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = rt.block_on(t);
        }
        self.committed.lock().unwrap().clone()
    }
}

/// The milliseconds after `label` in `text` (e.g. "write downtime 512 ms").
pub fn number_after(text: &str, label: &str) -> Option<u64> {
    text.split(label)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The target agent's config for a migration over loopback: tunnel to `127.0.0.1:udp`, the
/// postgres service on `127.0.0.1:local`, the new cluster in `data_dir` on `port` (socket in
/// `socket_dir`, run as postgres), lag sampled every second; `extra` lines end `[target]`.
#[allow(clippy::too_many_arguments)]
pub fn target_toml(
    udp: u16,
    local: u16,
    data_dir: &Path,
    port: u16,
    socket_dir: &Path,
    repl_pw: &Path,
    admin_socket: &Path,
    extra: &str,
) -> String {
    format!(
        "[network]\nconnect = \"127.0.0.1:{udp}\"\n\
         [[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{local}\"\n\
         [target]\ndata_dir = \"{}\"\nport = {port}\nsocket_dir = \"{}\"\nos_user = \"postgres\"\n\
         replication_password_file = \"{}\"\nadmin_socket = \"{}\"\nlag_sample_secs = 1\n{extra}",
        data_dir.display(),
        socket_dir.display(),
        repl_pw.display(),
        admin_socket.display(),
    )
}

/// `pgferry-source run` arguments: listen on `listen`, forward to and control the cluster on
/// 127.0.0.1:`pg_port` with the password in `password_file`.
pub fn source_args(listen: &str, pg_port: u16, password_file: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        listen.into(),
        "--upstream".into(),
        format!("127.0.0.1:{pg_port}"),
        "--pg-conninfo".into(),
        format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"),
        "--pg-password-file".into(),
        password_file.to_string_lossy().into(),
    ]
}

/// A source cluster with sample data, certificates, both agents up and tunnelled, and the
/// target's config for a migration into `dir/new/data`: what a whole-migration test starts
/// from. Agents can be killed (SIGKILL) and started again with the same arguments.
pub struct MigrationRig {
    pub source: Agent,
    pub target: Agent,
    standby: Option<ClusterStopGuard>,
    pub pg: PgCluster,
    pub certs: Certs,
    /// The admin socket of the target agent.
    pub socket: PathBuf,
    /// The new cluster's data directory and port.
    pub data_dir: PathBuf,
    pub target_port: u16,
    pub state_file: PathBuf,
    source_args: Vec<String>,
    target_args: Vec<String>,
    pub dir: TestDir,
}

impl MigrationRig {
    /// `megabytes` of sample data on a new source cluster, `prepare` run on it (as postgres,
    /// before the agents start), then both agents started and tunnelled.
    pub fn start(megabytes: u32, prepare: impl FnOnce(&PgCluster) -> Result<()>) -> Result<Self> {
        let dir = TestDir::new()?;
        let port = free_tcp_port();
        let mut pg = PgCluster::init(&dir.join("source-pg"), port)?;
        pg.start()?;
        load_sample_data(&pg, megabytes)?;
        prepare(&pg)?;
        let certs = Certs::make(&dir.join("certs"))?;
        let source_pw = dir.join("source-pgpass");
        write_secret_file(&source_pw, &pg.password)?;
        let repl_pw = dir.join("repl-pgpass");
        write_secret_file(&repl_pw, &pg.password)?;
        let (udp, local, target_port) = (free_udp_port(), free_tcp_port(), free_tcp_port());
        let socket = dir.join("admin.sock");
        let data_dir = dir.join("new/data");
        let state_file = dir.join("target.state.json");
        std::fs::write(
            dir.join("target.toml"),
            target_toml(
                udp,
                local,
                &data_dir,
                target_port,
                dir.path(),
                &repl_pw,
                &socket,
                &format!("state_file = \"{}\"\n", state_file.display()),
            ),
        )?;
        let source_args = source_args(&format!("127.0.0.1:{udp}"), port, &source_pw);
        let target_args = vec![
            "--config".to_string(),
            dir.join("target.toml").to_string_lossy().into(),
        ];
        let source = Agent::start(
            "source",
            "source",
            dir.path(),
            &certs,
            "source",
            &source_args,
        )?;
        source.wait_for("listening on")?;
        let target = Agent::start(
            "target",
            "target",
            dir.path(),
            &certs,
            "target",
            &target_args,
        )?;
        target.wait_for("tunnel up")?;
        Ok(Self {
            source,
            target,
            standby: Some(ClusterStopGuard(data_dir.clone())),
            pg,
            certs,
            socket,
            data_dir,
            target_port,
            state_file,
            source_args,
            target_args,
            dir,
        })
    }

    /// `pgferry-target <verb> <extra>` against this rig's target agent.
    pub fn cmd(&self, verb: &str, extra: &[&str]) -> (bool, String) {
        target_cmd(verb, &self.socket, extra)
    }

    /// `pgferry-target <verb> <extra>` running in the background.
    pub fn spawn_cmd(&self, verb: &str, extra: &[&str]) -> Result<ChildGuard> {
        let mut cmd = Command::new(bin_path("pgferry-target"));
        cmd.arg(verb)
            .arg("--admin-socket")
            .arg(&self.socket)
            .args(extra);
        ChildGuard::spawn(verb, cmd)
    }

    /// SIGKILL the source agent and start it again with the same arguments (same audit log).
    pub fn kill_and_restart_source(&mut self) -> Result<()> {
        self.source.child.kill();
        self.source = Agent::start(
            "source",
            "source",
            self.dir.path(),
            &self.certs,
            "source",
            &self.source_args,
        )?;
        self.source.wait_for("listening on")?;
        Ok(())
    }

    /// SIGKILL the target agent and start it again; returns once its tunnel is up.
    pub fn kill_and_restart_target(&mut self) -> Result<()> {
        self.target.child.kill();
        self.target = Agent::start(
            "target",
            "target",
            self.dir.path(),
            &self.certs,
            "target",
            &self.target_args,
        )?;
        self.target.wait_for("tunnel up")?;
        Ok(())
    }

    /// The persisted migration phase (`fenced`, `rolled_back`, …).
    pub fn phase(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.state_file).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["state"]["phase"].as_str().map(str::to_string)
    }

    /// Waits until the persisted phase is `phase`.
    pub fn wait_for_phase(&self, phase: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("phase {phase}"), timeout, || {
            (self.phase().as_deref() == Some(phase)).then_some(())
        })
    }

    /// A connection to the new cluster (standby, later primary) as postgres.
    pub async fn connect_new(&self) -> Result<tokio_postgres::Client> {
        self.pg.connect("127.0.0.1", self.target_port).await
    }

    /// Stops the new cluster now (before the source, whose agent it may depend on).
    pub fn stop_new_cluster(&mut self) {
        self.standby = None;
    }
}
