"""One launcher for daemons in subprocesses, shared by the tests and the benchmarks: it starts
`vision-daemon` of this checkout with `--ports-file` and reads the real ports from that file
(written atomically once everything listens), never from log lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
DAEMON = (sys.executable, "-m", "vision_daemon")


class DaemonDidNotStart(RuntimeError):
    """The daemon exited, or wrote no ports file before the deadline; the message ends with its log."""


class DaemonProcess:
    """A daemon subprocess: `command` (default `python -m vision_daemon`) + `--ports-file` + `args`.

    Its stderr goes to `log` (a file in its own temporary folder unless given); `ports()` waits for
    the ports file; `stop()` sends SIGTERM and waits; as a context manager, it is killed if still
    running at the end."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] = DAEMON,
        log: str | Path | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self._tmp = tempfile.mkdtemp(prefix="vision-daemon-")
        self.ports_file = Path(self._tmp) / "ports.json"
        self.log = Path(log) if log else Path(self._tmp) / "daemon.log"
        self.command = [*command, "--ports-file", str(self.ports_file), *args]
        # This checkout's package first, whichever one the interpreter has installed.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with self.log.open("ab") as err:
            self.popen = subprocess.Popen(
                self.command,
                stdout=stdout,
                stderr=err,
                text=True,
                cwd=cwd,
                env={**os.environ, **(env or {}), "PYTHONPATH": path},
            )
        self._ports: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def ports(self, timeout: float = 60.0) -> dict[str, Any]:
        """{"tcp", "http", "unix", "pid"} from the ports file, polled with a deadline."""
        if self._ports is None:
            deadline = time.monotonic() + timeout
            while not self.ports_file.exists():
                if self.popen.poll() is not None:
                    raise DaemonDidNotStart(
                        f"daemon exited {self.popen.returncode} before listening: "
                        f"{' '.join(self.command)}\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise DaemonDidNotStart(
                        f"no ports file after {timeout:g} s: {' '.join(self.command)}\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.02)  # polling another process's file with a deadline
            self._ports = json.loads(self.ports_file.read_text())
        return self._ports

    @property
    def tcp(self) -> int:
        return int(self.ports()["tcp"])

    @property
    def http(self) -> int:
        """The control plane's port (an AssertionError if the daemon runs without one)."""
        port = self.ports()["http"]
        if port is None:
            raise AssertionError("the daemon runs without a control plane (api_port -1)")
        return int(port)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status (killed, and an error, if it outlives `timeout`)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"daemon still running {timeout:g} s after SIGTERM") from None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the daemon if it still runs and remove the temporary folder."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
