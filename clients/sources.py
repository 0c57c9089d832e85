"""Frame sources (synthetic, camera/file/URL, folder), encoding and pacing.

Shared by vision-client, vision-viz and vision-stress so every program paces and measures the
same way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class SourceError(Exception):
    """The source cannot be opened or read; the message is one line for the user."""


class Source:
    """Frames in order. `total` is the frame count when known (files, folders), else None."""

    name = "source"
    total: int | None = None

    def read(self) -> np.ndarray | None:
        """The next frame (BGR uint8), or None at the end."""
        raise NotImplementedError

    def skip(self, n: int) -> None:
        """Pass over n frames without decoding them where the source allows it."""
        for _ in range(n):
            if self.read() is None:
                return

    def close(self) -> None:
        """Release the device or file."""


class SyntheticSource(Source):
    """A loop of pre-rendered frames: a box moving over a gradient, so each costs nothing to make."""

    name = "synthetic"

    def __init__(self, width: int = 640, height: int = 480, count: int = 30) -> None:
        ramp = np.linspace(0, 255, width, dtype=np.uint8)
        base = np.dstack([np.tile(ramp, (height, 1))] * 3)
        self.frames: list[np.ndarray] = []
        for i in range(count):
            img = base.copy()
            x = int((width - width // 4) * i / max(1, count - 1))
            cv2.rectangle(img, (x, height // 3), (x + width // 4, 2 * height // 3), (0, 0, 255), -1)
            self.frames.append(img)
        self.i = 0

    def read(self) -> np.ndarray | None:
        img = self.frames[self.i % len(self.frames)]
        self.i += 1
        return img

    def skip(self, n: int) -> None:
        self.i += n


class VideoSource(Source):
    """A camera index, a video file or a stream URL, through OpenCV."""

    def __init__(self, source: str, loop: bool = False) -> None:
        self.source = source
        self.loop = loop
        target: int | str = int(source) if source.isdigit() else source
        if isinstance(target, str) and "://" not in target and not Path(target).exists():
            raise SourceError(f"cannot open source {source!r}: no such file")
        self.cap = cv2.VideoCapture(target)
        if not self.cap.isOpened():
            raise SourceError(
                f"cannot open source {source!r}: OpenCV could not open it as a camera, file or URL"
            )
        count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.is_file = isinstance(target, str) and "://" not in target
        self.total = count if self.is_file and count > 0 and not loop else None
        self.name = Path(source).stem if self.is_file else f"camera{source}"

    def _rewind(self) -> bool:
        if not (self.loop and self.is_file):
            return False
        self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        return True

    def read(self) -> np.ndarray | None:
        ok, img = self.cap.read()
        if not ok and self._rewind():
            ok, img = self.cap.read()
        return img if ok else None

    def seek(self, index: int) -> None:
        """Start at frame `index` (files only); stress streams start at different offsets."""
        if self.is_file:
            frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 1
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, index % frames)

    def skip(self, n: int) -> None:
        for _ in range(n):
            if not self.cap.grab() and not self._rewind():
                return

    def close(self) -> None:
        self.cap.release()


class FolderSource(Source):
    """The images of a folder in sorted order, optionally looping."""

    def __init__(self, folder: str, loop: bool = False) -> None:
        root = Path(folder)
        if not root.is_dir():
            raise SourceError(f"cannot open folder {folder!r}: not a directory")
        self.paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SourceError(
                f"folder {folder!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.loop = loop
        self.total = None if loop else len(self.paths)
        self.name = root.name
        self.i = 0

    def read(self) -> np.ndarray | None:
        while self.loop or self.i < len(self.paths):
            path = self.paths[self.i % len(self.paths)]
            self.i += 1
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is not None:
                return img
            if not self.loop and self.i >= len(self.paths):
                break
        return None

    def skip(self, n: int) -> None:
        self.i += n


def open_source(
    mode: str,
    source: str | None = None,
    folder: str | None = None,
    loop: bool = False,
    width: int = 640,
    height: int = 480,
) -> Source:
    """The source for a mode; numeric modes are the legacy spellings (0 video, 1 folder, 2 synth)."""
    mode = {"0": "video", "1": "folder", "2": "synthetic"}.get(mode, mode)
    if mode == "synthetic":
        return SyntheticSource(width or 640, height or 480)
    if mode == "webcam":
        return VideoSource(source or "0", loop=False)
    if mode == "video":
        if source is None:
            raise SourceError("--mode video needs --source (a file, camera index or URL)")
        return VideoSource(source, loop=loop)
    if mode == "folder":
        if folder is None and source is None:
            raise SourceError("--mode folder needs --folder DIR")
        return FolderSource(folder or source or "", loop=loop)
    raise SourceError(f"unknown mode {mode!r}; use synthetic, webcam, video, folder, 0, 1 or 2")


@dataclass(frozen=True)
class Encoded:
    data: bytes
    encoding: str
    shape: tuple[int, int, int] | None


def encode(
    img: np.ndarray, encoding: str = "jpeg", quality: int = 90, width: int = 0, height: int = 0
) -> Encoded:
    """Resize (when asked) and encode one frame for the wire."""
    if width and height and (img.shape[1], img.shape[0]) != (width, height):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    if encoding == "raw":
        img = np.ascontiguousarray(img, dtype=np.uint8)
        h, w = img.shape[:2]
        return Encoded(img.tobytes(), "raw", (h, w, 3))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise SourceError("OpenCV could not encode a frame as JPEG")
    return Encoded(buf.tobytes(), "jpeg", None)


class Pacer:
    """An absolute send schedule: slot k is due at start + k / fps.

    Sending never drifts (each slot is computed from the start, not from the last send) and never
    accumulates delay: when the sender falls a whole slot behind, the missed slots are skipped and
    counted rather than sent late in a burst. With `end` (a monotonic time), the schedule ends at
    the first slot due at or after it. `clock` and `sleep` are injectable for tests.
    """

    def __init__(
        self,
        fps: float,
        start: float | None = None,
        end: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.start = clock() if start is None else start
        self.end = end
        self.slot = 0
        self.skipped = 0
        # Slot k is due at anchor + (k - anchor_slot) * period; set_fps moves the anchor.
        self.anchor, self.anchor_slot = self.start, 0

    def set_fps(self, fps: float) -> None:
        """Change the rate from the next slot on (server-advised rates); no burst, no gap."""
        if fps <= 0 or self.period == 0:
            return
        self.anchor = max(self.due_time(self.slot), self.clock())
        self.anchor_slot = self.slot
        self.period = 1.0 / fps

    async def wait(self) -> int | None:
        """Sleep until the next slot is due and return how many slots were skipped to get there;
        None once the schedule has ended (without sleeping)."""
        if self.period == 0:
            self.slot += 1
            return 0
        now = self.clock()
        behind = self.anchor_slot + math.floor((now - self.anchor) / self.period)
        missed = 0
        if behind > self.slot:  # a whole slot late: jump to the current one
            missed = behind - self.slot
            self.slot = behind
            self.skipped += missed
        due = self.due_time(self.slot)
        if self.end is not None and due >= self.end:
            return None
        if due > now:
            await self.sleep(due - now)
        self.slot += 1
        return missed

    def due_time(self, slot: int) -> float:
        return self.anchor + (slot - self.anchor_slot) * self.period
