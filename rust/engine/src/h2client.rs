//! The HTTP/2 client side of the proxy, for upstreams that speak h2 (`grpc://`,
//! `grpcs://`, `http2: true`): hyper's client over one multiplexed connection per target.
//!
//! The connection is made on first use and kept in the target's pool; a closed one (GOAWAY,
//! reset, idle close) is replaced by the next request. Unlike HTTP/1.1, the request body is
//! owned by the connection's task while it streams (bidirectional streaming needs both
//! bodies open at once), so it moves into a shared slot: a request that fails before any
//! response takes it back, and can then be sent again.

use crate::body::{BodyError, RequestBody};
use crate::forwarding::Forwarding;
use crate::h1client::{ExchangeError, Stream};
use crate::pool::{AttemptTimeouts, SendError};
use crate::upstream_tls::TargetTls;
use bytes::Bytes;
use http::{header, request, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The request body as hyper's connection task sees it: the request's [`RequestBody`],
/// taken back by the request when the stream fails before a response.
#[derive(Clone)]
pub struct SharedBody(Arc<Mutex<Option<RequestBody>>>);

impl SharedBody {
    fn take(&self) -> Option<RequestBody> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Body for SharedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

/// A target's HTTP/2 connection (made lazily, replaced when closed).
pub struct H2Conn {
    address: String,
    scheme: http::uri::Scheme,
    tls: Option<TargetTls>,
    sender: tokio::sync::Mutex<Option<SendRequest<SharedBody>>>,
}

impl H2Conn {
    pub fn new(address: &str, tls: Option<TargetTls>) -> Self {
        H2Conn {
            address: address.to_string(),
            scheme: if tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            tls,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// The open connection, or a new one; `reused` says which.
    async fn sender(&self, connect_timeout: Duration) -> Result<(SendRequest<SharedBody>, bool), SendError> {
        let mut slot = self.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok((s.clone(), true));
        }
        let opened = async {
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(SendError::Connect)?;
            let _ = tcp.set_nodelay(true);
            let stream = match &self.tls {
                None => Stream::Plain(tcp),
                Some(tls) => Stream::Tls(Box::new(tls.connect_h2(tcp).await.map_err(SendError::Tls)?)),
            };
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| SendError::Connect(std::io::Error::other(e)))
        };
        let (sender, conn) = tokio::time::timeout(connect_timeout, opened)
            .await
            .map_err(|_| SendError::ConnectTimeout)??;
        tokio::spawn(async move {
            // Ends when the upstream closes it or every sender is dropped.
            let _ = conn.await;
        });
        *slot = Some(sender.clone());
        Ok((sender, false))
    }

    /// Send a request and wait for the response head (bounded by the read timeout from
    /// `started`); the response body streams from the connection's task. A connection that
    /// turns out closed under a request that had not started is replaced once.
    pub async fn send(
        &self,
        parts: &request::Parts,
        body: &mut RequestBody,
        forwarding: Option<&Forwarding>,
        timeouts: &AttemptTimeouts,
        started: Instant,
    ) -> Result<Response<hyper::body::Incoming>, SendError> {
        let deadline = timeouts.read.map(|r| started + r);
        let mut again = true;
        loop {
            let (mut sender, reused) = self.sender(timeouts.connect).await?;
            let ready = async { sender.ready().await.map(|()| sender) };
            let mut sender = match ready.await {
                Ok(s) => s,
                Err(_) if reused && again => {
                    again = false;
                    self.forget().await;
                    continue;
                }
                Err(e) => return Err(io_error(e, false, false)),
            };
            let shared = SharedBody(Arc::new(Mutex::new(Some(std::mem::replace(
                body,
                RequestBody::moved(),
            )))));
            let req = Request::from_parts(self.head(parts, forwarding)?, shared.clone());
            let sent = sender.send_request(req);
            let result = match deadline {
                None => sent.await.map_err(Some),
                Some(d) => match tokio::time::timeout_at(d.into(), sent).await {
                    Ok(r) => r.map_err(Some),
                    Err(_) => Err(None),
                },
            };
            match result {
                Ok(resp) => {
                    // A body sent whole (a unary call) comes back: it counts, and a retry on
                    // the response's status can send it again. One still streaming stays.
                    let mut slot = shared.0.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.as_ref().is_some_and(|b| b.is_end_stream()) {
                        *body = slot.take().expect("checked");
                    } else {
                        *body = RequestBody::moved();
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    // The request's body comes back for a retry (when none of it was sent).
                    if let Some(b) = shared.take() {
                        *body = b;
                    }
                    let sent_body = !body.replayable();
                    let Some(e) = e else {
                        return Err(SendError::Exchange(ExchangeError::Io {
                            error: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "timed out waiting for the upstream's response",
                            ),
                            before_response: true,
                            wrote_head: true,
                            sent_body,
                        }));
                    };
                    let unsent = e.is_canceled() || e.is_closed();
                    if unsent {
                        self.forget().await;
                    }
                    if unsent && reused && again && !sent_body {
                        again = false;
                        continue;
                    }
                    return Err(io_error(e, !unsent, sent_body));
                }
            }
        }
    }

    async fn forget(&self) {
        *self.sender.lock().await = None;
    }

    /// The request head for an h2 stream: an absolute URI (its authority from the Host
    /// that the request would have carried), no connection-specific fields.
    fn head(
        &self,
        parts: &request::Parts,
        forwarding: Option<&Forwarding>,
    ) -> Result<request::Parts, SendError> {
        let mut head = Request::new(());
        *head.method_mut() = parts.method.clone();
        *head.version_mut() = Version::HTTP_2;
        let mut headers = parts.headers.clone();
        if let Some(f) = forwarding {
            f.apply(&mut headers);
        }
        let authority = headers
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| self.address.clone());
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
        for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE] {
            headers.remove(name);
        }
        headers.remove("keep-alive");
        headers.remove("proxy-connection");
        // Only `te: trailers` may cross an h2 hop; gRPC servers require it.
        if headers.get(header::TE).is_some_and(|v| v != "trailers")
            || crate::grpc::is_grpc(&headers) && !headers.contains_key(header::TE)
        {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        *head.uri_mut() = uri;
        *head.headers_mut() = headers;
        Ok(head.into_parts().0)
    }
}

fn io_error(e: hyper::Error, wrote_head: bool, sent_body: bool) -> SendError {
    SendError::Exchange(ExchangeError::Io {
        error: std::io::Error::other(e),
        before_response: true,
        wrote_head,
        sent_body,
    })
}
