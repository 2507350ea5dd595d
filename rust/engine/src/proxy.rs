//! The request path. One function per phase, called in order by [`handle`]; see
//! `phase.rs` for the phase names and docs/architecture.md for the picture.

use crate::body::{collect_capped, collect_with_trailers, BodyTap, InboundBody, RequestBody, ResponseBody};
use crate::config::HashSource;
use crate::dispatch::{dispatch, Dispatched};
use crate::engine::Engine;
use crate::error::{ErrorKind, GatewayError};
use crate::filters::via_value;
use crate::framing::Ambiguity;
use crate::headers::{new_request_id, strip_hop_by_hop, X_REQUEST_ID};
use crate::limiter::{check, check_cluster, real_client_ip, Limit, Who};
use crate::observe::{Finish, ObserveEnv, Observer, Unanswered};
use crate::phase::{PluginRun, RequestCtx};
use crate::plugins::{BodyMode, FellBack, HookMode, RequestDecision, RequestView, ResponseEdits, Routing};
use crate::quota::check_quotas;
use crate::ratelimit::SharedTable;
use crate::router::{RequestHead, Route};
use crate::upstream::{InflightGuard, Upstream};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, request, response, HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Frame;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The body a client gets; the guard frees the target's in-flight slot when it is done.
pub type ProxyBody = ResponseBody<InflightGuard>;

/// A worker's shared state: the current engine, swapped on reload, and the node's rate
/// limit table (shared with the other workers; it outlives every engine).
pub struct Worker {
    pub engine: ArcSwap<Engine>,
    pub limits: SharedTable,
    pub quotas: SharedTable,
    /// The node's active health check results (see `probe.rs`); None: this worker probes
    /// on its own.
    pub health_board: Option<std::sync::Arc<crate::probe::HealthBoard>>,
    /// Access log, metrics, analytics, tracer: rebuilt with the engine's settings.
    pub observer: ArcSwap<Observer>,
    pub observe_env: ObserveEnv,
    /// This worker's open connections per client address (`limits.max_connections_per_ip`).
    pub connections: Arc<crate::conn_limit::PerIpConnections>,
    /// WebSocket sessions, which leave the HTTP server once switched: told when the worker
    /// drains, and waited for.
    pub websockets: Arc<crate::websocket::Sessions>,
}

impl Worker {
    pub fn new(engine: Engine, limits: SharedTable, quotas: SharedTable) -> Self {
        Worker {
            engine: ArcSwap::from_pointee(engine),
            limits,
            quotas,
            health_board: None,
            observer: ArcSwap::from_pointee(Observer::default()),
            observe_env: ObserveEnv {
                worker_id: 0,
                runtime_path: std::path::PathBuf::new(),
            },
            connections: Arc::default(),
            websockets: Arc::default(),
        }
    }

    pub fn with_observe_env(mut self, env: ObserveEnv) -> Self {
        self.observe_env = env;
        self
    }

    /// Make the observers match the current engine's settings (after start and reloads).
    pub fn apply_observe(&self) -> Result<(), String> {
        let engine = self.engine.load();
        let current = self.observer.load();
        let wanted = &engine.observe;
        let observer = Observer::build(wanted, Some(&current), &self.observe_env)?;
        if let Some(metrics) = &observer.metrics {
            metrics.track_targets(&engine);
        }
        self.observer.store(Arc::new(observer));
        Ok(())
    }

    pub fn with_health_board(mut self, board: Option<crate::probe::HealthBoard>) -> Self {
        self.health_board = board.map(std::sync::Arc::new);
        self
    }

    /// Start the active health checks of the current engine's targets (on the runtime).
    pub fn start_probes(&self) {
        self.engine.load().start_probes(self.health_board.as_ref());
    }
}

