//! Body types of the request path. Bodies stream frame by frame in both directions, so
//! hyper's flow control gives backpressure end to end and memory stays bounded.

use crate::h1client::UpstreamBody;
use crate::plugins::{LogRecord, PluginHost, PluginState};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

/// A client's request body as the connection's server read it: hyper's (HTTP/2, and the
/// HTTP/1.1 requests `h1server.rs` hands over), or `h1server.rs`'s own (none, or
/// Content-Length bytes).
#[derive(Debug)]
pub enum InboundBody {
    Hyper(hyper::body::Incoming),
    Empty,
    Sized(crate::h1server::SizedBody),
    /// An HTTP/2 stream's body, with the `client_body` stall timeout: one stream's reads
    /// cannot be timed at the connection, which carries the other streams too.
    Stream(Box<(hyper::body::Incoming, StallTimer)>),
}

impl InboundBody {
    /// A stream's body that fails once a read waits longer than `stall` (zero: no limit).
    pub fn stream(body: hyper::body::Incoming, stall: std::time::Duration) -> Self {
        if body.is_end_stream() || stall.is_zero() {
            return InboundBody::Hyper(body);
        }
        InboundBody::Stream(Box::new((body, StallTimer::new(stall))))
    }
}

/// How long a body read has waited for data, against a limit (`timeouts.client_body`).
#[derive(Debug)]
pub struct StallTimer {
    limit: Option<std::time::Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl StallTimer {
    /// A zero `limit` never fires.
    pub fn new(limit: std::time::Duration) -> Self {
        StallTimer {
            limit: (!limit.is_zero()).then_some(limit),
            timer: None,
            waiting: false,
        }
    }

    /// The read waits for data: true once it has waited longer than the limit. The timer
    /// starts at the first wait after data (one allocation per body, reset after that).
    pub fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.timer
            .as_mut()
            .is_some_and(|t| std::future::Future::poll(t.as_mut(), cx).is_ready())
    }

    /// Data came: the next wait starts a new count.
    pub fn moved(&mut self) {
        self.waiting = false;
    }
}

/// The error of a body whose client stopped sending for longer than `client_body`, whichever
/// server read it ([`read_failed`] tells it apart by its kind).
pub fn stalled_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the request body stalled beyond the client_body timeout",
    )
}

