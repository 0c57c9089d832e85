"""Real Triton servers for tests: `vision-triton` (pytriton in its own venv) on free ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from triton_serve.cli import find_python
from triton_serve.process import ROOT, TritonProcess, free_port

__all__ = ["ROOT", "TritonServer", "bus_jpg", "free_port", "need_triton_venv"]


def bus_jpg() -> Path:
    """ultralytics' bundled bus.jpg (4 persons and a bus)."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def need_triton_venv() -> None:
    if find_python() is None:
        pytest.skip("no .venv-triton: run 'make triton-venv' (make test builds it)")


class TritonServer(TritonProcess):
    """A TritonProcess that skips the test, with one line, when the Triton venv is missing."""

    def __init__(self, model_dir: Path, model: str, **kw: Any) -> None:
        need_triton_venv()
        super().__init__(model_dir, model, **kw)
