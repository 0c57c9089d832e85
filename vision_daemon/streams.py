"""Per-stream bounded queues, the sink a stream answers through, and the values that flow back.

A stream never knows its transport: it holds a `Sink` (what the ingest adapter gave the
pipeline), and workers and the scheduler hand their verdicts back as `Report` values through one
`Reports` queue that the pipeline drains.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vision_daemon.analytics import Event, StreamAnalytics, StreamCounts
from vision_daemon.detectors.base import Detection
from vision_daemon.masks import Mask
from vision_daemon.motion import MotionGate
from vision_daemon.options import resolve
from vision_daemon.protocol import Frame, StreamOptions
from vision_daemon.stats import Counts


class Sink(Protocol):
    """Where a stream's answers go (a TCP connection today; WebSocket, shm, cameras later)."""

    peer: str  # for /stats and log lines; never holds a secret
    rate_advice: bool  # the peer follows `advise` (else its demand is the rate it sends at)

    def result(self, payload: bytes, frame: Frame) -> bool:
        """Queue a packed result of `frame`; False when the sink's outbox is full (it is lost)."""
        ...

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        """A frame of this sink ended without a result."""
        ...

    def error(self, code: str, message: str, frame_id: int | None = None) -> None:
        """Tell the peer one of its messages or frames was refused."""
        ...

    def frame_done(self) -> None:
        """Exactly once per submitted frame, after its result or drop: the sink's own tally."""
        ...

    def advise(self, stream: str, fps: float) -> None:
        """The rate the daemon will serve this stream now (sent only to peers that asked)."""
        ...


@dataclass(slots=True)
class Job:
    """One accepted frame on its way through queue -> worker -> result."""

    frame: Frame
    stream: Stream
    sink: Sink
    received_at: float  # monotonic, server clock
    taken_at: float = 0.0
    ended: bool = False  # its result or drop was counted and its sink told (exactly once)


@dataclass(slots=True)
class Outcome:
    """What a worker made of one job: detections, or an error code that drops the frame."""

    detections: list[Detection] | None = None
    error: str | None = None  # protocol error code
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # motion gating: the last analysed frame's detections, no inference
    events: list[Event] = field(default_factory=list)  # analytics: what this frame caused
    counts: StreamCounts | None = None  # analytics: the stream's counts, when events changed them
    snapshot: bytes | None = None  # analytics: the frame as a JPEG for its events (if asked)


@dataclass(eq=False)
class Analysis:
    """A stream's tracking, lines and zones (issue 18), behind the lock that serialises them: a
    worker feeds it each analysed frame; the event loop ends idle tracks and reads counts."""

    analytics: StreamAnalytics
    snapshot_max_bytes: int = 0  # attach a JPEG of at most this size to events (0 = none)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_at: float | None = None  # the time of the last frame (or tick) it saw
    events: Counter[str] = field(default_factory=Counter)  # by type, counted by the pipeline

    def update(
        self, detections: Sequence[Detection], t: float
    ) -> tuple[list[dict[str, object]], list[Event], StreamCounts | None]:
        """One analysed frame: its detections with track_id, its events, and the stream's counts
        if they changed."""
        with self.lock:
            tracked, events = self.analytics.update(detections, t)
            self.last_at = t
            return tracked, events, self.analytics.counts() if events else None

    def tick(self, now: float) -> tuple[list[Event], StreamCounts | None]:
        """No frame for longer than the track timeout: end the tracks that timed out."""
        with self.lock:
            if not self.analytics.tracker.tracks:
                return [], None
            _, events = self.analytics.update([], now)
            self.last_at = now
            return events, self.analytics.counts() if events else None

    def counts(self) -> StreamCounts:
        with self.lock:
            return self.analytics.counts()

    def reset(self) -> tuple[list[Event], StreamCounts]:
        """The stream goes: every track ends (exit events); counts are kept."""
        with self.lock:
            return self.analytics.reset(), self.analytics.counts()


@dataclass(slots=True)
class Report:
    """A job leaving the scheduler or a worker: an outcome, or a drop reason."""

    job: Job
    outcome: Outcome | None = None
    dropped: str | None = None
    taken: bool = True  # a worker had it (its stream's in-flight slot is released when routed)


class Reports:
    """The one queue on which verdicts travel back up to the pipeline (event loop only)."""

    def __init__(self) -> None:
        self._items: deque[Report] = deque()
        self._event = asyncio.Event()

    def put(self, report: Report) -> None:
        self._items.append(report)
        self._event.set()

    def drop_untaken(self, job: Job, reason: str) -> None:
        """A frame that left its queue without reaching a worker (the scheduler's stale drops)."""
        self.put(Report(job, dropped=reason, taken=False))

    def take_all(self) -> list[Report]:
        items = list(self._items)
        self._items.clear()
        self._event.clear()
        return items

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()

    def wake(self) -> None:
        """Wake the waiter with nothing new (a timer's tick)."""
        self._event.set()


