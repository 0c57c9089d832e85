"""What moving a frame costs on one host, per transport; and WebSocket clients with the real model.

`--part transport` (model none; the daemon decodes each frame and detects nothing): one producer
in this process makes every frame the same way — a frame of vtest.avi (decoded once, up front)
resized to the target size, as a decoder or scaler would hand it over — and hands it on:

- `none`: no IPC at all; the frame goes straight to what a daemon worker runs per frame with
  `--model none` (`decode` + `NoneDetector.detect`), in this process;
- `tcp-jpeg`, `ws-jpeg`: encoded as JPEG (quality 90) by the producer, sent over loopback TCP or
  WebSocket `/ingest`, decoded by the daemon's worker;
- `tcp-raw`, `unix-raw`: raw BGR in the message, over loopback TCP or the Unix socket;
- `shm-raw`: resized straight into a free slot of a shared-memory ring (`cv2.resize(dst=)`), the
  frame message names the slot over the Unix socket; the daemon reads it in place.

The producer runs on one thread (`cv2.setNumThreads(1)`). Each transport keeps `--window` frames
outstanding on one stream (the producer makes the next
frame while the daemon works); latency is from the start of making a frame to its result. CPU per
frame is this process's (producer and client) and the daemon's (/proc), over the frames of the
run. Variants run in turn, `--repeat` times, against one daemon.

`--part ws-model`: 1 and 6 WebSocket clients against the real model, each sending its next JPEG
when the previous result arrives (and TCP clients the same way, for comparison): average latency,
fps, P95, P99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import psutil

from benchmarks.harness import VIDEO, emit, start_daemon
from clients.lib import DaemonClient, percentiles
from clients.transports import ShmSlots, WsDaemonClient
from vision_daemon.decode import decode
from vision_daemon.detectors.none import NoneDetector
from vision_daemon.protocol import Frame

SIZES = {"1080p": (1920, 1080), "480p": (640, 480)}
REPLY_TIMEOUT_S = 60.0  # no answer (result or dropped notice) for this long ends the run
VARIANTS = ("none", "tcp-jpeg", "tcp-raw", "unix-raw", "shm-raw", "ws-jpeg")


def source_frames(path: Path, n: int) -> list[np.ndarray]:
    """The first n frames of the video as BGR arrays (decoded once, before any timing)."""
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="bgr24"))
            if len(out) == n:
                break
    return out


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Producer:
    """Makes frame i at the target size: into `dst` when given (a shm slot), else a new array."""

    def __init__(self, frames: list[np.ndarray], size: tuple[int, int]) -> None:
        self.frames, self.size = frames, size

    def make(self, i: int, dst: np.ndarray | None = None) -> np.ndarray:
        src = self.frames[i % len(self.frames)]
        return cv2.resize(src, self.size, dst=dst, interpolation=cv2.INTER_LINEAR)


def run_none(prod: Producer, n: int) -> dict[str, Any]:
    """The no-IPC baseline: make the frame, run the worker's per-frame code on it."""
    det = NoneDetector()
    lat: list[float] = []
    c0, t0 = cpu_self(), time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        img = prod.make(i)
        pixels = decode(Frame("s", i, 0.0, b"", "shm", img.shape, img), 1 << 30)  # type: ignore[arg-type]
        det.detect([pixels])
        lat.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - t0
    return {"frames": n, "wall": wall, "client_cpu": cpu_self() - c0, "lat": lat}


