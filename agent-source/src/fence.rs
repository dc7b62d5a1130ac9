//! The fence on the source (DESIGN §8, `docs/fence.md`): once [`fence`] returns, no client but
//! pgferry's own session can commit on the source, whatever it asks for, until [`unfence`].
//!
//! ```text
//!   fence    refuse while a subscription is enabled (its apply worker needs no connection)
//!            save pg_hba.conf.pgferry-orig and postgresql.auto.conf.pgferry-orig
//!                                        (write, fsync, rename, fsync dir; once per fence)
//!            write the fenced pg_hba.conf (pgferry_common::fence::fenced_hba), check pg_hba_file_rules
//!            ALTER SYSTEM SET default_transaction_read_only = on        (defence in depth)
//!            pg_reload_conf(); wait until this session has reloaded: the postmaster has, and
//!                                        everything it forks from now on gets the fenced rules
//!            end every other session (pg_terminate_backend) and every connection still
//!            authenticating under the old rules (SIGTERM: it is not in pg_stat_activity yet);
//!            wait until all of them have exited
//!            write the fence marker: its LSN is the fence LSN
//!   unfence  rename the copies back (the original bytes), reload, wait
//! ```
//!
//! Everything the fence changes is on disk next to what it changed, so an unfence after a crash
//! of either agent — or a restart of the source agent, which then reconnects from
//! [`CONTROL_ADDR`] — finds it. Nothing goes through the catalogs: they would be replicated to
//! the new cluster.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;
use tracing::{info, warn};

use pgferry_common::control::{FenceMode, FenceReport};
use pgferry_common::fence::{
    connection_in_startup, fenced_hba, hba_before_fence, hba_restore, is_fenced,
    settings_before_fence, settings_restore, BeforeFence, ControlRule, CopyError, FencedHba,
    PasswordMethod, Restore, CONTROL_ADDR, ORIGINAL_SUFFIX,
};
use pgferry_common::migration::Lsn;
use pgferry_common::preflight::{
    FenceFacts, LongTransaction, PreparedTransaction, SlotFact, WalSenderFact,
    LONG_TRANSACTION_SECS,
};

