"""Wire protocol: framing (4-byte big-endian length + one msgpack map) and message validation.

Pure functions and plain data only: no sockets, no clocks. See docs/PROTOCOL.md.

Longer than most modules (about 410 lines) because it is docs/PROTOCOL.md in code: the error
codes, the limits, each message's type and its validation stay in one file, so the document has
one counterpart to be checked against.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

import msgpack

from vision_daemon import options
from vision_daemon.options import StreamOptions as StreamOptions

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

# fullmatch, not match + "$": "$" also matches before a trailing newline ("cam\n").
STREAM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")
ENCODINGS = ("jpeg", "png", "raw", "shm")

# Shared-memory ingest (docs/PROTOCOL.md, "Shared-memory frames"): a POSIX shm segment's name as
# it appears in /dev/shm (no slash, no leading dot), its header, and the bounds on its ring.
SHM_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
SHM_MAGIC = b"VDSHM001"
SHM_TOKEN_BYTES = 16
SHM_HEADER_BYTES = 4096  # magic, token, then zeros; slot 0 starts on the next page
MAX_SHM_SLOTS = 256

# Error codes sent in {"type": "error", "code": ...}. `fatal` ones close the connection.
E_TOO_LARGE = "message_too_large"
E_BAD_LENGTH = "bad_length"
E_BAD_MSGPACK = "bad_msgpack"
E_NOT_A_MAP = "not_a_map"
E_INVALID = "invalid"
E_UNKNOWN_TYPE = "unknown_type"
E_BAD_STREAM_NAME = "bad_stream_name"
E_DECODE = "decode_error"
E_IMAGE_TOO_LARGE = "image_too_large"
E_UNAUTHORIZED = "unauthorized"
E_BAD_VERSION = "unsupported_version"
E_DETECTOR = "detector_error"
E_BACKEND = "backend_error"  # a remote inference endpoint failed, or every one is down
E_LIMIT = "limit_exceeded"
E_HELLO_TIMEOUT = "hello_timeout"
E_IDLE_TIMEOUT = "idle_timeout"
E_SLOW_CONSUMER = "slow_consumer"
E_NOT_BINARY = "not_binary"  # WebSocket ingest: a text message where a binary one is expected
E_SHM = "shm_error"  # a shared-memory segment or slot the server will not read (always fatal)

# Bounds on what one msgpack body may make the decoder build, so decoding costs O(bytes) of
# payload copies and a few thousand small objects at most, whatever the peer sends: the event
# loop decodes bodies itself (a thread hand-off per frame would cost more than this bound does).
MAX_ARRAY_LEN = 64  # the longest array in the protocol is a raw frame's shape (3)
MAX_CONTAINERS = 256  # maps and arrays in one body (a frame has 1-2, a hello 2 + its streams)
MAX_STR_LEN = 4096  # stream names, client names, tokens
MAX_CLIENT_NAME = 128


class ProtocolError(Exception):
    """A message the server refuses; `fatal` means the connection cannot be trusted any more."""

    def __init__(
        self, code: str, message: str, *, frame_id: int | None = None, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Frame:
    stream_name: str
    frame_id: int
    timestamp: float
    image: bytes
    encoding: str  # "jpeg" | "png" | "raw"; JPEG and PNG are told apart by their magic bytes
    shape: tuple[int, int, int] | None = None
    # An image already decoded to a BGR uint8 array (pulled RTSP/file cameras), or a read-only
    # view of a shared-memory slot the ingest validated; `image` is then empty and the worker
    # uses these pixels as they are. Never set by parse_message.
    pixels: Any = None
    slot: int | None = None  # encoding "shm": the slot of the client's segment holding the pixels

    @property
    def nbytes(self) -> int:
        """What the frame holds in memory (for max_queued_mb)."""
        return len(self.image) if self.pixels is None else int(self.pixels.nbytes)


@dataclass(frozen=True, slots=True)
class ShmRing:
    """A shared-memory ring a client announced in its hello (checked against the segment later)."""

    name: str
    slots: int
    slot_bytes: int
    token: bytes

    @property
    def size(self) -> int:
        """Bytes the server maps: the header, then every slot."""
        return SHM_HEADER_BYTES + self.slots * self.slot_bytes


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    client: str
    token: str | None
    options: StreamOptions
    stream_options: dict[str, StreamOptions] = field(default_factory=dict)
    dropped_notices: bool = False
    shm: ShmRing | None = None
    rate_advice: bool = False  # send `rate` messages with the fps the server will serve


@dataclass(frozen=True, slots=True)
class Bye:
    pass


Message = Frame | Hello | Bye


def pack(msg: Mapping[str, object]) -> bytes:
    """One length-prefixed msgpack message, ready for the socket."""
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def read_length(header: bytes, max_message_bytes: int) -> int:
    """Validate a 4-byte length header; framing errors are fatal (the stream is out of sync)."""
    n: int = HEADER.unpack(header)[0]
    if n == 0:
        raise ProtocolError(E_BAD_LENGTH, "message length is 0", fatal=True)
    if n > max_message_bytes:
        raise ProtocolError(
            E_TOO_LARGE,
            f"message of {n} bytes exceeds max_message_bytes={max_message_bytes}",
            fatal=True,
        )
    return n


class _ContainerBudget:
    """msgpack hook that refuses a body once it has built MAX_CONTAINERS maps and arrays."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"more than {MAX_CONTAINERS} maps and arrays")
        return obj


