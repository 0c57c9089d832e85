"""Benchmark: where the dashboard's boxes are drawn, by what it costs the daemon per frame.

    .venv/bin/python -m benchmarks.dashboard_cost                  # 200 frames of vtest.avi
    .venv/bin/python -m benchmarks.dashboard_cost --frames 100 --json out.json

The dashboard shows each stream's latest analysed frame with its boxes. Two ways to do that:
- the browser draws: the daemon serves the frame as it has it (`GET /streams/{name}/frame.jpg`)
  and the browser draws the boxes of that frame id from `/ws` on a canvas. For a pushed JPEG this
  costs the daemon nothing (the stored bytes go out as they are: `passthrough`); for pixels (a
  pulled RTSP camera, raw or shared-memory frames) one JPEG encode per analysed frame, shared by
  every viewer (`encode`);
- the daemon draws: a server-annotated MJPEG decodes the JPEG, draws the boxes and labels, and
  encodes again, for every frame it sends (`annotate`), however the browser then shows it.

Input: the first `--frames` frames of vtest.avi (768x576), encoded once as the JPEGs a camera
would push (quality 85, untimed), and the real model's boxes for each (the shared int8 yolov8n
OpenVINO export through ultralytics, untimed). Each method runs over every frame `--repeat` times
in this process, one thread; the table gives ms per frame (mean, p95) and the cores it would take
at 8 streams x 10 fps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.harness import ROOT, VIDEO
from vision_daemon.outputs import encode_jpeg

MODEL_DIR = Path(os.environ.get("VISION_DAEMON_MODEL_DIR", ROOT.parent / "shared" / "models"))
MODEL = "yolov8n_int8_openvino_model"

Box = tuple[int, int, int, int, str, float]


def load(frames: int) -> tuple[list[np.ndarray], list[bytes], list[list[Box]]]:
    cap = cv2.VideoCapture(str(VIDEO))
    pixels: list[np.ndarray] = []
    while len(pixels) < frames:
        ok, img = cap.read()
        if not ok:
            break
        pixels.append(img)
    cap.release()
    jpegs = [encode_jpeg(p) for p in pixels]
    from ultralytics import YOLO

    model = YOLO(str(MODEL_DIR / MODEL), task="detect")
    boxes: list[list[Box]] = []
    for img in pixels:
        r = model.predict(img, verbose=False, conf=0.25)[0]
        names = r.names
        boxes.append(
            [
                (*(int(v) for v in xyxy), names[int(c)], float(p))  # type: ignore[misc]
                for xyxy, c, p in zip(
                    r.boxes.xyxy.tolist(), r.boxes.cls.tolist(), r.boxes.conf.tolist(), strict=True
                )
            ]
        )
    return pixels, jpegs, boxes


def annotate(jpeg: bytes, boxes: list[Box]) -> bytes:
    """What a server-annotated MJPEG does per frame: decode, draw, encode."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    for x1, y1, x2, y2, label, conf in boxes:
        cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 0), 2)
        cv2.putText(
            img,
            f"{label} {conf:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 255, 0),
            1,
        )
    return encode_jpeg(img)


def timed(fn: Callable[[int], Any], n: int, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    pixels, jpegs, boxes = load(args.frames)
    n = len(pixels)
    methods: dict[str, Callable[[int], Any]] = {
        "passthrough (browser draws, pushed JPEG)": lambda i: bytes(jpegs[i]),
        "encode (browser draws, pixel frames)": lambda i: encode_jpeg(pixels[i]),
        "annotate (server-annotated MJPEG)": lambda i: annotate(jpegs[i], boxes[i]),
    }
    rows = []
    h, w = pixels[0].shape[:2]
    mean_boxes = statistics.fmean(len(b) for b in boxes)
    print(f"{n} frames of vtest.avi ({w}x{h}), {mean_boxes:.1f} boxes a frame, x{args.repeat}")
    print("| method | ms per frame (mean) | p95 | cores at 8 x 10 fps |")
    print("|---|---|---|---|")
    for name, fn in methods.items():
        ms = sorted(timed(fn, n, args.repeat))
        mean, p95 = statistics.fmean(ms), ms[int(0.95 * (len(ms) - 1))]
        rows.append(
            {"method": name, "mean_ms": mean, "p95_ms": p95, "cores_8x10": mean * 80 / 1000}
        )
        print(f"| {name} | {mean:.3f} | {p95:.3f} | {mean * 80 / 1000:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"frames": n, "boxes_mean": mean_boxes, "rows": rows}))


if __name__ == "__main__":
    main()