/// Longest wait for the sessions the fence ended to be gone.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a reload to take effect.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Fences the source: from the moment this returns, no client but this session can commit.
///
/// The mechanism is `pg_hba.conf` (see `docs/fence.md` for the alternatives and why not):
///
/// - The file is replaced by one that admits only pgferry's connections — the source agent's
///   control connection from [`CONTROL_ADDR`], a loopback address only pgferry uses, with the
///   role's password, and the original's physical-replication records (the standby's
///   walreceiver, which may reconnect during the fence and cannot run SQL) — and rejects
///   everything else: any role including superusers, TCP and the unix socket, logical
///   replication connections (`replication=database` can run SQL). A client gets PostgreSQL's
///   own `FATAL: pg_hba.conf rejects connection for host …` at once. `pg_hba.conf` is not in
///   the catalogs, so nothing of this reaches the new cluster.
/// - `default_transaction_read_only = on` (ALTER SYSTEM) stays as a second wall.
/// - After the reload has taken effect, every other client session, logical walsender and
///   parallel or subscription worker is ended, and so is every connection the postmaster
///   forked before the reload that is still authenticating: such a backend carries the old
///   rules, is not yet in `pg_stat_activity`, and would become a session afterwards (measured:
///   one that sent its password after the reload committed a row). The fence waits until all
///   of them have exited, because a backend ended in the middle of its commit still writes
///   the commit record; only then does it write the marker whose LSN it returns.
///
/// Before changing anything it saves the originals beside them (`…pgferry-orig`, atomically);
/// [`unfence`] renames them back, byte for byte. Repeating a fence (after an interruption)
/// keeps the first copies. It refuses while a subscription is enabled: its apply worker
/// commits without a client connection. Needs a superuser and an agent on the cluster's host
/// running as its OS user or root (it writes the files and signals backends).
pub async fn fence(client: &Client, mode: FenceMode) -> Result<(Lsn, FenceReport)> {
    match mode {
        // `stop` fences the same way: the shutdown comes after promotion (`StopCluster`).
        FenceMode::ReadOnly | FenceMode::Stop => {}
    }
    require_superuser(client).await?;
    refuse_enabled_subscriptions(client).await?;
    let files = FenceFiles::locate(client).await?;
    let (control, no_control) = control_rule(client).await?;
    if let Some(why) = &no_control {
        warn!("fence: no control rule ({why}); a restarted source agent could not reconnect to unfence");
    }

    // 1. The originals, before anything changes: from here on an unfence finds them.
    let (original, hba_meta) = save_originals(&files)?;

    // 2. The fenced pg_hba.conf.
    let fenced = write_fenced_hba(client, &files, &original, &hba_meta, control.as_ref()).await?;

    // 3. Read-only too, for anything that is already inside the server.
    client
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .context("ALTER SYSTEM SET default_transaction_read_only")?;

    // 4. In force: reloaded, then everyone else ended.
    reload_and_wait(client).await?;
    let postmaster = postmaster(client).await?;
    let (sessions_ended, connecting_ended) = end_other_sessions(client, &postmaster).await?;
    // A subscription enabled by a session that is gone now would have its worker started.
    refuse_enabled_subscriptions(client).await?;

    // 5. A record written after the fence marks its end: the standby's replay LSN reaches
    // exactly this value once everything before it is replayed. (The insert position itself
    // can sit past a page header that no record ends at, so a standby would only reach it
    // after the next unrelated WAL record, seconds later.) Committed with synchronous_commit
    // `local`: flushed (and streamed) at once rather than at the WAL writer's next round, and
    // never waiting for a synchronous standby that may be gone.
    let lsn = wal_marker(client, "fence").await?;
    let report = FenceReport {
        hba_file: files.hba.display().to_string(),
        replication_records: fenced.replication_records as u32,
        control_rule: control.is_some(),
        sessions_ended,
        connecting_ended,
    };
    info!(
        "fenced at {lsn}: {} admits only pgferry; {sessions_ended} session(s) and {connecting_ended} connection(s) still authenticating ended",
        report.hba_file
    );
    Ok((lsn, report))
}

/// Refuses to fence as anything but a superuser: the fence ends every other session,
/// superusers' too, and uses `ALTER SYSTEM`.
async fn require_superuser(client: &Client) -> Result<()> {
    let su: Option<bool> = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    if su != Some(true) {
        bail!("the fence needs a superuser (it ends every other session, superusers' too, and uses ALTER SYSTEM): connect the source agent as one");
    }
    Ok(())
}

/// Fence step 1: saves `pg_hba.conf` and `postgresql.auto.conf` beside themselves (unless an
/// earlier, interrupted fence already did), before anything changes, so that an unfence finds
/// them from here on. Returns the original `pg_hba.conf` — the file the fenced one is made
/// from, also when a fence is repeated — and the current file's owner and mode.
fn save_originals(files: &FenceFiles) -> Result<(Vec<u8>, std::fs::Metadata)> {
    let hba_now = read(&files.hba)?;
    let hba_meta = metadata(&files.hba)?;
    let hba_copy = read_opt(&files.hba_copy)?;
    let auto_now = read(&files.auto)?;
    let auto_meta = metadata(&files.auto)?;
    let auto_copy = read_opt(&files.auto_copy)?;
    let already = is_fenced(&hba_now);
    let hba_step = hba_before_fence(&hba_now, hba_copy.as_deref())
        .map_err(|e| copy_error(e, &files.hba, &files.hba_copy))?;
    let auto_step = settings_before_fence(&auto_now, auto_copy.as_deref(), already)
        .map_err(|e| copy_error(e, &files.auto, &files.auto_copy))?;
    // The fenced file is always made from the original, also when a fence is repeated.
    let original = match (already, &hba_copy) {
        (true, Some(c)) => c.clone(),
        _ => hba_now.clone(),
    };
    if hba_step == BeforeFence::Save {
        write_atomically(&files.hba_copy, &hba_now, &hba_meta)?;
    }
    if auto_step == BeforeFence::Save {
        write_atomically(&files.auto_copy, &auto_now, &auto_meta)?;
    }
    Ok((original, hba_meta))
}

