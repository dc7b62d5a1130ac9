//! Agent configuration: a TOML file plus command-line flags, resolved in two steps.
//!
//! [`ConfigFile`] is what the TOML says (everything optional, unknown keys rejected with the file
//! and line); [`crate::runtime::cli::TunnelArgs`] are the flags. The role sections `[source]`
//! and `[target]` belong to the role crates, which resolve them beside this. [`AgentConfig::resolve`] merges them
//! (flags win), fills defaults, resolves relative paths against the config file's directory and
//! validates everything an operator can get wrong *before* any socket is opened.
//!
//! ```toml
//! [tls]
//! ca = "certs/ca.pem"
//! cert = "certs/source.pem"
//! key = "certs/source.key"
//! revocation_list = "certs/revoked.txt"   # optional; re-read at every handshake
//!
//! [network]
//! listen = "0.0.0.0:7443"                 # or: connect = "new-host.example:7443"
//! keep_alive_secs = 1
//! idle_timeout_secs = 30
//! resume_grace_secs = 300                 # forwarded connections outlive a lost tunnel this long
//! handshake_timeout_secs = 5
//!
//! [policy]
//! allowed_regions = ["DE", "FR", "NL"]    # default: the 30 EEA countries
//!
//! [audit]
//! log = "/var/log/pgferry/source.audit.jsonl"
//!
//! [compression]
//! level = 3
//!
//! [[service]]                             # default: one service "postgres"
//! name = "postgres"
//! upstream = "127.0.0.1:5432"             # source side: where the service really listens
//! local = "127.0.0.1:5433"                # target side: where clients connect
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::control::valid_service_name;
use crate::identity::{Region, RegionSet, Role};

/// Default zstd level: level 3 is zstd's own default and compresses our mixed sample data about
/// as well as levels 5–6 at roughly twice their speed.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// QUIC keep-alive interval, counted from the last packet received. It is also how soon a peer
/// that restarted is noticed on an idle tunnel: the keep-alive reaches the new process, whose
/// stateless reset (keyed from the agent's key, see `agent::stateless_reset_key`) ends the old
/// connection at once. One small packet a second; well under NAT UDP timeouts (30 s).
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 1;
/// A connection silent for this long is considered lost.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
/// A handshake (QUIC + TLS, before the peer is authenticated) that takes longer is abandoned.
/// A handshake takes 1–3 round trips (well under a second on any EEA path); the bound is what an
/// unauthenticated peer can hold a pending-handshake slot for, separately from the idle timeout.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 5;
/// How long SIGTERM waits for forwarded connections to finish before closing them.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
/// Default time a forwarded connection outlives the tunnel under it.
pub const DEFAULT_RESUME_GRACE_SECS: u64 = 300;
/// The PostgreSQL service forwarded when no `[[service]]` is configured.
pub const DEFAULT_SERVICE: &str = "postgres";
/// Default upstream of the `postgres` service on the source host.
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:5432";
/// Default local endpoint of the `postgres` service on the target host.
pub const DEFAULT_LOCAL: &str = "127.0.0.1:5433";

/// The TOML file as written by the operator: the shared sections, and the role sections
/// `[source]` (`S`) and `[target]` (`T`). Each binary reads its own section's type and
/// [`Refused`] for the other role's, so a section in the wrong agent's file is an error naming
/// the line, like any unknown key.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    bound(deserialize = "S: Deserialize<'de>, T: Deserialize<'de>")
)]
pub struct ConfigFile<S = Refused, T = Refused> {
    /// `[tls]`
    #[serde(default)]
    pub tls: TlsSection,
    /// `[network]`
    #[serde(default)]
    pub network: NetworkSection,
    /// `[policy]`
    #[serde(default)]
    pub policy: PolicySection,
    /// `[audit]`
    #[serde(default)]
    pub audit: AuditSection,
    /// `[compression]`
    #[serde(default)]
    pub compression: CompressionSection,
    /// `[[service]]`
    #[serde(default)]
    pub service: Vec<ServiceSection>,
    /// `[source]`: the source agent's own settings (`pgferry_source::config`).
    #[serde(default = "none")]
    pub source: Option<S>,
    /// `[target]`: the target agent's own settings (`pgferry_target::config`).
    #[serde(default = "none")]
    pub target: Option<T>,
}

fn none<X>() -> Option<X> {
    None
}

