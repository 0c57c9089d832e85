"""The ways a client reaches the data plane besides TCP: WebSocket `/ingest` and a shared-memory
ring of frame slots (over the Unix socket or loopback TCP). `open_client` picks one by name.

Every transport speaks the same messages; what differs is the carrier (`WsDaemonClient`) or
where a frame's pixels travel (`ShmSlots`, used by `DaemonClient` when it has one).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl as ssl_module
from collections import deque
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgpack
import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from clients.lib import (
    ClientError,
    DaemonClient,
    auth_headers,
    check_welcome,
    frame_message,
    hello_message,
)

TRANSPORTS = ("tcp", "unix", "shm", "ws")
SHM_MAGIC = b"VDSHM001"
SHM_HEADER_BYTES = 4096  # magic, 16-byte token, zeros; slot 0 starts here


class ShmSlots:
    """A ring of frame slots in POSIX shared memory that this client creates and owns.

    The ownership rule (docs/PROTOCOL.md): a slot is the daemon's from the frame message that
    names it until the message ending that frame (result, dropped notice, or an error with its
    frame_id); `acquire` waits for a free slot, so a slot is never written while the daemon may
    read it.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.token = secrets.token_bytes(16)
        self.mem = SharedMemory(
            name=f"vd-{os.getpid()}-{secrets.token_hex(6)}",
            create=True,
            size=SHM_HEADER_BYTES + slots * slot_bytes,
        )
        self.mem.buf[: len(SHM_MAGIC) + 16] = SHM_MAGIC + self.token
        self.free: deque[int] = deque(range(slots))
        self.held: dict[tuple[str, int], int] = {}
        self._freed = asyncio.Event()

    def announce(self) -> dict[str, Any]:
        """The hello's `shm` map."""
        return {
            "name": self.mem.name,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "token": self.token,
        }

    async def acquire(self) -> int:
        """A slot the daemon does not hold (waits for a result or drop to free one)."""
        while not self.free:
            self._freed.clear()
            await self._freed.wait()
        return self.free.popleft()

    def _bytes_of(self, slot: int, n: int, what: str) -> np.ndarray:
        """The first `n` bytes of a slot as a writable flat array."""
        if n > self.slot_bytes:
            raise ClientError(f"{what} does not fit a {self.slot_bytes}-byte slot")
        buf = self.mem.buf
        assert buf is not None  # None only after close()
        return np.frombuffer(buf, np.uint8, n, SHM_HEADER_BYTES + slot * self.slot_bytes)

    def view(self, slot: int, shape: tuple[int, int, int]) -> np.ndarray:
        """A writable array over a slot this client holds, to render or decode a frame into
        directly (e.g. `cv2.resize(src, size, dst=view)`): no copy at all on either side."""
        n = shape[0] * shape[1] * shape[2]
        return self._bytes_of(slot, n, f"shape {list(shape)}").reshape(shape)

    def write(self, slot: int, image: bytes | np.ndarray) -> None:
        """Copy one frame's pixels into a slot this client holds."""
        src = np.frombuffer(image, np.uint8) if isinstance(image, bytes) else image.reshape(-1)
        self._bytes_of(slot, src.nbytes, f"frame of {src.nbytes} bytes")[:] = src

    def hand_over(self, stream: str, frame_id: int, slot: int) -> None:
        """The slot is the daemon's until the message that ends this frame."""
        self.held[(stream, frame_id)] = slot

    def release(self, msg: dict[str, Any]) -> None:
        """A result or dropped notice gives its frame's slot back; so does an error with a
        frame_id (errors name no stream: only when one held frame has that id)."""
        fid = msg.get("frame_id")
        if msg.get("type") == "error":
            keys = [k for k in self.held if k[1] == fid]
            key = keys[0] if len(keys) == 1 else None
        else:
            key = (str(msg.get("stream_name", "")), fid) if isinstance(fid, int) else None
        slot = self.held.pop(key, None) if key is not None else None
        if slot is not None:
            self.free.append(slot)
            self._freed.set()

    def reset(self) -> None:
        """The connection ended: the daemon holds nothing any more."""
        self.free = deque(range(self.slots))
        self.held.clear()
        self._freed.set()

    def close(self) -> None:
        """Unmap and remove the segment (the daemon's mapping, if any, stays valid until it
        unmaps)."""
        self.mem.close()
        try:
            self.mem.unlink()
        except FileNotFoundError:
            pass


