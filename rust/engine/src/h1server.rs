//! The HTTP/1.1 server for plain connections: a keep-alive loop that parses each head with
//! httparse, hands the request to [`proxy::handle`] and writes the response, with one read
//! buffer and one timer for the connection's life. It serves requests without a body or
//! with a Content-Length one, the bulk of API traffic.
//!
//! Why not hyper for these: profiling put hyper's HTTP/1 server on the per-request path
//! (a fresh 8 KiB read buffer per request, because it reads ahead while the request's
//! header values still share the old one; a boxed header-read timer per request; its
//! dispatch machinery). See docs/benchmarks.md.
//!
//! Everything else goes to hyper, with the bytes read so far, for the rest of the
//! connection ([`Outcome::HandOver`]): a chunked body, an upgrade (WebSocket), `Expect`,
//! HTTP/1.0, a request target that is not a path, more headers than the stack holds, and
//! every malformed or oversized head, which hyper answers (400, 431) behind the framing
//! guard as before. The switch happens at a request boundary, so no request is served by
//! both.

use crate::body::{InboundBody, StallTimer};
use crate::proxy::{self, ProxyBody, Worker};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Header slots parsed on the stack; a head with more goes to hyper, which enforces
/// `limits.max_headers` (and answers 431).
const STACK_HEADERS: usize = 64;
/// Fields the gateway may add to a request before it goes upstream.
const ADDED_HEADERS: usize = 8;
/// The read buffer's size; a longer head grows it (up to `max_head`).
pub const READ_SIZE: usize = 4096;
/// Below this much free room, the buffer is topped up before a read.
const MIN_READ_ROOM: usize = 1024;
/// The most of an unread request body skipped to keep the connection.
const DRAIN_MAX: u64 = 64 * 1024;
/// A body read from the connection comes in frames of at most this many bytes.
const BODY_READ: usize = 64 * 1024;

/// A connection's limits, from the config the worker started with.
pub struct Settings {
    /// A head longer than this goes to hyper (which answers 431).
    pub max_head: usize,
    pub max_headers: usize,
    /// The longest wait for the next request's head (`timeouts.client_idle`); zero: none.
    pub idle: Duration,
    /// A head must arrive whole this long after its first byte (`timeouts.client_header`);
    /// zero: no limit.
    pub header: Duration,
    /// The longest a body read may wait for data (`timeouts.client_body`); zero: no limit.
    pub body: Duration,
}

/// How a connection left this server.
pub enum Outcome {
    /// Closed, or to be closed.
    Closed,
    /// hyper serves the rest of the connection, starting with these bytes.
    HandOver(TcpStream, Bytes),
}

