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
with the fewest calls in flight; a call that fails, outlives `backend_timeout_s` or answers a
reply we refuse marks its endpoint down and its frames drop as `backend_error` (no retry: a
retried frame would be late). `backend_timeout_s` is one deadline for the whole call (every
request of a batch, connect, send and every read: kserve.py says how), so however slowly a
server trickles its reply, the call ends in time and its worker is free. A reply may carry at
most `backend_max_detections` rows per image. A prober (the lifecycle runs `probe` every
`backend_probe_s`) takes an endpoint back once its model answers ready, and marks an idle
endpoint down when it stops answering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vision_daemon.config import Config
from vision_daemon.detectors.base import BackendError, Detection, Image, ModelError, ModelInfo
from vision_daemon.detectors.endpoints import COMPACT as COMPACT
from vision_daemon.detectors.endpoints import FLOAT32 as FLOAT32
from vision_daemon.detectors.endpoints import SCHEMES as SCHEMES
from vision_daemon.detectors.endpoints import WARMUP_TIMEOUT_S as WARMUP_TIMEOUT_S
from vision_daemon.detectors.endpoints import Endpoint as Endpoint
from vision_daemon.detectors.endpoints import Endpoints as Endpoints
from vision_daemon.detectors.endpoints import client as client
from vision_daemon.detectors.endpoints import describe as describe
from vision_daemon.detectors.endpoints import first_line
from vision_daemon.detectors.endpoints import infer as infer
from vision_daemon.detectors.endpoints import is_remote as is_remote
from vision_daemon.detectors.endpoints import parse_url as parse_url
from vision_daemon.detectors.kserve import RefusedReply, adopt, call_deadline, time_left
from vision_daemon.detectors.yolo import class_ids

log = logging.getLogger(__name__)


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
    max_rows: int  # detection rows a reply may carry per image

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
            config.backend_max_detections,
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
        """One call to each up endpoint that has not served frames yet: at start every worker
        warms every endpoint; a worker replacing one that abandoned a call skips those already
        serving (their model is loaded; its clients are built at its first call), so it is back
        at once whatever state they are in now (the prober's business)."""
        t0 = time.perf_counter()
        blank = np.zeros((self._f.imgsz, self._f.imgsz, 3), dtype=np.uint8)
        endpoints = self._f.endpoints
        for e in endpoints.items:
            if not e.up or e.frames:
                continue
            with endpoints.warming:  # one worker at a time: a fresh server's first calls
                # overlapping sometimes hung (pytriton 0.7, vision-triton); one after another not
                self._warm(e, blank)
        if endpoints.all_down() and not any(e.frames for e in endpoints.items):
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
            endpoints.mark_down(e, f"its first call failed: {first_line(exc)}")

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        """One call to one endpoint (`contended` is for local backends and ignored here)."""
        endpoints = self._f.endpoints
        e = endpoints.pick()
        try:
            rows, up_bytes, down_bytes = self._call(e, images)
        except Exception as exc:
            self._clients.pop(e.url, None)  # a fresh client once it is back
            cause, why = _failure(exc, endpoints.timeout_s)
            endpoints.failed(e, why, cause)
            raise BackendError(f"Triton endpoint {e.url} failed: {why}") from None
        endpoints.done(e, len(images), up_bytes, down_bytes)
        return [self._detections(r) for r in rows]

    def _call(
        self, e: Endpoint, images: Sequence[Image], timeout_s: float | None = None
    ) -> tuple[list[np.ndarray], int, int]:
        """Every request for `images` within one deadline (backend_timeout_s unless told)."""
        with call_deadline(timeout_s or self._f.endpoints.timeout_s):
            if e.fmt == COMPACT:
                return self._compact(e, images)
            return self._float32(e, images)

    def _compact(self, e: Endpoint, images: Sequence[Image]) -> tuple[list[np.ndarray], int, int]:
        f = self._f
        timeout_s = f.endpoints.timeout_s  # outside a call_deadline only
        c = self._clients.get(e.url)
        if c is None:
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
                shape = getattr(rows, "shape", None)
                raise RefusedReply(f"answered detections of shape {shape}")
            if len(rows) > f.max_rows:  # before a row becomes a Python object
                raise RefusedReply(
                    f"answered {len(rows)} detection rows, over backend_max_detections "
                    f"({f.max_rows})"
                )
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
            list(images),
            imgsz=f.imgsz,
            conf=f.conf,
            iou=f.iou,
            classes=self._keep,
            max_det=f.max_rows,  # NMS keeps at most this many: the rows bound by construction
            verbose=False,
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
    else:  # ours: its replies bounded in bytes
        remote.triton_client = _TimedGrpc(client("grpc", e.netloc, timeout_s), timeout_s)
    return yolo


def _failure(exc: BaseException, timeout_s: float) -> tuple[str, str]:
    """(cause, one line) of a failed call: a timeout, a refused reply, or any other error."""
    status = getattr(exc, "status", None)  # tritonclient's InferenceServerException
    grpc_status = status() if callable(status) else None
    if isinstance(exc, TimeoutError) or grpc_status == "StatusCode.DEADLINE_EXCEEDED":
        return "timeout", f"no whole reply within {timeout_s:.1f} s"
    return ("refused" if isinstance(exc, RefusedReply) else "error"), first_line(exc)


class _TimedGrpc:
    """A gRPC client whose every infer ends by this thread's call deadline."""

    def __init__(self, inner: Any, timeout_s: float) -> None:
        self._inner, self._timeout_s = inner, timeout_s

    def infer(self, *args: Any, **kw: Any) -> Any:
        kw["client_timeout"] = time_left(self._timeout_s)
        return self._inner.infer(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
