//! When a failed attempt is tried again ([`RetryPolicy`]), how long to wait first (exponential
//! backoff with full jitter), and how many retries an upstream may add to its traffic
//! ([`RetryBudget`]). The attempt loop itself is in `dispatch.rs`.

use crate::config::{ConfigProblem, RetryBudgetConfig, RetryConfig};
use crate::health::{Outcome, StatusSet};
use crate::upstream::secs;
use http::Method;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries after the first one.
    pub count: u32,
    pub on_connect: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    pub statuses: StatusSet,
    methods: Vec<Method>,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub body_buffer: u64,
}

/// What went wrong with an attempt, as far as retrying it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing reached the upstream (connect refused or timed out).
    Connect,
    /// The connection broke before any response byte; `sent` when the request head had
    /// been written (it may have been acted on).
    Reset {
        sent: bool,
    },
    Timeout,
    Status(u16),
    /// The response broke off mid-head or was not HTTP: the upstream had started answering,
    /// so this is never retried.
    Broken,
}

impl RetryPolicy {
    pub fn compile(c: &RetryConfig, at: &str) -> Result<RetryPolicy, ConfigProblem> {
        let mut p = RetryPolicy {
            count: c.count,
            on_connect: false,
            on_reset: false,
            on_timeout: false,
            statuses: StatusSet::from_ranges(&c.statuses),
            methods: Vec::new(),
            backoff: secs(c.backoff),
            backoff_max: secs(c.backoff_max.max(c.backoff)),
            body_buffer: c.body_buffer,
        };
        for (i, on) in c.on.iter().enumerate() {
            match on.as_str() {
                "connect" => p.on_connect = true,
                "reset" => p.on_reset = true,
                "timeout" => p.on_timeout = true,
                other => {
                    return Err(ConfigProblem::new(
                        format!("{at}.on[{i}]"),
                        format!("unknown retry condition '{other}' (connect, reset, timeout)"),
                    ))
                }
            }
        }
        for (i, m) in c.methods.iter().enumerate() {
            match Method::from_bytes(m.as_bytes()) {
                Ok(m) => p.methods.push(m),
                Err(_) => {
                    return Err(ConfigProblem::new(
                        format!("{at}.methods[{i}]"),
                        "not an HTTP method",
                    ))
                }
            }
        }
        Ok(p)
    }

