//! What the gateway tells about each request. `handle` starts one [`RequestRecord`] per
//! request when anything observes (nothing is allocated otherwise); the record is finished
//! when the response body is done or dropped (the client may have gone) and handed to the
//! worker's [`Observer`]: access log (`access_log.rs`), metrics (`metrics.rs`), analytics
//! (`analytics.rs`) and tracer (`trace.rs`). None of them blocks the request path: each
//! does a few counter updates or a bounded queue push, and the heavy work (formatting
//! files, exporting spans) happens off it.

use crate::access_log::AccessLog;
use crate::analytics::Analytics;
use crate::config::ObserveConfig;
use crate::metrics::Metrics;
use crate::phase::RequestCtx;
use crate::router::Route;
use crate::trace::{TraceContext, Tracer};
use http::{header, HeaderMap, HeaderValue, Method, Version};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Where this worker's observers keep their files, and who it is.
#[derive(Debug, Clone)]
pub struct ObserveEnv {
    pub worker_id: usize,
    /// The normalized config file the worker reads (`<stem>.runtime.json`); the metrics
    /// snapshot and analytics spool files sit beside it.
    pub runtime_path: PathBuf,
}

impl ObserveEnv {
    /// A file beside the runtime file: `<stem><suffix>`.
    pub fn beside(&self, suffix: &str) -> PathBuf {
        let name = self
            .runtime_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ferrogate.runtime.json");
        let stem = name.strip_suffix(".runtime.json").unwrap_or(name);
        self.runtime_path.with_file_name(format!("{stem}{suffix}"))
    }
}

/// How a request fared against the rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateOutcome {
    Allowed,
    Limited,
    /// The shared store could not be asked (the limit's policy decided).
    StoreUnavailable,
}

impl RateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RateOutcome::Allowed => "allowed",
            RateOutcome::Limited => "limited",
            RateOutcome::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Headers and bodies captured for the access log (opt-in), secrets already redacted.
#[derive(Debug, Default)]
pub struct Captured {
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub request_body: Option<bytes::Bytes>,
    pub response_body: Vec<u8>,
    /// Form-encoded bodies (their secrets are found by field name).
    pub request_form: bool,
    pub response_form: bool,
}

/// One request, as every observer sees it.
#[derive(Debug)]
pub struct RequestRecord {
    pub wall_start: SystemTime,
    pub started: Instant,
    pub request_id: HeaderValue,
    pub method: Method,
    pub version: Version,
    /// Path and query as the client sent them; only kept when an observer wants them.
    pub path: Option<String>,
    pub query: Option<String>,
    pub host: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub client_ip: HeaderValue,
    pub route: Option<Arc<Route>>,
    pub consumer: Option<String>,
    pub status: u16,
    /// The gateway's error code (`error.rs`) when the gateway answered with an error.
    pub error: Option<&'static str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The target that served the request, and how long its response head took.
    pub upstream: Option<Arc<str>>,
    pub upstream_time: Option<Duration>,
    /// Attempts made upstream (0: none; above 1: retried).
    pub tries: u32,
    pub rate_limit: Option<RateOutcome>,
    /// "hit", "miss", ... once a cache answers; None: no cache on the route.
    pub cache: Option<&'static str>,
    pub trace: Option<TraceContext>,
    pub capture: Option<Box<Captured>>,
    /// Until the body was done or dropped; set when finished.
    pub duration: Duration,
    /// Whether the whole response body was sent.
    pub completed: bool,
}

impl RequestRecord {
    pub fn route_name(&self) -> &str {
        self.route.as_deref().map_or("", |r| r.name.as_str())
    }
}

/// The observers of one worker for one config generation. Rebuilt on reload; observers
/// whose settings did not change are carried over (counters keep counting, the log
/// writer keeps its file).
#[derive(Default)]
pub struct Observer {
    pub access_log: Option<AccessLog>,
    pub metrics: Option<Arc<Metrics>>,
    pub analytics: Option<Arc<Analytics>>,
    pub tracer: Option<Arc<Tracer>>,
}