/// Fence step 2: writes the fenced `pg_hba.conf` (made from `original`, with a note saying
/// where the original is) and checks that PostgreSQL can parse it: a postmaster that cannot
/// keeps its old rules and only says so in its log. Not reloaded yet.
async fn write_fenced_hba(
    client: &Client,
    files: &FenceFiles,
    original: &[u8],
    hba_meta: &std::fs::Metadata,
    control: Option<&ControlRule>,
) -> Result<FencedHba> {
    let copy = files.hba_copy.display();
    let hba = files.hba.display();
    let note = [
        format!(
            "Written by pgferry-source {} at {}.",
            pgferry_common::AGENT_VERSION,
            now_text()
        ),
        format!("The original is {copy}; pgferry-target rollback puts it back byte for byte."),
        format!("By hand: mv {copy} {hba}, then SELECT pg_reload_conf() (docs/fence.md)."),
    ];
    let fenced = fenced_hba(original, control, &note);
    write_atomically(&files.hba, &fenced.text, hba_meta)?;
    let errors: Vec<String> = client
        .query(
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL",
            &[],
        )
        .await
        .context("checking the fenced pg_hba.conf (pg_hba_file_rules)")?
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect();
    if !errors.is_empty() {
        bail!(
            "PostgreSQL cannot parse the fenced {hba} (line {}); not reloaded — the rollback puts the original back",
            errors.join("; line ")
        );
    }
    Ok(fenced)
}

/// Undoes [`fence`]: renames the saved originals back over `postgresql.auto.conf` and
/// `pg_hba.conf` (the same bytes, owner and mode as before the fence), reloads and waits until
/// the reload has taken effect, so that clients connect again as soon as this returns. Safe to
/// repeat, and a no-op on a source that is not fenced. Works from a new session (a restarted
/// source agent): everything it needs is in the files.
pub async fn unfence(client: &Client) -> Result<()> {
    let files = FenceFiles::locate(client).await?;
    let mut changed = false;
    let auto_now = read(&files.auto)?;
    match settings_restore(&auto_now, read_opt(&files.auto_copy)?.as_deref()) {
        Restore::RenameBack => {
            rename_back(&files.auto_copy, &files.auto)?;
            changed = true;
        }
        Restore::DropCopy => remove_copy(&files.auto_copy)?,
        Restore::Nothing => {}
    }
    let hba_now = read(&files.hba)?;
    match hba_restore(&hba_now, read_opt(&files.hba_copy)?.as_deref()) {
        Ok(Restore::RenameBack) => {
            rename_back(&files.hba_copy, &files.hba)?;
            changed = true;
        }
        Ok(Restore::DropCopy) => remove_copy(&files.hba_copy)?,
        Ok(Restore::Nothing) => {}
        Err(CopyError::StaleCopy) => warn!(
            "{} is not fenced and differs from {}; both left as they are (remove the copy if {} is right)",
            files.hba.display(),
            files.hba_copy.display(),
            files.hba.display()
        ),
        Err(e) => return Err(copy_error(e, &files.hba, &files.hba_copy)),
    }
    if changed {
        reload_and_wait(client).await?;
        info!("unfenced: {} restored", files.hba.display());
    }
    Ok(())
}

/// Whether the fence is in place on disk: `pg_hba.conf` is the fenced file and its original is
/// saved beside it (what `StopCluster` requires before it shuts the source down).
pub async fn fenced_on_disk(client: &Client) -> Result<bool> {
    let files = FenceFiles::locate(client).await?;
    Ok(is_fenced(&read(&files.hba)?) && files.hba_copy.exists())
}

async fn refuse_enabled_subscriptions(client: &Client) -> Result<()> {
    let subs: Option<String> = client
        .query_one(
            "SELECT string_agg(quote_ident(subname), ', ' ORDER BY subname) FROM pg_subscription WHERE subenabled",
            &[],
        )
        .await
        .context("listing subscriptions")?
        .get(0);
    if let Some(subs) = subs {
        bail!("subscription(s) {subs} are enabled: their apply workers commit on the source without a client connection, which no fence can refuse; disable them first (ALTER SUBSCRIPTION name DISABLE) and create them on the new cluster afterwards");
    }
    Ok(())
}

