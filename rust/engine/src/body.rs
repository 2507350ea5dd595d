//! Body types of the request path. Bodies stream frame by frame in both directions, so
//! hyper's flow control gives backpressure end to end and memory stays bounded.

use crate::h1client::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// Why a request body could not be forwarded.
#[derive(Debug)]
pub enum BodyError {
    /// More bytes than `limits.max_body_bytes`.
    TooLarge,
    /// The client's framing was invalid (bad chunk size, early close).
    Malformed(hyper::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => f.write_str("request body too large"),
            BodyError::Malformed(e) => write!(f, "malformed request body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// The client's body on its way upstream, counted against the body limit.
pub struct RequestBody {
    inner: Incoming,
    first: Option<Frame<Bytes>>,
    seen: u64,
    limit: u64,
}

impl RequestBody {
    /// `first` is a frame already read (to validate framing before forwarding).
    pub fn new(inner: Incoming, first: Option<Frame<Bytes>>, limit: u64) -> Self {
        let seen = first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        RequestBody {
            inner,
            first,
            seen,
            limit,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.seen += d.len() as u64;
                    if self.limit > 0 && self.seen > self.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                }
                Some(Ok(f))
            }
            Some(Err(e)) => Some(Err(BodyError::Malformed(e))),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(n) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        {
            hint.set_lower(hint.lower() + n);
            if let Some(u) = hint.upper() {
                hint.set_upper(u + n);
            }
        }
        hint
    }
}

/// A response body: the upstream's, streamed, or one the gateway wrote itself. `G` is
/// held until the body is done (it frees the target's in-flight slot).
pub enum ResponseBody<G> {
    Upstream { inner: UpstreamBody, _guard: G },
    Full(Option<Bytes>),
}

impl<G> ResponseBody<G> {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }
}

impl<G: Unpin> Body for ResponseBody<G> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { inner, .. } => Pin::new(inner).poll_frame(cx),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
