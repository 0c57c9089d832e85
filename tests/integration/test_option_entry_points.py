"""Every way a stream option enters the daemon decides alike: a hello, a browser's query string,
an operator's PATCH and a camera (POST /cameras) accept and refuse the same values, resolve them
to the same options, and show them in /streams/{name} and /cameras."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import pytest
import websockets

from tests.conftest import SlowDetector, jpeg, run, running_daemon
from vision_daemon import protocol as p
from vision_daemon.lifecycle import Daemon

# (option, value, accepted): the value as a client types it (msgpack / JSON / TOML types).
CASES: list[tuple[str, Any, bool]] = [
    ("skip_frames", 1, True),
    ("skip_frames", 3, True),
    ("skip_frames", 10_000, True),
    ("skip_frames", 10_001, True),  # a camera took it, a hello and a PATCH did not
    ("skip_frames", 100_000, True),
    ("skip_frames", 100_001, False),
    ("skip_frames", 0, False),
    ("skip_frames", 2.0, False),
    ("skip_frames", True, False),
    ("skip_frames", "3", False),
    ("max_fps", 0, True),
    ("max_fps", 2.5, True),
    ("max_fps", 1000, True),
    ("max_fps", 1000.5, False),
    ("max_fps", -1, False),
    ("max_fps", "fast", False),
    ("motion_gate", -1, True),  # the daemon's motion_gate
    ("motion_gate", 0, True),
    ("motion_gate", 0.3, True),
    ("motion_gate", 1.5, False),
    ("motion_gate", -0.5, False),
    ("track", True, True),
    ("track", False, True),
    ("track", "yes", False),
    ("track", 1.5, False),
    ("min_confidence", 0, True),
    ("min_confidence", 0.6, True),
    ("min_confidence", 1, True),
    ("min_confidence", 1.5, False),
    ("min_confidence", -0.1, False),
    ("serve", "fifo", True),
    ("serve", "latest", True),
    ("serve", "newest", False),
    ("source_fps", 12, True),
    ("source_fps", 1001, False),
]
# Options an operator may set with PATCH; the others belong to the stream's client.
OPERATOR = {"skip_frames", "max_fps", "motion_gate", "track", "min_confidence"}
DEAD_CAMERA = {"url": "rtsp://127.0.0.1:9/none", "retry_initial_s": 30}


def as_query(value: Any) -> str | None:
    """The value as a query parameter, or None where text cannot carry its type (a string
    "3" and the number 3 are the same text)."""
    if isinstance(value, str) and value[:1].isdigit():
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    size = p.HEADER.unpack(await reader.readexactly(p.HEADER_SIZE))[0]
    msg: dict[str, Any] = msgpack.unpackb(await reader.readexactly(size), raw=False)
    return msg


async def stream_options(
    h: httpx.AsyncClient, name: str, shows: tuple[str, Any] | None = None
) -> dict[str, Any]:
    """The stream's options as GET /streams/{name} shows them, once it shows the stream (and
    `shows`, an option and its value): the snapshot behind it is refreshed every 50 ms."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        r = await h.get(f"/streams/{name}")
        if r.status_code == 200:
            options: dict[str, Any] = r.json()["options"]
            if shows is None or options[shows[0]] == shows[1]:
                return options
        assert asyncio.get_running_loop().time() < deadline, f"{name} never showed"
        await asyncio.sleep(0.02)


async def via_hello(d: Daemon, h: httpx.AsyncClient, name: str, option: str, value: Any) -> Any:
    """A TCP hello with the option; then a frame, and the stream's options as /streams shows."""
    assert d.tcp_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", d.tcp_port)
    try:
        hello = {"type": "hello", "version": 1, "options": {option: value}}
        writer.write(p.pack(hello))
        reply = await asyncio.wait_for(read_message(reader), 10)
        if reply["type"] == "error":
            assert reply["code"] == p.E_INVALID, reply
            return None
        assert reply["type"] == "welcome", reply
        frame = {"type": "frame", "stream_name": name, "frame_id": 0, "image": jpeg(64, 64)}
        writer.write(p.pack(frame))
        return (await stream_options(h, name))[option]
    finally:
        writer.close()


