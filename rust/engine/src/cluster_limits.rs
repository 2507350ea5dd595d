//! Rate limits counted across gateway nodes, through Redis.
//!
//! Redis holds one counter per key and fixed window (`per`). A worker does not ask Redis
//! for every request: it takes a *lease* of a few tokens at a time (an atomic Lua script
//! grants at most what is left in the window) and spends them locally; only one request in
//! a lease's worth touches Redis. Redis never grants more than the limit, so nodes together
//! never admit more than the limit per window; what can be lost is the unspent part of the
//! leases that workers still hold when a window ends (at most `lease` tokens per worker and
//! key), which is why leases are small (1% of the limit by default).
//!
//! Redis unreachable: by policy the request passes (`open`) or gets a 503 (`closed`), never
//! an auth error; the event is logged (at most every few seconds) and the connection is
//! re-established on later requests, so limiting resumes by itself when Redis is back.

use crate::error::{ErrorKind, GatewayError};
use crate::server::log_event;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    Open,
    Closed,
}

/// `rate_limiting.redis` of the normalized config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RedisConfig {
    pub url: String,
    pub on_failure: OnFailure,
    /// Seconds one Redis call may take before it counts as a failure.
    pub timeout: f64,
    /// Fraction of a limit a worker leases at a time.
    pub lease: f64,
}

/// What a cluster limit said about one request.
pub struct ClusterVerdict {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_secs: u64,
}

#[derive(Default)]
struct Lease {
    window: u64,
    tokens: u64,
    /// Tokens Redis had handed out in this window at the last lease (all nodes).
    used: u64,
    /// Redis said the window is used up.
    exhausted: bool,
    /// A lease request in flight; others wait for it instead of asking too.
    fetching: Option<Arc<Notify>>,
}

/// Grants up to ARGV[2] tokens of a window of ARGV[1], returns {granted, used after}.
const LEASE_SCRIPT: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if grant <= 0 then return {0, used} end
used = redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {grant, used}
";

pub struct ClusterLimits {
    pub config: RedisConfig,
    client: redis::Client,
    script: redis::Script,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    leases: Mutex<HashMap<u64, Lease>>,
    last_connect: Mutex<Option<Instant>>,
    last_report: Mutex<Option<Instant>>,
}