impl Observer {
    /// Build the observers `config` asks for. Starts their background work (threads,
    /// tasks on the current runtime), so call it from within the worker's runtime.
    pub fn build(
        config: &ObserveConfig,
        previous: Option<&Observer>,
        env: &ObserveEnv,
    ) -> Result<Observer, String> {
        let access_log = match &config.access_log {
            None => None,
            Some(c) => Some(AccessLog::start(
                c,
                previous.and_then(|p| p.access_log.as_ref()),
                env,
            )?),
        };
        let metrics = config
            .metrics
            .as_ref()
            .map(|c| Metrics::start(c, previous.and_then(|p| p.metrics.as_ref()), env));
        let analytics = config
            .analytics
            .as_ref()
            .map(|c| Analytics::start(c, previous.and_then(|p| p.analytics.as_ref()), env));
        let tracer = match &config.tracing {
            None => None,
            Some(c) => Some(Tracer::start(c, previous.and_then(|p| p.tracer.as_ref()), env)?),
        };
        Ok(Observer {
            access_log,
            metrics,
            analytics,
            tracer,
        })
    }

    pub fn is_on(&self) -> bool {
        self.access_log.is_some()
            || self.metrics.is_some()
            || self.analytics.is_some()
            || self.tracer.is_some()
    }

    /// The worker is stopping (its connections drained): write out what is still held.
    pub fn flush_at_exit(&self) {
        if let Some(a) = &self.analytics {
            a.flush();
        }
        if let Some(log) = &self.access_log {
            log.flush(Duration::from_secs(2));
        }
    }

    /// Start the record of a request (None when nothing observes). Also takes the
    /// request's trace context, which `forward` passes upstream.
    /// `trusted`: the proxies whose X-Forwarded-For tells the client's real address.
    pub fn start(
        &self,
        head: &http::request::Parts,
        ctx: &mut RequestCtx,
        trusted: &[ipnet::IpNet],
    ) -> Option<Box<RequestRecord>> {
        if let Some(tracer) = &self.tracer {
            ctx.trace = Some(tracer.context_for(&head.headers));
        }
        let sampled = ctx.trace.as_ref().is_some_and(|t| t.sampled);
        // The tracer wants the record of sampled requests only (others are just propagated).
        if self.access_log.is_none() && self.metrics.is_none() && self.analytics.is_none() && !sampled {
            return None;
        }
        let wants_text = self.access_log.is_some() || sampled;
        let capture = self
            .access_log
            .as_ref()
            .and_then(|log| log.capture_request(&head.headers));
        if let (Some(log), Some(_)) = (&self.access_log, &capture) {
            ctx.capture_body_cap = log.request_body_cap();
        }
        Some(Box::new(RequestRecord {
            wall_start: SystemTime::now(),
            started: Instant::now(),
            request_id: ctx.request_id.clone(),
            method: head.method.clone(),
            version: head.version,
            path: wants_text.then(|| head.uri.path().to_owned()),
            query: if wants_text {
                head.uri.query().map(str::to_owned)
            } else {
                None
            },
            host: if wants_text { host_of(head) } else { None },
            user_agent: if wants_text {
                head.headers.get(header::USER_AGENT).cloned()
            } else {
                None
            },
            // Behind a trusted proxy, the client it forwards for, as rate limits see it.
            client_ip: crate::limiter::real_client_ip(ctx.client.ip(), &head.headers, trusted)
                .and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok())
                .unwrap_or_else(|| ctx.client_ip.clone()),
            route: None,
            consumer: None,
            status: 0,
            error: None,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            upstream_time: None,
            tries: 0,
            rate_limit: None,
            cache: None,
            // Without a tracer, the client's trace id still goes to the access log.
            trace: match (&self.tracer, &self.access_log) {
                (None, Some(_)) => TraceContext::from_headers(&head.headers),
                _ => None,
            },
            capture,
            duration: Duration::ZERO,
            completed: false,
        }))
    }

    /// What the request's phases learned, once the response head is known.
    pub fn fill(
        &self,
        rec: &mut RequestRecord,
        ctx: &mut RequestCtx,
        status: u16,
        response_headers: &HeaderMap,
        error: Option<&'static str>,
    ) {
        rec.route = ctx.route.clone();
        rec.consumer = ctx.consumer.clone();
        rec.status = status;
        rec.error = error;
        rec.bytes_in = ctx.bytes_in;
        rec.upstream = ctx.upstream_target.take();
        rec.upstream_time = ctx.upstream_time;
        rec.tries = ctx.tries;
        rec.rate_limit = match error {
            Some("rate_limited") => Some(RateOutcome::Limited),
            Some("rate_limit_store_unavailable") => Some(RateOutcome::StoreUnavailable),
            _ => ctx.rate.as_ref().map(|_| RateOutcome::Allowed),
        };
        rec.cache = ctx.cache;
        if ctx.trace.is_some() {
            rec.trace = ctx.trace.take();
        }
        if let (Some(log), Some(cap)) = (&self.access_log, rec.capture.as_mut()) {
            log.capture_response(cap, response_headers);
            cap.request_body = ctx.captured_body.take();
        }
    }

    /// How many response body bytes the access log wants to capture (0: none).
    pub fn response_capture_cap(&self, rec: &RequestRecord) -> usize {
        match (&self.access_log, &rec.capture) {
            (Some(log), Some(_)) => log.response_body_cap(),
            _ => 0,
        }
    }

    /// The worker is exiting: let the observers hand on what they still hold, briefly.
    pub async fn shutdown(&self) {
        if let Some(t) = &self.tracer {
            t.shutdown(Duration::from_secs(2)).await;
        }
    }

    /// The request is over: hand its record to every observer.
    pub fn finish(&self, rec: RequestRecord) {
        if let Some(m) = &self.metrics {
            m.observe(&rec);
        }
        if let Some(a) = &self.analytics {
            a.observe(&rec);
        }
        if let Some(log) = &self.access_log {
            log.write(&rec);
        }
        // Last: a sampled record moves into the tracer's export queue as it is.
        if let Some(t) = &self.tracer {
            t.finish(rec);
        }
    }
}

