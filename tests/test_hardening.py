"""Hostile peers, worker faults, vanishing clients and every limit at its edge; good clients go on."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

import httpx
import msgpack
import psutil
import pytest

from clients.lib import DaemonClient, pack
from tests.conftest import (
    SlowDetector,
    accounted,
    collect,
    connect,
    connections,
    jpeg,
    poll_stats,
    run,
    running_daemon,
    stats,
    stream_stats,
    until,
)
from vision_daemon import protocol as p
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, models or subprocesses

IMG = jpeg(96, 128)


async def good_client_rtts(d: Daemon, name: str, frames: int, fps: float = 50.0) -> list[float]:
    """A well-behaved client: paced frames, each answered; returns round trips in ms."""
    c = await connect(d)
    rtts = []
    for i in range(frames):
        t0 = time.monotonic()
        await c.send_frame(name, i, IMG)
        msg = await asyncio.wait_for(c.recv(), 10)
        assert msg is not None and msg["type"] == "result" and msg["frame_id"] == i, msg
        rtts.append((time.monotonic() - t0) * 1000)
        await asyncio.sleep(max(0.0, 1 / fps - (time.monotonic() - t0)))
    await c.close()
    return rtts


async def metric(d: Daemon, name: str, **labels: str) -> float:
    """One sample of /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}") as h:
        text = (await h.get("/metrics")).text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in (name, f"{name}_total") and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def ws_settled(s: dict[str, Any], n: int) -> bool:
    """Every one of n results is sent, dropped, queued or being sent to the one subscriber."""
    clients = s["ws"]["clients"]
    return (
        bool(clients) and sum(clients[0][k] for k in ("sent", "dropped", "queued", "sending")) == n
    )


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def processed(d: Daemon, name: str) -> int:
    stream = stats(d)["streams"].get(name)
    return int(stream["processed"]) if stream else 0


def test_slowloris_storm_leaves_good_client_served() -> None:
    """100 peers that send half a length prefix and stall: every frame of a good client is answered."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=1.5, max_pending_connections=128) as d:
            assert len(await good_client_rtts(d, "calm", 20)) == 20
            rss = rss_mb()
            stalled = []
            for _ in range(100):
                r, w = await asyncio.open_connection("127.0.0.1", d.tcp_port)
                w.write(b"\x00\x00")
                stalled.append((r, w))
            await until(
                lambda: connections(d) >= 100,
                what="stalled peers accepted",
            )
            # each frame answered within good_client_rtts' deadline (latency belongs to benchmarks)
            assert len(await good_client_rtts(d, "busy", 40)) == 40
            await until(
                lambda: not connections(d),
                timeout=10,
                what="stalled peers closed",
            )
            assert stats(d)["errors"].get(p.E_HELLO_TIMEOUT, 0) == 100
            assert rss_mb() - rss < 64  # 100 stalled peers cost buffers, not memory growth
            for _, w in stalled:
                w.close()

    run(scenario())


def test_connect_and_close_storm_releases_every_connection() -> None:
    """300 connections that close at once, reset, or die mid-message leave nothing behind."""

    async def scenario() -> None:
        async with running_daemon() as d:
            rss = rss_mb()
            good = asyncio.create_task(good_client_rtts(d, "good", 60))
            partial = pack({"type": "frame", "stream_name": "x", "frame_id": 1, "image": IMG})
            for i in range(300):
                s = socket.create_connection(("127.0.0.1", d.tcp_port))
                if i % 3 == 1:  # abortive close: RST instead of FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif i % 3 == 2:  # half a frame, then gone
                    s.sendall(partial[: len(partial) // 2])
                s.close()
                if i % 20 == 0:
                    await asyncio.sleep(0)  # let the daemon's loop accept and clean up
            rtts = await good
            assert len(rtts) == 60
            await until(
                lambda: not connections(d),
                what="storm connections released",
            )
            assert stats(d)["connections"]["total"] >= 301 and "x" not in stats(d)["streams"]
            assert rss_mb() - rss < 64
            assert await good_client_rtts(d, "after", 5)  # still accepting

    run(scenario())


def test_half_closed_socket_is_released_and_its_frames_accounted() -> None:
    """A peer that sends frames then shuts down its write side: each frame ends processed or dropped."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.1), workers=1, serve_default="fifo") as d:
            c = await connect(d, dropped_notices=True)
            for i in range(5):
                await c.send_frame("half", i, IMG)
            await until(
                lambda: "half" in stats(d)["streams"] and stream_stats(d, "half")["received"] == 5
            )
            sock = c.writer.get_extra_info("socket")
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                while await c.recv() is not None:
                    pass
            await until(
                lambda: not connections(d),
                what="half-closed connection released",
            )
            await until(lambda: accounted(d), what="every frame accounted")
            assert stream_stats(d, "half")["dropped_by_reason"]["disconnected"] >= 1
            assert await good_client_rtts(d, "good", 5)

    run(scenario())


