"""The detector interface: one instance per worker thread, called with decoded BGR images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]


class ModelError(Exception):
    """The model cannot be found or loaded; the message names what was tried."""


class BackendError(Exception):
    """A remote inference endpoint failed or every one is down: the batch drops as backend_error."""


class Detection(TypedDict):
    label: str
    conf: float
    bbox: list[float]  # x1, y1, x2, y2 in pixels of the image as sent
    class_id: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    device: str
    imgsz: int
    class_names: dict[int, str] = field(default_factory=dict)
    warmup_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "imgsz": self.imgsz,
            "classes": len(self.class_names),
            "class_names": {str(k): v for k, v in self.class_names.items()},
            "warmup_ms": round(self.warmup_ms, 1),
        }


class Detector(Protocol):
    """Built and called from one worker thread only; never shared across threads."""

    info: ModelInfo

    def warmup(self) -> None:
        """Run the model until its first-call costs are paid (called before the daemon is ready)."""

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        """Detections for each image, in order; may raise (the worker counts and reports it).

        `contended` is the pool's word that other workers are busy too: a backend that can trade
        per-call latency for throughput (OpenVINO's thread-limited copy) does so then. A
        detector whose `detect` takes only the images is called without it.
        """
        ...


DetectorFactory = Callable[[], Detector]
