//! The cutover, one function per step. Each step persists the state it reaches before the
//! next one's side effects, so a cutover interrupted anywhere resumes where it stopped.
//!
//! ```text
//!   CatchingUp/Ready ─ fence_source: standby streaming? lag ≤ --max-lag; plan; pre-pass
//!                      (block ranges, writes go on); fence the source ── the downtime starts
//!   Fenced ────────── drain: the standby replays the fence LSN, replay paused there
//!   Drained ───────── verify: block ranges changed since the pre-pass (or whole tables)
//!   Verified ──────── point_of_no_return: recorded before pg_promote
//!   ═══════════════ from here on, every step runs to completion; nothing rolls back ═══════════
//!   Promoted ──────── promote: pg_promote, wait until writable ── the downtime ends;
//!                     after_promotion: --on-promoted hook, drop the slot, --fence stop
//!   Completed ─────── finish: the report, audited
//! ```
//!
//! Before the point of no return, any failure rolls back ([`Executor::cutover`]): the source
//! is unfenced and writable again.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio_postgres::Client;

use pgferry_common::admin::{CutoverReport, Verification};
use pgferry_common::audit::event::{SourceFenced, TablesVerified};
use pgferry_common::control::{FenceMode, Request, Response, SourceStatus};
use pgferry_common::migration::{Event, Fence, State};

use super::{
    connect_new_cluster, fence_name, new_cluster_connector, now_ms, skipped_note, standby_status,
    supports_tid_range_scans, timeline, CutoverOptions, Executor, TablePlan, CAUGHT_UP_BYTES,
    DIGEST_TIMEOUT,
};
use crate::config::TargetSettings;
use crate::pooler::{PgBouncer, PoolerReport};
use crate::verify::Prepass;

impl Executor<'_> {
    /// The cutover: fence, drain, verify, promote, writable; a report of the phases.
    pub async fn cutover(&self, opts: &CutoverOptions) -> Result<CutoverReport> {
        let mut state = self.store.load()?;
        if !matches!(
            state,
            State::CatchingUp { .. }
                | State::Ready { .. }
                | State::Fenced { .. }
                | State::Drained { .. }
                | State::Verified { .. }
                | State::Promoted { .. }
        ) {
            bail!(
                "cutover needs a standby that is catching up (run `pgferry-target clone` first); the migration is in phase {}",
                state.phase()
            );
        }
        let mut run = Cutover {
            exec: self,
            opts,
            standby: connect_new_cluster(self.settings).await?,
            report: CutoverReport::default(),
            prepass: None,
            paused_at: None,
        };
        match run.steps(&mut state).await {
            Ok(()) => Ok(run.report),
            Err(e)
                if state.can_roll_back()
                    && !matches!(state, State::CatchingUp { .. } | State::Ready { .. }) =>
            {
                self.fail_and_roll_back(state, &e, "cutover failed before promotion")
                    .await?;
                Err(e.context("cutover rolled back; the source is writable again"))
            }
            Err(e) => Err(e),
        }
    }
}

/// One cutover run: the executor, its options, a connection to the new cluster, the report
/// being filled in.
struct Cutover<'x, 'a> {
    exec: &'x Executor<'a>,
    opts: &'x CutoverOptions,
    standby: Client,
    report: CutoverReport,
    /// The pre-pass's digests, in memory: a cutover resumed after a restart of this agent
    /// digests whole tables at the fence instead.
    prepass: Option<Prepass>,
    /// When PgBouncer's databases were paused in this run (the report's `held_ms`).
    paused_at: Option<Instant>,
}

/// Where a step leaves the cutover.
enum Step {
    /// The state reached (already persisted).
    Next(State),
    /// The run ends here (a dry run).
    Stop,
}

impl Cutover<'_, '_> {
    async fn steps(&mut self, state: &mut State) -> Result<()> {
        let t_start = Instant::now();
        loop {
            let current = state.clone();
            let step = match &current {
                State::CatchingUp { slot } | State::Ready { slot } => {
                    let slot = slot.clone();
                    self.fence_source(current, &slot).await?
                }
                State::Fenced { fence, .. } => {
                    let fence = fence.clone();
                    Step::Next(self.drain(current, &fence).await?)
                }
                State::Drained { .. } => Step::Next(self.verify(current).await?),
                State::Verified { .. } => Step::Next(self.point_of_no_return(current)?),
                State::Promoted { fence, .. } => {
                    let fence = fence.clone();
                    Step::Next(self.promote(current, &fence).await?)
                }
                _ => {
                    self.finish(state, t_start);
                    return Ok(());
                }
            };
            match step {
                Step::Next(next) => *state = next,
                Step::Stop => return Ok(()),
            }
        }
    }

