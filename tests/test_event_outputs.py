"""Event outputs (issue 18): analytics events and counts to an MQTT broker and to webhooks.

The MQTT tests run a real broker (amqtt, and mosquitto too where it is installed) as a subprocess
on 127.0.0.1 and read what arrives with a real paho subscriber; the webhook tests post to a real
HTTP server in a thread. Fakes: none, only scripted answers from the test's own HTTP server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import run, until
from vision_daemon.outputs.events import DropQueue, EventOutput
from vision_daemon.outputs.mqtt import MqttOutput, count_topics, parse_mqtt_url, topic_level
from vision_daemon.outputs.webhooks import WebhookOutput, parse_webhook_url, sign

SECRET = "whsec-s3cret-do-not-log"
PASSWORD = "mqtt-pa55word-do-not-log"


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


# ---- fast: validation and the pure helpers ------------------------------------------------------
def test_mqtt_url_is_validated_with_one_clear_line_that_never_echoes_the_password() -> None:
    """Bad scheme, missing host, bad port or qos raise one-line ValueErrors without the password."""
    target = parse_mqtt_url(f"mqtt://user:{PASSWORD}@broker.lan")
    assert (target.host, target.port, target.username, target.password) == (
        "broker.lan",
        1883,
        "user",
        PASSWORD,
    )
    assert parse_mqtt_url("mqtt://[::1]:1884").port == 1884
    for bad in (
        f"http://user:{PASSWORD}@broker",
        "mqtt://",
        f"mqtt://user:{PASSWORD}@broker:99999",
        "mqtt://broker:0",
        "mqtt://broker/some/path",
        "broker:1883",
    ):
        with pytest.raises(ValueError) as err:
            parse_mqtt_url(bad)
        message = str(err.value)
        assert "\n" not in message and PASSWORD not in message and "mqtt://" in message, message
    with pytest.raises(ValueError, match="qos"):
        MqttOutput("mqtt://broker", qos=3)
    with pytest.raises(ValueError, match="topic_prefix"):
        MqttOutput("mqtt://broker", topic_prefix="a/#")


def test_topic_levels_are_sanitised_and_counts_flatten_to_plain_numbers() -> None:
    """'/', '+', '#' and control characters become '_'; counts become one number per topic."""
    assert topic_level("cam/1+x#\x00\n") == "cam_1_x___"
    assert topic_level("") == "_"
    flat = count_topics("vd", "walk", counts({"person": 2, "car": 1}, {"person": 5}, 4))
    assert flat == {
        "vd/walk/zones/door/occupancy/person": 2,
        "vd/walk/zones/door/occupancy/car": 1,
        "vd/walk/zones/door/occupancy/all": 3,
        "vd/walk/zones/door/entered/person": 5,
        "vd/walk/zones/door/exited/person": 1,
        "vd/walk/lines/mid/in/person": 4,
    }


def test_webhook_url_is_validated_and_named_without_credentials() -> None:
    """Only http/https with a host; the name is host:port and never holds the URL's secrets."""
    hook = WebhookOutput("https://u:pw@hooks.example:8443/path/tok-123?key=abc", secret=SECRET)
    assert hook.name == "webhook:hooks.example:8443"
    assert WebhookOutput("http://[::1]/x").name == "webhook:[::1]:80"
    for bad in ("ftp://host/x", "http://", "https://host:70000/", "hooks.example/x"):
        with pytest.raises(ValueError) as err:
            parse_webhook_url(bad)
        assert "\n" not in str(err.value) and "http" in str(err.value)
    shown = json.dumps(hook.snapshot()) + repr(hook)
    assert SECRET not in shown and "tok-123" not in shown and "pw" not in shown


def test_drop_queue_drops_the_oldest_and_counts_why() -> None:
    """Past its bound the queue loses its oldest item, counted as queue_full; drain counts the rest."""
    dropped: Counter[str] = Counter()
    q: DropQueue[int] = DropQueue(3, dropped)
    for i in range(5):
        q.put(i)
    assert list(q) == [2, 3, 4] and dropped["queue_full"] == 2
    q.put_front([0, 1])  # returned to the front: the oldest again, the bound still holds
    assert list(q) == [2, 3, 4] and dropped["queue_full"] == 4
    assert q.popleft() == 2 and q.drain("shutdown") == 2 and len(q) == 0
    assert dropped == {"queue_full": 4, "shutdown": 2}


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    """The documented recipe: sha256=hex(HMAC-SHA256(secret, f'{timestamp}.' + body))."""
    body = b'{"type":"enter"}'
    want = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == "sha256=" + want


# ---- slow: a real MQTT broker ------------------------------------------------------------------
def _amqtt() -> str | None:
    return shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")


BROKERS = ["amqtt"] + (["mosquitto"] if shutil.which("mosquitto") else [])


