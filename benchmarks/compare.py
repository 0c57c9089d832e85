"""This checkout against another one, in one run on one machine: a regression check.

    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 .venv/bin/python -m benchmarks.compare \\
      --against /tmp/oldmain --model yolov8n_int8_openvino_model

`--against` is another checkout of the project (for example `git worktree add /tmp/oldmain
<commit>`). For each round, each scenario (8 streams x 10 fps, then 1 x 10) runs in both
checkouts one after the other, alternating which goes first, through that checkout's own
`benchmarks.throughput` (so each side runs its own daemon and its own client). Never two at once.
Prints one markdown row per run and the median of the rounds per scenario and checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
SCENARIOS = ((8, 10.0), (1, 10.0))


def run_one(checkout: Path, streams: int, fps: float, args: argparse.Namespace) -> dict[str, Any]:
    """One benchmarks.throughput run in `checkout`; its JSON summary."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--model",
            args.model,
            "--model-dir",
            str(Path(args.model_dir).resolve()),
            "--streams",
            str(streams),
            "--fps",
            str(fps),
            "--duration",
            str(args.duration),
            "--ceiling-s",
            str(args.ceiling_s),
            "--video",
            str(Path(args.video).resolve()),
            "--json-out",
            out.name,
        ]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
        summary: dict[str, Any] = json.loads(out.read().splitlines()[-1])
        return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--against", required=True, help="the other checkout (a directory)")
    ap.add_argument("--model", default="yolov8n_int8_openvino_model")
    ap.add_argument(
        "--model-dir", default=os.environ.get("VISION_DAEMON_MODEL_DIR", "../shared/models")
    )
    ap.add_argument("--video", default=str(HERE.parent / "shared" / "data" / "vtest.avi"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--ceiling-s", type=float, default=3.0)
    args = ap.parse_args()
    sides = {"this": HERE, "against": Path(args.against).resolve()}
    rows: list[tuple[str, int, float, dict[str, Any]]] = []
    print("| round | checkout | streams x fps | processed fps | RTT p50 / p99 ms | drops |")
    print("|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for streams, fps in SCENARIOS:
            order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
            for label, checkout in order:
                s = run_one(checkout, streams, fps, args)
                rows.append((label, streams, fps, s))
                rtt = s["rtt_ms"]
                print(
                    f"| {r + 1} | {label} | {streams} x {fps:g} | {s['daemon_fps']} | "
                    f"{rtt['p50']} / {rtt['p99']} | {s['dropped_by_reason'] or 'none'} |",
                    flush=True,
                )
    print("\nMedians of the rounds:\n")
    print("| checkout | streams x fps | processed fps | RTT p50 ms | RTT p99 ms |")
    print("|---|---|---|---|---|")
    for streams, fps in SCENARIOS:
        for label in sides:
            runs = [s for lab, n, f, s in rows if (lab, n, f) == (label, streams, fps)]
            print(
                f"| {label} | {streams} x {fps:g} | "
                f"{statistics.median(s['daemon_fps'] for s in runs):.1f} | "
                f"{statistics.median(s['rtt_ms']['p50'] for s in runs):.1f} | "
                f"{statistics.median(s['rtt_ms']['p99'] for s in runs):.1f} |"
            )


if __name__ == "__main__":
    main()
