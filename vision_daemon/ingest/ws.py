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
checked by the route before a connection gets here. What this module adds is what a TCP
`Connection` has: a connection cap, a bounded outbox with the same drop rules, timeouts, and a
shutdown that delivers the results of frames already accepted before closing with 1001.
Close codes are in docs/PROTOCOL.md ("WebSocket ingest").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import msgpack
from starlette.websockets import WebSocket, WebSocketDisconnect

from vision_daemon import protocol as p
from vision_daemon.config import Config
from vision_daemon.decode import JPEG_MAGIC
from vision_daemon.ingest.peer import ConnectionTasks, PeerSink
from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.options import OptionError, parse_text
from vision_daemon.pipeline import Pipeline

log = logging.getLogger(__name__)

WS_NORMAL = 1000  # after the client's bye
WS_GOING_AWAY = 1001  # daemon shutting down
WS_UNSUPPORTED_DATA = 1003  # a text message where binary is expected
WS_POLICY_VIOLATION = 1008  # wrong token (the route), a fatal refusal, timeouts, slow_consumer
WS_MESSAGE_TOO_BIG = 1009  # sent by the WebSocket layer for a message over max_message_bytes
WS_INTERNAL_ERROR = 1011  # a bug in this module (logged with a traceback)
WS_TRY_AGAIN_LATER = 1013  # ws_ingest_max_connections reached, or the daemon not serving yet
MAX_REASON = 120  # a close reason must fit in 123 bytes (RFC 6455); ours are ASCII


def query_options(query: Mapping[str, str]) -> tuple[p.StreamOptions, bool]:
    """Browser-mode options from the query string, checked as a hello's options are (every
    option of vision_daemon/options.py; other parameters, such as the token, are not options).

    Returns the stream options and whether dropped notices were asked for.
    """
    notices = query.get("dropped_notices", "false").lower()
    if notices not in ("1", "0", "true", "false"):
        raise p.ProtocolError(p.E_INVALID, "query parameter dropped_notices must be true or false")
    try:
        return parse_text(query), notices in ("1", "true")
    except OptionError as exc:
        raise p.ProtocolError(p.E_INVALID, str(exc)) from None


