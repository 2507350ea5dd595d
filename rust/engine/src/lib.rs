//! ferrogate's data plane: an HTTP/1.1 and HTTP/2 reverse proxy on tokio + hyper.
//!
//! A request flows through [`proxy::handle`] in the phases named in [`phase`]; the
//! control plane (Python) hands each worker a normalized [`config::GatewayConfig`].

pub mod access_log;
pub mod ai_fast;
pub mod analytics;
pub mod balancer;
pub mod body;
pub mod cache;
pub mod cache_redis;
pub mod cluster_limits;
pub mod compress;
pub mod concurrency;
pub mod config;
pub mod conn_limit;
pub mod counters;
pub mod deflate;
pub mod dispatch;
pub mod echo;
pub mod engine;
pub mod error;
pub mod filters;
pub mod forwarding;
pub mod framing;
pub mod grpc;
pub mod grpc_web;
pub mod h1client;
pub mod h1server;
pub mod h2client;
pub mod h2server;
pub mod head_limits;
pub mod headers;
pub mod health;
pub mod ip_restriction;
pub mod lifecycle;
pub mod limiter;
pub mod metrics;
pub mod mirror;
pub mod observe;
pub mod otlp;
pub mod path_normalize;
pub mod phase;
pub mod plugins;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod quota;
pub mod ratelimit;
pub mod redact;
pub mod retry;
pub mod router;
pub mod server;
pub mod shm;
pub mod split;
pub mod sse;
pub mod tls;
pub mod trace;
pub mod train;
pub mod upstream;
pub mod upstream_tls;
pub mod waf;
pub mod websocket;

pub use engine::Engine;
