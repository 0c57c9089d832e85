"""The model repository for NVIDIA's Triton container (deploy/triton), without the container.

The configs are parsed with Triton's own ModelConfig protobuf; the compact Python-backend model
runs against a stand-in of `triton_python_backend_utils` whose BLS call runs the ONNX export in
ONNX Runtime (the container's GPU is what this machine lacks, not the code's logic).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.conftest import shared_model
from tests.tritons import bus_jpg
from triton_serve import repository

pytestmark = pytest.mark.slow  # a real ONNX model


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_parse_as_triton_model_configs(tmp_path: Path) -> None:
    """Both configs are valid ModelConfig text: names, dtypes, dims and the class-name metadata."""
    onnx = shared_model("yolov8n_int8.onnx")
    repository.write(onnx, tmp_path, "yolov8n", 8, 2, "tensorrt")
    fp32 = parse(tmp_path / "yolov8n_fp32" / "config.pbtxt")
    assert fp32.backend == "onnxruntime" and fp32.max_batch_size == 0  # the export's batch is 1
    assert [(i.name, list(i.dims)) for i in fp32.input] == [("images", [1, 3, 640, 640])]
    assert [(o.name, list(o.dims)) for o in fp32.output] == [("output0", [1, 84, 8400])]
    assert fp32.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    meta = ast.literal_eval(fp32.parameters["metadata"].string_value)
    assert len(meta["names"]) == 80 and meta["names"][0] == "person" and meta["task"] == "detect"
    compact = parse(tmp_path / "yolov8n" / "config.pbtxt")
    assert compact.backend == "python" and compact.parameters["fp32_model"].string_value == (
        "yolov8n_fp32"
    )
    assert {i.name: i.optional for i in compact.input} == {
        "image": True,
        "pixels": True,
        "thresholds": True,
    }
    assert [(o.name, list(o.dims)) for o in compact.output] == [("detections", [-1, 6])]
    assert (tmp_path / "yolov8n" / "1" / "compact.py").read_text() == (
        Path(repository.COMPACT_PY).read_text()
    )


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self._array = name, np.asarray(array)

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.output_tensors, self.error_ = output_tensors or [], error

    def has_error(self) -> bool:
        return self.error_ is not None

    def error(self) -> Any:
        return self.error_


def stand_in_backend(onnx: Path) -> types.ModuleType:
    """`triton_python_backend_utils` as the model uses it; BLS runs the export in ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    pb = types.ModuleType("triton_python_backend_utils")

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list[str], inputs: Any):
            self.inputs = {t.name: t.as_numpy() for t in inputs}

        def exec(self) -> _Response:
            (out,) = session.run(["output0"], self.inputs)
            return _Response([_Tensor("output0", out)])

    def by_name(holder: Any, name: str) -> _Tensor | None:
        items = holder.output_tensors if isinstance(holder, _Response) else holder
        return next((t for t in items if t.name == name), None)

    pb.Tensor = _Tensor  # type: ignore[attr-defined]
    pb.TritonError = _Error  # type: ignore[attr-defined]
    pb.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb.InferenceRequest = InferenceRequest  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = by_name  # type: ignore[attr-defined]
    pb.get_output_tensor_by_name = by_name  # type: ignore[attr-defined]
    return pb


def test_compact_python_backend_model_finds_what_the_local_model_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/triton/model.py on bus.jpg (JPEG and pixels) answers the local ONNX model's boxes;
    a request with neither input fails alone with a clear error."""
    import cv2
    from ultralytics import YOLO  # type: ignore[attr-defined]

    onnx = shared_model("yolov8n_int8.onnx")
    repository.write(onnx, tmp_path, "yolov8n", 8, 2, "none")
    version = tmp_path / "yolov8n" / "1"
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in_backend(onnx))
    monkeypatch.syspath_prepend(str(version))
    monkeypatch.delitem(sys.modules, "compact", raising=False)
    spec = importlib.util.spec_from_file_location("deployed_model", version / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": _json_config(tmp_path / "yolov8n" / "config.pbtxt")})

    data = np.frombuffer(bus_jpg().read_bytes(), np.uint8)
    pixels = cv2.imdecode(data, cv2.IMREAD_COLOR)
    requests = [[_Tensor("image", data)], [_Tensor("pixels", pixels)], []]
    answers = model.execute(requests)
    assert answers[2].has_error() and "exactly one of the inputs" in answers[2].error().message()

    local = YOLO(str(onnx), task="detect").predict(str(bus_jpg()), verbose=False)[0].boxes
    want = sorted(
        zip(local.cls.numpy().astype(int).tolist(), local.xyxy.numpy().tolist(), strict=True)
    )
    for answer in answers[:2]:
        assert not answer.has_error()
        rows = answer.output_tensors[0].as_numpy()
        got = sorted((int(r[5]), r[:4].tolist()) for r in rows)
        assert [c for c, _ in got] == [c for c, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert np.allclose(a, b, atol=3.0), (a, b)


def _json_config(path: Path) -> str:
    from google.protobuf import json_format

    config = parse(path)
    return json_format.MessageToJson(config, preserving_proto_field_name=True)
