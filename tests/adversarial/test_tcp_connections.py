"""Hostile peers on the TCP data plane's connections: silent, slow, flooding, vanishing and half-
closed peers, storms of connections, and every connection and memory limit at its edge; good
clients go on."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import psutil
import pytest

from clients.lib import ClientError, DaemonClient, check_welcome, hello_message, pack
from tests.conftest import (
    SilentFlood,
    SlowDetector,
    accounted,
    api,
    big_results,
    collect,
    connect,
    connections,
    jpeg,
    metric,
    metrics,
    raise_fd_limit,
    read_until_closed,
    round_trip,
    run,
    running_daemon,
    settled_stats,
    speak_at_once,
    stats,
    stream_stats,
    wait_for,
)
from vision_daemon import protocol as p
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # a live daemon on real sockets


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
            await wait_for(
                lambda: connections(d) >= 100,
                what="stalled peers accepted",
            )
            # each frame answered within good_client_rtts' deadline (latency belongs to benchmarks)
            assert len(await good_client_rtts(d, "busy", 40)) == 40
            await wait_for(
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
            await wait_for(
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
            await wait_for(
                lambda: "half" in stats(d)["streams"] and stream_stats(d, "half")["received"] == 5
            )
            sock = c.writer.get_extra_info("socket")
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                while await c.recv() is not None:
                    pass
            await wait_for(
                lambda: not connections(d),
                what="half-closed connection released",
            )
            await wait_for(lambda: accounted(d), what="every frame accounted")
            assert stream_stats(d, "half")["dropped_by_reason"]["disconnected"] >= 1
            assert await good_client_rtts(d, "good", 5)

    run(scenario())


def test_vanishing_client_mid_frame_releases_queue_inflight_and_stream() -> None:
    """A client killed mid-message with frames queued and in flight: all released, stream expires."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.2), workers=1, stream_grace_s=0.5) as d:
            c = await connect(d)
            for i in range(3):
                await c.send_frame("gone", i, IMG)
            await wait_for(
                lambda: "gone" in stats(d)["streams"] and stream_stats(d, "gone")["received"] == 3
            )
            whole = pack({"type": "frame", "stream_name": "gone", "frame_id": 9, "image": IMG})
            c.writer.write(whole[:50])
            await c.writer.drain()
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.writer.transport.abort()
            await wait_for(
                lambda: not connections(d),
                what="connection released",
            )
            await wait_for(lambda: accounted(d), what="queued and in-flight frames ended")
            assert stream_stats(d, "gone")["received"] == 3  # the half message is not a frame
            async with api(d) as h:
                assert (await h.get("/streams/gone")).json()["connected"] is False
                await wait_for(
                    lambda: "gone" not in stats(d)["streams"], timeout=10, what="stream expired"
                )
                assert (await h.get("/streams/gone")).status_code == 404

    run(scenario())


def test_send_buffer_limit_drops_results_of_a_client_that_stops_reading() -> None:
    """Past send_buffer_messages the non-reader's results are dropped and counted; others flow."""

    async def scenario() -> None:
        async with running_daemon(big_results, send_buffer_messages=4, ws_queue=4) as d:
            deaf = await connect(d)
            for i in range(300):  # about 30 MB of results; the socket buffers hold far less
                await deaf.send_frame("deaf", i, IMG)
                await wait_for(lambda i=i: processed(d, "deaf") == i + 1)  # type: ignore[misc]
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
            await wait_for(
                lambda: (
                    stats(d)["queued_bytes"]
                    == sum(s["queued_bytes"] for s in stats(d)["streams"].values())
                )
            )
            await wait_for(lambda: accounted(d), what="all accounted")

    run(scenario())


TOKEN = "s3cret-token"


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


async def camera_served_within(d: Daemon, seconds: float, attempt: int) -> str | None:
    """A camera that sends its hello (with the token) as it connects, then a frame: None if its
    result came within `seconds` of connecting, else what went wrong."""
    t0 = time.monotonic()
    c = None
    try:
        async with asyncio.timeout(seconds):
            hello = pack(hello_message(token=TOKEN, client_name="camera"))
            c = DaemonClient(*await speak_at_once(d.tcp_port, hello, seconds))
            reply = await c.recv()
            assert reply is not None, "closed during the handshake"
            check_welcome(reply)
            await round_trip(c, "cam", attempt)
    except (ClientError, AssertionError, TimeoutError, OSError) as exc:
        return f"attempt {attempt}: {exc!r} after {time.monotonic() - t0:.2f} s"
    finally:
        if c is not None:
            await c.close()
    return None


def test_silent_sockets_reopened_as_closed_cannot_keep_a_camera_out() -> None:
    """300 silent sockets, each re-opened as the daemon closes it: a camera with the token has
    its result within 1 s of connecting, 5 times out of 5."""

    async def scenario() -> None:
        raise_fd_limit(2 * 300 + 256)  # both ends of every socket are in this process
        async with running_daemon(auth_token=TOKEN) as d:
            async with SilentFlood(d.tcp_port, 300) as flood:
                await wait_for(
                    lambda: flood.closed >= 300, what="the daemon closing silent sockets"
                )
                failed = [await camera_served_within(d, 1.0, i) for i in range(5)]
            assert not any(failed), f"camera kept out: {[f for f in failed if f]}"
            evicted = stats(d)["connections"]["evicted"]
            assert evicted >= 300 and stats(d)["errors"][p.E_LIMIT] >= evicted
            async with api(d, TOKEN) as h:
                scrape = await metrics(h)
            assert scrape["vision_daemon_connections_evicted_total", (("plane", "tcp"),)] >= evicted

    run(scenario())


def test_a_flood_from_one_address_closes_only_its_own_silent_sockets() -> None:
    """300 silent sockets from 127.0.0.2, re-opened as closed: a client from 127.0.0.1 that says
    its hello only after 300 of them were closed still gets in (the oldest silent connection in
    the pool, it would be the first to go but for the per-address rule), and one already greeted
    is still served."""

    async def scenario() -> None:
        raise_fd_limit(2 * 300 + 256)
        async with running_daemon() as d:
            greeted = await connect(d)
            r, w = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            slow = DaemonClient(r, w)
            async with SilentFlood(d.tcp_port, 300, source="127.0.0.2") as flood:
                await wait_for(
                    lambda: flood.closed >= 300, what="the daemon closing silent sockets"
                )
                await slow.send(hello_message(client_name="slow"))
                assert check_welcome((await collect(slow, 1))[0])["type"] == "welcome"
                await round_trip(greeted, "greeted", 0)
            await round_trip(slow, "slow", 0)
            assert stats(d)["connections"]["evicted"] >= 300

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


def test_hello_timeout_closes_stalled_connection() -> None:
    """A peer that sends half a length prefix and stalls is closed after hello_timeout_s."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=0.3) as d:
            c = await connect(d, hello=False)
            c.writer.write(b"\x00\x00")
            msg = await asyncio.wait_for(c.recv(), 5)
            assert msg is not None and msg["code"] == p.E_HELLO_TIMEOUT
            await wait_for(
                lambda: not connections(d),
                what="connection released",
            )

    run(scenario())
