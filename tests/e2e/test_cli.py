"""The vision-daemon command as users run it: real processes, ports, signals and exit statuses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import SpawnDaemon

pytestmark = pytest.mark.slow  # vision-daemon subprocesses


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_daemon", "--log-dir", "", *args]


def test_cli_starts_on_port_zero_and_exits_0_on_sigterm(spawn_daemon: SpawnDaemon) -> None:
    """The real port is logged; SIGTERM shuts down cleanly with exit status 0."""
    daemon = spawn_daemon("--model", "none", "--tcp-port", "0", "--api-port", "0")
    port = daemon.tcp
    assert port > 0
    assert f"data plane listening on tcp://127.0.0.1:{port}" in daemon.log_tail(100_000)
    with socket.create_connection(("127.0.0.1", port)):
        pass
    assert daemon.stop() == 0


def test_ports_file_holds_the_real_ports_and_is_removed_at_sigterm(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    """Started on port 0 with --ports-file, the daemon writes its real ports and pid; SIGTERM removes it."""
    sock = tmp_path / "d.sock"
    daemon = spawn_daemon(
        "--model", "none", "--tcp-port", "0", "--api-port", "0", "--unix-socket", str(sock)
    )
    ports = daemon.ports()
    assert set(ports) == {"tcp", "http", "unix", "pid"}
    assert ports["pid"] == daemon.pid and ports["unix"] == str(sock)
    assert ports["tcp"] > 0 and ports["http"] > 0 and ports["tcp"] != ports["http"]
    with socket.create_connection(("127.0.0.1", ports["tcp"])):
        pass
    assert httpx.get(f"http://127.0.0.1:{ports['http']}/health", timeout=10).status_code == 200
    assert [p.name for p in daemon.ports_file.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert daemon.stop() == 0
    assert not daemon.ports_file.exists()


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
