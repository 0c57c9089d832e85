"""Hypothesis drives random message sequences at one live daemon: whatever a peer sends, replies stay
well-formed, a well-behaved client still gets results, and every received frame is accounted for."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    SlowDetector,
    accounted,
    connect,
    connections,
    jpeg,
    running_daemon,
    stats,
)
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # a live daemon on real sockets

T = TypeVar("T")

MAX_MESSAGE_BYTES = 1 << 20
STREAMS = ("cam0", "cam1", "cam2")
IMAGES = {"small": jpeg(48, 64), "square": jpeg(32, 32, 200)}  # named: short example reprs
RAW = bytes(4 * 5 * 3)  # a 4x5 BGR frame, raw
REPLY_TYPES = {"result", "welcome", "error", "dropped", "bye"}
DROP_REASONS = {
    "queue_full",
    "stale",
    "throttled",
    "skipped",
    "decode_error",
    "invalid",
    "refused",
    "detector_error",
    "worker_timeout",
    "memory_limit",
    "disconnected",
    "shutdown",
}


# ---- one daemon for the whole module, on its own loop in a thread --------------------------------


@dataclass
class Live:
    """A running daemon and the loop it runs on; `call` runs a function of it on that loop."""

    daemon: Daemon
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Callable[[Daemon], T], timeout: float = 5.0) -> T:
        async def on_loop() -> T:
            return fn(self.daemon)

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(timeout)

    def settled(self, timeout: float = 5.0) -> dict[str, Any]:
        """Poll (on the daemon's loop, with a deadline) until it is quiet; the last snapshot."""

        def quiet(d: Daemon) -> dict[str, Any] | None:
            snap = stats(d)
            idle = all(
                s["queue_depth"] == 0 and s["in_flight"] == 0 for s in snap["streams"].values()
            )
            return snap if idle and connections(d) == 0 and accounted(d) else None

        deadline = time.monotonic() + timeout
        while (snap := self.call(quiet)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon never settled; last: {self.call(stats)}")
            time.sleep(0.01)  # polling another thread's loop with a deadline
        return snap


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """One daemon (two fast fake workers) for every example of the module, stopped at the end."""
    started: Future[Live] = Future()
    stop: Future[asyncio.Event] = Future()

    async def serve() -> None:
        async with running_daemon(
            lambda: SlowDetector(0.0),
            workers=2,
            max_message_bytes=MAX_MESSAGE_BYTES,
            hello_timeout_s=5.0,
        ) as d:
            done = asyncio.Event()
            stop.set_result(done)
            started.set_result(Live(d, asyncio.get_running_loop()))
            await done.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # surfaces in the test instead of dying in the thread
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=main, name="fuzz-daemon", daemon=True)
    thread.start()
    live = started.result(timeout=30)
    try:
        yield live
    finally:
        done = stop.result()
        live.loop.call_soon_threadsafe(done.set)
        thread.join(30)
        assert not thread.is_alive(), "the fuzzed daemon did not shut down"


# ---- what a peer may send -----------------------------------------------------------------------


def framed(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def good_frame(stream: str, frame_id: int, image: str) -> dict[str, Any]:
    """A valid frame; `image` names one of IMAGES, or is "raw" (a 4x5 BGR frame, shape not set)."""
    data = RAW if image == "raw" else IMAGES[image]
    return {"type": "frame", "stream_name": stream, "frame_id": frame_id, "image": data}


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
any_value = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=5), ints, max_size=3),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "skip_frames": st.one_of(st.integers(-1, 4), any_value),
        "max_fps": st.one_of(st.floats(0, 100), any_value),
    },
)
stream_names = st.one_of(st.sampled_from(STREAMS), st.text(max_size=70))

hellos = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("hello"), "version": st.just(1)},
        optional={
            "client": st.text(max_size=200),
            "dropped_notices": st.booleans(),
            "options": options,
            "streams": st.dictionaries(st.sampled_from(STREAMS), options, max_size=3),
        },
    ),
    st.fixed_dictionaries(  # invalid: another version, wrong types
        {"type": st.just("hello")},
        optional={
            "version": any_value,
            "client": any_value,
            "token": any_value,
            "dropped_notices": any_value,
            "options": any_value,
            "streams": any_value,
        },
    ),
    st.integers(65, 300).map(  # over max_streams_per_connection
        lambda n: {"type": "hello", "version": 1, "streams": {f"s{i}": {} for i in range(n)}}
    ),
).map(framed)

