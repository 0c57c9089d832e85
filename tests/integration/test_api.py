"""Control plane over real HTTP and WebSocket clients against a daemon on ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    SlowDetector,
    api,
    collect,
    connect,
    jpeg,
    poll_stats,
    run,
    running_daemon,
    stats,
    wait_for,
)
from vision_daemon.config import load_config
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, models or subprocesses

IMG = jpeg(96, 128)


def per_stream(text: str, family: str) -> dict[str, float]:
    """A counter family's per-stream totals, parsed with prometheus_client's own parser."""
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["stream"]: s.value for s in fams[family].samples if s.name.endswith("_total")}


def test_ready_is_503_while_warming_then_200() -> None:
    """/health answers during warm-up while /ready says 503 with the reason, then 200."""

    class Gated(SlowDetector):
        gate = threading.Event()

        def warmup(self) -> None:
            self.gate.wait(30)

    async def scenario() -> None:
        cfg = load_config(
            overrides={"model": "none", "tcp_port": 0, "api_port": 0, "log_dir": ""}, environ={}
        )
        d = Daemon(cfg, factory=lambda: Gated(0.0))
        start = asyncio.create_task(d.start())
        try:
            await wait_for(lambda: d.api_port is not None, what="api bound")
            async with api(d) as h:
                await wait_for(lambda: d.api_port is not None, what="api listening")
                assert (await h.get("/health")).status_code == 200
                r = await h.get("/ready")
                assert r.status_code == 503 and "warming" in r.json()["reason"]
                Gated.gate.set()
                await start
                r = await h.get("/ready")
                assert r.status_code == 200 and r.json()["ready"] is True
        finally:
            Gated.gate.set()
            await d.shutdown()

    run(scenario())


def test_stats_streams_and_metrics_agree_with_clients() -> None:
    """/stats totals and per-stream counts match what clients sent; /metrics parses."""

    async def scenario() -> None:
        async with running_daemon() as d:
            c = await connect(d, dropped_notices=True)
            for i in range(10):
                await c.send_frame("a", i, IMG)
                await c.send_frame("b", i, IMG)
                await asyncio.sleep(0.02)
            # Every frame comes back as a result or a drop notice (on a loaded box a frame may
            # be evicted by the next one; /stats must then say so too).
            answers = await collect(c, 20)
            results = Counter(m["stream_name"] for m in answers if m["type"] == "result")
            drops = sum(m["type"] == "dropped" for m in answers)
            async with api(d) as h:
                s = await poll_stats(h, lambda s: s["processed_frames"] == sum(results.values()))
                assert s["total_frames"] == 20
                assert s["dropped_frames"] == drops and s["queue_size"] == 0
                assert s["streams"]["a"]["processed"] == results["a"] >= 1
                assert s["streams"]["b"]["received"] == 10
                assert s["streams"]["a"]["latency_ms"]["total"]["p50"] is not None
                assert s["model"]["name"] == "none" and len(s["workers"]) == 2
                assert set(s["totals"]["dropped_by_reason"]) >= {"queue_full", "stale", "throttled"}
                one = await h.get("/streams/a")
                assert one.status_code == 200 and one.json()["received"] == 10
                assert (await h.get("/streams/zzz")).status_code == 404
                text = (await h.get("/metrics")).text
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            assert per_stream(text, "vision_daemon_frames_processed") == {
                "a": float(results["a"]),
                "b": float(results["b"]),
            }
            assert "vision_daemon_latency_seconds" in fams and "vision_daemon_queue_depth" in fams

    run(scenario())


def test_metrics_stream_labels_are_capped() -> None:
    """Past metrics_max_streams, further streams are summed under stream='_other'."""

    async def scenario() -> None:
        async with running_daemon(metrics_max_streams=2) as d:
            c = await connect(d)
            for name in ("s1", "s2", "s3", "s4"):
                await c.send_frame(name, 1, IMG)
            await collect(c, 4)
            async with api(d) as h:
                text = (await h.get("/metrics")).text
            labels = per_stream(text, "vision_daemon_frames_received")
            assert labels == {"s1": 1.0, "s2": 1.0, "_other": 2.0}

    run(scenario())


def test_ws_filters_by_stream_and_a_stalled_subscriber_does_not_slow_ingest() -> None:
    """?stream= filters; a /ws subscriber that never reads loses its oldest messages, not throughput."""

    async def scenario() -> None:
        async with running_daemon(ws_queue=4) as d:
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            async with (
                websockets.connect(f"{url}?stream=a") as only_a,
                websockets.connect(url, max_size=2**20) as stalled,
            ):
                await wait_for(lambda: stats(d)["ws"]["subscribers"] == 2, what="subscribers")
                c = await connect(d)
                t0 = time.monotonic()
                for i in range(200):
                    await c.send_frame("a" if i % 2 else "b", i, IMG)
                    await asyncio.sleep(0.003)
                results = await collect(c, 200, timeout=30)
                elapsed = time.monotonic() - t0
                assert all(m["type"] == "result" for m in results)
                assert elapsed < 15
                first: dict[str, Any] = json.loads(await asyncio.wait_for(only_a.recv(), 5))
                assert first["stream_name"] == "a" and "timings" in first and "detections" in first
                seen = {first["stream_name"]}
                try:
                    while True:
                        seen.add(
                            json.loads(await asyncio.wait_for(only_a.recv(), 0.5))["stream_name"]
                        )
                except TimeoutError:
                    pass
                assert seen == {"a"}
                async with api(d) as h:
                    ws = (await poll_stats(h, lambda s: s["ws"]["subscribers"] == 2))["ws"]
                assert ws["subscribers"] == 2
                del stalled  # never read: its queue overflowed or the socket buffered it

    run(scenario())


def test_token_guards_http_and_ws_but_not_health() -> None:
    """With a token, HTTP without it is 401, /ws closes with 1008, /health stays open."""

    async def scenario() -> None:
        async with running_daemon(auth_token="tok") as d:
            async with api(d) as h:
                assert (await h.get("/health")).status_code == 200
                for path in ("/ready", "/stats", "/metrics", "/streams/x"):
                    assert (await h.get(path)).status_code == 401, path
            async with api(d, "tok") as h:
                assert (await h.get("/stats")).status_code == 200
                assert (await h.get("/stats?token=bad")).status_code == 200  # header wins
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            try:
                async with websockets.connect(url) as ws:
                    await ws.recv()
                raise AssertionError("unauthenticated /ws was accepted")
            except websockets.exceptions.ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 1008
            except websockets.exceptions.InvalidStatus:
                pass  # refused before the upgrade: also a refusal
            async with websockets.connect(f"{url}?token=tok") as ws:
                await wait_for(
                    lambda: stats(d)["ws"]["subscribers"] == 1, what="authorised subscriber"
                )

    run(scenario())


def test_api_host_binds_only_the_given_address() -> None:
    """--api-host / --tcp-host choose the bind address: 127.0.0.2 answers, 127.0.0.1 does not."""

    async def scenario() -> None:
        async with running_daemon(api_host="127.0.0.2", tcp_host="127.0.0.2") as d:
            async with httpx.AsyncClient(timeout=5) as h:
                r = await h.get(f"http://127.0.0.2:{d.api_port}/health")
                assert r.status_code == 200
                try:
                    await h.get(f"http://127.0.0.1:{d.api_port}/health")
                    raise AssertionError("the API answered on an address it was not bound to")
                except httpx.ConnectError:
                    pass
            from clients.lib import DaemonClient

            c = await DaemonClient.connect("127.0.0.2", d.tcp_port or 0)
            await c.send_frame("cam", 0, IMG)
            assert (await collect(c, 1))[0]["type"] == "result"
            await c.close()

    run(scenario())
