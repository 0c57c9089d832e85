"""Routes over the snapshot and the streams: /health, /ready, /stats, /streams, /metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from vision_daemon import options
from vision_daemon.api.body import answers, read_json
from vision_daemon.api.control import Control
from vision_daemon.metrics import Metrics
from vision_daemon.schema import Stats, StreamOptionsModel, StreamStats


def open_router(started_at: float) -> APIRouter:
    """What answers without a token: liveness."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, object]:
        """Liveness: answers while the model loads."""
        return {"status": "ok", "uptime_s": round(time.monotonic() - started_at, 1)}

    return router


def router(control: Control, metrics: Metrics, refresh_s: float) -> APIRouter:
    """Readiness, stats, one stream, its latest frame, an operator's options, Prometheus."""
    r = APIRouter()

    @r.get("/ready")
    async def ready_route() -> JSONResponse:
        ok, reason = control.ready()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @r.get("/stats", response_model=Stats)
    async def stats() -> Response:
        return Response(control.snapshot().body, media_type="application/json")

    @r.get("/streams/{name}", response_model=StreamStats)
    async def stream(name: str) -> Response:
        s = control.snapshot().model.streams.get(name)
        if s is None:
            raise HTTPException(404, "no stream of that name")
        return Response(s.model_dump_json(), media_type="application/json")

    @r.get("/stats/history")
    async def stats_history() -> Response:
        """The last stats_history_points summaries, one per stats_history_interval_s, oldest
        first: total and per-stream processed fps, latency p50 and p99, drops a second, queue."""
        return Response(control.history_body(), media_type="application/json")

    @r.get("/streams/{name}/frame.jpg")
    async def stream_frame(name: str) -> Response:
        """The stream's latest analysed frame (its boxes are in the /ws result of the same
        frame id); 204 until one is kept: a stream is watched from the first request on."""
        with answers():
            image = await control.latest_frame(name)
        if image is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        headers = {
            "Cache-Control": "no-store",
            "X-Frame-Id": str(image.frame_id),
            "X-Frame-Timestamp": repr(image.timestamp),
        }
        return Response(image.body, media_type=image.media_type, headers=headers)

    @r.patch("/streams/{name}", response_model=StreamOptionsModel)
    async def retune_stream(name: str, request: Request) -> dict[str, object]:
        """An operator's options for a stream, pushed or pulled (those marked PATCH in
        docs/PROTOCOL.md): they win over what its client said, for as long as the stream lives."""
        try:
            overrides = options.parse_overrides(await read_json(request))
        except options.OptionError as exc:
            raise HTTPException(422, str(exc)) from None
        with answers():
            return control.retune(name, overrides).to_dict()

    rendered: list[Any] = [0.0, b""]  # (when, body): one rendering per stats_refresh_s

    @r.get("/metrics")
    async def prometheus() -> Response:
        now = time.monotonic()
        if now - rendered[0] >= refresh_s:
            rendered[:] = [now, metrics.render()]
        return Response(rendered[1], media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
