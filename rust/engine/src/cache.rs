//! The response cache (RFC 9111), per route: in the worker's memory, or in Redis
//! (`cache_redis.rs`) shared by every worker and node.
//!
//! It sits after the access phase (authentication, limits and request plugins run on hits
//! too) and just before the upstream. A lookup answers from a fresh entry, serves a stale one
//! while it is refreshed in the background (`stale-while-revalidate`), or forwards: plainly on
//! a miss, conditionally (If-None-Match / If-Modified-Since) when a stale entry has
//! validators. Concurrent misses of one key wait for the first one's answer (coalescing), so a
//! burst reaches the upstream once. Every response of a cached route says what happened in a
//! `Cache-Status` header (RFC 9211).
//!
//! Storage: one LRU store per worker under a byte budget (`cache.memory`), kept across
//! reloads; workers do not share it. With `cache.redis` the entries live in Redis instead.
//! A purge written by the master (`<runtime>.cache-purge`, one JSON line per purge) is read
//! by every worker's watcher within `PURGE_POLL` and applied to its stores.
//!
//! Only bodies with a Content-Length up to the route's `max_body` are stored: they are read
//! whole before the first client gets them.

use crate::body::{collect_capped, RequestBody, ResponseBody};
use crate::compress::{Encoding, Policy as Compression};
use crate::config::ConfigProblem;
use crate::engine::Engine;
use crate::error::{ErrorKind, GatewayError};
use crate::h1client::UpstreamBody;
use crate::headers::{strip_hop_by_hop, X_REQUEST_ID};
use crate::phase::RequestCtx;
use crate::proxy::{upstream_path_and_query, ProxyBody};
use crate::upstream::InflightGuard;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{request, response, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How often a worker looks for new purges.
const PURGE_POLL: Duration = Duration::from_millis(100);

// --- config -------------------------------------------------------------------------------

/// `routes[].cache`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RouteCacheConfig {
    pub methods: Vec<String>,
    pub key: CacheKeyConfig,
    /// Larger bodies (or ones without a Content-Length) are passed on, not stored.
    pub max_body: u64,
    /// Seconds of freshness for responses that give none (None: such responses are stored
    /// only when they have a validator, and then always revalidated).
    pub default_ttl: Option<f64>,
    /// Store responses that set cookies.
    pub store_set_cookie: bool,
    /// Seconds a request waits for another one's answer to the same key.
    pub coalesce_timeout: f64,
}

impl Default for RouteCacheConfig {
    fn default() -> Self {
        RouteCacheConfig {
            methods: vec!["GET".into(), "HEAD".into()],
            key: CacheKeyConfig::default(),
            max_body: 1 << 20,
            default_ttl: None,
            store_set_cookie: false,
            coalesce_timeout: 5.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CacheKeyConfig {
    pub query: QueryKey,
    /// Request headers whose values are part of the key (lower case).
    pub headers: Vec<String>,
    /// The consumer an authentication plugin identified is part of the key.
    pub consumer: bool,
}

impl Default for CacheKeyConfig {
    fn default() -> Self {
        CacheKeyConfig {
            query: QueryKey::All(true),
            headers: Vec::new(),
            consumer: true,
        }
    }
}

/// The whole query (`true`), none of it (`false`), or these parameters in this order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum QueryKey {
    All(bool),
    Names(Vec<String>),
}

/// Top-level `cache`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CacheStoreConfig {
    /// Bytes of responses (bodies, headers, keys) a worker keeps.
    pub memory: u64,
    /// Keep entries in Redis instead, shared by every worker and node.
    #[serde(default)]
    pub redis: Option<crate::cache_redis::CacheRedisConfig>,
}

impl Default for CacheStoreConfig {
    fn default() -> Self {
        CacheStoreConfig {
            memory: 64 << 20,
            redis: None,
        }
    }
}

/// Where a worker's entries live: its memory, or Redis. The memory store also holds the
/// keys being fetched (coalescing is per worker either way).
#[derive(Clone)]
pub struct Stores {
    pub memory: Arc<MemoryStore>,
    pub redis: Option<Arc<crate::cache_redis::RedisStore>>,
}

impl Stores {
    /// The stores of a new engine: the previous engine's, with its new settings.
    pub fn build(config: &CacheStoreConfig, previous: Option<&Stores>) -> Result<Stores, String> {
        let memory = match previous {
            Some(p) => {
                p.memory.set_budget(config.memory);
                p.memory.clone()
            }
            None => Arc::new(MemoryStore::new(config.memory)),
        };
        let redis = match &config.redis {
            None => None,
            Some(rc) => match previous.and_then(|p| p.redis.clone()).filter(|r| &r.config == rc) {
                Some(same) => Some(same),
                None => Some(Arc::new(crate::cache_redis::RedisStore::new(rc)?)),
            },
        };
        Ok(Stores { memory, redis })
    }

    async fn get(&self, key: &Arc<str>, req: &HeaderMap) -> Option<Arc<Entry>> {
        match &self.redis {
            None => self.memory.get(key, req),
            Some(r) => {
                let bytes = r.get(key).await?;
                Entry::decode(&bytes).filter(|e| e.matches(req)).map(Arc::new)
            }
        }
    }

