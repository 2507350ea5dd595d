//! The training load of the profile-guided build (`cext/pgo.py`).
//!
//! [`run`] serves as a worker does, with the built-in echo upstream behind it on loopback,
//! sends the requests most traffic is made of (small GETs at 64 and 256 connections, POSTs
//! with a JSON body, unmatched paths, h2c streams) and checks every answer. In an extension
//! built with `-Cprofile-generate`, the process writes the counts of the code those
//! requests ran when it exits; the wheel is then compiled with them. It lives in the
//! extension itself because only the same build of the same crates has the same functions
//! (a separate program's dependencies resolve other features, and their symbols differ).

use crate::{echo, server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// One kind of request and the status the gateway must answer it with.
#[derive(Clone, Copy)]
struct Shape {
    method: &'static str,
    path: &'static str,
    body: usize,
    status: u16,
}

const GET: Shape = Shape {
    method: "GET",
    path: "/api/items?page=2",
    body: 0,
    status: 200,
};
const POST: Shape = Shape {
    method: "POST",
    path: "/api/items",
    body: 1100,
    status: 200,
};
const UNROUTED: Shape = Shape {
    method: "GET",
    path: "/elsewhere",
    body: 0,
    status: 404,
};

/// Serve and load a gateway until the training requests are done; how many there were. The
/// gateway's threads go on serving until the process exits.
pub fn run() -> Result<u64, String> {
    let bind = || TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"));
    let (echo_socket, proxy_socket) = (bind()?, bind()?);
    let echo_addr = echo_socket.local_addr().map_err(|e| e.to_string())?;
    let proxy_addr = proxy_socket.local_addr().map_err(|e| e.to_string())?;
    let config = config_file(echo_addr)?;
    std::thread::spawn(move || echo::serve_echo(echo_socket.into_raw_fd()));
    let path = config.clone();
    std::thread::spawn(move || {
        if let Err(e) = server::serve(&[proxy_socket.into_raw_fd()], &[], &path, 0, None, None, None) {
            eprintln!("training: the gateway stopped: {e}");
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let done = rt.block_on(async move {
        ready(proxy_addr).await?;
        let mut n = 0;
        n += http1(proxy_addr, 64, 300, GET).await?;
        n += http1(proxy_addr, 256, 100, GET).await?;
        n += http1(proxy_addr, 32, 200, POST).await?;
        n += http1(proxy_addr, 8, 100, UNROUTED).await?;
        n += h2c(proxy_addr, 4, 16, 250).await?;
        Ok::<_, String>(n)
    });
    let _ = std::fs::remove_dir_all(config.parent().unwrap_or(&config));
    done
}

/// The gateway's config: every `/api/` path to the echo upstream.
fn config_file(echo: SocketAddr) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("ferrogate-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("gateway.json");
    let json = format!(
        r#"{{"upstreams": {{"echo": {{"targets": [{{"address": "{echo}"}}], "keepalive": 1024}}}},
            "routes": [{{"name": "api", "paths": ["/api/*"], "upstream": "echo"}}]}}"#
    );
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Wait until the gateway answers (its worker builds the engine first).
async fn ready(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http1(addr, 1, 1, GET).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the gateway on {addr} did not answer within 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(shape: Shape, addr: SocketAddr) -> Request<Full<Bytes>> {
    let item = "{\"id\":1,\"name\":\"ferrogate\"},";
    let body = Bytes::from(item.repeat(shape.body / item.len() + 1)).slice(..shape.body);
    let mut req = Request::builder()
        .method(Method::from_bytes(shape.method.as_bytes()).expect("a valid method"))
        .uri(shape.path)
        .header("host", addr.to_string())
        .header("user-agent", "ferrogate-train")
        .header("accept", "*/*");
    if shape.body > 0 {
        req = req.header("content-type", "application/json");
    }
    req.body(Full::new(body)).expect("a valid request")
}

async fn check(resp: hyper::Response<hyper::body::Incoming>, shape: Shape) -> Result<(), String> {
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("reading an answer: {e}"))?;
    if status != StatusCode::from_u16(shape.status).expect("a valid status") {
        return Err(format!(
            "{} {} got {status}, not {}",
            shape.method, shape.path, shape.status
        ));
    }
    Ok(())
}

/// `conns` keep-alive HTTP/1.1 connections sending `each` requests one after the other.
async fn http1(addr: SocketAddr, conns: usize, each: usize, shape: Shape) -> Result<u64, String> {
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        tasks.spawn(async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            for _ in 0..each {
                let resp = send
                    .send_request(request(shape, addr))
                    .await
                    .map_err(|e| e.to_string())?;
                check(resp, shape).await?;
            }
            Ok::<_, String>(())
        });
    }
    join(tasks).await?;
    Ok((conns * each) as u64)
}

/// `conns` h2c connections, each with `streams` concurrent streams of `each` GETs.
async fn h2c(addr: SocketAddr, conns: usize, streams: usize, each: usize) -> Result<u64, String> {
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        for _ in 0..streams {
            let mut send = send.clone();
            tasks.spawn(async move {
                for _ in 0..each {
                    let mut req = request(GET, addr);
                    *req.uri_mut() = format!("http://{addr}{}", GET.path).parse().expect("a valid URI");
                    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                    check(resp, GET).await?;
                }
                Ok::<_, String>(())
            });
        }
    }
    join(tasks).await?;
    Ok((conns * streams * each) as u64)
}

async fn join(mut tasks: JoinSet<Result<(), String>>) -> Result<(), String> {
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}
