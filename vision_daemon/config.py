"""One frozen Config, built from defaults <- TOML file <- environment <- command-line flags.

Longer than most modules (about 670 lines) because it declares every setting once, each with its
default, section, help, environment variable and bounds (the flags, the TOML reader and the
checks are generated from those declarations): the declarations are some 300 of its lines. The
camera table lives in camera_config.py, stream options in options.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision_daemon.analytics.counting import EVENT_TYPES
from vision_daemon.analytics.settings import AnalyticsConfig, analytics_from_toml
from vision_daemon.camera_config import MAX_URL_CHARS, coerce_value
from vision_daemon.camera_config import CameraConfig as CameraConfig  # a Config holds them
from vision_daemon.camera_config import camera_config as camera_config
from vision_daemon.camera_config import camera_from_dict as camera_from_dict
from vision_daemon.camera_config import camera_from_flag as camera_from_flag
from vision_daemon.checks import ConfigError as ConfigError  # raised by every settings check
from vision_daemon.masks import Mask, masks_from_toml
from vision_daemon.tokens import TokenConfig, token_from_dict
from vision_daemon.url_policy import UrlPolicy, UrlRefused


def _f(
    default: Any,
    section: str,
    help: str,
    env: str | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A setting: its default, section, help and environment variable, and its bounds (checked
    by `_bounds_of` and shown in the flag's help): low <= value <= high, value > above, or one
    of `choices`."""
    meta = {
        "section": section,
        "help": help,
        "env": env,
        "bounds": (low, high, above, choices),
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def bounds_text(f: dataclasses.Field[Any]) -> str:
    """What a valid value is, in words ("" when the field declares no bounds)."""
    low, high, above, choices = f.metadata.get("bounds", (None, None, None, ()))
    if choices:
        return (
            " or ".join((", ".join(choices[:-1]), choices[-1])) if len(choices) > 1 else choices[0]
        )
    if low is not None and high is not None:
        return f"{low}..{high}"
    if above is not None:
        return f"> {above}" + (f" and <= {high}" if high is not None else "")
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def _within(f: dataclasses.Field[Any], value: Any) -> bool:
    low, high, above, choices = f.metadata.get("bounds", (None, None, None, ()))
    if choices:
        return value in choices
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (
        (low is None or value >= low)
        and (high is None or value <= high)
        and (above is None or value > above)
    )


ANALYTICS_TABLES = {"tracking", "lines", "zones"}


def _remote(model: str) -> bool:
    """A Triton endpoint URL (checked in full when the detector is built)."""
    return model.startswith(("http://", "grpc://")) and len(model) <= MAX_URL_CHARS


def _octal_mode(text: str) -> bool:
    try:
        return 0 <= int(text, 8) <= 0o777
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    # [server]
    tcp_host: str = _f("127.0.0.1", "server", "data-plane bind address (0.0.0.0 exposes it)")
    tcp_port: int = _f(
        9000, "server", "data-plane TCP port (0 = pick a free one)", low=0, high=65535
    )
    unix_socket: str = _f(
        "", "server", "also serve the TCP protocol on this Unix domain socket path ('' = off)"
    )
    unix_socket_mode: str = _f("0600", "server", "file mode of the Unix socket (octal)")
    ports_file: str = _f(
        "", "server", "write the real ports here as JSON once listening; removed at exit ('' = off)"
    )
    api_host: str = _f("127.0.0.1", "server", "control-plane (HTTP) bind address")
    api_port: int = _f(
        8000, "server", "control-plane HTTP port (0 = pick one, -1 = off)", low=-1, high=65535
    )
    auth_token: str = _f(
        "",
        "server",
        "an admin token for TCP hello and HTTP/WS (more tokens, with roles: [[tokens]]); "
        "no token at all = no auth",
        env="VISION_DAEMON_AUTH_TOKEN",
    )
    tls_cert: str = _f(
        "",
        "server",
        "PEM certificate (chain): turns on HTTPS/WSS and TLS on the TCP ingest (with tls_key)",
        env="VISION_DAEMON_TLS_CERT",
    )
    tls_key: str = _f("", "server", "PEM private key of tls_cert", env="VISION_DAEMON_TLS_KEY")
    tls_client_ca: str = _f(
        "",
        "server",
        "PEM CA: TCP ingest clients must present a certificate it signed (mutual TLS)",
    )
    auth_max_failures: int = _f(
        10,
        "server",
        "failed token checks from one address within auth_failure_window_s before it is "
        "refused (429 / closed) until they age out; 0 = no throttling",
        low=0,
    )
    auth_failure_window_s: float = _f(
        60.0, "server", "the window of auth_max_failures", above=0, high=86400
    )
    shutdown_grace_s: float = _f(
        5.0, "server", "on SIGINT/SIGTERM, time allowed for in-flight work", low=0
    )
    log_dir: str = _f(
        "logs", "server", "folder for the rotating vision-daemon.log ('' = stderr only)"
    )
    log_level: str = _f("info", "server", "debug, info, warning or error")
    # [model]
    model: str = _f(
        "yolov8n",
        "model",
        "model path or name, or a Triton endpoint http://HOST:PORT/NAME or grpc://HOST:PORT/NAME; "
        "'none' = decode only, no detections (transport tests)",
    )
    backends: list[str] = _f(  # noqa: RUF009 - _f returns a field(default_factory=...)
        [],
        "model",
        "more Triton endpoints serving the same model as `model` (each a URL like it); in a "
        "file also [[backends]] tables with url",
    )
    backend_timeout_s: float = _f(
        5.0,
        "model",
        "a Triton call or probe longer than this fails and marks its endpoint down; one "
        "deadline for the whole call, however slowly its reply arrives",
        low=0.1,
        high=300,
    )
    backend_max_detections: int = _f(
        300,
        "model",
        "detection rows a Triton reply may carry per image (vision-triton's NMS keeps 300); "
        "a reply with more is refused as backend_error and marks its endpoint down",
        low=1,
        high=100_000,
    )
    backend_probe_s: float = _f(
        2.0,
        "model",
        "how often every Triton endpoint is asked whether its model is ready",
        low=0.1,
        high=3600,
    )
    backend_image: str = _f(
        "jpeg",
        "model",
        "how the compact Triton format sends a frame: jpeg or pixels (raw BGR)",
        choices=("jpeg", "pixels"),
    )
    backend_jpeg_quality: int = _f(
        90, "model", "JPEG quality of frames sent to Triton (1..100)", low=1, high=100
    )
    model_dir: str = _f(
        "models", "model", "folder searched for model names", env="VISION_DAEMON_MODEL_DIR"
    )
    device: str = _f("auto", "model", "auto, cpu, cuda:0, ... (auto = cuda:0 if present)")
    imgsz: int = _f(640, "model", "inference image size")
    conf: float = _f(0.25, "model", "confidence threshold", low=0, high=1)
    iou: float = _f(0.7, "model", "NMS IoU threshold", low=0, high=1)
    classes: list[str] = _f([], "model", "keep only these classes (names or ids); [] = all")  # noqa: RUF009 - _f returns a field(default_factory=...)
    half: bool = _f(False, "model", "FP16 inference where the backend supports it")
    export: str = _f(
        "auto",
        "model",
        "serve a .pt through an export: auto (openvino on CPU), none, openvino, onnx, engine",
        choices=("auto", "none", "openvino", "onnx", "engine"),
    )
    # [workers]
    workers: int = _f(2, "workers", "inference workers (one model instance each)", low=1)
    threads: int = _f(
        0,
        "workers",
        "OpenVINO threads per worker while several are busy (0 = cores / workers)",
        low=0,
    )
    share_cores: str = _f(
        "busy",
        "workers",
        "OpenVINO: use the threads-limited copy when another worker is 'busy', or only when "
        "frames are also 'waiting'",
        choices=("busy", "waiting"),
    )
    openvino_path: str = _f(
        "direct",
        "workers",
        "OpenVINO on CPU: 'direct' (our letterbox, pre-processing inside the graph, numpy NMS) "
        "or 'ultralytics' (its predictor); exports 'direct' cannot serve go to ultralytics",
        choices=("direct", "ultralytics"),
    )
    reduced_decode: bool = _f(
        True,
        "workers",
        "decode a JPEG at least twice the model input at 1/2, 1/4 or 1/8 scale (boxes are "
        "scaled back); streams keeping event snapshots decode at full size",
    )
    max_batch: int = _f(1, "workers", "frames from distinct streams one worker may batch", low=1)
    batch_wait_ms: float = _f(
        0.0, "workers", "wait this long for a fuller batch (0 = never)", low=0
    )
    worker_timeout_s: float = _f(
        30.0, "workers", "a detector call longer than this is stuck", above=0
    )
    # [streams]
    queue_depth: int = _f(
        2, "streams", "frames queued per stream; when full the oldest drops", low=1
    )
    max_frame_age_ms: float = _f(
        1000.0,
        "streams",
        "frames older than this when a worker would take them drop as stale",
        above=0,
    )
    max_in_flight_per_stream: int = _f(
        1, "streams", "frames of one stream in inference at once", low=1
    )
    serve_default: str = _f(
        "latest",
        "streams",
        "which queued frame a stream's turn serves unless its client says: latest (older ones "
        "drop as superseded) or fifo (oldest first)",
        choices=("latest", "fifo"),
    )
    motion_gate: float = _f(
        0.0,
        "streams",
        "motion gating unless a stream says: a frame whose 64-pixel-wide grey thumbnail changed "
        "in less than this share of pixels since the last analysed frame reuses its detections "
        "(counted as unchanged); 0 = off, e.g. 0.005",
        low=0,
        high=1,
    )
    motion_refresh_s: float = _f(
        5.0,
        "streams",
        "a motion-gated stream is analysed at least this often, changed or not",
        above=0,
        high=3600,
    )
    # [limits]
    max_message_bytes: int = _f(16 * 1024 * 1024, "limits", "largest accepted message", low=1024)
    max_image_pixels: int = _f(7680 * 4320, "limits", "largest decoded image (width*height)", low=1)
    max_connections: int = _f(
        256,
        "limits",
        "TCP connections past their first valid message (hello, or a legacy frame)",
        low=1,
    )
    max_pending_connections: int = _f(
        64,
        "limits",
        "TCP connections still waiting for their first valid message; when full, a silent one "
        "is closed for a new one",
        low=1,
    )
    max_pending_per_address: int = _f(
        32,
        "limits",
        "while max_pending_connections is reached, an address holding this many of them has "
        "its own oldest silent one closed first",
        low=1,
    )
    max_streams_per_connection: int = _f(64, "limits", "streams one connection may open", low=1)
    max_streams: int = _f(1024, "limits", "streams open in total", low=1)
    hello_timeout_s: float = _f(
        10.0, "limits", "time a new connection has to send its first message", above=0
    )
    idle_timeout_s: float = _f(60.0, "limits", "close a connection silent for this long", above=0)
    max_queued_mb: int = _f(
        512, "limits", "MiB of frames queued in all streams; past it the largest queue drops"
    )
    send_buffer_messages: int = _f(
        256,
        "limits",
        "messages queued per connection: past it results drop, other messages close it",
        low=1,
    )
    http_max_connections: int = _f(
        128,
        "limits",
        "open HTTP and /ws connections; when full, one waiting for a request is closed for a "
        "new one",
        low=1,
    )
    http_max_pending_per_address: int = _f(
        64,
        "limits",
        "while http_max_connections is reached, an address with this many connections waiting "
        "for a request has its own oldest closed first",
        low=1,
    )
    http_idle_timeout_s: float = _f(
        5.0, "limits", "close an HTTP connection that sends nothing for this long", above=0
    )
    ws_max_subscribers: int = _f(
        64, "limits", "/ws subscribers at once; more are closed (1013)", low=0
    )
    ws_ingest_max_connections: int = _f(
        32,
        "limits",
        "WebSocket /ingest connections at once; more are closed (1013); 0 = off",
        low=0,
    )
    max_shm_mb: int = _f(
        1024,
        "limits",
        "largest shared-memory ring one connection may map (MiB); 0 = shared-memory ingest off",
        low=0,
    )
    max_cameras: int = _f(
        64, "limits", "pulled cameras at once (config, --camera and the API)", low=0
    )
    camera_media_dir: str = _f(
        "",
        "limits",
        "file cameras only under this folder ('' = no file cameras; vision_daemon/url_policy.py)",
        "VISION_DAEMON_CAMERA_MEDIA_DIR",
    )
    camera_allow_local: bool = _f(
        False,
        "limits",
        "let cameras reach loopback, link-local, unspecified and multicast addresses",
    )
    # [stats]
    stats_window_s: float = _f(
        10.0, "stats", "sliding window for fps and latency percentiles", above=0
    )
    stream_grace_s: float = _f(
        30.0, "stats", "a disconnected stream stays in /stats this long, then is removed", low=0
    )
    metrics_max_streams: int = _f(
        64, "stats", "streams labelled in /metrics; later ones are summed as stream='_other'", low=0
    )
    ws_queue: int = _f(
        64, "stats", "messages buffered per /ws subscriber before its oldest drop", low=1
    )
    stats_refresh_s: float = _f(
        1.0,
        "stats",
        "/stats, /streams and /metrics serve a snapshot rebuilt this often",
        low=0.05,
        high=60,
    )
    stats_history_points: int = _f(
        300,
        "stats",
        "points /stats/history keeps (the dashboard's charts); 0 = none kept",
        low=0,
        high=100_000,
    )
    stats_history_interval_s: float = _f(
        2.0,
        "stats",
        "one /stats/history point this often (300 x 2 s = the last 10 minutes)",
        low=0.1,
        high=3600,
    )
    dashboard: bool = _f(True, "stats", "serve the web dashboard at / (its data needs the token)")
    # [analytics]
    track: bool = _f(
        False,
        "analytics",
        "track objects on every stream (each detection gains track_id); a stream's `track` "
        "option overrides; a stream with [[lines]] or [[zones]] is always tracked",
    )
    event_snapshots: bool = _f(
        False, "analytics", "attach a JPEG of the frame (base64) to each event"
    )
    event_snapshot_max_kb: int = _f(
        64,
        "analytics",
        "largest event snapshot; a frame is scaled down until it fits",
        low=1,
        high=4096,
    )
    # [outputs]
    mqtt_url: str = _f(
        "",
        "outputs",
        "send events and retained counts to this broker, mqtt://[user:pass@]host[:port] "
        "(mqtts:// for TLS; '' = off)",
        env="VISION_DAEMON_MQTT_URL",
    )
    mqtt_ca: str = _f(
        "", "outputs", "PEM CA to verify an mqtts:// broker with ('' = the system's CAs)"
    )
    mqtt_topic_prefix: str = _f("vision-daemon", "outputs", "first level of every MQTT topic")
    mqtt_qos: int = _f(0, "outputs", "MQTT QoS of events and counts: 0, 1 or 2", low=0, high=2)
    mqtt_queue: int = _f(
        1000,
        "outputs",
        "events held for the broker while it is away; past it the oldest drop",
        low=1,
        high=1_000_000,
    )
    webhook_urls: list[str] = _f(  # noqa: RUF009 - _f returns a field(default_factory=...)
        [],
        "outputs",
        "POST each event as JSON to these http(s) URLs ([] = off)",
        env="VISION_DAEMON_WEBHOOK_URLS",
    )
    webhook_secret: str = _f(
        "",
        "outputs",
        "sign webhook bodies with HMAC-SHA256 under this secret ('' = unsigned)",
        env="VISION_DAEMON_WEBHOOK_SECRET",
    )
    webhook_events: list[str] = _f(  # noqa: RUF009 - _f returns a field(default_factory=...)
        [], "outputs", "event types sent to webhooks ([] = all)"
    )
    webhook_queue: int = _f(
        256, "outputs", "events queued per webhook; past it the oldest drop", low=1, high=1_000_000
    )
    webhook_timeout_s: float = _f(
        5.0, "outputs", "one webhook request's time limit", low=0.1, high=300
    )
    webhook_max_attempts: int = _f(
        5, "outputs", "tries per event (backoff doubles, 0.5 s to 30 s)", low=1, high=100
    )
    # [[cameras]]: a list of tables, not a flat setting (see CameraConfig); --camera NAME=URL
    cameras: tuple[CameraConfig, ...] = field(default=(), metadata={"section": "cameras"})
    # [[tokens]]: tokens with roles (vision_daemon/tokens.py)
    tokens: tuple[TokenConfig, ...] = field(default=(), metadata={"section": "tokens"})
    # [[masks]]: privacy masks by stream (vision_daemon/masks.py)
    masks: tuple[tuple[str, tuple[Mask, ...]], ...] = field(
        default=(), metadata={"section": "masks"}
    )
    # [tracking], [[lines]], [[zones]]: tables (vision_daemon/analytics/settings.py)
    analytics: AnalyticsConfig = field(
        default_factory=AnalyticsConfig, metadata={"section": "analytics tables"}
    )

    def __post_init__(self) -> None:
        bounds = [
            (_within(f, getattr(self, f.name)), f"{f.name} must be {bounds_text(f)}")
            for f in dataclasses.fields(self)
            if bounds_text(f)
        ]
        checks_all = (
            bounds,
            _engine_checks(self),
            _limit_checks(self),
            _output_checks(self),
            _tls_checks(self),
        )
        for checks in checks_all:
            for ok, message in checks:
                if not ok:
                    raise ConfigError(f"bad config value: {message}")


def _engine_checks(c: Config) -> list[tuple[bool, str]]:
    """What one field's bounds cannot say, for the workers and the model: (holds, what to fix)."""
    return [
        (c.imgsz >= 32 and c.imgsz % 32 == 0, "imgsz must be a multiple of 32, >= 32"),
        (
            c.log_level.lower() in ("debug", "info", "warning", "error"),
            "log_level must be debug, info, warning or error",
        ),
        (_octal_mode(c.unix_socket_mode), "unix_socket_mode must be octal, e.g. 0600"),
    ]


def _limit_checks(c: Config) -> list[tuple[bool, str]]:
    """Limits that depend on one another."""
    return [
        (
            c.max_queued_mb * 2**20 >= c.max_message_bytes,
            "max_queued_mb must hold at least one message of max_message_bytes",
        ),
        (
            len({cam.name for cam in c.cameras}) == len(c.cameras),
            "two cameras have the same name",
        ),
        (len({t.name for t in c.tokens}) == len(c.tokens), "two [[tokens]] have the same name"),
        (
            len(c.cameras) <= c.max_cameras,
            "max_cameras must be at least the number of [[cameras]]",
        ),
        *_camera_url_checks(c),
    ]


def policy_for(c: Config, camera: CameraConfig) -> UrlPolicy:
    """The URL policy a camera of this daemon is held to."""
    return UrlPolicy(c.camera_media_dir, c.camera_allow_local or camera.allow_local)


def _camera_url_checks(c: Config) -> list[tuple[bool, str]]:
    """The URL policy's checks that need no network, for every configured camera."""
    out: list[tuple[bool, str]] = []
    for cam in c.cameras:
        for url in filter(None, (cam.url, cam.substream_url)):
            try:
                policy_for(c, cam).check_static(url)
            except UrlRefused as exc:
                out.append((False, f"camera {cam.name!r}: {exc}"))
    return out


def _tls_checks(c: Config) -> list[tuple[bool, str]]:
    """TLS files: both or neither of cert and key, a client CA only with them, all readable."""
    files = [f for f in (c.tls_cert, c.tls_key, c.tls_client_ca) if f]
    return [
        (bool(c.tls_cert) == bool(c.tls_key), "tls_cert and tls_key go together"),
        (not c.tls_client_ca or bool(c.tls_cert), "tls_client_ca needs tls_cert and tls_key"),
        (all(os.access(f, os.R_OK) for f in files), "a tls_* file does not exist or is unreadable"),
    ]


def _output_checks(c: Config) -> list[tuple[bool, str]]:
    """Remote backends and event outputs."""
    return [
        (
            not c.backends or (_remote(c.model) and all(_remote(b) for b in c.backends)),
            "backends need model to be a Triton URL too, and each must be http:// or grpc://",
        ),
        (len(c.backends) <= 63, "at most 64 Triton endpoints (model and 63 backends)"),
        (len(c.webhook_urls) <= 16, "at most 16 webhook_urls"),
        (
            set(c.webhook_events) <= set(EVENT_TYPES),
            f"webhook_events must be among {', '.join(EVENT_TYPES)}",
        ),
    ]


# The flat settings (each also a flag and a line of configs/default.toml); cameras are tables.
TABLES = ("cameras", "analytics", "tokens", "masks")  # tables: not flags or env variables
# [[cameras]] and [[tokens]]: each table read into one settings object
ARRAY_TABLES: dict[str, Callable[[Any], Any]] = {
    "cameras": camera_from_dict,
    "tokens": token_from_dict,
}
FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in TABLES}


