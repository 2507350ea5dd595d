//! The AI gateway's pass-through path in the data plane.
//!
//! A chat completion for a model alias served by one OpenAI-format deployment needs nothing
//! the Python plugin adds: the body goes on with its `model` renamed and the provider's
//! credentials, and the answer comes back as it is, with its `usage` read on the side. The
//! control plane works out, per config, everything such a request needs (the key index,
//! each consumer's counters and budgets, each alias's upstream, path and headers: the
//! route's `ai_fast` table, built by `ferrogate/ai/config.py` from the same code the plugin
//! uses), and this module does the rest without a Python crossing.
//!
//! Anything else declines, before the request is sent, and takes the plugin's path: a
//! stream, an unknown key or model, a model the consumer may not use, a limit that refuses
//! (the plugin then answers with its error), a body that is not plain JSON. Declining is
//! always correct; this path only has to match the plugin where it accepts.
//!
//! The books are the plugin's: the same counters (`counters.rs`) under the same keys, the
//! prompt estimate and the reservation computed the same way, settled against the answer's
//! `usage`. Usage records go to a queue the worker's usage thread takes from
//! (`_core.ai_usage_take`); an answer without `usage` goes there with its bodies, and that
//! thread counts it with the tokenizer and settles it.

use crate::body::collect_capped;
use crate::counters;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The route's table as the control plane writes it (`routes[].ai_fast`).
#[derive(Debug, Clone, Deserialize)]
pub struct AiFastConfig {
    /// SHA-256 (hex) of a gateway key -> (consumer, credential id).
    pub keys: HashMap<String, (String, String)>,
    /// Consumers with an AI policy; one without is allowed every alias, with no limits.
    #[serde(default)]
    pub consumers: HashMap<String, ConsumerConfig>,
    pub aliases: HashMap<String, AliasConfig>,
    pub default_max_tokens: u64,
    /// Largest answer read (the plugin's buffer).
    pub body_cap: u64,
    pub tokens: EstimateConfig,
    /// OpenAI's error `type` per status; others are `api_error`.
    #[serde(default)]
    pub error_types: HashMap<u16, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerConfig {
    /// Aliases the consumer may use; None: all.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Per alias the consumer may use: its counters, in the order the plugin takes them.
    #[serde(default)]
    pub limits: HashMap<String, Vec<RateConfig>>,
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateConfig {
    pub key: String,
    pub per_second: f64,
    pub burst: f64,
    /// Counted in prompt tokens (tpm); otherwise one per request (rpm).
    pub tokens: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BudgetConfig {
    pub key: String,
    /// The calendar month's window; otherwise the UTC day's.
    pub month: bool,
    /// Micro-USD.
    pub limit: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AliasConfig {
    pub upstream: String,
    pub path: String,
    pub model: String,
    pub headers: Vec<(String, String)>,
    pub deployment: String,
    pub provider: String,
    /// Micro-USD per token.
    pub price_in: f64,
    pub price_out: f64,
    /// The provider key, never shown to a client (errors quoting it are redacted).
    #[serde(default)]
    pub api_key: String,
}

/// `ferrogate/ai/tokens.py`'s constants for the prompt estimate.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct EstimateConfig {
    pub reply_priming: u64,
    pub per_message: u64,
    pub per_name: u64,
    pub image: u64,
    pub image_low: u64,
    pub other_part: u64,
}

/// The compiled table of one route.
#[derive(Debug)]
pub struct AiFast {
    cfg: AiFastConfig,
    aliases: HashMap<String, Arc<Alias>>,
    route: Arc<str>,
}

/// An alias as the records name it (shared by every row of its requests).
#[derive(Debug)]
struct Alias {
    name: Arc<str>,
    deployment: Arc<str>,
    provider: Arc<str>,
    provider_model: Arc<str>,
    upstream: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
    model_json: String,
    sets_user_agent: bool,
    cfg: AliasConfig,
}

impl AiFast {
    pub fn compile(
        cfg: &AiFastConfig,
        route: &str,
        at: &str,
        upstream_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<AiFast, String> {
        let mut aliases = HashMap::new();
        for (name, a) in &cfg.aliases {
            let upstream = upstream_index(&a.upstream)
                .ok_or_else(|| format!("{at}.aliases.{name}: unknown upstream '{}'", a.upstream))?;
            let mut headers = Vec::with_capacity(a.headers.len());
            for (n, v) in &a.headers {
                let n = HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("{at}.aliases.{name}: bad header name '{n}'"))?;
                let v = HeaderValue::from_str(v)
                    .map_err(|_| format!("{at}.aliases.{name}: bad value of header '{n}'"))?;
                headers.push((n, v));
            }
            let sets_user_agent = headers.iter().any(|(n, _)| n == header::USER_AGENT);
            aliases.insert(
                name.clone(),
                Arc::new(Alias {
                    name: name.as_str().into(),
                    deployment: a.deployment.as_str().into(),
                    provider: a.provider.as_str().into(),
                    provider_model: a.model.as_str().into(),
                    upstream,
                    headers,
                    model_json: serde_json::to_string(&a.model).unwrap_or_default(),
                    sets_user_agent,
                    cfg: a.clone(),
                }),
            );
        }
        Ok(AiFast {
            cfg: cfg.clone(),
            aliases,
            route: route.into(),
        })
    }

    /// Take the request, or None for the plugin's path (nothing counted then).
    pub fn admit<'a>(self: &'a Arc<Self>, headers: &HeaderMap, body: &Bytes) -> Option<Admitted<'a>> {
        let key = gateway_key(headers)?;
        let (consumer, credential) = self.cfg.keys.get(&sha256_hex(key.as_bytes()))?;
        let policy = self.cfg.consumers.get(consumer);
        let fields = top_level(body)?;
        let mut model = None;
        let mut messages = None;
        let mut max_completion = None;
        let mut max_tokens = None;
        for (k, v) in &fields {
            match k.as_str() {
                "model" => model = Some(*v),
                "messages" => messages = Some(*v),
                "max_completion_tokens" => max_completion = Some(*v),
                "max_tokens" => max_tokens = Some(*v),
                // A stream takes the plugin's path (`stream: false` and null do not).
                "stream" if !matches!(v.get(), "false" | "null") => return None,
                _ => {}
            }
        }
        let alias_name: String = serde_json::from_str(model?.get()).ok()?;
        let alias = self.aliases.get(&alias_name)?;
        if let Some(allowed) = policy.and_then(|p| p.models.as_ref()) {
            if !allowed.contains(&alias_name) {
                return None;
            }
        }
        let messages: Value = serde_json::from_str(messages?.get()).ok()?;
        let est = estimate_messages(messages.as_array()?, &self.cfg.tokens);
        let max_out = max_out(max_completion, max_tokens)?.unwrap_or(self.cfg.default_max_tokens);

        let mut charged: Vec<(&RateConfig, f64)> = Vec::new();
        let mut reserved: Vec<(&str, i64)> = Vec::new();
        let mut amount = 0u64;
        if let Some(p) = policy {
            let refund = |charged: &[(&RateConfig, f64)]| {
                for (r, cost) in charged {
                    counters::rate_adjust(&r.key, r.per_second, -cost);
                }
            };
            for r in p.limits.get(&alias_name).map(Vec::as_slice).unwrap_or_default() {
                let cost = if r.tokens { est as f64 } else { 1.0 };
                if counters::rate_take(&r.key, r.per_second, r.burst, cost) > 0.0 {
                    refund(&charged);
                    return None;
                }
                charged.push((r, cost));
            }
            if !p.budgets.is_empty() {
                let a = &alias.cfg;
                amount = (est as f64 * a.price_in + max_out as f64 * a.price_out + 0.999) as u64;
                let (day, month) = windows(unix_now());
                for b in &p.budgets {
                    let window = if b.month { month } else { day };
                    if counters::budget_reserve(&b.key, window, amount, b.limit) < 0 {
                        for (k, w) in &reserved {
                            counters::budget_adjust(k, *w, -(amount as i64));
                        }
                        refund(&charged);
                        return None;
                    }
                    reserved.push((&b.key, window));
                }
            }
        }
        let body = with_model(&fields, &alias.model_json);
        Some(Admitted {
            fast: self,
            alias,
            consumer,
            credential,
            body,
            books: Books {
                limits: charged
                    .into_iter()
                    .filter(|(r, _)| r.tokens)
                    .map(|(r, cost)| (r.key.clone(), r.per_second, r.burst, cost))
                    .collect(),
                budgets: reserved.into_iter().map(|(k, w)| (k.to_string(), w)).collect(),
                reserved: amount,
            },
        })
    }
}

/// A request this path took: what the proxy changes, then [`Admitted::meter`].
pub struct Admitted<'a> {
    fast: &'a Arc<AiFast>,
    alias: &'a Arc<Alias>,
    pub consumer: &'a str,
    pub credential: &'a str,
    /// The provider's body: the client's, `model` renamed.
    pub body: Bytes,
    books: Books,
}