def unpack_body(body: bytes, max_map_len: int = 64) -> dict[str, object]:
    """Decode one msgpack body into a map, within bounds; the framing is intact: not fatal.

    Every length a peer declares is checked against a limit before msgpack allocates for it,
    and the number of containers is capped, so a 16 MiB body of empty maps costs microseconds.
    """
    budget = _ContainerBudget()
    try:
        # strict_map_key=False: keys are checked below; raw=False: str keys and values as text.
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            max_str_len=MAX_STR_LEN,
            max_bin_len=len(body),
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=max(max_map_len, 16),
            max_ext_len=0,
            object_hook=budget,
            list_hook=budget,
        )
    except msgpack.ExtraData:
        raise ProtocolError(E_BAD_MSGPACK, "body holds more than one msgpack object") from None
    except Exception as exc:  # msgpack raises several types (ValueError, StackError, ...)
        detail = str(exc)[:120]  # msgpack's own words, never the peer's bytes
        if "exceeds max_" in detail or "maps and arrays" in detail:
            raise ProtocolError(E_LIMIT, f"message over a decoding limit: {detail}") from None
        raise ProtocolError(E_BAD_MSGPACK, f"body is not valid msgpack: {detail}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_NOT_A_MAP, f"message must be a msgpack map, got {type(obj).__name__}")
    return obj


def _frame_id_of(obj: Mapping[str, object]) -> int | None:
    fid = obj.get("frame_id")
    return fid if isinstance(fid, int) and not isinstance(fid, bool) else None


def _require(obj: Mapping[str, object], key: str, types: tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, types):
        raise ProtocolError(E_INVALID, f"field '{key}' must be {what}", frame_id=_frame_id_of(obj))
    return value


def validate_stream_name(name: Any, frame_id: int | None = None) -> str:
    if not isinstance(name, str) or not STREAM_NAME_RE.fullmatch(name):
        raise ProtocolError(
            E_BAD_STREAM_NAME,
            "stream_name must be 1-64 characters of letters, digits and _ . : - "
            "starting with a letter or digit",
            frame_id=frame_id,
        )
    return name


def parse_options(raw: Any) -> StreamOptions:
    """A hello's options map (vision_daemon/options.py declares and checks each option)."""
    if raw is None:
        return StreamOptions()
    if not isinstance(raw, dict):
        raise ProtocolError(E_INVALID, "stream options must be a map")
    try:
        return options.parse(raw)
    except options.OptionError as exc:
        raise ProtocolError(E_INVALID, str(exc)) from None


def _opt(obj: Mapping[str, object], key: str, default: Any) -> Any:
    """An optional field: absent and nil both mean the default."""
    value = obj.get(key)
    return default if value is None else value


def parse_message(obj: Mapping[str, object], max_streams: int = 64) -> Message:
    """Validate a decoded map into a typed message, or raise ProtocolError (not fatal)."""
    mtype = obj.get("type")
    if mtype == "frame":
        return _parse_frame(obj)
    if mtype == "hello":
        return _parse_hello(obj, max_streams)
    if mtype == "bye":
        return Bye()
    raise ProtocolError(  # the peer's value is not echoed back: it may be anything, any size
        E_UNKNOWN_TYPE,
        "unknown message type; expected frame, hello or bye",
        frame_id=_frame_id_of(obj),
    )


def _parse_frame(obj: Mapping[str, object]) -> Frame:
    frame_id = _require(obj, "frame_id", (int,), "an integer")
    name = validate_stream_name(obj.get("stream_name"), frame_id)
    timestamp = _opt(obj, "timestamp", 0.0)
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int | float)
        or not math.isfinite(timestamp)
    ):
        raise ProtocolError(
            E_INVALID, "field 'timestamp' must be a finite number", frame_id=frame_id
        )
    encoding = _opt(obj, "encoding", "jpeg")
    if encoding not in ENCODINGS:
        raise ProtocolError(
            E_INVALID, f"encoding must be one of {', '.join(ENCODINGS)}", frame_id=frame_id
        )
    if encoding == "shm":  # pixels in a slot of the client's segment; checked by the ingest
        slot = _require(obj, "slot", (int,), "an integer (the slot number)")
        return Frame(
            name, frame_id, float(timestamp), b"", "shm", _shape(obj, frame_id, "shm"), slot=slot
        )
    image = _require(obj, "image", (bytes,), "binary (msgpack bin)")
    shape: tuple[int, int, int] | None = None
    if encoding == "raw":
        shape = _shape(obj, frame_id, "raw")
        h, w, c = shape
        if len(image) != h * w * c:
            raise ProtocolError(
                E_INVALID,
                f"raw image has {len(image)} bytes, shape {[h, w, c]} needs {h * w * c}",
                frame_id=frame_id,
            )
    return Frame(name, frame_id, float(timestamp), image, encoding, shape)


