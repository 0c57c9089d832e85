"""Benchmark: what one /stats snapshot costs the event loop with N streams, in process.

    .venv/bin/python -m benchmarks.snapshot_cost --streams 1024

Fills a real Pipeline with N streams, each with `--frames` processed frames in its windows (so
every latency percentile has samples), then times `SnapshotCache.refresh()`: the build, the
pydantic validation and the JSON encoding, which the daemon does once per `stats_refresh_s`
whatever the number of scrapes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from vision_daemon import protocol as p
from vision_daemon.config import load_config
from vision_daemon.ingest.tcp import TcpIngest
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import Hub
from vision_daemon.pipeline import Pipeline
from vision_daemon.scheduler import Scheduler
from vision_daemon.snapshot import Components, SnapshotCache
from vision_daemon.streams import Outcome, Report, Reports


class NullSink:
    """A sink that accepts everything (the cost measured is the snapshot's, not a transport's)."""

    peer = "127.0.0.1:1"

    def result(self, payload: bytes) -> bool:
        return True

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        return None

    def error(self, code: str, message: str, frame_id: int | None = None) -> None:
        return None

    def frame_done(self) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=20, help="processed frames per stream")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    n = args.streams
    cfg = load_config(
        overrides={"log_dir": "", "max_streams": n, "max_streams_per_connection": n}, environ={}
    )
    reports = Reports()
    scheduler = Scheduler(1, 60.0, reports)
    pipe = Pipeline(cfg, reports, scheduler, Hub(), Metrics(cfg.metrics_max_streams))
    sink = NullSink()
    image = b"\xff\xd8\xff" + bytes(2000)
    for k in range(args.frames):
        for i in range(n):
            pipe.submit(sink, p.Frame(f"cam{i}", k, 0.0, image, "jpeg"), p.StreamOptions())
        jobs = asyncio.run(scheduler.take(n, 0.0))
        for job in jobs:
            timings = {"decode_ms": 2.0 + k % 3, "infer_ms": 30.0 + k}
            reports.put(Report(job, Outcome(detections=[], timings=timings)))
        pipe.drain()
    comps = Components(pipe, Hub(), TcpIngest(cfg, pipe), time.monotonic(), lambda: (True, ""))
    cache = SnapshotCache(comps)
    cache.refresh()
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        snap = cache.refresh()
    ms = (time.perf_counter() - t0) * 1000 / args.repeat
    print(
        json.dumps(
            {
                "streams": len(snap.data["streams"]),
                "samples_per_stream": args.frames,
                "refresh_ms": round(ms, 1),
                "body_bytes": len(snap.body),
            }
        )
    )


if __name__ == "__main__":
    main()
