//! Whether a target may take requests: active probe results (`probe.rs`), passive marks
//! from real traffic, and a circuit breaker. State is per worker except the active probe
//! results, which the workers of a node share.
//!
//! The request path reads one atomic byte per candidate target: zero means "in rotation"
//! and nothing else is looked at. Only a target with a mark (down, breaker not closed) takes
//! the slow path, which reads the clock and may take the breaker's lock.

use crate::config::{BreakerConfig, HealthConfig, StatusRanges};
use crate::server::log_event;
use crate::upstream::secs;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Nanoseconds since this process's first call: the request path's clock (one `Instant`
/// per request serves both the tokio deadlines and these counters).
pub fn ns_since_start(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| t);
    t.saturating_duration_since(base).as_nanos() as u64
}

pub fn now_ns() -> u64 {
    ns_since_start(Instant::now())
}

fn to_ns(seconds: f64) -> u64 {
    secs(seconds).as_nanos() as u64
}

/// A set of HTTP status codes (100..=599), one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusSet([u64; 8]);

impl StatusSet {
    pub fn from_ranges(ranges: &StatusRanges) -> Self {
        let mut set = StatusSet::default();
        for &(lo, hi) in ranges {
            for s in lo.max(100)..=hi.min(599) {
                let i = (s - 100) as usize;
                set.0[i / 64] |= 1 << (i % 64);
            }
        }
        set
    }

    pub fn contains(&self, status: u16) -> bool {
        if !(100..=599).contains(&status) {
            return false;
        }
        let i = (status - 100) as usize;
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

/// How one attempt on a target ended, as far as its health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived with this status.
    Status(u16),
    /// Connecting failed or timed out.
    Connect,
    /// No response within the read (or write, or total) timeout.
    Timeout,
    /// The connection broke before or while the response head arrived, or the response
    /// was not valid HTTP.
    Broken,
}

impl Outcome {
    fn reason(self) -> &'static str {
        match self {
            Outcome::Status(_) => "status",
            Outcome::Connect => "connect",
            Outcome::Timeout => "timeout",
            Outcome::Broken => "broken",
        }
    }
}

/// Why a target is not in rotation right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Up,
    /// Marked down by passive checks: used only when nothing better is left.
    Passive,
    /// Down by the active probe.
    Down,
    /// Its breaker is open (or half-open with every probe slot taken).
    Open,
}

const ACTIVE_DOWN: u8 = 1;
const PASSIVE_DOWN: u8 = 2;
const BREAKER_NOT_CLOSED: u8 = 4;

struct Passive {
    failures: u32,
    down_for_ns: u64,
    statuses: StatusSet,
    consecutive: AtomicU32,
    down_until: AtomicU64,
}

/// One target's health as this worker sees it; kept across reloads while the target's
/// health settings stay the same.
pub struct TargetHealth {
    pub upstream: String,
    pub address: String,
    /// The settings this was built from (a reload with the same ones keeps the state).
    pub config: HealthConfig,
    pub breaker_config: Option<BreakerConfig>,
    flags: AtomicU8,
    passive: Option<Passive>,
    breaker: Option<Breaker>,
    /// Set once this worker runs the target's probe task.
    pub probing: AtomicBool,
    /// How probes reach the target over TLS (the latest config's settings); None: plain.
    tls: arc_swap::ArcSwapOption<crate::upstream_tls::TargetTls>,
}

