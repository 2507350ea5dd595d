//! Prometheus metrics of one worker, published to the master (which sums every worker's).
//!
//! Each finished request adds to counters in this worker's memory. Every
//! `publish_interval` a task writes the cumulative snapshot, as JSON, beside the runtime
//! file (`<stem>.metrics.<worker>.json`, replaced atomically); the master
//! (`python/ferrogate/metrics_export.py`) reads every worker's snapshot on each scrape and
//! renders the sum. Counters only grow while the process lives; the master keeps the
//! last snapshot of a worker that exited, so sums never go back.
//!
//! Labels are bounded by the config, never by traffic: routes are the config's (plus
//! "(none)" for requests no route matched), methods the standard ones (else "OTHER"),
//! status classes five, consumers at most `max_consumers` per worker (then "other"). Only
//! series that counted something are in a snapshot, so quiet routes cost nothing.
//!
//! Counting takes one lock per request: the worker runs one current-thread runtime, so it
//! is never contended, and one uncontended lock is cheaper than the ten atomic additions a
//! request makes.

use crate::config::MetricsConfig;
use crate::engine::Engine;
use crate::health::{now_ns, BreakerMode, TargetHealth};
use crate::observe::{ObserveEnv, RateOutcome, RequestRecord};
use crate::server::log_event;
use http::Method;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// ---- connections -------------------------------------------------------------------------

/// Open client connections of this process. Counted whether or not metrics are on: one
/// atomic addition per connection is nothing, and a reload that turns metrics on then
/// reports the right number.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Held by a connection's task for as long as the connection is open.
pub struct ConnectionGuard(());

