//! W3C trace context (traceparent / tracestate) and the worker's span exporter.
//!
//! Every request gets a context: the client's trace continued, or a new one. The gateway's
//! server span is the upstream call's parent, and the upstream sees the upstream call's
//! span as its parent. Spans of sampled traces are exported over OTLP/HTTP off the request
//! path.

use crate::config::TracingConfig;
use crate::headers::next_u64;
use crate::observe::{ObserveEnv, RequestRecord};
use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderValue};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// A request's place in a trace.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The client's span, when it sent a traceparent.
    pub parent_span: Option<[u8; 8]>,
    /// The gateway's server span.
    pub span_id: [u8; 8],
    /// The span of the call to the upstream (the upstream's parent).
    pub upstream_span: [u8; 8],
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
    /// What the request's spans need beyond its record; sampled requests only.
    pub traced: Option<Box<Traced>>,
}

impl TraceContext {
    /// The context a client sent, if its traceparent is valid (version 00 layout; higher
    /// versions are read by the same layout, as the spec asks).
    pub fn from_headers(headers: &HeaderMap) -> Option<TraceContext> {
        let tp = headers.get(&TRACEPARENT)?.as_bytes();
        if tp.len() < 55 || (tp.len() > 55 && tp[55] != b'-') {
            return None;
        }
        let version = hex_byte(&tp[0..2])?;
        if version == 0xff || (version == 0 && tp.len() != 55) {
            return None;
        }
        if tp[2] != b'-' || tp[35] != b'-' || tp[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&tp[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent = [0u8; 8];
        for (i, b) in parent.iter_mut().enumerate() {
            *b = hex_byte(&tp[36 + 2 * i..38 + 2 * i])?;
        }
        if trace_id == [0; 16] || parent == [0; 8] {
            return None;
        }
        let flags = hex_byte(&tp[53..55])?;
        Some(TraceContext {
            trace_id,
            parent_span: Some(parent),
            span_id: random_span(),
            upstream_span: random_span(),
            sampled: flags & 1 == 1,
            tracestate: headers.get(&TRACESTATE).cloned(),
            traced: None,
        })
    }

    /// A new trace, recorded with probability `sample`.
    pub fn new_root(sample: f64) -> TraceContext {
        let hi = next_u64();
        let lo = next_u64();
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&hi.to_be_bytes());
        trace_id[8..].copy_from_slice(&lo.to_be_bytes());
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        // The low 8 bytes are random: sampling on them keeps the decision consistent for
        // anyone else sampling by trace id ratio.
        let sampled = sample >= 1.0 || ((lo >> 11) as f64 / (1u64 << 53) as f64) < sample;
        TraceContext {
            trace_id,
            parent_span: None,
            span_id: random_span(),
            upstream_span: random_span(),
            sampled,
            tracestate: None,
            traced: None,
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The traceparent the upstream gets: same trace, our upstream call as its parent.
    pub fn upstream_traceparent(&self) -> HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.upstream_span, &mut buf[36..52]);
        buf[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
    }

    /// Replace the client's trace headers with ours.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(&TRACEPARENT, self.upstream_traceparent());
        match &self.tracestate {
            Some(ts) => {
                headers.insert(&TRACESTATE, ts.clone());
            }
            None => {
                headers.remove(&TRACESTATE);
            }
        }
    }
}

pub(crate) fn random_span() -> [u8; 8] {
    let mut v = next_u64();
    if v == 0 {
        v = 1;
    }
    v.to_be_bytes()
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

/// `N` bytes from `2 * N` lower-case hex digits.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = hex_byte(&s[2 * i..2 * i + 2])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// `bytes` as hex into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

/// What the spans of a sampled request need beyond its record: filled in by the route and
/// upstream phases.
#[derive(Debug, Clone, Default)]
pub struct Traced {
    /// The route path pattern that matched (`http.route`).
    pub route_pattern: Option<Arc<str>>,
    /// The upstream phase, once it picked a target.
    pub upstream: Option<UpstreamCall>,
}

/// The call to the upstream, from its first attempt to the response head (or the last
/// failure); retries are inside it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamCall {
    pub started: Instant,
    pub elapsed: Duration,
    /// The upstream's status; None when no attempt got a response.
    pub status: Option<u16>,
}

/// A span timed outside the request path's record: a Python plugin hook.
#[derive(Debug, Clone)]
pub struct ExtraSpan {
    pub trace_id: [u8; 16],
    pub parent_span: [u8; 8],
    pub name: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(String, AttrValue)>,
    /// Why the hook failed; the span's status is then ERROR.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// What waits for export. A request's spans are built in the export task, from its record.
pub enum Queued {
    Request(Box<RequestRecord>),
    Extra(Box<ExtraSpan>),
}

/// The spans waiting for export: a bounded queue that the request path pushes to (a lock
/// held for one push) and the export task empties a batch at a time.
pub struct SpanQueue {
    waiting: Mutex<Waiting>,
    /// Woken when a full batch waits, and on close.
    pub(crate) wake: Notify,
    dropped: AtomicU64,
    closed: AtomicBool,
    batch_size: usize,
    capacity: usize,
}

#[derive(Default)]
struct Waiting {
    items: Vec<Queued>,
    spans: usize,
}

impl SpanQueue {
    pub fn new(batch_size: usize, capacity: usize) -> SpanQueue {
        SpanQueue {
            waiting: Mutex::new(Waiting::default()),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            batch_size: batch_size.max(1),
            capacity: capacity.max(1),
        }
    }

