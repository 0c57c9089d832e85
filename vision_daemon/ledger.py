"""One ledger for every frame's fate: a single call records it in the daemon's totals, its
stream's counts and Prometheus together, so the three cannot disagree.

received = processed + dropped by reason + queued + in flight holds for the totals and for each
stream because every entry and exit goes through here.
"""

from __future__ import annotations

from collections import Counter

from vision_daemon.metrics import Metrics
from vision_daemon.stats import Counts
from vision_daemon.streams import Stream


class Ledger:
    """The daemon's frame accounting and its protocol-error counts."""

    def __init__(self, metrics: Metrics, window_s: float) -> None:
        self.metrics = metrics
        self.totals = Counts(window_s)
        self.errors: Counter[str] = Counter()  # refused messages by protocol error code
        self.last_latency_ms: float | None = None

    def received(self, stream: Stream | None, now: float) -> None:
        """A frame came in (for a stream, or refused before it had one)."""
        self.totals.on_received(now)
        if stream is not None:
            stream.counts.on_received(now)
            self.metrics.on_received(stream.metric_label)

    def dropped(self, stream: Stream | None, reason: str) -> None:
        """A frame ended without a result, for `reason`."""
        self.totals.on_dropped(reason)
        if stream is not None:
            stream.counts.on_dropped(reason)
        self.metrics.on_dropped(stream.metric_label if stream else None, reason)

    def processed(
        self, stream: Stream, now: float, timings: dict[str, float], reused: bool
    ) -> None:
        """A frame ended with a result (`reused`: motion gating answered it without inference)."""
        self.last_latency_ms = timings["total_ms"]
        stream.counts.on_processed(now, timings)
        self.totals.on_processed(now, timings)
        self.metrics.on_processed(stream.metric_label, timings)
        if reused:
            stream.counts.unchanged += 1
            self.totals.unchanged += 1
            self.metrics.unchanged.labels(stream.metric_label).inc()

    def result_lost(self, stream: Stream) -> None:
        """A result its sink had no room for (processed, but not delivered)."""
        stream.counts.results_dropped += 1
        self.totals.results_dropped += 1
        self.metrics.results_dropped.inc()

    def error(self, code: str) -> None:
        """A refused message, by protocol error code."""
        self.errors[code] += 1
        self.metrics.errors.labels(code).inc()
