//! The boundary between the request path and a route's plugin chain. The engine knows
//! only this trait; the Python host behind it lives in the binding crate, so routes
//! without plugins never touch Python.
//!
//! One call crosses per phase per request, whatever the number of plugins: the host runs
//! the whole chain for that phase and hands back one decision.

use crate::error::GatewayError;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use std::any::Any;
use std::future::Future;
use std::pin::Pin;

/// How a phase's hooks run: inline on the worker's thread, or on the host's event loop
/// (the request waits without blocking the worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookMode {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BodyMode {
    #[default]
    None,
    Buffered,
    Streamed,
}

/// What a route's chain takes part in, decided by the control plane from the plugins'
/// declared hooks (`routes[].plugins` of the normalized config).
#[derive(Debug, Clone, Deserialize)]
pub struct ChainSpec {
    pub chain: u32,
    /// The access crossing always happens: it also creates the request's plugin state.
    pub request: HookMode,
    #[serde(default)]
    pub request_body: bool,
    #[serde(default)]
    pub response: Option<HookMode>,
    #[serde(default)]
    pub response_body: BodyMode,
    #[serde(default)]
    pub log: bool,
    /// Largest buffered body (request or response) in bytes; 0 = no buffering.
    #[serde(default)]
    pub body_cap: u64,
}

impl ChainSpec {
    /// Whether the response head crosses: for `on_response` hooks, and to give body hooks
    /// the response they belong to.
    pub fn crosses_response(&self) -> bool {
        self.response.is_some() || self.response_body != BodyMode::None
    }
}

/// The request as the chain sees it in the access phase.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Option<&'a Bytes>,
    pub request_id: &'a str,
    pub client_ip: &'a str,
    pub route: &'a str,
    pub host: &'a str,
    pub scheme: &'a str,
    pub http_version: &'a str,
    /// The request's trace when it is sampled: plugin hook spans are children of its
    /// server span.
    pub trace: Option<&'a crate::trace::TraceContext>,
    /// Who the request is from when the data plane already knows (a client certificate an
    /// `mtls` credential names), and which credential that was.
    pub consumer: Option<&'a str>,
    pub credential: Option<&'a str>,
}

/// How the chain changed a header map. Only the order of fields of one name carries
/// meaning in HTTP (and in `HeaderMap`), so a change is exact when every name it touches
/// is dropped whole and that name's new fields are appended in order.
#[derive(Debug, PartialEq)]
pub enum HeaderEdits {
    /// The whole new set of fields.
    Replace(HeaderMap),
    /// Every field of each `remove` name goes, then `add` is appended in order; names
    /// that neither list touches keep their fields as they were.
    Diff {
        remove: Vec<HeaderName>,
        add: Vec<(HeaderName, HeaderValue)>,
    },
}

impl HeaderEdits {
    pub fn apply(self, headers: &mut HeaderMap) {
        match self {
            HeaderEdits::Replace(map) => *headers = map,
            HeaderEdits::Diff { remove, add } => {
                for name in &remove {
                    headers.remove(name);
                }
                for (name, value) in add {
                    headers.append(name, value);
                }
            }
        }
    }
}

/// Changes the chain made to the request; `None` fields are unchanged.
#[derive(Debug, Default)]
pub struct RequestEdits {
    pub method: Option<Method>,
    pub path: Option<String>,
    pub query: Option<String>,
    pub headers: Option<HeaderEdits>,
    pub body: Option<Bytes>,
    /// Who the request is from, as an authentication plugin established it.
    pub consumer: Option<String>,
    pub credential: Option<String>,
    /// Where the request goes and how its answer comes back, when a plugin said so
    /// (boxed: most requests carry none).
    pub routing: Option<Box<Routing>>,
}

