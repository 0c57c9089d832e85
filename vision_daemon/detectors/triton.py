"""Remote inference on NVIDIA Triton servers: endpoints with failover, two wire formats.

`--model http://host:8000/NAME` (or `grpc://host:8001/NAME`, repeated or `[[backends]]` for more
endpoints) sends every batch to one Triton endpoint. The format is the named model's own:

- compact: inputs `image` (encoded JPEG bytes) or `pixels` (a raw BGR frame), both UINT8, and
  `thresholds`; the server letterboxes, runs the model and applies NMS, and answers `detections`
  rows (x1, y1, x2, y2, conf, class_id) in the frame's pixels (one all-zero row when there are
  none: pytriton cannot send an empty tensor). A frame costs about a hundred KB up instead of
  4.9 MB. `vision-triton` serves it under the export's plain name.
- float32: ultralytics' own Triton client (`images` FP32 [3, 640, 640] up, the raw model output
  back), for any ultralytics-compatible model (NVIDIA's container serving an ONNX export, or
  `vision-triton`'s `<NAME>_fp32`). About 4.9 MB up and 2.8 MB back per frame.

Endpoints are shared by every worker (`Endpoints`, thread-safe): a call goes to the up endpoint
with the fewest calls in flight; a call that fails or outlives `backend_timeout_s` marks its
endpoint down and its frames drop as `backend_error` (no retry: a retried frame would be late).
A prober (the lifecycle runs `probe` every `backend_probe_s`) takes an endpoint back once its
model answers ready, and marks an idle endpoint down when it stops answering.
"""

from __future__ import annotations

import ast
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np

from vision_daemon.config import Config
from vision_daemon.detectors.base import BackendError, Detection, Image, ModelError, ModelInfo
from vision_daemon.detectors.kserve import HttpTriton, adopt
from vision_daemon.detectors.yolo import class_ids

log = logging.getLogger(__name__)

SCHEMES = ("http", "grpc")
WARMUP_TIMEOUT_S = 30.0  # a server's first calls may load and compile its model instances
COMPACT, FLOAT32 = "compact", "float32"


def is_remote(model: str) -> bool:
    return urlsplit(model).scheme in SCHEMES if "://" in model else False


def parse_url(url: str) -> tuple[str, str, str]:
    """(scheme, host:port, model name) of `http://host:port/name`; ModelError if malformed."""
    parts = urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme not in SCHEMES or not parts.hostname or not name or "/" in name:
        raise ModelError(
            f"bad Triton endpoint {url!r}: use http://HOST:PORT/MODEL or grpc://HOST:PORT/MODEL"
        )
    if parts.username or parts.password or parts.query:
        raise ModelError(f"bad Triton endpoint {url!r}: no credentials or query are supported")
    port = parts.port or (8000 if parts.scheme == "http" else 8001)
    return parts.scheme, f"{parts.hostname}:{port}", name


def client(scheme: str, netloc: str, timeout_s: float) -> Any:
    """A client for one endpoint: ours on http.client for HTTP (kserve.py says why not
    tritonclient.http), tritonclient.grpc for gRPC (its timeouts are per call)."""
    if scheme == "http":
        return HttpTriton(netloc, timeout_s)
    import tritonclient.grpc as grpc  # type: ignore[import-untyped]

    return grpc.InferenceServerClient(netloc)


