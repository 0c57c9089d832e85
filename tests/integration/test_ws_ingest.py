"""WebSocket ingest (`WS /ingest` and `WS /ingest/{stream}`) with real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import (
    SlowDetector,
    accounted,
    big_results,
    collect,
    connect,
    jpeg,
    run,
    running_daemon,
    stats,
    stream_stats,
    wait_for,
)
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, daemons

IMG = jpeg(96, 128)


def ws_connect(d: Daemon, path: str, **kw: Any) -> Any:
    """A real WebSocket client on the daemon's control-plane port (no proxy, no compression)."""
    kw.setdefault("max_size", 2**24)
    return websockets.connect(
        f"ws://127.0.0.1:{d.api_port}{path}", proxy=None, compression=None, **kw
    )


def pack(msg: Any) -> bytes:
    return bytes(msgpack.packb(msg, use_bin_type=True))


def frame(stream: str, frame_id: Any, image: bytes = IMG, **extra: Any) -> bytes:
    msg = {"type": "frame", "stream_name": stream, "frame_id": frame_id, "image": image}
    return pack({**msg, **extra})


async def recv_bin(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, bytes), f"expected a binary message, got {data!r}"
    msg: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return msg


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, str), f"expected a text message, got {data!r}"
    msg: dict[str, Any] = json.loads(data)
    return msg


async def closed_with(ws: ClientConnection, timeout: float = 10.0) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.exceptions.ConnectionClosed as exc:
            assert exc.rcvd is not None, "the server closed without a close frame"
            return exc.rcvd.code, exc.rcvd.reason


def processed(d: Daemon, name: str) -> int:
    s = stats(d)["streams"].get(name)
    return int(s["processed"]) if s else 0


def errors(d: Daemon) -> dict[str, int]:
    return dict(stats(d)["errors"])


def test_ingest_binary_mode_returns_results_for_real_jpegs() -> None:
    """/ingest: hello gets a welcome, each msgpack frame a binary result, bye a bye and 1000."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0)) as d, ws_connect(d, "/ingest") as ws:
            await ws.send(pack({"type": "hello", "version": 1, "client": "test"}))
            welcome = await recv_bin(ws)
            assert welcome["type"] == "welcome" and welcome["limits"]["send_buffer_messages"]
            for i in range(5):
                await ws.send(frame("wscam", i, timestamp=100.0 + i))
                msg = await recv_bin(ws)
                assert msg["type"] == "result" and msg["frame_id"] == i
                assert msg["stream_name"] == "wscam" and msg["timestamp"] == 100.0 + i
                assert msg["detections"][0]["label"] == "thing"
            await ws.send(pack({"type": "bye"}))
            assert (await recv_bin(ws))["type"] == "bye"
            assert (await closed_with(ws))[0] == 1000
            await wait_for(lambda: stats(d)["ws_ingest"]["open"] == 0, what="connection gone")
            assert stream_stats(d, "wscam")["processed"] == 5 and accounted(d)
            assert stats(d)["ws_ingest"]["total"] == 1

    run(scenario())


def test_browser_mode_numbers_jpegs_and_answers_in_json() -> None:
    """/ingest/{stream}: raw JPEG messages get JSON results numbered 0, 1, 2 with server time;
    no welcome unless the URL asks for one (?welcome=1)."""

    async def scenario() -> None:
        async with (
            running_daemon(lambda: SlowDetector(0.0)) as d,
            ws_connect(d, "/ingest/cam") as ws,
        ):
            for i in range(3):
                before = time.time()
                await ws.send(IMG)
                msg = await recv_json(ws)
                assert msg["type"] == "result" and msg["frame_id"] == i
                assert msg["stream_name"] == "cam" and msg["detections"][0]["bbox"] == [1, 2, 3, 4]
                assert before <= msg["timestamp"] <= time.time()
            assert stream_stats(d, "cam")["processed"] == 3 and accounted(d)
            async with ws_connect(d, "/ingest/other?welcome=1") as greeted:
                welcome = await recv_json(greeted)
                assert welcome["type"] == "welcome" and welcome["limits"]["send_buffer_messages"]

    run(scenario())


def test_browser_mode_query_options_drop_and_notify() -> None:
    """skip_frames and dropped_notices from the query: odd frames come back as JSON drops."""

    async def scenario() -> None:
        async with (
            running_daemon() as d,
            ws_connect(d, "/ingest/cam?skip_frames=2&dropped_notices=true") as ws,
        ):
            got: dict[int, dict[str, Any]] = {}
            for _ in range(6):
                await ws.send(IMG)
                msg = await recv_json(ws)
                got[msg["frame_id"]] = msg
            assert [got[i]["type"] for i in range(6)] == ["result", "dropped"] * 3
            assert {got[i]["reason"] for i in (1, 3, 5)} == {"skipped"}
            s = stream_stats(d, "cam")
            assert s["dropped_by_reason"]["skipped"] == 3 and s["options"]["skip_frames"] == 2
            assert accounted(d)

    run(scenario())


def test_auth_refuses_wrong_tokens_with_1008_and_accepts_right_ones() -> None:
    """With auth_token, both endpoints close 1008 without the token, serve with header or query."""

    async def scenario() -> None:
        async with running_daemon(auth_token="tok") as d:
            for path in ("/ingest", "/ingest/cam", "/ingest?token=bad", "/ingest/cam?token=bad"):
                async with ws_connect(d, path) as ws:
                    assert await closed_with(ws) == (1008, "missing or wrong token")
            headers = {"Authorization": "Bearer tok"}
            async with ws_connect(d, "/ingest", additional_headers=headers) as ws:
                await ws.send(frame("a", 7))
                assert (await recv_bin(ws))["frame_id"] == 7
            async with ws_connect(d, "/ingest/b?token=tok&welcome=1") as ws:
                assert (await recv_json(ws))["type"] == "welcome"
                await ws.send(IMG)
                assert (await recv_json(ws))["type"] == "result"
            assert stats(d)["ws_ingest"]["total"] == 2  # refused ones never reached the ingest

    run(scenario())


def test_text_message_gets_not_binary_and_close_1003() -> None:
    """A text message where binary is expected: an error in the mode's format, then 1003."""

    async def scenario() -> None:
        async with running_daemon() as d:
            async with ws_connect(d, "/ingest") as ws:
                await ws.send('{"type": "frame"}')
                err = await recv_bin(ws)
                assert err["type"] == "error" and err["code"] == "not_binary"
                assert (await closed_with(ws))[0] == 1003
            async with ws_connect(d, "/ingest/cam?welcome=1") as ws:
                assert (await recv_json(ws))["type"] == "welcome"
                await ws.send("data:image/jpeg;base64,AAAA")
                assert (await recv_json(ws))["code"] == "not_binary"
                assert (await closed_with(ws))[0] == 1003
            assert errors(d)["not_binary"] == 2

    run(scenario())


