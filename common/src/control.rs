//! Control-stream messages and the headers that open every QUIC stream.
//!
//! Every bidirectional stream starts with one tag byte saying what it is:
//!
//! ```text
//!   control stream:  | 0x00 | message | message | …            (opened first, by the dialing side)
//!   data stream:     | 0x01 | StreamHeader | Frame | Frame | …  (opened by the side that accepted
//!                                                                the TCP connection: the target)
//!
//!   message      = | len u32 BE | JSON [len] |          len ≤ MAX_CONTROL_MESSAGE
//!   StreamHeader = | session_id u64 BE | name_len u8 | service name [name_len] |
//! ```
//!
//! The control protocol is versioned: the dialer sends [`ControlMessage::Hello`] first and the
//! listener answers [`ControlMessage::HelloAck`] or [`ControlMessage::Refuse`]. JSON keeps the
//! messages self-describing for an auditor and easy to extend (the migration issue adds typed
//! requests); the length prefix is checked against [`MAX_CONTROL_MESSAGE`] before anything is
//! buffered, so a peer cannot make us allocate more than that.
//!
//! Like [`crate::frame`], this module is pure: it encodes into and decodes from buffers.

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::identity::Role;

/// The control protocol version this build speaks. A peer with another version is refused with
/// a message naming both versions. 2: a DATA chunk's digest covers the direction up to it
/// ([`crate::frame::PrefixHasher`]); 1 hashed each chunk alone. 3: a file stream's header
/// names the end of its range ([`FileHeader::end`]), and [`Request::RangeDigests`] exists.
pub const PROTOCOL_VERSION: u32 = 3;

/// The ALPN protocol id of the QUIC connection; a peer that does not offer it fails the handshake.
pub const ALPN: &[u8] = b"pgferry/1";

/// Largest control message accepted (after the 4-byte length). Hello and its answers are a few
/// hundred bytes; digests of [`MAX_TABLES_PER_REQUEST`] tables take about 1.5 MiB.
pub const MAX_CONTROL_MESSAGE: usize = 2 * 1024 * 1024;

/// Longest service name (bytes) in a [`StreamHeader`]; names come from the agents' configuration.
pub const MAX_SERVICE_NAME: usize = 64;

/// First byte of every bidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// The control stream (exactly one per connection, opened by the dialer).
    Control = 0,
    /// A data stream carrying one forwarded connection.
    Data = 1,
    /// A data stream that continues a forwarded connection whose stream was lost with its
    /// connection ([`ResumeHeader`]).
    Resume = 2,
    /// A file of the agent-owned base copy ([`FileHeader`]), source → target.
    File = 3,
}

impl StreamKind {
    /// Maps the tag byte, `None` for an unknown tag (the stream is then refused).
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Self::Control),
            1 => Some(Self::Data),
            2 => Some(Self::Resume),
            3 => Some(Self::File),
            _ => None,
        }
    }
}

/// What opens a data stream: which configured service to reach, and the session id that both
/// agents' audit logs use for this forwarded connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Identifies the forwarded connection in both audit logs (unique per target agent run).
    pub session_id: u64,
    /// The `[[service]]` name, `postgres` by default.
    pub service: String,
}

impl StreamHeader {
    /// Encodes the header (without the stream tag byte).
    pub fn encode(&self, buf: &mut impl BufMut) {
        debug_assert!(self.service.len() <= MAX_SERVICE_NAME);
        buf.put_u64(self.session_id);
        buf.put_u8(self.service.len() as u8);
        buf.put_slice(self.service.as_bytes());
    }

    /// Decodes a header; `Ok(None)` when more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ControlError> {
        if buf.len() < 9 {
            return Ok(None);
        }
        let name_len = buf[8] as usize;
        if name_len == 0 || name_len > MAX_SERVICE_NAME {
            return Err(ControlError::BadServiceName(format!(
                "service name length {name_len} (allowed 1..={MAX_SERVICE_NAME})"
            )));
        }
        if buf.len() < 9 + name_len {
            return Ok(None);
        }
        let session_id = buf.get_u64();
        buf.advance(1);
        let name = buf.split_to(name_len);
        let service = std::str::from_utf8(&name)
            .map_err(|_| ControlError::BadServiceName("service name is not UTF-8".into()))?;
        if !valid_service_name(service) {
            return Err(ControlError::BadServiceName(format!("{service:?}")));
        }
        Ok(Some(Self {
            session_id,
            service: service.to_owned(),
        }))
    }
}