/// Serve one request: every response, the gateway's own errors included, carries the
/// request id.
///
/// Not an `async fn`: an `async fn` copies each argument into its state a second time
/// before the body runs (the request is 352 bytes); an `async move` block uses them
/// where they are. With 256 connections every byte of these futures is a cache line
/// that other requests evict (callgrind's last-level misses).
#[allow(clippy::manual_async_fn)]
pub fn handle(
    worker: &Worker,
    req: Request<InboundBody>,
    client: SocketAddr,
    client_ip: HeaderValue,
    ambiguity: Option<Ambiguity>,
) -> impl Future<Output = Response<ProxyBody>> + '_ {
    async move {
        let engine = worker.engine.load_full();
        let observer = worker.observer.load_full();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if !v.is_empty() => v.clone(),
            _ => new_request_id(),
        };
        let tls = req.extensions().get::<crate::tls::TlsConn>();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_cert = tls.and_then(|t| t.client.clone());
        // A certificate that an `mtls` credential names identifies the consumer up front, so
        // consumer-keyed limits and the plugins see it.
        let (consumer, credential) = match client_cert.as_deref().and_then(|c| engine.mtls.identify(c)) {
            Some((consumer, credential)) => (Some(consumer.to_string()), Some(credential.to_string())),
            None => (None, None),
        };
        // Built where it stays (the future's state), not built and then moved there.
        let mut pending = Unanswered {
            ctx: RequestCtx {
                request_id,
                client,
                client_ip,
                route: None,
                host: None,
                scheme,
                version: req.version(),
                plugins: None,
                consumer,
                credential,
                client_cert,
                rate: None,
                upstream_target: None,
                upstream_time: None,
                tries: 0,
                bytes_in: 0,
                trace: None,
                cache: None,
                captured_body: None,
                capture_body_cap: 0,
                websocket: None,
                websocket_session: None,
                fell_back: None,
                ai_meter: None,
            },
            observer: observer.clone(),
            record: None,
        };
        let (mut head, body) = req.into_parts();
        // A gRPC call gets gRPC answers, errors included; a gRPC-Web one goes upstream as gRPC.
        let grpc = crate::grpc::Call::of(&head.headers);
        if let Some(call) = grpc {
            if let Some(web) = call.web {
                web.to_grpc_request(&mut head.headers);
            }
            head.extensions.insert(call);
        }
        // gRPC compresses its own messages (`grpc-encoding`).
        let compress_side = (!engine.compression.is_empty() && grpc.is_none())
            .then(|| crate::compress::RequestSide::of(&head.method, &head.headers));
        // Until the record is filled below, a dropped future (the client left) still logs it.
        pending.record = observer.start(&head, &mut pending.ctx, &engine.trusted_proxies);
        let ctx = &mut pending.ctx;
        let mut error = None;
        let resp = match forward(&engine, worker, ctx, head, body, ambiguity).await {
            Ok(resp) => resp,
            Err(e) => {
                error = Some(e.kind.code());
                error_response(e, &ctx.request_id)
            }
        };
        let mut resp = match ctx.plugins.take() {
            None => resp,
            // Paths only some routes take are boxed here and in `forward`: an await's state is
            // part of every request's future otherwise (8.6 KB without, 7.2 KB with; 256
            // connections keep 256 of them in the cache).
            Some(run) => Box::pin(plugin_response(run, ctx, resp)).await,
        };
        if let Some(meter) = ctx.ai_meter.take() {
            let (parts, body) = Box::pin(meter.respond(resp)).await.into_parts();
            resp = Response::from_parts(parts, ResponseBody::full(body));
            resp.headers_mut().insert(&X_REQUEST_ID, ctx.request_id.clone());
        }
        // Heartbeats go after the plugins' chunk hooks (they see the upstream's bytes only).
        if let Some(idle) = ctx.route.as_ref().and_then(|r| r.sse_heartbeat) {
            if crate::sse::applies(&resp) {
                let (parts, body) = resp.into_parts();
                let body = crate::sse::Heartbeat::new(body, idle);
                resp = Response::from_parts(parts, ResponseBody::Heartbeat(Box::new(body)));
            }
        }
        if let Some(call) = &grpc {
            resp = Box::pin(crate::grpc::as_grpc(resp, ctx.upstream_time.is_some())).await;
            if let Some(web) = call.web {
                let (mut parts, body) = resp.into_parts();
                let state = web.respond_head(&mut parts.headers);
                let body = crate::grpc_web::WebBody { inner: body, state };
                resp = Response::from_parts(parts, ResponseBody::GrpcWeb(Box::new(body)));
            }
        }
        if let Some(route) = &ctx.route {
            engine.lifecycle.apply(route.index, resp.headers_mut());
        }
        if let Some(rate) = &ctx.rate {
            let status = resp.status();
            rate.apply(resp.headers_mut(), status);
        }
        if let Some(side) = &compress_side {
            // Last: plugins and the rate headers saw the response as the upstream sent it.
            resp = compress(&engine, ctx, side, resp);
        }
        // A WebSocket session starts once the client's switch answer has gone out (one that
        // plugins turned into something else ends it here: its upstream connection is closed).
        let session = ctx
            .websocket_session
            .take()
            .filter(|s| s.switching_status() == resp.status());
        if session.is_some() {
            // A buffering plugin may have stated a length: a switch answer has no body at all.
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
        match pending.record.take() {
            None => {
                if let Some(session) = session {
                    tokio::spawn(session.run(None, &worker.websockets));
                }
                resp
            }
            Some(mut record) => {
                observer.fill(&mut record, ctx, resp.status().as_u16(), resp.headers(), error);
                let capture_left = observer.response_capture_cap(&record);
                let (parts, body) = resp.into_parts();
                let mut finish = Finish {
                    observer,
                    record: Some(record),
                    capture_left,
                };
                if let Some(session) = session {
                    // Logged when the session ends, with its duration and bytes.
                    tokio::spawn(session.run(Some(finish), &worker.websockets));
                    return Response::from_parts(parts, body);
                }
                if body.is_end_stream() {
                    // Nothing to send: hyper may never poll the body.
                    finish.done();
                }
                Response::from_parts(parts, ResponseBody::Observed(Box::new((body, finish))))
            }
        }
    }
}

/// Compress the response body when the route, the response and the client allow it.
fn compress(
    engine: &Engine,
    ctx: &RequestCtx,
    side: &crate::compress::RequestSide,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let policy = ctx
        .route
        .as_ref()
        .and_then(|r| engine.compression.get(r.index)?.as_deref());
    let Some(policy) = policy else {
        return resp;
    };
    let (mut parts, body) = resp.into_parts();
    let served = parts.extensions.remove::<crate::cache::Served>();
    let empty = body.is_end_stream();
    let Some(encoding) = crate::compress::apply(policy, side, parts.status, &mut parts.headers, empty) else {
        return Response::from_parts(parts, body);
    };
    // A cache hit sends its entry's bytes compressed once, not compressed again each time.
    if let (Some(served), ResponseBody::Full(Some(bytes))) = (served, &body) {
        if let Some(encoded) = served.0.encoded(bytes, encoding, policy) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(encoded.len()));
            return Response::from_parts(parts, ResponseBody::full(encoded));
        }
    }
    match crate::compress::Compressed::new(body, encoding, policy) {
        Ok(c) => Response::from_parts(parts, ResponseBody::Compressed(Box::new(c))),
        // An encoder that cannot start (out of memory) fails the request, not the worker.
        Err(e) => error_response(
            GatewayError::new(ErrorKind::Internal, format!("cannot start the compressor: {e}")),
            &ctx.request_id,
        ),
    }
}

