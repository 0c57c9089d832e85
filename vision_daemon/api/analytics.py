"""Routes over tracking, lines and zones: counts, and an operator's lines and zones."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from vision_daemon.analytics import line_from_dict, zone_from_dict
from vision_daemon.api.body import answers, read_json
from vision_daemon.api.control import Control, Invalid
from vision_daemon.checks import NAME_RE
from vision_daemon.config import ConfigError
from vision_daemon.schema import AnalyticsView


def router(control: Control) -> APIRouter:
    r = APIRouter()

    @r.get("/analytics", response_model=None)
    async def analytics() -> dict[str, AnalyticsView]:
        """Every tracked stream's counts: live tracks, zone occupancy, enters, exits and dwell,
        line crossings by direction and label, and events by type."""
        return control.analytics()

    @r.get("/streams/{name}/analytics", response_model=None)
    async def stream_analytics(name: str) -> AnalyticsView:
        """One stream's lines and zones (the config's, or those an operator set) and counts."""
        with answers():
            return control.analytics_of(name)

    @r.put("/streams/{name}/analytics", response_model=None)
    async def set_stream_analytics(name: str, request: Request) -> AnalyticsView:
        """Replace a stream's lines and zones (a JSON object with `lines` and `zones`, each a
        list of [[lines]] / [[zones]] tables without `stream`). The stream need not exist yet;
        a live one's tracks end and its counts start again from zero."""
        if not NAME_RE.fullmatch(name):
            raise HTTPException(422, "bad stream name")
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) - {"lines", "zones"}:
            raise HTTPException(422, "send a JSON object with lines and/or zones (lists)")
        items: dict[str, list[Any]] = {}
        for key in ("lines", "zones"):
            raw = body.get(key, [])
            if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
                raise HTTPException(422, f"{key} must be a list of objects")
            if any(i.get("stream", name) != name for i in raw):
                raise HTTPException(422, f"{key} must not name another stream")
            items[key] = [{**i, "stream": name} for i in raw]
        with answers():
            try:
                lines = tuple(line_from_dict(i) for i in items["lines"])
                zones = tuple(zone_from_dict(i) for i in items["zones"])
            except ConfigError as exc:
                raise Invalid(str(exc)) from None
            return control.set_geometry(name, lines, zones)

    return r