async def run_ipc(
    variant: str, prod: Producer, n: int, window: int, ports: dict[str, Any], daemon: psutil.Process
) -> dict[str, Any]:
    w, h = prod.size
    shape = (h, w, 3)
    client: Any
    tls = ports.get("tls")  # a client context when the daemon serves TLS (--tls)
    if variant == "ws-jpeg":
        client = await WsDaemonClient.connect(
            "127.0.0.1", ports["api"], client_name="bench", dropped_notices=True, ssl=tls
        )
    else:
        unix = ports["unix"] if variant in ("unix-raw", "shm-raw") else None
        shm = ShmSlots(window + 1, w * h * 3) if variant == "shm-raw" else None
        client = await DaemonClient.connect(
            "127.0.0.1",
            ports["tcp"],
            unix_socket=unix,
            shm=shm,
            ssl=tls if unix is None else None,
            client_name="bench",
            dropped_notices=True,  # a superseded frame is answered too: the window never stalls
        )
    started: dict[int, float] = {}
    lat: list[float] = []
    free = asyncio.Semaphore(window)
    done = asyncio.Event()
    drops = 0

    async def reader() -> None:
        nonlocal drops
        async for msg in client.messages():
            kind = msg.get("type")
            if kind in ("result", "dropped"):
                t = started.pop(msg["frame_id"])
                if kind == "result":
                    lat.append((time.perf_counter() - t) * 1000)
                else:
                    drops += 1
                free.release()
                if len(lat) + drops == n:
                    done.set()
                    return
            elif kind == "error":
                raise SystemExit(f"{variant}: daemon error {msg}")

    stream = f"bench-{variant}"
    task = asyncio.create_task(reader())
    c0, d0, t0 = cpu_self(), sum(daemon.cpu_times()[:2]), time.perf_counter()
    for i in range(n):
        try:  # never waits forever: a frame with no answer at all is a finding, not a hang
            await asyncio.wait_for(free.acquire(), REPLY_TIMEOUT_S)
        except TimeoutError:
            raise SystemExit(
                f"{variant}: no reply in {REPLY_TIMEOUT_S:g} s for frames {sorted(started)[:8]}"
            ) from None
        started[i] = time.perf_counter()
        if variant == "shm-raw":
            slot = await client.shm.acquire()
            prod.make(i, client.shm.view(slot, shape))
            await client.send_slot(stream, i, slot, shape)
        elif variant.endswith("jpeg"):
            data = cv2.imencode(".jpg", prod.make(i), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            await client.send_image(stream, i, data.tobytes(), "jpeg", None)
        else:
            await client.send_image(stream, i, prod.make(i).tobytes(), "raw", shape)
    try:
        await asyncio.wait_for(done.wait(), REPLY_TIMEOUT_S)
    except TimeoutError:
        raise SystemExit(f"{variant}: {len(started)} frames unanswered at the end") from None
    wall = time.perf_counter() - t0
    out = {
        "frames": n,
        "wall": wall,
        "client_cpu": cpu_self() - c0,
        "daemon_cpu": sum(daemon.cpu_times()[:2]) - d0,
        "lat": lat,
        "drops": drops,
    }
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    frames = sum(r["frames"] for r in runs)
    lat = [x for r in runs for x in r["lat"]]
    out = {
        "fps": round(frames / sum(r["wall"] for r in runs), 1),
        "latency_ms": percentiles(lat, 2),
        "client_cpu_ms_per_frame": round(sum(r["client_cpu"] for r in runs) * 1000 / frames, 3),
        "drops": sum(r.get("drops", 0) for r in runs),
    }
    if "daemon_cpu" in runs[0]:
        out["daemon_cpu_ms_per_frame"] = round(
            sum(r["daemon_cpu"] for r in runs) * 1000 / frames, 3
        )
    return out


def daemon_ns(args: argparse.Namespace, model: str, extra: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        model=model, model_dir=args.model_dir, workers=args.workers, max_batch=1, daemon_args=extra
    )


def self_signed(folder: str) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, made with openssl (for --tls)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=bench", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def transport(args: argparse.Namespace) -> dict[str, Any]:
    frames = source_frames(Path(args.video), 60)
    folder = tempfile.mkdtemp(prefix="vd-bench-")
    sock = os.path.join(folder, "d.sock")
    extra = ["--unix-socket", sock]
    tls = None
    if args.tls:  # TCP ingest over TLS, ws over WSS; the Unix socket stays plain
        cert, key = self_signed(folder)
        extra += ["--tls-cert", cert, "--tls-key", key]
        tls = ssl.create_default_context(cafile=cert)
    proc, tcp, api = start_daemon(daemon_ns(args, "none", extra))
    ports = {"tcp": tcp, "api": api, "unix": sock, "tls": tls}
    daemon = psutil.Process(proc.pid)
    results: dict[str, Any] = {}
    try:
        for size_name in args.sizes:
            prod = Producer(frames, SIZES[size_name])
            n = args.frames if size_name != "1080p" else max(50, args.frames // 3)
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
            for _ in range(args.repeat):
                for v in args.variants:
                    if v == "none":
                        runs[v].append(run_none(prod, n))
                    else:
                        runs[v].append(asyncio.run(run_ipc(v, prod, n, args.window, ports, daemon)))
            results[size_name] = {v: summarize(r) for v, r in runs.items()}
            print(size_name, results[size_name], file=sys.stderr)
    finally:
        proc.stop()
        proc.close()
    return {
        "part": "transport",
        "tls": args.tls,
        "window": args.window,
        "repeat": args.repeat,
        "results": results,
    }


async def closed_loop(
    kind: str, i: int, ports: dict[str, int], jpegs: list[bytes], seconds: float
) -> list[float]:
    """One client: send a JPEG, wait for its result, send the next, for `seconds`."""
    client: Any
    if kind == "ws":
        client = await WsDaemonClient.connect(
            "127.0.0.1", ports["api"], client_name=f"ws{i}", dropped_notices=True
        )
    else:
        client = await DaemonClient.connect(
            "127.0.0.1", ports["tcp"], client_name=f"tcp{i}", dropped_notices=True
        )
    lat: list[float] = []
    end = time.perf_counter() + seconds
    k = i * 7
    while time.perf_counter() < end:
        t = time.perf_counter()
        await client.send_image(f"{kind}{i}", k, jpegs[k % len(jpegs)], "jpeg", None)
        msg = await asyncio.wait_for(client.recv(), REPLY_TIMEOUT_S)
        if msg is None or msg.get("type") not in ("result", "dropped"):
            raise SystemExit(f"{kind}{i}: expected a result or a dropped notice, got {msg}")
        if msg["type"] == "result":
            lat.append((time.perf_counter() - t) * 1000)
        k += 1
    await client.close()
    return lat


def ws_model(args: argparse.Namespace) -> dict[str, Any]:
    frames = source_frames(Path(args.video), 100)
    jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for f in frames]
    proc, tcp, api = start_daemon(daemon_ns(args, args.model, []))
    ports = {"tcp": tcp, "api": api}
    out: dict[str, Any] = {}
    try:
        asyncio.run(closed_loop("tcp", 99, ports, jpegs, 3.0))  # warm the model and the code
        for clients in args.clients:
            for kind in args.kinds:

                async def many(kind: str = kind, clients: int = clients) -> list[list[float]]:
                    return await asyncio.gather(
                        *(closed_loop(kind, i, ports, jpegs, args.seconds) for i in range(clients))
                    )

                t0 = time.perf_counter()
                per_client = asyncio.run(many())
                wall = time.perf_counter() - t0
                lat = [x for c in per_client for x in c]
                out[f"{kind} x{clients}"] = {
                    "fps": round(len(lat) / wall, 1),
                    "latency_ms": percentiles(lat, 1),
                }
                print(kind, clients, out[f"{kind} x{clients}"], file=sys.stderr)
    finally:
        proc.stop()
        proc.close()
    return {"part": "ws-model", "model": args.model, "seconds": args.seconds, "results": out}


def main() -> None:
    # The producer is one thread in every variant (a decoder hands over one frame at a time);
    # OpenCV's own thread pool would otherwise race the daemon for the same two cores.
    cv2.setNumThreads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("transport", "ws-model"), default="transport")
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=["1080p", "480p"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--frames", type=int, default=600, help="per variant and repeat at 480p")
    ap.add_argument("--window", type=int, default=2, help="frames outstanding per transport")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="yolov8n_int8_openvino_model")
    ap.add_argument("--model-dir", default=os.environ.get("VISION_DAEMON_MODEL_DIR", "models"))
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="default: 1 for transport, 2 (the daemon's) for ws-model",
    )
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 6])
    ap.add_argument("--kinds", nargs="+", choices=("ws", "tcp"), default=["ws", "tcp"])
    ap.add_argument("--seconds", type=float, default=20.0, help="ws-model: per client count")
    ap.add_argument("--json-out", default=None)
    ap.add_argument(
        "--tls", action="store_true", help="transport: the daemon serves TLS (a self-signed pair)"
    )
    args = ap.parse_args()
    args.workers = args.workers or (1 if args.part == "transport" else 2)
    summary = transport(args) if args.part == "transport" else ws_model(args)
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
