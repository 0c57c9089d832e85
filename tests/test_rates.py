"""Server-advised rates: the capacity estimate, max-min fair shares, hysteresis, and the wiring
from the pipeline to a client that follows the advice."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.sources import Pacer
from tests.conftest import SlowDetector, connect, jpeg, run, running_daemon, stats, until
from tests.test_units import FakeSink, frame, make_pipeline
from vision_daemon import protocol as p
from vision_daemon.rates import HEADROOM, Advisor, ServiceTime, fair_shares


def test_capacity_is_workers_over_the_mean_service_time() -> None:
    """Two workers at 50 ms a frame serve 40 fps; nothing is estimated before a frame is done."""
    svc = ServiceTime(alpha=0.5)
    assert svc.capacity_fps(2) is None
    svc.observe(50.0)
    assert svc.capacity_fps(2) == pytest.approx(40.0)
    svc.observe(150.0)  # the mean moves halfway (alpha 0.5)
    assert svc.capacity_fps(2) == pytest.approx(20.0)


def test_fair_shares_give_small_demands_what_they_ask_and_split_the_rest() -> None:
    """A 2 fps stream keeps 2; two greedy ones split the remaining 28; unknown (0) is greedy."""
    assert fair_shares(30.0, {"a": 2.0, "b": 50.0, "c": 0.0}) == {
        "a": 2.0,
        "b": 14.0,
        "c": 14.0,
    }
    assert fair_shares(30.0, {"a": 5.0, "b": 5.0}) == {"a": 5.0, "b": 5.0}


@given(
    st.floats(1, 500),
    st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 200), min_size=1, max_size=12),
)
def test_fair_shares_never_exceed_capacity_or_a_stated_demand(
    capacity: float, demands: dict[str, float]
) -> None:
    """Max-min fairness: the shares sum to at most the capacity, and no stream gets more than a
    stated demand; when someone is cut, all the capacity is handed out."""
    shares = fair_shares(capacity, demands)
    assert set(shares) == set(demands)
    assert sum(shares.values()) <= capacity * (1 + 1e-9)
    for k, d in demands.items():
        if d > 0:
            assert shares[k] <= d * (1 + 1e-9)
    if any(d == 0 or shares[k] < d * (1 - 1e-9) for k, d in demands.items()):
        assert sum(shares.values()) == pytest.approx(capacity)


def test_advice_changes_only_past_the_band_and_the_interval() -> None:
    """Hysteresis: a 10% move is not told, a 50% move is, but not within min_interval_s."""
    adv = Advisor(band=0.15, min_interval_s=2.0)
    assert adv.advise(0.0, 20.0 / HEADROOM, {"a": 0.0}) == {"a": 20.0}
    assert adv.advise(5.0, 22.0 / HEADROOM, {"a": 0.0}) == {}  # within the band
    assert adv.advise(5.5, 10.0 / HEADROOM, {"a": 0.0}) == {"a": 10.0}
    assert adv.advise(6.0, 40.0 / HEADROOM, {"a": 0.0}) == {}  # too soon after the last
    assert adv.advise(8.0, 40.0 / HEADROOM, {"a": 0.0}) == {"a": 40.0}
    assert adv.advise(9.0, None, {}) == {} and adv.told == {}  # gone streams are forgotten


def test_pipeline_advises_fair_shares_of_the_measured_capacity() -> None:
    """After frames cost 100 ms on 2 workers (20 fps), a 5 fps stream is told 5 and a 30 fps
    one the rest of HEADROOM x 20; each stream's advised rate is kept for /stats."""
    pipe, _, scheduler, _ = make_pipeline(workers=2)
    sink = FakeSink()
    for name, fps in (("slow", 5.0), ("fast", 30.0)):
        pipe.submit(sink, frame(name, 0), p.StreamOptions(source_fps=fps))
    pipe.service.observe(100.0)
    pipe.advise()
    rest = round(20.0 * HEADROOM - 5.0, 2)
    assert sorted(sink.advice) == [("fast", rest), ("slow", 5.0)]
    assert pipe.streams["fast"].advised_fps == rest
    assert scheduler.waiting == 2  # advice changes nothing about the frames themselves


def test_pacer_set_fps_changes_the_schedule_from_the_next_slot() -> None:
    """Slots after set_fps are spaced by the new period, anchored where the next one was due."""
    t = [0.0]
    pacer = Pacer(10.0, start=0.0, clock=lambda: t[0])
    assert pacer.due_time(1) == pytest.approx(0.1)
    pacer.slot = 1
    pacer.set_fps(5.0)
    assert pacer.due_time(1) == pytest.approx(0.1)
    assert pacer.due_time(3) == pytest.approx(0.5)
    assert pacer.start == 0.0  # the run's own zero is untouched


@pytest.mark.slow
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
            await until(lambda: bool(rates), 10, "a rate message")
            assert 0 < rates[0] < 50
            assert stats(d)["streams"]["advised"]["advised_fps"] == rates[-1]
            assert other == []
            for r in readers:
                r.cancel()
            await told.close()
            await quiet.close()

    run(scenario())


@pytest.mark.slow
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
            await until(lambda: stats(d)["totals"]["processed"] >= 3, 10, "3 frames processed")
            asked = await connect(d, rate_advice=True)
            quiet = await connect(d)
            assert asked.welcome is not None and quiet.welcome is not None
            assert "advised_fps" not in quiet.welcome
            # capacity about 10 fps (100 ms a frame, 1 worker), 90% of it split with "busy"
            assert 2.0 <= asked.welcome["advised_fps"] <= 9.0, asked.welcome
            for c in (early, sender, asked, quiet):
                await c.close()

    run(scenario())
