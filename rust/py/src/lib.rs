//! `ferrogate._core`: the thin binding between the Python control plane and the engine.
//! Everything here converts types and releases the GIL; behaviour lives in the engine.

mod host;

use ferrogate_engine::config::GatewayConfig;
use ferrogate_engine::plugins::HostLoader;
use ferrogate_engine::router::Router;
use ferrogate_engine::trace::{self, AttrValue};
use ferrogate_engine::{echo, server, Engine};
use host::PyLoader;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};
use std::path::PathBuf;
use std::sync::Arc;

/// Compile a normalized config as a worker would; returns `(path, message)` problems.
#[pyfunction]
fn check_config(config_json: &str) -> Vec<(String, String)> {
    Engine::check(config_json)
        .into_iter()
        .map(|p| (p.path, p.message))
        .collect()
}

/// The compiled route table in precedence order.
#[pyfunction]
fn route_table<'py>(py: Python<'py>, config_json: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let cfg = GatewayConfig::from_json(config_json).map_err(PyValueError::new_err)?;
    let engine = Engine::build(&cfg, None)
        .map_err(|p| PyValueError::new_err(p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")))?;
    table_rows(py, &engine.router)
}

fn table_rows<'py>(py: Python<'py>, router: &Router) -> PyResult<Vec<Bound<'py, PyDict>>> {
    router
        .table()
        .into_iter()
        .map(|row| {
            let d = PyDict::new(py);
            d.set_item("host", row.host)?;
            d.set_item("path", row.path)?;
            d.set_item("route", row.route)?;
            d.set_item("methods", row.methods)?;
            d.set_item("predicates", row.predicates)?;
            d.set_item("priority", row.priority)?;
            d.set_item("upstream", row.upstream)?;
            d.set_item("rewrite", row.rewrite)?;
            Ok(d)
        })
        .collect()
}

/// Run one worker on the given listening sockets until SIGTERM (GIL released).
///
/// `plugin_loader(config_json) -> Host | None` builds the plugin host of each config
/// generation (`ferrogate.plugin_host.load`); without it, routes with plugins fail.
/// `limits=(fd, limit bytes, quota bytes)` is the node's shared rate limit and quota tables
/// (a memfd from the master); without it the worker counts alone. `health=(fd, bytes)` is
/// the node's board of active health check results; without it the worker probes alone.
/// `tls_fds` are listening sockets that terminate TLS with the config's `tls` settings.
#[pyfunction]
#[pyo3(signature = (listen_fds, config_path, worker_id, plugin_loader=None, limits=None, health=None, tls_fds=None))]
#[allow(clippy::too_many_arguments)]
fn serve(
    py: Python<'_>,
    listen_fds: Vec<i32>,
    config_path: PathBuf,
    worker_id: usize,
    plugin_loader: Option<Py<PyAny>>,
    limits: Option<(i32, usize, usize)>,
    health: Option<(i32, usize)>,
    tls_fds: Option<Vec<i32>>,
) -> PyResult<()> {
    let loader = plugin_loader.map(|load| Arc::new(PyLoader { load }) as Arc<dyn HostLoader>);
    let tls_fds = tls_fds.unwrap_or_default();
    py.detach(|| {
        server::serve(
            &listen_fds,
            &tls_fds,
            &config_path,
            worker_id,
            loader,
            limits,
            health,
        )
    })
    .map_err(PyRuntimeError::new_err)
}

/// Queue a finished span of a sampled trace with this worker's tracer (Python plugin hooks);
/// False when tracing is off here or its queue is full.
#[pyfunction]
#[pyo3(signature = (trace_id, parent_span_id, name, start_ns, end_ns, attributes, error=None))]
fn record_span(
    trace_id: &str,
    parent_span_id: &str,
    name: String,
    start_ns: u64,
    end_ns: u64,
    attributes: &Bound<'_, PyDict>,
    error: Option<String>,
) -> PyResult<bool> {
    let trace_id = trace::from_hex::<16>(trace_id)
        .ok_or_else(|| PyValueError::new_err("trace_id must be 32 lower-case hex digits"))?;
    let parent_span = trace::from_hex::<8>(parent_span_id)
        .ok_or_else(|| PyValueError::new_err("parent_span_id must be 16 lower-case hex digits"))?;
    let mut attrs = Vec::with_capacity(attributes.len());
    for (k, v) in attributes.iter() {
        let key: String = k.extract()?;
        // bool before int: a Python bool is an int too.
        let value = if let Ok(b) = v.cast::<PyBool>() {
            AttrValue::Bool(b.is_true())
        } else if let Ok(i) = v.extract::<i64>() {
            AttrValue::Int(i)
        } else if let Ok(f) = v.extract::<f64>() {
            AttrValue::Float(f)
        } else {
            AttrValue::Str(v.str()?.to_string())
        };
        attrs.push((key, value));
    }
    Ok(trace::record_span(trace::ExtraSpan {
        trace_id,
        parent_span,
        name,
        start_unix_ns: start_ns,
        end_unix_ns: end_ns,
        attributes: attrs,
        error,
    }))
}

/// Run the built-in echo upstream on a listening socket until SIGTERM (GIL released).
#[pyfunction]
fn serve_echo(py: Python<'_>, listen_fd: i32) -> PyResult<()> {
    py.detach(|| echo::serve_echo(listen_fd))
        .map_err(PyRuntimeError::new_err)
}

