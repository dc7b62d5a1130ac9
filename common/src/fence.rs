//! The fence's `pg_hba.conf`, as pure functions over bytes (DESIGN §8: "the fence is a
//! guarantee, not a setting"). The side effects — saving the original, writing, reloading,
//! ending sessions, restoring — are in the source agent (`agent-source/src/fence.rs`); the reasoning is in `docs/fence.md`.
//!
//! ```text
//!   original pg_hba.conf ──► fenced_hba() ──► # pgferry fence v1 …            (header, marker)
//!                                             host "db" "role" 127.80.71.70/32 scram-sha-256
//!                                             <original physical-replication records>
//!                                             local all all reject
//!                                             host  all all all reject
//! ```
//!
//! Only three kinds of connection get past the fenced file: pgferry-source's own control
//! connection, made from [`CONTROL_ADDR`] (a loopback address nothing else uses), and physical
//! replication connections (the standby's walreceiver), which cannot run SQL. Everything else
//! — any role, superusers included, over TCP or the unix socket, logical replication
//! connections (`replication=database`, which can run SQL) — is refused with PostgreSQL's own
//! `pg_hba.conf rejects connection …`.
//!
//! Records are read the way PostgreSQL 15's `hba.c` reads them (`next_token`): fields split at
//! unquoted blanks, lists at unquoted commas, `"` quotes (`""` is a literal quote), `#` starts
//! a comment. A quoted `"replication"` is a database name, not the keyword.

use std::net::Ipv4Addr;

/// First line of every file [`fenced_hba`] writes; how a fenced `pg_hba.conf` is recognised.
pub const FENCE_HEADER: &str = "# pgferry fence v1";

/// Suffix of the copy of each original file the fence saves beside it (`pg_hba.conf` →
/// `pg_hba.conf.pgferry-orig`). Unfencing renames it back over the file.
pub const ORIGINAL_SUFFIX: &str = ".pgferry-orig";

/// The loopback address pgferry-source binds its control connection to when the ordinary route
/// is refused (a fenced source): `127.80.71.70` ("P", "G", "F" in ASCII). Linux routes all of
/// 127.0.0.0/8 to `lo`, so it needs no configuration, and applications connect from
/// 127.0.0.1, so the fence can admit this address without admitting them.
pub const CONTROL_ADDR: Ipv4Addr = Ipv4Addr::new(127, 80, 71, 70);

/// How the control role authenticates from [`CONTROL_ADDR`]: the password verifier it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordMethod {
    /// A SCRAM verifier is stored (`scram-sha-256`).
    ScramSha256,
    /// An MD5 hash is stored (`md5`).
    Md5,
}

impl PasswordMethod {
    /// From `pg_authid.rolpassword`; `None` when the role has no password (then the agent
    /// could not authenticate from [`CONTROL_ADDR`] and no control rule is written).
    pub fn of_stored(rolpassword: Option<&str>) -> Option<Self> {
        match rolpassword {
            Some(p) if p.starts_with("SCRAM-SHA-256$") => Some(Self::ScramSha256),
            Some(p) if p.starts_with("md5") => Some(Self::Md5),
            _ => None,
        }
    }

    fn keyword(self) -> &'static str {
        match self {
            Self::ScramSha256 => "scram-sha-256",
            Self::Md5 => "md5",
        }
    }
}

/// The one non-replication rule of a fenced file: the source agent's control role, into its
/// database, from [`CONTROL_ADDR`] only, with a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRule {
    pub database: String,
    pub user: String,
    pub method: PasswordMethod,
}

/// Why a [`ControlRule`] cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HbaError {
    /// `pg_hba.conf` cannot quote a name with a line break or NUL in it.
    #[error("{what} name {name:?} cannot be written in pg_hba.conf (line break or NUL)")]
    Unquotable {
        /// `database` or `role`.
        what: &'static str,
        name: String,
    },
}

