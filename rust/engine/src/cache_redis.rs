//! The response cache's shared store: entries in Redis, so every worker of every node that
//! points at the same server sees the same responses (and a purge anywhere drops them for
//! all). Used instead of the worker's memory store when `cache.redis` is set.
//!
//! One Redis string per cache key (`ferrogate:cache:<key>`, the key starting with its purge
//! name), holding the last stored variant in a small binary form; it expires when the entry
//! can no longer be served (plus an hour when it has validators, to revalidate it). Redis
//! being slow or down makes lookups misses and stores no-ops: requests go to the upstream.

use crate::server::log_event;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PREFIX: &str = "ferrogate:cache:";

/// `cache.redis`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CacheRedisConfig {
    pub url: String,
    /// Seconds a Redis call may take before it counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_timeout() -> f64 {
    0.1
}

pub struct RedisStore {
    pub config: CacheRedisConfig,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    last_connect: Mutex<Option<Instant>>,
    last_report: Mutex<Option<Instant>>,
}

impl RedisStore {
    pub fn new(config: &CacheRedisConfig) -> Result<RedisStore, String> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(RedisStore {
            config: config.clone(),
            client,
            conn: tokio::sync::Mutex::new(None),
            last_connect: Mutex::new(None),
            last_report: Mutex::new(None),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.timeout.max(0.001))
    }

    /// The stored bytes of `key`; None when there are none or Redis did not answer.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let call = async {
            let mut conn = self.connection().await?;
            redis::cmd("GET")
                .arg(format!("{PREFIX}{key}"))
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        self.finish(call).await.flatten()
    }

    pub async fn put(&self, key: &str, value: &[u8], keep: Duration) {
        let call = async {
            let mut conn = self.connection().await?;
            redis::cmd("SET")
                .arg(format!("{PREFIX}{key}"))
                .arg(value)
                .arg("PX")
                .arg(keep.as_millis().max(1) as u64)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        self.finish(call).await;
    }

    /// Delete the entries whose purge name is `exact` or starts with `prefix`.
    pub async fn purge(&self, exact: Option<&str>, prefix: Option<&str>) {
        let pattern = match (exact, prefix) {
            (Some(e), _) => format!("{PREFIX}{}\n*", glob_escape(e)),
            (None, Some(p)) => format!("{PREFIX}{}*", glob_escape(p)),
            (None, None) => return,
        };
        let call = async {
            let mut conn = self.connection().await?;
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if !keys.is_empty() {
                    redis::cmd("DEL")
                        .arg(keys)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                if next == 0 {
                    return Ok::<(), String>(());
                }
                cursor = next;
            }
        };
        // A purge walks the key space: it gets more time than a lookup.
        match tokio::time::timeout(self.timeout() * 100, call).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.report(&e),
            Err(_) => self.report("the purge took too long"),
        }
    }

    async fn finish<T>(&self, call: impl std::future::Future<Output = Result<T, String>>) -> Option<T> {
        match tokio::time::timeout(self.timeout(), call).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.report(&e);
                None
            }
            Err(_) => {
                self.report(&format!("no answer within {:?}", self.timeout()));
                None
            }
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        {
            // After a failed connect, try again at most once a second.
            let mut last = self.last_connect.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("Redis is unreachable (retrying every second)".into());
            }
            *last = Some(Instant::now());
        }
        let conn = ConnectionManager::new(self.client.clone())
            .await
            .map_err(|e| e.to_string())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn report(&self, error: &str) {
        let mut last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return;
        }
        *last = Some(Instant::now());
        log_event(
            "error",
            "cache_store_unavailable",
            serde_json::json!({"url": redacted(&self.config.url), "error": error}),
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

/// `text` matched literally by a SCAN pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_literally() {
        assert_eq!(glob_escape("/a?b=[1]*"), "/a\\?b=\\[1\\]\\*");
        assert_eq!(redacted("redis://:pw@host:6379/0"), "redis://***@host:6379/0");
    }
}
