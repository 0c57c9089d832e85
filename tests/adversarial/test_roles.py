"""Tokens with roles (issue 27): admin, viewer and ingest tokens from [[tokens]], stream patterns
for ingest over every transport, expiry, throttling per source address, and refusals counted by
plane, route and token name. Real sockets and real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from clients.lib import ClientError
from clients.transports import open_client
from tests.conftest import collect, jpeg, metrics, run, running_daemon, stats
from vision_daemon.lifecycle import Daemon
from vision_daemon.tokens import TokenConfig

pytestmark = pytest.mark.slow  # real sockets, daemons

ADMIN, VIEWER, DOOR = "admin-secret-1", "viewer-secret-1", "door-secret-1"
TOKENS = (
    TokenConfig("ops", "admin", token=ADMIN),
    TokenConfig("wall", "viewer", token_sha256=hashlib.sha256(VIEWER.encode()).hexdigest()),
    TokenConfig("door-cams", "ingest", token=DOOR, streams=("door-*",)),
    TokenConfig("old", "admin", token="expired-secret", expires="2020-01-01"),
)
IMG = jpeg(64, 64)


def client(d: Daemon, token: str | None, local: str = "127.0.0.1") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{d.api_port}",
        headers=headers,
        timeout=10,
        transport=httpx.AsyncHTTPTransport(local_address=local),
    )


async def refusals(d: Daemon, **labels: str) -> float:
    """vision_daemon_auth_refusals_total{labels}, read with the admin token from 127.0.0.3 (an
    address no test throttles)."""
    async with client(d, ADMIN, local="127.0.0.3") as h:
        samples = await metrics(h)
    return samples.get(("vision_daemon_auth_refusals_total", tuple(sorted(labels.items()))), 0.0)


def daemon(tmp_path: Path, **kw: Any) -> Any:
    return running_daemon(
        tokens=TOKENS, unix_socket=str(tmp_path / "d.sock"), auth_max_failures=5, **kw
    )


def test_a_viewer_reads_but_cannot_change_anything(tmp_path: Path) -> None:
    """A viewer token gets /stats, /cameras, /ws and /whoami; POST /cameras, PATCH and PUT
    answer 403, counted by route and token name; the admin token may do them."""

    async def main() -> None:
        async with daemon(tmp_path) as d, client(d, VIEWER) as v, client(d, ADMIN) as a:
            for path in ("/stats", "/cameras", "/metrics"):
                assert (await v.get(path)).status_code == 200, path
            assert (await v.get("/whoami")).json() == {"name": "wall", "role": "viewer"}
            camera = {"name": "x", "url": "rtsp://192.168.1.20/s"}
            writes = [
                v.post("/cameras", json=camera),
                v.patch("/streams/any", json={"skip_frames": 2}),
                v.put("/streams/any/analytics", json={"lines": []}),
                v.delete("/cameras/x"),
            ]
            for reply in await asyncio.gather(*writes):
                assert reply.status_code == 403, reply.text
                assert "'wall' (viewer) may not write" in reply.json()["detail"]
            url = f"ws://127.0.0.1:{d.api_port}/ws?token={VIEWER}"
            async with websockets.connect(url, proxy=None) as ws:
                await asyncio.sleep(0.1)
                assert ws.state.name == "OPEN"
            forbidden = await refusals(
                d,
                plane="http",
                route="/cameras",
                token="wall",
                reason="forbidden",
            )
            assert forbidden == 1
            assert (await a.post("/cameras", json=camera)).status_code == 201
            assert (await a.delete("/cameras/x")).status_code == 204

    run(main())


async def push(d: Daemon, transport: str, token: str, stream: str) -> dict[str, Any]:
    """One frame over `transport` with `token`; what comes back for it."""
    img = np.full((48, 64, 3), 90, np.uint8)
    kw: dict[str, Any] = {"token": token}
    if transport == "ws":
        c = await open_client("ws", api_port=d.api_port, **kw)
    else:
        c = await open_client(
            transport,
            port=d.tcp_port or 0,
            unix_socket=d.config.unix_socket,
            slot_bytes=img.size,
            **kw,
        )
    try:
        if transport == "shm":
            await c.send_image(stream, 0, img, "raw", img.shape)
        else:
            await c.send_image(stream, 0, IMG, "jpeg", None)
        (msg,) = await collect(c, 1)
        return dict(msg)
    finally:
        await c.close()


@pytest.mark.parametrize("transport", ["tcp", "unix", "shm", "ws"])
def test_an_ingest_token_pushes_only_its_streams(tmp_path: Path, transport: str) -> None:
    """door-* may push door-1 and is refused on yard-1 (unauthorized, counted, the connection
    stays for its own streams); it may not read /stats."""

    async def main() -> None:
        async with daemon(tmp_path) as d, client(d, DOOR) as h:
            ok = await push(d, transport, DOOR, "door-1")
            assert (ok["type"], ok["frame_id"]) == ("result", 0), ok
            no = await push(d, transport, DOOR, "yard-1")
            assert (no["type"], no["code"]) == ("error", "unauthorized"), no
            assert "'door-cams' (ingest) may not push stream 'yard-1'" in no["message"]
            assert "yard-1" not in stats(d)["streams"]
            assert (await h.get("/stats")).status_code == 403
            plane = "ws" if transport == "ws" else "tcp"
            refused = await refusals(
                d,
                plane=plane,
                route="frame",
                token="door-cams",
                reason="forbidden",
            )
            assert refused == 1

    run(main())


def test_a_browser_connection_for_a_stream_it_may_not_push_is_closed(tmp_path: Path) -> None:
    """Browser mode names its stream in the URL: one outside the token's patterns is closed
    with 1008 and the reason; a viewer token may not push at all."""

    async def main() -> None:
        async with daemon(tmp_path) as d:
            base = f"ws://127.0.0.1:{d.api_port}"
            async with websockets.connect(f"{base}/ingest/door-2?token={DOOR}", proxy=None) as ws:
                await ws.send(IMG)
                assert json.loads(await ws.recv())["type"] == "result"
            for path, token in (("/ingest/yard-2", DOOR), ("/ingest/door-3", VIEWER)):
                async with websockets.connect(f"{base}{path}?token={token}", proxy=None) as ws:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 10)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
                    assert "may not push" in closed.value.rcvd.reason

    run(main())


def test_an_expired_or_viewer_token_cannot_push_and_an_expired_one_cannot_read(
    tmp_path: Path,
) -> None:
    """The expired admin token: 401 on HTTP, unauthorized on a TCP hello; a viewer's hello is
    refused too (it may not push)."""

    async def main() -> None:
        async with daemon(tmp_path) as d, client(d, "expired-secret") as h:
            r = await h.get("/stats")
            assert r.status_code == 401 and "expired" in r.json()["detail"]
            for token, why in (("expired-secret", "expired"), (VIEWER, "may not push")):
                with pytest.raises(ClientError, match=why):
                    await open_client("tcp", port=d.tcp_port or 0, token=token)

    run(main())


def test_throttling_engages_after_n_failures_from_one_address_and_not_for_others(
    tmp_path: Path,
) -> None:
    """Five wrong tokens from 127.0.0.1: its next request is 429 even with the right token,
    and a TCP hello from it is refused too; 127.0.0.2 is not affected."""

    async def main() -> None:
        async with daemon(tmp_path) as d, client(d, "nope-nope") as bad, client(d, ADMIN) as a:
            for _ in range(5):
                assert (await bad.get("/stats")).status_code == 401
            r = await a.get("/stats")
            assert r.status_code == 429 and r.headers["retry-after"] == "60"
            with pytest.raises(ClientError, match="too many failed attempts"):
                await open_client("tcp", port=d.tcp_port or 0, token=DOOR)
            async with client(d, ADMIN, local="127.0.0.2") as other:
                assert (await other.get("/stats")).status_code == 200
            throttled = await refusals(
                d,
                plane="http",
                route="/stats",
                token="-",
                reason="throttled",
            )
            assert throttled == 1

    run(main())
