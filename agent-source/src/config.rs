//! The source agent's settings: the shared tunnel flags and sections
//! ([`pgferry_common::runtime::config`]) plus its own `[source]` section and flags: where the
//! `postgres` service's upstream is, and the agent's own PostgreSQL connection for the
//! migration's typed requests.
//!
//! ```toml
//! [source]
//! conninfo = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
//! password_file = "secrets/pg.password"     # mode 0600, never logged
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use pgferry_common::identity::Role;
use pgferry_common::runtime::cli::{
    config_origin, load_config, resolve_tunnel, ServiceFlags, TunnelArgs,
};
use pgferry_common::runtime::config::{AgentConfig, ConfigFile, Refused, RoleSection};

/// `[source]`: the source agent's own PostgreSQL connection for the migration's typed requests
/// (preflight facts, slots, status, fence, digests). Forwarded client traffic does not use it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// libpq-style connection string, e.g. `host=127.0.0.1 port=5432 user=postgres dbname=postgres`.
    pub conninfo: Option<String>,
    /// File holding the password (first line; mode 0600). Never logged.
    pub password_file: Option<PathBuf>,
}

impl RoleSection for SourceSection {
    fn paths(&mut self) -> Vec<&mut Option<PathBuf>> {
        vec![&mut self.password_file]
    }
}

/// The source agent's config file: the shared sections and `[source]` (a `[target]` section
/// is refused with its line).
pub type SourceFile = ConfigFile<SourceSection, Refused>;

/// The source agent's control connection to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePg {
    pub conninfo: String,
    pub password_file: Option<PathBuf>,
}

/// Everything the source agent runs with, validated.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The shared tunnel settings.
    pub tunnel: AgentConfig,
    /// The connection for typed requests (`None`: requests are answered with an error saying
    /// how to configure it).
    pub pg: Option<SourcePg>,
}

/// `pgferry-source run` flags: the tunnel's, then the source's own (each overrides the file).
#[derive(Debug, Args, Default, Clone)]
pub struct SourceRunArgs {
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    /// Address of PostgreSQL for the `postgres` service (host:port or unix:/path; default
    /// 127.0.0.1:5432).
    #[arg(long, value_name = "ENDPOINT")]
    pub upstream: Option<String>,
    /// PostgreSQL connection string for the migration's typed requests (slots, status, fence,
    /// digests), e.g. "host=127.0.0.1 port=5432 user=postgres dbname=postgres".
    #[arg(long, value_name = "CONNINFO")]
    pub pg_conninfo: Option<String>,
    /// File with the password for --pg-conninfo (mode 0600; never logged).
    #[arg(long, value_name = "FILE")]
    pub pg_password_file: Option<PathBuf>,
}

/// Reads the config file (if any), merges the flags (flags win) and validates.
pub fn resolve(args: SourceRunArgs) -> Result<SourceConfig> {
    let file: SourceFile = load_config(&args.tunnel)?;
    resolve_file(args, file)
}

/// [`resolve`] with the file already parsed.
pub fn resolve_file(args: SourceRunArgs, file: SourceFile) -> Result<SourceConfig> {
    let what = config_origin(&args.tunnel);
    let (shared, section, _) = file.split();
    let tunnel = resolve_tunnel(
        Role::Source,
        args.tunnel,
        shared,
        ServiceFlags {
            postgres_endpoint: args.upstream,
            allow_non_loopback_local: false,
        },
    )?;
    let section = section.unwrap_or_default();
    let pg = resolve_pg(
        args.pg_conninfo.or(section.conninfo),
        args.pg_password_file.or(section.password_file),
    )
    .with_context(|| format!("configuration ({what})"))?;
    Ok(SourceConfig { tunnel, pg })
}

/// The typed requests' connection: a valid connection string, or nothing at all.
fn resolve_pg(
    conninfo: Option<String>,
    password_file: Option<PathBuf>,
) -> Result<Option<SourcePg>> {
    match conninfo {
        Some(c) => {
            c.parse::<tokio_postgres::Config>().map_err(|e| {
                anyhow::anyhow!("[source] conninfo is not a valid connection string: {e}")
            })?;
            Ok(Some(SourcePg {
                conninfo: c,
                password_file,
            }))
        }
        None => {
            if password_file.is_some() {
                bail!("[source] password_file is set but conninfo is not");
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SourceRunArgs {
        SourceRunArgs {
            tunnel: TunnelArgs {
                ca: Some("ca.pem".into()),
                cert: Some("c.pem".into()),
                key: Some("c.key".into()),
                listen: Some("127.0.0.1:0".into()),
                audit_log: Some("a.log".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn source_section_resolves_and_flags_win() {
        let file: SourceFile = toml::from_str(
            "[source]\nconninfo = \"host=127.0.0.1 user=postgres\"\npassword_file = \"/s/pw\"\n",
        )
        .unwrap();
        let cfg = resolve_file(args(), file).unwrap();
        let pg = cfg.pg.unwrap();
        assert_eq!(pg.conninfo, "host=127.0.0.1 user=postgres");
        assert_eq!(pg.password_file, Some(PathBuf::from("/s/pw")));

        let file: SourceFile = toml::from_str("[source]\nconninfo = \"host=a\"\n").unwrap();
        let a = SourceRunArgs {
            pg_conninfo: Some("host=b".into()),
            ..args()
        };
        assert_eq!(
            resolve_file(a, file).unwrap().pg.unwrap().conninfo,
            "host=b"
        );
        assert!(resolve_file(args(), SourceFile::default())
            .unwrap()
            .pg
            .is_none());
    }

    #[test]
    fn bad_source_settings_are_named() {
        let file: SourceFile = toml::from_str("[source]\nconninfo = \"port=notaport\"\n").unwrap();
        let err = format!("{:#}", resolve_file(args(), file).unwrap_err());
        assert!(err.contains("[source] conninfo"), "{err}");
        let file: SourceFile = toml::from_str("[source]\npassword_file = \"/pw\"\n").unwrap();
        let err = format!("{:#}", resolve_file(args(), file).unwrap_err());
        assert!(err.contains("conninfo is not"), "{err}");
    }

    #[test]
    fn the_targets_section_is_refused_with_its_line() {
        let err =
            toml::from_str::<SourceFile>("[audit]\nlog = \"a\"\n\n[target]\ndata_dir = \"/d\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("line 4") && err.contains("other agent"),
            "{err}"
        );
        let err = toml::from_str::<SourceFile>("[source]\nconninf = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("conninf"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("source.toml");
        std::fs::write(
            &p,
            "[source]\nconninfo = \"host=a\"\npassword_file = \"pw\"\n",
        )
        .unwrap();
        let file = SourceFile::load(&p).unwrap();
        assert_eq!(
            file.source.unwrap().password_file,
            Some(dir.path().join("pw"))
        );
    }
}
