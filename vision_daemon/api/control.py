"""What the API may ask of the daemon: the `Control` facade, and the errors its methods raise.

The lifecycle builds the one implementation (vision_daemon/control.py) over the pipeline, the
cameras and the ingests; the routers see only this interface, so they stay out of the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from starlette.websockets import WebSocket

from vision_daemon.analytics import LineConfig, ZoneConfig
from vision_daemon.config import CameraConfig
from vision_daemon.masks import Mask
from vision_daemon.options import StreamOptions
from vision_daemon.outputs import FrameImage
from vision_daemon.schema import AnalyticsView, CameraStats, Snapshot
from vision_daemon.tokens import EVERYONE, Principal


class NotFound(Exception):
    """No stream or camera of that name (404)."""


class Refused(Exception):
    """A limit or a conflict refuses the change (409); the message says which."""


class Invalid(Exception):
    """The request's values are out of bounds (422); the message names the bad one."""


class Unavailable(Exception):
    """This daemon does not run the part the request needs (503)."""


class Control(Protocol):
    """The daemon as the control plane sees it: reads and the changes an operator may make."""

    def snapshot(self) -> Snapshot:
        """The latest periodic snapshot (built at most once per stats_refresh_s)."""
        ...

    def history_body(self) -> bytes:
        """/stats/history as JSON."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether the daemon serves frames, and why not."""
        ...

    def retune(self, name: str, overrides: Mapping[str, Any]) -> StreamOptions:
        """An operator's options for a stream; its resolved options. Raises NotFound."""
        ...

    def masks(self, name: str) -> list[dict[str, object]]:
        """A stream's privacy masks (the stream need not exist yet)."""
        ...

    def set_masks(self, name: str, masks: tuple[Mask, ...]) -> list[dict[str, object]]:
        """Replace a stream's privacy masks (empty: none); the masks now."""
        ...

    async def latest_frame(self, name: str) -> FrameImage | None:
        """The stream's latest analysed frame (None until one is kept). Raises NotFound."""
        ...

    def analytics(self) -> dict[str, AnalyticsView]:
        """Every tracked stream's lines, zones and counts."""
        ...

    def analytics_of(self, name: str) -> AnalyticsView:
        """One stream's lines, zones and counts. Raises NotFound."""
        ...

    def set_geometry(
        self, name: str, lines: tuple[LineConfig, ...], zones: tuple[ZoneConfig, ...]
    ) -> AnalyticsView:
        """Replace a stream's lines and zones. Raises Invalid, Refused or Unavailable."""
        ...

    def cameras(self) -> dict[str, CameraStats]:
        """Every pulled camera's health, now."""
        ...

    def camera(self, name: str) -> CameraStats:
        """One camera's health. Raises NotFound."""
        ...

    async def add_camera(self, spec: CameraConfig) -> CameraStats:
        """Start pulling a camera; its health. Raises Invalid (its URL is refused by the URL
        policy), Refused or Unavailable."""
        ...

    def remove_camera(self, name: str) -> None:
        """Stop pulling a camera. Raises NotFound."""
        ...

    async def camera_snapshot(self, name: str) -> bytes | None:
        """The camera's latest analysed frame as a JPEG. Raises NotFound."""
        ...

    @property
    def ingests_websockets(self) -> bool:
        """Whether WS /ingest is served."""
        ...

    async def serve_ingest(
        self,
        websocket: WebSocket,
        stream: str | None,
        browser: bool = False,
        principal: Principal = EVERYONE,
    ) -> None:
        """Hand an accepted WebSocket to the ingest (stream set, or `browser`: browser mode)."""
        ...