/// A client connection was accepted; it counts as active until the guard is dropped.
pub fn connection_opened() -> ConnectionGuard {
    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    ConnectionGuard(())
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn connections_active() -> u64 {
    CONNECTIONS.load(Ordering::Relaxed)
}

// ---- label values ------------------------------------------------------------------------

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
/// The route label of requests no route matched.
pub const NO_ROUTE: &str = "(none)";
/// The consumer label of requests without a consumer, and of consumers over the cap.
pub const NO_CONSUMER: &str = "(none)";
pub const OTHER_CONSUMER: &str = "other";

fn method_index(m: &Method) -> u8 {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

fn class_index(status: u16) -> u8 {
    match status {
        100..=599 => (status / 100 - 1) as u8,
        _ => 5,
    }
}

/// Consumer slot of a request series: an index into the interned names, or one of these.
const UNLABELLED: u32 = u32::MAX;
const ANONYMOUS: u32 = u32::MAX - 1;
const OTHER: u32 = u32::MAX - 2;

// ---- histograms --------------------------------------------------------------------------

/// Counts per bucket (not cumulative; the last is above every bound) and the sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Prometheus buckets hold values up to and including their bound.
    pub fn observe(&mut self, bounds: &[f64], value: f64) {
        let i = bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The same observations over other bucket bounds. A new bucket gets what the old
    /// buckets up to its bound held (a lower bound of the truth), so every cumulative
    /// bucket only grows from here on; count and sum stay exact. The master applies the
    /// same rule to snapshots with old bounds, so both agree while a reload spreads.
    pub fn rebucket(&self, old: &[f64], new: &[f64]) -> Histogram {
        let mut cumulative = Vec::with_capacity(old.len());
        let mut running = 0;
        for c in &self.counts[..old.len()] {
            running += c;
            cumulative.push(running);
        }
        let mut counts = Vec::with_capacity(new.len() + 1);
        let mut previous = 0;
        for bound in new {
            let covered = old.partition_point(|b| b <= bound);
            let at = if covered == 0 { 0 } else { cumulative[covered - 1] };
            counts.push(at - previous);
            previous = at;
        }
        counts.push(self.count() - previous);
        Histogram {
            counts,
            sum: self.sum,
        }
    }
}

// ---- counts ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RouteCounts {
    /// (method, status class, consumer slot) -> requests.
    requests: HashMap<(u8, u8, u32), u64>,
    duration: Histogram,
    upstream: Histogram,
    request_bytes: u64,
    response_bytes: u64,
    rate_limited: u64,
    /// The gateway's own errors by code (a handful of codes at most).
    errors: Vec<(&'static str, u64)>,
}

impl RouteCounts {
    fn new(bounds: &[f64]) -> Self {
        RouteCounts {
            requests: HashMap::new(),
            duration: Histogram::new(bounds),
            upstream: Histogram::new(bounds),
            request_bytes: 0,
            response_bytes: 0,
            rate_limited: 0,
            errors: Vec::new(),
        }
    }
}

/// Everything this worker counted since it started. Outlives config reloads.
#[derive(Debug, Clone)]
struct Counts {
    bounds: Vec<f64>,
    routes: HashMap<Arc<str>, RouteCounts>,
    consumer_slots: HashMap<Box<str>, u32>,
    consumers: Vec<Box<str>>,
    /// Something was counted since the last snapshot.
    changed: bool,
    /// Snapshots taken so far.
    sequence: u64,
}

impl Counts {
    fn new(bounds: &[f64]) -> Self {
        Counts {
            bounds: bounds.to_vec(),
            routes: HashMap::new(),
            consumer_slots: HashMap::new(),
            consumers: Vec::new(),
            changed: true,
            sequence: 0,
        }
    }

    fn consumer_slot(&mut self, config: &MetricsConfig, consumer: Option<&str>) -> u32 {
        if !config.consumer_labels {
            return UNLABELLED;
        }
        let Some(name) = consumer else {
            return ANONYMOUS;
        };
        if let Some(&slot) = self.consumer_slots.get(name) {
            return slot;
        }
        if self.consumers.len() >= config.max_consumers {
            return OTHER;
        }
        let slot = self.consumers.len() as u32;
        self.consumers.push(name.into());
        self.consumer_slots.insert(name.into(), slot);
        slot
    }

    fn add(&mut self, config: &MetricsConfig, rec: &RequestRecord) {
        let consumer = self.consumer_slot(config, rec.consumer.as_deref());
        let name = rec.route_name();
        let bounds = &self.bounds;
        let route = match self.routes.get_mut(name) {
            Some(r) => r,
            None => self
                .routes
                .entry(Arc::from(name))
                .or_insert_with(|| RouteCounts::new(bounds)),
        };
        *route
            .requests
            .entry((method_index(&rec.method), class_index(rec.status), consumer))
            .or_insert(0) += 1;
        route.duration.observe(bounds, rec.duration.as_secs_f64());
        if let Some(t) = rec.upstream_time {
            route.upstream.observe(bounds, t.as_secs_f64());
        }
        route.request_bytes += rec.bytes_in;
        route.response_bytes += rec.bytes_out;
        if rec.rate_limit == Some(RateOutcome::Limited) {
            route.rate_limited += 1;
        }
        if let Some(code) = rec.error {
            match route.errors.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => route.errors.push((code, 1)),
            }
        }
        self.changed = true;
    }

    /// Switch to new bucket bounds, carrying the histograms over (see [`Histogram::rebucket`]).
    fn rebucket(&mut self, bounds: &[f64]) {
        if self.bounds == bounds {
            return;
        }
        for r in self.routes.values_mut() {
            r.duration = r.duration.rebucket(&self.bounds, bounds);
            r.upstream = r.upstream.rebucket(&self.bounds, bounds);
        }
        self.bounds = bounds.to_vec();
        self.changed = true;
    }
}

// ---- snapshots ---------------------------------------------------------------------------

/// A snapshot on its way to the file.
struct Pending {
    counts: Counts,
    connections: u64,
    targets: Vec<TargetView>,
}

/// What the master reads (`metrics_export.py` documents the format for its side).
#[derive(Serialize)]
struct Snapshot<'a> {
    pid: u32,
    worker: usize,
    buckets: &'a [f64],
    routes: HashMap<&'a str, RouteSnapshot<'a>>,
    connections: u64,
    /// [upstream, target, in rotation, breaker mode or null]
    targets: &'a [TargetView],
    access_log_dropped: u64,
}

