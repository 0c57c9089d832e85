"""The typed shape of what the control plane serves: /stats, /streams/{name}, /cameras and the
snapshot that holds them. Pure data (pydantic models and one dataclass): the API reads these types
without importing the components that fill them in (vision_daemon/snapshot.py builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field, create_model

from vision_daemon.analytics import StreamCounts
from vision_daemon.options import SPECS


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None


class Latency(BaseModel):
    queue: Percentiles = Field(description="time from receipt until a worker took the frame")
    decode: Percentiles
    infer: Percentiles = Field(description="detector call (for the whole batch)")
    track: Percentiles = Field(
        default_factory=Percentiles,
        description="tracking, zones and lines of the frame (tracked streams only)",
    )
    total: Percentiles = Field(description="receipt to result queued for sending")


class FrameCounts(BaseModel):
    received: int
    processed: int
    dropped: int
    dropped_by_reason: dict[str, int]
    results_dropped: int = Field(description="processed, but the client's send buffer was full")
    unchanged: int = Field(
        0,
        description="processed without inference: the frame barely differed from the last "
        "analysed one, whose detections it reused (motion gating; part of processed)",
    )
    received_fps: float = Field(description="over the last stats_window_s")
    processed_fps: float
    latency_ms: Latency


# The output model of a stream's options is made from their declarations (options.SPECS), so
# a new option shows in /stats, /streams/{name}, /cameras and the OpenAPI schema by itself.
_OptionsFields: type[BaseModel] = create_model(
    "_OptionsFields",
    **{
        name: (bool | None if s.kind is bool else s.kind, Field(s.default, description=s.doc))
        for name, s in SPECS.items()
    },  # type: ignore[call-overload]  # field definitions built from data, checked at import
)


class StreamOptionsModel(_OptionsFields):  # type: ignore[misc,valid-type]  # fields from SPECS
    """A stream's options, resolved (unset ones show the daemon's setting; track stays null)."""


class ZoneCountsModel(BaseModel):
    occupancy: dict[str, int] = Field(description="tracks inside now, by label")
    entered: dict[str, int] = Field(description="enters since the stream's analytics began")
    exited: dict[str, int]
    dwell_s: dict[str, float] = Field(description="seconds inside, by track ID, for those inside")


class AnalyticsStats(BaseModel):
    """A tracked stream's counts (issue 18)."""

    tracks: int = Field(description="live tracks")
    zones: dict[str, ZoneCountsModel]
    lines: dict[str, dict[str, dict[str, int]]] = Field(
        description="line -> direction (in, out) -> label -> crossings"
    )
    events: dict[str, int] = Field(description="events by type")


class StreamStats(FrameCounts):
    name: str
    peer: str | None
    connected: bool
    queue_depth: int
    queued_bytes: int
    in_flight: int
    last_frame_age_ms: float | None
    options: StreamOptionsModel
    advised_fps: float | None = Field(
        None, description="the rate last advised to this stream (server-advised rates)"
    )
    analytics: AnalyticsStats | None = Field(
        None, description="tracking, zones and lines; null when the stream is not tracked"
    )
    # The label its Prometheus series carry (its name, or "other" past metrics_max_streams); read
    # by /metrics, not served.
    metric_label: str = Field("", exclude=True)


class WorkerStatsModel(BaseModel):
    id: int
    state: str
    frames: int
    batches: int
    errors: int
    restarts: int
    busy_fraction: float
    busy_for_s: float | None


class ModelInfoModel(BaseModel):
    name: str
    backend: str
    device: str
    imgsz: int
    classes: int
    class_names: dict[str, str]
    warmup_ms: float


class CameraOptionsModel(StreamOptionsModel):
    """A camera's stream options as its table or an operator set them (-1 and null: the
    daemon's), and how it is read."""

    rtsp_transport: str
    keyframes_only: str
    decode_threads: int
    loop: bool
    stall_timeout_s: float


