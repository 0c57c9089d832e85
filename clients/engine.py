"""The one streaming engine: connect and hello, a reader, a paced sender, bye, wait for the tail.

vision-client, vision-viz, vision-stress and the benchmarks all stream through `stream()`. They
differ only in where frames come from (a `Feed`), the schedule (a `Pacer`) and what they do with
each frame and result (`Hooks`). Everything is timed on this machine's monotonic clock.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clients.sources import Encoded, Pacer, Source, SyntheticSource, encode
from clients.transports import Client, open_client

TAIL_S = 15.0  # after bye, how long the results still in the daemon may take to come back

# A frame to send: the image when there is one to show (None for pre-encoded frames), its bytes.
Frame = tuple[np.ndarray | None, Encoded]


class Feed(Protocol):
    """Where a stream's frames come from."""

    async def next(self, skip: int) -> Frame | None:
        """Pass over `skip` frames (slots the schedule missed), then the next one; None at the end."""
        ...


class LoopFeed:
    """Pre-encoded frames (JPEG bytes, or `Encoded` raw ones) played in a loop from `offset`: a
    send costs only the send."""

    def __init__(self, frames: list[bytes] | list[Encoded], offset: int = 0) -> None:
        self.frames = [f if isinstance(f, Encoded) else Encoded(f, "jpeg", None) for f in frames]
        self.i = offset

    async def next(self, skip: int) -> Frame | None:
        self.i += skip
        enc = self.frames[self.i % len(self.frames)]
        self.i += 1
        return None, enc


class SourceFeed:
    """A source's frames, encoded as they are read; synthetic frames are encoded once, up front."""

    def __init__(
        self,
        source: Source,
        encoding: str = "jpeg",
        quality: int = 90,
        width: int = 0,
        height: int = 0,
    ) -> None:
        self.source = source
        self.options = (encoding, quality, width, height)
        self.cache: list[Encoded] | None = None
        if isinstance(source, SyntheticSource):
            self.cache = [encode(img, *self.options) for img in source.frames]

    def _read(self, skip: int) -> Frame | None:
        """Skip `skip` frames then read and encode one (runs in a thread: cameras block)."""
        if skip:
            self.source.skip(skip)
        img = self.source.read()
        return None if img is None else (img, encode(img, *self.options))

    async def next(self, skip: int) -> Frame | None:
        if self.cache is not None and isinstance(self.source, SyntheticSource):
            self.source.skip(skip)
            i = self.source.i % len(self.cache)
            self.source.i += 1
            return self.source.frames[i], self.cache[i]
        return await asyncio.to_thread(self._read, skip)


