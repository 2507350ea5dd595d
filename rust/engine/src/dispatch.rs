//! Sending a request to its upstream: the first target, retries on other targets, the
//! timeouts, and what a request gets when no target can take it (a 503, or the upstream's
//! fallback).
//!
//! Layers, bottom up: the pool (`pool.rs`) sends a request again on a fresh connection when
//! a *reused* one turns out dead before any response byte; that is invisible here and costs
//! no retry. Above it, each attempt here is one `send_with` on one target; a failed attempt
//! is retried (on another target when there is one) if the route's policy, the request's
//! method and body, and the upstream's retry budget all allow it. Nothing is retried once the
//! response head has been handed on: from then on bytes may have reached the client.

use crate::body::{BodyError, RequestBody, ResponseBody};
use crate::error::{ErrorKind, GatewayError};
use crate::forwarding::Forwarding;
use crate::h1client::{ExchangeError, UpstreamBody};
use crate::headers::{next_u64, X_REQUEST_ID};
use crate::health::{ns_since_start, Outcome};
use crate::phase::RequestCtx;
use crate::pool::SendError;
use crate::proxy::{hash_key, upstream_path_and_query, ProxyBody};
use crate::retry::Cause;
use crate::router::Route;
use crate::upstream::{Fallback, InflightGuard, NoTarget, TimeoutSet, Upstream};
use crate::upstream_tls::tls_error;
use crate::Engine;
use http::{header, request, Response, Uri};
use http_body::Body as _;
use std::time::Instant;

/// What the upstream phase produced.
pub enum Dispatched {
    /// The upstream's response head; the guard holds the target's in-flight slot.
    Upstream(Response<UpstreamBody>, InflightGuard),
    /// An answer of the gateway's own (a static fallback).
    Respond(Response<ProxyBody>),
}

/// How an attempt failed.
enum Failed {
    Send(SendError),
    /// The route's total timeout expired during the attempt.
    Total,
}

