//! The upstream pool against a real local HTTP/1.1 server that counts its connections.

use bytes::Bytes;
use ferrogate_engine::body::RequestBody;
use ferrogate_engine::pool::{ConnPool, PoolSettings, SendError};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// An upstream that answers "ok" and closes each connection after `per_conn` requests.
async fn upstream(per_conn: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let served = Arc::new(AtomicUsize::new(0));
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                        if n >= per_conn {
                            resp.headers_mut()
                                .insert("connection", "close".parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A request whose body is empty, built the way the proxy builds one: from a client's
/// `Incoming` body (a real hyper client posts into a throwaway server to get one).
async fn empty_request(addr: &str) -> http::Request<RequestBody> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let tx = std::sync::Mutex::new(Some(tx));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req);
            }
            async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new()))) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
    let stream = tokio::net::TcpStream::connect(local).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let send = sender.send_request(http::Request::new(Full::new(Bytes::new())));
    tokio::spawn(send);
    let incoming = rx.await.unwrap();
    let (mut parts, body) = incoming.into_parts();
    parts.uri = format!("http://{addr}/").parse().unwrap();
    http::Request::from_parts(parts, RequestBody::new(body, None, 0))
}

fn settings() -> PoolSettings {
    PoolSettings {
        keepalive: 8,
        keepalive_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(2),
    }
}

async fn get(pool: &std::sync::Arc<ConnPool>, addr: &str) -> Result<Bytes, SendError> {
    let (parts, mut body) = empty_request(addr).await.into_parts();
    let resp = pool.send(&parts, &mut body).await?;
    Ok(resp.into_body().collect().await.expect("body").to_bytes())
}

#[tokio::test(flavor = "current_thread")]
async fn sequential_requests_reuse_one_connection() {
    let (addr, accepted) = upstream(usize::MAX).await;
    let pool = ConnPool::new(&addr, settings());
    for _ in 0..20 {
        assert_eq!(get(&pool, &addr).await.unwrap(), "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle_count(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_the_upstream_closed_is_not_reused() {
    let (addr, accepted) = upstream(1).await;
    let pool = ConnPool::new(&addr, settings());
    for _ in 0..5 {
        assert_eq!(get(&pool, &addr).await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_connection_closed_under_the_pool_is_replaced_transparently() {
    // The upstream closes every connection after one answer but without saying so.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let pool = ConnPool::new(&addr, settings());
    for _ in 0..3 {
        assert_eq!(get(&pool, &addr).await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_abandoned_response_does_not_return_its_connection() {
    let (addr, _) = upstream(usize::MAX).await;
    let pool = ConnPool::new(&addr, settings());
    let (parts, mut body) = empty_request(&addr).await.into_parts();
    let resp = pool.send(&parts, &mut body).await.unwrap();
    assert_eq!(pool.idle_count(), 0);
    drop(resp);
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn connect_refused_is_a_connect_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let pool = ConnPool::new(&addr, settings());
    let err = get(&pool, &addr).await.err().unwrap();
    assert!(matches!(err, SendError::Connect(_)), "{err:?}");
}
