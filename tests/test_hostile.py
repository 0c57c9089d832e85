"""Regression tests for the hostile-peer audit of main: each finding is attacked through the public
surface only (sockets, HTTP, /ws, /stats, /metrics, settings), and a well-behaved client beside the
attacker must keep getting results while every received frame stays accounted for."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import websockets
from PIL import Image as PILImage
from prometheus_client.parser import text_string_to_metric_families

from clients.lib import ClientError, DaemonClient
from tests.conftest import (
    SlowDetector,
    accounted,
    api,
    collect,
    connect,
    jpeg,
    run,
    running_daemon,
    until,
)

pytestmark = pytest.mark.slow

IMG = jpeg(96, 128)
TOKEN = "s3cret-token"


# ---- helpers over the public surface ------------------------------------------------------------


async def poll(
    probe: Callable[[], Awaitable[Any]],
    ok: Callable[[Any], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Call `probe` until `ok(result)` holds (a deadline, never a bare sleep); return the result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if ok(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(0.05)


def unaccounted(stats: dict[str, Any]) -> int:
    """received - (processed + dropped + queued + in flight): 0 when every frame is accounted for."""
    t = stats["totals"]
    pending = sum(s["queue_depth"] + s["in_flight"] for s in stats["streams"].values())
    return int(t["received"] - t["processed"] - sum(t["dropped_by_reason"].values()) - pending)


async def settled_stats(h: httpx.AsyncClient, min_received: int = 0) -> dict[str, Any]:
    """/stats once it has seen `min_received` frames and every one of them is accounted for."""

    async def probe() -> dict[str, Any]:
        return dict((await h.get("/stats")).json())

    stats: dict[str, Any] = await poll(
        probe,
        lambda s: s["totals"]["received"] >= min_received and unaccounted(s) == 0,
        what=f"/stats with >= {min_received} frames received, all accounted for",
    )
    return stats


async def round_trip(c: DaemonClient, stream: str, frame_id: int, timeout: float = 5.0) -> None:
    """A well-behaved frame: sent, and answered by its own result within `timeout`."""
    await c.send_frame(stream, frame_id, IMG)
    try:
        msg = await asyncio.wait_for(c.recv(), timeout)
    except TimeoutError:
        raise AssertionError(f"good client on {stream!r}: no answer in {timeout:g} s") from None
    assert msg is not None, f"good client on {stream!r} was disconnected"
    assert msg["type"] == "result" and msg["frame_id"] == frame_id, msg


async def metrics(h: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every /metrics sample, parsed with prometheus_client, keyed by (name, sorted labels)."""
    text = (await h.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Drain a socket; True if the server closed it (EOF or reset) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return True


# ---- image bytes a camera would never send ------------------------------------------------------


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h pixels (valid CRCs, a token IDAT): only the header is big."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def other_formats() -> dict[str, bytes]:
    """A small, perfectly valid image in each format the protocol does not accept."""
    img = np.full((48, 64, 3), 90, np.uint8)
    out = {
        ext[1:]: bytes(cv2.imencode(ext, img)[1].tobytes()) for ext in (".bmp", ".tiff", ".webp")
    }
    out["ppm"] = bytes(cv2.imencode(".ppm", img)[1].tobytes())
    gif = io.BytesIO()
    PILImage.fromarray(img).save(gif, "GIF")
    out["gif"] = gif.getvalue()
    return out


# A P6 header declaring 2,000,000 x 1 pixels: under max_image_pixels, but cv2.imdecode raises on it.
WIDE_PPM = b"P6\n2000000 1\n255\n" + b"\0" * 1024


class NumpyConfDetector(SlowDetector):
    """Answers 50-pixel-wide images with numpy.float32 confidences and boxes (msgpack cannot pack them)."""

    def detect(self, images: Sequence[Any]) -> list[list[Any]]:
        out = super().detect(images)
        for img, dets in zip(images, out, strict=True):
            if img.shape[1] == 50:
                for i, det in enumerate(dets):
                    dets[i] = {
                        **det,
                        "conf": np.float32(0.5),
                        "bbox": [np.float32(v) for v in det["bbox"]],
                    }
        return out


# ---- finding 1: one bad frame must not end inference for everyone ------------------------------


def test_frame_that_makes_the_decoder_raise_is_dropped_and_inference_goes_on() -> None:
    """A PPM declaring 2,000,000 x 1 pixels, sent as jpeg on 4 streams: each is refused, the workers live."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0), workers=2) as d, api(d) as h:
            good = await connect(d)
            await round_trip(good, "good", 0)
            bad = await connect(d)
            for k in range(4):  # more bad frames than workers, on distinct streams
                await bad.send_frame(f"bad{k}", k, WIDE_PPM)
            try:
                replies = await collect(bad, 4, timeout=5)
            except TimeoutError:
                raise AssertionError("bad frames got no error reply within 5 s") from None
            assert all(m["type"] == "error" for m in replies), replies
            assert {m["code"] for m in replies} <= {"decode_error", "invalid"}, replies
            assert sorted(m["frame_id"] for m in replies) == [0, 1, 2, 3]
            for i in range(1, 6):
                await round_trip(good, "good", i)
            stats = await settled_stats(h, min_received=10)
            drops = stats["totals"]["dropped_by_reason"]
            assert drops["decode_error"] + drops["invalid"] == 4, drops
            assert stats["totals"]["processed"] == 6
            ready = await h.get("/ready")
            assert ready.status_code == 200 and stats["ready"], ready.text

    run(scenario())


def test_detector_returning_numpy_floats_does_not_kill_the_outcome_path() -> None:
    """numpy.float32 confidences: that frame is answered or dropped with a reason; later frames flow."""

    async def scenario() -> None:
        async with running_daemon(lambda: NumpyConfDetector(0.0), workers=1) as d, api(d) as h:
            good = await connect(d)
            await round_trip(good, "good", 0)
            odd = await connect(d)
            await odd.send_frame("odd", 7, jpeg(40, 50))
            try:
                (msg,) = await collect(odd, 1, timeout=5)
            except TimeoutError:
                raise AssertionError("numpy-float frame got neither result nor error") from None
            assert msg.get("frame_id") == 7, msg
            if msg["type"] == "result":  # converted to plain floats: fine
                assert math.isclose(msg["detections"][0]["conf"], 0.5), msg
            else:
                assert msg["type"] == "error", msg
            for i in range(1, 6):
                await round_trip(good, "good", i)
            await odd.send_frame("odd", 8, IMG)  # the same connection still works
            (again,) = await collect(odd, 1, timeout=5)
            assert again["type"] == "result" and again["frame_id"] == 8, again
            stats = await settled_stats(h, min_received=8)
            assert stats["totals"]["processed"] >= 7

    run(scenario())


def test_only_jpeg_and_png_are_accepted_and_huge_png_headers_are_too_large() -> None:
    """BMP, TIFF, WebP, GIF and PPM get decode_error; a 30000x30000 PNG header gets image_too_large."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0), workers=1) as d, api(d) as h:
            good = await connect(d)
            c = await connect(d)
            formats = other_formats()
            for i, (fmt, data) in enumerate(formats.items()):
                await c.send_frame("cam", i, data)
                (msg,) = await collect(c, 1, timeout=5)
                assert msg["type"] == "error" and msg["code"] == "decode_error", (fmt, msg)
                assert msg["frame_id"] == i
                await round_trip(good, "good", i)
            await c.send_frame("cam", 100, png_header(30000, 30000), encoding="png")
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "error" and msg["code"] == "image_too_large", msg
            png = bytes(cv2.imencode(".png", np.full((32, 32, 3), 7, np.uint8))[1].tobytes())
            await c.send_frame("cam", 101, png, encoding="png")  # a real PNG still passes
            (ok,) = await collect(c, 1, timeout=5)
            assert ok["type"] == "result" and ok["frame_id"] == 101, ok
            n = len(formats)
            stats = await settled_stats(h, min_received=2 * n + 2)
            drops = stats["totals"]["dropped_by_reason"]
            assert drops["decode_error"] == n and drops["invalid"] == 1, drops

    run(scenario())


# ---- finding 2: a hung detector is replaced and service resumes ----------------------------------


def test_hung_detector_is_replaced_and_the_good_client_gets_results_again() -> None:
    """A detector call that never returns: worker_restarts rises in /metrics and frames flow again."""
    hang = threading.Event()  # never set while the daemon runs: the first model hangs for good
    built: list[SlowDetector] = []

    def factory() -> SlowDetector:
        det = SlowDetector(0.0, hang=hang if not built else None)
        built.append(det)
        return det

    async def scenario() -> None:
        async with running_daemon(factory, workers=1, worker_timeout_s=0.5) as d, api(d) as h:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 0, IMG)
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "dropped" and msg["reason"] == "worker_timeout", msg
            await poll(
                lambda: metrics(h),
                lambda m: (
                    m.get(("vision_daemon_worker_restarts_total", (("worker", "0"),)), 0) >= 1
                ),
                what="vision_daemon_worker_restarts >= 1",
            )
            got = False
            deadline = time.monotonic() + 8
            i = 0
            while not got and time.monotonic() < deadline:
                i += 1
                await c.send_frame("cam", i, IMG)
                try:
                    async with asyncio.timeout(1):
                        while (m := await c.recv()) is not None:
                            if m["type"] == "result":
                                got = True
                                break
                except TimeoutError:
                    pass
            assert got, "no result after the worker was replaced"
            await poll(lambda: h.get("/ready"), lambda r: r.status_code == 200, what="/ready 200")
            await settled_stats(h, min_received=i + 1)

    try:
        run(scenario())
    finally:
        hang.set()  # let the abandoned thread end so the interpreter can exit


