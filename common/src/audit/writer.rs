//! The writing side: [`CheckpointSigner`] holds the agent's key, [`AuditLog`] appends records
//! and signed checkpoints to a file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read as _, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::record::{
    checkpoint_message, events, find_float, format_time, hash_bytes, record_hash, CertKey,
    CHECKPOINT_ALGORITHM, GENESIS_PREV, MAX_RECORD_BYTES,
};
use super::verify::{
    certificate_identity, check_event_details, self_description, verify_records, VerifyOptions,
};
use super::AuditError;

/// The agent's TLS key and certificate, used to sign checkpoints.
pub struct CheckpointSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    cert: CertKey,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("fingerprint", &self.cert.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// `pkcs8_der`: the agent's ECDSA P-256 key (PKCS#8 DER); `cert_der`: its certificate.
    /// Fails unless the key belongs to the certificate: checkpoints signed with any other key
    /// would never verify.
    pub fn new(pkcs8_der: &[u8], cert_der: &[u8]) -> Result<Self, AuditError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der, &rng)
            .map_err(|e| AuditError::Key(e.to_string()))?;
        let cert = CertKey::parse(cert_der).map_err(AuditError::Certificate)?;
        if key.public_key().as_ref() != cert.public_key.as_slice() {
            return Err(AuditError::KeyMismatch);
        }
        Ok(Self { key, rng, cert })
    }

    /// The certificate's DER, as `agent_started` embeds it (base64).
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert.der
    }

    /// SHA-256 of the certificate DER, lowercase hex: the checkpoints' `fingerprint`.
    pub fn fingerprint(&self) -> &str {
        &self.cert.fingerprint
    }

    fn sign(&self, signed_hash: &[u8; 32]) -> Result<Vec<u8>, AuditError> {
        self.key
            .sign(&self.rng, &checkpoint_message(signed_hash))
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| AuditError::Signing)
    }
}

/// The lock file next to a log: `<log>.lock`.
pub(crate) fn lock_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    log.with_file_name(name)
}

/// What makes an [`AuditLog`] its file's only writer: an exclusive flock(2) on `<log>.lock`,
/// which holds the holder's pid for the message the next opener gets.
///
/// flock locks belong to the open file description, not to the process: unlike POSIX `fcntl`
/// record locks, which the process loses as soon as it closes *any* descriptor of the file,
/// this one survives the agent (or `audit verify` in the same process) opening and closing the
/// log or the lock file for reading. The descriptor is close-on-exec, so the processes an
/// agent starts (pg_basebackup, a hook) do not inherit the lock. The kernel releases it when
/// the holder exits, however it exits. The lock file is never removed: unlinking it would let
/// a waiter lock the unlinked file while a newcomer locks a fresh one.
#[derive(Debug)]
struct WriterLock {
    file: Flock<File>,
}

impl WriterLock {
    /// Takes the lock without waiting, before the log itself is opened.
    fn acquire(log: &Path) -> Result<Self, AuditError> {
        let lock = lock_path(log);
        let io = |action: &'static str| {
            let path = lock.clone();
            move |source| AuditError::Io {
                path,
                action,
                source,
            }
        };
        let mut options = OpenOptions::new();
        // No truncation before the lock is ours: the holder's pid must stay readable.
        options.read(true).write(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        let file = options.open(&lock).map_err(io("opening the lock file"))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => {
                file.set_len(0)
                    .and_then(|()| {
                        (&*file).write_all(format!("{}\n", std::process::id()).as_bytes())
                    })
                    .map_err(io("writing the lock file"))?;
                Ok(Self { file })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(AuditError::Locked {
                    path: log.to_path_buf(),
                    pid: holder.trim().parse().ok(),
                })
            }
            Err((_, errno)) => Err(io("locking")(std::io::Error::from(errno))),
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // The pid goes before the lock does (the field's own drop unlocks): a stale pid in an
        // unlocked file would only mislead an operator reading it.
        let _ = self.file.set_len(0);
    }
}

/// An open audit log, and the only writer of its file: [`AuditLog::open`] takes an exclusive
/// lock that lasts as long as the `AuditLog` (readers such as `audit verify` need no lock).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Held for the log's lifetime; dropped after `file`.
    _lock: WriterLock,
    signer: CheckpointSigner,
    next_seq: u64,
    last_hash: String,
    /// Records after the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint_seq: Option<u64>,
    /// The most recent `agent_started` in the file names the signer's certificate, so a
    /// checkpoint written now verifies.
    announced: bool,
    /// A write failed part-way: the file may end in a partial line.
    poisoned: bool,
    /// Role, region and migration of the signer's certificate (its URI SANs): every record
    /// that names them must agree.
    identity: Option<(String, String, String)>,
}

