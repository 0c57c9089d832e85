"""Benchmark: CPU cost of decoding H.264 640x480 at 30 fps with PyAV vs OpenCV, per camera.

    .venv/bin/python -m benchmarks.decode_cost                 # whole file, every method
    .venv/bin/python -m benchmarks.decode_cost --frames 900 --methods av-auto,cv-read --json out.json

Prepares the input once in a temporary directory (unless `--input` is given): vtest.avi
re-encoded with the pip ffmpeg (imageio-ffmpeg) to H.264 640x480 30 fps, GOP 30 (one keyframe a
second, as many IP cameras), no B-frames; `--variants ip,bf2` adds a copy with 2 B-frames.

Each method runs in its own subprocess (so its CPU time, threads and RSS are its own and nothing
else's) and times only the decode loop (opening the file is left out). CPU is the process's
user+sys time, which counts every decoder thread; "per source frame" divides by the frames of
video covered, so a method that decodes or converts fewer frames shows what a camera costs per
second of video. "cores/30fps cam" = CPU ms per source frame * 30 / 1000.

PyAV's BGR conversion is `frame.to_ndarray(format="bgr24")` unless the method ends in -rf:
to_ndarray makes a new VideoReformatter (SwsContext) for every frame, with swscale threads=0
(one thread a core, created and joined per frame); -rf reuses one
`av.video.reformatter.VideoReformatter` and passes threads=1.

Methods (the default list; --methods also takes cv-1thread, av-frame, av-key-auto):
  av-auto          PyAV, thread_type AUTO (frame+slice threads), every frame to BGR
  av-auto-rf       the same, one shared reformatter with threads=1
  av-slice         PyAV's default (SLICE, thread_count 0): libx264 writes one slice a frame, so
                   in effect one thread
  av-1thread       PyAV, thread_count 1
  av-1thread-rf    the same, one shared reformatter with threads=1
  av-key           PyAV, codec_context.skip_frame = "NONKEY": decodes keyframes only, all to BGR
  av-auto-nobgr    av-auto without the BGR conversion (the difference is the conversion's cost)
  av-1thread-nobgr av-1thread without the BGR conversion
  cv-read          cv2.VideoCapture(path, CAP_FFMPEG).read() (OpenCV's default: a thread a core)
  cv-grab3         OpenCV grab() every frame, retrieve() (BGR) every 3rd: analysis at 10 of 30 fps
  av-auto-bgr3     PyAV AUTO, decode every frame, BGR every 3rd: the same 10 of 30 fps
  av-1thread-rf-bgr3  the same with thread_count 1 and the shared reformatter
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import ROOT, VIDEO

# The encodes: 640x480 at 30 fps, a keyframe every 30 frames (1 s).
VARIANTS: dict[str, list[str]] = {
    "ip": ["-preset", "veryfast", "-g", "30", "-bf", "0"],
    "bf2": ["-preset", "veryfast", "-g", "30", "-bf", "2"],
}

Counts = dict[str, int]


def prepare(source: Path, out_dir: Path, variant: str) -> Path:
    """Encode `source` to H.264 640x480 30 fps with the pip ffmpeg; return the .mp4's path."""
    import imageio_ffmpeg

    out = out_dir / f"vtest-640x480-30fps-{variant}.mp4"
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-hide_banner", "-loglevel", "error", "-y", "-i", str(source)),
        *("-vf", "scale=640:480,fps=30", "-c:v", "libx264", *VARIANTS[variant], "-an", str(out)),
    ]
    subprocess.run(cmd, check=True)
    return out


# ---------------------------------------------------------------- the methods (run in a worker)