    /// Catching up → fenced: checks the standby and the lag, plans the verification, runs the
    /// pre-pass while writes go on, then fences the source. The write downtime starts here.
    async fn fence_source(&mut self, current: State, slot: &str) -> Result<Step> {
        let src = self.wait_for_streaming(slot).await?;
        let replay = standby_status(&self.standby)
            .await?
            .replay_lsn
            .unwrap_or_default();
        let lag = src.current_lsn.0.saturating_sub(replay.0);
        self.report.lag_bytes_at_start = Some(lag);
        if lag > self.opts.max_lag {
            bail!(
                "the standby is {lag} bytes behind (more than --max-lag {}); wait for it to catch up (pgferry-target status --watch)",
                self.opts.max_lag
            );
        }
        let pooled = self.check_pooler().await?;
        let (block_ranges, plan) = self.plan().await?;
        self.what_stays_behind(slot).await;
        if self.opts.dry_run {
            let how = self.dry_run_plan(block_ranges, &plan);
            (self.exec.progress)(format!(
                "dry run: lag {lag} bytes ≤ {}; would {how}",
                self.opts.max_lag
            ));
            self.report.dry_run = Some(true);
            return Ok(Step::Stop);
        }
        if block_ranges {
            self.run_prepass(&plan).await?;
        }
        let ready = if matches!(current, State::CatchingUp { .. }) {
            self.exec.advance(current, Event::CaughtUp)?
        } else {
            current
        };
        if let Some((pb, dbs)) = &pooled {
            self.pause_pooler(pb, dbs).await?;
        }
        (self.exec.progress)(format!(
            "lag {lag} bytes; fencing the source ({})",
            fence_name(self.opts.fence)
        ));
        let at_ms = now_ms();
        let t_fence = Instant::now();
        let (lsn, fenced) = match self
            .exec
            .ask(Request::Fence {
                mode: self.opts.fence,
            })
            .await
        {
            Ok(Response::Fenced { lsn, report }) => (lsn, report),
            answer => {
                // The fence may have applied and its answer been lost: undo it, then let the
                // pooler's clients go on against the source.
                let _ = self.exec.ask(Request::Unfence).await;
                self.exec.resume_pooler().await;
                match answer {
                    Err(e) => return Err(e.context("fencing the source (undone)")),
                    Ok(other) => bail!("unexpected answer {other:?}"),
                }
            }
        };
        let fence = Fence {
            lsn,
            at_ms,
            stop_source: self.opts.fence == FenceMode::Stop,
        };
        match &fenced {
            Some(f) => (self.exec.progress)(format!(
                "source fenced at LSN {lsn}: {} admits only pgferry (original kept beside it); {} session(s) and {} connection(s) still authenticating ended",
                f.hba_file, f.sessions_ended, f.connecting_ended
            )),
            None => (self.exec.progress)(format!("source fenced at LSN {lsn}")),
        }
        self.exec.record(&SourceFenced {
            lsn: lsn.to_string(),
            fence: fenced.clone(),
        });
        self.report.fence = fenced;
        self.report.phases.fence_ms = Some(t_fence.elapsed().as_millis() as u64);
        Ok(Step::Next(
            self.exec.advance(ready, Event::Fenced { fence })?,
        ))
    }

    /// `[target.pgbouncer]`: the console answers and knows the file's databases, before
    /// anything changes (refused otherwise, with the reason).
    async fn check_pooler(&mut self) -> Result<Option<(PgBouncer, Vec<String>)>> {
        let Some(pb) = self.exec.settings.pgbouncer.clone() else {
            return Ok(None);
        };
        let dbs = pb.check().await.context(
            "PgBouncer ([target.pgbouncer]) is not ready; nothing was fenced, the source is unchanged",
        )?;
        (self.exec.progress)(format!(
            "PgBouncer answers; {} database(s) to pause and switch: {}",
            dbs.len(),
            dbs.join(", ")
        ));
        self.report.pooler = Some(PoolerReport {
            databases: dbs.clone(),
            ..PoolerReport::default()
        });
        Ok(Some((pb, dbs)))
    }

