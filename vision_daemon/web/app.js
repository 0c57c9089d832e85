// The dashboard's entry point: sign-in, the ~1 Hz /stats poll that drives the panels and the grid,
// the /stats/history charts, and the admin forms. Plain ES2020 modules, no build step.

import { AuthError, detail, Feed, getJSON, request, setToken, token } from "./api.js";
import { drawChart } from "./charts.js";
import { Detail } from "./detail.js";
import { FrameLoop } from "./frames.js";
import { Grid } from "./grid.js";
import { Panels } from "./panels.js";
import { setText } from "./dom.js";

const STATS_EVERY_MS = 1000;
const HISTORY_EVERY_MS = 2000;
const $ = (id) => document.getElementById(id);

class Dashboard {
  constructor(onRefused) {
    this.onRefused = onRefused;
    this.stopped = false;
    this.stats = null;
    this.history = null;
    this.timers = new Set();
    this.feed = new Feed({
      onResult: (stream, id) => this.loop.resultArrived(stream, id),
      onRefused: () => this.refused(),
      onState: (s) => setText($("status-feed"), `feed: ${s}`),
    });
    this.loop = new FrameLoop(this.feed, () => this.refused());
    this.grid = new Grid({
      root: $("grid"),
      empty: $("grid-empty"),
      count: $("grid-count"),
      pageLabel: $("page-label"),
      prev: $("page-prev"),
      next: $("page-next"),
      size: $("page-size"),
      loop: this.loop,
      onOpen: (name) => this.detail.open(name, this.stats),
    });
    this.panels = new Panels({
      summary: $("summary"),
      streams: $("streams-table").querySelector("tbody"),
      workers: $("workers-table").querySelector("tbody"),
      modelFacts: $("model-facts"),
      cameras: $("cameras-table").querySelector("tbody"),
      modelLine: $("model"),
      onRemoveCamera: (name) => this.removeCamera(name),
    });
    this.detail = new Detail({
      dialog: $("detail"),
      loop: this.loop,
      onChanged: () => this.pollStatsSoon(),
      onRefused: () => this.refused(),
    });
    this.resize = new ResizeObserver(() => this.drawCharts());
    this.resize.observe($("chart-fps"));
    $("add-camera-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.addCamera(e.target);
    });
  }

  start(firstStats) {
    this.showStats(firstStats);
    setText($("status-stats"), "stats: live");
    $("status-stats").dataset.state = "ok";
    this.loop.start();
    this.after(STATS_EVERY_MS, () => this.pollStats());
    this.pollHistory();
  }

  stop() {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.feed.stop();
    this.loop.stop();
    this.resize.disconnect();
    if ($("detail").open) $("detail").close();
  }

  refused() {
    if (this.stopped) return;
    this.stop();
    this.onRefused();
  }

  after(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      if (!this.stopped) fn();
    }, ms);
    this.timers.add(t);
  }

  pollStatsSoon() {
    this.after(150, () => this.pollStats(true));
  }

  async pollStats(once = false) {
    try {
      this.showStats(await getJSON("/stats"));
      setText($("status-stats"), "stats: live");
      $("status-stats").dataset.state = "ok";
    } catch (err) {
      if (err instanceof AuthError) return this.refused();
      setText($("status-stats"), "stats: daemon unreachable");
      $("status-stats").dataset.state = "error";
    }
    if (!once) this.after(STATS_EVERY_MS, () => this.pollStats());
  }

  showStats(s) {
    this.stats = s;
    // Coalesced with drawing: the DOM changes once per animation frame at most.
    requestAnimationFrame(() => {
      if (this.stopped || this.stats !== s) return;
      this.panels.update(s);
      this.grid.sync(s.streams, s.cameras || {});
      this.detail.update(s);
    });
  }

  async pollHistory() {
    try {
      this.history = await getJSON("/stats/history");
      requestAnimationFrame(() => this.drawCharts());
    } catch (err) {
      if (err instanceof AuthError) return this.refused();
    }
    this.after(HISTORY_EVERY_MS, () => this.pollHistory());
  }

  drawCharts() {
    const h = this.history;
    if (!h || this.stopped) return;
    const pts = h.points || [];
    const times = pts.map((p) => p.t);
    drawChart($("chart-fps"), times, [
      { name: "processed fps", color: "#34c759", values: pts.map((p) => p.fps) },
      { name: "dropped / s", color: "#ff9500", values: pts.map((p) => p.dropped_per_s) },
    ], "fps");
    drawChart($("chart-latency"), times, [
      { name: "p50", color: "#0a84ff", values: pts.map((p) => p.p50_ms) },
      { name: "p99", color: "#ff2d55", values: pts.map((p) => p.p99_ms) },
    ], "ms");
  }

  async addCamera(form) {
    const msg = $("add-camera-msg");
    const body = {
      name: $("cam-name").value.trim(),
      url: $("cam-url").value.trim(),
      max_fps: Number($("cam-maxfps").value || 0),
      skip_frames: Number($("cam-skip").value || 1),
    };
    if ($("cam-loop").checked) body.loop = true;
    msg.dataset.state = "";
    msg.textContent = "adding\u2026";
    try {
      const r = await request("/cameras", { method: "POST", json: body });
      if (r.status === 201) {
        msg.textContent = `Camera ${body.name} added.`;
        form.reset();
        this.pollStatsSoon();
      } else {
        msg.dataset.state = "error";
        msg.textContent = `Not added: ${await detail(r)}`;
      }
    } catch (err) {
      if (err instanceof AuthError) return this.refused();
      msg.dataset.state = "error";
      msg.textContent = `Not added: ${err.message}`;
    }
  }

  async removeCamera(name) {
    const msg = $("add-camera-msg");
    try {
      const r = await request(`/cameras/${encodeURIComponent(name)}`, { method: "DELETE" });
      msg.dataset.state = r.ok ? "" : "error";
      msg.textContent = r.ok ? `Camera ${name} removed.` : `Not removed: ${await detail(r)}`;
      this.pollStatsSoon();
    } catch (err) {
      if (err instanceof AuthError) return this.refused();
      msg.dataset.state = "error";
      msg.textContent = `Not removed: ${err.message}`;
    }
  }
}