class CameraStats(BaseModel):
    """A pulled camera's health; its frame counts and latency are its stream's (same name)."""

    name: str
    url: str = Field(description="without credentials or secret query values")
    substream_url: str | None
    source: str = Field(description="rtsp, mjpeg, snapshot, file or usb")
    codec: str | None
    width: int | None
    height: int | None
    keyframes_only: bool = Field(description="only keyframes are decoded now")
    state: str = Field(
        description="connecting, streaming, reconnecting, stalled, failed or stopped"
    )
    state_for_s: float
    expected_fps: float | None = Field(
        description="the camera's rate: its fps setting or the stream's"
    )
    source_fps: float = Field(description="frames read from the camera per second")
    analysed_fps: float = Field(description="frames of this camera processed per second")
    frames_read: int
    frames_analysed: int
    frame_errors: int
    reconnects: int = Field(description="times the camera came back after it was lost")
    reconnects_last_hour: int
    stalls: int = Field(description="times no frame came for stall_timeout_s")
    stalls_last_hour: int
    failed_attempts: int = Field(description="opens that failed before a frame")
    last_frame_age_s: float | None
    last_error: str | None = Field(description="one line, no secrets")
    last_error_age_s: float | None
    decode_ms: float | None = Field(description="mean reader-side decode + conversion per frame")
    quality: str = Field(description="excellent, fair, poor or unusable")
    options: CameraOptionsModel


class HubStats(BaseModel):
    """The /ws hub: subscribers, their cap, refusals, messages lost to slow subscribers."""

    model_config = ConfigDict(extra="allow")  # and each client's figures
    subscribers: int
    dropped: int


class OutputStats(BaseModel):
    """An event output (MQTT, webhooks): what /metrics reads; the rest is served as it is."""

    model_config = ConfigDict(extra="allow")
    name: str
    sent: int
    queued: int
    connected: bool | None
    dropped: dict[str, int]


class BackendStats(BaseModel):
    """A Triton endpoint: what /metrics reads; the rest is served as it is."""

    model_config = ConfigDict(extra="allow")
    url: str
    state: str
    frames: int
    failures: int
    bytes_up: int
    bytes_down: int


class AnalyticsView(TypedDict):
    """One stream's lines and zones (the config's or an operator's) and its counts: what
    /analytics and /streams/{name}/analytics serve."""

    stream: str
    tracked: bool
    lines: list[dict[str, object]]
    zones: list[dict[str, object]]
    counts: StreamCounts | None
    events: dict[str, int]


class Stats(BaseModel):
    # The seed's flat fields, kept at the top level for existing dashboards.
    total_frames: int = Field(description="frames received, all streams")
    processed_frames: int
    dropped_frames: int
    last_latency_ms: float | None
    fps: float = Field(description="processed frames per second over the sliding window")
    queue_size: int = Field(description="frames waiting in all stream queues")
    queued_bytes: int = Field(description="bytes of frames waiting, all streams (max_queued_mb)")
    cpu: float = Field(description="system CPU percent")
    ram: float = Field(description="system memory percent")
    # Since v1
    version: str
    uptime_s: float
    ready: bool
    ready_reason: str
    rss_mb: float
    model: ModelInfoModel | None
    workers: list[WorkerStatsModel]
    workers_busy: int
    totals: FrameCounts
    batch_sizes: dict[str, int]
    mean_batch_size: float | None
    connections: dict[str, int] = Field(
        description="TCP and Unix-socket connections: open, pending (no hello yet), total, "
        "refused, evicted (closed before their hello to make room for a newer one), outbox_max, "
        "shm_rings (shared-memory rings open) and shm_mapped_bytes (their sizes)"
    )
    ws_ingest: dict[str, int] = Field(
        description="WebSocket /ingest connections: open, total, refused, outbox_max"
    )
    http: dict[str, int] = Field(
        description="control-plane connections: open (WebSockets included), pending (waiting for "
        "a request head), refused (503 at accept), evicted (closed while waiting for a request, "
        "to make room for a newer one)"
    )
    errors: dict[str, int] = Field(description="refused messages by protocol error code")
    ws: HubStats
    streams_evicted: int = Field(
        description="disconnected streams removed before their grace to make room (max_streams)"
    )
    streams: dict[str, StreamStats]
    cameras: dict[str, CameraStats]
    events: dict[str, int] = Field(description="analytics events by type, every stream")
    outputs: list[OutputStats] = Field(
        description="event outputs (MQTT, webhooks): sent, queued, dropped by reason, state"
    )
    backends: list[BackendStats] = Field(
        description="Triton endpoints (remote models): state, calls, frames, failures, wire bytes"
    )


@dataclass(frozen=True)
class Snapshot:
    """The data (a dict shaped like `Stats`), the validated model, and its JSON body."""

    data: dict[str, Any]
    model: Stats
    body: bytes
    built_at: float
