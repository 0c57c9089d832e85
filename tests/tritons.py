"""Triton servers for tests: real ones (`vision-triton`, pytriton in its own venv) on free ports,
and `FakeTriton`, an in-process HTTP endpoint whose inference replies a test controls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from triton_serve.cli import find_python
from triton_serve.process import ROOT, TritonProcess, free_port

__all__ = ["ROOT", "FakeTriton", "TritonServer", "bus_jpg", "free_port", "need_triton_venv"]


def bus_jpg() -> Path:
    """ultralytics' bundled bus.jpg (4 persons and a bus)."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def need_triton_venv() -> None:
    if find_python() is None:
        pytest.skip("no .venv-triton: run 'make triton-venv' (make test builds it)")


class TritonServer(TritonProcess):
    """A TritonProcess that skips the test, with one line, when the Triton venv is missing."""

    def __init__(self, model_dir: Path, model: str, **kw: Any) -> None:
        need_triton_venv()
        super().__init__(model_dir, model, **kw)


FAKE_CONFIG = {
    "name": "fake",
    "input": [
        {"name": "image", "data_type": "TYPE_UINT8", "dims": [-1]},
        {"name": "thresholds", "data_type": "TYPE_FP32", "dims": [2]},
    ],
    "output": [{"name": "detections", "data_type": "TYPE_FP32", "dims": [-1, 6]}],
    "parameters": {"metadata": {"string_value": "{'names': {0: 'person', 1: 'bus'}}"}},
}


class FakeTriton:
    """A Triton HTTP endpoint in this process (127.0.0.1, port 0) serving one compact model,
    `fake`, whose inference replies the test controls with `mode`: "ok" (`rows` detection rows),
    "trickle" (the whole reply, status line first, one byte every `trickle_s` seconds until it
    ends or the fake closes). Health, readiness and the model's config always answer at once."""

    def __init__(self, rows: int = 1, trickle_s: float = 1.0) -> None:
        self.mode, self.rows, self.trickle_s = "ok", rows, trickle_s
        self.infers = 0
        self.closed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/fake"

    def reply(self) -> bytes:
        """A whole inference reply (KServe v2 binary): `rows` rows of (x1, y1, x2, y2, conf, 0)."""
        data = np.tile(np.array([10, 20, 30, 40, 0.9, 0], np.float32), (self.rows, 1)).tobytes()
        out = {"name": "detections", "datatype": "FP32", "shape": [self.rows, 6]}
        head = json.dumps(
            {
                "model_name": "fake",
                "outputs": [{**out, "parameters": {"binary_data_size": len(data)}}],
            }
        ).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Inference-Header-Content-Length: {len(head)}\r\n".encode()
            + f"Content-Length: {len(head) + len(data)}\r\n\r\n".encode()
            + head
            + data
        )

    def close(self) -> None:
        self.closed.set()  # trickling replies stop
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeTriton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(fake: FakeTriton) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/v2/health/live", "/v2/models/fake/ready"):
                self._answer(200, {})
            elif self.path == "/v2/models/fake/config":
                self._answer(200, FAKE_CONFIG)
            else:
                self._answer(404, {"error": f"no {self.path}"})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v2/models/fake/infer":
                self._answer(404, {"error": f"no {self.path}"})
                return
            fake.infers += 1
            reply = fake.reply()
            if fake.mode != "trickle":
                self.wfile.write(reply)
                return
            for i in range(len(reply)):
                if fake.closed.wait(fake.trickle_s):
                    break
                try:
                    self.wfile.write(reply[i : i + 1])
                except OSError:  # the client gave up and closed
                    break
            self.close_connection = True

    return Handler
