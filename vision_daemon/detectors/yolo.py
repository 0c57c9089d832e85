"""The ultralytics detector: model resolution, one-time export, per-worker YOLO instances."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triton_serve import lookup
from vision_daemon.config import Config
from vision_daemon.detectors.base import Detection, Image, ModelError, ModelInfo
from vision_daemon.detectors.openvino import (
    NotPlain,
    OpenVinoDetector,
    read_plain,
    rows_to_detections,
)

log = logging.getLogger(__name__)
_LOGGED: set[Path] = set()  # exports already reported as served by ultralytics

# Export format -> (ultralytics format name, path of the export next to the .pt)
EXPORTS: dict[str, tuple[str, str]] = {
    "openvino": ("openvino", "{stem}_openvino_model"),
    "onnx": ("onnx", "{stem}.onnx"),
    "engine": ("engine", "{stem}.engine"),
}


def _quiet_ultralytics() -> None:
    """No network at run time: no settings sync, no auto-install (set before import too)."""
    os.environ["YOLO_AUTOINSTALL"] = "False"
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync"):
        # In memory only: SETTINGS' own __setitem__/update would rewrite the user's settings.json.
        dict.__setitem__(SETTINGS, "sync", False)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_model(name: str, model_dir: Path, device: str) -> tuple[str, list[str]]:
    """An existing path, else the name inside model_dir, else a name for ultralytics to fetch.

    The local lookup is triton_serve.lookup's, so vision-triton finds the same export by name.
    """
    found, tried_paths = lookup.find(name, model_dir, device)
    tried = [str(path) for path in tried_paths]
    if found is not None:
        return str(found), tried
    official = name if Path(name).suffix else f"{name}.pt"
    tried.append(f"ultralytics download of {official}")
    return official, tried


def export_target(path: str, export: str, device: str) -> str | None:
    """The export format to serve a .pt through, or None to serve the .pt itself."""
    if not path.endswith(".pt"):
        return None
    if export == "auto":
        # OpenVINO is about 3x faster than PyTorch on CPU (docs/PERFORMANCE.md); on CUDA the
        # .pt with --half is the portable choice (TensorRT needs an explicit --export engine).
        return "openvino" if device == "cpu" else None
    return None if export == "none" else export


@dataclass(frozen=True)
class YoloFactory:
    """Resolved once in the main thread; called in each worker thread to build its own model."""

    path: str
    device: str
    imgsz: int
    conf: float
    iou: float
    classes: tuple[str, ...]
    half: bool
    tried: tuple[str, ...] = ()
    threads: int = 0  # OpenVINO threads per worker while several are busy; 0 = no limit
    openvino_path: str = "ultralytics"  # "direct": detectors/openvino.py where the export allows

    @classmethod
    def from_config(cls, config: Config) -> YoloFactory:
        _quiet_ultralytics()
        device = resolve_device(config.device)
        path, tried = resolve_model(config.model, Path(config.model_dir), device)
        cores = len(os.sched_getaffinity(0))
        threads = config.threads or max(1, cores // config.workers)
        fmt = export_target(path, config.export, device)
        if fmt is not None:
            path = ensure_export(path, fmt, config.imgsz, device, config.half, tried)
        return cls(
            path,
            device,
            config.imgsz,
            config.conf,
            config.iou,
            tuple(config.classes),
            config.half,
            tuple(tried),
            threads if threads < cores else 0,  # 0: every core anyway, no second model
            config.openvino_path,
        )

    def __call__(self) -> YoloDetector | OpenVinoDetector:
        direct = self.direct()
        if direct is None:
            return YoloDetector(self)
        model, size, names = direct
        return OpenVinoDetector(
            self.path,
            imgsz=self.imgsz,
            conf=self.conf,
            iou=self.iou,
            classes=class_ids(self.classes, names),
            threads=self.threads,
            model=model,
            size=size,
            names=names,
        )

    def direct(self) -> tuple[Any, int, dict[int, str]] | None:
        """The OpenVINO model for the direct path, or None where ultralytics serves (logged once)."""
        path = Path(self.path)
        if self.openvino_path != "direct" or self.device != "cpu":
            return None
        if not (path.is_dir() and path.name.endswith("_openvino_model")):
            return None
        try:
            return read_plain(path, self.imgsz)
        except NotPlain as why:
            if path not in _LOGGED:
                _LOGGED.add(path)
                log.info(
                    "%s is served by ultralytics' predictor (not a plain detect export: %s)",
                    path,
                    why,
                )
            return None


def ensure_export(
    path: str, fmt: str, imgsz: int, device: str, half: bool, tried: list[str]
) -> str:
    """Export a .pt once and cache it next to the weights; later starts serve the cached export."""
    uformat, pattern = EXPORTS[fmt]
    pt = Path(path)
    target = pt.with_name(pattern.format(stem=pt.stem))
    if target.exists():
        log.info("serving cached %s export %s", fmt, target)
        return str(target)
    from ultralytics import YOLO  # type: ignore[attr-defined]

    log.info("exporting %s to %s once (cached at %s)", path, fmt, target)
    try:
        model = YOLO(path, task="detect")
        out = model.export(format=uformat, imgsz=imgsz, device=device, half=half)
    except Exception as exc:
        raise ModelError(
            f"model {path} could not be exported to {fmt}: {exc} (tried: {', '.join(tried)})"
        ) from None
    return str(out)


def class_ids(wanted: Sequence[str], names: dict[int, str]) -> list[int] | None:
    """The class ids `classes` names (names or ids); None = all; ModelError for an unknown one."""
    if not wanted:
        return None
    by_name = {v: k for k, v in names.items()}
    ids = []
    for w in wanted:
        if w.isdigit() and int(w) in names:
            ids.append(int(w))
        elif w in by_name:
            ids.append(by_name[w])
        else:
            raise ModelError(f"class {w!r} is not in the model's {len(names)} classes")
    return ids


class YoloDetector:
    """One ultralytics YOLO instance; ultralytics is not thread-safe across one instance."""

    def __init__(self, factory: YoloFactory) -> None:
        from ultralytics import YOLO  # type: ignore[attr-defined]

        self._f = factory
        self._ov: tuple[Any, Any, Any] | None = None  # (backend, all-cores model, shared model)
        try:
            self.model = YOLO(factory.path, task="detect")
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model {factory.path} could not be loaded ({first}); tried: "
                f"{', '.join(factory.tried) or factory.path}. Pass an existing path or set "
                "--model-dir / VISION_DAEMON_MODEL_DIR"
            ) from None
        names: dict[int, str] = {int(k): str(v) for k, v in self.model.names.items()}
        self._names = names
        self._classes = class_ids(factory.classes, names)
        self.info = ModelInfo(
            name=Path(factory.path).name,
            backend=self._backend(factory.path),
            device=factory.device,
            imgsz=factory.imgsz,
            class_names=names,
        )

    @staticmethod
    def _backend(path: str) -> str:
        p = Path(path)
        if p.is_dir() and p.name.endswith("_openvino_model"):
            return "openvino"
        return {".pt": "pytorch", ".onnx": "onnxruntime", ".engine": "tensorrt"}.get(
            p.suffix, p.suffix.lstrip(".") or "unknown"
        )

    def _predict(self, images: Sequence[Image], contended: bool = False) -> list[Any]:
        if self._ov is not None:  # the pool decides which compiled copy fits the load
            backend, full, shared = self._ov
            backend.ov_compiled_model = shared if contended else full
        return self._predict_with(images)

    def _predict_with(self, images: Sequence[Image]) -> list[Any]:
        f = self._f
        return list(
            self.model.predict(
                list(images),
                imgsz=f.imgsz,
                conf=f.conf,
                iou=f.iou,
                classes=self._classes,
                **({"half": True} if f.half else {}),  # passing half=False warns on every call
                device=f.device,
                verbose=False,
            )
        )

    def _share_openvino_cores(self) -> None:
        """Compile a second OpenVINO model limited to this worker's share of the cores.

        ultralytics compiles in LATENCY mode, which gives every request all the cores; two
        workers busy at once then fight over them (2 workers on 2 cores: 50 ms per frame instead
        of 27, and 1 thread each runs 32 ms side by side). So each worker holds both models and
        picks per call: all cores when it is the only worker busy (lowest latency for a single
        stream), its share when others are busy too (highest throughput under load).
        ultralytics exposes no setting for this, so it reaches into its OpenVINO backend; if that
        shape changes, it logs and keeps ultralytics' own model.
        """
        f = self._f
        if self.info.backend != "openvino" or f.device != "cpu":
            return
        if f.threads < 1:
            return
        found = openvino_backend(self.model)
        xml = next(Path(f.path).glob("*.xml"), None)
        if found is None or xml is None:
            log.warning("cannot share OpenVINO cores on this ultralytics version; using its own")
            return
        backend, compile_model, full = found
        import openvino as ov  # type: ignore[import-untyped]

        config = {**compile_model.keywords.get("config", {})}
        config["INFERENCE_NUM_THREADS"] = f.threads
        # With pinning on, every single-thread model is pinned to the same first core and the
        # workers run one after another (2 x 1 thread: 64 ms each instead of 32).
        config["ENABLE_CPU_PINNING"] = False
        shared = compile_model(ov.Core().read_model(str(xml)), config=config)
        self._ov = (backend, full, shared)
        log.info(
            "OpenVINO: all cores when one worker is busy, %d thread(s) when several are", f.threads
        )

    def warmup(self) -> None:
        t0 = time.perf_counter()
        blank = np.zeros((self._f.imgsz, self._f.imgsz, 3), dtype=np.uint8)
        self._predict([blank])  # builds ultralytics' predictor and backend
        self._share_openvino_cores()
        for _ in range(2):
            self._predict([blank])
        if self._ov is not None:  # warm the shared-cores model too (the next call re-picks)
            backend, _, shared = self._ov
            backend.ov_compiled_model = shared
            self._predict_with([blank])
        warm = (time.perf_counter() - t0) * 1000
        self.info = ModelInfo(**{**self.info.__dict__, "warmup_ms": warm})

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        for result in self._predict(images, contended):
            boxes = result.boxes
            rows = np.column_stack(
                [boxes.xyxy.cpu().numpy(), boxes.conf.cpu().numpy(), boxes.cls.cpu().numpy()]
            )  # (x1, y1, x2, y2, conf, class), as the direct OpenVINO path has them
            out.append(rows_to_detections(rows, self._names))
        return out


def openvino_backend(model: Any) -> tuple[Any, Any, Any] | None:
    """(backend, its compile_model partial, its compiled model) inside an ultralytics YOLO.

    The one place that reads ultralytics internals: `model.predictor.model.backend` with
    `compile_model` (a functools.partial holding the compile config) and `ov_compiled_model`.
    None when that shape is not there (tests/integration/test_yolo.py fails loudly if it changes).
    """
    predictor = getattr(model, "predictor", None)
    backend = getattr(getattr(predictor, "model", None), "backend", None)
    compile_model = getattr(backend, "compile_model", None)
    full = getattr(backend, "ov_compiled_model", None)
    if backend is None or compile_model is None or full is None:
        return None
    if not hasattr(compile_model, "keywords"):
        return None
    return backend, compile_model, full