/// The rule that admits a restarted source agent, or why there is none.
async fn control_rule(client: &Client) -> Result<(Option<ControlRule>, Option<String>)> {
    let row = client
        .query_one(
            "SELECT session_user::text, current_database()::text,
                    (SELECT rolpassword FROM pg_authid WHERE rolname = session_user)",
            &[],
        )
        .await
        .context("reading the control role (needs superuser)")?;
    let (user, db, stored): (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
    let Some(method) = PasswordMethod::of_stored(stored.as_deref()) else {
        return Ok((None, Some(format!("role {user} has no password"))));
    };
    match ControlRule::new(&db, &user, method) {
        Ok(r) => Ok((Some(r), None)),
        Err(e) => Ok((None, Some(e.to_string()))),
    }
}

/// The files the fence changes and their saved originals.
struct FenceFiles {
    hba: PathBuf,
    hba_copy: PathBuf,
    auto: PathBuf,
    auto_copy: PathBuf,
}

impl FenceFiles {
    async fn locate(client: &Client) -> Result<Self> {
        let row = client
            .query_one(
                "SELECT current_setting('hba_file'), current_setting('data_directory')",
                &[],
            )
            .await
            .context("reading hba_file and data_directory (needs superuser)")?;
        let (hba, data): (String, String) = (row.get(0), row.get(1));
        // A symlinked file is changed where it really is (a copy beside the link could sit on
        // another file system, and renaming over the link would replace it with a file).
        let real = |p: PathBuf| {
            std::fs::canonicalize(&p).with_context(|| {
                format!(
                    "resolving {} (run pgferry-source on the source host as the cluster's OS user or root)",
                    p.display()
                )
            })
        };
        let hba = real(PathBuf::from(hba))?;
        let auto = real(Path::new(&data).join("postgresql.auto.conf"))?;
        Ok(Self {
            hba_copy: copy_path(&hba),
            auto_copy: copy_path(&auto),
            hba,
            auto,
        })
    }
}

/// `path` + [`ORIGINAL_SUFFIX`].
pub fn copy_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ORIGINAL_SUFFIX);
    PathBuf::from(s)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn metadata(path: &Path) -> Result<std::fs::Metadata> {
    std::fs::metadata(path)
        .with_context(|| format!("reading the owner and mode of {}", path.display()))
}

fn copy_error(e: CopyError, file: &Path, copy: &Path) -> anyhow::Error {
    match e {
        CopyError::StaleCopy => anyhow::anyhow!(
            "{} exists from an earlier fence and differs from {}: if {} is what you want, remove the copy; otherwise put the copy back (mv), then try again",
            copy.display(),
            file.display(),
            file.display()
        ),
        CopyError::MissingCopy => anyhow::anyhow!(
            "{} is pgferry's fence but its original {} is gone: restore {} by hand and SELECT pg_reload_conf()",
            file.display(),
            copy.display(),
            file.display()
        ),
    }
}

/// Replaces `path` with `bytes` atomically and durably (a sibling temporary file written,
/// given `like`'s owner and mode, fsynced, renamed over `path`, the directory fsynced).
fn write_atomically(path: &Path, bytes: &[u8], like: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let tmp = {
        let mut s = path.as_os_str().to_owned();
        s.push(".pgferry-tmp");
        PathBuf::from(s)
    };
    let what = || format!("writing {}", path.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(what)?;
    f.write_all(bytes).with_context(what)?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&f, Some(like.uid()), Some(like.gid())).with_context(what)?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(like.mode() & 0o7777))
        .with_context(what)?;
    f.sync_all().with_context(what)?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(what)?;
    sync_parent(path)
}

fn rename_back(copy: &Path, path: &Path) -> Result<()> {
    std::fs::rename(copy, path)
        .with_context(|| format!("renaming {} back to {}", copy.display(), path.display()))?;
    sync_parent(path)
}