/// Serve `stream` until it closes or needs hyper. `buf` holds what was read from it so far;
/// `opened` is when the connection was accepted (the first head's clock starts then).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    stream: TcpStream,
    mut buf: BytesMut,
    worker: &Worker,
    peer: SocketAddr,
    client_ip: &HeaderValue,
    settings: &Settings,
    opened: Instant,
    stopping: &mut watch::Receiver<bool>,
) -> Outcome {
    // Split so that a request body can read while the connection keeps the write side.
    let (reader, mut writer) = stream.into_split();
    let mut reader = Some(reader);
    let mut out = Vec::new();
    let mut clock = Deadlines::new(settings, opened);
    let mut first = true;
    // One wait for the drain per connection, not one per request: each is a waiter entry
    // in the channel's list (about 290 instructions to add and remove, callgrind). It is
    // polled once, to register the task; the task's waker does not change, so a drain
    // wakes it, and each idle wait only checks the channel's version (polling the wait
    // again cost another 240).
    let mut drain = stopping.clone();
    let mut drained = std::pin::pin!(async move {
        let _ = drain.changed().await;
    });
    let mut drain_registered = false;
    loop {
        let Some(rd) = reader.as_mut() else {
            return Outcome::Closed;
        };
        let (mut req, mut close, length) = loop {
            if !buf.is_empty() {
                let foreign = match parse(&mut buf, settings) {
                    Ok(request) => break request,
                    Err(Unserved::Partial) if buf.len() <= settings.max_head => None,
                    Err(Unserved::Partial | Unserved::Foreign) => Some(buf.split().freeze()),
                    Err(Unserved::ForeignAfter(head)) => {
                        let mut all = BytesMut::with_capacity(head.len() + buf.len());
                        all.extend_from_slice(&head);
                        all.extend_from_slice(&buf);
                        Some(all.freeze())
                    }
                };
                if let Some(bytes) = foreign {
                    let Some(rd) = reader.take() else {
                        return Outcome::Closed;
                    };
                    return match rd.reunite(writer) {
                        Ok(stream) => Outcome::HandOver(stream, bytes),
                        Err(_) => Outcome::Closed,
                    };
                }
            }
            let idle = buf.is_empty();
            if idle && stopping.has_changed().unwrap_or(true) {
                return Outcome::Closed; // draining: no new request on this connection
            }
            let deadline = clock.deadline(idle);
            room(&mut buf);
            tokio::select! {
                biased;
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    // The first head's clock started when the connection opened.
                    Ok(_) if idle && !first => clock.head_pending = true,
                    Ok(_) => {}
                },
                () = std::future::poll_fn(|cx| clock.poll_fired(cx)), if deadline.is_some() => {
                    if clock.expired(deadline) {
                        return Outcome::Closed;
                    }
                }
                () = std::future::poll_fn(|cx| {
                    if !drain_registered {
                        drain_registered = true;
                        if drained.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(());
                        }
                    }
                    if stopping.has_changed().unwrap_or(true) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                }), if idle => return Outcome::Closed,
            }
        };
        first = false;
        // The body: what came with the head, and the rest read from the connection by the
        // body itself, which has the read side until it is done.
        let mut lent = None;
        if length > 0 {
            let at_hand = buf.split_to((buf.len() as u64).min(length) as usize).freeze();
            let left = length - at_hand.len() as u64;
            let from = if left > 0 {
                let back = Arc::new(Mutex::new(None));
                lent = Some(back.clone());
                reader.take().map(|rd| (rd, back))
            } else {
                None
            };
            *req.body_mut() = InboundBody::Sized(SizedBody::new(at_hand, left, from, settings.body));
        }
        let head_only = req.method() == Method::HEAD;
        let handling = proxy::handle(worker, req, peer, client_ip.clone(), None);
        let mut handling = std::pin::pin!(handling);
        // The client may leave while its request is in flight: then it is dropped (and
        // logged as 499), as hyper does. Bytes it sends meanwhile (pipelined requests) are
        // kept for later. While the body has the read side, the watch starts when the body
        // gives it back whole.
        let resp = std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            if reader.is_none() {
                reader = lent.as_ref().and_then(take_back_whole);
                if reader.is_some() {
                    lent = None;
                }
            }
            let Some(rd) = reader.as_mut() else {
                return Poll::Pending;
            };
            while buf.len() <= settings.max_head {
                room(&mut buf);
                match poll_read_buf(rd, &mut buf, usize::MAX, cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => {}
                }
            }
            Poll::Pending
        });
        let Some(resp) = resp.await else {
            return Outcome::Closed;
        };
        close |= stopping.has_changed().unwrap_or(true);
        if let Some(back) = &lent {
            // The body's reader is back unless the body failed or is still held somewhere.
            // A short rest of a body the upstream did not read is skipped; a long one
            // leaves the connection unusable. The response says so.
            let left = back.lock().ok().and_then(|b| b.as_ref().map(|(_, left)| *left));
            close |= !matches!(left, Some(left) if left <= DRAIN_MAX);
        }
        let kept = respond(&mut writer, resp, head_only, close, &mut out).await;
        if let Some(back) = lent {
            let returned = back.lock().ok().and_then(|mut b| b.take());
            let Some((mut rd, left)) = returned else {
                return Outcome::Closed;
            };
            if !matches!(kept, Ok(true)) || (left > 0 && !skip(&mut rd, &mut buf, left, settings).await) {
                return Outcome::Closed;
            }
            reader = Some(rd);
        }
        match kept {
            Ok(true) => clock.answered(),
            _ => return Outcome::Closed,
        }
    }
}

