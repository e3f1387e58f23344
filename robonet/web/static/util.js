// Small DOM and formatting helpers shared by the dashboard modules.
// Device data is untrusted (names, messages come from robots): text goes in with textContent only.

/**
 * Build an element: el("td", {class: "x", dataset: {deviceId: "r1"}}, "text", childNode).
 * Attribute values of null/undefined/false are skipped; `true` sets an empty attribute.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Set textContent only when it changes (avoids needless layout work on frequent updates). */
export function setText(node, text) {
  const s = String(text);
  if (node.textContent !== s) node.textContent = s;
}

/** A finite number or null. */
export function num(v) {
  const n = typeof v === "number" ? v : typeof v === "string" && v.trim() !== "" ? Number(v) : NaN;
  return Number.isFinite(n) ? n : null;
}

/** Fixed-point text for a number, or an en dash when there is none. */
export function fixed(v, digits = 1) {
  const n = num(v);
  return n === null ? "–" : n.toFixed(digits);
}

/**
 * A timestamp as Unix seconds: ISO-8601 strings, Unix seconds or milliseconds.
 * Returns null for anything else (robots' own clocks are not Unix time).
 */
export function unixSeconds(v) {
  if (typeof v === "string") {
    const ms = Date.parse(v);
    return Number.isFinite(ms) ? ms / 1000 : null;
  }
  const n = num(v);
  if (n === null) return null;
  if (n > 1e12) return n / 1000; // milliseconds
  if (n > 1e9) return n; // seconds
  return null;
}

/** A duration in seconds as short text: "0.4 s", "12 s", "3 min", "2 h 5 min", "4 d 2 h". */
export function duration(seconds) {
  const s = num(seconds);
  if (s === null || s < 0) return "–";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) {
    const m = Math.floor(s / 60);
    const r = Math.floor(s % 60);
    return r && m < 10 ? `${m} min ${r} s` : `${m} min`;
  }
  if (s < 86400) {
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return m ? `${h} h ${m} min` : `${h} h`;
  }
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  return h ? `${d} d ${h} h` : `${d} d`;
}

/** Local wall-clock time (HH:MM:SS) of Unix seconds. */
export function clockTime(unixS) {
  const s = num(unixS);
  if (s === null) return "–";
  return new Date(s * 1000).toLocaleTimeString([], { hour12: false });
}

/** Call fn at most once per `ms`, always delivering the latest arguments (trailing call). */
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  let pending = null;
  const fire = () => {
    timer = null;
    last = performance.now();
    const args = pending;
    pending = null;
    fn(...args);
  };
  return (...args) => {
    pending = args;
    const wait = ms - (performance.now() - last);
    if (wait <= 0) {
      if (timer) clearTimeout(timer);
      fire();
    } else if (!timer) {
      timer = setTimeout(fire, wait);
    }
  };
}
