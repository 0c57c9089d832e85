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
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np

DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = "Inference-Header-Content-Length"
MAX_REPLY_BYTES = 64 * 2**20  # a float32 reply is 2.8 MB per image; past this it is refused


class TritonHttpError(RuntimeError):
    """The server answered with an error (its message, one line) or with a malformed reply."""


class HttpTriton:
    """One endpoint's HTTP client (one kept-alive connection); not shared between threads.

    The timeout bounds the connect and each read or write on the socket."""

    def __init__(self, netloc: str, timeout_s: float) -> None:
        host, _, port = netloc.rpartition(":")
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
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            r = self._conn.getresponse()
            body = r.read(MAX_REPLY_BYTES + 1)
            if len(body) > MAX_REPLY_BYTES:
                raise TritonHttpError(f"reply over {MAX_REPLY_BYTES // 2**20} MiB")
            return Reply(r.status, dict(r.getheaders()), body)
        except BaseException:
            self._conn.close()  # a fresh connection next time
            raise

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
    body = r.content
    try:
        size = int(r.headers.get(HEADER.lower(), len(body)))
        header = json.loads(body[:size])
        offset, out = size, {}
        for o in header["outputs"]:
            dtype = DTYPES[o["datatype"]]
            shape = [int(d) for d in o["shape"]]
            params = o.get("parameters") or {}
            if "binary_data_size" in params:
                n = int(params["binary_data_size"])
                array = np.frombuffer(body[offset : offset + n], dtype=dtype).reshape(shape)
                offset += n
            else:
                array = np.asarray(o["data"], dtype=dtype).reshape(shape)
            out[o["name"]] = array
    except (KeyError, ValueError, TypeError) as exc:
        raise TritonHttpError(f"malformed inference reply ({type(exc).__name__})") from None
    return out


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