# ---- finding 3: error replies are bounded and never echo the client's bytes ----------------------


def test_unknown_type_error_does_not_echo_the_clients_value() -> None:
    """A 1000-character `type` gets unknown_type with a short message that does not repeat it."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            echo = await connect(d)
            await echo.send({"type": "X" * 1000})
            (err,) = await collect(echo, 1, timeout=5)
            assert err["code"] == "unknown_type", err
            assert "X" * 64 not in err["message"] and len(err["message"]) <= 200, err["message"]
            await round_trip(echo, "cam", 1)  # the connection stays usable
            await round_trip(good, "good", 0)

    run(scenario())


def test_junk_flood_from_a_peer_that_never_reads_is_closed() -> None:
    """100,000 non-map bodies from a peer that never reads its error replies: the server closes it."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            await round_trip(good, "good", 0)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a peer that never reads
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.tcp_port))
            reader, writer = await asyncio.open_connection(sock=sock)
            junk = struct.pack(">I", 1) + b"\x01"  # msgpack int 1: not_a_map, connection stays
            closed = False
            try:
                writer.write(junk * 100_000)
                await asyncio.wait_for(writer.drain(), 10)
            except (ConnectionError, OSError):
                closed = True
            except TimeoutError:
                pass  # the server stopped reading us; whether it closed is checked below
            for i in range(1, 4):
                await round_trip(good, "good", i)
            closed = closed or await read_until_closed(reader, timeout=6)
            writer.close()
            assert closed, "the junk flooder is still connected"
            await round_trip(good, "good", 4)

    run(scenario())