impl TargetHealth {
    pub fn new(
        upstream: &str,
        address: &str,
        config: &HealthConfig,
        breaker: Option<&BreakerConfig>,
    ) -> Self {
        TargetHealth {
            upstream: upstream.to_string(),
            address: address.to_string(),
            config: config.clone(),
            breaker_config: breaker.cloned(),
            flags: AtomicU8::new(0),
            passive: config
                .passive
                .as_ref()
                .filter(|p| p.failures > 0)
                .map(|p| Passive {
                    failures: p.failures,
                    down_for_ns: to_ns(p.down_for),
                    statuses: StatusSet::from_ranges(&p.statuses),
                    consecutive: AtomicU32::new(0),
                    down_until: AtomicU64::new(0),
                }),
            breaker: breaker.map(|b| Breaker::new(BreakerSettings::from_config(b))),
            probing: AtomicBool::new(false),
            tls: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The TLS settings probes use from now on (a reload may change them).
    pub fn set_tls(&self, tls: Option<crate::upstream_tls::TargetTls>) {
        self.tls.store(tls.map(Arc::new));
    }

    pub fn tls(&self) -> Option<Arc<crate::upstream_tls::TargetTls>> {
        self.tls.load_full()
    }

    /// Whether the target may take a request at `now` (see [`ns_since_start`]).
    #[inline]
    pub fn availability(&self, now: u64) -> Availability {
        let flags = self.flags.load(Ordering::Relaxed);
        if flags == 0 {
            Availability::Up
        } else {
            self.availability_slow(flags, now)
        }
    }

    fn availability_slow(&self, flags: u8, now: u64) -> Availability {
        if flags & ACTIVE_DOWN != 0 {
            return Availability::Down;
        }
        if flags & BREAKER_NOT_CLOSED != 0 {
            if let Some(b) = &self.breaker {
                let (open, change) = b.check(now);
                self.breaker_changed(change);
                if open {
                    return Availability::Open;
                }
            }
        }
        if flags & PASSIVE_DOWN != 0 {
            if let Some(p) = &self.passive {
                if now < p.down_until.load(Ordering::Relaxed) {
                    return Availability::Passive;
                }
                // Back on probation: the next failure takes it out again.
                p.consecutive.store(p.failures - 1, Ordering::Relaxed);
                self.flags.fetch_and(!PASSIVE_DOWN, Ordering::Relaxed);
                log_event(
                    "info",
                    "target_up",
                    serde_json::json!({"upstream": self.upstream, "target": self.address, "reason": "passive_expired"}),
                );
            }
        }
        Availability::Up
    }

    /// Take a request slot of the breaker (a half-open breaker lets only a few through);
    /// None when it refuses. Targets without a breaker need no ticket.
    pub fn admit(self: &Arc<Self>, now: u64) -> Option<BreakerTicket> {
        let b = self.breaker.as_ref()?;
        let (slot, change) = b.lock().admit(&b.settings, now);
        self.breaker_changed(change);
        let (generation, probe) = slot?;
        Some(BreakerTicket {
            generation,
            probe,
            health: self.clone(),
        })
    }

    pub fn has_breaker(&self) -> bool {
        self.breaker.is_some()
    }

    /// Record how an attempt ended. `ticket` is the breaker slot [`admit`] gave it.
    ///
    /// [`admit`]: TargetHealth::admit
    #[inline]
    pub fn report(&self, outcome: Outcome, ticket: Option<BreakerTicket>) {
        // The common case, inline: a response that changes nothing.
        if let (Outcome::Status(s), None, None) = (outcome, &ticket, &self.breaker) {
            match &self.passive {
                None => return,
                Some(p) if !p.statuses.contains(s) && p.consecutive.load(Ordering::Relaxed) == 0 => return,
                Some(_) => {}
            }
        }
        self.report_slow(outcome, ticket);
    }

    #[inline(never)]
    fn report_slow(&self, outcome: Outcome, ticket: Option<BreakerTicket>) {
        if let Some(p) = &self.passive {
            let failed = match outcome {
                Outcome::Status(s) => p.statuses.contains(s),
                _ => true,
            };
            if !failed {
                if p.consecutive.load(Ordering::Relaxed) != 0 {
                    p.consecutive.store(0, Ordering::Relaxed);
                }
            } else {
                let n = p.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= p.failures && self.flags.load(Ordering::Relaxed) & PASSIVE_DOWN == 0 {
                    p.down_until.store(now_ns() + p.down_for_ns, Ordering::Relaxed);
                    self.flags.fetch_or(PASSIVE_DOWN, Ordering::Relaxed);
                    log_event(
                        "warn",
                        "target_down",
                        serde_json::json!({
                            "upstream": self.upstream, "target": self.address, "reason": "passive",
                            "failure": outcome.reason(), "status": match outcome { Outcome::Status(s) => Some(s), _ => None },
                            "consecutive_failures": n, "down_for": p.down_for_ns as f64 / 1e9,
                        }),
                    );
                }
            }
        }
        if let (Some(b), Some(mut ticket)) = (&self.breaker, ticket) {
            let failed = match outcome {
                Outcome::Status(s) => b.settings.statuses.contains(s),
                _ => true,
            };
            ticket.probe = false; // the outcome is in: nothing to give back on drop
            let change = b.lock().record(&b.settings, ticket.generation, !failed, now_ns());
            self.breaker_changed(change);
        }
    }

    /// Set by this worker's probe task from the node's shared probe result.
    pub fn set_active_down(&self, down: bool) {
        let was = self.flags.load(Ordering::Relaxed) & ACTIVE_DOWN != 0;
        if was != down {
            if down {
                self.flags.fetch_or(ACTIVE_DOWN, Ordering::Relaxed);
            } else {
                self.flags.fetch_and(!ACTIVE_DOWN, Ordering::Relaxed);
            }
        }
    }

    fn breaker_changed(&self, change: Option<Transition>) {
        let Some(t) = change else { return };
        if t.to == BreakerMode::Closed {
            self.flags.fetch_and(!BREAKER_NOT_CLOSED, Ordering::Relaxed);
        } else {
            self.flags.fetch_or(BREAKER_NOT_CLOSED, Ordering::Relaxed);
        }
        log_event(
            if t.to == BreakerMode::Open { "warn" } else { "info" },
            "circuit_breaker",
            serde_json::json!({
                "upstream": self.upstream, "target": self.address,
                "from": t.from.name(), "to": t.to.name(),
                "requests": t.requests, "failures": t.failures,
            }),
        );
    }

    /// The breaker's mode (for tests and status output).
    pub fn breaker_mode(&self) -> Option<BreakerMode> {
        self.breaker.as_ref().map(|b| b.lock().mode)
    }

    /// How this worker sees the target at `now`, for metrics: whether a request would be
    /// sent to it (passive marks included), and its breaker's mode as the next request
    /// would find it. Unlike [`availability`](TargetHealth::availability), changes nothing.
    pub fn view(&self, now: u64) -> (bool, Option<BreakerMode>) {
        let flags = self.flags.load(Ordering::Relaxed);
        let breaker = self.breaker.as_ref().map(|b| b.lock().mode_at(now));
        let passive_down = flags & PASSIVE_DOWN != 0
            && self
                .passive
                .as_ref()
                .is_some_and(|p| now < p.down_until.load(Ordering::Relaxed));
        let up = flags & ACTIVE_DOWN == 0 && !passive_down && breaker != Some(BreakerMode::Open);
        (up, breaker)
    }
}

// ---- circuit breaker ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerMode {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerMode {
    pub fn name(self) -> &'static str {
        match self {
            BreakerMode::Closed => "closed",
            BreakerMode::Open => "open",
            BreakerMode::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerMode,
    pub to: BreakerMode,
    /// The window's counts when the breaker opened from closed.
    pub requests: u32,
    pub failures: u32,
}

#[derive(Debug, Clone)]
pub struct BreakerSettings {
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window_ns: u64,
    pub open_for_ns: u64,
    pub half_open_requests: u32,
    pub statuses: StatusSet,
}

impl BreakerSettings {
    pub fn from_config(c: &BreakerConfig) -> Self {
        BreakerSettings {
            failure_ratio: c.failure_ratio,
            min_requests: c.min_requests.max(1),
            window_ns: to_ns(c.window).max(BUCKETS as u64),
            open_for_ns: to_ns(c.open_for),
            half_open_requests: c.half_open_requests.max(1),
            statuses: StatusSet::from_ranges(&c.statuses),
        }
    }
}

/// The rolling window is this many buckets of `window / BUCKETS` each.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    requests: u32,
    failures: u32,
}

/// The breaker's state machine, without locking or logging (tested on its own).
#[derive(Debug)]
pub struct BreakerCore {
    pub mode: BreakerMode,
    buckets: [Bucket; BUCKETS],
    open_until: u64,
    /// Half-open: probes that may still start, probes that succeeded.
    permits: u32,
    successes: u32,
    /// Bumped at every transition: outcomes of requests admitted earlier are ignored.
    generation: u64,
}

/// A request admitted by the breaker; its outcome goes back through
/// [`TargetHealth::report`]. Dropped without an outcome (the client went away), a
/// half-open probe slot is given back.
pub struct BreakerTicket {
    generation: u64,
    probe: bool,
    health: Arc<TargetHealth>,
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        if let (true, Some(b)) = (self.probe, &self.health.breaker) {
            b.lock().give_back(self.generation);
        }
    }
}

