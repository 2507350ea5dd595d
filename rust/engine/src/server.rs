//! A worker: accepts on the listening sockets the master handed over, serves HTTP/1.1 and
//! h2c (prior knowledge) on each connection, or HTTPS (HTTP/1.1 or HTTP/2 by ALPN) on the
//! TLS ones, reloads on SIGHUP and drains on SIGTERM.

use crate::body::InboundBody;
use crate::config::GatewayConfig;
use crate::conn_limit::Admission;
use crate::engine::Engine;
use crate::filters::client_ip_value;
use crate::framing::{FramingGuard, FramingRecord};
use crate::h1server::{self, Outcome, Rewind};
use crate::h2server;
use crate::plugins::HostLoader;
use crate::proxy::{self, Worker};
use crate::ratelimit::SharedTable;
use crate::tls::{Terminator, TlsConn};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// One structured event line on stderr; the master collects workers' stderr.
pub fn log_event(level: &str, event: &str, fields: serde_json::Value) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut line = serde_json::json!({"ts": ts, "level": level, "event": event, "pid": std::process::id()});
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    // One write per line: workers share the master's stderr, and a write of under
    // PIPE_BUF bytes is never interleaved with another process's.
    let mut text = line.to_string();
    text.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
}

fn read_config(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The loader of plugin hosts, when this worker can run plugins.
pub type Loader = Option<Arc<dyn HostLoader>>;

fn build_engine(text: &str, previous: Option<&Engine>, loader: &Loader) -> Result<Engine, String> {
    let cfg = GatewayConfig::from_json(text)?;
    let plugins = match loader {
        Some(l) if cfg.routes.iter().any(|r| r.plugins.is_some()) => l.load(text)?,
        Some(_) | None => None,
    };
    Engine::build_with(&cfg, previous, plugins)
        .map_err(|p| p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))
}

