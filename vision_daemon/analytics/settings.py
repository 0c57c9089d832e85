"""Tracking, zones and lines as configured: frozen dataclasses and their parsing from TOML tables
(or JSON bodies), with every bound checked and every error a one-line ConfigError.

The TOML shape (issue 18)::

    [tracking]
    timeout_s = 2.0                  # a track not seen for this long ends
    new_object_classes = ["person"]  # labels that raise a new_object event (none by default)

    [[lines]]
    stream = "walk"
    name = "mid"
    points = [[0, 330], [768, 330]]  # pixels of the frames the stream sends
    anchor = "bottom_center"         # or "center": the point of a box that counts
    classes = ["person"]             # count only these labels ([] = all)
    min_distance_px = 4.0            # hysteresis: how far past the line the anchor must get

    [[zones]]
    stream = "walk"
    name = "door"
    polygon = [[100, 100], [300, 100], [300, 400], [100, 400]]
    loiter_s = 30.0                  # loiter event after this dwell (0 = off)

A line's directions: standing on `points[0]` and looking at `points[1]` on the screen (image y
grows downwards), a track that crosses to the left-hand side crosses "in", one that crosses to
the right-hand side crosses "out". For `[[0, 330], [768, 330]]` "in" is upwards (towards y = 0)
and "out" downwards; list the points the other way round to swap them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from vision_daemon.checks import NAME_RE, ConfigError, between

ANCHORS = ("bottom_center", "center")
MAX_ZONES_PER_STREAM = 16
MAX_LINES_PER_STREAM = 16
MAX_POLYGON_POINTS = 64
MAX_COORDINATE = 100_000.0  # pixels; a frame is far smaller, this only refuses nonsense
MAX_CLASSES = 100  # labels in one classes filter (COCO has 80)
MAX_LABEL_CHARS = 64
MAX_HYSTERESIS_PX = 1000.0
MAX_LOITER_S = 7 * 24 * 3600.0


Point = tuple[float, float]


@dataclass(frozen=True)
class TrackingConfig:
    """How each stream's tracker works: `[tracking]`."""

    timeout_s: float = 2.0  # a track not matched for this long ends (exits its zones)
    frame_interval_s: float = 0.0  # the stream's frame interval; 0 = estimate from timestamps
    high_thresh: float = 0.25  # detections at or above this score are matched first
    low_thresh: float = 0.1  # ... those between low and high only extend existing tracks
    new_thresh: float = 0.25  # score needed to start a track
    match_thresh: float = 0.8  # ByteTrack's association cost limit (1 - IoU, score-fused)
    new_object_classes: tuple[str, ...] = ()  # labels that raise new_object events

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (between(self.timeout_s, 0.01, 3600), "timeout_s must be 0.01..3600"),
            (
                self.frame_interval_s == 0 or between(self.frame_interval_s, 0.001, 60),
                "frame_interval_s must be 0 (estimate) or 0.001..60",
            ),
            (
                between(self.low_thresh, 0, 1)
                and between(self.high_thresh, self.low_thresh, 1)
                and between(self.new_thresh, 0, 1),
                "low_thresh, high_thresh and new_thresh must be 0..1 with low <= high",
            ),
            (between(self.match_thresh, 0.01, 1), "match_thresh must be 0.01..1"),
            (_labels_ok(self.new_object_classes), _LABELS_HELP.format("new_object_classes")),
        ]
        _first_failure(checks, "[tracking]")


@dataclass(frozen=True)
class LineConfig:
    """One counting line of one stream: `[[lines]]`."""

    stream: str
    name: str
    points: tuple[Point, Point]
    anchor: str = "bottom_center"
    classes: tuple[str, ...] = ()  # () = every label
    min_distance_px: float = 4.0

    def __post_init__(self) -> None:
        label = _label("line", self.stream, self.name)
        checks: list[tuple[bool, str]] = [
            *_name_checks(self.stream, self.name),
            (
                len(self.points) == 2 and _coordinates_ok(self.points),
                f"points must be 2 [x, y] pairs with |x|, |y| <= {MAX_COORDINATE:.0f}",
            ),
            (len(set(self.points)) == 2, "points must be two different points"),
            *_common_checks(self.anchor, self.classes, self.min_distance_px),
        ]
        _first_failure(checks, label)


