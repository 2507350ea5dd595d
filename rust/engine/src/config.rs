//! The normalized config the data plane reads. The Python control plane validates the
//! user's YAML and writes this JSON; these structs are the type boundary between the two.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayConfig {
    #[serde(default)]
    pub listen: Vec<String>,
    /// Seconds that SIGTERM waits for in-flight requests.
    #[serde(default = "default_grace")]
    pub grace_period: f64,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Limits on every route (one bucket per key across all routes).
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Peers whose X-Forwarded-For is believed when finding the client's address (CIDRs).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub rate_limiting: RateLimiting,
    /// Plans by name: the limits and quotas of the consumers on them.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    #[serde(default)]
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// Access log, metrics, tracing and analytics (`observe.rs`); all off by default.
    #[serde(default)]
    pub observe: ObserveConfig,
    /// HTTPS listeners and their certificates (`tls.rs`); none by default.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Client addresses let in or kept out on every route (`ip_restriction.rs`).
    #[serde(default)]
    pub ip_restriction: Option<IpRestrictionConfig>,
    /// The web application firewall (`waf.rs`); off by default.
    #[serde(default)]
    pub waf: Option<crate::waf::WafConfig>,
    /// The response cache's store (`cache.rs`).
    #[serde(default)]
    pub cache: crate::cache::CacheStoreConfig,
}

/// `ip_restriction:` CIDRs; with `allow`, only those; `deny` always wins.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct IpRestrictionConfig {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `tls:`: the listeners that terminate TLS, with absolute file paths.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TlsConfig {
    #[serde(default)]
    pub listen: Vec<String>,
    /// The first is served when the client names no host, or one no certificate covers.
    pub certificates: Vec<CertificateFiles>,
    /// "1.2" or "1.3".
    #[serde(default = "default_tls_version")]
    pub min_version: String,
    #[serde(default)]
    pub client_auth: ClientAuthConfig,
    /// The `certificates:` entities (inline PEM), picked by SNI before `certificates`.
    #[serde(default)]
    pub sni: Vec<SniCertificate>,
}

/// A certificate entity: served to clients that ask for one of `snis` (`*.` wildcards).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SniCertificate {
    pub name: String,
    /// PEM: the certificate, then its intermediates.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    pub snis: Vec<String>,
}

