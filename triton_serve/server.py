"""The Triton server program; it runs inside the Triton virtualenv (pytriton, numpy<2, openvino, cv2).

Start it with `vision-triton` (triton_serve.cli), which picks that virtualenv's interpreter, sets
LD_LIBRARY_PATH for pytriton's backend stub and stops the whole process group on exit.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import openvino as ov  # type: ignore[import-untyped]
import yaml
from numpy.typing import NDArray
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

try:
    from triton_serve import compact, options
except ImportError:  # run as a script (python .../triton_serve/server.py): siblings are on sys.path
    import compact  # type: ignore[no-redef]
    import options  # type: ignore[no-redef]

LOG = logging.getLogger("vision-triton")
EXIT_TIMEOUT_S = 3  # an open client connection otherwise holds tritonserver's shutdown for 30 s


def read_metadata(path: Path) -> dict[str, Any]:
    """The ultralytics export metadata: metadata.yaml beside the .xml, or the ONNX metadata_props."""
    sidecar = path.parent / "metadata.yaml"
    if path.suffix.lower() == ".xml" and sidecar.is_file():
        loaded = yaml.safe_load(sidecar.read_text())
        return dict(loaded) if isinstance(loaded, dict) else {}
    if path.suffix.lower() == ".onnx":
        import ast

        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        meta: dict[str, Any] = dict(props)
        for key in ("names", "imgsz", "stride", "batch"):
            if key in meta:
                meta[key] = ast.literal_eval(meta[key])
        return meta
    return {}


def busy_port(address: str, ports: dict[str, int]) -> str | None:
    """The first flag whose port cannot be bound on address (tritonserver would fail on it)."""
    for flag, port in ports.items():
        with socket.socket() as sock:
            # As servers bind: a port whose last connections linger in TIME_WAIT (a restart on
            # the same port) is free; one another process listens on is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return flag
    return None


def served_metadata(meta: dict[str, Any], imgsz: int, batch_size: int) -> str:
    """The `metadata` config parameter: a Python-literal dict as ultralytics' Triton client reads it.

    batch is what ultralytics warms up with (its predict sends one image per call); no `args`, so
    ultralytics sees a fixed-size model and letterboxes to imgsz x imgsz.
    """
    names = meta.get("names") or {}
    keep: dict[str, Any] = {
        k: meta[k] for k in ("description", "author", "version", "license") if k in meta
    }
    keep.update(
        names={int(k): str(v) for k, v in dict(names).items()},
        stride=int(meta.get("stride", 32)),
        imgsz=[imgsz, imgsz],
        task="detect",
        batch=batch_size,
        channels=3,
    )
    return repr(keep)


class Engine:
    """The compiled OpenVINO model; each inference instance owns one InferRequest."""

    def __init__(self, path: Path, imgsz: int) -> None:
        """Read and compile the model on CPU for one image of imgsz x imgsz."""
        core = ov.Core()
        model = core.read_model(str(path))
        # One image per inference: ultralytics' detect exports hard-code batch 1 in the DFL head's
        # Reshape, so a dynamic batch dimension fails at run time; a batch runs image by image.
        model.reshape([1, 3, imgsz, imgsz])
        # LATENCY as ultralytics' own OpenVINO backend, so the float32 model answers as the local one.
        self.compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self.imgsz = imgsz

    def runner(self) -> Callable[[NDArray[np.float32]], NDArray[np.float32]]:
        """A function running a batch [B, 3, S, S] through a private InferRequest."""
        request = self.compiled.create_infer_request()

        def run(images: NDArray[np.float32]) -> NDArray[np.float32]:
            outputs = []
            for image in images:
                request.infer({0: np.ascontiguousarray(image[None], dtype=np.float32)})
                outputs.append(np.array(request.get_output_tensor(0).data[0], dtype=np.float32))
            return np.stack(outputs)

        return run


def compact_infer_fn(
    engine: Engine,
) -> Callable[[list[Any]], list[dict[str, NDArray[np.float32]]]]:
    """One compact-model instance: image or pixels (+ thresholds) -> detections, per request."""
    run = engine.runner()

    def infer(requests: list[Any]) -> list[dict[str, NDArray[np.float32]]]:
        answers = []
        for request in requests:
            has_image, has_pixels = "image" in request, "pixels" in request
            if has_image == has_pixels:
                raise compact.BadImageError(
                    "send exactly one of the inputs 'image' (encoded bytes) and 'pixels' (BGR frame)"
                )
            image = (
                compact.decode(request["image"])
                if has_image
                else compact.check_pixels(request["pixels"])
            )
            conf, iou = options.DEFAULT_CONF, options.DEFAULT_IOU
            if "thresholds" in request:
                values = np.asarray(request["thresholds"], dtype=np.float32).reshape(-1)
                if values.size != 2:
                    raise ValueError("input 'thresholds' must hold two values: conf, iou")
                conf, iou = float(values[0]), float(values[1])
            padded, placement = compact.letterbox(image, engine.imgsz)
            raw = run(compact.to_input(padded)[None])[0]
            dets = compact.detect_postprocess(raw, placement, image.shape[:2], conf, iou)
            answers.append({"detections": dets})
        return answers

    return infer


def fp32_infer_fn(engine: Engine) -> Callable[..., dict[str, NDArray[np.float32]]]:
    """One float32-model instance: a batch of letterboxed images -> the raw model output."""
    run = engine.runner()

    @batch  # type: ignore[untyped-decorator]
    def infer(images: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        return {"output0": run(images)}

    return infer  # type: ignore[no-any-return]


def add_metadata(triton: Triton, name: str, metadata: str) -> None:
    """Put `metadata` into a bound model's config parameters (pytriton 0.7.0 private API, pinned).

    pytriton's public ModelConfig cannot set config parameters; Model builds its TritonModelConfig
    lazily and caches it, and its backend_parameters become the config's `parameters`. It must
    run between bind() and run(), before the model is loaded.
    """
    manager = triton._model_manager
    for model in manager.models:
        if model.model_name == name:
            model._get_triton_model_config().backend_parameters["metadata"] = metadata
            return
    raise RuntimeError(f"model {name} was not bound")


def serve(args: Any) -> int:
    """Bind both models, run Triton until SIGTERM/SIGINT, then stop it; the exit code."""
    try:
        path = options.resolve_model(args.model_dir, args.model)
    except options.ModelNotFoundError as exc:
        print(f"vision-triton: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        meta = read_metadata(path)
        engine = Engine(path, args.imgsz)
    except Exception as exc:  # openvino's errors span many lines; the first says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"vision-triton: cannot load {path} with OpenVINO ({first}); check it is a YOLO detect export",
            file=sys.stderr,
            flush=True,
        )
        return 2
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port}
    ports["--metrics-port"] = args.metrics_port
    busy = busy_port(args.address, ports)
    if busy:
        print(
            f"vision-triton: port {ports[busy]} on {args.address} is in use; choose another {busy}",
            file=sys.stderr,
            flush=True,
        )
        return 2
    name, fp32_name = args.name, args.name + options.FP32_SUFFIX
    config = TritonConfig(
        http_address=args.address,
        http_port=args.http_port,
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_timeout_secs=EXIT_TIMEOUT_S,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Not `with Triton(...)`: entering starts tritonserver, and bind() would then load each model
    # before add_metadata could reach its config.
    triton = Triton(config=config)
    try:
        triton.bind(
            model_name=name,
            infer_func=[compact_infer_fn(engine) for _ in range(args.instances)],
            inputs=[
                Tensor(name="image", dtype=np.uint8, shape=(-1,), optional=True),
                Tensor(name="pixels", dtype=np.uint8, shape=(-1, -1, 3), optional=True),
                Tensor(name="thresholds", dtype=np.float32, shape=(2,), optional=True),
            ],
            outputs=[Tensor(name="detections", dtype=np.float32, shape=(-1, 6))],
            config=ModelConfig(batching=False),
            strict=True,
        )
        triton.bind(
            model_name=fp32_name,
            infer_func=[fp32_infer_fn(engine) for _ in range(args.instances)],
            inputs=[Tensor(name="images", dtype=np.float32, shape=(3, args.imgsz, args.imgsz))],
            outputs=[Tensor(name="output0", dtype=np.float32, shape=(-1, -1))],
            config=ModelConfig(
                batching=True, max_batch_size=args.max_batch, batcher=DynamicBatcher()
            ),
            strict=True,
        )
        add_metadata(triton, name, served_metadata(meta, args.imgsz, 1))
        add_metadata(triton, fp32_name, served_metadata(meta, args.imgsz, 1))
        triton.run()
        print(
            f"serving {name} (compact) and {fp32_name} (float32) on http :{args.http_port}"
            f" grpc :{args.grpc_port}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            if not triton.is_alive():
                print("vision-triton: tritonserver died; see its log above", file=sys.stderr)
                return 1
        # Unload the models while tritonserver still runs: stop() alone stops tritonserver first,
        # which then waits exit_timeout_secs for the Python-backend models to go and exits failing.
        triton._model_manager.clean()
    finally:
        triton.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the Triton virtualenv."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return serve(options.parse_args("vision-triton", argv))


if __name__ == "__main__":
    sys.exit(main())