/// `req.upstream`, `req.fallbacks`/`req.fallback_on` and `req.response_body_mode`.
#[derive(Debug, Default)]
pub struct Routing {
    /// A configured upstream's name, instead of the route's.
    pub upstream: Option<String>,
    /// Sent in order after the request when it fails (see `fallback_on`).
    pub fallbacks: Vec<Attempt>,
    /// Statuses that make the next attempt go out; None: 429 and 500-599.
    pub fallback_on: Option<Vec<u16>>,
    /// The body mode of this response, for chains whose plugins offer both.
    pub body_mode: Option<BodyMode>,
}

impl Routing {
    /// Whether an answer with `status` is given up on for the next attempt.
    pub fn falls_back_on(&self, status: u16) -> bool {
        match &self.fallback_on {
            None => status == 429 || (500..=599).contains(&status),
            Some(list) => list.contains(&status),
        }
    }
}

/// One fallback attempt: the whole request to send instead (the engine adds its own
/// headers: X-Request-Id, Via, X-Forwarded-*, traceparent, Host).
#[derive(Debug)]
pub struct Attempt {
    pub upstream: String,
    /// None: the method of the request before it.
    pub method: Option<Method>,
    /// Path, optionally with `?query`; None: the request's upstream path.
    pub path: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which attempt answered a request that had fallbacks, and the ones given up on
/// (`(upstream, status)`, status 0: no answer), for the response hooks and the log.
#[derive(Debug, Clone, Default)]
pub struct FellBack {
    pub attempt: u32,
    pub skipped: Vec<(String, u16)>,
}

/// A response a plugin answers with instead of the upstream.
#[derive(Debug)]
pub struct EarlyResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Who the request was from, if a plugin had said so before answering (for the log
    /// and metrics); `None` leaves what the data plane knew.
    pub consumer: Option<String>,
    pub credential: Option<String>,
}

#[derive(Debug)]
pub enum RequestDecision {
    Continue(RequestEdits),
    Respond(EarlyResponse),
}

/// Changes the chain made to the response head.
#[derive(Debug, Default)]
pub struct ResponseEdits {
    pub status: Option<StatusCode>,
    pub headers: Option<HeaderEdits>,
}

/// The host's per-request state (the plugins' view of the request and its `ctx`), opaque
/// to the engine; it travels with the request through every phase.
pub type PluginState = Box<dyn Any + Send + Sync>;

pub type HookResult<T> = Result<T, GatewayError>;

/// A phase's answer: at once (sync hooks) or later (async hooks on the host's loop).
pub enum Hook<T> {
    Ready(HookResult<T>),
    Pending(Pin<Box<dyn Future<Output = HookResult<T>> + Send>>),
}

impl<T> Hook<T> {
    pub async fn wait(self) -> HookResult<T> {
        match self {
            Hook::Ready(r) => r,
            Hook::Pending(f) => f.await,
        }
    }
}

/// What the log phase is told about a finished request.
pub struct LogRecord {
    pub chain: u32,
    pub state: PluginState,
    pub status: u16,
    pub bytes_sent: u64,
    pub duration: f64,
    pub upstream: Option<String>,
    pub error: Option<String>,
}

/// A config generation's plugin chains. Calls arrive on the worker's thread.
pub trait PluginHost: Send + Sync {
    /// Access phase. Creates the request's state (returned even when the chain fails, so
    /// that later phases and the log see the request).
    fn on_request(
        &self,
        chain: u32,
        mode: HookMode,
        view: &RequestView<'_>,
    ) -> (Option<PluginState>, Hook<RequestDecision>);

    /// Response head, the upstream's or an early answer; `fell_back` for a request that
    /// had fallbacks and used one (or gave up on some).
    fn on_response(
        &self,
        chain: u32,
        mode: HookMode,
        state: &PluginState,
        status: StatusCode,
        headers: &HeaderMap,
        fell_back: Option<&FellBack>,
    ) -> Hook<ResponseEdits>;