def test_oversized_message_is_refused_with_1009() -> None:
    """A message over max_message_bytes is refused unread with 1009 and counted; smaller pass."""

    async def scenario() -> None:
        async with running_daemon(max_message_bytes=64 * 1024) as d:
            async with ws_connect(d, "/ingest") as ws:
                await ws.send(frame("big", 0, IMG + b"\0" * (32 * 1024)))  # under the limit
                assert (await recv_bin(ws))["type"] == "result"
                await ws.send(frame("big", 1, IMG + b"\0" * (64 * 1024)))
                assert (await closed_with(ws))[0] == 1009
            async with ws_connect(d, "/ingest/cam") as ws:
                await ws.send(IMG + b"\0" * (64 * 1024 + 1))
                assert (await closed_with(ws))[0] == 1009
            await wait_for(lambda: errors(d).get("message_too_large") == 2, what="counted")
            await wait_for(lambda: stats(d)["ws_ingest"]["open"] == 0, what="closed")
            assert accounted(d)

    run(scenario())


def test_garbage_and_invalid_frames_get_errors_and_the_connection_stays() -> None:
    """Garbage msgpack, non-maps and invalid frame fields get TCP's errors; later frames pass."""

    async def scenario() -> None:
        async with running_daemon() as d, ws_connect(d, "/ingest") as ws:
            bad = [
                (b"\xc1\xc1garbage", "bad_msgpack", None),
                (pack([1, 2, 3]), "not_a_map", None),
                (pack({"type": "nope"}), "unknown_type", None),
                (frame("cam", "x"), "invalid", None),
                (frame("cam\n", 3), "bad_stream_name", 3),
                (frame("cam", 4, encoding="bmp"), "invalid", 4),
                (frame("cam", 5, timestamp=float("nan")), "invalid", 5),
                (frame("cam", 6, b"BM not an image"), "decode_error", 6),
            ]
            for body, code, frame_id in bad:
                await ws.send(body)
                err = await recv_bin(ws)
                assert (err["type"], err["code"], err.get("frame_id")) == ("error", code, frame_id)
            await ws.send(frame("cam", 9))
            assert (await recv_bin(ws))["frame_id"] == 9
            e = errors(d)
            assert e["bad_msgpack"] == 1 and e["invalid"] == 3 and e["decode_error"] == 1
            assert stats(d)["ws_ingest"]["open"] == 1 and accounted(d)

    run(scenario())


