//! The access log: one JSON line per request, written by a thread of its own.
//!
//! The request path formats the line into a buffer shared with the writer thread (one
//! uncontended lock; the writer holds it only to swap buffers) and never waits for I/O.
//! When the writer falls behind and the buffer is full, the line is dropped and counted
//! ([`dropped_total`]). The writer wakes every [`TICK`] (or early, when the buffer fills
//! up) and writes what gathered in a few `write()` calls of whole lines: every worker
//! appends to the same file (`O_APPEND`), so a line is never split across writes.
//!
//! SIGUSR1 asks the writer to reopen its file (logrotate moves the file, then signals).

use crate::config::{AccessLogConfig, HeaderSelection};
use crate::observe::{Captured, ObserveEnv, RequestRecord};
use crate::redact::{Redactor, REDACTED};
use crate::server::log_event;
use http::{header, HeaderMap, HeaderValue, Version};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a line waits at most before the writer picks it up.
const TICK: Duration = Duration::from_millis(50);
/// Bytes waiting for the writer at most; more lines are dropped.
const MAX_PENDING: usize = 4 << 20;
/// Past this many waiting bytes the writer is woken before its tick.
const WAKE_AT: usize = 1 << 20;
/// Largest single write to a file (whole lines).
const FILE_CHUNK: usize = 1 << 20;
/// Largest single write to a pipe: writes up to PIPE_BUF are never interleaved with
/// another process's writes to the same pipe.
const PIPE_CHUNK: usize = libc::PIPE_BUF;
/// Dropped lines and write failures are reported at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines this process dropped since it started: the writer could not keep up, or the
/// write failed.
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// One field of a line; names as in `ACCESS_LOG_FIELDS` (python/ferrogate/observability.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Time,
    RequestId,
    TraceId,
    ClientIp,
    Consumer,
    Route,
    Method,
    Host,
    Path,
    Query,
    Protocol,
    Status,
    BytesIn,
    BytesOut,
    Duration,
    UpstreamDuration,
    Upstream,
    Retries,
    RateLimit,
    Cache,
    Error,
    UserAgent,
    Worker,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "time" => Field::Time,
            "request_id" => Field::RequestId,
            "trace_id" => Field::TraceId,
            "client_ip" => Field::ClientIp,
            "consumer" => Field::Consumer,
            "route" => Field::Route,
            "method" => Field::Method,
            "host" => Field::Host,
            "path" => Field::Path,
            "query" => Field::Query,
            "protocol" => Field::Protocol,
            "status" => Field::Status,
            "bytes_in" => Field::BytesIn,
            "bytes_out" => Field::BytesOut,
            "duration" => Field::Duration,
            "upstream_duration" => Field::UpstreamDuration,
            "upstream" => Field::Upstream,
            "retries" => Field::Retries,
            "rate_limit" => Field::RateLimit,
            "cache" => Field::Cache,
            "error" => Field::Error,
            "user_agent" => Field::UserAgent,
            "worker" => Field::Worker,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Field::Time => "time",
            Field::RequestId => "request_id",
            Field::TraceId => "trace_id",
            Field::ClientIp => "client_ip",
            Field::Consumer => "consumer",
            Field::Route => "route",
            Field::Method => "method",
            Field::Host => "host",
            Field::Path => "path",
            Field::Query => "query",
            Field::Protocol => "protocol",
            Field::Status => "status",
            Field::BytesIn => "bytes_in",
            Field::BytesOut => "bytes_out",
            Field::Duration => "duration",
            Field::UpstreamDuration => "upstream_duration",
            Field::Upstream => "upstream",
            Field::Retries => "retries",
            Field::RateLimit => "rate_limit",
            Field::Cache => "cache",
            Field::Error => "error",
            Field::UserAgent => "user_agent",
            Field::Worker => "worker",
        }
    }
}

/// What to capture, from the config.
struct CaptureRules {
    request_headers: HeaderSelection,
    response_headers: HeaderSelection,
    request_body: usize,
    response_body: usize,
}

