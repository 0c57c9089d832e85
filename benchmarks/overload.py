"""Latency at overload against latency at rest, in one command on one machine (issue 17).

    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.overload --model yolov8n_int8_openvino_model

One after another, never two at once:
1. OpenVINO's `benchmark_app` with the throughput hint: the model alone (no decode, no pre- or
   post-processing), the limit the daemon is measured against.
2. The bare loop: `--workers` threads, each decoding the JPEGs and calling its own detector
   exactly as a daemon worker does (same factory and settings), with no daemon around it.
3. The daemon (a `vision-daemon` subprocess with its defaults) with legacy clients (they send at
   their own rate whatever happens) at 1 x 10 fps and at 8 x 10 fps.
4. The daemon with rate-aware clients (they declare `source_fps` 10 and follow `rate` advice)
   at 8 x 10 fps.
5. Capacity at 10 fps per camera (p95 at most 200 ms, drops at most 5%), found by
   `vision-stress --find-capacity`, with motion gating off and on, on a still scene (one vtest
   frame sent again and again) and on vtest.avi.

Prints the tables as markdown (docs/PERFORMANCE.md takes them as they are); `--json-out`
appends everything as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    VIDEO,
    add_run_args,
    drive_daemon,
    emit,
    fairness,
    load,
    start_daemon,
)
from clients.lib import drift, percentiles
from clients.sources import VideoSource
from stress.load import encode_frames

GATE = 0.005  # the motion-gating threshold measured in docs/PERFORMANCE.md


def model_only(args: argparse.Namespace, seconds: float) -> float | None:
    """benchmark_app's throughput-hint fps on the model's OpenVINO IR; None for other formats."""
    from vision_daemon.detectors.yolo import resolve_model

    path = Path(resolve_model(args.model, Path(args.model_dir), "cpu")[0])
    xml = next(iter(sorted(path.glob("*.xml"))), None) if path.is_dir() else None
    if xml is None:
        return None
    tool = Path(sys.executable).parent / "benchmark_app"
    cmd = [str(tool), "-m", str(xml), "-d", "CPU", "-hint", "throughput", "-t", str(int(seconds))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120).stdout
    found = re.search(r"Throughput:\s+([\d.]+) FPS", out)
    if found is None:
        raise SystemExit(f"benchmark_app printed no throughput:\n{out[-2000:]}")
    return float(found.group(1))


def bare_loop(args: argparse.Namespace, jpegs: list[bytes], seconds: float) -> float:
    """Frames a second `workers` threads decode and detect, each with its own detector."""
    from vision_daemon.config import load_config
    from vision_daemon.decode import decode_for
    from vision_daemon.detectors import load_detector_factory
    from vision_daemon.protocol import Frame

    config = load_config(
        overrides={"model": args.model, "model_dir": args.model_dir, "workers": args.workers}
    )
    factory = load_detector_factory(config)
    detectors = [factory() for _ in range(args.workers)]
    for det in detectors:  # one after another, as the daemon's workers load
        det.warmup()
    counts = [0] * args.workers
    start = threading.Barrier(args.workers + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        det = detectors[i]
        size = det.info.imgsz if config.reduced_decode else 0
        start.wait()
        n = i
        while time.perf_counter() < stop_at[0]:
            frame = Frame("bare", n, 0.0, jpegs[n % len(jpegs)], "jpeg")
            det.detect([decode_for(frame, config.max_image_pixels, size).image], contended=True)
            counts[i] += 1
            n += args.workers

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.workers)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def daemon_run(
    args: argparse.Namespace, streams: int, rate_aware: bool, jpegs: list[bytes]
) -> dict[str, Any]:
    """One daemon, `streams` cameras at `args.fps` for `args.duration` s; the steady part's
    figures (the first 2 s of ramp are left out of the fps)."""
    run_args = argparse.Namespace(**{**vars(args), "streams": streams, "rate_aware": rate_aware})
    result, stats = drive_daemon(run_args, lambda tcp, _pid, _api: load(run_args, tcp, jpegs))
    samples = sorted(result["samples"])
    rtts = [r for _, r in samples]
    steady = [t for t, _ in samples if t >= 2.0]
    span = (max(steady) - 2.0) if steady else 0.0
    return {
        "streams": streams,
        "fps_each": args.fps,
        "rate_aware": rate_aware,
        "processed_fps": round(len(steady) / span, 1) if span > 0 else 0.0,
        "rtt_ms": percentiles(rtts, digits=1),
        "drift": drift(rtts),
        "fairness": fairness(stats),
        "sent": result["sent"],
        "results": len(rtts),
        "dropped_by_reason": {k: v for k, v in stats["totals"]["dropped_by_reason"].items() if v},
        "server_ms": stats["totals"]["latency_ms"],
    }


def capacity(args: argparse.Namespace, gate: float, source: list[str], out: Path) -> dict[str, Any]:
    """vision-stress --find-capacity against a fresh daemon with `--motion-gate gate`."""
    run_args = argparse.Namespace(**{**vars(args), "daemon_args": ["--motion-gate", str(gate)]})
    proc, tcp, _api = start_daemon(run_args)
    try:
        cmd = [
            sys.executable, "-m", "stress.cli", "--find-capacity", "--fps", "10",
            "--slo-p95-ms", "200", "--max-drop-pct", "5", "--duration", str(args.step_s),
            "--max-streams", "64", "--port", str(tcp), "--api-port", "0", "--no-live",
            "--out-dir", str(out), *source,
        ]  # fmt: skip
        subprocess.run(cmd, check=False, capture_output=True, timeout=1800)
    finally:
        proc.stop()
        proc.close()
    found = json.loads((out / "capacity.json").read_text())
    best = found["capacity_streams"]
    at = next((s for s in found["steps"] if s["streams"] == best), None)
    return {"gate": gate, "capacity_streams": best, "at_capacity": at, "steps": found["steps"]}


def tables(summary: dict[str, Any]) -> str:
    limit = summary["benchmark_app_fps"]
    lines = [
        f"benchmark_app (throughput hint, model only): "
        f"{limit if limit is not None else 'n/a'} fps; bare loop "
        f"({summary['workers']} threads): {summary['bare_loop_fps']:.1f} fps",
        "",
        "| run | processed fps | of benchmark_app | RTT p50 / p95 / p99 ms | drift | fairness "
        "| frames sent | drops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        label = ("rate-aware" if r["rate_aware"] else "legacy") + (
            f" clients, {r['streams']} x {r['fps_each']:g} fps"
        )
        share = f"{r['processed_fps'] / limit:.2f}" if limit else "n/a"
        rtt = r["rtt_ms"]
        drops = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items()) or "none"
        lines.append(
            f"| {label} | {r['processed_fps']} | {share} | {rtt['p50']} / {rtt['p95']} / "
            f"{rtt['p99']} | {r['drift']} | {r['fairness']} | {r['sent']} | {drops} |"
        )
    if summary["capacity"]:
        lines += [
            "",
            "| scene | motion gate | capacity (10 fps cameras) | at capacity: p95 ms, drops %, "
            "processed fps | the first step that failed |",
            "|---|---|---|---|---|",
        ]
        for c in summary["capacity"]:
            at = c["at_capacity"] or {}
            failed = [s for s in c["steps"] if not s["passed"]]
            first = min(failed, key=lambda s: s["streams"]) if failed else None
            lines.append(
                f"| {c['scene']} | {c['gate'] or 'off'} | {c['capacity_streams']} | "
                f"{at.get('p95_ms', 'n/a')}, {at.get('drop_pct', 'n/a')}, "
                f"{at.get('processed_fps', 'n/a')} | "
                + (
                    f"{first['streams']}: {first['why']} {first.get('dropped_by_reason') or ''}"
                    if first
                    else "none"
                )
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(ap, duration=30.0)
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--model-only-s", type=float, default=15.0, help="benchmark_app's -t")
    ap.add_argument("--bare-s", type=float, default=15.0, help="the bare loop's seconds")
    ap.add_argument("--step-s", type=float, default=8.0, help="each capacity step's seconds")
    ap.add_argument(
        "--scenes", default="still,vtest", help="capacity searches: still, vtest, or none"
    )
    ap.add_argument("daemon_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.max_batch = 1
    args.daemon_args = []

    jpegs = encode_frames(VideoSource(args.video), quality=90)
    summary: dict[str, Any] = {"model": args.model, "workers": args.workers}
    summary["benchmark_app_fps"] = model_only(args, args.model_only_s)
    print(f"benchmark_app: {summary['benchmark_app_fps']} fps", flush=True)
    summary["bare_loop_fps"] = round(bare_loop(args, jpegs, args.bare_s), 1)
    print(f"bare loop: {summary['bare_loop_fps']} fps", flush=True)
    summary["runs"] = []
    for streams, rate_aware in ((1, False), (args.streams, False), (args.streams, True)):
        run = daemon_run(args, streams, rate_aware, jpegs)
        summary["runs"].append(run)
        print(f"{streams} x {args.fps:g} rate-aware={rate_aware}: {run['processed_fps']} fps, "
              f"rtt {run['rtt_ms']}", flush=True)  # fmt: skip
    summary["capacity"] = []
    with tempfile.TemporaryDirectory() as tmp:
        still = Path(tmp) / "still"
        still.mkdir()
        (still / "frame.jpg").write_bytes(jpegs[0])  # vtest.avi's first frame
        sources = {
            "still": ["--source", "folder", "--folder", str(still)],
            "vtest": ["--source", "video", "--video", args.video],
        }
        for scene in [s for s in args.scenes.split(",") if s in sources]:
            for gate in (0.0, GATE):
                found = capacity(args, gate, sources[scene], Path(tmp) / f"{scene}-{gate}")
                found["scene"] = "still (one vtest frame)" if scene == "still" else "vtest.avi"
                summary["capacity"].append(found)
                print(f"capacity {scene} gate {gate}: {found['capacity_streams']}", flush=True)
    print(tables(summary))
    if args.json_out:
        emit(summary, args.json_out)


if __name__ == "__main__":
    main()