/// What opens a [`StreamKind::Resume`] stream: the forwarded connection to continue, and a
/// token that proves the opener held the connection the stream began on. Both ends derive
/// the token from that connection's TLS keys ([`resume_token_context`]), so another agent,
/// even one with the same certificate, cannot take over a held connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeHeader {
    pub session_id: u64,
    pub token: [u8; 32],
}

/// TLS exporter label of [`ResumeHeader::token`].
pub const RESUME_TOKEN_LABEL: &[u8] = b"EXPORTER-pgferry-stream-resume";

/// TLS exporter context of [`ResumeHeader::token`]: the session id.
pub fn resume_token_context(session_id: u64) -> [u8; 8] {
    session_id.to_be_bytes()
}

impl ResumeHeader {
    pub const LEN: usize = 8 + 32;

    /// Encodes the header (without the stream tag byte).
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(self.session_id);
        buf.put_slice(&self.token);
    }

    /// Decodes a header; `Ok(None)` when more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ControlError> {
        if buf.len() < Self::LEN {
            return Ok(None);
        }
        let session_id = buf.get_u64();
        let mut token = [0; 32];
        buf.copy_to_slice(&mut token);
        Ok(Some(Self { session_id, token }))
    }
}

/// Longest path (bytes) in a [`FileHeader`].
pub const MAX_FILE_PATH: usize = 1024;

/// What opens a [`StreamKind::File`] stream: a file of the running base copy, from `offset`
/// to `end` (or to the file's end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    pub backup_id: u64,
    pub offset: u64,
    /// Where the range ends (exclusive); [`FileHeader::TO_THE_END`]: the file's end, wherever
    /// it is when the stream reaches it.
    pub end: u64,
    /// Relative to the data directory, as the backup's plan names it.
    pub path: String,
}

/// Bytes of a [`FileHeader`] before its path.
const FILE_HEADER_FIXED: usize = 26;

impl FileHeader {
    /// [`FileHeader::end`] of a stream that runs to the file's end.
    pub const TO_THE_END: u64 = u64::MAX;

    /// Longest encoded header.
    pub const MAX_LEN: usize = FILE_HEADER_FIXED + MAX_FILE_PATH;

    /// Encodes the header (without the stream tag byte).
    pub fn encode(&self, buf: &mut impl BufMut) {
        debug_assert!(self.path.len() <= MAX_FILE_PATH);
        buf.put_u64(self.backup_id);
        buf.put_u64(self.offset);
        buf.put_u64(self.end);
        buf.put_u16(self.path.len() as u16);
        buf.put_slice(self.path.as_bytes());
    }

    /// Decodes a header; `Ok(None)` when more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ControlError> {
        if buf.len() < FILE_HEADER_FIXED {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[24], buf[25]]) as usize;
        if len == 0 || len > MAX_FILE_PATH {
            return Err(ControlError::Malformed(format!(
                "file path length {len} (allowed 1..={MAX_FILE_PATH})"
            )));
        }
        if buf.len() < FILE_HEADER_FIXED + len {
            return Ok(None);
        }
        let backup_id = buf.get_u64();
        let offset = buf.get_u64();
        let end = buf.get_u64();
        if end <= offset {
            return Err(ControlError::Malformed(format!(
                "file range {offset}..{end} is empty"
            )));
        }
        buf.advance(2);
        let raw = buf.split_to(len);
        let path = std::str::from_utf8(&raw)
            .map_err(|_| ControlError::Malformed("file path is not UTF-8".into()))?
            .to_string();
        Ok(Some(Self {
            backup_id,
            offset,
            end,
            path,
        }))
    }
}