/// The client's answer when its request body could not be read: 408 when it stalled
/// (as nginx answers its `client_body_timeout`), 400 when its framing was broken.
#[cold]
pub fn read_failed(e: &(dyn std::error::Error + 'static)) -> crate::error::GatewayError {
    use crate::error::{ErrorKind, GatewayError};
    let stalled = e
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
    if stalled {
        return GatewayError::new(ErrorKind::RequestTimeout, e.to_string());
    }
    GatewayError::new(ErrorKind::BadRequest, format!("malformed request body: {e}"))
}

/// A body read error, whichever server read it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for InboundBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            InboundBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            InboundBody::Empty => Poll::Ready(None),
            InboundBody::Sized(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            InboundBody::Stream(s) => {
                let (body, stall) = &mut **s;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending if stall.stalled(cx) => Poll::Ready(Some(Err(stalled_error().into()))),
                    Poll::Pending => Poll::Pending,
                    ready => {
                        stall.moved();
                        ready.map_err(Into::into)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InboundBody::Hyper(b) => b.is_end_stream(),
            InboundBody::Empty => true,
            InboundBody::Sized(b) => b.is_end_stream(),
            InboundBody::Stream(s) => s.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InboundBody::Hyper(b) => b.size_hint(),
            InboundBody::Empty => SizeHint::with_exact(0),
            InboundBody::Sized(b) => b.size_hint(),
            InboundBody::Stream(s) => s.0.size_hint(),
        }
    }
}

/// Why a request body could not be forwarded.
#[derive(Debug)]
pub enum BodyError {
    /// More bytes than `limits.max_body_bytes`.
    TooLarge,
    /// The client's framing was invalid (bad chunk size, early close).
    Malformed(BoxError),
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
///
/// It can keep what it hands out (reference-counted slices, no copy) up to a cap, so that a
/// retry can send the body again: [`RequestBody::rewind`].
pub struct RequestBody {
    /// None once the whole body is in `first` (buffered for plugins).
    inner: Option<InboundBody>,
    first: Option<Frame<Bytes>>,
    seen: u64,
    limit: u64,
    /// Something was handed out (since the last rewind).
    handed: bool,
    keep: Keep,
    /// The first bytes handed out, kept for the access log.
    capture: Option<Box<BodyCapture>>,
}

struct BodyCapture {
    bytes: Vec<u8>,
    cap: usize,
}

/// Data frames kept for a resend, and how many of them were handed out again since the
/// last rewind.
enum Keep {
    Off,
    On {
        frames: Vec<Bytes>,
        bytes: u64,
        cap: u64,
        replayed: usize,
    },
    /// Went over the cap: the body cannot be sent again.
    Lost,
}

impl RequestBody {
    /// `first` is a frame already read (to validate framing before forwarding).
    pub fn new(inner: InboundBody, first: Option<Frame<Bytes>>, limit: u64) -> Self {
        let seen = first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        RequestBody {
            inner: Some(inner),
            first,
            seen,
            limit,
            handed: false,
            keep: Keep::Off,
            capture: None,
        }
    }

    /// A body already read whole (it can always be sent again).
    pub fn buffered(bytes: Bytes) -> Self {
        RequestBody {
            inner: None,
            seen: bytes.len() as u64,
            first: (!bytes.is_empty()).then(|| Frame::data(bytes)),
            limit: 0,
            handed: false,
            keep: Keep::On {
                frames: Vec::new(),
                bytes: 0,
                cap: u64::MAX,
                replayed: 0,
            },
            capture: None,
        }
    }

    /// What stays with the request while its body streams from another task (an HTTP/2
    /// upstream's connection): empty, and never sent again.
    pub fn moved() -> Self {
        RequestBody {
            inner: None,
            first: None,
            seen: 0,
            limit: 0,
            handed: true,
            keep: Keep::Lost,
            capture: None,
        }
    }

    /// Body bytes read from the client so far.
    pub fn bytes_read(&self) -> u64 {
        self.seen
    }

    /// Keep up to `cap` bytes of what is handed out from now on, for [`rewind`]. Only
    /// before anything was handed out.
    ///
    /// [`rewind`]: RequestBody::rewind
    pub fn keep_for_resend(&mut self, cap: u64) {
        if matches!(self.keep, Keep::Off) && !self.handed && cap > 0 {
            self.keep = Keep::On {
                frames: Vec::new(),
                bytes: 0,
                cap,
                replayed: 0,
            };
        }
    }

    /// Copy the first `cap` bytes handed out from now on (what a retry sends again is not
    /// copied twice).
    pub fn capture_first(&mut self, cap: usize) {
        if cap > 0 && !self.handed {
            self.capture = Some(Box::new(BodyCapture {
                bytes: Vec::new(),
                cap,
            }));
        }
    }

    /// What [`capture_first`] copied; None when nothing was.
    ///
    /// [`capture_first`]: RequestBody::capture_first
    pub fn take_captured(&mut self) -> Option<Bytes> {
        self.capture
            .take()
            .filter(|c| !c.bytes.is_empty())
            .map(|c| Bytes::from(c.bytes))
    }

    #[inline]
    fn copy_captured(&mut self, data: &Bytes) {
        if let Some(c) = self.capture.as_mut() {
            let n = c.cap.saturating_sub(c.bytes.len()).min(data.len());
            c.bytes.extend_from_slice(&data[..n]);
        }
    }

    /// Whether the body can be sent (again) from its start: nothing was handed out, or all
    /// of it was kept.
    pub fn replayable(&self) -> bool {
        !self.handed || matches!(self.keep, Keep::On { .. })
    }

    /// Start over: what was handed out is handed out again, then the rest of the client's
    /// body. False (and nothing changes) when that is not possible.
    pub fn rewind(&mut self) -> bool {
        if !self.handed {
            return true;
        }
        match &mut self.keep {
            Keep::On { replayed, .. } => {
                *replayed = 0;
                self.handed = false;
                true
            }
            Keep::Off | Keep::Lost => false,
        }
    }

    /// Bytes kept and not handed out again yet.
    fn pending_replay(&self) -> (u64, bool) {
        match &self.keep {
            Keep::On { frames, replayed, .. } if *replayed < frames.len() => {
                (frames[*replayed..].iter().map(|f| f.len() as u64).sum(), true)
            }
            _ => (0, false),
        }
    }

    /// The next data frame when it needs no read: kept for a resend, or read with the
    /// head. The upstream client sends it in the same write as the request head (one
    /// segment and one wake-up of the upstream instead of two).
    pub fn data_at_hand(&self) -> Option<&Bytes> {
        if let Keep::On { frames, replayed, .. } = &self.keep {
            if *replayed < frames.len() {
                return Some(&frames[*replayed]);
            }
        }
        self.first.as_ref().and_then(|f| f.data_ref())
    }

    /// Hand out the frame [`data_at_hand`] showed, as `poll_frame` would have.
    ///
    /// [`data_at_hand`]: RequestBody::data_at_hand
    pub fn take_at_hand(&mut self) {
        let _ = self.next_at_hand();
    }

    fn next_at_hand(&mut self) -> Option<Frame<Bytes>> {
        if let Keep::On { frames, replayed, .. } = &mut self.keep {
            if *replayed < frames.len() {
                *replayed += 1;
                self.handed = true;
                return Some(Frame::data(frames[*replayed - 1].clone()));
            }
        }
        let f = self.first.take()?;
        self.handed = true;
        if let Some(d) = f.data_ref() {
            self.kept(d);
            self.copy_captured(d);
        }
        Some(f)
    }

    /// Remember a data frame on its way out.
    #[inline]
    fn kept(&mut self, data: &Bytes) {
        if let Keep::On {
            frames,
            bytes,
            cap,
            replayed,
        } = &mut self.keep
        {
            *bytes += data.len() as u64;
            if *bytes > *cap {
                self.keep = Keep::Lost;
            } else {
                frames.push(data.clone());
                *replayed = frames.len();
            }
        }
    }
}

/// Read a whole body of at most `cap` bytes (0 = no cap); `None` when it is larger.
pub async fn collect_capped<B>(body: B, cap: u64) -> Result<Option<Bytes>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    Ok(collect_with_trailers(body, cap).await?.map(|(b, _)| b))
}

/// [`collect_capped`], keeping the trailers (a gRPC response's status is there).
pub async fn collect_with_trailers<B>(
    mut body: B,
    cap: u64,
) -> Result<Option<(Bytes, Option<http::HeaderMap>)>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut total = 0u64;
    let mut trailers: Option<http::HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                total += data.len() as u64;
                if cap > 0 && total > cap {
                    return Ok(None);
                }
                parts.push(data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(Default::default).extend(t);
                }
            }
        }
    }
    Ok(Some((join(parts, total), trailers)))
}

