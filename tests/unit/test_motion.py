"""Motion gating as policy: the changed share of two frames and the gate's reuse of fresh
detections."""

from __future__ import annotations

import cv2
import numpy as np

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
