//! The route table: host tiers, each a radix tree of path patterns whose leaves hold the
//! routes sharing that pattern, ordered by precedence (see docs/config.md).
//!
//! Lookup cost is the host lookup (hash maps, one per wildcard label) plus one radix-tree
//! walk, so it does not grow with the number of routes.

use crate::config::{ConfigProblem, GatewayConfig, Predicate, RouteConfig};
use crate::limiter::Limit;
use crate::mirror::Mirror;
use crate::plugins::ChainSpec;
use crate::split::Split;
#[cfg(test)]
use http::HeaderValue;
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub enum Matcher {
    Exact(String),
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            Matcher::Exact(want) => want.as_bytes() == value,
            Matcher::Regex(re) => std::str::from_utf8(value).is_ok_and(|v| re.is_match(v)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Matcher::Exact(v) => format!("={v}"),
            Matcher::Regex(re) => format!("~/{}/", re.as_str()),
        }
    }
}

#[derive(Debug)]
enum RewritePart {
    Literal(String),
    Param(String),
}

/// A compiled route: what it matches beyond its path, and where it sends the request.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub index: usize,
    pub upstream: usize,
    pub upstream_name: String,
    pub preserve_host: bool,
    pub priority: i64,
    pub plugins: Option<ChainSpec>,
    pub rate_limits: Vec<Limit>,
    /// Version rules and a weighted split between upstreams, when the route has them.
    pub split: Option<Split>,
    pub mirror: Option<Mirror>,
    /// Overrides of the upstream's timeouts and retry policy.
    pub timeouts: crate::upstream::RouteTimeoutSet,
    pub retries: Option<Arc<crate::retry::RetryPolicy>>,
    /// The route's own client address list (the global one applies as well).
    pub ip_restriction: Option<crate::ip_restriction::IpRules>,
    /// Only connections with a verified client certificate may use the route.
    pub client_cert_required: bool,
    /// The route's response cache settings, when it caches.
    pub cache: Option<Arc<crate::cache::RouteCache>>,
    /// WebSocket handshakes pass, and their sessions' idle limit (None: no limit).
    pub websocket: bool,
    pub websocket_idle: Option<std::time::Duration>,
    /// Idle time after which an event stream gets a `: ping` comment (`sse.rs`).
    pub sse_heartbeat: Option<std::time::Duration>,
    pub ai_fast: Option<Arc<crate::ai_fast::AiFast>>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Matcher)>,
    query: Vec<(String, Matcher)>,
    rewrite: Option<Vec<RewritePart>>,
    rewrite_src: Option<String>,
    strip_prefix: bool,
}

impl Route {
    fn predicate_count(&self) -> usize {
        self.methods.len().min(1) + self.headers.len() + self.query.len()
    }

