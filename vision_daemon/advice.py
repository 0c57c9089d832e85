"""Server-advised rates over the live streams: what each stream asks for, and the share of the
estimated capacity it is told (the pure policy is vision_daemon/rates.py)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vision_daemon.rates import HEADROOM, Advisor, ServiceTime, fair_shares
from vision_daemon.streams import Stream

log = logging.getLogger(__name__)


class Advice:
    """The capacity estimate and the advisor, fed by the pipeline."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.service = ServiceTime()  # what a frame costs a worker: the capacity estimate
        self.advisor = Advisor()

    def advise(self, streams: Mapping[str, Stream], now: float) -> None:
        """Tell streams whose fair share of the estimated capacity changed.

        A stream's demand is the `source_fps` its client declared, else (a client that follows
        advice without saying its rate) as much as it can get, else (one that does not follow
        advice) the rate it sends at; `max_fps` caps each.
        """
        capacity = self.service.capacity_fps(self.workers)
        for name, fps in self.advisor.advise(now, capacity, demands(streams, now)).items():
            stream = streams[name]
            stream.advised_fps = fps
            if stream.sink is not None:
                try:
                    stream.sink.advise(name, fps)
                except Exception:  # a sink failing must not stop the others' advice
                    log.exception("advising stream %s failed", name)

    def newcomer_fps(self, streams: Mapping[str, Stream], now: float) -> float | None:
        """The rate a new stream asking for all it can get would be advised now (the welcome
        carries it to clients that follow advice); None before the first frame is measured."""
        capacity = self.service.capacity_fps(self.workers)
        if capacity is None:
            return None
        wants = demands(streams, now)
        newcomer = "new"
        while newcomer in wants:
            newcomer += "+"
        return round(fair_shares(capacity * HEADROOM, {**wants, newcomer: 0.0})[newcomer], 2)


def demands(streams: Mapping[str, Stream], now: float) -> dict[str, float]:
    """What each attached stream asks for (0: all it can get)."""
    out: dict[str, float] = {}
    for s in streams.values():
        if s.detached_at is not None or s.sink is None:
            continue
        if s.options.source_fps > 0:
            demand = s.options.source_fps
        elif s.sink.rate_advice:
            demand = 0.0  # unknown: all it can get
        else:
            demand = s.counts.recv_window.rate(now)
        if s.options.max_fps > 0:
            demand = min(demand, s.options.max_fps) if demand else s.options.max_fps
        out[s.name] = demand
    return out
