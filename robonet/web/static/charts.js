// Per-robot telemetry history (bounded) and its uPlot chart.
// uPlot is the vendored vendor/uPlot.iife.min.js, loaded as a classic script (global `uPlot`).

export const FIELDS = ["battery", "cpu", "temperature", "signal"];
export const WINDOW_S = 600; // keep the last 10 minutes of a robot's data
export const MAX_POINTS = 3000; // and never more points than this (10 min at 5 Hz)

const SERIES = {
  battery: { label: "Battery %", color: "--c-battery", scale: "pct" },
  cpu: { label: "CPU %", color: "--c-cpu", scale: "pct" },
  temperature: { label: "Temp °C", color: "--c-temp", scale: "degc" },
  signal: { label: "Signal %", color: "--c-signal", scale: "pct" },
};

/** Time-ordered columns: t (Unix seconds) and one array per field (null where unknown). */
export class TelemetryBuffer {
  constructor() {
    this.t = [];
    this.cols = Object.fromEntries(FIELDS.map((f) => [f, []]));
  }

  get length() {
    return this.t.length;
  }

  /** Add one sample; `values` maps field -> number|null. Out-of-order samples are inserted in place. */
  push(t, values) {
    let i = this.t.length;
    while (i > 0 && this.t[i - 1] > t) i -= 1;
    this.t.splice(i, 0, t);
    for (const f of FIELDS) this.cols[f].splice(i, 0, values[f] ?? null);
    this._trim();
  }

  /** Merge /api/battery-history/ rows [[epoch_ms, battery], ...] (older data; battery only). */
  prefill(rows) {
    if (!Array.isArray(rows)) return;
    for (const row of rows) {
      if (!Array.isArray(row) || row.length < 2) continue;
      const [ms, battery] = row;
      if (typeof ms !== "number" || !Number.isFinite(ms)) continue;
      const t = ms / 1000;
      if (this.t.includes(t)) continue;
      this.push(t, { battery: typeof battery === "number" ? battery : null });
    }
  }

  _trim() {
    const n = this.t.length;
    if (n === 0) return;
    const cutoff = this.t[n - 1] - WINDOW_S;
    let drop = 0;
    while (drop < n && this.t[drop] < cutoff) drop += 1;
    drop = Math.max(drop, n - MAX_POINTS);
    if (drop > 0) {
      this.t.splice(0, drop);
      for (const f of FIELDS) this.cols[f].splice(0, drop);
    }
  }

  /** uPlot's data layout, copied: uPlot keeps what it is given until the next setData. */
  data() {
    return [this.t.slice(), ...FIELDS.map((f) => this.cols[f].slice())];
  }
}

const MIN_SPAN_S = 60;

// uPlot passes the data's min and max, except for a single sample, which it widens by 1000
// days (a span the bounded buffer never has). (u.data may still be the previous data here.)
function timeRange(min, max) {
  if (min === null || max === null) return [min, max];
  if (max - min > 86400) max = min;
  if (max - min < MIN_SPAN_S) return [max - MIN_SPAN_S, max + 1];
  return [min, max];
}

function clock(unixS, seconds) {
  const opts = { hour: "2-digit", minute: "2-digit", hour12: false };
  if (seconds) opts.second = "2-digit";
  return new Date(unixS * 1000).toLocaleTimeString([], opts);
}

function tempRange(min, max) {
  if (min === null || max === null || !Number.isFinite(min) || !Number.isFinite(max)) return [0, 100];
  if (max - min >= 20) return [Math.floor(min), Math.ceil(max)];
  const mid = (min + max) / 2;
  return [Math.floor(mid - 10), Math.ceil(mid + 10)];
}

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

/** Create a chart of `buffer` inside `container`, sized to its width; returns the uPlot instance. */
export function makeChart(container, buffer) {
  const grid = cssVar("--grid", "#e4e7ec");
  const muted = cssVar("--muted", "#667085");
  const font = "11px system-ui, sans-serif";
  const axis = { stroke: muted, font, gap: 4, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1, size: 4 } };
  const opts = {
    width: Math.max(200, container.clientWidth),
    height: 150,
    padding: [8, 4, 0, 0],
    cursor: { drag: { x: false, y: false }, points: { size: 6 } },
    legend: { live: true },
    scales: {
      // Show at least the last minute (uPlot widens one sample to 1000 days otherwise).
      x: { time: true, range: (u, min, max) => timeRange(min, max) },
      pct: { range: [0, 100] },
      // Temperatures drift slowly: show at least a 20 degree span so noise stays small.
      degc: { range: (u, min, max) => tempRange(min, max) },
    },
    axes: [
      { ...axis, size: 24, space: 60, values: (u, ticks, i, space, incr) => ticks.map((t) => clock(t, incr < 60)) },
      { ...axis, scale: "pct", size: 42, values: (u, ticks) => ticks.map((v) => `${v}%`) },
      { ...axis, scale: "degc", side: 1, size: 36, grid: { show: false }, values: (u, ticks) => ticks.map((v) => `${v}°`) },
    ],
    series: [
      {},
      ...FIELDS.map((f) => ({
        label: SERIES[f].label,
        scale: SERIES[f].scale,
        stroke: cssVar(SERIES[f].color, "#888"),
        width: 1.5,
        spanGaps: true,
        points: { show: false },
        value: (u, v) => (v === null || v === undefined ? "" : v.toFixed(1)),
      })),
    ],
  };
  // eslint-disable-next-line no-undef
  const chart = new uPlot(opts, buffer.data(), container);
  new ResizeObserver(() => {
    const w = Math.max(200, container.clientWidth);
    if (w !== chart.width) chart.setSize({ width: w, height: 150 });
  }).observe(container);
  return chart;
}