/// The files of a base copy the source agent runs (`pg_backup_start` done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPlan {
    /// Names this backup session in file streams (random per session).
    pub id: u64,
    pub start_lsn: crate::migration::Lsn,
    /// Directories (created, empty or not) and files, in copy order (`global/pg_control` last).
    pub entries: Vec<BackupEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEntry {
    pub path: String,
    pub dir: bool,
    /// Size when listed (a file may grow or shrink while copied).
    pub size: u64,
    /// A tablespace (`pg_tblspc/<oid>`, a directory): its location on the source, where the
    /// symlink points. The target creates it where `tablespace_mapping` says (or at the same
    /// path) and links it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// Service names are short identifiers: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Messages on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMessage {
    /// First message, from the dialing side.
    Hello(Hello),
    /// The listener accepts: it sends its own `Hello` fields back.
    HelloAck(Hello),
    /// The listener refuses (version, migration or role mismatch) and closes the connection.
    Refuse {
        /// Human-readable reason naming what differs and how to fix it.
        reason: String,
    },
    /// A typed request from the target (the migration driver) to the source agent. There is no
    /// way to send SQL text: the source maps each request to its own fixed statements.
    Request {
        /// Echoed in the response.
        id: u64,
        request: Request,
    },
    /// The source agent's answer to the request with the same `id`.
    Response { id: u64, response: Response },
}

/// Most tables one digest request may name.
pub const MAX_TABLES_PER_REQUEST: usize = 10_000;

/// What the target may ask of the source agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Facts for the preflight ([`crate::preflight::SourceFacts`]).
    PreflightFacts,
    /// Create a physical replication slot (reserving WAL now).
    CreateSlot {
        slot: String,
    },
    DropSlot {
        slot: String,
    },
    /// Current LSN, `pg_stat_replication`, and the slot if named.
    Status {
        slot: Option<String>,
    },
    /// Stop writes on the source; answers with the fence LSN.
    Fence {
        mode: FenceMode,
    },
    /// Undo a fence (rollback before promotion).
    Unfence,
    /// Shut the source cluster down (fast shutdown); refused unless it is fenced. Sent after
    /// the target accepts writes when the cutover fences with `stop`.
    StopCluster,
    /// Row count and BLAKE3 of the ordered contents of each table (`schema.table`).
    TableDigests {
        tables: Vec<String>,
    },
    /// Starts a verification pre-pass: the WAL insert position, then an xid assigned after
    /// it (`xmax`; see [`crate::verify`]).
    PrepassBegin,
    /// Whether every transaction with an xid below `xmax` has ended; when it has, a WAL
    /// marker is written and its LSN returned (the standby digests once it has replayed it).
    PrepassWait {
        xmax: u64,
    },
    /// Digests of block ranges ([`crate::verify::RANGE_BLOCKS`] blocks each) of tables.
    BlockDigests {
        tables: Vec<BlockRanges>,
    },
    /// What else depends on the source: replication slots other than `slot`, replication
    /// connections other than pgferry's, subscriptions.
    Dependents {
        slot: String,
    },
    /// Starts the agent-owned base copy (`pg_backup_start` on a session of its own), or
    /// answers the plan of the one running: the files to fetch.
    BackupStart {
        label: String,
    },
    /// Ends the base copy `id` (`pg_backup_stop`): the backup label and tablespace map.
    BackupStop {
        id: u64,
    },
    /// SHA-256 of files of the running base copy `id` as they are now (a copy resumed in a new
    /// backup session keeps the files that did not change). With `lengths` (one per path), of
    /// the first `length` bytes of each only: a file partly fetched in the lost session is
    /// fetched on from its end if its prefix did not change.
    FileDigests {
        id: u64,
        paths: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lengths: Vec<u64>,
    },
    /// BLAKE3 of each range of a file of the running base copy `id` as it is now: a file that
    /// changed since an earlier session fetched it is fetched again in the ranges that differ
    /// only.
    RangeDigests {
        id: u64,
        path: String,
    },
}

/// Smallest range of a [`Response::RangeDigests`]: 1 MiB (a range costs 65 bytes of answer).
pub const MIN_FILE_RANGE: u64 = 1 << 20;

/// Most ranges of a [`Response::RangeDigests`] (about 540 kB of answer): a larger file has
/// larger ranges.
pub const MAX_FILE_RANGES: u64 = 8192;

/// The range size of a file of `size` bytes: [`MIN_FILE_RANGE`], or a multiple of it so that
/// the file has at most [`MAX_FILE_RANGES`] ranges.
pub fn file_range_size(size: u64) -> u64 {
    let per = size.div_ceil(MAX_FILE_RANGES).max(1);
    per.div_ceil(MIN_FILE_RANGE) * MIN_FILE_RANGE
}

