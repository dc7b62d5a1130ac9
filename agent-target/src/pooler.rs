//! A PgBouncer in front of the old cluster, switched at cutover so that its clients see one
//! pause instead of errors.
//!
//! ```text
//!   cutover start ── check: the admin console answers, every database of the file is known
//!                    to it, the file can be replaced                    (refused otherwise)
//!   before fence ─── PAUSE each database (transactions in flight end; bounded) ── clients wait
//!   fence … promote  (unchanged; a failure before promotion unfences, then RESUME: the clients
//!                    go on against the old cluster)
//!   after promotion ─ the databases file rewritten (host/port of the new primary, every other
//!                    parameter kept), RELOAD, RESUME each database ── clients go on, on the new one
//! ```
//!
//! PgBouncer's `[databases]` cannot be changed from its admin console, so the databases that
//! point at the old cluster live in a file of their own that `pgbouncer.ini` includes
//! (`%include /etc/pgbouncer/pgferry-databases.ini`); the agent replaces that file atomically
//! (same owner and mode; the original kept beside it as `.pgferry-orig`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio_postgres::{Client, SimpleQueryMessage};

pub use pgferry_common::admin::{PoolerReport, SwitchedEntry};

/// `[target.pgbouncer]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBouncerSection {
    /// PgBouncer's admin console as a connection string, e.g.
    /// `host=127.0.0.1 port=6432 user=pgbouncer` (dbname defaults to `pgbouncer`).
    pub admin: Option<String>,
    /// File with the admin user's password (first line; mode 0600; never logged).
    pub password_file: Option<PathBuf>,
    /// The `[databases]` file PgBouncer includes, whose entries point at the old cluster.
    pub databases_file: Option<PathBuf>,
    /// The host PgBouncer reaches the new primary at (default: the first non-loopback
    /// `[target] listen_addresses`, else `localhost`).
    pub new_host: Option<String>,
    /// Longest wait for PAUSE, i.e. for the transactions in flight to end (default 10 s).
    pub pause_timeout_secs: Option<u64>,
}

/// The PgBouncer settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBouncer {
    pub admin: String,
    pub password_file: Option<PathBuf>,
    pub databases_file: PathBuf,
    pub new_host: Option<String>,
    pub pause_timeout: Duration,
}

/// Default longest wait for PAUSE.
pub const DEFAULT_PAUSE_TIMEOUT_SECS: u64 = 10;

impl PgBouncerSection {
    /// The settings, or why not (naming the key).
    pub fn resolve(self) -> Result<PgBouncer> {
        let admin = self
            .admin
            .context("[target.pgbouncer] needs admin = \"host=… port=6432 user=pgbouncer\" (PgBouncer's admin console)")?;
        admin.parse::<tokio_postgres::Config>().with_context(|| {
            format!(
                "[target.pgbouncer] admin {:?}: not a connection string",
                redact(&admin)
            )
        })?;
        let databases_file = self.databases_file.context(
            "[target.pgbouncer] needs databases_file: the [databases] file pgbouncer.ini includes (%include), whose entries pgferry points at the new primary",
        )?;
        let text = std::fs::read_to_string(&databases_file).with_context(|| {
            format!(
                "[target.pgbouncer] databases_file {}: cannot read it",
                databases_file.display()
            )
        })?;
        DatabasesFile::parse(&text).with_context(|| {
            format!(
                "[target.pgbouncer] databases_file {}",
                databases_file.display()
            )
        })?;
        if let Some(h) = &self.new_host {
            check_host(h).context("[target.pgbouncer] new_host")?;
        }
        Ok(PgBouncer {
            admin,
            password_file: self.password_file,
            databases_file,
            new_host: self.new_host,
            pause_timeout: Duration::from_secs(
                self.pause_timeout_secs
                    .unwrap_or(DEFAULT_PAUSE_TIMEOUT_SECS)
                    .max(1),
            ),
        })
    }
}

fn check_host(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_' | '/'));
    if !ok {
        bail!("{h:?}: give a host name, an address or a socket directory");
    }
    Ok(())
}