impl<S, T> Default for ConfigFile<S, T> {
    fn default() -> Self {
        ConfigFile {
            tls: TlsSection::default(),
            network: NetworkSection::default(),
            policy: PolicySection::default(),
            audit: AuditSection::default(),
            compression: CompressionSection::default(),
            service: Vec::new(),
            source: None,
            target: None,
        }
    }
}

/// A role section of the config file: which of its fields are paths (resolved against the
/// file's directory, as the shared sections' paths are).
pub trait RoleSection {
    /// The section's path fields.
    fn paths(&mut self) -> Vec<&mut Option<PathBuf>>;
}

/// The other role's section: present in the file, it is refused with its line.
#[derive(Debug)]
pub enum Refused {}

impl<'de> Deserialize<'de> for Refused {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "this section is the other agent's: pgferry-source reads [source], pgferry-target \
             reads [target] (give each agent its own file)",
        ))
    }
}

impl RoleSection for Refused {
    fn paths(&mut self) -> Vec<&mut Option<PathBuf>> {
        match *self {}
    }
}

/// `[tls]`: certificate files.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM) that both agents' certificates chain to.
    pub ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM, PKCS#8).
    pub key: Option<PathBuf>,
    /// Revoked fingerprints, one per line (`pgferry-certs revoke` writes it).
    pub revocation_list: Option<PathBuf>,
}

/// `[network]`: who dials whom, and timers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// UDP address to listen on.
    pub listen: Option<String>,
    /// `host:port` to dial.
    pub connect: Option<String>,
    /// Name expected in the listening peer's certificate (default: host part of `connect`).
    pub server_name: Option<String>,
    /// QUIC keep-alive interval in seconds.
    pub keep_alive_secs: Option<u64>,
    /// Idle timeout in seconds.
    pub idle_timeout_secs: Option<u64>,
    /// How long a shutdown waits for open forwarded connections.
    pub drain_timeout_secs: Option<u64>,
    /// How long a forwarded connection outlives the tunnel under it (0: not at all).
    pub resume_grace_secs: Option<u64>,
    /// Longest QUIC/TLS handshake, in seconds.
    pub handshake_timeout_secs: Option<u64>,
    /// `bbr`, `cubic` or `newreno`.
    pub congestion_control: Option<String>,
    /// Target: accept local endpoints that are not loopback (they expose the old cluster to
    /// whoever reaches that address). Off by default; audited when on.
    pub allow_non_loopback_local: Option<bool>,
}

/// `[policy]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// ISO 3166 alpha-2 codes the peer (and this agent) may be in. Default: the EEA.
    pub allowed_regions: Option<Vec<String>>,
}

/// `[audit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Path of the audit log (JSON lines, appended).
    pub log: Option<PathBuf>,
}

/// `[compression]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSection {
    /// zstd level 1–19 (negative "fast" levels down to -7 are accepted too).
    pub level: Option<i32>,
}

/// One `[[service]]` entry.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Service name, used in stream headers and the audit log.
    pub name: String,
    /// Source side: where to connect (`host:port` or `unix:/path/to/socket`).
    pub upstream: Option<String>,
    /// Target side: where to accept client connections (`127.0.0.1:5433` or `unix:/path`),
    /// or a list of them (`["127.0.0.1:5433", "unix:/run/pgferry/.s.PGSQL.5433"]`).
    pub local: Option<OneOrMany>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

impl<S, T> ConfigFile<S, T>
where
    S: DeserializeOwned + RoleSection,
    T: DeserializeOwned + RoleSection,
{
    /// Reads and parses a TOML file; errors name the file (and line, from the TOML parser).
    /// Relative paths, in every section, are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration {}", path.display()))?;
        let mut cfg: Self = toml::from_str(&text)
            .with_context(|| format!("parsing configuration {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths = vec![
            &mut cfg.tls.ca,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
            &mut cfg.tls.revocation_list,
            &mut cfg.audit.log,
        ];
        paths.extend(cfg.source.iter_mut().flat_map(RoleSection::paths));
        paths.extend(cfg.target.iter_mut().flat_map(RoleSection::paths));
        for p in paths.into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }
}

impl<S, T> ConfigFile<S, T> {
    /// The shared sections (what [`AgentConfig::resolve`] reads) apart from the role sections.
    pub fn split(self) -> (ConfigFile, Option<S>, Option<T>) {
        let ConfigFile {
            tls,
            network,
            policy,
            audit,
            compression,
            service,
            source,
            target,
        } = self;
        let shared = ConfigFile {
            tls,
            network,
            policy,
            audit,
            compression,
            service,
            source: None,
            target: None,
        };
        (shared, source, target)
    }
}

