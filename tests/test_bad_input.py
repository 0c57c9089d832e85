"""Each row of docs/PROTOCOL.md's bad-input table: the error, whether the connection survives,
and that a well-behaved client beside it keeps getting results."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.lib import pack
from tests.conftest import (
    collect,
    connect,
    connections,
    jpeg,
    run,
    running_daemon,
    stats,
    stream_stats,
    until,
)
from vision_daemon import protocol as p

IMG = jpeg(64, 64)
GOOD = {"type": "frame", "stream_name": "cam", "frame_id": 1, "timestamp": 0.0, "image": IMG}


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
                await bad.send_frame("bad-ok", 5, IMG)
                reply = await asyncio.wait_for(bad.recv(), 5)
                assert reply is not None and reply["type"] == "result" and reply["frame_id"] == 5
            else:
                assert await asyncio.wait_for(bad.recv(), 5) is None  # closed by the server
            await good.send_frame("good", 1, IMG)
            out = await collect(good, 1)
            assert out[0]["type"] == "result" and out[0]["frame_id"] == 1

    run(scenario())


@pytest.mark.slow
def test_oversized_image_refused_from_header() -> None:
    """An image whose header declares more pixels than max_image_pixels is refused as image_too_large."""

    async def scenario() -> None:
        async with running_daemon(max_image_pixels=64 * 64) as d:
            c = await connect(d, dropped_notices=True)
            await c.send_frame("cam", 1, jpeg(64, 65))
            out = await collect(c, 2)
            assert {m["type"] for m in out} == {"error", "dropped"}
            err = next(m for m in out if m["type"] == "error")
            assert err["code"] == p.E_IMAGE_TOO_LARGE and err["frame_id"] == 1
            await c.send_frame("cam", 2, jpeg(64, 64))  # just at the limit passes
            ok = await collect(c, 1)
            assert ok[0]["type"] == "result"
            assert stream_stats(d, "cam")["dropped_by_reason"]["invalid"] == 1

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
                await c.send_frame(name, 1, IMG)
            out = await collect(c, 3)
            errors = [m for m in out if m["type"] == "error"]
            assert len(errors) == 1 and errors[0]["code"] == p.E_LIMIT
            assert stats(d)["totals"]["dropped_by_reason"]["refused"] == 1
            assert set(stats(d)["streams"]) == {"a", "b"}

    run(scenario())


@pytest.mark.slow
def test_hello_timeout_closes_stalled_connection() -> None:
    """A peer that sends half a length prefix and stalls is closed after hello_timeout_s."""

    async def scenario() -> None:
        async with running_daemon(hello_timeout_s=0.3) as d:
            c = await connect(d, hello=False)
            c.writer.write(b"\x00\x00")
            msg = await asyncio.wait_for(c.recv(), 5)
            assert msg is not None and msg["code"] == p.E_HELLO_TIMEOUT
            await until(
                lambda: not connections(d),
                what="connection released",
            )

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
