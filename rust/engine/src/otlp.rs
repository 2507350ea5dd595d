//! OTLP/HTTP export of a worker's spans: protobuf `ExportTraceServiceRequest`s POSTed to the
//! collector by a task on the worker's runtime, through the engine's own HTTP/1.1 client
//! (a keep-alive pool, as for upstreams).
//!
//! The request path only queues records (`trace.rs`); turning a record into its server and
//! client spans, encoding and sending all happen here. A failed export loses its batch and
//! is logged at most every few seconds; nothing here can slow a request or fail it.

use crate::body::RequestBody;
use crate::config::TracingConfig;
use crate::observe::{ObserveEnv, RequestRecord};
use crate::pool::{AttemptTimeouts, ConnPool, PoolSettings, SendError};
use crate::server::log_event;
use crate::trace::{hex, random_span, AttrValue, ExtraSpan, Queued, SpanQueue};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The semantic conventions the attribute names follow.
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.26.0";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One export, connect to answer.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Export failures and queue overflows are logged at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

// Span flags (OTLP): the W3C trace flags in the low byte, then whether the parent is remote.
const SAMPLED: u32 = 0x01;
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Sends batches of spans to one collector.
pub struct Exporter {
    endpoint: String,
    uri: Uri,
    headers: HeaderMap,
    pool: Arc<ConnPool>,
    resource: Resource,
    scope: InstrumentationScope,
    report: Report,
}

impl Exporter {
    pub fn new(config: &TracingConfig, env: &ObserveEnv) -> Result<Exporter, String> {
        let bad = |why: &str| format!("tracing.endpoint {:?}: {why}", config.endpoint);
        let url: Uri = config.endpoint.parse().map_err(|_| bad("not a URL"))?;
        if url.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported (send to a local collector)"));
        }
        let authority = url.authority().ok_or_else(|| bad("no host"))?;
        let address = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("tracing.headers: invalid header name {name:?}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("tracing.headers: invalid value for {name}"))?;
            headers.insert(name, value);
        }
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("invalid host"))?;
        headers.insert(header::HOST, host);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::try_from(path).map_err(|_| bad("invalid path"))?;
        let pool = ConnPool::new(
            &address,
            PoolSettings {
                keepalive: 2,
                keepalive_timeout: Duration::from_secs(30),
                connect_timeout: CONNECT_TIMEOUT,
            },
        );
        Ok(Exporter {
            endpoint: config.endpoint.clone(),
            uri,
            headers,
            pool,
            resource: resource(&config.service_name, env),
            scope: InstrumentationScope {
                name: "ferrogate".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
            report: Report::default(),
        })
    }

    /// Encode and send one batch; a failure is counted and reported, never retried.
    async fn export(&mut self, batch: Vec<Queued>) {
        let body = self.encode(&batch);
        let spans = batch.iter().map(Queued::spans).sum::<usize>() as u64;
        drop(batch);
        match self.send(body).await {
            Ok(()) => self.report.sent(&self.endpoint),
            Err(e) => self.report.failed(&self.endpoint, spans, &e),
        }
    }

    fn encode(&self, batch: &[Queued]) -> Vec<u8> {
        let mut spans = Vec::with_capacity(batch.len() * 2);
        for item in batch {
            match item {
                Queued::Request(rec) => request_spans(rec, &mut spans),
                Queued::Extra(s) => spans.push(extra_span(s)),
            }
        }
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(self.scope.clone()),
                    spans,
                    schema_url: SCHEMA_URL.into(),
                }],
                schema_url: SCHEMA_URL.into(),
            }],
        }
        .encode_to_vec()
    }

    async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        let (parts, ()) = req.into_parts();
        let mut body = RequestBody::buffered(Bytes::from(body));
        let timeouts = AttemptTimeouts {
            connect: CONNECT_TIMEOUT,
            write: Some(EXPORT_TIMEOUT),
            read: Some(EXPORT_TIMEOUT),
        };
        let exchange = async {
            let resp = self
                .pool
                .send_with(&parts, &mut body, None, &timeouts, Instant::now())
                .await
                .map_err(|e| match e {
                    SendError::Connect(io) => format!("cannot connect: {io}"),
                    SendError::ConnectTimeout => "connecting timed out".to_string(),
                    SendError::Tls(e) => format!("TLS: {}", crate::upstream_tls::reason(&e)),
                    SendError::Exchange(x) => x.to_string(),
                })?;
            let status = resp.status();
            // Read to the end, so that the connection is kept for the next batch.
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        tokio::time::timeout(EXPORT_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
    }
}

const USER_AGENT: &str = concat!("ferrogate/", env!("CARGO_PKG_VERSION"));