    fn matches(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        for (name, m) in &self.headers {
            if !headers.get_all(name).iter().any(|v| m.matches(v.as_bytes())) {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = query.unwrap_or("");
            for (name, m) in &self.query {
                let hit = form_urlencoded::parse(q.as_bytes())
                    .any(|(k, v)| k == name.as_str() && m.matches(v.as_bytes()));
                if !hit {
                    return false;
                }
            }
        }
        true
    }
}

/// A route on one pattern. In the prefix tree, `tail` names the catch-all parameter of a
/// `/base/{*name}` path (which needs a non-empty rest); `/base/*` paths have none.
struct Entry {
    route: Arc<Route>,
    tail: Option<String>,
    /// The path as the config wrote it (`/users/{id}`, `/api/*`): the span's `http.route`.
    path: Arc<str>,
}

/// One radix tree of patterns; each leaf holds the routes sharing a pattern.
#[derive(Default)]
struct Tree {
    tree: matchit::Router<usize>,
    leaves: Vec<Vec<Entry>>,
    patterns: Vec<String>,
    by_pattern: HashMap<String, usize>,
}

impl Tree {
    fn insert(&mut self, pattern: &str, entry: Entry) -> Result<(), String> {
        if let Some(&leaf) = self.by_pattern.get(pattern) {
            self.leaves[leaf].push(entry);
            return Ok(());
        }
        let leaf = self.leaves.len();
        self.tree.insert(pattern, leaf).map_err(|e| {
            let other = match &e {
                matchit::InsertError::Conflict { with } => self
                    .by_pattern
                    .get(with.as_str())
                    .and_then(|&l| self.leaves[l].first())
                    .map(|e| format!(" (route '{}')", e.route.name))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            format!("path '{pattern}' cannot be added: {e}{other}")
        })?;
        self.leaves.push(vec![entry]);
        self.patterns.push(pattern.to_string());
        self.by_pattern.insert(pattern.to_string(), leaf);
        Ok(())
    }

    fn sort(&mut self) {
        for leaf in &mut self.leaves {
            leaf.sort_by(|a, b| {
                let (a, b) = (&a.route, &b.route);
                b.priority
                    .cmp(&a.priority)
                    .then(b.predicate_count().cmp(&a.predicate_count()))
                    .then(a.index.cmp(&b.index))
            });
        }
    }

    fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The first entry on `probe` that `accept`s and whose predicates match.
    fn find<'t, 'p>(
        &'t self,
        probe: &'p str,
        req: &RequestHead<'_>,
        accept: impl Fn(&Entry) -> bool,
    ) -> Option<(&'t Entry, matchit::Params<'t, 'p>)> {
        let m = self.tree.at(probe).ok()?;
        let entry = self.leaves[*m.value]
            .iter()
            .find(|e| accept(e) && e.route.matches(req.method, req.headers, req.query))?;
        Some((entry, m.params))
    }
}

/// The routes of one host tier. Exact patterns (static and `{param}`) live in one tree;
/// prefix patterns (`/base/*`, `/base/{*rest}`) in another, probed at each `/` of the path
/// from the longest prefix down. So a prefix never conflicts with a parameter at its depth,
/// and the most specific route wins: exact, then the longest prefix.
#[derive(Default)]
struct PathTable {
    exact: Tree,
    prefix: Tree,
}

impl PathTable {
    fn sort(&mut self) {
        self.exact.sort();
        self.prefix.sort();
    }

    fn lookup<'a>(&'a self, req: &RequestHead<'_>) -> Option<RouteMatch<'a>> {
        let path = req.path;
        if !self.exact.is_empty() {
            if let Some((e, params)) = self.exact.find(path, req, |_| true) {
                let upstream_path = rewrite_path(&e.route, &params, path, None);
                return Some(RouteMatch {
                    route: &e.route,
                    upstream_path,
                    pattern: &e.path,
                });
            }
        }
        if self.prefix.is_empty() {
            return None;
        }
        let mut end = path.len();
        loop {
            let probe = if end == 0 { "/" } else { &path[..end] };
            // `{*rest}` needs something after the prefix's slash.
            let accept = |e: &Entry| e.tail.is_none() || path.len() > end + 1;
            if let Some((e, params)) = self.prefix.find(probe, req, accept) {
                let tail = e
                    .tail
                    .as_deref()
                    .map(|name| (name, &path[(end + 1).min(path.len())..]));
                let upstream_path = rewrite_path(&e.route, &params, path, Some((end, tail)));
                return Some(RouteMatch {
                    route: &e.route,
                    upstream_path,
                    pattern: &e.path,
                });
            }
            if end == 0 {
                return None;
            }
            end = path[..end].rfind('/').unwrap_or(0);
        }
    }
}

/// What the router needs to know about a request.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

pub struct RouteMatch<'a> {
    pub route: &'a Arc<Route>,
    /// The path to send upstream when it differs from the request's (rewrite, strip).
    pub upstream_path: Option<String>,
    /// The route's path pattern that matched, as configured.
    pub pattern: &'a Arc<str>,
}

/// `prefix` is the matched prefix length and, for `{*name}` paths, the tail parameter.
fn rewrite_path(
    route: &Route,
    params: &matchit::Params<'_, '_>,
    path: &str,
    prefix: Option<(usize, Option<(&str, &str)>)>,
) -> Option<String> {
    if let Some(parts) = &route.rewrite {
        let tail = prefix.and_then(|p| p.1);
        let mut out = String::with_capacity(path.len() + 16);
        for part in parts {
            match part {
                RewritePart::Literal(s) => out.push_str(s),
                RewritePart::Param(p) => match tail {
                    Some((name, value)) if name == p => out.push_str(value),
                    _ => out.push_str(params.get(p).unwrap_or("")),
                },
            }
        }
        return Some(out);
    }
    match prefix {
        Some((n, _)) if route.strip_prefix => {
            let rest = &path[n.min(path.len())..];
            Some(if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            })
        }
        _ => None,
    }
}