impl CaptureRules {
    fn is_on(&self) -> bool {
        selects_any(&self.request_headers)
            || selects_any(&self.response_headers)
            || self.request_body > 0
            || self.response_body > 0
    }
}

fn selects_any(s: &HeaderSelection) -> bool {
    match s {
        HeaderSelection::All(all) => *all,
        HeaderSelection::Names(names) => !names.is_empty(),
    }
}

fn selected(s: &HeaderSelection, name: &str) -> bool {
    match s {
        HeaderSelection::All(all) => *all,
        HeaderSelection::Names(names) => names.iter().any(|n| n == name),
    }
}

/// The access log of one worker; cloned into every observer generation that keeps its
/// settings.
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: AccessLogConfig,
    fields: Vec<Field>,
    capture: Option<CaptureRules>,
    redactor: Redactor,
    worker: usize,
    shared: Arc<Shared>,
    writer: Thread,
}

/// Between the request path and the writer thread.
struct Shared {
    pending: Mutex<Vec<u8>>,
    reopen: AtomicBool,
    /// The log is no longer used: write what is left, then end.
    closed: AtomicBool,
    /// Waiting for everything appended so far to be written.
    flushes: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.writer.unpark();
    }
}

impl AccessLog {
    /// The log `config` asks for: `previous` when it has the same settings, else a new
    /// writer (the file is opened now, so that a bad path is an error at once).
    pub fn start(
        config: &AccessLogConfig,
        previous: Option<&AccessLog>,
        env: &ObserveEnv,
    ) -> Result<AccessLog, String> {
        if let Some(p) = previous.filter(|p| &p.inner.config == config) {
            return Ok(p.clone());
        }
        let sink = Sink::open(&config.path)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            reopen: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            flushes: Mutex::new(Vec::new()),
        });
        let worker = env.worker_id;
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_loop(shared, sink, worker))
                .map_err(|e| format!("cannot start the access log writer: {e}"))?
        };
        let c = &config.capture;
        let capture = CaptureRules {
            request_headers: c.request_headers.clone(),
            response_headers: c.response_headers.clone(),
            request_body: usize::try_from(c.request_body).unwrap_or(usize::MAX),
            response_body: usize::try_from(c.response_body).unwrap_or(usize::MAX),
        };
        Ok(AccessLog {
            inner: Arc::new(Inner {
                config: config.clone(),
                fields: config.fields.iter().filter_map(|f| Field::parse(f)).collect(),
                capture: capture.is_on().then_some(capture),
                redactor: Redactor::new(&c.redact, &c.redact_body_keys),
                worker,
                shared,
                writer: thread.thread().clone(),
            }),
        })
    }

    /// The request's headers to capture, when capture is on.
    pub fn capture_request(&self, headers: &HeaderMap) -> Option<Box<Captured>> {
        let rules = self.inner.capture.as_ref()?;
        Some(Box::new(Captured {
            request_headers: self.select(headers, &rules.request_headers),
            request_form: rules.request_body > 0 && is_form(headers),
            ..Captured::default()
        }))
    }

    pub fn capture_response(&self, cap: &mut Captured, headers: &HeaderMap) {
        if let Some(rules) = &self.inner.capture {
            cap.response_headers = self.select(headers, &rules.response_headers);
            cap.response_form = rules.response_body > 0 && is_form(headers);
        }
    }

    /// How many request body bytes to capture (0: none).
    pub fn request_body_cap(&self) -> usize {
        self.inner.capture.as_ref().map_or(0, |c| c.request_body)
    }

    /// How many response body bytes to capture (0: none).
    pub fn response_body_cap(&self) -> usize {
        self.inner.capture.as_ref().map_or(0, |c| c.response_body)
    }

    fn select(&self, headers: &HeaderMap, which: &HeaderSelection) -> Vec<(String, String)> {
        if !selects_any(which) {
            return Vec::new();
        }
        headers
            .iter()
            .filter(|(name, _)| selected(which, name.as_str()))
            .map(|(name, value)| {
                let value = if self.inner.redactor.header_is_secret(name.as_str()) {
                    REDACTED.to_owned()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                };
                (name.as_str().to_owned(), value)
            })
            .collect()
    }

    /// Log a finished request (unless sampled out): format it and hand it to the writer.
    pub fn write(&self, rec: &RequestRecord) {
        let inner = &*self.inner;
        let sample = inner.config.sample;
        if sample < 1.0 && rec.status < 500 && rec.error.is_none() {
            let draw = (crate::headers::next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if draw >= sample {
                return;
            }
        }
        let wake = {
            let mut pending = inner.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() >= MAX_PENDING {
                drop(pending);
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let before = pending.len();
            inner.format(rec, &mut pending);
            before < WAKE_AT && pending.len() >= WAKE_AT
        };
        if wake {
            inner.writer.unpark();
        }
    }

    /// Reopen the file (after logrotate moved it); the writer does it before its next
    /// write.
    pub fn reopen(&self) {
        self.inner.shared.reopen.store(true, Ordering::Release);
        self.inner.writer.unpark();
    }

    /// Wait (up to `timeout`) until every line handed over so far is written.
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = mpsc::channel();
        self.inner
            .shared
            .flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        self.inner.writer.unpark();
        let _ = rx.recv_timeout(timeout);
    }
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

impl Inner {
    /// One line, with its newline, appended to `out`.
    fn format(&self, rec: &RequestRecord, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(field.name().as_bytes());
            out.extend_from_slice(b"\":");
            self.value(*field, rec, out);
        }
        if let (Some(rules), Some(cap)) = (&self.capture, &rec.capture) {
            if !self.fields.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(b"\"captured\":");
            self.captured(rules, cap, out);
        }
        out.extend_from_slice(b"}\n");
    }

    fn value(&self, field: Field, rec: &RequestRecord, out: &mut Vec<u8>) {
        match field {
            Field::Time => {
                let _ = write!(out, "\"{}\"", humantime::format_rfc3339_millis(rec.wall_start));
            }
            Field::RequestId => header_string(out, Some(&rec.request_id)),
            Field::TraceId => match &rec.trace {
                Some(t) => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push(b'"');
                    for b in t.trace_id {
                        out.push(HEX[usize::from(b >> 4)]);
                        out.push(HEX[usize::from(b & 15)]);
                    }
                    out.push(b'"');
                }
                None => null(out),
            },
            Field::ClientIp => header_string(out, Some(&rec.client_ip)),
            Field::Consumer => opt_string(out, rec.consumer.as_deref()),
            Field::Route => opt_string(out, rec.route.as_deref().map(|r| r.name.as_str())),
            Field::Method => string(out, rec.method.as_str()),
            Field::Host => header_string(out, rec.host.as_ref()),
            Field::Path => opt_string(out, rec.path.as_deref()),
            Field::Query => match rec.query.as_deref().filter(|q| !q.is_empty()) {
                Some(q) => string(out, &self.redactor.form(q)),
                None => null(out),
            },
            Field::Protocol => string(out, protocol(rec.version)),
            Field::Status => int(out, rec.status),
            Field::BytesIn => int(out, rec.bytes_in),
            Field::BytesOut => int(out, rec.bytes_out),
            Field::Duration => seconds(out, Some(rec.duration)),
            Field::UpstreamDuration => seconds(out, rec.upstream_time),
            Field::Upstream => opt_string(out, rec.upstream.as_deref()),
            Field::Retries => int(out, rec.tries.saturating_sub(1)),
            Field::RateLimit => opt_string(out, rec.rate_limit.map(|r| r.as_str())),
            Field::Cache => opt_string(out, rec.cache),
            Field::Error => opt_string(out, rec.error),
            Field::UserAgent => header_string(out, rec.user_agent.as_ref()),
            Field::Worker => int(out, self.worker),
        }
    }

    fn captured(&self, rules: &CaptureRules, cap: &Captured, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            string(out, name);
            out.push(b':');
        };
        if selects_any(&rules.request_headers) {
            key(out, "request_headers");
            header_object(out, &cap.request_headers);
        }
        if selects_any(&rules.response_headers) {
            key(out, "response_headers");
            header_object(out, &cap.response_headers);
        }
        if rules.request_body > 0 {
            key(out, "request_body");
            match &cap.request_body {
                Some(body) => string(out, &self.redactor.body(body, cap.request_form)),
                None => null(out),
            }
        }
        if rules.response_body > 0 {
            key(out, "response_body");
            string(out, &self.redactor.body(&cap.response_body, cap.response_form));
        }
        out.push(b'}');
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

