"""Start-up and shutdown as docs/ARCHITECTURE.md promises them: a hung detector or a long warm-up
never holds the process after SIGTERM, and a start-up that fails half-way stops what had started."""

from __future__ import annotations

import asyncio
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SlowDetector, jpeg, run
from tests.launcher import DaemonProcess
from vision_daemon.config import load_config
from vision_daemon.ingest.tcp import StartupError
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # subprocesses and real sockets

GRACE_S = 1.0

# The daemon as cli.main runs it (Daemon(config).run() under asyncio.run), with a detector the
# test controls, started by tests/launcher.py (which appends --ports-file PATH: the real ports are
# there once the daemon listens). It prints `warming` when warm-up starts and `detecting` when a
# worker is inside detect(); both then block until the process ends.
SCRIPT = """
import asyncio, logging, sys, threading, time
from vision_daemon.config import load_config
from vision_daemon.detectors.base import ModelInfo
from vision_daemon.lifecycle import Daemon

MODE, GRACE = sys.argv[1], float(sys.argv[2])

class Blocking:
    def __init__(self):
        self.info = ModelInfo(name="blocking", backend="fake", device="cpu", imgsz=0)
    def warmup(self):
        if MODE == "slow-warmup":
            print("warming", flush=True)
            time.sleep(60)
    def detect(self, images, *, contended=False):
        print("detecting", flush=True)
        threading.Event().wait()  # never set: a detector call that hangs for good
        return [[] for _ in images]

async def main():
    settings = {"model": "none", "tcp_port": 0, "api_port": 0, "log_dir": "", "workers": 1,
                "shutdown_grace_s": GRACE, "ports_file": sys.argv[sys.argv.index("--ports-file") + 1]}
    daemon = Daemon(load_config(overrides=settings, environ={}), factory=Blocking)
    await daemon.run()

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
asyncio.run(main())
"""


class Proc:
    """A daemon subprocess whose stdout lines arrive on a queue (read in a thread, never blocking)."""

    def __init__(self, mode: str, log: Path) -> None:
        self.daemon = DaemonProcess(
            command=[sys.executable, "-c", SCRIPT, mode, str(GRACE_S)],
            log=log,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        self.popen = self.daemon.popen
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.strip())
        self.lines.put("<exited>")  # the process closed its stdout: no line will come

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        """The next stdout line, which must start with `prefix`, within `timeout`."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no {prefix!r} line in {timeout:g} s; log:\n{self.daemon.log_tail()}"
            ) from None
        assert line.startswith(prefix), (line, self.daemon.log_tail())
        return line

    def sigterm_and_wait(self, limit_s: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after limit_s + 5 s, seconds to exit)."""
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(limit_s + 5)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0

    def close(self) -> None:
        self.daemon.close()


@contextmanager
def daemon_process(mode: str, tmp_path: Path) -> Iterator[Proc]:
    """The daemon in a subprocess; killed afterwards if the test left it running."""
    proc = Proc(mode, tmp_path / "daemon.log")
    try:
        yield proc
    finally:
        proc.close()


def test_hung_detector_call_does_not_hold_the_process_after_sigterm(tmp_path: Path) -> None:
    """A worker stuck in detect() forever: SIGTERM still exits 0 within shutdown_grace_s + 2 s."""
    from clients.lib import frame_message, pack

    with daemon_process("hang", tmp_path) as proc:
        port = proc.daemon.tcp
        with socket.create_connection(("127.0.0.1", port), timeout=5) as camera:
            camera.sendall(pack(frame_message("cam", 1, jpeg(48, 64))))
            proc.expect("detecting")  # the worker is inside the hung call now
            code, took = proc.sigterm_and_wait(GRACE_S + 2)
        assert code == 0 and took < GRACE_S + 2, (
            f"exit code {code} after {took:.1f} s; log:\n{proc.daemon.log_tail()}"
        )


def test_sigterm_during_a_long_warmup_exits_at_once(tmp_path: Path) -> None:
    """SIGTERM while warm-up sleeps for 60 s: the process exits 0 within a few seconds."""
    with daemon_process("slow-warmup", tmp_path) as proc:
        proc.expect("warming")
        code, took = proc.sigterm_and_wait(3)
        assert code == 0 and took < 3, (
            f"exit code {code} after {took:.1f} s; log:\n{proc.daemon.log_tail()}"
        )


# ---- a start-up that fails half-way, in process ------------------------------------------------


class WarmupFails(SlowDetector):
    """Loads, then raises in warm-up (a model that cannot run on this machine)."""

    def warmup(self) -> None:
        raise RuntimeError("injected warm-up failure")


def worker_threads(before: set[threading.Thread]) -> list[str]:
    """Names of vision-worker-* threads alive now that were not alive in `before`."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("vision-worker-") and t.is_alive() and t not in before
    ]


def no_new_worker_threads(before: set[threading.Thread], timeout: float = 5.0) -> list[str]:
    """Poll until no worker thread started by the test is alive; the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    while (alive := worker_threads(before)) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a thread list with a deadline; nothing to wait on instead
    return alive


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound and listened on again."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def failed_start(**overrides: Any) -> tuple[BaseException, Daemon]:
    """Start a daemon that must fail; the exception and the daemon, after start() raised."""
    settings: dict[str, Any] = {
        "model": "none",
        "tcp_port": 0,
        "api_port": 0,
        "log_dir": "",
        "workers": 2,
        "shutdown_grace_s": GRACE_S,
    }
    factory = overrides.pop("factory")
    settings.update(overrides)
    daemon = Daemon(load_config(overrides=settings, environ={}), factory=factory)

    async def scenario() -> BaseException:
        try:
            await daemon.start()
        except BaseException as exc:
            return exc
        await daemon.shutdown()
        raise AssertionError("start-up succeeded; it should have failed")

    exc: BaseException = run(scenario())
    return exc, daemon


def test_failed_warmup_releases_the_api_port_and_every_worker_thread() -> None:
    """warm-up raises: start() raises it, the API port binds again and no worker thread lives on."""
    before = set(threading.enumerate())
    exc, daemon = failed_start(factory=WarmupFails)
    assert isinstance(exc, RuntimeError) and "injected" in str(exc), exc
    assert daemon.api_port and port_is_free(daemon.api_port), "the API port is still held"
    alive = no_new_worker_threads(before)
    assert not alive, f"worker threads still running after the failed start: {alive}"


def test_tcp_port_in_use_releases_the_api_port_and_stops_the_workers() -> None:
    """The data-plane port is taken: StartupError, the API port binds again, the workers end."""
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exc, daemon = failed_start(factory=lambda: SlowDetector(0.0), tcp_port=port)
    assert isinstance(exc, StartupError) and f"127.0.0.1:{port}" in str(exc), exc
    assert daemon.api_port and port_is_free(daemon.api_port), "the API port is still held"
    alive = no_new_worker_threads(before)
    assert not alive, f"worker threads still running after the failed start: {alive}"


def test_a_daemon_that_failed_to_start_leaves_the_loop_clean() -> None:
    """After a failed start-up no task of the daemon is left pending on the event loop."""

    async def scenario() -> list[str]:
        settings = {"model": "none", "tcp_port": 0, "api_port": 0, "log_dir": "", "workers": 1}
        daemon = Daemon(load_config(overrides=settings, environ={}), factory=WarmupFails)
        with pytest.raises(RuntimeError, match="injected"):
            await daemon.start()
        me = asyncio.current_task()
        return [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]

    assert run(scenario()) == []
