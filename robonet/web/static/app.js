// robonet dashboard: wires the WebSocket relay (spec/websocket.md), the REST API and the page.
//
// State lives in `devices` (one record per device, the registry's DEVICE shape) and `cards`
// (one RobotCard per robot). Messages only update state and mark things dirty; render() runs on
// the next animation frame, so bursts of messages cost one DOM pass.

import { RobotCard } from "./cards.js";
import { Connection, telemetryUrl } from "./connection.js";
import { Joystick } from "./joystick.js";
import { api, CameraPanel, PeersPanel, StatsPanel } from "./panels.js";
import { clockTime, duration, el, num, setText, throttle, unixSeconds } from "./util.js";

const POLL_MS = 5000;
const SNAPSHOT_FALLBACK_MS = 3000;
const TABLE_MIN_MS = 500;
const LOG_MAX = 200;
const STATUS_RANK = { online: 0, unreachable: 1, offline: 2 };
const $ = (sel) => document.querySelector(sel);

const devices = new Map(); // device_id -> DEVICE record (+ seenRobotData)
const cards = new Map(); // device_id -> RobotCard
let synced = false; // a snapshot arrived on this connection
let dirtyTable = true;

// ---- server clock: ages are computed against the hub's clock, not the browser's -----------
// offset = max over recent samples of (server timestamp - local time): the sample with the least
// transit delay is the best estimate.
const clockSamples = [];
let clockOffset = 0;
function noteServerTime(unixS) {
  if (unixS === null) return;
  clockSamples.push(unixS - Date.now() / 1000);
  if (clockSamples.length > 20) clockSamples.shift();
  clockOffset = Math.max(...clockSamples);
}
function serverNow() {
  return Date.now() / 1000 + clockOffset;
}

// ---- event log ------------------------------------------------------------------------------
const logEl = $("#event-log");
/** Add an entry; a repeat of the newest entry's key bumps its counter instead (joystick acks). */
function log(kind, text, key = `${kind}:${text}`) {
  const first = logEl.firstElementChild;
  const time = clockTime(Date.now() / 1000);
  if (first && first.dataset.key === key) {
    const n = Number(first.dataset.count) + 1;
    first.dataset.count = String(n);
    setText(first.querySelector(".ev-text"), text);
    setText(first.querySelector(".ev-count"), `×${n}`);
    setText(first.querySelector("time"), time);
    return;
  }
  logEl.prepend(
    el(
      "li",
      { dataset: { kind, key, count: "1" } },
      el("time", { text: time }),
      el("span", { class: "ev-kind", text: kind }),
      el("span", { class: "ev-text", text }),
      el("span", { class: "ev-count" }),
    ),
  );
  while (logEl.childElementCount > LOG_MAX) logEl.lastElementChild.remove();
}
$("#event-log-clear").addEventListener("click", () => logEl.replaceChildren());

// ---- devices and robot cards ------------------------------------------------------------------
function ensureDevice(id) {
  let d = devices.get(id);
  if (!d) {
    d = { device_id: id, name: "", face: "", role: "", address: "", status: "unknown", hub: "" };
    // latest/latest_at are keyed by message types robots choose: no prototype to trip over.
    Object.assign(d, { connected_at: null, last_seen: null, seenRobotData: false });
    Object.assign(d, { latest: Object.create(null), latest_at: Object.create(null) });
    devices.set(id, d);
  }
  dirtyTable = true;
  return d;
}

function isRobot(d) {
  return d.role === "robot" || (!d.role && d.seenRobotData);
}

/** Merge a DEVICE record (snapshot, device_update, /api/devices). Returns the record or null. */
function mergeDevice(rec) {
  if (!rec || typeof rec !== "object" || typeof rec.device_id !== "string" || !rec.device_id) return null;
  const d = ensureDevice(rec.device_id);
  for (const k of ["name", "face", "role", "address", "status", "hub"]) {
    if (typeof rec[k] === "string") d[k] = rec[k];
  }
  for (const k of ["connected_at", "last_seen"]) {
    const v = num(rec[k]);
    if (v !== null) d[k] = v;
  }
  if (rec.latest && typeof rec.latest === "object") Object.assign(d.latest, rec.latest);
  if (rec.latest_at && typeof rec.latest_at === "object") {
    for (const [k, v] of Object.entries(rec.latest_at)) if (num(v) !== null) d.latest_at[k] = num(v);
  }
  syncCard(d);
  return d;
}

