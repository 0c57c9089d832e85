"""vision-client: stream frames from a camera, video, folder or synthetic source to vision-daemon.

    vision-client --mode video --source ../shared/data/vtest.avi --fps 10
    vision-client --mode synthetic --fps 20 --duration 5 --bench-out bench.csv

Exit codes: 0 done; 2 bad arguments; 3 the source cannot be opened; 4 the daemon is not
reachable; 5 the daemon refused the token; 6 protocol error or the daemon closed the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import cv2

from clients.engine import Endpoint, Hooks, SourceFeed, Tally, stream
from clients.lib import (
    EXIT_OK,
    EXIT_PROTOCOL,
    EXIT_SOURCE,
    ClientError,
    add_daemon_args,
    check_transport,
    exit_code,
    percentiles,
    stop_on_signals,
    tls_of,
    unix_socket_of,
)
from clients.sources import Pacer, Source, SourceError, VideoSource, open_source

CSV_COLUMNS = [
    "timestamp",
    "stream",
    "mode",
    "target_fps",
    "duration_s",
    "frames_sent",
    "results",
    "server_drops",
    "errors",
    "send_fps",
    "avg_fps",
    "avg_latency_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
]


def summarize(tally: Tally) -> dict[str, Any]:
    """The run's figures, as printed, written to --bench-out and --json."""
    lat = percentiles([rtt for _, _, rtt in tally.samples])
    return {
        "stream": tally.name,
        "frames_sent": tally.sent,
        "results": tally.results,
        "server_drops": sum(tally.drops.values()),
        "drops_by_reason": dict(tally.drops),
        "errors": sum(tally.errors.values()),
        "errors_by_code": dict(tally.errors),
        "skipped_slots": tally.skipped_slots,
        "send_fps": round(tally.sent / tally.send_elapsed, 2) if tally.send_elapsed else 0.0,
        "avg_fps": round(tally.results / tally.elapsed, 2) if tally.elapsed else 0.0,
        "latency_ms": lat,
        "advised_fps": tally.advised_fps,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vision-client",
        description="Stream frames to vision-daemon and report round-trip latency.",
        epilog="exit codes: 0 ok, 2 bad arguments, 3 source cannot be opened, "
        "4 daemon not reachable, 5 token refused, 6 protocol error / connection closed",
    )
    ap.add_argument(
        "--mode",
        default="synthetic",
        help="synthetic, webcam, video, folder (legacy: 0 = webcam/video via --source, "
        "1 = folder, 2 = synthetic); default synthetic",
    )
    ap.add_argument("--source", help="camera index, video file or stream URL")
    ap.add_argument("--folder", help="folder of images, played in sorted order")
    ap.add_argument("--loop", action="store_true", help="loop a video file or folder")
    add_daemon_args(ap)
    add_send_args(ap)
    ap.add_argument("--encoding", choices=["jpeg", "raw"], default="jpeg")
    ap.add_argument("--results-dir", default="results", help="where <stream>.jsonl is written")
    ap.add_argument("--no-save", action="store_true", help="do not write results/<stream>.jsonl")
    ap.add_argument("--bench-out", default=None, help="append one summary row to this CSV file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument(
        "--rate-advice",
        action="store_true",
        help="send at the rate the daemon advises (never above --fps)",
    )
    return ap


def add_send_args(ap: argparse.ArgumentParser) -> None:
    """--stream, --fps, --duration, --quality, --width, --height: vision-client's and vision-viz's."""
    ap.add_argument("--stream", default=None, help="stream name (default: from the source)")
    ap.add_argument(
        "--fps",
        type=float,
        default=None,
        help="send rate on an absolute schedule (default: a video file's own rate, else 10)",
    )
    ap.add_argument(
        "--duration", type=float, default=0.0, help="seconds to stream (0 = until the source ends)"
    )
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100")
    ap.add_argument("--width", type=int, default=0, help="resize frames to this width")
    ap.add_argument("--height", type=int, default=0, help="resize frames to this height")


def check_send_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) what add_send_args' flags cannot mean."""
    check_transport(ap, args)
    if args.fps is not None and args.fps <= 0:
        ap.error("--fps must be > 0")
    if args.duration < 0:
        ap.error("--duration must be >= 0")
    if not 1 <= args.quality <= 100:
        ap.error("--quality must be 1..100")
    if (args.width > 0) != (args.height > 0):
        ap.error("--width and --height go together")


def stream_name(args: argparse.Namespace, source: Source) -> str:
    return args.stream or "".join(c if c.isalnum() or c in "_.:-" else "_" for c in source.name)


