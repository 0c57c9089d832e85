"""Camera sources: open a camera's URL and yield its frames as they arrive (reader threads only).

Every call here blocks, so each camera's reader thread owns one source at a time. A source never
decodes more than it must: MJPEG and snapshot frames stay JPEG bytes (the workers decode the ones
that are analysed), and a PyAV frame is converted to BGR only when `Grab.to_frame` is called
for a frame the reader decided to analyse. Failures are `SourceError`s with one line that holds no
secret; `permanent` ones (wrong credentials, 404, not a video) will not fix themselves.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx

from vision_daemon.config import CameraConfig
from vision_daemon.protocol import Frame

log = logging.getLogger(__name__)

MAX_PART_HEADER = 8192  # bytes of one multipart part's headers
MAX_PREAMBLE = 65536  # bytes before the first boundary (a real camera sends a CRLF or nothing)
SECRET_PARAMS = re.compile(
    r"user|usr|pas|pwd|pw|token|key|auth|secret|sig|cred|login|sid|session", re.IGNORECASE
)


class SourceError(Exception):
    """A camera could not be opened or read; the message is one line without secrets."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        stall: bool = False,
        invalid_data: bool = False,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.stall = stall
        self.invalid_data = invalid_data  # FFmpeg could not parse what came


# ---- URLs and secrets ----------------------------------------------------------------------------
def kind_of(url: str) -> str:
    """rtsp, http (MJPEG or snapshot, told apart by Content-Type), file or usb."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in ("rtsp", "rtsps"):
        return "rtsp"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "usb":
        return "usb"
    return "file"


def _raw_userinfo(url: str) -> str | None:
    """Everything between "://" and the last "@", as typed: a password may hold an unencoded
    "/", "?" or "#" that a URL parser would take for the path (so this errs on masking more)."""
    start = url.find("://")
    if start < 0:
        return None
    at = url.rfind("@")
    return url[start + 3 : at] if at > start else None


def redact_url(url: str) -> str:
    """The URL without its user:password and with secret-looking query values masked."""
    userinfo = _raw_userinfo(url)
    if userinfo is not None:
        url = url.replace(userinfo + "@", "", 1)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = ("***@" if userinfo is not None else "") + parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, "***" if SECRET_PARAMS.search(k) else v) for k, v in pairs]
        query = urlencode(masked, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def secrets_of(url: str) -> list[str]:
    """Every string in the URL that must never be shown, raw and percent-decoded, longest first:
    the password and secret-looking query values always, the user name from 3 characters."""
    found: set[str] = set()
    userinfo = _raw_userinfo(url)
    if userinfo:
        user, _, password = userinfo.partition(":")
        found.update((userinfo, unquote(userinfo)))
        if password:
            found.update((password, unquote(password)))
        if len(user) >= 3:
            found.update((user, unquote(user)))
    try:
        query = urlsplit(url).query
    except ValueError:
        query = ""
    for k, v in parse_qsl(query, keep_blank_values=True):
        if SECRET_PARAMS.search(k) and v:
            found.update((v, unquote(v)))
    if found:
        found.add(url)
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """One line of `text` (at most 300 characters) with none of the URL's secrets left."""
    line = " ".join(str(text).split())
    line = line.replace(url, redact_url(url))
    for secret in secrets_of(url):
        line = line.replace(secret, "***")
    return line[:300]


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    userinfo = _raw_userinfo(url)
    if userinfo is None:
        return url, None
    user, _, password = userinfo.partition(":")
    return url.replace(userinfo + "@", "", 1), (unquote(user), unquote(password))


# ---- what a source yields -----------------------------------------------------------------------
@dataclass(slots=True)
class Grab:
    """One frame as it left the camera: JPEG bytes, or a decoded PyAV frame converted on demand."""

    captured_at: float  # time.monotonic() when the frame was complete
    wall: float  # time.time() at the same instant (the result's timestamp)
    decode_ms: float  # time spent decoding it in the reader (0 for JPEG: workers decode)
    jpeg: bytes = b""
    video_frame: Any = None  # av.VideoFrame
    reformatter: Any = None  # the source's one av VideoReformatter

    def to_frame(self, stream: str, frame_id: int) -> tuple[Frame, float]:
        """The protocol Frame for the pipeline, and the milliseconds the conversion took."""
        if self.video_frame is None:
            return Frame(stream, frame_id, self.wall, self.jpeg, "jpeg"), 0.0
        t0 = time.perf_counter()
        # One reformatter per source, on this thread: `VideoFrame.to_ndarray(format=...)` builds
        # a scaler per frame with a thread per core (benchmarks/decode_cost.py: 0.35 ms against
        # about 0.1 ms a frame at 640x480).
        bgr = self.reformatter.reformat(self.video_frame, format="bgr24", threads=1)
        pixels = bgr.to_ndarray()
        ms = (time.perf_counter() - t0) * 1000
        return Frame(stream, frame_id, self.wall, b"", "raw", pixels.shape, pixels=pixels), ms


@dataclass(slots=True)
class SourceInfo:
    kind: str  # rtsp, mjpeg, snapshot, file, usb
    codec: str = ""
    width: int = 0
    height: int = 0
    nominal_fps: float = 0.0  # what the stream declares (0 = unknown)
    keyframes_only: bool = False


