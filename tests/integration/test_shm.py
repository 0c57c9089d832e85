"""Shared-memory frames with real rings in /dev/shm, real sockets and real second processes: round
trips, pixels read in place, slot ownership, a client killed while the daemon holds its slots,
every lie a client can tell, WebSocket refusal, vision-client's transports and a real model."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from ultralytics.utils import ASSETS

from clients.lib import DaemonClient, hello_message
from clients.transports import ShmSlots, WsDaemonClient, open_client
from tests.conftest import (
    MODEL_DIR,
    ROOT,
    SpawnDaemon,
    accounted,
    api,
    collect,
    poll_stats,
    run,
    running_daemon,
    shared_model,
    stats,
    stream_stats,
    wait_for,
)
from tests.e2e.test_clients import program
from tests.integration.test_ws_ingest import closed_with, pack, recv_bin, ws_connect
from vision_daemon.detectors.base import Detection, Image, ModelInfo
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, shared memory, subprocesses and models

H, W = 48, 64
SLOT = H * W * 3
SHAPE = (H, W, 3)


def image(value: int, h: int = H, w: int = W) -> np.ndarray:
    """A distinct BGR image per value: a gradient, not a flat colour, so a shifted read shows."""
    ramp = (np.arange(h * w * 3, dtype=np.uint32) * 7 + value * 31) % 251
    return ramp.astype(np.uint8).reshape(h, w, 3)


def digest(img: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def held_open(name: str) -> bool:
    """Whether the daemon (it runs in this process) holds /dev/shm/<name> open: it keeps a
    read-only descriptor of a client's segment while the connection lives, and never maps it."""
    path = f"/dev/shm/{name}"
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.removesuffix(" (deleted)") != path:
            continue
        flags = Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        if int(flags, 8) & os.O_ACCMODE == os.O_RDONLY:  # the client's own is read-write
            return True
    return False


def in_dev_shm(name: str) -> bool:
    return os.path.lexists(f"/dev/shm/{name}")


class RecordingDetector:
    """A detector the test controls: records each image's digest, shape, data address and
    writability; waits on `hang` (when given and not set) before answering `only`'s images."""

    def __init__(
        self, hang: threading.Event | None = None, only: Callable[[Any], bool] | None = None
    ) -> None:
        self.info = ModelInfo(name="recording-test", backend="fake", device="cpu", imgsz=0)
        self.hang = hang
        self.only = only  # which images wait on `hang` (default: every image)
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def warmup(self) -> None:
        return None

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        with self.lock:
            for img in images:
                self.seen.append(
                    {
                        "digest": digest(img),
                        "shape": tuple(img.shape),
                        "address": img.__array_interface__["data"][0],
                        "writeable": bool(img.flags.writeable),
                    }
                )
        held = self.only is None or any(self.only(img) for img in images)
        if self.hang is not None and held and not self.hang.is_set():
            self.hang.wait(30)
        box = Detection(label="thing", conf=0.9, bbox=[1.0, 2.0, 3.0, 4.0], class_id=0)
        return [[box] for _ in images]


@contextlib.asynccontextmanager
async def daemon_with(
    tmp_path: Path, detector: RecordingDetector | None = None, **overrides: Any
) -> Any:
    """A daemon with a Unix socket and (unless overridden) one worker running `detector`; its
    hang is released on the way out, so shutdown never waits on it."""
    det = detector or RecordingDetector()
    # fifo: these tests follow every frame a slot carries (latest would supersede queued ones)
    settings: dict[str, Any] = {
        "unix_socket": str(tmp_path / "d.sock"),
        "workers": 1,
        "serve_default": "fifo",
    }
    try:
        async with running_daemon(lambda: det, **{**settings, **overrides}) as d:
            yield d
    finally:
        if det.hang is not None:
            det.hang.set()


def figure(d: Daemon, stream: str, key: str) -> int:
    """One stream's counter in a fresh snapshot; 0 while the daemon does not know the stream."""
    return int(stats(d)["streams"].get(stream, {}).get(key, 0))


def sock(d: Daemon) -> str:
    assert d.config.unix_socket
    return d.config.unix_socket


