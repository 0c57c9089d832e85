"""Freshest-frame service as policy: which queued frame a stream's turn serves (`serve`: latest or
fifo)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_policies import FakeSink, accounted, frame, make_pipeline, take
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
