"""Write a Triton model repository for NVIDIA's container from an ultralytics ONNX export.

    python -m triton_serve.repository --onnx yolov8n.onnx --out /srv/triton-models [--name yolov8n]

Two models, the same pair `vision-triton` serves:
- `<name>_fp32`: the ONNX export on the GPU (ONNX Runtime backend; TensorRT with
  `--accelerator tensorrt`), the float32 format ultralytics' Triton client speaks, with the class
  names in the `metadata` parameter;
- `<name>`: the compact format, a Python-backend model (deploy/triton/model.py, with
  triton_serve/compact.py beside it) that decodes and letterboxes on the server, calls `<name>_fp32`
  and answers only the boxes.
An export with a dynamic batch axis (`yolo export ... format=onnx dynamic=True`) gets Triton's
dynamic batcher for the float32 model; a fixed batch of 1 is served as it is.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_PY = HERE.parent / "deploy" / "triton" / "model.py"
COMPACT_PY = HERE / "compact.py"


def onnx_facts(path: Path) -> dict[str, Any]:
    """Input and output names and shapes, and the ultralytics metadata, of an ONNX export."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "names" not in meta:
        raise SystemExit(f"{path}: no 'names' metadata; export it with ultralytics")

    def dims(value: Any) -> list[int]:
        return [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]

    (inp,) = model.graph.input
    out = model.graph.output[0]
    return {
        "input": (inp.name, dims(inp)),
        "output": (out.name, dims(out)),
        "names": {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()},
        "stride": int(meta.get("stride", "32")),
    }


def _metadata(facts: dict[str, Any], imgsz: int) -> str:
    meta = {
        "names": facts["names"],
        "stride": facts["stride"],
        "imgsz": [imgsz, imgsz],
        "task": "detect",
        "batch": 1,
        "channels": 3,
    }
    return json.dumps(repr(meta))  # a quoted pbtxt string holding a Python literal


def fp32_config(name: str, facts: dict[str, Any], max_batch: int, accelerator: str) -> str:
    (in_name, in_dims), (out_name, out_dims) = facts["input"], facts["output"]
    imgsz = in_dims[-1] if in_dims[-1] > 0 else 640
    if in_name != "images" or out_name != "output0":
        raise SystemExit(f"expected input 'images' and output 'output0', not {in_name}, {out_name}")
    batched = in_dims[0] == -1 and max_batch > 0
    if batched:
        in_dims, out_dims = in_dims[1:], out_dims[1:]
    lines = [
        f'name: "{name}_fp32"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch if batched else 0}",
        f'input [{{ name: "images" data_type: TYPE_FP32 dims: {in_dims} }}]',
        f'output [{{ name: "output0" data_type: TYPE_FP32 dims: {out_dims} }}]',
        "instance_group [{ count: 1 kind: KIND_GPU }]",
        f'parameters {{ key: "metadata" value: {{ string_value: {_metadata(facts, imgsz)} }} }}',
    ]
    if batched:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    if accelerator == "tensorrt":
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: "
            '[{ name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }] } }'
        )
    return "\n".join(lines) + "\n"


def compact_config(name: str, facts: dict[str, Any], instances: int) -> str:
    in_dims = facts["input"][1]
    imgsz = in_dims[-1] if in_dims[-1] > 0 else 640
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "python"',
                "max_batch_size: 0",
                "input [",
                '  { name: "image" data_type: TYPE_UINT8 dims: [-1] optional: true },',
                '  { name: "pixels" data_type: TYPE_UINT8 dims: [-1, -1, 3] optional: true },',
                '  { name: "thresholds" data_type: TYPE_FP32 dims: [2] optional: true }',
                "]",
                'output [{ name: "detections" data_type: TYPE_FP32 dims: [-1, 6] }]',
                f"instance_group [{{ count: {instances} kind: KIND_CPU }}]",
                f'parameters {{ key: "metadata" value: {{ string_value: {_metadata(facts, imgsz)} }} }}',
                f'parameters {{ key: "fp32_model" value: {{ string_value: "{name}_fp32" }} }}',
                f'parameters {{ key: "imgsz" value: {{ string_value: "{imgsz}" }} }}',
            ]
        )
        + "\n"
    )


def write(
    onnx_path: Path, out: Path, name: str, max_batch: int, instances: int, accelerator: str
) -> list[Path]:
    """Both models' folders under `out`; the paths written."""
    facts = onnx_facts(onnx_path)
    fp32_dir, compact_dir = out / f"{name}_fp32", out / name
    (fp32_dir / "1").mkdir(parents=True, exist_ok=True)
    (compact_dir / "1").mkdir(parents=True, exist_ok=True)
    written = [
        fp32_dir / "config.pbtxt",
        fp32_dir / "1" / "model.onnx",
        compact_dir / "config.pbtxt",
        compact_dir / "1" / "model.py",
        compact_dir / "1" / "compact.py",
    ]
    written[0].write_text(fp32_config(name, facts, max_batch, accelerator))
    shutil.copyfile(onnx_path, written[1])
    written[2].write_text(compact_config(name, facts, instances))
    shutil.copyfile(MODEL_PY, written[3])
    shutil.copyfile(COMPACT_PY, written[4])
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m triton_serve.repository",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--onnx", required=True, type=Path, help="an ultralytics ONNX export")
    ap.add_argument("--out", required=True, type=Path, help="the model repository folder")
    ap.add_argument("--name", help="served name (default: the file's stem)")
    ap.add_argument("--max-batch", type=int, default=8, help="dynamic batch cap (dynamic exports)")
    ap.add_argument("--instances", type=int, default=2, help="compact-model instances (CPU)")
    ap.add_argument("--accelerator", choices=("none", "tensorrt"), default="none")
    args = ap.parse_args(argv)
    if not args.onnx.is_file():
        print(f"triton_serve.repository: {args.onnx} is not a file", file=sys.stderr)
        return 2
    name = args.name or args.onnx.stem.replace(".", "_")
    for path in write(args.onnx, args.out, name, args.max_batch, args.instances, args.accelerator):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
