"""Remote models on real Triton servers (vision-triton: pytriton in its own venv) through the daemon."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.conftest import (
    MODEL_DIR,
    accounted,
    api,
    collect,
    connect,
    run,
    running_daemon,
    shared_model,
    stats,
    wait_for,
)
from tests.tritons import ROOT, TritonServer, bus_jpg, free_port, need_triton_venv

pytestmark = pytest.mark.slow  # real Triton servers, models and sockets

MODEL = "yolov8n_int8_openvino_model"


@pytest.fixture(scope="module")
def server() -> Iterator[TritonServer]:
    """One vision-triton for the module (a start costs a few seconds)."""
    shared_model(MODEL)
    s = TritonServer(MODEL_DIR, MODEL).start()
    yield s
    s.stop()


def local_bus() -> list[dict[str, Any]]:
    """The daemon's own local detector on bus.jpg (the reference a remote model must match)."""
    return detect_bus(MODEL)


def detect_bus(model: str, **overrides: Any) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        async with running_daemon(
            model=model, model_dir=str(MODEL_DIR), workers=1, **overrides
        ) as d:
            c = await connect(d, hello=False)
            await c.send_frame("bus", 1, bus_jpg().read_bytes())
            (msg,) = await collect(c, 1, timeout=60)
            assert msg["type"] == "result", msg
            snap = stats(d)
            if snap["backends"]:
                (b,) = snap["backends"]
                assert b["state"] == "up" and b["frames"] >= 1 and b["bytes_up"] > 0, b
            return list(msg["detections"])

    result: list[dict[str, Any]] = run(scenario())
    return result


def by_box(dets: list[dict[str, Any]]) -> list[tuple[str, float, list[float]]]:
    return sorted((d["label"], d["conf"], d["bbox"]) for d in dets)


def test_float32_endpoint_equals_the_local_model_over_http_and_grpc(server: TritonServer) -> None:
    """ultralytics' FP32 path through Triton (HTTP and gRPC) gives the local model's detections."""
    local = by_box(local_bus())
    assert [x[0] for x in local].count("person") >= 4 and "bus" in [x[0] for x in local]
    for scheme in ("http", "grpc"):
        remote = by_box(detect_bus(server.url(scheme, "_fp32")))
        assert [(lbl, c) for lbl, c, _ in remote] == [(lbl, c) for lbl, c, _ in local], scheme
        for (_, _, a), (_, _, b) in zip(remote, local, strict=True):
            assert np.allclose(a, b, atol=0.15), (scheme, a, b)


def test_compact_endpoint_matches_the_local_model(server: TritonServer) -> None:
    """The compact format (JPEG up, rows back, pre- and post-processing on the server) finds the
    same objects as the local model: same labels, boxes within 3 px, scores within 0.03."""
    local = by_box(local_bus())
    for send in ("jpeg", "pixels"):
        remote = by_box(detect_bus(server.url(), backend_image=send))
        assert [x[0] for x in remote] == [x[0] for x in local], send
        for (_, ca, a), (_, cb, b) in zip(remote, local, strict=True):
            assert abs(ca - cb) <= 0.03 and np.allclose(a, b, atol=3.0), (send, a, b, ca, cb)


