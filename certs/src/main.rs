//! `pgferry-certs`: the private CA of a migration and the certificates of its two agents.
//!
//! ```text
//!   init    ca.pem + ca.key (0600)            one CA per migration (or per organisation)
//!   issue   <role>.pem + <role>.key (0600)    URI SANs: migration, role, region; DNS/IP SANs
//!   inspect what a certificate says           role, region, migration, validity, fingerprint
//!   revoke  revoked.txt                       agents re-read it on every handshake
//! ```
//!
//! Every file is written through a temporary file in the same directory, fsynced and renamed,
//! so a crash never leaves half a key; keys are created with mode 0600 (never chmod-ed later).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pgferry_common::identity::{
    migration_of_der, Fingerprint, MigrationId, PeerIdentity, Region, RevocationList, Role,
    URI_MIGRATION, URI_REGION, URI_ROLE,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// Private CA and agent certificates for a pgferry migration.
///
/// A migration needs one CA and two certificates: one for pgferry-source (old host) and one for
/// pgferry-target (new host). Each certificate names its migration, role and region; the
/// agents refuse peers whose certificate names another migration, the same role, a region
/// outside their policy, or a revoked fingerprint. Keep ca.key on the machine where it was
/// made.
#[derive(Debug, Parser)]
#[command(name = "pgferry-certs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a CA for a migration: DIR/ca.pem (certificate) and DIR/ca.key (private key, 0600).
    Init {
        /// Migration id (1–64 of A-Z a-z 0-9 . _ -). Certificates issued by this CA carry it.
        #[arg(long)]
        migration: String,
        /// Directory for ca.pem and ca.key (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// CA validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite an existing CA (every certificate it issued stops verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent certificate: PREFIX.pem and PREFIX.key (0600), signed by the CA.
    Issue {
        /// Which agent the certificate is for.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Country the agent runs in (ISO 3166-1 alpha-2, e.g. DE). Outside the EEA needs
        /// --allow-non-eea.
        #[arg(long)]
        region: String,
        /// Host name or IP address the agent is reached at; repeat for several.
        #[arg(long = "name", required = true, value_name = "HOST")]
        names: Vec<String>,
        /// Validity in days from now (short is safer: a stolen certificate expires soon).
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// Directory holding ca.pem and ca.key; also the default output directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// CA certificate (default DIR/ca.pem).
        #[arg(long, value_name = "FILE")]
        ca_cert: Option<PathBuf>,
        /// CA private key (default DIR/ca.key).
        #[arg(long, value_name = "FILE")]
        ca_key: Option<PathBuf>,
        /// Output prefix (default DIR/<role>): writes PREFIX.pem and PREFIX.key.
        #[arg(long, value_name = "PREFIX")]
        out: Option<PathBuf>,
        /// Migration id (default: the one in the CA certificate). For an organisation-wide CA.
        #[arg(long)]
        migration: Option<String>,
        /// Allow a region outside the 30 EEA countries (prints a warning).
        #[arg(long)]
        allow_non_eea: bool,
        /// Start of validity (RFC 3339); default now.
        #[arg(long, value_name = "TIME")]
        not_before: Option<String>,
        /// End of validity (RFC 3339); overrides --days.
        #[arg(long, value_name = "TIME")]
        not_after: Option<String>,
        /// Overwrite existing output files.
        #[arg(long)]
        force: bool,
    },
    /// Show what a certificate says: role, region, migration, validity, SHA-256 fingerprint.
    Inspect {
        /// Certificate file (PEM).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add a certificate's fingerprint to the revocation list agents read on every handshake.
    Revoke {
        /// SHA-256 fingerprint (hex, colons optional) as printed by `inspect`.
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        fingerprint: Option<String>,
        /// Revoke this certificate file instead of naming its fingerprint.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Revocation list (default DIR/revoked.txt; created if missing).
        #[arg(long, value_name = "FILE")]
        list: Option<PathBuf>,
        /// Directory of the default revocation list.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Why (recorded in the list and shown in the agents' refusals).
        #[arg(long)]
        reason: Option<String>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: pgferry_common::identity::IdentityError| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgferry-certs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Init {
            migration,
            dir,
            days,
            force,
        } => init(&migration, &dir, days, force),
        Command::Issue {
            role,
            region,
            names,
            days,
            dir,
            ca_cert,
            ca_key,
            out,
            migration,
            allow_non_eea,
            not_before,
            not_after,
            force,
        } => {
            let ca_cert = ca_cert.unwrap_or_else(|| dir.join("ca.pem"));
            let ca_key = ca_key.unwrap_or_else(|| dir.join("ca.key"));
            let out = out.unwrap_or_else(|| dir.join(role.as_str()));
            issue(IssueArgs {
                role,
                region: &region,
                names: &names,
                days,
                ca_cert: &ca_cert,
                ca_key: &ca_key,
                out: &out,
                migration: migration.as_deref(),
                allow_non_eea,
                not_before: not_before.as_deref(),
                not_after: not_after.as_deref(),
                force,
            })
        }
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Revoke {
            fingerprint,
            cert,
            list,
            dir,
            reason,
        } => {
            let fp = match (fingerprint, cert) {
                (Some(f), _) => f.parse::<Fingerprint>()?,
                (None, Some(c)) => Fingerprint::of_der(&read_cert_der(&c)?),
                (None, None) => bail!("give a FINGERPRINT or --cert FILE"),
            };
            let list = list.unwrap_or_else(|| dir.join("revoked.txt"));
            revoke(fp, &list, reason.as_deref())
        }
    }
}

fn init(migration: &str, dir: &Path, days: i64, force: bool) -> Result<()> {
    let migration: MigrationId = migration.parse()?;
    anyhow::ensure!(days > 0, "--days must be positive");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_overwrite(&[&cert_path, &key_path], force)?;

    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("pgferry CA {migration}"));
    dn.push(DnType::OrganizationName, "pgferry");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![uri(&format!("{URI_MIGRATION}{migration}"))?];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(days);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let not_after = p.not_after;
    let cert = p.self_signed(&key)?;

    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    println!("CA for migration {migration}");
    println!("  certificate  {}", cert_path.display());
    println!(
        "  private key  {} (mode 0600; keep it on this machine)",
        key_path.display()
    );
    println!("  fingerprint  {}", Fingerprint::of_der(cert.der()));
    println!("  valid until  {}", fmt_time(not_after));
    Ok(())
}