def _shape(obj: Mapping[str, object], frame_id: int, encoding: str) -> tuple[int, int, int]:
    raw_shape = obj.get("shape")
    if (
        not isinstance(raw_shape, list | tuple)
        or len(raw_shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw_shape)
        or raw_shape[2] != 3
        or raw_shape[0] <= 0
        or raw_shape[1] <= 0
    ):
        raise ProtocolError(
            E_INVALID, f"{encoding} frames need shape [height, width, 3]", frame_id=frame_id
        )
    return (raw_shape[0], raw_shape[1], raw_shape[2])


def _parse_shm(raw: Any) -> ShmRing:
    """A hello's `shm` map; what the segment itself holds is checked by the ingest (fatal)."""
    if not isinstance(raw, dict):
        raise ProtocolError(E_SHM, "hello 'shm' must be a map", fatal=True)
    name, slots, slot_bytes, token = (raw.get(k) for k in ("name", "slots", "slot_bytes", "token"))
    if not isinstance(name, str) or not SHM_NAME_RE.fullmatch(name):
        raise ProtocolError(
            E_SHM,
            "shm 'name' must be 1-128 characters of letters, digits and _ . - "
            "(not starting with a dot), as it appears in /dev/shm",
            fatal=True,
        )
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SHM_SLOTS:
        raise ProtocolError(
            E_SHM, f"shm 'slots' must be an integer in 1..{MAX_SHM_SLOTS}", fatal=True
        )
    if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
        raise ProtocolError(E_SHM, "shm 'slot_bytes' must be a positive integer", fatal=True)
    if not isinstance(token, bytes) or len(token) != SHM_TOKEN_BYTES:
        raise ProtocolError(
            E_SHM, f"shm 'token' must be {SHM_TOKEN_BYTES} bytes (msgpack bin)", fatal=True
        )
    return ShmRing(name, slots, slot_bytes, token)


def _parse_hello(obj: Mapping[str, object], max_streams: int) -> Hello:
    version = _opt(obj, "version", PROTOCOL_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError(E_INVALID, "hello 'version' must be an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            E_BAD_VERSION,
            f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}",
            fatal=True,
        )
    client = _opt(obj, "client", "")
    token = obj.get("token")
    if not isinstance(client, str) or (token is not None and not isinstance(token, str)):
        raise ProtocolError(E_INVALID, "hello 'client' and 'token' must be strings")
    options = parse_options(obj.get("options"))
    raw_streams = obj.get("streams") or {}
    if not isinstance(raw_streams, dict):
        raise ProtocolError(E_INVALID, "hello 'streams' must be a map of stream name to options")
    if len(raw_streams) > max_streams:
        raise ProtocolError(
            E_LIMIT,
            f"hello names {len(raw_streams)} streams; max_streams_per_connection={max_streams}",
        )
    per_stream = {
        validate_stream_name(name): parse_options(opts) for name, opts in raw_streams.items()
    }
    notices = _opt(obj, "dropped_notices", False)
    if not isinstance(notices, bool):
        raise ProtocolError(E_INVALID, "hello 'dropped_notices' must be a boolean")
    shm = None if obj.get("shm") is None else _parse_shm(obj["shm"])
    advice = _opt(obj, "rate_advice", False)
    if not isinstance(advice, bool):
        raise ProtocolError(E_INVALID, "hello 'rate_advice' must be a boolean")
    return Hello(
        version, client[:MAX_CLIENT_NAME], token, options, per_stream, notices, shm, advice
    )


class Limits(TypedDict):
    """The bounds a welcome tells the client (docs/PROTOCOL.md, "welcome")."""

    max_message_bytes: int
    max_image_pixels: int
    max_streams_per_connection: int
    queue_depth: int
    max_frame_age_ms: float
    send_buffer_messages: int


class Welcome(TypedDict):
    """The server's answer to a hello (`advised_fps` is added for clients that follow advice)."""

    type: str
    version: int
    server: str
    model: dict[str, object] | None
    limits: Limits


class ErrorMessage(TypedDict):
    """A refusal: its code, one line, and the frame it refuses if it was one."""

    type: str
    code: str
    message: str
    frame_id: NotRequired[int]


def error_message(code: str, message: str, frame_id: int | None = None) -> ErrorMessage:
    msg: ErrorMessage = {"type": "error", "code": code, "message": message}
    if frame_id is not None:
        msg["frame_id"] = frame_id
    return msg
