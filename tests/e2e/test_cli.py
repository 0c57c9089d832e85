"""The vision-daemon command as users run it: real processes, ports, signals and exit statuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # vision-daemon subprocesses


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_daemon", "--log-dir", "", *args]


def test_cli_starts_on_port_zero_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """The real port is logged; SIGTERM shuts down cleanly with exit status 0."""
    proc = subprocess.Popen(
        daemon_cmd("--model", "none", "--tcp-port", "0", "--api-port", "0"),
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    port = None
    for line in proc.stderr:
        if "data plane listening on tcp://" in line:
            port = int(line.rsplit(":", 1)[1])
            break
        assert time.monotonic() < deadline
    assert port and port > 0
    with socket.create_connection(("127.0.0.1", port)):
        pass
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_cli_port_in_use_is_one_line_error() -> None:
    """A taken port ends start-up with exit 1 and one line saying what to do, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            daemon_cmd("--model", "none", "--tcp-port", str(port), "--api-port", "-1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_missing_model_names_what_was_tried(tmp_path: Path) -> None:
    """A model that cannot be found stops start-up (exit 1) naming the paths tried; no fallback."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "VISION_DAEMON_MODEL_DIR": str(tmp_path)}
    out = subprocess.run(
        daemon_cmd("--model", "nosuchmodel", "--api-port", "-1", "--tcp-port", "0"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 1, out.stderr
    assert "nosuchmodel" in out.stderr and str(tmp_path) in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_bad_flag_value_exits_2() -> None:
    """A bad flag value is reported in one line with exit status 2."""
    out = subprocess.run(daemon_cmd("--workers", "0"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "workers must be >= 1" in out.stderr
