"""Privacy masks (issue 27): per-stream polygons blacked out in every JPEG the daemon serves or
stores (the dashboard's frames and `frame.jpg`, camera snapshots, event snapshots), and, for a
mask with `detect = true`, in the image the detector sees too, with any box whose centre falls
inside it left out of the results.

    [[masks]]
    stream = "door"
    name = "neighbours-window"
    polygon = [[0, 0], [200, 0], [200, 120], [0, 120]]   # pixels of the stream's frames
    detect = false

Set in the config file, or by an admin with `PUT /streams/{name}/masks`. A `MaskBook` holds
them by stream; workers read it from their threads (a tuple per stream, replaced whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vision_daemon.checks import NAME_RE, ConfigError

MAX_MASKS = 16  # per stream
MAX_POINTS = 64  # per polygon
MAX_COORD = 100_000


@dataclass(frozen=True)
class Mask:
    name: str
    polygon: tuple[tuple[int, int], ...]
    detect: bool = False  # also black out what the detector sees

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "polygon": [list(p) for p in self.polygon],
            "detect": self.detect,
        }


def parse_mask(raw: Any, where: str = "mask") -> Mask:
    """A Mask from a JSON object or TOML table (name, polygon, detect); ConfigError says why."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"bad {where}: a mask is an object with name, polygon and detect")
    unknown = set(raw) - {"name", "polygon", "detect", "stream"}
    if unknown:
        raise ConfigError(f"bad {where}: unknown key {sorted(unknown)[0]!r}")
    name, polygon, detect = raw.get("name"), raw.get("polygon"), raw.get("detect", False)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"bad {where}: name must be 1-64 letters, digits and _ . : -")
    if not isinstance(detect, bool):
        raise ConfigError(f"bad {where} {name!r}: detect must be true or false")
    if not isinstance(polygon, list) or not 3 <= len(polygon) <= MAX_POINTS:
        raise ConfigError(f"bad {where} {name!r}: polygon must have 3-{MAX_POINTS} points")
    points = []
    for p in polygon:
        ok = (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
            and all(-MAX_COORD <= v <= MAX_COORD for v in p)
        )
        if not ok:
            raise ConfigError(f"bad {where} {name!r}: each point is [x, y] in pixels")
        points.append((round(p[0]), round(p[1])))
    return Mask(name, tuple(points), detect)


def parse_masks(raw: Any, where: str = "masks") -> tuple[Mask, ...]:
    """A stream's masks from a JSON list; unique names, at most MAX_MASKS."""
    if not isinstance(raw, list) or len(raw) > MAX_MASKS:
        raise ConfigError(f"bad {where}: a list of at most {MAX_MASKS} masks")
    masks = tuple(parse_mask(m, where) for m in raw)
    if len({m.name for m in masks}) != len(masks):
        raise ConfigError(f"bad {where}: two masks have the same name")
    return masks


def masks_from_toml(tables: Any) -> dict[str, tuple[Mask, ...]]:
    """[[masks]] tables (each with its stream) by stream."""
    if not isinstance(tables, list):
        raise ConfigError("masks must be [[masks]] tables")
    by_stream: dict[str, list[Any]] = {}
    for t in tables:
        stream = t.get("stream") if isinstance(t, Mapping) else None
        if not isinstance(stream, str) or not NAME_RE.fullmatch(stream):
            raise ConfigError("bad [[masks]]: each needs a stream name")
        by_stream.setdefault(stream, []).append(t)
    return {s: parse_masks(ts, f"[[masks]] of {s!r}") for s, ts in by_stream.items()}


def black_out(image: np.ndarray, masks: Iterable[Mask], scale: float = 1.0) -> np.ndarray:
    """A copy of `image` with every mask's polygon black (polygons in full-frame pixels; the
    image may be decoded at `scale` of them)."""
    polys = [np.round(np.array(m.polygon, np.float64) * scale).astype(np.int32) for m in masks]
    if not polys:
        return image
    out = np.array(image, copy=True)
    cv2.fillPoly(out, polys, (0, 0, 0) if out.ndim == 3 else 0)
    return out


def detecting(masks: Iterable[Mask]) -> list[Mask]:
    """The masks that also hide their region from the detector."""
    return [m for m in masks if m.detect]


def inside(bbox: Any, masks: Iterable[Mask]) -> bool:
    """Whether a box's centre lies inside (or on) any of `masks`."""
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    centre = ((x1 + x2) / 2, (y1 + y2) / 2)
    for m in masks:
        contour = np.array(m.polygon, np.float32)
        if cv2.pointPolygonTest(contour, centre, False) >= 0:
            return True
    return False


class MaskBook:
    """Every stream's masks; read from any thread, replaced whole by `set`."""

    def __init__(self, initial: Mapping[str, tuple[Mask, ...]] | None = None) -> None:
        self._by_stream: dict[str, tuple[Mask, ...]] = dict(initial or {})

    def get(self, stream: str) -> tuple[Mask, ...]:
        return self._by_stream.get(stream, ())

    def set(self, stream: str, masks: tuple[Mask, ...]) -> None:
        by_stream = dict(self._by_stream)
        if masks:
            by_stream[stream] = masks
        else:
            by_stream.pop(stream, None)
        self._by_stream = by_stream  # one assignment: a reader sees the old or the new
