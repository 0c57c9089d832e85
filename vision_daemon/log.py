"""Logging: stderr plus a rotating logs/vision-daemon.log; modules use getLogger(__name__)."""

from __future__ import annotations

import logging
import logging.handlers
import re
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str, log_dir: str) -> Path | None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(FORMAT))
    stderr.addFilter(RedactTokens())
    root.addHandler(stderr)
    path = None
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(log_dir) / "vision-daemon.log"
        rotating = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 2**20, backupCount=5)
        rotating.setFormatter(logging.Formatter(FORMAT))
        rotating.addFilter(RedactTokens())
        root.addHandler(rotating)
    # ultralytics logs every model load at INFO through its own logger; keep ours readable.
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
    # httpx logs every request of a snapshot camera (a line per poll), URL included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return path


class RateLimiter:
    """At most `burst` messages per key per `period_s`; later ones are counted and summarised.

    Keys are peer addresses or stream names, held in a bounded dict (oldest key evicted first),
    so a flood of new peers cannot grow it either.
    """

    def __init__(self, burst: int = 5, period_s: float = 10.0, max_keys: int = 1024) -> None:
        self.burst = burst
        self.period_s = period_s
        self.max_keys = max_keys
        self._slots: dict[str, list[float]] = {}  # key -> [window start, count, suppressed]
        self.suppressed = 0

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        """(log this one?, how many were suppressed for this key since the last one logged)."""
        slot = self._slots.get(key)
        if slot is None or now - slot[0] >= self.period_s:
            held = int(slot[2]) if slot is not None else 0
            self._slots.pop(key, None)
            if len(self._slots) >= self.max_keys:
                self._slots.pop(next(iter(self._slots)))
            self._slots[key] = [now, 1, 0]
            return True, held
        if slot[1] < self.burst:
            slot[1] += 1
            return True, 0
        slot[2] += 1
        self.suppressed += 1
        return False, 0


def log_limited(
    logger: logging.Logger,
    limiter: RateLimiter,
    key: str,
    now: float,
    level: int,
    msg: str,
    *args: object,
    exc_info: bool = False,
) -> None:
    """Log through a RateLimiter, saying how many similar lines were held back."""
    ok, held = limiter.allow(key, now)
    if not ok:
        return
    if held:
        logger.log(level, msg + " (%d similar suppressed)", *args, held, exc_info=exc_info)
    else:
        logger.log(level, msg, *args, exc_info=exc_info)


class RedactTokens(logging.Filter):
    """Masks query strings, `token=...` and Authorization values in a record's message (uvicorn
    logs each WebSocket's path with its query, websockets every request header at DEBUG): a
    secret must never reach a log, however it is spelled (`?%74oken=` is a token too)."""

    PATTERN = re.compile(
        r"(\?)[^\s\"']+|(token=)[^&\s]+|(authorization:\s*)[^\r\n]+", re.IGNORECASE
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        lower = text.lower()
        if "?" in text or "token=" in lower or "authorization" in lower:
            record.msg, record.args = self.PATTERN.sub(_mask, text), None
        return True


def _mask(m: re.Match[str]) -> str:
    return (m.group(1) or m.group(2) or m.group(3)) + "***"


def peer_host(peer: str) -> str:
    """The address part of host:port: the key for per-peer log rate limits."""
    return peer.rsplit(":", 1)[0]


class RateLimitFilter(logging.Filter):
    """Rate-limits a third-party logger by message template (uvicorn logs one line per
    WebSocket handshake and per refused request, each caused by a peer)."""

    def __init__(self, burst: int = 5, period_s: float = 10.0) -> None:
        super().__init__()
        self.limiter = RateLimiter(burst, period_s, max_keys=256)

    def filter(self, record: logging.LogRecord) -> bool:
        ok, held = self.limiter.allow(str(record.msg)[:80], record.created)
        if ok and held:
            record.msg = f"{record.msg} (%d similar suppressed)"
            record.args = (*record.args, held) if isinstance(record.args, tuple) else record.args
        return ok
