"""Freshest-frame service over TCP: a burst is served newest first, or in order when the client asks
for fifo."""

from __future__ import annotations

import pytest

from tests.conftest import SlowDetector, collect, connect, jpeg, run, running_daemon, wait_for
from tests.conftest import accounted as daemon_accounted

pytestmark = pytest.mark.slow  # a real daemon on real sockets


async def burst(serve: str | None) -> tuple[list[int], dict[int, str], bool]:
    """Five frames back to back on one stream while a slow detector works: which got results,
    which drops (by frame id), and whether the daemon accounts for every frame."""
    async with running_daemon(lambda: SlowDetector(0.2), workers=1, queue_depth=3) as d:
        opts = {"serve": serve} if serve else None
        c = await connect(d, dropped_notices=True, options=opts)
        for i in range(5):
            await c.send_frame("burst", i, jpeg())
        msgs = await collect(c, 5)
        await c.bye()
        results = [m["frame_id"] for m in msgs if m["type"] == "result"]
        drops = {m["frame_id"]: m["reason"] for m in msgs if m["type"] == "dropped"}
        await wait_for(lambda: daemon_accounted(d))
        return results, drops, daemon_accounted(d)


def test_a_burst_over_tcp_is_served_newest_first_by_default() -> None:
    """Over a real socket the newest frame gets its result; older queued ones drop as superseded
    (or queue_full when the queue overflowed first), each with its notice."""
    results, drops, ok = run(burst(None))
    assert 4 in results and ok
    assert "superseded" in drops.values()
    assert set(drops.values()) <= {"superseded", "queue_full"}
    assert sorted(results + list(drops)) == [0, 1, 2, 3, 4]


def test_a_client_asking_for_fifo_gets_its_queued_frames_in_order() -> None:
    """With `serve: fifo` in the hello, queued frames are analysed oldest first, none superseded."""
    results, drops, ok = run(burst("fifo"))
    assert ok and "superseded" not in drops.values()
    assert results == sorted(results) and len(results) >= 3
    assert sorted(results + list(drops)) == [0, 1, 2, 3, 4]
