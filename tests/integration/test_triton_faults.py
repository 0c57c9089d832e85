"""A Triton endpoint that misbehaves on purpose (tests/tritons.py's FakeTriton, real sockets):
replies trickled a byte a second, replies with too many rows. Issue 27."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import (
    GOOD_IMAGE,
    accounted,
    api,
    collect,
    connect,
    run,
    running_daemon,
    stats,
    wait_for,
)
from tests.tritons import FakeTriton

pytestmark = pytest.mark.slow  # a live daemon and a fake Triton endpoint on real sockets


def backend(d: Any) -> dict[str, Any]:
    (b,) = stats(d)["backends"]
    return dict(b)


def test_a_trickled_reply_ends_at_backend_timeout_and_marks_the_endpoint_down() -> None:
    """A reply trickled at 1 byte/s ends the call within backend_timeout_s + 0.5 s, however
    slowly its bytes come: the frame gets backend_error and the endpoint is shown down."""
    with FakeTriton() as fake:

        async def scenario() -> None:
            async with running_daemon(
                model=fake.url,
                workers=1,
                backend_timeout_s=2.0,
                worker_timeout_s=4.0,
                backend_probe_s=60,  # the prober must not take it back during the test
            ) as d:
                c = await connect(d, dropped_notices=True)
                await c.send_frame("cam", 1, GOOD_IMAGE)
                (msg,) = await collect(c, 1)
                assert msg["type"] == "result", msg
                fake.mode = "trickle"
                t0 = time.monotonic()
                await c.send_frame("cam", 2, GOOD_IMAGE)
                (msg,) = await collect(c, 1)
                took = time.monotonic() - t0
                assert msg["type"] == "error" and msg["code"] == "backend_error", (took, msg)
                assert took <= 2.0 + 0.5, f"the call held its worker {took:.2f} s"
                b = backend(d)
                assert b["state"] == "down" and b["timeouts"] == 1, b
                assert "2.0 s" in b["last_error"], b
                await wait_for(lambda: accounted(d), what="every frame accounted")
                await c.close()

        run(scenario())


def test_workers_that_abandoned_trickled_calls_come_back_and_ready_recovers() -> None:
    """Three trickled frames, more than the workers, each abandoned at worker_timeout_s: every
    one ends with a counted reason, the worker is replaced each time (not retired), /ready is
    200 again within a few seconds once the endpoint behaves, and a good client gets 20 of 20."""
    with FakeTriton() as fake:

        async def scenario() -> None:
            async with running_daemon(
                model=fake.url,
                workers=1,
                backend_timeout_s=2.0,
                worker_timeout_s=0.5,  # shorter than the backend's: the worker gives up first
                backend_probe_s=0.2,
                max_frame_age_ms=10_000,
            ) as d:
                c = await connect(d, dropped_notices=True)
                await c.send_frame("cam", 0, GOOD_IMAGE)
                (msg,) = await collect(c, 1)
                assert msg["type"] == "result", msg
                fake.mode = "trickle"
                ends = []
                for i in (1, 2, 3):
                    await c.send_frame("cam", i, GOOD_IMAGE)
                    try:
                        (msg,) = await collect(c, 1, timeout=8)
                    except TimeoutError:
                        pytest.fail(f"trickled frame {i} not ended within 8 s (ended: {ends})")
                    ends.append(msg.get("reason") or msg.get("code"))
                assert set(ends) <= {"worker_timeout", "backend_error"}, ends
                assert "worker_timeout" in ends, ends
                fake.mode = "ok"
                t0 = time.monotonic()
                async with api(d) as h:
                    await wait_for(
                        lambda: h.get("/ready"),
                        6,
                        "/ready 200 once the endpoint behaves",
                        ok=lambda r: r.status_code == 200,
                        interval=0.05,
                    )
                recovered_s = time.monotonic() - t0
                got = 0
                for i in range(100, 120):
                    await c.send_frame("cam", i, GOOD_IMAGE)
                    (msg,) = await collect(c, 1)
                    got += msg["type"] == "result"
                assert got == 20, f"{got} of 20 frames answered ({recovered_s:.1f} s to ready)"
                snap = stats(d)
                assert snap["workers"][0]["restarts"] >= 1 and backend(d)["timeouts"] >= 1, snap
                await wait_for(lambda: accounted(d), what="every frame accounted")
                await c.close()

        run(scenario())


def test_a_reply_with_too_many_rows_is_refused_and_counted() -> None:
    """A reply carrying more detection rows than backend_max_detections (300) is refused as a
    backend error and counted; one at the bound is answered."""
    with FakeTriton() as fake:

        async def scenario() -> None:
            async with running_daemon(model=fake.url, workers=1, backend_probe_s=0.2) as d:
                c = await connect(d)
                fake.rows = 300
                await c.send_frame("cam", 1, GOOD_IMAGE)
                (msg,) = await collect(c, 1)
                assert msg["type"] == "result" and len(msg["detections"]) == 300, msg["type"]
                fake.rows = 301
                await c.send_frame("cam", 2, GOOD_IMAGE)
                (msg,) = await collect(c, 1)
                assert msg["type"] == "error" and msg["code"] == "backend_error", (
                    msg["type"],
                    len(msg.get("detections", [])),
                )
                assert "301 detection rows" in msg["message"], msg
                b = backend(d)
                assert b["refused"] == 1 and b["failures"] == 1, b
                assert stats(d)["totals"]["dropped_by_reason"]["backend_error"] == 1
                await wait_for(lambda: accounted(d), what="every frame accounted")
                await c.close()

        run(scenario())