let dashboard = null;
let built = false; // a Dashboard owns the page's DOM and listeners: one per page load

function showLogin(error) {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  const e = $("login-error");
  e.textContent = error || "";
  e.hidden = !error;
  $("token").focus();
}

/** The token's role from GET /whoami ("viewer" when it cannot be told: show less, not more). */
async function role() {
  try {
    const r = await request("/whoami");
    return r.ok ? (await r.json()).role : "viewer";
  } catch {
    return "viewer";
  }
}

/** GET /stats with the stored token (or none): the dashboard on 200, the sign-in form on 401. */
async function enter(refusedMessage) {
  let r;
  try {
    r = await request("/stats");
  } catch (err) {
    if (err instanceof AuthError) {
      setToken("");
      showLogin(refusedMessage);
    } else {
      // A token with characters a header cannot carry lands here too (fetch refuses it).
      setToken("");
      showLogin(`Could not reach the daemon: ${err.message}`);
    }
    return;
  }
  if (!r.ok) {
    showLogin(`The daemon answered /stats with ${await detail(r)}`);
    return;
  }
  if (built) {
    window.location.reload(); // signed in again after a refusal: start from a clean page
    return;
  }
  built = true;
  const first = await r.json();
  document.body.dataset.role = await role();
  $("login").hidden = true;
  $("login-error").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !token();
  dashboard = new Dashboard(() => {
    dashboard = null;
    setToken("");
    showLogin("The daemon refused the token (it may have changed). Sign in again.");
  });
  dashboard.start(first);
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token").value;
  $("token").value = "";
  setToken(value);
  enter("Wrong token: the daemon refused it.");
});

$("logout").addEventListener("click", () => {
  if (dashboard) dashboard.stop();
  dashboard = null;
  setToken("");
  showLogin("");
});

enter(token() ? "The saved token was refused. Sign in again." : "");
