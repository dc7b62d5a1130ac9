//! Pieces the whole-migration tests share: secret files, the new cluster's stop guard, the
//! admin verbs, a writer that commits numbered transactions on the source, and a
//! [`MigrationRig`] to start from: source cluster, certificates, secrets, the target's config
//! and both agents, over loopback or across two network namespaces ([`RigBuilder`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use pgferry_tests::{
    bin_path, connect_tcp, free_tcp_port, free_udp_port, load_sample_data, pg_bin, wait_until,
    ChildGuard, NetnsPair, PgCluster, TestDir,
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

impl ClusterStopGuard {
    /// Stops the cluster now, if it runs (the guard stays armed for a later one).
    pub fn stop(&self) {
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

impl Drop for ClusterStopGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `pgferry-target <verb> --admin-socket <socket> <extra>`, not yet run.
pub fn target_command(verb: &str, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("pgferry-target"));
    cmd.arg(verb).arg("--admin-socket").arg(socket).args(extra);
    cmd
}

/// Runs `pgferry-target <verb> --admin-socket <socket> <extra>`: success and stdout+stderr.
pub fn target_cmd(verb: &str, socket: &Path, extra: &[&str]) -> (bool, String) {
    let out = target_command(verb, socket, extra)
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

/// The copy phase's seconds in a `clone`'s output, either method: "base backup done in 1.7 s"
/// or "agent copy done: … fetched in 1.2 s".
pub fn copy_secs(out: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = l
            .split_once("base backup done in ")
            .or_else(|| l.split_once(" fetched in "))?
            .1;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })
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

/// The number just before the first `label` in `text` (e.g. "659.7" in "659.7 MB fetched").
pub fn number_before<T: std::str::FromStr>(text: &str, label: &str) -> Option<T> {
    text.split_once(label)?.0.rsplit(' ').next()?.parse().ok()
}

/// How the agents of a [`MigrationRig`] are started (and started again): their arguments, and
/// the network namespace each runs in, if any.
struct Launcher {
    dir: PathBuf,
    source_args: Vec<String>,
    target_args: Vec<String>,
    source_netns: Option<String>,
    target_netns: Option<String>,
}

impl Launcher {
    /// `pgferry-source run`; returns once it listens.
    fn source(&self, certs: &Certs) -> Result<Agent> {
        let agent = Agent::start_with(
            "source",
            "source",
            &self.dir,
            certs,
            "source",
            &self.source_args,
            self.source_netns.as_deref(),
        )?;
        agent.wait_for("listening on")?;
        Ok(agent)
    }

    /// `pgferry-target run`; returns once its tunnel is up.
    fn target(&self, certs: &Certs) -> Result<Agent> {
        let agent = Agent::start_with(
            "target",
            "target",
            &self.dir,
            certs,
            "target",
            &self.target_args,
            self.target_netns.as_deref(),
        )?;
        agent.wait_for("tunnel up")?;
        Ok(agent)
    }
}

type Prepare<'p> = Box<dyn FnOnce(&PgCluster) -> Result<()> + 'p>;

/// What a [`MigrationRig`] is made of, beyond the defaults; [`MigrationRig::builder`].
pub struct RigBuilder<'p> {
    megabytes: u32,
    prepare: Option<Prepare<'p>>,
    replication_password: Option<String>,
    target_config: String,
    agent_args: Vec<String>,
    netns: Option<NetnsPair>,
}

impl<'p> RigBuilder<'p> {
    /// Extra `run` arguments for both agents (e.g. `--resume-grace-secs 5`).
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Runs `prepare` on the source cluster (as postgres) after the sample data is loaded and
    /// before the agents start.
    pub fn prepare(mut self, prepare: impl FnOnce(&PgCluster) -> Result<()> + 'p) -> Self {
        self.prepare = Some(Box::new(prepare));
        self
    }

    /// Writes `password` into the target's replication password file instead of the source
    /// cluster's (rewrite [`MigrationRig::repl_pw`] to fix it).
    pub fn replication_password(mut self, password: &str) -> Self {
        self.replication_password = Some(password.to_string());
        self
    }

    /// Extra lines at the end of the target config's `[target]` section.
    pub fn target_config(mut self, lines: &str) -> Self {
        self.target_config.push_str(lines);
        self
    }

    /// Two "hosts": the source cluster and agent in namespace `a` of `net`, listening on its
    /// veth address; the target agent (and so the new cluster) in `b`. The rig keeps `net`
    /// until everything in it has stopped.
    pub fn netns(mut self, net: NetnsPair) -> Self {
        self.netns = Some(net);
        self
    }

