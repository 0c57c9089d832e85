"""Server-advised rates: how many frames a second the daemon will actually serve each stream.

A pure policy (no clocks of its own, no I/O): the pipeline feeds it what workers measured and
what each stream asks for, and sends what it advises to the clients that asked for advice.

- `ServiceTime`: an exponentially weighted mean of what one frame costs a worker (decode plus
  inference, as measured under the load of the moment, so two workers sharing cores show it).
  Capacity is `workers * 1000 / mean_ms`.
- `fair_shares`: max-min fairness (water-filling). A stream asking for less than an equal share
  gets what it asks; what it leaves is split among the others. A stream's demand is its
  client's declared `source_fps` (the rate it would send unadvised), else the rate it sends at,
  capped by its own `max_fps`.
- `Advisor`: hysteresis. A stream hears a new rate only when the advice moved by more than
  `band` (15%) from what it was last told, and at most every `min_interval_s`, so clients do not
  oscillate with the estimator's noise.
"""

from __future__ import annotations

from collections.abc import Mapping

# The share of the estimated capacity that is advised. Measured at 8 x 10 fps (PERFORMANCE.md):
# 0.9 gave no drops and a lower p99 than unadvised clients, at 15% less throughput; 1.0 kept the
# throughput but its latency swung between runs (p99 103 and 194 ms) with the estimate's noise.
HEADROOM = 0.9


class ServiceTime:
    """What a frame costs a worker, in ms: an exponentially weighted mean of observations."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.mean_ms: float | None = None

    def observe(self, ms: float) -> None:
        if ms <= 0:
            return
        self.mean_ms = (
            ms if self.mean_ms is None else self.mean_ms + self.alpha * (ms - self.mean_ms)
        )

    def capacity_fps(self, workers: int) -> float | None:
        """Frames a second the workers can serve; None before the first observation."""
        if self.mean_ms is None:
            return None
        return workers * 1000.0 / self.mean_ms


def fair_shares(capacity: float, demands: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair split of `capacity` among streams wanting `demands` (fps; 0 = unknown, which
    counts as wanting as much as it can get)."""
    shares: dict[str, float] = {}
    left = capacity
    pending = dict(demands)
    while pending:
        equal = left / len(pending)
        small = {k: d for k, d in pending.items() if 0 < d <= equal}
        if not small:  # everyone left wants more than an equal share: they split it
            shares.update(dict.fromkeys(pending, equal))
            break
        for k, d in small.items():
            shares[k] = d
            left -= d
            del pending[k]
    return shares


class Advisor:
    """What each stream was last told, and when; `advise` returns only the changes to send."""

    def __init__(self, band: float = 0.15, min_interval_s: float = 2.0) -> None:
        self.band = band
        self.min_interval_s = min_interval_s
        self.told: dict[str, tuple[float, float]] = {}  # stream -> (fps, when)

    def advise(
        self, now: float, capacity: float | None, demands: Mapping[str, float]
    ) -> dict[str, float]:
        """The streams whose advised rate should change now, with the new rate (fps)."""
        for gone in set(self.told) - set(demands):
            del self.told[gone]
        if capacity is None or not demands:
            return {}
        changes: dict[str, float] = {}
        for name, fps in fair_shares(capacity * HEADROOM, demands).items():
            fps = round(fps, 2)
            last = self.told.get(name)
            if last is not None:
                told, when = last
                if now - when < self.min_interval_s or abs(fps - told) <= self.band * told:
                    continue
            self.told[name] = (fps, now)
            changes[name] = fps
        return changes