struct IssueArgs<'a> {
    role: Role,
    region: &'a str,
    names: &'a [String],
    days: i64,
    ca_cert: &'a Path,
    ca_key: &'a Path,
    out: &'a Path,
    migration: Option<&'a str>,
    allow_non_eea: bool,
    not_before: Option<&'a str>,
    not_after: Option<&'a str>,
    force: bool,
}

/// `issue`: an agent certificate signed by the migration's CA, written beside its private key
/// (0600), then a summary on standard output.
fn issue(a: IssueArgs<'_>) -> Result<()> {
    let region = checked_region(a.region, a.allow_non_eea)?;
    let ca = IssuingCa::load(&a)?;

    let pem_path = with_ext(a.out, "pem");
    let key_path = with_ext(a.out, "key");
    refuse_overwrite(&[&pem_path, &key_path], a.force)?;
    if let Some(parent) = pem_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }

    let p = agent_params(&a, &ca.migration, &region)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let (not_before, not_after) = (p.not_before, p.not_after);
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;

    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&pem_path, cert.pem().as_bytes(), 0o644)?;
    println!(
        "{} certificate for migration {}, region {region}",
        a.role, ca.migration
    );
    println!("  certificate  {}", pem_path.display());
    println!("  private key  {} (mode 0600)", key_path.display());
    println!("  names        {}", a.names.join(", "));
    println!(
        "  valid        {} .. {}",
        fmt_time(not_before),
        fmt_time(not_after)
    );
    println!("  fingerprint  {}", Fingerprint::of_der(cert.der()));
    Ok(())
}

