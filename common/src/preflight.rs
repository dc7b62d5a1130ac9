//! Preflight (DESIGN §4): facts gathered on each side, judged by a pure function that says, for
//! every check, what is wrong and how to fix it. Nothing here changes either host.
//!
//! ```text
//!   source agent: SQL ─► SourceFacts ─┐
//!                                     ├─► evaluate() ─► [Check { name, ok, detail, fix }]
//!   target agent: fs, pg_ctl ─► TargetFacts ┘
//! ```

use serde::{Deserialize, Serialize};

/// What the source agent reports about its cluster (typed; no SQL crosses the network).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFacts {
    /// `server_version_num`, e.g. 150018.
    pub server_version_num: u32,
    /// `wal_level`: `minimal`, `replica` or `logical`.
    pub wal_level: String,
    pub max_wal_senders: u32,
    /// WAL senders in use now.
    pub wal_senders_used: u32,
    pub max_replication_slots: u32,
    /// Replication slots that exist now.
    pub replication_slots_used: u32,
    /// Whether the role the source agent connects as may replicate (`rolreplication` or superuser).
    pub replication_role: bool,
    /// Whether `pg_hba.conf` has a `replication` line for 127.0.0.1 (where the source agent
    /// connects from); `None` when `pg_hba_file_rules` cannot be read.
    pub hba_replication_from_loopback: Option<bool>,
    /// Size of all databases (bytes): what the base backup will copy, roughly.
    pub database_bytes: u64,
    /// Whether the source is itself a standby.
    pub in_recovery: bool,
    /// Source clock, ms since the epoch, when the facts were taken.
    pub now_ms: u64,
}

/// What the target agent knows about its own host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFacts {
    /// Major version of the target's PostgreSQL binaries (e.g. 15).
    pub major_version: u32,
    pub data_dir: String,
    /// `None` when the directory does not exist (it will be created), else whether it is empty.
    pub data_dir_empty: Option<bool>,
    /// Free bytes on the file system that will hold the data directory.
    pub free_bytes: u64,
    /// Target clock, ms since the epoch, when the source facts arrived.
    pub now_ms: u64,
    /// Round trip of the facts request (ms): the skew estimate is only as good as half of it.
    pub round_trip_ms: u64,
}

/// One preflight check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short stable name (`wal_level`, `free_disk`, …).
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to change, and where (empty when ok).
    pub fix: String,
}

/// Free space wanted beyond the database size: WAL written during the copy, and room to run.
pub const DISK_HEADROOM_PERCENT: u64 = 20;
/// Clock skew tolerated between the hosts. Lag in seconds and the downtime report compare times
/// from both ends; beyond this they mislead.
pub const MAX_CLOCK_SKEW_MS: u64 = 2_000;

