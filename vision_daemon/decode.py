"""Image decoding for the workers: only the encodings the protocol names, sized from the header.

Runs in worker threads. Every foreseeable failure is a `DecodeFailure` with a protocol error code,
so the worker drops the frame with a reason; nothing here may end a worker.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image as PILImage

from vision_daemon.detectors.base import Image
from vision_daemon.protocol import E_DECODE, E_IMAGE_TOO_LARGE, Frame

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_SOS = b"\xff\xda"  # start of scan; never inside entropy-coded data (0xFF is stuffed there)
MAX_JPEG_SCANS = 64  # a progressive JPEG has about 10; each scan costs a pass over the image


class DecodeFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def quiet_codecs() -> None:
    """Keep OpenCV's own messages off stderr; frames that fail are reported through logging.

    libpng prints its warnings (e.g. "iCCP: known incorrect sRGB profile") to stderr itself,
    with no hook to turn them off, so PNGs are decoded by Pillow (its own decoder over zlib)
    and libpng never sees a client's bytes.
    """
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    utils_logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if utils_logging is not None:  # cv2.setLogLevel is gone in OpenCV 5
        utils_logging.setLogLevel(utils_logging.LOG_LEVEL_ERROR)
    # A header over Pillow's bomb limit is refused by our own pixel check; no warning either.
    warnings.filterwarnings("ignore", category=PILImage.DecompressionBombWarning)


def _too_large(w: int, h: int, max_pixels: int) -> DecodeFailure:
    return DecodeFailure(E_IMAGE_TOO_LARGE, f"image {w}x{h} exceeds max_image_pixels={max_pixels}")


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header of a JPEG or PNG; anything else is refused unread."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise DecodeFailure(E_DECODE, "PNG header is truncated or has no IHDR")
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if not data.startswith(JPEG_MAGIC):
        raise DecodeFailure(
            E_DECODE, "image bytes are not JPEG or PNG (the only encoded formats accepted)"
        )
    try:
        # Pillow reads only the JPEG header here: a 100k x 100k "decompression bomb" costs nothing.
        with PILImage.open(io.BytesIO(data), formats=("JPEG",)) as header:
            return header.size
    except PILImage.DecompressionBombError:  # over Pillow's own limit (~179 MPx): ours is lower
        raise _too_large(0, 0, max_pixels) from None
    except Exception:
        raise DecodeFailure(E_DECODE, "JPEG header does not decode") from None


REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def reduction(w: int, h: int, model_size: int) -> int:
    """The largest JPEG decode scale-down (1, 2, 4 or 8) that keeps at least the pixels the
    model's letterbox keeps: the letterbox shrinks the long side to `model_size`, so a decode at
    1/k loses nothing it would keep while k <= long side / model_size."""
    if model_size <= 0:
        return 1
    fits = max(w, h) // model_size
    return next((k for k in (8, 4, 2) if k <= fits), 1)


class Decoded(NamedTuple):
    image: Image
    k: int  # the image is 1/k of the size sent (1, 2, 4 or 8)
    width: int  # the size sent
    height: int


def decode(frame: Frame, max_pixels: int) -> Image:
    """Decode to BGR uint8; the pixel limit is checked from the header before the full decode."""
    return decode_for(frame, max_pixels, 0).image


def decode_for(frame: Frame, max_pixels: int, model_size: int) -> Decoded:
    """A JPEG at least twice `model_size` on its long side is decoded at 1/k of its size
    (libjpeg's DCT scaling: cheaper than a full decode and a resize), so detections on it scale
    back by k. Everything else, and `model_size` 0, decodes at full size (k = 1)."""
    if frame.pixels is not None:  # decoded by a camera's reader already
        h, w = frame.pixels.shape[:2]
        if h * w > max_pixels:
            raise _too_large(w, h, max_pixels)
        pixels: Image = frame.pixels
        return Decoded(pixels, 1, w, h)
    if frame.encoding == "raw":
        if frame.shape is None:  # validated by protocol.parse_message; kept as a guard
            raise DecodeFailure(E_DECODE, "raw frame without a shape")
        h, w, _ = frame.shape
        if h * w > max_pixels:
            raise _too_large(w, h, max_pixels)
        return Decoded(np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape), 1, w, h)
    w, h = image_size(frame.image, max_pixels)
    if w * h > max_pixels or w == 0 or h == 0:
        if w * h > max_pixels:
            raise _too_large(w, h, max_pixels)
        raise DecodeFailure(E_DECODE, f"image header declares {w}x{h} pixels")
    if frame.image.startswith(PNG_MAGIC):
        return Decoded(_decode_png(frame.image), 1, w, h)
    scans = frame.image.count(JPEG_SOS)
    if scans > MAX_JPEG_SCANS:
        raise DecodeFailure(E_DECODE, f"JPEG has {scans} scans; at most {MAX_JPEG_SCANS}")
    k = reduction(w, h, model_size)
    try:
        img: Image | None = cv2.imdecode(  # type: ignore[assignment]
            np.frombuffer(frame.image, dtype=np.uint8), REDUCED.get(k, cv2.IMREAD_COLOR)
        )
    except cv2.error:  # OpenCV raises on some headers it cannot handle
        img = None
    if img is None:
        raise DecodeFailure(E_DECODE, "image bytes are not a decodable JPEG or PNG")
    return Decoded(img, k, w, h)


def _decode_png(data: bytes) -> Image:
    try:
        with PILImage.open(io.BytesIO(data), formats=("PNG",)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception:
        raise DecodeFailure(E_DECODE, "image bytes are not a decodable PNG") from None
    bgr: Image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # type: ignore[assignment]
    return bgr
