//! Who a forwarded PostgreSQL connection is, from the first bytes its client sends (pure).
//!
//! The target agent watches the client → tunnel direction of each `postgres` stream until it
//! has seen the startup message, and records the user, the database, `application_name` and
//! whether it is a replication connection (`pg_basebackup` and the walreceiver are;
//! `psql` is not). Nothing else is kept: no other parameter (`options` may carry settings), no
//! password (it never is in the startup message), no query text. A client that goes to TLS or
//! GSS encryption first is recorded as such, with no names (they are inside the encryption).
//!
//! ```text
//!   [SSLRequest 8 B]──► 'N' from the server ──► StartupMessage ─► user, database, …
//!          │        └─► 'S' ──► TLS ClientHello (0x16) ───────────► encrypted: tls
//!   [GSSENCRequest]   likewise ─────────────────────────────────────► encrypted: gss
//!   [CancelRequest 16 B] ─────────────────────────────────────────────► cancel
//! ```

use serde::{Deserialize, Serialize};

/// PostgreSQL's own bound on a startup packet (`MAX_STARTUP_PACKET_LENGTH`): beyond it the
/// server refuses the connection, and the sniffer gives up.
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Longest value kept (PostgreSQL's names are at most 63 bytes; `application_name` 63 too).
const MAX_VALUE: usize = 128;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u32 = 196_608;

/// What the start of a PostgreSQL connection says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// The `replication` parameter: `true` (physical: pg_basebackup, walreceiver) or
    /// `database` (logical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<String>,
    /// `tls` or `gss`: the client encrypted the connection end to end; no names are visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<String>,
    /// A cancel request (a client's Ctrl-C), not a session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    /// The bytes were not a PostgreSQL startup (another protocol, or over the size bound).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unrecognised: bool,
}

impl StartupInfo {
    /// A replication connection (physical or logical).
    pub fn is_replication(&self) -> bool {
        self.replication
            .as_deref()
            .is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0"))
    }

    /// One line for people: `user postgres, database app, application psql`.
    pub fn describe(&self) -> String {
        if self.cancel {
            return "cancel request".into();
        }
        if let Some(e) = &self.encrypted {
            return format!("encrypted by the client ({e}): user and database not visible");
        }
        if self.unrecognised {
            return "not a PostgreSQL startup".into();
        }
        let mut parts = Vec::new();
        if let Some(u) = &self.user {
            parts.push(format!("user {u}"));
        }
        if let Some(d) = &self.database {
            parts.push(format!("database {d}"));
        }
        if let Some(a) = &self.application_name {
            parts.push(format!("application {a}"));
        }
        if self.is_replication() {
            let r = self.replication.as_deref().unwrap_or_default();
            parts.push(if r == "database" {
                "logical replication".to_string()
            } else {
                "replication".to_string()
            });
        }
        parts.join(", ")
    }
}

/// Watches the client's first bytes; [`StartupSniffer::feed`] returns the answer once known.
#[derive(Debug, Default)]
pub struct StartupSniffer {
    buf: Vec<u8>,
    /// After an SSLRequest/GSSENCRequest: which encryption a 0x16 … would mean.
    after_request: Option<&'static str>,
    done: bool,
}

impl StartupSniffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the answer was given (nothing more to feed).
    pub fn done(&self) -> bool {
        self.done
    }

    /// More client bytes; `Some` once (the first time the start of the connection is known).
    pub fn feed(&mut self, data: &[u8]) -> Option<StartupInfo> {
        if self.done {
            return None;
        }
        let room = (MAX_STARTUP_PACKET + 16).saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
        let answer = self.parse();
        if answer.is_some() {
            self.done = true;
            self.buf = Vec::new();
        }
        answer
    }

    fn parse(&mut self) -> Option<StartupInfo> {
        loop {
            if let (Some(kind), Some(&first)) = (self.after_request, self.buf.first()) {
                // The server answered the request; a client that goes on encrypting sends a
                // TLS record (0x16) or a GSS token now instead of a startup message.
                if first == 0x16 || (kind == "gss" && first != 0) {
                    return Some(StartupInfo {
                        encrypted: Some(kind.into()),
                        ..Default::default()
                    });
                }
            }
            if self.buf.len() < 8 {
                return None;
            }
            let len = u32::from_be_bytes(self.buf[0..4].try_into().ok()?) as usize;
            let code = u32::from_be_bytes(self.buf[4..8].try_into().ok()?);
            if !(8..=MAX_STARTUP_PACKET).contains(&len) {
                return Some(unrecognised());
            }
            match code {
                SSL_REQUEST | GSSENC_REQUEST if len == 8 => {
                    self.after_request = Some(if code == SSL_REQUEST { "tls" } else { "gss" });
                    self.buf.drain(..8);
                }
                CANCEL_REQUEST if len == 16 => {
                    return Some(StartupInfo {
                        cancel: true,
                        ..Default::default()
                    })
                }
                PROTOCOL_3 => {
                    if self.buf.len() < len {
                        return None;
                    }
                    return Some(startup_parameters(&self.buf[8..len]));
                }
                _ => return Some(unrecognised()),
            }
        }
    }
}

