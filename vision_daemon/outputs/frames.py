"""The latest analysed frame of each watched stream, for the dashboard, and turning a frame into
the bytes to serve."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vision_daemon.masks import Mask, MaskBook, black_out
from vision_daemon.protocol import Frame


def encode_jpeg(pixels: Any) -> bytes:
    """A BGR (or grey) uint8 array as a JPEG, quality 85."""
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding of a frame failed")
    return bytes(buf.tobytes())


def snapshot_jpeg(pixels: Any, max_bytes: int) -> bytes | None:
    """An event's snapshot: the frame as a JPEG of at most `max_bytes`, at most 640 pixels wide,
    scaled down further (and its quality lowered) until it fits; None if even 80 pixels wide
    does not."""
    height, width = pixels.shape[:2]
    scale = min(1.0, 640 / max(width, 1))
    quality = 80
    while width * scale >= 80:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = pixels if scale == 1.0 else cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and buf.size <= max_bytes:
            return bytes(buf.tobytes())
        scale *= 0.7
        quality = max(50, quality - 10)
    return None


async def as_image(frame: Frame, masks: tuple[Mask, ...] = ()) -> tuple[bytes, str]:
    """A frame as an image to serve, with its media type: JPEG or PNG bytes as they were sent,
    pixels (decoded by a camera, raw, or a shared-memory copy) encoded to JPEG off the loop.
    With privacy `masks`, always a JPEG with their polygons black (decoded, masked and encoded
    again, off the loop)."""
    if masks:
        return await asyncio.to_thread(_masked_jpeg, frame, masks), "image/jpeg"
    if frame.pixels is None and frame.encoding != "raw":
        png = frame.image.startswith(b"\x89PNG")
        return frame.image, "image/png" if png else "image/jpeg"
    return await asyncio.to_thread(encode_jpeg, _pixels(frame)), "image/jpeg"


def _pixels(frame: Frame) -> Any:
    """A frame's pixels: decoded by a camera, a shared-memory copy, raw bytes as an array, or
    (JPEG/PNG bytes) decoded here."""
    if frame.pixels is not None:
        return frame.pixels
    if frame.encoding == "raw":
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape)
    pixels = cv2.imdecode(np.frombuffer(frame.image, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise RuntimeError("a kept frame could not be decoded")
    return pixels


def _masked_jpeg(frame: Frame, masks: tuple[Mask, ...]) -> bytes:
    return encode_jpeg(black_out(_pixels(frame), masks))


@dataclass(frozen=True)
class FrameImage:
    """A kept frame as the dashboard fetches it."""

    frame_id: int
    timestamp: float
    body: bytes
    media_type: str
    masks: tuple[Mask, ...] = ()  # the privacy masks it was made with


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
        self.masks: MaskBook | None = None  # privacy masks, blacked out of every served frame

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
        masks = self.masks.get(stream) if self.masks is not None else ()
        cached = self._images.get(stream)
        if cached is not None and (cached.frame_id, cached.masks) == (frame.frame_id, masks):
            return cached
        body, media_type = await as_image(frame, masks)
        image = FrameImage(frame.frame_id, frame.timestamp, body, media_type, masks)
        if stream in self._watched:  # not forgotten while it was encoded
            self._images[stream] = image
        return image
