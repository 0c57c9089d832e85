"""TCP ingest: length-prefixed msgpack over a socket; each connection is a Sink for its streams.

A `Connection` is the framing on the peer core (`ingest/core.py`: handshake, timeouts, bounded
outbox, its own `shutdown()`), with the token and slot rules and a shared-memory attachment
(`ingest/shm.py`). Until its first valid message (the hello, or a legacy client's first frame
when auth is off) it sits in a small pending pool under `hello_timeout_s`; only then does it
take one of the `max_connections` slots, so sockets that never speak cannot keep a camera out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.access import Access, reason_text
from vision_daemon.config import Config
from vision_daemon.ingest.core import Close, PeerConnection, PeerIngest
from vision_daemon.ingest.shm import SharedMemory, ShmRing
from vision_daemon.log import log_limited, peer_host
from vision_daemon.pipeline import Pipeline
from vision_daemon.tls import server_context
from vision_daemon.tokens import PUSH

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


class Connection(PeerConnection):
    """One TCP or Unix-socket peer: length-prefixed msgpack framing on a `PeerConnection`, a
    token and a connection slot before its first message is taken, shared memory attached."""

    ingest: TcpIngest
    attachment: SharedMemory
    plane = "tcp"

    def __init__(
        self,
        ingest: TcpIngest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        addr = writer.get_extra_info("peername")
        if isinstance(addr, tuple):
            peer = f"{addr[0]}:{addr[1]}"
            same_host = ipaddress.ip_address(addr[0].split("%")[0]).is_loopback
        else:  # a Unix socket peer has no address: "unix:<n>", n counting connections
            peer = f"unix:{ingest.total}"
            same_host = True
        shm = SharedMemory(peer, same_host, ingest.config.max_shm_mb, ingest.log_limit)
        super().__init__(ingest, peer, shm)
        self.reader = reader
        self.writer = writer

    @property
    def shm(self) -> ShmRing | None:
        """The client's shared-memory ring, once its hello mapped it."""
        return self.attachment.ring

    # ---- framing --------------------------------------------------------------------------------
    def encode(self, msg: Mapping[str, object]) -> bytes:
        return p.pack(msg)

    async def receive(self) -> bytes:
        header = await self.reader.readexactly(p.HEADER_SIZE)
        n = p.read_length(header, self.config.max_message_bytes)
        return await self.reader.readexactly(n)

    async def read_messages(self) -> None:
        try:
            await super().read_messages()
        except p.ProtocolError as exc:  # framing is broken: the rest of the stream is unreadable
            self.pipeline.count_error(exc.code)
            self.error(exc.code, exc.message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # peer went away (or was shut down); a partial message is not a frame

    async def write(self, outbox: deque[Any]) -> None:
        chunk = b"".join(outbox)
        outbox.clear()
        self.writer.write(chunk)
        await self.writer.drain()

    def stop_reading(self) -> None:
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.pause_reading()
        self.reader.feed_eof()

    async def close_transport(self, close: Close, flushed: bool) -> None:
        if not flushed:
            self.writer.transport.abort()  # a peer that does not read gets no more time
        self.writer.close()

    def drop_transport(self) -> None:
        self.writer.close()

    # ---- who may speak --------------------------------------------------------------------------
    def admit(self, msg: p.Message) -> bool:
        """A hello with a token whose role may push (when auth is on), then a connection
        slot. The token's stream patterns are checked per frame (`PeerConnection.forbidden`)."""
        access = self.ingest.access
        if isinstance(msg, p.Hello) and access.enabled:
            host = peer_host(self.peer)
            principal, why = access.authenticate(msg.token or "", "tcp", "hello", host)
            message = reason_text(why)
            if principal is not None and not principal.may(PUSH):
                access.refused("tcp", "hello", principal.name, "forbidden", host)
                message = f"token {principal.name!r} ({principal.role}) may not push frames"
                principal = None
            if principal is None:
                self.pipeline.count_error(p.E_UNAUTHORIZED)
                self.error(p.E_UNAUTHORIZED, message)
                return False
            self.principal = principal
        elif access.enabled and self.hello is None:
            self.pipeline.count_error(p.E_UNAUTHORIZED)
            self.error(p.E_UNAUTHORIZED, "this server requires a hello with an auth token first")
            return False
        if self.greeted:
            return True
        if not self.ingest.promote(self):
            self.pipeline.count_error(p.E_LIMIT)
            limit = self.config.max_connections
            self.error(p.E_LIMIT, f"max_connections={limit} reached; try again later")
            return False
        return True

    def second_chance(self) -> bool:
        """With auth on, an unauthenticated peer gets no second try."""
        return self.greeted or not self.ingest.access.enabled


class TcpIngest(PeerIngest[Connection]):
    """The listener and its connections: a pending pool, then `max_connections` slots."""

    def __init__(self, config: Config, pipeline: Pipeline, access: Access | None = None) -> None:
        super().__init__(config, pipeline, access)
        self.pending: set[Connection] = set()  # accepted, no valid first message yet
        # self.connections: authenticated (or legacy, auth off)
        self.server: asyncio.Server | None = None
        self.unix_server: asyncio.Server | None = None
        self.unix_path: str | None = None
        self._unix_inode: tuple[int, int] | None = None
        self.port: int | None = None

    async def start(self, welcome: p.Welcome) -> None:
        cfg = self.config
        self.welcome = welcome
        try:
            tls = (
                server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                if cfg.tls_cert
                else None
            )
            self.server = await asyncio.start_server(
                self._on_connect,
                cfg.tcp_host,
                cfg.tcp_port,
                limit=2**16,
                reuse_address=True,
                ssl=tls,  # a handshake is bounded like a hello
                ssl_handshake_timeout=cfg.hello_timeout_s if tls else None,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.tcp_host}:{cfg.tcp_port} ({exc.strerror or exc}); "
                "pick another --tcp-port or stop the process using it"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]
        scheme = "tls" if cfg.tls_cert else "tcp"
        log.info("data plane listening on %s://%s:%d", scheme, cfg.tcp_host, self.port)
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

    def health(self) -> tuple[bool, str]:
        """(whether the data plane listens, why not)."""
        return self.listening, "" if self.listening else "TCP listener not up"

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

    def promote(self, conn: Connection) -> bool:
        if len(self.connections) >= self.config.max_connections:
            self._refused(conn.peer, "max_connections")
            return False
        self.pending.discard(conn)
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        self.pending.discard(conn)
        super().forget(conn)

    def _refused(self, peer: str, why: str) -> None:
        self.refused += 1
        log_limited(
            log,
            self.log_limit,
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
