"""Per-stream bounded queues: latest wins, every frame that leaves without a result has a reason."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vision_daemon.protocol import Frame, StreamOptions
from vision_daemon.stats import Counts

if TYPE_CHECKING:
    from vision_daemon.server import Connection


@dataclass(slots=True)
class Job:
    """One accepted frame on its way through queue -> worker -> result."""

    frame: Frame
    stream: Stream
    conn: Connection
    received_at: float  # monotonic, server clock
    taken_at: float = 0.0


class QueueBudget:
    """Bytes of frames queued across all streams, against one limit (max_queued_mb)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def over(self) -> bool:
        return self.used > self.limit


@dataclass(eq=False)
class Stream:
    name: str
    options: StreamOptions
    depth: int
    window_s: float
    budget: QueueBudget  # shared by every stream of the daemon
    conn: Connection | None = None
    queue: deque[Job] = field(default_factory=deque)
    queued_bytes: int = 0
    in_flight: int = 0
    counts: Counts = field(init=False)
    created_at: float = field(default_factory=time.monotonic)
    last_frame_at: float | None = None
    detached_at: float | None = None  # set when its connection closed; removed after a grace
    _seen: int = 0
    _next_due: float = 0.0

    def __post_init__(self) -> None:
        self.counts = Counts(self.window_s)

    def admit(self, now: float) -> str | None:
        """Per-stream options, applied before a frame is queued: the drop reason, or None to queue."""
        self.counts.on_received(now)
        self.last_frame_at = now
        seen = self._seen
        self._seen += 1
        if self.options.skip_frames > 1 and seen % self.options.skip_frames:
            return "skipped"
        if self.options.max_fps > 0:
            interval = 1.0 / self.options.max_fps
            # 10% slack so camera jitter at exactly max_fps is not throttled; max() stops a
            # stream that was slow from bursting to catch up.
            if now + 0.1 * interval < self._next_due:
                return "throttled"
            self._next_due = max(self._next_due + interval, now)
        return None

    def push(self, job: Job) -> Job | None:
        """Queue a frame; when full the oldest queued frame is returned to be dropped (latest wins)."""
        evicted = self.pop() if len(self.queue) >= self.depth else None
        self.queue.append(job)
        size = len(job.frame.image)
        self.queued_bytes += size
        self.budget.used += size
        return evicted

    def pop(self) -> Job:
        """Take the oldest queued frame (every removal goes through here, for the byte budget)."""
        job = self.queue.popleft()
        size = len(job.frame.image)
        self.queued_bytes -= size
        self.budget.used -= size
        return job

    def snapshot(self, now: float) -> dict[str, Any]:
        snap = self.counts.snapshot(now)
        snap.update(
            {
                "name": self.name,
                "peer": self.conn.peer if self.conn is not None else None,
                "connected": self.detached_at is None,
                "queue_depth": len(self.queue),
                "in_flight": self.in_flight,
                "last_frame_age_ms": (
                    None
                    if self.last_frame_at is None
                    else round((now - self.last_frame_at) * 1000, 1)
                ),
                "options": self.options.to_dict(),
            }
        )
        return snap
