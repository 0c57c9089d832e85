"""What a worker does with one batch, in its own thread: decode every frame (reduced where the
model input allows, motion-gated where the stream asks), one detector call, the stream's
threshold, and tracking, lines and zones; every exception becomes that frame's error."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from vision_daemon.decode import DecodeFailure, decode_for
from vision_daemon.detectors.base import BackendError, Detection, Detector
from vision_daemon.masks import black_out, detecting, inside
from vision_daemon.motion import MotionGate, thumbnail
from vision_daemon.outputs import snapshot_jpeg
from vision_daemon.protocol import E_BACKEND, E_DECODE, E_DETECTOR
from vision_daemon.streams import Analysis, Job, Outcome

log = logging.getLogger(__name__)


def normalise(dets: Any) -> list[Detection]:
    """Detector output as plain Python types (msgpack and JSON cannot carry numpy scalars)."""
    out: list[Detection] = []
    for d in dets:
        conf = float(d["conf"])
        bbox = [float(v) for v in d["bbox"]]
        if len(bbox) != 4 or not all(math.isfinite(v) for v in (conf, *bbox)):
            raise ValueError(f"detection has a non-finite or malformed box: conf={conf} {bbox}")
        out.append(
            Detection(label=str(d["label"]), conf=conf, bbox=bbox, class_id=int(d["class_id"]))
        )
    return out


def scale_up(dets: list[Detection], k: int, w: int, h: int) -> list[Detection]:
    """Boxes found on a 1/k decode, in pixels of the w x h image as sent."""
    for d in dets:
        x1, y1, x2, y2 = d["bbox"]
        d["bbox"] = [
            round(min(x1 * k, w), 1),
            round(min(y1 * k, h), 1),
            round(min(x2 * k, w), 1),
            round(min(y2 * k, h), 1),
        ]
    return dets


@dataclass
class _Decoded:
    """A batch's frames after decoding: what goes to the detector, and what each frame needs
    afterwards."""

    images: list[np.ndarray] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)  # the jobs whose image is in `images`, in order
    scales: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # 1/k: (k, w, h)
    gated: dict[int, tuple[MotionGate, np.ndarray]] = field(default_factory=dict)
    decoded: dict[int, np.ndarray] = field(default_factory=dict)  # tracked streams' images


def _decode_all(
    jobs: Sequence[Job], outcomes: list[Outcome], max_pixels: int, model_size: int
) -> _Decoded:
    """Decode every frame (errors go to its outcome); a motion-gated frame that barely changed
    takes its stream's last detections and is left out of the detector call."""
    b = _Decoded()
    images, ok, scales, gated, decoded = b.images, b.ok, b.scales, b.gated, b.decoded
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            analysis = job.stream.analysis
            keeps_image = analysis is not None and analysis.snapshot_max_bytes > 0
            got = decode_for(job.frame, max_pixels, 0 if keeps_image else model_size)
            image = got.image
            hidden = detecting(job.stream.masks)
            if hidden:  # the detector never sees what a privacy mask covers
                image = black_out(image, hidden, 1.0 / got.k)
            if got.k > 1:
                scales[i] = (got.k, got.width, got.height)
            if analysis is not None:
                decoded[i] = image
            gate = job.stream.motion
            if gate is not None:
                thumb = thumbnail(image)
                reused = gate.reuse(thumb, time.monotonic())
                if reused is not None:
                    outcomes[i].detections, outcomes[i].reused = reused, True
                    outcomes[i].timings["decode_ms"] = (time.perf_counter() - t0) * 1000
                    continue
                gated[i] = (gate, thumb)
            images.append(image)
            ok.append(i)
        except DecodeFailure as exc:
            outcomes[i].error, outcomes[i].message = exc.code, exc.message
        except Exception as exc:  # a codec raising on crafted bytes: that frame only
            outcomes[i].error = E_DECODE
            outcomes[i].message = f"image could not be decoded ({type(exc).__name__})"
        outcomes[i].timings["decode_ms"] = (time.perf_counter() - t0) * 1000
    return b