fn remove_copy(copy: &Path) -> Result<()> {
    std::fs::remove_file(copy).with_context(|| format!("removing {}", copy.display()))?;
    sync_parent(copy)
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Writes a logical message `label` in its own transaction, committed with
/// `synchronous_commit = local` (set for the session), and returns its LSN: a standby's replay
/// LSN reaches exactly this value once everything before it is replayed. On failure the
/// transaction is rolled back so the session stays usable.
pub async fn wal_marker(client: &Client, label: &str) -> Result<Lsn> {
    let marker = async {
        client
            .batch_execute("SET synchronous_commit = local; BEGIN READ WRITE")
            .await?;
        let row = client
            .query_one(
                "SELECT pg_logical_emit_message(true, 'pgferry', $1)::text",
                &[&label],
            )
            .await
            .with_context(|| format!("writing the {label} marker"))?;
        client.batch_execute("COMMIT").await?;
        lsn(&row.get::<_, String>(0))
    };
    match marker.await {
        Ok(l) => Ok(l),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

fn lsn(text: &str) -> Result<Lsn> {
    text.parse()
        .with_context(|| format!("PostgreSQL returned {text:?} as an LSN"))
}

/// `pg_reload_conf()`, then waits until this session has reloaded. The postmaster signals its
/// children only while it reloads (and, in PostgreSQL 15, forks nothing until that is done), so
/// a new `pg_conf_load_time()` here means every connection accepted from now on gets the new
/// `pg_hba.conf`.
async fn reload_and_wait(client: &Client) -> Result<()> {
    const LOADED: &str = "SELECT (extract(epoch FROM pg_conf_load_time()) * 1000000)::int8";
    let before: i64 = client.query_one(LOADED, &[]).await?.get(0);
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .context("pg_reload_conf()")?;
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        // Each statement is a new command: the backend applies a pending reload before it.
        let now: i64 = client.query_one(LOADED, &[]).await?.get(0);
        if now > before {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "PostgreSQL did not reload its configuration within {} s of pg_reload_conf(); see its log",
                RELOAD_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The postmaster of the server `client` is connected to, from `postmaster.pid` in its data
/// directory, checked against the port and start time the server reports (not another
/// cluster's, not a container's).
pub(crate) struct Postmaster {
    pub pid: i32,
}

pub(crate) async fn postmaster(client: &Client) -> Result<Postmaster> {
    let row = client
        .query_one(
            "SELECT current_setting('data_directory'), current_setting('port'),
                    extract(epoch FROM pg_postmaster_start_time())::int8",
            &[],
        )
        .await
        .context("reading data_directory and port (needs superuser or pg_read_all_settings)")?;
    let (data_dir, port, started): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
    let pidfile = Path::new(&data_dir).join("postmaster.pid");
    let text = std::fs::read_to_string(&pidfile).with_context(|| {
        format!(
            "reading {} to find the postmaster (run pgferry-source as the cluster's OS user or root)",
            pidfile.display()
        )
    })?;
    // postmaster.pid: PID, data directory, start time (epoch), port, …
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let pid: i32 = lines
        .first()
        .and_then(|l| l.parse().ok())
        .filter(|p| *p > 1)
        .with_context(|| format!("{} does not start with a PID", pidfile.display()))?;
    let file_start: Option<i64> = lines.get(2).and_then(|l| l.parse().ok());
    if lines.get(3) != Some(&port.as_str()) || file_start.is_none_or(|s| (s - started).abs() > 2) {
        bail!(
            "{} describes another server (port {:?}, started {:?}; connected to port {port}, started {started})",
            pidfile.display(),
            lines.get(3),
            file_start
        );
    }
    Ok(Postmaster { pid })
}

/// Which sessions the fence ends: everything that could commit for a client — client
/// backends, logical walsenders (they run SQL), parallel workers of those, subscription
/// workers. Physical walsenders (the standby's among them) cannot run SQL; PostgreSQL's own
/// processes and extensions' background workers are not connections.
fn must_end(backend_type: &str, has_database: bool) -> bool {
    match backend_type {
        "client backend" | "parallel worker" => true,
        "walsender" => has_database,
        "logical replication launcher" => false,
        t => t.starts_with("logical replication"),
    }
}

/// A process, as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    ppid: i32,
    /// Start time (clock ticks after boot): tells a PID apart from a later one.
    start: u64,
    state: u8,
}

fn proc_stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid … starttime(22nd)": comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid,
        state: *f.first()?.as_bytes().first()?,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn alive(pid: i32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|p| p.start == start && !matches!(p.state, b'Z' | b'X'))
}

fn children_of(ppid: i32) -> Result<Vec<Proc>> {
    let entries = std::fs::read_dir("/proc").context("listing /proc")?;
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .filter(|p| p.ppid == ppid)
        .collect())
}

/// Ends every session [`must_end`] names and every connection still authenticating, and waits
/// until all of them have exited. Returns (sessions ended, connections ended).
async fn end_other_sessions(client: &Client, pm: &Postmaster) -> Result<(u32, u32)> {
    let own: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let pm_cmdline = std::fs::read(format!("/proc/{}/cmdline", pm.pid))
        .with_context(|| format!("reading the postmaster's (pid {}) command line", pm.pid))?;
    // Every process forked under the old rules that is still alive is among these: the reload
    // has taken effect, and what the postmaster forks from now on gets the fenced rules.
    let before = children_of(pm.pid)?;
    let mut ended: HashMap<i32, Option<u64>> = HashMap::new();
    let mut signalled: HashMap<i32, u64> = HashMap::new();
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    loop {
        let rows = client
            .query(
                "SELECT pid, backend_type, datname IS NOT NULL FROM pg_stat_activity
                  WHERE pid IS NOT NULL",
                &[],
            )
            .await
            .context("listing sessions")?;
        let visible: HashSet<i32> = rows.iter().map(|r| r.get(0)).collect();
        let to_end: Vec<i32> = rows
            .iter()
            .filter(|r| {
                let bt: Option<String> = r.get(1);
                r.get::<_, i32>(0) != own && must_end(bt.as_deref().unwrap_or(""), r.get(2))
            })
            .map(|r| r.get(0))
            .collect();
        if !to_end.is_empty() {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
                    &[&to_end],
                )
                .await
                .context("ending sessions (pg_terminate_backend)")?;
            for pid in &to_end {
                ended
                    .entry(*pid)
                    .or_insert_with(|| proc_stat(*pid).map(|p| p.start));
            }
        }
        for p in &before {
            if p.pid == own
                || visible.contains(&p.pid)
                || signalled.contains_key(&p.pid)
                || !alive(p.pid, p.start)
            {
                continue;
            }
            let title = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
            if !connection_in_startup(&title, &pm_cmdline) {
                continue;
            }
            use nix::sys::signal::{kill, Signal};
            match kill(nix::unistd::Pid::from_raw(p.pid), Signal::SIGTERM) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => bail!(
                    "ending connection {} still authenticating: {e} (run pgferry-source as the cluster's OS user or root)",
                    p.pid
                ),
            }
            signalled.insert(p.pid, p.start);
        }
        let still: Vec<i32> = ended
            .iter()
            .filter_map(|(pid, start)| start.map(|s| (*pid, s)))
            .chain(signalled.iter().map(|(p, s)| (*p, *s)))
            .filter(|(pid, start)| alive(*pid, *start))
            .map(|(pid, _)| pid)
            .collect();
        if to_end.is_empty() && still.is_empty() {
            return Ok((ended.len() as u32, signalled.len() as u32));
        }
        if Instant::now() > deadline {
            bail!(
                "sessions still running {} s after the fence ended them (pids {:?}); see the source's log",
                SWEEP_TIMEOUT.as_secs(),
                to_end.iter().chain(&still).collect::<HashSet<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A control connection from [`CONTROL_ADDR`] to the loopback address and port of `cfg`: the
/// route the fenced `pg_hba.conf` admits. The server must listen on that IPv4 loopback address
/// (for a unix-socket `conninfo`, on 127.0.0.1).
pub async fn connect_from_control_addr(cfg: &tokio_postgres::Config) -> Result<Client> {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) if h == "localhost" => Ipv4Addr::LOCALHOST,
        Some(Host::Tcp(h)) => match h.parse::<Ipv4Addr>() {
            Ok(a) if a.is_loopback() => a,
            _ => bail!("host {h} is not an IPv4 loopback address"),
        },
        _ => Ipv4Addr::LOCALHOST,
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let timeout = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(CONTROL_ADDR.into(), 0))
        .with_context(|| format!("binding {CONTROL_ADDR}"))?;
    let dest = SocketAddr::new(host.into(), port);
    let stream = tokio::time::timeout(timeout, socket.connect(dest))
        .await
        .with_context(|| format!("connecting to {dest} from {CONTROL_ADDR}: timed out"))?
        .with_context(|| format!("connecting to {dest} from {CONTROL_ADDR}"))?;
    stream.set_nodelay(true)?;
    let (client, conn) = cfg
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {dest}, from {CONTROL_ADDR}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!("source PostgreSQL control connection (from {CONTROL_ADDR}): {e}");
        }
    });
    Ok(client)
}

