//! The agent-owned base copy (`[target] copy_method = "agent"`): the source agent runs the
//! backup session itself (`pg_backup_start` on its own PostgreSQL session, so the network is
//! not part of it) and serves the files of its plan; the target fetches them over parallel
//! file streams, chunked, compressed and BLAKE3-checked like every stream, and keeps a journal
//! of the files complete, so a copy interrupted anywhere (an outage, a kill -9 of this agent)
//! goes on with the files it lacks, and a partly written file from its end.
//!
//! ```text
//!   BackupStart(label) ─► plan: directories, files (pg_control last), start LSN
//!   N workers: File(id, path, offset, end) stream ─► data_dir/path (append, SHA-256 as written)
//!              ─► fsync ─► journal line {path, size, sha256}             (skipped when journaled)
//!   pg_control ─► BackupStop ─► backup_label, tablespace_map ─► backup_manifest
//!   ─► standby.signal, primary_conninfo, primary_slot_name ─► pg_verifybackup --no-parse-wal
//! ```
//!
//! Why the copy is consistent: every file is read after `pg_backup_start`'s checkpoint and
//! before `pg_backup_stop`, as PostgreSQL's own base backup reads them; torn or stale pages are
//! rewritten by WAL replay from the backup's start LSN (full-page writes are forced during a
//! backup), which the standby streams through the replication slot created before the copy.
//! Bytes reach a file only once their chunk is verified, so a file's length on disk is always a
//! verified prefix (unless the journal names the file as being patched, see [`super::delta`]):
//! resuming from it is safe.
//!
//! When the source's backup session was lost (its agent restarted), a new one starts and
//! keeps what did not change: whole files, prefixes of partly fetched ones, and the ranges of a
//! changed file that still equal the source's ([`super::delta`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use serde_json::json;

use pgferry_common::backup::{backup_manifest, label_timeline, ManifestFile, WalRange};
use pgferry_common::control::{BackupPlan, FileHeader, Request, Response, StreamKind};
use pgferry_common::runtime::pump::{self, LocalConn, Outcome};

use super::delta::{changed_line, patch_line, Patch};
use super::{Executor, REQUEST_TIMEOUT};
use crate::control_client::TunnelDown;

/// One line of the copy's journal (JSON lines beside the state file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Journal {
    /// The backup session the files below belong to.
    Begin { backup_id: u64 },
    /// A file about to be patched (fetched again in the ranges that differ): until its `done`
    /// line, its bytes are no verified prefix.
    Patching { path: String },
    /// A file complete and fsynced.
    Done {
        path: String,
        size: u64,
        sha256: String,
        modified: i64,
    },
}

/// Failures of one file's stream in a row, each with the tunnel up and without a byte fetched,
/// before the copy fails. An outage is no failure: it is waited out, however long.
const FILE_ATTEMPTS: u32 = 20;

/// How often the agent copy reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What one backup session of the copy has done: for its result and its progress lines.
struct Counts {
    /// Files fetched whole.
    files: std::sync::atomic::AtomicU64,
    /// Bytes received (verified) and written into the copy's files in this session, complete
    /// or not: what crossed the tunnel.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes here when the session began, and the plan's bytes.
    here: u64,
    total: u64,
    started: Instant,
}

impl Counts {
    /// A session that copies `files` into `data_dir`, `done` already complete.
    fn new(
        files: &[&pgferry_common::control::BackupEntry],
        done: &HashMap<String, ManifestFile>,
        data_dir: &Path,
    ) -> Self {
        // Bytes here already: complete files, and the verified part of partly fetched ones.
        let here = files
            .iter()
            .map(|e| match done.get(&e.path) {
                Some(m) => m.size,
                None => std::fs::metadata(data_dir.join(&e.path)).map_or(0, |m| m.len()),
            })
            .sum();
        Self {
            files: std::sync::atomic::AtomicU64::new(0),
            written: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            here,
            total: files.iter().map(|e| e.size).sum(),
            started: Instant::now(),
        }
    }

    /// (files, bytes) fetched.
    fn fetched(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.files.load(Relaxed), self.written.load(Relaxed))
    }

    /// "agent copy: 27 % (123 of 456 MB, 120 files complete, 45.1 MB/s)".
    fn line(&self, files_done: usize) -> String {
        let written = self.written.load(std::sync::atomic::Ordering::Relaxed);
        let have = (self.here + written).min(self.total);
        format!(
            "agent copy: {} % ({} of {} MB, {files_done} file(s) complete, {:.1} MB/s)",
            have * 100 / self.total.max(1),
            have / 1_000_000,
            self.total / 1_000_000,
            written as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(0.001)
        )
    }
}

/// When a file's copy gives up ([`FILE_ATTEMPTS`]).
#[derive(Debug, Default)]
struct FileRetry {
    failures: u32,
}

impl FileRetry {
    /// A try failed (`moved`: it fetched bytes first); whether to try again.
    fn go_on(&mut self, moved: bool) -> bool {
        self.failures = if moved { 1 } else { self.failures + 1 };
        self.failures < FILE_ATTEMPTS
    }
}

