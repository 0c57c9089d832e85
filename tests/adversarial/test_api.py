"""Hostile use of the HTTP control plane: idle connections, the docs behind the token, and metric
label churn from streams that come and go."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import websockets

from tests.conftest import (
    SilentFlood,
    api,
    connect,
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
    wait_for,
)

pytestmark = pytest.mark.slow  # a live daemon on real sockets


TOKEN = "s3cret-token"


def test_idle_http_connections_do_not_starve_the_api_and_are_closed() -> None:
    """64 silent sockets on the API port: /health still answers and the server closes them."""

    async def scenario() -> None:
        async with running_daemon(http_max_connections=32, http_idle_timeout_s=2) as d:
            idle = [await asyncio.open_connection("127.0.0.1", d.api_port) for _ in range(64)]
            async with api(d) as h:
                r = await wait_for(
                    lambda: h.get("/health"),
                    ok=lambda r: r.status_code == 200,
                    timeout=6,
                    interval=0.05,
                )
                assert r.json()["status"] == "ok"
            closed = await asyncio.gather(*(read_until_closed(r, timeout=6) for r, _ in idle))
            assert all(closed), f"{closed.count(False)} of 64 idle sockets still open"
            for _, w in idle:
                w.close()
            good = await connect(d)
            await round_trip(good, "good", 0)

    run(scenario())


async def health_within(d: Any, seconds: float) -> str:
    """GET /health on a new connection that sends its request as it connects: "ok" if 200 came
    within `seconds`, else what did."""
    t0 = time.monotonic()
    request = b"GET /health HTTP/1.1\r\nhost: daemon\r\nconnection: close\r\n\r\n"
    writer = None
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await speak_at_once(d.api_port, request, seconds)
            status = await reader.readline()
    except (TimeoutError, OSError) as exc:
        return f"{exc!r} after {time.monotonic() - t0:.2f} s"
    finally:
        if writer is not None:
            writer.close()
    return "ok" if status.startswith(b"HTTP/1.1 200 ") else repr(status)


def test_a_thousand_silent_http_sockets_cannot_keep_health_out() -> None:
    """1,000 silent sockets on the API port, each re-opened as the daemon closes it: /health on a
    new connection answers 200 within 1 s, 5 times out of 5."""

    async def scenario() -> None:
        raise_fd_limit(2 * 1000 + 256)  # both ends of every socket are in this process
        async with running_daemon() as d:
            async with SilentFlood(d.api_port, 1000) as flood:
                await wait_for(
                    lambda: flood.closed >= 1000, what="the daemon closing silent sockets"
                )
                answers = [await health_within(d, 1.0) for _ in range(5)]
            assert answers == ["ok"] * 5, f"/health during the flood: {answers}"
            evicted = stats(d)["http"]["evicted"]
            assert evicted >= 1000
            assert await metric(d, "vision_daemon_connections_evicted", plane="http") >= evicted

    run(scenario())


def test_a_websocket_and_a_request_in_progress_are_never_closed_for_newcomers() -> None:
    """http_max_connections=8 under 100 silent sockets: a /ws subscriber and a PATCH whose body
    is still coming keep their connections; keep-alive ones between requests may go."""

    async def scenario() -> None:
        async with running_daemon(http_max_connections=8) as d:
            async with websockets.connect(f"ws://127.0.0.1:{d.api_port}/ws") as ws:
                head = b"PATCH /streams/cam HTTP/1.1\r\nhost: d\r\ncontent-type: application/json"
                body = b'{"max_fps": 2}'
                r, w = await speak_at_once(d.api_port, head + b"\r\ncontent-length: 14\r\n\r\n{")
                async with SilentFlood(d.api_port, 100) as flood:
                    await wait_for(lambda: flood.closed >= 100, what="silent sockets closed")
                    await asyncio.wait_for(await ws.ping(), 5)  # the subscriber is still there
                    w.write(body[1:])
                    status = await asyncio.wait_for(r.readline(), 5)
                assert status.startswith(b"HTTP/1.1 404 "), status  # answered: no stream "cam"
                w.close()
            assert stats(d)["http"]["evicted"] >= 100

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
                await wait_for(
                    lambda: metrics(h),
                    ok=lambda m: m.get(other, 0) >= 10,
                    what="_other >= 10",
                    interval=0.05,
                )
            )
            await leaving.close()
            await wait_for(
                lambda: h.get("/stats"),
                ok=lambda r: "c" not in r.json()["streams"],
                what="stream c expired",
                interval=0.05,
            )
            await round_trip(keep, "a", 99)
            a_recv = ("vision_daemon_frames_received_total", (("stream", "a"),))
            after = frame_counters(
                await wait_for(
                    lambda: metrics(h),
                    ok=lambda m: m.get(a_recv, 0) >= 4,
                    what="fresh scrape",
                    interval=0.05,
                )
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


def test_deeply_nested_json_is_refused_with_400_and_the_daemon_serves_on() -> None:
    """A body of 30,000 nested arrays (well under the body limit) and one nested 50 deep: 400
    with a one-line reason, never a 500; the API answers normally afterwards."""

    async def main() -> None:
        async with running_daemon() as d, api(d) as h:
            for body in ("[" * 30_000 + "]" * 30_000, '{"name": ' + "[" * 50 + "]" * 50 + "}"):
                for method, path in (("POST", "/cameras"), ("PUT", "/streams/x/analytics")):
                    r = await h.request(
                        method, path, content=body, headers={"content-type": "application/json"}
                    )
                    assert r.status_code == 400, (path, r.status_code, r.text[:200])
                    assert "nested" in r.json()["detail"]
            assert (await h.get("/stats")).status_code == 200

    run(main())


def test_two_webhooks_on_one_host_have_distinct_output_names() -> None:
    """Two webhook URLs on the same host and port (different paths): two outputs in /stats,
    each with its own name, neither hiding the other."""

    async def main() -> None:
        hooks = ["http://192.0.2.10:8080/a", "http://192.0.2.10:8080/b", "http://192.0.2.11/c"]
        async with running_daemon(webhook_urls=hooks) as d:
            names = [o["name"] for o in stats(d)["outputs"]]
            assert len(names) == 3 and len(set(names)) == 3, names
            assert names[:2] == ["webhook:192.0.2.10:8080", "webhook:192.0.2.10:8080#2"]

    run(main())
