"""Hostile messages on the TCP data plane: each row of docs/PROTOCOL.md's bad-input table, malformed
and oversized messages, bad fields and random message sequences; the daemon answers with the
documented error and a good client beside it keeps getting results."""

from __future__ import annotations

import asyncio
import math
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

from clients.lib import pack
from tests.conftest import (
    SlowDetector,
    accounted,
    api,
    collect,
    connect,
    connections,
    jpeg,
    round_trip,
    run,
    running_daemon,
    settled_stats,
    stats,
)
from vision_daemon import protocol as p
from vision_daemon.lifecycle import Daemon

SMALL_IMG = jpeg(64, 64)


GOOD = {"type": "frame", "stream_name": "cam", "frame_id": 1, "timestamp": 0.0, "image": SMALL_IMG}


def body(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


# (case, raw bytes sent, expected error code, connection stays open)
ROWS: list[tuple[str, bytes, str, bool]] = [
    ("zero length", struct.pack(">I", 0), p.E_BAD_LENGTH, False),
    ("length above max", struct.pack(">I", 2**31), p.E_TOO_LARGE, False),
    ("not msgpack", struct.pack(">I", 3) + b"\xc1\xc1\xc1", p.E_BAD_MSGPACK, True),
    ("two objects in one body", struct.pack(">I", 2) + b"\x01\x02", p.E_BAD_MSGPACK, True),
    ("not a map", body([1, 2, 3]), p.E_NOT_A_MAP, True),
    ("unknown type", body({"type": "selfie"}), p.E_UNKNOWN_TYPE, True),
    ("frame_id wrong type", body({**GOOD, "frame_id": "7"}), p.E_INVALID, True),
    ("image not bytes", body({**GOOD, "image": "abc"}), p.E_INVALID, True),
    ("bad stream name", body({**GOOD, "stream_name": "../etc"}), p.E_BAD_STREAM_NAME, True),
    ("stream name too long", body({**GOOD, "stream_name": "a" * 65}), p.E_BAD_STREAM_NAME, True),
    ("unknown encoding", body({**GOOD, "encoding": "gif"}), p.E_INVALID, True),
    ("raw without shape", body({**GOOD, "encoding": "raw"}), p.E_INVALID, True),
    ("raw size mismatch", body({**GOOD, "encoding": "raw", "shape": [2, 2, 3]}), p.E_INVALID, True),
    ("undecodable image", body({**GOOD, "image": b"\xff\xd8garbage"}), p.E_DECODE, True),
    ("bad hello version", body({"type": "hello", "version": 99}), p.E_BAD_VERSION, False),
    ("deeply nested", struct.pack(">I", 3001) + b"\x91" * 3000 + b"\x00", p.E_BAD_MSGPACK, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "data", "code", "stays_open"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(case: str, data: bytes, code: str, stays_open: bool) -> None:
    """The bad message gets its documented error; a neighbour connection is not disturbed."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            bad = await connect(d, hello=False)
            bad.writer.write(data)
            msg = await asyncio.wait_for(bad.recv(), 5)
            assert msg is not None and msg["type"] == "error" and msg["code"] == code, msg
            assert isinstance(msg["message"], str) and msg["message"]
            assert stats(d)["errors"].get(code, 0) >= 1
            if stays_open:  # the same connection still works
                await bad.send_frame("bad-ok", 5, SMALL_IMG)
                reply = await asyncio.wait_for(bad.recv(), 5)
                assert reply is not None and reply["type"] == "result" and reply["frame_id"] == 5
            else:
                assert await asyncio.wait_for(bad.recv(), 5) is None  # closed by the server
            await good.send_frame("good", 1, SMALL_IMG)
            out = await collect(good, 1)
            assert out[0]["type"] == "result" and out[0]["frame_id"] == 1

    run(scenario())


@pytest.mark.slow
def test_token_required_refuses_legacy_and_wrong_token() -> None:
    """With auth_token set, a legacy frame or a wrong token gets 'unauthorized' and a close."""

    async def scenario() -> None:
        async with running_daemon(auth_token="s3cret") as d:
            legacy = await connect(d, hello=False)
            await legacy.send(GOOD)
            msg = await legacy.recv()
            assert msg is not None and msg["code"] == p.E_UNAUTHORIZED
            assert await legacy.recv() is None
            from clients.lib import ClientError

            with pytest.raises(ClientError, match="unauthorized"):
                await connect(d, token="wrong")
            ok = await connect(d, token="s3cret")
            await ok.send(GOOD)
            assert (await collect(ok, 1))[0]["type"] == "result"

    run(scenario())


@pytest.mark.slow
def test_stream_limits_refuse_with_error() -> None:
    """A stream over max_streams_per_connection is refused with limit_exceeded, counted as refused."""

    async def scenario() -> None:
        async with running_daemon(max_streams_per_connection=2) as d:
            c = await connect(d)
            for name in ("a", "b", "c"):
                await c.send_frame(name, 1, SMALL_IMG)
            out = await collect(c, 3)
            errors = [m for m in out if m["type"] == "error"]
            assert len(errors) == 1 and errors[0]["code"] == p.E_LIMIT
            assert stats(d)["totals"]["dropped_by_reason"]["refused"] == 1
            assert set(stats(d)["streams"]) == {"a", "b"}

    run(scenario())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_random_bodies_only_raise_protocol_errors(data: bytes) -> None:
    """Any body either parses into a message or raises ProtocolError: nothing else escapes."""
    try:
        p.parse_message(p.unpack_body(data))
    except p.ProtocolError as exc:
        assert exc.code and exc.message


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "type",
                "stream_name",
                "frame_id",
                "timestamp",
                "image",
                "encoding",
                "shape",
                "version",
                "options",
                "streams",
            ]
        ),
        values,
        max_size=8,
    ),
    st.sampled_from(["frame", "hello", "bye", None]),
)
def test_wrong_typed_fields_only_raise_protocol_errors(
    obj: dict[str, Any], mtype: str | None
) -> None:
    """Maps with any mix of field types are validated without any exception but ProtocolError."""
    if mtype is not None:
        obj["type"] = mtype
    try:
        p.parse_message(p.unpack_body(pack(obj)[4:]))
    except p.ProtocolError as exc:
        assert exc.code


def test_length_header_checks() -> None:
    """The length header rejects 0 and anything above max_message_bytes, fatally."""
    assert p.read_length(struct.pack(">I", 10), 10) == 10
    for n in (0, 11):
        with pytest.raises(p.ProtocolError) as info:
            p.read_length(struct.pack(">I", n), 10)
        assert info.value.fatal


IMG = jpeg(96, 128)


@pytest.mark.slow
def test_unknown_type_error_does_not_echo_the_clients_value() -> None:
    """A 1000-character `type` gets unknown_type with a short message that does not repeat it."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            echo = await connect(d)
            await echo.send({"type": "X" * 1000})
            (err,) = await collect(echo, 1, timeout=5)
            assert err["code"] == "unknown_type", err
            assert "X" * 64 not in err["message"] and len(err["message"]) <= 200, err["message"]
            await round_trip(echo, "cam", 1)  # the connection stays usable
            await round_trip(good, "good", 0)

    run(scenario())


@pytest.mark.slow
def test_huge_hello_streams_map_and_huge_msgpack_counts_are_refused() -> None:
    """A hello naming 100,000 streams is refused; array/map count headers of 2**32-1 are limit_exceeded."""

    async def scenario() -> None:
        async with running_daemon() as d:
            good = await connect(d)
            await round_trip(good, "good", 0)
            for i, prefix in enumerate((b"\xdd", b"\xdf"), start=1):  # array32 / map32
                bad = await connect(d, hello=False)
                t0 = time.monotonic()
                body = prefix + b"\xff\xff\xff\xff"
                bad.writer.write(struct.pack(">I", len(body)) + body)
                (err,) = await collect(bad, 1, timeout=5)
                assert err["code"] == "limit_exceeded" and time.monotonic() - t0 < 1, err
                await round_trip(good, "good", i, timeout=2)
            huge = await connect(d, hello=False)
            streams = {f"s{i}": {} for i in range(100_000)}
            await huge.send({"type": "hello", "version": 1, "streams": streams})
            (reply,) = await collect(huge, 1, timeout=10)
            assert reply["type"] == "error", f"a 100,000-stream hello got {reply['type']!r}"
            assert reply["code"] in ("limit_exceeded", "invalid"), reply
            for i in range(3, 8):
                await round_trip(good, "good", i, timeout=2)

    run(scenario())


@pytest.mark.slow
def test_stream_name_with_a_trailing_newline_is_refused() -> None:
    """'cam\\n' slips past a `$`-anchored pattern: it must be bad_stream_name."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            good = await connect(d)
            c = await connect(d)
            await c.send_frame("cam\n", 1, IMG)
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "error" and msg["code"] == "bad_stream_name", msg
            await round_trip(good, "good", 0)
            stats = await settled_stats(h, min_received=2)
            assert "cam\n" not in stats["streams"]

    run(scenario())


@pytest.mark.slow
def test_non_finite_timestamps_are_refused_or_replaced() -> None:
    """A frame timestamp of NaN or inf is refused as invalid or replaced by a finite number."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            c = await connect(d)
            for i, ts in enumerate((math.nan, math.inf, -math.inf)):
                await c.send_frame("cam", i, IMG, timestamp=ts)
                (msg,) = await collect(c, 1, timeout=5)
                if msg["type"] == "error":
                    assert msg["code"] == "invalid" and msg["frame_id"] == i, msg
                else:
                    assert msg["type"] == "result" and math.isfinite(msg["timestamp"]), (ts, msg)
            await round_trip(c, "cam", 10)
            await settled_stats(h, min_received=4)

    run(scenario())


@pytest.mark.slow
def test_hello_with_skip_frames_zero_is_invalid() -> None:
    """skip_frames must be >= 1: 0 in `options` or in a stream's options is refused as invalid."""

    async def scenario() -> None:
        async with running_daemon() as d:
            for hello in (
                {"options": {"skip_frames": 0}},
                {"streams": {"cam": {"skip_frames": 0}}},
            ):
                c = await connect(d, hello=False)
                await c.send({"type": "hello", "version": 1, **hello})
                (msg,) = await collect(c, 1, timeout=5)
                assert msg["type"] == "error" and msg["code"] == "invalid", (hello, msg)
            good = await connect(d)
            await round_trip(good, "good", 0)

    run(scenario())


@pytest.mark.slow
def test_frame_with_nil_timestamp_is_accepted() -> None:
    """`timestamp` is optional, so an explicit nil means 'not given': the frame gets a result."""

    async def scenario() -> None:
        async with running_daemon() as d, api(d) as h:
            c = await connect(d)
            await c.send(
                {
                    "type": "frame",
                    "stream_name": "cam",
                    "frame_id": 1,
                    "timestamp": None,
                    "image": IMG,
                }
            )
            (msg,) = await collect(c, 1, timeout=5)
            assert msg["type"] == "result" and msg["frame_id"] == 1, msg
            await round_trip(c, "cam", 2)
            await settled_stats(h, min_received=2)

    run(scenario())


@pytest.mark.slow
def test_a_peer_that_reads_its_replies_is_never_slow_consumer() -> None:
    """300 bad messages in one write, replies read: 300 errors, no slow_consumer, still open."""

    async def scenario() -> None:
        async with running_daemon() as d:
            c = await connect(d)
            c.writer.write(b"\x00\x00\x00\x01\x01" * 300)  # 300 bodies that are not maps
            replies = await collect(c, 300, timeout=10)
            assert {m["code"] for m in replies} == {"not_a_map"}, replies[-3:]
            await round_trip(c, "still-open", 0)

    run(scenario())


def frame_of_size(n: int) -> bytes:
    """A frame message whose body is exactly n bytes (a JPEG with padding after its end)."""
    base = {"type": "frame", "stream_name": "cam", "frame_id": 1, "image": IMG}
    pad = n - len(msgpack.packb(base, use_bin_type=True))
    body = msgpack.packb({**base, "image": IMG + b"\0" * pad}, use_bin_type=True)
    assert len(body) == n
    return struct.pack(">I", n) + body


@pytest.mark.slow
def test_max_message_bytes_edge() -> None:
    """A message of exactly max_message_bytes is processed; one byte more is message_too_large."""

    async def scenario() -> None:
        async with running_daemon(max_message_bytes=8192) as d:
            c = await connect(d, hello=False)
            c.writer.write(frame_of_size(8192))
            assert (await collect(c, 1))[0]["type"] == "result"
            c.writer.write(frame_of_size(8193))
            (err,) = await collect(c, 1)
            assert err["code"] == p.E_TOO_LARGE
            assert await asyncio.wait_for(c.recv(), 5) is None  # framing lost: closed

    run(scenario())


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


@pytest.mark.slow
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
