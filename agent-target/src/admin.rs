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
use pgferry_common::admin::{
    AdminLine, AdminRequest, CutoverReport, PreflightReport, StatusReport, TunnelStatus,
};
use pgferry_common::migration::Lsn;
use pgferry_common::preflight::TargetFacts;

/// Longest admin request line accepted by the agent.
pub const MAX_ADMIN_REQUEST: usize = 64 * 1024;
/// Longest admin response line accepted by the CLI.
const MAX_ADMIN_RESPONSE: usize = 16 * 1024 * 1024;

/// The verbs the admin socket understands.
pub const VERBS: &[&str] = &["preflight", "status", "clone", "cutover", "rollback"];

/// Facts about the target host for the preflight.
/// Facts about the target host for the preflight; `source_tablespaces`: the locations of the
/// source's tablespaces.
pub fn target_facts(
    s: &TargetSettings,
    source_tablespaces: &[String],
    now_ms: u64,
    round_trip_ms: u64,
) -> Result<TargetFacts> {
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
    let empty = |dir: &std::path::Path| match std::fs::read_dir(dir) {
        Ok(mut rd) => Ok(Some(rd.next().is_none())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", dir.display())),
    };
    let data_dir_empty = empty(data_dir)?;
    let tablespaces = source_tablespaces
        .iter()
        .map(|source| {
            let here = s.tablespace_location(std::path::Path::new(source));
            Ok(pgferry_common::preflight::TablespaceHere {
                source: source.clone(),
                empty: empty(&here)?,
                here: here.display().to_string(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(TargetFacts {
        major_version,
        data_dir: data_dir.display().to_string(),
        data_dir_empty,
        free_bytes: free_bytes(data_dir)?,
        now_ms,
        round_trip_ms,
        listen_addresses: Some(s.listen_addresses.clone()),
        tablespaces,
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
    let phase = status(&socket)?.migration.name();
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
            let lag = status(&socket)?.lag_bytes;
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

/// The running agent's `status`, typed.
fn status(socket: &Path) -> Result<StatusReport> {
    let answer = request(socket, &AdminRequest::Status, Duration::from_secs(60))?;
    serde_json::from_value(answer)
        .context("the agent's status answer does not have the expected shape")
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

/// Text for a terminal: each verb's typed answer, or the failure's error line.
pub fn render(verb: &str, answer: &Value) -> String {
    if let (Some(e), false) = (answer["error"].as_str(), verb == "status") {
        return format!("{verb}: error: {e}\n");
    }
    let typed = match verb {
        "preflight" => serde_json::from_value(answer.clone()).map(|r| render_preflight(&r)),
        "cutover" => serde_json::from_value(answer["report"].clone()).map(|r| render_cutover(&r)),
        "status" => serde_json::from_value(answer.clone()).map(|r| render_status(&r)),
        _ => Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        )),
    };
    typed.unwrap_or_else(|e| {
        format!(
            "{verb}: the agent's answer does not have the expected shape ({e}); with --json it prints as is\n"
        )
    })
}

/// `preflight`: one line per check (with the fix for failures and warnings), then the verdict.
fn render_preflight(r: &PreflightReport) -> String {
    let mut out = String::new();
    for c in &r.checks {
        let verdict = match (c.ok, c.warning) {
            (false, _) => "FAIL",
            (true, true) => "warn",
            (true, false) => "ok",
        };
        out.push_str(&format!("  {verdict:<4}  {:<25} {}\n", c.name, c.detail));
        if !c.ok || c.warning {
            out.push_str(&format!("        {:<25} fix: {}\n", "", c.fix));
        }
    }
    let n = r.checks.len();
    let failed = r.checks.iter().filter(|c| !c.ok).count();
    let warned = r.checks.iter().filter(|c| c.warning).count();
    out.push_str(&if failed > 0 {
        format!("preflight: {failed} of {n} checks failed; nothing was changed\n")
    } else if warned > 0 {
        format!("preflight: all {n} checks passed, {warned} with a warning to settle before the cutover\n")
    } else {
        format!("preflight: all {n} checks passed\n")
    });
    out
}

/// `cutover`: the downtime and its phases, what was not verified, the source's fate, and the
/// migration's timeline (or, for a dry run, what would be done).
fn render_cutover(r: &CutoverReport) -> String {
    let tables = r.tables.as_ref().map_or(0, Vec::len);
    let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    if r.dry_run == Some(true) {
        let mut out = format!(
            "dry run: lag {} bytes; {tables} table(s) would be verified; nothing changed\n",
            or_dash(r.lag_bytes_at_start)
        );
        if let Some(p) = &r.pooler {
            out.push_str(&format!(
                "PgBouncer answers: would pause {} before the fence and switch it to the new primary after promotion\n",
                p.databases.join(", ")
            ));
        }
        out.push_str(&render_left_behind(r));
        return out;
    }
    let mut out = format!(
        "cutover complete: write downtime {} ms (fence → writable); {tables} table(s), {} rows verified\n",
        or_dash(r.downtime_ms),
        or_dash(r.verified_rows)
    );
    let p = &r.phases;
    for (name, ms) in [
        ("prepass_ms", p.prepass_ms),
        ("fence_ms", p.fence_ms),
        ("drain_ms", p.drain_ms),
        ("verify_ms", p.verify_ms),
        ("promote_ms", p.promote_ms),
    ] {
        if let Some(ms) = ms {
            out.push_str(&format!("  {name:<12} {ms} ms\n"));
        }
    }
    let skipped = r.tables_skipped.as_deref().unwrap_or_default();
    if !skipped.is_empty() {
        out.push_str(&format!(
            "NOT VERIFIED (unlogged, an unusual name, or over the fence's time budget; --all-tables or --tables next time): {}\n",
            skipped.join(", ")
        ));
    }
    match r.source_stopped {
        Some(true) => out.push_str("the source cluster is shut down (--fence stop)\n"),
        Some(false) => out.push_str(
            "the source cluster could NOT be shut down: it stays fenced read-only; stop it by hand\n",
        ),
        None => {}
    }
    if let Some(p) = &r.pooler {
        out.push_str(&match (p.resumed, p.held_ms) {
            (true, Some(ms)) => format!(
                "PgBouncer held its clients' queries for {ms} ms (pause took {} ms), then resumed them on the new primary ({})\n",
                or_dash(p.pause_ms),
                p.databases.join(", ")
            ),
            (true, None) => format!("PgBouncer switched to the new primary and resumed ({})\n", p.databases.join(", ")),
            (false, _) => "PgBouncer was NOT switched: its clients are paused; see the messages above\n".to_string(),
        });
    }
    if let Some(conninfo) = &r.new_primary {
        out.push_str(&format!("new primary: {conninfo}\n"));
    }
    out.push_str(&render_left_behind(r));
    let timeline = r.timeline.as_deref().unwrap_or_default();
    if !timeline.is_empty() {
        out.push_str("migration timeline (time in each phase):\n");
        for t in timeline {
            let ms =
                t.ms.map_or("-".to_string(), |m| format!("{:.1} s", m as f64 / 1000.0));
            out.push_str(&format!("  {:<16} {ms:>9}  {}\n", t.phase, t.step));
        }
    }
    out
}

/// What still points at the old cluster, and settings that need a restart of the new one.
fn render_left_behind(r: &CutoverReport) -> String {
    let mut out = String::new();
    if let Some(d) = &r.still_on_source {
        if d.is_empty() {
            out.push_str("nothing else uses the old cluster (no other replication slots, standbys or subscriptions)\n");
        } else {
            out.push_str("still pointing at the old cluster:\n");
            for l in d.lines() {
                out.push_str(&format!("  {l}\n"));
            }
        }
    }
    match r.restart_needed.as_deref() {
        Some([]) | None => {}
        Some(v) => out.push_str(&format!(
            "after promotion the new cluster needs a restart for: {}\n",
            v.join(", ")
        )),
    }
    out
}

/// `status`: tunnel, phase, the source's LSN and walsenders, the new cluster, the lag.
fn render_status(r: &StatusReport) -> String {
    let mut out = match &r.tunnel {
        TunnelStatus::Up {
            peer,
            streams,
            rtt_ms,
            ..
        } => format!(
            "tunnel     up with {} (source {}, migration {}), rtt {rtt_ms} ms, {streams} stream(s)\n",
            peer.address, peer.region, peer.migration
        ),
        TunnelStatus::Down => "tunnel     down\n".to_string(),
    };
    out.push_str(&format!("phase      {}\n", r.migration.name()));
    let lsn = |l: Option<Lsn>| l.map_or("-".to_string(), |l| l.to_string());
    if let Some(src) = r.source_status() {
        out.push_str(&format!("source     current LSN {}", src.current_lsn));
        for w in &src.replication {
            out.push_str(&format!(
                "; walsender {} sent {} replayed {} (replay lag {} ms)",
                w.state,
                lsn(w.sent_lsn),
                lsn(w.replay_lsn),
                w.replay_lag_ms.map_or("-".to_string(), |v| v.to_string())
            ));
        }
        if let Some(slot) = &src.slot {
            let active = if slot.active { "active" } else { "inactive" };
            out.push_str(&format!("; slot {} {active}", slot.name));
        }
        out.push('\n');
    }
    if let Some(new) = r.standby().filter(|n| n.replay_lsn.is_some()) {
        out.push_str(&format!(
            "new        {}, received {}, replayed {}\n",
            if new.in_recovery {
                "standby"
            } else {
                "primary"
            },
            lsn(new.receive_lsn),
            lsn(new.replay_lsn)
        ));
    }
    if let Some(lag) = r.lag_bytes {
        out.push_str(&format!("lag        {lag} bytes\n"));
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("error      {e}\n"));
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

    /// The terminal text is built from the typed answers: every part the operator needs, and
    /// a failure as one error line.
    #[test]
    fn render_reads_the_typed_answers() {
        let status = serde_json::json!({
            "ok": true,
            "tunnel": {"state": "up", "peer": {"address": "10.0.0.1:7443", "role": "source",
                "region": "DE", "migration": "m1", "fingerprint": "ab"},
                "streams": 2, "rtt_ms": 3, "udp_bytes_received": 10, "udp_bytes_sent": 20},
            "migration": {"phase": "catching_up", "slot": "pgferry_m1"},
            "source": {"current_lsn": "0/3000060", "now_ms": 1,
                "replication": [{"application_name": "m1", "state": "streaming",
                    "sent_lsn": "0/3000060", "write_lsn": null, "flush_lsn": null,
                    "replay_lsn": "0/3000000", "write_lag_ms": null, "flush_lag_ms": null,
                    "replay_lag_ms": 7}],
                "slot": {"name": "pgferry_m1", "active": true, "restart_lsn": null, "wal_status": null}},
            "new_cluster": {"in_recovery": true, "receive_lsn": "0/3000060",
                "replay_lsn": "0/3000000", "last_replay_ms": null, "now_ms": 2},
            "lag_bytes": 96,
        });
        let text = render("status", &status);
        for want in [
            "tunnel     up with 10.0.0.1:7443 (source DE, migration m1), rtt 3 ms, 2 stream(s)",
            "phase      catching_up",
            "walsender streaming sent 0/3000060 replayed 0/3000000 (replay lag 7 ms); slot pgferry_m1 active",
            "new        standby, received 0/3000060, replayed 0/3000000",
            "lag        96 bytes",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }

        let cutover = serde_json::json!({"ok": true, "phase": "completed", "report": {
            "phases": {"fence_ms": 20, "drain_ms": 5, "verify_ms": 30, "promote_ms": 100},
            "tables": ["public.a", "public.b"], "tables_skipped": ["public.big"],
            "verified_rows": 1000, "downtime_ms": 155, "source_stopped": false,
            "new_primary": "host=10.0.0.5 port=5432 dbname=postgres",
            "timeline": [{"phase": "completed", "step": "done", "at_ms": 1, "ms": null}]}});
        let text = render("cutover", &cutover);
        for want in [
            "write downtime 155 ms (fence → writable); 2 table(s), 1000 rows verified",
            "  verify_ms    30 ms",
            "NOT VERIFIED (",
            "public.big",
            "could NOT be shut down",
            "new primary: host=10.0.0.5 port=5432 dbname=postgres",
            "  completed                -  done",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }

        let failed = serde_json::json!({"ok": false, "error": "no tunnel", "phase": "ready"});
        assert_eq!(render("cutover", &failed), "cutover: error: no tunnel\n");
        let odd = render("preflight", &serde_json::json!({"ok": true, "checks": 3}));
        assert!(odd.contains("expected shape"), "{odd}");
    }

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
