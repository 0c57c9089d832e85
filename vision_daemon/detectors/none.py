"""The explicit `--model none` detector: frames are decoded by the worker, nothing is detected."""

from __future__ import annotations

from collections.abc import Sequence

from vision_daemon.detectors.base import Detection, Image, ModelInfo


class NoneDetector:
    """For transport tests and benchmarks; chosen only by `--model none`, never as a fallback."""

    def __init__(self) -> None:
        self.info = ModelInfo(name="none", backend="none", device="cpu", imgsz=0)

    def warmup(self) -> None:
        return None

    def detect(self, images: Sequence[Image], *, contended: bool = False) -> list[list[Detection]]:
        return [[] for _ in images]
