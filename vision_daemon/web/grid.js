// The camera grid: one tile per stream (pushed or pulled), its DOM built once; paged, and only
// tiles on screen (IntersectionObserver) fetch frames.

import { FrameView } from "./frames.js";
import { el, fmtInt, fmtMs, fmtNum, setText, Text } from "./dom.js";

// Frame requests a second for the whole grid, shared by the visible tiles (each gets at most 4/s,
// and none asks more often than its stream's frames are analysed).
const GRID_REQUESTS_PER_S = 40;
const TILE_MIN_INTERVAL_MS = 250;

class Tile {
  constructor(name, loop, onOpen) {
    this.name = name;
    this.title = new Text(name);
    this.badge = new Text("");
    this.fps = new Text("");
    this.latency = new Text("");
    this.dropped = new Text("");
    this.objects = new Text("waiting for a frame");
    this.badgeEl = el("span", { class: "pill" }, this.badge.node);
    const canvas = el("canvas", { class: "frame", width: "640", height: "360" });
    this.el = el(
      "article",
      { class: "tile", tabindex: "0", role: "button", dataset: { stream: name } },
      el("header", {}, el("span", { class: "name" }, this.title.node), this.badgeEl),
      canvas,
      el(
        "footer",
        {},
        el("span", { title: "processed frames per second" }, this.fps.node),
        el("span", { title: "latency p50, receipt to result" }, this.latency.node),
        el("span", { title: "frames dropped" }, this.dropped.node),
      ),
      el("div", { class: "objects" }, this.objects.node),
    );
    this.view = new FrameView(canvas, name, TILE_MIN_INTERVAL_MS, (_, dets) => this.drawn(dets));
    this.onPage = false;
    this.visible = false;
    this.shareMs = TILE_MIN_INTERVAL_MS; // the grid's budget divided among the active tiles
    this.frameMs = 0; // the stream's time between analysed frames: no point asking sooner
    this.el.addEventListener("click", () => onOpen(name));
    this.el.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        onOpen(name);
      }
    });
    loop.add(this.view);
  }

  drawn(detections) {
    if (!detections) {
      this.objects.set("boxes not received for this frame");
      return;
    }
    const counts = new Map();
    for (const d of detections) counts.set(d.label, (counts.get(d.label) || 0) + 1);
    const parts = [...counts].sort((a, b) => b[1] - a[1]).map(([l, n]) => `${n} ${l}`);
    this.objects.set(parts.length ? parts.join(", ") : "nothing detected");
  }

  throttle() {
    this.view.intervalMs = Math.max(this.shareMs, this.frameMs);
  }

  update(stream, camera) {
    if (stream) {
      const fps = stream.processed_fps;
      this.frameMs = fps > 0 ? Math.min(2000, 1000 / fps) : 0;
      this.throttle();
      this.fps.set(`${fmtNum(stream.processed_fps)} fps`);
      this.latency.set(`p50 ${fmtMs(stream.latency_ms.total.p50)} ms`);
      this.dropped.set(`${fmtInt(stream.dropped)} dropped`);
    }
    const state = camera ? `${camera.state} \u00b7 ${camera.quality}` : stream && !stream.connected ? "disconnected" : "";
    this.badge.set(state);
    this.badgeEl.dataset.state = camera ? camera.state : stream && stream.connected ? "streaming" : "gone";
  }
}

export class Grid {
  constructor({ root, empty, count, pageLabel, prev, next, size, loop, onOpen }) {
    this.root = root;
    this.empty = empty;
    this.count = count;
    this.pageLabel = pageLabel;
    this.prev = prev;
    this.next = next;
    this.size = size;
    this.loop = loop;
    this.onOpen = onOpen;
    this.tiles = new Map();
    this.names = [];
    this.page = 0;
    this.observer = new IntersectionObserver((entries) => this.intersect(entries), {
      rootMargin: "64px",
    });
    prev.addEventListener("click", () => this.goto(this.page - 1));
    next.addEventListener("click", () => this.goto(this.page + 1));
    size.addEventListener("change", () => this.goto(this.page));
  }

  pageSize() {
    return Number(this.size.value) || 16;
  }

  intersect(entries) {
    for (const e of entries) {
      const tile = this.tiles.get(e.target.dataset.stream);
      if (tile) tile.visible = e.isIntersecting;
    }
    this.activate();
  }

  /** Streams from /stats and cameras from its `cameras`: add and remove tiles, update figures. */
  sync(streams, cameras) {
    const names = [...new Set([...Object.keys(streams), ...Object.keys(cameras)])].sort();
    const changed = names.join("\n") !== this.names.join("\n");
    if (changed) {
      for (const [name, tile] of this.tiles) {
        if (!names.includes(name)) {
          this.observer.unobserve(tile.el);
          tile.el.remove();
          this.loop.remove(tile.view);
          this.tiles.delete(name);
        }
      }
      for (const name of names) {
        if (!this.tiles.has(name)) {
          const tile = new Tile(name, this.loop, this.onOpen);
          this.tiles.set(name, tile);
          this.observer.observe(tile.el);
        }
      }
      this.names = names;
      for (const name of names) this.root.append(this.tiles.get(name).el); // sorted order
      this.goto(this.page);
    }
    for (const name of names) this.tiles.get(name).update(streams[name], cameras[name]);
  }

  goto(page) {
    const per = this.pageSize();
    const pages = Math.max(1, Math.ceil(this.names.length / per));
    this.page = Math.min(Math.max(0, page), pages - 1);
    const first = this.page * per;
    this.names.forEach((name, i) => {
      const tile = this.tiles.get(name);
      tile.onPage = i >= first && i < first + per;
      tile.el.hidden = !tile.onPage;
    });
    this.empty.hidden = this.names.length > 0;
    setText(this.count, `${this.names.length} stream${this.names.length === 1 ? "" : "s"}`);
    setText(this.pageLabel, `page ${this.page + 1} / ${pages}`);
    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
    this.activate();
  }

  /** Tiles on this page and on screen fetch; they share the grid's request budget. */
  activate() {
    const active = [...this.tiles.values()].filter((t) => t.onPage && t.visible);
    const interval = Math.max(TILE_MIN_INTERVAL_MS, (1000 * active.length) / GRID_REQUESTS_PER_S);
    for (const t of this.tiles.values()) {
      t.view.active = t.onPage && t.visible;
      t.shareMs = interval;
      t.throttle();
    }
    this.loop.refreshWanted();
  }
}
