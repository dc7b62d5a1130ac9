//! Verification outside the write-downtime window (pure part; see `docs/verify.md`).
//!
//! A physical standby has the same heap pages as its primary, so both sides can digest each
//! table **per block range** ([`RANGE_BLOCKS`] blocks, a TID range scan) while writes go on.
//! At the fence only the ranges that the WAL since their digest touched are digested again;
//! every other range's digest still describes the fenced contents.
//!
//! ```text
//!   source:   L0 = insert LSN ─ wait: every xid running at L0 ended ─ digest ranges ──┐
//!   standby:                     replay ≥ that point ─────────────── digest ranges ──┤
//!   WAL (L0, fence]: pg_waldump ─► blocks touched ─► ranges stale ─► digested again at the fence
//! ```
//!
//! Why the wait: a transaction that wrote a page before L0 and commits later changes what is
//! visible without touching the page again. Once every transaction running at L0 has ended,
//! any later change of visibility comes from a transaction whose writes are all after L0, and
//! so in the WAL that marks the ranges stale.
//!
//! This module holds the pieces that need no database: range arithmetic, the per-range hasher
//! of `COPY` output, the parser of `pg_waldump` lines and the map of touched ranges.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::migration::Lsn;

/// Heap blocks per digested range: 16 × 8 KiB = 128 KiB of table.
///
/// The range is the unit the fence digests again when the WAL says it was written. With
/// 1 MiB ranges, 200 single-row updates a second scattered over a 1.1 GB table left 203
/// ranges (203 MiB) to digest at the fence: 1.7 s of the 1.9 s write downtime. A smaller
/// range costs memory while the cutover runs (48 bytes a range: 400 MB per TB of table,
/// see `pgferry_target::verify`) and nothing in the pre-pass, which reads runs of
/// [`MAX_RUN_RANGES`] ranges per statement whatever their size.
pub const RANGE_BLOCKS: u32 = 16;
/// Most ranges one `COPY` covers (16 MiB): short statements on the standby, which replay
/// conflicts could otherwise cancel.
pub const MAX_RUN_RANGES: u32 = 128;
/// Most separate runs one `COPY` covers (a `UNION ALL` of TID range scans): ranges scattered
/// over a table are read in a few statements instead of one round trip each.
pub const MAX_RUNS_PER_STATEMENT: usize = 32;
/// Most ranges one block-digest request may name in all (answer ≈ 100 bytes a range, well
/// under [`crate::control::MAX_CONTROL_MESSAGE`]).
pub const MAX_RANGES_PER_REQUEST: usize = 8192;

/// A relation's storage as WAL names it: tablespace, database, relfilenode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelKey {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

/// The default tablespace's OID (`pg_default`): WAL paths under `base/` are in it.
pub const DEFAULT_TABLESPACE: u32 = 1663;

/// Which range a block is in.
pub fn range_of(block: u32) -> u32 {
    block / RANGE_BLOCKS
}

/// How many ranges cover `blocks` blocks.
pub fn ranges_for(blocks: u64) -> u32 {
    blocks
        .div_ceil(u64::from(RANGE_BLOCKS))
        .min(u64::from(u32::MAX)) as u32
}

/// Consecutive ranges (sorted, deduplicated) as runs `(first, count)` of at most `max` ranges.
pub fn runs(ranges: &[u32], max: u32) -> Vec<(u32, u32)> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let max = max.max(1);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some((first, count)) if *first + *count == r && *count < max => *count += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}

/// The statements that digest `ranges`: each a list of runs `(first, count)`, at most
/// [`MAX_RUN_RANGES`] ranges and [`MAX_RUNS_PER_STATEMENT`] runs in all.
pub fn statements(ranges: &[u32]) -> Vec<Vec<(u32, u32)>> {
    let mut out: Vec<Vec<(u32, u32)>> = Vec::new();
    let mut size = 0;
    for run in runs(ranges, MAX_RUN_RANGES) {
        match out.last_mut() {
            Some(st) if size + run.1 <= MAX_RUN_RANGES && st.len() < MAX_RUNS_PER_STATEMENT => {
                st.push(run);
                size += run.1;
            }
            _ => {
                out.push(vec![run]);
                size = run.1;
            }
        }
    }
    out
}