/// The compiled route table of one config.
#[derive(Default)]
pub struct Router {
    exact: HashMap<String, PathTable>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<String, PathTable>,
    any: PathTable,
}

/// One row of the compiled table, for `ferrogate routes`.
#[derive(Debug, Clone)]
pub struct TableRow {
    pub host: String,
    pub path: String,
    pub route: String,
    pub methods: Vec<String>,
    pub predicates: Vec<String>,
    pub priority: i64,
    pub upstream: String,
    pub rewrite: Option<String>,
}

impl Router {
    /// Compile the routes of `config`; `upstream_index` resolves an upstream name.
    pub fn build(
        config: &GatewayConfig,
        upstream_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Router, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut router = Router::default();
        for (i, rc) in config.routes.iter().enumerate() {
            match compile_route(i, rc, upstream_index) {
                Ok(route) => {
                    let route = Arc::new(route);
                    router.add(i, rc, &route, &mut problems);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        router.any.sort();
        router.exact.values_mut().for_each(PathTable::sort);
        router.wildcard.values_mut().for_each(PathTable::sort);
        Ok(router)
    }

    fn add(&mut self, i: usize, rc: &RouteConfig, route: &Arc<Route>, problems: &mut Vec<ConfigProblem>) {
        if rc.hosts.is_empty() {
            for (p, path) in rc.paths.iter().enumerate() {
                insert_path(&mut self.any, i, p, path, route, problems);
            }
            return;
        }
        for (h, host) in rc.hosts.iter().enumerate() {
            let host = host.to_ascii_lowercase();
            let table = match host.strip_prefix('*') {
                Some(suffix) if suffix.len() >= 2 && suffix.starts_with('.') && !suffix.contains('*') => {
                    self.wildcard.entry(suffix.to_string()).or_default()
                }
                None if !host.contains('*') && !host.is_empty() => self.exact.entry(host).or_default(),
                _ => {
                    problems.push(ConfigProblem::new(
                        format!("routes[{i}].hosts[{h}]"),
                        "a host is a name like 'api.example.com' or a wildcard like '*.example.com'",
                    ));
                    continue;
                }
            };
            for (p, path) in rc.paths.iter().enumerate() {
                insert_path(table, i, p, path, route, problems);
            }
        }
    }

    /// The route for a request, by the precedence in docs/config.md.
    pub fn lookup<'a>(&'a self, req: &RequestHead<'_>) -> Option<RouteMatch<'a>> {
        if !self.exact.is_empty() || !self.wildcard.is_empty() {
            if let Some(host) = req.host {
                let host = normalize_host(host);
                if let Some(m) = self.exact.get(host.as_ref()).and_then(|t| t.lookup(req)) {
                    return Some(m);
                }
                if !self.wildcard.is_empty() {
                    let mut rest: &str = host.as_ref();
                    while let Some(dot) = rest.find('.') {
                        rest = &rest[dot..];
                        if let Some(m) = self.wildcard.get(rest).and_then(|t| t.lookup(req)) {
                            return Some(m);
                        }
                        rest = &rest[1..];
                    }
                }
            }
        }
        self.any.lookup(req)
    }

    /// The table in precedence order: exact hosts (sorted), wildcard hosts (longest
    /// first), then any host; within a host, patterns sorted, candidates in match order.
    pub fn table(&self) -> Vec<TableRow> {
        let mut rows = Vec::new();
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let mut wild: Vec<_> = self.wildcard.iter().collect();
        wild.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        let tiers = exact
            .into_iter()
            .map(|(h, t)| (h.clone(), t))
            .chain(wild.into_iter().map(|(h, t)| (format!("*{h}"), t)))
            .chain(std::iter::once(("*".to_string(), &self.any)));
        for (host, table) in tiers {
            let mut exact: Vec<(&Entry, String, (u8, usize))> = Vec::new();
            for (p, leaf) in table.exact.patterns.iter().zip(&table.exact.leaves) {
                exact.extend(leaf.iter().map(|e| (e, p.clone(), pattern_rank(p))));
            }
            // Longest prefix first; at one prefix `{*rest}` and `/*` keep their match order.
            let mut prefix: Vec<(&Entry, String, (u8, usize))> = Vec::new();
            for (p, leaf) in table.prefix.patterns.iter().zip(&table.prefix.leaves) {
                let base = p.trim_end_matches('/');
                prefix.extend(leaf.iter().map(|e| {
                    let shown = match &e.tail {
                        Some(name) => format!("{base}/{{*{name}}}"),
                        None => format!("{base}/*"),
                    };
                    (e, shown, (2, usize::MAX - p.len()))
                }));
            }
            exact.sort_by(|a, b| a.2.cmp(&b.2).then(a.1.cmp(&b.1)));
            prefix.sort_by_key(|a| a.2);
            for (entry, pattern, rank) in exact.into_iter().chain(prefix) {
                let r = &entry.route;
                let mut predicates: Vec<String> = r
                    .headers
                    .iter()
                    .map(|(n, m)| format!("header {n}{}", m.describe()))
                    .collect();
                predicates.extend(r.query.iter().map(|(n, m)| format!("query {n}{}", m.describe())));
                rows.push(TableRow {
                    host: host.clone(),
                    path: pattern,
                    route: r.name.clone(),
                    methods: r.methods.iter().map(|m| m.to_string()).collect(),
                    predicates,
                    priority: r.priority,
                    upstream: r.upstream_name.clone(),
                    rewrite: r.rewrite_src.clone().or_else(|| {
                        (r.strip_prefix && rank.0 == 2 && entry.tail.is_none())
                            .then(|| "strip prefix".to_string())
                    }),
                });
            }
        }
        rows
    }
}

/// Static patterns sort before parameterized ones.
fn pattern_rank(p: &str) -> (u8, usize) {
    (u8::from(p.contains('{')), usize::MAX - p.len())
}

fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = match host.rfind(':') {
        // keep IPv6 literals such as [::1] intact
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

fn insert_path(
    table: &mut PathTable,
    i: usize,
    p: usize,
    path: &str,
    route: &Arc<Route>,
    problems: &mut Vec<ConfigProblem>,
) {
    let at = format!("routes[{i}].paths[{p}]");
    if !path.starts_with('/') {
        problems.push(ConfigProblem::new(at, "a path must start with '/'"));
        return;
    }
    // `/base/*` and `/base/{*name}` go to the prefix tree under `base` ("/" for the root).
    let catch_all = path
        .rfind("/{*")
        .filter(|&i| path.ends_with('}') && !path[i + 3..].contains('/'));
    let (tree, pattern, tail) = if let Some(base) = path.strip_suffix("/*") {
        (&mut table.prefix, base, None)
    } else if let Some(i) = catch_all {
        let name = &path[i + 3..path.len() - 1];
        (&mut table.prefix, &path[..i], Some(name.to_string()))
    } else {
        (&mut table.exact, path, None)
    };
    if pattern.contains('*')
        || tail
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.contains(['{', '}', '*']))
    {
        problems.push(ConfigProblem::new(
            at,
            "'*' may only end a path, as in '/api/*' or '/files/{*rest}'",
        ));
        return;
    }
    let pattern = if pattern.is_empty() {
        "/".to_string()
    } else {
        pattern.to_string()
    };
    if let Some(parts) = &route.rewrite {
        for part in parts {
            if let RewritePart::Param(name) = part {
                if !pattern.contains(&format!("{{{name}}}")) && tail.as_deref() != Some(name) {
                    problems.push(ConfigProblem::new(
                        format!("routes[{i}].rewrite"),
                        format!("uses {{{name}}}, which path '{path}' does not define"),
                    ));
                    return;
                }
            }
        }
    }
    if let Err(e) = tree.insert(
        &pattern,
        Entry {
            route: route.clone(),
            tail,
            path: Arc::from(path),
        },
    ) {
        problems.push(ConfigProblem::new(at, e));
    }
}

/// The regex crate's errors draw a caret diagram over several lines; keep the reason.
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    last.trim().trim_start_matches("error: ").to_string()
}

fn compile_matchers(
    kind: &str,
    i: usize,
    preds: &[Predicate],
    problems: &mut Vec<ConfigProblem>,
) -> Vec<(String, Matcher)> {
    let mut out = Vec::new();
    for (j, pr) in preds.iter().enumerate() {
        let at = format!("routes[{i}].{kind}[{j}]");
        match (&pr.value, &pr.regex) {
            (Some(v), None) => out.push((pr.name.clone(), Matcher::Exact(v.clone()))),
            (None, Some(r)) => match Regex::new(r) {
                Ok(re) => out.push((pr.name.clone(), Matcher::Regex(re))),
                Err(e) => problems.push(ConfigProblem::new(
                    format!("{at}.regex"),
                    format!("invalid regex: {}", regex_reason(&e)),
                )),
            },
            _ => problems.push(ConfigProblem::new(at, "give exactly one of 'value' or 'regex'")),
        }
    }
    out
}

fn compile_route(
    i: usize,
    rc: &RouteConfig,
    upstream_index: &dyn Fn(&str) -> Option<usize>,
) -> Result<Route, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let name = if rc.name.is_empty() {
        format!("route-{i}")
    } else {
        rc.name.clone()
    };
    if rc.paths.is_empty() {
        problems.push(ConfigProblem::new(
            format!("routes[{i}].paths"),
            "a route needs at least one path",
        ));
    }
    let upstream = upstream_index(&rc.upstream).unwrap_or_else(|| {
        problems.push(ConfigProblem::new(
            format!("routes[{i}].upstream"),
            format!("unknown upstream '{}'", rc.upstream),
        ));
        0
    });
    let mut methods = Vec::new();
    for (j, m) in rc.methods.iter().enumerate() {
        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => methods.push(m),
            Err(_) => problems.push(ConfigProblem::new(
                format!("routes[{i}].methods[{j}]"),
                "not an HTTP method",
            )),
        }
    }
    let mut headers = Vec::new();
    for (j, (n, m)) in compile_matchers("headers", i, &rc.headers, &mut problems)
        .into_iter()
        .enumerate()
    {
        match HeaderName::from_bytes(n.as_bytes()) {
            Ok(h) => headers.push((h, m)),
            Err(_) => problems.push(ConfigProblem::new(
                format!("routes[{i}].headers[{j}].name"),
                format!("'{n}' is not a valid header name"),
            )),
        }
    }
    let query = compile_matchers("query", i, &rc.query, &mut problems);
    let rewrite = rc.rewrite.as_deref().map(|t| parse_rewrite(t, i, &mut problems));
    let split = match Split::compile(
        &format!("routes[{i}]"),
        upstream,
        &rc.versions,
        rc.split.as_ref(),
        upstream_index,
    ) {
        Ok(s) => s,
        Err(mut p) => {
            problems.append(&mut p);
            None
        }
    };
    let mirror = rc.mirror.as_ref().and_then(|m| {
        Mirror::compile(&format!("routes[{i}]"), m, upstream_index)
            .map_err(|p| problems.push(p))
            .ok()
    });
    let mut rate_limits = Vec::new();
    for (j, l) in rc.rate_limits.iter().enumerate() {
        match Limit::compile(l, &format!("routes[{i}].rate_limits[{j}]")) {
            Ok(l) => rate_limits.push(l),
            Err(p) => problems.push(p),
        }
    }
    let retries = match &rc.retries {
        Some(r) => match crate::retry::RetryPolicy::compile(r, &format!("routes[{i}].retries")) {
            Ok(p) => Some(Arc::new(p)),
            Err(p) => {
                problems.push(p);
                None
            }
        },
        None => None,
    };
    let ip_restriction = rc.ip_restriction.as_ref().and_then(|c| {
        crate::ip_restriction::IpRules::compile(c, &format!("routes[{i}].ip_restriction"))
            .map_err(|mut p| problems.append(&mut p))
            .ok()
    });
    let cache = rc.cache.as_ref().and_then(|c| {
        crate::cache::RouteCache::compile(c, &format!("routes[{i}].cache"))
            .map_err(|mut p| problems.append(&mut p))
            .ok()
            .map(Arc::new)
    });
    let ai_fast = rc.ai_fast.as_ref().and_then(|c| {
        let at = format!("routes[{i}].ai_fast");
        crate::ai_fast::AiFast::compile(c, &name, &at, upstream_index)
            .map_err(|m| problems.push(ConfigProblem::new(&at, m)))
            .ok()
            .map(Arc::new)
    });
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Route {
        ai_fast,
        ip_restriction,
        timeouts: rc
            .timeouts
            .as_ref()
            .map(crate::upstream::RouteTimeoutSet::from_config)
            .unwrap_or_default(),
        retries,
        name,
        index: i,
        upstream,
        upstream_name: rc.upstream.clone(),
        preserve_host: rc.preserve_host,
        priority: rc.priority,
        plugins: rc.plugins.clone(),
        rate_limits,
        split,
        mirror,
        methods,
        headers,
        query,
        rewrite,
        rewrite_src: rc.rewrite.clone(),
        strip_prefix: rc.strip_prefix,
        client_cert_required: rc.client_cert.as_deref() == Some("required"),
        cache,
        websocket: rc.websocket,
        websocket_idle: (rc.websocket_idle > 0.0).then(|| crate::upstream::secs(rc.websocket_idle)),
        sse_heartbeat: (rc.sse_heartbeat > 0.0).then(|| crate::upstream::secs(rc.sse_heartbeat)),
    })
}

