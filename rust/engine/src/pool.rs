//! Keep-alive connections to one upstream target.
//!
//! Hand-written instead of hyper-util's generic client: profiling the proxy showed that
//! client's per-request costs (a hashed pool key, a spawned task per request to wait for
//! the connection to go idle, a checkout future) on the hot path. Here a request takes the
//! most recently used idle connection (LIFO keeps the fewest connections warm) and the
//! response body puts it back the moment it has been read to the end.

use crate::body::RequestBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Settings that shape a pool; a reload that keeps them keeps the pool warm.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
}

struct IdleConn {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

pub struct ConnPool {
    address: String,
    pub settings: PoolSettings,
    idle: Mutex<Vec<IdleConn>>,
}

/// Why a request could not be sent or answered.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    ConnectTimeout,
    Http(hyper::Error),
}

/// A connection lent to one request; [`Lease::release`] returns it to the pool, dropping
/// it closes the connection (used when the response was not read to the end).
pub struct Lease {
    sender: Option<SendRequest<RequestBody>>,
    pool: Arc<ConnPool>,
}

impl Lease {
    pub fn release(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(sender);
        }
    }
}

impl ConnPool {
    pub fn new(address: &str, settings: PoolSettings) -> Arc<Self> {
        Arc::new(ConnPool {
            address: address.to_string(),
            settings,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed()
                && now.duration_since(c.since) < self.settings.keepalive_timeout
            {
                return Some(c.sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // The oldest idle connections sit at the front: expire them there.
        let expired = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) >= self.settings.keepalive_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.settings.keepalive {
            idle.push(IdleConn { sender, since: now });
        }
    }

    /// Idle connections right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let stream = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(&self.address),
        )
        .await
        .map_err(|_| SendError::ConnectTimeout)?
        .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Send `req` on an idle connection or a new one. A request that an idle connection
    /// could not take (it had closed) is retried on another; one that was written is never
    /// sent twice.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, reused) = match self.take() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            // A connection returned by the previous response may not have gone idle yet.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            sender: Some(sender),
                            pool: self.clone(),
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }
}