def send_fps(args: argparse.Namespace, source: Source) -> float:
    """--fps, else a video file's own frame rate, else 10."""
    if args.fps is not None:
        return float(args.fps)
    native = source.cap.get(cv2.CAP_PROP_FPS) if isinstance(source, VideoSource) else 0.0
    return float(native) if source.total and 0 < native <= 240 else 10.0


async def run_source(
    args: argparse.Namespace,
    source: Source,
    stop: asyncio.Event,
    hooks: Hooks | None = None,
    client_name: str = "vision-client",
    tally: Tally | None = None,
) -> Tally:
    """Stream one source with the engine: --fps on an absolute schedule, for --duration."""
    fps = send_fps(args, source)
    encoding = "raw" if args.transport == "shm" else args.encoding  # shm carries raw pixels
    feed = SourceFeed(source, encoding, args.quality, args.width, args.height)
    start = time.monotonic()
    pacer = Pacer(fps, start, start + args.duration if args.duration else None)
    endpoint = Endpoint(
        args.host,
        args.port,
        args.token,
        client_name,
        unix_socket_of(args),
        args.transport,
        args.api_port,
        rate_advice=getattr(args, "rate_advice", False),
        tls=tls_of(args),
    )
    tally = tally or Tally(stream_name(args, source))
    return await stream(endpoint, tally, feed, pacer, stop=stop, hooks=hooks)


def _progress(source: Source, args: argparse.Namespace) -> Any:
    """A rich progress bar for file and folder sources, only on a terminal."""
    if source.total is None or args.no_progress or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    progress.start()
    return progress


def write_csv(path: str, args: argparse.Namespace, summary: dict[str, Any], fps: float) -> None:
    lat = summary["latency_ms"]
    row = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stream": summary["stream"],
        "mode": args.mode,
        "target_fps": fps,
        "duration_s": args.duration,
        "frames_sent": summary["frames_sent"],
        "results": summary["results"],
        "server_drops": summary["server_drops"],
        "errors": summary["errors"],
        "send_fps": summary["send_fps"],
        "avg_fps": summary["avg_fps"],
        "avg_latency_ms": lat["mean"],
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
    }
    target = Path(path)
    new = not target.exists() or target.stat().st_size == 0
    with target.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary["latency_ms"]
    drops = ", ".join(f"{k} {v}" for k, v in summary["drops_by_reason"].items()) or "none"
    print(
        f"stream {summary['stream']}: sent {summary['frames_sent']} "
        f"(at {summary['send_fps']} fps, {summary['skipped_slots']} slots skipped), "
        f"results {summary['results']} ({summary['avg_fps']} fps), "
        f"server drops {summary['server_drops']} ({drops}), errors {summary['errors']}"
    )
    print(
        f"round trip ms: mean {lat['mean']} p50 {lat['p50']} p95 {lat['p95']} "
        f"p99 {lat['p99']} max {lat['max']}"
    )


async def amain(args: argparse.Namespace, source: Source, out: TextIO | None) -> Tally:
    stop = stop_on_signals()  # Ctrl-C ends the run and still prints a summary
    tally = Tally(stream_name(args, source))
    hooks = Hooks()
    if out is not None:
        hooks.on_result = lambda msg: out.write(json.dumps(msg, separators=(",", ":")) + "\n")
    progress = _progress(source, args)
    if progress:
        task = progress.add_task(tally.name, total=source.total)
        hooks.on_send = lambda frame_id, _: progress.update(
            task, completed=frame_id + 1 + tally.skipped_slots
        )
    try:
        return await run_source(args, source, stop, hooks, tally=tally)
    finally:
        if progress:
            progress.stop()


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_send_args(ap, args)
    try:
        source = open_source(args.mode, args.source, args.folder, args.loop)
    except SourceError as exc:
        print(f"vision-client: {exc}", file=sys.stderr)
        return EXIT_SOURCE
    out: TextIO | None = None
    if not args.no_save:  # one file per stream and run: results/<stream>.jsonl is rewritten
        Path(args.results_dir).mkdir(parents=True, exist_ok=True)
        path = Path(args.results_dir) / f"{stream_name(args, source)}.jsonl"
        out = path.open("w", encoding="utf-8")
    fps = send_fps(args, source)
    try:
        tally = asyncio.run(amain(args, source, out))
    except ClientError as exc:
        print(f"vision-client: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        source.close()
        if out is not None:
            out.close()
    summary = summarize(tally)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    if args.bench_out:
        write_csv(args.bench_out, args, summary, fps)
    if tally.closed_by_server:
        print(
            f"vision-client: the daemon closed the connection ({tally.last_error or 'no reason'})",
            file=sys.stderr,
        )
        return EXIT_PROTOCOL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