/// Where a service is reached or offered: TCP or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port` (resolved when used, so DNS names work for upstreams).
    Tcp(String),
    /// `unix:/path/to/socket`
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `unix:/path` or `host:port`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                bail!("unix socket path {path:?} must be absolute (write unix:/path/to/socket)");
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(s.to_owned()))
            }
            _ => bail!("{s:?} is not host:port or unix:/path/to/socket"),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => f.write_str(a),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The QUIC congestion controller (quinn ships all three). It decides how fast the sender may
/// go, so it matters on paths with delay and loss: a loss-based controller (Cubic, NewReno)
/// reads every random loss as congestion and halves its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// BBR: does not back off on random loss. quinn 0.11 paces from its window rather than its
    /// bandwidth estimate, so it overfills the bottleneck queue: for a dedicated lossy link.
    Bbr,
    /// CUBIC (quinn's own default; loss-based). The default, from the emulated WAN path
    /// (bench/results/path-run.md: 30 ms RTT, 100 Mbit/s): quinn 0.11's BBR copied a base
    /// backup 5.3x faster than CUBIC at 0.1% random loss, but even alone it sent 2.1-2.4x what
    /// the link delivered (the rest dropped at the bottleneck), and it took 100% of the link
    /// from a CUBIC TCP flow for 30 s. A migration usually shares its link with the application.
    #[default]
    Cubic,
    /// NewReno (loss-based).
    NewReno,
}

impl std::str::FromStr for CongestionControl {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            "newreno" | "reno" => Ok(Self::NewReno),
            _ => bail!("congestion_control {s:?} is not one of bbr, cubic, newreno"),
        }
    }
}

impl fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bbr => "bbr",
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
        })
    }
}

/// A resolved service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name in stream headers and the audit log.
    pub name: String,
    /// Source: upstream to connect to. Target: local endpoints to accept on.
    pub endpoint: Endpoint,
}

/// Who dials.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Listen for the peer on this UDP address.
    Listen(SocketAddr),
    /// Dial `addr` (host:port), expecting `server_name` in the peer's certificate.
    Connect {
        /// `host:port` as configured.
        addr: String,
        /// Name checked against the peer certificate's DNS/IP SANs.
        server_name: String,
    },
}

/// Everything an agent needs, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's role (fixed by the binary; its certificate must say the same).
    pub role: Role,
    /// CA certificate path.
    pub ca: PathBuf,
    /// Own certificate path.
    pub cert: PathBuf,
    /// Own key path.
    pub key: PathBuf,
    /// Revocation list, re-read at each handshake.
    pub revocation_list: Option<PathBuf>,
    /// Listen or connect.
    pub transport: Transport,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Shutdown drain limit.
    pub drain_timeout: Duration,
    /// How long a forwarded connection outlives the tunnel under it (zero: not at all).
    pub resume_grace: Duration,
    /// Longest handshake before the peer is authenticated.
    pub handshake_timeout: Duration,
    /// QUIC congestion controller for what this agent sends.
    pub congestion_control: CongestionControl,
    /// Target: the operator allowed local endpoints that are not loopback (audited).
    pub allow_non_loopback_local: bool,
    /// Allowed regions for the peer and for ourselves.
    pub allowed_regions: RegionSet,
    /// Audit log path.
    pub audit_log: PathBuf,
    /// zstd level.
    pub compression_level: i32,
    /// Forwarded services.
    pub services: Vec<Service>,
}

