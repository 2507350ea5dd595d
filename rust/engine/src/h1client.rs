//! The HTTP/1.1 client side of the proxy: writes a request to an upstream connection and
//! reads the response, streaming both bodies.
//!
//! Hand-written for the hot path: with hyper's client, a proxied request cost ~34k
//! user-space instructions, a third of them in the client's dispatch machinery (a task per
//! connection, channels between it and the request, a fresh read buffer per response). Here
//! the request's own task does the I/O, the read buffer is reused, and header values are
//! zero-copy slices of it. See docs/benchmarks.md.

use crate::body::{BodyError, RequestBody};
use crate::forwarding::{write_fields, Forwarding};
use crate::headers::{NameMemo, RESPONSE_NAMES};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use smallvec::SmallVec;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A response head above this size is refused (hyper's default limit is similar).
const MAX_HEAD: usize = 64 * 1024;
/// Reads start at this size and double, per connection, while they fill the buffer.
const READ_MIN: usize = 16 * 1024;
const READ_MAX: usize = 256 * 1024;
const MAX_HEADERS: usize = 100;

/// An upstream connection's transport. Plain TCP keeps the zero-copy paths below (writes
/// through a shared reference while the socket is watched for an early answer); TLS goes
/// through rustls, boxed so that it does not grow every plain connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One upstream connection and its reusable buffers.
pub struct Conn {
    pub(crate) stream: Stream,
    buf: BytesMut,
    out: Vec<u8>,
    read_size: usize,
    /// The timer for the response head's deadline, kept armed between requests: each
    /// request's deadline is later than the last one's, so the timer is moved only when it
    /// fires early (or a shorter read timeout needs it sooner). Registering a fresh timer
    /// for every request cost about 350 instructions (callgrind).
    head_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why an exchange failed, and whether the request could have reached the upstream.
#[derive(Debug)]
pub enum ExchangeError {
    /// The client's body failed (too large, malformed); nothing more was sent.
    Body(BodyError),
    /// The connection failed. `before_response`: no byte of a response had arrived;
    /// `wrote_head`: the request head was written; `sent_body`: part of the client's body
    /// was consumed (then the request cannot be sent again).
    Io {
        error: io::Error,
        before_response: bool,
        wrote_head: bool,
        sent_body: bool,
    },
    /// The upstream's response was not valid HTTP/1.1.
    Protocol(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Body(e) => write!(f, "{e}"),
            ExchangeError::Io { error, .. } => write!(f, "{error}"),
            ExchangeError::Protocol(m) => write!(f, "invalid response: {m}"),
        }
    }
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self::over(Stream::Plain(stream))
    }

    /// A connection whose TLS handshake is done.
    pub fn tls(stream: TlsStream<TcpStream>) -> Self {
        Self::over(Stream::Tls(Box::new(stream)))
    }

    fn over(stream: Stream) -> Self {
        Conn {
            stream,
            buf: BytesMut::with_capacity(READ_MIN),
            out: Vec::with_capacity(1024),
            read_size: READ_MIN,
            head_timer: None,
        }
    }

    /// Whether an idle connection can take a request: the upstream has not closed it or
    /// sent anything unasked. Costs no syscall unless the socket became readable.
    pub fn is_reusable_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match &mut self.stream {
            Stream::Plain(stream) => match stream.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                // Readable while idle: EOF, a reset, or stray bytes. Only "would block" is fine.
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            // An idle TLS connection legitimately receives records (TLS 1.3 session
            // tickets): rustls reads them, and only application data or a close counts. It
            // reads the socket only when the socket is readable.
            Stream::Tls(stream) => {
                let mut probe = [0u8; 1];
                let mut rb = ReadBuf::new(&mut probe);
                Pin::new(&mut **stream).poll_read(&mut cx, &mut rb).is_pending()
            }
        }
    }

    /// Send the request and read the response head. The body streams afterwards through
    /// the returned [`UpstreamBody`], which owns the connection. `write_timeout` bounds each
    /// wait for the upstream to accept more of the request (an `io::ErrorKind::TimedOut`).
    ///
    /// `deadline` (and the read timeout it comes from, for the message) bounds sending the
    /// body and waiting for the response head: expiry is an `io::ErrorKind::TimedOut` too.
    /// Only those two small futures are put under the timer, not the whole exchange, so
    /// the exchange's state is never moved into a timeout wrapper.
    pub async fn exchange(
        mut self,
        parts: &request::Parts,
        body: &mut RequestBody,
        forwarding: Option<&Forwarding>,
        write_timeout: Option<Duration>,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<(Response<()>, Framing, Self), ExchangeError> {
        let chunked = self.write_head(parts, body, forwarding);
        let (sent_body, answered_early) = match &mut self.stream {
            Stream::Plain(stream) => {
                send_plain(stream, &self.out, body, chunked, write_timeout, deadline).await?
            }
            Stream::Tls(stream) => {
                let sent = send_tls(stream, &self.out, body, chunked, write_timeout, deadline).await?;
                (sent, false)
            }
        };
        let (resp, mut framing) = match deadline {
            None => self.read_head(&parts.method, sent_body).await?,
            Some((d, read)) => {
                let mut timer = self.head_timer.take();
                let answer = {
                    let mut head = std::pin::pin!(self.read_head(&parts.method, sent_body));
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = head.as_mut().poll(cx) {
                            return Poll::Ready(Some(r));
                        }
                        match head_deadline(&mut timer, d, cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    })
                    .await
                };
                self.head_timer = timer;
                answer.ok_or_else(|| timed_out(read, sent_body))??
            }
        };
        if answered_early {
            // The upstream did not read the whole request: the connection's state is unknown.
            framing.keep_alive = false;
        }
        Ok((resp, framing, self))
    }

    /// Serialize the request head into `out`; returns whether the body goes chunked.
    fn write_head(
        &mut self,
        parts: &request::Parts,
        body: &RequestBody,
        forwarding: Option<&Forwarding>,
    ) -> bool {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        // Framing is ours to state, below.
        write_fields(&parts.headers, forwarding, out);
        let chunked = match body.size_hint().exact() {
            Some(0) if body.is_end_stream() && !expects_body(&parts.method) => false,
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa(n, &mut [0u8; 20]));
                out.extend_from_slice(b"\r\n");
                false
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        };
        out.extend_from_slice(b"\r\n");
        chunked
    }

    async fn read_head(
        &mut self,
        method: &Method,
        sent_body: bool,
    ) -> Result<(Response<()>, Framing), ExchangeError> {
        let mut first_byte_seen = false;
        loop {
            if !self.buf.is_empty() {
                first_byte_seen = true;
                match parse_head(&mut self.buf, method)? {
                    Some(Parsed::Interim) => continue,
                    Some(Parsed::Final(resp, framing)) => return Ok((resp, framing)),
                    None if self.buf.len() > MAX_HEAD => {
                        return Err(ExchangeError::Protocol("response head too large".into()))
                    }
                    None => {}
                }
            }
            let n = read_more(&mut self.stream, &mut self.buf, &mut self.read_size)
                .await
                .map_err(|error| ExchangeError::Io {
                    error,
                    before_response: !first_byte_seen,
                    wrote_head: true,
                    sent_body,
                })?;
            if n == 0 {
                return Err(ExchangeError::Io {
                    error: io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed the connection"),
                    before_response: !first_byte_seen,
                    wrote_head: true,
                    sent_body,
                });
            }
        }
    }
}