/// The read side, if the body gave it back after reading all of itself.
fn take_back_whole(back: &Arc<Mutex<Option<Lent>>>) -> Option<OwnedReadHalf> {
    let mut slot = back.lock().ok()?;
    match slot.take() {
        Some((rd, 0)) => Some(rd),
        other => {
            *slot = other;
            None
        }
    }
}

/// Read what the socket has, at most `limit` bytes, into `buf`'s free room.
fn poll_read_buf(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(limit);
    let mut rb = ReadBuf::uninit(&mut spare[..room]);
    if let Err(e) = std::task::ready!(Pin::new(rd).poll_read(cx, &mut rb)) {
        return Poll::Ready(Err(e));
    }
    let n = rb.filled().len();
    // SAFETY: poll_read initialized the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Read and drop the `left` bytes of a body nobody read, within the body timeout; what
/// follows them stays in `buf`.
async fn skip(rd: &mut OwnedReadHalf, buf: &mut BytesMut, mut left: u64, settings: &Settings) -> bool {
    let skipping = async {
        while left > 0 {
            room(buf);
            match rd.read_buf(buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            let n = (buf.len() as u64).min(left);
            let _ = buf.split_to(n as usize);
            left -= n;
        }
        true
    };
    if settings.body.is_zero() {
        return skipping.await;
    }
    tokio::time::timeout(settings.body, skipping)
        .await
        .unwrap_or(false)
}

/// A Content-Length request body: the bytes that came with the head, then the rest read
/// from the connection as the body is polled. When the last byte is read, or the body is
/// dropped, the read side goes back to the connection with the count of unread bytes.
/// After a failed read (a stall, the client gone) it is not given back: the connection
/// closes after the response.
#[derive(Debug)]
pub struct SizedBody {
    at_hand: Option<Bytes>,
    left: u64,
    from: Option<(OwnedReadHalf, Arc<Mutex<Option<Lent>>>)>,
    buf: BytesMut,
    size: usize,
    /// The longest a read may wait (`timeouts.client_body`).
    stall: StallTimer,
}

impl SizedBody {
    fn new(
        at_hand: Bytes,
        left: u64,
        from: Option<(OwnedReadHalf, Arc<Mutex<Option<Lent>>>)>,
        stall: Duration,
    ) -> Self {
        SizedBody {
            at_hand: (!at_hand.is_empty()).then_some(at_hand),
            left,
            from,
            buf: BytesMut::new(),
            size: 16 * 1024,
            stall: StallTimer::new(stall),
        }
    }

    /// The connection gets its read side back, with how much of the body is left on it.
    fn give_back(&mut self) {
        if let Some((rd, back)) = self.from.take() {
            if let Ok(mut slot) = back.lock() {
                *slot = Some((rd, self.left));
            }
        }
    }
}

impl Drop for SizedBody {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// The read side a body gives back, and how many of its bytes are still unread.
type Lent = (OwnedReadHalf, u64);

/// Why a request body stopped short.
fn body_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

impl Body for SizedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(bytes) = this.at_hand.take() {
            if this.left == 0 {
                this.give_back();
            }
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if this.left == 0 {
            this.give_back();
            return Poll::Ready(None);
        }
        let Some((rd, _)) = this.from.as_mut() else {
            return Poll::Ready(Some(Err(body_error("the request body was cut short"))));
        };
        // Reuses the allocation once the previous frames are gone.
        let want = (this.left as usize).min(this.size);
        this.buf.reserve(want);
        match poll_read_buf(rd, &mut this.buf, want, cx) {
            Poll::Pending => {
                if this.stall.stalled(cx) {
                    this.from = None; // the connection closes after the response
                    return Poll::Ready(Some(Err(crate::body::stalled_error())));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                this.from = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(0)) => {
                this.from = None;
                Poll::Ready(Some(Err(body_error(
                    "the client closed the connection before the end of its body",
                ))))
            }
            Poll::Ready(Ok(n)) => {
                this.stall.moved();
                this.left -= n as u64;
                if n == want && this.size < BODY_READ {
                    this.size *= 2;
                }
                if this.left == 0 {
                    this.give_back();
                }
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.at_hand.is_none() && self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left + self.at_hand.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// Free room for a read. Once the previous requests' heads are gone, this reuses the
/// buffer's memory instead of allocating.
fn room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(READ_SIZE);
    }
}

/// The idle and head deadlines, with one timer for the connection's life. The timer is
/// moved only when it would fire too late; when it fires early (the deadline moved on
/// since), it is set again. Most requests therefore cost no timer operation.
struct Deadlines {
    idle: Option<Duration>,
    header: Option<Duration>,
    /// The end of the last response (the connection's opening, at first).
    idle_since: Instant,
    /// The first byte of the head being read.
    head_started: Instant,
    /// The head's first bytes came in and `head_started` is not set yet: the clock is read
    /// only if the head takes more than one read (a request whose head came whole costs
    /// one clock read less).
    head_pending: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
    /// Whether the timer has been polled since it was last set: once it has, it holds the
    /// task's waker (which does not change), and a wait only checks whether it fired
    /// (polling it again cost about 200 instructions per request, callgrind).
    registered: bool,
}

impl Deadlines {
    fn new(settings: &Settings, opened: Instant) -> Self {
        let some = |d: Duration| (!d.is_zero()).then_some(d);
        Deadlines {
            idle: some(settings.idle),
            header: some(settings.header),
            idle_since: opened,
            head_started: opened,
            head_pending: false,
            sleep: Box::pin(tokio::time::sleep_until(opened)),
            armed: None,
            registered: false,
        }
    }

    /// The deadline of the wait ahead (`idle`: no byte of the next head yet), with the
    /// timer set no later than it.
    fn deadline(&mut self, idle: bool) -> Option<Instant> {
        if self.head_pending && !idle {
            self.head_pending = false;
            self.head_started = Instant::now();
        }
        let waiting = self.idle.map(|d| self.idle_since + d);
        let head = self.header.map(|d| self.head_started + d);
        let deadline = match (waiting, head) {
            (Some(w), Some(h)) if !idle => Some(w.min(h)),
            (None, Some(h)) if !idle => Some(h),
            (w, _) => w,
        }?;
        if !matches!(self.armed, Some(a) if a <= deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
            self.registered = false;
        }
        Some(deadline)
    }

    /// Ready once the timer has fired.
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.registered {
            self.registered = true;
            return self.sleep.as_mut().poll(cx);
        }
        if self.sleep.is_elapsed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The timer fired: true when `deadline` has passed, else the timer is set to it.
    fn expired(&mut self, deadline: Option<Instant>) -> bool {
        let Some(deadline) = deadline else {
            return false;
        };
        if Instant::now() >= deadline {
            return true;
        }
        self.sleep.as_mut().reset(deadline);
        self.armed = Some(deadline);
        self.registered = false;
        false
    }

    fn answered(&mut self) {
        let now = Instant::now();
        self.idle_since = now;
        self.head_started = now;
        self.head_pending = false;
    }
}

/// Why [`parse`] returned no request.
enum Unserved {
    /// The head is not complete yet.
    Partial,
    /// For hyper; nothing was taken from the buffer.
    Foreign,
    /// For hyper, found after the head was taken from the buffer: these bytes come first.
    ForeignAfter(Bytes),
}

/// Where a header's value lies in the head.
type Field = (HeaderName, usize, usize);

/// Parse the head at the start of `buf`; a complete one that this server serves is taken
/// from the buffer, and returned with whether the client asked to close after it and its
/// body's length. The header values share the head's memory (no copies).
fn parse(buf: &mut BytesMut, settings: &Settings) -> Result<(Request<InboundBody>, bool, u64), Unserved> {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; STACK_HEADERS];
    let slots = &mut slots[..settings.max_headers.clamp(1, STACK_HEADERS)];
    let mut head = httparse::Request::new(&mut []);
    let len = match head.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) if len <= settings.max_head => len,
        // hyper answers 431
        Ok(httparse::Status::Complete(_)) => return Err(Unserved::Foreign),
        Ok(httparse::Status::Partial) => return Err(Unserved::Partial),
        Err(_) => return Err(Unserved::Foreign),
    };
    let (Some(1), Some(method), Some(path)) = (head.version, head.method, head.path) else {
        return Err(Unserved::Foreign);
    };
    if !path.starts_with('/') {
        return Err(Unserved::Foreign);
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(Unserved::Foreign);
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| s.as_ptr() as usize - base;
    let path = (at(path.as_bytes()), at(path.as_bytes()) + path.len());
    let mut close = false;
    let mut length: Option<u64> = None;
    let mut fields: SmallVec<[Field; 24]> = SmallVec::new();
    for h in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Err(Unserved::Foreign);
        };
        if name == header::CONTENT_LENGTH {
            if length.is_some() || h.value.is_empty() || h.value.len() > 18 {
                return Err(Unserved::Foreign);
            }
            if !h.value.iter().all(u8::is_ascii_digit) {
                return Err(Unserved::Foreign);
            }
            length = std::str::from_utf8(h.value).ok().and_then(|v| v.parse().ok());
        } else if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return Err(Unserved::Foreign);
        } else if name == header::CONNECTION {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        let start = at(h.value);
        fields.push((name, start, start + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return Err(Unserved::ForeignAfter(head));
    };
    // Room for what the gateway adds on the way upstream (X-Forwarded-*, Via, the request
    // id, trace context): growing the map rehashes every field, which profiling showed.
    let mut headers = crate::headers::header_map(fields.len() + ADDED_HEADERS);
    for (name, start, end) in fields.drain(..) {
        // httparse accepted the value: visible ASCII, spaces, tabs and obs-text only.
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(start..end)) else {
            return Err(Unserved::ForeignAfter(head));
        };
        headers.append(name, value);
    }
    let mut req = Request::new(InboundBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok((req, close, length.unwrap_or(0)))
}

/// How the response body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (a Content-Length that is not a number).
    Close,
}

/// Write `resp`; true when the connection can serve another request.
async fn respond(
    stream: &mut OwnedWriteHalf,
    resp: Response<ProxyBody>,
    head_only: bool,
    mut close: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodyless =
        status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // One pass writes the fields and notes those the framing depends on: comparing names
    // is cheaper than looking each one up (a hash and a probe apiece).
    let (mut length, mut has_length, mut has_date, mut has_connection) = (None, false, false, false);
    for (name, value) in parts.headers.iter() {
        if name == header::TRANSFER_ENCODING {
            continue; // the framing below is the one that holds
        }
        if name == header::CONTENT_LENGTH {
            if !has_length {
                length = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
                has_length = true;
            }
        } else if name == header::DATE {
            has_date = true;
        } else if name == header::CONNECTION {
            has_connection = true;
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let mut framing = if bodyless {
        Framing::None
    } else if has_length {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    } else if body.is_end_stream() {
        Framing::Length(0)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else {
        Framing::Chunked
    };
    if framing == Framing::Close {
        close = true;
    }
    match framing {
        Framing::Length(n) if !has_length => {
            field(out, b"content-length", itoa::Buffer::new().format(n).as_bytes())
        }
        Framing::Chunked => field(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !has_date {
        with_date(|d| field(out, b"date", d));
    }
    if close && !has_connection {
        field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    crate::headers::recycle(parts.headers);
    if head_only || framing == Framing::None {
        stream.write_all(out).await?;
        return Ok(!close);
    }
    // The first frame is usually at hand (read with the upstream's head): it goes out in
    // the same write as the head.
    let mut head_sent = false;
    let mut body = Pin::new(&mut body);
    loop {
        let frame = if head_sent {
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
        } else {
            match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    stream.write_all(out).await?;
                    head_sent = true;
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => return Ok(false),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not sent on HTTP/1.1
            },
        };
        let last = body.is_end_stream();
        let head: &[u8] = if head_sent { &[] } else { out };
        match &mut framing {
            Framing::Length(left) => {
                let n = (data.len() as u64).min(*left);
                *left -= n;
                write_all(stream, &mut [head, &data[..n as usize]]).await?;
                if n < data.len() as u64 {
                    return Ok(false); // more than the Content-Length said
                }
            }
            Framing::Chunked if data.is_empty() => write_all(stream, &mut [head]).await?,
            Framing::Chunked => {
                let mut size = [0u8; 20];
                let size = chunk_size(&mut size, data.len());
                let tail: &[u8] = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                write_all(stream, &mut [head, size, &data, tail]).await?;
                if last {
                    return Ok(!close);
                }
            }
            Framing::Close | Framing::None => write_all(stream, &mut [head, &data]).await?,
        }
        head_sent = true;
        if last {
            break;
        }
    }
    match framing {
        Framing::Chunked if head_sent => stream.write_all(b"0\r\n\r\n").await?,
        Framing::Chunked => write_all(stream, &mut [out, b"0\r\n\r\n"]).await?,
        _ if !head_sent => stream.write_all(out).await?,
        _ => {}
    }
    Ok(!close && framing != Framing::Close && !matches!(framing, Framing::Length(left) if left > 0))
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// "<hex size>\r\n" of a chunk.
fn chunk_size(buf: &mut [u8; 20], n: usize) -> &[u8] {
    let mut i = 18;
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[18] = b'\r';
    buf[19] = b'\n';
    &buf[i..]
}

/// Write all of `parts` (in as few syscalls as the socket takes).
async fn write_all(stream: &mut OwnedWriteHalf, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut i = 0;
    loop {
        while i < parts.len() && parts[i].is_empty() {
            i += 1;
        }
        if i == parts.len() {
            return Ok(());
        }
        let slices: SmallVec<[IoSlice<'_>; 4]> = parts[i..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = stream.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        for p in parts[i..].iter_mut() {
            let k = n.min(p.len());
            *p = &p[k..];
            n -= k;
            if n == 0 {
                break;
            }
        }
    }
}

thread_local! {
    /// The Date header's value, formatted once a second.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
            *at = secs;
        }
        f(&text[..]);
    });
}

/// A connection handed to hyper: the bytes this server read come first.
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(io: IO, prefix: Bytes) -> Self {
        Rewind { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let prefix = self.prefix.split_to(n);
            buf.put_slice(&prefix);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            max_head: 8192,
            max_headers: 100,
            idle: Duration::from_secs(60),
            header: Duration::from_secs(10),
            body: Duration::from_secs(10),
        }
    }

    type Parsed = Result<(Request<InboundBody>, bool, u64), Unserved>;

    fn parse_str(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse(&mut buf, &settings());
        (parsed, buf)
    }

    #[test]
    fn a_bodyless_request_is_taken_and_what_follows_stays() {
        let (parsed, rest) = parse_str("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 2\r\n\r\nGET /next");
        let (req, close, length) = parsed.ok().expect("served here");
        assert!(!close);
        assert_eq!(length, 0);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/a");
        assert_eq!(req.uri().query(), Some("b=1"));
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["x-two"], "2");
        assert!(req.headers().capacity() >= 2 + ADDED_HEADERS);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn connection_close_is_noticed_among_other_tokens() {
        let (parsed, _) = parse_str("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(parsed.ok().expect("served here").1);
        let (parsed, _) = parse_str("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(!parsed.ok().expect("an empty body is no body").1);
    }

    #[test]
    fn a_content_length_body_is_left_for_its_reader() {
        let (parsed, rest) = parse_str("POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel");
        let (req, _, length) = parsed.ok().expect("served here");
        assert_eq!(req.method(), Method::POST);
        assert_eq!(length, 5);
        assert_eq!(&rest[..], b"hel");
    }

    #[test]
    fn what_hyper_must_serve_is_left_in_the_buffer() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\nhello",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            let (parsed, rest) = parse_str(head);
            assert!(matches!(parsed, Err(Unserved::Foreign)), "{head:?}");
            assert_eq!(&rest[..], head.as_bytes(), "{head:?}");
        }
    }

    #[test]
    fn an_incomplete_head_waits_and_an_oversized_one_goes_to_hyper() {
        let (parsed, rest) = parse_str("GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(parsed, Err(Unserved::Partial)));
        assert_eq!(rest.len(), 25);
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
        let (parsed, _) = parse_str(&big);
        assert!(matches!(parsed, Err(Unserved::Foreign)));
        let many: String = (0..STACK_HEADERS + 1).map(|i| format!("X-{i}: v\r\n")).collect();
        let (parsed, _) = parse_str(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert!(matches!(parsed, Err(Unserved::Foreign)));
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex_lines() {
        let mut buf = [0u8; 20];
        assert_eq!(chunk_size(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_size(&mut buf, 11), b"b\r\n");
        assert_eq!(chunk_size(&mut buf, 16384), b"4000\r\n");
        assert_eq!(chunk_size(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_moves_only_when_it_would_fire_too_late() {
        let opened = Instant::now();
        let mut clock = Deadlines::new(&settings(), opened);
        // Waiting for the first byte: the idle deadline.
        assert_eq!(clock.deadline(true), Some(opened + Duration::from_secs(60)));
        // Part of a head arrived: the header deadline is earlier, so the timer moves to it.
        assert_eq!(clock.deadline(false), Some(opened + Duration::from_secs(10)));
        assert_eq!(clock.armed, Some(opened + Duration::from_secs(10)));
        // Answered later: the next wait's deadline is later; the armed timer stays early.
        tokio::time::advance(Duration::from_secs(5)).await;
        clock.answered();
        let next = clock.deadline(true).expect("an idle deadline");
        assert_eq!(next, opened + Duration::from_secs(65));
        assert_eq!(clock.armed, Some(opened + Duration::from_secs(10)));
        // When it fires early, it is set to the real deadline, which has not passed.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!clock.expired(Some(next)));
        assert_eq!(clock.armed, Some(next));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(clock.expired(Some(next)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_is_polled_once_per_setting_and_still_seen_to_fire() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let opened = Instant::now();
        let mut clock = Deadlines::new(&settings(), opened);
        let deadline = clock.deadline(true);
        assert!(clock.poll_fired(&mut cx).is_pending());
        assert!(clock.registered);
        // Later waits only look at the timer: it has not fired...
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(clock.poll_fired(&mut cx).is_pending());
        // ...and then it has.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(clock.poll_fired(&mut cx).is_ready());
        assert!(clock.expired(deadline));
        // Set again (a later deadline), it is polled again to register.
        clock.answered();
        let later = clock.deadline(true);
        assert!(!clock.expired(later));
        assert!(!clock.registered);
        assert!(clock.poll_fired(&mut cx).is_pending());
        assert!(clock.registered);
    }
}