/// The profile-guided build's training load (`cext/pgo.py`): a gateway with the echo
/// upstream behind it on loopback, driven with the usual requests, every answer checked;
/// the number of requests. Its threads serve until the process exits (GIL released).
#[pyfunction]
fn train_load(py: Python<'_>) -> PyResult<u64> {
    py.detach(ferrogate_engine::train::run)
        .map_err(PyRuntimeError::new_err)
}

/// SHA-256 of `text`'s UTF-8 bytes in lower-case hex: the form API keys are stored and
/// looked up in. One call, where `hashlib` takes three and sets up an OpenSSL context.
#[pyfunction]
fn sha256_hex(text: &str) -> String {
    trace::hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// GCRA for plugins, shared by the node's workers: take `cost` units from `key`'s bucket
/// (`per_second` refill, `burst` capacity); 0.0 when allowed (and charged), else the
/// seconds until it would be (nothing charged).
#[pyfunction]
fn rate_take(key: &str, per_second: f64, burst: f64, cost: f64) -> f64 {
    ferrogate_engine::counters::rate_take(key, per_second, burst, cost)
}

/// Charge (`delta` > 0) or refund (`delta` < 0) `key`'s bucket without a check.
#[pyfunction]
fn rate_adjust(key: &str, per_second: f64, burst: f64, delta: f64) {
    let _ = burst; // the bucket's state does not depend on its capacity
    ferrogate_engine::counters::rate_adjust(key, per_second, delta)
}

/// Add `amount` to `key`'s total in `window` if it stays within `limit`: the new total,
/// else -1.
#[pyfunction]
fn budget_reserve(key: &str, window: i64, amount: u64, limit: u64) -> i64 {
    ferrogate_engine::counters::budget_reserve(key, window, amount, limit)
}

/// Add `delta` to `key`'s total in `window` (never below 0); the new total.
#[pyfunction]
fn budget_adjust(key: &str, window: i64, delta: i64) -> i64 {
    ferrogate_engine::counters::budget_adjust(key, window, delta)
}

/// `key`'s total in `window`.
#[pyfunction]
fn budget_used(key: &str, window: i64) -> i64 {
    ferrogate_engine::counters::budget_used(key, window)
}

/// A usage row of the AI pass-through, as `ferrogate/ai/usage.py` reads it.
type UsageTuple<'py> = (
    (f64, String, String, String, String, String, String, String),
    (u64, u64, i64, f64, u16),
    Option<Bound<'py, PyAny>>,
);

/// The AI pass-through's usage rows queued since the last call (`ai_fast.rs`), and how many
/// were dropped because nobody took them: ((time, request_id, route, consumer, model,
/// deployment, provider, provider_model), (prompt_tokens, completion_tokens, cost
/// (micro-USD), latency_ms, status), estimate). `estimate` is None, or for an answer without usage
/// (request body, answer, [(tpm key, rate, burst, tokens charged)], [(budget key, window)],
/// micro-USD reserved, price in, price out).
#[pyfunction]
fn ai_usage_take(py: Python<'_>) -> PyResult<(Vec<UsageTuple<'_>>, u64)> {
    let (rows, dropped) = ferrogate_engine::ai_fast::take_usage();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let estimate = match r.estimate {
            None => None,
            Some(e) => Some(
                (
                    pyo3::types::PyBytes::new(py, &e.request),
                    pyo3::types::PyBytes::new(py, &e.answer),
                    e.limits,
                    e.budgets,
                    e.reserved,
                    e.price_in,
                    e.price_out,
                )
                    .into_pyobject(py)?
                    .into_any(),
            ),
        };
        out.push((
            (
                r.time,
                r.request_id,
                r.route.to_string(),
                r.consumer.to_string(),
                r.model.to_string(),
                r.deployment.to_string(),
                r.provider.to_string(),
                r.provider_model.to_string(),
            ),
            (
                r.prompt_tokens,
                r.completion_tokens,
                r.cost,
                r.latency_ms,
                r.status,
            ),
            estimate,
        ));
    }
    Ok((out, dropped))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Set by `cext/pgo.py` for the build that uses the training load's counts.
    m.add("__build__", option_env!("FERROGATE_BUILD").unwrap_or("plain"))?;
    m.add_function(wrap_pyfunction!(check_config, m)?)?;
    m.add_function(wrap_pyfunction!(route_table, m)?)?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(serve_echo, m)?)?;
    m.add_function(wrap_pyfunction!(train_load, m)?)?;
    m.add_function(wrap_pyfunction!(record_span, m)?)?;
    m.add_function(wrap_pyfunction!(sha256_hex, m)?)?;
    m.add_function(wrap_pyfunction!(rate_take, m)?)?;
    m.add_function(wrap_pyfunction!(rate_adjust, m)?)?;
    m.add_function(wrap_pyfunction!(budget_reserve, m)?)?;
    m.add_function(wrap_pyfunction!(budget_adjust, m)?)?;
    m.add_function(wrap_pyfunction!(budget_used, m)?)?;
    m.add_function(wrap_pyfunction!(ai_usage_take, m)?)?;
    Ok(())
}