def _coerce(name: str, value: Any) -> Any:
    """Check a TOML/env/flag value against the field's type; ints are accepted for floats."""
    if FIELDS[name].default_factory is not dataclasses.MISSING:  # list fields
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"bad config value: {name} must be a list")
        return [str(v) for v in value]
    return coerce_value(name, FIELDS[name].default, value)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Flatten a config file's [section] tables into field values, refusing unknown keys."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section in ANALYTICS_TABLES:
            continue  # read below, all three together
        if section == "backends" and isinstance(table, list):  # [[backends]] url = "..."
            values["backends"] = [_backend_table(path, t) for t in table]
            continue
        if section in ARRAY_TABLES:  # [[cameras]], [[tokens]]: one setting object per table
            if not isinstance(table, list):
                raise ConfigError(f"config file {path}: {section} must be [[{section}]] tables")
            values[section] = tuple(ARRAY_TABLES[section](t) for t in table)
            continue
        if section == "masks":
            values["masks"] = tuple(masks_from_toml(table).items())
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: '{section}' must be a [section] table")
        for key, value in table.items():
            f = FIELDS.get(key)
            if f is None or f.metadata["section"] != section:
                raise ConfigError(f"config file {path}: unknown setting [{section}] {key}")
            values[key] = _coerce(key, value)
    if ANALYTICS_TABLES & data.keys():
        values["analytics"] = analytics_from_toml(data)
    return values


def _backend_table(path: str | Path, table: Any) -> str:
    if not isinstance(table, dict) or set(table) != {"url"} or not isinstance(table["url"], str):
        raise ConfigError(f"config file {path}: each [[backends]] table holds one url string")
    return str(table["url"])


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """The Config: defaults, then the TOML file, then env variables, then overrides (flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_toml(path))
    env = os.environ if environ is None else environ
    for name, f in FIELDS.items():
        var = f.metadata["env"]
        if var and env.get(var):
            values[name] = _coerce(name, env[var])
    for name, value in (overrides or {}).items():
        if name == "analytics":  # tracking, lines and zones given as an AnalyticsConfig
            values["analytics"] = value
            continue
        if name == "cameras":  # --camera adds to the file's cameras
            values["cameras"] = (*values.get("cameras", ()), *value)
            continue
        if name == "masks":  # {stream: (Mask, ...)} (tests, embedders)
            values["masks"] = tuple(dict(value).items())
            continue
        if name == "tokens":  # TokenConfigs (tests, embedders)
            values["tokens"] = tuple(value)
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name}")
        if value is not None:
            values[name] = _coerce(name, value)
    return Config(**values)
