"""Server-advised rates as policy: the capacity estimate, max-min fair shares, hysteresis and the
pacer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.sources import Pacer
from tests.unit.test_policies import FakeSink, frame, make_pipeline
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
