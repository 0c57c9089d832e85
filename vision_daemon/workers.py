"""Worker pool: each worker owns one daemon thread and one detector; decode and inference run there.

Fault isolation: nothing a frame or a detector does can end a worker. `process` turns every
exception into a per-frame error, a call that outlives `worker_timeout_s` is abandoned and the
worker restarts on a fresh thread with capped backoff, and a supervisor restarts the worker loop
itself if anything else escapes it. Verdicts go back to the pipeline as `Report`s on one queue.

Why daemon threads and not processes: a process per detector (Frigate's choice) could be killed,
but every frame would then cross a process boundary (a 640x480 BGR frame is 900 KB to copy or
share, plus the results back), and each process would load its own runtime. A hung call in a
daemon thread cannot be interrupted either, but it no longer holds the process at exit (daemon
threads are not joined), and abandoned threads are capped per worker. Measured against the
executor threads this replaced: no cost (docs/PERFORMANCE.md, "the one-way core against the code
before it").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from vision_daemon.decode import DecodeFailure, decode_for
from vision_daemon.detectors.base import (
    BackendError,
    Detection,
    Detector,
    DetectorFactory,
    ModelInfo,
)
from vision_daemon.motion import MotionGate, thumbnail
from vision_daemon.outputs import snapshot_jpeg
from vision_daemon.protocol import E_BACKEND, E_DECODE, E_DETECTOR
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import WorkerStats
from vision_daemon.streams import Analysis, Job, Outcome, Report, Reports

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 5.0, 30.0)  # waits before successive restarts of one worker
MAX_ABANDONED_THREADS = 3  # hung calls a worker may leave behind before it is marked failed

T = TypeVar("T")


class WorkerThread:
    """One daemon thread running submitted calls in order; results come back as loop futures."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args, fut, loop = item
            try:
                result, error = fn(*args), None
            except Exception as exc:  # handed to the awaiting task, never lost in the thread
                result, error = None, exc
            except BaseException as exc:  # SystemExit & co. must not surface as such in the loop
                result, error = None, RuntimeError(f"worker call raised {exc!r}")
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop closed while this call ran (abandoned at shutdown)
                return
            # Nothing of a finished call stays alive while the thread waits for the next one: its
            # frames may be views of a client's shared memory, unmapped with the last view.
            del item, fn, args, fut, result, error

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, args, fut, loop))
        return fut

    def stop(self) -> None:
        """The thread ends after its current call; it is never joined."""
        self._calls.put(None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a long call (model export, load) where a signal can abandon it and exit at once."""
    thread = WorkerThread(f"vision-{getattr(fn, '__name__', 'call')}")
    try:
        return await thread.submit(fn, *args)
    finally:
        thread.stop()


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
            outcome.snapshot = snapshot_jpeg(image, analysis.snapshot_max_bytes)
    except Exception:  # the analytics failing must not cost the frame its detections
        log.exception(
            "analytics of stream %s failed on frame %d", job.stream.name, job.frame.frame_id
        )
    outcome.timings["track_ms"] = (time.perf_counter() - t0) * 1000


def takes_contended(detector: Detector) -> bool:
    """Whether `detect` accepts the pool's `contended` hint (checked once per loaded detector)."""
    try:
        return "contended" in inspect.signature(detector.detect).parameters
    except (TypeError, ValueError):
        return False


def share_cores(policy: str, others_busy: int, waiting: int) -> bool:
    """Which of OpenVINO's two compiled copies a call uses: the shared-cores one when...

    "busy": another worker is inside a call (throughput under load; at medium load two calls
    that overlap once keep overlapping). "waiting": another worker is busy and frames are also
    waiting in queues (all cores otherwise). docs/PERFORMANCE.md has both measured.
    """
    return others_busy > 0 and (policy == "busy" or waiting > 0)


class Worker:
    def __init__(self, worker_id: int, factory: DetectorFactory, window_s: float) -> None:
        self.id = worker_id
        self.factory = factory
        self.stats = WorkerStats(worker_id, window_s)
        self.thread = WorkerThread(f"vision-worker-{worker_id}")
        self.detector: Detector | None = None
        self.takes_contended = True
        self.abandoned = 0

    def _load(self) -> Detector:
        detector = self.factory()
        detector.warmup()
        return detector

    async def load(self) -> ModelInfo:
        self.stats.state = "starting"
        self.detector = await self.thread.submit(self._load)
        self.takes_contended = takes_contended(self.detector)
        self.stats.state = "ready"
        log.info(
            "worker %d ready: %s warm-up %.0f ms",
            self.id,
            self.detector.info.name,
            self.detector.info.warmup_ms,
        )
        return self.detector.info

    def abandon_thread(self) -> None:
        """A stuck call cannot be interrupted: leave its thread behind and start a fresh one."""
        self.thread.stop()
        self.abandoned += 1
        self.thread = WorkerThread(f"vision-worker-{self.id}")
        self.detector = None


class WorkerPool:
    def __init__(
        self,
        count: int,
        factory: DetectorFactory,
        scheduler: Scheduler,
        reports: Reports,
        *,
        max_batch: int,
        batch_wait_s: float,
        max_pixels: int,
        timeout_s: float,
        window_s: float,
        share_cores: str = "busy",
        reduced_decode: bool = True,
    ) -> None:
        self.workers = [Worker(i, factory, window_s) for i in range(count)]
        self._policy = share_cores
        self._scheduler = scheduler
        self._reports = reports
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._max_pixels = max_pixels
        self._reduced_decode = reduced_decode
        self._timeout_s = timeout_s
        self._tasks: list[asyncio.Task[None]] = []
        self.batch_sizes: dict[int, int] = {}

    async def load(self) -> ModelInfo:
        """Load and warm every worker's model, one worker after another; a failure is raised.

        Not in parallel: OpenVINO's Python binding initialises function-local statics on the
        first inference, and two threads making their first call together can deadlock there
        (one holds the GIL and waits for the static, the other holds the static and waits for
        the GIL), freezing the whole process, signals included: 1 process in 12 froze when two
        direct-path detectors warmed up at once. Loading in turn costs a start-up the time one
        worker takes to load, per extra worker (0.7 s with the shared int8 yolov8n here)."""
        infos = [await w.load() for w in self.workers]
        return infos[0]

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._supervise(w), name=f"worker-{w.id}") for w in self.workers
        ]

    def down(self) -> list[int]:
        """Workers that cannot take frames now (stuck, restarting, failed, or not loaded)."""
        return [
            w.id
            for w in self.workers
            if w.detector is None or w.stats.state in ("stuck", "restarting", "failed")
        ]

    def busy(self) -> int:
        """Workers inside a detector call now: the one count the core-sharing policy reads."""
        return sum(1 for w in self.workers if w.stats.busy_since is not None)

    async def _supervise(self, worker: Worker) -> None:
        """Keep the worker's loop running: an escaped exception restarts it, with backoff."""
        while True:
            try:
                await self._serve(worker)
                return  # the scheduler closed, or the worker failed for good
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %d loop failed; restarting it", worker.id)
                if not await self._restart(worker):
                    return

    async def _serve(self, worker: Worker) -> None:
        while True:
            if worker.detector is None and not await self._restart(worker):
                return
            jobs = await self._scheduler.take(self._max_batch, self._batch_wait_s)
            if not jobs:
                return  # scheduler closed
            detector = worker.detector
            assert detector is not None  # (re)loaded above; only this task replaces it
            contended = share_cores(self._policy, self.busy(), self._scheduler.waiting)
            worker.stats.start(time.monotonic())
            self.batch_sizes[len(jobs)] = self.batch_sizes.get(len(jobs), 0) + 1
            fut = worker.thread.submit(
                process,
                detector,
                jobs,
                self._max_pixels,
                contended,
                worker.takes_contended,
                detector.info.imgsz if self._reduced_decode else 0,
            )
            try:
                outcomes = await asyncio.wait_for(asyncio.shield(fut), self._timeout_s)
                if len(outcomes) != len(jobs):
                    raise RuntimeError(f"{len(outcomes)} outcomes for {len(jobs)} frames")
            except asyncio.CancelledError:
                # Shutdown ran past its grace: these frames end without a result, counted.
                worker.stats.busy_since = None
                for job in jobs:
                    self._reports.put(Report(job, dropped="shutdown"))
                raise
            except TimeoutError:
                log.error(
                    "worker %d stuck for over %.1f s on %d frame(s); replacing its thread",
                    worker.id,
                    self._timeout_s,
                    len(jobs),
                )
                worker.stats.state = "stuck"
                worker.stats.busy_since = None
                for job in jobs:
                    self._reports.put(Report(job, dropped="worker_timeout"))
                worker.abandon_thread()
                if not await self._restart(worker):
                    return
                continue
            except Exception:  # the frames it holds end as counted drops; the supervisor restarts
                worker.stats.busy_since = None
                for job in jobs:
                    self._reports.put(Report(job, dropped="internal_error"))
                raise
            worker.stats.finish(time.monotonic(), len(jobs))
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome.error == E_DETECTOR:
                    worker.stats.errors += 1
                self._reports.put(Report(job, outcome))
            # Likewise the reported batch, while this task waits for the next one.
            del jobs, job

    async def _restart(self, worker: Worker) -> bool:
        if worker.abandoned >= MAX_ABANDONED_THREADS:
            worker.stats.state = "failed"
            log.error(
                "worker %d left %d hung calls behind; it stays down (restart the daemon)",
                worker.id,
                worker.abandoned,
            )
            return False
        backoff = RESTART_BACKOFF_S[min(worker.stats.restarts, len(RESTART_BACKOFF_S) - 1)]
        worker.stats.restarts += 1
        worker.stats.state = "restarting"
        log.warning("worker %d restart #%d in %.0f s", worker.id, worker.stats.restarts, backoff)
        await asyncio.sleep(backoff)  # rate limit: a model that keeps hanging cannot spin
        try:
            if worker.detector is None:
                await worker.load()
            else:
                worker.stats.state = "ready"
        except Exception as exc:
            worker.stats.state = "failed"
            log.error("worker %d could not restart: %s", worker.id, exc)
            return False
        return True

    async def stop(self, grace_s: float) -> None:
        """Let in-flight calls finish within the grace period, then stop the tasks and threads."""
        self._scheduler.close()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for w in self.workers:
            w.thread.stop()  # a thread still inside a hung call is a daemon: exit does not wait
            w.stats.state = "stopped"
