"""Wire cost of vision-triton: bytes and round-trip ms per frame, float32 vs compact vs local.

    python -m benchmarks.triton_wire --model yolov8n_int8_openvino_model [--requests 100]

Starts `vision-triton` (its own Triton virtualenv, `make triton-venv`) on free ports, then, one
client thread over HTTP, for bus.jpg and for frames of vtest.avi: ultralytics' YOLO on
<served>_fp32 (client letterbox + float32 tensor up, raw output down, client NMS), the compact
model with JPEG bytes (client JPEG-encodes video frames, quality 90, inside the timing), the
compact model with raw BGR pixels, and the local OpenVINO model for reference. Bytes are HTTP
request and response bodies (Triton's binary tensor extension), mean per request; HTTP
headers not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tritonclient.http as triton_http

from benchmarks.harness import ROOT, VIDEO
from triton_serve import options
from triton_serve.process import TritonProcess

BUS = Path(cv2.__file__).parents[1] / "ultralytics" / "assets" / "bus.jpg"


def body_size(inputs: list[Any], outputs: list[Any]) -> int:
    """Bytes of the HTTP request body tritonclient sends for these tensors."""
    body, _ = triton_http.InferenceServerClient.generate_request_body(inputs, outputs)
    return len(body)


def compact_call(
    client: triton_http.InferenceServerClient, served: str, name: str
) -> Callable[[np.ndarray], tuple[int, int]]:
    """A call sending one frame as `image` (JPEG) or `pixels`; returns (bytes up, bytes down)."""

    def call(frame: np.ndarray) -> tuple[int, int]:
        if name == "image":
            _, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
            data = np.asarray(buf, dtype=np.uint8).reshape(-1)
        else:
            data = frame
        tensor = triton_http.InferInput(name, list(data.shape), "UINT8")
        tensor.set_data_from_numpy(data)
        wanted = [triton_http.InferRequestedOutput("detections", binary_data=True)]
        result = client.infer(served, [tensor], outputs=wanted)
        dets = result.as_numpy("detections")
        header = len(json.dumps(result.get_response()))  # the JSON part; the tensor follows it
        down = header + (int(dets.nbytes) if dets is not None else 0)
        return body_size([tensor], wanted), down

    return call


def measure(
    call: Callable[[np.ndarray], Any], frames: list[np.ndarray], n: int
) -> tuple[list[float], list[Any]]:
    """Round-trip ms of n calls cycling over frames (after 3 warm-up calls), and their values."""
    for frame in frames[:3]:
        call(frame)
    times, values = [], []
    for i in range(n):
        t0 = time.perf_counter()
        values.append(call(frames[i % len(frames)]))
        times.append((time.perf_counter() - t0) * 1000)
    return times, values


def row(label: str, times: list[float], up: float, down: float) -> str:
    """One table row."""
    a = np.asarray(times)
    return (
        f"| {label:<22} | {up / 1e3:>9.1f} | {down / 1e3:>9.1f} | {a.mean():>6.1f} |"
        f" {np.percentile(a, 50):>6.1f} | {np.percentile(a, 95):>6.1f} |"
    )


def main() -> int:
    """Run the comparison and print a table per source."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_wire")
    parser.add_argument("--model", default="yolov8n_int8_openvino_model")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("VISION_DAEMON_MODEL_DIR", ROOT.parent / "shared" / "models")),
    )
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    from ultralytics import YOLO

    served = options.served_name(args.model)
    cap = cv2.VideoCapture(str(VIDEO))
    video = []
    while len(video) < 100:
        ok, frame = cap.read()
        if not ok:
            break
        video.append(frame)
    sources = {"bus.jpg (810x1080)": [cv2.imread(str(BUS))]}
    if video:
        h, w = video[0].shape[:2]
        sources[f"vtest.avi ({w}x{h})"] = video
    server = TritonProcess(Path(args.model_dir), args.model)
    try:
        server.start(120)
    except RuntimeError as exc:
        raise SystemExit(f"triton_wire: {exc}") from None
    port = server.http_port
    try:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        remote = YOLO(f"http://127.0.0.1:{port}/{served}_fp32", task="detect")
        local = YOLO(str(options.resolve_model(args.model_dir, args.model).parent), task="detect")
        image = triton_http.InferInput("images", [1, 3, 640, 640], "FP32")
        image.set_data_from_numpy(np.zeros((1, 3, 640, 640), np.float32))
        fp32_up = body_size([image], [triton_http.InferRequestedOutput("output0")])
        fp32_down = 84 * 8400 * 4 + 200  # raw output0 [1, 84, 8400] + its ~200-byte JSON header
        print(f"vision-triton {served}, one client thread, HTTP, {args.requests} requests each")
        for label, frames in sources.items():
            print(
                f"\n{label}\n| path                   |  up (kB)  | down (kB) |  mean  |  p50   |  p95   |"
            )
            print("|---|---|---|---|---|---|")
            t, _ = measure(lambda f: remote.predict(f, verbose=False), frames, args.requests)
            print(row("float32 (ultralytics)", t, fp32_up, fp32_down))
            for name, text in (("image", "compact JPEG"), ("pixels", "compact pixels")):
                t, sizes = measure(compact_call(client, served, name), frames, args.requests)
                up, down = np.mean(sizes, axis=0)
                print(row(text, t, float(up), float(down)))
            t, _ = measure(lambda f: local.predict(f, verbose=False), frames, args.requests)
            print(row("local OpenVINO", t, 0, 0))
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
