"""Simulated cameras: N streams from one asyncio process (or K processes), each on its own schedule.

Each stream is one TCP connection (as a camera would be) that sends pre-encoded frames on an
absolute schedule and reads its results concurrently. Everything is timed on this machine's
monotonic clock, relative to one shared start time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_mod
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from clients.lib import DaemonClient, frame_message
from clients.sources import Pacer, Source, encode, open_source

MAX_FRAMES = 300  # frames pre-encoded per source; streams loop over them


@dataclass(frozen=True)
class LoadSpec:
    """What to send; picklable so --procs can hand it to child processes."""

    host: str
    port: int
    token: str | None
    fps: float
    duration: float
    source: str  # synthetic | video | folder
    path: str | None
    quality: int = 85
    prefix: str = "stress"


@dataclass
class StreamResult:
    """One simulated camera's run."""

    name: str
    sent: int = 0
    results: int = 0
    errors: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # frame_id, t, rtt ms
    drop_times: list[float] = field(default_factory=list)
    skipped_slots: int = 0
    late_sends: int = 0  # sent more than half a period after the slot was due
    closed_by_server: str = ""

    def progress(self) -> dict[str, Any]:
        recent = [rtt for _, _, rtt in self.samples[-50:]]
        return {
            "sent": self.sent,
            "results": self.results,
            "dropped": sum(self.drops.values()),
            "errors": self.errors,
            "last_rtt_ms": recent[-1] if recent else 0.0,
            "recent": recent,
        }


def encode_frames(src: Source, quality: int) -> list[bytes]:
    """Pre-encode up to MAX_FRAMES of a source as JPEG (then close it): a send costs only the send."""
    frames: list[bytes] = []
    try:
        while len(frames) < MAX_FRAMES and (img := src.read()) is not None:
            if img.shape[1] > 1280:  # keep messages camera-sized
                img = cv2.resize(img, (1280, img.shape[0] * 1280 // img.shape[1]))
            frames.append(encode(img, "jpeg", quality).data)
    finally:
        src.close()
    if not frames:
        raise ValueError(f"source {src.name} gave no frames")
    return frames


def load_frames(spec: LoadSpec) -> list[bytes]:
    return encode_frames(open_source(spec.source, spec.path, spec.path), spec.quality)


async def run_stream(
    spec: LoadSpec, index: int, count: int, frames: list[bytes], start: float, res: StreamResult
) -> None:
    client = await DaemonClient.connect(
        spec.host, spec.port, token=spec.token, client_name="vision-stress", dropped_notices=True
    )
    sent_at: dict[int, float] = {}
    done = asyncio.Event()

    async def reader() -> None:
        async for msg in client.messages():
            now = time.monotonic()
            kind = msg.get("type")
            if kind == "result":
                t = sent_at.pop(msg.get("frame_id", -1), None)
                res.results += 1
                if t is not None:
                    res.samples.append((int(msg["frame_id"]), t - start, (now - t) * 1000))
            elif kind == "dropped":
                sent_at.pop(msg.get("frame_id", -1), None)
                res.drops[str(msg.get("reason"))] += 1
                res.drop_times.append(now - start)
            elif kind == "error":
                res.errors += 1
                res.closed_by_server = f"{msg.get('code')}: {msg.get('message')}"
            elif kind == "bye":
                break
        done.set()

    rtask = asyncio.create_task(reader())
    # Spread the streams' sends across one period, and start each at a different frame.
    pacer = Pacer(spec.fps, start + index / (spec.fps * max(1, count)), start + spec.duration)
    offset = index * len(frames) // max(1, count)
    try:
        while not done.is_set():
            if await pacer.wait() is None:
                break
            slot = pacer.slot - 1
            now = time.monotonic()
            if now - pacer.due_time(slot) > pacer.period / 2:
                res.late_sends += 1
            sent_at[res.sent] = now
            client.send_nowait(
                frame_message(res.name, res.sent, frames[(offset + slot) % len(frames)])
            )
            res.sent += 1
            await client.writer.drain()
        res.skipped_slots = pacer.skipped
        if not done.is_set():
            await client.send({"type": "bye"})
            try:
                await asyncio.wait_for(done.wait(), 15)
            except TimeoutError:
                pass
    except ConnectionError as exc:
        res.closed_by_server = res.closed_by_server or f"connection lost: {exc}"
    finally:
        rtask.cancel()
        await asyncio.gather(rtask, return_exceptions=True)
        await client.close()


async def run_group(
    spec: LoadSpec,
    indices: list[int],
    count: int,
    start_wall: float,
    on_progress: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    frames: list[bytes] | None = None,
) -> list[StreamResult]:
    """Run some of the streams; `start_wall` (time.time) aligns groups across processes."""
    frames = frames or load_frames(spec)
    start = time.monotonic() + (start_wall - time.time())
    results = [StreamResult(f"{spec.prefix}{i}") for i in indices]
    tasks = [
        asyncio.create_task(run_stream(spec, i, count, frames, start, r))
        for i, r in zip(indices, results, strict=True)
    ]

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress:
                on_progress({r.name: r.progress() for r in results})

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*tasks)
    finally:
        reporter.cancel()
    if on_progress:
        on_progress({r.name: r.progress() for r in results})
    return results


def _child(
    spec: LoadSpec, indices: list[int], count: int, start_wall: float, q: Any
) -> None:  # pragma: no cover - runs in a child process
    def push(progress: dict[str, dict[str, Any]]) -> None:
        q.put(("progress", progress))

    try:
        results = asyncio.run(run_group(spec, indices, count, start_wall, push))
        q.put(("done", results))
    except Exception as exc:
        q.put(("error", f"{type(exc).__name__}: {exc}"))


async def run_load(
    spec: LoadSpec,
    streams: int,
    procs: int,
    on_progress: Callable[[dict[str, dict[str, Any]]], None],
    frames: list[bytes] | None = None,
) -> list[StreamResult]:
    """All streams, in this process (procs=1) or spread round-robin over `procs` processes.

    `frames` (pre-encoded JPEGs) replaces the spec's source, in this process only.
    """
    start_wall = time.time() + 1.0  # time to connect every stream before the first send
    if procs <= 1:
        return await run_group(spec, list(range(streams)), streams, start_wall, on_progress, frames)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    groups = [list(range(streams))[k::procs] for k in range(procs)]
    start_wall += 2.0  # spawned interpreters need a moment to import
    children = [
        ctx.Process(target=_child, args=(spec, g, streams, start_wall, q), daemon=True)
        for g in groups
        if g
    ]
    for c in children:
        c.start()
    results: list[StreamResult] = []
    merged: dict[str, dict[str, Any]] = {}
    pending = len(children)
    try:
        while pending:
            try:
                kind, payload = await asyncio.to_thread(q.get, True, 1.0)
            except queue_mod.Empty:
                if not any(c.is_alive() for c in children):
                    raise RuntimeError("a load-generator process died") from None
                continue
            if kind == "progress":
                merged.update(payload)
                on_progress(merged)
            elif kind == "done":
                results.extend(payload)
                pending -= 1
            else:
                raise RuntimeError(f"load-generator process failed: {payload}")
    finally:
        for c in children:
            c.join(5)
    return sorted(results, key=lambda r: int(r.name[len(spec.prefix) :]))


def source_label(spec: LoadSpec) -> str:
    return spec.source if spec.path is None else f"{spec.source} {Path(spec.path).name}"