#[derive(Serialize)]
struct RouteSnapshot<'a> {
    /// [method, status class, consumer (null: consumer labels off), count]
    requests: Vec<(&'static str, &'static str, Option<&'a str>, u64)>,
    /// [per-bucket counts, sum]
    duration: (&'a [u64], f64),
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<(&'a [u64], f64)>,
    request_bytes: u64,
    response_bytes: u64,
    rate_limited: u64,
    errors: HashMap<&'static str, u64>,
}

type TargetView = (String, String, bool, Option<&'static str>);

fn consumer_label(counts: &Counts, slot: u32) -> Option<&str> {
    match slot {
        UNLABELLED => None,
        ANONYMOUS => Some(NO_CONSUMER),
        OTHER => Some(OTHER_CONSUMER),
        i => Some(&counts.consumers[i as usize]),
    }
}

fn render(counts: &Counts, worker: usize, connections: u64, targets: &[TargetView]) -> String {
    let routes = counts
        .routes
        .iter()
        .map(|(name, r)| {
            let requests = r
                .requests
                .iter()
                .map(|(&(m, c, consumer), &n)| {
                    (
                        METHODS[m as usize],
                        CLASSES[c as usize],
                        consumer_label(counts, consumer),
                        n,
                    )
                })
                .collect();
            let label: &str = if name.is_empty() { NO_ROUTE } else { name };
            let snapshot = RouteSnapshot {
                requests,
                duration: (&r.duration.counts, r.duration.sum),
                upstream: (r.upstream.count() > 0).then_some((&r.upstream.counts[..], r.upstream.sum)),
                request_bytes: r.request_bytes,
                response_bytes: r.response_bytes,
                rate_limited: r.rate_limited,
                errors: r.errors.iter().copied().collect(),
            };
            (label, snapshot)
        })
        .collect();
    let snapshot = Snapshot {
        pid: std::process::id(),
        worker,
        buckets: &counts.bounds,
        routes,
        connections,
        targets,
        access_log_dropped: crate::access_log::dropped_total(),
    };
    serde_json::to_string(&snapshot).unwrap_or_default()
}

/// Replace `path` in one step: the master reads the old snapshot or the new, never half.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("metrics");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

// ---- the worker's metrics ----------------------------------------------------------------

/// State that lives as long as the worker, whatever reloads change.
struct Shared {
    counts: Mutex<Counts>,
    /// The current engine's targets, for their health.
    targets: Mutex<Vec<Arc<TargetHealth>>>,
    path: PathBuf,
    worker: usize,
    /// The sequence number of the snapshot in the file: a slow write of an older one (the
    /// publishing task's, while the worker stops) never replaces a newer one.
    written: Mutex<u64>,
}

/// The counts of this process by snapshot file, kept when a reload turns metrics off: if a
/// later one turns them on again, they continue (starting from zero would make the master's
/// sum go back).
static KEPT: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// This worker's counts, over `bounds` from now on.
    fn of(env: &ObserveEnv, bounds: &[f64]) -> Arc<Shared> {
        let path = env.beside(&format!(".metrics.{}.json", env.worker_id));
        let mut kept = lock(&KEPT);
        if let Some(shared) = kept.iter().find(|s| s.path == path) {
            lock(&shared.counts).rebucket(bounds);
            return shared.clone();
        }
        let shared = Arc::new(Shared {
            counts: Mutex::new(Counts::new(bounds)),
            targets: Mutex::new(Vec::new()),
            path,
            worker: env.worker_id,
            written: Mutex::new(0),
        });
        kept.push(shared.clone());
        shared
    }

    fn target_views(&self) -> Vec<TargetView> {
        let now = now_ns();
        lock(&self.targets)
            .iter()
            .map(|t| {
                let (up, breaker) = t.view(now);
                (
                    t.upstream.clone(),
                    t.address.clone(),
                    up,
                    breaker.map(BreakerMode::name),
                )
            })
            .collect()
    }

    /// The snapshot when anything changed since `last` (the gauges it saw).
    fn snapshot_if_changed(&self, last: &mut Option<(u64, Vec<TargetView>)>) -> Option<Pending> {
        let gauges = (connections_active(), self.target_views());
        let mut counts = lock(&self.counts);
        if !counts.changed && last.as_ref() == Some(&gauges) {
            return None;
        }
        counts.changed = false;
        counts.sequence += 1;
        let copy = counts.clone();
        drop(counts);
        *last = Some(gauges.clone());
        Some(Pending {
            counts: copy,
            connections: gauges.0,
            targets: gauges.1,
        })
    }

    fn write(&self, p: &Pending) -> std::io::Result<()> {
        let text = render(&p.counts, self.worker, p.connections, &p.targets);
        let mut written = lock(&self.written);
        if p.counts.sequence < *written {
            return Ok(());
        }
        write_atomic(&self.path, &text)?;
        *written = p.counts.sequence;
        Ok(())
    }

    fn write_now(&self) -> std::io::Result<()> {
        let targets = self.target_views();
        let counts = {
            let mut counts = lock(&self.counts);
            counts.sequence += 1;
            counts.clone()
        };
        self.write(&Pending {
            counts,
            connections: connections_active(),
            targets,
        })
    }
}

pub struct Metrics {
    pub config: MetricsConfig,
    shared: Arc<Shared>,
    /// Until this is dropped (when the observers it belongs to are replaced and their last
    /// request is done, the one replacing it publishes the same counts too: no harm).
    publisher: Option<tokio::task::AbortHandle>,
}

impl Metrics {
    /// Counting with `config`; the worker's counts so far carry on (histograms are moved to
    /// new buckets when those changed), whatever `previous` was. Starts the publishing task
    /// when called within a tokio runtime.
    pub fn start(config: &MetricsConfig, previous: Option<&Arc<Metrics>>, env: &ObserveEnv) -> Arc<Metrics> {
        if let Some(p) = previous.filter(|p| &p.config == config) {
            return p.clone();
        }
        let shared = Shared::of(env, &config.latency_buckets);
        let publisher = tokio::runtime::Handle::try_current().ok().map(|rt| {
            // A zero interval would spin; a few per second is plenty for any scraper.
            let every = Duration::from_secs_f64(config.publish_interval.max(0.01));
            rt.spawn(publish(shared.clone(), every)).abort_handle()
        });
        Arc::new(Metrics {
            config: config.clone(),
            shared,
            publisher,
        })
    }

    /// Report the health of `engine`'s targets from now on (after start and each reload).
    pub fn track_targets(&self, engine: &Engine) {
        let targets = engine
            .upstreams
            .iter()
            .flat_map(|u| u.targets.iter().map(|t| t.health.clone()))
            .collect();
        *lock(&self.shared.targets) = targets;
    }

    pub fn observe(&self, rec: &RequestRecord) {
        lock(&self.shared.counts).add(&self.config, rec);
    }
}

impl Drop for Metrics {
    /// The worker is stopping (or metrics were turned off): publish the last counts, so
    /// that the master's sum includes the requests of the final interval.
    fn drop(&mut self) {
        if let Some(task) = &self.publisher {
            task.abort();
            let _ = self.shared.write_now();
        }
    }
}

async fn publish(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(pending) = shared.snapshot_if_changed(&mut last) else {
            continue;
        };
        let writer = shared.clone();
        // Rendering thousands of routes is real work: keep it off the I/O thread.
        let written = tokio::task::spawn_blocking(move || writer.write(&pending)).await;
        match written {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) if !failing => {
                failing = true;
                // Published again at the next change.
                last = None;
                log_event(
                    "error",
                    "metrics_publish_failed",
                    serde_json::json!({"worker": shared.worker, "path": shared.path, "error": e.to_string()}),
                );
            }
            _ => last = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::{Instant, SystemTime};

    fn config(consumer_labels: bool, max_consumers: usize) -> MetricsConfig {
        MetricsConfig {
            consumer_labels,
            max_consumers,
            latency_buckets: vec![0.01, 0.1, 1.0],
            publish_interval: 1.0,
        }
    }

    fn record(method: Method, status: u16, consumer: Option<&str>, ms: u64) -> RequestRecord {
        RequestRecord {
            wall_start: SystemTime::now(),
            started: Instant::now(),
            request_id: HeaderValue::from_static("r"),
            method,
            version: http::Version::HTTP_11,
            path: None,
            query: None,
            host: None,
            user_agent: None,
            client_ip: HeaderValue::from_static("127.0.0.1"),
            route: None,
            consumer: consumer.map(str::to_owned),
            status,
            error: (status == 404).then_some("no_route"),
            bytes_in: 3,
            bytes_out: 5,
            upstream: None,
            upstream_time: (status != 404).then(|| Duration::from_millis(ms / 2)),
            tries: 1,
            rate_limit: None,
            cache: None,
            trace: None,
            capture: None,
            duration: Duration::from_millis(ms),
            completed: true,
        }
    }

    fn parsed(counts: &Counts) -> serde_json::Value {
        serde_json::from_str(&render(counts, 0, 0, &[])).unwrap()
    }

    #[test]
    fn histogram_buckets_hold_values_up_to_their_bound() {
        let bounds = [0.01, 0.1, 1.0];
        let mut h = Histogram::new(&bounds);
        for v in [0.005, 0.01, 0.05, 0.1, 0.5, 2.0] {
            h.observe(&bounds, v);
        }
        assert_eq!(h.counts, vec![2, 2, 1, 1]);
        assert!((h.sum - 2.665).abs() < 1e-9);
    }

    #[test]
    fn rebucketing_keeps_count_and_sum_and_never_overstates_a_bucket() {
        let old = [0.01, 0.1, 1.0];
        let mut h = Histogram::new(&old);
        for v in [0.005, 0.05, 0.05, 0.5, 5.0] {
            h.observe(&old, v);
        }
        let new = [0.05, 0.1, 2.0];
        let r = h.rebucket(&old, &new);
        // cumulative: <=0.05 knows only <=0.01 (1); <=0.1: 3; <=2.0 knows <=1.0: 4
        assert_eq!(r.counts, vec![1, 2, 1, 1]);
        assert_eq!(r.count(), h.count());
        assert_eq!(r.sum, h.sum);
        assert_eq!(h.rebucket(&old, &old), h);
    }

    #[test]
    fn methods_and_classes_are_bounded() {
        assert_eq!(METHODS[method_index(&Method::PATCH) as usize], "PATCH");
        let odd = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(METHODS[method_index(&odd) as usize], "OTHER");
        assert_eq!(CLASSES[class_index(204) as usize], "2xx");
        assert_eq!(CLASSES[class_index(599) as usize], "5xx");
        assert_eq!(CLASSES[class_index(600) as usize], "other");
    }

    #[test]
    fn counts_by_route_method_class_and_capped_consumer() {
        let cfg = config(true, 2);
        let mut counts = Counts::new(&cfg.latency_buckets);
        for user in ["a", "b", "c", "d", "a"] {
            counts.add(&cfg, &record(Method::GET, 200, Some(user), 50));
        }
        counts.add(&cfg, &record(Method::POST, 404, None, 5));
        let snap = parsed(&counts);
        let route = &snap["routes"][NO_ROUTE];
        let mut requests: Vec<(String, String, String, u64)> = route["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().into(),
                    r[1].as_str().unwrap().into(),
                    r[2].as_str().unwrap().into(),
                    r[3].as_u64().unwrap(),
                )
            })
            .collect();
        requests.sort();
        let row = |m: &str, c: &str, who: &str, n| (m.to_string(), c.to_string(), who.to_string(), n);
        assert_eq!(
            requests,
            vec![
                row("GET", "2xx", "a", 2),
                row("GET", "2xx", "b", 1),
                row("GET", "2xx", "other", 2),
                row("POST", "4xx", NO_CONSUMER, 1),
            ]
        );
        assert_eq!(route["duration"][0], serde_json::json!([1, 5, 0, 0]));
        assert_eq!(route["upstream"][0], serde_json::json!([0, 5, 0, 0]));
        assert_eq!(route["request_bytes"], 18);
        assert_eq!(route["response_bytes"], 30);
        assert_eq!(route["errors"]["no_route"], 1);
    }

    #[test]
    fn without_consumer_labels_the_consumer_is_null() {
        let cfg = config(false, 2);
        let mut counts = Counts::new(&cfg.latency_buckets);
        counts.add(&cfg, &record(Method::GET, 503, Some("a"), 1));
        let snap = parsed(&counts);
        let req = &snap["routes"][NO_ROUTE]["requests"][0];
        assert_eq!(req, &serde_json::json!(["GET", "5xx", null, 1]));
        assert!(counts.consumers.is_empty());
    }

    #[test]
    fn a_reload_keeps_counts_and_moves_histograms() {
        let env = ObserveEnv {
            worker_id: 3,
            runtime_path: PathBuf::from("/nonexistent/x.runtime.json"),
        };
        let first = Metrics::start(&config(false, 5), None, &env);
        assert!(first.shared.path.ends_with("x.metrics.3.json"));
        first.observe(&record(Method::GET, 200, None, 50));
        let same = Metrics::start(&config(false, 5), Some(&first), &env);
        assert!(Arc::ptr_eq(&first, &same));
        let mut changed = config(false, 5);
        changed.latency_buckets = vec![0.02, 0.2];
        let second = Metrics::start(&changed, Some(&first), &env);
        second.observe(&record(Method::GET, 200, None, 50));
        {
            let counts = lock(&second.shared.counts);
            let route = &counts.routes[""];
            assert_eq!(route.requests[&(0, 1, UNLABELLED)], 2);
            assert_eq!(route.duration.counts, vec![0, 2, 0]);
            assert_eq!(counts.bounds, vec![0.02, 0.2]);
        }
        // turned off by a reload, on again by the next: the counts continue
        drop((first, same, second));
        let again = Metrics::start(&config(false, 5), None, &env);
        again.observe(&record(Method::GET, 200, None, 50));
        assert_eq!(
            lock(&again.shared.counts).routes[""].requests[&(0, 1, UNLABELLED)],
            3
        );
    }
}