impl BreakerCore {
    pub fn new() -> Self {
        BreakerCore {
            mode: BreakerMode::Closed,
            buckets: [Bucket::default(); BUCKETS],
            open_until: 0,
            permits: 0,
            successes: 0,
            generation: 0,
        }
    }

    fn transition(&mut self, s: &BreakerSettings, to: BreakerMode, now: u64) -> Transition {
        let (requests, failures) = self.counts(s, now);
        let t = Transition {
            from: self.mode,
            to,
            requests,
            failures,
        };
        self.mode = to;
        self.generation += 1;
        match to {
            BreakerMode::Open => self.open_until = now + s.open_for_ns,
            BreakerMode::HalfOpen => {
                self.permits = s.half_open_requests;
                self.successes = 0;
            }
            BreakerMode::Closed => self.buckets = [Bucket::default(); BUCKETS],
        }
        t
    }

    fn counts(&self, s: &BreakerSettings, now: u64) -> (u32, u32) {
        let width = s.window_ns / BUCKETS as u64;
        let current = now / width;
        self.buckets
            .iter()
            .filter(|b| b.epoch + (BUCKETS as u64) > current && b.epoch <= current)
            .fold((0, 0), |(r, f), b| (r + b.requests, f + b.failures))
    }

    /// Whether a request would be refused now; moves an open breaker whose time is up to
    /// half-open.
    pub fn check(&mut self, s: &BreakerSettings, now: u64) -> (bool, Option<Transition>) {
        match self.mode {
            BreakerMode::Closed => (false, None),
            BreakerMode::Open if now >= self.open_until => {
                let t = self.transition(s, BreakerMode::HalfOpen, now);
                (false, Some(t))
            }
            BreakerMode::Open => (true, None),
            BreakerMode::HalfOpen => (self.permits == 0, None),
        }
    }