class Broker:
    """An MQTT broker subprocess on 127.0.0.1: kill() and start() again on the same port."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
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
        cfg.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
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


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(request.param, tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.kill()


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


@pytest.mark.slow
def test_mqtt_events_arrive_as_json_and_counts_as_retained_numbers(broker: Broker) -> None:
    """Events arrive as JSON in order; counts are retained integers (0 when emptied), sent only on change."""

    async def main() -> None:
        sub = Subscriber(broker.port)
        out = MqttOutput(broker.url, topic_prefix="vd", qos=1)
        await out.start()
        await until(lambda: out.connected, what="connected")
        sent = [event(1), event(2, "enter", zone="door"), event(3, "loiter", dwell_s=4.5)]
        odd = event(4, stream="cam/1+x#", snapshot="/9j/4AAQSkZJRg==")
        for e in [*sent, odd]:
            out.offer_event(e)
        await until(lambda: len(sub.on("vd/walk/events")) == 3, what="3 events")
        assert [json.loads(p) for p in sub.on("vd/walk/events")] == sent
        await until(lambda: len(sub.on("vd/cam_1_x_/events")) == 1, what="sanitised topic")
        assert json.loads(sub.on("vd/cam_1_x_/events")[0]) == odd
        await until(lambda: out.sent == 4, what="sent counted")

        out.offer_counts("walk", counts({"person": 2, "car": 1}, {"person": 5}, 4))
        occ = "vd/walk/zones/door/occupancy/"
        await until(lambda: sub.latest().get(occ + "all") == "3", what="occupancy all")
        out.offer_counts("walk", counts({"person": 1}, {"person": 6}, 4))  # the car has left
        now = {occ + "car": "0", occ + "all": "1", occ + "person": "1"}
        await until(lambda: sub.latest().items() >= now.items(), what="the car back to 0")
        await until(lambda: out.snapshot()["counts_pending"] == 0, what="counts published")
        published = out.snapshot()["counts_published"]
        out.offer_counts("walk", counts({"person": 1}, {"person": 6}, 4))  # nothing changed
        assert out.snapshot()["counts_pending"] == 0
        assert out.snapshot()["counts_published"] == published

        later = Subscriber(broker.port)  # retained states only: no events
        want = {
            "vd/available": "online",
            occ + "person": "1",
            occ + "car": "0",
            occ + "all": "1",
            "vd/walk/zones/door/entered/person": "6",
            "vd/walk/zones/door/exited/person": "1",
            "vd/walk/lines/mid/in/person": "4",
        }
        await until(lambda: later.retained() == want, what=f"retained {later.retained()}")
        assert not [t for t, _, _ in later.messages if t.endswith("/events")]
        assert len(sub.on(occ + "all")) == 2 and len(sub.on("vd/walk/lines/mid/in/person")) == 1
        s = assert_accounted(out)
        assert s["name"] == "mqtt" and s["connected"] and s["dropped"] == {} and s["sent"] == 4
        await out.stop()
        await until(lambda: sub.latest().get("vd/available") == "offline", what="offline")
        later.close()
        sub.close()

    run(main())


@pytest.mark.slow
@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt_broker_restart_delivers_waiting_events_and_republishes_counts(
    broker: Broker, qos: int
) -> None:
    """Events offered while the broker is down wait, then arrive in order and counts are republished."""

    async def main() -> None:
        sub = Subscriber(broker.port)
        out = MqttOutput(broker.url, topic_prefix="vd", qos=qos, queue_max=100)
        await out.start()
        await until(lambda: out.connected, what="connected")
        out.offer_counts("walk", counts({"person": 2}, {"person": 7}, 3))
        occ = "vd/walk/zones/door/occupancy/person"
        await until(lambda: sub.latest().get(occ) == "2", what="counts")
        sub.close()

        broker.kill()
        await until(lambda: not out.connected, what="disconnect noticed")
        failures = out.snapshot()["failures"]
        for i in range(5):
            out.offer_event(event(i))
        s = assert_accounted(out)
        assert (s["queued"], s["in_flight"], s["sent"]) == (5, 0, 0)  # waiting in our queue
        # One failed reconnect first: paho then waits 2 s before trying again, time enough for
        # the test's subscriber to be listening on the restarted broker before the output is.
        await until(lambda: out.snapshot()["failures"] > failures, what="a failed reconnect")
        broker.start()
        back = Subscriber(broker.port)
        await until(lambda: out.connected, what="reconnected")
        await until(lambda: len(back.on("vd/walk/events")) == 5, what="waiting events delivered")
        assert [json.loads(p)["track_id"] for p in back.on("vd/walk/events")] == list(range(5))
        again = {occ: "2", "vd/walk/zones/door/entered/person": "7", "vd/available": "online"}
        await until(lambda: back.latest().items() >= again.items(), what="counts republished")
        await until(lambda: out.sent == 5, what="sent counted")
        s = assert_accounted(out)
        assert s["dropped"] == {} and s["queued"] == 0
        await out.stop()
        back.close()

    run(main())


@pytest.mark.slow
def test_mqtt_broker_down_start_does_not_block_queue_is_bounded_stop_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Broker down: start() does not block, one warning, oldest dropped, bounded stop, no password."""
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        out = MqttOutput(f"mqtt://user:{PASSWORD}@127.0.0.1:{free_port()}", queue_max=10)
        t0 = time.monotonic()
        await out.start()
        assert time.monotonic() - t0 < 0.5
        for i in range(25):
            out.offer_event(event(i))
        s = assert_accounted(out)
        assert s["dropped"] == {"queue_full": 15} and s["queued"] == 10 and not s["connected"]
        await until(lambda: out.snapshot()["failures"] >= 2, what="two failed attempts")
        mqtt_lines = [r for r in caplog.records if r.name.endswith("outputs.mqtt")]
        down = [r for r in mqtt_lines if "unreachable" in r.getMessage()]
        assert len(down) == 1 and down[0].levelno == logging.WARNING, down
        assert "mqtt://127.0.0.1:" in down[0].getMessage()
        assert [r.getMessage() for r in mqtt_lines if "queue full" in r.getMessage()] == [
            "mqtt: queue full (10), dropping the oldest events"  # rate-limited: one line
        ]
        t0 = time.monotonic()
        await out.stop(timeout_s=0.3)
        assert time.monotonic() - t0 < 0.3 + 1.5
        s = assert_accounted(out)
        assert s["dropped"] == {"queue_full": 15, "shutdown": 10} and s["queued"] == 0
        out.offer_event(event(99))  # after stop: counted, never held
        assert assert_accounted(out)["dropped"]["shutdown"] == 11
        assert s["last_error"] and PASSWORD not in json.dumps(out.snapshot())

    run(main())
    assert PASSWORD not in caplog.text


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


