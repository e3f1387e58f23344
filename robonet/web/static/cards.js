// One card per robot: live battery/cpu/temperature/signal, a chart of the recent minutes,
// the latest ultrasonic scan (polar plot) and the latest video frame.
//
// Updates only mark the card dirty; render() applies them, at most one chart redraw per
// CHART_MIN_MS, so a robot sending at 50 Hz costs a few DOM writes a second.

import { FIELDS, TelemetryBuffer, makeChart } from "./charts.js";
import { drawPolar, scanPoints } from "./polar.js";
import { clockTime, el, fixed, num, setText } from "./util.js";

const CHART_MIN_MS = 500;
const MAX_FRAME_CHARS = 4 * 1024 * 1024;

const METRICS = {
  battery: { label: "Battery", unit: "%", digits: 0, level: (v) => (v < 20 ? "bad" : v < 40 ? "warn" : "ok") },
  cpu: { label: "CPU", unit: "%", digits: 0, level: (v) => (v > 90 ? "bad" : v > 70 ? "warn" : "ok") },
  temperature: { label: "Temp", unit: "°C", digits: 1, level: (v) => (v > 75 ? "bad" : v > 60 ? "warn" : "ok") },
  signal: { label: "Signal", unit: "%", digits: 0, level: (v) => (v < 25 ? "bad" : v < 50 ? "warn" : "ok") },
};

export class RobotCard {
  constructor(deviceId) {
    this.id = deviceId;
    this.buffer = new TelemetryBuffer();
    this.values = {};
    this.telemetryAt = 0; // Unix s of the newest telemetry shown
    this.scan = null; // {points, at}
    this.frame = null; // {data, at}
    this.chart = null;
    this.chartAt = 0;
    this.historyLoaded = false;
    this.head = null; // name, status, face as last given to setDevice
    this.visible = false; // set by the app's IntersectionObserver; only visible cards render
    this.dirty = new Set(["metrics"]);

    this.nameEl = el("h3", { class: "card-title", text: deviceId });
    this.statusEl = el("span", { class: "badge", "data-role": "status", text: "–" });
    this.metaEl = el("span", { class: "card-meta" });
    this.metricEls = {};
    const metrics = el("div", { class: "metrics" });
    this.metricsEl = metrics;
    for (const f of FIELDS) {
      const m = METRICS[f];
      const value = el("span", { class: "metric-value", text: "–" });
      const bar = el("i");
      const box = el(
        "div",
        { class: "metric", dataset: { field: f } },
        el("span", { class: "metric-label", text: m.label }),
        value,
        el("span", { class: "metric-bar" }, bar),
      );
      metrics.append(box);
      this.metricEls[f] = { box, value, bar };
    }
    this.chartEl = el("div", { class: "chart", "aria-label": `telemetry chart of ${deviceId}` });
    this.scanCanvas = el("canvas", { class: "polar", "aria-label": `ultrasonic scan of ${deviceId}` });
    this.scanCaption = el("figcaption", { text: "Ultrasonic scan" });
    this.scanFig = el("figure", { class: "scan", hidden: true }, this.scanCanvas, this.scanCaption);
    this.frameImg = el("img", { class: "frame", alt: `latest video frame of ${deviceId}` });
    this.frameCaption = el("figcaption", { text: "Video" });
    this.frameFig = el("figure", { class: "video", hidden: true }, this.frameImg, this.frameCaption);
    this.noteEl = el("p", { class: "card-note", hidden: true });
    // History download: the stored messages of this robot from /api/export (issue 10).
    const token = new URLSearchParams(location.search).get("token");
    const exportUrl = (fmt) =>
      `/api/export?device_id=${encodeURIComponent(deviceId)}&format=${fmt}` +
      (token ? `&token=${encodeURIComponent(token)}` : "");
    this.downloadEl = el(
      "p",
      { class: "history-download" },
      el("a", { href: exportUrl("csv"), download: "", "data-format": "csv", text: "Download history (CSV)" }),
      " · ",
      el("a", { href: exportUrl("mcap"), download: "", "data-format": "mcap", text: "MCAP" }),
    );

    this.root = el(
      "article",
      { class: "card robot", dataset: { deviceId, status: "unknown" } },
      el("header", { class: "card-head" }, this.nameEl, this.statusEl, this.metaEl),
      metrics,
      this.chartEl,
      this.downloadEl,
      el("div", { class: "extras" }, this.scanFig, this.frameFig),
      this.noteEl,
    );
    new ResizeObserver(() => {
      if (this.scan) this.dirty.add("scan");
    }).observe(this.scanCanvas);
  }

