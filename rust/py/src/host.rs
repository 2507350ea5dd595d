//! The engine's `PluginHost`, backed by a `ferrogate.hooks.Host` object.
//!
//! Each phase is one call into Python with plain values (see the wire formats in
//! `ferrogate/hooks.py`). Sync chains run inline under the GIL; async chains are handed to
//! the host's event loop with a completion object that sends the answer back over a
//! oneshot channel. The log phase is batched: records queue up and a task on the worker's
//! runtime hands them over in one call, after the responses have been written.

use bytes::Bytes;
use ferrogate_engine::error::{ErrorKind, GatewayError};
use ferrogate_engine::plugins::{
    Attempt, BodyMode, EarlyResponse, FellBack, HeaderEdits, Hook, HookMode, HookResult, HostLoader,
    LogRecord, PluginHost, PluginState, RequestDecision, RequestEdits, RequestView, ResponseEdits, Routing,
};
use ferrogate_engine::server::log_event;
use ferrogate_engine::trace::hex;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use pyo3::{intern, IntoPyObjectExt};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Builds a `PyHost` per config generation with `ferrogate.plugin_host.load`.
pub struct PyLoader {
    pub load: Py<PyAny>,
}

impl HostLoader for PyLoader {
    fn load(&self, config_json: &str) -> Result<Option<Arc<dyn PluginHost>>, String> {
        let host = Python::attach(|py| -> Result<Option<Py<PyAny>>, String> {
            let host = self
                .load
                .call1(py, (config_json,))
                .map_err(|e| format!("loading plugins failed: {}", describe(py, &e)))?;
            Ok((!host.is_none(py)).then_some(host))
        })?;
        let Some(host) = host else { return Ok(None) };
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "plugins must be loaded on the worker's runtime".to_string())?;
        Ok(Some(Arc::new(PyHost::new(host, &handle))))
    }
}

/// A Python exception as one line, with the traceback's last frame.
fn describe(py: Python<'_>, e: &PyErr) -> String {
    let text = e.to_string();
    match e.traceback(py).and_then(|tb| tb.format().ok()) {
        Some(tb) => {
            let last = tb
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with("File "))
                .unwrap_or("");
            format!("{text} ({})", last.trim())
        }
        None => text,
    }
}

pub struct PyHost {
    host: Py<PyAny>,
    logs: mpsc::UnboundedSender<LogRecord>,
}

impl PyHost {
    fn new(host: Py<PyAny>, runtime: &tokio::runtime::Handle) -> Self {
        let (logs, rx) = mpsc::unbounded_channel();
        let for_logs = Python::attach(|py| host.clone_ref(py));
        runtime.spawn(drain_logs(for_logs, rx));
        PyHost { host, logs }
    }
}

/// Hands queued log records to the host in batches; ends when the host's generation is
/// dropped and its queue is empty.
async fn drain_logs(host: Py<PyAny>, mut rx: mpsc::UnboundedReceiver<LogRecord>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 512).await > 0 {
        // Let the connections that queued these finish writing first.
        tokio::task::yield_now().await;
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        Python::attach(|py| {
            let items: Vec<Bound<'_, PyTuple>> = batch
                .drain(..)
                .filter_map(|r| {
                    let state = r.state.downcast::<Py<PyAny>>().ok()?;
                    PyTuple::new(
                        py,
                        [
                            r.chain.into_bound_py_any(py).ok()?,
                            state.into_bound_py_any(py).ok()?,
                            r.status.into_bound_py_any(py).ok()?,
                            r.bytes_sent.into_bound_py_any(py).ok()?,
                            r.duration.into_bound_py_any(py).ok()?,
                            r.upstream.into_bound_py_any(py).ok()?,
                            r.error.into_bound_py_any(py).ok()?,
                        ],
                    )
                    .ok()
                })
                .collect();
            if let Err(e) = host.call_method1(py, intern!(py, "log"), (items,)) {
                log_event(
                    "error",
                    "plugin_log_failed",
                    serde_json::json!({"error": describe(py, &e)}),
                );
            }
        });
    }
}