impl Admitted<'_> {
    pub fn upstream(&self) -> usize {
        self.alias.upstream
    }

    pub fn path(&self) -> &str {
        &self.alias.cfg.path
    }

    /// The provider's header list: the client's User-Agent (unless the deployment sets
    /// one), then the deployment's; nothing else of the client's.
    pub fn headers(&self, client: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(self.alias.headers.len() + 1);
        if !self.alias.sets_user_agent {
            if let Some(ua) = client.get(header::USER_AGENT) {
                out.insert(header::USER_AGENT, ua.clone());
            }
        }
        for (n, v) in &self.alias.headers {
            out.append(n.clone(), v.clone());
        }
        out
    }

    /// What settles the request once its answer is known (or refunds it if it never is).
    pub fn meter(self, request_id: &HeaderValue) -> Meter {
        Meter {
            books: Some(self.books),
            fast: self.fast.clone(),
            alias: self.alias.clone(),
            request_id: request_id.to_str().unwrap_or_default().to_string(),
            consumer: self.consumer.into(),
            request_body: self.body,
            started: Instant::now(),
            started_wall: unix_now(),
        }
    }
}

/// What was counted before sending: tpm counters (key, rate, burst, tokens charged), the
/// budget counters reserved in (key, window) and the amount reserved (micro-USD).
#[derive(Debug, Clone)]
struct Books {
    limits: Vec<(String, f64, f64, f64)>,
    budgets: Vec<(String, i64)>,
    reserved: u64,
}

