"""HTTP camera sources: MJPEG (multipart/x-mixed-replace, through a bounded parser) and JPEG
snapshot URLs polled at the camera's rate (httpx; Basic auth, Digest when asked).

Fresh frames (issue 28): the body is read as the socket delivers it (`iter_raw()` with no chunk
size: each read returns what one recv gives, at most 64 KiB), so a frame is handed over as soon
as its last byte arrives, never held until a fixed-size chunk fills. A frame's time is that of
its first byte. A `Deadline` bounds the whole response head (open_timeout_s) and each whole part
or body (stall_timeout_s), so a trickle is a stall. Empty or non-image parts are budgeted: past
MAX_BAD_PARTS in a row the camera fails with that reason and reconnects with backoff.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from vision_daemon.config import CameraConfig
from vision_daemon.deadlines import Deadline
from vision_daemon.ingest.mjpeg import MjpegParser
from vision_daemon.ingest.source_types import (
    Grab,
    Source,
    SourceError,
    SourceInfo,
    split_credentials,
)
from vision_daemon.url_policy import Target, UrlPolicy, UrlRefused

log = logging.getLogger(__name__)


MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Where:
    """What a camera's GET asks for: its URL (no credentials), the credentials, the URL policy
    every hop is checked against, and where the last GET went (`target`, `auth`)."""

    url: str
    credentials: tuple[str, str] | None
    policy: UrlPolicy
    target: Target | None = None
    auth: tuple[str, str] | None = None


# ---- HTTP: MJPEG (multipart/x-mixed-replace) or a JPEG snapshot URL ----------------------------
def open_http(
    url: str,
    camera: CameraConfig,
    max_bytes: int,
    stop: threading.Event | None = None,
    policy: UrlPolicy | None = None,
) -> Source:
    bare, credentials = split_credentials(url)
    where = Where(bare, credentials, policy or UrlPolicy())
    timeout = httpx.Timeout(
        connect=camera.open_timeout_s,
        read=camera.stall_timeout_s,
        write=camera.open_timeout_s,
        pool=camera.open_timeout_s,
    )
    client = httpx.Client(
        timeout=timeout,
        follow_redirects=False,  # followed by _get, each hop checked by the URL policy
        # identity: a compressed body would be inflated past our bounds before we could count it
        headers={"User-Agent": "vision-daemon", "Accept-Encoding": "identity"},
    )
    deadline = Deadline(stop)
    try:
        try:
            response = _get(client, where, deadline, camera.open_timeout_s)
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
            boundary = match.group(1).encode()
            return MjpegSource(client, response, boundary, max_bytes, camera, deadline)
        if ctype.startswith(("image/jpeg", "image/jpg")):
            arrived = (time.monotonic(), time.time())
            first = _read_bounded(response, max_bytes, camera.stall_timeout_s, deadline)
            return SnapshotSource(client, where, camera, max_bytes, (first, *arrived), deadline)
        response.close()
        raise SourceError(
            f"not an MJPEG stream or a JPEG snapshot (Content-Type {ctype[:40] or 'missing'})",
            permanent=True,
        )
    except BaseException:
        deadline.close()
        client.close()
        raise


def _get(client: httpx.Client, where: Where, deadline: Deadline, head_s: float) -> httpx.Response:
    """GET `where.url`, following at most MAX_REDIRECTS redirects, each hop checked by the URL
    policy and connected to the address it checked; credentials go only to the URL's own
    origin. Remembers the final hop in `where` for the next GET (`_get_again`)."""
    url = where.url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            target = where.policy.resolve(url)
        except UrlRefused as exc:
            hop = "a redirect" if url != where.url else "the URL"
            raise SourceError(
                f"{hop} refused by the camera URL policy: {exc}", permanent=True
            ) from None
        same = urlsplit(url)[:2] == urlsplit(where.url)[:2]
        auth = where.credentials if same else None
        response = _get_once(client, target, auth, deadline, head_s)
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location:
            where.target, where.auth = target, auth
            return _checked(response)
        response.close()
        url = urljoin(url, location)
    raise SourceError(f"more than {MAX_REDIRECTS} redirects", permanent=True)


def _get_again(
    client: httpx.Client, where: Where, deadline: Deadline, head_s: float
) -> httpx.Response:
    """The next GET of a snapshot camera: to the hop and address the first GET ended at."""
    if where.target is None:
        return _get(client, where, deadline, head_s)
    return _checked(_get_once(client, where.target, where.auth, deadline, head_s))


def _get_once(
    client: httpx.Client,
    target: Target,
    credentials: tuple[str, str] | None,
    deadline: Deadline,
    head_s: float,
) -> httpx.Response:
    """One GET, streaming; Basic auth first, Digest when the camera asks for it (many do). The
    whole response head must arrive within `head_s`."""
    auth: httpx.Auth | None = httpx.BasicAuth(*credentials) if credentials else None
    response = _send(client, target, auth, deadline, head_s)
    challenge = response.headers.get("www-authenticate", "").lower()
    if response.status_code == 401 and credentials and challenge.startswith("digest"):
        response.close()
        auth = httpx.DigestAuth(*credentials)
        response = _send(client, target, auth, deadline, head_s)
    return response


def _checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a 200; else a one-line SourceError saying what the status means."""
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