fn join(mut parts: Vec<Bytes>, total: u64) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().expect("one part"),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(total as usize);
            for p in parts {
                all.extend_from_slice(&p);
            }
            all.freeze()
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
        let this = &mut *self;
        if let Some(f) = this.next_at_hand() {
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(f)) => {
                this.handed = true;
                if let Some(d) = f.data_ref() {
                    this.seen += d.len() as u64;
                    if this.limit > 0 && this.seen > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    this.kept(d);
                    this.copy_captured(d);
                }
                Some(Ok(f))
            }
            Some(Err(e)) => Some(Err(BodyError::Malformed(e))),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && !matches!(&self.inner, Some(b) if !b.is_end_stream())
            && !matches!(&self.keep, Keep::On { frames, replayed, .. } if *replayed < frames.len())
    }

    fn size_hint(&self) -> SizeHint {
        let first = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64)
            + self.pending_replay().0;
        let Some(inner) = self.inner.as_ref() else {
            return SizeHint::with_exact(first);
        };
        let mut hint = inner.size_hint();
        if first > 0 {
            // Upper first: a lower bound above the old upper one would be refused.
            if let Some(u) = hint.upper() {
                hint.set_upper(u + first);
            }
            hint.set_lower(hint.lower() + first);
        }
        hint
    }
}

