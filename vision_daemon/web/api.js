// Talking to the daemon: the token (sessionStorage, never a URL), authorised requests, and the
// one /ws feed of results with a small bounded memory of the latest boxes per stream.

const TOKEN_KEY = "vision-daemon.token";
const KEEP_RESULTS = 64; // per stream: the frame we fetch is at most a few results old
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 15000;

/** The daemon refused our token (HTTP 401 or WebSocket close 1008). */
export class AuthError extends Error {}

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** fetch() on the daemon's origin with the token in the Authorization header. */
export async function request(path, { method = "GET", json, signal } = {}) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error", signal };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (response.status === 401) throw new AuthError(await detail(response));
  return response;
}

/** The one line a failed response says: FastAPI's {"detail": ...}, else its status. */
export async function detail(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail
        .map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`)
        .join("; ");
    }
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`.trim();
}

export async function getJSON(path) {
  const response = await request(path);
  if (!response.ok) throw new Error(`${path}: ${await detail(response)}`);
  return response.json();
}

/** base64url of the text's UTF-8 bytes, without '=' padding (a WebSocket subprotocol token). */
export function b64url(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * One /ws connection for the page, filtered to the streams on screen; reconnects with backoff.
 * Keeps the detections of the last KEEP_RESULTS frames of each stream, by frame id, so a frame
 * fetched from /streams/{name}/frame.jpg can be drawn with its own boxes.
 */
export class Feed {
  constructor({ onResult, onRefused, onState }) {
    this.onResult = onResult;
    this.onRefused = onRefused;
    this.onState = onState;
    this.results = new Map(); // stream -> Map(frame id -> detections), oldest first
    this.wanted = [];
    this.key = null;
    this.ws = null;
    this.timer = 0;
    this.retryMs = RETRY_FIRST_MS;
    this.stopped = false;
  }

  /** Subscribe to exactly these streams (reconnects only when the set changes). */
  want(names) {
    const list = [...names].sort();
    const key = list.join("\n");
    if (key === this.key || this.stopped) return;
    this.key = key;
    this.wanted = list;
    for (const name of this.results.keys()) if (!names.has(name)) this.results.delete(name);
    clearTimeout(this.timer);
    // A short pause coalesces a burst of changes (scrolling, paging) into one reconnect.
    this.timer = setTimeout(() => this.connect(), this.ws ? 250 : 0);
  }

  boxes(stream, frameId) {
    const kept = this.results.get(stream);
    return kept ? kept.get(frameId) : undefined;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.drop();
    this.results.clear();
  }

  drop() {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(1000);
    }
  }

  connect() {
    this.drop();
    if (this.stopped) return;
    if (!this.wanted.length) {
      this.onState("idle"); // never subscribe unfiltered: that would be every stream's results
      return;
    }
    const url = new URL("/ws", window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    for (const name of this.wanted) url.searchParams.append("stream", name);
    const protocols = ["vision-daemon"];
    const t = token();
    if (t) protocols.push(`bearer.${b64url(t)}`);
    let ws;
    try {
      ws = new WebSocket(url.href, protocols);
    } catch (err) {
      this.onState(`error: ${err.message}`);
      return;
    }
    const openedAt = performance.now();
    this.ws = ws;
    this.onState("connecting");
    ws.onopen = () => this.onState("live");
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (event.code === 1008) {
        this.onRefused();
        return;
      }
      if (performance.now() - openedAt > 10000) this.retryMs = RETRY_FIRST_MS; // it had lasted
      const wait = this.retryMs * (0.8 + 0.4 * Math.random());
      this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
      this.onState(`reconnecting (${event.code})`);
      this.timer = setTimeout(() => this.connect(), wait);
    };
  }

  receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || msg.type !== "result" || typeof msg.stream_name !== "string") return;
    let kept = this.results.get(msg.stream_name);
    if (!kept) {
      kept = new Map();
      this.results.set(msg.stream_name, kept);
    }
    kept.set(msg.frame_id, Array.isArray(msg.detections) ? msg.detections : []);
    if (kept.size > KEEP_RESULTS) kept.delete(kept.keys().next().value);
    this.onResult(msg.stream_name, msg.frame_id);
  }
}