/// Facts for the preflight's fence checks (best effort: what cannot be read stays unknown).
pub async fn fence_facts(client: &Client) -> FenceFacts {
    let mut f = FenceFacts::default();
    access_facts(client, &mut f).await;
    replication_facts(client, &mut f).await;
    session_facts(client, &mut f).await;
    f
}

/// Whether this agent could fence and unfence: its role is a superuser, a restarted agent could
/// reconnect from [`CONTROL_ADDR`] (PostgreSQL listens on loopback, the role has a password),
/// and it can replace `pg_hba.conf` and `postgresql.auto.conf`. Also reads
/// `synchronous_standby_names`, which comes with the same query.
async fn access_facts(client: &Client, f: &mut FenceFacts) {
    if let Ok(r) = client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('synchronous_standby_names'),
                    current_setting('listen_addresses')",
            &[],
        )
        .await
    {
        f.superuser = r.get(0);
        f.synchronous_standby_names = r.get(1);
        let listen: String = r.get(2);
        let loopback = listen
            .split(',')
            .map(str::trim)
            .any(|a| matches!(a, "*" | "0.0.0.0" | "localhost") || a.starts_with("127."));
        if !loopback {
            f.no_reconnect = Some(format!(
                "PostgreSQL does not listen on 127.0.0.1 (listen_addresses = '{listen}')"
            ));
        }
    }
    match control_rule(client).await {
        Ok((_, Some(why))) => f.no_reconnect = Some(why),
        Ok(_) => {}
        Err(e) => f.no_reconnect = Some(format!("{e:#}")),
    }
    match FenceFiles::locate(client).await {
        Ok(files) => {
            f.hba_file = Some(files.hba.display().to_string());
            f.files_unwritable = unwritable(&[&files.hba, &files.auto]);
        }
        Err(e) => {
            f.hba_file = client
                .query_one("SELECT current_setting('hba_file')", &[])
                .await
                .ok()
                .map(|r| r.get(0));
            f.files_unwritable = Some(format!("{e:#}"));
        }
    }
}