def test_detector_that_raises_answers_an_error_and_the_worker_goes_on() -> None:
    """Every third call raises: that frame gets detector_error, the others results, no restart."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0, fail_every=3), workers=1) as d:
            c = await connect(d)
            replies = []
            for i in range(9):
                await c.send_frame("cam", i, IMG)
                replies += await collect(c, 1)
            errors = [m for m in replies if m["type"] == "error"]
            assert [m["frame_id"] for m in errors] == [2, 5, 8]
            assert {m["code"] for m in errors} == {p.E_DETECTOR}
            assert sum(m["type"] == "result" for m in replies) == 6
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}") as h:
                snap = await poll_stats(h, lambda s: s["workers"][0]["errors"] == 3)
            assert snap["workers"][0]["restarts"] == 0
            assert snap["totals"]["dropped_by_reason"]["detector_error"] == 3
            assert snap["errors"][p.E_DETECTOR] == 3
            assert await metric(d, "vision_daemon_detector_errors", worker="0") == 3

    run(scenario())


def test_stuck_worker_is_reported_replaced_and_its_frame_dropped() -> None:
    """A call past worker_timeout_s: worker_timeout drop, /stats and /ready show it, then recovery."""
    release = threading.Event()

    async def scenario() -> None:
        async with running_daemon(
            lambda: SlowDetector(0.0, hang=release), workers=1, worker_timeout_s=0.5
        ) as d:
            c = await connect(d, dropped_notices=True)
            api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}")
            await c.send_frame("cam", 1, IMG)
            (msg,) = await collect(c, 1)
            assert msg == {
                "type": "dropped",
                "stream_name": "cam",
                "frame_id": 1,
                "reason": "worker_timeout",
            }
            ready = await api.get("/ready")
            worker = (await poll_stats(api, lambda s: s["workers"][0]["restarts"] == 1))["workers"][
                0
            ]
            assert ready.status_code == 503 and "worker" in ready.json()["reason"]
            assert worker["state"] in ("stuck", "restarting") and worker["restarts"] == 1
            assert await metric(d, "vision_daemon_worker_restarts", worker="0") == 1
            release.set()  # the replacement model does not hang
            await until(lambda: stats(d)["ready"], timeout=10, what="worker restarted")
            await c.send_frame("cam", 2, IMG)
            (msg,) = await collect(c, 1)
            assert msg["type"] == "result" and msg["frame_id"] == 2
            assert (await api.get("/ready")).status_code == 200
            await api.aclose()

    run(scenario())


def test_vanishing_client_mid_frame_releases_queue_inflight_and_stream() -> None:
    """A client killed mid-message with frames queued and in flight: all released, stream expires."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.2), workers=1, stream_grace_s=0.5) as d:
            c = await connect(d)
            for i in range(3):
                await c.send_frame("gone", i, IMG)
            await until(
                lambda: "gone" in stats(d)["streams"] and stream_stats(d, "gone")["received"] == 3
            )
            whole = pack({"type": "frame", "stream_name": "gone", "frame_id": 9, "image": IMG})
            c.writer.write(whole[:50])
            await c.writer.drain()
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.writer.transport.abort()
            await until(
                lambda: not connections(d),
                what="connection released",
            )
            await until(lambda: accounted(d), what="queued and in-flight frames ended")
            assert stream_stats(d, "gone")["received"] == 3  # the half message is not a frame
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}") as h:
                assert (await h.get("/streams/gone")).json()["connected"] is False
                await until(
                    lambda: "gone" not in stats(d)["streams"], timeout=10, what="stream expired"
                )
                assert (await h.get("/streams/gone")).status_code == 404

    run(scenario())