@dataclass(frozen=True)
class ZoneConfig:
    """One zone (a polygon) of one stream: `[[zones]]`."""

    stream: str
    name: str
    polygon: tuple[Point, ...]
    anchor: str = "bottom_center"
    classes: tuple[str, ...] = ()  # () = every label
    min_distance_px: float = 4.0
    loiter_s: float = 0.0  # 0 = no loiter events

    def __post_init__(self) -> None:
        label = _label("zone", self.stream, self.name)
        checks: list[tuple[bool, str]] = [
            *_name_checks(self.stream, self.name),
            (
                3 <= len(self.polygon) <= MAX_POLYGON_POINTS and _coordinates_ok(self.polygon),
                f"polygon must be 3..{MAX_POLYGON_POINTS} [x, y] pairs "
                f"with |x|, |y| <= {MAX_COORDINATE:.0f}",
            ),
            (abs(_area(self.polygon)) > 0, "polygon must enclose an area (not all on one line)"),
            *_common_checks(self.anchor, self.classes, self.min_distance_px),
            (
                self.loiter_s == 0 or between(self.loiter_s, 0.1, MAX_LOITER_S),
                f"loiter_s must be 0 (off) or 0.1..{MAX_LOITER_S:.0f}",
            ),
        ]
        _first_failure(checks, label)


