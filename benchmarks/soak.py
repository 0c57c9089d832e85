"""Soak benchmark: 8 streams against the real model for 10 minutes; memory, fds, drift, accounting.

    # plain soak
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.soak --streams 8 --fps 10 --duration 600

    # the same beside a background of hostile clients (benchmarks/hostile.py)
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.soak --streams 8 --fps 10 --duration 600 --hostile

    # both, one after the other on this machine (20 minutes), and the p99 ratio
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.soak --streams 8 --fps 10 --duration 600 --compare \\
      --json-out results/soak.jsonl

    # a short smoke run of the same (not a measurement)
    ... -m benchmarks.soak --duration 40 --warmup-s 10 --sample-s 5 --compare

Starts a real `vision-daemon` subprocess of this checkout (a fresh one per run), drives it with
vision-stress's simulated cameras (the "good" clients), and samples the daemon's RSS and open file
descriptors every --sample-s seconds. With --hostile, `benchmarks.hostile` runs in its own process
for the same duration: junk, name churn, a slow reader, idle sockets, /stats and /metrics
hammering, idle HTTP sockets and /ws subscribers (one that never reads).

Reported (readable lines, then the JSON via `emit`; --json-out appends one line per run):
- the good clients' processed fps, round-trip p50/p95/p99 and drift, all after --warmup-s;
- RSS at the end of warm-up and at the end, and the growth in %; fds under load and after;
- accounting from /stats once the daemon is quiet (good clients said bye, hostiles stopped, and
  the totals stopped changing): unaccounted = received - (processed + dropped + queued + in flight);
- with --hostile, what each hostile did, and the daemon's view (errors by code, connections, /ws);
- the daemon's log: WARNING / ERROR / Traceback line counts (log kept in --log-dir).

Checks (exit status 1 if one fails): RSS growth after warm-up < --max-rss-growth-pct (5),
unaccounted == 0, and with --compare the hostile p99 <= --max-p99-ratio (1.5) x the plain p99.
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
import psutil

from benchmarks.harness import ROOT, VIDEO, add_run_args, drive_daemon, emit, load
from benchmarks.hostile import GRACE_S
from clients.lib import drift, percentiles
from clients.sources import VideoSource
from stress.load import encode_frames

QUIET_S = 2.5  # totals unchanged this long (over two /stats refreshes): the daemon is quiet
QUIET_TIMEOUT_S = 60.0


def measure(proc: psutil.Process, t0: float) -> dict[str, float]:
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": proc.memory_info().rss / 2**20,
        "fds": float(proc.num_fds()),
    }


async def sample(pid: int, every: float, stop: asyncio.Event, out: list[dict[str, float]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while not stop.is_set():
        out.append(measure(proc, t0))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def pending(stats: dict[str, Any]) -> tuple[int, int]:
    """(queued, in flight) frames in a /stats snapshot."""
    return stats["queue_size"], sum(s["in_flight"] for s in stats["streams"].values())


def unaccounted(stats: dict[str, Any]) -> int:
    """received - (processed + dropped + queued + in flight): 0 when every frame is accounted for."""
    t = stats["totals"]
    queued, in_flight = pending(stats)
    dropped = sum(t["dropped_by_reason"].values())
    return int(t["received"] - t["processed"] - dropped - queued - in_flight)


async def quiet_stats(api: int) -> tuple[dict[str, Any], float]:
    """/stats once the frame totals, the queues and the in-flight count stop changing.

    The snapshot is rebuilt once a second, so "unchanged for QUIET_S" spans two rebuilds. Returns
    the last snapshot and the seconds waited (QUIET_TIMEOUT_S at most; the caller sees no quiet
    when the key still moved).
    """
    t0 = time.monotonic()
    last_key: tuple[Any, ...] | None = None
    since = t0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=10) as h:
        while True:
            stats: dict[str, Any] = (await h.get("/stats")).json()
            t = stats["totals"]
            dropped = sum(t["dropped_by_reason"].values())
            key = (t["received"], t["processed"], dropped, *pending(stats))
            now = time.monotonic()
            if key != last_key:
                last_key, since = key, now
            elif now - since >= QUIET_S or now - t0 > QUIET_TIMEOUT_S:
                stats["quiet"] = now - since >= QUIET_S
                return stats, round(now - t0, 1)
            await asyncio.sleep(0.5)


async def run_hostiles(tcp: int, api: int, duration: float) -> dict[str, Any]:
    """benchmarks.hostile in its own process (its own event loop and GIL); its JSON counts."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.hostile",
        "--tcp-port",
        str(tcp),
        "--api-port",
        str(api),
        "--duration",
        str(duration),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + GRACE_S + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": "hostile process did not end; killed"}
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"hostile process exited {proc.returncode}"}
    counts: dict[str, Any] = json.loads(lines[-1])
    return counts