/// Send the request (head in `parts`, already prepared for the upstream but for the target's
/// URI and Host) and wait for the response head, retrying as the policy allows.
#[allow(clippy::too_many_arguments)]
pub async fn dispatch(
    engine: &Engine,
    route: &Route,
    chosen: usize,
    ctx: &mut RequestCtx,
    parts: &mut request::Parts,
    body: &mut RequestBody,
    upstream_path: Option<String>,
    query: Option<&str>,
) -> Result<Dispatched, GatewayError> {
    let started = Instant::now();
    let now = ns_since_start(started);
    let forwarding = Forwarding::of(ctx);
    // `chosen`: the route's upstream, or the one its version rules / split picked.
    let mut upstream = &engine.upstreams[chosen];
    let mut key = hash_key(upstream, &parts.headers, ctx);
    let mut picked = match upstream.pick(key.as_deref(), &[], now) {
        Ok(p) => p,
        Err(no) => match &upstream.fallback {
            None => return Err(no_target(upstream, no)),
            Some(Fallback::Respond {
                status,
                headers,
                body,
            }) => {
                let mut resp = Response::new(ResponseBody::full(body.clone()));
                *resp.status_mut() = *status;
                *resp.headers_mut() = headers.clone();
                resp.headers_mut().insert(&X_REQUEST_ID, ctx.request_id.clone());
                return Ok(Dispatched::Respond(resp));
            }
            Some(Fallback::Upstream(i)) => {
                upstream = &engine.upstreams[*i];
                key = hash_key(upstream, &parts.headers, ctx);
                upstream
                    .pick(key.as_deref(), &[], now)
                    .map_err(|no| no_target(upstream, no))?
            }
        },
    };
    // Origin-form: the pool already holds a connection to the target.
    parts.uri = Uri::from(upstream_path_and_query(
        upstream,
        &parts.uri,
        upstream_path,
        query,
    )?);

    let policy = route.retries.as_deref().unwrap_or(&upstream.retries);
    let timeouts = if route.timeouts.is_empty() {
        upstream.timeouts
    } else {
        upstream.timeouts.with(&route.timeouts)
    };
    let budget = upstream.budget.as_ref().filter(|_| policy.count > 0);
    if let Some(b) = budget {
        b.deposit(now);
    }
    if !body.is_end_stream() && policy.may_resend(&parts.method) {
        body.keep_for_resend(policy.body_buffer);
    }
    let attempt_timeouts = timeouts.attempt();
    let mut total = timeouts.total.map(|t| started + t);
    // A gRPC client's deadline bounds the call too (`grpc.rs`).
    let grpc_deadline = parts
        .extensions
        .get::<crate::grpc::Call>()
        .and_then(|c| c.deadline);
    if let Some(d) = grpc_deadline {
        total = Some(total.map_or(d, |t| t.min(d)));
    }
    let mut tried: Vec<usize> = Vec::new();
    let mut attempt_start = started;
    let result = loop {
        let target = picked.target;
        // A fallback attempt (`req.fallbacks`) has no client Host to preserve.
        if !route.preserve_host || !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, target.host_header.clone());
        }
        if let Some(run) = ctx.plugins.as_mut() {
            run.upstream = Some(target.address.clone());
        }
        if let Some(d) = grpc_deadline {
            // What is left of the deadline, after the time spent here.
            let left = d.saturating_duration_since(Instant::now());
            parts
                .headers
                .insert(crate::grpc::GRPC_TIMEOUT, crate::grpc::format_timeout(left));
        }
        let send = target
            .pool
            .send_with(parts, body, Some(&forwarding), &attempt_timeouts, attempt_start);
        let result = match total {
            None => send.await.map_err(Failed::Send),
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), send).await {
                Ok(r) => r.map_err(Failed::Send),
                Err(_) => Err(Failed::Total),
            },
        };
        let cause = match &result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                target
                    .health
                    .report(Outcome::Status(status), picked.ticket.take());
                policy.statuses.contains(status).then_some(Cause::Status(status))
            }
            Err(e) => {
                // None: the client's body failed; not the target's fault, nothing to retry.
                let cause = classify(e);
                match cause {
                    Some(c) => target.health.report(c.outcome(), picked.ticket.take()),
                    None => drop(picked.ticket.take()),
                }
                cause
            }
        };
        let Some(cause) = cause else { break result };
        let replayable = body.replayable();
        if tried.len() as u32 >= policy.count
            || !replayable
            || !policy.retries(cause, &parts.method, replayable)
        {
            break result;
        }
        tried.push(picked.index);
        let now = Instant::now();
        let delay = policy.delay(tried.len() as u32, next_u64());
        if total.is_some_and(|d| now + delay >= d) {
            break result;
        }
        // Another target when there is one; the budget is asked last, so that a retry that
        // cannot happen does not spend it.
        let Ok(next) = upstream.pick(key.as_deref(), &tried, ns_since_start(now)) else {
            break result;
        };
        if budget.is_some_and(|b| !b.withdraw(ns_since_start(now))) {
            break result;
        }
        drop(result);
        picked = next;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        body.rewind();
        attempt_start = Instant::now();
    };
    ctx.upstream_target = Some(picked.target.label.clone());
    ctx.tries = tried.len() as u32 + 1;
    if result.is_ok() {
        ctx.upstream_time = Some(started.elapsed());
    }
    if let Some(traced) = ctx.trace.as_mut().and_then(|t| t.traced.as_mut()) {
        traced.upstream = Some(crate::trace::UpstreamCall {
            started,
            elapsed: ctx.upstream_time.unwrap_or_else(|| started.elapsed()),
            status: result.as_ref().ok().map(|r| r.status().as_u16()),
        });
    }
    if let Err(Failed::Send(e)) = &result {
        log_tls_failure(e, upstream, picked.target);
    }
    match result {
        Ok(resp) => Ok(Dispatched::Upstream(resp, picked.guard)),
        Err(e) => Err(send_error(
            &e,
            &picked.target.address,
            upstream,
            &timeouts,
            tried.len() + 1,
        )),
    }
}

/// An `upstream_tls_failed` event for a refused handshake (at most one a second per target).
fn log_tls_failure(e: &SendError, upstream: &Upstream, target: &crate::upstream::Target) {
    let error = match e {
        SendError::Tls(error) => error,
        SendError::Exchange(ExchangeError::Io {
            before_response: true,
            error,
            ..
        }) if tls_error(error).is_some() => error,
        _ => return,
    };
    if target.pool.log_tls_failure(ns_since_start(Instant::now())) {
        crate::server::log_event(
            "warn",
            "upstream_tls_failed",
            serde_json::json!({
                "upstream": upstream.name,
                "target": target.address,
                "reason": crate::upstream_tls::reason(error),
                "verification": crate::upstream_tls::is_verification_failure(error),
            }),
        );
    }
}