impl AuditLog {
    /// Opens or creates (mode 0640, parent directories too) the log at `path`.
    ///
    /// First it takes the log's writer lock (`<path>.lock`, see [`AuditError::Locked`]):
    /// while another `AuditLog` (in any process) holds it, open fails without reading or
    /// writing the log. A log whose `agent_started` records name another role or migration
    /// than the signer's certificate is refused too ([`AuditError::WrongLog`]).
    ///
    /// An existing log is verified first (chain and checkpoint signatures; an unsigned tail is
    /// allowed): a log that fails is never appended to, and the error names the line. If it
    /// does not end in a checkpoint (the agent crashed or was killed), a `log_resumed` record
    /// with `{"unsigned_records": n}` is appended first; see the module docs.
    pub fn open(path: &Path, signer: CheckpointSigner) -> Result<Self, AuditError> {
        let io = |action: &'static str| {
            move |source| AuditError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent {
            std::fs::create_dir_all(dir).map_err(io("creating the parent directory"))?;
        }
        // Before the log is even opened: a second agent must not read a tail that the first is
        // still writing, nor append its log_resumed.
        let lock = WriterLock::acquire(path)?;
        let existed = path.exists();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        let file = options.open(path).map_err(io("opening"))?;
        let len = file.metadata().map_err(io("reading metadata"))?.len();

        let mut log = Self {
            path: path.to_path_buf(),
            file,
            _lock: lock,
            signer,
            next_seq: 0,
            last_hash: GENESIS_PREV.to_string(),
            since_checkpoint: 0,
            last_checkpoint_seq: None,
            announced: false,
            poisoned: false,
            identity: None,
        };
        log.identity = certificate_identity(log.signer.certificate_der());
        if !existed {
            // Make the new directory entry durable, not only the data written later.
            if let Some(dir) = parent {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        if len == 0 {
            return Ok(log);
        }

        let opts = VerifyOptions {
            allow_open: true,
            ca_der: None,
        };
        let (_, tip) =
            verify_records(BufReader::new(&log.file), &opts, drop).map_err(|source| {
                AuditError::Broken {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        if let (Some(theirs), Some((our_role, _, our_migration))) = (&tip.identity, &log.identity) {
            if theirs.role != *our_role || theirs.migration != *our_migration {
                return Err(AuditError::WrongLog {
                    path: path.to_path_buf(),
                    log_writer: format!("{} agent of migration {}", theirs.role, theirs.migration),
                    line: theirs.line,
                    ours: format!("{our_role} of migration {our_migration}"),
                });
            }
        }
        log.next_seq = tip.next_seq;
        log.last_hash = tip.last_hash;
        log.since_checkpoint = tip.since_checkpoint;
        log.last_checkpoint_seq = tip.last_checkpoint_seq;
        log.announced = tip
            .current_cert
            .is_some_and(|c| c.der == log.signer.certificate_der());
        if tip.since_checkpoint > 0 {
            let details = json!({
                "unsigned_records": tip.since_checkpoint,
                "reason": "the previous run did not end with a checkpoint (crash or kill): the records after the last checkpoint were not signed while the agent was down",
            });
            log.write_record(events::LOG_RESUMED, details, OffsetDateTime::now_utc())?;
        }
        Ok(log)
    }

    /// Appends one record and returns its `seq`.
    ///
    /// The line goes out in one `write_all` on the append-mode file, without fsync: it survives
    /// the agent being killed, and a power failure may lose the records since the last
    /// checkpoint (which fsyncs). Details must be an object without floats; the events the
    /// verifier interprets must carry their fields (an `agent_started` without `certificate`
    /// gets the signer's, and one naming another certificate is refused). `checkpoint` and
    /// `log_resumed` are written by the log itself.
    pub fn append(&mut self, event: &str, details: Value) -> Result<u64, AuditError> {
        self.append_at(event, details, OffsetDateTime::now_utc())
    }

    /// [`append`](Self::append) with the record's time given (tests; replay tools).
    pub(crate) fn append_at(
        &mut self,
        event: &str,
        mut details: Value,
        time: OffsetDateTime,
    ) -> Result<u64, AuditError> {
        if event == events::CHECKPOINT || event == events::LOG_RESUMED {
            return Err(AuditError::ReservedEvent(event.to_string()));
        }
        let invalid = |reason: String| AuditError::InvalidDetails {
            event: event.to_string(),
            reason,
        };
        if event.is_empty() {
            return Err(invalid("the event name is empty".into()));
        }
        let Value::Object(map) = &mut details else {
            return Err(invalid("details must be a JSON object".into()));
        };
        let starting = event == events::AGENT_STARTED;
        if starting {
            let ours = base64::engine::general_purpose::STANDARD.encode(&self.signer.cert.der);
            match map.get("certificate") {
                None => {
                    map.insert("certificate".into(), Value::String(ours));
                }
                Some(Value::String(c)) if *c == ours => {}
                Some(_) => return Err(AuditError::CertificateMismatch),
            }
        }
        if let Some(at) = find_float(&details) {
            return Err(invalid(format!(
                "the number at details{at} is not an integer (the log holds integers only)"
            )));
        }
        if let Value::Object(map) = &details {
            check_event_details(event, map).map_err(invalid)?;
            if let Some((role, region, migration)) = &self.identity {
                for (field, value) in self_description(map) {
                    let certificate = match field {
                        "role" => role,
                        "region" => region,
                        _ => migration,
                    };
                    if value != *certificate {
                        return Err(AuditError::IdentityMismatch {
                            event: event.to_string(),
                            field,
                            value,
                            certificate: certificate.clone(),
                        });
                    }
                }
            }
        }
        let seq = self.write_record(event, details, time)?;
        if starting {
            self.announced = true;
        }
        Ok(seq)
    }

    /// Appends a signed checkpoint covering every record so far, then fsyncs; returns its
    /// `seq`. With nothing new since the last checkpoint it writes nothing and returns the last
    /// checkpoint's `seq` (two checkpoints in a row would add nothing and would make a cut
    /// between them undetectable).
    pub fn checkpoint(&mut self) -> Result<u64, AuditError> {
        self.checkpoint_at(OffsetDateTime::now_utc())
    }

    /// [`checkpoint`](Self::checkpoint) with the record's time given (tests).
    pub(crate) fn checkpoint_at(&mut self, time: OffsetDateTime) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned(self.path.clone()));
        }
        if let (0, Some(seq)) = (self.since_checkpoint, self.last_checkpoint_seq) {
            return Ok(seq);
        }
        if !self.announced {
            return Err(AuditError::NoAgentStarted);
        }
        let signed =
            hash_bytes(&self.last_hash).expect("the log keeps its hashes as 64 hex digits");
        let signature = self.signer.sign(&signed)?;
        let details = json!({
            "algorithm": CHECKPOINT_ALGORITHM,
            "fingerprint": self.signer.fingerprint(),
            "records": self.next_seq,
            "signed_hash": self.last_hash,
            "signature": base64::engine::general_purpose::STANDARD.encode(signature),
        });
        let seq = self.write_record(events::CHECKPOINT, details, time)?;
        self.file.sync_data().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            action: "syncing after a checkpoint",
            source,
        })?;
        Ok(seq)
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(
        &mut self,
        event: &str,
        details: Value,
        time: OffsetDateTime,
    ) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned(self.path.clone()));
        }
        let seq = self.next_seq;
        let mut map = Map::new();
        map.insert("details".into(), details);
        map.insert("event".into(), Value::String(event.to_string()));
        map.insert("prev".into(), Value::String(self.last_hash.clone()));
        map.insert("seq".into(), Value::from(seq));
        map.insert("time".into(), Value::String(format_time(time)));
        let hash = record_hash(&map);
        map.insert("hash".into(), Value::String(hash.clone()));
        let mut line = Value::Object(map).to_string();
        if line.len() > MAX_RECORD_BYTES {
            return Err(AuditError::InvalidDetails {
                event: event.to_string(),
                reason: format!("the record is longer than {MAX_RECORD_BYTES} bytes"),
            });
        }
        line.push('\n');
        if let Err(source) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
        {
            self.poisoned = true;
            return Err(AuditError::Io {
                path: self.path.clone(),
                action: "appending a record",
                source,
            });
        }
        self.next_seq += 1;
        self.last_hash = hash;
        if event == events::CHECKPOINT {
            self.since_checkpoint = 0;
            self.last_checkpoint_seq = Some(seq);
        } else {
            self.since_checkpoint += 1;
        }
        Ok(seq)
    }
}