/// Apply the config file if it changed since `applied` (the text in force). The build
/// (which may import plugin code) runs off the serving thread.
async fn reload(
    worker: &Worker,
    path: &Path,
    worker_id: usize,
    applied: &mut String,
    loader: &Loader,
    tls: Option<&Arc<Terminator>>,
) {
    let result = match read_config(path) {
        Ok(text) if text == *applied => return,
        Ok(text) => {
            let previous = worker.engine.load_full();
            let loader = loader.clone();
            let job = text.clone();
            match tokio::task::spawn_blocking(move || build_engine(&job, Some(&previous), &loader)).await {
                Ok(Ok(engine)) => {
                    worker.engine.store(Arc::new(engine));
                    if let Err(e) = worker.apply_observe() {
                        log_event(
                            "error",
                            "observe_apply_failed",
                            serde_json::json!({"worker": worker_id, "error": e}),
                        );
                    }
                    worker.start_probes();
                    if let Some(t) = tls {
                        // Certificates are read again on every reload, changed or not.
                        t.apply(worker.engine.load().tls.as_ref());
                    }
                    *applied = text;
                    log_event("info", "config_applied", serde_json::json!({"worker": worker_id}));
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(format!("the config build failed: {e}")),
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        log_event(
            "error",
            "config_apply_failed",
            serde_json::json!({"worker": worker_id, "error": e}),
        );
    }
}

/// Exit with the parent: a worker never outlives its master.
fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
}

fn listener_from_fd(fd: RawFd) -> Result<TcpListener, String> {
    // SAFETY: the master passed this descriptor to us as a listening TCP socket we now own.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std.set_nonblocking(true).map_err(|e| format!("fd {fd}: {e}"))?;
    TcpListener::from_std(std).map_err(|e| format!("fd {fd}: {e}"))
}

/// How connections are served, set up once per worker from the config it started with.
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    max_head: usize,
    max_headers: usize,
    /// A TLS client gets this long to finish its handshake.
    handshake_timeout: std::time::Duration,
    /// The longest wait for a kept-alive connection's next request (hyper's header-read
    /// timeout on the connections it serves).
    client_idle: std::time::Duration,
}

impl Protocols {
    fn new(engine: &Engine) -> Self {
        let max_head = engine.limits.max_header_bytes.max(8192);
        let h2_headers = engine.limits.max_header_bytes.min(u32::MAX as usize) as u32;
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(engine.client_idle)
            .max_buf_size(max_head)
            .max_headers(engine.limits.max_headers);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // RFC 8441: WebSockets over HTTP/2 (extended CONNECT, see `websocket.rs`).
        h2.timer(TokioTimer::new())
            .max_header_list_size(h2_headers)
            .enable_connect_protocol();
        Protocols {
            h1,
            h2,
            max_head,
            max_headers: engine.limits.max_headers,
            handshake_timeout: engine.client_idle,
            client_idle: engine.client_idle,
        }
    }
}

/// Slots of the rate limit and quota tables when the master did not hand them over (a lone
/// worker).
const PRIVATE_TABLE_SLOTS: usize = 1 << 16;
const PRIVATE_QUOTA_SLOTS: usize = 1 << 14;

/// Run a worker until SIGTERM. Blocks the calling thread. `limits` is the node's shared rate
/// limit and quota tables (a memfd, the limit table's size, then the quota table's) when the
/// master made them; `health` the node's board of active health check results (a memfd and
/// its size). `tls_fds` are listening sockets that terminate TLS (the config's `tls`).
#[allow(clippy::too_many_arguments)]
pub fn serve(
    fds: &[RawFd],
    tls_fds: &[RawFd],
    config_path: &Path,
    worker_id: usize,
    loader: Loader,
    limits: Option<(RawFd, usize, usize)>,
    health: Option<(RawFd, usize)>,
) -> Result<(), String> {
    die_with_parent();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let mut applied = read_config(config_path)?;
        let engine = build_engine(&applied, None, &loader)?;
        let protocols = Arc::new(Protocols::new(&engine));
        let (table, quotas) = match limits {
            Some((fd, len, quota_len)) => (
                SharedTable::from_fd(fd, len, 0),
                SharedTable::from_fd(fd, quota_len, len),
            ),
            None => (
                SharedTable::anonymous(PRIVATE_TABLE_SLOTS),
                SharedTable::anonymous(PRIVATE_QUOTA_SLOTS),
            ),
        };
        let table = table.map_err(|e| format!("cannot map the rate limit table: {e}"))?;
        let quotas = quotas.map_err(|e| format!("cannot map the quota table: {e}"))?;
        if let Some((fd, len, quota_len)) = limits {
            // Plugins' counters (`counters.rs`), after both tables in the same memfd.
            crate::counters::install_from_fd(fd, len + quota_len)
                .map_err(|e| format!("cannot map the plugin counter tables: {e}"))?;
        }
        // The node's health check board; without one, this worker probes on its own.
        let board = match health {
            Some((fd, len)) => Some(
                crate::probe::HealthBoard::from_fd(fd, len)
                    .map_err(|e| format!("cannot map the health check board: {e}"))?,
            ),
            None => None,
        };
        let env = crate::observe::ObserveEnv {
            worker_id,
            runtime_path: config_path.to_path_buf(),
        };
        let worker = Arc::new(
            Worker::new(engine, table, quotas)
                .with_health_board(board)
                .with_observe_env(env),
        );
        worker.apply_observe()?;
        worker.start_probes();
        let graceful = Arc::new(GracefulShutdown::new());
        let (stopping, stopping_rx) = watch::channel(false);
        let terminator = match (tls_fds.is_empty(), worker.engine.load().tls.as_ref()) {
            (true, _) => None,
            (false, Some(cfg)) => Some(Arc::new(Terminator::new(cfg, worker_id)?)),
            (false, None) => {
                return Err("TLS listeners were handed over but the config has no 'tls' section".into())
            }
        };
        let mut accepting = Vec::new();
        let plain = fds.iter().map(|&fd| (fd, None));
        let secure = tls_fds.iter().map(|&fd| (fd, terminator.clone()));
        for (fd, tls) in plain.chain(secure) {
            let listener = listener_from_fd(fd)?;
            accepting.push(tokio::spawn(accept_loop(
                listener,
                tls,
                worker.clone(),
                protocols.clone(),
                graceful.clone(),
                stopping_rx.clone(),
            )));
        }
        if let Some(t) = &terminator {
            accepting.push(t.watch());
        }
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        // logrotate moved the access log: reopen it (until now SIGUSR1 was ignored).
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
        log_event("info", "worker_started", serde_json::json!({"worker": worker_id}));
        // Cache purges the master writes beside the runtime file (`cache.rs`).
        crate::cache::watch_purges(worker.clone(), config_path);
        // A reload that landed between reading the config and installing the SIGHUP
        // handler would otherwise be missed: look at the file once more.
        reload(
            &worker,
            config_path,
            worker_id,
            &mut applied,
            &loader,
            terminator.as_ref(),
        )
        .await;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = hup.recv() => {
                    reload(&worker, config_path, worker_id, &mut applied, &loader, terminator.as_ref()).await
                }
                _ = usr1.recv() => {
                    if let Some(log) = &worker.observer.load().access_log {
                        log.reopen();
                    }
                }
            }
        }
        // Stop accepting, then let in-flight requests finish within the grace period.
        for task in &accepting {
            task.abort();
        }
        for task in accepting {
            let _ = task.await;
        }
        let _ = stopping.send(true);
        worker.websockets.drain();
        let grace = worker.engine.load().grace_period;
        let graceful = Arc::try_unwrap(graceful)
            .map_err(|_| "accept loops still hold the shutdown handle".to_string())?;
        let open = graceful.count();
        let sessions = worker.websockets.live();
        let all_closed = async {
            graceful.shutdown().await;
            worker.websockets.closed().await;
        };
        let drained = tokio::time::timeout(grace, all_closed).await.is_ok();
        worker.observer.load_full().shutdown().await;
        worker.observer.load().flush_at_exit();
        log_event(
            "info",
            "worker_stopped",
            serde_json::json!({
                "worker": worker_id,
                "open_connections": open,
                "websocket_sessions": sessions,
                "drained": drained,
            }),
        );
        Ok(())
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<Terminator>>,
    worker: Arc<Worker>,
    protocols: Arc<Protocols>,
    graceful: Arc<GracefulShutdown>,
    stopping: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                log_event(
                    "warn",
                    "accept_failed",
                    serde_json::json!({"error": e.to_string()}),
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => tokio::spawn(serve_connection(
                stream,
                peer,
                worker.clone(),
                protocols.clone(),
                graceful.watcher(),
                stopping.clone(),
            )),
            Some(t) => tokio::spawn(serve_tls_connection(
                stream,
                peer,
                t.acceptor(),
                worker.clone(),
                protocols.clone(),
                graceful.watcher(),
                stopping.clone(),
            )),
        };
    }
}

