"""One door for every plane's token check (issue 27): the tokens and their roles
(vision_daemon/tokens.py), the throttle on addresses that keep failing, and the count of every
refusal by plane, route, token name and reason (never the token itself).

HTTP routes (api/auth.py), WebSockets, the TCP/Unix hello and shared memory all ask `Access`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vision_daemon.config import Config
from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.tokens import Principal, Throttle, Tokens

log = logging.getLogger(__name__)

# (plane, route, token name or "-", reason): missing, wrong, expired, throttled, forbidden
Count = Callable[[str, str, str, str], None]


class Access:
    def __init__(
        self,
        tokens: Tokens,
        throttle: Throttle,
        count: Count | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.throttle = throttle
        self._count = count or (lambda *_: None)
        self._wall = wall
        self._clock = clock
        self._log_limit = RateLimiter()

    @property
    def enabled(self) -> bool:
        return self.tokens.enabled

    def authenticate(
        self, given: str, plane: str, route: str, host: str
    ) -> tuple[Principal | None, str]:
        """Who `given` proves to be, or (None, why): "throttled" (this address failed too often
        lately; the token is not even looked at), "missing", "wrong" or "expired"."""
        if not self.tokens.enabled:
            return self.tokens.check("", 0.0)
        now = self._clock()
        if self.throttle.blocked(host, now):
            self.refused(plane, route, "-", "throttled", host)
            return None, "throttled"
        principal, why = self.tokens.check(given, self._wall())
        if principal is None:
            self.throttle.failed(host, now)
            self.refused(plane, route, "-", why, host)
        return principal, why

    def refused(self, plane: str, route: str, token: str, reason: str, host: str) -> None:
        """Count (and log, rate-limited) a refusal: a failed check, or `forbidden` when a valid
        token's role may not do this."""
        self._count(plane, route, token, reason)
        log_limited(
            log,
            self._log_limit,
            f"{plane}:{host}",
            self._clock(),
            logging.WARNING,
            "refused %s %s from %s: %s%s",
            plane.upper(),
            route,
            host,
            reason,
            f" (token {token})" if token != "-" else "",
        )


def access_for(config: Config, count: Count | None = None) -> Access:
    """The daemon's Access: its [[tokens]] and auth_token, throttled as configured."""
    return Access(
        Tokens(config.tokens, config.auth_token),
        Throttle(config.auth_max_failures, config.auth_failure_window_s),
        count,
    )


def reason_text(why: str) -> str:
    """What a refused client is told."""
    return {
        "throttled": "refused: too many failed attempts from this address; try again later",
        "missing": "missing or wrong token",
        "wrong": "missing or wrong token",
        "expired": "token expired",
    }.get(why, "not allowed")
