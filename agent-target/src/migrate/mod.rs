//! The executor of the migration state machine: performs each step's side effects, persisting
//! the state ([`crate::state_store`]) *before* moving on, so an interrupted run resumes from the
//! last persisted phase. The transitions themselves are [`pgferry_common::migration::State::next`].
//!
//! The cutover's steps are in [`cutover`].
//!
//! ```text
//!   clone:  preflight ─► create slot (source) ─► pg_basebackup -X stream -S slot -R through the
//!           tunnel ─► pg_verifybackup ─► standby settings ─► pg_ctl start ─► catching up
//! ```
//!
//! Before promotion every failure rolls back: the slot is dropped on the source (so no WAL is
//! retained for a standby that will never come) and the state says `rolled_back` with why.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

mod copy;
mod cutover;
mod delta;

use crate::config::TargetSettings;
use crate::control_client::ControlClient;
use crate::state_store::StateStore;
use pgferry_common::admin::TimelineStep;
use pgferry_common::audit::event::{
    self, AuditEvent, BaseBackupDone, MigrationStateChanged, SlotKept, StandbyStarted,
};
use pgferry_common::control::{FenceMode, Request, Response};
use pgferry_common::migration::{Event, State};

/// What the executor needs from the running target agent.
pub struct Executor<'a> {
    /// The control client of the tunnel up now (waiting, bounded, for one): requests after an
    /// outage go over the new connection.
    pub control: &'a (dyn Fn() -> pgferry_common::runtime::pump::BoxFuture<
        'static,
        Result<std::sync::Arc<ControlClient>>,
    > + Send
             + Sync),
    pub settings: &'a TargetSettings,
    pub migration: &'a str,
    /// The target's local endpoint of the `postgres` service (host, port).
    pub local: (String, u16),
    pub store: StateStore,
    pub audit: &'a (dyn Fn(&str, Value) + Send + Sync),
    pub progress: &'a (dyn Fn(String) + Send + Sync),
    /// How long the tunnel holds forwarded connections through an outage (`resume_grace_secs`).
    pub outage_grace: Duration,
    /// Opens a data stream to the source agent (waiting, bounded, for the tunnel).
    pub open_stream: OpenStream,
    /// The tunnel's stream settings.
    pub pump: &'a pgferry_common::runtime::pump::PumpOptions,
}

/// Opens a data stream to the source agent over the tunnel up now.
pub type OpenStream = std::sync::Arc<
    dyn Fn() -> pgferry_common::runtime::pump::BoxFuture<
            'static,
            Result<(quinn::SendStream, quinn::RecvStream)>,
        > + Send
        + Sync,
>;

/// `application_name` of the base backup's connections (`PGAPPNAME`), as the source's
/// `pg_stat_replication` and the audit report show them.
pub const BASEBACKUP_APP: &str = "pgferry_basebackup";
/// `application_name` of the standby's walreceiver.
pub const STANDBY_APP: &str = "pgferry_standby";
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

