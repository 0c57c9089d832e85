"""Motion gating: a frame that barely changed since the stream's last analysed frame reuses its
detections (`reused: true`, counted as unchanged) instead of running the detector."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from clients.lib import ClientError
from tests.conftest import SlowDetector, collect, connect, jpeg, run, running_daemon, stats
from vision_daemon.motion import MotionGate, changed_share, thumbnail


def scene(seed: int = 1, h: int = 480, w: int = 640) -> np.ndarray:
    """A textured BGR frame (random blocks), the same for the same seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


# ---- fast: the policy ---------------------------------------------------------------------------
def test_changed_share_ignores_noise_and_sees_a_moving_object() -> None:
    """Sensor noise of a few grey levels on every pixel is no change; a person-sized object
    that appears is; a tiny speck is under a 0.5% gate."""
    base = scene()
    rng = np.random.default_rng(2)
    noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    assert changed_share(thumbnail(base), thumbnail(noisy)) == 0.0
    person = base.copy()
    cv2.rectangle(person, (300, 150), (380, 420), (255, 255, 255), -1)
    assert changed_share(thumbnail(base), thumbnail(person)) > 0.02
    speck = base.copy()
    cv2.rectangle(speck, (10, 10), (14, 14), (255, 255, 255), -1)
    assert changed_share(thumbnail(base), thumbnail(speck)) < 0.005
    assert changed_share(thumbnail(base), thumbnail(scene(h=240))) == 1.0  # another size


def test_gate_reuses_fresh_detections_and_compares_with_the_last_analysed_frame() -> None:
    """Nothing is reused before a frame was analysed, nor after refresh_s, nor for a changed
    frame; small steps add up against the reference until the frame must be analysed."""
    gate = MotionGate(threshold=0.01, refresh_s=5.0)
    base = scene()
    dets = [{"label": "person", "conf": 0.9, "bbox": [1.0, 2.0, 3.0, 4.0], "class_id": 0}]
    assert gate.reuse(thumbnail(base), now=0.0) is None
    gate.analysed(thumbnail(base), dets, now=0.0)
    reused = gate.reuse(thumbnail(base), now=1.0)
    assert reused == dets and reused is not dets  # a copy: nobody shares the list
    assert gate.reuse(thumbnail(base), now=5.0) is None  # refresh_s passed
    moving = base.copy()
    steps = []
    for x in range(0, 400, 8):  # an object creeping in 8 px a frame
        cv2.rectangle(moving, (x, 200), (x + 8, 300), (255, 255, 255), -1)
        steps.append(gate.reuse(thumbnail(moving), now=1.0) is not None)
    assert steps[0] and not steps[-1]  # the first step is reused; the sum of them is not


# ---- slow: a real daemon ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_gated_stream_reuses_detections_for_unchanged_frames_and_counts_them() -> None:
    """With hello option motion_gate, repeats of a frame come back with the first frame's
    detections and reused: true, without a detector call, counted as unchanged (part of
    processed) in /stats and /metrics; a changed frame and refresh_s bring inference back; a
    stream that did not ask is never gated."""
    detector = SlowDetector(0.0)

    async def main() -> None:
        async with running_daemon(lambda: detector, motion_refresh_s=0.5) as d:
            c = await connect(d, options={"motion_gate": 0.01})
            still, other = jpeg(value=60), jpeg(value=200)
            replies = []
            for i, image in enumerate([still] * 4 + [other]):
                await c.send_frame("door", i, image)
                replies += await collect(c, 1)
            assert [r.get("reused", False) for r in replies] == [False, True, True, True, False]
            assert all(r["detections"] == replies[0]["detections"] for r in replies)
            assert detector.calls == 2
            await asyncio.sleep(0.6)  # past motion_refresh_s: analysed again, unchanged or not
            await c.send_frame("door", 5, other)
            assert "reused" not in (await collect(c, 1))[0]
            s = stats(d)["streams"]["door"]
            assert (s["processed"], s["unchanged"], s["options"]["motion_gate"]) == (6, 3, 0.01)
            assert stats(d)["totals"]["unchanged"] == 3
            metrics = d.metrics.render().decode()
            assert 'vision_daemon_frames_unchanged_total{stream="door"} 3.0' in metrics
            plain = await connect(d)  # no option, daemon default 0: never gated
            for i in range(3):
                await plain.send_frame("plain", i, still)
                assert "reused" not in (await collect(plain, 1))[0]
            with pytest.raises(ClientError, match="motion_gate must be a share"):
                await connect(d, options={"motion_gate": 2})  # refused at the handshake
            for client in (c, plain):
                await client.close()

    run(main())
