//! Upstreams: their targets, how one is chosen, and the keep-alive pools that reach them.

use crate::balancer::{Balancer, HashKey};
use crate::config::{ConfigProblem, HashSource, RouteTimeouts, Timeouts, UpstreamConfig};
use crate::health::{Availability, BreakerTicket, TargetHealth};
use crate::pool::{AttemptTimeouts, ConnPool, PoolSettings};
use crate::retry::{RetryBudget, RetryPolicy};
use crate::upstream_tls::UpstreamTls;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A target's live counters; shared with in-flight requests through [`InflightGuard`].
#[derive(Debug, Default)]
pub struct TargetStats {
    pub inflight: AtomicUsize,
}

pub struct Target {
    pub address: String,
    /// The address again, shared cheaply with the records of the requests it serves.
    pub label: Arc<str>,
    /// `host:port`, the Host header when a route does not preserve the client's.
    pub host_header: http::HeaderValue,
    pub weight: u32,
    pub stats: Arc<TargetStats>,
    pub pool: Arc<ConnPool>,
    pub health: Arc<TargetHealth>,
}

/// An upstream's timeouts; a route may override each of them.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutSet {
    pub connect: Duration,
    pub read: Duration,
    /// None: no limit.
    pub write: Option<Duration>,
    pub total: Option<Duration>,
}

impl TimeoutSet {
    /// These timeouts with a route's overrides applied.
    pub fn with(&self, route: &RouteTimeoutSet) -> TimeoutSet {
        TimeoutSet {
            connect: route.connect.unwrap_or(self.connect),
            read: route.read.unwrap_or(self.read),
            write: route.write.unwrap_or(self.write),
            total: route.total.unwrap_or(self.total),
        }
    }

    pub fn attempt(&self) -> AttemptTimeouts {
        AttemptTimeouts {
            connect: self.connect,
            write: self.write,
            read: Some(self.read),
        }
    }
}

/// A route's timeout overrides (`Some(None)`: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteTimeoutSet {
    pub connect: Option<Duration>,
    pub read: Option<Duration>,
    pub write: Option<Option<Duration>>,
    pub total: Option<Option<Duration>>,
}

impl RouteTimeoutSet {
    pub fn from_config(c: &RouteTimeouts) -> Self {
        RouteTimeoutSet {
            connect: c.connect.map(secs),
            read: c.read.map(secs),
            write: c.write.map(limit),
            total: c.total.map(limit),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.connect.is_none() && self.read.is_none() && self.write.is_none() && self.total.is_none()
    }
}

/// Seconds where 0 means "no limit".
fn limit(s: f64) -> Option<Duration> {
    (s > 0.0).then(|| secs(s))
}

/// What a request gets when no target of its upstream can take it.
pub enum Fallback {
    /// Index of another upstream (resolved by the engine once all upstreams are built).
    Upstream(usize),
    Respond {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    weights: Vec<u32>,
    balancer: Balancer,
    pub timeouts: TimeoutSet,
    /// The read timeout (also how long the client may take to send its body).
    pub read_timeout: Duration,
    pub path_prefix: String,
    pub retries: RetryPolicy,
    /// Shared by every route of the upstream; None: retries are not limited.
    pub budget: Option<RetryBudget>,
    pub fallback: Option<Fallback>,
    /// The fallback upstream's name, until the engine resolves it.
    pub fallback_name: Option<String>,
    /// This worker's adaptive concurrency limit for the upstream, when configured.
    pub adaptive: Option<Arc<crate::concurrency::AdaptiveLimit>>,
}

/// Why no target could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTarget {
    /// Every target is down (active health checks).
    Down,
    /// Every target left is excluded by its circuit breaker.
    Open,
}

/// A target chosen for one attempt, with its in-flight slot and breaker ticket.
pub struct Picked<'u> {
    pub index: usize,
    pub target: &'u Target,
    pub guard: InflightGuard,
    pub ticket: Option<BreakerTicket>,
}

