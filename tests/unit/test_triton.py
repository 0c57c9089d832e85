"""Triton endpoints as policy: URL parsing, picking, marking down, settings, reply bounds and
call deadlines (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vision_daemon.cli import build_parser, main
from vision_daemon.config import ConfigError, load_config
from vision_daemon.detectors.base import BackendError, ModelError
from vision_daemon.detectors.kserve import (
    HEADER,
    MAX_HEADER_BYTES,
    CallTimeout,
    RefusedReply,
    Reply,
    _outputs,
    call_deadline,
    time_left,
)
from vision_daemon.detectors.triton import Endpoints, is_remote, parse_url

NAMES = {0: "person", 1: "bicycle"}


def test_urls_parse_to_scheme_host_port_and_model() -> None:
    """http and grpc URLs name a server and one model; default ports 8000 and 8001."""
    assert parse_url("http://gpu1:8000/yolov8n") == ("http", "gpu1:8000", "yolov8n")
    assert parse_url("grpc://10.0.0.2/yolo") == ("grpc", "10.0.0.2:8001", "yolo")
    assert parse_url("http://h/m/") == ("http", "h:8000", "m")
    for bad in ("http://h:8000/", "http://h/a/b", "ftp://h/m", "http://u:p@h/m", "http://h/m?x=1"):
        with pytest.raises(ModelError, match="bad Triton endpoint"):
            parse_url(bad)
    assert is_remote("grpc://h/m") and is_remote("http://h/m")
    assert not is_remote("yolov8n") and not is_remote("models/yolov8n.onnx")


def test_pick_spreads_calls_over_up_endpoints_and_skips_down_ones() -> None:
    """The up endpoint with fewest calls in flight gets the next call; a failure marks it down;
    with none up the call fails at once with every endpoint's reason."""
    eps = Endpoints(["http://a/m", "http://b/m", "grpc://c/m"], 1.0)
    a, b, c = eps.items
    for e in (a, b):
        eps.set_up(e, "compact", NAMES)
    first, second = eps.pick(), eps.pick()
    assert {first, second} == {a, b}  # one each while the first is in flight
    eps.done(first, 2, 100, 10)
    eps.failed(second, "connection refused")
    assert not second.up and second.last_error == "connection refused" and second.downs == 1
    assert first.frames == 2 and first.bytes_up == 100 and first.in_flight == 0
    assert {eps.pick() for _ in range(3)} == {first}
    eps.failed(first, "timed out")
    eps.failed(first, "timed out")
    eps.failed(first, "timed out")
    assert eps.all_down()
    with pytest.raises(BackendError, match="every Triton endpoint is down") as err:
        eps.pick()
    assert f"{second.url}: connection refused" in str(err.value)
    assert f"{first.url}: timed out" in str(err.value) and "grpc://c/m: down" in str(err.value)
    eps.set_up(c, "float32", NAMES)
    assert eps.pick() is c
    snap = {s["url"]: s for s in eps.snapshot()}
    assert snap["grpc://c/m"]["state"] == "up" and snap["http://b/m"]["state"] == "down"
    assert snap[first.url]["bytes_per_frame"] == 55 and snap[first.url]["failures"] == 3


def test_an_endpoint_whose_class_names_change_stays_down() -> None:
    """An endpoint that comes back serving other classes is not taken back (boxes would lie),
    nor is one first reached later (unreachable at start) that serves other classes."""
    eps = Endpoints(["http://a/m", "http://b/m"], 1.0)
    a, b = eps.items
    eps.set_up(a, "compact", NAMES)
    eps.failed(eps.pick(), "refused")
    eps.set_up(a, "compact", {0: "cat"})
    assert not a.up and "class names changed" in a.last_error
    eps.set_up(b, "compact", {0: "cat"})
    assert not b.up and "differ from the others'" in b.last_error
    eps.set_up(b, "float32", NAMES)
    assert b.up and eps.names == NAMES


def test_backends_settings_are_checked() -> None:
    """backends need a remote model and URLs; [[backends]] tables and repeated --model work."""
    cfg = load_config(overrides={"model": "http://a/m", "backends": ["grpc://b/m"]}, environ={})
    assert cfg.backends == ["grpc://b/m"]
    with pytest.raises(ConfigError, match="backends need model to be a Triton URL"):
        load_config(overrides={"model": "yolov8n", "backends": ["http://b/m"]}, environ={})
    with pytest.raises(ConfigError, match="backends need"):
        load_config(overrides={"model": "http://a/m", "backends": ["b.onnx"]}, environ={})
    with pytest.raises(ConfigError, match="backend_image"):
        load_config(overrides={"backend_image": "png"}, environ={})
    with pytest.raises(ConfigError, match="backend_timeout_s"):
        load_config(overrides={"backend_timeout_s": 0}, environ={})
    args = build_parser().parse_args(["--model", "http://a/m", "--model", "grpc://b/m"])
    assert args.model == ["http://a/m", "grpc://b/m"]


