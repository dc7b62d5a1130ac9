//! Who is on the other end: certificate → [`PeerIdentity`], and the [`Policy`] that decides
//! whether that peer may join this migration.
//!
//! webpki checks the chain and the validity period but knows nothing about pgferry's URI SANs,
//! so this module parses the leaf itself:
//!
//! ```text
//!   urn:pgferry:migration:<id>    the migration the certificate was issued for
//!   urn:pgferry:role:<source|target>
//!   urn:pgferry:region:<CC>       ISO 3166-1 alpha-2 country code
//! ```
//!
//! The policy checks, in this order: role (must be the opposite of ours), migration (ours),
//! region (in the allowed set, default the 30 EEA countries), revocation (fingerprint not on the
//! list), validity (covers now). The first failing check becomes a [`Refusal`] that names the
//! check, the certificate fingerprint and the reason in words an operator can act on.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// URI SAN prefix carrying the migration id.
pub const URI_MIGRATION: &str = "urn:pgferry:migration:";
/// URI SAN prefix carrying the role.
pub const URI_ROLE: &str = "urn:pgferry:role:";
/// URI SAN prefix carrying the region.
pub const URI_REGION: &str = "urn:pgferry:region:";

/// Errors reading certificates, identities and revocation lists.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has no {0} URI SAN; it was not issued by pgferry-certs for a migration")]
    MissingSan(&'static str),
    #[error("certificate has more than one {0} URI SAN; refusing an ambiguous identity")]
    DuplicateSan(&'static str),
    #[error("invalid role {0:?}: expected \"source\" or \"target\"")]
    Role(String),
    #[error("invalid region {0:?}: not an ISO 3166-1 alpha-2 code (examples: DE, FR, NL)")]
    Region(String),
    #[error("invalid migration id {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    Migration(String),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (SHA-256), colons optional")]
    Fingerprint(String),
    #[error("revocation list line {line}: {reason}")]
    RevocationLine { line: usize, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Which side of the migration an agent is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Next to the old PostgreSQL; answers data streams.
    Source,
    /// On the new host; offers the local endpoint and drives the migration.
    Target,
}

impl Role {
    /// The role a peer must have.
    pub fn opposite(self) -> Role {
        match self {
            Role::Source => Role::Target,
            Role::Target => Role::Source,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "source" => Ok(Role::Source),
            "target" => Ok(Role::Target),
            _ => Err(IdentityError::Role(s.to_string())),
        }
    }
}

/// The 30 countries of the European Economic Area: EU 27 plus Iceland, Liechtenstein, Norway.
pub const EEA_REGIONS: [&str; 30] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
];

/// How messages and reports name [`EEA_REGIONS`] as a whole.
pub const EEA_DESCRIPTION: &str = "the EEA (30 countries)";

/// ISO 3166-1 alpha-2 officially assigned codes.
const ISO_3166_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP \
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT \
MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW \
SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG \
UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// A country code (ISO 3166-1 alpha-2), stored uppercase.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region([u8; 2]);

impl Region {
    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII uppercase letters.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// Whether the region is one of the 30 EEA countries.
    pub fn is_eea(&self) -> bool {
        EEA_REGIONS.contains(&self.as_str())
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({})", self.as_str())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Region {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.trim().to_ascii_uppercase();
        let b = up.as_bytes();
        if b.len() == 2
            && b.iter().all(u8::is_ascii_uppercase)
            && ISO_3166_ALPHA2.split_whitespace().any(|c| c == up)
        {
            Ok(Region([b[0], b[1]]))
        } else {
            Err(IdentityError::Region(s.to_string()))
        }
    }
}

/// The regions a peer (and this agent itself) may be in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSet(BTreeSet<Region>);

impl RegionSet {
    /// The default: the 30 EEA countries.
    pub fn eea() -> Self {
        EEA_REGIONS
            .iter()
            .map(|c| c.parse().expect("EEA codes are ISO codes"))
            .collect()
    }

    pub fn contains(&self, r: Region) -> bool {
        self.0.contains(&r)
    }

    pub fn iter(&self) -> impl Iterator<Item = Region> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this is exactly the EEA set (for messages: "EEA" reads better than 30 codes).
    pub fn is_eea(&self) -> bool {
        *self == Self::eea()
    }
}

impl FromIterator<Region> for RegionSet {
    fn from_iter<I: IntoIterator<Item = Region>>(iter: I) -> Self {
        RegionSet(iter.into_iter().collect())
    }
}

impl fmt::Display for RegionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<&str> = self.0.iter().map(Region::as_str).collect();
        f.write_str(&codes.join(","))
    }
}

