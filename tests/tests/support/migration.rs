//! Pieces the whole-migration tests share: secret files, the new cluster's stop guard, the
//! admin verbs, and a writer that commits numbered transactions on the source.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use pgferry_tests::{bin_path, connect_tcp, pg_bin};

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
