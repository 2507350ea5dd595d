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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Timeouts {
    pub connect: f64,
    pub read: f64,
    pub client_idle: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: 5.0,
            read: 60.0,
            client_idle: 60.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamTimeouts {
    pub connect: f64,
    pub read: f64,
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
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
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
