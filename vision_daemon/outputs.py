"""What leaves besides the reply: fan-out of results to /ws subscribers, each with a bounded queue,
and the latest analysed frame of each watched stream for the dashboard.

Each result is encoded to JSON once, for every subscriber (`publish` takes the text); a slow
subscriber loses its oldest messages, never slows the publisher, and subscribers are capped.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from vision_daemon.protocol import Frame


@dataclass(eq=False)
class Subscriber:
    """A slow subscriber loses its oldest messages (counted); it never slows the publisher."""

    streams: frozenset[str]  # empty = all
    maxlen: int
    every: int = 1  # deliver every Nth matching result
    min_interval_s: float = 0.0  # max_fps thinning
    peer: str = ""
    queue: deque[str] = field(init=False)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    sending: int = 0  # taken from the queue, being written to the socket
    dropped: int = 0
    _matched: int = 0
    _last: float = float("-inf")

    def __post_init__(self) -> None:
        self.queue = deque()

    def offer(self, stream: str, text: str, now: float) -> None:
        if self.streams and stream not in self.streams:
            return
        self._matched += 1
        if (self._matched - 1) % self.every:
            return
        if now - self._last < self.min_interval_s:
            return
        self._last = now
        if len(self.queue) >= self.maxlen:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(text)
        self.event.set()

    closed: bool = False

    async def next_batch(self) -> list[str] | None:
        """The queued messages, or None once the daemon is shutting down."""
        await self.event.wait()
        self.event.clear()
        if self.closed:
            return None
        batch = list(self.queue)
        self.queue.clear()
        return batch


class Hub:
    def __init__(self, max_subscribers: int = 64) -> None:
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self.dropped_total = 0  # from subscribers that have left
        self.refused = 0  # subscribers turned away at the cap
        self.closed = False

    def add(self, sub: Subscriber) -> bool:
        """Admit a subscriber unless the cap is reached or the daemon stops (caller closes it)."""
        if self.closed or len(self.subscribers) >= self.max_subscribers:
            self.refused += 1
            return False
        self.subscribers.add(sub)
        return True

    def publish(self, stream: str, text: str, now: float) -> None:
        for sub in self.subscribers:
            sub.offer(stream, text, now)

    def close(self) -> None:
        """Shutdown: wake every subscriber so its handler closes the socket itself."""
        self.closed = True
        for sub in self.subscribers:
            sub.closed = True
            sub.event.set()

    @property
    def dropped(self) -> int:
        """Messages lost by slow subscribers, including those that have left."""
        return self.dropped_total + sum(s.dropped for s in self.subscribers)

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.dropped_total += sub.dropped

    def snapshot(self) -> dict[str, Any]:
        return {
            "subscribers": len(self.subscribers),
            "max_subscribers": self.max_subscribers,
            "refused": self.refused,
            "dropped": self.dropped,
            "clients": [
                {
                    "peer": s.peer,
                    "streams": sorted(s.streams),
                    "sent": s.sent,
                    "dropped": s.dropped,
                    "queued": len(s.queue),
                    "sending": s.sending,
                }
                for s in self.subscribers
            ],
        }


def encode_jpeg(pixels: Any) -> bytes:
    """A BGR (or grey) uint8 array as a JPEG, quality 85."""
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding of a frame failed")
    return bytes(buf.tobytes())


async def as_image(frame: Frame) -> tuple[bytes, str]:
    """A frame as an image to serve, with its media type: JPEG or PNG bytes as they were sent,
    pixels (decoded by a camera, raw, or a shared-memory copy) encoded to JPEG off the loop."""
    if frame.pixels is None and frame.encoding != "raw":
        png = frame.image.startswith(b"\x89PNG")
        return frame.image, "image/png" if png else "image/jpeg"
    pixels = frame.pixels
    if pixels is None:
        pixels = np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape)
    return await asyncio.to_thread(encode_jpeg, pixels), "image/jpeg"


@dataclass(frozen=True)
class FrameImage:
    """A kept frame as the dashboard fetches it."""

    frame_id: int
    timestamp: float
    body: bytes
    media_type: str


class LatestFrames:
    """At most one frame per stream, the latest analysed, and only while someone watches it.

    Asking for a stream's frame (`image`) watches it for `watch_s`; while watched, every analysed
    frame replaces the kept one (`keep`, on the event loop: a reference, except a shared-memory
    view, which is copied since its slot goes back to the client). The stored bytes of a JPEG or
    PNG frame are served as they are; pixels are encoded to JPEG once per frame, on request, off
    the event loop. So the dashboard costs nothing while no one looks, and one encode per analysed
    frame at most however many viewers look (drawing the boxes is the browser's job).
    """

    def __init__(self, watch_s: float = 10.0) -> None:
        self.watch_s = watch_s
        self._watched: dict[str, float] = {}  # stream -> watched until (monotonic)
        self._kept: dict[str, Frame] = {}
        self._images: dict[str, FrameImage] = {}  # the last served image, per stream

    def keep(self, frame: Frame, now: float) -> None:
        name = frame.stream_name
        until = self._watched.get(name)
        if until is None:
            return
        if now > until:  # no one asked for a while: let go of it
            self.forget(name)
            return
        if frame.slot is not None:  # a view of the client's ring, which reuses the slot
            frame = dataclasses.replace(frame, pixels=np.array(frame.pixels), slot=None)
        self._kept[name] = frame

    def forget(self, stream: str) -> None:
        self._watched.pop(stream, None)
        self._kept.pop(stream, None)
        self._images.pop(stream, None)

    @property
    def kept(self) -> int:
        return len(self._kept)

    async def image(self, stream: str, now: float) -> FrameImage | None:
        """The stream's latest kept frame as an image (None: none kept yet); watches it."""
        self._watched[stream] = now + self.watch_s
        frame = self._kept.get(stream)
        if frame is None:
            return None
        cached = self._images.get(stream)
        if cached is not None and cached.frame_id == frame.frame_id:
            return cached
        body, media_type = await as_image(frame)
        image = FrameImage(frame.frame_id, frame.timestamp, body, media_type)
        if stream in self._watched:  # not forgotten while it was encoded
            self._images[stream] = image
        return image
