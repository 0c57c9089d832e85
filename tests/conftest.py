"""Shared helpers and fixtures: a daemon on ephemeral ports (in process, or a subprocess through
tests/launcher.py), real clients, one polling helper with a deadline, the hostile-peer audit's
probes, a deliberately slow detector."""

from __future__ import annotations

import asyncio
import inspect
import os
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cv2
import httpx
import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings
from prometheus_client.parser import text_string_to_metric_families

from clients.lib import DaemonClient
from tests.launcher import DaemonProcess
from vision_daemon.config import load_config
from vision_daemon.detectors.base import Detection, Image, ModelInfo
from vision_daemon.lifecycle import Daemon

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("VISION_DAEMON_MODEL_DIR", ROOT.parent / "shared" / "models"))
VIDEO = ROOT.parent / "shared" / "data" / "vtest.avi"
T = TypeVar("T")


def jpeg(h: int = 240, w: int = 320, value: int = 128) -> bytes:
    img = np.full((h, w, 3), value, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (0, 0, 255), -1)
    return bytes(cv2.imencode(".jpg", img)[1].tobytes())


GOOD_IMAGE = jpeg(96, 128)  # what round_trip's well-behaved client sends


class SlowDetector:
    """A detector the test controls: sleeps `delay` s per call, returns `boxes` identical boxes."""

    def __init__(
        self,
        delay: float = 0.05,
        fail_every: int = 0,
        hang: threading.Event | None = None,
        boxes: int = 1,
        label: str = "thing",
    ):
        self.info = ModelInfo(name="slow-test", backend="fake", device="cpu", imgsz=0)
        self.delay = delay
        self.calls = 0
        self.fail_every = fail_every
        self.hang = hang
        self.boxes = boxes
        self.label = label

    def warmup(self) -> None:
        return None

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        self.calls += 1
        if self.hang is not None and not self.hang.is_set():
            self.hang.wait(30)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("injected detector failure")
        time.sleep(self.delay)
        box = Detection(label=self.label, conf=0.9, bbox=[1.0, 2.0, 3.0, 4.0], class_id=0)
        return [[box] * self.boxes for _ in images]


@asynccontextmanager
async def running_daemon(
    factory: Callable[[], Any] | None = None, **overrides: Any
) -> AsyncIterator[Daemon]:
    """A started daemon on 127.0.0.1 ephemeral ports; always shut down afterwards."""
    settings: dict[str, Any] = {
        "model": "none",
        "tcp_port": 0,
        "api_port": 0,
        "log_dir": "",
        "stats_refresh_s": 0.05,
        # The tests' cameras are servers on 127.0.0.1 and files in temporary folders; the URL
        # policy's own tests (tests/adversarial/test_camera_urls.py) set these back.
        "camera_allow_local": True,
        "camera_media_dir": "/",
    }
    settings.update(overrides)
    daemon = Daemon(load_config(overrides=settings, environ={}), factory=factory)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.shutdown()


@asynccontextmanager
async def api(
    d: Daemon, token: str | None = None, timeout: float = 10.0
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the daemon's control plane (Bearer token when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{d.api_port}", headers=headers, timeout=timeout
    ) as h:
        yield h


async def connect(daemon: Daemon, **kw: Any) -> DaemonClient:
    assert daemon.tcp_port is not None
    return await DaemonClient.connect("127.0.0.1", daemon.tcp_port, **kw)


# ---- polling with a deadline: the one helper (never a bare sleep as synchronisation) -----------


def _timed_out(what: str, timeout: float, last: Any) -> AssertionError:
    return AssertionError(
        f"timed out after {timeout:g} s waiting for {what}; last seen: {last!r}"[:2000]
    )


async def wait_for(
    probe: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    ok: Callable[[T], object] = bool,
    interval: float = 0.01,
) -> T:
    """Call `probe` (plain or async) until `ok` of its value holds (by default: the value is
    truthy); the value, or an AssertionError naming `what` and the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if ok(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_for_sync(
    probe: Callable[[], T],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    ok: Callable[[T], object] = bool,
    interval: float = 0.02,
) -> T:
    """wait_for outside an event loop: for other threads, processes, browsers and files."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)  # polling another thread or process with a deadline