impl FromStr for RegionSet {
    type Err = IdentityError;
    /// `eea`, or a comma-separated list of codes, where `eea` may appear as an element
    /// (`eea,CH`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.eq_ignore_ascii_case("eea") {
                set.extend(Self::eea().0);
            } else {
                set.insert(part.parse()?);
            }
        }
        if set.is_empty() {
            return Err(IdentityError::Region(s.to_string()));
        }
        Ok(RegionSet(set))
    }
}

/// The migration a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(String);

impl MigrationId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for MigrationId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(MigrationId(s.to_string()))
        } else {
            Err(IdentityError::Migration(s.to_string()))
        }
    }
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// `AB:CD:…`, the form `openssl x509 -fingerprint -sha256` prints.
    pub fn colon_hex(&self) -> String {
        self.0
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let compact: String = s.trim().chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        match hex::decode_to_slice(&compact, &mut out) {
            Ok(()) => Ok(Fingerprint(out)),
            Err(_) => Err(IdentityError::Fingerprint(s.to_string())),
        }
    }
}

/// What a pgferry certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub migration: MigrationId,
    pub role: Role,
    pub region: Region,
    pub fingerprint: Fingerprint,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub subject: String,
    /// DNS and IP subject alternative names.
    pub names: Vec<String>,
}

struct Sans {
    migration: Option<String>,
    role: Option<String>,
    region: Option<String>,
    names: Vec<String>,
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        Ok(_) => Err(IdentityError::Malformed(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(IdentityError::Malformed(e.to_string())),
    }
}

fn sans(cert: &X509Certificate<'_>) -> Result<Sans, IdentityError> {
    let mut out = Sans {
        migration: None,
        role: None,
        region: None,
        names: Vec::new(),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(format!("subjectAltName: {e}")))?;
    let Some(san) = san else { return Ok(out) };
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => {
                for (prefix, slot, what) in [
                    (URI_MIGRATION, &mut out.migration, "migration"),
                    (URI_ROLE, &mut out.role, "role"),
                    (URI_REGION, &mut out.region, "region"),
                ] {
                    if let Some(v) = uri.strip_prefix(prefix) {
                        if slot.is_some() {
                            return Err(IdentityError::DuplicateSan(what));
                        }
                        *slot = Some(v.to_string());
                    }
                }
            }
            GeneralName::DNSName(d) => out.names.push(d.to_string()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => out.names.push(
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("len 4")).to_string(),
                ),
                16 => out.names.push(
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("len 16"))
                        .to_string(),
                ),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(out)
}

/// The migration id a certificate names (works for the CA certificate too).
pub fn migration_of_der(der: &[u8]) -> Result<MigrationId, IdentityError> {
    let cert = parse_cert(der)?;
    sans(&cert)?
        .migration
        .ok_or(IdentityError::MissingSan("migration"))?
        .parse()
}

impl PeerIdentity {
    /// Reads a leaf certificate. Does not check the chain or any policy.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let cert = parse_cert(der)?;
        let s = sans(&cert)?;
        let migration = s
            .migration
            .ok_or(IdentityError::MissingSan("migration"))?
            .parse()?;
        let role = s.role.ok_or(IdentityError::MissingSan("role"))?.parse()?;
        let region = s
            .region
            .ok_or(IdentityError::MissingSan("region"))?
            .parse()?;
        let validity = cert.validity();
        Ok(PeerIdentity {
            migration,
            role,
            region,
            fingerprint: Fingerprint::of_der(der),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            subject: cert.subject().to_string(),
            names: s.names,
        })
    }
}