#[cold]
fn error_response(e: GatewayError, request_id: &HeaderValue) -> Response<ProxyBody> {
    let mut resp = e.into_response(request_id, |b| ResponseBody::full(Bytes::from(b)));
    resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());
    resp
}

/// An `async move` block for the reason given at [`handle`].
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    engine: &'a Arc<Engine>,
    tables: &'a Worker,
    ctx: &'a mut RequestCtx,
    mut parts: request::Parts,
    body: InboundBody,
    ambiguity: Option<Ambiguity>,
) -> impl Future<Output = Result<Response<ProxyBody>, GatewayError>> + 'a {
    async move {
        if let Some(a) = ambiguity {
            return Err(GatewayError::new(ErrorKind::BadRequest, a.message()));
        }
        // HTTP/1.1 framing was checked on the raw bytes (`framing.rs`); HTTP/2 frames its own
        // bodies, but a Content-Length field can still disagree with itself.
        if parts.version == Version::HTTP_2 {
            check_framing(&parts.headers)?;
        }
        // A WebSocket handshake (either kind) looks like an HTTP/1.1 one from here on.
        let websocket =
            crate::websocket::handshake_of(&parts).and_then(|h| crate::websocket::begin(&mut parts, h));
        // Limits on the head, then the path that routing, plugins and the upstream see.
        crate::head_limits::check(&parts, &engine.limits)?;
        // The WAF inspects the target as the client sent it: encodings and dot segments are evidence.
        let raw_uri = engine.waf.is_some().then(|| parts.uri.clone());
        crate::path_normalize::normalize_uri(&mut parts.uri)?;

        ctx.host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };

        // phase: route
        let (route, mut upstream_path) = {
            let head = RequestHead {
                method: &parts.method,
                host: ctx.host.as_ref().and_then(|h| h.to_str().ok()),
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
            if let Some(traced) = ctx.trace.as_mut().and_then(|t| t.traced.as_mut()) {
                traced.route_pattern = Some(m.pattern.clone());
            }
            (m.route.clone(), m.upstream_path)
        };
        ctx.route = Some(route.clone());
        if let Some(ws) = websocket {
            if route.websocket {
                ctx.websocket = Some(ws);
            } else if ws.handshake == crate::websocket::Handshake::ExtendedConnect {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "this route does not accept WebSocket connections",
                ));
            }
            // An HTTP/1.1 handshake on such a route goes on as a plain GET (Upgrade removed).
        }
        if route.client_cert_required && ctx.client_cert.is_none() {
            return Err(GatewayError::new(
                ErrorKind::ClientCertRequired,
                "this route needs a client certificate signed by a trusted CA",
            ));
        }
        // phase: route (which upstream: version rules, then the weighted split)
        let mut chosen = match &route.split {
            None => route.upstream,
            Some(split) => split.choose(route.upstream, &parts.headers, ctx.client_ip.as_bytes()),
        };
        let mut upstream = &engine.upstreams[chosen];
        if let Some(spec) = &route.plugins {
            let host = engine.plugins.clone().ok_or_else(|| {
                GatewayError::new(
                    ErrorKind::Internal,
                    "the route has plugins but no plugin host is loaded",
                )
            })?;
            ctx.plugins = Some(PluginRun {
                host,
                spec: spec.clone(),
                state: None,
                started: Instant::now(),
                upstream: None,
            });
        }

        // phase: access
        for f in &engine.filters {
            f.access(ctx, &parts)?;
        }
        let limited =
            !engine.global_limits.is_empty() || !route.rate_limits.is_empty() || !engine.plans.is_empty();
        // Limits keyed by who the client is (and plans) wait for the authentication plugins.
        let count_late =
            limited && (!engine.plans.is_empty() || all_limits(engine, &route).any(Limit::needs_consumer));
        if limited && !count_late {
            Box::pin(count_request(engine, tables, ctx, &route, &parts)).await?;
        }
        // The WAF (`waf.rs`): head first, then the body, all before any plugin or the upstream.
        let waf = match (engine.waf.as_ref().and_then(|w| w.profile(route.index)), &raw_uri) {
            (Some(profile), Some(raw)) => Some(crate::waf::begin(
                profile,
                ctx,
                &engine.trusted_proxies,
                raw,
                &parts,
            )?),
            _ => None,
        };
        // A gRPC-Web text body is base64 as a whole: decoded before anything reads it.
        let web_text = parts
            .extensions
            .get::<crate::grpc::Call>()
            .and_then(|c| c.web)
            .is_some_and(|w| w.text);
        let mut client_body = match &ctx.plugins {
            Some(run) if run.spec.request_body => {
                let cap = match (run.spec.body_cap, engine.limits.max_body_bytes) {
                    (0, l) | (l, 0) => l,
                    (a, b) => a.min(b),
                };
                ClientBody::Whole(Box::pin(read_whole_body(body, cap, upstream)).await?)
            }
            _ if web_text => ClientBody::Whole(
                Box::pin(read_whole_body(body, engine.limits.max_body_bytes, upstream)).await?,
            ),
            _ => {
                let (body, first) = read_first_chunk(&parts.headers, body, upstream).await?;
                ClientBody::Stream(body, first)
            }
        };
        if let (true, ClientBody::Whole(b)) = (web_text, &mut client_body) {
            *b = crate::grpc_web::decode_text(b).map_err(|m| GatewayError::new(ErrorKind::BadRequest, m))?;
        }
        if let Some(inspection) = waf {
            let read = match &mut client_body {
                ClientBody::Whole(b) => b.clone(),
                ClientBody::Stream(incoming, first) if first.is_some() || !incoming.is_end_stream() => {
                    let limit = inspection.profile().body_limit;
                    let read = Box::pin(crate::waf::read_prefix(
                        first.take(),
                        incoming,
                        limit,
                        engine.limits.max_body_bytes,
                        upstream.read_timeout,
                    ))
                    .await?;
                    *first = (!read.is_empty()).then(|| Frame::data(read.clone()));
                    read
                }
                ClientBody::Stream(..) => Bytes::new(),
            };
            crate::waf::inspect_body(inspection, &read, ctx)?;
        }
        if let (ClientBody::Whole(b), n @ 1..) = (&client_body, ctx.capture_body_cap) {
            // The body as the client sent it, before any plugin changed it.
            if !b.is_empty() {
                ctx.captured_body = Some(b.slice(..b.len().min(n)));
            }
        }
        let mut query_override = None;
        // The AI gateway's pass-through (`ai_fast.rs`): a request it takes skips the plugins.
        if let (Some(fast), ClientBody::Whole(bytes)) = (route.ai_fast.as_ref(), &client_body) {
            if let Some(admitted) = fast.admit(&parts.headers, bytes) {
                ctx.consumer = Some(admitted.consumer.to_string());
                ctx.credential = Some(admitted.credential.to_string());
                parts.method = http::Method::POST;
                parts.headers = admitted.headers(&parts.headers);
                upstream_path = Some(admitted.path().to_string());
                query_override = Some(String::new());
                chosen = admitted.upstream();
                upstream = &engine.upstreams[chosen];
                client_body = ClientBody::Whole(admitted.body.clone());
                ctx.plugins = None;
                ctx.ai_meter = Some(Box::new(admitted.meter(&ctx.request_id)));
            }
        }
        // Fallback attempts (`req.fallbacks`), with their upstreams' indexes.
        let mut fallbacks = None;
        if let Some(mut run) = ctx.plugins.take() {
            let outcome = Box::pin(request_plugins(
                ctx,
                &mut run,
                &route,
                &mut parts,
                &mut client_body,
            ))
            .await;
            ctx.plugins = Some(run);
            match outcome? {
                PluginOutcome::Respond(resp) => return Ok(*resp),
                PluginOutcome::Continue { path, query, routing } => {
                    if path.is_some() {
                        upstream_path = path;
                    }
                    query_override = query;
                    if let Some(routing) = routing {
                        if let Some(name) = &routing.upstream {
                            chosen = upstream_named(engine, name)?;
                            upstream = &engine.upstreams[chosen];
                        }
                        if let (Some(mode), Some(run)) = (routing.body_mode, ctx.plugins.as_mut()) {
                            // Only a chain with body hooks has a mode to switch.
                            if run.spec.response_body != BodyMode::None {
                                run.spec.response_body = mode;
                            }
                        }
                        if !routing.fallbacks.is_empty() {
                            let targets = routing
                                .fallbacks
                                .iter()
                                .map(|a| upstream_named(engine, &a.upstream))
                                .collect::<Result<Vec<_>, _>>()?;
                            fallbacks = Some((routing, targets));
                        }
                    }
                }
            }
        }
        if count_late {
            Box::pin(count_request(engine, tables, ctx, &route, &parts)).await?;
        }

        // phase: upstream_request (the target's URI and Host are set per attempt, in dispatch)
        if route.preserve_host && !parts.headers.contains_key(header::HOST) {
            if let Some(h) = &ctx.host {
                // HTTP/2 clients send :authority instead of Host.
                parts.headers.insert(header::HOST, h.clone());
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        if ctx.websocket.is_some() {
            crate::websocket::upstream_headers(&mut parts.headers);
        }
        if let Some(trace) = &ctx.trace {
            trace.inject(&mut parts.headers);
        }
        for f in &engine.filters {
            f.upstream_request(ctx, &mut parts);
        }
        let client_version = parts.version;
        parts.version = Version::HTTP_11;
        // The response cache (`cache.rs`): after the access phase, so authentication, limits
        // and plugins run on hits too; before anything goes upstream.
        let mut cache_fill = None;
        if let Some(rc) = route.cache.as_ref().filter(|_| ctx.websocket.is_none()) {
            let origin = crate::cache::Origin {
                engine,
                upstream: chosen,
                path: upstream_path.clone(),
                query: query_override.as_deref(),
                preserve_host: route.preserve_host,
                forwarding: crate::forwarding::Forwarding::of(ctx),
            };
            match Box::pin(crate::cache::before(&engine.cache, rc, ctx, &mut parts, origin)).await {
                crate::cache::Before::Respond(resp) => return Ok(resp),
                crate::cache::Before::Forward(fill) => cache_fill = Some(fill),
            }
        }
        // A handshake is not mirrored: the copy would open a session of its own.
        let mirror = route
            .mirror
            .as_ref()
            .filter(|m| ctx.websocket.is_none() && m.sampled());
        if let Some(mirror) = mirror {
            if let Some(bytes) = Box::pin(mirrorable_body(
                &mut client_body,
                &parts.headers,
                mirror.max_body,
                upstream,
            ))
            .await?
            {
                let path = upstream_path.clone();
                mirror.spawn(
                    engine.clone(),
                    &parts,
                    bytes,
                    path,
                    query_override.as_deref(),
                    route.preserve_host,
                    &crate::forwarding::Forwarding::of(ctx),
                );
            }
        }
        let mut body = match client_body {
            ClientBody::Stream(body, first) => RequestBody::new(body, first, engine.limits.max_body_bytes),
            ClientBody::Whole(bytes) => RequestBody::buffered(bytes),
        };
        if ctx.capture_body_cap > 0 && ctx.captured_body.is_none() {
            body.capture_first(ctx.capture_body_cap);
        }

        // send: picks a target, retries and falls back as the upstream and route say
        let query = query_override.as_deref();
        // What a fallback attempt without a path of its own is sent to.
        let main_target = fallbacks
            .as_ref()
            .map(|_| (parts.uri.clone(), upstream_path.clone(), query_override.clone()));
        let mut dispatched = send(
            engine,
            &route,
            chosen,
            ctx,
            &mut parts,
            &mut body,
            upstream_path,
            query,
        )
        .await;
        ctx.bytes_in = body.bytes_read();
        if let Some(captured) = body.take_captured() {
            ctx.captured_body = Some(captured);
        }
        if let (Some((routing, targets)), Some(main)) = (fallbacks, main_target) {
            let head = AttemptHead {
                method: &parts.method,
                version: client_version,
                main,
            };
            let (result, used) = Box::pin(fall_back(
                engine, &route, ctx, &head, &routing, &targets, chosen, dispatched,
            ))
            .await;
            dispatched = result;
            upstream = &engine.upstreams[used];
        }
        if let (Err(e), Some(fill)) = (&dispatched, &cache_fill) {
            // stale-if-error: a stored answer instead of the gateway's error.
            if let Some(resp) = fill.on_error(ctx, e) {
                return Ok(resp);
            }
        }
        let (resp, guard) = match dispatched? {
            Dispatched::Upstream(resp, guard) => (resp, guard),
            Dispatched::Respond(resp) => return Ok(resp),
        };
        // The request's head has gone upstream for the last time.
        crate::headers::recycle(std::mem::take(&mut parts.headers));

        // phase: response_headers
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        rparts.headers.insert(&X_REQUEST_ID, ctx.request_id.clone());
        rparts.headers.append(header::VIA, via_value(Version::HTTP_11));
        for f in &engine.filters {
            f.response_headers(ctx, &mut rparts);
        }
        rparts.version = client_version;
        if let Some(ws) = ctx.websocket.take() {
            let switched = rparts.status == http::StatusCode::SWITCHING_PROTOCOLS;
            if switched
                || (ws.handshake == crate::websocket::Handshake::ExtendedConnect
                    && rparts.status.is_success())
            {
                // A 2xx to an extended CONNECT would open a tunnel: only a 101 may.
                let session = switched
                    .then(|| ws.accepted(&mut rparts, rbody, guard, route.websocket_idle))
                    .flatten()
                    .ok_or_else(|| {
                        GatewayError::new(
                            ErrorKind::UpstreamUnreachable,
                            format!(
                                "upstream {} did not switch to the WebSocket protocol",
                                upstream.name
                            ),
                        )
                    })?;
                ctx.websocket_session = Some(session);
                return Ok(Response::from_parts(rparts, ResponseBody::Full(None)));
            }
        }

        if let Some(fill) = cache_fill {
            // Stored, refreshed or answered from a stale entry; otherwise streamed as below.
            return Box::pin(fill.finish(rparts, rbody, guard, ctx)).await;
        }

        // phase: response_body (streams through; the guard frees the target's slot at its end)
        Ok(Response::from_parts(
            rparts,
            ResponseBody::Upstream {
                inner: rbody,
                _guard: guard,
            },
        ))
    }
}