/// A connection string with its password (if any) replaced by `***`.
pub fn redact(conninfo: &str) -> String {
    tokens(conninfo)
        .map(|ts| {
            ts.iter()
                .map(|(k, v)| {
                    if k == "password" {
                        format!("{k}=***")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "(unparsable connection string)".into())
}

/// `key=value` pairs of a libpq-style connection string, each value as written (quotes and
/// escapes kept).
fn tokens(s: &str) -> Result<Vec<(String, String)>> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            return Ok(out);
        }
        let k0 = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        let key = &s[k0..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if key.is_empty() || i == b.len() || b[i] != b'=' {
            bail!("expected key=value at byte {k0}");
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let v0 = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => bail!("unterminated quote at byte {v0}"),
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            i = i.min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        out.push((key.to_ascii_lowercase(), s[v0..i].to_string()));
    }
}

/// One line of the databases file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A comment, a blank line or the `[databases]` header, kept as written.
    Verbatim(String),
    /// `name = connection string`.
    Entry { name: String, conninfo: String },
}

/// PgBouncer's `[databases]` file as pgferry reads and rewrites it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabasesFile {
    lines: Vec<Line>,
}

impl DatabasesFile {
    /// Parses the file; errors name the line.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let t = raw.trim();
            let line_no = n + 1;
            if t.is_empty() || t.starts_with(';') || t.starts_with('#') {
                lines.push(Line::Verbatim(raw.to_string()));
            } else if t.starts_with('[') {
                if !t.eq_ignore_ascii_case("[databases]") {
                    bail!("line {line_no}: {t}: this file holds only [databases] entries (keep other sections in pgbouncer.ini)");
                }
                lines.push(Line::Verbatim(raw.to_string()));
            } else if t.starts_with('%') {
                bail!(
                    "line {line_no}: {t}: no %include inside the databases file pgferry rewrites"
                );
            } else {
                let Some((name, conninfo)) = t.split_once('=') else {
                    bail!("line {line_no}: expected `name = host=… port=… dbname=…`");
                };
                let name = name.trim();
                if name == "*" {
                    bail!("line {line_no}: the fallback database `*` cannot be paused by name; list each database");
                }
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                {
                    bail!("line {line_no}: database name {name:?}: use letters, digits, _ - .");
                }
                tokens(conninfo).with_context(|| format!("line {line_no}: database {name}"))?;
                lines.push(Line::Entry {
                    name: name.to_string(),
                    conninfo: conninfo.trim().to_string(),
                });
            }
        }
        let file = DatabasesFile { lines };
        if file.databases().is_empty() {
            bail!("no database entries (expected lines such as `appdb = host=10.0.0.4 port=5432 dbname=appdb`)");
        }
        Ok(file)
    }

    /// The databases, in file order.
    pub fn databases(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Entry { name, .. } => Some(name.clone()),
                Line::Verbatim(_) => None,
            })
            .collect()
    }

    /// Every entry pointed at `host`/`port`, every other parameter kept as written.
    pub fn switched(&self, host: &str, port: u16) -> (DatabasesFile, Vec<SwitchedEntry>) {
        let mut changes = Vec::new();
        let lines = self
            .lines
            .iter()
            .map(|l| match l {
                Line::Verbatim(_) => l.clone(),
                Line::Entry { name, conninfo } => {
                    let mut ts = tokens(conninfo).unwrap_or_default();
                    ts.retain(|(k, _)| k != "host" && k != "port");
                    ts.insert(0, ("port".into(), port.to_string()));
                    ts.insert(0, ("host".into(), host.to_string()));
                    let after = ts
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    changes.push(SwitchedEntry {
                        database: name.clone(),
                        before: redact(conninfo),
                        after: redact(&after),
                    });
                    Line::Entry {
                        name: name.clone(),
                        conninfo: after,
                    }
                }
            })
            .collect();
        (DatabasesFile { lines }, changes)
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            match l {
                Line::Verbatim(t) => out.push_str(t),
                Line::Entry { name, conninfo } => {
                    out.push_str(name);
                    out.push_str(" = ");
                    out.push_str(conninfo);
                }
            }
            out.push('\n');
        }
        out
    }
}

