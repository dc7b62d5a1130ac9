//! The source's side of an agent-owned base copy: the data directory as it is on disk, for
//! [`pgferry_common::backup::plan`] to decide what is copied.

use std::path::Path;

use anyhow::{bail, Context, Result};

use pgferry_common::backup::Found;

/// Every directory and regular file under `data_dir`, with paths relative to it. A symlinked
/// `pg_wal` counts as a directory (its contents are never copied). A tablespace (a symlink
/// `pg_tblspc/<oid>`) counts as a directory too, walked through: only its directory of this
/// major version (`PG_15_…`), as PostgreSQL's base backup sends it. Any other symlink is
/// refused. Files that vanish while walking (a dropped relation) are skipped.
pub fn walk(data_dir: &Path) -> Result<Vec<Found>> {
    Ok(walk_with_tablespaces(data_dir)?.0)
}

/// [`walk`], and the location of each tablespace (`pg_tblspc/<oid>` → where its symlink
/// points).
pub fn walk_with_tablespaces(
    data_dir: &Path,
) -> Result<(Vec<Found>, std::collections::BTreeMap<String, String>)> {
    let version = std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .with_context(|| format!("reading {}", data_dir.join("PG_VERSION").display()))?;
    let version_dir = format!("PG_{}_", version.trim());
    let mut links = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            data_dir.to_path_buf()
        } else {
            data_dir.join(&rel)
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                bail!(
                    "{}: a file name that is not UTF-8 (rename it or copy with pg_basebackup)",
                    entry.path().display()
                );
            };
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("{}", entry.path().display())),
            };
            // Inside a tablespace, only this major version's directory.
            if rel.starts_with("pg_tblspc/")
                && !rel.contains("/PG_")
                && !name_in(&path).starts_with(&version_dir)
            {
                continue;
            }
            if meta.file_type().is_symlink() {
                if path == "pg_wal" {
                    out.push(Found {
                        path,
                        is_dir: true,
                        size: 0,
                    });
                    continue;
                }
                if let Some(location) = tablespace_link(&path, &entry.path())? {
                    links.insert(path.clone(), location);
                    stack.push(path.clone());
                    out.push(Found {
                        path,
                        is_dir: true,
                        size: 0,
                    });
                    continue;
                }
                bail!(
                    "{}: a symlink that is not a tablespace (pg_tblspc/<oid>) nor pg_wal; the agent copy does not follow it: move what it points to into the data directory, or copy with copy_method = \"pg_basebackup\" in [target]",
                    entry.path().display(),
                );
            }
            if meta.is_dir() {
                stack.push(path.clone());
                out.push(Found {
                    path,
                    is_dir: true,
                    size: 0,
                });
            } else if meta.is_file() {
                out.push(Found {
                    path,
                    is_dir: false,
                    size: meta.len(),
                });
            }
        }
    }
    out.sort();
    Ok((out, links))
}

