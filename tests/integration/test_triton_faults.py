"""A Triton endpoint that misbehaves on purpose (tests/tritons.py's FakeTriton, real sockets):
replies trickled a byte a second, replies with too many rows. Issue 27."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import (
    GOOD_IMAGE,
    accounted,
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
