//! WebSocket proxying: the handshake goes through every phase like any request (routing,
//! IP lists, limits, the WAF, `on_request` plugins), then, once the upstream answers 101,
//! the client's connection and the upstream's are spliced as raw bytes both ways.
//!
//! Two client handshakes lead to the same upstream one (an HTTP/1.1 `Upgrade`):
//! - HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket`; the client gets the 101.
//! - HTTP/2 extended CONNECT (RFC 8441, `:protocol websocket`); the client gets a 200 and
//!   the HTTP/2 stream carries the frames.
//!
//! Frames are not parsed, only followed (`FrameCursor`) to know where one ends: close codes
//! from either end reach the other intact. When a session is idle for the route's
//! `websocket_idle`, or the worker drains (SIGTERM), the gateway sends a close frame 1001
//! to each side that sits between frames, then closes both connections. A draining worker
//! waits, within its grace period, for a session in the middle of a frame to reach the
//! frame's end first, and for every session to end before it exits.

use crate::h1client::Stream;
use crate::h2server::StreamHold;
use crate::headers::next_u64;
use crate::observe::Finish;
use crate::upstream::InflightGuard;
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Method, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// 1001 "going away": the code of the gateway's own closes, idle or draining.
const GOING_AWAY: u16 = 1001;
const IDLE_CLOSE_REASON: &[u8] = b"idle timeout";
const DRAIN_CLOSE_REASON: &[u8] = b"gateway shutting down";
/// How often a draining session looks whether both directions are between frames.
const BOUNDARY_POLL: Duration = Duration::from_millis(10);
const COPY_BUF: usize = 16 * 1024;

/// A worker's WebSocket sessions: told together when the worker drains, and counted so
/// that it can wait for them.
#[derive(Debug, Default)]
pub struct Sessions {
    draining: tokio::sync::watch::Sender<bool>,
    live: AtomicU64,
    ended: tokio::sync::Notify,
}

/// A session's place in [`Sessions`], given back when the session ends.
struct Tracked {
    sessions: std::sync::Arc<Sessions>,
    draining: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.sessions.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sessions.ended.notify_waiters();
        }
    }
}