    async fn put(&self, key: &Arc<str>, url: &str, entry: impl Into<Arc<Entry>>) {
        let entry = entry.into();
        match &self.redis {
            None => self.memory.put(key, url, entry),
            Some(r) => r.put(key, &entry.encode(), entry.keep_for()).await,
        }
    }

    /// Drop entries by purge name (see [`MemoryStore::purge`]).
    pub async fn purge(&self, exact: Option<&str>, prefix: Option<&str>) {
        self.memory.purge(exact, prefix);
        if let Some(r) = &self.redis {
            r.purge(exact, prefix).await;
        }
    }
}

/// A route's compiled cache settings.
#[derive(Debug)]
pub struct RouteCache {
    methods: Vec<Method>,
    query: QueryKey,
    headers: Vec<HeaderName>,
    consumer: bool,
    max_body: u64,
    default_ttl: Option<Duration>,
    store_set_cookie: bool,
    coalesce_timeout: Duration,
}

impl RouteCache {
    pub fn compile(c: &RouteCacheConfig, at: &str) -> Result<RouteCache, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut methods = Vec::new();
        for (j, m) in c.methods.iter().enumerate() {
            match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) if m == Method::GET || m == Method::HEAD => methods.push(m),
                _ => problems.push(ConfigProblem::new(
                    format!("{at}.methods[{j}]"),
                    "only GET and HEAD responses are cached",
                )),
            }
        }
        let mut headers = Vec::new();
        for (j, h) in c.key.headers.iter().enumerate() {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => headers.push(h),
                Err(_) => problems.push(ConfigProblem::new(
                    format!("{at}.key.headers[{j}]"),
                    format!("'{h}' is not a valid header name"),
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(RouteCache {
            methods,
            query: c.key.query.clone(),
            headers,
            consumer: c.key.consumer,
            max_body: c.max_body,
            default_ttl: c.default_ttl.map(Duration::from_secs_f64),
            store_set_cookie: c.store_set_cookie,
            coalesce_timeout: Duration::from_secs_f64(c.coalesce_timeout.max(0.0)),
        })
    }

    /// The key of a request, and the part of it a purge names (path and keyed query).
    fn key(&self, route: &str, parts: &request::Parts, consumer: Option<&str>) -> (Arc<str>, String) {
        let mut url = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("");
        match &self.query {
            QueryKey::All(true) if !query.is_empty() => {
                url.push('?');
                url.push_str(query);
            }
            QueryKey::All(_) => {}
            QueryKey::Names(names) => {
                let mut first = true;
                for name in names {
                    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                        if k == name.as_str() {
                            url.push(if first { '?' } else { '&' });
                            first = false;
                            url.push_str(
                                &form_urlencoded::Serializer::new(String::new())
                                    .append_pair(&k, &v)
                                    .finish(),
                            );
                        }
                    }
                }
            }
        }
        let mut key = String::with_capacity(url.len() + route.len() + 16);
        key.push_str(&url);
        key.push('\n');
        key.push_str(parts.method.as_str());
        key.push('\n');
        key.push_str(route);
        for h in &self.headers {
            key.push('\n');
            key.push_str(h.as_str());
            key.push(':');
            for v in parts.headers.get_all(h) {
                key.push_str(&String::from_utf8_lossy(v.as_bytes()));
                key.push(',');
            }
        }
        if self.consumer {
            key.push_str("\nconsumer:");
            key.push_str(consumer.unwrap_or(""));
        }
        (key.into(), url)
    }
}

// --- Cache-Control -----------------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Directives {
    max_age: Option<u64>,
    s_maxage: Option<u64>,
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    must_revalidate: bool,
    swr: Option<u64>,
    sie: Option<u64>,
}

fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        for part in value.to_str().unwrap_or("").split(',') {
            let (name, arg) = match part.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (part.trim(), None),
            };
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "max-age" => d.max_age = secs().or(Some(0)),
                "s-maxage" => d.s_maxage = secs().or(Some(0)),
                "no-store" => d.no_store = true,
                // The qualified forms (`no-cache="Set-Cookie"`) are taken whole: safer.
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "stale-while-revalidate" => d.swr = secs(),
                "stale-if-error" => d.sie = secs(),
                _ => {}
            }
        }
    }
    if !headers.contains_key(header::CACHE_CONTROL)
        && headers
            .get_all(header::PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
    {
        d.no_cache = true;
    }
    d
}

