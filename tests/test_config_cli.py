"""Config loading order, configs/default.toml staying true to the code, and the CLI as users run it."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vision_daemon.config import (
    CAMERA_FIELDS,
    FIELDS,
    Config,
    ConfigError,
    load_config,
    read_toml,
)
from vision_daemon.options import CAMERA_DEFAULTS, SPECS


def test_default_toml_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    """configs/default.toml holds every Config field with the code's default, and its commented
    [[cameras]] example lists every camera setting with its default and loads when uncommented,
    as does its analytics example ([tracking], [[lines]], [[zones]])."""
    text = (ROOT / "configs" / "default.toml").read_text()
    values = read_toml(ROOT / "configs" / "default.toml")
    defaults = Config()
    assert set(values) == set(FIELDS)
    for name, value in values.items():
        assert value == getattr(defaults, name), name
    tables = text[text.index("# [tracking]") : text.index("# Cameras the daemon pulls")]
    uncommented = tmp_path / "analytics.toml"
    uncommented.write_text("\n".join(line.removeprefix("# ") for line in tables.splitlines()))
    analytics = load_config(uncommented, environ={}).analytics
    assert analytics.tracking.new_object_classes == ("person",)
    assert [line.name for line in analytics.lines_of("walk")] == ["mid"]
    assert [zone.name for zone in analytics.zones_of("walk")] == ["door"]
    example = text[text.index("# [[cameras]]") :]
    uncommented = tmp_path / "cameras.toml"
    uncommented.write_text("\n".join(line.removeprefix("# ") for line in example.splitlines()))
    (camera,) = load_config(uncommented, environ={}).cameras
    lines = example.splitlines()[1:]
    listed = {line.removeprefix("# ").split("=")[0].strip() for line in lines if "=" in line}
    assert listed == (set(CAMERA_FIELDS) - {"options"}) | set(SPECS)
    for name in CAMERA_FIELDS.keys() - {"name", "url", "options"}:
        assert getattr(camera, name) == CAMERA_FIELDS[name].default, name
    # serve has no literal default (left out, it is the daemon's serve_default): the example
    # names latest
    assert camera.options == dataclasses.replace(CAMERA_DEFAULTS, serve="latest")


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    """Flags override env, env overrides the file, the file overrides defaults."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[workers]\nworkers = 3\n[model]\nmodel_dir = "/file"\nclasses = ["person"]\n')
    c = load_config(cfg, {"workers": "4"}, environ={"VISION_DAEMON_MODEL_DIR": "/env"})
    assert (c.workers, c.model_dir, c.classes) == (4, "/env", ["person"])
    with pytest.raises(dataclasses.FrozenInstanceError):  # one object shared by all components
        c.workers = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[workers]\nworkers = 0\n", "workers must be >= 1"),
        ("[workers]\nworkerz = 2\n", "unknown setting"),
        ('[server]\ntcp_port = "x"\n', "tcp_port='x' is not a number"),
        ("[model]\nimgsz = 100\n", "imgsz must be a multiple of 32"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_values_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    """A bad value is a one-line ConfigError naming the setting."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, environ={})


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_daemon", "--log-dir", "", *args]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_bad_flag_value_exits_2() -> None:
    """A bad flag value is reported in one line with exit status 2."""
    out = subprocess.run(daemon_cmd("--workers", "0"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "workers must be >= 1" in out.stderr


@pytest.mark.parametrize("name", ["cpu.toml", "gpu.toml"])
def test_example_configs_load(name: str) -> None:
    """The example configs only hold known settings with valid values."""
    cfg = load_config(ROOT / "configs" / name, environ={})
    assert cfg.device in ("cpu", "cuda:0") and cfg.max_batch >= 1
