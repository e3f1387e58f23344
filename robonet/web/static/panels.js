// Panels fed by the REST API (spec/websocket.md, /api/...): peers, hub stats and the camera.

import { duration, el, fixed, num, setText } from "./util.js";

/** The page's ?token= (if any) added to an API path. */
export function withToken(path, loc = window.location) {
  const token = new URLSearchParams(loc.search).get("token");
  if (!token) return path;
  return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

/**
 * fetch() a JSON API path. Resolves {status, body, date} (body null when not JSON); never rejects:
 * a network failure gives status 0.
 */
export async function api(path, init = {}) {
  try {
    const res = await fetch(withToken(path), { cache: "no-store", ...init });
    let body = null;
    try {
      body = await res.json();
    } catch (err) {
      body = null;
    }
    const date = Date.parse(res.headers.get("Date") || "");
    return { status: res.status, body, date: Number.isFinite(date) ? date / 1000 : null };
  } catch (err) {
    return { status: 0, body: null, date: null };
  }
}

function sumValues(v) {
  if (typeof v === "number") return v;
  if (v && typeof v === "object") {
    let total = 0;
    for (const x of Object.values(v)) total += typeof x === "number" ? x : sumValues(x?.count ?? null);
    return total;
  }
  return null;
}

function firstNum(obj, ...keys) {
  for (const k of keys) {
    const v = k.split(".").reduce((o, part) => (o && typeof o === "object" ? o[part] : undefined), obj);
    const n = num(v);
    if (n !== null) return n;
  }
  return null;
}

/** Peers panel: GET /api/peers -> {"peers": [{node_id, name, address, state, rtt_ms, last_seen, authenticated, devices}]}. */
export class PeersPanel {
  constructor(root, serverNow) {
    this.root = root;
    this.serverNow = serverNow;
    this.body = root.querySelector("tbody");
    this.empty = root.querySelector(".empty");
  }

  async refresh() {
    const res = await api("/api/peers");
    if (res.status !== 200 || !res.body || !Array.isArray(res.body.peers)) {
      this.body.replaceChildren();
      this.empty.hidden = false;
      setText(this.empty, res.status === 0 ? "Hub unreachable." : `Peers unavailable (HTTP ${res.status}).`);
      return;
    }
    const peers = res.body.peers.filter((p) => p && typeof p === "object");
    const now = this.serverNow();
    this.body.replaceChildren(
      ...peers.map((p) => {
        const devices = Array.isArray(p.devices) ? p.devices.length : num(p.devices);
        const lastSeen = num(p.last_seen);
        return el(
          "tr",
          { dataset: { nodeId: String(p.node_id ?? "") } },
          el("td", { title: String(p.node_id ?? "") }, String(p.name || p.node_id || "?")),
          el("td", { class: "opt" }, String(p.address ?? "–")),
          el("td", {}, el("span", { class: "badge", dataset: { status: String(p.state ?? "") } }, String(p.state ?? "–"))),
          el("td", { class: "num" }, num(p.rtt_ms) === null ? "–" : `${fixed(p.rtt_ms, 1)} ms`),
          el("td", { class: "num" }, lastSeen === null ? "–" : `${duration(Math.max(0, now - lastSeen))} ago`),
          el("td", {}, p.authenticated ? "yes" : "no"),
          el("td", { class: "num opt-phone" }, devices === null ? "–" : String(devices)),
        );
      }),
    );
    this.empty.hidden = peers.length > 0;
    setText(this.empty, "No peer hubs.");
  }
}

/**
 * Stats panel: GET /api/stats. Reads uptime, message rate and errors from the usual key names
 * (uptime_s, msgs_per_s / msgs_in_per_s, errors as a number or {code: count}); when only a message
 * counter is given, the rate is computed between two polls.
 */
export class StatsPanel {
  constructor(root, onHubName) {
    this.root = root;
    this.onHubName = onHubName;
    this.fields = {};
    for (const node of root.querySelectorAll("[data-stat]")) this.fields[node.dataset.stat] = node;
    this.prev = null;
  }

  async refresh() {
    const res = await api("/api/stats");
    const s = res.body;
    if (res.status !== 200 || !s || typeof s !== "object") {
      for (const node of Object.values(this.fields)) setText(node, "–");
      return;
    }
    const name = s.node?.name ?? s.name ?? s.hub?.name;
    if (typeof name === "string") this.onHubName(name);
    let uptime = firstNum(s, "uptime_s", "uptime", "uptime_seconds");
    const started = firstNum(s, "started_at", "start_time");
    if (uptime === null && started !== null && res.date !== null) uptime = res.date - started;
    let rate = firstNum(s, "msgs_per_s", "msgs_in_per_s", "messages_per_second", "rate.in", "rate", "in_per_s");
    const total = firstNum(s, "messages_in_total", "msgs_in", "messages_in", "in_total") ?? sumValues(s.in ?? s.messages_by_type ?? null);
    const nowS = performance.now() / 1000;
    if (rate === null && total !== null && this.prev && nowS > this.prev.at) {
      rate = Math.max(0, (total - this.prev.total) / (nowS - this.prev.at));
    }
    if (total !== null) this.prev = { total, at: nowS };
    const errors = sumValues(s.errors ?? null);
    const drops = sumValues(s.drops ?? s.dropped ?? null);

    setText(this.fields.uptime, uptime === null ? "–" : duration(uptime));
    setText(this.fields.rate, rate === null ? "–" : fixed(rate, rate < 10 ? 1 : 0));
    setText(this.fields.errors, errors === null ? "–" : String(errors));
    setText(this.fields.drops, drops === null ? "–" : String(drops));
    if (s.errors && typeof s.errors === "object") {
      const top = Object.entries(s.errors)
        .filter(([, v]) => typeof v === "number" && v > 0)
        .sort((a, b) => b[1] - a[1])
        .slice(0, 6)
        .map(([k, v]) => `${k}: ${v}`)
        .join(", ");
      this.fields.errors.title = top || "no errors";
    }
  }
}

// Steps are the resolution of the camera's wire encoding (spec/camera.md settings table).
const CAMERA_FIELDS = [
  ["shutter", "Shutter (µs)", 100],
  ["gain", "Gain", 1],
  ["awb_red", "AWB red", 0.1],
  ["awb_blue", "AWB blue", 0.1],
  ["contrast", "Contrast", 0.1],
  ["brightness", "Brightness", "any"],
];

/**
 * Camera panel: GET /api/camera (404 = camera service disabled: the panel stays hidden),
 * POST /api/camera/settings with a JSON subset of the settings -> 200 {"settings"} or
 * 400 {"error", "field"}; the MJPEG preview /camera/preview.mjpg shows while the pipeline runs.
 */
export class CameraPanel {
  constructor(root, log) {
    this.root = root;
    this.log = log;
    this.disabled = false;
    this.info = {};
    this.settings = {};
    this.stateEl = root.querySelector("#camera-state");
    this.preview = root.querySelector("#camera-preview");
    this.previewOff = root.querySelector("#camera-preview-off");
    this.infoEls = {};
    for (const node of root.querySelectorAll("[data-camera]")) this.infoEls[node.dataset.camera] = node;
    this.form = root.querySelector("#camera-settings");
    this.msg = root.querySelector("#camera-settings-msg");
    this.inputs = {};
    const fields = this.form.querySelector(".fields");
    for (const [name, label, step] of CAMERA_FIELDS) {
      const input = el("input", { type: "number", name, step, inputmode: "decimal", id: `camera-${name}` });
      input.addEventListener("input", () => {
        input.dataset.edited = "1";
        input.removeAttribute("aria-invalid");
      });
      fields.append(el("label", { for: input.id }, el("span", { text: label }), input));
      this.inputs[name] = input;
    }
    this.preview.addEventListener("error", () => {
      if (this.preview.getAttribute("src")) this._setPreview(false, "Preview unavailable.");
    });
    // A hidden tab does not need the MJPEG stream (hub bandwidth): drop it, resume when visible.
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState !== "visible") this._setPreview(false);
      else if (!this.disabled && !this.root.hidden) this.render();
    });
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.apply();
    });
  }

  /** Reset after a reconnect (the camera service may have been enabled since). */
  reset() {
    this.disabled = false;
  }

  async refresh() {
    if (this.disabled) return;
    const res = await api("/api/camera");
    if (res.status === 404) {
      this.disabled = true;
      this.root.hidden = true;
      this._setPreview(false);
      return;
    }
    if (res.status !== 200 || !res.body || typeof res.body !== "object") return;
    this.root.hidden = false;
    this.update(res.body);
  }

  /** Merge a camera status object (GET /api/camera body, or a camera_state message body). */
  update(body) {
    for (const k of ["pipeline", "state", "restarts", "fps", "last_error", "pid", "rtsp_url", "preview"]) {
      if (k in body) this.info[k] = body[k];
    }
    if (body.ranges && typeof body.ranges === "object") {
      for (const [name, range] of Object.entries(body.ranges)) {
        if (!Object.hasOwn(this.inputs, name) || !Array.isArray(range) || range.length !== 2) continue;
        const input = this.inputs[name];
        input.min = String(range[0]);
        input.max = String(range[1]);
        input.title = `${range[0]} .. ${range[1]}`;
      }
    }
    if (body.settings && typeof body.settings === "object") this.setSettings(body.settings);
    this.render();
  }

  setSettings(settings) {
    for (const [name, value] of Object.entries(settings)) {
      if (!Object.hasOwn(this.inputs, name) || num(value) === null) continue;
      this.settings[name] = num(value);
      const input = this.inputs[name];
      if (!input.dataset.edited && document.activeElement !== input) input.value = String(value);
    }
  }

  render() {
    const info = this.info;
    const state = String(info.state ?? "unknown");
    setText(this.stateEl, state);
    this.stateEl.dataset.status = state;
    const show = {
      pipeline: info.pipeline ?? "–",
      restarts: info.restarts ?? "–",
      fps: num(info.fps) === null ? "–" : fixed(info.fps, 1),
      pid: info.pid ?? "–",
      last_error: info.last_error || "none",
      rtsp_url: info.rtsp_url ?? "–",
    };
    for (const [k, v] of Object.entries(show)) if (this.infoEls[k]) setText(this.infoEls[k], v);
    // `preview: false` = the pipeline runs without a preview output.
    this._setPreview(state === "running" && info.preview !== false);
  }

  _setPreview(on, why = "Preview shows while the camera pipeline runs.") {
    if (on) {
      if (!this.preview.getAttribute("src")) this.preview.src = withToken("/camera/preview.mjpg");
      this.preview.hidden = false;
      this.previewOff.hidden = true;
    } else {
      // Dropping src closes the MJPEG connection.
      this.preview.removeAttribute("src");
      this.preview.hidden = true;
      this.previewOff.hidden = false;
      setText(this.previewOff, why);
    }
  }

  /** POST the edited fields; marks the offending input on a 400. */
  async apply() {
    const changes = {};
    for (const [name, input] of Object.entries(this.inputs)) {
      const v = num(input.value);
      if (input.dataset.edited && v !== null && v !== this.settings[name]) changes[name] = v;
    }
    if (Object.keys(changes).length === 0) {
      setText(this.msg, "Nothing changed.");
      return;
    }
    setText(this.msg, "Applying…");
    const res = await api("/api/camera/settings", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(changes),
    });
    if (res.status === 200 && res.body && typeof res.body.settings === "object") {
      for (const input of Object.values(this.inputs)) delete input.dataset.edited;
      this.setSettings(res.body.settings);
      setText(this.msg, "Applied.");
      this.log("info", `camera settings applied: ${Object.keys(changes).join(", ")}`, "camera-settings");
      return;
    }
    const field = res.body && typeof res.body.field === "string" ? res.body.field : null;
    const error = res.body && res.body.error ? String(res.body.error) : `HTTP ${res.status || "unreachable"}`;
    if (field && Object.hasOwn(this.inputs, field)) {
      this.inputs[field].setAttribute("aria-invalid", "true");
      this.inputs[field].focus();
    }
    setText(this.msg, field ? `${field}: ${error}` : error);
    this.log("error", `camera settings rejected: ${field ? `${field}: ` : ""}${error}`, "camera-settings");
  }
}
