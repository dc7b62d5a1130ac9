//! The sender's zstd level control (pure: it takes the time as input). Each window of
//! `ADAPT_WINDOW` raw bytes measures the goodput at the current level; now and then it probes
//! a neighbouring level and keeps whichever moved more data. The pump
//! (`runtime::pump::outbound`) asks it for the level of each large chunk. One controller
//! serves all the streams an agent sends ([`SharedLevel`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A change of level at the end of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelChange {
    /// `None` is RAW.
    pub from: Option<i32>,
    pub to: Option<i32>,
    /// Raw bytes per second measured at `from`.
    pub rate: f64,
}

/// zstd levels the sender moves between (never above the configured level): negative levels
/// compress 2-4x faster than 3 at a lower ratio, for links faster than the CPU. Below the
/// lowest, chunks go RAW (no compression at all).
const LEVEL_LADDER: [i32; 8] = [-7, -3, 1, 3, 6, 9, 12, 19];

/// Raw bytes sent per measurement of [`LevelControl`] (about the send window: less would
/// measure how fast the window fills rather than how fast the link drains it).
const ADAPT_WINDOW: usize = 16 << 20;

/// The shortest window: on a fast path 16 MiB pass in 50 ms, where one scheduling hiccup or
/// one fsync stall of the receiver moves the measured rate by 15-30 % (measured on loopback,
/// 8 file streams on 2 cores: RAW read as slower than level 1 at random). Slower paths are not
/// affected (16 MiB take 134 ms at 1 Gbit/s).
const ADAPT_WINDOW_MIN_TIME: Duration = Duration::from_millis(120);

/// Windows at one level before the first probe of a neighbouring level; doubled after each
/// probe that changes nothing (up to [`PROBE_EVERY_MAX`]), reset by one that does.
const PROBE_EVERY: u32 = 8;
const PROBE_EVERY_MAX: u32 = 64;

/// Windows before the first probe. The first windows of a stream fill the QUIC send window
/// (16 MiB on the wire, ~50 MiB of raw data at ratio 3) as fast as the CPU compresses, even on
/// a slow link; a probe compared against them would take a link bound for a CPU bound. Not
/// many more: a bulk transfer whose CPU is the bound should not spend long at a slow level.
const FIRST_PROBE_AFTER: u32 = 5;

/// A pause in sending longer than this starts the control over, as for a new transfer: the
/// configured level, a fresh window, probes soon. The time no stream had anything to send is
/// not the pump's (a bulk transfer that starts after a quiet minute must not read as a slow
/// level), and what the last transfer learned may no longer hold: shared by all streams, the
/// control would otherwise carry RAW from a fast phase into a slow one and climb back only
/// at its backed-off probe rate (up to 64 windows, 85 s at 100 Mbit/s; seen in the bench).
const IDLE_RESET: Duration = Duration::from_secs(2);

/// Windows after a kept step down before the step back up is tried.
const RECHECK_AFTER_DOWN: u32 = 2;

/// A lower level is kept only if it moves this much more data per second than the level the
/// probe left: a lower level costs ratio, so noise must not buy it.
const DOWN_GAIN: f64 = 1.05;

/// A higher level is kept if it moves at least this share of the data per second: at equal
/// speed the better ratio wins (fewer bytes on the link). Between this and [`DOWN_GAIN`] a
/// level ties with the one the probe left.
const UP_KEEP: f64 = 0.97;

/// Chooses the zstd level of large chunks by the measured goodput (DESIGN §6): raw bytes per
/// second that leave the pump, whatever the bound is. Now and then it probes the neighbouring
/// level for one window: a faster lower level or a not-slower higher one is kept, and the
/// probe goes on in the same direction at once. A lower level that ties goes on down too
/// (the levels between fast zstd and RAW can all cost about the same while RAW costs much
/// less), and the probe returns to where it started if no level below was faster.
///
/// When the CPU is the bound, lower levels move more data and it descends (to RAW when
/// hashing and sending bare chunks is cheaper than compressing them); when the link is, higher
/// levels move more (better ratio) and it climbs back to the configured level; when the local
/// socket is, all levels tie and the configured level stays.
///
/// An earlier controller stepped on "waiting for compression" vs "waiting for the QUIC
/// stream"; on a shared CPU the stream also waits for a starved connection task, which read
/// as a link bound and kept level 3 where RAW moved 2.6x as much (bench, unlimited link).
#[derive(Debug)]
pub struct LevelControl {
    /// `None` is RAW.
    ladder: Vec<Option<i32>>,
    at: usize,
    bytes: usize,
    window_start: Option<std::time::Instant>,
    /// The last send: a pause longer than [`IDLE_RESET`] starts over.
    last_sent: Option<Instant>,
    /// Windows measured at this level since the last probe, and how many to wait.
    settled: u32,
    probe_every: u32,
    /// The level a probe left, and its goodput then.
    probe: Option<(usize, f64)>,
    /// Direction of the next probe.
    next_down: bool,
    /// Whether the last kept probe went down.
    went_down: bool,
}

