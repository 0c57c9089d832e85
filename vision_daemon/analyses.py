"""Which streams are tracked, with which lines and zones, and where their events go.

A stream with lines or zones (from the config, or an operator's PUT) is always tracked;
otherwise its `track` option decides, else the daemon's `track`. Events go to /ws subscribers
that asked for them and to every event output, with Unix times; counts (when they changed) go
to the outputs.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from vision_daemon.analytics import Event, LineConfig, StreamAnalytics, StreamCounts, ZoneConfig
from vision_daemon.config import Config
from vision_daemon.outputs import EventOutput, Hub
from vision_daemon.streams import Analysis, Stream

log = logging.getLogger(__name__)

Geometry = tuple[tuple[LineConfig, ...], tuple[ZoneConfig, ...]]


class Analyses:
    """The streams' analytics set-up, the operator's lines and zones, and event publishing."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        outputs: Iterable[EventOutput],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.hub = hub
        self.outputs = list(outputs)
        self.clock = clock
        # Lines and zones set through the API (PUT /streams/{name}/analytics), by stream: they
        # replace the config's for that stream, for as long as the daemon runs.
        self.geometry: dict[str, Geometry] = {}
        self.events_total: Counter[str] = Counter()  # by type, every stream

    def geometry_of(self, name: str) -> Geometry:
        cfg = self.config.analytics
        return self.geometry.get(name, (cfg.lines_of(name), cfg.zones_of(name)))

    def set_up(self, stream: Stream) -> None:
        """Give a stream its tracker, lines and zones, or take them away, as its options, the
        config and the API say. A stream that keeps tracking keeps its tracks and counts (a
        camera reconnecting)."""
        lines, zones = self.geometry_of(stream.name)
        track = stream.options.track
        wanted = bool(lines or zones) or (self.config.track if track is None else track)
        if not wanted:
            self.end(stream)
            return
        if stream.analysis is None:
            stream.analysis = Analysis(
                StreamAnalytics(stream.name, self.config.analytics.tracking, lines, zones),
                snapshot_max_bytes=(
                    self.config.event_snapshot_max_kb * 1024 if self.config.event_snapshots else 0
                ),
            )

    def set_geometry(
        self,
        name: str,
        lines: tuple[LineConfig, ...],
        zones: tuple[ZoneConfig, ...],
        live: Stream | None,
    ) -> None:
        """An operator's lines and zones for stream `name`; they replace the config's. A live
        stream starts them afresh: its tracks end and its counts start from zero. Raises
        ConfigError past the per-stream limits."""
        StreamAnalytics(name, self.config.analytics.tracking, lines, zones)  # checks the limits
        self.geometry[name] = (lines, zones)
        if live is not None:
            self.end(live)
            self.set_up(live)
        log.info(
            "stream %s: %d lines and %d zones set by an operator", name, len(lines), len(zones)
        )

    def end(self, stream: Stream) -> None:
        """The stream's analytics stop (it goes, or is no longer tracked, or gets new lines and
        zones): its live tracks end, and their zone exits are events."""
        if stream.analysis is not None:
            self.publish(stream, *stream.analysis.reset())
            stream.analysis = None

    def publish(
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
                output.offer_counts(stream.name, counts.copy())

    def tick(self, streams: Iterable[Stream]) -> None:
        """Streams with no frame for longer than the track timeout: their tracks end now, not at
        their next frame (exits and zone occupancy stay true while a camera is silent)."""
        now = self.clock()
        timeout = self.config.analytics.tracking.timeout_s
        for stream in streams:
            a = stream.analysis
            if a is None or a.last_at is None or stream.in_flight or stream.queue:
                continue
            if now - a.last_at > timeout:
                self.publish(stream, *a.tick(now))