/// Fingerprints that must be refused, with the operator's note for each.
///
/// Text format, one entry per line: `<sha256 hex>  # note`; blank lines and lines starting with
/// `#` are ignored. `pgferry-certs revoke` writes it; agents re-read it on every handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    entries: BTreeMap<Fingerprint, String>,
}

impl RevocationList {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let mut entries = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (fp, note) = match line.split_once('#') {
                Some((fp, note)) => (fp.trim(), note.trim()),
                None => (line, ""),
            };
            let fp: Fingerprint = fp.parse().map_err(|_| IdentityError::RevocationLine {
                line: i + 1,
                reason: format!("{fp:?} is not a SHA-256 fingerprint (64 hex digits)"),
            })?;
            entries.insert(fp, note.to_string());
        }
        Ok(RevocationList { entries })
    }

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            IdentityError::RevocationLine { line, reason } => IdentityError::RevocationLine {
                line,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.entries.contains_key(fp)
    }

    /// The note recorded for a revoked fingerprint.
    pub fn note(&self, fp: &Fingerprint) -> Option<&str> {
        self.entries.get(fp).map(String::as_str)
    }

    /// Adds an entry; false if it was already there (the old note is kept).
    pub fn insert(&mut self, fp: Fingerprint, note: String) -> bool {
        if self.entries.contains_key(&fp) {
            return false;
        }
        self.entries.insert(fp, note.replace(['\n', '\r'], " "));
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::from(
            "# pgferry revocation list: one SHA-256 certificate fingerprint per line.\n\
             # Agents re-read this file on every handshake and refuse listed certificates.\n",
        );
        for (fp, note) in &self.entries {
            if note.is_empty() {
                out.push_str(&format!("{fp}\n"));
            } else {
                out.push_str(&format!("{fp}  # {note}\n"));
            }
        }
        out
    }
}

/// Which check refused a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// The peer presented no certificate.
    NoCertificate,
    /// The chain does not lead to the configured CA (or is otherwise invalid for WebPKI).
    Chain,
    /// The certificate cannot be read as a pgferry identity.
    Malformed,
    /// Same role as ours (two targets, or two sources).
    Role,
    /// Another migration id.
    Migration,
    /// Region outside the allowed set.
    Region,
    /// Fingerprint on the revocation list.
    Revoked,
    /// Validity period does not cover now.
    Validity,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::NoCertificate => "no-certificate",
            Check::Chain => "chain",
            Check::Malformed => "malformed",
            Check::Role => "role",
            Check::Migration => "migration",
            Check::Region => "region",
            Check::Revoked => "revoked",
            Check::Validity => "validity",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub check: Check,
    pub fingerprint: Option<Fingerprint>,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fingerprint {
            Some(fp) => write!(f, "check {}, certificate {fp}: {}", self.check, self.reason),
            None => write!(f, "check {}, no certificate: {}", self.check, self.reason),
        }
    }
}

impl std::error::Error for Refusal {}

/// The identity rules for one agent.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Our migration (from our own certificate).
    pub migration: MigrationId,
    /// Our role; the peer must have the opposite one.
    pub local_role: Role,
    pub allowed_regions: RegionSet,
    pub revoked: RevocationList,
}

impl Policy {
    fn regions_text(&self) -> String {
        if self.allowed_regions.is_eea() {
            EEA_DESCRIPTION.to_string()
        } else {
            self.allowed_regions.to_string()
        }
    }

