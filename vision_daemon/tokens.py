"""Who may do what: tokens with roles, `[[tokens]]` in the config file (issue 27).

    [[tokens]]
    name = "door-cams"          # shown in logs and metrics; never the token
    role = "ingest"             # admin, viewer or ingest
    token_sha256 = "9f86d0..."  # or token = "..." (the secret itself)
    streams = ["door-*"]        # ingest: the stream names it may push (fnmatch patterns)
    expires = "2027-06-30"      # optional: a date or an ISO 8601 time (UTC unless it says)

- `admin`: everything.
- `viewer`: reads: GET routes (/stats, /metrics, /streams, /cameras, frames, snapshots,
  analytics, the docs), /ws and the dashboard's data.
- `ingest`: pushes frames only (TCP, Unix socket, shared memory, WebSocket ingest), and only to
  streams whose names match one of its `streams` patterns (none given: any stream).
Today's `auth_token` stays: one admin token named "auth_token". With no token configured at all,
everyone is admin (as before).

A token may be stored as its SHA-256 (`token_sha256`, 64 hex digits: `printf %s TOKEN |
sha256sum`), so the config file does not hold the secret. Every presented token is hashed once and
compared with every entry's digest in constant time, plain tokens included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import hmac
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from vision_daemon.checks import NAME_RE, ConfigError

ROLES = ("admin", "viewer", "ingest")
READ, WRITE, PUSH = "read", "write", "push"
MAY = {"admin": {READ, WRITE, PUSH}, "viewer": {READ}, "ingest": {PUSH}}
MAX_PATTERNS = 64
HEX64 = re.compile(r"[0-9a-f]{64}")


def _expiry(text: str) -> float | None:
    """Unix time of an `expires` value ("" = never); a date ends at its midnight UTC."""
    if not text:
        return None
    when = dt.datetime.fromisoformat(text)
    if len(text) == 10:  # a date: valid through that day
        when += dt.timedelta(days=1)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass(frozen=True)
class TokenConfig:
    """One `[[tokens]]` table."""

    name: str
    role: str
    token: str = field(default="", repr=False)
    token_sha256: str = field(default="", repr=False)
    streams: tuple[str, ...] = ()
    expires: str = ""

    def __post_init__(self) -> None:
        label = f"token {self.name!r}" if NAME_RE.fullmatch(str(self.name)) else "a token"
        checks = [
            (
                isinstance(self.name, str) and bool(NAME_RE.fullmatch(self.name)),
                "name must be a stream-like name",
            ),
            (self.role in ROLES, "role must be admin, viewer or ingest"),
            (bool(self.token) != bool(self.token_sha256), "give token or token_sha256, not both"),
            (
                not self.token_sha256 or bool(HEX64.fullmatch(self.token_sha256)),
                "token_sha256 must be 64 lowercase hex digits",
            ),
            (not self.token or 8 <= len(self.token) <= 4096, "token must be 8-4096 characters"),
            (
                len(self.streams) <= MAX_PATTERNS
                and all(isinstance(s, str) and 0 < len(s) <= 128 for s in self.streams),
                f"streams must be at most {MAX_PATTERNS} patterns of 1-128 characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad {label}: {message}")
        try:
            _expiry(self.expires)
        except (ValueError, TypeError):
            raise ConfigError(f"bad {label}: expires must be a date or an ISO 8601 time") from None

    @property
    def digest(self) -> bytes:
        if self.token_sha256:
            return bytes.fromhex(self.token_sha256)
        return hashlib.sha256(self.token.encode()).digest()


def token_from_dict(raw: Any) -> TokenConfig:
    """A TokenConfig from a TOML table; unknown keys and bad types are refused."""
    if not isinstance(raw, dict):
        raise ConfigError("bad token: each [[tokens]] entry must be a table")
    known = {f.name for f in dataclasses.fields(TokenConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"bad token: unknown setting {sorted(unknown)[0]!r}")
    values = dict(raw)
    streams = values.get("streams", [])
    if not isinstance(streams, list):
        raise ConfigError("bad token: streams must be a list of patterns")
    values["streams"] = tuple(streams)
    if isinstance(values.get("expires"), dt.date | dt.datetime):  # TOML dates arrive parsed
        values["expires"] = values["expires"].isoformat()
    for key in ("name", "role", "token", "token_sha256", "expires"):
        if key in values and not isinstance(values[key], str):
            raise ConfigError(f"bad token: {key} must be a string")
    for key in ("name", "role"):
        if key not in values:
            raise ConfigError(f"bad token: {key} is required")
    return TokenConfig(**values)


@dataclass(frozen=True)
class Principal:
    """Who a request or connection proved to be."""

    name: str
    role: str
    streams: tuple[str, ...] = ()

    def may(self, action: str) -> bool:
        return action in MAY[self.role]

    def may_push(self, stream: str) -> bool:
        if self.role == "admin":
            return True
        if self.role != "ingest":
            return False
        return not self.streams or any(fnmatch.fnmatchcase(stream, s) for s in self.streams)


EVERYONE = Principal("", "admin")  # no token configured: as before, everyone may do everything


class Tokens:
    """Every configured token; `check` turns a presented secret into a Principal."""

    def __init__(self, configs: tuple[TokenConfig, ...], auth_token: str = "") -> None:
        self._entries = [
            (c.digest, _expiry(c.expires), Principal(c.name, c.role, c.streams)) for c in configs
        ]
        if auth_token:
            digest = hashlib.sha256(auth_token.encode()).digest()
            self._entries.append((digest, None, Principal("auth_token", "admin")))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def check(self, given: str, now: float) -> tuple[Principal | None, str]:
        """(who, "") for a valid token; (None, why) otherwise: "missing", "wrong", "expired"."""
        if not self._entries:
            return EVERYONE, ""
        if not given:
            return None, "missing"
        digest = hashlib.sha256(given.encode()).digest()
        found = None
        for entry_digest, expires, principal in self._entries:  # no early exit: constant time
            if hmac.compare_digest(digest, entry_digest):
                found = (expires, principal)
        if found is None:
            return None, "wrong"
        expires, principal = found
        if expires is not None and now >= expires:
            return None, "expired"
        return principal, ""


class Throttle:
    """Failed attempts per source address: past `limit` within `window_s`, that address is
    refused until its failures age out. At most `max_addresses` are remembered (the oldest go
    first), so a flood from many addresses cannot grow the table."""

    def __init__(self, limit: int, window_s: float, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        if self.limit <= 0:
            return False
        times = self._recent(address, now)
        return len(times) >= self.limit

    def failed(self, address: str, now: float) -> None:
        if self.limit <= 0:
            return
        times = self._recent(address, now)
        times.append(now)
        del times[: max(0, len(times) - self.limit)]
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(address, ()) if now - t < self.window_s]
        if not times:
            self._failures.pop(address, None)
        return times
