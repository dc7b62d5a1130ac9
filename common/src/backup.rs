//! What an agent-owned base backup copies, and the `backup_manifest` that lets PostgreSQL's
//! own `pg_verifybackup` check the copy (issue 14's copy method; this is its pure core).
//!
//! ```text
//!   source: pg_backup_start ─► walk the data directory ─► plan (PostgreSQL's exclusions)
//!           ─► files sent ─► pg_backup_stop ─► backup_label (+ tablespace_map)
//!   target: files written, each SHA-256'd as written ─► backup_manifest ─► pg_verifybackup -n
//! ```
//!
//! The exclusions are those of PostgreSQL 15's own base backup (`basebackup.c`): the contents
//! of `pg_wal` (the standby streams WAL through the replication slot instead) and of the
//! directories PostgreSQL empties at start (`pg_dynshmem`, `pg_notify`, `pg_serial`,
//! `pg_snapshots`, `pg_stat_tmp`, `pg_subtrans`, `pg_replslot`), the files a running server
//! owns (`postmaster.pid`, `postmaster.opts`, `pg_internal.init`, temporary files), a stale
//! `backup_label`/`tablespace_map`/`backup_manifest`, temporary relations, and every fork but
//! `_init` of unlogged relations (they restart empty).
//!
//! The manifest is PostgreSQL's format, version 1: one line per file (path, size, time,
//! SHA-256), the WAL range the copy needs, then the SHA-256 of everything before the last line.
//! The copy carries no WAL (`pg_wal` stays empty), so it is checked with
//! `pg_verifybackup --no-parse-wal`; the WAL range is replayed from the slot by the standby.

use std::collections::BTreeSet;

use crate::migration::Lsn;

/// Directories whose contents a base backup leaves out (the directory itself is kept).
const EMPTIED_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_replslot",
];

/// Files left out wherever they are.
const EXCLUDED_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "pg_internal.init",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "backup_manifest.tmp",
];

/// Prefix of temporary files and directories (`pgsql_tmp…`).
const TEMP_PREFIX: &str = "pgsql_tmp";

/// One entry found in the data directory: its path relative to it (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
}

/// What the copy does with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Copied (a directory: created, and its contents considered).
    Copy,
    /// A directory created empty: its contents are left out.
    CreateEmpty,
    /// Left out (with everything under it).
    Skip,
}

/// Why each entry is copied or not, by PostgreSQL's rules (see the module doc).
pub fn disposition(path: &str, is_dir: bool) -> Disposition {
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.starts_with(TEMP_PREFIX) {
        return Disposition::Skip;
    }
    if is_dir {
        if EMPTIED_DIRS.contains(&path) {
            return Disposition::CreateEmpty;
        }
        return Disposition::Copy;
    }
    if EXCLUDED_FILES.contains(&name) {
        return Disposition::Skip;
    }
    if in_database_dir(path) && is_temp_relation(name) {
        return Disposition::Skip;
    }
    Disposition::Copy
}

/// `base/<oid>/…` or `pg_tblspc/<oid>/<version>/<oid>/…`: where relation files live.
fn in_database_dir(path: &str) -> bool {
    path.starts_with("base/") || path.starts_with("pg_tblspc/")
}

/// `t<backend>_<relfilenode>` (and its forks and segments): a temporary relation.
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, file)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty()
        && backend.bytes().all(|b| b.is_ascii_digit())
        && file.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// `<relfilenode>[_fork][.segment]` → (relfilenode, fork).
fn relation_file(name: &str) -> Option<(&str, &str)> {
    let base = name.split('.').next()?;
    let (node, fork) = base.split_once('_').unwrap_or((base, ""));
    (!node.is_empty() && node.bytes().all(|b| b.is_ascii_digit())).then_some((node, fork))
}

/// The entries to create or copy, in order (directories before what they hold, and
/// `global/pg_control` last, as PostgreSQL sends it), from everything found.
pub fn plan(found: &[Found]) -> Vec<(Found, Disposition)> {
    // Unlogged relations: an `_init` fork marks them; their other forks are left out.
    let unlogged: BTreeSet<(String, String)> = found
        .iter()
        .filter(|f| !f.is_dir && in_database_dir(&f.path))
        .filter_map(|f| {
            let (dir, name) = f.path.rsplit_once('/')?;
            match relation_file(name)? {
                (node, "init") => Some((dir.to_string(), node.to_string())),
                _ => None,
            }
        })
        .collect();
    let mut skipped_dirs: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut sorted: Vec<&Found> = found.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in sorted {
        if skipped_dirs.iter().any(|d| {
            f.path.starts_with(d.as_str()) && f.path.as_bytes().get(d.len()) == Some(&b'/')
        }) {
            continue;
        }
        let mut d = disposition(&f.path, f.is_dir);
        if d == Disposition::Copy && !f.is_dir && in_database_dir(&f.path) {
            if let Some((dir, name)) = f.path.rsplit_once('/') {
                if let Some((node, fork)) = relation_file(name) {
                    if fork != "init" && unlogged.contains(&(dir.to_string(), node.to_string())) {
                        d = Disposition::Skip;
                    }
                }
            }
        }
        if d != Disposition::Copy && f.is_dir {
            skipped_dirs.push(f.path.clone());
        }
        if d != Disposition::Skip {
            out.push((f.clone(), d));
        }
    }
    // pg_control last.
    if let Some(i) = out.iter().position(|(f, _)| f.path == "global/pg_control") {
        let c = out.remove(i);
        out.push(c);
    }
    out
}

