"""Event outputs (issue 18) against real peers: an MQTT broker (amqtt, mosquitto if installed) and
webhook targets."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run, wait_for
from tests.outputs import (
    BROKERS,
    Broker,
    Subscriber,
    Target,
    assert_accounted,
    counts,
    event,
    free_port,
    verify,
)
from vision_daemon.outputs.mqtt import MqttOutput
from vision_daemon.outputs.webhooks import WebhookOutput

pytestmark = pytest.mark.slow  # real MQTT brokers, webhook targets and sockets


SECRET = "whsec-s3cret-do-not-log"


PASSWORD = "mqtt-pa55word-do-not-log"


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(request.param, tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.kill()


def test_mqtt_events_arrive_as_json_and_counts_as_retained_numbers(broker: Broker) -> None:
    """Events arrive as JSON in order; counts are retained integers (0 when emptied), sent only on change."""

    async def main() -> None:
        sub = Subscriber(broker.port)
        out = MqttOutput(broker.url, topic_prefix="vd", qos=1)
        await out.start()
        await wait_for(lambda: out.connected, what="connected")
        sent = [event(1), event(2, "enter", zone="door"), event(3, "loiter", dwell_s=4.5)]
        odd = event(4, stream="cam/1+x#", snapshot="/9j/4AAQSkZJRg==")
        for e in [*sent, odd]:
            out.offer_event(e)
        await wait_for(lambda: len(sub.on("vd/walk/events")) == 3, what="3 events")
        assert [json.loads(p) for p in sub.on("vd/walk/events")] == sent
        await wait_for(lambda: len(sub.on("vd/cam_1_x_/events")) == 1, what="sanitised topic")
        assert json.loads(sub.on("vd/cam_1_x_/events")[0]) == odd
        await wait_for(lambda: out.sent == 4, what="sent counted")

        out.offer_counts("walk", counts({"person": 2, "car": 1}, {"person": 5}, 4))
        occ = "vd/walk/zones/door/occupancy/"
        await wait_for(lambda: sub.latest().get(occ + "all") == "3", what="occupancy all")
        out.offer_counts("walk", counts({"person": 1}, {"person": 6}, 4))  # the car has left
        now = {occ + "car": "0", occ + "all": "1", occ + "person": "1"}
        await wait_for(lambda: sub.latest().items() >= now.items(), what="the car back to 0")
        await wait_for(lambda: out.snapshot()["counts_pending"] == 0, what="counts published")
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
        await wait_for(lambda: later.retained() == want, what=f"retained {later.retained()}")
        assert not [t for t, _, _ in later.messages if t.endswith("/events")]
        assert len(sub.on(occ + "all")) == 2 and len(sub.on("vd/walk/lines/mid/in/person")) == 1
        s = assert_accounted(out)
        assert s["name"] == "mqtt" and s["connected"] and s["dropped"] == {} and s["sent"] == 4
        await out.stop()
        await wait_for(lambda: sub.latest().get("vd/available") == "offline", what="offline")
        later.close()
        sub.close()

    run(main())


@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt_broker_restart_delivers_waiting_events_and_republishes_counts(
    broker: Broker, qos: int
) -> None:
    """Events offered while the broker is down wait, then arrive in order and counts are republished."""

    async def main() -> None:
        sub = Subscriber(broker.port)
        out = MqttOutput(broker.url, topic_prefix="vd", qos=qos, queue_max=100)
        await out.start()
        await wait_for(lambda: out.connected, what="connected")
        out.offer_counts("walk", counts({"person": 2}, {"person": 7}, 3))
        occ = "vd/walk/zones/door/occupancy/person"
        await wait_for(lambda: sub.latest().get(occ) == "2", what="counts")
        sub.close()

        broker.kill()
        await wait_for(lambda: not out.connected, what="disconnect noticed")
        failures = out.snapshot()["failures"]
        for i in range(5):
            out.offer_event(event(i))
        s = assert_accounted(out)
        assert (s["queued"], s["in_flight"], s["sent"]) == (5, 0, 0)  # waiting in our queue
        # One failed reconnect first: paho then waits 2 s before trying again, time enough for
        # the test's subscriber to be listening on the restarted broker before the output is.
        await wait_for(lambda: out.snapshot()["failures"] > failures, what="a failed reconnect")
        broker.start()
        back = Subscriber(broker.port)
        await wait_for(lambda: out.connected, what="reconnected")
        await wait_for(lambda: len(back.on("vd/walk/events")) == 5, what="waiting events delivered")
        assert [json.loads(p)["track_id"] for p in back.on("vd/walk/events")] == list(range(5))
        again = {occ: "2", "vd/walk/zones/door/entered/person": "7", "vd/available": "online"}
        await wait_for(lambda: back.latest().items() >= again.items(), what="counts republished")
        await wait_for(lambda: out.sent == 5, what="sent counted")
        s = assert_accounted(out)
        assert s["dropped"] == {} and s["queued"] == 0
        await out.stop()
        back.close()

    run(main())


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
        await wait_for(lambda: out.snapshot()["failures"] >= 2, what="two failed attempts")
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
            await wait_for(lambda: out.sent == 1, what="delivered")
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
            await wait_for(lambda: out.sent == 2, what="delivered after retries")
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


def test_webhook_hanging_target_times_out_and_is_dropped_as_failed() -> None:
    """A target that never answers times out after timeout_s and is dropped as failed after max_attempts."""

    async def main() -> None:
        with Target(["hang", "hang", 200]) as target:
            out = WebhookOutput(target.url, timeout_s=0.2, max_attempts=2, backoff_s=0.01)
            await out.start()
            out.offer_event(event(1))
            out.offer_event(event(2))
            await wait_for(lambda: out.sent == 1, what="the second event")
            assert [b["track_id"] for b in target.bodies()] == [1, 1, 2]
            s = assert_accounted(out)
            assert s["dropped"] == {"failed": 1} and s["failures"] == 2
            assert "timed out" in s["last_error"] or "timeout" in s["last_error"].lower()
            await out.stop()

    run(main())


def test_webhook_4xx_is_rejected_without_retry() -> None:
    """A 400 drops the event as rejected after one request; the next event is sent."""

    async def main() -> None:
        with Target([400, 200]) as target:
            out = WebhookOutput(target.url, backoff_s=0.01)
            await out.start()
            out.offer_event(event(1))
            out.offer_event(event(2))
            await wait_for(lambda: out.sent == 1, what="second event sent")
            assert [b["track_id"] for b in target.bodies()] == [1, 2]
            s = assert_accounted(out)
            assert s["dropped"] == {"rejected": 1} and s["failures"] == 1
            assert "400" in s["last_error"]
            await out.stop()

    run(main())


def test_webhook_event_types_filter() -> None:
    """With event_types set only those types are posted; the others are counted as filtered."""

    async def main() -> None:
        with Target() as target:
            out = WebhookOutput(target.url, event_types=frozenset({"enter"}))
            await out.start()
            for i, kind in enumerate(["cross", "enter", "loiter", "enter"]):
                out.offer_event(event(i, kind))
            await wait_for(lambda: out.sent == 2, what="two enters")
            assert [h["x-vision-daemon-event"] for h, _ in target.requests] == ["enter", "enter"]
            s = assert_accounted(out)
            assert s["filtered"] == 2 and s["offered"] == 2
            await out.stop()

    run(main())


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
        await wait_for(lambda: out.snapshot()["failures"] >= 1, what="a refused attempt")
        assert not out.snapshot()["connected"] and out.snapshot()["last_error"]
        assert_accounted(out)
        await wait_for(lambda: out.snapshot()["failures"] >= 3, what="more refused attempts")
        failing = [r for r in caplog.records if "delivery failing" in r.getMessage()]
        assert len(failing) == 1 and failing[0].levelno == logging.WARNING  # once per change
        t0 = time.monotonic()
        await out.stop(timeout_s=0.2)
        assert time.monotonic() - t0 < 0.2 + 1.0
        s = assert_accounted(out)
        assert s["queued"] == 0 and s["in_flight"] == 0 and s["dropped"]["shutdown"] >= 1
        assert sum(s["dropped"].values()) == 1000

    run(main())


def test_bad_input_to_an_offer_never_raises_and_is_counted() -> None:
    """A non-JSON event is dropped as invalid and bad counts are ignored; no offer raises."""

    async def main() -> None:
        with Target() as target:
            out = WebhookOutput(target.url)
            await out.start()
            out.offer_event({"type": "enter", "stream": "walk", "bad": object()})
            out.offer_event(event(2, "enter"))
            await wait_for(lambda: out.sent == 1, what="the good event")
            assert assert_accounted(out)["dropped"] == {"invalid": 1}
            await out.stop()
        mq = MqttOutput("mqtt://127.0.0.1:1")
        mq.offer_counts("walk", {"zones": "not a dict"})  # never raises, before start too
        mq.offer_event({"type": "enter", "stream": "walk", "bad": object()})
        assert assert_accounted(mq)["queued"] == 1

    run(main())