    /// The mode a request arriving at `now` would find (an open breaker whose time is up
    /// is half-open).
    pub fn mode_at(&self, now: u64) -> BreakerMode {
        match self.mode {
            BreakerMode::Open if now >= self.open_until => BreakerMode::HalfOpen,
            mode => mode,
        }
    }

    /// Let a request through: always when closed, one of the probe slots when half-open.
    /// Returns (generation, is_probe) or None when refused.
    pub fn admit(&mut self, s: &BreakerSettings, now: u64) -> (Option<(u64, bool)>, Option<Transition>) {
        let (refused, change) = self.check(s, now);
        if refused {
            return (None, change);
        }
        match self.mode {
            BreakerMode::HalfOpen => {
                self.permits -= 1;
                (Some((self.generation, true)), change)
            }
            _ => (Some((self.generation, false)), change),
        }
    }

    /// A half-open probe admitted in `generation` ended without an outcome.
    pub fn give_back(&mut self, generation: u64) {
        if generation == self.generation && self.mode == BreakerMode::HalfOpen {
            self.permits += 1;
        }
    }

    /// The outcome of a request admitted in `generation`.
    pub fn record(
        &mut self,
        s: &BreakerSettings,
        generation: u64,
        success: bool,
        now: u64,
    ) -> Option<Transition> {
        if generation != self.generation {
            return None;
        }
        match self.mode {
            BreakerMode::Closed => {
                let width = s.window_ns / BUCKETS as u64;
                let epoch = now / width;
                let b = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
                if b.epoch != epoch {
                    *b = Bucket {
                        epoch,
                        ..Bucket::default()
                    };
                }
                b.requests += 1;
                if success {
                    return None;
                }
                b.failures += 1;
                let (requests, failures) = self.counts(s, now);
                if requests >= s.min_requests && failures as f64 >= s.failure_ratio * requests as f64 {
                    return Some(self.transition(s, BreakerMode::Open, now));
                }
                None
            }
            BreakerMode::HalfOpen if !success => Some(self.transition(s, BreakerMode::Open, now)),
            BreakerMode::HalfOpen => {
                self.successes += 1;
                if self.successes >= s.half_open_requests {
                    return Some(self.transition(s, BreakerMode::Closed, now));
                }
                None
            }
            BreakerMode::Open => None,
        }
    }
}

