"""Events and counts to an MQTT broker, in topics Home Assistant can use as they are.

Topics (``<p>`` is topic_prefix; every other level is sanitised: "/", "+", "#" and control
characters become "_", an empty level becomes "_", a level is cut at 128 characters):

    <p>/available                                  "online" / "offline", retained (last will)
    <p>/<stream>/events                            one JSON event per message, not retained
    <p>/<stream>/zones/<zone>/occupancy/<label>    retained plain integers: the counts' state
    <p>/<stream>/zones/<zone>/occupancy/all
    <p>/<stream>/zones/<zone>/entered/<label>
    <p>/<stream>/zones/<zone>/exited/<label>
    <p>/<stream>/lines/<line>/in/<label>
    <p>/<stream>/lines/<line>/out/<label>

Events are a bounded FIFO (queue_max; the oldest is dropped as "queue_full") that waits in this
object, not in paho, while the broker is away, and is delivered in order once connected. Counts
are state, not messages: the latest value per topic is kept (at most MAX_TOPICS topics; past it a
new topic is counted as dropped "topic_limit"), only values that changed since they were last
published are sent, and all of them are published again after every (re)connect, since the broker
may have restarted without its retained messages. An occupancy label seen before and absent now
is published as 0.

An event counts as sent when paho confirms it (on_publish): for qos 0 once it is written to the
socket, for qos 1 and 2 once the broker acknowledges it. At most WINDOW publishes are handed to
paho at a time; qos-0 events that were handed over but not written when the connection dropped go
back to the head of the queue.

Threading: paho runs its network thread (loop_start); its callbacks only forward what happened to
the event loop with call_soon_threadsafe. All of this object's state is read and changed on the
loop thread, and publish() is called there too, so a confirmation is always handled after the
publish it confirms was recorded; no lock is needed.

Longer than most modules (about 410 lines) because it is one client whose state (the queue, the
in-flight window, the retained counts) is only correct read as a whole; the topic names are in
mqtt_topics.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from vision_daemon.analytics import EventData, StreamCounts
from vision_daemon.outputs.events import QueuedOutput, encode_event, short_error
from vision_daemon.outputs.mqtt_topics import MqttTarget as MqttTarget
from vision_daemon.outputs.mqtt_topics import check_topic_prefix, flatten
from vision_daemon.outputs.mqtt_topics import count_topics as count_topics
from vision_daemon.outputs.mqtt_topics import parse_mqtt_url as parse_mqtt_url
from vision_daemon.outputs.mqtt_topics import topic_level as topic_level

logger = logging.getLogger(__name__)

MAX_TOPICS = 4096  # retained count topics kept and republished per output
WINDOW = 64  # publishes handed to paho and not yet confirmed, events and counts together
STOP_JOIN_S = 1.0  # how long stop() waits for paho's network thread after its own timeout


class MqttOutput(QueuedOutput):
    """Publishes analytics events and counts to one MQTT broker (paho-mqtt 2.x)."""

    def __init__(
        self,
        url: str,
        *,
        topic_prefix: str = "vision-daemon",
        qos: int = 0,
        queue_max: int = 1000,
        client_id: str = "",
        keepalive_s: int = 30,
        ca: str = "",
    ) -> None:
        self.target = parse_mqtt_url(url)
        self.ca = ca  # mqtts://: verify the broker against this PEM CA ("" = the system's)
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            raise ValueError(f"MQTT qos must be 0, 1 or 2, got {qos!r}")
        check_topic_prefix(topic_prefix)
        if not 0 <= keepalive_s <= 65535:
            raise ValueError(f"MQTT keepalive_s must be 0-65535, got {keepalive_s!r}")
        super().__init__("mqtt", queue_max, logger)
        self.qos = qos
        self.prefix = topic_prefix
        self.client_id = client_id or f"vision-daemon-{secrets.token_hex(4)}"
        self.keepalive_s = keepalive_s
        self.availability_topic = f"{topic_prefix}/available"
        self.counts_published = 0
        self._state: dict[str, int] = {}  # count topic -> latest value
        self._published: dict[str, int] = {}  # count topic -> value last handed to the broker
        self._pending: dict[str, None] = {}  # count topics to publish, oldest change first
        self._occupancy: dict[str, set[str]] = {}  # stream level -> its occupancy topics now
        self._inflight: dict[int, EventData] = {}  # mid -> event handed to paho
        self._inflight_counts: set[int] = set()  # mids of count publishes handed to paho
        self._closed = False  # past stop()'s flush: paho's late news is ignored
        self._flushed = asyncio.Event()  # nothing queued, pending or in flight
        self._flushed.set()
        self._down_logged = False  # a warning said the broker is away; cleared on connect
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- the loop thread's side ---------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def offer_event(self, event: EventData) -> None:
        """Queue an event for <prefix>/<stream>/events; O(1), no I/O, never raises."""
        super().offer_event(event)
        if len(self.queue):
            self._flushed.clear()

    def offer_counts(self, stream: str, counts: StreamCounts) -> None:
        """Record a stream's latest counts; changed values are published as retained numbers."""
        try:
            if self._stopping:
                return
            values, occupancy = flatten(self.prefix, stream, counts)
            key = topic_level(stream)
            for gone in self._occupancy.get(key, set()) - occupancy:
                values[gone] = 0  # a label (or zone) no longer occupied reads 0, not stale
            kept: set[str] = set()
            for topic, value in values.items():
                if topic not in self._state and len(self._state) >= MAX_TOPICS:
                    self.dropped["topic_limit"] += 1
                    self.log_limited(
                        "topic_limit",
                        "%s: more than %d count topics, new ones are dropped",
                        self.name,
                        MAX_TOPICS,
                    )
                    continue
                self._state[topic] = value
                if self._published.get(topic) == value:
                    self._pending.pop(topic, None)
                else:
                    self._pending[topic] = None
                if topic in occupancy:
                    kept.add(topic)
            if kept:
                self._occupancy[key] = kept
            else:
                self._occupancy.pop(key, None)
            if self._pending:
                self._flushed.clear()
                self._wake.set()
        except Exception:  # nothing an output does may raise into the pipeline
            self.log_limited("counts", "%s: offer_counts failed", self.name, exc_info=True)

    async def start(self) -> None:
        """Start paho's network thread; a broker that is down is retried in the background."""
        if self._client is not None or self._stopping:
            return
        self._loop = asyncio.get_running_loop()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:  # certificate and host name verified, as a browser would
            client.tls_set(ca_certs=self.ca or None)
        client.will_set(self.availability_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(WINDOW)
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        self._client = client
        self._task = asyncio.create_task(self._pump(), name="mqtt-output")
        try:
            client.connect_async(self.target.host, self.target.port, self.keepalive_s)
            client.loop_start()
        except Exception as exc:  # e.g. no thread could be started: say so, do not fail start-up
            self.last_error = short_error(exc)
            logger.warning("MQTT output to %s could not start: %s", self.target.display, exc)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush for at most timeout_s, count what is left as 'shutdown', say 'offline', and
        disconnect (paho's thread gets STOP_JOIN_S more to finish)."""
        if self._stopping:
            return
        self._stopping = True
        client = self._client
        if client is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._flushed.wait(), max(timeout_s, 0.0))
            except TimeoutError:
                pass
        self._closed = True
        unconfirmed = len(self._inflight)  # handed to paho, never confirmed: not known sent
        self._inflight.clear()
        if unconfirmed:
            self.dropped["shutdown"] += unconfirmed
        leftover = unconfirmed + self.queue.drain("shutdown")
        if leftover:
            logger.warning("MQTT output: %d events not sent before shutdown", leftover)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if client is not None:
            try:
                if self.connected:  # written before DISCONNECT, which stops the will
                    client.publish(self.availability_topic, "offline", qos=1, retain=True)
                client.disconnect()
            except Exception as exc:
                logger.debug("MQTT output: disconnect failed: %s", short_error(exc))
            await self._join(client)
        self.connected = False

    def snapshot(self) -> dict[str, object]:
        """The common keys plus broker, qos, topic_prefix, topics, counts_pending and
        counts_published."""
        return self.base_snapshot() | {
            "broker": self.target.display,
            "qos": self.qos,
            "topic_prefix": self.prefix,
            "topics": len(self._state),
            "counts_pending": len(self._pending),
            "counts_published": self.counts_published,
        }

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # a bug here must not end delivery for good
                self.log_limited("pump", "%s: publishing failed", self.name, exc_info=True)

    def _drain(self) -> None:
        """Hand counts and events to paho, alternately, while connected and the window allows."""
        client = self._client
        while self.connected and client is not None and not self._closed:
            if len(self._inflight) + len(self._inflight_counts) >= WINDOW:
                break
            if not self._pending and not len(self.queue):
                break
            if self._pending and not self._publish_count(client):
                break
            if len(self.queue) and not self._publish_event(client):
                break
        self._check_flushed()

    def _publish_count(self, client: mqtt.Client) -> bool:
        topic = next(iter(self._pending))
        del self._pending[topic]
        value = self._state[topic]
        info = client.publish(topic, str(value), qos=self.qos, retain=True)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos == 0:
            self._pending[topic] = None  # and every count is republished on reconnect anyway
            return False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.log_limited("count_rc", "%s: publish of a count failed: %s", self.name, info.rc)
            return True
        self._published[topic] = value
        self._inflight_counts.add(info.mid)
        self.counts_published += 1
        return True

    def _publish_event(self, client: mqtt.Client) -> bool:
        event = self.queue.popleft()
        try:
            payload = encode_event(event)
            topic = f"{self.prefix}/{topic_level(event.get('stream', ''))}/events"
            info = client.publish(topic, payload, qos=self.qos, retain=False)
        except (TypeError, ValueError) as exc:  # not JSON, or too large for MQTT
            self.dropped["invalid"] += 1
            self.log_limited("invalid", "%s: event dropped: %s", self.name, short_error(exc))
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos > 0  # paho resends it
        ):
            self._inflight[info.mid] = event
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self.queue.put_front([event])  # the connection went while we were not told yet
            return False
        self.dropped["invalid"] += 1
        self.log_limited("event_rc", "%s: publish of an event failed: %s", self.name, info.rc)
        return True

    def _check_flushed(self) -> None:
        if not len(self.queue) and not self._inflight and not self._pending:
            self._flushed.set()

    def _on_connected(self, failed: bool, reason: str) -> None:
        if self._closed:
            return
        if failed:  # the broker answered but refused: credentials, client ID, protocol
            self._went_down(f"broker refused the connection: {reason}")
            return
        self.connected = True
        self._down_logged = False
        logger.info("MQTT output connected to %s", self.target.display)
        client = self._client
        if client is not None:
            client.publish(self.availability_topic, "online", qos=1, retain=True)
        self._published.clear()  # the broker may have restarted without retained messages
        self._pending = dict.fromkeys(self._state)
        self._wake.set()

    def _on_disconnected(self, reason: str) -> None:
        if self._closed or not self.connected:
            return  # a failed attempt is counted by _on_connected or _on_connect_failed
        self.connected = False
        self._went_down(f"connection lost: {reason}")
        if self.qos == 0:
            # Handed to paho but never written: paho forgets them at the next connect.
            self.queue.put_front(self._inflight.values())
            self._inflight.clear()
            self._inflight_counts.clear()

    def _on_connect_failed(self) -> None:
        if not self._closed:
            self._went_down(f"cannot connect to {self.target.display}")

    def _went_down(self, error: str) -> None:
        self.connected = False
        self.failures += 1
        self.last_error = error
        if not self._down_logged:
            self._down_logged = True
            logger.warning(
                "MQTT broker %s unreachable (%s); retrying in the background, events wait in a "
                "queue of %d",
                self.target.display,
                error,
                self.queue.maxlen,
            )

    def _on_published(self, mid: int) -> None:
        if self._inflight.pop(mid, None) is not None:
            self.sent += 1
        elif mid in self._inflight_counts:
            self._inflight_counts.discard(mid)
        else:
            return  # availability messages, or events already counted at shutdown
        self._wake.set()
        self._check_flushed()

    async def _join(self, client: mqtt.Client) -> None:
        """loop_stop() in a thread of its own, waited for at most STOP_JOIN_S: paho may be in
        a blocking connect() of up to its connect_timeout."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def join() -> None:
            client.loop_stop()
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop has closed; nobody waits any more
                pass

        threading.Thread(target=join, name="mqtt-output-stop", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), STOP_JOIN_S)
        except TimeoutError:
            logger.warning(
                "MQTT output: network thread for %s still busy after stop; left to end on its own",
                self.target.display,
            )

    # ---- paho's network thread: forward to the loop, nothing else ------------------------------
    def _forward(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: the daemon is gone
            pass

    def _paho_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._forward(self._on_connected, reason.is_failure, str(reason))

    def _paho_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._forward(self._on_connect_failed)

    def _paho_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._forward(self._on_disconnected, str(reason))

    def _paho_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._forward(self._on_published, mid)