impl Executor<'_> {
    /// The replication slot of this migration.
    pub fn slot_name(&self) -> String {
        let clean: String = self
            .migration
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = format!("pgferry_{clean}");
        name.truncate(63);
        name
    }

    fn advance(&self, state: State, event: Event) -> Result<State> {
        let from = state.phase();
        let next = state.next(event.clone())?;
        self.store.save(&next, now_ms())?;
        self.record(&MigrationStateChanged {
            from: from.to_string(),
            to: next.phase().to_string(),
            event: serde_json::to_value(&event).unwrap_or_default(),
        });
        (self.progress)(format!("phase {} → {}", from, next.phase()));
        Ok(next)
    }

    /// Appends a typed audit record.
    pub(super) fn record<E: AuditEvent>(&self, e: &E) {
        (self.audit)(E::NAME, event::details(e));
    }

    async fn ask(&self, request: Request) -> Result<Response> {
        self.ask_within(request, REQUEST_TIMEOUT).await
    }

    pub(super) async fn ask_within(&self, request: Request, timeout: Duration) -> Result<Response> {
        self.ask_via(None, request, timeout).await
    }

    /// Asks over `via` when given, one connection to one source agent process (a request after
    /// that connection ended fails), else over the tunnel up now.
    pub(super) async fn ask_via(
        &self,
        via: Option<&ControlClient>,
        request: Request,
        timeout: Duration,
    ) -> Result<Response> {
        let current;
        let control = match via {
            Some(c) => c,
            None => {
                current = (self.control)().await?;
                &*current
            }
        };
        match control.request(request, timeout).await? {
            Response::Error { message } => bail!("the source agent: {message}"),
            r => Ok(r),
        }
    }

    /// Runs the clone from wherever the persisted state is, up to catching up. On failure
    /// before promotion, rolls back and returns the error.
    pub async fn clone_standby(
        &self,
        preflight: impl std::future::Future<Output = Result<()>>,
    ) -> Result<State> {
        let mut state = self.store.load()?;
        if state.is_final() {
            bail!(
                "the migration state in {} is {}; move the file aside to start a new migration",
                self.store.path().display(),
                state.phase()
            );
        }
        if state == State::New {
            self.store.save(&state, now_ms())?;
        }
        (self.progress)(match state {
            State::New => "starting a new migration".to_string(),
            _ => format!("resuming from phase {}", state.phase()),
        });
        let result = self.clone_steps(&mut state, preflight).await;
        match result {
            Ok(()) => Ok(state),
            Err(e) if state.can_roll_back() => {
                self.fail_and_roll_back(state, &e, "failed").await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn clone_steps(
        &self,
        state: &mut State,
        preflight: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let mut preflight = Some(preflight);
        loop {
            let current = state.clone();
            let next = match &current {
                State::New => {
                    (self.progress)("preflight".into());
                    match preflight.take() {
                        Some(p) => p.await?,
                        None => bail!("preflight ran twice"),
                    }
                    self.advance(current, Event::PreflightPassed)?
                }
                State::Preflighted => {
                    let slot = self.slot_name();
                    (self.progress)(format!("creating replication slot {slot} on the source"));
                    self.ask(Request::CreateSlot { slot: slot.clone() }).await?;
                    self.advance(current, Event::SlotCreated { slot })?
                }
                State::SlotCreated { slot } => {
                    self.base_backup(slot).await?;
                    self.advance(current, Event::BaseBackupVerified)?
                }
                State::BaseBackupDone { .. } => {
                    self.start_standby().await?;
                    self.advance(current, Event::StandbyStarted)?
                }
                State::StandbyStarted { .. } => self.advance(current, Event::CatchUpStarted)?,
                _ => return Ok(()),
            };
            *state = next;
        }
    }

    /// `rollback`: stops the migration before promotion (or finishes an interrupted rollback).
    pub async fn rollback_requested(&self, keep_slot: bool) -> Result<Value> {
        let state = self.store.load()?;
        let rolling = match &state {
            State::RollingBack { .. } => state,
            s if s.can_roll_back() && !matches!(s, State::New) => {
                self.advance(state, Event::RollbackRequested)?
            }
            State::New => bail!("no migration has started; nothing to roll back"),
            s => bail!(
                "the migration is in phase {}: {}",
                s.phase(),
                if s.is_final() {
                    "it is over"
                } else {
                    "the target is promoted (point of no return); rolling back is no longer possible"
                }
            ),
        };
        let done = self.roll_back(rolling, keep_slot).await?;
        Ok(json!({"phase": done.phase()}))
    }

    /// Records a failure before promotion and rolls back.
    async fn fail_and_roll_back(&self, state: State, e: &anyhow::Error, what: &str) -> Result<()> {
        let reason = format!("{e:#}");
        (self.progress)(format!("{what}: {reason}; rolling back"));
        let rolling = self.advance(state, Event::Failed { reason })?;
        self.roll_back(rolling, false).await?;
        Ok(())
    }

    /// Unfences the source, stops the standby, drops the slot (idempotent; kept when asked or
    /// configured) and records the rollback.
    pub async fn roll_back(&self, state: State, keep_slot: bool) -> Result<State> {
        let keep_slot = keep_slot || self.settings.keep_slot_on_rollback;
        let state = match state {
            // Keeping the slot is recorded first (no slot left to drop), so a rollback resumed
            // after an interruption keeps it too.
            State::RollingBack {
                from,
                reason,
                slot: Some(slot),
                fenced,
            } if keep_slot => {
                (self.progress)(format!(
                    "keeping replication slot {slot} on the source (as asked): it retains WAL until a migration of the same name reuses it or you drop it (SELECT pg_drop_replication_slot('{slot}'))"
                ));
                self.record(&SlotKept { slot: slot.clone() });
                let kept = State::RollingBack {
                    from,
                    reason,
                    slot: None,
                    fenced,
                };
                self.store.save(&kept, now_ms())?;
                kept
            }
            s => s,
        };
        let State::RollingBack { slot, fenced, .. } = &state else {
            bail!("not rolling back (phase {})", state.phase());
        };
        // Unfence even when no fence was recorded: a fence can apply on the source and the
        // agent die before saving it. Unfencing an unfenced source changes nothing.
        (self.progress)(if *fenced {
            "unfencing the source (writable again)".to_string()
        } else {
            "making sure the source is not fenced".to_string()
        });
        self.ask(Request::Unfence).await?;
        self.resume_pooler().await;
        self.end_source_backup().await?;
        // The standby we started keeps the slot busy: stop it first (the migration is over).
        if let Some(d) = &self.settings.data_dir {
            self.stop_orphaned_tools(d).await;
            if d.join("postmaster.pid").exists() {
                (self.progress)(format!("stopping the standby in {}", d.display()));
                let mut stop = self.pg_tool("pg_ctl");
                stop.arg("-D")
                    .arg(d)
                    .args(["-m", "fast", "-w", "-t", "60", "stop"]);
                run_with_progress(stop, "pg_ctl stop", self.progress).await?;
            }
        }
        if let Some(slot) = slot {
            (self.progress)(format!("dropping replication slot {slot} on the source"));
            // Its walsender may take a moment to exit after the standby stopped.
            let mut attempt = 0;
            loop {
                match self.ask(Request::DropSlot { slot: slot.clone() }).await {
                    Ok(_) => break,
                    Err(e) if attempt < 20 && format!("{e:#}").contains("is active") => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.advance(state, Event::RollbackDone)
    }

    /// `[target.pgbouncer]` after an unfence: its clients go on against the source (databases
    /// that were not paused are left as they are).
    pub(super) async fn resume_pooler(&self) {
        let Some(pb) = &self.settings.pgbouncer else {
            return;
        };
        let dbs = match pb.read_file() {
            Ok(f) => f.databases(),
            Err(e) => {
                (self.progress)(format!("PgBouncer: {e:#}; run RESUME on its admin console"));
                return;
            }
        };
        match pb.resume(&dbs).await {
            Ok(()) => (self.progress)(format!(
                "PgBouncer resumed ({}): its clients go on against the source",
                dbs.join(", ")
            )),
            Err(e) => (self.progress)(format!(
                "could not RESUME PgBouncer: {e:#}; its clients wait: run RESUME on its admin console"
            )),
        }
        (self.audit)(
            "pooler_resumed",
            json!({"databases": dbs, "rollback": true}),
        );
    }

    pub(super) fn data_dir(&self) -> Result<&Path> {
        self.settings
            .data_dir
            .as_deref()
            .context("no data directory for the new cluster: set [target] data_dir or --data-dir")
    }

    /// A PostgreSQL tool, run as the cluster's OS user when the agent runs as root.
    pub(super) fn pg_tool(&self, name: &str) -> tokio::process::Command {
        let program = self.settings.bindir.join(name);
        match &self.settings.os_user {
            Some(user) if running_as_root() => {
                let mut c = tokio::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            _ => tokio::process::Command::new(program),
        }
    }

    async fn base_backup(&self, slot: &str) -> Result<()> {
        use crate::config::CopyMethod;
        if self.settings.copy_method == CopyMethod::Agent {
            let t = Instant::now();
            self.agent_copy(slot).await?;
            let data_dir = self.data_dir()?;
            // The copy carries no WAL (the standby streams it through the slot).
            let mut verify = self.pg_tool("pg_verifybackup");
            verify.arg("--no-parse-wal").arg(data_dir);
            run_with_progress(verify, "pg_verifybackup", self.progress).await?;
            self.record(&BaseBackupDone {
                slot: slot.to_string(),
                data_dir: data_dir.display().to_string(),
                duration_ms: t.elapsed().as_millis() as u64,
                verified: true,
            });
            return Ok(());
        }
        self.pg_basebackup(slot).await
    }

    /// The base copy by `pg_basebackup -X stream -R` through the tunnel, then `pg_verifybackup`.
    async fn pg_basebackup(&self, slot: &str) -> Result<()> {
        let data_dir = self.data_dir()?;
        // A run killed during the backup leaves its pg_basebackup running (holding the slot and
        // writing into the directory): end it first.
        self.stop_orphaned_tools(data_dir).await;
        // A backup interrupted earlier left a partial directory that only we wrote (preflight
        // saw it empty or absent): start it over.
        if data_dir.exists() {
            clear_tablespaces(data_dir)?;
            std::fs::remove_dir_all(data_dir).with_context(|| {
                format!("clearing the partial backup in {}", data_dir.display())
            })?;
        }
        if let Some(parent) = data_dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let (Some(user), true) = (&self.settings.os_user, running_as_root()) {
            // pg_basebackup (running as that user) must be able to create the directory.
            chown(user, data_dir.parent().unwrap_or(Path::new("/")), false).await?;
        }
        let (host, port) = &self.local;
        (self.progress)(format!(
            "pg_basebackup -X stream -S {slot} -R through the tunnel ({host}:{port}) into {}",
            data_dir.display()
        ));
        let mut cmd = self.pg_tool("pg_basebackup");
        cmd.args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            &self.settings.replication_user,
        ])
        .arg("-D")
        .arg(data_dir)
        .args([
            "-X",
            "stream",
            "-S",
            slot,
            "-R",
            "-c",
            "fast",
            "--progress",
            "--no-password",
        ])
        .env("PGAPPNAME", BASEBACKUP_APP);
        for (old, new) in &self.settings.tablespace_mapping {
            cmd.arg(format!(
                "--tablespace-mapping={}={}",
                old.display(),
                new.display()
            ));
        }
        if !self.outage_grace.is_zero() {
            // The WAL stream's walsender would end a connection silent for wal_sender_timeout
            // (60 s by default) even though the tunnel holds it through an outage: for this
            // copy, allow the tunnel's grace period and a minute.
            cmd.env(
                "PGOPTIONS",
                format!(
                    "-c wal_sender_timeout={}s",
                    self.outage_grace.as_secs() + 60
                ),
            );
        }
        if let Some(p) = &self.settings.replication_password_file {
            let pw = pgferry_common::runtime::config::read_password_file(p)?;
            cmd.env("PGPASSWORD", pw);
        }
        let t = Instant::now();
        run_with_progress(cmd, "pg_basebackup", self.progress).await?;
        let secs = t.elapsed().as_secs_f64();
        (self.progress)(format!(
            "base backup done in {secs:.1} s; running pg_verifybackup"
        ));
        let mut verify = self.pg_tool("pg_verifybackup");
        verify.arg(data_dir);
        run_with_progress(verify, "pg_verifybackup", self.progress).await?;
        self.record(&BaseBackupDone {
            slot: slot.to_string(),
            data_dir: data_dir.display().to_string(),
            duration_ms: (secs * 1000.0) as u64,
            verified: true,
        });
        Ok(())
    }

    async fn start_standby(&self) -> Result<()> {
        let data_dir = self.data_dir()?;
        // Settings of the new host override what was copied from the source.
        let auto = data_dir.join("postgresql.auto.conf");
        // The walreceiver names itself apart from the base backup (pg_basebackup -R wrote its
        // own application_name into primary_conninfo): the audit report tells them apart.
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default().replace(
            &format!("application_name={BASEBACKUP_APP}"),
            &format!("application_name={STANDBY_APP}"),
        );
        text.push_str(&format!(
            "\n# pgferry: the new cluster's own settings\nport = {}\nunix_socket_directories = '{}'\nlisten_addresses = '{}'\nwal_retrieve_retry_interval = '1s'\n",
            self.settings.port,
            self.settings.socket_dir.display(),
            self.settings.listen_addresses
        ));
        std::fs::write(&auto, text).with_context(|| format!("writing {}", auto.display()))?;
        if let Some(hba) = &self.settings.hba_file {
            install_hba(hba, data_dir)?;
            (self.progress)(format!(
                "installed {} as the new cluster's pg_hba.conf",
                hba.display()
            ));
        }
        let log = data_dir
            .parent()
            .unwrap_or(Path::new("/tmp"))
            .join("pgferry-standby.log");
        (self.progress)(format!(
            "starting the standby on port {} (log {})",
            self.settings.port,
            log.display()
        ));
        let mut start = self.pg_tool("pg_ctl");
        start
            .arg("-D")
            .arg(data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120", "start"]);
        run_with_progress(start, "pg_ctl start", self.progress).await?;
        self.record(&StandbyStarted {
            data_dir: data_dir.display().to_string(),
            port: self.settings.port,
        });
        Ok(())
    }
}

/// Copies the operator's `pg_hba.conf` into the new data directory, owned like the directory
/// (PostgreSQL runs as its owner) and mode 0600, replacing the copy of the source's.
fn install_hba(hba: &Path, data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dest = data_dir.join("pg_hba.conf");
    let tmp = data_dir.join("pg_hba.conf.pgferry-new");
    std::fs::copy(hba, &tmp).with_context(|| {
        format!(
            "copying [target] hba_file {} into {}",
            hba.display(),
            data_dir.display()
        )
    })?;
    let owner = std::fs::metadata(data_dir)?;
    std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()))
        .with_context(|| format!("chown {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok(())
}

impl Executor<'_> {
    /// Ends `pg_basebackup`/`pg_verifybackup` processes still working on `data_dir` (left by
    /// an agent that was killed: they outlive it): SIGTERM, then SIGKILL after 5 s.
    async fn stop_orphaned_tools(&self, data_dir: &Path) {
        let pids = tool_processes_on(data_dir);
        if pids.is_empty() {
            return;
        }
        (self.progress)(format!(
            "ending {} pg_basebackup/pg_verifybackup process(es) left on {} by an earlier run (pid {:?})",
            pids.len(),
            data_dir.display(),
            pids
        ));
        (self.audit)(
            "orphaned_tools_stopped",
            json!({"pids": pids, "data_dir": data_dir.display().to_string()}),
        );
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for p in &pids {
            let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && pids.iter().any(|p| kill(Pid::from_raw(*p), None).is_ok())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Only those still running the tool on this directory (a PID may have been reused).
        for p in tool_processes_on(data_dir)
            .into_iter()
            .filter(|p| pids.contains(p))
        {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// PIDs of `pg_basebackup`/`pg_verifybackup` processes (or `runuser` running one) whose
/// arguments name `data_dir`, from `/proc`.
fn tool_processes_on(data_dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let target = data_dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_tool = args
                .iter()
                .take(4)
                .any(|a| a.ends_with(b"pg_basebackup") || a.ends_with(b"pg_verifybackup"));
            is_tool && args.contains(&target)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// `chown [-R] user path` (the agent runs as root; PostgreSQL as `user`).
/// What an earlier copy wrote into the tablespaces linked from `data_dir` (each link's
/// `PG_<version>_…` directories: nothing else of the location is touched), so that a new copy
/// finds them empty, as `pg_basebackup` requires.
fn clear_tablespaces(data_dir: &Path) -> Result<()> {
    let Ok(links) = std::fs::read_dir(data_dir.join("pg_tblspc")) else {
        return Ok(());
    };
    for link in links.flatten() {
        let Ok(location) = std::fs::read_link(link.path()) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(&location) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("PG_") {
                std::fs::remove_dir_all(e.path()).with_context(|| {
                    format!("clearing the partial copy in {}", e.path().display())
                })?;
            }
        }
    }
    Ok(())
}

async fn chown(user: &str, path: &Path, recursive: bool) -> Result<()> {
    let mut cmd = tokio::process::Command::new("chown");
    if recursive {
        cmd.arg("-R");
    }
    let st = cmd.arg(user).arg(path).status().await?;
    if !st.success() {
        bail!(
            "chown {}{user} {} failed",
            if recursive { "-R " } else { "" },
            path.display()
        );
    }
    Ok(())
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a tool, forwarding its progress (lines split at `\r` or `\n`, at most one a second).
async fn run_with_progress(
    mut cmd: tokio::process::Command,
    what: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut tail = String::new();
    let mut last = Instant::now() - Duration::from_secs(2);
    let mut ebuf = [0u8; 4096];
    let mut obuf = [0u8; 4096];
    let (mut err_done, mut out_done) = (false, false);
    while !(err_done && out_done) {
        let chunk = tokio::select! {
            r = stderr.read(&mut ebuf), if !err_done => {
                let n = r?;
                if n == 0 { err_done = true; continue; }
                String::from_utf8_lossy(&ebuf[..n]).to_string()
            }
            r = stdout.read(&mut obuf), if !out_done => {
                let n = r?;
                if n == 0 { out_done = true; continue; }
                String::from_utf8_lossy(&obuf[..n]).to_string()
            }
        };
        tail.push_str(&chunk);
        if let Some(line) = tail.rsplit(['\r', '\n']).find(|l| !l.trim().is_empty()) {
            if last.elapsed() >= Duration::from_secs(1) {
                progress(format!("{what}: {}", line.trim()));
                last = Instant::now();
            }
        }
        if tail.len() > 64 * 1024 {
            tail.drain(..tail.len() - 8 * 1024);
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        let last_lines: Vec<&str> = tail.lines().rev().take(8).collect();
        bail!(
            "{what} failed ({status}): {}",
            last_lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(())
}

/// A connection to the new cluster (the standby, later the promoted primary) on 127.0.0.1.
/// Opens further connections to the new cluster (for digests in parallel).
pub(super) fn new_cluster_connector(
    settings: &TargetSettings,
) -> impl Fn() -> pgferry_common::runtime::digest::ConnectFuture + Send + Sync {
    let settings = settings.clone();
    move || {
        let settings = settings.clone();
        Box::pin(async move { connect_new_cluster(&settings).await })
    }
}

pub async fn connect_new_cluster(settings: &TargetSettings) -> Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(settings.port)
        .user(&settings.replication_user)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = &settings.replication_password_file {
        cfg.password(pgferry_common::runtime::config::read_password_file(p)?);
    }
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.with_context(|| {
        format!(
            "connecting to the new cluster on 127.0.0.1:{}",
            settings.port
        )
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub use pgferry_common::admin::StandbyStatus;

/// The standby's side of the lag: received and replayed LSNs, last replayed commit time.
pub async fn standby_status(c: &tokio_postgres::Client) -> Result<StandbyStatus> {
    let r = c
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
                    (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000)::int8,
                    (extract(epoch FROM clock_timestamp()) * 1000)::int8",
            &[],
        )
        .await?;
    let lsn = |i: usize| -> Result<Option<pgferry_common::migration::Lsn>> {
        r.get::<_, Option<String>>(i)
            .map(|t| t.parse().map_err(anyhow::Error::from))
            .transpose()
    };
    Ok(StandbyStatus {
        in_recovery: r.get(0),
        receive_lsn: lsn(1)?,
        replay_lsn: lsn(2)?,
        last_replay_ms: r.get::<_, Option<i64>>(3).map(|v| v.max(0) as u64),
        now_ms: r.get::<_, i64>(4).max(0) as u64,
    })
}

pub use pgferry_common::admin::{
    CutoverOptions, DEFAULT_MAX_LAG, DEFAULT_REPLAY_TIMEOUT_SECS, DEFAULT_VERIFY_BUDGET_SECS,
};
/// Digest throughput assumed per connection (one per core) when planning the verification, in
/// bytes of table (`pg_table_size`) per second. Measured: one COPY of a 180 MB mixed table
/// ~115 MB/s on an idle core; the flagship test's 287 MB on 2 cores shared by both clusters
/// and both agents, 72 MB/s in all. Planning assumes the pessimistic 40 MB/s per core.
pub const DIGEST_BYTES_PER_SEC: u64 = 40 * 1024 * 1024;
/// Longest wait for the source's digests.
const DIGEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Which tables the cutover verifies (largest first, so parallel workers finish together) and
/// which it leaves out because they do not fit the time budget.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TablePlan {
    pub verify: Vec<String>,
    pub skipped: Vec<String>,
    pub bytes: u64,
    pub estimated_secs: f64,
}

/// Plans the verification from table sizes (bytes): all of them when `budget_secs` is `None`,
/// else the smallest tables whose estimated time on `parallel` connections fits the budget.
pub fn plan_tables(
    sizes: &[(String, u64)],
    budget_secs: Option<u64>,
    parallel: usize,
) -> TablePlan {
    let parallel = parallel.max(1) as f64;
    let estimate = |total: u64, largest: u64| {
        let rate = DIGEST_BYTES_PER_SEC as f64;
        (total as f64 / (rate * parallel)).max(largest as f64 / rate)
    };
    let mut by_size: Vec<&(String, u64)> = sizes.iter().collect();
    by_size.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let (mut verify, mut skipped) = (Vec::new(), Vec::new());
    let (mut total, mut largest) = (0u64, 0u64);
    for (name, size) in by_size {
        let fits = match budget_secs {
            None => true,
            Some(b) => estimate(total + size, largest.max(*size)) <= b as f64,
        };
        if fits && skipped.is_empty() {
            verify.push((name.clone(), *size));
            total += size;
            largest = largest.max(*size);
        } else {
            skipped.push(name.clone());
        }
    }
    verify.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    TablePlan {
        verify: verify.into_iter().map(|(n, _)| n).collect(),
        skipped,
        bytes: total,
        estimated_secs: estimate(total, largest),
    }
}

impl Executor<'_> {
    async fn tables(
        &self,
        standby: &tokio_postgres::Client,
        opts: &CutoverOptions,
    ) -> Result<TablePlan> {
        // Unlogged tables are not replicated (and cannot be read on a standby): never verified.
        let rows = standby
            .query(
                "SELECT s.schemaname || '.' || s.relname, pg_table_size(s.relid), c.relpersistence = 'u'
                   FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid",
                &[],
            )
            .await?;
        let (unlogged, sizes): (Vec<_>, Vec<_>) = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1).max(0) as u64,
                    r.get::<_, bool>(2),
                )
            })
            .partition(|(_, _, u)| *u);
        let sizes: Vec<(String, u64)> = sizes.into_iter().map(|(n, s, _)| (n, s)).collect();
        let unlogged: Vec<String> = unlogged.into_iter().map(|(n, _, _)| n).collect();
        if let Some(asked) = &opts.tables {
            let unknown: Vec<&String> = asked
                .iter()
                .filter(|t| !sizes.iter().any(|(n, _)| n == *t))
                .collect();
            if !unknown.is_empty() {
                let why = |t: &str| {
                    if unlogged.iter().any(|u| u == t) {
                        format!("{t} (UNLOGGED: its contents are not replicated)")
                    } else {
                        t.to_string()
                    }
                };
                bail!(
                    "--tables names tables the new cluster cannot verify: {}",
                    unknown
                        .iter()
                        .map(|t| why(t))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let chosen: Vec<(String, u64)> = sizes
                .into_iter()
                .filter(|(n, _)| asked.contains(n))
                .collect();
            return Ok(plan_tables(
                &chosen,
                None,
                pgferry_common::runtime::digest::digest_parallelism(),
            ));
        }
        // Names the typed request cannot carry (quoted identifiers) are listed as skipped.
        let (sizes, odd): (Vec<_>, Vec<_>) = sizes
            .into_iter()
            .partition(|(n, _)| pgferry_common::control::valid_table_name(n));
        let budget = (!opts.all_tables).then_some(opts.verify_budget_secs);
        let mut plan = plan_tables(
            &sizes,
            budget,
            pgferry_common::runtime::digest::digest_parallelism(),
        );
        plan.skipped.extend(odd.into_iter().map(|(n, _)| n));
        plan.skipped.extend(unlogged);
        Ok(plan)
    }
}

/// Lag (bytes) under which the standby counts as caught up before the fence.
const CAUGHT_UP_BYTES: u64 = 1024 * 1024;

impl Executor<'_> {
    /// Waits (at most `within`) until the standby has replayed to within `bytes` of the
    /// source's current position; after that the fence goes ahead anyway (the drain waits).
    async fn wait_for_lag(
        &self,
        standby: &tokio_postgres::Client,
        bytes: u64,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let current = match self.ask(Request::Status { slot: None }).await? {
                Response::Status { status } => status.current_lsn,
                other => bail!("unexpected answer {other:?}"),
            };
            let replay = standby_status(standby)
                .await?
                .replay_lsn
                .unwrap_or_default();
            let lag = current.0.saturating_sub(replay.0);
            if lag <= bytes || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// TID range scans (the pre-pass's block ranges) exist from PostgreSQL 14.
async fn supports_tid_range_scans(c: &tokio_postgres::Client) -> Result<bool> {
    let v: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    Ok(v >= 140000)
}

fn fence_name(mode: FenceMode) -> &'static str {
    match mode {
        FenceMode::ReadOnly => "pg_hba.conf admits only pgferry, read-only",
        FenceMode::Stop => {
            "pg_hba.conf admits only pgferry, read-only, shut down once the target is writable"
        }
    }
}

fn skipped_note(plan: &TablePlan) -> String {
    if plan.skipped.is_empty() {
        String::new()
    } else {
        format!(
            "; NOT VERIFIED (over the time budget; use --all-tables or --tables): {}",
            plan.skipped.join(", ")
        )
    }
}

/// What happened in each phase, for the report: the step that ran while the migration was in
/// that phase, and how long it took.
fn timeline(history: &[crate::state_store::PhaseMark]) -> Vec<TimelineStep> {
    let step = |phase: &str| match phase {
        "new" => "preflight",
        "preflighted" => "create the replication slot",
        "slot_created" => "base backup and pg_verifybackup",
        "base_backup_done" => "configure and start the standby",
        "standby_started" => "standby streaming",
        "catching_up" => "catch-up",
        "ready" => "fence the source",
        "fenced" => "wait for the standby to replay the fence LSN",
        "drained" => "verify tables on both sides",
        "verified" => "promote",
        "promoted" => "confirm the new cluster is writable",
        "rolling_back" => "roll back",
        _ => "",
    };
    history
        .iter()
        .enumerate()
        .map(|(i, m)| TimelineStep {
            phase: m.phase.clone(),
            step: step(&m.phase).to_string(),
            at_ms: m.at_ms,
            ms: history.get(i + 1).map(|n| n.at_ms.saturating_sub(m.at_ms)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    const MB: u64 = 1024 * 1024;

    #[test]
    fn plan_verifies_everything_that_fits_largest_first() {
        let s = sizes(&[("a.small", MB), ("a.big", 50 * MB), ("a.mid", 10 * MB)]);
        let p = plan_tables(&s, Some(30), 4);
        assert_eq!(p.verify, ["a.big", "a.mid", "a.small"]);
        assert!(p.skipped.is_empty());
        assert_eq!(p.bytes, 61 * MB);
        // The largest table alone bounds the estimate (one connection per table).
        let rate = DIGEST_BYTES_PER_SEC as f64;
        assert!((p.estimated_secs - 50.0 * MB as f64 / rate).abs() < 1e-9);
    }

    #[test]
    fn plan_leaves_out_the_largest_tables_over_the_budget() {
        let huge = DIGEST_BYTES_PER_SEC * 100;
        let s = sizes(&[("a.huge", huge), ("a.small", MB), ("b.small", 2 * MB)]);
        let p = plan_tables(&s, Some(10), 4);
        assert_eq!(p.verify, ["b.small", "a.small"]);
        assert_eq!(p.skipped, ["a.huge"]);
        assert!(p.estimated_secs <= 10.0);
        // --all-tables (no budget) takes everything.
        let all = plan_tables(&s, None, 4);
        assert_eq!(all.verify, ["a.huge", "b.small", "a.small"]);
        assert!(all.skipped.is_empty());
        assert!(all.estimated_secs >= 100.0);
        // A zero budget verifies only empty tables.
        let none = plan_tables(&sizes(&[("a.empty", 0), ("a.one", MB)]), Some(0), 4);
        assert_eq!(none.verify, ["a.empty"]);
        assert_eq!(none.skipped, ["a.one"]);
    }

    #[test]
    fn finds_a_tool_still_working_on_the_data_directory() {
        let d = tempfile::tempdir().unwrap();
        let tool = d.path().join("pg_basebackup");
        std::os::unix::fs::symlink("/bin/sh", &tool).unwrap();
        let data = d.path().join("data");
        let mut child = std::process::Command::new(&tool)
            .args(["-c", "sleep 30; true", "-D"])
            .arg(&data)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until the child has exec'd, /proc shows the test's own command line.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tool_processes_on(&data).contains(&pid) {
            assert!(Instant::now() < deadline, "pid {pid} never found");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!tool_processes_on(&d.path().join("other")).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!tool_processes_on(&data).contains(&pid));
    }

    #[test]
    fn timeline_gives_each_phase_its_duration() {
        use crate::state_store::PhaseMark;
        let h = [
            PhaseMark {
                phase: "new".into(),
                at_ms: 1_000,
            },
            PhaseMark {
                phase: "preflighted".into(),
                at_ms: 1_250,
            },
            PhaseMark {
                phase: "slot_created".into(),
                at_ms: 1_300,
            },
        ];
        let t = timeline(&h);
        assert_eq!(t[0].step, "preflight");
        assert_eq!(t[0].ms, Some(250));
        assert_eq!(t[1].ms, Some(50));
        assert!(t[2].ms.is_none(), "the current phase has no end yet");
    }
}