impl LevelControl {
    /// Starts at `max`, the configured level.
    pub fn new(max: i32) -> Self {
        let mut ladder = vec![None];
        ladder.extend(LEVEL_LADDER.iter().filter(|l| **l < max).map(|l| Some(*l)));
        ladder.push(Some(max));
        let at = ladder.len() - 1;
        Self {
            ladder,
            at,
            bytes: 0,
            window_start: None,
            last_sent: None,
            settled: PROBE_EVERY - FIRST_PROBE_AFTER,
            probe_every: PROBE_EVERY,
            probe: None,
            next_down: true,
            went_down: false,
        }
    }

    /// The zstd level of the next large chunk; `None`: send it RAW.
    pub fn level(&self) -> Option<i32> {
        self.ladder[self.at]
    }

    /// `raw` bytes were handed to the QUIC stream at `now`. Returns the change of level a
    /// window's end decided, if any: `(from, to, rate at from in bytes/s)`.
    pub fn sent(&mut self, raw: usize, now: Instant) -> Option<LevelChange> {
        let idle = self
            .last_sent
            .replace(now)
            .is_some_and(|last| now.saturating_duration_since(last) > IDLE_RESET);
        if idle {
            let max = self.ladder.last().copied().flatten().unwrap_or(0);
            *self = Self::new(max);
            self.last_sent = Some(now);
        }
        let start = match self.window_start {
            Some(start) => start,
            None => {
                // The window starts at the first send (after a pause): time before it is not
                // the pump's.
                self.window_start = Some(now);
                self.bytes = 0;
                return None;
            }
        };
        self.bytes += raw;
        let elapsed = now.saturating_duration_since(start);
        if self.bytes < ADAPT_WINDOW || elapsed < ADAPT_WINDOW_MIN_TIME {
            return None;
        }
        let secs = elapsed.as_secs_f64().max(1e-6);
        let rate = self.bytes as f64 / secs;
        self.bytes = 0;
        self.window_start = Some(now);
        self.decide(rate)
    }

    /// One window measured `rate` raw bytes/s at the current level.
    fn decide(&mut self, rate: f64) -> Option<LevelChange> {
        let before = self.at;
        match self.probe.take() {
            Some((from, from_rate)) if self.at < from => {
                if rate > from_rate * DOWN_GAIN {
                    self.moved(rate, true);
                } else if rate >= from_rate * UP_KEEP && self.at > 0 {
                    // A tie: look one level further down before giving up.
                    self.probe = Some((from, from_rate));
                    self.at -= 1;
                } else {
                    self.back(from, false);
                }
            }
            Some((from, from_rate)) => {
                if rate >= from_rate * UP_KEEP {
                    self.moved(rate, false);
                } else {
                    self.back(from, true);
                }
            }
            None => {
                self.settled += 1;
                if self.settled >= self.probe_every {
                    self.settled = 0;
                    self.went_down = false;
                    let down = (self.next_down && self.at > 0) || self.at + 1 == self.ladder.len();
                    self.next_down = !down;
                    self.step(rate, down);
                }
            }
        }
        (self.at != before).then(|| LevelChange {
            from: self.ladder[before],
            to: self.level(),
            rate,
        })
    }

    /// A probe in direction `down` was kept: go on probing that way while there is room.
    fn moved(&mut self, rate: f64, down: bool) {
        self.probe_every = PROBE_EVERY;
        self.went_down = down;
        if !self.step(rate, down) {
            self.settle_after_move(down);
        }
    }

    /// A probe gained nothing: return to `from` and probe the other way next. Less often,
    /// unless this probe went on from a kept step down: then the way back up is tried soon,
    /// because a step down can also be kept for a wrong reason (the first windows after a
    /// faster level fill the QUIC send window at CPU speed even when the link is the bound).
    fn back(&mut self, from: usize, next_down: bool) {
        let after_down = self.went_down && self.at < from;
        self.at = from;
        if after_down {
            self.settle_after_move(true);
        } else {
            self.settled = 0;
            self.next_down = next_down;
            self.probe_every = (self.probe_every * 2).min(PROBE_EVERY_MAX);
        }
    }

    fn settle_after_move(&mut self, down: bool) {
        self.next_down = !down;
        self.settled = if down {
            PROBE_EVERY - RECHECK_AFTER_DOWN
        } else {
            0
        };
    }