@dataclass
class Hooks:
    """Extra work per frame for programs built on the engine (vision-viz draws results)."""

    on_send: Callable[[int, np.ndarray | None], None] | None = None
    on_result: Callable[[dict[str, Any]], None] | None = None  # the result carries rtt_ms
    on_dropped: Callable[[dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class Endpoint:
    """The daemon's data plane, and how this client introduces itself there."""

    host: str = "127.0.0.1"
    port: int = 9000
    token: str | None = None
    client_name: str = "vision-client"
    unix_socket: str | None = None  # transport unix (and shm, else loopback TCP) connect here
    transport: str = "tcp"  # tcp | unix | shm | ws (clients.transports.TRANSPORTS)
    api_port: int = 8000  # transport ws: the control-plane port serving /ingest
    shm_slots: int = 4  # transport shm: slots in the ring (frames the daemon may hold at once)
    rate_advice: bool = False  # send at the rate the daemon advises (never above the schedule's)
    tls: ssl.SSLContext | None = None  # TLS to the TCP ingest, or WSS for ws


@dataclass
class Tally:
    """What one stream saw. Every frame sent ends as a result, a drop the daemon reported, or
    unanswered (the connection closed or the tail timed out first)."""

    name: str
    sent: int = 0
    results: int = 0
    drops: Counter[str] = field(default_factory=Counter)  # by the daemon's reason
    errors: Counter[str] = field(default_factory=Counter)  # by the daemon's error code
    last_error: str = ""  # the daemon's last error, or why the connection was lost
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # frame_id, t, rtt ms
    drop_times: list[float] = field(default_factory=list)  # t of each drop notice
    skipped_slots: int = 0
    late_sends: int = 0  # sent more than half a period after the slot was due
    send_elapsed: float = 0.0  # seconds from the schedule's start to the last send
    elapsed: float = 0.0  # ... to the end of the tail
    closed_by_server: bool = False  # the connection ended without the daemon's bye
    advised_fps: float | None = None  # the last rate the daemon advised (rate_advice)

    def progress(self) -> dict[str, Any]:
        """The live view's counters."""
        recent = [rtt for _, _, rtt in self.samples[-50:]]
        return {
            "sent": self.sent,
            "results": self.results,
            "dropped": sum(self.drops.values()),
            "errors": sum(self.errors.values()),
            "last_rtt_ms": recent[-1] if recent else 0.0,
            "recent": recent,
        }


async def stream(
    endpoint: Endpoint,
    tally: Tally,
    feed: Feed,
    pacer: Pacer,
    *,
    start: float | None = None,
    stop: asyncio.Event | None = None,
    hooks: Hooks | None = None,
) -> Tally:
    """Send `feed` on `pacer`'s schedule while reading results; say bye and wait for the tail.

    Times in `tally` are seconds since `start` (default: the schedule's start). Fills `tally` as
    it goes, so a live view can read it, and returns it.
    """
    hooks = hooks or Hooks()
    zero = pacer.start if start is None else start
    transport = endpoint.transport
    if endpoint.unix_socket and transport == "tcp":  # a Unix socket given alone means unix
        transport = "unix"
    first = None
    slot_bytes = 0
    if transport == "shm":  # the ring's slots are sized from the first frame
        first = await feed.next(0)
        if first is None:
            return tally
        slot_bytes = len(first[1].data)
    client = await open_client(
        transport,
        host=endpoint.host,
        port=endpoint.port,
        api_port=endpoint.api_port,
        unix_socket=endpoint.unix_socket,
        shm_slots=endpoint.shm_slots,
        slot_bytes=slot_bytes,
        token=endpoint.token,
        ssl=endpoint.tls,
        client_name=endpoint.client_name,
        dropped_notices=True,
        rate_advice=endpoint.rate_advice,
        options=_advice_options(endpoint, pacer),
    )
    if endpoint.rate_advice and pacer.period:  # the welcome's advice, from the first frame on
        welcome = getattr(client, "welcome", None) or {}
        _take_advice(pacer, tally, 1.0 / pacer.period, welcome.get("advised_fps"))
    in_flight: dict[int, float] = {}  # frame_id -> send time
    done = asyncio.Event()  # the daemon said bye or closed the connection
    reader = asyncio.create_task(
        _read(client, tally, in_flight, zero, pacer, hooks, done, endpoint.rate_advice)
    )
    try:
        try:
            await _send(client, tally, feed, pacer, in_flight, stop, done, hooks, first)
        finally:
            tally.send_elapsed = pacer.clock() - pacer.start
        if not done.is_set():
            await client.send({"type": "bye"})
            try:
                await asyncio.wait_for(done.wait(), TAIL_S)
            except TimeoutError:
                pass
    except ConnectionError as exc:
        tally.closed_by_server = True
        tally.last_error = tally.last_error or f"connection lost: {exc}"
    finally:
        tally.elapsed = pacer.clock() - pacer.start
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()
    return tally


async def _send(
    client: Client,
    tally: Tally,
    feed: Feed,
    pacer: Pacer,
    in_flight: dict[int, float],
    stop: asyncio.Event | None,
    done: asyncio.Event,
    hooks: Hooks,
    first: Frame | None = None,
) -> None:
    """The paced sender: read ahead (a camera read overlaps the wait), wait for the slot, send."""
    missed = 0
    while not done.is_set() and not (stop is not None and stop.is_set()):
        frame, first = (first, None) if first is not None else (await feed.next(missed), None)
        if frame is None:
            return
        waited = await pacer.wait()
        tally.skipped_slots = pacer.skipped
        if waited is None:
            return
        missed = waited
        img, enc = frame
        now = pacer.clock()
        if pacer.period and now - pacer.due_time(pacer.slot - 1) > pacer.period / 2:
            tally.late_sends += 1
        frame_id = tally.sent
        if hooks.on_send:
            hooks.on_send(frame_id, img)
        in_flight[frame_id] = now
        # Waits for the socket (and with shm for a free slot): a slow path shows up as skipped
        # slots, not as a queue.
        await client.send_image(tally.name, frame_id, enc.data, enc.encoding, enc.shape)
        tally.sent += 1


def _advice_options(endpoint: Endpoint, pacer: Pacer) -> dict[str, Any] | None:
    """With rate advice, the hello says the schedule's own rate: the stream's demand."""
    if not endpoint.rate_advice or not pacer.period:
        return None
    return {"source_fps": round(1.0 / pacer.period, 3)}


def _take_advice(pacer: Pacer, tally: Tally, own: float, fps: object) -> None:
    """Send at an advised rate (from the welcome or a `rate` message), never faster than the
    stream's own rate; anything but a positive number is ignored."""
    if isinstance(fps, int | float) and fps > 0:
        pacer.set_fps(min(own, float(fps)))
        tally.advised_fps = float(fps)


async def _read(
    client: Client,
    tally: Tally,
    in_flight: dict[int, float],
    zero: float,
    pacer: Pacer,
    hooks: Hooks,
    done: asyncio.Event,
    follow_advice: bool = False,
) -> None:
    """The reader: results, drop notices, errors and rate advice, until the daemon says bye or
    closes."""
    clock = pacer.clock
    own = 1.0 / pacer.period if pacer.period else 0.0
    async for msg in client.messages():
        now = clock()
        kind = msg.get("type")
        if kind == "rate" and follow_advice and own:
            _take_advice(pacer, tally, own, msg.get("fps"))
            continue
        if kind == "result":
            frame_id = msg.get("frame_id", -1)
            sent_at = in_flight.pop(frame_id, None)
            tally.results += 1
            if sent_at is not None:
                rtt = (now - sent_at) * 1000
                tally.samples.append((int(frame_id), sent_at - zero, rtt))
                msg["rtt_ms"] = round(rtt, 3)
            if hooks.on_result:
                hooks.on_result(msg)
        elif kind == "dropped":
            in_flight.pop(msg.get("frame_id", -1), None)
            tally.drops[str(msg.get("reason"))] += 1
            tally.drop_times.append(now - zero)
            if hooks.on_dropped:
                hooks.on_dropped(msg)
        elif kind == "error":
            tally.errors[str(msg.get("code"))] += 1
            tally.last_error = f"{msg.get('code')}: {msg.get('message')}"
        elif kind == "bye":
            done.set()
            return
    tally.closed_by_server = True
    done.set()