/// Flag values that override the file (all optional); filled by
/// [`crate::runtime::cli::resolve_tunnel`] from the shared flags and the role's endpoint flags.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--ca`
    pub ca: Option<PathBuf>,
    /// `--cert`
    pub cert: Option<PathBuf>,
    /// `--key`
    pub key: Option<PathBuf>,
    /// `--revocation-list`
    pub revocation_list: Option<PathBuf>,
    /// `--listen`
    pub listen: Option<String>,
    /// `--connect`
    pub connect: Option<String>,
    /// `--server-name`
    pub server_name: Option<String>,
    /// `--keep-alive-secs`
    pub keep_alive_secs: Option<u64>,
    /// `--idle-timeout-secs`
    pub idle_timeout_secs: Option<u64>,
    /// `--drain-timeout-secs`
    pub drain_timeout_secs: Option<u64>,
    /// `--resume-grace-secs`
    pub resume_grace_secs: Option<u64>,
    /// `--handshake-timeout-secs`
    pub handshake_timeout_secs: Option<u64>,
    /// `--congestion-control`
    pub congestion_control: Option<String>,
    /// `--allow-non-loopback-local`
    pub allow_non_loopback_local: bool,
    /// `--allowed-regions`
    pub allowed_regions: Option<Vec<String>>,
    /// `--audit-log`
    pub audit_log: Option<PathBuf>,
    /// `--compression-level`
    pub compression_level: Option<i32>,
    /// `--upstream` (source) / `--local` (target) for the `postgres` service.
    pub postgres_endpoint: Option<String>,
}

impl AgentConfig {
    /// Merges the file's shared sections and the flags (flags win), applies defaults and
    /// validates. The role sections are the role crates' (`pgferry_source::config`,
    /// `pgferry_target::config`).
    pub fn resolve(role: Role, file: ConfigFile, flags: Overrides) -> Result<Self> {
        let timers = Timers::resolve(&flags, &file.network)?;
        let need = |v: Option<PathBuf>, what: &str, flag: &str| -> Result<PathBuf> {
            v.with_context(|| {
                format!("no {what} configured: set `{flag}` or [tls] in the config file")
            })
        };
        let ca = need(flags.ca.or(file.tls.ca), "CA certificate", "--ca")?;
        let cert = need(flags.cert.or(file.tls.cert), "certificate", "--cert")?;
        let key = need(flags.key.or(file.tls.key), "private key", "--key")?;
        let revocation_list = flags.revocation_list.or(file.tls.revocation_list);
        let transport = resolve_transport(
            flags.listen.or(file.network.listen),
            flags.connect.or(file.network.connect),
            flags.server_name.or(file.network.server_name),
        )?;
        let congestion_control = match flags.congestion_control.or(file.network.congestion_control)
        {
            None => CongestionControl::default(),
            Some(name) => name.parse()?,
        };
        let allow_non_loopback_local =
            flags.allow_non_loopback_local || file.network.allow_non_loopback_local == Some(true);
        let allowed_regions =
            resolve_regions(flags.allowed_regions.or(file.policy.allowed_regions))?;
        let audit_log = flags.audit_log.or(file.audit.log).with_context(|| {
            "no audit log configured: set `--audit-log PATH` or [audit] log in the config file"
        })?;
        let compression_level = flags
            .compression_level
            .or(file.compression.level)
            .unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        if !(-7..=19).contains(&compression_level) {
            bail!("compression level {compression_level} is outside -7..=19");
        }
        let services = resolve_services(role, file.service, flags.postgres_endpoint)?;
        if role == Role::Target && !allow_non_loopback_local {
            check_local_services(&services)?;
        }
        Ok(Self {
            role,
            ca,
            cert,
            key,
            revocation_list,
            transport,
            keep_alive: timers.keep_alive,
            idle_timeout: timers.idle_timeout,
            handshake_timeout: timers.handshake_timeout,
            congestion_control,
            allow_non_loopback_local,
            drain_timeout: timers.drain_timeout,
            resume_grace: timers.resume_grace,
            allowed_regions,
            audit_log,
            compression_level,
            services,
        })
    }
}

/// `listen` or `connect` (exactly one), and the name the listener's certificate must carry.
fn resolve_transport(
    listen: Option<String>,
    connect: Option<String>,
    server_name: Option<String>,
) -> Result<Transport> {
    match (listen, connect) {
        (Some(_), Some(_)) => bail!(
            "both `listen` and `connect` are set: one agent listens, the other dials (choose one)"
        ),
        (None, None) => bail!(
            "neither `listen` nor `connect` is set: give `--listen 0.0.0.0:7443` on one agent and `--connect HOST:7443` on the other"
        ),
        (Some(l), None) => Ok(Transport::Listen(
            l.parse()
                .with_context(|| format!("listen address {l:?} is not IP:port"))?,
        )),
        (None, Some(addr)) => {
            let Endpoint::Tcp(_) =
                Endpoint::parse(&addr).with_context(|| format!("connect address {addr:?}"))?
            else {
                bail!("connect address {addr:?} must be host:port");
            };
            let server_name = server_name.unwrap_or_else(|| host_part(&addr).to_owned());
            Ok(Transport::Connect { addr, server_name })
        }
    }
}

