//! The target agent's settings: the shared tunnel flags and sections
//! ([`pgferry_common::runtime::config`]) plus its own `[target]` section and flags: the local
//! endpoint of the `postgres` service, where the new cluster goes, and the admin socket.
//!
//! ```toml
//! [target]
//! data_dir = "/var/lib/postgresql/15/main"  # empty or absent before the clone
//! port = 5432
//! socket_dir = "/var/run/postgresql"
//! os_user = "postgres"
//! replication_password_file = "secrets/replication.password"
//!
//! [target.pgbouncer]            # optional: a pooler switched at cutover
//! admin = "host=10.0.0.3 port=6432 user=pgbouncer"
//! databases_file = "/etc/pgbouncer/pgferry-databases.ini"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;

use pgferry_common::identity::Role;
use pgferry_common::preflight::is_loopback_listen;
use pgferry_common::runtime::cli::{load_config, resolve_tunnel, ServiceFlags, TunnelArgs};
use pgferry_common::runtime::config::{AgentConfig, ConfigFile, Refused, RoleSection};

use crate::pooler::{PgBouncer, PgBouncerSection};
/// `[target]`: where the new cluster goes and how operators reach the running agent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Data directory of the new cluster (must be empty or absent before the clone).
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL binaries of the new cluster (default /usr/lib/postgresql/15/bin).
    pub bindir: Option<PathBuf>,
    /// Unix socket (mode 0600) that `pgferry-target preflight|status|…` talk to
    /// (default: `pgferry-target.sock` next to the audit log).
    pub admin_socket: Option<PathBuf>,
    /// Port of the new cluster (default 5432).
    pub port: Option<u16>,
    /// Directory for the new cluster's unix socket (default /var/run/postgresql).
    pub socket_dir: Option<PathBuf>,
    /// OS user that owns and runs the new cluster; when the agent runs as root, PostgreSQL
    /// tools run as this user (default: the agent's own user).
    pub os_user: Option<String>,
    /// Role used for the base backup and streaming replication (default postgres).
    pub replication_user: Option<String>,
    /// File with that role's password (first line; mode 0600; never logged).
    pub replication_password_file: Option<PathBuf>,
    /// Migration state file (default: `pgferry-target.state.json` next to the audit log).
    pub state_file: Option<PathBuf>,
    /// While the standby catches up, record the lag in the audit log this often (default 10 s).
    pub lag_sample_secs: Option<u64>,
    /// Keep the replication slot on the source after a rollback (default false: dropped, so
    /// the source retains no WAL for a standby that will not come). A kept slot is reused by
    /// the next migration of the same name.
    pub keep_slot_on_rollback: Option<bool>,
    /// Addresses the new cluster listens on, as PostgreSQL's `listen_addresses` (default
    /// `localhost`: applications on other hosts cannot reach it). Set when the standby first
    /// starts, so the promoted cluster serves them without a restart.
    pub listen_addresses: Option<String>,
    /// A `pg_hba.conf` to install into the new cluster before the standby first starts
    /// (default: the source's, as copied).
    pub hba_file: Option<PathBuf>,
    /// `[target.pgbouncer]`: a PgBouncer in front of the old cluster, paused before the
    /// fence and switched to the new primary after promotion ([`crate::pooler`]).
    pub pgbouncer: Option<PgBouncerSection>,
    /// How the base copy is made: `agent` (default: the agents copy the files themselves over
    /// parallel streams, resumable file by file) or `pg_basebackup` (one stream, through the
    /// tunnel).
    pub copy_method: Option<String>,
    /// Parallel file streams of the agent copy (default: the number of cores, at least 8).
    pub copy_streams: Option<usize>,
    /// Where the source's tablespaces go on this host, as `pg_basebackup
    /// --tablespace-mapping`: `["/old/location=/new/location", …]`, absolute paths. A
    /// tablespace not named keeps its location (which must then be empty or absent here).
    pub tablespace_mapping: Option<Vec<String>>,
}

/// How the base copy is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `pg_basebackup -X stream` through the tunnel.
    PgBasebackup,
    /// The agents copy the files (the default).
    Agent,
}