class QueueBudget:
    """Bytes of frames queued across all streams, against one limit (max_queued_mb)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def over(self) -> bool:
        return self.used > self.limit


class Gate:
    """A stream's skip_frames and max_fps, as a pure policy: which frames go on to be analysed.

    The pipeline applies it to pushed frames; a camera's reader applies it itself, before it
    decodes or converts a frame that would only be dropped.
    """

    __slots__ = ("_next_due", "_seen", "options")

    def __init__(self, options: StreamOptions) -> None:
        self.options = options
        self._seen = 0
        self._next_due = 0.0

    def admit(self, now: float) -> str | None:
        """The drop reason for a frame arriving `now`, or None to analyse it."""
        seen = self._seen
        self._seen += 1
        if self.options.skip_frames > 1 and seen % self.options.skip_frames:
            return "skipped"
        if self.options.max_fps > 0:
            interval = 1.0 / self.options.max_fps
            # 10% slack so camera jitter at exactly max_fps is not throttled. The schedule stays
            # anchored (a frame admitted late does not push the next one back, so a 30 fps
            # camera analysed at 10 gets 10, not 9.3), but frames admitted are never closer
            # than half an interval: a stream that was slow (or is new) does not burst.
            if now + 0.1 * interval < self._next_due:
                return "throttled"
            if now - self._next_due > interval:  # new, or idle for a while: re-anchor here
                self._next_due = now + interval
            else:
                self._next_due = max(self._next_due + interval, now + 0.5 * interval)
        return None


@dataclass(eq=False)
class Stream:
    name: str
    options: StreamOptions
    depth: int
    window_s: float
    budget: QueueBudget  # shared by every stream of the daemon
    sink: Sink | None = None
    queue: deque[Job] = field(default_factory=deque)
    queued_bytes: int = 0
    in_flight: int = 0  # taken by a worker, or reported and not yet routed by the pipeline
    counts: Counts = field(init=False)
    created_at: float = field(default_factory=time.monotonic)
    last_frame_at: float | None = None
    detached_at: float | None = None  # set when its sink closed; removed after a grace
    metric_label: str = ""  # the label this stream's Prometheus series carry
    advised_fps: float | None = None  # the rate the pipeline last advised (rates.py)
    # options an operator set (PATCH /streams/{name}): they win over the client's
    overrides: dict[str, object] = field(default_factory=dict)
    motion_refresh_s: float = 5.0
    gate: Gate = field(init=False)
    motion: MotionGate | None = field(init=False)  # set when options.motion_gate > 0
    analysis: Analysis | None = None  # tracking, lines and zones; set by the pipeline
    masks: tuple[Mask, ...] = ()  # privacy masks; set by the pipeline (workers read the tuple)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the daemon's (options.resolve)
    given: StreamOptions = field(init=False)  # what the client or camera said

    def __post_init__(self) -> None:
        self.counts = Counts(self.window_s)
        self.set_options(self.options)

    def set_options(self, options: StreamOptions) -> None:
        """The client's options, resolved with the daemon's defaults and the operator's
        overrides (options.resolve); the gates start afresh."""
        self.given = options
        self.options = resolve(options, self.defaults, self.overrides)
        self.gate = Gate(self.options)
        gate = self.options.motion_gate
        self.motion = MotionGate(gate, self.motion_refresh_s) if gate > 0 else None

    @property
    def peer(self) -> str | None:
        return self.sink.peer if self.sink is not None else None

    def admit(self, now: float, gated: bool = False) -> str | None:
        """A frame arrived (the ledger counted it): apply the options, unless its ingest `gated`
        it already; the drop reason, or None to queue."""
        self.last_frame_at = now
        return None if gated else self.gate.admit(now)

    def push(self, job: Job) -> Job | None:
        """Queue a frame; when full the oldest queued frame is returned to be dropped (latest wins)."""
        evicted = self.pop() if len(self.queue) >= self.depth else None
        self.queue.append(job)
        size = job.frame.nbytes
        self.queued_bytes += size
        self.budget.used += size
        return evicted

    def pop(self) -> Job:
        """Take the oldest queued frame (every removal goes through here, for the byte budget)."""
        job = self.queue.popleft()
        size = job.frame.nbytes
        self.queued_bytes -= size
        self.budget.used -= size
        return job

    def snapshot(self, now: float) -> dict[str, object]:
        snap = self.counts.snapshot(now)
        snap.update(
            {
                "name": self.name,
                "peer": self.peer,
                "connected": self.detached_at is None,
                "queue_depth": len(self.queue),
                "queued_bytes": self.queued_bytes,
                "in_flight": self.in_flight,
                "last_frame_age_ms": (
                    None
                    if self.last_frame_at is None
                    else round((now - self.last_frame_at) * 1000, 1)
                ),
                "options": self.options.to_dict(),
                "advised_fps": self.advised_fps,
            }
        )
        return snap