fn parse_rewrite(t: &str, i: usize, problems: &mut Vec<ConfigProblem>) -> Vec<RewritePart> {
    let at = format!("routes[{i}].rewrite");
    if !t.starts_with('/') {
        problems.push(ConfigProblem::new(&at, "a rewrite must start with '/'"));
    }
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(RewritePart::Literal(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            problems.push(ConfigProblem::new(&at, "unclosed '{'"));
            return parts;
        };
        let name = rest[open + 1..open + close].trim_start_matches('*');
        if name.is_empty() {
            problems.push(ConfigProblem::new(&at, "empty '{}' parameter"));
        }
        parts.push(RewritePart::Param(name.to_string()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(RewritePart::Literal(rest.to_string()));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn router(yaml_json: serde_json::Value) -> Router {
        let cfg: GatewayConfig = serde_json::from_value(yaml_json).unwrap();
        let names: Vec<String> = cfg.upstreams.keys().cloned().collect();
        Router::build(&cfg, &|n| names.iter().position(|x| x == n)).unwrap()
    }

    fn problems(v: serde_json::Value) -> Vec<ConfigProblem> {
        let cfg: GatewayConfig = serde_json::from_value(v).unwrap();
        let names: Vec<String> = cfg.upstreams.keys().cloned().collect();
        match Router::build(&cfg, &|n| names.iter().position(|x| x == n)) {
            Ok(_) => vec![],
            Err(p) => p,
        }
    }

    fn up() -> serde_json::Value {
        serde_json::json!({"u": {"targets": [{"address": "127.0.0.1:1"}]}})
    }

    struct Req {
        method: Method,
        host: Option<String>,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
    }

    fn req(method: &str, host: Option<&str>, uri: &str) -> Req {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (uri.to_string(), None),
        };
        Req {
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            host: host.map(str::to_string),
            path,
            query,
            headers: HeaderMap::new(),
        }
    }

    fn hit(r: &Router, q: &Req) -> Option<(String, Option<String>)> {
        let head = RequestHead {
            method: &q.method,
            host: q.host.as_deref(),
            path: &q.path,
            query: q.query.as_deref(),
            headers: &q.headers,
        };
        r.lookup(&head).map(|m| (m.route.name.clone(), m.upstream_path))
    }

    fn name(r: &Router, q: &Req) -> Option<String> {
        hit(r, q).map(|h| h.0)
    }

    #[test]
    fn static_beats_param_beats_catch_all() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "all", "paths": ["/users/*"], "upstream": "u"},
            {"name": "param", "paths": ["/users/{id}/profile"], "upstream": "u"},
            {"name": "static", "paths": ["/users/me/profile"], "upstream": "u"},
        ]}));
        assert_eq!(
            name(&r, &req("GET", None, "/users/me/profile")).as_deref(),
            Some("static")
        );
        assert_eq!(
            name(&r, &req("GET", None, "/users/7/profile")).as_deref(),
            Some("param")
        );
        assert_eq!(
            name(&r, &req("GET", None, "/users/7/other")).as_deref(),
            Some("all")
        );
        assert_eq!(name(&r, &req("GET", None, "/users")).as_deref(), Some("all"));
        assert_eq!(name(&r, &req("GET", None, "/users/")).as_deref(), Some("all"));
        assert_eq!(name(&r, &req("GET", None, "/usersx")), None);
    }

    #[test]
    fn named_catch_all_sits_beside_a_param_and_needs_a_rest() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "rest", "paths": ["/u/{*rest}"], "rewrite": "/files/{rest}", "upstream": "u"},
            {"name": "id", "paths": ["/u/{id}"], "upstream": "u"},
            {"name": "me", "paths": ["/u/me"], "upstream": "u"},
        ]}));
        let h = |u: &str| hit(&r, &req("GET", None, u));
        assert_eq!(h("/u/me").unwrap().0, "me");
        assert_eq!(h("/u/7").unwrap().0, "id");
        assert_eq!(
            h("/u/7/x/y").unwrap(),
            ("rest".to_string(), Some("/files/7/x/y".to_string()))
        );
        assert_eq!(h("/u/"), None);
        assert_eq!(h("/u"), None);
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "any", "paths": ["/*"], "upstream": "u"},
            {"name": "wild", "paths": ["/*"], "hosts": ["*.example.com"], "upstream": "u"},
            {"name": "deeper", "paths": ["/*"], "hosts": ["*.api.example.com"], "upstream": "u"},
            {"name": "exact", "paths": ["/*"], "hosts": ["www.example.com"], "upstream": "u"},
        ]}));
        assert_eq!(
            name(&r, &req("GET", Some("www.example.com"), "/")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            name(&r, &req("GET", Some("WWW.Example.com:8080"), "/")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            name(&r, &req("GET", Some("a.example.com"), "/")).as_deref(),
            Some("wild")
        );
        assert_eq!(
            name(&r, &req("GET", Some("v1.api.example.com"), "/")).as_deref(),
            Some("deeper")
        );
        assert_eq!(
            name(&r, &req("GET", Some("example.com"), "/")).as_deref(),
            Some("any")
        );
        assert_eq!(name(&r, &req("GET", None, "/x")).as_deref(), Some("any"));
    }

    #[test]
    fn host_tier_falls_through_when_its_routes_do_not_match() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "any", "paths": ["/*"], "upstream": "u"},
            {"name": "exact", "paths": ["/only"], "hosts": ["a.test"], "upstream": "u"},
        ]}));
        assert_eq!(
            name(&r, &req("GET", Some("a.test"), "/only")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            name(&r, &req("GET", Some("a.test"), "/other")).as_deref(),
            Some("any")
        );
    }

    #[test]
    fn methods_headers_and_query_filter_candidates_in_precedence_order() {
        let mut r_req = req("GET", None, "/x?debug=1&a=b%20c");
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "plain", "paths": ["/x"], "upstream": "u"},
            {"name": "post", "paths": ["/x"], "methods": ["post"], "upstream": "u"},
            {"name": "hdr", "paths": ["/x"], "headers": [{"name": "X-Env", "value": "prod"}], "upstream": "u"},
            {"name": "re", "paths": ["/x"], "headers": [{"name": "x-ver", "regex": "^v[12]$"}], "upstream": "u"},
            {"name": "q", "paths": ["/x"], "query": [{"name": "a", "value": "b c"}], "upstream": "u"},
            {"name": "prio", "paths": ["/x"], "query": [{"name": "debug", "value": "2"}], "priority": 5, "upstream": "u"},
        ]}));
        assert_eq!(name(&r, &r_req).as_deref(), Some("q"));
        r_req.query = None;
        assert_eq!(name(&r, &r_req).as_deref(), Some("plain"));
        r_req.headers.insert("x-env", HeaderValue::from_static("prod"));
        assert_eq!(name(&r, &r_req).as_deref(), Some("hdr"));
        r_req.headers.clear();
        r_req.headers.insert("x-ver", HeaderValue::from_static("v2"));
        assert_eq!(name(&r, &r_req).as_deref(), Some("re"));
        r_req.headers.insert("x-ver", HeaderValue::from_static("v3"));
        assert_eq!(name(&r, &r_req).as_deref(), Some("plain"));
        r_req.query = Some("debug=2".into());
        assert_eq!(name(&r, &r_req).as_deref(), Some("prio"));
        assert_eq!(name(&r, &req("POST", None, "/x")).as_deref(), Some("post"));
    }

    #[test]
    fn strip_prefix_and_rewrite_compute_the_upstream_path() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "strip", "paths": ["/api/*"], "strip_prefix": true, "upstream": "u"},
            {"name": "rw", "paths": ["/users/{id}/posts/{post}"], "rewrite": "/v2/u/{id}/p/{post}", "upstream": "u"},
            {"name": "tail", "paths": ["/files/{*rest}"], "rewrite": "/store/{rest}", "upstream": "u"},
        ]}));
        let h = |u: &str| hit(&r, &req("GET", None, u)).unwrap().1;
        assert_eq!(h("/api/a/b").as_deref(), Some("/a/b"));
        assert_eq!(h("/api").as_deref(), Some("/"));
        assert_eq!(h("/api/").as_deref(), Some("/"));
        assert_eq!(h("/users/7/posts/9").as_deref(), Some("/v2/u/7/p/9"));
        assert_eq!(h("/files/a/b.txt").as_deref(), Some("/store/a/b.txt"));
    }

    #[test]
    fn catch_all_prefix_at_root_matches_everything() {
        let r = router(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "root", "paths": ["/*"], "upstream": "u"}]}));
        for p in ["/", "/a", "/a/b/c", "/16k"] {
            assert_eq!(name(&r, &req("GET", None, p)).as_deref(), Some("root"), "{p}");
        }
    }

    #[test]
    fn problems_name_the_route_and_field() {
        let p = problems(serde_json::json!({"upstreams": up(), "routes": [
            {"paths": ["/a/{x}"], "upstream": "u"},
            {"paths": ["/a/{y}"], "upstream": "missing",
             "headers": [{"name": "x", "regex": "("}], "methods": ["GE T"]},
            {"paths": ["nope"], "rewrite": "/v/{id}", "upstream": "u"},
        ]}));
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"routes[1].upstream"), "{p:?}");
        assert!(paths.contains(&"routes[1].headers[0].regex"), "{p:?}");
        assert!(paths.contains(&"routes[1].methods[0]"), "{p:?}");
        assert!(paths.contains(&"routes[2].paths[0]"), "{p:?}");
        let conflict = problems(serde_json::json!({"upstreams": up(), "routes": [
            {"name": "first", "paths": ["/a/{x}"], "upstream": "u"},
            {"paths": ["/a/{y}"], "upstream": "u"}]}));
        assert_eq!(conflict.len(), 1);
        assert_eq!(conflict[0].path, "routes[1].paths[0]");
        assert!(conflict[0].message.contains("first"), "{:?}", conflict[0]);
    }

    #[test]
    fn lookup_with_many_routes_finds_each() {
        let routes: Vec<_> = (0..2000)
            .map(|i| serde_json::json!({"name": format!("r{i}"), "paths": [format!("/svc{i}/users/{{id}}")], "upstream": "u"}))
            .collect();
        let r = router(serde_json::json!({"upstreams": up(), "routes": routes}));
        assert_eq!(
            name(&r, &req("GET", None, "/svc1999/users/5")).as_deref(),
            Some("r1999")
        );
        assert_eq!(
            name(&r, &req("GET", None, "/svc0/users/5")).as_deref(),
            Some("r0")
        );
        assert_eq!(r.table().len(), 2000);
    }
}