/// Ready once `deadline` has passed; otherwise the connection's `timer` will wake the task
/// by then (it may wake it earlier, when it was armed for an earlier request).
fn head_deadline(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    while timer.as_mut().poll(cx).is_ready() {
        if tokio::time::Instant::now() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
    Poll::Pending
}

fn timed_out(read: Duration, sent_body: bool) -> ExchangeError {
    ExchangeError::Io {
        error: io::Error::new(
            io::ErrorKind::TimedOut,
            format!("sent no response within {read:?}"),
        ),
        before_response: true,
        wrote_head: true,
        sent_body,
    }
}

async fn expiry(deadline: Option<(tokio::time::Instant, Duration)>) {
    match deadline {
        Some((d, _)) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Write the request over plain TCP; returns (part of the body was sent, the upstream
/// answered before the whole body was written).
async fn send_plain(
    stream: &TcpStream,
    head: &[u8],
    body: &mut RequestBody,
    chunked: bool,
    write_timeout: Option<Duration>,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> Result<(bool, bool), ExchangeError> {
    // A body already here goes in the head's write; the body is only taken once written,
    // so a failed write leaves it whole for a retry on a fresh connection.
    let first = body.data_at_hand().filter(|d| !d.is_empty()).cloned();
    let written = match &first {
        None => write_all_vectored(stream, &mut [IoSlice::new(head)], write_timeout).await,
        Some(data) if chunked => {
            let size = format!("{:x}\r\n", data.len());
            let mut parts = [
                IoSlice::new(head),
                IoSlice::new(size.as_bytes()),
                IoSlice::new(data),
                IoSlice::new(b"\r\n"),
            ];
            write_all_vectored(stream, &mut parts, write_timeout).await
        }
        Some(data) => {
            write_all_vectored(
                stream,
                &mut [IoSlice::new(head), IoSlice::new(data)],
                write_timeout,
            )
            .await
        }
    };
    if let Err(error) = written {
        return Err(ExchangeError::Io {
            error,
            before_response: true,
            wrote_head: false,
            sent_body: false,
        });
    }
    let mut sent_body = false;
    if first.is_some() {
        body.take_at_hand();
        sent_body = true;
    }
    let mut answered_early = false;
    if !body.is_end_stream() {
        // An upstream may answer before it has read the whole body (a 413, a redirect)
        // and stop reading: watch for its response while writing, or both sides wait.
        let mut probe = [0u8; 1];
        tokio::select! {
            biased;
            written = write_body(stream, body, chunked, &mut sent_body, write_timeout) => written?,
            _ = stream.peek(&mut probe) => answered_early = true,
            () = expiry(deadline) => return Err(timed_out(deadline.map(|d| d.1).unwrap_or_default(), sent_body)),
        }
    }
    Ok((sent_body, answered_early))
}

/// Write the request through rustls; returns whether part of the body was sent. The socket
/// is not watched for an early answer meanwhile (the TLS stream has one owner): an upstream
/// that stops reading is cut off by the write or read timeout instead.
async fn send_tls(
    stream: &mut TlsStream<TcpStream>,
    head: &[u8],
    body: &mut RequestBody,
    chunked: bool,
    write_timeout: Option<Duration>,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> Result<bool, ExchangeError> {
    // As over plain TCP: a small body already here goes in the head's records.
    let first = body
        .data_at_hand()
        .filter(|d| !d.is_empty() && d.len() <= COALESCE_TLS_BODY)
        .cloned();
    let written = match &first {
        None => write_tls(stream, head, write_timeout).await,
        Some(data) => {
            let mut out = Vec::with_capacity(head.len() + data.len() + 20);
            out.extend_from_slice(head);
            if chunked {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            out.extend_from_slice(data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            write_tls(stream, &out, write_timeout).await
        }
    };
    if let Err(error) = written {
        return Err(ExchangeError::Io {
            error,
            before_response: true,
            wrote_head: false,
            sent_body: false,
        });
    }
    let mut sent_body = false;
    if first.is_some() {
        body.take_at_hand();
        sent_body = true;
    }
    if !body.is_end_stream() {
        tokio::select! {
            biased;
            written = write_body_tls(stream, body, chunked, &mut sent_body, write_timeout) => written?,
            () = expiry(deadline) => return Err(timed_out(deadline.map(|d| d.1).unwrap_or_default(), sent_body)),
        }
    }
    Ok(sent_body)
}

/// Largest body copied next to the head for one TLS write; larger ones go on their own.
const COALESCE_TLS_BODY: usize = 64 * 1024;

/// Write and flush `data` as TLS records; the timer only matters when the socket is full.
async fn write_tls(
    stream: &mut TlsStream<TcpStream>,
    data: &[u8],
    timeout: Option<Duration>,
) -> io::Result<()> {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    match timeout {
        None => write.await,
        Some(t) => tokio::time::timeout(t, write).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the upstream took no more of the request for {t:?}"),
            )
        })?,
    }
}

async fn write_body_tls(
    stream: &mut TlsStream<TcpStream>,
    body: &mut RequestBody,
    chunked: bool,
    sent_body: &mut bool,
    timeout: Option<Duration>,
) -> Result<(), ExchangeError> {
    let io_err = |error| ExchangeError::Io {
        error,
        before_response: true,
        wrote_head: true,
        sent_body: true,
    };
    let mut framed = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ExchangeError::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        *sent_body = true;
        if chunked {
            // One record for the chunk and its framing.
            framed.clear();
            framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            write_tls(stream, &framed, timeout).await.map_err(io_err)?;
        } else {
            write_tls(stream, &data, timeout).await.map_err(io_err)?;
        }
    }
    if chunked {
        write_tls(stream, b"0\r\n\r\n", timeout).await.map_err(io_err)?;
    }
    Ok(())
}

/// Stream the client's body to the upstream, chunk-encoded or as is.
async fn write_body(
    stream: &TcpStream,
    body: &mut RequestBody,
    chunked: bool,
    sent_body: &mut bool,
    timeout: Option<Duration>,
) -> Result<(), ExchangeError> {
    let io_err = |error| ExchangeError::Io {
        error,
        before_response: true,
        wrote_head: true,
        sent_body: true,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ExchangeError::Body)?;
        // Trailers are not forwarded; an empty data frame (HTTP/2 ends streams with them)
        // would read as the last chunk.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        *sent_body = true;
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            let mut parts = [
                IoSlice::new(size.as_bytes()),
                IoSlice::new(&data),
                IoSlice::new(b"\r\n"),
            ];
            write_all_vectored(stream, &mut parts, timeout)
                .await
                .map_err(io_err)?;
        } else {
            write_all_vectored(stream, &mut [IoSlice::new(&data)], timeout)
                .await
                .map_err(io_err)?;
        }
    }
    if chunked {
        write_all_vectored(stream, &mut [IoSlice::new(b"0\r\n\r\n")], timeout)
            .await
            .map_err(io_err)?;
    }
    Ok(())
}

fn expects_body(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Write everything through a shared reference, so a read can be awaited meanwhile. A
/// wait for the socket to take more bytes longer than `timeout` fails with `TimedOut`; the
/// timer is only set when a write would block, so a request that fits the socket buffer
/// costs no clock read.
async fn write_all_vectored(
    stream: &TcpStream,
    parts: &mut [IoSlice<'_>],
    timeout: Option<Duration>,
) -> io::Result<()> {
    let mut parts = &mut parts[..];
    IoSlice::advance_slices(&mut parts, 0); // skip leading empty slices
    while !parts.is_empty() {
        match stream.try_write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match timeout {
                None => stream.writable().await?,
                Some(t) => tokio::time::timeout(t, stream.writable()).await.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the upstream took no more of the request for {t:?}"),
                    )
                })??,
            },
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn read_more(stream: &mut Stream, buf: &mut BytesMut, size: &mut usize) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(stream, buf, size, cx)).await
}

fn poll_read_more(
    stream: &mut Stream,
    buf: &mut BytesMut,
    size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    // Reuses the allocation once the previous response's slices are gone.
    buf.reserve(*size);
    let spare = buf.spare_capacity_mut();
    let room = spare.len();
    let mut rb = ReadBuf::uninit(spare);
    ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: poll_read initialized the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    if n == room && *size < READ_MAX {
        *size *= 2; // the upstream sends more than we read at once: read more next time
    }
    Poll::Ready(Ok(n))
}

enum Parsed {
    Interim,
    Final(Response<()>, Framing),
}

/// How the response body is delimited, and whether the connection survives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Framing {
    pub kind: BodyKind,
    pub keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyKind {
    Empty,
    Sized(u64),
    Chunked,
    UntilClose,
    /// After a 101: no body; the connection now speaks another protocol and belongs to
    /// whoever takes it (`UpstreamBody::into_switched`), never to the pool.
    Switched,
}

fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, ExchangeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ExchangeError::Protocol(e.to_string())),
    };
    let code = resp.code.unwrap_or(0);
    if (100..200).contains(&code) && code != 101 {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Protocol(format!("status {code}")))?;
    let http10 = resp.version == Some(0);
    let base = buf.as_ptr() as usize;
    let mut spans: SmallVec<[(HeaderName, usize, usize); 16]> = SmallVec::new();
    let (mut length, mut chunked, mut te) = (None, false, false);
    let mut keep_alive = !http10;
    let mut names = NameMemo::take(&RESPONSE_NAMES);
    for (i, h) in resp.headers.iter().enumerate() {
        let name = names
            .name(i, h.name.as_bytes())
            .map_err(|_| ExchangeError::Protocol(format!("bad header name {:?}", h.name)))?;
        if name == header::CONTENT_LENGTH {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (v, length) {
                (None, _) => return Err(ExchangeError::Protocol("bad Content-Length".into())),
                (Some(a), Some(b)) if a != b => {
                    return Err(ExchangeError::Protocol("conflicting Content-Length".into()))
                }
                (v, _) => length = v,
            }
        } else if name == header::TRANSFER_ENCODING {
            te = true;
            let v = h.value.trim_ascii_end();
            chunked = v.len() >= 7 && v[v.len() - 7..].eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            let mut options_only = true;
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive |= http10;
                } else if !token.is_empty() {
                    options_only = false;
                }
            }
            // Hop-by-hop, and read here: a field that names no other field never reaches
            // the map (one insert and one removal less per response). One that names some
            // stays, so that those are removed with it (`headers::strip_hop_by_hop`).
            if options_only {
                continue;
            }
        }
        let start = h.value.as_ptr() as usize - base;
        spans.push((name, start, start + h.value.len()));
    }
    names.put(&RESPONSE_NAMES);
    let head = buf.split_to(len).freeze();
    // With room for the request id and Via that the gateway adds.
    let mut headers = crate::headers::header_map(spans.len() + 2);
    for (name, start, end) in spans.drain(..) {
        // Zero-copy: values are slices of the head; the buffer is reused once they drop.
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| ExchangeError::Protocol("bad header value".into()))?;
        headers.append(name, value);
    }
    let kind = if status == StatusCode::SWITCHING_PROTOCOLS {
        BodyKind::Switched
    } else if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        BodyKind::Empty
    } else if te {
        // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, and the connection
        // cannot be trusted afterwards.
        if length.is_some() {
            keep_alive = false;
        }
        if chunked {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else {
        match length {
            Some(0) => BodyKind::Empty,
            Some(n) => BodyKind::Sized(n),
            None => BodyKind::UntilClose,
        }
    };
    if kind == BodyKind::UntilClose || status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = headers;
    Ok(Some(Parsed::Final(response, Framing { kind, keep_alive })))
}

/// Where the chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Decode as much chunked framing from `buf` as possible: returns a data slice, or None
/// when more input is needed; sets `done` at the last chunk's end.
fn decode_chunk(buf: &mut BytesMut, state: &mut Chunk, done: &mut bool) -> Result<Option<Bytes>, io::Error> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunked body: {m}"));
    loop {
        match *state {
            Chunk::Size => {
                let Some(eol) = memchr::memchr(b'\n', buf) else {
                    return if buf.len() > 1024 {
                        Err(bad("size line too long"))
                    } else {
                        Ok(None)
                    };
                };
                let line = &buf[..eol];
                let digits = line.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
                if digits.is_empty() || digits.len() > 15 {
                    return Err(bad("chunk size"));
                }
                let size = digits.iter().try_fold(0u64, |acc, &d| {
                    (d as char).to_digit(16).map(|v| acc * 16 + v as u64)
                });
                let size = size.ok_or_else(|| bad("chunk size"))?;
                buf.advance(eol + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (buf.len() as u64).min(left) as usize;
                let data = buf.split_to(n).freeze();
                *state = if left == n as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n as u64)
                };
                return Ok(Some(data));
            }
            Chunk::DataEnd => {
                let Some(eol) = memchr::memchr(b'\n', buf) else {
                    return if buf.len() > 2 {
                        Err(bad("missing CRLF after data"))
                    } else {
                        Ok(None)
                    };
                };
                if !buf[..eol].trim_ascii().is_empty() {
                    return Err(bad("missing CRLF after data"));
                }
                buf.advance(eol + 1);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                // Trailer fields are not forwarded (yet); skip them up to the empty line.
                let Some(eol) = memchr::memchr(b'\n', buf) else {
                    return if buf.len() > MAX_HEAD {
                        Err(bad("trailers too large"))
                    } else {
                        Ok(None)
                    };
                };
                let empty = buf[..eol].trim_ascii().is_empty();
                buf.advance(eol + 1);
                if empty {
                    *done = true;
                    return Ok(None);
                }
            }
        }
    }
}

