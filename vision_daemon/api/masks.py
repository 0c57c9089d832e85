"""Routes over privacy masks: GET and PUT /streams/{name}/masks (vision_daemon/masks.py)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from vision_daemon.api.body import read_json
from vision_daemon.api.control import Control
from vision_daemon.checks import NAME_RE, ConfigError
from vision_daemon.masks import parse_masks


def router(control: Control) -> APIRouter:
    r = APIRouter()

    @r.get("/streams/{name}/masks")
    async def get_masks(name: str) -> dict[str, object]:
        """The stream's privacy masks (vision_daemon/masks.py)."""
        _check_name(name)
        return {"masks": control.masks(name)}

    @r.put("/streams/{name}/masks")
    async def put_masks(name: str, request: Request) -> dict[str, object]:
        """Replace the stream's privacy masks: {"masks": [{"name", "polygon", "detect"}]}. They
        black out every JPEG served or stored from now on, and with detect also what the
        detector sees. The stream need not exist yet."""
        _check_name(name)
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) != {"masks"}:
            raise HTTPException(422, 'the body is {"masks": [...]}')
        try:
            masks = parse_masks(body["masks"])
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"masks": control.set_masks(name, masks)}

    return r


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise HTTPException(422, "not a stream name: 1-64 letters, digits and _ . : -")
