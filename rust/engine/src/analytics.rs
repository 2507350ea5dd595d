//! Analytics: every finished request counted into the current time bucket (`resolution`
//! seconds, aligned to the Unix epoch), keyed by (route, consumer, upstream target, status).
//!
//! Workers aggregate, the master stores. A task on the worker's runtime hands each finished
//! bucket to the master as a spool file in `<stem>.analytics/` beside the runtime file (one
//! JSON object per line, written to a dot-file and renamed, so the master never reads half a
//! file); the master merges the files of every worker into its store
//! (`python/ferrogate/analytics_store.py`). The request path only updates a hash map entry:
//! no allocation when the entry exists, no I/O.

use crate::config::AnalyticsConfig;
use crate::observe::{ObserveEnv, RequestRecord};
use crate::server::log_event;
use hashbrown::{Equivalent, HashMap};
use serde::Serialize;
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Latency histogram: bin 0 holds durations up to `HIST_MIN` seconds; bin `i` >= 1 holds
/// (`HIST_MIN`·γ^(i-1), `HIST_MIN`·γ^i] with γ = 10^(1/`HIST_PER_DECADE`); the last bin
/// also takes everything above (about 60 s). The master reads these three numbers from
/// each spool file's header and must use the same ones.
pub const HIST_MIN: f64 = 1e-5;
pub const HIST_PER_DECADE: f64 = 40.0;
pub const HIST_BINS: usize = 273;
/// Written as the first line of every spool file.
const FORMAT: &str = "ferrogate-analytics";
const FORMAT_VERSION: u32 = 1;
/// Consumers past `max_consumers` in a bucket are counted under this name.
const OTHER: &str = "other";

/// The histogram bin of a duration in seconds.
#[inline]
pub fn hist_bin(seconds: f64) -> usize {
    if seconds.is_nan() || seconds <= HIST_MIN {
        return 0;
    }
    let bin = ((seconds / HIST_MIN).log10() * HIST_PER_DECADE).ceil();
    (bin as usize).min(HIST_BINS - 1)
}

#[derive(Debug, PartialEq, Eq)]
struct Key {
    route: Box<str>,
    consumer: Box<str>,
    upstream: Box<str>,
    status: u16,
}

/// A [`Key`] made of borrowed parts, for lookups that allocate nothing.
struct KeyRef<'a> {
    route: &'a str,
    consumer: &'a str,
    upstream: &'a str,
    status: u16,
}

// Key and KeyRef must hash alike: the parts in the same order, as `str`.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        KeyRef {
            route: &self.route,
            consumer: &self.consumer,
            upstream: &self.upstream,
            status: self.status,
        }
        .hash(state)
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.route.hash(state);
        self.consumer.hash(state);
        self.upstream.hash(state);
        self.status.hash(state);
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.status == key.status
            && self.route == &*key.route
            && self.consumer == &*key.consumer
            && self.upstream == &*key.upstream
    }
}

struct Counts {
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// Sums of durations, seconds.
    duration: f64,
    upstream_duration: f64,
    hist: Box<[u32; HIST_BINS]>,
}

impl Counts {
    fn new() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: 0.0,
            upstream_duration: 0.0,
            hist: Box::new([0; HIST_BINS]),
        }
    }
}

/// One time bucket of one worker.
struct Bucket {
    /// Start, milliseconds since the Unix epoch.
    start_ms: u64,
    rows: HashMap<Key, Counts, RandomState>,
    /// Distinct consumers counted so far (capped at `max_consumers`).
    consumers: HashSet<Box<str>>,
}

impl Bucket {
    fn new(start_ms: u64, capacity: usize) -> Self {
        Bucket {
            start_ms,
            rows: HashMap::with_capacity_and_hasher(capacity, RandomState::new()),
            consumers: HashSet::new(),
        }
    }
}

struct State {
    current: Bucket,
    /// Finished buckets not yet written.
    done: Vec<Bucket>,
}

struct Shared {
    resolution_ms: u64,
    max_consumers: usize,
    state: Mutex<State>,
    spool: Spool,
    /// Set when the [`Analytics`] is dropped: the flusher writes what is left and ends.
    stop: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while counting leaves counters, not broken invariants: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bucket_of(&self, ms: u64) -> u64 {
        ms - ms % self.resolution_ms
    }

