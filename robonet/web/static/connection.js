// The dashboard's WebSocket to the hub (spec/websocket.md), reconnecting on its own.
//
// Reconnects with exponential backoff: 0.5 s, 1 s, 2 s ... capped at 15 s, each delay jittered by
// +-25 % so a hub restart is not met by every open dashboard at the same instant. A connection that
// opened resets the backoff.

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;

/** The telemetry WebSocket URL for this page, carrying the page's own ?token= if it has one. */
export function telemetryUrl(loc = window.location) {
  const scheme = loc.protocol === "https:" ? "wss" : "ws";
  const token = new URLSearchParams(loc.search).get("token");
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}://${loc.host}/ws/telemetry/${query}`;
}

export class Connection {
  /**
   * @param {string} url WebSocket URL.
   * @param {{onMessage: (msg: any) => void, onState: (state: string, detail: object) => void,
   *          onBadMessage?: (text: string) => void}} handlers
   *   onState gets "connected" or "disconnected" with {attempt, retryInMs}.
   */
  constructor(url, { onMessage, onState, onBadMessage = () => {} }) {
    this.url = url;
    this.onMessage = onMessage;
    this.onState = onState;
    this.onBadMessage = onBadMessage;
    this.ws = null;
    this.attempt = 0;
    this.retryTimer = null;
    this.connected = false;
  }

  start() {
    this._connect();
    // Back on the network or back in view: try now rather than waiting out the backoff.
    window.addEventListener("online", () => this.retryNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.retryNow();
    });
  }

  retryNow() {
    if (this.retryTimer === null) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this._connect();
  }

  /** Send one JSON message; false when not connected (the message is not queued). */
  send(obj) {
    if (!this.connected || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  _connect() {
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleRetry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.connected = true;
      this.onState("connected", { attempt: 0, retryInMs: 0 });
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        this.onBadMessage(event.data);
        return;
      }
      if (msg !== null && typeof msg === "object" && !Array.isArray(msg)) this.onMessage(msg);
      else this.onBadMessage(event.data);
    };
    // The browser reports the reason on the console; close always follows error.
    ws.onerror = () => {};
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.connected = false;
      this._scheduleRetry();
    };
  }

  _scheduleRetry() {
    const exp = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** this.attempt);
    const delay = Math.round(exp * (0.75 + Math.random() * 0.5));
    this.attempt += 1;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this._connect();
    }, delay);
    this.onState("disconnected", { attempt: this.attempt, retryInMs: delay });
  }
}
