"""Pulled cameras end to end: real files, a real MJPEG server, a real RTSP source from ffmpeg."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.conftest import VIDEO, accounted, api, run, running_daemon, stats, wait_for
from vision_daemon.config import camera_config
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow


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


def test_looping_file_camera_streams_and_accounts_every_frame(tmp_path: Path) -> None:
    """A 20-frame file with loop = true keeps streaming past its end without a reconnect; every
    frame read is received on the stream and ends processed or dropped with a reason."""
    clip = short_video(tmp_path / "clip.avi")
    spec = camera_config(name="clip", url=str(clip), loop=True, max_fps=5.0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(
                lambda: camera(d, "clip")["frames_read"] > 45, what="a second loop", timeout=15
            )
            cam = camera(d, "clip")
            assert cam["state"] == "streaming" and cam["reconnects"] == 0
            assert (cam["source"], cam["width"], cam["height"]) == ("file", 320, 240)
            await wait_for(lambda: stats(d)["streams"]["clip"]["processed"] >= 5, timeout=15)
            s = stats(d)["streams"]["clip"]
            assert s["dropped_by_reason"]["throttled"] > 0  # 10 fps file, analysed at 5
            assert s["options"] == {
                "skip_frames": 1,
                "max_fps": 5.0,
                "serve": "latest",
                "source_fps": 0.0,
                "motion_gate": 0.0,
                "track": None,
                "min_confidence": 0.0,
            }
            assert accounted(d)

    run(main())


def test_file_camera_without_loop_stops_at_its_end(tmp_path: Path) -> None:
    """A file that ends leaves its camera 'stopped' with 'end of file', not retried."""
    clip = short_video(tmp_path / "clip.avi", frames=10)
    spec = camera_config(name="once", url=f"file://{clip}", max_fps=0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(
                lambda: camera(d, "once")["state"] == "stopped", what="stopped", timeout=15
            )
            cam = camera(d, "once")
            assert (cam["frames_read"], cam["last_error"]) == (10, "end of file")
            assert cam["failed_attempts"] == 0 and cam["reconnects"] == 0
            await wait_for(lambda: stats(d)["streams"]["once"]["in_flight"] == 0, timeout=15)
            s = stats(d)["streams"]["once"]
            assert s["received"] == 10 and accounted(d)

    run(main())


def test_cameras_added_and_removed_through_the_api_leave_the_others_alone(tmp_path: Path) -> None:
    """POST, GET, snapshot.jpg and DELETE on one camera while another streams undisturbed;
    duplicates, bad bodies and oversized bodies get clear errors."""
    clip = short_video(tmp_path / "clip.avi")
    steady = camera_config(name="steady", url=str(clip), loop=True)

    async def main() -> None:
        async with running_daemon(cameras=(steady,)) as d, api(d) as h:
            await wait_for(lambda: camera(d, "steady")["state"] == "streaming", timeout=15)
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
            await wait_for(
                lambda: stats(d)["streams"].get("street", {}).get("processed", 0) > 0, timeout=15
            )
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
            await wait_for(
                lambda: camera(d, "steady")["frames_read"] > read_before + 10, timeout=15
            )
            cam = camera(d, "steady")
            assert cam["state"] == "streaming" and cam["reconnects"] == 0
            assert accounted(d)

    run(main())


def test_camera_api_needs_the_token_and_honours_max_cameras(tmp_path: Path) -> None:
    """Without the token /cameras answers 401; past max_cameras a POST answers 409."""
    clip = short_video(tmp_path / "clip.avi")

    async def main() -> None:
        async with running_daemon(auth_token="tok-3141", max_cameras=1) as d:
            async with api(d) as anon:
                assert (await anon.get("/cameras")).status_code == 401
                r = await anon.post("/cameras", json={"name": "a", "url": str(clip)})
                assert r.status_code == 401
            async with api(d, "tok-3141") as h:
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
    spec = camera_config(name="h264", url=str(clip), keyframes_only=keyframes, max_fps=0)

    async def main() -> None:
        async with running_daemon(cameras=(spec,)) as d:
            await wait_for(
                lambda: camera(d, "h264")["state"] == "stopped", what="the end", timeout=15
            )
            cam = camera(d, "h264")
            assert (cam["codec"], cam["width"], cam["height"]) == ("h264", 640, 480)
            assert cam["keyframes_only"] is (keyframes == "on")
            assert cam["frames_read"] == (2 if keyframes == "on" else 60)
            await wait_for(lambda: stats(d)["streams"]["h264"]["in_flight"] == 0, timeout=15)
            assert accounted(d)

    run(main())


# ---- real cameras: an ESP32-CAM-like MJPEG server and an H.264 RTSP server ----------------------
FAST_RETRY = {"open_timeout_s": 2.0, "stall_timeout_s": 2.0, "retry_initial_s": 0.2}
SECRET = "Sup3r-S3cret"


def no_secret_anywhere(d: Daemon, caplog: pytest.LogCaptureFixture, *more: str) -> None:
    """The password is in no /stats, /cameras or /metrics output, log line or given text."""
    texts = [d.snapshot().body.decode(), d.metrics.render().decode(), caplog.text, *more]
    assert not [t for t in texts if SECRET in t]


async def ws_results(d: Daemon, stream: str, n: int) -> list[dict[str, Any]]:
    """The next n results of `stream` from /ws."""
    import json

    import websockets

    out: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{d.api_port}/ws?stream={stream}"
    async with websockets.connect(url) as ws, asyncio.timeout(20):
        while len(out) < n:
            out.append(json.loads(await ws.recv()))
    return out


def test_esp32_mjpeg_camera_is_analysed_at_max_fps_with_results_on_ws() -> None:
    """A 30 fps MJPEG camera analysed at 10 fps: results on /ws carry the capture time, the
    frames not analysed are throttled before any decoding, snapshot.jpg is the camera's JPEG."""
    from tests.sources import MjpegServer

    with MjpegServer(fps=30, frames=60) as cam:
        spec = camera_config(name="esp32", url=cam.url, max_fps=10, **FAST_RETRY)

        async def main() -> None:
            async with running_daemon(cameras=(spec,)) as d, api(d) as h:
                results = await ws_results(d, "esp32", 5)
                now = time.time()
                assert all(0 <= now - r["timestamp"] < 10 for r in results)
                assert [r["frame_id"] for r in results] == sorted(r["frame_id"] for r in results)
                await wait_for(lambda: camera(d, "esp32")["frames_read"] >= 60, timeout=15)
                cam_stats = camera(d, "esp32")
                assert (cam_stats["source"], cam_stats["state"]) == ("mjpeg", "streaming")
                s = stats(d)["streams"]["esp32"]
                assert s["dropped_by_reason"]["throttled"] > s["processed"] > 0
                assert s["peer"].startswith("camera http://127.0.0.1:")
                snap = await h.get("/cameras/esp32/snapshot.jpg")
                assert snap.content in cam.jpegs  # the camera's own bytes: never re-encoded
                assert accounted(d)

        run(main())


