// The dashboard: reads the analytics and alerts APIs of the status listener (the browser
// sends the admin token as its HttpOnly cookie) and draws them. Refreshes every 10 s.

import { lineChart } from "./chart.js";

const RANGES = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
const DEFAULT_RANGE = "1h";
const REFRESH_MS = 10000;
const POINTS = 120; // buckets per chart at most; the server rounds the step up to its resolution
const TOP = 10;
const COLORS = { rps: "#2563eb", p50: "#16a34a", p95: "#d97706", p99: "#dc2626", errors: "#dc2626" };
const CLASS_COLORS = { "1xx": "#64748b", "2xx": "#16a34a", "3xx": "#2563eb", "4xx": "#d97706", "5xx": "#dc2626" };

const state = { range: rangeFromHash(), timer: null, generation: 0, series: null };

// ---- formatting --------------------------------------------------------------------------

const count = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));

function rate(r) {
  if (r === null || r === undefined) return "–";
  const pct = r * 100;
  return `${pct.toFixed(pct !== 0 && pct < 1 ? 2 : 1)}%`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s >= 1) return `${s.toFixed(2)} s`;
  const ms = s * 1000;
  return `${ms.toFixed(ms < 10 ? 2 : ms < 100 ? 1 : 0)} ms`;
}

function perSecond(n) {
  if (n === null || n === undefined) return "–";
  return n < 10 ? n.toFixed(2) : n.toFixed(1);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const clock = (t) => new Date(t * 1000).toLocaleTimeString();

// ---- data ---------------------------------------------------------------------------------

function rangeFromHash() {
  const match = /range=([0-9a-z]+)/.exec(location.hash);
  return match && RANGES[match[1]] ? match[1] : DEFAULT_RANGE;
}

async function getJSON(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (res.status === 401) {
    location.assign("/dashboard"); // the token changed or the cookie is gone: sign in again
    throw new Error("signed out");
  }
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      message = (await res.json()).error.message;
    } catch {
      // not our JSON error shape; the status says enough
    }
    throw new Error(`${url.pathname}: ${message}`);
  }
  return res.json();
}

async function refresh() {
  const generation = ++state.generation;
  const span = RANGES[state.range];
  const range = { from: `-${state.range}` };
  try {
    const [series, routes, consumers, statuses, summary, alerts] = await Promise.all([
      getJSON("/api/analytics/timeseries", { ...range, step: Math.ceil(span / POINTS) }),
      getJSON("/api/analytics/top", { ...range, by: "route", limit: TOP }),
      getJSON("/api/analytics/top", { ...range, by: "consumer", limit: TOP }),
      getJSON("/api/analytics/statuses", range),
      getJSON("/api/analytics/summary", range),
      getJSON("/api/alerts"),
    ]);
    if (generation !== state.generation) return; // a newer refresh (another range) won
    state.series = series;
    drawCharts(series);
    drawSummary(summary, series);
    drawTop(document.querySelector("#top-routes tbody"), routes.rows);
    drawTop(document.querySelector("#top-consumers tbody"), consumers.rows);
    drawStatuses(statuses);
    drawAlerts(alerts);
    showError(null);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (generation === state.generation) showError(err.message);
  }
}

// ---- drawing ------------------------------------------------------------------------------

function drawCharts(ts) {
  // Buckets without requests have no latency or error rate (a gap, not a zero).
  const pick = (key) => ts.points.map((p) => [p.t, p.requests ? p[key] : null]);
  // The last bucket is still filling up: its rate is over the part that has passed, or
  // it would read as a drop in traffic.
  const rps = ts.points.map((p) => [p.t, p.requests / Math.max(Math.min(ts.to - p.t, ts.step), 1)]);
  const domain = { from: ts.from, to: ts.to };
  lineChart(document.querySelector("#chart-rps .plot"), {
    ...domain,
    series: [{ name: "requests/s", color: COLORS.rps, points: rps }],
    format: perSecond,
  });
  lineChart(document.querySelector("#chart-latency .plot"), {
    ...domain,
    series: ["p50", "p95", "p99"].map((q) => ({ name: q, color: COLORS[q], points: pick(q) })),
    format: seconds,
  });
  lineChart(document.querySelector("#chart-errors .plot"), {
    ...domain,
    series: [{ name: "error rate", color: COLORS.errors, points: pick("error_rate") }],
    format: rate,
  });
}