/// Status codes a cache may store without explicit freshness (RFC 9110 §15.1), minus 206
/// (ranges are not cached).
fn cacheable_by_default(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// How a response may be stored: None when it may not.
#[derive(Debug, PartialEq)]
struct Policy {
    lifetime: Duration,
    swr: Duration,
    sie: Duration,
    no_cache: bool,
    must_revalidate: bool,
    vary: Vec<HeaderName>,
}

fn policy(rc: &RouteCache, req: &HeaderMap, status: StatusCode, resp: &HeaderMap) -> Option<Policy> {
    let d = directives(resp);
    if d.no_store || d.private || status == StatusCode::PARTIAL_CONTENT || status.as_u16() < 200 {
        return None;
    }
    if !rc.store_set_cookie && resp.contains_key(header::SET_COOKIE) {
        return None;
    }
    // A shared cache keeps answers to authorized requests only when told it may (§3.5).
    if req.contains_key(header::AUTHORIZATION) && !(d.public || d.s_maxage.is_some() || d.must_revalidate) {
        return None;
    }
    let mut vary = Vec::new();
    for v in resp.get_all(header::VARY) {
        for name in v.to_str().ok()?.split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                vary.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
            }
        }
    }
    let explicit = d.s_maxage.or(d.max_age).map(Duration::from_secs).or_else(|| {
        resp.get(header::EXPIRES)?;
        // An invalid Expires means already expired.
        let expires = http_date(resp, &header::EXPIRES).unwrap_or(SystemTime::UNIX_EPOCH);
        let date = http_date(resp, &header::DATE).unwrap_or_else(SystemTime::now);
        Some(expires.duration_since(date).unwrap_or_default())
    });
    if explicit.is_none() && !d.public && !cacheable_by_default(status) {
        return None;
    }
    let validators = resp.contains_key(header::ETAG) || resp.contains_key(header::LAST_MODIFIED);
    let lifetime = match explicit.or(rc.default_ttl) {
        Some(l) => l,
        None if validators => Duration::ZERO,
        None => return None,
    };
    Some(Policy {
        lifetime,
        swr: Duration::from_secs(d.swr.unwrap_or(0)),
        sie: Duration::from_secs(d.sie.unwrap_or(0)),
        no_cache: d.no_cache,
        must_revalidate: d.must_revalidate,
        vary,
    })
}

// --- entries and the store ---------------------------------------------------------------

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// When the response (or its last revalidation) arrived, and the Age it had then.
    received: Instant,
    age_then: Duration,
    lifetime: Duration,
    swr: Duration,
    sie: Duration,
    no_cache: bool,
    must_revalidate: bool,
    /// The request's values of the headers the response varies on.
    vary: Vec<(HeaderName, Vec<u8>)>,
    size: usize,
    /// The body compressed, once per coding and level, by the first hit that asked for it
    /// (`encoded`): hits then send these bytes instead of compressing the body again.
    /// Not counted in the store's byte budget; each is smaller than the body.
    encoded: Mutex<Vec<((Encoding, i32), Bytes)>>,
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

impl Entry {
    fn new(p: Policy, status: StatusCode, mut headers: HeaderMap, body: Bytes, req: &HeaderMap) -> Entry {
        headers.remove(&X_REQUEST_ID);
        headers.remove(&CACHE_STATUS);
        let age_then = headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let vary: Vec<_> = p.vary.into_iter().map(|n| (n.clone(), joined(req, &n))).collect();
        let size = entry_size(&headers, &vary, &body);
        Entry {
            status,
            headers,
            body,
            received: Instant::now(),
            age_then,
            lifetime: p.lifetime,
            swr: p.swr,
            sie: p.sie,
            no_cache: p.no_cache,
            must_revalidate: p.must_revalidate,
            vary,
            size,
            encoded: Mutex::new(Vec::new()),
        }
    }

    /// `body` compressed as `policy` says, made once per entry, coding and level; None when
    /// `body` is not this entry's (a plugin replaced it on the way out).
    pub fn encoded(&self, body: &Bytes, encoding: Encoding, policy: &Compression) -> Option<Bytes> {
        if body.as_ptr() != self.body.as_ptr() || body.len() != self.body.len() {
            return None;
        }
        let variant = policy.variant(encoding);
        let mut memo = self.encoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, bytes)) = memo.iter().find(|(v, _)| *v == variant) {
            return Some(bytes.clone());
        }
        let bytes = policy.encode_whole(encoding, body).ok()?;
        memo.push((variant, bytes.clone()));
        Some(bytes)
    }

    fn age(&self, now: Instant) -> Duration {
        self.age_then + now.saturating_duration_since(self.received)
    }

    fn fresh(&self, now: Instant) -> bool {
        !self.no_cache && self.age(now) < self.lifetime
    }

    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary.iter().all(|(n, v)| joined(req, n) == *v)
    }

    fn has_validators(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// The entry after a 304: its headers updated by the 304's (RFC 9111 §4.3.4).
    fn refreshed(&self, rc: &RouteCache, not_modified: &HeaderMap, req: &HeaderMap) -> Option<Entry> {
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            if name == header::CONTENT_LENGTH || name == X_REQUEST_ID {
                continue;
            }
            headers.remove(name);
            for v in not_modified.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let p = policy(rc, req, self.status, &headers)?;
        Some(Entry::new(p, self.status, headers, self.body.clone(), req))
    }
}

/// The binary form of an entry in a shared store; a version byte first.
const ENCODING: u8 = 1;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