    /// PAUSE before the fence: PgBouncer's clients wait instead of meeting the fence.
    async fn pause_pooler(&mut self, pb: &PgBouncer, dbs: &[String]) -> Result<()> {
        (self.exec.progress)(format!(
            "pausing PgBouncer ({}): transactions in flight end, new ones wait",
            dbs.join(", ")
        ));
        let took = pb.pause(dbs).await?;
        self.paused_at = Some(Instant::now());
        (self.exec.audit)(
            "pooler_paused",
            json!({"databases": dbs, "pause_ms": took.as_millis() as u64}),
        );
        if let Some(p) = &mut self.report.pooler {
            p.pause_ms = Some(took.as_millis() as u64);
        }
        Ok(())
    }

    /// What the cutover leaves pointing at the old cluster (the report lists it), and the
    /// settings the new cluster would need a restart for.
    async fn what_stays_behind(&mut self, slot: &str) {
        match self
            .exec
            .ask(Request::Dependents {
                slot: slot.to_string(),
            })
            .await
        {
            Ok(Response::Dependents { dependents }) => {
                for line in dependents.lines() {
                    (self.exec.progress)(format!("still on the old cluster: {line}"));
                }
                self.report.still_on_source = Some(dependents);
            }
            Ok(other) => (self.exec.progress)(format!("unexpected answer {other:?}")),
            Err(e) => {
                (self.exec.progress)(format!("could not list what else uses the source: {e:#}"))
            }
        }
        match restart_needed(&self.standby, self.exec.settings).await {
            Ok(v) => {
                for s in &v {
                    (self.exec.progress)(format!(
                        "after promotion, a restart of the new cluster applies {s}"
                    ));
                }
                self.report.restart_needed = Some(v);
            }
            Err(e) => {
                (self.exec.progress)(format!("could not read the new cluster's settings: {e:#}"))
            }
        }
    }

