"""The MJPEG (multipart/x-mixed-replace) parser: bytes in as they arrive, JPEGs out with the time
their part's first byte came, every size bounded, empty or non-image parts budgeted."""

from __future__ import annotations

import re

from vision_daemon.ingest.source_types import SourceError

MAX_PART_HEADER = 8192  # bytes of one multipart part's headers
MAX_PREAMBLE = 65536  # bytes before the first boundary (a real camera sends a CRLF or nothing)
MAX_BAD_PARTS = 100  # empty or non-image parts in a row before the stream is given up


class MjpegError(SourceError):
    """The bytes are not the MJPEG stream the headers promised."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class MjpegParser:
    """Splits a multipart/x-mixed-replace body into JPEGs, with every size bounded.

    Written by hand: no maintained library parses an endless x-mixed-replace stream on the
    client side. Parts with a Content-Length (the ESP32-CAM sends one) are cut by it; others at
    the next boundary. Cameras differ on the dashes around the boundary, so the token itself is
    searched for. Parts that are not JPEGs are counted in `bad_parts` and skipped; more than
    MAX_BAD_PARTS of them in a row end the stream. Each JPEG comes with the time its part's
    first byte was fed.
    """

    def __init__(self, boundary: bytes, max_part: int) -> None:
        self.boundary = boundary.lstrip(b"-") or boundary
        self.max_part = max_part
        self.buf = bytearray()
        self.bad_parts = 0
        self._scan = 0  # where to resume looking for the next boundary (no rescans)
        self._synced = False  # a boundary was seen: the stream is multipart as promised
        self._started = 0.0  # when the first byte still in `buf` was fed
        self._bad_in_a_row = 0

    def feed(self, data: bytes, now: float = 0.0) -> list[tuple[bytes, float]]:
        """The JPEGs `data` completes, each with the time its first byte was fed (`now` is
        when `data` arrived)."""
        if not self.buf:
            self._started = now
        self.buf += data
        out: list[tuple[bytes, float]] = []
        while True:
            started = self._started
            part = self._next_part()
            if part is None:
                return out
            self._started = now  # what is left of `buf` came in with `data`
            if part.startswith(b"\xff\xd8"):
                out.append((part, started))
                self._bad_in_a_row = 0
                continue
            self.bad_parts += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row > MAX_BAD_PARTS:
                raise MjpegError(
                    f"more than {MAX_BAD_PARTS} empty or non-image parts in a row: "
                    "not a camera stream"
                )

    def _next_part(self) -> bytes | None:
        buf = self.buf
        i = buf.find(self.boundary)
        if i < 0:
            limit = self.max_part + MAX_PART_HEADER if self._synced else MAX_PREAMBLE
            if len(buf) > limit:
                raise MjpegError(f"no multipart boundary in {len(buf)} bytes: not an MJPEG stream")
            return None
        head_end = buf.find(b"\r\n\r\n", i)
        sep = 4
        if head_end < 0:
            head_end, sep = buf.find(b"\n\n", i), 2
        if head_end < 0:
            if len(buf) - i > MAX_PART_HEADER:
                raise MjpegError("multipart part headers longer than 8 KiB")
            return None
        self._synced = True
        headers = bytes(buf[i:head_end]).lower()
        start = head_end + sep
        match = re.search(rb"content-length:\s*(\d+)", headers)
        if match is not None:
            length = int(match.group(1))
            if length > self.max_part:
                raise MjpegError(f"MJPEG part of {length} bytes exceeds {self.max_part}")
            if len(buf) < start + length:
                return None
            part = bytes(buf[start : start + length])
            del buf[: start + length]
            self._scan = 0
            return part
        j = buf.find(self.boundary, max(start, self._scan))
        if j < 0:
            if len(buf) - start > self.max_part:
                raise MjpegError(f"MJPEG part longer than {self.max_part} bytes")
            self._scan = max(start, len(buf) - len(self.boundary))
            return None
        part = bytes(buf[start:j]).rstrip(b"-").rstrip(b"\r\n")
        del buf[:j]
        self._scan = 0
        return part