/// Returns a connection whose response was read to the end; see `pool.rs`.
pub trait Recycle: Send + Sync {
    fn recycle(&self, conn: Conn);
}

/// An upstream response body. It owns the connection while it streams, hands it back to
/// its pool at the end when the connection can be reused, and closes it otherwise.
pub struct UpstreamBody {
    conn: Option<Conn>,
    kind: BodyKind,
    chunk: Chunk,
    done: bool,
    keep_alive: bool,
    home: Option<std::sync::Arc<dyn Recycle>>,
    /// The longest wait for more of the body (the read timeout), and its timer: made the
    /// first time a read has to wait, re-armed at each wait after progress.
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    timer_armed: bool,
    /// An HTTP/2 upstream's body (`h2client.rs`): its frames, trailers included, as they come.
    h2: Option<Box<hyper::body::Incoming>>,
}

impl UpstreamBody {
    /// The body of a response from an HTTP/2 upstream.
    pub fn h2(body: hyper::body::Incoming) -> Self {
        UpstreamBody {
            conn: None,
            kind: BodyKind::UntilClose,
            chunk: Chunk::Size,
            done: false,
            keep_alive: false,
            home: None,
            idle: None,
            timer: None,
            timer_armed: false,
            h2: Some(Box::new(body)),
        }
    }

