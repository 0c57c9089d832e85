"""Shared-memory ingest without sockets: the hello's and the frame's validation, and the slot
ownership of `ShmRing` (daemon side) and `ShmSlots` (client side) as invariants."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.transports import ShmSlots
from vision_daemon import protocol as p
from vision_daemon.ingest.shm import ShmRing

TOKEN = b"t" * 16


def hello(**shm: Any) -> dict[str, Any]:
    ring = {"name": "vd-test", "slots": 4, "slot_bytes": 64, "token": TOKEN, **shm}
    return {"type": "hello", "version": 1, "client": "unit", "shm": ring}


def shm_frame(**fields: Any) -> dict[str, Any]:
    msg = {"type": "frame", "stream_name": "s", "frame_id": 7, "encoding": "shm"}
    return {**msg, "slot": 0, "shape": [2, 3, 3], **fields}


def refusal(msg: dict[str, Any]) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message(msg)
    return err.value


def test_a_valid_shm_hello_and_frame_parse_into_a_ring_and_a_slot() -> None:
    """The hello's shm map becomes a ShmRing (size = header + slots); the frame keeps slot and shape."""
    msg = p.parse_message(hello())
    assert isinstance(msg, p.Hello) and msg.shm == p.ShmRing("vd-test", 4, 64, TOKEN)
    assert msg.shm.size == p.SHM_HEADER_BYTES + 4 * 64
    frame = p.parse_message(shm_frame(slot=3))
    assert isinstance(frame, p.Frame)
    assert (frame.encoding, frame.slot, frame.shape, frame.image) == ("shm", 3, (2, 3, 3), b"")
    plain = p.parse_message({"type": "hello", "version": 1})
    assert isinstance(plain, p.Hello) and plain.shm is None


@pytest.mark.parametrize(
    "name", ["../etc/passwd", ".hidden", "a/b", "", "x" * 129, "sp ace", "nul\x00", 7, None]
)
def test_shm_names_that_are_not_a_plain_dev_shm_entry_are_fatal_shm_errors(name: Any) -> None:
    """A path, a dot file, an empty or over-long name or a non-string is shm_error and fatal."""
    err = refusal(hello(name=name))
    assert (err.code, err.fatal) == (p.E_SHM, True)


@pytest.mark.parametrize("slots", [0, -1, p.MAX_SHM_SLOTS + 1, True, 2.0, "4"])
def test_slot_counts_outside_1_to_256_are_refused(slots: Any) -> None:
    """slots must be an integer in 1..256 (not a bool, float or string)."""
    err = refusal(hello(slots=slots))
    assert (err.code, err.fatal) == (p.E_SHM, True)
    for ok in (1, p.MAX_SHM_SLOTS):
        msg = p.parse_message(hello(slots=ok))
        assert isinstance(msg, p.Hello) and msg.shm is not None and msg.shm.slots == ok


@pytest.mark.parametrize(
    "field", [{"token": b"short"}, {"token": b"x" * 17}, {"token": "t" * 16}, {"slot_bytes": 0}]
)
def test_tokens_not_16_bytes_and_empty_slots_are_refused(field: dict[str, Any]) -> None:
    """The token is exactly 16 bytes of msgpack bin (a 16-char str is not); slot_bytes >= 1."""
    err = refusal(hello(**field))
    assert (err.code, err.fatal) == (p.E_SHM, True)


def test_an_shm_map_that_is_not_a_map_is_refused() -> None:
    """hello shm = a list or a string is shm_error, fatal."""
    for bad in ([1, 2], "vd-test"):
        err = refusal({"type": "hello", "version": 1, "shm": bad})
        assert (err.code, err.fatal) == (p.E_SHM, True)


@pytest.mark.parametrize(
    "fields",
    [
        {"slot": None},
        {"slot": "0"},
        {"slot": True},
        {"shape": None},
        {"shape": [2, 3]},
        {"shape": [2, 3, 4]},
        {"shape": [0, 3, 3]},
        {"shape": [2, -3, 3]},
        {"shape": [2.0, 3, 3]},
    ],
)
def test_shm_frames_without_a_slot_or_with_a_bad_shape_are_invalid_frames(
    fields: dict[str, Any],
) -> None:
    """A missing or non-integer slot, or a shape that is not [h>0, w>0, 3], is `invalid` with the
    frame id (a refused frame, counted as such; nothing was read from a slot)."""
    err = refusal(shm_frame(**fields))
    assert (err.code, err.frame_id) == (p.E_INVALID, 7)


# ---- slot ownership -----------------------------------------------------------------------------


@pytest.fixture
def slots() -> Iterator[ShmSlots]:
    ring = ShmSlots(4, 2 * 3 * 3)
    try:
        yield ring
    finally:
        ring.close()


def ring_of(s: ShmSlots) -> p.ShmRing:
    return p.ShmRing(s.mem.name, s.slots, s.slot_bytes, s.token)