impl ControlRule {
    /// Checks that both names can be quoted in `pg_hba.conf`.
    pub fn new(database: &str, user: &str, method: PasswordMethod) -> Result<Self, HbaError> {
        for (what, name) in [("database", database), ("role", user)] {
            if name.is_empty() || name.bytes().any(|b| matches!(b, b'\n' | b'\r' | 0)) {
                return Err(HbaError::Unquotable {
                    what,
                    name: name.to_string(),
                });
            }
        }
        Ok(Self {
            database: database.to_string(),
            user: user.to_string(),
            method,
        })
    }

    fn line(&self) -> String {
        format!(
            "host    {} {} {}/32 {}\n",
            quote(&self.database),
            quote(&self.user),
            CONTROL_ADDR,
            self.method.keyword()
        )
    }
}

/// A name as a quoted `pg_hba.conf` token (never a keyword, never a list).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What [`fenced_hba`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedHba {
    /// The whole file.
    pub text: Vec<u8>,
    /// Physical-replication records carried over from the original.
    pub replication_records: usize,
}

/// Whether `hba` is a file [`fenced_hba`] wrote.
pub fn is_fenced(hba: &[u8]) -> bool {
    hba.starts_with(FENCE_HEADER.as_bytes())
}

/// The fenced `pg_hba.conf` for `original`: [`FENCE_HEADER`] and `note` (comment lines saying
/// where the original is and how to restore it), the control rule if any, the original's
/// physical-replication records (database narrowed to `replication`, in their order, the rest
/// of each line verbatim), and `reject` for everything else.
pub fn fenced_hba(original: &[u8], control: Option<&ControlRule>, note: &[String]) -> FencedHba {
    let mut text = Vec::with_capacity(original.len() + 1024);
    text.extend_from_slice(FENCE_HEADER.as_bytes());
    text.extend_from_slice(
        b": no client but pgferry may connect while this cluster is migrated.\n",
    );
    for line in note {
        text.extend_from_slice(b"# ");
        text.extend_from_slice(line.replace(['\n', '\r'], " ").as_bytes());
        text.push(b'\n');
    }
    text.extend_from_slice(b"#\n");
    match control {
        Some(rule) => {
            text.extend_from_slice(
                b"# pgferry-source's control connection, from a loopback address only pgferry uses:\n",
            );
            text.extend_from_slice(rule.line().as_bytes());
        }
        None => text.extend_from_slice(
            b"# (no control rule: a restarted pgferry-source cannot reconnect while fenced)\n",
        ),
    }
    let kept = replication_records(original);
    text.extend_from_slice(
        b"# Physical replication (the new cluster's walreceiver; it cannot run SQL), as before:\n",
    );
    for line in &kept {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    text.extend_from_slice(
        b"# Everything else, superusers and logical replication included, is refused:\n\
          local   all all reject\n\
          host    all all all reject\n",
    );
    FencedHba {
        text,
        replication_records: kept.len(),
    }
}

/// The original's records that admit physical replication connections, each rewritten so that
/// its database field is exactly `replication` (a record `replication,app` would otherwise
/// still admit `app`). Records PostgreSQL 16 continues on the next line (trailing `\`) and
/// anything that is not a plain record (`include…`) are left out: only fewer connections can
/// result.
pub fn replication_records(original: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut continued = false;
    for raw in original.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let was_continued = continued;
        continued = code_part(line).trim_ascii_end().ends_with(b"\\");
        if was_continued || continued {
            continue;
        }
        let fields = fields(line);
        let (Some(kind), Some(db)) = (fields.first(), fields.get(1)) else {
            continue;
        };
        let is_record = matches!(
            kind.single_keyword(),
            Some(b"local" | b"host" | b"hostssl" | b"hostnossl" | b"hostgssenc" | b"hostnogssenc")
        );
        // A record needs at least type, database, user, (address,) method.
        if !is_record || fields.len() < 4 {
            continue;
        }
        if !db.tokens.iter().any(|t| t.is_keyword(b"replication")) {
            continue;
        }
        let mut kept = Vec::with_capacity(line.len());
        kept.extend_from_slice(&line[..db.start]);
        kept.extend_from_slice(b"replication");
        kept.extend_from_slice(&line[db.end..]);
        out.push(kept);
    }
    out
}

/// One token of a field: its text (quotes removed) and whether it began with a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: Vec<u8>,
    quoted: bool,
}

