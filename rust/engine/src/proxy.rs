//! The request path. One function per phase, called in order by [`handle`]; see
//! `phase.rs` for the phase names and docs/architecture.md for the picture.

use crate::body::{BodyError, RequestBody, ResponseBody};
use crate::config::HashSource;
use crate::engine::Engine;
use crate::error::{ErrorKind, GatewayError};
use crate::filters::via_value;
use crate::framing::Ambiguity;
use crate::h1client::ExchangeError;
use crate::headers::{new_request_id, strip_hop_by_hop, X_REQUEST_ID};
use crate::phase::RequestCtx;
use crate::pool::SendError;
use crate::router::RequestHead;
use crate::upstream::{InflightGuard, Upstream};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, request, HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use std::net::SocketAddr;

/// The body a client gets; the guard frees the target's in-flight slot when it is done.
pub type ProxyBody = ResponseBody<InflightGuard>;

/// A worker's shared state: the current engine, swapped on reload.
pub struct Worker {
    pub engine: ArcSwap<Engine>,
}

impl Worker {
    pub fn new(engine: Engine) -> Self {
        Worker {
            engine: ArcSwap::from_pointee(engine),
        }
    }
}

/// Serve one request: every response, the gateway's own errors included, carries the
/// request id.
pub async fn handle(
    worker: &Worker,
    req: Request<Incoming>,
    client: SocketAddr,
    client_ip: HeaderValue,
    ambiguity: Option<Ambiguity>,
) -> Response<ProxyBody> {
    let engine = worker.engine.load_full();
    let request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => new_request_id(),
    };
    let mut ctx = RequestCtx {
        request_id,
        client,
        client_ip,
        route: None,
        host: None,
        scheme: "http",
    };
    match forward(&engine, &mut ctx, req, ambiguity).await {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = e.into_response(&ctx.request_id, |b| ResponseBody::full(Bytes::from(b)));
            resp.headers_mut().insert(&X_REQUEST_ID, ctx.request_id);
            resp
        }
    }
}

async fn forward(
    engine: &Engine,
    ctx: &mut RequestCtx,
    req: Request<Incoming>,
    ambiguity: Option<Ambiguity>,
) -> Result<Response<ProxyBody>, GatewayError> {
    if let Some(a) = ambiguity {
        return Err(GatewayError::new(ErrorKind::BadRequest, a.message()));
    }
    // HTTP/1.1 framing was checked on the raw bytes (`framing.rs`); HTTP/2 frames its own
    // bodies, but a Content-Length field can still disagree with itself.
    if req.version() == Version::HTTP_2 {
        check_framing(req.headers())?;
    }
    let (mut parts, body) = req.into_parts();

    // phase: route
    let (route, upstream_path) = {
        let head = RequestHead {
            method: &parts.method,
            host: host_of(&parts),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let m = engine.router.lookup(&head).ok_or_else(|| {
            GatewayError::new(
                ErrorKind::NoRoute,
                format!("no route matches {} {}", parts.method, parts.uri.path()),
            )
        })?;
        (m.route.clone(), m.upstream_path)
    };
    ctx.route = Some(route.clone());
    ctx.host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let upstream = &engine.upstreams[route.upstream];

    // phase: access
    for f in &engine.filters {
        f.access(ctx, &parts)?;
    }
    let first = read_first_chunk(&parts.headers, body, upstream).await?;
    let (body, first) = first;

    // phase: upstream_request
    let key = hash_key(upstream, &parts.headers, ctx);
    let (target, guard) = upstream.pick(key.as_deref());
    let pq = upstream_path_and_query(upstream, &parts.uri, upstream_path)?;
    // Origin-form: the pool already holds a connection to the target.
    parts.uri = Uri::from(pq);
    if !route.preserve_host {
        parts.headers.insert(header::HOST, target.host_header.clone());
    } else if let (false, Some(h)) = (parts.headers.contains_key(header::HOST), &ctx.host) {
        // HTTP/2 clients send :authority instead of Host.
        parts.headers.insert(header::HOST, h.clone());
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(&X_REQUEST_ID, ctx.request_id.clone());
    for f in &engine.filters {
        f.upstream_request(ctx, &mut parts);
    }
    let client_version = parts.version;
    parts.version = Version::HTTP_11;
    let mut body = RequestBody::new(body, first, engine.limits.max_body_bytes);

    let send = target.pool.send(&parts, &mut body);
    let resp = match tokio::time::timeout(upstream.read_timeout, send).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(upstream_error(&e, &target.address)),
        Err(_) => {
            return Err(GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "upstream {} sent no response within {:?}",
                    target.address, upstream.read_timeout
                ),
            ))
        }
    };

    // phase: response_headers
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    rparts.headers.insert(&X_REQUEST_ID, ctx.request_id.clone());
    rparts.headers.append(header::VIA, via_value(Version::HTTP_11));
    for f in &engine.filters {
        f.response_headers(ctx, &mut rparts);
    }
    rparts.version = client_version;

    // phase: response_body (streams through; the guard frees the target's slot at its end)
    Ok(Response::from_parts(
        rparts,
        ResponseBody::Upstream {
            inner: rbody,
            _guard: guard,
        },
    ))
}