/// The certificate's region; one outside the EEA only with `--allow-non-eea` (agents refuse it
/// by default), and then with a warning.
fn checked_region(region: &str, allow_non_eea: bool) -> Result<Region> {
    let region: Region = region.parse()?;
    if !region.is_eea() {
        if !allow_non_eea {
            bail!(
                "region {region} is outside the EEA; agents refuse it by default. If policy allows \
                 it, pass --allow-non-eea (and widen allowed_regions on both agents)"
            );
        }
        eprintln!(
            "pgferry-certs: warning: region {region} is outside the EEA; agents with the default \
             policy will refuse this certificate"
        );
    }
    Ok(region)
}

/// The CA that signs an agent certificate, and the migration the certificate will name.
struct IssuingCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    migration: MigrationId,
}

impl IssuingCa {
    /// Reads the CA's certificate and key; the migration is `--migration` or else the one the
    /// CA certificate names. Fails if the key does not match the certificate.
    fn load(a: &IssueArgs<'_>) -> Result<Self> {
        let ca_pem = std::fs::read_to_string(a.ca_cert).with_context(|| {
            format!(
                "reading CA certificate {} (run `pgferry-certs init` first)",
                a.ca_cert.display()
            )
        })?;
        let ca_key_pem = std::fs::read_to_string(a.ca_key)
            .with_context(|| format!("reading CA key {}", a.ca_key.display()))?;
        let ca_der = pem_to_der(&ca_pem)
            .with_context(|| format!("parsing CA certificate {}", a.ca_cert.display()))?;
        let migration: MigrationId = match a.migration {
            Some(m) => m.parse()?,
            None => migration_of_der(&ca_der).with_context(|| {
                format!(
                    "CA certificate {} names no migration; pass --migration",
                    a.ca_cert.display()
                )
            })?,
        };
        let ca_key = KeyPair::from_pem(&ca_key_pem)
            .with_context(|| format!("parsing CA key {}", a.ca_key.display()))?;
        let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
            .with_context(|| format!("parsing CA certificate {}", a.ca_cert.display()))?;
        let ca = ca_params
            .self_signed(&ca_key)
            .context("CA key does not match the CA certificate")?;
        Ok(Self {
            cert: ca,
            key: ca_key,
            migration,
        })
    }
}