/// Why an attempt failed, for retrying and for the target's health; None when it was the
/// client's doing (its body was malformed or too large).
fn classify(e: &Failed) -> Option<Cause> {
    Some(match e {
        Failed::Total => Cause::Timeout,
        // A refused handshake is a connect failure: the request never reached the upstream.
        Failed::Send(SendError::Connect(_) | SendError::ConnectTimeout | SendError::Tls(_)) => Cause::Connect,
        Failed::Send(SendError::Exchange(x)) => match x {
            ExchangeError::Body(_) => return None,
            ExchangeError::Io {
                before_response: true,
                error,
                ..
            } if tls_error(error).is_some() => Cause::Connect,
            ExchangeError::Io { error, .. } if error.kind() == std::io::ErrorKind::TimedOut => Cause::Timeout,
            ExchangeError::Io {
                before_response: true,
                wrote_head,
                ..
            } => Cause::Reset { sent: *wrote_head },
            ExchangeError::Io { .. } | ExchangeError::Protocol(_) => Cause::Broken,
        },
    })
}

fn no_target(upstream: &Upstream, why: NoTarget) -> GatewayError {
    match why {
        NoTarget::Down => GatewayError::new(
            ErrorKind::NoHealthyTarget,
            format!("no healthy target in upstream '{}'", upstream.name),
        ),
        NoTarget::Open => GatewayError::new(
            ErrorKind::CircuitOpen,
            format!(
                "the circuit breakers of upstream '{}' are open: no target takes requests now",
                upstream.name
            ),
        ),
    }
}

fn tls_failed(target: &str, error: &std::io::Error, tries: &str) -> GatewayError {
    let what = if crate::upstream_tls::is_verification_failure(error) {
        "TLS verification of upstream"
    } else {
        "TLS handshake with upstream"
    };
    GatewayError::new(
        ErrorKind::UpstreamTlsFailed,
        format!(
            "{what} {target} failed: {}{tries}",
            crate::upstream_tls::reason(error)
        ),
    )
}

/// The client's error for a failed last attempt.
fn send_error(
    e: &Failed,
    target: &str,
    upstream: &Upstream,
    timeouts: &TimeoutSet,
    attempts: usize,
) -> GatewayError {
    let total = timeouts.total;
    let tries = if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    };
    match e {
        Failed::Total => GatewayError::new(
            ErrorKind::UpstreamTimeout,
            format!(
                "no response from upstream '{}' within the total timeout of {:?}{tries}",
                upstream.name,
                total.unwrap_or_default()
            ),
        ),
        Failed::Send(SendError::ConnectTimeout) => GatewayError::new(
            ErrorKind::UpstreamTimeout,
            format!("connecting to upstream {target} timed out{tries}"),
        ),
        Failed::Send(SendError::Connect(io)) => GatewayError::new(
            ErrorKind::UpstreamUnreachable,
            format!("could not connect to upstream {target}: {io}{tries}"),
        ),
        Failed::Send(SendError::Tls(io)) => tls_failed(target, io, &tries),
        Failed::Send(SendError::Exchange(ExchangeError::Io {
            before_response: true,
            error,
            ..
        })) if tls_error(error).is_some() => tls_failed(target, error, &tries),
        Failed::Send(SendError::Exchange(ExchangeError::Body(BodyError::TooLarge))) => {
            GatewayError::new(ErrorKind::BodyTooLarge, "request body is above the limit")
        }
        Failed::Send(SendError::Exchange(ExchangeError::Body(BodyError::Malformed(m)))) => {
            crate::body::read_failed(&**m)
        }
        Failed::Send(SendError::Exchange(ExchangeError::Io { error, .. }))
            if error.kind() == std::io::ErrorKind::TimedOut =>
        {
            GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!("upstream {target}: {error}{tries}"),
            )
        }
        Failed::Send(SendError::Exchange(e)) => GatewayError::new(
            ErrorKind::UpstreamUnreachable,
            format!("lost the connection to upstream {target}: {e}{tries}"),
        ),
    }
}