impl Sessions {
    fn track(self: &std::sync::Arc<Self>) -> Tracked {
        self.live.fetch_add(1, Ordering::AcqRel);
        Tracked {
            sessions: self.clone(),
            draining: self.draining.subscribe(),
        }
    }

    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// Close every session at its next frame boundary (1001 both ways), and the ones that
    /// start from now on at once.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Until no session is left (bound it with a timeout).
    pub async fn closed(&self) {
        loop {
            let ended = self.ended.notified();
            if self.live() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// How the client asked for the WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// HTTP/1.1 Upgrade: the client gets the 101.
    Upgrade,
    /// HTTP/2 extended CONNECT: the client gets a 200.
    ExtendedConnect,
}

/// A handshake on its way: what the client's side needs once the upstream agreed.
pub struct Pending {
    pub handshake: Handshake,
    on_upgrade: OnUpgrade,
    /// An HTTP/2 session's stream, counted open for as long as the session lasts.
    hold: Option<StreamHold>,
}

/// A session the upstream accepted, waiting for the client's response to go out.
pub struct Session {
    pub handshake: Handshake,
    on_upgrade: OnUpgrade,
    upstream: Stream,
    /// Bytes the upstream sent right after its 101, read with the head.
    early: BytesMut,
    idle: Option<Duration>,
    /// The target's in-flight slot, held for the whole session (least-connections).
    guard: InflightGuard,
    hold: Option<StreamHold>,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Which WebSocket handshake the request is, if any.
pub fn handshake_of(parts: &request::Parts) -> Option<Handshake> {
    match parts.version {
        Version::HTTP_11
            if parts.method == Method::GET
                && has_token(&parts.headers, header::CONNECTION, b"upgrade")
                && has_token(&parts.headers, header::UPGRADE, b"websocket") =>
        {
            Some(Handshake::Upgrade)
        }
        Version::HTTP_2
            if parts.method == Method::CONNECT
                && parts
                    .extensions
                    .get::<hyper::ext::Protocol>()
                    .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) =>
        {
            Some(Handshake::ExtendedConnect)
        }
        _ => None,
    }
}

/// Take over the client's side of a WebSocket handshake. An extended CONNECT becomes the
/// GET of an HTTP/1.1 handshake here, so that routes, limits and plugins see one shape.
pub fn begin(parts: &mut request::Parts, handshake: Handshake) -> Option<Pending> {
    let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
    let hold = parts.extensions.remove::<StreamHold>();
    if handshake == Handshake::ExtendedConnect {
        parts.extensions.remove::<hyper::ext::Protocol>();
        parts.method = Method::GET;
        if !parts.headers.contains_key(&SEC_WEBSOCKET_KEY) {
            // RFC 8441 has no key; the HTTP/1.1 upstream needs one.
            parts.headers.insert(&SEC_WEBSOCKET_KEY, new_key());
        }
    }
    Some(Pending {
        handshake,
        on_upgrade,
        hold,
    })
}

/// A fresh Sec-WebSocket-Key: 16 bytes, base64. It proves nothing to anyone (the upstream
/// only echoes a hash of it), so it needs to be fresh, not secret.
fn new_key() -> HeaderValue {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&next_u64().to_le_bytes());
    HeaderValue::from_str(&base64(&raw)).expect("base64 is a valid header value")
}

fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The upstream request's connection headers (hop-by-hop ones were removed before).
pub fn upstream_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

impl Pending {
    /// The upstream answered 101: take its connection out of the response body (it never
    /// goes back to the pool) and shape the client's answer. None when the connection is
    /// gone (then the client gets the upstream's response as it is).
    pub fn accepted(
        self,
        rparts: &mut response::Parts,
        body: crate::h1client::UpstreamBody,
        guard: InflightGuard,
        idle: Option<Duration>,
    ) -> Option<Session> {
        let (upstream, early) = body.into_switched()?;
        match self.handshake {
            Handshake::Upgrade => upstream_headers(&mut rparts.headers),
            Handshake::ExtendedConnect => {
                rparts.status = StatusCode::OK;
                rparts.headers.remove(&SEC_WEBSOCKET_ACCEPT);
            }
        }
        Some(Session {
            handshake: self.handshake,
            on_upgrade: self.on_upgrade,
            upstream,
            early,
            idle,
            guard,
            hold: self.hold,
        })
    }
}

impl Session {
    /// The status the client must get for the connection to switch.
    pub fn switching_status(&self) -> StatusCode {
        match self.handshake {
            Handshake::Upgrade => StatusCode::SWITCHING_PROTOCOLS,
            Handshake::ExtendedConnect => StatusCode::OK,
        }
    }

