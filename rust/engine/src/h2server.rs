//! What the gateway adds to hyper's HTTP/2 server for its clients.
//!
//! - A connection with no stream in flight for `timeouts.client_idle` is closed, as an
//!   idle HTTP/1.1 keep-alive connection is. hyper keeps no such time, so the gateway
//!   counts the streams it serves: each is open from its request until its response body
//!   is done or dropped (a reset stream drops it).
//! - Each stream's request body fails once a read waits longer than `timeouts.client_body`
//!   ([`InboundBody::stream`]).
//!
//! A WebSocket session over an extended CONNECT holds its stream open until it ends
//! ([`StreamHold`]). A client that opens a stream and never finishes its headers holds
//! none (hyper calls the service with whole heads only), so the idle timeout ends it too.

use crate::body::InboundBody;
use crate::proxy::{self, ProxyBody, Worker};
use crate::tls::TlsConn;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The streams of one connection that are in flight, and since when none has been.
pub struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Told when the last open stream ends.
    ended: Notify,
}

impl Streams {
    pub fn new() -> Arc<Self> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            ended: Notify::new(),
        })
    }

    fn enter(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once no stream has been open for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            if self.open() > 0 {
                self.ended.notified().await;
                continue;
            }
            let since = self.since();
            tokio::select! {
                () = tokio::time::sleep_until(since + idle) => {
                    if self.open() == 0 && self.since() == since {
                        return;
                    }
                }
                // A stream came and went meanwhile: count from its end.
                () = self.ended.notified() => {}
            }
        }
    }
}

/// One stream in flight; its drop ends it.
pub struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.0.ended.notify_one();
        }
    }
}

/// A stream that outlives its response: an extended CONNECT's WebSocket session holds it
/// (`websocket.rs`) until the session ends.
#[derive(Clone)]
pub struct StreamHold(#[allow(dead_code)] Arc<OpenStream>);

/// A response body that keeps its stream counted open until it is done.
pub struct Counted<B> {
    inner: B,
    _open: OpenStream,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The service of one HTTP/2 client connection.
#[derive(Clone)]
pub struct StreamService {
    pub worker: Arc<Worker>,
    pub peer: SocketAddr,
    pub client_ip: HeaderValue,
    pub tls: Option<TlsConn>,
    pub streams: Arc<Streams>,
    /// `timeouts.client_body`.
    pub body_stall: Duration,
}

type Served = http::Response<Counted<ProxyBody>>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for StreamService {
    type Response = Served;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Served, Infallible>> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let open = self.streams.enter();
        let me = self.clone();
        Box::pin(async move {
            let mut req = req.map(|b| InboundBody::stream(b, me.body_stall));
            if let Some(tls) = me.tls {
                req.extensions_mut().insert(tls);
            }
            if req.method() == http::Method::CONNECT {
                let hold = StreamHold(Arc::new(me.streams.enter()));
                req.extensions_mut().insert(hold);
            }
            let resp = proxy::handle(&me.worker, req, me.peer, me.client_ip, None).await;
            Ok(resp.map(|inner| Counted { inner, _open: open }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_stream() {
        let streams = Streams::new();
        let first = streams.enter();
        let second = streams.enter();
        let idle = streams.clone();
        let waited = tokio::spawn(async move {
            let started = Instant::now();
            idle.idle_for(Duration::from_secs(10)).await;
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(first);
        assert!(!waited.is_finished(), "a stream is still open");
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(second);
        tokio::time::sleep(Duration::from_secs(4)).await;
        // a stream that comes and goes restarts the count
        drop(streams.enter());
        assert_eq!(streams.open(), 0);
        let elapsed = waited.await.unwrap();
        assert_eq!(elapsed, Duration::from_secs(30 + 5 + 4 + 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_opens_a_stream_is_idle_from_its_start() {
        let streams = Streams::new();
        let started = Instant::now();
        streams.idle_for(Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
