"""The ultralytics detector with the real shared COCO exports, through the daemon's own resolution."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from ultralytics.utils import ASSETS

from clients.sources import VideoSource
from tests.conftest import (
    MODEL_DIR,
    VIDEO,
    collect,
    connect,
    run,
    running_daemon,
    shared_model,
    stats,
)
from vision_daemon.config import load_config
from vision_daemon.detectors import ModelError
from vision_daemon.detectors.yolo import YoloFactory, openvino_backend, resolve_model

pytestmark = pytest.mark.slow  # real sockets, models or subprocesses

BUS = (ASSETS / "bus.jpg").read_bytes()


def detect_bus(**overrides: object) -> list[dict[str, object]]:
    async def scenario() -> list[dict[str, object]]:
        async with running_daemon(
            model_dir=str(MODEL_DIR), workers=1, api_port=-1, **overrides
        ) as d:
            c = await connect(d, hello=False)  # the legacy protocol
            await c.send_frame("bus", 1, BUS)
            (msg,) = await collect(c, 1, timeout=60)
            assert msg["type"] == "result", msg
            return list(msg["detections"])

    result: list[dict[str, object]] = run(scenario())
    return result


def test_bus_jpg_finds_people_and_a_bus_over_legacy_protocol() -> None:
    """The int8 yolov8n (resolved by name from the model dir) finds >= 4 people and a bus in bus.jpg."""
    shared_model("yolov8n_int8_openvino_model")
    dets = detect_bus(model="yolov8n")
    labels = Counter(str(d["label"]) for d in dets)
    assert labels["person"] >= 4 and labels["bus"] >= 1, labels
    confident = [d for d in dets if float(d["conf"]) > 0.8]  # type: ignore[arg-type]
    assert {str(d["label"]) for d in confident} == {"person", "bus"}
    h, w = cv2.imdecode(__import__("numpy").frombuffer(BUS, "uint8"), cv2.IMREAD_COLOR).shape[:2]
    for d in dets:  # boxes are in pixels of the sent 810x1080 image, not the 640 letterbox
        x1, y1, x2, y2 = d["bbox"]  # type: ignore[misc]
        assert 0 <= x1 < x2 <= w + 1 and 0 <= y1 < y2 <= h + 1
        assert isinstance(d["class_id"], int)
    assert max(d["bbox"][3] for d in dets) > 640  # type: ignore[index]


def test_onnx_export_and_class_filter() -> None:
    """The ONNX int8 model serves too, and --classes bus keeps only buses."""
    shared_model("yolov8n_int8.onnx")
    dets = detect_bus(model="yolov8n_int8.onnx", classes=["bus"])
    assert dets and {d["label"] for d in dets} == {"bus"}


def test_yolo11_openvino_by_path() -> None:
    """A model folder given as a path loads as OpenVINO."""
    path = shared_model("yolo11n_int8_openvino_model")
    dets = detect_bus(model=str(path))
    assert Counter(d["label"] for d in dets)["person"] >= 3


def test_resolution_prefers_the_fastest_backend_in_model_dir(tmp_path: Path) -> None:
    """A bare name finds the OpenVINO export first on CPU; a missing model names what was tried."""
    shared_model("yolov8n_int8_openvino_model")
    path, _ = resolve_model("yolov8n", MODEL_DIR, "cpu")
    assert path.endswith("yolov8n_int8_openvino_model")
    path, tried = resolve_model("nothing", tmp_path, "cpu")
    assert path == "nothing.pt" and str(tmp_path / "nothing_openvino_model") in tried


def test_unknown_class_name_stops_startup() -> None:
    """--classes with a name the model lacks is a ModelError, not an empty result stream."""
    shared_model("yolov8n_int8_openvino_model")
    cfg = load_config(
        overrides={"model": "yolov8n", "model_dir": str(MODEL_DIR), "classes": ["unicorn"]},
        environ={},
    )
    with pytest.raises(ModelError, match="unicorn"):
        YoloFactory.from_config(cfg)()


def test_pytorch_pt_path_serves_an_untrained_model(tmp_path: Path) -> None:
    """A .pt served without export goes through the PyTorch backend (untrained yolov8n.yaml)."""
    from ultralytics import YOLO

    pt = tmp_path / "untrained.pt"
    YOLO("yolov8n.yaml").save(str(pt))
    dets = detect_bus(model=str(pt), export="none", imgsz=320)
    assert isinstance(dets, list)  # untrained: any detections are noise; it must answer, not crash


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_runs_once_and_later_starts_serve_the_cache(tmp_path: Path, fmt: str) -> None:
    """--export exports a .pt next to it once; a second start serves the cached export as is."""
    from ultralytics import YOLO

    from vision_daemon.detectors.yolo import ensure_export

    pt = tmp_path / "untrained.pt"
    YOLO("yolov8n.yaml").save(str(pt))
    first = Path(ensure_export(str(pt), fmt, 320, "cpu", False, []))
    expected = tmp_path / ("untrained.onnx" if fmt == "onnx" else "untrained_openvino_model")
    assert first == expected and first.exists()
    stamp = first.stat().st_mtime_ns
    assert Path(ensure_export(str(pt), fmt, 320, "cpu", False, [])) == first
    assert first.stat().st_mtime_ns == stamp  # served from the cache, not exported again
    cfg = load_config(
        overrides={"model": str(pt), "export": fmt, "imgsz": 320, "device": "cpu"}, environ={}
    )
    det = YoloFactory.from_config(cfg)()
    assert det.info.backend == ("onnxruntime" if fmt == "onnx" else "openvino")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU")
def test_cuda_half_and_cross_stream_batching(tmp_path: Path) -> None:
    """On cuda:0 with --half and --max-batch 4, frames of waiting streams are batched together."""
    from ultralytics import YOLO

    pt = tmp_path / "untrained.pt"
    YOLO("yolov8n.yaml").save(str(pt))

    async def scenario() -> dict[int, int]:
        async with running_daemon(
            model=str(pt), device="cuda:0", half=True, export="none", workers=1, max_batch=4,
            batch_wait_ms=20, imgsz=320,
        ) as d:  # fmt: skip
            clients = [await connect(d) for _ in range(4)]
            for _ in range(5):
                for i, c in enumerate(clients):
                    await c.send_frame(f"cam{i}", 0, BUS)
                for c in clients:
                    assert (await collect(c, 1, timeout=60))[0]["type"] == "result"
            return {int(k): v for k, v in stats(d)["batch_sizes"].items()}

    sizes = run(scenario())
    assert max(sizes) > 1, sizes


def test_openvino_adapter_holds_two_compiled_copies_per_worker() -> None:
    """Two workers' detectors each reach ultralytics' OpenVINO backend and hold both compiled copies.

    This is the one place that reads ultralytics internals (`openvino_backend`): if a new
    ultralytics changes that shape, this fails instead of the daemon quietly losing core sharing.
    """
    path = shared_model("yolov8n_int8_openvino_model")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("core sharing needs at least 2 cores (one thread per worker of 2)")
    cfg = load_config(
        overrides={
            "model": str(path), "workers": 2, "device": "cpu", "log_dir": "",
            "openvino_path": "ultralytics",
        },
        environ={},
    )  # fmt: skip
    factory = YoloFactory.from_config(cfg)
    assert factory.threads >= 1, factory
    detectors = [factory(), factory()]  # as 2 workers build theirs
    image = cv2.imdecode(np.frombuffer(BUS, np.uint8), cv2.IMREAD_COLOR)
    for det in detectors:
        det.warmup()
        assert det.info.backend == "openvino"
        found = openvino_backend(det.model)
        assert found is not None, "ultralytics' OpenVINO backend is no longer where it was"
        assert det._ov is not None, "no thread-limited second copy was compiled"
        backend, full, shared = det._ov
        assert backend is found[0] and full is not shared
        labels: dict[bool, list[str]] = {}
        for contended in (True, False):
            dets = det.detect([image], contended=contended)[0]
            assert backend.ov_compiled_model is (shared if contended else full)
            labels[contended] = sorted(str(d["label"]) for d in dets)
        assert labels[True] == labels[False], labels
        assert Counter(labels[False])["person"] >= 4 and "bus" in labels[False], labels
    first, second = (d._ov for d in detectors)
    assert first and second and first[2] is not second[2]  # each worker compiled its own copy


def _vtest_frames(n: int) -> list[np.ndarray]:
    src = VideoSource(str(VIDEO))  # the clients' own reader
    try:
        return [f for f in (src.read() for _ in range(n)) if f is not None]
    finally:
        src.close()


@pytest.mark.parametrize("classes", [[], ["car", "bus"]])
def test_direct_openvino_path_answers_what_ultralytics_answers(classes: list[str]) -> None:
    """The direct OpenVINO path (pre-processing in the graph, numpy NMS) gives ultralytics' answer.

    Same labels in the same order, confidences within 0.001 and boxes within 0.5 px, on bus.jpg
    and 40 frames of vtest.avi, with and without a class filter, for both compiled copies.
    """
    from vision_daemon.detectors.openvino import OpenVinoDetector

    path = shared_model("yolov8n_int8_openvino_model")
    images = [cv2.imdecode(np.frombuffer(BUS, np.uint8), cv2.IMREAD_COLOR), *_vtest_frames(40)]
    assert len(images) == 41, "vtest.avi gave fewer than 40 frames"

    def build(openvino_path: str) -> object:
        cfg = load_config(
            overrides={
                "model": str(path), "workers": 2, "device": "cpu", "log_dir": "",
                "classes": classes, "openvino_path": openvino_path,
            },
            environ={},
        )  # fmt: skip
        det = YoloFactory.from_config(cfg)()
        det.warmup()
        return det

    reference, direct = build("ultralytics"), build("direct")
    assert isinstance(direct, OpenVinoDetector) and not isinstance(reference, OpenVinoDetector)
    assert direct.info.class_names == reference.info.class_names  # type: ignore[attr-defined]
    compared = 0
    for contended in (False, True):
        for image in images:
            want = reference.detect([image], contended=contended)[0]  # type: ignore[attr-defined]
            got = direct.detect([image], contended=contended)[0]
            assert [d["label"] for d in got] == [d["label"] for d in want]
            for g, w in zip(got, want, strict=True):
                assert abs(g["conf"] - w["conf"]) <= 1e-3, (g, w)
                assert max(abs(a - b) for a, b in zip(g["bbox"], w["bbox"], strict=True)) <= 0.5
                assert g["class_id"] == w["class_id"]
                compared += 1
    assert compared > (20 if classes else 200), compared
    if classes:
        assert compared and all(d["label"] in classes for d in got)


def test_an_export_the_direct_path_cannot_serve_goes_to_ultralytics(tmp_path: Path) -> None:
    """Without ultralytics' metadata.yaml the export is not taken as a plain detect model."""
    src = shared_model("yolov8n_int8_openvino_model")
    bare = tmp_path / "bare_openvino_model"
    bare.mkdir()
    for f in src.iterdir():
        if f.suffix in (".xml", ".bin"):
            (bare / f.name).symlink_to(f)
    cfg = load_config(overrides={"model": str(bare), "device": "cpu"}, environ={})
    assert YoloFactory.from_config(cfg).direct() is None
    cfg = load_config(overrides={"model": str(src), "device": "cpu"}, environ={})
    assert YoloFactory.from_config(cfg).direct() is not None


