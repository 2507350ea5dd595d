//! The access-phase rate limiter: compiled limits, their keys, and the answer they give
//! (429 with Retry-After, RateLimit-* headers on every response of a limited route).
//! Counting itself happens in the node-wide table of `ratelimit.rs`.

use crate::cluster_limits::ClusterLimits;
use crate::config::{ConfigProblem, KeySource, RateLimitConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::ratelimit::SharedTable;
use crate::shm::monotonic_ns;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use std::net::IpAddr;

pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// One compiled limit.
#[derive(Debug)]
pub struct Limit {
    id: u64,
    limit: u64,
    per_secs: f64,
    interval_ns: u64,
    burst: u64,
    key: Vec<(KeySource, Option<HeaderName>)>,
    /// Counted across nodes (Redis, fixed windows) instead of in the node's table.
    pub cluster: bool,
}

impl Limit {
    /// `at` locates the limit in the config (`routes[2].rate_limits[0]`) for problems.
    pub fn compile(cfg: &RateLimitConfig, at: &str) -> Result<Limit, ConfigProblem> {
        let interval = cfg.per * 1e9 / cfg.limit.max(1) as f64;
        if cfg.limit == 0 || interval.is_nan() || interval < 1.0 || !cfg.per.is_finite() {
            return Err(ConfigProblem::new(
                at,
                format!("{} per {}s is not a rate that can be counted", cfg.limit, cfg.per),
            ));
        }
        let mut key = Vec::new();
        for (j, k) in cfg.key.iter().enumerate() {
            let name = match (k.source, &k.name) {
                (KeySource::Header, Some(n)) => Some(HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                    ConfigProblem::new(
                        format!("{at}.key[{j}]"),
                        format!("'{n}' is not a valid header name"),
                    )
                })?),
                (KeySource::Header, None) => {
                    return Err(ConfigProblem::new(
                        format!("{at}.key[{j}]"),
                        "a header key needs a name",
                    ))
                }
                _ => None,
            };
            key.push((k.source, name));
        }
        Ok(Limit {
            id: fnv(FNV_OFFSET, cfg.id.as_bytes()),
            limit: cfg.limit,
            per_secs: cfg.per,
            interval_ns: interval as u64,
            burst: cfg.burst.max(1),
            key,
            cluster: cfg.cluster,
        })
    }

    /// Whether counting needs to know who the client is (set by an auth plugin).
    pub fn needs_consumer(&self) -> bool {
        self.key
            .iter()
            .any(|(s, _)| matches!(s, KeySource::Consumer | KeySource::Credential))
    }

    pub fn key_hash(&self, who: &Who<'_>) -> u64 {
        let mut h = fnv(FNV_OFFSET, &self.id.to_le_bytes());
        for (source, name) in &self.key {
            // An absent consumer, credential or header counts against the client's address.
            let part: &[u8] = match source {
                KeySource::Ip => who.ip.as_bytes(),
                KeySource::Route => who.route.as_bytes(),
                KeySource::Consumer => who.consumer.map_or(who.ip.as_bytes(), str::as_bytes),
                KeySource::Credential => who.credential.map_or(who.ip.as_bytes(), str::as_bytes),
                KeySource::Header => name
                    .as_ref()
                    .and_then(|n| who.headers.get(n))
                    .map_or(who.ip.as_bytes(), HeaderValue::as_bytes),
            };
            h = fnv(h, &[*source as u8]);
            h = fnv(h, part);
            h = fnv(h, &[0xff]);
        }
        h
    }
}

/// What identifies a request to its limits.
pub struct Who<'a> {
    pub ip: &'a str,
    pub route: &'a str,
    pub consumer: Option<&'a str>,
    pub credential: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The most restrictive limit's state, for the RateLimit-* headers.
#[derive(Debug, Clone, Copy)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
    pub retry_after_secs: u64,
}

impl RateInfo {
    pub fn apply(&self, headers: &mut HeaderMap, status: http::StatusCode) {
        headers.insert(&RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(&RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(&RATELIMIT_RESET, HeaderValue::from(self.reset_secs));
        if status == http::StatusCode::TOO_MANY_REQUESTS && self.retry_after_secs > 0 {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs),
            );
        }
    }
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// Count the request against the cluster-wide limits (after the node's allowed it).
pub async fn check_cluster<'l>(
    cluster: &ClusterLimits,
    limits: impl Iterator<Item = &'l Limit>,
    who: &Who<'_>,
    shown: &mut Option<RateInfo>,
) -> Result<(), GatewayError> {
    for limit in limits {
        let per = limit.per_secs.round().max(1.0) as u64;
        let v = cluster.check(limit.key_hash(who), limit.limit, per).await?;
        let info = RateInfo {
            limit: limit.limit,
            remaining: v.remaining.min(limit.limit),
            reset_secs: v.reset_secs,
            retry_after_secs: if v.allowed { 0 } else { v.reset_secs.max(1) },
        };
        if !v.allowed {
            *shown = Some(info);
            return Err(GatewayError::new(
                ErrorKind::RateLimited,
                format!(
                    "rate limit exceeded: {} per {}s across the cluster; retry in {}s",
                    limit.limit, limit.per_secs, info.retry_after_secs
                ),
            ));
        }
        if leaves_fewer(shown, &info) {
            *shown = Some(info);
        }
    }
    Ok(())
}

