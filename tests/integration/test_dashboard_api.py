"""The dashboard's side of the control plane over real HTTP: the latest analysed frame of a stream,
the stats history ring, an operator's skip_frames and max_fps, the /ws subprotocol token and the
static files' policy."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import websockets

from tests.conftest import api, collect, connect, jpeg, run, running_daemon, stats, wait_for
from tests.integration.test_cameras import short_video
from vision_daemon.api import dashboard as api_module
from vision_daemon.config import camera_config

pytestmark = pytest.mark.slow  # real sockets and daemons


TOKEN = "dash-s3cret"


# ---- slow: a real daemon, real HTTP and WebSocket clients ----------------------------------------
def test_frame_endpoint_serves_the_latest_analysed_frame_with_its_id() -> None:
    """GET /streams/{name}/frame.jpg: 204 until the stream is watched and a frame analysed, then
    the exact JPEG bytes of the latest analysed frame with X-Frame-Id; raw pixels come back as
    a JPEG; 404 for no such stream and 401 without the token."""

    async def main() -> None:
        async with running_daemon(auth_token=TOKEN) as d, api(d, TOKEN) as h:
            c = await connect(d, token=TOKEN)
            images = [jpeg(value=v) for v in (30, 90, 150, 210)]
            await c.send_frame("cam", 0, images[0])
            await collect(c, 1)
            first = await h.get("/streams/cam/frame.jpg")
            assert first.status_code == 204 and first.content == b""  # now watched
            for i, image in enumerate(images[1:], start=1):
                await c.send_frame("cam", i, image)
                await collect(c, 1)
            r = await h.get("/streams/cam/frame.jpg")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert r.headers["x-frame-id"] == "3" and r.content == images[3]
            assert r.headers["cache-control"] == "no-store"
            pixels = np.full((40, 60, 3), 120, dtype=np.uint8)
            await c.send_image("raw", 0, pixels.tobytes(), "raw", pixels.shape)
            await collect(c, 1)
            assert (await h.get("/streams/raw/frame.jpg")).status_code == 204
            await c.send_image("raw", 1, pixels.tobytes(), "raw", pixels.shape)
            await collect(c, 1)
            r = await h.get("/streams/raw/frame.jpg")
            decoded = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
            assert r.headers["x-frame-id"] == "1" and decoded.shape == (40, 60, 3)
            assert (await h.get("/streams/nope/frame.jpg")).status_code == 404
            async with api(d) as anon:
                assert (await anon.get("/streams/cam/frame.jpg")).status_code == 401
            await c.close()

    run(main())


def test_stats_history_is_a_bounded_ring_behind_the_token() -> None:
    """GET /stats/history holds at most stats_history_points points, one per interval, with
    each stream's fps and latency; it needs the token."""

    async def main() -> None:
        settings = {"stats_history_points": 4, "stats_history_interval_s": 0.1}
        async with running_daemon(auth_token=TOKEN, **settings) as d, api(d, TOKEN) as h:
            c = await connect(d, token=TOKEN)
            for i in range(20):
                await c.send_frame("cam", i, jpeg())
                await collect(c, 1)
            await wait_for(lambda: len(d.stats.history.points) == 4, what="four points")
            await asyncio.sleep(0.3)  # more intervals pass: still four, the newest
            doc = (await h.get("/stats/history")).json()
            assert doc["interval_s"] == 0.1 and len(doc["points"]) == 4
            times = [p["t"] for p in doc["points"]]
            assert times == sorted(times) and times[-1] - times[0] >= 0.25
            assert any(p["streams"].get("cam", {}).get("fps", 0) > 0 for p in doc["points"])
            async with api(d) as anon:
                assert (await anon.get("/stats/history")).status_code == 401
            await c.close()

    run(main())


def settled(s: dict[str, Any], received: int) -> bool:
    """A stream has received this many frames and holds none."""
    return bool(s["received"] == received and s["queue_depth"] == 0 and s["in_flight"] == 0)