def test_a_large_jpeg_decoded_at_reduced_scale_answers_in_the_sent_pixels() -> None:
    """bus.jpg at 2x (1620x2160) is decoded at 1/2 and answers the full decode's boxes.

    The boxes are in pixels of the image as sent (scaled back by 2): the same confident labels,
    each box within 2% of the image's size of the full decode's, inside 1620x2160, reaching below
    y = 1080.
    """
    shared_model("yolov8n_int8_openvino_model")
    image = cv2.imdecode(np.frombuffer(BUS, np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()

    def answer(reduced: bool) -> tuple[list[dict[str, object]], float]:
        async def scenario() -> tuple[list[dict[str, object]], float]:
            async with running_daemon(
                model="yolov8n", model_dir=str(MODEL_DIR), workers=1, reduced_decode=reduced
            ) as d:
                c = await connect(d)
                await c.send_frame("big", 1, data)
                (msg,) = await collect(c, 1, timeout=60)
                assert msg["type"] == "result", msg
                return list(msg["detections"]), float(msg["timings"]["decode_ms"])

        out: tuple[list[dict[str, object]], float] = run(scenario())
        return out

    full, _ = answer(False)
    half, _ = answer(True)
    confident = sorted(str(d["label"]) for d in full if float(d["conf"]) > 0.5)  # type: ignore[arg-type]
    assert confident.count("person") >= 3 and "bus" in confident, confident
    assert sorted(str(d["label"]) for d in half if float(d["conf"]) > 0.5) == confident  # type: ignore[arg-type]
    h, w = big.shape[:2]
    for d in half:
        x1, y1, x2, y2 = d["bbox"]  # type: ignore[misc]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, d
    assert max(d["bbox"][3] for d in half) > 1080  # type: ignore[index]
    for d in (d for d in full if float(d["conf"]) > 0.5):  # type: ignore[arg-type]
        same = [e for e in half if e["label"] == d["label"]]
        nearest = min(
            max(abs(a - b) for a, b in zip(e["bbox"], d["bbox"], strict=True))  # type: ignore[call-overload]
            for e in same
        )
        assert nearest <= 0.02 * h, (d, nearest)