// Cards off screen are not drawn (a fleet of 200 would cost 100 ms a frame); their updates wait,
// marked dirty, until they scroll into view.
const onScreen = new IntersectionObserver(
  (entries) => {
    for (const entry of entries) {
      const card = cards.get(entry.target.dataset.deviceId);
      if (card) card.visible = entry.isIntersecting;
    }
    scheduleRender();
  },
  { rootMargin: "200px" },
);

function removeCard(id) {
  const card = cards.get(id);
  if (card) {
    onScreen.unobserve(card.root);
    card.destroy();
    cards.delete(id);
  }
  dirtyTable = true;
}

function removeDevice(id) {
  devices.delete(id);
  removeCard(id);
}

/** The newest status-like text a robot sent (status, system_status, movement_complete). */
function noteFor(d) {
  let best = "";
  let bestAt = -Infinity;
  for (const type of ["status", "system_status", "movement_complete"]) {
    const body = d.latest[type];
    if (!body || typeof body !== "object") continue;
    const text = body.message ?? body.status;
    const at = d.latest_at[type] ?? 0;
    if (text !== undefined && text !== null && text !== "" && at >= bestAt) {
      best = `${type.replace("_", " ")}: ${text}`;
      bestAt = at;
    }
  }
  return best;
}

/** Create, update or drop the device's robot card from its record. */
function syncCard(d) {
  const id = d.device_id;
  let card = cards.get(id);
  if (!isRobot(d)) {
    if (card) removeCard(id);
    return;
  }
  if (!card) {
    card = new RobotCard(id);
    cards.set(id, card);
    onScreen.observe(card.root);
    const after = [...cards.keys()].filter((k) => k > id).sort()[0];
    $("#robot-cards").insertBefore(card.root, after ? cards.get(after).root : null);
    loadHistory(card);
  }
  card.setDevice(d);
  const tel = d.latest.telemetry;
  const telAt = num(d.latest_at.telemetry);
  if (tel && typeof tel === "object" && telAt !== null && telAt > card.telemetryAt) card.addTelemetry(telAt, tel);
  const scan = d.latest.sensor_data;
  if (scan && typeof scan === "object" && Array.isArray(scan.data_points)) {
    card.setScan(scan.data_points, num(d.latest_at.sensor_data) ?? 0);
  }
  const frame = d.latest.video_frame;
  if (frame && typeof frame === "object") card.setFrame(frame.frame_data, num(d.latest_at.video_frame) ?? 0);
  const note = noteFor(d);
  if (note !== (card.note || "")) card.setNote(note);
  scheduleRender();
}

function loadHistory(card) {
  if (card.historyLoaded || !conn.connected) return;
  card.historyLoaded = true;
  api(`/api/battery-history/?device_id=${encodeURIComponent(card.id)}`).then((res) => {
    if (res.status === 200 && Array.isArray(res.body)) {
      card.prefill(res.body);
      scheduleRender();
    } else {
      card.historyLoaded = false; // try again on the next connect
    }
  });
}

// ---- messages from the hub --------------------------------------------------------------------
function applySnapshot(list) {
  if (!Array.isArray(list)) return;
  const seen = new Set();
  for (const rec of list) {
    const d = mergeDevice(rec);
    if (d) seen.add(d.device_id);
  }
  for (const id of [...devices.keys()]) if (!seen.has(id)) removeDevice(id);
  synced = true;
  scheduleRender();
}

function onRobotStatus(msg, ts) {
  if (typeof msg.device_id !== "string" || !msg.device_id) return;
  const d = ensureDevice(msg.device_id);
  if (msg.status === "connected" || msg.status === "disconnected") {
    const status = msg.status === "connected" ? "online" : "offline";
    if (!d.role && msg.device_type === "robot") d.role = "robot";
    const changed = d.status !== status;
    d.status = status;
    if (synced && changed) log("info", `${d.device_id} ${msg.status}`, `status:${d.device_id}`);
  } else {
    // A robot's own status report, relayed as robot_status.
    d.latest.status = { status: msg.status, message: msg.message };
    d.latest_at.status = ts;
    d.last_seen = Math.max(d.last_seen ?? 0, ts);
  }
  syncCard(d);
}