def test_unsupported_version_closes_with_1008() -> None:
    """A hello with another protocol version: unsupported_version, then close 1008."""

    async def scenario() -> None:
        async with running_daemon() as d, ws_connect(d, "/ingest") as ws:
            await ws.send(pack({"type": "hello", "version": 9}))
            assert (await recv_bin(ws))["code"] == "unsupported_version"
            assert await closed_with(ws) == (1008, "unsupported_version")

    run(scenario())


def test_browser_mode_refuses_non_jpeg_and_keeps_numbering() -> None:
    """Non-JPEG bytes in browser mode: decode_error with its frame_id; the next JPEG is served."""

    async def scenario() -> None:
        async with running_daemon() as d, ws_connect(d, "/ingest/cam?welcome=1") as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            await ws.send(b"\x89PNG\r\n\x1a\n not a jpeg")
            err = await recv_json(ws)
            assert (err["type"], err["code"], err["frame_id"]) == ("error", "decode_error", 0)
            await ws.send(IMG)
            assert (await recv_json(ws))["frame_id"] == 1
            assert errors(d)["decode_error"] == 1 and accounted(d)
            assert stream_stats(d, "cam")["processed"] == 1

    run(scenario())


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/ingest/cam?skip_frames=0", "invalid"),
        ("/ingest/cam?max_fps=fast", "invalid"),
        ("/ingest/cam?max_fps=nan", "invalid"),
        ("/ingest/cam?dropped_notices=maybe", "invalid"),
        ("/ingest/-cam", "bad_stream_name"),
    ],
)
def test_bad_query_options_close_1008_with_the_reason(path: str, code: str) -> None:
    """Browser-mode options are validated like a hello's: refused with close 1008, the error
    code and message as its reason, and no error message a client could take for a reply."""

    async def scenario() -> None:
        async with running_daemon() as d, ws_connect(d, path) as ws:
            close, reason = await closed_with(ws)
            assert close == 1008 and reason.startswith(f"{code}: "), reason
            assert errors(d)[code] == 1 and stats(d)["totals"]["received"] == 0

    run(scenario())


def test_connection_cap_closes_with_1013() -> None:
    """Past ws_ingest_max_connections a connection gets limit_exceeded and 1013; /stats counts it."""

    async def scenario() -> None:
        async with running_daemon(ws_ingest_max_connections=1) as d:
            async with ws_connect(d, "/ingest/a?welcome=1") as first:
                assert (await recv_json(first))["type"] == "welcome"
                async with ws_connect(d, "/ingest") as second:
                    assert (await recv_bin(second))["code"] == "limit_exceeded"
                    assert await closed_with(second) == (1013, "limit_exceeded")
                await first.send(IMG)
                assert (await recv_json(first))["type"] == "result"
            w = stats(d)["ws_ingest"]
            assert w["refused"] == 1 and w["total"] == 2

    run(scenario())