def pyav(
    path: str,
    limit: int | None,
    *,
    thread_type: str | None = None,
    thread_count: int | None = None,
    nonkey: bool = False,
    bgr_every: int = 1,
    shared_reformatter: bool = False,
) -> Counts:
    """Demux `limit` packets (source frames) and decode them; every `bgr_every`th frame to BGR."""
    import av
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()

    def to_bgr(frame: av.VideoFrame) -> object:
        if shared_reformatter:
            return reformatter.reformat(frame, format="bgr24", threads=1).to_ndarray()
        return frame.to_ndarray(format="bgr24")

    container = av.open(path)
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if thread_type is not None:
        ctx.thread_type = thread_type  # must be set before the first decode opens the codec
    if thread_count is not None:
        ctx.thread_count = thread_count
    if nonkey:
        ctx.skip_frame = "NONKEY"  # may also be changed while decoding
    source = decoded = bgr = 0

    def take(frames: list[av.VideoFrame]) -> None:
        nonlocal decoded, bgr
        for frame in frames:
            if bgr_every and decoded % bgr_every == 0:
                to_bgr(frame)
                bgr += 1
            decoded += 1

    with Measure() as m:
        for packet in container.demux(stream):
            if packet.size == 0:  # demux's own flush packet at EOF: we flush below
                continue
            if limit is not None and source >= limit:
                break
            source += 1
            take(ctx.decode(packet))
        take(ctx.decode(None))  # the frames still in the decoder (frame threads delay output)
    container.close()
    return m.result(source=source, decoded=decoded, bgr=bgr)


def opencv(
    path: str, limit: int | None, *, bgr_every: int = 1, threads: int | None = None
) -> Counts:
    """read() every frame (bgr_every 1) or grab() every frame and retrieve() every nth."""
    import cv2

    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        raise SystemExit(f"OpenCV could not open {path}")
    source = bgr = 0
    with Measure() as m:
        while limit is None or source < limit:
            if bgr_every == 1:
                ok, _img = cap.read()
                bgr += ok
            else:
                ok = cap.grab()
                if ok and source % bgr_every == 0:
                    ok, _img = cap.retrieve()
                    bgr += ok
            if not ok:
                break
            source += 1
    cap.release()
    return m.result(source=source, decoded=source, bgr=bgr)


METHODS: dict[str, Callable[[str, int | None], Counts]] = {
    "av-auto": lambda p, n: pyav(p, n, thread_type="AUTO"),
    "av-auto-rf": lambda p, n: pyav(p, n, thread_type="AUTO", shared_reformatter=True),
    "av-slice": lambda p, n: pyav(p, n),
    "av-1thread": lambda p, n: pyav(p, n, thread_count=1),
    "av-1thread-rf": lambda p, n: pyav(p, n, thread_count=1, shared_reformatter=True),
    "av-key": lambda p, n: pyav(p, n, nonkey=True),
    "av-auto-nobgr": lambda p, n: pyav(p, n, thread_type="AUTO", bgr_every=0),
    "av-1thread-nobgr": lambda p, n: pyav(p, n, thread_count=1, bgr_every=0),
    "cv-read": lambda p, n: opencv(p, n),
    "cv-grab3": lambda p, n: opencv(p, n, bgr_every=3),
    "av-auto-bgr3": lambda p, n: pyav(p, n, thread_type="AUTO", bgr_every=3),
    "av-1thread-rf-bgr3": lambda p, n: pyav(
        p, n, thread_count=1, bgr_every=3, shared_reformatter=True
    ),
}
DEFAULT_METHODS = list(METHODS)
METHODS.update(  # extras, not in the default list
    {
        "cv-1thread": lambda p, n: opencv(p, n, threads=1),
        "av-frame": lambda p, n: pyav(p, n, thread_type="FRAME"),
        "av-key-auto": lambda p, n: pyav(p, n, thread_type="AUTO", nonkey=True),
    }
)


class Measure:
    """Process CPU (all threads), wall time, and RSS around the decode loop."""

    def __enter__(self) -> Measure:
        self.proc = psutil.Process()
        self.rss0 = self.proc.memory_info().rss
        self.cpu0 = self.proc.cpu_times()
        self.process0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.process0  # ns resolution; psutil's is 10 ms ticks
        cpu = self.proc.cpu_times()
        self.user = cpu.user - self.cpu0.user
        self.sys = cpu.system - self.cpu0.system
        self.rss = self.proc.memory_info().rss  # decoder and buffers still allocated
        self.threads = self.proc.num_threads()

    def result(self, **counts: int) -> dict[str, Any]:
        return {
            **counts,
            "cpu_s": self.cpu,
            "user_s": self.user,
            "sys_s": self.sys,
            "wall_s": self.wall,
            "rss_before_mib": self.rss0 / 2**20,
            "rss_mib": self.rss / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": self.threads,
        }