/// The index of the upstream a plugin named; an unknown one is the plugin's error.
fn upstream_named(engine: &Engine, name: &str) -> Result<usize, GatewayError> {
    engine
        .upstreams
        .iter()
        .position(|u| u.name == name)
        .ok_or_else(|| {
            GatewayError::new(
                ErrorKind::PluginFailed,
                format!("a plugin sent the request to upstream '{name}', which is not configured"),
            )
        })
}

/// One attempt at the upstream: adaptive concurrency admits or sheds, then `dispatch`.
#[allow(clippy::too_many_arguments)]
async fn send(
    engine: &Engine,
    route: &Route,
    chosen: usize,
    ctx: &mut RequestCtx,
    parts: &mut request::Parts,
    body: &mut RequestBody,
    upstream_path: Option<String>,
    query: Option<&str>,
) -> Result<Dispatched, GatewayError> {
    let upstream = &engine.upstreams[chosen];
    // Over the upstream's current limit, shed now rather than queue.
    let permit = match &upstream.adaptive {
        None => None,
        Some(limit) => Some(limit.try_acquire().ok_or_else(|| {
            GatewayError::new(
                ErrorKind::Overloaded,
                format!(
                    "upstream {} is at its concurrency limit ({}); try again shortly",
                    upstream.name,
                    limit.limit()
                ),
            )
        })?),
    };
    let dispatched = dispatch(engine, route, chosen, ctx, parts, body, upstream_path, query).await;
    if let Some(p) = permit {
        p.done(dispatched.is_err());
    }
    dispatched
}

