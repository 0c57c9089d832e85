"""The camera fixtures in tests/sources.py, checked with the clients the daemon will use."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import av
import cv2
import httpx
import numpy as np
import pytest

from tests.sources import MjpegServer, RtspServer

pytestmark = pytest.mark.slow  # real sockets, threads and an ffmpeg subprocess

TIMEOUT = httpx.Timeout(3.0)  # a hang fails in seconds, not at the pytest timeout
AV_TIMEOUT = (5.0, 5.0)  # PyAV: open, read
DELIMITER = b"--" + MjpegServer.BOUNDARY.encode() + b"\r\n"


@pytest.fixture(autouse=True)
def no_camera_thread_left() -> Iterator[None]:
    """Every test ends with the servers' threads gone (ffmpeg is reaped by stop() itself)."""
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(("mjpeg-", "rtsp-camera"))]
    assert not left, f"threads left running: {left}"


class PartReader:
    """Reads ESP32-style multipart parts off an httpx response, as a pulling client would."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks: Iterator[bytes] = response.iter_bytes()
        self.buf = b""
        self.parts = 0

    def _until(self, marker: bytes) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            self.buf += next(self.chunks)
        out, self.buf = self.buf[:i], self.buf[i + len(marker) :]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += next(self.chunks)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def part(self) -> tuple[dict[str, str], bytes]:
        """The next part's headers and body; the delimiter before it must be CRLF--boundary."""
        assert self._until(DELIMITER) == b"\r\n", "junk before the multipart delimiter"
        head = self._until(b"\r\n\r\n").decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n"))
        body = self._exactly(int(headers["Content-Length"]))
        self.parts += 1
        return headers, body


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG decoded with OpenCV (fails the test if it is not one)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable JPEG"
    return image


def decode_frames(
    container: av.container.InputContainer, n: int, within: float = 10.0
) -> list[tuple[int, int]]:
    """(width, height) of the next n decoded video frames, failing past `within` s."""
    deadline = time.monotonic() + within
    sizes: list[tuple[int, int]] = []
    for frame in container.decode(video=0):
        sizes.append((frame.width, frame.height))
        if len(sizes) >= n:
            return sizes
        assert time.monotonic() < deadline, f"only {len(sizes)} of {n} frames in {within} s"
    raise AssertionError(f"the stream ended after {len(sizes)} of {n} frames")


def drain(container: av.container.InputContainer, within: float) -> None:
    """Decode until the stream ends or errors, failing if it is still going after `within` s."""
    deadline = time.monotonic() + within
    try:
        for _ in container.decode(video=0):
            assert time.monotonic() < deadline, f"the stream still delivers frames after {within} s"
    except av.FFmpegError:
        pass


# MJPEG (ESP32-CAM)


def test_mjpeg_stream_sends_esp32_multipart_parts() -> None:
    """/stream answers 200 multipart/x-mixed-replace, chunked, with timestamped 640x480 JPEG parts."""
    with MjpegServer(frames=20) as cam, httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("GET", cam.url) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == MjpegServer.CONTENT_TYPE
            assert r.headers["transfer-encoding"] == "chunked"
            reader = PartReader(r)
            for _ in range(3):
                headers, body = reader.part()
                assert headers["Content-Type"] == "image/jpeg"
                assert re.fullmatch(r"\d+\.\d{6}", headers["X-Timestamp"])
                assert abs(float(headers["X-Timestamp"]) - time.time()) < 5
                assert decode_jpeg(body).shape == (480, 640, 3)
                assert body in cam.jpegs
        assert cam.frames_sent >= 3


def test_mjpeg_frames_follow_the_schedule() -> None:
    """Parts arrive no faster than the configured fps (an absolute schedule, not a burst)."""
    with (
        MjpegServer(frames=10, size=(160, 120), fps=20) as cam,
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream("GET", cam.url) as r,
    ):
        reader = PartReader(r)
        reader.part()
        first = time.monotonic()
        for _ in range(10):
            reader.part()
        assert time.monotonic() - first >= 0.4  # 10 slots of 50 ms, minus scheduling slack


def test_mjpeg_capture_returns_one_jpeg() -> None:
    """/capture answers one image/jpeg of the configured size, like the ESP32 snapshot URL."""
    with MjpegServer(frames=5, size=(320, 240)) as cam, httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(cam.capture_url())
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        assert decode_jpeg(r.content).shape == (240, 320, 3)
        assert client.get(cam.url.replace("/stream", "/nothing")).status_code == 404


def test_mjpeg_basic_auth() -> None:
    """With require_auth, missing or wrong credentials get 401 Basic and the right ones the stream."""
    creds = ("admin", "p@ss:word")  # characters that must be percent-encoded in the URL
    with MjpegServer(frames=5, require_auth=creds) as cam, httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(cam.capture_url())
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic realm=")
        assert client.get(cam.capture_url("admin", "wrong")).status_code == 401
        assert client.get(cam.capture_url(*creds)).status_code == 200
        with client.stream("GET", cam.stream_url(*creds)) as r:
            assert r.status_code == 200
            decode_jpeg(PartReader(r).part()[1])


