"""Fan-out of results (and events) to /ws subscribers, each with a bounded queue.

Each message is encoded to JSON once, for every subscriber (`publish` takes the text); a slow
subscriber loses its oldest messages, never slows the publisher, and subscribers are capped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Subscriber:
    """A slow subscriber loses its oldest messages (counted); it never slows the publisher."""

    streams: frozenset[str]  # empty = all
    maxlen: int
    every: int = 1  # deliver every Nth matching result
    min_interval_s: float = 0.0  # max_fps thinning
    peer: str = ""
    kinds: frozenset[str] = frozenset({"result"})  # "result" and/or "event"
    queue: deque[str] = field(init=False)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    sending: int = 0  # taken from the queue, being written to the socket
    dropped: int = 0
    _matched: int = 0
    _last: float = float("-inf")

    def __post_init__(self) -> None:
        self.queue = deque()

    def offer(self, stream: str, text: str, now: float, kind: str = "result") -> None:
        if kind not in self.kinds or (self.streams and stream not in self.streams):
            return
        if kind == "result" and not self._thinned_in(now):  # events are never thinned
            return
        if len(self.queue) >= self.maxlen:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(text)
        self.event.set()

    def _thinned_in(self, now: float) -> bool:
        self._matched += 1
        if (self._matched - 1) % self.every:
            return False
        if now - self._last < self.min_interval_s:
            return False
        self._last = now
        return True

    closed: bool = False

    async def next_batch(self) -> list[str] | None:
        """The queued messages, or None once the daemon is shutting down."""
        await self.event.wait()
        self.event.clear()
        if self.closed:
            return None
        batch = list(self.queue)
        self.queue.clear()
        return batch


class Hub:
    def __init__(self, max_subscribers: int = 64) -> None:
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self.dropped_total = 0  # from subscribers that have left
        self.refused = 0  # subscribers turned away at the cap
        self.closed = False

    def add(self, sub: Subscriber) -> bool:
        """Admit a subscriber unless the cap is reached or the daemon stops (caller closes it)."""
        if self.closed or len(self.subscribers) >= self.max_subscribers:
            self.refused += 1
            return False
        self.subscribers.add(sub)
        return True

    def publish(self, stream: str, text: str, now: float, kind: str = "result") -> None:
        for sub in self.subscribers:
            sub.offer(stream, text, now, kind)

    def close(self) -> None:
        """Shutdown: wake every subscriber so its handler closes the socket itself."""
        self.closed = True
        for sub in self.subscribers:
            sub.closed = True
            sub.event.set()

    @property
    def dropped(self) -> int:
        """Messages lost by slow subscribers, including those that have left."""
        return self.dropped_total + sum(s.dropped for s in self.subscribers)

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.dropped_total += sub.dropped

    def snapshot(self) -> dict[str, object]:
        return {
            "subscribers": len(self.subscribers),
            "max_subscribers": self.max_subscribers,
            "refused": self.refused,
            "dropped": self.dropped,
            "clients": [
                {
                    "peer": s.peer,
                    "streams": sorted(s.streams),
                    "kinds": sorted(s.kinds),
                    "sent": s.sent,
                    "dropped": s.dropped,
                    "queued": len(s.queue),
                    "sending": s.sending,
                }
                for s in self.subscribers
            ],
        }
