"""TCP ingest: length-prefixed msgpack over a socket; each connection is a Sink for its streams.

A `Connection` is the framing on the peer core (`ingest/core.py`: handshake, timeouts, bounded
outbox, its own `shutdown()`), with the token and slot rules and a shared-memory attachment
(`ingest/shm.py`). Until its first valid message (the hello, or a legacy client's first frame
when auth is off) it sits in a small pending pool under `hello_timeout_s`, where a newer
connection takes the place of a silent one when the pool is full (`pending.py` says which); only
then does it take one of the `max_connections` slots, so sockets that never speak cannot keep a
camera out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from vision_daemon import protocol as p
from vision_daemon.access import Access, reason_text
from vision_daemon.config import Config
from vision_daemon.ingest.core import Close, PeerConnection, PeerIngest, refused
from vision_daemon.ingest.listen import StartupError as StartupError  # raised by start()
from vision_daemon.ingest.listen import bind_unix, clear_stale_socket
from vision_daemon.ingest.shm import SharedMemory, ShmRing
from vision_daemon.log import log_limited, peer_host
from vision_daemon.pending import LISTEN_BACKLOG, Full, PendingPool, unread_bytes
from vision_daemon.pipeline import Pipeline
from vision_daemon.tls import server_context
from vision_daemon.tokens import PUSH

log = logging.getLogger(__name__)


class CountingReader(asyncio.StreamReader):
    """A StreamReader that counts the bytes the transport gave it, so that a connection can tell
    whether what its read waits for has arrived (`Connection.speaking`)."""

    received = 0

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]  # transports give bytes
        self.received += len(data)
        super().feed_data(data)


class Connection(PeerConnection):
    """One TCP or Unix-socket peer: length-prefixed msgpack framing on a `PeerConnection`, a
    token and a connection slot before its first message is taken, shared memory attached."""

    ingest: TcpIngest
    attachment: SharedMemory
    plane = "tcp"

    def __init__(
        self,
        ingest: TcpIngest,
        reader: CountingReader,
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
        self.wanted = 0  # bytes the reader must have been given for the current read to finish

    @property
    def shm(self) -> ShmRing | None:
        """The client's shared-memory ring, once its hello mapped it."""
        return self.attachment.ring

    # ---- framing --------------------------------------------------------------------------------
    def encode(self, msg: Mapping[str, object]) -> bytes:
        return p.pack(msg)

    async def receive(self) -> bytes:
        header = await self._read(p.HEADER_SIZE)
        n = p.read_length(header, self.config.max_message_bytes)
        return await self._read(n)

    async def _read(self, n: int) -> bytes:
        self.wanted += n
        return await self.reader.readexactly(n)

    def speaking(self) -> bool:
        """What its read waits for has arrived (in the reader, or still in the kernel): it is
        about to be served, however long it was silent; a connection that sent part of a message
        and stalled is not speaking."""
        if self.reader.received >= self.wanted:
            return True
        return unread_bytes(self.writer.get_extra_info("socket")) > 0

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
        # accepted, no valid first message yet; the oldest silent one makes room for a new one
        self.pending: PendingPool[Connection] = PendingPool(config.max_pending_per_address)
        self.evicted = 0
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
            self.server = await asyncio.get_running_loop().create_server(
                self._protocol,
                cfg.tcp_host,
                cfg.tcp_port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
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
        clear_stale_socket(path)
        sock = bind_unix(path, mode)
        self.unix_server = await asyncio.get_running_loop().create_unix_server(
            self._protocol, sock=sock, backlog=LISTEN_BACKLOG
        )
        st = os.stat(path)
        self.unix_path, self._unix_inode = path, (st.st_dev, st.st_ino)
        log.info("data plane listening on unix:%s (mode %o)", path, mode)

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        """What asyncio.start_server builds for each connection, with a CountingReader."""
        return asyncio.StreamReaderProtocol(CountingReader(limit=2**16), self._on_connect)

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
        for conn in [*self.pending, *self.connections]:
            conn.shutdown()

    def promote(self, conn: Connection) -> bool:
        if len(self.connections) >= self.config.max_connections:
            self._refused(conn.peer, "max_connections reached")
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
            "refused a TCP connection from %s: %s",
            peer_host(peer),
            why,
        )

    def _make_room(self, host: str) -> str | None:
        """When the pool is full, close a silent connection for one from `host` (`pending.py`
        says which); the refusal's reason when every candidate is speaking, else None."""
        cfg = self.config
        full = len(self.pending) >= cfg.max_pending_connections
        victim, rule = self.pending.make_room(host, full, Connection.speaking)
        why = f"max_pending_connections={cfg.max_pending_connections} reached"
        if rule is None:
            return None
        if victim is None:
            return why + " and every waiting connection is speaking"
        victim_host = peer_host(victim.peer)
        if rule is Full.ADDRESS:
            why += f", {cfg.max_pending_per_address} or more from {victim_host}"
        self.evicted += 1
        self.pipeline.count_error(p.E_LIMIT)
        tell = "; no hello came: closed for a newer connection (send the hello as you connect)"
        victim.error(p.E_LIMIT, why + tell)
        victim.shutdown(refused(p.E_LIMIT))
        log_limited(
            log,
            self.log_limit,
            "evicted:" + victim_host,
            time.monotonic(),
            logging.WARNING,
            "closed a TCP connection from %s that sent no hello, for a newer one: %s",
            victim_host,
            why,
        )
        return None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.total += 1
        assert isinstance(reader, CountingReader), "made by TcpIngest._protocol"
        conn = Connection(self, reader, writer)
        host = peer_host(conn.peer)
        why = "server is shutting down" if self.stopping else self._make_room(host)
        if why is not None:
            self.pipeline.count_error(p.E_LIMIT)
            self._refused(conn.peer, why)
            msg = why if self.stopping else why + "; retry"
            writer.write(p.pack(p.error_message(p.E_LIMIT, msg)))
            writer.close()  # flushes what it can; never waits on a peer that does not read
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending.add(conn, host)
        await self._tasks.run(conn.run())
