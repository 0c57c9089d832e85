"""Detectors that misbehave: calls that raise, hang, overrun worker_timeout_s or return odd types;
the worker is replaced or goes on, the frame is dropped with a reason, and good clients get
results again."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from tests.conftest import (
    SlowDetector,
    accounted,
    api,
    collect,
    connect,
    jpeg,
    metric,
    metrics,
    poll_stats,
    round_trip,
    run,
    running_daemon,
    settled_stats,
    stats,
    wait_for,
)
from vision_daemon import protocol as p
from vision_daemon.workers import MAX_ABANDONED_THREADS

pytestmark = pytest.mark.slow  # a live daemon on real sockets


IMG = jpeg(96, 128)


class NumpyConfDetector(SlowDetector):
    """Answers 50-pixel-wide images with numpy.float32 confidences and boxes (msgpack cannot pack them)."""

    def detect(self, images: Sequence[Any]) -> list[list[Any]]:
        out = super().detect(images)
        for img, dets in zip(images, out, strict=True):
            if img.shape[1] == 50:
                for i, det in enumerate(dets):
                    dets[i] = {
                        **det,
                        "conf": np.float32(0.5),
                        "bbox": [np.float32(v) for v in det["bbox"]],
                    }
        return out


def test_detector_returning_numpy_floats_does_not_kill_the_outcome_path() -> None:
    """numpy.float32 confidences: that frame is answered or dropped with a reason; later frames flow."""

    async def scenario() -> None:
        async with running_daemon(lambda: NumpyConfDetector(0.0), workers=1) as d, api(d) as h:
            good = await connect(d)
            await round_trip(good, "good", 0)
            odd = await connect(d)
            await odd.send_frame("odd", 7, jpeg(40, 50))
            try:
                (msg,) = await collect(odd, 1, timeout=5)
            except TimeoutError:
                raise AssertionError("numpy-float frame got neither result nor error") from None
            assert msg.get("frame_id") == 7, msg
            if msg["type"] == "result":  # converted to plain floats: fine
                assert math.isclose(msg["detections"][0]["conf"], 0.5), msg
            else:
                assert msg["type"] == "error", msg
            for i in range(1, 6):
                await round_trip(good, "good", i)
            await odd.send_frame("odd", 8, IMG)  # the same connection still works
            (again,) = await collect(odd, 1, timeout=5)
            assert again["type"] == "result" and again["frame_id"] == 8, again
            stats = await settled_stats(h, min_received=8)
            assert stats["totals"]["processed"] >= 7

    run(scenario())


def test_hung_detector_is_replaced_and_the_good_client_gets_results_again() -> None:
    """A detector call that never returns: worker_restarts rises in /metrics and frames flow again."""
    hang = threading.Event()  # never set while the daemon runs: the first model hangs for good
    built: list[SlowDetector] = []

    def factory() -> SlowDetector:
        det = SlowDetector(0.0, hang=hang if not built else None)
        built.append(det)
        return det

    async def scenario() -> None:
        async with running_daemon(factory, workers=1, worker_timeout_s=0.5) as d, api(d) as h:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 0, IMG)
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "dropped" and msg["reason"] == "worker_timeout", msg
            await wait_for(
                lambda: metrics(h),
                ok=lambda m: (
                    m.get(("vision_daemon_worker_restarts_total", (("worker", "0"),)), 0) >= 1
                ),
                what="vision_daemon_worker_restarts >= 1",
                interval=0.05,
            )
            got = False
            deadline = time.monotonic() + 8
            i = 0
            while not got and time.monotonic() < deadline:
                i += 1
                await c.send_frame("cam", i, IMG)
                try:
                    async with asyncio.timeout(1):
                        while (m := await c.recv()) is not None:
                            if m["type"] == "result":
                                got = True
                                break
                except TimeoutError:
                    pass
            assert got, "no result after the worker was replaced"
            await wait_for(
                lambda: h.get("/ready"),
                ok=lambda r: r.status_code == 200,
                what="/ready 200",
                interval=0.05,
            )
            await settled_stats(h, min_received=i + 1)

    try:
        run(scenario())
    finally:
        hang.set()  # let the abandoned thread end so the interpreter can exit


def test_a_worker_whose_abandoned_calls_pile_up_waits_for_them_and_comes_back() -> None:
    """Every call hangs: each frame drops as worker_timeout and the worker is replaced; with
    MAX_ABANDONED_THREADS calls still hung it is `stuck`, not retired, and once they end it is
    back: /ready 200, frames answered, every frame accounted."""
    hang = threading.Event()

    async def scenario() -> None:
        async with running_daemon(
            lambda: SlowDetector(0.0, hang=hang),
            workers=1,
            worker_timeout_s=0.3,
            max_frame_age_ms=10_000,
        ) as d:
            c = await connect(d, dropped_notices=True)
            for i in range(MAX_ABANDONED_THREADS):
                await c.send_frame("cam", i, IMG)
                (msg,) = await collect(c, 1, timeout=10)
                assert msg["type"] == "dropped" and msg["reason"] == "worker_timeout", msg
            await wait_for(
                lambda: stats(d)["workers"][0]["state"],
                5,
                "the worker stuck behind its hung calls",
                ok=lambda state: state == "stuck",
            )
            assert not d.ready()[0]
            hang.set()  # the hung calls return: their threads end
            async with api(d) as h:
                await wait_for(
                    lambda: h.get("/ready"),
                    5,
                    "/ready 200 once the hung calls ended",
                    ok=lambda r: r.status_code == 200,
                    interval=0.05,
                )
            await c.send_frame("cam", 10, IMG)
            (msg,) = await collect(c, 1)
            assert msg["type"] == "result" and msg["frame_id"] == 10, msg
            await wait_for(lambda: accounted(d), what="every frame accounted")
            await c.close()

    try:
        run(scenario())
    finally:
        hang.set()


class RaisesBaseException(SlowDetector):
    """Raises a BaseException (not an Exception) on its first call only."""

    def detect(self, images: Sequence[Any], **kw: Any) -> Any:
        if self.calls == 0:
            self.calls += 1
            raise KeyboardInterrupt("injected")
        return super().detect(images)


def test_a_worker_loop_failure_drops_its_frames_as_internal_error_and_recovers() -> None:
    """Anything escaping a worker's call ends its frames as counted drops; the worker restarts."""

    async def scenario() -> None:
        async with running_daemon(
            lambda: RaisesBaseException(0.0), workers=1, max_frame_age_ms=10_000
        ) as d:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 0, IMG)
            (msg,) = await collect(c, 1)
            assert msg["type"] == "dropped" and msg["reason"] == "internal_error", msg
            await c.send_frame("cam", 1, IMG)
            (msg,) = await collect(c, 1, timeout=10)  # after the supervisor's 1 s backoff
            assert msg["type"] == "result" and msg["frame_id"] == 1, msg
            await wait_for(lambda: accounted(d), what="accounted")

    run(scenario())