def _send(
    client: httpx.Client, target: Target, auth: httpx.Auth | None, deadline: Deadline, head_s: float
) -> httpx.Response:
    headers = {"Host": target.host_header} if target.host_header else None
    request = client.build_request(
        "GET", target.url, headers=headers, extensions={"trace": deadline.trace}
    )
    deadline.expect(head_s)
    try:
        response = client.send(request, auth=auth, stream=True)
    except httpx.TransportError:
        if deadline.fired:
            raise SourceError(
                "stalled: no complete response head within open_timeout_s", stall=True
            ) from None
        raise
    deadline.clear()
    return response


def _read_bounded(
    response: httpx.Response, max_bytes: int, deadline_s: float, deadline: Deadline
) -> bytes:
    """A snapshot body: identity-encoded, at most max_bytes, complete within deadline_s."""
    deadline.expect(deadline_s)
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
        try:
            for chunk in response.iter_raw():  # what each read gives: no waiting for a chunk
                body += chunk
                if len(body) > max_bytes:
                    raise SourceError(f"snapshot larger than {max_bytes} bytes", permanent=True)
        except httpx.TransportError:
            if deadline.fired:  # a byte every few seconds is a stall too
                raise SourceError(
                    "stalled: snapshot not complete within stall_timeout_s", stall=True
                ) from None
            raise
    finally:
        deadline.clear()
        response.close()
    if not body.startswith(b"\xff\xd8"):
        raise SourceError("snapshot is not a JPEG", permanent=True)
    return bytes(body)


class MjpegSource:
    """An endless multipart/x-mixed-replace response, cut into JPEG frames as they complete."""

    def __init__(
        self,
        client: httpx.Client,
        response: httpx.Response,
        boundary: bytes,
        max_bytes: int,
        camera: CameraConfig,
        deadline: Deadline,
    ) -> None:
        self.client = client
        self.response = response
        self.parser = MjpegParser(boundary, max_bytes)
        self.stall_s = camera.stall_timeout_s
        self.deadline = deadline
        self.info = SourceInfo("mjpeg", "mjpeg")

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        self.deadline.stop = stop
        self.deadline.expect(self.stall_s)  # the whole next part, however it trickles in
        try:
            for chunk in self.response.iter_raw():  # what each read gives: frames as they end
                now, wall = time.monotonic(), time.time()
                for jpeg, started in self.parser.feed(chunk, now):
                    self.deadline.expect(self.stall_s)
                    yield Grab(started, wall - (now - started), 0.0, jpeg=jpeg)
                if stop.is_set():
                    return
        except httpx.TransportError:
            if stop.is_set():
                return
            if self.deadline.fired:  # bytes trickle in but no frame completes
                raise SourceError(
                    "stalled: no complete frame within stall_timeout_s", stall=True
                ) from None
            raise

    def close(self) -> None:
        self.deadline.close()
        self.response.close()
        self.client.close()


class SnapshotSource:
    """A URL that answers one JPEG per GET, polled at the camera's fps (else max_fps, else 1)."""

    def __init__(
        self,
        client: httpx.Client,
        where: Where,
        camera: CameraConfig,
        max_bytes: int,
        first: tuple[bytes, float, float],  # the JPEG that told the kind, and when its head came
        deadline: Deadline,
    ) -> None:
        self.client = client
        self.where = where
        self.max_bytes = max_bytes
        self.first: tuple[bytes, float, float] | None = first
        rate = camera.fps or camera.options.max_fps or 1.0
        self.interval = 1.0 / rate
        self.stall_s = camera.stall_timeout_s
        self.open_s = camera.open_timeout_s
        self.deadline = deadline
        self.info = SourceInfo("snapshot", "jpeg", nominal_fps=rate)

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        self.deadline.stop = stop
        due = time.monotonic()
        while not stop.is_set():
            if self.first is not None:
                (jpeg, started, wall), self.first = self.first, None
            else:
                response = _get_again(self.client, self.where, self.deadline, self.open_s)
                started, wall = time.monotonic(), time.time()  # the head has arrived
                jpeg = _read_bounded(response, self.max_bytes, self.stall_s, self.deadline)
            yield Grab(started, wall, 0.0, jpeg=jpeg)
            due = max(due + self.interval, time.monotonic())  # never bursts to catch up
            if stop.wait(due - time.monotonic()):
                return

    def close(self) -> None:
        self.deadline.close()
        self.client.close()