/// The tunnel's timers, each 1–3600 s.
struct Timers {
    keep_alive: Duration,
    idle_timeout: Duration,
    drain_timeout: Duration,
    handshake_timeout: Duration,
    resume_grace: Duration,
}

impl Timers {
    /// Flags over `[network]` over the defaults; the keep-alive must fit in the idle timeout.
    fn resolve(flags: &Overrides, net: &NetworkSection) -> Result<Self> {
        let secs = |v: Option<u64>, d: u64, what: &str| -> Result<Duration> {
            let v = v.unwrap_or(d);
            if v == 0 || v > 3600 {
                bail!("{what} must be between 1 and 3600 seconds, got {v}");
            }
            Ok(Duration::from_secs(v))
        };
        let t = Timers {
            keep_alive: secs(
                flags.keep_alive_secs.or(net.keep_alive_secs),
                DEFAULT_KEEP_ALIVE_SECS,
                "keep_alive_secs",
            )?,
            idle_timeout: secs(
                flags.idle_timeout_secs.or(net.idle_timeout_secs),
                DEFAULT_IDLE_TIMEOUT_SECS,
                "idle_timeout_secs",
            )?,
            drain_timeout: secs(
                flags.drain_timeout_secs.or(net.drain_timeout_secs),
                DEFAULT_DRAIN_TIMEOUT_SECS,
                "drain_timeout_secs",
            )?,
            handshake_timeout: secs(
                flags.handshake_timeout_secs.or(net.handshake_timeout_secs),
                DEFAULT_HANDSHAKE_TIMEOUT_SECS,
                "handshake_timeout_secs",
            )?,
            resume_grace: match flags.resume_grace_secs.or(net.resume_grace_secs) {
                Some(0) => Duration::ZERO,
                v => secs(v, DEFAULT_RESUME_GRACE_SECS, "resume_grace_secs")?,
            },
        };
        if t.keep_alive >= t.idle_timeout {
            bail!(
                "keep_alive_secs ({}) must be smaller than idle_timeout_secs ({}), or the connection times out between keep-alives",
                t.keep_alive.as_secs(),
                t.idle_timeout.as_secs()
            );
        }
        Ok(t)
    }
}

/// The allowed regions: the EEA by default, else the listed ISO 3166 codes (not empty).
fn resolve_regions(list: Option<Vec<String>>) -> Result<RegionSet> {
    let Some(list) = list else {
        return Ok(RegionSet::eea());
    };
    let mut set = BTreeSet::new();
    for code in &list {
        let r: Region = code.trim().parse().map_err(|e| {
            anyhow::anyhow!(
                "allowed_regions: {code:?} is not an ISO 3166 alpha-2 country code: {e}"
            )
        })?;
        set.insert(r);
    }
    if set.is_empty() {
        bail!("allowed_regions is empty: no peer could ever connect");
    }
    Ok(set.into_iter().collect())
}

/// Every local endpoint of the target must be loopback (unless the operator allowed otherwise).
fn check_local_services(services: &[Service]) -> Result<()> {
    for s in services {
        if let Err(e) = check_loopback_local(&s.endpoint) {
            bail!(
                "service {:?}: local endpoint {}: {e}. Local endpoints reach the OLD cluster without \
                 any further check (PostgreSQL sees the tunnel's loopback address, so its \
                 loopback `trust` rules apply): use 127.0.0.1:PORT, [::1]:PORT, localhost:PORT \
                 or unix:/path. To expose it anyway, pass --allow-non-loopback-local \
                 ([network] allow_non_loopback_local = true); that is written to the audit log",
                s.name,
                s.endpoint
            );
        }
    }
    Ok(())
}