    /// Run the session once the client's side has switched; `finish` logs it at its end
    /// (duration and bytes of the whole session). The session counts in `sessions` from
    /// this call on, so a drain that starts before its task first runs still waits for it.
    pub fn run(
        self,
        mut finish: Option<Finish>,
        sessions: &std::sync::Arc<Sessions>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tracked = sessions.track();
        async move {
            let Session {
                on_upgrade,
                upstream,
                early,
                idle,
                guard,
                hold,
                ..
            } = self;
            let _held = (guard, hold);
            let Ok(client) = on_upgrade.await else {
                return;
            };
            let mut draining = tracked.draining.clone();
            let drain = async move {
                let _ = draining.wait_for(|d| *d).await;
            };
            let outcome = splice(TokioIo::new(client), upstream, early, idle, drain).await;
            drop(tracked);
            if let Some(rec) = finish.as_mut().and_then(|f| f.record.as_mut()) {
                rec.bytes_in += outcome.client_to_upstream;
                rec.bytes_out += outcome.upstream_to_client;
            }
            if outcome.end != End::Failed {
                if let Some(f) = finish.as_mut() {
                    f.done();
                }
            }
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their connection.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The worker drained.
    Drained,
    /// A connection failed (reset, write error).
    Failed,
}

#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Follows WebSocket frame boundaries in a byte stream (RFC 6455 §5.2) without keeping
/// the payloads.
#[derive(Debug, Default, Clone)]
pub struct FrameCursor {
    head: [u8; 14],
    have: usize,
    need: usize,
    payload: u64,
}

impl FrameCursor {
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload == 0
    }

    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload > 0 {
                let n = (data.len() as u64).min(self.payload);
                self.payload -= n;
                data = &data[n as usize..];
                continue;
            }
            if self.have == 0 {
                self.need = 2;
            }
            let n = (self.need - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 2 && self.need == 2 {
                let ext = match self.head[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
                self.need = 2 + ext + mask;
            }
            if self.have == self.need {
                self.payload = match self.head[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                    127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
                    n => u64::from(n),
                };
                self.have = 0;
            }
        }
    }
}

/// A close frame with `code` and `reason` (under 124 bytes); masked when it goes to the
/// upstream (a client's frames must be, RFC 6455 §5.3).
pub fn close_frame(code: u16, reason: &[u8], masked: bool) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    let mut out = vec![0x88, payload.len() as u8];
    if masked {
        out[1] |= 0x80;
        let key = (next_u64() as u32).to_be_bytes();
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(&payload);
    }
    out
}

/// Milliseconds since `base`, the session's clock for its last activity.
fn ms_since(base: Instant) -> u64 {
    base.elapsed().as_millis() as u64
}

/// One direction's shared state: what it has copied, whether a write is under way, and
/// whether what it has written stops inside a frame. The last two tell a close frame of the
/// gateway's whether it may go in now without cutting a frame.
#[derive(Default)]
struct Direction {
    count: AtomicU64,
    writing: AtomicBool,
    mid_frame: AtomicBool,
}

impl Direction {
    fn may_close(&self) -> bool {
        !self.writing.load(Ordering::Relaxed) && !self.mid_frame.load(Ordering::Relaxed)
    }
}

/// One direction: copy until the reader ends (then half-close the writer) or fails.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    first: Option<&[u8]>,
    dir: &Direction,
    last: &AtomicU64,
    base: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut cursor = FrameCursor::default();
    if let Some(data) = first.filter(|d| !d.is_empty()) {
        write_flush(writer, data, dir).await?;
        cursor.advance(data);
        dir.mid_frame.store(!cursor.at_boundary(), Ordering::Relaxed);
        dir.count.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = reader.read(&mut buf).await?;
        last.store(ms_since(base), Ordering::Relaxed);
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        cursor.advance(&buf[..n]);
        dir.mid_frame.store(!cursor.at_boundary(), Ordering::Relaxed);
        write_flush(writer, &buf[..n], dir).await?;
        dir.count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(ms_since(base), Ordering::Relaxed);
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8], dir: &Direction) -> io::Result<()> {
    dir.writing.store(true, Ordering::Relaxed);
    writer.write_all(data).await?;
    writer.flush().await?;
    dir.writing.store(false, Ordering::Relaxed);
    Ok(())
}

