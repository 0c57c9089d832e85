"""A camera the daemon pulls itself, as configured: `[[cameras]]` in the file, --camera, or
POST /cameras; and the value coercion every settings source shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vision_daemon.checks import NAME_RE, ConfigError, between
from vision_daemon.options import CAMERA_DEFAULTS, SPECS, OptionError, StreamOptions
from vision_daemon.options import parse as parse_options
from vision_daemon.url_policy import SCHEMES

CAMERA_NAME_RE = NAME_RE  # = a stream name
CAMERA_SCHEMES = SCHEMES  # what the URL policy allows (vision_daemon/url_policy.py)
MAX_URL_CHARS = 2048


@dataclass(frozen=True)
class CameraConfig:
    """One camera the daemon pulls itself: `[[cameras]]` in the file, --camera, POST /cameras."""

    name: str  # also its stream name in /stats, /ws and results
    url: str  # rtsp(s)://, http(s):// (MJPEG or JPEG snapshot), file path or file://, usb:N
    substream_url: str = ""  # a lower-resolution stream to analyse instead of `url` ("" = url)
    # skip_frames, max_fps, motion_gate, track, min_confidence ... (vision_daemon/options.py):
    # flat keys of the table or body, checked as a hello's are; max_fps defaults to 5 here
    options: StreamOptions = CAMERA_DEFAULTS
    fps: float = 0.0  # the rate the camera is set to (0 = as the stream declares it)
    rtsp_transport: str = "tcp"  # tcp or udp
    keyframes_only: str = "auto"  # decode only keyframes: on, off, auto (on when max_fps <= 1)
    decode_threads: int = 1  # FFmpeg decoder threads (1 is cheapest per camera; 0 = FFmpeg picks)
    loop: bool = False  # files: start again at the end
    open_timeout_s: float = 10.0  # connecting and the first frame
    stall_timeout_s: float = 10.0  # no frame for this long: reconnect
    retry_initial_s: float = 1.0  # first wait before reconnecting; doubles each failure
    retry_max_s: float = 30.0  # cap of that wait (a +-20% jitter is added)
    allow_local: bool = (
        False  # may reach loopback/link-local addresses (vision_daemon/url_policy.py)
    )

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (
                isinstance(self.name, str) and bool(CAMERA_NAME_RE.fullmatch(self.name)),
                "name must be 1-64 letters, digits and _ . : - starting with a letter or digit",
            ),
            (_camera_url_ok(self.url), _URL_HELP),
            (not self.substream_url or _camera_url_ok(self.substream_url), _URL_HELP),
            (0 <= self.decode_threads <= 16, "decode_threads must be 0..16"),
            (
                self.fps == 0 or between(self.fps, 0.001, 1000),
                "fps must be 0 (as the stream declares) or 0.001..1000",
            ),
            (self.rtsp_transport in ("tcp", "udp"), "rtsp_transport must be tcp or udp"),
            (
                self.keyframes_only in ("auto", "on", "off"),
                "keyframes_only must be auto, on or off",
            ),
            (
                between(self.open_timeout_s, 0.01, 3600)
                and between(self.stall_timeout_s, 0.01, 3600),
                "open_timeout_s and stall_timeout_s must be 0.01..3600",
            ),
            (
                between(self.retry_initial_s, 0.01, 3600)
                and between(self.retry_max_s, self.retry_initial_s, 3600),
                "retry_initial_s must be 0.01..3600 and <= retry_max_s <= 3600",
            ),
        ]
        # The name is shown only once it is a valid name: a URL typed where the name goes
        # (--camera rtsp://user:pass@...) must not be echoed back.
        valid_name = isinstance(self.name, str) and CAMERA_NAME_RE.fullmatch(self.name)
        label = f"camera {self.name!r}" if valid_name else "camera"
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad {label}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """The camera as a flat table, as it is written in a config file."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del flat["options"]
        return {**flat, **self.options.to_dict()}


_URL_HELP = (
    "url must be rtsp://, rtsps://, http://, https://, file://, usb:N or a file path "
    f"(at most {MAX_URL_CHARS} characters)"
)
CAMERA_FIELDS = {f.name: f for f in dataclasses.fields(CameraConfig)}


def _camera_url_ok(url: Any) -> bool:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS or "\n" in url:
        return False
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return False
    return scheme in CAMERA_SCHEMES or scheme == ""  # no scheme: a file path


def camera_from_dict(raw: Any) -> CameraConfig:
    """A CameraConfig from a TOML table or a JSON body; unknown keys and bad types are refused."""
    if not isinstance(raw, dict):
        raise ConfigError("bad camera: each camera must be a table/object with name and url")
    name = raw.get("name", "?")
    if not (isinstance(name, str) and CAMERA_NAME_RE.fullmatch(name)):
        name = "?"  # shown in messages only once it is a valid name
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = CAMERA_FIELDS.get(key)
        if key in SPECS:
            continue
        if f is None or key == "options":
            raise ConfigError(f"bad camera {name!r}: unknown setting {key!r}")
        values[key] = coerce_value(f"camera {name!r}: {key}", f.default, value)
    for key in ("name", "url"):
        if key not in values:
            raise ConfigError(f"bad camera {name!r}: {key} is required")
    try:
        values["options"] = parse_options(raw, CAMERA_DEFAULTS)
    except OptionError as exc:
        raise ConfigError(f"bad camera {name!r}: {exc}") from None
    return CameraConfig(**values)


def camera_config(**fields: Any) -> CameraConfig:
    """A camera from keyword arguments, as from a [[cameras]] table (options flat)."""
    return camera_from_dict(fields)


def camera_from_flag(text: str) -> CameraConfig:
    """--camera NAME=URL."""
    name, sep, url = text.partition("=")
    if not sep or "://" in name:  # never echoed: it may hold a password
        raise ConfigError("bad --camera: use NAME=URL (for example door=rtsp://host/stream)")
    return CameraConfig(name=name, url=url)


def coerce_value(name: str, default: Any, value: Any) -> Any:
    """Check one value against the type of its default (a string from env or a flag is
    converted); ints are accepted for floats."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"bad config value: {name} must be true or false")
        return value
    if isinstance(default, int | float):
        if isinstance(value, str):
            try:
                value = type(default)(value)
            except ValueError:
                raise ConfigError(f"bad config value: {name}={value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"bad config value: {name} must be a number")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"bad config value: {name} must be an integer")
        return type(default)(value)
    if not isinstance(value, str):
        raise ConfigError(f"bad config value: {name} must be a string")
    return value
