//! The source's side of an agent-owned base copy: the data directory as it is on disk, for
//! [`pgferry_common::backup::plan`] to decide what is copied.

use std::path::Path;

use anyhow::{bail, Context, Result};

use pgferry_common::backup::Found;

/// Every directory and regular file under `data_dir`, with paths relative to it. A symlinked
/// `pg_wal` counts as a directory (its contents are never copied); tablespaces (symlinks in
/// `pg_tblspc`) are refused for now; files that vanish while walking (a dropped relation) are
/// skipped.
pub fn walk(data_dir: &Path) -> Result<Vec<Found>> {
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
            if meta.file_type().is_symlink() {
                if path == "pg_wal" {
                    out.push(Found {
                        path,
                        is_dir: true,
                        size: 0,
                    });
                    continue;
                }
                bail!(
                    "{}: a symlink (a tablespace?): the agent copy does not handle tablespaces yet; use --copy-method pg_basebackup",
                    entry.path().display()
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
    Ok(out)
}