def daemon_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vision_daemon",
            "--api-port",
            "-1",
            "--tcp-port",
            "0",
            "--log-dir",
            "",
            "--backend-timeout-s",
            "2",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_url_and_wrong_model_name_are_one_line_startup_errors(
    server: TritonServer,
) -> None:
    """A closed port and a model the server lacks each stop start-up with one line saying so."""
    dead = daemon_cli("--model", f"http://127.0.0.1:{free_port()}/yolov8n")
    assert dead.returncode == 1, dead.stderr
    lines = [x for x in dead.stderr.splitlines() if " ERROR " in x]
    assert len(lines) == 1 and "no Triton endpoint answers" in lines[0], dead.stderr
    assert "Traceback" not in dead.stderr
    wrong = daemon_cli("--model", f"http://127.0.0.1:{server.http_port}/no_such_model")
    assert wrong.returncode == 1, wrong.stderr
    lines = [x for x in wrong.stderr.splitlines() if " ERROR " in x]
    assert len(lines) == 1 and "has no model 'no_such_model' ready" in lines[0], wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_two_endpoints_failover_and_recovery() -> None:
    """Two endpoints share frames; one killed mid-run: frames go to the other, the dead one is
    reported down (and /ready stays 200), it comes back when restarted; with both down /ready is
    503, frames drop as backend_error with an error each, and every frame stays accounted."""
    need_triton_venv()
    shared_model(MODEL)
    a = TritonServer(MODEL_DIR, MODEL).start()
    b = TritonServer(MODEL_DIR, MODEL).start()
    image = bus_jpg().read_bytes()

    async def scenario() -> None:
        async with running_daemon(
            model=a.url(),
            backends=[b.url("grpc")],
            model_dir=str(MODEL_DIR),
            workers=2,
            backend_timeout_s=3.0,
            backend_probe_s=0.3,
        ) as d:
            c = await connect(d)
            sent = 0
            errors: list[dict[str, Any]] = []

            async def pump(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    sent += 1
                    await c.send_frame("cam", sent, image)
                    await asyncio.sleep(0.05)

            async def reader() -> None:
                async for msg in c.messages():
                    if msg.get("type") == "error":
                        errors.append(msg)

            read = asyncio.create_task(reader())

            def backend(url: str) -> dict[str, Any]:
                return next(x for x in stats(d)["backends"] if x["url"] == url)

            await pump(30)
            await wait_for(
                lambda: backend(a.url())["frames"] > 0 and backend(b.url("grpc"))["frames"] > 0,
                30,
                "both endpoints used",
            )
            a.kill()
            await wait_for(lambda: backend(a.url())["state"] == "down", 15, "a reported down")
            before = backend(b.url("grpc"))["frames"]
            # b takes the rest: 10 more frames analysed there. Frames keep coming until it has
            # (the stream serves the latest frame, so how many of a fixed burst b gets depends on
            # how fast this box infers; 20 at 20 fps gave b 5 when inference took 180 ms).
            deadline = time.monotonic() + 30
            while backend(b.url("grpc"))["frames"] < before + 10:
                assert time.monotonic() < deadline, "b did not take the rest within 30 s"
                await pump(1)
            async with api(d) as h:
                r = await h.get("/ready")
                assert r.status_code == 200 and a.url() in r.json()["reason"], r.text
                metrics = (await h.get("/metrics")).text
            assert f'vision_daemon_backend_up{{endpoint="{a.url()}"}} 0.0' in metrics

            a.start()  # same ports
            await wait_for(lambda: backend(a.url())["state"] == "up", 30, "a taken back")
            frames_a = backend(a.url())["frames"]
            await pump(20)
            await wait_for(lambda: backend(a.url())["frames"] > frames_a, 30, "a used again")

            a.kill()
            b.kill()
            await wait_for(lambda: not d.ready()[0], 15, "not ready with both down")
            async with api(d) as h:
                r = await h.get("/ready")
                assert (
                    r.status_code == 503 and "every Triton endpoint is down" in r.json()["reason"]
                )
            dropped_before = stats(d)["totals"]["dropped_by_reason"]["backend_error"]
            await pump(5)
            await wait_for(
                lambda: (
                    stats(d)["totals"]["dropped_by_reason"]["backend_error"] >= dropped_before + 5
                ),
                15,
                "frames dropped as backend_error",
            )
            await wait_for(lambda: stats(d)["totals"]["received"] == sent, 10, "all received")
            await wait_for(
                lambda: accounted(d) and stats(d)["streams"]["cam"]["in_flight"] == 0,
                10,
                "every frame accounted",
            )
            assert any(e.get("code") == "backend_error" for e in errors), errors
            read.cancel()
            await c.close()

    try:
        run(scenario())
    finally:
        a.kill()
        b.kill()


def test_an_endpoint_that_stops_answering_times_out_and_comes_back(server: TritonServer) -> None:
    """A frozen server (SIGSTOP) holds no worker past backend_timeout_s: its frames drop as
    backend_error, /ready turns 503, and it is taken back once it answers again (SIGCONT)."""
    image = bus_jpg().read_bytes()
    frozen = [p for p in server.tree() if "tritonserver" in p.name()]
    assert frozen, "no tritonserver process under vision-triton"

    async def scenario() -> None:
        async with running_daemon(
            model=server.url("grpc"),
            model_dir=str(MODEL_DIR),
            workers=1,
            backend_timeout_s=1.0,
            backend_probe_s=0.3,
        ) as d:
            c = await connect(d)
            await c.send_frame("cam", 1, image)
            (msg,) = await collect(c, 1, timeout=30)
            assert msg["type"] == "result", msg
            for p in frozen:
                p.suspend()
            try:
                await c.send_frame("cam", 2, image)
                (msg,) = await collect(c, 1, timeout=10)  # within the timeout, not a hang
                assert msg["type"] == "error" and msg["code"] == "backend_error", msg
                await wait_for(lambda: not d.ready()[0], 10, "not ready while frozen")
            finally:
                for p in frozen:
                    p.resume()
            await wait_for(lambda: d.ready()[0], 30, "taken back after SIGCONT")
            await c.send_frame("cam", 3, image)
            (msg,) = await collect(c, 1, timeout=30)
            assert msg["type"] == "result" and msg["frame_id"] == 3, msg
            snap = stats(d)
            assert snap["totals"]["dropped_by_reason"]["backend_error"] == 1
            assert snap["backends"][0]["downs"] >= 1 and accounted(d)
            await c.close()

    run(scenario())
