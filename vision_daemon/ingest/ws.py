"""WebSocket ingest on the control-plane port; each connection is a Sink for its streams.

Two modes share one connection object:
- `WS /ingest`: each binary message is one protocol message (the TCP msgpack map without its
  4-byte length prefix: hello, frame, bye), validated exactly as on TCP; everything the server
  says comes back the same way.
- `WS /ingest/{stream}`: for browsers. Each binary message is one JPEG; the server numbers the
  frames (0, 1, 2 ...) and stamps them with its receive time; the welcome, results, dropped
  notices and errors come back as JSON text. Options come as query parameters.

The WebSocket layer (uvicorn + websockets) frames messages, refuses any over `ws_max_size`
(set to `max_message_bytes`) with close code 1009 before reading it, and holds at most one
unread message per connection (it stops reading the socket until the app takes it). Auth is
checked by the route before a connection gets here. A `WsConnection` is the framing on the peer
core (`ingest/core.py`), which a TCP `Connection` shares: the bounded outbox with its drop rules,
timeouts, hello -> welcome, bye, and a shutdown that delivers the results of frames already
accepted before closing (with 1001 when the daemon stops). This module adds the connection cap,
the two modes' encodings and the close codes.
Close codes are in docs/PROTOCOL.md ("WebSocket ingest").
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgpack
from starlette.websockets import WebSocket, WebSocketDisconnect

from vision_daemon import protocol as p
from vision_daemon.access import Access
from vision_daemon.config import Config
from vision_daemon.decode import JPEG_MAGIC
from vision_daemon.ingest.core import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    Attachment,
    Close,
    PeerConnection,
    PeerIngest,
)
from vision_daemon.log import log_limited, peer_host
from vision_daemon.options import OptionError, parse_text
from vision_daemon.pipeline import Pipeline
from vision_daemon.tokens import EVERYONE, Principal

log = logging.getLogger(__name__)

WS_NORMAL = CLOSE_NORMAL  # after the client's bye
WS_GOING_AWAY = CLOSE_GOING_AWAY  # daemon shutting down
WS_UNSUPPORTED_DATA = 1003  # a text message where binary is expected
WS_POLICY_VIOLATION = CLOSE_POLICY_VIOLATION  # wrong token (the route), refusals, timeouts
WS_MESSAGE_TOO_BIG = 1009  # sent by the WebSocket layer for a message over max_message_bytes
WS_INTERNAL_ERROR = 1011  # a bug in this module (logged with a traceback)
WS_TRY_AGAIN_LATER = 1013  # ws_ingest_max_connections reached, or the daemon not serving yet
MAX_REASON = 120  # a close reason must fit in 123 bytes (RFC 6455); ours are ASCII
NO_SHM = "shared memory needs the Unix socket or loopback TCP, not WebSocket"


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    value = query.get(name, "true" if default else "false").lower()
    if value not in ("1", "0", "true", "false"):
        raise p.ProtocolError(p.E_INVALID, f"query parameter {name} must be true or false")
    return value in ("1", "true")


def query_options(query: Mapping[str, str]) -> tuple[p.StreamOptions, bool, bool]:
    """Browser-mode options from the query string, checked as a hello's options are (every
    option of vision_daemon/options.py; other parameters, such as the token, are not options).

    Returns the stream options, whether dropped notices are sent (`dropped_notices`, on unless
    turned off: every frame then gets exactly one reply) and whether a welcome is (`welcome`,
    off unless asked for: the first reply is then the first frame's).
    """
    notices = _flag(query, "dropped_notices", True)
    welcome = _flag(query, "welcome", False)
    try:
        return parse_text(query), notices, welcome
    except OptionError as exc:
        raise p.ProtocolError(p.E_INVALID, str(exc)) from None


def _encode(msg: Mapping[str, object], browser: bool) -> bytes | str:
    """A binary msgpack map for /ingest, a JSON text for browser mode."""
    if browser:
        return json.dumps(msg, separators=(",", ":"), allow_nan=False)
    return p.pack(msg)[p.HEADER_SIZE :]


async def _send(websocket: WebSocket, msg: bytes | str) -> None:
    if isinstance(msg, str):
        await websocket.send_text(msg)
    else:
        await websocket.send_bytes(msg)


class WsConnection(PeerConnection):
    """One WebSocket peer: one message per WebSocket message on a `PeerConnection`, closed with
    a close code; `stream` set means browser mode (JPEGs in, JSON out, no hello)."""

    ingest: WsIngest
    plane = "ws"
    write_errors = (WebSocketDisconnect, RuntimeError, OSError)

    def __init__(
        self,
        ingest: WsIngest,
        websocket: WebSocket,
        stream: str | None = None,
        options: p.StreamOptions | None = None,
        notices: bool = False,
        welcome: bool = False,
    ) -> None:
        client = websocket.client
        peer = f"{client.host}:{client.port}" if client else "?"
        super().__init__(ingest, peer, Attachment(NO_SHM), notices)
        self.ws = websocket
        self.stream = stream
        self.browser = stream is not None
        self.options = options or p.StreamOptions()
        self.greeted = self.browser  # the URL is a browser's hello; /ingest waits for one
        self.next_id = 0  # browser mode numbers the frames
        self.send_welcome = welcome  # browser mode: only when the URL asks for it
        self.peer_gone = False  # the client closed (or vanished): nothing to close
        self._receiving = False
        self._reader_task: asyncio.Task[None] | None = None

    # ---- framing --------------------------------------------------------------------------------
    def encode(self, msg: Mapping[str, object]) -> bytes | str:
        return _encode(msg, self.browser)

    def encode_result(self, payload: bytes) -> bytes | str:
        body = payload[p.HEADER_SIZE :]  # the pipeline packs for TCP: drop the length prefix
        return _encode(msgpack.unpackb(body, raw=False), True) if self.browser else body

    async def run(self) -> None:
        if self.browser:
            assert self.stream is not None
            who = self.principal
            if not who.may_push(self.stream):
                host = peer_host(self.peer)
                self.ingest.access.refused("ws", "stream", who.name, "forbidden", host)
                why = f"token {who.name!r} may not push stream {self.stream!r}"
                await self._refuse_stream(p.E_UNAUTHORIZED, why)
                return
            refused = self.pipeline.attach(self, self.stream, self.options)
            if refused is not None:
                await self._refuse_stream(p.E_LIMIT, refused)
                return
            if self.send_welcome:
                self._send(self.welcome_for(False))
        await super().run()

    async def _refuse_stream(self, code: str, why: str) -> None:
        """Browser mode refused its stream: counted, then a close with the code and the reason,
        never an error on an open socket; nothing of it stays attached."""
        self.pipeline.count_error(code)
        await self.close_transport(Close(WS_POLICY_VIOLATION, f"{code}: {why}"), flushed=True)
        self.pipeline.detach(self)

    async def read_messages(self) -> None:
        """In a task of its own, which `stop_reading` cancels while it waits for a message."""
        self._reader_task = asyncio.create_task(super().read_messages())
        try:
            await self._reader_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this connection itself is being cancelled
            # else: shutdown() ended the reader while it waited for a message
        except Exception:  # a bug here must not take the control plane with it
            self.closing = Close(WS_INTERNAL_ERROR, "internal error")
            log_limited(
                log,
                self.ingest.log_limit,
                "bug",
                time.monotonic(),
                logging.ERROR,
                "WebSocket ingest connection from %s failed",
                self.peer,
                exc_info=True,
            )
        finally:
            if not self._reader_task.done():
                self._reader_task.cancel()

    async def receive(self) -> bytes | None:
        self._receiving = True
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            message = {"type": "websocket.disconnect", "code": 1006}
        finally:
            self._receiving = False
        if message["type"] == "websocket.disconnect":
            self.peer_gone = True
            if message.get("code") == WS_MESSAGE_TOO_BIG:  # refused by the WebSocket layer
                self.pipeline.count_error(p.E_TOO_LARGE)
            return None
        data = message.get("bytes")
        if data is None and self.reading:
            self.pipeline.count_error(p.E_NOT_BINARY)
            self.error(p.E_NOT_BINARY, "text message; this endpoint takes binary messages")
            self.shutdown(Close(WS_UNSUPPORTED_DATA, "binary messages only"))
        return None if data is None else bytes(data)

    async def write(self, outbox: deque[Any]) -> None:
        await _send(self.ws, outbox.popleft())

    def stop_reading(self) -> None:
        if self._receiving and self._reader_task is not None:
            self._reader_task.cancel()  # only ever while it waits for a message: none is lost

    async def close_transport(self, close: Close, flushed: bool) -> None:
        if not self.peer_gone:
            try:
                await asyncio.wait_for(self.ws.close(close.code, close.reason[:MAX_REASON]), 2.0)
            except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                pass

    # ---- input ----------------------------------------------------------------------------------
    def handle(self, body: bytes) -> bool:
        """Browser mode: one JPEG, numbered here and stamped with the server's receive time;
        /ingest: one protocol message."""
        if not self.browser:
            return super().handle(body)
        assert self.stream is not None
        frame_id = self.next_id
        self.next_id += 1
        if not body.startswith(JPEG_MAGIC):
            exc = p.ProtocolError(
                p.E_DECODE,
                "message is not a JPEG; send one JPEG image per binary message",
                frame_id=frame_id,
            )
            self.pipeline.refuse_message(exc)  # counted as received and dropped (invalid)
            self.error(exc.code, exc.message, frame_id)
            return True
        self.submit(p.Frame(self.stream, frame_id, time.time(), body, "jpeg"), self.options)
        return True


class WsIngest(PeerIngest[WsConnection]):
    """The WebSocket ingest connections: at most `ws_ingest_max_connections`, served only
    between `start()` (the workers are up) and `stop_accepting()`."""

    def __init__(self, config: Config, pipeline: Pipeline, access: Access | None = None) -> None:
        super().__init__(config, pipeline, access)
        self.started = False

    def start(self, welcome: p.Welcome) -> None:
        self.welcome = welcome
        self.started = True

    def counts(self) -> dict[str, int]:
        """What /stats shows under `ws_ingest`."""
        return {
            "open": len(self.connections),
            "total": self.total,
            "refused": self.refused,
            "outbox_max": max((len(c.outbox) for c in self.connections), default=0),
        }

    async def serve(
        self,
        websocket: WebSocket,
        stream: str | None = None,
        browser: bool = False,
        principal: Principal = EVERYONE,
    ) -> None:
        """Run one accepted, authorised WebSocket until it closes. Browser mode when `stream`
        is named or `browser` is set; a browser connection that names no stream gets one of
        its own, `ws-` and 8 random hex digits, which every result it gets carries."""
        self.total += 1
        cfg = self.config
        browser = browser or stream is not None
        if browser and stream is None:
            stream = f"ws-{secrets.token_hex(4)}"
        limit = cfg.ws_ingest_max_connections
        why = ""
        if limit == 0:  # off: a refusal a client should not retry
            self._refused(websocket, "WebSocket ingest is off")
            self.pipeline.count_error(p.E_LIMIT)
            why = "WebSocket ingest is off (ws_ingest_max_connections = 0)"
            await self._refuse(websocket, browser, p.E_LIMIT, why, WS_POLICY_VIOLATION)
            return
        if not self.started or self.stopping:
            why = "daemon shutting down" if self.stopping else "daemon starting; try again later"
        elif len(self.connections) >= limit:
            why = f"ws_ingest_max_connections={limit} reached; try again later"
        if why:
            self._refused(websocket, why)
            self.pipeline.count_error(p.E_LIMIT)
            await self._refuse(websocket, browser, p.E_LIMIT, why, WS_TRY_AGAIN_LATER)
            return
        options, notices, welcome = p.StreamOptions(), False, False
        if stream is not None:
            try:
                p.validate_stream_name(stream)
                options, notices, welcome = query_options(websocket.query_params)
            except p.ProtocolError as exc:
                self.pipeline.count_error(exc.code)  # no frame was sent: not a dropped frame
                await self._refuse(websocket, browser, exc.code, exc.message, WS_POLICY_VIOLATION)
                return
        conn = WsConnection(self, websocket, stream, options, notices, welcome)
        conn.principal = principal
        self.connections.add(conn)
        try:
            await self._tasks.run(conn.run())
        finally:
            self.connections.discard(conn)

    async def _refuse(
        self, websocket: WebSocket, browser: bool, code: str, message: str, close: int
    ) -> None:
        """/ingest: an error message, then a close with its code and the error code as reason.
        Browser mode: only the close, its reason the code and the message (a simple client
        reads replies to its frames, and must not take a refusal for one)."""
        try:
            async with asyncio.timeout(2.0):
                if not browser:
                    await _send(websocket, _encode(p.error_message(code, message), browser))
                    await websocket.close(close, code)
                else:
                    await websocket.close(close, f"{code}: {message}"[:MAX_REASON])
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            pass

    def _refused(self, websocket: WebSocket, why: str) -> None:
        self.refused += 1
        host = websocket.client.host if websocket.client else "?"
        log_limited(
            log,
            self.log_limit,
            "refused:" + host,
            time.monotonic(),
            logging.WARNING,
            "refused a WebSocket ingest connection from %s: %s",
            host,
            why,
        )
