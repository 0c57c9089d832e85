"""Benchmark: what tracking plus zones and lines cost per frame (issue 18; target under 1 ms).

    .venv/bin/python -m benchmarks.analytics_cost                      # 8 streams, 5/15/30 objects
    .venv/bin/python -m benchmarks.analytics_cost --frames 50 --objects 30 --json out.json

Input: a synthetic scene per stream (no model, so only the analytics are timed): `--objects`
boxes (40x80 people and 80x60 cars) moving at constant speed and bouncing off the edges of a
768x576 frame, with 2 px of noise per coordinate and `--drop` of the frames dropped at random,
so the tracker also predicts across gaps. Each of `--streams` streams has its own
StreamAnalytics with 2 zones and 2 lines (the layout below), and the streams' frames are fed
interleaved, one frame of each stream in turn, as the daemon's workers would. One thread.

Reported per object count: ms per frame (mean, p50, p95) for the tracker alone (StreamTracker)
and for everything (StreamAnalytics.update: tracker, zones, lines, events), events per frame,
and the share of one core that 8 streams at 10 fps would take.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np

from vision_daemon.analytics import LineConfig, StreamAnalytics, StreamTracker, ZoneConfig

W, H = 768, 576
ZONES = (
    ((50.0, 300.0), (350.0, 300.0), (350.0, 560.0), (50.0, 560.0)),
    ((420.0, 100.0), (740.0, 120.0), (700.0, 400.0), (450.0, 380.0), (400.0, 250.0)),
)
LINES = (((0.0, 330.0), (768.0, 330.0)), ((384.0, 0.0), (384.0, 576.0)))


def scene(
    objects: int, frames: int, drop: float, seed: int
) -> list[tuple[float, list[dict[str, Any]]]]:
    """(timestamp, detections) of the frames kept, at 10 fps."""
    rng = np.random.default_rng(seed)
    cars = rng.random(objects) < 0.3
    size = np.where(cars[:, None], [80.0, 60.0], [40.0, 80.0])
    pos = rng.uniform([0, 0], [W, H], (objects, 2)) - size / 2
    pos = np.clip(pos, 0, [W, H] - size)
    vel = rng.uniform(-8, 8, (objects, 2)) * np.where(cars[:, None], 2.0, 1.0)
    out: list[tuple[float, list[dict[str, Any]]]] = []
    for k in range(frames):
        pos += vel
        for axis, limit in ((0, W), (1, H)):  # bounce off the frame's edges
            low = pos[:, axis] < 0
            high = pos[:, axis] + size[:, axis] > limit
            vel[low | high, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], 0, limit - size[:, axis])
        if rng.random() < drop:
            continue
        noisy = pos + rng.normal(0, 2, pos.shape)
        dets = [
            {
                "label": "car" if cars[i] else "person",
                "conf": float(rng.uniform(0.4, 0.95)),
                "bbox": [
                    float(noisy[i, 0]),
                    float(noisy[i, 1]),
                    float(noisy[i, 0] + size[i, 0]),
                    float(noisy[i, 1] + size[i, 1]),
                ],
                "class_id": 2 if cars[i] else 0,
            }
            for i in range(objects)
        ]
        out.append((k / 10, dets))
    return out


def analytics(stream: str) -> StreamAnalytics:
    zones = [ZoneConfig(stream, f"zone{i}", poly, loiter_s=5.0) for i, poly in enumerate(ZONES)]
    lines = [LineConfig(stream, f"line{i}", pts) for i, pts in enumerate(LINES)]
    return StreamAnalytics(stream, lines=lines, zones=zones)


def run(objects: int, streams: int, frames: int, drop: float) -> dict[str, Any]:
    scenes = [scene(objects, frames, drop, seed=s) for s in range(streams)]
    longest = max(len(s) for s in scenes)

    trackers = [StreamTracker() for _ in range(streams)]
    tracker_ms: list[float] = []
    for k in range(longest):
        for tracker, frames_of in zip(trackers, scenes, strict=True):
            if k < len(frames_of):
                t, dets = frames_of[k]
                start = time.perf_counter()
                tracker.update(dets, t)
                tracker_ms.append((time.perf_counter() - start) * 1000)

    full = [analytics(f"cam{s}") for s in range(streams)]
    full_ms: list[float] = []
    events = 0
    for k in range(longest):
        for a, frames_of in zip(full, scenes, strict=True):
            if k < len(frames_of):
                t, dets = frames_of[k]
                start = time.perf_counter()
                _, ev = a.update(dets, t)
                full_ms.append((time.perf_counter() - start) * 1000)
                events += len(ev)
    mean = statistics.fmean(full_ms)
    return {
        "objects": objects,
        "streams": streams,
        "frames": len(full_ms),
        "tracker_ms_mean": statistics.fmean(tracker_ms),
        "tracker_ms_p50": statistics.median(tracker_ms),
        "tracker_ms_p95": float(np.percentile(tracker_ms, 95)),
        "total_ms_mean": mean,
        "total_ms_p50": statistics.median(full_ms),
        "total_ms_p95": float(np.percentile(full_ms, 95)),
        "events_per_frame": events / len(full_ms),
        "core_share_8x10fps": mean / 1000 * 8 * 10,
        "live_tracks_end": sum(len(a.tracker.tracks) for a in full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", default="5,15,30", help="object counts, comma-separated")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300, help="frames per stream (10 fps)")
    parser.add_argument("--drop", type=float, default=0.1, help="share of frames dropped")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    analytics("warm").update([], 0.0)  # import ultralytics outside the timing
    rows = [run(int(n), args.streams, args.frames, args.drop) for n in args.objects.split(",") if n]
    print(
        f"{platform.processor() or platform.machine()}, {args.streams} streams, "
        f"{args.frames} frames each at 10 fps, {args.drop:.0%} dropped; ms per frame"
    )
    print("objects  tracker mean/p50/p95   total mean/p50/p95   events/frame  core at 8x10fps")
    for r in rows:
        print(
            f"{r['objects']:7d}  {r['tracker_ms_mean']:5.3f} {r['tracker_ms_p50']:5.3f} "
            f"{r['tracker_ms_p95']:5.3f}    {r['total_ms_mean']:5.3f} {r['total_ms_p50']:5.3f} "
            f"{r['total_ms_p95']:5.3f}   {r['events_per_frame']:12.2f}  "
            f"{r['core_share_8x10fps']:14.1%}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
