"""Pulled-camera benchmarks: the ESP32-CAM latency scenario, and cameras-per-box capacity.

    # ESP32-CAM: MJPEG at 30 fps, analysed at 10 fps by the real model, 10 minutes
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.cameras latency --duration 600

    # capacity: N cameras of 30 fps 640x480, each analysed at 5 fps, MJPEG then H.264 RTSP
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.cameras capacity --kinds mjpeg,rtsp --counts 1,2,3,4,6

    # freshness (issue 28): an ESP32-like camera at QVGA 5 fps and at 640x480 30 fps; the frame
    # age at parse (the reader alone) next to the latency the daemon reports and a client measures
    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \
      .venv/bin/python -m benchmarks.cameras freshness --seconds 60

    # decode CPU per RTSP camera with and without keyframe-only decoding (no model)
    ... -m benchmarks.cameras capacity --kinds rtsp --counts 4 --model none --max-fps 1 \\
      --keyframes on,off

The cameras are the test suite's servers (tests/sources.py): an ESP32-CAM-like MJPEG server
serving vtest.avi frames (640x480) at 30 fps, and an RTSP server relaying one real ffmpeg's
H.264 encode of the same video (640x480, 30 fps, a keyframe a second) to every client. One server
feeds all N cameras of a run, so the load on the box is the daemon's, plus one ffmpeg encode
(about 4% of a core) for RTSP. The daemon is a real `vision-daemon` subprocess of this checkout,
the cameras are added with POST /cameras, and results are read from /ws.

Latency is from capture to result: a result's `timestamp` is the wall time the daemon's reader
got the frame's first byte (for MJPEG: its part's boundary), and the benchmark takes
`time.time()` when the result arrives on /ws (same host, same clock). `freshness` measures
from the camera's own send time instead (the test server records when it starts each part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
import psutil
import websockets

from benchmarks.harness import emit, start_daemon
from clients.lib import drift, percentiles


def daemon_args(args: argparse.Namespace, extra: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        model=args.model,
        model_dir=args.model_dir,
        workers=args.workers,
        max_batch=1,
        daemon_args=["--camera-allow-local", *extra],  # the test cameras are on 127.0.0.1
    )


async def wait_ready(h: httpx.AsyncClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (await h.get("/ready")).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("the daemon did not become ready")
        await asyncio.sleep(0.5)


async def read_ws(api: int, out: list[tuple[float, str, float]], stop: asyncio.Event) -> None:
    """(arrival monotonic, stream, capture-to-result ms) for every result on /ws."""
    async with websockets.connect(f"ws://127.0.0.1:{api}/ws", max_queue=None) as ws:
        while not stop.is_set():
            try:
                text = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            now_wall, now = time.time(), time.monotonic()
            msg = json.loads(text)
            out.append((now, msg["stream_name"], (now_wall - msg["timestamp"]) * 1000))


def per_minute(samples: list[tuple[float, str, float]], t0: float) -> list[dict[str, Any]]:
    minutes: dict[int, list[float]] = {}
    for t, _, ms in samples:
        minutes.setdefault(int((t - t0) // 60), []).append(ms)
    rows = []
    for m in sorted(minutes):
        p = percentiles(minutes[m])
        rows.append({"minute": m + 1, "results": len(minutes[m]), **{k: p[k] for k in p}})
    return rows


# ---- the ESP32-CAM scenario ------------------------------------------------------------------------
async def latency_run(args: argparse.Namespace, api: int, pid: int, url: str) -> dict[str, Any]:
    stages: list[dict[str, Any]]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as h:
        await wait_ready(h)
        samples: list[tuple[float, str, float]] = []
        stop = asyncio.Event()
        reader = asyncio.create_task(read_ws(api, samples, stop))
        body = {"name": "esp32", "url": url, "max_fps": args.max_fps}
        r = await h.post("/cameras", json=body)
        r.raise_for_status()
        t0 = time.monotonic()
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        # The daemon's own stages at the end of each minute (over its last stats_window_s), to
        # tell a slower detector (the box) from waiting in the daemon.
        stages: list[dict[str, Any]] = []
        for minute in range(1, int(args.duration // 60) + 1):
            await asyncio.sleep(t0 + minute * 60 - time.monotonic())
            lat = (await h.get("/stats")).json()["streams"]["esp32"]["latency_ms"]
            stages.append({"minute": minute, **{k: lat[k]["p50"] for k in ("queue", "infer")}})
        await asyncio.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        cpu = proc.cpu_percent(None)
        stop.set()
        await reader
        stats = (await h.get("/stats")).json()
        cam = (await h.get("/cameras/esp32")).json()
    samples = [x for x in samples if t0 <= x[0] < t0 + args.duration]  # whole minutes only
    rows = per_minute(samples, t0)
    for row in rows:
        row["daemon_p50_ms"] = next((x for x in stages if x["minute"] == row["minute"]), None)
    steady = [r for r in rows if r["minute"] >= 2 and r["p50"] is not None]
    after_first = [ms for t, _, ms in samples if t >= t0 + 60]
    return {
        "scenario": "esp32-cam",
        "duration_s": args.duration,
        "camera_fps": args.camera_fps,
        "max_fps": args.max_fps,
        "model": args.model,
        "workers": args.workers,
        "results": len(samples),
        "per_minute": rows,
        "worst_p50_after_minute_1": max((r["p50"] for r in steady), default=None),
        "worst_p99_after_minute_1": max((r["p99"] for r in steady), default=None),
        "drift_p50_last_over_minute_2": (
            round(steady[-1]["p50"] / steady[0]["p50"], 3) if len(steady) >= 2 else None
        ),
        # the project's one drift figure: median of the last third over the first third
        "drift_after_minute_1": drift(after_first),
        "daemon_cpu_percent": cpu,
        "camera": {
            k: cam[k]
            for k in ("source_fps", "analysed_fps", "frames_read", "reconnects", "stalls", "state")
        },
        "stream": {
            k: stats["streams"]["esp32"][k]
            for k in ("received", "processed", "dropped_by_reason", "latency_ms")
        },
        "rss_mb": stats["rss_mb"],
    }


def latency(args: argparse.Namespace) -> dict[str, Any]:
    from tests.sources import MjpegServer

    with MjpegServer(fps=args.camera_fps) as cam:
        proc, _, api = start_daemon(daemon_args(args, []))
        try:
            return asyncio.run(latency_run(args, api, proc.pid, cam.url))
        finally:
            proc.stop()
            proc.close()


# ---- freshness (issue 28) -------------------------------------------------------------------------
FRESHNESS = (("qvga-5fps", (320, 240), 5.0, 5.0), ("vga-30fps", (640, 480), 30.0, 10.0))


def reader_alone(cam: Any, seconds: float) -> dict[str, Any]:
    """The MJPEG reader with nothing else: each frame's age when it is yielded (against the
    server's send time), the reader thread's CPU per frame, and the JPEG size."""
    import threading

    from vision_daemon.config import camera_config
    from vision_daemon.ingest.sources import open_source
    from vision_daemon.url_policy import UrlPolicy

    spec = camera_config(name="esp32", url=cam.url)
    source = open_source(cam.url, spec, 4 << 20, False, policy=UrlPolicy(allow_local=True))
    ages: list[float] = []
    sizes: list[int] = []
    cpu0, end = time.thread_time(), time.monotonic() + seconds
    try:
        for i, grab in enumerate(source.frames(threading.Event())):
            ages.append((time.time() - cam.sent_at[i]) * 1000)
            sizes.append(len(grab.jpeg))
            if time.monotonic() > end:
                break
    finally:
        source.close()
    return {
        "frames": len(ages),
        "age_at_parse_ms": percentiles(ages, 2),
        "reader_cpu_ms_per_frame": round((time.thread_time() - cpu0) * 1000 / len(ages), 3),
        "jpeg_bytes_mean": round(sum(sizes) / len(sizes)),
    }


def reader_chunked(cam: Any, seconds: float, chunk: int) -> dict[str, Any]:
    """The same parser fed in fixed `chunk`-byte reads (how the reader read before issue 28):
    the age each frame has when its chunk is handed over, and the CPU per frame."""
    import httpx as hx

    from vision_daemon.ingest.http_sources import MjpegParser

    ages: list[float] = []
    i = 0
    cpu0, end = time.thread_time(), time.monotonic() + seconds
    with hx.Client(timeout=10) as client, client.stream("GET", cam.url) as r:
        parser = MjpegParser(cam.BOUNDARY.encode(), 4 << 20)
        for data in r.iter_raw(chunk):
            for _jpeg, _started in parser.feed(data, time.monotonic()):
                ages.append((time.time() - cam.sent_at[i]) * 1000)
                i += 1
            if time.monotonic() > end:
                break
    return {
        "frames": len(ages),
        "age_at_parse_ms": percentiles(ages, 2),
        "reader_cpu_ms_per_frame": round((time.thread_time() - cpu0) * 1000 / len(ages), 3),
    }


async def freshness_run(args: argparse.Namespace, api: int, cam: Any, max_fps: float) -> Any:
    """The camera on the daemon: per result, the latency it reports and the one measured from
    the camera's send time to the result's arrival on /ws."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as h:
        await wait_ready(h)
        name = f"esp32-{len(cam.sent_at)}"
        reported: list[float] = []
        measured: list[float] = []
        gaps: list[float] = []
        url = f"ws://127.0.0.1:{api}/ws?stream={name}"
        async with websockets.connect(url, max_queue=None) as ws:
            body = {"name": name, "url": cam.url, "max_fps": max_fps}
            (await h.post("/cameras", json=body)).raise_for_status()
            first = 0  # a server of its own: its first part is the camera's frame 0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                arrived = time.time()
                lat = (arrived - cam.sent_at[first + msg["frame_id"]]) * 1000
                measured.append(lat)
                reported.append(msg["latency_ms"])
                gaps.append(abs(lat - msg["latency_ms"]))
        (await h.delete(f"/cameras/{name}")).raise_for_status()
    return {
        "results": len(measured),
        "reported_latency_ms": percentiles(reported, 1),
        "measured_latency_ms": percentiles(measured, 1),
        "reported_vs_measured_max_gap_ms": round(max(gaps), 1),
    }