async def via_query(d: Daemon, h: httpx.AsyncClient, name: str, option: str, text: str) -> Any:
    """WS /ingest/{name}?option=text&welcome=1 (browser mode): a welcome, or a close 1008
    whose reason is the error."""
    url = f"ws://127.0.0.1:{d.api_port}/ingest/{name}?{option}={quote(text)}&welcome=1"
    async with websockets.connect(url, proxy=None) as ws:
        try:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except websockets.exceptions.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1008, exc
            assert exc.rcvd.reason.startswith(f"{p.E_INVALID}: "), exc.rcvd.reason
            return None
        assert reply["type"] == "welcome", reply
        await ws.send(jpeg(64, 64))
        return (await stream_options(h, name))[option]


async def via_patch(h: httpx.AsyncClient, name: str, option: str, value: Any) -> Any:
    """PATCH /streams/{name}: 200 with the resolved options, or 422 with a one-line reason."""
    r = await h.patch(f"/streams/{name}", json={option: value})
    if r.status_code == 422:
        assert isinstance(r.json()["detail"], str)
        return None
    assert r.status_code == 200, r.text
    resolved = r.json()[option]
    await stream_options(h, name, (option, resolved))  # and /streams/{name} shows it
    return resolved


async def via_camera(h: httpx.AsyncClient, name: str, option: str, value: Any) -> Any:
    """POST /cameras with the option: 201 and the camera's own value in /cameras, or 422."""
    r = await h.post("/cameras", json={"name": name, **DEAD_CAMERA, option: value})
    if r.status_code == 422:
        assert isinstance(r.json()["detail"], str)
        return None
    assert r.status_code == 201, r.text
    try:
        shown = (await h.get(f"/cameras/{name}")).json()["options"]
        assert option in shown, f"/cameras does not show {option}"
        assert shown[option] == value or (value is None and shown[option] is None)
        return (await stream_options(h, name))[option]
    finally:
        assert (await h.delete(f"/cameras/{name}")).status_code == 204


@pytest.mark.slow
def test_every_entry_point_decides_and_resolves_an_option_alike() -> None:
    """A hello, a browser query, a PATCH and a camera accept and refuse the same values, and
    resolve accepted ones to the same options, shown in /streams/{name} and /cameras."""

    async def main() -> None:
        async with (
            running_daemon(lambda: SlowDetector(0.0), max_streams=512) as d,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}", timeout=10) as h,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            writer.write(p.pack({"type": "hello", "version": 1}))
            await read_message(reader)
            frame = {"type": "frame", "stream_name": "patched", "frame_id": 0, "image": jpeg()}
            writer.write(p.pack(frame))
            await stream_options(h, "patched")
            for i, (option, value, accepted) in enumerate(CASES):
                got = {
                    "hello": await via_hello(d, h, f"h{i}", option, value),
                    "camera": await via_camera(h, f"c{i}", option, value),
                }
                text = as_query(value)
                if text is not None:
                    got["query"] = await via_query(d, h, f"q{i}", option, text)
                if option in OPERATOR:
                    got["patch"] = await via_patch(h, "patched", option, value)
                decisions = {entry: v is not None for entry, v in got.items()}
                assert set(decisions.values()) == {accepted}, (option, value, got)
                if accepted:  # the daemon's motion_gate (0) stands in for -1
                    expected = 0.0 if (option, value) == ("motion_gate", -1) else value
                    assert all(v == expected for v in got.values()), (option, value, got)
            writer.close()

    run(main())


@pytest.mark.slow
def test_min_confidence_leaves_out_weaker_detections_per_stream() -> None:
    """A stream's min_confidence drops its detections under it (the detector scores 0.9) and
    leaves other streams' alone."""

    async def main() -> None:
        async with running_daemon(lambda: SlowDetector(0.0)) as d:
            reader, writer = await asyncio.open_connection("127.0.0.1", d.tcp_port)
            streams = {"strict": {"min_confidence": 0.95}, "loose": {"min_confidence": 0.5}}
            writer.write(p.pack({"type": "hello", "version": 1, "streams": streams}))
            assert (await read_message(reader))["type"] == "welcome"
            boxes = {}
            for i, name in enumerate(["strict", "loose", "plain"]):
                frame = {"type": "frame", "stream_name": name, "frame_id": i, "image": jpeg()}
                writer.write(p.pack(frame))
                result = await asyncio.wait_for(read_message(reader), 10)
                assert result["type"] == "result", result
                boxes[result["stream_name"]] = len(result["detections"])
            assert boxes == {"strict": 0, "loose": 1, "plain": 1}
            writer.close()

    run(main())