@pytest.mark.slow
def test_webhook_posts_signed_compact_json_and_keeps_the_secret_out_of_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The POST is compact JSON with the documented headers and a verifiable signature; no secret leaks."""
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        with Target() as target:
            out = WebhookOutput(target.url, secret=SECRET)
            await out.start()
            sent = event(1, "enter", zone="door", label="café")
            out.offer_event(sent)
            out.offer_counts("walk", counts({"person": 1}, {}, 0))  # a no-op for webhooks
            await until(lambda: out.sent == 1, what="delivered")
            headers, body = target.requests[0]
            assert json.loads(body) == sent and b" " not in body and "café".encode() in body
            assert headers["content-type"] == "application/json"
            assert headers["user-agent"] == "vision-daemon"
            assert headers["x-vision-daemon-event"] == "enter"
            assert verify(SECRET, headers, body)
            assert not verify(SECRET, headers, body.replace(b"door", b"d00r"))
            assert not verify("another-secret", headers, body)
            s = assert_accounted(out)
            assert s["connected"] and s["failures"] == 0 and s["offered"] == 1
            assert s["name"] == f"webhook:127.0.0.1:{target.server_address[1]}"
            assert SECRET not in json.dumps(s) and "tok-123" not in json.dumps(s)
            await out.stop()

    run(main())
    assert SECRET not in caplog.text


@pytest.mark.slow
def test_webhook_retries_5xx_and_429_then_delivers_and_counts_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """500, then 429 with a Retry-After past backoff_max_s, then 200: delivered in order, 2 failures."""

    async def main() -> None:
        script: list[Any] = [500, (429, {"Retry-After": "3600"}), 200]
        with Target(script) as target:
            out = WebhookOutput(target.url, backoff_s=0.01, backoff_max_s=0.05, secret=SECRET)
            await out.start()
            out.offer_event(event(1))
            out.offer_event(event(2))
            await until(lambda: out.sent == 2, what="delivered after retries")
            assert [b["track_id"] for b in target.bodies()] == [1, 1, 1, 2]
            assert all(verify(SECRET, h, b) for h, b in target.requests)
            s = assert_accounted(out)
            assert s["failures"] == 2 and s["dropped"] == {} and s["connected"]
            await out.stop()

    caplog.set_level(logging.INFO, logger="vision_daemon.outputs.webhooks")
    run(main())
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("webhooks")]
    assert [line.split(": ", 1)[1] for line in lines] == [
        "delivery failing (HTTP 500); retrying with backoff",  # once, not per attempt
        "delivering again",
    ]


@pytest.mark.slow
def test_webhook_hanging_target_times_out_and_is_dropped_as_failed() -> None:
    """A target that never answers times out after timeout_s and is dropped as failed after max_attempts."""

    async def main() -> None:
        with Target(["hang", "hang", 200]) as target:
            out = WebhookOutput(target.url, timeout_s=0.2, max_attempts=2, backoff_s=0.01)
            await out.start()
            out.offer_event(event(1))
            out.offer_event(event(2))
            await until(lambda: out.sent == 1, what="the second event")
            assert [b["track_id"] for b in target.bodies()] == [1, 1, 2]
            s = assert_accounted(out)
            assert s["dropped"] == {"failed": 1} and s["failures"] == 2
            assert "timed out" in s["last_error"] or "timeout" in s["last_error"].lower()
            await out.stop()

    run(main())


@pytest.mark.slow
def test_webhook_4xx_is_rejected_without_retry() -> None:
    """A 400 drops the event as rejected after one request; the next event is sent."""

    async def main() -> None:
        with Target([400, 200]) as target:
            out = WebhookOutput(target.url, backoff_s=0.01)
            await out.start()
            out.offer_event(event(1))
            out.offer_event(event(2))
            await until(lambda: out.sent == 1, what="second event sent")
            assert [b["track_id"] for b in target.bodies()] == [1, 2]
            s = assert_accounted(out)
            assert s["dropped"] == {"rejected": 1} and s["failures"] == 1
            assert "400" in s["last_error"]
            await out.stop()

    run(main())


@pytest.mark.slow
def test_webhook_event_types_filter() -> None:
    """With event_types set only those types are posted; the others are counted as filtered."""

    async def main() -> None:
        with Target() as target:
            out = WebhookOutput(target.url, event_types=frozenset({"enter"}))
            await out.start()
            for i, kind in enumerate(["cross", "enter", "loiter", "enter"]):
                out.offer_event(event(i, kind))
            await until(lambda: out.sent == 2, what="two enters")
            assert [h["x-vision-daemon-event"] for h, _ in target.requests] == ["enter", "enter"]
            s = assert_accounted(out)
            assert s["filtered"] == 2 and s["offered"] == 2
            await out.stop()

    run(main())


@pytest.mark.slow
def test_webhook_dead_target_offer_returns_at_once_and_drops_the_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused connections: offers return at once, the oldest go as queue_full, all stays accounted."""

    async def main() -> None:
        url = f"http://127.0.0.1:{free_port()}/hook"
        out = WebhookOutput(url, queue_max=4, backoff_s=0.05, max_attempts=3)
        await out.start()
        slowest = 0.0
        for i in range(1000):
            t0 = time.perf_counter()
            out.offer_event(event(i))
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.005, slowest
        s = assert_accounted(out)
        assert s["dropped"] == {"queue_full": 996} and s["queued"] == 4
        await until(lambda: out.snapshot()["failures"] >= 1, what="a refused attempt")
        assert not out.snapshot()["connected"] and out.snapshot()["last_error"]
        assert_accounted(out)
        await until(lambda: out.snapshot()["failures"] >= 3, what="more refused attempts")
        failing = [r for r in caplog.records if "delivery failing" in r.getMessage()]
        assert len(failing) == 1 and failing[0].levelno == logging.WARNING  # once per change
        t0 = time.monotonic()
        await out.stop(timeout_s=0.2)
        assert time.monotonic() - t0 < 0.2 + 1.0
        s = assert_accounted(out)
        assert s["queued"] == 0 and s["in_flight"] == 0 and s["dropped"]["shutdown"] >= 1
        assert sum(s["dropped"].values()) == 1000

    run(main())