/// Ambiguous framing is the raw material of request smuggling: refuse it, never forward.
/// For HTTP/2 requests; on HTTP/1.1 hyper folds these cases away before this point, and
/// `framing.rs` catches them on the wire.
fn check_framing(headers: &HeaderMap) -> Result<(), GatewayError> {
    let bad = |m: &str| Err(GatewayError::new(ErrorKind::BadRequest, m));
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if headers.contains_key(header::TRANSFER_ENCODING) {
            return bad("both Content-Length and Transfer-Encoding are present");
        }
        if lengths.next().is_some() {
            return bad("more than one Content-Length header");
        }
        if !first.as_bytes().iter().all(u8::is_ascii_digit) || first.is_empty() {
            return bad("Content-Length is not a number");
        }
    }
    Ok(())
}

/// For a chunked body, read the first chunk before anything is sent upstream, so that a
/// malformed chunk size is refused here instead of reaching the upstream half-forwarded.
async fn read_first_chunk(
    headers: &HeaderMap,
    mut body: Incoming,
    upstream: &Upstream,
) -> Result<(Incoming, Option<Frame<Bytes>>), GatewayError> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok((body, None));
    }
    match tokio::time::timeout(upstream.read_timeout, body.frame()).await {
        Err(_) => Err(GatewayError::new(
            ErrorKind::RequestTimeout,
            "timed out reading the request body",
        )),
        Ok(None) => Ok((body, None)),
        Ok(Some(Ok(frame))) => Ok((body, Some(frame))),
        Ok(Some(Err(e))) => Err(GatewayError::new(
            ErrorKind::BadRequest,
            format!("malformed request body: {e}"),
        )),
    }
}

fn host_of(parts: &request::Parts) -> Option<&str> {
    match parts.headers.get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => parts.uri.authority().map(|a| a.as_str()),
    }
}

fn hash_key(upstream: &Upstream, headers: &HeaderMap, ctx: &RequestCtx) -> Option<Vec<u8>> {
    let (source, name) = upstream.hash_source()?;
    match source {
        HashSource::Ip => Some(ctx.client_ip.as_bytes().to_vec()),
        HashSource::Header => headers.get(name?).map(|v| v.as_bytes().to_vec()),
        HashSource::Cookie => {
            let name = name?;
            headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|c| {
                    c.split(';').find_map(|kv| {
                        let (k, v) = kv.trim().split_once('=')?;
                        (k == name).then(|| v.as_bytes().to_vec())
                    })
                })
        }
    }
}

fn upstream_path_and_query(
    upstream: &Upstream,
    uri: &Uri,
    rewritten: Option<String>,
) -> Result<PathAndQuery, GatewayError> {
    if rewritten.is_none() && upstream.path_prefix.is_empty() {
        if let Some(pq) = uri.path_and_query() {
            return Ok(pq.clone());
        }
    }
    let path = rewritten.as_deref().unwrap_or_else(|| uri.path());
    let mut s = String::with_capacity(upstream.path_prefix.len() + path.len() + 64);
    s.push_str(&upstream.path_prefix);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s)
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid upstream path: {e}")))
}

fn upstream_error(e: &SendError, target: &str) -> GatewayError {
    match e {
        SendError::ConnectTimeout => GatewayError::new(
            ErrorKind::UpstreamTimeout,
            format!("connecting to upstream {target} timed out"),
        ),
        SendError::Connect(io) => GatewayError::new(
            ErrorKind::UpstreamUnreachable,
            format!("could not connect to upstream {target}: {io}"),
        ),
        SendError::Exchange(ExchangeError::Body(BodyError::TooLarge)) => {
            GatewayError::new(ErrorKind::BodyTooLarge, "request body is above the limit")
        }
        SendError::Exchange(ExchangeError::Body(BodyError::Malformed(m))) => {
            GatewayError::new(ErrorKind::BadRequest, format!("malformed request body: {m}"))
        }
        SendError::Exchange(e) => GatewayError::new(
            ErrorKind::UpstreamUnreachable,
            format!("lost the connection to upstream {target}: {e}"),
        ),
    }
}
