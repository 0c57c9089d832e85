"""Where a worker's time per frame goes, ultralytics' predictor against the direct OpenVINO path.

    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.stage_cost --model yolov8n_int8_openvino_model

Two threads (as the daemon's 2 workers, both busy: the thread-limited copies), each decoding
vtest.avi JPEGs (quality 90) and detecting, with no daemon around them. Per frame, per thread:
- ultralytics: decode, then its own `speed` split (preprocess: letterbox, BGR to RGB, HWC to
  CHW, float /255 in torch; inference: the OpenVINO call with the float32 tensor; postprocess:
  NMS in torch and Results);
- direct: decode, letterbox (numpy/cv2), the OpenVINO call with uint8 BGR (conversion inside
  the graph), NMS and scaling back (numpy).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import cv2
import numpy as np

from benchmarks.harness import VIDEO
from clients.sources import VideoSource
from stress.load import encode_frames


def detectors(args: argparse.Namespace, path: str) -> list[Any]:
    from vision_daemon.config import load_config
    from vision_daemon.detectors.yolo import YoloFactory

    config = load_config(
        overrides={
            "model": args.model, "model_dir": args.model_dir, "workers": 2,
            "openvino_path": path,
        }
    )  # fmt: skip
    made = [YoloFactory.from_config(config)() for _ in range(2)]
    for det in made:  # one after another, as the daemon's workers load
        det.warmup()
    return made


def ultralytics_loop(det: Any, jpegs: list[bytes], n: int, out: list[dict[str, float]]) -> None:
    t = dict.fromkeys(("decode", "preprocess", "inference", "postprocess", "call"), 0.0)
    for i in range(n):
        a = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], np.uint8), cv2.IMREAD_COLOR)
        b = time.perf_counter()
        det._ov[0].ov_compiled_model = det._ov[2]  # the thread-limited copy, as under load
        result = det._predict_with([img])[0]
        t["call"] += (time.perf_counter() - b) * 1000
        t["decode"] += (b - a) * 1000
        for k in ("preprocess", "inference", "postprocess"):
            t[k] += result.speed[k]
    out.append({k: v / n for k, v in t.items()})


def direct_loop(det: Any, jpegs: list[bytes], n: int, out: list[dict[str, float]]) -> None:
    from triton_serve import compact

    request = det._requests[1]  # the thread-limited copy, as under load
    t = dict.fromkeys(("decode", "letterbox", "inference", "nms", "call"), 0.0)
    for i in range(n):
        a = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], np.uint8), cv2.IMREAD_COLOR)
        b = time.perf_counter()
        padded, placement = compact.letterbox(img, det._size)
        c = time.perf_counter()
        pred = request.infer({0: padded[None]}, share_inputs=True, share_outputs=True)[0][0]
        d = time.perf_counter()
        rows = compact.nms(pred, det._conf, det._iou, classes=det._classes)
        compact.scale_back(rows, placement, img.shape[:2])
        e = time.perf_counter()
        for k, v in (("decode", b - a), ("letterbox", c - b), ("inference", d - c), ("nms", e - d)):
            t[k] += v * 1000
        t["call"] += (e - b) * 1000
    out.append({k: v / n for k, v in t.items()})


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="yolov8n_int8_openvino_model")
    ap.add_argument("--model-dir", default="../shared/models")
    ap.add_argument("--frames", type=int, default=200, help="frames per thread")
    args = ap.parse_args()
    jpegs = encode_frames(VideoSource(str(VIDEO)), quality=90)[:200]
    print("| path | fps (2 threads) | ms per frame per thread: stages | in the detector call |")
    print("|---|---|---|---|")
    for path, loop in (("ultralytics", ultralytics_loop), ("direct", direct_loop)):
        dets = detectors(args, path)
        out: list[dict[str, float]] = []
        threads = [threading.Thread(target=loop, args=(d, jpegs, args.frames, out)) for d in dets]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        fps = 2 * args.frames / (time.perf_counter() - t0)
        mean = {k: sum(o[k] for o in out) / len(out) for k in out[0]}
        stages = ", ".join(f"{k} {v:.2f}" for k, v in mean.items() if k != "call")
        print(f"| {path} | {fps:.1f} | {stages} | {mean['call']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