/// What fallback attempts take from the request: its method, the client's HTTP version
/// (for Via), and where it was sent (URI, rewritten path, query) for attempts without a
/// path of their own.
struct AttemptHead<'a> {
    method: &'a http::Method,
    version: Version,
    main: (Uri, Option<String>, Option<String>),
}

/// The status an attempt's outcome is judged by: the answer's, 0 when the upstream gave
/// none (unreachable, timed out, no healthy target); None for an outcome that is final
/// whatever the fallbacks (the client's own error, a plugin's).
fn outcome_status(result: &Result<Dispatched, GatewayError>) -> Option<u16> {
    match result {
        Ok(Dispatched::Upstream(resp, _)) => Some(resp.status().as_u16()),
        Ok(Dispatched::Respond(resp)) => Some(resp.status().as_u16()),
        Err(e) => matches!(
            e.kind,
            ErrorKind::UpstreamUnreachable
                | ErrorKind::UpstreamTimeout
                | ErrorKind::UpstreamTlsFailed
                | ErrorKind::NoHealthyTarget
                | ErrorKind::CircuitOpen
                | ErrorKind::Overloaded
        )
        .then_some(0),
    }
}

/// `req.fallbacks`: while the last attempt failed (a status in `fallback_on`, or no
/// answer), its answer is dropped unread (nothing has reached the client) and the next
/// attempt goes out. Returns the outcome to answer with and its upstream's index.
#[allow(clippy::too_many_arguments)]
async fn fall_back(
    engine: &Engine,
    route: &Route,
    ctx: &mut RequestCtx,
    head: &AttemptHead<'_>,
    routing: &Routing,
    targets: &[usize],
    first: usize,
    mut result: Result<Dispatched, GatewayError>,
) -> (Result<Dispatched, GatewayError>, usize) {
    let mut used = first;
    let mut skipped = Vec::new();
    for (i, (attempt, &target)) in routing.fallbacks.iter().zip(targets).enumerate() {
        match outcome_status(&result) {
            Some(0) => {}
            Some(status) if routing.falls_back_on(status) => {}
            _ => break,
        }
        skipped.push((
            engine.upstreams[used].name.clone(),
            outcome_status(&result).unwrap_or(0),
        ));
        drop(result);
        used = target;
        ctx.fell_back = Some(Box::new(FellBack {
            attempt: i as u32 + 1,
            skipped: skipped.clone(),
        }));
        let mut parts = Request::new(()).into_parts().0;
        parts.method = attempt.method.clone().unwrap_or_else(|| head.method.clone());
        parts.version = head.version;
        parts.headers = attempt.headers.clone();
        if let Some(trace) = &ctx.trace {
            trace.inject(&mut parts.headers);
        }
        for f in &engine.filters {
            f.upstream_request(ctx, &mut parts);
        }
        parts.version = Version::HTTP_11;
        let (path, query) = match &attempt.path {
            Some(p) => {
                parts.uri = match Uri::try_from(p.as_str()) {
                    Ok(u) => u,
                    Err(e) => {
                        result = Err(GatewayError::new(
                            ErrorKind::PluginFailed,
                            format!("a fallback's path {p:?} is not a valid path: {e}"),
                        ));
                        break;
                    }
                };
                (None, None)
            }
            None => {
                parts.uri = head.main.0.clone();
                (head.main.1.clone(), head.main.2.as_deref())
            }
        };
        let mut body = RequestBody::buffered(attempt.body.clone());
        result = send(engine, route, target, ctx, &mut parts, &mut body, path, query).await;
    }
    (result, used)
}

