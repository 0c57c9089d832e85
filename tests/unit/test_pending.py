"""Who makes room in a full pool of connections that have not spoken: the policy without sockets
(`pending.PendingPool`), and the kernel question it asks (`unread_bytes`) on a socketpair."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from vision_daemon.pending import SCAN, Full, PendingPool, unread_bytes


def silent(_: str) -> bool:
    return False


def pool_of(per_address: int, *conns: tuple[str, str]) -> PendingPool[str]:
    """A pool holding (connection, address) pairs, oldest first."""
    pool: PendingPool[str] = PendingPool(per_address)
    for conn, address in conns:
        pool.add(conn, address)
    return pool


def test_a_full_pool_closes_its_oldest_silent_connection_for_a_newcomer() -> None:
    """Full, no address over its share: the oldest silent connection goes, whoever comes."""
    pool = pool_of(8, ("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3"))
    assert pool.make_room("10.0.0.9", True, silent) == ("a", Full.POOL)
    assert "a" not in pool and len(pool) == 2


def test_a_connection_whose_bytes_arrived_is_never_the_one_closed() -> None:
    """A speaking connection is skipped, however old; when all are speaking the newcomer is refused."""
    pool = pool_of(8, ("a", "10.0.0.1"), ("b", "10.0.0.2"))
    assert pool.make_room("10.0.0.9", True, lambda c: c == "a") == ("b", Full.POOL)
    assert pool.make_room("10.0.0.9", True, lambda c: True) == (None, Full.POOL)
    assert list(pool) == ["a"]


def test_a_pool_with_room_closes_nothing_whatever_one_address_holds() -> None:
    """Not full: no room to make, even for an address far past its share (a host's burst)."""
    pool = pool_of(2, *((f"c{i}", "10.0.0.1") for i in range(5)))
    assert pool.make_room("10.0.0.1", False, silent) == (None, None)
    assert len(pool) == 5 and pool.held_by("10.0.0.1") == 5


def test_a_flooding_address_pays_for_every_newcomer_once_the_pool_is_full() -> None:
    """The heaviest address over its share loses its own oldest, never another address's client
    that is slow to say hello, whoever the newcomer is."""
    pool = pool_of(
        3, ("slow", "10.0.0.2"), ("f1", "10.0.0.1"), ("f2", "10.0.0.1"), ("f3", "10.0.0.1")
    )
    assert pool.make_room("10.0.0.2", True, silent) == ("f1", Full.ADDRESS)
    pool.add("f4", "10.0.0.1")
    assert pool.make_room("10.0.0.1", True, silent) == ("f2", Full.ADDRESS)
    assert "slow" in pool


def test_the_newcomers_own_address_pays_before_a_heavier_one() -> None:
    """A newcomer from an address at its share closes that address's oldest, not the heaviest's."""
    pool = pool_of(2, ("a1", "A"), ("b1", "B"), ("b2", "B"), ("b3", "B"), ("a2", "A"))
    assert pool.make_room("A", True, silent) == ("a1", Full.ADDRESS)
    assert pool.make_room("C", True, silent) == ("b1", Full.ADDRESS)


def test_a_connection_that_waits_again_is_the_youngest() -> None:
    """Added again (an HTTP keep-alive after its response), a connection goes to the back."""
    pool = pool_of(8, ("a", "A"), ("b", "B"))
    pool.add("a", "A")
    assert list(pool) == ["b", "a"] and pool.held_by("A") == 1
    assert pool.make_room("C", True, silent) == ("b", Full.POOL)


def test_the_search_for_a_silent_connection_is_bounded() -> None:
    """Only the first SCAN candidates are asked; past them the newcomer is refused."""
    pool = pool_of(10**6, *((f"s{i}", f"10.0.{i}.1") for i in range(SCAN)), ("late", "10.9.9.9"))
    asked: list[str] = []

    def speaking(conn: str) -> bool:
        asked.append(conn)
        return conn != "late"

    assert pool.make_room("new", True, speaking) == (None, Full.POOL)
    assert len(asked) == SCAN and "late" in pool


@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.lists(st.tuples(st.sampled_from("ABCD"), st.booleans()), max_size=80),
)
def test_the_pool_never_grows_past_its_size_and_only_heavy_addresses_pay(
    per_address: int, size: int, arrivals: list[tuple[str, bool]]
) -> None:
    """Newcomers from a few addresses (some speaking) into a pool of `size`: it never holds more;
    an address that pays holds its share; the counts per address add up."""
    pool: PendingPool[int] = PendingPool(per_address)
    speaking: set[int] = set()
    for n, (address, talks) in enumerate(arrivals):
        held = {a: pool.held_by(a) for a in "ABCD"}
        victim, rule = pool.make_room(address, len(pool) >= size, lambda c: c in speaking)
        if rule is not None and victim is None:
            continue  # refused: every candidate was speaking
        if rule is Full.ADDRESS:
            assert victim is not None
            payer = next(a for a in "ABCD" if held[a] and pool.held_by(a) == held[a] - 1)
            assert held[payer] >= per_address
        pool.add(n, address)
        if talks:
            speaking.add(n)
        assert len(pool) <= size
        assert sum(pool.held_by(a) for a in "ABCD") == len(pool)


def test_unread_bytes_counts_what_the_kernel_holds_for_nobody_yet() -> None:
    """On a socketpair: 0, then what was sent and not read, then 0 once read; 0 for a closed one."""
    a, b = socket.socketpair()
    with a, b:
        assert unread_bytes(b) == 0
        a.sendall(b"hello")
        assert unread_bytes(b) == 5
        b.recv(5)
        assert unread_bytes(b) == 0
    assert unread_bytes(b) == 0 and unread_bytes(None) == 0
