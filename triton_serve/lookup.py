"""Where a model name lives in a model directory: the one rule vision-daemon and vision-triton share.

Stdlib only, like options.py: server.py runs in .venv-triton (pytriton, numpy<2), where only
triton_serve's own modules can be imported, so the rule lives here and vision_daemon imports it
(vision_daemon already imports triton_serve.compact; nothing in triton_serve imports vision_daemon).
"""

from __future__ import annotations

from pathlib import Path

# For a bare name such as yolov8n, the exports tried inside the model directory, fastest backend
# for the device first: OpenVINO on CPU (about 3x PyTorch, docs/PERFORMANCE.md), TensorRT on CUDA.
CPU_ORDER = ("{}_openvino_model", "{}_int8_openvino_model", "{}.onnx", "{}_int8.onnx", "{}.pt")
GPU_ORDER = ("{}.engine", "{}.pt", "{}.onnx", "{}_openvino_model")


def candidates(name: str, model_dir: Path, device: str = "cpu") -> list[Path]:
    """Where NAME may live, in the order tried: as a path, inside model_dir, then its exports there.

    A bare name (no suffix, not ending in `_model`) adds its exports in the device's order
    (CPU_ORDER for "cpu", else GPU_ORDER).
    """
    paths = [Path(name), model_dir / name]
    if Path(name).suffix == "" and not name.endswith("_model"):
        order = CPU_ORDER if device == "cpu" else GPU_ORDER
        paths += [model_dir / pattern.format(name) for pattern in order]
    return paths


def find(name: str, model_dir: Path, device: str = "cpu") -> tuple[Path | None, list[Path]]:
    """The first candidate that exists (None if none) and the candidates tried up to it."""
    tried: list[Path] = []
    for path in candidates(name, model_dir, device):
        tried.append(path)
        if path.exists():
            return path, tried
    return None, tried