fn all_limits<'e>(engine: &'e Engine, route: &'e Route) -> impl Iterator<Item = &'e Limit> {
    engine.global_limits.iter().chain(route.rate_limits.iter())
}

/// Count the request against the route's limits and the gateway-wide ones: the node's
/// first, then (if those allow it) the cluster-wide ones.
async fn count_request(
    engine: &Engine,
    tables: &Worker,
    ctx: &mut RequestCtx,
    route: &Route,
    parts: &request::Parts,
) -> Result<(), GatewayError> {
    let real =
        real_client_ip(ctx.client.ip(), &parts.headers, &engine.trusted_proxies).map(|ip| ip.to_string());
    let who = Who {
        ip: real
            .as_deref()
            .unwrap_or_else(|| ctx.client_ip.to_str().unwrap_or("")),
        route: &route.name,
        consumer: ctx.consumer.as_deref(),
        credential: ctx.credential.as_deref(),
        headers: &parts.headers,
    };
    // The consumer's plan adds its own limits and quotas.
    let plan = who.consumer.and_then(|c| engine.plans.get(c));
    let plan_limits = plan.map_or(&[][..], |p| &p.limits[..]);
    let every = || all_limits(engine, route).chain(plan_limits.iter());
    let (mut info, mut verdict) = check(&tables.limits, every().filter(|l| !l.cluster), &who);
    if verdict.is_ok() && every().any(|l| l.cluster) {
        verdict = match &engine.cluster_limits {
            Some(cluster) => check_cluster(cluster, every().filter(|l| l.cluster), &who, &mut info).await,
            None => Ok(()),
        };
    }
    if let (Ok(()), Some(plan), Some(consumer)) = (&verdict, plan, who.consumer) {
        if !plan.quotas.is_empty() {
            let cluster = engine.cluster_limits.as_deref();
            verdict = check_quotas(&tables.quotas, cluster, &plan.quotas, consumer, &mut info).await;
        }
    }
    ctx.rate = info;
    verdict
}