  /** Name, status and face from a registry DEVICE record (applied at the next render). */
  setDevice(dev) {
    const head = `${dev.name || ""}\n${dev.status || "unknown"}\n${dev.face || ""}`;
    if (head === this.head) return;
    this.head = head;
    this.dirty.add("head");
  }

  /** One telemetry sample at Unix seconds `t`; values maps field -> number (or missing). */
  addTelemetry(t, values) {
    const clean = {};
    for (const f of FIELDS) clean[f] = num(values[f]);
    this.buffer.push(t, clean);
    if (t >= this.telemetryAt) {
      this.telemetryAt = t;
      this.values = clean;
      this.dirty.add("metrics");
    }
    this.dirty.add("chart");
  }

  /** Merge battery history rows [[epoch_ms, battery]] into the chart. */
  prefill(rows) {
    this.buffer.prefill(rows);
    this.dirty.add("chart");
  }

  setScan(dataPoints, at) {
    if (this.scan && at < this.scan.at) return;
    this.scan = { points: scanPoints(dataPoints), at };
    this.dirty.add("scan");
  }

  setFrame(frameData, at) {
    if (typeof frameData !== "string" || frameData.length === 0 || frameData.length > MAX_FRAME_CHARS) return;
    if (this.frame && at < this.frame.at) return;
    this.frame = { data: frameData, at };
    this.dirty.add("frame");
  }

  setNote(text) {
    this.note = text;
    this.dirty.add("note");
  }

  /**
   * Apply pending updates; returns true when a chart update is still waiting for its slot.
   * Off screen only the header (name, status) is kept current; the rest waits, marked dirty.
   */
  render(nowMs) {
    if (this.dirty.has("head")) {
      this.dirty.delete("head");
      const [name, status, face] = this.head.split("\n");
      const named = name && name !== this.id;
      setText(this.nameEl, named ? name : this.id);
      this.nameEl.title = this.id;
      setText(this.statusEl, status);
      this.statusEl.dataset.status = status;
      this.root.dataset.status = status;
      setText(this.metaEl, [named ? this.id : null, face].filter(Boolean).join(" · "));
    }
    if (!this.visible) return false;
    if (this.dirty.has("metrics")) {
      this.dirty.delete("metrics");
      for (const f of FIELDS) {
        const m = METRICS[f];
        const v = this.values[f] ?? null;
        const { box, value, bar } = this.metricEls[f];
        setText(value, v === null ? "–" : `${fixed(v, m.digits)} ${m.unit}`);
        box.dataset.level = v === null ? "none" : m.level(v);
        bar.style.width = `${v === null ? 0 : Math.max(0, Math.min(100, v))}%`;
      }
    }
    // A robot that never sent telemetry (a legacy scanner bot) shows no empty gauges and chart.
    const hasTelemetry = this.buffer.length > 0;
    this.metricsEl.hidden = !hasTelemetry;
    this.chartEl.hidden = !hasTelemetry;
    if (this.dirty.has("chart") && hasTelemetry && this.root.isConnected) {
      if (!this.chart) {
        this.chart = makeChart(this.chartEl, this.buffer);
        this.chartAt = nowMs;
        this.dirty.delete("chart");
      } else if (nowMs - this.chartAt >= CHART_MIN_MS) {
        this.chart.setData(this.buffer.data());
        this.chartAt = nowMs;
        this.dirty.delete("chart");
      }
    }
    if (this.dirty.has("scan") && this.scan) {
      this.dirty.delete("scan");
      this.scanFig.hidden = false;
      drawPolar(this.scanCanvas, this.scan.points);
      const echoes = this.scan.points.filter((p) => p.d !== null).length;
      setText(this.scanCaption, `Ultrasonic scan · ${echoes}/${this.scan.points.length} echoes · ${clockTime(this.scan.at)}`);
      this.scanCanvas.dataset.points = String(this.scan.points.length);
    }
    if (this.dirty.has("frame") && this.frame) {
      this.dirty.delete("frame");
      this.frameFig.hidden = false;
      this.frameImg.src = `data:image/jpeg;base64,${this.frame.data}`;
      setText(this.frameCaption, `Video · ${clockTime(this.frame.at)}`);
    }
    if (this.dirty.has("note")) {
      this.dirty.delete("note");
      this.noteEl.hidden = !this.note;
      setText(this.noteEl, this.note || "");
    }
    return this.dirty.has("chart");
  }

  destroy() {
    if (this.chart) this.chart.destroy();
    this.root.remove();
  }
}