class WsConnection(PeerSink):
    """One WebSocket peer: a reader that never waits on inference and a writer with a bounded
    outbox (as a TCP `Connection`); `stream` set means browser mode."""

    def __init__(
        self,
        ingest: WsIngest,
        websocket: WebSocket,
        stream: str | None = None,
        options: p.StreamOptions | None = None,
        notices: bool = False,
    ) -> None:
        super().__init__(ingest.config, ingest.pipeline, notices)
        self.ingest = ingest
        self.ws = websocket
        client = websocket.client
        self.peer = f"{client.host}:{client.port}" if client else "?"
        self.stream = stream
        self.browser = stream is not None
        self.options = options or p.StreamOptions()
        self.hello: p.Hello | None = None
        self.greeted = self.browser  # the URL is a browser's hello; /ingest waits for one
        self.next_id = 0  # browser mode numbers the frames
        self.reading = True
        self.saying_bye = False
        self.peer_gone = False  # the client closed (or vanished): nothing to close
        self.closing: tuple[int, str] | None = None  # close code and reason, once decided
        self.messages = 0
        self._receiving = False
        self._reader_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ---- the transport's part of PeerSink ----------------------------------------------------
    def encode(self, msg: dict[str, Any]) -> bytes | str:
        """A binary msgpack map for /ingest, a JSON text for browser mode."""
        if self.browser:
            return json.dumps(msg, separators=(",", ":"), allow_nan=False)
        return p.pack(msg)[p.HEADER_SIZE :]

    def encode_result(self, payload: bytes) -> bytes | str:
        body = payload[p.HEADER_SIZE :]  # the pipeline packs for TCP: drop the length prefix
        if self.browser:
            msg: dict[str, Any] = msgpack.unpackb(body, raw=False)
            return json.dumps(msg, separators=(",", ":"), allow_nan=False)
        return body

    def close_slow_consumer(self) -> None:
        self.shutdown(WS_POLICY_VIOLATION, p.E_SLOW_CONSUMER)

    async def _write_loop(self) -> None:
        try:
            while self.open or self.outbox:
                await self._has_output.wait()
                self._has_output.clear()
                while self.outbox:
                    msg = self.outbox.popleft()
                    if isinstance(msg, str):
                        await self.ws.send_text(msg)
                    else:
                        await self.ws.send_bytes(msg)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.open = False
            self.outbox.clear()

    # ---- lifecycle ----------------------------------------------------------------------------
    def shutdown(self, code: int = WS_GOING_AWAY, reason: str = "daemon shutting down") -> None:
        """Stop reading: nothing new is accepted; `run` then delivers what is owed and closes."""
        if self.closing is None:
            self.closing = (code, reason)
        self.reading = False
        if self._timer is not None:
            self._timer.cancel()
        if self._receiving and self._reader_task is not None:
            self._reader_task.cancel()  # only ever while it waits for a message: none is lost

    def _arm_timer(self) -> None:
        """One re-armed timer per connection: hello_timeout_s until the first valid message,
        then idle_timeout_s between messages (as on TCP; browser mode starts greeted)."""
        if self._timer is not None:
            self._timer.cancel()
        first = not self.greeted
        limit = self.config.hello_timeout_s if first else self.config.idle_timeout_s
        self._timer = asyncio.get_running_loop().call_later(limit, self._on_timeout, first, limit)

    def _on_timeout(self, first: bool, limit: float) -> None:
        code = p.E_HELLO_TIMEOUT if first else p.E_IDLE_TIMEOUT
        what = "no valid first message" if first else "no complete message"
        self.pipeline.count_error(code)
        self.error(code, f"{what} for {limit:g} s; closing")
        self.shutdown(WS_POLICY_VIOLATION, code)

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop())
        self._reader_task = asyncio.create_task(self._read_loop())
        self._arm_timer()
        if self.browser:
            self._send(self.ingest.welcome_json)
        try:
            try:
                await self._reader_task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this connection itself is being cancelled
                # else: shutdown() ended the reader while it waited for a message
            except Exception:  # a bug here must not take the control plane with it
                self.closing = (WS_INTERNAL_ERROR, "internal error")
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
            if self.saying_bye:  # results of frames already accepted are delivered first
                await self.wait_idle(self.config.shutdown_grace_s)
                self._send(self.encode({"type": "bye"}))
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if not self._reader_task.done():
                self._reader_task.cancel()
            await self._close()

    async def _read_loop(self) -> None:
        cfg = self.config
        while self.reading:
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
                return
            if not self.reading:  # shut down while this message waited: not taken
                return
            self.messages += 1
            data = message.get("bytes")
            if data is None:
                self.pipeline.count_error(p.E_NOT_BINARY)
                self.error(p.E_NOT_BINARY, "text message; this endpoint takes binary messages")
                self.shutdown(WS_UNSUPPORTED_DATA, "binary messages only")
                return
            data = bytes(data)
            if self.browser:
                self._handle_jpeg(data)
            elif not self._handle(data):
                return
            if self.greeted and self.reading:
                self._arm_timer()
            if len(self.outbox) > cfg.send_buffer_messages // 2:
                # A burst of messages must not fill the outbox before the writer had a turn.
                await asyncio.sleep(0)

    async def _close(self) -> None:
        """The one teardown path: detach streams, deliver what is owed, close, leave the pool."""
        self.pipeline.detach(self)
        try:
            if self.ingest.stopping:  # results of frames already in a detector go out first
                await self.wait_idle(self.config.shutdown_grace_s)
            self.open = False
            self._has_output.set()
            if self._writer_task is not None:
                try:
                    await asyncio.wait_for(self._writer_task, 2.0)
                except TimeoutError:
                    pass  # a peer that does not read gets no more time
            if not self.peer_gone:
                code, reason = self.closing or (WS_NORMAL, "")
                try:
                    await asyncio.wait_for(self.ws.close(code, reason[:MAX_REASON]), 2.0)
                except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                    pass
        finally:  # also when shutdown cancels a connection that ran out of time
            if self._writer_task is not None:
                self._writer_task.cancel()
            self.ingest.forget(self)

    # ---- input --------------------------------------------------------------------------------
    def _submit(self, frame: p.Frame, options: p.StreamOptions) -> None:
        self.pending += 1
        self._idle.clear()
        self.pipeline.submit(self, frame, options)

    def _handle_jpeg(self, data: bytes) -> None:
        """Browser mode: one JPEG, numbered here and stamped with the server's receive time."""
        assert self.stream is not None
        frame_id = self.next_id
        self.next_id += 1
        if not data.startswith(JPEG_MAGIC):
            exc = p.ProtocolError(
                p.E_DECODE,
                "message is not a JPEG; send one JPEG image per binary message",
                frame_id=frame_id,
            )
            self.pipeline.refuse_message(exc)  # counted as received and dropped (invalid)
            self.error(exc.code, exc.message, frame_id)
            return
        self._submit(p.Frame(self.stream, frame_id, time.time(), data, "jpeg"), self.options)

    def _handle(self, body: bytes) -> bool:
        """One protocol message (/ingest); False ends the connection."""
        msg = self.parse(body)
        if isinstance(msg, p.ProtocolError):
            if msg.fatal:
                self.shutdown(WS_POLICY_VIOLATION, msg.code)
                return False
            return True
        if (isinstance(msg, p.Hello) and msg.shm) or (
            isinstance(msg, p.Frame) and msg.encoding == "shm"
        ):
            code, why = (
                p.E_SHM,
                "shared memory needs the Unix socket or loopback TCP, not WebSocket",
            )
            self.pipeline.refuse_message(p.ProtocolError(code, why, frame_id=_frame_id(msg)))
            self.error(code, why, _frame_id(msg))
            self.shutdown(WS_POLICY_VIOLATION, code)
            return False
        self.greeted = True
        if isinstance(msg, p.Hello):  # the token was checked at the handshake; this one is not
            self.hello = msg
            self.notices = msg.dropped_notices
            self.rate_advice = msg.rate_advice
            self._send(self.ingest.welcome_for(msg.rate_advice))
            return True
        if isinstance(msg, p.Bye):
            self.saying_bye = True
            self.shutdown(WS_NORMAL, "bye")
            return False
        hello = self.hello
        options = hello.stream_options.get(msg.stream_name, hello.options) if hello else None
        self._submit(msg, options or p.StreamOptions())
        return True


