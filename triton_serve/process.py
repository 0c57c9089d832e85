"""A `vision-triton` process on free ports, for tests and benchmarks: start, wait, stop, kill."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

from triton_serve.options import served_name

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonProcess:
    """One `vision-triton` serving an export; `kill` ends it with every process under it."""

    def __init__(
        self,
        model_dir: Path,
        model: str,
        http_port: int = 0,
        grpc_port: int = 0,
        extra: Sequence[str] = (),
        log: Path | None = None,
    ):
        self.model_dir, self.model, self.extra = model_dir, model, list(extra)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # The launcher's and tritonserver's output go to a file: a pipe nobody reads would fill
        # and block the server.
        self.log = log or Path(tempfile.mkstemp(prefix="vision-triton-", suffix=".log")[1])

    def output(self) -> str:
        """Everything the launcher and the server wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def name(self) -> str:
        return served_name(self.model)

    def url(self, scheme: str = "http", suffix: str = "") -> str:
        """The endpoint URL of the compact model (suffix `_fp32`: the float32 one)."""
        port = self.http_port if scheme == "http" else self.grpc_port
        return f"{scheme}://127.0.0.1:{port}/{self.name}{suffix}"

    def start(self, timeout: float = 90.0) -> TritonProcess:
        """Start it (again, on the same ports) and wait until both models are ready."""
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
            *self.extra,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vision-triton exited {self.proc.returncode}: {self.output()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vision-triton was not ready in {timeout:.0f} s")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        """Both models answer ready on the HTTP port."""
        base = f"http://127.0.0.1:{self.http_port}/v2/models"
        try:
            return all(
                httpx.get(f"{base}/{self.name}{s}/ready", timeout=1).status_code == 200
                for s in ("", "_fp32")
            )
        except httpx.HTTPError:
            return False

    def tree(self) -> list[psutil.Process]:
        """The launcher and every process under it (the server, tritonserver, its stubs)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the launcher and every process under it (a crash, not a clean stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = self.tree()
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        self.proc.wait(10)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, as a service manager would; the exit code (killed past `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)
