"""Freshest-frame service: which queued frame a stream's turn serves (`serve`: latest or fifo)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import SlowDetector, collect, connect, jpeg, run, running_daemon, until
from tests.conftest import accounted as daemon_accounted
from tests.test_units import FakeSink, accounted, frame, make_pipeline, take
from vision_daemon import protocol as p
from vision_daemon.config import ConfigError, load_config


def queued_three(serve: str | None = None, **cfg: Any) -> tuple[Any, ...]:
    """A stream with frames 0, 1, 2 queued (depth 3) and its options' `serve` as given, under
    the daemon's own default unless `serve_default` is given."""
    cfg.setdefault("serve_default", load_config(environ={}).serve_default)
    pipe, _, scheduler, _ = make_pipeline(queue_depth=3, **cfg)
    sink = FakeSink()
    options = p.StreamOptions() if serve is None else p.StreamOptions(serve=serve)
    for i in range(3):
        pipe.submit(sink, frame("cam", i), options)
    return pipe, scheduler, sink


def test_latest_serves_the_newest_frame_and_supersedes_the_older_ones() -> None:
    """By default a turn serves the newest queued frame; the older ones drop as superseded."""
    assert load_config(environ={}).serve_default == "latest"
    pipe, scheduler, sink = queued_three()
    (job,) = take(scheduler)
    assert job.frame.frame_id == 2
    pipe.drain()
    assert sink.drops == [("cam", 0, "superseded"), ("cam", 1, "superseded")]
    assert pipe.totals.dropped["superseded"] == 2
    assert pipe.streams["cam"].counts.dropped["superseded"] == 2
    assert accounted(pipe)


def test_fifo_serves_every_queued_frame_in_order() -> None:
    """serve=fifo (files, batch jobs) serves the oldest queued frame and drops none."""
    pipe, scheduler, sink = queued_three("fifo", max_in_flight_per_stream=3)
    ids = [job.frame.frame_id for job in take(scheduler) + take(scheduler) + take(scheduler)]
    pipe.drain()
    assert ids == [0, 1, 2] and sink.drops == []
    assert accounted(pipe)


def test_the_daemon_default_applies_when_the_client_names_no_policy() -> None:
    """`serve = "fifo"` in the config is the default; a client's own `latest` still wins."""
    _, scheduler, _ = queued_three(serve=None, serve_default="fifo")
    assert take(scheduler)[0].frame.frame_id == 0
    _, scheduler, _ = queued_three(serve="latest", serve_default="fifo")
    assert take(scheduler)[0].frame.frame_id == 2
    with pytest.raises(ConfigError, match="serve_default"):
        load_config(overrides={"serve_default": "newest"}, environ={})


def test_latest_still_drops_a_stale_newest_frame() -> None:
    """The newest frame is served only if it is younger than max_frame_age_ms."""
    pipe, clock, scheduler, _ = make_pipeline(
        queue_depth=2, max_frame_age_ms=100, serve_default="latest"
    )
    sink = FakeSink()
    pipe.submit(sink, frame("cam", 0), p.StreamOptions())
    pipe.submit(sink, frame("cam", 1), p.StreamOptions())
    clock.now += 0.5
    assert scheduler._take_now(1, set()) == []
    pipe.drain()
    assert sorted(sink.drops) == [("cam", 0, "superseded"), ("cam", 1, "stale")]
    assert accounted(pipe)


@pytest.mark.parametrize("value", ["latest", "fifo"])
def test_hello_options_take_serve(value: str) -> None:
    """`serve` in a hello's options (or per stream) is parsed and echoed in to_dict."""
    opts = p.parse_options({"serve": value})
    assert opts.serve == value and opts.to_dict()["serve"] == value
    assert p.parse_options({}).serve == ""  # the daemon's default applies


@pytest.mark.parametrize("value", ["newest", "", 1, None])
def test_hello_options_refuse_an_unknown_serve(value: Any) -> None:
    """Anything but latest or fifo is `invalid` (nil means absent: the default)."""
    if value is None:
        assert p.parse_options({"serve": None}).serve == ""
        return
    with pytest.raises(p.ProtocolError) as err:
        p.parse_options({"serve": value})
    assert err.value.code == p.E_INVALID


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
        await until(lambda: daemon_accounted(d))
        return results, drops, daemon_accounted(d)


@pytest.mark.slow
def test_a_burst_over_tcp_is_served_newest_first_by_default() -> None:
    """Over a real socket the newest frame gets its result; older queued ones drop as superseded
    (or queue_full when the queue overflowed first), each with its notice."""
    results, drops, ok = run(burst(None))
    assert 4 in results and ok
    assert "superseded" in drops.values()
    assert set(drops.values()) <= {"superseded", "queue_full"}
    assert sorted(results + list(drops)) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_a_client_asking_for_fifo_gets_its_queued_frames_in_order() -> None:
    """With `serve: fifo` in the hello, queued frames are analysed oldest first, none superseded."""
    results, drops, ok = run(burst("fifo"))
    assert ok and "superseded" not in drops.values()
    assert results == sorted(results) and len(results) >= 3
    assert sorted(results + list(drops)) == [0, 1, 2, 3, 4]