impl Books {
    fn settle(&self, tokens: u64, cost: i64) {
        for (key, rate, _, charged) in &self.limits {
            if tokens as f64 != *charged {
                counters::rate_adjust(key, *rate, tokens as f64 - charged);
            }
        }
        if self.reserved > 0 {
            for (key, window) in &self.budgets {
                counters::budget_adjust(key, *window, cost - self.reserved as i64);
            }
        }
    }
}

/// One request on its way: settled by [`Meter::respond`], refunded if dropped before.
pub struct Meter {
    books: Option<Books>,
    fast: Arc<AiFast>,
    alias: Arc<Alias>,
    request_id: String,
    consumer: Arc<str>,
    request_body: Bytes,
    started: Instant,
    started_wall: f64,
}

impl Meter {
    /// The answer going out: read whole, its usage settled, an error put in OpenAI's shape.
    pub async fn respond<B>(mut self, resp: Response<B>) -> Response<Bytes>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (mut parts, body) = resp.into_parts();
        let status = parts.status;
        let bytes = match collect_capped(body, self.fast.cfg.body_cap).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                let e = crate::error::GatewayError::new(
                    crate::error::ErrorKind::ResponseTooLarge,
                    format!(
                        "the response body is larger than the route's plugins buffer ({} bytes)",
                        self.fast.cfg.body_cap
                    ),
                );
                return self.gateway_error(e, status);
            }
            Err(e) => {
                let e = crate::error::GatewayError::new(
                    crate::error::ErrorKind::UpstreamUnreachable,
                    format!("lost the upstream response mid-body: {e}"),
                );
                return self.gateway_error(e, status);
            }
        };
        let out = if status.is_success() {
            match usage_of(&bytes) {
                Some((prompt, completion)) => self.settle(status, prompt, completion),
                None => self.defer(status, bytes.clone()),
            }
            bytes
        } else {
            self.settle(status, 0, 0);
            let shaped = self.error_body(status, &bytes);
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            shaped
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        Response::from_parts(parts, out)
    }

    /// The answer could not be read whole: the gateway's error goes out as it is, and the
    /// prompt is counted (as the plugin does) by the usage thread.
    fn gateway_error(mut self, e: crate::error::GatewayError, upstream: StatusCode) -> Response<Bytes> {
        let request_id = HeaderValue::from_str(&self.request_id).unwrap_or(HeaderValue::from_static(""));
        let resp = e.into_response(&request_id, Bytes::from);
        if upstream.is_success() {
            self.defer(resp.status(), Bytes::new());
        } else {
            self.settle(resp.status(), 0, 0);
        }
        resp
    }

    fn settle(&mut self, status: StatusCode, prompt: u64, completion: u64) {
        let Some(books) = self.books.take() else {
            return;
        };
        let a = &self.alias.cfg;
        let cost = (prompt as f64 * a.price_in + completion as f64 * a.price_out + 0.5) as i64;
        books.settle(prompt + completion, cost);
        self.push(status.as_u16(), prompt, completion, cost, None);
    }

    /// No usage in the answer: the usage thread counts it and settles.
    fn defer(&mut self, status: StatusCode, answer: Bytes) {
        let Some(books) = self.books.take() else {
            return;
        };
        let estimate = Estimate {
            request: self.request_body.clone(),
            answer,
            limits: books.limits,
            budgets: books.budgets,
            reserved: books.reserved,
            price_in: self.alias.cfg.price_in,
            price_out: self.alias.cfg.price_out,
        };
        self.push(status.as_u16(), 0, 0, 0, Some(Box::new(estimate)));
    }

    fn push(&self, status: u16, prompt: u64, completion: u64, cost: i64, estimate: Option<Box<Estimate>>) {
        let row = UsageRow {
            time: self.started_wall,
            request_id: self.request_id.clone(),
            route: self.fast.route.clone(),
            consumer: self.consumer.clone(),
            model: self.alias.name.clone(),
            deployment: self.alias.deployment.clone(),
            provider: self.alias.provider.clone(),
            provider_model: self.alias.provider_model.clone(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            status,
            estimate,
        };
        let mut q = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
        if q.rows.len() < MAX_QUEUED {
            q.rows.push(row);
        } else {
            q.dropped += 1;
        }
    }

    /// An error answer in OpenAI's shape (`adapters/openai.py` `_error`), the provider key
    /// never quoted.
    fn error_body(&self, status: StatusCode, body: &[u8]) -> Bytes {
        let doc: Option<Value> = serde_json::from_slice(body).ok();
        let kind = self
            .fast
            .cfg
            .error_types
            .get(&status.as_u16())
            .map_or("api_error", String::as_str);
        let shaped = match doc {
            Some(Value::Object(mut doc)) => match doc.remove("error") {
                Some(Value::Object(err)) if err.contains_key("message") => {
                    let mut e = serde_json::Map::new();
                    e.insert("type".into(), Value::Null);
                    e.insert("param".into(), Value::Null);
                    e.insert("code".into(), Value::Null);
                    e.extend(err);
                    serde_json::json!({ "error": e })
                }
                err => {
                    let message = doc
                        .get("message")
                        .filter(|m| truthy(m))
                        .or_else(|| doc.get("detail").filter(|m| truthy(m)))
                        .or(err.as_ref())
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    match message {
                        Some(m) => error_json(kind, m),
                        None => error_json(kind, format!("the provider answered {}", status.as_u16())),
                    }
                }
            },
            _ => error_json(kind, format!("the provider answered {}", status.as_u16())),
        };
        let mut out = serde_json::to_vec(&shaped).unwrap_or_default();
        let key = self.alias.cfg.api_key.as_bytes();
        if !key.is_empty() && out.windows(key.len()).any(|w| w == key) {
            out = replace_all(&out, key, b"***");
        }
        Bytes::from(out)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // The client left before the answer: nothing was used that anyone pays for.
        if self.books.is_some() {
            self.settle(
                StatusCode::from_u16(crate::observe::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
                0,
                0,
            );
        }
    }
}

fn error_json(kind: &str, message: String) -> Value {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// Python's truth value of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// What the usage thread needs to count an answer without `usage` and settle it.
#[derive(Debug)]
pub struct Estimate {
    /// The provider's request body (its `messages` are counted).
    pub request: Bytes,
    /// The answer; empty when it was never read whole.
    pub answer: Bytes,
    pub limits: Vec<(String, f64, f64, f64)>,
    pub budgets: Vec<(String, i64)>,
    pub reserved: u64,
    pub price_in: f64,
    pub price_out: f64,
}

/// One usage record for `ferrogate/ai/usage.py` (`cost` in micro-USD).
#[derive(Debug)]
pub struct UsageRow {
    pub time: f64,
    pub request_id: String,
    pub route: Arc<str>,
    pub consumer: Arc<str>,
    pub model: Arc<str>,
    pub deployment: Arc<str>,
    pub provider: Arc<str>,
    pub provider_model: Arc<str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: i64,
    pub latency_ms: f64,
    pub status: u16,
    pub estimate: Option<Box<Estimate>>,
}

/// Rows kept for the usage thread at most (it takes them twice a second).
const MAX_QUEUED: usize = 100_000;

struct Queue {
    rows: Vec<UsageRow>,
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    rows: Vec::new(),
    dropped: 0,
});

/// Everything queued since the last call, and how many rows were dropped (queue full).
pub fn take_usage() -> (Vec<UsageRow>, u64) {
    let mut q = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    let dropped = std::mem::take(&mut q.dropped);
    (std::mem::take(&mut q.rows), dropped)
}

/// The key as the plugin reads it: `Authorization: Bearer KEY`, else `x-api-key`.
fn gateway_key(headers: &HeaderMap) -> Option<&str> {
    let mut key = None;
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let auth = auth.to_str().ok()?;
        if auth.len() >= 7 && auth[..7].eq_ignore_ascii_case("bearer ") {
            key = Some(auth[7..].trim());
        }
    }
    if key.is_none() {
        key = headers.get("x-api-key").map(|v| v.to_str()).transpose().ok()?;
    }
    key.filter(|k| !k.is_empty())
}