/// Count a new connection against its address's limit: None when it is over (the
/// connection is closed unanswered); else its slot, and the slow-client timeouts to apply.
fn admit(worker: &Arc<Worker>, peer: &SocketAddr) -> Option<(Admission, Duration, Duration)> {
    let engine = worker.engine.load();
    let max = engine.limits.max_connections_per_ip;
    match worker.connections.admit(peer.ip(), max, &engine.trusted_proxies) {
        Admission::Refused => None,
        slot => Some((slot, engine.client_header, engine.client_body)),
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(d).await;
}

/// Serve one client connection: HTTP/2 when it opens with the HTTP/2 preface (h2c with
/// prior knowledge), HTTP/1.1 otherwise. The connection's first read tells them apart
/// (three bytes are enough: "PRI" starts no HTTP/1.1 method) and its bytes stay with the
/// server chosen; hyper-util's auto-detection instead wraps every read of the
/// connection's life, which profiling showed on the per-request path.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    worker: Arc<Worker>,
    protocols: Arc<Protocols>,
    watcher: Watcher,
    mut stopping: watch::Receiver<bool>,
) {
    let _open = crate::metrics::connection_opened();
    let Some((_slot, header_timeout, body_timeout)) = admit(&worker, &peer) else {
        return;
    };
    let opened = tokio::time::Instant::now();
    let mut first = bytes::BytesMut::with_capacity(h1server::READ_SIZE);
    // The watcher holds up shutdown until this task ends: a client that connects and sends
    // nothing must not keep the worker waiting for the grace period (nor for longer than
    // the header timeout, counted from the connection's opening however the bytes come).
    let until = sleep_unless_zero(header_timeout);
    let mut until = std::pin::pin!(until);
    while first.len() < 3 && b"PRI".starts_with(&first) {
        let read = tokio::select! {
            read = stream.read_buf(&mut first) => read,
            _ = stopping.changed() => return,
            () = until.as_mut() => return,
        };
        if !matches!(read, Ok(1..)) {
            return;
        }
    }
    let client_ip = client_ip_value(&peer);
    if first.starts_with(b"PRI") {
        let stream = Rewind::new(stream, first.freeze());
        let stall = body_timeout;
        serve_h2(
            stream, worker, peer, client_ip, None, &protocols, watcher, stopping, stall,
        )
        .await;
        return;
    }
    // HTTP/1.1: `h1server.rs` serves the connection until a request needs hyper.
    let settings = h1server::Settings {
        max_head: protocols.max_head,
        max_headers: protocols.max_headers,
        idle: protocols.client_idle,
        header: header_timeout,
        body: body_timeout,
    };
    let served = h1server::serve(
        stream,
        first,
        &worker,
        peer,
        &client_ip,
        &settings,
        opened,
        &mut stopping,
    );
    let (stream, rest) = match served.await {
        Outcome::Closed => return,
        Outcome::HandOver(stream, rest) => (stream, rest),
    };
    let stream = Rewind::new(stream, rest);
    let times = (tokio::time::Instant::now(), header_timeout, body_timeout);
    serve_h1(
        stream, worker, peer, client_ip, None, &protocols, watcher, stopping, times,
    )
    .await;
}

