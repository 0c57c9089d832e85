"""Detectors behind one small interface; `load_detector_factory` picks one from the Config."""

from __future__ import annotations

from vision_daemon.config import Config
from vision_daemon.detectors.base import Detection, Detector, DetectorFactory, ModelError, ModelInfo

__all__ = [
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
    from vision_daemon.detectors.yolo import YoloFactory

    return YoloFactory.from_config(config)