def test_silent_connections_time_out_with_1008() -> None:
    """No first message within hello_timeout_s (/ingest) or idle_timeout_s (browser): 1008."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=0.2, idle_timeout_s=0.3) as d:
            async with ws_connect(d, "/ingest") as ws:
                assert (await recv_bin(ws))["code"] == "hello_timeout"
                assert await closed_with(ws) == (1008, "hello_timeout")
            async with ws_connect(d, "/ingest/cam?welcome=1") as ws:
                assert (await recv_json(ws))["type"] == "welcome"
                assert (await recv_json(ws))["code"] == "idle_timeout"
                assert await closed_with(ws) == (1008, "idle_timeout")

    run(scenario())


def test_slow_reader_loses_results_past_send_buffer_and_stays_connected() -> None:
    """A client that stops reading loses results past send_buffer_messages (counted), stays open."""

    async def scenario() -> None:
        async with (
            running_daemon(big_results, send_buffer_messages=4) as d,
            ws_connect(d, "/ingest", max_queue=1) as ws,
        ):
            n = 200  # about 30 MB of results; the socket buffers hold far less
            for i in range(n):
                await ws.send(frame("deaf", i))
                await wait_for(lambda i=i: processed(d, "deaf") == i + 1)  # type: ignore[misc]
            snap = stats(d)
            lost = snap["streams"]["deaf"]["results_dropped"]
            assert lost > 0 and snap["totals"]["results_dropped"] == lost
            assert snap["ws_ingest"]["open"] == 1 and snap["ws_ingest"]["outbox_max"] <= 4
            for _ in range(n - lost):  # still connected: it reads what was kept, in order
                assert (await recv_bin(ws))["type"] == "result"
            await ws.send(frame("deaf", n))  # and is served as before
            assert (await recv_bin(ws))["frame_id"] == n
            await ws.send(pack({"type": "bye"}))
            assert (await recv_bin(ws))["type"] == "bye"
            assert (await closed_with(ws))[0] == 1000
            assert accounted(d) and "slow_consumer" not in errors(d)

    run(scenario())


def test_tcp_and_ws_streams_side_by_side_do_not_disturb_each_other() -> None:
    """A pushed TCP stream and a browser WS stream each get all their own results, in order."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.01), workers=1) as d:
            tcp = await connect(d)

            async def push_tcp() -> list[int]:
                ids = []
                for i in range(20):
                    await tcp.send_frame("tcpcam", i, IMG)
                    (msg,) = await collect(tcp, 1)
                    assert msg["type"] == "result" and msg["stream_name"] == "tcpcam"
                    ids.append(msg["frame_id"])
                return ids

            async def push_ws() -> list[int]:
                ids = []
                async with ws_connect(d, "/ingest/wscam?welcome=1") as ws:
                    assert (await recv_json(ws))["type"] == "welcome"
                    for _ in range(20):
                        await ws.send(IMG)
                        msg = await recv_json(ws)
                        assert msg["type"] == "result" and msg["stream_name"] == "wscam"
                        ids.append(msg["frame_id"])
                return ids

            tcp_ids, ws_ids = await asyncio.gather(push_tcp(), push_ws())
            assert tcp_ids == ws_ids == list(range(20))
            async with ws_connect(d, "/ingest/tcpcam") as ws:  # the TCP client holds it
                close, reason = await closed_with(ws)
                assert close == 1008 and reason.startswith("limit_exceeded: "), reason
            s = stats(d)["streams"]
            assert s["tcpcam"]["processed"] == 20 and s["wscam"]["processed"] == 20
            await wait_for(lambda: accounted(d), what="accounting")
            await tcp.close()

    run(scenario())


