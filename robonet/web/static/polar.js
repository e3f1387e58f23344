// Polar plot of an ultrasonic scan (sensor_data, spec/botlink.md legacy dialect):
// data_points = [{angle: degrees, distance_cm: d}], d = -1 means no echo.
//
// Angles follow the maths convention: 0 deg points right, 90 deg up (straight ahead for a
// servo-swept scanner), 180 deg left. A scan whose angles all lie in 0..180 is drawn as a half
// disc; anything else as a full disc.

import { num } from "./util.js";

const NICE_STEPS = [10, 20, 25, 50, 100, 200, 250, 500, 1000];

/** Keep the usable points: [{angle, d}] with d = null for "no echo". */
export function scanPoints(dataPoints) {
  if (!Array.isArray(dataPoints)) return [];
  const out = [];
  for (const p of dataPoints) {
    if (p === null || typeof p !== "object") continue;
    const angle = num(p.angle);
    const d = num(p.distance_cm);
    if (angle === null || d === null) continue;
    out.push({ angle, d: d < 0 ? null : d });
  }
  out.sort((a, b) => a.angle - b.angle);
  return out;
}

function niceRange(maxD) {
  const target = Math.max(maxD, 1) / 4;
  const step = NICE_STEPS.find((s) => s >= target) ?? Math.ceil(target / 1000) * 1000;
  return { step, max: step * Math.max(1, Math.ceil(maxD / step)) };
}

function cssVar(node, name, fallback) {
  const v = getComputedStyle(node).getPropertyValue(name).trim();
  return v || fallback;
}

/** Draw `points` (from scanPoints) into `canvas`, sized to its CSS box at device pixel ratio. */
export function drawPolar(canvas, points) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  if (!cssW || !cssH) return;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);

  const grid = cssVar(canvas, "--grid", "#d0d5dd");
  const muted = cssVar(canvas, "--muted", "#667085");
  const accent = cssVar(canvas, "--accent", "#2563eb");
  const danger = cssVar(canvas, "--bad", "#d92d20");

  const half = points.length > 0 && points.every((p) => p.angle >= 0 && p.angle <= 180);
  const pad = 18;
  const cx = cssW / 2;
  const cy = half ? cssH - pad : cssH / 2;
  const radius = Math.max(10, half ? Math.min(cssW / 2 - pad, cssH - 2 * pad) : Math.min(cssW, cssH) / 2 - pad);
  const echoes = points.filter((p) => p.d !== null);
  const { step, max } = niceRange(echoes.reduce((m, p) => Math.max(m, p.d), 0));
  const toXY = (angle, r) => {
    const a = (angle * Math.PI) / 180;
    return [cx + Math.cos(a) * r, cy - Math.sin(a) * r];
  };

  // Grid: range rings every `step` cm and spokes every 30 degrees.
  ctx.lineWidth = 1;
  ctx.strokeStyle = grid;
  ctx.fillStyle = muted;
  ctx.font = "10px system-ui, sans-serif";
  const [a0, a1] = half ? [0, Math.PI] : [0, 2 * Math.PI];
  for (let r = step; r <= max + 1e-9; r += step) {
    const pr = (r / max) * radius;
    ctx.beginPath();
    ctx.arc(cx, cy, pr, -a1, -a0);
    ctx.stroke();
    ctx.fillText(r + step > max + 1e-9 ? `${r} cm` : `${r}`, cx + 3, cy - pr - 2);
  }
  for (let deg = 0; deg < (half ? 181 : 360); deg += 30) {
    const [x, y] = toXY(deg, radius);
    ctx.beginPath();
    ctx.moveTo(cx, cy);
    ctx.lineTo(x, y);
    ctx.stroke();
  }

  if (points.length === 0) {
    ctx.fillStyle = muted;
    ctx.textAlign = "center";
    ctx.fillText("no scan yet", cx, half ? cy - radius / 2 : cy);
    ctx.textAlign = "start";
    return;
  }

  // No echo: a faint dashed ray to the edge.
  ctx.save();
  ctx.setLineDash([3, 4]);
  ctx.strokeStyle = muted;
  ctx.globalAlpha = 0.5;
  for (const p of points) {
    if (p.d !== null) continue;
    const [x, y] = toXY(p.angle, radius);
    ctx.beginPath();
    ctx.moveTo(cx, cy);
    ctx.lineTo(x, y);
    ctx.stroke();
  }
  ctx.restore();

  // Echoes: a translucent outline through the points, then a dot per echo.
  if (echoes.length > 1) {
    ctx.beginPath();
    ctx.moveTo(cx, cy);
    for (const p of echoes) ctx.lineTo(...toXY(p.angle, (p.d / max) * radius));
    ctx.closePath();
    ctx.fillStyle = accent;
    ctx.globalAlpha = 0.12;
    ctx.fill();
    ctx.globalAlpha = 1;
  }
  for (const p of echoes) {
    const [x, y] = toXY(p.angle, (p.d / max) * radius);
    ctx.beginPath();
    ctx.arc(x, y, 3, 0, 2 * Math.PI);
    ctx.fillStyle = p.d < max * 0.15 ? danger : accent;
    ctx.fill();
  }
  // The sensor itself.
  ctx.beginPath();
  ctx.arc(cx, cy, 4, 0, 2 * Math.PI);
  ctx.fillStyle = muted;
  ctx.fill();
}