    /// The source cluster with its sample data, `prepare` run on it.
    fn source_cluster(&mut self, dir: &TestDir) -> Result<PgCluster> {
        let mut pg = PgCluster::init(&dir.join("source-pg"), free_tcp_port())?;
        if let Some(net) = &self.netns {
            pg = pg.with_netns(&net.a);
        }
        pg.start()?;
        load_sample_data(&pg, self.megabytes)?;
        if let Some(prepare) = self.prepare.take() {
            prepare(&pg)?;
        }
        Ok(pg)
    }

    /// The source cluster, certificates, secrets, the target's config, both agents up.
    pub fn start(mut self) -> Result<MigrationRig> {
        let dir = TestDir::new()?;
        let pg = self.source_cluster(&dir)?;
        let certs = Certs::make(&dir.join("certs"))?;
        let source_pw = dir.join("source-pgpass");
        write_secret_file(&source_pw, &pg.password)?;
        let repl_pw = dir.join("repl-pgpass");
        let repl_secret = self.replication_password.as_deref();
        write_secret_file(&repl_pw, repl_secret.unwrap_or(&pg.password))?;
        let (udp, local, target_port) = (free_udp_port(), free_tcp_port(), free_tcp_port());
        // Over loopback, or to the source namespace's veth address (which the certificates
        // do not name: they name 127.0.0.1 and localhost).
        let (quic, network) = match &self.netns {
            None => (format!("127.0.0.1:{udp}"), String::new()),
            Some(net) => (
                format!("{}:{udp}", net.addr_a),
                "server_name = \"localhost\"\n".to_string(),
            ),
        };
        let (socket, data_dir) = (dir.join("admin.sock"), dir.join("new/data"));
        let state_file = dir.join("target.state.json");
        let config = format!(
            "[network]\nconnect = \"{quic}\"\n{network}\
             [[service]]\nname = \"postgres\"\nlocal = \"127.0.0.1:{local}\"\n\
             [target]\ndata_dir = \"{}\"\nport = {target_port}\nsocket_dir = \"{}\"\n\
             os_user = \"postgres\"\nreplication_password_file = \"{}\"\nadmin_socket = \"{}\"\n\
             lag_sample_secs = 1\nstate_file = \"{}\"\n{}",
            data_dir.display(),
            dir.path().display(),
            repl_pw.display(),
            socket.display(),
            state_file.display(),
            self.target_config,
        );
        std::fs::write(dir.join("target.toml"), config)?;
        let launch = Launcher {
            dir: dir.path().to_path_buf(),
            source_args: [
                source_args(&quic, pg.port, &source_pw),
                self.agent_args.clone(),
            ]
            .concat(),
            target_args: [
                vec![
                    "--config".to_string(),
                    dir.join("target.toml").to_string_lossy().into(),
                ],
                self.agent_args.clone(),
            ]
            .concat(),
            source_netns: self.netns.as_ref().map(|n| n.a.clone()),
            target_netns: self.netns.as_ref().map(|n| n.b.clone()),
        };
        let source = launch.source(&certs)?;
        let target = launch.target(&certs)?;
        Ok(MigrationRig {
            source,
            target,
            standby: ClusterStopGuard(data_dir.clone()),
            pg,
            certs,
            socket,
            data_dir,
            target_port,
            state_file,
            repl_pw,
            launch,
            dir,
            netns: self.netns,
        })
    }
}

