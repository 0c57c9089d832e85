"""Events to an HTTP webhook: one signed POST per event, in order, retried with backoff.

Each event is POSTed, one request in flight per target, as compact UTF-8 JSON (the event dict as
Event.to_dict() makes it) with these headers:

    Content-Type: application/json
    User-Agent: vision-daemon
    X-Vision-Daemon-Event: <event type>               enter, exit, cross, loiter, new_object
    X-Vision-Daemon-Timestamp: <Unix seconds>         when this attempt was made
    X-Vision-Daemon-Signature: sha256=<hex>           only when a secret is configured

The signature is HMAC-SHA256 with the shared secret as key over the timestamp, a dot and the raw
body: ``hex(HMAC-SHA256(secret, f"{timestamp}." + body))``. A receiver verifies it by:

1. reading the raw request body as bytes, before any JSON parsing;
2. rejecting the request when X-Vision-Daemon-Timestamp is more than 5 minutes from its own
   clock (a replayed request carries an old timestamp, and the timestamp is signed);
3. computing ``"sha256=" + hex(HMAC-SHA256(secret, timestamp + "." + body))`` and comparing it
   with X-Vision-Daemon-Signature in constant time. In Python::

       mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
       ok = hmac.compare_digest("sha256=" + mac.hexdigest(), signature_header)

Every retry is signed afresh with a new timestamp; the body is the same.

Answers: any 2xx is delivered. Connection errors, timeouts (timeout_s bounds a whole attempt),
408, 429 and 5xx are retried up to max_attempts in all, after backoff_s * 2**(n-1) seconds (capped
at backoff_max_s, with jitter: 50-100 % of it), or after a numeric Retry-After (capped at
backoff_max_s); then the event is dropped as "failed". Any other answer (3xx: redirects are not
followed; 4xx) drops it at once as "rejected". At most MAX_BODY_READ bytes of an answer are read.

Counts are not sent to webhooks: offer_counts is a no-op (counts are state; read them from /stats
or MQTT's retained topics). The secret and the URL's path and query (which often hold a token
too) never appear in logs, the snapshot or the name, which is "webhook:<host>:<port>".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import random
import re
import time
from typing import Literal
from urllib.parse import urlsplit

import httpx

from vision_daemon.analytics import EventData, StreamCounts
from vision_daemon.outputs.events import QueuedOutput, encode_event, short_error

logger = logging.getLogger(__name__)

MAX_BODY_READ = 4096  # bytes of an answer read before the response is closed
_USAGE = "use http(s)://host[:port]/path"
_HEADER_SAFE = re.compile(r"[^A-Za-z0-9_.-]")

Outcome = Literal["sent", "retry", "rejected"]


def parse_webhook_url(url: str) -> str:
    """Check an http(s) URL and return its "host:port"; a ValueError says in one line what is
    wrong, without echoing the URL (its path or user info may hold a token)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        httpx.URL(url.strip())
    except (ValueError, httpx.InvalidURL):
        raise ValueError(f"webhook URL is malformed or its port is not 1-65535; {_USAGE}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"webhook URL must start with http:// or https://; {_USAGE}")
    if not parts.hostname:
        raise ValueError(f"webhook URL has no host; {_USAGE}")
    if port == 0:
        raise ValueError(f"webhook URL port must be 1-65535; {_USAGE}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port or (443 if scheme == 'https' else 80)}"


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The X-Vision-Daemon-Signature value: sha256=hex(HMAC-SHA256(secret, f"{ts}." + body))."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def retry_after_s(value: str | None) -> float | None:
    """A numeric Retry-After in seconds (the HTTP-date form is not honoured: None)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class WebhookOutput(QueuedOutput):
    """POSTs analytics events to one HTTP(S) URL. Counts are ignored (see offer_counts)."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        queue_max: int = 256,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        event_types: frozenset[str] = frozenset(),
    ) -> None:
        hostport = parse_webhook_url(url)
        if not timeout_s > 0:
            raise ValueError(f"webhook timeout_s must be > 0, got {timeout_s!r}")
        if max_attempts < 1:
            raise ValueError(f"webhook max_attempts must be at least 1, got {max_attempts!r}")
        if not 0 <= backoff_s <= backoff_max_s:
            raise ValueError("webhook backoff_s must be >= 0 and at most backoff_max_s")
        super().__init__(f"webhook:{hostport}", queue_max, logger)
        self._url = url.strip()  # never logged or shown: its path may be a token
        self._secret = secret.encode() if secret else None
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.event_types = frozenset(event_types)
        self._sending = False  # an event taken from the queue and not yet resolved
        self._warned = False  # a warning said deliveries fail; cleared by the next success
        self._idle = asyncio.Event()  # the queue is empty and nothing is being sent
        self._idle.set()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"WebhookOutput({self.name})"

    @property
    def in_flight(self) -> int:
        return int(self._sending)

    def wants(self, event: EventData) -> bool:
        if not self.event_types:
            return True
        return isinstance(event, dict) and event.get("type") in self.event_types

    def offer_event(self, event: EventData) -> None:
        """Queue an event for POSTing; O(1), no I/O, never raises."""
        super().offer_event(event)
        if len(self.queue):
            self._idle.clear()

    def offer_counts(self, stream: str, counts: StreamCounts) -> None:
        """A no-op: webhooks carry events only (counts are state; see /stats or MQTT)."""

    async def start(self) -> None:
        """Start the sender task; nothing is connected until the first event."""
        if self._task is not None or self._stopping:
            return
        self._client = httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "vision-daemon"},
        )
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-sender")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Deliver for at most timeout_s more; what is left is counted as dropped 'shutdown'."""
        if self._stopping:
            return
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
            except TimeoutError:
                pass
            self._task.cancel()  # counts the event being sent, if any, as 'shutdown'
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        left = self.queue.drain("shutdown")
        if left:
            logger.warning("%s: %d events not sent before shutdown", self.name, left)
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception as exc:
                logger.debug("%s: closing the HTTP client failed: %s", self.name, short_error(exc))

    def snapshot(self) -> dict[str, object]:
        """The common keys plus signed (a secret is set) and event_types (empty: all)."""
        return self.base_snapshot() | {
            "signed": self._secret is not None,
            "event_types": sorted(self.event_types),
        }

    # ---- the sender task ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not len(self.queue):
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
            event = self.queue.popleft()
            self._sending = True
            try:
                await self._deliver(event)
            except asyncio.CancelledError:
                self.dropped["shutdown"] += 1
                self._sending = False
                raise
            except Exception:  # a bug here must not end delivery for good
                self.dropped["failed"] += 1
                self.log_limited("deliver", "%s: delivery failed", self.name, exc_info=True)
            self._sending = False

    async def _deliver(self, event: EventData) -> None:
        """Send one event with retries; it ends sent or counted in dropped."""
        try:
            body = encode_event(event)
        except (TypeError, ValueError) as exc:
            self.dropped["invalid"] += 1
            self.log_limited("invalid", "%s: event dropped: %s", self.name, short_error(exc))
            return
        kind = _HEADER_SAFE.sub("_", str(event.get("type", "")))[:64] or "unknown"
        for attempt in range(1, self.max_attempts + 1):
            outcome, retry_after = await self._attempt(body, kind)
            self._note(outcome)
            if outcome == "sent":
                self.sent += 1
                return
            self.failures += 1
            if outcome == "rejected":
                self.dropped["rejected"] += 1
                self.log_limited(
                    "rejected", "%s: event %s rejected: %s", self.name, kind, self.last_error
                )
                return
            if attempt == self.max_attempts:
                self.dropped["failed"] += 1
                self.log_limited(
                    "failed",
                    "%s: event %s dropped after %d attempts: %s",
                    self.name,
                    kind,
                    attempt,
                    self.last_error,
                )
                return
            await asyncio.sleep(self._delay(attempt, retry_after))  # backoff, not synchronisation

    def _note(self, outcome: Outcome) -> None:
        """connected is whether the last attempt succeeded; a change is logged once."""
        self.connected = outcome == "sent"
        if not self.connected and not self._warned:
            self._warned = True
            logger.warning(
                "%s: delivery failing (%s); retrying with backoff", self.name, self.last_error
            )
        elif self.connected and self._warned:
            self._warned = False
            logger.info("%s: delivering again", self.name)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        delay = min(self.backoff_s * 2.0 ** (attempt - 1), self.backoff_max_s)
        # Jitter: targets that failed together do not all come back at the same moment.
        return delay * random.uniform(0.5, 1.0)

    async def _attempt(self, body: bytes, kind: str) -> tuple[Outcome, float | None]:
        """One POST, bounded by timeout_s as a whole; sets last_error when it does not succeed."""
        assert self._client is not None
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "X-Vision-Daemon-Event": kind,
            "X-Vision-Daemon-Timestamp": str(timestamp),
        }
        if self._secret is not None:
            headers["X-Vision-Daemon-Signature"] = sign(self._secret, timestamp, body)
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self._client.stream("POST", self._url, content=body, headers=headers) as resp,
            ):
                read = 0
                async for chunk in resp.aiter_raw():  # a little, so small answers free the
                    read += len(chunk)  # connection for reuse; never a large one whole
                    if read >= MAX_BODY_READ:
                        break
                status, retry_after = resp.status_code, resp.headers.get("Retry-After")
        except (TimeoutError, httpx.TimeoutException):
            self.last_error = f"timed out after {self.timeout_s:g} s"
            return "retry", None
        except Exception as exc:  # connection refused, reset, TLS, protocol errors
            self.last_error = self._scrub(short_error(exc))
            return "retry", None
        if 200 <= status < 300:
            return "sent", None
        self.last_error = f"HTTP {status}"
        if status in (408, 429) or status >= 500:
            return "retry", retry_after_s(retry_after)
        return "rejected", None

    def _scrub(self, text: str) -> str:
        """An error line without the URL's path, query or user info (they may hold tokens)."""
        parts = urlsplit(self._url)
        for secret in (self._url, parts.path, parts.query, parts.netloc):
            if len(secret) > 1:
                text = text.replace(secret, "***")
        return text