    fn common(&self, id: &PeerIdentity, now: OffsetDateTime, whose: &str) -> Result<(), Refusal> {
        let refuse = |check, reason| Refusal {
            check,
            fingerprint: Some(id.fingerprint),
            reason,
        };
        if id.migration != self.migration {
            return Err(refuse(
                Check::Migration,
                format!(
                    "{whose} certificate is for migration {:?}, this agent serves migration {:?}",
                    id.migration.as_str(),
                    self.migration.as_str()
                ),
            ));
        }
        if !self.allowed_regions.contains(id.region) {
            return Err(refuse(
                Check::Region,
                format!(
                    "{whose} region {} is outside the allowed regions ({}); widen `allowed_regions` only if policy permits",
                    id.region,
                    self.regions_text()
                ),
            ));
        }
        if self.revoked.contains(&id.fingerprint) {
            let note = self.revoked.note(&id.fingerprint).unwrap_or("");
            return Err(refuse(
                Check::Revoked,
                if note.is_empty() {
                    format!("{whose} certificate is on the revocation list")
                } else {
                    format!("{whose} certificate is on the revocation list ({note})")
                },
            ));
        }
        if now < id.not_before {
            return Err(refuse(
                Check::Validity,
                format!(
                    "{whose} certificate is not valid before {} (now {})",
                    fmt_time(id.not_before),
                    fmt_time(now)
                ),
            ));
        }
        if now > id.not_after {
            return Err(refuse(
                Check::Validity,
                format!(
                    "{whose} certificate expired at {} (now {}); issue a new one with pgferry-certs issue",
                    fmt_time(id.not_after),
                    fmt_time(now)
                ),
            ));
        }
        Ok(())
    }

    /// Checks a peer's identity (after WebPKI accepted its chain).
    pub fn check_peer(&self, id: &PeerIdentity, now: OffsetDateTime) -> Result<(), Refusal> {
        if id.role == self.local_role {
            return Err(Refusal {
                check: Check::Role,
                fingerprint: Some(id.fingerprint),
                reason: format!(
                    "peer certificate has role {}, the same as this agent; a {} agent only talks to a {}",
                    id.role,
                    self.local_role,
                    self.local_role.opposite()
                ),
            });
        }
        self.common(id, now, "peer")
    }

    /// Checks this agent's own certificate before it starts: same rules as for a peer, but the
    /// role must be ours.
    pub fn check_own(&self, id: &PeerIdentity, now: OffsetDateTime) -> Result<(), Refusal> {
        if id.role != self.local_role {
            return Err(Refusal {
                check: Check::Role,
                fingerprint: Some(id.fingerprint),
                reason: format!(
                    "own certificate has role {}, but this is the {} agent; use the {} certificate",
                    id.role, self.local_role, self.local_role
                ),
            });
        }
        self.common(id, now, "own")
    }