def test_backends_tables_in_a_config_file(tmp_path: object) -> None:
    """[[backends]] url = ... adds endpoints; any other key is refused."""
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.toml"
    path.write_text(
        '[model]\nmodel = "http://a:8000/m"\n[[backends]]\nurl = "grpc://b:8001/m"\n'
        '[[backends]]\nurl = "http://c:8000/m"\n'
    )
    assert load_config(path, environ={}).backends == ["grpc://b:8001/m", "http://c:8000/m"]
    path.write_text('[model]\nmodel = "http://a/m"\n[[backends]]\nurl = "http://b/m"\nweight = 2\n')
    with pytest.raises(ConfigError, match=r"each \[\[backends\]\] table holds one url"):
        load_config(path, environ={})


def test_repeated_model_flag_fills_backends(capsys: pytest.CaptureFixture[str]) -> None:
    """`--model A --model B` is model A with backend B (a bad one is refused before start-up)."""
    code = main(["--model", "http://a/m", "--model", "yolov8n.onnx", "--log-dir", ""])
    assert code == 2
    assert "backends need model to be a Triton URL" in capsys.readouterr().err


def _reply(outputs: list[dict[str, object]], data: bytes) -> Reply:
    head = json.dumps({"outputs": outputs}).encode()
    return Reply(200, {HEADER: str(len(head))}, head + data)


def test_a_reply_whose_shapes_claim_more_than_it_carries_is_refused_before_any_array() -> None:
    """Each tensor's claimed shape must match its bytes (and the JSON part stays under 1 MiB):
    a claim of a billion rows in 24 bytes is refused, never allocated; a true one is read."""
    row = np.array([[1, 2, 3, 4, 0.5, 0]], np.float32).tobytes()
    out = {"name": "detections", "datatype": "FP32"}
    good = _outputs(_reply([{**out, "shape": [1, 6], "parameters": {"binary_data_size": 24}}], row))
    assert good["detections"].shape == (1, 6) and good["detections"][0, 4] == 0.5
    lies = [
        {**out, "shape": [10**9, 6], "parameters": {"binary_data_size": 24}},
        {**out, "shape": [10**9, 6], "parameters": {"binary_data_size": 24 * 10**9}},
        {**out, "shape": [-1, 6], "parameters": {"binary_data_size": 24}},
        {**out, "shape": [10**9, 6], "data": [0.0] * 6},
    ]
    for lie in lies:
        with pytest.raises(RefusedReply, match="malformed inference reply"):
            _outputs(_reply([lie], row))
    huge = Reply(200, {HEADER: str(MAX_HEADER_BYTES + 1)}, b" " * (MAX_HEADER_BYTES + 2))
    with pytest.raises(RefusedReply, match="JSON part"):
        _outputs(huge)


def test_requests_inside_one_call_deadline_share_it() -> None:
    """call_deadline bounds every request made inside it as one; an inner one cannot extend it;
    time_left raises CallTimeout once it has passed (its message says the whole budget)."""
    assert time_left(3.0) == 3.0  # outside a call: each request its own timeout
    with call_deadline(2.0):
        assert 0 < time_left(3.0) <= 2.0
        with call_deadline(10.0):
            assert time_left(3.0) <= 2.0
        with call_deadline(0.0), pytest.raises(CallTimeout, match=r"no whole reply within 0\.0"):
            time_left(3.0)
    assert time_left(3.0) == 3.0


def test_failures_are_counted_by_cause() -> None:
    """A timeout and a refused reply each mark the endpoint down and are counted apart."""
    eps = Endpoints(["http://a/m"], 1.0)
    (a,) = eps.items
    eps.set_up(a, "compact", NAMES)
    eps.failed(eps.pick(), "no whole reply within 1.0 s", "timeout")
    assert not a.up and a.timeouts == 1 and a.refused == 0
    eps.set_up(a, "compact", NAMES)
    eps.failed(eps.pick(), "answered 301 detection rows", "refused")
    (snap,) = eps.snapshot()
    assert (snap["failures"], snap["timeouts"], snap["refused"], snap["downs"]) == (2, 1, 1, 2)
