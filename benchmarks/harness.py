"""What the benchmarks share: a `vision-daemon` subprocess of this checkout (started with
tests/launcher.py, which reads its ports from --ports-file), the simulated cameras that load it,
the shared flags, and how a summary is printed and saved."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from stress.load import LoadSpec, run_load
from tests.launcher import DaemonDidNotStart, DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT.parent / "shared" / "data" / "vtest.avi"


def start_daemon(
    args: argparse.Namespace, log_path: str | None = None
) -> tuple[DaemonProcess, int, int]:
    """A `vision-daemon` subprocess of this checkout on free ports; its stderr to `log_path`.

    The caller ends it with `stop()` (SIGTERM, then wait) and `close()`."""
    daemon = DaemonProcess(
        [
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
        ],
        log=log_path,
    )
    try:
        ports = daemon.ports(timeout=900)  # a first start may export the model: minutes
    except DaemonDidNotStart as exc:
        daemon.close()
        raise SystemExit(f"daemon did not start: {exc}") from None
    return daemon, int(ports["tcp"]), int(ports["http"])


def drive_daemon(
    args: argparse.Namespace,
    drive: Callable[[int, int, int], Coroutine[Any, Any, dict[str, Any]]],
    log_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a daemon, run `drive(tcp_port, pid, api_port)` against it, read its /stats, stop it."""
    daemon, tcp, api = start_daemon(args, log_path)
    try:
        result = asyncio.run(drive(tcp, daemon.pid, api))
        stats = httpx.get(f"http://127.0.0.1:{api}/stats", timeout=10).json()
    finally:
        daemon.stop()
        daemon.close()
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
