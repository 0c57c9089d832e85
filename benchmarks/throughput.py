"""Benchmark: the bare-loop ceiling vs the daemon under N streams at F fps of real video, in one run.

    .venv/bin/python -m benchmarks.throughput --model yolov8n --streams 8 --fps 10 --duration 60

(1) ceiling: a bare loop of JPEG decode + model.predict, no daemon;
(2) the daemon (a real `vision-daemon` subprocess) fed by one asyncio client per stream on an
absolute schedule. Prints throughput / ceiling, round-trip and server-side latency percentiles,
drops by reason and latency drift (median of the last third vs the first third).
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from benchmarks.harness import VIDEO, add_run_args, drive_daemon, emit, fairness, load
from clients.lib import drift, percentiles
from clients.sources import VideoSource
from stress.load import encode_frames


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