/// Exports what the queue holds: a batch as soon as one is full, the rest every `every`;
/// after the queue is closed, what is left, then ends.
pub async fn export_loop(queue: Arc<SpanQueue>, mut exporter: Exporter, every: Duration) {
    loop {
        if !queue.is_closed() {
            let _ = tokio::time::timeout(every, queue.wake.notified()).await;
        }
        loop {
            let batch = queue.take_batch();
            if batch.is_empty() {
                break;
            }
            exporter.export(batch).await;
        }
        exporter.report.overflow(queue.dropped());
        if queue.is_closed() && queue.is_empty() {
            return;
        }
    }
}

/// Rate-limited reports of lost spans: one log line for many failed exports.
#[derive(Default)]
struct Report {
    last: Option<Instant>,
    /// Spans lost to failed exports since the last report.
    lost: u64,
    /// Queue overflow drops already reported.
    dropped_reported: u64,
    failing: bool,
}

impl Report {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn failed(&mut self, endpoint: &str, spans: u64, error: &str) {
        self.lost += spans;
        self.failing = true;
        if self.due() {
            log_event(
                "warn",
                "trace_export_failed",
                serde_json::json!({"endpoint": endpoint, "error": error, "spans_lost": self.lost}),
            );
            self.lost = 0;
        }
    }

    fn sent(&mut self, endpoint: &str) {
        if self.failing {
            self.failing = false;
            // Lost since the last failure report, which may have been held back.
            log_event(
                "info",
                "trace_export_recovered",
                serde_json::json!({"endpoint": endpoint, "spans_lost": self.lost}),
            );
            self.lost = 0;
        }
    }

    fn overflow(&mut self, dropped: u64) {
        if dropped > self.dropped_reported && self.due() {
            log_event(
                "warn",
                "trace_queue_full",
                serde_json::json!({"spans_dropped": dropped - self.dropped_reported}),
            );
            self.dropped_reported = dropped;
        }
    }
}

