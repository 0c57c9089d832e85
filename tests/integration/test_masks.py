"""Privacy masks (issue 27): the masked region is black in every JPEG the daemon serves or
stores (frame.jpg, a camera's snapshot.jpg, an event's snapshot), set in the config or by an
admin through the API; with detect on, a box under a mask is not reported. The pixels are
checked, not the settings."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import cv2
import numpy as np
import pytest
import websockets

from tests.conftest import SlowDetector, api, collect, connect, run, running_daemon
from tests.sources import MjpegServer
from vision_daemon.analytics import AnalyticsConfig, TrackingConfig
from vision_daemon.config import camera_config
from vision_daemon.masks import Mask

pytestmark = pytest.mark.slow  # real sockets, daemons, a real HTTP camera

H, W = 240, 320
LEFT = Mask("left", ((0, 0), (160, 0), (160, 240), (0, 240)))  # the left half


def bright() -> bytes:
    return bytes(cv2.imencode(".jpg", np.full((H, W, 3), 200, np.uint8))[1])


def halves(jpeg: bytes) -> tuple[float, float]:
    """Mean brightness of the left and right thirds of a JPEG (clear of the mask's edge)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    w = img.shape[1]
    return float(img[:, : w // 3].mean()), float(img[:, 2 * w // 3 :].mean())


def masked(jpeg: bytes) -> bool:
    left, right = halves(jpeg)
    return left < 10 and right > 100


async def ok_within(h: Any, path: str, timeout: float = 10.0) -> Any:
    """GET `path` until it answers 200 (polled with a deadline)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await h.get(path)
        if r.status_code == 200:
            return r
        assert asyncio.get_running_loop().time() < deadline, f"{path}: {r.status_code}"
        await asyncio.sleep(0.1)


def test_frames_event_snapshots_and_camera_snapshots_are_masked() -> None:
    """A config mask on a pushed stream, and one PUT by an admin on a pulled camera: frame.jpg,
    the event's stored snapshot and the camera's snapshot.jpg all have their left half black."""
    box = SlowDetector(0.0, label="person")
    analytics = AnalyticsConfig(tracking=TrackingConfig(new_object_classes=("person",)))
    with MjpegServer(size=(W, H), fps=10) as cam:
        spec = camera_config(name="cam", url=cam.url, max_fps=5)

        async def main() -> None:
            async with (
                running_daemon(
                    lambda: box,
                    masks={"push": (LEFT,)},
                    analytics=analytics,
                    track=True,
                    event_snapshots=True,
                    cameras=(spec,),
                ) as d,
                api(d) as h,
            ):
                url = f"ws://127.0.0.1:{d.api_port}/ws?kind=event&stream=push"
                async with websockets.connect(url, proxy=None) as ws:
                    c = await connect(d)
                    for i in range(3):
                        await c.send_image("push", i, bright(), "jpeg", None)
                        await collect(c, 1)
                        if i == 0:  # the stream exists: watch its frames from now on
                            assert (await h.get("/streams/push/frame.jpg")).status_code == 204
                    event = json.loads(await ws.recv())
                    assert event["type"] == "new_object" and event["snapshot"]
                    assert masked(base64.b64decode(event["snapshot"])), "event snapshot"
                    await c.close()
                frame = await h.get("/streams/push/frame.jpg")
                assert frame.status_code == 200 and masked(frame.content), "frame.jpg"
                put = await h.put("/streams/cam/masks", json={"masks": [LEFT.to_dict()]})
                assert put.status_code == 200 and put.json()["masks"][0]["name"] == "left"
                assert (await h.get("/streams/cam/masks")).json() == put.json()
                snap = await ok_within(h, "/cameras/cam/snapshot.jpg")
                left, _ = halves(snap.content)
                assert left < 10, "camera snapshot"

        run(main())


def test_a_box_under_a_detect_mask_is_not_reported() -> None:
    """The detector reports a box at (1, 2, 3, 4); under a mask with detect on it is left out
    of the result; under a mask without detect, or elsewhere, it is reported."""
    corner = Mask("corner", ((0, 0), (50, 0), (50, 50), (0, 50)), detect=True)
    shown = Mask("corner", ((0, 0), (50, 0), (50, 50), (0, 50)), detect=False)

    async def main() -> None:
        async with (
            running_daemon(
                lambda: SlowDetector(0.0), masks={"hid": (corner,), "shown": (shown,)}
            ) as d,
            api(d) as h,
        ):
            c = await connect(d)
            got = {}
            for i, stream in enumerate(("hid", "shown", "free")):
                await c.send_image(stream, i, bright(), "jpeg", None)
                (msg,) = await collect(c, 1)
                got[stream] = msg["detections"]
            assert got["hid"] == [] and len(got["shown"]) == 1 and len(got["free"]) == 1
            r = await h.put("/streams/free/masks", json={"masks": [corner.to_dict()]})
            assert r.status_code == 200
            await c.send_image("free", 9, bright(), "jpeg", None)
            (msg,) = await collect(c, 1)
            assert msg["detections"] == []  # an admin's mask applies from the next frame
            bad = await h.put(
                "/streams/free/masks", json={"masks": [{"name": "x", "polygon": [[0, 0]]}]}
            )
            assert bad.status_code == 422 and "3-64 points" in bad.json()["detail"]
            await c.close()

    run(main())