/// `pgferry-source run` arguments: listen on `listen`, forward to and control the cluster on
/// 127.0.0.1:`pg_port` with the password in `password_file`.
fn source_args(listen: &str, pg_port: u16, password_file: &Path) -> Vec<String> {
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
///
/// ```text
///   dir/source-pg        the source cluster (127.0.0.1:pg.port, unix socket in source-pg)
///   dir/certs            CA, source.pem (DE), target.pem (FR)
///   dir/source-pgpass    the source agent's password for postgres
///   dir/repl-pgpass      the target's replication password (repl_pw)
///   dir/target.toml      the target agent's config; state in dir/target.state.json
///   dir/admin.sock       the target agent's admin socket
///   dir/new/data         the new cluster (127.0.0.1:target_port, unix socket in dir)
///   dir/*.audit.jsonl    both agents' audit logs
/// ```
pub struct MigrationRig {
    pub source: Agent,
    pub target: Agent,
    standby: ClusterStopGuard,
    pub pg: PgCluster,
    pub certs: Certs,
    /// The admin socket of the target agent.
    pub socket: PathBuf,
    /// The new cluster's data directory and port.
    pub data_dir: PathBuf,
    pub target_port: u16,
    pub state_file: PathBuf,
    /// The target's replication password file.
    pub repl_pw: PathBuf,
    launch: Launcher,
    pub dir: TestDir,
    /// Dropped last: the clusters and agents in it stop first.
    pub netns: Option<NetnsPair>,
}

impl MigrationRig {
    /// `megabytes` of sample data on a new source cluster, `prepare` run on it (as postgres,
    /// before the agents start), then both agents started and tunnelled.
    pub fn start(megabytes: u32, prepare: impl FnOnce(&PgCluster) -> Result<()>) -> Result<Self> {
        Self::builder(megabytes).prepare(prepare).start()
    }

    /// A rig with `megabytes` of sample data on the source; options, then
    /// [`start`](RigBuilder::start).
    pub fn builder<'p>(megabytes: u32) -> RigBuilder<'p> {
        RigBuilder {
            megabytes,
            prepare: None,
            replication_password: None,
            target_config: String::new(),
            agent_args: Vec::new(),
            netns: None,
        }
    }

    /// `pgferry-target <verb> <extra>` against this rig's target agent.
    pub fn cmd(&self, verb: &str, extra: &[&str]) -> (bool, String) {
        target_cmd(verb, &self.socket, extra)
    }

    /// `pgferry-target <verb> <extra>` against this rig's target agent, not yet run.
    pub fn command(&self, verb: &str, extra: &[&str]) -> Command {
        target_command(verb, &self.socket, extra)
    }

    /// `pgferry-target <verb> <extra>` running in the background.
    pub fn spawn_cmd(&self, verb: &str, extra: &[&str]) -> Result<ChildGuard> {
        ChildGuard::spawn(verb, self.command(verb, extra))
    }

    /// SIGKILL the source agent and start it again with the same arguments (same audit log).
    pub fn kill_and_restart_source(&mut self) -> Result<()> {
        self.kill_source();
        self.start_source()
    }

    /// SIGKILL the source agent; it stays down until [`start_source`](Self::start_source).
    pub fn kill_source(&mut self) {
        self.source.child.kill();
    }

    /// Starts the source agent again with the same arguments; returns once it listens.
    pub fn start_source(&mut self) -> Result<()> {
        self.source = self.launch.source(&self.certs)?;
        Ok(())
    }

    /// SIGKILL the target agent; it stays down until [`start_target`](Self::start_target).
    pub fn kill_target(&mut self) {
        self.target.child.kill();
    }

    /// Starts the target agent again with the same arguments (same audit log); returns once
    /// its tunnel is up.
    pub fn start_target(&mut self) -> Result<()> {
        self.target = self.launch.target(&self.certs)?;
        Ok(())
    }

    /// SIGKILL the target agent and start it again; returns once its tunnel is up.
    pub fn kill_and_restart_target(&mut self) -> Result<()> {
        self.kill_target();
        self.start_target()
    }

    /// Bytes of every database of the source cluster.
    pub fn source_bytes(&self) -> Result<u64> {
        Ok(self
            .pg
            .psql("SELECT sum(pg_database_size(oid)) FROM pg_database")?
            .parse()?)
    }

    /// The persisted migration phase (`fenced`, `rolled_back`, …).
    /// The agent copy's journal (beside the state file): a line per file complete.
    pub fn copy_journal(&self) -> PathBuf {
        self.state_file.with_extension("copy.jsonl")
    }

    /// Lines in the agent copy's journal (0 without one).
    pub fn journal_lines(&self) -> usize {
        std::fs::read_to_string(self.copy_journal()).map_or(0, |t| t.lines().count())
    }

    /// Waits until the agent copy's journal has more than `lines` lines (files complete).
    pub fn wait_for_journal_lines(&self, lines: usize) -> Result<()> {
        wait_until(
            "files in the copy's journal",
            Duration::from_secs(120),
            || (self.journal_lines() > lines).then_some(()),
        )
    }

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

    /// Stops the new cluster now (before the source, whose agent it may depend on). A cluster
    /// started later in the same directory is stopped on drop again.
    pub fn stop_new_cluster(&self) {
        self.standby.stop();
    }

    /// SIGTERM both agents (target first, as an operator would after the migration), each
    /// asserted to exit cleanly.
    pub fn stop_agents(&mut self) -> Result<()> {
        self.target.stop()?;
        self.source.stop()
    }
}
