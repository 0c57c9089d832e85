"""Benchmark: the bare-loop ceiling vs the daemon under N streams at F fps of real video, in one run.

    .venv/bin/python -m benchmarks.throughput --model yolov8n --streams 8 --fps 10 --duration 60

(1) ceiling: a bare loop of JPEG decode + model.predict, no daemon;
(2) the daemon (a real `vision-daemon` subprocess) fed by one asyncio client per stream on an
absolute schedule. Prints throughput / ceiling, round-trip and server-side latency percentiles,
drops by reason and latency drift (median of the last third vs the first third).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any

import cv2
import httpx
import numpy as np

from clients.lib import drift, percentiles
from clients.sources import VideoSource
from stress.load import LoadSpec, encode_frames, run_load

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT.parent / "shared" / "data" / "vtest.avi"


def ceiling(model: str, model_dir: str, jpegs: list[bytes], seconds: float) -> dict[str, float]:
    """Bare loop: decode + predict one frame at a time with the model the daemon would serve."""
    from vision_daemon.config import load_config
    from vision_daemon.detectors.yolo import YoloFactory

    # workers=1: one request given every core, the fastest a single loop can go
    det = YoloFactory.from_config(
        load_config(overrides={"model": model, "model_dir": model_dir, "workers": 1})
    )()
    det.warmup()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], np.uint8), cv2.IMREAD_COLOR)
        det.detect([img])
        times.append(time.perf_counter() - t0)
        i += 1
    return {
        "fps": len(times) / sum(times),
        "median_ms": float(np.median(times)) * 1000,
        "frames": len(times),
        "backend": det.info.backend,
    }


def start_daemon(
    args: argparse.Namespace, log_path: str | None = None
) -> tuple[subprocess.Popen[str], int, int]:
    """A `vision-daemon` subprocess of this checkout on free ports; its stderr to `log_path`."""
    cmd = [
        sys.executable,
        "-m",
        "vision_daemon",
        "--model",
        args.model,
        "--model-dir",
        args.model_dir,
        "--workers",
        str(args.workers),
        "--tcp-port",
        "0",
        "--api-port",
        "0",
        "--log-dir",
        "",
        "--max-batch",
        str(args.max_batch),
        *args.daemon_args,
    ]
    # This checkout's package first, whichever one the interpreter has installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - the drain thread closes it
    tcp = api = 0
    for line in proc.stderr:
        if log:
            log.write(line)
        if "control plane listening on http://" in line:
            api = int(line.rsplit(":", 1)[1])
        if "data plane listening on tcp://" in line:
            tcp = int(line.rsplit(":", 1)[1])
            break
    if not tcp:
        raise SystemExit(f"daemon did not start: {' '.join(cmd)}")
    # Keep draining the daemon's stderr: a full pipe would block its logging, and the daemon.
    threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
    return proc, tcp, api


def _drain(proc: subprocess.Popen[str], log: IO[str] | None) -> None:
    for line in proc.stderr or ():
        if log:
            log.write(line)
    if log:
        log.close()


def drive_daemon(
    args: argparse.Namespace,
    drive: Callable[[int, int, int], Coroutine[Any, Any, dict[str, Any]]],
    log_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a daemon, run `drive(tcp_port, pid, api_port)` against it, read its /stats, stop it."""
    proc, tcp, api = start_daemon(args, log_path)
    try:
        result = asyncio.run(drive(tcp, proc.pid, api))
        stats = httpx.get(f"http://127.0.0.1:{api}/stats", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(30)
    return result, stats


async def load(args: argparse.Namespace, tcp: int, jpegs: list[bytes]) -> dict[str, Any]:
    """vision-stress's simulated cameras (one connection each, absolute schedules spread across
    the period, each starting at a different frame) fed with the ceiling's own JPEGs."""
    spec = LoadSpec(
        "127.0.0.1",
        tcp,
        None,
        args.fps,
        args.duration,
        "video",
        None,
        prefix="cam",
        rate_advice=getattr(args, "rate_aware", False),
    )
    results = await run_load(spec, args.streams, 1, lambda _: None, frames=jpegs)
    return {
        "samples": [(t, rtt) for r in results for _, t, rtt in r.samples],  # (send time, rtt ms)
        "sent": sum(r.sent for r in results),
        "drops": dict(sum((r.drops for r in results), Counter[str]())),  # notices, by reason
        "errors": dict(sum((r.errors for r in results), Counter[str]())),
        "closed_by_server": sum(r.closed_by_server for r in results),
        "late_sends": sum(r.late_sends for r in results),
        "skipped_slots": sum(r.skipped_slots for r in results),
    }


def fairness(stats: dict[str, Any]) -> float | None:
    """Frames processed by the least served stream over the most served one (1 = equal turns)."""
    done = [s["processed"] for s in stats["streams"].values()]
    return round(min(done) / max(done), 3) if done and max(done) else None


def emit(summary: dict[str, Any], json_out: str | None) -> None:
    """Print the summary; with --json-out also append it as one JSON line."""
    print(json.dumps(summary, indent=2))
    if json_out:
        with open(json_out, "a") as fh:
            fh.write(json.dumps(summary) + "\n")


def add_run_args(ap: argparse.ArgumentParser, duration: float) -> None:
    """The model, the daemon's workers, the load and --json-out: flags every benchmark shares."""
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument(
        "--model-dir", default=os.environ.get("VISION_DAEMON_MODEL_DIR", "../shared/models")
    )
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=duration)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json-out", help="append the summary as one JSON line to this file")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(ap, duration=60.0)
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--ceiling-s", type=float, default=20.0)
    ap.add_argument(
        "--rate-aware", action="store_true", help="the cameras follow the daemon's rate advice"
    )
    ap.add_argument("daemon_args", nargs="*", help="extra vision-daemon flags after --")
    args = ap.parse_args()

    jpegs = encode_frames(VideoSource(args.video), quality=90)  # the ceiling's and the daemon's
    ceil = ceiling(args.model, args.model_dir, jpegs, args.ceiling_s)
    print(
        f"ceiling: {ceil['fps']:.1f} fps, median {ceil['median_ms']:.1f} ms/frame "
        f"({ceil['frames']} frames, {ceil['backend']})"
    )
    result, stats = drive_daemon(args, lambda tcp, _pid, _api: load(args, tcp, jpegs))
    samples = sorted(result["samples"])
    rtts = [r for _, r in samples]
    # throughput over the steady part: skip the first 2 s of ramp
    steady = [t for t, _ in samples if t >= 2.0]
    span = (max(steady) - 2.0) if steady else 1.0
    fps = len(steady) / span if span > 0 else 0.0
    totals = stats["totals"]
    summary = {
        "machine": f"{os.cpu_count()} cpu",
        "model": args.model,
        "workers": args.workers,
        "max_batch": args.max_batch,
        "streams": args.streams,
        "fps": args.fps,
        "duration_s": args.duration,
        "offered_fps": args.streams * args.fps,
        "ceiling_fps": round(ceil["fps"], 1),
        "ceiling_median_ms": round(ceil["median_ms"], 1),
        "daemon_fps": round(fps, 1),
        "ratio": round(fps / ceil["fps"], 3),
        "rtt_ms": percentiles(rtts, digits=1),
        "rtt_median_minus_bare_ms": round(float(np.median(rtts)) - ceil["median_ms"], 1),
        "drift": drift(rtts),
        "server_ms": {k: v for k, v in totals["latency_ms"].items()},
        "dropped_by_reason": {k: v for k, v in totals["dropped_by_reason"].items() if v},
        "sent": result["sent"],
        "results": len(rtts),
        "mean_batch": stats["mean_batch_size"],
        "fairness": fairness(stats),
        "rate_aware": args.rate_aware,
    }
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
