"""The FastAPI app: the generated docs (behind the token when there is one) and the routers.

Run by uvicorn on the daemon's event loop; routes read the latest snapshot and call the
`Control` facade, and never block.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from vision_daemon import __version__
from vision_daemon.access import Access
from vision_daemon.api import analytics, cameras, dashboard, masks, streams, websockets
from vision_daemon.api.auth import TokenGate
from vision_daemon.api.control import Control
from vision_daemon.config import Config
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import Hub


def create_app(
    config: Config,
    control: Control,
    hub: Hub,
    metrics: Metrics,
    started_at: float,
    access: Access,
) -> FastAPI:
    token = access.enabled
    # With a token, the generated docs are served by routes below that require it.
    app = FastAPI(
        title="vision-daemon",
        version=__version__,
        docs_url=None if token else "/docs",
        redoc_url=None if token else "/redoc",
        openapi_url=None if token else "/openapi.json",
    )
    gate = TokenGate(access, config.auth_failure_window_s)
    auth = [Depends(gate.require)]
    if token:
        _docs_behind_token(app, auth)
    app.include_router(streams.open_router(started_at))
    app.include_router(whoami_router(gate))
    app.include_router(streams.router(control, metrics, config.stats_refresh_s), dependencies=auth)
    app.include_router(cameras.router(control), dependencies=auth)
    app.include_router(analytics.router(control), dependencies=auth)
    app.include_router(masks.router(control), dependencies=auth)
    app.include_router(websockets.router(control, hub, gate, config.ws_queue))
    if config.dashboard:
        app.include_router(dashboard.router())
    return app


def whoami_router(gate: TokenGate) -> APIRouter:
    r = APIRouter()

    @r.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        """The token's name and role (any valid token; the dashboard hides what its role may
        not do). With no token configured: role admin, name ""."""
        principal = gate.identify(request)
        return {"name": principal.name, "role": principal.role}

    return r


def _docs_behind_token(app: FastAPI, auth: list[Any]) -> None:
    """/openapi.json, /docs and /redoc for token holders only."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    def schema_url(request: Request) -> str:
        # A browser opening /docs?token=... fetches the schema without our header, so the
        # page asks for it with the token the request itself proved (never logged).
        given = request.query_params.get("token")
        return f"/openapi.json?{urlencode({'token': given})}" if given else "/openapi.json"

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=schema_url(request), title="vision-daemon")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=schema_url(request), title="vision-daemon")