@dataclass(frozen=True)
class AnalyticsConfig:
    """Tracking options and every stream's lines and zones."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lines: tuple[LineConfig, ...] = ()
    zones: tuple[ZoneConfig, ...] = ()

    def __post_init__(self) -> None:
        check_per_stream(self.lines, self.zones)

    def lines_of(self, stream: str) -> tuple[LineConfig, ...]:
        return tuple(line for line in self.lines if line.stream == stream)

    def zones_of(self, stream: str) -> tuple[ZoneConfig, ...]:
        return tuple(zone for zone in self.zones if zone.stream == stream)


def tracking_from_dict(raw: Any) -> TrackingConfig:
    """A TrackingConfig from the `[tracking]` table; unknown keys and bad types are refused."""
    if not isinstance(raw, Mapping):
        raise ConfigError("bad [tracking]: must be a table/object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _TRACKING_FIELDS:
            raise ConfigError(f"bad [tracking]: unknown setting {key!r}")
        where = f"[tracking] {key}"
        if key == "new_object_classes":
            values[key] = _labels(where, value)
        else:
            values[key] = _number(where, value)
    return TrackingConfig(**values)


def line_from_dict(raw: Any) -> LineConfig:
    """A LineConfig from one `[[lines]]` table or a JSON body."""
    values = _table("line", raw, _LINE_FIELDS)
    label = _label("line", values["stream"], values["name"])
    points = _points(label, "points", raw.get("points"), 2, 2)
    values["points"] = (points[0], points[1])
    return LineConfig(**values)


def zone_from_dict(raw: Any) -> ZoneConfig:
    """A ZoneConfig from one `[[zones]]` table or a JSON body."""
    values = _table("zone", raw, _ZONE_FIELDS)
    label = _label("zone", values["stream"], values["name"])
    values["polygon"] = _points(label, "polygon", raw.get("polygon"), 3, MAX_POLYGON_POINTS)
    if "loiter_s" in raw:
        values["loiter_s"] = _number(f"{label}: loiter_s", raw["loiter_s"])
    return ZoneConfig(**values)


def analytics_from_toml(document: Mapping[str, Any]) -> AnalyticsConfig:
    """The AnalyticsConfig in a parsed TOML document: its `[tracking]` table and its `[[lines]]`
    and `[[zones]]` arrays of tables (other keys are left to the daemon's own Config)."""
    tracking = tracking_from_dict(document.get("tracking", {}))
    lines_raw = document.get("lines", [])
    zones_raw = document.get("zones", [])
    if not isinstance(lines_raw, list):
        raise ConfigError("bad config: lines must be [[lines]] tables")
    if not isinstance(zones_raw, list):
        raise ConfigError("bad config: zones must be [[zones]] tables")
    lines = tuple(line_from_dict(raw) for raw in lines_raw)
    zones = tuple(zone_from_dict(raw) for raw in zones_raw)
    return AnalyticsConfig(tracking=tracking, lines=lines, zones=zones)


def check_per_stream(lines: Sequence[LineConfig], zones: Sequence[ZoneConfig]) -> None:
    """Per stream: at most MAX_LINES_PER_STREAM lines and MAX_ZONES_PER_STREAM zones, and names
    unique among that stream's lines and among its zones."""
    for kind, items, cap in (
        ("lines", lines, MAX_LINES_PER_STREAM),
        ("zones", zones, MAX_ZONES_PER_STREAM),
    ):
        seen: dict[str, set[str]] = {}
        for item in items:
            names = seen.setdefault(item.stream, set())
            if item.name in names:
                raise ConfigError(
                    f"bad {kind}: stream {item.stream!r} has two {kind} named {item.name!r}"
                )
            names.add(item.name)
            if len(names) > cap:
                raise ConfigError(f"bad {kind}: stream {item.stream!r} has more than {cap} {kind}")


# ---- helpers ------------------------------------------------------------------------------------
_LABELS_HELP = (
    f"{{}} must be a list of at most {MAX_CLASSES} labels of 1-{MAX_LABEL_CHARS} characters"
)
_TRACKING_FIELDS = {f.name for f in fields(TrackingConfig)}
_COMMON = ("stream", "name", "anchor", "classes", "min_distance_px")
_LINE_FIELDS = {*_COMMON, "points"}
_ZONE_FIELDS = {*_COMMON, "polygon", "loiter_s"}


def _labels_ok(labels: tuple[str, ...]) -> bool:
    return len(labels) <= MAX_CLASSES and all(
        isinstance(x, str) and 1 <= len(x) <= MAX_LABEL_CHARS for x in labels
    )


def _name_checks(stream: str, name: str) -> list[tuple[bool, str]]:
    rule = "must be 1-64 letters, digits and _ . : - starting with a letter or digit"
    return [
        (isinstance(stream, str) and bool(NAME_RE.fullmatch(stream)), f"stream {rule}"),
        (isinstance(name, str) and bool(NAME_RE.fullmatch(name)), f"name {rule}"),
    ]


def _coordinates_ok(points: Sequence[Point]) -> bool:
    return all(
        len(p) == 2 and all(between(c, -MAX_COORDINATE, MAX_COORDINATE) for c in p) for p in points
    )


def _common_checks(
    anchor: str, classes: tuple[str, ...], min_distance_px: float
) -> list[tuple[bool, str]]:
    return [
        (anchor in ANCHORS, f"anchor must be one of {', '.join(ANCHORS)}"),
        (_labels_ok(classes), _LABELS_HELP.format("classes")),
        (
            between(min_distance_px, 0, MAX_HYSTERESIS_PX),
            f"min_distance_px must be 0..{MAX_HYSTERESIS_PX:.0f}",
        ),
    ]


def _label(kind: str, stream: Any, name: Any) -> str:
    """How messages name a line or zone; a name is echoed only once it is a valid name."""
    s = stream if isinstance(stream, str) and NAME_RE.fullmatch(stream) else "?"
    n = name if isinstance(name, str) and NAME_RE.fullmatch(name) else "?"
    return f"{kind} {n!r} of stream {s!r}"


def _table(kind: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    """The keys a line and a zone share, checked; geometry is read by the caller."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"bad {kind}: each {kind} must be a table/object with stream and name")
    label = _label(kind, raw.get("stream"), raw.get("name"))
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"bad {label}: unknown setting {key!r}")
    for key in ("stream", "name", "polygon" if kind == "zone" else "points"):
        if key not in raw:
            raise ConfigError(f"bad {label}: {key} is required")
    values: dict[str, Any] = {"stream": raw["stream"], "name": raw["name"]}
    if "anchor" in raw:
        if not isinstance(raw["anchor"], str):
            raise ConfigError(f"bad {label}: anchor must be one of {', '.join(ANCHORS)}")
        values["anchor"] = raw["anchor"]
    if "classes" in raw:
        values["classes"] = _labels(f"{label}: classes", raw["classes"])
    if "min_distance_px" in raw:
        values["min_distance_px"] = _number(f"{label}: min_distance_px", raw["min_distance_px"])
    return values


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"bad {where}: must be a number")
    return float(value)


def _labels(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"bad {where}: must be a list of label strings")
    labels = tuple(value)
    if not _labels_ok(labels):
        raise ConfigError(
            f"bad {where}: at most {MAX_CLASSES} labels of 1-{MAX_LABEL_CHARS} characters"
        )
    return labels


def _points(label: str, key: str, value: Any, least: int, most: int) -> tuple[Point, ...]:
    shape = f"{key} must be a list of {least}" + (f"..{most}" if most != least else "")
    shape += " [x, y] pairs of finite pixel coordinates"
    if not isinstance(value, list | tuple) or not least <= len(value) <= most:
        raise ConfigError(f"bad {label}: {shape}")
    points: list[Point] = []
    for p in value:
        if (
            not isinstance(p, list | tuple)
            or len(p) != 2
            or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in p)
            or not all(between(float(c), -MAX_COORDINATE, MAX_COORDINATE) for c in p)
        ):
            raise ConfigError(f"bad {label}: {shape} (|x|, |y| <= {MAX_COORDINATE:.0f})")
        points.append((float(p[0]), float(p[1])))
    return tuple(points)


def _area(polygon: Sequence[Point]) -> float:
    """Twice the signed area (shoelace); 0 for a degenerate polygon."""
    n = len(polygon)
    if n < 3:
        return 0.0
    return sum(
        polygon[i][0] * polygon[(i + 1) % n][1] - polygon[(i + 1) % n][0] * polygon[i][1]
        for i in range(n)
    )


def _first_failure(checks: list[tuple[bool, str]], what: str) -> None:
    """Raise the first failed check as a one-line ConfigError naming `what`."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"bad {what}: {message}")
