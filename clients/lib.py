"""Async client library for the vision-daemon data plane (clients, stress tool and tests use it).

Also what every program reports the same way: exit codes, the stop-on-signal helper, latency
percentiles and drift. The streaming engine built on it is `clients.engine`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import numpy as np

HEADER = struct.Struct(">I")

# The documented exit codes of vision-client, vision-viz, vision-ws and vision-stress.
EXIT_OK, EXIT_SLO, EXIT_USAGE, EXIT_SOURCE = 0, 1, 2, 3
EXIT_UNREACHABLE, EXIT_AUTH, EXIT_PROTOCOL = 4, 5, 6


class ClientError(Exception):
    """A one-line, user-facing failure: unreachable daemon, auth refused, protocol error.

    `kind` tells programs which one: "unreachable", "unauthorized", "protocol".
    """

    def __init__(self, message: str, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


def exit_code(exc: ClientError) -> int:
    """The documented exit code for a client failure (shared by every program)."""
    codes = {"unauthorized": EXIT_AUTH, "unreachable": EXIT_UNREACHABLE}
    return codes.get(exc.kind, EXIT_PROTOCOL)


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT and SIGTERM set: Ctrl-C ends a run, which still reports (call in a loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def percentiles(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """mean, p50, p95, p99 and max of a list, rounded to `digits` (zeros when it is empty)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    figures = {"mean": arr.mean(), "p50": p50, "p95": p95, "p99": p99, "max": arr.max()}
    return {k: round(float(v), digits) for k, v in figures.items()}


def drift(rtts: Sequence[float]) -> float | None:
    """Median round trip of the last third over the first third, `rtts` in send order.

    The one definition every program reports; None with fewer than 3 results per third, or
    when the first third's median is 0.
    """
    third = len(rtts) // 3
    if third < 3:
        return None
    first = float(np.median(rtts[:third]))
    return round(float(np.median(rtts[-third:])) / first, 3) if first > 0 else None


def add_daemon_args(
    ap: argparse.ArgumentParser, *, tcp: bool = True, api: str | None = None
) -> None:
    """--host, --port (data plane), --transport, --unix-socket, --api-port, --token.

    `api` says what the control-plane port is for in this program (default: WebSocket ingest).
    """
    ap.add_argument("--host", default="127.0.0.1", help="the daemon's address")
    if tcp:
        ap.add_argument("--port", type=int, default=9000, help="data-plane TCP port")
        ap.add_argument(
            "--transport",
            choices=("tcp", "unix", "shm", "ws"),
            default="tcp",
            help="tcp (--host/--port); unix (--unix-socket, same protocol); shm (raw pixels "
            "through a shared-memory ring, over --unix-socket or else loopback --port); ws "
            "(WebSocket /ingest on --api-port)",
        )
        ap.add_argument("--unix-socket", metavar="PATH", help="with --transport unix or shm")
    if api is not None or tcp:
        help_ = api or "control-plane HTTP port (for --transport ws)"
        ap.add_argument("--api-port", type=int, default=8000, help=help_)
    ap.add_argument("--token", default=None, help="the daemon's auth token, if it has one")
    ap.add_argument(
        "--tls", action="store_true", help="TLS to the daemon (TCP ingest, or WSS for ws)"
    )
    ap.add_argument("--cafile", help="PEM CA to verify the daemon with (implies --tls)")
    ap.add_argument("--cert", help="PEM client certificate, for a daemon asking mutual TLS")
    ap.add_argument("--key", help="PEM private key of --cert")


