//! Request-smuggling guard for HTTP/1.1 connections.
//!
//! hyper resolves ambiguous framing the lenient way RFC 9112 permits: with both
//! Content-Length and Transfer-Encoding it drops Content-Length, and it folds duplicate
//! identical Content-Length headers into one, before our service sees the request. A
//! gateway must refuse such requests instead (an upstream or another hop may frame them
//! differently). So this wrapper reads the same bytes hyper reads, finds each request head
//! with httparse, follows the body framing to the next head, and records which request
//! (by its position on the connection) was ambiguous. The service checks that record.
//!
//! After the first ambiguous head, or anything it cannot follow (which hyper will refuse
//! on its own), the guard stops: the connection is closed after that request anyway.
//!
//! Knowing where each head and body starts, the guard also enforces the slow-client
//! deadlines (`with_timeouts`): a head must arrive whole within `client_header` of its first
//! byte (of the connection's opening, for the first one), and a body may not keep a read
//! waiting longer than `client_body`. hyper's own `header_read_timeout` cannot do the first:
//! its clock also runs while a keep-alive connection is idle, so it is the idle timeout.
//! A missed deadline fails the read with `TimedOut` and hyper closes the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Why a request's framing is ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    ContentLengthAndTransferEncoding = 1,
    DuplicateContentLength = 2,
}

impl Ambiguity {
    pub fn message(self) -> &'static str {
        match self {
            Ambiguity::ContentLengthAndTransferEncoding => {
                "both Content-Length and Transfer-Encoding are present"
            }
            Ambiguity::DuplicateContentLength => "more than one Content-Length header",
        }
    }
}

/// What the guard found, shared with the connection's service.
#[derive(Debug, Default)]
pub struct FramingRecord {
    /// Index (0-based, in arrival order) of the ambiguous request, or u64::MAX.
    bad_index: AtomicU64,
    reason: AtomicU8,
    /// Requests the service has been handed so far on this connection.
    served: AtomicU64,
    /// The connection switched protocols (a WebSocket): what follows is not HTTP.
    switched: AtomicBool,
}

impl FramingRecord {
    pub fn new() -> Arc<Self> {
        Arc::new(FramingRecord {
            bad_index: AtomicU64::new(u64::MAX),
            ..Default::default()
        })
    }

    /// The response switched the connection to another protocol: stop following it.
    pub fn switch(&self) {
        self.switched.store(true, Ordering::Relaxed);
    }