fn default_tls_version() -> String {
    "1.2".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CertificateFiles {
    /// PEM: the certificate, then its intermediates.
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    #[default]
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ClientAuthConfig {
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// PEM bundle of the CAs client certificates must chain to.
    #[serde(default)]
    pub ca: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ObserveConfig {
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    #[serde(default)]
    pub analytics: Option<AnalyticsConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AccessLogConfig {
    /// "stdout" or an absolute file path.
    pub path: String,
    /// In the order they are written.
    pub fields: Vec<String>,
    pub sample: f64,
    pub capture: CaptureConfig,
}

/// Header names to capture: none, all (`true`) or a list (lower case).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum HeaderSelection {
    All(bool),
    Names(Vec<String>),
}

impl Default for HeaderSelection {
    fn default() -> Self {
        HeaderSelection::All(false)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CaptureConfig {
    pub request_headers: HeaderSelection,
    pub response_headers: HeaderSelection,
    pub request_body: u64,
    pub response_body: u64,
    pub redact: Vec<String>,
    pub redact_body_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetricsConfig {
    pub consumer_labels: bool,
    pub max_consumers: usize,
    /// Seconds, ascending.
    pub latency_buckets: Vec<f64>,
    pub publish_interval: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TracingConfig {
    pub endpoint: String,
    pub sample: f64,
    pub service_name: String,
    pub batch_size: usize,
    pub flush_interval: f64,
    pub queue_size: usize,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AnalyticsConfig {
    /// The master's SQLite file; workers only hand it their buckets.
    pub path: String,
    /// Seconds per bucket.
    pub resolution: f64,
    pub retention: f64,
    pub max_consumers: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PlanConfig {
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    #[serde(default)]
    pub quotas: Vec<QuotaConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaConfig {
    pub id: String,
    pub limit: u64,
    pub period: QuotaPeriod,
    #[serde(default)]
    pub cluster: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConsumerConfig {
    #[serde(default)]
    pub plan: Option<String>,
    /// Only the fields the core matches on are read (`mtls`); the rest is the plugins'.
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CredentialConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub id: String,
    /// `mtls`: the certificate's subject (RFC 4514) and/or one of its SANs.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub san: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RateLimiting {
    /// Where cluster-wide limits count; none: every limit is the node's.
    #[serde(default)]
    pub redis: Option<crate::cluster_limits::RedisConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    Ip,
    Consumer,
    Credential,
    Route,
    Header,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LimitKey {
    pub source: KeySource,
    #[serde(default)]
    pub name: Option<String>,
}

/// `limit` requests per `per` seconds for each key, `burst` at once.
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitConfig {
    /// Identifies the limit's buckets; unchanged across a reload, they keep counting.
    pub id: String,
    pub limit: u64,
    pub per: f64,
    pub burst: u64,
    pub key: Vec<LimitKey>,
    /// Counted across nodes through `rate_limiting.redis` (fixed windows of `per`).
    #[serde(default)]
    pub cluster: bool,
}

fn default_grace() -> f64 {
    30.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Request line plus headers; above it the client gets 431.
    pub max_header_bytes: usize,
    /// Request body; above it the client gets 413. 0 means unlimited.
    pub max_body_bytes: u64,
    /// Header fields of a request; above it the client gets 431. 0 means unlimited.
    pub max_headers: usize,
    /// The request target (path and query); above it the client gets 414. 0 means unlimited.
    pub max_url_bytes: usize,
    /// Open connections from one client address per worker; 0 means unlimited.
    pub max_connections_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 0,
            max_headers: 100,
            max_url_bytes: 8 * 1024,
            max_connections_per_ip: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Timeouts {
    pub connect: f64,
    pub read: f64,
    /// How long one write to an upstream may wait for it to accept bytes; 0 = no limit.
    pub write: f64,
    /// The whole exchange up to the response head, retries included; 0 = no limit.
    pub total: f64,
    pub client_idle: f64,
    /// From a request head's first byte (a connection's opening) to its end; 0 = no limit.
    pub client_header: f64,
    /// The longest wait for more of a request body; 0 = no limit.
    pub client_body: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: 5.0,
            read: 60.0,
            write: 60.0,
            total: 0.0,
            client_idle: 60.0,
            client_header: 10.0,
            client_body: 60.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamTimeouts {
    pub connect: f64,
    pub read: f64,
    #[serde(default = "default_write_timeout")]
    pub write: f64,
    #[serde(default)]
    pub total: f64,
}

fn default_write_timeout() -> f64 {
    60.0
}

/// A route's own timeouts; an absent one is the upstream's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RouteTimeouts {
    pub connect: Option<f64>,
    pub read: Option<f64>,
    pub write: Option<f64>,
    pub total: Option<f64>,
}

/// Status codes as inclusive ranges: `[[500, 500], [502, 504]]`.
pub type StatusRanges = Vec<(u16, u16)>;

/// Health of an upstream's targets; see `health.rs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HealthConfig {
    pub active: Option<ActiveHealthConfig>,
    pub passive: Option<PassiveHealthConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            active: None,
            passive: Some(PassiveHealthConfig::default()),
        }
    }
}

/// An HTTP probe of every target (run once per node, see `probe.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActiveHealthConfig {
    pub path: String,
    /// The probe's Host header; default: the target's host:port.
    #[serde(default)]
    pub host: Option<String>,
    pub interval: f64,
    pub timeout: f64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub statuses: StatusRanges,
}

/// Consecutive failures of real traffic take a target out for `down_for` seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PassiveHealthConfig {
    pub failures: u32,
    pub down_for: f64,
    /// Response statuses that count as failures (connect errors and timeouts always do).
    pub statuses: StatusRanges,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            failures: 3,
            down_for: 10.0,
            statuses: Vec::new(),
        }
    }
}

/// A circuit breaker per target, opened by the failure ratio over a rolling window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BreakerConfig {
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window: f64,
    pub open_for: f64,
    pub half_open_requests: u32,
    pub statuses: StatusRanges,
}

/// When and how a failed attempt is tried again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RetryConfig {
    /// Tries after the first one; 0 turns retries off.
    pub count: u32,
    /// Failures retried: "connect", "reset", "timeout".
    pub on: Vec<String>,
    pub statuses: StatusRanges,
    /// Methods retried once the request may have reached the upstream.
    pub methods: Vec<String>,
    pub backoff: f64,
    pub backoff_max: f64,
    /// Request bodies up to this many bytes are kept so that a retry can send them again.
    pub body_buffer: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            count: 1,
            on: vec!["connect".into(), "reset".into()],
            statuses: Vec::new(),
            methods: ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]
                .map(String::from)
                .to_vec(),
            backoff: 0.025,
            backoff_max: 0.25,
            body_buffer: 64 * 1024,
        }
    }
}

/// Retries may add at most `ratio` to the requests of the last `window` seconds, plus
/// `min_per_second`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RetryBudgetConfig {
    pub ratio: f64,
    pub window: f64,
    pub min_per_second: f64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            window: 10.0,
            min_per_second: 3.0,
        }
    }
}

/// What a request gets when no target of its upstream is available: another upstream, or
/// a static response.
#[derive(Debug, Clone, Deserialize)]
pub struct FallbackConfig {
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
}

fn default_fallback_status() -> u16 {
    503
}

fn default_retry_budget() -> Option<RetryBudgetConfig> {
    Some(RetryBudgetConfig::default())
}

