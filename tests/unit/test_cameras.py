"""Pulled cameras' pure parts: MJPEG parsing, secrets kept out of text, grading, config, gating."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import jpeg
from tests.unit.test_policies import FakeSink, accounted, make_pipeline
from vision_daemon import protocol as p
from vision_daemon.config import (
    CameraConfig,
    ConfigError,
    camera_config,
    camera_from_dict,
    camera_from_flag,
    load_config,
)
from vision_daemon.ingest import cameras
from vision_daemon.ingest.cameras import Camera, grade
from vision_daemon.ingest.mjpeg import MAX_BAD_PARTS
from vision_daemon.ingest.sources import (
    MAX_PART_HEADER,
    MAX_PREAMBLE,
    Grab,
    MjpegError,
    MjpegParser,
    SourceInfo,
    redact_url,
    scrub,
)
from vision_daemon.pipeline import Pipeline

BOUNDARY = b"123456789000000000000987654321"


def esp32_part(body: bytes, length: bool = True) -> bytes:
    """One part as the ESP32-CAM CameraWebServer sends it."""
    head = b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"X-Timestamp: 1.2\r\n\r\n" + body + b"\r\n"


@pytest.mark.parametrize("length", [True, False])
def test_mjpeg_parser_cuts_parts_with_and_without_content_length(length: bool) -> None:
    """Three parts, with or without Content-Length, come out as the three JPEGs."""
    frames = [jpeg(value=v) for v in (10, 20, 30)]
    stream = b"".join(esp32_part(f, length) for f in frames) + b"--" + BOUNDARY
    parser = MjpegParser(BOUNDARY, 1 << 20)
    assert [jpeg for jpeg, _ in parser.feed(stream)] == frames
    assert parser.bad_parts == 0


@given(cuts=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40))
def test_mjpeg_parser_does_not_care_how_bytes_are_chunked(cuts: list[int]) -> None:
    """However the network splits the stream, the same frames come out, in order."""
    frames = [jpeg(60, 80, value=v) for v in (1, 2, 3, 4)]
    stream = b"".join(esp32_part(f, length=bool(i % 2)) for i, f in enumerate(frames))
    stream += b"--" + BOUNDARY
    parser = MjpegParser(BOUNDARY, 1 << 20)
    out: list[bytes] = []
    pos = 0
    for cut in cuts * 100:
        if pos >= len(stream):
            break
        out += [jpeg for jpeg, _ in parser.feed(stream[pos : pos + cut])]
        pos += cut
    out += [jpeg for jpeg, _ in parser.feed(stream[pos:])]
    assert out == frames


def test_mjpeg_parser_refuses_garbage_and_oversized_parts_within_its_bound() -> None:
    """Bytes with no boundary (before the first part, or after one), a part over the limit, and
    endless headers each raise, having held no more than their bound."""
    parser = MjpegParser(BOUNDARY, 1 << 20)
    with pytest.raises(MjpegError, match="no multipart boundary"):
        for _ in range(100):
            parser.feed(b"\x00garbage" * 500)
    assert len(parser.buf) <= MAX_PREAMBLE + 4500  # refused long before max_part
    parser = MjpegParser(BOUNDARY, 10_000)
    assert parser.feed(esp32_part(jpeg(60, 80))) != []
    with pytest.raises(MjpegError, match="no multipart boundary"):
        for _ in range(100):
            parser.feed(b"\x00garbage" * 500)
    assert len(parser.buf) <= 10_000 + MAX_PART_HEADER + 4500
    with pytest.raises(MjpegError, match="exceeds"):
        MjpegParser(BOUNDARY, 1000).feed(esp32_part(b"\xff\xd8" + b"x" * 2000))
    with pytest.raises(MjpegError, match="headers longer"):
        MjpegParser(BOUNDARY, 1000).feed(b"--" + BOUNDARY + b"\r\nX: " + b"y" * 9000)


def test_mjpeg_parser_skips_parts_that_are_not_jpeg() -> None:
    """A text part in the stream is counted and skipped; the JPEG after it comes out."""
    good = jpeg()
    parser = MjpegParser(BOUNDARY, 1 << 20)
    assert parser.feed(esp32_part(b"hello") + esp32_part(good)) == [(good, 0.0)]
    assert parser.bad_parts == 1


@pytest.mark.parametrize(
    ("url", "secrets", "host"),
    [
        (
            "rtsp://admin:s3cr%40t@10.0.0.5:554/Streaming/Channels/101",
            ["admin", "s3cr%40t", "s3cr@t"],
            "10.0.0.5:554",
        ),
        (
            "http://viewer:hunter22@cam.local/video.cgi?res=640x480",
            ["viewer", "hunter22"],
            "cam.local",
        ),
        (
            "http://cam.local/snapshot.cgi?user=admin&pwd=hunter22&chn=1",
            ["admin", "hunter22"],
            "cam.local",
        ),
        ("https://cam.local/mjpg?token=abc123def", ["abc123def"], "cam.local"),
    ],
)
def test_redacted_urls_and_scrubbed_errors_hold_no_secret(
    url: str, secrets: list[str], host: str
) -> None:
    """User, password and secret-looking query values never survive redaction or scrubbing."""
    shown = redact_url(url)
    error = f"Connection refused: '{url}' (user {secrets[0]}, password {secrets[-1]})\nline two"
    line = scrub(error, url)
    for text in (shown, line):
        assert not [s for s in secrets if s in text], text
    assert "\n" not in line and host in shown and host in line


def test_grade_follows_reconnects_stalls_and_fps_share() -> None:
    """Excellent when steady; fair, poor, unusable as events grow or fps falls short."""
    assert grade("streaming", 0, 1.0) == "excellent"
    assert grade("streaming", 0, None) == "excellent"
    assert grade("streaming", 1, 1.0) == "fair"
    assert grade("streaming", 0, 0.9) == "fair"
    assert grade("streaming", 5, 1.0) == "poor"
    assert grade("streaming", 0, 0.6) == "poor"
    assert grade("streaming", 0, 0.3) == "unusable"
    assert grade("reconnecting", 0, 1.0) == "unusable"


def test_camera_config_from_toml_flags_and_json(tmp_path: object) -> None:
    """[[cameras]] tables, --camera NAME=URL and JSON bodies build the same checked settings."""
    c = camera_from_dict({"name": "door", "url": "rtsp://h/s", "max_fps": 2, "loop": "true"})
    assert (c.options.max_fps, c.loop, c.rtsp_transport) == (2.0, True, "tcp")
    assert camera_from_flag("yard=http://cam/stream").url == "http://cam/stream"
    y = camera_from_flag("y=usb:0")
    cfg = load_config(overrides={"cameras": [c, y]}, environ={})
    assert [x.name for x in cfg.cameras] == ["door", "y"]
    for bad, message in [
        ({"name": "a b", "url": "rtsp://h"}, "name must be"),
        ({"name": "a", "url": "ftp://h/x"}, "url must be"),
        ({"name": "a", "url": "rtsp://h", "rtsp_transport": "sctp"}, "tcp or udp"),
        ({"name": "a", "url": "rtsp://h", "colour": "red"}, "unknown setting 'colour'"),
        ({"name": "a", "url": "rtsp://h", "max_fps": "fast"}, "max_fps must be a number"),
        ({"name": "a"}, "url is required"),
        ("rtsp://h", "must be a table"),
    ]:
        with pytest.raises(ConfigError, match=message):
            camera_from_dict(bad)
    with pytest.raises(ConfigError, match="NAME=URL"):
        camera_from_flag("no-equals-sign")
    with pytest.raises(ConfigError, match="same name"):
        load_config(overrides={"cameras": [c, c]}, environ={})


def test_gated_frames_are_received_and_dropped_with_their_reason() -> None:
    """What a camera's reader does not hand on is counted on its stream: the accounting holds."""
    pipe, _, _, _ = make_pipeline()
    sink = FakeSink("camera rtsp://***@h/s")
    options = p.StreamOptions(skip_frames=1, max_fps=5.0)
    pipe.count_gated(sink, "door", options, {"throttled": 5, "superseded": 2})
    frame = p.Frame("door", 7, 0.0, jpeg(), "jpeg")
    pipe.submit(sink, frame, options, captured_at=-1.0, gated=True)
    stream = pipe.streams["door"]
    assert pipe.totals.received == 8 and stream.counts.received == 8
    assert stream.counts.dropped["throttled"] == 5 and stream.counts.dropped["superseded"] == 2
    assert len(stream.queue) == 1  # gated=True: the pipeline does not throttle it a second time
    assert stream.queue[0].received_at == -1.0  # latency counts from capture
    assert accounted(pipe)