/// The last component of a `/`-separated path.
fn name_in(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Where the symlink `path` (`full` on disk) points, if it is a tablespace's
/// (`pg_tblspc/<oid>`, pointing to an absolute directory).
fn tablespace_link(path: &str, full: &Path) -> Result<Option<String>> {
    let Some(oid) = path.strip_prefix("pg_tblspc/") else {
        return Ok(None);
    };
    if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let target = std::fs::read_link(full).with_context(|| full.display().to_string())?;
    let Some(location) = target.to_str().filter(|t| t.starts_with('/')) else {
        bail!(
            "{}: a tablespace whose location {} is not an absolute UTF-8 path",
            full.display(),
            target.display()
        );
    };
    if !std::fs::metadata(full).is_ok_and(|m| m.is_dir()) {
        bail!(
            "{}: the tablespace's location {location} is not a directory",
            full.display()
        );
    }
    Ok(Some(location.to_string()))
}

/// The base copy this agent runs: its own PostgreSQL session (`pg_backup_start` is tied to
/// it), the data directory, and the files the target may fetch (no other path is served).
pub struct ActiveBackup {
    pub id: u64,
    pub label: String,
    data_dir: std::path::PathBuf,
    files: std::collections::HashSet<String>,
    state: BackupState,
    plan: pgferry_common::control::BackupPlan,
    /// What its file streams sent, for the audit record at the stop.
    served: Served,
}

/// Where a backup session is.
enum BackupState {
    /// Started on its PostgreSQL session; its files are served.
    Running(tokio_postgres::Client),
    /// Stopped, its session closed: what `pg_backup_stop` returned, for a repeated stop (its
    /// answer was lost to an outage); no file is served any more.
    Stopped(Stopped),
}

/// What the file streams of one backup session sent.
#[derive(Debug, Default)]
struct Served {
    complete: std::collections::HashSet<String>,
    streams: u64,
    refused: u64,
    raw_bytes: u64,
    wire_bytes: u64,
    chunks: u64,
}

/// Counts a file stream (`h`) that ended (`report`), or was refused (`None`). A file is served
/// to its end by a stream that ran to it (not by a range).
pub async fn count_stream(
    shared: &SharedBackup,
    h: &pgferry_common::control::FileHeader,
    report: Option<&pgferry_common::runtime::pump::StreamReport>,
) {
    let (id, path) = (h.backup_id, h.path.as_str());
    let mut guard = shared.lock().await;
    let Some(b) = guard.as_mut().filter(|b| b.id == id) else {
        return;
    };
    let s = &mut b.served;
    match report {
        None => s.refused += 1,
        Some(r) => {
            s.streams += 1;
            s.raw_bytes += r.sent.raw_bytes;
            s.wire_bytes += r.sent.wire_bytes;
            s.chunks += r.sent.chunks;
            if r.outcome == pgferry_common::runtime::pump::Outcome::Ok
                && h.end == pgferry_common::control::FileHeader::TO_THE_END
            {
                s.complete.insert(path.to_string());
            }
        }
    }
}

/// What `pg_backup_stop` returns: label file, tablespace map, end LSN.
pub type Stopped = (String, String, pgferry_common::migration::Lsn);

/// The backup `id` if it is running (started, not stopped).
fn running(b: &Option<ActiveBackup>, id: u64) -> Result<&ActiveBackup> {
    match b
        .as_ref()
        .filter(|b| b.id == id && matches!(b.state, BackupState::Running(_)))
    {
        Some(b) => Ok(b),
        None => bail!("no base copy {id:016x} is running on the source"),
    }
}

/// Shared by the control stream (start, stop) and the file streams, across connections.
pub type SharedBackup = std::sync::Arc<tokio::sync::Mutex<Option<ActiveBackup>>>;

/// `pg_backup_start` on a session of its own (`session`), the data directory walked and planned
/// by PostgreSQL's rules. A backup with the same label already running (the target resumes
/// after a restart or an outage) is answered with its plan.
pub async fn start(
    shared: &SharedBackup,
    main: &tokio_postgres::Client,
    session: impl std::future::Future<Output = Result<tokio_postgres::Client>>,
    label: &str,
) -> Result<pgferry_common::control::BackupPlan> {
    use pgferry_common::backup::{plan, Disposition};
    use pgferry_common::control::{BackupEntry, BackupPlan};
    let mut guard = shared.lock().await;
    if let Some(b) = guard.as_ref() {
        if b.label == label && matches!(&b.state, BackupState::Running(s) if !s.is_closed()) {
            return Ok(b.plan.clone());
        }
    }
    let data_dir: String = main
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .context("reading data_directory (the source agent's role needs pg_read_all_settings or superuser)")?
        .get(0);
    let session = session.await.context("a session for pg_backup_start")?;
    let start: String = session
        .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
        .await
        .context("pg_backup_start")?
        .get(0);
    let data_dir = std::path::PathBuf::from(data_dir);
    let (walked, links) = {
        let d = data_dir.clone();
        tokio::task::spawn_blocking(move || walk_with_tablespaces(&d)).await??
    };
    let planned = plan(&walked);
    let entries: Vec<BackupEntry> = planned
        .iter()
        .map(|(f, d)| BackupEntry {
            path: f.path.clone(),
            dir: f.is_dir || *d == Disposition::CreateEmpty,
            size: f.size,
            link: links.get(&f.path).cloned(),
        })
        .collect();
    let plan = BackupPlan {
        id: random_id(),
        start_lsn: start
            .parse()
            .with_context(|| format!("pg_backup_start returned {start:?}"))?,
        entries,
    };
    let files = plan
        .entries
        .iter()
        .filter(|e| !e.dir)
        .map(|e| e.path.clone())
        .collect();
    *guard = Some(ActiveBackup {
        id: plan.id,
        label: label.to_string(),
        data_dir,
        files,
        state: BackupState::Running(session),
        plan: plan.clone(),
        served: Served::default(),
    });
    Ok(plan)
}

/// `pg_backup_stop` of backup `id`: (label file, tablespace map, end LSN), and, the first
/// time, the audit record of what the copy sent. Asked again for the same backup, the same
/// answer (and no record).
pub async fn stop(
    shared: &SharedBackup,
    id: u64,
) -> Result<(
    Stopped,
    Option<pgferry_common::audit::event::BaseCopyServed>,
)> {
    let mut guard = shared.lock().await;
    let Some(b) = guard.as_mut().filter(|b| b.id == id) else {
        bail!("no base copy {id:016x} is running on the source (the source agent restarted?); start the copy again");
    };
    let session = match &b.state {
        BackupState::Stopped(stopped) => return Ok((stopped.clone(), None)),
        BackupState::Running(session) => session,
    };
    let row = session
        .query_one(
            "SELECT labelfile, spcmapfile, lsn::text FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .context("pg_backup_stop")?;
    let end: String = row.get(2);
    let out = (
        row.get(0),
        row.get(1),
        end.parse()
            .with_context(|| format!("pg_backup_stop returned {end:?}"))?,
    );
    // Its PostgreSQL session is closed (dropped): nothing is left of the backup on the source.
    b.state = BackupState::Stopped(out.clone());
    let s = &b.served;
    let record = pgferry_common::audit::event::BaseCopyServed {
        backup_id: format!("{id:016x}"),
        start_lsn: b.plan.start_lsn.to_string(),
        end_lsn: out.2.to_string(),
        files_planned: b.files.len() as u64,
        files_served: s.complete.len() as u64,
        streams: s.streams,
        refused: s.refused,
        raw_bytes: s.raw_bytes,
        wire_bytes: s.wire_bytes,
        chunks: s.chunks,
    };
    Ok((out, Some(record)))
}

/// The range a file stream asks for (`h`: a file of the backup's plan, from its offset to its
/// end or the file's end), as a local connection whose reader is the file (the writer
/// discards: the target sends nothing).
pub async fn open_file(
    shared: &SharedBackup,
    h: &pgferry_common::control::FileHeader,
) -> Result<pgferry_common::runtime::pump::LocalConn> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (id, path, offset) = (h.backup_id, h.path.as_str(), h.offset);
    let full = planned_file(shared, id, path).await?;
    let mut f = match tokio::fs::File::open(&full).await {
        Ok(f) => f,
        // Dropped since it was listed: an empty file (WAL replay removes it).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(pgferry_common::runtime::pump::LocalConn {
                reader: Box::new(tokio::io::empty()),
                writer: Box::new(tokio::io::sink()),
                abort_handle: None,
            })
        }
        Err(e) => return Err(e).with_context(|| full.display().to_string()),
    };
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    Ok(pgferry_common::runtime::pump::LocalConn {
        reader: Box::new(f.take(h.end - offset)),
        writer: Box::new(tokio::io::sink()),
        abort_handle: None,
    })
}

