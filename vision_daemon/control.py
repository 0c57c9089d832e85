"""The `Control` facade the API talks to (vision_daemon/api/control.py declares it): one place
for everything an operator's request reaches across components (the pipeline's streams and
analytics, the cameras, the WebSocket ingest, the stats snapshot)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.websockets import WebSocket

from vision_daemon.analytics import LineConfig, ZoneConfig
from vision_daemon.api.control import Invalid, NotFound, Refused, Unavailable
from vision_daemon.config import CameraConfig, Config, ConfigError, policy_for
from vision_daemon.ingest.camera_manager import CameraManager
from vision_daemon.ingest.cameras import CameraRefused
from vision_daemon.ingest.ws import WsIngest
from vision_daemon.masks import Mask
from vision_daemon.options import StreamOptions
from vision_daemon.outputs import FrameImage
from vision_daemon.pipeline import Pipeline
from vision_daemon.schema import AnalyticsView, CameraStats, Snapshot
from vision_daemon.snapshot import SnapshotCache
from vision_daemon.tokens import EVERYONE, Principal
from vision_daemon.url_policy import UrlRefused

NO_STREAM = "no stream of that name"


class DaemonControl:
    """The daemon's components behind the API's `Control` interface."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        cache: SnapshotCache,
        ready: Callable[[], tuple[bool, str]],
        cameras: CameraManager | None = None,
        ws_ingest: WsIngest | None = None,
    ) -> None:
        self._config = config
        self._pipeline = pipeline
        self._cache = cache
        self._ready = ready
        self._cameras = cameras
        self._ws_ingest = ws_ingest

    # ---- stats and streams --------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return self._cache.latest()

    def history_body(self) -> bytes:
        return self._cache.history.body()

    def ready(self) -> tuple[bool, str]:
        return self._ready()

    def retune(self, name: str, overrides: Mapping[str, Any]) -> StreamOptions:
        options = self._pipeline.retune(name, overrides)
        if options is None:
            raise NotFound(NO_STREAM)
        camera = self._cameras.get(name) if self._cameras else None
        if camera is not None:  # its reader applies skip_frames and max_fps itself
            camera.retune(options)
        return options

    def masks(self, name: str) -> list[dict[str, object]]:
        return [m.to_dict() for m in self._pipeline.masks.get(name)]

    def set_masks(self, name: str, masks: tuple[Mask, ...]) -> list[dict[str, object]]:
        self._pipeline.set_masks(name, masks)
        return self.masks(name)

    async def latest_frame(self, name: str) -> FrameImage | None:
        if name not in self._pipeline.streams:
            raise NotFound(NO_STREAM)
        return await self._pipeline.frames.image(name, time.monotonic())

    # ---- analytics ----------------------------------------------------------------------------
    def analytics(self) -> dict[str, AnalyticsView]:
        streams = self._pipeline.streams
        return {n: self._analytics_of(n) for n, s in streams.items() if s.analysis is not None}

    def analytics_of(self, name: str) -> AnalyticsView:
        if name not in self._pipeline.streams and not any(self._pipeline.geometry_of(name)):
            raise NotFound("no stream of that name, and no lines or zones for it")
        return self._analytics_of(name)

    def set_geometry(
        self, name: str, lines: tuple[LineConfig, ...], zones: tuple[ZoneConfig, ...]
    ) -> AnalyticsView:
        pipeline, limit = self._pipeline, self._config.max_streams
        if name not in pipeline.geometry and len(pipeline.geometry) >= limit:
            raise Refused(f"lines and zones are set for max_streams={limit} streams")
        try:
            pipeline.set_geometry(name, lines, zones)
        except ConfigError as exc:
            raise Invalid(str(exc)) from None
        return self._analytics_of(name)

    def _analytics_of(self, name: str) -> AnalyticsView:
        lines, zones = self._pipeline.geometry_of(name)
        stream = self._pipeline.streams.get(name)
        analysis = stream.analysis if stream is not None else None
        return {
            "stream": name,
            "tracked": analysis is not None,
            "lines": [dataclasses.asdict(c) for c in lines],
            "zones": [dataclasses.asdict(c) for c in zones],
            "counts": analysis.counts() if analysis is not None else None,
            "events": dict(analysis.events) if analysis is not None else {},
        }

    # ---- cameras ------------------------------------------------------------------------------
    def cameras(self) -> dict[str, CameraStats]:
        return self._cameras.health(time.monotonic()) if self._cameras else {}

    def camera(self, name: str) -> CameraStats:
        camera = self._cameras.get(name) if self._cameras else None
        if camera is None:
            raise NotFound(f"no camera named {name[:64]!r}")
        return camera.health(time.monotonic())

    async def add_camera(self, spec: CameraConfig) -> CameraStats:
        """Check the camera's URLs against the URL policy (resolving hosts, off the loop: 422
        with the reason, nothing opened), then start it."""
        if self._cameras is None:
            raise Unavailable("cameras are not available in this daemon")
        policy = policy_for(self._cameras.config, spec)
        for url in filter(None, (spec.url, spec.substream_url)):
            try:
                await asyncio.to_thread(policy.resolve, url)
            except UrlRefused as exc:
                raise Invalid(f"bad camera {spec.name!r}: {exc}") from None
        try:
            return self._cameras.add(spec).health(time.monotonic())
        except CameraRefused as exc:
            raise Refused(str(exc)) from None

    def remove_camera(self, name: str) -> None:
        if self._cameras is None or not self._cameras.remove(name):
            raise NotFound(f"no camera named {name[:64]!r}")

    async def camera_snapshot(self, name: str) -> bytes | None:
        camera = self._cameras.get(name) if self._cameras else None
        if camera is None:
            raise NotFound(f"no camera named {name[:64]!r}")
        return await camera.snapshot_jpeg()

    # ---- WebSocket ingest ---------------------------------------------------------------------
    @property
    def ingests_websockets(self) -> bool:
        return self._ws_ingest is not None

    async def serve_ingest(
        self,
        websocket: WebSocket,
        stream: str | None,
        browser: bool = False,
        principal: Principal = EVERYONE,
    ) -> None:
        assert self._ws_ingest is not None, "routes exist only when ingests_websockets"
        await self._ws_ingest.serve(websocket, stream, browser, principal)
