"""Detectors behind one small interface; `load_detector_factory` picks one from the Config."""

from __future__ import annotations

from vision_daemon.config import Config
from vision_daemon.detectors.base import (
    BackendError,
    Detection,
    Detector,
    DetectorFactory,
    ModelError,
    ModelInfo,
)

__all__ = [
    "BackendError",
    "Detection",
    "Detector",
    "DetectorFactory",
    "ModelError",
    "ModelInfo",
    "load_detector_factory",
]


def load_detector_factory(config: Config) -> DetectorFactory:
    """Resolve the configured model once (fail fast); each worker then builds its own instance."""
    if config.model == "none":
        from vision_daemon.detectors.none import NoneDetector

        return NoneDetector
    from vision_daemon.detectors.triton import TritonFactory, is_remote

    if is_remote(config.model):
        return TritonFactory.from_config(config)
    from vision_daemon.detectors.yolo import YoloFactory

    return YoloFactory.from_config(config)