def test_mjpeg_camera_killed_and_revived_resumes_and_counts_the_reconnect() -> None:
    """A camera that loses power comes back: results resume within the stall timeout plus the
    backoff, the reconnect is counted, and the accounting still holds."""
    from tests.sources import MjpegServer

    with MjpegServer(fps=30, frames=30) as cam:
        spec = camera_config(name="door", url=cam.url, max_fps=10, retry_max_s=0.5, **FAST_RETRY)

        async def main() -> None:
            async with running_daemon(cameras=(spec,)) as d:
                await wait_for(
                    lambda: stats(d)["streams"].get("door", {}).get("processed", 0) > 3, timeout=15
                )
                cam.kill()
                await wait_for(
                    lambda: camera(d, "door")["state"] == "reconnecting", what="lost", timeout=15
                )
                assert camera(d, "door")["last_error"] == "the camera closed the connection"
                before = stats(d)["streams"]["door"]["processed"]
                cam.revive()
                # stall_timeout_s (2) + the capped backoff (0.5 +- 20%) + slack for this box
                await wait_for(lambda: camera(d, "door")["state"] == "streaming", timeout=6)
                await wait_for(
                    lambda: stats(d)["streams"]["door"]["processed"] > before + 3, timeout=15
                )
                c = camera(d, "door")
                assert c["reconnects"] == 1 and c["reconnects_last_hour"] == 1
                assert c["quality"] in ("fair", "poor")  # a reconnect in the last hour
                assert accounted(d)

        run(main())


