"""What every event output (MQTT, webhooks) promises the daemon, and the queue they share.

An output is handed analytics events and per-stream counts on the event loop thread; it never
blocks there and never raises into the caller. Every offered event is, at any moment, exactly one
of: sent, dropped (counted by reason), queued, or in flight, so

    offered == sent + sum(dropped[r] for r in EVENT_DROPS) + queued + in_flight

Drop reasons for events: ``queue_full`` (the oldest queued event made room for a new one),
``shutdown`` (still queued or in flight when stop() ran out of time, or offered after it),
``invalid`` (not JSON-serialisable), and for webhooks ``rejected`` (a 3xx or 4xx answer other than
408 and 429) and ``failed`` (every attempt failed). ``topic_limit`` (MQTT only) counts count values
refused past the cap on retained topics; it is about counts, not events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from vision_daemon.analytics import EventData, StreamCounts
from vision_daemon.log import RateLimiter, log_limited

T = TypeVar("T")

EVENT_DROPS = frozenset({"queue_full", "shutdown", "invalid", "rejected", "failed"})


class EventOutput(Protocol):
    """An event output: bounded, non-blocking on offer, bounded on stop, counted throughout."""

    name: str  # "mqtt" or "webhook:<host:port>": never a credential or a URL path
    sent: int
    dropped: Counter[str]

    def offer_event(self, event: EventData) -> None:
        """Queue an event (Event.to_dict()); on the loop thread, returns at once, never raises."""

    def offer_counts(self, stream: str, counts: StreamCounts) -> None:
        """Hand over a stream's latest StreamCounts; same rules as offer_event."""

    async def start(self) -> None:
        """Start delivering in the background; a target that is down is retried, not an error."""

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush for at most timeout_s; what is left is counted as dropped 'shutdown'."""

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state: name, connected, offered, sent, queued, in_flight, dropped, ..."""


class DropQueue(Generic[T]):
    """A FIFO of at most `maxlen` items; a new item past the bound pushes out the oldest, counted
    as dropped 'queue_full' in the owner's Counter (the one a Prometheus collector reads)."""

    def __init__(self, maxlen: int, dropped: Counter[str]) -> None:
        if maxlen < 1:
            raise ValueError(f"queue_max must be at least 1, got {maxlen}")
        self.maxlen = maxlen
        self._items: deque[T] = deque()
        self._dropped = dropped

    def put(self, item: T) -> bool:
        """Append an item; True when the oldest had to go to make room."""
        full = len(self._items) >= self.maxlen
        if full:
            self._items.popleft()
            self._dropped["queue_full"] += 1
        self._items.append(item)
        return full

    def put_front(self, items: Iterable[T]) -> None:
        """Return items (oldest first) to the head of the queue, e.g. after a lost connection;
        past the bound the oldest go, as with put()."""
        self._items.extendleft(reversed(list(items)))
        while len(self._items) > self.maxlen:
            self._items.popleft()
            self._dropped["queue_full"] += 1

    def popleft(self) -> T:
        return self._items.popleft()

    def drain(self, reason: str) -> int:
        """Drop everything still queued, counted under `reason`; returns how many."""
        n = len(self._items)
        self._items.clear()
        if n:
            self._dropped[reason] += n
        return n

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


def encode_event(event: EventData) -> bytes:
    """The event as compact UTF-8 JSON (raises TypeError or ValueError if it is not JSON)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def short_error(exc: BaseException) -> str:
    """One line naming the error, at most 200 characters (an empty message gives the type)."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line[:200]


class QueuedOutput:
    """The part both outputs share: the accounting, the bounded queue of events, offer_event and
    the common snapshot keys. Everything here runs on the event loop thread."""

    def __init__(self, name: str, queue_max: int, logger: logging.Logger) -> None:
        self.name = name
        self.sent = 0
        self.offered = 0  # accepted by offer_event (after any type filter)
        self.filtered = 0  # left out by a type filter: not offered, never counted as a drop
        self.failures = 0
        self.connected = False
        self.last_error: str | None = None
        self.dropped: Counter[str] = Counter()
        self.queue: DropQueue[EventData] = DropQueue(queue_max, self.dropped)
        self._stopping = False  # stop() has begun: offers are counted as dropped "shutdown"
        self._wake = asyncio.Event()  # set when there is something for the sender to do
        self._log = logger
        self._limiter = RateLimiter(burst=1, period_s=10.0, max_keys=16)

    @property
    def in_flight(self) -> int:
        return 0

    def wants(self, event: EventData) -> bool:
        """Whether this output takes events of this kind at all (a filter, not a drop)."""
        return True

    def offer_event(self, event: EventData) -> None:
        """Queue an event: O(1), no I/O, never raises; past queue_max the oldest is dropped."""
        try:
            if not self.wants(event):
                self.filtered += 1
                return
            self.offered += 1
            if self._stopping:
                self.dropped["shutdown"] += 1
            elif not isinstance(event, dict):
                self.dropped["invalid"] += 1
            else:
                if self.queue.put(event):
                    self.log_limited(
                        "queue_full",
                        "%s: queue full (%d), dropping the oldest events",
                        self.name,
                        self.queue.maxlen,
                    )
                self._wake.set()
        except Exception:  # nothing an output does may raise into the pipeline
            self.log_limited("offer", "%s: offer_event failed", self.name, exc_info=True)

    def log_limited(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        """A warning, at most one per key per 10 s (the rest are counted in the next one)."""
        log_limited(
            self._log,
            self._limiter,
            key,
            time.monotonic(),
            logging.WARNING,
            msg,
            *args,
            exc_info=exc_info,
        )

    def base_snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "connected": self.connected,
            "offered": self.offered,
            "filtered": self.filtered,
            "sent": self.sent,
            "queued": len(self.queue),
            "in_flight": self.in_flight,
            "queue_max": self.queue.maxlen,
            "dropped": dict(self.dropped),
            "failures": self.failures,
            "last_error": self.last_error,
        }