    /// Queue `item` of `spans` spans; dropped (and counted) when the queue is full.
    pub fn push(&self, item: Queued, spans: usize) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if w.spans + spans > self.capacity {
            drop(w);
            self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
            return false;
        }
        w.items.push(item);
        let before = w.spans;
        w.spans += spans;
        let batch_ready = before < self.batch_size && w.spans >= self.batch_size;
        drop(w);
        if batch_ready {
            self.wake.notify_one();
        }
        true
    }

    /// The oldest items, at most a batch of spans (at least one item when any waits).
    pub fn take_batch(&self) -> Vec<Queued> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if w.spans <= self.batch_size {
            w.spans = 0;
            return std::mem::take(&mut w.items);
        }
        let (mut n, mut spans) = (0, 0);
        for item in &w.items {
            let k = item.spans();
            if n > 0 && spans + k > self.batch_size {
                break;
            }
            spans += k;
            n += 1;
        }
        w.spans -= spans;
        w.items.drain(..n).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.lock().map(|w| w.items.is_empty()).unwrap_or(true)
    }

    /// Spans dropped because the queue was full, so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// No more regular waiting: the export task drains what is left and ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl Queued {
    /// Spans this item becomes: a request's server span, and its client span when it
    /// reached an upstream.
    pub fn spans(&self) -> usize {
        match self {
            Queued::Request(rec) => {
                let traced = rec.trace.as_ref().and_then(|t| t.traced.as_deref());
                1 + traced.is_some_and(|t| t.upstream.is_some()) as usize
            }
            Queued::Extra(_) => 1,
        }
    }
}

/// The queue of the tracer serving new requests, for spans made outside the request path
/// (plugin hooks run on other threads, through `ferrogate._core.record_span`).
static CURRENT: ArcSwapOption<SpanQueue> = ArcSwapOption::const_empty();

/// Queue a plugin hook's span with the worker's tracer; false when tracing is off or the
/// queue is full.
pub fn record_span(span: ExtraSpan) -> bool {
    match CURRENT.load().as_ref() {
        Some(queue) => queue.push(Queued::Extra(Box::new(span)), 1),
        None => false,
    }
}

/// The worker's tracer: decides sampling for new traces and queues the spans of sampled
/// ones; a task on the worker's runtime exports them (`otlp.rs`).
pub struct Tracer {
    pub config: TracingConfig,
    queue: Arc<SpanQueue>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tracer {
    /// Start exporting as `config` says (on the current runtime); a tracer with the same
    /// settings is kept as it is, with its queue and connections.
    pub fn start(
        config: &TracingConfig,
        previous: Option<&Arc<Tracer>>,
        env: &ObserveEnv,
    ) -> Result<Arc<Tracer>, String> {
        if let Some(p) = previous.filter(|p| p.config == *config) {
            return Ok(p.clone());
        }
        let exporter = crate::otlp::Exporter::new(config, env)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "tracing must be started on the worker's runtime".to_string())?;
        let queue = Arc::new(SpanQueue::new(config.batch_size, config.queue_size));
        let every = Duration::from_secs_f64(config.flush_interval.max(0.01));
        let task = runtime.spawn(crate::otlp::export_loop(queue.clone(), exporter, every));
        CURRENT.store(Some(queue.clone()));
        Ok(Arc::new(Tracer {
            config: config.clone(),
            queue,
            task: Mutex::new(Some(task)),
        }))
    }

    /// The request's context: the client's, continued, or a new trace.
    pub fn context_for(&self, headers: &HeaderMap) -> TraceContext {
        let mut ctx =
            TraceContext::from_headers(headers).unwrap_or_else(|| TraceContext::new_root(self.config.sample));
        if ctx.sampled {
            ctx.traced = Some(Box::default());
        }
        ctx
    }

    /// A request is over: a sampled one's record goes to the export queue as it is.
    pub fn finish(&self, mut rec: RequestRecord) {
        if !rec.trace.as_ref().is_some_and(|t| t.sampled) {
            return;
        }
        rec.capture = None;
        let item = Queued::Request(Box::new(rec));
        let spans = item.spans();
        self.queue.push(item, spans);
    }

    /// Spans dropped because the export queue was full, since this tracer started.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Export what waits and stop; gives up after `within` (the worker is exiting).
    pub async fn shutdown(&self, within: Duration) {
        self.queue.close();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(within, task).await;
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Replaced or turned off by a reload: the export task drains the queue and ends.
        self.queue.close();
        let current = CURRENT.load();
        if current.as_ref().is_some_and(|q| Arc::ptr_eq(q, &self.queue)) {
            CURRENT.compare_and_swap(&current, None::<Arc<SpanQueue>>);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_str(tp).unwrap());
        h
    }

    #[test]
    fn a_valid_traceparent_is_continued() {
        let h = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let ctx = TraceContext::from_headers(&h).unwrap();
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent_span,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(ctx.sampled);
        let up = ctx.upstream_traceparent();
        let up = up.to_str().unwrap();
        assert!(up.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(up.ends_with("-01"));
        assert_ne!(&up[36..52], "00f067aa0ba902b7");
    }

    #[test]
    fn invalid_traceparents_start_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::from_headers(&headers(bad)).is_none(), "{bad}");
        }
        // A later version may carry more fields after its own dash.
        assert!(TraceContext::from_headers(&headers(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-whatever"
        ))
        .is_some());
    }

    #[test]
    fn sampling_follows_the_ratio() {
        let n = 20_000;
        let kept = (0..n).filter(|_| TraceContext::new_root(0.1).sampled).count();
        assert!((1_500..2_500).contains(&kept), "{kept}");
        assert!((0..100).all(|_| TraceContext::new_root(1.0).sampled));
        assert!((0..100).all(|_| !TraceContext::new_root(0.0).sampled));
    }
}