impl PgBouncer {
    /// The databases file as it is now.
    pub fn read_file(&self) -> Result<DatabasesFile> {
        let text = std::fs::read_to_string(&self.databases_file)
            .with_context(|| format!("reading {}", self.databases_file.display()))?;
        DatabasesFile::parse(&text).with_context(|| self.databases_file.display().to_string())
    }

    /// A connection to the admin console.
    async fn connect(&self) -> Result<Client> {
        let mut cfg: tokio_postgres::Config = self.admin.parse()?;
        if cfg.get_dbname().is_none() {
            cfg.dbname("pgbouncer");
        }
        if cfg.get_user().is_none() {
            cfg.user("pgbouncer");
        }
        if let Some(p) = &self.password_file {
            cfg.password(pgferry_common::runtime::config::read_password_file(p)?);
        }
        cfg.connect_timeout(Duration::from_secs(5));
        let (client, conn) =
            tokio::time::timeout(Duration::from_secs(10), cfg.connect(tokio_postgres::NoTls))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
                .with_context(|| {
                    format!(
                        "connecting to PgBouncer's admin console ({})",
                        redact(&self.admin)
                    )
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Before anything changes: the console answers, it knows every database of the file, and
    /// the file can be replaced. Returns the databases.
    pub async fn check(&self) -> Result<Vec<String>> {
        let file = self.read_file()?;
        let dir = self
            .databases_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let probe = dir.join(format!(".pgferry-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").with_context(|| {
            format!(
                "{}: pgferry must be able to replace this file at cutover (cannot write in {})",
                self.databases_file.display(),
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        let c = self.connect().await?;
        let rows = c
            .simple_query("SHOW DATABASES")
            .await
            .context("SHOW DATABASES on PgBouncer's admin console")?;
        let known: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get("name").map(str::to_string),
                _ => None,
            })
            .collect();
        let dbs = file.databases();
        let missing: Vec<&String> = dbs.iter().filter(|d| !known.contains(d)).collect();
        if !missing.is_empty() {
            bail!(
                "PgBouncer does not know database(s) {missing:?} of {}: is the file included in pgbouncer.ini (%include) and reloaded?",
                self.databases_file.display()
            );
        }
        Ok(dbs)
    }

    /// PAUSE each database: PgBouncer lets the transactions in flight end, closes its server
    /// connections, and holds new queries. Bounded by the pause timeout; on failure every
    /// database is resumed and the error says why (nothing else was changed).
    pub async fn pause(&self, dbs: &[String]) -> Result<Duration> {
        let t = Instant::now();
        let result = async {
            let c = self.connect().await?;
            for db in dbs {
                let left = self.pause_timeout.saturating_sub(t.elapsed());
                match tokio::time::timeout(left, c.simple_query(&format!("PAUSE {db}"))).await {
                    Err(_) => bail!(
                        "PgBouncer could not pause {db} within {} s: transactions (or, with pool_mode = session, client sessions) still hold its server connections; use pool_mode = transaction or a larger pause_timeout_secs",
                        self.pause_timeout.as_secs()
                    ),
                    Ok(Err(e)) if e.to_string().contains("already") => {}
                    Ok(Err(e)) => return Err(anyhow::Error::new(e).context(format!("PAUSE {db}"))),
                    Ok(Ok(_)) => {}
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = self.resume(dbs).await;
            return Err(e.context("PgBouncer was resumed; nothing was fenced"));
        }
        Ok(t.elapsed())
    }

    /// RESUME each database (one not paused is fine).
    pub async fn resume(&self, dbs: &[String]) -> Result<()> {
        let c = self.connect().await?;
        for db in dbs {
            match c.simple_query(&format!("RESUME {db}")).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not paused") => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("RESUME {db}"))),
            }
        }
        Ok(())
    }

    /// Points every entry of the databases file at `host`/`port` (atomically, same owner and
    /// mode, the original kept as `.pgferry-orig` once), then RELOAD.
    pub async fn switch(&self, host: &str, port: u16) -> Result<Vec<SwitchedEntry>> {
        let host = self.new_host.as_deref().unwrap_or(host);
        let (new, changes) = self.read_file()?.switched(host, port);
        replace_file(&self.databases_file, new.render().as_bytes())?;
        let c = self.connect().await?;
        c.simple_query("RELOAD")
            .await
            .context("RELOAD on PgBouncer's admin console")?;
        Ok(changes)
    }
}

/// Replaces `path` with `bytes`: a temporary file beside it with the same owner and mode,
/// fsynced, renamed over it, the directory fsynced. The first original is kept as
/// `<path>.pgferry-orig`.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let name = path.file_name().context("the databases file has no name")?;
    let orig = path.with_file_name(format!("{}.pgferry-orig", name.to_string_lossy()));
    if !orig.exists() {
        std::fs::copy(path, &orig).with_context(|| format!("keeping {}", orig.display()))?;
    }
    let tmp = path.with_file_name(format!(".{}.pgferry-tmp", name.to_string_lossy()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))
        .with_context(|| format!("giving {} its owner back", tmp.display()))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "; the old cluster\n[databases]\nappdb = host=10.0.0.4 port=5432 dbname=app pool_size=20 password='se cr\\'et'\nreports=dbname=rep host=10.0.0.4\n";

    #[test]
    fn switching_keeps_everything_but_host_and_port() {
        let f = DatabasesFile::parse(FILE).unwrap();
        assert_eq!(f.databases(), ["appdb", "reports"]);
        assert_eq!(f.render().lines().count(), 4);
        let (g, changes) = f.switched("10.0.0.9", 6543);
        let text = g.render();
        assert!(
            text.starts_with("; the old cluster\n[databases]\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "appdb = host=10.0.0.9 port=6543 dbname=app pool_size=20 password='se cr\\'et'\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("reports = host=10.0.0.9 port=6543 dbname=rep\n"),
            "{text}"
        );
        // Parsable again, same databases.
        assert_eq!(
            DatabasesFile::parse(&text).unwrap().databases(),
            f.databases()
        );
        assert_eq!(changes.len(), 2);
        assert!(!format!("{changes:?}").contains("se cr"), "{changes:?}");
        assert!(changes[0].before.contains("password=***"), "{changes:?}");
    }

    #[test]
    fn refuses_what_it_cannot_rewrite_naming_the_line() {
        for (text, needle) in [
            ("[pgbouncer]\nlisten_port = 6432\n", "line 1"),
            ("[databases]\n* = host=a\n", "fallback"),
            ("[databases]\n%include other.ini\n", "%include"),
            ("appdb host=a\n", "line 1"),
            ("a = host='unterminated\n", "quote"),
            ("; nothing\n", "no database"),
            ("a b = host=x\n", "database name"),
        ] {
            let err = format!("{:#}", DatabasesFile::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("host=a password=hunter2 user=u"),
            "host=a password=*** user=u"
        );
        assert_eq!(redact("password='a b' host=h"), "password=*** host=h");
        assert_eq!(
            redact("host='unterminated"),
            "(unparsable connection string)"
        );
    }

    proptest! {
        /// Whatever the values, a switched file parses back to the same databases, with the
        /// new host and port, and no other value changed.
        #[test]
        fn switched_files_parse_back(
            vals in proptest::collection::vec("[a-z0-9_ ']{0,12}", 1..5),
            port in 1u16..,
        ) {
            let mut text = String::from("[databases]\n");
            for (i, v) in vals.iter().enumerate() {
                let quoted = format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
                text.push_str(&format!("db{i} = host=old port=1 application_name={quoted}\n"));
            }
            let f = DatabasesFile::parse(&text).unwrap();
            let (g, _) = f.switched("new.host", port);
            let back = DatabasesFile::parse(&g.render()).unwrap();
            prop_assert_eq!(back.databases(), f.databases());
            for (l, v) in back.lines.iter().filter_map(|l| match l {
                Line::Entry { conninfo, .. } => Some(conninfo),
                _ => None,
            }).zip(&vals) {
                let ts = tokens(l).unwrap();
                let port_s = port.to_string();
                prop_assert_eq!(&ts[0], &("host".to_string(), "new.host".to_string()));
                prop_assert_eq!(&ts[1], &("port".to_string(), port_s));
                let quoted = format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
                prop_assert_eq!(&ts[2], &("application_name".to_string(), quoted));
            }
        }
    }
}