impl Default for BreakerCore {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Breaker {
    pub settings: BreakerSettings,
    core: Mutex<BreakerCore>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            core: Mutex::new(BreakerCore::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, now: u64) -> (bool, Option<Transition>) {
        self.lock().check(&self.settings, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_ratio: 0.5,
            min_requests: 4,
            window_ns: 1000 * MS,
            open_for_ns: 500 * MS,
            half_open_requests: 2,
            statuses: StatusSet::from_ranges(&vec![(500, 599)]),
        }
    }

    fn admit(core: &mut BreakerCore, s: &BreakerSettings, now: u64) -> Option<u64> {
        core.admit(s, now).0.map(|(g, _)| g)
    }

    #[test]
    fn status_sets_hold_ranges() {
        let set = StatusSet::from_ranges(&vec![(500, 500), (502, 504)]);
        assert!(set.contains(500) && set.contains(503) && set.contains(504));
        assert!(!set.contains(501) && !set.contains(200) && !set.contains(600));
        assert!(StatusSet::default().is_empty());
        let all = StatusSet::from_ranges(&vec![(100, 599)]);
        assert!(all.contains(100) && all.contains(599));
    }

    #[test]
    fn breaker_stays_closed_below_the_minimum_of_requests() {
        let s = settings();
        let mut b = BreakerCore::new();
        for i in 0..3 {
            let g = admit(&mut b, &s, i * MS).unwrap();
            assert_eq!(b.record(&s, g, false, i * MS), None);
        }
        assert_eq!(b.mode, BreakerMode::Closed);
    }

    #[test]
    fn breaker_opens_at_the_failure_ratio_then_half_opens_then_closes() {
        let s = settings();
        let mut b = BreakerCore::new();
        let mut t = 0;
        // 2 successes, then failures: opens when failures/requests >= 0.5 with >= 4 requests.
        for ok in [true, true, false] {
            let g = admit(&mut b, &s, t).unwrap();
            assert_eq!(b.record(&s, g, ok, t), None);
            t += MS;
        }
        let g = admit(&mut b, &s, t).unwrap();
        let opened = b.record(&s, g, false, t).expect("opens");
        assert_eq!((opened.from, opened.to), (BreakerMode::Closed, BreakerMode::Open));
        assert_eq!((opened.requests, opened.failures), (4, 2));
        // Open: refused until open_for has passed.
        assert!(admit(&mut b, &s, t + 499 * MS).is_none());
        // Then half-open: two probes, the third is refused while they run.
        let (p1, change) = b.admit(&s, t + 500 * MS);
        assert_eq!(change.map(|c| c.to), Some(BreakerMode::HalfOpen));
        let (p1, probe) = p1.unwrap();
        assert!(probe);
        let p2 = admit(&mut b, &s, t + 501 * MS).unwrap();
        assert!(admit(&mut b, &s, t + 502 * MS).is_none());
        assert_eq!(b.record(&s, p1, true, t + 503 * MS), None);
        let closed = b.record(&s, p2, true, t + 504 * MS).expect("closes");
        assert_eq!(
            (closed.from, closed.to),
            (BreakerMode::HalfOpen, BreakerMode::Closed)
        );
        assert!(admit(&mut b, &s, t + 505 * MS).is_some());
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let s = settings();
        let mut b = BreakerCore::new();
        for i in 0..4 {
            let g = admit(&mut b, &s, i).unwrap();
            b.record(&s, g, false, i);
        }
        assert_eq!(b.mode, BreakerMode::Open);
        let g = admit(&mut b, &s, 600 * MS).unwrap();
        assert_eq!(b.mode, BreakerMode::HalfOpen);
        let t = b.record(&s, g, false, 601 * MS).unwrap();
        assert_eq!((t.from, t.to), (BreakerMode::HalfOpen, BreakerMode::Open));
        assert!(admit(&mut b, &s, 1000 * MS).is_none());
        assert!(admit(&mut b, &s, 1101 * MS).is_some());
    }