fn plugin_error(py: Python<'_>, e: &PyErr) -> GatewayError {
    // The dispatcher raises `PluginError` after logging the plugin's traceback; anything
    // else is a fault of the host itself and is logged here.
    let is_plugin_error = e.get_type(py).name().map(|n| n == "PluginError").unwrap_or(false);
    if !is_plugin_error {
        log_event(
            "error",
            "plugin_host_failed",
            serde_json::json!({"error": describe(py, e)}),
        );
    }
    GatewayError::new(ErrorKind::PluginFailed, e.value(py).to_string())
}

fn invalid(what: impl std::fmt::Display) -> GatewayError {
    GatewayError::new(ErrorKind::PluginFailed, format!("plugin chain returned {what}"))
}

/// Header fields as the `\nname:value\n...` text the views search and parse lazily: a str,
/// each byte one latin-1 character, so that Python needs no decoding step.
fn header_blob<'py>(py: Python<'py>, headers: &HeaderMap) -> Bound<'py, PyAny> {
    let len: usize = 1 + headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 2)
        .sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    buf.push(b'\n');
    for (n, v) in headers {
        buf.extend_from_slice(n.as_str().as_bytes());
        buf.push(b':');
        buf.extend_from_slice(v.as_bytes());
        buf.push(b'\n');
    }
    // SAFETY: the pointer and length describe `buf`, alive for the call; latin-1 decoding
    // accepts every byte, so the result is a new reference (null only when out of memory).
    unsafe {
        let ptr = pyo3::ffi::PyUnicode_DecodeLatin1(
            buf.as_ptr().cast(),
            buf.len() as pyo3::ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Bound::from_owned_ptr_or_err(py, ptr).expect("decoding latin-1 cannot fail")
    }
}

/// `value` as a str, shared for the few values every request repeats.
fn common_str<'py>(py: Python<'py>, value: &str) -> Bound<'py, PyString> {
    match value {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "http" => intern!(py, "http").clone(),
        "https" => intern!(py, "https").clone(),
        "HTTP/1.1" => intern!(py, "HTTP/1.1").clone(),
        "HTTP/2" => intern!(py, "HTTP/2").clone(),
        _ => PyString::new(py, value),
    }
}

/// `[(name, value), ...]` from Python; values are latin-1 text, as they were handed over.
fn header_map(list: &Bound<'_, PyAny>) -> HookResult<HeaderMap> {
    let list = list
        .cast::<PyList>()
        .map_err(|_| invalid("headers that are not a list"))?;
    let mut map = HeaderMap::with_capacity(list.len());
    for item in list.iter() {
        let (name, value) = header_field(&item)?;
        map.append(name, value);
    }
    Ok(map)
}

/// Header changes: a list is the whole new set; `(removed names, added fields)` is a diff
/// against the fields the chain was given (see `hooks.py`).
fn header_edits(h: &Bound<'_, PyAny>) -> HookResult<HeaderEdits> {
    let Ok(diff) = h.cast::<PyTuple>() else {
        return header_map(h).map(HeaderEdits::Replace);
    };
    let (removed, added) = match (diff.len(), diff.get_item(0), diff.get_item(1)) {
        (2, Ok(r), Ok(a)) => (r, a),
        _ => return Err(invalid("a header diff that is not a (removed, added) pair")),
    };
    let removed = removed
        .cast_into::<PyList>()
        .map_err(|_| invalid("removed header names that are not a list"))?;
    let added = added
        .cast_into::<PyList>()
        .map_err(|_| invalid("added headers that are not a list"))?;
    let mut remove = Vec::with_capacity(removed.len());
    for name in removed.iter() {
        let name = name
            .cast_into::<PyString>()
            .map_err(|_| invalid("a header name that is not a str"))?;
        // A name no header can have (a plugin may add, then remove, anything) is in no map.
        if let Ok(n) = HeaderName::from_bytes(name.to_str().unwrap_or("").as_bytes()) {
            remove.push(n);
        }
    }
    let mut add = Vec::with_capacity(added.len());
    for item in added.iter() {
        add.push(header_field(&item)?);
    }
    Ok(HeaderEdits::Diff { remove, add })
}