impl Entry {
    /// How long a shared store keeps the entry: while it may be served, and an hour more
    /// when it can be revalidated.
    fn keep_for(&self) -> Duration {
        let servable = self.lifetime + self.swr.max(self.sie);
        let revalidate = if self.has_validators() {
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        };
        (servable + revalidate)
            .saturating_sub(self.age(Instant::now()))
            .max(Duration::from_secs(1))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size);
        out.push(ENCODING);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        // The age now: another process (or node) has its own clock for `received`.
        for d in [self.age(Instant::now()), self.lifetime, self.swr, self.sie] {
            out.extend_from_slice(&(d.as_millis() as u64).to_be_bytes());
        }
        out.push(u8::from(self.no_cache) | (u8::from(self.must_revalidate) << 1));
        out.extend_from_slice(&(self.vary.len() as u64).to_be_bytes());
        for (n, v) in &self.vary {
            put_bytes(&mut out, n.as_str().as_bytes());
            put_bytes(&mut out, v);
        }
        out.extend_from_slice(&(self.headers.len() as u64).to_be_bytes());
        for (n, v) in &self.headers {
            put_bytes(&mut out, n.as_str().as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        put_bytes(&mut out, &self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut r = Reader(bytes);
        if r.take(1)? != [ENCODING] {
            return None;
        }
        let status = StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
        let age_then = Duration::from_millis(r.u64()?);
        let lifetime = Duration::from_millis(r.u64()?);
        let swr = Duration::from_millis(r.u64()?);
        let sie = Duration::from_millis(r.u64()?);
        let flags = r.take(1)?[0];
        let mut vary = Vec::new();
        for _ in 0..r.u64()? {
            let name = HeaderName::from_bytes(r.bytes()?).ok()?;
            vary.push((name, r.bytes()?.to_vec()));
        }
        let mut headers = HeaderMap::new();
        for _ in 0..r.u64()? {
            let name = HeaderName::from_bytes(r.bytes()?).ok()?;
            headers.append(name, HeaderValue::from_bytes(r.bytes()?).ok()?);
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        let size = entry_size(&headers, &vary, &body);
        Some(Entry {
            status,
            headers,
            body,
            received: Instant::now(),
            age_then,
            lifetime,
            swr,
            sie,
            no_cache: flags & 1 != 0,
            must_revalidate: flags & 2 != 0,
            vary,
            size,
            encoded: Mutex::new(Vec::new()),
        })
    }
}

fn entry_size(headers: &HeaderMap, vary: &[(HeaderName, Vec<u8>)], body: &Bytes) -> usize {
    body.len()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
        + vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>()
        + 256
}

struct Slot {
    tick: u64,
    url: Box<str>,
    variants: Vec<Arc<Entry>>,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Arc<str>, Slot>,
    lru: BTreeMap<u64, Arc<str>>,
    tick: u64,
    used: usize,
    /// Keys being fetched, with the channel their waiters watch (closed when done).
    inflight: HashMap<Arc<str>, (u64, watch::Receiver<()>)>,
}

impl Inner {
    fn touch(&mut self, key: &Arc<str>) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(key) {
            self.lru.remove(&slot.tick);
            slot.tick = tick;
            self.lru.insert(tick, key.clone());
        }
    }

    fn remove(&mut self, key: &str) -> usize {
        match self.slots.remove(key) {
            Some(slot) => {
                self.lru.remove(&slot.tick);
                self.used -= slot.variants.iter().map(|e| e.size).sum::<usize>();
                slot.variants.len()
            }
            None => 0,
        }
    }

    fn evict_to(&mut self, budget: usize) {
        while self.used > budget {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&key) {
                self.used -= slot.variants.iter().map(|e| e.size).sum::<usize>();
            }
        }
    }
}

/// A worker's responses, least recently used evicted first when over the budget.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    budget: AtomicUsize,
    leaders: AtomicU64,
}

/// The request that fetches a key for the others: they wake when it is dropped.
pub struct Leader {
    store: Arc<MemoryStore>,
    key: Arc<str>,
    id: u64,
    _done: watch::Sender<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut inner = self.store.lock();
        if inner
            .inflight
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            inner.inflight.remove(&self.key);
        }
    }
}

enum Turn {
    Lead(Leader),
    Wait(watch::Receiver<()>),
}

impl MemoryStore {
    pub fn new(budget: u64) -> MemoryStore {
        MemoryStore {
            inner: Mutex::default(),
            budget: AtomicUsize::new(budget as usize),
            leaders: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_budget(&self, budget: u64) {
        self.budget.store(budget as usize, Ordering::Relaxed);
        self.lock().evict_to(budget as usize);
    }

    /// Bytes held, and entries (variants counted one by one).
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        let entries = inner.slots.values().map(|s| s.variants.len()).sum();
        (inner.used, entries)
    }

    fn get(&self, key: &Arc<str>, req: &HeaderMap) -> Option<Arc<Entry>> {
        let mut inner = self.lock();
        let found = inner
            .slots
            .get(key)?
            .variants
            .iter()
            .find(|e| e.matches(req))?
            .clone();
        inner.touch(key);
        Some(found)
    }

    fn put(&self, key: &Arc<str>, url: &str, entry: impl Into<Arc<Entry>>) {
        let entry = entry.into();
        let budget = self.budget.load(Ordering::Relaxed);
        if entry.size > budget {
            return;
        }
        let mut inner = self.lock();
        let slot = inner.slots.entry(key.clone()).or_insert_with(|| Slot {
            tick: 0,
            url: url.into(),
            variants: Vec::new(),
        });
        let mut freed = 0;
        slot.variants.retain(|e| {
            let same = e.vary == entry.vary;
            if same {
                freed += e.size;
            }
            !same
        });
        slot.variants.push(entry.clone());
        inner.used = inner.used - freed + entry.size;
        inner.touch(key);
        inner.evict_to(budget);
    }

    /// Drop the entries whose purge name (path and keyed query) is `exact`, or starts with
    /// `prefix`; how many were dropped.
    pub fn purge(&self, exact: Option<&str>, prefix: Option<&str>) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<Arc<str>> = inner
            .slots
            .iter()
            .filter(|(_, s)| exact == Some(&*s.url) || prefix.is_some_and(|p| s.url.starts_with(p)))
            .map(|(k, _)| k.clone())
            .collect();
        doomed.iter().map(|k| inner.remove(k)).sum()
    }

