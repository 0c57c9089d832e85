"""Reading a request's JSON body within a bound, and mapping the facade's errors to HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException, Request

from vision_daemon.api.control import Invalid, NotFound, Refused, Unavailable

MAX_BODY_BYTES = 64 * 1024  # a request body (POST /cameras) is read up to this, then 413


async def read_json(request: Request) -> Any:
    """The request's JSON body, read up to MAX_BODY_BYTES (uvicorn itself sets no limit)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise HTTPException(400, "request body is not JSON") from None


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