/// The body to mirror: none, or small with a known length (read whole now, so that the
/// upstream and the mirror get the same bytes); `None` when it cannot be mirrored.
async fn mirrorable_body(
    body: &mut ClientBody,
    headers: &HeaderMap,
    max: u64,
    upstream: &Upstream,
) -> Result<Option<Bytes>, GatewayError> {
    match body {
        ClientBody::Whole(b) => Ok((b.len() as u64 <= max).then(|| b.clone())),
        ClientBody::Stream(incoming, None) => {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if incoming.is_end_stream() && !headers.contains_key(header::TRANSFER_ENCODING) {
                return Ok(Some(Bytes::new()));
            }
            match declared {
                Some(n) if n <= max => {
                    let ClientBody::Stream(incoming, _) =
                        std::mem::replace(body, ClientBody::Whole(Bytes::new()))
                    else {
                        unreachable!("matched above")
                    };
                    let bytes = read_whole_body(incoming, max, upstream).await?;
                    *body = ClientBody::Whole(bytes.clone());
                    Ok(Some(bytes))
                }
                _ => Ok(None),
            }
        }
        ClientBody::Stream(_, Some(_)) => Ok(None),
    }
}

/// The client's body as the upstream request will carry it.
enum ClientBody {
    /// Streamed, with the first frame when it was read ahead.
    Stream(InboundBody, Option<Frame<Bytes>>),
    /// Read whole (for plugins that asked for it), or replaced by one.
    Whole(Bytes),
}

enum PluginOutcome {
    Continue {
        path: Option<String>,
        query: Option<String>,
        routing: Option<Box<Routing>>,
    },
    Respond(Box<Response<ProxyBody>>),
}

/// The access phase of a route's plugins: one crossing for the whole chain.
async fn request_plugins(
    ctx: &mut RequestCtx,
    run: &mut PluginRun,
    route: &Route,
    parts: &mut request::Parts,
    body: &mut ClientBody,
) -> Result<PluginOutcome, GatewayError> {
    let hook = {
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            body: match body {
                ClientBody::Whole(b) => Some(b),
                ClientBody::Stream(..) => None,
            },
            request_id: ctx.request_id.to_str().unwrap_or(""),
            client_ip: ctx.client_ip.to_str().unwrap_or(""),
            route: &route.name,
            host: ctx.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
            scheme: ctx.scheme,
            http_version: version_str(parts.version),
            trace: ctx.trace.as_ref().filter(|t| t.sampled),
            consumer: ctx.consumer.as_deref(),
            credential: ctx.credential.as_deref(),
        };
        let (state, hook) = run.host.on_request(run.spec.chain, run.spec.request, &view);
        run.state = state;
        hook
    };
    match hook.wait().await? {
        RequestDecision::Respond(early) => {
            // A plugin that identified the client before answering: the log and metrics
            // count the answer against that consumer.
            if early.consumer.is_some() {
                ctx.consumer = early.consumer;
            }
            if early.credential.is_some() {
                ctx.credential = early.credential;
            }
            let mut resp = Response::new(ResponseBody::full(early.body));
            *resp.status_mut() = early.status;
            *resp.headers_mut() = early.headers;
            resp.headers_mut().insert(&X_REQUEST_ID, ctx.request_id.clone());
            Ok(PluginOutcome::Respond(Box::new(resp)))
        }
        RequestDecision::Continue(edits) => {
            if edits.consumer.is_some() {
                ctx.consumer = edits.consumer;
            }
            if edits.credential.is_some() {
                ctx.credential = edits.credential;
            }
            if let Some(m) = edits.method {
                parts.method = m;
            }
            if let Some(h) = edits.headers {
                h.apply(&mut parts.headers);
            }
            if let Some(b) = edits.body {
                *body = ClientBody::Whole(b);
            }
            Ok(PluginOutcome::Continue {
                path: edits.path,
                query: edits.query,
                routing: edits.routing,
            })
        }
    }
}