# ---- finding 4: client-sized structures are bounded before they are held ------------------------


def test_huge_hello_streams_map_and_huge_msgpack_counts_are_refused() -> None:
    """A hello naming 100,000 streams is refused; array/map count headers of 2**32-1 are limit_exceeded."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            await round_trip(good, "good", 0)
            for i, prefix in enumerate((b"\xdd", b"\xdf"), start=1):  # array32 / map32
                bad = await connect(d, hello=False)
                t0 = time.monotonic()
                body = prefix + b"\xff\xff\xff\xff"
                bad.writer.write(struct.pack(">I", len(body)) + body)
                (err,) = await collect(bad, 1, timeout=5)
                assert err["code"] == "limit_exceeded" and time.monotonic() - t0 < 1, err
                await round_trip(good, "good", i, timeout=2)
            huge = await connect(d, hello=False)
            streams = {f"s{i}": {} for i in range(100_000)}
            await huge.send({"type": "hello", "version": 1, "streams": streams})
            (reply,) = await collect(huge, 1, timeout=10)
            assert reply["type"] == "error", f"a 100,000-stream hello got {reply['type']!r}"
            assert reply["code"] in ("limit_exceeded", "invalid"), reply
            for i in range(3, 8):
                await round_trip(good, "good", i, timeout=2)

    run(scenario())


# ---- finding 5: invented stream names cannot grow the registry -----------------------------------


def test_reconnecting_clients_inventing_stream_names_stay_within_max_streams() -> None:
    """100 connections, each one frame on a fresh name then gone: /stats never shows over max_streams."""

    async def scenario() -> None:
        async with running_daemon(max_streams=16, stream_grace_s=60) as d, api(d) as h:
            good = await connect(d)
            await round_trip(good, "good", 0)
            for i in range(100):
                c = await connect(d)
                await c.send_frame(f"new{i}", i, IMG)
                await collect(c, 1, timeout=5)  # a result or a refusal; either is an answer
                await c.close()
                if i % 10 == 9:
                    await round_trip(good, "good", i)
            stats = await settled_stats(h, min_received=111)
            assert len(stats["streams"]) <= 16, f"{len(stats['streams'])} streams in /stats"
            await round_trip(good, "good", 1000)

    run(scenario())


# ---- finding 6: silent sockets cannot hold the slots ---------------------------------------------


def test_silent_sockets_cannot_lock_out_an_authenticated_client() -> None:
    """8 silent sockets at max_connections=8 do not lock out a client that sends the token."""

    async def scenario() -> None:
        async with running_daemon(max_connections=8, hello_timeout_s=2, auth_token=TOKEN) as d:
            silent = [await asyncio.open_connection("127.0.0.1", d.tcp_port) for _ in range(8)]
            t0 = time.monotonic()
            try:
                good = await connect(d, token=TOKEN)
            except ClientError as exc:
                raise AssertionError(f"client with the token locked out: {exc}") from None
            await round_trip(good, "good", 0)
            assert time.monotonic() - t0 < 2, "served only after the silent sockets timed out"
            for _, w in silent:
                w.close()

    run(scenario())


def test_peer_silent_after_its_hello_is_closed_after_idle_timeout() -> None:
    """idle_timeout_s=1 (hello_timeout_s at its default): a hello then silence is closed within 3 s."""

    async def scenario() -> None:
        async with running_daemon(idle_timeout_s=1) as d:
            c = await connect(d)  # a valid hello, then silence
            t0 = time.monotonic()
            assert await read_until_closed(c.reader, timeout=3), "idle peer still open after 3 s"
            assert time.monotonic() - t0 < 3
            good = await connect(d)
            await round_trip(good, "good", 0)  # a talking peer is served

    run(scenario())


# ---- finding 7: idle HTTP connections are capped and closed ------------------------------------


def test_idle_http_connections_do_not_starve_the_api_and_are_closed() -> None:
    """64 silent sockets on the API port: /health still answers and the server closes them."""

    async def scenario() -> None:
        async with running_daemon(http_max_connections=32, http_idle_timeout_s=2) as d:
            idle = [await asyncio.open_connection("127.0.0.1", d.api_port) for _ in range(64)]
            async with api(d) as h:
                r = await poll(lambda: h.get("/health"), lambda r: r.status_code == 200, timeout=6)
                assert r.json()["status"] == "ok"
            closed = await asyncio.gather(*(read_until_closed(r, timeout=6) for r, _ in idle))
            assert all(closed), f"{closed.count(False)} of 64 idle sockets still open"
            for _, w in idle:
                w.close()
            good = await connect(d)
            await round_trip(good, "good", 0)

    run(scenario())


# ---- finding 8: the token never reaches a log line; a refused /ws closes with 1008 -------------


class Capture(logging.Handler):
    """Keeps every formatted record (the daemon's and uvicorn's; not this test's HTTP clients)."""

    CLIENT_SIDE = ("httpx", "httpcore", "websockets.client")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(self.CLIENT_SIDE):
            self.lines.append(self.format(record))


def test_token_is_never_logged_and_a_refused_ws_closes_with_1008() -> None:
    """/ws and HTTP requests carrying the token in the query: no log line holds it; a bad token gets 1008."""
    root = logging.getLogger()
    capture = Capture()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)

    async def scenario() -> None:
        async with running_daemon(auth_token=TOKEN) as d:
            base = f"ws://127.0.0.1:{d.api_port}/ws"
            refused: Any = None
            try:
                async with websockets.connect(f"{base}?token=wrong") as ws:
                    async with asyncio.timeout(5):
                        await ws.recv()
            except websockets.ConnectionClosed as exc:
                refused = exc.rcvd.code if exc.rcvd else None
            except websockets.InvalidStatus as exc:
                refused = f"HTTP {exc.response.status_code}"
            async with websockets.connect(f"{base}?token={TOKEN}") as ws:
                good = await connect(d, token=TOKEN)
                await round_trip(good, "good", 0)
                async with asyncio.timeout(5):
                    seen = await ws.recv()
                assert '"frame_id":0' in str(seen).replace(" ", ""), seen
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}") as h:
                for path in ("/stats", "/metrics", "/ready", "/streams/good", "/nope"):
                    await h.get(path, params={"token": TOKEN})
                await h.get("/stats", params={"token": "wrong"})
            leaked = [line for line in capture.lines if TOKEN in line]
            assert not leaked, f"token in {len(leaked)} log line(s), e.g. {leaked[0]!r}"
            assert refused == 1008, f"/ws with a wrong token was refused with {refused!r}"

    try:
        run(scenario())
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