    /// The standby must be connected and streaming: a fence with nobody receiving would only
    /// lengthen the downtime (e.g. right after the target agent restarted and the walreceiver
    /// has not reconnected yet).
    async fn wait_for_streaming(&self, slot: &str) -> Result<SourceStatus> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut said = false;
        loop {
            let src = match self
                .exec
                .ask(Request::Status {
                    slot: Some(slot.to_string()),
                })
                .await?
            {
                Response::Status { status } => status,
                other => bail!("unexpected answer {other:?}"),
            };
            if src.slot.as_ref().is_some_and(|s| s.active) {
                return Ok(src);
            }
            if Instant::now() > deadline {
                bail!("the standby is not streaming (slot {slot} inactive for 60 s): check the new cluster's log");
            }
            if !said {
                (self.exec.progress)("waiting for the standby to (re)connect to the source".into());
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Which method verifies which tables: block ranges (every table; PostgreSQL 14+) unless
    /// `--verify-at-fence`, then whole tables within the budget.
    async fn plan(&mut self) -> Result<(bool, TablePlan)> {
        let block_ranges =
            !self.opts.verify_at_fence && supports_tid_range_scans(&self.standby).await?;
        let plan = if block_ranges {
            let all = CutoverOptions {
                all_tables: true,
                ..self.opts.clone()
            };
            self.exec.tables(&self.standby, &all).await?
        } else {
            self.exec.tables(&self.standby, self.opts).await?
        };
        self.report.tables = Some(plan.verify.clone());
        self.report.tables_skipped = Some(plan.skipped.clone());
        if !block_ranges && plan.verify.is_empty() && !plan.skipped.is_empty() {
            bail!(
                "no table fits the verification budget of {} s ({} table(s) over it): pass --all-tables, --tables LIST or a larger --verify-budget-secs",
                self.opts.verify_budget_secs,
                plan.skipped.len()
            );
        }
        Ok((block_ranges, plan))
    }

    /// What a dry run would do.
    fn dry_run_plan(&self, block_ranges: bool, plan: &TablePlan) -> String {
        if block_ranges {
            format!(
                "digest {} table(s) ({} MB) per block range before the fence while writes go on, fence the source ({}), wait for the standby, digest again only the ranges written since{}, promote",
                plan.verify.len(),
                plan.bytes / (1024 * 1024),
                fence_name(self.opts.fence),
                skipped_note(plan),
            )
        } else {
            format!(
                "fence the source ({}), wait for the standby, verify {} table(s) ({} MB, about {:.1} s){}, promote",
                fence_name(self.opts.fence),
                plan.verify.len(),
                plan.bytes / (1024 * 1024),
                plan.estimated_secs,
                skipped_note(plan),
            )
        }
    }

    /// The block-range pre-pass, before the fence while writes go on.
    async fn run_prepass(&mut self, plan: &TablePlan) -> Result<()> {
        let t_pre = Instant::now();
        let pre = self
            .exec
            .prepass(&self.standby, &plan.verify, self.opts.prepass_wait_secs)
            .await
            .context("verification pre-pass, before the fence (nothing was fenced; the source is unchanged and the cutover can run again)")?;
        (self.exec.progress)(format!(
            "pre-pass done in {:.1} s: {} table(s), {} MB at {:.0} MB/s on both sides, {} round(s), {} WAL record(s) read",
            t_pre.elapsed().as_secs_f64(),
            pre.report.tables,
            pre.report.bytes / (1024 * 1024),
            pre.report.bytes_per_sec as f64 / 1048576.0,
            pre.report.rounds,
            pre.report.wal_records
        ));
        self.exec.record(&pre.report);
        self.report.prepass = Some(pre.report.clone());
        self.report.phases.prepass_ms = Some(t_pre.elapsed().as_millis() as u64);
        self.prepass = Some(pre);
        // The pre-pass loaded both clusters: let the standby catch up again so that the drain
        // inside the window stays short.
        self.exec
            .wait_for_lag(&self.standby, CAUGHT_UP_BYTES, Duration::from_secs(60))
            .await
    }

    /// Fenced → drained: the standby replays the fence LSN; replay is then held there while
    /// both sides are digested (nothing after it can change the standby's tables or cancel the
    /// digests with a recovery conflict). Resumed before promotion.
    async fn drain(&mut self, current: State, fence: &Fence) -> Result<State> {
        let t = Instant::now();
        self.report.fence_lsn = Some(fence.lsn.to_string());
        (self.exec.progress)(format!("waiting for the standby to replay {}", fence.lsn));
        let wait = Duration::from_secs(self.opts.replay_timeout_secs);
        let deadline = Instant::now() + wait;
        let replayed = loop {
            let st = standby_status(&self.standby)
                .await
                .context("reading the standby's replay position")?;
            if let Some(r) = st.replay_lsn.filter(|r| *r >= fence.lsn) {
                break r;
            }
            if Instant::now() > deadline {
                bail!(
                    "the standby did not replay the fence LSN {} within {} s (--replay-timeout-secs); check the new cluster's log and pg_stat_replication",
                    fence.lsn,
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.standby
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .context("pausing replay on the standby")?;
        self.report.phases.drain_ms = Some(t.elapsed().as_millis() as u64);
        self.exec
            .advance(current, Event::Replayed { lsn: replayed })
    }

    /// Drained → verified: the block ranges changed since the pre-pass, or (without one)
    /// whole tables. A difference fails the cutover, which rolls back.
    async fn verify(&mut self, current: State) -> Result<State> {
        let t = Instant::now();
        let tables = match self.prepass.take() {
            Some(mut pre) => {
                let r = self.verify_block_ranges(&mut pre).await;
                self.prepass = Some(pre);
                r?
            }
            None => self.verify_whole_tables(t).await?,
        };
        self.report.phases.verify_ms = Some(t.elapsed().as_millis() as u64);
        self.exec.advance(current, Event::TablesVerified { tables })
    }

    /// The pre-pass's remainder at the fence; returns how many tables were verified.
    async fn verify_block_ranges(&mut self, pre: &mut Prepass) -> Result<u32> {
        let all = CutoverOptions {
            all_tables: true,
            ..self.opts.clone()
        };
        let plan = self.exec.tables(&self.standby, &all).await?;
        let budget = (!self.opts.all_tables && self.opts.tables.is_none())
            .then_some(self.opts.verify_budget_secs);
        let checked = self
            .exec
            .verify_at_fence(&self.standby, pre, &plan.verify, budget)
            .await?;
        let (ours, at_fence) = (checked.digests, checked.report);
        let mut skipped = plan.skipped.clone();
        skipped.extend(checked.not_verified.iter().cloned());
        // One record, whatever the outcome.
        self.exec.record(&TablesVerified {
            tables: ours.clone(),
            mismatched: checked.mismatched.clone(),
            not_verified: skipped.clone(),
            method: Some("block_ranges".into()),
            at_fence: Some(at_fence.clone()),
        });
        if !checked.mismatched.is_empty() {
            bail!(
                "table contents differ after the fence: {}",
                checked.mismatched.join(", ")
            );
        }
        if !skipped.is_empty() {
            (self.exec.progress)(format!("NOT VERIFIED: {}", skipped.join(", ")));
        }
        self.report.verified_rows = Some(ours.iter().map(|d| d.rows).sum());
        self.report.tables = Some(ours.iter().map(|d| d.table.clone()).collect());
        self.report.tables_skipped = Some(skipped);
        self.report.verification = Some(Verification {
            method: "block_ranges".into(),
            at_fence: Some(at_fence),
        });
        let n = ours.len() as u32;
        self.report.digests = Some(ours);
        Ok(n)
    }

    /// `--verify-at-fence`: whole tables on both sides while fenced, within the budget.
    async fn verify_whole_tables(&mut self, t: Instant) -> Result<u32> {
        let plan = self.exec.tables(&self.standby, self.opts).await?;
        let tables = plan.verify.clone();
        (self.exec.progress)(format!(
            "verifying {} table(s) on both sides ({} MB, about {:.1} s){}",
            tables.len(),
            plan.bytes / (1024 * 1024),
            plan.estimated_secs,
            skipped_note(&plan)
        ));
        let theirs = async {
            match self
                .exec
                .ask_within(
                    Request::TableDigests {
                        tables: tables.clone(),
                    },
                    DIGEST_TIMEOUT,
                )
                .await?
            {
                Response::TableDigests { digests } => Ok(digests),
                other => bail!("unexpected answer {other:?}"),
            }
        };
        let more = new_cluster_connector(self.exec.settings);
        let ours = pgferry_common::runtime::digest::table_digests(
            &self.standby,
            Some(&more),
            &tables,
            pgferry_common::runtime::digest::digest_parallelism(),
        );
        // Our failure does not wait for the source's answer (the fence is lifted by the
        // rollback).
        let both = async { tokio::try_join!(theirs, ours) };
        tokio::pin!(both);
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        let (theirs, ours) = loop {
            tokio::select! {
                r = &mut both => break r?,
                _ = tick.tick() => (self.exec.progress)(format!(
                    "still verifying ({} s; writes stay fenced)",
                    t.elapsed().as_secs()
                )),
            }
        };
        let mismatched: Vec<String> = theirs
            .iter()
            .zip(&ours)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| {
                format!(
                    "{} (source {} rows {}, target {} rows {})",
                    a.table,
                    a.rows,
                    &a.blake3[..12],
                    b.rows,
                    &b.blake3[..12]
                )
            })
            .collect();
        self.exec.record(&TablesVerified {
            tables: ours.clone(),
            mismatched: mismatched.clone(),
            not_verified: plan.skipped.clone(),
            method: None,
            at_fence: None,
        });
        if !mismatched.is_empty() || theirs.len() != ours.len() {
            bail!(
                "table contents differ after the fence: {}",
                mismatched.join(", ")
            );
        }
        self.report.verified_rows = Some(ours.iter().map(|d| d.rows).sum());
        self.report.tables = Some(plan.verify);
        self.report.tables_skipped = Some(plan.skipped);
        Ok(tables.len() as u32)
    }

    /// Verified → promoted. The point of no return is recorded *before* pg_promote: whatever
    /// happens from here (an error, a lost connection, a kill), the migration goes forward,
    /// never back to the source.
    fn point_of_no_return(&mut self, current: State) -> Result<State> {
        (self.exec.progress)("promoting the new cluster (point of no return)".into());
        self.exec.advance(current, Event::Promoted)
    }

    /// Promoted → completed: promotes (again, after an interruption), waits until the new
    /// cluster takes writes — the write downtime ends — then the steps after promotion.
    async fn promote(&mut self, current: State, fence: &Fence) -> Result<State> {
        let promoted = self.promote_until_writable().await?;
        self.report.phases.promote_ms = Some(promoted.as_millis() as u64);
        let at_ms = now_ms();
        let downtime = at_ms.saturating_sub(fence.at_ms);
        (self.exec.progress)(format!(
            "the new cluster accepts writes; write downtime {downtime} ms"
        ));
        self.report.downtime_ms = Some(downtime);
        self.after_promotion(fence).await;
        self.exec.advance(current, Event::Writable { at_ms })
    }

    /// `pg_promote` while the cluster is in recovery (replay may have been paused for the
    /// verification), then a write; retried until it takes one, for at most 120 s. Returns
    /// how long the promotion took.
    async fn promote_until_writable(&self) -> Result<Duration> {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(120);
        let mut promoted_at = None;
        loop {
            if let Ok(c) = connect_new_cluster(self.exec.settings).await {
                if promoted_at.is_none() {
                    promoted_at = self.promote_once(&c, t).await;
                }
                let writable = c
                    .query_one("SELECT pg_is_in_recovery(), txid_current()::text", &[])
                    .await
                    .is_ok_and(|r| !r.get::<_, bool>(0));
                if writable {
                    return Ok(promoted_at.unwrap_or_else(|| t.elapsed()));
                }
            }
            if Instant::now() > deadline {
                bail!("the new cluster did not accept a write within 120 s of its promotion; check its log; the cutover goes on (never back) when run again");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One attempt: `Some(elapsed)` once the cluster is out of recovery.
    async fn promote_once(&self, c: &Client, t: Instant) -> Option<Duration> {
        let in_recovery = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0));
        match in_recovery {
            Ok(true) => {
                let _ = c.batch_execute("SELECT pg_wal_replay_resume()").await;
                match c.query_one("SELECT pg_promote(true, 60)", &[]).await {
                    Ok(r) if r.get::<_, bool>(0) => Some(t.elapsed()),
                    Ok(_) => {
                        (self.exec.progress)(
                            "pg_promote did not finish within 60 s; retrying".into(),
                        );
                        None
                    }
                    Err(e) => {
                        (self.exec.progress)(format!("pg_promote: {e}; retrying"));
                        None
                    }
                }
            }
            Ok(false) => Some(t.elapsed()),
            Err(_) => None,
        }
    }

    /// The steps after promotion run before `completed` is saved, so a run interrupted among
    /// them repeats them (each may run twice: the hook should be idempotent; dropping the slot
    /// is; a source already stopped is said so). None of them fails the migration.
    async fn after_promotion(&mut self, fence: &Fence) {
        let settings = self.exec.settings;
        let host = crate::config::serving_host(&settings.listen_addresses);
        // Where applications go now: the report ends with it.
        self.report.new_primary = Some(format!(
            "host={host} port={} dbname=postgres",
            settings.port
        ));
        if let Some(pb) = &settings.pgbouncer {
            self.switch_pooler(pb, &host).await;
        }
        if let Some(cmd) = &self.opts.on_promoted {
            let st = tokio::process::Command::new("sh")
                .args(["-c", cmd])
                .env("PGFERRY_NEW_HOST", &host)
                .env("PGFERRY_NEW_PORT", settings.port.to_string())
                .env(
                    "PGFERRY_NEW_CONNINFO",
                    format!("host={host} port={}", settings.port),
                )
                .env("PGFERRY_FENCE_LSN", fence.lsn.to_string())
                .env("PGFERRY_MIGRATION", self.exec.migration)
                .status()
                .await;
            let ok = st.as_ref().is_ok_and(|s| s.success());
            self.report.on_promoted_ok = Some(ok);
            (self.exec.audit)("on_promoted", json!({"ok": ok}));
            if !ok {
                (self.exec.progress)(format!(
                    "--on-promoted command failed ({st:?}); the migration itself is complete"
                ));
            }
        }
        let slot = self.exec.slot_name();
        match self
            .exec
            .ask(Request::DropSlot { slot: slot.clone() })
            .await
        {
            Err(e) => (self.exec.progress)(format!(
                "could not drop slot {slot} on the source: {e:#}; drop it by hand"
            )),
            Ok(_) => (self.exec.progress)(format!("dropped slot {slot} on the source")),
        }
        if fence.stop_source {
            (self.exec.progress)("shutting the source cluster down (--fence stop)".into());
            let stopped = self
                .exec
                .ask_within(Request::StopCluster, Duration::from_secs(180))
                .await;
            self.report.source_stopped = Some(stopped.is_ok());
            (self.exec.audit)(
                "source_stopped",
                json!({"ok": stopped.is_ok(), "error": stopped.as_ref().err().map(|e| format!("{e:#}"))}),
            );
            match stopped {
                Ok(_) => (self.exec.progress)("the source cluster is shut down".into()),
                Err(e) => (self.exec.progress)(format!(
                    "could not shut the source down: {e:#}; it stays fenced read-only: stop it by hand (pg_ctl stop -m fast)"
                )),
            }
        }
    }

    /// After promotion: PgBouncer's databases file points at the new primary, RELOAD,
    /// RESUME. When the switch fails the clients stay paused (resumed, they would meet the
    /// fenced source): the message says what to do by hand.
    async fn switch_pooler(&mut self, pb: &PgBouncer, host: &str) {
        let port = self.exec.settings.port;
        let mut report = self.report.pooler.take().unwrap_or_default();
        match pb.switch(host, port).await {
            Ok(switched) => {
                (self.exec.audit)(
                    "pooler_switched",
                    json!({"file": pb.databases_file.display().to_string(), "entries": &switched}),
                );
                report.databases = switched.iter().map(|e| e.database.clone()).collect();
                report.switched = switched;
                match pb.resume(&report.databases).await {
                    Ok(()) => {
                        report.resumed = true;
                        report.held_ms = self.paused_at.map(|t| t.elapsed().as_millis() as u64);
                        (self.exec.progress)(format!(
                            "PgBouncer switched to the new primary and resumed ({})",
                            report.databases.join(", ")
                        ));
                    }
                    Err(e) => (self.exec.progress)(format!(
                        "PgBouncer points at the new primary but could not be resumed: {e:#}; run RESUME on its admin console"
                    )),
                }
                (self.exec.audit)(
                    "pooler_resumed",
                    json!({"databases": &report.databases, "ok": report.resumed, "held_ms": report.held_ms}),
                );
            }
            Err(e) => (self.exec.progress)(format!(
                "PgBouncer could NOT be switched: {e:#}. Its clients stay PAUSED: point {} at host={} port={port}, then RELOAD and RESUME on its admin console",
                pb.databases_file.display(),
                pb.new_host.as_deref().unwrap_or(host)
            )),
        }
        self.report.pooler = Some(report);
    }

    /// Completed (or resumed after completion): the report's totals and timeline, audited.
    fn finish(&mut self, state: &State, t_start: Instant) {
        self.report.total_ms = Some(t_start.elapsed().as_millis() as u64);
        self.report.phase = Some(state.phase().to_string());
        self.report.timeline = Some(timeline(&self.exec.store.history().unwrap_or_default()));
        self.exec.record(&self.report);
    }
}

/// Settings the new cluster runs with that differ from what it would start with: those
/// PostgreSQL flags `pending_restart`, and `listen_addresses`/`port` against `[target]`.
async fn restart_needed(c: &Client, settings: &TargetSettings) -> Result<Vec<String>> {
    let mut out: Vec<String> = c
        .query(
            "SELECT name FROM pg_settings WHERE pending_restart ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let row = c
        .query_one(
            "SELECT current_setting('listen_addresses'), current_setting('port')",
            &[],
        )
        .await?;
    let (listen, port): (String, String) = (row.get(0), row.get(1));
    if listen != settings.listen_addresses && !out.iter().any(|n| n == "listen_addresses") {
        out.push(format!(
            "listen_addresses (running '{listen}', [target] says '{}')",
            settings.listen_addresses
        ));
    }
    if port != settings.port.to_string() && !out.iter().any(|n| n == "port") {
        out.push(format!(
            "port (running {port}, [target] says {})",
            settings.port
        ));
    }
    Ok(out)
}
