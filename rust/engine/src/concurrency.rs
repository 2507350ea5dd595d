//! Adaptive concurrency: how many requests an upstream may have in flight from this worker,
//! found by AIMD on its latency. While the latency stays near the best seen recently, the
//! limit grows by about one per round trip; when it rises past `tolerance` x that baseline,
//! the limit is cut by a tenth (at most once per baseline latency). Requests over the limit
//! are shed at once with 503, never queued: a slow upstream gets less work, not a queue.
//!
//! "The latency" is a moving average of the answers' latencies, not each answer's own: one
//! answer in the tail (a pause, jitter on a busy machine) is not congestion, and cutting a
//! tenth for each would hold the limit at a level set by the tail's share, not by the
//! upstream's load.

use crate::config::AdaptiveConfig;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    limit: f64,
    /// The best latency seen in the current baseline period.
    baseline: Option<Duration>,
    /// The best latency of the period being measured (becomes `baseline` when it ends).
    next_baseline: Option<Duration>,
    period_started: Instant,
    last_cut: Option<Instant>,
    /// Moving average of the latency (seconds), the signal compared with the baseline.
    recent: Option<f64>,
}

/// Weight of a new answer in the moving average: a sustained rise shows within a few
/// answers, a lone slow one moves the average by a fifth of its excess.
const RECENT_WEIGHT: f64 = 0.2;

#[derive(Debug)]
pub struct AdaptiveLimit {
    min: f64,
    max: f64,
    tolerance: f64,
    inflight: AtomicUsize,
    /// `limit` as a whole number, for the admission check without the lock.
    limit_now: AtomicU64,
    state: Mutex<State>,
}

/// The baseline is re-learned this often, so it follows an upstream that got slower for good.
const BASELINE_PERIOD: Duration = Duration::from_secs(10);

/// An admitted request; dropping it without `done` counts nothing (e.g. the client left).
pub struct Permit {
    limit: Arc<AdaptiveLimit>,
    started: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Permit {
    /// The response head arrived (or the attempt failed) after the time since admission.
    pub fn done(self, failed: bool) {
        let latency = self.started.elapsed();
        self.limit.observe(latency, failed, Instant::now());
    }
}

impl AdaptiveLimit {
    pub fn new(cfg: &AdaptiveConfig) -> Arc<AdaptiveLimit> {
        let min = f64::from(cfg.min.max(1));
        let max = f64::from(cfg.max.max(cfg.min.max(1)));
        let initial = f64::from(cfg.initial).clamp(min, max);
        Arc::new(AdaptiveLimit {
            min,
            max,
            tolerance: cfg.tolerance.max(1.0),
            inflight: AtomicUsize::new(0),
            limit_now: AtomicU64::new(initial as u64),
            state: Mutex::new(State {
                limit: initial,
                baseline: None,
                next_baseline: None,
                period_started: Instant::now(),
                last_cut: None,
                recent: None,
            }),
        })
    }

    /// A permit, or `None` when the upstream already has as many requests as it may.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit_now.load(Ordering::Relaxed) as usize;
        let before = self.inflight.fetch_add(1, Ordering::Relaxed);
        if before >= limit.max(1) {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit {
            limit: self.clone(),
            started: Instant::now(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit_now.load(Ordering::Relaxed)
    }

    fn observe(&self, latency: Duration, failed: bool, now: Instant) {
        let mut s = self.state.lock().expect("adaptive limit poisoned");
        if now.duration_since(s.period_started) >= BASELINE_PERIOD {
            s.baseline = s.next_baseline.take().or(s.baseline);
            s.period_started = now;
        }
        if !failed {
            s.next_baseline = Some(s.next_baseline.map_or(latency, |b| b.min(latency)));
            if s.baseline.is_none_or(|b| b > latency) {
                s.baseline = Some(latency);
            }
        }
        let baseline = s.baseline.unwrap_or(latency);
        let seconds = latency.as_secs_f64();
        let recent = s.recent.map_or(seconds, |r| r + RECENT_WEIGHT * (seconds - r));
        s.recent = Some(recent);
        let slow = failed || recent > baseline.as_secs_f64() * self.tolerance;
        if slow {
            // One cut per baseline round trip: a burst of slow answers is one signal.
            let gap = baseline.max(Duration::from_millis(1));
            if s.last_cut.is_none_or(|t| now.duration_since(t) >= gap) {
                s.limit = (s.limit * 0.9).max(self.min);
                s.last_cut = Some(now);
            }
        } else {
            s.limit = (s.limit + 1.0 / s.limit).min(self.max);
        }
        self.limit_now.store(s.limit.floor() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(initial: u32) -> Arc<AdaptiveLimit> {
        AdaptiveLimit::new(&AdaptiveConfig {
            min: 2,
            max: 100,
            initial,
            tolerance: 2.0,
        })
    }

    #[test]
    fn sheds_over_the_limit_instead_of_queueing() {
        let l = limiter(3);
        let permits: Vec<_> = (0..3).map(|_| l.try_acquire().unwrap()).collect();
        assert!(l.try_acquire().is_none());
        drop(permits);
        assert!(l.try_acquire().is_some());
    }

    #[test]
    fn slow_answers_shrink_the_limit_and_fast_ones_grow_it() {
        let l = limiter(50);
        let mut now = Instant::now();
        let fast = Duration::from_millis(2);
        for _ in 0..10 {
            l.observe(fast, false, now);
        }
        let grown = l.limit();
        assert!(grown >= 50);
        for _ in 0..20 {
            now += Duration::from_millis(10);
            l.observe(Duration::from_millis(40), false, now);
        }
        let shrunk = l.limit();
        assert!(shrunk < grown / 2, "{grown} -> {shrunk}");
        assert!(shrunk >= 2);
        for _ in 0..200 {
            l.observe(fast, false, now);
        }
        assert!(l.limit() > shrunk);
    }

    #[test]
    fn a_lone_slow_answer_is_not_congestion() {
        let l = limiter(10);
        let mut now = Instant::now();
        let fast = Duration::from_millis(2);
        for _ in 0..20 {
            now += Duration::from_millis(5);
            l.observe(fast, false, now);
        }
        let before = l.limit();
        // One answer at 3x the baseline (past the tolerance of 2) in a run of fast ones.
        now += Duration::from_millis(5);
        l.observe(Duration::from_millis(6), false, now);
        assert!(l.limit() >= before, "{before} -> {}", l.limit());
        // The same latency sustained is a rise: the limit comes down.
        for _ in 0..10 {
            now += Duration::from_millis(5);
            l.observe(Duration::from_millis(6), false, now);
        }
        assert!(l.limit() < before, "{before} -> {}", l.limit());
    }
}