images = st.sampled_from(sorted(IMAGES))
valid_frames = st.builds(good_frame, st.sampled_from(STREAMS), st.integers(0, 2**31), images)
frames = st.one_of(
    valid_frames,
    st.builds(  # one field replaced by anything, or dropped
        lambda f, key, value, drop: (
            {k: v for k, v in f.items() if k != key} if drop else {**f, key: value}
        ),
        st.builds(good_frame, stream_names, st.integers(0, 99), images),
        st.sampled_from(["stream_name", "frame_id", "image", "timestamp", "encoding", "shape"]),
        any_value,
        st.booleans(),
    ),
    st.builds(  # raw pixels with a right or wrong shape
        lambda f, shape: {**f, "encoding": "raw", "shape": shape},
        st.builds(good_frame, st.sampled_from(STREAMS), st.integers(0, 99), st.just("raw")),
        st.one_of(st.just([4, 5, 3]), st.lists(st.integers(-2, 8), max_size=4), any_value),
    ),
    st.builds(lambda f, enc: {**f, "encoding": enc}, valid_frames, st.text(max_size=10)),
    st.builds(  # image bytes that are not an image
        lambda f, data: {**f, "image": data}, valid_frames, st.binary(min_size=1, max_size=64)
    ),
).map(framed)

junk = st.one_of(
    st.binary(min_size=1, max_size=64).map(lambda b: struct.pack(">I", len(b)) + b),  # any body
    st.one_of(any_value, st.lists(any_value, max_size=3)).map(framed),  # msgpack, not a map
    st.dictionaries(st.text(max_size=8), any_value, max_size=4).map(framed),  # no or odd type
    st.one_of(st.text(max_size=30), ints).map(lambda t: framed({"type": t})),
    st.just(struct.pack(">I", 0)),  # zero length
    st.integers(MAX_MESSAGE_BYTES + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),  # too large
    st.integers(100, MAX_MESSAGE_BYTES).map(lambda n: struct.pack(">I", n) + b"\x81"),  # truncated
    st.binary(min_size=1, max_size=16),  # bytes with no framing at all
    st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]).map(  # huge msgpack counts
        lambda b: struct.pack(">I", len(b)) + b
    ),
)

messages = st.one_of(hellos, frames, frames, junk, st.just(framed({"type": "bye"})))


# ---- one example: a fresh connection, then the invariants --------------------------------------


def parse_replies(data: bytes) -> list[dict[str, Any]]:
    """Split what the daemon sent into messages, checking each is a well-formed reply."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 4, f"a partial length prefix at the end: {data[pos:]!r}"
        (n,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4 : pos + 4 + n]
        assert 0 < n == len(body), f"a reply of {n} bytes arrived with {len(body)}"
        msg = msgpack.unpackb(body, raw=False)
        assert isinstance(msg, dict) and msg.get("type") in REPLY_TYPES, msg
        if msg["type"] == "error":
            assert isinstance(msg["code"], str) and isinstance(msg["message"], str), msg
            assert 0 < len(msg["message"]) <= 300, msg
        elif msg["type"] == "result":
            assert isinstance(msg["frame_id"], int) and isinstance(msg["detections"], list), msg
        elif msg["type"] == "dropped":
            assert msg["reason"] in DROP_REASONS, msg
        out.append(msg)
        pos += 4 + n
    return out


async def send_sequence(port: int, sequence: list[bytes]) -> list[dict[str, Any]]:
    """Send the sequence on a fresh connection, half-close, and read every reply until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in sequence:
            writer.write(data)
        try:
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the daemon closed on a fatal message before taking the rest
        received = bytearray()
        async with asyncio.timeout(5):
            try:
                while chunk := await reader.read(65536):
                    received += chunk
            except (ConnectionError, OSError):
                pass  # a reset after a fatal error: what arrived before it is checked below
        return parse_replies(bytes(received))
    finally:
        writer.close()


async def good_client_round_trip(live: Live, frame_id: int) -> None:
    """A well-behaved v1 client on its own connection gets its frame's result."""
    c = await connect(live.daemon)
    try:
        await c.send_frame("good", frame_id, IMAGES["small"])
        async with asyncio.timeout(5):
            msg = await c.recv()
        assert msg is not None and msg["type"] == "result" and msg["frame_id"] == frame_id, msg
    finally:
        await c.close()


counter = iter(range(10**9))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=st.lists(messages, min_size=1, max_size=8))
def test_random_message_sequences_keep_the_daemon_serving_and_accounted(
    live: Live, sequence: list[bytes]
) -> None:
    """Any sequence of hello/frame/bye/junk: replies are well-formed, service and accounting hold."""
    port = live.daemon.tcp_port
    assert port is not None
    replies = asyncio.run(send_sequence(port, sequence))
    for kind in {m["type"] if m["type"] != "error" else f"error {m['code']}" for m in replies}:
        event(kind)  # --hypothesis-show-statistics shows which replies the examples reached
    asyncio.run(good_client_round_trip(live, next(counter)))
    snap = live.settled()
    assert snap["totals"]["processed"] >= 1