impl Token {
    fn is_keyword(&self, k: &[u8]) -> bool {
        !self.quoted && self.text == k
    }
}

/// A field (a comma-separated list of tokens) and its byte range in the line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    tokens: Vec<Token>,
    start: usize,
    end: usize,
}

impl Field {
    fn single_keyword(&self) -> Option<&[u8]> {
        match self.tokens.as_slice() {
            [t] if !t.quoted => Some(&t.text),
            _ => None,
        }
    }
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// The line up to an unquoted `#`.
fn code_part(line: &[u8]) -> &[u8] {
    let mut in_quote = false;
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'"' => in_quote = !in_quote,
            b'#' if !in_quote => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Splits a line into fields as PostgreSQL 15's `next_field_expand`/`next_token` do.
fn fields(line: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let mut field: Option<Field> = None;
        loop {
            // Blanks and commas before a token are skipped.
            while pos < line.len() && (is_blank(line[pos]) || line[pos] == b',') {
                pos += 1;
            }
            if pos >= line.len() || line[pos] == b'#' {
                return finish(out, field);
            }
            let start = pos;
            let (mut text, mut in_quote, mut was_quote, mut quoted) =
                (Vec::new(), false, false, false);
            let mut comma = false;
            while pos < line.len() && (in_quote || !is_blank(line[pos])) {
                let c = line[pos];
                if c == b'#' && !in_quote {
                    // A comment ends the line (and this token).
                    break;
                }
                if c == b',' && !in_quote {
                    comma = true;
                    break;
                }
                if c != b'"' || was_quote {
                    text.push(c);
                }
                was_quote = in_quote && c == b'"' && !was_quote;
                if c == b'"' {
                    in_quote = !in_quote;
                    // Like hba.c: a quote before any character makes the token "quoted".
                    if text.is_empty() {
                        quoted = true;
                    }
                }
                pos += 1;
            }
            let end = pos;
            let f = field.get_or_insert(Field {
                tokens: Vec::new(),
                start,
                end,
            });
            f.tokens.push(Token { text, quoted });
            f.end = end;
            if comma {
                pos += 1;
                // The list goes on in the next token (blanks after the comma are allowed).
                continue;
            }
            break;
        }
        if let Some(f) = field {
            out.push(f);
        }
        if pos >= line.len() || line[pos] == b'#' {
            return out;
        }
    }
}

fn finish(mut out: Vec<Field>, field: Option<Field>) -> Vec<Field> {
    if let Some(f) = field {
        out.push(f);
    }
    out
}

/// What the fence does with the copy of an original file before changing the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeFence {
    /// Save the file's bytes as the copy (atomically, before anything changes).
    Save,
    /// The copy is already right: the same bytes, or an earlier attempt of this fence saved it
    /// (a fence repeated after an interruption must never save its own fenced file as the
    /// original).
    Keep,
}

/// What unfencing does with a file and its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// Rename the copy over the file: the original bytes, atomically.
    RenameBack,
    /// The file already holds the original bytes: remove the copy.
    DropCopy,
    /// No copy and nothing of ours in place: nothing to undo.
    Nothing,
}

/// Why the fence or the unfence will not touch a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// A copy exists that this fence did not make (or the file changed since).
    #[error("a copy from an earlier fence exists and differs from the file")]
    StaleCopy,
    /// The file is a fenced file but its original is gone.
    #[error("the file is pgferry's fence but the copy of the original is missing")]
    MissingCopy,
}

/// `pg_hba.conf` before the fence, from its bytes and those of its copy (if one exists).
pub fn hba_before_fence(current: &[u8], copy: Option<&[u8]>) -> Result<BeforeFence, CopyError> {
    match (is_fenced(current), copy) {
        (true, Some(_)) => Ok(BeforeFence::Keep),
        (true, None) => Err(CopyError::MissingCopy),
        (false, Some(c)) if c == current => Ok(BeforeFence::Keep),
        (false, Some(_)) => Err(CopyError::StaleCopy),
        (false, None) => Ok(BeforeFence::Save),
    }
}