# ---- finding 9: /ws subscribers are capped -----------------------------------------------------


def test_ws_subscribers_past_the_cap_are_refused_and_the_rest_are_served() -> None:
    """With ws_max_subscribers=4 the 5th /ws is closed with 1013 or 1008; the first 4 get results."""

    async def scenario() -> None:
        async with running_daemon(ws_max_subscribers=4) as d:
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            subs = [await websockets.connect(url) for _ in range(4)]
            code: Any = None
            try:
                async with websockets.connect(url) as fifth:
                    async with asyncio.timeout(5):
                        await fifth.recv()
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
            except websockets.InvalidStatus as exc:
                code = f"HTTP {exc.response.status_code}"
            except TimeoutError:
                code = "still open after 5 s"
            assert code in (1013, 1008), f"5th subscriber: {code!r}"
            good = await connect(d)
            await round_trip(good, "good", 0)
            async with asyncio.timeout(5):
                for ws in subs:
                    assert '"frame_id":0' in str(await ws.recv()).replace(" ", "")
            for ws in subs:
                await ws.close()

    run(scenario())


# ---- finding 10: exported counters never go backwards -------------------------------------------


def test_frame_counters_never_decrease_when_streams_expire() -> None:
    """metrics_max_streams=2: a stream folded into _other expires; no frames counter goes down."""

    def frame_counters(m: dict[Any, float]) -> dict[Any, float]:
        return {
            k: v
            for k, v in m.items()
            if k[0].startswith("vision_daemon_frames_") and k[0].endswith("_total")
        }

    async def scenario() -> None:
        async with running_daemon(metrics_max_streams=2, stream_grace_s=1) as d, api(d) as h:
            keep = await connect(d)
            for i in range(3):
                await round_trip(keep, "a", i)
                await round_trip(keep, "b", i)
            await metrics(h)  # a and b take the two labels
            leaving, staying = await connect(d), await connect(d)
            for i in range(5):
                await round_trip(leaving, "c", i)
                await round_trip(staying, "d", i)
            other = ("vision_daemon_frames_received_total", (("stream", "_other"),))
            before = frame_counters(
                await poll(lambda: metrics(h), lambda m: m.get(other, 0) >= 10, what="_other >= 10")
            )
            await leaving.close()
            await poll(
                lambda: h.get("/stats"),
                lambda r: "c" not in r.json()["streams"],
                what="stream c expired",
            )
            await round_trip(keep, "a", 99)
            a_recv = ("vision_daemon_frames_received_total", (("stream", "a"),))
            after = frame_counters(
                await poll(lambda: metrics(h), lambda m: m.get(a_recv, 0) >= 4, what="fresh scrape")
            )
            assert other in before and other in after
            went_down = {
                k: (before[k], after[k])
                for k in before.keys() & after.keys()
                if after[k] < before[k]
            }
            assert not went_down, f"counters went backwards: {went_down}"
            await round_trip(staying, "d", 99)
            await settled_stats(h, min_received=18)

    run(scenario())