    /// Called once per request, in order, by the service: the verdict for this request.
    pub fn next_request(&self) -> Option<Ambiguity> {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        if self.bad_index.load(Ordering::Relaxed) != n {
            return None;
        }
        match self.reason.load(Ordering::Relaxed) {
            1 => Some(Ambiguity::ContentLengthAndTransferEncoding),
            _ => Some(Ambiguity::DuplicateContentLength),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// In the chunk-size line; `ext` once past the digits.
    Size {
        size: u64,
        digits: bool,
        ext: bool,
    },
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer section; `len` is the current line's length without CR.
    Trailers {
        len: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Head,
    Body(u64),
    Chunked(Chunk),
    Off,
}

/// Wraps a connection's I/O; see the module docs.
pub struct FramingGuard<IO> {
    io: IO,
    state: State,
    /// A request head split across reads, kept until it is complete.
    partial: Vec<u8>,
    heads: u64,
    max_head: usize,
    record: Arc<FramingRecord>,
    timers: Option<Box<SlowClientTimers>>,
}

/// The slow-client deadlines of one connection (see the module docs).
struct SlowClientTimers {
    header: Option<Duration>,
    body: Option<Duration>,
    /// When the head being read began; None between requests.
    head_started: Option<Instant>,
    /// When the body read that is waiting must have data.
    body_deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl<IO> FramingGuard<IO> {
    pub fn new(io: IO, max_head: usize, record: Arc<FramingRecord>) -> Self {
        FramingGuard {
            io,
            state: State::Head,
            partial: Vec::new(),
            heads: 0,
            max_head,
            record,
            timers: None,
        }
    }

    /// Enforce `header` (from `opened` for the first head) and `body`; a zero duration is
    /// no limit. Needs the tokio runtime.
    pub fn with_timeouts(mut self, opened: Instant, header: Duration, body: Duration) -> Self {
        let some = |d: Duration| (!d.is_zero()).then_some(d);
        if header.is_zero() && body.is_zero() {
            return self;
        }
        self.timers = Some(Box::new(SlowClientTimers {
            header: some(header),
            body: some(body),
            head_started: Some(opened),
            body_deadline: None,
            sleep: Box::pin(tokio::time::sleep_until(opened)),
            armed: None,
        }));
        self
    }

    /// The deadline the current read must meet, if any.
    fn deadline(&self) -> Option<Instant> {
        let t = self.timers.as_deref()?;
        match self.state {
            State::Head => Some(t.head_started? + t.header?),
            State::Body(_) | State::Chunked(_) => t.body_deadline,
            State::Off => None,
        }
    }

    /// Bookkeeping after bytes (or the end) arrived.
    fn after_read(&mut self, heads_before: u64) {
        let in_partial_head = self.state == State::Head && !self.partial.is_empty();
        let finished_head = self.heads != heads_before;
        if let Some(t) = self.timers.as_deref_mut() {
            t.body_deadline = None;
            if finished_head {
                t.head_started = None;
            }
            if in_partial_head && t.head_started.is_none() {
                t.head_started = Some(Instant::now());
            }
        }
    }

    /// The read has to wait: start the body's clock if it is not running, and wake the
    /// connection at the deadline. True when the deadline has passed.
    fn wait(&mut self, cx: &mut Context<'_>) -> bool {
        if matches!(self.state, State::Body(_) | State::Chunked(_)) {
            if let Some(t) = self.timers.as_deref_mut() {
                if let (None, Some(body)) = (t.body_deadline, t.body) {
                    t.body_deadline = Some(Instant::now() + body);
                }
            }
        }
        let Some(deadline) = self.deadline() else {
            return false;
        };
        let t = self.timers.as_deref_mut().expect("a deadline needs timers");
        if t.armed != Some(deadline) {
            t.sleep.as_mut().reset(deadline);
            t.armed = Some(deadline);
        }
        t.sleep.as_mut().poll(cx).is_ready()
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    if self.partial.is_empty() {
                        match self.head(data) {
                            Some(n) => data = &data[n..],
                            None => {
                                self.keep_partial(data);
                                return;
                            }
                        }
                    } else {
                        let before = self.partial.len();
                        self.partial.extend_from_slice(data);
                        let joined = std::mem::take(&mut self.partial);
                        match self.head(&joined) {
                            Some(n) => data = &data[n.saturating_sub(before).min(data.len())..],
                            None => {
                                self.partial = joined;
                                if self.partial.len() > self.max_head {
                                    self.state = State::Off;
                                }
                                return;
                            }
                        }
                    }
                }
                State::Body(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = State::Chunked(if left == n {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    });
                }
                State::Chunked(c) => {
                    self.state = chunk_step(c, data[0]);
                    data = &data[1..];
                }
            }
        }
    }

    fn keep_partial(&mut self, data: &[u8]) {
        if data.len() > self.max_head {
            self.state = State::Off;
        } else {
            self.partial.extend_from_slice(data);
        }
    }

    /// Read a head at the start of `buf`; returns its length, or None if incomplete.
    ///
    /// Only line boundaries and two header names matter here, so this is a line scan, not
    /// a parse (hyper parses, and refuses what is malformed; this guard then stops, see
    /// `Scan::Refused`). A full httparse pass cost more than the rest of the guard.
    fn head(&mut self, buf: &[u8]) -> Option<usize> {
        let scan = match scan_head(buf) {
            Scan::Partial => return None,
            Scan::Refused => {
                self.state = State::Off;
                return Some(buf.len());
            }
            Scan::Head(s) => s,
        };
        if scan.preface {
            self.state = State::Off; // the HTTP/2 connection preface
            return Some(buf.len());
        }
        let (len, lengths, length, te, chunked) =
            (scan.len, scan.lengths, scan.length, scan.te, scan.chunked);
        let index = self.heads;
        self.heads += 1;
        let verdict = match (lengths, te) {
            (n, true) if n > 0 => Some(Ambiguity::ContentLengthAndTransferEncoding),
            (n, _) if n > 1 => Some(Ambiguity::DuplicateContentLength),
            _ => None,
        };
        if let Some(v) = verdict {
            self.record.reason.store(v as u8, Ordering::Relaxed);
            self.record.bad_index.store(index, Ordering::Relaxed);
            self.state = State::Off;
            return Some(buf.len());
        }
        self.state = if chunked {
            State::Chunked(Chunk::Size {
                size: 0,
                digits: false,
                ext: false,
            })
        } else if length > 0 {
            State::Body(length)
        } else {
            State::Head
        };
        Some(len)
    }
}

enum Scan {
    Partial,
    /// Not a head hyper would accept: it answers 400 itself.
    Refused,
    Head(HeadScan),
}

struct HeadScan {
    len: usize,
    preface: bool,
    lengths: usize,
    length: u64,
    te: bool,
    chunked: bool,
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Find the end of a request head (an empty line; CRLF or bare LF, as httparse accepts)
/// and note its Content-Length and Transfer-Encoding fields.
fn scan_head(buf: &[u8]) -> Scan {
    let mut scan = HeadScan {
        len: 0,
        preface: buf.starts_with(b"PRI "),
        lengths: 0,
        length: 0,
        te: false,
        chunked: false,
    };
    let mut pos = 0;
    let mut first = true;
    while let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) {
        let line = &buf[pos..pos + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        if first {
            first = false;
            continue; // the request line
        }
        if line.is_empty() {
            scan.len = pos;
            return Scan::Head(scan);
        }
        if matches!(line[0], b' ' | b'\t') {
            return Scan::Refused; // obsolete line folding
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Scan::Refused;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.len() == 14 && starts_with_ignore_case(name, b"content-length") {
            scan.lengths += 1;
            scan.length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if name.len() == 17 && starts_with_ignore_case(name, b"transfer-encoding") {
            scan.te = true;
            scan.chunked = value.len() >= 7 && value[value.len() - 7..].eq_ignore_ascii_case(b"chunked");
        }
    }
    Scan::Partial
}

fn chunk_step(c: Chunk, b: u8) -> State {
    let next = match c {
        Chunk::Size { size, digits, ext } => match b {
            b'\n' if !digits => return State::Off,
            b'\n' if size == 0 => Chunk::Trailers { len: 0 },
            b'\n' => Chunk::Data(size),
            b'\r' => c,
            _ if ext => c,
            b';' | b' ' | b'\t' => Chunk::Size {
                size,
                digits,
                ext: true,
            },
            _ => match (b as char).to_digit(16) {
                Some(d) if size < (1 << 56) => Chunk::Size {
                    size: size * 16 + d as u64,
                    digits: true,
                    ext,
                },
                _ => return State::Off,
            },
        },
        Chunk::DataEnd => match b {
            b'\r' => c,
            b'\n' => Chunk::Size {
                size: 0,
                digits: false,
                ext: false,
            },
            _ => return State::Off,
        },
        Chunk::Trailers { len } => match b {
            b'\n' if len == 0 => return State::Head,
            b'\n' => Chunk::Trailers { len: 0 },
            b'\r' => c,
            _ => Chunk::Trailers { len: len + 1 },
        },
        Chunk::Data(_) => unreachable!("data is skipped in bulk"),
    };
    State::Chunked(next)
}

fn timed_out(state: State) -> std::io::Error {
    match state {
        State::Head => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the request head did not arrive within the client_header timeout",
        ),
        _ => crate::body::stalled_error(),
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.state != State::Off && self.record.switched.load(Ordering::Relaxed) {
            // No heads, bodies or their deadlines in a WebSocket session.
            self.state = State::Off;
        }
        if self.timers.is_some() && self.deadline().is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(timed_out(self.state)));
        }
        let before = buf.filled().len();
        let heads = self.heads;
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        match res {
            Poll::Ready(Ok(())) => {
                if self.state != State::Off {
                    self.observe(&buf.filled()[before..]);
                }
                if self.timers.is_some() {
                    self.after_read(heads);
                }
            }
            Poll::Pending if self.timers.is_some() && self.wait(cx) => {
                return Poll::Ready(Err(timed_out(self.state)));
            }
            _ => {}
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[&[u8]]) -> Vec<Option<Ambiguity>> {
        let record = FramingRecord::new();
        let mut g = FramingGuard::new((), 16384, record.clone());
        for part in stream {
            g.observe(part);
        }
        (0..g.heads.max(1)).map(|_| record.next_request()).collect()
    }

    #[test]
    fn clean_keep_alive_requests_pass() {
        let s: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(&[s]), vec![None, None, None]);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_flagged_in_either_order() {
        let a: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let b: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
        assert_eq!(
            verdicts(&[a]),
            vec![Some(Ambiguity::ContentLengthAndTransferEncoding)]
        );
        assert_eq!(
            verdicts(&[b]),
            vec![Some(Ambiguity::ContentLengthAndTransferEncoding)]
        );
    }

    #[test]
    fn duplicate_content_length_is_flagged_on_the_right_request() {
        let s: &[u8] =
            b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            verdicts(&[s]),
            vec![None, Some(Ambiguity::DuplicateContentLength)]
        );
    }