/// One copied file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub size: u64,
    /// Seconds since the epoch (informational; `pg_verifybackup` does not check it).
    pub modified: i64,
    pub sha256: [u8; 32],
}

/// The WAL a copy needs: from the backup's start to its end, on one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
}

/// PostgreSQL's `backup_manifest` (version 1) for `files`, ending with the SHA-256 of all the
/// lines before its last.
pub fn backup_manifest(files: &[ManifestFile], wal: WalRange) -> String {
    let mut m = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, f) in files.iter().enumerate() {
        let time = time::OffsetDateTime::from_unix_timestamp(f.modified)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let fmt =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] GMT");
        m.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{}\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{}\" }}{}\n",
            serde_json::Value::String(f.path.clone()),
            f.size,
            time.format(&fmt).unwrap_or_default(),
            hex(&f.sha256),
            if i + 1 < files.len() { "," } else { "" }
        ));
    }
    m.push_str(&format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        wal.timeline, wal.start, wal.end
    ));
    let sum = ring::digest::digest(&ring::digest::SHA256, m.as_bytes());
    m.push_str(&format!(
        "\"Manifest-Checksum\": \"{}\"}}\n",
        hex(sum.as_ref())
    ));
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `START TIMELINE: n` of a `backup_label`.
pub fn label_timeline(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE: "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(path: &str, is_dir: bool) -> Found {
        Found {
            path: path.into(),
            is_dir,
            size: 0,
        }
    }

    #[test]
    fn the_plan_follows_postgresqls_exclusions() {
        let all = [
            found("PG_VERSION", false),
            found("postmaster.pid", false),
            found("postmaster.opts", false),
            found("backup_label", false),
            found("postgresql.auto.conf", false),
            found("postgresql.auto.conf.tmp", false),
            found("global", true),
            found("global/pg_control", false),
            found("global/1262", false),
            found("global/pg_internal.init", false),
            found("pg_wal", true),
            found("pg_wal/000000010000000000000001", false),
            found("pg_wal/archive_status", true),
            found("pg_stat_tmp", true),
            found("pg_stat_tmp/x.stat", false),
            found("pg_replslot", true),
            found("pg_replslot/pgferry_m", true),
            found("pg_replslot/pgferry_m/state", false),
            found("base", true),
            found("base/5", true),
            found("base/5/16384", false),
            found("base/5/16384.1", false),
            found("base/5/16384_fsm", false),
            found("base/5/16390", false),
            found("base/5/16390_init", false),
            found("base/5/16390_fsm", false),
            found("base/5/16390.2", false),
            found("base/5/t3_16400", false),
            found("base/5/t3_16400_fsm", false),
            found("base/5/pg_internal.init", false),
            found("base/pgsql_tmp", true),
            found("base/pgsql_tmp/pgsql_tmp123.0", false),
            found("log", true),
            found("log/postgresql.log", false),
        ];
        let p = plan(&all);
        let copied: Vec<(&str, Disposition)> =
            p.iter().map(|(f, d)| (f.path.as_str(), *d)).collect();
        use Disposition::*;
        assert_eq!(
            copied,
            [
                ("PG_VERSION", Copy),
                ("base", Copy),
                ("base/5", Copy),
                ("base/5/16384", Copy),
                ("base/5/16384.1", Copy),
                ("base/5/16384_fsm", Copy),
                ("base/5/16390_init", Copy),
                ("global", Copy),
                ("global/1262", Copy),
                ("log", Copy),
                ("log/postgresql.log", Copy),
                ("pg_replslot", CreateEmpty),
                ("pg_stat_tmp", CreateEmpty),
                ("pg_wal", CreateEmpty),
                ("postgresql.auto.conf", Copy),
                ("global/pg_control", Copy),
            ]
        );
    }

    #[test]
    fn temp_relations_and_relation_files_are_recognised() {
        assert!(is_temp_relation("t3_16400"));
        assert!(is_temp_relation("t12_16400_vm"));
        assert!(!is_temp_relation("t_16400"));
        assert!(!is_temp_relation("16400"));
        assert!(!is_temp_relation("tablespace_map"));
        assert_eq!(relation_file("16390_init"), Some(("16390", "init")));
        assert_eq!(relation_file("16390.12"), Some(("16390", "")));
        assert_eq!(relation_file("PG_VERSION"), None);
    }

    #[test]
    fn the_manifest_checksum_covers_every_line_before_the_last() {
        let files = [ManifestFile {
            path: "base/1/1259".into(),
            size: 8192,
            modified: 1_700_000_000,
            sha256: [0xab; 32],
        }];
        let wal = WalRange {
            timeline: 1,
            start: "0/2000028".parse().unwrap(),
            end: "0/2000100".parse().unwrap(),
        };
        let m = backup_manifest(&files, wal);
        assert!(m.ends_with("\"}\n"));
        let body_end = m[..m.len() - 1].rfind('\n').unwrap() + 1;
        let sum = ring::digest::digest(&ring::digest::SHA256, &m.as_bytes()[..body_end]);
        assert!(m[body_end..].contains(&hex(sum.as_ref())), "{m}");
        // Valid JSON, with the fields pg_verifybackup reads.
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["Files"][0]["Path"], "base/1/1259");
        assert_eq!(v["Files"][0]["Last-Modified"], "2023-11-14 22:13:20 GMT");
        assert_eq!(v["WAL-Ranges"][0]["Start-LSN"], "0/2000028");
        assert_eq!(
            label_timeline("START WAL LOCATION: 0/2\nSTART TIMELINE: 3\n"),
            Some(3)
        );
    }
}