/// One `(name, value)` pair of str.
fn header_field(item: &Bound<'_, PyAny>) -> HookResult<(HeaderName, HeaderValue)> {
    let pair = item
        .cast::<PyTuple>()
        .ok()
        .filter(|t| t.len() == 2)
        .ok_or_else(|| invalid("a header that is not a (name, value) pair"))?;
    let text = |i: usize| -> HookResult<Bound<'_, PyString>> {
        pair.get_item(i)
            .ok()
            .and_then(|v| v.cast_into::<PyString>().ok())
            .ok_or_else(|| invalid("a header name or value that is not a str"))
    };
    let (name, value) = (text(0)?, text(1)?);
    // Borrowed UTF-8 views: no copy until the header map takes the bytes.
    let name = name
        .to_str()
        .map_err(|_| invalid("a header name that is not text"))?;
    let value = value
        .to_str()
        .map_err(|_| invalid("a header value that is not text"))?;
    let hname = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(format_args!("an invalid header name {name:?}")))?;
    let hvalue = if value.is_ascii() {
        HeaderValue::from_str(value).ok()
    } else {
        let bytes: Option<Vec<u8>> = value.chars().map(|c| u8::try_from(c as u32).ok()).collect();
        bytes.and_then(|b| HeaderValue::from_bytes(&b).ok())
    }
    .ok_or_else(|| invalid(format_args!("an invalid value for header {name:?}")))?;
    Ok((hname, hvalue))
}

fn status_code(v: &Bound<'_, PyAny>) -> HookResult<StatusCode> {
    let n: u16 = v.extract().map_err(|_| invalid("a status that is not an int"))?;
    StatusCode::from_u16(n)
        .ok()
        .filter(|s| s.as_u16() >= 200 || s.as_u16() == 101)
        .ok_or_else(|| invalid(format_args!("an invalid status {n}")))
}

fn opt<'py>(t: &Bound<'py, PyTuple>, i: usize) -> HookResult<Option<Bound<'py, PyAny>>> {
    let v = t.get_item(i).map_err(|_| invalid("a short decision"))?;
    Ok((!v.is_none()).then_some(v))
}

fn request_decision(d: &Bound<'_, PyAny>) -> HookResult<RequestDecision> {
    if d.is_none() {
        return Ok(RequestDecision::Continue(RequestEdits::default()));
    }
    let t = d
        .cast::<PyTuple>()
        .map_err(|_| invalid("a decision that is not a tuple"))?;
    let kind: u8 = t
        .get_item(0)
        .and_then(|k| k.extract())
        .map_err(|_| invalid("a decision without a kind"))?;
    if kind == 2 {
        let message: String = t
            .get_item(1)
            .and_then(|m| m.extract())
            .map_err(|_| invalid("a failure without a message"))?;
        return Err(GatewayError::new(ErrorKind::PluginFailed, message));
    }
    if kind == 1 {
        let status = status_code(&t.get_item(1).map_err(|_| invalid("a short decision"))?)?;
        let headers = header_map(&t.get_item(2).map_err(|_| invalid("a short decision"))?)?;
        let body = bytes_of(&t.get_item(3).map_err(|_| invalid("a short decision"))?)?;
        let (consumer, credential) = if t.len() > 5 {
            (consumer_of(opt(t, 4)?)?, consumer_of(opt(t, 5)?)?)
        } else {
            (None, None)
        };
        return Ok(RequestDecision::Respond(EarlyResponse {
            status,
            headers,
            body,
            consumer,
            credential,
        }));
    }
    let mut edits = RequestEdits::default();
    if let Some(m) = opt(t, 1)? {
        let m: String = m.extract().map_err(|_| invalid("a method that is not a str"))?;
        edits.method = Some(
            Method::from_bytes(m.as_bytes()).map_err(|_| invalid(format_args!("an invalid method {m:?}")))?,
        );
    }
    if let Some(p) = opt(t, 2)? {
        let p: String = p.extract().map_err(|_| invalid("a path that is not a str"))?;
        if !p.starts_with('/') {
            return Err(invalid(format_args!(
                "a path that does not start with '/': {p:?}"
            )));
        }
        edits.path = Some(p);
    }
    if let Some(q) = opt(t, 3)? {
        edits.query = Some(q.extract().map_err(|_| invalid("a query that is not a str"))?);
    }
    if let Some(h) = opt(t, 4)? {
        edits.headers = Some(header_edits(&h)?);
    }
    if let Some(b) = opt(t, 5)? {
        edits.body = Some(bytes_of(&b)?);
    }
    if t.len() > 7 {
        edits.consumer = consumer_of(opt(t, 6)?)?;
        edits.credential = consumer_of(opt(t, 7)?)?;
    }
    if t.len() > 8 {
        if let Some(r) = opt(t, 8)? {
            edits.routing = Some(Box::new(routing_of(&r)?));
        }
    }
    Ok(RequestDecision::Continue(edits))
}