    #[test]
    fn chunked_bodies_are_followed_to_the_next_head_across_reads() {
        let s: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        let parts: Vec<&[u8]> = s.chunks(7).collect();
        assert_eq!(
            verdicts(&parts),
            vec![None, Some(Ambiguity::DuplicateContentLength)]
        );
    }

    #[test]
    fn a_head_split_in_the_middle_is_still_read() {
        let s: &[u8] = b"POST / HTTP/1.1\r\nContent-Le";
        let t: &[u8] = b"ngth: 2\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(verdicts(&[s, t]), vec![Some(Ambiguity::DuplicateContentLength)]);
    }

    #[test]
    fn bare_lf_heads_are_read_and_folded_lines_stop_the_guard() {
        let lf: &[u8] = b"POST / HTTP/1.1\nContent-Length: 1\ncontent-length: 1\n\nx";
        assert_eq!(verdicts(&[lf]), vec![Some(Ambiguity::DuplicateContentLength)]);
        let record = FramingRecord::new();
        let mut g = FramingGuard::new((), 16384, record);
        g.observe(b"GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n");
        assert_eq!(g.state, State::Off);
    }

    #[test]
    fn the_http2_preface_turns_the_guard_off() {
        let record = FramingRecord::new();
        let mut g = FramingGuard::new((), 16384, record);
        g.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
        assert_eq!(g.state, State::Off);
    }
}
