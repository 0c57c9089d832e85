"""Connections that have not spoken yet, and who makes room for a new one when there are too many.

A pool of silent connections that turns newcomers away once full is a lock anyone can hold by
opening sockets and saying nothing (issue 27: 300 re-opened sockets kept every camera out). So
when the pool is full a silent connection is closed for the new one, oldest first: a peer that
speaks at once always gets in, and silent sockets only churn among themselves. A connection whose
next bytes have arrived but are not read yet is not silent (`speaking`, which the transport
answers): it is about to be served, whatever its age.

Who pays: while the pool is full, an address holding `per_address` of it or more makes the room
(the newcomer's own address if it holds that many, else the address holding most), so a flood
from one address only ever closes its own connections, never another address's client that is
slow to say hello; when no address holds that many, the pool's oldest silent connection goes. The
victim is that address's oldest silent connection, not the newcomer: refusing the newcomer would
let a peer that holds its share of silent sockets lock out every other client behind the same
address (a NAT, the host's other programs) until their timeout. The newcomer is refused only when
the first `SCAN` candidates are all speaking (they leave the pool in a moment).

The per-address cap binds only while the pool is full. Enforced always, it would close
connections of one host's burst that the pool has room for: 64 clients connecting at once from
one process, each saying hello a few milliseconds after its connect, lost 32 of them to a cap of
32, and none to the pool alone.

`PendingPool` is the policy (no sockets, no clocks); `unread_bytes` is the one question it asks
the kernel. The TCP ingest and the HTTP server each keep one.
"""

from __future__ import annotations

import fcntl
import socket
import sys
import termios
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from itertools import islice
from typing import Generic, TypeVar

T = TypeVar("T")
SCAN = 32  # candidates looked at per new connection: bounded work, even when all are speaking
# Before any of this, the kernel queues connections not yet accepted; past this queue a client's
# SYN is dropped and its connect waits a second for the retry. uvicorn's default, on both planes.
LISTEN_BACKLOG = 2048


class Full(Enum):
    """Which rule chose the connection that makes room (or refuses the newcomer)."""

    ADDRESS = "per_address"
    POOL = "pool"


class PendingPool(Generic[T]):
    """Silent connections, oldest first, with how many each source address holds."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._all: dict[T, str] = {}  # connection -> address; insertion order is age
        self._by_address: dict[str, dict[T, None]] = {}
        self._heavy: set[str] = set()  # addresses holding per_address or more

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, conn: object) -> bool:
        return conn in self._all

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._all))

    def held_by(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def add(self, conn: T, address: str) -> None:
        """`conn` starts waiting (again): it is the youngest now."""
        self.discard(conn)
        self._all[conn] = address
        mine = self._by_address.setdefault(address, {})
        mine[conn] = None
        if len(mine) >= self.per_address:
            self._heavy.add(address)

    def discard(self, conn: T) -> None:
        """`conn` spoke, was closed or left: it no longer counts."""
        address = self._all.pop(conn, None)
        if address is None:
            return
        mine = self._by_address[address]
        del mine[conn]
        if len(mine) < self.per_address:
            self._heavy.discard(address)
        if not mine:
            del self._by_address[address]

    def make_room(
        self, address: str, full: bool, speaking: Callable[[T], bool]
    ) -> tuple[T | None, Full | None]:
        """Before a new connection from `address` joins a pool that is `full` (the caller's own
        cap: TCP, the pool's size; HTTP, every connection, busy ones too): the connection to
        close, already out of the pool, and the rule that chose it; (None, rule) when every
        candidate is speaking and the newcomer must be refused; (None, None) when not full."""
        if not full:
            return None, None
        payer = (
            address if address in self._heavy else max(self._heavy, key=self.held_by, default=None)
        )
        candidates: Iterable[T] = self._all if payer is None else self._by_address[payer]
        rule = Full.POOL if payer is None else Full.ADDRESS
        for conn in list(islice(candidates, SCAN)):
            if not speaking(conn):
                self.discard(conn)
                return conn, rule
        return None, rule


def unread_bytes(sock: socket.socket | None) -> int:
    """Bytes that arrived on `sock` and are still in the kernel, not read by anyone (FIONREAD;
    0 when it cannot tell). No library asks this; it is one ioctl."""
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    except (OSError, ValueError):
        return 0
    return int.from_bytes(answer, sys.byteorder, signed=True)