fn resource(service_name: &str, env: &ObserveEnv) -> Resource {
    let pid = std::process::id();
    let host = hostname();
    // Unique per worker process and start, as the conventions ask of an instance id.
    let instance = format!("{}-{pid}-{}", host, hex(&random_span()));
    let mut attributes = vec![
        string("service.name", service_name),
        string("service.version", env!("CARGO_PKG_VERSION")),
        string("service.instance.id", &instance),
        int("process.pid", pid as i64),
        int("ferrogate.worker", env.worker_id as i64),
    ];
    if !host.is_empty() {
        attributes.push(string("host.name", &host));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn attr(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    attr(key, any_value::Value::StringValue(value.into()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attr(key, any_value::Value::IntValue(value))
}

fn header_text(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// `host[:port]`, with IPv6 literals in brackets, split.
fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], authority[i + 1..].parse().ok()),
        _ => (authority, None),
    };
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

fn error_status(message: impl Into<String>) -> Option<Status> {
    Some(Status {
        message: message.into(),
        code: StatusCode::Error as i32,
    })
}

/// The server span of a request, and its client span when it reached an upstream.
pub fn request_spans(rec: &RequestRecord, out: &mut Vec<Span>) {
    let Some(trace) = &rec.trace else { return };
    let start = unix_ns(rec.wall_start);
    let end = start + rec.duration.as_nanos() as u64;
    let method = rec.method.as_str();
    let traced = trace.traced.as_deref();
    let pattern = traced.and_then(|t| t.route_pattern.as_deref());
    let mut attributes = vec![
        string("http.request.method", method),
        string("url.scheme", "http"),
        string("network.protocol.version", protocol_version(rec.version)),
        string("client.address", &header_text(&rec.client_ip)),
        string("ferrogate.request_id", &header_text(&rec.request_id)),
    ];
    if rec.status != 0 {
        attributes.push(int("http.response.status_code", rec.status as i64));
    }
    if let Some(path) = &rec.path {
        attributes.push(string("url.path", path));
    }
    if let Some(query) = rec.query.as_deref().filter(|q| !q.is_empty()) {
        attributes.push(string("url.query", query));
    }
    if let Some(p) = pattern {
        attributes.push(string("http.route", p));
    }
    if let Some(host) = &rec.host {
        let text = header_text(host);
        let (name, port) = host_and_port(&text);
        attributes.push(string("server.address", name));
        if let Some(port) = port {
            attributes.push(int("server.port", port as i64));
        }
    }
    if let Some(ua) = &rec.user_agent {
        attributes.push(string("user_agent.original", &header_text(ua)));
    }
    if rec.bytes_in > 0 {
        attributes.push(int("http.request.body.size", rec.bytes_in as i64));
    }
    attributes.push(int("http.response.body.size", rec.bytes_out as i64));
    if let Some(route) = &rec.route {
        attributes.push(string("ferrogate.route", &route.name));
    }
    if let Some(consumer) = &rec.consumer {
        attributes.push(string("ferrogate.consumer", consumer));
    }
    let server_error = rec.status >= 500;
    match rec.error {
        Some(code) => attributes.push(string("error.type", code)),
        None if server_error => attributes.push(string("error.type", &rec.status.to_string())),
        None => {}
    }
    if !rec.completed {
        // The client went away, or the body failed, before the response was all sent.
        attributes.push(attr(
            "ferrogate.response.completed",
            any_value::Value::BoolValue(false),
        ));
    }
    let trace_state = rec
        .trace
        .as_ref()
        .and_then(|t| t.tracestate.as_ref())
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    out.push(Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: trace.span_id.to_vec(),
        trace_state: trace_state.clone(),
        parent_span_id: trace.parent_span.map(|p| p.to_vec()).unwrap_or_default(),
        flags: SAMPLED | HAS_IS_REMOTE | if trace.parent_span.is_some() { IS_REMOTE } else { 0 },
        name: match pattern {
            Some(p) => format!("{method} {p}"),
            None => method.to_string(),
        },
        kind: SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        status: if server_error {
            error_status(rec.error.unwrap_or(""))
        } else {
            None
        },
        ..Default::default()
    });

    let Some(call) = traced.and_then(|t| t.upstream) else {
        return;
    };
    let call_start = start + call.started.saturating_duration_since(rec.started).as_nanos() as u64;
    let mut attributes = vec![string("http.request.method", method)];
    if let Some(target) = &rec.upstream {
        let (name, port) = host_and_port(target);
        attributes.push(string("server.address", name));
        if let Some(port) = port {
            attributes.push(int("server.port", port as i64));
        }
    }
    if rec.tries > 1 {
        attributes.push(int("http.request.resend_count", rec.tries as i64 - 1));
    }
    let failed = match call.status {
        Some(status) => {
            attributes.push(int("http.response.status_code", status as i64));
            (status >= 400).then(|| status.to_string())
        }
        None => Some(rec.error.unwrap_or("no_response").to_string()),
    };
    if let Some(why) = &failed {
        attributes.push(string("error.type", why));
    }
    out.push(Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: trace.upstream_span.to_vec(),
        trace_state,
        parent_span_id: trace.span_id.to_vec(),
        flags: SAMPLED | HAS_IS_REMOTE,
        name: method.to_string(),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: call_start,
        end_time_unix_nano: call_start + call.elapsed.as_nanos() as u64,
        attributes,
        status: failed.and_then(error_status),
        ..Default::default()
    });
}

