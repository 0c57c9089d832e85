"""vision-client: stream frames from a camera, video, folder or synthetic source to vision-daemon.

    vision-client --mode video --source ../shared/data/vtest.avi --fps 10
    vision-client --mode synthetic --fps 20 --duration 5 --bench-out bench.csv

Exit codes: 0 done; 2 bad arguments; 3 the source cannot be opened; 4 the daemon is not
reachable; 5 the daemon refused the token; 6 protocol error or the daemon closed the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from clients.lib import ClientError, DaemonClient, add_daemon_args, frame_message
from clients.sources import (
    Encoded,
    Pacer,
    Source,
    SourceError,
    SyntheticSource,
    VideoSource,
    encode,
    open_source,
    percentiles,
)

EXIT_OK, EXIT_USAGE, EXIT_SOURCE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_PROTOCOL = 0, 2, 3, 4, 5, 6
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


def exit_code(exc: ClientError) -> int:
    """The documented exit code for a client failure (shared by every program)."""
    codes = {"unauthorized": EXIT_AUTH, "unreachable": EXIT_UNREACHABLE}
    return codes.get(exc.kind, EXIT_PROTOCOL)


@dataclass
class Run:
    """What one client run saw, measured on the client's own clock."""

    stream: str
    fps: float = 0.0
    sent: int = 0
    results: int = 0
    skipped_slots: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    last_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    send_times: dict[int, float] = field(default_factory=dict)
    send_elapsed: float = 0.0
    elapsed: float = 0.0
    closed_by_server: bool = False

    def summary(self) -> dict[str, Any]:
        lat = percentiles(self.latencies_ms)
        return {
            "stream": self.stream,
            "frames_sent": self.sent,
            "results": self.results,
            "server_drops": sum(self.drops.values()),
            "drops_by_reason": dict(self.drops),
            "errors": sum(self.errors.values()),
            "errors_by_code": dict(self.errors),
            "skipped_slots": self.skipped_slots,
            "send_fps": round(self.sent / self.send_elapsed, 2) if self.send_elapsed else 0.0,
            "avg_fps": round(self.results / self.elapsed, 2) if self.elapsed else 0.0,
            "latency_ms": lat,
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
    ap.add_argument("--encoding", choices=["jpeg", "raw"], default="jpeg")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100")
    ap.add_argument("--width", type=int, default=0, help="resize frames to this width")
    ap.add_argument("--height", type=int, default=0, help="resize frames to this height")
    ap.add_argument("--results-dir", default="results", help="where <stream>.jsonl is written")
    ap.add_argument("--no-save", action="store_true", help="do not write results/<stream>.jsonl")
    ap.add_argument("--bench-out", default=None, help="append one summary row to this CSV file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.fps is not None and args.fps <= 0:
        ap.error("--fps must be > 0")
    if args.duration < 0:
        ap.error("--duration must be >= 0")
    if not 1 <= args.quality <= 100:
        ap.error("--quality must be 1..100")
    if (args.width > 0) != (args.height > 0):
        ap.error("--width and --height go together")


class Sender:
    """Turns source frames into wire messages; synthetic frames are encoded once, up front."""

    def __init__(self, source: Source, args: argparse.Namespace) -> None:
        self.source = source
        self.args = args
        self.cache: list[Encoded] | None = None
        if isinstance(source, SyntheticSource):
            self.cache = [self._encode(img) for img in source.frames]

    def _encode(self, img: Any) -> Encoded:
        a = self.args
        return encode(img, a.encoding, a.quality, a.width, a.height)

    def next_cached(self) -> tuple[np.ndarray, Encoded]:
        assert self.cache is not None and isinstance(self.source, SyntheticSource)
        i = self.source.i % len(self.cache)
        self.source.i += 1
        return self.source.frames[i], self.cache[i]

    def next_blocking(self, skip: int) -> tuple[np.ndarray, Encoded] | None:
        """Skip `skip` frames then read and encode one (runs in a thread: cameras block)."""
        if skip:
            self.source.skip(skip)
        img = self.source.read()
        return None if img is None else (img, self._encode(img))

    async def next(self, skip: int) -> tuple[np.ndarray, Encoded] | None:
        if self.cache is not None:
            self.source.skip(skip)
            return self.next_cached()
        return await asyncio.to_thread(self.next_blocking, skip)


@dataclass
class Hooks:
    """Extra work per frame for programs built on this client (vision-viz draws results)."""

    on_send: Callable[[int, np.ndarray], None] | None = None
    on_result: Callable[[dict[str, Any]], None] | None = None
    on_dropped: Callable[[dict[str, Any]], None] | None = None


async def receive(
    client: DaemonClient, run: Run, out: TextIO | None, done: asyncio.Event, hooks: Hooks
) -> None:
    """Read results concurrently with sending until the daemon says bye or closes."""
    async for msg in client.messages():
        now = time.monotonic()
        kind = msg.get("type")
        if kind == "result":
            sent_at = run.send_times.pop(msg.get("frame_id", -1), None)
            run.results += 1
            if sent_at is not None:
                rtt = (now - sent_at) * 1000
                run.latencies_ms.append(rtt)
                msg["rtt_ms"] = round(rtt, 3)
            if out is not None:
                out.write(json.dumps(msg, separators=(",", ":")) + "\n")
            if hooks.on_result:
                hooks.on_result(msg)
        elif kind == "dropped":
            run.send_times.pop(msg.get("frame_id", -1), None)
            run.drops[str(msg.get("reason"))] += 1
            if hooks.on_dropped:
                hooks.on_dropped(msg)
        elif kind == "error":
            run.errors[str(msg.get("code"))] += 1
            run.last_error = f"{msg.get('code')}: {msg.get('message')}"
        elif kind == "bye":
            done.set()
            return
    run.closed_by_server = not done.is_set()
    done.set()


def stream_name(args: argparse.Namespace, source: Source) -> str:
    return args.stream or "".join(c if c.isalnum() or c in "_.:-" else "_" for c in source.name)


def send_fps(args: argparse.Namespace, source: Source) -> float:
    """--fps, else a video file's own frame rate, else 10."""
    if args.fps is not None:
        return float(args.fps)
    native = source.cap.get(cv2.CAP_PROP_FPS) if isinstance(source, VideoSource) else 0.0
    return float(native) if source.total and 0 < native <= 240 else 10.0


async def stream(
    args: argparse.Namespace,
    source: Source,
    stop: asyncio.Event,
    out: TextIO | None,
    hooks: Hooks | None = None,
    client_name: str = "vision-client",
) -> Run:
    """Send on the absolute schedule while reading results; say bye and wait for the rest."""
    hooks = hooks or Hooks()
    name = stream_name(args, source)
    fps = send_fps(args, source)
    client = await DaemonClient.connect(
        args.host, args.port, token=args.token, client_name=client_name, dropped_notices=True
    )
    run = Run(stream=name, fps=fps)
    done = asyncio.Event()
    reader = asyncio.create_task(receive(client, run, out, done, hooks))
    sender = Sender(source, args)
    progress = _progress(source, args)
    task_id = progress.add_task(name, total=source.total) if progress else None
    start = time.monotonic()
    pacer = Pacer(fps, start, start + args.duration if args.duration else None)
    try:
        missed: int | None = 0
        while not stop.is_set() and not done.is_set():
            item = await sender.next(missed or 0)
            if item is None:
                break
            img, enc = item
            if (missed := await pacer.wait()) is None:
                break
            if hooks.on_send:
                hooks.on_send(run.sent, img)
            run.send_times[run.sent] = time.monotonic()
            client.send_nowait(
                frame_message(name, run.sent, enc.data, encoding=enc.encoding, shape=enc.shape)
            )
            run.sent += 1
            await client.writer.drain()  # a slow network shows up as skipped slots, not a queue
            if progress and task_id is not None:
                progress.update(task_id, advance=1 + missed)
        run.skipped_slots = pacer.skipped
        run.send_elapsed = time.monotonic() - pacer.start
        if not done.is_set():
            try:
                await client.send({"type": "bye"})
            except ConnectionError:
                pass
            try:
                await asyncio.wait_for(done.wait(), timeout=15.0)
            except TimeoutError:
                pass
    finally:
        run.elapsed = time.monotonic() - pacer.start
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()
        if progress:
            progress.stop()
    return run


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


async def amain(args: argparse.Namespace, source: Source, out: TextIO | None) -> Run:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # Ctrl-C ends the run and still prints a summary
    return await stream(args, source, stop, out)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_args(ap, args)
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
    try:
        run = asyncio.run(amain(args, source, out))
    except ClientError as exc:
        print(f"vision-client: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        source.close()
        if out is not None:
            out.close()
    summary = run.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    if args.bench_out:
        write_csv(args.bench_out, args, summary, run.fps)
    if run.closed_by_server:
        print(
            f"vision-client: the daemon closed the connection ({run.last_error or 'no reason'})",
            file=sys.stderr,
        )
        return EXIT_PROTOCOL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