/// `(upstream, fallbacks, fallback_on, body_mode)` (see `hooks.py`).
fn routing_of(r: &Bound<'_, PyAny>) -> HookResult<Routing> {
    let t = r
        .cast::<PyTuple>()
        .ok()
        .filter(|t| t.len() == 4)
        .ok_or_else(|| invalid("routing that is not a 4-tuple"))?;
    let mut routing = Routing::default();
    if let Some(u) = opt(t, 0)? {
        routing.upstream = Some(
            u.extract()
                .map_err(|_| invalid("an upstream that is not a str"))?,
        );
    }
    if let Some(list) = opt(t, 1)? {
        let list = list
            .cast_into::<PyList>()
            .map_err(|_| invalid("fallbacks that are not a list"))?;
        for a in list.iter() {
            routing.fallbacks.push(attempt_of(&a)?);
        }
    }
    if let Some(on) = opt(t, 2)? {
        routing.fallback_on = Some(
            on.extract()
                .map_err(|_| invalid("fallback_on that is not a list of statuses"))?,
        );
    }
    if let Some(m) = opt(t, 3)? {
        let m: String = m
            .extract()
            .map_err(|_| invalid("a body mode that is not a str"))?;
        routing.body_mode = Some(match m.as_str() {
            "buffered" => BodyMode::Buffered,
            "streamed" => BodyMode::Streamed,
            _ => return Err(invalid(format_args!("an unknown body mode {m:?}"))),
        });
    }
    Ok(routing)
}

/// `(upstream, method, path, headers, body)` of one fallback.
fn attempt_of(a: &Bound<'_, PyAny>) -> HookResult<Attempt> {
    let t = a
        .cast::<PyTuple>()
        .ok()
        .filter(|t| t.len() == 5)
        .ok_or_else(|| invalid("an attempt that is not a 5-tuple"))?;
    let item = |i: usize| t.get_item(i).map_err(|_| invalid("a short attempt"));
    let upstream: String = item(0)?
        .extract()
        .map_err(|_| invalid("an attempt upstream that is not a str"))?;
    let method = match opt(t, 1)? {
        None => None,
        Some(m) => {
            let m: String = m.extract().map_err(|_| invalid("a method that is not a str"))?;
            Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| invalid(format_args!("an invalid method {m:?}")))?,
            )
        }
    };
    let path = match opt(t, 2)? {
        None => None,
        Some(p) => {
            let p: String = p.extract().map_err(|_| invalid("a path that is not a str"))?;
            if !p.starts_with('/') {
                return Err(invalid(format_args!(
                    "an attempt path that does not start with '/': {p:?}"
                )));
            }
            Some(p)
        }
    };
    Ok(Attempt {
        upstream,
        method,
        path,
        headers: header_map(&item(3)?)?,
        body: bytes_of(&item(4)?)?,
    })
}

/// A consumer or credential name of a decision (`None` when unchanged).
fn consumer_of(v: Option<Bound<'_, PyAny>>) -> HookResult<Option<String>> {
    v.map(|v| {
        v.extract::<String>()
            .map_err(|_| invalid("a consumer that is not a str"))
    })
    .transpose()
}

fn bytes_of(b: &Bound<'_, PyAny>) -> HookResult<Bytes> {
    let b = b
        .cast::<PyBytes>()
        .map_err(|_| invalid("a body that is not bytes"))?;
    Ok(Bytes::copy_from_slice(b.as_bytes()))
}