/// Prepared transactions, replication slots and connected WAL senders: what is tied to the
/// WAL stream, which the new cluster inherits or loses at the cutover.
async fn replication_facts(client: &Client, f: &mut FenceFacts) {
    if let Ok(rows) = client
        .query(
            "SELECT gid, owner::text, database::text,
                    extract(epoch FROM now() - prepared)::int8
               FROM pg_prepared_xacts ORDER BY prepared",
            &[],
        )
        .await
    {
        f.prepared_transactions = rows
            .iter()
            .map(|r| PreparedTransaction {
                gid: r.get(0),
                owner: r.get(1),
                database: r.get(2),
                age_secs: r.get::<_, i64>(3).max(0) as u64,
            })
            .collect();
    }
    if let Ok(rows) = client
        .query(
            "SELECT slot_name::text, slot_type, active, database::text, plugin::text
               FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )
        .await
    {
        f.replication_slots = rows
            .iter()
            .map(|r| SlotFact {
                name: r.get(0),
                slot_type: r.get(1),
                active: r.get(2),
                database: r.get(3),
                plugin: r.get(4),
            })
            .collect();
    }
    if let Ok(rows) = client
        .query(
            "SELECT coalesce(r.application_name, ''), coalesce(host(r.client_addr), 'local'),
                    a.datname::text, coalesce(r.sync_state, '')
               FROM pg_stat_replication r LEFT JOIN pg_stat_activity a ON a.pid = r.pid
              ORDER BY r.pid",
            &[],
        )
        .await
    {
        f.wal_senders = rows
            .iter()
            .map(|r| WalSenderFact {
                application_name: r.get(0),
                client: r.get(1),
                database: r.get(2),
                sync_state: r.get(3),
            })
            .collect();
    }
}