def test_shutdown_delivers_in_flight_results_then_closes_1001() -> None:
    """At shutdown a WS connection stops taking frames, gets its in-flight result, then 1001."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.5)) as d, ws_connect(d, "/ingest") as ws:
            await ws.send(frame("cam", 1))
            await wait_for(lambda: d.pipeline.in_flight() == 1, what="in flight")
            stopping = asyncio.create_task(d.shutdown())
            msg = await recv_bin(ws)
            assert (msg["type"], msg["frame_id"]) == ("result", 1)
            assert await closed_with(ws) == (1001, "daemon shutting down")
            await stopping
            assert d.pipeline.totals.processed == 1

    run(scenario())


def test_compression_is_not_negotiated_and_ingest_can_be_turned_off() -> None:
    """A client offering permessage-deflate gets none (no inflating on the event loop); with
    ws_ingest_max_connections = 0 both endpoints close with 1008 ("off", not worth a retry)."""

    async def main() -> None:
        async with running_daemon() as d:
            url = f"ws://127.0.0.1:{d.api_port}/ingest"
            async with websockets.connect(url, proxy=None, compression="deflate") as ws:
                assert ws.response is not None
                assert "sec-websocket-extensions" not in ws.response.headers
                await ws.send(frame("z", 0))
                assert (await recv_bin(ws))["type"] == "result"
        async with running_daemon(ws_ingest_max_connections=0) as d:
            async with ws_connect(d, "/ingest") as ws:
                error = await recv_bin(ws)
                assert error["type"] == "error" and "is off" in error["message"]
                assert await closed_with(ws) == (1008, "limit_exceeded")
            async with ws_connect(d, "/ingest/cam") as ws:
                close, reason = await closed_with(ws)
                assert close == 1008 and reason.startswith("limit_exceeded: ") and "off" in reason

    run(main())


def open_http_connections(d: Daemon) -> int:
    """Sockets the control plane holds (uvicorn's own set: HTTP and WebSocket alike)."""
    server = d.http._server
    return len(server.server_state.connections) if server is not None else 0


def test_a_peer_that_never_reads_is_aborted_after_the_close_grace() -> None:
    """A WebSocket peer that stops reading is cut off (its socket aborted) once its connection
    ended: a flushing close would hold the socket, and a control-plane slot, forever."""

    async def scenario() -> None:
        async with (
            # The idle time must outlast one frame's round on a loaded machine (CI ran out at 0.5 s).
            running_daemon(big_results, send_buffer_messages=4, idle_timeout_s=3.0) as d,
            # close_timeout: this client, its reading paused, would wait 10 s for a close it
            # cannot see; the test is about the daemon's side.
            ws_connect(d, "/ingest", max_queue=1, close_timeout=0.5) as ws,
        ):
            await ws.send(pack({"type": "hello", "version": 1}))
            for i in range(60):  # about 9 MB of results it never reads: the buffers fill
                await ws.send(frame("deaf", i))
                await wait_for(lambda i=i: processed(d, "deaf") == i + 1)  # type: ignore[misc]
            assert stats(d)["streams"]["deaf"]["results_dropped"] > 0  # they did fill
            # It then sends nothing: idle_timeout_s ends the connection, which cannot deliver.
            await wait_for(lambda: stats(d)["ws_ingest"]["open"] == 0, 15, "the connection to end")
            await wait_for(lambda: open_http_connections(d) == 0, 15, "its socket to be aborted")

    run(scenario())


async def send_one_read_one(d: Daemon, path: str, frames: int) -> str:
    """The simplest client there is: send a JPEG, read one JSON reply, again. Every reply must
    be the result of the frame it just sent; the stream name the replies carry."""
    names = set()
    async with ws_connect(d, path) as ws:
        for i in range(frames):
            await ws.send(IMG)
            msg = await recv_json(ws)
            assert (msg["type"], msg["frame_id"]) == ("result", i), msg
            names.add(msg["stream_name"])
    assert len(names) == 1, names
    return names.pop()


@pytest.mark.parametrize("clients", [1, 6])
def test_send_one_read_one_clients_get_the_reply_to_their_own_frame(clients: int) -> None:
    """1 and 6 such clients on one URL that names no stream (/ws/stream, the path simple
    clients of other servers ask for): each on a stream of its own, no error, no welcome."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.01)) as d:
            names = await asyncio.gather(
                *(send_one_read_one(d, "/ws/stream", 10) for _ in range(clients))
            )
            assert len(set(names)) == clients and all(n.startswith("ws-") for n in names)
            assert not any(errors(d).values()) and accounted(d)
            assert stats(d)["totals"]["processed"] == 10 * clients

    run(scenario())


def test_a_named_stream_in_use_is_refused_with_a_close_that_names_nobody() -> None:
    """A second browser connection for a stream another connection holds is closed with 1008
    and a reason, not given an error on an open socket; the reason names no address."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0)) as d:
            async with ws_connect(d, "/ingest/cam") as first:
                await first.send(IMG)
                assert (await recv_json(first))["frame_id"] == 0
                async with ws_connect(d, "/ingest/cam") as second:
                    close, reason = await closed_with(second)
                assert close == 1008 and reason.startswith("limit_exceeded: "), reason
                assert "127.0.0.1" not in reason and "in use" in reason
                await first.send(IMG)
                assert (await recv_json(first))["frame_id"] == 1
            assert errors(d)["limit_exceeded"] == 1 and accounted(d)

    run(scenario())


def test_the_readme_websocket_example_gets_a_reply_to_every_frame() -> None:
    """README.md's ten-line WebSocket client, run as written (port and video path swapped for
    the test's): 20 lines, each the reply to the frame it sent."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.sources import VIDEO

    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match is not None, "README.md has no python example"

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0)) as d:
            code = match.group(1).replace("127.0.0.1:8000", f"127.0.0.1:{d.api_port}")
            code = code.replace("../shared/data/vtest.avi", str(VIDEO))
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", code], capture_output=True, timeout=60
            )
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            lines = done.stdout.decode().splitlines()
            assert [line.split()[:2] for line in lines] == [[str(i), "result"] for i in range(20)]
            assert "thing" in lines[0]

    run(scenario())
