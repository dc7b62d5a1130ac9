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
    /// What could defeat the fence or the drain at cutover; `None` from a source agent older
    /// than these checks.
    /// (Boxed: it is most of the size of the control messages that carry it.)
    #[serde(default)]
    pub fence: Option<Box<FenceFacts>>,
    /// Locations of the source's tablespaces (other than `pg_default` and `pg_global`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tablespaces: Vec<String>,
}

/// What the source agent found that bears on the fence (`docs/fence.md`) and the drain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FenceFacts {
    /// Whether the agent's role is a superuser (the fence ends superuser sessions and uses
    /// `ALTER SYSTEM`); `None` when unknown.
    pub superuser: Option<bool>,
    /// `hba_file`, when the role may read it.
    pub hba_file: Option<String>,
    /// Why the source agent could not replace `pg_hba.conf` or `postgresql.auto.conf` (it
    /// writes a copy beside each and renames); `None` when it can.
    pub files_unwritable: Option<String>,
    /// Why a source agent restarted during the fence could not reconnect to unfence; `None`
    /// when it could.
    pub no_reconnect: Option<String>,
    /// `pg_prepared_xacts`.
    pub prepared_transactions: Vec<PreparedTransaction>,
    /// `pg_replication_slots` (all of them: pgferry's own does not exist yet at preflight).
    pub replication_slots: Vec<SlotFact>,
    /// `pg_stat_replication`: WAL senders connected now.
    pub wal_senders: Vec<WalSenderFact>,
    /// `synchronous_standby_names`.
    pub synchronous_standby_names: String,
    /// Client sessions whose transaction has been open longer than [`LONG_TRANSACTION_SECS`].
    pub long_transactions: Vec<LongTransaction>,
    /// Enabled subscriptions: their apply workers commit on the source without a client
    /// connection, which no `pg_hba.conf` can stop.
    pub subscriptions: Vec<String>,
    /// Background workers of extensions (`backend_type`s beyond PostgreSQL's own): they run
    /// inside the server, not through `pg_hba.conf`.
    pub background_workers: Vec<String>,
}

/// A prepared transaction (`pg_prepared_xacts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreparedTransaction {
    pub gid: String,
    pub owner: String,
    pub database: String,
    pub age_secs: u64,
}

/// A replication slot on the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotFact {
    pub name: String,
    /// `physical` or `logical`.
    pub slot_type: String,
    pub active: bool,
    pub database: Option<String>,
    pub plugin: Option<String>,
}

/// A connected WAL sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSenderFact {
    pub application_name: String,
    pub client: String,
    /// The database of a logical replication connection; `None` for physical replication.
    pub database: Option<String>,
    /// `async`, `potential`, `sync` or `quorum`.
    pub sync_state: String,
}

/// A client session with a long-open transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongTransaction {
    pub pid: i32,
    pub user: String,
    pub database: String,
    pub state: String,
    pub age_secs: u64,
}

/// A transaction open this long at preflight is named: the fence would end it.
pub const LONG_TRANSACTION_SECS: u64 = 60;

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
    /// The new cluster's `listen_addresses` (`[target] listen_addresses`); `None`: not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_addresses: Option<String>,
    /// Where each of the source's tablespaces goes here, and whether that directory is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tablespaces: Vec<TablespaceHere>,
}

/// A source tablespace's directory on the target host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceHere {
    /// Its location on the source.
    pub source: String,
    /// Where it goes here (`[target] tablespace_mapping`, else the same path).
    pub here: String,
    /// `None`: absent (it will be created); else whether it is empty.
    pub empty: Option<bool>,
}

/// One preflight check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short stable name (`wal_level`, `free_disk`, …).
    pub name: String,
    pub ok: bool,
    /// Passes, but names something the operator should settle before the cutover (with a fix).
    #[serde(default)]
    pub warning: bool,
    /// What was found.
    pub detail: String,
    /// What to change, and where (empty when ok).
    pub fix: String,
}

/// Whether one `listen_addresses` entry serves this host only.
pub fn is_loopback_listen(address: &str) -> bool {
    matches!(address.trim(), "localhost" | "127.0.0.1" | "::1")
}