/// Default PostgreSQL binaries of the new cluster.
pub const DEFAULT_BINDIR: &str = "/usr/lib/postgresql/15/bin";
/// File name of the admin socket when none is configured (next to the audit log).
pub const DEFAULT_ADMIN_SOCKET: &str = "pgferry-target.sock";

/// The target agent's settings for the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSettings {
    pub data_dir: Option<PathBuf>,
    pub bindir: PathBuf,
    pub admin_socket: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub os_user: Option<String>,
    pub replication_user: String,
    pub replication_password_file: Option<PathBuf>,
    pub state_file: PathBuf,
    pub lag_sample: Duration,
    pub keep_slot_on_rollback: bool,
    pub listen_addresses: String,
    pub hba_file: Option<PathBuf>,
    pub pgbouncer: Option<PgBouncer>,
    pub copy_method: CopyMethod,
    pub copy_streams: usize,
    /// (the source's location, this host's) of each mapped tablespace.
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
}

impl TargetSettings {
    /// Where a tablespace at `location` on the source goes here.
    pub fn tablespace_location(&self, location: &Path) -> PathBuf {
        self.tablespace_mapping
            .iter()
            .find(|(old, _)| old == location)
            .map_or_else(|| location.to_path_buf(), |(_, new)| new.clone())
    }
}

/// `[target] tablespace_mapping`: each `OLD=NEW`, both absolute, no `OLD` twice.
fn tablespace_mapping(entries: &[String]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut out: Vec<(PathBuf, PathBuf)> = Vec::new();
    for e in entries {
        let fix = "give \"/old/location=/new/location\", both absolute";
        let Some((old, new)) = e.split_once('=') else {
            anyhow::bail!("[target] tablespace_mapping {e:?}: no '=': {fix}");
        };
        let (old, new) = (PathBuf::from(old.trim()), PathBuf::from(new.trim()));
        if !old.is_absolute() || !new.is_absolute() || new.to_string_lossy().contains('=') {
            anyhow::bail!("[target] tablespace_mapping {e:?}: {fix}");
        }
        if out.iter().any(|(o, _)| *o == old) {
            anyhow::bail!("[target] tablespace_mapping maps {} twice", old.display());
        }
        out.push((old, new));
    }
    Ok(out)
}

impl RoleSection for TargetSection {
    fn paths(&mut self) -> Vec<&mut Option<PathBuf>> {
        let mut paths = vec![
            &mut self.data_dir,
            &mut self.bindir,
            &mut self.admin_socket,
            &mut self.socket_dir,
            &mut self.replication_password_file,
            &mut self.state_file,
            &mut self.hba_file,
        ];
        if let Some(p) = &mut self.pgbouncer {
            paths.push(&mut p.password_file);
            paths.push(&mut p.databases_file);
        }
        paths
    }
}

/// The target agent's config file: the shared sections and `[target]` (a `[source]` section
/// is refused with its line).
pub type TargetFile = ConfigFile<Refused, TargetSection>;

/// Everything the target agent runs with, validated.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The shared tunnel settings.
    pub tunnel: AgentConfig,
    /// The new cluster and the admin socket.
    pub settings: TargetSettings,
}

/// `pgferry-target run` flags: the tunnel's, then the target's own (each overrides the file).
#[derive(Debug, Args, Default, Clone)]
pub struct TargetRunArgs {
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    /// Local endpoint clients connect to for the `postgres` service (host:port or
    /// unix:/path; default 127.0.0.1:5433).
    #[arg(long, value_name = "ENDPOINT")]
    pub local: Option<String>,
    /// DANGEROUS. Accept a --local / [[service]] local endpoint that is not loopback (e.g.
    /// 0.0.0.0:5433): anyone who reaches it reaches the OLD cluster, and PostgreSQL sees them
    /// as a loopback client. Written to the audit log.
    #[arg(long)]
    pub allow_non_loopback_local: bool,
    /// Data directory of the new cluster (empty or absent before the clone).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL binaries of the new cluster (default /usr/lib/postgresql/15/bin).
    #[arg(long, value_name = "DIR")]
    pub bindir: Option<PathBuf>,
    /// Admin socket for `preflight`, `status`, … (default: pgferry-target.sock next to the
    /// audit log; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// How the base copy is made: `agent` (the agents copy the files over parallel streams,
    /// resumable file by file, waiting out any outage) or `pg_basebackup` (one stream).
    /// Default: `agent`, or `pg_basebackup` for a source with tablespaces. Overrides
    /// [target] copy_method.
    #[arg(long, value_name = "METHOD", value_parser = ["agent", "pg_basebackup"])]
    pub copy_method: Option<String>,
}