def test_broken_cameras_say_why_leak_no_secret_and_leave_a_good_one_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A URL that never answers, a 404, garbage, wrong credentials and a refused port each get
    their state and one-line error, no password shows anywhere, and the good camera streams on."""
    import logging

    from tests.sources import MjpegServer

    caplog.set_level(logging.INFO)
    servers = {
        mode: MjpegServer(fps=30, frames=30, mode=mode).start()
        for mode in ("ok", "hang", "404", "garbage")
    }
    locked = MjpegServer(fps=30, frames=30, require_auth=("admin", "right-one")).start()
    try:
        urls = {f"m-{mode}": s.stream_url("admin", SECRET) for mode, s in servers.items()}
        urls["m-auth"] = locked.stream_url("admin", SECRET)
        urls["m-refused"] = f"http://admin:{SECRET}@127.0.0.1:1/stream"
        specs = tuple(
            camera_config(name=n, url=u, max_fps=5, **FAST_RETRY) for n, u in urls.items()
        )
        expected = {
            "m-hang": ("connecting", "sent no answer"),
            "m-404": ("failed", "not found (HTTP 404)"),
            "m-garbage": ("failed", "not an MJPEG stream"),
            "m-auth": ("failed", "wrong or missing credentials (HTTP 401)"),
            "m-refused": ("connecting", "cannot connect"),
        }

        async def main() -> None:
            async with running_daemon(cameras=specs) as d, api(d) as h:

                def settled() -> bool:
                    cams = stats(d)["cameras"]
                    return all(
                        cams[n]["state"] == state and want in (cams[n]["last_error"] or "")
                        for n, (state, want) in expected.items()
                    )

                await wait_for(settled, timeout=20, what=f"the errors {expected}")
                good = camera(d, "m-ok")
                await wait_for(
                    lambda: camera(d, "m-ok")["frames_read"] > good["frames_read"] + 30, timeout=15
                )
                good = camera(d, "m-ok")
                assert good["state"] == "streaming" and good["reconnects"] == good["stalls"] == 0
                assert good["source_fps"] > 15  # the camera sends 30; broken neighbours cost none
                for name in expected:
                    c = camera(d, name)
                    assert c["url"].startswith("http://***@127.0.0.1:")
                    assert c["quality"] == "unusable" and c["failed_attempts"] >= 1
                    assert "\n" not in c["last_error"]
                listing = (await h.get("/cameras")).text
                metrics = (await h.get("/metrics")).text
                assert 'vision_daemon_camera_state{camera="m-404",state="failed"} 1.0' in metrics
                no_secret_anywhere(d, caplog, listing, metrics)

        run(main())
    finally:
        for s in (*servers.values(), locked):
            s.stop()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_camera_streams_h264_over_tcp_and_udp(transport: str) -> None:
    """An H.264 RTSP camera from a real ffmpeg, over interleaved TCP or UDP, is analysed."""
    from tests.sources import RtspServer

    with RtspServer() as cam:
        spec = camera_config(name="ipcam", url=cam.url, rtsp_transport=transport, **FAST_RETRY)

        async def main() -> None:
            async with running_daemon(cameras=(spec,)) as d:
                await wait_for(
                    lambda: stats(d)["streams"].get("ipcam", {}).get("processed", 0) >= 5,
                    timeout=15,
                )
                c = camera(d, "ipcam")
                assert (c["source"], c["codec"], c["width"], c["height"]) == (
                    "rtsp",
                    "h264",
                    640,
                    480,
                )
                assert c["state"] == "streaming" and c["decode_ms"] is not None
                assert accounted(d)

        run(main())


def test_rtsp_camera_killed_and_revived_and_wrong_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An RTSP camera that goes away is reopened and counted; one with the wrong password is
    'failed' with a one-line error and its password appears nowhere."""
    import logging

    from tests.sources import RtspServer

    caplog.set_level(logging.INFO)
    with RtspServer() as cam, RtspServer(require_auth=("admin", "right-one")) as locked:
        specs = (
            camera_config(name="ipcam", url=cam.url, retry_max_s=0.5, **FAST_RETRY),
            camera_config(name="locked", url=locked.url_with("admin", SECRET), **FAST_RETRY),
        )

        async def main() -> None:
            async with running_daemon(cameras=specs) as d:
                await wait_for(
                    lambda: stats(d)["streams"].get("ipcam", {}).get("processed", 0) > 2, timeout=15
                )
                cam.kill()
                await wait_for(
                    lambda: camera(d, "ipcam")["state"] == "reconnecting", what="lost", timeout=15
                )
                before = stats(d)["streams"]["ipcam"]["processed"]
                cam.revive()
                await wait_for(lambda: camera(d, "ipcam")["state"] == "streaming", timeout=10)
                await wait_for(
                    lambda: stats(d)["streams"]["ipcam"]["processed"] > before + 2, timeout=15
                )
                assert camera(d, "ipcam")["reconnects"] == 1
                locked_cam = camera(d, "locked")
                assert locked_cam["state"] == "failed"
                assert "wrong or missing credentials" in locked_cam["last_error"]
                no_secret_anywhere(d, caplog)
                assert accounted(d)

        run(main())


