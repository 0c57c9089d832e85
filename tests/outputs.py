"""Real event-output peers for tests: an MQTT broker subprocess, a paho subscriber and a webhook
target."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from vision_daemon.outputs.events import EventOutput


def event(i: int, kind: str = "cross", stream: str = "walk", **more: Any) -> dict[str, Any]:
    """An event as Event.to_dict() makes it (a line crossing unless told otherwise)."""
    base: dict[str, Any] = {"type": kind, "stream": stream, "time": 12.0 + i, "track_id": i}
    base.update(label="person", box=[1.0, 2.0, 3.0, 4.0], line="mid", direction="in")
    base.update(more)
    return base


def counts(occupancy: dict[str, int], entered: dict[str, int], line_in: int) -> dict[str, Any]:
    """A StreamCounts for stream 'walk': zone 'door' and line 'mid'."""
    zone = {"occupancy": occupancy, "entered": entered, "exited": {"person": 1}, "dwell_s": {}}
    lines = {"mid": {"in": {"person": line_in}, "out": {}}}
    return {"stream": "walk", "time": 1.0, "tracks": 3, "zones": {"door": zone}, "lines": lines}


def assert_accounted(out: EventOutput) -> dict[str, Any]:
    """Every offered event is sent, dropped with a reason, queued or in flight."""
    s = out.snapshot()
    event_drops = sum(n for reason, n in s["dropped"].items() if reason != "topic_limit")
    assert s["offered"] == s["sent"] + event_drops + s["queued"] + s["in_flight"], s
    assert s["sent"] == out.sent and s["dropped"] == dict(out.dropped)
    json.dumps(s)  # JSON-ready
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    """Poll until something accepts on 127.0.0.1:port (or fail with the broker's log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise AssertionError(f"broker did not listen on {port}: {tail}") from exc
            time.sleep(0.02)  # a poll interval under a deadline, not synchronisation


# ---- slow: a real MQTT broker ------------------------------------------------------------------
def _amqtt() -> str | None:
    return shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")


BROKERS = ["amqtt"] + (["mosquitto"] if shutil.which("mosquitto") else [])


class Broker:
    """An MQTT broker subprocess on 127.0.0.1: kill() and start() again on the same port."""

    def __init__(self, kind: str, workdir: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.tls = tls  # (cert, key): mosquitto also listens with TLS on tls_port
        self.tls_port = free_port() if tls else 0
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{kind}.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "amqtt":
            exe = _amqtt()
            if exe is None:
                pytest.skip("amqtt not installed: pip install amqtt (the dev extra) for MQTT tests")
            cfg = self.workdir / "amqtt.yaml"
            cfg.write_text(
                "listeners:\n"
                "  default:\n"
                "    type: tcp\n"
                f"    bind: 127.0.0.1:{self.port}\n"
                "plugins:\n"
                "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            return [exe, "-c", str(cfg)]
        cfg = self.workdir / "mosquitto.conf"
        # As root, mosquitto would drop to its own user, who cannot read a test's files.
        user = "user root\n" if os.geteuid() == 0 else ""
        text = f"{user}per_listener_settings false\nallow_anonymous true\npersistence false\n"
        text += f"listener {self.port} 127.0.0.1\n"
        if self.tls:
            text += f"listener {self.tls_port} 127.0.0.1\ncertfile {self.tls[0]}\nkeyfile {self.tls[1]}\n"
        cfg.write_text(text)
        return [str(shutil.which("mosquitto")), "-c", str(cfg)]

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class Subscriber:
    """A paho client subscribed to `topic` that records every message it gets."""

    def __init__(self, port: int, topic: str = "vd/#") -> None:
        self.messages: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "the test subscriber got no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload.decode(), bool(msg.retain)))

    def on(self, topic: str) -> list[str]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def latest(self) -> dict[str, str]:
        with self._lock:
            return {t: p for t, p, _ in self.messages}

    def retained(self) -> dict[str, str]:
        with self._lock:
            return {t: p for t, p, r in self.messages if r}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- slow: a real HTTP server as the webhook target ---------------------------------------------
class Target(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 port 0 answering each POST from a script (default 200)."""

    daemon_threads = True

    def __init__(self, script: list[Any] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), TargetHandler)
        self.script = list(script or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()  # lets hanging handlers go at teardown
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/tok-123"

    def __enter__(self) -> Target:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.requests]


class TargetHandler(BaseHTTPRequestHandler):
    server: Target

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            step = self.server.script.pop(0) if self.server.script else 200
        if step == "hang":
            self.server.release.wait(10)
            return
        status, headers = step if isinstance(step, tuple) else (step, {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        reply = b"x" * 100_000  # a large answer: the output must not read it all
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        try:
            self.wfile.write(reply)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        return None


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """The receiver's side, exactly as docs/PROTOCOL.md describes it."""
    timestamp = headers["x-vision-daemon-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + mac.hexdigest(), headers["x-vision-daemon-signature"])