    fn turn(self: &Arc<Self>, key: &Arc<str>) -> Turn {
        let mut inner = self.lock();
        if let Some((_, rx)) = inner.inflight.get(key) {
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        let id = self.leaders.fetch_add(1, Ordering::Relaxed);
        inner.inflight.insert(key.clone(), (id, rx));
        Turn::Lead(Leader {
            store: self.clone(),
            key: key.clone(),
            id,
            _done: tx,
        })
    }

    /// A leader only if nobody fetches the key now (a background refresh).
    fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<Leader> {
        match self.turn(key) {
            Turn::Lead(l) => Some(l),
            Turn::Wait(_) => None,
        }
    }
}

// --- the request path --------------------------------------------------------------------

/// What the upstream is asked for, for a background refresh.
pub struct Origin<'a> {
    pub engine: &'a Arc<Engine>,
    pub upstream: usize,
    pub path: Option<String>,
    pub query: Option<&'a str>,
    pub preserve_host: bool,
    /// For a refresh: it goes upstream with the fields the request would have taken.
    pub forwarding: crate::forwarding::Forwarding,
}

pub enum Before {
    /// Answered from the cache.
    Respond(Response<ProxyBody>),
    /// Go to the upstream; [`Fill::finish`] takes its answer.
    Forward(Fill),
}

enum Mode {
    /// Not cached (method, request `no-store`, ranges); `invalidate` after unsafe methods.
    Bypass {
        invalidate: bool,
    },
    Miss,
    /// A stored response that could not be used as it is; `revalidating`: the request was
    /// made conditional on it.
    Stale {
        entry: Arc<Entry>,
        revalidating: bool,
    },
}

/// A forwarded request's part in the cache.
pub struct Fill {
    store: Stores,
    rc: Arc<RouteCache>,
    key: Arc<str>,
    url: String,
    mode: Mode,
    /// `fwd` of Cache-Status: miss, stale, request, bypass.
    fwd: &'static str,
    /// The request's headers before the cache changed them (Vary, the client's own
    /// conditionals).
    req: HeaderMap,
    head: bool,
    _leader: Option<Leader>,
}

const CONDITIONALS: [HeaderName; 4] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// The cache's turn for a request whose head is ready for the upstream.
pub async fn before(
    store: &Stores,
    rc: &Arc<RouteCache>,
    ctx: &mut RequestCtx,
    parts: &mut request::Parts,
    origin: Origin<'_>,
) -> Before {
    let route = ctx.route.as_ref().map_or("", |r| r.name.as_str()).to_string();
    let (key, url) = rc.key(&route, parts, ctx.consumer.as_deref());
    let head = parts.method == Method::HEAD;
    let fill = |mode, fwd, leader, req| Fill {
        store: store.clone(),
        rc: rc.clone(),
        key: key.clone(),
        url: url.clone(),
        mode,
        fwd,
        req,
        head,
        _leader: leader,
    };
    let asked = directives(&parts.headers);
    if !rc.methods.contains(&parts.method) || asked.no_store || parts.headers.contains_key(header::RANGE) {
        let invalidate = !parts.method.is_safe();
        ctx.cache = Some("bypass");
        return Before::Forward(fill(
            Mode::Bypass { invalidate },
            "bypass",
            None,
            parts.headers.clone(),
        ));
    }
    let mut waited = false;
    loop {
        let now = Instant::now();
        if let Some(entry) = store.get(&key, &parts.headers).await {
            let age = entry.age(now);
            let too_old = asked.max_age.is_some_and(|m| age > Duration::from_secs(m));
            let validate = asked.no_cache || too_old;
            if entry.fresh(now) && !validate {
                ctx.cache = Some("hit");
                return Before::Respond(serve(&entry, &parts.headers, ctx, "hit", head));
            }
            let usable_stale = !entry.no_cache && !entry.must_revalidate && !validate;
            if usable_stale && age < entry.lifetime + entry.swr {
                if let Some(leader) = store.memory.try_lead(&key) {
                    let f = fill(Mode::Miss, "stale", Some(leader), parts.headers.clone());
                    refresh(origin, parts, entry.clone(), f);
                }
                ctx.cache = Some("stale");
                let status = "hit; detail=stale-while-revalidate";
                return Before::Respond(serve(&entry, &parts.headers, ctx, status, head));
            }
            let fwd = if entry.fresh(now) { "request" } else { "stale" };
            let revalidating = entry.has_validators();
            let f = fill(
                Mode::Stale {
                    entry: entry.clone(),
                    revalidating,
                },
                fwd,
                None,
                parts.headers.clone(),
            );
            if revalidating {
                make_conditional(&mut parts.headers, &entry);
            }
            ctx.cache = Some("miss");
            return Before::Forward(f);
        }
        if waited {
            ctx.cache = Some("miss");
            return Before::Forward(fill(Mode::Miss, "miss", None, parts.headers.clone()));
        }
        match store.memory.turn(&key) {
            Turn::Lead(leader) => {
                ctx.cache = Some("miss");
                return Before::Forward(fill(Mode::Miss, "miss", Some(leader), parts.headers.clone()));
            }
            Turn::Wait(mut rx) => {
                // Woken when the first request has stored its answer (or given up).
                let _ = tokio::time::timeout(rc.coalesce_timeout, rx.changed()).await;
                waited = true;
            }
        }
    }
}