def tls_of(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context --tls, --cafile, --cert and --key ask for (None: plain)."""
    if not (
        getattr(args, "tls", False) or getattr(args, "cafile", None) or getattr(args, "cert", None)
    ):
        return None
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def unix_socket_of(args: argparse.Namespace) -> str | None:
    """The socket path under --transport unix or shm, else None (None too without the flags)."""
    if getattr(args, "transport", "tcp") not in ("unix", "shm"):
        return None
    return str(args.unix_socket) if args.unix_socket else None


def check_transport(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) --transport unix without --unix-socket, and --unix-socket with a
    transport that does not use it."""
    transport = getattr(args, "transport", "tcp")
    if transport == "unix" and not args.unix_socket:
        ap.error("--transport unix needs --unix-socket PATH")
    if transport not in ("unix", "shm") and getattr(args, "unix_socket", None):
        ap.error("--unix-socket needs --transport unix or shm")
    if transport == "ws" and not args.api_port:
        ap.error("--transport ws needs --api-port (the control plane serves /ingest)")


def auth_headers(token: str | None) -> dict[str, str]:
    """The control plane's bearer-token header for --token (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def pack(msg: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def frame_message(
    stream: str,
    frame_id: int,
    image: bytes,
    *,
    encoding: str = "jpeg",
    shape: tuple[int, ...] | None = None,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """A frame in the legacy shape; `encoding`/`shape` are only added where they are not JPEG."""
    msg: dict[str, Any] = {
        "type": "frame",
        "stream_name": stream,
        "frame_id": frame_id,
        "timestamp": time.time() if timestamp is None else timestamp,
        "image": image,
    }
    if encoding != "jpeg":
        msg["encoding"] = encoding
    if shape is not None:
        msg["shape"] = list(shape)
    return msg


def hello_message(
    *,
    token: str | None = None,
    client_name: str = "vision-client",
    options: dict[str, Any] | None = None,
    streams: dict[str, dict[str, Any]] | None = None,
    dropped_notices: bool = False,
    shm: dict[str, Any] | None = None,
    rate_advice: bool = False,
) -> dict[str, Any]:
    """A v1 hello (the same map on every transport)."""
    msg: dict[str, Any] = {
        "type": "hello",
        "version": 1,
        "client": client_name,
        "dropped_notices": dropped_notices,
    }
    extra = {
        "token": token,
        "options": options,
        "streams": streams,
        "shm": shm,
        "rate_advice": rate_advice,
    }
    msg.update({k: v for k, v in extra.items() if v})
    return msg


def check_welcome(reply: dict[str, Any]) -> dict[str, Any]:
    """The welcome, or the daemon's refusal as a ClientError."""
    if reply.get("type") == "error":
        code = str(reply.get("code"))
        raise ClientError(
            f"daemon refused the handshake: {code}: {reply.get('message')}",
            "unauthorized" if code == "unauthorized" else "protocol",
        )
    return reply


class DaemonClient:
    """One TCP or Unix-socket connection, optionally with a shared-memory ring (`shm`, a
    `clients.transports.ShmSlots`) for its frames' pixels. Sending and receiving may run
    concurrently in separate tasks."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shm: Any = None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.shm = shm
        self.welcome: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 9000,
        *,
        hello: bool = True,
        timeout: float = 10.0,
        unix_socket: str | None = None,
        shm: Any = None,
        ssl: ssl.SSLContext | None = None,
        **hello_fields: Any,
    ) -> DaemonClient:
        """Connect (over TCP, or the daemon's Unix socket when `unix_socket` is a path); with
        hello=True do the v1 handshake (hello=False speaks the legacy protocol). With `shm` the
        hello announces that ring; the client then owns it and closes it in `close`."""
        where = f"unix:{unix_socket}" if unix_socket else f"{host}:{port}"
        try:
            opening = (
                asyncio.open_unix_connection(unix_socket, limit=2**24)
                if unix_socket
                else asyncio.open_connection(host, port, limit=2**24, ssl=ssl)
            )
            reader, writer = await asyncio.wait_for(opening, timeout)
        except (OSError, TimeoutError) as exc:
            raise ClientError(
                f"daemon not reachable at {where} ({exc.__class__.__name__}); "
                "is vision-daemon running there?",
                "unreachable",
            ) from None
        client = cls(reader, writer, shm)
        if hello:
            announce = shm.announce() if shm is not None else None
            await client.send(hello_message(shm=announce, **hello_fields))
            reply = await asyncio.wait_for(client.recv(), timeout)
            if reply is None:
                raise ClientError("daemon closed the connection during the handshake")
            client.welcome = check_welcome(reply)
        return client

    async def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(pack(msg))
        await self.writer.drain()

    def send_nowait(self, msg: dict[str, Any]) -> None:
        """Queue without waiting for the socket; the caller paces and drains."""
        self.writer.write(pack(msg))

    async def send_frame(self, stream: str, frame_id: int, image: bytes, **kw: Any) -> None:
        await self.send(frame_message(stream, frame_id, image, **kw))

    async def send_image(
        self, stream: str, frame_id: int, image: Any, encoding: str, shape: Any
    ) -> None:
        """One frame: its bytes in the message, or with a shared-memory ring its raw pixels
        (bytes or an array of `shape`) in a free slot, waiting for one if the daemon holds all."""
        if self.shm is None:
            await self.send(frame_message(stream, frame_id, image, encoding=encoding, shape=shape))
            return
        if encoding != "raw" or shape is None:
            raise ClientError("shared-memory frames are raw BGR pixels with a shape")
        slot = await self.shm.acquire()
        self.shm.write(slot, image)
        await self.send_slot(stream, frame_id, slot, shape)

    async def send_slot(self, stream: str, frame_id: int, slot: int, shape: Any) -> None:
        """Hand a slot this client filled (`shm.acquire()`, then `shm.view()` or `shm.write()`)
        to the daemon as one frame; the slot is the daemon's until that frame's result or drop."""
        self.shm.hand_over(stream, frame_id, slot)
        msg = frame_message(stream, frame_id, b"", encoding="shm", shape=shape)
        del msg["image"]
        msg["slot"] = slot
        await self.send(msg)

    async def recv(self) -> dict[str, Any] | None:
        """The next message from the daemon, or None when it closed the connection."""
        try:
            header = await self.reader.readexactly(HEADER.size)
            (n,) = HEADER.unpack(header)
            body = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.shm is not None:  # the daemon holds none of our slots any more
                self.shm.reset()
            return None
        msg = msgpack.unpackb(body, raw=False)
        if not isinstance(msg, dict):
            raise ClientError("daemon sent a message that is not a map")
        if self.shm is not None and msg.get("type") in ("result", "dropped", "error"):
            self.shm.release(msg)
        return msg

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        while (msg := await self.recv()) is not None:
            yield msg

    async def bye(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Say bye and collect the remaining results until the daemon answers bye or closes."""
        await self.send({"type": "bye"})
        rest: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                async for msg in self.messages():
                    if msg.get("type") == "bye":
                        break
                    rest.append(msg)
        except TimeoutError:
            pass
        await self.close()
        return rest

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        if self.shm is not None:
            self.shm.close()
