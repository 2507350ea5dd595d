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
                            resp.headers_mut().insert("connection", "close".parse().unwrap());
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
    request_with_body(addr, Bytes::new()).await
}

/// A request whose body streams from a real client: a hyper client posts `body` to a
/// throwaway server, whose `Incoming` body becomes the request body here.
async fn request_with_body(addr: &str, body: Bytes) -> http::Request<RequestBody> {
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
            // Never answer: the throwaway server must keep reading the body for us.
            async {
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
            }
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
    let send = sender.send_request(http::Request::post("/").body(Full::new(body)).unwrap());
    tokio::spawn(send);
    let incoming = rx.await.unwrap();
    let (mut parts, body) = incoming.into_parts();
    parts.uri = format!("http://{addr}/").parse().unwrap();
    let body = ferrogate_engine::body::InboundBody::Hyper(body);
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

#[tokio::test(flavor = "current_thread")]
async fn an_upstream_that_answers_before_reading_the_body_is_heard() {
    // Reads only the head, answers 413 and then neither reads nor closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
            .await
            .unwrap();
        std::future::pending::<()>().await;
        drop(s);
    });
    let pool = ConnPool::new(&addr, settings());
    let (parts, mut body) = request_with_body(&addr, Bytes::from(vec![b'x'; 8 << 20]))
        .await
        .into_parts();
    let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(&parts, &mut body))
        .await
        .expect("the early answer arrives, no deadlock")
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "big!");
    assert_eq!(
        pool.idle_count(),
        0,
        "a connection with half a request on it is not reused"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_streamed_body_arrives_whole() {
    // Echo server: answers with the number of body bytes it read.
    let (tx, rx) = tokio::sync::oneshot::channel::<usize>();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let tx = std::sync::Mutex::new(Some(tx));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                let n = req.into_body().collect().await.unwrap().to_bytes().len();
                if let Some(tx) = tx {
                    let _ = tx.send(n);
                }
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(n.to_string()))))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
    let pool = ConnPool::new(&addr, settings());
    let (parts, mut body) = request_with_body(&addr, Bytes::from(vec![7u8; 3 << 20]))
        .await
        .into_parts();
    let resp = pool.send(&parts, &mut body).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        (3 << 20).to_string()
    );
    assert_eq!(rx.await.unwrap(), 3 << 20);
}
