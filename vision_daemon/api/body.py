"""Reading a request's JSON body within a bound, and mapping the facade's errors to HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException, Request

from vision_daemon.api.control import Invalid, NotFound, Refused, Unavailable

MAX_BODY_BYTES = 64 * 1024  # a request body (POST /cameras) is read up to this, then 413
MAX_DEPTH = 8  # arrays and objects inside one another (a zone's polygon is 3 deep)


async def read_json(request: Request) -> Any:
    """The request's JSON body, read up to MAX_BODY_BYTES (uvicorn itself sets no limit)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    if _depth(body) > MAX_DEPTH:  # before parsing: 30,000 "[" would exhaust the recursion limit
        raise HTTPException(400, f"request body nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(body)
    except ValueError:
        raise HTTPException(400, "request body is not JSON") from None


def _depth(body: bytes | bytearray) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings not counted);
    a scan without recursion, stopped as soon as it passes MAX_DEPTH."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


@contextmanager
def answers() -> Iterator[None]:
    """The facade's errors as HTTP statuses, with their one-line message as the detail."""
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Refused as exc:
        raise HTTPException(409, str(exc)) from None
    except Invalid as exc:
        raise HTTPException(422, str(exc)) from None
    except Unavailable as exc:
        raise HTTPException(503, str(exc)) from None