async def shm_client(d: Daemon, *, over: str = "unix", slots: int = 4, **hello: Any) -> Any:
    """A client with its own ring, over the Unix socket or loopback TCP."""
    where = {"unix_socket": sock(d)} if over == "unix" else {"port": d.tcp_port}
    return await open_client("shm", shm_slots=slots, slot_bytes=SLOT, **where, **hello)


async def round_trip(c: Any, stream: str, values: Sequence[int], first_id: int = 0) -> list[Any]:
    """Send one frame at a time through the ring and wait for what ends it."""
    out: list[dict[str, Any]] = []
    for i, v in enumerate(values):
        img = image(v)
        await c.send_image(stream, first_id + i, img, "raw", img.shape)
        out += await collect(c, 1)
    return out


async def serves_a_fresh_client(d: Daemon, stream: str = "fresh") -> None:
    """A new shared-memory client still gets results (the daemon survived what came before)."""
    c = await shm_client(d)
    try:
        msgs = await round_trip(c, stream, [1, 2])
        assert [(m["type"], m["frame_id"]) for m in msgs] == [("result", 0), ("result", 1)]
    finally:
        await c.close()


async def raw_client(d: Daemon, over: str = "unix") -> DaemonClient:
    """A connection that has sent nothing yet (the test writes every message itself)."""
    if over == "unix":
        return await DaemonClient.connect(unix_socket=sock(d), hello=False)
    return await DaemonClient.connect("127.0.0.1", d.tcp_port or 0, hello=False)


async def refused(c: DaemonClient, timeout: float = 10.0) -> dict[str, Any]:
    """Read up to the daemon's error; then the connection must be closed (recv gives None)."""
    async with asyncio.timeout(timeout):
        while (msg := await c.recv()) is not None:
            if msg["type"] == "error":
                assert await c.recv() is None, "the connection stayed open after the error"
                return msg
            assert msg["type"] == "welcome", msg
    raise AssertionError("the daemon closed without an error")


def shm_frame(frame_id: int, slot: int, shape: Sequence[int] = SHAPE, stream: str = "liar") -> Any:
    msg = {"type": "frame", "stream_name": stream, "frame_id": frame_id, "encoding": "shm"}
    return {**msg, "slot": slot, "shape": list(shape)}


@pytest.fixture
def ring() -> Iterator[ShmSlots]:
    """A well-formed 2-slot ring the test announces or tampers with (removed afterwards)."""
    r = ShmSlots(2, SLOT)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """What a test creates in /dev/shm besides its ring (names, or ShmSlots); removed after."""
    things: list[Any] = []
    try:
        yield things
    finally:
        for thing in things:
            if isinstance(thing, ShmSlots):
                thing.close()
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{thing}")


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_round_trip_over_the_unix_socket_and_loopback_tcp(tmp_path: Path, over: str) -> None:
    """12 frames pipelined through a 4-slot ring each get their result, and the detector saw
    each frame's own pixels (no slot rewritten while held); GET /stats counts the ring while
    connected and not after; every frame is accounted for."""

    async def main() -> None:
        det = RecordingDetector()
        async with (
            daemon_with(tmp_path, det, queue_depth=8) as d,
            api(d) as h,
        ):
            c = await shm_client(d, over=over, slots=4)
            name = c.shm.mem.name
            assert held_open(name)
            s = await poll_stats(h, lambda s: s["connections"]["shm_rings"] == 1)
            assert s["connections"]["shm_mapped_bytes"] == 4096 + 4 * SLOT

            async def send() -> None:
                for i in range(12):
                    img = image(i)
                    await c.send_image("ring", i, img, "raw", img.shape)

            sender = asyncio.create_task(send())
            msgs = await collect(c, 12)
            await sender
            assert [(m["type"], m["frame_id"]) for m in msgs] == [("result", i) for i in range(12)]
            assert {m["stream_name"] for m in msgs} == {"ring"}
            assert [x["digest"] for x in det.seen] == [digest(image(i)) for i in range(12)]
            assert len(c.shm.free) == 4 and not c.shm.held  # every slot came back
            await c.bye()
            s = await poll_stats(h, lambda s: s["connections"]["shm_rings"] == 0)
            assert s["connections"]["shm_mapped_bytes"] == 0
            await wait_for(lambda: not held_open(name), what="mapping gone")
            assert not in_dev_shm(name)  # the client removed its segment
            assert stream_stats(d, "ring")["processed"] == 12 and accounted(d)

    run(main())