fn resolve_services(
    role: Role,
    sections: Vec<ServiceSection>,
    postgres_override: Option<String>,
) -> Result<Vec<Service>> {
    let (key, default) = match role {
        Role::Source => ("upstream", DEFAULT_UPSTREAM),
        Role::Target => ("local", DEFAULT_LOCAL),
    };
    let mut sections = sections;
    if !sections.iter().any(|s| s.name == DEFAULT_SERVICE) {
        sections.insert(
            0,
            ServiceSection {
                name: DEFAULT_SERVICE.into(),
                ..Default::default()
            },
        );
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in sections {
        if !valid_service_name(&s.name) {
            bail!(
                "service name {:?} is invalid: use 1–64 characters of letters, digits, '_', '-', '.'",
                s.name
            );
        }
        if !seen.insert(s.name.clone()) {
            bail!("service {:?} is configured twice", s.name);
        }
        let raw: Option<Vec<String>> = match role {
            Role::Source => s.upstream.clone().map(|u| vec![u]),
            Role::Target => s.local.clone().map(OneOrMany::into_vec),
        };
        let raw = if s.name == DEFAULT_SERVICE {
            match postgres_override.clone() {
                Some(o) => vec![o],
                None => raw.unwrap_or_else(|| vec![default.into()]),
            }
        } else {
            raw.with_context(|| format!("service {:?} has no `{key}` address", s.name))?
        };
        if raw.is_empty() {
            bail!("service {:?} has an empty `{key}` list", s.name);
        }
        for r in raw {
            let endpoint =
                Endpoint::parse(&r).with_context(|| format!("service {:?} `{key}`", s.name))?;
            out.push(Service {
                name: s.name.clone(),
                endpoint,
            });
        }
    }
    Ok(out)
}

/// A local (target) TCP endpoint must be a loopback address or `localhost`; unix sockets are
/// local by nature. The address actually bound is checked again when the agent binds it.
pub fn check_loopback_local(ep: &Endpoint) -> Result<()> {
    let Endpoint::Tcp(addr) = ep else {
        return Ok(());
    };
    let host = host_part(addr);
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(());
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(()),
        Ok(ip) if ip.is_unspecified() => {
            bail!("{ip} listens on every interface, which opens the old cluster to the network")
        }
        Ok(ip) => bail!("{ip} is not a loopback address"),
        Err(_) => bail!(
            "{host:?} is a host name; local endpoints take a loopback IP address or `localhost`"
        ),
    }
}

