"""The cameras of one daemon: added from the config at start and by the API at run time, each
reading in its own thread (vision_daemon/ingest/cameras.py); gated frames are flushed to the
pipeline on a timer, and shutdown stops and joins every reader."""

from __future__ import annotations

import asyncio
import logging
import time

from vision_daemon.config import CameraConfig, Config, policy_for
from vision_daemon.ingest.cameras import FLUSH_INTERVAL_S, Camera, CameraRefused
from vision_daemon.ingest.sources import (
    redact_url,
)
from vision_daemon.pipeline import Pipeline
from vision_daemon.schema import CameraStats

log = logging.getLogger(__name__)


class CameraManager:
    """The cameras of one daemon: added from the config at start, and at run time by the API."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.cameras: dict[str, Camera] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closing = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for spec in self.config.cameras:
            self.add(spec)  # never blocks: opening happens in the camera's thread
        self._tick()

    def _tick(self) -> None:
        """Count the frames readers gated even while none is forwarded (a re-armed handle)."""
        assert self._loop is not None
        try:
            for camera in list(self.cameras.values()):
                camera.flush()
        finally:
            self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def add(self, spec: CameraConfig) -> Camera:
        if self.closing or self._loop is None:
            raise CameraRefused("the daemon is not running cameras (starting or shutting down)")
        if spec.name in self.cameras:
            raise CameraRefused(f"camera {spec.name!r} exists; DELETE it first")
        if len(self.cameras) >= self.config.max_cameras:
            raise CameraRefused(f"max_cameras={self.config.max_cameras} reached")
        camera = Camera(
            spec,
            self.pipeline,
            self._loop,
            self.config.max_message_bytes,
            self.config.stats_window_s,
            self.config.max_image_pixels,
            policy_for(self.config, spec),
        )
        # The stream is the camera's from now on: no pushed client can take the name while the
        # camera is still connecting.
        refused = self.pipeline.attach(camera, spec.name, camera.options)
        if refused is not None:
            raise CameraRefused(refused)
        self.cameras[spec.name] = camera
        camera.start()
        log.info("camera %s added: %s", spec.name, redact_url(camera.url))
        return camera

    def remove(self, name: str) -> bool:
        camera = self.cameras.pop(name, None)
        if camera is None:
            return False
        camera.stop()
        log.info("camera %s removed", name)
        return True

    def stop_reading(self) -> None:
        """Shutdown, first step: readers stop and no frame enters the pipeline any more."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        for camera in self.cameras.values():
            camera.stop("shutdown")

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop every camera; wait (off the loop) a little for their threads (they are daemons)."""
        self.stop_reading()
        cameras = list(self.cameras.values())
        deadline = time.monotonic() + timeout

        def join_all() -> None:
            for camera in cameras:
                camera.join(max(0.0, deadline - time.monotonic()))

        await asyncio.to_thread(join_all)

    def health(self, now: float) -> dict[str, CameraStats]:
        return {name: c.health(now) for name, c in sorted(self.cameras.items())}

    def get(self, name: str) -> Camera | None:
        return self.cameras.get(name)