# ---- smaller findings -----------------------------------------------------------------------------


def test_stream_name_with_a_trailing_newline_is_refused() -> None:
    """'cam\\n' slips past a `$`-anchored pattern: it must be bad_stream_name."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            good = await connect(d)
            c = await connect(d)
            await c.send_frame("cam\n", 1, IMG)
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "error" and msg["code"] == "bad_stream_name", msg
            await round_trip(good, "good", 0)
            stats = await settled_stats(h, min_received=2)
            assert "cam\n" not in stats["streams"]

    run(scenario())


def test_non_finite_timestamps_are_refused_or_replaced() -> None:
    """A frame timestamp of NaN or inf is refused as invalid or replaced by a finite number."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            c = await connect(d)
            for i, ts in enumerate((math.nan, math.inf, -math.inf)):
                await c.send_frame("cam", i, IMG, timestamp=ts)
                (msg,) = await collect(c, 1, timeout=5)
                if msg["type"] == "error":
                    assert msg["code"] == "invalid" and msg["frame_id"] == i, msg
                else:
                    assert msg["type"] == "result" and math.isfinite(msg["timestamp"]), (ts, msg)
            await round_trip(c, "cam", 10)
            await settled_stats(h, min_received=4)

    run(scenario())


def test_hello_with_skip_frames_zero_is_invalid() -> None:
    """skip_frames must be >= 1: 0 in `options` or in a stream's options is refused as invalid."""

    async def scenario() -> None:
        async with running_daemon() as d:
            for hello in (
                {"options": {"skip_frames": 0}},
                {"streams": {"cam": {"skip_frames": 0}}},
            ):
                c = await connect(d, hello=False)
                await c.send({"type": "hello", "version": 1, **hello})
                (msg,) = await collect(c, 1, timeout=5)
                assert msg["type"] == "error" and msg["code"] == "invalid", (hello, msg)
            good = await connect(d)
            await round_trip(good, "good", 0)

    run(scenario())