/// A whole-body hook's result: (the response's decision, the body to send).
fn body_result(out: &Bound<'_, PyAny>) -> HookResult<(ResponseEdits, Bytes)> {
    let (decision, body): (Bound<'_, PyAny>, Bound<'_, PyAny>) = out
        .extract()
        .map_err(|_| invalid("a body result that is not a pair"))?;
    Ok((response_edits(&decision)?, bytes_of(&body)?))
}

fn response_edits(d: &Bound<'_, PyAny>) -> HookResult<ResponseEdits> {
    if d.is_none() {
        return Ok(ResponseEdits::default());
    }
    let t = d
        .cast::<PyTuple>()
        .map_err(|_| invalid("a decision that is not a tuple"))?;
    Ok(ResponseEdits {
        status: opt(t, 0)?.map(|s| status_code(&s)).transpose()?,
        headers: opt(t, 1)?.map(|h| header_edits(&h)).transpose()?,
    })
}

fn state_of(state: &PluginState) -> &Py<PyAny> {
    state
        .downcast_ref::<Py<PyAny>>()
        .expect("plugin state is always the host's request object")
}

enum Waiting {
    Request(oneshot::Sender<HookResult<RequestDecision>>),
    Response(oneshot::Sender<HookResult<ResponseEdits>>),
}

/// Called once, from the host's event loop thread, with `(decision, error)`.
#[pyclass(frozen)]
struct Done {
    tx: Mutex<Option<Waiting>>,
}

#[pymethods]
impl Done {
    fn __call__(&self, decision: &Bound<'_, PyAny>, error: Option<String>) {
        let Some(waiting) = self.tx.lock().ok().and_then(|mut t| t.take()) else {
            return;
        };
        let fail = |e: String| GatewayError::new(ErrorKind::PluginFailed, e);
        // A dropped receiver means the client went away: nothing to tell.
        match waiting {
            Waiting::Request(tx) => {
                let _ = tx.send(match error {
                    Some(e) => Err(fail(e)),
                    None => request_decision(decision),
                });
            }
            Waiting::Response(tx) => {
                let _ = tx.send(match error {
                    Some(e) => Err(fail(e)),
                    None => response_edits(decision),
                });
            }
        }
    }
}

fn pending<T: Send + 'static>(rx: oneshot::Receiver<HookResult<T>>) -> Hook<T> {
    Hook::Pending(Box::pin(async move {
        rx.await.unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorKind::PluginFailed,
                "the plugin event loop dropped the request",
            ))
        })
    }))
}

