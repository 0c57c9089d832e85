"""Triton endpoints: their URLs, one client per endpoint, what each serves, and `Endpoints`, the
state every worker shares (up or down, calls in flight, failover, the prober's verdicts).
vision_daemon/detectors/triton.py turns them into a detector."""

from __future__ import annotations

import ast
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from vision_daemon.detectors.base import BackendError, ModelError
from vision_daemon.detectors.kserve import (
    DTYPES,
    MAX_REPLY_BYTES,
    HttpTriton,
    RefusedReply,
    call_deadline,
    time_left,
)

log = logging.getLogger(__name__)

SCHEMES = ("http", "grpc")
WARMUP_TIMEOUT_S = 30.0  # a server's first calls may load and compile its model instances
COMPACT, FLOAT32 = "compact", "float32"


def is_remote(model: str) -> bool:
    return urlsplit(model).scheme in SCHEMES if "://" in model else False


def parse_url(url: str) -> tuple[str, str, str]:
    """(scheme, host:port, model name) of `http://host:port/name`; ModelError if malformed."""
    parts = urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme not in SCHEMES or not parts.hostname or not name or "/" in name:
        raise ModelError(
            f"bad Triton endpoint {url!r}: use http://HOST:PORT/MODEL or grpc://HOST:PORT/MODEL"
        )
    if parts.username or parts.password or parts.query:
        raise ModelError(f"bad Triton endpoint {url!r}: no credentials or query are supported")
    port = parts.port or (8000 if parts.scheme == "http" else 8001)
    return parts.scheme, f"{parts.hostname}:{port}", name


def client(scheme: str, netloc: str, timeout_s: float) -> Any:
    """A client for one endpoint: ours on http.client for HTTP (kserve.py says why not
    tritonclient.http), tritonclient.grpc for gRPC. A gRPC call's `client_timeout` is a deadline
    for the whole call (sent as grpc-timeout, enforced by the channel however the reply comes);
    replies are bounded at MAX_REPLY_BYTES (tritonclient's default allows 2 GiB)."""
    if scheme == "http":
        return HttpTriton(netloc, timeout_s)
    import tritonclient.grpc as grpc  # type: ignore[import-untyped]

    keep = grpc.KeepAliveOptions()  # tritonclient's defaults, which channel_args replaces
    return grpc.InferenceServerClient(
        netloc,
        channel_args=[
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
        ],
    )


def infer(
    c: Any, scheme: str, model: str, inputs: dict[str, np.ndarray], output: str, timeout_s: float
) -> np.ndarray:
    """One inference call with named arrays; the named output back. It ends by this thread's
    `call_deadline`, else `timeout_s` from now."""
    if scheme == "http":
        return c.infer_arrays(model, inputs, [output])[output]  # type: ignore[no-any-return]
    import tritonclient.grpc as grpc

    tensors = []
    for name, array in inputs.items():
        t = grpc.InferInput(name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = c.infer(
        model,
        tensors,
        outputs=[grpc.InferRequestedOutput(output)],
        client_timeout=time_left(timeout_s),
    )
    got = result.get_output(output)
    if got is None or got.datatype not in DTYPES:  # BYTES would unpack into Python objects
        raise RefusedReply(f"answered {output} as {getattr(got, 'datatype', 'nothing')}")
    return result.as_numpy(output)  # type: ignore[no-any-return]


def _call_kw(scheme: str, timeout_s: float) -> dict[str, float]:
    """A gRPC metadata call's deadline: what is left of the probe's."""
    return {"client_timeout": time_left(timeout_s)} if scheme == "grpc" else {}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@dataclass(eq=False)
class Endpoint:
    """One Triton model at one server, with what the pool knows of it."""

    url: str
    scheme: str
    netloc: str
    model: str
    fmt: str = ""  # compact or float32, from the model's config
    names: dict[int, str] = field(default_factory=dict)
    up: bool = False
    since: float = field(default_factory=time.monotonic)
    last_error: str = ""
    in_flight: int = 0
    calls: int = 0
    frames: int = 0
    failures: int = 0
    timeouts: int = 0  # failures that were calls past backend_timeout_s
    refused: int = 0  # failures that were replies refused: malformed, or past a bound
    downs: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "url": self.url,
            "model": self.model,
            "format": self.fmt,
            "state": "up" if self.up else "down",
            "for_s": round(now - self.since, 1),
            "last_error": self.last_error,
            "in_flight": self.in_flight,
            "calls": self.calls,
            "frames": self.frames,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "refused": self.refused,
            "downs": self.downs,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_per_frame": round((self.bytes_up + self.bytes_down) / self.frames)
            if self.frames
            else None,
        }


