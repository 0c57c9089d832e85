"""Shared-memory frames: a client's ring of slots, opened read-only once, each frame read once.

The client creates a POSIX shared-memory segment (`/dev/shm/<name>`), writes a header (magic and
a random token), announces the ring in its hello, then sends frames that name a slot and a shape
instead of carrying bytes. A slot belongs to the daemon from the frame that names it until the
message that ends that frame (its result or its `dropped` notice); only then may the client write
it again. `ShmRing` keeps that ownership for one connection and reads a slot's pixels, as the
frame arrives, into a read-only NumPy array of the daemon's own: one copy, by `preadv` on the
segment's file descriptor, straight into that array.

Why a copy and not a view of a mapping (issue 27): a mapped file that shrinks makes any read past
its new end fault (SIGBUS), which no Python code can catch, and the pixels of a mapped frame are
read later (by the motion gate, the detector, the dashboard's frame encoder), so a client that
truncates its segment while a frame is queued killed the daemon, owner check or not. `preadv` on
a file that shrank returns fewer bytes instead, and the frame is refused (a fatal `shm_error`).
The segment must still be a regular file owned by the daemon's user and writable by no one else.

`SharedMemory` is the connection's side of it (an `ingest.core.Attachment`): who may map a ring
(a same-host peer, one ring per connection, within max_shm_mb), and the release rule: the hello
maps, each shm frame takes a slot, its result or drop gives it back, the connection's end unmaps.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import time
from typing import Any

import numpy as np

from vision_daemon import protocol as p
from vision_daemon.ingest.core import Attachment
from vision_daemon.log import RateLimiter, log_limited, peer_host

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (shm_open names)


def _refuse(message: str, frame_id: int | None = None) -> p.ProtocolError:
    """A fatal shm_error; with the frame_id of a refused frame (counted received and dropped)."""
    return p.ProtocolError(p.E_SHM, message, frame_id=frame_id, fatal=True)


class ShmRing:
    """One connection's mapped segment and which of its slots the daemon holds."""

    def __init__(self, ring: p.ShmRing, max_bytes: int) -> None:
        """Open, check and map the segment, or raise a fatal `ProtocolError` (`shm_error`)."""
        self.ring = ring
        if ring.size > max_bytes:
            raise _refuse(
                f"segment of {ring.size} bytes ({ring.slots} slots of {ring.slot_bytes}) exceeds "
                f"max_shm_mb={max_bytes // 2**20}"
            )
        path = os.path.join(SHM_DIR, ring.name)
        try:  # O_NONBLOCK: a FIFO planted under that name must not block the event loop
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _refuse(
                f"cannot open shared memory {ring.name!r} ({exc.strerror or exc}); create it "
                "before the hello (POSIX shm, e.g. multiprocessing.shared_memory)"
            ) from None
        self.fd: int | None = fd
        try:
            self._check(os.fstat(fd))
            header = os.pread(fd, len(p.SHM_MAGIC) + p.SHM_TOKEN_BYTES, 0)
        except (OSError, p.ProtocolError) as exc:
            self.close()
            if isinstance(exc, p.ProtocolError):
                raise
            raise _refuse(
                f"cannot read shared memory {ring.name!r} ({exc.strerror or exc})"
            ) from None
        magic, token = header[: len(p.SHM_MAGIC)], header[len(p.SHM_MAGIC) :]
        if magic != p.SHM_MAGIC or not hmac.compare_digest(token, ring.token):
            self.close()
            raise _refuse(
                f"segment {ring.name!r} does not start with this client's magic and token: "
                "it is not this client's segment"
            )
        self.held: dict[int, tuple[str, int]] = {}  # slot -> (stream, frame_id)
        self.slot_of: dict[tuple[str, int], int] = {}

    def _check(self, st: os.stat_result) -> None:
        ring = self.ring
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(f"{ring.name!r} is not a shared-memory segment (not a regular file)")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise _refuse(
                f"segment {ring.name!r} must belong to the daemon's user and be writable by no "
                "one else (mode 0600, as multiprocessing.shared_memory creates it)"
            )
        if st.st_size < ring.size:
            raise _refuse(
                f"segment {ring.name!r} has {st.st_size} bytes; {ring.slots} slots of "
                f"{ring.slot_bytes} bytes need {ring.size} (header {p.SHM_HEADER_BYTES})"
            )

    def frame(self, frame: p.Frame) -> p.Frame:
        """The frame with its slot's pixels read into a read-only array; the slot is now held.

        Every lie is fatal: a slot out of range, a shape larger than a slot, a slot or a frame id
        the daemon still holds, a segment that shrank.
        """
        ring, slot, shape = self.ring, frame.slot, frame.shape
        assert slot is not None and shape is not None  # parse_message sets both for "shm"
        if not 0 <= slot < ring.slots:
            raise _refuse(
                f"slot {slot} is out of range (the ring has {ring.slots} slots)", frame.frame_id
            )
        h, w, c = shape
        if h * w * c > ring.slot_bytes:
            raise _refuse(
                f"shape {[h, w, c]} needs {h * w * c} bytes; a slot has {ring.slot_bytes}",
                frame.frame_id,
            )
        if slot in self.held:
            raise _refuse(
                f"slot {slot} is still the daemon's (frame {self.held[slot][1]}): wait for its "
                "result or dropped notice before writing it again",
                frame.frame_id,
            )
        key = (frame.stream_name, frame.frame_id)
        if key in self.slot_of:
            raise _refuse(
                f"frame {frame.frame_id} of {frame.stream_name} is already in flight",
                frame.frame_id,
            )
        assert self.fd is not None, "frames come only while the ring is open"
        offset = p.SHM_HEADER_BYTES + slot * ring.slot_bytes
        pixels: Any = np.empty(shape, np.uint8)
        try:  # a file that shrank gives fewer bytes: it never faults, unlike a mapping
            got = os.preadv(self.fd, [pixels], offset)
        except OSError as exc:
            raise _refuse(
                f"cannot read slot {slot} ({exc.strerror or exc})", frame.frame_id
            ) from None
        if got < h * w * c:
            raise _refuse(f"segment {ring.name!r} shrank below {ring.size} bytes", frame.frame_id)
        pixels.flags.writeable = False
        self.held[slot] = key
        self.slot_of[key] = slot
        return p.Frame(
            frame.stream_name, frame.frame_id, frame.timestamp, b"", "shm", shape, pixels, slot
        )

    def release(self, stream: str, frame_id: int) -> None:
        """The frame's result or drop is on its way to the client: its slot is the client's."""
        slot = self.slot_of.pop((stream, frame_id), None)
        if slot is not None:
            del self.held[slot]

    def close(self) -> None:
        """Close the segment's descriptor (frames read from it own their pixels)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class SharedMemory(Attachment):
    """A stream-socket connection's shared-memory ring, once its hello mapped one."""

    def __init__(self, peer: str, same_host: bool, max_mb: int, log_limit: RateLimiter) -> None:
        super().__init__("shm frames need a hello that announced a segment")
        self.peer = peer
        self.same_host = same_host
        self.max_mb = max_mb
        self.log_limit = log_limit
        self.ring: ShmRing | None = None

    @property
    def lossless(self) -> bool:
        """A mapped ring's client learns from results and drops that a slot is free again."""
        return self.ring is not None

    @property
    def mapped_bytes(self) -> int:
        return self.ring.ring.size if self.ring is not None else 0

    def attach(self, hello: p.Hello) -> None:
        """Map the segment a hello announced (once per connection), or raise a fatal refusal."""
        ring = hello.shm
        if ring is None:
            return
        why = None
        if self.max_mb == 0:
            why = "shared-memory ingest is off on this server (max_shm_mb = 0)"
        elif not self.same_host:
            why = "shared memory needs the Unix socket or a loopback connection"
        elif self.ring is not None:
            why = "this connection has mapped its segment already; one per connection"
        if why is not None:
            raise _refuse(why)
        self.ring = ShmRing(ring, self.max_mb * 2**20)
        log_limited(  # a peer reconnecting in a loop must not flood the log
            log,
            self.log_limit,
            "shm:" + peer_host(self.peer),
            time.monotonic(),
            logging.INFO,
            "%s mapped shared memory %s: %d slots of %d bytes",
            self.peer,
            ring.name,
            ring.slots,
            ring.slot_bytes,
        )

    def frame(self, frame: p.Frame) -> p.Frame:
        """An shm frame with its pixels read from its slot (now held); others as they are."""
        if frame.encoding != "shm" or self.ring is None:
            return super().frame(frame)
        return self.ring.frame(frame)

    def release(self, stream: str, frame_id: int) -> None:
        if self.ring is not None:
            self.ring.release(stream, frame_id)

    def close(self) -> None:
        """The segment's descriptor closed; nothing kept after."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
