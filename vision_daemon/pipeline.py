"""The pipeline: a thin facade over the stream registry and admission, the byte budget and drop
policy, and the routing of results; what it delegates lives in its own module: the frame
accounting in ledger.py, tracking, lines, zones and events in analyses.py, rate advice in
advice.py.

Ingest adapters call `submit(sink, frame, options)`; every submitted frame then ends in exactly
one result or one drop, routed to its stream's sink (then `sink.frame_done()`), to the /ws hub and
to the ledger. Workers and the scheduler hand their verdicts back on the `Reports` queue, which
`run()` drains; nothing below the pipeline calls up into it.

Longer than most modules (about 400 lines) because the facade's 30 short methods are the one
door the ingests, the workers and the Control facade use; no method is longer than 45 lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.advice import Advice
from vision_daemon.analyses import Analyses, Geometry
from vision_daemon.analytics import LineConfig, ZoneConfig
from vision_daemon.config import Config
from vision_daemon.ledger import Ledger
from vision_daemon.log import RateLimiter, log_limited, peer_host
from vision_daemon.masks import Mask, MaskBook
from vision_daemon.metrics import Metrics
from vision_daemon.options import defaults_of
from vision_daemon.outputs import EventOutput, Hub, LatestFrames
from vision_daemon.rates import ServiceTime
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import Counts
from vision_daemon.streams import Job, Outcome, QueueBudget, Report, Reports, Sink, Stream

log = logging.getLogger(__name__)

ERROR_DROP_REASON = {
    p.E_DETECTOR: "detector_error",
    p.E_BACKEND: "backend_error",
    p.E_DECODE: "decode_error",
}


class Pipeline:
    def __init__(
        self,
        config: Config,
        reports: Reports,
        scheduler: Scheduler,
        hub: Hub,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        frames: LatestFrames | None = None,
        outputs: Sequence[EventOutput] = (),
    ) -> None:
        self.config = config
        self.reports = reports
        self.scheduler = scheduler
        self.hub = hub
        self.frames = frames if frames is not None else LatestFrames()
        self.masks = MaskBook(
            dict(config.masks)
        )  # privacy masks by stream (vision_daemon/masks.py)
        self.frames.masks = self.masks
        self.metrics = metrics
        self.clock = clock
        self.streams: dict[str, Stream] = {}  # the one registry of streams
        self.defaults = defaults_of(config)  # what unset stream options resolve to
        self._owned: dict[Sink, dict[str, Stream]] = {}
        self.budget = QueueBudget(config.max_queued_mb * 2**20)
        self.ledger = Ledger(metrics, config.stats_window_s)
        self.analyses = Analyses(config, hub, outputs, clock)
        self.rates = Advice(config.workers)
        self.streams_evicted = 0  # detached streams removed early to make room for new ones
        self._log_limit = RateLimiter()

    # ---- what the snapshot and the API read ---------------------------------------------------
    @property
    def totals(self) -> Counts:
        return self.ledger.totals

    @property
    def errors(self) -> Mapping[str, int]:
        return self.ledger.errors

    @property
    def last_latency_ms(self) -> float | None:
        return self.ledger.last_latency_ms

    @property
    def events_total(self) -> Mapping[str, int]:
        return self.analyses.events_total

    @property
    def geometry(self) -> Mapping[str, Geometry]:
        return self.analyses.geometry

    @property
    def service(self) -> ServiceTime:
        return self.rates.service

    def geometry_of(self, name: str) -> Geometry:
        return self.analyses.geometry_of(name)

    # ---- admission ----------------------------------------------------------------------------
    def count_error(self, code: str) -> None:
        self.ledger.error(code)

    def refuse_message(self, exc: p.ProtocolError) -> None:
        """A refused message is counted; if it was meant as a frame, also as a dropped frame."""
        self.ledger.error(exc.code)
        if exc.frame_id is not None or exc.code in (p.E_INVALID, p.E_BAD_STREAM_NAME):
            self.ledger.received(None, self.clock())
            self.ledger.dropped(None, "invalid")

    def _stream_for(self, sink: Sink, name: str, options: p.StreamOptions) -> Stream | str:
        owned = self._owned.setdefault(sink, {})
        stream = owned.get(name)
        if stream is not None:
            return stream
        cfg = self.config
        existing = self.streams.get(name)
        if existing is not None and existing.detached_at is None:
            return f"stream {name!r} is in use by another connection"  # never says whose
        if len(owned) >= cfg.max_streams_per_connection:
            return f"max_streams_per_connection={cfg.max_streams_per_connection} reached"
        if existing is None and len(self.streams) >= cfg.max_streams and not self._evict_one():
            return f"max_streams={cfg.max_streams} reached"
        if existing is not None:  # a camera reconnecting: counters carry on
            existing.sink, existing.detached_at = sink, None
            existing.set_options(options)
            stream = existing
            self.analyses.set_up(stream)
        else:
            stream = Stream(
                name,
                options,
                cfg.queue_depth,
                cfg.stats_window_s,
                self.budget,
                sink,
                motion_refresh_s=cfg.motion_refresh_s,
                defaults=self.defaults,
            )
            stream.metric_label = self.metrics.label_for(name)
            stream.masks = self.masks.get(name)
            self.streams[name] = stream
            self.analyses.set_up(stream)
            log_limited(
                log,
                self._log_limit,
                peer_host(sink.peer),
                self.clock(),
                logging.INFO,
                "stream %s opened by %s (%s)",
                name,
                sink.peer,
                options,
            )
        owned[name] = stream
        return stream

    def set_geometry(
        self, name: str, lines: tuple[LineConfig, ...], zones: tuple[ZoneConfig, ...]
    ) -> None:
        """An operator's lines and zones for stream `name` (PUT /streams/{name}/analytics)."""
        self.analyses.set_geometry(name, lines, zones, self.streams.get(name))

    def tick_analytics(self) -> None:
        self.analyses.tick(self.streams.values())

    def _evict_one(self) -> bool:
        """Make room for a new stream: the detached stream that left first goes (counted)."""
        idle = [
            s
            for s in self.streams.values()
            if s.detached_at is not None and s.in_flight == 0 and not s.queue
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.detached_at or 0.0)
        self._remove(oldest)
        self.streams_evicted += 1
        return True

    def _remove(self, stream: Stream) -> None:
        self.analyses.end(stream)
        del self.streams[stream.name]
        self.metrics.release(stream.metric_label)
        self.frames.forget(stream.name)

    def submit(
        self,
        sink: Sink,
        frame: p.Frame,
        options: p.StreamOptions,
        captured_at: float | None = None,
        gated: bool = False,
    ) -> None:
        """Take one frame from an ingest; it ends later in exactly one result or drop.

        A camera passes the monotonic time it captured the frame (latency and staleness then
        count from capture) and `gated=True`: its reader applied the options already.
        """
        now = self.clock()
        stream = self._stream_for(sink, frame.stream_name, options)
        if isinstance(stream, str):
            self.ledger.received(None, now)
            self.ledger.error(p.E_LIMIT)
            sink.error(p.E_LIMIT, f"stream refused: {stream}", frame.frame_id)
            self.ledger.dropped(None, "refused")
            sink.dropped(frame.stream_name, frame.frame_id, "refused")
            sink.frame_done()
            return
        self.ledger.received(stream, now)
        job = Job(frame, stream, sink, now if captured_at is None else min(captured_at, now))
        reason = stream.admit(now, gated)
        if reason is not None:
            self.drop(job, reason)
            return
        evicted = stream.push(job)
        if evicted is not None:
            self.drop(evicted, "queue_full")
        while self.budget.over():
            # Past max_queued_mb the stream holding the most queued bytes loses its oldest frame:
            # a peer sending huge frames pays for them, cameras with normal frames do not.
            hog = max(self.streams.values(), key=lambda s: s.queued_bytes)
            self.drop(hog.pop(), "memory_limit")
        self.scheduler.notify(stream)

    def attach(self, sink: Sink, name: str, options: p.StreamOptions) -> str | None:
        """Reserve stream `name` for `sink` before its first frame (a pulled camera); the reason
        it is refused, or None."""
        stream = self._stream_for(sink, name, options)
        return stream if isinstance(stream, str) else None

    def set_masks(self, name: str, masks: tuple[Mask, ...]) -> None:
        """A stream's privacy masks (PUT /streams/{name}/masks): from its next frame on, in
        what workers see and in every JPEG served or stored."""
        self.masks.set(name, masks)
        stream = self.streams.get(name)
        if stream is not None:
            stream.masks = masks

    def retune(self, name: str, overrides: Mapping[str, Any]) -> p.StreamOptions | None:
        """An operator's options for a stream (PATCH /streams/{name}, checked by
        options.parse_overrides): they win over what its client says, for as long as the stream
        lives. None: no such stream."""
        stream = self.streams.get(name)
        if stream is None:
            return None
        stream.overrides.update(overrides)
        stream.set_options(stream.given)
        if "track" in overrides:
            self.analyses.set_up(stream)
        log.info("stream %s retuned by an operator: %s", name, stream.overrides)
        return stream.options

    def count_gated(
        self, sink: Sink, name: str, options: p.StreamOptions, reasons: dict[str, int]
    ) -> None:
        """Frames an ingest read and did not hand on (a camera's skip_frames, max_fps, or a newer
        frame replacing one): received and dropped with their reason, as if submitted."""
        now = self.clock()
        stream = self._stream_for(sink, name, options)
        for reason, n in reasons.items():
            for _ in range(n):
                if isinstance(stream, str):
                    self.ledger.received(None, now)
                    self.ledger.dropped(None, "refused")
                    continue
                self.ledger.received(stream, now)
                stream.admit(now, gated=True)
                self.ledger.dropped(stream, reason)

    def detach(self, sink: Sink, reason: str = "disconnected") -> None:
        """The sink closed: its queued frames drop (as disconnected, or the reason given);
        its streams stay for a grace."""
        now = self.clock()
        for stream in self._owned.pop(sink, {}).values():
            while stream.queue:
                self.drop(stream.pop(), reason)
            stream.detached_at = now

    def drop_queued(self, reason: str) -> None:
        for stream in self.streams.values():
            while stream.queue:
                self.drop(stream.pop(), reason)

    # ---- routing ------------------------------------------------------------------------------
    def drop(self, job: Job, reason: str) -> None:
        self.ledger.dropped(job.stream, reason)
        try:
            job.sink.dropped(job.stream.name, job.frame.frame_id, reason)
        finally:
            job.ended = True
            job.sink.frame_done()

    def complete(self, job: Job, outcome: Outcome) -> None:
        frame = job.frame
        if outcome.error is not None:
            self.count_error(outcome.error)
            job.sink.error(outcome.error, outcome.message, frame.frame_id)
            self.drop(job, ERROR_DROP_REASON.get(outcome.error, "invalid"))
            return
        now = self.clock()
        timings = dict(outcome.timings)
        self.rates.service.observe(timings.get("decode_ms", 0.0) + timings.get("infer_ms", 0.0))
        timings["queue_ms"] = (job.taken_at - job.received_at) * 1000
        timings["total_ms"] = (now - job.received_at) * 1000
        self.ledger.processed(job.stream, now, timings, outcome.reused)
        msg = {
            "type": "result",
            "stream_name": frame.stream_name,
            "frame_id": frame.frame_id,
            "detections": outcome.detections or [],
            "latency_ms": round(timings["total_ms"], 3),
            "timestamp": frame.timestamp,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        if outcome.reused:  # the detections of the stream's last analysed frame (motion gating)
            msg["reused"] = True
        try:
            if not job.sink.result(p.pack(msg), frame):
                self.ledger.result_lost(job.stream)
            if self.hub.subscribers:  # encoded once for every subscriber
                self.hub.publish(frame.stream_name, json.dumps(msg, allow_nan=False), now)
            self.frames.keep(frame, now)  # after /ws: its boxes are out before it can be fetched
            if outcome.events or outcome.counts is not None:
                self.analyses.publish(
                    job.stream, outcome.events, outcome.counts, frame.frame_id, outcome.snapshot
                )
        finally:
            job.ended = True
            job.sink.frame_done()

    def _route(self, report: Report) -> None:
        job = report.job
        try:
            if report.outcome is not None:
                self.complete(job, report.outcome)
            else:
                self.drop(job, report.dropped or "internal_error")
        except Exception:  # a sink or an output failing must not stop routing for the others
            if not job.ended:  # it failed before the frame was counted: count it now
                job.ended = True
                self.ledger.dropped(job.stream, "internal_error")
                try:
                    job.sink.frame_done()
                except Exception:
                    pass
            log_limited(
                log,
                self._log_limit,
                "route",
                self.clock(),
                logging.ERROR,
                "routing a result of stream %s failed",
                job.stream.name,
                exc_info=True,
            )
        finally:
            if report.taken:
                self.scheduler.done(job)

    def drain(self) -> int:
        """Route every verdict waiting on the reports queue now; returns how many."""
        items = self.reports.take_all()
        for report in items:
            self._route(report)
        return len(items)

    def advise(self) -> None:
        """Tell streams whose fair share of the estimated capacity changed (advice.py)."""
        self.rates.advise(self.streams, self.clock())

    def newcomer_fps(self) -> float | None:
        """The rate a new stream asking for all it can get would be advised now."""
        return self.rates.newcomer_fps(self.streams, self.clock())

    def expire(self) -> None:
        """Streams whose sink closed leave after stream_grace_s."""
        now = self.clock()
        grace = self.config.stream_grace_s
        for s in list(self.streams.values()):
            if s.detached_at is not None and s.in_flight == 0 and now - s.detached_at >= grace:
                self._remove(s)

    async def run(self) -> None:
        """Route verdicts as they come; once a second, expire streams past their grace."""
        loop = asyncio.get_running_loop()
        next_expiry = self.clock() + 1.0
        while True:
            # A re-armed timer handle wakes the loop for expiry (no wait_for task per round).
            timer = loop.call_later(max(0.0, next_expiry - self.clock()), self.reports.wake)
            try:
                await self.reports.wait()
            finally:
                timer.cancel()
            self.drain()
            if self.clock() >= next_expiry:
                self.expire()
                self.tick_analytics()
                self.advise()
                next_expiry = self.clock() + max(0.05, min(1.0, self.config.stream_grace_s))

    def queued(self) -> int:
        return sum(len(s.queue) for s in self.streams.values())

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.streams.values())