    #[test]
    fn outcomes_from_before_a_transition_are_ignored() {
        let s = settings();
        let mut b = BreakerCore::new();
        let early = admit(&mut b, &s, 0).unwrap();
        for i in 1..5 {
            let g = admit(&mut b, &s, i).unwrap();
            b.record(&s, g, false, i);
        }
        assert_eq!(b.mode, BreakerMode::Open);
        let g = admit(&mut b, &s, 600 * MS).unwrap();
        // A request admitted while closed answers late: it must not close the breaker.
        assert_eq!(b.record(&s, early, true, 601 * MS), None);
        assert_eq!(b.mode, BreakerMode::HalfOpen);
        assert_eq!(b.record(&s, g, true, 602 * MS), None);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let s = settings();
        let mut b = BreakerCore::new();
        for i in 0..3 {
            let g = admit(&mut b, &s, i).unwrap();
            b.record(&s, g, false, i);
        }
        // 1.5 windows later the three failures are gone: one more is not enough.
        let g = admit(&mut b, &s, 1500 * MS).unwrap();
        assert_eq!(b.record(&s, g, false, 1500 * MS), None);
        assert_eq!(b.mode, BreakerMode::Closed);
    }

    #[test]
    fn a_dropped_probe_gives_its_slot_back() {
        let cfg = BreakerConfig {
            failure_ratio: 0.5,
            min_requests: 2,
            window: 10.0,
            open_for: 0.0,
            half_open_requests: 1,
            statuses: vec![(500, 599)],
        };
        let h = Arc::new(TargetHealth::new(
            "u",
            "t:1",
            &HealthConfig::default(),
            Some(&cfg),
        ));
        for _ in 0..2 {
            let t = h.admit(now_ns());
            h.report(Outcome::Status(502), t);
        }
        assert_eq!(h.breaker_mode(), Some(BreakerMode::Open));
        let probe = h.admit(now_ns());
        assert!(probe.is_some());
        assert_eq!(h.breaker_mode(), Some(BreakerMode::HalfOpen));
        assert_eq!(
            h.availability(now_ns()),
            Availability::Open,
            "the only probe slot is taken"
        );
        assert!(h.admit(now_ns()).is_none());
        drop(probe);
        assert!(h.admit(now_ns()).is_some(), "given back when dropped");
    }

    #[test]
    fn passive_marks_take_a_target_out_for_a_while_then_on_probation() {
        let cfg = HealthConfig {
            active: None,
            passive: Some(crate::config::PassiveHealthConfig {
                failures: 2,
                down_for: 0.05,
                statuses: vec![(503, 503)],
            }),
        };
        let h = TargetHealth::new("u", "127.0.0.1:1", &cfg, None);
        h.report(Outcome::Status(500), None); // not a configured status
        h.report(Outcome::Connect, None);
        assert_eq!(h.availability(now_ns()), Availability::Up);
        h.report(Outcome::Status(503), None);
        assert_eq!(h.availability(now_ns()), Availability::Passive);
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(h.availability(now_ns()), Availability::Up);
        // on probation: one failure is enough
        h.report(Outcome::Timeout, None);
        assert_eq!(h.availability(now_ns()), Availability::Passive);
    }
}
