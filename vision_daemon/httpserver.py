"""Hosts the ASGI control plane on uvicorn, inside the daemon's loop, with connection bounds.

uvicorn's own settings close idle keep-alive connections (`timeout_keep_alive`) and answer 503
past `limit_concurrency`, but they neither cap connections at accept nor time out a socket that
never sends its first byte. A subclass of its h11 protocol adds both, over uvicorn's documented
`Config(http=<protocol class>)` hook; past the cap it closes a connection that waits for a
request head to make room (`pending.py`) rather than turn the newcomer away: a cap that refuses
newcomers is one that silent sockets can fill (issue 27: 1,000 of them kept /health out). A
subclass of its WebSocket protocol (`Config(ws=<protocol class>)`) aborts a socket whose peer
does not read: uvicorn closes a WebSocket with the transport's `close()`, which waits for the
write buffer to drain, so a peer that never reads would hold the socket, and a control-plane
slot, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from vision_daemon.config import Config
from vision_daemon.log import RateLimiter, RateLimitFilter, RedactTokens, log_limited
from vision_daemon.pending import LISTEN_BACKLOG, Full, PendingPool, unread_bytes

log = logging.getLogger(__name__)


class HttpStartupError(Exception):
    """The control plane cannot listen; the message is one line."""


class _Limits:
    """Shared by every connection of one server: the caps, the idle time, the connections waiting
    for a request head (oldest first), what was refused and what was closed to make room."""

    def __init__(self, max_connections: int, idle_s: float, per_address: int) -> None:
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.pending: PendingPool[BoundedH11] = PendingPool(per_address)
        self.refused = 0
        self.evicted = 0
        self.log_limit = RateLimiter()

    def warn(self, key: str, host: str, msg: str, why: str) -> None:
        """One line per peer address and kind at a bounded rate (a peer causes these)."""
        now = time.monotonic()
        log_limited(log, self.log_limit, key + host, now, logging.WARNING, msg, host, why)


def _busy(why: str) -> bytes:
    body = f"{why}; try again later".encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _speaking(conn: BoundedH11) -> bool:
    """Bytes of its request arrived and are not read yet: it is about to be served."""
    return unread_bytes(conn.transport.get_extra_info("socket")) > 0


class BoundedH11(H11Protocol):
    """Caps connections at accept: past the cap a connection waiting for a request head is
    closed for the new one (`pending.py` says which); a request head must arrive within the
    idle time. A connection mid-request or upgraded to a WebSocket waits for no head, so it is
    never closed for a newcomer; one between two requests of a keep-alive waits for one."""

    limits: _Limits  # set on the subclass each server makes (`bounded_protocol`)
    _head_timer: asyncio.TimerHandle | None = None
    _cycle_seen: Any = None
    _upgraded = False
    _host = "?"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        self._host = self.client[0] if self.client else "?"
        full = len(self.connections) > limits.max_connections
        victim, rule = limits.pending.make_room(self._host, full, _speaking)
        why = f"http_max_connections={limits.max_connections} reached"
        if victim is not None:
            if rule is Full.ADDRESS:
                why += f", {limits.pending.per_address} or more waiting from {victim._host}"
            victim.evict(why)
        elif rule is not None:  # every candidate is speaking, or none waits for a request
            limits.refused += 1
            limits.warn("refused:", self._host, "refused an HTTP connection from %s: %s", why)
            self.connections.discard(self)
            transport.write(_busy(why))
            transport.close()
            return
        self._arm_head_timer()

    def evict(self, why: str) -> None:
        """Close this connection, which is waiting for a request head, for a newer one."""
        limits = self.limits
        limits.evicted += 1
        what = "closed an HTTP connection from %s waiting for a request, for a newer one: %s"
        limits.warn("evicted:", self._host, what, why)
        self._cancel_head_timer()
        self.connections.discard(self)  # its place is the newcomer's now
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a response it never read: not worth a socket
        else:
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.idle_s, self._head_timeout)
        self.limits.pending.add(self, self._host)

    def _cancel_head_timer(self) -> None:
        self.limits.pending.discard(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        # Nothing, or only part of a request head, within the idle time (uvicorn's own
        # keep-alive timer is cancelled by any byte, so a trickle would hold it forever).
        self.limits.pending.discard(self)
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._cycle_seen:
            self._cycle_seen = self.cycle  # a whole request head arrived
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._upgraded:
            return
        if self.cycle is not self._cycle_seen:  # a pipelined request head was already here
            self._cycle_seen = self.cycle
            return
        self._arm_head_timer()  # the next request head gets the same time

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._upgraded = True
        self._cancel_head_timer()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def bounded_protocol(limits: _Limits) -> type[BoundedH11]:
    """The h11 protocol class for one server (uvicorn makes one instance per connection)."""
    return type("BoundedH11", (BoundedH11,), {"limits": limits})


WS_ABORT_AFTER_S = 5.0  # after the app is done with a WebSocket, its peer's time to read the rest


class _AbortingWebSocket(WebSocketsSansIOProtocol):
    """Once the app has finished with a connection (the daemon already gave a peer that does not
    read its few seconds to take what was owed), the socket gets WS_ABORT_AFTER_S more to drain,
    then is aborted: what is still unsent is dropped with it."""

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            self.loop.call_later(WS_ABORT_AFTER_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()


class _Server(uvicorn.Server):
    # The daemon owns the one set of signal handlers; uvicorn must not install its own.
    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


class HttpServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = _Limits(
            config.http_max_connections,
            config.http_idle_timeout_s,
            config.http_max_pending_per_address,
        )
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def bind(self) -> socket.socket:
        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.api_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.api_host, cfg.api_port))
        except OSError as exc:
            sock.close()
            raise HttpStartupError(
                f"cannot listen on {cfg.api_host}:{cfg.api_port} ({exc.strerror}); "
                "pick another --api-port or stop the process using it"
            ) from None
        sock.listen(LISTEN_BACKLOG)
        self.port = sock.getsockname()[1]
        return sock

    async def start(self, app: Any) -> None:
        sock = self.bind()
        # uvicorn and websockets log requests and handshakes (query strings may hold a token),
        # one line per peer action: tokens are masked and each kind of line is rate-limited.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, RedactTokens) for f in logger.filters):
                logger.addFilter(RateLimitFilter())  # keyed by template, before redaction
                logger.addFilter(RedactTokens())
        ucfg = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # paths and query strings (tokens) stay out of the log
            ws=_AbortingWebSocket,
            # A WebSocket message over this is refused (close 1009) before it is read.
            ws_max_size=self.config.max_message_bytes,
            # No permessage-deflate: a 16 KB compressed message would inflate to
            # max_message_bytes on the event loop (63 ms of CPU measured), and JPEGs do not
            # compress anyway. A peer pays for every byte it makes us hold, as on TCP.
            ws_per_message_deflate=False,
            http=bounded_protocol(self.limits),
            timeout_keep_alive=max(1, int(self.config.http_idle_timeout_s)),
            limit_concurrency=self.config.http_max_connections + 1,
            timeout_graceful_shutdown=2,
            # HTTPS and WSS with tls_cert/tls_key (no client certificates: browsers connect here)
            ssl_certfile=self.config.tls_cert or None,
            ssl_keyfile=self.config.tls_key or None,
            backlog=LISTEN_BACKLOG,
        )
        self._server = _Server(ucfg)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api")
        scheme = "https" if self.config.tls_cert else "http"
        log.info("control plane listening on %s://%s:%d", scheme, self.config.api_host, self.port)

    def counts(self) -> dict[str, int]:
        """For /stats: connections open (WebSockets included), waiting for a request head,
        refused at accept, closed to make room for a newer one."""
        server = self._server
        return {
            "open": len(server.server_state.connections) if server else 0,
            "pending": len(self.limits.pending),
            "refused": self.limits.refused,
            "evicted": self.limits.evicted,
        }

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
