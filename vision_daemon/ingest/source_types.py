"""What every camera source shares: the one-line `SourceError`, a camera URL's kind and its
secrets (redaction and scrubbing), and what a source yields (`Grab`, `SourceInfo`, `Source`)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from vision_daemon.protocol import Frame

log = logging.getLogger(__name__)

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


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
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
