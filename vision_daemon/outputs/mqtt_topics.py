"""An MQTT output's addressing: the broker URL, the topic prefix and levels, and the retained
count topics a stream's counts become (pure functions, no client)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_LEVEL = 128  # characters per sanitised topic level
_USAGE = "use mqtt://[user:password@]host[:port] (mqtts:// for TLS)"
_BAD_LEVEL = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False  # mqtts://: the broker's certificate is verified

    @property
    def display(self) -> str:
        """The broker as mqtt://host:port, without credentials (what logs and snapshots show)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    """Check an mqtt:// URL; a ValueError says in one line what is wrong (never echoing it)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"MQTT URL is malformed or its port is not 1-65535; {_USAGE}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://; {_USAGE}")
    if not parts.hostname:
        raise ValueError(f"MQTT URL has no host; {_USAGE}")
    if port == 0:
        raise ValueError(f"MQTT URL port must be 1-65535; {_USAGE}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"MQTT URL must not have a path, query or fragment; {_USAGE}")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    tls = scheme == "mqtts"
    return MqttTarget(parts.hostname, port or (8883 if tls else 1883), username, password, tls)


def check_topic_prefix(prefix: str) -> None:
    if (
        not prefix
        or prefix.startswith(("$", "/"))
        or prefix.endswith("/")
        or "//" in prefix
        or _BAD_LEVEL.sub("", prefix.replace("/", "")) != prefix.replace("/", "")
    ):
        raise ValueError(
            f"MQTT topic_prefix {prefix[:100]!r} must be non-empty levels separated by '/', "
            "without '+', '#', control characters or a leading '$'"
        )


def topic_level(value: object) -> str:
    """One topic level from a stream, zone, line or label name: never a separator or wildcard."""
    return _BAD_LEVEL.sub("_", str(value))[:MAX_LEVEL] or "_"


def _numbers(values: object) -> dict[str, int]:
    if not isinstance(values, dict):
        return {}
    return {
        topic_level(k): int(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def flatten(prefix: str, stream: str, counts: object) -> tuple[dict[str, int], set[str]]:
    """Every count topic with its value, and which of them are occupancies."""
    values: dict[str, int] = {}
    occupancy: set[str] = set()
    if not isinstance(counts, dict):
        return values, occupancy
    base = f"{prefix}/{topic_level(stream)}"
    zones = counts.get("zones")
    for zone, zc in zones.items() if isinstance(zones, dict) else ():
        if not isinstance(zc, dict):
            continue
        zbase = f"{base}/zones/{topic_level(zone)}"
        if isinstance(zc.get("occupancy"), dict):
            occ = _numbers(zc["occupancy"])
            occ["all"] = sum(occ.values())
            for label, n in occ.items():
                values[f"{zbase}/occupancy/{label}"] = n
                occupancy.add(f"{zbase}/occupancy/{label}")
        for key in ("entered", "exited"):
            for label, n in _numbers(zc.get(key)).items():
                values[f"{zbase}/{key}/{label}"] = n
    lines = counts.get("lines")
    for line, lc in lines.items() if isinstance(lines, dict) else ():
        if not isinstance(lc, dict):
            continue
        for direction in ("in", "out"):
            for label, n in _numbers(lc.get(direction)).items():
                values[f"{base}/lines/{topic_level(line)}/{direction}/{label}"] = n
    return values, occupancy


def count_topics(prefix: str, stream: str, counts: object) -> dict[str, int]:
    """A StreamCounts as {topic: plain integer} (pure; anything of the wrong shape is skipped)."""
    return flatten(prefix, stream, counts)[0]