fn string(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail; serde_json escapes as JSON requires.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => null(out),
    }
}

fn header_string(out: &mut Vec<u8>, v: Option<&HeaderValue>) {
    match v {
        Some(v) => match v.to_str() {
            Ok(s) => string(out, s),
            Err(_) => string(out, &String::from_utf8_lossy(v.as_bytes())),
        },
        None => null(out),
    }
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Seconds with six decimals: microseconds are finer than anything the gateway measures
/// reliably. Integer formatting (this is on the request path).
fn seconds(out: &mut Vec<u8>, d: Option<Duration>) {
    let Some(d) = d else {
        return null(out);
    };
    int(out, d.as_secs());
    let micros = d.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros).as_bytes();
    out.push(b'.');
    out.extend(std::iter::repeat_n(b'0', 6 - digits.len()));
    out.extend_from_slice(digits);
}

/// `{"name": "value", ...}`; the values of a repeated header joined with ", ".
fn header_object(out: &mut Vec<u8>, headers: &[(String, String)]) {
    out.push(b'{');
    let mut i = 0;
    while i < headers.len() {
        let name = &headers[i].0;
        let mut j = i + 1;
        while j < headers.len() && headers[j].0 == *name {
            j += 1;
        }
        if i > 0 {
            out.push(b',');
        }
        string(out, name);
        out.push(b':');
        if j == i + 1 {
            string(out, &headers[i].1);
        } else {
            let joined: Vec<&str> = headers[i..j].iter().map(|(_, v)| v.as_str()).collect();
            string(out, &joined.join(", "));
        }
        i = j;
    }
    out.push(b'}');
}