fn sha256_hex(data: &[u8]) -> String {
    crate::trace::hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// The body's top-level fields, values left as written; None unless an object without
/// repeated names.
fn top_level(body: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    struct Fields<'a>(Vec<(String, &'a RawValue)>);
    impl<'de> Deserialize<'de> for Fields<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Fields<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Fields<'de>, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                        out.push((k, v));
                    }
                    Ok(Fields(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let fields = serde_json::from_slice::<Fields<'_>>(body).ok()?.0;
    let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    Some(fields)
}

/// The object again, compact between fields, `model` set to `model_json`.
fn with_model(fields: &[(String, &RawValue)], model_json: &str) -> Bytes {
    let mut out = Vec::with_capacity(
        fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 2,
    );
    out.push(b'{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
        out.push(b':');
        if k == "model" {
            out.extend_from_slice(model_json.as_bytes());
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    Bytes::from(out)
}

/// `max_completion_tokens or max_tokens`, when a positive integer (else the default:
/// Some(None)); None (decline) for a boolean, which Python would count as an integer.
fn max_out(completion: Option<&RawValue>, tokens: Option<&RawValue>) -> Option<Option<u64>> {
    let parse =
        |r: Option<&RawValue>| -> Option<Value> { r.and_then(|r| serde_json::from_str(r.get()).ok()) };
    let c = parse(completion);
    let v = match c {
        Some(c) if truthy(&c) => c,
        _ => parse(tokens).unwrap_or(Value::Null),
    };
    match v {
        Value::Bool(_) => None,
        Value::Number(n) => Some(n.as_u64().filter(|n| *n > 0)),
        _ => Some(None),
    }
}

/// `tokens.py` `estimate_messages`: a quick, slightly high prompt count.
fn estimate_messages(messages: &[Value], t: &EstimateConfig) -> u64 {
    let text = |s: &str| if s.is_empty() { 0 } else { s.len() as u64 / 4 + 1 };
    let mut n = t.reply_priming;
    for message in messages {
        n += t.per_message;
        let Some(m) = message.as_object() else {
            continue;
        };
        for (key, value) in m {
            if key == "role" {
                n += 1;
                continue;
            }
            n += match value {
                Value::String(s) => text(s),
                Value::Array(parts) if key == "content" => parts
                    .iter()
                    .map(|p| {
                        let Some(p) = p.as_object() else { return 0 };
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => p.get("text").and_then(Value::as_str).map_or(0, text),
                            Some("image_url") => {
                                let low = p
                                    .get("image_url")
                                    .and_then(|i| i.get("detail"))
                                    .and_then(Value::as_str)
                                    == Some("low");
                                if low {
                                    t.image_low
                                } else {
                                    t.image
                                }
                            }
                            Some("refusal") => p.get("refusal").and_then(Value::as_str).map_or(0, text),
                            _ => t.other_part,
                        }
                    })
                    .sum(),
                Value::Array(calls) if key == "tool_calls" => calls
                    .iter()
                    .filter_map(|c| c.get("function").and_then(Value::as_object))
                    .map(|f| {
                        ["name", "arguments"]
                            .iter()
                            .filter_map(|k| f.get(*k).and_then(Value::as_str))
                            .map(text)
                            .sum::<u64>()
                    })
                    .sum(),
                _ => 0,
            };
            if key == "name" {
                n += t.per_name;
            }
        }
    }
    n
}

/// `usage.prompt_tokens` and `usage.completion_tokens` of an answer (missing numbers are
/// 0, as the plugin reads them); None without a `usage` object.
fn usage_of(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Usage {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let u = serde_json::from_slice::<Answer>(body).ok()?.usage?;
    Some((u.prompt_tokens, u.completion_tokens))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The (day, month) window numbers the plugin's budgets use: days since the epoch, and
/// year * 12 + month (1-12) of the UTC calendar.
fn windows(now: f64) -> (i64, i64) {
    let day = (now / 86400.0).floor() as i64;
    // Days to civil date (H. Hinnant's algorithm).
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (day, year * 12 + month)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> EstimateConfig {
        EstimateConfig {
            reply_priming: 3,
            per_message: 3,
            per_name: 1,
            image: 765,
            image_low: 85,
            other_part: 256,
        }
    }

    #[test]
    fn windows_follow_the_utc_calendar() {
        // 2026-11-27T22:00:00Z, 2024-02-29T12:00:00Z, 2000-01-01T00:00:00Z
        assert_eq!(windows(1_795_816_800.0), (20_784, 2026 * 12 + 11));
        assert_eq!(windows(1_709_208_000.0), (19_782, 2024 * 12 + 2));
        assert_eq!(windows(946_684_800.0), (10_957, 2000 * 12 + 1));
    }

    #[test]
    fn estimate_matches_the_plugins_rules() {
        let m: Value = serde_json::from_str(
            r#"[{"role":"system","content":"You are a helpful assistant."},
                {"role":"user","content":"Say hello in one short sentence.","name":"bob"},
                {"role":"user","content":[{"type":"text","text":"héllo wörld"},{"type":"image_url","image_url":{"url":"x"}}]},
                {"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}]"#,
        )
        .unwrap();
        // The same list gives 809 in ferrogate.ai.tokens.estimate_messages.
        assert_eq!(estimate_messages(m.as_array().unwrap(), &t()), 809);
    }

    #[test]
    fn the_model_is_renamed_and_the_rest_kept_in_order() {
        let body =
            br#"{"model" : "fast", "messages":[{"role":"user","content":"hi \u00e9"}],"temperature":0.5}"#;
        let fields = top_level(body).unwrap();
        let out = with_model(&fields, "\"gpt-4o-mini\"");
        assert_eq!(
            &out[..],
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \u00e9"}],"temperature":0.5}"#
        );
        assert!(top_level(br#"{"model":"a","model":"b"}"#).is_none());
        assert!(top_level(b"[1]").is_none());
    }

    #[test]
    fn max_out_reads_like_the_plugin() {
        fn raw(s: &str) -> &RawValue {
            serde_json::from_str(s).unwrap()
        }
        assert_eq!(max_out(Some(raw("0")), Some(raw("32"))), Some(Some(32)));
        assert_eq!(max_out(Some(raw("64")), Some(raw("32"))), Some(Some(64)));
        assert_eq!(max_out(None, Some(raw("-3"))), Some(None));
        assert_eq!(max_out(None, Some(raw("1.5"))), Some(None));
        assert_eq!(max_out(None, None), Some(None));
        assert_eq!(max_out(None, Some(raw("true"))), None);
    }

    #[test]
    fn keys_are_read_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bEaReR  sk-1 "));
        assert_eq!(gateway_key(&h), Some("sk-1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        h.insert("x-api-key", HeaderValue::from_static("sk-2"));
        assert_eq!(gateway_key(&h), Some("sk-2"));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn usage_is_read_from_the_answer() {
        assert_eq!(
            usage_of(br#"{"id":"x","usage":{"prompt_tokens":14,"completion_tokens":12,"total_tokens":26}}"#),
            Some((14, 12))
        );
        assert_eq!(usage_of(br#"{"id":"x","usage":null}"#), None);
        assert_eq!(usage_of(b"not json"), None);
    }
}
