"""OpenVINO without ultralytics' predictor: the pixels go straight into the compiled graph.

ultralytics' predict converts every frame to a float32 torch tensor (BGR to RGB, HWC to CHW, /255)
in Python, hands OpenVINO 4.9 MB per 640x640 frame, and runs NMS in torch. Here the conversion
is part of the model: OpenVINO's PrePostProcessor takes the letterboxed uint8 BGR frame (1.2 MB)
and converts, reorders and scales inside the graph. The letterbox and the NMS are the numpy ones
the Triton server uses (`triton_serve/compact.py`, checked there against ultralytics), so boxes,
labels and confidences match ultralytics' within rounding. docs/PERFORMANCE.md has the figures.

Only a plain detect export takes this path: one static (or dynamic, then fixed to `imgsz`)
square input, one `[1, 4 + classes, anchors]` output, and an ultralytics `metadata.yaml`. Any
other export (end-to-end NMS heads, other tasks) is served by ultralytics (`openvino_path`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from triton_serve import compact
from vision_daemon.detectors.base import Detection, Image, ModelError, ModelInfo

log = logging.getLogger(__name__)


class NotPlain(Exception):
    """The export is not a plain detect model this path serves; ultralytics serves it instead."""


def read_plain(path: Path, imgsz: int) -> tuple[Any, int, dict[int, str]]:
    """(openvino Model with pre-processing built in, input size, class names) or NotPlain."""
    import openvino as ov  # type: ignore[import-untyped]
    from openvino.preprocess import ColorFormat, PrePostProcessor  # type: ignore[import-untyped]

    xml = next(iter(sorted(path.glob("*.xml"))), None)
    meta_path = path / "metadata.yaml"
    if xml is None or not meta_path.is_file():
        raise NotPlain("no .xml or no metadata.yaml")
    meta = yaml.safe_load(meta_path.read_text()) or {}
    if meta.get("task", "detect") != "detect" or meta.get("end2end"):
        raise NotPlain(f"task {meta.get('task')!r}, end2end {meta.get('end2end')!r}")
    names = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
    model = ov.Core().read_model(str(xml))
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotPlain(f"{len(model.inputs)} inputs, {len(model.outputs)} outputs")
    shape = model.input().get_partial_shape()
    if shape.rank.get_length() != 4:
        raise NotPlain(f"input shape {shape}")
    if shape.is_dynamic:
        model.reshape({model.input().get_any_name(): [1, 3, imgsz, imgsz]})
    dims = [int(d) for d in model.input().get_shape()]
    if dims[0] != 1 or dims[1] != 3 or dims[2] != dims[3]:
        raise NotPlain(f"input shape {dims}")
    out = [int(d) for d in model.output().get_shape()]
    if len(out) != 3 or out[0] != 1 or not names or out[1] != 4 + len(names):
        raise NotPlain(f"output shape {out} for {len(names)} classes")
    ppp = PrePostProcessor(model)
    tensor = ppp.input().tensor()
    tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    tensor.set_color_format(ColorFormat.BGR)
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    steps = ppp.input().preprocess()
    steps.convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
    return ppp.build(), dims[2], names


def rows_to_detections(rows: Any, names: dict[int, str]) -> list[Detection]:
    """(x1, y1, x2, y2, conf, class) rows as the protocol's detections, rounded as ultralytics'."""
    out: list[Detection] = []
    for x1, y1, x2, y2, conf, cls in rows.tolist():
        c = int(cls)
        out.append(
            Detection(
                label=names.get(c, str(c)),
                conf=round(conf, 4),
                bbox=[round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                class_id=c,
            )
        )
    return out


class OpenVinoDetector:
    """One worker's compiled copies: all cores when it is the only worker busy, its share else."""

    def __init__(
        self,
        path: str,
        *,
        imgsz: int,
        conf: float,
        iou: float,
        classes: Sequence[int] | None,
        threads: int,
        model: Any,
        size: int,
        names: dict[int, str],
    ) -> None:
        import openvino as ov

        self._conf, self._iou, self._size, self._names = conf, iou, size, names
        self._classes = None if classes is None else np.asarray(classes, dtype=np.int64)
        core = ov.Core()
        latency = {"PERFORMANCE_HINT": "LATENCY"}
        try:
            full = core.compile_model(model, "CPU", latency)
            # With pinning on, every one-thread copy is pinned to the same first core and the
            # workers run one after another (see YoloDetector._share_openvino_cores).
            shared = (
                core.compile_model(
                    model,
                    "CPU",
                    {**latency, "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False},
                )
                if threads >= 1
                else full
            )
        except Exception as exc:
            raise ModelError(f"model {path} could not be compiled by OpenVINO: {exc}") from None
        self._requests = (full.create_infer_request(), shared.create_infer_request())
        self.info = ModelInfo(
            name=Path(path).name,
            backend="openvino",
            device="cpu",
            imgsz=size,
            class_names=names,
        )
        if imgsz != size:
            log.info("%s has a fixed %dx%d input; imgsz %d is not used", path, size, size, imgsz)

    def warmup(self) -> None:
        import time

        t0 = time.perf_counter()
        blank = np.zeros((self._size, self._size, 3), dtype=np.uint8)
        for contended in (False, False, True):
            self.detect([blank], contended=contended)
        warm = (time.perf_counter() - t0) * 1000
        self.info = ModelInfo(**{**self.info.__dict__, "warmup_ms": warm})

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        request = self._requests[1 if contended else 0]
        out: list[list[Detection]] = []
        for image in images:  # the exports are batch 1
            padded, placement = compact.letterbox(image, self._size)
            # shared in and out: no copy of the frame into the request, none of the output
            # (read by nms before the next call overwrites it)
            prediction = request.infer({0: padded[None]}, share_inputs=True, share_outputs=True)
            prediction = prediction[0][0]
            rows = compact.nms(prediction, self._conf, self._iou, classes=self._classes)
            rows = compact.scale_back(rows, placement, image.shape[:2])
            out.append(rows_to_detections(rows, self._names))
        return out
