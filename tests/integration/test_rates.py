"""Server-advised rates end to end: from the pipeline to a client that follows the advice."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import SlowDetector, connect, jpeg, run, running_daemon, stats, wait_for

pytestmark = pytest.mark.slow  # a real daemon on real sockets


def test_a_client_that_asked_for_advice_is_told_and_slows_down() -> None:
    """Over TCP, a client with rate_advice asking 50 fps of a 10 fps daemon gets a `rate`
    message below 50; a client that did not ask gets none."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.1), workers=1, stream_grace_s=0.2) as d:
            told = await connect(d, rate_advice=True, options={"source_fps": 50.0})
            quiet = await connect(d)
            rates: list[float] = []
            other: list[str] = []

            async def read(c: object, out: list) -> None:  # type: ignore[type-arg]
                async for m in c.messages():  # type: ignore[attr-defined]
                    if m["type"] == "rate":
                        out.append(m["fps"] if out is rates else m["type"])

            readers = [
                asyncio.create_task(read(told, rates)),
                asyncio.create_task(read(quiet, other)),
            ]
            for i in range(30):
                await told.send_frame("advised", i, jpeg())
                await quiet.send_frame("legacy", i, jpeg())
                await asyncio.sleep(0.02)
            await wait_for(lambda: bool(rates), 10, "a rate message")
            assert 0 < rates[0] < 50
            assert stats(d)["streams"]["advised"]["advised_fps"] == rates[-1]
            assert other == []
            for r in readers:
                r.cancel()
            await told.close()
            await quiet.close()

    run(scenario())


def test_the_welcome_tells_a_client_that_follows_advice_the_rate_it_will_get() -> None:
    """Once a frame has been measured, the welcome to a `rate_advice` client carries
    `advised_fps`: the share of 90% of the capacity a new stream would get next to the streams
    already there. Before any measurement, and to clients that do not ask, there is none."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.1), workers=1) as d:
            early = await connect(d, rate_advice=True)
            assert early.welcome is not None and "advised_fps" not in early.welcome
            sender = await connect(d)
            for i in range(4):
                await sender.send_frame("busy", i, jpeg())
                await asyncio.sleep(0.12)
            await wait_for(lambda: stats(d)["totals"]["processed"] >= 3, 10, "3 frames processed")
            asked = await connect(d, rate_advice=True)
            quiet = await connect(d)
            assert asked.welcome is not None and quiet.welcome is not None
            assert "advised_fps" not in quiet.welcome
            # capacity about 10 fps (100 ms a frame, 1 worker), 90% of it split with "busy"
            assert 2.0 <= asked.welcome["advised_fps"] <= 9.0, asked.welcome
            for c in (early, sender, asked, quiet):
                await c.close()

    run(scenario())