fn host_of(head: &http::request::Parts) -> Option<HeaderValue> {
    match head.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => head
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// The status a request is logged with when the client went away before its response
/// head was known (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// A request until its response head is known, with its record. hyper drops the request's
/// future when the client goes away (while the upstream is still thinking, say): the record
/// is then finished with [`CLIENT_CLOSED`] and what the phases had learned.
pub struct Unanswered {
    pub ctx: RequestCtx,
    pub observer: Arc<Observer>,
    pub record: Option<Box<RequestRecord>>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut rec) = self.record.take() {
            self.observer
                .fill(&mut rec, &mut self.ctx, CLIENT_CLOSED, &HeaderMap::new(), None);
            drop(Finish {
                observer: self.observer.clone(),
                record: Some(rec),
                capture_left: 0,
            });
        }
    }
}

/// The end of a request: held by its response body, run when the body is done or dropped.
pub struct Finish {
    pub observer: Arc<Observer>,
    pub record: Option<Box<RequestRecord>>,
    /// Response body bytes still to copy into the captured body.
    pub capture_left: usize,
}

impl Finish {
    /// A data frame on its way to the client.
    #[inline]
    pub fn sent(&mut self, data: &[u8]) {
        if let Some(rec) = self.record.as_mut() {
            rec.bytes_out += data.len() as u64;
            if self.capture_left > 0 {
                if let Some(cap) = rec.capture.as_mut() {
                    let n = data.len().min(self.capture_left);
                    cap.response_body.extend_from_slice(&data[..n]);
                    self.capture_left -= n;
                }
            }
        }
    }

    pub fn done(&mut self) {
        if let Some(rec) = self.record.as_mut() {
            rec.completed = true;
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(mut rec) = self.record.take() {
            rec.duration = rec.started.elapsed();
            self.observer.finish(*rec);
        }
    }
}
