"""TCP ingest: length-prefixed msgpack over a socket; each connection is a Sink for its streams.

A connection owns its framing, handshake, timeouts, a bounded outbox and its own `shutdown()`.
Until its first valid message (the hello, or a legacy client's first frame when auth is off) it
sits in a small pending pool under `hello_timeout_s`; only then does it take one of the
`max_connections` slots, so sockets that never speak cannot keep a camera out.

It runs past 350 lines because a connection's framing, handshake, timers, outbox and teardown
share its state; split across modules they would reach into each other.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.config import Config
from vision_daemon.ingest.peer import ConnectionTasks, PeerSink
from vision_daemon.ingest.shm import ShmRing
from vision_daemon.log import RateLimiter, log_limited, peer_host
from vision_daemon.pipeline import Pipeline

log = logging.getLogger(__name__)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file a dead daemon left; refuse a live one, one we may not probe, or a
    file that is no socket (start-up only: blocking is fine here)."""
    target = Path(path)
    try:
        st = target.lstat()  # never follows a link
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a dead daemon's file
        try:
            target.unlink()
        except OSError as exc:
            raise StartupError(
                f"cannot remove the stale socket {path} ({exc.strerror or exc})"
            ) from None
    except OSError as exc:  # EACCES (another user's socket), a timeout (a stuck server), ...
        raise StartupError(
            f"cannot listen on {path}: a socket is there and cannot be probed "
            f"({exc.strerror or exc}); remove it if no daemon uses it"
        ) from None
    else:
        raise StartupError(f"cannot listen on {path}: another process is serving it")
    finally:
        probe.close()


