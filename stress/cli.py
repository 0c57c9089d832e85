"""vision-stress: simulate many cameras against vision-daemon and report what the box can take.

    vision-stress --streams 8 --fps 20 --duration 30
    vision-stress --find-capacity --fps 10 --slo-p95-ms 200

Exit codes: 0 done (and the SLO held, when one was given); 1 the run broke --slo-p95-ms or
--max-drop-pct, or the capacity search found no stream count that holds them; 2 bad arguments;
3 the source cannot be opened; 4 the daemon is not reachable; 5 the token was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from clients.engine import Tally
from clients.lib import (
    EXIT_OK,
    EXIT_SLO,
    EXIT_SOURCE,
    ClientError,
    add_daemon_args,
    auth_headers,
    check_transport,
    exit_code,
    percentiles,
    unix_socket_of,
)
from clients.sources import SourceError
from stress.load import LoadSpec, run_load, source_label
from stress.report import summarize, table, write_all


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vision-stress",
        description="Simulate N cameras against vision-daemon; report latency, drops, fairness.",
        epilog="exit codes: 0 ok, 1 SLO broken / no capacity found, 2 bad arguments, "
        "3 source cannot be opened, 4 daemon not reachable, 5 token refused",
    )
    ap.add_argument("--streams", type=int, default=4, help="simulated cameras")
    ap.add_argument("--fps", type=float, default=10.0, help="frames per second per camera")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds (per step with capacity)")
    add_daemon_args(ap, api="control-plane HTTP port, polled for /stats (0 = don't)")
    ap.add_argument(
        "--rate-advice",
        action="store_true",
        help="each camera sends at the rate the daemon advises (never above --fps)",
    )
    ap.add_argument("--source", choices=["synthetic", "video", "folder"], default="synthetic")
    ap.add_argument("--video", default=None, help="video file for --source video")
    ap.add_argument("--folder", default=None, help="image folder for --source folder")
    ap.add_argument("--prefix", default="stress", help="stream names are PREFIX0, PREFIX1, ...")
    ap.add_argument("--procs", type=int, default=1, help="spread senders over K processes")
    ap.add_argument("--slo-p95-ms", type=float, default=None, help="round-trip p95 objective")
    ap.add_argument("--max-drop-pct", type=float, default=5.0, help="capacity: drops allowed")
    ap.add_argument("--settle-s", type=float, default=2.0, help="ignored for latency at start")
    ap.add_argument("--find-capacity", action="store_true", help="search the largest stream count")
    ap.add_argument("--max-streams", type=int, default=256, help="capacity search upper bound")
    ap.add_argument("--out-dir", default=None, help="default results/stress-<timestamp>")
    ap.add_argument("--no-live", action="store_true", help="no live terminal view")
    return ap


class LiveView:
    """Per-stream counters from the load generator and the daemon's own /stats, refreshed live."""

    def __init__(self, args: argparse.Namespace, console: Console, title: str) -> None:
        self.args = args
        self.title = title
        self.progress: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, Any] | None = None
        self.stats_error = ""
        enabled = console.is_terminal and not args.no_live
        self.live = Live(console=console, refresh_per_second=4) if enabled else None

    def on_progress(self, progress: dict[str, dict[str, Any]]) -> None:
        self.progress = dict(progress)
        if self.live:
            self.live.update(self.render())

    def render(self) -> Group:
        t = Table(title=self.title, title_justify="left")
        for col in ("stream", "sent", "results", "drops", "errors", "last ms", "recent p95"):
            t.add_column(col, justify="left" if col == "stream" else "right")
        for name, p in sorted(self.progress.items(), key=lambda kv: kv[0]):
            recent = percentiles(p.get("recent") or [])
            t.add_row(
                name,
                str(p["sent"]),
                str(p["results"]),
                str(p["dropped"]),
                str(p["errors"]),
                f"{p['last_rtt_ms']:.0f}",
                f"{recent['p95']:.0f}",
            )
        return Group(t, self.daemon_table())

    def daemon_table(self) -> Table:
        d = Table(title="daemon /stats", title_justify="left", show_header=False)
        s = self.stats
        if s is None:
            d.add_row(self.stats_error or "waiting for /stats")
            return d
        workers = " ".join(f"w{w['id']}:{w['busy_fraction']:.0%}" for w in s.get("workers", []))
        streams = s.get("streams", [])
        rows = streams.values() if isinstance(streams, dict) else streams
        queues = " ".join(f"{x['name']}:{x['queue_depth']}" for x in rows if x["queue_depth"])
        drops = s.get("totals", {}).get("dropped_by_reason", {})
        d.add_row("processed fps", f"{s.get('fps', 0):.1f}")
        d.add_row("workers busy", workers or "-")
        d.add_row("queued frames", f"{s.get('queue_size', 0)}  {queues}")
        d.add_row("drops by reason", ", ".join(f"{k} {v}" for k, v in drops.items() if v) or "-")
        return d

    async def poll(self) -> None:
        if not self.args.api_port:
            self.stats_error = "/stats polling off (--api-port 0)"
            return
        url = f"http://{self.args.host}:{self.args.api_port}/stats"
        async with httpx.AsyncClient(timeout=2.0, headers=auth_headers(self.args.token)) as http:
            while True:
                try:
                    r = await http.get(url)
                    r.raise_for_status()
                    self.stats = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    self.stats_error = f"/stats unavailable: {exc.__class__.__name__}"
                if self.live:
                    self.live.update(self.render())
                await asyncio.sleep(1.0)