/// Copy bytes both ways until both sides have closed, one fails, nothing moved for `idle`,
/// or `drain` completes and both directions are between frames (or the session stays in
/// the middle of one for the grace period).
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    early: BytesMut,
    idle: Option<Duration>,
    drain: impl std::future::Future<Output = ()>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream);
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let (up, down) = (Direction::default(), Direction::default());
    let grace = Duration::from_secs(1);
    let end = {
        let up_pump = pump(&mut client_r, &mut upstream_w, None, &up, &last, base);
        let down_pump = pump(&mut upstream_r, &mut client_w, Some(&early), &down, &last, base);
        tokio::pin!(up_pump, down_pump, drain);
        let (mut up_done, mut down_done) = (false, false);
        let idle_wait = async {
            let Some(idle) = idle else {
                return std::future::pending().await;
            };
            loop {
                let since = Duration::from_millis(last.load(Ordering::Relaxed));
                let due = base + since + idle;
                if Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        tokio::pin!(idle_wait);
        // Set when the drain begins: until then, the frame in flight may still end.
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let boundary_poll = async {
                match drain_deadline {
                    Some(_) => tokio::time::sleep(BOUNDARY_POLL).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut up_pump, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(_) => break End::Failed,
                },
                r = &mut down_pump, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(_) => break End::Failed,
                },
                () = &mut idle_wait => break End::Idle,
                () = &mut drain, if drain_deadline.is_none() => {
                    drain_deadline = Some(Instant::now() + grace);
                }
                () = boundary_poll => {}
            }
            if up_done && down_done {
                break End::Closed;
            }
            if let Some(deadline) = drain_deadline {
                if (up.may_close() && down.may_close()) || Instant::now() >= deadline {
                    break End::Drained;
                }
            }
        }
    };
    let reason = match end {
        End::Idle => Some(IDLE_CLOSE_REASON),
        End::Drained => Some(DRAIN_CLOSE_REASON),
        End::Closed | End::Failed => None,
    };
    if let Some(reason) = reason {
        // A close frame only between frames: one cut in the middle would corrupt the stream.
        if down.may_close() {
            let frame = close_frame(GOING_AWAY, reason, false);
            let _ = tokio::time::timeout(grace, async {
                client_w.write_all(&frame).await?;
                client_w.flush().await
            })
            .await;
        }
        if up.may_close() {
            let frame = close_frame(GOING_AWAY, reason, true);
            let _ = tokio::time::timeout(grace, async {
                upstream_w.write_all(&frame).await?;
                upstream_w.flush().await
            })
            .await;
        }
        let _ = tokio::time::timeout(grace, client_w.shutdown()).await;
        let _ = tokio::time::timeout(grace, upstream_w.shutdown()).await;
    }
    Outcome {
        end,
        client_to_upstream: up.count.load(Ordering::Relaxed),
        upstream_to_client: down.count.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => out.push(m | len as u8),
            126..=65535 => {
                out.push(m | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(m | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(7u8, len));
        out
    }

    #[test]
    fn the_cursor_follows_frames_split_anywhere() {
        let mut stream = Vec::new();
        for (len, masked) in [(0, false), (5, true), (125, false), (300, true), (70000, false)] {
            stream.extend(frame(len, masked));
        }
        for split in [1usize, 2, 3, 7, 1000, stream.len()] {
            let mut c = FrameCursor::default();
            for piece in stream.chunks(split) {
                c.advance(piece);
            }
            assert!(c.at_boundary(), "split {split}");
        }
        let mut c = FrameCursor::default();
        c.advance(&stream[..stream.len() - 1]);
        assert!(!c.at_boundary());
        let mut c = FrameCursor::default();
        c.advance(&frame(300, true)[..3]);
        assert!(!c.at_boundary(), "inside the extended length");
    }

    #[test]
    fn close_frames_carry_the_code_and_are_masked_towards_the_upstream() {
        let plain = close_frame(1001, b"idle", false);
        assert_eq!(plain, [0x88, 6, 0x03, 0xe9, b'i', b'd', b'l', b'e']);
        let masked = close_frame(1001, b"idle", true);
        assert_eq!(masked[0], 0x88);
        assert_eq!(masked[1], 0x80 | 6);
        let key = &masked[2..6];
        let payload: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(payload, [0x03, 0xe9, b'i', b'd', b'l', b'e']);
        let mut c = FrameCursor::default();
        c.advance(&masked);
        assert!(c.at_boundary());
    }

    #[test]
    fn keys_are_base64_of_16_bytes() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(new_key().len(), 24);
    }

    fn parts(req: http::Request<()>) -> request::Parts {
        req.into_parts().0
    }

    #[test]
    fn handshakes_are_recognized() {
        let up = parts(
            http::Request::get("/ws")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "WebSocket")
                .body(())
                .unwrap(),
        );
        assert_eq!(handshake_of(&up), Some(Handshake::Upgrade));
        let plain = parts(
            http::Request::get("/ws")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        assert_eq!(handshake_of(&plain), None);
        let h2c = parts(
            http::Request::get("/ws")
                .header("connection", "upgrade")
                .header("upgrade", "h2c")
                .body(())
                .unwrap(),
        );
        assert_eq!(handshake_of(&h2c), None);
        let mut connect = parts(
            http::Request::connect("/ws")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        assert_eq!(handshake_of(&connect), None);
        connect
            .extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(handshake_of(&connect), Some(Handshake::ExtendedConnect));
    }

    #[tokio::test]
    async fn splice_copies_both_ways_and_closes_idle_sessions_with_1001() {
        let (client, mut client_peer) = tokio::io::duplex(64 * 1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(64 * 1024);
        let early = BytesMut::from(&frame(3, false)[..]);
        let task = tokio::spawn(splice(
            client,
            upstream,
            early,
            Some(Duration::from_millis(200)),
            std::future::pending(),
        ));
        let mut got = vec![0u8; 5];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, frame(3, false));
        let hello = frame(4, true);
        client_peer.write_all(&hello).await.unwrap();
        let mut got = vec![0u8; hello.len()];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hello);
        let outcome = task.await.unwrap();
        assert_eq!(outcome.end, End::Idle);
        assert_eq!(outcome.client_to_upstream, hello.len() as u64);
        assert_eq!(outcome.upstream_to_client, 5);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, close_frame(1001, IDLE_CLOSE_REASON, false));
        let mut rest = Vec::new();
        upstream_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..2], &[0x88, 0x80 | 14]);
    }

    #[tokio::test]
    async fn a_drain_waits_for_the_frame_in_flight_then_closes_both_sides_with_1001() {
        let (client, mut client_peer) = tokio::io::duplex(64 * 1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(64 * 1024);
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(splice(client, upstream, BytesMut::new(), None, async move {
            let _ = drain_rx.await;
        }));
        // The client is in the middle of a frame when the drain begins.
        let message = frame(300, true);
        let (first, rest) = message.split_at(100);
        client_peer.write_all(first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        upstream_peer.read_exact(&mut got).await.unwrap();
        drain_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "closed in the middle of a frame");
        client_peer.write_all(rest).await.unwrap();
        let outcome = task.await.unwrap();
        assert_eq!(outcome.end, End::Drained);
        assert_eq!(outcome.client_to_upstream, message.len() as u64);
        let mut up = Vec::new();
        upstream_peer.read_to_end(&mut up).await.unwrap();
        // The rest of the frame, then a masked close frame 1001 (the mask is random).
        assert_eq!(&up[..rest.len()], rest);
        let close = &up[rest.len()..];
        assert_eq!(&close[..2], &[0x88, 0x80 | (2 + DRAIN_CLOSE_REASON.len() as u8)]);
        let mut down = Vec::new();
        client_peer.read_to_end(&mut down).await.unwrap();
        assert_eq!(down, close_frame(GOING_AWAY, DRAIN_CLOSE_REASON, false));
    }

    #[tokio::test]
    async fn sessions_are_counted_until_they_end() {
        let sessions = std::sync::Arc::new(Sessions::default());
        let a = sessions.track();
        let b = sessions.track();
        assert_eq!(sessions.live(), 2);
        let waiter = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.closed().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let mut draining = b.draining.clone();
        sessions.drain();
        assert!(*draining.wait_for(|d| *d).await.unwrap());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sessions.live(), 0);
    }
}
