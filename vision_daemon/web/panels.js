// The figures under the grid: totals, streams, workers, model and subscribers, cameras. Every
// row and text node is created once and updated in place at each /stats poll (~1 Hz).

import {
  confirmClick,
  el,
  fmtAge,
  fmtInt,
  fmtMs,
  fmtNum,
  fmtPct,
  fmtReasons,
  KeyedTable,
  setText,
  Text,
} from "./dom.js";

const pair = (p) => `${fmtMs(p.p50)} / ${fmtMs(p.p99)}`;

class Facts {
  /** A <dl> of label -> text node, built once from [key, label] pairs. */
  constructor(dl, fields) {
    this.values = {};
    for (const [key, label] of fields) {
      const t = new Text("\u2013");
      dl.append(el("div", {}, el("dt", {}, label), el("dd", { dataset: { key } }, t.node)));
      this.values[key] = t;
    }
  }

  set(values) {
    for (const [k, v] of Object.entries(values)) if (this.values[k]) this.values[k].set(v);
  }
}

export { Facts };

export class Panels {
  constructor({ summary, streams, workers, modelFacts, cameras, modelLine, onRemoveCamera }) {
    this.summary = new Facts(summary, [
      ["fps", "fps out"],
      ["received", "received"],
      ["processed", "processed"],
      ["dropped", "dropped"],
      ["p50", "p50 ms"],
      ["p99", "p99 ms"],
      ["queue", "queued"],
      ["busy", "busy"],
      ["subscribers", "/ws clients"],
      ["cpu", "CPU / RAM"],
    ]);
    this.streams = new KeyedTable(
      streams,
      [
        { cls: "name", text: (s, k) => k },
        { cls: "num received", text: (s) => fmtInt(s.received) },
        { cls: "num processed", text: (s) => fmtInt(s.processed) },
        { cls: "num dropped", text: (s) => fmtInt(s.dropped) },
        { cls: "reasons", text: (s) => fmtReasons(s.dropped_by_reason) },
        { cls: "num", text: (s) => `${fmtNum(s.received_fps)} / ${fmtNum(s.processed_fps)}` },
        { cls: "num", text: (s) => pair(s.latency_ms.queue) },
        { cls: "num", text: (s) => pair(s.latency_ms.decode) },
        { cls: "num", text: (s) => pair(s.latency_ms.infer) },
        {
          cls: "num",
          text: (s) => {
            const t = s.latency_ms.total;
            return `${fmtMs(t.p50)} / ${fmtMs(t.p95)} / ${fmtMs(t.p99)}`;
          },
        },
        { cls: "num queue", text: (s) => fmtInt(s.queue_depth) },
        { cls: "num", text: (s) => `${s.options.skip_frames} / ${fmtNum(s.options.max_fps)}` },
      ],
      "stream",
    );
    this.workers = new KeyedTable(
      workers,
      [
        { cls: "num", text: (w) => String(w.id) },
        { cls: "state", text: (w) => w.state },
        { cls: "num", text: (w) => fmtPct(w.busy_fraction) },
        { cls: "num", text: (w) => fmtInt(w.frames) },
        { cls: "num", text: (w) => fmtInt(w.errors) },
        { cls: "num", text: (w) => fmtInt(w.restarts) },
      ],
      "worker",
    );
    this.modelFacts = new Facts(modelFacts, [
      ["model", "model"],
      ["backend", "backend"],
      ["device", "device"],
      ["imgsz", "input size"],
      ["subscribers", "/ws subscribers"],
      ["wsdropped", "/ws messages dropped"],
      ["uptime", "uptime"],
      ["version", "version"],
    ]);
    this.cameras = new KeyedTable(
      cameras,
      [
        { cls: "name", text: (c, k) => k },
        { cls: "state", text: (c) => c.state },
        { cls: "quality", text: (c) => c.quality },
        { cls: "num", text: (c) => `${fmtNum(c.source_fps)} / ${fmtNum(c.analysed_fps)}` },
        { cls: "num", text: (c) => `${fmtInt(c.reconnects)} (${fmtInt(c.reconnects_last_hour)} in 1 h)` },
        { cls: "num", text: (c) => fmtInt(c.stalls) },
        { cls: "error-text", text: (c) => c.last_error || "" },
        {
          cls: "actions",
          button: "Remove",
          buttonClass: "danger remove admin-only",
          onClick: (name, b) => confirmClick(b, "Remove", () => onRemoveCamera(name)),
        },
      ],
      "camera",
    );
    this.modelLine = modelLine;
  }

  update(s) {
    const t = s.totals;
    const ws = s.ws || {};
    this.summary.set({
      fps: fmtNum(s.fps),
      received: fmtInt(t.received),
      processed: fmtInt(t.processed),
      dropped: fmtInt(t.dropped),
      p50: fmtMs(t.latency_ms.total.p50),
      p99: fmtMs(t.latency_ms.total.p99),
      queue: fmtInt(s.queue_size),
      busy: `${s.workers_busy} / ${s.workers.length}`,
      subscribers: `${fmtInt(ws.subscribers)} / ${fmtInt(ws.max_subscribers)}`,
      cpu: `${fmtNum(s.cpu, 0)} / ${fmtNum(s.ram, 0)}%`,
    });
    this.streams.update(s.streams);
    const workers = {};
    for (const w of s.workers) workers[String(w.id).padStart(4, "0")] = w;
    this.workers.update(workers);
    const m = s.model;
    this.modelFacts.set({
      model: m ? m.name : "none",
      backend: m ? m.backend : "\u2013",
      device: m ? m.device : "\u2013",
      imgsz: m && m.imgsz ? String(m.imgsz) : "\u2013",
      subscribers: `${fmtInt(ws.subscribers)} of ${fmtInt(ws.max_subscribers)} (${fmtInt(ws.refused)} refused)`,
      wsdropped: fmtInt(ws.dropped),
      uptime: fmtAge(s.uptime_s),
      version: s.version,
    });
    this.cameras.update(s.cameras || {});
    const line = m
      ? `${m.name} \u00b7 ${m.backend} \u00b7 ${m.device}${s.ready ? "" : ` \u00b7 ${s.ready_reason}`}`
      : "no model";
    setText(this.modelLine, line);
  }
}
