"""Fair, bounded fan-out of files over the active jobs, and the drain that ends it.

One dispatcher takes an upload slot *before* it creates a file's task, so there are never more
file tasks than slots, whatever the job sizes. The fair ring (`ring.py`) says which job gives
the next file; a job's life is `jobs.py`, one file's transfer `transfer.py`, and every outcome
goes through one `Tally`. This module keeps the task group, the dispatch loop and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from uploader.clock import SYSTEM, Time, backoff_delays
from uploader.config.settings import Config, UploadConfig
from uploader.entries.manifest import Entry
from uploader.errors import StoreUnavailableError
from uploader.metrics import Metrics
from uploader.pipeline.aimd import Aimd
from uploader.pipeline.feed import Feeder
from uploader.pipeline.health import Health, problem
from uploader.pipeline.jobrun import JobRun
from uploader.pipeline.jobs import Jobs
from uploader.pipeline.limits import ByteBudget, Slots
from uploader.pipeline.ratelimit import RateLimiter
from uploader.pipeline.retry import RetryPolicy
from uploader.pipeline.ring import Empty
from uploader.pipeline.tally import Result, Summary, Tally
from uploader.pipeline.transfer import Transfer
from uploader.redisio import Keys
from uploader.source.base import HeldJob, Source
from uploader.state.progress import Progress
from uploader.stores.base import Store

log = structlog.get_logger("uploader.pipeline.scheduler")

STORE_PROBE_FIRST = 0.5  # seconds before the first re-check of a store that refused writes
STORE_PROBE_CAP = 30.0  # seconds between checks at the most
STORE_PROBE_TIMEOUT = 10.0  # seconds one check may take


@dataclass(frozen=True, slots=True)
class JobView:
    """One held job as `/jobs` and STATUS= show it: this instance's counts only."""

    id: str
    tube: str
    beanstalk_job: int
    total: int
    uploaded: int
    skipped: int
    failed: int
    bytes: int
    inflight: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    jobs: tuple[JobView, ...]
    inflight: int
    settled: int  # files this process has settled: uploaded, skipped or failed


class StoreWatch:
    """Whether the store takes writes: one probe shared by every upload that asks at once,
    and, once it refused, probes with backoff until it answers again."""

    def __init__(self, store: Store, health: Health, time: Time) -> None:
        self.store = store
        self.health = health
        self.time = time
        self._probe: asyncio.Future[str | None] | None = None

    async def answers(self) -> bool:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(problem(self.store.check, STORE_PROBE_TIMEOUT))
        return await asyncio.shield(self._probe) is None

    async def until_back(self) -> None:
        delays = backoff_delays(STORE_PROBE_FIRST, STORE_PROBE_CAP)
        while (reason := await problem(self.store.check, STORE_PROBE_TIMEOUT)) is not None:
            self.health.fail("store", reason)
            await self.time.sleep(next(delays))
        self.health.recover("store")


