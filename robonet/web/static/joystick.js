// A round on-screen joystick driven by pointer events (mouse, pen and touch alike).
//
// Output: x, y in -1..1 (right and up are positive), rounded to 2 decimals, vector length <= 1.
// While held the current value is sent at once on every change (at most every 50 ms) and repeated
// every 100 ms, so a hub with a deadman timer keeps the robot moving only while a finger is down.
// Release, cancel, loss of pointer capture, window blur or a hidden page send {x: 0, y: 0} once.
// Arrow keys work too when the joystick has focus.

import { throttle } from "./util.js";

const REPEAT_MS = 100;
const MIN_SEND_MS = 50;

export class Joystick {
  /**
   * @param {HTMLElement} root element with a child `.knob`.
   * @param {(x: number, y: number) => void} send called with every value to send.
   * @param {(x: number, y: number) => void} [show] called on every value change (display).
   */
  constructor(root, send, show = () => {}) {
    this.root = root;
    this.knob = root.querySelector(".knob");
    this.sendRaw = send;
    this.show = show;
    this.x = 0;
    this.y = 0;
    this.pointerId = null;
    this.keys = new Set();
    this.repeat = null;
    this.sendSoon = throttle(() => this._send(), MIN_SEND_MS);

    root.addEventListener("pointerdown", (e) => this._down(e));
    root.addEventListener("pointermove", (e) => this._move(e));
    root.addEventListener("pointerup", (e) => this._up(e));
    root.addEventListener("pointercancel", (e) => this._up(e));
    root.addEventListener("lostpointercapture", (e) => this._up(e));
    root.addEventListener("keydown", (e) => this._key(e, true));
    root.addEventListener("keyup", (e) => this._key(e, false));
    // Keys go to the focused element: a keyboard-held stick stops when focus leaves it. A finger
    // on it stays (touching the other stick moves focus, and two thumbs drive both at once).
    root.addEventListener("blur", () => {
      if (this.pointerId === null) this.release();
    });
    window.addEventListener("blur", () => this.release());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState !== "visible") this.release();
    });
  }

  get held() {
    return this.repeat !== null;
  }

  _down(e) {
    if (this.pointerId !== null || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    this.pointerId = e.pointerId;
    try {
      this.root.setPointerCapture(e.pointerId);
    } catch (err) {
      // synthetic or already-ended pointer: work without capture
    }
    this.root.classList.add("active");
    this._setFromPointer(e);
    this._startRepeat();
    this.sendSoon();
  }

  _move(e) {
    if (e.pointerId !== this.pointerId) return;
    e.preventDefault();
    if (this._setFromPointer(e)) this.sendSoon();
  }

  _up(e) {
    if (e.pointerId !== this.pointerId) return;
    this.pointerId = null;
    this.release();
  }

  _key(e, down) {
    const dirs = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] };
    if (!(e.key in dirs)) return;
    e.preventDefault();
    if (down) this.keys.add(e.key);
    else this.keys.delete(e.key);
    if (this.keys.size === 0) {
      this.release();
      return;
    }
    let x = 0;
    let y = 0;
    for (const k of this.keys) {
      x += dirs[k][0];
      y += dirs[k][1];
    }
    const changed = this._set(x, y);
    if (!this.held) {
      this.root.classList.add("active");
      this._startRepeat();
      this.sendSoon();
    } else if (changed) {
      this.sendSoon();
    }
  }

  /** Stop: centre the knob and send {x: 0, y: 0} once (only if the stick was held). */
  release() {
    if (this.pointerId !== null) {
      try {
        this.root.releasePointerCapture(this.pointerId);
      } catch (err) {
        // capture already gone
      }
      this.pointerId = null;
    }
    this.keys.clear();
    if (!this.held) return;
    clearInterval(this.repeat);
    this.repeat = null;
    this.root.classList.remove("active");
    this._set(0, 0);
    this.sendRaw(0, 0);
  }

  _startRepeat() {
    clearInterval(this.repeat);
    this.repeat = setInterval(() => this._send(), REPEAT_MS);
  }

  _send() {
    if (this.held) this.sendRaw(this.x, this.y);
  }

  _setFromPointer(e) {
    const rect = this.root.getBoundingClientRect();
    const knob = this.knob.getBoundingClientRect();
    const radius = Math.max(1, (rect.width - knob.width) / 2);
    const dx = (e.clientX - (rect.left + rect.width / 2)) / radius;
    const dy = (e.clientY - (rect.top + rect.height / 2)) / radius;
    return this._set(dx, -dy);
  }

  /** Clamp to the unit circle, round, move the knob; true when the value changed. */
  _set(x, y) {
    const len = Math.hypot(x, y);
    if (len > 1) {
      x /= len;
      y /= len;
    }
    x = Math.round(x * 100) / 100 || 0; // || 0 turns -0 into 0
    y = Math.round(y * 100) / 100 || 0;
    if (x === this.x && y === this.y) return false;
    this.x = x;
    this.y = y;
    const rect = this.root.getBoundingClientRect();
    const radius = (rect.width - this.knob.offsetWidth) / 2;
    this.knob.style.transform = `translate(calc(-50% + ${x * radius}px), calc(-50% + ${-y * radius}px))`;
    this.show(x, y);
    return true;
  }
}
