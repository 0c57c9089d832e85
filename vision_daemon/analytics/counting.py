"""Zones and lines as pure policies over tracks: occupancy, enter/exit, dwell and loiter per zone,
crossings by direction per line, each change an Event. Time comes in as an argument.

Hysteresis: a track's side of a line (or in/out of a zone) changes only once its anchor point is
at least `min_distance_px` past the line (or the zone's edge); in between it keeps the last
confirmed state. So a box jittering on a line counts once, when it really gets across, and a
track that goes and comes back counts again. A crossing also has to pass through the drawn
segment: walking round its end changes the side without counting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypedDict, cast

from vision_daemon.analytics.geometry import Line, Point, Polygon, anchor_point
from vision_daemon.analytics.settings import LineConfig, ZoneConfig
from vision_daemon.analytics.tracking import Track

EventType = Literal["enter", "exit", "cross", "loiter", "new_object"]
EVENT_TYPES: tuple[str, ...] = ("enter", "exit", "cross", "loiter", "new_object")


class EventData(TypedDict, total=False):
    """An event as the outputs send it: `Event.to_dict()`, then its Unix time, and the frame id
    and snapshot (base64 JPEG) when it has them."""

    type: str
    stream: str
    time: float
    track_id: int
    label: str
    box: tuple[float, float, float, float]
    zone: str
    line: str
    direction: str
    dwell_s: float
    frame_id: int
    snapshot: str


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a track: the JSON an MQTT or webhook output will send."""

    type: EventType
    stream: str
    time: float  # the timestamp of the frame it was seen in (seconds, the frames' clock)
    track_id: int
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the track's latest detection
    zone: str | None = None  # enter, exit, loiter
    line: str | None = None  # cross
    direction: str | None = None  # cross: "in" (to the line's left) or "out"
    dwell_s: float | None = None  # exit, loiter: time since it entered

    def to_dict(self) -> EventData:
        """The event as JSON-ready values; fields that do not apply are left out."""
        return cast(EventData, {k: v for k, v in asdict(self).items() if v is not None})


def _event(kind: EventType, stream: str, t: float, track: Track, **more: Any) -> Event:
    b = track.box
    return Event(kind, stream, t, track.track_id, track.label, (b[0], b[1], b[2], b[3]), **more)


class ZoneCounts(TypedDict):
    occupancy: dict[str, int]  # tracks inside now, by label
    entered: dict[str, int]
    exited: dict[str, int]
    dwell_s: dict[int, float]  # track ID -> seconds inside, for the tracks inside now


class ZoneCounter:
    """One zone of one stream."""

    def __init__(self, stream: str, config: ZoneConfig) -> None:
        self.stream = stream
        self.config = config
        self.name = config.name
        self._polygon = Polygon(config.polygon)
        self._classes = frozenset(config.classes)
        self._margin = config.min_distance_px
        self._inside: dict[int, tuple[float, Track]] = {}  # track ID -> (entered at, track)
        self._outside: set[int] = set()
        self._loitered: set[int] = set()  # once per track per zone
        self.entered: Counter[str] = Counter()
        self.exited: Counter[str] = Counter()

    def observe(self, track: Track, t: float) -> list[Event]:
        """A track seen at time t: an enter or exit event if it went in or out."""
        tid = track.track_id
        inside = tid in self._inside
        if not inside and self._classes and track.label not in self._classes:
            return []
        state = self._state(anchor_point(track.box, self.config.anchor))
        if state is None or state == inside:
            if state is False:
                self._outside.add(tid)
            return []
        if state:
            self._inside[tid] = (t, track)
            self._outside.discard(tid)
            self.entered[track.label] += 1
            return [_event("enter", self.stream, t, track, zone=self.name)]
        entered_at, _ = self._inside.pop(tid)
        self._outside.add(tid)
        self.exited[track.label] += 1
        return [_event("exit", self.stream, t, track, zone=self.name, dwell_s=t - entered_at)]

    def tick(self, t: float) -> list[Event]:
        """Loiter events for tracks inside for loiter_s or more (seen or not in this frame)."""
        limit = self.config.loiter_s
        if limit <= 0:
            return []
        events = []
        for tid, (entered_at, track) in self._inside.items():
            if t - entered_at >= limit and tid not in self._loitered:
                self._loitered.add(tid)
                events.append(
                    _event("loiter", self.stream, t, track, zone=self.name, dwell_s=t - entered_at)
                )
        return events

    def end(self, track: Track, t: float) -> list[Event]:
        """A track ended: it exits if it was inside (dwell up to when it was last seen)."""
        tid = track.track_id
        self._outside.discard(tid)
        self._loitered.discard(tid)
        if tid not in self._inside:
            return []
        entered_at, _ = self._inside.pop(tid)
        self.exited[track.label] += 1
        dwell = max(0.0, track.last_seen - entered_at)
        return [_event("exit", self.stream, t, track, zone=self.name, dwell_s=dwell)]

    def counts(self, t: float) -> ZoneCounts:
        occupancy: Counter[str] = Counter(track.label for _, track in self._inside.values())
        return {
            "occupancy": dict(occupancy),
            "entered": dict(self.entered),
            "exited": dict(self.exited),
            "dwell_s": {tid: max(0.0, t - at) for tid, (at, _) in self._inside.items()},
        }

    def _state(self, p: Point) -> bool | None:
        """True inside, False outside, None within min_distance_px of the edge (no change)."""
        if self._margin > 0:
            d = self._polygon.depth(p)
            return True if d >= self._margin else False if d <= -self._margin else None
        d = self._polygon.contains(p)
        return True if d > 0 else False if d < 0 else None


class LineCounter:
    """One counting line of one stream."""

    def __init__(self, stream: str, config: LineConfig) -> None:
        self.stream = stream
        self.config = config
        self.name = config.name
        self._line = Line(*config.points)
        self._classes = frozenset(config.classes)
        self._margin = config.min_distance_px
        self._sides: dict[int, tuple[int, Point]] = {}  # track ID -> (side, anchor there)
        self.crossed: dict[str, Counter[str]] = {"in": Counter(), "out": Counter()}

    def observe(self, track: Track, t: float) -> list[Event]:
        """A track seen at time t: a cross event if it got across since its last confirmed side."""
        if self._classes and track.label not in self._classes:
            return []
        p = anchor_point(track.box, self.config.anchor)
        d = self._line.side(p)
        if d == 0 or abs(d) < self._margin:
            return []  # within the hysteresis band: keep the last confirmed side
        side = 1 if d > 0 else -1
        tid = track.track_id
        last = self._sides.get(tid)
        self._sides[tid] = (side, p)
        if last is None or last[0] == side or not self._line.crosses_segment(last[1], p):
            return []
        direction = "in" if side > 0 else "out"
        self.crossed[direction][track.label] += 1
        return [_event("cross", self.stream, t, track, line=self.name, direction=direction)]

    def end(self, track: Track) -> None:
        self._sides.pop(track.track_id, None)

    def counts(self) -> dict[str, dict[str, int]]:
        """Crossings by direction ("in", "out"), then by label."""
        return {direction: dict(c) for direction, c in self.crossed.items()}
