//! Keep-alive connections to one upstream target.
//!
//! A request takes the most recently used idle connection (LIFO keeps the fewest
//! connections warm); its response body hands the connection back the moment it has been
//! read to the end (`h1client::UpstreamBody`). Connections have no task of their own: the
//! request's task does their I/O.

use crate::body::RequestBody;
use crate::forwarding::Forwarding;
use crate::h1client::{Conn, ExchangeError, Recycle, UpstreamBody};
use crate::upstream_tls::TargetTls;
use http::{request, Method, Response};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Settings that shape a pool; a reload that keeps them keeps the pool warm.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
    /// The connect timeout of [`ConnPool::send`]; `send_with` takes its own.
    pub connect_timeout: Duration,
}

/// The timeouts of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTimeouts {
    pub connect: Duration,
    /// Each wait for the upstream to take more of the request.
    pub write: Option<Duration>,
    /// From the attempt's start (after connecting, for a new connection) to the response
    /// head, then each wait for more of the response body.
    pub read: Option<Duration>,
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

pub struct ConnPool {
    address: String,
    pub settings: PoolSettings,
    /// None: plain HTTP.
    pub tls: Option<TargetTls>,
    idle: Mutex<Vec<IdleConn>>,
    /// When a TLS failure was last logged (ns on the health clock), to log one a second.
    tls_logged: std::sync::atomic::AtomicU64,
    /// Some: the target speaks HTTP/2 (one multiplexed connection, `h2client.rs`).
    h2: Option<crate::h2client::H2Conn>,
}

/// Why a request could not be sent or answered. A read or write timeout is an
/// `ExchangeError::Io` of kind `TimedOut`.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    ConnectTimeout,
    /// The TLS handshake failed (the target's certificate was refused, or it refused ours);
    /// the error's inner value is the `rustls::Error` (see `upstream_tls::reason`).
    Tls(std::io::Error),
    Exchange(ExchangeError),
}

impl Recycle for ConnPool {
    fn recycle(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // The oldest idle connections sit at the front: expire them there.
        let timeout = self.settings.keepalive_timeout;
        let expired = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) >= timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.settings.keepalive {
            idle.push(IdleConn { conn, since: now });
        }
    }
}

/// A new connection to `address`, with its TLS handshake when `tls` is given; `timeout`
/// bounds both.
pub async fn connect(address: &str, tls: Option<&TargetTls>, timeout: Duration) -> Result<Conn, SendError> {
    let opened = async {
        let stream = TcpStream::connect(address).await.map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        match tls {
            None => Ok(Conn::new(stream)),
            Some(tls) => Ok(Conn::tls(tls.connect(stream).await.map_err(SendError::Tls)?)),
        }
    };
    tokio::time::timeout(timeout, opened)
        .await
        .map_err(|_| SendError::ConnectTimeout)?
}

/// Methods that may be sent again when a reused connection turns out dead under them
/// (RFC 9110 §9.2.2), as nginx does.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl ConnPool {
    pub fn new(address: &str, settings: PoolSettings) -> Arc<Self> {
        Self::with_tls(address, settings, None)
    }

    /// A pool whose connections speak TLS when `tls` is given.
    pub fn with_tls(address: &str, settings: PoolSettings, tls: Option<TargetTls>) -> Arc<Self> {
        Arc::new(ConnPool {
            address: address.to_string(),
            settings,
            tls,
            idle: Mutex::new(Vec::new()),
            tls_logged: std::sync::atomic::AtomicU64::new(0),
            h2: None,
        })
    }

    /// A pool for a target that speaks HTTP/2 (h2c, or h2 by ALPN when `tls` is given).
    pub fn http2(address: &str, settings: PoolSettings, tls: Option<TargetTls>) -> Arc<Self> {
        Arc::new(ConnPool {
            address: address.to_string(),
            settings,
            h2: Some(crate::h2client::H2Conn::new(address, tls.clone())),
            tls,
            idle: Mutex::new(Vec::new()),
            tls_logged: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn is_http2(&self) -> bool {
        self.h2.is_some()
    }

    /// Whether a TLS failure at `now` (ns) should be logged: at most one a second, since
    /// every request to a target with a bad certificate fails the same way.
    pub fn log_tls_failure(&self, now: u64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.tls_logged.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
            && self
                .tls_logged
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The newest idle connection still fresh at `now` (the attempt's start: one clock
    /// read per request fewer).
    fn take(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut c) = idle.pop() {
            if now.duration_since(c.since) < self.settings.keepalive_timeout && c.conn.is_reusable_idle() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Idle connections right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    async fn connect(&self, timeout: Duration) -> Result<Conn, SendError> {
        connect(&self.address, self.tls.as_ref(), timeout).await
    }

    /// Send a request on an idle connection or a new one and wait for the response head;
    /// the body streams through the returned response. A reused connection that turns out
    /// to be dead is replaced, and the request sent again, only when that cannot repeat a
    /// side effect: nothing of its body was consumed, and the head never left or the
    /// method is idempotent.
    pub async fn send(
        self: &Arc<Self>,
        parts: &request::Parts,
        body: &mut RequestBody,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timeouts = AttemptTimeouts {
            connect: self.settings.connect_timeout,
            write: None,
            read: None,
        };
        self.send_with(parts, body, None, &timeouts, Instant::now()).await
    }

    /// [`send`] with the attempt's own timeouts; `started` is when the attempt began (the
    /// read timeout counts from it on a reused connection, from the connect otherwise).
    ///
    /// [`send`]: ConnPool::send
    pub async fn send_with(
        self: &Arc<Self>,
        parts: &request::Parts,
        body: &mut RequestBody,
        forwarding: Option<&Forwarding>,
        timeouts: &AttemptTimeouts,
        started: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if let Some(h2) = &self.h2 {
            let resp = h2.send(parts, body, forwarding, timeouts, started).await?;
            return Ok(resp.map(UpstreamBody::h2));
        }
        let mut deadline = timeouts.read.map(|r| ((started + r).into(), r));
        loop {
            let (conn, reused) = match self.take(started) {
                Some(c) => (c, true),
                None => {
                    let conn = self.connect(timeouts.connect).await?;
                    deadline = timeouts.read.map(|r| ((Instant::now() + r).into(), r));
                    (conn, false)
                }
            };
            match conn
                .exchange(parts, body, forwarding, timeouts.write, deadline)
                .await
            {
                Ok((resp, framing, conn)) => {
                    let home: Arc<dyn Recycle> = self.clone();
                    return Ok(resp.map(|()| UpstreamBody::new(conn, framing, home, timeouts.read)));
                }
                Err(ExchangeError::Io {
                    before_response: true,
                    sent_body: false,
                    wrote_head,
                    ref error,
                }) if reused
                    && error.kind() != std::io::ErrorKind::TimedOut
                    && (!wrote_head || idempotent(&parts.method)) => {}
                Err(e) => return Err(SendError::Exchange(e)),
            }
        }
    }
}