/// The progress line of an outage `down` long so far; `why`: what found the tunnel down.
fn waiting_line(why: &str, down: Duration) -> String {
    format!(
        "{why}; the copy waits for it (down {} s; files complete and the verified part of each file are kept)",
        down.as_secs()
    )
}

/// The progress line of an outage that ended after `down`.
fn back_line(down: Duration) -> String {
    format!(
        "the tunnel is back after {} s; the copy goes on",
        down.as_secs()
    )
}

/// How long the tunnel has been down, for progress lines: due at 10 s of outage, then every
/// minute; `up` says how long it was down if a line was due.
#[derive(Debug, Default)]
struct OutageClock {
    since: Option<Instant>,
    reported: Option<Instant>,
}

impl OutageClock {
    /// The tunnel is down at `now`: how long, if a line is due.
    fn down(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        self.down_since(since, now)
    }

    /// The tunnel has been down since `since`: how long, if a line is due.
    fn down_since(&mut self, since: Instant, now: Instant) -> Option<Duration> {
        self.since = Some(since);
        let down = now.saturating_duration_since(since);
        let due = match self.reported {
            None => down >= Duration::from_secs(10),
            Some(r) => now.saturating_duration_since(r) >= Duration::from_secs(60),
        };
        due.then(|| {
            self.reported = Some(now);
            down
        })
    }

    /// The tunnel is up: how long it was down, if that was reported.
    fn up(&mut self) -> Option<Duration> {
        let since = self.since.take();
        self.reported.take().and(since).map(|s| s.elapsed())
    }
}