    /// The whole response body (buffered mode) and its trailers, if any; may change the
    /// head too.
    fn on_response_body(
        &self,
        chain: u32,
        state: &PluginState,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> HookResult<(ResponseEdits, Bytes)>;

    /// `on_response` (sync) and `on_response_body` in one crossing, for a buffered body:
    /// the head's hooks run first and the body's hooks see their edits, as if called
    /// one after the other. Saves a crossing per request on such routes.
    #[allow(clippy::too_many_arguments)]
    fn on_response_whole(
        &self,
        chain: u32,
        state: &PluginState,
        status: StatusCode,
        headers: &HeaderMap,
        fell_back: Option<&FellBack>,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> HookResult<(ResponseEdits, Bytes)>;

    /// One chunk of a streamed response body; `last` marks the final one.
    fn on_response_chunk(
        &self,
        chain: u32,
        state: &PluginState,
        chunk: Bytes,
        last: bool,
    ) -> HookResult<Bytes>;

    /// Queue a finished request for the log phase; must not block.
    fn log(&self, record: LogRecord);
}

/// Builds each config generation's plugin host from the normalized config text (the
/// binding crate implements it with the Python plugin host).
pub trait HostLoader: Send + Sync {
    fn load(&self, config_json: &str) -> Result<Option<std::sync::Arc<dyn PluginHost>>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_specs_decode_from_the_normalized_config() {
        let spec: ChainSpec = serde_json::from_str(
            r#"{"chain": 3, "request": "async", "request_body": true, "response": null,
                "response_body": "streamed", "log": true, "body_cap": 1024, "entries": []}"#,
        )
        .unwrap();
        assert_eq!(spec.chain, 3);
        assert_eq!(spec.request, HookMode::Async);
        assert!(spec.request_body && spec.log);
        assert_eq!(spec.response_body, BodyMode::Streamed);
        // a body hook needs the response head even without on_response hooks
        assert!(spec.crosses_response());
        let minimal: ChainSpec = serde_json::from_str(r#"{"chain": 0, "request": "sync"}"#).unwrap();
        assert!(!minimal.crosses_response());
        assert_eq!(minimal.body_cap, 0);
    }

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in fields {
            m.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn diff(remove: &[&str], add: &[(&str, &str)]) -> HeaderEdits {
        HeaderEdits::Diff {
            remove: remove
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
            add: add
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
        }
    }

    fn values<'a>(m: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        m.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn a_diff_keeps_untouched_fields_and_replaces_touched_names_in_order() {
        let mut h = map(&[
            ("host", "x"),
            ("accept", "a"),
            ("accept", "b"),
            ("apikey", "k"),
            ("via", "v"),
        ]);
        // one of two repeated fields removed (the other sent back), one name dropped, one
        // value appended to a kept name, new names in order
        diff(
            &["accept", "apikey"],
            &[
                ("accept", "b"),
                ("x-consumer", "c1"),
                ("via", "w"),
                ("x-consumer", "c2"),
            ],
        )
        .apply(&mut h);
        assert_eq!(values(&h, "host"), ["x"]);
        assert_eq!(values(&h, "accept"), ["b"]);
        assert!(!h.contains_key("apikey"));
        assert_eq!(values(&h, "via"), ["v", "w"]);
        assert_eq!(values(&h, "x-consumer"), ["c1", "c2"]);
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn a_diff_sets_a_name_again_and_ignores_names_that_are_absent() {
        let mut h = map(&[("a", "1"), ("a", "2"), ("b", "3")]);
        diff(&["a", "missing"], &[("a", "9")]).apply(&mut h);
        assert_eq!(values(&h, "a"), ["9"]);
        assert_eq!(values(&h, "b"), ["3"]);
        // removing every name leaves nothing, as clearing does
        diff(&["a", "b"], &[]).apply(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn a_replacement_is_the_whole_new_set() {
        let mut h = map(&[("a", "1"), ("b", "2")]);
        HeaderEdits::Replace(map(&[("c", "3"), ("c", "4")])).apply(&mut h);
        assert_eq!(h, map(&[("c", "3"), ("c", "4")]));
        HeaderEdits::Replace(HeaderMap::new()).apply(&mut h);
        assert!(h.is_empty());
    }
}