def _bind_unix(path: str, mode: int) -> socket.socket:
    """A listening Unix socket whose file is never wider than `mode`: the mode is set on the
    socket before bind (Linux creates the file with it, less the umask), then the file is given
    exactly `mode`, which can only widen it within `mode`. No process-wide umask change."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path} ({exc.strerror or exc})") from None
    return sock


class StartupError(Exception):
    """The daemon cannot start (port in use, model missing); the message is one line."""


class Connection(PeerSink):
    """One TCP peer: a reader that never waits on inference and a writer with a bounded outbox."""

    def __init__(
        self,
        ingest: TcpIngest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(ingest.config, ingest.pipeline)
        self.ingest = ingest
        self.reader = reader
        self.writer = writer
        addr = writer.get_extra_info("peername")
        if isinstance(addr, tuple):
            self.peer = f"{addr[0]}:{addr[1]}"
            self.same_host = ipaddress.ip_address(addr[0].split("%")[0]).is_loopback
        else:  # a Unix socket peer has no address: "unix:<n>", n counting connections
            self.peer = f"unix:{ingest.total}"
            self.same_host = True
        self.shm: ShmRing | None = None  # the client's shared-memory ring, once its hello mapped it
        self.hello: p.Hello | None = None
        self.authenticated = False
        self.saying_bye = False
        self.reading = True
        self.messages = 0
        self._writer_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ---- the transport's part of PeerSink ----------------------------------------------------
    def encode(self, msg: dict[str, Any]) -> bytes:
        return p.pack(msg)

    def close_slow_consumer(self) -> None:
        self.shutdown()

    def result(self, payload: bytes, frame: p.Frame) -> bool:
        if self.shm is not None:  # the slot is the client's again once this is queued
            self.shm.release(frame.stream_name, frame.frame_id)
        return super().result(payload, frame)

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        if self.shm is not None:
            self.shm.release(stream, frame_id)
        super().dropped(stream, frame_id, reason)

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

    async def _flush(self, timeout: float) -> None:
        """Deliver what is queued (bounded by timeout), then close the socket."""
        self.open = False
        self._has_output.set()
        if self._writer_task is not None:
            try:
                await asyncio.wait_for(self._writer_task, timeout)
            except TimeoutError:
                self.writer.transport.abort()  # a peer that does not read gets no more time
        self.writer.close()

    # ---- lifecycle ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop reading: nothing new is accepted; `run` then delivers what is owed and closes."""
        self.reading = False
        if self._timer is not None:
            self._timer.cancel()
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.pause_reading()
        self.reader.feed_eof()

    def _arm_timer(self) -> None:
        """One re-armed timer per connection (not a task per read): close peers that stall.

        Until its first valid message (a hello, or a legacy frame with auth off) a connection has
        hello_timeout_s from accept, however many refused messages it sends; after that each
        complete message must come within idle_timeout_s of the previous one.
        """
        if self._timer is not None:
            self._timer.cancel()
        first = not self.authenticated
        limit = self.config.hello_timeout_s if first else self.config.idle_timeout_s
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(limit, self._on_timeout, first, limit)

    def _on_timeout(self, first: bool, limit: float) -> None:
        code = p.E_HELLO_TIMEOUT if first else p.E_IDLE_TIMEOUT
        what = "no valid first message" if first else "no complete message"
        self.pipeline.count_error(code)
        self.error(code, f"{what} for {limit:g} s; closing")
        self.shutdown()

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop())
        cfg = self.config
        self._arm_timer()
        try:
            while self.open and self.reading:
                header = await self.reader.readexactly(p.HEADER_SIZE)
                n = p.read_length(header, cfg.max_message_bytes)
                body = await self.reader.readexactly(n)
                if not self.reading:  # shut down while this message was buffered: not taken
                    break
                self.messages += 1
                if not self.handle(body):
                    break
                if self.authenticated:
                    self._arm_timer()
                if len(self.outbox) > cfg.send_buffer_messages // 2:
                    # A burst of messages read in one go must not fill the outbox before the
                    # writer had a turn: a peer that reads its replies is never slow_consumer.
                    await asyncio.sleep(0)
            if self.saying_bye:  # results of frames already accepted are delivered first
                await self.wait_idle(cfg.shutdown_grace_s)
                self._send(p.pack({"type": "bye"}))
        except p.ProtocolError as exc:  # framing is broken: the rest of the stream is unreadable
            self.pipeline.count_error(exc.code)
            self.error(exc.code, exc.message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # peer went away (or was shut down); a partial message is not a frame
        finally:
            if self._timer is not None:
                self._timer.cancel()
            await self._close()

    async def _close(self) -> None:
        """The one teardown path: detach streams, deliver what is owed, close, leave the pool."""
        self.pipeline.detach(self)
        try:
            if self.ingest.stopping:  # results of frames already in a detector go out first
                await self.wait_idle(self.config.shutdown_grace_s)
            await self._flush(2.0)
        finally:  # also when shutdown cancels a connection that ran out of time
            if self._writer_task is not None:
                self._writer_task.cancel()
            self.writer.close()
            self.ingest.forget(self)
            if self.shm is not None:  # unmapped now, or by the last worker still reading a slot
                self.shm.close()
                # Its streams keep this connection for stream_grace_s: they must not keep the
                # mapping too (the views hold it while they live; nothing else does).
                self.shm = None

    # ---- input --------------------------------------------------------------------------------
    def handle(self, body: bytes) -> bool:
        """Handle one message; False ends the connection."""
        msg = self.parse(body)
        if isinstance(msg, p.ProtocolError):
            if self.config.auth_token and not self.authenticated:
                return False  # with auth on, an unauthenticated peer gets no second try
            return not msg.fatal
        token = self.config.auth_token
        if isinstance(msg, p.Hello):
            if token and not hmac.compare_digest((msg.token or "").encode(), token.encode()):
                self.ingest.auth_failed(self)
                self.error(p.E_UNAUTHORIZED, "auth token missing or wrong")
                return False
            if not self._authenticate():
                return False
            if msg.shm is not None and not self._map_shm(msg.shm):
                return False
            self.hello = msg
            self.notices = msg.dropped_notices or self.shm is not None
            self.rate_advice = msg.rate_advice
            self._send(self.ingest.welcome_for(msg.rate_advice))
            return True
        if token and self.hello is None:
            self.ingest.auth_failed(self)
            self.error(p.E_UNAUTHORIZED, "this server requires a hello with an auth token first")
            return False
        if not self.authenticated and not self._authenticate():
            return False
        if isinstance(msg, p.Bye):
            self.saying_bye = True
            return False
        if msg.encoding == "shm":
            try:
                if self.shm is None:
                    why = "shm frames need a hello that announced a segment"
                    raise p.ProtocolError(p.E_SHM, why, frame_id=msg.frame_id, fatal=True)
                msg = self.shm.frame(msg)
            except p.ProtocolError as exc:  # a refused frame: received, dropped as invalid
                self.pipeline.refuse_message(exc)
                self.error(exc.code, exc.message, exc.frame_id)
                return False
        self.pending += 1
        self._idle.clear()
        self.pipeline.submit(self, msg, self.options_for(msg.stream_name))
        return True

    def _map_shm(self, ring: p.ShmRing) -> bool:
        """Map the segment a hello announced (once per connection); False closes the connection."""
        cfg = self.config
        why = None
        if cfg.max_shm_mb == 0:
            why = "shared-memory ingest is off on this server (max_shm_mb = 0)"
        elif not self.same_host:
            why = "shared memory needs the Unix socket or a loopback connection"
        elif self.shm is not None:
            why = "this connection has mapped its segment already; one per connection"
        try:
            if why is not None:
                raise p.ProtocolError(p.E_SHM, why, fatal=True)
            self.shm = ShmRing(ring, cfg.max_shm_mb * 2**20)
        except p.ProtocolError as exc:
            self.pipeline.count_error(exc.code)
            self.error(exc.code, exc.message)
            return False
        self.lossless = True
        log_limited(  # a peer reconnecting in a loop must not flood the log
            log,
            self.ingest._log_limit,
            "shm:" + peer_host(self.peer),
            time.monotonic(),
            logging.INFO,
            "%s mapped shared memory %s: %d slots of %d bytes",
            self.peer,
            ring.name,
            ring.slots,
            ring.slot_bytes,
        )
        return True

    def _authenticate(self) -> bool:
        if self.authenticated:
            return True
        if not self.ingest.promote(self):
            self.pipeline.count_error(p.E_LIMIT)
            limit = self.config.max_connections
            self.error(p.E_LIMIT, f"max_connections={limit} reached; try again later")
            return False
        self.authenticated = True
        return True

    def options_for(self, name: str) -> p.StreamOptions:
        if self.hello is None:
            return p.StreamOptions()
        return self.hello.stream_options.get(name, self.hello.options)


class TcpIngest:
    """The listener and its connections: a pending pool, then `max_connections` slots."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.pending: set[Connection] = set()  # accepted, no valid first message yet
        self.connections: set[Connection] = set()  # authenticated (or legacy, auth off)
        self._tasks = ConnectionTasks()
        self.server: asyncio.Server | None = None
        self.unix_server: asyncio.Server | None = None
        self.unix_path: str | None = None
        self._unix_inode: tuple[int, int] | None = None
        self.port: int | None = None
        self.welcome = b""
        self.welcome_dict: dict[str, Any] = {}
        self.stopping = False
        self.total = 0
        self.refused = 0
        self._log_limit = RateLimiter()

    def welcome_for(self, rate_advice: bool) -> bytes:
        """The welcome; to a client that follows advice, with the rate a new stream gets now."""
        fps = self.pipeline.newcomer_fps() if rate_advice else None
        return self.welcome if fps is None else p.pack({**self.welcome_dict, "advised_fps": fps})

    async def start(self, welcome: dict[str, Any]) -> None:
        cfg = self.config
        self.welcome = p.pack(welcome)
        self.welcome_dict = welcome
        try:
            self.server = await asyncio.start_server(
                self._on_connect, cfg.tcp_host, cfg.tcp_port, limit=2**16, reuse_address=True
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.tcp_host}:{cfg.tcp_port} ({exc.strerror or exc}); "
                "pick another --tcp-port or stop the process using it"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("data plane listening on tcp://%s:%d", cfg.tcp_host, self.port)
        if cfg.unix_socket:
            await self._start_unix(cfg.unix_socket, int(cfg.unix_socket_mode, 8))

    async def _start_unix(self, path: str, mode: int) -> None:
        """The same protocol on a Unix domain socket (same connection caps as TCP)."""
        _clear_stale_socket(path)
        sock = _bind_unix(path, mode)
        self.unix_server = await asyncio.start_unix_server(self._on_connect, sock=sock, limit=2**16)
        st = os.stat(path)
        self.unix_path, self._unix_inode = path, (st.st_dev, st.st_ino)
        log.info("data plane listening on unix:%s (mode %o)", path, mode)

    @property
    def listening(self) -> bool:
        return self.server is not None and not self.stopping

    def stop_accepting(self) -> None:
        """Close the listener and stop reading every connection (shutdown, first phase)."""
        self.stopping = True
        for server in (self.server, self.unix_server):
            if server is not None:
                server.close()
        if self.unix_path is not None:
            try:  # only our own file: a later daemon may have taken the path since
                st = os.stat(self.unix_path)
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None
        for conn in self.pending | self.connections:
            conn.shutdown()

    async def aclose(self, timeout: float) -> None:
        """Wait for every connection to deliver what it owes and close (shutdown, last phase)."""
        self.stop_accepting()
        await self._tasks.aclose(timeout)

    def promote(self, conn: Connection) -> bool:
        if len(self.connections) >= self.config.max_connections:
            self._refused(conn.peer, "max_connections")
            return False
        self.pending.discard(conn)
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        self.pending.discard(conn)
        self.connections.discard(conn)

    def auth_failed(self, conn: Connection) -> None:
        self.pipeline.count_error(p.E_UNAUTHORIZED)
        log_limited(
            log,
            self._log_limit,
            "auth:" + peer_host(conn.peer),
            time.monotonic(),
            logging.WARNING,
            "refused a TCP client from %s: wrong or missing token",
            peer_host(conn.peer),
        )

    def _refused(self, peer: str, why: str) -> None:
        self.refused += 1
        log_limited(
            log,
            self._log_limit,
            "refused:" + peer_host(peer),
            time.monotonic(),
            logging.WARNING,
            "refused a TCP connection from %s: %s reached",
            peer_host(peer),
            why,
        )

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.total += 1
        cfg = self.config
        if self.stopping or len(self.pending) >= cfg.max_pending_connections:
            self.pipeline.count_error(p.E_LIMIT)
            peer = writer.get_extra_info("peername")
            self._refused(str(peer[0]) if isinstance(peer, tuple) else "?", "pending limit")
            msg = (
                "server is shutting down"
                if self.stopping
                else f"max_pending_connections={cfg.max_pending_connections} reached; retry"
            )
            writer.write(p.pack(p.error_message(p.E_LIMIT, msg)))
            writer.close()  # flushes what it can; never waits on a peer that does not read
            return
        conn = Connection(self, reader, writer)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending.add(conn)
        await self._tasks.run(conn.run())
