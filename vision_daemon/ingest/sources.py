"""Camera sources: open a camera's URL and yield its frames as they arrive (reader threads only).

Every call here blocks, so each camera's reader thread owns one source at a time. A source never
decodes more than it must: MJPEG and snapshot frames stay JPEG bytes (the workers decode the ones
that are analysed), and a PyAV frame is converted to BGR only when `Grab.to_frame` is called
for a frame the reader decided to analyse. Failures are `SourceError`s with one line that holds no
secret; `permanent` ones (wrong credentials, 404, not a video) will not fix themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from vision_daemon.config import CameraConfig
from vision_daemon.ingest.http_sources import (
    MjpegSource as MjpegSource,
)
from vision_daemon.ingest.http_sources import (
    SnapshotSource as SnapshotSource,
)
from vision_daemon.ingest.http_sources import open_http
from vision_daemon.ingest.mjpeg import MAX_PART_HEADER as MAX_PART_HEADER
from vision_daemon.ingest.mjpeg import MAX_PREAMBLE as MAX_PREAMBLE
from vision_daemon.ingest.mjpeg import MjpegError as MjpegError
from vision_daemon.ingest.mjpeg import MjpegParser as MjpegParser
from vision_daemon.ingest.source_types import Grab as Grab
from vision_daemon.ingest.source_types import Source as Source
from vision_daemon.ingest.source_types import SourceError as SourceError
from vision_daemon.ingest.source_types import SourceInfo as SourceInfo
from vision_daemon.ingest.source_types import kind_of as kind_of
from vision_daemon.ingest.source_types import redact_url as redact_url
from vision_daemon.ingest.source_types import scrub as scrub
from vision_daemon.url_policy import PROTOCOLS, UrlPolicy, UrlRefused, file_path

log = logging.getLogger(__name__)


def open_source(
    url: str,
    camera: CameraConfig,
    max_bytes: int,
    keyframes_only: bool,
    stop: threading.Event | None = None,
    policy: UrlPolicy | None = None,
) -> Source:
    """Open `url` for `camera` within the URL `policy` (checked again, host looked up, the
    connection made to the address checked); raises SourceError (one line, no secrets). Setting
    `stop` ends an HTTP open at once."""
    policy = policy or UrlPolicy()
    kind = kind_of(url)
    try:
        if kind == "http":  # each redirect hop is checked and pinned there
            return open_http(url, camera, max_bytes, stop, policy)
        return PyAvSource(policy.resolve(url).url, kind, camera, keyframes_only)
    except UrlRefused as exc:
        raise SourceError(f"refused by the camera URL policy: {exc}", permanent=True) from None
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

        # Only the protocols this kind needs: nothing like concat:, subfile: or a file: entry
        # inside a playlist opens (vision_daemon/url_policy.py).
        options: dict[str, str] = {"protocol_whitelist": PROTOCOLS[kind]}
        fmt: str | None = None
        target = url
        if kind == "rtsp":
            options |= {"rtsp_transport": camera.rtsp_transport, "allowed_media_types": "video"}
        elif kind == "usb":
            fmt, target = "v4l2", f"/dev/video{int(url.split(':', 1)[1] or 0)}"
        else:
            target = file_path(url)
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