/// Serve an HTTP/1.1 connection on hyper (a TLS one, or a plain one `h1server.rs` handed
/// over), under the framing guard with its head and body deadlines: `times` is when the
/// connection's first head started and the `client_header` and `client_body` timeouts.
#[allow(clippy::too_many_arguments)]
async fn serve_h1<IO>(
    stream: IO,
    worker: Arc<Worker>,
    peer: SocketAddr,
    client_ip: http::HeaderValue,
    tls: Option<TlsConn>,
    protocols: &Protocols,
    watcher: Watcher,
    stopping: watch::Receiver<bool>,
    times: (tokio::time::Instant, Duration, Duration),
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let record = FramingRecord::new();
    let svc = {
        let record = record.clone();
        service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(tls) = &tls {
                req.extensions_mut().insert(tls.clone());
            }
            let worker = worker.clone();
            let client_ip = client_ip.clone();
            let ambiguity = record.next_request();
            let switching = switch_watch(&req, &record);
            async move {
                let req = req.map(InboundBody::Hyper);
                let resp = proxy::handle(&worker, req, peer, client_ip, ambiguity).await;
                switched(switching, &resp);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let (opened, header_timeout, body_timeout) = times;
    let io = TokioIo::new(
        FramingGuard::new(stream, protocols.max_head, record).with_timeouts(
            opened,
            header_timeout,
            body_timeout,
        ),
    );
    serve_hyper(
        protocols.h1.serve_connection(io, svc).with_upgrades(),
        watcher,
        stopping,
        None,
    )
    .await;
}

/// The FramingRecord to tell when this request may switch the connection's protocol.
fn switch_watch<B>(req: &hyper::Request<B>, record: &Arc<FramingRecord>) -> Option<Arc<FramingRecord>> {
    req.headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| record.clone())
}

fn switched<B>(record: Option<Arc<FramingRecord>>, resp: &hyper::Response<B>) {
    if let Some(record) = record.filter(|_| resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS) {
        record.switch();
    }
}

/// Serve a connection of hyper's to its end, gracefully ended by a drain. hyper-util has
/// no graceful watch for an HTTP/1.1 connection that may switch protocols (WebSocket),
/// so the watcher is only held (shutdown waits for this task) and the drain signal comes
/// from `stopping`. A switched connection leaves hyper: its session runs in a task of its
/// own, counted in `Worker::websockets`.
///
/// `idle`: an HTTP/2 connection's streams, ended like a drain (GOAWAY) once none has been
/// open for the duration (`timeouts.client_idle`).
async fn serve_hyper<C>(
    conn: C,
    watcher: Watcher,
    mut stopping: watch::Receiver<bool>,
    idle: Option<(&h2server::Streams, Duration)>,
) where
    C: std::future::Future + Graceful,
{
    let _held = watcher;
    let mut conn = std::pin::pin!(conn);
    let idle_wait = async {
        match idle {
            Some((streams, idle)) if !idle.is_zero() => {
                streams.idle_for(idle).await;
                streams
            }
            _ => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        _ = conn.as_mut() => return,
        stop = stopping.wait_for(|s| *s) => stop.is_ok().then_some(Ending::Drain),
        streams = idle_wait => Some(Ending::Idle(streams)),
    };
    // Without a drain signal (none can come any more) the connection is served to its end.
    match ending {
        None => {}
        Some(Ending::Drain) => conn.as_mut().begin_graceful(),
        Some(Ending::Idle(streams)) => {
            conn.as_mut().begin_graceful();
            // hyper closes after the client's answer to its ping; a client that does not
            // answer (or has not finished its preface) is dropped once it has had a second
            // and still holds no stream.
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if streams.open() == 0 {
                            return;
                        }
                    }
                }
            }
        }
    }
    let _ = conn.await;
}