def test_detector_that_raises_answers_an_error_and_the_worker_goes_on() -> None:
    """Every third call raises: that frame gets detector_error, the others results, no restart."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.0, fail_every=3), workers=1) as d:
            c = await connect(d)
            replies = []
            for i in range(9):
                await c.send_frame("cam", i, IMG)
                replies += await collect(c, 1)
            errors = [m for m in replies if m["type"] == "error"]
            assert [m["frame_id"] for m in errors] == [2, 5, 8]
            assert {m["code"] for m in errors} == {p.E_DETECTOR}
            assert sum(m["type"] == "result" for m in replies) == 6
            async with api(d) as h:
                snap = await poll_stats(h, lambda s: s["workers"][0]["errors"] == 3)
            assert snap["workers"][0]["restarts"] == 0
            assert snap["totals"]["dropped_by_reason"]["detector_error"] == 3
            assert snap["errors"][p.E_DETECTOR] == 3
            assert await metric(d, "vision_daemon_detector_errors", worker="0") == 3

    run(scenario())


def test_stuck_worker_is_reported_replaced_and_its_frame_dropped() -> None:
    """A call past worker_timeout_s: worker_timeout drop, /stats and /ready show it, then recovery."""
    release = threading.Event()

    async def scenario() -> None:
        async with running_daemon(
            lambda: SlowDetector(0.0, hang=release), workers=1, worker_timeout_s=0.5
        ) as d:
            c = await connect(d, dropped_notices=True)
            async with api(d) as h:
                await c.send_frame("cam", 1, IMG)
                (msg,) = await collect(c, 1)
                assert msg == {
                    "type": "dropped",
                    "stream_name": "cam",
                    "frame_id": 1,
                    "reason": "worker_timeout",
                }
                ready = await h.get("/ready")
                worker = (await poll_stats(h, lambda s: s["workers"][0]["restarts"] == 1))[
                    "workers"
                ][0]
                assert ready.status_code == 503 and "worker" in ready.json()["reason"]
                assert worker["state"] in ("stuck", "restarting") and worker["restarts"] == 1
                assert await metric(d, "vision_daemon_worker_restarts", worker="0") == 1
                release.set()  # the replacement model does not hang
                await wait_for(lambda: stats(d)["ready"], timeout=10, what="worker restarted")
                await c.send_frame("cam", 2, IMG)
                (msg,) = await collect(c, 1)
                assert msg["type"] == "result" and msg["frame_id"] == 2
                assert (await h.get("/ready")).status_code == 200

    run(scenario())
