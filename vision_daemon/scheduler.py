"""Fair hand-out of waiting frames to workers: streams take turns, one frame each per turn.

A pure policy: it calls nobody above it. Frames it drops (stale) go back as values on `Reports`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from vision_daemon.streams import Job, Reports, Stream


class Scheduler:
    """Round-robin over streams that have a queued frame and room in flight; a turn serves the
    stream's newest frame (`latest`, older ones drop as superseded) or its oldest (`fifo`).

    Runs on the event loop only. A stream is in `_ready` at most once; after a frame is taken it
    goes to the back of the line, so a 30 fps camera gets the same turns as a 5 fps one.
    """

    def __init__(
        self,
        max_in_flight: int,
        max_frame_age_s: float,
        reports: Reports,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._ready: deque[Stream] = deque()
        self._queued: set[Stream] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._max_in_flight = max_in_flight
        self._max_age = max_frame_age_s
        self._reports = reports
        self._closed = False

    def _eligible(self, stream: Stream) -> bool:
        return bool(stream.queue) and stream.in_flight < self._max_in_flight

    def notify(self, stream: Stream) -> None:
        """A stream got a frame or finished one: queue it for a turn and wake a worker."""
        if stream not in self._queued and self._eligible(stream):
            self._queued.add(stream)
            self._ready.append(stream)
            self._wake()

    def _wake(self) -> None:
        # The most recently idle worker first (LIFO): at light load one worker keeps the work and
        # its model's caches stay warm instead of alternating between models; under load every
        # worker is busy anyway, so this changes nothing there.
        while self._waiters:
            fut = self._waiters.pop()
            if not fut.done():
                fut.set_result(None)
                return

    def done(self, job: Job) -> None:
        job.stream.in_flight -= 1
        self.notify(job.stream)

    @property
    def waiting(self) -> int:
        """Streams with a frame ready for a worker now."""
        return len(self._ready)

    def close(self) -> None:
        """Workers waiting for frames return empty-handed (shutdown)."""
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _take_now(self, limit: int, exclude: set[Stream]) -> list[Job]:
        jobs: list[Job] = []
        now = self._clock()
        skipped: list[Stream] = []
        while self._ready and len(jobs) < limit:
            stream = self._ready.popleft()
            self._queued.discard(stream)
            if stream in exclude:  # one frame per stream per batch
                skipped.append(stream)
                continue
            job = None
            if stream.options.serve != "fifo":  # the pipeline resolved "" to serve_default
                # Freshest-frame service: the newest queued frame is the one worth analysing.
                while len(stream.queue) > 1:
                    self._reports.drop_untaken(stream.pop(), "superseded")
            while stream.queue:
                candidate = stream.pop()
                if now - candidate.received_at > self._max_age:
                    self._reports.drop_untaken(candidate, "stale")
                    continue
                job = candidate
                break
            if job is None:
                continue
            job.taken_at = now
            stream.in_flight += 1
            exclude.add(stream)
            jobs.append(job)
            if self._eligible(stream):  # more frames and room in flight: another worker may go
                self._queued.add(stream)
                self._ready.append(stream)
                self._wake()
        for stream in reversed(skipped):  # keep their place at the front of the line
            self._queued.add(stream)
            self._ready.appendleft(stream)
        return jobs

    async def take(self, max_batch: int, batch_wait_s: float) -> list[Job]:
        """Up to max_batch frames from distinct streams; empty only when the scheduler closes."""
        taken: set[Stream] = set()
        jobs: list[Job] = []
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while not self._closed:
            jobs += self._take_now(max_batch - len(jobs), taken)
            if len(jobs) >= max_batch or (jobs and batch_wait_s <= 0):
                break
            if jobs and deadline is None:
                deadline = loop.time() + batch_wait_s
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                break
            finally:
                if not fut.done():
                    fut.cancel()
        return jobs
