// Live frames: each view (a grid tile or the large view) fetches its stream's latest analysed
// frame at its own throttle, one request in flight, only while active; drawing is coalesced into
// one requestAnimationFrame. A fetched frame waits briefly for its boxes from /ws.

import { AuthError, request } from "./api.js";
import { drawFrame } from "./draw.js";

const TICK_MS = 50;
const WAIT_FOR_BOXES_MS = 800; // a result is published before its frame is fetchable; /ws lags a bit

export class FrameView {
  constructor(canvas, stream, intervalMs, onDrawn) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.stream = stream;
    this.intervalMs = intervalMs;
    this.onDrawn = onDrawn; // (view, detections | undefined)
    this.active = false;
    this.busy = false;
    this.startedAt = -Infinity;
    this.shownId = null;
    this.pending = null; // {id, bitmap, at}
    this.status = "waiting";
  }

  reset(stream) {
    this.stream = stream;
    this.shownId = null;
    this.startedAt = -Infinity;
    this.discard();
    delete this.canvas.dataset.frameId;
    delete this.canvas.dataset.boxes;
  }

  discard() {
    if (this.pending) this.pending.bitmap.close();
    this.pending = null;
  }

  draw(pending, detections) {
    drawFrame(this.canvas, this.ctx, pending.bitmap, detections);
    pending.bitmap.close();
    this.shownId = pending.id;
    // What the canvas shows now: the frame id, and how many boxes (-1: its result never came).
    this.canvas.dataset.frameId = String(pending.id);
    this.canvas.dataset.boxes = String(detections ? detections.length : -1);
    if (this.onDrawn) this.onDrawn(this, detections);
  }
}

export class FrameLoop {
  constructor(feed, onRefused) {
    this.feed = feed;
    this.onRefused = onRefused;
    this.views = new Set();
    this.dirty = new Set();
    this.exclusive = null; // while the large view is open only it fetches
    this.raf = 0;
    this.timer = 0;
    this.stopped = false;
  }

  add(view) {
    this.views.add(view);
  }

  remove(view) {
    this.views.delete(view);
    this.dirty.delete(view);
    view.discard();
    this.refreshWanted();
  }

  fetching(view) {
    return this.exclusive ? view === this.exclusive : view.active;
  }

  /** Tell the feed which streams are on screen (call when activity changes). */
  refreshWanted() {
    const names = new Set();
    for (const v of this.views) if (this.fetching(v)) names.add(v.stream);
    this.feed.want(names);
  }

  /** A result arrived: a view holding that frame can draw it now. */
  resultArrived(stream, frameId) {
    for (const v of this.views) {
      if (v.pending && v.pending.id === frameId && v.stream === stream) this.markDirty(v);
    }
  }

  start() {
    this.tick();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.raf) cancelAnimationFrame(this.raf);
    for (const v of this.views) v.discard();
  }

  tick() {
    if (this.stopped) return;
    const now = performance.now();
    for (const v of this.views) {
      if (!document.hidden && this.fetching(v) && !v.busy && now - v.startedAt >= v.intervalMs) {
        this.fetch(v, now);
      }
      if (v.pending && now - v.pending.at >= WAIT_FOR_BOXES_MS) this.markDirty(v);
    }
    this.timer = setTimeout(() => this.tick(), TICK_MS);
  }

  async fetch(view, now) {
    view.busy = true;
    view.startedAt = now;
    const stream = view.stream;
    try {
      const r = await request(`/streams/${encodeURIComponent(stream)}/frame.jpg`);
      if (view.stream !== stream || this.stopped) {
        await r.body?.cancel();
        return;
      }
      if (r.status === 200) {
        const header = r.headers.get("X-Frame-Id");
        const id = header === null ? NaN : Number(header);
        if (id === view.shownId || (view.pending && view.pending.id === id)) {
          await r.body?.cancel(); // the same frame as before: nothing to decode
        } else {
          const bitmap = await createImageBitmap(await r.blob());
          if (view.stream !== stream || this.stopped) {
            bitmap.close();
            return;
          }
          view.discard();
          view.pending = { id, bitmap, at: performance.now() };
          this.markDirty(view);
        }
        view.status = "live";
      } else {
        await r.body?.cancel();
        view.status = r.status === 204 ? "waiting" : r.status === 404 ? "gone" : `HTTP ${r.status}`;
      }
    } catch (err) {
      if (err instanceof AuthError) this.onRefused();
      else view.status = "unreachable";
    } finally {
      view.busy = false;
    }
  }

  markDirty(view) {
    this.dirty.add(view);
    if (!this.raf && !this.stopped) this.raf = requestAnimationFrame(() => this.flush());
  }

  flush() {
    this.raf = 0;
    const now = performance.now();
    for (const v of this.dirty) {
      const p = v.pending;
      if (!p) continue;
      const detections = Number.isFinite(p.id) ? this.feed.boxes(v.stream, p.id) : undefined;
      if (detections === undefined && now - p.at < WAIT_FOR_BOXES_MS) continue; // keep waiting
      v.pending = null;
      v.draw(p, detections);
    }
    this.dirty.clear();
  }
}