async def collect(client: DaemonClient, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next n messages from the daemon."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = await client.recv()
            assert msg is not None, f"connection closed after {len(out)} of {n} messages"
            out.append(msg)
    return out


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def shared_model(name: str) -> Path:
    path = MODEL_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not found: set VISION_DAEMON_MODEL_DIR to the shared models folder")
    return path


# Hypothesis keeps no example database: nothing is written into the checkout.
hypothesis_settings.register_profile("vision-daemon", database=None)
hypothesis_settings.load_profile("vision-daemon")


def stats(d: Daemon) -> dict[str, Any]:
    """A fresh /stats snapshot of the daemon (what the API serves, built now)."""
    data: dict[str, Any] = d.snapshot().model.model_dump(mode="json")
    return data


def stream_stats(d: Daemon, name: str) -> dict[str, Any]:
    """One stream's entry in a fresh snapshot (KeyError if the daemon does not know it)."""
    return stats(d)["streams"][name]


def accounted(d: Daemon) -> bool:
    """received = processed + dropped by reason + queued + in flight, in total and per stream."""
    snap = stats(d)
    t = snap["totals"]
    queued = sum(s["queue_depth"] for s in snap["streams"].values())
    flight = sum(s["in_flight"] for s in snap["streams"].values())
    ok = t["received"] == t["processed"] + sum(t["dropped_by_reason"].values()) + queued + flight
    return ok and all(
        s["received"]
        == s["processed"] + sum(s["dropped_by_reason"].values()) + s["queue_depth"] + s["in_flight"]
        for s in snap["streams"].values()
    )


def connections(d: Daemon) -> int:
    """Open TCP connections, authenticated or still pending, in a fresh snapshot."""
    c = stats(d)["connections"]
    return int(c["open"] + c["pending"])


async def get_stats(h: httpx.AsyncClient) -> dict[str, Any]:
    """GET /stats (the snapshot the API rebuilds every stats_refresh_s)."""
    r = await h.get("/stats")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def poll_stats(
    h: httpx.AsyncClient, cond: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """GET /stats until `cond` holds."""
    return await wait_for(lambda: get_stats(h), timeout, "/stats to meet the condition", ok=cond)


def unaccounted(stats: dict[str, Any]) -> int:
    """received - (processed + dropped + queued + in flight): 0 when every frame is accounted for."""
    t = stats["totals"]
    pending = sum(s["queue_depth"] + s["in_flight"] for s in stats["streams"].values())
    return int(t["received"] - t["processed"] - sum(t["dropped_by_reason"].values()) - pending)


async def settled_stats(h: httpx.AsyncClient, min_received: int = 0) -> dict[str, Any]:
    """/stats once it has seen `min_received` frames and every one of them is accounted for."""
    return await wait_for(
        lambda: get_stats(h),
        what=f"/stats with >= {min_received} frames received, all accounted for",
        ok=lambda s: s["totals"]["received"] >= min_received and unaccounted(s) == 0,
        interval=0.05,
    )


async def metrics(h: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every /metrics sample, parsed with prometheus_client, keyed by (name, sorted labels)."""
    text = (await h.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def metric(d: Daemon, name: str, **labels: str) -> float:
    """One sample of /metrics (a counter by its name with or without _total)."""
    async with api(d) as h:
        samples = await metrics(h)
    key = tuple(sorted(labels.items()))
    for n in (name, f"{name}_total"):
        if (n, key) in samples:
            return samples[n, key]
    raise AssertionError(f"{name}{labels} not in /metrics")


async def round_trip(
    c: DaemonClient, stream: str, frame_id: int, timeout: float = 5.0, image: bytes | None = None
) -> None:
    """A well-behaved frame: sent, and answered by its own result within `timeout`."""
    await c.send_frame(stream, frame_id, image if image is not None else GOOD_IMAGE)
    try:
        msg = await asyncio.wait_for(c.recv(), timeout)
    except TimeoutError:
        raise AssertionError(f"good client on {stream!r}: no answer in {timeout:g} s") from None
    assert msg is not None, f"good client on {stream!r} was disconnected"
    assert msg["type"] == "result" and msg["frame_id"] == frame_id, msg


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Drain a socket; True if the server closed it (EOF or reset) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return True


def raise_fd_limit(needed: int) -> None:
    """Let this process hold `needed` descriptors (the soft limit raised up to the hard one), or
    skip the test with one line saying why."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def speak_at_once(
    port: int | None, first: bytes, timeout: float = 1.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A peer that sends `first` the instant it is connected, as one on another host or in
    another process does: the connect and the send run before this event loop (the daemon's)
    runs again, so the bytes are in the daemon's socket before it can accept it. (A client on
    the daemon's own loop speaks only some loop turns after the daemon accepted it.)"""
    assert port is not None
    sock = socket.create_connection(("127.0.0.1", port), timeout)  # loopback: the kernel's job
    try:
        sock.sendall(first)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


class SilentFlood:
    """`n` sockets to 127.0.0.1:`port` from `source` that connect and never send a byte, each
    re-opened as soon as the daemon closes it (what it wrote first is read and ignored), until
    the block ends."""

    def __init__(self, port: int | None, n: int, source: str = "127.0.0.1") -> None:
        assert port is not None
        self.port = port
        self.n = n
        self.source = source  # another loopback address (127.0.0.2) is another peer address
        self.opened = 0  # connections made
        self.closed = 0  # of them, closed by the daemon
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SilentFlood:
        self._tasks = [asyncio.create_task(self._hold()) for _ in range(self.n)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _hold(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(self.source, 0)
                )
            except OSError:
                await asyncio.sleep(0.01)  # the listener's queue was full: try again
                continue
            self.opened += 1
            try:
                while await reader.read(4096):
                    pass
            except OSError:
                pass
            finally:
                writer.close()
            self.closed += 1


def big_results() -> SlowDetector:
    """2000 boxes with long labels per frame: large results fill a non-reader's buffers quickly."""
    return SlowDetector(0.0, boxes=2000, label="x" * 40)


# ---- daemons in subprocesses (the `vision-daemon` command) --------------------------------------


class SpawnDaemon(Protocol):
    def __call__(self, *args: str, **kw: Any) -> DaemonProcess: ...


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[SpawnDaemon]:
    """Start `vision-daemon ARGS` (log to stderr only, cwd tmp_path) with tests/launcher.py;
    every daemon started is killed, if still running, at the end of the test."""
    started: list[DaemonProcess] = []

    def spawn(*args: str, **kw: Any) -> DaemonProcess:
        kw.setdefault("cwd", tmp_path)
        daemon = DaemonProcess(["--log-dir", "", *args], **kw)
        started.append(daemon)
        return daemon

    try:
        yield spawn
    finally:
        for daemon in started:
            daemon.close()
