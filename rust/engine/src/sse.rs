//! Heartbeats on server-sent event streams (`routes[].sse_heartbeat`): when an event
//! stream has sent nothing for that long and what it sent so far ends at an event boundary,
//! the gateway sends the comment `: ping` (which every SSE client ignores), so that proxies
//! and clients with idle timeouts keep a slow stream (a model thinking) open.
//!
//! The heartbeat sits above the plugins' chunk hooks (they see the upstream's bytes only)
//! and below compression (which flushes whenever the body below it waits).

use bytes::Bytes;
use http::{header, Response};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

const PING: &[u8] = b": ping\n\n";

pub struct Heartbeat<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// The last bytes sent (at most four), to see whether they end an event.
    tail: Tail,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tail {
    bytes: [u8; 4],
    len: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        for &b in data.iter().rev().take(4).rev() {
            if self.len == 4 {
                self.bytes.rotate_left(1);
                self.bytes[3] = b;
            } else {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// Nothing sent yet, or the last event ended (a blank line, LF or CRLF).
    fn at_boundary(&self) -> bool {
        let t = &self.bytes[..self.len];
        t.is_empty() || t.ends_with(b"\n\n") || t.ends_with(b"\r\n\r\n")
    }
}

/// Whether a response is an event stream a heartbeat may go into: its content type says
/// so, and it has no stated length (extra bytes would break the framing).
pub fn applies<B: Body>(resp: &Response<B>) -> bool {
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|m| m.eq_ignore_ascii_case("text/event-stream"))
        });
    sse && resp.body().size_hint().exact().is_none() && !resp.headers().contains_key(header::CONTENT_LENGTH)
}

impl<B> Heartbeat<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Heartbeat {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            tail: Tail::default(),
        }
    }
}

impl<B> Body for Heartbeat<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    this.tail.push(data);
                    let next = Instant::now() + this.idle;
                    this.timer.as_mut().reset(next);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Pending => {}
            done => return done,
        }
        // Mid-event, a comment would land inside the event: wait for its end.
        if this.tail.at_boundary() && this.timer.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + this.idle;
            this.timer.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(PING)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_boundaries_are_seen_across_chunks() {
        let mut t = Tail::default();
        assert!(t.at_boundary());
        t.push(b"data: {\"a\":1}\n");
        assert!(!t.at_boundary());
        t.push(b"\n");
        assert!(t.at_boundary());
        t.push(b"data: x\r\n\r");
        assert!(!t.at_boundary());
        t.push(b"\n");
        assert!(t.at_boundary());
        t.push(b"event: done\n\ndata");
        assert!(!t.at_boundary());
    }

    #[test]
    fn only_unsized_event_streams_get_heartbeats() {
        let sse = |ct: &str, body: &'static str| {
            Response::builder()
                .header(header::CONTENT_TYPE, ct)
                .body(http_body_util::Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        // a Full body states its length: no heartbeats
        assert!(!applies(&sse("text/event-stream", "data: 1\n\n")));
        let streamed = |ct: &str| {
            Response::builder()
                .header(header::CONTENT_TYPE, ct)
                .body(Unsized)
                .unwrap()
        };
        assert!(applies(&streamed("Text/Event-Stream; charset=utf-8")));
        assert!(!applies(&streamed("application/json")));
    }

    /// A body of unknown length, as an upstream's chunked one.
    struct Unsized;

    impl Body for Unsized {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    #[tokio::test]
    async fn a_ping_goes_out_only_after_an_idle_event_boundary() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<&'static [u8]>(4);
        let inner = Chunks(rx);
        let mut body = Heartbeat::new(inner, Duration::from_millis(100));
        tx.send(b"data: 1\n\n").await.unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "data: 1\n\n"
        );
        // idle at a boundary: a ping once the idle time has passed
        let start = Instant::now();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            ": ping\n\n"
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        // mid-event: no ping, however long it takes
        tx.send(b"data: 2\n").await.unwrap();
        body.frame().await.unwrap().unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(400), body.frame()).await;
        assert!(waiting.is_err());
        tx.send(b"\n").await.unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "\n");
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    /// An upstream body fed by the test.
    struct Chunks(tokio::sync::mpsc::Receiver<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|c| c.map(|c| Ok(Frame::data(Bytes::from_static(c)))))
        }
    }
}
