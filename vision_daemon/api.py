"""FastAPI control plane, run by uvicorn on the daemon's event loop: reads state, never blocks."""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Annotated, Any

import psutil
from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from vision_daemon import __version__
from vision_daemon.broadcast import Subscriber
from vision_daemon.metrics import Metrics

if TYPE_CHECKING:
    from vision_daemon.server import Daemon


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None


class Latency(BaseModel):
    queue: Percentiles = Field(description="time from receipt until a worker took the frame")
    decode: Percentiles
    infer: Percentiles = Field(description="detector call (for the whole batch)")
    total: Percentiles = Field(description="receipt to result queued for sending")


class FrameCounts(BaseModel):
    received: int
    processed: int
    dropped: int
    dropped_by_reason: dict[str, int]
    results_dropped: int = Field(description="processed, but the client's send buffer was full")
    received_fps: float = Field(description="over the last stats_window_s")
    processed_fps: float
    latency_ms: Latency


class StreamOptionsModel(BaseModel):
    skip_frames: int
    max_fps: float


class StreamStats(FrameCounts):
    name: str
    peer: str | None
    connected: bool
    queue_depth: int
    in_flight: int
    last_frame_age_ms: float | None
    options: StreamOptionsModel


class WorkerStatsModel(BaseModel):
    id: int
    state: str
    frames: int
    batches: int
    errors: int
    restarts: int
    busy_fraction: float
    busy_for_s: float | None


class ModelInfoModel(BaseModel):
    name: str
    backend: str
    device: str
    imgsz: int
    classes: int
    class_names: dict[str, str]
    warmup_ms: float


class Stats(BaseModel):
    # The seed's flat fields, kept at the top level for existing dashboards.
    total_frames: int = Field(description="frames received, all streams")
    processed_frames: int
    dropped_frames: int
    last_latency_ms: float | None
    fps: float = Field(description="processed frames per second over the sliding window")
    queue_size: int = Field(description="frames waiting in all stream queues")
    cpu: float = Field(description="system CPU percent")
    ram: float = Field(description="system memory percent")
    # Since v1
    version: str
    uptime_s: float
    ready: bool
    ready_reason: str
    rss_mb: float
    model: ModelInfoModel | None
    workers: list[WorkerStatsModel]
    workers_busy: int
    totals: FrameCounts
    batch_sizes: dict[str, int]
    mean_batch_size: float | None
    connections: dict[str, int]
    errors: dict[str, int] = Field(description="refused messages by protocol error code")
    ws: dict[str, Any]
    streams: dict[str, StreamStats]


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="vision-daemon", version=__version__)
    metrics = Metrics(daemon)
    proc = psutil.Process()
    proc.cpu_percent(None)
    psutil.cpu_percent(None)  # prime: later calls measure since the previous one
    token = daemon.config.auth_token

    def authorized(header: str | None, query: str | None) -> bool:
        if not token:
            return True
        given = query or ""
        if header and header.lower().startswith("bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), token.encode())

    def require_token(request: Request) -> None:
        if not authorized(request.headers.get("authorization"), request.query_params.get("token")):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    Auth = Depends(require_token)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: answers while the model loads."""
        return {"status": "ok", "uptime_s": round(time.monotonic() - daemon.started_at, 1)}

    @app.get("/ready", dependencies=[Auth])
    async def ready() -> JSONResponse:
        ok, reason = daemon.ready()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @app.get("/stats", response_model=Stats, dependencies=[Auth])
    async def stats() -> dict[str, Any]:
        return snapshot(daemon, proc)

    @app.get("/streams/{name}", response_model=StreamStats, dependencies=[Auth])
    async def stream(name: str) -> dict[str, Any]:
        s = daemon.streams.get(name)
        if s is None:
            raise HTTPException(404, f"no stream named {name!r}")
        return s.snapshot(time.monotonic())

    @app.get("/metrics", dependencies=[Auth])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.websocket("/ws")
    async def ws(
        websocket: WebSocket,
        stream: Annotated[list[str] | None, Query()] = None,
        every: Annotated[int, Query(ge=1)] = 1,
        max_fps: Annotated[float, Query(ge=0)] = 0.0,
    ) -> None:
        if not authorized(
            websocket.headers.get("authorization"), websocket.query_params.get("token")
        ):
            await websocket.close(code=1008, reason="missing or wrong token")
            return
        await websocket.accept()
        client = websocket.client
        sub = Subscriber(
            frozenset(stream or ()),
            daemon.config.ws_queue,
            every=every,
            min_interval_s=1.0 / max_fps if max_fps > 0 else 0.0,
            peer=f"{client.host}:{client.port}" if client else "",
        )
        daemon.hub.subscribers.add(sub)
        try:
            while (batch := await sub.next_batch()) is not None:
                sub.sending = len(batch)
                for msg in batch:
                    await websocket.send_json(msg)
                    sub.sent += 1
                    sub.sending -= 1
            await websocket.close(code=1001, reason="daemon shutting down")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            daemon.hub.remove(sub)

    return app


def snapshot(daemon: Daemon, proc: psutil.Process) -> dict[str, Any]:
    """Everything /stats shows, computed from the live counters at one instant."""
    now = time.monotonic()
    totals = daemon.totals.snapshot(now)
    pool = daemon.pool
    sizes = dict(pool.batch_sizes) if pool else {}
    calls = sum(sizes.values())
    ok, reason = daemon.ready()
    return {
        "total_frames": totals["received"],
        "processed_frames": totals["processed"],
        "dropped_frames": totals["dropped"],
        "last_latency_ms": (
            None if daemon.last_latency_ms is None else round(daemon.last_latency_ms, 2)
        ),
        "fps": totals["processed_fps"],
        "queue_size": sum(len(s.queue) for s in daemon.streams.values()),
        "cpu": psutil.cpu_percent(None),
        "ram": psutil.virtual_memory().percent,
        "version": __version__,
        "uptime_s": round(now - daemon.started_at, 1),
        "ready": ok,
        "ready_reason": reason,
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "model": daemon.model_info.to_dict() if daemon.model_info else None,
        "workers": [w.stats.snapshot(now) for w in pool.workers] if pool else [],
        "workers_busy": pool.busy() if pool else 0,
        "totals": totals,
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "mean_batch_size": (
            round(sum(k * v for k, v in sizes.items()) / calls, 3) if calls else None
        ),
        "connections": {
            "open": len(daemon.connections),
            "total": daemon.connections_total,
            "refused": daemon.connections_refused,
        },
        "errors": dict(daemon.errors),
        "ws": daemon.hub.snapshot(),
        "streams": {name: s.snapshot(now) for name, s in sorted(daemon.streams.items())},
    }
