"""Hostile images: formats the daemon does not take, headers declaring too many pixels, and payloads
that make the decoder raise; the workers live and inference goes on."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage

from tests.conftest import (
    SlowDetector,
    api,
    collect,
    connect,
    jpeg,
    round_trip,
    run,
    running_daemon,
    settled_stats,
    stream_stats,
)
from vision_daemon import protocol as p

pytestmark = pytest.mark.slow  # a live daemon on real sockets


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h pixels (valid CRCs, a token IDAT): only the header is big."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def other_formats() -> dict[str, bytes]:
    """A small, perfectly valid image in each format the protocol does not accept."""
    img = np.full((48, 64, 3), 90, np.uint8)
    out = {
        ext[1:]: bytes(cv2.imencode(ext, img)[1].tobytes()) for ext in (".bmp", ".tiff", ".webp")
    }
    out["ppm"] = bytes(cv2.imencode(".ppm", img)[1].tobytes())
    gif = io.BytesIO()
    PILImage.fromarray(img).save(gif, "GIF")
    out["gif"] = gif.getvalue()
    return out


# A P6 header declaring 2,000,000 x 1 pixels: under max_image_pixels, but cv2.imdecode raises on it.
WIDE_PPM = b"P6\n2000000 1\n255\n" + b"\0" * 1024


def test_frame_that_makes_the_decoder_raise_is_dropped_and_inference_goes_on() -> None:
    """A PPM declaring 2,000,000 x 1 pixels, sent as jpeg on 4 streams: each is refused, the workers live."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0), workers=2) as d, api(d) as h:
            good = await connect(d)
            await round_trip(good, "good", 0)
            bad = await connect(d)
            for k in range(4):  # more bad frames than workers, on distinct streams
                await bad.send_frame(f"bad{k}", k, WIDE_PPM)
            try:
                replies = await collect(bad, 4, timeout=5)
            except TimeoutError:
                raise AssertionError("bad frames got no error reply within 5 s") from None
            assert all(m["type"] == "error" for m in replies), replies
            assert {m["code"] for m in replies} <= {"decode_error", "invalid"}, replies
            assert sorted(m["frame_id"] for m in replies) == [0, 1, 2, 3]
            for i in range(1, 6):
                await round_trip(good, "good", i)
            stats = await settled_stats(h, min_received=10)
            drops = stats["totals"]["dropped_by_reason"]
            assert drops["decode_error"] + drops["invalid"] == 4, drops
            assert stats["totals"]["processed"] == 6
            ready = await h.get("/ready")
            assert ready.status_code == 200 and stats["ready"], ready.text

    run(scenario())


def test_only_jpeg_and_png_are_accepted_and_huge_png_headers_are_too_large() -> None:
    """BMP, TIFF, WebP, GIF and PPM get decode_error; a 30000x30000 PNG header gets image_too_large."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0), workers=1) as d, api(d) as h:
            good = await connect(d)
            c = await connect(d)
            formats = other_formats()
            for i, (fmt, data) in enumerate(formats.items()):
                await c.send_frame("cam", i, data)
                (msg,) = await collect(c, 1, timeout=5)
                assert msg["type"] == "error" and msg["code"] == "decode_error", (fmt, msg)
                assert msg["frame_id"] == i
                await round_trip(good, "good", i)
            await c.send_frame("cam", 100, png_header(30000, 30000), encoding="png")
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "error" and msg["code"] == "image_too_large", msg
            png = bytes(cv2.imencode(".png", np.full((32, 32, 3), 7, np.uint8))[1].tobytes())
            await c.send_frame("cam", 101, png, encoding="png")  # a real PNG still passes
            (ok,) = await collect(c, 1, timeout=5)
            assert ok["type"] == "result" and ok["frame_id"] == 101, ok
            n = len(formats)
            stats = await settled_stats(h, min_received=2 * n + 2)
            drops = stats["totals"]["dropped_by_reason"]
            assert drops["decode_error"] == n and drops["invalid"] == 1, drops

    run(scenario())


def test_oversized_image_refused_from_header() -> None:
    """An image whose header declares more pixels than max_image_pixels is refused as image_too_large."""

    async def scenario() -> None:
        async with running_daemon(max_image_pixels=64 * 64) as d:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 1, jpeg(64, 65))
            out = await collect(c, 2)
            assert {m["type"] for m in out} == {"error", "dropped"}
            err = next(m for m in out if m["type"] == "error")
            assert err["code"] == p.E_IMAGE_TOO_LARGE and err["frame_id"] == 1
            await c.send_frame("cam", 2, jpeg(64, 64))  # just at the limit passes
            ok = await collect(c, 1)
            assert ok[0]["type"] == "result"
            assert stream_stats(d, "cam")["dropped_by_reason"]["invalid"] == 1

    run(scenario())