async def soak(
    args: argparse.Namespace, tcp: int, pid: int, api: int, jpegs: list[bytes], hostile: bool
) -> dict[str, Any]:
    stop = asyncio.Event()
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(sample(pid, args.sample_s, stop, samples))
    # load() starts its schedule 1 s from now; the hostiles run until the good senders stop
    hostiles = asyncio.create_task(run_hostiles(tcp, api, args.duration + 1.0)) if hostile else None
    result = await load(args, tcp, jpegs)  # returns after every good client's bye and tail
    result["hostiles"] = await hostiles if hostiles else None
    stop.set()
    await sampler
    # clients have closed: the fds of their connections must be gone, every frame accounted
    result["quiet_stats"], result["quiet_wait_s"] = await quiet_stats(api)
    result["after_close"] = measure(psutil.Process(pid), time.monotonic())
    result["resources"] = samples
    return result


def log_lines(path: Path) -> dict[str, Any]:
    """WARNING / ERROR / Traceback counts in the daemon's log, and its first few ERROR lines."""
    counts = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0, "Traceback": 0}
    first: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        for key in counts:
            if f" {key} " in line or line.startswith(key):
                counts[key] += 1
                if key != "WARNING" and len(first) < 5:
                    first.append(line[:300])
    return {"path": str(path), **counts, "first_errors": first}


def summarise(
    args: argparse.Namespace, result: dict[str, Any], mode: str, log: Path
) -> dict[str, Any]:
    res = result["resources"]
    base = next((r for r in res if r["t"] >= args.warmup_s), res[0])
    end = res[-1]
    steady = sorted((t, rtt) for t, rtt in result["samples"] if t >= args.warmup_s)
    rtts = [r for _, r in steady]
    span = args.duration - args.warmup_s
    stats = result["quiet_stats"]
    totals = stats["totals"]
    queued, in_flight = pending(stats)
    growth = round((end["rss_mb"] / base["rss_mb"] - 1) * 100, 2)
    lost = unaccounted(stats)
    summary: dict[str, Any] = {
        "mode": mode,
        "streams": args.streams,
        "fps": args.fps,
        "duration_s": args.duration,
        "warmup_s": args.warmup_s,
        "good": {
            "sent": result["sent"],
            "results": len(result["samples"]),
            "processed_fps_after_warmup": round(len(rtts) / span, 2) if span > 0 else None,
            "rtt_ms_after_warmup": percentiles(rtts, digits=1),
            "drift_after_warmup": drift(rtts),
            "drop_notices": result["drops"],
            "errors": result["errors"],
            "closed_by_server": result["closed_by_server"],
            "late_sends": result["late_sends"],
            "skipped_slots": result["skipped_slots"],
        },
        "rss_mb": {
            "start": round(res[0]["rss_mb"], 1),
            "after_warmup": round(base["rss_mb"], 1),
            "end": round(end["rss_mb"], 1),
            "max": round(max(r["rss_mb"] for r in res), 1),
        },
        "rss_growth_after_warmup_pct": growth,
        "fds": {
            "start": res[0]["fds"],
            "end_under_load": end["fds"],
            "max": max(r["fds"] for r in res),
            "after_clients_closed": result["after_close"]["fds"],
        },
        "accounting": {
            "received": totals["received"],
            "processed": totals["processed"],
            "dropped_by_reason": {k: v for k, v in totals["dropped_by_reason"].items() if v},
            "queued": queued,
            "in_flight": in_flight,
            "unaccounted": lost,
            "results_dropped": totals["results_dropped"],
            "quiet": stats["quiet"],
            "quiet_wait_s": result["quiet_wait_s"],
        },
        "daemon": {
            "errors": stats["errors"],
            "connections": stats["connections"],
            "ws": {k: v for k, v in stats["ws"].items() if k != "clients"},
            "streams_in_stats": len(stats["streams"]),
            "streams_evicted": stats["streams_evicted"],
            "workers": [
                {k: w[k] for k in ("id", "state", "frames", "errors", "restarts")}
                for w in stats["workers"]
            ],
            "log": log_lines(log),
        },
        "hostiles": result["hostiles"],
        "checks": {
            f"rss_growth_under_{args.max_rss_growth_pct:g}pct": growth < args.max_rss_growth_pct,
            "zero_unaccounted": lost == 0,
        },
        "rss_trace_mb": [round(r["rss_mb"], 1) for r in res],
    }
    return summary


