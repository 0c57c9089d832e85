"""The pipeline: stream registry and admission, byte budget, drop policy, and routing of results.

Ingest adapters call `submit(sink, frame, options)`; every submitted frame then ends in exactly
one result or one drop, routed to its stream's sink (then `sink.frame_done()`), to the /ws hub and
to the counters. Workers and the scheduler hand their verdicts back on the `Reports` queue, which
`run()` drains; nothing below the pipeline calls up into it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.analytics import Event, LineConfig, StreamAnalytics, StreamCounts, ZoneConfig
from vision_daemon.config import Config
from vision_daemon.log import RateLimiter, log_limited, peer_host
from vision_daemon.metrics import Metrics
from vision_daemon.options import defaults_of
from vision_daemon.outputs import EventOutput, Hub, LatestFrames
from vision_daemon.rates import HEADROOM, Advisor, ServiceTime, fair_shares
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import Counts
from vision_daemon.streams import (
    Analysis,
    Job,
    Outcome,
    QueueBudget,
    Report,
    Reports,
    Sink,
    Stream,
)

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
        self.metrics = metrics
        self.clock = clock
        self.streams: dict[str, Stream] = {}
        self.defaults = defaults_of(config)  # what unset stream options resolve to
        self._owned: dict[Sink, dict[str, Stream]] = {}
        self.budget = QueueBudget(config.max_queued_mb * 2**20)
        self.totals = Counts(config.stats_window_s)
        self.errors: Counter[str] = Counter()  # protocol errors by code
        self.streams_evicted = 0  # detached streams removed early to make room for new ones
        self.last_latency_ms: float | None = None
        self._log_limit = RateLimiter()
        self.service = ServiceTime()  # what a frame costs a worker: the capacity estimate
        self.advisor = Advisor()
        self.outputs = list(outputs)
        # Lines and zones set through the API (PUT /streams/{name}/analytics), by stream: they
        # replace the config's for that stream, for as long as the daemon runs.
        self.geometry: dict[str, tuple[tuple[LineConfig, ...], tuple[ZoneConfig, ...]]] = {}
        self.events_total: Counter[str] = Counter()  # by type, every stream

    # ---- admission ----------------------------------------------------------------------------
    def count_error(self, code: str) -> None:
        self.errors[code] += 1
        self.metrics.errors.labels(code).inc()
        if code == p.E_UNAUTHORIZED:
            self.metrics.auth_failures.labels("tcp").inc()

    def refuse_message(self, exc: p.ProtocolError) -> None:
        """A refused message is counted; if it was meant as a frame, also as a dropped frame."""
        self.count_error(exc.code)
        if exc.frame_id is not None or exc.code in (p.E_INVALID, p.E_BAD_STREAM_NAME):
            self.totals.on_received(self.clock())
            self.totals.on_dropped("invalid")
            self.metrics.on_dropped(None, "invalid")

    def _stream_for(self, sink: Sink, name: str, options: p.StreamOptions) -> Stream | str:
        owned = self._owned.setdefault(sink, {})
        stream = owned.get(name)
        if stream is not None:
            return stream
        cfg = self.config
        existing = self.streams.get(name)
        if existing is not None and existing.detached_at is None:
            return f"stream {name!r} is in use by another connection ({existing.peer})"
        if len(owned) >= cfg.max_streams_per_connection:
            return f"max_streams_per_connection={cfg.max_streams_per_connection} reached"
        if existing is None and len(self.streams) >= cfg.max_streams and not self._evict_one():
            return f"max_streams={cfg.max_streams} reached"
        if existing is not None:  # a camera reconnecting: counters carry on
            existing.sink, existing.detached_at = sink, None
            existing.set_options(options)
            stream = existing
            self._set_analysis(stream)
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
            self.streams[name] = stream
            self._set_analysis(stream)
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

    # ---- analytics (issue 18) -----------------------------------------------------------------
    def _set_analysis(self, stream: Stream) -> None:
        """Give a stream its tracker, lines and zones, or take them away, as its options, the
        config and the API say: a stream with lines or zones is always tracked; otherwise its
        `track` option, else the daemon's `track`. A stream that keeps tracking keeps its
        tracks and counts (a camera reconnecting)."""
        lines, zones = self.geometry_of(stream.name)
        track = stream.options.track
        wanted = bool(lines or zones) or (self.config.track if track is None else track)
        if not wanted:
            self._end_analysis(stream)
            return
        if stream.analysis is None:
            stream.analysis = Analysis(
                StreamAnalytics(stream.name, self.config.analytics.tracking, lines, zones),
                snapshot_max_bytes=(
                    self.config.event_snapshot_max_kb * 1024 if self.config.event_snapshots else 0
                ),
            )

    def set_geometry(
        self, name: str, lines: tuple[LineConfig, ...], zones: tuple[ZoneConfig, ...]
    ) -> None:
        """An operator's lines and zones for stream `name` (PUT /streams/{name}/analytics); they
        replace the config's. A live stream starts them afresh: its tracks end and its counts
        start from zero. Raises ConfigError past the per-stream limits."""
        StreamAnalytics(name, self.config.analytics.tracking, lines, zones)  # checks the limits
        self.geometry[name] = (lines, zones)
        stream = self.streams.get(name)
        if stream is not None:
            self._end_analysis(stream)
            self._set_analysis(stream)
        log.info(
            "stream %s: %d lines and %d zones set by an operator", name, len(lines), len(zones)
        )

    def _end_analysis(self, stream: Stream) -> None:
        """The stream's analytics stop (it goes, or is no longer tracked, or gets new lines and
        zones): its live tracks end, and their zone exits are events."""
        if stream.analysis is not None:
            self._publish(stream, *stream.analysis.reset())
            stream.analysis = None

    def geometry_of(self, name: str) -> tuple[tuple[LineConfig, ...], tuple[ZoneConfig, ...]]:
        cfg = self.config.analytics
        return self.geometry.get(name, (cfg.lines_of(name), cfg.zones_of(name)))

    def _publish(
        self,
        stream: Stream,
        events: Sequence[Event],
        counts: StreamCounts | None,
        frame_id: int | None = None,
        snapshot: bytes | None = None,
    ) -> None:
        """A stream's events to /ws subscribers that asked for events and to every output; its
        counts (when they changed) to the outputs. Times become Unix seconds here."""
        now = self.clock()
        wall = time.time() - now  # a monotonic time t happened at wall + t
        picture = base64.b64encode(snapshot).decode() if snapshot else None
        for event in events:
            data = event.to_dict()
            data["time"] = round(wall + event.time, 3)
            if frame_id is not None:
                data["frame_id"] = frame_id
            if picture is not None:
                data["snapshot"] = picture
            if stream.analysis is not None:
                stream.analysis.events[event.type] += 1
            self.events_total[event.type] += 1
            if self.hub.subscribers:
                self.hub.publish(stream.name, json.dumps({"type": "event", **data}), now, "event")
            for output in self.outputs:
                output.offer_event(data)
        if counts is not None:
            for output in self.outputs:
                output.offer_counts(stream.name, dict(counts))

    def tick_analytics(self) -> None:
        """Streams with no frame for longer than the track timeout: their tracks end now, not at
        their next frame (exits and zone occupancy stay true while a camera is silent)."""
        now = self.clock()
        timeout = self.config.analytics.tracking.timeout_s
        for stream in self.streams.values():
            a = stream.analysis
            if a is None or a.last_at is None or stream.in_flight or stream.queue:
                continue
            if now - a.last_at > timeout:
                self._publish(stream, *a.tick(now))

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
        self._end_analysis(stream)
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
            self.totals.on_received(now)
            self.count_error(p.E_LIMIT)
            sink.error(p.E_LIMIT, f"stream refused: {stream}", frame.frame_id)
            self._count_drop(None, "refused")
            sink.dropped(frame.stream_name, frame.frame_id, "refused")
            sink.frame_done()
            return
        self.totals.on_received(now)
        self.metrics.on_received(stream.metric_label)
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
            self._set_analysis(stream)
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
                self.totals.on_received(now)
                if isinstance(stream, str):
                    self._count_drop(None, "refused")
                    continue
                stream.admit(now, gated=True)
                self.metrics.on_received(stream.metric_label)
                self._count_drop(stream, reason)

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
    def _count_drop(self, stream: Stream | None, reason: str) -> None:
        self.totals.on_dropped(reason)
        if stream is not None:
            stream.counts.on_dropped(reason)
        self.metrics.on_dropped(stream.metric_label if stream else None, reason)

    def drop(self, job: Job, reason: str) -> None:
        self._count_drop(job.stream, reason)
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
        self.service.observe(timings.get("decode_ms", 0.0) + timings.get("infer_ms", 0.0))
        timings["queue_ms"] = (job.taken_at - job.received_at) * 1000
        timings["total_ms"] = (now - job.received_at) * 1000
        self.last_latency_ms = timings["total_ms"]
        job.stream.counts.on_processed(now, timings)
        self.totals.on_processed(now, timings)
        self.metrics.on_processed(job.stream.metric_label, timings)
        if outcome.reused:
            job.stream.counts.unchanged += 1
            self.totals.unchanged += 1
            self.metrics.unchanged.labels(job.stream.metric_label).inc()
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
                job.stream.counts.results_dropped += 1
                self.totals.results_dropped += 1
                self.metrics.results_dropped.inc()
            if self.hub.subscribers:  # encoded once for every subscriber
                self.hub.publish(frame.stream_name, json.dumps(msg, allow_nan=False), now)
            self.frames.keep(frame, now)  # after /ws: its boxes are out before it can be fetched
            if outcome.events or outcome.counts is not None:
                self._publish(
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
                self._count_drop(job.stream, "internal_error")
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
        """Tell streams whose fair share of the estimated capacity changed (vision_daemon/rates).

        A stream's demand is the `source_fps` its client declared, else (a client that follows
        advice without saying its rate) as much as it can get, else (one that does not follow
        advice) the rate it sends at; `max_fps` caps each.
        """
        now = self.clock()
        capacity = self.service.capacity_fps(self.config.workers)
        for name, fps in self.advisor.advise(now, capacity, self._demands(now)).items():
            stream = self.streams[name]
            stream.advised_fps = fps
            if stream.sink is not None:
                try:
                    stream.sink.advise(name, fps)
                except Exception:  # a sink failing must not stop the others' advice
                    log.exception("advising stream %s failed", name)

    def newcomer_fps(self) -> float | None:
        """The rate a new stream asking for all it can get would be advised now (the welcome
        carries it to clients that follow advice); None before the first frame is measured."""
        capacity = self.service.capacity_fps(self.config.workers)
        if capacity is None:
            return None
        demands = self._demands(self.clock())
        newcomer = "new"
        while newcomer in demands:
            newcomer += "+"
        return round(fair_shares(capacity * HEADROOM, {**demands, newcomer: 0.0})[newcomer], 2)

    def _demands(self, now: float) -> dict[str, float]:
        demands: dict[str, float] = {}
        for s in self.streams.values():
            if s.detached_at is not None or s.sink is None:
                continue
            if s.options.source_fps > 0:
                demand = s.options.source_fps
            elif s.sink.rate_advice:
                demand = 0.0  # unknown: all it can get
            else:
                demand = s.counts.recv_window.rate(now)
            if s.options.max_fps > 0:
                demand = min(demand, s.options.max_fps) if demand else s.options.max_fps
            demands[s.name] = demand
        return demands

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
