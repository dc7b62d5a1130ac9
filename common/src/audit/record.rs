//! The record format shared by the writer and the verifier: canonical form and hash, time
//! stamps, certificate keys, and typed access to the fields the verifier relies on.

use serde_json::{Map, Value};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// `prev` of the first record of a file.
pub(crate) const GENESIS_PREV: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain separation for checkpoint signatures: a checkpoint signature can never be mistaken
/// for (or replayed as) a TLS or any other signature made with the same key.
pub const CHECKPOINT_DOMAIN: &[u8] = b"pgferry-audit-checkpoint-v1\0";
/// The only checkpoint signature algorithm (`details.algorithm`).
pub const CHECKPOINT_ALGORITHM: &str = "ecdsa-p256-sha256";
/// Longest accepted line. Records are small (an `agent_started` with its certificate is about
/// 2 KiB); the limit keeps a damaged file from making the verifier read gigabytes into one line.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 20;
/// `2026-11-24T11:35:22.123Z`.
const TIME_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Event names the verifier, the peer comparison or the report give a meaning to. Other events
/// are free-form: chained and signed like every record, shown by the report when it knows them.
pub mod events {
    /// An agent (re)started; `details.certificate` is the key for the following checkpoints.
    pub const AGENT_STARTED: &str = "agent_started";
    /// A signed checkpoint; written by [`crate::audit::AuditLog::checkpoint`] only.
    pub const CHECKPOINT: &str = "checkpoint";
    /// Written by [`crate::audit::AuditLog::open`] after a crash; see the module docs.
    pub const LOG_RESUMED: &str = "log_resumed";
    /// A forwarded connection began (both agents record it with the same `session_id`).
    pub const STREAM_OPENED: &str = "stream_opened";
    /// The source refused a forwarded connection (unknown service).
    pub const STREAM_REFUSED: &str = "stream_refused";
    /// A forwarded connection ended; compared with the peer's log.
    pub const STREAM_CLOSED: &str = "stream_closed";
    /// A QUIC connection passed certificate and Hello checks.
    pub const HANDSHAKE_ACCEPTED: &str = "handshake_accepted";
    /// A peer was refused (certificate policy or Hello).
    pub const HANDSHAKE_REFUSED: &str = "handshake_refused";
    /// A handshake failed for another reason.
    pub const HANDSHAKE_FAILED: &str = "handshake_failed";
    /// A chunk failed its BLAKE3 check; the stream was reset.
    pub const INTEGRITY_FAILURE: &str = "integrity_failure";
    /// Any other error worth an auditor's attention.
    pub const ERROR: &str = "error";
    /// A QUIC connection with the peer ended.
    pub const SESSION_ENDED: &str = "session_ended";
    /// The agent stopped cleanly (the checkpoint after it closes the log).
    pub const AGENT_STOPPED: &str = "agent_stopped";
}

/// `time` field of a record.
pub(crate) fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(TIME_FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

/// Parses a `time` field; only the exact format the writer produces is accepted.
pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(s, TIME_FORMAT)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// `hash` of a record: hex(BLAKE3(canonical JSON of the record without `hash`)).
pub(crate) fn record_hash(without_hash: &Map<String, Value>) -> String {
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so keys serialise sorted.
    let canonical = Value::Object(without_hash.clone()).to_string();
    blake3::hash(canonical.as_bytes()).to_hex().to_string()
}

/// The JSON pointer of the first non-integer number in `v`, if any.
pub(crate) fn find_float(v: &Value) -> Option<String> {
    fn walk(v: &Value, at: &mut String) -> bool {
        match v {
            Value::Number(n) => !(n.is_i64() || n.is_u64()),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = at.len();
                at.push_str(&format!("/{i}"));
                let found = walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, item)| {
                let len = at.len();
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                let found = walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut at = String::new();
    walk(v, &mut at).then_some(at)
}

/// 64 lowercase hex digits (a BLAKE3 or SHA-256 value as the log writes it).
pub(crate) fn is_hash_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// SHA-256 of a certificate's DER, lowercase hex: the fingerprint checkpoints name.
pub(crate) fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// A fingerprint as written elsewhere (`SHA256:AB:CD…`, `sha256:abcd…`) in the log's form.
pub(crate) fn normalize_fingerprint(s: &str) -> String {
    let lower = s.trim().to_ascii_lowercase();
    let bare = lower
        .strip_prefix("sha256:")
        .or_else(|| lower.strip_prefix("sha-256:"))
        .unwrap_or(&lower);
    bare.chars().filter(|c| *c != ':').collect()
}

/// A certificate that checkpoints are verified with.
#[derive(Debug, Clone)]
pub(crate) struct CertKey {
    pub der: Vec<u8>,
    /// SHA-256 of `der`, lowercase hex.
    pub fingerprint: String,
    /// The uncompressed P-256 point from the subject public key info.
    pub public_key: Vec<u8>,
}

impl CertKey {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not a DER X.509 certificate ({e})"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let spki = cert.public_key();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
            return Err("the certificate's key is not an ECDSA P-256 key".into());
        }
        Ok(Self {
            der: der.to_vec(),
            fingerprint: sha256_hex(der),
            public_key: spki.subject_public_key.data.to_vec(),
        })
    }

    /// Checks a checkpoint signature over `signed_hash`.
    pub fn verify(&self, signed_hash: &[u8; 32], signature: &[u8]) -> bool {
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.public_key,
        );
        key.verify(&checkpoint_message(signed_hash), signature)
            .is_ok()
    }
}

/// What a checkpoint signature is computed over.
pub(crate) fn checkpoint_message(signed_hash: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 32);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(signed_hash);
    m
}

/// Decodes 64 hex digits.
pub(crate) fn hash_bytes(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Typed access to a details object; errors read "details.sent.digest must be …".
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>, prefix: &str) -> Self {
        Self {
            map,
            prefix: prefix.to_string(),
        }
    }

    fn get(&self, key: &str) -> Result<&'a Value, String> {
        self.map
            .get(key)
            .ok_or_else(|| format!("missing field {}{key}", self.prefix))
    }

    pub fn str(&self, key: &str) -> Result<&'a str, String> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| format!("field {}{key} must be a string", self.prefix))
    }

    pub fn u64(&self, key: &str) -> Result<u64, String> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| format!("field {}{key} must be a non-negative integer", self.prefix))
    }

    pub fn hash_hex(&self, key: &str) -> Result<&'a str, String> {
        let s = self.str(key)?;
        if is_hash_hex(s) {
            Ok(s)
        } else {
            Err(format!(
                "field {}{key} must be 64 lowercase hex digits",
                self.prefix
            ))
        }
    }

    pub fn object(&self, key: &str) -> Result<Fields<'a>, String> {
        let map = self
            .get(key)?
            .as_object()
            .ok_or_else(|| format!("field {}{key} must be an object", self.prefix))?;
        Ok(Fields {
            map,
            prefix: format!("{}{key}.", self.prefix),
        })
    }
}
