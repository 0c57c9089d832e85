"""Routes over the pulled cameras: health, add, remove, snapshot."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from vision_daemon.api.body import answers, read_json
from vision_daemon.api.control import Control
from vision_daemon.config import ConfigError, camera_from_dict
from vision_daemon.schema import CameraStats


def router(control: Control) -> APIRouter:
    r = APIRouter()

    @r.get("/cameras", response_model=dict[str, CameraStats])
    async def list_cameras() -> dict[str, CameraStats]:
        """Every pulled camera's health, now."""
        return control.cameras()

    @r.get("/cameras/{name}", response_model=CameraStats)
    async def get_camera(name: str) -> CameraStats:
        with answers():
            return control.camera(name)

    @r.post("/cameras", status_code=201, response_model=CameraStats)
    async def add_camera(request: Request) -> CameraStats:
        """Start pulling a camera: a JSON object with the fields of a [[cameras]] table."""
        try:
            spec = camera_from_dict(await read_json(request))
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        with answers():
            return await control.add_camera(spec)

    @r.delete("/cameras/{name}", status_code=204)
    async def delete_camera(name: str) -> Response:
        """Stop pulling a camera; its stream stays in /stats for stream_grace_s."""
        with answers():
            control.remove_camera(name)
        return Response(status_code=204)

    @r.get("/cameras/{name}/snapshot.jpg")
    async def camera_snapshot(name: str) -> Response:
        """The latest analysed frame of the camera, as a JPEG."""
        with answers():
            body = await control.camera_snapshot(name)
        if body is None:
            raise HTTPException(503, "no frame of this camera has been analysed yet")
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    return r
