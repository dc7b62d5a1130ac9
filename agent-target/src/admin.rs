//! The target agent's admin socket and the CLI verbs that use it.
//!
//! ```text
//!   pgferry-target preflight ──► unix socket (0600) ──► running target agent ──► control stream
//!        (prints checks, exit 0/1)   one JSON line each way                      ──► source agent
//! ```
//!
//! One request line `{"verb": "..."}`, one response line: `{"ok": bool, ...}` with either the
//! verb's result or `"error"`. The socket is created 0600, so only the agent's user (and root)
//! can drive the migration.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cli::AdminArgs;
use crate::config::TargetSettings;
use pgferry_common::admin::{AdminLine, AdminRequest};
use pgferry_common::preflight::{Check, TargetFacts};

/// Longest admin request line accepted by the agent.
pub const MAX_ADMIN_REQUEST: usize = 64 * 1024;
/// Longest admin response line accepted by the CLI.
const MAX_ADMIN_RESPONSE: usize = 16 * 1024 * 1024;

/// The verbs the admin socket understands.
pub const VERBS: &[&str] = &["preflight", "status", "clone", "cutover", "rollback"];

/// Facts about the target host for the preflight.
pub fn target_facts(s: &TargetSettings, now_ms: u64, round_trip_ms: u64) -> Result<TargetFacts> {
    let data_dir = s.data_dir.as_ref().context(
        "no data directory configured for the new cluster: set [target] data_dir or --data-dir",
    )?;
    let postgres = s.bindir.join("postgres");
    let out = std::process::Command::new(&postgres)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (is [target] bindir right?)",
                postgres.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major_version = parse_major(&text)
        .with_context(|| format!("cannot read a version from `{}`", text.trim()))?;
    let data_dir_empty = match std::fs::read_dir(data_dir) {
        Ok(mut rd) => Some(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("reading {}: {e}", data_dir.display()),
    };
    Ok(TargetFacts {
        major_version,
        data_dir: data_dir.display().to_string(),
        data_dir_empty,
        free_bytes: free_bytes(data_dir)?,
        now_ms,
        round_trip_ms,
    })
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15.
fn parse_major(version: &str) -> Option<u32> {
    let rest = version.split(')').nth(1)?.trim();
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Free bytes on the file system that holds `path` (or would: its nearest existing ancestor).
fn free_bytes(path: &Path) -> Result<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = PathBuf::from("/");
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(&p).with_context(|| format!("statvfs {}", p.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Runs a verb against the running agent and prints the answer; the process exit code.
pub fn cli_verb(req: AdminRequest, args: &AdminArgs) -> Result<ExitCode> {
    let socket = socket_of(args)?;
    let verb = req.verb();
    // Progress lines arrive at least every few seconds during a clone; the timeout bounds
    // silence, not the whole run.
    if args.watch && verb == "status" {
        loop {
            let answer = request(&socket, &req, Duration::from_secs(60))?;
            if args.json {
                println!("{answer}");
            } else {
                print!("\x1b[2J\x1b[H{}", render(verb, &answer));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let answer = request(&socket, &req, Duration::from_secs(600))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", render(verb, &answer));
    }
    Ok(if answer["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn socket_of(args: &AdminArgs) -> Result<PathBuf> {
    match (&args.admin_socket, &args.config) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(c)) => crate::config::admin_socket_of(c),
        (None, None) => {
            bail!("give --admin-socket PATH or --config FILE of the running target agent")
        }
    }
}

/// `migrate`: clone (or resume), wait for the catch-up, cut over.
pub fn cli_migrate(m: &crate::cli::MigrateArgs) -> Result<ExitCode> {
    let c = &m.cutover;
    let socket = socket_of(&c.admin)?;
    let status = request(&socket, &AdminRequest::Status, Duration::from_secs(60))?;
    let phase = status["migration"]["phase"]
        .as_str()
        .unwrap_or("new")
        .to_string();
    if phase == "completed" {
        println!("migrate: the migration is already complete");
        return Ok(ExitCode::SUCCESS);
    }
    let before_catch_up = matches!(
        phase.as_str(),
        "new" | "preflighted" | "slot_created" | "base_backup_done" | "standby_started"
    );
    if before_catch_up {
        let answer = request(&socket, &AdminRequest::Clone, Duration::from_secs(600))?;
        if answer["ok"] != true {
            print!("{}", render("clone", &answer));
            return Ok(ExitCode::FAILURE);
        }
    }
    if before_catch_up || matches!(phase.as_str(), "catching_up" | "ready") {
        // Catch-up: wait until the lag is small enough for the cutover.
        let deadline = std::time::Instant::now() + Duration::from_secs(m.catch_up_timeout_secs);
        let mut last_print = std::time::Instant::now() - Duration::from_secs(10);
        loop {
            let st = request(&socket, &AdminRequest::Status, Duration::from_secs(60))?;
            let lag = st["lag_bytes"].as_u64();
            if last_print.elapsed() >= Duration::from_secs(2) {
                eprintln!(
                    "migrate: catching up, lag {} bytes (cutover at ≤ {})",
                    lag.map_or("?".to_string(), |l| l.to_string()),
                    c.max_lag
                );
                last_print = std::time::Instant::now();
            }
            if lag.is_some_and(|l| l <= c.max_lag) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the standby did not catch up within {} s; it keeps streaming: run `migrate` again later",
                    m.catch_up_timeout_secs
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if !m.auto_cutover {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                bail!("the standby has caught up; pass --auto-cutover to cut over without a terminal to confirm on (or run `pgferry-target cutover`)");
            }
            eprint!(
                "migrate: the standby has caught up. Fence the source and cut over now? [y/N] "
            );
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                println!("migrate: not cutting over; the standby keeps streaming");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let opts = c.options();
    let answer = request(
        &socket,
        &AdminRequest::Cutover(opts),
        Duration::from_secs(600),
    )?;
    if c.admin.json {
        println!("{answer}");
    } else {
        print!("{}", render("cutover", &answer));
    }
    Ok(if answer["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One request to the admin socket.
pub fn request(socket: &Path, req: &AdminRequest, timeout: Duration) -> Result<Value> {
    let verb = req.verb();
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the target agent at {}: is `pgferry-target run` running (and is this its admin socket)?",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{}", serde_json::to_string(req)?)?;
    let mut reader = BufReader::new(s.take_limited());
    // Dropped on every way out (answer or error), which clears a progress bar.
    let mut progress = ProgressOutput::new(verb);
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("reading the agent's answer")?;
        if line.is_empty() {
            bail!("the target agent closed the admin connection without an answer");
        }
        // Long verbs stream progress lines before their answer.
        match serde_json::from_str(&line).context("the agent's answer is not JSON")? {
            AdminLine::Progress { progress: p } => progress.line(&p),
            AdminLine::Answer(v) => return Ok(v),
        }
    }
}

/// Where a verb's progress lines go: plain `{verb}: {line}` lines on stderr, or, when stderr is a
/// terminal, a progress bar for the base backup with the other lines printed above it.
struct ProgressOutput<'a> {
    verb: &'a str,
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> ProgressOutput<'a> {
    fn new(verb: &'a str) -> Self {
        use std::io::IsTerminal;
        Self {
            verb,
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    fn line(&mut self, p: &str) {
        let verb = self.verb;
        if self.tty {
            if let Some((done_kb, total_kb)) = parse_basebackup_progress(p) {
                let bar = self.bar.get_or_insert_with(|| new_bar(verb));
                // pg_basebackup raises its estimate when it is passed; never show more than 100%.
                bar.set_length(total_kb.max(done_kb).saturating_mul(1024));
                bar.set_position(done_kb.saturating_mul(1024));
                return;
            }
        }
        match &self.bar {
            Some(bar) => bar.println(format!("{verb}: {p}")),
            None => eprintln!("{verb}: {p}"),
        }
    }
}

impl Drop for ProgressOutput<'_> {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(verb: &str) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{prefix}: base backup [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
    )
    .expect("valid progress template")
    .progress_chars("=> ");
    indicatif::ProgressBar::new(0)
        .with_style(style)
        .with_prefix(verb.to_string())
}

/// `pg_basebackup: 123456/2345678 kB (5%), 0/1 tablespace` (pg_basebackup's `--progress` line as
/// the agent forwards it, optionally with ` (…/file)` after `tablespace[s]`) → `(123456, 2345678)`
/// in kB; `None` for any other line.
fn parse_basebackup_progress(line: &str) -> Option<(u64, u64)> {
    fn num(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    let rest = line.trim().strip_prefix("pg_basebackup:")?.trim_start();
    let (sizes, rest) = rest.split_once(" kB (")?;
    let (done, total) = sizes.split_once('/')?;
    let (done, total) = (num(done)?, num(total)?);
    let (percent, rest) = rest.split_once("%), ")?;
    num(percent)?;
    let (tablespaces, rest) = rest.split_once(' ')?;
    let (n, m) = tablespaces.split_once('/')?;
    num(n)?;
    num(m)?;
    let rest = rest
        .strip_prefix("tablespaces")
        .or_else(|| rest.strip_prefix("tablespace"))?;
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    Some((done, total))
}

trait TakeLimited {
    fn take_limited(self) -> std::io::Take<UnixStream>;
}
impl TakeLimited for UnixStream {
    fn take_limited(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, MAX_ADMIN_RESPONSE as u64)
    }
}

/// Text for a terminal.
pub fn render(verb: &str, answer: &Value) -> String {
    let mut out = String::new();
    if let (Some(e), false) = (answer["error"].as_str(), verb == "status") {
        out.push_str(&format!("{verb}: error: {e}\n"));
        return out;
    }
    match verb {
        "preflight" => {
            let checks: Vec<Check> =
                serde_json::from_value(answer["checks"].clone()).unwrap_or_default();
            for c in &checks {
                out.push_str(&format!(
                    "  {:<4}  {:<25} {}\n",
                    match (c.ok, c.warning) {
                        (false, _) => "FAIL",
                        (true, true) => "warn",
                        (true, false) => "ok",
                    },
                    c.name,
                    c.detail
                ));
                if !c.ok || c.warning {
                    out.push_str(&format!("        {:<25} fix: {}\n", "", c.fix));
                }
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            let warned = checks.iter().filter(|c| c.warning).count();
            if failed == 0 && warned > 0 {
                out.push_str(&format!(
                    "preflight: all {} checks passed, {warned} with a warning to settle before the cutover\n",
                    checks.len()
                ));
            } else if failed == 0 {
                out.push_str(&format!("preflight: all {} checks passed\n", checks.len()));
            } else {
                out.push_str(&format!(
                    "preflight: {failed} of {} checks failed; nothing was changed\n",
                    checks.len()
                ));
            }
        }
        "cutover" => {
            let r = &answer["report"];
            if r["dry_run"] == true {
                out.push_str(&format!(
                    "dry run: lag {} bytes; {} table(s) would be verified; nothing changed\n",
                    r["lag_bytes_at_start"],
                    r["tables"].as_array().map_or(0, Vec::len)
                ));
            } else {
                out.push_str(&format!(
                    "cutover complete: write downtime {} ms (fence → writable); {} table(s), {} rows verified\n",
                    r["downtime_ms"],
                    r["tables"].as_array().map_or(0, Vec::len),
                    r["verified_rows"]
                ));
                for (k, v) in r["phases"].as_object().into_iter().flatten() {
                    out.push_str(&format!("  {k:<12} {v} ms\n"));
                }
                let skipped: Vec<&str> = r["tables_skipped"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if !skipped.is_empty() {
                    out.push_str(&format!(
                        "NOT VERIFIED (unlogged, an unusual name, or over the fence's time budget; --all-tables or --tables next time): {}\n",
                        skipped.join(", ")
                    ));
                }
                match r["source_stopped"].as_bool() {
                    Some(true) => out.push_str("the source cluster is shut down (--fence stop)\n"),
                    Some(false) => out.push_str(
                        "the source cluster could NOT be shut down: it stays fenced read-only; stop it by hand\n",
                    ),
                    None => {}
                }
                let timeline = r["timeline"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                if !timeline.is_empty() {
                    out.push_str("migration timeline (time in each phase):\n");
                    for t in timeline {
                        let ms = t["ms"]
                            .as_u64()
                            .map_or("-".to_string(), |m| format!("{:.1} s", m as f64 / 1000.0));
                        out.push_str(&format!(
                            "  {:<16} {:>9}  {}\n",
                            t["phase"].as_str().unwrap_or("?"),
                            ms,
                            t["step"].as_str().unwrap_or("")
                        ));
                    }
                }
            }
        }
        "status" => {
            let t = &answer["tunnel"];
            let phase = answer["migration"]["phase"].as_str().unwrap_or("unknown");
            if t["state"] == "up" {
                out.push_str(&format!(
                    "tunnel     up with {} (source {}, migration {}), rtt {} ms, {} stream(s)\n",
                    t["peer"]["address"].as_str().unwrap_or("?"),
                    t["peer"]["region"].as_str().unwrap_or("?"),
                    t["peer"]["migration"].as_str().unwrap_or("?"),
                    t["rtt_ms"],
                    t["streams"]
                ));
            } else {
                out.push_str("tunnel     down\n");
            }
            out.push_str(&format!("phase      {phase}\n"));
            let src = &answer["source"];
            if let Some(lsn) = src["current_lsn"].as_str() {
                out.push_str(&format!("source     current LSN {lsn}"));
                for r in src["replication"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "; walsender {} sent {} replayed {} (replay lag {} ms)",
                        r["state"].as_str().unwrap_or("?"),
                        r["sent_lsn"].as_str().unwrap_or("-"),
                        r["replay_lsn"].as_str().unwrap_or("-"),
                        r["replay_lag_ms"]
                            .as_u64()
                            .map_or("-".to_string(), |v| v.to_string())
                    ));
                }
                if let Some(slot) = src["slot"].as_object() {
                    out.push_str(&format!(
                        "; slot {} {}",
                        slot.get("name").and_then(Value::as_str).unwrap_or("?"),
                        if slot.get("active") == Some(&Value::Bool(true)) {
                            "active"
                        } else {
                            "inactive"
                        }
                    ));
                }
                out.push('\n');
            }
            let new = &answer["new_cluster"];
            if let Some(replay) = new["replay_lsn"].as_str() {
                out.push_str(&format!(
                    "new        {}, received {}, replayed {}\n",
                    if new["in_recovery"] == true {
                        "standby"
                    } else {
                        "primary"
                    },
                    new["receive_lsn"].as_str().unwrap_or("-"),
                    replay
                ));
            }
            if let Some(lag) = answer["lag_bytes"].as_u64() {
                out.push_str(&format!("lag        {lag} bytes\n"));
            }
            if let Some(e) = answer["error"].as_str() {
                out.push_str(&format!("error      {e}\n"));
            }
        }
        _ => {
            out.push_str(&serde_json::to_string_pretty(answer).unwrap_or_default());
            out.push('\n');
        }
    }
    out
}

/// Reads one request line (bounded) from an admin connection.
pub(crate) async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<AdminRequest> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
        if buf.contains(&b'\n') {
            break;
        }
        if buf.len() > MAX_ADMIN_REQUEST {
            bail!("admin request longer than {MAX_ADMIN_REQUEST} bytes");
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or(&[]);
    serde_json::from_slice(line).with_context(|| {
        format!(
            "admin request {:?} is not one of: {}",
            String::from_utf8_lossy(&line[..line.len().min(200)]),
            VERBS.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the admin socket accepts: one typed request per line; anything else is refused with
    /// the verbs it knows, and an endless line is cut at the bound.
    #[tokio::test]
    async fn admin_requests_are_typed_and_bounded() {
        use tokio::io::AsyncWriteExt;
        let ask = |bytes: Vec<u8>| async move {
            let (mut client, mut server) = tokio::net::UnixStream::pair().unwrap();
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&bytes).await;
                client
            });
            let r = read_request(&mut server).await;
            // Closed first, so a writer still blocked on a full socket ends too.
            drop(server);
            drop(writer.await);
            r
        };
        let ok = ask(br#"{"verb":"rollback","options":{"keep_slot":true}}
"#
        .to_vec())
        .await
        .unwrap();
        assert_eq!(
            ok,
            AdminRequest::Rollback(pgferry_common::admin::RollbackOptions { keep_slot: true })
        );
        for bad in [
            &br#"{"verb":"sql","options":"DROP DATABASE x"}
"#[..],
            &br#"{"verb":"cutover","options":{"max_lag":"lots"}}
"#[..],
            b"not json\n",
        ] {
            let e = format!("{:#}", ask(bad.to_vec()).await.unwrap_err());
            assert!(
                e.contains("preflight, status, clone, cutover, rollback"),
                "{e}"
            );
        }
        let endless = vec![b'x'; MAX_ADMIN_REQUEST * 2];
        let e = format!("{:#}", ask(endless).await.unwrap_err());
        assert!(e.contains("longer than"), "{e}");
    }

    #[test]
    fn major_version_from_postgres_output() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 16beta1"), Some(16));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    fn basebackup_progress_lines() {
        assert_eq!(
            parse_basebackup_progress("pg_basebackup: 123456/2345678 kB (5%), 0/1 tablespace"),
            Some((123456, 2345678))
        );
        assert_eq!(
            parse_basebackup_progress("pg_basebackup: 2345678/2345678 kB (100%), 1/1 tablespace"),
            Some((2345678, 2345678))
        );
        assert_eq!(
            parse_basebackup_progress("pg_basebackup: 4096/8192 kB (50%), 1/3 tablespaces"),
            Some((4096, 8192))
        );
        // Padded to the width of the total, with the trailing newline of a forwarded line.
        assert_eq!(
            parse_basebackup_progress("pg_basebackup:      12/2345678 kB (0%), 0/1 tablespace\n"),
            Some((12, 2345678))
        );
    }

    #[test]
    fn basebackup_progress_with_a_file_suffix() {
        assert_eq!(
            parse_basebackup_progress(
                "pg_basebackup: 123456/2345678 kB (5%), 0/1 tablespace (...data/base/16384/2619)"
            ),
            Some((123456, 2345678))
        );
        assert_eq!(
            parse_basebackup_progress(
                "pg_basebackup: 10/20 kB (50%), 1/2 tablespaces (base/1/1259                     )"
            ),
            Some((10, 20))
        );
    }

    #[test]
    fn basebackup_progress_with_zero_total() {
        assert_eq!(
            parse_basebackup_progress("pg_basebackup: 0/0 kB (0%), 0/1 tablespace"),
            Some((0, 0))
        );
    }

    #[test]
    fn basebackup_progress_rejects_garbage() {
        for line in [
            "",
            "garbage",
            "pg_basebackup:",
            "123456/2345678 kB (5%), 0/1 tablespace",
            "pg_verifybackup: 123456/2345678 kB (5%), 0/1 tablespace",
            "pg_basebackup: 12x/100 kB (5%), 0/1 tablespace",
            "pg_basebackup: -1/100 kB (5%), 0/1 tablespace",
            "pg_basebackup: +1/100 kB (5%), 0/1 tablespace",
            "pg_basebackup: 1/100 kB (5%), 0/1 tablespacesX",
            "pg_basebackup: 1/100 kB (5%)",
            "pg_basebackup: 123456/23",
            "phase slot_created → base_backup_done",
        ] {
            assert_eq!(parse_basebackup_progress(line), None, "{line:?}");
        }
    }

    #[test]
    fn basebackup_non_progress_lines() {
        for line in [
            "pg_basebackup: checkpoint completed",
            "pg_basebackup: pg_basebackup: initiating base backup, waiting for checkpoint to complete",
            "pg_basebackup: pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1",
            "pg_basebackup: pg_basebackup: base backup completed",
        ] {
            assert_eq!(parse_basebackup_progress(line), None, "{line:?}");
        }
    }

    #[test]
    fn free_bytes_walks_up_to_an_existing_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_bytes(&d.path().join("a/b/c")).unwrap() > 0);
    }
}