    /// `idle`: fail the body when the upstream sends nothing more for this long.
    pub fn new(
        conn: Conn,
        framing: Framing,
        home: std::sync::Arc<dyn Recycle>,
        idle: Option<Duration>,
    ) -> Self {
        let done = matches!(framing.kind, BodyKind::Empty | BodyKind::Switched);
        let mut body = UpstreamBody {
            conn: Some(conn),
            kind: framing.kind,
            chunk: Chunk::Size,
            done,
            keep_alive: framing.keep_alive,
            home: Some(home),
            idle,
            timer: None,
            timer_armed: false,
            h2: None,
        };
        if framing.kind == BodyKind::Empty {
            body.finish();
        }
        body
    }

    /// After a 101: the connection, and what the upstream already sent on it.
    pub fn into_switched(mut self) -> Option<(Stream, BytesMut)> {
        if self.kind != BodyKind::Switched {
            return None;
        }
        let conn = self.conn.take()?;
        Some((conn.stream, conn.buf))
    }

    /// A read is pending: start (or keep) the idle timer; Ready(Err) when it has expired.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(idle) = self.idle else {
            return Poll::Pending;
        };
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.timer_armed {
                    t.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(idle))),
        };
        self.timer_armed = true;
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the upstream sent nothing more of the body for {idle:?}"),
        ))
    }

    fn finish(&mut self) {
        self.done = true;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                home.recycle(conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(h2) = this.h2.as_mut() {
            return Pin::new(&mut **h2).poll_frame(cx).map_err(io::Error::other);
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match this.kind {
                BodyKind::Empty => None,
                BodyKind::Sized(left) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    this.kind = BodyKind::Sized(left - n as u64);
                    Some(conn.buf.split_to(n).freeze())
                }
                BodyKind::UntilClose if !conn.buf.is_empty() => Some(conn.buf.split().freeze()),
                BodyKind::Chunked => {
                    let mut done = false;
                    let d = decode_chunk(&mut conn.buf, &mut this.chunk, &mut done)?;
                    if done {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    d
                }
                _ => None,
            };
            if let Some(d) = data {
                if this.kind == BodyKind::Sized(0) {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            if this.kind == BodyKind::Sized(0) || this.kind == BodyKind::Empty {
                this.finish();
                return Poll::Ready(None);
            }
            let n = match poll_read_more(&mut conn.stream, &mut conn.buf, &mut conn.read_size, cx) {
                Poll::Ready(r) => {
                    this.timer_armed = false;
                    r?
                }
                Poll::Pending => {
                    let err = ready!(this.poll_idle(cx));
                    this.keep_alive = false;
                    this.conn = None;
                    return Poll::Ready(Some(Err(err)));
                }
            };
            if n == 0 {
                if this.kind == BodyKind::UntilClose {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection mid-body",
                ))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.h2 {
            Some(h2) => h2.is_end_stream(),
            None => self.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(h2) = &self.h2 {
            return h2.size_hint();
        }
        match self.kind {
            BodyKind::Sized(n) => SizeHint::with_exact(n),
            BodyKind::Empty | BodyKind::Switched => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8], method: Method) -> Result<Option<Parsed>, ExchangeError> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &method)
    }

    fn framing(raw: &[u8], method: Method) -> Framing {
        match head(raw, method) {
            Ok(Some(Parsed::Final(_, f))) => f,
            _ => panic!("no final head"),
        }
    }

    fn names_and_values(raw: &[u8]) -> Vec<(String, String)> {
        match head(raw, Method::GET) {
            Ok(Some(Parsed::Final(resp, _))) => resp
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect(),
            other => panic!("no final head: {:?}", other.err()),
        }
    }

    #[test]
    fn remembered_names_follow_each_head() {
        // Same names (in another case), then others at the same places, then fewer, then more.
        let heads: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\nServer: a\r\nContent-Type: text/plain\r\nX-Custom: 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nSERVER: b\r\ncontent-type: text/html\r\nx-custom: 2\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nDate: c\r\nX-Other: 3\r\nServer: d\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nDate: e\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nDate: f\r\nX-Other: 4\r\nX-Third: 5\r\nVary: g\r\nContent-Length: 0\r\n\r\n",
        ];
        let expected: [&[(&str, &str)]; 5] = [
            &[
                ("server", "a"),
                ("content-type", "text/plain"),
                ("x-custom", "1"),
                ("content-length", "0"),
            ],
            &[
                ("server", "b"),
                ("content-type", "text/html"),
                ("x-custom", "2"),
                ("content-length", "0"),
            ],
            &[
                ("date", "c"),
                ("x-other", "3"),
                ("server", "d"),
                ("content-length", "0"),
            ],
            &[("date", "e")],
            &[
                ("date", "f"),
                ("x-other", "4"),
                ("x-third", "5"),
                ("vary", "g"),
                ("content-length", "0"),
            ],
        ];
        for _ in 0..2 {
            for (raw, want) in heads.iter().zip(expected) {
                let mut got = names_and_values(raw);
                got.sort();
                let mut want: Vec<(String, String)> =
                    want.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
                want.sort();
                assert_eq!(got, want);
            }
        }
        // A malformed name is still refused where a valid one was remembered.
        assert!(head(b"HTTP/1.1 200 OK\r\nDate: f\r\nX-Other: 4\r\n\r\n", Method::GET).is_ok());
        assert!(matches!(
            head(
                b"HTTP/1.1 200 OK\r\nDate: f\r\nX-Oth\xe9r: 4\r\n\r\n",
                Method::GET
            ),
            Err(ExchangeError::Protocol(_))
        ));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET);
        assert_eq!(
            f,
            Framing {
                kind: BodyKind::Sized(5),
                keep_alive: true
            }
        );
        let f = framing(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!(f.kind, BodyKind::Chunked);
        let f = framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(f.kind, BodyKind::Empty);
        let f = framing(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(f.kind, BodyKind::Empty);
        let f = framing(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!(
            f,
            Framing {
                kind: BodyKind::UntilClose,
                keep_alive: false
            }
        );
        let f = framing(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        );
        assert!(!f.keep_alive);
        let f = framing(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET);
        assert!(!f.keep_alive);
        let f = framing(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(
            f,
            Framing {
                kind: BodyKind::Chunked,
                keep_alive: false
            }
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_conflicts_refused() {
        assert!(matches!(
            head(b"HTTP/1.1 100 Continue\r\n\r\n", Method::GET),
            Ok(Some(Parsed::Interim))
        ));
        assert!(head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Method::GET
        )
        .is_err());
        assert!(matches!(
            head(b"HTTP/1.1 200 OK\r\nContent-Le", Method::GET),
            Ok(None)
        ));
    }

    #[test]
    fn chunked_bodies_decode_across_splits() {
        let raw = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        for split in [1usize, 3, 7, raw.len()] {
            let mut buf = BytesMut::new();
            let (mut state, mut done, mut out) = (Chunk::Size, false, Vec::new());
            for piece in raw.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(d) = decode_chunk(&mut buf, &mut state, &mut done).unwrap() {
                    out.extend_from_slice(&d);
                }
            }
            assert!(done, "split {split}");
            assert_eq!(out, b"hello0123456789abcdef");
        }
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decode_chunk(&mut buf, &mut Chunk::Size, &mut false).is_err());
    }

    #[test]
    fn itoa_writes_decimal() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(16384, &mut [0; 20]), b"16384");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }

    #[test]
    fn a_connection_field_of_options_only_is_left_out_of_the_head() {
        let final_head = |raw: &[u8]| match head(raw, Method::GET) {
            Ok(Some(Parsed::Final(resp, framing))) => (resp, framing),
            _ => panic!("no final head"),
        };
        let (resp, framing) =
            final_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(!resp.headers().contains_key(header::CONNECTION));
        assert!(framing.keep_alive);
        let (resp, framing) =
            final_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!resp.headers().contains_key(header::CONNECTION));
        assert!(!framing.keep_alive);
        // One that names other fields stays, so that they are removed with it.
        let (resp, framing) = final_head(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(resp.headers()[header::CONNECTION], "close, X-Hop");
        assert!(!framing.keep_alive);
        let (_, framing) =
            final_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(framing.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_fires_only_at_the_current_deadline() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let start = tokio::time::Instant::now();
        let first = start + Duration::from_secs(10);
        let mut timer = None;
        assert!(head_deadline(&mut timer, first, &mut cx).is_pending());
        // A later request on the same connection: its deadline is later than the armed one.
        tokio::time::advance(Duration::from_secs(4)).await;
        let second = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(head_deadline(&mut timer, second, &mut cx).is_pending());
        assert_eq!(timer.as_ref().map(|t| t.deadline()), Some(first));
        // The armed timer fires at the first deadline: too early, so it moves.
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(head_deadline(&mut timer, second, &mut cx).is_pending());
        assert_eq!(timer.as_ref().map(|t| t.deadline()), Some(second));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(head_deadline(&mut timer, second, &mut cx).is_ready());
        // A shorter deadline than the armed one moves the timer sooner.
        let soon = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut timer = Some(Box::pin(tokio::time::sleep(Duration::from_secs(30))));
        assert!(head_deadline(&mut timer, soon, &mut cx).is_pending());
        assert_eq!(timer.as_ref().map(|t| t.deadline()), Some(soon));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(head_deadline(&mut timer, soon, &mut cx).is_ready());
    }
}