enum Ending<'a> {
    Drain,
    /// No stream was open for the idle timeout.
    Idle(&'a h2server::Streams),
}

/// `graceful_shutdown` of hyper's connections.
trait Graceful {
    fn begin_graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_graceful(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_graceful(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// Serve an HTTP/2 client connection (h2c with prior knowledge, or h2 by ALPN).
#[allow(clippy::too_many_arguments)]
async fn serve_h2<IO>(
    io: IO,
    worker: Arc<Worker>,
    peer: SocketAddr,
    client_ip: http::HeaderValue,
    tls: Option<TlsConn>,
    protocols: &Protocols,
    watcher: Watcher,
    stopping: watch::Receiver<bool>,
    body_stall: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let streams = h2server::Streams::new();
    let svc = h2server::StreamService {
        worker,
        peer,
        client_ip,
        tls,
        streams: streams.clone(),
        body_stall,
    };
    let conn = protocols.h2.serve_connection(TokioIo::new(io), svc);
    serve_hyper(conn, watcher, stopping, Some((&streams, protocols.client_idle))).await;
}

/// Serve one connection of a TLS listener: the handshake (bounded by the client idle
/// timeout), then HTTP/2 when ALPN chose h2, HTTP/1.1 otherwise.
async fn serve_tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    worker: Arc<Worker>,
    protocols: Arc<Protocols>,
    watcher: Watcher,
    mut stopping: watch::Receiver<bool>,
) {
    let _open = crate::metrics::connection_opened();
    let Some((_slot, header_timeout, body_timeout)) = admit(&worker, &peer) else {
        return;
    };
    let opened = tokio::time::Instant::now();
    let handshake = tokio::time::timeout(protocols.handshake_timeout, acceptor.accept(stream));
    // A failed handshake (no client certificate when one is required, an old protocol
    // version, an untrusted certificate) has already told the client with a TLS alert.
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => return,
        },
        _ = stopping.changed() => return,
    };
    let (_, conn) = stream.get_ref();
    let info: TlsConn = crate::tls::connection_info(conn);
    let h2 = conn.alpn_protocol() == Some(b"h2".as_slice());
    let client_ip = client_ip_value(&peer);
    if h2 {
        let tls = Some(info);
        serve_h2(
            stream,
            worker,
            peer,
            client_ip,
            tls,
            &protocols,
            watcher,
            stopping,
            body_timeout,
        )
        .await;
        return;
    }
    let times = (opened, header_timeout, body_timeout);
    serve_h1(
        stream,
        worker,
        peer,
        client_ip,
        Some(info),
        &protocols,
        watcher,
        stopping,
        times,
    )
    .await;
}
