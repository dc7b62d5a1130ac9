//! What a listening agent grants a peer that has not authenticated yet, and how its refusals
//! reach the logs. Pure: no sockets, no clock (time is a parameter), so the limits are tested
//! here without a network.
//!
//! ```text
//!   UDP Initial ─► address validated? ── no ──► QUIC Retry (stateless: costs one small packet)
//!                        │ yes
//!                        ▼
//!                 PendingHandshakes::try_begin(ip) ── over the per-address or total bound ──► refused
//!                        │ admitted (a slot until the handshake ends, at most the handshake timeout)
//!                        ▼
//!                 TLS handshake + identity policy ── refused / failed ──► RefusalLimiter::note
//!                        │ authenticated                                   (first in full, then
//!                        ▼                                                 one summary a minute)
//!                 authenticated peer: never waits for a pending-handshake slot again
//! ```
//!
//! Pending handshakes and authenticated connections are counted apart: an attacker without a
//! certificate can fill at most its own address's share of the pending slots, and only for the
//! handshake timeout; it can never hold a slot that an authenticated peer needs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Bounds on handshakes in progress (not yet authenticated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Most handshakes in progress at once, all addresses together.
    pub max_total: usize,
    /// Most handshakes in progress from one IP address.
    pub max_per_address: usize,
}

impl Default for HandshakeLimits {
    /// 4 per address covers a peer that reconnects while its previous attempts time out; 64 in
    /// all is far more than two agents ever need, and small enough that a handshake each costs
    /// nothing worth mentioning (a TLS handshake is ~1 ms of CPU here).
    fn default() -> Self {
        Self {
            max_total: 64,
            max_per_address: 4,
        }
    }
}

/// Why a handshake was not even started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefused {
    /// This address already has `limit` handshakes in progress.
    #[error("{limit} handshakes from this address already in progress")]
    PerAddress {
        /// The bound in force.
        limit: usize,
    },
    /// `limit` handshakes are in progress in all.
    #[error("{limit} handshakes already in progress in all")]
    Total {
        /// The bound in force.
        limit: usize,
    },
}

/// Counts handshakes in progress per address.
#[derive(Debug, Default)]
pub struct PendingHandshakes {
    limits: HandshakeLimits,
    per_address: HashMap<IpAddr, usize>,
    total: usize,
}

impl PendingHandshakes {
    /// No handshake in progress yet.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits,
            per_address: HashMap::new(),
            total: 0,
        }
    }

    /// Takes a slot for a handshake from `ip`, or says which bound is full. Every `Ok` must be
    /// matched by one [`Self::end`].
    pub fn try_begin(&mut self, ip: IpAddr) -> Result<(), AdmissionRefused> {
        let n = self.per_address.get(&ip).copied().unwrap_or(0);
        if n >= self.limits.max_per_address {
            return Err(AdmissionRefused::PerAddress {
                limit: self.limits.max_per_address,
            });
        }
        if self.total >= self.limits.max_total {
            return Err(AdmissionRefused::Total {
                limit: self.limits.max_total,
            });
        }
        *self.per_address.entry(ip).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back the slot of a handshake from `ip` that ended (either way).
    pub fn end(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_address.get_mut(&ip) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    /// Handshakes in progress, all addresses.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// How one refusal is to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first from its address in this window: log and audit it with every detail.
    InFull,
    /// Counted into the address's next [`RefusalSummary`].
    Counted,
}

/// The refusals of one address (or of every address past the tracking bound) that were counted
/// rather than written, over one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalSummary {
    /// `None`: addresses beyond [`RefusalLimiter::MAX_ADDRESSES`], counted together.
    pub address: Option<IpAddr>,
    /// Refusals counted (not including the one written in full).
    pub count: u64,
    /// Distinct reasons with their counts; at most [`RefusalLimiter::MAX_REASONS`], the rest
    /// under `"other"`.
    pub reasons: BTreeMap<String, u64>,
    /// Time from the first to the last counted refusal.
    pub span: Duration,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    first_counted: Option<Instant>,
    last_counted: Option<Instant>,
    count: u64,
    reasons: BTreeMap<String, u64>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            opened: now,
            first_counted: None,
            last_counted: None,
            count: 0,
            reasons: BTreeMap::new(),
        }
    }
    fn count(&mut self, reason: &str, now: Instant) {
        self.count += 1;
        self.first_counted.get_or_insert(now);
        self.last_counted = Some(now);
        let key = if self.reasons.contains_key(reason)
            || self.reasons.len() < RefusalLimiter::MAX_REASONS
        {
            reason
        } else {
            "other"
        };
        *self.reasons.entry(key.to_string()).or_insert(0) += 1;
    }
    fn summary(self, address: Option<IpAddr>) -> Option<RefusalSummary> {
        (self.count > 0).then(|| RefusalSummary {
            address,
            count: self.count,
            span: match (self.first_counted, self.last_counted) {
                (Some(a), Some(b)) => b.saturating_duration_since(a),
                _ => Duration::ZERO,
            },
            reasons: self.reasons,
        })
    }
}

/// Rate limit for refusal records: the first refusal from an address is written in full, the
/// following ones within [`Self::WINDOW`] are counted, and one summary per address and window
/// says how many there were and why. A flood of refused handshakes therefore adds at most two
/// records per address per minute to the audit log, whatever its rate.
#[derive(Debug)]
pub struct RefusalLimiter {
    by_address: HashMap<IpAddr, Window>,
    overflow: Option<Window>,
}