def test_pixels_are_read_once_read_only_and_exactly_as_written(tmp_path: Path) -> None:
    """The detector gets each frame's own pixels (digest and shape) as a read-only array the
    daemon read from the slot when the frame arrived (issue 27: never a view of the segment,
    which a client could truncate under a worker)."""

    async def main() -> None:
        det = RecordingDetector()
        async with daemon_with(tmp_path, det) as d:
            c = await shm_client(d, slots=3)
            sent = [image(v) for v in (0, 1, 2, 3, 4, 5)]
            sent.append(image(9, 20, 30))  # smaller than a slot: only its bytes are read
            for i, img in enumerate(sent):
                await c.send_image("px", i, img, "raw", img.shape)
                (msg,) = await collect(c, 1)
                assert (msg["type"], msg["frame_id"]) == ("result", i)
            assert [s["digest"] for s in det.seen] == [digest(img) for img in sent]
            assert [s["shape"] for s in det.seen] == [img.shape for img in sent]
            assert all(s["writeable"] is False for s in det.seen)
            await c.close()

    run(main())


def test_a_one_slot_ring_is_reused_after_each_result_or_dropped_notice(tmp_path: Path) -> None:
    """Over one slot, 20 frames all succeed one after another; with skip_frames=2 the skipped
    frames' dropped notices (forced on for shm, though the hello did not ask) free the slot too."""

    async def main() -> None:
        async with daemon_with(tmp_path) as d:
            c = await shm_client(d, slots=1)
            msgs = await round_trip(c, "one", range(20))
            assert [(m["type"], m["frame_id"]) for m in msgs] == [("result", i) for i in range(20)]
            await c.close()
            c = await shm_client(d, slots=1, options={"skip_frames": 2})
            msgs = await round_trip(c, "skip", range(10))
            assert [m["type"] for m in msgs] == ["result", "dropped"] * 5
            assert [m["frame_id"] for m in msgs] == list(range(10))
            await c.bye()
            await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 0)
            assert stream_stats(d, "skip")["dropped_by_reason"]["skipped"] == 5
            assert accounted(d)

    run(main())


async def lie_while_held(
    d: Daemon, hang: threading.Event, second: dict[str, Any], reason: str, by: Any, first_id: int
) -> None:
    """Frame 0 of stream "held" sits in the detector; `second` must be refused, the bystander
    `by` still gets results meanwhile, and slot 0 stays mapped until frame 0 is done."""
    r = ShmSlots(2, SLOT)
    name = r.mem.name
    try:
        c = await DaemonClient.connect(unix_socket=sock(d), shm=r)
        r.write(0, image(0))
        await c.send(shm_frame(0, 0, stream="held"))
        await wait_for(lambda: figure(d, "held", "in_flight") == 1, what="frame 0 in the detector")
        await c.send(second)
        err = await refused(c)
        assert (err["code"], err["frame_id"]) == ("shm_error", second["frame_id"]), err
        assert reason in err["message"], err
        await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 1)  # the bystander's
        # closed at once: the worker reads frame 0's own copy, not the segment
        await wait_for(lambda: not held_open(name), what="segment closed")
        msgs = await round_trip(by, "bystander", [1, 2], first_id)  # served by the other worker
        assert [m["type"] for m in msgs] == ["result", "result"]
        assert figure(d, "held", "in_flight") == 1 and not hang.is_set()
        hang.set()
        await wait_for(lambda: figure(d, "held", "in_flight") == 0)
        await wait_for(lambda: not held_open(name), what="unmapped once frame 0 was done")
        hang.clear()
    finally:
        r.close()


def test_a_slot_or_frame_the_daemon_holds_may_not_be_sent_again(tmp_path: Path) -> None:
    """While frame 0 is in the detector, naming its slot for another frame, or sending frame 0
    again in another slot, is shm_error and closes that connection; a bystander on the other
    worker keeps getting results meanwhile."""

    async def main() -> None:
        hang = threading.Event()
        det = RecordingDetector(hang, only=lambda img: img[0, 0, 0] == 0)  # image(0) hangs
        async with daemon_with(tmp_path, det, workers=2, queue_depth=4) as d:
            by = await shm_client(d)
            slot_again, frame_again = shm_frame(1, 0, stream="held"), shm_frame(0, 1, stream="held")
            await lie_while_held(d, hang, slot_again, "slot 0 is still the daemon's", by, 0)
            await lie_while_held(d, hang, frame_again, "already in flight", by, 2)
            await by.close()
            s = stream_stats(d, "held")
            assert (s["received"], s["processed"]) == (2, 2)  # frame 0 twice; the lies: invalid
            assert stats(d)["totals"]["dropped_by_reason"]["invalid"] == 2
            assert accounted(d)

    run(main())


