"""HTTP camera sources: MJPEG (multipart/x-mixed-replace, through a bounded parser) and JPEG
snapshot URLs polled at the camera's rate (httpx; Basic auth, Digest when asked)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import httpx

from vision_daemon.config import CameraConfig
from vision_daemon.ingest.source_types import (
    Grab,
    Source,
    SourceError,
    SourceInfo,
    split_credentials,
)

log = logging.getLogger(__name__)


MAX_PART_HEADER = 8192  # bytes of one multipart part's headers
MAX_PREAMBLE = 65536  # bytes before the first boundary (a real camera sends a CRLF or nothing)


# ---- HTTP: MJPEG (multipart/x-mixed-replace) or a JPEG snapshot URL ----------------------------
def open_http(url: str, camera: CameraConfig, max_bytes: int) -> Source:
    bare, credentials = split_credentials(url)
    timeout = httpx.Timeout(
        connect=camera.open_timeout_s,
        read=camera.stall_timeout_s,
        write=camera.open_timeout_s,
        pool=camera.open_timeout_s,
    )
    client = httpx.Client(
        timeout=timeout,
        follow_redirects=True,
        max_redirects=3,
        # identity: a compressed body would be inflated past our bounds before we could count it
        headers={"User-Agent": "vision-daemon", "Accept-Encoding": "identity"},
    )
    try:
        try:
            response = _get(client, bare, credentials)
        except httpx.ReadTimeout:
            raise SourceError(
                "the camera accepted the connection but sent no answer within stall_timeout_s"
            ) from None
        ctype = response.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/"):
            match = re.search(r'boundary="?([^";,]+)"?', response.headers["content-type"])
            if match is None:
                response.close()
                raise SourceError("multipart response without a boundary", permanent=True)
            return MjpegSource(client, response, match.group(1).encode(), max_bytes, camera)
        if ctype.startswith(("image/jpeg", "image/jpg")):
            first = _read_bounded(response, max_bytes, camera.stall_timeout_s)
            return SnapshotSource(client, bare, credentials, camera, max_bytes, first)
        response.close()
        raise SourceError(
            f"not an MJPEG stream or a JPEG snapshot (Content-Type {ctype[:40] or 'missing'})",
            permanent=True,
        )
    except BaseException:
        client.close()
        raise


def _get(client: httpx.Client, url: str, credentials: tuple[str, str] | None) -> httpx.Response:
    """GET, streaming; Basic auth first, Digest when the camera asks for it (many do)."""
    auth: httpx.Auth | None = httpx.BasicAuth(*credentials) if credentials else None
    response = client.send(client.build_request("GET", url), auth=auth, stream=True)
    challenge = response.headers.get("www-authenticate", "").lower()
    if response.status_code == 401 and credentials and challenge.startswith("digest"):
        response.close()
        auth = httpx.DigestAuth(*credentials)
        response = client.send(client.build_request("GET", url), auth=auth, stream=True)
    if response.status_code in (401, 403):
        response.close()
        raise SourceError(
            f"refused: wrong or missing credentials (HTTP {response.status_code})",
            permanent=True,
        )
    if response.status_code == 404:
        response.close()
        raise SourceError("not found (HTTP 404): check the path of the URL", permanent=True)
    if response.status_code != 200:
        response.close()
        raise SourceError(f"HTTP {response.status_code} from the camera")
    return response


def _read_bounded(response: httpx.Response, max_bytes: int, deadline_s: float) -> bytes:
    """A snapshot body: identity-encoded, at most max_bytes, complete within deadline_s."""
    try:
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise SourceError(
                f"snapshot sent with Content-Encoding {encoding[:20]}", permanent=True
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise SourceError(f"snapshot of {declared} bytes exceeds {max_bytes}", permanent=True)
        body = bytearray()
        give_up = time.monotonic() + deadline_s
        for chunk in response.iter_raw(65536):
            body += chunk
            if len(body) > max_bytes:
                raise SourceError(f"snapshot larger than {max_bytes} bytes", permanent=True)
            if time.monotonic() > give_up:  # a byte every few seconds is a stall too
                raise SourceError(
                    "stalled: snapshot not complete within stall_timeout_s", stall=True
                )
    finally:
        response.close()
    if not body.startswith(b"\xff\xd8"):
        raise SourceError("snapshot is not a JPEG", permanent=True)
    return bytes(body)


class MjpegError(SourceError):
    """The bytes are not the MJPEG stream the headers promised."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class MjpegParser:
    """Splits a multipart/x-mixed-replace body into JPEGs, with every size bounded.

    Written by hand: no maintained library parses an endless x-mixed-replace stream on the
    client side. Parts with a Content-Length (the ESP32-CAM sends one) are cut by it; others at
    the next boundary. Cameras differ on the dashes around the boundary, so the token itself is
    searched for. Parts that are not JPEGs are counted in `bad_parts` and skipped.
    """

    def __init__(self, boundary: bytes, max_part: int) -> None:
        self.boundary = boundary.lstrip(b"-") or boundary
        self.max_part = max_part
        self.buf = bytearray()
        self.bad_parts = 0
        self._scan = 0  # where to resume looking for the next boundary (no rescans)
        self._synced = False  # a boundary was seen: the stream is multipart as promised

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        while True:
            part = self._next_part()
            if part is None:
                return out
            if part.startswith(b"\xff\xd8"):
                out.append(part)
            else:
                self.bad_parts += 1

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


class MjpegSource:
    """An endless multipart/x-mixed-replace response, cut into JPEG frames as they complete."""

    def __init__(
        self,
        client: httpx.Client,
        response: httpx.Response,
        boundary: bytes,
        max_bytes: int,
        camera: CameraConfig,
    ) -> None:
        self.client = client
        self.response = response
        self.parser = MjpegParser(boundary, max_bytes)
        self.stall_s = camera.stall_timeout_s
        self.info = SourceInfo("mjpeg", "mjpeg")

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        last = time.monotonic()
        for chunk in self.response.iter_raw(65536):
            now = time.monotonic()
            for jpeg in self.parser.feed(chunk):
                last = now
                yield Grab(now, time.time(), 0.0, jpeg=jpeg)
            if stop.is_set():
                return
            if now - last > self.stall_s:  # bytes trickle in but no frame completes
                raise SourceError("stalled: no complete frame within stall_timeout_s", stall=True)

    def close(self) -> None:
        self.response.close()
        self.client.close()


class SnapshotSource:
    """A URL that answers one JPEG per GET, polled at the camera's fps (else max_fps, else 1)."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        credentials: tuple[str, str] | None,
        camera: CameraConfig,
        max_bytes: int,
        first: bytes,
    ) -> None:
        self.client = client
        self.url = url
        self.credentials = credentials
        self.max_bytes = max_bytes
        self.first: bytes | None = first
        rate = camera.fps or camera.options.max_fps or 1.0
        self.interval = 1.0 / rate
        self.stall_s = camera.stall_timeout_s
        self.info = SourceInfo("snapshot", "jpeg", nominal_fps=rate)

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        due = time.monotonic()
        while not stop.is_set():
            if self.first is not None:
                jpeg, self.first = self.first, None
            else:
                response = _get(self.client, self.url, self.credentials)
                jpeg = _read_bounded(response, self.max_bytes, self.stall_s)
            yield Grab(time.monotonic(), time.time(), 0.0, jpeg=jpeg)
            due = max(due + self.interval, time.monotonic())  # never bursts to catch up
            if stop.wait(due - time.monotonic()):
                return

    def close(self) -> None:
        self.client.close()