async def one_run(
    args: argparse.Namespace, streams: int, console: Console, title: str
) -> tuple[list[Tally], dict[str, Any] | None]:
    spec = spec_from(args)
    view = LiveView(args, console, title)
    poller = asyncio.create_task(view.poll())
    if view.live:
        view.live.start()
    try:
        results = await run_load(spec, streams, args.procs, view.on_progress)
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        if view.live:
            view.live.stop()
    return results, view.stats


def breaks_slo(agg: dict[str, Any], args: argparse.Namespace) -> list[str]:
    why = []
    if args.slo_p95_ms is not None and agg["rtt_ms"]["p95"] > args.slo_p95_ms:
        why.append(f"p95 {agg['rtt_ms']['p95']:.0f} ms > {args.slo_p95_ms:.0f} ms")
    if args.find_capacity and agg["drop_pct"] > args.max_drop_pct:
        why.append(f"drops {agg['drop_pct']:.1f}% > {args.max_drop_pct}%")
    if agg["processed"] == 0:
        why.append("no results")
    return why


async def stress(args: argparse.Namespace, console: Console, out: Path) -> int:
    title = f"{args.streams} streams x {args.fps:g} fps, {source_label(spec_from(args))}"
    results, stats = await one_run(args, args.streams, console, title)
    summary = summarize(results, args.fps, args.duration, args.settle_s)
    summary["config"] = _config(args)
    summary["daemon_stats"] = stats
    write_all(out, summary, results, title)
    console.print(table(summary))
    agg = summary["aggregate"]
    console.print(
        f"fairness {agg['fairness']}, drift {agg['drift']}, drops {agg['drop_pct']}% "
        f"{agg['dropped_by_reason'] or ''}; load generator "
        + ("FELL BEHIND its schedule" if agg["generator_behind"] else "kept its schedule")
        + f" ({agg['generator_sent_pct_of_schedule']}% of scheduled frames sent)"
    )
    console.print(f"files: {out}/summary.json, samples.csv, report.png")
    why = breaks_slo(agg, args) if args.slo_p95_ms is not None else []
    if why:
        console.print(f"[bold red]SLO broken:[/] {'; '.join(why)}")
        return EXIT_SLO
    return EXIT_OK