def describe(scheme: str, netloc: str, model: str, timeout_s: float) -> tuple[str, dict[int, str]]:
    """(format, class names) of a model an endpoint serves, all asked within `timeout_s`;
    raises with one line if it cannot."""
    c = client(scheme, netloc, timeout_s)
    try:
        with call_deadline(timeout_s):
            try:
                live = c.is_server_live(**_call_kw(scheme, timeout_s))
            except Exception as exc:
                raise BackendError(f"unreachable ({first_line(exc)})") from None
            if not live:
                raise BackendError("the server is not live")
            if not c.is_model_ready(model, **_call_kw(scheme, timeout_s)):
                raise ModelError(f"has no model {model!r} ready{_served(c, scheme, timeout_s)}")
            if scheme == "http":
                cfg = c.get_model_config(model)
            else:
                kw = _call_kw(scheme, timeout_s)
                cfg = c.get_model_config(model, as_json=True, **kw)["config"]
    finally:
        c.close()
    inputs = {i["name"]: i.get("data_type", "") for i in cfg.get("input", [])}
    if inputs.get("image") == "TYPE_UINT8" or inputs.get("pixels") == "TYPE_UINT8":
        fmt = COMPACT
    elif "TYPE_FP32" in inputs.values() and len(inputs) == 1:
        fmt = FLOAT32
    else:
        raise ModelError(
            f"serves {model!r} with inputs {inputs}: neither the compact format (image/pixels "
            "UINT8) nor one FP32 image tensor"
        )
    raw = cfg.get("parameters", {}).get("metadata", {}).get("string_value", "")
    try:
        meta = ast.literal_eval(raw) if raw else {}
        names = {int(k): str(v) for k, v in dict(meta.get("names", {})).items()}
    except (ValueError, SyntaxError, TypeError, AttributeError):
        names = {}
    if not names:
        raise ModelError(f"serves {model!r} without class names (config parameter 'metadata')")
    return fmt, names


def _served(c: Any, scheme: str, timeout_s: float) -> str:
    """What the server says it serves, as the end of an error message."""
    try:
        if scheme == "grpc":
            kw = _call_kw(scheme, timeout_s)
            index = c.get_model_repository_index(as_json=True, **kw).get("models", [])
        else:
            index = c.get_model_repository_index()
        names = sorted({str(m.get("name")) for m in index})
    except Exception:  # pytriton guards the repository index behind a token
        return "; check the name"
    return f" (it serves: {', '.join(names[:20]) or 'nothing'})"


class Endpoints:
    """Every endpoint's state, shared by the workers (any thread) and the prober."""

    def __init__(self, urls: Sequence[str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.items = [Endpoint(url, *parse_url(url)) for url in urls]
        self._lock = threading.Lock()
        self.warming = threading.Lock()  # workers warm up one after another
        self.names: dict[int, str] = {}  # the classes every endpoint must serve
        self._turn = 0

    def pick(self) -> Endpoint:
        """The up endpoint with the fewest calls in flight (ties in turn); BackendError if none."""
        with self._lock:
            up = [e for e in self.items if e.up]
            if not up:
                raise BackendError(f"every Triton endpoint is down ({self.why_down()})")
            self._turn += 1
            least = min(e.in_flight for e in up)
            ties = [e for e in up if e.in_flight == least]
            chosen = ties[self._turn % len(ties)]
            chosen.in_flight += 1
            return chosen

    def done(self, e: Endpoint, frames: int, up_bytes: int, down_bytes: int) -> None:
        with self._lock:
            e.in_flight -= 1
            e.calls += 1
            e.frames += frames
            e.bytes_up += up_bytes
            e.bytes_down += down_bytes

    def failed(self, e: Endpoint, why: str, cause: str = "error") -> None:
        """A call that failed (`cause`: error, timeout or refused) takes its endpoint down until
        the prober finds its model ready again."""
        with self._lock:
            e.in_flight -= 1
            e.failures += 1
            e.timeouts += cause == "timeout"
            e.refused += cause == "refused"
            self._down(e, why)

    def mark_down(self, e: Endpoint, why: str) -> None:
        with self._lock:
            self._down(e, why)

    def _down(self, e: Endpoint, why: str) -> None:
        e.last_error = why
        if e.up:
            e.up, e.since = False, time.monotonic()
            e.downs += 1
            log.warning("Triton endpoint %s is down: %s", e.url, why)

    def set_up(self, e: Endpoint, fmt: str, names: dict[int, str]) -> None:
        """Take an endpoint up, unless its classes are not the ones every endpoint must serve
        (the first answering endpoint's: boxes from another model's classes would lie)."""
        with self._lock:
            if self.names and names != self.names:
                self._down(e, "its model's class names changed or differ from the others'")
                return
            self.names = names
            e.fmt, e.names = fmt, names
            if not e.up:
                e.up, e.since = True, time.monotonic()
                log.info("Triton endpoint %s is up (%s format)", e.url, fmt)

    def all_down(self) -> bool:
        return not any(e.up for e in self.items)

    def why_down(self) -> str:
        return "; ".join(f"{e.url}: {e.last_error or 'down'}" for e in self.items if not e.up)

    def health(self) -> tuple[bool, str]:
        """(whether any endpoint answers, which ones do not)."""
        if self.all_down():
            return False, f"every Triton endpoint is down ({self.why_down()})"
        why = self.why_down()
        return True, f"Triton endpoint(s) down: {why}" if why else ""

    def probe(self) -> None:
        """Ask every endpoint whether its model is ready (blocking: run it off the event loop)."""
        for e in self.items:
            try:
                fmt, names = describe(e.scheme, e.netloc, e.model, self.timeout_s)
            except Exception as exc:  # a client library surprise must not end the prober either
                self.mark_down(e, first_line(exc))
                continue
            self.set_up(e, fmt, names)

    def snapshot(self) -> list[dict[str, object]]:
        now = time.monotonic()
        with self._lock:
            return [e.snapshot(now) for e in self.items]