def big_results() -> SlowDetector:
    """2000 boxes with long labels per frame: large results fill a non-reader's buffers quickly."""
    return SlowDetector(0.0, boxes=2000, label="x" * 40)


def test_send_buffer_limit_drops_results_of_a_client_that_stops_reading() -> None:
    """Past send_buffer_messages the non-reader's results are dropped and counted; others flow."""

    async def scenario() -> None:
        async with running_daemon(big_results, send_buffer_messages=4, ws_queue=4) as d:
            deaf = await connect(d)
            for i in range(300):  # about 30 MB of results; the socket buffers hold far less
                await deaf.send_frame("deaf", i, IMG)
                await until(lambda i=i: processed(d, "deaf") == i + 1)  # type: ignore[misc]
            snap = stats(d)
            lost = snap["streams"]["deaf"]["results_dropped"]
            assert lost > 0 and snap["totals"]["results_dropped"] == lost
            assert await metric(d, "vision_daemon_results_dropped") == lost
            assert snap["connections"]["outbox_max"] <= 4
            good = await connect(d)
            await good.send_frame("good", 0, IMG)
            (msg,) = await collect(good, 1)
            assert msg["type"] == "result" and len(msg["detections"]) == 2000
            await good.close()
            await deaf.close()

    run(scenario())


def test_stalled_ws_subscriber_loses_its_oldest_messages_not_ingest() -> None:
    """A /ws subscriber that never reads overflows its own queue (counted in /stats); TCP flows."""
    import websockets

    async def scenario() -> None:
        async with running_daemon(big_results, ws_queue=4) as d:
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            async with websockets.connect(url, max_size=2**24, max_queue=1, compression=None):
                await until(lambda: stats(d)["ws"]["subscribers"] == 1, what="subscriber")
                c = await connect(d)
                for i in range(200):
                    await c.send_frame("cam", i, IMG)
                    (msg,) = await collect(c, 1)
                    assert msg["type"] == "result"
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}") as h:
                    ws = (await poll_stats(h, lambda s: ws_settled(s, 200)))["ws"]
                (sub,) = ws["clients"]
                assert sub["dropped"] > 0 and sub["queued"] <= 4
                assert sub["sent"] + sub["dropped"] + sub["queued"] + sub["sending"] == 200
                assert await metric(d, "vision_daemon_ws_messages_dropped") >= sub["dropped"]
                await c.close()

    run(scenario())


# ---- every limit at its edge: just under passes, just over is refused --------------------------


def frame_of_size(n: int) -> bytes:
    """A frame message whose body is exactly n bytes (a JPEG with padding after its end)."""
    base = {"type": "frame", "stream_name": "cam", "frame_id": 1, "image": IMG}
    pad = n - len(msgpack.packb(base, use_bin_type=True))
    body = msgpack.packb({**base, "image": IMG + b"\0" * pad}, use_bin_type=True)
    assert len(body) == n
    return struct.pack(">I", n) + body


def test_max_message_bytes_edge() -> None:
    """A message of exactly max_message_bytes is processed; one byte more is message_too_large."""

    async def scenario() -> None:
        async with running_daemon(max_message_bytes=8192) as d:
            c = await connect(d, hello=False)
            c.writer.write(frame_of_size(8192))
            assert (await collect(c, 1))[0]["type"] == "result"
            c.writer.write(frame_of_size(8193))
            (err,) = await collect(c, 1)
            assert err["code"] == p.E_TOO_LARGE
            assert await asyncio.wait_for(c.recv(), 5) is None  # framing lost: closed

    run(scenario())