fn extra_span(s: &ExtraSpan) -> Span {
    let attributes = s
        .attributes
        .iter()
        .map(|(k, v)| {
            attr(
                k,
                match v {
                    AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
                    AttrValue::Int(i) => any_value::Value::IntValue(*i),
                    AttrValue::Float(f) => any_value::Value::DoubleValue(*f),
                    AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
                },
            )
        })
        .collect();
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: random_span().to_vec(),
        parent_span_id: s.parent_span.to_vec(),
        flags: SAMPLED | HAS_IS_REMOTE,
        name: s.name.clone(),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns.max(s.start_unix_ns),
        attributes,
        status: s.error.clone().and_then(error_status),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TraceContext, Traced, UpstreamCall, TRACEPARENT};

    fn record(
        mut trace: TraceContext,
        traced: Traced,
        status: u16,
        error: Option<&'static str>,
    ) -> RequestRecord {
        let started = Instant::now();
        trace.traced = Some(Box::new(traced));
        RequestRecord {
            wall_start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            started,
            request_id: HeaderValue::from_static("rid-1"),
            method: Method::GET,
            version: Version::HTTP_11,
            path: Some("/users/7".into()),
            query: Some("a=1".into()),
            host: Some(HeaderValue::from_static("gw.example:8080")),
            user_agent: None,
            client_ip: HeaderValue::from_static("10.1.2.3"),
            route: None,
            consumer: Some("alice".into()),
            status,
            error,
            bytes_in: 0,
            bytes_out: 12,
            upstream: Some(Arc::from("127.0.0.1:9001")),
            upstream_time: Some(Duration::from_millis(3)),
            tries: 2,
            rate_limit: None,
            cache: None,
            trace: Some(trace),
            capture: None,
            duration: Duration::from_millis(5),
            completed: true,
        }
    }

    fn attrs(span: &Span) -> std::collections::HashMap<String, any_value::Value> {
        span.attributes
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
            .collect()
    }

    fn continued() -> TraceContext {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        TraceContext::from_headers(&h).unwrap()
    }

    #[test]
    fn a_request_becomes_a_server_span_and_its_client_span() {
        let trace = continued();
        let started = Instant::now();
        let traced = Traced {
            route_pattern: Some(Arc::from("/users/{id}")),
            upstream: Some(UpstreamCall {
                started: started + Duration::from_millis(1),
                elapsed: Duration::from_millis(3),
                status: Some(200),
            }),
        };
        let mut rec = record(trace.clone(), traced, 200, None);
        rec.started = started;
        let mut spans = Vec::new();
        request_spans(&rec, &mut spans);
        let [server, client] = &spans[..] else {
            panic!("{spans:?}")
        };
        assert_eq!(server.name, "GET /users/{id}");
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(server.span_id, trace.span_id.to_vec());
        assert_eq!(
            server.parent_span_id,
            vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(server.flags, SAMPLED | HAS_IS_REMOTE | IS_REMOTE);
        assert_eq!(server.end_time_unix_nano - server.start_time_unix_nano, 5_000_000);
        assert!(server.status.is_none());
        let a = attrs(server);
        assert_eq!(
            a["http.route"],
            any_value::Value::StringValue("/users/{id}".into())
        );
        assert_eq!(a["http.response.status_code"], any_value::Value::IntValue(200));
        assert_eq!(a["url.query"], any_value::Value::StringValue("a=1".into()));
        assert_eq!(
            a["server.address"],
            any_value::Value::StringValue("gw.example".into())
        );
        assert_eq!(a["server.port"], any_value::Value::IntValue(8080));
        assert_eq!(
            a["ferrogate.consumer"],
            any_value::Value::StringValue("alice".into())
        );
        assert!(!a.contains_key("error.type"));

        assert_eq!(client.kind, SpanKind::Client as i32);
        assert_eq!(client.span_id, trace.upstream_span.to_vec());
        assert_eq!(client.parent_span_id, trace.span_id.to_vec());
        assert_eq!(
            client.start_time_unix_nano - server.start_time_unix_nano,
            1_000_000
        );
        assert_eq!(client.end_time_unix_nano - client.start_time_unix_nano, 3_000_000);
        let a = attrs(client);
        assert_eq!(
            a["server.address"],
            any_value::Value::StringValue("127.0.0.1".into())
        );
        assert_eq!(a["server.port"], any_value::Value::IntValue(9001));
        assert_eq!(a["http.request.resend_count"], any_value::Value::IntValue(1));
    }

    #[test]
    fn gateway_errors_are_error_spans() {
        let trace = TraceContext::new_root(1.0);
        let traced = Traced {
            route_pattern: None,
            upstream: Some(UpstreamCall {
                started: Instant::now(),
                elapsed: Duration::from_millis(1),
                status: None,
            }),
        };
        let rec = record(trace, traced, 502, Some("upstream_unreachable"));
        let mut spans = Vec::new();
        request_spans(&rec, &mut spans);
        let [server, client] = &spans[..] else {
            panic!("{spans:?}")
        };
        assert_eq!(server.name, "GET");
        assert!(server.parent_span_id.is_empty());
        assert_eq!(server.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert_eq!(
            attrs(server)["error.type"],
            any_value::Value::StringValue("upstream_unreachable".into())
        );
        assert_eq!(client.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert!(!attrs(client).contains_key("http.response.status_code"));
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(host_and_port("a.b:81"), ("a.b", Some(81)));
        assert_eq!(host_and_port("a.b"), ("a.b", None));
        assert_eq!(host_and_port("[::1]:4318"), ("::1", Some(4318)));
        assert_eq!(host_and_port("[::1]"), ("::1", None));
    }

    #[test]
    fn the_queue_is_bounded_and_batches() {
        let q = SpanQueue::new(3, 5);
        let span = || {
            Queued::Extra(Box::new(ExtraSpan {
                trace_id: [1; 16],
                parent_span: [2; 8],
                name: "x".into(),
                start_unix_ns: 1,
                end_unix_ns: 2,
                attributes: vec![],
                error: None,
            }))
        };
        for _ in 0..5 {
            assert!(q.push(span(), 1));
        }
        assert!(!q.push(span(), 1));
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.take_batch().len(), 3);
        assert_eq!(q.take_batch().len(), 2);
        assert!(q.take_batch().is_empty());
        assert!(q.push(span(), 1));
    }
}
