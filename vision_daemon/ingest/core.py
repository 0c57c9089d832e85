"""The peer connection core: one object per pushing peer (TCP, Unix socket, WebSocket) that owns
the connection's lifecycle, so that a transport only frames bytes.

`PeerConnection` (a `PeerSink`, which holds the bounded outbox and its drop rules) keeps everything
per peer: the hello and idle timeouts as one re-armed timer handle, hello -> welcome, bye, the
write loop, and the one teardown path (`shutdown()` stops reading; `run` then delivers what is
owed and closes). A transport subclass provides:

- `receive()`: the next message's body, or None once the peer has gone;
- `write(outbox)`: send (and take out of the outbox) what is queued; `write_errors`: what a failed
  send raises;
- `stop_reading()`: wake a `receive()` that waits, so a shutdown takes effect now;
- `close_transport(close, flushed)`: close the socket, with `close` (a WebSocket close code and
  reason) where the transport has close codes;
- optionally `admit(msg)` (who may speak: tokens, slots) and an `Attachment` (frames that point
  outside their message: shared memory).

`PeerIngest` is what each such ingest keeps beside its connections: the welcome, the tasks, the
counts, the rate limit of its log lines and its two-phase stop.

Longer than most modules (about 360 lines) because the lifecycle it owns is one state machine
(reading, greeting, owing results, saying bye, closing) that transports must not re-implement.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, NamedTuple, TypeVar

from vision_daemon import protocol as p
from vision_daemon.access import Access, access_for
from vision_daemon.config import Config
from vision_daemon.ingest.peer import ConnectionTasks, PeerSink
from vision_daemon.log import RateLimiter, peer_host
from vision_daemon.pipeline import Pipeline
from vision_daemon.tokens import EVERYONE, Principal

CLOSE_NORMAL = 1000  # after the client's bye
CLOSE_GOING_AWAY = 1001  # daemon shutting down
CLOSE_POLICY_VIOLATION = 1008  # a fatal refusal, timeouts, slow_consumer
FLUSH_TIMEOUT_S = 2.0  # what a peer that does not read gets to take what it is owed


class Close(NamedTuple):
    """Why the server ends a connection, as a WebSocket close code and reason (RFC 6455); a
    stream socket (TCP, Unix) has no close code and only closes."""

    code: int
    reason: str


SHUTTING_DOWN = Close(CLOSE_GOING_AWAY, "daemon shutting down")
AFTER_BYE = Close(CLOSE_NORMAL, "bye")


def refused(code: str) -> Close:
    """The close of a connection the server ends for a protocol reason (its error code)."""
    return Close(CLOSE_POLICY_VIOLATION, code)


class Attachment:
    """What a connection's frames may point to outside their messages (a shared-memory ring),
    with its release rule: attached by the hello, read per frame, released per result or drop,
    closed with the connection. This base holds nothing and refuses a hello or a frame that
    points anywhere, with `refusal` as the reason (a fatal `shm_error`)."""

    def __init__(self, refusal: str) -> None:
        self.refusal = refusal

    @property
    def lossless(self) -> bool:
        """Past the outbox bound, a result or drop must close the connection, not be lost."""
        return False

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the peer's memory this connection has mapped (shown in /stats)."""
        return 0

    def attach(self, hello: p.Hello) -> None:
        """Take what the hello announces, or raise a fatal `ProtocolError`."""
        if hello.shm is not None:
            raise p.ProtocolError(p.E_SHM, self.refusal, fatal=True)

    def frame(self, frame: p.Frame) -> p.Frame:
        """The frame ready for the pipeline, or a fatal `ProtocolError` with its frame_id."""
        if frame.encoding == "shm":
            raise p.ProtocolError(p.E_SHM, self.refusal, frame_id=frame.frame_id, fatal=True)
        return frame

    def release(self, stream: str, frame_id: int) -> None:
        """The frame's result or drop is on its way to the peer."""

    def close(self) -> None:
        """The connection has ended."""


C = TypeVar("C", bound="PeerConnection")