def test_patch_retunes_a_pushed_stream_and_refuses_bad_values() -> None:
    """PATCH /streams/{name} sets skip_frames over what the client said (every other frame is
    then dropped as skipped); bad bodies get 422, no stream 404, no token 401."""

    async def main() -> None:
        async with running_daemon(auth_token=TOKEN) as d, api(d, TOKEN) as h:
            c = await connect(d, token=TOKEN)
            await c.send_frame("cam", 0, jpeg())
            await collect(c, 1)
            r = await h.patch("/streams/cam", json={"skip_frames": 2})
            assert r.status_code == 200 and r.json()["skip_frames"] == 2
            for i in range(1, 11):  # one at a time: none superseded or over the queue
                await c.send_frame("cam", i, jpeg())
                await wait_for(lambda i=i: settled(stats(d)["streams"]["cam"], i + 1))  # type: ignore[misc]
            s = stats(d)["streams"]["cam"]
            assert s["processed"] == 6
            assert {k: v for k, v in s["dropped_by_reason"].items() if v} == {"skipped": 5} and s[
                "options"
            ]["skip_frames"] == 2
            for body in ({"skip_frames": 0}, {"max_fps": -1}, {"serve": "fifo"}, [], {}):
                r = await h.patch("/streams/cam", json=body)
                assert r.status_code == 422, body
                assert isinstance(r.json()["detail"], str)
            assert (await h.patch("/streams/nope", json={"max_fps": 1})).status_code == 404
            async with api(d) as anon:
                r = await anon.patch("/streams/cam", json={"max_fps": 1})
                assert r.status_code == 401
            await c.close()

    run(main())


def test_patch_retunes_a_pulled_camera(tmp_path: Path) -> None:
    """A camera's reader applies an operator's max_fps from its next frame: /cameras shows it
    and frames are throttled (counted) where none were before; a camera not streaming yet
    answers 204 for its frame."""
    clip = short_video(tmp_path / "clip.avi", frames=20, fps=20.0)
    spec = camera_config(name="clip", url=str(clip), loop=True, max_fps=0)
    dead = camera_config(name="dead", url="rtsp://127.0.0.1:9/none", retry_initial_s=30)

    async def main() -> None:
        async with running_daemon(auth_token=TOKEN, cameras=(spec, dead)) as d, api(d, TOKEN) as h:
            # A camera attaches its stream when added: one that never streamed answers "no frame yet".
            assert (await h.get("/streams/dead/frame.jpg")).status_code == 204
            await wait_for(lambda: stats(d)["streams"].get("clip", {}).get("processed", 0) > 5, 15)
            assert stats(d)["streams"]["clip"]["dropped_by_reason"]["throttled"] == 0
            assert (await h.get("/streams/clip/frame.jpg")).status_code in (200, 204)
            r = await h.patch("/streams/clip", json={"max_fps": 2})
            assert r.status_code == 200 and r.json()["max_fps"] == 2.0
            assert (await h.get("/cameras/clip")).json()["options"]["max_fps"] == 2.0
            await wait_for(
                lambda: stats(d)["streams"]["clip"]["dropped_by_reason"].get("throttled", 0) > 10,
                15,
                "throttled frames",
            )

    run(main())


def bearer(token: str) -> str:
    return "bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_a_browser_sends_its_token_as_a_websocket_subprotocol() -> None:
    """/ws takes the token as subprotocol bearer.<base64url> beside vision-daemon (a browser
    cannot set headers, and a URL would put it in logs); a wrong one is closed with 1008."""

    async def main() -> None:
        async with running_daemon(auth_token=TOKEN) as d:
            url = f"ws://127.0.0.1:{d.api_port}/ws"
            protocols: Any = ["vision-daemon", bearer(TOKEN)]
            async with websockets.connect(url, subprotocols=protocols, proxy=None) as ws:
                assert ws.subprotocol == "vision-daemon"
                await wait_for(lambda: stats(d)["ws"]["subscribers"] == 1)
                c = await connect(d, token=TOKEN)
                await c.send_frame("cam", 5, jpeg())
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert (msg["stream_name"], msg["frame_id"]) == ("cam", 5)
                await c.close()
            for wrong in (bearer("nope"), "bearer.%%%"):
                protocols = ["vision-daemon", wrong]
                async with websockets.connect(url, subprotocols=protocols, proxy=None) as ws:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 10)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    run(main())


def test_dashboard_files_are_served_with_a_strict_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/ serves index.html and /web/<name> the other files of the package's web directory, each
    with a Content-Security-Policy allowing only the daemon's origin; nothing else is served,
    and dashboard = false turns it off."""
    (tmp_path / "index.html").write_text("<!doctype html><script src='/web/app.js'></script>")
    (tmp_path / "app.js").write_text("console.log('hi')")
    monkeypatch.setattr(api_module, "WEB_DIR", tmp_path)

    async def main() -> None:
        async with running_daemon(auth_token=TOKEN) as d, api(d) as h:
            index = await h.get("/")
            assert index.status_code == 200 and index.headers["content-type"].startswith(
                "text/html"
            )
            csp = index.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp
            assert index.headers["referrer-policy"] == "no-referrer"
            script = await h.get("/web/app.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            for path in ("/web/nope.js", "/web/..%2Fapi.py", "/web/%2E%2E%2Fapi.py"):
                assert (await h.get(path)).status_code == 404, path
        async with running_daemon(dashboard=False) as d, api(d) as h:
            assert (await h.get("/")).status_code == 404

    run(main())
