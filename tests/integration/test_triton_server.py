"""vision-triton as a real Triton server (pytriton in .venv-triton) against the local model."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import MODEL_DIR, ROOT, shared_model
from tests.tritons import TritonServer
from triton_serve import cli

pytestmark = pytest.mark.slow  # real Triton servers, models and sockets


MODEL = "yolov8n_int8_openvino_model"


SERVED = "yolov8n_int8"


BUS = Path(cv2.__file__).parents[1] / "ultralytics" / "assets" / "bus.jpg"


START_S = 90.0


STOP_S = 20.0


def bus_path() -> Path:
    """ultralytics' bus.jpg, or a skip saying it is missing."""
    if not BUS.is_file():
        pytest.skip(f"{BUS} not found: ultralytics' assets are needed")
    return BUS


def triton_python() -> Path:
    """The Triton virtualenv's python, or a one-line skip."""
    python = cli.find_python()
    if python is None:
        pytest.skip("no .venv-triton: run 'make triton-venv' (make test builds it)")
    return python


def start(tmp: Path, *extra: str) -> TritonServer:
    """vision-triton on free ports, both models ready (its output in tmp)."""
    triton_python()
    shared_model(MODEL)
    return TritonServer(MODEL_DIR, MODEL, extra=extra, log=tmp / "triton.log").start(START_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """One vision-triton for the module's client tests."""
    running = start(tmp_path_factory.mktemp("triton"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local() -> np.ndarray:
    """The local OpenVINO model's bus.jpg detections as rows (x1, y1, x2, y2, conf, class)."""
    from ultralytics import YOLO

    result = YOLO(str(shared_model(MODEL)), task="detect").predict(str(bus_path()), verbose=False)
    boxes = result[0].boxes
    return np.c_[boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy()]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_ultralytics_over_triton_matches_local_model(
    server: TritonServer, local: np.ndarray, scheme: str
) -> None:
    """YOLO("<scheme>://.../<served>_fp32") gives the local model's detections exactly."""
    from ultralytics import YOLO

    port = server.http_port if scheme == "http" else server.grpc_port
    model = YOLO(f"{scheme}://127.0.0.1:{port}/{SERVED}_fp32", task="detect")
    result = model.predict(str(bus_path()), verbose=False)[0]
    assert result.names[5] == "bus"
    boxes = result.boxes
    remote = np.c_[boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy()]
    assert remote[:, 5].tolist() == local[:, 5].tolist()
    # Same preprocessing, the same OpenVINO graph compiled the same way: identical on this machine.
    np.testing.assert_allclose(remote[:, 4], local[:, 4], atol=1e-4)
    np.testing.assert_allclose(remote[:, :4], local[:, :4], atol=0.1)


def compact_infer(server: TritonServer, scheme: str, **inputs: np.ndarray) -> np.ndarray:
    """Send one compact request with tritonclient and return its detections."""
    if scheme == "http":
        import tritonclient.http as client

        url = f"127.0.0.1:{server.http_port}"
    else:
        import tritonclient.grpc as client  # type: ignore[no-redef]

        url = f"127.0.0.1:{server.grpc_port}"
    dtypes = {"image": "UINT8", "pixels": "UINT8", "thresholds": "FP32"}
    tensors = []
    for name, array in inputs.items():
        tensor = client.InferInput(name, list(array.shape), dtypes[name])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    triton = client.InferenceServerClient(url)
    try:
        out = triton.infer(SERVED, tensors).as_numpy("detections")
    finally:
        triton.close()
    assert out is not None and out.dtype == np.float32 and out.shape[1:] == (6,)
    return out


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_compact_model_matches_local_model(
    server: TritonServer, local: np.ndarray, scheme: str
) -> None:
    """JPEG bytes or raw pixels to <served> give the local model's labels, boxes and confidences."""
    jpeg = np.frombuffer(bus_path().read_bytes(), dtype=np.uint8)
    pixels = cv2.imread(str(bus_path()))
    for dets in (
        compact_infer(server, scheme, image=jpeg),
        compact_infer(server, scheme, pixels=pixels),
    ):
        assert dets[:, 5].tolist() == local[:, 5].tolist()
        # Measured on bus.jpg: identical to the local model (max |diff| 0.0 px and 0.0 conf): the
        # server reproduces ultralytics' letterbox and NMS. The bounds allow another JPEG decoder.
        np.testing.assert_allclose(dets[:, :4], local[:, :4], atol=2.0)
        np.testing.assert_allclose(dets[:, 4], local[:, 4], atol=0.02)


def test_compact_thresholds_and_bad_requests(server: TritonServer, local: np.ndarray) -> None:
    """`thresholds` raises conf; both or neither image input, or undecodable bytes, are errors."""
    from tritonclient.utils import InferenceServerException

    jpeg = np.frombuffer(bus_path().read_bytes(), dtype=np.uint8)
    strict = compact_infer(server, "http", image=jpeg, thresholds=np.array([0.5, 0.7], np.float32))
    assert len(strict) == int((local[:, 4] > 0.5).sum())
    pixels = cv2.imread(str(bus_path()))
    for inputs in ({"image": jpeg, "pixels": pixels}, {"image": np.zeros(10, np.uint8)}):
        with pytest.raises(InferenceServerException):
            compact_infer(server, "http", **inputs)


def test_metadata_parameter_names_the_classes(server: TritonServer) -> None:
    """Both models' config carries `metadata` with the export's class names."""
    import ast

    for name in (SERVED, f"{SERVED}_fp32"):
        config = httpx.get(f"http://127.0.0.1:{server.http_port}/v2/models/{name}/config").json()
        meta = ast.literal_eval(config["parameters"]["metadata"]["string_value"])
        assert meta["names"][0] == "person" and meta["imgsz"] == [640, 640]
        assert meta["task"] == "detect" and meta["stride"] == 32


def test_sigterm_stops_server_and_its_tritonserver(tmp_path: Path) -> None:
    """SIGTERM to vision-triton: exit 0 within the bound, no tritonserver of it survives."""
    running = start(tmp_path, "--instances", "1")
    family = running.tree()[1:]
    tritons = [p for p in family if p.name() == "tritonserver"]
    assert tritons, "no tritonserver under vision-triton"
    started = time.monotonic()
    assert running.stop(STOP_S + 20) == 0, running.output()[-3000:]
    assert time.monotonic() - started < STOP_S
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, f"left running: {alive}"


def test_wrong_model_name_is_one_line_error(tmp_path: Path) -> None:
    """An unknown --model exits 2 with one line naming the paths tried."""
    triton_python()
    command = [sys.executable, "-m", "triton_serve.cli", "--model-dir", str(tmp_path)]
    proc = subprocess.run(
        [*command, "--model", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nope" in lines[0] and str(tmp_path / "nope.onnx") in lines[0]
