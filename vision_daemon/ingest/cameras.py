"""Cameras the daemon pulls itself: one reader thread per camera, feeding the same pipeline.

A reader reads at the camera's own speed and never waits on inference. It applies the camera's
skip_frames and max_fps itself (the same `Gate` the pipeline applies to pushed streams), by
capture time, before converting a frame it would drop, and hands the frames it keeps to the event
loop through a one-frame slot: a newer frame replaces one the loop has not taken yet
("superseded"). Every frame read is counted on the camera's stream as received, and ends
processed or dropped with its reason, exactly like a pushed frame.

A lost camera is reopened with exponential backoff (capped, with jitter); nothing a camera does
ends its thread, touches another camera, or holds up start-up. The camera is the stream's `Sink`:
results land here (the latest analysed frame is kept for snapshot.jpg).

Longer than most modules (about 420 lines) because it is one class: the reader thread and the
state it shares with the event loop under one lock (slot, gate, counters, health) stay together,
so every user of that lock is in one file. CameraManager is in camera_manager.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter, deque

from vision_daemon.config import CameraConfig
from vision_daemon.ingest.sources import (
    Grab,
    SourceError,
    SourceInfo,
    kind_of,
    open_source,
    redact_url,
    scrub,
    source_error,
)
from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.masks import Mask
from vision_daemon.outputs import as_image
from vision_daemon.pipeline import Pipeline
from vision_daemon.protocol import Frame, StreamOptions
from vision_daemon.schema import CameraOptionsModel, CameraStats
from vision_daemon.stats import Window
from vision_daemon.streams import Gate
from vision_daemon.url_policy import UrlPolicy

log = logging.getLogger(__name__)

STATES = ("connecting", "streaming", "reconnecting", "stalled", "failed", "stopped")
QUALITY = ("unusable", "poor", "fair", "excellent")
HOUR_S = 3600.0
FLUSH_INTERVAL_S = 0.5  # frames a reader gated are counted on its stream at least this often


class CameraRefused(Exception):
    """A camera that cannot be added (name in use, limit, shutting down); one line."""


def grade(state: str, events_last_hour: int, fps_share: float | None) -> str:
    """Connection quality from reconnects and stalls in the last hour and the share of the
    expected fps delivered (after Frigate's excellent / fair / poor / unusable)."""
    share = 1.0 if fps_share is None else fps_share
    if state != "streaming" or share < 0.5:
        return "unusable"
    if events_last_hour >= 5 or share < 0.8:
        return "poor"
    if events_last_hour >= 1 or share < 0.95:
        return "fair"
    return "excellent"


class Camera:
    """One pulled camera: its reader thread, its health, and the Sink of its stream."""

    def __init__(
        self,
        spec: CameraConfig,
        pipeline: Pipeline,
        loop: asyncio.AbstractEventLoop,
        max_bytes: int,
        window_s: float,
        max_pixels: int = 7680 * 4320,
        policy: UrlPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy or UrlPolicy()  # checked again, host looked up, at every open
        self._max_pixels = max_pixels
        self._seq = 0  # reader thread: the next frame id
        self.name = spec.name
        self.url = spec.substream_url or spec.url  # the stream that is analysed
        self.peer = "camera " + redact_url(self.url)  # a Sink's peer: shown in /stats
        self.rate_advice = False  # the reader keeps its own max_fps (see `advise`)
        self.options = spec.options
        self.keyframes_only = spec.keyframes_only == "on" or (
            spec.keyframes_only == "auto" and 0 < spec.options.max_fps <= 1.0
        )
        self._pipeline = pipeline
        self._loop = loop
        self._max_bytes = max_bytes
        self._gate = Gate(self.options)  # reader thread only
        self._new_gate: Gate | None = None  # an operator's new options, for the reader to take
        self._stop = threading.Event()
        self.closed = False  # set on the event loop: no more submits
        self._lock = threading.Lock()  # guards everything below, shared with the reader
        self._slot: tuple[Frame, float] | None = None
        self._gated: Counter[str] = Counter()
        self._scheduled = False
        self.state = "connecting"
        self.state_since = time.monotonic()
        self.info: SourceInfo | None = None
        self.frames_read = 0
        self.frames_analysed = 0
        self.frame_errors = 0
        self.reconnects = 0
        self.stalls = 0
        self.failed_attempts = 0
        self._ever_streamed = False  # reader thread: a frame came at least once
        self._events: deque[tuple[float, str]] = deque(maxlen=4096)  # (when, reconnect|stall)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_frame_at: float | None = None
        self._read = Window(window_s)
        self._analysed = Window(window_s)
        self._decode = Window(window_s)
        self.last_analysed: Frame | None = None
        self._snapshot_jpeg: tuple[int, tuple[Mask, ...], bytes] | None = None
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._log_limit = RateLimiter(burst=3, period_s=60.0)

    def start(self) -> None:
        self._thread.start()

    # ---- the Sink of the camera's stream (event loop) ---------------------------------------
    def result(self, payload: bytes, frame: Frame) -> bool:
        with self._lock:
            self.frames_analysed += 1
            self._analysed.add(1.0, time.monotonic())
            self.last_analysed = frame
        return True

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        """Counted by the pipeline on the camera's stream; nothing more to do."""

    def error(self, code: str, message: str, frame_id: int | None = None) -> None:
        with self._lock:
            self.frame_errors += 1
            self.last_error = f"frame {frame_id}: {message}"[:300]
            self.last_error_at = time.monotonic()

    def frame_done(self) -> None:
        """Nothing is held per frame outside the pipeline."""

    def advise(self, stream: str, fps: float) -> None:
        """A camera's rate is its max_fps; the reader does not follow advice (yet)."""

    def retune(self, options: StreamOptions) -> None:
        """An operator changed skip_frames or max_fps (PATCH /streams): the reader's gate
        applies them from its next frame."""
        with self._lock:
            self.options = options
            self._new_gate = Gate(options)

    # ---- reader thread -----------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        with self._lock:
            if self.state != state:
                self.state, self.state_since = state, time.monotonic()

    def _run(self) -> None:
        try:
            self._read_forever()
        except Exception:  # a bug here must still leave the camera's state honest
            log.exception("camera %s: the reader thread failed; the camera is stopped", self.name)
        finally:
            self._set_state("stopped")

    def _read_forever(self) -> None:
        spec = self.spec
        delay = spec.retry_initial_s
        lost = False  # the camera streamed and then went away: the next frame is a reconnect
        while not self._stop.is_set():
            streamed = False
            opened_at = time.monotonic()
            first_frame_at: float | None = None
            try:
                source = open_source(
                    self.url, spec, self._max_bytes, self.keyframes_only, self._stop, self.policy
                )
                try:
                    with self._lock:
                        self.info = source.info
                    for grab in source.frames(self._stop):
                        if not streamed:
                            streamed, first_frame_at = True, time.monotonic()
                            self._on_streaming(lost)
                            lost = False
                        self._on_grab(grab)
                        if self._stop.is_set():
                            break
                finally:
                    source.close()
                if self._stop.is_set():
                    break
                if kind_of(self.url) == "file":
                    if spec.loop and streamed:
                        # A pass shorter than a second (one image, frames without times) waits
                        # out the second: a looping file never spins a core.
                        if self._stop.wait(max(0.0, 1.0 - (time.monotonic() - opened_at))):
                            break
                        continue  # starting the file again is not a reconnect
                    with self._lock:  # a file that ends is done: stopped, not failed
                        self.last_error, self.last_error_at = "end of file", time.monotonic()
                    log.info("camera %s: end of file (loop = false): stopped", self.name)
                    break
                raise SourceError("the camera closed the stream")
            except Exception as exc:  # a library's error, or its surprise: never ends the thread
                error = exc if isinstance(exc, SourceError) else source_error(exc, self.url)
                if error.invalid_data and (streamed or self._ever_streamed):
                    error.permanent = False  # bad data from a camera that worked: a glitch
                self._on_error(error, streamed)
                if error.permanent:  # wrong credentials, 404, not a video: no point hurrying
                    delay = spec.retry_max_s
            lost = lost or streamed
            self._ever_streamed = self._ever_streamed or streamed
            # The backoff starts again only after a stream that lasted: a camera that sends one
            # frame and drops the connection is not reopened every retry_initial_s forever.
            if first_frame_at is not None and time.monotonic() - first_frame_at >= max(
                spec.stall_timeout_s, 10.0
            ):
                delay = spec.retry_initial_s
            wait = delay * random.uniform(0.8, 1.2)
            delay = min(delay * 2, spec.retry_max_s)
            if self._stop.wait(wait):
                break

    def _on_streaming(self, reconnected: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if reconnected:
                self.reconnects += 1
                self._events.append((now, "reconnect"))
            self.state, self.state_since = "streaming", now
        log_limited(
            log,
            self._log_limit,
            self.name,
            now,
            logging.INFO,
            "camera %s: streaming from %s%s",
            self.name,
            redact_url(self.url),
            " (reconnected)" if reconnected else "",
        )

    def _on_error(self, exc: SourceError, streamed: bool) -> None:
        now = time.monotonic()
        message = scrub(str(exc), self.url)
        with self._lock:
            self.last_error, self.last_error_at = message, now
            if not streamed:
                self.failed_attempts += 1
            if exc.stall:
                self.stalls += 1
                self._events.append((now, "stall"))
            ever = self._ever_streamed or streamed
            state = (
                "failed"
                if exc.permanent
                else "stalled"
                if exc.stall
                else "reconnecting"
                if ever
                else "connecting"
            )
            if self.state != state:
                self.state, self.state_since = state, now
        log_limited(
            log,
            self._log_limit,
            self.name,
            now,
            logging.WARNING,
            "camera %s: %s (%s)",
            self.name,
            message,
            "will retry" if not self._stop.is_set() else "stopping",
        )

    def _on_grab(self, grab: Grab) -> None:
        """Gate, convert and hand over one frame. It is counted as read in the same locked step
        that records what became of it, and not at all once the camera is closed: every frame
        counted as read reaches the stream as received."""
        now = grab.captured_at
        frame_id, self._seq = self._seq, self._seq + 1
        if self._new_gate is not None:
            with self._lock:
                self._gate, self._new_gate = self._new_gate or self._gate, None
        reason = self._gate.admit(now)
        vf = grab.video_frame
        if reason is None and vf is not None and vf.width * vf.height > self._max_pixels:
            reason = "invalid"  # never converted: the BGR copy alone could be gigabytes
            with self._lock:
                self.frame_errors += 1
                self.last_error = (
                    f"frame {vf.width}x{vf.height} exceeds max_image_pixels={self._max_pixels}"
                )
                self.last_error_at = now
        if reason is not None:
            with self._lock:
                if self.closed:
                    return
                self._count_read(now, grab.decode_ms)
                self._gated[reason] += 1
            return
        frame, convert_ms = grab.to_frame(self.name, frame_id)
        with self._lock:
            if self.closed:
                return
            self._count_read(now, grab.decode_ms + convert_ms)
            if self._slot is not None:
                self._gated["superseded"] += 1
            self._slot = (frame, now)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self.flush)
            except RuntimeError:  # the loop is closed: the daemon is gone
                self._stop.set()

    def _count_read(self, now: float, decode_ms: float) -> None:
        """(with the lock held)"""
        self.frames_read += 1
        self.last_frame_at = now
        self._read.add(1.0, now)
        self._decode.add(decode_ms, now)

    # ---- event loop --------------------------------------------------------------------------
    def flush(self, final: bool = False) -> None:
        """Hand what the reader left to the pipeline: gated counts, then the waiting frame.
        With `final`, the camera closes in the same locked step (nothing is left behind)."""
        with self._lock:
            if self.closed:
                return
            slot, gated = self._slot, self._gated
            self._slot, self._gated, self._scheduled = None, Counter(), False
            self.closed = final
        if gated:
            self._pipeline.count_gated(self, self.name, self.options, dict(gated))
        if slot is not None:
            frame, captured_at = slot
            self._pipeline.submit(self, frame, self.options, captured_at=captured_at, gated=True)

    def stop(self, reason: str = "disconnected") -> None:
        """Stop reading (the thread ends within a frame or a timeout) and leave the pipeline;
        frames still queued drop with `reason`."""
        self._stop.set()
        if not self.closed:
            self.flush(final=True)
            self._pipeline.detach(self, reason)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    async def snapshot_jpeg(self) -> bytes | None:
        """The latest analysed frame as a JPEG (encoded once per frame, off the event loop)."""
        with self._lock:
            frame, cached = self.last_analysed, self._snapshot_jpeg
        if frame is None:
            return None
        masks = self._pipeline.masks.get(self.name)  # privacy masks: blacked out here too
        if cached is not None and cached[:2] == (frame.frame_id, masks):
            return cached[2]
        body, _ = await as_image(frame, masks)  # MJPEG, snapshot: the camera's own JPEG if unmasked
        with self._lock:
            self._snapshot_jpeg = (frame.frame_id, masks, body)
        return body

    def health(self, now: float) -> CameraStats:
        """What /cameras shows: state, rates, reconnects, stalls, errors, quality."""
        with self._lock:
            while self._events and now - self._events[0][0] > HOUR_S:
                self._events.popleft()
            reconnects_h = sum(1 for _, kind in self._events if kind == "reconnect")
            stalls_h = len(self._events) - reconnects_h
            source_fps = self._read.rate(now)
            info = self.info
            expected = self.spec.fps or (info.nominal_fps if info else 0.0)
            if info is not None and info.keyframes_only:
                expected = 0.0  # keyframes arrive at the GOP rate, not the camera's fps
            share = (
                min(1.0, source_fps / expected)
                if expected > 0 and now - self.state_since >= self._read.span
                else None
            )
            decode = self._decode.percentiles(now)
            return CameraStats(
                name=self.name,
                url=redact_url(self.spec.url),
                substream_url=redact_url(self.spec.substream_url)
                if self.spec.substream_url
                else None,
                source=info.kind if info else kind_of(self.url),
                codec=info.codec if info else None,
                width=info.width if info else None,
                height=info.height if info else None,
                keyframes_only=bool(info and info.keyframes_only),
                state=self.state,
                state_for_s=round(now - self.state_since, 1),
                expected_fps=round(expected, 2) if expected else None,
                source_fps=source_fps,
                analysed_fps=self._analysed.rate(now),
                frames_read=self.frames_read,
                frames_analysed=self.frames_analysed,
                frame_errors=self.frame_errors,
                reconnects=self.reconnects,
                reconnects_last_hour=reconnects_h,
                stalls=self.stalls,
                stalls_last_hour=stalls_h,
                failed_attempts=self.failed_attempts,
                last_frame_age_s=(
                    None if self.last_frame_at is None else round(now - self.last_frame_at, 3)
                ),
                last_error=self.last_error,
                last_error_age_s=(
                    None if self.last_error_at is None else round(now - self.last_error_at, 1)
                ),
                decode_ms=decode["mean"],
                quality=grade(self.state, reconnects_h + stalls_h, share),
                options=CameraOptionsModel(
                    **self.options.to_dict(),
                    rtsp_transport=self.spec.rtsp_transport,
                    keyframes_only=self.spec.keyframes_only,
                    decode_threads=self.spec.decode_threads,
                    loop=self.spec.loop,
                    stall_timeout_s=self.spec.stall_timeout_s,
                ),
            )