/// `postgresql.auto.conf` before the fence (it carries no marker: whether `pg_hba.conf` is
/// already fenced tells whether its copy is this fence's).
pub fn settings_before_fence(
    current: &[u8],
    copy: Option<&[u8]>,
    hba_already_fenced: bool,
) -> Result<BeforeFence, CopyError> {
    match (copy, hba_already_fenced) {
        (Some(_), true) => Ok(BeforeFence::Keep),
        (Some(c), false) if c == current => Ok(BeforeFence::Keep),
        (Some(_), false) => Err(CopyError::StaleCopy),
        // The copy is saved before pg_hba.conf is fenced; fenced without it, someone removed it.
        (None, true) => Err(CopyError::MissingCopy),
        (None, false) => Ok(BeforeFence::Save),
    }
}

/// `pg_hba.conf` at unfence.
pub fn hba_restore(current: &[u8], copy: Option<&[u8]>) -> Result<Restore, CopyError> {
    match (is_fenced(current), copy) {
        (true, Some(_)) => Ok(Restore::RenameBack),
        (true, None) => Err(CopyError::MissingCopy),
        (false, Some(c)) if c == current => Ok(Restore::DropCopy),
        (false, Some(_)) => Err(CopyError::StaleCopy),
        (false, None) => Ok(Restore::Nothing),
    }
}

/// `postgresql.auto.conf` at unfence: its copy, when there is one, is the original.
pub fn settings_restore(current: &[u8], copy: Option<&[u8]>) -> Restore {
    match copy {
        Some(c) if c == current => Restore::DropCopy,
        Some(_) => Restore::RenameBack,
        None => Restore::Nothing,
    }
}

