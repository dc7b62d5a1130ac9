//! Table digests, the same code on both sides: each agent digests its own cluster (the source
//! on request, the target on the new cluster) and the target compares.
//!
//! - Whole tables, ordered by primary key ([`table_digests`]): the cutover's
//!   `--verify-at-fence` method, and PostgreSQL below 14.
//! - A file's SHA-256 ([`sha256_file`]), for the agent copy.
//! - Block ranges by TID range scans ([`block_digests`], see [`crate::verify`]): the pre-pass
//!   before the fence and the remainder at the fence.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio_postgres::Client;

use crate::control::{BlockRanges, TableBlocks, TableDigest};

/// Size and SHA-256 of a file, read through once (the agent copy's manifest and its delta).
pub fn sha256_file(p: &std::path::Path) -> std::io::Result<(u64, [u8; 32])> {
    sha256_prefix(p, u64::MAX)
}

/// Length and SHA-256 of the first `limit` bytes of a file (all of it if shorter).
pub fn sha256_prefix(p: &std::path::Path, limit: u64) -> std::io::Result<(u64, [u8; 32])> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?.take(limit);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        n += k as u64;
    }
    let mut sum = [0; 32];
    sum.copy_from_slice(ctx.finish().as_ref());
    Ok((n, sum))
}

/// A file's size (when opened), its range size ([`file_range_size`]) and the BLAKE3 of each
/// range, the last one shorter if the size is not a multiple. Bytes the file gains while it is
/// read are not digested (the size is the one read).
///
/// [`file_range_size`]: crate::control::file_range_size
pub fn file_range_digests(p: &std::path::Path) -> std::io::Result<(u64, u64, Vec<blake3::Hash>)> {
    let f = std::fs::File::open(p)?;
    let size = f.metadata()?.len();
    let range = crate::control::file_range_size(size);
    let (read, sums) = reader_range_digests(std::io::Read::take(f, size), range)?;
    Ok((read, range, sums))
}

/// Bytes read from `r` and the BLAKE3 of each `range` bytes of them (the last range may be
/// shorter; none when `r` is empty).
pub fn reader_range_digests(
    mut r: impl std::io::Read,
    range: u64,
) -> std::io::Result<(u64, Vec<blake3::Hash>)> {
    assert!(range > 0, "a range has bytes");
    let mut buf = vec![0; (1 << 20).min(range) as usize];
    let (mut total, mut in_range) = (0u64, 0u64);
    let mut hasher = blake3::Hasher::new();
    let mut sums = Vec::new();
    loop {
        let want = buf.len().min((range - in_range) as usize);
        let k = match r.read(&mut buf[..want]) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        total += k as u64;
        in_range += k as u64;
        if in_range == range {
            sums.push(hasher.finalize());
            hasher.reset();
            in_range = 0;
        }
    }
    if in_range > 0 {
        sums.push(hasher.finalize());
    }
    Ok((total, sums))
}

/// Opens one more connection to the same cluster (for digests in parallel).
pub type Connect<'a> = &'a (dyn Fn() -> ConnectFuture + Send + Sync);
/// A connection being opened.
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<Client>> + Send>>;

/// Most connections one side uses for table digests.
pub const MAX_DIGEST_PARALLELISM: usize = 4;

/// Connections for table digests here: one per core, at most [`MAX_DIGEST_PARALLELISM`]
/// (each is a PostgreSQL backend formatting rows: CPU-bound).
pub fn digest_parallelism() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_DIGEST_PARALLELISM)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Digests of `tables`, in that order: `client` and up to `parallel - 1` further connections
/// from `connect` each take the next table until none is left. The first error ends it.
pub async fn table_digests(
    client: &Client,
    connect: Option<Connect<'_>>,
    tables: &[String],
    parallel: usize,
) -> Result<Vec<TableDigest>> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(vec![None; tables.len()]);
    let extra = match connect {
        Some(_) => parallel
            .saturating_sub(1)
            .min(tables.len().saturating_sub(1)),
        None => 0,
    };
    let mut workers: Vec<Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>> =
        vec![Box::pin(digest_worker(client, tables, &next, &out))];
    if let Some(connect) = connect {
        for _ in 0..extra {
            let (next, out) = (&next, &out);
            workers.push(Box::pin(async move {
                let c = connect().await?;
                digest_worker(&c, tables, next, out).await
            }));
        }
    }
    futures_util::future::try_join_all(workers).await?;
    out.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .zip(tables)
        .map(|(d, t)| d.with_context(|| format!("no digest for {t}")))
        .collect()
}

async fn digest_worker(
    client: &Client,
    tables: &[String],
    next: &AtomicUsize,
    out: &Mutex<Vec<Option<TableDigest>>>,
) -> Result<()> {
    loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some(table) = tables.get(i) else {
            return Ok(());
        };
        let d = table_digest(client, table).await?;
        out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(d);
    }
}