#[derive(Debug, Clone, Deserialize)]
pub struct TargetConfig {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashSource {
    Ip,
    Header,
    Cookie,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HashOn {
    pub source: HashSource,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamConfig {
    pub targets: Vec<TargetConfig>,
    #[serde(default = "default_balance")]
    pub balance: Balance,
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: f64,
    #[serde(default)]
    pub timeouts: Option<UpstreamTimeouts>,
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default = "default_retry_budget")]
    pub retry_budget: Option<RetryBudgetConfig>,
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// Limit concurrent requests by latency (AIMD), shedding the rest with 503.
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConfig>,
    /// TLS towards the targets (`upstream_tls.rs`); None: plain HTTP.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// The targets speak HTTP/2 (`h2client.rs`): h2c, or h2 by ALPN with `tls`.
    #[serde(default)]
    pub http2: bool,
}

/// `upstreams.NAME.tls`: how the gateway's connections to the targets are secured; file
/// paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpstreamTlsConfig {
    /// Check the target's certificate chain, validity period and name.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// PEM bundle of the CAs the targets' certificates must chain to; None: the system's.
    #[serde(default)]
    pub ca: Option<String>,
    /// The name sent as SNI and checked against the certificate; None: the target's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// The gateway's own certificate (PEM chain) and key, for upstreams that ask for one.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
    /// "1.2" or "1.3".
    #[serde(default = "default_tls_version")]
    pub min_version: String,
}

fn default_balance() -> Balance {
    Balance::RoundRobin
}
fn default_keepalive() -> usize {
    1024
}
fn default_keepalive_timeout() -> f64 {
    60.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct Predicate {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    #[serde(default)]
    pub name: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<Predicate>,
    #[serde(default)]
    pub query: Vec<Predicate>,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub rewrite: Option<String>,
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    #[serde(default)]
    pub priority: i64,
    /// The route's plugin chain, when it has plugins.
    #[serde(default)]
    pub plugins: Option<crate::plugins::ChainSpec>,
    /// Overrides of the upstream's timeouts and retry policy for this route.
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Header/cookie values that send a request to another upstream (checked first).
    #[serde(default)]
    pub versions: Vec<VersionRuleConfig>,
    /// A weighted split between upstreams (canary).
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// Shadow traffic: a copy of the requests to another upstream, answers dropped.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Client addresses let in or kept out on this route, besides the global list.
    #[serde(default)]
    pub ip_restriction: Option<IpRestrictionConfig>,
    /// "required": only connections with a verified client certificate get through.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// The WAF here: off, or overrides of the top-level `waf` (None: those settings).
    #[serde(default)]
    pub waf: Option<crate::waf::RouteWafConfig>,
    /// The route's response cache (`cache.rs`); None: nothing is cached.
    #[serde(default)]
    pub cache: Option<crate::cache::RouteCacheConfig>,
    /// The route's effective response compression settings; None: responses go as they are.
    #[serde(default)]
    pub compression: Option<crate::compress::CompressionConfig>,
    /// WebSocket handshakes are passed on (see `websocket.rs`); otherwise Upgrade is
    /// removed like any hop-by-hop header.
    #[serde(default)]
    pub websocket: bool,
    /// Seconds a WebSocket session may stay silent both ways; 0: no limit.
    #[serde(default = "default_websocket_idle")]
    pub websocket_idle: f64,
    /// Seconds an event stream (`text/event-stream`) may sit idle at an event boundary
    /// before the gateway sends a `: ping` comment (`sse.rs`); 0: never.
    #[serde(default)]
    pub sse_heartbeat: f64,
    /// The AI gateway's pass-through table (`ai_fast.rs`), on the route the control plane
    /// compiles from `ai:` when a pass-through deployment serves it.
    #[serde(default)]
    pub ai_fast: Option<crate::ai_fast::AiFastConfig>,
    /// Static headers on every response of the route (`lifecycle.rs`).
    #[serde(default)]
    pub response_headers: Vec<crate::lifecycle::ResponseHeaderConfig>,
    /// The route answers with this error (a retired or unknown API version, `lifecycle.rs`).
    #[serde(default)]
    pub refuse: Option<crate::lifecycle::RefuseConfig>,
}

fn default_websocket_idle() -> f64 {
    60.0
}

/// `upstreams.*.adaptive_concurrency`: AIMD on latency (see `concurrency.rs`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdaptiveConfig {
    pub min: u32,
    pub max: u32,
    pub initial: u32,
    /// Latency above `tolerance` x the recent best counts as a slowdown.
    pub tolerance: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MirrorConfig {
    pub upstream: String,
    /// Share of the requests mirrored, 0-100.
    pub percent: f64,
    /// Larger (or chunked) request bodies are not mirrored.
    pub max_body: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VersionRuleConfig {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
    pub value: String,
    pub upstream: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SplitTarget {
    /// None: the route's own upstream.
    #[serde(default)]
    pub upstream: Option<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SplitConfig {
    pub targets: Vec<SplitTarget>,
    /// Sticky: the same client (address, header or cookie) keeps its side of the split.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
}

fn default_true() -> bool {
    true
}

impl GatewayConfig {
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid normalized config: {e}"))
    }
}

/// One problem found while compiling a config, located by its path in the config tree
/// (`routes[3].paths[1]`) so the control plane can point at the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