/// Most paths one [`Request::FileDigests`] may name.
pub const MAX_DIGEST_PATHS: usize = 1000;

/// A file's size and SHA-256 (hex; empty when the file is gone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Ranges of one table to digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRanges {
    pub table: String,
    pub ranges: Vec<u32>,
}

/// One table's range digests, with the storage they were read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableBlocks {
    pub table: String,
    /// `pg_relation_filenode` when digested (a rewrite changes it).
    pub filenode: u32,
    /// Blocks in the relation's main fork when digested.
    pub blocks: u64,
    pub digests: Vec<crate::verify::RangeDigest>,
}

/// A transaction the pre-pass waits for (no query text: it may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenTransaction {
    /// Backend pid; 0 for a prepared transaction.
    pub pid: i32,
    pub user: String,
    pub application: String,
    /// Seconds since the transaction began (since it was prepared, for a prepared one).
    pub open_secs: u64,
    /// `pg_stat_activity.state`, or `prepared <gid>`.
    pub state: String,
}

/// How the source is fenced at cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMode {
    /// `pg_hba.conf` admits only pgferry (its control connection and physical replication),
    /// `default_transaction_read_only = on`, reload, and every other session and connection
    /// attempt ended (see `docs/fence.md`).
    ReadOnly,
    /// Read-only now (so both sides can still be verified at the fence LSN); the source
    /// cluster is shut down (fast) once the target accepts writes.
    Stop,
}

/// The source agent's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Facts {
        facts: crate::preflight::SourceFacts,
    },
    SlotCreated {
        slot: String,
        lsn: crate::migration::Lsn,
    },
    SlotDropped {
        slot: String,
    },
    Status {
        status: SourceStatus,
    },
    Fenced {
        lsn: crate::migration::Lsn,
        /// What the fence did (absent from a source agent older than this field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<FenceReport>,
    },
    Unfenced,
    ClusterStopped,
    TableDigests {
        digests: Vec<TableDigest>,
    },
    PrepassBegun {
        lsn: crate::migration::Lsn,
        xmax: u64,
    },
    PrepassWaited {
        /// Every transaction below `xmax` has ended.
        ended: bool,
        /// The marker's LSN when `ended`, else the current insert position.
        lsn: crate::migration::Lsn,
        /// The oldest of those still open (a few).
        open: Vec<OpenTransaction>,
    },
    BlockDigests {
        tables: Vec<TableBlocks>,
    },
    Dependents {
        dependents: Dependents,
    },
    BackupStarted {
        plan: BackupPlan,
    },
    BackupStopped {
        label: String,
        tablespace_map: String,
        end_lsn: crate::migration::Lsn,
    },
    FileDigests {
        digests: Vec<FileDigest>,
    },
    /// The file's size now and the BLAKE3 (hex) of each of its ranges of `range` bytes
    /// ([`file_range_size`] of `size`; the last one may be shorter); no ranges when the file
    /// is gone.
    RangeDigests {
        size: u64,
        range: u64,
        blake3: Vec<String>,
    },
    /// The request failed; the message says why and what to do.
    Error {
        message: String,
    },
}

/// What still points at the old cluster after the migration: the cutover report lists it
/// (those clients follow neither the fence nor the promotion).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependents {
    /// Replication slots other than the migration's (a standby, a backup tool, a logical
    /// subscriber or CDC consumer of the old cluster).
    pub slots: Vec<DependentSlot>,
    /// Replication connections other than pgferry's (standbys, backups in progress).
    pub standbys: Vec<DependentStandby>,
    /// Subscriptions of the source: copied with it, so the new cluster has them too.
    pub subscriptions: Vec<DependentSubscription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentSlot {
    pub name: String,
    /// `physical` or `logical`.
    pub slot_type: String,
    /// The database of a logical slot.
    pub database: Option<String>,
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentStandby {
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentSubscription {
    pub name: String,
    pub database: String,
    pub enabled: bool,
}

impl Dependents {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.standbys.is_empty() && self.subscriptions.is_empty()
    }

    /// One line per dependent, for a terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push(format!(
                "replication slot {} ({}{}, {}): its consumer still reads the old cluster; recreate it on the new one",
                s.name,
                s.slot_type,
                s.database.as_ref().map(|d| format!(" on {d}")).unwrap_or_default(),
                if s.active { "in use" } else { "idle" }
            ));
        }
        for s in &self.standbys {
            out.push(format!(
                "replication client {} from {} ({}): repoint it at the new primary",
                if s.application_name.is_empty() {
                    "(no name)"
                } else {
                    &s.application_name
                },
                s.client_addr.as_deref().unwrap_or("local socket"),
                s.state
            ));
        }
        for s in &self.subscriptions {
            out.push(format!(
                "subscription {} on {} ({}): copied with the cluster, so the new primary has it too; make sure only one of the two subscribes",
                s.name,
                s.database,
                if s.enabled { "enabled" } else { "disabled" }
            ));
        }
        out
    }
}