class PeerIngest(Generic[C]):
    """What an ingest of pushing peers keeps: its open connections, the welcome they get, the
    tasks serving them, counts, the rate limit of its log lines and its two-phase stop."""

    def __init__(self, config: Config, pipeline: Pipeline, access: Access | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.access = access or access_for(config)  # tokens, roles, throttle
        self.connections: set[C] = set()
        self.welcome: p.Welcome | None = None  # the lifecycle's welcome, given to `start`
        self.stopping = False
        self.total = 0
        self.refused = 0
        self.log_limit = RateLimiter()
        self._tasks = ConnectionTasks()

    def stop_accepting(self) -> None:
        """Refuse new connections and stop reading every open one (shutdown, first phase)."""
        self.stopping = True
        for conn in list(self.connections):
            conn.shutdown()

    async def aclose(self, timeout: float) -> None:
        """Wait for every connection to deliver what it owes and close (shutdown, last phase)."""
        self.stop_accepting()
        await self._tasks.aclose(timeout)

    def forget(self, conn: C) -> None:
        """The connection has closed: it no longer counts against any cap."""
        self.connections.discard(conn)


class PeerConnection(PeerSink):
    """One pushing peer: a reader that never waits on inference, a writer with a bounded outbox,
    one timer, and its own `shutdown()`."""

    plane = "peer"  # tcp or ws: the label of its refusals

    write_errors: tuple[type[BaseException], ...] = (ConnectionError, OSError)

    def __init__(
        self, ingest: PeerIngest[Any], peer: str, attachment: Attachment, notices: bool = False
    ) -> None:
        super().__init__(ingest.config, ingest.pipeline, notices)
        self.ingest = ingest
        self.peer = peer
        self.attachment = attachment
        self.principal: Principal = EVERYONE  # who its token proved to be (no auth: everyone)
        self.hello: p.Hello | None = None
        self.greeted = False  # its first valid message came: the idle timeout applies from now
        self.reading = True
        self.saying_bye = False
        self.closing: Close | None = None  # why the server ends it, once decided (first wins)
        self.messages = 0
        self._writer_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ---- what a transport provides --------------------------------------------------------------
    async def receive(self) -> bytes | None:
        """The next message's body; None once the peer has gone (or a shutdown woke it)."""
        raise NotImplementedError

    async def write(self, outbox: deque[Any]) -> None:
        """Send at least one queued message, taking what it sends out of the outbox."""
        raise NotImplementedError

    def stop_reading(self) -> None:
        """Wake a `receive()` that waits: nothing more is read."""
        raise NotImplementedError

    async def close_transport(self, close: Close, flushed: bool) -> None:
        """Close the socket (`flushed`: the writer delivered everything in time)."""
        raise NotImplementedError

    def drop_transport(self) -> None:
        """The last word of teardown, also when the connection was cancelled while closing."""

    def admit(self, msg: p.Message) -> bool:
        """Whether this valid message may be taken (a transport's auth and connection slots);
        False ends the connection, after the transport has told the peer why."""
        return True

    def second_chance(self) -> bool:
        """Whether a peer may go on after a message that was refused but not fatally."""
        return True

    # ---- the Sink side: the attachment's release rule -------------------------------------------
    def result(self, payload: bytes, frame: p.Frame) -> bool:
        self.attachment.release(frame.stream_name, frame.frame_id)  # the peer's again once queued
        return super().result(payload, frame)

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        self.attachment.release(stream, frame_id)
        super().dropped(stream, frame_id, reason)

    def close_slow_consumer(self) -> None:
        self.shutdown(refused(p.E_SLOW_CONSUMER))

    def welcome_for(self, rate_advice: bool) -> Any:
        """The welcome; to a client that follows advice, with the rate a new stream gets now."""
        welcome = self.ingest.welcome
        assert welcome is not None, "an ingest is started with its welcome before it accepts"
        fps = self.pipeline.newcomer_fps() if rate_advice else None
        return self.encode(welcome if fps is None else {**welcome, "advised_fps": fps})

    # ---- lifecycle ------------------------------------------------------------------------------
    def shutdown(self, close: Close = SHUTTING_DOWN) -> None:
        """Stop reading: nothing new is accepted; `run` then delivers what is owed and closes."""
        if self.closing is None:
            self.closing = close
        self.reading = False
        if self._timer is not None:
            self._timer.cancel()
        self.stop_reading()

    def _arm_timer(self) -> None:
        """One re-armed timer per connection (not a task per read): close peers that stall.

        Until its first valid message (a hello, or a legacy frame with auth off; browser mode
        starts greeted) a connection has hello_timeout_s from accept, however many refused
        messages it sends; after that each complete message must come within idle_timeout_s of
        the previous one.
        """
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
        self.shutdown(refused(code))

    async def run(self) -> None:
        """Serve the peer until it leaves, says bye or is shut down; then deliver and close."""
        self._writer_task = asyncio.create_task(self._write_loop())
        self._arm_timer()
        try:
            await self.read_messages()
            if self.saying_bye:  # results of frames already accepted are delivered first
                await self.wait_idle(self.config.shutdown_grace_s)
                self._send(self.encode({"type": "bye"}))
        finally:
            if self._timer is not None:
                self._timer.cancel()
            await self._close()

    async def read_messages(self) -> None:
        """Read and handle messages until the peer leaves or the connection stops reading; a
        transport wraps this with what its reads raise."""
        cfg = self.config
        while self.open and self.reading:
            body = await self.receive()
            if body is None or not self.reading:  # shut down while it was buffered: not taken
                return
            self.messages += 1
            if not self.handle(body):
                return
            if self.greeted and self.reading:
                self._arm_timer()
            if len(self.outbox) > cfg.send_buffer_messages // 2:
                # A burst of messages read in one go must not fill the outbox before the writer
                # had a turn: a peer that reads its replies is never slow_consumer.
                await asyncio.sleep(0)

    async def _write_loop(self) -> None:
        try:
            while self.open or self.outbox:
                await self._has_output.wait()
                self._has_output.clear()
                while self.outbox:
                    await self.write(self.outbox)
        except self.write_errors:
            self.open = False
            self.outbox.clear()

    async def _close(self) -> None:
        """The one teardown path: detach streams, deliver what is owed, close, leave the pool."""
        self.pipeline.detach(self)
        try:
            if self.ingest.stopping:  # results of frames already in a detector go out first
                await self.wait_idle(self.config.shutdown_grace_s)
            self.open = False
            self._has_output.set()
            flushed = True
            if self._writer_task is not None:
                try:
                    await asyncio.wait_for(self._writer_task, FLUSH_TIMEOUT_S)
                except TimeoutError:
                    flushed = False  # a peer that does not read gets no more time
            await self.close_transport(self.closing or Close(CLOSE_NORMAL, ""), flushed)
        finally:  # also when shutdown cancels a connection that ran out of time
            if self._writer_task is not None:
                self._writer_task.cancel()
            self.drop_transport()
            self.ingest.forget(self)
            # Its streams keep this connection for stream_grace_s: they must not keep what is
            # attached too (a mapping goes now, or with the last worker still reading a slot).
            self.attachment.close()

    # ---- input ----------------------------------------------------------------------------------
    def handle(self, body: bytes) -> bool:
        """One protocol message (hello, frame or bye); False ends the connection."""
        msg = self.parse(body)
        if isinstance(msg, p.ProtocolError):
            if msg.fatal or not self.second_chance():
                self.shutdown(refused(msg.code))
                return False
            return True
        if not self.admit(msg):
            return False
        self.greeted = True
        if isinstance(msg, p.Frame) and not self.principal.may_push(msg.stream_name):
            self.forbidden(msg)  # before its slot is taken: nothing to give back
            return True
        try:
            if isinstance(msg, p.Hello):
                self.attachment.attach(msg)
            elif isinstance(msg, p.Frame):
                msg = self.attachment.frame(msg)
        except p.ProtocolError as exc:  # a refused frame: received, dropped as invalid
            self.pipeline.refuse_message(exc)
            self.error(exc.code, exc.message, exc.frame_id)
            self.shutdown(refused(exc.code))
            return False
        if isinstance(msg, p.Hello):
            self.hello = msg
            self.lossless = self.attachment.lossless
            self.notices = msg.dropped_notices or self.lossless
            self.rate_advice = msg.rate_advice
            self._send(self.welcome_for(msg.rate_advice))
            return True
        if isinstance(msg, p.Bye):
            self.saying_bye = True
            self.shutdown(AFTER_BYE)
            return False
        self.submit(msg, self.options_for(msg.stream_name))
        return True

    def forbidden(self, frame: p.Frame) -> None:
        """A frame for a stream this connection's token may not push: refused (received and
        dropped as invalid, like any refused frame), counted; the connection stays."""
        who = self.principal
        exc = p.ProtocolError(
            p.E_UNAUTHORIZED,
            f"token {who.name!r} ({who.role}) may not push stream {frame.stream_name!r}",
            frame_id=frame.frame_id,
        )
        self.pipeline.refuse_message(exc)
        self.error(exc.code, exc.message, exc.frame_id)
        self.ingest.access.refused(self.plane, "frame", who.name, "forbidden", peer_host(self.peer))

    def submit(self, frame: p.Frame, options: p.StreamOptions) -> None:
        """Hand a frame to the pipeline; it ends in exactly one result or drop."""
        self.pending += 1
        self._idle.clear()
        self.pipeline.submit(self, frame, options)

    def options_for(self, name: str) -> p.StreamOptions:
        if self.hello is None:
            return p.StreamOptions()
        return self.hello.stream_options.get(name, self.hello.options)