/// Long-open client transactions (the fence ends them), enabled subscriptions and extensions'
/// background workers (they commit without a client connection, which `pg_hba.conf` cannot
/// refuse).
async fn session_facts(client: &Client, f: &mut FenceFacts) {
    if let Ok(rows) = client
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(datname::text, ''),
                    coalesce(state, ''), extract(epoch FROM now() - xact_start)::int8
               FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                AND xact_start < now() - make_interval(secs => $1)
              ORDER BY xact_start",
            &[&(LONG_TRANSACTION_SECS as f64)],
        )
        .await
    {
        f.long_transactions = rows
            .iter()
            .map(|r| LongTransaction {
                pid: r.get(0),
                user: r.get(1),
                database: r.get(2),
                state: r.get(3),
                age_secs: r.get::<_, i64>(4).max(0) as u64,
            })
            .collect();
    }
    if let Ok(rows) = client
        .query(
            "SELECT subname::text FROM pg_subscription WHERE subenabled ORDER BY 1",
            &[],
        )
        .await
    {
        f.subscriptions = rows.iter().map(|r| r.get(0)).collect();
    }
    if let Ok(rows) = client
        .query(
            "SELECT DISTINCT backend_type FROM pg_stat_activity
              WHERE backend_type NOT IN ('client backend', 'autovacuum launcher',
                    'autovacuum worker', 'background writer', 'checkpointer', 'walwriter',
                    'archiver', 'startup', 'walreceiver', 'walsender', 'walsummarizer',
                    'logical replication launcher', 'logical replication worker',
                    'parallel worker', 'standalone backend', 'slotsync worker', 'io worker')
              ORDER BY 1",
            &[],
        )
        .await
    {
        f.background_workers = rows.iter().map(|r| r.get(0)).collect();
    }
}

/// Why this process could not replace `files` (read each, create and rename in its
/// directory), or `None`.
fn unwritable(files: &[&Path]) -> Option<String> {
    use nix::unistd::{access, AccessFlags};
    for f in files {
        if let Err(e) = access(*f, AccessFlags::R_OK) {
            return Some(format!("the source agent cannot read {}: {e}", f.display()));
        }
        let dir = f.parent().unwrap_or(Path::new("/"));
        if let Err(e) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
            return Some(format!(
                "the source agent cannot create files in {} (to keep a copy of {}): {e}",
                dir.display(),
                f.display()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_that_could_commit_are_ended() {
        for (bt, db, end) in [
            ("client backend", true, true),
            ("walsender", true, true),
            ("walsender", false, false),
            ("parallel worker", true, true),
            ("logical replication worker", true, true),
            ("logical replication apply worker", true, true),
            ("logical replication launcher", false, false),
            ("autovacuum worker", true, false),
            ("checkpointer", false, false),
            ("pg_cron launcher", true, false),
        ] {
            assert_eq!(must_end(bt, db), end, "{bt}");
        }
    }

    #[test]
    fn proc_stat_reads_this_process() {
        let me = std::process::id() as i32;
        let p = proc_stat(me).expect("own stat");
        assert_eq!(p.ppid, nix::unistd::getppid().as_raw());
        assert!(alive(me, p.start));
        assert!(!alive(me, p.start + 1), "another process with this PID");
        assert!(children_of(p.ppid).unwrap().iter().any(|c| c.pid == me));
    }

    #[test]
    fn atomic_writes_keep_owner_and_mode_and_restore_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pg_hba.conf");
        std::fs::write(&f, b"original\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let copy = copy_path(&f);
        assert!(copy.to_string_lossy().ends_with("pg_hba.conf.pgferry-orig"));
        write_atomically(&copy, b"original\n", &meta).unwrap();
        write_atomically(&f, b"fenced\n", &meta).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"fenced\n");
        for p in [&f, &copy] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        }
        rename_back(&copy, &f).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"original\n");
        assert!(!copy.exists());
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