# ---- a real second process ----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from clients.lib import DaemonClient
    from clients.transports import ShmSlots

    async def main(path: str, frames: int, hold: bool) -> None:
        ring = ShmSlots(2, 48 * 64 * 3)
        c = await DaemonClient.connect(unix_socket=path, shm=ring, client_name="child")
        print(json.dumps({"name": ring.mem.name}), flush=True)
        if hold:  # both slots handed to the daemon, then wait to be killed
            for i in range(2):
                img = np.full((48, 64, 3), i, np.uint8)
                await c.send_image("child", i, img, "raw", img.shape)
            print(json.dumps({"holding": 2}), flush=True)
            await asyncio.Event().wait()
        answered = []
        for i in range(frames):
            img = np.full((48, 64, 3), i % 256, np.uint8)
            await c.send_image("child", i, img, "raw", img.shape)
            msg = await c.recv()
            answered.append([msg["type"], msg["frame_id"]])
        await c.bye()
        print(json.dumps({"answered": answered}), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"))
    """
)


async def child(tmp_path: Path, d: Daemon, frames: int, hold: bool) -> Any:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        sock(d),
        str(frames),
        "hold" if hold else "run",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def line(proc: Any, timeout: float = 20.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert raw, f"the child ended: {(await proc.stderr.read()).decode()[-2000:]}"
    msg: dict[str, Any] = json.loads(raw)
    return msg


def test_a_second_process_streams_through_its_ring(tmp_path: Path) -> None:
    """A separate process creates its ring, connects over the Unix socket, streams 30 frames
    and gets 30 results in order; its segment is gone when it exits."""

    async def main() -> None:
        det = RecordingDetector()
        async with daemon_with(tmp_path, det) as d:
            proc = await child(tmp_path, d, 30, hold=False)
            name = (await line(proc))["name"]
            answered = (await line(proc))["answered"]
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            assert answered == [["result", i] for i in range(30)]
            full = [np.full(SHAPE, i, np.uint8) for i in range(30)]
            assert [s["digest"] for s in det.seen] == [digest(img) for img in full]
            await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 0)
            await wait_for(lambda: not held_open(name), what="child's segment unmapped")
            assert not in_dev_shm(name)
            assert accounted(d)

    run(main())


def test_a_client_killed_while_the_daemon_holds_its_slots(tmp_path: Path) -> None:
    """SIGKILL a process whose two slots the daemon holds (one in the detector, one queued): its
    connection closes, the queued frame drops, the mapping outlives the frame being read and
    goes once it is done, and another client still gets results."""

    async def main() -> None:
        hang = threading.Event()
        det = RecordingDetector(hang)
        name = ""
        async with daemon_with(tmp_path, det, queue_depth=4) as d:
            proc = await child(tmp_path, d, 0, hold=True)
            try:
                name = (await line(proc))["name"]
                assert (await line(proc))["holding"] == 2
                await wait_for(
                    lambda: (
                        figure(d, "child", "in_flight") == 1
                        and figure(d, "child", "queue_depth") == 1
                    ),
                    what="one frame in the detector, one queued",
                )
                assert stats(d)["connections"]["shm_rings"] == 1 and held_open(name)
                proc.send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
                await wait_for(
                    lambda: stats(d)["connections"]["open"] == 0, what="connection closed"
                )
                assert stats(d)["connections"]["shm_rings"] == 0
                assert stream_stats(d, "child")["dropped_by_reason"]["disconnected"] == 1
                # closed at once: the worker reads frame 0's own copy, not the segment
                await wait_for(lambda: not held_open(name), what="segment closed")
                hang.set()
                await wait_for(lambda: stream_stats(d, "child")["in_flight"] == 0)
                await wait_for(
                    lambda: not held_open(name), what="mapping gone after the last frame"
                )
                await serves_a_fresh_client(d)
                assert accounted(d)
                s = stream_stats(d, "child")
                assert (s["received"], s["processed"]) == (2, 1)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                if name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"/dev/shm/{name}")

    run(main())


# ---- lies ---------------------------------------------------------------------------------------

Setup = Callable[[ShmSlots, list[Any]], dict[str, Any]]


def _fifo(r: ShmSlots, made: list[Any]) -> dict[str, Any]:
    name = f"vd-fifo-{secrets.token_hex(4)}"
    os.mkfifo(f"/dev/shm/{name}", 0o600)
    made.append(name)
    return {**r.announce(), "name": name}


def _symlink(r: ShmSlots, made: list[Any]) -> dict[str, Any]:
    name = f"vd-link-{secrets.token_hex(4)}"
    os.symlink(f"/dev/shm/{r.mem.name}", f"/dev/shm/{name}")
    made.append(name)
    return {**r.announce(), "name": name}


def _chmod(mode: int) -> Setup:
    def setup(r: ShmSlots, made: list[Any]) -> dict[str, Any]:
        os.chmod(f"/dev/shm/{r.mem.name}", mode)
        return r.announce()

    return setup


def _other_user(r: ShmSlots, made: list[Any]) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("a segment owned by another user can only be made as root")
    os.chown(f"/dev/shm/{r.mem.name}", 65534, 65534)
    return r.announce()


def _large(r: ShmSlots, made: list[Any]) -> dict[str, Any]:
    big = ShmSlots(2, 2**20)  # a right ring, only larger than max_shm_mb = 1
    made.append(big)
    return big.announce()


def _announce(**fields: Any) -> Setup:
    return lambda r, made: {**r.announce(), **fields}


# Each lie: how the ring is announced (and the segment tampered with), the daemon's settings,
# and words of the refusal that show which check caught it.
HELLO_LIES: dict[str, tuple[Setup, dict[str, Any], str]] = {
    "no such segment": (_announce(name=f"vd-none-{secrets.token_hex(6)}"), {}, "cannot open"),
    "a path as name": (_announce(name="../etc/passwd"), {}, "'name' must be"),
    "a dot name": (_announce(name=".hidden"), {}, "'name' must be"),
    "another client's token": (_announce(token=b"\x01" * 16), {}, "not this client's segment"),
    "too small": (_announce(slots=3), {}, "has 22528 bytes"),
    "a FIFO": (_fifo, {}, "not a regular file"),
    "a symlink": (_symlink, {}, "cannot open"),
    "world-writable": (_chmod(0o666), {}, "writable by no one else"),
    "group-writable": (_chmod(0o620), {}, "writable by no one else"),
    "another user's": (_other_user, {}, "belong to the daemon's user"),
    "zero slots": (_announce(slots=0), {}, "'slots' must be"),
    "257 slots": (_announce(slots=257), {}, "'slots' must be"),
    "a 15-byte token": (_announce(token=b"x" * 15), {}, "'token' must be"),
    "shm off": (_announce(), {"max_shm_mb": 0}, "max_shm_mb = 0"),
    "over max_shm_mb": (_large, {"max_shm_mb": 1}, "exceeds max_shm_mb=1"),
}


@pytest.mark.timeout(60)  # a FIFO that blocked the daemon would hang here, not pass
@pytest.mark.parametrize("lie", list(HELLO_LIES))
def test_a_hello_announcing_a_ring_the_daemon_will_not_map(
    tmp_path: Path, ring: ShmSlots, made: list[Any], lie: str
) -> None:
    """Each bad ring in a hello is shm_error and closes that connection; nothing stays mapped, a
    connected bystander keeps its results and a fresh client is served."""
    setup, config, reason = HELLO_LIES[lie]
    announce = setup(ring, made)

    async def main() -> None:
        async with daemon_with(tmp_path, **config) as d:
            by = await shm_client(d) if config.get("max_shm_mb") != 0 else None
            before = time.monotonic()
            c = await raw_client(d)
            await c.send(hello_message(client_name="liar", shm=announce))
            err = await refused(c)
            assert time.monotonic() - before < 5  # answered at once, never blocked
            assert err["code"] == "shm_error" and "frame_id" not in err, err
            assert reason in err["message"], err
            assert stats(d)["errors"]["shm_error"] == 1
            assert stats(d)["connections"]["shm_rings"] == (1 if by else 0)
            assert not held_open(announce["name"])
            if by is not None:
                msgs = await round_trip(by, "bystander", [5, 6])
                assert [m["type"] for m in msgs] == ["result", "result"]
                await by.close()
                await serves_a_fresh_client(d)
            assert accounted(d) and stats(d)["totals"]["received"] == (4 if by else 0)

    run(main())


def _shrink(r: ShmSlots) -> None:
    os.truncate(f"/dev/shm/{r.mem.name}", 4096)


Tamper = Callable[[ShmSlots], None] | None
FRAME_LIES: dict[str, tuple[Callable[[ShmSlots], Any], Tamper, str]] = {
    "slot past the ring": (lambda r: shm_frame(5, r.slots), None, "slot 2 is out of range"),
    "negative slot": (lambda r: shm_frame(5, -1), None, "slot -1 is out of range"),
    "shape larger than a slot": (lambda r: shm_frame(5, 0, (H, W + 1, 3)), None, "a slot has"),
    "segment shrank": (lambda r: shm_frame(5, 0), _shrink, "shrank"),
}


@pytest.mark.parametrize("lie", list(FRAME_LIES))
def test_a_frame_naming_a_slot_the_daemon_will_not_read(
    tmp_path: Path, ring: ShmSlots, lie: str
) -> None:
    """After a good hello, a frame with a slot out of range, a shape larger than a slot, or a
    segment that shrank since the hello is shm_error with its frame id, counted as a received
    frame dropped as invalid, and closes only that connection."""
    make, tamper, reason = FRAME_LIES[lie]

    async def main() -> None:
        det = RecordingDetector()
        async with daemon_with(tmp_path, det) as d:
            by = await shm_client(d)
            c = await DaemonClient.connect(unix_socket=sock(d), shm=ring, client_name="liar")
            ok = await round_trip(c, "liar", [3])  # the ring works until the lie
            assert ok[0]["type"] == "result"
            if tamper is not None:
                tamper(ring)
            await c.send(make(ring))
            err = await refused(c)
            assert (err["code"], err["frame_id"]) == ("shm_error", 5), err
            assert reason in err["message"], err
            await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 1)
            await wait_for(lambda: not held_open(ring.mem.name), what="liar's ring unmapped")
            t = stats(d)["totals"]
            assert t["received"] == 2 and t["dropped_by_reason"].get("invalid") == 1, t
            assert len(det.seen) == 1  # the lie never reached a detector
            msgs = await round_trip(by, "bystander", [5, 6])
            assert [m["type"] for m in msgs] == ["result", "result"]
            await by.close()
            await serves_a_fresh_client(d)
            assert accounted(d)

    run(main())


@pytest.mark.parametrize("hello", ["plain hello", "no hello"])
def test_shm_frames_without_an_shm_hello_are_refused(tmp_path: Path, hello: str) -> None:
    """An shm frame on a connection that announced no ring (a plain hello, or the legacy
    protocol with no hello) is shm_error with its frame id and closes the connection."""

    async def main() -> None:
        async with daemon_with(tmp_path) as d:
            c = await raw_client(d)
            if hello == "plain hello":
                await c.send(hello_message(client_name="liar"))
            await c.send(shm_frame(3, 0))
            err = await refused(c)
            assert (err["code"], err["frame_id"]) == ("shm_error", 3), err
            t = stats(d)["totals"]
            assert t["received"] == 1 and t["dropped_by_reason"].get("invalid") == 1, t
            await serves_a_fresh_client(d)
            assert accounted(d)

    run(main())


def test_one_ring_per_connection(tmp_path: Path, ring: ShmSlots) -> None:
    """A second hello announcing a ring on a connection that mapped one is shm_error."""

    async def main() -> None:
        async with daemon_with(tmp_path) as d:
            c = await DaemonClient.connect(unix_socket=sock(d), shm=ring, client_name="twice")
            await c.send(hello_message(client_name="twice", shm=ring.announce()))
            err = await refused(c)
            assert err["code"] == "shm_error" and "one per connection" in err["message"]
            await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 0)
            await wait_for(lambda: not held_open(ring.mem.name))
            await serves_a_fresh_client(d)

    run(main())


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        addr = str(s.getsockname()[0])
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


def test_shm_over_a_tcp_peer_that_is_not_loopback_is_refused(
    tmp_path: Path, ring: ShmSlots
) -> None:
    """A hello announcing a ring from a non-loopback TCP address is shm_error (same host or not)."""
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")

    async def main() -> None:
        async with daemon_with(tmp_path, tcp_host=addr) as d:
            c = await DaemonClient.connect(addr, d.tcp_port or 0, hello=False)
            await c.send(hello_message(client_name="remote", shm=ring.announce()))
            err = await refused(c)
            assert err["code"] == "shm_error" and "loopback" in err["message"]
            assert not held_open(ring.mem.name)
            plain = await DaemonClient.connect(addr, d.tcp_port or 0)  # TCP itself still works
            raw = image(4)
            await plain.send_image("remote", 0, raw.tobytes(), "raw", raw.shape)
            assert (await collect(plain, 1))[0]["type"] == "result"
            await plain.close()

    run(main())


# ---- WebSocket ---------------------------------------------------------------------------------


def test_websocket_ingest_refuses_shm_hellos_and_shm_frames_with_1008(
    tmp_path: Path, ring: ShmSlots
) -> None:
    """On WS /ingest a hello announcing a ring, or an shm frame after a plain hello, is shm_error
    and close 1008; the ring is never mapped and the frame counts as a refused frame."""

    async def main() -> None:
        async with daemon_with(tmp_path) as d:
            async with ws_connect(d, "/ingest") as ws:
                await ws.send(pack(hello_message(client_name="ws", shm=ring.announce())))
                err = await recv_bin(ws)
                assert err["type"] == "error" and err["code"] == "shm_error"
                assert await closed_with(ws) == (1008, "shm_error")
            assert not held_open(ring.mem.name)
            async with ws_connect(d, "/ingest") as ws:
                await ws.send(pack(hello_message(client_name="ws")))
                assert (await recv_bin(ws))["type"] == "welcome"
                await ws.send(pack(shm_frame(8, 0)))
                err = await recv_bin(ws)
                assert (err["code"], err["frame_id"]) == ("shm_error", 8)
                assert await closed_with(ws) == (1008, "shm_error")
            assert stats(d)["errors"]["shm_error"] == 2
            t = stats(d)["totals"]
            assert t["received"] == 1 and t["dropped_by_reason"]["invalid"] == 1
            client = await WsDaemonClient.connect("127.0.0.1", d.api_port or 0)
            raw = image(1)
            await client.send_image("ws-ok", 0, raw.tobytes(), "raw", raw.shape)
            assert (await client.recv() or {}).get("type") == "result"
            await client.close()
            assert accounted(d)

    run(main())


# ---- vision-client ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transport", ["shm over unix", "shm over tcp", "unix", "ws"], ids=lambda t: t.replace(" ", "-")
)
def test_vision_client_transports(tmp_path: Path, transport: str) -> None:
    """vision-client --transport shm (Unix socket or loopback TCP), unix and ws: every frame sent
    is answered, results > 0 and no errors; the daemon saw what the client sent."""

    async def main() -> None:
        async with daemon_with(tmp_path, queue_depth=4) as d:
            where = {
                "shm over unix": ["--transport", "shm", "--unix-socket", sock(d)],
                "shm over tcp": ["--transport", "shm", "--port", str(d.tcp_port)],
                "unix": ["--transport", "unix", "--unix-socket", sock(d)],
                "ws": ["--transport", "ws", "--api-port", str(d.api_port)],
            }[transport]
            rc, out, err = await program(
                "vision-client",
                *where,
                *("--stream", "cli", "--fps", "20", "--duration", "1", "--width", "160"),
                *("--height", "120", "--no-save", "--no-progress", "--json"),
            )
            assert rc == 0, err
            summary = json.loads(out)
            assert summary["results"] > 0 and summary["errors"] == 0, summary
            assert summary["results"] + summary["server_drops"] == summary["frames_sent"]
            assert stream_stats(d, "cli")["received"] == summary["frames_sent"]
            await wait_for(lambda: stats(d)["connections"]["shm_rings"] == 0)
            assert accounted(d)

    run(main())


def test_vision_client_transport_argument_errors(tmp_path: Path) -> None:
    """--transport unix without --unix-socket, and --unix-socket with --transport tcp, exit 2."""

    async def main() -> None:
        rc, _, err = await program("vision-client", "--transport", "unix", "--no-save")
        assert rc == 2 and "--unix-socket" in err
        path = str(tmp_path / "none.sock")
        rc, _, err = await program(
            "vision-client", "--transport", "tcp", "--unix-socket", path, "--no-save"
        )
        assert rc == 2 and "--transport unix or shm" in err

    run(main())


# ---- a real model -------------------------------------------------------------------------------


def test_a_real_model_finds_the_same_objects_in_shm_and_in_raw_tcp_frames(tmp_path: Path) -> None:
    """yolov8n (OpenVINO) on bus.jpg: the detections of a raw TCP frame and of the same pixels
    through a shared-memory slot are identical."""
    shared_model("yolov8n_int8_openvino_model")
    bus = cv2.imread(str(ASSETS / "bus.jpg"), cv2.IMREAD_COLOR)
    assert bus is not None

    async def main() -> None:
        async with running_daemon(
            model="yolov8n",
            model_dir=str(MODEL_DIR),
            workers=1,
            api_port=-1,
            unix_socket=str(tmp_path / "d.sock"),
        ) as d:
            tcp = await DaemonClient.connect("127.0.0.1", d.tcp_port or 0)
            await tcp.send_image("bus", 0, bus.tobytes(), "raw", bus.shape)
            (by_tcp,) = await collect(tcp, 1, timeout=60)
            await tcp.close()
            c = await open_client("shm", unix_socket=sock(d), shm_slots=1, slot_bytes=bus.nbytes)
            await c.send_image("bus", 1, bus, "raw", bus.shape)
            (by_shm,) = await collect(c, 1, timeout=60)
            await c.close()
            assert by_tcp["type"] == by_shm["type"] == "result", (by_tcp, by_shm)
            labels = [det["label"] for det in by_shm["detections"]]
            assert "bus" in labels and labels.count("person") >= 4, labels
            assert by_shm["detections"] == by_tcp["detections"]

    run(main())


def test_a_segment_truncated_while_its_frame_waits_cannot_kill_the_daemon(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    """A client sends an shm frame while the only worker is busy with a real model on another
    stream, then truncates its segment to 0 bytes before the frame is analysed. The daemon (a
    subprocess here) lives, answers the frame with the pixels the client wrote, and serves a new
    client. Read in place from a mapping, that frame killed it with SIGBUS (exit -7)."""
    d = spawn_daemon(
        "--model",
        "yolov8n",
        "--model-dir",
        str(MODEL_DIR.resolve()),  # the daemon runs in a temporary folder
        "--workers",
        "1",
        "--tcp-port",
        "0",
        "--api-port",
        "0",
        "--unix-socket",
        str(tmp_path / "d.sock"),
    )
    unix = d.ports(timeout=120)["unix"]
    busy = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (1920, 1080))

    async def main() -> None:
        c = await open_client("shm", shm_slots=2, slot_bytes=SLOT, unix_socket=unix)
        other = await DaemonClient.connect("127.0.0.1", d.tcp)
        img = image(200)
        for i in range(8):  # the worker is on these for a while
            await other.send_image("busy", i, busy.tobytes(), "raw", busy.shape)
        await c.send_image("cut", 0, img, "raw", img.shape)
        await asyncio.sleep(0.02)  # the daemon has taken the frame; its worker is still busy
        os.truncate(f"/dev/shm/{c.shm.mem.name}", 0)
        msg = await asyncio.wait_for(c.recv(), 30)
        assert d.popen.poll() is None, f"daemon died: {d.popen.returncode}\n{d.log_tail()}"
        assert msg is not None and (msg["type"], msg["frame_id"]) == ("result", 0), msg
        await other.close()
        await c.close()
        fresh = await open_client("shm", shm_slots=2, slot_bytes=SLOT, unix_socket=unix)
        await fresh.send_image("fresh", 0, img, "raw", img.shape)
        (ok,) = await collect(fresh, 1)
        assert ok["type"] == "result"
        await fresh.close()
        assert d.popen.poll() is None

    run(main())
