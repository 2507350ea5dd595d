//! Upstreams: their targets, how one is chosen, and the pooled keep-alive client that
//! reaches them.

use crate::balancer::{Balancer, HashKey};
use crate::body::RequestBody;
use crate::config::ConfigProblem;
use crate::config::{HashSource, Timeouts, UpstreamConfig};
use http::uri::Authority;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub type HttpClient = Client<HttpConnector, RequestBody>;

/// A target's live counters; shared with in-flight requests through [`InflightGuard`].
#[derive(Debug, Default)]
pub struct TargetStats {
    pub inflight: AtomicUsize,
}

#[derive(Debug)]
pub struct Target {
    pub address: String,
    pub authority: Authority,
    pub weight: u32,
    pub stats: Arc<TargetStats>,
}

/// Settings that shape a client's pool; a reload that keeps them keeps the pool warm.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
}

pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    weights: Vec<u32>,
    balancer: Balancer,
    pub client: HttpClient,
    pub pool: PoolSettings,
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
    /// Build an upstream; `reuse` returns a client from the previous config with the same
    /// pool settings, so a reload does not drop pooled connections.
    pub fn build(
        name: &str,
        cfg: &UpstreamConfig,
        defaults: &Timeouts,
        reuse: &dyn Fn(&str, &PoolSettings) -> Option<HttpClient>,
    ) -> Result<Upstream, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if cfg.targets.is_empty() {
            problems.push(ConfigProblem::new(
                format!("upstreams.{name}.targets"),
                "needs at least one target",
            ));
        }
        let mut targets = Vec::new();
        for (i, t) in cfg.targets.iter().enumerate() {
            match t.address.parse::<Authority>() {
                Ok(a) if a.port_u16().is_some() => targets.push(Target {
                    address: t.address.clone(),
                    authority: a,
                    weight: t.weight.max(1),
                    stats: Arc::default(),
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
        let (connect, read) = match &cfg.timeouts {
            Some(t) => (t.connect, t.read),
            None => (defaults.connect, defaults.read),
        };
        let pool = PoolSettings {
            keepalive: cfg.keepalive,
            keepalive_timeout: secs(cfg.keepalive_timeout),
            connect_timeout: secs(connect),
        };
        let client = reuse(name, &pool).unwrap_or_else(|| new_client(&pool));
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        Ok(Upstream {
            name: name.to_string(),
            balancer: Balancer::new(cfg.balance, &weights, hash),
            weights,
            targets,
            client,
            pool,
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

fn new_client(pool: &PoolSettings) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(pool.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool.keepalive_timeout)
        .pool_max_idle_per_host(pool.keepalive)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}