async def find_capacity(args: argparse.Namespace, console: Console, out: Path) -> int:
    """Double the stream count until a step fails, then bisect between the last pass and it."""
    steps: list[dict[str, Any]] = []

    async def step(n: int) -> bool:
        title = f"capacity step: {n} streams x {args.fps:g} fps"
        results, _ = await one_run(args, n, console, title)
        agg = summarize(results, args.fps, args.duration, args.settle_s)["aggregate"]
        why = breaks_slo(agg, args)
        if agg["generator_behind"]:
            why.append("load generator fell behind (result not trustworthy; try --procs)")
        row = {
            "streams": n,
            "passed": not why,
            "why": "; ".join(why),
            "p95_ms": agg["rtt_ms"]["p95"],
            "p99_ms": agg["rtt_ms"]["p99"],
            "drop_pct": agg["drop_pct"],
            "dropped_by_reason": agg["dropped_by_reason"],
            "processed_fps": agg["processed_fps"],
            "fairness": agg["fairness"],
            "generator_behind": agg["generator_behind"],
        }
        steps.append(row)
        console.print(
            f"{n:4d} streams: {'PASS' if row['passed'] else 'FAIL'}  p95 {row['p95_ms']:.0f} ms, "
            f"drops {row['drop_pct']}%, {row['processed_fps']} fps  {row['why']}"
        )
        return bool(row["passed"])

    best, fail = 0, None
    n = 1
    while n <= args.max_streams:
        if await step(n):
            best = n
            n *= 2
        else:
            fail = n
            break
    if fail is None and best < args.max_streams:
        fail = args.max_streams + 1
    while fail is not None and fail - best > 1:
        mid = (best + fail) // 2
        if await step(mid):
            best = mid
        else:
            fail = mid
    result = {
        "fps_per_stream": args.fps,
        "slo_p95_ms": args.slo_p95_ms,
        "max_drop_pct": args.max_drop_pct,
        "step_s": args.duration,
        "capacity_streams": best,
        "steps": steps,
        "config": _config(args),
    }
    save_json(out / "capacity.json", result)
    t = Table(title="capacity search", title_justify="left")
    for col in ("streams", "result", "p95 ms", "p99 ms", "drop %", "fps", "fairness", "why"):
        t.add_column(col)
    for row in sorted(steps, key=lambda r: r["streams"]):
        t.add_row(
            str(row["streams"]),
            "pass" if row["passed"] else "FAIL",
            f"{row['p95_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['drop_pct']}",
            f"{row['processed_fps']}",
            f"{row['fairness']}",
            row["why"],
        )
    console.print(t)
    console.print(
        f"capacity: {best} streams at {args.fps:g} fps hold p95 <= {args.slo_p95_ms:g} ms "
        f"with drops <= {args.max_drop_pct}% ({out}/capacity.json)"
    )
    return EXIT_OK if best > 0 else EXIT_SLO


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def spec_from(args: argparse.Namespace) -> LoadSpec:
    """What each simulated camera sends, from the command line."""
    path = args.video if args.source == "video" else args.folder
    return LoadSpec(
        args.host,
        args.port,
        args.token,
        args.fps,
        args.duration,
        args.source,
        path,
        prefix=args.prefix,
        unix_socket=unix_socket_of(args),
        transport=args.transport,
        api_port=args.api_port,
        rate_advice=args.rate_advice,
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    keep = ("streams", "fps", "duration", "source", "video", "folder", "procs", "slo_p95_ms")
    return {k: getattr(args, k) for k in keep} | {"max_drop_pct": args.max_drop_pct}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_transport(ap, args)
    if args.streams < 1 or args.fps <= 0 or args.duration <= 0 or args.procs < 1:
        ap.error("--streams and --procs must be >= 1, --fps and --duration > 0")
    if args.find_capacity and args.slo_p95_ms is None:
        ap.error("--find-capacity needs --slo-p95-ms")
    if args.source == "video" and not args.video:
        ap.error("--source video needs --video FILE")
    if args.source == "folder" and not args.folder:
        ap.error("--source folder needs --folder DIR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out_dir or f"results/stress-{stamp}")
    console = Console(width=None if sys.stdout.isatty() else 120)  # files and pipes: wide tables
    try:
        runner = find_capacity if args.find_capacity else stress
        return asyncio.run(runner(args, console, out))
    except ClientError as exc:
        print(f"vision-stress: {exc}", file=sys.stderr)
        return exit_code(exc)
    except (SourceError, ValueError) as exc:
        print(f"vision-stress: {exc}", file=sys.stderr)
        return EXIT_SOURCE


if __name__ == "__main__":
    sys.exit(main())
