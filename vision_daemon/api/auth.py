"""The control plane's token and role check, for HTTP requests and WebSockets (refusals counted
and logged, rate-limited, never with the token)."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, Request, WebSocket, WebSocketDisconnect

from vision_daemon.access import Access, reason_text
from vision_daemon.tokens import READ, WRITE, Principal

log = logging.getLogger(__name__)

WS_POLICY_VIOLATION = 1008  # refused token
# A browser cannot set headers on a WebSocket: the dashboard offers this subprotocol and its
# token as a second one, "bearer.<base64url of the token>", which stays out of every URL.
WS_SUBPROTOCOL = "vision-daemon"
WS_BEARER_PREFIX = "bearer."


class TokenGate:
    """Checks tokens and roles for HTTP routes and WebSockets (vision_daemon/access.py): a read
    (GET, HEAD, /ws) needs a viewer or admin token, a write (POST, PATCH, PUT, DELETE) an admin
    one, frames in an ingest or admin one. No token configured: everyone passes."""

    def __init__(self, access: Access, retry_after_s: float = 60.0) -> None:
        self.access = access
        self.retry_after_s = retry_after_s

    @staticmethod
    def _given(header: str | None, query: str | None) -> str:
        if header and header.lower().startswith("bearer "):
            return header[7:]
        return query or ""

    def identify(self, request: Request) -> Principal:
        """A route dependency: who the request's token proves to be (401, or 429 for an address
        that failed too often lately)."""
        route = _route(request.scope)
        host = request.client.host if request.client else "?"
        given = self._given(request.headers.get("authorization"), request.query_params.get("token"))
        principal, why = self.access.authenticate(given, "http", route, host)
        if principal is None:
            if why == "throttled":
                raise HTTPException(
                    429, reason_text(why), headers={"Retry-After": str(int(self.retry_after_s))}
                )
            raise HTTPException(401, f"{reason_text(why)}: send 'Authorization: Bearer <token>'")
        return principal

    def require(self, request: Request) -> Principal:
        """A route dependency: a token whose role may do this method (403 when it may not)."""
        principal = self.identify(request)
        action = READ if request.method in ("GET", "HEAD") else WRITE
        if not principal.may(action):
            route = _route(request.scope)
            host = request.client.host if request.client else "?"
            self.access.refused("http", route, principal.name, "forbidden", host)
            raise HTTPException(
                403, f"token {principal.name!r} ({principal.role}) may not {action} here"
            )
        return principal

    async def accept_ws(self, websocket: WebSocket, action: str = READ) -> Principal | None:
        """Accept, then check the token and its role; a refusal is closed with 1008 (None)."""
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
        route = _route(websocket.scope)
        host = websocket.client.host if websocket.client else "?"
        given = self._given(header, websocket.query_params.get("token"))
        principal, why = self.access.authenticate(given, "ws", route, host)
        reason = reason_text(why)
        if principal is not None and not principal.may(action):
            self.access.refused("ws", route, principal.name, "forbidden", host)
            reason = f"token {principal.name!r} may not {action} here"
            principal = None
        if principal is not None:
            return principal
        try:
            await websocket.close(code=WS_POLICY_VIOLATION, reason=reason[:120])
        except (WebSocketDisconnect, RuntimeError, OSError):  # the peer left first
            pass
        return None


def _route(scope: Mapping[str, Any]) -> str:
    """The route's template (/streams/{name}), never the raw path: a bounded metric label."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "?"


def _unbase64url(text: str) -> str:
    """A token the dashboard sent as base64url without padding; "" if it does not decode."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):
        return ""