/// Count the request against every limit; refused by any, it gets a 429.
pub fn check<'l>(
    table: &SharedTable,
    limits: impl Iterator<Item = &'l Limit>,
    who: &Who<'_>,
) -> (Option<RateInfo>, Result<(), GatewayError>) {
    let now = monotonic_ns();
    let mut shown: Option<RateInfo> = None;
    let mut refused: Option<(&Limit, RateInfo)> = None;
    for limit in limits {
        let v = table.check(limit.key_hash(who), now, limit.interval_ns, limit.burst);
        let info = RateInfo {
            limit: limit.limit,
            remaining: v.remaining.min(limit.limit),
            reset_secs: ceil_secs(v.reset_ns),
            retry_after_secs: ceil_secs(v.retry_after_ns),
        };
        if !v.allowed && refused.is_none() {
            refused = Some((limit, info));
        }
        if leaves_fewer(&shown, &info) {
            shown = Some(info);
        }
    }
    match refused {
        None => (shown, Ok(())),
        Some((limit, info)) => (
            Some(info),
            Err(GatewayError::new(
                ErrorKind::RateLimited,
                format!(
                    "rate limit exceeded: {} per {}s; retry in {}s",
                    limit.limit, limit.per_secs, info.retry_after_secs
                ),
            )),
        ),
    }
}

/// True when `info` leaves fewer requests than what `shown` holds (or nothing is shown).
pub fn leaves_fewer(shown: &Option<RateInfo>, info: &RateInfo) -> bool {
    match shown {
        None => true,
        Some(s) => info.remaining < s.remaining,
    }
}

/// A stable hash of a name (the same in every process and node).
pub fn hash_str(text: &str) -> u64 {
    fnv(FNV_OFFSET, text.as_bytes())
}

/// A stable hash of `seed` and `parts`, each part delimited.
pub fn hash_parts(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = fnv(FNV_OFFSET, &seed.to_le_bytes());
    for p in parts {
        h = fnv(h, p);
        h = fnv(h, &[0xff]);
    }
    h
}

/// Parse the trusted proxy list (CIDRs or single addresses).
pub fn trusted_proxies(list: &[String]) -> Result<Vec<IpNet>, Vec<ConfigProblem>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, text) in list.iter().enumerate() {
        match text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        {
            Ok(net) => out.push(net),
            Err(_) => problems.push(ConfigProblem::new(
                format!("trusted_proxies[{i}]"),
                format!("'{text}' is not an address or CIDR"),
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most address of X-Forwarded-For that is not itself a trusted proxy.
pub fn real_client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return None;
    }
    let mut last = None;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            // An unparseable hop ends what can be believed.
            return last;
        };
        if !is_trusted(&ip) {
            return Some(ip);
        }
        last = Some(ip);
    }
    last
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: the same key hashes the same in every worker process (unlike std's SipHash,
/// which is keyed per process).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitKey;

    fn limit(key: Vec<LimitKey>) -> Limit {
        Limit::compile(
            &RateLimitConfig {
                id: "r|0".into(),
                limit: 2,
                per: 60.0,
                burst: 2,
                key,
                cluster: false,
            },
            "routes[0].rate_limits[0]",
        )
        .unwrap()
    }

    fn who<'a>(ip: &'a str, consumer: Option<&'a str>, headers: &'a HeaderMap) -> Who<'a> {
        Who {
            ip,
            route: "r",
            consumer,
            credential: None,
            headers,
        }
    }

    #[test]
    fn keys_separate_clients_and_fall_back_to_the_address() {
        let h = HeaderMap::new();
        let by_consumer = limit(vec![LimitKey {
            source: KeySource::Consumer,
            name: None,
        }]);
        assert!(by_consumer.needs_consumer());
        let a = by_consumer.key_hash(&who("10.0.0.1", Some("alice"), &h));
        let a2 = by_consumer.key_hash(&who("10.0.0.2", Some("alice"), &h));
        let anon = by_consumer.key_hash(&who("10.0.0.1", None, &h));
        assert_eq!(a, a2);
        assert_ne!(a, anon);
        assert_eq!(anon, by_consumer.key_hash(&who("10.0.0.1", None, &h)));
    }

    #[test]
    fn the_most_restrictive_limit_is_shown_and_any_refusal_is_a_429() {
        let table = SharedTable::anonymous(64).unwrap();
        let h = HeaderMap::new();
        let ip = limit(vec![LimitKey {
            source: KeySource::Ip,
            name: None,
        }]);
        let w = who("10.0.0.9", None, &h);
        let (info, ok) = check(&table, [&ip].into_iter(), &w);
        assert!(ok.is_ok());
        assert_eq!(info.unwrap().remaining, 1);
        let _ = check(&table, [&ip].into_iter(), &w);
        let (info, refused) = check(&table, [&ip].into_iter(), &w);
        let info = info.unwrap();
        assert_eq!(refused.unwrap_err().kind, ErrorKind::RateLimited);
        assert_eq!((info.remaining, info.retry_after_secs), (0, 30));
    }

    #[test]
    fn the_client_behind_trusted_proxies_is_found() {
        let trusted = trusted_proxies(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.7, 10.1.1.1".parse().unwrap(),
        );
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        // the right-most untrusted hop, not a client-supplied left-most one
        assert_eq!(
            real_client_ip(proxy, &h, &trusted),
            Some("203.0.113.7".parse().unwrap())
        );
        // an untrusted peer's header is not believed
        assert_eq!(
            real_client_ip("198.51.100.1".parse().unwrap(), &h, &trusted),
            None
        );
        assert!(trusted_proxies(&["nonsense".into()]).is_err());
    }
}