fn make_conditional(headers: &mut HeaderMap, entry: &Entry) {
    for h in &CONDITIONALS {
        headers.remove(h);
    }
    if let Some(etag) = entry.headers.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = entry.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
    }
}

/// Whether the client's conditional headers say it has `entry` already (RFC 9110 §13.2.2).
fn not_modified(entry: &Entry, req: &HeaderMap) -> bool {
    if entry.status != StatusCode::OK {
        return false;
    }
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Some(etag) = entry.headers.get(header::ETAG).and_then(|e| e.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    match (
        http_date(req, &header::IF_MODIFIED_SINCE),
        http_date(&entry.headers, &header::LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Marks a response whose body is a stored entry's, so the compression at the end of the
/// response path can send the entry's compressed bytes (`Entry::encoded`).
#[derive(Clone)]
pub struct Served(pub Arc<Entry>);

fn serve(
    entry: &Arc<Entry>,
    req: &HeaderMap,
    ctx: &RequestCtx,
    status: &str,
    head: bool,
) -> Response<ProxyBody> {
    let unchanged = not_modified(entry, req);
    let body = if head || unchanged {
        Bytes::new()
    } else {
        entry.body.clone()
    };
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = if unchanged {
        StatusCode::NOT_MODIFIED
    } else {
        entry.status
    };
    let headers = resp.headers_mut();
    *headers = entry.headers.clone();
    if unchanged {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.insert(
        header::AGE,
        HeaderValue::from(entry.age(Instant::now()).as_secs()),
    );
    set_status(headers, status);
    headers.insert(&X_REQUEST_ID, ctx.request_id.clone());
    resp.extensions_mut().insert(Served(entry.clone()));
    resp
}

fn set_status(headers: &mut HeaderMap, status: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("ferrogate; {status}")) {
        headers.insert(&CACHE_STATUS, v);
    }
}

impl Fill {
    /// The upstream could not be reached (or gave no answer): a stale entry that allows it
    /// answers instead (`stale-if-error`).
    pub fn on_error(&self, ctx: &mut RequestCtx, e: &GatewayError) -> Option<Response<ProxyBody>> {
        let Mode::Stale { entry, .. } = &self.mode else {
            return None;
        };
        if !self.may_serve_stale(entry) {
            return None;
        }
        ctx.cache = Some("stale");
        let status = format!(
            "fwd=stale; fwd-status={}; detail=stale-if-error",
            e.kind.status().as_u16()
        );
        Some(serve(entry, &self.req, ctx, &status, self.head))
    }

    fn may_serve_stale(&self, entry: &Entry) -> bool {
        !entry.must_revalidate && entry.age(Instant::now()) < entry.lifetime + entry.sie
    }

    /// Take the upstream's answer: store it, refresh the stale entry with it, or answer
    /// from the stale entry; otherwise pass it on.
    pub async fn finish(
        self,
        mut parts: response::Parts,
        body: UpstreamBody,
        guard: InflightGuard,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let upstream_status = parts.status;
        match &self.mode {
            Mode::Bypass { invalidate } => {
                if *invalidate && !upstream_status.is_client_error() && !upstream_status.is_server_error() {
                    self.store.purge(Some(&self.url), None).await;
                }
                set_status(&mut parts.headers, "fwd=bypass");
                return Ok(pass(parts, body, guard));
            }
            Mode::Stale { entry, revalidating } => {
                if *revalidating && upstream_status == StatusCode::NOT_MODIFIED {
                    let status = "fwd=stale; fwd-status=304";
                    ctx.cache = Some("revalidated");
                    return Ok(match entry.refreshed(&self.rc, &parts.headers, &self.req) {
                        Some(fresh) => {
                            let fresh = Arc::new(fresh);
                            let resp = serve(&fresh, &self.req, ctx, status, self.head);
                            self.store.put(&self.key, &self.url, fresh.clone()).await;
                            resp
                        }
                        None => serve(entry, &self.req, ctx, status, self.head),
                    });
                }
                if upstream_status.is_server_error() && self.may_serve_stale(entry) {
                    ctx.cache = Some("stale");
                    let status = format!(
                        "fwd=stale; fwd-status={}; detail=stale-if-error",
                        upstream_status.as_u16()
                    );
                    return Ok(serve(entry, &self.req, ctx, &status, self.head));
                }
            }
            Mode::Miss => {}
        }
        let fwd = self.fwd;
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let stored_policy = match length {
            Some(n) if n <= self.rc.max_body => policy(&self.rc, &self.req, upstream_status, &parts.headers),
            _ => None,
        };
        let Some(p) = stored_policy else {
            set_status(
                &mut parts.headers,
                &format!("fwd={fwd}; fwd-status={}", upstream_status.as_u16()),
            );
            return Ok(pass(parts, body, guard));
        };
        let bytes = match collect_capped(body, self.rc.max_body).await {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::UpstreamUnreachable,
                    "lost the upstream response mid-body",
                ))
            }
        };
        drop(guard);
        let entry = Entry::new(
            p,
            upstream_status,
            parts.headers.clone(),
            bytes.clone(),
            &self.req,
        );
        self.store.put(&self.key, &self.url, entry).await;
        set_status(
            &mut parts.headers,
            &format!("fwd={fwd}; fwd-status={}; stored", upstream_status.as_u16()),
        );
        Ok(Response::from_parts(parts, ResponseBody::full(bytes)))
    }
}

fn pass(parts: response::Parts, body: UpstreamBody, guard: InflightGuard) -> Response<ProxyBody> {
    Response::from_parts(
        parts,
        ResponseBody::Upstream {
            inner: body,
            _guard: guard,
        },
    )
}

/// Fetch a stale entry again in the background (conditionally when it has validators); the
/// fill's leader keeps other refreshes of the key away until this one is done.
fn refresh(origin: Origin<'_>, parts: &request::Parts, entry: Arc<Entry>, fill: Fill) {
    let engine = origin.engine.clone();
    let index = origin.upstream;
    let upstream = &engine.upstreams[index];
    let Ok(pq) = upstream_path_and_query(upstream, &parts.uri, origin.path, origin.query) else {
        return;
    };
    let mut copy = request::Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.headers_mut() = parts.headers.clone();
    origin.forwarding.apply(copy.headers_mut());
    let (mut copy, ()) = copy.into_parts();
    copy.uri = Uri::from(pq);
    if entry.has_validators() {
        make_conditional(&mut copy.headers, &entry);
    }
    let preserve_host = origin.preserve_host;
    tokio::spawn(async move {
        let upstream = &engine.upstreams[index];
        let Ok(picked) = upstream.pick(None, &[], crate::health::now_ns()) else {
            return;
        };
        if !preserve_host {
            copy.headers
                .insert(header::HOST, picked.target.host_header.clone());
        }
        let exchange = async {
            let mut body = RequestBody::buffered(Bytes::new());
            let resp = picked.target.pool.send(&copy, &mut body).await.ok()?;
            let (mut rparts, rbody) = resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            if rparts.status == StatusCode::NOT_MODIFIED {
                let fresh = entry.refreshed(&fill.rc, &rparts.headers, &fill.req)?;
                fill.store.put(&fill.key, &fill.url, fresh).await;
                return Some(());
            }
            let p = policy(&fill.rc, &fill.req, rparts.status, &rparts.headers)?;
            let bytes = collect_capped(rbody, fill.rc.max_body).await.ok()??;
            let fresh = Entry::new(p, rparts.status, rparts.headers, bytes, &fill.req);
            fill.store.put(&fill.key, &fill.url, fresh).await;
            Some(())
        };
        let limit = upstream.read_timeout.max(Duration::from_millis(1));
        let _ = tokio::time::timeout(limit, exchange).await;
        drop(picked);
    });
}

// --- purges --------------------------------------------------------------------------------

/// One purge as the master writes it.
#[derive(Debug, Deserialize)]
struct Purge {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
}

/// The file beside the runtime file where the master appends purges.
pub fn purge_file(runtime: &std::path::Path) -> std::path::PathBuf {
    let mut name = runtime.as_os_str().to_owned();
    name.push(".cache-purge");
    name.into()
}

/// The purges appended to `path` since `offset`.
fn read_purges(path: &std::path::Path, offset: &mut u64) -> Vec<Purge> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if len < *offset {
        // The master started over (a new file).
        *offset = 0;
    }
    if len == *offset || file.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    if file.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    // Only whole lines: the master may be writing the next one.
    let Some(end) = text.rfind('\n') else {
        return Vec::new();
    };
    *offset += end as u64 + 1;
    text[..end]
        .lines()
        .filter_map(|line| serde_json::from_str::<Purge>(line).ok())
        .collect()
}

