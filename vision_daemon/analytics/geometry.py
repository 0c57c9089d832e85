"""Points, lines and polygons in pixel coordinates (x right, y down); pure arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

Point = tuple[float, float]


def anchor_point(box: Sequence[float], anchor: str) -> Point:
    """The point of an [x1, y1, x2, y2] box that counts: "bottom_center" (where a person stands
    or a car touches the road, as Frigate and supervision count) or "center"."""
    x1, y1, x2, y2 = box[0], box[1], box[2], box[3]
    if anchor == "center":
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
    return ((x1 + x2) / 2.0, max(y1, y2))


class Line:
    """A line segment from `a` to `b`.

    `side(p)` is the signed distance in pixels of p from the infinite line: positive on the
    left-hand side of someone standing on `a` and facing `b` as drawn on the screen (with y
    down, for a = (0, y), b = (w, y) that is above the line), negative on the right.
    Hand-written: two products per call, where a geometry library's per-call overhead would be
    most of the cost.
    """

    __slots__ = ("_a", "_dx", "_dy", "_len", "_len2")

    def __init__(self, a: Point, b: Point) -> None:
        self._a = (float(a[0]), float(a[1]))
        self._dx = float(b[0]) - self._a[0]
        self._dy = float(b[1]) - self._a[1]
        self._len2 = self._dx * self._dx + self._dy * self._dy
        if self._len2 <= 0:
            raise ValueError("a line needs two different points")
        self._len = math.sqrt(self._len2)

    def side(self, p: Point) -> float:
        """Signed distance from the line: > 0 left of a -> b on the screen, < 0 right."""
        return ((p[0] - self._a[0]) * self._dy - (p[1] - self._a[1]) * self._dx) / self._len

    def crosses_segment(self, p: Point, q: Point) -> bool:
        """Whether the path p -> q (on opposite sides) passes through the segment itself, not
        beside one of its ends."""
        dp, dq = self.side(p), self.side(q)
        if dp == dq:
            return False
        f = dp / (dp - dq)  # where along p -> q the infinite line is met
        x = p[0] + (q[0] - p[0]) * f - self._a[0]
        y = p[1] + (q[1] - p[1]) * f - self._a[1]
        t = (x * self._dx + y * self._dy) / self._len2  # where along a -> b
        return 0.0 <= t <= 1.0


class Polygon:
    """A closed polygon; `depth(p)` is the signed distance to its edge (> 0 inside), through
    OpenCV's pointPolygonTest."""

    __slots__ = ("_contour",)

    def __init__(self, points: Sequence[Point]) -> None:
        self._contour = np.asarray(points, dtype=np.float32).reshape(-1, 1, 2)

    def depth(self, p: Point) -> float:
        """Signed distance in pixels from the edge: > 0 inside, < 0 outside, 0 on it."""
        return float(cv2.pointPolygonTest(self._contour, (float(p[0]), float(p[1])), True))

    def contains(self, p: Point) -> float:
        """+1 inside, -1 outside, 0 on the edge (cheaper than depth)."""
        return float(cv2.pointPolygonTest(self._contour, (float(p[0]), float(p[1])), False))