impl ClusterLimits {
    pub fn new(config: &RedisConfig) -> Result<ClusterLimits, String> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(ClusterLimits {
            config: config.clone(),
            client,
            script: redis::Script::new(LEASE_SCRIPT),
            conn: tokio::sync::Mutex::new(None),
            leases: Mutex::new(HashMap::new()),
            last_connect: Mutex::new(None),
            last_report: Mutex::new(None),
        })
    }

    /// Count one request for `key` under `limit` per fixed window of `per_secs` seconds.
    pub async fn check(&self, key: u64, limit: u64, per_secs: u64) -> Result<ClusterVerdict, GatewayError> {
        let per = per_secs.max(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let window = now / per;
        self.check_window(key, limit, window, (window + 1) * per - now, per)
            .await
    }

    /// Count one request for `key` under `limit` in window number `window` (its counter
    /// lives `ttl_secs` x 2 in Redis), `reset_secs` before the window ends.
    pub async fn check_window(
        &self,
        key: u64,
        limit: u64,
        window: u64,
        reset_secs: u64,
        ttl_secs: u64,
    ) -> Result<ClusterVerdict, GatewayError> {
        let per = ttl_secs.max(1);
        let lease_size = ((limit as f64 * self.config.lease).ceil() as u64).clamp(1, limit.max(1));
        loop {
            let wait = {
                let mut leases = self.leases.lock().expect("lease table poisoned");
                if leases.len() > 100_000 {
                    leases.retain(|_, l| l.window >= window);
                }
                let lease = leases.entry(key).or_default();
                if lease.window != window {
                    *lease = Lease {
                        window,
                        ..Lease::default()
                    };
                }
                if lease.tokens > 0 {
                    lease.tokens -= 1;
                    return Ok(ClusterVerdict {
                        allowed: true,
                        remaining: limit.saturating_sub(lease.used) + lease.tokens,
                        reset_secs,
                    });
                }
                if lease.exhausted {
                    return Ok(ClusterVerdict {
                        allowed: false,
                        remaining: 0,
                        reset_secs,
                    });
                }
                match &lease.fetching {
                    Some(n) => Some(n.clone()),
                    None => {
                        lease.fetching = Some(Arc::new(Notify::new()));
                        None
                    }
                }
            };
            if let Some(notify) = wait {
                let notified = notify.notified();
                // The fetch may have finished between unlocking and here.
                if self.fetch_done(key, window) {
                    continue;
                }
                let _ = tokio::time::timeout(self.timeout() * 2, notified).await;
                continue;
            }
            let result = self.lease(key, window, limit, lease_size, per).await;
            let mut leases = self.leases.lock().expect("lease table poisoned");
            let lease = leases.entry(key).or_default();
            if let Some(n) = lease.fetching.take() {
                n.notify_waiters();
            }
            match result {
                Ok((granted, used)) if lease.window == window => {
                    lease.tokens += granted;
                    lease.used = used;
                    lease.exhausted = granted == 0;
                }
                Ok(_) => {}
                Err(e) => {
                    drop(leases);
                    self.report(&e);
                    return match self.config.on_failure {
                        OnFailure::Open => Ok(ClusterVerdict {
                            allowed: true,
                            remaining: limit,
                            reset_secs,
                        }),
                        OnFailure::Closed => Err(GatewayError::new(
                            ErrorKind::RateLimitStoreUnavailable,
                            "the shared rate limit store is unavailable",
                        )),
                    };
                }
            }
        }
    }

    fn fetch_done(&self, key: u64, window: u64) -> bool {
        let leases = self.leases.lock().expect("lease table poisoned");
        leases
            .get(&key)
            .is_none_or_matches(|l| l.fetching.is_none() || l.window != window)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.timeout.max(0.001))
    }

    /// One lease from Redis: `(granted, used in the window after it)`.
    async fn lease(
        &self,
        key: u64,
        window: u64,
        limit: u64,
        want: u64,
        per: u64,
    ) -> Result<(u64, u64), String> {
        let redis_key = format!("ferrogate:rl:{key:016x}:{window}");
        let call = async {
            let mut conn = self.connection().await?;
            self.script
                .key(redis_key)
                .arg(limit)
                .arg(want)
                .arg(per * 2000)
                .invoke_async::<(u64, u64)>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout(), call).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout())),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        {
            // After a failed connect, try again at most once a second.
            let mut last = self.last_connect.lock().expect("poisoned");
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("Redis is unreachable (retrying every second)".into());
            }
            *last = Some(Instant::now());
        }
        let conn = ConnectionManager::new(self.client.clone())
            .await
            .map_err(|e| e.to_string())?;
        *slot = Some(conn.clone());
        log_event(
            "info",
            "rate_limit_store_connected",
            serde_json::json!({"url": redacted(&self.config.url)}),
        );
        Ok(conn)
    }

    fn report(&self, error: &str) {
        let mut last = self.last_report.lock().expect("poisoned");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return;
        }
        *last = Some(Instant::now());
        log_event(
            "error",
            "rate_limit_store_unavailable",
            serde_json::json!({
                "url": redacted(&self.config.url),
                "error": error,
                "policy": match self.config.on_failure { OnFailure::Open => "open", OnFailure::Closed => "closed" },
            }),
        );
    }
}

/// The URL without a password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

trait OptionExt<T> {
    fn is_none_or_matches(&self, f: impl FnOnce(&T) -> bool) -> bool;
}

impl<T> OptionExt<T> for Option<&T> {
    fn is_none_or_matches(&self, f: impl FnOnce(&T) -> bool) -> bool {
        match self {
            None => true,
            Some(v) => f(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