@pytest.mark.slow
def test_bad_input_to_an_offer_never_raises_and_is_counted() -> None:
    """A non-JSON event is dropped as invalid and bad counts are ignored; no offer raises."""

    async def main() -> None:
        with Target() as target:
            out = WebhookOutput(target.url)
            await out.start()
            out.offer_event({"type": "enter", "stream": "walk", "bad": object()})
            out.offer_event(event(2, "enter"))
            await until(lambda: out.sent == 1, what="the good event")
            assert assert_accounted(out)["dropped"] == {"invalid": 1}
            await out.stop()
        mq = MqttOutput("mqtt://127.0.0.1:1")
        mq.offer_counts("walk", {"zones": "not a dict"})  # never raises, before start too
        mq.offer_event({"type": "enter", "stream": "walk", "bad": object()})
        assert assert_accounted(mq)["queued"] == 1

    run(main())


def test_both_outputs_start_empty_and_satisfy_the_protocol() -> None:
    """A new output of either kind has sent 0, dropped nothing and a JSON-ready snapshot."""
    outputs: list[EventOutput] = [MqttOutput("mqtt://127.0.0.1"), WebhookOutput("http://h/x")]
    for out in outputs:
        s = assert_accounted(out)
        assert (s["sent"], s["queued"], s["connected"], s["last_error"]) == (0, 0, False, None)
