"""Soak benchmark: 8 streams against the real model for 10 minutes; memory, fds and drift.

    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.soak --streams 8 --fps 10 --duration 600

Starts a real `vision-daemon` subprocess, drives it like benchmarks.throughput does, and samples
the daemon's RSS and open file descriptors every --sample-s seconds. RSS growth is measured from
the first sample after --warmup-s (model caches, allocator pools and windows filled) to the end.
Also checks the accounting at the end: received = processed + dropped, by /stats.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import psutil

from benchmarks.throughput import VIDEO, add_run_args, drive_daemon, emit, load
from clients.lib import drift, percentiles
from clients.sources import VideoSource
from stress.load import encode_frames


def measure(proc: psutil.Process, t0: float) -> dict[str, float]:
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": proc.memory_info().rss / 2**20,
        "fds": float(proc.num_fds()),
    }


async def sample(pid: int, every: float, stop: asyncio.Event, out: list[dict[str, float]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while not stop.is_set():
        out.append(measure(proc, t0))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace, tcp: int, pid: int, jpegs: list[bytes]) -> dict[str, Any]:
    stop = asyncio.Event()
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(sample(pid, args.sample_s, stop, samples))
    result = await load(args, tcp, jpegs)
    stop.set()
    await sampler
    await asyncio.sleep(2.0)  # clients have closed: the fds of their connections must be gone
    result["after_close"] = measure(psutil.Process(pid), time.monotonic())
    result["resources"] = samples
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_run_args(ap, duration=600.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    args = ap.parse_args()
    args.max_batch, args.daemon_args = 1, []

    jpegs = encode_frames(VideoSource(str(VIDEO)), quality=90)
    result, stats = drive_daemon(args, lambda tcp, pid: soak(args, tcp, pid, jpegs))
    res = result["resources"]
    base = next((r for r in res if r["t"] >= args.warmup_s), res[0])
    end = res[-1]
    rtts = [r for _, r in sorted(result["samples"])]
    totals = stats["totals"]
    summary = {
        "streams": args.streams,
        "fps": args.fps,
        "duration_s": args.duration,
        "sent": result["sent"],
        "results": len(rtts),
        "rss_mb": {
            "start": round(res[0]["rss_mb"], 1),
            "after_warmup": round(base["rss_mb"], 1),
            "end": round(end["rss_mb"], 1),
            "max": round(max(r["rss_mb"] for r in res), 1),
        },
        "rss_growth_after_warmup_pct": round((end["rss_mb"] / base["rss_mb"] - 1) * 100, 2),
        "fds": {
            "start": res[0]["fds"],
            "end_under_load": end["fds"],
            "max": max(r["fds"] for r in res),
            "after_clients_closed": result["after_close"]["fds"],
        },
        "rtt_ms": percentiles(rtts, digits=1),
        "drift": drift(rtts),
        "received": totals["received"],
        "processed": totals["processed"],
        "dropped_by_reason": {k: v for k, v in totals["dropped_by_reason"].items() if v},
        "accounted": totals["received"]
        == totals["processed"] + sum(totals["dropped_by_reason"].values()),
        "rss_trace_mb": [round(r["rss_mb"], 1) for r in res],
    }
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