fn unrecognised() -> StartupInfo {
    StartupInfo {
        unrecognised: true,
        ..Default::default()
    }
}

/// The kept parameters of a protocol 3.0 startup message: `name\0value\0…\0`.
fn startup_parameters(body: &[u8]) -> StartupInfo {
    let mut info = StartupInfo::default();
    let mut fields = body.split(|b| *b == 0);
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if name.is_empty() {
            break;
        }
        let value = clean(value);
        match name {
            b"user" => info.user = Some(value),
            b"database" => info.database = Some(value),
            b"application_name" => info.application_name = Some(value),
            b"replication" => info.replication = Some(value),
            _ => {}
        }
    }
    if info.is_replication() && info.replication.as_deref() != Some("database") {
        // Physical replication is to no database: libpq sends `database=replication`, which
        // the server ignores.
        info.database = None;
    } else if info.database.is_none() && info.user.is_some() {
        // PostgreSQL's default: the database named like the user.
        info.database.clone_from(&info.user);
    }
    info
}

/// A value as text: at most [`MAX_VALUE`] characters, control characters replaced.
fn clean(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .chars()
        .take(MAX_VALUE)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        m.extend(body);
        m
    }

    fn request(code: u32) -> Vec<u8> {
        let mut m = 8u32.to_be_bytes().to_vec();
        m.extend_from_slice(&code.to_be_bytes());
        m
    }

    #[test]
    fn psql_and_pg_basebackup_are_told_apart() {
        let psql = startup(&[
            ("user", "alice"),
            ("database", "shop"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
        ]);
        let mut s = StartupSniffer::new();
        let info = s.feed(&psql).unwrap();
        assert_eq!(info.user.as_deref(), Some("alice"));
        assert_eq!(info.database.as_deref(), Some("shop"));
        assert!(!info.is_replication());
        assert_eq!(
            info.describe(),
            "user alice, database shop, application psql"
        );
        assert!(s.done() && s.feed(b"more").is_none());

        // pg_basebackup after an SSLRequest the server declined ('N'), fed byte by byte.
        let mut bytes = request(SSL_REQUEST);
        bytes.extend(startup(&[
            ("user", "replicator"),
            ("database", "replication"),
            ("application_name", "pg_basebackup"),
            ("replication", "true"),
        ]));
        let mut s = StartupSniffer::new();
        let mut got = None;
        for b in &bytes {
            if let Some(i) = s.feed(std::slice::from_ref(b)) {
                got = Some(i);
            }
        }
        let info = got.unwrap();
        assert!(info.is_replication());
        assert_eq!(
            info.database, None,
            "a physical replication connection has none"
        );
        assert_eq!(
            info.describe(),
            "user replicator, application pg_basebackup, replication"
        );
    }

    #[test]
    fn encryption_cancel_and_other_protocols() {
        let mut tls = request(SSL_REQUEST);
        tls.extend([0x16, 0x03, 0x01, 0x02, 0x00]);
        let info = StartupSniffer::new().feed(&tls).unwrap();
        assert_eq!(info.encrypted.as_deref(), Some("tls"));
        assert_eq!(info.user, None);

        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&[0; 8]);
        assert!(StartupSniffer::new().feed(&cancel).unwrap().cancel);

        let mysql = b"\x4a\x00\x00\x00\x0a8.0.36\x00";
        assert!(StartupSniffer::new().feed(mysql).unwrap().unrecognised);
        // A startup message longer than PostgreSQL accepts is not waited for.
        let mut huge = 20_000u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        assert!(StartupSniffer::new().feed(&huge).unwrap().unrecognised);
    }

    #[test]
    fn values_are_bounded_and_printable() {
        let long = "x".repeat(500);
        let m = startup(&[("user", &long), ("application_name", "a\u{1b}[31mb")]);
        let info = StartupSniffer::new().feed(&m).unwrap();
        assert_eq!(info.user.unwrap().len(), MAX_VALUE);
        assert_eq!(info.application_name.as_deref(), Some("a?[31mb"));
    }

    proptest! {
        /// Any bytes, in any pieces: never a panic, memory bounded, at most one answer.
        #[test]
        fn arbitrary_input_is_safe(data in proptest::collection::vec(any::<u8>(), 0..20_000), cut in 1usize..5000) {
            let mut s = StartupSniffer::new();
            let mut answers = 0;
            for piece in data.chunks(cut) {
                answers += usize::from(s.feed(piece).is_some());
                prop_assert!(s.buf.len() <= MAX_STARTUP_PACKET + 16);
            }
            prop_assert!(answers <= 1);
        }
    }
}
