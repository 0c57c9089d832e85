"""Deadlines over whole socket exchanges: a camera's response head, MJPEG part or snapshot body
(ingest/http_sources.py), a remote detector's whole call (detectors/kserve.py).

A socket timeout (httpx's, http.client's) bounds each read, so a peer that trickles one byte a
second never times out. A `Deadline` bounds the whole exchange instead: the reader sets when it
must be done by (`expect`), and one watchdog thread shuts the socket down once that time passes
or the owner is stopped, which ends the blocked read or write at once. The watchdog looks ten
times a second and runs only while a deadline is registered, so an idle daemon has no extra
thread. `clear()` disarms under the deadline's lock: once it returns, the socket is never cut for
the time that was set (a kept-alive connection stays usable). For cameras the socket comes from
httpcore's `trace` extension as the connection is made; other owners set `sock` themselves.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from typing import Any

TICK_S = 0.1


class Deadline:
    """One owner's deadline: armed with `expect(seconds)`, disarmed with `clear()`."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop
        self._lock = threading.Lock()  # a cut and a disarm never interleave
        self.at = math.inf  # time.monotonic() by which the read must have progressed
        self.fired = False  # the watchdog cut the connection because `at` passed
        self.sock: socket.socket | None = None
        _watchdog.add(self)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: keep the socket of each new connection."""
        if event.endswith("connect_tcp.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                self.sock = sock

    def expect(self, within_s: float) -> None:
        self.at = time.monotonic() + within_s

    def clear(self) -> None:
        with self._lock:
            self.at = math.inf

    def close(self) -> None:
        _watchdog.discard(self)

    def _due(self, now: float) -> bool:
        return now >= self.at or (self.stop is not None and self.stop.is_set())

    def _cut(self, now: float) -> None:
        with self._lock:
            if not self._due(now):  # disarmed since the watchdog looked
                return
            self.fired = self.fired or now >= self.at
            self.at = math.inf
            sock, self.sock = self.sock, None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked call returns; owner closes
                except OSError:
                    pass  # already closed


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: set[Deadline] = set()
        self._thread: threading.Thread | None = None

    def add(self, d: Deadline) -> None:
        with self._lock:
            self._deadlines.add(d)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()

    def discard(self, d: Deadline) -> None:
        with self._lock:
            self._deadlines.discard(d)

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            with self._lock:
                if not self._deadlines:
                    self._thread = None
                    return
                due = [d for d in self._deadlines if d.sock is not None and d._due(now)]
            for d in due:
                d._cut(now)


_watchdog = _Watchdog()
