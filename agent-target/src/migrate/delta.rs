//! What a copy resumed in a new backup session keeps of the files already here (delta).
//!
//! When the source's backup session was lost (its agent restarted), a new one starts and:
//! - a complete file is kept if its size and SHA-256 equal the source's now;
//! - a partly fetched one is kept if its bytes equal the source's first as many bytes now, and
//!   fetched on from its end;
//! - any other file of at least two ranges ([`file_range_size`], 1 MiB up to 8 GiB) is
//!   compared range by range (BLAKE3 on both sides, [`Request::RangeDigests`]): the ranges
//!   that differ are fetched again in place, then the file from its end if the source's is
//!   longer; a longer file here is cut to the source's size first. A relation segment that an
//!   append-mostly table grew into, or an index whose right edge moved, costs its changed
//!   megabytes, not its gigabyte;
//! - every other file is removed and fetched again.
//!
//! Why this is consistent: the source digests after the new session's start checkpoint, so a
//! kept file, prefix or range holds what a copy made now would read, and replay from the new
//! start LSN covers every change after (README, "Copy methods"). A range fetched reads the
//! source during the new session, like any file of it.
//!
//! A file being patched is not a verified prefix (its old ranges wait for their turn), so the
//! journal names it (`patching`) before its first byte is rewritten; a copy resumed with such a
//! file not complete compares it range by range again.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use pgferry_common::backup::ManifestFile;
use pgferry_common::control::{file_range_size, BackupPlan, Request, Response, MIN_FILE_RANGE};

use super::copy::sha256_file;
use super::Executor;

/// A file here to fetch again in parts: cut to `len` (the source's size when digested) if
/// longer, then `ranges` (start, end) fetched in place; then from its end, as any file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Patch {
    pub len: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl Patch {
    /// Bytes the patch fetches (at most: a file the source cut since fetches less).
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }
}

/// The ranges of a file here (`ours_len` bytes, `ours`: BLAKE3 of each `range` bytes) to fetch
/// again so that it equals the source's (`theirs_len`, `theirs`), adjacent ones merged: every
/// range that starts within the file here and differs in digest or length. What lies past the
/// file here is fetched from its end afterwards.
pub(super) fn ranges_to_fetch(
    ours_len: u64,
    ours: &[blake3::Hash],
    theirs_len: u64,
    theirs: &[blake3::Hash],
    range: u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, sum) in theirs.iter().enumerate() {
        let start = i as u64 * range;
        if start >= ours_len {
            break;
        }
        let (our_end, their_end) = (
            (start + range).min(ours_len),
            (start + range).min(theirs_len),
        );
        if our_end == their_end && ours.get(i) == Some(sum) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = their_end,
            _ => out.push((start, their_end)),
        }
    }
    out
}