    /// Parses and checks a peer's leaf certificate.
    pub fn check_peer_der(&self, der: &[u8], now: OffsetDateTime) -> Result<PeerIdentity, Refusal> {
        let id = PeerIdentity::from_der(der).map_err(|e| Refusal {
            check: Check::Malformed,
            fingerprint: Some(Fingerprint::of_der(der)),
            reason: e.to_string(),
        })?;
        self.check_peer(&id, now)?;
        Ok(id)
    }
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(migration: &str, role: &str, region: &str, days: (i64, i64)) -> Vec<u8> {
        let mut p = CertificateParams::new(vec!["host.example".to_string()]).unwrap();
        for uri in [
            format!("{URI_MIGRATION}{migration}"),
            format!("{URI_ROLE}{role}"),
            format!("{URI_REGION}{region}"),
        ] {
            p.subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        p.subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        let now = OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn policy(role: Role) -> Policy {
        Policy {
            migration: "m1".parse().unwrap(),
            local_role: role,
            allowed_regions: RegionSet::eea(),
            revoked: RevocationList::empty(),
        }
    }

    #[test]
    fn parses_identity_from_sans() {
        let der = cert("m1", "source", "de", (-1, 1));
        let id = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.migration.as_str(), "m1");
        assert_eq!(id.role, Role::Source);
        assert_eq!(id.region.as_str(), "DE");
        assert_eq!(id.names, vec!["host.example", "10.0.0.1"]);
        assert_eq!(id.fingerprint, Fingerprint::of_der(&der));
    }

    #[test]
    fn each_check_refuses_with_its_name() {
        let now = OffsetDateTime::now_utc();
        let p = policy(Role::Target);
        let ok = PeerIdentity::from_der(&cert("m1", "source", "FR", (-1, 1))).unwrap();
        p.check_peer(&ok, now).unwrap();
        let cases = [
            (cert("m1", "target", "FR", (-1, 1)), Check::Role),
            (cert("m2", "source", "FR", (-1, 1)), Check::Migration),
            (cert("m1", "source", "US", (-1, 1)), Check::Region),
            (cert("m1", "source", "FR", (-3, -1)), Check::Validity),
            (cert("m1", "source", "FR", (1, 3)), Check::Validity),
        ];
        for (der, check) in cases {
            let r = p.check_peer_der(&der, now).unwrap_err();
            assert_eq!(r.check, check, "{r}");
            assert_eq!(r.fingerprint, Some(Fingerprint::of_der(&der)));
        }
        let mut p = p;
        p.revoked.insert(ok.fingerprint, "stolen laptop".into());
        let r = p.check_peer(&ok, now).unwrap_err();
        assert_eq!(r.check, Check::Revoked);
        assert!(r.reason.contains("stolen laptop"));
    }

    #[test]
    fn own_certificate_must_have_own_role_and_allowed_region() {
        let now = OffsetDateTime::now_utc();
        let p = policy(Role::Source);
        let own = PeerIdentity::from_der(&cert("m1", "source", "NO", (-1, 1))).unwrap();
        p.check_own(&own, now).unwrap();
        let wrong = PeerIdentity::from_der(&cert("m1", "target", "NO", (-1, 1))).unwrap();
        assert_eq!(p.check_own(&wrong, now).unwrap_err().check, Check::Role);
        let us = PeerIdentity::from_der(&cert("m1", "source", "US", (-1, 1))).unwrap();
        assert_eq!(p.check_own(&us, now).unwrap_err().check, Check::Region);
    }

    #[test]
    fn missing_sans_are_named() {
        let key = KeyPair::generate().unwrap();
        let der = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec();
        let e = PeerIdentity::from_der(&der).unwrap_err();
        assert!(e.to_string().contains("migration"), "{e}");
        let r = policy(Role::Target).check_peer_der(&der, OffsetDateTime::now_utc());
        assert_eq!(r.unwrap_err().check, Check::Malformed);
        assert!(PeerIdentity::from_der(b"garbage").is_err());
    }

    #[test]
    fn regions() {
        assert_eq!(EEA_REGIONS.len(), 30);
        assert!(EEA_REGIONS
            .iter()
            .all(|c| c.parse::<Region>().unwrap().is_eea()));
        assert!(!"US".parse::<Region>().unwrap().is_eea());
        assert!(!"CH".parse::<Region>().unwrap().is_eea());
        assert!("XX".parse::<Region>().is_err());
        assert!("DEU".parse::<Region>().is_err());
        let s: RegionSet = "eea,ch".parse().unwrap();
        assert_eq!(s.len(), 31);
        assert!(s.contains("CH".parse().unwrap()));
        assert!(RegionSet::eea().is_eea());
        assert_eq!("DE, fr".parse::<RegionSet>().unwrap().to_string(), "DE,FR");
    }

    #[test]
    fn fingerprints_and_revocation_text_round_trip() {
        let fp = Fingerprint::of_der(b"abc");
        assert_eq!(fp.to_string().len(), 64);
        assert_eq!(fp.colon_hex().parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            fp.to_string()
                .to_uppercase()
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert!("abcd".parse::<Fingerprint>().is_err());
        let mut list = RevocationList::empty();
        assert!(list.insert(fp, "lost".into()));
        assert!(!list.insert(fp, "again".into()));
        let back = RevocationList::parse(&list.to_text()).unwrap();
        assert_eq!(back, list);
        let e = RevocationList::parse("# c\n\nnot-a-fingerprint\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn migration_ids() {
        assert!("eu-move_2026.1".parse::<MigrationId>().is_ok());
        for bad in ["", "-x", "a b", "ü", &"a".repeat(65)] {
            assert!(bad.parse::<MigrationId>().is_err(), "{bad}");
        }
    }
}
