"""Benchmark: N streams at F fps through local workers and through 1 and 2 Triton endpoints
(vision-triton on this machine), in both wire formats, one run after another in one process.

    .venv/bin/python -m benchmarks.triton_scale --model yolov8n_int8_openvino_model \
        --streams 8 --fps 10 --duration 30

For each setup: processed fps (steady part), round trip p50/p95/p99, drops by reason, and the
tensor bytes per frame each endpoint counted (`/stats` backends). The servers share the machine
with the daemon and the load, as the local workers do.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import VIDEO, add_run_args, drive_daemon, emit, fairness, load
from clients.lib import percentiles
from clients.sources import VideoSource
from stress.load import encode_frames
from triton_serve.process import TritonProcess

SETUPS = (  # name, endpoints, model suffix (compact = the plain name), extra daemon flags
    ("local workers", 0, "", []),
    ("compact (JPEG), 1 endpoint", 1, "", []),
    ("compact (JPEG), 2 endpoints", 2, "", []),
    ("compact (pixels), 1 endpoint", 1, "", ["--backend-image", "pixels"]),
    ("float32, 1 endpoint", 1, "_fp32", []),
    ("float32, 2 endpoints", 2, "_fp32", []),
)


async def drive(run: argparse.Namespace, jpegs: list[bytes], tcp: int, *_: int) -> dict[str, Any]:
    return await load(run, tcp, jpegs)


@contextmanager
def servers(n: int, model_dir: str, model: str) -> Iterator[list[TritonProcess]]:
    with ExitStack() as stack:
        started = []
        for _ in range(n):
            server = TritonProcess(Path(model_dir), model).start()
            stack.callback(server.stop)
            started.append(server)
        yield started


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(ap, duration=30.0)
    ap.add_argument("--remote-workers", type=int, default=4, help="workers with Triton endpoints")
    ap.add_argument("--only", help="run only setups whose name contains this")
    args = ap.parse_args()
    args.max_batch, args.rate_aware = 1, False
    jpegs = encode_frames(VideoSource(str(VIDEO)), quality=90)
    rows = []
    for name, count, suffix, flags in SETUPS:
        if args.only and args.only not in name:
            continue
        with servers(count, args.model_dir, args.model) as started:
            run = argparse.Namespace(**vars(args))
            if started:
                urls = [
                    s.url("http" if i % 2 == 0 else "grpc", suffix) for i, s in enumerate(started)
                ]
                run.model, run.workers = urls[0], args.remote_workers
                run.daemon_args = [*(f for u in urls[1:] for f in ("--model", u)), *flags]
            else:
                run.daemon_args = flags
            result, stats = drive_daemon(run, functools.partial(drive, run, jpegs))
        samples = sorted(result["samples"])
        rtts = [r for _, r in samples]
        steady = [t for t, _ in samples if t >= 2.0]
        span = (max(steady) - 2.0) if steady else 1.0
        backends = stats["backends"]
        row = {
            "setup": name,
            "workers": run.workers,
            "daemon_fps": round(len(steady) / span, 1) if span > 0 else 0.0,
            "rtt_ms": percentiles(rtts, digits=1) if rtts else {},
            "dropped_by_reason": {
                k: v for k, v in stats["totals"]["dropped_by_reason"].items() if v
            },
            "sent": result["sent"],
            "results": len(rtts),
            "fairness": fairness(stats),
            "bytes_per_frame": [b["bytes_per_frame"] for b in backends],
            "frames_per_endpoint": [b["frames"] for b in backends],
            "infer_ms_p50": stats["totals"]["latency_ms"].get("infer_ms", {}).get("p50"),
            "median_rtt_ms": round(float(np.median(rtts)), 1) if rtts else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    emit(
        {
            "machine": f"{os.cpu_count()} cpu",
            "model": args.model,
            "streams": args.streams,
            "fps": args.fps,
            "duration_s": args.duration,
            "setups": rows,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