/// "; changed: base/5/16399 (1073.7 MB), …": the largest of the complete files that
/// changed since they were fetched (what a lost session costs, and where).
pub(super) fn changed_line(changed: &[(String, u64)]) -> String {
    if changed.is_empty() {
        return String::new();
    }
    let mut by_size = changed.to_vec();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let shown: Vec<String> = by_size
        .iter()
        .take(5)
        .map(|(p, n)| format!("{p} ({:.1} MB)", *n as f64 / 1e6))
        .collect();
    let more = by_size.len().saturating_sub(shown.len());
    format!(
        "; changed since fetched: {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// ", 3 changed file(s) compared range by range: 4.2 of their 842.8 MB fetched again"; empty
/// without patches.
pub(super) fn patch_line(patches: &HashMap<String, Patch>) -> String {
    if patches.is_empty() {
        return String::new();
    }
    let bytes: u64 = patches.values().map(Patch::bytes).sum();
    let len: u64 = patches.values().map(|p| p.len).sum();
    format!(
        ", {} changed file(s) compared range by range: {:.1} of their {:.1} MB fetched again",
        patches.len(),
        bytes as f64 / 1e6,
        len as f64 / 1e6
    )
}

impl Executor<'_> {
    /// Of the files complete in an earlier session, those still in the plan whose size and
    /// SHA-256 equal the source's now.
    pub(super) async fn unchanged(
        &self,
        plan: &BackupPlan,
        previous: &HashMap<String, ManifestFile>,
    ) -> Result<HashMap<String, ManifestFile>> {
        let planned: HashSet<&str> = plan
            .entries
            .iter()
            .filter(|e| !e.dir)
            .map(|e| e.path.as_str())
            .collect();
        let candidates: Vec<&ManifestFile> = previous
            .values()
            .filter(|m| planned.contains(m.path.as_str()))
            .collect();
        let paths = candidates.iter().map(|m| m.path.clone()).collect();
        let digests = self.source_digests(plan.id, paths, Vec::new()).await?;
        Ok(candidates
            .into_iter()
            .zip(digests)
            .filter(|(m, d)| {
                d.path == m.path && d.size == m.size && d.sha256 == hex::encode(m.sha256)
            })
            .map(|(m, _)| (m.path.clone(), (*m).clone()))
            .collect())
    }

    /// The source's [`FileDigest`](pgferry_common::control::FileDigest) of each of `paths` of
    /// backup `id` (of its first `lengths[i]` bytes when `lengths` is given), in order, asked
    /// in requests of at most [`MAX_DIGEST_PATHS`](pgferry_common::control::MAX_DIGEST_PATHS).
    pub(super) async fn source_digests(
        &self,
        id: u64,
        paths: Vec<String>,
        lengths: Vec<u64>,
    ) -> Result<Vec<pgferry_common::control::FileDigest>> {
        let per = pgferry_common::control::MAX_DIGEST_PATHS;
        let mut out = Vec::with_capacity(paths.len());
        for (i, batch) in paths.chunks(per).enumerate() {
            let lengths = if lengths.is_empty() {
                Vec::new()
            } else {
                lengths[i * per..i * per + batch.len()].to_vec()
            };
            match self
                .ask_through_outage(
                    Request::FileDigests {
                        id,
                        paths: batch.to_vec(),
                        lengths,
                    },
                    Duration::from_secs(600),
                )
                .await?
            {
                Response::FileDigests { digests } if digests.len() == batch.len() => {
                    out.extend(digests)
                }
                other => bail!("unexpected answer {other:?}"),
            }
        }
        Ok(out)
    }

    /// Of the files partly fetched in an earlier session (in the plan, not complete, not
    /// empty), those whose bytes here equal the source's first as many bytes now (SHA-256 on
    /// both sides), and their bytes; and the others. The kept ones are fetched on from their
    /// end: the same argument as for a kept whole file holds for a kept prefix (module doc).
    pub(super) async fn unchanged_prefixes(
        &self,
        plan: &BackupPlan,
        data_dir: &Path,
        done: &HashMap<String, ManifestFile>,
    ) -> Result<(HashSet<String>, u64, Vec<String>)> {
        let partial: Vec<(String, u64)> = plan
            .entries
            .iter()
            .filter(|e| !e.dir && !done.contains_key(&e.path))
            .filter_map(|e| {
                let len = std::fs::metadata(data_dir.join(&e.path)).ok()?.len();
                (len > 0).then(|| (e.path.clone(), len))
            })
            .collect();
        let theirs = self
            .source_digests(
                plan.id,
                partial.iter().map(|(p, _)| p.clone()).collect(),
                partial.iter().map(|(_, n)| *n).collect(),
            )
            .await?;
        let ours = {
            let (dir, partial) = (data_dir.to_path_buf(), partial.clone());
            tokio::task::spawn_blocking(move || {
                partial
                    .iter()
                    .map(|(p, _)| sha256_file(&dir.join(p)).ok())
                    .collect::<Vec<_>>()
            })
            .await?
        };
        let (mut kept, mut bytes, mut changed) = (HashSet::new(), 0, Vec::new());
        for (((path, len), theirs), ours) in partial.into_iter().zip(theirs).zip(ours) {
            let same = ours.is_some_and(|(n, sum)| {
                n == len && theirs.size == n && theirs.sha256 == hex::encode(sum)
            });
            if same && theirs.path == path {
                kept.insert(path);
                bytes += len;
            } else {
                changed.push(path);
            }
        }
        Ok((kept, bytes, changed))
    }

    /// For each of `paths` (files here that differ from the source's now, or may), the
    /// [`Patch`] that makes it equal, when that is worth it (the file here has two ranges or
    /// more, the source's still exists); the others are fetched whole.
    pub(super) async fn patches(
        &self,
        id: u64,
        data_dir: &Path,
        paths: Vec<String>,
    ) -> Result<HashMap<String, Patch>> {
        let mut out = HashMap::new();
        for path in paths {
            let full = data_dir.join(&path);
            let ours_len = std::fs::metadata(&full).map_or(0, |m| m.len());
            if ours_len < 2 * MIN_FILE_RANGE {
                continue;
            }
            // Ours with the range size of our length (the source's is the same below 8 GiB),
            // while the source digests its own.
            let guess = file_range_size(ours_len);
            let ours = tokio::task::spawn_blocking({
                let full = full.clone();
                move || digest_file(&full, guess)
            });
            let answer = self
                .ask_through_outage(
                    Request::RangeDigests {
                        id,
                        path: path.clone(),
                    },
                    Duration::from_secs(600),
                )
                .await?;
            let (theirs_len, range, theirs) = parse_ranges(&path, answer)?;
            let mut ours = ours.await.context("digest task")??;
            // Gone on the source: fetched whole (empty), nothing to compare.
            if theirs_len == 0 {
                continue;
            }
            if range != guess {
                let full = full.clone();
                ours = tokio::task::spawn_blocking(move || digest_file(&full, range))
                    .await
                    .context("digest task")??;
            }
            let ranges = ranges_to_fetch(ours.0, &ours.1, theirs_len, &theirs, range);
            out.insert(
                path,
                Patch {
                    len: theirs_len,
                    ranges,
                },
            );
        }
        Ok(out)
    }
}

/// Length and BLAKE3 of each `range` bytes of a file here.
fn digest_file(p: &Path, range: u64) -> Result<(u64, Vec<blake3::Hash>)> {
    let f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
    pgferry_common::runtime::digest::reader_range_digests(f, range)
        .with_context(|| p.display().to_string())
}

/// A [`Response::RangeDigests`] for `path`, checked: the range size the file's size implies,
/// one digest per range. (size, range, digests).
fn parse_ranges(path: &str, answer: Response) -> Result<(u64, u64, Vec<blake3::Hash>)> {
    let Response::RangeDigests {
        size,
        range,
        blake3,
    } = answer
    else {
        bail!("unexpected answer to the range digests of {path}: {answer:?}");
    };
    if size == 0 && blake3.is_empty() {
        return Ok((0, MIN_FILE_RANGE, Vec::new()));
    }
    if range != file_range_size(size) || blake3.len() as u64 != size.div_ceil(range) {
        bail!(
            "the source's range digests of {path} are inconsistent: {} range(s) of {range} bytes for {size} bytes",
            blake3.len()
        );
    }
    let sums = blake3
        .iter()
        .map(blake3::Hash::from_hex)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the source's range digests of {path}"))?;
    Ok((size, range, sums))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(data: &[u8], range: u64) -> Vec<blake3::Hash> {
        data.chunks(range as usize).map(blake3::hash).collect()
    }

    /// Applies the ranges of `theirs` onto `ours` as the copy does (cut, ranges in place,
    /// then from the end).
    fn apply(ours: &[u8], theirs: &[u8], range: u64) -> (Vec<u8>, u64) {
        let mut f = ours.to_vec();
        f.truncate(theirs.len());
        let ranges = ranges_to_fetch(
            ours.len() as u64,
            &sums(ours, range),
            theirs.len() as u64,
            &sums(theirs, range),
            range,
        );
        let mut fetched = 0;
        for (a, b) in ranges {
            let (a, b) = (a as usize, b as usize);
            if f.len() < b {
                f.resize(b, 0);
            }
            f[a..b].copy_from_slice(&theirs[a..b]);
            fetched += (b - a) as u64;
        }
        fetched += (theirs.len() - f.len().min(theirs.len())) as u64;
        f.extend_from_slice(&theirs[f.len().min(theirs.len())..]);
        (f, fetched)
    }

    #[test]
    fn only_the_ranges_that_differ_are_fetched_and_the_result_is_the_source() {
        let r = 16u64;
        let base: Vec<u8> = (0..200u32).map(|i| (i * 31 % 253) as u8).collect();
        // One byte changed in range 3: that range only.
        let mut one = base.clone();
        one[3 * 16 + 5] ^= 1;
        let (f, n) = apply(&base, &one, r);
        assert_eq!(f, one);
        assert_eq!(n, 16);
        assert_eq!(
            ranges_to_fetch(200, &sums(&base, r), 200, &sums(&one, r), r),
            vec![(48, 64)]
        );
        // Two adjacent ranges changed: one stream for both.
        let mut two = base.clone();
        two[40] ^= 1;
        two[50] ^= 1;
        assert_eq!(
            ranges_to_fetch(200, &sums(&base, r), 200, &sums(&two, r), r),
            vec![(32, 64)]
        );
        // Unchanged: nothing.
        assert_eq!(apply(&base, &base, r), (base.clone(), 0));
        // The source's grew: the short last range here and the rest.
        let mut grown = base.clone();
        grown.extend((0..77).map(|i| i as u8));
        let (f, n) = apply(&base, &grown, r);
        assert_eq!(f, grown);
        assert_eq!(
            n,
            77 + 8,
            "the last partial range (192..200) and the new bytes"
        );
        // The source's was cut: the file here is cut, nothing fetched but a partial range.
        let cut = base[..100].to_vec();
        let (f, n) = apply(&base, &cut, r);
        assert_eq!(f, cut);
        assert_eq!(n, 4, "96..100 was a whole range here, a short one there");
        // A partly fetched file (a prefix here): the partial range and the rest.
        let (f, n) = apply(&base[..70], &base, r);
        assert_eq!(f, base);
        assert_eq!(
            n,
            16 + 120,
            "the short range here (64..80 there), then 80..200"
        );
        // Everything different: the whole file.
        let other: Vec<u8> = base.iter().map(|b| b ^ 0xff).collect();
        assert_eq!(apply(&base, &other, r), (other.clone(), 200));
    }

    #[test]
    fn any_file_here_becomes_the_source_s() {
        use proptest::prelude::*;
        proptest!(|(ours in proptest::collection::vec(0u8..3, 0..300),
                    theirs in proptest::collection::vec(0u8..3, 0..300),
                    range in 1u64..40)| {
            let (f, n) = apply(&ours, &theirs, range);
            prop_assert_eq!(&f, &theirs);
            prop_assert!(n <= theirs.len() as u64);
        });
    }

    #[test]
    fn a_range_answer_that_does_not_add_up_is_refused() {
        let h = "ab".repeat(32);
        let ok = Response::RangeDigests {
            size: 3 * MIN_FILE_RANGE - 1,
            range: MIN_FILE_RANGE,
            blake3: vec![h.clone(); 3],
        };
        assert_eq!(parse_ranges("f", ok).unwrap().1, MIN_FILE_RANGE);
        for bad in [
            Response::RangeDigests {
                size: 3 * MIN_FILE_RANGE,
                range: MIN_FILE_RANGE,
                blake3: vec![h.clone(); 2],
            },
            Response::RangeDigests {
                size: 3 * MIN_FILE_RANGE,
                range: 1,
                blake3: vec![h.clone(); 3 * MIN_FILE_RANGE as usize],
            },
            Response::RangeDigests {
                size: MIN_FILE_RANGE,
                range: MIN_FILE_RANGE,
                blake3: vec!["zz".into()],
            },
            Response::Error {
                message: "no".into(),
            },
        ] {
            assert!(parse_ranges("f", bad).is_err());
        }
        assert_eq!(
            parse_ranges(
                "f",
                Response::RangeDigests {
                    size: 0,
                    range: 0,
                    blake3: Vec::new()
                }
            )
            .unwrap()
            .0,
            0
        );
    }
}