/// Whether a child of the postmaster, not (yet) listed in `pg_stat_activity`, is a connection
/// still starting up — forked but not yet past authentication — from its process title
/// (`/proc/PID/cmdline`). Such a backend was forked with the `pg_hba.conf` rules the postmaster
/// had then, and becomes a session only after authentication: it must be ended by signal, not
/// by `pg_terminate_backend` (which cannot see it). Right after the fork its title is still the
/// postmaster's command line; from the startup packet on it is
/// `postgres: [cluster: ]user database host(port) …` or `… [local] …`. Background processes
/// (logger, checkpointer, autovacuum and other workers) never show a client address.
pub fn connection_in_startup(title: &[u8], postmaster_cmdline: &[u8]) -> bool {
    if !title.is_empty() && title == postmaster_cmdline {
        return true;
    }
    let t: Vec<u8> = title
        .iter()
        .map(|&b| if b == 0 { b' ' } else { b })
        .collect();
    let Some(rest) = t.strip_prefix(b"postgres: ") else {
        return false;
    };
    let has = |needle: &[u8]| rest.windows(needle.len()).any(|w| w == needle);
    has(b"[local]") || (has(b"(") && has(b")"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> ControlRule {
        ControlRule::new("postgres", "postgres", PasswordMethod::ScramSha256).unwrap()
    }

    fn lines(b: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Records of a file, as (type, database tokens) with non-comment text only.
    fn records(b: &[u8]) -> Vec<Vec<Vec<(String, bool)>>> {
        b.split(|&c| c == b'\n')
            .map(fields)
            .filter(|f| !f.is_empty())
            .map(|f| {
                f.into_iter()
                    .map(|f| {
                        f.tokens
                            .into_iter()
                            .map(|t| (String::from_utf8_lossy(&t.text).to_string(), t.quoted))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    const DEBIAN: &str = "\
# Database administrative login by Unix domain socket
local   all             postgres                                peer

# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
";

    #[test]
    fn keeps_only_physical_replication_and_refuses_the_rest() {
        let f = fenced_hba(DEBIAN.as_bytes(), Some(&rule()), &["original: x".into()]);
        assert!(is_fenced(&f.text));
        assert!(!is_fenced(DEBIAN.as_bytes()));
        assert_eq!(f.replication_records, 3);
        let recs = records(&f.text);
        let types: Vec<(String, String)> = recs
            .iter()
            .map(|r| (r[0][0].0.clone(), r[1][0].0.clone()))
            .collect();
        assert_eq!(
            types,
            [
                ("host", "postgres"),
                ("local", "replication"),
                ("host", "replication"),
                ("host", "replication"),
                ("local", "all"),
                ("host", "all"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // The control rule: quoted names (never keywords), our address only, a password.
        assert_eq!(
            recs[0],
            vec![
                vec![("host".to_string(), false)],
                vec![("postgres".to_string(), true)],
                vec![("postgres".to_string(), true)],
                vec![("127.80.71.70/32".to_string(), false)],
                vec![("scram-sha-256".to_string(), false)],
            ]
        );
        // Replication records are carried verbatim.
        let text = lines(&f.text);
        assert!(text.contains(
            &"host    replication     all             127.0.0.1/32            scram-sha-256"
                .to_string()
        ));
        assert!(text.ends_with(&[
            "local   all all reject".to_string(),
            "host    all all all reject".to_string()
        ]));
        assert!(text.contains(&"# original: x".to_string()));
    }

    #[test]
    fn a_database_list_is_narrowed_to_replication() {
        let orig = b"host replication,app,\"replication\" all 10.0.0.0/8 md5 # standbys\n\
                     host app,  replication repl 10.1.0.0/16 scram-sha-256\n";
        let kept = replication_records(orig);
        assert_eq!(
            kept.iter()
                .map(|l| String::from_utf8_lossy(l).to_string())
                .collect::<Vec<_>>(),
            [
                "host replication all 10.0.0.0/8 md5 # standbys",
                "host replication repl 10.1.0.0/16 scram-sha-256"
            ]
        );
    }

    #[test]
    fn quoted_replication_comments_and_other_lines_are_not_replication() {
        let orig = b"host \"replication\" all 127.0.0.1/32 trust\n\
                     # host replication all 127.0.0.1/32 trust\n\
                     host all all 127.0.0.1/32 trust # replication\n\
                     host @dbs all 127.0.0.1/32 trust\n\
                     include_dir conf.d\n\
                     host replication\n\
                     host all all samenet trust\n";
        assert!(replication_records(orig).is_empty());
    }

    #[test]
    fn continued_records_are_left_out_whole() {
        // PostgreSQL 16 joins a line ending in a backslash with the next one.
        let orig = b"host replication all \\\n  127.0.0.1/32 trust\nlocal replication all peer\r\n";
        let kept = replication_records(orig);
        assert_eq!(kept, vec![b"local replication all peer".to_vec()]);
    }

    #[test]
    fn tokens_follow_postgres_quoting() {
        let f = fields(b"host \"a b\",\"c\"\"d\" x\"y\"z 1.2.3.4/32 trust#c");
        let toks: Vec<Vec<(String, bool)>> = f
            .iter()
            .map(|f| {
                f.tokens
                    .iter()
                    .map(|t| (String::from_utf8_lossy(&t.text).to_string(), t.quoted))
                    .collect()
            })
            .collect();
        assert_eq!(
            toks,
            vec![
                vec![("host".to_string(), false)],
                vec![("a b".to_string(), true), ("c\"d".to_string(), true)],
                vec![("xyz".to_string(), false)],
                vec![("1.2.3.4/32".to_string(), false)],
                vec![("trust".to_string(), false)],
            ]
        );
        // "a, b" is one list (blanks after a comma); "a ,b" is two fields.
        assert_eq!(fields(b"host a, b").len(), 2);
        assert_eq!(fields(b"host a ,b").len(), 3);
    }

    #[test]
    fn control_rule_names_are_quoted_and_round_trip() {
        let r = ControlRule::new("my db", "o\"brien", PasswordMethod::Md5).unwrap();
        let f = fenced_hba(b"", Some(&r), &[]);
        let recs = records(&f.text);
        assert_eq!(recs[0][1], vec![("my db".to_string(), true)]);
        assert_eq!(recs[0][2], vec![("o\"brien".to_string(), true)]);
        assert_eq!(recs[0][4], vec![("md5".to_string(), false)]);
        assert!(ControlRule::new("db", "a\nb", PasswordMethod::Md5).is_err());
        assert!(ControlRule::new("", "a", PasswordMethod::Md5).is_err());
        // Without a control rule only replication gets in.
        let none = fenced_hba(DEBIAN.as_bytes(), None, &[]);
        assert_eq!(records(&none.text).len(), 5);
        // A note cannot smuggle a record in.
        let evil = fenced_hba(b"", None, &["x\nhost all all all trust".into()]);
        assert_eq!(records(&evil.text).len(), 2);
    }

    #[test]
    fn password_method_from_the_stored_verifier() {
        assert_eq!(
            PasswordMethod::of_stored(Some("SCRAM-SHA-256$4096:abc")),
            Some(PasswordMethod::ScramSha256)
        );
        assert_eq!(
            PasswordMethod::of_stored(Some("md5abcdef")),
            Some(PasswordMethod::Md5)
        );
        assert_eq!(PasswordMethod::of_stored(None), None);
    }

    #[test]
    fn startup_connections_by_title() {
        let pm = b"/usr/lib/postgresql/15/bin/postgres\0-D\0/srv/data\0".as_slice();
        for (title, starting) in [
            (pm, true),
            (
                b"postgres: app shop 127.0.0.1(5444) authentication\0\0".as_slice(),
                true,
            ),
            (b"postgres: main: app shop [local] startup", true),
            (
                b"postgres: walsender repl 10.0.0.9(41000) authentication",
                true,
            ),
            (b"postgres: logger ", false),
            (b"postgres: main: logger", false),
            (b"postgres: checkpointer ", false),
            (b"postgres: autovacuum worker shop", false),
            (b"postgres: parallel worker for PID 42", false),
            (
                b"postgres: logical replication worker for subscription 16394",
                false,
            ),
            (b"", false),
        ] {
            assert_eq!(
                connection_in_startup(title, pm),
                starting,
                "{}",
                String::from_utf8_lossy(title)
            );
        }
    }

    #[test]
    fn copies_are_saved_once_and_restored_only_when_ours() {
        let orig = DEBIAN.as_bytes();
        let fenced = fenced_hba(orig, None, &[]).text;
        // First fence: save. Repeated fence (after an interruption): keep the first copy.
        assert_eq!(hba_before_fence(orig, None), Ok(BeforeFence::Save));
        assert_eq!(hba_before_fence(&fenced, Some(orig)), Ok(BeforeFence::Keep));
        // Interrupted after saving, before fencing: the copy is the same bytes.
        assert_eq!(hba_before_fence(orig, Some(orig)), Ok(BeforeFence::Keep));
        assert_eq!(
            hba_before_fence(orig, Some(b"other")),
            Err(CopyError::StaleCopy)
        );
        assert_eq!(hba_before_fence(&fenced, None), Err(CopyError::MissingCopy));

        assert_eq!(hba_restore(&fenced, Some(orig)), Ok(Restore::RenameBack));
        assert_eq!(hba_restore(orig, Some(orig)), Ok(Restore::DropCopy));
        assert_eq!(hba_restore(orig, None), Ok(Restore::Nothing));
        assert_eq!(hba_restore(&fenced, None), Err(CopyError::MissingCopy));
        assert_eq!(hba_restore(orig, Some(b"x")), Err(CopyError::StaleCopy));

        let (auto, changed) = (b"# auto\n".as_slice(), b"# auto\nro = on\n".as_slice());
        assert_eq!(
            settings_before_fence(auto, None, false),
            Ok(BeforeFence::Save)
        );
        assert_eq!(
            settings_before_fence(changed, Some(auto), true),
            Ok(BeforeFence::Keep)
        );
        assert_eq!(
            settings_before_fence(changed, Some(auto), false),
            Err(CopyError::StaleCopy)
        );
        assert_eq!(
            settings_before_fence(changed, None, true),
            Err(CopyError::MissingCopy)
        );
        assert_eq!(settings_restore(changed, Some(auto)), Restore::RenameBack);
        assert_eq!(settings_restore(auto, Some(auto)), Restore::DropCopy);
        assert_eq!(settings_restore(auto, None), Restore::Nothing);
    }
}
