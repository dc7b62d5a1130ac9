//! The cutover's verification outside the write-downtime window (design: `docs/verify.md`,
//! pure parts in [`pgferry_common::verify`]).
//!
//! ```text
//!   before the fence (writes go on):
//!     round: source PrepassBegin → L0, xmax; PrepassWait until xids < xmax ended → marker LSN
//!            standby replays the marker; both sides digest the ranges (TID range scans)
//!     pg_waldump on the standby's pg_wal from L0: ranges touched since their round → refresh round
//!   at the fence (standby paused at ≥ the fence LSN):
//!     pg_waldump up to the replay LSN; digest again only the ranges touched since their round
//!     (and tables rewritten meanwhile, whole); compare every range of every table
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncBufReadExt;
use tokio_postgres::Client;

use crate::control_client::ControlClient;
use crate::migrate::{new_cluster_connector, standby_status, Executor};
use pgferry_common::admin::{AtFenceReport, PrepassReport};
use pgferry_common::control::{BlockRanges, Request, Response, TableBlocks, TableDigest};
use pgferry_common::migration::Lsn;
use pgferry_common::verify::{
    ranges_for, ChangeMap, RangeDigest, RelKey, MAX_RANGES_PER_REQUEST, RANGE_BLOCKS,
};

/// Bytes of table one range covers (8 KiB blocks).
const RANGE_BYTES: u64 = RANGE_BLOCKS as u64 * 8192;
/// Longest wait for the transactions open at a round's start.
pub use pgferry_common::admin::DEFAULT_PREPASS_WAIT_SECS;
/// Refresh rounds before the fence at most. One more is run only while the ranges touched
/// since their digest are more than [`REFRESH_ABOVE_RANGES`] (4 MiB, a few tens of ms to
/// digest) and the last round left fewer than the one before: each round takes about as long
/// as what it digests, so under scattered writes the stale set shrinks towards what the
/// writes touch in one short round, and stops shrinking there.
const MAX_REFRESH_ROUNDS: u32 = 8;
const REFRESH_ABOVE_RANGES: usize = 32;
/// Longest wait for one digest request to the source.
const DIGEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// One range's digest as kept until the fence: 40 bytes, not a [`RangeDigest`]'s 100 or so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest {
    rows: u64,
    blake3: [u8; 32],
}

impl Digest {
    /// A range not digested yet.
    const NONE: Digest = Digest {
        rows: u64::MAX,
        blake3: [0; 32],
    };

    fn of(d: &RangeDigest) -> Digest {
        let mut blake3 = [0u8; 32];
        // Both sides' hex comes from `RangeSplitter`; anything else never equals a real one.
        match blake3::Hash::from_hex(&d.blake3) {
            Ok(h) => blake3 = *h.as_bytes(),
            Err(_) => blake3[0] = 0xff,
        }
        Digest {
            rows: d.rows,
            blake3,
        }
    }
}

/// One table as the pre-pass left it. Memory is what the verification of a big cluster costs
/// while the cutover runs: 48 bytes a range (400 MB per TB of table at 128 KiB a range).
/// Where both sides agree, one digest is kept; where they do not (written during the round,
/// or corrupt) the source's is kept beside it.
#[derive(Debug, Clone)]
struct Tracked {
    /// The standby's storage of the table when digested.
    key: RelKey,
    /// Digest the whole table at the fence (the source digested other storage).
    whole: bool,
    /// Per range: the round's start LSN (`Lsn(0)`: never digested) and the standby's digest.
    since: Vec<Lsn>,
    std: Vec<Digest>,
    /// Ranges whose source digest differs from the standby's, with the source's.
    differ: BTreeMap<u32, Digest>,
}

impl Tracked {
    fn new(key: RelKey, whole: bool) -> Self {
        Tracked {
            key,
            whole,
            since: Vec::new(),
            std: Vec::new(),
            differ: BTreeMap::new(),
        }
    }

