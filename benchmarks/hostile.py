"""A background of hostile clients for the soak: each behaviour at a modest, fixed rate.

    .venv/bin/python -m benchmarks.hostile --tcp-port 9000 --api-port 8000 --duration 60

`benchmarks.soak --hostile` runs this in its own process (so the hostiles' event loop cannot
delay the good clients' clock) beside the good streams. Everything goes to 127.0.0.1 only. Every
loop is bounded in count and in time: it stops by itself at --duration (plus a few seconds to
close), and the whole run is cut off at --duration + GRACE_S whatever happens. The last line on
stdout is one JSON object: what each behaviour attempted and what it saw (refusals, closes, codes).

The behaviours and their rates (about 2 small-JPEG inferences and 20 HTTP requests a second in
all, so they stress the bounds without simply taking the 2 cores away):
- junk: one connection at a time that never reads its error replies (4 KiB receive buffer):
  non-msgpack, non-map, array, unknown type, bad stream name, wrong field types, and an image that
  does not decode; every other one starts with a hello. Bursts of JUNK_BURST messages every
  JUNK_EVERY_S (bursts, so that the replies outgrow the socket buffers and the outbox bound is
  reached); a connection lives until the daemon closes it (slow_consumer) or JUNK_CONN_S.
- churn: connect, hello, one frame on a fresh stream name, close (every other one without waiting
  for the reply): one per CHURN_EVERY_S.
- slow_reader: hello (max_fps SLOW_MAX_FPS, dropped notices on), then small JPEG frames on one
  stream at SLOW_FPS, never reading a result or a notice.
- idle_tcp: IDLE_TCP sockets that connect and send nothing; idle_hello: IDLE_HELLO that send a
  hello, then nothing. Each is re-opened when the daemon closes it, at most once per RETRY_S.
- http: GET /stats and /metrics in turn, HTTP_RPS requests a second; idle_http: IDLE_HTTP sockets
  on the API port that send nothing (re-opened as idle_tcp).
- ws_reader: WS_READERS /ws subscribers that read every message; ws_stalled: one that never reads
  (4 KiB receive buffer, client queue of 1). Both reconnect when closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import cv2
import httpx
import msgpack
import numpy as np
import websockets

from clients.lib import DaemonClient, frame_message, pack

HOST = "127.0.0.1"
GRACE_S = 20.0  # after --duration: time to close everything, then the run is cut off
RETRY_S = 1.0  # least time between two (re)connections of one hostile socket
SMALL_RCVBUF = 4096  # a peer that does not read: the kernel buffers little for it

JUNK_BURST = 1000  # junk messages written at once (~24 KB; their error replies ~80 KB)
JUNK_EVERY_S = 5.0  # -> 200 junk messages a second on average
JUNK_CONN_S = 120.0  # a junk connection the daemon never closes is given up after this
CHURN_EVERY_S = 1.0  # one fresh stream name a second (one JPEG inference)
SLOW_FPS = 5.0  # frames a second from the slow reader, which asks for max_fps SLOW_MAX_FPS
SLOW_MAX_FPS = 1.0  # -> one JPEG inference a second, the rest throttled (a dropped notice each)
IDLE_TCP = 8
IDLE_HELLO = 2
HTTP_RPS = 20.0
IDLE_HTTP = 4
WS_READERS = 3

Counts = Counter[str]


def small_jpeg() -> bytes:
    """A 160x120 JPEG with some structure: what a cheap camera might send."""
    img = np.zeros((120, 160, 3), np.uint8)
    cv2.rectangle(img, (40, 20), (110, 100), (200, 180, 160), -1)
    return bytes(cv2.imencode(".jpg", img)[1].tobytes())


def junk_bodies(stream: str) -> list[bytes]:
    """One framed message for each kind of bad input the protocol names (PROTOCOL.md, Bad input)."""

    def packb(obj: Any) -> bytes:
        body: bytes = msgpack.packb(obj, use_bin_type=True)
        return body

    bodies = [
        b"\xc1",  # a byte msgpack never uses: bad_msgpack
        packb(1),  # not_a_map
        packb([1, 2, 3]),  # not_a_map
        packb({"type": "nope"}),  # unknown_type
        packb({"type": "frame", "stream_name": "bad name!", "frame_id": 1, "image": b"x"}),
        packb({"type": "frame", "stream_name": stream, "frame_id": "one", "image": 5}),  # invalid
        packb({"type": "frame", "stream_name": stream, "frame_id": 7, "image": b"not an image"}),
    ]
    return [len(b).to_bytes(4, "big") + b for b in bodies]


def deadline_left(end: float) -> float:
    return max(0.0, end - time.monotonic())


async def ticks(period: float, end: float) -> AsyncIterator[int]:
    """Tick k at start + k * period until `end` (monotonic); missed ticks are skipped, not bunched.

    Bounded in count too: at most duration / period + 1 ticks.
    """
    start = time.monotonic()
    limit = math.ceil((end - start) / period) + 1
    k = 0
    while k < limit:
        due = start + k * period
        if due >= end:
            return
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        yield k
        k = max(k + 1, math.ceil((time.monotonic() - start) / period))


async def small_buffer_connection(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection whose receive buffer is small, set before connecting (a non-reader)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, port)), 5)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (TimeoutError, ConnectionError, OSError):
        pass


async def codes_until_closed(reader: asyncio.StreamReader, writer: Any, end: float) -> list[str]:
    """Read daemon messages until it closes the connection or `end`; their types / error codes.

    Returns [] plus "open" last when `end` came first.
    """
    client = DaemonClient(reader, writer)
    seen: list[str] = []
    try:
        async with asyncio.timeout(deadline_left(end)):
            while (msg := await client.recv()) is not None:
                kind = str(msg.get("type"))
                seen.append(f"error:{msg.get('code')}" if kind == "error" else kind)
    except TimeoutError:
        seen.append("open")
    return seen


class Hostiles:
    """The hostile background against one daemon; `run()` returns what each behaviour did."""

    def __init__(self, tcp_port: int, api_port: int, duration: float, tag: str = "h") -> None:
        self.tcp_port = tcp_port
        self.api_port = api_port
        self.duration = duration
        self.tag = tag
        self.end = 0.0
        self.image = small_jpeg()
        self.counts: dict[str, Counts] = {}
        self.http_ms: list[float] = []

    def count(self, name: str) -> Counts:
        return self.counts.setdefault(name, Counter())

    async def run(self) -> dict[str, Any]:
        self.end = time.monotonic() + self.duration
        jobs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("junk", self.junk),
            ("churn", self.churn),
            ("slow_reader", self.slow_reader),
            *((f"idle_tcp{i}", lambda: self.idle_tcp(False)) for i in range(IDLE_TCP)),
            *((f"idle_hello{i}", lambda: self.idle_tcp(True)) for i in range(IDLE_HELLO)),
            ("http", self.http),
            *((f"idle_http{i}", self.idle_http) for i in range(IDLE_HTTP)),
            *((f"ws_reader{i}", self.ws_reader) for i in range(WS_READERS)),
            ("ws_stalled", self.ws_stalled),
        ]
        try:
            async with asyncio.timeout(self.duration + GRACE_S):
                await asyncio.gather(*(self.guarded(name, job) for name, job in jobs))
        except TimeoutError:
            self.count("run")["cut_off_at_grace"] += 1
        out: dict[str, Any] = {k: dict(sorted(v.items())) for k, v in sorted(self.counts.items())}
        if self.http_ms:
            arr = np.asarray(self.http_ms)
            out["http"]["ms_p50"] = round(float(np.percentile(arr, 50)), 1)
            out["http"]["ms_p99"] = round(float(np.percentile(arr, 99)), 1)
            out["http"]["ms_max"] = round(float(arr.max()), 1)
        return out

    async def attempts(self, limit: int) -> AsyncIterator[int]:
        """Numbered (re)connection attempts: at most `limit`, one per RETRY_S, until the end."""
        k = 0
        while deadline_left(self.end) > 0 and k < limit:
            k += 1
            yield k
            await asyncio.sleep(min(RETRY_S, deadline_left(self.end)))

    async def guarded(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run one behaviour; an unexpected exception is counted, never raised into the others."""
        try:
            await job()
        except Exception as exc:
            self.count(name.rstrip("0123456789"))[f"crashed:{type(exc).__name__}"] += 1

    # ---- data plane ------------------------------------------------------------------------------
    async def junk(self) -> None:
        """Junk from peers that never read their error replies, one connection at a time."""
        c = self.count("junk")
        async for conn in self.attempts(math.ceil(self.duration / RETRY_S) + 1):
            c["connections"] += 1
            try:
                reader, writer = await small_buffer_connection(self.tcp_port)
            except (OSError, TimeoutError):
                c["connect_failed"] += 1
                continue
            try:
                if conn % 2:
                    writer.write(pack({"type": "hello", "version": 1, "client": "hostile-junk"}))
                bodies = junk_bodies(f"{self.tag}-junk{conn}")
                burst = b"".join(bodies[i % len(bodies)] for i in range(JUNK_BURST))
                until = min(self.end, time.monotonic() + JUNK_CONN_S)
                outcome = "open_at_end" if until == self.end else "given_up"
                async for _ in ticks(JUNK_EVERY_S, until):
                    if writer.is_closing() or reader.at_eof():
                        outcome = "closed_by_daemon"
                        break
                    writer.write(burst)
                    c["messages"] += JUNK_BURST
                    try:
                        await asyncio.wait_for(writer.drain(), 2.0)
                    except TimeoutError:
                        c["drain_stalled"] += 1  # the daemon stopped reading us
                    except (ConnectionError, OSError):
                        outcome = "closed_by_daemon"
                        break
                c[outcome] += 1
                if outcome == "open_at_end":  # hold it to the end, not one burst per RETRY_S
                    await asyncio.sleep(deadline_left(self.end))
            finally:
                writer.transport.abort()

    async def churn(self) -> None:
        """A fresh stream name each time: connect, hello, one frame, close."""
        c = self.count("churn")
        async for k in ticks(CHURN_EVERY_S, self.end):
            c["attempts"] += 1
            try:
                client = await DaemonClient.connect(
                    HOST, self.tcp_port, client_name="hostile-churn", timeout=5
                )
            except Exception as exc:  # ClientError (refused, closed) or a socket error
                c[f"connect_failed:{type(exc).__name__}"] += 1
                continue
            try:
                await client.send_frame(f"{self.tag}-churn{k}", 0, self.image)
                if k % 2:
                    c["closed_at_once"] += 1
                    continue
                try:
                    msg = await asyncio.wait_for(client.recv(), 5)
                except TimeoutError:
                    c["no_reply_in_5s"] += 1
                    continue
                if msg is None:
                    c["closed_by_daemon"] += 1
                elif msg.get("type") == "error":
                    c[f"error:{msg.get('code')}"] += 1
                else:
                    c[str(msg.get("type"))] += 1
            except (ConnectionError, OSError):
                c["closed_by_daemon"] += 1
            finally:
                client.writer.transport.abort()

    async def slow_reader(self) -> None:
        """Frames on one stream from a peer that never reads its results."""
        c = self.count("slow_reader")
        async for _ in self.attempts(math.ceil(self.duration) + 1):
            c["connections"] += 1
            try:
                reader, writer = await small_buffer_connection(self.tcp_port)
            except (OSError, TimeoutError):
                c["connect_failed"] += 1
                continue
            try:
                hello = {
                    "type": "hello",
                    "version": 1,
                    "client": "hostile-slow",
                    "options": {"max_fps": SLOW_MAX_FPS},
                    "dropped_notices": True,  # more replies it will not read
                }
                writer.write(pack(hello))
                async for k in ticks(1.0 / SLOW_FPS, self.end):
                    if writer.is_closing() or reader.at_eof():
                        c["closed_by_daemon"] += 1
                        break
                    writer.write(pack(frame_message(f"{self.tag}-slow", k, self.image)))
                    c["frames"] += 1
                    try:
                        await asyncio.wait_for(writer.drain(), 2.0)
                    except TimeoutError:
                        c["drain_stalled"] += 1
                    except (ConnectionError, OSError):
                        c["closed_by_daemon"] += 1
                        break
            finally:
                writer.transport.abort()

    async def reopening(
        self,
        c: Counter[str],
        port: int,
        watch: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        """A socket to `port`, watched until it closes, re-opened each time (idle behaviours)."""
        async for _ in self.attempts(math.ceil(self.duration / RETRY_S)):
            c["opens"] += 1
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
            except (OSError, TimeoutError):
                c["connect_failed"] += 1
                continue
            try:
                await watch(reader, writer)
            except (ConnectionError, OSError):
                c["closed_by_daemon"] += 1
            finally:
                writer.transport.abort()

    async def idle_tcp(self, hello: bool) -> None:
        """A socket that sends nothing (or only a hello), re-opened each time the daemon closes it."""
        c = self.count("idle_hello" if hello else "idle_tcp")

        async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if hello:
                writer.write(pack({"type": "hello", "version": 1, "client": "hostile"}))
            seen = await codes_until_closed(reader, writer, self.end)
            c["open_at_end" if seen[-1:] == ["open"] else "closed_by_daemon"] += 1
            for code in seen:
                if code != "open":
                    c[code] += 1

        await self.reopening(c, self.tcp_port, watch)

    # ---- control plane ---------------------------------------------------------------------------
    async def http(self) -> None:
        """GET /stats and /metrics in turn, HTTP_RPS a second on one keep-alive client."""
        c = self.count("http")
        paths = ("/stats", "/metrics")
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{self.api_port}", timeout=5) as h:
            async for k in ticks(1.0 / HTTP_RPS, self.end):
                c["requests"] += 1
                t0 = time.perf_counter()
                try:
                    r = await h.get(paths[k % 2])
                except httpx.HTTPError as exc:
                    c[f"failed:{type(exc).__name__}"] += 1
                    continue
                self.http_ms.append((time.perf_counter() - t0) * 1000)
                c[f"status_{r.status_code}"] += 1

    async def idle_http(self) -> None:
        """A socket on the API port that sends nothing, re-opened when the daemon closes it."""
        c = self.count("idle_http")

        async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(deadline_left(self.end)):
                    while await reader.read(4096):
                        pass
                c["closed_by_daemon"] += 1
            except TimeoutError:
                c["open_at_end"] += 1

        await self.reopening(c, self.api_port, watch)

    async def ws_reader(self) -> None:
        """A /ws subscriber that reads every message; reconnects if the daemon closes it."""
        c = self.count("ws_reader")
        url = f"ws://{HOST}:{self.api_port}/ws"
        async for _ in self.attempts(math.ceil(self.duration / RETRY_S)):
            c["connects"] += 1
            try:
                async with websockets.connect(url, open_timeout=5, close_timeout=2) as ws:
                    async with asyncio.timeout(deadline_left(self.end)):
                        async for _ in ws:
                            c["messages"] += 1
                    c[f"closed_by_daemon:{ws.close_code}"] += 1
            except TimeoutError:
                c["open_at_end"] += 1
            except (OSError, websockets.WebSocketException) as exc:
                c[f"failed:{type(exc).__name__}"] += 1

    async def ws_stalled(self) -> None:
        """A /ws subscriber that never reads (4 KiB receive buffer, client queue of 1)."""
        c = self.count("ws_stalled")
        url = f"ws://{HOST}:{self.api_port}/ws"
        async for _ in self.attempts(math.ceil(self.duration / RETRY_S)):
            c["connects"] += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(sock, (HOST, self.api_port)), 5
                )
                async with websockets.connect(
                    url, sock=sock, open_timeout=5, close_timeout=1, max_queue=1
                ) as ws:
                    # never recv(): wait for the close (the daemon may end it), or the end
                    try:
                        await asyncio.wait_for(ws.wait_closed(), deadline_left(self.end))
                        c[f"closed_by_daemon:{ws.close_code}"] += 1
                    except TimeoutError:
                        c["open_at_end"] += 1
                        ws.transport.abort()
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                c[f"failed:{type(exc).__name__}"] += 1
            finally:
                sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tcp-port", type=int, required=True, help="the daemon's data plane")
    ap.add_argument("--api-port", type=int, required=True, help="the daemon's control plane")
    ap.add_argument("--duration", type=float, required=True, help="seconds; then every loop ends")
    ap.add_argument("--tag", default="h", help="prefix of the hostiles' stream names")
    args = ap.parse_args()
    if args.duration <= 0:
        ap.error("--duration must be > 0")
    counts = asyncio.run(Hostiles(args.tcp_port, args.api_port, args.duration, args.tag).run())
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