def infer(
    c: Any, scheme: str, model: str, inputs: dict[str, np.ndarray], output: str, timeout_s: float
) -> np.ndarray:
    """One inference call with named arrays; the named output back."""
    if scheme == "http":
        return c.infer_arrays(model, inputs, [output])[output]  # type: ignore[no-any-return]
    import tritonclient.grpc as grpc

    tensors = []
    for name, array in inputs.items():
        t = grpc.InferInput(name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = c.infer(
        model, tensors, outputs=[grpc.InferRequestedOutput(output)], client_timeout=timeout_s
    )
    return result.as_numpy(output)  # type: ignore[no-any-return]


def _call_kw(scheme: str, timeout_s: float) -> dict[str, Any]:
    return {"client_timeout": timeout_s} if scheme == "grpc" else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@dataclass(eq=False)
class Endpoint:
    """One Triton model at one server, with what the pool knows of it."""

    url: str
    scheme: str
    netloc: str
    model: str
    fmt: str = ""  # compact or float32, from the model's config
    names: dict[int, str] = field(default_factory=dict)
    up: bool = False
    since: float = field(default_factory=time.monotonic)
    last_error: str = ""
    in_flight: int = 0
    calls: int = 0
    frames: int = 0
    failures: int = 0
    downs: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "format": self.fmt,
            "state": "up" if self.up else "down",
            "for_s": round(now - self.since, 1),
            "last_error": self.last_error,
            "in_flight": self.in_flight,
            "calls": self.calls,
            "frames": self.frames,
            "failures": self.failures,
            "downs": self.downs,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_per_frame": round((self.bytes_up + self.bytes_down) / self.frames)
            if self.frames
            else None,
        }


def describe(scheme: str, netloc: str, model: str, timeout_s: float) -> tuple[str, dict[int, str]]:
    """(format, class names) of a model an endpoint serves; raises with one line if it cannot."""
    c = client(scheme, netloc, timeout_s)
    kw = _call_kw(scheme, timeout_s)
    try:
        try:
            live = c.is_server_live(**kw)
        except Exception as exc:
            raise BackendError(f"unreachable ({_first_line(exc)})") from None
        if not live:
            raise BackendError("the server is not live")
        if not c.is_model_ready(model, **kw):
            raise ModelError(f"has no model {model!r} ready{_served(c, scheme, kw)}")
        if scheme == "http":
            cfg = c.get_model_config(model)
        else:
            cfg = c.get_model_config(model, as_json=True, **kw)["config"]
    finally:
        c.close()
    inputs = {i["name"]: i.get("data_type", "") for i in cfg.get("input", [])}
    if inputs.get("image") == "TYPE_UINT8" or inputs.get("pixels") == "TYPE_UINT8":
        fmt = COMPACT
    elif "TYPE_FP32" in inputs.values() and len(inputs) == 1:
        fmt = FLOAT32
    else:
        raise ModelError(
            f"serves {model!r} with inputs {inputs}: neither the compact format (image/pixels "
            "UINT8) nor one FP32 image tensor"
        )
    raw = cfg.get("parameters", {}).get("metadata", {}).get("string_value", "")
    try:
        meta = ast.literal_eval(raw) if raw else {}
        names = {int(k): str(v) for k, v in dict(meta.get("names", {})).items()}
    except (ValueError, SyntaxError, TypeError, AttributeError):
        names = {}
    if not names:
        raise ModelError(f"serves {model!r} without class names (config parameter 'metadata')")
    return fmt, names


def _served(c: Any, scheme: str, kw: dict[str, Any]) -> str:
    """What the server says it serves, as the end of an error message."""
    try:
        if scheme == "grpc":
            index = c.get_model_repository_index(as_json=True, **kw).get("models", [])
        else:
            index = c.get_model_repository_index()
        names = sorted({str(m.get("name")) for m in index})
    except Exception:  # pytriton guards the repository index behind a token
        return "; check the name"
    return f" (it serves: {', '.join(names[:20]) or 'nothing'})"