/// `host` of `host:port`, without IPv6 brackets.
fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Fails unless only the owner may read `path` (`what`: "private key", "password file"):
/// secrets readable by other local users are refused, with the command that fixes it.
pub(crate) fn check_private_file(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// The password in the first line of a password file (mode 0600; its contents never logged).
pub fn read_password_file(path: &Path) -> Result<String> {
    check_private_file(path, "password file")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading password file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_are_loopback_unless_explicitly_allowed() {
        for ok in [
            "127.0.0.1:5433",
            "127.0.0.9:5433",
            "[::1]:5433",
            "localhost:5433",
        ] {
            check_loopback_local(&Endpoint::parse(ok).unwrap()).expect(ok);
        }
        check_loopback_local(&Endpoint::Unix("/run/x/.s.PGSQL.5433".into())).unwrap();
        for bad in [
            "0.0.0.0:5434",
            "[::]:5434",
            "10.0.0.1:5434",
            "db.example:5434",
        ] {
            assert!(
                check_loopback_local(&Endpoint::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
        let flags = |allow| Overrides {
            postgres_endpoint: Some("0.0.0.0:5434".into()),
            allow_non_loopback_local: allow,
            ..minimal()
        };
        let err =
            AgentConfig::resolve(Role::Target, ConfigFile::default(), flags(false)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("0.0.0.0:5434"), "{msg}");
        assert!(msg.contains("--allow-non-loopback-local"), "{msg}");
        let cfg = AgentConfig::resolve(Role::Target, ConfigFile::default(), flags(true)).unwrap();
        assert!(cfg.allow_non_loopback_local);
        // The source's upstreams are not local endpoints: any address is allowed there.
        AgentConfig::resolve(Role::Source, ConfigFile::default(), flags(false)).unwrap();
    }

    fn minimal() -> Overrides {
        Overrides {
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("c.key".into()),
            listen: Some("127.0.0.1:0".into()),
            audit_log: Some("a.log".into()),
            ..Default::default()
        }
    }

    // The default stays CUBIC on purpose: quinn's BBR crowds out other traffic on a shared
    // link (bench/results/path-run.md); BBR is an opt-in.
    #[test]
    fn congestion_control_defaults_to_cubic_and_parses_quinns_three() {
        use CongestionControl::*;
        let cfg = AgentConfig::resolve(Role::Source, ConfigFile::default(), minimal()).unwrap();
        assert_eq!(cfg.congestion_control, Cubic);
        for (name, cc) in [
            ("bbr", Bbr),
            ("BBR", Bbr),
            ("cubic", Cubic),
            ("newreno", NewReno),
            ("reno", NewReno),
        ] {
            assert_eq!(name.parse::<CongestionControl>().unwrap(), cc, "{name}");
            assert_eq!(cc.to_string().parse::<CongestionControl>().unwrap(), cc);
        }
        let err = "vegas".parse::<CongestionControl>().unwrap_err();
        assert!(format!("{err}").contains("bbr, cubic, newreno"), "{err}");
        let file = || -> ConfigFile {
            toml::from_str("[network]\ncongestion_control = \"newreno\"\n").unwrap()
        };
        let cfg = AgentConfig::resolve(Role::Source, file(), minimal()).unwrap();
        assert_eq!(cfg.congestion_control, NewReno);
        let flags = Overrides {
            congestion_control: Some("bbr".into()),
            ..minimal()
        };
        let cfg = AgentConfig::resolve(Role::Source, file(), flags).unwrap();
        assert_eq!(cfg.congestion_control, Bbr, "the flag wins over the file");
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let file: ConfigFile = toml::from_str(
            "[network]\nlisten = \"0.0.0.0:7443\"\nidle_timeout_secs = 60\n[compression]\nlevel = 5\n",
        )
        .unwrap();
        let cfg = AgentConfig::resolve(Role::Source, file, minimal()).unwrap();
        assert!(matches!(cfg.transport, Transport::Listen(a) if a.port() == 0));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.compression_level, 5);
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(
            cfg.services[0].endpoint,
            Endpoint::Tcp(DEFAULT_UPSTREAM.into())
        );
        assert!(cfg.allowed_regions.contains("DE".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_are_rejected_with_location() {
        let err = toml::from_str::<ConfigFile>("[network]\nlistne = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn listen_and_connect_are_exclusive() {
        let mut f = minimal();
        f.connect = Some("h:1".into());
        let err = AgentConfig::resolve(Role::Target, ConfigFile::default(), f).unwrap_err();
        assert!(err.to_string().contains("both"));
    }

    #[test]
    fn services_resolve_per_role() {
        let file: ConfigFile = toml::from_str(
            "[[service]]\nname = \"mysql\"\nlocal = \"127.0.0.1:3307\"\nupstream = \"unix:/run/mysqld.sock\"\n",
        )
        .unwrap();
        let cfg = AgentConfig::resolve(Role::Source, file, minimal()).unwrap();
        assert_eq!(
            cfg.services[1].endpoint,
            Endpoint::Unix("/run/mysqld.sock".into())
        );
        let file: ConfigFile =
            toml::from_str("[[service]]\nname = \"mysql\"\nupstream = \"h:1\"\n").unwrap();
        let err = AgentConfig::resolve(Role::Target, file, minimal()).unwrap_err();
        assert!(format!("{err:#}").contains("local"));
    }

    #[test]
    fn target_service_may_have_several_local_endpoints() {
        let file: ConfigFile = toml::from_str(
            "[[service]]\nname = \"postgres\"\nlocal = [\"127.0.0.1:6000\", \"unix:/tmp/x/.s.PGSQL.6000\"]\n",
        )
        .unwrap();
        let cfg = AgentConfig::resolve(Role::Target, file, minimal()).unwrap();
        let eps: Vec<_> = cfg
            .services
            .iter()
            .map(|s| (s.name.as_str(), &s.endpoint))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("postgres", &Endpoint::Tcp("127.0.0.1:6000".into())),
                ("postgres", &Endpoint::Unix("/tmp/x/.s.PGSQL.6000".into())),
            ]
        );
    }

    #[test]
    fn bad_region_is_named() {
        let mut f = minimal();
        f.allowed_regions = Some(vec!["DE".into(), "XX".into()]);
        let err = AgentConfig::resolve(Role::Source, ConfigFile::default(), f).unwrap_err();
        assert!(err.to_string().contains("XX"));
    }

    #[test]
    fn server_name_defaults_to_connect_host() {
        let mut f = minimal();
        f.listen = None;
        f.connect = Some("db-new.example:7443".into());
        let cfg = AgentConfig::resolve(Role::Source, ConfigFile::default(), f).unwrap();
        assert!(
            matches!(cfg.transport, Transport::Connect { server_name, .. } if server_name == "db-new.example")
        );
    }
}