def _frame_id(msg: p.Message) -> int | None:
    return msg.frame_id if isinstance(msg, p.Frame) else None


class WsIngest:
    """The WebSocket ingest connections: at most `ws_ingest_max_connections`, served only
    between `start()` (the workers are up) and `stop_accepting()`."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.connections: set[WsConnection] = set()
        self._tasks = ConnectionTasks()
        self.started = False
        self.stopping = False
        self.welcome_bin = b""
        self.welcome_json = ""
        self.welcome_dict: dict[str, Any] = {}
        self.total = 0
        self.refused = 0
        self.log_limit = RateLimiter()

    def welcome_for(self, rate_advice: bool) -> bytes:
        """The welcome; to a client that follows advice, with the rate a new stream gets now."""
        fps = self.pipeline.newcomer_fps() if rate_advice else None
        if fps is None:
            return self.welcome_bin
        return p.pack({**self.welcome_dict, "advised_fps": fps})[p.HEADER_SIZE :]

    def start(self, welcome: dict[str, Any]) -> None:
        self.welcome_dict = welcome
        self.welcome_bin = p.pack(welcome)[p.HEADER_SIZE :]
        self.welcome_json = json.dumps(welcome, separators=(",", ":"))
        self.started = True

    def stop_accepting(self) -> None:
        """Refuse new connections and stop reading every open one (shutdown, first phase)."""
        self.stopping = True
        for conn in list(self.connections):
            conn.shutdown()

    async def aclose(self, timeout: float) -> None:
        """Wait for every connection to deliver what it owes and close (shutdown, last phase)."""
        self.stop_accepting()
        await self._tasks.aclose(timeout)

    def forget(self, conn: WsConnection) -> None:
        self.connections.discard(conn)

    def counts(self) -> dict[str, int]:
        """What /stats shows under `ws_ingest`."""
        return {
            "open": len(self.connections),
            "total": self.total,
            "refused": self.refused,
            "outbox_max": max((len(c.outbox) for c in self.connections), default=0),
        }

    async def serve(self, websocket: WebSocket, stream: str | None = None) -> None:
        """Run one accepted, authorised WebSocket until it closes (`stream`: browser mode)."""
        self.total += 1
        cfg = self.config
        browser = stream is not None
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
        options, notices = p.StreamOptions(), False
        if stream is not None:
            try:
                p.validate_stream_name(stream)
                options, notices = query_options(websocket.query_params)
            except p.ProtocolError as exc:
                self.pipeline.count_error(exc.code)  # no frame was sent: not a dropped frame
                await self._refuse(websocket, browser, exc.code, exc.message, WS_POLICY_VIOLATION)
                return
        conn = WsConnection(self, websocket, stream, options, notices)
        self.connections.add(conn)
        try:
            await self._tasks.run(conn.run())
        finally:
            self.connections.discard(conn)

    async def _refuse(
        self, websocket: WebSocket, browser: bool, code: str, message: str, close: int
    ) -> None:
        """An error message in the mode's format, then a close with its code and reason."""
        msg = p.error_message(code, message)
        try:
            async with asyncio.timeout(2.0):
                if browser:
                    await websocket.send_text(
                        json.dumps(msg, separators=(",", ":"), allow_nan=False)
                    )
                else:
                    await websocket.send_bytes(p.pack(msg)[p.HEADER_SIZE :])
                await websocket.close(close, code)
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