impl Executor<'_> {
    /// The agent-owned copy into the data directory; returns (files, bytes) fetched now.
    pub(super) async fn agent_copy(&self, slot: &str) -> Result<(u64, u64)> {
        let data_dir = self.data_dir()?.to_path_buf();
        let journal = self.copy_journal();
        let t = Instant::now();
        let (mut files_now, mut bytes_now) = (0, 0);
        let mut sessions = 0;
        // A backup session lost on the source (its agent restarted) is replaced by a new one;
        // the files that did not change are kept.
        let (plan, done, (label, _map, end)) = loop {
            sessions += 1;
            match self.copy_session(&data_dir, &journal).await {
                Ok((plan, done, fetched, stopped)) => {
                    files_now += fetched.0;
                    bytes_now += fetched.1;
                    break (plan, done, stopped);
                }
                Err((e, fetched)) if sessions < 3 && format!("{e:#}").contains("no base copy") => {
                    files_now += fetched.0;
                    bytes_now += fetched.1;
                    (self.progress)(format!(
                        "the source's backup session was lost ({e:#}); starting a new one"
                    ));
                }
                Err((e, _)) => return Err(e),
            }
        };
        // No tablespace_map (`_map`): the tablespaces are linked here already (mapped), as
        // pg_basebackup's plain format does; the map would link them to the source's paths.
        let mut manifest: Vec<ManifestFile> = vec![write_small(&data_dir, "backup_label", &label)?];
        manifest.extend(
            plan.entries
                .iter()
                .filter_map(|e| done.get(&e.path).cloned()),
        );
        let wal = WalRange {
            timeline: label_timeline(&label).context("no START TIMELINE in the backup label")?,
            start: plan.start_lsn,
            end,
        };
        std::fs::write(
            data_dir.join("backup_manifest"),
            backup_manifest(&manifest, wal),
        )?;
        self.standby_settings(&data_dir, slot)?;
        self.own_data_dir(&data_dir).await?;
        if let (Some(user), true) = (&self.settings.os_user, super::running_as_root()) {
            for e in plan.entries.iter().filter_map(|e| e.link.as_deref()) {
                let here = self.settings.tablespace_location(Path::new(e));
                super::chown(user, &here, true).await?;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        (self.progress)(format!(
            "agent copy done: {files_now} file(s), {:.1} MB fetched in {secs:.1} s ({:.1} MB/s); backup {}..{}",
            bytes_now as f64 / 1e6,
            bytes_now as f64 / 1e6 / secs.max(0.001),
            plan.start_lsn,
            end
        ));
        (self.audit)(
            "base_copy",
            json!({
                "method": "agent", "backup_id": format!("{:016x}", plan.id),
                "start_lsn": plan.start_lsn.to_string(), "end_lsn": end.to_string(),
                "files": manifest.len(), "files_fetched_now": files_now, "bytes_fetched_now": bytes_now,
                "manifest_sha256": hex_sha256(&std::fs::read(data_dir.join("backup_manifest"))?),
            }),
        );
        let _ = std::fs::remove_file(&journal);
        Ok((files_now, bytes_now))
    }

    /// One backup session: started (or the running one), the data directory prepared, the
    /// files it lacks fetched (pg_control last), stopped. On error, also what was fetched.
    #[allow(clippy::type_complexity)]
    async fn copy_session(
        &self,
        data_dir: &Path,
        journal: &Path,
    ) -> std::result::Result<
        (
            BackupPlan,
            HashMap<String, ManifestFile>,
            (u64, u64),
            (String, String, pgferry_common::migration::Lsn),
        ),
        (anyhow::Error, (u64, u64)),
    > {
        let none = |e: anyhow::Error| (e, (0, 0));
        let label = format!("pgferry {}", self.migration);
        let plan = match self
            .ask_through_outage(Request::BackupStart { label }, REQUEST_TIMEOUT)
            .await
            .map_err(none)?
        {
            Response::BackupStarted { plan } => plan,
            other => return Err(none(anyhow::anyhow!("unexpected answer {other:?}"))),
        };
        let (done, mut patches) = self
            .prepare_copy(&plan, data_dir, journal)
            .await
            .map_err(none)?;
        let files: Vec<_> = plan.entries.iter().filter(|e| !e.dir).collect();
        let total: u64 = files.iter().map(|e| e.size).sum();
        let todo: VecDeque<(String, Option<Patch>)> = files
            .iter()
            .filter(|e| !done.contains_key(&e.path) && e.path != "global/pg_control")
            .map(|e| (e.path.clone(), patches.remove(&e.path)))
            .collect();
        (self.progress)(format!(
            "agent copy: backup {:016x} from {}: {} file(s), {} MB; {} already here; {} stream(s)",
            plan.id,
            plan.start_lsn,
            files.len(),
            total / 1_000_000,
            done.len(),
            self.settings.copy_streams
        ));
        let counted = Arc::new(Counts::new(&files, &done, data_dir));
        let done = Arc::new(Mutex::new(done));
        let fetched = async {
            self.fetch_all(
                &plan,
                data_dir,
                journal,
                todo,
                done.clone(),
                counted.clone(),
            )
            .await?;
            // pg_control last, as PostgreSQL's own base backup sends it.
            let last = VecDeque::from([("global/pg_control".to_string(), None)]);
            self.fetch_all(
                &plan,
                data_dir,
                journal,
                last,
                done.clone(),
                counted.clone(),
            )
            .await?;
            // The source answers a repeated stop of the same backup with the same result, so
            // an answer lost to an outage is asked for again.
            match self
                .ask_through_outage(Request::BackupStop { id: plan.id }, REQUEST_TIMEOUT)
                .await?
            {
                Response::BackupStopped {
                    label,
                    tablespace_map,
                    end_lsn,
                } => Ok((label, tablespace_map, end_lsn)),
                other => bail!("unexpected answer {other:?}"),
            }
        }
        .await;
        let counted = counted.fetched();
        let done = done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match fetched {
            Ok(stopped) => Ok((plan, done, counted, stopped)),
            Err(e) => Err((e, counted)),
        }
    }

    /// The copy's journal, beside the state file.
    fn copy_journal(&self) -> PathBuf {
        self.settings.state_file.with_extension("copy.jsonl")
    }

    /// Rollback: the source's backup session of an agent copy left unfinished (named in the
    /// journal) is ended, so that the source is not left in backup mode (full-page writes
    /// forced, a PostgreSQL session held) until its agent restarts. The journal stays: a later
    /// migration into the same directory keeps the files that did not change (delta).
    pub(super) async fn end_source_backup(&self) -> Result<()> {
        let journal = self.copy_journal();
        let Some(id) = read_journal(&journal).backup_id else {
            return Ok(());
        };
        (self.progress)(format!(
            "ending the base copy's backup session {id:016x} on the source"
        ));
        match self.ask(Request::BackupStop { id }).await {
            // Already stopped, or ended with its agent.
            Err(e) if !format!("{e:#}").contains("no base copy") => Err(e),
            _ => Ok(()),
        }
    }

    /// The data directory and journal for `plan`. The journal's own session: its files are
    /// kept (resume), a file it was patching is compared range by range again. Another session
    /// (the source's was lost): what did not change is kept, a changed file is patched where
    /// that pays, every other file is removed (delta, see [`super::delta`]). Returns the files
    /// already complete and the patches.
    async fn prepare_copy(
        &self,
        plan: &BackupPlan,
        data_dir: &Path,
        journal: &Path,
    ) -> Result<(HashMap<String, ManifestFile>, HashMap<String, Patch>)> {
        let read = read_journal(journal);
        let (done, patches) = if read.backup_id == Some(plan.id) {
            if !read.done.is_empty() {
                (self.progress)(format!(
                    "resuming the copy of backup {:016x}: {} file(s) already complete",
                    plan.id,
                    read.done.len()
                ));
            }
            // A file being patched is no verified prefix: compared again, or fetched whole.
            let planned: HashSet<&str> = plan.entries.iter().map(|e| e.path.as_str()).collect();
            let patching: Vec<String> = read
                .patching
                .iter()
                .filter(|p| planned.contains(p.as_str()))
                .cloned()
                .collect();
            let patches = self.patches(plan.id, data_dir, patching).await?;
            for p in read.patching.iter().filter(|p| !patches.contains_key(*p)) {
                let _ = std::fs::remove_file(data_dir.join(p));
            }
            if !read.patching.is_empty() {
                (self.progress)(format!(
                    "{} file(s) were being patched when the copy stopped: compared again{}",
                    read.patching.len(),
                    patch_line(&patches)
                ));
            }
            (read.done, patches)
        } else {
            self.keep_what_is_unchanged(plan, data_dir, journal, read)
                .await?
        };
        for e in plan.entries.iter().filter(|e| e.dir) {
            match &e.link {
                Some(location) => self.link_tablespace(data_dir, &e.path, location)?,
                None => std::fs::create_dir_all(data_dir.join(&e.path))?,
            }
        }
        std::fs::create_dir_all(data_dir.join("pg_wal/archive_status"))?;
        Ok((done, patches))
    }

    /// A tablespace of the plan (`path`: `pg_tblspc/<oid>`, at `location` on the source): its
    /// directory here (mapped by `tablespace_mapping`, else the same path) created and linked,
    /// as `pg_basebackup` does in plain format. The directory must be empty or absent, unless
    /// an earlier run of this copy linked it: never another cluster's files (on a shared host,
    /// an unmapped tablespace is the source's own).
    fn link_tablespace(&self, data_dir: &Path, path: &str, location: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let here = self.settings.tablespace_location(Path::new(location));
        let link = data_dir.join(path);
        match std::fs::read_link(&link) {
            Ok(t) if t == here => return Ok(()),
            Ok(t) => bail!(
                "{}: links to {}, but tablespace {location} now goes to {}: restore [target] tablespace_mapping, or remove {} and {} to copy from scratch",
                link.display(),
                t.display(),
                here.display(),
                data_dir.display(),
                t.display()
            ),
            Err(_) if link.symlink_metadata().is_ok() => bail!(
                "{}: not a tablespace link; remove {} to copy from scratch",
                link.display(),
                data_dir.display()
            ),
            Err(_) => {}
        }
        if std::fs::read_dir(&here).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "tablespace {path} (at {location} on the source) would go to {}, which is not empty here; empty it, or map it elsewhere: [target] tablespace_mapping = [\"{location}=/new/location\"]",
                here.display()
            );
        }
        std::fs::create_dir_all(&here).with_context(|| here.display().to_string())?;
        std::fs::set_permissions(&here, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::symlink(&here, &link).with_context(|| link.display().to_string())?;
        (self.progress)(format!(
            "tablespace {path}: {location} on the source, {} here",
            here.display()
        ));
        Ok(())
    }

    /// A new backup session (the journal's, `read`, was lost, or there was none): of the files
    /// here, those unchanged on the source are kept, changed ones are patched where that pays,
    /// the others removed; the journal begins the new session.
    async fn keep_what_is_unchanged(
        &self,
        plan: &BackupPlan,
        data_dir: &Path,
        journal: &Path,
        read: JournalRead,
    ) -> Result<(HashMap<String, ManifestFile>, HashMap<String, Patch>)> {
        let had = read.done.len();
        let (mut done, mut changed) = (HashMap::new(), Vec::new());
        if had > 0 && data_dir.exists() {
            done = self.unchanged(plan, &read.done).await?;
            changed = read
                .done
                .into_values()
                .filter(|m| !done.contains_key(&m.path))
                .map(|m| (m.path, m.size))
                .collect();
        }
        let (partial, partial_bytes, partial_changed) = match read.backup_id {
            Some(_) if data_dir.exists() => self.unchanged_prefixes(plan, data_dir, &done).await?,
            _ => (HashSet::new(), 0, Vec::new()),
        };
        // A complete file of the plan that changed is among the partial ones too (not complete,
        // not empty): kept as a prefix if the source's only grew, else compared by ranges.
        let patches = self.patches(plan.id, data_dir, partial_changed).await?;
        if let Some(prev) = read.backup_id.filter(|_| had > 0 || !partial.is_empty()) {
            (self.progress)(format!(
                "backup session {prev:016x} was lost (the source agent restarted?); in the new one, {:016x}, {} of the {had} file(s) already here are unchanged (SHA-256 on both sides) and kept, {} partly fetched file(s) whose {:.1} MB fetched are unchanged go on from their end{}; the rest is fetched again{}",
                plan.id,
                done.len(),
                partial.len(),
                partial_bytes as f64 / 1e6,
                patch_line(&patches),
                changed_line(&changed)
            ));
        }
        if data_dir.exists() {
            remove_files_except(data_dir, |p| {
                done.contains_key(p) || partial.contains(p) || patches.contains_key(p)
            })?;
        }
        write_journal(journal, plan.id, &done, patches.keys())?;
        Ok((done, patches))
    }

    /// [`Executor::ask_within`], asked again while the tunnel is down, however long (the
    /// journal and the source's backup session outlive an outage; the slot keeps the WAL).
    /// Every request of the copy can be asked twice: start and stop answer a repeat with the
    /// same result, digests are read-only.
    pub(super) async fn ask_through_outage(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response> {
        let mut outage = OutageClock::default();
        loop {
            match self.ask_within(request.clone(), timeout).await {
                Err(e) if TunnelDown::is(&e) => {
                    if let Some(down) = outage.down(Instant::now()) {
                        (self.progress)(waiting_line(&e.to_string(), down));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => {
                    if let Some(down) = outage.up() {
                        (self.progress)(back_line(down));
                    }
                    return other;
                }
            }
        }
    }

    /// Fetches `todo` over `copy_streams` parallel streams, each a task of its own (so
    /// decompression and checks use every core); a file with a [`Patch`] in its ranges first.
    async fn fetch_all(
        &self,
        plan: &BackupPlan,
        data_dir: &Path,
        journal: &Path,
        todo: VecDeque<(String, Option<Patch>)>,
        done: Arc<Mutex<HashMap<String, ManifestFile>>>,
        counted: Arc<Counts>,
    ) -> Result<()> {
        let fetcher = Arc::new(Fetcher {
            open: self.open_stream.clone(),
            pump: self.pump.clone(),
            backup_id: plan.id,
            data_dir: data_dir.to_path_buf(),
            journal: journal.to_path_buf(),
            queue: Mutex::new(todo),
            journal_lock: Mutex::new(()),
            done,
            written: counted.written.clone(),
            down_since: Mutex::new(None),
        });
        let tasks: Vec<_> = (0..self.settings.copy_streams)
            .map(|_| tokio::spawn(fetcher.clone().work()))
            .collect();
        let report = self.report(&fetcher, &counted);
        tokio::pin!(report);
        let mut first_err = None;
        for t in tasks {
            let t = tokio::select! {
                t = t => t,
                () = &mut report => unreachable!("reports until the copy ends"),
            };
            match t {
                Ok(Ok(files)) => {
                    counted
                        .files
                        .fetch_add(files, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    // The others stop at their next file.
                    fetcher
                        .queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(anyhow::anyhow!("copy task: {e}"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reports the copy's progress every [`PROGRESS_EVERY`]; while the file streams wait for
    /// the tunnel, how long it has been down instead (at 10 s, then every minute), and when it
    /// is back. Never ends.
    async fn report(&self, fetcher: &Fetcher, counts: &Counts) {
        let mut outage = OutageClock::default();
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let since = *fetcher.down_since.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if since.is_none() && now.duration_since(last) >= PROGRESS_EVERY {
                last = now;
                (self.progress)(
                    counts.line(fetcher.done.lock().unwrap_or_else(|e| e.into_inner()).len()),
                );
            }
            let line = match since {
                Some(since) => outage
                    .down_since(since, now)
                    .map(|down| waiting_line("the tunnel to the source is down", down)),
                None => outage.up().map(back_line),
            };
            if let Some(line) = line {
                (self.progress)(line);
            }
        }
    }

    /// What `pg_basebackup -R` writes: `standby.signal`, and the connection and slot of the
    /// walreceiver (through this agent's local endpoint) in `postgresql.auto.conf`.
    fn standby_settings(&self, data_dir: &Path, slot: &str) -> Result<()> {
        std::fs::write(data_dir.join("standby.signal"), "")?;
        let (host, port) = &self.local;
        let mut conninfo = format!(
            "user={} host={host} port={port} application_name={}",
            self.settings.replication_user,
            super::BASEBACKUP_APP
        );
        if let Some(p) = &self.settings.replication_password_file {
            let pw = pgferry_common::runtime::config::read_password_file(p)?;
            conninfo.push_str(&format!(
                " password='{}'",
                pw.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
        let auto = data_dir.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\n# pgferry agent copy: the standby's source\nprimary_conninfo = '{}'\nprimary_slot_name = '{slot}'\n",
            conninfo.replace('\'', "''")
        ));
        std::fs::write(&auto, text)?;
        Ok(())
    }

    /// The data directory owned by the cluster's OS user (the agent may run as root), 0700.
    async fn own_data_dir(&self, data_dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
        if let (Some(user), true) = (&self.settings.os_user, super::running_as_root()) {
            super::chown(user, data_dir, true).await?;
            // The standby's log goes beside the data directory, as with pg_basebackup.
            super::chown(user, data_dir.parent().unwrap_or(Path::new("/")), false).await?;
        }
        Ok(())
    }
}

/// The file streams of one copy: shared by its tasks.
struct Fetcher {
    open: super::OpenStream,
    pump: pump::PumpOptions,
    backup_id: u64,
    data_dir: PathBuf,
    journal: PathBuf,
    queue: Mutex<VecDeque<(String, Option<Patch>)>>,
    journal_lock: Mutex<()>,
    done: Arc<Mutex<HashMap<String, ManifestFile>>>,
    /// Bytes written into the copy's files (verified): [`Counts::written`].
    written: Arc<std::sync::atomic::AtomicU64>,
    /// Since when a stream has found the tunnel down (`None` once one opened again).
    down_since: Mutex<Option<Instant>>,
}

impl Fetcher {
    /// A stream found the tunnel down: the outage began now, unless it already had.
    fn mark_down(&self) {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
    }

    /// Takes files off the queue until it is empty; the files fetched. A file received is
    /// finished (fsync, digest, journal line) while the stream fetches the next one: at most
    /// one file of each stream waits for its fsync, and a stream does not stall on it.
    async fn work(self: Arc<Self>) -> Result<u64> {
        let mut files = 0u64;
        let mut finishing: Option<tokio::task::JoinHandle<Result<()>>> = None;
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let received = match next {
                Some((path, patch)) => match self.fetch_file(&path, patch).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        // The file being finished writes its journal line before this task
                        // ends: a new session may rewrite the journal right after.
                        if let Some(f) = finishing.take() {
                            let _ = f.await;
                        }
                        return Err(e);
                    }
                },
                None => None,
            };
            if let Some(f) = finishing.take() {
                f.await.context("finishing a file")??;
                files += 1;
            }
            match received {
                Some(r) => finishing = Some(tokio::spawn(self.clone().finish(r))),
                None => return Ok(files),
            }
        }
    }

    /// A file received whole: fsynced and SHA-256'd, then its journal line. The file is
    /// fsynced before its line is written, so a line on disk always names a durable file. The
    /// line itself is not fsynced: one lost with the host costs a fetch of that file again
    /// (from its end), not a wrong copy; and a fsync per file, taken under the journal's lock,
    /// serialized the streams.
    async fn finish(self: Arc<Self>, r: Received) -> Result<()> {
        let full = self.data_dir.join(&r.path);
        let hash = r
            .hash
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let (size, sha256) = tokio::task::spawn_blocking(move || match hash {
            Some(h) => {
                let f = std::fs::File::open(&full)?;
                f.sync_all()?;
                let mut sum = [0; 32];
                sum.copy_from_slice(h.finish().as_ref());
                Ok::<_, anyhow::Error>((f.metadata()?.len(), sum))
            }
            None => sha256_file(&full),
        })
        .await??;
        let m = ManifestFile {
            path: r.path,
            size,
            modified: time::OffsetDateTime::now_utc().unix_timestamp(),
            sha256,
        };
        let line = serde_json::to_string(&journal_line(&m))?;
        {
            let _g = self.journal_lock.lock().unwrap_or_else(|e| e.into_inner());
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.journal)?;
            writeln!(f, "{line}")?;
        }
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(m.path.clone(), m);
        Ok(())
    }

    /// One file: the ranges of its patch first, if it has one (cut to the source's size
    /// before), then from its current length on (a verified prefix, once the ranges are in),
    /// each stream retried across lost connections.
    async fn fetch_file(&self, path: &str, patch: Option<Patch>) -> Result<Received> {
        let full = self.data_dir.join(path);
        if let Some(patch) = patch {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .with_context(|| full.display().to_string())?;
            if f.metadata()?.len() > patch.len {
                f.set_len(patch.len)?;
            }
            for (start, end) in patch.ranges {
                self.fetch_range(path, start, Some(end), None).await?;
            }
        }
        // A file fetched from its start in this run is SHA-256'd as it is written (every try,
        // whatever its length, continues the same hash); one begun by an earlier run, or
        // patched, is read back at the end.
        let fresh = std::fs::metadata(&full).map_or(true, |m| m.len() == 0);
        let hash = fresh.then(|| {
            Arc::new(Mutex::new(ring::digest::Context::new(
                &ring::digest::SHA256,
            )))
        });
        self.fetch_range(path, 0, None, hash.clone()).await?;
        Ok(Received {
            path: path.to_string(),
            hash,
        })
    }

    /// Bytes `start..end` of `path` written in place; with `end` `None`, from the file's
    /// length here (`start` unused) to the source's end, appended. A lost stream is tried again
    /// from where it stopped; an outage is waited out, however long.
    async fn fetch_range(
        &self,
        path: &str,
        start: u64,
        end: Option<u64>,
        hash: Option<Arc<Mutex<ring::digest::Context>>>,
    ) -> Result<()> {
        use std::io::Seek;
        let full = self.data_dir.join(path);
        let mut retry = FileRetry::default();
        let mut at = start;
        loop {
            let open = std::fs::OpenOptions::new()
                .create(end.is_none())
                .append(end.is_none())
                .write(true)
                .open(&full)
                .with_context(|| full.display().to_string());
            let (offset, file) = match end {
                None => {
                    let f = open?;
                    (f.metadata()?.len(), f)
                }
                Some(e) if at >= e => return Ok(()),
                Some(_) => {
                    let mut f = open?;
                    f.seek(std::io::SeekFrom::Start(at))?;
                    (at, f)
                }
            };
            let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let outcome = match (self.open)().await {
                Ok((mut send, recv)) => {
                    *self.down_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    let mut out = BytesMut::new();
                    out.extend_from_slice(&[StreamKind::File as u8]);
                    FileHeader {
                        backup_id: self.backup_id,
                        offset,
                        end: end.unwrap_or(FileHeader::TO_THE_END),
                        path: path.to_string(),
                    }
                    .encode(&mut out);
                    match send.write_all(&out).await {
                        Ok(()) => {
                            let local = LocalConn {
                                reader: Box::new(tokio::io::empty()),
                                writer: Box::new(FileWriter {
                                    file,
                                    hash: hash.clone(),
                                    written: self.written.clone(),
                                    moved: moved.clone(),
                                }),
                                abort_handle: None,
                            };
                            pump::pump(local, send, recv, BytesMut::new(), &self.pump)
                                .await
                                .outcome
                        }
                        Err(e) => Outcome::ConnectionLost(format!("opening: {e}")),
                    }
                }
                Err(e) if TunnelDown::is(&e) => {
                    // Waited out, however long: not an attempt.
                    self.mark_down();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => Outcome::ConnectionLost(format!("{e:#}")),
            };
            match outcome {
                Outcome::Ok => return Ok(()),
                Outcome::ConnectionLost(m) | Outcome::TunnelError(m) => {
                    let n = moved.load(std::sync::atomic::Ordering::Relaxed);
                    at += n;
                    if !retry.go_on(n > 0) {
                        bail!("copying {path}: {m} ({FILE_ATTEMPTS} times in a row without a byte fetched)");
                    }
                    tracing::warn!("copy of {path}: {m}; again from where it stopped");
                    // The tunnel is likely down: the streams' wait for it starts now.
                    self.mark_down();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => bail!("copying {path}: {} {}", other.label(), other.detail()),
            }
        }
    }
}

/// A file whose bytes all arrived (not yet fsynced), and its SHA-256 so far if it was
/// fetched from its start in this run.
struct Received {
    path: String,
    hash: Option<Arc<Mutex<ring::digest::Context>>>,
}

/// A file of the copy being written. Each write reaches the file (the page cache) before it
/// is reported done, so the file's length is exactly what was delivered when a stream fails
/// and the next try starts from there; with `hash`, the bytes are SHA-256'd as written. (A
/// local write of at most one chunk, done in place on the runtime's thread.)
struct FileWriter {
    file: std::fs::File,
    hash: Option<Arc<Mutex<ring::digest::Context>>>,
    /// Bytes written by every stream of the copy, and by this one.
    written: Arc<std::sync::atomic::AtomicU64>,
    moved: Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncWrite for FileWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        let r = self.file.write(buf);
        if let Ok(n) = &r {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
            self.moved
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(h) = &self.hash {
                h.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(&buf[..*n]);
            }
        }
        std::task::Poll::Ready(r)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn journal_line(m: &ManifestFile) -> Journal {
    Journal::Done {
        path: m.path.clone(),
        size: m.size,
        sha256: hex::encode(m.sha256),
        modified: m.modified,
    }
}

/// What a journal says: its last backup session, the files it completed, and the files it
/// was patching and did not complete.
#[derive(Debug, Default)]
struct JournalRead {
    backup_id: Option<u64>,
    done: HashMap<String, ManifestFile>,
    patching: HashSet<String>,
}

/// Reads the journal (a line cut by a kill is ignored: that file is fetched again).
fn read_journal(journal: &Path) -> JournalRead {
    let mut read = JournalRead::default();
    let Ok(text) = std::fs::read_to_string(journal) else {
        return read;
    };
    for line in text.lines() {
        match serde_json::from_str::<Journal>(line) {
            Ok(Journal::Begin { backup_id }) => {
                read = JournalRead {
                    backup_id: Some(backup_id),
                    ..JournalRead::default()
                };
            }
            Ok(Journal::Patching { path }) => {
                read.done.remove(&path);
                read.patching.insert(path);
            }
            Ok(Journal::Done {
                path,
                size,
                sha256,
                modified,
            }) => {
                let mut sum = [0; 32];
                if hex::decode_to_slice(&sha256, &mut sum).is_ok() {
                    read.patching.remove(&path);
                    read.done.insert(
                        path.clone(),
                        ManifestFile {
                            path,
                            size,
                            modified,
                            sha256: sum,
                        },
                    );
                }
            }
            Err(_) => {}
        }
    }
    read
}

/// Begins the journal of backup session `id` with the files already complete and those about
/// to be patched. Written whole (a temporary file renamed over it) and fsynced before any file
/// is patched: a patched file must never pass for a verified prefix.
fn write_journal<'a>(
    journal: &Path,
    id: u64,
    done: &HashMap<String, ManifestFile>,
    patching: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let mut text = format!(
        "{}\n",
        serde_json::to_string(&Journal::Begin { backup_id: id })?
    );
    for m in done.values() {
        text.push_str(&serde_json::to_string(&journal_line(m))?);
        text.push('\n');
    }
    for path in patching {
        text.push_str(&serde_json::to_string(&Journal::Patching {
            path: path.clone(),
        })?);
        text.push('\n');
    }
    let tmp = journal.with_extension("jsonl.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, journal).with_context(|| journal.display().to_string())?;
    if let Some(dir) = journal.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

/// Removes every regular file under `dir` that `keep` does not name (partial files, files of
/// an earlier session that changed or left the plan).
fn remove_files_except(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let ft = entry.file_type()?;
            // A tablespace's link is walked through (its files are the copy's), and kept.
            let linked_dir =
                ft.is_symlink() && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir());
            if ft.is_dir() || linked_dir {
                stack.push(path);
            } else if !keep(path.to_string_lossy().as_ref()) {
                std::fs::remove_file(dir.join(&path))?;
            }
        }
    }
    Ok(())
}

/// Writes a small file of the copy (backup_label) and its manifest entry.
fn write_small(data_dir: &Path, name: &str, text: &str) -> Result<ManifestFile> {
    std::fs::write(data_dir.join(name), text)?;
    let mut sha256 = [0; 32];
    sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
    Ok(ManifestFile {
        path: name.to_string(),
        size: text.len() as u64,
        modified: time::OffsetDateTime::now_utc().unix_timestamp(),
        sha256,
    })
}

/// fsync, then size and SHA-256 of a file.
pub(super) fn sha256_file(p: &Path) -> Result<(u64, [u8; 32])> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .and_then(|()| pgferry_common::runtime::digest::sha256_file(p))
        .with_context(|| p.display().to_string())
}

fn hex_sha256(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_being_patched_is_not_complete_until_its_done_line() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("state.copy.jsonl");
        let m = |path: &str| ManifestFile {
            path: path.into(),
            size: 8192,
            modified: 1,
            sha256: [7; 32],
        };
        let done: HashMap<String, ManifestFile> = [
            ("base/5/1".to_string(), m("base/5/1")),
            ("base/5/2".to_string(), m("base/5/2")),
        ]
        .into();
        let patching = ["base/5/3".to_string(), "base/5/2".to_string()];
        write_journal(&journal, 9, &done, patching.iter()).unwrap();
        let read = read_journal(&journal);
        assert_eq!(read.backup_id, Some(9));
        let mut kept: Vec<&String> = read.done.keys().collect();
        kept.sort();
        assert_eq!(
            kept,
            ["base/5/1"],
            "a file named for patching is no longer complete"
        );
        assert_eq!(read.patching, HashSet::from(patching.clone()));
        assert!(!dir.path().join("state.copy.jsonl.tmp").exists());
        // Its done line (and a line cut by a kill after it) ends the patch.
        let mut text = std::fs::read_to_string(&journal).unwrap();
        text.push_str(&serde_json::to_string(&journal_line(&m("base/5/3"))).unwrap());
        text.push_str("\n{\"kind\":\"done\",\"pa");
        std::fs::write(&journal, text).unwrap();
        let read = read_journal(&journal);
        assert!(read.done.contains_key("base/5/3"));
        assert_eq!(read.patching, HashSet::from(["base/5/2".to_string()]));
        // A new session forgets both.
        write_journal(&journal, 10, &HashMap::new(), std::iter::empty()).unwrap();
        let read = read_journal(&journal);
        assert_eq!(
            (read.backup_id, read.done.len(), read.patching.len()),
            (Some(10), 0, 0)
        );
    }

    #[test]
    fn a_file_gives_up_only_after_failures_in_a_row_that_fetched_nothing() {
        let mut r = FileRetry::default();
        for _ in 1..FILE_ATTEMPTS {
            assert!(r.go_on(false));
        }
        assert!(!r.go_on(false), "the last failure without a byte ends it");
        // A flapping link that lets some bytes through each time never ends it.
        let mut r = FileRetry::default();
        for i in 0..10 * FILE_ATTEMPTS {
            assert!(r.go_on(i % 3 == 0), "failure {i}");
        }
    }

    #[test]
    fn an_outage_is_reported_at_ten_seconds_then_every_minute_and_when_it_ends() {
        let mut c = OutageClock::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(c.down(at(0)), None);
        assert_eq!(c.down(at(9)), None);
        assert_eq!(c.down(at(10)), Some(Duration::from_secs(10)));
        assert_eq!(c.down(at(11)), None);
        assert_eq!(c.down(at(69)), None);
        assert_eq!(c.down(at(70)), Some(Duration::from_secs(70)));
        // Three hours: still waiting, still reported.
        assert_eq!(c.down(at(3 * 3600)), Some(Duration::from_secs(3 * 3600)));
        assert!(c.up().is_some());
        // A blip shorter than 10 s is not reported at all, neither its end.
        let mut c = OutageClock::default();
        assert_eq!(c.down(at(0)), None);
        assert_eq!(c.down(at(5)), None);
        assert_eq!(c.up(), None);
    }
}