/// Whether a cluster with these `listen_addresses` serves this host only (applications
/// elsewhere cannot reach it).
pub fn listens_on_loopback_only(listen_addresses: &str) -> bool {
    listen_addresses
        .split(',')
        .map(str::trim)
        .all(|a| a.is_empty() || is_loopback_listen(a))
}

/// Free space wanted beyond the database size: WAL written during the copy, and room to run.
pub const DISK_HEADROOM_PERCENT: u64 = 20;
/// Clock skew tolerated between the hosts. Lag in seconds and the downtime report compare times
/// from both ends; beyond this they mislead.
pub const MAX_CLOCK_SKEW_MS: u64 = 2_000;

/// Judges the facts; every check is reported, passing or not, in a fixed order: the source's
/// replication setup, the target's host, then (from a source agent that sent them) what could
/// defeat the fence.
pub fn evaluate(s: &SourceFacts, t: &TargetFacts) -> Vec<Check> {
    let mut out = Checks::default();
    source_checks(&mut out, s, t.major_version);
    target_checks(&mut out, s, t);
    if let Some(f) = &s.fence {
        fence_access_checks(&mut out, f);
        fence_replication_checks(&mut out, f);
        fence_session_checks(&mut out, f);
    }
    out.0
}

/// Severity of a fence check.
enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// The verdicts so far, in the order they are reported.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    /// Records a check that passes or fails; its fix is kept only when it fails.
    fn check(&mut self, name: &str, ok: bool, detail: String, fix: String) {
        self.0.push(Check {
            name: name.into(),
            ok,
            warning: false,
            detail,
            fix: if ok { String::new() } else { fix },
        })
    }

    /// Records a check that may also warn; its fix is kept unless it passes cleanly.
    fn verdict(&mut self, name: &str, verdict: Verdict, detail: String, fix: String) {
        let (ok, warning) = match verdict {
            Verdict::Ok => (true, false),
            Verdict::Warn => (true, true),
            Verdict::Fail => (false, false),
        };
        self.0.push(Check {
            name: name.into(),
            ok,
            warning,
            detail,
            fix: if ok && !warning { String::new() } else { fix },
        })
    }
}

