"""What every pushing peer's connection shares (TCP, Unix socket, WebSocket): the Sink side and
one bounded outbox, and the tasks that serve an ingest's connections.

`PeerSink` is the half of the peer connection core (`ingest/core.py`, `PeerConnection`) that the
pipeline sees: a transport says how a message is encoded (`encode`, `encode_result`) and the
core how a peer that does not read is closed (`close_slow_consumer`); the bound, the
drop-or-close rule and the per-frame tally live here once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.config import Config
from vision_daemon.pipeline import Pipeline


class ConnectionTasks:
    """The tasks serving one ingest's connections: each runs under `run`; at shutdown `aclose`
    waits for all of them once, with a timeout, then cancels the late ones."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, serving: Awaitable[None]) -> None:
        """Serve one connection in the current task, tracked until it returns."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await serving
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def aclose(self, timeout: float) -> None:
        """Each connection's own waits are bounded; this is the backstop."""
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


class PeerSink:
    """The `streams.Sink` of a pushing peer, with its outbox bounded by send_buffer_messages."""

    peer: str

    def __init__(self, config: Config, pipeline: Pipeline, notices: bool = False) -> None:
        self.config = config
        self.pipeline = pipeline
        self.notices = notices  # send `dropped` notices (hello's dropped_notices)
        self.outbox: deque[Any] = deque()
        self._has_output = asyncio.Event()
        self.pending = 0  # this connection's frames queued or in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self.open = True  # False once nothing more may be queued for sending
        # Results and dropped notices are never lost to a full outbox (a shared-memory client
        # learns from them that a slot is free again): past the bound the connection closes.
        self.lossless = False
        self.rate_advice = False  # the hello asked for `rate` messages

    # ---- what a transport provides --------------------------------------------------------------
    def encode(self, msg: Mapping[str, object]) -> Any:
        """One message as this transport sends it."""
        raise NotImplementedError

    def encode_result(self, payload: bytes) -> Any:
        """A result the pipeline packed (length-prefixed msgpack) as this transport sends it."""
        return payload

    def close_slow_consumer(self) -> None:
        """Stop reading and close once the slow_consumer error is out."""
        raise NotImplementedError

    # ---- the Sink side ------------------------------------------------------------------------
    def result(self, payload: bytes, frame: p.Frame) -> bool:
        return self._send(self.encode_result(payload), droppable=True)

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        if self.notices:
            msg = {"type": "dropped", "stream_name": stream, "frame_id": frame_id, "reason": reason}
            self._send(self.encode(msg), droppable=True)

    def error(self, code: str, message: str, frame_id: int | None = None) -> None:
        self._send(self.encode(p.error_message(code, message, frame_id)))

    def advise(self, stream: str, fps: float) -> None:
        # Skipped when the outbox is full (never closes a connection): advice repeats on change.
        if self.rate_advice and len(self.outbox) < self.config.send_buffer_messages:
            msg = {"type": "rate", "stream_name": stream, "fps": fps}
            self._send(self.encode(msg), droppable=True)

    def frame_done(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Until every frame of this connection has its result or drop, or `timeout` passes."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass

    # ---- input --------------------------------------------------------------------------------
    def parse(self, body: bytes) -> p.Message | p.ProtocolError:
        """One protocol message's body, validated; a refusal is counted, told to the peer and
        returned (the transport decides whether the connection survives it)."""
        max_streams = self.config.max_streams_per_connection
        try:
            # max_streams + 1 entries pass msgpack so an over-long hello gets limit_exceeded.
            obj = p.unpack_body(body, max_map_len=max_streams + 1)
            return p.parse_message(obj, max_streams)
        except p.ProtocolError as exc:
            self.pipeline.refuse_message(exc)
            self.error(exc.code, exc.message, exc.frame_id)
            return exc

    # ---- output -------------------------------------------------------------------------------
    def _send(self, msg: Any, *, droppable: bool = False) -> bool:
        """Queue a message within one bound for every type (send_buffer_messages).

        Past it a result or a dropped notice is lost (the caller counts it), unless the connection
        is `lossless`; any other message means the peer is not reading what it is owed: the
        connection ends with `slow_consumer`.
        """
        if not self.open:
            return False
        if len(self.outbox) >= self.config.send_buffer_messages:
            if droppable and not self.lossless:
                return False
            self.pipeline.count_error(p.E_SLOW_CONSUMER)
            why = f"{len(self.outbox)} messages unread (send_buffer_messages); closing"
            self.outbox.append(self.encode(p.error_message(p.E_SLOW_CONSUMER, why)))
            self._has_output.set()
            self.close_slow_consumer()
            self.open = False
            return False
        self.outbox.append(msg)
        self._has_output.set()
        return True
