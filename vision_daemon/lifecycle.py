"""Builds the components, starts them in order, and stops them in reverse.

Each stop is registered on an `AsyncExitStack` as its component starts (as aiohttp's runner and
svcs do), so shutdown is the reverse of start-up and a start-up that fails half-way cleans up
exactly what started. A failing cleanup is logged and the rest still run.

Longer than most modules (about 360 lines) because start-up and its reverse are one sequence,
read top to bottom; each component's own work lives in its module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from vision_daemon import __version__, analytics, portsfile
from vision_daemon import protocol as p
from vision_daemon.access import access_for
from vision_daemon.api import create_app
from vision_daemon.config import Config, ConfigError
from vision_daemon.control import DaemonControl
from vision_daemon.decode import quiet_codecs
from vision_daemon.detectors import DetectorFactory, ModelInfo, load_detector_factory
from vision_daemon.detectors.triton import Endpoints, TritonFactory
from vision_daemon.httpserver import HttpServer
from vision_daemon.ingest.camera_manager import CameraManager
from vision_daemon.ingest.tcp import TcpIngest
from vision_daemon.ingest.ws import WsIngest
from vision_daemon.metrics import Metrics
from vision_daemon.outputs import EventOutput, Hub, MqttOutput, WebhookOutput
from vision_daemon.pipeline import Pipeline
from vision_daemon.scheduler import Scheduler
from vision_daemon.schema import Snapshot
from vision_daemon.snapshot import Components, History, SnapshotCache
from vision_daemon.streams import Reports
from vision_daemon.workers import WorkerPool, in_daemon_thread

log = logging.getLogger(__name__)


def event_outputs(config: Config) -> list[EventOutput]:
    """The MQTT and webhook outputs the config asks for; a bad URL is a ConfigError (one line)."""
    outputs: list[EventOutput] = []
    try:
        if config.mqtt_url:
            outputs.append(
                MqttOutput(
                    config.mqtt_url,
                    topic_prefix=config.mqtt_topic_prefix,
                    qos=config.mqtt_qos,
                    queue_max=config.mqtt_queue,
                    ca=config.mqtt_ca,
                )
            )
        for url in config.webhook_urls:
            outputs.append(
                WebhookOutput(
                    url,
                    secret=config.webhook_secret or None,
                    queue_max=config.webhook_queue,
                    timeout_s=config.webhook_timeout_s,
                    max_attempts=config.webhook_max_attempts,
                    event_types=frozenset(config.webhook_events),
                )
            )
    except ValueError as exc:
        raise ConfigError(f"bad event output: {exc}") from None
    seen: dict[str, int] = {}
    for out in outputs:  # two webhooks on one host and port: "webhook:h:p", "webhook:h:p#2"
        seen[out.name] = seen.get(out.name, 0) + 1
        if seen[out.name] > 1:
            out.name = f"{out.name}#{seen[out.name]}"
    return outputs


class Daemon:
    """`run()` is start, serve until a signal, stop; tests call `start()` and `shutdown()`."""

    def __init__(self, config: Config, factory: DetectorFactory | None = None) -> None:
        self.config = config
        self._factory = factory
        self.started_at = time.monotonic()
        self.reports = Reports()
        self.metrics = Metrics(config.metrics_max_streams)
        self.hub = Hub(config.ws_max_subscribers)
        self.scheduler = Scheduler(
            config.max_in_flight_per_stream, config.max_frame_age_ms / 1000, self.reports
        )
        self.outputs = event_outputs(config)
        self.pipeline = Pipeline(
            config, self.reports, self.scheduler, self.hub, self.metrics, outputs=self.outputs
        )
        self.access = access_for(config, self.metrics.auth_refused)
        self.ingest = TcpIngest(config, self.pipeline, self.access)
        self.cameras = CameraManager(config, self.pipeline)
        self.http = HttpServer(config)
        self.pool: WorkerPool | None = None
        self.backends: Endpoints | None = None  # Triton endpoints, when the model is remote
        self.components = Components(
            self.pipeline, self.hub, self.ingest, self.started_at, self.ready, self.cameras
        )
        self.ws_ingest = WsIngest(config, self.pipeline, self.access)
        self.components.ws_ingest = self.ws_ingest
        self.components.http = self.http.counts
        self.components.outputs = self.outputs
        self.stats = SnapshotCache(
            self.components,
            config.stats_refresh_s,
            History(config.stats_history_points, config.stats_history_interval_s),
        )
        self.metrics.watch(self.stats.model)
        self.stopping = False
        self._failed: str | None = None  # a background task that ended with an exception
        self._stop = asyncio.Event()
        self._stack = AsyncExitStack()

    # ---- what tests and the API read ----------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo | None:
        return self.components.model_info

    @property
    def tcp_port(self) -> int | None:
        return self.ingest.port

    @property
    def api_port(self) -> int | None:
        return self.http.port

    def snapshot(self) -> Snapshot:
        """A fresh snapshot now (the API serves the periodic one)."""
        return self.stats.refresh()

    def ready(self) -> tuple[bool, str]:
        """Ready = every worker's model loaded and warm, and the TCP listener up; else the reason."""
        if self.stopping:
            return False, "shutting down"
        if self._failed is not None:
            return False, f"the {self._failed} task failed (see the log); restart the daemon"
        pool = self.pool
        if pool is None or self.model_info is None:
            states = [w.stats.state for w in pool.workers] if pool else []
            return False, f"model loading/warming up (workers: {states or 'not started'})"
        notes = []
        for part in (pool, self.backends, self.ingest):  # each component says how it is
            if part is None:
                continue
            ok, why = part.health()
            if not ok:
                return False, why
            if why:
                notes.append(why)
        return True, "; ".join(["ready", *notes])

    # ---- start-up, in order; each stop registered as its part starts -------------------------
    async def start(self) -> None:
        stack = self._stack
        try:
            await self._start(stack)
        except BaseException:
            await self._close_stack()
            raise

    async def _start(self, stack: AsyncExitStack) -> None:
        cfg = self.config
        quiet_codecs()
        # The API comes up first so /health answers while the model loads and warms up.
        if cfg.api_port >= 0:
            control = DaemonControl(
                cfg, self.pipeline, self.stats, self.ready, self.cameras, self.ws_ingest
            )
            app = create_app(cfg, control, self.hub, self.metrics, self.started_at, self.access)
            await self.http.start(app)
            stack.push_async_callback(self._guard, "control plane", self.http.stop)
            stack.callback(self.hub.close)  # /ws subscribers close with 1001 before the server
        # Connections deliver what they owe and close after the workers have finished.
        stack.push_async_callback(
            self._guard, "connections", lambda: self.ingest.aclose(cfg.shutdown_grace_s + 2)
        )
        stack.push_async_callback(
            self._guard, "WebSocket ingest", lambda: self.ws_ingest.aclose(cfg.shutdown_grace_s + 2)
        )
        # Event outputs stop after the pipeline (its last verdicts may still raise events); each
        # flushes for at most a second, then counts what is left as dropped.
        for output in self.outputs:
            await output.start()
            stack.push_async_callback(self._guard, output.name, functools.partial(output.stop, 1.0))
        self._spawn(stack, "pipeline", self.pipeline.run(), then=self.pipeline.drain)
        factory = self._factory
        if factory is None:  # a daemon thread: a signal during a long export exits at once
            factory = await in_daemon_thread(load_detector_factory, cfg)
        self.pool = WorkerPool(
            cfg.workers,
            factory,
            self.scheduler,
            self.reports,
            max_batch=cfg.max_batch,
            batch_wait_s=cfg.batch_wait_ms / 1000,
            max_pixels=cfg.max_image_pixels,
            timeout_s=cfg.worker_timeout_s,
            window_s=cfg.stats_window_s,
            share_cores=cfg.share_cores,
            reduced_decode=cfg.reduced_decode,
        )
        self.components.pool = self.pool
        if isinstance(factory, TritonFactory):  # remote inference: probed while the daemon runs
            self.backends = self.components.backends = factory.endpoints
            self._spawn(stack, "backend probe", self._probe(factory.endpoints))
        # Registered before loading: a failed load or warm-up still ends the workers' threads.
        stack.push_async_callback(self._guard, "workers", self._stop_workers)
        t0 = time.perf_counter()
        self.components.model_info = await self.pool.load()
        info = self.components.model_info
        log.info(
            "model %s (%s on %s) loaded and warmed in %d worker(s) in %.1f s",
            info.name,
            info.backend,
            info.device,
            cfg.workers,
            time.perf_counter() - t0,
        )
        if cfg.track or cfg.analytics.lines or cfg.analytics.zones:
            await asyncio.to_thread(analytics.preload)  # not at the first tracked frame
        self.pool.start()
        await self.ingest.start(self.welcome())
        self.ws_ingest.start(self.welcome())  # WS /ingest is served from here on
        # Cameras open in their own threads: one that cannot be reached never holds up the rest.
        await self.cameras.start()
        stack.push_async_callback(self._guard, "cameras", self.cameras.aclose)
        stack.callback(self._stop_accepting)
        self._spawn(stack, "stats", self.stats.run())
        if cfg.ports_file:  # launchers read the real ports here, not from the log
            ports = {"tcp": self.tcp_port, "http": self.api_port, "unix": self.ingest.unix_path}
            portsfile.write(cfg.ports_file, {**ports, "pid": os.getpid()})
            stack.callback(portsfile.remove, cfg.ports_file)

    def _spawn(
        self,
        stack: AsyncExitStack,
        name: str,
        coro: Awaitable[None],
        then: Callable[[], Any] | None = None,
    ) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(lambda t: self._task_ended(name, t))

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if then is not None:
                then()

        stack.push_async_callback(self._guard, name, stop)

    async def _probe(self, endpoints: Endpoints) -> None:
        """Every backend_probe_s, ask each endpoint whether its model is ready (in a thread)."""
        while True:
            await asyncio.sleep(self.config.backend_probe_s)
            await in_daemon_thread(endpoints.probe)

    def _task_ended(self, name: str, task: asyncio.Future[None]) -> None:
        """A background task must run until shutdown: if it dies, say so and stop the daemon."""
        if task.cancelled() or task.exception() is None:
            return
        self._failed = name
        log.error("the %s task failed; stopping", name, exc_info=task.exception())
        self._stop.set()

    async def _stop_workers(self) -> None:
        assert self.pool is not None
        await self.pool.stop(self.config.shutdown_grace_s)
        self.pipeline.drain()  # results of the frames the workers finished go out now

    def _stop_accepting(self) -> None:
        """Shutdown, first step: no new connections or frames; queued frames drop as shutdown."""
        self.stopping = True
        self.ingest.stop_accepting()
        self.ws_ingest.stop_accepting()
        self.cameras.stop_reading()
        self.pipeline.drop_queued("shutdown")

    @staticmethod
    async def _guard(what: str, stop: Callable[[], Awaitable[Any]]) -> None:
        try:
            await stop()
        except Exception:
            log.exception("stopping the %s failed; stopping the rest", what)

    async def _close_stack(self) -> None:
        self.stopping = True
        await self._stack.aclose()

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight work within the grace, flush, close: reverse order."""
        await self._close_stack()
        totals = self.pipeline.totals
        log.info(
            "stopped: %d received, %d processed, %d dropped",
            totals.received,
            totals.processed,
            sum(totals.dropped.values()),
        )

    def welcome(self) -> p.Welcome:
        cfg = self.config
        return {
            "type": "welcome",
            "version": p.PROTOCOL_VERSION,
            "server": f"vision-daemon {__version__}",
            "model": self.model_info.to_dict() if self.model_info else None,
            "limits": {
                "max_message_bytes": cfg.max_message_bytes,
                "max_image_pixels": cfg.max_image_pixels,
                "max_streams_per_connection": cfg.max_streams_per_connection,
                "queue_depth": cfg.queue_depth,
                "max_frame_age_ms": cfg.max_frame_age_ms,
                "send_buffer_messages": cfg.send_buffer_messages,
            },
        }

    # ---- the process ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM, stop. A signal during start-up stops at once."""
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second %s: exiting now", sig.name)
                os._exit(1)
            log.info("%s: shutting down (again to force)", sig.name)
            self._stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            starting = asyncio.ensure_future(self.start())
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal during export or warm-up: abandon the start
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                log.info("stopped during start-up")
                return
            stopped.cancel()
            starting.result()  # a start-up error propagates (StartupError, ModelError)
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
