//! Request mirroring (shadow traffic): a copy of a route's requests goes to another
//! upstream in a task of its own; its answer is read and dropped. The client never waits
//! for the mirror, and a slow or failing mirror cannot change what the client gets.
//!
//! A body is mirrored only when it is small and of known length (`max_body`): it is read
//! whole once and sent to both. Requests with larger or chunked bodies are not mirrored.

use crate::body::RequestBody;
use crate::config::{ConfigProblem, MirrorConfig};
use crate::engine::Engine;
use crate::forwarding::Forwarding;
use crate::headers::next_u64;
use crate::health::now_ns;
use crate::proxy::upstream_path_and_query;
use crate::server::log_event;
use bytes::Bytes;
use http::{header, request, Uri};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Mirror {
    pub upstream: usize,
    /// Out of 10,000 requests, how many are mirrored.
    per_10k: u64,
    pub max_body: u64,
}

/// Mirror failures logged so far by this worker (logged at most every few seconds).
static LAST_REPORT: AtomicU64 = AtomicU64::new(0);

impl Mirror {
    pub fn compile(
        at: &str,
        cfg: &MirrorConfig,
        upstream_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Mirror, ConfigProblem> {
        let upstream = upstream_index(&cfg.upstream).ok_or_else(|| {
            ConfigProblem::new(
                format!("{at}.mirror.upstream"),
                format!("unknown upstream '{}'", cfg.upstream),
            )
        })?;
        Ok(Mirror {
            upstream,
            per_10k: (cfg.percent.clamp(0.0, 100.0) * 100.0).round() as u64,
            max_body: cfg.max_body,
        })
    }

    /// Whether this request is one of the sampled ones.
    pub fn sampled(&self) -> bool {
        self.per_10k >= 10_000 || next_u64() % 10_000 < self.per_10k
    }

    /// Send a copy of `parts` (prepared for the upstream, before its target is chosen) with
    /// `body` to the mirror upstream, without waiting for it.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &self,
        engine: Arc<Engine>,
        parts: &request::Parts,
        body: Bytes,
        upstream_path: Option<String>,
        query: Option<&str>,
        preserve_host: bool,
        forwarding: &Forwarding,
    ) {
        let upstream_index = self.upstream;
        let mut copy = request::Request::new(());
        *copy.method_mut() = parts.method.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        forwarding.apply(copy.headers_mut());
        let (mut copy, ()) = copy.into_parts();
        let upstream = &engine.upstreams[upstream_index];
        let Ok(pq) = upstream_path_and_query(upstream, &parts.uri, upstream_path, query) else {
            return;
        };
        copy.uri = Uri::from(pq);
        tokio::spawn(async move {
            let upstream = &engine.upstreams[upstream_index];
            let Ok(picked) = upstream.pick(None, &[], now_ns()) else {
                report(&upstream.name, "no target is available");
                return;
            };
            if !preserve_host {
                copy.headers
                    .insert(header::HOST, picked.target.host_header.clone());
            }
            let mut body = RequestBody::buffered(body);
            let exchange = async {
                let resp = picked
                    .target
                    .pool
                    .send(&copy, &mut body)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                // Read to the end so the connection goes back to the pool.
                resp.into_body().collect().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            let limit = upstream.read_timeout.max(Duration::from_millis(1));
            match tokio::time::timeout(limit, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => report(&upstream.name, &e),
                Err(_) => report(&upstream.name, "timed out"),
            }
            drop(picked);
        });
    }
}

fn report(upstream: &str, error: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
    let last = LAST_REPORT.load(Ordering::Relaxed);
    if now < last + 5
        || LAST_REPORT
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    log_event(
        "warn",
        "mirror_failed",
        serde_json::json!({"upstream": upstream, "error": error}),
    );
}
