//! The built-in echo upstream of the quickstart: answers every request with a JSON
//! description of what it received.

use crate::server::log_event;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::{FromRawFd, RawFd};
use tokio::signal::unix::{signal, SignalKind};

const BODY_ECHO_LIMIT: usize = 64 * 1024;

async fn describe(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut length = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            length += d.len();
            let room = BODY_ECHO_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&d[..d.len().min(room)]);
        }
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "body_length": length,
        "body": String::from_utf8_lossy(&kept),
    });
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Serve the echo upstream on a listening socket until SIGTERM.
pub fn serve_echo(fd: RawFd) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        // SAFETY: the master handed us this listening socket.
        let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        std.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(std).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let builder = auto::Builder::new(TokioExecutor::new());
        log_event("info", "echo_started", serde_json::json!({}));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                conn = listener.accept() => {
                    let Ok((stream, _)) = conn else { continue };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service_fn(|r| async { Ok::<_, Infallible>(describe(r).await) }))
                        .into_owned();
                    tokio::spawn(async move { let _ = conn.await; });
                }
            }
        }
    })
}
