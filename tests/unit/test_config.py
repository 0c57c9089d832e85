"""Config loading order, and configs/default.toml and the example configs staying true to the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vision_daemon.camera_config import CAMERA_FIELDS
from vision_daemon.config import (
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
    example = text[text.index("# [[cameras]]") : text.index("# Tokens with roles")]
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
    tokens = text[text.index("# [[tokens]]") : text.index("# Privacy masks")]
    tokens += text[text.index("# [[masks]]") :]
    uncommented = tmp_path / "tokens.toml"
    uncommented.write_text("\n".join(line.removeprefix("# ") for line in tokens.splitlines()))
    loaded = load_config(uncommented, environ={})  # the [[masks]] example comes with it
    (token,) = loaded.tokens
    assert (token.name, token.role, token.streams) == ("door-cams", "ingest", ("door-*",))
    ((stream, (mask,)),) = loaded.masks
    assert (stream, mask.name, len(mask.polygon), mask.detect) == (
        "door",
        "neighbours-window",
        4,
        False,
    )


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


@pytest.mark.parametrize("name", ["cpu.toml", "gpu.toml"])
def test_example_configs_load(name: str) -> None:
    """The example configs only hold known settings with valid values."""
    cfg = load_config(ROOT / "configs" / name, environ={})
    assert cfg.device in ("cpu", "cuda:0") and cfg.max_batch >= 1


def test_the_camera_url_policy_without_the_network(tmp_path: Path) -> None:
    """Addresses by class (private LAN allowed, loopback/link-local/unspecified/multicast not,
    IPv4 inside IPv6 too), devices, and files by place and by their first bytes."""
    from vision_daemon.url_policy import UrlPolicy, UrlRefused

    strict, loose = UrlPolicy(str(tmp_path)), UrlPolicy(str(tmp_path), allow_local=True)
    for url in ("rtsp://10.0.0.5/s", "http://192.168.1.20/mjpeg", "http://[fd00::5]/", "usb:0"):
        strict.check_static(url)
    for url in (
        "http://[::1]/",
        "http://[fe80::1]/",
        "rtsp://224.0.0.1/",
        "http://[::ffff:169.254.1.1]/",
    ):
        with pytest.raises(UrlRefused):
            strict.check_static(url)
        loose.check_static(url)
    strict.check_static("/dev/video2")
    with pytest.raises(UrlRefused, match="/dev/videoN"):
        strict.check_static("/dev/sda")
    samples = {
        "a.mp4": b"\x00\x00\x00\x18ftypisom" + bytes(100),
        "a.mkv": b"\x1a\x45\xdf\xa3" + bytes(100),
        "a.avi": b"RIFF\x00\x00\x00\x00AVI LIST",
        "a.ts": (b"\x47" + bytes(187)) * 3,
        "a.jpg": b"\xff\xd8\xff\xe0" + bytes(100),
    }
    for name, head in samples.items():
        (tmp_path / name).write_bytes(head)
        strict.check_static(str(tmp_path / name))
    (tmp_path / "playlist.m3u8").write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    with pytest.raises(UrlRefused, match="not a video container") as refused:
        strict.check_static(str(tmp_path / "playlist.m3u8"))
    assert "passwd" not in str(refused.value)
    with pytest.raises(UrlRefused, match="camera_media_dir"):
        UrlPolicy().check_static(str(tmp_path / "a.mp4"))  # no media folder: no file cameras


def test_the_readme_tokens_example_loads(tmp_path: Path) -> None:
    """README.md's [[tokens]] example is a config file that loads, with the roles it says."""
    import re

    text = (ROOT / "README.md").read_text()
    match = re.search(r"```toml\n(.*?)```", text, re.S)
    assert match is not None
    path = tmp_path / "my.toml"
    path.write_text(match.group(1))
    tokens = load_config(path, environ={}).tokens
    assert [(t.name, t.role, t.streams) for t in tokens] == [
        ("wall-screen", "viewer", ()),
        ("door-cams", "ingest", ("door-*",)),
    ]