/// Reads the config file (if any), merges the flags (flags win) and validates.
pub fn resolve(args: TargetRunArgs) -> Result<TargetConfig> {
    let file: TargetFile = load_config(&args.tunnel)?;
    resolve_file(args, file)
}

/// [`resolve`] with the file already parsed.
pub fn resolve_file(args: TargetRunArgs, file: TargetFile) -> Result<TargetConfig> {
    let (shared, _, section) = file.split();
    let tunnel = resolve_tunnel(
        Role::Target,
        args.tunnel,
        shared,
        ServiceFlags {
            postgres_endpoint: args.local,
            allow_non_loopback_local: args.allow_non_loopback_local,
        },
    )?;
    let s = section.unwrap_or_default();
    let beside_log = |name: &str| {
        tunnel
            .audit_log
            .parent()
            .unwrap_or(Path::new("."))
            .join(name)
    };
    let settings = TargetSettings {
        data_dir: args.data_dir.or(s.data_dir),
        bindir: args
            .bindir
            .or(s.bindir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BINDIR)),
        admin_socket: args
            .admin_socket
            .or(s.admin_socket)
            .unwrap_or_else(|| beside_log(DEFAULT_ADMIN_SOCKET)),
        port: s.port.unwrap_or(5432),
        socket_dir: s
            .socket_dir
            .unwrap_or_else(|| PathBuf::from("/var/run/postgresql")),
        os_user: s.os_user,
        replication_user: s.replication_user.unwrap_or_else(|| "postgres".into()),
        replication_password_file: s.replication_password_file,
        state_file: s
            .state_file
            .unwrap_or_else(|| beside_log("pgferry-target.state.json")),
        lag_sample: Duration::from_secs(s.lag_sample_secs.unwrap_or(10).max(1)),
        keep_slot_on_rollback: s.keep_slot_on_rollback.unwrap_or(false),
        listen_addresses: check_listen_addresses(
            s.listen_addresses.as_deref().unwrap_or("localhost"),
        )?,
        hba_file: s.hba_file,
        pgbouncer: s.pgbouncer.map(PgBouncerSection::resolve).transpose()?,
        copy_method: match args.copy_method.as_deref().or(s.copy_method.as_deref()) {
            None => CopyMethod::Agent,
            Some("pg_basebackup") => CopyMethod::PgBasebackup,
            Some("agent") => CopyMethod::Agent,
            Some(other) => {
                anyhow::bail!("[target] copy_method {other:?}: use \"pg_basebackup\" or \"agent\"")
            }
        },
        // Most files are small: more streams than cores hide each file's round trips
        // (measured on 2 cores: 2 streams 1.33×, 8 streams 1.06–1.12×, 16 streams 1.20× the
        // time of pg_basebackup).
        copy_streams: s
            .copy_streams
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(8, |n| n.get().max(8)))
            .clamp(1, 64),
        tablespace_mapping: tablespace_mapping(s.tablespace_mapping.as_deref().unwrap_or(&[]))?,
    };
    if let Some(h) = &settings.hba_file {
        std::fs::metadata(h)
            .with_context(|| format!("[target] hba_file {}: cannot read it", h.display()))?;
    }
    Ok(TargetConfig { tunnel, settings })
}

/// `listen_addresses` as PostgreSQL takes it: host names or addresses, comma-separated, or
/// `*`. Nothing that could break out of the quoted value it is written into.
fn check_listen_addresses(v: &str) -> Result<String> {
    let ok = !v.trim().is_empty()
        && v.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '*' | ',' | ' ' | '%' | '_')
        });
    if !ok {
        anyhow::bail!(
            "[target] listen_addresses {v:?}: give host names or addresses separated by commas, e.g. \"localhost,10.0.0.5\", or \"*\""
        );
    }
    Ok(v.trim().to_string())
}