/// The TID bounds of a run: `ctid >= '(lo,0)'` and, unless the run reaches the last possible
/// block, `ctid < '(hi,0)'`.
pub fn tid_bounds(first: u32, count: u32) -> (u64, Option<u64>) {
    let lo = u64::from(first) * u64::from(RANGE_BLOCKS);
    let hi = (u64::from(first) + u64::from(count)) * u64::from(RANGE_BLOCKS);
    (lo, (hi <= 0xFFFF_FFFE).then_some(hi))
}

/// One range's digest: rows and BLAKE3 (hex) of its `COPY (SELECT ctid, * …)` lines in scan
/// order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeDigest {
    pub range: u32,
    pub rows: u64,
    pub blake3: String,
}

/// Error in `COPY` output that cannot come from `SELECT ctid, …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("a COPY line does not start with a ctid: {0:?}")]
    NoCtid(String),
    #[error("row in block {block} is outside the ranges asked for")]
    OutOfRun { block: u32 },
}

/// Hashes the lines of `COPY (SELECT ctid, * FROM t WHERE <runs>) TO STDOUT` per range. Lines
/// may arrive split across chunks. Only the order of lines within a range matters: each run is
/// its own TID range scan, so the runs of a `UNION ALL` may come in any order.
pub struct RangeSplitter {
    /// The ranges asked for, sorted.
    ranges: Vec<u32>,
    partial: Vec<u8>,
    hashers: BTreeMap<u32, (u64, blake3::Hasher)>,
}

impl RangeSplitter {
    /// For the runs of ranges `(first, count)`.
    pub fn new(runs: &[(u32, u32)]) -> Self {
        let mut ranges: Vec<u32> = runs
            .iter()
            .flat_map(|&(first, count)| first..first.saturating_add(count))
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        Self {
            ranges,
            partial: Vec::new(),
            hashers: BTreeMap::new(),
        }
    }

    /// Feeds a chunk of `COPY` output.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), SplitError> {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = chunk.split_at(nl + 1);
            if self.partial.is_empty() {
                self.line(line)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole)?;
            }
            chunk = rest;
        }
        self.partial.extend_from_slice(chunk);
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), SplitError> {
        let block = ctid_block(line).ok_or_else(|| {
            SplitError::NoCtid(String::from_utf8_lossy(&line[..line.len().min(40)]).into())
        })?;
        let range = range_of(block);
        if self.ranges.binary_search(&range).is_err() {
            return Err(SplitError::OutOfRun { block });
        }
        let (rows, h) = self
            .hashers
            .entry(range)
            .or_insert_with(|| (0, blake3::Hasher::new()));
        *rows += 1;
        h.update(line);
        Ok(())
    }

    /// Every range of the run, those without rows included. Bytes after the last newline are
    /// an error (COPY ends every line).
    pub fn finish(mut self) -> Result<Vec<RangeDigest>, SplitError> {
        if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            return Err(SplitError::NoCtid(
                String::from_utf8_lossy(&p[..p.len().min(40)]).into(),
            ));
        }
        let ranges = std::mem::take(&mut self.ranges);
        Ok(ranges
            .into_iter()
            .map(|range| {
                let (rows, hash) = match self.hashers.remove(&range) {
                    Some((rows, h)) => (rows, h.finalize()),
                    None => (0, blake3::Hasher::new().finalize()),
                };
                RangeDigest {
                    range,
                    rows,
                    blake3: hash.to_hex().to_string(),
                }
            })
            .collect())
    }
}

/// The block number of a `COPY` text line that starts with a ctid, `(block,offset)\t…`.
fn ctid_block(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"(")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()
}