/// Holds a target's in-flight slot until dropped (when the response body ends).
pub struct InflightGuard(Arc<TargetStats>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl Upstream {
    /// Build an upstream; `reuse` returns a target's pool from the previous config when
    /// its settings did not change, so a reload keeps pooled connections warm.
    pub fn build(
        name: &str,
        cfg: &UpstreamConfig,
        defaults: &Timeouts,
        reuse: &dyn Fn(&str, &PoolSettings) -> Option<Arc<ConnPool>>,
        reuse_health: &dyn Fn(&str) -> Option<Arc<TargetHealth>>,
    ) -> Result<Upstream, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if cfg.targets.is_empty() {
            problems.push(ConfigProblem::new(
                format!("upstreams.{name}.targets"),
                "needs at least one target",
            ));
        }
        let (connect, read, write, total) = match &cfg.timeouts {
            Some(t) => (t.connect, t.read, t.write, t.total),
            None => (defaults.connect, defaults.read, defaults.write, defaults.total),
        };
        let settings = PoolSettings {
            keepalive: cfg.keepalive,
            keepalive_timeout: secs(cfg.keepalive_timeout),
            connect_timeout: secs(connect),
        };
        let tls = match &cfg.tls {
            None => None,
            Some(t) => UpstreamTls::build(t, &format!("upstreams.{name}.tls"))
                .map_err(|mut p| problems.append(&mut p))
                .ok(),
        };
        let mut targets = Vec::new();
        for (i, t) in cfg.targets.iter().enumerate() {
            let target_tls = match tls.as_ref().map(|tls| tls.for_target(&t.address)) {
                None => None,
                Some(Ok(tt)) => Some(tt),
                Some(Err(e)) => {
                    problems.push(ConfigProblem::new(
                        format!("upstreams.{name}.targets[{i}]"),
                        format!("cannot be reached over TLS: {e}"),
                    ));
                    continue;
                }
            };
            match t.address.parse::<Authority>() {
                Ok(a) if a.port_u16().is_some() => targets.push(Target {
                    address: t.address.clone(),
                    label: Arc::from(t.address.as_str()),
                    host_header: http::HeaderValue::from_str(a.as_str())
                        .expect("an authority is a valid header value"),
                    weight: t.weight.max(1),
                    stats: Arc::default(),
                    // A pool stays warm across a reload only with the same TLS settings and
                    // files: new ones apply to new connections.
                    pool: reuse(&t.address, &settings)
                        .filter(|p| p.tls == target_tls && p.is_http2() == cfg.http2)
                        .unwrap_or_else(|| {
                            if cfg.http2 {
                                ConnPool::http2(&t.address, settings.clone(), target_tls.clone())
                            } else {
                                ConnPool::with_tls(&t.address, settings.clone(), target_tls.clone())
                            }
                        }),
                    health: {
                        let health = reuse_health(&t.address).unwrap_or_else(|| {
                            Arc::new(TargetHealth::new(
                                name,
                                &t.address,
                                &cfg.health,
                                cfg.breaker.as_ref(),
                            ))
                        });
                        health.set_tls(target_tls);
                        health
                    },
                }),
                _ => problems.push(ConfigProblem::new(
                    format!("upstreams.{name}.targets[{i}]"),
                    format!("'{}' is not host:port", t.address),
                )),
            }
        }
        let hash = cfg.hash_on.as_ref().map(|h| (h.source, h.name.clone()));
        if let Some((src, None)) = &hash {
            if *src != HashSource::Ip {
                problems.push(ConfigProblem::new(
                    format!("upstreams.{name}.hash_on"),
                    "needs a header or cookie name",
                ));
            }
        }
        let retries = RetryPolicy::compile(&cfg.retries, &format!("upstreams.{name}.retries"))
            .map_err(|p| problems.push(p))
            .ok();
        let fallback = match &cfg.fallback {
            Some(f) if f.upstream.is_none() => {
                compile_fallback_response(f, &format!("upstreams.{name}.fallback"), &mut problems)
            }
            _ => None,
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        Ok(Upstream {
            name: name.to_string(),
            balancer: Balancer::new(cfg.balance, &weights, hash),
            weights,
            targets,
            timeouts: TimeoutSet {
                connect: secs(connect),
                read: secs(read),
                write: limit(write),
                total: limit(total),
            },
            read_timeout: secs(read),
            path_prefix: cfg.path_prefix.trim_end_matches('/').to_string(),
            retries: retries.expect("no problems means the policy compiled"),
            budget: cfg.retry_budget.as_ref().map(RetryBudget::new),
            fallback,
            fallback_name: cfg.fallback.as_ref().and_then(|f| f.upstream.clone()),
            adaptive: cfg
                .adaptive_concurrency
                .as_ref()
                .map(crate::concurrency::AdaptiveLimit::new),
        })
    }

    pub fn hash_source(&self) -> Option<(HashSource, Option<&str>)> {
        self.balancer.hash_source()
    }

    /// Choose a target for an attempt and take an in-flight slot on it. `tried` are the
    /// targets earlier attempts of the request used: another one is preferred. Targets the
    /// active check found down, and those whose breaker is open, are never chosen; targets
    /// marked down by passive checks only when nothing else is left (passive marks never
    /// take the last targets out: the traffic itself is then the only probe).
    pub fn pick(&self, key: HashKey<'_>, tried: &[usize], now: u64) -> Result<Picked<'_>, NoTarget> {
        let i = if self.targets.len() == 1 {
            match self.targets[0].health.availability(now) {
                Availability::Up | Availability::Passive => 0,
                Availability::Down => return Err(NoTarget::Down),
                Availability::Open => return Err(NoTarget::Open),
            }
        } else {
            self.choose(key, tried, now)?
        };
        let t = &self.targets[i];
        let ticket = if t.health.has_breaker() {
            Some(t.health.admit(now).ok_or(NoTarget::Open)?)
        } else {
            None
        };
        t.stats.inflight.fetch_add(1, Ordering::Relaxed);
        Ok(Picked {
            index: i,
            target: t,
            guard: InflightGuard(t.stats.clone()),
            ticket,
        })
    }

    fn choose(&self, key: HashKey<'_>, tried: &[usize], now: u64) -> Result<usize, NoTarget> {
        let inflight = |i: usize| self.targets[i].stats.inflight.load(Ordering::Relaxed);
        let avail = |i: usize| self.targets[i].health.availability(now);
        if tried.is_empty() {
            // The common case: a first attempt, and a target in rotation.
            let up = |i: usize| avail(i) == Availability::Up;
            if let Some(i) = self.balancer.pick(&self.weights, &inflight, key, &up) {
                return Ok(i);
            }
        }
        let fresh = |i: usize| !tried.contains(&i);
        // In rotation and not tried yet; then passively-down ones too; then tried ones.
        let passes: [&dyn Fn(usize) -> bool; 3] = [
            &|i| fresh(i) && avail(i) == Availability::Up,
            &|i| fresh(i) && matches!(avail(i), Availability::Up | Availability::Passive),
            &|i| matches!(avail(i), Availability::Up | Availability::Passive),
        ];
        let picked = match tried.last() {
            // (the first pass already ran above)
            None => passes[1..2]
                .iter()
                .find_map(|usable| self.balancer.pick(&self.weights, &inflight, key, *usable)),
            Some(&last) => passes.iter().find_map(|usable| {
                self.balancer
                    .pick_again(&self.weights, &inflight, key, *usable, last)
            }),
        };
        if let Some(i) = picked {
            return Ok(i);
        }
        let open = (0..self.targets.len()).any(|i| avail(i) == Availability::Open);
        Err(if open { NoTarget::Open } else { NoTarget::Down })
    }
}

fn compile_fallback_response(
    f: &crate::config::FallbackConfig,
    at: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<Fallback> {
    let status = match StatusCode::from_u16(f.status) {
        Ok(s) => s,
        Err(_) => {
            problems.push(ConfigProblem::new(format!("{at}.status"), "not an HTTP status"));
            return None;
        }
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &f.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => problems.push(ConfigProblem::new(
                format!("{at}.headers.{name}"),
                "not a valid header",
            )),
        }
    }
    Some(Fallback::Respond {
        status,
        headers,
        body: Bytes::from(f.body.clone()),
    })
}