def test_snapshot_url_is_polled_and_a_substream_is_what_gets_analysed() -> None:
    """A URL answering one JPEG per GET is polled at the camera's fps; with substream_url set,
    the substream is read and analysed while /cameras shows both URLs without secrets."""
    from tests.sources import MjpegServer

    with MjpegServer(fps=30, frames=30) as cam:
        polled = camera_config(name="snap", url=cam.capture_url(), fps=4, max_fps=0, **FAST_RETRY)
        main_url = f"rtsp://admin:{SECRET}@127.0.0.1:1/main"
        sub = camera_config(name="sub", url=main_url, substream_url=cam.url, **FAST_RETRY)

        async def main() -> None:
            async with running_daemon(cameras=(polled, sub)) as d:
                await wait_for(
                    lambda: camera(d, "snap")["frames_read"] >= 8, what="8 polls", timeout=15
                )
                c = camera(d, "snap")
                assert (c["source"], c["state"], c["expected_fps"]) == (
                    "snapshot",
                    "streaming",
                    4.0,
                )
                assert 2.5 <= c["source_fps"] <= 5.5  # polled 4 times a second, not flat out
                await wait_for(
                    lambda: stats(d)["streams"].get("sub", {}).get("processed", 0) > 2, timeout=15
                )
                s = camera(d, "sub")
                assert (s["source"], s["state"]) == ("mjpeg", "streaming")
                assert s["url"] == "rtsp://***@127.0.0.1:1/main" and s["substream_url"] == cam.url
                assert accounted(d)

        run(main())


def test_a_camera_that_stops_sending_is_a_counted_stall_then_reconnects() -> None:
    """An open MJPEG stream that goes silent (connection left open) is given up after
    stall_timeout_s, counted as a stall, and reopened once the camera answers again."""
    from tests.sources import MjpegServer

    with MjpegServer(fps=30, frames=30) as cam:
        spec = camera_config(name="hall", url=cam.url, max_fps=5, retry_max_s=0.5, **FAST_RETRY)

        async def main() -> None:
            async with running_daemon(cameras=(spec,)) as d:
                await wait_for(lambda: camera(d, "hall")["state"] == "streaming", timeout=15)
                cam.mode = "hang"
                await wait_for(lambda: camera(d, "hall")["stalls"] == 1, what="a stall", timeout=15)
                c = camera(d, "hall")
                assert c["stalls_last_hour"] == 1 and c["state"] != "streaming"
                assert "stall" in c["last_error"] or "no answer" in c["last_error"]
                cam.mode = "ok"
                await wait_for(
                    lambda: camera(d, "hall")["reconnects"] == 1, what="reconnect", timeout=15
                )
                assert camera(d, "hall")["state"] == "streaming" and accounted(d)

        run(main())