/// What a fence did on the source, for the cutover report and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceReport {
    /// The `pg_hba.conf` the fence replaced (its original is beside it, `.pgferry-orig`).
    pub hba_file: String,
    /// Physical-replication records kept from the original.
    pub replication_records: u32,
    /// Whether the fenced file admits the source agent's control connection from its own
    /// loopback address, so that a restarted source agent can still unfence.
    pub control_rule: bool,
    /// Sessions ended (`pg_terminate_backend`): clients, logical walsenders, their workers.
    pub sessions_ended: u32,
    /// Connections ended while still authenticating under the old rules (by signal: they are
    /// not in `pg_stat_activity` yet).
    pub connecting_ended: u32,
}

/// Source-side replication status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceStatus {
    pub current_lsn: crate::migration::Lsn,
    pub replication: Vec<ReplicationRow>,
    pub slot: Option<SlotRow>,
    /// Source clock, ms since the epoch.
    pub now_ms: u64,
}

/// One row of `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationRow {
    pub application_name: String,
    pub state: String,
    pub sent_lsn: Option<crate::migration::Lsn>,
    pub write_lsn: Option<crate::migration::Lsn>,
    pub flush_lsn: Option<crate::migration::Lsn>,
    pub replay_lsn: Option<crate::migration::Lsn>,
    pub write_lag_ms: Option<u64>,
    pub flush_lag_ms: Option<u64>,
    pub replay_lag_ms: Option<u64>,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRow {
    pub name: String,
    pub active: bool,
    pub restart_lsn: Option<crate::migration::Lsn>,
    pub wal_status: Option<String>,
}

/// A table's digest, computed by each agent on its own side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableDigest {
    pub table: String,
    pub rows: u64,
    /// BLAKE3 (hex) of `COPY (SELECT * FROM table ORDER BY 1..n) TO STDOUT`.
    pub blake3: String,
}

/// Slot names PostgreSQL accepts: `[a-z0-9_]{1,63}`.
pub fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `schema.table` with plain identifiers (`[A-Za-z_][A-Za-z0-9_$]*`, ≤ 63 bytes each). The
/// source quotes them itself; anything else (quotes, spaces, SQL) is refused before it gets
/// near a statement.
pub fn valid_table_name(name: &str) -> bool {
    let ident = |p: &str| {
        (1..=63).contains(&p.len())
            && (p.as_bytes()[0].is_ascii_alphabetic() || p.as_bytes()[0] == b'_')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
    };
    matches!(name.split_once('.'), Some((schema, table)) if ident(schema) && ident(table))
}