/// Where lines go.
enum Sink {
    /// fd 1, shared with the other workers and the master (a pipe, a file or a terminal).
    Stdout {
        out: ManuallyDrop<File>,
        chunk: usize,
    },
    File {
        path: PathBuf,
        file: File,
    },
}

impl Sink {
    fn open(path: &str) -> Result<Sink, String> {
        if path == "stdout" {
            // SAFETY: fd 1 stays open for the process's life; ManuallyDrop never closes it.
            let out = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
            let pipe = out
                .metadata()
                .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
                .unwrap_or(true);
            let chunk = if pipe { PIPE_CHUNK } else { FILE_CHUNK };
            return Ok(Sink::Stdout { out, chunk });
        }
        let path = PathBuf::from(path);
        let file =
            open_log(&path).map_err(|e| format!("cannot open the access log {}: {e}", path.display()))?;
        Ok(Sink::File { path, file })
    }

    /// Write `data` (whole lines) in as few writes as the sink allows; on an error, the
    /// number of lines lost.
    fn write(&mut self, data: &[u8]) -> Result<(), (io::Error, u64)> {
        let (out, chunk): (&mut File, usize) = match self {
            Sink::Stdout { out, chunk } => (out, *chunk),
            Sink::File { file, .. } => (file, FILE_CHUNK),
        };
        let mut rest = data;
        while !rest.is_empty() {
            let n = line_chunk(rest, chunk);
            if let Err(e) = out.write_all(&rest[..n]) {
                let lost = memchr::memchr_iter(b'\n', rest).count() as u64;
                return Err((e, lost));
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    fn reopen(&mut self, worker: usize) {
        let Sink::File { path, file } = self else {
            return;
        };
        match open_log(path) {
            Ok(f) => {
                *file = f;
                log_event(
                    "info",
                    "access_log_reopened",
                    serde_json::json!({"worker": worker, "path": path}),
                );
            }
            Err(e) => log_event(
                "error",
                "access_log_reopen_failed",
                serde_json::json!({"worker": worker, "path": path, "error": e.to_string()}),
            ),
        }
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// The length of the longest prefix of `data` made of whole lines and at most `max`
/// bytes; a single line longer than `max` goes alone.
fn line_chunk(data: &[u8], max: usize) -> usize {
    if data.len() <= max {
        return data.len();
    }
    match memchr::memrchr(b'\n', &data[..max]) {
        Some(i) => i + 1,
        None => memchr::memchr(b'\n', &data[max..]).map_or(data.len(), |i| max + i + 1),
    }
}

fn write_loop(shared: Arc<Shared>, mut sink: Sink, worker: usize) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut reported_drops = 0u64;
    let mut last_report: Option<Instant> = None;
    loop {
        std::thread::park_timeout(TICK);
        // Read before taking the buffer: once closed, nothing more is appended.
        let closing = shared.closed.load(Ordering::Acquire);
        let waiting = std::mem::take(&mut *shared.flushes.lock().unwrap_or_else(|e| e.into_inner()));
        std::mem::swap(
            &mut *shared.pending.lock().unwrap_or_else(|e| e.into_inner()),
            &mut batch,
        );
        if shared.reopen.swap(false, Ordering::AcqRel) {
            sink.reopen(worker);
        }
        if !batch.is_empty() {
            if let Err((e, lost)) = sink.write(&batch) {
                DROPPED.fetch_add(lost, Ordering::Relaxed);
                if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                    last_report = Some(Instant::now());
                    log_event(
                        "error",
                        "access_log_write_failed",
                        serde_json::json!({"worker": worker, "error": e.to_string(), "lines_lost": lost}),
                    );
                }
            }
            batch.clear();
            if batch.capacity() > WAKE_AT {
                batch.shrink_to(64 * 1024);
            }
        }
        for tx in waiting {
            let _ = tx.send(());
        }
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped != reported_drops && last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            last_report = Some(Instant::now());
            log_event(
                "warn",
                "access_log_dropped",
                serde_json::json!({"worker": worker, "dropped": dropped - reported_drops, "dropped_total": dropped}),
            );
            reported_drops = dropped;
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_end_at_line_ends() {
        let data = b"aaa\nbbb\ncccccccc\nd\n";
        assert_eq!(line_chunk(data, 100), data.len());
        assert_eq!(line_chunk(data, 9), 8);
        // A line longer than the chunk goes alone, whole.
        assert_eq!(line_chunk(&data[8..], 4), 9);
        assert_eq!(line_chunk(b"no newline at all", 4), 17);
    }

    #[test]
    fn every_field_name_round_trips() {
        let names = [
            "time",
            "request_id",
            "trace_id",
            "client_ip",
            "consumer",
            "route",
            "method",
            "host",
            "path",
            "query",
            "protocol",
            "status",
            "bytes_in",
            "bytes_out",
            "duration",
            "upstream_duration",
            "upstream",
            "retries",
            "rate_limit",
            "cache",
            "error",
            "user_agent",
            "worker",
        ];
        for name in names {
            assert_eq!(Field::parse(name).map(Field::name), Some(name));
        }
        assert_eq!(Field::parse("nope"), None);
    }

    #[test]
    fn seconds_have_six_decimals() {
        let text = |d| {
            let mut out = Vec::new();
            seconds(&mut out, d);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(Some(Duration::from_micros(21))), "0.000021");
        assert_eq!(text(Some(Duration::from_nanos(12_345_678_999))), "12.345678");
        assert_eq!(text(Some(Duration::ZERO)), "0.000000");
        assert_eq!(text(None), "null");
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut out = Vec::new();
        let h = |n: &str, v: &str| (n.to_string(), v.to_string());
        header_object(&mut out, &[h("a", "1"), h("a", "2"), h("b", "\"x\"")]);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"a":"1, 2","b":"\"x\""}"#);
    }
}