class Source(Protocol):
    info: SourceInfo

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        """Frames until the stream ends (returns) or fails (raises SourceError)."""
        ...

    def close(self) -> None: ...


def open_source(url: str, camera: CameraConfig, max_bytes: int, keyframes_only: bool) -> Source:
    """Open `url` for `camera`; raises SourceError (one line, no secrets)."""
    kind = kind_of(url)
    try:
        if kind == "http":
            return _open_http(url, camera, max_bytes)
        return PyAvSource(url, kind, camera, keyframes_only)
    except SourceError:
        raise
    except Exception as exc:
        raise source_error(exc, url) from None


def source_error(exc: BaseException, url: str) -> SourceError:
    """A library's exception as one scrubbed line, classified permanent or transient."""
    import av.error

    name = type(exc).__name__
    if isinstance(exc, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError):
        return SourceError("refused: wrong or missing credentials (401/403)", permanent=True)
    if isinstance(exc, av.error.HTTPNotFoundError):
        return SourceError("not found (404): check the path of the URL", permanent=True)
    if isinstance(exc, av.error.FileNotFoundError):
        return SourceError("no such file or device", permanent=True)
    if isinstance(exc, av.error.InvalidDataError):
        return SourceError(
            "not a video stream FFmpeg can read (invalid data)", permanent=True, invalid_data=True
        )
    if isinstance(exc, av.error.ExitError | av.error.TimeoutError | httpx.ReadTimeout):
        return SourceError("stalled: no data within stall_timeout_s", stall=True)
    if isinstance(exc, av.error.ConnectionRefusedError | httpx.ConnectError):
        return SourceError(f"cannot connect ({scrub(str(exc), url)[:120]})")
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return SourceError("no answer within open_timeout_s")
    if isinstance(exc, httpx.TimeoutException):
        return SourceError("timed out", stall=True)
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return SourceError("the camera closed the connection")
    return SourceError(f"{name}: {scrub(str(exc), url)}")


# ---- FFmpeg through PyAV: RTSP(S), files, USB ---------------------------------------------------
class PyAvSource:
    """RTSP, a video file (paced at real time) or a V4L2 device, demuxed and decoded by PyAV."""

    def __init__(self, url: str, kind: str, camera: CameraConfig, keyframes_only: bool) -> None:
        import av
        import av.video.reformatter

        options: dict[str, str] = {}
        fmt: str | None = None
        target = url
        if kind == "rtsp":
            options = {"rtsp_transport": camera.rtsp_transport, "allowed_media_types": "video"}
        elif kind == "usb":
            fmt, target = "v4l2", f"/dev/video{int(url.split(':', 1)[1] or 0)}"
        else:
            target = unquote(urlsplit(url).path) if url.startswith("file://") else url
            if not Path(target).is_file():
                raise SourceError("no such file", permanent=True)
        self.kind = kind
        self.container = av.open(
            target,
            format=fmt,
            options=options,
            timeout=(camera.open_timeout_s, camera.stall_timeout_s),
        )
        if not self.container.streams.video:
            self.container.close()
            raise SourceError("the source has no video stream", permanent=True)
        self.stream = self.container.streams.video[0]
        ctx = self.stream.codec_context
        # One decoder thread is the cheapest per frame (frame threads cost about 40% more CPU
        # and add 2 frames of delay: benchmarks/decode_cost.py); 0 lets FFmpeg choose.
        if camera.decode_threads == 0:
            self.stream.thread_type = "AUTO"
        else:
            ctx.thread_count = camera.decode_threads
        self.reformatter = av.video.reformatter.VideoReformatter()
        if keyframes_only:
            ctx.skip_frame = "NONKEY"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.info = SourceInfo(
            "file" if kind == "file" else kind,
            ctx.name,
            ctx.width,
            ctx.height,
            float(rate) if rate else 0.0,
            keyframes_only,
        )

    def frames(self, stop: threading.Event) -> Iterator[Grab]:
        import av.error

        paced = self.kind == "file"
        base = self.stream.time_base
        start: tuple[float, float] | None = None  # (media seconds, monotonic) of the first frame
        shown = 0
        try:
            for packet in self.container.demux(self.stream):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                decoded = packet.decode()
                ms = (time.perf_counter() - t0) * 1000
                for vf in decoded:
                    if paced:  # by pts; by the declared rate when a frame has none
                        if vf.pts is not None and base is not None:
                            media = float(vf.pts * base)
                        else:
                            media = shown / (self.info.nominal_fps or 25.0)
                        shown += 1
                        if start is None:
                            start = (media, time.monotonic())
                        due = start[1] + media - start[0]
                        if stop.wait(max(0.0, due - time.monotonic())):
                            return
                    yield Grab(
                        time.monotonic(),
                        time.time(),
                        ms / len(decoded),
                        video_frame=vf,
                        reformatter=self.reformatter,
                    )
        except av.error.EOFError:
            return

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass


# ---- HTTP: MJPEG (multipart/x-mixed-replace) or a JPEG snapshot URL ----------------------------
def _open_http(url: str, camera: CameraConfig, max_bytes: int) -> Source:
    bare, credentials = _split_credentials(url)
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