impl Request {
    /// Checks names and sizes; the source agent calls this before acting.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::CreateSlot { slot } | Request::DropSlot { slot } if !valid_slot_name(slot) => {
                Err(format!("invalid slot name {slot:?}: use 1-63 of a-z 0-9 _"))
            }
            Request::BackupStart { label }
                if label.is_empty()
                    || label.len() > 100
                    || !label.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'-' | b'.')
                    }) =>
            {
                Err(format!("invalid backup label {label:?}"))
            }
            Request::FileDigests { paths, lengths, .. }
                if !lengths.is_empty() && lengths.len() != paths.len() =>
            {
                Err(format!(
                    "{} lengths for {} paths: give one per path, or none",
                    lengths.len(),
                    paths.len()
                ))
            }
            Request::FileDigests { paths, .. }
                if paths.len() > MAX_DIGEST_PATHS
                    || paths.iter().any(|p| p.is_empty() || p.len() > MAX_FILE_PATH) =>
            {
                Err(format!(
                    "{} paths requested; at most {MAX_DIGEST_PATHS}, each 1..={MAX_FILE_PATH} bytes",
                    paths.len()
                ))
            }
            Request::RangeDigests { path, .. } if path.is_empty() || path.len() > MAX_FILE_PATH => {
                Err(format!("file path of {} bytes (allowed 1..={MAX_FILE_PATH})", path.len()))
            }
            Request::Status { slot: Some(slot) } | Request::Dependents { slot }
                if !valid_slot_name(slot) =>
            {
                Err(format!("invalid slot name {slot:?}: use 1-63 of a-z 0-9 _"))
            }
            Request::BlockDigests { tables } => {
                if tables.len() > MAX_TABLES_PER_REQUEST {
                    return Err(format!(
                        "{} tables requested; at most {MAX_TABLES_PER_REQUEST} per request",
                        tables.len()
                    ));
                }
                let ranges: usize = tables.iter().map(|t| t.ranges.len()).sum();
                if ranges > crate::verify::MAX_RANGES_PER_REQUEST {
                    return Err(format!(
                        "{ranges} block ranges requested; at most {} per request",
                        crate::verify::MAX_RANGES_PER_REQUEST
                    ));
                }
                match tables.iter().find(|t| !valid_table_name(&t.table)) {
                    Some(t) => Err(format!(
                        "invalid table name {:?}: use schema.table with plain identifiers",
                        t.table
                    )),
                    None => Ok(()),
                }
            }
            Request::TableDigests { tables } => {
                if tables.len() > MAX_TABLES_PER_REQUEST {
                    return Err(format!(
                        "{} tables requested; at most {MAX_TABLES_PER_REQUEST} per request",
                        tables.len()
                    ));
                }
                match tables.iter().find(|t| !valid_table_name(t)) {
                    Some(t) => Err(format!(
                        "invalid table name {t:?}: use schema.table with plain identifiers"
                    )),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// Who an agent says it is. Certificates are the authority (checked during the TLS handshake);
/// `Hello` catches version skew and misconfiguration with a clear message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// The sender's build version ([`crate::AGENT_VERSION`]).
    pub agent_version: String,
    /// The migration id of the sender's certificate.
    pub migration: String,
    /// The sender's role.
    pub role: Role,
    /// Optional features the sender supports, for forward compatibility.
    pub capabilities: Vec<String>,
}

impl Hello {
    /// Checks a peer's `Hello` against ours: same protocol version and migration, opposite role.
    /// The error is the text sent in [`ControlMessage::Refuse`].
    pub fn check_peer(&self, peer: &Hello) -> Result<(), String> {
        if peer.protocol_version != self.protocol_version {
            return Err(format!(
                "protocol version {} is not supported (this agent {} speaks version {}); run the same pgferry release on both hosts",
                peer.protocol_version, self.agent_version, self.protocol_version
            ));
        }
        if peer.migration != self.migration {
            return Err(format!(
                "peer announced migration {:?}, this agent serves {:?}",
                peer.migration, self.migration
            ));
        }
        if peer.role != self.role.opposite() {
            return Err(format!(
                "peer announced role {}, expected {}",
                peer.role,
                self.role.opposite()
            ));
        }
        Ok(())
    }
}

/// Errors of the control-stream codec. All of them mean the peer broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The length prefix exceeds [`MAX_CONTROL_MESSAGE`].
    #[error("control message of {len} bytes exceeds the limit of {MAX_CONTROL_MESSAGE} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// The message is not valid JSON for a known message type.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A data stream header names an invalid service.
    #[error("invalid service name in stream header: {0}")]
    BadServiceName(String),
}

/// Encodes one control message with its length prefix.
pub fn encode_message(msg: &ControlMessage, buf: &mut BytesMut) -> Result<(), ControlError> {
    let json = serde_json::to_vec(msg).map_err(|e| ControlError::Malformed(e.to_string()))?;
    if json.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge { len: json.len() });
    }
    buf.put_u32(json.len() as u32);
    buf.put_slice(&json);
    Ok(())
}