def freshness(args: argparse.Namespace) -> dict[str, Any]:
    from tests.sources import MjpegServer

    out: dict[str, Any] = {}
    proc, _, api = start_daemon(daemon_args(args, []))
    try:
        for label, size, fps, max_fps in FRESHNESS:
            with MjpegServer(size=size, fps=fps) as cam:
                row = {"reader": reader_alone(cam, min(args.seconds, 20.0))}
            with MjpegServer(size=size, fps=fps) as cam:
                row["reader_64k_chunks"] = reader_chunked(cam, min(args.seconds, 20.0), 65536)
            with MjpegServer(size=size, fps=fps) as cam:
                row["daemon"] = asyncio.run(freshness_run(args, api, cam, max_fps))
            out[label] = row
            print(label, row, flush=True)
    finally:
        proc.stop()
        proc.close()
    return {"part": "freshness", "model": args.model, "seconds": args.seconds, "results": out}


# ---- capacity -----------------------------------------------------------------------------------
async def capacity_run(
    args: argparse.Namespace, api: int, pid: int, url: str, n: int, keyframes: str
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as h:
        await wait_ready(h)
        samples: list[tuple[float, str, float]] = []
        stop = asyncio.Event()
        reader = asyncio.create_task(read_ws(api, samples, stop))
        for i in range(n):
            body = {"name": f"cam{i}", "url": url, "max_fps": args.max_fps}
            body["keyframes_only"] = keyframes
            (await h.post("/cameras", json=body)).raise_for_status()
        await asyncio.sleep(args.warmup)
        proc = psutil.Process(pid)
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu1 = proc.cpu_times()
        elapsed = time.monotonic() - t0
        cams = (await h.get("/cameras")).json()
        streams = (await h.get("/stats")).json()["streams"]
        stop.set()
        await reader
    window = [ms for t, _, ms in samples if t >= t0]
    p = percentiles(window)
    cpu_cores = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    source = [c["source_fps"] for c in cams.values()]
    analysed = [c["analysed_fps"] for c in cams.values()]
    decode = [c["decode_ms"] for c in cams.values() if c["decode_ms"] is not None]
    ok = (
        min(source) >= 0.9 * args.camera_fps
        and min(analysed) >= 0.9 * args.max_fps
        and p["p95"] is not None
        and p["p95"] <= args.max_p95_ms
    )
    return {
        "cameras": n,
        "keyframes_only": keyframes,
        "min_source_fps": round(min(source), 1),
        "min_analysed_fps": round(min(analysed), 2),
        "results": len(window),
        "latency_ms": p,
        "daemon_cores": round(cpu_cores, 3),
        "decode_ms_mean": round(sum(decode) / len(decode), 3) if decode else None,
        # the daemon's own stages (capture to result, queue wait, inference), worst camera
        "stage_p50_ms": {
            stage: max(s["latency_ms"][stage]["p50"] or 0 for s in streams.values())
            for stage in ("total", "queue", "infer")
        },
        "ok": ok,
    }


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    from tests.sources import MjpegServer, RtspServer

    out: dict[str, Any] = {"scenario": "capacity", "model": args.model, "runs": []}
    for kind in args.kinds.split(","):
        with ExitStack() as stack:
            if kind == "mjpeg":
                url = stack.enter_context(MjpegServer(fps=args.camera_fps)).url
            else:
                url = stack.enter_context(RtspServer(fps=int(args.camera_fps))).url
            for keyframes in args.keyframes.split(","):
                for n in (int(x) for x in args.counts.split(",")):
                    proc, _, api = start_daemon(daemon_args(args, []))
                    try:
                        row = asyncio.run(capacity_run(args, api, proc.pid, url, n, keyframes))
                    finally:
                        proc.stop()
                        proc.close()
                    row["kind"] = kind
                    print(json.dumps(row), flush=True)
                    out["runs"].append(row)
    for kind in args.kinds.split(","):
        passing = [r["cameras"] for r in out["runs"] if r["kind"] == kind and r["ok"]]
        out[f"max_cameras_{kind}"] = max(passing, default=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("latency", "capacity", "freshness"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="yolov8n")
        p.add_argument("--model-dir", default="../shared/models")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--camera-fps", type=float, default=30.0)
        p.add_argument("--json-out", help="append the summary as one JSON line to this file")
    lat = sub.choices["latency"]
    lat.add_argument("--duration", type=float, default=600.0)
    lat.add_argument("--max-fps", type=float, default=10.0)
    cap = sub.choices["capacity"]
    cap.add_argument("--kinds", default="mjpeg,rtsp")
    cap.add_argument("--counts", default="1,2,3,4,6")
    cap.add_argument("--max-fps", type=float, default=5.0)
    cap.add_argument("--keyframes", default="auto", help="comma list of on, off, auto")
    cap.add_argument("--warmup", type=float, default=10.0)
    cap.add_argument("--seconds", type=float, default=30.0)
    cap.add_argument("--max-p95-ms", type=float, default=200.0)
    sub.choices["freshness"].add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    run = {"latency": latency, "capacity": capacity, "freshness": freshness}[args.what]
    summary = run(args)
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