def test_mjpeg_error_modes() -> None:
    """Modes 404, garbage and hang answer as a broken camera would, and ok restores the stream."""
    with MjpegServer(frames=5) as cam, httpx.Client(timeout=TIMEOUT) as client:
        cam.mode = "404"
        assert client.get(cam.url).status_code == 404
        cam.mode = "garbage"
        with client.stream("GET", cam.url) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == MjpegServer.CONTENT_TYPE
            body = b""
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) >= 16384:
                    break
            assert MjpegServer.BOUNDARY.encode() not in body
        cam.mode = "hang"
        with pytest.raises(httpx.ReadTimeout):
            client.get(cam.url, timeout=httpx.Timeout(3.0, read=0.5))
        cam.mode = "ok"
        with client.stream("GET", cam.url) as r:
            decode_jpeg(PartReader(r).part()[1])


def test_mjpeg_hang_mid_stream_stalls_an_open_stream() -> None:
    """Switching to hang while a stream is open stops its parts but keeps the connection."""
    with (
        MjpegServer(frames=5, size=(160, 120)) as cam,
        httpx.Client(timeout=httpx.Timeout(3.0, read=0.5)) as client,
        client.stream("GET", cam.url) as r,
    ):
        reader = PartReader(r)
        reader.part()
        cam.mode = "hang"
        with pytest.raises(httpx.ReadTimeout):
            for _ in range(3):  # at most one part was already on its way
                reader.part()
        assert cam.streams == 1


def test_mjpeg_kill_ends_open_stream_and_revive_serves_same_port() -> None:
    """kill() cuts an open stream and refuses connections; revive() serves again on the same port."""
    with MjpegServer(frames=5) as cam, httpx.Client(timeout=TIMEOUT) as client:
        port = cam.port
        with client.stream("GET", cam.url) as r:
            reader = PartReader(r)
            reader.part()
            started = time.monotonic()
            cam.kill()
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for _ in range(100):
                    reader.part()
            assert time.monotonic() - started < 2.0, "the stream ended by timeout, not by kill()"
        assert not cam.alive and cam.streams == 0
        with pytest.raises(httpx.ConnectError):
            client.get(cam.capture_url())
        cam.revive()
        assert cam.port == port
        with client.stream("GET", cam.url) as r:
            decode_jpeg(PartReader(r).part()[1])


# RTSP (H.264 from ffmpeg)


def test_rtsp_tcp_decodes_640x480() -> None:
    """PyAV over RTSP/TCP-interleaved decodes 30 frames of 640x480."""
    with RtspServer() as cam:
        assert "sprop-parameter-sets=" in cam.sdp and "a=control:trackID=0" in cam.sdp
        with av.open(cam.url, options={"rtsp_transport": "tcp"}, timeout=AV_TIMEOUT) as c:
            assert decode_frames(c, 30) == [(640, 480)] * 30
            assert cam.clients == 1
        assert cam.requests[:4] == ["OPTIONS", "DESCRIBE", "SETUP", "PLAY"]


def test_rtsp_udp_decodes_640x480() -> None:
    """PyAV over RTSP with RTP/UDP unicast decodes 30 frames of 640x480."""
    with (
        RtspServer() as cam,
        av.open(cam.url, options={"rtsp_transport": "udp"}, timeout=AV_TIMEOUT) as c,
    ):
        assert decode_frames(c, 30) == [(640, 480)] * 30
        assert cam.clients == 1


def test_rtsp_basic_auth() -> None:
    """With require_auth, no or wrong credentials fail to open and the right ones decode."""
    with RtspServer(require_auth=("admin", "s3cret")) as cam:
        for url in (cam.url, cam.url_with("admin", "wrong")):
            with pytest.raises(av.error.HTTPUnauthorizedError):
                av.open(url, options={"rtsp_transport": "tcp"}, timeout=AV_TIMEOUT)
        with av.open(
            cam.url_with("admin", "s3cret"), options={"rtsp_transport": "tcp"}, timeout=AV_TIMEOUT
        ) as c:
            assert decode_frames(c, 5) == [(640, 480)] * 5


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_kill_ends_open_reader_and_revive_serves_same_port(transport: str) -> None:
    """kill() ends an open reader at once and refuses opens; after revive() a new open decodes."""
    options = {"rtsp_transport": transport}
    with RtspServer() as cam:
        port = cam.port
        with av.open(cam.url, options=options, timeout=AV_TIMEOUT) as c:
            decode_frames(c, 5)
            started = time.monotonic()
            cam.kill()
            drain(c, within=3.0)  # what was buffered, then end of stream (PyAV sees EOF)
            assert time.monotonic() - started < 3.0
        assert not cam.alive and cam.clients == 0
        with pytest.raises(av.error.ConnectionRefusedError):
            av.open(cam.url, options=options, timeout=AV_TIMEOUT)
        cam.revive()
        assert cam.port == port
        with av.open(cam.url, options=options, timeout=AV_TIMEOUT) as c:
            assert decode_frames(c, 5) == [(640, 480)] * 5
