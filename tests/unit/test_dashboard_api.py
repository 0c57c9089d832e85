"""The dashboard's policies without sockets: the latest-frame store and the stats history ring."""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np

from tests.conftest import jpeg, run
from vision_daemon.outputs import LatestFrames
from vision_daemon.protocol import Frame
from vision_daemon.snapshot import History


# ---- fast: the policies -----------------------------------------------------------------------
def test_latest_frames_keeps_nothing_until_watched_and_lets_go_after() -> None:
    """A frame is kept only while someone asked for its stream in the last watch_s, and at most
    one per stream; the stored JPEG bytes are served as they are, with the frame's id."""
    frames = LatestFrames(watch_s=10.0)
    one, two = jpeg(value=10), jpeg(value=200)
    frames.keep(Frame("cam", 1, 0.0, one, "jpeg"), now=0.0)
    assert frames.kept == 0  # no one looks: nothing held
    assert run(frames.image("cam", now=1.0)) is None  # the first request starts watching
    frames.keep(Frame("cam", 2, 0.0, one, "jpeg"), now=2.0)
    frames.keep(Frame("cam", 3, 0.0, two, "jpeg"), now=3.0)
    image = run(frames.image("cam", now=4.0))
    assert frames.kept == 1 and image is not None
    assert (image.frame_id, image.body, image.media_type) == (3, two, "image/jpeg")
    frames.keep(Frame("cam", 4, 0.0, one, "jpeg"), now=14.5)  # past 4 + 10 s: let go
    assert frames.kept == 0


def test_latest_frames_copies_a_shared_memory_view_and_encodes_pixels() -> None:
    """A shared-memory view is copied when kept (its slot goes back to the client, which
    overwrites it); pixels are served as a JPEG of the same size."""
    ring = np.zeros((48, 64, 3), dtype=np.uint8)
    ring[:] = 200
    view = ring.view()
    view.flags.writeable = False
    frames = LatestFrames()
    run(frames.image("shm", now=0.0))
    frames.keep(Frame("shm", 7, 0.0, b"", "shm", (48, 64, 3), pixels=view, slot=0), now=0.5)
    ring[:] = 0  # the client reuses the slot
    image = run(frames.image("shm", now=1.0))
    assert image is not None and image.media_type == "image/jpeg" and image.frame_id == 7
    decoded = cv2.imdecode(np.frombuffer(image.body, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3) and abs(float(decoded.mean()) - 200) < 3


def history_data(dropped: int, fps: float, streams: tuple[str, ...] = ("a",)) -> dict[str, Any]:
    """The fields of a snapshot's data that a history point reads."""
    latency = {"total": {"p50": 10.0, "p99": 30.0}}
    return {
        "dropped_frames": dropped,
        "fps": fps,
        "queue_size": 1,
        "totals": {"latency_ms": latency},
        "streams": {
            n: {"processed_fps": fps, "latency_ms": latency, "queue_depth": 1} for n in streams
        },
    }


def test_history_is_spaced_bounded_and_counts_drops_per_second() -> None:
    """One point per interval however often it is offered, at most `points` kept (the oldest
    go), drops as a rate over the interval, every stream in each point."""
    history = History(points=3, interval_s=2.0)
    for i, t in enumerate([0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0]):
        history.offer(history_data(dropped=10 * i, fps=float(i)), now=t, wall=1000 + t)
    doc = json.loads(history.body())
    assert doc["interval_s"] == 2.0 and [p["t"] for p in doc["points"]] == [1004, 1006, 1008]
    assert doc["points"][-1]["dropped_per_s"] == 5.0  # 20 drops over 2 s
    assert doc["points"][-1]["streams"]["a"] == {
        "fps": 7.0,
        "p50_ms": 10.0,
        "p99_ms": 30.0,
        "queue": 1,
    }
    assert json.loads(History(points=0).body())["points"] == []