    /// Rows on the source: the standby's, except where they differ.
    fn source_rows(&self) -> u64 {
        self.std
            .iter()
            .enumerate()
            .map(|(r, d)| match self.differ.get(&(r as u32)) {
                Some(s) => s.rows,
                None => d.rows,
            })
            .filter(|&rows| rows != u64::MAX)
            .sum()
    }
}

/// The outcome of the comparison at the fence (the caller audits it and refuses on a
/// mismatch).
pub(super) struct FenceVerification {
    /// The standby's digest of each table compared.
    pub digests: Vec<TableDigest>,
    /// Tables whose contents differ, each with its row counts and first differing range.
    pub mismatched: Vec<String>,
    /// Tables left out by the budget.
    pub not_verified: Vec<String>,
    pub report: AtFenceReport,
}

/// The pre-pass's results, kept until the fence.
pub struct Prepass {
    tables: BTreeMap<String, Tracked>,
    changes: ChangeMap,
    wal: WalReader,
    pub report: PrepassReport,
}

/// Reads the standby's own WAL with `pg_waldump`, from where it stopped last.
struct WalReader {
    pg_wal: PathBuf,
    timeline: u32,
    next: Lsn,
}

impl Executor<'_> {
    /// Digests every range of `tables` on both sides while writes go on, then refreshes the
    /// ranges written meanwhile until few are left.
    pub(super) async fn prepass(
        &self,
        standby: &Client,
        tables: &[String],
        wait_secs: u64,
    ) -> Result<Prepass> {
        let t0 = Instant::now();
        // The whole pre-pass asks one source agent process, over one connection: if that
        // agent restarts or the connection is lost, the pre-pass fails (nothing was fenced)
        // and the cutover is run again, rather than mixing a round's begin, wait and digests
        // from two processes.
        let via = (self.control)().await?;
        let via = Some(&*via);
        let (start, waited) = self.round_start(via, standby, wait_secs).await?;
        let timeline: i64 = standby
            .query_one(
                "SELECT coalesce((SELECT received_tli::int8 FROM pg_stat_wal_receiver),
                                 (SELECT timeline_id::int8 FROM pg_control_checkpoint()))",
                &[],
            )
            .await
            .context("reading the standby's timeline")?
            .get(0);
        let mut pre = Prepass {
            tables: BTreeMap::new(),
            changes: ChangeMap::default(),
            wal: WalReader {
                pg_wal: self.data_dir()?.join("pg_wal"),
                timeline: timeline as u32,
                next: start,
            },
            report: PrepassReport {
                tables: tables.len(),
                waited_ms: waited.as_millis() as u64,
                start_lsn: start.to_string(),
                rounds: 1,
                ..Default::default()
            },
        };
        let storage = relation_storage(standby, tables).await?;
        let mut items = Vec::new();
        for (table, (key, blocks)) in tables.iter().zip(&storage) {
            let n = ranges_for(*blocks);
            pre.changes.watch(*key, n);
            items.push(BlockRanges {
                table: table.clone(),
                ranges: (0..n).collect(),
            });
        }
        let total: u64 = items.iter().map(|i| i.ranges.len() as u64).sum();
        (self.progress)(format!(
            "pre-pass: digesting {} table(s), {} MB, on both sides while writes go on",
            tables.len(),
            total * RANGE_BYTES / (1024 * 1024)
        ));
        let t_digest = Instant::now();
        let (src, std) = self
            .digest_both(via, standby, &items, Some(&mut pre))
            .await?;
        let secs = t_digest.elapsed().as_secs_f64().max(0.001);
        for (table, (key, _)) in tables.iter().zip(&storage) {
            pre.tables.insert(table.clone(), Tracked::new(*key, false));
        }
        pre.apply(start, src, std);
        let actual: u64 = storage.iter().map(|(_, b)| b * 8192).sum();
        pre.report.ranges = total;
        pre.report.bytes = actual;
        pre.report.bytes_per_sec = (actual as f64 / secs) as u64;

        // Refresh what was written meanwhile, so that the fence has little left.
        let mut before = usize::MAX;
        for _ in 0..MAX_REFRESH_ROUNDS {
            let replay = standby_status(standby)
                .await?
                .replay_lsn
                .unwrap_or_default();
            self.read_wal(&mut pre, replay).await?;
            let stale = pre.stale();
            let n: usize = stale.iter().map(|s| s.ranges.len()).sum();
            if n <= REFRESH_ABOVE_RANGES || n >= before {
                break;
            }
            before = n;
            (self.progress)(format!(
                "pre-pass: {n} range(s) ({:.1} MB) written meanwhile; digesting them again",
                (n as u64 * RANGE_BYTES) as f64 / 1048576.0
            ));
            let (l0, waited) = self.round_start(via, standby, wait_secs).await?;
            pre.report.waited_ms += waited.as_millis() as u64;
            let (src, std) = self
                .digest_both(via, standby, &stale, Some(&mut pre))
                .await?;
            pre.apply(l0, src, std);
            pre.report.rounds += 1;
            pre.report.refreshed_ranges += n as u64;
        }
        pre.report.ms = t0.elapsed().as_millis() as u64;
        pre.report.wal_records = pre.changes.records;
        Ok(pre)
    }

    /// Starts a round on the source and waits until every transaction open at its start has
    /// ended and the standby has replayed past that point; returns the round's start LSN.
    async fn round_start(
        &self,
        via: Option<&ControlClient>,
        standby: &Client,
        wait_secs: u64,
    ) -> Result<(Lsn, Duration)> {
        let (start, xmax) = match self
            .ask_via(via, Request::PrepassBegin, Duration::from_secs(60))
            .await?
        {
            Response::PrepassBegun { lsn, xmax } => (lsn, xmax),
            other => bail!("unexpected answer {other:?}"),
        };
        let t = Instant::now();
        let deadline = t + Duration::from_secs(wait_secs);
        let mut said = Instant::now() - Duration::from_secs(60);
        let marker = loop {
            match self
                .ask_via(via, Request::PrepassWait { xmax }, Duration::from_secs(60))
                .await?
            {
                Response::PrepassWaited {
                    ended: true, lsn, ..
                } => break lsn,
                Response::PrepassWaited { open, .. } => {
                    let who = open
                        .iter()
                        .map(|o| {
                            format!(
                                "pid {} (user {}, application {:?}, {}, open {} s)",
                                o.pid, o.user, o.application, o.state, o.open_secs
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    if Instant::now() > deadline {
                        bail!(
                            "transactions open since before the verification pre-pass did not end within {wait_secs} s (--prepass-wait-secs): {who}. Commit or end them (pg_terminate_backend(pid); COMMIT/ROLLBACK PREPARED for a prepared one) and run the cutover again; nothing was fenced"
                        );
                    }
                    if said.elapsed() >= Duration::from_secs(10) {
                        (self.progress)(format!(
                            "pre-pass: waiting for transactions open since it began to end (their earlier writes become visible only when they commit): {who}"
                        ));
                        said = Instant::now();
                    }
                }
                other => bail!("unexpected answer {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let waited = t.elapsed();
        // The standby digests only once it has replayed the marker.
        let deadline = Instant::now() + Duration::from_secs(wait_secs.max(60));
        loop {
            let st = standby_status(standby).await?;
            if st.replay_lsn.is_some_and(|r| r >= marker) {
                break;
            }
            let paused: bool = standby
                .query_one(
                    "SELECT pg_get_wal_replay_pause_state() <> 'not paused'",
                    &[],
                )
                .await
                .context("reading the standby's replay state")?
                .get(0);
            if paused {
                bail!("replay is paused on the new cluster, so it cannot reach the pre-pass marker {marker}: resume it (SELECT pg_wal_replay_resume()) and run the cutover again; nothing was fenced");
            }
            if Instant::now() > deadline {
                bail!("the standby did not replay the pre-pass marker {marker} within {} s; check the new cluster's log", wait_secs.max(60));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((start, waited))
    }

    /// Digests `items` on the source (by requests) and on the standby (here) at once; reads
    /// the WAL between requests when `pre` is given, so that the reader keeps up.
    async fn digest_both(
        &self,
        via: Option<&ControlClient>,
        standby: &Client,
        items: &[BlockRanges],
        mut pre: Option<&mut Prepass>,
    ) -> Result<(Vec<TableBlocks>, Vec<TableBlocks>)> {
        let mut src: Vec<TableBlocks> = Vec::new();
        let mut std: Vec<TableBlocks> = Vec::new();
        let total: usize = items.iter().map(|i| i.ranges.len()).sum();
        let mut done = 0usize;
        let mut said = Instant::now();
        let t = Instant::now();
        let more = new_cluster_connector(self.settings);
        // Batches of about 8 × the parallelism in 16 MiB runs: a few seconds each.
        let per_batch = (pgferry_common::runtime::digest::digest_parallelism()
            * 8
            * pgferry_common::verify::MAX_RUN_RANGES as usize)
            .min(MAX_RANGES_PER_REQUEST);
        for batch in batches(items, per_batch) {
            let theirs = async {
                match self
                    .ask_via(
                        via,
                        Request::BlockDigests {
                            tables: batch.clone(),
                        },
                        DIGEST_REQUEST_TIMEOUT,
                    )
                    .await?
                {
                    Response::BlockDigests { tables } => Ok(tables),
                    other => bail!("unexpected answer {other:?}"),
                }
            };
            let ours = pgferry_common::runtime::digest::block_digests(
                standby,
                Some(&more),
                &batch,
                pgferry_common::runtime::digest::digest_parallelism(),
            );
            let (theirs, ours) = tokio::try_join!(theirs, ours)?;
            if theirs.len() != batch.len() || ours.len() != batch.len() {
                bail!(
                    "the source agent answered for {} table(s), {} asked",
                    theirs.len(),
                    batch.len()
                );
            }
            merge(&mut src, theirs);
            merge(&mut std, ours);
            done += batch.iter().map(|b| b.ranges.len()).sum::<usize>();
            if let Some(pre) = pre.as_deref_mut() {
                let replay = standby_status(standby)
                    .await?
                    .replay_lsn
                    .unwrap_or_default();
                self.read_wal(pre, replay).await?;
            }
            if said.elapsed() >= Duration::from_secs(5) {
                let secs = t.elapsed().as_secs_f64().max(0.001);
                (self.progress)(format!(
                    "digested {done}/{total} MB on both sides ({:.0} MB/s)",
                    done as f64 / secs
                ));
                said = Instant::now();
            }
        }
        Ok((src, std))
    }

    /// Runs `pg_waldump` on the standby's WAL from where the last read stopped up to `end`
    /// (a replayed position, so the files are there), noting the ranges each record touched.
    async fn read_wal(&self, pre: &mut Prepass, end: Lsn) -> Result<()> {
        if end <= pre.wal.next {
            return Ok(());
        }
        let mut cmd = self.pg_tool("pg_waldump");
        cmd.arg("-p")
            .arg(&pre.wal.pg_wal)
            .arg("-t")
            .arg(pre.wal.timeline.to_string())
            .arg("-s")
            .arg(pre.wal.next.to_string())
            .arg("-e")
            .arg(end.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .context("running pg_waldump on the standby's WAL")?;
        let stdout = child.stdout.take().context("pg_waldump stdout")?;
        let mut lines = tokio::io::BufReader::with_capacity(1 << 20, stdout).lines();
        let before = pre.changes.records;
        while let Some(line) = lines.next_line().await? {
            if let Some(rec) = pgferry_common::verify::parse_waldump_line(&line) {
                pre.changes.note(&rec);
            }
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "pg_waldump could not read the standby's WAL from {} to {end} in {}: {} (the WAL may have been recycled: run the cutover again)",
                pre.wal.next,
                pre.wal.pg_wal.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if pre.changes.records == before {
            bail!(
                "pg_waldump printed no record from {} to {end}",
                pre.wal.next
            );
        }
        // The last record is read again next time: it may have been the last one printed
        // before `end` cut the next one.
        pre.wal.next = pre.changes.last.unwrap_or(pre.wal.next);
        Ok(())
    }

    /// At the fence (the standby paused at ≥ the fence LSN): digests again what changed since
    /// the pre-pass and compares every range. `budget`: the most seconds the fence's digests
    /// may take by the pre-pass's speed (`None`: no limit); tables whose changed ranges do not
    /// fit are reported NOT VERIFIED.
    pub(super) async fn verify_at_fence(
        &self,
        standby: &Client,
        pre: &mut Prepass,
        current: &[String],
        budget_secs: Option<u64>,
    ) -> Result<FenceVerification> {
        let mut report = AtFenceReport::default();
        let replay = standby_status(standby)
            .await?
            .replay_lsn
            .unwrap_or_default();
        let before = pre.changes.records;
        self.read_wal(pre, replay).await?;
        report.wal_records = pre.changes.records - before;
        pre.track_current_tables(standby, current, &mut report)
            .await?;
        let mut stale = pre.stale();
        let rate = pre.report.bytes_per_sec.max(1) as f64;
        let not_verified = leave_out_over_budget(&mut stale, rate, budget_secs);
        report.ranges = stale.iter().map(|s| s.ranges.len() as u64).sum();
        report.bytes = report.ranges * RANGE_BYTES;
        report.estimated_ms = (report.bytes as f64 / rate * 1000.0) as u64;
        (self.progress)(format!(
            "verifying at the fence: {} WAL record(s) since the pre-pass's last read; {} range(s) ({:.1} MB, about {:.1} s at the pre-pass's {:.0} MB/s) to digest again; every other range's digest stands",
            report.wal_records,
            report.ranges,
            report.bytes as f64 / 1048576.0,
            report.estimated_ms as f64 / 1000.0,
            rate / 1048576.0
        ));
        let t = Instant::now();
        let (src, std) = self.digest_both(None, standby, &stale, None).await?;
        report.digest_ms = t.elapsed().as_millis() as u64;
        pre.apply(Lsn(u64::MAX), src, std);
        let (digests, mismatched) = pre.compare(&not_verified);
        Ok(FenceVerification {
            digests,
            mismatched,
            not_verified,
            report,
        })
    }
}

/// With a time budget, leaves out the tables with the most to digest until the rest fits at
/// `rate` bytes a second; returns the tables left out (NOT VERIFIED).
fn leave_out_over_budget(
    stale: &mut Vec<BlockRanges>,
    rate: f64,
    budget_secs: Option<u64>,
) -> Vec<String> {
    let bytes = |s: &BlockRanges| s.ranges.len() as u64 * RANGE_BYTES;
    let mut not_verified = Vec::new();
    if let Some(budget) = budget_secs {
        stale.sort_by_key(|s| std::cmp::Reverse(s.ranges.len()));
        while stale.iter().map(bytes).sum::<u64>() as f64 / rate > budget as f64 {
            let s = stale.remove(0);
            not_verified.push(s.table);
        }
    }
    not_verified
}

impl Prepass {
    /// Brings the tracked tables up to the tables now (`current`, with their storage on the
    /// standby): those dropped since the pre-pass are gone, those created since are digested
    /// whole, and so are those rewritten since (TRUNCATE, VACUUM FULL, CLUSTER…). Noted in
    /// `report`.
    async fn track_current_tables(
        &mut self,
        standby: &Client,
        current: &[String],
        report: &mut AtFenceReport,
    ) -> Result<()> {
        self.tables.retain(|name, _| {
            let keep = current.contains(name);
            if !keep {
                report.tables_dropped.push(name.clone());
            }
            keep
        });
        let storage = relation_storage(standby, current).await?;
        for (name, (key, blocks)) in current.iter().zip(&storage) {
            let t = self
                .tables
                .entry(name.clone())
                .or_insert_with(|| Tracked::new(*key, true));
            if t.whole || *key != t.key {
                t.whole = true;
                t.key = *key;
                t.since.clear();
                t.std.clear();
                t.differ.clear();
                report.tables_whole.push(name.clone());
            }
            let n = ranges_for(*blocks) as usize;
            // Ranges past the digested end are digested too (empty unless written, and then
            // the WAL says so anyway).
            if t.since.len() < n {
                t.since.resize(n, Lsn(0));
            }
        }
        Ok(())
    }

    /// After the fence's digests: the standby's digest of each table (but those in
    /// `not_verified`), and each table whose contents differ, with its row counts and first
    /// differing range.
    fn compare(&self, not_verified: &[String]) -> (Vec<TableDigest>, Vec<String>) {
        let mut digests = Vec::new();
        let mut mismatched = Vec::new();
        for (name, t) in &self.tables {
            if not_verified.contains(name) {
                continue;
            }
            let n = t.std.len().max(t.since.len());
            let mut bad: Vec<u32> = t.differ.keys().copied().collect();
            bad.extend(
                (0..n as u32).filter(|&r| t.std.get(r as usize).is_none_or(|d| *d == Digest::NONE)),
            );
            bad.sort_unstable();
            bad.dedup();
            let rows: u64 = t
                .std
                .iter()
                .map(|d| d.rows)
                .filter(|&r| r != u64::MAX)
                .sum();
            let mut h = blake3::Hasher::new();
            for d in &t.std {
                h.update(blake3::Hash::from(d.blake3).to_hex().as_bytes());
            }
            if !bad.is_empty() {
                let (src_rows, std_rows) = (t.source_rows(), rows);
                mismatched.push(format!(
                    "{name} (source {src_rows} rows, target {std_rows} rows; {} block range(s) differ, first: blocks {}..{})",
                    bad.len(),
                    bad[0] as u64 * RANGE_BLOCKS as u64,
                    (bad[0] as u64 + 1) * RANGE_BLOCKS as u64
                ));
            }
            digests.push(TableDigest {
                table: name.clone(),
                rows,
                blake3: h.finalize().to_hex().to_string(),
            });
        }
        (digests, mismatched)
    }

    /// The ranges touched since their digest, per table (whole tables where marked).
    fn stale(&self) -> Vec<BlockRanges> {
        let mut out = Vec::new();
        for (name, t) in &self.tables {
            let ranges: Vec<u32> = if t.whole {
                (0..t.since.len() as u32).collect()
            } else {
                let mut r = self.changes.stale(&t.key, &t.since);
                // Ranges never digested (past the end then).
                r.extend((0..t.since.len() as u32).filter(|&i| t.since[i as usize] == Lsn(0)));
                r.sort_unstable();
                r.dedup();
                r
            };
            if !ranges.is_empty() {
                out.push(BlockRanges {
                    table: name.clone(),
                    ranges,
                });
            }
        }
        out
    }

    /// Takes new digests of a round that started at `since`.
    fn apply(&mut self, since: Lsn, src: Vec<TableBlocks>, std: Vec<TableBlocks>) {
        for (s, d) in src.into_iter().zip(std) {
            let Some(t) = self.tables.get_mut(&s.table) else {
                continue;
            };
            if s.filenode != t.key.rel || d.filenode != t.key.rel {
                // Rewritten during the round: whole at the fence.
                t.whole = true;
            }
            let mut theirs: BTreeMap<u32, Digest> = s
                .digests
                .iter()
                .map(|dg| (dg.range, Digest::of(dg)))
                .collect();
            let top = theirs
                .keys()
                .chain(d.digests.iter().map(|dg| &dg.range))
                .max()
                .copied();
            if let Some(top) = top {
                let n = top as usize + 1;
                if t.std.len() < n {
                    t.std.resize(n, Digest::NONE);
                }
                if t.since.len() < n {
                    t.since.resize(n, Lsn(0));
                }
            }
            for dg in &d.digests {
                let r = dg.range;
                let ours = Digest::of(dg);
                t.std[r as usize] = ours;
                t.since[r as usize] = t.since[r as usize].max(since);
                match theirs.remove(&r) {
                    Some(s) if s == ours => {
                        t.differ.remove(&r);
                    }
                    Some(s) => {
                        t.differ.insert(r, s);
                    }
                    None => {
                        t.differ.insert(r, Digest::NONE);
                    }
                }
            }
            // Ranges only the source answered for (the standby's always answers each range
            // asked, so this is a misbehaving peer): never equal.
            t.differ.extend(theirs);
            if since == Lsn(u64::MAX) {
                // At the fence: nothing is written any more.
                t.whole = false;
            }
            self.changes.watch(t.key, t.std.len() as u32);
        }
    }
}

/// Splits `items` into requests of at most `per` ranges.
fn batches(items: &[BlockRanges], per: usize) -> Vec<Vec<BlockRanges>> {
    let mut out: Vec<Vec<BlockRanges>> = vec![Vec::new()];
    let mut n = 0;
    for item in items {
        for chunk in item.ranges.chunks(per.max(1)) {
            if n + chunk.len() > per && n > 0 {
                out.push(Vec::new());
                n = 0;
            }
            out.last_mut().expect("one").push(BlockRanges {
                table: item.table.clone(),
                ranges: chunk.to_vec(),
            });
            n += chunk.len();
        }
    }
    out.retain(|b| !b.is_empty());
    out
}

/// Adds a batch's answers (a table may come in several batches).
fn merge(into: &mut Vec<TableBlocks>, batch: Vec<TableBlocks>) {
    for t in batch {
        match into.iter_mut().find(|x| x.table == t.table) {
            Some(x) => {
                x.filenode = if x.filenode == t.filenode {
                    x.filenode
                } else {
                    0
                };
                x.blocks = x.blocks.max(t.blocks);
                x.digests.extend(t.digests);
            }
            None => into.push(t),
        }
    }
}

/// Each table's storage on the standby (tablespace, database, relfilenode) and its blocks.
async fn relation_storage(standby: &Client, tables: &[String]) -> Result<Vec<(RelKey, u64)>> {
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        let qualified = pgferry_common::runtime::digest::qualified(table)?;
        let row = standby
            .query_one(
                "SELECT coalesce(nullif(c.reltablespace, 0), d.dattablespace)::int8,
                        d.oid::int8, pg_relation_filenode(c.oid)::text::int8,
                        (pg_relation_size(c.oid) / current_setting('block_size')::int8)
                   FROM pg_class c, pg_database d
                  WHERE c.oid = $1::text::regclass AND d.datname = current_database()",
                &[&qualified],
            )
            .await
            .with_context(|| format!("looking up table {table} on the new cluster"))?;
        out.push((
            RelKey {
                spc: row.get::<_, i64>(0) as u32,
                db: row.get::<_, i64>(1) as u32,
                rel: row.get::<_, i64>(2) as u32,
            },
            row.get::<_, i64>(3).max(0) as u64,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_tables_and_keep_every_range_once() {
        let items = vec![
            BlockRanges {
                table: "a.x".into(),
                ranges: (0..10).collect(),
            },
            BlockRanges {
                table: "a.y".into(),
                ranges: vec![3],
            },
        ];
        let b = batches(&items, 4);
        assert!(b
            .iter()
            .all(|b| b.iter().map(|i| i.ranges.len()).sum::<usize>() <= 4));
        let mut all: Vec<(String, u32)> = b
            .iter()
            .flatten()
            .flat_map(|i| i.ranges.iter().map(|r| (i.table.clone(), *r)))
            .collect();
        all.sort();
        assert_eq!(all.len(), 11);
        assert!(batches(&[], 4).is_empty());
    }
}
