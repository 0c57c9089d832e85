"""Arguments, served-name rule and model lookup shared by the launcher and the server (stdlib only)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

try:
    from triton_serve import lookup
except ImportError:  # imported by server.py run as a script: its siblings are on sys.path
    import lookup  # type: ignore[no-redef]

FP32_SUFFIX = "_fp32"
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.7
# pytriton accepts model names matching ^[a-zA-Z0-9._-]+$ (Triton._validate_model_name); the
# default name also drops '.', since ultralytics reads '.pt', '.onnx', ... in a URL as a file format.
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")
_NOT_DEFAULT = re.compile(r"[^A-Za-z0-9_-]")
# ultralytics picks a model's format by these parts of its name before it considers a URL Triton
# (AutoBackend._model_type over exporter.export_formats(), ultralytics 8.3/8.4), so a served name
# holding one is unusable from YOLO("http://host:port/NAME").
EXPORT_MARKERS = (
    ".pt", ".torchscript", ".onnx", "_openvino_model", ".engine", ".mlpackage", ".mlmodel",
    ".aimodel", "_saved_model", ".pb", ".tflite", "_paddle_model", ".mnn", "_ncnn_model",
    "_imx_model", "_rknn_model", "_executorch_model", "_axelera_model", "_deepx_model",
    "_hailo_model", "_ascend_model", "_xilinx_model",
)  # fmt: skip


class ModelNotFoundError(Exception):
    """The model name resolves to no usable export in the model directory."""


def served_name(model: str) -> str:
    """The default Triton name for NAME: its last part less '.onnx' and '_openvino_model', '.' -> '_'.

    yolov8n_int8_openvino_model and yolov8n_int8.onnx are both served as yolov8n_int8.
    """
    name = Path(model.rstrip("/")).name
    for suffix in (".onnx", ".xml", "_openvino_model"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return _NOT_DEFAULT.sub("_", name) or "model"


def export_marker(name: str) -> str | None:
    """The ultralytics export suffix inside name, if any (it would hide the Triton URL)."""
    lowered = name.lower()
    return next((m for m in EXPORT_MARKERS if m in lowered), None)


def resolve_model(model_dir: Path, model: str) -> Path:
    """The OpenVINO .xml or .onnx file NAME names: found as vision-daemon on CPU finds it (lookup.py).

    ModelNotFoundError (one line) says what was tried, or why what was found cannot be served.
    """
    found, tried = lookup.find(model, model_dir, "cpu")
    if found is None:
        raise ModelNotFoundError(
            f"model {model!r} not found (tried {', '.join(str(p) for p in tried)}); check --model"
            " and --model-dir (or VISION_DAEMON_MODEL_DIR)"
        )
    if found.is_dir():
        xmls = sorted(found.glob("*.xml"))
        if len(xmls) == 1:
            return xmls[0]
        onnx = sorted(found.glob("*.onnx"))
        if not xmls and len(onnx) == 1:
            return onnx[0]
        raise ModelNotFoundError(
            f"model {model!r}: {found} holds {len(xmls)} .xml files, not one OpenVINO export;"
            " point --model at one export"
        )
    if found.suffix.lower() in {".onnx", ".xml"}:
        return found
    raise ModelNotFoundError(
        f"model {model!r} resolves to {found}, but vision-triton serves only OpenVINO or ONNX"
        f" exports; export it first (vision-daemon --model {found} --device cpu exports a .pt to"
        " OpenVINO beside it)"
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The argument parser both `vision-triton` and server.py use."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve a YOLO detection export (OpenVINO dir or .onnx) with NVIDIA Triton as two models:"
            " SERVED (compact: encoded image or raw BGR pixels in, detections out) and"
            f" SERVED{FP32_SUFFIX} (ultralytics-compatible float32 tensors, batched)."
        ),
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("VISION_DAEMON_MODEL_DIR", "models")),
        help="directory holding the exports (default: $VISION_DAEMON_MODEL_DIR or ./models)",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=(
            "model name or path, found as vision-daemon finds it on CPU: the path, NAME inside"
            " --model-dir, then for a bare NAME: "
            + ", ".join(pattern.format("NAME") for pattern in lookup.CPU_ORDER)
            + " there; the first found must be an OpenVINO folder (one .xml) or a .onnx file"
        ),
    )
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)"
    )
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="address HTTP, gRPC and metrics bind to (default 127.0.0.1; 0.0.0.0 for all)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help=(
            "served model name (default: NAME's last part without a trailing '.onnx' or"
            " '_openvino_model', every character other than letters, digits, '_', '-' replaced by"
            f" '_'; e.g. yolov8n_int8); the float32 model is SERVED{FP32_SUFFIX}"
        ),
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=2,
        help="inference instances per model, i.e. requests run concurrently (default 2)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help=f"largest batch the dynamic batcher forms for SERVED{FP32_SUFFIX} (default 8)",
    )
    parser.add_argument(
        "--imgsz", type=int, default=640, help="square network input size in pixels (default 640)"
    )
    return parser


def parse_args(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; bad values end with argparse's one-line usage error."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for flag in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, flag)
        if not 0 < port < 65536:
            parser.error(f"--{flag.replace('_', '-')} must be 1..65535, not {port}")
    if args.instances < 1 or args.max_batch < 1 or args.imgsz < 32 or args.imgsz % 32:
        parser.error("--instances and --max-batch must be >= 1 and --imgsz a multiple of 32")
    if args.name is not None and _NOT_ALLOWED.search(args.name):
        parser.error(f"--name {args.name!r} may hold only letters, digits, '.', '_' and '-'")
    args.name = args.name or served_name(args.model)
    marker = export_marker(args.name)
    if marker:
        parser.error(
            f"served name {args.name!r} holds {marker!r}, which ultralytics takes for a model file;"
            " choose another with --name"
        )
    return args
