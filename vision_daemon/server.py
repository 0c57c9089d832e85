"""The daemon: TCP data plane, connections, result routing and the start / serve / shutdown lifecycle."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from typing import Any

from vision_daemon import __version__
from vision_daemon import protocol as p
from vision_daemon.broadcast import Hub
from vision_daemon.config import Config
from vision_daemon.detectors import DetectorFactory, ModelInfo, load_detector_factory
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import Counts
from vision_daemon.streams import Job, QueueBudget, Stream
from vision_daemon.workers import Outcome, WorkerPool

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start (port in use, model missing); the message is one line."""


class Connection:
    """One TCP peer: a reader loop that never waits on inference and a writer with a bounded outbox."""

    def __init__(
        self, daemon: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        self.daemon = daemon
        self.id = cid
        self.reader = reader
        self.writer = writer
        addr = writer.get_extra_info("peername")
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.outbox: deque[bytes] = deque()
        self._has_output = asyncio.Event()
        self.streams: dict[str, Stream] = {}
        self.hello: p.Hello | None = None
        self.notices = False
        self.pending = 0  # this connection's frames queued or in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self.open = True
        self.saying_bye = False
        self._writer_task: asyncio.Task[None] | None = None
        self.last_message_at = time.monotonic()
        self.messages = 0

    # ---- output -------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any], *, droppable: bool = False) -> bool:
        """Queue a message; results past the bound are dropped so a non-reader slows nobody else."""
        if not self.open:
            return False
        if droppable and len(self.outbox) >= self.daemon.config.send_buffer_messages:
            return False  # the caller counts it (results_dropped per stream and in total)
        self.outbox.append(p.pack(msg))
        self._has_output.set()
        return True

    async def _write_loop(self) -> None:
        try:
            while self.open or self.outbox:
                await self._has_output.wait()
                self._has_output.clear()
                while self.outbox:
                    chunk = b"".join(self.outbox)
                    self.outbox.clear()
                    self.writer.write(chunk)
                    await self.writer.drain()
        except (ConnectionError, OSError):
            self.open = False

    async def flush(self, timeout: float) -> None:
        """Deliver what is queued (bounded by timeout), then close the socket."""
        self.open = False
        self._has_output.set()
        if self._writer_task is not None:
            try:
                await asyncio.wait_for(self._writer_task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._writer_task.cancel()
        self.writer.close()

    # ---- bookkeeping for bye / shutdown -------------------------------------------------------
    def job_started(self) -> None:
        self.pending += 1
        self._idle.clear()

    def job_ended(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass

    # ---- input --------------------------------------------------------------------------------
    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop())
        cfg = self.daemon.config
        watchdog = asyncio.create_task(self._watchdog())
        try:
            while self.open:
                header = await self.reader.readexactly(p.HEADER_SIZE)
                n = p.read_length(header, cfg.max_message_bytes)
                body = await self.reader.readexactly(n)
                self.last_message_at = time.monotonic()
                self.messages += 1
                if not self.handle(body):
                    break
            if self.saying_bye:  # results of frames already accepted are delivered first
                await self.wait_idle(cfg.shutdown_grace_s)
                self.send({"type": "bye"})
        except p.ProtocolError as exc:  # framing is broken: the rest of the stream is unreadable
            self.daemon.count_error(exc.code)
            self.send(exc.to_message())
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # peer went away (or the watchdog closed it); a partial message is not a frame
        finally:
            watchdog.cancel()
            await self.daemon.connection_closed(self)

    def _pause_reading(self) -> None:
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()

    async def _watchdog(self) -> None:
        """One timer per connection instead of one per read: close peers that stall.

        The first message must arrive within hello_timeout_s (a half-sent length prefix does not
        count), later ones within idle_timeout_s of the previous complete message.
        """
        cfg = self.daemon.config
        while True:
            first = self.messages == 0
            limit = cfg.hello_timeout_s if first else cfg.idle_timeout_s
            left = self.last_message_at + limit - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)
                continue
            code = p.E_HELLO_TIMEOUT if first else p.E_IDLE_TIMEOUT
            self.daemon.count_error(code)
            self.send(p.error_message(code, f"no complete message for {limit:g} s; closing"))
            self._pause_reading()
            self.reader.feed_eof()  # the reader loop ends; connection_closed cleans up
            return

    def handle(self, body: bytes) -> bool:
        """Handle one message; False ends the connection."""
        try:
            msg = p.parse_message(p.unpack_body(body))
        except p.ProtocolError as exc:
            self.daemon.count_invalid(self, exc)
            self.send(exc.to_message())
            return not exc.fatal
        token = self.daemon.config.auth_token
        if isinstance(msg, p.Hello):
            if token and not hmac.compare_digest((msg.token or "").encode(), token.encode()):
                self.daemon.count_error(p.E_UNAUTHORIZED)
                self.send(p.error_message(p.E_UNAUTHORIZED, "auth token missing or wrong"))
                return False
            self.hello = msg
            self.notices = msg.dropped_notices
            self.send(self.daemon.welcome())
            return True
        if token and self.hello is None:
            self.daemon.count_error(p.E_UNAUTHORIZED)
            self.send(
                p.error_message(
                    p.E_UNAUTHORIZED, "this server requires a hello with an auth token first"
                )
            )
            return False
        if isinstance(msg, p.Bye):
            self.saying_bye = True
            return False
        self.daemon.accept_frame(self, msg)
        return True

    def options_for(self, name: str) -> p.StreamOptions:
        if self.hello is None:
            return p.StreamOptions()
        return self.hello.stream_options.get(name, self.hello.options)


class Daemon:
    """Owns every component; `run()` is startup, serve until a signal, shutdown, in that order."""

    def __init__(self, config: Config, factory: DetectorFactory | None = None) -> None:
        self.config = config
        self._factory = factory
        self.started_at = time.monotonic()
        self.streams: dict[str, Stream] = {}
        self.budget = QueueBudget(config.max_queued_mb * 2**20)
        self.connections: set[Connection] = set()
        self.totals = Counts(config.stats_window_s)
        self.errors: Counter[str] = Counter()  # protocol errors by code
        self.connections_total = 0
        self.connections_refused = 0
        self.hub = Hub()
        self.scheduler = Scheduler(
            config.max_in_flight_per_stream, config.max_frame_age_ms / 1000, self.drop
        )
        self.pool: WorkerPool | None = None
        self.model_info: ModelInfo | None = None
        self.tcp_server: asyncio.Server | None = None
        self.tcp_port: int | None = None
        self.api_port: int | None = None
        self._api: Any = None
        self._api_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_cid = 0
        self.listening = False
        self.stopping = False
        self.observers: list[Any] = []  # metrics sinks: on_processed(stream, timings)
        self.last_latency_ms: float | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        # The API comes up first so /health answers while the model loads and warms up.
        if cfg.api_port >= 0:
            await self._start_api()
        factory = self._factory
        if factory is None:
            factory = await asyncio.to_thread(load_detector_factory, cfg)
        self.pool = WorkerPool(
            cfg.workers,
            factory,
            self.scheduler,
            max_batch=cfg.max_batch,
            batch_wait_s=cfg.batch_wait_ms / 1000,
            max_pixels=cfg.max_image_pixels,
            timeout_s=cfg.worker_timeout_s,
            window_s=cfg.stats_window_s,
            on_outcome=self.on_outcome,
            on_drop=self.drop,
        )
        t0 = time.perf_counter()
        self.model_info = await self.pool.load()
        log.info(
            "model %s (%s on %s) loaded and warmed in %d worker(s) in %.1f s",
            self.model_info.name,
            self.model_info.backend,
            self.model_info.device,
            cfg.workers,
            time.perf_counter() - t0,
        )
        self.pool.start()
        try:
            self.tcp_server = await asyncio.start_server(
                self._on_connect, cfg.tcp_host, cfg.tcp_port, limit=2**16, reuse_address=True
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.tcp_host}:{cfg.tcp_port} ({exc.strerror}); "
                "pick another --tcp-port or stop the process using it"
            ) from None
        self.tcp_port = self.tcp_server.sockets[0].getsockname()[1]
        self.listening = True
        log.info("data plane listening on tcp://%s:%d", cfg.tcp_host, self.tcp_port)
        self.spawn(self._janitor())

    async def _start_api(self) -> None:
        import uvicorn

        from vision_daemon.api import create_app

        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.api_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.api_host, cfg.api_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot listen on {cfg.api_host}:{cfg.api_port} ({exc.strerror}); "
                "pick another --api-port or stop the process using it"
            ) from None
        sock.listen(128)
        self.api_port = sock.getsockname()[1]

        class _Server(uvicorn.Server):
            # The daemon owns the one set of signal handlers; uvicorn must not install its own.
            def capture_signals(self) -> Any:
                import contextlib

                return contextlib.nullcontext()

        ucfg = uvicorn.Config(
            create_app(self), log_config=None, access_log=False, ws="websockets-sansio"
        )
        self._api = _Server(ucfg)
        self._api_task = asyncio.create_task(self._api.serve(sockets=[sock]), name="api")
        log.info("control plane listening on http://%s:%d", cfg.api_host, self.api_port)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second %s: exiting now", sig.name)
                os._exit(1)
            log.info("%s: shutting down (again to force)", sig.name)
            self._stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def ready(self) -> tuple[bool, str]:
        """Ready = every worker's model loaded and warm, and the TCP listener up; else the reason."""
        if self.stopping:
            return False, "shutting down"
        if self.pool is None or not self.pool.ready:
            states = [w.stats.state for w in self.pool.workers] if self.pool else []
            return False, f"model loading/warming up (workers: {states or 'not started'})"
        stuck = [
            w.id for w in self.pool.workers if w.stats.state in ("stuck", "restarting", "failed")
        ]
        if stuck:
            return False, f"worker(s) {stuck} stuck or restarting"
        if not self.listening:
            return False, "TCP listener not up"
        return True, "ready"

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, stop reading, finish in-flight work within the grace, flush, close."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.config.shutdown_grace_s
        self.listening = False
        if self.tcp_server is not None:
            self.tcp_server.close()
        for conn in list(self.connections):
            conn._pause_reading()  # stop reading: nothing new is accepted
            conn.reader.feed_eof()
        for stream in self.streams.values():
            while stream.queue:
                self.drop(stream.pop(), "shutdown")
        if self.pool is not None:
            await self.pool.stop(grace)
        await asyncio.gather(
            *(c.flush(min(grace, 2.0)) for c in list(self.connections)), return_exceptions=True
        )
        for task in list(self._tasks):
            task.cancel()
        self.hub.close()
        if self._api is not None:
            self._api.should_exit = True
            if self._api_task is not None:
                try:
                    await asyncio.wait_for(self._api_task, 5)
                except (TimeoutError, asyncio.CancelledError):
                    pass
        log.info(
            "stopped: %d received, %d processed, %d dropped",
            self.totals.received,
            self.totals.processed,
            sum(self.totals.dropped.values()),
        )

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _janitor(self) -> None:
        """Streams of closed connections leave /stats after stream_grace_s."""
        while True:
            await asyncio.sleep(min(1.0, self.config.stream_grace_s))
            now = time.monotonic()
            for name, s in list(self.streams.items()):
                if (
                    s.detached_at is not None
                    and s.in_flight == 0
                    and now - s.detached_at >= self.config.stream_grace_s
                ):
                    del self.streams[name]

    # ---- connections --------------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.stopping or len(self.connections) >= self.config.max_connections:
            self.connections_refused += 1
            self.count_error(p.E_LIMIT)
            msg = (
                "server is shutting down"
                if self.stopping
                else (f"max_connections={self.config.max_connections} reached; try again later")
            )
            writer.write(p.pack(p.error_message(p.E_LIMIT, msg)))
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, ConnectionError, OSError):
                pass
            writer.close()
            return
        self._next_cid += 1
        conn = Connection(self, reader, writer, self._next_cid)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections.add(conn)
        log.debug("connection %d from %s", conn.id, conn.peer)
        await conn.run()

    async def connection_closed(self, conn: Connection) -> None:
        now = time.monotonic()
        for stream in conn.streams.values():
            while stream.queue:
                self.drop(stream.pop(), "disconnected")
            stream.detached_at = now
        if self.stopping:  # results of frames already in a detector are delivered first
            await conn.wait_idle(self.config.shutdown_grace_s)
        await conn.flush(2.0)
        self.connections.discard(conn)
        log.debug("connection %d from %s closed", conn.id, conn.peer)

    def welcome(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "type": "welcome",
            "version": p.PROTOCOL_VERSION,
            "server": f"vision-daemon {__version__}",
            "model": self.model_info.to_dict() if self.model_info else None,
            "limits": {
                "max_message_bytes": cfg.max_message_bytes,
                "max_image_pixels": cfg.max_image_pixels,
                "max_streams_per_connection": cfg.max_streams_per_connection,
                "queue_depth": cfg.queue_depth,
                "max_frame_age_ms": cfg.max_frame_age_ms,
            },
        }

    # ---- the flow: frame -> stream queue -> scheduler -> worker -> result ---------------------
    def _stream_for(self, conn: Connection, name: str, frame_id: int) -> Stream | None:
        stream = conn.streams.get(name)
        if stream is not None:
            return stream
        cfg = self.config
        existing = self.streams.get(name)
        reason = None
        if existing is not None and existing.detached_at is None:
            owner = existing.conn.peer if existing.conn else "?"
            reason = f"stream {name!r} is in use by another connection ({owner})"
        elif len(conn.streams) >= cfg.max_streams_per_connection:
            reason = f"max_streams_per_connection={cfg.max_streams_per_connection} reached"
        elif (
            existing is None
            and sum(1 for s in self.streams.values() if s.detached_at is None) >= cfg.max_streams
        ):
            reason = f"max_streams={cfg.max_streams} reached"
        if reason is not None:
            self.totals.on_received(time.monotonic())
            self.totals.on_dropped("refused")
            self.count_error(p.E_LIMIT)
            conn.send(p.error_message(p.E_LIMIT, f"stream refused: {reason}", frame_id))
            return None
        options = conn.options_for(name)
        if existing is not None:  # a camera reconnecting: counters carry on
            existing.conn, existing.detached_at, existing.options = conn, None, options
            stream = existing
        else:
            stream = Stream(
                name, options, cfg.queue_depth, cfg.stats_window_s, self.budget, conn=conn
            )
            self.streams[name] = stream
            log.info("stream %s opened by %s (%s)", name, conn.peer, options)
        conn.streams[name] = stream
        return stream

    def accept_frame(self, conn: Connection, frame: p.Frame) -> None:
        stream = self._stream_for(conn, frame.stream_name, frame.frame_id)
        if stream is None:
            return
        now = time.monotonic()
        self.totals.on_received(now)
        job = Job(frame, stream, conn, now)
        conn.job_started()
        reason = stream.admit(now)
        if reason is not None:
            self.drop(job, reason)
            return
        evicted = stream.push(job)
        if evicted is not None:
            self.drop(evicted, "queue_full")
        while self.budget.over():
            # Past max_queued_mb the stream holding the most queued bytes loses its oldest frame:
            # a peer sending huge frames pays for them, cameras with normal frames do not.
            hog = max(self.streams.values(), key=lambda s: s.queued_bytes)
            self.drop(hog.pop(), "memory_limit")
        self.scheduler.notify(stream)

    def drop(self, job: Job, reason: str) -> None:
        job.stream.counts.on_dropped(reason)
        self.totals.on_dropped(reason)
        if job.conn.notices:
            job.conn.send(
                {
                    "type": "dropped",
                    "stream_name": job.stream.name,
                    "frame_id": job.frame.frame_id,
                    "reason": reason,
                },
                droppable=True,
            )
        job.conn.job_ended()

    def on_outcome(self, job: Job, outcome: Outcome) -> None:
        frame = job.frame
        if outcome.error is not None:
            reason = (
                "detector_error"
                if outcome.error == p.E_DETECTOR
                else ("decode_error" if outcome.error == p.E_DECODE else "invalid")
            )
            self.count_error(outcome.error)
            job.conn.send(p.error_message(outcome.error, outcome.message, frame.frame_id))
            self.drop(job, reason)
            return
        now = time.monotonic()
        timings = dict(outcome.timings)
        timings["queue_ms"] = (job.taken_at - job.received_at) * 1000
        timings["total_ms"] = (now - job.received_at) * 1000
        self.last_latency_ms = timings["total_ms"]
        job.stream.counts.on_processed(now, timings)
        self.totals.on_processed(now, timings)
        for obs in self.observers:
            obs.on_processed(job.stream.name, timings)
        msg = {
            "type": "result",
            "stream_name": frame.stream_name,
            "frame_id": frame.frame_id,
            "detections": outcome.detections or [],
            "latency_ms": round(timings["total_ms"], 3),
            "timestamp": frame.timestamp,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        if not job.conn.send(msg, droppable=True):
            job.stream.counts.results_dropped += 1
            self.totals.results_dropped += 1
        if self.hub.subscribers:
            self.hub.publish(msg, now)
        job.conn.job_ended()

    # ---- error accounting ---------------------------------------------------------------------
    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def count_invalid(self, conn: Connection, exc: p.ProtocolError) -> None:
        """A refused message is counted; if it was meant as a frame, also as a dropped frame."""
        self.count_error(exc.code)
        if exc.frame_id is not None or exc.code in (p.E_INVALID, p.E_BAD_STREAM_NAME):
            self.totals.on_received(time.monotonic())
            self.totals.on_dropped("invalid")