function onDeviceEvent(msg) {
  const d = mergeDevice(msg.device);
  if (!d || !synced) return;
  if (msg.event === "device_up") log("info", `${d.device_id} up${d.face ? ` on ${d.face}` : ""}`, `status:${d.device_id}`);
  else if (msg.event === "device_down") log("info", `${d.device_id} down`, `status:${d.device_id}`);
}

function onTelemetry(msg, ts) {
  if (typeof msg.device_id !== "string" || !msg.device_id) return;
  const d = ensureDevice(msg.device_id);
  d.seenRobotData = true;
  if (typeof msg.device_name === "string" && msg.device_name && !d.name) d.name = msg.device_name;
  if (d.status === "unknown") d.status = "online";
  const { battery, cpu, temperature, signal } = msg;
  const values = { battery, cpu, temperature, signal };
  d.last_seen = Math.max(d.last_seen ?? 0, ts);
  if (ts >= (d.latest_at.telemetry ?? 0)) {
    d.latest.telemetry = values;
    d.latest_at.telemetry = ts;
    syncCard(d); // adds the sample as the card's newest
  } else {
    syncCard(d);
    cards.get(d.device_id)?.addTelemetry(ts, values); // late sample: chart only
  }
}

const ROBOT_DATA = new Set(["sensor_data", "video_frame", "system_status", "movement_complete", "status"]);

/** Any other `{"type": T, "device_id", ...body, "timestamp"}` from a device. */
function onData(msg, ts) {
  if (typeof msg.device_id !== "string" || !msg.device_id) return;
  const { type, device_id: id, timestamp, ...body } = msg;
  const d = ensureDevice(id);
  d.latest[type] = body;
  d.latest_at[type] = ts;
  d.last_seen = Math.max(d.last_seen ?? 0, ts);
  if (ROBOT_DATA.has(type) && d.role !== "camera") d.seenRobotData = true;
  if (type === "camera_state") {
    camera.update(body);
  } else if (type === "camera_settings") {
    camera.setSettings(body.settings && typeof body.settings === "object" ? body.settings : body);
  } else if (type === "movement_complete") {
    log("info", `${id} movement complete`, `move-done:${id}`);
  }
  syncCard(d);
}

function handle(msg) {
  if (typeof msg.type !== "string") {
    if (typeof msg.error === "string") {
      log("error", `hub: ${msg.error}`);
    } else if (msg.status === "connected" && msg.device_type === "website") {
      setText($("#website-id"), msg.website_id || "connected");
    }
    return;
  }
  const ts = unixSeconds(msg.timestamp);
  switch (msg.type) {
    case "snapshot":
      applySnapshot(msg.devices);
      break;
    case "device_update":
      noteServerTime(ts);
      onDeviceEvent(msg);
      break;
    case "robot_status":
      onRobotStatus(msg, ts ?? serverNow());
      break;
    case "telemetry_update":
      noteServerTime(ts);
      onTelemetry(msg, ts ?? serverNow());
      break;
    case "ack":
      log("ack", `${msg.original_type ?? "?"}: ${msg.message ?? msg.status ?? "ok"}`, `ack:${msg.original_type}`);
      break;
    case "error": {
      const what = [msg.original_type, msg.code].filter(Boolean).join(" ");
      log("error", `${what || "error"}${msg.message ? `: ${msg.message}` : ""}`, `error:${msg.code}:${msg.original_type}`);
      break;
    }
    default:
      onData(msg, ts ?? serverNow());
  }
  scheduleRender();
}

// ---- rendering ----------------------------------------------------------------------------------
const tbody = $("#device-table tbody");
const rows = new Map(); // device_id -> {tr, cells}
let rowOrder = "";