/// Watch the purge file of `runtime` for the worker's life. Purges written before the
/// worker started are skipped: its store started empty.
pub fn watch_purges(worker: Arc<crate::proxy::Worker>, runtime: &std::path::Path) {
    let path = purge_file(runtime);
    let mut offset = std::fs::metadata(&path).map_or(0, |m| m.len());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PURGE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let purges = read_purges(&path, &mut offset);
            if purges.is_empty() {
                continue;
            }
            let stores = worker.engine.load().cache.clone();
            for p in purges {
                stores.purge(p.key.as_deref(), p.prefix.as_deref()).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc() -> RouteCache {
        RouteCache::compile(&RouteCacheConfig::default(), "cache").unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn freshness_follows_the_directives() {
        let none = HeaderMap::new();
        let p = policy(
            &rc(),
            &none,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=10, s-maxage=20")]),
        );
        assert_eq!(p.unwrap().lifetime, Duration::from_secs(20));
        for cc in ["no-store", "private", "max-age=5, private"] {
            assert!(
                policy(&rc(), &none, StatusCode::OK, &headers(&[("cache-control", cc)])).is_none(),
                "{cc}"
            );
        }
        // No freshness and no validator: nothing to store (no heuristic by default).
        assert!(policy(&rc(), &none, StatusCode::OK, &HeaderMap::new()).is_none());
        let etag = policy(&rc(), &none, StatusCode::OK, &headers(&[("etag", "\"a\"")])).unwrap();
        assert_eq!(etag.lifetime, Duration::ZERO);
        // 500 is not cacheable by default, but is with explicit freshness.
        assert!(policy(
            &rc(),
            &none,
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(&[("etag", "\"a\"")])
        )
        .is_none());
        assert!(policy(
            &rc(),
            &none,
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(&[("cache-control", "max-age=3")])
        )
        .is_some());
        let cfg = RouteCacheConfig {
            default_ttl: Some(7.0),
            ..Default::default()
        };
        let with_ttl = RouteCache::compile(&cfg, "c").unwrap();
        assert_eq!(
            policy(&with_ttl, &none, StatusCode::OK, &none).unwrap().lifetime,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn authorized_requests_and_cookies_need_permission() {
        let auth = headers(&[("authorization", "Bearer x")]);
        let plain = headers(&[("cache-control", "max-age=60")]);
        assert!(policy(&rc(), &auth, StatusCode::OK, &plain).is_none());
        let public = headers(&[("cache-control", "public, max-age=60")]);
        assert!(policy(&rc(), &auth, StatusCode::OK, &public).is_some());
        let cookie = headers(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]);
        assert!(policy(&rc(), &HeaderMap::new(), StatusCode::OK, &cookie).is_none());
        let star = headers(&[("cache-control", "max-age=60"), ("vary", "*")]);
        assert!(policy(&rc(), &HeaderMap::new(), StatusCode::OK, &star).is_none());
    }

    #[test]
    fn expires_counts_from_date() {
        let now = SystemTime::now();
        let h = headers(&[
            ("date", &httpdate::fmt_http_date(now)),
            ("expires", &httpdate::fmt_http_date(now + Duration::from_secs(30))),
        ]);
        let p = policy(&rc(), &HeaderMap::new(), StatusCode::OK, &h).unwrap();
        assert!(p.lifetime >= Duration::from_secs(29) && p.lifetime <= Duration::from_secs(31));
        let bad = headers(&[("expires", "0")]);
        assert_eq!(
            policy(&rc(), &HeaderMap::new(), StatusCode::OK, &bad)
                .unwrap()
                .lifetime,
            Duration::ZERO
        );
    }

    fn entry(body: usize, vary_value: &str) -> Entry {
        let p = Policy {
            lifetime: Duration::from_secs(60),
            swr: Duration::ZERO,
            sie: Duration::ZERO,
            no_cache: false,
            must_revalidate: false,
            vary: vec![header::ACCEPT_LANGUAGE],
        };
        let req = headers(&[("accept-language", vary_value)]);
        Entry::new(
            p,
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; body]),
            &req,
        )
    }

    #[test]
    fn variants_and_lru_budget() {
        let store = Arc::new(MemoryStore::new(10_000));
        let a: Arc<str> = "a".into();
        store.put(&a, "/a", entry(100, "en"));
        store.put(&a, "/a", entry(100, "fr"));
        assert_eq!(store.usage().1, 2);
        assert!(store.get(&a, &headers(&[("accept-language", "fr")])).is_some());
        assert!(store.get(&a, &headers(&[("accept-language", "de")])).is_none());
        // Same variant again replaces it.
        store.put(&a, "/a", entry(100, "fr"));
        assert_eq!(store.usage().1, 2);
        for i in 0..40 {
            let k: Arc<str> = format!("k{i}").into();
            store.put(&k, &format!("/k{i}"), entry(1000, "en"));
            assert!(store.usage().0 <= 10_000);
        }
        assert!(store
            .get(&"k39".into(), &headers(&[("accept-language", "en")]))
            .is_some());
        assert!(store.get(&a, &headers(&[("accept-language", "en")])).is_none());
        // Too big for the whole budget: never stored.
        store.put(&a, "/a", entry(20_000, "en"));
        assert!(store.get(&a, &headers(&[("accept-language", "en")])).is_none());
    }

    #[test]
    fn entries_survive_the_shared_form() {
        let mut e = entry(100, "fr");
        e.headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        e.headers
            .append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        e.headers
            .append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        e.must_revalidate = true;
        let back = Entry::decode(&e.encode()).unwrap();
        assert_eq!(back.status, e.status);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.body, e.body);
        assert_eq!(back.vary, e.vary);
        assert_eq!(
            (back.lifetime, back.must_revalidate, back.no_cache),
            (e.lifetime, true, false)
        );
        assert!(back.matches(&headers(&[("accept-language", "fr")])));
        assert!(Entry::decode(&e.encode()[..50]).is_none());
        assert!(Entry::decode(b"").is_none());
        // Kept while servable, plus an hour to revalidate (it has an ETag).
        let keep = back.keep_for();
        assert!(keep > Duration::from_secs(3600) && keep <= Duration::from_secs(3660));
    }

    #[test]
    fn purge_by_key_and_prefix() {
        let store = MemoryStore::new(1 << 20);
        for (k, url) in [("1", "/items/1"), ("2", "/items/2"), ("3", "/other")] {
            store.put(&k.into(), url, entry(10, "en"));
        }
        assert_eq!(store.purge(Some("/items/1"), None), 1);
        assert_eq!(store.purge(None, Some("/items/")), 1);
        assert_eq!(store.usage().1, 1);
    }

    #[test]
    fn conditional_requests_against_an_entry() {
        let mut e = entry(10, "en");
        e.headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        assert!(not_modified(&e, &headers(&[("if-none-match", "W/\"v1\"")])));
        assert!(!not_modified(&e, &headers(&[("if-none-match", "\"v2\"")])));
        assert!(!not_modified(&e, &HeaderMap::new()));
    }
}