/// What one `pg_waldump` line says about storage.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WalRecord {
    pub lsn: Lsn,
    /// Main-fork blocks the record references (its `blkref`s).
    pub blocks: Vec<(RelKey, u32)>,
    /// `SMGR TRUNCATE`: the relation was cut to this many blocks.
    pub truncated: Option<(RelKey, u32)>,
}

/// Parses a `pg_waldump` record line (PostgreSQL 14-16 format); `None` for lines that are not
/// records.
///
/// ```text
/// rmgr: Heap len (rec/tot): 80/80, tx: 725, lsn: 0/024A5648, prev 0/024A5610, desc: UPDATE …, blkref #0: rel 1663/5/16384 blk 833, blkref #1: rel 1663/5/16384 fork fsm blk 0 FPW
/// rmgr: Storage len (rec/tot): 46/46, tx: 0, lsn: 0/03000028, prev …, desc: TRUNCATE base/5/16384 to 10 blocks flags 7
/// ```
pub fn parse_waldump_line(line: &str) -> Option<WalRecord> {
    if !line.starts_with("rmgr: ") {
        return None;
    }
    let at = line.find(", lsn: ")? + 7;
    let lsn_text = line[at..].split(',').next()?;
    let lsn: Lsn = lsn_text.trim().parse().ok()?;
    let mut rec = WalRecord {
        lsn,
        ..Default::default()
    };
    let mut rest = &line[at..];
    while let Some(i) = rest.find("blkref #") {
        rest = &rest[i + 8..];
        let Some(r) = rest.find(": rel ") else { break };
        rest = &rest[r + 6..];
        let mut words = rest.split([' ', ',']).filter(|w| !w.is_empty());
        let Some(key) = words.next().and_then(parse_rel) else {
            continue;
        };
        let (mut fork, mut block) = ("main", None);
        while let Some(w) = words.next() {
            match w {
                "fork" => fork = words.next().unwrap_or(""),
                "blk" => {
                    block = words.next().and_then(|b| b.parse::<u32>().ok());
                    break;
                }
                _ => break,
            }
        }
        if let (Some(b), "main") = (block, fork) {
            rec.blocks.push((key, b));
        }
    }
    if line.starts_with("rmgr: Storage") {
        if let Some(i) = line.find("desc: TRUNCATE ") {
            let mut words = line[i + 15..].split(' ');
            let path = words.next().and_then(parse_path);
            let _to = words.next();
            let blocks = words.next().and_then(|b| b.parse::<u32>().ok());
            if let (Some(key), Some(blocks)) = (path, blocks) {
                rec.truncated = Some((key, blocks));
            }
        }
    }
    Some(rec)
}

fn parse_rel(text: &str) -> Option<RelKey> {
    let mut it = text.split('/').map(|p| p.parse::<u32>().ok());
    let key = RelKey {
        spc: it.next()??,
        db: it.next()??,
        rel: it.next()??,
    };
    it.next().is_none().then_some(key)
}

/// `base/DB/REL` or `pg_tblspc/SPC/PG_…/DB/REL`.
fn parse_path(path: &str) -> Option<RelKey> {
    let parts: Vec<&str> = path.split('/').collect();
    let n = |s: &str| s.parse::<u32>().ok();
    match parts.as_slice() {
        ["base", db, rel] => Some(RelKey {
            spc: DEFAULT_TABLESPACE,
            db: n(db)?,
            rel: n(rel)?,
        }),
        ["pg_tblspc", spc, _, db, rel] => Some(RelKey {
            spc: n(spc)?,
            db: n(db)?,
            rel: n(rel)?,
        }),
        _ => None,
    }
}