function makeRow(id) {
  const cells = {};
  const td = (col, cls) => (cells[col] = el("td", { class: cls, dataset: { col } }));
  const tr = el(
    "tr",
    { dataset: { deviceId: id } },
    td("device"),
    td("face", "opt-phone"),
    td("role", "opt"),
    td("address", "opt"),
    td("status"),
    td("last_seen", "num"),
    td("age", "num"),
  );
  // The face repeats under the id for phones, where the face column is hidden.
  cells.device.append(
    el("span", { class: "dev-id", text: id }),
    el("span", { class: "dev-name" }),
    el("span", { class: "dev-face" }),
  );
  cells.status.append(el("span", { class: "badge" }));
  const row = { tr, cells };
  rows.set(id, row);
  return row;
}

function renderTable() {
  const now = serverNow();
  const list = [...devices.values()].sort(
    (a, b) => (STATUS_RANK[a.status] ?? 3) - (STATUS_RANK[b.status] ?? 3) || (a.device_id < b.device_id ? -1 : 1),
  );
  for (const [id, row] of rows) {
    if (!devices.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  for (const d of list) {
    const { cells } = rows.get(d.device_id) ?? makeRow(d.device_id);
    setText(cells.device.children[1], d.name && d.name !== d.device_id ? d.name : "");
    setText(cells.device.children[2], d.face || "");
    cells.device.title = d.hub ? `hub ${d.hub}` : "";
    setText(cells.face, d.face || "–");
    setText(cells.role, d.role || "–");
    setText(cells.address, d.address || "–");
    const badge = cells.status.firstChild;
    setText(badge, d.status);
    badge.dataset.status = d.status;
    const seen = num(d.last_seen);
    setText(cells.last_seen, seen === null ? "–" : `${duration(Math.max(0, now - seen))} ago`);
    cells.last_seen.title = seen === null ? "" : clockTime(seen);
    const times = Object.values(d.latest_at).filter((v) => typeof v === "number");
    setText(cells.age, times.length ? duration(Math.max(0, now - Math.max(...times))) : "–");
  }
  const order = list.map((d) => d.device_id).join("\n");
  if (order !== rowOrder) {
    rowOrder = order;
    tbody.replaceChildren(...list.map((d) => rows.get(d.device_id).tr));
  }
  $("#devices-empty").hidden = list.length > 0;
}

let targetsSig = "";
function renderTargets() {
  const ids = [...cards.keys()].sort();
  const label = (id) => {
    const d = devices.get(id);
    const name = d && d.name && d.name !== id ? ` · ${d.name}` : "";
    return `${id}${name}${d && d.status !== "online" ? ` (${d.status})` : ""}`;
  };
  const sig = ids.map(label).join("\n");
  if (sig === targetsSig) return;
  targetsSig = sig;
  const sel = $("#target-select");
  const current = sel.value;
  const options = ids.map((id) => el("option", { value: id, text: label(id) }));
  if (current && !ids.includes(current)) options.push(el("option", { value: current, text: `${current} (gone)` }));
  sel.replaceChildren(el("option", { value: "", text: "All robots" }), ...options);
  sel.value = current;
}

function renderSummary() {
  let online = 0;
  for (const id of cards.keys()) if (devices.get(id)?.status === "online") online += 1;
  const text = `${online}/${cards.size} robots online · ${devices.size} devices`;
  setText($("#fleet-summary"), text);
  setText($("#robots-count"), cards.size ? `${online} of ${cards.size} online` : "");
  $("#robots-empty").hidden = cards.size > 0;
}

let frameQueued = false;
let laterTimer = null;
let tableAt = -Infinity;
function scheduleRender() {
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(render);
}

function render() {
  frameQueued = false;
  const nowMs = performance.now();
  let pending = false;
  for (const card of cards.values()) if (card.render(nowMs)) pending = true;
  // The table shows ages in whole seconds: a fleet sending 1,000s of messages a second needs
  // no more than two passes over it a second.
  if (dirtyTable && nowMs - tableAt >= TABLE_MIN_MS) {
    dirtyTable = false;
    tableAt = nowMs;
    renderTable();
    renderTargets();
    renderSummary();
  } else if (dirtyTable) {
    pending = true;
  }
  if (pending && laterTimer === null) {
    laterTimer = setTimeout(() => {
      laterTimer = null;
      scheduleRender();
    }, 250);
  }
}

// ---- controls -----------------------------------------------------------------------------------
const targetSelect = $("#target-select");

/** Send a command to the selected robot (adds device_id) or to all robots. */
function command(type, fields) {
  const body = { type, ...fields };
  if (targetSelect.value) body.device_id = targetSelect.value;
  if (!conn.send(body)) log("error", `not connected: ${type} not sent`, `unsent:${type}`);
}

const showStick = (id) => (x, y) => setText($(id), `${x.toFixed(2)}, ${y.toFixed(2)}`);
const robotStick = new Joystick(
  $("#robot-joystick"),
  (x, y) => command("robot_move", { x, y }),
  showStick("#robot-joystick-value"),
);
const cameraStick = new Joystick(
  $("#camera-joystick"),
  (x, y) => command("camera_move", { x, y }),
  showStick("#camera-joystick-value"),
);
// A new target must not inherit a held stick: stop the old target first.
targetSelect.addEventListener("pointerdown", () => {
  robotStick.release();
  cameraStick.release();
});
targetSelect.addEventListener("change", () => log("info", `target: ${targetSelect.value || "all robots"}`, "target"));

function wireSlider(input, output, type) {
  let lastSent = null;
  const sendNow = () => {
    const value = Number(input.value);
    if (value === lastSent) return;
    lastSent = value;
    command(type, { value });
  };
  const sendSoon = throttle(sendNow, 150);
  input.addEventListener("input", () => {
    setText(output, `${input.value}%`);
    sendSoon();
  });
  input.addEventListener("change", sendNow);
}
wireSlider($("#speed-slider"), $("#speed-value"), "set_speed");
wireSlider($("#brightness-slider"), $("#brightness-value"), "set_brightness");

// ---- panels and connection ----------------------------------------------------------------------
const peers = new PeersPanel($("#peers-panel"), serverNow);
const stats = new StatsPanel($("#stats-panel"), (name) => setText($("#hub-name"), name));
const camera = new CameraPanel($("#camera-panel"), log);

async function poll() {
  if (!conn.connected || document.visibilityState !== "visible") return;
  await Promise.all([peers.refresh(), stats.refresh(), camera.refresh()]);
}

let retryAt = 0;
let wasConnected = false;
let snapshotTimer = null;
function onConnState(state, { attempt, retryInMs }) {
  const box = $("#conn");
  box.dataset.state = state;
  setText($("#conn-state"), state);
  document.body.classList.toggle("stale", state !== "connected");
  clearTimeout(snapshotTimer);
  if (state === "connected") {
    wasConnected = true;
    synced = false;
    retryAt = 0;
    setText($("#conn-detail"), "");
    log("info", "connected to hub", "conn-up");
    camera.reset();
    for (const card of cards.values()) loadHistory(card);
    poll();
    // The hub sends a snapshot right after connect; ask the REST API if it does not come.
    snapshotTimer = setTimeout(async () => {
      if (synced || !conn.connected) return;
      const res = await api("/api/devices");
      if (!synced && res.status === 200 && res.body) applySnapshot(res.body.devices);
    }, SNAPSHOT_FALLBACK_MS);
  } else {
    robotStick.release();
    cameraStick.release();
    retryAt = Date.now() + retryInMs;
    box.dataset.attempt = String(attempt);
    if (wasConnected && attempt === 1) log("error", "connection to hub lost", "conn-down");
    tickConn();
  }
}

function tickConn() {
  if (!retryAt) return;
  const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
  setText($("#conn-detail"), s > 0 ? `retry in ${s} s` : "connecting…");
}

const conn = new Connection(telemetryUrl(), {
  onMessage: handle,
  onState: onConnState,
  onBadMessage: () => log("error", "hub sent a message that is not a JSON object", "bad-message"),
});

setInterval(() => {
  dirtyTable = true; // ages move on
  tickConn();
  scheduleRender();
}, 1000);
setInterval(poll, POLL_MS);
document.addEventListener("visibilitychange", poll);

// Hook for tests and the browser console.
window.robonet = { handle, devices, cards, conn, log, serverNow, camera, sticks: [robotStick, cameraStick] };

conn.start();
scheduleRender();
