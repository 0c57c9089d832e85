"""Shared helpers: a daemon on ephemeral ports, real clients, a deliberately slow detector."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings

from clients.lib import DaemonClient
from vision_daemon.config import load_config
from vision_daemon.detectors.base import Detection, Image, ModelInfo
from vision_daemon.lifecycle import Daemon

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("VISION_DAEMON_MODEL_DIR", ROOT.parent / "shared" / "models"))
VIDEO = ROOT.parent / "shared" / "data" / "vtest.avi"


def jpeg(h: int = 240, w: int = 320, value: int = 128) -> bytes:
    img = np.full((h, w, 3), value, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (0, 0, 255), -1)
    return bytes(cv2.imencode(".jpg", img)[1].tobytes())


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
    }
    settings.update(overrides)
    daemon = Daemon(load_config(overrides=settings, environ={}), factory=factory)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.shutdown()


@asynccontextmanager
async def api(d: Daemon, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the daemon's control plane (Bearer token when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{d.api_port}", headers=headers, timeout=5
    ) as h:
        yield h


async def connect(daemon: Daemon, **kw: Any) -> DaemonClient:
    assert daemon.tcp_port is not None
    return await DaemonClient.connect("127.0.0.1", daemon.tcp_port, **kw)


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll with a deadline (never a bare sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


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
    return d.snapshot().data


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


async def poll_stats(
    h: Any, cond: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """GET /stats until `cond` holds (the API serves a snapshot rebuilt every stats_refresh_s)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await h.get("/stats")
        assert r.status_code == 200, r.text
        s: dict[str, Any] = r.json()
        if cond(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats never met the condition; last: {s}")
        await asyncio.sleep(0.02)
