//! Upstreams: their targets, how one is chosen, and the keep-alive pools that reach them.

use crate::balancer::{Balancer, HashKey};
use crate::config::{ConfigProblem, HashSource, Timeouts, UpstreamConfig};
use crate::pool::{ConnPool, PoolSettings};
use http::uri::Authority;
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
    /// `host:port`, the Host header when a route does not preserve the client's.
    pub host_header: http::HeaderValue,
    pub weight: u32,
    pub stats: Arc<TargetStats>,
    pub pool: Arc<ConnPool>,
}

pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    weights: Vec<u32>,
    balancer: Balancer,
    pub read_timeout: Duration,
    pub path_prefix: String,
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
    ) -> Result<Upstream, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if cfg.targets.is_empty() {
            problems.push(ConfigProblem::new(
                format!("upstreams.{name}.targets"),
                "needs at least one target",
            ));
        }
        let (connect, read) = match &cfg.timeouts {
            Some(t) => (t.connect, t.read),
            None => (defaults.connect, defaults.read),
        };
        let settings = PoolSettings {
            keepalive: cfg.keepalive,
            keepalive_timeout: secs(cfg.keepalive_timeout),
            connect_timeout: secs(connect),
        };
        let mut targets = Vec::new();
        for (i, t) in cfg.targets.iter().enumerate() {
            match t.address.parse::<Authority>() {
                Ok(a) if a.port_u16().is_some() => targets.push(Target {
                    address: t.address.clone(),
                    host_header: http::HeaderValue::from_str(a.as_str())
                        .expect("an authority is a valid header value"),
                    weight: t.weight.max(1),
                    stats: Arc::default(),
                    pool: reuse(&t.address, &settings)
                        .unwrap_or_else(|| ConnPool::new(&t.address, settings.clone())),
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
        if !problems.is_empty() {
            return Err(problems);
        }
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        Ok(Upstream {
            name: name.to_string(),
            balancer: Balancer::new(cfg.balance, &weights, hash),
            weights,
            targets,
            read_timeout: secs(read),
            path_prefix: cfg.path_prefix.trim_end_matches('/').to_string(),
        })
    }

    pub fn hash_source(&self) -> Option<(HashSource, Option<&str>)> {
        self.balancer.hash_source()
    }

    /// Choose a target and take an in-flight slot on it.
    pub fn pick(&self, key: HashKey<'_>) -> (&Target, InflightGuard) {
        let i = if self.targets.len() == 1 {
            0
        } else {
            let inflight = |i: usize| self.targets[i].stats.inflight.load(Ordering::Relaxed);
            self.balancer.pick(&self.weights, &inflight, key)
        };
        let t = &self.targets[i];
        t.stats.inflight.fetch_add(1, Ordering::Relaxed);
        (t, InflightGuard(t.stats.clone()))
    }
}