def worker(method: str, path: str, limit: int | None) -> None:
    # PyAV imports numpy lazily in the first to_ndarray(); numpy's import starts OpenBLAS's
    # thread pool, which burns ~0.1 s of CPU: import it here, outside the measured loop.
    import numpy  # noqa: F401

    print(json.dumps(METHODS[method](path, limit)))


# ---------------------------------------------------------------- the parent


def run_one(method: str, path: Path, limit: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.decode_cost", "--worker", method, "--input", str(path)]
    if limit is not None:
        cmd += ["--frames", str(limit)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU time, with derived per-frame figures."""
    r = dict(sorted(runs, key=lambda x: x["cpu_s"])[len(runs) // 2])
    cpu_ms = r["cpu_s"] * 1000
    r.update(
        method=method,
        runs=len(runs),
        cpu_s_all=[round(x["cpu_s"], 3) for x in runs],
        cpu_ms_per_source=cpu_ms / max(r["source"], 1),
        cpu_ms_per_decoded=cpu_ms / max(r["decoded"], 1),
        decoded_fps=r["decoded"] / r["wall_s"],
        source_fps=r["source"] / r["wall_s"],
        cores_used=r["cpu_s"] / r["wall_s"],
    )
    r["cores_per_30fps_camera"] = r["cpu_ms_per_source"] * 30 / 1000
    return r


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | source frames | decoded | to BGR | CPU ms/source frame | CPU ms/decoded frame "
        "| decoded fps (wall) | cores busy | cores per 30 fps camera | RSS MiB start->end |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']}:{r['method']} | {r['source']} | {r['decoded']} | {r['bgr']} "
            f"| {r['cpu_ms_per_source']:.2f} | {r['cpu_ms_per_decoded']:.2f} "
            f"| {r['decoded_fps']:.0f} | {r['cores_used']:.2f} "
            f"| {r['cores_per_30fps_camera']:.3f} | {r['rss_before_mib']:.0f}->{r['rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", type=Path, help="an H.264 file to decode instead of preparing one")
    ap.add_argument(
        "--source", type=Path, default=VIDEO, help="what to encode (default: %(default)s)"
    )
    ap.add_argument(
        "--variants", default="ip", help=f"encodes to prepare, of {','.join(VARIANTS)} (default ip)"
    )
    ap.add_argument("--frames", type=int, help="source frames per method (default: the whole file)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {','.join(METHODS)}")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per method, round-robin; median CPU"
    )
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker(args.worker, str(args.input), args.frames)
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {','.join(METHODS)}")

    with tempfile.TemporaryDirectory(prefix="decode_cost-") as tmp:
        if args.input:
            inputs = {args.input.stem: args.input}
        else:
            inputs = {}
            for v in args.variants.split(","):
                t0 = time.perf_counter()
                inputs[v] = prepare(args.source, Path(tmp), v)
                print(
                    f"prepared {v}: {inputs[v]} in {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                )
        rows = []
        for variant, path in inputs.items():
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for _ in range(args.repeat):
                for m in methods:
                    runs[m].append(run_one(m, path, args.frames))
                    print(f"  {variant}:{m} cpu {runs[m][-1]['cpu_s']:.2f} s", file=sys.stderr)
            for m in methods:
                rows.append({"variant": variant, **summarise(m, runs[m])})

    print(table(rows))
    by = {(r["variant"], r["method"]): r for r in rows}
    for variant in inputs:
        a, d = by.get((variant, "av-auto")), by.get((variant, "av-auto-nobgr"))
        if a and d:
            conv = a["cpu_ms_per_decoded"] - d["cpu_ms_per_decoded"]
            print(f"\n{variant}: BGR conversion (av-auto - av-auto-nobgr): {conv:.2f} CPU ms/frame")
    if args.json:
        meta = {
            "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "frames": args.frames,
            "repeat": args.repeat,
            "source": str(args.input or args.source),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