/// A response body: the upstream's, streamed, or one the gateway wrote itself. `G` is
/// held until the body is done (it frees the target's in-flight slot). `Tapped` runs a
/// plugin chain's body hooks on the way out and its log phase when done.
pub enum ResponseBody<G> {
    Upstream {
        inner: UpstreamBody,
        _guard: G,
    },
    Full(Option<Bytes>),
    Tapped(Box<(ResponseBody<G>, BodyTap)>),
    /// Counted (and partly captured) for the request's record, finished at its end.
    Observed(Box<(ResponseBody<G>, crate::observe::Finish)>),
    /// Compressed on the way out (`compress.rs`).
    Compressed(Box<crate::compress::Compressed<ResponseBody<G>>>),
    /// A whole body, then trailers (a buffered gRPC response after the plugins' body hooks).
    Trailed(Option<Bytes>, Option<Box<http::HeaderMap>>),
    /// A gRPC response framed for a gRPC-Web client (`grpc_web.rs`).
    GrpcWeb(Box<crate::grpc_web::WebBody<ResponseBody<G>>>),
    /// An event stream with heartbeats while idle (`sse.rs`).
    Heartbeat(Box<crate::sse::Heartbeat<ResponseBody<G>>>),
}

/// The plugin side of a response body: chunk hooks (streamed mode), and the log record
/// handed to the host when the body is finished or dropped (the client may have gone).
pub struct BodyTap {
    pub host: Arc<dyn PluginHost>,
    pub chain: u32,
    pub state: Option<PluginState>,
    pub stream: bool,
    pub log: bool,
    pub status: u16,
    pub started: Instant,
    pub upstream: Option<String>,
    pub sent: u64,
    pub error: Option<String>,
    last_seen: bool,
    finished: bool,
}

impl BodyTap {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: Arc<dyn PluginHost>,
        chain: u32,
        state: Option<PluginState>,
        stream: bool,
        log: bool,
        status: u16,
        started: Instant,
        upstream: Option<String>,
    ) -> Self {
        BodyTap {
            host,
            chain,
            state,
            stream,
            log,
            status,
            started,
            upstream,
            sent: 0,
            error: None,
            last_seen: false,
            finished: false,
        }
    }

    /// A body with nothing to send is complete before it is ever polled.
    pub fn with_body_state(mut self, body_done: bool) -> Self {
        self.finished = body_done && !self.stream;
        self
    }

    fn chunk(&mut self, data: Bytes, last: bool) -> Result<Bytes, std::io::Error> {
        self.last_seen |= last;
        if !self.stream {
            return Ok(data);
        }
        let Some(state) = self.state.as_ref() else {
            return Ok(data);
        };
        self.host
            .on_response_chunk(self.chain, state, data, last)
            .map_err(|e| {
                self.error = Some(e.message.clone());
                std::io::Error::other(e.message)
            })
    }
}

