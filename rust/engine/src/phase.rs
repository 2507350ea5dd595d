//! The phases of a request and the `Filter` trait that built-in features implement to
//! take part in them. Python plugins use the same phase names.
//!
//! 1. `route`            the router picks a route (core, not a filter hook)
//! 2. `access`           after routing, before an upstream target is chosen: may answer early
//! 3. `upstream_request` the request about to go upstream: rewrite headers
//! 4. `response_headers` the upstream's response head on its way back
//! 5. `response_body`    the body streams through (plugins: buffered or chunk by chunk)
//! 6. `log`              after the response is sent (plugins: handed over, never waited on)
//!
//! A route's Python plugins take part through [`crate::plugins::PluginHost`], one crossing
//! per phase; `proxy.rs` calls it right after the built-in filters of the same phase.
//!
//! Every hook has a no-op default, so adding a phase never breaks an existing filter.

use crate::error::GatewayError;
use crate::limiter::RateInfo;
use crate::plugins::{ChainSpec, PluginHost, PluginState};
use crate::router::Route;
use http::{request, response, HeaderValue};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What a request carries through its phases; created once, passed to every hook.
pub struct RequestCtx {
    pub request_id: HeaderValue,
    pub client: SocketAddr,
    /// The client's IP as a header value (IPv4-mapped IPv6 shown as IPv4), formatted once
    /// per connection.
    pub client_ip: HeaderValue,
    /// Set by the route phase.
    pub route: Option<Arc<Route>>,
    /// The host the client asked for (Host, or :authority on HTTP/2), as it sent it.
    pub host: Option<HeaderValue>,
    /// "http" or "https"; the scheme the client used.
    pub scheme: &'static str,
    /// The client's HTTP version (the request goes upstream as HTTP/1.1 or HTTP/2 anyway).
    pub version: http::Version,
    /// Set after routing when the route has plugins.
    pub plugins: Option<PluginRun>,
    /// Who the request is from, once an authentication plugin has said so.
    pub consumer: Option<String>,
    pub credential: Option<String>,
    /// The verified client certificate of the connection (TLS with client certificates).
    pub client_cert: Option<Arc<crate::tls::ClientIdentity>>,
    /// The most restrictive rate limit's state, for the response headers.
    pub rate: Option<RateInfo>,
    /// What the upstream phase did, for the observers: the target that answered, how long
    /// its response head took, and how many attempts were made.
    pub upstream_target: Option<Arc<str>>,
    pub upstream_time: Option<std::time::Duration>,
    pub tries: u32,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// The request's trace context, when tracing is on (passed upstream).
    pub trace: Option<crate::trace::TraceContext>,
    /// The cache's verdict, when the route has a cache.
    pub cache: Option<&'static str>,
    /// The start of the request body, when the access log captures it.
    pub captured_body: Option<bytes::Bytes>,
    /// How many bytes of the request body to keep in `captured_body` (0: none).
    pub capture_body_cap: usize,
    /// A WebSocket handshake in progress: the client's side, then the accepted session.
    pub websocket: Option<crate::websocket::Pending>,
    pub websocket_session: Option<crate::websocket::Session>,
    /// Set when the request had fallbacks (`req.fallbacks`) and went past its first attempt.
    pub fell_back: Option<Box<crate::plugins::FellBack>>,
    /// A request the AI pass-through took (`ai_fast.rs`): settled with its answer.
    pub ai_meter: Option<Box<crate::ai_fast::Meter>>,
}

/// A request's run through its route's plugin chain.
pub struct PluginRun {
    pub host: Arc<dyn PluginHost>,
    pub spec: ChainSpec,
    /// Created by the access crossing; None if that crossing never happened.
    pub state: Option<PluginState>,
    pub started: Instant,
    /// The target that served the request, for the log phase.
    pub upstream: Option<String>,
}

impl Drop for PluginRun {
    /// A request dropped before its response phases (the client left while the upstream
    /// was still thinking) still reaches the log phase, so the plugins can settle what they
    /// counted for it (an AI budget's reservation, a concurrency slot). Every other path
    /// hands the state to the response phases, which take it.
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        if !self.spec.log {
            return;
        }
        self.host.log(crate::plugins::LogRecord {
            chain: self.spec.chain,
            state,
            status: crate::observe::CLIENT_CLOSED,
            bytes_sent: 0,
            duration: self.started.elapsed().as_secs_f64(),
            upstream: self.upstream.take(),
            error: Some("the client left before the response".into()),
        });
    }
}

pub trait Filter: Send + Sync {
    fn name(&self) -> &'static str;

    /// `access` phase. An error answers the client; the upstream is never contacted.
    fn access(&self, _ctx: &mut RequestCtx, _req: &request::Parts) -> Result<(), GatewayError> {
        Ok(())
    }

    /// `upstream_request` phase: `req` already has hop-by-hop headers removed.
    fn upstream_request(&self, _ctx: &RequestCtx, _req: &mut request::Parts) {}

    /// `response_headers` phase: `resp` already has hop-by-hop headers removed.
    fn response_headers(&self, _ctx: &RequestCtx, _resp: &mut response::Parts) {}
}