class Endpoints:
    """Every endpoint's state, shared by the workers (any thread) and the prober."""

    def __init__(self, urls: Sequence[str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.items = [Endpoint(url, *parse_url(url)) for url in urls]
        self._lock = threading.Lock()
        self.warming = threading.Lock()  # workers warm up one after another
        self.names: dict[int, str] = {}  # the classes every endpoint must serve
        self._turn = 0

    def pick(self) -> Endpoint:
        """The up endpoint with the fewest calls in flight (ties in turn); BackendError if none."""
        with self._lock:
            up = [e for e in self.items if e.up]
            if not up:
                raise BackendError(f"every Triton endpoint is down ({self.why_down()})")
            self._turn += 1
            least = min(e.in_flight for e in up)
            ties = [e for e in up if e.in_flight == least]
            chosen = ties[self._turn % len(ties)]
            chosen.in_flight += 1
            return chosen

    def done(self, e: Endpoint, frames: int, up_bytes: int, down_bytes: int) -> None:
        with self._lock:
            e.in_flight -= 1
            e.calls += 1
            e.frames += frames
            e.bytes_up += up_bytes
            e.bytes_down += down_bytes

    def failed(self, e: Endpoint, why: str) -> None:
        with self._lock:
            e.in_flight -= 1
            e.failures += 1
            self._down(e, why)

    def mark_down(self, e: Endpoint, why: str) -> None:
        with self._lock:
            self._down(e, why)

    def _down(self, e: Endpoint, why: str) -> None:
        e.last_error = why
        if e.up:
            e.up, e.since = False, time.monotonic()
            e.downs += 1
            log.warning("Triton endpoint %s is down: %s", e.url, why)

    def set_up(self, e: Endpoint, fmt: str, names: dict[int, str]) -> None:
        """Take an endpoint up, unless its classes are not the ones every endpoint must serve
        (the first answering endpoint's: boxes from another model's classes would lie)."""
        with self._lock:
            if self.names and names != self.names:
                self._down(e, "its model's class names changed or differ from the others'")
                return
            self.names = names
            e.fmt, e.names = fmt, names
            if not e.up:
                e.up, e.since = True, time.monotonic()
                log.info("Triton endpoint %s is up (%s format)", e.url, fmt)

    def all_down(self) -> bool:
        return not any(e.up for e in self.items)

    def why_down(self) -> str:
        return "; ".join(f"{e.url}: {e.last_error or 'down'}" for e in self.items if not e.up)

    def probe(self) -> None:
        """Ask every endpoint whether its model is ready (blocking: run it off the event loop)."""
        for e in self.items:
            try:
                fmt, names = describe(e.scheme, e.netloc, e.model, self.timeout_s)
            except Exception as exc:  # a client library surprise must not end the prober either
                self.mark_down(e, _first_line(exc))
                continue
            self.set_up(e, fmt, names)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [e.snapshot(now) for e in self.items]


@dataclass(frozen=True)
class TritonFactory:
    """Checked once at start; each worker then builds a TritonDetector sharing `endpoints`."""

    endpoints: Endpoints
    names: dict[int, str]
    imgsz: int
    conf: float
    iou: float
    classes: tuple[str, ...]
    send: str  # compact format: jpeg or pixels
    jpeg_quality: int

    @classmethod
    def from_config(cls, config: Config) -> TritonFactory:
        urls = [config.model, *config.backends]
        endpoints = Endpoints(urls, config.backend_timeout_s)
        unreachable = []
        for e in endpoints.items:
            try:
                fmt, names = describe(e.scheme, e.netloc, e.model, config.backend_timeout_s)
            except ModelError as exc:  # a server that answers without the model: a config error
                raise ModelError(f"Triton endpoint {e.url} {exc}") from None
            except BackendError as exc:
                unreachable.append(f"{e.url} is {exc}")
                e.last_error = str(exc)
                continue
            if endpoints.names and names != endpoints.names:
                raise ModelError(f"Triton endpoint {e.url} serves other class names than the rest")
            endpoints.set_up(e, fmt, names)
        if endpoints.all_down():
            raise ModelError(
                f"no Triton endpoint answers: {'; '.join(unreachable)}. Start the server "
                "(vision-triton or NVIDIA's container) or fix --model"
            )
        for line in unreachable:
            log.warning("Triton endpoint %s; it is probed until it answers", line)
        return cls(
            endpoints,
            endpoints.names,
            config.imgsz,
            config.conf,
            config.iou,
            tuple(config.classes),
            config.backend_image,
            config.backend_jpeg_quality,
        )

    def __call__(self) -> TritonDetector:
        return TritonDetector(self)


class TritonDetector:
    """One worker's clients to every endpoint (tritonclient's are not shared across threads)."""

    def __init__(self, factory: TritonFactory) -> None:
        self._f = factory
        self._clients: dict[str, Any] = {}  # url -> tritonclient (compact) or YOLO (float32)
        self._keep = class_ids(factory.classes, factory.names)
        first = factory.endpoints.items[0]
        self.info = ModelInfo(
            name=first.model,
            backend=f"triton ({len(factory.endpoints.items)} endpoint(s))",
            device="remote",
            imgsz=factory.imgsz,
            class_names=dict(factory.names),
        )

    def warmup(self) -> None:
        t0 = time.perf_counter()
        blank = np.zeros((self._f.imgsz, self._f.imgsz, 3), dtype=np.uint8)
        endpoints = self._f.endpoints
        for e in endpoints.items:
            if not e.up:
                continue
            with endpoints.warming:  # one worker at a time: a fresh server's first calls
                # overlapping sometimes hung (pytriton 0.7, vision-triton); one after another not
                self._warm(e, blank)
        if endpoints.all_down():
            raise ModelError(f"no Triton endpoint answers a call: {endpoints.why_down()}")
        self.info = ModelInfo(
            **{**self.info.__dict__, "warmup_ms": (time.perf_counter() - t0) * 1000}
        )

    def _warm(self, e: Endpoint, blank: Image) -> None:
        """One call to one endpoint: clients built, first-call costs paid (a server's first calls
        load its model instances: they get WARMUP_TIMEOUT_S); a failure marks it down."""
        endpoints = self._f.endpoints
        try:
            self._call(e, [blank], max(WARMUP_TIMEOUT_S, endpoints.timeout_s))
        except Exception as exc:
            self._clients.pop(e.url, None)
            endpoints.mark_down(e, f"its first call failed: {_first_line(exc)}")

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        """One call to one endpoint (`contended` is for local backends and ignored here)."""
        endpoints = self._f.endpoints
        e = endpoints.pick()
        try:
            rows, up_bytes, down_bytes = self._call(e, images)
        except Exception as exc:
            self._clients.pop(e.url, None)  # a fresh client once it is back
            endpoints.failed(e, _first_line(exc))
            raise BackendError(f"Triton endpoint {e.url} failed: {_first_line(exc)}") from None
        endpoints.done(e, len(images), up_bytes, down_bytes)
        return [self._detections(r) for r in rows]

    def _call(
        self, e: Endpoint, images: Sequence[Image], timeout_s: float | None = None
    ) -> tuple[list[np.ndarray], int, int]:
        if e.fmt == COMPACT:
            return self._compact(e, images, timeout_s or self._f.endpoints.timeout_s)
        return self._float32(e, images)

    def _compact(
        self, e: Endpoint, images: Sequence[Image], timeout_s: float
    ) -> tuple[list[np.ndarray], int, int]:
        f = self._f
        c = self._clients.get(e.url)
        if timeout_s != f.endpoints.timeout_s:  # warm-up: a client of its own
            c = client(e.scheme, e.netloc, timeout_s)
        elif c is None:
            c = self._clients[e.url] = client(e.scheme, e.netloc, timeout_s)
        out, up_bytes, down_bytes = [], 0, 0
        thresholds = np.array([f.conf, f.iou], dtype=np.float32)
        for image in images:
            if f.send == "jpeg":
                ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, f.jpeg_quality])
                if not ok:
                    raise ValueError("frame could not be encoded as JPEG")
                data, name = buf.reshape(-1), "image"
            else:
                data, name = np.ascontiguousarray(image), "pixels"
            inputs: dict[str, np.ndarray] = {name: data, "thresholds": thresholds}
            rows = infer(c, e.scheme, e.model, inputs, "detections", timeout_s)
            if rows is None or rows.ndim != 2 or rows.shape[1] != 6:
                raise ValueError(f"answered detections of shape {getattr(rows, 'shape', None)}")
            out.append(rows)
            up_bytes += data.nbytes + thresholds.nbytes
            down_bytes += rows.nbytes
        return out, up_bytes, down_bytes

    def _float32(self, e: Endpoint, images: Sequence[Image]) -> tuple[list[np.ndarray], int, int]:
        f = self._f
        yolo: Any = self._clients.get(e.url)
        if yolo is None:
            yolo = self._clients[e.url] = ultralytics_remote(e, f.endpoints.timeout_s)
        results: list[Any] = yolo.predict(
            list(images), imgsz=f.imgsz, conf=f.conf, iou=f.iou, classes=self._keep, verbose=False
        )
        out = []
        for r in results:
            b = r.boxes
            out.append(
                np.concatenate(
                    [
                        b.xyxy.cpu().numpy(),
                        b.conf.cpu().numpy()[:, None],
                        b.cls.cpu().numpy()[:, None],
                    ],
                    axis=1,
                ).astype(np.float32)
            )
        size = f.imgsz * f.imgsz * 3 * 4  # what ultralytics ships: a letterboxed FP32 tensor
        per_image = (4 + len(f.names)) * (f.imgsz // 8) ** 2 * 21 // 16 * 4  # output0, FP32
        return out, size * len(images), per_image * len(images)

    def _detections(self, rows: np.ndarray) -> list[Detection]:
        names, keep = self._f.names, self._keep
        out: list[Detection] = []
        for x1, y1, x2, y2, conf, cls in rows.tolist():
            c = int(cls)
            if conf <= 0:  # the compact format's "no detections" row
                continue
            if keep is not None and c not in keep:
                continue
            out.append(
                Detection(
                    label=names.get(c, str(c)),
                    conf=round(float(conf), 4),
                    bbox=[round(float(v), 1) for v in (x1, y1, x2, y2)],
                    class_id=c,
                )
            )
        return out


def ultralytics_remote(e: Endpoint, timeout_s: float) -> Any:
    """ultralytics' YOLO on a Triton URL, its client bounded by our timeout before any inference.

    ultralytics builds its predictor (and its TritonRemoteModel, whose tritonclient has a 60 s
    default timeout and, over HTTP, gevent) at the first predict and runs a warm-up inference at
    once. So the predictor is built here as `YOLO.predict` would build it, then its client is
    replaced: over HTTP by ours (kserve.adopt), over gRPC by one whose calls carry a deadline.
    Reaches into ultralytics (`predictor.model.backend.model`); if that shape changes, it logs and
    keeps ultralytics' own client.
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    yolo: Any = YOLO(e.url, task="detect")
    args = {**yolo.overrides, "conf": 0.25, "batch": 1, "save": False, "mode": "predict"}
    yolo.predictor = yolo._smart_load("predictor")(
        overrides={**args, "rect": True}, _callbacks=yolo.callbacks
    )
    yolo.predictor.setup_model(model=yolo.model, verbose=False)
    remote = getattr(getattr(yolo.predictor.model, "backend", None), "model", None)
    if remote is None or not hasattr(remote, "triton_client"):
        log.warning("cannot bound ultralytics' Triton client by %.1f s on this version", timeout_s)
    elif e.scheme == "http":
        adopt(remote, e.netloc, timeout_s)
    else:
        remote.triton_client = _TimedGrpc(remote.triton_client, timeout_s)
    return yolo


class _TimedGrpc:
    """A gRPC client whose every infer carries a deadline."""

    def __init__(self, inner: Any, timeout_s: float) -> None:
        self._inner, self._timeout_s = inner, timeout_s

    def infer(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("client_timeout", self._timeout_s)
        return self._inner.infer(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