    /// The buckets that ended by `now_ms` (or all of them, the current one too).
    fn take(&self, now_ms: u64, all: bool) -> Vec<Bucket> {
        let mut state = self.lock();
        if all || state.current.start_ms + self.resolution_ms <= now_ms {
            let capacity = state.current.rows.len();
            let next = Bucket::new(self.bucket_of(now_ms), capacity);
            let finished = std::mem::replace(&mut state.current, next);
            if !finished.rows.is_empty() {
                state.done.push(finished);
            }
        }
        std::mem::take(&mut state.done)
    }
}

/// Where a worker's spool files go, and how they are named.
struct Spool {
    dir: PathBuf,
    worker_id: usize,
}

/// Spool file numbers of this process (analytics rebuilt on reload keep counting).
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

#[derive(Serialize)]
struct Header<'a> {
    format: &'a str,
    version: u32,
    worker: usize,
    pid: u32,
    hist: HistScheme,
}

#[derive(Serialize)]
struct HistScheme {
    min: f64,
    per_decade: f64,
    bins: usize,
}

#[derive(Serialize)]
struct Line<'a> {
    /// Bucket start and length, milliseconds.
    t: u64,
    span: u64,
    route: &'a str,
    consumer: &'a str,
    upstream: &'a str,
    status: u16,
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    duration: f64,
    upstream_duration: f64,
    /// Non-empty bins as [bin, count].
    hist: Vec<[u32; 2]>,
}

impl Spool {
    /// Write `buckets` as one file; returns its path (None when there was nothing).
    fn write(&self, buckets: &[Bucket], span: u64) -> std::io::Result<Option<PathBuf>> {
        if buckets.iter().all(|b| b.rows.is_empty()) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(256 * buckets.iter().map(|b| b.rows.len()).sum::<usize>());
        serde_json::to_writer(
            &mut out,
            &Header {
                format: FORMAT,
                version: FORMAT_VERSION,
                worker: self.worker_id,
                pid: std::process::id(),
                hist: HistScheme {
                    min: HIST_MIN,
                    per_decade: HIST_PER_DECADE,
                    bins: HIST_BINS,
                },
            },
        )?;
        out.push(b'\n');
        for bucket in buckets {
            for (key, c) in &bucket.rows {
                let hist = c
                    .hist
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(i, &n)| [i as u32, n])
                    .collect();
                serde_json::to_writer(
                    &mut out,
                    &Line {
                        t: bucket.start_ms,
                        span,
                        route: &key.route,
                        consumer: &key.consumer,
                        upstream: &key.upstream,
                        status: key.status,
                        requests: c.requests,
                        errors: c.errors,
                        bytes_in: c.bytes_in,
                        bytes_out: c.bytes_out,
                        duration: c.duration,
                        upstream_duration: c.upstream_duration,
                        hist,
                    },
                )?;
                out.push(b'\n');
            }
        }
        std::fs::create_dir_all(&self.dir)?;
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        // The pid and start time keep a restarted worker (same id, sequence from 0) from
        // overwriting its predecessor's files, and from taking the name of a file the master
        // remembers having read (it keeps names for days; pids come back).
        let name = format!(
            "{}-{}-{}-{seq:08}.jsonl",
            self.worker_id,
            std::process::id(),
            process_start_ms()
        );
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&out))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Some(path))
    }
}

/// When this process first wrote analytics, for unique spool file names.
fn process_start_ms() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(now_ms)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One worker's analytics for one set of settings.
pub struct Analytics {
    pub config: AnalyticsConfig,
    shared: Arc<Shared>,
}