    /// Whether `method` may be sent again once it may have reached the upstream.
    pub fn method_allowed(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// Whether a request of `method` may ever be retried after it was sent (then its body
    /// is worth keeping for a second send).
    pub fn may_resend(&self, method: &Method) -> bool {
        self.count > 0
            && (self.on_reset || self.on_timeout || !self.statuses.is_empty())
            && self.method_allowed(method)
    }

    /// Whether the policy retries `cause` for `method`. `body_replayable`: the request body
    /// was not touched yet, or was kept whole so it can be sent again.
    pub fn retries(&self, cause: Cause, method: &Method, body_replayable: bool) -> bool {
        match cause {
            // Nothing left the gateway: safe for every method.
            Cause::Connect => self.on_connect,
            Cause::Reset { sent: false } => self.on_reset && body_replayable,
            Cause::Reset { sent: true } => self.on_reset && body_replayable && self.method_allowed(method),
            Cause::Timeout => self.on_timeout && body_replayable && self.method_allowed(method),
            Cause::Status(s) => self.statuses.contains(s) && body_replayable && self.method_allowed(method),
            Cause::Broken => false,
        }
    }

    /// The wait before retry number `n` (1-based): uniform in [0, min(max, base * 2^(n-1))].
    pub fn delay(&self, n: u32, random: u64) -> Duration {
        if self.backoff.is_zero() {
            return Duration::ZERO;
        }
        let cap = self
            .backoff
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
            .min(self.backoff_max);
        let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
        cap.mul_f64(unit)
    }
}

impl Cause {
    /// The health outcome an attempt that failed this way reports.
    pub fn outcome(self) -> Outcome {
        match self {
            Cause::Connect => Outcome::Connect,
            Cause::Reset { .. } | Cause::Broken => Outcome::Broken,
            Cause::Timeout => Outcome::Timeout,
            Cause::Status(s) => Outcome::Status(s),
        }
    }
}

/// The window is this many buckets.
const BUCKETS: usize = 10;

#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// Retries may add at most `ratio` of the requests of the last `window`, plus
/// `min_per_second * window`: under a total outage, traffic grows by that much and no more.
/// Counted per worker and per upstream, in buckets of `window / 10`.
pub struct RetryBudget {
    pub config: RetryBudgetConfig,
    ratio: f64,
    reserve: f64,
    bucket_ns: u64,
    buckets: [Bucket; BUCKETS],
}

impl RetryBudget {
    pub fn new(config: &RetryBudgetConfig) -> Self {
        let window = secs(config.window).as_nanos().max(BUCKETS as u128) as u64;
        RetryBudget {
            config: config.clone(),
            ratio: config.ratio.max(0.0),
            reserve: config.min_per_second.max(0.0) * window as f64 / 1e9,
            bucket_ns: window / BUCKETS as u64,
            buckets: Default::default(),
        }
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let epoch = now / self.bucket_ns + 1; // 0 marks a bucket never used
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Ordering::Relaxed);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Count a request (its first attempt).
    #[inline]
    pub fn deposit(&self, now: u64) {
        self.bucket(now).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Take one retry from the budget; false when the budget is spent.
    pub fn withdraw(&self, now: u64) -> bool {
        let current = self.bucket(now);
        let epoch = now / self.bucket_ns + 1;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let e = b.epoch.load(Ordering::Relaxed);
            if e != 0 && e + BUCKETS as u64 > epoch && e <= epoch {
                requests += b.requests.load(Ordering::Relaxed) as u64;
                retries += b.retries.load(Ordering::Relaxed) as u64;
            }
        }
        if (retries + 1) as f64 > self.ratio * requests as f64 + self.reserve {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn policy(on: &[&str], statuses: Vec<(u16, u16)>) -> RetryPolicy {
        let c = RetryConfig {
            on: on.iter().map(|s| s.to_string()).collect(),
            statuses,
            ..RetryConfig::default()
        };
        RetryPolicy::compile(&c, "retries").unwrap()
    }

    #[test]
    fn connect_failures_are_retried_for_every_method() {
        let p = policy(&["connect"], vec![]);
        assert!(p.retries(Cause::Connect, &Method::POST, false));
        assert!(!p.retries(Cause::Timeout, &Method::GET, true));
        assert!(!p.retries(Cause::Reset { sent: true }, &Method::GET, true));
    }

    #[test]
    fn sent_requests_are_retried_only_for_listed_methods_with_a_replayable_body() {
        let p = policy(&["reset", "timeout"], vec![(503, 503)]);
        assert!(p.retries(Cause::Reset { sent: true }, &Method::GET, true));
        assert!(!p.retries(Cause::Reset { sent: true }, &Method::POST, true));
        assert!(p.retries(Cause::Reset { sent: false }, &Method::POST, true));
        assert!(!p.retries(Cause::Timeout, &Method::PUT, false));
        assert!(p.retries(Cause::Status(503), &Method::GET, true));
        assert!(!p.retries(Cause::Status(502), &Method::GET, true));
        assert!(p.may_resend(&Method::DELETE));
        assert!(!p.may_resend(&Method::PATCH));
        assert!(!policy(&["connect"], vec![]).may_resend(&Method::GET));
    }

    #[test]
    fn unknown_conditions_and_methods_are_problems() {
        let c = RetryConfig {
            on: vec!["connect".into(), "sometimes".into()],
            ..RetryConfig::default()
        };
        let e = RetryPolicy::compile(&c, "upstreams.a.retries").unwrap_err();
        assert_eq!(e.path, "upstreams.a.retries.on[1]");
    }

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_and_a_cap() {
        let p = policy(&["connect"], vec![]); // 25ms base, 250ms max
        let top = u64::MAX;
        assert!(p.delay(1, top) <= Duration::from_millis(25));
        assert!(p.delay(1, top) >= Duration::from_millis(24));
        assert!(p.delay(2, top) >= Duration::from_millis(49));
        assert!(p.delay(4, top) >= Duration::from_millis(199));
        assert!(p.delay(9, top) <= Duration::from_millis(250));
        assert_eq!(p.delay(3, 0), Duration::ZERO);
    }

    #[test]
    fn the_budget_allows_the_ratio_plus_the_reserve() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.2,
            window: 10.0,
            min_per_second: 0.5, // 5 over the window
        });
        let now = 100 * S;
        for _ in 0..100 {
            b.deposit(now);
        }
        let allowed = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(allowed, 25); // 20% of 100, plus 5
    }

    #[test]
    fn the_budget_forgets_requests_older_than_the_window() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.5,
            window: 10.0,
            min_per_second: 0.0,
        });
        for _ in 0..100 {
            b.deposit(5 * S);
        }
        assert!(b.withdraw(6 * S));
        // 11 s later the deposits are outside the window.
        assert!(!b.withdraw(17 * S));
        for _ in 0..10 {
            b.deposit(17 * S);
        }
        let allowed = (0..10).filter(|_| b.withdraw(17 * S)).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn the_reserve_alone_lets_a_few_retries_through_without_traffic() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.2,
            window: 10.0,
            min_per_second: 1.0,
        });
        let allowed = (0..100).filter(|_| b.withdraw(50 * S)).count();
        assert_eq!(allowed, 10);
    }
}