impl Default for RefusalLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RefusalLimiter {
    /// One summary per address per this long.
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses tracked one by one; refusals from further addresses share one window.
    pub const MAX_ADDRESSES: usize = 1024;
    /// Distinct reasons kept per summary.
    pub const MAX_REASONS: usize = 16;

    /// Nothing counted yet.
    pub fn new() -> Self {
        Self {
            by_address: HashMap::new(),
            overflow: None,
        }
    }

    /// Notes a refusal of `address` for `reason` (a short key such as the check's name).
    pub fn note(&mut self, address: IpAddr, reason: &str, now: Instant) -> Verdict {
        if let Some(w) = self.by_address.get_mut(&address) {
            w.count(reason, now);
            return Verdict::Counted;
        }
        if self.by_address.len() >= Self::MAX_ADDRESSES {
            self.overflow
                .get_or_insert_with(|| Window::new(now))
                .count(reason, now);
            return Verdict::Counted;
        }
        self.by_address.insert(address, Window::new(now));
        Verdict::InFull
    }

    /// Closes the windows older than [`Self::WINDOW`] and returns their summaries (windows in
    /// which nothing was counted produce none). Call it at least once a window.
    pub fn due(&mut self, now: Instant) -> Vec<RefusalSummary> {
        let expired: Vec<IpAddr> = self
            .by_address
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.opened) >= Self::WINDOW)
            .map(|(a, _)| *a)
            .collect();
        let mut out: Vec<RefusalSummary> = expired
            .into_iter()
            .filter_map(|a| self.by_address.remove(&a).and_then(|w| w.summary(Some(a))))
            .collect();
        if self
            .overflow
            .as_ref()
            .is_some_and(|w| now.saturating_duration_since(w.opened) >= Self::WINDOW)
        {
            out.extend(self.overflow.take().and_then(|w| w.summary(None)));
        }
        out.sort_by_key(|s| s.address);
        out
    }

    /// Closes every window (at shutdown) and returns the summaries.
    pub fn drain(&mut self) -> Vec<RefusalSummary> {
        let mut out: Vec<RefusalSummary> = self
            .by_address
            .drain()
            .filter_map(|(a, w)| w.summary(Some(a)))
            .collect();
        out.extend(self.overflow.take().and_then(|w| w.summary(None)));
        out.sort_by_key(|s| s.address);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_handshakes_are_bounded_per_address_and_in_all() {
        let mut p = PendingHandshakes::new(HandshakeLimits {
            max_total: 3,
            max_per_address: 2,
        });
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        let c = ip("192.0.2.3");
        assert!(p.try_begin(a).is_ok());
        assert!(p.try_begin(a).is_ok());
        assert_eq!(
            p.try_begin(a),
            Err(AdmissionRefused::PerAddress { limit: 2 })
        );
        // Another address is not held up by the first one's share.
        assert!(p.try_begin(b).is_ok());
        assert_eq!(p.try_begin(c), Err(AdmissionRefused::Total { limit: 3 }));
        p.end(a);
        assert!(p.try_begin(c).is_ok());
        assert_eq!(p.total(), 3);
        p.end(a);
        p.end(b);
        p.end(c);
        assert_eq!(p.total(), 0);
        // An end without a begin changes nothing.
        p.end(a);
        assert_eq!(p.total(), 0);
    }

    #[test]
    fn first_refusal_in_full_then_one_summary_per_window() {
        let t0 = Instant::now();
        let mut l = RefusalLimiter::new();
        let a = ip("192.0.2.1");
        assert_eq!(l.note(a, "chain", t0), Verdict::InFull);
        for i in 1..=1000u64 {
            let v = l.note(
                a,
                if i % 2 == 0 { "chain" } else { "timeout" },
                t0 + Duration::from_millis(i),
            );
            assert_eq!(v, Verdict::Counted);
        }
        // Another address gets its own full record.
        assert_eq!(l.note(ip("192.0.2.2"), "chain", t0), Verdict::InFull);
        assert!(l.due(t0 + Duration::from_secs(59)).is_empty());
        let due = l.due(t0 + RefusalLimiter::WINDOW);
        // 192.0.2.2 had nothing counted: no summary for it.
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].address, Some(a));
        assert_eq!(due[0].count, 1000);
        assert_eq!(due[0].reasons["chain"], 500);
        assert_eq!(due[0].reasons["timeout"], 500);
        assert_eq!(due[0].span, Duration::from_millis(999));
        // After its window, the address's next refusal is written in full again.
        assert_eq!(
            l.note(a, "chain", t0 + Duration::from_secs(61)),
            Verdict::InFull
        );
    }

    #[test]
    fn a_flood_of_addresses_and_reasons_stays_bounded() {
        let t0 = Instant::now();
        let mut l = RefusalLimiter::new();
        let mut in_full = 0;
        for i in 0..(RefusalLimiter::MAX_ADDRESSES as u32 + 500) {
            let a = IpAddr::from(0x0a00_0000u32.wrapping_add(i).to_be_bytes());
            if l.note(a, &format!("reason {i}"), t0) == Verdict::InFull {
                in_full += 1;
            }
            l.note(a, &format!("reason {i}"), t0);
        }
        assert_eq!(in_full, RefusalLimiter::MAX_ADDRESSES);
        let all = l.drain();
        let overflow = all.iter().find(|s| s.address.is_none()).unwrap();
        assert_eq!(overflow.count, 1000);
        assert!(overflow.reasons.len() <= RefusalLimiter::MAX_REASONS + 1);
        // 16 distinct reasons kept (2 each), the rest under "other".
        assert_eq!(overflow.reasons["other"], 1000 - 16 * 2);
        assert!(l.drain().is_empty());
    }
}
