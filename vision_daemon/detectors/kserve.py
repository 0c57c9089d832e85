"""A small KServe v2 (Triton) HTTP client on http.client, with the binary tensor extension.

Why not tritonclient.http: it runs on gevent, whose hub in a worker thread held the GIL while it
waited for the server, so the daemon's event loop froze for the length of every remote call
(a 12 s first call ended a client with `hello_timeout`), and two workers waiting at once could
stall each other until their timeouts. The standard library's http.client blocks in plain sockets,
which release the GIL; httpx would too, but it took 180 ms for a call of the float32 format (4.9 MB
up, 2.8 MB down) that http.client makes in 45 ms here. gRPC endpoints keep tritonclient.grpc
(grpcio waits without the GIL).

The protocol (https://github.com/kserve/open-inference-protocol, binary data extension): a POST
to /v2/models/NAME/infer whose body is a JSON header, then each tensor's bytes in order; the JSON
length is in the `Inference-Header-Content-Length` header, both ways.

One deadline bounds a whole call (connect, send, every read), not each socket operation: a
server trickling its reply a byte a second would otherwise hold a worker for as long as it
likes, since every read makes progress. How: a watchdog (vision_daemon/deadlines.py, the one the
cameras use) shuts the socket down when the deadline passes, which ends the blocked read or
write at once, and the socket's own timeout is set to the time left before each request, which
bounds the connect (the watchdog has no socket yet) and any single read. Chosen over a total-time
check between reads with a short per-read timeout: http.client reads through a buffered file
that cannot be resumed after a socket timeout, so that would mean our own HTTP reader. Requests
made inside `call_deadline(s)` (on this thread) share its deadline: a detector call of several
requests, or a probe's three, is bounded as one. Replies are bounded too: 64 MiB in all, 1 MiB of
JSON, and every tensor's claimed shape must match its bytes before an array is made.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from vision_daemon.deadlines import Deadline

DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = "Inference-Header-Content-Length"
MAX_REPLY_BYTES = 64 * 2**20  # a float32 reply is 2.8 MB per image; past this it is refused
MAX_HEADER_BYTES = 2**20  # the JSON part of an inference reply (its tensors come as binary)


class TritonHttpError(RuntimeError):
    """The server answered with an error (its message, one line) or with a malformed reply."""


class RefusedReply(TritonHttpError):
    """A reply the client will not use: malformed, or past a bound (bytes, rows)."""


class CallTimeout(TimeoutError):
    """A call outlived its deadline (the whole call: connect, send and every read)."""


_thread = threading.local()


@contextmanager
def call_deadline(seconds: float) -> Iterator[None]:
    """Every request this thread makes inside shares one deadline, `seconds` from now (or the
    enclosing one's, if sooner)."""
    outer: tuple[float, float] | None = getattr(_thread, "deadline", None)
    at = time.monotonic() + seconds
    _thread.deadline = outer if outer is not None and outer[0] <= at else (at, seconds)
    try:
        yield
    finally:
        _thread.deadline = outer


def time_left(default_s: float) -> float:
    """Seconds left of this thread's call deadline (`default_s` outside one); CallTimeout once it
    has passed."""
    deadline: tuple[float, float] | None = getattr(_thread, "deadline", None)
    if deadline is None:
        return default_s
    at, budget = deadline
    left = at - time.monotonic()
    if left <= 0:
        raise CallTimeout(f"no whole reply within {budget:.1f} s")
    return left


def budget(default_s: float) -> float:
    """The whole time this thread's call was given (`default_s` outside one)."""
    deadline: tuple[float, float] | None = getattr(_thread, "deadline", None)
    return default_s if deadline is None else deadline[1]


class HttpTriton:
    """One endpoint's HTTP client (one kept-alive connection); not shared between threads.

    Each request ends by its deadline: this thread's `call_deadline`, else `timeout_s` from its
    start."""

    def __init__(self, netloc: str, timeout_s: float) -> None:
        host, _, port = netloc.rpartition(":")
        self._timeout_s = timeout_s
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def close(self) -> None:
        self._conn.close()

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        within = budget(self._timeout_s)
        guard = Deadline()
        try:
            guard.expect(time_left(self._timeout_s))
            if self._conn.sock is None:  # the connect, bounded by the socket's own timeout
                self._conn.timeout = time_left(self._timeout_s)
                self._conn.connect()
            sock = self._conn.sock
            sock.settimeout(time_left(self._timeout_s))  # no one read outlives the call either
            guard.sock = sock
            self._conn.request(method, path, body=body, headers=headers or {})
            r = self._conn.getresponse()
            content = r.read(MAX_REPLY_BYTES + 1)
            guard.clear()  # from here the watchdog leaves the socket alone
            if guard.fired:  # cut mid-read: what was read is a truncated reply
                raise CallTimeout(f"no whole reply within {within:.1f} s")
            if len(content) > MAX_REPLY_BYTES:
                raise RefusedReply(f"reply over {MAX_REPLY_BYTES // 2**20} MiB")
            return Reply(r.status, dict(r.getheaders()), content)
        except BaseException as exc:
            self._conn.close()  # a fresh connection next time
            if guard.fired or (isinstance(exc, TimeoutError) and not isinstance(exc, CallTimeout)):
                raise CallTimeout(f"no whole reply within {within:.1f} s") from None
            raise
        finally:
            guard.close()

    def _get(self, path: str) -> Reply:
        return self._request("GET", path)

    def is_server_live(self, **_: Any) -> bool:
        return self._get("/v2/health/live").status_code == 200

    def is_model_ready(self, model: str, **_: Any) -> bool:
        return self._get(f"/v2/models/{model}/ready").status_code == 200

    def get_model_config(self, model: str, **_: Any) -> dict[str, Any]:
        r = self._get(f"/v2/models/{model}/config")
        if r.status_code != 200:
            raise TritonHttpError(_message(r))
        config: dict[str, Any] = r.json()
        return config

    def get_model_repository_index(self, **_: Any) -> list[dict[str, Any]]:
        r = self._request("POST", "/v2/repository/index", b"{}")
        if r.status_code != 200:
            raise TritonHttpError(_message(r))
        index: list[dict[str, Any]] = r.json()
        return index

    def infer_arrays(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """Named arrays in, named arrays out (binary both ways)."""
        header: dict[str, Any] = {"inputs": [], "outputs": []}
        blobs = []
        for name, array in inputs.items():
            data = np.ascontiguousarray(array)
            if data.dtype not in NAMES:
                raise TypeError(f"input {name!r}: dtype {data.dtype} is not supported")
            blob = data.tobytes()
            header["inputs"].append(
                {
                    "name": name,
                    "shape": list(data.shape),
                    "datatype": NAMES[data.dtype],
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
        head = json.dumps(header).encode()
        r = self._request(
            "POST",
            f"/v2/models/{model}/infer",
            b"".join([head, *blobs]),
            {HEADER: str(len(head)), "Content-Type": "application/octet-stream"},
        )
        if r.status_code != 200:
            raise TritonHttpError(_message(r))
        return _outputs(r)


class Reply:
    """An HTTP answer, read whole."""

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.content = status, content
        self.headers = {k.lower(): v for k, v in headers.items()}

    def json(self) -> Any:
        return json.loads(self.content)


def _message(r: Reply) -> str:
    text = r.content.decode(errors="replace")
    try:
        text = str(r.json().get("error", text))
    except (ValueError, AttributeError):
        pass
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return f"HTTP {r.status_code}: {lines[-1][:200] if lines else 'no message'}"


def _outputs(r: Reply) -> dict[str, np.ndarray]:
    """The reply's tensors, each checked against the bytes that carry it before it is made (a
    shape claiming more than was sent is refused, never allocated)."""
    body = r.content
    try:
        size = int(r.headers.get(HEADER.lower(), len(body)))
        if not 0 < size <= min(len(body), MAX_HEADER_BYTES):
            raise ValueError(f"a JSON part of {size} bytes")
        header = json.loads(body[:size])
        offset, out = size, {}
        for o in header["outputs"]:
            dtype = np.dtype(DTYPES[o["datatype"]])
            shape = [int(d) for d in o["shape"]]
            if any(d < 0 for d in shape):
                raise ValueError(f"shape {shape}")
            params = o.get("parameters") or {}
            if "binary_data_size" in params:
                n = int(params["binary_data_size"])
                if n != math.prod(shape) * dtype.itemsize or offset + n > len(body):
                    raise ValueError(f"shape {shape} in {n} of {len(body) - offset} bytes left")
                array = np.frombuffer(body, dtype=dtype, count=n // dtype.itemsize, offset=offset)
                offset += n
            else:
                array = np.asarray(o["data"], dtype=dtype)
            out[o["name"]] = array.reshape(shape)
    except (KeyError, ValueError, TypeError) as exc:
        raise RefusedReply(f"malformed inference reply ({first(exc)})") from None
    return out


def first(exc: BaseException) -> str:
    """An exception as a short phrase: its type, and its first line if it has one."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


class _Input:
    """What ultralytics' TritonRemoteModel builds per input (tritonclient's InferInput shape)."""

    def __init__(self, name: str, shape: list[int], datatype: str) -> None:
        self.name, self.array = name, np.empty(0)

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        self.array = array


class _Output:
    def __init__(self, name: str) -> None:
        self.name = name


class _Result:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray:
        return self._arrays[name]


def adopt(remote: Any, netloc: str, timeout_s: float) -> None:
    """Make ultralytics' TritonRemoteModel call through HttpTriton (its `triton_client`,
    `InferInput` and `InferRequestedOutput` are what its __call__ uses)."""
    http = HttpTriton(netloc, timeout_s)

    class Client:
        def infer(self, model_name: str, inputs: list[_Input], outputs: list[_Output]) -> _Result:
            arrays = http.infer_arrays(
                model_name, {i.name: i.array for i in inputs}, [o.name for o in outputs]
            )
            return _Result(arrays)

    remote.triton_client = Client()
    remote.InferInput = _Input
    remote.InferRequestedOutput = _Output
