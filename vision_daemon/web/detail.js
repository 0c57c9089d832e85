// The large view of one stream: its live frame with boxes, its own figures, and its controls
// (skip_frames and max_fps, removing a pulled camera).

import { AuthError, detail, request } from "./api.js";
import { FrameView } from "./frames.js";
import { Facts } from "./panels.js";
import {
  confirmClick,
  el,
  fmtAge,
  fmtInt,
  fmtMs,
  fmtNum,
  fmtReasons,
  setText,
  Text,
} from "./dom.js";

const DETAIL_INTERVAL_MS = 100;
const STAGES = ["queue", "decode", "infer", "total"];

export class Detail {
  constructor({ dialog, loop, onChanged, onRefused }) {
    this.dialog = dialog;
    this.loop = loop;
    this.onChanged = onChanged;
    this.onRefused = onRefused;
    this.name = null;
    const $ = (id) => document.getElementById(id);
    this.title = $("detail-title");
    this.state = $("detail-state");
    this.skip = $("detail-skip");
    this.maxFps = $("detail-maxfps");
    this.msg = $("detail-msg");
    this.remove = $("detail-remove");
    this.view = new FrameView($("detail-canvas"), "", DETAIL_INTERVAL_MS, null);
    loop.add(this.view);
    this.facts = new Facts($("detail-facts"), [
      ["received", "received"],
      ["processed", "processed"],
      ["unchanged", "of which unchanged (motion gate)"],
      ["dropped", "dropped"],
      ["reasons", "dropped by reason"],
      ["fps", "fps in / out"],
      ["queue", "queue depth / in flight"],
      ["age", "last frame age"],
      ["options", "skip / max fps"],
      ["advised", "advised fps"],
      ["peer", "peer"],
      ["camera", "camera"],
      ["health", "quality / reconnects / stalls"],
      ["camfps", "fps read / analysed / expected"],
      ["error", "last error"],
      ["frame", "frame shown"],
    ]);
    this.latency = {};
    const tbody = $("detail-latency").querySelector("tbody");
    for (const stage of STAGES) {
      const cells = ["p50", "p95", "p99", "mean"].map(() => new Text("\u2013"));
      tbody.append(el("tr", {}, el("th", {}, stage), ...cells.map((c) => el("td", { class: "num" }, c.node))));
      this.latency[stage] = cells;
    }
    $("detail-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => this.closed());
    $("detail-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.apply();
    });
    this.remove.addEventListener("click", () =>
      confirmClick(this.remove, "Remove camera", () => this.removeCamera()),
    );
  }

  open(name, stats) {
    this.name = name;
    this.title.textContent = name;
    this.msg.textContent = "";
    this.view.reset(name);
    this.loop.exclusive = this.view;
    this.loop.refreshWanted();
    const s = stats && stats.streams[name];
    const cam = stats && stats.cameras ? stats.cameras[name] : undefined;
    const opts = s ? s.options : cam ? cam.options : { skip_frames: 1, max_fps: 0 };
    this.skip.value = String(opts.skip_frames);
    this.maxFps.value = String(opts.max_fps);
    if (stats) this.update(stats);
    if (!this.dialog.open) this.dialog.showModal();
  }

  closed() {
    this.name = null;
    this.loop.exclusive = null;
    this.loop.refreshWanted();
  }

  update(stats) {
    if (!this.name) return;
    const s = stats.streams[this.name];
    const c = (stats.cameras || {})[this.name];
    this.remove.hidden = !c;
    const state = c ? `${c.state} \u00b7 ${c.quality}` : s ? (s.connected ? "connected" : "disconnected") : "gone";
    setText(this.state, state);
    // Twice per analysed frame at most: fresh without asking for the same frame over and over.
    const fps = s ? s.processed_fps : 0;
    this.view.intervalMs = Math.max(DETAIL_INTERVAL_MS, fps > 0 ? Math.min(1000, 500 / fps) : 0);
    const v = this.view.canvas.dataset;
    this.facts.set({
      received: s ? fmtInt(s.received) : "\u2013",
      processed: s ? fmtInt(s.processed) : "\u2013",
      unchanged: s && typeof s.unchanged === "number" ? fmtInt(s.unchanged) : "\u2013",
      dropped: s ? fmtInt(s.dropped) : "\u2013",
      reasons: s ? fmtReasons(s.dropped_by_reason) : "\u2013",
      fps: s ? `${fmtNum(s.received_fps)} / ${fmtNum(s.processed_fps)}` : "\u2013",
      queue: s ? `${fmtInt(s.queue_depth)} / ${fmtInt(s.in_flight)}` : "\u2013",
      age: s && s.last_frame_age_ms != null ? `${fmtMs(s.last_frame_age_ms)} ms` : "\u2013",
      options: s
        ? `${s.options.skip_frames} / ${fmtNum(s.options.max_fps)}${
            s.options.motion_gate > 0 ? ` \u00b7 motion gate ${s.options.motion_gate}` : ""
          }`
        : "\u2013",
      advised: s && s.advised_fps != null ? fmtNum(s.advised_fps) : "\u2013",
      peer: s && s.peer ? s.peer : "\u2013",
      camera: c ? `${c.source} ${c.url}${c.width ? ` (${c.width}x${c.height})` : ""}` : "pushed",
      health: c ? `${c.quality} / ${fmtInt(c.reconnects)} / ${fmtInt(c.stalls)}` : "\u2013",
      camfps: c
        ? `${fmtNum(c.source_fps)} / ${fmtNum(c.analysed_fps)} / ${fmtNum(c.expected_fps)}`
        : "\u2013",
      error: c && c.last_error ? `${c.last_error} (${fmtAge(c.last_error_age_s)} ago)` : "\u2013",
      frame: v.frameId ? `#${v.frameId}, ${v.boxes === "-1" ? "boxes not received" : `${v.boxes} boxes`}` : this.view.status,
    });
    for (const stage of STAGES) {
      const p = s ? s.latency_ms[stage] : {};
      ["p50", "p95", "p99", "mean"].forEach((k, i) => this.latency[stage][i].set(fmtMs(p[k])));
    }
  }

  async apply() {
    const name = this.name;
    const body = { skip_frames: Number(this.skip.value), max_fps: Number(this.maxFps.value) };
    this.msg.textContent = "applying\u2026";
    try {
      const r = await request(`/streams/${encodeURIComponent(name)}`, { method: "PATCH", json: body });
      if (r.ok) {
        const now = await r.json();
        this.msg.textContent = `Applied: skip_frames ${now.skip_frames}, max_fps ${now.max_fps}.`;
        this.onChanged();
      } else {
        this.msg.textContent = `Not applied: ${await detail(r)}`;
      }
    } catch (err) {
      if (err instanceof AuthError) this.onRefused();
      else this.msg.textContent = `Not applied: ${err.message}`;
    }
  }

  async removeCamera() {
    const name = this.name;
    try {
      const r = await request(`/cameras/${encodeURIComponent(name)}`, { method: "DELETE" });
      if (r.ok) {
        this.msg.textContent = `Camera ${name} removed.`;
        this.dialog.close();
        this.onChanged();
      } else {
        this.msg.textContent = `Not removed: ${await detail(r)}`;
      }
    } catch (err) {
      if (err instanceof AuthError) this.onRefused();
      else this.msg.textContent = `Not removed: ${err.message}`;
    }
  }
}