/// The host applications reach the new cluster at: its first listen address that is neither
/// loopback nor a wildcard, else `localhost`.
pub fn serving_host(listen_addresses: &str) -> String {
    listen_addresses
        .split(',')
        .map(str::trim)
        .find(|a| !is_loopback_listen(a) && !matches!(*a, "*" | "0.0.0.0" | "::" | ""))
        .unwrap_or("localhost")
        .to_string()
}

/// The admin socket a CLI verb should talk to, from the running agent's config file alone:
/// `[target] admin_socket`, else `pgferry-target.sock` next to the audit log.
pub fn admin_socket_of(path: &Path) -> Result<PathBuf> {
    let file = TargetFile::load(path)?;
    let log = file.audit.log.clone();
    file.target
        .and_then(|t| t.admin_socket)
        .or_else(|| {
            log.map(|l| {
                l.parent()
                    .unwrap_or(Path::new("."))
                    .join(DEFAULT_ADMIN_SOCKET)
            })
        })
        .with_context(|| {
            format!(
                "{} names neither [target] admin_socket nor [audit] log; pass --admin-socket",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_common::preflight::listens_on_loopback_only;

    fn args() -> TargetRunArgs {
        TargetRunArgs {
            tunnel: TunnelArgs {
                ca: Some("ca.pem".into()),
                cert: Some("c.pem".into()),
                key: Some("c.key".into()),
                connect: Some("old-host:7443".into()),
                audit_log: Some("/var/log/pgferry/t.log".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_sit_beside_the_audit_log_and_flags_win() {
        let cfg = resolve_file(args(), TargetFile::default()).unwrap();
        let s = &cfg.settings;
        assert_eq!(
            s.admin_socket,
            Path::new("/var/log/pgferry/pgferry-target.sock")
        );
        assert_eq!(
            s.state_file,
            Path::new("/var/log/pgferry/pgferry-target.state.json")
        );
        assert_eq!(s.bindir, Path::new(DEFAULT_BINDIR));
        assert_eq!((s.port, s.lag_sample), (5432, Duration::from_secs(10)));

        let file: TargetFile =
            toml::from_str("[target]\ndata_dir = \"/file\"\nport = 6000\nlag_sample_secs = 0\n")
                .unwrap();
        let a = TargetRunArgs {
            data_dir: Some("/flag".into()),
            ..args()
        };
        let s = resolve_file(a, file).unwrap().settings;
        assert_eq!(s.data_dir, Some(PathBuf::from("/flag")));
        assert_eq!(s.port, 6000);
        assert_eq!(s.lag_sample, Duration::from_secs(1), "at least a second");
    }

    #[test]
    fn the_copy_method_defaults_to_the_agent_and_the_flag_wins() {
        let method = |flag: Option<&str>, file: &str| {
            let file: TargetFile = toml::from_str(file).unwrap();
            let a = TargetRunArgs {
                copy_method: flag.map(str::to_string),
                ..args()
            };
            resolve_file(a, file).map(|c| c.settings.copy_method)
        };
        assert_eq!(method(None, "").unwrap(), CopyMethod::Agent);
        let file = "[target]\ncopy_method = \"pg_basebackup\"\n";
        assert_eq!(method(None, file).unwrap(), CopyMethod::PgBasebackup);
        assert_eq!(method(Some("agent"), file).unwrap(), CopyMethod::Agent);
        let e = method(None, "[target]\ncopy_method = \"rsync\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("use \"pg_basebackup\" or \"agent\""),
            "{e:#}"
        );
    }

    #[test]
    fn tablespace_mappings_are_absolute_and_each_location_is_mapped_once() {
        let m =
            |v: &[&str]| tablespace_mapping(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let ok = m(&["/srv/ts1=/data/ts1", " /srv/ts2 = /data/ts2 "]).unwrap();
        assert_eq!(
            ok[1],
            (PathBuf::from("/srv/ts2"), PathBuf::from("/data/ts2"))
        );
        for bad in [
            &["/srv/ts1"][..],
            &["ts1=/data/ts1"],
            &["/srv/ts1=data"],
            &["/a=/b", "/a=/c"],
        ] {
            let e = m(bad).unwrap_err();
            assert!(format!("{e:#}").contains("tablespace_mapping"), "{e:#}");
        }
        let file: TargetFile =
            toml::from_str("[target]\ntablespace_mapping = [\"/srv/ts1=/data/ts1\"]\n").unwrap();
        let s = resolve_file(args(), file).unwrap().settings;
        assert_eq!(
            s.tablespace_location(Path::new("/srv/ts1")),
            Path::new("/data/ts1")
        );
        assert_eq!(
            s.tablespace_location(Path::new("/srv/ts9")),
            Path::new("/srv/ts9")
        );
    }

    #[test]
    fn listen_addresses_are_checked_and_default_to_loopback() {
        let s = resolve_file(args(), TargetFile::default())
            .unwrap()
            .settings;
        assert_eq!(s.listen_addresses, "localhost");
        assert!(listens_on_loopback_only(&s.listen_addresses));
        assert_eq!(serving_host(&s.listen_addresses), "localhost");
        let file: TargetFile =
            toml::from_str("[target]\nlisten_addresses = \"localhost, 10.0.0.5\"\n").unwrap();
        let s = resolve_file(args(), file).unwrap().settings;
        assert!(!listens_on_loopback_only(&s.listen_addresses));
        assert_eq!(serving_host(&s.listen_addresses), "10.0.0.5");
        assert_eq!(serving_host("*"), "localhost");
        for bad in ["x'; shared_preload_libraries='evil", "a\nb", ""] {
            let file: TargetFile = toml::from_str(&format!(
                "[target]\nlisten_addresses = {}\n",
                toml::Value::String(bad.into())
            ))
            .unwrap();
            let err = format!("{:#}", resolve_file(args(), file).unwrap_err());
            assert!(err.contains("listen_addresses"), "{err}");
        }
        let file: TargetFile =
            toml::from_str("[target]\nhba_file = \"/nonexistent/hba\"\n").unwrap();
        let err = format!("{:#}", resolve_file(args(), file).unwrap_err());
        assert!(err.contains("hba_file"), "{err}");
    }

    #[test]
    fn pgbouncer_settings_are_checked_and_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("target.toml");
        let load = |text: &str| {
            std::fs::write(&conf, text).unwrap();
            TargetFile::load(&conf).and_then(|f| resolve_file(args(), f))
        };
        let err = format!(
            "{:#}",
            load("[target.pgbouncer]\ndatabases_file = \"db.ini\"\n").unwrap_err()
        );
        assert!(err.contains("admin"), "{err}");
        let with = "[target.pgbouncer]\nadmin = \"host=127.0.0.1 port=6432\"\ndatabases_file = \"db.ini\"\n";
        let err = format!("{:#}", load(with).unwrap_err());
        assert!(
            err.contains("db.ini") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(dir.path().join("db.ini"), "[pgbouncer]\n").unwrap();
        let err = format!("{:#}", load(with).unwrap_err());
        assert!(err.contains("db.ini") && err.contains("line 1"), "{err}");
        std::fs::write(dir.path().join("db.ini"), "appdb = host=old port=5432\n").unwrap();
        let pb = load(with).unwrap().settings.pgbouncer.unwrap();
        assert_eq!(pb.databases_file, dir.path().join("db.ini"));
        assert_eq!(pb.pause_timeout, Duration::from_secs(10));
        let err = format!(
            "{:#}",
            load(&format!("{with}new_host = \"a b\"\n")).unwrap_err()
        );
        assert!(err.contains("new_host"), "{err}");
    }

    #[test]
    fn the_sources_section_is_refused_with_its_line() {
        let err = toml::from_str::<TargetFile>("[source]\nconninfo = \"host=a\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("other agent"),
            "{err}"
        );
        let err = toml::from_str::<TargetFile>("[target]\ndatadir = \"/d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("datadir"), "{err}");
    }

    #[test]
    fn admin_socket_is_found_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("target.toml");
        std::fs::write(&p, "[audit]\nlog = \"logs/t.log\"\n").unwrap();
        assert_eq!(
            admin_socket_of(&p).unwrap(),
            dir.path().join("logs").join(DEFAULT_ADMIN_SOCKET)
        );
        std::fs::write(&p, "[target]\nadmin_socket = \"a.sock\"\n").unwrap();
        assert_eq!(admin_socket_of(&p).unwrap(), dir.path().join("a.sock"));
        std::fs::write(&p, "").unwrap();
        let err = format!("{:#}", admin_socket_of(&p).unwrap_err());
        assert!(err.contains("--admin-socket"), "{err}");
    }
}