/// Row count and BLAKE3 of a table's contents in a deterministic order: by primary key when
/// there is one, else by the whole row's text.
pub async fn table_digest(client: &Client, table: &str) -> Result<TableDigest> {
    let qualified = qualified(table)?;
    let pk: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1::text::regclass AND i.indisprimary
              ORDER BY array_position(i.indkey, a.attnum)",
            &[&qualified],
        )
        .await
        .with_context(|| format!("looking up table {table}"))?
        .iter()
        .map(|r| quote_ident(r.get::<_, &str>(0)))
        .collect();
    let order = if pk.is_empty() {
        "t::text".to_string()
    } else {
        pk.join(", ")
    };
    let sql = format!("COPY (SELECT * FROM {qualified} t ORDER BY {order}) TO STDOUT");
    let stream = client
        .copy_out(sql.as_str())
        .await
        .with_context(|| format!("reading table {table}"))?;
    let mut stream = std::pin::pin!(stream);
    let mut hasher = blake3::Hasher::new();
    let mut rows = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading table {table}"))?;
        rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        hasher.update(&chunk);
    }
    Ok(TableDigest {
        table: table.to_string(),
        rows,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Range digests of `tables` (see [`crate::verify`]): `client` and up to `parallel - 1`
/// further connections from `connect` each take the next run of ranges. A statement that a
/// standby cancels for a conflict with recovery is retried.
pub async fn block_digests(
    client: &Client,
    connect: Option<Connect<'_>>,
    tables: &[BlockRanges],
    parallel: usize,
) -> Result<Vec<TableBlocks>> {
    let mut out = Vec::with_capacity(tables.len());
    let mut work = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let qualified = qualified(&t.table)?;
        let row = client
            .query_one(
                "SELECT pg_relation_filenode(c.oid)::text::int8,
                        (pg_relation_size(c.oid) / current_setting('block_size')::int8)
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .with_context(|| format!("looking up table {}", t.table))?;
        out.push(TableBlocks {
            table: t.table.clone(),
            filenode: row.get::<_, Option<i64>>(0).unwrap_or(0) as u32,
            blocks: row.get::<_, i64>(1).max(0) as u64,
            digests: Vec::new(),
        });
        for runs in crate::verify::statements(&t.ranges) {
            work.push((i, qualified.clone(), runs));
        }
    }
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    let extra = match connect {
        Some(_) => parallel.saturating_sub(1).min(work.len().saturating_sub(1)),
        None => 0,
    };
    let mut workers: Vec<Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>> =
        vec![Box::pin(block_worker(client, tables, &work, &next, &done))];
    if let Some(connect) = connect {
        for _ in 0..extra {
            let (work, next, done) = (&work, &next, &done);
            workers.push(Box::pin(async move {
                let c = connect().await?;
                block_worker(&c, tables, work, next, done).await
            }));
        }
    }
    futures_util::future::try_join_all(workers).await?;
    for (t, d) in done.into_inner().unwrap_or_else(|e| e.into_inner()) {
        out[t].digests.extend(d);
    }
    for t in &mut out {
        t.digests.sort_by_key(|d| d.range);
    }
    Ok(out)
}

/// One statement's ranges to digest: table index, quoted name, runs `(first, count)`.
type Statement = (usize, String, Vec<(u32, u32)>);

async fn block_worker(
    client: &Client,
    tables: &[BlockRanges],
    work: &[Statement],
    next: &AtomicUsize,
    done: &Mutex<Vec<(usize, Vec<crate::verify::RangeDigest>)>>,
) -> Result<()> {
    loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some((t, qualified, runs)) = work.get(i) else {
            return Ok(());
        };
        let d = range_digests(client, qualified, runs)
            .await
            .with_context(|| {
                let (first, last) = (runs[0], runs[runs.len() - 1]);
                format!(
                    "digesting {} block ranges {}..{} ({} run(s))",
                    tables[*t].table,
                    first.0,
                    last.0 + last.1,
                    runs.len()
                )
            })?;
        done.lock().unwrap_or_else(|e| e.into_inner()).push((*t, d));
    }
}

/// `schema.table` as a quoted identifier pair.
pub fn qualified(table: &str) -> Result<String> {
    let (schema, name) = table
        .split_once('.')
        .with_context(|| format!("table {table:?} is not schema.table"))?;
    Ok(format!("{}.{}", quote_ident(schema), quote_ident(name)))
}

/// Runs of ranges by TID range scans, one per run (`UNION ALL`): `COPY (SELECT ctid, * …)`
/// split into ranges.
async fn range_digests(
    client: &Client,
    qualified: &str,
    runs: &[(u32, u32)],
) -> Result<Vec<crate::verify::RangeDigest>> {
    let scans: Vec<String> = runs
        .iter()
        .map(|&(first, count)| {
            let (lo, hi) = crate::verify::tid_bounds(first, count);
            let upper = hi.map_or(String::new(), |hi| format!(" AND ctid < '({hi},0)'::tid"));
            format!("SELECT ctid, * FROM {qualified} t WHERE ctid >= '({lo},0)'::tid{upper}")
        })
        .collect();
    let sql = format!("COPY ({}) TO STDOUT", scans.join(" UNION ALL "));
    let mut attempt = 0;
    loop {
        attempt += 1;
        match range_copy(client, &sql, runs).await {
            Err(e) if attempt < 5 && is_recovery_conflict(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
            }
            r => return r,
        }
    }
}

async fn range_copy(
    client: &Client,
    sql: &str,
    runs: &[(u32, u32)],
) -> Result<Vec<crate::verify::RangeDigest>> {
    let stream = client.copy_out(sql).await?;
    let mut stream = std::pin::pin!(stream);
    let mut split = crate::verify::RangeSplitter::new(runs);
    while let Some(chunk) = stream.next().await {
        split.push(&chunk?)?;
    }
    Ok(split.finish()?)
}

/// A statement a hot standby cancelled because replay needed what it held.
fn is_recovery_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_digests_cover_each_range_and_a_short_last_one() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // A reader that hands out odd-sized pieces must give the same digests.
        struct Dribble<'a>(&'a [u8]);
        impl std::io::Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(333);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for range in [1u64, 4096, 4000, 10_000, 1 << 20] {
            let (total, sums) = reader_range_digests(Dribble(&data), range).unwrap();
            assert_eq!(total, data.len() as u64);
            let want: Vec<blake3::Hash> = data.chunks(range as usize).map(blake3::hash).collect();
            assert_eq!(sums, want, "range {range}");
        }
        assert_eq!(
            reader_range_digests(&[][..], 4096).unwrap(),
            (0, Vec::new())
        );
    }
}
