//! Persisting the migration [`State`] before each step's side effects (DESIGN §4).
//!
//! The file is JSON `{"format": 1, "migration": "...", "updated_at_ms": …, "state": {…}}`,
//! written to a temporary file in the same directory, fsynced, renamed over the old one, and
//! the directory fsynced: after a crash the file holds either the old or the new state, never
//! half of one.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use pgferry_common::migration::State;

/// Version of the state file layout (2 added `history`; files of format 1 are still read).
pub const STATE_FORMAT: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    migration: String,
    updated_at_ms: u64,
    state: State,
    /// When each phase was entered, oldest first (for the final report's timeline).
    #[serde(default)]
    history: Vec<PhaseMark>,
}

/// A phase and when the migration entered it (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseMark {
    pub phase: String,
    pub at_ms: u64,
}

/// Most phase marks kept (a migration passes ~15 phases; resumes do not add marks).
const MAX_HISTORY: usize = 64;

/// Where a migration's state lives.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
    migration: String,
}

impl StateStore {
    pub fn new(path: impl Into<PathBuf>, migration: &str) -> Self {
        Self {
            path: path.into(),
            migration: migration.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted state, or `New` when there is no file yet.
    pub fn load(&self) -> Result<State> {
        Ok(self.load_file()?.map_or(State::New, |f| f.state))
    }

    /// When each phase was entered, oldest first.
    pub fn history(&self) -> Result<Vec<PhaseMark>> {
        Ok(self.load_file()?.map(|f| f.history).unwrap_or_default())
    }

    fn load_file(&self) -> Result<Option<StateFile>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let f: StateFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a pgferry state file (edited by hand?); move it aside to start over",
                self.path.display()
            )
        })?;
        if f.format != STATE_FORMAT && f.format != 1 {
            bail!(
                "{} has state format {}, this build reads {STATE_FORMAT}",
                self.path.display(),
                f.format
            );
        }
        if f.migration != self.migration {
            bail!(
                "{} belongs to migration {:?}, not {:?}",
                self.path.display(),
                f.migration,
                self.migration
            );
        }
        Ok(Some(f))
    }

    /// Atomically replaces the persisted state.
    pub fn save(&self, state: &State, now_ms: u64) -> Result<()> {
        let mut history = self.history().unwrap_or_default();
        if history.last().is_none_or(|m| m.phase != state.phase()) {
            if history.is_empty() && !matches!(state, State::New) {
                // The first step's start: the file is first written after it.
                history.push(PhaseMark {
                    phase: State::New.phase().into(),
                    at_ms: now_ms,
                });
            }
            history.push(PhaseMark {
                phase: state.phase().into(),
                at_ms: now_ms,
            });
            if history.len() > MAX_HISTORY {
                history.drain(..history.len() - MAX_HISTORY);
            }
        }
        let body = serde_json::to_vec_pretty(&StateFile {
            format: STATE_FORMAT,
            migration: self.migration.clone(),
            updated_at_ms: now_ms,
            state: state.clone(),
            history,
        })?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "state".into())
        ));
        let result = (|| -> Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.with_context(|| format!("saving migration state to {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_common::migration::Event;

    #[test]
    fn save_load_round_trip_and_checks() {
        let d = tempfile::tempdir().unwrap();
        let store = StateStore::new(d.path().join("state/m1.json"), "m1");
        assert_eq!(store.load().unwrap(), State::New);
        let s = State::New
            .next(Event::PreflightPassed)
            .unwrap()
            .next(Event::SlotCreated {
                slot: "pgferry_m1".into(),
            })
            .unwrap();
        store.save(&s, 42).unwrap();
        assert_eq!(store.load().unwrap(), s);
        store.save(&s, 43).unwrap();
        let phases: Vec<(String, u64)> = store
            .history()
            .unwrap()
            .into_iter()
            .map(|m| (m.phase, m.at_ms))
            .collect();
        assert_eq!(
            phases,
            [("new".to_string(), 42), ("slot_created".to_string(), 42)],
            "one mark per phase entered"
        );
        let names: Vec<_> = std::fs::read_dir(d.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["m1.json"], "no temporary file left");

        let other = StateStore::new(store.path(), "m2");
        assert!(other.load().unwrap_err().to_string().contains("\"m1\""));
        std::fs::write(store.path(), "{ half").unwrap();
        assert!(store
            .load()
            .unwrap_err()
            .to_string()
            .contains("move it aside"));
    }
}
