"""Worker pool: each worker owns one daemon thread and one detector; decode and inference run there.

Fault isolation: nothing a frame or a detector does can end a worker. `process` turns every
exception into a per-frame error, a call that outlives `worker_timeout_s` is abandoned (its
frames drop as `worker_timeout`) and the worker is replaced by a fresh thread and detector, and a
supervisor restarts the worker loop itself if anything else escapes it. A worker is never
retired: a replacement that fails to load is tried again with capped backoff, and a worker whose
abandoned calls are still running (at most MAX_ABANDONED_THREADS) waits for one to end before it
takes frames again. Verdicts go back to the pipeline as `Report`s on one queue.

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
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vision_daemon.batch import normalise as normalise
from vision_daemon.batch import process
from vision_daemon.detectors.base import (
    Detector,
    DetectorFactory,
    ModelInfo,
)
from vision_daemon.protocol import E_DETECTOR
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import WorkerStats
from vision_daemon.streams import Report, Reports

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 5.0, 30.0)  # waits before a restart, by failures in a row
MAX_ABANDONED_THREADS = 3  # abandoned calls still running that a worker may leave behind at once

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
        self.abandoned: list[asyncio.Future[Any]] = []  # calls left running on abandoned threads
        self.strikes = 0  # failed loads and loop failures since its last answered batch

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

    def abandon_thread(self, call: asyncio.Future[Any]) -> None:
        """A stuck call cannot be interrupted: leave its thread behind (it ends once `call`
        returns) and start a fresh one."""
        self.thread.stop()
        self.abandoned.append(call)
        call.add_done_callback(self._call_ended)
        self.thread = WorkerThread(f"vision-worker-{self.id}")
        self.detector = None

    def _call_ended(self, call: asyncio.Future[Any]) -> None:
        """An abandoned call returned: its late result or error is nobody's, and not kept (an
        error's traceback would hold the batch's images)."""
        self.abandoned.remove(call)
        if not call.cancelled():
            call.exception()  # retrieved: asyncio logs no "exception was never retrieved"


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
        """Workers that cannot take frames now (stuck, restarting, or not loaded)."""
        return [
            w.id
            for w in self.workers
            if w.detector is None or w.stats.state in ("stuck", "restarting")
        ]

    def health(self) -> tuple[bool, str]:
        """(whether every worker can take frames, why not)."""
        down = self.down()
        if down:
            why = {w.id: w.stats.state for w in self.workers if w.id in down}
            return False, f"worker(s) down: {why}"
        return True, ""

    def busy(self) -> int:
        """Workers inside a detector call now: the one count the core-sharing policy reads."""
        return sum(1 for w in self.workers if w.stats.busy_since is not None)

    async def _supervise(self, worker: Worker) -> None:
        """Keep the worker's loop running: an escaped exception restarts it, with backoff."""
        while True:
            try:
                await self._serve(worker)
                return  # the scheduler closed
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %d loop failed; restarting it", worker.id)
                await self._restart(worker, strike=True)

    async def _serve(self, worker: Worker) -> None:
        while True:
            if worker.detector is None:
                await self._restart(worker, strike=False)
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
                worker.abandon_thread(fut)
                await self._restart(worker, strike=False)  # the timeout itself paced this one
                continue
            except Exception:  # the frames it holds end as counted drops; the supervisor restarts
                worker.stats.busy_since = None
                for job in jobs:
                    self._reports.put(Report(job, dropped="internal_error"))
                raise
            worker.stats.finish(time.monotonic(), len(jobs))
            worker.strikes = 0
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome.error == E_DETECTOR:
                    worker.stats.errors += 1
                self._reports.put(Report(job, outcome))
            # Likewise the reported batch, while this task waits for the next one.
            del jobs, job

    async def _restart(self, worker: Worker, *, strike: bool) -> None:
        """Bring the worker back: a fresh detector on its fresh thread, after a backoff that grows
        with failures in a row (`strike`: this restart follows one; a model that keeps failing
        cannot spin), once fewer than MAX_ABANDONED_THREADS of its abandoned calls still run; a
        load that fails is tried again. Returns once it is ready (the shutdown cancels a wait)."""
        while True:
            backoff = RESTART_BACKOFF_S[min(worker.strikes, len(RESTART_BACKOFF_S) - 1)]
            worker.strikes += strike
            worker.stats.restarts += 1
            worker.stats.state = "restarting"
            log.warning(
                "worker %d restart #%d in %.0f s", worker.id, worker.stats.restarts, backoff
            )
            await asyncio.sleep(backoff)
            if len(worker.abandoned) >= MAX_ABANDONED_THREADS:
                worker.stats.state = "stuck"
                log.error(
                    "worker %d waits for one of its %d abandoned calls to end before it restarts",
                    worker.id,
                    MAX_ABANDONED_THREADS,
                )
                while len(worker.abandoned) >= MAX_ABANDONED_THREADS:
                    await asyncio.wait(list(worker.abandoned), return_when=asyncio.FIRST_COMPLETED)
                worker.stats.state = "restarting"
            try:
                if worker.detector is None:
                    await worker.load()
                else:
                    worker.stats.state = "ready"
                return
            except Exception as exc:
                strike = True
                log.error("worker %d could not restart: %s; trying again", worker.id, exc)

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