# ---- a Camera driven by a fake source the test controls -----------------------------------------
class FakeSource:
    """Yields `frames` JPEG grabs `every` seconds apart (forever when frames is None), then ends."""

    opens = 0

    def __init__(self, frames: int | None, every: float) -> None:
        FakeSource.opens += 1
        self.frames, self.every = frames, every
        self.info = SourceInfo("mjpeg", "mjpeg")

    def frames_iter(self, stop: threading.Event) -> Iterator[Grab]:
        n = 0
        while self.frames is None or n < self.frames:
            if stop.wait(self.every):
                return
            n += 1
            yield Grab(time.monotonic(), time.time(), 0.0, jpeg=b"\xff\xd8fake")

    def close(self) -> None:
        pass


def run_camera(
    monkeypatch: pytest.MonkeyPatch,
    spec: CameraConfig,
    frames: int | None,
    every: float,
    seconds: float,
) -> tuple[Camera, Pipeline]:
    """Start a Camera on a fake source for `seconds`, stop it, let the loop settle."""
    FakeSource.opens = 0

    def fake_open(
        url: str,
        camera: CameraConfig,
        max_bytes: int,
        keyframes: bool,
        stop: Any = None,
        policy: Any = None,
    ) -> Any:
        source = FakeSource(frames, every)
        source.frames = frames  # type: ignore[assignment]
        return type(
            "S", (), {"info": source.info, "frames": source.frames_iter, "close": source.close}
        )()

    monkeypatch.setattr(cameras, "open_source", fake_open)
    pipe, _, _, _ = make_pipeline()
    pipe.clock = time.monotonic  # the camera stamps frames with the real clock

    async def main() -> Camera:
        cam = Camera(spec, pipe, asyncio.get_running_loop(), 1 << 20, 10.0)
        assert pipe.attach(cam, spec.name, cam.options) is None
        cam.start()
        await asyncio.sleep(seconds)
        cam.stop()
        cam.join(2.0)
        await asyncio.sleep(0)  # callbacks the reader scheduled run now (and find it closed)
        return cam

    return asyncio.run(main()), pipe