def readable(s: dict[str, Any]) -> str:
    g, a, rtt = s["good"], s["accounting"], s["good"]["rtt_ms_after_warmup"]
    drops = ", ".join(f"{k} {v}" for k, v in a["dropped_by_reason"].items()) or "none"
    log = s["daemon"]["log"]
    lines = [
        f"== soak ({s['mode']}): {s['streams']} streams x {s['fps']:g} fps, {s['duration_s']:g} s, "
        f"warm-up {s['warmup_s']:g} s",
        f"good clients: {g['processed_fps_after_warmup']} processed fps after warm-up; RTT ms "
        f"p50 {rtt['p50']} p95 {rtt['p95']} p99 {rtt['p99']} max {rtt['max']}; "
        f"drift {g['drift_after_warmup']}; closed by server {g['closed_by_server']}",
        f"RSS MB: after warm-up {s['rss_mb']['after_warmup']}, end {s['rss_mb']['end']}, "
        f"max {s['rss_mb']['max']}: growth {s['rss_growth_after_warmup_pct']}%; fds under load "
        f"{s['fds']['end_under_load']:g}, max {s['fds']['max']:g}, "
        f"after close {s['fds']['after_clients_closed']:g}",
        f"accounting: received {a['received']} = processed {a['processed']} + dropped ({drops}) "
        f"+ queued {a['queued']} + in flight {a['in_flight']}; unaccounted {a['unaccounted']} "
        f"(quiet: {a['quiet']} after {a['quiet_wait_s']} s)",
        f"daemon log: {log['WARNING']} WARNING, {log['ERROR']} ERROR, "
        f"{log['Traceback']} Traceback ({log['path']})",
    ]
    if s["hostiles"] is not None:
        lines.append(f"daemon errors by code: {s['daemon']['errors']}")
        for name, counts in s["hostiles"].items():
            lines.append(f"  hostile {name}: {counts}")
    lines.append(
        "checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in s["checks"].items())
    )
    return "\n".join(lines)


def run_one(
    args: argparse.Namespace, jpegs: list[bytes], hostile: bool, out_dir: Path
) -> dict[str, Any]:
    mode = "hostile" if hostile else "plain"
    log = out_dir / f"daemon-{mode}.log"
    result, _ = drive_daemon(
        args,
        lambda tcp, pid, api: soak(args, tcp, pid, api, jpegs, hostile),
        log_path=str(log),
    )
    summary = summarise(args, result, mode, log)
    emit(summary, args.json_out)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(ap, duration=600.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--hostile", action="store_true", help="beside benchmarks.hostile")
    mode.add_argument(
        "--compare", action="store_true", help="a plain soak, then a hostile one; the p99 ratio"
    )
    ap.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    ap.add_argument("--max-p99-ratio", type=float, default=1.5)
    ap.add_argument("--log-dir", default="results", help="the daemon logs go in a folder here")
    args = ap.parse_args()
    if not 0 <= args.warmup_s < args.duration:
        ap.error("--warmup-s must be >= 0 and below --duration")
    args.max_batch, args.daemon_args = 1, []
    out_dir = Path(args.log_dir) / time.strftime("soak-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)

    jpegs = encode_frames(VideoSource(str(VIDEO)), quality=90)
    runs = [False, True] if args.compare else [args.hostile]
    summaries = [run_one(args, jpegs, hostile, out_dir) for hostile in runs]
    ok = all(all(s["checks"].values()) for s in summaries)
    for s in summaries:
        print(readable(s), flush=True)
    if args.compare:
        plain, hostile = (s["good"]["rtt_ms_after_warmup"]["p99"] for s in summaries)
        ratio = round(hostile / plain, 3) if plain > 0 else None
        within = ratio is not None and ratio <= args.max_p99_ratio
        ok = ok and within
        emit(
            {
                "mode": "compare",
                "p99_plain_ms": plain,
                "p99_hostile_ms": hostile,
                "p99_ratio": ratio,
                f"p99_within_{args.max_p99_ratio:g}x": within,
                "all_checks_ok": ok,
            },
            args.json_out,
        )
        print(
            f"p99 hostile / plain: {hostile} / {plain} ms = {ratio} "
            f"({'ok' if within else 'FAIL'}, limit {args.max_p99_ratio:g}x)"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