def test_max_connections_edge() -> None:
    """max_connections peers are served; the next one's hello gets limit_exceeded and a close."""

    async def scenario() -> None:
        async with running_daemon(max_connections=3) as d:
            clients = [await connect(d) for _ in range(3)]
            over = await DaemonClient.connect("127.0.0.1", d.tcp_port or 0, hello=False)
            await over.send({"type": "hello", "version": 1})
            err = await asyncio.wait_for(over.recv(), 5)
            assert (
                err is not None and err["code"] == p.E_LIMIT and "max_connections" in err["message"]
            )
            for i, c in enumerate(clients):
                await c.send_frame(f"s{i}", 0, IMG)
                assert (await collect(c, 1))[0]["type"] == "result"

    run(scenario())


def test_max_streams_total_edge() -> None:
    """max_streams streams across connections are admitted; one more is refused with an error."""

    async def scenario() -> None:
        async with running_daemon(max_streams=2) as d:
            a, b = await connect(d), await connect(d)
            await a.send_frame("one", 0, IMG)
            await b.send_frame("two", 0, IMG)
            assert (await collect(a, 1))[0]["type"] == "result"
            assert (await collect(b, 1))[0]["type"] == "result"
            await b.send_frame("three", 0, IMG)
            (err,) = await collect(b, 1)
            assert err["code"] == p.E_LIMIT and "max_streams=2" in err["message"]
            assert err["frame_id"] == 0

    run(scenario())


def test_hello_and_idle_timeout_edges() -> None:
    """A hello inside hello_timeout_s and messages inside idle_timeout_s keep a peer; silence ends it."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=0.6, idle_timeout_s=0.6) as d:
            r, w = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            c = DaemonClient(r, w)
            await asyncio.sleep(0.3)  # the timeout under test: half of it, then hello
            await c.send({"type": "hello", "version": 1})
            assert (await collect(c, 1))[0]["type"] == "welcome"
            for i in range(6):  # 1.8 s of traffic, each message well inside the idle timeout
                await c.send_frame("cam", i, IMG)
                assert (await collect(c, 1))[0]["type"] == "result"
                await asyncio.sleep(0.3)
            t0 = time.monotonic()
            (err,) = await collect(c, 1, timeout=5)
            assert err["code"] == p.E_IDLE_TIMEOUT and time.monotonic() - t0 < 2
            assert await asyncio.wait_for(c.recv(), 5) is None

    run(scenario())


def test_queued_bytes_budget_makes_the_hog_pay() -> None:
    """Past max_queued_mb the biggest queue loses its oldest frames; a normal camera loses none."""

    async def scenario() -> None:
        async with running_daemon(
            lambda: SlowDetector(0.05), workers=1, max_queued_mb=1, max_message_bytes=2**20
        ) as d:
            hog = await connect(d, dropped_notices=True)
            calm = await connect(d)
            big = IMG + b"\0" * 300_000  # decodes like IMG; 300 KB on the wire and in the queue
            for i in range(10):
                for k in range(4):
                    await hog.send_frame(f"hog{k}", i, big)
                await calm.send_frame("calm", i, IMG)
                msg = await asyncio.wait_for(calm.recv(), 10)  # every calm frame is answered
                assert msg is not None and msg["type"] == "result" and msg["frame_id"] == i
                assert stats(d)["queued_bytes"] <= 2**20
            hog_drops = sum(
                stream_stats(d, f"hog{k}")["dropped_by_reason"]["memory_limit"] for k in range(4)
            )
            assert (
                hog_drops > 0 and stream_stats(d, "calm")["dropped_by_reason"]["memory_limit"] == 0
            )
            await until(
                lambda: (
                    stats(d)["queued_bytes"]
                    == sum(s["queued_bytes"] for s in stats(d)["streams"].values())
                )
            )
            await until(lambda: accounted(d), what="all accounted")

    run(scenario())