def test_every_frame_a_camera_counts_as_read_is_received_on_its_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped mid-stream, the camera's frames read equal its stream's received, exactly."""
    spec = camera_config(name="fake", url="http://cam/stream", max_fps=50)
    cam, pipe = run_camera(monkeypatch, spec, None, 0.001, 0.5)
    received = pipe.streams["fake"].counts.received
    assert cam.frames_read > 50 and cam.frames_read == received
    assert accounted(pipe) and not cam._thread.is_alive() and cam.state == "stopped"


def test_a_camera_that_drops_after_one_frame_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera that sends one frame and closes is not reopened every retry_initial_s: the
    backoff only starts again after a stream that lasted."""
    spec = camera_config(name="flap", url="http://cam/stream", retry_initial_s=0.05, retry_max_s=5)
    cam, _ = run_camera(monkeypatch, spec, 1, 0.001, 1.5)
    assert 3 <= FakeSource.opens <= 7  # 0, .05, .1, .2, .4, .8 (+-20%); 30 if it reset each time
    assert cam.reconnects >= 2 and cam.state == "stopped"


def test_a_looping_one_frame_file_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A looping file whose pass takes no time (one image) starts again once a second, not in
    a tight loop."""
    spec = camera_config(name="still", url="/tmp/still.jpg", loop=True, max_fps=0)
    cam, _ = run_camera(monkeypatch, spec, 1, 0.0, 1.5)
    assert FakeSource.opens <= 3 and cam.frames_read <= 3 and cam.reconnects == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"retry_initial_s": float("inf")},
        {"retry_max_s": 1e12},
        {"stall_timeout_s": float("nan")},
        {"fps": 1e-300},
        {"max_fps": 1e9},
    ],
)
def test_camera_timeouts_and_rates_must_be_finite_and_bounded(bad: dict[str, float]) -> None:
    """Infinite, huge or vanishing times and rates are refused (they would end the reader)."""
    with pytest.raises(ConfigError):
        camera_from_dict({"name": "a", "url": "rtsp://h/s", **bad})


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("rtsp://admin:p/ss@10.0.0.5/s", ["p/ss", "admin:p"]),
        ("rtsp://admin:pa#ss@10.0.0.5/s", ["pa#ss", "admin:pa"]),
        ("rtsp://admin:p?ss@10.0.0.5/s", ["p?ss", "admin:p"]),
        ("http://cam/videostream.cgi?loginuse=admin&loginpas=hunter22", ["hunter22", "admin"]),
        ("http://cam/snap.jpg?pw=hunter22", ["hunter22"]),
    ],
)
def test_odd_passwords_and_camera_query_keys_are_masked(url: str, secrets: list[str]) -> None:
    """Passwords with unencoded / ? # and the query keys cheap cameras use never show."""
    for text in (redact_url(url), scrub(f"failed: {url}", url)):
        assert not [s for s in secrets if s in text], text


