"""vision-ws: watch the daemon's /ws detection feed as a live per-stream table or JSON lines.

    vision-ws                                   # every stream, live table
    vision-ws --stream cam1 --stream cam2 --json

Exit codes: 0 done; 2 bad arguments; 4 the daemon is not reachable; 5 token refused; 6 the
feed closed unexpectedly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from rich.console import Console
from rich.live import Live
from rich.table import Table
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from clients.lib import (
    EXIT_AUTH,
    EXIT_OK,
    EXIT_PROTOCOL,
    EXIT_UNREACHABLE,
    add_daemon_args,
    auth_headers,
    stop_on_signals,
)

WINDOW_S = 5.0  # fps and latency are shown over the last few seconds


@dataclass
class StreamView:
    """One stream's recent results."""

    results: int = 0
    times: collections.deque[float] = field(default_factory=lambda: collections.deque())
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque())
    objects: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, msg: dict[str, Any], now: float) -> None:
        self.results += 1
        self.times.append(now)
        self.latencies.append(float(msg.get("latency_ms", 0.0)))
        while self.times and now - self.times[0] > WINDOW_S:
            self.times.popleft()
            self.latencies.popleft()
        self.objects = collections.Counter(d.get("label", "?") for d in msg.get("detections", []))

    def fps(self, now: float) -> float:
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(1e-6, self.times[-1] - self.times[0])


def table(views: dict[str, StreamView], now: float) -> Table:
    t = Table(title="vision-daemon /ws", title_justify="left")
    for col in ("stream", "results", "fps", "latency ms", "objects (last frame)"):
        t.add_column(col, justify="left" if col in ("stream", "objects (last frame)") else "right")
    for name in sorted(views):
        v = views[name]
        lat = sum(v.latencies) / len(v.latencies) if v.latencies else 0.0
        objs = ", ".join(f"{k} {n}" for k, n in v.objects.most_common()) or "-"
        t.add_row(name, str(v.results), f"{v.fps(now):.1f}", f"{lat:.1f}", objs)
    return t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vision-ws", description="Watch the /ws detection feed.")
    add_daemon_args(ap, tcp=False, api="control-plane HTTP port serving /ws")
    ap.add_argument("--stream", action="append", default=[], help="only this stream (repeat)")
    ap.add_argument("--every", type=int, default=1, help="server-side: every Nth result")
    ap.add_argument("--max-fps", type=float, default=0.0, help="server-side rate cap per viewer")
    ap.add_argument("--json", action="store_true", help="print each message as one JSON line")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    ap.add_argument("--count", type=int, default=0, help="stop after this many messages")
    return ap


def url(args: argparse.Namespace) -> str:
    query: list[tuple[str, str]] = [("stream", s) for s in args.stream]
    if args.every > 1:
        query.append(("every", str(args.every)))
    if args.max_fps > 0:
        query.append(("max_fps", str(args.max_fps)))
    qs = f"?{urlencode(query)}" if query else ""
    return f"ws://{args.host}:{args.api_port}/ws{qs}"


async def watch(args: argparse.Namespace, stop: asyncio.Event, console: Console) -> int:
    views: dict[str, StreamView] = {}
    live = None if args.json or not console.is_terminal else Live(console=console, transient=False)
    seen = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        async with connect(
            url(args), additional_headers=auth_headers(args.token), open_timeout=10
        ) as ws:
            if live:
                live.start()
            while not stop.is_set():
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    break
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=min(timeout or 1.0, 1.0))
                except TimeoutError:
                    continue
                msg = json.loads(raw)
                seen += 1
                if args.json:
                    print(json.dumps(msg, separators=(",", ":")), flush=True)
                else:
                    now = time.monotonic()
                    views.setdefault(str(msg.get("stream_name")), StreamView()).add(msg, now)
                    if live:
                        live.update(table(views, now))
                if args.count and seen >= args.count:
                    break
    except InvalidStatus as exc:
        code = exc.response.status_code
        if code in (401, 403):  # a close before accept (code 1008) reaches the client as 403
            print(f"vision-ws: the daemon refused the token (HTTP {code})", file=sys.stderr)
            return EXIT_AUTH
        print(f"vision-ws: /ws refused the connection (HTTP {code})", file=sys.stderr)
        return EXIT_PROTOCOL
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code == 1008:
            print("vision-ws: the daemon refused the token (close code 1008)", file=sys.stderr)
            return EXIT_AUTH
        print(f"vision-ws: the feed closed ({exc})", file=sys.stderr)
        return EXIT_PROTOCOL
    except (OSError, TimeoutError) as exc:
        print(
            f"vision-ws: daemon API not reachable at {args.host}:{args.api_port} "
            f"({exc.__class__.__name__}); is vision-daemon running with its API on?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    finally:
        if live:
            live.stop()
    if not args.json:
        console.print(table(views, time.monotonic()))  # the final table, also when not a TTY
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.every < 1 or args.max_fps < 0:
        ap.error("--every must be >= 1 and --max-fps >= 0")

    async def run() -> int:
        return await watch(args, stop_on_signals(), Console())

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
