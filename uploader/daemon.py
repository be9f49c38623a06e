"""The life of the process in one screen: startup, serve until a signal, drain, shutdown.

Signal handlers only set events or flip settings. The first SIGTERM/SIGINT starts the drain;
a second one cuts the wait for in-flight uploads short (jobs are still released). SIGHUP
reloads what can change live. systemd hears READY=1 once Redis, the store and at least
one beanstalkd answer (a dead server is named in STATUS= and /readyz, and served when back),
STATUS=/WATCHDOG=1 from a main-loop tick, RELOADING=1 around a reload and STOPPING=1 at drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import redis.asyncio as aioredis
import structlog

from uploader import logs, redisio, sdnotify
from uploader.clock import SYSTEM, Time
from uploader.config import settings as config_mod
from uploader.config.settings import Config
from uploader.errors import ConfigError
from uploader.metrics import Metrics
from uploader.pipeline.health import Health, problem
from uploader.pipeline.scheduler import Scheduler
from uploader.pipeline.tally import Summary
from uploader.source import open_source
from uploader.source.base import Source
from uploader.state.heartbeat import Heartbeat, Report
from uploader.state.progress import Progress
from uploader.stores import Store, open_store
from uploader.web import api as web

log = structlog.get_logger("uploader.daemon")

STATUS_INTERVAL = 5.0  # seconds between STATUS= updates when no watchdog asks for more
READY_POLL = 0.5  # seconds between dependency checks before READY=1
TUBE_STATS_INTERVAL = 5.0  # seconds between stats-tube polls for uploader_tube_ready_jobs
REDIS_CHECK_INTERVAL = 1.0  # seconds between PINGs that decide whether jobs are reserved


class Daemon:
    def __init__(
        self, config: Config, store: Store | None = None, metrics: Metrics | None = None, time: Time = SYSTEM
    ) -> None:
        self.config = config
        self.time = time
        self.metrics = metrics or Metrics()
        self.store = store or open_store(config.store, config.upload.concurrency, config.path)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.ready = False
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.redis = redisio.connect(config.redis, reply_timeout=None)  # each call has its deadline
        # Short timeouts for probes and the HTTP API: an outage answers fast, never hangs.
        self.probe_redis = redisio.connect(
            config.redis, connect_timeout=web.PROBE_TIMEOUT, reply_timeout=web.PROBE_TIMEOUT
        )
        self.keys = redisio.Keys(config.redis.key_prefix)
        self.progress = Progress(self.redis, self.keys, config.redis, self.worker)
        # Nothing is reserved before Redis and the store are proven to answer.
        self.health = Health("redis", "store", on_change=self._health_changed)
        for address in config.source.addresses:
            self.metrics.source_up.labels(address).set(0)
        # Probes under the API's own timeout, so a dead server is named rather than timed out.
        self.source: Source = open_source(config.source, web.PROBE_TIMEOUT * 0.8, time, self._source_changed)
        self.heartbeat = Heartbeat(self.redis, self.keys, self.worker, time, report=lambda: worker_report(
            self.scheduler, draining=self.stop.is_set(), paused=tuple(self.health.reasons())))
        self.scheduler = Scheduler(config, self.source, self.store, self.redis, self.progress, self.metrics,
                                   health=self.health, time=time, worker=self.worker)
        self.notifier = sdnotify.Notifier()
        self.api = self._api()
        self.http = (
            web.Server(self.api.app(), config.http.listen, f"{config.path}: [http].listen")
            if config.http.listen
            else None
        )
        self.started = time.monotonic()
        self.stop_requested: float | None = None

    def _api(self) -> web.Api:
        return web.Api(
            registry=self.metrics.registry,
            probes={"beanstalkd": self.source.ping, "redis": self._ping_redis, "store": self.store.check},
            active_jobs=self.active_jobs,
            draining=self.stop.is_set,
            paused=self.health.reasons,
            redis=self.probe_redis,
            keys=self.keys,
            token=self.config.http.token,
            sources=self.source.servers,
            cancel_ttl=self.config.redis.progress_ttl,
            source=self.config.source,
        )

    # --- the whole life ---

    async def run(self) -> Summary:
        """Startup, serve until a signal, drain (inside the scheduler's run), shutdown."""
        stop, reload = self.request_stop, self.reload
        with _signal_handlers({signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}):
            try:
                await self._startup()
                async with self._side_tasks():
                    summary = await self.scheduler.run(self.stop, self.force)
            finally:
                await self.close()
        self._log_summary(summary)
        return summary

    async def _startup(self) -> None:
        """A store that refuses our credentials or a port in use is fatal (one line, exit 2); an
        unreachable beanstalkd or Redis is not: everything waits for them."""
        await self.store.start()
        if self.http is not None:
            await self.http.start()
        log.info(
            "started",
            worker=self.worker,
            tubes=[t.name for t in self.config.source.tubes],
            concurrency=self.config.upload.concurrency,
            store=self.config.store.kind,
            http=self.config.http.listen or None,
            **self.source.describe(),
        )

    @contextlib.asynccontextmanager
    async def _side_tasks(self) -> AsyncIterator[None]:
        """Readiness, STATUS=, tube stats and the Redis check: they log and carry on, never end
        the daemon, and stop with the pipeline."""
        async with asyncio.TaskGroup() as tg:
            side = [
                tg.create_task(self._announce_ready(), name="ready"),
                tg.create_task(self._tick(), name="status tick"),
                tg.create_task(poll_tubes(self.source, self.metrics, self.time), name="tube stats"),
                tg.create_task(watch_redis(self.probe_redis, self.health, self.time), name="redis check"),
                tg.create_task(self.source.watch(), name="source check"),
                tg.create_task(self.heartbeat.run(), name="heartbeat"),
            ]
            try:
                yield
            finally:
                for task in side:
                    task.cancel()

    async def close(self) -> None:
        await self.heartbeat.leave()
        if self.http is not None:
            await self.http.stop()
        await self.source.close()
        await self.store.close()
        await self.redis.aclose()
        await self.probe_redis.aclose()
        self.notifier.close()

    def _log_summary(self, summary: Summary) -> None:
        """The one line an operator reads after a stop: what finished, what went back."""
        now = self.time.monotonic()
        drain_seconds = round(now - self.stop_requested, 3) if self.stop_requested else None
        log.info("stopped", seconds=round(now - self.started, 3), drain_seconds=drain_seconds,
                 **summary.log_fields())

    # --- signals ---

    def request_stop(self) -> None:
        if self.stop.is_set():
            log.warning("second_signal", action="cutting the drain short")
            self.force.set()
            return
        log.info("stop_requested")
        self.stop_requested = self.time.monotonic()
        self.notifier.stopping(f"draining: {self._status_text()}")
        self.stop.set()

    def reload(self) -> None:
        """SIGHUP: apply what can change live; a bad file is refused and the old config stays."""
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            if self.ready and not self.stop.is_set():
                self.notifier.ready(self._status_text())

    def _reload(self) -> None:
        try:
            fresh = config_mod.load(self.config.path)
        except ConfigError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload_refused", error=str(exc), kept=self.config.path)
            return
        change = config_mod.reloaded(self.config, fresh)
        live = self.config = change.config
        self.scheduler.retune(live.upload)
        self.scheduler.apply_limits(live)
        self.api.token = live.http.token.encode()
        logs.configure(live.daemon.log_level, live.daemon.log_format)
        self.metrics.reloads.labels("ok").inc()
        log.info("reloaded", concurrency=live.upload.concurrency, log_level=live.daemon.log_level)
        if change.restart:
            log.warning("reload_needs_restart", tables=list(change.restart))

    # --- side tasks: they log and carry on, never end the daemon ---

    async def _announce_ready(self) -> None:
        """READY=1 once Redis, the store and at least one beanstalkd answer; until then STATUS
        says what is missing."""
        probes: dict[str, web.Probe] = {"beanstalkd": self.source.ping}
        warned = False
        while not self.stop.is_set():
            problems = {k: v for k, v in (await web.probe_all(probes)).items() if v is not None}
            problems.update(self.health.reasons())
            if self.health.unchecked() or self.source.unchecked():  # verdicts are moments away
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(READY_POLL):
                        await self.health.wait_change()
                continue
            if not problems:
                self.ready = True
                self.notifier.ready(self._status_text())
                log.info("ready")
                return
            waiting = "waiting for " + ", ".join(f"{k} ({v})" for k, v in problems.items())
            self.notifier.status(waiting)
            if not warned:
                log.warning("waiting_for_dependencies", **problems)
                warned = True
            with contextlib.suppress(TimeoutError):  # a cause that goes ends the wait early
                async with asyncio.timeout(READY_POLL):
                    await self.health.wait_change()

    async def _tick(self) -> None:
        """STATUS= every few seconds and, when systemd's watchdog is on, WATCHDOG=1 at half its
        period: a ping proves that this event loop still turns."""
        watchdog = sdnotify.watchdog_interval()
        every = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
        settled, since = self.scheduler.snapshot().settled, self.time.monotonic()
        while True:
            await self.time.sleep(every)
            now, files = self.time.monotonic(), self.scheduler.snapshot().settled
            rate = (files - settled) / (now - since) if now > since else 0.0
            settled, since = files, now
            status = f"STATUS={'draining: ' if self.stop.is_set() else ''}{self._status_text(rate)}"
            self.notifier.send(status, *(["WATCHDOG=1"] if watchdog else []))

    def _source_changed(self, address: str, up: bool) -> None:
        self.metrics.source_up.labels(address).set(1 if up else 0)
        if self.ready and not self.stop.is_set():
            self.notifier.status(self._status_text())

    def _health_changed(self) -> None:
        """Say at once why work stopped or that it goes on: systemd's STATUS= line, a gauge."""
        down = self.health.reasons()
        for cause in ("redis", "store"):
            self.metrics.taking_no_work.labels(cause).set(1 if cause in down else 0)
        if self.ready and not self.stop.is_set():
            self.notifier.status(self._status_text())

    # --- what the API and STATUS= show ---

    async def _ping_redis(self) -> None:
        await redisio.writable(self.probe_redis)

    def _status_text(self, rate: float | None = None) -> str:
        now = self.scheduler.snapshot()
        text = f"{len(now.jobs)} active jobs, {now.inflight} uploads in flight"
        if not self.health.ok:
            text = f"taking no work: {self.health.describe()}; {text}"
        down = self.source.failing()
        if down:
            text = f"{text}; beanstalkd down: {', '.join(down)}"
        return text if rate is None else f"{text}, {rate:.1f} files/s"

    def active_jobs(self) -> list[dict[str, object]]:
        """Jobs held by this instance, with this instance's counts (a resumed job's earlier
        runs are in its Redis progress hash, /jobs/{id})."""
        return [dataclasses.asdict(job) for job in self.scheduler.snapshot().jobs]


@contextlib.contextmanager
def _signal_handlers(handlers: Mapping[signal.Signals, Callable[[], None]]) -> Iterator[None]:
    """Installed for the life of the block, removed after; none where the loop cannot take
    them (not the main thread, as in tests)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig, handler in handlers.items():
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def worker_report(scheduler: Scheduler, draining: bool, paused: tuple[str, ...]) -> Report:
    """What the heartbeat tells the fleet's status page of this worker."""
    now = scheduler.snapshot()
    files = scheduler.summary.files
    held = sorted(now.jobs, key=lambda job: -job.seconds)
    return Report(jobs=tuple((job.id, job.tube, job.seconds) for job in held), slots_in_use=now.inflight,
                  slots=scheduler.slots.limit, files=files.settled, bytes=files.bytes, draining=draining,
                  paused=paused)


# --- side tasks: they log and carry on, never end the daemon ---


async def poll_tubes(source: Source, metrics: Metrics, time: Time) -> None:
    """Fill uploader_tube_ready_jobs{tube}: how much work waits, for dashboards and scaling."""
    while True:
        try:
            async with asyncio.timeout(max(1.0, TUBE_STATS_INTERVAL)):
                counts = await source.backlog()
            for tube, ready in counts.items():
                metrics.tube_ready.labels(tube).set(ready)
        except Exception as exc:  # noqa: BLE001 - a metric is never worth stopping the daemon for
            log.debug("tube_stats_failed", error=repr(exc))
        await time.sleep(TUBE_STATS_INTERVAL)


async def watch_redis(redis: aioredis.Redis, health: Health, time: Time) -> None:
    """PING Redis every REDIS_CHECK_INTERVAL: while it does not answer, nothing is reserved
    (held jobs wait for it where they are)."""
    while True:
        health.judge("redis", await problem(lambda: redisio.writable(redis), web.PROBE_TIMEOUT))
        await time.sleep(REDIS_CHECK_INTERVAL)