def test_camera_flag_errors_never_echo_the_argument() -> None:
    """--camera with a URL where NAME=URL belongs says how to write it, without repeating it."""
    for text in ("rtsp://admin:hunter22@h/s", "rtsp://admin:hunter22@h/s?x=1"):
        with pytest.raises(ConfigError) as err:
            camera_from_flag(text)
        assert "hunter22" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        camera_from_dict({"name": "rtsp://admin:hunter22@h", "url": "rtsp://h/s"})
    assert "hunter22" not in str(err.value)


def test_mjpeg_parser_stamps_each_jpeg_with_its_first_byte() -> None:
    """A part fed in three reads at t=1, 2, 3 is stamped 1; the next, begun in the same read
    that ended the first, is stamped with that read's time."""
    a, b = esp32_part(jpeg(value=10)), esp32_part(jpeg(value=20))
    parser = MjpegParser(BOUNDARY, 1 << 20)
    third = len(a) // 3
    assert parser.feed(a[:third], 1.0) == []
    assert parser.feed(a[third : 2 * third], 2.0) == []
    out = parser.feed(a[2 * third :] + b[:10], 3.0)
    assert [t for _, t in out] == [1.0]
    out = parser.feed(b[10:] + b"--" + BOUNDARY, 4.0)
    assert [t for _, t in out] == [3.0]


def test_mjpeg_parser_gives_up_after_too_many_empty_parts_in_a_row() -> None:
    """Empty parts are budgeted: MAX_BAD_PARTS in a row pass, one more ends the stream; a JPEG
    in between starts the count again."""
    empty = b"--" + BOUNDARY + b"\r\n\r\n"
    parser = MjpegParser(BOUNDARY, 1 << 20)
    parser.feed(empty * MAX_BAD_PARTS + esp32_part(jpeg(60, 80)) + empty * MAX_BAD_PARTS)
    with pytest.raises(MjpegError, match="empty or non-image parts in a row"):
        parser.feed(empty * 3)