def process(
    detector: Detector,
    jobs: Sequence[Job],
    max_pixels: int,
    contended: bool,
    pass_hint: bool = True,
    model_size: int = 0,
) -> list[Outcome]:
    """Runs in the worker's thread: decode every frame, then one detector call for the batch.

    A JPEG at least twice `model_size` (the detector's input) is decoded at 1/k scale and its
    boxes are scaled back by k, except for streams whose events carry snapshots (those keep the
    full image). A frame of a motion-gated stream that barely changed since the stream's last
    analysed frame takes that frame's detections instead (`reused`) and is left out of the call."""
    outcomes = [Outcome() for _ in jobs]
    batch = _decode_all(jobs, outcomes, max_pixels, model_size)
    images, ok, scales, gated, decoded = (
        batch.images,
        batch.ok,
        batch.scales,
        batch.gated,
        batch.decoded,
    )
    if images:
        t0 = time.perf_counter()
        try:
            results = (  # a detector written against the one-argument interface gets no hint
                detector.detect(images, contended=contended)
                if pass_hint
                else detector.detect(images)
            )
            if len(results) != len(images):
                raise ValueError(f"{len(results)} results for {len(images)} images")
            clean = [normalise(r) for r in results]
        except BackendError as exc:  # the remote endpoint, not this frame: dropped, not an error
            for i in ok:
                outcomes[i].error, outcomes[i].message = E_BACKEND, str(exc)[:300]
            return outcomes
        except Exception as exc:
            message = f"detector failed: {type(exc).__name__}: {str(exc)[:200]}"
            for i in ok:
                outcomes[i].error, outcomes[i].message = E_DETECTOR, message
            return outcomes
        infer_ms = (time.perf_counter() - t0) * 1000
        now = time.monotonic()
        for i, dets in zip(ok, clean, strict=True):
            if i in scales:
                dets = scale_up(dets, *scales[i])
            floor = jobs[i].stream.options.min_confidence  # the stream's own threshold
            if floor > 0:
                dets = [d for d in dets if d["conf"] >= floor]
            hidden = detecting(jobs[i].stream.masks)
            if hidden:  # nor reports a box whose centre lies under one
                dets = [d for d in dets if not inside(d["bbox"], hidden)]
            outcomes[i].detections = dets
            outcomes[i].timings["infer_ms"] = infer_ms
            if i in gated:
                gate, thumb = gated[i]
                gate.analysed(thumb, dets, now)
    for i, job in enumerate(jobs):
        analysis = job.stream.analysis  # read once: an operator may replace it meanwhile
        if analysis is not None and outcomes[i].detections is not None:
            analyse(job, analysis, outcomes[i], decoded.get(i))
    return outcomes


def analyse(job: Job, analysis: Analysis, outcome: Outcome, image: np.ndarray | None) -> None:
    """Tracking, lines and zones for one analysed frame, in the worker's thread (off the event
    loop), timed by the frame's receipt: detections gain track_id, and its events (with a
    snapshot if the stream wants them) travel back in the outcome."""
    t0 = time.perf_counter()
    try:
        tracked, outcome.events, outcome.counts = analysis.update(
            outcome.detections or [], job.received_at
        )
        outcome.detections = cast(list[Detection], tracked)
        if outcome.events and analysis.snapshot_max_bytes and image is not None:
            masked = black_out(image, job.stream.masks)  # stored snapshots are masked too
            outcome.snapshot = snapshot_jpeg(masked, analysis.snapshot_max_bytes)
    except Exception:  # the analytics failing must not cost the frame its detections
        log.exception(
            "analytics of stream %s failed on frame %d", job.stream.name, job.frame.frame_id
        )
    outcome.timings["track_ms"] = (time.perf_counter() - t0) * 1000
