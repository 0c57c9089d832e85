"""Hosts the ASGI control plane on uvicorn, inside the daemon's loop, with connection bounds.

uvicorn's own settings close idle keep-alive connections (`timeout_keep_alive`) and answer 503
past `limit_concurrency`, but they neither cap connections at accept nor time out a socket that
never sends its first byte. A subclass of its h11 protocol adds both; it is a handful of lines
over uvicorn's documented `Config(http=<protocol class>)` hook. A subclass of its WebSocket
protocol (`Config(ws=<protocol class>)`) aborts a socket whose peer does not read: uvicorn closes
a WebSocket with the transport's `close()`, which waits for the write buffer to drain, so a peer
that never reads would hold the socket, and a control-plane slot, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from vision_daemon.config import Config
from vision_daemon.log import RateLimitFilter, RedactTokens

log = logging.getLogger(__name__)


class HttpStartupError(Exception):
    """The control plane cannot listen; the message is one line."""


class _Limits:
    """Shared by every connection of one server: the cap, the idle time, what was refused."""

    def __init__(self, max_connections: int, idle_s: float) -> None:
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.refused = 0


BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    b"content-length: 45\r\n\r\nhttp_max_connections reached; try again later"
)


def _bounded_protocol(limits: _Limits) -> type[H11Protocol]:
    class BoundedH11(H11Protocol):
        """Caps connections at accept; a request head must arrive within the idle time."""

        _head_timer: asyncio.TimerHandle | None = None
        _cycle_seen: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                limits.refused += 1
                self.connections.discard(self)
                transport.write(BUSY)
                transport.close()
                return
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(limits.idle_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            # Nothing, or only part of a request head, within the idle time (uvicorn's own
            # keep-alive timer is cancelled by any byte, so a trickle would hold it forever).
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._cycle_seen:
                self._cycle_seen = self.cycle  # a whole request head arrived
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request head gets the same time

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._cancel_head_timer()
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return BoundedH11


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
        self.limits = _Limits(config.http_max_connections, config.http_idle_timeout_s)
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
        sock.listen(128)
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
            http=_bounded_protocol(self.limits),
            timeout_keep_alive=max(1, int(self.config.http_idle_timeout_s)),
            limit_concurrency=self.config.http_max_connections + 1,
            timeout_graceful_shutdown=2,
            # HTTPS and WSS with tls_cert/tls_key (no client certificates: browsers connect here)
            ssl_certfile=self.config.tls_cert or None,
            ssl_keyfile=self.config.tls_key or None,
        )
        self._server = _Server(ucfg)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api")
        scheme = "https" if self.config.tls_cert else "http"
        log.info("control plane listening on %s://%s:%d", scheme, self.config.api_host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