/// The latest WAL record that touched each range of the relations being verified.
#[derive(Debug, Default, Clone)]
pub struct ChangeMap {
    /// Relation → range count when it was digested (truncation marks everything from the new
    /// end up to it).
    watched: HashMap<RelKey, u32>,
    touched: HashMap<RelKey, HashMap<u32, Lsn>>,
    /// Records read.
    pub records: u64,
    /// The start of the last record read (the next read starts there again: it may have been
    /// the last one `pg_waldump` could print before its end).
    pub last: Option<Lsn>,
}

impl ChangeMap {
    /// Watches `key` (with `ranges` ranges digested); records about other relations are
    /// ignored.
    pub fn watch(&mut self, key: RelKey, ranges: u32) {
        let r = self.watched.entry(key).or_insert(0);
        *r = (*r).max(ranges);
    }

    /// Notes one record.
    pub fn note(&mut self, rec: &WalRecord) {
        self.records += 1;
        self.last = Some(self.last.map_or(rec.lsn, |l| l.max(rec.lsn)));
        for (key, block) in &rec.blocks {
            if self.watched.contains_key(key) {
                self.touch(*key, range_of(*block), rec.lsn);
            }
        }
        if let Some((key, blocks)) = rec.truncated {
            if let Some(&ranges) = self.watched.get(&key) {
                let from = blocks / RANGE_BLOCKS;
                for r in from..ranges.max(from + 1) {
                    self.touch(key, r, rec.lsn);
                }
            }
        }
    }

    fn touch(&mut self, key: RelKey, range: u32, lsn: Lsn) {
        let e = self
            .touched
            .entry(key)
            .or_default()
            .entry(range)
            .or_insert(lsn);
        *e = (*e).max(lsn);
    }