def frame(slot: int, frame_id: int, shape: tuple[int, int, int] = (2, 3, 3)) -> p.Frame:
    return p.Frame("s", frame_id, 0.0, b"", "shm", shape, slot=slot)


def test_ring_maps_a_client_segment_and_hands_out_read_only_views_of_a_slot(
    slots: ShmSlots,
) -> None:
    """A view is the slot's bytes in place, read-only, and sees what the client writes."""
    ring = ShmRing(ring_of(slots), 2**20)
    try:
        slots.write(2, np.arange(18, dtype=np.uint8).reshape(2, 3, 3))
        f = ring.frame(frame(2, 1))
        assert f.encoding == "shm" and f.slot == 2 and f.pixels.flags.writeable is False
        assert f.pixels.tobytes() == bytes(range(18)) and f.nbytes == 18
        with pytest.raises(ValueError):
            f.pixels[0, 0, 0] = 1
        del f
    finally:
        ring.close()


def test_ring_refuses_a_token_that_is_not_the_segments_and_a_ring_over_the_cap(
    slots: ShmSlots,
) -> None:
    """Another token (someone else's segment) or a ring larger than max_bytes is shm_error."""
    for ring, cap in (
        (p.ShmRing(slots.mem.name, 4, 18, b"z" * 16), 2**20),
        (ring_of(slots), p.SHM_HEADER_BYTES + 4 * 18 - 1),
        (p.ShmRing(slots.mem.name, 4, 2**20, slots.token), 2**30),  # more than the file holds
    ):
        with pytest.raises(p.ProtocolError) as err:
            ShmRing(ring, cap)
        assert (err.value.code, err.value.fatal) == (p.E_SHM, True)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), st.integers(-1, 4), st.integers(0, 5)),
        st.tuples(st.just("release"), st.integers(0, 5), st.just(0)),
    ),
    max_size=40,
)


@given(ops=OPS)
def test_ring_holds_a_slot_from_its_frame_until_its_release_and_refuses_every_reuse(
    ops: list[tuple[str, int, int]],
) -> None:
    """For any order of frames and releases: a frame is refused exactly when its slot is out of
    range, its slot is held or its frame id is in flight; held and slot_of stay each other's
    inverse; a refusal changes nothing."""
    client = ShmSlots(4, 18)
    ring = ShmRing(ring_of(client), 2**20)
    model: dict[int, int] = {}  # slot -> frame_id, what the daemon should hold
    try:
        for op, a, b in ops:
            if op == "release":
                ring.release("s", a)
                model = {s: f for s, f in model.items() if f != a}
            else:
                lie = not 0 <= a < 4 or a in model or b in model.values()
                if lie:
                    with pytest.raises(p.ProtocolError) as err:
                        ring.frame(frame(a, b))
                    assert err.value.code == p.E_SHM and err.value.fatal
                else:
                    ring.frame(frame(a, b))
                    model[a] = b
            assert {s: f for s, (_, f) in ring.held.items()} == model
            assert {v: k for k, v in ring.held.items()} == ring.slot_of
    finally:
        ring.close()
        client.close()


def test_ring_refuses_a_shape_larger_than_a_slot_and_a_segment_that_shrank(
    slots: ShmSlots,
) -> None:
    """shape [2, 3, 3] fits an 18-byte slot, [2, 4, 3] does not; after a shrink no frame is read."""
    ring = ShmRing(ring_of(slots), 2**20)
    try:
        with pytest.raises(p.ProtocolError, match="needs 24 bytes"):
            ring.frame(frame(0, 1, (2, 4, 3)))
        os.truncate(f"/dev/shm/{slots.mem.name}", p.SHM_HEADER_BYTES)
        with pytest.raises(p.ProtocolError, match="shrank"):
            ring.frame(frame(0, 1))
        assert ring.held == {} and ring.slot_of == {}
    finally:
        ring.close()


@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(0, 20)),
            st.tuples(st.sampled_from(["result", "dropped", "error"]), st.integers(0, 20)),
            st.tuples(st.just("reset"), st.just(0)),
        ),
        max_size=40,
    )
)
def test_client_slots_are_free_or_held_never_both(events: list[tuple[str, int]]) -> None:
    """ShmSlots: every slot is either free or held by one frame; a result, a dropped notice or an
    error naming a held frame frees its slot once; reset frees all."""
    client = ShmSlots(3, 8)
    try:
        for kind, fid in events:
            if kind == "send":
                if not client.free or ("s", fid) in client.held:
                    continue
                client.hand_over("s", fid, client.free.popleft())
            elif kind == "reset":
                client.reset()
            else:
                msg = {"type": kind, "frame_id": fid}
                if kind != "error":
                    msg["stream_name"] = "s"
                client.release(msg)
                assert ("s", fid) not in client.held
            held = list(client.held.values())
            assert sorted([*client.free, *held]) == [0, 1, 2]
    finally:
        client.close()