impl Analytics {
    /// Reuse `previous` when the settings a worker uses are unchanged (its counts go on);
    /// otherwise start anew. Call from within the worker's runtime: the flusher is a task
    /// on it (without a runtime, only [`Analytics::flush`] writes).
    pub fn start(
        config: &AnalyticsConfig,
        previous: Option<&Arc<Analytics>>,
        env: &ObserveEnv,
    ) -> Arc<Analytics> {
        if let Some(p) = previous {
            if p.config.resolution == config.resolution && p.config.max_consumers == config.max_consumers {
                return p.clone();
            }
        }
        let resolution_ms = ((config.resolution * 1000.0).round() as u64).max(1);
        let now = now_ms();
        let shared = Arc::new(Shared {
            resolution_ms,
            max_consumers: config.max_consumers,
            state: Mutex::new(State {
                current: Bucket::new(now - now % resolution_ms, 16),
                done: Vec::new(),
            }),
            spool: Spool {
                dir: env.beside(".analytics"),
                worker_id: env.worker_id,
            },
            stop: Notify::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(flusher(shared.clone()));
        }
        Arc::new(Analytics {
            config: config.clone(),
            shared,
        })
    }

    /// Count a finished request (the request path: one map update under an uncontended lock).
    pub fn observe(&self, rec: &RequestRecord) {
        let end = rec.wall_start + rec.duration;
        let end_ms = end.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.count(
            end_ms,
            rec.route_name(),
            rec.consumer.as_deref().unwrap_or(""),
            rec.upstream.as_deref().unwrap_or(""),
            rec.status,
            rec.status >= 500 || rec.error.is_some(),
            (rec.bytes_in, rec.bytes_out),
            rec.duration,
            rec.upstream_time,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn count(
        &self,
        end_ms: u64,
        route: &str,
        consumer: &str,
        upstream: &str,
        status: u16,
        error: bool,
        (bytes_in, bytes_out): (u64, u64),
        duration: Duration,
        upstream_time: Option<Duration>,
    ) {
        let shared = &*self.shared;
        let start = shared.bucket_of(end_ms);
        let mut guard = shared.lock();
        let state = &mut *guard;
        if start != state.current.start_ms {
            // A request that ended just before the bucket turned (its end time was taken
            // before the flusher's) counts in the current bucket; a clock step back too far
            // for that starts a new one.
            let late =
                start < state.current.start_ms && state.current.start_ms - start <= 2 * shared.resolution_ms;
            if !late {
                let capacity = state.current.rows.len();
                let finished = std::mem::replace(&mut state.current, Bucket::new(start, capacity));
                if !finished.rows.is_empty() {
                    state.done.push(finished);
                }
            }
        }
        let bucket = &mut state.current;
        let consumer = if consumer.is_empty() || bucket.consumers.contains(consumer) {
            consumer
        } else if bucket.consumers.len() < shared.max_consumers {
            bucket.consumers.insert(consumer.into());
            consumer
        } else {
            OTHER
        };
        let probe = KeyRef {
            route,
            consumer,
            upstream,
            status,
        };
        let counts = match bucket.rows.get_mut(&probe) {
            Some(c) => c,
            None => bucket
                .rows
                .entry(Key {
                    route: route.into(),
                    consumer: consumer.into(),
                    upstream: upstream.into(),
                    status,
                })
                .or_insert_with(Counts::new),
        };
        let seconds = duration.as_secs_f64();
        counts.requests += 1;
        counts.errors += u64::from(error);
        counts.bytes_in += bytes_in;
        counts.bytes_out += bytes_out;
        counts.duration += seconds;
        counts.upstream_duration += upstream_time.map_or(0.0, |d| d.as_secs_f64());
        counts.hist[hist_bin(seconds)] += 1;
    }

    /// Write every count now, the current bucket's too (at shutdown; blocks on file I/O).
    pub fn flush(&self) {
        let buckets = self.shared.take(now_ms(), true);
        write_logged(&self.shared, &buckets);
    }
}

impl Drop for Analytics {
    fn drop(&mut self) {
        // Replaced by a reload with other settings: the flusher writes what is left.
        self.shared.stop.notify_one();
    }
}

fn write_logged(shared: &Shared, buckets: &[Bucket]) {
    if let Err(e) = shared.spool.write(buckets, shared.resolution_ms) {
        let rows: usize = buckets.iter().map(|b| b.rows.len()).sum();
        log_event(
            "error",
            "analytics_spool_failed",
            serde_json::json!({
                "worker": shared.spool.worker_id,
                "dir": shared.spool.dir.display().to_string(),
                "error": e.to_string(),
                "rows_lost": rows,
            }),
        );
    }
}

/// Write finished buckets shortly after each boundary, off the runtime's thread.
async fn flusher(shared: Arc<Shared>) {
    let res = shared.resolution_ms;
    // Late enough for requests that ended on the boundary to be counted, early enough for
    // the master (which reads at about half a resolution past it).
    let slack = (res / 10).min(250);
    loop {
        let now = now_ms();
        let wait = shared.bucket_of(now) + res + slack - now;
        let stopping = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => false,
            _ = shared.stop.notified() => true,
        };
        let buckets = shared.take(now_ms(), stopping);
        if !buckets.is_empty() {
            let job = shared.clone();
            let _ = tokio::task::spawn_blocking(move || write_logged(&job, &buckets)).await;
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn analytics(dir: &Path, max_consumers: usize) -> Arc<Analytics> {
        let config = AnalyticsConfig {
            path: String::new(),
            resolution: 1.0,
            retention: 3600.0,
            max_consumers,
        };
        let env = ObserveEnv {
            worker_id: 3,
            runtime_path: dir.join("gw.runtime.json"),
        };
        Analytics::start(&config, None, &env)
    }

    fn count(a: &Analytics, end_ms: u64, consumer: &str, status: u16, ms: u64) {
        a.count(
            end_ms,
            "api",
            consumer,
            "127.0.0.1:1",
            status,
            status >= 500,
            (10, 100),
            Duration::from_millis(ms),
            Some(Duration::from_millis(ms / 2)),
        );
    }

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(spool_dir(&dir.join("gw.runtime.json")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            assert!(!f.file_name().unwrap().to_str().unwrap().starts_with('.'));
            let text = std::fs::read_to_string(&f).unwrap();
            let mut it = text.lines();
            let header: serde_json::Value = serde_json::from_str(it.next().unwrap()).unwrap();
            assert_eq!(header["format"], FORMAT);
            assert_eq!(header["hist"]["bins"], HIST_BINS);
            out.extend(it.map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
        }
        out
    }

    fn spool_dir(runtime: &Path) -> PathBuf {
        ObserveEnv {
            worker_id: 0,
            runtime_path: runtime.to_path_buf(),
        }
        .beside(".analytics")
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fg-analytics-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bins_are_log_spaced_and_clamped() {
        assert_eq!(hist_bin(0.0), 0);
        assert_eq!(hist_bin(HIST_MIN), 0);
        assert_eq!(hist_bin(f64::NAN), 0);
        assert_eq!(hist_bin(1e-3), 80);
        assert_eq!(hist_bin(1.0), 200);
        assert_eq!(hist_bin(1.0001), 201);
        assert_eq!(hist_bin(3600.0), HIST_BINS - 1);
        // The last regular bin reaches past 60 s.
        assert!(HIST_MIN * 10f64.powf((HIST_BINS - 1) as f64 / HIST_PER_DECADE) >= 60.0);
        for ms in [0.02, 0.5, 3.0, 17.0, 250.0, 4200.0] {
            let s: f64 = ms / 1000.0;
            let b = hist_bin(s) as f64;
            let hi = HIST_MIN * 10f64.powf(b / HIST_PER_DECADE);
            let lo = HIST_MIN * 10f64.powf((b - 1.0) / HIST_PER_DECADE);
            assert!(lo < s && s <= hi * (1.0 + 1e-12), "{s} not in ({lo}, {hi}]");
        }
    }

    #[test]
    fn counts_per_key_and_bucket_and_flushes_all() {
        let dir = tmp("counts");
        let a = analytics(&dir, 100);
        let t0 = 1_700_000_000_000;
        count(&a, t0 + 10, "alice", 200, 5);
        count(&a, t0 + 20, "alice", 200, 7);
        count(&a, t0 + 30, "", 502, 1);
        count(&a, t0 + 1500, "alice", 200, 5); // the next bucket
        a.flush();
        let rows = lines(&dir);
        assert_eq!(rows.len(), 3);
        let alice: Vec<_> = rows
            .iter()
            .filter(|r| r["consumer"] == "alice" && r["t"] == t0)
            .collect();
        assert_eq!(alice.len(), 1);
        assert_eq!(alice[0]["requests"], 2);
        assert_eq!(alice[0]["errors"], 0);
        assert_eq!(alice[0]["bytes_out"], 200);
        assert_eq!(alice[0]["span"], 1000);
        assert_eq!(alice[0]["hist"].as_array().unwrap().len(), 2);
        let failed = rows.iter().find(|r| r["status"] == 502).unwrap();
        assert_eq!(failed["errors"], 1);
        assert_eq!(failed["consumer"], "");
        assert!(rows.iter().any(|r| r["t"] == t0 + 1000 && r["requests"] == 1));
        // Nothing is left to write.
        a.flush();
        assert_eq!(lines(&dir).len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn consumers_past_the_cap_are_other_and_late_requests_count_now() {
        let dir = tmp("cap");
        let a = analytics(&dir, 2);
        let t0 = 1_700_000_000_000;
        for c in ["a", "b", "c", "d", "a"] {
            count(&a, t0 + 1000, c, 200, 1);
        }
        count(&a, t0 + 999, "b", 200, 1); // ended just before the current bucket
        a.flush();
        let rows = lines(&dir);
        let by = |c: &str| {
            rows.iter()
                .filter(|r| r["consumer"] == c)
                .map(|r| r["requests"].as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!((by("a"), by("b"), by("other")), (2, 2, 2));
        assert!(rows.iter().all(|r| r["t"] == t0 + 1000));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