function drawSummary(summary, ts) {
  const span = Math.max((summary.to ?? ts.to) - (summary.from ?? ts.from), 1);
  const values = {
    requests: count(summary.requests),
    rps: perSecond(summary.rps ?? (summary.requests ?? 0) / span),
    error_rate: rate(summary.error_rate),
    p95: seconds(summary.p95),
  };
  for (const [field, text] of Object.entries(values)) {
    document.querySelector(`#summary [data-field="${field}"]`).textContent = text;
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function drawTop(tbody, rows) {
  tbody.replaceChildren();
  if (!rows.length) {
    cell(tbody.insertRow(), "no requests in this range", "empty").colSpan = 7;
    return;
  }
  for (const r of rows) {
    const row = tbody.insertRow();
    row.dataset.key = r.key;
    cell(row, r.key === null || r.key === "" ? "(none)" : r.key, "key");
    cell(row, count(r.requests), "num requests");
    cell(row, rate(r.error_rate), r.error_rate > 0.05 ? "num bad" : "num");
    cell(row, seconds(r.p50), "num");
    cell(row, seconds(r.p95), "num");
    cell(row, seconds(r.p99), "num");
    cell(row, bytes(r.bytes_out), "num");
  }
}

function drawStatuses({ rows, classes }) {
  const total = Object.values(classes).reduce((a, b) => a + b, 0);
  const bar = document.getElementById("status-bar");
  bar.replaceChildren();
  for (const [name, n] of Object.entries(classes)) {
    if (!n) continue;
    const segment = document.createElement("span");
    segment.className = "segment";
    segment.dataset.class = name;
    segment.title = `${name}: ${count(n)} (${rate(n / total)})`;
    segment.textContent = n / total >= 0.08 ? name : "";
    segment.style.width = `${(100 * n) / total}%`;
    segment.style.background = CLASS_COLORS[name] || "#64748b";
    bar.append(segment);
  }
  const tbody = document.querySelector("#statuses tbody");
  tbody.replaceChildren();
  for (const r of [...rows].sort((a, b) => b.requests - a.requests)) {
    const row = tbody.insertRow();
    cell(row, String(r.status), `status s${String(r.status)[0]}xx`);
    cell(row, count(r.requests), "num");
    cell(row, rate(r.requests / total), "num");
  }
}

function drawAlerts({ alerts, enabled }) {
  const list = document.getElementById("alert-list");
  const section = document.getElementById("alerts");
  list.replaceChildren();
  const active = alerts.filter((a) => a.ended === null);
  section.classList.toggle("firing", active.length > 0);
  const shown = [...active, ...alerts.filter((a) => a.ended !== null).slice(0, 5)];
  if (!shown.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = enabled === false ? "Anomaly alerts are off (see `alerts` in the config)." : "No anomalies.";
    list.append(li);
    return;
  }
  for (const a of shown) {
    const li = document.createElement("li");
    li.className = a.ended === null ? "active" : "resolved";
    li.dataset.kind = a.kind;
    li.dataset.series = a.series;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = a.kind.replace("_", " ");
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = a.ended === null ? `since ${clock(a.started)}` : `${clock(a.started)} – ${clock(a.ended)}`;
    li.append(badge, ` ${a.message} `, when);
    list.append(li);
  }
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

// ---- controls -----------------------------------------------------------------------------

function selectRange(name) {
  state.range = name;
  history.replaceState(null, "", `#range=${name}`);
  for (const b of document.querySelectorAll(".ranges button")) {
    b.setAttribute("aria-pressed", String(b.dataset.range === name));
  }
  refresh();
}

function schedule() {
  clearInterval(state.timer);
  state.timer = null;
  if (document.getElementById("auto-refresh").checked && !document.hidden) {
    state.timer = setInterval(refresh, REFRESH_MS);
  }
}

function start() {
  for (const b of document.querySelectorAll(".ranges button")) {
    b.addEventListener("click", () => selectRange(b.dataset.range));
  }
  document.getElementById("auto-refresh").addEventListener("change", schedule);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
    schedule();
  });
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => state.series && drawCharts(state.series), 150);
  });
  selectRange(state.range);
  schedule();
}

start();
