"""Simulated cameras: N streams from one asyncio process (or K processes), each on its own schedule.

Each stream is one TCP connection (as a camera would be) that sends pre-encoded frames on an
absolute schedule and reads its results concurrently: the client engine (clients.engine) with a
`LoopFeed`. Everything is timed on this machine's monotonic clock, relative to one shared start
time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from clients.engine import Endpoint, LoopFeed, Tally, stream
from clients.sources import Encoded, Pacer, Source, encode, open_source

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
    unix_socket: str | None = None  # connect to the daemon's Unix socket instead of host:port
    transport: str = "tcp"  # tcp | unix | shm | ws (clients.transports.TRANSPORTS)
    api_port: int = 8000  # transport ws: the control-plane port
    rate_advice: bool = False  # each camera slows to the rate the daemon advises


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


MAX_RAW_FRAMES = 30  # raw frames (transport shm) are 10-30x a JPEG: fewer are held


def raw_frames(src: Source) -> list[Encoded]:
    """Up to MAX_RAW_FRAMES of a source as raw BGR (then close it), for transport shm."""
    frames: list[Encoded] = []
    try:
        while len(frames) < MAX_RAW_FRAMES and (img := src.read()) is not None:
            if img.shape[1] > 1280:
                img = cv2.resize(img, (1280, img.shape[0] * 1280 // img.shape[1]))
            frames.append(encode(img, "raw"))
    finally:
        src.close()
    if not frames:
        raise ValueError(f"source {src.name} gave no frames")
    return frames


def load_frames(spec: LoadSpec) -> list[bytes] | list[Encoded]:
    src = open_source(spec.source, spec.path, spec.path)
    return raw_frames(src) if spec.transport == "shm" else encode_frames(src, spec.quality)


async def run_stream(
    spec: LoadSpec,
    index: int,
    count: int,
    frames: list[bytes] | list[Encoded],
    start: float,
    tally: Tally,
) -> None:
    """One simulated camera through the client engine, its sends spread across one period and
    starting at a different frame from the others."""
    pacer = Pacer(spec.fps, start + index / (spec.fps * max(1, count)), start + spec.duration)
    feed = LoopFeed(frames, offset=index * len(frames) // max(1, count))
    endpoint = Endpoint(
        spec.host,
        spec.port,
        spec.token,
        "vision-stress",
        spec.unix_socket,
        spec.transport,
        spec.api_port,
        rate_advice=spec.rate_advice,
    )
    await stream(endpoint, tally, feed, pacer, start=start)


async def run_group(
    spec: LoadSpec,
    indices: list[int],
    count: int,
    start_wall: float,
    on_progress: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    frames: list[bytes] | list[Encoded] | None = None,
) -> list[Tally]:
    """Run some of the streams; `start_wall` (time.time) aligns groups across processes."""
    frames = frames or load_frames(spec)
    start = time.monotonic() + (start_wall - time.time())
    results = [Tally(f"{spec.prefix}{i}") for i in indices]
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
    frames: list[bytes] | list[Encoded] | None = None,
) -> list[Tally]:
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
    results: list[Tally] = []
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
