"""Worker pool: each worker owns one thread and one detector; decoding and inference run there."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image as PILImage

from vision_daemon.detectors.base import Detection, Detector, DetectorFactory, Image, ModelInfo
from vision_daemon.protocol import E_DECODE, E_DETECTOR, E_IMAGE_TOO_LARGE, Frame
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import WorkerStats
from vision_daemon.streams import Job

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 5.0, 30.0)  # waits before successive restarts of one worker


class DecodeFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode(frame: Frame, max_pixels: int) -> Image:
    """Decode to BGR uint8; the pixel limit is checked from the header before the full decode."""
    if frame.encoding == "raw":
        assert frame.shape is not None  # validated by protocol.parse_message
        h, w, _ = frame.shape
        if h * w > max_pixels:
            raise DecodeFailure(
                E_IMAGE_TOO_LARGE, f"image {w}x{h} exceeds max_image_pixels={max_pixels}"
            )
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape)
    try:
        # Pillow reads only the header here: a 100k x 100k "decompression bomb" costs nothing.
        with PILImage.open(io.BytesIO(frame.image)) as header:
            w, h = header.size
    except Exception:
        raise DecodeFailure(E_DECODE, "image bytes are not a decodable JPEG or PNG") from None
    if w * h > max_pixels:
        raise DecodeFailure(
            E_IMAGE_TOO_LARGE, f"image {w}x{h} exceeds max_image_pixels={max_pixels}"
        )
    img: Image | None = cv2.imdecode(  # type: ignore[assignment]
        np.frombuffer(frame.image, dtype=np.uint8), cv2.IMREAD_COLOR
    )
    if img is None:
        raise DecodeFailure(E_DECODE, "image bytes are not a decodable JPEG or PNG")
    return img


@dataclass(slots=True)
class Outcome:
    """What a worker made of one job: detections, or an error code that drops the frame."""

    detections: list[Detection] | None = None
    error: str | None = None  # protocol error code
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def process(detector: Detector, jobs: list[Job], max_pixels: int) -> list[Outcome]:
    """Runs in the worker's thread: decode every frame, then one detector call for the batch."""
    outcomes = [Outcome() for _ in jobs]
    images: list[Image] = []
    ok: list[int] = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            images.append(decode(job.frame, max_pixels))
            ok.append(i)
        except DecodeFailure as exc:
            outcomes[i].error, outcomes[i].message = exc.code, exc.message
        outcomes[i].timings["decode_ms"] = (time.perf_counter() - t0) * 1000
    if images:
        t0 = time.perf_counter()
        try:
            results = detector.detect(images)
        except Exception as exc:
            log.warning("detector raised on a batch of %d: %r", len(images), exc)
            for i in ok:
                outcomes[i].error, outcomes[i].message = E_DETECTOR, f"detector failed: {exc}"
            return outcomes
        infer_ms = (time.perf_counter() - t0) * 1000
        for i, dets in zip(ok, results, strict=True):
            outcomes[i].detections = dets
            outcomes[i].timings["infer_ms"] = infer_ms
    return outcomes


OutcomeFn = Callable[[Job, Outcome], None]
DropFn = Callable[[Job, str], None]


class Worker:
    def __init__(self, worker_id: int, factory: DetectorFactory, window_s: float) -> None:
        self.id = worker_id
        self.factory = factory
        self.stats = WorkerStats(worker_id, window_s)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"vision-worker-{worker_id}")
        self.detector: Detector | None = None

    def _load(self) -> Detector:
        detector = self.factory()
        detector.warmup()
        return detector

    async def load(self) -> ModelInfo:
        loop = asyncio.get_running_loop()
        self.stats.state = "starting"
        self.detector = await loop.run_in_executor(self.executor, self._load)
        self.stats.state = "ready"
        log.info(
            "worker %d ready: %s warm-up %.0f ms",
            self.id,
            self.detector.info.name,
            self.detector.info.warmup_ms,
        )
        return self.detector.info

    def replace_thread(self) -> None:
        """A stuck call cannot be interrupted: abandon its thread and start on a fresh one."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"vision-worker-{self.id}")
        self.detector = None


class WorkerPool:
    def __init__(
        self,
        count: int,
        factory: DetectorFactory,
        scheduler: Scheduler,
        *,
        max_batch: int,
        batch_wait_s: float,
        max_pixels: int,
        timeout_s: float,
        window_s: float,
        on_outcome: OutcomeFn,
        on_drop: DropFn,
    ) -> None:
        self.workers = [Worker(i, factory, window_s) for i in range(count)]
        self._scheduler = scheduler
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._max_pixels = max_pixels
        self._timeout_s = timeout_s
        self._on_outcome = on_outcome
        self._on_drop = on_drop
        self._tasks: list[asyncio.Task[None]] = []
        self.batch_sizes: dict[int, int] = {}
        self.model_info: ModelInfo | None = None

    async def load(self) -> ModelInfo:
        """Load and warm every worker's model in parallel; the first failure is raised."""
        infos = await asyncio.gather(*(w.load() for w in self.workers))
        self.model_info = infos[0]
        return infos[0]

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(w), name=f"worker-{w.id}") for w in self.workers
        ]

    @property
    def ready(self) -> bool:
        return all(w.detector is not None for w in self.workers)

    def busy(self) -> int:
        return sum(1 for w in self.workers if w.stats.busy_since is not None)

    async def _run(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._scheduler.take(self._max_batch, self._batch_wait_s)
            if not jobs:
                return  # scheduler closed
            assert worker.detector is not None
            now = time.monotonic()
            worker.stats.start(now)
            self.batch_sizes[len(jobs)] = self.batch_sizes.get(len(jobs), 0) + 1
            fut = loop.run_in_executor(
                worker.executor, process, worker.detector, jobs, self._max_pixels
            )
            try:
                outcomes = await asyncio.wait_for(asyncio.shield(fut), self._timeout_s)
            except asyncio.CancelledError:
                # Shutdown ran past its grace: these frames end without a result, counted.
                for job in jobs:
                    self._on_drop(job, "shutdown")
                    self._scheduler.done(job)
                raise
            except TimeoutError:
                log.error(
                    "worker %d stuck for over %.1f s on %d frame(s); replacing it",
                    worker.id,
                    self._timeout_s,
                    len(jobs),
                )
                worker.stats.state = "stuck"
                worker.stats.busy_since = None
                for job in jobs:
                    self._on_drop(job, "worker_timeout")
                    self._scheduler.done(job)
                worker.replace_thread()
                if not await self._restart(worker):
                    return
                continue
            worker.stats.finish(time.monotonic(), len(jobs))
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome.error == E_DETECTOR:
                    worker.stats.errors += 1
                self._on_outcome(job, outcome)
                self._scheduler.done(job)

    async def _restart(self, worker: Worker) -> bool:
        backoff = RESTART_BACKOFF_S[min(worker.stats.restarts, len(RESTART_BACKOFF_S) - 1)]
        worker.stats.restarts += 1
        worker.stats.state = "restarting"
        log.warning("worker %d restart #%d in %.0f s", worker.id, worker.stats.restarts, backoff)
        await asyncio.sleep(backoff)  # rate limit: a model that keeps hanging cannot spin
        try:
            await worker.load()
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
            w.executor.shutdown(wait=False, cancel_futures=True)