impl Drop for BodyTap {
    fn drop(&mut self) {
        if !self.log {
            return;
        }
        let Some(state) = self.state.take() else {
            return;
        };
        if !self.finished && self.error.is_none() {
            self.error = Some("the response did not complete (client gone?)".into());
        }
        self.host.log(LogRecord {
            chain: self.chain,
            state,
            status: self.status,
            bytes_sent: self.sent,
            duration: self.started.elapsed().as_secs_f64(),
            upstream: self.upstream.take(),
            error: self.error.take(),
        });
    }
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
            ResponseBody::Observed(o) => {
                let (inner, finish) = &mut **o;
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            finish.sent(d);
                        }
                        if inner.is_end_stream() {
                            finish.done();
                        }
                    }
                    None => finish.done(),
                    Some(Err(_)) => {}
                }
                Poll::Ready(frame)
            }
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Compressed(c) => Pin::new(&mut **c).poll_frame(cx),
            ResponseBody::GrpcWeb(w) => Pin::new(&mut **w).poll_frame(cx),
            ResponseBody::Heartbeat(h) => Pin::new(&mut **h).poll_frame(cx),
            ResponseBody::Trailed(b, t) => Poll::Ready(match b.take().filter(|b| !b.is_empty()) {
                Some(b) => Some(Ok(Frame::data(b))),
                None => t.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            ResponseBody::Tapped(t) => {
                let (inner, tap) = &mut **t;
                loop {
                    match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            let frame = match frame.into_data() {
                                Ok(data) => {
                                    let last = inner.is_end_stream();
                                    let out = tap.chunk(data, last)?;
                                    if out.is_empty() {
                                        // An empty chunk could read as the end on the wire.
                                        continue;
                                    }
                                    tap.sent += out.len() as u64;
                                    tap.finished |= last;
                                    Frame::data(out)
                                }
                                Err(other) => other,
                            };
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Some(Err(e)) => {
                            tap.error = Some(e.to_string());
                            return Poll::Ready(Some(Err(e)));
                        }
                        None => {
                            if tap.stream && !tap.last_seen {
                                // The end came without a last chunk: let the hooks flush.
                                let out = tap.chunk(Bytes::new(), true)?;
                                if !out.is_empty() {
                                    tap.sent += out.len() as u64;
                                    return Poll::Ready(Some(Ok(Frame::data(out))));
                                }
                            }
                            tap.finished = true;
                            return Poll::Ready(None);
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
            // Chunk hooks may still have something to say at the end.
            ResponseBody::Tapped(t) => t.0.is_end_stream() && (!t.1.stream || t.1.last_seen),
            ResponseBody::Observed(o) => o.0.is_end_stream(),
            ResponseBody::Compressed(c) => c.is_end_stream(),
            ResponseBody::GrpcWeb(w) => w.is_end_stream(),
            ResponseBody::Heartbeat(h) => h.is_end_stream(),
            ResponseBody::Trailed(b, t) => b.as_ref().is_none_or(|b| b.is_empty()) && t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Tapped(t) if t.1.stream => SizeHint::default(),
            ResponseBody::Tapped(t) => t.0.size_hint(),
            ResponseBody::Observed(o) => o.0.size_hint(),
            ResponseBody::Compressed(c) => c.size_hint(),
            ResponseBody::GrpcWeb(w) => w.size_hint(),
            ResponseBody::Heartbeat(h) => h.size_hint(),
            ResponseBody::Trailed(..) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn a_buffered_body_states_its_exact_length() {
        let body = RequestBody::buffered(Bytes::from_static(b"hello"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let empty = RequestBody::buffered(Bytes::new());
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
    }

    #[tokio::test]
    async fn collect_capped_refuses_a_body_over_the_cap() {
        let body = || Full::new(Bytes::from_static(b"abcdef"));
        assert_eq!(collect_capped(body(), 5).await.unwrap(), None);
        assert_eq!(
            collect_capped(body(), 6).await.unwrap().as_deref(),
            Some(&b"abcdef"[..])
        );
        assert_eq!(
            collect_capped(body(), 0).await.unwrap().as_deref(),
            Some(&b"abcdef"[..])
        );
    }
}
