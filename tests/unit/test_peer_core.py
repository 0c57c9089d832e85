"""The peer connection core without sockets: an in-memory transport on `PeerConnection` gets the
same handshake, timeouts, bye, shutdown and close as TCP and WebSocket (which have their own
tests over real sockets)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import msgpack

from vision_daemon import protocol as p
from vision_daemon.config import load_config
from vision_daemon.ingest.core import (
    AFTER_BYE,
    SHUTTING_DOWN,
    Attachment,
    Close,
    PeerConnection,
    PeerIngest,
    refused,
)
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import Hub
from vision_daemon.pipeline import Pipeline
from vision_daemon.scheduler import Scheduler
from vision_daemon.streams import Reports

WELCOME = {"type": "welcome", "version": p.PROTOCOL_VERSION}


class MemoryConnection(PeerConnection):
    """A transport that frames nothing: bodies in through a queue, messages out into a list."""

    def __init__(self, ingest: MemoryIngest) -> None:
        super().__init__(ingest, "memory:1", Attachment("no shared memory in memory"))
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.wrote = asyncio.Event()
        self.closed_with: list[tuple[Close, bool]] = []

    def encode(self, msg: dict[str, Any]) -> bytes:
        return p.pack(msg)[p.HEADER_SIZE :]

    async def receive(self) -> bytes | None:
        return await self.inbox.get()

    async def write(self, outbox: deque[Any]) -> None:
        self.sent.append(msgpack.unpackb(outbox.popleft()))
        self.wrote.set()

    def stop_reading(self) -> None:
        self.inbox.put_nowait(None)

    async def close_transport(self, close: Close, flushed: bool) -> None:
        self.closed_with.append((close, flushed))

    def says(self, msg: dict[str, Any]) -> None:
        self.inbox.put_nowait(p.pack(msg)[p.HEADER_SIZE :])


class MemoryIngest(PeerIngest[MemoryConnection]):
    """An ingest whose connections are made by the test."""

    def __init__(self, **overrides: Any) -> None:
        cfg = load_config(overrides={"log_dir": "", **overrides}, environ={})
        reports = Reports()
        scheduler = Scheduler(cfg.max_in_flight_per_stream, 1.0, reports)
        super().__init__(cfg, Pipeline(cfg, reports, scheduler, Hub(), Metrics(10)))
        self.welcome = WELCOME

    async def serve(self, conn: MemoryConnection) -> None:
        self.connections.add(conn)
        await asyncio.wait_for(self._tasks.run(conn.run()), 10.0)


def test_hello_gets_the_welcome_and_bye_gets_bye_then_a_normal_close() -> None:
    """Hello -> welcome, bye -> bye, then one close with the bye's reason; the ingest forgets it."""

    async def main() -> None:
        ingest = MemoryIngest()
        conn = MemoryConnection(ingest)
        conn.says({"type": "hello", "version": p.PROTOCOL_VERSION})
        conn.says({"type": "bye"})
        await ingest.serve(conn)
        assert [m["type"] for m in conn.sent] == ["welcome", "bye"]
        assert conn.closed_with == [(AFTER_BYE, True)] and not ingest.connections

    asyncio.run(main())


def test_a_silent_peer_gets_hello_timeout_and_a_policy_close() -> None:
    """No first message within hello_timeout_s: the error is counted, sent, and the close says why."""

    async def main() -> None:
        ingest = MemoryIngest(hello_timeout_s=0.05)
        conn = MemoryConnection(ingest)
        await ingest.serve(conn)
        assert [(m["type"], m["code"]) for m in conn.sent] == [("error", p.E_HELLO_TIMEOUT)]
        assert conn.closed_with == [(refused(p.E_HELLO_TIMEOUT), True)]
        assert ingest.pipeline.errors[p.E_HELLO_TIMEOUT] == 1

    asyncio.run(main())


def test_shutdown_stops_reading_and_closes_as_going_away() -> None:
    """The ingest's first stop phase ends a waiting read; the close is the daemon's going away."""

    async def main() -> None:
        ingest = MemoryIngest()
        conn = MemoryConnection(ingest)
        conn.says({"type": "hello", "version": p.PROTOCOL_VERSION})
        serving = asyncio.create_task(ingest.serve(conn))
        await asyncio.wait_for(conn.wrote.wait(), 10.0)  # the welcome is out
        await ingest.aclose(5.0)
        await serving
        assert conn.closed_with == [(SHUTTING_DOWN, True)] and not conn.reading

    asyncio.run(main())


def test_the_base_attachment_refuses_shared_memory_fatally() -> None:
    """A transport without shared memory answers an shm frame with a fatal shm_error."""

    async def main() -> None:
        ingest = MemoryIngest()
        conn = MemoryConnection(ingest)
        conn.says({"type": "hello", "version": p.PROTOCOL_VERSION})
        shm = {"stream_name": "s", "frame_id": 3, "encoding": "shm", "slot": 0, "shape": [1, 1, 3]}
        conn.says({"type": "frame", **shm})
        await ingest.serve(conn)
        error = conn.sent[-1]
        assert (error["code"], error["frame_id"]) == (p.E_SHM, 3)
        assert conn.closed_with == [(refused(p.E_SHM), True)] and conn.pending == 0

    asyncio.run(main())