impl std::fmt::Debug for ActiveBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveBackup")
            .field("id", &self.id)
            .field("label", &self.label)
            .field("files", &self.files.len())
            .finish()
    }
}

/// SHA-256 of files of backup `id` as they are now (only files of its plan).
pub async fn digests(
    shared: &SharedBackup,
    id: u64,
    paths: &[String],
    lengths: &[u64],
) -> Result<Vec<pgferry_common::control::FileDigest>> {
    let (data_dir, paths) = {
        let guard = shared.lock().await;
        let b = running(&guard, id)?;
        if let Some(p) = paths.iter().find(|p| !b.files.contains(*p)) {
            bail!("{p:?} is not a file of base copy {id:016x}");
        }
        (b.data_dir.clone(), paths.to_vec())
    };
    let lengths = lengths.to_vec();
    tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| {
                let limit = lengths.get(i).copied().unwrap_or(u64::MAX);
                let (size, sha256) =
                    pgferry_common::runtime::digest::sha256_prefix(&data_dir.join(&path), limit)
                        .map_or((0, String::new()), |(n, s)| {
                            (n, s.iter().map(|b| format!("{b:02x}")).collect())
                        });
                pgferry_common::control::FileDigest { path, size, sha256 }
            })
            .collect()
    })
    .await
    .context("digest task")
}

/// Where file `path` of the running backup `id` is: only a file of its plan.
async fn planned_file(shared: &SharedBackup, id: u64, path: &str) -> Result<std::path::PathBuf> {
    let guard = shared.lock().await;
    let b = running(&guard, id)?;
    if !b.files.contains(path) {
        bail!("{path:?} is not a file of base copy {id:016x}");
    }
    Ok(b.data_dir.join(path))
}

/// The size of file `path` of backup `id` now, its range size
/// ([`file_range_size`](pgferry_common::control::file_range_size)) and the BLAKE3 (hex) of
/// each range; a file gone has size 0 and no ranges.
pub async fn range_digests(
    shared: &SharedBackup,
    id: u64,
    path: &str,
) -> Result<(u64, u64, Vec<String>)> {
    let full = planned_file(shared, id, path).await?;
    tokio::task::spawn_blocking(move || {
        match pgferry_common::runtime::digest::file_range_digests(&full) {
            Ok((size, range, sums)) => Ok((
                size,
                range,
                sums.iter().map(|h| h.to_hex().to_string()).collect(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 0, Vec::new())),
            Err(e) => Err(e).with_context(|| full.display().to_string()),
        }
    })
    .await
    .context("digest task")?
}

fn random_id() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_be_bytes(b)
}
