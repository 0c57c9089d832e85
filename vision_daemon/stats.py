"""Counters and sliding windows, recorded where things happen on the event loop, read as snapshots."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

# Every reason a received frame may end without a result. A frame is processed or dropped with one.
DROP_REASONS = (
    "queue_full",  # the stream's queue was full; the oldest queued frame made room
    "stale",  # older than max_frame_age_ms when a worker would have taken it
    "throttled",  # above the stream's max_fps
    "skipped",  # not the Nth frame under skip_frames
    "superseded",  # a camera's newer frame replaced it before the pipeline took it
    "decode_error",  # image bytes did not decode
    "invalid",  # message failed validation (image too large, bad fields)
    "refused",  # stream not admitted (limits, name in use, auth)
    "detector_error",  # the detector raised on this frame
    "backend_error",  # its Triton endpoint failed or timed out, or every endpoint is down
    "worker_timeout",  # the worker was stuck longer than worker_timeout_s
    "memory_limit",  # queued frames of all streams passed max_queued_mb; the biggest queue paid
    "disconnected",  # the sending connection went away while the frame waited
    "shutdown",  # the daemon stopped before the frame was taken
    "internal_error",  # routing its result failed (a bug; logged with a traceback)
)

STAGES = ("queue_ms", "decode_ms", "infer_ms", "track_ms", "total_ms")
WINDOW_SAMPLES = 4096  # bound per window: memory stays flat however fast frames arrive


class Window:
    """(time, value) samples over the last `span` seconds, capped at WINDOW_SAMPLES."""

    __slots__ = ("_born", "_items", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._items: deque[tuple[float, float]] = deque(maxlen=WINDOW_SAMPLES)
        self._born = time.monotonic()

    def add(self, value: float = 1.0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._items.append((now, value))
        # Prune here too, not only when /stats reads: unread windows would otherwise fill to the
        # cap and hold minutes of samples (the soak saw RSS creep about 2 MB/min until they did).
        if self._items[0][0] < now - self.span:
            self._prune(now)

    def _prune(self, now: float) -> None:
        cutoff = now - self.span
        items = self._items
        while items and items[0][0] < cutoff:
            items.popleft()

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window (or over the samples' span if the cap cut it)."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        n = len(self._items)
        if n == 0:
            return 0.0
        # A stream 2 s old has 2 s of history, not a full window.
        span = max(min(self.span, now - self._born), 1.0)
        if n == WINDOW_SAMPLES:
            span = max(now - self._items[0][0], 1e-3)
        return n / span

    def percentiles(self, now: float | None = None) -> dict[str, float | None]:
        now = time.monotonic() if now is None else now
        self._prune(now)
        return percentiles([v for _, v in self._items])


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 (nearest rank on the sorted values) and mean, in plain Python: a window holds
    at most WINDOW_SAMPLES values, and /stats builds one of these per stage per stream."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    vals = sorted(values)
    last = len(vals) - 1

    def pick(q: float) -> float:
        return round(vals[min(last, int(q * len(vals)))], 2)

    return {
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "mean": round(sum(vals) / len(vals), 2),
    }


@dataclass
class Counts:
    """Frame counters with the same shape for one stream and for the daemon."""

    window_s: float
    received: int = 0
    processed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    results_dropped: int = 0  # processed, but the client was not reading (send buffer full)
    unchanged: int = 0  # processed by reusing the last detections (motion gating)
    recv_window: Window = field(init=False)
    proc_window: Window = field(init=False)
    stages: dict[str, Window] = field(init=False)

    def __post_init__(self) -> None:
        self.recv_window = Window(self.window_s)
        self.proc_window = Window(self.window_s)
        self.stages = {s: Window(self.window_s) for s in STAGES}

    def on_received(self, now: float) -> None:
        self.received += 1
        self.recv_window.add(1.0, now)

    def on_dropped(self, reason: str) -> None:
        self.dropped[reason] += 1

    def on_processed(self, now: float, timings: dict[str, float]) -> None:
        self.processed += 1
        self.proc_window.add(1.0, now)
        for stage, value in timings.items():
            self.stages[stage].add(value, now)

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "received": self.received,
            "processed": self.processed,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
            "results_dropped": self.results_dropped,
            "unchanged": self.unchanged,
            "received_fps": round(self.recv_window.rate(now), 2),
            "processed_fps": round(self.proc_window.rate(now), 2),
            "latency_ms": {
                s.removesuffix("_ms"): w.percentiles(now) for s, w in self.stages.items()
            },
        }


@dataclass
class WorkerStats:
    worker_id: int
    window_s: float
    frames: int = 0
    batches: int = 0
    errors: int = 0
    restarts: int = 0
    busy_since: float | None = None
    state: str = "starting"  # starting, ready, busy, stuck, restarting, stopped
    _busy: Window = field(init=False)

    def __post_init__(self) -> None:
        self._busy = Window(self.window_s)

    def start(self, now: float) -> None:
        self.busy_since = now
        self.state = "busy"

    def finish(self, now: float, frames: int) -> None:
        if self.busy_since is not None:
            self._busy.add(now - self.busy_since, now)
        self.busy_since = None
        self.frames += frames
        self.batches += 1
        self.state = "ready"

    def busy_fraction(self, now: float) -> float:
        self._busy._prune(now)
        busy = sum(v for _, v in self._busy._items)
        if self.busy_since is not None:
            busy += now - self.busy_since
        return round(min(1.0, busy / self._busy.span), 3)

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "id": self.worker_id,
            "state": self.state,
            "frames": self.frames,
            "batches": self.batches,
            "errors": self.errors,
            "restarts": self.restarts,
            "busy_fraction": self.busy_fraction(now),
            "busy_for_s": None if self.busy_since is None else round(now - self.busy_since, 3),
        }