/// Judges the facts; every check is reported, passing or not.
pub fn evaluate(s: &SourceFacts, t: &TargetFacts) -> Vec<Check> {
    let mut out = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String, fix: String| {
        out.push(Check {
            name: name.into(),
            ok,
            detail,
            fix: if ok { String::new() } else { fix },
        })
    };
    let source_major = s.server_version_num / 10_000;
    check(
        "major_version",
        source_major == t.major_version,
        format!("source PostgreSQL {source_major}, target binaries {}", t.major_version),
        format!(
            "physical replication needs the same major version: install PostgreSQL {source_major} on the target and set its bindir"
        ),
    );
    check(
        "wal_level",
        s.wal_level == "replica" || s.wal_level == "logical",
        format!("wal_level = {}", s.wal_level),
        "set wal_level = replica in the source's postgresql.conf (ALTER SYSTEM SET wal_level = replica) and restart the source".into(),
    );
    // pg_basebackup -X stream uses two WAL senders, the standby one more (they overlap only if
    // the standby starts before the backup's stream ends, which we avoid): need 2 free.
    let free_senders = s.max_wal_senders.saturating_sub(s.wal_senders_used);
    check(
        "max_wal_senders",
        free_senders >= 2,
        format!(
            "max_wal_senders = {}, {} in use",
            s.max_wal_senders, s.wal_senders_used
        ),
        format!(
            "need 2 free WAL senders: set max_wal_senders = {} (or more) in the source's postgresql.conf and restart",
            s.wal_senders_used + 2
        ),
    );
    let free_slots = s
        .max_replication_slots
        .saturating_sub(s.replication_slots_used);
    check(
        "max_replication_slots",
        free_slots >= 1,
        format!(
            "max_replication_slots = {}, {} exist",
            s.max_replication_slots, s.replication_slots_used
        ),
        format!(
            "need 1 free slot: set max_replication_slots = {} in the source's postgresql.conf and restart, or drop an unused slot (SELECT pg_drop_replication_slot(name))",
            s.replication_slots_used + 1
        ),
    );
    check(
        "replication_role",
        s.replication_role,
        format!(
            "the source agent's role {} replicate",
            if s.replication_role { "may" } else { "may not" }
        ),
        "grant it: ALTER ROLE <role> REPLICATION (on the source)".into(),
    );
    match s.hba_replication_from_loopback {
        Some(ok) => check(
            "pg_hba_replication",
            ok,
            format!(
                "pg_hba.conf {} replication connections from 127.0.0.1",
                if ok { "allows" } else { "does not allow" }
            ),
            "add `host replication <role> 127.0.0.1/32 scram-sha-256` to the source's pg_hba.conf and reload (SELECT pg_reload_conf())".into(),
        ),
        None => check(
            "pg_hba_replication",
            true,
            "pg_hba_file_rules not readable by the agent's role; the base backup will tell".into(),
            String::new(),
        ),
    }
    check(
        "source_primary",
        !s.in_recovery,
        format!(
            "source is {}",
            if s.in_recovery {
                "a standby"
            } else {
                "a primary"
            }
        ),
        "migrate from the primary: point the source agent at it".into(),
    );
    match t.data_dir_empty {
        Some(false) => check(
            "target_data_dir",
            false,
            format!("{} is not empty", t.data_dir),
            format!(
                "move or remove the contents of {} (pgferry never overwrites a data directory)",
                t.data_dir
            ),
        ),
        other => check(
            "target_data_dir",
            true,
            format!(
                "{} {}",
                t.data_dir,
                if other.is_none() {
                    "does not exist yet (will be created)"
                } else {
                    "is empty"
                }
            ),
            String::new(),
        ),
    }
    let need = s.database_bytes + s.database_bytes * DISK_HEADROOM_PERCENT / 100;
    check(
        "free_disk",
        t.free_bytes >= need,
        format!(
            "{} free for {}, databases total {}",
            human(t.free_bytes),
            t.data_dir,
            human(s.database_bytes)
        ),
        format!(
            "free at least {} on the file system of {} (databases + {DISK_HEADROOM_PERCENT} % for WAL)",
            human(need),
            t.data_dir
        ),
    );
    let skew = s.now_ms.abs_diff(t.now_ms);
    let uncertainty = t.round_trip_ms / 2;
    check(
        "clock_skew",
        skew <= MAX_CLOCK_SKEW_MS + uncertainty,
        format!("clocks differ by about {skew} ms (± {uncertainty} ms)"),
        "synchronise both hosts with NTP (e.g. systemctl enable --now systemd-timesyncd or chrony)"
            .into(),
    );
    out
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> (SourceFacts, TargetFacts) {
        (
            SourceFacts {
                server_version_num: 150018,
                wal_level: "replica".into(),
                max_wal_senders: 10,
                wal_senders_used: 0,
                max_replication_slots: 10,
                replication_slots_used: 0,
                replication_role: true,
                hba_replication_from_loopback: Some(true),
                database_bytes: 10 << 30,
                in_recovery: false,
                now_ms: 1_000_000,
            },
            TargetFacts {
                major_version: 15,
                data_dir: "/var/lib/postgresql/15/main".into(),
                data_dir_empty: Some(true),
                free_bytes: 100 << 30,
                now_ms: 1_000_300,
                round_trip_ms: 4,
            },
        )
    }

    fn failing(s: &SourceFacts, t: &TargetFacts) -> Vec<String> {
        evaluate(s, t)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_good_pair_passes_every_check() {
        let (s, t) = good();
        let checks = evaluate(&s, &t);
        assert!(checks.len() >= 9);
        assert!(
            checks.iter().all(|c| c.ok && c.fix.is_empty()),
            "{checks:?}"
        );
    }

    #[test]
    fn each_problem_is_named_with_a_fix() {
        let (s0, t0) = good();
        type Case = (
            &'static str,
            fn(&mut SourceFacts, &mut TargetFacts),
            &'static str,
        );
        let cases: [Case; 10] = [
            (
                "major_version",
                |_, t| t.major_version = 16,
                "PostgreSQL 15",
            ),
            (
                "wal_level",
                |s, _| s.wal_level = "minimal".into(),
                "wal_level = replica",
            ),
            (
                "max_wal_senders",
                |s, _| s.wal_senders_used = 9,
                "max_wal_senders = 11",
            ),
            (
                "max_replication_slots",
                |s, _| s.replication_slots_used = 10,
                "pg_drop_replication_slot",
            ),
            (
                "replication_role",
                |s, _| s.replication_role = false,
                "REPLICATION",
            ),
            (
                "pg_hba_replication",
                |s, _| s.hba_replication_from_loopback = Some(false),
                "pg_hba.conf",
            ),
            ("source_primary", |s, _| s.in_recovery = true, "primary"),
            (
                "target_data_dir",
                |_, t| t.data_dir_empty = Some(false),
                "never overwrites",
            ),
            ("free_disk", |_, t| t.free_bytes = 11 << 30, "12.0 GiB"),
            ("clock_skew", |_, t| t.now_ms = 1_009_000, "NTP"),
        ];
        for (name, break_it, fix_mentions) in cases {
            let (mut s, mut t) = (s0.clone(), t0.clone());
            break_it(&mut s, &mut t);
            assert_eq!(failing(&s, &t), vec![name.to_string()]);
            let c = evaluate(&s, &t)
                .into_iter()
                .find(|c| c.name == name)
                .unwrap();
            assert!(c.fix.contains(fix_mentions), "{name}: {}", c.fix);
        }
    }

    #[test]
    fn round_trip_widens_the_skew_tolerance() {
        let (s, mut t) = good();
        t.now_ms = s.now_ms + 2_500;
        assert_eq!(failing(&s, &t), vec!["clock_skew".to_string()]);
        t.round_trip_ms = 1_200;
        assert!(failing(&s, &t).is_empty());
    }
}
