"""Hostile use of the HTTP control plane: idle connections, the docs behind the token, and metric
label churn from streams that come and go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.lib import DaemonClient
from tests.conftest import (
    api,
    connect,
    jpeg,
    run,
    running_daemon,
)

pytestmark = pytest.mark.slow  # a live daemon on real sockets


IMG = jpeg(96, 128)


TOKEN = "s3cret-token"


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