/// Decodes one control message; `Ok(None)` when more bytes are needed. The length is checked
/// before the body is awaited.
pub fn decode_message(buf: &mut BytesMut) -> Result<Option<ControlMessage>, ControlError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge { len });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len);
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ControlError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello(role: Role) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            migration: "m1".into(),
            role,
            capabilities: vec![],
        }
    }

    #[test]
    fn message_round_trip_byte_by_byte() {
        let msg = ControlMessage::Hello(hello(Role::Target));
        let mut wire = BytesMut::new();
        encode_message(&msg, &mut wire).unwrap();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode_message(&mut buf).unwrap();
            if i + 1 < wire.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got, Some(msg.clone()));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_rejected_before_body() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_CONTROL_MESSAGE + 1) as u32);
        assert!(matches!(
            decode_message(&mut buf),
            Err(ControlError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_fields_and_types_rejected() {
        for body in [
            &br#"{"type":"launch_missiles"}"#[..],
            br#"{"type":"refuse","reason":"x","extra":1}"#,
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            assert!(matches!(
                decode_message(&mut buf),
                Err(ControlError::Malformed(_))
            ));
        }
    }

    #[test]
    fn hello_checks_version_migration_role() {
        let ours = hello(Role::Source);
        assert!(ours.check_peer(&hello(Role::Target)).is_ok());
        assert!(ours
            .check_peer(&hello(Role::Source))
            .unwrap_err()
            .contains("role"));
        let mut other = hello(Role::Target);
        other.migration = "m2".into();
        assert!(ours.check_peer(&other).unwrap_err().contains("migration"));
        let mut v1 = hello(Role::Target);
        v1.protocol_version = 1;
        assert!(ours.check_peer(&v1).unwrap_err().contains("version 1"));
    }

    #[test]
    fn typed_requests_round_trip_and_are_validated() {
        let reqs = [
            Request::PreflightFacts,
            Request::CreateSlot {
                slot: "pgferry_m1".into(),
            },
            Request::Status { slot: None },
            Request::Fence {
                mode: FenceMode::ReadOnly,
            },
            Request::TableDigests {
                tables: vec!["public.orders".into(), "ferry.docs".into()],
            },
            Request::PrepassBegin,
            Request::PrepassWait { xmax: 1 << 40 },
            Request::BlockDigests {
                tables: vec![BlockRanges {
                    table: "ferry.docs".into(),
                    ranges: vec![0, 1, 7],
                }],
            },
            Request::FileDigests {
                id: 7,
                paths: vec!["base/5/16384".into(), "global/pg_control".into()],
                lengths: Vec::new(),
            },
            Request::FileDigests {
                id: 7,
                paths: vec!["base/5/16384".into()],
                lengths: vec![8192 * 100],
            },
        ];
        for (id, request) in reqs.into_iter().enumerate() {
            request.validate().unwrap();
            let msg = ControlMessage::Request {
                id: id as u64,
                request,
            };
            let mut wire = BytesMut::new();
            encode_message(&msg, &mut wire).unwrap();
            assert_eq!(decode_message(&mut wire).unwrap(), Some(msg));
        }
        for bad in [
            Request::CreateSlot {
                slot: "Bad-Slot".into(),
            },
            Request::DropSlot { slot: "".into() },
            Request::TableDigests {
                tables: vec!["public.orders; DROP TABLE x".into()],
            },
            Request::TableDigests {
                tables: vec!["orders".into()],
            },
            Request::TableDigests {
                tables: vec!["\"public\".\"orders\"".into()],
            },
            Request::BlockDigests {
                tables: vec![BlockRanges {
                    table: "x; DROP TABLE y".into(),
                    ranges: vec![0],
                }],
            },
            // Too many ranges in all, even split over tables.
            Request::BlockDigests {
                tables: vec![
                    BlockRanges {
                        table: "a.b".into(),
                        ranges: (0..crate::verify::MAX_RANGES_PER_REQUEST as u32).collect(),
                    },
                    BlockRanges {
                        table: "a.c".into(),
                        ranges: vec![0],
                    },
                ],
            },
            // A length for some paths only.
            Request::FileDigests {
                id: 7,
                paths: vec!["base/5/16384".into(), "base/5/16385".into()],
                lengths: vec![8192],
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // No SQL text can be smuggled as an unknown field or op.
        let mut buf = BytesMut::new();
        let body = br#"{"type":"request","id":1,"request":{"op":"sql","text":"DROP DATABASE x"}}"#;
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        assert!(matches!(
            decode_message(&mut buf),
            Err(ControlError::Malformed(_))
        ));
    }

    #[test]
    fn the_largest_block_digest_answer_fits_a_control_message() {
        let digests = (0..crate::verify::MAX_RANGES_PER_REQUEST as u32)
            .map(|range| crate::verify::RangeDigest {
                range: u32::MAX - range,
                rows: u64::MAX,
                blake3: "f".repeat(64),
            })
            .collect();
        let msg = ControlMessage::Response {
            id: u64::MAX,
            response: Response::BlockDigests {
                tables: vec![TableBlocks {
                    table: format!("{}.{}", "s".repeat(63), "t".repeat(63)),
                    filenode: u32::MAX,
                    blocks: u64::MAX,
                    digests,
                }],
            },
        };
        let mut wire = BytesMut::new();
        encode_message(&msg, &mut wire).unwrap();
        assert!(wire.len() < MAX_CONTROL_MESSAGE, "{} bytes", wire.len());
    }

    #[test]
    fn file_header_round_trip_and_limits() {
        for end in [FileHeader::TO_THE_END, 1 << 20] {
            let h = FileHeader {
                backup_id: 7,
                offset: 4096,
                end,
                path: "base/5/16384.1".into(),
            };
            let mut buf = BytesMut::new();
            h.encode(&mut buf);
            buf.put_u8(0xAA);
            // Byte by byte: more is needed until the whole header is there.
            for cut in 0..buf.len() - 1 {
                let mut part = BytesMut::from(&buf[..cut]);
                assert_eq!(FileHeader::decode(&mut part).unwrap(), None, "{cut}");
            }
            assert_eq!(FileHeader::decode(&mut buf).unwrap(), Some(h));
            assert_eq!(&buf[..], &[0xAA]);
        }
        for (offset, end, path) in [
            (10u64, 10u64, "base/5/1".to_string()),
            (10, 9, "base/5/1".to_string()),
            (0, 1, String::new()),
            (0, 1, "p".repeat(MAX_FILE_PATH + 1)),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u64(1);
            buf.put_u64(offset);
            buf.put_u64(end);
            buf.put_u16(path.len() as u16);
            buf.put_slice(path.as_bytes());
            assert!(
                FileHeader::decode(&mut buf).is_err(),
                "{offset}..{end} {}",
                path.len()
            );
        }
    }

    #[test]
    fn file_ranges_are_whole_mebibytes_and_bounded_in_number() {
        assert_eq!(file_range_size(0), MIN_FILE_RANGE);
        assert_eq!(file_range_size(1 << 30), MIN_FILE_RANGE);
        assert_eq!(
            file_range_size(MAX_FILE_RANGES * MIN_FILE_RANGE),
            MIN_FILE_RANGE
        );
        assert_eq!(
            file_range_size(MAX_FILE_RANGES * MIN_FILE_RANGE + 1),
            2 * MIN_FILE_RANGE
        );
        for size in [1u64, 1 << 33, 1 << 40, u64::MAX / 2] {
            let r = file_range_size(size);
            assert_eq!(r % MIN_FILE_RANGE, 0);
            assert!(size.div_ceil(r) <= MAX_FILE_RANGES, "{size}");
        }
        // The largest answer fits a control message.
        let msg = ControlMessage::Response {
            id: u64::MAX,
            response: Response::RangeDigests {
                size: u64::MAX,
                range: u64::MAX,
                blake3: vec!["f".repeat(64); MAX_FILE_RANGES as usize],
            },
        };
        let mut wire = BytesMut::new();
        encode_message(&msg, &mut wire).unwrap();
        assert!(wire.len() < MAX_CONTROL_MESSAGE, "{} bytes", wire.len());
    }

    #[test]
    fn stream_header_round_trip_and_limits() {
        let h = StreamHeader {
            session_id: 42,
            service: "postgres".into(),
        };
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        buf.put_u8(0xAA); // following frame bytes stay in the buffer
        assert_eq!(StreamHeader::decode(&mut buf).unwrap(), Some(h));
        assert_eq!(&buf[..], &[0xAA]);

        let mut bad = BytesMut::new();
        bad.put_u64(1);
        bad.put_u8(3);
        bad.put_slice(b"a b");
        assert!(StreamHeader::decode(&mut bad).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode_message(&mut buf);
            let mut buf = BytesMut::from(&data[..]);
            let _ = StreamHeader::decode(&mut buf);
        }
    }
}
