"""Motion gating as a pure policy: skip inference on a frame that barely differs from the last one
analysed, and answer with that frame's detections (Frigate's main CPU saver, opt-in per stream).

The test is a cheap one: both frames shrunk to a THUMB_W-pixel-wide grey thumbnail (INTER_AREA
averages away sensor noise and JPEG blocks), and the share of thumbnail pixels that differ by more
than PIXEL_DELTA grey levels. Under the stream's `motion_gate` share the frame is `unchanged`: it
reuses the last detections. The comparison is always against the last frame analysed, so a slow
drift adds up until it is analysed again, and `refresh_s` bounds how old reused detections get.
Each refresh falls at a random 80-100% of `refresh_s`: still cameras started together would
otherwise all need the detector in the same instant, every `refresh_s`, and drop frames then.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

THUMB_W = 64  # pixels: 64x36 for 16:9, 64x48 for 4:3
PIXEL_DELTA = 16  # grey levels: a thumbnail pixel that moved less is noise


def thumbnail(image: Any) -> np.ndarray:
    """A small grey copy of a BGR (or grey) uint8 image, for comparing frames."""
    h, w = image.shape[:2]
    small = cv2.resize(
        image, (THUMB_W, max(1, round(THUMB_W * h / w))), interpolation=cv2.INTER_AREA
    )
    if small.ndim == 3 and small.shape[2] == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    elif small.ndim == 3:
        small = small[:, :, 0]
    return np.asarray(small)


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels that differ by more than PIXEL_DELTA (1.0 if the sizes differ)."""
    if a.shape != b.shape:
        return 1.0
    return float(np.count_nonzero(cv2.absdiff(a, b) > PIXEL_DELTA)) / a.size


class MotionGate:
    """One stream's reference: the last analysed frame's thumbnail, detections and time.

    Workers call it from their threads (two may hold frames of one stream), hence the lock.
    """

    def __init__(self, threshold: float, refresh_s: float) -> None:
        self.threshold = threshold
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._ref: np.ndarray | None = None
        self._detections: list[Any] = []
        self._expires = float("-inf")  # reuse nothing from this time on

    def reuse(self, thumb: np.ndarray, now: float) -> list[Any] | None:
        """The last detections if this frame is unchanged and they are fresh enough, else None
        (the frame must be analysed)."""
        with self._lock:
            ref, detections, expires = self._ref, self._detections, self._expires
        if ref is None or now >= expires:
            return None
        if changed_share(thumb, ref) >= self.threshold:
            return None
        return [dict(d) for d in detections]

    def analysed(self, thumb: np.ndarray, detections: Sequence[Any], now: float) -> None:
        """A frame was analysed: it is the new reference."""
        expires = now + self.refresh_s * random.uniform(0.8, 1.0)
        with self._lock:
            self._ref, self._detections, self._expires = thumb, list(detections), expires
