"""Cameras that tests start themselves: an ESP32-CAM-like MJPEG server and an H.264 RTSP server.

Both bind 127.0.0.1 port 0, keep that port across kill() and revive(), and end everything they
started on stop() or when their `with` block ends, also when the test fails:

    with MjpegServer(frames=60) as cam:  # cam.url, cam.capture_url(), cam.mode = "hang", cam.kill()
        ...
    with RtspServer(require_auth=("admin", "pw")) as cam:  # cam.url_with("admin", "pw")
        ...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import secrets
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote, urlsplit

import cv2
import pytest

__all__ = ["VIDEO", "MjpegServer", "Mode", "RtspServer", "jpeg_frames", "wait_until"]

VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vtest.avi"

# ok: frames at fps; 404; garbage: bytes with no boundary; hang: silent, connection open;
# trickle_head: the response head at 1 byte every 0.5 s; trickle_part: a part (or a /capture
# body) at 1 byte a second; flood: boundary "a", thousands of empty parts and one JPEG a second
Mode = Literal["ok", "404", "garbage", "hang", "trickle_head", "trickle_part", "flood"]
T = TypeVar("T")


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until it holds, failing the test after `timeout` s (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _require_video(video: Path) -> None:
    """Skip the test in one line when the shared video is missing."""
    if not video.is_file():
        pytest.skip(f"{video} not found: the camera fixtures stream the shared vtest.avi")


@functools.lru_cache(maxsize=2)
def jpeg_frames(
    video: Path = VIDEO,
    size: tuple[int, int] = (640, 480),
    count: int | None = None,
    quality: int = 80,
) -> tuple[bytes, ...]:
    """The first `count` frames of `video` (all when None), resized to `size`, JPEG-encoded once."""
    cap = cv2.VideoCapture(str(video))
    frames: list[bytes] = []
    try:
        while count is None or len(frames) < count:
            ok, image = cap.read()
            if not ok:
                break
            if (image.shape[1], image.shape[0]) != size:
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:
                frames.append(buf.tobytes())
    finally:
        cap.release()
    if not frames:
        raise RuntimeError(f"no frames could be read from {video}")
    return tuple(frames)


def _basic_auth_ok(header: str | None, creds: tuple[str, str]) -> bool:
    """Whether an Authorization header carries exactly these Basic credentials."""
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        user, sep, password = (
            base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        return False
    return (
        bool(sep)
        and secrets.compare_digest(user.encode(), creds[0].encode())
        and secrets.compare_digest(password.encode(), creds[1].encode())
    )


def _userinfo(user: str | None, password: str | None) -> str:
    """`user:password@` for a URL, percent-encoded; empty without a user."""
    if user is None:
        return ""
    secret = "" if password is None else ":" + quote(password, safe="")
    return f"{quote(user, safe='')}{secret}@"


# --------------------------------------------------------------------------------------------
# MJPEG over HTTP, shaped like the ESP32-CAM CameraWebServer sketch (app_httpd.cpp)
# --------------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    """One listening life of an MjpegServer, from start() or revive() to kill()."""

    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR: revive() binds the same port again at once

    def __init__(self, camera: MjpegServer, address: tuple[str, int]) -> None:
        self.camera = camera
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        super().__init__(address, _MjpegHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track each connection and its thread so kill() can end them all."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"mjpeg-{self.server_port}-conn",
            daemon=True,
        )
        with self.lock:
            self.conns.add(request)
            self.threads = [t for t in self.threads if t.is_alive()]
            self.threads.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        """Forget a connection once its handler is done with it."""
        with self.lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def kill(self, join_s: float = 5.0) -> None:
        """Stop accepting, cut every open connection, close the listener, join the handlers."""
        self.shutdown()  # serve_forever returns: no process_request after this line
        self.killed.set()
        with self.lock:
            conns, threads = list(self.conns), list(self.threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in send or recv
            except OSError:
                pass
        self.server_close()
        for thread in threads:
            thread.join(join_s)


class _MjpegHandler(BaseHTTPRequestHandler):
    """GET /stream and GET /capture as the ESP32 answers them, bent by the camera's mode."""

    server: _HttpServer
    protocol_version = "HTTP/1.1"  # chunked responses, like esp_http_server
    server_version = "esp32-cam-test"
    sys_version = ""
    timeout = 10  # a client that stops reading for this long is dropped, as a camera would

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        """Route by path after applying the mode and the credentials check."""
        cam = self.server.camera
        path = urlsplit(self.path).path
        if cam.mode == "hang":
            self.close_connection = True
            self.server.killed.wait()  # accepted, read, never answered
            return
        if cam.mode == "trickle_head":
            self.close_connection = True
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" * 100, 0.5)
            return
        if cam.mode == "404" or path not in ("/stream", "/capture"):
            self._plain(404, "This URI does not exist")
            return
        if cam.require_auth is not None and not _basic_auth_ok(
            self.headers.get("Authorization"), cam.require_auth
        ):
            self._plain(401, "Unauthorized", {"WWW-Authenticate": f'Basic realm="{cam.realm}"'})
            return
        if path == "/capture":
            self._capture()
        else:
            self._stream()

    def _plain(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes, every_s: float, chunked: bool = False) -> None:
        """Write `data` one byte every `every_s` (each its own chunk when `chunked`) until done,
        killed, or the client goes."""
        killed = self.server.killed
        try:
            for i in range(len(data)):
                byte = data[i : i + 1]
                self.wfile.write(b"1\r\n%b\r\n" % byte if chunked else byte)
                if killed.wait(every_s):
                    return
        except OSError:
            pass  # the client gave up: what a trickle test wants

    def _capture(self) -> None:
        cam = self.server.camera
        if cam.mode == "trickle_part":
            self.close_connection = True
            body = cam._frame_at(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._trickle(body, 1.0)
            return
        body = os.urandom(4096) if cam.mode == "garbage" else cam._frame_at(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Disposition", "inline; filename=capture.jpg")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("X-Timestamp", _timestamp())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send(self, data: bytes) -> None:
        """One httpd_resp_send_chunk: a chunk of the chunked body (or raw bytes)."""
        if self.server.camera.chunked:
            data = b"%X\r\n%b\r\n" % (len(data), data)
        self.wfile.write(data)

    def _stream(self) -> None:
        cam = self.server.camera
        killed = self.server.killed
        self.close_connection = True
        self.send_response(200)
        flood = cam.mode == "flood"
        self.send_header(
            "Content-Type", "multipart/x-mixed-replace;boundary=a" if flood else cam.CONTENT_TYPE
        )
        if cam.chunked and not flood:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("X-Framerate", "60")  # the sketch always says 60
        self.end_headers()
        period = 1.0 / cam.fps
        due = time.monotonic()
        cam._streams_delta(+1)
        try:
            while not killed.is_set():
                delay = due - time.monotonic()
                if delay > 0 and killed.wait(delay):
                    break
                mode = cam.mode
                if mode == "404":
                    break  # a status cannot change mid-response: the camera drops the stream
                if mode == "garbage":
                    self._send(_garbage(4096))
                elif mode == "flood":
                    self._flood(killed)
                    break
                elif mode == "trickle_part":
                    jpeg = cam._frame_at(due)
                    self._send(_PART_BOUNDARY + _PART_HEADER % (len(jpeg), _timestamp().encode()))
                    self._trickle(jpeg, 1.0, chunked=cam.chunked)
                    break
                elif mode == "ok":
                    jpeg = cam._frame_at(due)
                    cam._sending(time.time())
                    self._send(_PART_BOUNDARY)
                    self._send(_PART_HEADER % (len(jpeg), _timestamp().encode()))
                    self._send(jpeg)
                    cam._count_frame()
                # mode "hang": the stream stalls, the connection stays open
                due += period  # absolute schedule: no drift
                behind = time.monotonic() - due
                if behind > period:  # a slow reader: skip the missed slots, stay on the grid
                    due += period * (behind // period)
        except OSError:
            pass  # the client went away, or kill() cut the connection
        finally:
            cam._streams_delta(-1)

    def _flood(self, killed: threading.Event) -> None:
        """Empty parts as fast as the client reads them, and one real JPEG part a second."""
        empties = b"--a\r\n\r\n" * 4096
        next_jpeg = time.monotonic()
        while not killed.is_set():
            if time.monotonic() >= next_jpeg:
                jpeg = self.server.camera._jpegs[0]
                self.wfile.write(b"--a\r\nContent-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n")
                next_jpeg += 1.0
            self.wfile.write(empties)


_BOUNDARY = "123456789000000000000987654321"
_PART_BOUNDARY = b"\r\n--" + _BOUNDARY.encode() + b"\r\n"
_PART_HEADER = b"Content-Type: image/jpeg\r\nContent-Length: %d\r\nX-Timestamp: %b\r\n\r\n"


def _timestamp() -> str:
    """Wall-clock `secs.usecs`, the X-Timestamp format of the sketch."""
    now = time.time_ns() // 1000
    return f"{now // 1_000_000}.{now % 1_000_000:06d}"


def _garbage(size: int) -> bytes:
    """Random bytes that cannot contain the multipart boundary."""
    while True:
        data = os.urandom(size)
        if _BOUNDARY.encode() not in data:
            return data


class MjpegServer:
    """An ESP32-CAM-like HTTP camera on 127.0.0.1: /stream (multipart MJPEG) and /capture."""

    BOUNDARY = _BOUNDARY
    CONTENT_TYPE = "multipart/x-mixed-replace;boundary=" + _BOUNDARY

    def __init__(
        self,
        video: Path = VIDEO,
        *,
        size: tuple[int, int] = (640, 480),
        fps: float = 30.0,
        frames: int | None = None,
        quality: int = 80,
        require_auth: tuple[str, str] | None = None,
        mode: Mode = "ok",
        chunked: bool = True,
        realm: str = "esp32cam",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.video = video
        self.size = size
        self.fps = fps
        self.frames = frames
        self.quality = quality
        self.require_auth = require_auth
        self.mode: Mode = mode
        self.chunked = chunked
        self.realm = realm
        self.host = host
        self._port = port
        self._jpegs: tuple[bytes, ...] = ()
        self._t0 = 0.0
        self._httpd: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._frames_sent = 0
        self._streams = 0
        self.sent_at: list[float] = []  # time.time() as each "ok" part's first byte is written

    # lifecycle

    def start(self) -> Self:
        """Encode the frames (cached per video, size, count, quality) and start listening."""
        _require_video(self.video)
        self._jpegs = jpeg_frames(self.video, self.size, self.frames, self.quality)
        self._t0 = time.monotonic()
        self._listen()
        return self

    def kill(self) -> None:
        """Lose power: close the listener and every open response at once; the port is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.kill()
        if self._serve_thread is not None:
            self._serve_thread.join(5)
            self._serve_thread = None

    def revive(self) -> None:
        """Power back on: listen again on the same port (no-op while alive)."""
        if self._httpd is None:
            self._listen()

    def stop(self) -> None:
        """End everything; safe to call twice."""
        self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _listen(self) -> None:
        httpd = _HttpServer(self, (self.host, self._port))
        self._port = httpd.server_port
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name=f"mjpeg-{self._port}", daemon=True
        )
        self._serve_thread.start()

    # what tests read

    @property
    def port(self) -> int:
        """The TCP port, fixed from start() on."""
        return self._port

    @property
    def alive(self) -> bool:
        """Whether the server is listening (started and not killed)."""
        return self._httpd is not None

    @property
    def url(self) -> str:
        """The stream URL without credentials."""
        return self.stream_url()

    def stream_url(self, user: str | None = None, password: str | None = None) -> str:
        """http://[user:password@]127.0.0.1:<port>/stream."""
        return f"http://{_userinfo(user, password)}{self.host}:{self._port}/stream"

    def capture_url(self, user: str | None = None, password: str | None = None) -> str:
        """http://[user:password@]127.0.0.1:<port>/capture, the ESP32 snapshot URL."""
        return f"http://{_userinfo(user, password)}{self.host}:{self._port}/capture"

    @property
    def jpegs(self) -> tuple[bytes, ...]:
        """The cached JPEGs the server loops over, in order."""
        return self._jpegs

    @property
    def frames_sent(self) -> int:
        """Multipart JPEG parts written, over all streams since start()."""
        return self._frames_sent

    @property
    def streams(self) -> int:
        """Open /stream responses now."""
        return self._streams

    # used by the handler threads

    def _frame_at(self, due: float) -> bytes:
        """The frame of the slot due at monotonic time `due`: every client sees the same one."""
        return self._jpegs[round((due - self._t0) * self.fps) % len(self._jpegs)]

    def _sending(self, wall: float) -> None:
        with self._lock:
            self.sent_at.append(wall)

    def _count_frame(self) -> None:
        with self._lock:
            self._frames_sent += 1

    def _streams_delta(self, delta: int) -> None:
        with self._lock:
            self._streams += delta


# --------------------------------------------------------------------------------------------
# H.264 over RTSP: ffmpeg encodes to RTP on loopback, this relays it to RTSP clients
# --------------------------------------------------------------------------------------------
#
# Hand-written because the pip ffmpeg cannot listen as an RTSP server and no RTSP server library
# is installed; it serves one live track, which is all a camera test needs.

_PUBLIC = "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER, SET_PARAMETER"
_MAX_BUFFER = 4 << 20  # a TCP client further behind than this loses packets, as on a camera
_SESSION_TIMEOUT_S = 60


class _BadRequest(Exception):
    """A request this server cannot parse; the connection is closed."""


@dataclass(eq=False)
class _Session:
    id: str
    writer: asyncio.StreamWriter
    interleaved: tuple[int, int] | None = None  # RTP/AVP/TCP channels
    udp: tuple[str, int, int] | None = None  # client host, RTP port, RTCP port
    playing: bool = False
    dropped: int = 0


@dataclass
class _Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class _Datagrams(asyncio.DatagramProtocol):
    """Hands every datagram to a callback (or drops it when there is none)."""

    def __init__(self, on_datagram: Callable[[bytes], None] | None = None) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data)


def _udp_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets on adjacent ports, RTP even and RTCP odd, as RTP peers assume."""
    for _ in range(100):
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp.bind((host, 0))
        port = rtp.getsockname()[1]
        if port % 2 == 0 and port < 65535:
            rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rtcp.bind((host, port + 1))
            except OSError:
                rtcp.close()
            else:
                return rtp, rtcp
        rtp.close()
    raise OSError(f"no two adjacent free UDP ports on {host}")


def _ffmpeg_exe() -> str:
    """The imageio-ffmpeg binary; skips the test in one line without it."""
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]  # only RTSP cameras need it

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"imageio-ffmpeg with its ffmpeg binary is needed for RTSP cameras ({exc})")


def _describe_sdp(raw: str, title: str) -> str:
    """ffmpeg's SDP as a camera's DESCRIBE answer: no fixed ports, a=control for SETUP."""
    out: list[str] = []
    track = 0
    for line in (raw_line.strip() for raw_line in raw.splitlines()):
        if not line:
            continue
        if line.startswith("s="):
            line = f"s={title}"
        elif line.startswith("c="):
            line = "c=IN IP4 0.0.0.0"
        elif line.startswith("m="):
            if track == 0:
                out.append("a=control:*")
            fields = line.split()
            fields[1] = "0"
            line = " ".join(fields)
        out.append(line)
        if line.startswith("m="):
            out.append(f"a=control:trackID={track}")
            track += 1
    return "\r\n".join(out) + "\r\n"


class RtspServer:
    """An H.264 IP camera on 127.0.0.1: rtsp://127.0.0.1:<port>/live, TCP-interleaved or UDP."""

    def __init__(
        self,
        video: Path = VIDEO,
        *,
        size: tuple[int, int] = (640, 480),
        fps: int = 30,
        gop: int | None = None,
        path: str = "/live",
        require_auth: tuple[str, str] | None = None,
        realm: str = "vision-daemon test camera",
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 10.0,
    ) -> None:
        self.video = video
        self.size = size
        self.fps = fps
        self.gop = gop or fps
        self.path = "/" + path.strip("/")
        self.require_auth = require_auth
        self.realm = realm
        self.host = host
        self.start_timeout = start_timeout
        self.requests: list[str] = []  # RTSP methods received, in order (keep-alives included)
        self.rtp_packets = 0  # RTP packets received from ffmpeg
        self.packets_sent = 0  # RTP and RTCP packets relayed to clients
        self._port = port
        self._sdp = ""
        self._command: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._sessions: dict[str, _Session] = {}
        self._udp: list[asyncio.DatagramTransport] = []
        self._out: tuple[asyncio.DatagramTransport, asyncio.DatagramTransport] | None = None
        self._out_port = 0
        self._dropped = 0  # from sessions that have ended

    # lifecycle

    def start(self) -> Self:
        """Start ffmpeg, wait for its SDP, then listen; everything started is stopped on failure."""
        _require_video(self.video)
        exe = _ffmpeg_exe()
        try:
            self._start(exe)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, exe: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="rtsp-camera-")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="rtsp-camera", daemon=True)
        self._thread.start()
        rtp_port, rtcp_port = self._call(self._open_udp())
        sdp_file = Path(self._tmp.name) / "stream.sdp"
        w, h = self.size
        self._command = [
            exe,
            *("-hide_banner", "-nostdin", "-loglevel", "error"),
            *("-re", "-stream_loop", "-1", "-i", str(self.video), "-an"),
            *("-vf", f"scale={w}:{h},fps={self.fps},format=yuv420p"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-threads", "1"),
            *("-g", str(self.gop), "-bf", "0"),
            # SPS/PPS both in the SDP (sprop-parameter-sets, from the global header) and before
            # every IDR (repeat-headers), so clients joining mid-stream decode from the next IDR;
            # no scene-cut IDRs, so the only keyframes are the ones every `gop` frames.
            *("-flags", "+global_header", "-x264-params", "repeat-headers=1:scenecut=0"),
            *("-f", "rtp", "-payload_type", "96", "-sdp_file", str(sdp_file)),
            # connect=1: once these sockets close (stop(), or this process dies), ffmpeg's next
            # send fails with ECONNREFUSED and it exits, so it cannot outlive the tests.
            f"rtp://{self.host}:{rtp_port}?rtcpport={rtcp_port}&connect=1",
        ]
        log = (Path(self._tmp.name) / "ffmpeg.log").open("wb")
        with log:
            self._proc = subprocess.Popen(
                self._command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + self.start_timeout
        while "a=fmtp:" not in (raw := sdp_file.read_text() if sdp_file.exists() else ""):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"ffmpeg exited with {self._proc.returncode}: {self._ffmpeg_log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ffmpeg wrote no SDP in {self.start_timeout} s: {self._ffmpeg_log()}"
                )
            time.sleep(0.02)
        if "sprop-parameter-sets=" not in raw:
            raise RuntimeError(f"ffmpeg's SDP has no sprop-parameter-sets:\n{raw}")
        self._sdp = _describe_sdp(raw, f"{self.video.name} (vision-daemon test camera)")
        self._call(self._listen())

    def kill(self) -> None:
        """Lose the network: close every client connection and the listener; ffmpeg keeps going."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._call(self._kill())

    def revive(self) -> None:
        """Come back: listen again on the same port (no-op while alive)."""
        if self._server is None:
            self._call(self._listen())

    def stop(self) -> None:
        """End ffmpeg, every connection, the sockets and the loop thread; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                self._call(self._close())
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(5)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # what tests read

    @property
    def port(self) -> int:
        """The RTSP TCP port, fixed from start() on."""
        return self._port

    @property
    def alive(self) -> bool:
        """Whether the server is listening (started and not killed)."""
        return self._server is not None

    @property
    def url(self) -> str:
        """rtsp://127.0.0.1:<port>/live, without credentials."""
        return f"rtsp://{self.host}:{self._port}{self.path}"

    def url_with(self, user: str, password: str) -> str:
        """The URL with user:password@ (percent-encoded)."""
        return f"rtsp://{_userinfo(user, password)}{self.host}:{self._port}{self.path}"

    @property
    def sdp(self) -> str:
        """The session description DESCRIBE answers."""
        return self._sdp

    @property
    def command(self) -> list[str]:
        """The ffmpeg command line this server runs."""
        return list(self._command)

    @property
    def ffmpeg_pid(self) -> int | None:
        """The ffmpeg process id while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def clients(self) -> int:
        """Sessions playing now."""
        return sum(s.playing for s in list(self._sessions.values()))

    @property
    def dropped(self) -> int:
        """Packets not relayed to a TCP client that was too far behind (all sessions so far)."""
        return self._dropped + sum(s.dropped for s in list(self._sessions.values()))

    def _ffmpeg_log(self) -> str:
        if self._tmp is None:
            return ""
        text = (Path(self._tmp.name) / "ffmpeg.log").read_text(errors="replace").strip()
        return " | ".join(text.splitlines()[-5:]) or "(no output)"

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # on the loop thread

    async def _open_udp(self) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ingest = _udp_pair(self.host)
        out = _udp_pair(self.host)
        for sock in (*ingest, *out):
            sock.setblocking(False)
        for sock, rtcp in zip(ingest, (False, True), strict=True):
            relay = functools.partial(self._relay, rtcp=rtcp)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Datagrams, relay), sock=sock
            )
            self._udp.append(transport)
        # The pair UDP clients get packets from; what they send to it (punches, RTCP) is dropped.
        out_rtp, _ = await loop.create_datagram_endpoint(_Datagrams, sock=out[0])
        out_rtcp, _ = await loop.create_datagram_endpoint(_Datagrams, sock=out[1])
        self._udp += [out_rtp, out_rtcp]
        self._out = (out_rtp, out_rtcp)
        self._out_port = out[0].getsockname()[1]
        return ingest[0].getsockname()[1], ingest[1].getsockname()[1]

    async def _listen(self) -> None:
        server = await asyncio.start_server(
            self._serve_client, self.host, self._port, reuse_address=True
        )
        self._port = server.sockets[0].getsockname()[1]
        self._server = server

    async def _kill(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()
        for session in self._sessions.values():
            self._dropped += session.dropped
        self._sessions.clear()

    async def _close(self) -> None:
        await self._kill()
        for transport in self._udp:
            transport.close()
        self._udp.clear()
        self._out = None

    def _relay(self, packet: bytes, rtcp: bool) -> None:
        """Send one packet from ffmpeg to every playing session, over its own transport."""
        if not rtcp:
            self.rtp_packets += 1
        for session in list(self._sessions.values()):
            if not session.playing:
                continue
            if session.interleaved is not None:
                transport = session.writer.transport
                if transport.is_closing():
                    continue
                if transport.get_write_buffer_size() > _MAX_BUFFER:
                    session.dropped += 1
                    continue
                channel = session.interleaved[1 if rtcp else 0]
                session.writer.write(struct.pack(">cBH", b"$", channel, len(packet)) + packet)
            elif session.udp is not None and self._out is not None:
                host, rtp_port, rtcp_port = session.udp
                self._out[rtcp].sendto(packet, (host, rtcp_port if rtcp else rtp_port))
            self.packets_sent += 1

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One RTSP control connection: requests in, replies (and interleaved RTP) out."""
        self._conns.add(writer)
        owned: set[str] = set()
        try:
            while True:
                first = await reader.readexactly(1)
                if first == b"$":  # interleaved RTCP from the client: skip it
                    _, size = struct.unpack(">BH", await reader.readexactly(3))
                    await reader.readexactly(size)
                    continue
                request = await self._read_request(first, reader)
                writer.write(self._respond(request, writer, owned))
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            _BadRequest,
        ):
            pass
        finally:
            for sid in owned:
                session = self._sessions.pop(sid, None)
                if session is not None:
                    self._dropped += session.dropped
            self._conns.discard(writer)
            writer.transport.abort()

    async def _read_request(self, first: bytes, reader: asyncio.StreamReader) -> _Request:
        head = (first + await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("RTSP/"):
            raise _BadRequest(lines[0])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _BadRequest(line)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or "0")
        if not 0 <= length <= 65536:
            raise _BadRequest(f"Content-Length {length}")
        body = await reader.readexactly(length) if length else b""
        return _Request(parts[0].upper(), parts[1], headers, body)

    def _respond(self, req: _Request, writer: asyncio.StreamWriter, owned: set[str]) -> bytes:
        """The reply to one request; sets up, plays and tears down this connection's sessions."""
        self.requests.append(req.method)
        cseq = req.headers.get("cseq", "0")

        def reply(
            code: int, reason: str, headers: dict[str, str] | None = None, body: bytes = b""
        ) -> bytes:
            lines = [
                f"RTSP/1.0 {code} {reason}",
                f"CSeq: {cseq}",
                "Server: vision-daemon test camera",
            ]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body:
                lines.append(f"Content-Length: {len(body)}")
            return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

        if req.method == "OPTIONS":
            return reply(200, "OK", {"Public": _PUBLIC})
        if self.require_auth is not None and not _basic_auth_ok(
            req.headers.get("authorization"), self.require_auth
        ):
            return reply(401, "Unauthorized", {"WWW-Authenticate": f'Basic realm="{self.realm}"'})
        path = urlsplit(req.url).path.rstrip("/")
        if req.method in ("DESCRIBE", "SETUP") and not (
            path == self.path or path.startswith(self.path + "/")
        ):
            return reply(404, "Not Found")
        sid = req.headers.get("session", "").split(";")[0].strip()
        session_header = {"Session": f"{sid};timeout={_SESSION_TIMEOUT_S}"}

        if req.method == "DESCRIBE":
            base = f"rtsp://{self.host}:{self._port}{self.path}/"
            headers = {"Content-Type": "application/sdp", "Content-Base": base}
            return reply(200, "OK", headers, self._sdp.encode())
        if req.method == "SETUP":
            if sid and sid not in owned:
                return reply(454, "Session Not Found")
            session = self._sessions.get(sid) or _Session(secrets.token_hex(8), writer)
            transport = self._choose_transport(req.headers.get("transport", ""), writer, session)
            if transport is None:
                return reply(461, "Unsupported Transport")
            self._sessions[session.id] = session
            owned.add(session.id)
            session_header = {"Session": f"{session.id};timeout={_SESSION_TIMEOUT_S}"}
            return reply(200, "OK", {"Transport": transport, **session_header})
        if req.method in ("PLAY", "PAUSE", "TEARDOWN"):
            if sid not in owned:
                return reply(454, "Session Not Found")
            if req.method == "TEARDOWN":
                owned.discard(sid)
                gone = self._sessions.pop(sid, None)
                self._dropped += gone.dropped if gone else 0
                return reply(200, "OK", session_header)
            self._sessions[sid].playing = req.method == "PLAY"
            extra = {"Range": "npt=0.000-"} if req.method == "PLAY" else {}
            return reply(200, "OK", {**session_header, **extra})
        if req.method in ("GET_PARAMETER", "SET_PARAMETER"):
            return reply(200, "OK", session_header if sid else {})
        return reply(501, "Not Implemented", {"Public": _PUBLIC})

    def _choose_transport(
        self, header: str, writer: asyncio.StreamWriter, session: _Session
    ) -> str | None:
        """Take the first offered transport this server can do; the Transport reply, or None."""
        for spec in header.split(","):
            fields = [f.strip() for f in spec.split(";") if f.strip()]
            if not fields or "multicast" in (f.lower() for f in fields):
                continue
            proto = fields[0].upper()
            params = dict(f.partition("=")[::2] for f in fields[1:])
            try:
                if proto == "RTP/AVP/TCP":
                    lo, _, hi = (params.get("interleaved") or "0-1").partition("-")
                    channels = (int(lo), int(hi or int(lo) + 1))
                    session.interleaved, session.udp = channels, None
                    return f"RTP/AVP/TCP;unicast;interleaved={channels[0]}-{channels[1]}"
                if proto in ("RTP/AVP", "RTP/AVP/UDP") and "client_port" in params:
                    lo, _, hi = params["client_port"].partition("-")
                    ports = (int(lo), int(hi or int(lo) + 1))
                    peer = writer.get_extra_info("peername")[0]
                    session.udp, session.interleaved = (peer, *ports), None
                    return (
                        f"{fields[0]};unicast;client_port={ports[0]}-{ports[1]};"
                        f"server_port={self._out_port}-{self._out_port + 1}"
                    )
            except ValueError:
                continue
        return None
