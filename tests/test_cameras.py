"""Pulled cameras end to end: real files, a real MJPEG server, a real RTSP source from ffmpeg."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import VIDEO, accounted, run, running_daemon, stats
from vision_daemon.config import CameraConfig
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow


def http(d: Daemon, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}", headers=headers, timeout=10)


def short_video(path: Path, frames: int = 20, fps: float = 10.0) -> Path:
    """A small real video file (MJPEG in AVI, 320x240) made with OpenCV."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (320, 240))
    for i in range(frames):
        img = np.full((240, 320, 3), 40, np.uint8)
        cv2.rectangle(img, (10 + i * 5, 60), (60 + i * 5, 180), (0, 200, 0), -1)
        writer.write(img)
    writer.release()
    return path


def camera(d: Daemon, name: str) -> dict[str, Any]:
    """The camera's entry in a fresh snapshot."""
    cams: dict[str, dict[str, Any]] = stats(d)["cameras"]
    return cams[name]


async def wait_for(
    cond: Any, timeout: float = 15.0, what: str = "condition", every: float = 0.05
) -> None:
    """Poll with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def test_looping_file_camera_streams_and_accounts_every_frame(tmp_path: Path) -> None:
    """A 20-frame file with loop = true keeps streaming past its end without a reconnect; every
    frame read is received on the stream and ends processed or dropped with a reason."""
    clip = short_video(tmp_path / "clip.avi")
    spec = CameraConfig(name="clip", url=str(clip), loop=True, max_fps=5.0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(lambda: camera(d, "clip")["frames_read"] > 45, what="a second loop")
            cam = camera(d, "clip")
            assert cam["state"] == "streaming" and cam["reconnects"] == 0
            assert (cam["source"], cam["width"], cam["height"]) == ("file", 320, 240)
            await wait_for(lambda: stats(d)["streams"]["clip"]["processed"] >= 5)
            s = stats(d)["streams"]["clip"]
            assert s["dropped_by_reason"]["throttled"] > 0  # 10 fps file, analysed at 5
            assert s["options"] == {"skip_frames": 1, "max_fps": 5.0}
            assert accounted(d)

    run(main())


def test_file_camera_without_loop_stops_at_its_end(tmp_path: Path) -> None:
    """A file that ends leaves its camera 'stopped' with 'end of file', not retried."""
    clip = short_video(tmp_path / "clip.avi", frames=10)
    spec = CameraConfig(name="once", url=f"file://{clip}", max_fps=0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(lambda: camera(d, "once")["state"] == "stopped", what="stopped")
            cam = camera(d, "once")
            assert (cam["frames_read"], cam["last_error"]) == (10, "end of file")
            assert cam["failed_attempts"] == 0 and cam["reconnects"] == 0
            await wait_for(lambda: stats(d)["streams"]["once"]["in_flight"] == 0)
            s = stats(d)["streams"]["once"]
            assert s["received"] == 10 and accounted(d)

    run(main())


def test_cameras_added_and_removed_through_the_api_leave_the_others_alone(tmp_path: Path) -> None:
    """POST, GET, snapshot.jpg and DELETE on one camera while another streams undisturbed;
    duplicates, bad bodies and oversized bodies get clear errors."""
    clip = short_video(tmp_path / "clip.avi")
    steady = CameraConfig(name="steady", url=str(clip), loop=True)

    async def main() -> None:
        async with running_daemon(cameras=(steady,)) as d, http(d) as h:
            await wait_for(lambda: camera(d, "steady")["state"] == "streaming")
            body = {"name": "street", "url": str(VIDEO), "max_fps": 2}
            r = await h.post("/cameras", json=body)
            assert r.status_code == 201, r.text
            assert r.json()["name"] == "street" and r.json()["source"] == "file"
            assert (await h.post("/cameras", json=body)).status_code == 409
            bad = await h.post("/cameras", json={"name": "x", "url": "gopher://h"})
            assert bad.status_code == 422 and "url must be" in bad.json()["detail"]
            huge = await h.post("/cameras", content=b"{" + b" " * 70_000 + b"}")
            assert huge.status_code == 413
            assert (await h.post("/cameras", content=b"not json")).status_code == 400
            await wait_for(lambda: stats(d)["streams"].get("street", {}).get("processed", 0) > 0)
            listed = (await h.get("/cameras")).json()
            assert set(listed) == {"steady", "street"}
            assert listed["street"]["state"] == "streaming"
            snap = await h.get("/cameras/street/snapshot.jpg")
            assert snap.status_code == 200 and snap.headers["content-type"] == "image/jpeg"
            img = cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (576, 768, 3)
            assert (await h.get("/cameras/nobody/snapshot.jpg")).status_code == 404
            read_before = camera(d, "steady")["frames_read"]
            assert (await h.delete("/cameras/street")).status_code == 204
            assert (await h.get("/cameras/street")).status_code == 404
            assert (await h.delete("/cameras/street")).status_code == 404
            assert "street" in stats(d)["streams"]  # its stream stays for stream_grace_s
            await wait_for(lambda: camera(d, "steady")["frames_read"] > read_before + 10)
            cam = camera(d, "steady")
            assert cam["state"] == "streaming" and cam["reconnects"] == 0
            assert accounted(d)

    run(main())


def test_camera_api_needs_the_token_and_honours_max_cameras(tmp_path: Path) -> None:
    """Without the token /cameras answers 401; past max_cameras a POST answers 409."""
    clip = short_video(tmp_path / "clip.avi")

    async def main() -> None:
        async with running_daemon(auth_token="tok-3141", max_cameras=1) as d:
            async with http(d) as anon:
                assert (await anon.get("/cameras")).status_code == 401
                r = await anon.post("/cameras", json={"name": "a", "url": str(clip)})
                assert r.status_code == 401
            async with http(d, "tok-3141") as h:
                r = await h.post("/cameras", json={"name": "a", "url": str(clip), "loop": True})
                assert r.status_code == 201, r.text
                r = await h.post("/cameras", json={"name": "b", "url": str(clip)})
                assert r.status_code == 409 and "max_cameras=1" in r.json()["detail"]

    run(main())


def h264_clip(path: Path, seconds: int = 2) -> Path:
    """An H.264 file (640x480, 30 fps, a keyframe each second) made by the pip ffmpeg."""
    ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg is not installed")
    subprocess.run(
        [
            *(ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(VIDEO), "-t", str(seconds)),
            *("-vf", "scale=640:480,fps=30", "-c:v", "libx264", "-preset", "ultrafast"),
            *("-g", "30", "-bf", "0", "-an", str(path)),
        ],
        check=True,
        timeout=60,
    )
    return path


@pytest.mark.parametrize("keyframes", ["on", "off"])
def test_h264_file_decodes_every_frame_or_only_keyframes(tmp_path: Path, keyframes: str) -> None:
    """keyframes_only = on decodes the one keyframe a second and nothing else; off decodes all."""
    clip = h264_clip(tmp_path / "clip.mp4")
    spec = CameraConfig(name="h264", url=str(clip), keyframes_only=keyframes, max_fps=0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(lambda: camera(d, "h264")["state"] == "stopped", what="the end")
            cam = camera(d, "h264")
            assert (cam["codec"], cam["width"], cam["height"]) == ("h264", 640, 480)
            assert cam["keyframes_only"] is (keyframes == "on")
            assert cam["frames_read"] == (2 if keyframes == "on" else 60)
            await wait_for(lambda: stats(d)["streams"]["h264"]["in_flight"] == 0)
            assert accounted(d)

    run(main())
