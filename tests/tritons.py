"""Real Triton servers for tests: `vision-triton` (pytriton in its own venv) on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = Path(
    os.environ.get("VISION_TRITON_PYTHON", ROOT / ".venv-triton" / "bin" / "python")
)


def bus_jpg() -> Path:
    """ultralytics' bundled bus.jpg (4 persons and a bus)."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_triton_venv() -> None:
    if not TRITON_PYTHON.exists():
        pytest.skip(f"no Triton virtualenv at {TRITON_PYTHON}: run 'make triton-venv'")


class TritonServer:
    """One `vision-triton` process serving a shared export; killed with all its children."""

    def __init__(self, model_dir: Path, model: str, http_port: int = 0, grpc_port: int = 0):
        need_triton_venv()
        self.model_dir, self.model = model_dir, model
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.model.removesuffix(".onnx")

    def url(self, scheme: str = "http", suffix: str = "") -> str:
        port = self.http_port if scheme == "http" else self.grpc_port
        return f"{scheme}://127.0.0.1:{port}/{self.name}{suffix}"

    def start(self, timeout: float = 60.0) -> TritonServer:
        args = [
            sys.executable,
            "-m",
            "triton_serve.cli",
            "--model-dir",
            str(self.model_dir),
            "--model",
            self.model,
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(free_port()),
        ]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"vision-triton exited {self.proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("vision-triton was not ready in time")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def kill(self) -> None:
        """SIGKILL the launcher and every process under it (a crash, not a clean stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, as a service manager would; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)