def test_frame_with_nil_timestamp_is_accepted() -> None:
    """`timestamp` is optional, so an explicit nil means 'not given': the frame gets a result."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            c = await connect(d)
            await c.send(
                {
                    "type": "frame",
                    "stream_name": "cam",
                    "frame_id": 1,
                    "timestamp": None,
                    "image": IMG,
                }
            )
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "result" and msg["frame_id"] == 1, msg
            await round_trip(c, "cam", 2)
            await settled_stats(h, min_received=2)

    run(scenario())


def test_api_docs_need_the_token_when_auth_is_on() -> None:
    """/docs, /redoc and /openapi.json answer 401 without the token when auth_token is set."""

    async def scenario() -> None:
        async with running_daemon(auth_token=TOKEN) as d:
            async with api(d) as h:
                codes = {
                    path: (await h.get(path)).status_code
                    for path in ("/docs", "/redoc", "/openapi.json")
                }
            assert codes == {"/docs": 401, "/redoc": 401, "/openapi.json": 401}, codes
            good = await connect(d, token=TOKEN)
            await round_trip(good, "good", 0)

    run(scenario())


def test_a_peer_that_reads_its_replies_is_never_slow_consumer() -> None:
    """300 bad messages in one write, replies read: 300 errors, no slow_consumer, still open."""

    async def scenario() -> None:
        async with running_daemon() as d:
            c = await connect(d)
            c.writer.write(b"\x00\x00\x00\x01\x01" * 300)  # 300 bodies that are not maps
            replies = await collect(c, 300, timeout=10)
            assert {m["code"] for m in replies} == {"not_a_map"}, replies[-3:]
            await round_trip(c, "still-open", 0)

    run(scenario())


def test_refused_messages_do_not_extend_a_pending_connection() -> None:
    """Junk every 0.3 s before any valid message: closed at hello_timeout_s; with auth, at once."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=1.5) as d:
            r, w = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 5 and not closed:
                w.write(b"\x00\x00\x00\x01\x01")  # not a map: refused, not fatal
                try:
                    closed = not await asyncio.wait_for(r.read(65536), 0.3)
                except TimeoutError:
                    pass
                except ConnectionError:
                    closed = True
            assert closed and time.monotonic() - t0 < 3, "junk kept a pending slot alive"
            w.close()
        async with running_daemon(auth_token="s3cret") as d:
            r, w = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            w.write(b"\x00\x00\x00\x01\x01")
            async with asyncio.timeout(5):
                while await r.read(65536):
                    pass  # the not_a_map error, then EOF
            w.close()
            good = await connect(d, token="s3cret")
            await round_trip(good, "good", 0)

    run(scenario())


class RaisesBaseException(SlowDetector):
    """Raises a BaseException (not an Exception) on its first call only."""

    def detect(self, images: Sequence[Any], **kw: Any) -> Any:
        if self.calls == 0:
            self.calls += 1
            raise KeyboardInterrupt("injected")
        return super().detect(images)


def test_a_worker_loop_failure_drops_its_frames_as_internal_error_and_recovers() -> None:
    """Anything escaping a worker's call ends its frames as counted drops; the worker restarts."""

    async def scenario() -> None:
        async with running_daemon(
            lambda: RaisesBaseException(0.0), workers=1, max_frame_age_ms=10_000
        ) as d:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 0, IMG)
            (msg,) = await collect(c, 1)
            assert msg["type"] == "dropped" and msg["reason"] == "internal_error", msg
            await c.send_frame("cam", 1, IMG)
            (msg,) = await collect(c, 1, timeout=10)  # after the supervisor's 1 s backoff
            assert msg["type"] == "result" and msg["frame_id"] == 1, msg
            await until(lambda: accounted(d), what="accounted")

    run(scenario())