/// The response phases of a route's plugins, on whatever response is going out (the
/// upstream's, an early answer or a gateway error): head, body, then the log hand-over.
async fn plugin_response(
    mut run: PluginRun,
    ctx: &RequestCtx,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let Some(state) = run.state.take() else {
        return resp;
    };
    let spec = run.spec.clone();
    let (mut parts, mut body) = resp.into_parts();
    let mut failed = false;
    let mode = spec.response.unwrap_or(HookMode::Sync);
    let fell_back = ctx.fell_back.as_deref();
    // A buffered body with sync head hooks: the head's hooks run with the body's, after it
    // is read, in one crossing. They still run first, and alone when the body fails.
    let whole = spec.response_body == BodyMode::Buffered && mode == HookMode::Sync;
    // A request that fell back crosses anyway: body hooks and `on_log` see the attempt.
    if (spec.crosses_response() || ctx.fell_back.is_some()) && !whole {
        let hook = run
            .host
            .on_response(spec.chain, mode, &state, parts.status, &parts.headers, fell_back);
        match hook.wait().await {
            Ok(edits) => apply_response_edits(&mut parts, edits),
            Err(e) => {
                failed = true;
                (parts, body) = error_response(e, &ctx.request_id).into_parts();
            }
        }
    }
    if spec.response_body == BodyMode::Buffered && !failed {
        let mut kept = None;
        let collected = collect_with_trailers(body, spec.body_cap).await;
        if whole && !matches!(collected, Ok(Some(_))) {
            // The body cannot be handed over: the head's hooks still see the response.
            let hook =
                run.host
                    .on_response(spec.chain, mode, &state, parts.status, &parts.headers, fell_back);
            if let Err(e) = hook.wait().await {
                let (p, b) = error_response(e, &ctx.request_id).into_parts();
                return finish_plugin_response(run, state, p, b, true);
            }
        }
        let outcome = match collected {
            Ok(Some((bytes, trailers))) => {
                let out = if whole {
                    run.host.on_response_whole(
                        spec.chain,
                        &state,
                        parts.status,
                        &parts.headers,
                        fell_back,
                        bytes.clone(),
                        trailers.as_ref(),
                    )
                } else {
                    run.host
                        .on_response_body(spec.chain, &state, bytes.clone(), trailers.as_ref())
                };
                // Trailers go on with the body they belong to; a new body is a plain answer.
                if matches!(&out, Ok((_, o)) if *o == bytes) {
                    kept = trailers;
                }
                out
            }
            Ok(None) => Err(GatewayError::new(
                ErrorKind::ResponseTooLarge,
                format!(
                    "the response body is larger than the route's plugins buffer ({} bytes)",
                    spec.body_cap
                ),
            )),
            Err(e) => Err(GatewayError::new(
                ErrorKind::UpstreamUnreachable,
                format!("lost the upstream response mid-body: {e}"),
            )),
        };
        match outcome {
            Ok((edits, out)) => {
                apply_response_edits(&mut parts, edits);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                body = match kept {
                    // Ends with the head (HTTP/2: END_STREAM on HEADERS), so a gRPC
                    // trailers-only answer stays one; an empty DATA frame would break it.
                    None if out.is_empty() => ResponseBody::Full(None),
                    None => ResponseBody::full(out),
                    Some(t) => ResponseBody::Trailed(Some(out), Some(Box::new(t))),
                };
            }
            Err(e) => {
                failed = true;
                (parts, body) = error_response(e, &ctx.request_id).into_parts();
            }
        }
    }
    finish_plugin_response(run, state, parts, body, failed)
}

/// The end of [`plugin_response`]: streamed bodies and the log phase get their tap.
fn finish_plugin_response(
    mut run: PluginRun,
    state: crate::plugins::PluginState,
    mut parts: response::Parts,
    mut body: ProxyBody,
    failed: bool,
) -> Response<ProxyBody> {
    let spec = run.spec.clone();
    let stream = spec.response_body == BodyMode::Streamed && !failed;
    if stream {
        // Chunk hooks may change the length: the client gets a chunked (or h2) body.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if stream || spec.log {
        let tap = BodyTap::new(
            run.host.clone(),
            spec.chain,
            Some(state),
            stream,
            spec.log,
            parts.status.as_u16(),
            run.started,
            run.upstream.take(),
        )
        .with_body_state(body.is_end_stream());
        body = ResponseBody::Tapped(Box::new((body, tap)));
    }
    Response::from_parts(parts, body)
}

fn apply_response_edits(parts: &mut response::Parts, edits: ResponseEdits) {
    if let Some(s) = edits.status {
        parts.status = s;
    }
    if let Some(h) = edits.headers {
        h.apply(&mut parts.headers);
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Read the whole client body for plugins that asked for it; over `cap` is a 413.
async fn read_whole_body(body: InboundBody, cap: u64, upstream: &Upstream) -> Result<Bytes, GatewayError> {
    match tokio::time::timeout(upstream.read_timeout, collect_capped(body, cap)).await {
        Err(_) => Err(GatewayError::new(
            ErrorKind::RequestTimeout,
            "timed out reading the request body",
        )),
        Ok(Ok(Some(bytes))) => Ok(bytes),
        Ok(Ok(None)) => Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("request body is above the limit of {cap} bytes"),
        )),
        Ok(Err(e)) => Err(crate::body::read_failed(&*e)),
    }
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
    mut body: InboundBody,
    upstream: &Upstream,
) -> Result<(InboundBody, Option<Frame<Bytes>>), GatewayError> {
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
        Ok(Some(Err(e))) => Err(crate::body::read_failed(&*e)),
    }
}

pub(crate) fn hash_key(upstream: &Upstream, headers: &HeaderMap, ctx: &RequestCtx) -> Option<Vec<u8>> {
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

pub(crate) fn upstream_path_and_query(
    upstream: &Upstream,
    uri: &Uri,
    rewritten: Option<String>,
    query: Option<&str>,
) -> Result<PathAndQuery, GatewayError> {
    if rewritten.is_none() && query.is_none() && upstream.path_prefix.is_empty() {
        if let Some(pq) = uri.path_and_query() {
            return Ok(pq.clone());
        }
    }
    let path = rewritten.as_deref().unwrap_or_else(|| uri.path());
    let mut s = String::with_capacity(upstream.path_prefix.len() + path.len() + 64);
    s.push_str(&upstream.path_prefix);
    s.push_str(path);
    if let Some(q) = query.or(uri.query()).filter(|q| !q.is_empty()) {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s)
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid upstream path: {e}")))
}
