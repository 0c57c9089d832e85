"""One stream's analytics: its own tracker, zones and lines; detections in, track IDs and events
out. Pure: no I/O, no threads, no clock (each frame brings its timestamp)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from vision_daemon.analytics.counting import Event, LineCounter, ZoneCounter, ZoneCounts
from vision_daemon.analytics.settings import (
    AnalyticsConfig,
    LineConfig,
    TrackingConfig,
    ZoneConfig,
    check_per_stream,
)
from vision_daemon.analytics.tracking import StreamTracker, Track


class StreamCounts(TypedDict):
    stream: str
    time: float | None  # timestamp of the last frame seen
    tracks: int  # live tracks
    zones: dict[str, ZoneCounts]
    lines: dict[str, dict[str, dict[str, int]]]  # line -> "in"/"out" -> label -> crossings


class StreamAnalytics:
    """Tracking, zones and lines for one stream. Not thread-safe: feed one stream's frames from
    one place, in time order."""

    def __init__(
        self,
        stream: str,
        tracking: TrackingConfig | None = None,
        lines: Sequence[LineConfig] = (),
        zones: Sequence[ZoneConfig] = (),
    ) -> None:
        check_per_stream(lines, zones)
        self.stream = stream
        self.tracking = tracking or TrackingConfig()
        self.tracker = StreamTracker(self.tracking)
        self._lines = [LineCounter(stream, c) for c in lines]
        self._zones = [ZoneCounter(stream, c) for c in zones]
        self._watch = frozenset(self.tracking.new_object_classes)
        self._announced: set[int] = set()
        self._now: float | None = None

    @classmethod
    def from_config(cls, config: AnalyticsConfig, stream: str) -> StreamAnalytics:
        """The stream's analytics with its lines and zones from the config."""
        return cls(stream, config.tracking, config.lines_of(stream), config.zones_of(stream))

    def update(
        self, detections: Sequence[Mapping[str, Any]], timestamp: float
    ) -> tuple[list[dict[str, object]], list[Event]]:
        """One frame: copies of its detections, each with `track_id` (an int, or None while a
        new object is not yet confirmed), and the events it caused, in this order: new_object;
        then per track seen, its zones' enter/exit and its lines' cross; loiter; then the exits
        of tracks that timed out."""
        step = self.tracker.update(detections, timestamp)
        t = self._now = step.time
        tracked = [
            {**d, "track_id": tid} for d, tid in zip(detections, step.track_ids, strict=True)
        ]
        events: list[Event] = []
        if self._watch:
            for track in step.seen:
                if track.track_id not in self._announced and track.label in self._watch:
                    self._announced.add(track.track_id)
                    events.append(self._new_object(track, t))
        for track in step.seen:
            for zone in self._zones:
                events += zone.observe(track, t)
            for line in self._lines:
                events += line.observe(track, t)
        for zone in self._zones:
            events += zone.tick(t)
        events += self._end(step.ended, t)
        return tracked, events

    def reset(self) -> list[Event]:
        """End every track (the stream stopped): their exit events. Counts are kept."""
        return self._end(self.tracker.reset(), self._now or 0.0)

    def counts(self) -> StreamCounts:
        """Live tracks, each zone's occupancy, enter/exit counts and dwell times, and each
        line's crossings by direction and label (counts since start)."""
        t = self._now or 0.0
        return {
            "stream": self.stream,
            "time": self._now,
            "tracks": len(self.tracker.tracks),
            "zones": {z.name: z.counts(t) for z in self._zones},
            "lines": {line.name: line.counts() for line in self._lines},
        }

    def _end(self, ended: list[Track], t: float) -> list[Event]:
        events: list[Event] = []
        for track in ended:
            self._announced.discard(track.track_id)
            for zone in self._zones:
                events += zone.end(track, t)
            for line in self._lines:
                line.end(track)
        return events

    def _new_object(self, track: Track, t: float) -> Event:
        b = track.box
        return Event(
            "new_object", self.stream, t, track.track_id, track.label, (b[0], b[1], b[2], b[3])
        )