impl PluginHost for PyHost {
    fn on_request(
        &self,
        chain: u32,
        mode: HookMode,
        view: &RequestView<'_>,
    ) -> (Option<PluginState>, Hook<RequestDecision>) {
        Python::attach(|py| {
            let headers = header_blob(py, view.headers);
            let body = view.body.map(|b| PyBytes::new(py, b));
            // Sampled requests only: (trace id, server span id) for the hooks' spans.
            let span = view.trace.map(|t| (hex(&t.trace_id), hex(&t.span_id)));
            let meta = (
                view.request_id,
                view.client_ip,
                view.route,
                view.host,
                common_str(py, view.scheme),
                common_str(py, view.http_version),
                span,
                view.consumer,
                view.credential,
            );
            let host = self.host.bind(py);
            match mode {
                HookMode::Sync => {
                    let args = (
                        chain,
                        common_str(py, view.method.as_str()),
                        view.path,
                        view.query,
                        headers,
                        body,
                        meta,
                    );
                    let result = host.call_method1(intern!(py, "request"), args).and_then(|r| {
                        let (req, decision): (Py<PyAny>, Bound<'_, PyAny>) = r.extract()?;
                        Ok((req, decision))
                    });
                    match result {
                        Ok((req, decision)) => (
                            Some(Box::new(req) as PluginState),
                            Hook::Ready(request_decision(&decision)),
                        ),
                        Err(e) => (None, Hook::Ready(Err(plugin_error(py, &e)))),
                    }
                }
                HookMode::Async => {
                    let (tx, rx) = oneshot::channel();
                    let done = Done {
                        tx: Mutex::new(Some(Waiting::Request(tx))),
                    };
                    let args = (
                        chain,
                        common_str(py, view.method.as_str()),
                        view.path,
                        view.query,
                        headers,
                        body,
                        meta,
                        done,
                    );
                    match host.call_method1(intern!(py, "request_async"), args) {
                        Ok(req) => (Some(Box::new(req.unbind()) as PluginState), pending(rx)),
                        Err(e) => (None, Hook::Ready(Err(plugin_error(py, &e)))),
                    }
                }
            }
        })
    }

    fn on_response(
        &self,
        chain: u32,
        mode: HookMode,
        state: &PluginState,
        status: StatusCode,
        headers: &HeaderMap,
        fell_back: Option<&FellBack>,
    ) -> Hook<ResponseEdits> {
        Python::attach(|py| {
            let req = state_of(state).bind(py);
            let blob = header_blob(py, headers);
            let host = self.host.bind(py);
            match mode {
                HookMode::Sync => {
                    let answer = match fell_back {
                        None => {
                            host.call_method1(intern!(py, "response"), (chain, req, status.as_u16(), blob))
                        }
                        Some(f) => host.call_method1(
                            intern!(py, "response"),
                            (chain, req, status.as_u16(), blob, f.attempt, f.skipped.clone()),
                        ),
                    };
                    match answer {
                        Ok(d) => Hook::Ready(response_edits(&d)),
                        Err(e) => Hook::Ready(Err(plugin_error(py, &e))),
                    }
                }
                HookMode::Async => {
                    let (tx, rx) = oneshot::channel();
                    let done = Done {
                        tx: Mutex::new(Some(Waiting::Response(tx))),
                    };
                    let (attempt, skipped) = match fell_back {
                        None => (0, None),
                        Some(f) => (f.attempt, Some(f.skipped.clone())),
                    };
                    let args = (chain, req, status.as_u16(), blob, done, attempt, skipped);
                    match host.call_method1(intern!(py, "response_async"), args) {
                        Ok(_) => pending(rx),
                        Err(e) => Hook::Ready(Err(plugin_error(py, &e))),
                    }
                }
            }
        })
    }

    fn on_response_body(
        &self,
        chain: u32,
        state: &PluginState,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> HookResult<(ResponseEdits, Bytes)> {
        Python::attach(|py| {
            let req = state_of(state).bind(py);
            let trailers = trailers.map(|t| header_blob(py, t));
            let out = self
                .host
                .bind(py)
                .call_method1(
                    intern!(py, "response_body"),
                    (chain, req, PyBytes::new(py, &body), trailers),
                )
                .map_err(|e| plugin_error(py, &e))?;
            body_result(&out)
        })
    }

    fn on_response_whole(
        &self,
        chain: u32,
        state: &PluginState,
        status: StatusCode,
        headers: &HeaderMap,
        fell_back: Option<&FellBack>,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> HookResult<(ResponseEdits, Bytes)> {
        Python::attach(|py| {
            let req = state_of(state).bind(py);
            let blob = header_blob(py, headers);
            let trailers = trailers.map(|t| header_blob(py, t));
            let (attempt, skipped) = match fell_back {
                None => (0, None),
                Some(f) => (f.attempt, Some(f.skipped.clone())),
            };
            let args = (
                chain,
                req,
                status.as_u16(),
                blob,
                PyBytes::new(py, &body),
                trailers,
                attempt,
                skipped,
            );
            let out = self
                .host
                .bind(py)
                .call_method1(intern!(py, "response_whole"), args)
                .map_err(|e| plugin_error(py, &e))?;
            body_result(&out)
        })
    }

    fn on_response_chunk(
        &self,
        chain: u32,
        state: &PluginState,
        chunk: Bytes,
        last: bool,
    ) -> HookResult<Bytes> {
        Python::attach(|py| {
            let req = state_of(state).bind(py);
            let out = self
                .host
                .bind(py)
                .call_method1(
                    intern!(py, "response_chunk"),
                    (chain, req, PyBytes::new(py, &chunk), last),
                )
                .map_err(|e| plugin_error(py, &e))?;
            bytes_of(&out)
        })
    }

    fn log(&self, record: LogRecord) {
        // The drain task ends only when this host is dropped, so the send cannot fail
        // while we hold `self`.
        let _ = self.logs.send(record);
    }
}