    /// Starts a probe one level down or up from here; false if there is none that way.
    fn step(&mut self, rate: f64, down: bool) -> bool {
        let next = if down {
            self.at.checked_sub(1)
        } else {
            Some(self.at + 1).filter(|n| *n < self.ladder.len())
        };
        match next {
            Some(n) => {
                self.probe = Some((self.at, rate));
                self.at = n;
                true
            }
            None => false,
        }
    }
}

/// One [`LevelControl`] shared by every stream an agent sends: the window counts what they
/// send together, so 8 parallel streams measure one goodput and probe once, instead of each
/// probing alone on an eighth of the bytes (where noise decides).
#[derive(Debug, Clone)]
pub struct SharedLevel(Arc<Mutex<LevelControl>>);

impl SharedLevel {
    /// A controller at `max`, the configured level.
    pub fn new(max: i32) -> Self {
        Self(Arc::new(Mutex::new(LevelControl::new(max))))
    }

    /// The zstd level of the next large chunk; `None`: send it RAW.
    pub fn level(&self) -> Option<i32> {
        self.lock().level()
    }

    /// [`LevelControl::sent`] for one stream's chunk.
    pub fn sent(&self, raw: usize, now: Instant) -> Option<LevelChange> {
        self.lock().sent(raw, now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LevelControl> {
        // The state is a few counters, valid after any panic mid-update.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn level_name(level: Option<i32>) -> String {
    level.map_or_else(|| "raw".to_string(), |l| l.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn level_ladder_stops_at_the_configured_level() {
        assert_eq!(
            LevelControl::new(3).ladder,
            [None, Some(-7), Some(-3), Some(1), Some(3)]
        );
        assert_eq!(LevelControl::new(5).ladder.last(), Some(&Some(5)));
        assert_eq!(LevelControl::new(-3).ladder, [None, Some(-7), Some(-3)]);
        assert_eq!(
            LevelControl::new(3).level(),
            Some(3),
            "starts at the configured level"
        );
    }

    /// Runs `windows` windows against a model of the goodput at each level; returns the share
    /// of windows spent at each level (index as in the ladder).
    fn simulate(
        c: &mut LevelControl,
        windows: usize,
        rate: impl Fn(Option<i32>) -> f64,
    ) -> Vec<f64> {
        let mut at = vec![0usize; c.ladder.len()];
        for _ in 0..windows {
            at[c.at] += 1;
            c.decide(rate(c.level()));
        }
        at.iter().map(|n| *n as f64 / windows as f64).collect()
    }

    /// Ratio of our sample data at each level (roughly as measured).
    fn ratio(level: Option<i32>) -> f64 {
        match level {
            None => 1.0,
            Some(-7) => 2.0,
            Some(-3) => 2.4,
            Some(1) => 3.0,
            _ => 3.2,
        }
    }

    #[test]
    fn cpu_bound_descends_to_the_fastest_level_even_past_ties() {
        // As measured on the unlimited link: the fast levels all cost about the same, RAW much
        // less. It must get past the tie between -3 and -7.
        let mut c = LevelControl::new(3);
        let share = simulate(&mut c, 400, |l| match l {
            None => 400e6,
            Some(-7) => 210e6,
            Some(-3) => 205e6,
            Some(1) => 180e6,
            _ => 130e6,
        });
        assert!(share[0] > 0.85, "mostly RAW: {share:?}");
        assert_eq!(c.level(), None);
    }

    #[test]
    fn link_bound_stays_at_the_configured_level() {
        let mut c = LevelControl::new(3);
        let share = simulate(&mut c, 400, |l| 12.5e6 * ratio(l));
        assert!(share[4] > 0.9, "mostly level 3: {share:?}");
        assert_eq!(c.level(), Some(3));
    }

    #[test]
    fn a_link_that_speeds_up_is_followed_both_ways() {
        let mut c = LevelControl::new(3);
        // A fast link with a CPU that compresses at 150 MB/s at level 3: RAW moves most.
        let fast = |l: Option<i32>| match l {
            None => 300e6,
            Some(3) => 150e6,
            _ => 200e6,
        };
        simulate(&mut c, 200, fast);
        assert_eq!(c.level(), None);
        // Then the link slows to 100 Mbit/s: back up to the configured level.
        let share = simulate(&mut c, 400, |l| (12.5e6 * ratio(l)).min(fast(l)));
        assert_eq!(c.level(), Some(3), "{share:?}");
        assert!(share[4] > 0.8, "{share:?}");
    }

    #[test]
    fn input_bound_keeps_the_ratio_and_probes_less_often() {
        // The local socket is the bound: every level moves the same.
        let mut c = LevelControl::new(3);
        let share = simulate(&mut c, 1000, |_| 20e6);
        assert!(share[4] > 0.9, "mostly level 3: {share:?}");
        assert_eq!(c.probe_every, PROBE_EVERY_MAX, "probes back off");
    }

    #[test]
    fn a_pause_starts_over_at_the_configured_level_with_a_fresh_window() {
        // A CPU-bound phase takes it to RAW, with probes backed off.
        let mut c = LevelControl::new(3);
        simulate(&mut c, 400, |l| if l.is_none() { 400e6 } else { 150e6 });
        assert_eq!(c.level(), None);
        assert!(c.probe_every > PROBE_EVERY);
        let t0 = Instant::now();
        c.sent(1 << 20, t0);
        c.sent(ADAPT_WINDOW / 2, t0 + Duration::from_millis(1));
        // A quiet minute, then sending again: the configured level, an empty window.
        let t = t0 + Duration::from_secs(60);
        assert_eq!(c.sent(ADAPT_WINDOW / 2, t), None);
        assert_eq!((c.level(), c.bytes, c.probe), (Some(3), 0, None));
        assert_eq!(c.probe_every, PROBE_EVERY);
        // The first probe comes after FIRST_PROBE_AFTER windows, from the rate they measured
        // (~130 MB/s), not from a window stretched over the pause.
        for i in 1..=u64::from(FIRST_PROBE_AFTER) * 16 {
            c.sent(ADAPT_WINDOW / 16, t + Duration::from_millis(8 * i));
        }
        assert_eq!(c.level(), Some(1));
        let (_, from_rate) = c.probe.expect("probing");
        assert!(from_rate > 1e8, "{from_rate}");
        // Pauses shorter than IDLE_RESET change nothing.
        let before = (c.level(), c.probe);
        c.sent(1, t + Duration::from_secs(1));
        assert_eq!((c.level(), c.probe), before);
    }

    #[test]
    fn streams_share_one_window() {
        // Two streams, each sending half of every window: one controller sees whole windows.
        let shared = SharedLevel::new(3);
        let (a, b) = (shared.clone(), shared.clone());
        let t0 = Instant::now();
        a.sent(1, t0);
        let mut changes = 0;
        for i in 1..=(FIRST_PROBE_AFTER as u64) * 16 {
            let t = t0 + Duration::from_millis(8 * i);
            let s = if i % 2 == 0 { &a } else { &b };
            changes += usize::from(s.sent(ADAPT_WINDOW / 16, t).is_some());
        }
        assert_eq!(
            changes, 1,
            "one probe after FIRST_PROBE_AFTER shared windows"
        );
        assert_eq!((a.level(), b.level()), (Some(1), Some(1)));
    }

    #[test]
    fn decisions_only_at_the_end_of_a_window() {
        let mut c = LevelControl::new(3);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        c.sent(1 << 20, t0); // starts the clock
                             // The first probe (one level down) comes at the end of window FIRST_PROBE_AFTER.
        let halves = 2 * u64::from(FIRST_PROBE_AFTER);
        for i in 1..halves {
            c.sent(ADAPT_WINDOW / 2, ms(i * 70));
        }
        assert_eq!(c.level(), Some(3));
        c.sent(ADAPT_WINDOW / 2, ms(halves * 70));
        assert_eq!(c.level(), Some(1));
        c.sent(ADAPT_WINDOW - 1, ms(halves * 70 + 200));
        assert_eq!(c.level(), Some(1));
    }

    #[test]
    fn a_window_lasts_at_least_its_minimum_time() {
        // A path so fast that 16 MiB pass in 10 ms: the window goes on until
        // ADAPT_WINDOW_MIN_TIME has passed, and measures the rate over all of it.
        let mut c = LevelControl::new(3);
        let t0 = Instant::now();
        c.sent(1, t0);
        let end = ADAPT_WINDOW_MIN_TIME.as_millis() as u64 * u64::from(FIRST_PROBE_AFTER);
        // Five windows of ADAPT_WINDOW alone would have ended after 50 ms; they end after five
        // minimum times.
        for t in (10..end).step_by(10) {
            c.sent(ADAPT_WINDOW, t0 + Duration::from_millis(t));
            assert_eq!(c.level(), Some(3), "a decision at {t} ms");
        }
        c.sent(ADAPT_WINDOW, t0 + Duration::from_millis(end));
        assert_eq!(c.level(), Some(1));
        let (_, rate) = c.probe.expect("probing");
        // 16 MiB every 10 ms: 1.7 GB/s.
        assert!((1.5e9..1.9e9).contains(&rate), "{rate}");
    }
}