/// What the agent certificate says: its role and first name as CN, a leaf for TLS server and
/// client use, DNS/IP SANs for `--name`, URI SANs for migration, role and region, and its
/// validity (`--not-before`/`--not-after`, else from five minutes ago for `--days`).
fn agent_params(
    a: &IssueArgs<'_>,
    migration: &MigrationId,
    region: &Region,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{} {}", a.role, a.names[0]));
    dn.push(DnType::OrganizationName, "pgferry");
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    for n in a.names {
        p.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.as_str()
                    .try_into()
                    .with_context(|| format!("--name {n:?} is not a valid DNS name"))?,
            ),
        });
    }
    p.subject_alt_names.extend([
        uri(&format!("{URI_MIGRATION}{migration}"))?,
        uri(&format!("{URI_ROLE}{}", a.role))?,
        uri(&format!("{URI_REGION}{region}"))?,
    ]);
    let now = OffsetDateTime::now_utc();
    p.not_before = match a.not_before {
        Some(t) => parse_time(t, "--not-before")?,
        None => now - Duration::minutes(5),
    };
    p.not_after = match a.not_after {
        Some(t) => parse_time(t, "--not-after")?,
        None => {
            anyhow::ensure!(a.days > 0, "--days must be positive");
            now + Duration::days(a.days)
        }
    };
    anyhow::ensure!(
        p.not_before < p.not_after,
        "not-before must be earlier than not-after"
    );
    Ok(p)
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let der = read_cert_der(file)?;
    let fp = Fingerprint::of_der(&der);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", file.display()))?;
    let now = OffsetDateTime::now_utc();
    let validity = cert.validity();
    let (nb, na) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    let status = if now < nb {
        "not yet valid"
    } else if now > na {
        "expired"
    } else {
        "valid"
    };
    if cert.is_ca() {
        let migration = migration_of_der(&der).map(|m| m.to_string()).ok();
        if json {
            let v = serde_json::json!({
                "kind": "ca", "migration": migration, "subject": cert.subject().to_string(),
                "not_before": fmt_time(nb), "not_after": fmt_time(na), "status": status,
                "fingerprint": fp.to_string(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{}: CA certificate", file.display());
            println!(
                "  migration    {}",
                migration.as_deref().unwrap_or("(none)")
            );
            println!("  subject      {}", cert.subject());
            println!(
                "  valid        {} .. {} ({status})",
                fmt_time(nb),
                fmt_time(na)
            );
            println!("  fingerprint  {fp}");
        }
        return Ok(());
    }
    let id = PeerIdentity::from_der(&der)
        .with_context(|| format!("{} is not a pgferry agent certificate", file.display()))?;
    let eea = if id.region.is_eea() {
        "EEA"
    } else {
        "outside EEA"
    };
    if json {
        let v = serde_json::json!({
            "kind": "agent", "role": id.role.as_str(), "region": id.region.as_str(),
            "eea": id.region.is_eea(), "migration": id.migration.as_str(), "subject": id.subject,
            "names": id.names, "not_before": fmt_time(id.not_before),
            "not_after": fmt_time(id.not_after), "status": status, "fingerprint": fp.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}: {} certificate", file.display(), id.role);
        println!("  role         {}", id.role);
        println!("  region       {} ({eea})", id.region);
        println!("  migration    {}", id.migration);
        println!("  subject      {}", id.subject);
        println!("  names        {}", id.names.join(", "));
        println!(
            "  valid        {} .. {} ({status})",
            fmt_time(id.not_before),
            fmt_time(id.not_after)
        );
        println!("  fingerprint  {fp}");
    }
    Ok(())
}

fn revoke(fp: Fingerprint, list_path: &Path, reason: Option<&str>) -> Result<()> {
    let mut list = if list_path.exists() {
        RevocationList::load(list_path)?
    } else {
        RevocationList::empty()
    };
    let now = fmt_time(OffsetDateTime::now_utc());
    let note = match reason {
        Some(r) => format!("revoked {now}: {r}"),
        None => format!("revoked {now}"),
    };
    if !list.insert(fp, note) {
        println!("{fp} is already revoked in {}", list_path.display());
        return Ok(());
    }
    if let Some(parent) = list_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_atomic(list_path, list.to_text().as_bytes(), 0o644)?;
    println!(
        "revoked {fp} ({} entries in {}); agents refuse it from their next handshake",
        list.len(),
        list_path.display()
    );
    Ok(())
}

fn uri(s: &str) -> Result<SanType> {
    Ok(SanType::URI(
        s.try_into().with_context(|| format!("URI SAN {s:?}"))?,
    ))
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn parse_time(s: &str, flag: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .with_context(|| format!("{flag} {s:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"))
}

fn fmt_time(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    anyhow::ensure!(
        p.label == "CERTIFICATE",
        "PEM block is {:?}, not CERTIFICATE",
        p.label
    );
    Ok(p.contents)
}

fn read_cert_der(path: &Path) -> Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    pem_to_der(&text).with_context(|| format!("{}", path.display()))
}

fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            bail!("{} already exists; pass --force to replace it", p.display());
        }
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: temp file (created with `mode`) in the same directory,
/// fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
