"""Prometheus exposition: counters and gauges read at scrape time, plus latency histograms."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vision_daemon.stats import DROP_REASONS

if TYPE_CHECKING:
    from vision_daemon.server import Daemon

OTHER = "_other"
BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics(Collector):
    """One registry per daemon (tests run several); stream labels capped at metrics_max_streams."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=False)
        self._labelled: dict[str, str] = {}
        self.latency = Histogram(
            "vision_daemon_latency_seconds",
            "Server-side time per processed frame by stage (queue wait, decode, inference, total)",
            ["stage"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(self)
        daemon.observers.append(self)

    def label(self, stream: str) -> str:
        label = self._labelled.get(stream)
        if label is None:
            cap = self.daemon.config.metrics_max_streams
            label = stream if len(self._labelled) < cap else OTHER
            if label != OTHER:
                self._labelled[stream] = label
        return label

    # observer hooks, called by the daemon where things happen
    def on_processed(self, stream: str, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.latency.labels(stage.removesuffix("_ms")).observe(ms / 1000)

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        received = CounterMetricFamily(
            "vision_daemon_frames_received", "Frames received", labels=["stream"]
        )
        processed = CounterMetricFamily(
            "vision_daemon_frames_processed", "Frames processed", labels=["stream"]
        )
        dropped = CounterMetricFamily(
            "vision_daemon_frames_dropped", "Frames dropped by reason", labels=["stream", "reason"]
        )
        queue = GaugeMetricFamily(
            "vision_daemon_queue_depth", "Frames waiting per stream", labels=["stream"]
        )
        sums: dict[str, list[int]] = {}
        drops: dict[tuple[str, str], int] = {}
        depth: dict[str, int] = {}
        for name, s in d.streams.items():
            label = self.label(name)
            acc = sums.setdefault(label, [0, 0])
            acc[0] += s.counts.received
            acc[1] += s.counts.processed
            depth[label] = depth.get(label, 0) + len(s.queue)
            for reason in DROP_REASONS:
                drops[(label, reason)] = drops.get((label, reason), 0) + s.counts.dropped.get(
                    reason, 0
                )
        for label, (r, pr) in sums.items():
            received.add_metric([label], r)
            processed.add_metric([label], pr)
            queue.add_metric([label], depth[label])
        for (label, reason), n in drops.items():
            dropped.add_metric([label, reason], n)
        yield received
        yield processed
        yield dropped
        yield queue
        totals = CounterMetricFamily(
            "vision_daemon_frames_dropped_all",
            "Frames dropped by reason, all streams (incl. removed)",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            totals.add_metric([reason], d.totals.dropped.get(reason, 0))
        yield totals
        errors = CounterMetricFamily(
            "vision_daemon_protocol_errors", "Refused messages by error code", labels=["code"]
        )
        for code, n in d.errors.items():
            errors.add_metric([code], n)
        yield errors
        batches = CounterMetricFamily(
            "vision_daemon_batches", "Detector calls by batch size", labels=["size"]
        )
        if d.pool is not None:
            for size, n in sorted(d.pool.batch_sizes.items()):
                batches.add_metric([str(size)], n)
        yield batches
        workers = d.pool.workers if d.pool else []
        yield GaugeMetricFamily("vision_daemon_workers", "Inference workers", value=len(workers))
        restarts = CounterMetricFamily(
            "vision_daemon_worker_restarts",
            "Workers replaced after a stuck call",
            labels=["worker"],
        )
        failures = CounterMetricFamily(
            "vision_daemon_detector_errors", "Detector calls that raised", labels=["worker"]
        )
        for w in workers:
            restarts.add_metric([str(w.id)], w.stats.restarts)
            failures.add_metric([str(w.id)], w.stats.errors)
        yield restarts
        yield failures
        yield CounterMetricFamily(
            "vision_daemon_results_dropped",
            "Results not sent because the client was not reading",
            value=d.totals.results_dropped,
        )
        yield CounterMetricFamily(
            "vision_daemon_ws_messages_dropped",
            "/ws messages a slow subscriber lost",
            value=d.hub.dropped,
        )
        yield GaugeMetricFamily(
            "vision_daemon_workers_busy",
            "Workers running a detector call now",
            value=d.pool.busy() if d.pool else 0,
        )
        yield GaugeMetricFamily(
            "vision_daemon_connections", "Open TCP connections", value=len(d.connections)
        )
        yield GaugeMetricFamily(
            "vision_daemon_ready", "1 when ready to serve", value=int(d.ready()[0])
        )
        yield GaugeMetricFamily(
            "vision_daemon_ws_subscribers", "Open /ws subscribers", value=len(d.hub.subscribers)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
