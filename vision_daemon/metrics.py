"""Prometheus exposition: counters incremented where events happen, gauges read from the snapshot.

Counters are prometheus-client `Counter`s bumped by the pipeline as frames arrive, finish or drop,
so every series only ever goes up. Stream labels are capped at `metrics_max_streams` live
streams; the rest count under `stream="_other"`, which is a counter too (never a sum over live
streams, which would fall when one expires). An expired stream's series are removed, which frees
its slot; no aggregate is lowered by that.

Longer than most modules (about 390 lines): one declaration per series, each with its help
text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vision_daemon.schema import BackendStats, CameraStats, OutputStats, Stats, StreamStats
from vision_daemon.stats import DROP_REASONS

OTHER = "_other"
BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per daemon (tests run several in one process)."""

    def __init__(self, max_stream_labels: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.max_stream_labels = max_stream_labels
        self._labelled: set[str] = set()
        r = self.registry
        self.received = Counter(
            "vision_daemon_frames_received", "Frames received", ["stream"], registry=r
        )
        self.processed = Counter(
            "vision_daemon_frames_processed", "Frames processed", ["stream"], registry=r
        )
        self.unchanged = Counter(
            "vision_daemon_frames_unchanged",
            "Frames processed by reusing the last detections (motion gating; part of processed)",
            ["stream"],
            registry=r,
        )
        self.dropped = Counter(
            "vision_daemon_frames_dropped",
            "Frames dropped by reason",
            ["stream", "reason"],
            registry=r,
        )
        self.dropped_all = Counter(
            "vision_daemon_frames_dropped_all",
            "Frames dropped by reason, all streams (incl. removed)",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "vision_daemon_protocol_errors", "Refused messages by error code", ["code"], registry=r
        )
        self.results_dropped = Counter(
            "vision_daemon_results_dropped",
            "Results not sent because the client was not reading",
            registry=r,
        )
        self.auth_failures = Counter(
            "vision_daemon_auth_failures",
            "Refused credentials by plane (tcp, http, ws)",
            ["plane"],
            registry=r,
        )
        self.auth_refusals = Counter(
            "vision_daemon_auth_refusals",
            "Refused attempts by plane, route, token name (never the token; '-' when none was "
            "valid) and reason (missing, wrong, expired, throttled, forbidden)",
            ["plane", "route", "token", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "vision_daemon_latency_seconds",
            "Server-side time per processed frame by stage (queue wait, decode, inference, total)",
            ["stage"],
            buckets=BUCKETS_S,
            registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped_all.labels(reason)
        self.gauges: _SnapshotGauges | None = None

    # ---- stream labels ----------------------------------------------------------------------

    def auth_refused(self, plane: str, route: str, token: str, reason: str) -> None:
        """One refusal (vision_daemon/access.py); a failed check also counts as a failure of
        its plane, as before roles existed."""
        self.auth_refusals.labels(plane, route, token, reason).inc()
        if reason != "forbidden":
            self.auth_failures.labels(plane).inc()

    def label_for(self, stream: str) -> str:
        """A new stream's label: its name while fewer than the cap are labelled, else _other."""
        if len(self._labelled) >= self.max_stream_labels:
            label = OTHER
        else:
            label = stream
            self._labelled.add(stream)
        self.received.labels(label)
        self.processed.labels(label)
        for reason in DROP_REASONS:
            self.dropped.labels(label, reason)
        return label

    def release(self, label: str) -> None:
        """An expired stream's series go away and its slot is free; _other is never removed."""
        if label == OTHER or label not in self._labelled:
            return
        self._labelled.discard(label)
        for counter in (self.received, self.processed, self.unchanged):
            try:
                counter.remove(label)
            except KeyError:
                pass
        for reason in DROP_REASONS:
            try:
                self.dropped.remove(label, reason)
            except KeyError:
                pass

    # ---- events -----------------------------------------------------------------------------
    def on_received(self, label: str | None) -> None:
        if label:
            self.received.labels(label).inc()

    def on_dropped(self, label: str | None, reason: str) -> None:
        self.dropped_all.labels(reason).inc()
        if label:
            self.dropped.labels(label, reason).inc()

    def on_processed(self, label: str, timings: dict[str, float]) -> None:
        self.processed.labels(label).inc()
        for stage, ms in timings.items():
            self.latency.labels(stage.removesuffix("_ms")).observe(ms / 1000)

    def watch(self, snapshot: Callable[[], Stats | None]) -> None:
        """Gauges (and per-worker counters) are read from the latest snapshot at scrape time."""
        self.gauges = _SnapshotGauges(snapshot, self)
        self.registry.register(self.gauges)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotGauges(Collector):
    def __init__(self, snapshot: Callable[[], Stats | None], metrics: Metrics) -> None:
        self._snapshot = snapshot
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        queue = GaugeMetricFamily(
            "vision_daemon_queue_depth", "Frames waiting per stream", labels=["stream"]
        )
        depth: dict[str, int] = {}
        for s in snap.streams.values():
            label = s.metric_label or OTHER
            depth[label] = depth.get(label, 0) + s.queue_depth
        for label, n in depth.items():
            queue.add_metric([label], n)
        yield queue
        batches = CounterMetricFamily(
            "vision_daemon_batches", "Detector calls by batch size", labels=["size"]
        )
        for size, n in snap.batch_sizes.items():
            batches.add_metric([size], n)
        yield batches
        workers = snap.workers
        yield GaugeMetricFamily("vision_daemon_workers", "Inference workers", value=len(workers))
        restarts = CounterMetricFamily(
            "vision_daemon_worker_restarts",
            "Worker restarts (stuck call or failure)",
            labels=["worker"],
        )
        failures = CounterMetricFamily(
            "vision_daemon_detector_errors", "Detector calls that raised", labels=["worker"]
        )
        up = GaugeMetricFamily(
            "vision_daemon_worker_up", "1 while the worker can take frames", labels=["worker"]
        )
        for w in workers:
            restarts.add_metric([str(w.id)], w.restarts)
            failures.add_metric([str(w.id)], w.errors)
            up.add_metric([str(w.id)], int(w.state in ("ready", "busy")))
        yield restarts
        yield failures
        yield up
        yield CounterMetricFamily(
            "vision_daemon_ws_messages_dropped",
            "/ws messages a slow subscriber lost",
            value=snap.ws.dropped,
        )
        yield GaugeMetricFamily(
            "vision_daemon_workers_busy",
            "Workers running a detector call now",
            value=snap.workers_busy,
        )
        yield GaugeMetricFamily(
            "vision_daemon_connections", "Open TCP connections", value=snap.connections["open"]
        )
        yield from _connection_metrics(snap)
        yield GaugeMetricFamily(
            "vision_daemon_ready", "1 when ready to serve", value=int(snap.ready)
        )
        yield GaugeMetricFamily(
            "vision_daemon_ws_subscribers", "Open /ws subscribers", value=snap.ws.subscribers
        )
        yield from _camera_metrics(snap.cameras)
        yield from _analytics_metrics(snap.streams)
        yield from _output_metrics(snap.outputs)
        yield from _backend_metrics(snap.backends)


def _connection_metrics(snap: Stats) -> Iterator[Metric]:
    """Connections turned away at accept, and those closed to make room for a newer one."""
    refused = CounterMetricFamily(
        "vision_daemon_connections_refused",
        "Connections refused at accept by plane (tcp: a full pending pool or max_connections; "
        "http: http_max_connections, 503)",
        labels=["plane"],
    )
    evicted = CounterMetricFamily(
        "vision_daemon_connections_evicted",
        "Connections closed before their hello (tcp) or request (http) for a newer one",
        labels=["plane"],
    )
    for plane, counts in (("tcp", snap.connections), ("http", snap.http)):
        refused.add_metric([plane], counts["refused"])
        evicted.add_metric([plane], counts["evicted"])
    yield from (refused, evicted)


def _analytics_metrics(streams: dict[str, StreamStats]) -> Iterator[Metric]:
    """Counts of tracked streams that have their own label (streams past metrics_max_streams
    are in /stats only: summing zones of different cameras would mean nothing). Zones and lines
    are at most 16 per stream, and labels are the model's classes."""
    occupancy = GaugeMetricFamily(
        "vision_daemon_zone_occupancy",
        "Tracks inside a zone now",
        labels=["stream", "zone", "label"],
    )
    entered = CounterMetricFamily(
        "vision_daemon_zone_entries",
        "Tracks that entered a zone",
        labels=["stream", "zone", "label"],
    )
    exited = CounterMetricFamily(
        "vision_daemon_zone_exits", "Tracks that left a zone", labels=["stream", "zone", "label"]
    )
    crossed = CounterMetricFamily(
        "vision_daemon_line_crossings",
        "Tracks that crossed a line, by direction",
        labels=["stream", "line", "direction", "label"],
    )
    events = CounterMetricFamily(
        "vision_daemon_events", "Analytics events by type", labels=["stream", "type"]
    )
    tracks = GaugeMetricFamily("vision_daemon_tracks", "Live tracks", labels=["stream"])
    for s in streams.values():
        a, label = s.analytics, s.metric_label
        if a is None or not label or label == OTHER:
            continue
        tracks.add_metric([label], a.tracks)
        for kind, n in a.events.items():
            events.add_metric([label, kind], n)
        for zone, z in a.zones.items():
            for family, counts in (
                (occupancy, z.occupancy),
                (entered, z.entered),
                (exited, z.exited),
            ):
                for what, n in counts.items():
                    family.add_metric([label, zone, what], n)
        for line, directions in a.lines.items():
            for direction, by_label in directions.items():
                for what, n in by_label.items():
                    crossed.add_metric([label, line, direction, what], n)
    yield from (tracks, events, occupancy, entered, exited, crossed)


def _output_metrics(outputs: list[OutputStats]) -> Iterator[Metric]:
    """Each event output's deliveries and losses."""
    sent = CounterMetricFamily(
        "vision_daemon_output_sent", "Events (and count updates) delivered", labels=["output"]
    )
    dropped = CounterMetricFamily(
        "vision_daemon_output_dropped",
        "Events an output could not deliver, by reason",
        labels=["output", "reason"],
    )
    queued = GaugeMetricFamily(
        "vision_daemon_output_queued", "Events waiting in an output's queue", labels=["output"]
    )
    up = GaugeMetricFamily(
        "vision_daemon_output_connected",
        "1 while the output's broker or target answers",
        labels=["output"],
    )
    for o in outputs:
        sent.add_metric([o.name], o.sent)
        queued.add_metric([o.name], o.queued)
        up.add_metric([o.name], int(bool(o.connected)))
        for reason, n in o.dropped.items():
            dropped.add_metric([o.name, reason], n)
    yield from (sent, dropped, queued, up)


def _backend_metrics(backends: list[BackendStats]) -> Iterator[Metric]:
    """Each Triton endpoint's state and traffic (at most 64 endpoints, from the config)."""
    up = GaugeMetricFamily(
        "vision_daemon_backend_up", "1 while the Triton endpoint answers", labels=["endpoint"]
    )
    frames = CounterMetricFamily(
        "vision_daemon_backend_frames", "Frames a Triton endpoint answered", labels=["endpoint"]
    )
    failures = CounterMetricFamily(
        "vision_daemon_backend_failures",
        "Calls to a Triton endpoint that failed or timed out",
        labels=["endpoint"],
    )
    wire = CounterMetricFamily(
        "vision_daemon_backend_bytes",
        "Tensor bytes sent to (up) and received from (down) a Triton endpoint",
        labels=["endpoint", "direction"],
    )
    for b in backends:
        url = b.url
        up.add_metric([url], int(b.state == "up"))
        frames.add_metric([url], b.frames)
        failures.add_metric([url], b.failures)
        wire.add_metric([url, "up"], b.bytes_up)
        wire.add_metric([url, "down"], b.bytes_down)
    yield from (up, frames, failures, wire)


CAMERA_STATES = ("connecting", "streaming", "reconnecting", "stalled", "failed", "stopped")
CAMERA_QUALITY = {"unusable": 0, "poor": 1, "fair": 2, "excellent": 3}


def _camera_metrics(cameras: dict[str, CameraStats]) -> Iterator[Metric]:
    """Pulled cameras' health, one series per camera (bounded by max_cameras)."""
    state = GaugeMetricFamily(
        "vision_daemon_camera_state", "1 for the camera's current state", labels=["camera", "state"]
    )
    gauges = {
        key: GaugeMetricFamily(f"vision_daemon_camera_{name}", text, labels=["camera"])
        for key, name, text in (
            ("source_fps", "source_fps", "Frames read from the camera per second"),
            ("analysed_fps", "analysed_fps", "Frames of the camera processed per second"),
            ("last_frame_age_s", "last_frame_age_seconds", "Seconds since the last frame read"),
            ("decode_ms", "decode_seconds", "Mean reader-side decode time per frame"),
            ("quality", "quality", "Connection quality: 0 unusable, 1 poor, 2 fair, 3 excellent"),
        )
    }
    counters = {
        key: CounterMetricFamily(f"vision_daemon_camera_{key}", text, labels=["camera"])
        for key, text in (
            ("reconnects", "Times the camera came back after it was lost"),
            ("stalls", "Times no frame came within stall_timeout_s"),
            ("failed_attempts", "Opens that failed before a frame"),
            ("frames_read", "Frames read from the camera"),
        )
    }
    for name, c in cameras.items():
        for s in CAMERA_STATES:
            state.add_metric([name, s], int(c.state == s))
        values: dict[str, float | None] = {
            "source_fps": c.source_fps,
            "analysed_fps": c.analysed_fps,
            "last_frame_age_s": c.last_frame_age_s,
            "decode_ms": None if c.decode_ms is None else c.decode_ms / 1000,
            "quality": CAMERA_QUALITY.get(c.quality, 0),
        }
        for key, family in gauges.items():
            value = values[key]
            if value is not None:
                family.add_metric([name], value)
        for key, counter in counters.items():
            counter.add_metric([name], getattr(c, key))
    yield state
    yield from gauges.values()
    yield from counters.values()