class WsDaemonClient:
    """One `WS /ingest` connection on the control-plane port: binary msgpack maps, no prefix."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        api_port: int = 8000,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        **hello: Any,
    ) -> WsDaemonClient:
        """Open `/ingest` (the token as a bearer header; wss:// with `ssl`) and do the v1
        handshake."""
        url = f"{'wss' if ssl else 'ws'}://{host}:{api_port}/ingest"
        try:
            ws = await asyncio.wait_for(
                ws_connect(
                    url,
                    ssl=ssl,
                    additional_headers=auth_headers(token),
                    max_size=2**24,
                    compression=None,
                    open_timeout=None,
                ),
                timeout,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise ClientError(
                f"daemon not reachable at {url} ({exc.__class__.__name__}); is vision-daemon "
                "running there with its control plane on that port?",
                "unreachable",
            ) from None
        client = cls(ws)
        await client.send(hello_message(**hello))
        reply = await asyncio.wait_for(client.recv(), timeout)
        if reply is None:
            kind = "unauthorized" if client.close_code == 1008 else "protocol"
            raise ClientError(
                f"daemon closed the WebSocket during the handshake ({client.close_code} "
                f"{client.close_reason})",
                kind,
            )
        client.welcome = check_welcome(reply)
        return client

    async def send(self, msg: dict[str, Any]) -> None:
        try:
            await self.ws.send(msgpack.packb(msg, use_bin_type=True))
        except websockets.ConnectionClosed as exc:
            raise ConnectionResetError(f"WebSocket closed ({exc})") from None

    async def send_image(
        self, stream: str, frame_id: int, data: bytes, encoding: str, shape: Any
    ) -> None:
        await self.send(frame_message(stream, frame_id, data, encoding=encoding, shape=shape))

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the daemon closed the WebSocket."""
        try:
            data = await self.ws.recv()
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
            return None
        msg = json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)
        if not isinstance(msg, dict):
            raise ClientError("daemon sent a message that is not a map")
        return msg

    async def messages(self) -> Any:
        while (msg := await self.recv()) is not None:
            yield msg

    async def close(self) -> None:
        await self.ws.close()


Client = DaemonClient | WsDaemonClient


async def open_client(
    transport: str,
    *,
    host: str = "127.0.0.1",
    port: int = 9000,
    api_port: int = 8000,
    unix_socket: str | None = None,
    shm_slots: int = 4,
    slot_bytes: int = 0,
    ssl: ssl_module.SSLContext | None = None,
    **hello: Any,
) -> Client:
    """Connect over `transport` (tcp, unix, shm or ws) and do the handshake.

    shm runs over the Unix socket when `unix_socket` is given, else over loopback TCP, with a
    ring of `shm_slots` slots of `slot_bytes` each that the returned client owns and removes
    when it closes.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
    if transport == "ws":
        return await WsDaemonClient.connect(host, api_port, ssl=ssl, **hello)
    if transport == "unix" and not unix_socket:
        raise ValueError("transport unix needs unix_socket")
    path = unix_socket if transport in ("unix", "shm") else None
    shm = None
    if transport == "shm":
        if slot_bytes <= 0:
            raise ValueError("transport shm needs slot_bytes (one frame's pixel bytes)")
        shm = ShmSlots(shm_slots, slot_bytes)
    try:
        tls = ssl if path is None else None  # the Unix socket is plain
        return await DaemonClient.connect(host, port, unix_socket=path, shm=shm, ssl=tls, **hello)
    except BaseException:
        if shm is not None:
            shm.close()
        raise
