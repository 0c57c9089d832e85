"""Does `curl /stats` during a multi-stream run agree with what the clients counted?

    .venv/bin/python -m benchmarks.stats_check --port 9000 --api-port 8000 --streams 8 --fps 10

Runs vision-stress's simulated cameras against a running daemon. Halfway through, it runs
`curl -s /stats` and at the same moment copies the clients' own counters. It prints both side
by side per stream, with the difference in frames; the target is within one second's worth
(fps frames).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from typing import Any

from stress.load import LoadSpec, run_load


async def check(args: argparse.Namespace) -> dict[str, Any]:
    # fresh stream names: a name reconnecting within stream_grace_s would carry old counters
    prefix = f"check{os.getpid()}-"
    spec = LoadSpec(
        "127.0.0.1", args.port, None, args.fps, args.duration, "video", args.video, prefix=prefix
    )
    latest: dict[str, dict[str, Any]] = {}
    snap: dict[str, Any] = {}

    def on_progress(progress: dict[str, dict[str, Any]]) -> None:
        latest.update(progress)

    async def probe() -> None:
        await asyncio.sleep(args.duration / 2)
        clients = {k: dict(v) for k, v in latest.items()}  # the clients' counters, now
        t0 = time.monotonic()
        out = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-s", f"http://127.0.0.1:{args.api_port}/stats"],
            capture_output=True,
            text=True,
            check=True,
        )
        snap["curl_ms"] = (time.monotonic() - t0) * 1000
        snap["clients"] = clients
        snap["stats"] = json.loads(out.stdout)

    prober = asyncio.create_task(probe())
    await run_load(spec, args.streams, 1, on_progress)
    await prober
    return snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--api-port", type=int, default=8000)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--video", default="../shared/data/vtest.avi")
    args = ap.parse_args()
    snap = asyncio.run(check(args))
    streams = snap["stats"]["streams"]
    rows = streams.values() if isinstance(streams, dict) else streams
    by_name = {s["name"]: s for s in rows}
    print(
        f"curl /stats took {snap['curl_ms']:.0f} ms; the clients' progress is sampled every 0.5 s"
    )
    print(
        "stream     sent(client) received(/stats)  diff | "
        "results+drops(client) processed+dropped(/stats)  diff"
    )
    worst = 0
    for name, c in sorted(snap["clients"].items()):
        s = by_name[name]
        answered = c["results"] + c["dropped"]
        ended = s["processed"] + s["dropped"]
        d1, d2 = s["received"] - c["sent"], ended - answered
        worst = max(worst, abs(d1), abs(d2))
        print(
            f"{name:10s} {c['sent']:12d} {s['received']:16d} {d1:5d} | "
            f"{answered:21d} {ended:25d} {d2:5d}"
        )
    verdict = "agree" if worst <= args.fps else "DISAGREE"
    print(f"largest difference: {worst} frames (one second = {args.fps:g}): {verdict}")


if __name__ == "__main__":
    main()
