// A small SVG line chart: time on x, one or more series on y, a gap wherever a value is
// null (a bucket without requests has no latency). No dependencies; the dashboard makes no
// request outside the status listener.

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 200;
const PAD = { left: 64, right: 14, top: 12, bottom: 26 };
const TIME_STEPS = [
  10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800,
];

function svg(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function html(name, attrs, parent) {
  const node = document.createElement(name);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  if (parent) parent.appendChild(node);
  return node;
}

// Round tick values from 0 to at least `max`: steps of 1, 2, 2.5 or 5 times a power of ten.
export function niceTicks(max, count = 4) {
  const top = max > 0 ? max : 1;
  const raw = top / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let v = 0; v < top + step * 0.999; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// Tick times (Unix seconds) on round local-clock boundaries, about `count` of them.
export function timeTicks(from, to, count = 6) {
  const span = Math.max(to - from, 1);
  const step = TIME_STEPS.find((s) => span / s <= count) || 86400 * Math.ceil(span / 86400 / count);
  const offset = new Date(from * 1000).getTimezoneOffset() * 60; // align on local midnight
  const ticks = [];
  for (let t = Math.ceil((from - offset) / step) * step + offset; t <= to; t += step) ticks.push(t);
  return { ticks, step };
}

function timeLabel(t, step) {
  const d = new Date(t * 1000);
  if (step >= 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  const opts = { hour: "2-digit", minute: "2-digit" };
  if (step < 60) opts.second = "2-digit";
  return d.toLocaleTimeString([], opts);
}

// The path of one series: segments between gaps ("M" starts each one).
function pathOf(points, x, y) {
  let d = "";
  let pen = false;
  for (const [t, v] of points) {
    if (v === null || v === undefined || !Number.isFinite(v)) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    pen = true;
  }
  return d;
}

// Draw into `container` (emptied first).
//   options.from, options.to: the time domain (Unix seconds)
//   options.series: [{ name, color, points: [[t, value or null], ...] }]
//   options.format: value -> label for the y axis and the tooltip
export function lineChart(container, { from, to, series, format }) {
  // drawn at the container's own width, so text keeps its size (redraw when it changes)
  const width = Math.max(container.clientWidth, 240);
  container.replaceChildren();
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
  const yTicks = niceTicks(Math.max(0, ...values));
  const yMax = yTicks[yTicks.length - 1];
  const plotW = width - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - from) / Math.max(to - from, 1)) * plotW;
  const y = (v) => PAD.top + plotH - (v / yMax) * plotH;

  const root = svg("svg", {
    width: width,
    height: HEIGHT,
    viewBox: `0 0 ${width} ${HEIGHT}`,
    role: "img",
    "aria-label": series.map((s) => s.name).join(", "),
    "data-points": values.length,
    "data-max": values.length ? Math.max(...values) : "",
  }, container);

  for (const v of yTicks) {
    svg("line", { class: "grid", x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v) }, root);
    const label = svg("text", { class: "tick", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, root);
    label.textContent = format(v);
  }
  const { ticks, step } = timeTicks(from, to);
  for (const t of ticks) {
    svg("line", { class: "grid", x1: x(t), x2: x(t), y1: PAD.top, y2: PAD.top + plotH }, root);
    const label = svg("text", { class: "tick", x: x(t), y: HEIGHT - 8, "text-anchor": "middle" }, root);
    label.textContent = timeLabel(t, step);
  }

  if (!values.length) {
    const empty = svg("text", { class: "empty", x: width / 2, y: HEIGHT / 2, "text-anchor": "middle" }, root);
    empty.textContent = "no requests in this range";
  }
  for (const s of series) {
    svg("path", { class: "line", d: pathOf(s.points, x, y), stroke: s.color, "data-series": s.name }, root);
    // a bucket with gaps on both sides draws no line: a dot shows it
    s.points.forEach(([t, v], i) => {
      const lone = !Number.isFinite(s.points[i - 1]?.[1]) && !Number.isFinite(s.points[i + 1]?.[1]);
      if (Number.isFinite(v) && lone) svg("circle", { class: "dot", cx: x(t), cy: y(v), r: 2.5, fill: s.color }, root);
    });
  }

  const legend = html("div", { class: "legend" }, container);
  for (const s of series) {
    const item = html("span", { class: "key" }, legend);
    html("i", { class: "swatch" }, item).style.background = s.color;
    item.append(s.name);
  }
  hover(container, root, { series, x, format, plotH, from, to, width });
}

// A rule and the values of the nearest bucket under the pointer.
function hover(container, root, { series, x, format, plotH, from, to, width }) {
  const times = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  if (!times.length) return;
  const rule = svg("line", { class: "rule", y1: PAD.top, y2: PAD.top + plotH, visibility: "hidden" }, root);
  const tip = html("div", { class: "tip", hidden: "" }, container);
  root.addEventListener("pointermove", (event) => {
    const box = root.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * width;
    const t = from + ((px - PAD.left) / (width - PAD.left - PAD.right)) * (to - from);
    const nearest = times.reduce((a, b) => (Math.abs(b - t) < Math.abs(a - t) ? b : a));
    rule.setAttribute("x1", x(nearest));
    rule.setAttribute("x2", x(nearest));
    rule.setAttribute("visibility", "visible");
    const when = new Date(nearest * 1000).toLocaleString([], {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
    tip.replaceChildren(html("div", { class: "when", text: when }));
    for (const s of series) {
      const point = s.points.find((p) => p[0] === nearest);
      const v = point ? point[1] : null;
      tip.append(html("div", { text: `${s.name}: ${Number.isFinite(v) ? format(v) : "–"}` }));
    }
    tip.hidden = false;
    tip.style.left = `${Math.min(event.clientX - box.left + 12, box.width - 160)}px`;
  });
  root.addEventListener("pointerleave", () => {
    rule.setAttribute("visibility", "hidden");
    tip.hidden = true;
  });
}
