"""FastAPI control plane, run by uvicorn on the daemon's event loop: reads the snapshot, never blocks.

Routes read the latest `SnapshotCache` snapshot (built at most once a second) and the hub; they
never walk the pipeline's internals themselves.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from vision_daemon import __version__
from vision_daemon.config import Config, ConfigError, camera_from_dict
from vision_daemon.ingest.cameras import CameraManager, CameraRefused
from vision_daemon.ingest.ws import WsIngest
from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import Hub, Subscriber
from vision_daemon.snapshot import CameraStats, SnapshotCache, Stats, StreamStats

log = logging.getLogger(__name__)

WS_POLICY_VIOLATION = 1008  # refused token
WS_TRY_AGAIN_LATER = 1013  # ws_max_subscribers reached
WS_GOING_AWAY = 1001  # daemon shutting down
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


def create_app(
    config: Config,
    cache: SnapshotCache,
    hub: Hub,
    metrics: Metrics,
    started_at: float,
    ready: Callable[[], tuple[bool, str]],
    cameras: CameraManager | None = None,
    ws_ingest: WsIngest | None = None,
) -> FastAPI:
    token = config.auth_token
    # With a token, the generated docs are served by routes below that require it.
    app = FastAPI(
        title="vision-daemon",
        version=__version__,
        docs_url=None if token else "/docs",
        redoc_url=None if token else "/redoc",
        openapi_url=None if token else "/openapi.json",
    )
    refusals = RateLimiter()

    def authorized(header: str | None, query: str | None) -> bool:
        if not token:
            return True
        given = query or ""
        if header and header.lower().startswith("bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), token.encode())

    def refused(plane: str, host: str) -> None:
        metrics.auth_failures.labels(plane).inc()
        log_limited(
            log,
            refusals,
            f"{plane}:{host}",
            time.monotonic(),
            logging.WARNING,
            "refused an %s request from %s: wrong or missing token",
            plane.upper(),
            host,
        )

    def require_token(request: Request) -> None:
        if not authorized(request.headers.get("authorization"), request.query_params.get("token")):
            refused("http", request.client.host if request.client else "?")
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    Auth = Depends(require_token)

    if token:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Auth])
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        def schema_url(request: Request) -> str:
            # A browser opening /docs?token=... fetches the schema without our header, so the
            # page asks for it with the token the request itself proved (never logged).
            given = request.query_params.get("token")
            return f"/openapi.json?{urlencode({'token': given})}" if given else "/openapi.json"

        @app.get("/docs", include_in_schema=False, dependencies=[Auth])
        async def docs(request: Request) -> HTMLResponse:
            return get_swagger_ui_html(openapi_url=schema_url(request), title="vision-daemon")

        @app.get("/redoc", include_in_schema=False, dependencies=[Auth])
        async def redoc(request: Request) -> HTMLResponse:
            return get_redoc_html(openapi_url=schema_url(request), title="vision-daemon")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: answers while the model loads."""
        return {"status": "ok", "uptime_s": round(time.monotonic() - started_at, 1)}

    @app.get("/ready", dependencies=[Auth])
    async def ready_route() -> JSONResponse:
        ok, reason = ready()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @app.get("/stats", response_model=Stats, dependencies=[Auth])
    async def stats() -> Response:
        return Response(cache.latest().body, media_type="application/json")

    @app.get("/streams/{name}", response_model=StreamStats, dependencies=[Auth])
    async def stream(name: str) -> Response:
        s = cache.latest().model.streams.get(name)
        if s is None:
            raise HTTPException(404, "no stream of that name")
        return Response(s.model_dump_json(), media_type="application/json")

    def camera_or_404(name: str) -> Any:
        camera = cameras.get(name) if cameras else None
        if camera is None:
            raise HTTPException(404, f"no camera named {name[:64]!r}")
        return camera

    @app.get("/cameras", response_model=dict[str, CameraStats], dependencies=[Auth])
    async def list_cameras() -> dict[str, Any]:
        """Every pulled camera's health, now."""
        return cameras.health(time.monotonic()) if cameras else {}

    @app.get("/cameras/{name}", response_model=CameraStats, dependencies=[Auth])
    async def get_camera(name: str) -> dict[str, Any]:
        health: dict[str, Any] = camera_or_404(name).health(time.monotonic())
        return health

    @app.post("/cameras", status_code=201, response_model=CameraStats, dependencies=[Auth])
    async def add_camera(request: Request) -> dict[str, Any]:
        """Start pulling a camera: a JSON object with the fields of a [[cameras]] table."""
        if cameras is None:
            raise HTTPException(503, "cameras are not available in this daemon")
        try:
            spec = camera_from_dict(await read_json(request))
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            camera = cameras.add(spec)
        except CameraRefused as exc:
            raise HTTPException(409, str(exc)) from None
        health: dict[str, Any] = camera.health(time.monotonic())
        return health

    @app.delete("/cameras/{name}", status_code=204, dependencies=[Auth])
    async def delete_camera(name: str) -> Response:
        """Stop pulling a camera; its stream stays in /stats for stream_grace_s."""
        if cameras is None or not cameras.remove(name):
            raise HTTPException(404, f"no camera named {name[:64]!r}")
        return Response(status_code=204)

    @app.get("/cameras/{name}/snapshot.jpg", dependencies=[Auth])
    async def camera_snapshot(name: str) -> Response:
        """The latest analysed frame of the camera, as a JPEG."""
        body = await camera_or_404(name).snapshot_jpeg()
        if body is None:
            raise HTTPException(503, "no frame of this camera has been analysed yet")
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    rendered: list[Any] = [0.0, b""]  # (when, body): one rendering per stats_refresh_s

    @app.get("/metrics", dependencies=[Auth])
    async def prometheus() -> Response:
        now = time.monotonic()
        if now - rendered[0] >= config.stats_refresh_s:
            rendered[:] = [now, metrics.render()]
        return Response(rendered[1], media_type="text/plain; version=0.0.4; charset=utf-8")

    async def accept_ws(websocket: WebSocket) -> bool:
        """Accept, then check the token; a wrong one is closed with 1008 (False)."""
        # Accept first, then close with a code: closing before accept answers HTTP 403, and a
        # WebSocket client could not tell a wrong token (1008) from a full house (1013).
        await websocket.accept()
        if authorized(websocket.headers.get("authorization"), websocket.query_params.get("token")):
            return True
        refused("ws", websocket.client.host if websocket.client else "?")
        try:
            await websocket.close(code=WS_POLICY_VIOLATION, reason="missing or wrong token")
        except (WebSocketDisconnect, RuntimeError, OSError):  # the peer left first
            pass
        return False

    if ws_ingest is not None:

        @app.websocket("/ingest")
        async def ingest(websocket: WebSocket) -> None:
            """Frames in, results out: one protocol message (msgpack) per binary message."""
            if await accept_ws(websocket):
                await ws_ingest.serve(websocket)

        @app.websocket("/ingest/{stream}")
        async def ingest_stream(websocket: WebSocket, stream: str) -> None:
            """Browser mode: one JPEG per binary message in, JSON results out."""
            if await accept_ws(websocket):
                await ws_ingest.serve(websocket, stream)

    @app.websocket("/ws")
    async def ws(
        websocket: WebSocket,
        stream: Annotated[list[str] | None, Query()] = None,
        every: Annotated[int, Query(ge=1)] = 1,
        max_fps: Annotated[float, Query(ge=0)] = 0.0,
    ) -> None:
        if not await accept_ws(websocket):
            return
        client = websocket.client
        host = client.host if client else "?"
        sub = Subscriber(
            frozenset(stream or ()),
            config.ws_queue,
            every=every,
            min_interval_s=1.0 / max_fps if max_fps > 0 else 0.0,
            peer=f"{host}:{client.port}" if client else "",
        )
        if not hub.add(sub):
            why = "daemon shutting down" if hub.closed else "ws_max_subscribers reached"
            await websocket.close(code=WS_TRY_AGAIN_LATER, reason=why)
            return
        try:
            while (batch := await sub.next_batch()) is not None:
                sub.sending = len(batch)
                for text in batch:
                    await websocket.send_text(text)
                    sub.sent += 1
                    sub.sending -= 1
            await websocket.close(code=WS_GOING_AWAY, reason="daemon shutting down")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            hub.remove(sub)

    return app