class Scheduler:
    def __init__(
        self,
        config: Config,
        source: Source,
        store: Store,
        redis: aioredis.Redis,
        progress: Progress,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        health: Health | None = None,
        time: Time = SYSTEM,
        worker: str = "",
    ) -> None:
        upload = config.upload
        self.config = config
        self.source = source
        self.progress = progress
        self.metrics = metrics
        self.health = health or Health()
        self.time = time
        self.tally = Tally(progress, metrics)
        self.slots = Slots(upload.concurrency)
        self.aimd = Aimd(self.slots, upload, metrics)  # resizes slots on store throttling
        self.limiter = RateLimiter(config.limits)
        retry = retry or RetryPolicy(upload.retry)
        self.transfer = Transfer(upload, store, retry, self.limiter, ByteBudget(upload.max_inflight_bytes),
                                 self.aimd, self.tally)
        keys = Keys(config.redis.key_prefix)
        feeder = Feeder(config, redis, keys, progress, self.tally)
        self.jobs = Jobs(
            source, redis, keys, progress, self.tally, self.health, feeder.feed, time, worker,
            config.redis.page_size,
        )
        self.store = StoreWatch(store, self.health, time)
        self.room = asyncio.Semaphore(config.source.max_active_jobs)
        self._uploads: set[asyncio.Task[None]] = set()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._no_jobs = asyncio.Event()
        self._no_jobs.set()
        self._tg: asyncio.TaskGroup | None = None
        self._store_watch: asyncio.Task[None] | None = None
        metrics.slots.set(upload.concurrency)
        # Read at scrape time: no gauge lock taken twice per file.
        metrics.inflight.set_function(lambda: len(self._uploads))

    @property
    def summary(self) -> Summary:
        return self.tally.summary

    @property
    def runs(self) -> dict[str, JobRun]:
        return self.jobs.runs

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    # --- the whole life of the pipeline ---

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> Summary:
        """Work until `stop` is set, then drain: `force` (a second signal) cuts the wait short."""
        drain = self.config.daemon
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            flusher = tg.create_task(self.progress.run(), name="progress-flusher")
            intake = self._take_work(tg)
            await stop.wait()
            self._stop_taking_work(intake)
            await _first(self._all_uploads_done(), force.wait(), timeout=drain.drain_timeout)
            cut = self._cut_uploads()
            left = _deadline(self.time, drain.release_timeout)
            await self._settle_jobs(left)
            self.progress.stop()
            await _first(flusher, timeout=left())
        # At least a moment for the last few outcomes, also when the jobs took all the time.
        if self.progress.unsaved and not await _first(self.progress.flush(), timeout=max(left(), 0.5)):
            log.warning("progress_unsaved", files=self.progress.unsaved,
                        reason="Redis unreachable: these files are uploaded again when their jobs resume")
        self.summary.uploads_cancelled = cut  # the daemon logs the one summary line
        return self.summary

    def _take_work(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """The source's reservers, the dispatcher and the store's watch."""
        tasks = [
            tg.create_task(self.source.reserve(self.room, self._accept, self.health.wait_clear),
                           name="reserve"),
            tg.create_task(self._dispatch(), name="dispatcher"),
        ]
        self._store_watch = tg.create_task(self.store.until_back(), name="store check")
        return [*tasks, self._store_watch]

    def _stop_taking_work(self, intake: list[asyncio.Task[None]]) -> None:
        """Drain, phase 1: take no new jobs and start no new files."""
        self.jobs.draining = True
        self.metrics.draining.set(1)
        for task in intake:
            task.cancel()
        self.jobs.stop_all("draining")
        log.info("drain_started", active_jobs=len(self.runs), inflight=len(self._uploads),
                 deadline=self.config.daemon.drain_timeout)

    async def _all_uploads_done(self) -> None:
        """Drain, phase 2: in-flight uploads finish, until the deadline or a second signal."""
        while self._uploads:
            await asyncio.wait(list(self._uploads))

    def _cut_uploads(self) -> int:
        """Drain, phase 3: cancel what is left; unrecorded files are uploaded again on resume."""
        cut = len(self._uploads)
        for task in list(self._uploads):
            task.cancel()
        return cut

    async def _settle_jobs(self, left: Callable[[], float]) -> None:
        """Drain, phase 4: every job settles: finished, or released for another instance.
        Settling writes progress to Redis first; if Redis is down that waits, but only until
        `release_timeout`: then the jobs go back as they are, and their unrecorded files are
        uploaded again on resume (at least once, never lost)."""
        if await _first(self._no_jobs.wait(), timeout=left()):
            return
        log.warning("release_forced", jobs=len(self._job_tasks),
                    reason="Redis unreachable: jobs released without saving their progress")
        for task in list(self._job_tasks):
            task.cancel()  # each job releases itself as it goes
        await self._no_jobs.wait()

    # --- jobs ---

    async def _accept(self, held: HeldJob) -> None:
        assert self._tg is not None
        task = self._tg.create_task(self.jobs.handle(held), name=f"job {held.delivery.job}")
        self._job_tasks.add(task)
        self._no_jobs.clear()
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        self.room.release()
        if not self._job_tasks:
            self._no_jobs.set()

    # --- files ---

    async def _dispatch(self) -> None:
        while True:
            await self.slots.acquire()
            try:
                run, entry = await self._next_entry()
            except BaseException:
                self.slots.release()
                raise
            run.inflight += 1
            assert self._tg is not None
            task = self._tg.create_task(self._upload(run, entry))
            self._uploads.add(task)
            task.add_done_callback(self._uploads.discard)

    async def _next_entry(self) -> tuple[JobRun, Entry]:
        """The ring's next file whose tube is under its rate limit; waits for news if none."""
        wake = self.jobs.wake
        while True:
            picked = self.jobs.ring.pick(JobRun.take, lambda run: self.limiter.tube_wait(run.held.tube))
            if not isinstance(picked, Empty):
                self.limiter.tube_take(picked[0].held.tube)
                return picked
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(picked.retry_in):
                    await wake.wait()

    async def _upload(self, run: JobRun, entry: Entry) -> None:
        started = self.time.monotonic()
        result: Result | None = None
        try:
            result = await self.transfer.run(run.id, run.held.tube, entry)
            self.metrics.upload_seconds.observe(self.time.monotonic() - started)
        except StoreUnavailableError as exc:
            if exc.per_key and await self.store.answers():
                result = Result("failed", entry.path, reason=exc.reason)
            else:
                self.store_down(exc.reason)
        finally:
            if result is not None:
                self.tally.file(run, entry.index, result)
            else:  # cut by the drain or the store: not counted, uploaded on resume
                run.unsettled += 1
            run.inflight -= 1
            self.slots.release()
            run.check_idle()

    # --- the store's health ---

    def store_down(self, reason: str) -> None:
        """The store refuses writes: take no work, send every held job back with its progress
        saved (another instance, or this one later, resumes it), and probe until it is back."""
        self.health.fail("store", reason)
        self.jobs.stop_all("paused")
        if self.draining:  # the jobs go back anyway; a probe now would outlive the drain
            return
        if self._store_watch is None or self._store_watch.done():
            assert self._tg is not None
            self._store_watch = self._tg.create_task(self.store.until_back(), name="store check")

    # --- what the daemon reads and changes live ---

    def snapshot(self) -> Snapshot:
        now = self.time.monotonic()
        views = tuple(
            JobView(run.id, run.held.tube, run.held.delivery.job, run.total, run.counts.uploaded,
                    run.counts.skipped, run.counts.failed, run.counts.bytes, run.inflight,
                    round(now - run.started, 3))
            for run in self.runs.values()
        )
        return Snapshot(views, sum(v.inflight for v in views), self.summary.files.settled)

    def retune(self, upload: UploadConfig) -> None:
        """SIGHUP: concurrency and the AIMD keys; the slots follow the new ceiling unless
        backed off by throttling."""
        self.aimd.retune(upload)

    def apply_limits(self, config: Config) -> None:
        """New [limits] (SIGHUP): waiting uploads re-time themselves, throttled tubes re-checked."""
        self.limiter.apply(config.limits)
        self.jobs.wake.set()


def _deadline(time: Time, seconds: float) -> Callable[[], float]:
    """Seconds left until `seconds` from now, never below zero."""
    end = time.monotonic() + seconds
    return lambda: max(0.0, end - time.monotonic())


async def _first(*aws: Awaitable[object], timeout: float) -> bool:
    """Wait until the first of several awaitables finishes, or `timeout` (then False); cancel
    the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