/// Whether the source can be copied by physical replication at all: same major version as the
/// target's binaries, WAL fit for a standby, free WAL senders and a slot, a role and a
/// `pg_hba.conf` line that let the agent replicate, and a primary to copy from.
fn source_checks(out: &mut Checks, s: &SourceFacts, target_major: u32) {
    let source_major = s.server_version_num / 10_000;
    out.check(
        "major_version",
        source_major == target_major,
        format!("source PostgreSQL {source_major}, target binaries {target_major}"),
        format!(
            "physical replication needs the same major version: install PostgreSQL {source_major} on the target and set its bindir"
        ),
    );
    out.check(
        "wal_level",
        s.wal_level == "replica" || s.wal_level == "logical",
        format!("wal_level = {}", s.wal_level),
        "set wal_level = replica in the source's postgresql.conf (ALTER SYSTEM SET wal_level = replica) and restart the source".into(),
    );
    // pg_basebackup -X stream uses two WAL senders, the standby one more (they overlap only if
    // the standby starts before the backup's stream ends, which we avoid): need 2 free.
    let free_senders = s.max_wal_senders.saturating_sub(s.wal_senders_used);
    out.check(
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
    out.check(
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
    out.check(
        "replication_role",
        s.replication_role,
        format!(
            "the source agent's role {} replicate",
            if s.replication_role { "may" } else { "may not" }
        ),
        "grant it: ALTER ROLE <role> REPLICATION (on the source)".into(),
    );
    match s.hba_replication_from_loopback {
        Some(ok) => out.check(
            "pg_hba_replication",
            ok,
            format!(
                "pg_hba.conf {} replication connections from 127.0.0.1",
                if ok { "allows" } else { "does not allow" }
            ),
            "add `host replication <role> 127.0.0.1/32 scram-sha-256` to the source's pg_hba.conf and reload (SELECT pg_reload_conf())".into(),
        ),
        None => out.check(
            "pg_hba_replication",
            true,
            "pg_hba_file_rules not readable by the agent's role; the base backup will tell".into(),
            String::new(),
        ),
    }
    out.check(
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
}

/// Whether the target host can take the copy: an empty (or absent) data directory, room for
/// the databases plus WAL, and a clock close enough to the source's for lag and downtime
/// figures to mean something.
fn target_checks(out: &mut Checks, s: &SourceFacts, t: &TargetFacts) {
    match t.data_dir_empty {
        Some(false) => out.check(
            "target_data_dir",
            false,
            format!("{} is not empty", t.data_dir),
            format!(
                "move or remove the contents of {} (pgferry never overwrites a data directory)",
                t.data_dir
            ),
        ),
        other => out.check(
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
    out.check(
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
    if let Some(listen) = &t.listen_addresses {
        let loopback = listens_on_loopback_only(listen);
        out.verdict(
            "new_cluster_reachable",
            if loopback { Verdict::Warn } else { Verdict::Ok },
            format!("the new cluster will listen on {listen}"),
            "applications on other hosts will not reach the promoted cluster: set [target] \
             listen_addresses (and hba_file) so it serves them from the cutover on, without a restart"
                .into(),
        );
    }
    for ts in &t.tablespaces {
        out.check(
            "target_tablespace",
            ts.empty != Some(false),
            format!(
                "tablespace {} of the source goes to {} here, which {}",
                ts.source,
                ts.here,
                match ts.empty {
                    None => "does not exist yet (will be created)",
                    Some(true) => "is empty",
                    Some(false) => "is not empty",
                }
            ),
            format!(
                "empty {}, or map the tablespace elsewhere: [target] tablespace_mapping = [\"{}=/new/location\"] (on a host shared with the source, an unmapped tablespace is the source's own directory)",
                ts.here, ts.source
            ),
        );
    }
    let skew = s.now_ms.abs_diff(t.now_ms);
    let uncertainty = t.round_trip_ms / 2;
    out.check(
        "clock_skew",
        skew <= MAX_CLOCK_SKEW_MS + uncertainty,
        format!("clocks differ by about {skew} ms (± {uncertainty} ms)"),
        "synchronise both hosts with NTP (e.g. systemctl enable --now systemd-timesyncd or chrony)"
            .into(),
    );
}

/// Fence checks (`docs/fence.md`), first group: whether the source agent can fence and unfence
/// at all (a superuser role, write access to `pg_hba.conf` and `postgresql.auto.conf`, a way
/// back in after a restart). Failures stop the migration before it starts; warnings are things
/// to settle before the cutover.
fn fence_access_checks(out: &mut Checks, f: &FenceFacts) {
    let some = |v: bool| if v { Verdict::Fail } else { Verdict::Ok };
    match f.superuser {
        Some(su) => out.verdict(
            "fence_superuser",
            some(!su),
            format!(
                "the source agent's role {} a superuser",
                if su { "is" } else { "is not" }
            ),
            "the fence ends every other session (superusers' too) and uses ALTER SYSTEM: connect the source agent as a superuser ([source] conninfo user=postgres)".into(),
        ),
        None => out.verdict(
            "fence_superuser",
            Verdict::Fail,
            "could not tell whether the source agent's role is a superuser".into(),
            "connect the source agent as a superuser ([source] conninfo user=postgres)".into(),
        ),
    }
    let hba = f.hba_file.as_deref().unwrap_or("pg_hba.conf");
    out.verdict(
        "fence_files",
        some(f.files_unwritable.is_some() || f.hba_file.is_none()),
        match &f.files_unwritable {
            None if f.hba_file.is_some() => format!(
                "the source agent can replace {hba} and postgresql.auto.conf (keeping a copy of each beside it)"
            ),
            None => "hba_file is not readable by the source agent's role".into(),
            Some(why) => why.clone(),
        },
        format!(
            "the fence rewrites {hba} and keeps its original beside it: run pgferry-source on the source host as the cluster's OS user (postgres) or root, with write access to the directories of {hba} and of the data directory"
        ),
    );
    out.verdict(
        "fence_reconnect",
        if f.no_reconnect.is_some() { Verdict::Warn } else { Verdict::Ok },
        match &f.no_reconnect {
            None => format!(
                "a restarted source agent can reconnect while fenced (from {})",
                crate::fence::CONTROL_ADDR
            ),
            Some(why) => format!("a source agent restarted during the fence could not reconnect: {why}"),
        },
        format!(
            "give the agent's role a password (ALTER ROLE … PASSWORD, and [source] password_file) and let PostgreSQL listen on 127.0.0.1; otherwise, if the source agent dies while fenced, undo the fence by hand: mv {hba}{suffix} {hba}; mv <data directory>/postgresql.auto.conf{suffix} <data directory>/postgresql.auto.conf; SELECT pg_reload_conf()",
            suffix = crate::fence::ORIGINAL_SUFFIX
        ),
    );
}

/// Up to five items, comma-separated, then how many more there are.
fn list(items: Vec<String>) -> String {
    let n = items.len();
    let mut shown: Vec<String> = items.into_iter().take(5).collect();
    if n > 5 {
        shown.push(format!("and {} more", n - 5));
    }
    shown.join(", ")
}

/// Fence checks, second group: what is tied to the WAL stream and the commit path (prepared
/// transactions, replication slots, WAL senders, synchronous standbys), which the new cluster
/// inherits, loses, or which could keep the drain from ending.
fn fence_replication_checks(out: &mut Checks, f: &FenceFacts) {
    let prepared = &f.prepared_transactions;
    out.verdict(
        "prepared_transactions",
        if prepared.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if prepared.is_empty() {
            "no prepared transactions".into()
        } else {
            format!(
                "{} prepared transaction(s): {}",
                prepared.len(),
                list(prepared.iter().map(|p| format!("'{}' ({} in {}, {} s old)", p.gid, p.owner, p.database, p.age_secs)).collect())
            )
        },
        "finish them before the cutover (COMMIT PREPARED 'gid' or ROLLBACK PREPARED 'gid'): nobody can commit them on the fenced source, and they move to the new cluster still prepared, holding their locks".into(),
    );
    let logical: Vec<&SlotFact> = f
        .replication_slots
        .iter()
        .filter(|s| s.slot_type == "logical")
        .collect();
    out.verdict(
        "replication_slots",
        if f.replication_slots.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if f.replication_slots.is_empty() {
            "no replication slots".into()
        } else {
            format!(
                "{} slot(s) besides pgferry's, {} logical: {}",
                f.replication_slots.len(),
                logical.len(),
                list(f.replication_slots.iter().map(|s| format!("{} ({}{}{})", s.name, s.slot_type, s.database.as_ref().map(|d| format!(" on {d}")).unwrap_or_default(), if s.active { ", active" } else { ", inactive" })).collect())
            )
        },
        "slots are not copied to the new cluster: a logical slot's consumer is cut off at the fence (its connection is refused) and must be set up again on the new cluster; drop slots nobody uses (SELECT pg_drop_replication_slot('name')): an inactive slot retains WAL".into(),
    );
    out.verdict(
        "wal_senders",
        if f.wal_senders.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if f.wal_senders.is_empty() {
            "no other WAL senders".into()
        } else {
            format!(
                "{} WAL sender(s) connected: {}",
                f.wal_senders.len(),
                list(f.wal_senders.iter().map(|w| format!("{} from {} ({}, {})", if w.application_name.is_empty() { "?" } else { &w.application_name }, w.client, w.database.as_ref().map(|d| format!("logical on {d}")).unwrap_or_else(|| "physical".into()), w.sync_state)).collect())
            )
        },
        "the fence ends logical replication connections (they can run SQL) and keeps physical ones (they cannot write); move their consumers to the new cluster after the cutover".into(),
    );
    let sync = f.synchronous_standby_names.trim();
    let sync_connected = f
        .wal_senders
        .iter()
        .any(|w| w.sync_state == "sync" || w.sync_state == "quorum");
    out.verdict(
        "synchronous_standby_names",
        match (sync.is_empty(), sync_connected) {
            (true, _) => Verdict::Ok,
            (false, true) => Verdict::Warn,
            (false, false) => Verdict::Fail,
        },
        if sync.is_empty() {
            "synchronous_standby_names is empty".into()
        } else {
            format!(
                "synchronous_standby_names = '{sync}'; {}",
                if sync_connected {
                    "a synchronous standby is connected"
                } else {
                    "no synchronous standby is connected, so every commit on the source waits"
                }
            )
        },
        "commits wait for the standbys named there; if they are gone, writers hang instead of failing and the drain never ends: set synchronous_standby_names = '' for the migration (ALTER SYSTEM SET synchronous_standby_names = ''; SELECT pg_reload_conf()), or keep those standbys connected".into(),
    );
}

/// Fence checks, third group: work on the source that the fence ends (long-open transactions)
/// or cannot stop through `pg_hba.conf` (subscriptions' apply workers, extensions' background
/// workers).
fn fence_session_checks(out: &mut Checks, f: &FenceFacts) {
    let long = &f.long_transactions;
    out.verdict(
        "long_transactions",
        if long.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if long.is_empty() {
            format!("no transaction open longer than {LONG_TRANSACTION_SECS} s")
        } else {
            format!(
                "{} transaction(s) open longer than {LONG_TRANSACTION_SECS} s: {}",
                long.len(),
                list(long.iter().map(|l| format!("pid {} ({} in {}, {}, {} s)", l.pid, l.user, l.database, l.state, l.age_secs)).collect())
            )
        },
        "the fence ends every session: an open transaction is rolled back and its client gets an error; finish or stop them before the cutover (SELECT pg_terminate_backend(pid))".into(),
    );
    out.verdict(
        "subscriptions",
        if f.subscriptions.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if f.subscriptions.is_empty() {
            "no enabled subscriptions".into()
        } else {
            format!("enabled subscription(s): {}", list(f.subscriptions.clone()))
        },
        "their apply workers commit on the source without a client connection, so the cutover refuses to fence while one is enabled: ALTER SUBSCRIPTION name DISABLE before the cutover (and create it on the new cluster afterwards)".into(),
    );
    out.verdict(
        "background_workers",
        if f.background_workers.is_empty() { Verdict::Ok } else { Verdict::Warn },
        if f.background_workers.is_empty() {
            "no extension background workers".into()
        } else {
            format!("extension background worker(s): {}", list(f.background_workers.clone()))
        },
        "they run inside the server, not through pg_hba.conf: the fence's read-only default stops their plain writes, but not one that asks for a read-write transaction; stop their jobs for the cutover (e.g. pg_cron: unschedule or pause them)".into(),
    );
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
                fence: Some(Box::new(FenceFacts {
                    superuser: Some(true),
                    hba_file: Some("/etc/postgresql/15/main/pg_hba.conf".into()),
                    ..FenceFacts::default()
                })),
                tablespaces: Vec::new(),
            },
            TargetFacts {
                major_version: 15,
                data_dir: "/var/lib/postgresql/15/main".into(),
                data_dir_empty: Some(true),
                free_bytes: 100 << 30,
                now_ms: 1_000_300,
                round_trip_ms: 4,
                listen_addresses: None,
                tablespaces: Vec::new(),
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
        let cases: [Case; 11] = [
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
            (
                "target_tablespace",
                |_, t| {
                    t.tablespaces = vec![
                        TablespaceHere {
                            source: "/srv/ts1".into(),
                            here: "/srv/ts1".into(),
                            empty: Some(false),
                        },
                        TablespaceHere {
                            source: "/srv/ts0".into(),
                            here: "/data/ts0".into(),
                            empty: None,
                        },
                    ]
                },
                "tablespace_mapping = [\"/srv/ts1=",
            ),
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

    fn warnings(s: &SourceFacts, t: &TargetFacts) -> Vec<String> {
        evaluate(s, t)
            .into_iter()
            .filter(|c| c.warning)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_loopback_only_new_cluster_is_a_warning() {
        let (s, mut t) = good();
        assert!(warnings(&s, &t).is_empty());
        t.listen_addresses = Some("localhost".into());
        assert_eq!(warnings(&s, &t), ["new_cluster_reachable"]);
        t.listen_addresses = Some("localhost,10.0.0.5".into());
        assert!(warnings(&s, &t).is_empty());
        assert!(evaluate(&s, &t)
            .iter()
            .any(|c| c.name == "new_cluster_reachable" && c.ok));
    }

    #[test]
    fn what_could_defeat_the_fence_is_named_with_a_fix() {
        let (s0, t) = good();
        let f0 = *s0.fence.clone().unwrap();
        type Case = (&'static str, bool, fn(&mut FenceFacts), &'static str);
        let cases: [Case; 11] = [
            (
                "fence_superuser",
                true,
                |f| f.superuser = Some(false),
                "superuser",
            ),
            (
                "fence_files",
                true,
                |f| f.files_unwritable = Some("read-only fs".into()),
                "OS user",
            ),
            ("fence_files", true, |f| f.hba_file = None, "OS user"),
            (
                "fence_reconnect",
                false,
                |f| f.no_reconnect = Some("no password".into()),
                "mv /etc/postgresql/15/main/pg_hba.conf.pgferry-orig",
            ),
            (
                "prepared_transactions",
                false,
                |f| {
                    f.prepared_transactions = vec![PreparedTransaction {
                        gid: "tx1".into(),
                        owner: "app".into(),
                        database: "shop".into(),
                        age_secs: 3,
                    }]
                },
                "COMMIT PREPARED",
            ),
            (
                "replication_slots",
                false,
                |f| {
                    f.replication_slots = vec![SlotFact {
                        name: "cdc".into(),
                        slot_type: "logical".into(),
                        active: true,
                        database: Some("shop".into()),
                        plugin: Some("pgoutput".into()),
                    }]
                },
                "not copied",
            ),
            (
                "wal_senders",
                false,
                |f| {
                    f.wal_senders = vec![WalSenderFact {
                        application_name: "debezium".into(),
                        client: "10.0.0.7".into(),
                        database: Some("shop".into()),
                        sync_state: "async".into(),
                    }]
                },
                "logical replication",
            ),
            (
                "synchronous_standby_names",
                true,
                |f| f.synchronous_standby_names = "dr1".into(),
                "synchronous_standby_names = ''",
            ),
            (
                "long_transactions",
                false,
                |f| {
                    f.long_transactions = vec![LongTransaction {
                        pid: 7,
                        user: "app".into(),
                        database: "shop".into(),
                        state: "idle in transaction".into(),
                        age_secs: 900,
                    }]
                },
                "rolled back",
            ),
            (
                "subscriptions",
                false,
                |f| f.subscriptions = vec!["from_erp".into()],
                "DISABLE",
            ),
            (
                "background_workers",
                false,
                |f| f.background_workers = vec!["pg_cron launcher".into()],
                "pg_cron",
            ),
        ];
        for (name, fails, break_it, fix_mentions) in cases {
            let mut s = s0.clone();
            let mut f = f0.clone();
            break_it(&mut f);
            s.fence = Some(Box::new(f));
            if fails {
                assert_eq!(failing(&s, &t), vec![name.to_string()], "{name}");
            } else {
                assert!(failing(&s, &t).is_empty(), "{name}");
                assert_eq!(warnings(&s, &t), vec![name.to_string()], "{name}");
            }
            let c = evaluate(&s, &t)
                .into_iter()
                .find(|c| c.name == name)
                .unwrap();
            assert!(c.fix.contains(fix_mentions), "{name}: {}", c.fix);
        }
        // A synchronous standby that is connected: commits do not hang, but it is named.
        let mut s = s0.clone();
        let f = s.fence.as_mut().unwrap();
        f.synchronous_standby_names = "dr1".into();
        f.wal_senders = vec![WalSenderFact {
            application_name: "dr1".into(),
            client: "10.0.0.8".into(),
            database: None,
            sync_state: "sync".into(),
        }];
        assert!(failing(&s, &t).is_empty());
        assert_eq!(
            warnings(&s, &t),
            ["wal_senders", "synchronous_standby_names"]
        );
        // An older source agent sends no fence facts: no fence checks.
        let mut s = s0.clone();
        s.fence = None;
        assert!(!evaluate(&s, &t)
            .iter()
            .any(|c| c.name.starts_with("fence_")));
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
