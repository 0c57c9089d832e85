"""FastAPI control plane, run by uvicorn on the daemon's event loop: reads the snapshot, never blocks.

Routes read the latest `SnapshotCache` snapshot (built at most once a second) and the hub; they
never walk the pipeline's internals themselves.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import mimetypes
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from vision_daemon import __version__, options
from vision_daemon.analytics import line_from_dict, zone_from_dict
from vision_daemon.checks import NAME_RE
from vision_daemon.config import Config, ConfigError, camera_from_dict
from vision_daemon.ingest.cameras import CameraManager, CameraRefused
from vision_daemon.ingest.ws import WsIngest
from vision_daemon.log import RateLimiter, log_limited
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import Hub, Subscriber
from vision_daemon.pipeline import Pipeline
from vision_daemon.snapshot import (
    CameraStats,
    SnapshotCache,
    Stats,
    StreamOptionsModel,
    StreamStats,
)

log = logging.getLogger(__name__)

WS_POLICY_VIOLATION = 1008  # refused token
WS_TRY_AGAIN_LATER = 1013  # ws_max_subscribers reached
WS_GOING_AWAY = 1001  # daemon shutting down
MAX_BODY_BYTES = 64 * 1024  # a request body (POST /cameras) is read up to this, then 413
# A browser cannot set headers on a WebSocket: the dashboard offers this subprotocol and its
# token as a second one, "bearer.<base64url of the token>", which stays out of every URL.
WS_SUBPROTOCOL = "vision-daemon"
WS_BEARER_PREFIX = "bearer."
WEB_DIR = Path(__file__).parent / "web"
# The dashboard's own files only: no inline script or style, no other origin, no framing.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


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
    pipeline: Pipeline | None = None,
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

    @app.get("/stats/history", dependencies=[Auth])
    async def stats_history() -> Response:
        """The last stats_history_points summaries, one per stats_history_interval_s, oldest
        first: total and per-stream processed fps, latency p50 and p99, drops a second, queue."""
        return Response(cache.history.body(), media_type="application/json")

    @app.get("/streams/{name}/frame.jpg", dependencies=[Auth])
    async def stream_frame(name: str) -> Response:
        """The stream's latest analysed frame (its boxes are in the /ws result of the same
        frame id); 204 until one is kept: a stream is watched from the first request on."""
        if pipeline is None or name not in pipeline.streams:
            raise HTTPException(404, "no stream of that name")
        image = await pipeline.frames.image(name, time.monotonic())
        if image is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        headers = {
            "Cache-Control": "no-store",
            "X-Frame-Id": str(image.frame_id),
            "X-Frame-Timestamp": repr(image.timestamp),
        }
        return Response(image.body, media_type=image.media_type, headers=headers)

    @app.patch("/streams/{name}", response_model=StreamOptionsModel, dependencies=[Auth])
    async def retune_stream(name: str, request: Request) -> dict[str, Any]:
        """An operator's options for a stream, pushed or pulled (those marked PATCH in
        docs/PROTOCOL.md): they win over what its client said, for as long as the stream lives."""
        try:
            overrides = options.parse_overrides(await read_json(request))
        except options.OptionError as exc:
            raise HTTPException(422, str(exc)) from None
        resolved = None
        if pipeline is not None:
            resolved = pipeline.retune(name, overrides)
        if resolved is None:
            raise HTTPException(404, "no stream of that name")
        camera = cameras.get(name) if cameras else None
        if camera is not None:  # its reader applies skip_frames and max_fps itself
            camera.retune(resolved)
        return resolved.to_dict()

    def analytics_of(name: str) -> dict[str, Any]:
        assert pipeline is not None
        lines, zones = pipeline.geometry_of(name)
        stream = pipeline.streams.get(name)
        analysis = stream.analysis if stream is not None else None
        return {
            "stream": name,
            "tracked": analysis is not None,
            "lines": [dataclasses.asdict(c) for c in lines],
            "zones": [dataclasses.asdict(c) for c in zones],
            "counts": analysis.counts() if analysis is not None else None,
            "events": dict(analysis.events) if analysis is not None else {},
        }

    @app.get("/analytics", dependencies=[Auth])
    async def analytics() -> dict[str, Any]:
        """Every tracked stream's counts: live tracks, zone occupancy, enters, exits and dwell,
        line crossings by direction and label, and events by type."""
        if pipeline is None:
            return {}
        return {
            name: analytics_of(name)
            for name, stream in pipeline.streams.items()
            if stream.analysis is not None
        }

    @app.get("/streams/{name}/analytics", dependencies=[Auth])
    async def stream_analytics(name: str) -> dict[str, Any]:
        """One stream's lines and zones (the config's, or those an operator set) and counts."""
        if pipeline is None or (
            name not in pipeline.streams and not any(pipeline.geometry_of(name))
        ):
            raise HTTPException(404, "no stream of that name, and no lines or zones for it")
        return analytics_of(name)

    @app.put("/streams/{name}/analytics", dependencies=[Auth])
    async def set_stream_analytics(name: str, request: Request) -> dict[str, Any]:
        """Replace a stream's lines and zones (a JSON object with `lines` and `zones`, each a
        list of [[lines]] / [[zones]] tables without `stream`). The stream need not exist yet;
        a live one's tracks end and its counts start again from zero."""
        if pipeline is None:
            raise HTTPException(503, "analytics are not available in this daemon")
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
        if name not in pipeline.geometry and len(pipeline.geometry) >= config.max_streams:
            raise HTTPException(
                409, f"lines and zones are set for max_streams={config.max_streams} streams"
            )
        try:
            lines = tuple(line_from_dict(i) for i in items["lines"])
            zones = tuple(zone_from_dict(i) for i in items["zones"])
            pipeline.set_geometry(name, lines, zones)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        return analytics_of(name)

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
        offered = [
            x.strip() for x in websocket.headers.get("sec-websocket-protocol", "").split(",")
        ]
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        header = websocket.headers.get("authorization")
        for x in offered:
            if x.startswith(WS_BEARER_PREFIX):  # the browser's way to send its token
                header = "Bearer " + _unbase64url(x[len(WS_BEARER_PREFIX) :])
        if authorized(header, websocket.query_params.get("token")):
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
        kind: Annotated[list[str] | None, Query()] = None,
    ) -> None:
        if not await accept_ws(websocket):
            return
        kinds = frozenset(kind or ("result",))
        if not kinds <= {"result", "event"}:
            await websocket.close(code=WS_POLICY_VIOLATION, reason="kind must be result or event")
            return
        client = websocket.client
        host = client.host if client else "?"
        sub = Subscriber(
            frozenset(stream or ()),
            config.ws_queue,
            every=every,
            min_interval_s=1.0 / max_fps if max_fps > 0 else 0.0,
            peer=f"{host}:{client.port}" if client else "",
            kinds=kinds,
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

    if config.dashboard:
        files = _web_files(WEB_DIR)

        def web_file(name: str) -> Response:
            found = files.get(name)
            if found is None:
                raise HTTPException(404, "no such dashboard file")
            body, media_type = found
            return Response(body, media_type=media_type, headers=DASHBOARD_HEADERS)

        @app.get("/", include_in_schema=False)
        async def dashboard() -> Response:
            """The dashboard (static; every figure it shows is fetched with the token)."""
            return web_file("index.html")

        @app.get("/web/{name}", include_in_schema=False)
        async def dashboard_file(name: str) -> Response:
            return web_file(name)

    return app


def _web_files(web_dir: Path) -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (a flat directory inside the package, a few kB), read once."""
    if not web_dir.is_dir():
        return {}
    return {
        f.name: (f.read_bytes(), mimetypes.guess_type(f.name)[0] or "application/octet-stream")
        for f in sorted(web_dir.iterdir())
        if f.is_file() and not f.name.startswith(".")
    }


def _unbase64url(text: str) -> str:
    """A token the dashboard sent as base64url without padding; "" if it does not decode."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):
        return ""
