"""The control plane's token check, for HTTP requests and WebSockets (refusals counted and logged,
rate-limited, never with the token)."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time

from fastapi import HTTPException, Request, WebSocket, WebSocketDisconnect

from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.metrics import Metrics

log = logging.getLogger(__name__)

WS_POLICY_VIOLATION = 1008  # refused token
# A browser cannot set headers on a WebSocket: the dashboard offers this subprotocol and its
# token as a second one, "bearer.<base64url of the token>", which stays out of every URL.
WS_SUBPROTOCOL = "vision-daemon"
WS_BEARER_PREFIX = "bearer."


class TokenGate:
    """Checks the one shared token (none configured: everyone passes)."""

    def __init__(self, token: str, metrics: Metrics) -> None:
        self.token = token
        self.metrics = metrics
        self._refusals = RateLimiter()

    def authorized(self, header: str | None, query: str | None) -> bool:
        if not self.token:
            return True
        given = query or ""
        if header and header.lower().startswith("bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def refused(self, plane: str, host: str) -> None:
        self.metrics.auth_failures.labels(plane).inc()
        log_limited(
            log,
            self._refusals,
            f"{plane}:{host}",
            time.monotonic(),
            logging.WARNING,
            "refused an %s request from %s: wrong or missing token",
            plane.upper(),
            host,
        )

    def require(self, request: Request) -> None:
        """A route dependency: 401 without the right token."""
        if not self.authorized(
            request.headers.get("authorization"), request.query_params.get("token")
        ):
            self.refused("http", request.client.host if request.client else "?")
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    async def accept_ws(self, websocket: WebSocket) -> bool:
        """Accept, then check the token; a wrong one is closed with 1008 (False)."""
        # Accept first, then close with a code: closing before accept answers HTTP 403, and a
        # WebSocket client could not tell a wrong token (1008) from a full house (1013).
        offered = [
            x.strip() for x in websocket.headers.get("sec-websocket-protocol", "").split(",")
        ]
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        header = websocket.headers.get("authorization")
        for x in offered:
            if x.startswith(WS_BEARER_PREFIX):  # the browser's way to send its token
                header = "Bearer " + _unbase64url(x[len(WS_BEARER_PREFIX) :])
        if self.authorized(header, websocket.query_params.get("token")):
            return True
        self.refused("ws", websocket.client.host if websocket.client else "?")
        try:
            await websocket.close(code=WS_POLICY_VIOLATION, reason="missing or wrong token")
        except (WebSocketDisconnect, RuntimeError, OSError):  # the peer left first
            pass
        return False


def _unbase64url(text: str) -> str:
    """A token the dashboard sent as base64url without padding; "" if it does not decode."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):
        return ""
