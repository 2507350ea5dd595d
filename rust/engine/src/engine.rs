//! One compiled config: routes, upstreams, limits and the filter chain. A worker holds
//! the current `Engine` behind an `ArcSwap`; a reload builds a new one and swaps it in,
//! while requests already in flight finish on the one they started with.

use crate::cluster_limits::ClusterLimits;
use crate::config::{ConfigProblem, GatewayConfig, Limits};
use crate::filters::BodyLimit;
use crate::ip_restriction::{IpRestriction, IpRules};
use crate::limiter::{trusted_proxies, Limit};
use crate::phase::Filter;
use crate::plugins::PluginHost;
use crate::quota::Plan;
use crate::router::Router;
use crate::upstream::{secs, Upstream};
use ipnet::IpNet;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub struct Engine {
    pub router: Router,
    pub upstreams: Vec<Upstream>,
    pub limits: Limits,
    pub filters: Vec<Box<dyn Filter>>,
    /// The plugin chains of this config generation; None when no route has plugins (or
    /// when the config is only being checked).
    pub plugins: Option<Arc<dyn PluginHost>>,
    /// Limits on every route, and whether any limit (here or on a route) is keyed by who
    /// the client is (then limits are counted after the access plugins).
    pub global_limits: Vec<Limit>,
    pub trusted_proxies: Vec<IpNet>,
    /// Where cluster-wide limits count (kept across reloads while its settings stay).
    pub cluster_limits: Option<Arc<ClusterLimits>>,
    /// Each consumer's plan (consumers without one are not here).
    pub plans: HashMap<String, Arc<Plan>>,
    pub grace_period: Duration,
    pub client_idle: Duration,
    /// Slow-client deadlines: a whole request head, and each wait for more body (0: none).
    pub client_header: Duration,
    pub client_body: Duration,
    /// What the worker's observers are set to (`observe.rs`; they live in the worker).
    pub observe: crate::config::ObserveConfig,
    /// Consumers recognized by their client certificate (`mtls` credentials).
    pub mtls: crate::tls::MtlsIndex,
    /// The HTTPS listeners' settings (the worker's `tls::Terminator` follows them).
    pub tls: Option<crate::config::TlsConfig>,
    /// The web application firewall's rules per route, when the config enables it.
    pub waf: Option<Arc<crate::waf::Waf>>,
    /// The worker's response cache stores, handed from engine to engine on reload.
    pub cache: crate::cache::Stores,
    /// Response compression per route index; empty when no route compresses.
    pub compression: Vec<Option<Arc<crate::compress::Policy>>>,
    /// Static response headers and retired routes (API version lifecycle), by route index.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

fn compression_policies(config: &GatewayConfig) -> Vec<Option<Arc<crate::compress::Policy>>> {
    if config.routes.iter().all(|r| r.compression.is_none()) {
        return Vec::new();
    }
    let policies = config.routes.iter().map(|r| {
        r.compression
            .as_ref()
            .map(|c| Arc::new(crate::compress::Policy::new(c)))
    });
    policies.collect()
}

impl Engine {
    /// Compile `config`, reusing the connection pools of `previous` where they still fit.
    pub fn build(config: &GatewayConfig, previous: Option<&Engine>) -> Result<Engine, Vec<ConfigProblem>> {
        Engine::build_with(config, previous, None)
    }

    /// Like [`Engine::build`], with the plugin host built for the same config.
    pub fn build_with(
        config: &GatewayConfig,
        previous: Option<&Engine>,
        plugins: Option<Arc<dyn PluginHost>>,
    ) -> Result<Engine, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut upstreams = Vec::new();
        let mut index = HashMap::new();
        for (name, uc) in &config.upstreams {
            let reuse = |address: &str, settings: &_| {
                let old = previous?.upstreams.iter().find(|u| &u.name == name)?;
                let t = old
                    .targets
                    .iter()
                    .find(|t| t.address == address && &t.pool.settings == settings)?;
                Some(t.pool.clone())
            };
            // Health state (passive marks, breakers, the probe task) lives on while the
            // target's health settings stay the same.
            let reuse_health = |address: &str| {
                let old = previous?.upstreams.iter().find(|u| &u.name == name)?;
                let t = old.targets.iter().find(|t| {
                    t.address == address
                        && t.health.config == uc.health
                        && t.health.breaker_config == uc.breaker
                })?;
                Some(t.health.clone())
            };
            match Upstream::build(name, uc, &config.timeouts, &reuse, &reuse_health) {
                Ok(u) => {
                    index.insert(name.clone(), upstreams.len());
                    upstreams.push(u);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        for u in &mut upstreams {
            let Some(fallback) = u.fallback_name.as_deref() else {
                continue;
            };
            match index.get(fallback) {
                Some(&i) if fallback != u.name => {
                    u.fallback = Some(crate::upstream::Fallback::Upstream(i));
                }
                // It exists but did not compile: its own problems say why.
                None if fallback != u.name && config.upstreams.contains_key(fallback) => {}
                _ => problems.push(ConfigProblem::new(
                    format!("upstreams.{}.fallback.upstream", u.name),
                    format!("'{fallback}' is not another upstream"),
                )),
            }
        }
        let lookup = |n: &str| {
            index
                .get(n)
                .copied()
                .or_else(|| config.upstreams.contains_key(n).then_some(0))
        };
        let router = match Router::build(config, &lookup) {
            Ok(r) => Some(r),
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        let mut global_limits = Vec::new();
        for (j, l) in config.rate_limits.iter().enumerate() {
            match Limit::compile(l, &format!("rate_limits[{j}]")) {
                Ok(l) => global_limits.push(l),
                Err(p) => problems.push(p),
            }
        }
        let trusted = trusted_proxies(&config.trusted_proxies).unwrap_or_else(|mut p| {
            problems.append(&mut p);
            Vec::new()
        });
        let cluster_limits = match &config.rate_limiting.redis {
            None => None,
            Some(rc) => match previous
                .and_then(|p| p.cluster_limits.clone())
                .filter(|c| &c.config == rc)
            {
                Some(same) => Some(same),
                None => match ClusterLimits::new(rc) {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        problems.push(ConfigProblem::new("rate_limiting.redis.url", e));
                        None
                    }
                },
            },
        };
        let mut compiled = HashMap::new();
        for (name, plan) in &config.plans {
            match Plan::compile(name, plan) {
                Ok(p) => {
                    compiled.insert(name.clone(), Arc::new(p));
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        let mut plans = HashMap::new();
        for (consumer, c) in &config.consumers {
            if let Some(plan) = &c.plan {
                match compiled.get(plan) {
                    Some(p) => {
                        plans.insert(consumer.clone(), p.clone());
                    }
                    None => problems.push(ConfigProblem::new(
                        format!("consumers.{consumer}.plan"),
                        format!("unknown plan '{plan}'"),
                    )),
                }
            }
        }
        let global_ip = config.ip_restriction.as_ref().and_then(|c| {
            IpRules::compile(c, "ip_restriction")
                .map_err(|mut p| problems.append(&mut p))
                .ok()
        });
        // Compiled per config generation: a reload reads the rule files again.
        let waf = config.waf.as_ref().and_then(|w| {
            let routes: Vec<_> = config.routes.iter().map(|r| r.waf.as_ref()).collect();
            crate::waf::Waf::build(w, &routes)
                .map_err(|mut p| problems.append(&mut p))
                .ok()
                .map(Arc::new)
        });
        // The response cache's stores live on across reloads (entries, connections).
        let cache = crate::cache::Stores::build(&config.cache, previous.map(|p| &p.cache))
            .map_err(|e| problems.push(ConfigProblem::new("cache.redis.url", e)))
            .ok();
        let lifecycle = crate::lifecycle::Lifecycle::build(&config.routes)
            .map_err(|mut p| problems.append(&mut p))
            .map(Arc::new)
            .ok();
        if !problems.is_empty() {
            return Err(problems);
        }
        let lifecycle = lifecycle.expect("no problems means the lifecycle compiled");
        let mut filters: Vec<Box<dyn Filter>> = Vec::new();
        if config.limits.max_body_bytes > 0 {
            filters.push(Box::new(BodyLimit(config.limits.max_body_bytes)));
        }
        if lifecycle.refuses() {
            filters.push(Box::new(crate::lifecycle::RefusedRoutes(lifecycle.clone())));
        }
        if global_ip.is_some() || config.routes.iter().any(|r| r.ip_restriction.is_some()) {
            // First: a refused address costs no rate limit token and no plugin run.
            filters.insert(
                0,
                Box::new(IpRestriction {
                    global: global_ip,
                    trusted: trusted.clone(),
                }),
            );
        }
        Ok(Engine {
            router: router.expect("no problems means the router compiled"),
            upstreams,
            limits: config.limits.clone(),
            filters,
            plugins,
            global_limits,
            trusted_proxies: trusted,
            cluster_limits,
            plans,
            grace_period: secs(config.grace_period),
            client_idle: secs(config.timeouts.client_idle),
            client_header: secs(config.timeouts.client_header),
            client_body: secs(config.timeouts.client_body),
            observe: config.observe.clone(),
            mtls: crate::tls::MtlsIndex::build(&config.consumers),
            tls: config.tls.clone(),
            waf,
            cache: cache.expect("no problems means the cache stores were made"),
            compression: compression_policies(config),
            lifecycle,
        })
    }

    /// Start this worker's active health check tasks for targets that have none yet (a
    /// reload keeps the running ones of unchanged targets). Needs the tokio runtime.
    pub fn start_probes(&self, board: Option<&Arc<crate::probe::HealthBoard>>) {
        for u in &self.upstreams {
            for t in &u.targets {
                crate::probe::start(&t.health, board);
            }
        }
    }

    /// Problems with `config_json`, as the control plane shows them.
    pub fn check(config_json: &str) -> Vec<ConfigProblem> {
        match GatewayConfig::from_json(config_json) {
            Ok(cfg) => {
                let mut problems = Engine::build(&cfg, None).err().unwrap_or_default();
                // The certificate files are read here too, so `check` finds a bad one.
                if let Some(tls) = &cfg.tls {
                    problems.extend(crate::tls::check(tls));
                }
                problems
            }
            Err(e) => vec![ConfigProblem::new("", e)],
        }
    }
}
