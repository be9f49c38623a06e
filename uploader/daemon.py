"""The life of the process in one screen: startup, serve until a signal, drain, shutdown.

Signal handlers only set events or flip settings. The first SIGTERM/SIGINT starts the drain;
a second one cuts the wait for in-flight uploads short (jobs are still released). SIGHUP
reloads what can change live. systemd hears READY=1 once beanstalkd and Redis answer,
STATUS=/WATCHDOG=1 from a main-loop tick, RELOADING=1 around a reload and STOPPING=1 at drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import time
from dataclasses import replace

import redis.asyncio as aioredis
import structlog

from uploader import config as config_mod
from uploader import logs, redisio, sdnotify, web
from uploader.beanstalk import BeanstalkError, Connection, NotFound, Producer
from uploader.config import Config
from uploader.errors import ConfigError
from uploader.health import Health
from uploader.metrics import Metrics
from uploader.progress import Progress
from uploader.scheduler import CompletionSink, Scheduler, Summary
from uploader.source import Source
from uploader.stores import Store, open_store

log = structlog.get_logger("uploader.daemon")

STATUS_INTERVAL = 5.0  # seconds between STATUS= updates when no watchdog asks for more
READY_POLL = 0.5  # seconds between dependency checks before READY=1
TUBE_STATS_INTERVAL = 5.0  # seconds between stats-tube polls for uploader_tube_ready_jobs
REDIS_CHECK_INTERVAL = 1.0  # seconds between PINGs that decide whether jobs are reserved


class Monitor:
    """One side connection per beanstalkd address, for probes and tube stats; never reserves.

    Kept apart from the Source's connections so that a probe never waits behind a reserve.
    """

    def __init__(self, addresses: tuple[str, ...], tubes: tuple[str, ...]) -> None:
        self.addresses = addresses
        self.tubes = tubes
        self._conns: dict[str, Connection] = {}
        self._connecting = asyncio.Lock()  # the probe and the stats poll may both ask first

    async def _conn(self, address: str) -> Connection:
        async with self._connecting:
            conn = self._conns.get(address)
            if conn is None or conn.closed:
                conn = self._conns[address] = await Connection.connect(address, timeout=web.PROBE_TIMEOUT)
            return conn

    async def ping(self) -> None:
        """Raise unless every configured beanstalkd answers."""
        for address in self.addresses:
            await (await self._conn(address)).stats()

    async def ready_jobs(self) -> dict[str, int]:
        """Ready jobs per watched tube, summed over the servers that answer."""
        counts = dict.fromkeys(self.tubes, 0)
        for address in self.addresses:
            try:
                conn = await self._conn(address)
                for tube in self.tubes:
                    try:
                        stats = await conn.stats_tube(tube)
                    except NotFound:  # nobody watches or uses it there: nothing is ready
                        continue
                    counts[tube] += int(stats.get("current-jobs-ready", 0))
            except (BeanstalkError, ValueError) as exc:
                log.debug("tube_stats_failed", address=address, error=str(exc))
        return counts

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()


class Daemon:
    def __init__(self, config: Config, store: Store | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store or open_store(config.store, config.upload.concurrency, config.path)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.ready = False
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.redis = redisio.connect(config.redis.url)
        # Short timeouts for probes and the HTTP API: an outage answers fast, never hangs.
        self.probe_redis = aioredis.Redis.from_url(
            config.redis.url, socket_connect_timeout=web.PROBE_TIMEOUT, socket_timeout=web.PROBE_TIMEOUT
        )
        self.keys = redisio.Keys(config.redis.key_prefix)
        self.progress = Progress(self.redis, self.keys, config.redis, self.worker)
        # Nothing is reserved before Redis and the store are proven to answer.
        self.health = Health("redis", "store", on_change=self._health_changed)
        self.source = Source(config.source)
        self.monitor = Monitor(config.source.addresses, tuple(t.name for t in config.source.tubes))
        self.producer = (
            Producer(config.source.addresses, config.source.completion_tube)
            if config.source.completion_tube
            else None
        )
        self.scheduler = Scheduler(
            config,
            self.source,
            self.store,
            self.redis,
            self.progress,
            self.metrics,
            CompletionSink(self.progress, self.producer.put if self.producer else None),
            health=self.health,
        )
        self.notifier = sdnotify.Notifier()
        self.api = web.Api(
            registry=self.metrics.registry,
            probes={"beanstalkd": self.monitor.ping, "redis": self._ping_redis, "store": self.store.check},
            active_jobs=self.active_jobs,
            draining=self.stop.is_set,
            paused=self.health.reasons,
            redis=self.probe_redis,
            keys=self.keys,
            token=config.http.token,
        )
        self.http = (
            web.Server(self.api.app(), config.http.listen, f"{config.path}: [http].listen")
            if config.http.listen
            else None
        )
        self.started = time.monotonic()
        self.stop_requested: float | None = None

    # --- signals ---

    def request_stop(self) -> None:
        if self.stop.is_set():
            log.warning("second_signal", action="cutting the drain short")
            self.force.set()
            return
        log.info("stop_requested")
        self.stop_requested = time.monotonic()
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
        old = self.config
        live = replace(
            old,
            upload=replace(
                old.upload,
                concurrency=fresh.upload.concurrency,
                adaptive=fresh.upload.adaptive,
                min_concurrency=fresh.upload.min_concurrency,
                decrease_factor=fresh.upload.decrease_factor,
                throttle_cooldown=fresh.upload.throttle_cooldown,
            ),
            daemon=replace(old.daemon, log_level=fresh.daemon.log_level, log_format=fresh.daemon.log_format),
            http=replace(old.http, token=fresh.http.token),
            limits=fresh.limits,
        )
        # Everything else is wired into connections and clients: it takes a restart.
        restart = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name != "path" and getattr(fresh, f.name) != getattr(live, f.name)
        ]
        self.config = live
        self.scheduler.retune(live.upload)
        self.scheduler.apply_limits(live)
        self.api.token = live.http.token.encode()
        logs.configure(live.daemon.log_level, live.daemon.log_format)
        self.metrics.reloads.labels("ok").inc()
        log.info("reloaded", concurrency=live.upload.concurrency, log_level=live.daemon.log_level)
        if restart:
            log.warning("reload_needs_restart", tables=restart)

    # --- the whole life ---

    async def run(self) -> Summary:
        loop = asyncio.get_running_loop()
        handled = []
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.reload),
        ):
            try:
                loop.add_signal_handler(sig, handler)
                handled.append(sig)
            except (RuntimeError, ValueError):  # not the main thread, e.g. in tests
                pass
        try:
            # Startup: a store that refuses our credentials or a port in use is fatal (one line,
            # exit 2); an unreachable beanstalkd or Redis is not: everything waits for them.
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
            )
            async with asyncio.TaskGroup() as tg:
                side = [
                    tg.create_task(self._announce_ready(), name="ready"),
                    tg.create_task(self._tick(), name="status tick"),
                    tg.create_task(self._poll_tubes(), name="tube stats"),
                    tg.create_task(self._watch_redis(), name="redis check"),
                ]
                try:
                    summary = await self.scheduler.run(self.stop, self.force)
                finally:
                    for task in side:
                        task.cancel()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.close()
        self._log_summary(summary)
        return summary

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.producer is not None:
            await self.producer.close()
        await self.monitor.close()
        await self.source.close()
        await self.store.close()
        await self.redis.aclose()
        await self.probe_redis.aclose()
        self.notifier.close()

    def _log_summary(self, summary: Summary) -> None:
        """The one line an operator reads after a stop: what finished, what went back."""
        now = time.monotonic()
        log.info(
            "stopped",
            seconds=round(now - self.started, 3),
            drain_seconds=round(now - self.stop_requested, 3) if self.stop_requested else None,
            files_uploaded=summary.uploaded,
            files_skipped=summary.skipped,
            files_failed=summary.failed,
            bytes=summary.bytes,
            retries=summary.retried,
            uploads_cancelled=summary.uploads_cancelled,
            jobs_finished=summary.jobs_finished,
            jobs_buried=summary.jobs_buried,
            jobs_released=summary.jobs_released,
        )

    # --- side tasks: they log and carry on, never end the daemon ---

    async def _announce_ready(self) -> None:
        """READY=1 once beanstalkd, Redis and the store answer; until then STATUS says what is
        missing."""
        probes: dict[str, web.Probe] = {"beanstalkd": self.monitor.ping}
        warned = False
        while not self.stop.is_set():
            problems = {k: v for k, v in (await web.probe_all(probes)).items() if v is not None}
            problems.update(self.health.reasons())
            if self.health.unchecked():  # the first verdicts are moments away: no false alarm
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
        settled, since = self._settled(), time.monotonic()
        while True:
            await asyncio.sleep(every)
            now, files = time.monotonic(), self._settled()
            rate = (files - settled) / (now - since) if now > since else 0.0
            settled, since = files, now
            status = f"STATUS={'draining: ' if self.stop.is_set() else ''}{self._status_text(rate)}"
            self.notifier.send(status, *(["WATCHDOG=1"] if watchdog else []))

    async def _poll_tubes(self) -> None:
        """Fill uploader_tube_ready_jobs{tube}: how much work waits, for dashboards and scaling."""
        while True:
            try:
                async with asyncio.timeout(max(1.0, TUBE_STATS_INTERVAL)):
                    counts = await self.monitor.ready_jobs()
                for tube, ready in counts.items():
                    self.metrics.tube_ready.labels(tube).set(ready)
            except Exception as exc:  # noqa: BLE001 - a metric is never worth stopping the daemon for
                log.debug("tube_stats_failed", error=repr(exc))
            await asyncio.sleep(TUBE_STATS_INTERVAL)

    async def _watch_redis(self) -> None:
        """PING Redis every REDIS_CHECK_INTERVAL: while it does not answer, nothing is reserved
        (held jobs wait for it where they are)."""
        while True:
            try:
                async with asyncio.timeout(web.PROBE_TIMEOUT):
                    await self.probe_redis.ping()
            except Exception as exc:  # noqa: BLE001 - whatever the ping met is the reason shown
                self.health.fail("redis", str(exc) or type(exc).__name__)
            else:
                self.health.recover("redis")
            await asyncio.sleep(REDIS_CHECK_INTERVAL)

    def _health_changed(self) -> None:
        """Say at once why work stopped or that it goes on: systemd's STATUS= line, a gauge."""
        down = self.health.reasons()
        for cause in ("redis", "store"):
            self.metrics.taking_no_work.labels(cause).set(1 if cause in down else 0)
        if self.ready and not self.stop.is_set():
            self.notifier.status(self._status_text())

    # --- what the API and STATUS= show ---

    async def _ping_redis(self) -> None:
        await self.probe_redis.ping()

    def _settled(self) -> int:
        s = self.scheduler.summary
        return s.uploaded + s.skipped + s.failed

    def _status_text(self, rate: float | None = None) -> str:
        runs = list(self.scheduler.runs.values())
        text = f"{len(runs)} active jobs, {sum(r.inflight for r in runs)} uploads in flight"
        if not self.health.ok:
            text = f"taking no work: {self.health.describe()}; {text}"
        return text if rate is None else f"{text}, {rate:.1f} files/s"

    def active_jobs(self) -> list[dict[str, object]]:
        """Jobs held by this instance, with this instance's counts (a resumed job's earlier
        runs are in its Redis progress hash, /jobs/{id})."""
        now = time.monotonic()
        return [
            {
                "id": run.id,
                "tube": run.held.tube,
                "beanstalk_job": run.held.id,
                "total": run.total,
                "uploaded": run.counts.uploaded,
                "skipped": run.counts.skipped,
                "failed": run.counts.failed,
                "bytes": run.counts.bytes,
                "inflight": run.inflight,
                "seconds": round(now - run.started, 3),
            }
            for run in list(self.scheduler.runs.values())
        ]