    /// The ranges of `key` touched after the LSN each was digested at (`since[range]`; a
    /// range beyond `since` counts as never digested).
    pub fn stale(&self, key: &RelKey, since: &[Lsn]) -> Vec<u32> {
        let mut out: Vec<u32> = match self.touched.get(key) {
            Some(t) => t
                .iter()
                .filter(|(r, lsn)| since.get(**r as usize).is_none_or(|s| *lsn > s))
                .map(|(r, _)| *r)
                .collect(),
            None => Vec::new(),
        };
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UPDATE: &str = "rmgr: Heap        len (rec/tot):     80/    80, tx:        725, lsn: 0/024A5648, prev 0/024A5610, desc: UPDATE off 5 xmax 725 flags 0x00 ; new off 41 xmax 0, blkref #0: rel 1663/5/16384 blk 833, blkref #1: rel 1663/5/16384 blk 0";

    fn key(rel: u32) -> RelKey {
        RelKey {
            spc: DEFAULT_TABLESPACE,
            db: 5,
            rel,
        }
    }

    #[test]
    fn parses_block_references_of_every_fork_but_keeps_main() {
        let r = parse_waldump_line(UPDATE).unwrap();
        assert_eq!(r.lsn, "0/024A5648".parse().unwrap());
        assert_eq!(r.blocks, vec![(key(16384), 833), (key(16384), 0)]);
        let fpw = "rmgr: Heap2       len (rec/tot):     59/  8243, tx:        725, lsn: 0/024A5850, prev 0/024A57D8, desc: VISIBLE cutoff xid 3, blkref #0: rel 1663/5/16384 fork vm blk 0 FPW, blkref #1: rel 1663/5/16384 blk 7 FPW";
        let r = parse_waldump_line(fpw).unwrap();
        assert_eq!(r.blocks, vec![(key(16384), 7)]);
        let other = "rmgr: Heap2 len (rec/tot): 1/1, tx: 0, lsn: 0/1, prev 0/0, desc: X, blkref #0: rel 1700/16400/20000 blk 4294967294";
        assert_eq!(
            parse_waldump_line(other).unwrap().blocks,
            vec![(
                RelKey {
                    spc: 1700,
                    db: 16400,
                    rel: 20000
                },
                4294967294
            )]
        );
    }

    #[test]
    fn parses_truncation_and_ignores_non_records() {
        let t = "rmgr: Storage     len (rec/tot):     46/    46, tx:          0, lsn: 0/03000028, prev 0/02FFFFF0, desc: TRUNCATE base/5/16384 to 10 blocks flags 7";
        let r = parse_waldump_line(t).unwrap();
        assert_eq!(r.truncated, Some((key(16384), 10)));
        let s = "rmgr: Storage len (rec/tot): 46/46, tx: 0, lsn: 0/3, prev 0/2, desc: TRUNCATE pg_tblspc/1700/PG_15_202209061/5/16384 to 0 blocks flags 7";
        assert_eq!(
            parse_waldump_line(s).unwrap().truncated.unwrap().0.spc,
            1700
        );
        assert!(parse_waldump_line("pg_waldump: error: could not find file").is_none());
        assert!(parse_waldump_line("").is_none());
        let commit = "rmgr: Transaction len (rec/tot):     34/    34, tx:        725, lsn: 0/024AF0D0, prev 0/024AF098, desc: COMMIT 2026-12-02 10:30:00.1 UTC";
        let r = parse_waldump_line(commit).unwrap();
        assert!(r.blocks.is_empty() && r.truncated.is_none());
    }

    #[test]
    fn stale_ranges_are_those_touched_after_their_digest() {
        let mut m = ChangeMap::default();
        let r833 = range_of(833);
        let n = r833 + 10;
        m.watch(key(16384), n);
        m.note(&parse_waldump_line(UPDATE).unwrap()); // blocks 833 and 0 (range 0)
        let at = |s: &str| -> Lsn { s.parse().unwrap() };
        let since = |lsn: &str, len: u32| vec![at(lsn); len as usize];
        // Digested before the record: both stale; after it: neither.
        assert_eq!(m.stale(&key(16384), &since("0/1", n)), vec![0, r833]);
        assert!(m.stale(&key(16384), &since("0/024A5648", n)).is_empty());
        // A range never digested (beyond `since`) that was touched is stale.
        assert_eq!(m.stale(&key(16384), &since("0/FFFFFFFF", 3)), vec![r833]);
        // Other relations are not watched.
        let mut other = parse_waldump_line(UPDATE).unwrap();
        other.blocks = vec![(key(1), 0)];
        m.note(&other);
        assert!(m.stale(&key(1), &[]).is_empty());
        // Truncation to 200 blocks: every range from the one holding block 200 up to the
        // digested end is stale.
        m.note(&WalRecord {
            lsn: at("0/05000000"),
            blocks: vec![],
            truncated: Some((key(16384), 200)),
        });
        assert_eq!(
            m.stale(&key(16384), &since("0/04000000", n)),
            (range_of(200)..n).collect::<Vec<_>>()
        );
        assert_eq!(m.records, 3);
        assert_eq!(m.last, Some(at("0/05000000")));
    }

    #[test]
    fn splitter_hashes_lines_per_range_across_chunk_boundaries() {
        // Blocks 0 and 15 are range 0, 16 range 1, 37 range 2 (16 blocks a range).
        assert_eq!(RANGE_BLOCKS, 16);
        let copy = b"(0,1)\ta\n(15,3)\tb\n(16,1)\tc\n(37,2)\td\n";
        let whole = {
            let mut s = RangeSplitter::new(&[(0, 3)]);
            s.push(copy).unwrap();
            s.finish().unwrap()
        };
        assert_eq!(
            whole.iter().map(|d| (d.range, d.rows)).collect::<Vec<_>>(),
            vec![(0, 2), (1, 1), (2, 1)]
        );
        assert_eq!(
            whole[0].blake3,
            blake3::hash(b"(0,1)\ta\n(15,3)\tb\n").to_hex().to_string()
        );
        for cut in 0..copy.len() {
            let mut s = RangeSplitter::new(&[(0, 3)]);
            s.push(&copy[..cut]).unwrap();
            s.push(&copy[cut..]).unwrap();
            assert_eq!(s.finish().unwrap(), whole, "cut at {cut}");
        }
        // Runs of a UNION ALL may arrive in any order; each range's digest is the same.
        let mut s = RangeSplitter::new(&[(2, 1), (0, 2)]);
        s.push(b"(37,2)\td\n(0,1)\ta\n(15,3)\tb\n(16,1)\tc\n")
            .unwrap();
        assert_eq!(s.finish().unwrap(), whole);
        // Empty ranges are digested too; a row outside the runs is an error.
        let mut s = RangeSplitter::new(&[(5, 2)]);
        assert_eq!(
            s.push(b"(0,1)\tx\n").unwrap_err(),
            SplitError::OutOfRun { block: 0 }
        );
        let mut s = RangeSplitter::new(&[(0, 1), (2, 1)]);
        assert!(s.push(b"(16,1)\tin the gap\n").is_err());
        let empty = RangeSplitter::new(&[(5, 2)]).finish().unwrap();
        assert_eq!(empty.len(), 2);
        assert_eq!(
            empty[1].blake3,
            blake3::Hasher::new().finalize().to_hex().to_string()
        );
        let mut s = RangeSplitter::new(&[(0, 1)]);
        s.push(b"(0,1)\tunterminated").unwrap();
        assert!(s.finish().is_err());
        assert!(RangeSplitter::new(&[(0, 1)]).push(b"no ctid\n").is_err());
    }

    #[test]
    fn runs_and_bounds() {
        assert_eq!(
            runs(&[5, 1, 2, 3, 9, 2], 2),
            vec![(1, 2), (3, 1), (5, 1), (9, 1)]
        );
        assert_eq!(runs(&[], 16), vec![]);
        assert_eq!(tid_bounds(2, 3), (32, Some(80)));
        assert_eq!(tid_bounds(u32::MAX / RANGE_BLOCKS, 1).1, None);
        assert_eq!(ranges_for(0), 0);
        assert_eq!(ranges_for(1), 1);
        assert_eq!(ranges_for(16), 1);
        assert_eq!(ranges_for(17), 2);
    }

    #[test]
    fn scattered_ranges_share_statements_and_a_whole_table_reads_in_runs() {
        // 200 ranges scattered one apart: 7 statements of at most 32 runs, not 200.
        let scattered: Vec<u32> = (0..200).map(|i| i * 2).collect();
        let st = statements(&scattered);
        assert_eq!(st.len(), 200usize.div_ceil(MAX_RUNS_PER_STATEMENT));
        // A whole table: runs of MAX_RUN_RANGES, one a statement.
        let st = statements(&(0..1000).collect::<Vec<_>>());
        assert_eq!(st.len(), 8);
        assert_eq!(st[0], vec![(0, MAX_RUN_RANGES)]);
        assert!(statements(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_ranges(mut rs in proptest::collection::vec(0u32..200, 0..60), max in 1u32..20) {
            let out = runs(&rs, max);
            let mut covered: Vec<u32> = out.iter().flat_map(|&(f, c)| f..f + c).collect();
            rs.sort_unstable();
            rs.dedup();
            prop_assert!(out.iter().all(|&(_, c)| c >= 1 && c <= max));
            covered.sort_unstable();
            prop_assert_eq!(covered, rs);
        }

        #[test]
        fn statements_cover_exactly_the_ranges_within_their_bounds(
            rs in proptest::collection::vec(0u32..2000, 0..400)
        ) {
            let st = statements(&rs);
            let mut covered: Vec<u32> = st.iter().flatten().flat_map(|&(f, c)| f..f + c).collect();
            for s in &st {
                prop_assert!(!s.is_empty() && s.len() <= MAX_RUNS_PER_STATEMENT);
                prop_assert!(s.iter().map(|r| r.1).sum::<u32>() <= MAX_RUN_RANGES);
            }
            let mut want = rs.clone();
            want.sort_unstable();
            want.dedup();
            covered.sort_unstable();
            prop_assert_eq!(covered, want);
        }
    }
}
