"""Hostile /ws subscribers: wrong tokens, too many subscribers and subscribers that never read; the
token never reaches a log and ingest is not slowed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import websockets

from tests.conftest import (
    api,
    big_results,
    collect,
    connect,
    jpeg,
    metric,
    poll_stats,
    round_trip,
    run,
    running_daemon,
    stats,
    wait_for,
)

pytestmark = pytest.mark.slow  # a live daemon on real sockets


IMG = jpeg(96, 128)


TOKEN = "s3cret-token"


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
            async with api(d) as h:
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


def ws_settled(s: dict[str, Any], n: int) -> bool:
    """Every one of n results is sent, dropped, queued or being sent to the one subscriber."""
    clients = s["ws"]["clients"]
    return (
        bool(clients) and sum(clients[0][k] for k in ("sent", "dropped", "queued", "sending")) == n
    )


def test_stalled_ws_subscriber_loses_its_oldest_messages_not_ingest() -> None:
    """A /ws subscriber that never reads overflows its own queue (counted in /stats); TCP flows."""
    import websockets

    async def scenario() -> None:
        async with running_daemon(big_results, ws_queue=4) as d:
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            async with websockets.connect(url, max_size=2**24, max_queue=1, compression=None):
                await wait_for(lambda: stats(d)["ws"]["subscribers"] == 1, what="subscriber")
                c = await connect(d)
                for i in range(200):
                    await c.send_frame("cam", i, IMG)
                    (msg,) = await collect(c, 1)
                    assert msg["type"] == "result"
                async with api(d) as h:
                    ws = (await poll_stats(h, lambda s: ws_settled(s, 200)))["ws"]
                (sub,) = ws["clients"]
                assert sub["dropped"] > 0 and sub["queued"] <= 4
                assert sub["sent"] + sub["dropped"] + sub["queued"] + sub["sending"] == 200
                assert await metric(d, "vision_daemon_ws_messages_dropped") >= sub["dropped"]
                await c.close()

    run(scenario())
