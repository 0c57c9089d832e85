"""One typed stats snapshot, built from the components at most once a second, off the request path.

`/stats`, `/streams/{name}` and the gauges of `/metrics` read the latest snapshot; a flood of
scrapes costs one build a second (`/ready` is cheap and computed per request). The pipeline's
pending verdicts are routed first, so the snapshot's accounting is exact at the instant it is
taken:
received = processed + dropped by reason + queued + in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from vision_daemon import __version__
from vision_daemon.detectors import ModelInfo
from vision_daemon.detectors.endpoints import Endpoints
from vision_daemon.ingest.camera_manager import CameraManager
from vision_daemon.ingest.tcp import TcpIngest
from vision_daemon.ingest.ws import WsIngest
from vision_daemon.outputs import EventOutput, Hub
from vision_daemon.pipeline import Pipeline
from vision_daemon.schema import Snapshot, Stats
from vision_daemon.streams import Analysis
from vision_daemon.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass
class Components:
    """What a snapshot is built from; the lifecycle fills it in as components start."""

    pipeline: Pipeline
    hub: Hub
    ingest: TcpIngest
    started_at: float
    ready: Callable[[], tuple[bool, str]]
    cameras: CameraManager | None = None
    pool: WorkerPool | None = None
    model_info: ModelInfo | None = None
    ws_ingest: WsIngest | None = None
    outputs: Sequence[EventOutput] = ()  # event outputs, each with snapshot()
    backends: Endpoints | None = None  # Triton endpoints, when the model is remote
    http: Callable[[], dict[str, int]] | None = None  # the control plane's connection counts


def build(c: Components, proc: psutil.Process) -> dict[str, Any]:
    """Everything /stats shows, from the live counters at one instant (event loop only)."""
    c.pipeline.drain()
    now = time.monotonic()
    totals = c.pipeline.totals.snapshot(now)
    pool = c.pool
    sizes = dict(pool.batch_sizes) if pool else {}
    calls = sum(sizes.values())
    ok, reason = c.ready()
    streams = c.pipeline.streams
    return {
        "total_frames": totals["received"],
        "processed_frames": totals["processed"],
        "dropped_frames": totals["dropped"],
        "last_latency_ms": (
            None if c.pipeline.last_latency_ms is None else round(c.pipeline.last_latency_ms, 2)
        ),
        "fps": totals["processed_fps"],
        "queue_size": c.pipeline.queued(),
        "queued_bytes": c.pipeline.budget.used,
        "cpu": psutil.cpu_percent(None),
        "ram": psutil.virtual_memory().percent,
        "version": __version__,
        "uptime_s": round(now - c.started_at, 1),
        "ready": ok,
        "ready_reason": reason,
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "model": c.model_info.to_dict() if c.model_info else None,
        "workers": [w.stats.snapshot(now) for w in pool.workers] if pool else [],
        "workers_busy": pool.busy() if pool else 0,
        "totals": totals,
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "mean_batch_size": (
            round(sum(k * v for k, v in sizes.items()) / calls, 3) if calls else None
        ),
        "connections": {
            "open": len(c.ingest.connections),
            "pending": len(c.ingest.pending),
            "total": c.ingest.total,
            "refused": c.ingest.refused,
            "evicted": c.ingest.evicted,
            "outbox_max": max((len(x.outbox) for x in c.ingest.connections), default=0),
            "shm_rings": sum(1 for x in c.ingest.connections if x.attachment.mapped_bytes),
            "shm_mapped_bytes": sum(x.attachment.mapped_bytes for x in c.ingest.connections),
        },
        "ws_ingest": (
            c.ws_ingest.counts()
            if c.ws_ingest
            else {"open": 0, "total": 0, "refused": 0, "outbox_max": 0}
        ),
        "http": (c.http() if c.http else {"open": 0, "pending": 0, "refused": 0, "evicted": 0}),
        "errors": dict(c.pipeline.errors),
        "ws": c.hub.snapshot(),
        "streams_evicted": c.pipeline.streams_evicted,
        "streams": {
            name: {
                **s.snapshot(now),
                "metric_label": s.metric_label,
                "analytics": _analytics(s.analysis),
            }
            for name, s in sorted(streams.items())
        },
        "cameras": c.cameras.health(now) if c.cameras else {},
        "events": dict(c.pipeline.events_total),
        "outputs": [o.snapshot() for o in c.outputs],
        "backends": c.backends.snapshot() if c.backends is not None else [],
    }


def _analytics(analysis: Analysis | None) -> dict[str, Any] | None:
    if analysis is None:
        return None
    counts = analysis.counts()
    zones = {
        name: {**z, "dwell_s": {str(k): round(v, 3) for k, v in z["dwell_s"].items()}}
        for name, z in counts["zones"].items()
    }
    return {
        "tracks": counts["tracks"],
        "zones": zones,
        "lines": counts["lines"],
        "events": dict(analysis.events),
    }


class History:
    """/stats/history: the last `points` summaries of the snapshot, one per `interval_s` (the
    dashboard's charts). A bounded deque; a point holds every stream, and streams are bounded by
    max_streams. Its JSON is encoded once per new point, however many read it."""

    def __init__(self, points: int = 300, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.points: deque[dict[str, Any]] = deque(maxlen=points)
        self._last_at = float("-inf")
        self._last_dropped = 0
        self._body: bytes | None = None

    def offer(self, data: dict[str, Any], now: float, wall: float) -> None:
        """Record a point from a snapshot's data if `interval_s` has passed since the last one."""
        if self.points.maxlen == 0 or now - self._last_at < self.interval_s * 0.95:
            return  # (5% slack: the refreshes that feed it jitter)
        elapsed = now - self._last_at
        dropped = data["dropped_frames"]
        rate = (dropped - self._last_dropped) / elapsed if self.points else 0.0
        self._last_at, self._last_dropped = now, dropped
        totals = data["totals"]["latency_ms"]["total"]
        self.points.append(
            {
                "t": round(wall, 3),
                "fps": data["fps"],
                "p50_ms": totals["p50"],
                "p99_ms": totals["p99"],
                "dropped_per_s": round(max(0.0, rate), 3),
                "queue": data["queue_size"],
                "streams": {
                    name: {
                        "fps": st["processed_fps"],
                        "p50_ms": st["latency_ms"]["total"]["p50"],
                        "p99_ms": st["latency_ms"]["total"]["p99"],
                        "queue": st["queue_depth"],
                    }
                    for name, st in data["streams"].items()
                },
            }
        )
        self._body = None

    def body(self) -> bytes:
        if self._body is None:
            doc = {"interval_s": self.interval_s, "points": list(self.points)}
            self._body = json.dumps(doc, allow_nan=False).encode()
        return self._body


class SnapshotCache:
    """Holds the latest snapshot; `refresh` rebuilds it, `run` does so every `interval_s`."""

    def __init__(
        self, components: Components, interval_s: float = 1.0, history: History | None = None
    ) -> None:
        self.components = components
        self.interval_s = interval_s
        self.history = history if history is not None else History()
        self._proc = psutil.Process()
        psutil.cpu_percent(None)  # prime: later calls measure since the previous one
        self._latest: Snapshot | None = None

    def refresh(self) -> Snapshot:
        data = build(self.components, self._proc)
        model = Stats.model_validate(data)
        now = time.monotonic()
        snap = Snapshot(data, model, model.model_dump_json().encode(), now)
        self._latest = snap
        self.history.offer(data, now, time.time())
        return snap

    def latest(self) -> Snapshot:
        return self._latest if self._latest is not None else self.refresh()

    def model(self) -> Stats | None:
        """The latest snapshot's typed model (what /metrics reads at scrape time), if any."""
        return self._latest.model if self._latest is not None else None

    async def run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # a bug here must not stop the refreshes (nor end the daemon)
                log.exception("building the stats snapshot failed")
            await asyncio.sleep(self.interval_s)
