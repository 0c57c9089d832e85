"""Event outputs (issue 18) as policy: URL validation, topic and count shapes, drop queues,
signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter

import pytest

from tests.outputs import (
    assert_accounted,
    counts,
)
from vision_daemon.outputs.events import DropQueue, EventOutput
from vision_daemon.outputs.mqtt import MqttOutput, count_topics, parse_mqtt_url, topic_level
from vision_daemon.outputs.webhooks import WebhookOutput, parse_webhook_url, sign

SECRET = "whsec-s3cret-do-not-log"


PASSWORD = "mqtt-pa55word-do-not-log"


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


def test_both_outputs_start_empty_and_satisfy_the_protocol() -> None:
    """A new output of either kind has sent 0, dropped nothing and a JSON-ready snapshot."""
    outputs: list[EventOutput] = [MqttOutput("mqtt://127.0.0.1"), WebhookOutput("http://h/x")]
    for out in outputs:
        s = assert_accounted(out)
        assert (s["sent"], s["queued"], s["connected"], s["last_error"]) == (0, 0, False, None)
